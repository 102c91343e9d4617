//! The fast path: moving records from a source to a socket, and from an
//! upstream socket into a node's sink.
//!
//! - On a node ([`relay`]), one receiving thread reads the upstream socket
//!   into a pooled buffer and writes each piece to the sink itself, so a
//!   received byte reaches the disk without changing threads; the
//!   [`NodeWriter`]'s hasher thread hashes whole buffers behind it and
//!   returns them to the pool. A buffer is reused only once it is written
//!   and hashed; the pool bounds the memory in flight whatever the image
//!   size. Receiving and writing share a thread because on a slow link
//!   every thread handoff is a wakeup, and wakeups (not copies) were what a
//!   node spent its CPU on; hashing keeps a thread of its own so that on a
//!   fast link it runs beside them on the other core.
//! - A node serves each downstream from what it has written
//!   ([`send_growing`], following the writer's progress), with
//!   `sendfile(2)` from the page cache the writer just filled. The same
//!   path serves a late or resumed downstream from disk, so no memory
//!   buffer limits a slow downstream or a repair. While a downstream keeps
//!   up on a slow link, the receiving thread sends each piece to it itself,
//!   right after writing it ([`crate::datapath::forward`]).
//! - On the source, a reader thread produces records from the
//!   [`ImageSource`] while the async task writes them to the socket
//!   ([`send_image`]): by `sendfile(2)` for files and block devices (the
//!   reader only probes blocks for zeros), from pooled buffers for streams.
//!
//! Each buffer has room before its payload for the 17-byte record header,
//! so a record from a buffer goes out with one `write`; with `sendfile`, the
//! header goes first with `MSG_MORE` so it shares a segment with its payload.
//! Payloads are page-aligned, which the kernel's copies to and from user
//! space are fastest with.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use ka_core::record::{RecordHeader, RecordKind};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Duration;

use crate::datapath::forward::{Downstreams, Feeding};
use crate::image::digest::ImageHasher;
use crate::image::sinks::ImageSink;
use crate::image::sources::{FileSource, ImageSource};
use crate::Error;
use ka_core::codec::Digest;

/// Payload bytes per buffer, and the longest `Data` record a sender cuts:
/// 1 MiB, a multiple of [`crate::BLOCK`]. Large enough that per-buffer costs
/// (a channel hop, a `write`, a hash call, a `sendfile`) vanish against the
/// copies; 2 and 4 MiB measured no faster (see the crate docs).
pub const BUF_SIZE: usize = 1 << 20;

/// Buffers per leg (being received, written, hashed or sent): enough to keep
/// every stage busy through jitter; bounds a leg's buffer memory to
/// `DEPTH × BUF_SIZE` = 8 MiB whatever the image size.
const DEPTH: usize = 8;

/// Alignment of payloads in buffers: a page.
const PAGE: usize = 4096;

/// Jobs in the node's pipeline before the receiver waits. `Zero` records
/// carry no buffer, so this is what bounds the queues for a sparse image.
const MAX_QUEUED_JOBS: usize = 4 * DEPTH;

pub use ka_core::config::FORWARD_DELAY;

/// On a fast link (buffers fill before their deadline), a node's receiving
/// thread is woken by its upstream socket only once this much has arrived
/// (`SO_RCVLOWAT`): per 64 KiB, a GSO packet's worth, rather than per
/// segment. On a slow link the low mark is what completes the open piece
/// (see `Receiver::wait`). Linux clamps the receive window to a raised low
/// mark unless the socket's buffer size was set by hand, which
/// `Upstream::enlarge_receive_buffer` does: without it, session 4 saw
/// slower hops with low marks.
const WAKE_BATCH: usize = 64 << 10;

/// The receive buffer a node asks for on its upstream socket (see
/// `Upstream::enlarge_receive_buffer`): 4 MiB, a third of a second at
/// 100 Mbit/s, 3 ms at 10 Gbit/s.
const RECEIVE_BUFFER: usize = 4 << 20;

/// On a slow link, how much past the current record one read of the
/// upstream may take along (kept aside and used by the next reads).
const READ_AHEAD: usize = 64 << 10;

use ka_core::config::FORWARD_AFTER;

const FORWARD_BYTES_MIN: usize = ka_core::config::FORWARD_BYTES_MIN as usize;

/// How long the upstream's rate is measured over before it sets the bytes
/// of [`FORWARD_AFTER`] anew.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// A pooled payload buffer: [`BUF_SIZE`] page-aligned bytes with room for a
/// record header just before them.
struct Buf {
    mem: Vec<u8>,
    /// Where the payload starts in `mem`.
    at: usize,
}

impl Buf {
    fn new() -> Buf {
        let mem = vec![0u8; BUF_SIZE + 2 * PAGE];
        let misalign = mem.as_ptr() as usize % PAGE;
        // The first page boundary with room for a header before it.
        let mut at = (PAGE - misalign) % PAGE;
        if at < RecordHeader::SIZE {
            at += PAGE;
        }
        Buf { mem, at }
    }

    fn payload(&self, len: usize) -> &[u8] {
        &self.mem[self.at..self.at + len]
    }

    fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.at..self.at + BUF_SIZE]
    }

    /// `header` followed by the first `len` payload bytes, contiguous.
    fn record(&mut self, header: &RecordHeader, len: usize) -> &[u8] {
        let from = self.at - RecordHeader::SIZE;
        self.mem[from..self.at].copy_from_slice(&header.encode());
        &self.mem[from..self.at + len]
    }
}

/// How far a file that is being written (a node's target, a source's spool)
/// can be read; servers follow it until the image is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Everything before this offset is written.
    pub upto: u64,
    /// The image's size, once it is complete.
    pub size: Option<u64>,
}

/// What the relay reports as it goes.
#[derive(Debug)]
pub enum RelayEvent {
    /// The sink has taken everything before this offset (written, not yet
    /// flushed to stable storage; [`ImageSink::finish`] does that). A server
    /// may send it on from the sink's file.
    Written(u64),
}

/// How a relay ended: the whole image was received, written, flushed and hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayEnd {
    /// The image size (the `End` record's offset).
    pub size: u64,
    /// The digest of the received stream (to compare with the source's).
    pub digest: Digest,
}

/// The hasher thread is gone (it panicked, or its writer was dropped).
fn hasher_gone() -> Error {
    Error::WriterFailed("the hasher thread exited".into())
}

/// The relay was dropped while its receiving thread ran.
fn relay_stopped() -> Error {
    Error::Invalid("the relay was stopped".into())
}

/// What hashing is asked to do, in image order.
enum HashJob {
    /// Hash `len` bytes of `buf` at `offset`, then return the buffer to the pool.
    Data { offset: u64, buf: Buf, len: usize },
    /// Hash a run of zeros.
    Zero { offset: u64, len: u64 },
    /// The image ends at `size`: reply with its digest, or the first error.
    End {
        size: u64,
        reply: std_mpsc::Sender<Result<Digest, String>>,
    },
}

/// What a relay's receiving thread borrows from the [`NodeWriter`] and
/// gives back when it stops.
struct Lent {
    sink: Box<dyn ImageSink>,
    /// Buffers the hasher is done with.
    free: std_mpsc::Receiver<Buf>,
    /// Buffers made so far; at most [`DEPTH`] while the hasher returns them.
    allocated: usize,
    hash: std_mpsc::SyncSender<HashJob>,
}

