//! The fast path: moving records from a source to a socket, and from an
//! upstream socket into a node's sink.
//!
//! - On a node ([`relay`]), three stages hand owned buffers down a pipeline:
//!   the async task reads each record from the upstream socket into a pooled
//!   buffer, the [`NodeWriter`]'s writer thread writes it to the sink, and its
//!   hasher thread hashes it, then returns the buffer to the pool. A buffer
//!   is reused only once it is both written and hashed; the pool bounds the
//!   memory in flight whatever the image size. The three run in parallel, so
//!   the receiving task never stalls on hashing (nor on the disk), and on a
//!   machine with spare cores receiving, writing and hashing each get one.
//! - A node does not forward from its receive buffers: it serves each
//!   downstream from what it has written ([`send_growing`], following the
//!   writer's progress), with `sendfile(2)` from the page cache the writer
//!   just filled. The same path serves a late or resumed downstream from
//!   disk, so no memory buffer limits a slow downstream or a repair.
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

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::mpsc as std_mpsc;

use ka_core::record::{RecordHeader, RecordKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Duration, Instant};

use crate::digest::{ImageDigest, ImageHasher};
use crate::sink::ImageSink;
use crate::source::{FileSource, ImageSource};
use crate::Error;

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

/// The longest a received byte waits in a part-filled buffer before the node
/// writes it (and so forwards it). Each hop of a chain adds about this much
/// (plus the time to send what gathered meanwhile): 16 hops cost 32 ms. At
/// loopback speeds buffers fill long before it runs out.
pub const FORWARD_DELAY: Duration = Duration::from_millis(2);

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
    pub digest: ImageDigest,
}

enum Job {
    Data { offset: u64, buf: Buf, len: usize },
    Zero { offset: u64, len: u64 },
    End { size: u64 },
}

enum Reply {
    /// From the writer thread, once per job: how far the sink now reaches.
    Written {
        upto: u64,
        result: Result<(), Error>,
    },
    /// Once per job, when it has left the pipeline: its buffer, and the
    /// digest for `End`.
    Done {
        buf: Option<Buf>,
        result: Result<Option<ImageDigest>, Error>,
    },
}

/// A node's sink and running digest, each owned by a thread of its own (the
/// writer writes each record, then the hasher hashes it); it outlives any one
/// upstream connection: after a relay fails, the same writer is given to the
/// next [`relay`] (from the new upstream), resuming at
/// [`position`](Self::position).
pub struct NodeWriter {
    jobs: Option<std_mpsc::Sender<Job>>,
    replies: mpsc::UnboundedReceiver<Reply>,
    writer: Option<std::thread::JoinHandle<Box<dyn ImageSink>>>,
    hasher: Option<std::thread::JoinHandle<ImageHasher>>,
    /// The digest, once `End` has left the pipeline.
    end_digest: Option<ImageDigest>,
    free: Vec<Buf>,
    allocated: usize,
    /// Jobs submitted that have not left the pipeline.
    in_flight: usize,
    /// Offset of the next record the pipeline expects.
    queued: u64,
    /// Offset the sink has taken everything before.
    written: u64,
    failed: Option<String>,
}

