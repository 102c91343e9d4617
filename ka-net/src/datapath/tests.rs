//! The data path end to end over loopback sockets: sources sent by a
//! test-only sender, relayed through nodes, forwarded and read back.

use std::os::unix::fs::FileExt;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use ka_core::codec::Digest;
use ka_core::record::{RecordHeader, RecordKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::forward::Downstreams;
use super::pool::{Buf, BUF_SIZE, DEPTH};
use super::send::{send_more, sendfile_all};
use super::*;
use crate::image::digest::{digest_source, DigestKey, ImageHasher};
use crate::image::sinks::{open_sink, ImageSink, SinkSpec};
use crate::image::sources::{open_source, FileSource, ImageSource, SourceSpec};
use crate::image::BLOCK;
use crate::Error;

/// How [`send_image`] ended.
struct Sent {
    /// The image size.
    size: u64,
    /// The digest, if a hasher was given.
    digest: Option<Digest>,
}

/// A source's sender for these tests (the product serves every image with
/// [`send_growing`]): sends `source` from its current position to its `End` over `downstream`,
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
async fn send_image(
    source: Box<dyn ImageSource>,
    downstream: &mut TcpStream,
    hasher: Option<ImageHasher>,
    progress: impl FnMut(u64),
) -> Result<Sent, Error> {
    send(source, downstream, hasher, progress).await
}

async fn send(
    mut source: Box<dyn ImageSource>,
    downstream: &mut TcpStream,
    hasher: Option<ImageHasher>,
    mut progress: impl FnMut(u64),
) -> Result<Sent, Error> {
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
    Ok(Sent { size, digest })
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

const KEY: DigestKey = DigestKey([9; 32]);
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
    let sink = open_sink(&SinkSpec::File(out), size).unwrap();
    let w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
    node_writing(up, w, written, direct).await
}

/// [`node`] with the writer `w`.
async fn node_writing(
    up: TcpStream,
    mut w: NodeWriter,
    written: watch::Sender<Written>,
    direct: Option<Arc<Downstreams>>,
) -> (RelayEnd, Box<dyn ImageSink>) {
    use std::sync::atomic::{AtomicU64, Ordering};
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

/// A writer that does not hash (a packed stream's node, checked by the
/// image it unpacks to) writes the same copy and ends with no digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhashed_writer_writes_the_whole_copy_and_ends_without_a_digest() {
    tokio::time::timeout(DEADLINE, async {
        let dir = tempfile::tempdir().unwrap();
        let (path, img) = image(dir.path());
        let (mut src_out, n1_in) = pair().await;
        let out = dir.path().join("n1");
        let source = open_source(&SourceSpec::File(path.clone())).unwrap();
        let size = source.size();
        let sender = tokio::spawn(async move {
            send_image(source, &mut src_out, None, |_| {})
                .await
                .unwrap()
        });
        let sink = open_sink(&SinkSpec::File(out.clone()), size).unwrap();
        let w = NodeWriter::unhashed(sink).unwrap();
        let (tx, _rx) = watch::channel(Written::default());
        let (end, _) = node_writing(n1_in, w, tx, None).await;
        sender.await.unwrap();
        assert_eq!(end.size, img.len() as u64);
        assert_eq!(end.digest, None);
        assert!(std::fs::read(&out).unwrap() == img, "the copy differs");
    })
    .await
    .expect("timed out");
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
            send_growing(src, &mut n1_out, rx1, None, Payload::Lent, |_| {})
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
        assert_eq!(end1.digest, sent.digest);
        assert_eq!(end2.digest.unwrap(), end1.digest.unwrap());
        let mut rb = sink1.readback().unwrap();
        let d = digest_source(rb.as_mut(), ImageHasher::new(&KEY), &mut vec![0; BUF_SIZE]).unwrap();
        assert_eq!(d, end1.digest.unwrap(), "read-back digest differs");
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
            send_growing(
                src,
                &mut down,
                written,
                Some(&direct),
                Payload::Lent,
                |_| {},
            )
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
            assert_eq!(copy_end.digest.unwrap(), end.digest.unwrap());
        }
        self.direct.stats()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forwards_directly_while_its_downstream_keeps_up_and_from_disk_when_it_falls_behind()
{
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
        assert_eq!(end2.digest.unwrap(), end1.digest.unwrap());
        assert_eq!(end1.digest.unwrap(), file_digest(&fed.path));
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
        assert_eq!(end1.digest.unwrap(), file_digest(&fed.path));
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
            assert_eq!(end.digest, sent.digest);
            assert!(std::fs::read(&out).unwrap() == img, "copy {i} differs");
            results.push(end.digest.unwrap());
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
        let serve = tokio::spawn(async move {
            send_growing(src, &mut up, rx, None, Payload::Lent, |_| {}).await
        });
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
            tokio::spawn(async move { send_image(source, &mut up, None, |_| {}).await.unwrap() });
        let end = relay(&down, &[], &mut writer, None, |_| {}).await.unwrap();
        sender.await.unwrap();
        assert!(std::fs::read(&out).unwrap() == img, "resumed copy differs");
        let want = file_digest(&path);
        assert_eq!(end.digest.unwrap(), want, "resumed digest differs");
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
        let hasher = rehash_written(sink.as_ref(), &KEY).unwrap();
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
        assert_eq!(end.digest.unwrap(), want);
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
        assert_eq!(end.digest, sent.digest);
        let (sink, _) = w.into_parts().await.unwrap();
        verify_readback(sink.as_ref(), &KEY, &end.digest.unwrap()).unwrap();
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
                RecordKind::Data => sink_a.write_data(h.offset, &buf[..h.len as usize]).unwrap(),
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
        let hasher_b = rehash_written(sink_b.as_ref(), &KEY).unwrap();
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
        assert_eq!(end.digest.unwrap(), want);
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
            tokio::spawn(async move { send_image(source, &mut up, None, |_| {}).await.unwrap() });
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
        let sink = open_sink(&SinkSpec::Command(format!("cat > {}", out.display())), None).unwrap();
        let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
        let end = relay(&down, &[], &mut w, None, |_| {}).await.unwrap();
        let sent = sender.await.unwrap();
        assert_eq!(end.size, 4_000_000);
        assert_eq!(end.digest, sent.digest);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
    })
    .await
    .expect("test timed out");
}

