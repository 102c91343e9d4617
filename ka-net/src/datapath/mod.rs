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
//! these functions and hears their progress.

pub mod forward;
mod pool;
pub mod receive;
pub mod send;
pub mod writer;

#[cfg(test)]
mod tests;

pub use ka_core::config::FORWARD_DELAY;
pub use pool::BUF_SIZE;
pub use receive::{relay, RelayEnd, RelayEvent};
pub use send::{send_growing, SendEnd, Written};
pub use writer::{rehash_written, verify_readback, NodeWriter};
