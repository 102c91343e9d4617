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
//!    image, a disk error, a timeout. `now` is a [`time::Time`] the caller
//!    supplies; so are the nonces of challenges (fresh random bytes in the
//!    shell, a seeded generator in the simulator).
//! 2. After each input, drain the outputs until each returns `None`:
//!    `poll_transmit()` gives `(ConnId, Message)` pairs to send, in order,
//!    on their connection; `poll_action()` gives instructions for the data
//!    plane and the shell (serve offset O to node N on connection C, connect
//!    to the upstream, close, read back, exit); `poll_event()` gives what
//!    happened, for logs and the display.
//! 3. Last, `poll_timeout()` gives the next deadline with a short reason;
//!    call `handle_timeout(now)` when it passes. It may change after any
//!    input.
//!
//! Carrying out an action may itself feed the machine: a node whose sink
//! fails to open, or is busy when a read-back is asked for, reports it with
//! [`node::Node::handle_sink_error`], which queues a
//! [`codec::Message::Failed`] for the source, then `Close`s and an `Exit`.
//! So **transmits are drained again before a `Close` or an `Exit` is carried
//! out**: a connection writes every frame handed to it before it closes (a
//! `Refused` before its `Close`, say), and a node hands over what it owes the
//! source (`Failed`, `Verified`) before it leaves. ka-net's node shell drains
//! transmits before every action it carries out and, on `Exit`, gives its
//! connections a moment to write before the process ends; its source shell,
//! whose actions never feed the machine, drains them once before the actions
//! (the source has no `Exit`: its session ends with
//! [`source::SourceEvent::Finished`] or [`source::SourceEvent::Aborted`]).
//!
//! # The drive loop
//!
//! ```no_run
//! use ka_core::codec::Message;
//! use ka_core::ids::ConnId;
//! use ka_core::node::{Node, NodeAction, NodeEvent};
//! use ka_core::time::Time;
//!
//! /// An input, as the shell's sockets, data plane and clock produce it.
//! enum Input {
//!     Message(ConnId, Message),
//!     Closed(ConnId),
//!     SinkFailed(String),
//!     Timeout,
//! }
//!
//! /// The I/O around the machine.
//! trait Shell {
//!     /// Waits for the next input, or for `deadline`; returns it with the time.
//!     fn wait(&mut self, deadline: Option<Time>) -> (Time, Input);
//!     /// Hands `msg` to the writer of `conn`, behind what it already holds.
//!     fn send(&mut self, conn: ConnId, msg: Message);
//!     /// Carries out an action; what fails is fed back to `node`.
//!     fn carry_out(&mut self, node: &mut Node, action: NodeAction);
//!     fn log(&mut self, event: NodeEvent);
//! }
//!
//! /// Drives `node` until it leaves; returns whether its copy verified.
//! fn drive(node: &mut Node, shell: &mut impl Shell) -> bool {
//!     loop {
//!         // Transmits before every action: carrying one out may feed the
//!         // node, and what that queues must be on its way before a `Close`
//!         // or an `Exit` that follows.
//!         loop {
//!             while let Some((conn, msg)) = node.poll_transmit() {
//!                 shell.send(conn, msg);
//!             }
//!             match node.poll_action() {
//!                 Some(NodeAction::Exit { ok, .. }) => {
//!                     while let Some(event) = node.poll_event() {
//!                         shell.log(event);
//!                     }
//!                     return ok; // the shell lets its writers finish
//!                 }
//!                 Some(action) => shell.carry_out(node, action),
//!                 None => break,
//!             }
//!         }
//!         while let Some(event) = node.poll_event() {
//!             shell.log(event);
//!         }
//!         let deadline = node.poll_timeout().map(|(at, _why)| at);
//!         match shell.wait(deadline) {
//!             (now, Input::Message(conn, msg)) => node.handle_message(now, conn, msg),
//!             (now, Input::Closed(conn)) => node.handle_closed(now, conn),
//!             (now, Input::SinkFailed(reason)) => node.handle_sink_error(now, reason),
//!             (now, Input::Timeout) => node.handle_timeout(now),
//!         }
//!     }
//! }
//! ```
//!
//! # Connections
//!
//! Connections are named by the shell with [`ids::ConnId`]s. Every connection
//! starts with a [`codec::Message::Challenge`] from the accepting side; the
//! first message of the connecting side says what it is: a
//! [`codec::Message::Join`] (a node's control connection), a
//! [`codec::Message::DataHello`] (a data connection from a downstream, after
//! which raw [`record`]s flow), a [`codec::Message::Go`] (an operator), or a
//! [`codec::Message::JoinFailed`] (a node that cannot start, saying why).
//! Each carries the connecting side's own nonce and a MAC with its key over
//! the challenge's nonce and the message ([`auth`]), so strangers are
//! refused before they get a place or a byte.
//!
//! Authentication is mutual: the accepting side's first sealed answer (a
//! welcome, a data acceptance, a go's acknowledgement) proves its key over
//! the connecting side's nonce, and nothing it says is acted on before that.
//! Every message after the handshake travels sealed
//! ([`codec::Message::Sealed`], [`auth::Channel`]) with keys of that
//! connection and a count of the messages each way, so none can be forged,
//! replayed, reordered or dropped unseen. Keys are per node: the source
//! holds the session's root and derives each node's key from its name; a
//! node holds only its own, and proves a data link with the ticket its
//! placement hands it. The callers pass fresh random nonces for both sides
//! (`handle_connected`, `handle_source_connected`,
//! `handle_upstream_connected`) and a fresh run for each source process
//! ([`config::SourceConfig::run`]).
//!
//! # What keeps repair always possible
//!
//! Offsets only flow downstream, and the source never drops a byte it read:
//! it serves any offset of its image (a file or device is read again; a
//! stream is spooled to disk as it is read, and the spool is never trimmed
//! while the session runs). A node whose sink can be read back (a file, a
//! block device) serves its downstreams any offset it wrote. A node whose
//! sink cannot (one that unpacks the stream onto fresh file systems as it
//! arrives, [`config::NodeConfig::readable`] false) keeps only a bounded
//! window of the stream, whose start it says in its join and then in each
//! progress report ([`codec::Join::holds_from`],
//! [`codec::Progress::holds_from`]), and refuses a downstream that asks for
//! less ([`codec::RefusalCode::CannotResume`]).
//!
//! So a node may be fed by an upstream that holds its offset
//! ([`source::Source::holds`]), or by the source, which holds everything;
//! every placement picks the first if it can and the second otherwise:
//!
//! - at the start, the chain (or tree) is laid out as usual, and a node
//!   whose upstream in it does not hold its prefix is fed by the source;
//! - a node that arrives (late, or after a restart) goes to the first open
//!   slot ([`topology::Topology::open_slots`]) if that holds what it has,
//!   else under the source;
//! - when a node dies or is dropped, [`topology::Topology::remove`] hands
//!   its children to its own parent; a child that parent cannot feed from
//!   its offset goes under the source;
//! - a slow node moved to the tail goes under the tail if that holds its
//!   offset, else under the source, and its children are handed on as for
//!   a death.
//!
//! The source's view may lag: a window moves on between two reports, and
//! an upstream's data plane stops serving a downstream that falls more than
//! its window behind. Then the downstream's next
//! [`codec::Message::DataHello`] is refused with `CannotResume`; it tells
//! the source once for that placement ([`codec::Message::Stranded`]) and
//! waits instead of knocking again, and the source moves it, with the nodes
//! it feeds, under itself at a new epoch, telling the old upstream it no
//! longer feeds it. A report about a placement older than the node's
//! current upstream is ignored (that upstream is on its way to it), and a
//! node told of a newer placement that keeps the upstream that refused it
//! asks once more, so a report crossing a placement is never lost. Each
//! node resumes from its own offset; the source may so feed more than
//! `arity` children.
//!
//! # Restarts
//!
//! A node's copy outlives its place and its process. A node that loses its
//! source (connection closed, or silent for `dead_after`; for
//! [`config::NodeConfig::source_wait`] once its copy is checked, since its
//! release is to come on the connection it has) leaves its place —
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
//! downstream a reconnect delay, and the data its upstream gathers meanwhile
//! would stand queued before it to the end of the stream.
//!
//! # Modules
//!
//! - [`codec`]: frames and messages; [`record`]: the data-connection framing.
//! - [`source`], [`node`]: the two machines; [`topology`]: the tree;
//!   [`range_set`]: offsets held; [`config`]: every timeout and policy.
//! - [`auth`]: keys, proofs and sealed connections; [`time`], [`ids`]: the value types;
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