impl Lent {
    /// A buffer to receive into: a free one, a new one while fewer than
    /// [`DEPTH`] exist, or the next the hasher returns (back-pressure: the
    /// receiver never runs more than `DEPTH` buffers ahead of the hash).
    /// Gives up once `stopped` is set: a dropped relay waits for this thread.
    fn take_buf(&mut self, stopped: &StopFlag) -> Result<Buf, Error> {
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

    fn hash(&self, job: HashJob) -> Result<(), Error> {
        self.hash.send(job).map_err(|_| hasher_gone())
    }
}

/// A node's sink and running digest. During a [`relay`], one receiving
/// thread reads the upstream and writes what it reads to the sink itself,
/// so a piece of the image reaches the disk (and so the downstream, which
/// is served from the disk) without changing threads; a hasher thread
/// hashes whole buffers behind it. It outlives any one upstream
/// connection: after a relay stops, the same writer is given to the next
/// [`relay`] (from the new upstream), resuming at
/// [`position`](Self::position).
pub struct NodeWriter {
    /// `None` while a relay's thread holds it, or after that thread was lost.
    lent: Option<Lent>,
    hasher: Option<std::thread::JoinHandle<Result<ImageHasher, String>>>,
    /// Where the sink stood when it was last at home.
    position: u64,
    failed: Option<String>,
}

impl std::fmt::Debug for NodeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWriter")
            .field("position", &self.position)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl NodeWriter {
    /// Starts the hasher thread for `sink`, whose position must equal the
    /// hasher's: both start at 0 for a new image.
    pub fn new(sink: Box<dyn ImageSink>, hasher: ImageHasher) -> Result<Self, Error> {
        if sink.position() != hasher.position() {
            return Err(Error::OutOfOrder {
                expected: hasher.position(),
                got: sink.position(),
            });
        }
        let position = sink.position();
        let (hash_tx, hash_rx) = std_mpsc::sync_channel(MAX_QUEUED_JOBS);
        let (free_tx, free_rx) = std_mpsc::channel();
        let hasher = std::thread::Builder::new()
            .name("ka-hasher".into())
            .spawn(move || hasher_thread(hasher, hash_rx, free_tx))
            .map_err(|e| Error::io("starting the hasher thread", e))?;
        Ok(NodeWriter {
            lent: Some(Lent {
                sink,
                free: free_rx,
                allocated: 0,
                hash: hash_tx,
            }),
            hasher: Some(hasher),
            position,
            failed: None,
        })
    }

    /// The offset the next record must start at: where a new upstream
    /// resumes. Everything before it is written to the sink and queued for
    /// hashing.
    pub fn position(&self) -> u64 {
        self.lent
            .as_ref()
            .map_or(self.position, |l| l.sink.position())
    }

    fn check(&self) -> Result<(), Error> {
        match &self.failed {
            Some(msg) => Err(Error::WriterFailed(msg.clone())),
            None => Ok(()),
        }
    }

    /// The sink and the pool, to lend to a relay's thread or to give up.
    fn take_lent(&mut self) -> Result<Lent, Error> {
        self.lent.take().ok_or_else(|| {
            let why = self.failed.as_deref().unwrap_or("the sink was lost");
            Error::WriterFailed(why.into())
        })
    }

    /// Takes back what a relay's thread borrowed.
    fn restore(&mut self, lent: Lent, sink_failed: Option<String>) {
        self.position = lent.sink.position();
        if let Some(why) = sink_failed {
            self.failed.get_or_insert(why);
        }
        self.lent = Some(lent);
    }

    /// Stops the hasher thread once it has hashed everything queued, and
    /// returns the sink (e.g. to read it back) and the hasher.
    pub async fn into_parts(mut self) -> Result<(Box<dyn ImageSink>, ImageHasher), Error> {
        let Lent { sink, hash, .. } = self.take_lent()?;
        drop(hash); // closes the queue: the hasher finishes it and returns
        let hasher = self
            .hasher
            .take()
            .expect("the hasher thread is present until into_parts");
        let hasher = tokio::task::spawn_blocking(move || hasher.join())
            .await
            .map_err(|e| Error::WriterFailed(e.to_string()))?
            .map_err(|_| Error::WriterFailed("the hasher thread panicked".into()))?
            .map_err(Error::WriterFailed)?;
        Ok((sink, hasher))
    }
}

/// Hashes what the receiving thread has written, in order, and returns the
/// buffers. It works on whole buffers (up to [`BUF_SIZE`]) behind the
/// writes, so hashing costs a thread wakeup per buffer, not per piece
/// forwarded, and the downstream (served from the written file) never waits
/// for it. Returns the hasher, or the first error it met.
fn hasher_thread(
    mut hasher: ImageHasher,
    jobs: std_mpsc::Receiver<HashJob>,
    free: std_mpsc::Sender<Buf>,
) -> Result<ImageHasher, String> {
    let mut failed: Option<String> = None;
    for job in jobs {
        match job {
            HashJob::Data { offset, buf, len } => {
                if failed.is_none() {
                    if let Err(e) = hasher.data(offset, buf.payload(len)) {
                        failed = Some(e.to_string());
                    }
                }
                // The receiver may be gone (its relay ended): the buffer is dropped.
                let _ = free.send(buf);
            }
            HashJob::Zero { offset, len } => {
                if failed.is_none() {
                    if let Err(e) = hasher.zero(offset, len) {
                        failed = Some(e.to_string());
                    }
                }
            }
            HashJob::End { size, reply } => {
                let digest = match &failed {
                    Some(why) => Err(why.clone()),
                    None => hasher.clone().finish(size).map_err(|e| e.to_string()),
                };
                let _ = reply.send(digest);
            }
        }
    }
    match failed {
        Some(why) => Err(why),
        None => Ok(hasher),
    }
}

/// What a receiving thread hands back when it stops.
struct Received {
    lent: Lent,
    /// Why the sink can take no more, if it failed.
    sink_failed: Option<String>,
    result: Result<RelayEnd, Error>,
}

/// Receives records from `upstream` (after `leftover`, bytes already read
/// from it) until `End`, writing them through `writer`. Returns once the
/// image is complete and flushed and its digest known.
///
/// The upstream must start at `writer.position()`. `events` hears of
/// progress each time the sink has taken more; it is called from the
/// receiving thread, so a server following the written file (through a
/// `watch`) hears of it without another thread in between. On an error
/// (the upstream closed or sent a bad record, or the sink failed) every
/// byte received is written, and a new relay may resume at
/// `writer.position()`.
///
/// With `direct`, the receiving thread also sends each piece it writes to
/// the downstreams whose serving tasks ([`send_growing`] with the same
/// `direct`) have lent it their sockets. The upstream is read by that
/// thread alone: a socket still registered with the tokio runtime (pass
/// one made by `into_std`) would wake the runtime at every packet.
///
/// Dropping the future (to relink) stops the receiving thread and waits
/// for it (it stops at once: it is waiting for the socket, or writing one
/// piece), so the writer is whole again and holds everything received;
/// the connection may be left mid-record: close it.
pub async fn relay(
    upstream: &impl AsFd,
    leftover: &[u8],
    writer: &mut NodeWriter,
    direct: Option<&Arc<Downstreams>>,
    events: impl FnMut(RelayEvent) + Send + 'static,
) -> Result<RelayEnd, Error> {
    writer.check()?;
    let socket = upstream
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating the upstream socket", e))?;
    let (stop_tx, stop_rx) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::io("making the relay's stop signal", e))?;
    let lent = writer.take_lent()?;
    let stopped = StopFlag::default();
    let upstream = Upstream {
        socket: std::net::TcpStream::from(socket),
        ahead: {
            let mut ahead = leftover.to_vec();
            ahead.resize(leftover.len().max(READ_AHEAD), 0);
            ahead
        },
        from: 0,
        to: leftover.len(),
        stop: stop_rx,
        stopped: stopped.clone(),
        wake_at: 1,
        drained: false,
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    upstream.enlarge_receive_buffer();
    // The size just set (or, if that failed, the autotuned size, which only
    // grows): a safe bound.
    let calm_below =
        nix::sys::socket::getsockopt(&upstream.socket, nix::sys::socket::sockopt::RcvBuf)
            .map_or(0, |size| size / 2);
    let position = lent.sink.position();
    let receiver = Receiver {
        up: upstream,
        lent,
        feeding: direct.map(|d| d.start_feeding(position)),
        events: Box::new(events),
        reported: position,
        piece: None,
        due: None,
        fast: false,
        last_write: usize::MAX,
        calm_below,
        forward_bytes: FORWARD_BYTES_MIN,
        rate_bytes: 0,
        rate_since: std::time::Instant::now(),
        sink_failed: None,
    };
    let spawned = std::thread::Builder::new()
        .name("ka-receiver".into())
        .spawn(move || {
            let received = receiver.run();
            let _ = done_tx.send(());
            received
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            // The sink went with the thread that never ran.
            writer.failed = Some(format!("cannot start the receiving thread: {e}"));
            return Err(Error::io("starting the receiving thread", e));
        }
    };
    let mut guard = RelayGuard {
        writer,
        thread: Some(thread),
        stop: stop_tx,
        stopped,
    };
    // An error here means the thread panicked; joining says so.
    let _ = done_rx.await;
    guard.join()
}

/// Set once a relay is dropped; its receiving thread checks it between
/// reads and while it waits for a buffer.
#[derive(Clone, Default)]
struct StopFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StopFlag {
    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Stops and joins a relay's receiving thread, whether the relay finished
/// or its future was dropped, and gives the writer back what it lent.
struct RelayGuard<'a> {
    writer: &'a mut NodeWriter,
    thread: Option<std::thread::JoinHandle<Received>>,
    stop: std::os::unix::net::UnixStream,
    stopped: StopFlag,
}

impl RelayGuard<'_> {
    fn join(&mut self) -> Result<RelayEnd, Error> {
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(Received {
                lent,
                sink_failed,
                result,
            }) => {
                self.writer.restore(lent, sink_failed);
                result
            }
            Err(_) => {
                let why = "the receiving thread panicked";
                self.writer.failed.get_or_insert_with(|| why.into());
                Err(Error::WriterFailed(why.into()))
            }
        }
    }
}

impl Drop for RelayGuard<'_> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // The relay was dropped mid-stream: wake the thread, which is
            // waiting for the socket or about to, and wait for it; it writes
            // what it received and stops.
            use std::io::Write;
            self.stopped.set();
            let _ = (&self.stop).write_all(&[1]);
            let _ = self.join();
        }
    }
}

/// The upstream as the receiving thread reads it: bytes the connection's
/// frame reader had already taken, then the socket (non-blocking, waited
/// on with `poll`, beside the relay's stop signal).
struct Upstream {
    socket: std::net::TcpStream,
    /// Bytes read from the socket (or by the connection's frame reader)
    /// but not yet used: `ahead[from..to]`. Its length, at least
    /// [`READ_AHEAD`], never changes.
    ahead: Vec<u8>,
    from: usize,
    to: usize,
    /// Readable once the relay is dropped: wakes a waiting thread.
    stop: std::os::unix::net::UnixStream,
    /// Set once the relay is dropped: stops a thread that never waits
    /// (its upstream always has more).
    stopped: StopFlag,
    /// The socket's `SO_RCVLOWAT` as last set.
    wake_at: usize,
    /// The last read from the socket took less than it asked for: it had
    /// no more then.
    drained: bool,
}

