//! ka-core: the ka cloning protocol as pure state machines.
#![forbid(unsafe_code)]

pub mod codec;
pub mod record;
