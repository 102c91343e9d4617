//! How image bytes move.
//!
//! - [`receive`]: a node's receiving thread ([`relay`]) reads its upstream,
//!   writes each piece through the [`NodeWriter`] and forwards it.
//! - [`writer`]: the node's sink and running digest, its hasher thread, and
//!   the read-back passes over a written copy.
//! - [`send`]: [`send_growing`] serves a file that may still be growing
//!   (a source's image or spool, a node's target) to one downstream.
//! - [`forward`]: the downstreams a receiving thread feeds directly while
//!   they keep up.
//! - `pool`: the page-aligned buffers that bound a node's memory.
//!
//! Bytes never pass through the shell: it hands sockets and the writer to
//! these functions and hears their progress. A node's data path, in short:
//!
//! ```no_run
//! # async fn node(up: tokio::net::TcpStream, mut down: tokio::net::TcpStream,
//! #               key: ka_net::DigestKey, size: u64) -> Result<(), ka_net::Error> {
//! use ka_net::*;
//! let sink = open_sink(&SinkSpec::File("/dev/sda".into()), Some(size))?;
//! let mut writer = NodeWriter::new(sink, ImageHasher::new(&key))?;
//! // The downstream is served from what this node has written, as it grows.
//! let (written, follow) = tokio::sync::watch::channel(Written::default());
//! let from_disk = image::sources::FileSource::open_sized("/dev/sda".as_ref(), Some(size))?;
//! let serve = tokio::spawn(async move { send_growing(from_disk, &mut down, follow, None, Payload::Lent, |_| {}).await });
//! let publish = written.clone();
//! let end = relay(&up, &[], &mut writer, None, move |RelayEvent::Written(offset)| {
//!     publish.send_modify(|w| w.upto = offset);
//! })
//! .await?; // on error: reconnect and relay again from writer.position()
//! written.send_replace(Written { upto: end.size, size: Some(end.size) });
//! let (sink, _) = writer.into_parts().await?;
//! // A writer made with a hasher ends with the stream's digest.
//! let digest = end.digest.expect("a hashing writer");
//! verify_readback(sink.as_ref(), &key, &digest)?;
//! # Ok(()) }
//! ```

pub mod forward;
mod pool;
pub mod receive;
pub mod send;
pub mod window;
pub mod writer;

#[cfg(test)]
mod tests;

pub use ka_core::config::FORWARD_DELAY;
pub use pool::BUF_SIZE;
pub use receive::{relay, RelayEnd, RelayEvent};
pub use send::{send_growing, Payload, SendEnd, Written};
pub use writer::{rehash_written, verify_readback, NodeWriter};