impl Upstream {
    /// Waits until the upstream can be read (its `SO_RCVLOWAT` reached), or
    /// `deadline` passes; an error if the relay was stopped.
    fn wait(&self, deadline: Option<std::time::Instant>) -> Result<(), Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.from < self.to {
            return Ok(());
        }
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    // Whole milliseconds, rounded up: never wake early.
                    let ms = left.as_micros().div_ceil(1000).min(u16::MAX as u128) as u16;
                    PollTimeout::from(ms)
                }
            };
            let mut fds = [
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    if fds[0].any().unwrap_or(false) {
                        return Err(relay_stopped());
                    }
                    return Ok(());
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("waiting for the upstream", e.into())),
            }
        }
    }

    /// Gives the socket a receive buffer of [`RECEIVE_BUFFER`], so that a
    /// receiving thread kept off the CPU for a while (two cores shared by
    /// many nodes) does not close the window on its upstream: a zero
    /// window costs the upstream at least 200 ms (TCP's persist timer),
    /// and the whole chain behind it waits. Left to autotuning, the buffer
    /// stays near 128 KiB, since a node reads little per round trip: about
    /// 80 KB of payload in 1448-byte segments, 6 ms at 100 Mbit/s. In the
    /// lab, 16 nodes on two cores showed up to 7 zero windows per node per
    /// run. As root (`SO_RCVBUFFORCE`) the size is granted in full; else
    /// the kernel caps it at `net.core.rmem_max`.
    fn enlarge_receive_buffer(&self) {
        use nix::sys::socket::{setsockopt, sockopt};
        let forced = setsockopt(&self.socket, sockopt::RcvBufForce, &RECEIVE_BUFFER);
        if forced.is_err() {
            if let Err(e) = setsockopt(&self.socket, sockopt::RcvBuf, &RECEIVE_BUFFER) {
                tracing::debug!(error = %e, "cannot enlarge the upstream's receive buffer");
            }
        }
    }

    /// Makes `poll` report the socket readable only once `bytes` are there
    /// (or it is closed). A read still takes whatever is there.
    fn set_wake_at(&mut self, bytes: usize) -> Result<(), Error> {
        if bytes == self.wake_at {
            return Ok(());
        }
        let value = bytes as libc::c_int;
        // SAFETY: the socket is open for the life of `self`; the option
        // value is a plain int whose size is passed along.
        let r = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(Error::io(
                "setting the upstream's SO_RCVLOWAT",
                std::io::Error::last_os_error(),
            ));
        }
        self.wake_at = bytes;
        Ok(())
    }

    /// Reads up to `want` bytes into `dst`, like [`Upstream::read`], but
    /// from the socket takes up to all of `dst` (at most [`READ_AHEAD`]
    /// past `want`): bytes past `want` are kept for the next reads.
    fn read_ahead(&mut self, dst: &mut [u8], want: usize) -> std::io::Result<Option<usize>> {
        if self.from < self.to || dst.len() <= want {
            let want = want.min(dst.len());
            return self.read(&mut dst[..want]);
        }
        let got = self.read(dst)?;
        if let Some(n) = got.filter(|&n| n > want) {
            let extra = n - want;
            self.ahead[..extra].copy_from_slice(&dst[want..n]);
            (self.from, self.to) = (0, extra);
            return Ok(Some(want));
        }
        Ok(got)
    }

    /// Reads into `dst` like [`Upstream::read`], but from the socket takes
    /// up to [`READ_AHEAD`] bytes, kept for the next reads: a record header
    /// comes with what follows it.
    fn read_through(&mut self, dst: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.from == self.to {
            let ahead = &mut self.ahead[..READ_AHEAD];
            match read_socket(&self.socket, ahead, &mut self.drained)? {
                Some(0) => return Ok(Some(0)),
                Some(n) => (self.from, self.to) = (0, n),
                None => return Ok(None),
            }
        }
        self.read(dst)
    }

    /// Reads what is there into `dst` (what was read ahead first);
    /// `Ok(None)` if nothing is there yet.
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.from < self.to {
            let n = dst.len().min(self.to - self.from);
            dst[..n].copy_from_slice(&self.ahead[self.from..self.from + n]);
            self.from += n;
            return Ok(Some(n));
        }
        read_socket(&self.socket, dst, &mut self.drained)
    }
}

