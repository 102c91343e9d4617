//! Deterministic many-node simulations of the ka protocol.
fn main() {}
