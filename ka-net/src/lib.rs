//! ka-net: the tokio shell and data plane of ka.
