//! One read transfer: what is granted of the client's options, and the
//! sending loop with its limits.
//!
//! Windows (RFC 7440) are where an unauthenticated client gets leverage: one
//! ACK releases a whole window, and a silent client used to get that window
//! again on every timeout. So the window is small and bounded in bytes, a
//! window is sent only in answer to an ACK from the client's own address and
//! port (the OACK's ACK 0 shows the client received our reply, i.e. the
//! address is not forged), and after a timeout only the first missing block
//! is sent again until the client answers. A silent client thus costs one
//! window plus a few single blocks, and is dropped after
//! [`Limits::retries`] timeouts (after [`UNCONFIRMED_RETRIES`] if it never
//! answered at all); any transfer ends at [`Limits::lifetime`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::packet::{self, Options, Packet, DEFAULT_BLOCK_SIZE};

/// Timeouts after which a client that never acknowledged anything is
/// dropped (when [`Limits::retries`] is larger): such a request may be
/// forged, and a real client whose request went unanswered asks again.
pub const UNCONFIRMED_RETRIES: u32 = 2;

/// The most bytes a window may hold, whatever the configured limits: it
/// bounds the buffer of a transfer and what one ACK can release.
pub const MAX_WINDOW_BYTES: usize = 256 * 1024;

/// What the server grants and how long it persists (see [`super::TftpConfig`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Retransmission timeout when the client does not negotiate one.
    pub timeout: Duration,
    /// Largest `timeout` option accepted, in seconds; larger ones are
    /// declined (RFC 2349 lets a server only accept or omit it).
    pub max_client_timeout: u8,
    /// Largest block size granted.
    pub block_size: u16,
    /// Largest window granted.
    pub window_size: u16,
    /// Timeouts in a row after which a silent client is dropped.
    pub retries: u32,
    /// Longest a transfer may run, from request to last ACK.
    pub lifetime: Duration,
}

/// What was granted for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Bytes per DATA block.
    pub block_size: u16,
    /// Blocks sent per ACK.
    pub window: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// The OACK to send first, if any option was granted.
    pub oack: Option<Vec<u8>>,
}

/// Grants what `asked` for within `limits`, for a file of `size` bytes.
pub fn negotiate(asked: &Options, limits: &Limits, size: u64) -> Plan {
    let mut granted = Options {
        block_size: asked.block_size.map(|b| b.min(limits.block_size.max(8))),
        ..Options::default()
    };
    let block_size = granted.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let byte_cap = (MAX_WINDOW_BYTES / usize::from(block_size)).clamp(1, 65535) as u16;
    granted.window_size = asked
        .window_size
        .map(|w| w.min(limits.window_size.max(1)).min(byte_cap));
    granted.timeout = asked.timeout.filter(|&t| t <= limits.max_client_timeout);
    granted.transfer_size = asked.transfer_size.map(|_| size);
    let timeout = granted
        .timeout
        .map_or(limits.timeout, |t| Duration::from_secs(u64::from(t)));
    Plan {
        block_size,
        window: granted.window_size.unwrap_or(1),
        timeout,
        oack: (granted != Options::default()).then(|| packet::oack(&granted)),
    }
}

/// What is sent: a file or bytes generated for the request.
pub enum Source {
    /// Generated content.
    Memory(Vec<u8>),
    /// A regular file, read by offset so a retransmission needs no copy
    /// kept around.
    File(Arc<std::fs::File>),
}

/// How far a file is read ahead once the client has acknowledged data: one
/// trip to the blocking pool per block would make lockstep transfers (no
/// window, as PXE ROMs, iPXE and pxelinux do) several times slower.
const READ_AHEAD: usize = 64 * 1024;

/// Reads a [`Source`] by offset through a bounded read-ahead buffer.
struct Reader<'s> {
    source: &'s Source,
    /// Bytes of the file from `at`.
    cache: Vec<u8>,
    at: u64,
}

