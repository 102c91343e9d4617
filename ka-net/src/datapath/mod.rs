//! How image bytes move: the node's receiving thread and writer, sending
//! to a downstream, and forwarding from the receiving thread.

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
