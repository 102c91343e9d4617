//! ka-net: the tokio shell and data plane of ka.
//!
//! # The data plane
//!
//! An image travels as a sequence of records ([`ka_core::record`]): `Data`
//! with payload, `Zero` (a run of zeros, header only) and a final `End` at the
//! image size. The data plane moves records; who connects to whom, and when,
//! is decided by the protocol core.
//!
//! - [`open_source`] turns a [`SourceSpec`] (file or block device, command
//!   output, directory as GNU tar, stdin) into an [`ImageSource`]. Files and
//!   block devices find holes with `SEEK_DATA`/`SEEK_HOLE` and can restart at
//!   any block ([`ImageSource::seek`]); streams run once. Every source scans
//!   data for all-zero [`BLOCK`]s (64 KiB), which become `Zero` records, so
//!   zeros never cross the network.
//! - [`open_sink`] turns a [`SinkSpec`] (file or block device, command input,
//!   untar into a directory) into an [`ImageSink`]. Files and block devices
//!   never receive zeros as bytes (holes are skipped or punched; devices zero
//!   ranges with `fallocate`/`BLKZEROOUT`), can [`resume`](ImageSink::resume)
//!   and can be [read back](ImageSink::readback). Block devices are checked
//!   ([`blockdev`]: size, mounts, swap, holders, over all partitions, then
//!   `O_EXCL`) before one byte is written.
//! - [`send_image`] streams a source to a socket; [`relay()`] receives from an
//!   upstream socket into a [`NodeWriter`] (hash + sink) and forwards to an
//!   optional downstream, reporting [`RelayEvent`]s as it goes.
//! - [`ImageHasher`] computes the session digest; [`verify_readback`] re-reads
//!   a written target and checks it against the source's digest.
//!
//! A node's drive loop, in short:
//!
//! ```no_run
//! # async fn node(mut up: tokio::net::TcpStream, mut down: tokio::net::TcpStream,
//! #               key: ka_net::SessionKey, size: u64) -> Result<(), ka_net::Error> {
//! use ka_net::*;
//! let sink = open_sink(&SinkSpec::File("/dev/sda".into()), Some(size))?;
//! let mut writer = NodeWriter::new(sink, ImageHasher::new(&key))?;
//! // The downstream is served from what this node has written, as it grows.
//! let (written, follow) = tokio::sync::watch::channel(Written::default());
//! let from_disk = source::FileSource::open_sized("/dev/sda".as_ref(), Some(size))?;
//! let serve = tokio::spawn(async move { send_growing(from_disk, &mut down, follow, |_| {}).await });
//! let end = relay(&mut up, &mut writer, |RelayEvent::Written(offset)| {
//!     written.send_modify(|w| w.upto = offset); // and report progress to the core
//! })
//! .await?; // on error: reconnect and relay again from writer.position()
//! written.send_replace(Written { upto: end.size, size: Some(end.size) });
//! let (sink, _) = writer.into_parts().await?;
//! verify_readback(sink.as_ref(), &key, &end.digest)?;
//! # Ok(()) }
//! ```
//!
//! # Design decisions
//!
//! **Digest.** BLAKE3 keyed with the session key over the canonical record
//! stream, a function of the image bytes and size only (not of record cuts or
//! resume points): see [`digest`] for the definition. Headers and payloads are
//! hashed as two keyed streams because interleaving a 17-byte header every
//! 64 KiB broke BLAKE3's SIMD alignment and cost ~20 % (measured).
//!
//! **Buffers.** Payload buffers are [`BUF_SIZE`] = 1 MiB, allocated once per
//! leg in a pool of 8 and recycled (no allocation per block), with 64 bytes
//! of headroom so a record's header and payload leave in one `write`. A node
//! holds at most 8 MiB of image data in memory whatever the image size
//! (peak RSS measured ~11 MiB).
//!
//! **Threads.** Sources and sinks are blocking (file and pipe I/O blocks;
//! tokio would push it to a blocking thread anyway). Each leg has one thread
//! doing disk work (the [`NodeWriter`] writes; the sender's reader probes,
//! reads and hashes) and the async task doing socket work (on a node, also
//! the hash), handing owned buffers through channels, so the two overlap on
//! two cores.
//!
//! **Copy path.** Measured on loopback (see `examples/dataplane_bench.rs`):
//! splice(2) socket → pipe → file did not beat a plain `read`/`write` loop
//! with one buffer, and once the node must also *hash* the bytes it needs them
//! in user space anyway; reading them back through an `mmap` of the page
//! cache cost more than the copy it saved. So a node receives with `read`
//! into its buffer, hashes from it and writes it with `pwrite`. What did win
//! is `sendfile(2)` from the page cache on the *sending* side: a file source
//! is sent without a user-space copy (the reader only probes each block for
//! zeros), and a node whose sink is a file or block device forwards to its
//! downstream with `sendfile` from the pages it has just written, which is
//! also how it serves a downstream from its own disk. Sinks without a file
//! (commands, untar) forward from the receive buffer.
//!
//! **Zeros.** Zero detection works per 64 KiB block: small enough to find the
//! free space of a used file system, large enough that headers are noise. A
//! data block is rejected after its first non-zero bytes, so the check costs
//! nothing on real data.
//!
//! # Measurements
//!
//! `cargo run --release -p ka-net --example dataplane_bench` (1 GiB of
//! random data on tmpfs, copied to tmpfs over loopback TCP, every process on
//! the same 2-vCPU VM, best of 5 interleaved runs). The machine was shared
//! with two other engineers' compilers (load average 2.5–3.8 during the run;
//! BLAKE3 measured 2.0 GB/s, 2.6 GB/s in a quiet moment), so the MB/s column
//! swings by tens of percent between runs (three full runs gave ka 1 hop
//! 0.42–0.59 and ka 1 hop without source hashing 0.49–0.69 of plain); CPU
//! seconds per GiB (user + system, all processes of the scenario) are the
//! stabler figure.
//!
//! ```text
//! scenario                  MB/s   ratio  CPU s/GiB all  CPU s/GiB node  peak RSS
//! plain (read/write loop)    926    1.00           1.97            1.10     5 MiB
//! sendfile sender            906    0.98           1.49            1.18     5 MiB
//! splice receiver           1030    1.11           1.79            0.98     5 MiB
//! splice + hash via mmap     481    0.52           3.06            2.23    34 MiB
//! ka 1 hop                   546    0.59           3.58            2.16    10 MiB
//! ka 1 hop, src no hash      638    0.69           3.04            2.58    11 MiB
//! ka 2 hops                  323    0.35           6.13            2.76    11 MiB
//! ```
//!
//! Reading it:
//!
//! - Loopback puts the source, the node(s) and their kernels' TCP work on the
//!   same two cores, so throughput is bounded by total CPU per GiB. A ka node
//!   costs 1.1–1.5 s/GiB more than the plain receiver. A profile (perf)
//!   shows BLAKE3 at 26–36 % of the node, the two kernel copies (socket →
//!   buffer, buffer → page cache) at 18–25 %, tmpfs page allocation most of
//!   the rest; the node's user time is 99 % BLAKE3, the data plane's own code
//!   (channels, tokio, zero tests) under 1 %. In place BLAKE3 ran at ~1.3 GB/s
//!   (0.8 s/GiB), not the 2.0 GB/s it reaches alone on a warm buffer: the
//!   sender, the kernel's TCP work and other load share the two cores and
//!   their caches. Pinning both node threads to one core (no cross-core
//!   buffer handoff) saved only ~0.1–0.2 s/GiB.
//! - With the source not hashing, ka spent 2.3–3.0 CPU s/GiB against
//!   plain's 1.8–2.0 over three runs: CPU-bound on 2 cores, one hop can
//!   reach at most ~0.65–0.80 of the plain copy here, and measured 0.5–0.7:
//!   the 0.90 target is not met on this machine. On separate machines (a
//!   real cluster) the node's receive+hash task runs beside its writer
//!   thread, and the limit becomes the slower of the network and the node's
//!   receive+hash rate.
//! - The sender with `sendfile` costs ~0.3 s/GiB against ~0.7 for a
//!   read/write sender; hashing at the source adds a read and the hash
//!   (~0.6 s/GiB). A seekable source may publish its digest from a separate
//!   pass instead.
//! - splice on the receive side saved no consistent CPU over `read` (node
//!   0.98–1.31 s/GiB against plain's 1.02–1.28 across runs), and a node must
//!   hash the bytes, which splice keeps out of user space: hashing them
//!   through an mmap window of the page cache cost as much as the copy it
//!   avoided (node 1.98–2.39 s/GiB, RSS 34 MiB from the mapped window) and
//!   ran slower. The plain receive path stays.
//! - Where the node hashes: a profile of a node hashing on its writer thread
//!   put ~75 % of the node's CPU on that thread (hash plus tmpfs writes) and
//!   ~25 % on the receiving task, so the hash moved to the receiving task
//!   (recv + hash against write: ~1.7 vs ~1.4 s/GiB under the profiler, the
//!   best balance two cores allow). Wall-clock A/B runs on the loaded
//!   machine were within the noise (1 GiB in 1.70 vs 1.75 s mean over four
//!   alternating runs); the balance is what a dedicated node gains from.
//!   Hashing 1 MiB blocks the receiving task for ~0.4 ms between awaits.
//!   256 KiB buffers did no better than 1 MiB.
//! - With two hops on one machine, three processes share two cores; the
//!   figure says little about a chain on separate machines.
//! - Node memory stays ~11 MiB for any image size (8 × 1 MiB buffers).
#![warn(missing_docs)]

