//! The TFTP wire format (RFC 1350) with option extension (RFC 2347): what
//! the server reads (RRQ, WRQ, ACK, ERROR) and what it writes (DATA, OACK,
//! ERROR). Nothing here allocates more than the packet it builds.

/// Opcodes (RFC 1350 §5, RFC 2347 for OACK).
const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// Largest block size a client may ask for (RFC 2348: 65464, so a block
/// plus IP and UDP headers fits a 64 KiB IPv4 datagram).
pub const MAX_BLOCK_SIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLOCK_SIZE: u16 = 8;
/// The block size without the `blksize` option (RFC 1350).
pub const DEFAULT_BLOCK_SIZE: u16 = 512;

/// The options of a request, as the client asked for them. Values outside
/// their RFC ranges are dropped at parse time, as if not asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `blksize` (RFC 2348), 8..=65464.
    pub block_size: Option<u16>,
    /// `timeout` in seconds (RFC 2349), 1..=255.
    pub timeout: Option<u8>,
    /// `tsize` (RFC 2349); on a read request the client sends 0.
    pub transfer_size: Option<u64>,
    /// `windowsize` (RFC 7440), 1..=65535.
    pub window_size: Option<u16>,
}

/// A request packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// True for a write request (WRQ), false for a read request (RRQ).
    pub write: bool,
    /// The file name as sent.
    pub filename: String,
    /// The options sent.
    pub options: Options,
}

/// A packet the server understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// RRQ or WRQ.
    Request(Request),
    /// ACK of a block (0 acknowledges an OACK).
    Ack(u16),
    /// The client gave up; the message is for the log only.
    Error(u16, String),
}

/// Parses one datagram; `None` for anything malformed or not meant for a
/// server (DATA, OACK), which the server drops without an answer: replying
/// to junk from possibly forged addresses would only make it a reflector.
pub fn parse(buf: &[u8]) -> Option<Packet> {
    let (op, rest) = buf.split_first_chunk::<2>()?;
    match u16::from_be_bytes(*op) {
        op @ (RRQ | WRQ) => parse_request(op == WRQ, rest).map(Packet::Request),
        ACK => {
            let block = rest.first_chunk::<2>()?;
            Some(Packet::Ack(u16::from_be_bytes(*block)))
        }
        ERROR => {
            let (code, msg) = rest.split_first_chunk::<2>()?;
            let msg = msg.split(|&b| b == 0).next().unwrap_or_default();
            Some(Packet::Error(
                u16::from_be_bytes(*code),
                String::from_utf8_lossy(msg).into_owned(),
            ))
        }
        _ => None,
    }
}

fn parse_request(write: bool, rest: &[u8]) -> Option<Request> {
    // NUL-terminated strings: filename, mode, then option name/value pairs.
    let mut fields = rest.split(|&b| b == 0);
    let filename = std::str::from_utf8(fields.next()?).ok()?.to_owned();
    let mode = std::str::from_utf8(fields.next()?).ok()?;
    // "mail" is obsolete; netascii is served as stored (boot files are
    // binary, and the configs ka renders are plain ASCII already).
    if !(mode.eq_ignore_ascii_case("octet") || mode.eq_ignore_ascii_case("netascii")) {
        return None;
    }
    if !rest.ends_with(&[0]) {
        return None;
    }
    let mut options = Options::default();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "blksize" => {
                // RFC 2348 lets a server answer a too-large request with its
                // own maximum, so a value above 65464 is read as 65464.
                options.block_size = value
                    .parse::<u64>()
                    .ok()
                    .filter(|&b| b >= u64::from(MIN_BLOCK_SIZE))
                    .map(|b| b.min(u64::from(MAX_BLOCK_SIZE)) as u16);
            }
            "timeout" => options.timeout = value.parse::<u8>().ok().filter(|&t| t >= 1),
            "tsize" => options.transfer_size = value.parse().ok(),
            "windowsize" => options.window_size = value.parse::<u16>().ok().filter(|&w| w >= 1),
            _ => {}
        }
    }
    Some(Request {
        write,
        filename,
        options,
    })
}

/// Appends a DATA header for `block`; the caller appends the payload.
pub fn data_header(block: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

/// An OACK with the options the server granted (RFC 2347).
pub fn oack(granted: &Options) -> Vec<u8> {
    let mut out = OACK.to_be_bytes().to_vec();
    let mut put = |name: &str, value: String| {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    };
    if let Some(b) = granted.block_size {
        put("blksize", b.to_string());
    }
    if let Some(t) = granted.timeout {
        put("timeout", t.to_string());
    }
    if let Some(s) = granted.transfer_size {
        put("tsize", s.to_string());
    }
    if let Some(w) = granted.window_size {
        put("windowsize", w.to_string());
    }
    out
}

/// TFTP error codes (RFC 1350 §5, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 0: see the message.
    NotDefined = 0,
    /// 1: file not found.
    FileNotFound = 1,
    /// 2: access violation.
    AccessViolation = 2,
}

/// An ERROR packet.
pub fn error(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut out = ERROR.to_be_bytes().to_vec();
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(fields: &[&str]) -> Vec<u8> {
        let mut p = vec![0, 1];
        for f in fields {
            p.extend_from_slice(f.as_bytes());
            p.push(0);
        }
        p
    }

    #[test]
    fn requests_parse_with_options_in_range_and_drop_the_rest() {
        let p = parse(&rrq(&[
            "ka/vmlinuz",
            "OCTET",
            "BlkSize",
            "99999",
            "timeout",
            "0",
            "tsize",
            "0",
            "windowsize",
            "65535",
            "unknown",
            "x",
        ]));
        assert_eq!(
            p,
            Some(Packet::Request(Request {
                write: false,
                filename: "ka/vmlinuz".into(),
                options: Options {
                    block_size: Some(65464),
                    timeout: None,
                    transfer_size: Some(0),
                    window_size: Some(65535),
                },
            }))
        );
        assert!(parse(&rrq(&["f", "mail"])).is_none());
        assert!(parse(&[0, 1, b'f', 0, b'o', b'c', b't', b'e', b't']).is_none());
        assert!(parse(&[0, 1]).is_none());
        assert!(
            parse(&[0, 3, 0, 1, 1, 2]).is_none(),
            "DATA is not for a server"
        );
        assert_eq!(parse(&[0, 4, 1, 2]), Some(Packet::Ack(0x102)));
        assert!(parse(&[0, 4, 1]).is_none());
        assert_eq!(
            parse(&error(ErrorCode::FileNotFound, "gone")),
            Some(Packet::Error(1, "gone".into()))
        );
    }

    #[test]
    fn oack_lists_only_granted_options() {
        let o = Options {
            block_size: Some(1468),
            window_size: Some(16),
            ..Options::default()
        };
        assert_eq!(oack(&o), b"\0\x06blksize\x001468\0windowsize\x0016\0");
        let mut d = Vec::new();
        data_header(0xfffe, &mut d);
        assert_eq!(d, [0, 3, 0xff, 0xfe]);
    }
}
