//! Deterministic, seeded many-node simulations of the ka protocol.
//!
//! One thread, one event queue ordered by (time, sequence), one seeded
//! generator split per purpose: the same seed gives the same run, byte for
//! byte, which [`world::Outcome::trace_hash`] lets a run check of itself. The
//! real ka-core machines (source and nodes) run unchanged over a simulated
//! switched network and disks ([`world`]), with faults drawn from a seeded
//! swarm ([`faults`]). Its links are calibrated against the real data plane:
//! image data moves at the payload share of the port rate (1448 of every
//! 1514 bytes at MTU 1500), and each relaying node adds the hop latency plus
//! twice ka-net's 2 ms forward delay, so a fault-free chain of N nodes takes
//! the image's payload time plus N − 1 such hops. Checkers run after every event (the tree is a tree, a
//! chain stays a simple path, data flows only downstream, offsets only grow,
//! nobody copies data its upstream does not hold) and at the end (every
//! survivor's copy equals the source's, every failure is named, the run
//! finished within its bound). A run may make every node one that keeps only
//! a bounded window of the stream ([`SimConfig::window`]), so the repairs
//! that need the source to step in are exercised too.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod world;

pub use world::faults;
pub use world::{run, Faults, Outcome, SimConfig};
