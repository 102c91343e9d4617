//! ka-net: the tokio shell and data plane of ka.
#![warn(missing_docs)]

pub mod tftp;
