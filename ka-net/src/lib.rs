//! ka-net: the tokio shell and data path of ka.
//!
//! ka-core decides who streams which byte range to whom; this crate does it:
//! sockets, threads, files and clocks. It has three rooms, each using only
//! the ones before it:
//!
//! - [`image`]: what the bytes are. The zero-block rule ([`BLOCK`],
//!   [`is_zero`]), [`sources`](image::sources) that read an image as records
//!   (files and block devices with their holes, commands, tar, stdin),
//!   [`sinks`](image::sinks) that write one, the session
//!   [`digest`](image::digest), [`packed`](image::packed) streams
//!   (Zstandard on the wire, `ka serve --compress`), block-device checks,
//!   command supervision, atomic file replacement.
//! - [`datapath`]: how the bytes move. The node's receiving thread
//!   ([`relay`]) and [`NodeWriter`] (sink, hasher thread, buffer pool),
//!   sending a file that may still grow ([`send_growing`]), and forwarding
//!   straight from the receiving thread ([`datapath::forward`]).
//! - [`shell`]: who decides when. One driver per ka-core machine
//!   ([`shell::run_source`], [`shell::run_node`]) owns the machine and the
//!   shell's state, feeds it sockets, timers and data-path progress, and
//!   carries out its actions; one task per connection, reaped when it
//!   ends; what an unauthenticated peer may hold is bounded ([`shell::gate`]),
//!   and control connections keep their heartbeats through short outages
//!   ([`shell::tcp`]). The keys (the session's root, each node's own, the
//!   digest's) and the files they travel in are [`shell::key`];
//!   authenticated discovery is [`shell::discovery`]; ka-core decides what
//!   is proved with which key.
//!
//! Beside them: [`system`] describes a running machine's disks and rebuilds
//! them on a node's (`--system`), [`tftp`] serves boot files, [`fuzz`]
//! drives every decoder of outside bytes from arbitrary input for fuzzers,
//! and [`Error`] is every operation's error.
//!
//! # A byte's trip
//!
//! `ka serve --image disk.img` hashes the file in a pass of its own
//! ([`digest_file`]) while the nodes join. A node's data connection gets
//! [`send_growing`] over the file: each extent goes out by `sendfile(2)`,
//! zero blocks as `Zero` headers only. On the node the connection's socket
//! is handed to [`relay`]'s receiving thread, which reads the bytes into a
//! pooled buffer, writes them to the [`ImageSink`] and sends them on to each
//! downstream that keeps up; the buffer then goes to the hasher thread and
//! back to the pool. A downstream that falls behind is served with
//! [`send_growing`] from the node's own file. At `End` the node reads its
//! copy back ([`verify_readback`]) and reports the digest; the [`datapath`]
//! docs show a node's part in code.
//!
//! # Design decisions
//!
//! - **No hashing on the streaming path.** Every byte is hashed once on the
//!   source and once on every node, and on two cores the copies alone nearly
//!   fill both. A file source is hashed in its own pass and its digest
//!   follows the stream; a stream source is hashed as it is spooled (it can
//!   be read once); a node hashes whole buffers on a thread behind the
//!   receiving thread.
//! - **Bounded memory.** A node's buffers are [`BUF_SIZE`] (1 MiB),
//!   page-aligned, at most 8 of them, reused once written and hashed: no
//!   allocation per block, and at most 8 MiB of image in memory whatever
//!   the image size.
//! - **Downstreams are served from disk.** A node forwards from the page
//!   cache its writer just filled, by `sendfile(2)`, so neither a repair nor
//!   a slow downstream is limited by a memory buffer. A downstream that
//!   keeps up is fed by the receiving thread itself: one `sendmsg` per piece
//!   instead of a task wakeup, an `lseek`, a zero probe and two sends.
//! - **Few wakeups per piece.** The receiving thread receives, writes and
//!   forwards; the upstream socket is outside the runtime's `epoll`; a piece
//!   is written when its buffer fills or [`FORWARD_DELAY`] after its first
//!   byte, so a hop costs milliseconds on a slow link and nothing on a fast
//!   one.
//! - **`read` and `pwrite`, not `splice`, on a node.** A node must hash what
//!   it writes; `splice` keeps the bytes out of user space and hashing them
//!   back costs more than the copy saves.
//! - **Zeros per 64 KiB block.** Small enough to find the free space of a
//!   used file system, large enough that headers are noise; a data block is
//!   rejected at its first non-zero bytes.
//! - **State in structs, inputs as methods.** Each driver keeps what it
//!   tracks beside the machine (writer loans, durable records, pacing) in
//!   plain structs with unit tests.
//!
//! # Measurements
//!
//! `scripts/bench` runs the real `ka serve` and `ka join` on loopback
//! against a plain socket copy and a copy whose receiver also hashes;
//! `examples/dataplane_alternatives.rs` measures the alternatives to each
//! choice above. `docs/performance.md` holds the numbers.
#![warn(missing_docs)]

pub mod datapath;
mod error;
pub mod fuzz;
pub mod image;
pub mod shell;
pub mod system;
pub mod tftp;

pub use datapath::{rehash_written, verify_readback};
pub use datapath::{
    relay, send_growing, NodeWriter, Payload, RelayEnd, RelayEvent, SendEnd, Written, BUF_SIZE,
    FORWARD_DELAY,
};
pub use error::Error;
pub use image::digest::{digest_file, digest_source, DigestKey, ImageHasher};
pub use image::sinks::{open_sink, ImageSink, SinkSpec};
pub use image::sources::{open_source, ImageSource, SourceSpec};
pub use image::{is_zero, write_atomically, BLOCK};
pub use shell::key::{NodeKey, SessionKey};