/// Reads a record stream to its `End` and returns the image it carries.
async fn read_image(down: &mut TcpStream) -> Vec<u8> {
    let mut img = Vec::new();
    loop {
        let mut hb = [0u8; RecordHeader::SIZE];
        down.read_exact(&mut hb).await.unwrap();
        let h = RecordHeader::decode(&hb).unwrap();
        assert_eq!(h.offset, img.len() as u64, "records in order");
        match h.kind {
            RecordKind::Data => {
                img.resize(img.len() + h.len as usize, 0);
                let at = h.offset as usize;
                down.read_exact(&mut img[at..]).await.unwrap();
            }
            RecordKind::Zero => img.resize(img.len() + h.len as usize, 0),
            RecordKind::End => return img,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_served_from_a_window_survive_being_punched_before_the_peer_reads_them() {
    use super::window::Window;
    tokio::time::timeout(DEADLINE, async {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = image(dir.path());
        // Written as a receiving node writes its spool: in pieces of about a
        // megabyte at any offset, which the page cache keeps in large folios
        // across the window's block-aligned punches.
        let path = dir.path().join("spool");
        let spool = std::fs::File::create_new(&path).unwrap();
        for (i, piece) in img.chunks(999_999).enumerate() {
            spool.write_all_at(piece, (i * 999_999) as u64).unwrap();
        }
        // The unpacker is done: only the serving holds the window back, and
        // everything it has sent is punched out at once.
        let window = Window::new(spool, 4 << 20);
        let reader = window.register(0).unwrap();
        window.consumed(img.len() as u64);
        let (_tx, rx) = watch::channel(Written {
            upto: img.len() as u64,
            size: Some(img.len() as u64),
        });
        let (mut up, mut down) = pair().await;
        let src = FileSource::open_sized(&path, Some(img.len() as u64)).unwrap();
        let serve = tokio::spawn(async move {
            send_growing(src, &mut up, rx, None, Payload::Copied, |sent| {
                reader.advance(sent)
            })
            .await
        });
        // Megabytes are queued in the two sockets and punched from the file
        // before the peer reads a byte.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let punched = window.holds_from();
        assert!(punched >= 1 << 20, "the window moved on: {punched}");
        let got = read_image(&mut down).await;
        serve.await.unwrap().unwrap();
        let first_bad = got.iter().zip(&img).position(|(a, b)| a != b);
        assert_eq!(got.len(), img.len());
        assert_eq!(
            first_bad, None,
            "bytes changed after {punched} were punched"
        );
    })
    .await
    .expect("test timed out");
}
