//! The node's writer: its sink, its running digest on a hasher thread of
//! its own, and the buffer pool between them; and the two passes that read
//! a written copy back ([`rehash_written`], [`verify_readback`]).

use std::sync::mpsc as std_mpsc;

use ka_core::codec::Digest;
use ka_core::record::RecordKind;

use super::pool::{hasher_gone, Buf, Pool, BUF_SIZE, DEPTH};
use crate::image::digest::{digest_source, DigestKey, ImageHasher};
use crate::image::sinks::ImageSink;
use crate::Error;

/// Jobs in the node's pipeline before the receiver waits. `Zero` records
/// carry no buffer, so this is what bounds the queues for a sparse image.
const MAX_QUEUED_JOBS: usize = 4 * DEPTH;

/// What hashing is asked to do, in image order.
pub(super) enum HashJob {
    /// Hash `len` bytes of `buf` at `offset`, then return the buffer to the pool.
    Data { offset: u64, buf: Buf, len: usize },
    /// Hash a run of zeros.
    Zero { offset: u64, len: u64 },
    /// The image ends at `size`: reply with its digest (`None` from a
    /// writer that does not hash), or the first error.
    End {
        size: u64,
        reply: std_mpsc::Sender<Result<Option<Digest>, String>>,
    },
}

/// What a relay's receiving thread borrows from the [`NodeWriter`] and
/// gives back when it stops.
pub(super) struct Lent {
    pub(super) sink: Box<dyn ImageSink>,
    pub(super) pool: Pool,
    hash: std_mpsc::SyncSender<HashJob>,
}

impl Lent {
    /// Queues `job` for the hasher.
    pub(super) fn hash(&self, job: HashJob) -> Result<(), Error> {
        self.hash.send(job).map_err(|_| hasher_gone())
    }
}

/// A node's sink and running digest. During a [`relay`](super::relay), one receiving
/// thread reads the upstream and writes what it reads to the sink itself,
/// so a piece of the image reaches the disk (and so the downstream, which
/// is served from the disk) without changing threads; a hasher thread
/// hashes whole buffers behind it. It outlives any one upstream
/// connection: after a relay stops, the same writer is given to the next
/// [`relay`](super::relay) (from the new upstream), resuming at
/// [`position`](Self::position).
pub struct NodeWriter {
    /// `None` while a relay's thread holds it, or after that thread was lost.
    lent: Option<Lent>,
    hasher: Option<std::thread::JoinHandle<Result<Option<ImageHasher>, String>>>,
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
        Self::start(sink, Some(hasher))
    }

    /// A writer that does not hash what it writes, from where `sink`
    /// stands: for a stream whose copy is checked by something else (a
    /// packed stream, by the image it unpacks to), where the stream's own
    /// digest would be work nobody uses. Its relays end with no digest.
    pub fn unhashed(sink: Box<dyn ImageSink>) -> Result<Self, Error> {
        Self::start(sink, None)
    }

    /// Starts the thread that hashes behind the writes (or only hands the
    /// buffers back, without a hasher).
    fn start(sink: Box<dyn ImageSink>, hasher: Option<ImageHasher>) -> Result<Self, Error> {
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
                pool: Pool::new(free_rx),
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

    /// An error if the writer failed earlier.
    pub(super) fn check(&self) -> Result<(), Error> {
        match &self.failed {
            Some(msg) => Err(Error::WriterFailed(msg.clone())),
            None => Ok(()),
        }
    }

    /// The sink and the pool, to lend to a relay's thread or to give up.
    pub(super) fn take_lent(&mut self) -> Result<Lent, Error> {
        self.lent.take().ok_or_else(|| {
            let why = self.failed.as_deref().unwrap_or("the sink was lost");
            Error::WriterFailed(why.into())
        })
    }

    /// Takes back what a relay's thread borrowed.
    pub(super) fn restore(&mut self, lent: Lent, sink_failed: Option<String>) {
        self.position = lent.sink.position();
        if let Some(why) = sink_failed {
            self.failed.get_or_insert(why);
        }
        self.lent = Some(lent);
    }

    /// Marks the writer failed for good (its sink was lost), keeping the
    /// first reason.
    pub(super) fn fail(&mut self, why: String) {
        self.failed.get_or_insert(why);
    }

    /// Stops the hasher thread once it has hashed everything queued, and
    /// returns the sink (e.g. to read it back) and the hasher, if it has one.
    pub async fn into_parts(mut self) -> Result<(Box<dyn ImageSink>, Option<ImageHasher>), Error> {
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
    mut hasher: Option<ImageHasher>,
    jobs: std_mpsc::Receiver<HashJob>,
    free: std_mpsc::Sender<Buf>,
) -> Result<Option<ImageHasher>, String> {
    let mut failed: Option<String> = None;
    for job in jobs {
        match job {
            HashJob::Data { offset, buf, len } => {
                if let (Some(h), None) = (&mut hasher, &failed) {
                    if let Err(e) = h.data(offset, buf.payload(len)) {
                        failed = Some(e.to_string());
                    }
                }
                // The receiver may be gone (its relay ended): the buffer is dropped.
                let _ = free.send(buf);
            }
            HashJob::Zero { offset, len } => {
                if let (Some(h), None) = (&mut hasher, &failed) {
                    if let Err(e) = h.zero(offset, len) {
                        failed = Some(e.to_string());
                    }
                }
            }
            HashJob::End { size, reply } => {
                let digest = match (&failed, &hasher) {
                    (Some(why), _) => Err(why.clone()),
                    (None, None) => Ok(None),
                    (None, Some(h)) => h.clone().finish(size).map(Some).map_err(|e| e.to_string()),
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

/// Rebuilds the running digest of what `sink` already holds, by reading it
/// back up to its position: how a node that restarted (and lost its hasher
/// with its process) resumes hashing where its copy stops, then asks its
/// upstream only for the rest.
pub fn rehash_written(sink: &dyn ImageSink, key: &DigestKey) -> Result<ImageHasher, Error> {
    let mut source = sink.readback()?;
    let mut hasher = ImageHasher::new(key);
    let mut buf = vec![0u8; BUF_SIZE];
    while let Some(h) = source.next_record(&mut buf)? {
        match h.kind {
            RecordKind::Data => hasher.data(h.offset, &buf[..h.len as usize])?,
            RecordKind::Zero => hasher.zero(h.offset, h.len)?,
            RecordKind::End => break,
        }
    }
    if hasher.position() != sink.position() {
        return Err(Error::Truncated {
            at: hasher.position(),
        });
    }
    Ok(hasher)
}

/// Re-reads everything `sink` has written (data regions from disk, zero
/// regions checked to read as zero) and checks its digest against
/// `expected`, the source's. Returns the digest read back.
pub fn verify_readback(
    sink: &dyn ImageSink,
    key: &DigestKey,
    expected: &Digest,
) -> Result<Digest, Error> {
    let mut source = sink.readback()?;
    let mut buf = vec![0u8; BUF_SIZE];
    let got = digest_source(source.as_mut(), ImageHasher::new(key), &mut buf)?;
    if got != *expected {
        return Err(Error::DigestMismatch {
            expected: *expected,
            got,
        });
    }
    Ok(got)
}