/// Reads what `socket` has into `dst`; `Ok(None)` if nothing yet.
/// `drained`: whether the read took less than it asked for (the socket
/// had no more then).
fn read_socket(
    mut socket: &std::net::TcpStream,
    dst: &mut [u8],
    drained: &mut bool,
) -> std::io::Result<Option<usize>> {
    use std::io::Read;
    match socket.read(dst) {
        Ok(n) => {
            *drained = n < dst.len();
            Ok(Some(n))
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The buffer being filled: its bytes are for the image at `offset`, the
/// first `filled` received, the first `written` of those written.
struct Piece {
    buf: Buf,
    offset: u64,
    filled: usize,
    written: usize,
}

/// A relay's receiving thread: reads records, writes their bytes, hands
/// full buffers to the hasher.
struct Receiver {
    up: Upstream,
    lent: Lent,
    /// The downstreams lent to this thread, fed each piece once written.
    feeding: Option<Feeding>,
    events: Box<dyn FnMut(RelayEvent) + Send>,
    /// The last offset `events` heard of.
    reported: u64,
    piece: Option<Piece>,
    /// When the oldest received and unwritten byte must be written.
    due: Option<std::time::Instant>,
    /// Whether the last piece was written because its buffer filled (a
    /// fast link), not because its deadline came.
    fast: bool,
    /// The bytes of the last write: on a slow link, one piece.
    last_write: usize,
    /// Half the upstream socket's receive buffer: the most a thread
    /// waiting for a whole piece may leave in it.
    calm_below: usize,
    /// A slow link's piece is written once it holds this many bytes
    /// (what arrives in [`FORWARD_AFTER`], at least [`FORWARD_BYTES_MIN`]).
    forward_bytes: usize,
    /// The upstream's rate, measured since `rate_since`: the bytes read.
    rate_bytes: usize,
    rate_since: std::time::Instant,
    sink_failed: Option<String>,
}

impl Receiver {
    /// Receives until `End` or an error, then writes everything received
    /// and queues it for hashing, and hands back what it borrowed.
    fn run(mut self) -> Received {
        let mut result = self.receive();
        // The socket goes back as it came (best effort: it is being closed
        // or handed back for frames).
        let _ = self.up.set_wake_at(1);
        if let Err(e) = self.write_piece().and_then(|_| self.hand_over_piece()) {
            result = result.and(Err(e));
        }
        Received {
            lent: self.lent,
            sink_failed: self.sink_failed,
            result,
        }
    }

    /// Everything before this offset was received.
    fn received(&self) -> u64 {
        match &self.piece {
            Some(p) => p.offset + p.filled as u64,
            None => self.lent.sink.position(),
        }
    }

    /// Notes a sink failure (the writer takes no more) and passes it on.
    fn sink_error(&mut self, e: Error) -> Error {
        self.sink_failed.get_or_insert_with(|| e.to_string());
        e
    }

    fn report(&mut self) {
        let upto = self.lent.sink.position();
        if upto > self.reported {
            self.reported = upto;
            (self.events)(RelayEvent::Written(upto));
        }
    }

    /// Writes the received and unwritten bytes of the buffer being filled:
    /// from here the downstream can be served them.
    /// Returns how many bytes it wrote.
    fn write_piece(&mut self) -> Result<usize, Error> {
        self.due = None;
        let Some(p) = self.piece.as_mut() else {
            return Ok(0);
        };
        if p.written == p.filled {
            return Ok(0);
        }
        let at = p.offset + p.written as u64;
        let bytes = &p.buf.payload(p.filled)[p.written..];
        self.last_write = bytes.len();
        let r = self.lent.sink.write_data(at, bytes);
        if let (Ok(()), Some(feeding)) = (&r, &self.feeding) {
            let header = RecordHeader {
                kind: RecordKind::Data,
                offset: at,
                len: bytes.len() as u64,
            };
            feeding.written(&header, bytes, !self.fast);
        }
        p.written = p.filled;
        r.map_err(|e| self.sink_error(e))?;
        self.report();
        Ok(self.last_write)
    }

    /// Passes the (written) buffer being filled on to the hasher.
    fn hand_over_piece(&mut self) -> Result<(), Error> {
        match self.piece.take() {
            Some(p) if p.filled > 0 => self.lent.hash(HashJob::Data {
                offset: p.offset,
                buf: p.buf,
                len: p.filled,
            }),
            Some(_) => {
                // Nothing in it (the stream stopped just as it was taken):
                // it leaves the pool's count, so the pool may make another.
                // Kept in the count, it would be lost with this thread, and
                // after a few such stops the next relay would wait forever
                // for a buffer.
                self.lent.allocated -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Waits for the upstream once a read found nothing there. While a
    /// piece is open, the socket wakes the thread only once enough has
    /// arrived: on a fast link [`WAKE_BATCH`] bytes, on a slow one what
    /// completes the piece (see [`Receiver::awaits_whole_piece`]); the piece's
    /// deadline catches the rest.
    fn wait(&mut self) -> Result<(), Error> {
        self.write_if_due()?;
        let lowat = if self.due.is_some() && self.fast {
            WAKE_BATCH
        } else if self.awaits_whole_piece() {
            self.forward_bytes.saturating_sub(self.unwritten()).max(1)
        } else {
            1
        };
        self.up.set_wake_at(lowat)?;
        // Readable or past the deadline: either way read what is there
        // first; the next read or wait writes the piece.
        self.up.wait(self.due)
    }

    /// On a slow link, once a piece is open, the thread is woken not per
    /// packet but once the piece is complete (by its bytes or its
    /// deadline), if what arrives meanwhile (about the last piece) fits
    /// half the socket's buffer: the sender never waits for the window.
    fn awaits_whole_piece(&self) -> bool {
        self.due.is_some() && !self.fast && self.pieces_fit()
    }

    /// Received bytes of the open piece not yet written.
    fn unwritten(&self) -> usize {
        self.piece.as_ref().map_or(0, |p| p.filled - p.written)
    }

    /// Counts `n` bytes just read toward the upstream's rate, and every
    /// [`RATE_WINDOW`] sets what completes a slow link's piece from it.
    fn measure_rate(&mut self, n: usize) {
        self.rate_bytes += n;
        let elapsed = self.rate_since.elapsed();
        if elapsed >= RATE_WINDOW {
            let per_piece =
                self.rate_bytes as f64 * FORWARD_AFTER.as_secs_f64() / elapsed.as_secs_f64();
            self.forward_bytes = (per_piece as usize).clamp(FORWARD_BYTES_MIN, BUF_SIZE);
            self.rate_bytes = 0;
            self.rate_since = std::time::Instant::now();
        }
    }

    /// A piece (the last one written) fits half the socket's buffer.
    fn pieces_fit(&self) -> bool {
        self.last_write <= self.calm_below
    }

    /// Writes the pending bytes once their deadline has passed. A deadline
    /// that comes before the buffer fills marks the link as slow.
    fn write_if_due(&mut self) -> Result<(), Error> {
        match self.due {
            Some(due) if std::time::Instant::now() >= due => {
                self.fast = false;
                self.write_slow_piece()
            }
            _ => Ok(()),
        }
    }

    /// Writes a slow link's piece (its deadline came, or it is complete).
    /// While bytes keep coming, the next piece's deadline starts at once,
    /// without waiting for its first byte: the thread is next woken by that
    /// piece's bytes or deadline, not also by its first packet.
    fn write_slow_piece(&mut self) -> Result<(), Error> {
        let wrote = self.write_piece()?;
        if wrote > 0 && self.pieces_fit() {
            self.due = Some(std::time::Instant::now() + FORWARD_DELAY);
        }
        Ok(())
    }

    /// Before each read: stops if the relay was dropped, and writes the
    /// pending bytes if their time has come while the upstream kept sending
    /// (reads go first and `poll` only when nothing is there, so a busy
    /// upstream never passes through [`Receiver::wait`]).
    fn before_read(&mut self) -> Result<(), Error> {
        if self.up.stopped.is_set() {
            return Err(relay_stopped());
        }
        self.write_if_due()
    }

    /// Reads an exact number of bytes outside the image (a record header).
    fn read_header(&mut self, at: u64) -> Result<RecordHeader, Error> {
        let mut hb = [0u8; RecordHeader::SIZE];
        let mut got = 0;
        while got < hb.len() {
            self.before_read()?;
            // On a slow link the header comes with what follows it.
            let read = if self.fast {
                self.up.read(&mut hb[got..])
            } else {
                self.up.read_through(&mut hb[got..])
            };
            match read {
                Ok(Some(0)) => return Err(Error::UpstreamClosed { at }),
                Ok(Some(n)) => got += n,
                Ok(None) => self.wait()?,
                Err(e) => return Err(read_error(e, at)),
            }
        }
        RecordHeader::decode(&hb).map_err(|error| Error::Record { at, error })
    }

    /// Reads `len` bytes of image data at the received position.
    fn read_data(&mut self, mut len: u64) -> Result<(), Error> {
        while len > 0 {
            let full = self.piece.as_ref().is_some_and(|p| p.filled == BUF_SIZE);
            if full {
                // Fast only if the whole buffer filled before a deadline:
                // on a slow link a buffer also fills, piece by piece.
                self.fast = self.piece.as_ref().is_some_and(|p| p.written == 0);
                self.write_piece()?;
                self.hand_over_piece()?;
            }
            if self.piece.is_none() {
                let offset = self.lent.sink.position();
                let buf = self.lent.take_buf(&self.up.stopped)?;
                self.piece = Some(Piece {
                    buf,
                    offset,
                    filled: 0,
                    written: 0,
                });
            }
            self.before_read()?;
            let p = self.piece.as_mut().expect("a piece to fill");
            let room = BUF_SIZE - p.filled;
            let want = len.min(room as u64) as usize;
            // On a slow link one read also takes what follows this record
            // (the next header, the start of the next payload): one system
            // call per wakeup instead of three. A fast link reads records
            // exactly, so no large payload is copied twice.
            let ask = if self.fast {
                want
            } else {
                room.min(want + READ_AHEAD)
            };
            let at = p.offset + p.filled as u64;
            let dst = &mut p.buf.payload_mut()[p.filled..p.filled + ask];
            match self.up.read_ahead(dst, want) {
                Ok(Some(0)) => return Err(Error::UpstreamClosed { at }),
                Ok(Some(n)) => {
                    p.filled += n;
                    len -= n as u64;
                    // One deadline per piece, set by its first byte (not one
                    // per read: a slow link delivers a packet per read).
                    if self.due.is_none() {
                        self.due = Some(std::time::Instant::now() + FORWARD_DELAY);
                    }
                    if !self.fast {
                        self.measure_rate(n);
                        if self.unwritten() >= self.forward_bytes {
                            self.write_slow_piece()?;
                            continue;
                        }
                    }
                    // The socket had no more: a thread that waits for a
                    // whole piece need not learn that by another read.
                    if self.up.drained && len > 0 && self.awaits_whole_piece() {
                        self.wait()?;
                    }
                }
                Ok(None) => self.wait()?,
                Err(e) => return Err(read_error(e, at)),
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<RelayEnd, Error> {
        loop {
            let at = self.received();
            let h = self.read_header(at)?;
            if h.offset != at {
                return Err(Error::OutOfOrder {
                    expected: at,
                    got: h.offset,
                });
            }
            match h.kind {
                RecordKind::Data => self.read_data(h.len)?,
                RecordKind::Zero => {
                    self.write_piece()?;
                    self.hand_over_piece()?;
                    let r = self.lent.sink.write_zero(h.offset, h.len);
                    r.map_err(|e| self.sink_error(e))?;
                    if let Some(feeding) = &self.feeding {
                        feeding.written(&h, &[], !self.fast);
                    }
                    self.report();
                    self.lent.hash(HashJob::Zero {
                        offset: h.offset,
                        len: h.len,
                    })?;
                }
                RecordKind::End => {
                    let size = h.offset;
                    self.write_piece()?;
                    self.hand_over_piece()?;
                    let r = self.lent.sink.finish(size);
                    r.map_err(|e| self.sink_error(e))?;
                    self.report();
                    let (reply, digest) = std_mpsc::channel();
                    self.lent.hash(HashJob::End { size, reply })?;
                    let digest = digest
                        .recv()
                        .map_err(|_| hasher_gone())?
                        .map_err(Error::WriterFailed)?;
                    return Ok(RelayEnd { size, digest });
                }
            }
        }
    }
}

fn read_error(e: std::io::Error, at: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::UpstreamClosed { at }
    } else {
        Error::io(format!("reading the upstream at offset {at}"), e)
    }
}

/// How sending an image ended.
pub struct SendEnd {
    /// The source, returned for another send (after a `seek`) to a node that
    /// must resume.
    pub source: Box<dyn ImageSource>,
    /// The image size.
    pub size: u64,
    /// The digest, if a hasher was given.
    pub digest: Option<Digest>,
}

impl std::fmt::Debug for SendEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendEnd")
            .field("size", &self.size)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Sends `source` from its current position to its `End` over `downstream`,
/// hashing on the way if `hasher` is given (it must be at the source's
/// position, normally 0). `progress` hears the offset sent so far.
///
/// A reader thread produces records while this task writes them, so reading
/// the source and writing the socket overlap. A file or block device source
/// is sent with `sendfile(2)`: its data goes from the page cache to the
/// socket without a user-space copy (the reader only probes each block for
/// zeros, and reads data into memory only when it must hash it). Other
/// sources go through pooled buffers.
///
/// If the source stops at a limit (see [`ImageSource::set_limit`]) the send
/// ends there without `End` and `size` is that limit.
pub async fn send_image(
    source: Box<dyn ImageSource>,
    downstream: &mut TcpStream,
    hasher: Option<ImageHasher>,
    progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    send(source, downstream, hasher, progress).await
}

/// Sends a file that is still being written (a node's target, a source's
/// spool) from the source's position to the image's `End`, following
/// `written`: records go out as soon as the writer has written them, and the
/// send waits for more at what is written so far, in one long-lived stream.
/// How a node forwards to its downstream, and how any server serves.
///
/// With `direct` (the node's [`Downstreams`], shared with its [`relay`]),
/// the socket is lent to the receiving thread each time this send has
/// caught up with the writer, and taken back when the downstream falls
/// behind or the relay stops.
///
/// Fails if `written`'s sender goes away before the image is complete.
pub async fn send_growing(
    source: FileSource,
    downstream: &mut TcpStream,
    written: watch::Receiver<Written>,
    direct: Option<&Arc<Downstreams>>,
    progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    send_following(source, downstream, written, direct, progress).await
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
    mut progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
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
        let sent = if h.kind == RecordKind::Data {
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
        digest: None,
    })
}

async fn send(
    mut source: Box<dyn ImageSource>,
    downstream: &mut TcpStream,
    hasher: Option<ImageHasher>,
    mut progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    if let Some(h) = &hasher {
        if h.position() != source.position() {
            return Err(Error::OutOfOrder {
                expected: h.position(),
                got: source.position(),
            });
        }
    }
    // A second handle on the source file for sendfile in this task.
    let sendfile_from = match source.as_file_source() {
        Some(fs) => Some(
            fs.file()
                .try_clone()
                .map_err(|e| Error::io("duplicating the source file handle", e))?,
        ),
        None => None,
    };
    // Records travel with their payload buffer, or without one (sendfile).
    let (full_tx, mut full_rx) = mpsc::channel::<(RecordHeader, Option<Buf>)>(DEPTH);
    let (free_tx, free_rx) = std_mpsc::channel::<Buf>();
    let (done_tx, done_rx) = oneshot::channel();
    let zero_copy = sendfile_from.is_some();
    if !zero_copy {
        for _ in 0..DEPTH {
            free_tx.send(Buf::new()).expect("receiver alive");
        }
    }
    std::thread::Builder::new()
        .name("ka-reader".into())
        .spawn(move || {
            let mut hasher = hasher;
            let result = if zero_copy {
                read_extents(source.as_mut(), &mut hasher, &full_tx)
            } else {
                read_records(source.as_mut(), &mut hasher, &full_tx, &free_rx)
            };
            let _ = done_tx.send((source, result));
        })
        .map_err(|e| Error::io("starting the reader thread", e))?;

    let mut size = None;
    while let Some((h, buf)) = full_rx.recv().await {
        let sent = match (buf, &sendfile_from) {
            (Some(mut buf), _) => {
                let len = if h.kind == RecordKind::Data {
                    h.len as usize
                } else {
                    0
                };
                let r = downstream.write_all(buf.record(&h, len)).await;
                let _ = free_tx.send(buf);
                r
            }
            (None, Some(file)) if h.kind == RecordKind::Data => {
                // MSG_MORE: the header waits for its payload in one segment.
                match send_more(downstream, &h.encode(), true).await {
                    Ok(()) => sendfile_all(downstream, file, h.offset, h.len).await,
                    Err(e) => Err(e),
                }
            }
            (None, _) => send_more(downstream, &h.encode(), false).await,
        };
        sent.map_err(|e| Error::io(format!("sending at offset {}", h.offset), e))?;
        progress(h.end());
        if h.kind == RecordKind::End {
            size = Some(h.offset);
        }
    }
    downstream
        .flush()
        .await
        .map_err(|e| Error::io("flushing the data connection", e))?;
    let (source, result) = done_rx
        .await
        .map_err(|_| Error::WriterFailed("reader thread died".into()))?;
    let digest = result?;
    let size = size.unwrap_or(source.position());
    Ok(SendEnd {
        source,
        size,
        digest,
    })
}

type RecordTx = mpsc::Sender<(RecordHeader, Option<Buf>)>;

/// Reader loop for any source: records with their payload in pooled buffers.
fn read_records(
    source: &mut dyn ImageSource,
    hasher: &mut Option<ImageHasher>,
    full_tx: &RecordTx,
    free_rx: &std_mpsc::Receiver<Buf>,
) -> Result<Option<Digest>, Error> {
    let mut digest = None;
    while let Ok(mut buf) = free_rx.recv() {
        let Some(h) = source.next_record(buf.payload_mut())? else {
            break;
        };
        if let Some(hs) = hasher.as_mut() {
            let len = if h.kind == RecordKind::Data {
                h.len as usize
            } else {
                0
            };
            digest = hs.record(&h, buf.payload(len))?;
        }
        if full_tx.blocking_send((h, Some(buf))).is_err() || h.kind == RecordKind::End {
            break;
        }
    }
    Ok(digest)
}

/// Reader loop for a file source sent with sendfile: headers only; payloads
/// are read into memory only to hash them.
fn read_extents(
    source: &mut dyn ImageSource,
    hasher: &mut Option<ImageHasher>,
    full_tx: &RecordTx,
) -> Result<Option<Digest>, Error> {
    let fs = source.as_file_source().expect("checked by send");
    let mut hash_buf = if hasher.is_some() {
        vec![0u8; BUF_SIZE]
    } else {
        Vec::new()
    };
    let mut digest = None;
    while let Some(h) = fs.next_extent(BUF_SIZE)? {
        if let Some(hs) = hasher.as_mut() {
            let len = if h.kind == RecordKind::Data {
                h.len as usize
            } else {
                0
            };
            fs.read_at(&mut hash_buf[..len], h.offset)?;
            digest = hs.record(&h, &hash_buf[..len])?;
        }
        if full_tx.blocking_send((h, None)).is_err() || h.kind == RecordKind::End {
            break;
        }
    }
    Ok(digest)
}

/// Writes all of `bytes` to the socket, with `MSG_MORE` if more follows.
async fn send_more(s: &TcpStream, bytes: &[u8], more: bool) -> std::io::Result<()> {
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

/// Sends `len` bytes of `file` at `offset` with `sendfile(2)`.
async fn sendfile_all(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::digest::{digest_source, SessionKey};
    use crate::image::sinks::{open_sink, SinkSpec};
    use crate::image::sources::{open_source, FileSource, SourceSpec};
    use crate::image::BLOCK;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const KEY: SessionKey = SessionKey([9; 32]);
    const B: usize = BLOCK as usize;
    /// Every network test finishes well within this or fails.
    const DEADLINE: Duration = Duration::from_secs(60);

    /// The session digest of a whole image file, computed apart from any relay.
    fn file_digest(path: &std::path::Path) -> Digest {
        let mut whole = open_source(&SourceSpec::File(path.to_path_buf())).unwrap();
        digest_source(
            whole.as_mut(),
            ImageHasher::new(&KEY),
            &mut vec![0; BUF_SIZE],
        )
        .unwrap()
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A 20 MiB image with random data, zero blocks inside data, holes and an odd tail.
    fn image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut img = vec![0u8; 320 * B + 4097];
        let mut x = 0x9e3779b97f4a7c15u64;
        for (i, chunk) in img.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let zero_block = (i * 8 / B) % 7 == 3 || (100..150).contains(&(i * 8 / B));
            if !zero_block {
                for (j, c) in chunk.iter_mut().enumerate() {
                    *c = (x >> (8 * j)) as u8;
                }
            }
        }
        let path = dir.join("image");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(img.len() as u64).unwrap();
        for (i, block) in img.chunks(B).enumerate() {
            if i % 5 != 0 || block.iter().any(|&b| b != 0) {
                // Leave some zero blocks as holes, write others as zeros.
                f.write_all_at(block, (i * B) as u64).unwrap();
            }
        }
        (path, img)
    }

    /// A node: receives from `up` into a file at `out`, publishing how far
    /// it has written on `written` (as the shell does for its servers).
    async fn node(
        up: TcpStream,
        out: std::path::PathBuf,
        size: Option<u64>,
        written: watch::Sender<Written>,
        direct: Option<Arc<Downstreams>>,
    ) -> (RelayEnd, Box<dyn ImageSink>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let sink = open_sink(&SinkSpec::File(out), size).unwrap();
        let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
        let last = Arc::new(AtomicU64::new(0));
        let (seen, publish) = (last.clone(), written.clone());
        let end = relay(
            &up,
            &[],
            &mut w,
            direct.as_ref(),
            move |RelayEvent::Written(o)| {
                assert!(o > seen.load(Ordering::Relaxed), "progress must grow");
                seen.store(o, Ordering::Relaxed);
                publish.send_modify(|w| w.upto = o);
            },
        )
        .await
        .unwrap();
        assert_eq!(
            last.load(Ordering::Relaxed),
            end.size,
            "last progress is the image end"
        );
        written.send_replace(Written {
            upto: end.size,
            size: Some(end.size),
        });
        (end, w.into_parts().await.unwrap().0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chain_of_two_nodes_copies_and_digests_agree() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let (mut src_out, n1_in) = pair().await;
            let (mut n1_out, n2_in) = pair().await;
            let out1 = dir.path().join("n1");
            let out2 = dir.path().join("n2");

            let source = open_source(&SourceSpec::File(path.clone())).unwrap();
            let size = source.size();
            let sender = tokio::spawn(async move {
                send_image(source, &mut src_out, Some(ImageHasher::new(&KEY)), |_| {})
                    .await
                    .unwrap()
            });
            // Node 1 writes, and serves node 2 from its file as it grows.
            let (tx1, rx1) = watch::channel(Written::default());
            let node1 = tokio::spawn(node(n1_in, out1.clone(), size, tx1, None));
            let o1 = out1.clone();
            let forward = tokio::spawn(async move {
                // Node 1's file exists only once it has written something.
                let mut rx1 = rx1;
                while rx1.borrow_and_update().upto == 0 {
                    rx1.changed().await.unwrap();
                }
                let src = FileSource::open_sized(&o1, None).unwrap();
                send_growing(src, &mut n1_out, rx1, None, |_| {})
                    .await
                    .unwrap()
            });
            let (tx2, _rx2) = watch::channel(Written::default());
            let node2 = tokio::spawn(node(n2_in, out2.clone(), size, tx2, None));
            let sent = sender.await.unwrap();
            let (end1, sink1) = node1.await.unwrap();
            let forwarded = forward.await.unwrap();
            let (end2, _) = node2.await.unwrap();
            assert_eq!(forwarded.size, img.len() as u64);
            assert!(
                std::fs::read(&out1).unwrap() == img,
                "node 1 content differs"
            );
            assert!(
                std::fs::read(&out2).unwrap() == img,
                "node 2 content differs"
            );
            assert_eq!(sent.size, img.len() as u64);
            assert_eq!(Some(end1.digest), sent.digest);
            assert_eq!(end2.digest, end1.digest);
            let mut rb = sink1.readback().unwrap();
            let d =
                digest_source(rb.as_mut(), ImageHasher::new(&KEY), &mut vec![0; BUF_SIZE]).unwrap();
            assert_eq!(d, end1.digest, "read-back digest differs");
        })
        .await
        .expect("test timed out");
    }

    /// Sends the image at `path` over `out` as a slow upstream would:
    /// records of at most `piece` bytes (one block at least), `gap` apart. With `hold`, it stops
    /// before that offset until the signal comes (or its sender is dropped).
    async fn trickle(
        mut out: TcpStream,
        path: std::path::PathBuf,
        piece: usize,
        gap: Duration,
        mut hold: Option<(u64, oneshot::Receiver<()>)>,
    ) {
        let mut src = FileSource::open_sized(&path, None).unwrap();
        let mut buf = vec![0u8; piece.max(B)];
        while let Some(h) = src.next_extent(piece).unwrap() {
            if hold.as_ref().is_some_and(|(at, _)| h.offset >= *at) {
                let (_, go) = hold.take().unwrap();
                let _ = go.await;
            }
            out.write_all(&h.encode()).await.unwrap();
            match h.kind {
                RecordKind::Data => {
                    let payload = &mut buf[..h.len as usize];
                    src.read_at(payload, h.offset).unwrap();
                    out.write_all(payload).await.unwrap();
                }
                RecordKind::Zero => {}
                RecordKind::End => break,
            }
            tokio::time::sleep(gap).await;
        }
    }

    type NodeTask = tokio::task::JoinHandle<(RelayEnd, Box<dyn ImageSink>)>;

    /// A node that forwards directly (through `direct`), fed the test image
    /// by a slow upstream: records of `record` bytes `gap` apart, stopping
    /// before an offset until told with `hold` (see [`trickle`]).
    struct FedNode {
        dir: tempfile::TempDir,
        path: std::path::PathBuf,
        img: Vec<u8>,
        direct: Arc<Downstreams>,
        out: std::path::PathBuf,
        written: watch::Receiver<Written>,
        upstream: tokio::task::JoinHandle<()>,
        node: NodeTask,
    }

    async fn fed_node(
        record: usize,
        gap: Duration,
        hold: Option<(u64, oneshot::Receiver<()>)>,
    ) -> FedNode {
        let dir = tempfile::tempdir().unwrap();
        let (path, img) = image(dir.path());
        let (up_out, up_in) = pair().await;
        let upstream = tokio::spawn(trickle(up_out, path.clone(), record, gap, hold));
        let direct = Arc::new(Downstreams::default());
        let out = dir.path().join("fed");
        let (tx, written) = watch::channel(Written::default());
        let size = Some(img.len() as u64);
        let node = tokio::spawn(node(up_in, out.clone(), size, tx, Some(direct.clone())));
        FedNode {
            dir,
            path,
            img,
            direct,
            out,
            written,
            upstream,
            node,
        }
    }

    impl FedNode {
        /// Serves the node's file to `down` as it grows, lending the socket
        /// to the node's receiving thread while it keeps up.
        fn serve(&self, mut down: TcpStream) -> tokio::task::JoinHandle<SendEnd> {
            let (out, direct) = (self.out.clone(), self.direct.clone());
            let mut written = self.written.clone();
            tokio::spawn(async move {
                // The file exists once the node has written something.
                while written.borrow_and_update().upto == 0 {
                    written.changed().await.unwrap();
                }
                let src = FileSource::open_sized(&out, None).unwrap();
                send_growing(src, &mut down, written, Some(&direct), |_| {})
                    .await
                    .unwrap()
            })
        }

        /// A plain node downstream, receiving from `up` into file `name`.
        fn downstream(&self, up: TcpStream, name: &str) -> (std::path::PathBuf, NodeTask) {
            let out = self.dir.path().join(name);
            let (tx, _) = watch::channel(Written::default());
            let size = Some(self.img.len() as u64);
            (out.clone(), tokio::spawn(node(up, out, size, tx, None)))
        }

        /// Serves `count` plain downstreams from the node to the end of the
        /// image, checks that each holds the image with the node's digest,
        /// and returns what went straight from the receiving thread.
        async fn feed_to_the_end(self, count: usize) -> crate::datapath::forward::DirectStats {
            let mut downstreams = Vec::new();
            for i in 0..count {
                let (out, up) = pair().await;
                let serve = self.serve(out);
                let (copy, node) = self.downstream(up, &format!("d{i}"));
                downstreams.push((serve, copy, node));
            }
            self.upstream.await.unwrap();
            let (end, _) = self.node.await.unwrap();
            for (serve, copy, node) in downstreams {
                serve.await.unwrap();
                let (copy_end, _) = node.await.unwrap();
                assert!(
                    std::fs::read(&copy).unwrap() == self.img,
                    "{} differs",
                    copy.display()
                );
                assert_eq!(copy_end.digest, end.digest);
            }
            self.direct.stats()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_forwards_directly_while_its_downstream_keeps_up_and_from_disk_when_it_falls_behind(
    ) {
        use nix::sys::socket::{setsockopt, sockopt};
        tokio::time::timeout(DEADLINE, async {
            // About 16 MB/s: the downstream catches up after each stall.
            let fed = fed_node(64 << 10, Duration::from_millis(4), None).await;
            let (n1_out, mut proxy_in) = pair().await;
            let (mut proxy_out, n2_in) = pair().await;
            // Small socket buffers: once the downstream stalls, a piece no
            // longer fits and the node must hand the socket back mid-record.
            setsockopt(&n1_out, sockopt::SndBuf, &(128 << 10)).unwrap();
            setsockopt(&proxy_in, sockopt::RcvBuf, &(64 << 10)).unwrap();
            let serve = fed.serve(n1_out);
            // The downstream stalls for 100 ms after every 4 MiB.
            let proxy = tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                let (mut total, mut stall_at) = (0usize, 4 << 20);
                loop {
                    let n = proxy_in.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    proxy_out.write_all(&buf[..n]).await.unwrap();
                    total += n;
                    if total >= stall_at {
                        stall_at += 4 << 20;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
            let (out2, node2) = fed.downstream(n2_in, "n2");
            fed.upstream.await.unwrap();
            let (end1, _) = fed.node.await.unwrap();
            let served = serve.await.unwrap();
            let (end2, _) = node2.await.unwrap();
            proxy.await.unwrap();
            let img = &fed.img;
            assert_eq!(served.size, img.len() as u64);
            assert!(
                std::fs::read(&out2).unwrap() == *img,
                "node 2 content differs"
            );
            assert_eq!(end2.digest, end1.digest);
            assert_eq!(end1.digest, file_digest(&fed.path));
            let stats = fed.direct.stats();
            assert!(
                stats.bytes > img.len() as u64 / 4,
                "a quarter of the image or more went straight from the receiving thread: {stats:?}"
            );
            assert!(
                stats.fell_behind >= 1,
                "the stalls handed the socket back: {stats:?}"
            );
            assert!(
                stats.split_records >= 1,
                "a record was cut short and finished from the file: {stats:?}"
            );
            assert_eq!(fed.direct.lent(), 0, "every socket came back");
        })
        .await
        .expect("test timed out");
    }

    /// Each hop adds a piece's length in time (a piece is stored in full
    /// before it is forwarded), so on a slow link a piece goes on once it
    /// holds about a millisecond of the link, not only at its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_link_forwards_a_piece_once_it_holds_a_millisecond() {
        tokio::time::timeout(DEADLINE, async {
            // A 20 KiB record about every millisecond (or 4 KiB, to end a
            // 64 KiB block): a millisecond's worth is one record or two,
            // while a 2 ms deadline (rounded up, plus the wakeup) gathers
            // about three. Measured: 33 KB per piece, 55 KB with the
            // deadline alone.
            let fed = fed_node(20 << 10, Duration::from_millis(1), None).await;
            let image_len = fed.img.len() as u64;
            let stats = fed.feed_to_the_end(1).await;
            assert!(
                stats.bytes > image_len / 2,
                "most of the image went straight from the receiving thread: {stats:?}"
            );
            let per_piece = stats.bytes / stats.records;
            assert!(
                per_piece < 44 << 10,
                "pieces are forwarded at about a millisecond's worth, \
                 not a deadline's: {per_piece} bytes per piece, {stats:?}"
            );
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_with_two_downstreams_feeds_both_directly() {
        tokio::time::timeout(DEADLINE, async {
            let fed = fed_node(64 << 10, Duration::from_millis(4), None).await;
            let (image_len, direct) = (fed.img.len() as u64, fed.direct.clone());
            let stats = fed.feed_to_the_end(2).await;
            // The image holds about 15 MB of data (the rest is zeros): more
            // than its whole length sent directly means both were fed.
            assert!(
                stats.bytes > image_len,
                "both downstreams were fed straight from the receiving thread: {stats:?}"
            );
            assert_eq!(direct.lent(), 0, "every socket came back");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_socket_is_closed_when_its_serving_task_is_dropped() {
        tokio::time::timeout(DEADLINE, async {
            // The upstream pauses at 8 MiB until the end of the test, so
            // the image cannot end (and the thread return its sockets)
            // before the dropped server's connection must be closed.
            let (go, hold) = oneshot::channel();
            let fed = fed_node(64 << 10, Duration::from_millis(1), Some((8 << 20, hold))).await;
            let (n1_out, mut down) = pair().await;
            let serve = fed.serve(n1_out);
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < 2 << 20 || fed.direct.lent() == 0 {
                let n = down.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended early");
                got += n;
            }
            serve.abort();
            assert!(serve.await.unwrap_err().is_cancelled());
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match down.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "the downstream connection stays open after its server was dropped"
            );
            assert_eq!(fed.direct.lent(), 0);
            // The node itself carries on to the end.
            go.send(()).unwrap();
            fed.upstream.await.unwrap();
            let (end1, _) = fed.node.await.unwrap();
            assert!(std::fs::read(&fed.out).unwrap() == fed.img);
            assert_eq!(end1.digest, file_digest(&fed.path));
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sendfile_and_buffered_sends_give_identical_output() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let size = Some(img.len() as u64);
            let mut results = Vec::new();
            // A file goes out by sendfile(2), a stream (the same bytes
            // through `cat`) from pooled buffers.
            let specs = [
                SourceSpec::File(path.clone()),
                SourceSpec::Command(format!("cat {}", path.display())),
            ];
            for (i, spec) in specs.iter().enumerate() {
                let source = open_source(spec).unwrap();
                assert_eq!(source.as_ref().size().is_some(), i == 0);
                let (mut up, down) = pair().await;
                let sender = tokio::spawn(async move {
                    send_image(source, &mut up, Some(ImageHasher::new(&KEY)), |_| {})
                        .await
                        .unwrap()
                });
                let out = dir.path().join(format!("out{i}"));
                let (tx, _rx) = watch::channel(Written::default());
                let (end, _) = node(down, out.clone(), size, tx, None).await;
                let sent = sender.await.unwrap();
                assert_eq!(Some(end.digest), sent.digest);
                assert!(std::fs::read(&out).unwrap() == img, "copy {i} differs");
                results.push(end.digest);
            }
            assert_eq!(results[0], results[1]);
            assert_eq!(results[0], file_digest(&path));
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serving_a_growing_file_fails_if_its_writer_stops_early() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let (tx, rx) = watch::channel(Written {
                upto: 3 * BLOCK,
                size: None,
            });
            let (mut up, mut down) = pair().await;
            let src = FileSource::open_sized(&path, None).unwrap();
            let serve =
                tokio::spawn(async move { send_growing(src, &mut up, rx, None, |_| {}).await });
            // What is written arrives; then the writer goes away.
            let mut got = vec![0u8; 3 * B + RecordHeader::SIZE];
            down.read_exact(&mut got).await.unwrap();
            assert!(got[RecordHeader::SIZE..] == img[..3 * B]);
            drop(tx);
            let err = serve.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("stopped being written"), "{err}");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_resumes_from_a_new_upstream_after_a_cut() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let out = dir.path().join("node");
            let sink = open_sink(&SinkSpec::File(out.clone()), Some(img.len() as u64)).unwrap();
            let mut writer = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();

            // First upstream: sends a prefix of records, then is cut mid-record.
            let (mut up, down) = pair().await;
            let mut src = FileSource::open(&path).unwrap();
            let mut buf = vec![0u8; 4 * B];
            let mut sent = Vec::new();
            while sent.len() < 9 * B {
                let h = src.next_record(&mut buf).unwrap().unwrap();
                sent.extend_from_slice(&h.encode());
                if h.kind == RecordKind::Data {
                    sent.extend_from_slice(&buf[..h.len as usize]);
                }
            }
            // Cut inside the next data record.
            let cut_at = loop {
                let h = src.next_record(&mut buf).unwrap().unwrap();
                sent.extend_from_slice(&h.encode());
                if h.kind == RecordKind::Data {
                    sent.extend_from_slice(&buf[..100]);
                    break h.offset + 100;
                }
            };
            let cut = tokio::spawn(async move {
                up.write_all(&sent).await.unwrap();
                drop(up);
            });
            let err = relay(&down, &[], &mut writer, None, |_| {})
                .await
                .unwrap_err();
            cut.await.unwrap();
            assert!(matches!(err, Error::UpstreamClosed { .. }), "{err}");
            let resume_at = writer.position();
            assert_eq!(
                resume_at, cut_at,
                "every byte that came before the cut is kept"
            );

            // Second upstream: resumes from the node's position.
            let (mut up, down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path.clone())).unwrap();
            source.seek(resume_at).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            let end = relay(&down, &[], &mut writer, None, |_| {}).await.unwrap();
            sender.await.unwrap();
            assert!(std::fs::read(&out).unwrap() == img, "resumed copy differs");
            let want = file_digest(&path);
            assert_eq!(end.digest, want, "resumed digest differs");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarted_node_rehashes_what_it_has_and_fetches_only_the_rest() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let out = dir.path().join("node");
            let size = Some(img.len() as u64);
            // First life: receives 7 MiB, then the process "dies" (all state dropped).
            {
                let (mut up, down) = pair().await;
                let mut src = open_source(&SourceSpec::File(path.clone())).unwrap();
                src.set_limit(7 << 20);
                let sender = tokio::spawn(async move {
                    send_image(src, &mut up, None, |_| {}).await.unwrap();
                });
                let sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
                let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
                let err = relay(&down, &[], &mut w, None, |_| {}).await.unwrap_err();
                sender.await.unwrap();
                assert!(
                    matches!(err, Error::UpstreamClosed { at } if at == 7 << 20),
                    "{err}"
                );
            }
            // Second life: reopen, resume at what the disk holds, rehash it.
            let mut sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
            sink.resume(7 << 20).unwrap();
            let hasher = crate::image::digest::rehash_written(sink.as_ref(), &KEY).unwrap();
            assert_eq!(hasher.position(), 7 << 20);
            let mut w = NodeWriter::new(sink, hasher).unwrap();
            let (mut up, down) = pair().await;
            let mut src = open_source(&SourceSpec::File(path.clone())).unwrap();
            src.seek(7 << 20).unwrap();
            let sender =
                tokio::spawn(async move { send_image(src, &mut up, None, |_| {}).await.unwrap() });
            let end = relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(sent.size, img.len() as u64);
            assert!(std::fs::read(&out).unwrap() == img);
            let want = file_digest(&path);
            assert_eq!(end.digest, want);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_device_source_streams_by_sendfile_to_a_block_device_node() {
        use crate::image::blockdev::tests::LoopDev;
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (_, img) = image(dir.path());
            let src_dev = LoopDev::new(24 << 20);
            let dst_dev = LoopDev::new(32 << 20);
            std::fs::write(&dst_dev.path, vec![0x77u8; 32 << 20]).unwrap(); // old content
            let mut whole = vec![0u8; 24 << 20];
            whole[..img.len()].copy_from_slice(&img);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&src_dev.path)
                .unwrap()
                .write_all_at(&whole, 0)
                .unwrap();
            let source = open_source(&SourceSpec::File(src_dev.path.clone())).unwrap();
            assert_eq!(
                source.size(),
                Some(24 << 20),
                "a device source is the whole device"
            );
            let (mut up, down) = pair().await;
            let sender = tokio::spawn(async move {
                send_image(source, &mut up, Some(ImageHasher::new(&KEY)), |_| {})
                    .await
                    .unwrap()
            });
            let sink = open_sink(&SinkSpec::File(dst_dev.path.clone()), Some(24 << 20)).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let end = relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(Some(end.digest), sent.digest);
            let (sink, _) = w.into_parts().await.unwrap();
            crate::image::digest::verify_readback(sink.as_ref(), &KEY, &end.digest).unwrap();
            drop(sink);
            let mut got = vec![0u8; 24 << 20];
            std::fs::File::open(&dst_dev.path)
                .unwrap()
                .read_exact_at(&mut got, 0)
                .unwrap();
            assert!(got == whole, "target device differs");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_serves_a_late_downstream_from_its_own_disk() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let size = Some(img.len() as u64);
            // Node A has 9 MiB of the image so far (its upstream is slow).
            let out_a = dir.path().join("a");
            let mut sink_a = open_sink(&SinkSpec::File(out_a), size).unwrap();
            let mut src = FileSource::open(&path).unwrap();
            let mut buf = vec![0u8; BUF_SIZE];
            while sink_a.position() < 9 << 20 {
                let h = src.next_record(&mut buf).unwrap().unwrap();
                match h.kind {
                    RecordKind::Data => {
                        sink_a.write_data(h.offset, &buf[..h.len as usize]).unwrap()
                    }
                    RecordKind::Zero => sink_a.write_zero(h.offset, h.len).unwrap(),
                    RecordKind::End => unreachable!(),
                }
            }
            let have = sink_a.position();
            // Node B joined late with 2 MiB; A serves it from disk up to what A has.
            let out_b = dir.path().join("b");
            let mut sink_b = open_sink(&SinkSpec::File(out_b.clone()), size).unwrap();
            let head = img[..2 << 20].to_vec();
            sink_b.write_data(0, &head).unwrap();
            let hasher_b = crate::image::digest::rehash_written(sink_b.as_ref(), &KEY).unwrap();
            let mut w_b = NodeWriter::new(sink_b, hasher_b).unwrap();
            let (mut up, down) = pair().await;
            let mut from_disk = sink_a.readback().unwrap();
            from_disk.seek(w_b.position()).unwrap();
            let serve =
                tokio::spawn(
                    async move { send_image(from_disk, &mut up, None, |_| {}).await.unwrap() },
                );
            let err = relay(&down, &[], &mut w_b, None, |_| {}).await.unwrap_err();
            let served = serve.await.unwrap();
            assert_eq!(served.size, have, "served exactly what A had written");
            assert!(
                matches!(err, Error::UpstreamClosed { at } if at == have),
                "{err}"
            );
            // The rest comes from the source, live.
            let (mut up, down) = pair().await;
            let mut rest = open_source(&SourceSpec::File(path.clone())).unwrap();
            rest.seek(have).unwrap();
            let sender =
                tokio::spawn(async move { send_image(rest, &mut up, None, |_| {}).await.unwrap() });
            let end = relay(&down, &[], &mut w_b, None, |_| {}).await.unwrap();
            sender.await.unwrap();
            assert!(std::fs::read(&out_b).unwrap() == img);
            let want = file_digest(&path);
            assert_eq!(end.digest, want);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_cancelled_mid_record_many_times_still_completes() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let out = dir.path().join("node");
            let sink = open_sink(&SinkSpec::File(out.clone()), Some(img.len() as u64)).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            // More cancellations than there are buffers: a lost buffer must
            // not leave the writer waiting forever.
            for _ in 0..2 * DEPTH {
                let (mut up, down) = pair().await;
                let at = w.position();
                let h = RecordHeader {
                    kind: RecordKind::Data,
                    offset: at,
                    len: BLOCK,
                };
                let mut bytes = h.encode().to_vec();
                bytes.extend_from_slice(&img[at as usize..at as usize + B / 2]);
                up.write_all(&bytes).await.unwrap(); // half a record, then silence
                let cut = tokio::time::timeout(
                    Duration::from_millis(50),
                    relay(&down, &[], &mut w, None, |_| {}),
                )
                .await;
                assert!(
                    cut.is_err(),
                    "relay should still be waiting for the rest of the record"
                );
                let half = at + B as u64 / 2;
                assert_eq!(w.position(), half, "the half that came is kept");
            }
            let (mut up, down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path)).unwrap();
            source.seek(w.position()).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
            sender.await.unwrap();
            assert!(std::fs::read(&out).unwrap() == img);
        })
        .await
        .expect("test timed out: a cancelled relay leaked the writer's buffers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_of_an_unfinished_record_are_written_and_published_while_the_upstream_is_quiet() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("node");
            let sink = open_sink(&SinkSpec::File(out.clone()), None).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let (mut up, down) = pair().await;
            let (tx, mut rx) = watch::channel(Written::default());
            // Half a record, then silence: a slow link's upstream between
            // packets. What came must reach the disk, and the watch a
            // downstream server follows, without waiting for the rest.
            let h = RecordHeader {
                kind: RecordKind::Data,
                offset: 0,
                len: 4 * BLOCK,
            };
            let half = vec![5u8; 2 * B + 100];
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&half);
            up.write_all(&bytes).await.unwrap();
            let relay = relay(&down, &[], &mut w, None, move |RelayEvent::Written(o)| {
                tx.send_modify(|w| w.upto = o);
            });
            let sent_at = std::time::Instant::now();
            let watch_half = async {
                while rx.borrow_and_update().upto < half.len() as u64 {
                    rx.changed().await.unwrap();
                }
                sent_at.elapsed()
            };
            let waited = tokio::select! {
                _ = relay => panic!("the record is not finished; the relay cannot end"),
                waited = watch_half => waited,
            };
            assert!(
                waited < Duration::from_secs(1),
                "published after {waited:?}, not within a few forward delays"
            );
            assert_eq!(w.position(), half.len() as u64);
            drop(up);
            assert!(std::fs::read(&out).unwrap()[..half.len()] == half[..]);
        })
        .await
        .expect("test timed out: received bytes were held back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_dropped_while_its_upstream_never_pauses_stops_at_once() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            // A sink slower than loopback: the socket stays full.
            let slow = format!(
                "dd bs=512 of={} status=none",
                dir.path().join("node").display()
            );
            let sink = open_sink(&SinkSpec::Command(slow), None).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let (up, down) = pair().await;
            // Records without end, from a thread of its own (the runtime's
            // workers may block in the relay's drop): the receiving thread
            // always finds more to read and never waits on the socket,
            // where the stop signal is.
            let up = up.into_std().unwrap();
            up.set_nonblocking(false).unwrap();
            let flood = std::thread::spawn(move || {
                use std::io::Write;
                let chunk = vec![7u8; B];
                for i in 0.. {
                    let h = RecordHeader {
                        kind: RecordKind::Data,
                        offset: i * BLOCK,
                        len: BLOCK,
                    };
                    let sent = (&up)
                        .write_all(&h.encode())
                        .and_then(|()| (&up).write_all(&chunk));
                    if sent.is_err() {
                        break;
                    }
                }
            });
            let started = std::time::Instant::now();
            let cut = tokio::time::timeout(
                Duration::from_millis(300),
                relay(&down, &[], &mut w, None, |_| {}),
            )
            .await;
            assert!(cut.is_err(), "the stream has no end: {cut:?}");
            // The drop (inside the timeout) stopped and joined the thread.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the dropped relay took {:?} to stop",
                started.elapsed()
            );
            // The writer is whole again.
            let at = w.position();
            assert!(at > 0, "bytes arrived before the drop");
            drop(down);
            flood.join().unwrap();
            let (sink, _) = w.into_parts().await.unwrap();
            assert_eq!(sink.position(), at, "everything received was written");
        })
        .await
        .expect("test timed out: a dropped relay kept its thread reading");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upstreams_that_stop_just_after_a_full_buffer_do_not_drain_the_pool() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("node");
            let sink = open_sink(&SinkSpec::File(out.clone()), None).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let whole = vec![3u8; BUF_SIZE];
            // Each upstream sends a record that fills a buffer exactly, the
            // header of the next, and closes: the receiving thread has just
            // taken a fresh buffer for the next record when the stream stops.
            // More such stops than the pool has buffers.
            for _ in 0..2 * DEPTH {
                let at = w.position();
                let (mut up, down) = pair().await;
                let mut bytes = Vec::new();
                for (offset, len) in [(at, BUF_SIZE as u64), (at + BUF_SIZE as u64, BLOCK)] {
                    let h = RecordHeader {
                        kind: RecordKind::Data,
                        offset,
                        len,
                    };
                    bytes.extend_from_slice(&h.encode());
                }
                let (first, second) = bytes.split_at(RecordHeader::SIZE);
                up.write_all(first).await.unwrap();
                up.write_all(&whole).await.unwrap();
                up.write_all(second).await.unwrap();
                drop(up);
                let err = relay(&down, &[], &mut w, None, |_| {}).await.unwrap_err();
                assert!(matches!(err, Error::UpstreamClosed { .. }), "{err}");
                assert_eq!(w.position(), at + BUF_SIZE as u64);
            }
            // And a whole image still goes through.
            let at = w.position();
            let (mut up, down) = pair().await;
            let h = RecordHeader {
                kind: RecordKind::Data,
                offset: at,
                len: BLOCK,
            };
            let end = RecordHeader {
                kind: RecordKind::End,
                offset: at + BLOCK,
                len: 0,
            };
            up.write_all(&h.encode()).await.unwrap();
            up.write_all(&whole[..B]).await.unwrap();
            up.write_all(&end.encode()).await.unwrap();
            let done = relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
            assert_eq!(done.size, at + BLOCK);
        })
        .await
        .expect("test timed out: the writer's buffers ran out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_header_is_refused_and_nothing_past_it_written() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("n");
            let sink = open_sink(&SinkSpec::File(out), Some(2 * BLOCK)).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let (mut up, down) = pair().await;
            let mut bytes = RecordHeader {
                kind: RecordKind::Data,
                offset: 0,
                len: BLOCK,
            }
            .encode()
            .to_vec();
            bytes.extend_from_slice(&[1u8; B]);
            let mut bad = RecordHeader {
                kind: RecordKind::Data,
                offset: BLOCK,
                len: 10,
            }
            .encode();
            bad[0] = 77;
            bytes.extend_from_slice(&bad);
            up.write_all(&bytes).await.unwrap();
            let err = relay(&down, &[], &mut w, None, |_| {}).await.unwrap_err();
            assert!(
                matches!(err, Error::Record { at, .. } if at == BLOCK),
                "{err}"
            );
            assert_eq!(w.position(), BLOCK);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn command_source_to_command_sink_through_a_node() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let (mut up, down) = pair().await;
            let src = dir.path().join("src");
            let source = open_source(&SourceSpec::Command(format!(
                "head -c 3000000 /dev/urandom > {0}; head -c 1000000 /dev/zero >> {0}; cat {0}",
                src.display()
            )))
            .unwrap();
            let sender = tokio::spawn(async move {
                send_image(source, &mut up, Some(ImageHasher::new(&KEY)), |_| {})
                    .await
                    .unwrap()
            });
            let sink =
                open_sink(&SinkSpec::Command(format!("cat > {}", out.display())), None).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let end = relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(end.size, 4_000_000);
            assert_eq!(Some(end.digest), sent.digest);
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
        })
        .await
        .expect("test timed out");
    }
}
