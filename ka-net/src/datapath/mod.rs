//! How image bytes move: the node's receiving thread and writer, sending
//! to a downstream, and forwarding from the receiving thread.

pub mod forward;
pub mod receive;

pub use receive::{
    relay, send_growing, send_image, NodeWriter, RelayEnd, RelayEvent, SendEnd, Written, BUF_SIZE,
    FORWARD_DELAY,
};
