//! The fast path: moving records from a source to a socket, and from an
//! upstream socket to a node's sink and on to its downstream.
//!
//! Two threads per leg, handing owned buffers to each other through channels:
//!
//! - on a node, the async task reads a record from the upstream socket into a
//!   pooled buffer, hashes it, and hands it to the [`NodeWriter`] thread,
//!   which writes it to the sink, then returns the buffer. Receiving and
//!   hashing on one core, writing to the page cache on the other, run in
//!   parallel (a profile showed writing the costlier half), while a fixed
//!   pool bounds the memory in flight. The downstream gets each record once it is
//!   written, by `sendfile(2)` from the sink's page cache (file and block
//!   device sinks), or straight from the receive buffer (other sinks).
//! - on the source, a reader thread produces records from the
//!   [`ImageSource`] (and hashes them, for the published digest) while the
//!   async task writes them to the socket ([`send_image`]): by `sendfile(2)`
//!   for files and block devices, from pooled buffers for streams.
//!
//! Each buffer has a small headroom before its payload into which the 17-byte
//! record header is placed, so a record goes out with one `write` of header
//! and payload together; with `sendfile`, the header goes first with
//! `MSG_MORE` so it shares a segment with its payload.

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;

use std::os::fd::{AsRawFd, BorrowedFd};

