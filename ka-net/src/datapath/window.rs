//! A bounded window over a node's spool: how a node that unpacks the stream
//! as it arrives (a system clone) keeps only a few megabytes of it.
//!
//! The node still receives into a spool file at absolute offsets, so every
//! server and the receiving thread work as for any other target. Behind
//! the slowest of its readers — the node's own unpacker and each serving
//! task — the spool's prefix is punched out (`FALLOC_FL_PUNCH_HOLE`), which
//! gives the memory of a tmpfs spool back at once. The receiving thread
//! waits while the span it would hold exceeds the limit, so a node's memory
//! stays bounded whatever the image size.
//!
//! What is punched is gone: a downstream asking for an offset below
//! [`Window::holds_from`] is refused, and the source (which spools the
//! whole stream) feeds it instead. A serving task registers where it stands
//! ([`Window::register`]) before reading, and nothing above a registered
//! position is punched, so a server never reads a hole for data. What a
//! serving task has sent may be punched at once, so it sends copies
//! ([`Payload::Copied`](super::Payload::Copied)), never the spool's own
//! pages: Linux zeroes a punched part of a large folio in place, under any
//! socket still holding it. A
//! downstream that stops reading therefore holds its upstream back until
//! the source declares it dead or moves it, exactly as a plain chain is as
//! fast as its slowest link.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::image::sinks::ImageSink;
use crate::image::BLOCK;
use crate::Error;

/// The default span a windowed node holds: room for a chain's bytes in
/// flight and a serving task's lag, far below a netboot node's memory.
pub const DEFAULT_WINDOW: u64 = 64 << 20;

/// Punching is done in steps of at least this much: one `fallocate` per
/// few megabytes, not per piece.
const PUNCH_STEP: u64 = 4 << 20;

/// The bounded window over one spool file (see the module docs).
#[derive(Debug)]
pub struct Window {
    spool: File,
    limit: u64,
    state: Mutex<State>,
    moved: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Everything below is punched out.
    low: u64,
    /// Where the node's own unpacker stands.
    consumed: u64,
    /// Serving tasks' positions, by registration.
    readers: BTreeMap<u64, u64>,
    next_reader: u64,
    /// The session is over: nobody waits any more.
    closed: bool,
}

impl State {
    /// The lowest offset still needed by anyone.
    fn floor(&self) -> u64 {
        self.readers.values().copied().fold(self.consumed, u64::min)
    }
}

impl Window {
    /// A window of `limit` bytes over `spool` (a handle to the file the
    /// node receives into), which starts at offset 0.
    pub fn new(spool: File, limit: u64) -> Arc<Self> {
        Self::starting_at(spool, limit, 0)
    }

