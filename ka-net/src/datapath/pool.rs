//! The node's buffers: [`BUF_SIZE`] bytes each, page-aligned, with room
//! for a record header before the payload, made at most [`DEPTH`] at a time
//! and reused once written and hashed. The pool bounds a node's image data
//! in memory to `DEPTH × BUF_SIZE` = 8 MiB whatever the image size.
//!
//! Page alignment is what the kernel's copies to and from user space are
//! fastest with; the room before the payload lets a record go out of a
//! buffer with one `write`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use ka_core::record::RecordHeader;

use crate::Error;

/// Payload bytes per buffer, and the longest `Data` record a sender cuts:
/// 1 MiB, a multiple of [`crate::BLOCK`]. Large enough that per-buffer costs
/// (a channel hop, a `write`, a hash call, a `sendfile`) vanish against the
/// copies; 2 and 4 MiB buffers are no faster (docs/performance.md).
pub const BUF_SIZE: usize = 1 << 20;

/// Buffers per leg (being received, written, hashed or sent): enough to keep
/// every stage busy through jitter; bounds a leg's buffer memory to
/// `DEPTH × BUF_SIZE` = 8 MiB whatever the image size.
pub(super) const DEPTH: usize = 8;

/// Alignment of payloads in buffers: a page.
const PAGE: usize = 4096;

/// A pooled payload buffer: [`BUF_SIZE`] page-aligned bytes with room for a
/// record header just before them.
pub(super) struct Buf {
    mem: Vec<u8>,
    /// Where the payload starts in `mem`.
    at: usize,
}

impl Buf {
    pub(super) fn new() -> Buf {
        let mem = vec![0u8; BUF_SIZE + 2 * PAGE];
        let misalign = mem.as_ptr() as usize % PAGE;
        // The first page boundary with room for a header before it.
        let mut at = (PAGE - misalign) % PAGE;
        if at < RecordHeader::SIZE {
            at += PAGE;
        }
        Buf { mem, at }
    }

    pub(super) fn payload(&self, len: usize) -> &[u8] {
        &self.mem[self.at..self.at + len]
    }

    pub(super) fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.at..self.at + BUF_SIZE]
    }

    /// `header` followed by the first `len` payload bytes, contiguous.
    #[cfg(test)]
    pub(super) fn record(&mut self, header: &RecordHeader, len: usize) -> &[u8] {
        let from = self.at - RecordHeader::SIZE;
        self.mem[from..self.at].copy_from_slice(&header.encode());
        &self.mem[from..self.at + len]
    }
}

/// Buffers in circulation between the receiving thread, which takes them,
/// and the hasher, which returns them.
pub(super) struct Pool {
    /// Buffers the hasher is done with.
    free: std_mpsc::Receiver<Buf>,
    /// Buffers made so far; at most [`DEPTH`] while the hasher returns them.
    allocated: usize,
}

impl Pool {
    /// A pool whose buffers come back on `free`.
    pub(super) fn new(free: std_mpsc::Receiver<Buf>) -> Pool {
        Pool { free, allocated: 0 }
    }

    /// A buffer to receive into: a free one, a new one while fewer than
    /// [`DEPTH`] exist, or the next the hasher returns (back-pressure: the
    /// receiver never runs more than `DEPTH` buffers ahead of the hash).
    /// Gives up once `stopped` is set: a dropped relay waits for its thread.
    pub(super) fn take(&mut self, stopped: &StopFlag) -> Result<Buf, Error> {
        if let Ok(b) = self.free.try_recv() {
            return Ok(b);
        }
        if self.allocated < DEPTH {
            self.allocated += 1;
            return Ok(Buf::new());
        }
        loop {
            match self.free.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => return Ok(b),
                Err(std_mpsc::RecvTimeoutError::Timeout) if stopped.is_set() => {
                    return Err(relay_stopped())
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Err(hasher_gone()),
            }
        }
    }

    /// Forgets a buffer taken and never handed to the hasher (it held
    /// nothing), so the pool may make another. Kept in the count, it would
    /// be lost with its thread, and after a few such stops the next relay
    /// would wait forever for a buffer.
    pub(super) fn forget_one(&mut self) {
        self.allocated -= 1;
    }
}

/// Set once a relay is dropped; its receiving thread checks it between
/// reads and while it waits for a buffer.
#[derive(Clone, Default)]
pub(super) struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The hasher thread is gone (it panicked, or its writer was dropped).
pub(super) fn hasher_gone() -> Error {
    Error::WriterFailed("the hasher thread exited".into())
}

/// The relay was dropped while its receiving thread ran.
pub(super) fn relay_stopped() -> Error {
    Error::Invalid("the relay was stopped".into())
}
