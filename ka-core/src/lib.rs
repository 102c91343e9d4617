//! ka-core: the ka cloning protocol as pure state machines.
//!
//! ka clones one machine (the *source*) onto many *nodes* by streaming an
//! image through a chain (or a tree) of TCP connections: each node writes
//! what it receives and forwards the same bytes downstream. This crate holds
//! the whole protocol — who joins, when to start, who feeds whom, what to do
//! when a node dies or lags, when a copy counts as verified — and none of the
//! I/O. It never touches a socket, a file, a thread or a clock, and bulk image
//! bytes never pass through it: it tells the data plane which byte range to
//! move where, and the data plane reports offsets back.
//!
//! # The calling contract
//!
//! [`source::Source`] (the coordinator, which also feeds the head of the
//! chain) and [`node::Node`] have one shape:
//!
//! 1. Feed every input through a `handle_*(now, …)` method: a connection
//!    opened or closed, a decoded [`codec::Message`] on a connection, a
//!    progress report from the data plane, how much of the image can be
//!    served (all of a file at once; a stream as it spools), the end of the
//!    image, a disk error, a timeout. `now` is a [`time::Time`] the caller supplies; so are
//!    the nonces of challenges (fresh random bytes in the shell, a seeded
//!    generator in the simulator).
//! 2. After each input, drain the outputs until each returns `None`:
//!    `poll_transmit()` gives `(ConnId, Message)` pairs to encode and send;
//!    `poll_action()` gives instructions for the data plane and the shell
//!    (serve offset O to node N on connection C, connect to the upstream,
//!    close, read back, exit); `poll_event()` gives what happened, for logs
//!    and the display.
//! 3. Last, `poll_timeout()` gives the next deadline with a short reason;
//!    call `handle_timeout(now)` when it passes. It may change after any input.
//!
//! Connections are named by the shell with [`ids::ConnId`]s. Every connection
//! starts with a [`codec::Message::Challenge`] from the accepting side; the
//! first message of the connecting side says what it is: a
//! [`codec::Message::Join`] (a node's control connection), a
//! [`codec::Message::DataHello`] (a data connection from a downstream, after
//! which raw [`record`]s flow), or a [`codec::Message::Go`] (an operator).
//! Each carries a MAC over the challenge's nonce made with the session
//! secret ([`auth`]), so strangers are refused before they get a place or a
//! byte.
//!
//! # What keeps repair always possible
//!
//! Offsets only flow downstream, and no upstream ever drops what it holds:
//! the source serves any offset of its image (a file or device is read
//! again; a stream is spooled to disk as it is read), and a node serves its
//! downstreams from what it wrote. So when a node dies, its nearest live
//! ancestor holds everything its children still lack, and
//! [`topology::Topology::remove`] links them there; each resumes from its own
//! offset, and a node that arrives late or restarts may be placed anywhere.
//!
//! # Restarts
//!
//! A node's copy outlives its place and its process. A node that loses its
//! source (connection closed, or silent for `dead_after`) leaves its place —
//! it closes its data connections, since a source that comes back may be a
//! new process laying out a new chain — keeps what it holds, and keeps
//! reconnecting for [`config::NodeConfig::source_wait`]. A node process
//! started again is handed the prefix its shell found durable on disk
//! ([`node::Resume`]). Either way its [`codec::Join`] says how much it holds
//! (`have`) and of which image ([`codec::ImageId`]); the source's
//! [`codec::Message::Welcome`] names the image it serves and where the copy
//! goes on from: `have` when the image is the same, else 0, and the node
//! starts over ([`node::NodeAction::StartOver`]). Its upstream then serves it
//! only from there (`DataHello.from`).
//!
//! A source started again on the same image knows nothing of the session
//! but what its shell kept: the outcomes already decided
//! ([`source::Source::handle_restored`]). Rejoining nodes count towards
//! `expected_nodes`, and the chain it lays out puts the nodes holding most
//! nearest to it, so every upstream holds what its downstream lacks; nodes
//! that had verified say so again. A topology generation ([`ids::Epoch`])
//! only orders messages within one source's conversation: a node forgets its
//! epoch when it loses its source (it is welcomed only after that), since a
//! new source counts from the start.
//!
//! The source tells a node and its new upstream of their link on two
//! different connections, so the upstream may hear a `DataHello` before its
//! own `Topology`. A hello that proves the secret and names an epoch newer
//! than the upstream's is therefore held unanswered until the upstream's
//! placement for that epoch arrives (then accepted, or refused if the
//! placement does not name that node) or `dead_after` passes (refused):
//! [`node::NodeEvent::DownstreamEarly`]. Refusing it at once would cost the
//! downstream a reconnect delay, and the data its upstream gathered
//! meanwhile would stand queued before it to the end of the stream (the
//! lab measured 110–170 ms at one hop of 16, about 3 % of the run).
//!
//! # Modules
//!
//! - [`codec`]: frames and messages; [`record`]: the data-connection framing.
//! - [`source`], [`node`]: the two machines; [`topology`]: the tree;
//!   [`range_set`]: offsets held; [`config`]: every timeout and policy.
//! - [`auth`]: proofs of the secret; [`time`], [`ids`]: the value types;
//!   [`units`]: sizes and rates as operators write them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod config;
pub mod ids;
pub mod node;
pub mod range_set;
pub mod record;
pub mod source;
pub mod time;
mod timer;
pub mod topology;
pub mod units;
