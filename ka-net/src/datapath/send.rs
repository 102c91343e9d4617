//! Sending to a downstream: [`send_growing`] serves a file that is still
//! being written (a node's target, a source's spool), following the writer.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use ka_core::record::{RecordHeader, RecordKind};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::forward::Downstreams;
use super::pool::BUF_SIZE;
use crate::image::sources::{FileSource, ImageSource};
use crate::Error;

/// How far a file that is being written (a node's target, a source's spool)
/// can be read; servers follow it until the image is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Everything before this offset is written.
    pub upto: u64,
    /// The image's size, once it is complete.
    pub size: Option<u64>,
}

/// How a sent record's payload leaves the file for the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Lent with `sendfile(2)`: the socket holds the file's own pages until
    /// the peer has the bytes, with no copy. Only for a file whose sent
    /// bytes never change.
    Lent,
    /// Copied into the socket: for a file whose sent range may be punched
    /// out as soon as it is sent (a windowed spool). Linux zeroes a punched
    /// part of a large page-cache folio in place, so bytes lent by
    /// `sendfile` and still queued — in this socket, or over loopback in
    /// the peer's receive queue — would reach the peer as zeros.
    Copied,
}

/// How sending an image ended.
pub struct SendEnd {
    /// The source, returned for another send (after a `seek`) to a node that
    /// must resume.
    pub source: Box<dyn ImageSource>,
    /// The image size.
    pub size: u64,
}

impl std::fmt::Debug for SendEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendEnd")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Sends a file that is still being written (a node's target, a source's
/// spool) from the source's position to the image's `End`, following
/// `written`: records go out as soon as the writer has written them, and the
/// send waits for more at what is written so far, in one long-lived stream.
/// How a node forwards to its downstream, and how any server serves.
///
/// With `direct` (the node's [`Downstreams`], shared with its [`relay`](super::relay)),
/// the socket is lent to the receiving thread each time this send has
/// caught up with the writer, and taken back when the downstream falls
/// behind or the relay stops.
///
/// `progress` hears each offset below which everything is sent; with
/// [`Payload::Copied`] the file may be punched below it at once.
///
/// Fails if `written`'s sender goes away before the image is complete.
pub async fn send_growing(
    source: FileSource,
    downstream: &mut TcpStream,
    written: watch::Receiver<Written>,
    direct: Option<&Arc<Downstreams>>,
    payload: Payload,
    progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    send_following(source, downstream, written, direct, payload, progress).await
}

/// [`send_growing`]'s loop, run on the calling task itself: it waits for
/// the writer's progress on `written` and sends each new extent with
/// `sendfile(2)` at once. No reader thread stands between the writer and
/// the socket, so a forwarded piece costs one wakeup (this task's) instead
/// of two. Its file work is an `lseek` and a 512-byte zero probe per
/// 64 KiB block of a file just written, read from the page cache.
async fn send_following(
    mut source: FileSource,
    downstream: &mut TcpStream,
    mut written: watch::Receiver<Written>,
    direct: Option<&Arc<Downstreams>>,
    payload: Payload,
    mut progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    // A copied record goes out whole from here: header and payload in one send.
    let mut copy = Vec::new();
    let file = source
        .file()
        .try_clone()
        .map_err(|e| Error::io("duplicating the source file handle", e))?;
    let now = *written.borrow_and_update();
    source.follow(now.upto, now.size)?;
    let size = loop {
        let Some(h) = source.next_extent(BUF_SIZE)? else {
            // Everything written so far is sent. While the receiving thread
            // is exactly there, it forwards each piece itself; this task
            // sleeps until it falls behind or the relay stops.
            let loan = match direct {
                Some(d) => d.lend(downstream, source.position())?,
                None => None,
            };
            if let Some(mut loan) = loan {
                let back = loan.returned().await?;
                drop(loan);
                if let Some(rest) = back.unsent {
                    let (offset, len) = rest.payload;
                    let sent = match send_more(downstream, &rest.header_tail, len > 0).await {
                        Ok(()) if len > 0 => sendfile_all(downstream, &file, offset, len).await,
                        other => other,
                    };
                    sent.map_err(|e| Error::io(format!("sending at offset {offset}"), e))?;
                }
                source.seek(back.sent)?;
                progress(back.sent);
                let now = *written.borrow_and_update();
                source.follow(now.upto, now.size)?;
                continue;
            }
            // Wait for the writer to write more.
            loop {
                if written.changed().await.is_err() {
                    return Err(Error::Invalid(
                        "the image stopped being written before it was complete".into(),
                    ));
                }
                let now = *written.borrow_and_update();
                if source.follow(now.upto, now.size)? {
                    break;
                }
            }
            continue;
        };
        let sent = if h.kind == RecordKind::Data && payload == Payload::Copied {
            send_copied(downstream, &file, &h, &mut copy).await
        } else if h.kind == RecordKind::Data {
            // MSG_MORE: the header waits for its payload in one segment.
            match send_more(downstream, &h.encode(), true).await {
                Ok(()) => sendfile_all(downstream, &file, h.offset, h.len).await,
                Err(e) => Err(e),
            }
        } else {
            send_more(downstream, &h.encode(), false).await
        };
        sent.map_err(|e| Error::io(format!("sending at offset {}", h.offset), e))?;
        progress(h.end());
        if h.kind == RecordKind::End {
            break h.offset;
        }
    };
    downstream
        .flush()
        .await
        .map_err(|e| Error::io("flushing the data connection", e))?;
    Ok(SendEnd {
        source: Box::new(source),
        size,
    })
}

/// Writes all of `bytes` to the socket, with `MSG_MORE` if more follows.
pub(super) async fn send_more(s: &TcpStream, bytes: &[u8], more: bool) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    let flags = if more {
        MsgFlags::from_bits_retain(libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL
    } else {
        MsgFlags::MSG_NOSIGNAL
    };
    let fd = s.as_raw_fd();
    let mut off = 0;
    while off < bytes.len() {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || {
            send(fd, &bytes[off..], flags).map_err(std::io::Error::from)
        }) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends the data record `h` with its payload read from `file` into `buf`:
/// once it returns, the socket owns a copy and the file may lose the range.
async fn send_copied(
    s: &TcpStream,
    file: &std::fs::File,
    h: &RecordHeader,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let header = h.encode();
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(header.len() + h.len as usize, 0);
    file.read_exact_at(&mut buf[header.len()..], h.offset)?;
    send_more(s, buf, false).await
}

/// Sends `len` bytes of `file` at `offset` with `sendfile(2)`.
pub(super) async fn sendfile_all(
    s: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    // SAFETY: the socket outlives this call; the borrowed fd is used only
    // inside it.
    let sock = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    let mut off = offset as i64;
    let end = (offset + len) as i64;
    while off < end {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || {
            let count = (end - off) as usize;
            nix::sys::sendfile::sendfile64(sock, file, Some(&mut off), count)
                .map_err(std::io::Error::from)
        }) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the source file is shorter than the image",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