use ka_core::record::{RecordHeader, RecordKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::digest::{ImageDigest, ImageHasher};
use crate::sink::ImageSink;
use crate::source::ImageSource;
use crate::Error;

/// Payload bytes per buffer: 1 MiB, a multiple of [`crate::BLOCK`]. Large
/// enough that per-buffer costs (a channel hop, a `write`, a hash call, a
/// `sendfile`) vanish against the copy; small enough that a buffer is hashed
/// while it is still in the shared L3 cache after being received. (256 KiB
/// measured no better on the development machine.)
pub const BUF_SIZE: usize = 1 << 20;

/// Buffers in flight per leg (being received, written or sent): enough to keep
/// both threads busy through jitter; bounds a leg's buffer memory to
/// `DEPTH × BUF_SIZE` = 8 MiB whatever the image size.
const DEPTH: usize = 8;

/// Bytes before the payload in every buffer; the record header is written
/// into the last [`RecordHeader::SIZE`] of them. 64 keeps the payload
/// cache-line aligned relative to the allocation.
const HEADROOM: usize = 64;

/// Zero records queued to the writer before the reader waits: they carry no
/// buffer, so this is what bounds the writer's queue for a sparse image.
const MAX_QUEUED_JOBS: usize = 4 * DEPTH;

fn new_buf() -> Vec<u8> {
    vec![0u8; HEADROOM + BUF_SIZE]
}

/// What the relay reports as it goes.
#[derive(Debug)]
pub enum RelayEvent {
    /// The sink has taken everything before this offset (written, not yet
    /// flushed to stable storage; [`ImageSink::finish`] does that).
    Written(u64),
    /// Writing to the downstream failed; the relay goes on receiving and
    /// writing without it, and the protocol may reconnect it at `at` or
    /// earlier.
    DownstreamLost {
        /// The offset of the first record not fully forwarded.
        at: u64,
        /// Why.
        error: std::io::Error,
    },
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
    Data {
        offset: u64,
        buf: Vec<u8>,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    End {
        size: u64,
    },
}

struct Reply {
    buf: Option<Vec<u8>>,
    written: u64,
    result: Result<(), Error>,
}

/// A node's sink, owned by a dedicated writer thread, and its running digest;
/// it outlives any one upstream connection: after a relay fails, the same writer
/// is given to the next [`relay`] (from the new upstream), resuming at
/// [`position`](Self::position).
pub struct NodeWriter {
    jobs: Option<std_mpsc::Sender<Job>>,
    replies: mpsc::UnboundedReceiver<Reply>,
    thread: Option<std::thread::JoinHandle<Box<dyn ImageSink>>>,
    /// The running digest of everything submitted: hashed on the receiving
    /// task, not the writer thread, because writing to the page cache is the
    /// costlier half (a profile put ~75 % of a node's CPU on a writer thread
    /// that also hashed); this balances the two threads.
    hasher: ImageHasher,
    /// The digest, once `End` was submitted.
    end_digest: Option<ImageDigest>,
    free: Vec<Vec<u8>>,
    allocated: usize,
    in_flight: usize,
    /// Offset of the next record the writer expects.
    queued: u64,
    /// Offset the sink has taken everything before.
    written: u64,
    failed: Option<String>,
    /// A read handle on a file sink, for forwarding with sendfile.
    forward_file: Option<std::sync::Arc<std::fs::File>>,
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
    /// Starts the writer thread for `sink`, whose position must equal the
    /// hasher's: both start at 0 for a new image.
    pub fn new(sink: Box<dyn ImageSink>, hasher: ImageHasher) -> Result<Self, Error> {
        if sink.position() != hasher.position() {
            return Err(Error::OutOfOrder {
                expected: hasher.position(),
                got: sink.position(),
            });
        }
        let start = sink.position();
        let forward_file = sink.forward_file().map(std::sync::Arc::new);
        let (jobs_tx, jobs_rx) = std_mpsc::channel();
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("ka-writer".into())
            .spawn(move || writer_thread(sink, jobs_rx, replies_tx))
            .map_err(|e| Error::io("starting the writer thread", e))?;
        Ok(NodeWriter {
            jobs: Some(jobs_tx),
            replies: replies_rx,
            thread: Some(thread),
            free: Vec::new(),
            allocated: 0,
            in_flight: 0,
            queued: start,
            written: start,
            failed: None,
            forward_file,
            hasher,
            end_digest: None,
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

    fn handle(&mut self, reply: Reply, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        self.in_flight -= 1;
        if let Some(buf) = reply.buf {
            self.free.push(buf);
        }
        match reply.result {
            Ok(()) => {
                if reply.written > self.written {
                    self.written = reply.written;
                    events(RelayEvent::Written(reply.written));
                }
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    async fn next_reply(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        match self.replies.recv().await {
            Some(r) => self.handle(r, events),
            None => {
                self.failed
                    .get_or_insert_with(|| "writer thread exited".into());
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

    /// A free buffer, waiting for the writer to return one if all are in use.
    async fn take_buf(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<Vec<u8>, Error> {
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
                return Ok(new_buf());
            }
            self.next_reply(events).await?;
        }
    }

    async fn submit(&mut self, job: Job, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        while self.in_flight >= MAX_QUEUED_JOBS {
            self.next_reply(events).await?;
        }
        self.check()?;
        // No await from here on: a cancelled relay leaves the hasher and the
        // writer agreeing on the position.
        let hashed = match &job {
            Job::Data { offset, buf, len } => {
                self.hasher.data(*offset, &buf[HEADROOM..HEADROOM + len])
            }
            Job::Zero { offset, len } => self.hasher.zero(*offset, *len),
            Job::End { size } => self.hasher.clone().finish(*size).map(|d| {
                self.end_digest = Some(d);
            }),
        };
        if let Err(e) = hashed {
            if let Job::Data { buf, .. } = job {
                self.free.push(buf);
            }
            return Err(e);
        }
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
            self.failed = Some("writer thread exited".into());
            return self.check();
        }
        self.in_flight += 1;
        self.queued = end;
        Ok(())
    }

    /// Waits until the writer has handled everything submitted.
    async fn settle(&mut self, events: &mut impl FnMut(RelayEvent)) -> Result<(), Error> {
        while self.in_flight > 0 {
            self.next_reply(events).await?;
        }
        Ok(())
    }

    /// Stops the writer thread and returns the sink (e.g. to read it back) and
    /// the hasher. Waits for queued writes first.
    pub async fn into_parts(mut self) -> Result<(Box<dyn ImageSink>, ImageHasher), Error> {
        let _ = self.settle(&mut |_| {}).await;
        self.jobs = None; // closes the channel: the thread returns
        let thread = self.thread.take().expect("thread present until into_parts");
        let sink = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| Error::WriterFailed(e.to_string()))?
            .map_err(|_| Error::WriterFailed("writer thread panicked".into()))?;
        Ok((sink, self.hasher))
    }
}

fn writer_thread(
    mut sink: Box<dyn ImageSink>,
    jobs: std_mpsc::Receiver<Job>,
    replies: mpsc::UnboundedSender<Reply>,
) -> Box<dyn ImageSink> {
    let mut failed = false;
    for job in jobs {
        let (buf, result) = if failed {
            // After a failure only return buffers; the reader stops on the first error.
            match job {
                Job::Data { buf, .. } => {
                    (Some(buf), Err(Error::WriterFailed("earlier error".into())))
                }
                _ => (None, Err(Error::WriterFailed("earlier error".into()))),
            }
        } else {
            match job {
                Job::Data { offset, buf, len } => {
                    let r = sink.write_data(offset, &buf[HEADROOM..HEADROOM + len]);
                    (Some(buf), r)
                }
                Job::Zero { offset, len } => (None, sink.write_zero(offset, len)),
                Job::End { size } => (None, sink.finish(size)),
            }
        };
        failed |= result.is_err();
        if replies
            .send(Reply {
                buf,
                written: sink.position(),
                result,
            })
            .is_err()
        {
            break;
        }
    }
    sink
}

/// Receives records from `upstream` until `End`, hashing them and writing them
/// through `writer`, and forwarding the same bytes to `downstream` if given.
/// Returns once the image is complete, flushed and hashed.
///
/// The upstream must start at `writer.position()`. `events` hears of progress
/// (each time the sink has taken more) and of a lost downstream, after which
/// the relay carries on without it. On an error (the upstream closed or sent a
/// bad record, or the sink failed) the writer has settled: everything before
/// `writer.position()` is written, and a new relay may resume there.
///
/// Dropping the future (to relink) is safe for the writer, which keeps
/// everything it was given and resumes at `writer.position()`, but not for
/// the connections: either may be left mid-record, so close both.
pub async fn relay<R>(
    upstream: &mut R,
    writer: &mut NodeWriter,
    downstream: Option<&mut TcpStream>,
    mut events: impl FnMut(RelayEvent),
) -> Result<RelayEnd, Error>
where
    R: AsyncRead + Unpin,
{
    let file = if downstream.is_some() {
        writer.forward_file.clone()
    } else {
        None
    };
    let mut fwd = Forwarder {
        ds: downstream,
        file,
        pending: VecDeque::new(),
    };
    let result = relay_inner(upstream, writer, &mut fwd, &mut events).await;
    match result {
        Ok(end) => Ok(end),
        Err(e) => {
            // Let queued writes land, so position() is what the sink holds.
            let _ = writer.settle(&mut events).await;
            Err(e)
        }
    }
}

/// A record (or piece of one) waiting to be forwarded from the sink's file.
struct Pending {
    /// The record header to send first, if this is a record's first piece.
    header: Option<[u8; RecordHeader::SIZE]>,
    /// Image bytes to send from the file after the header.
    data: Option<(u64, u64)>,
    /// Sendable once the sink has written everything before this offset.
    ready_at: u64,
    /// Offset of the record, for [`RelayEvent::DownstreamLost`].
    record: u64,
}

/// The forward leg. With a file sink, records are forwarded after they are
/// written, with `sendfile(2)` from the page cache the writer just filled (no
/// user-space copy, and the same path serves a downstream from disk); with
/// any other sink, straight from the receive buffer.
struct Forwarder<'a> {
    ds: Option<&'a mut TcpStream>,
    file: Option<std::sync::Arc<std::fs::File>>,
    pending: VecDeque<Pending>,
}

impl Forwarder<'_> {
    fn lost(&mut self, at: u64, error: std::io::Error, events: &mut impl FnMut(RelayEvent)) {
        self.ds = None;
        self.pending.clear();
        events(RelayEvent::DownstreamLost { at, error });
    }

    /// Forwards bytes from a receive buffer now (copy mode).
    async fn copy(&mut self, bytes: &[u8], record: u64, events: &mut impl FnMut(RelayEvent)) {
        if let Some(ds) = self.ds.as_mut() {
            if let Err(error) = ds.write_all(bytes).await {
                self.lost(record, error, events);
            }
        }
    }

    /// Sends every queued record the sink has written (sendfile mode).
    async fn flush_ready(&mut self, written: u64, events: &mut impl FnMut(RelayEvent)) {
        while let (Some(ds), Some(p), Some(file)) =
            (self.ds.as_mut(), self.pending.front(), self.file.as_deref())
        {
            if p.ready_at > written {
                return;
            }
            let mut r = Ok(());
            if let Some(h) = &p.header {
                r = send_more(ds, h, p.data.is_some()).await;
            }
            if let (Ok(()), Some((offset, len))) = (&r, p.data) {
                r = sendfile_all(ds, file, offset, len).await;
            }
            let record = p.record;
            self.pending.pop_front();
            if let Err(error) = r {
                self.lost(record, error, events);
            }
        }
    }
}

async fn relay_inner<R>(
    upstream: &mut R,
    writer: &mut NodeWriter,
    fwd: &mut Forwarder<'_>,
    events: &mut impl FnMut(RelayEvent),
) -> Result<RelayEnd, Error>
where
    R: AsyncRead + Unpin,
{
    writer.check()?;
    let sendfile = fwd.file.is_some();
    loop {
        let at = writer.position();
        let mut hb = [0u8; RecordHeader::SIZE];
        if let Err(e) = upstream.read_exact(&mut hb).await {
            return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::UpstreamClosed { at }
            } else {
                Error::io(format!("reading the upstream at offset {at}"), e)
            });
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
                let mut first = true;
                while left > 0 {
                    let mut buf = writer.take_buf(events).await?;
                    let n = left.min(BUF_SIZE);
                    if let Err(e) = upstream.read_exact(&mut buf[HEADROOM..HEADROOM + n]).await {
                        writer.free.push(buf);
                        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            Error::UpstreamClosed { at: offset }
                        } else {
                            Error::io(format!("reading the upstream at offset {offset}"), e)
                        });
                    }
                    if sendfile {
                        fwd.pending.push_back(Pending {
                            header: first.then_some(hb),
                            data: Some((offset, n as u64)),
                            ready_at: offset + n as u64,
                            record: h.offset,
                        });
                    } else {
                        let from = if first {
                            buf[HEADROOM - RecordHeader::SIZE..HEADROOM].copy_from_slice(&hb);
                            HEADROOM - RecordHeader::SIZE
                        } else {
                            HEADROOM
                        };
                        fwd.copy(&buf[from..HEADROOM + n], h.offset, events).await;
                    }
                    writer
                        .submit(
                            Job::Data {
                                offset,
                                buf,
                                len: n,
                            },
                            events,
                        )
                        .await?;
                    offset += n as u64;
                    left -= n;
                    first = false;
                }
            }
            RecordKind::Zero | RecordKind::End => {
                if sendfile {
                    fwd.pending.push_back(Pending {
                        header: Some(hb),
                        data: None,
                        ready_at: h.offset,
                        record: h.offset,
                    });
                } else {
                    fwd.copy(&hb, h.offset, events).await;
                }
                if h.kind == RecordKind::End {
                    writer.submit(Job::End { size: h.offset }, events).await?;
                    writer.settle(events).await?;
                    let digest = writer.end_digest.take();
                    fwd.flush_ready(writer.written, events).await;
                    if let Some(ds) = fwd.ds.as_mut() {
                        if let Err(error) = ds.flush().await {
                            fwd.lost(h.offset, error, events);
                        }
                    }
                    let digest = digest.ok_or_else(|| {
                        Error::WriterFailed("the writer finished without a digest".into())
                    })?;
                    return Ok(RelayEnd {
                        size: h.offset,
                        digest,
                    });
                }
                writer
                    .submit(
                        Job::Zero {
                            offset: h.offset,
                            len: h.len,
                        },
                        events,
                    )
                    .await?;
            }
        }
        writer.poll_replies(events)?;
        fwd.flush_ready(writer.written, events).await;
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
/// If the source stops at a limit (a node serving from its own disk, see
/// [`ImageSource::set_limit`]) the send ends there without `End` and `size` is
/// that limit.
pub async fn send_image(
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
    let (full_tx, mut full_rx) = mpsc::channel::<(RecordHeader, Option<Vec<u8>>)>(DEPTH);
    let (free_tx, free_rx) = std_mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = oneshot::channel();
    let zero_copy = sendfile_from.is_some();
    if !zero_copy {
        for _ in 0..DEPTH {
            free_tx.send(new_buf()).expect("receiver alive");
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
                let from = HEADROOM - RecordHeader::SIZE;
                buf[from..HEADROOM].copy_from_slice(&h.encode());
                let r = downstream.write_all(&buf[from..HEADROOM + len]).await;
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

type RecordTx = mpsc::Sender<(RecordHeader, Option<Vec<u8>>)>;

/// Reader loop for any source: records with their payload in pooled buffers.
fn read_records(
    source: &mut dyn ImageSource,
    hasher: &mut Option<ImageHasher>,
    full_tx: &RecordTx,
    free_rx: &std_mpsc::Receiver<Vec<u8>>,
) -> Result<Option<ImageDigest>, Error> {
    let mut digest = None;
    while let Ok(mut buf) = free_rx.recv() {
        let Some(h) = source.next_record(&mut buf[HEADROOM..])? else {
            break;
        };
        if let Some(hs) = hasher.as_mut() {
            let len = if h.kind == RecordKind::Data {
                h.len as usize
            } else {
                0
            };
            digest = hs.record(&h, &buf[HEADROOM..HEADROOM + len])?;
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
) -> Result<Option<ImageDigest>, Error> {
    let fs = source.as_file_source().expect("checked by send_image");
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chain_of_two_nodes_copies_and_digests_agree() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let (mut src_out, mut n1_in) = pair().await;
            let (mut n1_out, mut n2_in) = pair().await;
            let out1 = dir.path().join("n1");
            let out2 = dir.path().join("n2");

            let source = open_source(&SourceSpec::File(path.clone())).unwrap();
            let size = source.size();
            let sender = tokio::spawn(async move {
                send_image(source, &mut src_out, Some(ImageHasher::new(&KEY)), |_| {})
                    .await
                    .unwrap()
            });
            let o1 = out1.clone();
            let node1 = tokio::spawn(async move {
                let sink = open_sink(&SinkSpec::File(o1), size).unwrap();
                let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
                let mut last = 0;
                let end = relay(&mut n1_in, &mut w, Some(&mut n1_out), |e| {
                    if let RelayEvent::Written(o) = e {
                        assert!(o > last, "progress must grow");
                        last = o;
                    }
                })
                .await
                .unwrap();
                assert_eq!(last, end.size, "last progress is the image end");
                (end, w.into_parts().await.unwrap().0)
            });
            let o2 = out2.clone();
            let node2 = tokio::spawn(async move {
                let sink = open_sink(&SinkSpec::File(o2), size).unwrap();
                let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
                let end = relay(&mut n2_in, &mut w, None, |_| {}).await.unwrap();
                (end, w.into_parts().await.unwrap().0)
            });
            let sent = sender.await.unwrap();
            let (end1, sink1) = node1.await.unwrap();
            let (end2, _) = node2.await.unwrap();
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

    /// source → node 1 (writing to `sink1`, forwarding) → node 2 (file);
    /// returns node 2's bytes and digest.
    async fn two_hops(
        path: &std::path::Path,
        sink1: SinkSpec,
        out2: &std::path::Path,
    ) -> (Vec<u8>, ImageDigest) {
        let (mut src_out, mut n1_in) = pair().await;
        let (mut n1_out, mut n2_in) = pair().await;
        let source = open_source(&SourceSpec::File(path.to_owned())).unwrap();
        let size = source.size();
        let sender = tokio::spawn(async move {
            send_image(source, &mut src_out, None, |_| {})
                .await
                .unwrap()
        });
        let node1 = tokio::spawn(async move {
            let mut w =
                NodeWriter::new(open_sink(&sink1, size).unwrap(), ImageHasher::new(&KEY)).unwrap();
            relay(&mut n1_in, &mut w, Some(&mut n1_out), |e| {
                assert!(!matches!(e, RelayEvent::DownstreamLost { .. }), "{e:?}")
            })
            .await
            .unwrap()
        });
        let sink2 = open_sink(&SinkSpec::File(out2.to_owned()), size).unwrap();
        let mut w2 = NodeWriter::new(sink2, ImageHasher::new(&KEY)).unwrap();
        let end = relay(&mut n2_in, &mut w2, None, |_| {}).await.unwrap();
        sender.await.unwrap();
        node1.await.unwrap();
        (std::fs::read(out2).unwrap(), end.digest)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarding_by_copy_and_by_sendfile_give_identical_output() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            // A file sink forwards with sendfile from its page cache…
            let via_file = SinkSpec::File(dir.path().join("n1-file"));
            let (a, da) = two_hops(&path, via_file, &dir.path().join("n2-a")).await;
            // …a command sink forwards from the receive buffers.
            let via_cmd =
                SinkSpec::Command(format!("cat > {}", dir.path().join("n1-cmd").display()));
            let (b, db) = two_hops(&path, via_cmd, &dir.path().join("n2-b")).await;
            assert!(a == img, "sendfile path differs from the image");
            assert!(b == img, "copy path differs from the image");
            assert_eq!(da, db);
            assert!(std::fs::read(dir.path().join("n1-cmd")).unwrap() == img);
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
            loop {
                let h = src.next_record(&mut buf).unwrap().unwrap();
                sent.extend_from_slice(&h.encode());
                if h.kind == RecordKind::Data {
                    sent.extend_from_slice(&buf[..100]);
                    break;
                }
            }
            let cut = tokio::spawn(async move {
                up.write_all(&sent).await.unwrap();
                drop(up);
            });
            let err = relay(&mut down, &mut writer, None, |_| {})
                .await
                .unwrap_err();
            cut.await.unwrap();
            assert!(matches!(err, Error::UpstreamClosed { .. }), "{err}");
            let resume_at = writer.position();
            assert_eq!(resume_at, writer.written());
            assert!(resume_at > 0 && resume_at % BLOCK == 0);

            // Second upstream: resumes from the node's position.
            let (mut up, mut down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path.clone())).unwrap();
            source.seek(resume_at).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            let end = relay(&mut down, &mut writer, None, |_| {}).await.unwrap();
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
                let err = relay(&mut down, &mut w, None, |_| {}).await.unwrap_err();
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
            let end = relay(&mut down, &mut w, None, |_| {}).await.unwrap();
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
            let end = relay(&mut down, &mut w, None, |_| {}).await.unwrap();
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
            let err = relay(&mut down, &mut w_b, None, |_| {}).await.unwrap_err();
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
            let end = relay(&mut down, &mut w_b, None, |_| {}).await.unwrap();
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
                    relay(&mut down, &mut w, None, |_| {}),
                )
                .await;
                assert!(
                    cut.is_err(),
                    "relay should still be waiting for the rest of the record"
                );
                assert_eq!(w.position(), at, "nothing of the half record is taken");
            }
            let (mut up, mut down) = pair().await;
            let mut source = open_source(&SourceSpec::File(path)).unwrap();
            source.seek(w.position()).unwrap();
            let sender =
                tokio::spawn(
                    async move { send_image(source, &mut up, None, |_| {}).await.unwrap() },
                );
            relay(&mut down, &mut w, None, |_| {}).await.unwrap();
            sender.await.unwrap();
            assert!(std::fs::read(&out).unwrap() == img);
        })
        .await
        .expect("test timed out: a cancelled relay leaked the writer's buffers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_downstream_does_not_stop_the_node() {
        tokio::time::timeout(DEADLINE, async {
            let dir = tempfile::tempdir().unwrap();
            let (path, img) = image(dir.path());
            let (mut src_out, mut n1_in) = pair().await;
            let (mut n1_out, n2_in) = pair().await;
            drop(n2_in); // the downstream dies at once
            let source = open_source(&SourceSpec::File(path)).unwrap();
            let size = source.size();
            let sender = tokio::spawn(async move {
                send_image(source, &mut src_out, None, |_| {})
                    .await
                    .unwrap()
            });
            let out = dir.path().join("n1");
            let sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
            let mut lost = None;
            relay(&mut n1_in, &mut w, Some(&mut n1_out), |e| {
                if let RelayEvent::DownstreamLost { at, .. } = e {
                    lost.get_or_insert(at);
                }
            })
            .await
            .unwrap();
            sender.await.unwrap();
            assert!(lost.is_some(), "the lost downstream was not reported");
            assert!(std::fs::read(&out).unwrap() == img);
        })
        .await
        .expect("test timed out");
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
            let err = relay(&mut down, &mut w, None, |_| {}).await.unwrap_err();
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
            let end = relay(&mut down, &mut w, None, |_| {}).await.unwrap();
            let sent = sender.await.unwrap();
            assert_eq!(end.size, 4_000_000);
            assert_eq!(Some(end.digest), sent.digest);
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
        })
        .await
        .expect("test timed out");
    }
}