    /// A window whose stream starts at offset `from` (a node resumed after
    /// a restart): nothing before it is held, or ever will be.
    pub fn starting_at(spool: File, limit: u64, from: u64) -> Arc<Self> {
        Arc::new(Window {
            spool,
            limit: limit.max(2 * PUNCH_STEP),
            state: Mutex::new(State {
                low: from,
                consumed: from,
                ..State::default()
            }),
            moved: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lowest offset this node can still serve.
    pub fn holds_from(&self) -> u64 {
        self.lock().low
    }

    /// The span this window may hold.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// For the receiving thread: waits until writing up to `end` keeps the
    /// held span within the limit. Fails once the window is closed.
    pub fn wait_room(&self, end: u64) -> Result<(), Error> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return Err(Error::Invalid(
                    "the node stopped unpacking the stream".into(),
                ));
            }
            if end.saturating_sub(s.floor()) <= self.limit {
                return Ok(());
            }
            s = self
                .moved
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// For the unpacker: everything below `upto` is unpacked.
    pub fn consumed(&self, upto: u64) {
        let mut s = self.lock();
        s.consumed = s.consumed.max(upto);
        self.punch(&mut s);
    }

    /// For a serving task about to send from `from`: registers it, or
    /// `None` if that offset is already punched out.
    pub fn register(self: &Arc<Self>, from: u64) -> Option<Reader> {
        let mut s = self.lock();
        if from < s.low || s.closed {
            return None;
        }
        let id = s.next_reader;
        s.next_reader += 1;
        s.readers.insert(id, from);
        Some(Reader {
            window: Arc::clone(self),
            id,
        })
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends the window: waiting writers give up.
    pub fn close(&self) {
        self.lock().closed = true;
        self.moved.notify_all();
    }

    /// Punches out what nobody needs, in steps, and wakes the writer.
    fn punch(&self, s: &mut State) {
        let floor = s.floor() / BLOCK * BLOCK;
        if floor >= s.low + PUNCH_STEP {
            let (from, len) = (s.low, floor - s.low);
            // A failed punch (a file system without it) only costs memory:
            // the offsets are gone for serving all the same.
            if let Err(e) = nix::fcntl::fallocate(
                self.spool.as_raw_fd(),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                from as i64,
                len as i64,
            ) {
                tracing::debug!(error = %e, "punching the spool's prefix out");
            }
            s.low = floor;
        }
        self.moved.notify_all();
    }
}

/// A serving task's place in a [`Window`]; dropping it lets the window move
/// past.
#[derive(Debug)]
pub struct Reader {
    window: Arc<Window>,
    id: u64,
}

impl Reader {
    /// The task has sent everything below `upto`.
    pub fn advance(&self, upto: u64) {
        let mut s = self.window.lock();
        if let Some(p) = s.readers.get_mut(&self.id) {
            *p = (*p).max(upto);
        }
        self.window.punch(&mut s);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut s = self.window.lock();
        s.readers.remove(&self.id);
        self.window.punch(&mut s);
    }
}

/// A sink that waits for room in a [`Window`] before each write: the
/// receiving thread of a windowed node.
pub struct WindowedSink {
    inner: Box<dyn ImageSink>,
    window: Arc<Window>,
}

impl WindowedSink {
    /// `inner` (the spool's sink), held to `window`.
    pub fn new(inner: Box<dyn ImageSink>, window: Arc<Window>) -> Self {
        WindowedSink { inner, window }
    }
}

impl ImageSink for WindowedSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.window.wait_room(offset + data.len() as u64)?;
        self.inner.write_data(offset, data)
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.window.wait_room(offset + len.min(BLOCK))?;
        self.inner.write_zero(offset, len)
    }

    fn resume(&mut self, offset: u64) -> Result<(), Error> {
        self.inner.resume(offset)
    }

    fn position(&self) -> u64 {
        self.inner.position()
    }

    fn finish(&mut self, size: u64) -> Result<(), Error> {
        self.inner.finish(size)
    }

    fn readback(&self) -> Result<Box<dyn crate::image::sources::ImageSource>, Error> {
        // Its prefix is punched out: nothing whole to read back.
        Err(Error::NotReadable("a windowed spool".into()))
    }

    fn forward_file(&self) -> Option<File> {
        self.inner.forward_file()
    }
}

/// Reads a windowed spool as the receiving thread writes it: what a node's
/// unpacker (a system rebuild, a packed stream's decoder) consumes, each
/// byte once, telling the window how far it got so its prefix can go.
pub struct Follower {
    spool: File,
    written: tokio::sync::watch::Receiver<super::Written>,
    window: Arc<Window>,
    rt: tokio::runtime::Handle,
    pos: u64,
}

impl Follower {
    /// Follows `spool` from where `window` starts (0 unless the node
    /// resumed) as `written` says it grows. Blocking calls: use it on a
    /// blocking thread of the runtime `rt`.
    pub fn open(
        spool: &std::path::Path,
        written: tokio::sync::watch::Receiver<super::Written>,
        window: Arc<Window>,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, Error> {
        let pos = window.lock().consumed;
        let spool = File::open(spool)
            .map_err(|e| Error::io(format!("opening the spool {}", spool.display()), e))?;
        Ok(Follower {
            spool,
            written,
            window,
            rt,
            pos,
        })
    }

    /// Where the next read starts.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next written bytes (at most `buf.len()`), waiting for them;
    /// `Ok(None)` once the stream is complete and all of it was read.
    /// What the previous call returned counts as consumed.
    pub fn next<'b>(&mut self, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, Error> {
        use std::os::unix::fs::FileExt;
        self.window.consumed(self.pos);
        let upto = loop {
            if self.window.is_closed() {
                return Err(Error::Invalid("the node stopped unpacking".into()));
            }
            let w = *self.written.borrow_and_update();
            if w.upto > self.pos {
                break w.upto;
            }
            if w.size.is_some_and(|s| s <= self.pos) {
                return Ok(None);
            }
            // Bounded, so a closed window is seen without a write.
            let changed = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(500), self.written.changed()).await
            });
            if matches!(changed, Ok(Err(_))) {
                return Err(Error::Invalid("the node stopped receiving".into()));
            }
        };
        let n = ((upto - self.pos) as usize).min(buf.len());
        self.spool
            .read_exact_at(&mut buf[..n], self.pos)
            .map_err(|e| Error::io(format!("reading the spool at {}", self.pos), e))?;
        self.pos += n as u64;
        Ok(Some(&buf[..n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn spool(len: u64) -> (tempfile::NamedTempFile, Arc<Window>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..len >> 20 {
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
        let w = Window::new(f.reopen().unwrap(), 16 << 20);
        (f, w)
    }

    #[test]
    fn the_prefix_nobody_needs_is_punched_and_gives_its_blocks_back() {
        let (f, w) = spool(32 << 20);
        let before = f.as_file().metadata().unwrap().blocks();
        w.consumed(20 << 20);
        assert_eq!(w.holds_from(), 20 << 20);
        let after = f.as_file().metadata().unwrap().blocks();
        assert!(
            after * 512 <= before * 512 - (19 << 20),
            "blocks {before} → {after}"
        );
        let mut b = [1u8; 4];
        f.as_file().read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4], "a punched offset reads as a hole");
        f.as_file().read_exact_at(&mut b, 21 << 20).unwrap();
        assert_eq!(b, [7; 4], "what is still needed stays");
    }

    #[test]
    fn a_registered_reader_holds_the_window_until_it_moves_or_leaves() {
        let (_f, w) = spool(32 << 20);
        let r = w.register(1 << 20).expect("offset still held");
        w.consumed(30 << 20);
        assert_eq!(w.holds_from(), 0, "nothing above a reader is punched");
        r.advance(10 << 20);
        assert_eq!(w.holds_from(), 10 << 20);
        assert!(w.register(5 << 20).is_none(), "a punched offset is refused");
        drop(r);
        assert_eq!(w.holds_from(), 30 << 20);
    }

    #[test]
    fn the_writer_waits_for_room_and_goes_on_when_the_unpacker_moves() {
        let (_f, w) = spool(0);
        w.wait_room(16 << 20).unwrap();
        let w2 = Arc::clone(&w);
        let waiter = std::thread::spawn(move || w2.wait_room(40 << 20));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "40 MiB ahead of 0 is beyond 16 MiB");
        w.consumed(30 << 20);
        waiter.join().unwrap().unwrap();
        let w3 = Arc::clone(&w);
        let stuck = std::thread::spawn(move || w3.wait_room(100 << 20));
        w.close();
        assert!(
            stuck.join().unwrap().is_err(),
            "closing frees a waiting writer"
        );
    }
}