impl<'s> Reader<'s> {
    fn new(source: &'s Source) -> Reader<'s> {
        Reader {
            source,
            cache: Vec::new(),
            at: 0,
        }
    }

    /// Up to `len` bytes at `offset` (fewer at the end of the source).
    /// With `ahead`, a file read fetches [`READ_AHEAD`] bytes at least; a
    /// client that has not acknowledged any data gets no read-ahead, so a
    /// flood of requests holds no buffers.
    async fn read(&mut self, offset: u64, len: usize, ahead: bool) -> io::Result<&[u8]> {
        let file = match self.source {
            Source::Memory(data) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start.saturating_add(len).min(data.len());
                return Ok(&data[start..end]);
            }
            Source::File(file) => file,
        };
        let cached = offset >= self.at && offset + len as u64 <= self.at + self.cache.len() as u64;
        if !cached {
            let want = if ahead { len.max(READ_AHEAD) } else { len };
            let mut buf = std::mem::take(&mut self.cache);
            let file = file.clone();
            self.cache = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                buf.clear();
                buf.resize(want, 0);
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                // A file that shrank mid-transfer ends early; the client
                // sees a short block and a size that is not the tsize.
                buf.truncate(got);
                Ok(buf)
            })
            .await
            .map_err(io::Error::other)??;
            self.at = offset;
        }
        let start = (offset - self.at) as usize;
        let start = start.min(self.cache.len());
        let end = start.saturating_add(len).min(self.cache.len());
        Ok(&self.cache[start..end])
    }
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client acknowledged the last block.
    Done,
    /// The client sent an ERROR (e.g. it declined our OACK, or gave up).
    ClientError(String),
    /// The client stopped answering.
    Silent,
    /// The transfer ran past its lifetime.
    TooLong,
    /// The socket failed (e.g. ICMP port unreachable: nobody listens there).
    Io(io::Error),
}

/// What waiting for an ACK gave.
enum Wait {
    /// An ACK accepted by the filter, with the filter's value.
    Acked(u64),
    /// No acceptable ACK within the timeout.
    Timeout,
    /// The lifetime deadline passed.
    Deadline,
    /// The client sent an ERROR.
    ClientError(String),
}

/// Sends `source` (`size` bytes) to the peer `socket` is connected to,
/// following `plan`, until done or a limit is hit. Sends an ERROR to the
/// client when the server gives up, so a live client fails fast.
///
/// `acked` is called at each acknowledgement the client sends: the server
/// learns from it that the client really receives at its address.
pub async fn send(
    socket: &UdpSocket,
    source: &Source,
    size: u64,
    plan: &Plan,
    limits: &Limits,
    deadline: Instant,
    acked: &mut (dyn FnMut() + Send),
) -> Outcome {
    let outcome = match run(socket, source, size, plan, limits, deadline, acked).await {
        Ok(o) => o,
        Err(e) => Outcome::Io(e),
    };
    let why = match outcome {
        Outcome::Silent => "timed out waiting for an ACK",
        Outcome::TooLong => "transfer time limit reached",
        Outcome::Io(_) => "server I/O error",
        Outcome::Done | Outcome::ClientError(_) => return outcome,
    };
    let _ = socket
        .send(&packet::error(packet::ErrorCode::NotDefined, why))
        .await;
    outcome
}