impl std::fmt::Debug for NodeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWriter")
            .field("queued", &self.queued)
            .field("written", &self.written)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl NodeWriter {
    /// Starts the writer and hasher threads for `sink`, whose position must
    /// equal the hasher's: both start at 0 for a new image.
    pub fn new(sink: Box<dyn ImageSink>, hasher: ImageHasher) -> Result<Self, Error> {
        if sink.position() != hasher.position() {
            return Err(Error::OutOfOrder {
                expected: hasher.position(),
                got: sink.position(),
            });
        }
        let start = sink.position();
        let (jobs_tx, jobs_rx) = std_mpsc::channel();
        let (hash_tx, hash_rx) = std_mpsc::channel();
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        let replies2 = replies_tx.clone();
        let hasher = std::thread::Builder::new()
            .name("ka-hasher".into())
            .spawn(move || hasher_thread(hasher, hash_rx, replies2))
            .map_err(|e| Error::io("starting the hasher thread", e))?;
        let writer = std::thread::Builder::new()
            .name("ka-writer".into())
            .spawn(move || writer_thread(sink, jobs_rx, hash_tx, replies_tx))
            .map_err(|e| Error::io("starting the writer thread", e))?;
        Ok(NodeWriter {
            jobs: Some(jobs_tx),
            replies: replies_rx,
            writer: Some(writer),
            hasher: Some(hasher),
            end_digest: None,
            free: Vec::new(),
            allocated: 0,
            in_flight: 0,
            queued: start,
            written: start,
            failed: None,
        })
    }

    /// The offset the next record must start at: where a new upstream resumes.
    pub fn position(&self) -> u64 {
        self.queued
    }

    /// The offset the sink has taken everything before.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn check(&self) -> Result<(), Error> {
        match &self.failed {
            Some(msg) => Err(Error::WriterFailed(msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Result<(), Error> {
        self.failed.get_or_insert_with(|| e.to_string());
        Err(e)
    }

    fn handle(&mut self, reply: Reply, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        match reply {
            Reply::Written { upto, result } => {
                result.or_else(|e| self.fail(e))?;
                if upto > self.written {
                    self.written = upto;
                    events(RelayEvent::Written(upto));
                }
                Ok(())
            }
            Reply::Done { buf, result } => {
                self.in_flight -= 1;
                if let Some(buf) = buf {
                    self.free.push(buf);
                }
                match result {
                    Ok(digest) => {
                        self.end_digest = self.end_digest.or(digest);
                        Ok(())
                    }
                    Err(e) => self.fail(e),
                }
            }
        }
    }

    async fn next_reply(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        match self.replies.recv().await {
            Some(r) => self.handle(r, events),
            None => {
                self.failed
                    .get_or_insert_with(|| "the writer and hasher threads exited".into());
                self.check()
            }
        }
    }

    /// Handles replies already there, without waiting.
    fn poll_replies(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        while let Ok(r) = self.replies.try_recv() {
            self.handle(r, events)?;
        }
        Ok(())
    }

    /// A free buffer, waiting for the pipeline to return one if all are in use.
    async fn take_buf(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<Buf, Error> {
        loop {
            self.check()?;
            if let Some(b) = self.free.pop() {
                return Ok(b);
            }
            // With nothing in flight, every buffer not in `free` was lost
            // with a cancelled relay future: allocate again rather than wait
            // for a reply that will never come.
            if self.allocated < DEPTH || self.in_flight == 0 {
                self.allocated += 1;
                return Ok(Buf::new());
            }
            self.next_reply(events).await?;
        }
    }

    async fn submit(&mut self, job: Job, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        while self.in_flight >= MAX_QUEUED_JOBS {
            self.next_reply(events).await?;
        }
        self.check()?;
        // No await from here on: a cancelled relay leaves the pipeline and
        // `queued` agreeing on the position.
        let end = match &job {
            Job::Data { offset, len, .. } => offset + *len as u64,
            Job::Zero { offset, len } => offset + len,
            Job::End { size } => *size,
        };
        let jobs = self
            .jobs
            .as_ref()
            .expect("jobs channel open until into_parts");
        if jobs.send(job).is_err() {
            self.failed = Some("the writer thread exited".into());
            return self.check();
        }
        self.in_flight += 1;
        self.queued = end;
        Ok(())
    }

    /// Waits until everything submitted has left the pipeline.
    async fn settle(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        while self.in_flight > 0 {
            self.next_reply(events).await?;
        }
        Ok(())
    }

    /// Stops the threads and returns the sink (e.g. to read it back) and the
    /// hasher. Waits for queued work first.
    pub async fn into_parts(mut self) -> Result<(Box<dyn ImageSink>, ImageHasher), Error> {
        let _ = self.settle(&mut |_| {}).await;
        self.jobs = None; // closes the channel: the writer returns, then the hasher
        let writer = self
            .writer
            .take()
            .expect("threads present until into_parts");
        let hasher = self
            .hasher
            .take()
            .expect("threads present until into_parts");
        tokio::task::spawn_blocking(move || {
            let sink = writer.join();
            let hasher = hasher.join();
            match (sink, hasher) {
                (Ok(s), Ok(h)) => Ok((s, h)),
                _ => Err(Error::WriterFailed(
                    "the writer or hasher thread panicked".into(),
                )),
            }
        })
        .await
        .map_err(|e| Error::WriterFailed(e.to_string()))?
    }
}

fn writer_thread(
    mut sink: Box<dyn ImageSink>,
    jobs: std_mpsc::Receiver<Job>,
    to_hasher: std_mpsc::Sender<Job>,
    replies: mpsc::UnboundedSender<Reply>,
) -> Box<dyn ImageSink> {
    let mut failed = false;
    for job in jobs {
        if failed {
            // After a failure only return buffers; the receiver stops on
            // the first error.
            let buf = match job {
                Job::Data { buf, .. } => Some(buf),
                _ => None,
            };
            let result = Err(Error::WriterFailed("earlier error".into()));
            if replies.send(Reply::Done { buf, result }).is_err() {
                break;
            }
            continue;
        }
        let result = match &job {
            Job::Data { offset, buf, len } => sink.write_data(*offset, buf.payload(*len)),
            Job::Zero { offset, len } => sink.write_zero(*offset, *len),
            Job::End { size } => sink.finish(*size),
        };
        failed = result.is_err();
        let upto = sink.position();
        if replies.send(Reply::Written { upto, result }).is_err() {
            break;
        }
        let next = if failed {
            let buf = match job {
                Job::Data { buf, .. } => Some(buf),
                _ => None,
            };
            replies
                .send(Reply::Done {
                    buf,
                    result: Err(Error::WriterFailed("the write failed".into())),
                })
                .map_err(|_| ())
        } else {
            to_hasher.send(job).map_err(|_| ())
        };
        if next.is_err() {
            break;
        }
    }
    sink
}

/// Hashes what the writer has written, in order, and returns the buffers.
/// It runs after the writer rather than beside it so that each job has one
/// owner at a time, and the downstream (served from the written file) never
/// waits for the hash.
fn hasher_thread(
    mut hasher: ImageHasher,
    jobs: std_mpsc::Receiver<Job>,
    replies: mpsc::UnboundedSender<Reply>,
) -> ImageHasher {
    for job in jobs {
        let (buf, result) = match job {
            Job::Data { offset, buf, len } => {
                let r = hasher.data(offset, buf.payload(len)).map(|()| None);
                (Some(buf), r)
            }
            Job::Zero { offset, len } => (None, hasher.zero(offset, len).map(|()| None)),
            Job::End { size } => (None, hasher.clone().finish(size).map(Some)),
        };
        if replies.send(Reply::Done { buf, result }).is_err() {
            break;
        }
    }
    hasher
}

/// Receives records from `upstream` until `End`, writing and hashing them
/// through `writer`. Returns once the image is complete, flushed and hashed.
///
/// The upstream must start at `writer.position()`. `events` hears of
/// progress each time the sink has taken more. On an error (the upstream
/// closed or sent a bad record, or the sink failed) the writer has settled:
/// everything before `writer.position()` is written and hashed, and a new
/// relay may resume there.
///
/// Dropping the future (to relink) is safe for the writer, which keeps
/// everything it was given and resumes at `writer.position()`, but not for
/// the connection, which may be left mid-record: close it.
pub async fn relay<R>(
    upstream: &mut R,
    writer: &mut NodeWriter,
    mut events: impl FnMut(RelayEvent),
) -> Result<RelayEnd, Error>
where
    R: AsyncRead + Unpin,
{
    match relay_inner(upstream, writer, &mut events).await {
        Ok(end) => Ok(end),
        Err(e) => {
            // Let queued writes land, so position() is what the sink holds.
            let _ = writer.settle(&mut events).await;
            Err(e)
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

async fn relay_inner<R>(
    upstream: &mut R,
    writer: &mut NodeWriter,
    events: &mut impl FnMut(RelayEvent),
) -> Result<RelayEnd, Error>
where
    R: AsyncRead + Unpin,
{
    writer.check()?;
    loop {
        let at = writer.position();
        let mut hb = [0u8; RecordHeader::SIZE];
        let mut got = 0;
        while got < hb.len() {
            match read_some(upstream, &mut hb[got..], writer, events, None).await? {
                Some(Ok(0)) => return Err(Error::UpstreamClosed { at }),
                Some(Ok(n)) => got += n,
                Some(Err(e)) => return Err(read_error(e, at)),
                None => unreachable!("no deadline"),
            }
        }
        let h = RecordHeader::decode(&hb).map_err(|error| Error::Record { at, error })?;
        if h.offset != at {
            return Err(Error::OutOfOrder {
                expected: at,
                got: h.offset,
            });
        }
        match h.kind {
            RecordKind::Data => {
                let mut offset = h.offset;
                let mut left = h.len as usize;
                while left > 0 {
                    let mut buf = writer.take_buf(events).await?;
                    let want = left.min(BUF_SIZE);
                    let mut filled = 0;
                    // Bytes wait in a part-filled buffer at most FORWARD_DELAY
                    // before they go on (to the disk, and so to the
                    // downstream): on a slow link a node forwards small
                    // pieces instead of adding a whole buffer's time to every
                    // hop; on a fast one buffers fill first.
                    // One timer per buffer, armed by its first byte (not
                    // one per read: a slow link delivers a packet per read).
                    let mut forward_by = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
                    let mut armed = false;
                    let mut failure = None;
                    while filled < want {
                        let dst = &mut buf.payload_mut()[filled..want];
                        let deadline = armed.then_some(forward_by.as_mut());
                        match read_some(upstream, dst, writer, events, deadline).await {
                            Ok(Some(Ok(0))) => {
                                failure = Some(Error::UpstreamClosed {
                                    at: offset + filled as u64,
                                });
                                break;
                            }
                            Ok(Some(Ok(n))) => {
                                filled += n;
                                if !armed {
                                    armed = true;
                                    forward_by.as_mut().reset(Instant::now() + FORWARD_DELAY);
                                }
                            }
                            Ok(Some(Err(e))) => {
                                failure = Some(read_error(e, offset + filled as u64));
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                writer.free.push(buf);
                                return Err(e);
                            }
                        }
                    }
                    if filled == 0 {
                        writer.free.push(buf);
                    } else {
                        // What arrived before a failure is good: keep it, so
                        // a resume asks only for the rest.
                        let job = Job::Data {
                            offset,
                            buf,
                            len: filled,
                        };
                        writer.submit(job, events).await?;
                    }
                    if let Some(e) = failure {
                        return Err(e);
                    }
                    offset += filled as u64;
                    left -= filled;
                }
            }
            RecordKind::Zero => {
                let job = Job::Zero {
                    offset: h.offset,
                    len: h.len,
                };
                writer.submit(job, events).await?;
            }
            RecordKind::End => {
                writer.submit(Job::End { size: h.offset }, events).await?;
                writer.settle(events).await?;
                let digest = writer.end_digest.take().ok_or_else(|| {
                    Error::WriterFailed("the hasher finished without a digest".into())
                })?;
                return Ok(RelayEnd {
                    size: h.offset,
                    digest,
                });
            }
        }
        writer.poll_replies(events)?;
    }
}

/// One `read` from `upstream` into `dst`, handling the pipeline's replies
/// while it waits, so the sink's progress reaches the downstream (which is
/// served from the written file) while the upstream is quiet. `None` once
/// `deadline` has passed; the outer error is the pipeline's.
async fn read_some<R>(
    upstream: &mut R,
    dst: &mut [u8],
    writer: &mut NodeWriter,
    events: &mut impl FnMut(RelayEvent),
    mut deadline: Option<std::pin::Pin<&mut tokio::time::Sleep>>,
) -> Result<Option<std::io::Result<usize>>, Error>
where
    R: AsyncRead + Unpin,
{
    let mut read = std::pin::pin!(upstream.read(dst));
    loop {
        tokio::select! {
            biased;
            reply = writer.replies.recv() => match reply {
                Some(r) => writer.handle(r, events)?,
                None => {
                    writer
                        .failed
                        .get_or_insert_with(|| "the writer and hasher threads exited".into());
                    writer.check()?;
                }
            },
            r = &mut read => return Ok(Some(r)),
            () = sleep_or_never(&mut deadline) => return Ok(None),
        }
    }
}

async fn sleep_or_never(deadline: &mut Option<std::pin::Pin<&mut tokio::time::Sleep>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
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
    pub digest: Option<ImageDigest>,
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
    send(source, downstream, hasher, None, progress).await
}

/// Sends a file that is still being written (a node's target, a source's
/// spool) from the source's position to the image's `End`, following
/// `written`: records go out as soon as the writer has written them, and the
/// send waits for more at what is written so far, in one long-lived stream.
/// How a node forwards to its downstream, and how any server serves.
///
/// Fails if `written`'s sender goes away before the image is complete.
pub async fn send_growing(
    source: FileSource,
    downstream: &mut TcpStream,
    written: watch::Receiver<Written>,
    progress: impl FnMut(u64),
) -> Result<SendEnd, Error> {
    send(Box::new(source), downstream, None, Some(written), progress).await
}

async fn send(
    mut source: Box<dyn ImageSource>,
    downstream: &mut TcpStream,
    hasher: Option<ImageHasher>,
    follow: Option<watch::Receiver<Written>>,
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
                read_extents(source.as_mut(), &mut hasher, follow, &full_tx)
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
) -> Result<Option<ImageDigest>, Error> {
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
/// are read into memory only to hash them. With `follow`, the file is still
/// being written: the loop waits at what is written for more, to the end.
fn read_extents(
    source: &mut dyn ImageSource,
    hasher: &mut Option<ImageHasher>,
    mut follow: Option<watch::Receiver<Written>>,
    full_tx: &RecordTx,
) -> Result<Option<ImageDigest>, Error> {
    let fs = source.as_file_source().expect("checked by send");
    if let Some(w) = follow.as_mut() {
        let now = *w.borrow_and_update();
        fs.follow(now.upto, now.size)?;
    }
    let mut hash_buf = if hasher.is_some() {
        vec![0u8; BUF_SIZE]
    } else {
        Vec::new()
    };
    let mut digest = None;
    loop {
        let Some(h) = fs.next_extent(BUF_SIZE)? else {
            let more = match follow.as_mut() {
                Some(w) => wait_for_more(fs, w, full_tx)?,
                None => false,
            };
            if more {
                continue;
            }
            break;
        };
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

/// Waits until the file behind `fs` is written beyond what `fs` may read now,
/// and lets `fs` read on; false if the send was dropped meanwhile.
fn wait_for_more(
    fs: &mut FileSource,
    written: &mut watch::Receiver<Written>,
    full_tx: &RecordTx,
) -> Result<bool, Error> {
    use futures_lite::future;
    loop {
        let changed =
            future::block_on(future::or(async { Some(written.changed().await) }, async {
                full_tx.closed().await;
                None
            }));
        match changed {
            None => return Ok(false),
            Some(Err(_)) => {
                return Err(Error::Invalid(
                    "the image stopped being written before it was complete".into(),
                ))
            }
            Some(Ok(())) => {
                let now = *written.borrow_and_update();
                if fs.follow(now.upto, now.size)? {
                    return Ok(true);
                }
            }
        }
    }
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
    use crate::digest::{digest_source, SessionKey, BLOCK};
    use crate::sink::{open_sink, SinkSpec};
    use crate::source::{open_source, FileSource, SourceSpec};
    use std::os::unix::fs::FileExt;
    use std::time::Duration;
    use tokio::net::TcpListener;

    const KEY: SessionKey = SessionKey([9; 32]);
    const B: usize = BLOCK as usize;
    /// Every network test finishes well within this or fails.
    const DEADLINE: Duration = Duration::from_secs(60);

    /// The session digest of a whole image file, computed apart from any relay.
    fn file_digest(path: &std::path::Path) -> ImageDigest {
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
        mut up: TcpStream,
        out: std::path::PathBuf,
        size: Option<u64>,
        written: watch::Sender<Written>,
    ) -> (RelayEnd, Box<dyn ImageSink>) {
        let sink = open_sink(&SinkSpec::File(out), size).unwrap();
        let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
        let mut last = 0;
        let end = relay(&mut up, &mut w, |RelayEvent::Written(o)| {
            assert!(o > last, "progress must grow");
            last = o;
            written.send_modify(|w| w.upto = o);
        })
        .await
        .unwrap();
        assert_eq!(last, end.size, "last progress is the image end");
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
            let node1 = tokio::spawn(node(n1_in, out1.clone(), size, tx1));
            let o1 = out1.clone();
            let forward = tokio::spawn(async move {
                // Node 1's file exists only once it has written something.
                let mut rx1 = rx1;
                while rx1.borrow_and_update().upto == 0 {
                    rx1.changed().await.unwrap();
                }
                let src = FileSource::open_sized(&o1, None).unwrap();
                send_growing(src, &mut n1_out, rx1, |_| {}).await.unwrap()
            });
            let (tx2, _rx2) = watch::channel(Written::default());
            let node2 = tokio::spawn(node(n2_in, out2.clone(), size, tx2));
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
                let (end, _) = node(down, out.clone(), size, tx).await;
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
            let serve = tokio::spawn(async move { send_growing(src, &mut up, rx, |_| {}).await });
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
            let (mut up, mut down) = pair().await;
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
            let err = relay(&mut down, &mut writer, |_| {}).await.unwrap_err();
            cut.await.unwrap();
            assert!(matches!(err, Error::UpstreamClosed { .. }), "{err}");
            let resume_at = writer.position();
            assert_eq!(resume_at, writer.written());
            assert_eq!(
                resume_at, cut_at,
                "every byte that came before the cut is kept"
            );

            // Second upstream: resumes from the node's position.
            let (mut up, mut down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path.clone())).unwrap();
            source.seek(resume_at).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            let end = relay(&mut down, &mut writer, |_| {}).await.unwrap();
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
                let (mut up, mut down) = pair().await;
                let mut src = open_source(&SourceSpec::File(path.clone())).unwrap();
                src.set_limit(7 << 20);
                let sender = tokio::spawn(async move {
                    send_image(src, &mut up, None, |_| {}).await.unwrap();
                });
                let sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
                let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
                let err = relay(&mut down, &mut w, |_| {}).await.unwrap_err();
                sender.await.unwrap();
                assert!(
                    matches!(err, Error::UpstreamClosed { at } if at == 7 << 20),
                    "{err}"
                );
            }
            // Second life: reopen, resume at what the disk holds, rehash it.
            let mut sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
            sink.resume(7 << 20).unwrap();
            let hasher = crate::digest::rehash_written(sink.as_ref(), &KEY).unwrap();
            assert_eq!(hasher.position(), 7 << 20);
            let mut w = NodeWriter::new(sink, hasher).unwrap();
            let (mut up, mut down) = pair().await;
            let mut src = open_source(&SourceSpec::File(path.clone())).unwrap();
            src.seek(7 << 20).unwrap();
            let sender =
                tokio::spawn(async move { send_image(src, &mut up, None, |_| {}).await.unwrap() });
            let end = relay(&mut down, &mut w, |_| {}).await.unwrap();
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
        use crate::blockdev::tests::LoopDev;
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
            let (mut up, mut down) = pair().await;
            let sender = tokio::spawn(async move {
                send_image(source, &mut up, Some(ImageHasher::new(&KEY)), |_| {})
                    .await
                    .unwrap()
            });
            let sink = open_sink(&SinkSpec::File(dst_dev.path.clone()), Some(24 << 20)).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let end = relay(&mut down, &mut w, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(Some(end.digest), sent.digest);
            let (sink, _) = w.into_parts().await.unwrap();
            crate::digest::verify_readback(sink.as_ref(), &KEY, &end.digest).unwrap();
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
            let hasher_b = crate::digest::rehash_written(sink_b.as_ref(), &KEY).unwrap();
            let mut w_b = NodeWriter::new(sink_b, hasher_b).unwrap();
            let (mut up, mut down) = pair().await;
            let mut from_disk = sink_a.readback().unwrap();
            from_disk.seek(w_b.position()).unwrap();
            let serve =
                tokio::spawn(
                    async move { send_image(from_disk, &mut up, None, |_| {}).await.unwrap() },
                );
            let err = relay(&mut down, &mut w_b, |_| {}).await.unwrap_err();
            let served = serve.await.unwrap();
            assert_eq!(served.size, have, "served exactly what A had written");
            assert!(
                matches!(err, Error::UpstreamClosed { at } if at == have),
                "{err}"
            );
            // The rest comes from the source, live.
            let (mut up, mut down) = pair().await;
            let mut rest = open_source(&SourceSpec::File(path.clone())).unwrap();
            rest.seek(have).unwrap();
            let sender =
                tokio::spawn(async move { send_image(rest, &mut up, None, |_| {}).await.unwrap() });
            let end = relay(&mut down, &mut w_b, |_| {}).await.unwrap();
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
                let (mut up, mut down) = pair().await;
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
                    relay(&mut down, &mut w, |_| {}),
                )
                .await;
                assert!(
                    cut.is_err(),
                    "relay should still be waiting for the rest of the record"
                );
                let half = at + B as u64 / 2;
                assert_eq!(w.position(), half, "the half that came is kept");
            }
            let (mut up, mut down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path)).unwrap();
            source.seek(w.position()).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            relay(&mut down, &mut w, |_| {}).await.unwrap();
            sender.await.unwrap();
            assert!(std::fs::read(&out).unwrap() == img);
        })
        .await
        .expect("test timed out: a cancelled relay leaked the writer's buffers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_header_is_refused_and_nothing_past_it_written() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("n");
            let sink = open_sink(&SinkSpec::File(out), Some(2 * BLOCK)).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let (mut up, mut down) = pair().await;
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
            let err = relay(&mut down, &mut w, |_| {}).await.unwrap_err();
            assert!(
                matches!(err, Error::Record { at, .. } if at == BLOCK),
                "{err}"
            );
            assert_eq!(w.written(), BLOCK);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn command_source_to_command_sink_through_a_node() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let (mut up, mut down) = pair().await;
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
            let end = relay(&mut down, &mut w, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(end.size, 4_000_000);
            assert_eq!(Some(end.digest), sent.digest);
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
        })
        .await
        .expect("test timed out");
    }
}
