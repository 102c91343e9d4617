//! A small blocking TFTP client (RFC 1350, with the `blksize` and `tsize`
//! options of RFC 2348/2349): what `ka doctor` fetches boot files with, the
//! way a PXE ROM or pxelinux does. It reads one file at a time, in lock
//! step (no window), and bounds every wait.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

const RRQ: u16 = 1;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// The block size asked for: pxelinux's, which fits one Ethernet frame.
pub const BLOCK_SIZE: u16 = 1408;
/// How long to wait for each packet before sending the last one again.
const RETRY_AFTER: Duration = Duration::from_millis(1000);
/// Sends of one packet before giving up, as PXE ROMs do.
const TRIES: u32 = 4;
/// The largest file fetched: far above any boot file or initramfs.
const MAX_BYTES: usize = 1 << 30;

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The server answered with a TFTP error (code 1: not found; 2: access
    /// violation).
    Refused {
        /// The TFTP error code.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// Nothing (or nothing more) came back in time.
    NoAnswer(String),
    /// A socket error, or an answer that breaks the protocol.
    Failed(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Refused { code, message } => {
                write!(f, "refused with TFTP error {code} ({message})")
            }
            FetchError::NoAnswer(what) => write!(f, "no answer: {what}"),
            FetchError::Failed(what) => f.write_str(what),
        }
    }
}

/// Fetches `path` from the TFTP server at `server`, sending from `from`
/// (an address of this machine; `None`: the one the system picks).
pub fn fetch(server: SocketAddr, path: &str, from: Option<IpAddr>) -> Result<Vec<u8>, FetchError> {
    let local = from.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let socket = UdpSocket::bind((local, 0))
        .map_err(|e| FetchError::Failed(format!("opening a UDP socket on {local}: {e}")))?;
    socket
        .set_read_timeout(Some(RETRY_AFTER))
        .map_err(|e| FetchError::Failed(e.to_string()))?;
    let mut request = RRQ.to_be_bytes().to_vec();
    for field in [
        path,
        "octet",
        "blksize",
        &BLOCK_SIZE.to_string(),
        "tsize",
        "0",
    ] {
        request.extend_from_slice(field.as_bytes());
        request.push(0);
    }
    // Until the server answers, requests go to its well-known port; after
    // that, everything goes to the port it answered from (its TID).
    let mut peer = server;
    let mut last_sent = request;
    let mut peer_known = false;
    let mut block_size = usize::from(BLOCK_SIZE);
    let mut expected: u16 = 1;
    let mut file = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut tries = 0;
    loop {
        if tries == TRIES {
            return Err(FetchError::NoAnswer(if peer_known {
                format!("the transfer stalled after {} bytes", file.len())
            } else {
                format!("nothing answered at {server}")
            }));
        }
        socket
            .send_to(&last_sent, peer)
            .map_err(|e| FetchError::Failed(format!("sending to {peer}: {e}")))?;
        tries += 1;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // An ICMP "port unreachable" for the request.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(FetchError::NoAnswer(format!(
                    "nothing listens at {server} (port unreachable)"
                )))
            }
            Err(e) => return Err(FetchError::Failed(format!("receiving: {e}"))),
        };
        if from.ip() != server.ip() || (peer_known && from != peer) {
            // Not the server, or another transfer's port: ignore it.
            tries -= 1;
            continue;
        }
        let packet = &buf[..n];
        let Some((op, rest)) = packet.split_first_chunk::<2>() else {
            continue;
        };
        match u16::from_be_bytes(*op) {
            ERROR => {
                let (code, message) = match rest.split_first_chunk::<2>() {
                    Some((code, msg)) => (
                        u16::from_be_bytes(*code),
                        String::from_utf8_lossy(msg.split(|&b| b == 0).next().unwrap_or(&[]))
                            .into_owned(),
                    ),
                    None => (0, String::new()),
                };
                return Err(FetchError::Refused { code, message });
            }
            OACK if !peer_known => {
                peer = from;
                peer_known = true;
                if let Some(size) = option_value(rest, "blksize") {
                    block_size = size
                        .parse()
                        .map_err(|_| FetchError::Failed(format!("bad blksize {size:?} in OACK")))?;
                }
                last_sent = ack(0);
                tries = 0;
            }
            DATA => {
                let Some((block, data)) = rest.split_first_chunk::<2>() else {
                    continue;
                };
                let block = u16::from_be_bytes(*block);
                if !peer_known {
                    // The server ignored the options: plain 512-byte blocks.
                    peer = from;
                    peer_known = true;
                    block_size = 512;
                }
                if block == expected {
                    if file.len() + data.len() > MAX_BYTES {
                        return Err(FetchError::Failed(format!(
                            "{path} is larger than {MAX_BYTES} bytes"
                        )));
                    }
                    file.extend_from_slice(data);
                    last_sent = ack(block);
                    tries = 0;
                    expected = expected.wrapping_add(1);
                    if data.len() < block_size {
                        let _ = socket.send_to(&last_sent, peer);
                        return Ok(file);
                    }
                } else {
                    // A block sent again: acknowledge what we hold.
                    tries = tries.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
}

fn ack(block: u16) -> Vec<u8> {
    let mut out = ACK.to_be_bytes().to_vec();
    out.extend_from_slice(&block.to_be_bytes());
    out
}

/// The value of option `name` in an OACK's body.
fn option_value<'a>(body: &'a [u8], name: &str) -> Option<&'a str> {
    let mut fields = body.split(|&b| b == 0);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if std::str::from_utf8(k).is_ok_and(|k| k.eq_ignore_ascii_case(name)) {
            return std::str::from_utf8(v).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oack_options_are_read_by_name() {
        let body = b"tsize\x0042000\x00BLKSIZE\x001408\x00";
        assert_eq!(option_value(body, "blksize"), Some("1408"));
        assert_eq!(option_value(body, "tsize"), Some("42000"));
        assert_eq!(option_value(body, "timeout"), None);
    }

    #[test]
    fn nothing_listening_is_no_answer() {
        // A port just freed: nothing listens there.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch(SocketAddr::from(([127, 0, 0, 1], port)), "x", None).unwrap_err();
        assert!(matches!(err, FetchError::NoAnswer(_)), "{err}");
    }
}