async fn run(
    socket: &UdpSocket,
    source: &Source,
    size: u64,
    plan: &Plan,
    limits: &Limits,
    deadline: Instant,
    acked: &mut (dyn FnMut() + Send),
) -> io::Result<Outcome> {
    let bs = u64::from(plan.block_size);
    // Blocks are numbered from 1 here and on the wire modulo 2^16; the last
    // block is the first one shorter than bs (possibly empty).
    let last = size / bs + 1;
    let mut silent = 0;
    let mut retries = limits.retries.min(UNCONFIRMED_RETRIES);

    if let Some(oack) = &plan.oack {
        loop {
            socket.send(oack).await?;
            match wait_ack(socket, plan.timeout, deadline, |a| (a == 0).then_some(0)).await? {
                Wait::Acked(_) => {
                    acked();
                    break;
                }
                Wait::Timeout => {
                    silent += 1;
                    if silent > retries {
                        return Ok(Outcome::Silent);
                    }
                }
                Wait::Deadline => return Ok(Outcome::TooLong),
                Wait::ClientError(m) => return Ok(Outcome::ClientError(m)),
            }
        }
        silent = 0;
        retries = limits.retries;
    }

    let mut base = 1u64; // first block not yet acknowledged
    let mut sent_end = 1u64; // one past the highest block sent
    let mut probing = false;
    let mut reader = Reader::new(source);
    let mut pkt = Vec::with_capacity(4 + bs as usize);
    while base <= last {
        let count = if probing {
            1
        } else {
            u64::from(plan.window).min(last - base + 1)
        };
        let offset = (base - 1) * bs;
        let len = (count * bs).min(size.saturating_sub(offset)) as usize;
        let buf = reader.read(offset, len, base > 1).await?;
        for i in 0..count as usize {
            let chunk =
                &buf[(i * bs as usize).min(buf.len())..((i + 1) * bs as usize).min(buf.len())];
            pkt.clear();
            packet::data_header((base + i as u64) as u16, &mut pkt);
            pkt.extend_from_slice(chunk);
            socket.send(&pkt).await?;
        }
        sent_end = sent_end.max(base + count);
        // Any block sent and not yet acknowledged may be acknowledged: after
        // a probe, the client may ack the end of what it got earlier.
        let span = sent_end - base;
        let wire_base = base as u16;
        let accept = |a: u16| {
            let off = u64::from(a.wrapping_sub(wire_base));
            (off < span).then_some(off)
        };
        match wait_ack(socket, plan.timeout, deadline, accept).await? {
            Wait::Acked(off) => {
                acked();
                base += off + 1;
                silent = 0;
                retries = limits.retries;
                probing = false;
            }
            Wait::Timeout => {
                silent += 1;
                if silent > retries {
                    return Ok(Outcome::Silent);
                }
                probing = true;
            }
            Wait::Deadline => return Ok(Outcome::TooLong),
            Wait::ClientError(m) => return Ok(Outcome::ClientError(m)),
        }
    }
    Ok(Outcome::Done)
}

/// Waits up to `timeout` (and not past `deadline`) for an ACK that
/// `accept` maps to a value; other packets (duplicate ACKs, junk) are
/// ignored, as RFC 1350 prescribes to avoid the Sorcerer's Apprentice bug.
async fn wait_ack(
    socket: &UdpSocket,
    timeout: Duration,
    deadline: Instant,
    accept: impl Fn(u16) -> Option<u64>,
) -> io::Result<Wait> {
    let until = (Instant::now() + timeout).min(deadline);
    let mut buf = [0u8; 516];
    let got = tokio::time::timeout_at(until, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            match packet::parse(&buf[..n]) {
                Some(Packet::Ack(a)) => {
                    if let Some(v) = accept(a) {
                        return Ok(Wait::Acked(v));
                    }
                }
                Some(Packet::Error(_, msg)) => return Ok(Wait::ClientError(msg)),
                _ => {}
            }
        }
    })
    .await;
    match got {
        Ok(r) => r,
        Err(_) if Instant::now() >= deadline => Ok(Wait::Deadline),
        Err(_) => Ok(Wait::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(2),
            max_client_timeout: 5,
            block_size: 1468,
            window_size: 16,
            retries: 5,
            lifetime: Duration::from_secs(600),
        }
    }

    #[test]
    fn negotiation_caps_block_window_and_timeout() {
        let asked = Options {
            block_size: Some(65464),
            timeout: Some(255),
            transfer_size: Some(0),
            window_size: Some(65535),
        };
        let p = negotiate(&asked, &limits(), 64 << 20);
        assert_eq!((p.block_size, p.window), (1468, 16));
        assert_eq!(p.timeout, Duration::from_secs(2), "255 s is declined");
        assert_eq!(
            p.oack.unwrap(),
            b"\0\x06blksize\x001468\0tsize\x0067108864\0windowsize\x0016\0"
        );

        // Whatever the configuration, a window stays within MAX_WINDOW_BYTES.
        let wide = Limits {
            block_size: 65464,
            window_size: 65535,
            ..limits()
        };
        let p = negotiate(&asked, &wide, 1);
        assert_eq!((p.block_size, p.window), (65464, 4));

        let p = negotiate(
            &Options {
                timeout: Some(3),
                ..Options::default()
            },
            &limits(),
            1,
        );
        assert_eq!((p.block_size, p.window), (512, 1));
        assert_eq!(p.timeout, Duration::from_secs(3));
        assert_eq!(p.oack.unwrap(), b"\0\x06timeout\x003\0");

        let p = negotiate(&Options::default(), &limits(), 1);
        assert_eq!(p.oack, None, "no options, no OACK (RFC 2347)");
    }
}