use std::io;

pub mod blockdev;
pub mod digest;
pub mod process;
pub mod relay;
pub mod shell;
pub mod sink;
pub mod source;
pub mod tftp;

pub use digest::{
    digest_file, digest_source, rehash_written, verify_readback, ImageDigest, ImageHasher,
    SessionKey, BLOCK,
};
pub use relay::{
    relay, send_growing, send_image, NodeWriter, RelayEnd, RelayEvent, SendEnd, Written, BUF_SIZE,
};
pub use sink::{open_sink, ImageSink, SinkSpec};
pub use source::{open_source, ImageSource, SourceSpec};

/// Errors of the data plane. Messages name the file, device or command
/// involved and, where the user can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "writing /dev/sda at 4096".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block device cannot be used as it is.
    #[error(transparent)]
    BlockDevice(#[from] blockdev::BlockDeviceError),
    /// A source or sink command failed.
    #[error("`{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Command {
        /// The command (or a label for it).
        command: String,
        /// Its exit status, as the OS describes it.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A record or write did not start where the stream stands.
    #[error("record out of order: expected offset {expected}, got {got}")]
    OutOfOrder {
        /// The offset the stream is at.
        expected: u64,
        /// The offset that came.
        got: u64,
    },
    /// A stream source or sink was asked to move.
    #[error(
        "a stream cannot move from offset {at} to {wanted}: resume needs a file or block device"
    )]
    NotSeekable {
        /// Where the stream is.
        at: u64,
        /// Where it was asked to go.
        wanted: u64,
    },
    /// The sink (a command or untar) cannot be read back.
    #[error("`{0}` cannot be read back: verify and serve downstream from the source instead")]
    NotReadable(String),
    /// A stream ended before its `End` record.
    #[error("image stream ended early at offset {at}")]
    Truncated {
        /// Where it ended.
        at: u64,
    },
    /// The upstream closed the connection between records.
    #[error("upstream closed the data connection at offset {at}")]
    UpstreamClosed {
        /// The offset of the next record expected.
        at: u64,
    },
    /// A record header failed to decode.
    #[error("bad record header at offset {at}: {error}")]
    Record {
        /// The offset of the next record expected.
        at: u64,
        /// The decoding error.
        error: ka_core::codec::DecodeError,
    },
    /// A request that makes no sense (a non-directory for tar, a bad offset).
    #[error("{0}")]
    Invalid(String),
    /// A written copy does not match the source's digest.
    #[error("the written image does not match the source (digest {got}, expected {expected}): the copy is corrupt")]
    DigestMismatch {
        /// The source's digest.
        expected: digest::ImageDigest,
        /// The digest of what was read back.
        got: digest::ImageDigest,
    },
    /// The data-plane worker thread is gone after an earlier error.
    #[error("the disk writer failed earlier: {0}")]
    WriterFailed(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
