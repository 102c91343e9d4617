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
//! - [`send_image`] streams a source to a socket; [`send_growing`] serves a
//!   file that is still being written (a node's target, a source's spool),
//!   following the writer; [`relay()`] receives from an upstream socket into
//!   a [`NodeWriter`] (sink and digest), reporting [`RelayEvent`]s as it goes.
//! - [`ImageHasher`] computes the session digest; [`digest_file`] is the
//!   source's own pass over a file image; [`verify_readback`] re-reads a
//!   written target and checks it against the source's digest.
//!
//! A node's drive loop, in short:
//!
//! ```no_run
//! # async fn node(up: tokio::net::TcpStream, mut down: tokio::net::TcpStream,
//! #               key: ka_net::SessionKey, size: u64) -> Result<(), ka_net::Error> {
//! use ka_net::*;
//! let sink = open_sink(&SinkSpec::File("/dev/sda".into()), Some(size))?;
//! let mut writer = NodeWriter::new(sink, ImageHasher::new(&key))?;
//! // The downstream is served from what this node has written, as it grows.
//! let (written, follow) = tokio::sync::watch::channel(Written::default());
//! let from_disk = source::FileSource::open_sized("/dev/sda".as_ref(), Some(size))?;
//! let serve = tokio::spawn(async move { send_growing(from_disk, &mut down, follow, None, |_| {}).await });
//! // Progress comes from the receiving thread: it publishes straight to the server.
//! let publish = written.clone();
//! let end = relay(&up, &[], &mut writer, None, move |RelayEvent::Written(offset)| {
//!     publish.send_modify(|w| w.upto = offset); // and report progress to the core
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
//! **Where the hashing happens.** Every byte is hashed once on the source and
//! once on every node; neither pass may sit on the streaming path, because
//! on a machine with two cores for source and node together (and on a node
//! that also forwards) the copies alone nearly fill both.
//!
//! - A *file or block device* source hashes in a pass of its own
//!   ([`digest_file`]), started as soon as `ka serve` starts: it runs while
//!   the nodes join, and beside the stream if they are already there. The
//!   stream itself goes out by `sendfile(2)` and never waits for it; the
//!   digest (`ImageDone`) follows when the pass ends. An image changed after
//!   it was hashed fails every node with "digest differs" rather than
//!   producing copies of a torn image.
//! - A *stream* source (command, tar, stdin) is hashed inline as it is
//!   spooled, since it can be read only once.
//! - A *node* hashes on a thread of its own, a whole buffer at a time,
//!   behind the receiving thread that reads the socket and writes the disk
//!   (see [`relay()`]): the socket is drained at the rate of receiving and
//!   writing, and the hash follows on the other core.
//!
//! **Buffers.** A node's buffers are [`BUF_SIZE`] = 1 MiB, page-aligned,
//! allocated once per node in a pool of 8 and reused only after they are
//! both written and hashed: no allocation
//! per block, and at most 8 MiB of image data in memory whatever the image
//! size (peak RSS of a node ~14 MiB, 4 GiB image included). 4 MiB buffers
//! and 256 KiB buffers measured no better.
//!
//! **Forwarding.** A node serves each downstream from what it has written,
//! with `sendfile(2)` from the page cache the writer just filled, in one
//! stream per downstream that follows the writer ([`send_growing`]). The
//! same path serves a late or resumed downstream from disk, so neither a
//! repair nor a slow downstream is limited by a memory buffer. On a slow
//! link, while a downstream keeps up, its serving task lends its socket to
//! the receiving thread, which sends each piece on itself right after
//! writing it ([`direct`]): one non-blocking `sendmsg` instead of a task
//! wakeup, an `lseek`, a zero probe and two sends. The thread never waits
//! for a downstream; one that falls behind gets its socket back (mid-record
//! if need be) and is served from the file again until it catches up.
//!
//! **Per-hop delay.** The receive side decides how long a byte waits at
//! each hop. The receiving thread writes (and forwards) the bytes gathered
//! in its buffer when the buffer is full *or* [`FORWARD_DELAY`] (2 ms)
//! after the first of them came, and publishes each write on the node's
//! `written` watch for the serving tasks that are not caught up. On a fast
//! link buffers fill long before the deadline; on a 100 Mbit/s link a hop
//! costs a few milliseconds instead of a whole buffer's time twice over
//! (170 ms measured in the lab before).
//!
//! **Wakeups per piece.** On a 100 Mbit/s link a node forwards a piece of
//! 16 KiB or more about every 1.5 ms, and in the development VM a node's
//! extra CPU over a plain relay came to about 0.12 ms per extra context
//! switch (both counted; docs/lab.md). The first design moved each piece
//! through six thread handoffs (receive task, writer thread, hasher thread,
//! back, a reader thread, the sending task) and a node used five times the
//! CPU of a plain read-write-forward loop. Now a piece costs none: the
//! receiving thread receives, writes and forwards it; the hasher wakes once
//! per 1 MiB buffer; the upstream socket is taken out of the runtime's
//! `epoll` (left there, each arriving packet woke a runtime thread for
//! nothing: four wakeups per piece). The receiving thread reads before it
//! polls, so a busy socket costs no `poll` at all. On a fast link (buffers
//! fill before their deadline) the socket's `SO_RCVLOWAT` is 64 KiB while a
//! piece is open, so the thread wakes per 64 KiB rather than per segment.
//! On a slow link it wakes once the open piece is complete: it holds a
//! millisecond of the link (at least 16 KiB; `SO_RCVLOWAT` is set to what
//! is missing), or its deadline has come, as long as what arrives meanwhile
//! fits half of the socket's receive buffer (so the sender never waits for
//! the window). A piece is stored in full before it is forwarded, so its
//! length in time is what each hop adds: pieces cut by the 2 ms deadline
//! alone came out near 3.5 ms long on a busy machine, and 16 lab nodes lost
//! about 3 ms more per hop than with pieces cut by their bytes
//! (docs/lab.md). Raising `SO_RCVLOWAT` would let Linux clamp the receive
//! window to it, but not on a socket whose buffer size was set by hand, as
//! the upstream's is.
//!
//! **Copy path.** Measured on loopback (`examples/dataplane_alternatives.rs`
//! has every variant): `sendfile(2)` on the sending side cuts the sender's
//! CPU to about a third of a `read`/`write` loop's, so every file-backed
//! sender uses it. On the receiving side splice(2) socket → pipe → file saves
//! the copy into user space, but a node must hash the bytes and splice keeps
//! them out of user space: hashing them back through a mapping or a read of
//! the page cache cost more than the copy saved. So a node receives with
//! `read` into its buffer, writes it with `pwrite` and hashes the same buffer.
//!
//! **Zeros.** Zero detection works per 64 KiB block: small enough to find the
//! free space of a used file system, large enough that headers are noise. A
//! data block is rejected after its first non-zero bytes, so the check costs
//! nothing on real data.
//!
//! # Measurements
//!
//! `scripts/bench` runs the real `ka serve` and `ka join` processes on
//! loopback against a plain socket copy, and against the same copy with a
//! hashing thread added to its receiver (the least work any verifying
//! receiver does), and prints one table; see `tests/benches/clone.rs` for
//! what each row means and `docs/performance.md` for the numbers and what
//! was tried. On this project's 2-core machine ka's one hop runs at the
//! hashed copy's speed (0.95–1.01 × it), and the hash alone takes the
//! plain copy to 0.63–0.74 of its speed. On one machine, every process of
//! a scenario shares the same two cores, so a chain of N nodes is bound by
//! the CPU of N nodes and says little about a chain on N machines, where each
//! node has its own cores and a chain runs at about the speed of one hop.
#![warn(missing_docs)]

pub mod datapath;
mod error;
pub mod image;
pub mod shell;
pub mod tftp;

pub use datapath::{rehash_written, verify_readback};
pub use datapath::{
    relay, send_growing, NodeWriter, RelayEnd, RelayEvent, SendEnd, Written, BUF_SIZE,
    FORWARD_DELAY,
};
pub use error::Error;
pub use image::digest::{digest_file, digest_source, ImageHasher, SessionKey};
pub use image::sinks::{open_sink, ImageSink, SinkSpec};
pub use image::sources::{open_source, ImageSource, SourceSpec};
pub use image::{is_zero, write_atomically, BLOCK};
