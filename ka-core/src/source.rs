//! The source side: the coordinator of a session, which also feeds the head
//! of the chain.
//!
//! It admits nodes (checking version, session and the proof of each node's
//! own key, which it derives from the root for the name the node claims),
//! decides when to start, lays out the chain, watches heartbeats and
//! progress, relinks around dead or slow nodes, collects each node's check of
//! its copy, releases nodes and keeps the final report.
//!
//! # Restarts
//!
//! A node that rejoins says how much of the image it holds and of which
//! image ([`Join::have`], [`Join::image`]); the source lets it keep that
//! prefix when the image is the one it serves (its welcome says
//! `resume_from`), and whoever feeds it serves it only from there. A rejoin
//! under a live name supersedes the old connection, and a node keeps its
//! identifier and its report line across rejoins.
//!
//! A source started again on the same image (a new process: it knows nothing
//! of the session) admits the nodes coming back exactly like first joins, but
//! with their prefixes: they count towards `expected_nodes`, and the chain
//! it lays out puts the nodes holding most nearest to the source, so every
//! upstream holds at least what its downstream lacks. Nodes that had already
//! verified and left (or failed) are handed in by the shell from its record
//! ([`Source::handle_restored`]) so the report still accounts for them.
//!
//! # Bounded-window nodes
//!
//! A node whose sink cannot be read back ([`Join::readable`] false) serves
//! only from the window it reports (in its join, [`Join::holds_from`], then
//! in its progress, [`Progress::holds_from`]), so every
//! placement asks [`Source::holds`] first and, where the upstream it would
//! pick does not hold the node's offset, feeds the node itself. A node its
//! upstream refused anyway (the window moved on since it last reported)
//! says so ([`Message::Stranded`]) and the source takes it in the same way.
//! The source itself never drops a byte it read, so it can always.
//!
//! # Authentication
//!
//! The source holds the session's root key ([`crate::auth`]). A join proves
//! the key of the node it names, and the connection's [`Channel`] derives
//! from that key and both nonces: every message on it after the join is
//! sealed both ways, and a message that does not open declares the node
//! dead (its connection is not the node's any more). Each placement hands
//! the node the ticket of its link, which its upstream (a node, or the
//! source's own data port) derives from its own key.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::auth::{
    check_data_hello, go_proof, join_failed_proof, join_proof, link_ticket, node_key, operator_key,
    source_data_key, tags_equal, Channel, DataRequest, Mac, Side,
};
use crate::codec::{
    Digest, Encoding, Join, JoinFailed, Message, Nonce, Progress, Refusal, RefusalCode, Upstream,
    PROTOCOL_VERSION,
};
use crate::config::{SlowPolicy, SourceConfig};
use crate::ids::{ConnId, Epoch, NodeId};
use crate::time::Time;
use crate::timer::{TimerKind, TimerTable};
use crate::topology::{Parent, Topology};

/// The longest log line the source keeps, in bytes: a longer one is cut
/// and says so, so one line cannot take a node's whole budget unseen.
pub const MAX_LOG_LINE: usize = 512;

/// `line`, or its first [`MAX_LOG_LINE`] bytes (at a character) followed
/// by how much was cut.
fn cut_log_line(line: String) -> String {
    if line.len() <= MAX_LOG_LINE {
        return line;
    }
    let mut end = MAX_LOG_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &line[..end], line.len() - end)
}

/// What the source waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Waiting for nodes to join (or for a go, or the join deadline).
    AwaitingNodes,
    /// Streaming: waiting for every node to verify its copy.
    Streaming,
    /// Every node is done; waiting for the releases to go out.
    Releasing,
    /// The session ended; the report is final.
    Finished,
    /// The session was aborted; the report is final.
    Aborted,
}

/// Why the stream started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTrigger {
    /// Every expected node joined.
    AllJoined,
    /// An operator said go.
    Go,
    /// The join deadline passed with enough nodes.
    Deadline,
}

/// An instruction for the source's data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Begin reading the image (sent once, at start).
    StartReading,
    /// Stream image records to this admitted data connection, from `from`.
    Serve {
        /// The data connection.
        conn: ConnId,
        /// The node it feeds.
        node: NodeId,
        /// The first offset to send.
        from: u64,
    },
    /// Close a connection: a refused stranger, a dead or dropped node, a child
    /// that moved elsewhere.
    Close {
        /// The connection.
        conn: ConnId,
    },
}

/// Something that happened, for logs, the progress display and the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// A node was admitted.
    Joined {
        /// Its identifier.
        node: NodeId,
        /// Its name.
        name: String,
        /// It had joined before (restart or reconnect).
        rejoin: bool,
        /// Where its copy goes on from: the prefix it holds of this image (0
        /// for a fresh start, or when what it held was of another image).
        resumed_from: u64,
        /// The prefix it claimed, when it was of another image and is
        /// discarded (0 otherwise).
        discarded: u64,
    },
    /// A connection was refused.
    Refused {
        /// The connection.
        conn: ConnId,
        /// Why.
        refusal: Refusal,
    },
    /// The stream started.
    Started {
        /// Nodes placed.
        nodes: u32,
        /// Why now.
        trigger: StartTrigger,
    },
    /// A node got a new upstream.
    Relinked {
        /// The node.
        node: NodeId,
        /// Its new upstream (`None`: the source).
        upstream: Parent,
    },
    /// A node was declared dead.
    Dead {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// A node's upstream no longer held what it lacked (it left that
    /// upstream's bounded window); the source feeds it now.
    Stranded {
        /// The node.
        node: NodeId,
        /// The upstream that refused it.
        upstream: NodeId,
        /// The offset it asked for.
        from: u64,
    },
    /// A node stayed too slow and the policy applied.
    Slow {
        /// The node.
        node: NodeId,
        /// What was done.
        policy: SlowPolicy,
    },
    /// A node reported the check of its copy.
    Verified {
        /// The node.
        node: NodeId,
        /// Whether its digest matched.
        ok: bool,
        /// Why not, when not.
        reason: String,
    },
    /// A node reported it cannot go on.
    Failed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// A node was released.
    Released {
        /// The node.
        node: NodeId,
    },
    /// The whole image has been read and its digest published.
    ImageDone {
        /// Its logical size.
        total: u64,
    },
    /// The session ended.
    Finished {
        /// Nodes verified OK.
        ok: u32,
        /// Nodes that failed.
        ko: u32,
    },
    /// The session was aborted.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Lines a node sent for its log, within its budget: its own events,
    /// its console. Long lines are cut ([`MAX_LOG_LINE`]); lines over the
    /// budget are dropped and one line of their count follows.
    NodeLog {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// The lines.
        lines: Vec<String>,
    },
    /// A node could not start and said why, proved with its key.
    JoinFailed(FailedBeforeJoin),
}

/// A node that reported it could not join ([`Message::JoinFailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedBeforeJoin {
    /// Its name.
    pub name: String,
    /// Its MAC address (all zeros when it did not know it).
    pub mac: [u8; 6],
    /// Why it could not join.
    pub reason: String,
    /// When the source heard it.
    pub at: Time,
}

impl FailedBeforeJoin {
    /// Its line in the final report, as node `id`.
    fn report_line(&self, id: NodeId) -> NodeReport {
        NodeReport {
            node: id,
            name: self.name.clone(),
            mac: self.mac,
            outcome: Some(Err(format!("failed before joining: {}", self.reason))),
            received: 0,
            joined_at: self.at,
            finished_at: Some(self.at),
            deaths: 0,
            resumed_from: 0,
            restored: false,
            released: false,
            failed_before_join: true,
        }
    }
}

/// A node's line in the final report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Its identifier.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// `Ok` once its copy verified; `Err` with the reason it failed; `None`
    /// while undecided.
    pub outcome: Option<Result<(), String>>,
    /// Bytes of the image it had received, as last reported.
    pub received: u64,
    /// When it first joined.
    pub joined_at: Time,
    /// When its outcome was decided.
    pub finished_at: Option<Time>,
    /// How many times it was declared dead (and came back, if it is OK).
    pub deaths: u32,
    /// Where its copy went on from at its latest join: more than 0 when it
    /// came back (after its own restart or the source's) holding a prefix.
    pub resumed_from: u64,
    /// Its outcome was decided under an earlier run of this source and it did
    /// not come back; the shell's record says so ([`Source::handle_restored`]).
    pub restored: bool,
    /// The source has released it (told it the session is over for it). A
    /// verified node that died before its release is still OK (its copy
    /// checked), but was not released: an administrator should look at it.
    pub released: bool,
    /// It never joined: it reported it could not start
    /// ([`Message::JoinFailed`]), and `outcome` says why.
    pub failed_before_join: bool,
}

impl NodeReport {
    /// Whether the node verified its copy.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Some(Ok(())))
    }
}

#[derive(Debug, Clone)]
struct NodeRecord {
    report: NodeReport,
    data_addr: core::net::SocketAddr,
    wait_release: bool,
    /// It serves any offset it wrote; otherwise only from
    /// `progress.holds_from`.
    readable: bool,
    /// The upstream its latest placement named, and the epoch since which
    /// it has named that one: a [`Message::Stranded`] about an older
    /// placement is stale, since a new upstream is on its way.
    upstream: Option<(Parent, Epoch)>,
    /// The control connection while the node is live.
    conn: Option<ConnId>,
    /// The data connection this source serves it on, if it is a child.
    data_conn: Option<ConnId>,
    progress: Progress,
    last_heard: Time,
    /// Where it and what it is judged against stood over about the last
    /// `slow_window`, oldest first: its rate is measured against its
    /// upstream's over that sliding window.
    rate_samples: VecDeque<RateSample>,
    /// The slow policy already acted on it.
    slow_handled: bool,
    /// The policy moved it to the tail as too slow: once the node feeding
    /// it has its own copy, the source takes it over rather than keep that
    /// node waiting for it.
    moved_as_slow: bool,
    /// Its log budget for the current second.
    log: LogBudget,
}

/// What a node has spent of its log budget ([`SourceConfig::log_bytes_per_sec`]).
#[derive(Debug, Clone, Copy, Default)]
struct LogBudget {
    /// When the current one-second window began.
    since: Time,
    /// Bytes taken in it.
    spent: u64,
    /// Lines dropped in it, told when it ends.
    dropped: u32,
}

impl NodeRecord {
    fn live(&self) -> bool {
        self.conn.is_some()
    }

    /// No longer waits for anything from the stream.
    fn settled(&self) -> bool {
        !self.live() || self.report.outcome.is_some()
    }
}

/// One point of a node's [`NodeRecord::rate_samples`].
#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Time,
    /// Whom it was judged against then: a new upstream starts anew.
    parent: Parent,
    /// How far that upstream (or the source's fastest other child) was.
    upstream: u64,
    /// How far the node was.
    received: u64,
}

/// A join [`Source::admit`] lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Admission {
    /// The live node of the same name whose place the join takes: declared
    /// dead first.
    supersedes: Option<NodeId>,
    /// The node's identifier when it joined before and is still known (a
    /// node superseded while the session awaits its nodes is forgotten, and
    /// its new join is a first one).
    rejoins: Option<NodeId>,
    /// Where its copy goes on from: the prefix it holds when that is of the
    /// image served here, else 0.
    have: u64,
}

#[derive(Debug, Clone, Copy)]
enum ConnRole {
    /// Challenged; the first message decides what it is.
    Challenged(Nonce),
    /// A node's control connection.
    Control(NodeId),
    /// A data connection feeding a node.
    Data(NodeId),
}

/// The source's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Heartbeats out, liveness checks in.
    Tick = 0,
    /// The join deadline.
    JoinDeadline = 1,
    /// The next paced release.
    Release = 2,
}

impl TimerKind<3> for Timer {
    const VALUES: [Timer; 3] = [Timer::Tick, Timer::JoinDeadline, Timer::Release];

    fn index(self) -> usize {
        self as usize
    }

    fn reason(self) -> &'static str {
        match self {
            Timer::Tick => "heartbeat tick",
            Timer::JoinDeadline => "join deadline",
            Timer::Release => "next release",
        }
    }
}

/// The source's protocol state machine.
///
/// Driven as the [crate root](crate#the-calling-contract) says: feed each
/// input through a `handle_*` method with the current time, then drain
/// `poll_transmit`, `poll_action` and `poll_event` until they return `None`,
/// and arm a timer for `poll_timeout`; when it fires call `handle_timeout`.
/// Its actions never feed it, so one drain of the transmits before the
/// actions suffices.
pub struct Source {
    config: SourceConfig,
    /// The session's root key: every node's key derives from it.
    key: Box<dyn Mac>,
    /// The key the tickets of links the source feeds derive from.
    data_key: Box<dyn Mac>,
    state: SourceState,
    conns: BTreeMap<ConnId, ConnRole>,
    /// The authenticated connections: a node's control connection once its
    /// join proved its key.
    channels: BTreeMap<ConnId, Channel>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    names: BTreeMap<String, NodeId>,
    /// Nodes that died while the session was still waiting for its nodes
    /// and have not come back, by name: no longer counted towards the start,
    /// but the report still names them (as failed).
    lost_before_start: BTreeMap<String, NodeReport>,
    /// Nodes that reported they could not join and have not joined since,
    /// by name: one entry per name, and only names whose key proved it, so
    /// bounded by the nodes the secret covers.
    failed_before_join: BTreeMap<String, (NodeId, FailedBeforeJoin)>,
    topology: Topology,
    epoch: Epoch,
    /// The stream's size and digest, and an encoded stream's image digest.
    image: Option<(u64, Digest, Option<Digest>)>,
    /// How far the image has been read.
    read: u64,
    release_queue: VecDeque<NodeId>,
    /// Live nodes whose outcome is undecided: the session ends at zero.
    unsettled: usize,
    timers: TimerTable<Timer, 3>,
    next_id: u32,
    transmits: VecDeque<(ConnId, Message)>,
    actions: VecDeque<SourceAction>,
    events: VecDeque<SourceEvent>,
}

impl Source {
    /// A source that starts waiting for nodes at `now`, holding the
    /// session's root `key` ([`crate::auth`]).
    pub fn new(now: Time, config: SourceConfig, key: Box<dyn Mac>) -> Self {
        let mut timers = TimerTable::new();
        timers.set(Timer::Tick, now + config.heartbeat);
        if let Some(t) = config.join_timeout {
            timers.set(Timer::JoinDeadline, now + t);
        }
        Source {
            topology: Topology::new(config.arity),
            config,
            data_key: source_data_key(&*key),
            key,
            state: SourceState::AwaitingNodes,
            conns: BTreeMap::new(),
            channels: BTreeMap::new(),
            nodes: BTreeMap::new(),
            names: BTreeMap::new(),
            lost_before_start: BTreeMap::new(),
            failed_before_join: BTreeMap::new(),
            epoch: Epoch(0),
            image: None,
            read: 0,
            release_queue: VecDeque::new(),
            unsettled: 0,
            timers,
            next_id: 1,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // ----- inputs -----

    /// A peer connected (on the control or data port); `nonce` must be fresh
    /// and unpredictable: the peer's proof will have to cover it.
    pub fn handle_connected(&mut self, _now: Time, conn: ConnId, nonce: Nonce) {
        self.conns.insert(conn, ConnRole::Challenged(nonce));
        self.send(
            conn,
            Message::Challenge {
                version: PROTOCOL_VERSION,
                nonce,
            },
        );
    }

    /// A message arrived on `conn`. On an authenticated connection it must
    /// open ([`Channel::open`]); one that does not declares the node dead.
    pub fn handle_message(&mut self, now: Time, conn: ConnId, msg: Message) {
        let Some(&role) = self.conns.get(&conn) else {
            return;
        };
        let msg = match self.channels.get_mut(&conn) {
            None => msg,
            Some(channel) => match channel.open(msg) {
                Ok(msg) => msg,
                Err(e) => {
                    let reason = format!("its connection failed authentication: {e}");
                    if let ConnRole::Control(id) = role {
                        self.declare_dead(now, id, reason);
                    }
                    if self.conns.contains_key(&conn) {
                        self.forget_conn(conn);
                    }
                    return;
                }
            },
        };
        match (role, msg) {
            (ConnRole::Challenged(nonce), Message::Join(join)) => {
                self.on_join(now, conn, nonce, *join)
            }
            (
                ConnRole::Challenged(server_nonce),
                Message::Go {
                    session,
                    nonce,
                    proof,
                },
            ) => {
                let operator = operator_key(&*self.key);
                if session != self.config.session
                    || !tags_equal(
                        &proof,
                        &go_proof(&*operator, &server_nonce, &session, &nonce),
                    )
                {
                    self.refuse(
                        conn,
                        RefusalCode::BadProof,
                        "go refused: wrong session, or not the session secret (a node's key cannot start a session)".into(),
                    );
                    return;
                }
                let started = self.state == SourceState::AwaitingNodes && self.live_count() > 0;
                if started {
                    self.start(now, StartTrigger::Go);
                }
                let nodes = self.live_count() as u32;
                self.channels.insert(
                    conn,
                    Channel::new(&*operator, &server_nonce, &nonce, Side::Server),
                );
                self.send(conn, Message::GoAck { started, nodes });
                self.forget_conn(conn);
            }
            (ConnRole::Challenged(nonce), Message::JoinFailed(report)) => {
                self.on_join_failed(now, conn, nonce, *report)
            }
            (ConnRole::Challenged(nonce), hello @ Message::DataHello { .. }) => {
                self.on_data_hello(conn, nonce, hello)
            }
            (ConnRole::Control(id), msg) => self.on_node_message(now, id, msg),
            (_, other) => {
                let detail = format!("unexpected message {:?} at this point", other.name());
                self.refuse(conn, RefusalCode::NotExpected, detail);
            }
        }
    }

    /// A connection closed (or failed).
    pub fn handle_closed(&mut self, now: Time, conn: ConnId) {
        self.channels.remove(&conn);
        match self.conns.remove(&conn) {
            Some(ConnRole::Control(id)) => {
                let record = self.nodes.get_mut(&id).filter(|r| r.conn == Some(conn));
                if let Some(r) = record.filter(|r| r.report.released) {
                    // A released node leaving is the expected end, not a death.
                    r.conn = None;
                } else if self.nodes.get(&id).is_some_and(|r| r.conn == Some(conn)) {
                    self.declare_dead(now, id, "control connection lost".into());
                }
            }
            Some(ConnRole::Data(id)) => {
                if let Some(r) = self.nodes.get_mut(&id) {
                    if r.data_conn == Some(conn) {
                        r.data_conn = None;
                    }
                }
            }
            _ => {}
        }
    }

    /// An operator on this machine said go (Ka-deploy's `-g`).
    pub fn handle_go(&mut self, now: Time) {
        if self.state == SourceState::AwaitingNodes && self.live_count() > 0 {
            self.start(now, StartTrigger::Go);
        }
    }

    /// The data plane has read the image up to `offset`: what the source
    /// can serve so far. A stream reports its spool's growth; a file or
    /// device is all there from the start, so report its size once before
    /// anything else. The slow policy judges the source's own children by it.
    pub fn handle_image_progress(&mut self, _now: Time, offset: u64) {
        self.read = self.read.max(offset);
    }

    /// A node whose outcome was decided under an earlier run of this source
    /// (the shell keeps a record across restarts): verified, or failed and
    /// why. It keeps its report line (and its name: no other node takes its
    /// place), and if it comes back its join replaces the line. A verified
    /// one counts towards the nodes the start waits for; a failed one only
    /// once it rejoins (it may have been declared dead just before the
    /// restart). Call before any join.
    pub fn handle_restored(
        &mut self,
        now: Time,
        name: String,
        mac: [u8; 6],
        outcome: Result<(), String>,
    ) {
        if self.state != SourceState::AwaitingNodes || self.names.contains_key(&name) {
            return;
        }
        let id = NodeId(self.next_id);
        self.next_id += 1;
        let received = if outcome.is_ok() {
            self.config.image_size.unwrap_or(0)
        } else {
            0
        };
        let record = NodeRecord {
            report: NodeReport {
                node: id,
                name: name.clone(),
                mac,
                outcome: Some(outcome),
                received,
                joined_at: now,
                finished_at: Some(now),
                deaths: 0,
                resumed_from: received,
                restored: true,
                released: true,
                failed_before_join: false,
            },
            data_addr: self.config.data_addr,
            wait_release: false,
            readable: true,
            upstream: None,
            conn: None,
            data_conn: None,
            progress: Progress {
                received,
                written: received,
                holds_from: 0,
            },
            last_heard: now,
            rate_samples: VecDeque::new(),
            slow_handled: true,
            moved_as_slow: false,
            log: LogBudget::default(),
        };
        self.nodes.insert(id, record);
        self.names.insert(name, id);
        if self.present() >= self.config.expected_nodes {
            self.start(now, StartTrigger::AllJoined);
        }
    }

    /// The data plane reached the end of the stream and computed its
    /// digest; an encoded stream's unpacked image has `image_digest`
    /// (which its nodes' copies are checked by), a plain one `None`.
    pub fn handle_image_done(
        &mut self,
        now: Time,
        total: u64,
        digest: Digest,
        image_digest: Option<Digest>,
    ) {
        if self.image.is_some() {
            return;
        }
        self.read = total;
        self.image = Some((total, digest, image_digest));
        self.events.push_back(SourceEvent::ImageDone { total });
        let conns: Vec<ConnId> = self.nodes.values().filter_map(|r| r.conn).collect();
        for c in conns {
            self.send_image_done(c);
        }
        self.check_complete(now);
    }

    /// Tells the node on `conn` the stream's end, once it is known.
    fn send_image_done(&mut self, conn: ConnId) {
        if let Some((total, digest, image_digest)) = self.image {
            let done = Message::ImageDone {
                total,
                digest,
                image_digest,
            };
            self.send(conn, done);
        }
    }

    /// The image could not be read: nothing can succeed any more.
    pub fn handle_image_failed(&mut self, now: Time, reason: String) {
        self.abort(now, format!("the image could not be read: {reason}"));
    }

    /// A deadline from [`Source::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(late) = self.timers.overdue(Timer::Tick, now) {
            self.tick(now, late);
        }
        if self.timers.expire(Timer::JoinDeadline, now) && self.state == SourceState::AwaitingNodes
        {
            let live = self.present();
            if live >= self.config.min_nodes.max(1) {
                self.start(now, StartTrigger::Deadline);
            } else {
                self.abort(
                    now,
                    format!(
                        "only {live} of {} nodes joined before the join deadline (at least {} needed): \
                         check that the nodes reach this source and use its session and secret",
                        self.config.expected_nodes, self.config.min_nodes
                    ),
                );
            }
        }
        if self.timers.expire(Timer::Release, now) {
            self.release_next(now);
        }
    }

    // ----- outputs -----

    /// The next control message to send, and on which connection.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Message)> {
        self.transmits.pop_front()
    }

    /// The next instruction for the data plane.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// The next thing that happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// When to call [`Source::handle_timeout`] next, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        if matches!(self.state, SourceState::Finished | SourceState::Aborted) {
            return None;
        }
        self.timers.next().map(|(t, timer)| (t, timer.reason()))
    }

    // ----- views -----

    /// What the source waits for now.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// The current data-flow tree.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The current topology generation.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether `node` is connected and not declared dead.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(NodeRecord::live)
    }

    /// The last progress `node` reported.
    pub fn progress(&self, node: NodeId) -> Option<Progress> {
        self.nodes.get(&node).map(|r| r.progress)
    }

    /// Whether `parent` can feed a node from `offset`, as far as the source
    /// knows: the source always (it keeps everything it read); a node that
    /// serves any offset it wrote always; a node that keeps a bounded
    /// window only from where that window started at its last report (its
    /// join, or a progress report since). Every placement asks this; where
    /// the answer is no, the source feeds the node itself.
    pub fn holds(&self, parent: Parent, offset: u64) -> bool {
        let Some(n) = parent else {
            return true;
        };
        self.nodes
            .get(&n)
            .is_some_and(|r| r.readable || offset >= r.progress.holds_from)
    }

    /// The report, one line per node that ever joined, in identifier order
    /// (a node that died before the start and never came back included).
    pub fn report(&self) -> Vec<NodeReport> {
        let mut report: Vec<NodeReport> = self
            .nodes
            .values()
            .map(|r| r.report.clone())
            .chain(self.lost_before_start.values().cloned())
            .chain(
                self.failed_before_join
                    .values()
                    .map(|(id, f)| f.report_line(*id)),
            )
            .collect();
        report.sort_by_key(|r| r.node);
        report
    }

    /// The name `node` joined with (or reported failing to join under), if
    /// it ever did: what a log line about it should call it.
    pub fn name(&self, node: NodeId) -> Option<&str> {
        if let Some(r) = self.nodes.get(&node) {
            return Some(&r.report.name);
        }
        if let Some(r) = self.lost_before_start.values().find(|r| r.node == node) {
            return Some(&r.name);
        }
        self.failed_before_join
            .values()
            .find(|(id, _)| *id == node)
            .map(|(_, f)| f.name.as_str())
    }

    /// The nodes that reported they could not join and have not joined
    /// since, by name.
    pub fn failed_before_join(&self) -> impl Iterator<Item = &FailedBeforeJoin> + '_ {
        self.failed_before_join.values().map(|(_, f)| f)
    }

    /// The session's configuration.
    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    // ----- internals -----

    fn live_count(&self) -> usize {
        self.nodes.values().filter(|r| r.live()).count()
    }

    /// The nodes that count towards the start: those joined (while awaiting
    /// nodes, the dead are forgotten) and those restored as verified. A node
    /// restored as failed may be about to come back, so it waits to be counted
    /// until it does.
    fn present(&self) -> u32 {
        let failed = self
            .failed_before_join
            .keys()
            .filter(|name| !self.names.contains_key(*name))
            .count();
        (self
            .nodes
            .values()
            .filter(|r| r.live() || (r.report.restored && r.report.is_ok()))
            .count()
            + failed) as u32
    }

    /// Whether the whole image can be served (read to its end, or a file of
    /// known size reported readable).
    fn image_readable(&self) -> bool {
        self.image.is_some() || self.config.image_size.is_some_and(|s| self.read >= s)
    }

    fn refuse(&mut self, conn: ConnId, code: RefusalCode, detail: String) {
        let refusal = Refusal::new(code, detail);
        self.send(conn, Message::Refused(refusal.clone()));
        self.events
            .push_back(SourceEvent::Refused { conn, refusal });
        self.forget_conn(conn);
    }

    /// Queues `msg` for `conn`, sealed if the connection is authenticated.
    fn send(&mut self, conn: ConnId, msg: Message) {
        let msg = match self.channels.get_mut(&conn) {
            Some(channel) => channel.seal(msg),
            None => msg,
        };
        self.transmits.push_back((conn, msg));
    }

    /// Forgets `conn` and closes it (after what was queued for it).
    fn forget_conn(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.channels.remove(&conn);
        self.actions.push_back(SourceAction::Close { conn });
    }

    /// Decides whether a join is let in and how, or why not (the refusal's
    /// detail is for the node's operator). Changes nothing:
    /// [`Source::on_join`] carries the decision out. The proof is checked
    /// with the key of the node the join names, so a node's key admits it
    /// under its own name only.
    fn admit(&self, nonce: &Nonce, join: &Join) -> Result<Admission, Refusal> {
        let refuse = |code, detail| Err(Refusal::new(code, detail));
        if join.version != PROTOCOL_VERSION {
            let detail = format!(
                "node speaks protocol v{}, this source v{PROTOCOL_VERSION}: run the same ka version on both",
                join.version
            );
            return refuse(RefusalCode::VersionMismatch, detail);
        }
        if join.session != self.config.session {
            let detail = format!(
                "node asked for session {:?}, this source serves {:?}: pass --session {:?}",
                join.session, self.config.session, self.config.session
            );
            return refuse(RefusalCode::WrongSession, detail);
        }
        let key = node_key(&*self.key, &join.name);
        if !tags_equal(&join.proof, &join_proof(&*key, nonce, join)) {
            let detail = format!(
                "the key of node {:?} does not match this session's: give the node the source's secret file, or its own key (ka key derive --name {:?})",
                join.name, join.name
            );
            return refuse(RefusalCode::BadProof, detail);
        }
        if matches!(
            self.state,
            SourceState::Releasing | SourceState::Finished | SourceState::Aborted
        ) {
            return refuse(RefusalCode::SessionOver, "the session is over".into());
        }
        let known = self.names.get(&join.name).copied();
        // A node that restarts faster than its death is noticed proves with
        // its key that it is the same node; the old connection is a zombie.
        let supersedes = known.filter(|id| self.nodes[id].live());
        // Unless it joins from another machine: that is a second node under
        // the same name (cloned machines share a host name, ka join's
        // default), and letting it in would evict the first, back and forth.
        if let Some(id) = supersedes {
            let held = self.nodes[&id].data_addr.ip();
            if held != join.data_addr.ip() {
                let detail = format!(
                    "a live node named {:?} joined from {held}: give every node its own name (ka join --name)",
                    join.name
                );
                return refuse(RefusalCode::NameInUse, detail);
            }
        }
        // Its death forgets it while the session awaits its nodes: it then
        // joins as new, in the place it leaves.
        let forgotten = supersedes.is_some() && self.state == SourceState::AwaitingNodes;
        let rejoins = known.filter(|_| !forgotten);
        if rejoins.is_none() {
            let admitted = self.nodes.len() - usize::from(forgotten);
            if admitted as u32 >= self.config.expected_nodes {
                let detail = format!(
                    "the session already has its {} nodes: start this node in a later session",
                    self.config.expected_nodes
                );
                return refuse(RefusalCode::SessionFull, detail);
            }
        }
        // A prefix counts only if it is of the image served here (a restarted
        // source on a changed file, or another image, must not be mixed in).
        let same_image = join.image == Some(self.config.image_id)
            && self.config.image_size.is_none_or(|s| join.have <= s);
        Ok(Admission {
            supersedes,
            rejoins,
            have: if same_image { join.have } else { 0 },
        })
    }

    /// Carries out [`Source::admit`]'s decision on a join: refuses it, or
    /// records the node, welcomes it and places it.
    fn on_join(&mut self, now: Time, conn: ConnId, nonce: Nonce, join: Join) {
        let Admission {
            supersedes,
            rejoins: existing,
            have,
        } = match self.admit(&nonce, &join) {
            Ok(admission) => admission,
            Err(Refusal { code, detail }) => return self.refuse(conn, code, detail),
        };
        if let Some(old) = supersedes {
            self.declare_dead(
                now,
                old,
                "superseded by a new join under the same name".into(),
            );
        }
        debug_assert_eq!(existing, self.names.get(&join.name).copied());
        // The death of the node superseded may have ended the stream.
        let parent = (self.state == SourceState::Streaming).then(|| self.place_for(have));
        let id = existing.unwrap_or_else(|| {
            let id = NodeId(self.next_id);
            self.next_id += 1;
            id
        });
        let rejoin = existing.is_some();
        let deaths = existing.map_or(0, |id| self.nodes[&id].report.deaths);
        let record = NodeRecord {
            report: NodeReport {
                node: id,
                name: join.name.clone(),
                mac: join.mac,
                outcome: None,
                received: have,
                joined_at: existing.map_or(now, |id| self.nodes[&id].report.joined_at),
                finished_at: None,
                deaths,
                resumed_from: have,
                restored: false,
                released: false,
                failed_before_join: false,
            },
            data_addr: join.data_addr,
            wait_release: join.wait_release,
            // A node unpacking an encoded stream keeps only a window of it,
            // whatever its target.
            readable: join.readable && self.config.encoding == Encoding::Plain,
            upstream: None,
            conn: Some(conn),
            data_conn: None,
            progress: Progress {
                received: have,
                written: have,
                // A node starting over (its prefix was of another image)
                // keeps its window from 0 again.
                holds_from: if join.readable || have == 0 {
                    0
                } else {
                    join.holds_from
                },
            },
            last_heard: now,
            rate_samples: VecDeque::new(),
            slow_handled: false,
            moved_as_slow: false,
            log: LogBudget {
                since: now,
                ..LogBudget::default()
            },
        };
        // Any earlier record of this name was settled (dead) by now.
        self.nodes.insert(id, record);
        self.lost_before_start.remove(&join.name);
        self.failed_before_join.remove(&join.name);
        self.unsettled += 1;
        self.names.insert(join.name.clone(), id);
        self.conns.insert(conn, ConnRole::Control(id));
        // Its welcome is the first message sealed with the connection's
        // keys: the source's proof, over the node's nonce, that it holds
        // the node's key too.
        let key = node_key(&*self.key, &join.name);
        self.channels
            .insert(conn, Channel::new(&*key, &nonce, &join.nonce, Side::Server));
        self.send(
            conn,
            Message::Welcome {
                node: id,
                heartbeat_ms: self.config.heartbeat.as_millis() as u32,
                dead_after_ms: self.config.dead_after.as_millis() as u32,
                image_size: self.config.image_size,
                image: self.config.image_id,
                resume_from: have,
                run: self.config.run,
                encoding: self.config.encoding,
            },
        );
        self.events.push_back(SourceEvent::Joined {
            node: id,
            name: join.name,
            rejoin,
            resumed_from: have,
            discarded: join.have - have,
        });
        self.send_image_done(conn);
        if let Some(parent) = parent {
            self.topology.attach(id, parent);
            self.bump_epoch();
            self.send_topology(id);
            self.send_topology_to_parent(parent);
            self.events.push_back(SourceEvent::Relinked {
                node: id,
                upstream: parent,
            });
        } else if self.state == SourceState::AwaitingNodes
            && self.present() >= self.config.expected_nodes
        {
            self.start(now, StartTrigger::AllJoined);
        }
    }

    /// Where a newcomer goes: the first place with room in breadth-first
    /// order (for a chain, the tail).
    fn open_slot(&self) -> Parent {
        self.topology.open_slots().next().unwrap_or(None)
    }

    /// Where a node that holds `offset` bytes is fed from now: the first
    /// open slot if that holds what it lacks, else the source.
    fn place_for(&self, offset: u64) -> Parent {
        let slot = self.open_slot();
        if self.holds(slot, offset) {
            slot
        } else {
            None
        }
    }

    /// `nodes` were just handed to `parent` (their upstream left, or was
    /// moved away): those `parent` cannot feed from where they are go under
    /// the source. Returns each node with the upstream it ends with.
    fn hand_over(&mut self, nodes: &[NodeId], parent: Parent) -> Vec<(NodeId, Parent)> {
        nodes
            .iter()
            .map(|&n| {
                if self.holds(parent, self.nodes[&n].progress.received) {
                    (n, parent)
                } else {
                    self.topology.relink(n, None);
                    (n, None)
                }
            })
            .collect()
    }

    fn on_data_hello(&mut self, conn: ConnId, server_nonce: Nonce, hello: Message) {
        let checked = check_data_hello(
            &*self.data_key,
            &self.config.run,
            &server_nonce,
            &self.config.session,
            hello,
        );
        let (
            DataRequest {
                node,
                epoch,
                from,
                nonce,
            },
            ticket,
        ) = match checked {
            Ok(request) => request,
            Err((code, detail)) => return self.refuse(conn, code, detail),
        };
        if self.topology.parent(node) != Some(None) || !self.is_live(node) {
            return self.refuse(
                conn,
                RefusalCode::NotExpected,
                format!("{node} is not fed by the source at {epoch}"),
            );
        }
        let record = self.nodes.get_mut(&node).expect("live child has a record");
        if let Some(old) = record.data_conn.replace(conn) {
            self.forget_conn(old);
        }
        self.conns.insert(conn, ConnRole::Data(node));
        // Sealed with the link's keys: the node takes no record before it
        // knows the other end holds its ticket. Raw records follow, so the
        // channel has done its work.
        let mut channel = Channel::new(&*ticket, &server_nonce, &nonce, Side::Server);
        self.transmits
            .push_back((conn, channel.seal(Message::DataAccepted { from })));
        self.actions
            .push_back(SourceAction::Serve { conn, node, from });
    }

    fn on_node_message(&mut self, now: Time, id: NodeId, msg: Message) {
        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };
        record.last_heard = now;
        match msg {
            Message::Progress(p) => self.on_progress(now, id, p),
            Message::Verified { ok, reason } => {
                let record = self.nodes.get_mut(&id).expect("checked");
                if record.report.outcome.is_some() {
                    return;
                }
                record.report.outcome = Some(if ok {
                    Ok(())
                } else {
                    Err(format!("verification failed: {reason}"))
                });
                record.report.finished_at = Some(now);
                self.unsettled -= 1;
                if ok {
                    record.report.received = self.image.map_or(record.report.received, |(t, ..)| t);
                }
                self.events.push_back(SourceEvent::Verified {
                    node: id,
                    ok,
                    reason,
                });
                self.settle(now, Some(id));
            }
            Message::Failed { reason } => {
                self.events.push_back(SourceEvent::Failed {
                    node: id,
                    reason: reason.clone(),
                });
                self.remove_node(now, id, format!("node failed: {reason}"));
            }
            Message::Stranded { epoch, from } => self.on_stranded(id, epoch, from),
            Message::Heartbeat => {}
            Message::Log { lines } => self.on_log(now, id, lines),
            other => {
                let reason = format!(
                    "protocol violation: unexpected {} from a joined node",
                    other.name()
                );
                self.declare_dead(now, id, reason);
            }
        }
    }

    /// Checks a node's report that it cannot join like a join (version,
    /// session, the proof of the key of the node it names) and records it,
    /// or refuses it like a join. The connection closes either way: the
    /// node has nothing more to say.
    fn on_join_failed(&mut self, now: Time, conn: ConnId, nonce: Nonce, report: JoinFailed) {
        if report.version != PROTOCOL_VERSION || report.session != self.config.session {
            let detail = format!(
                "a join failure for session {:?} v{}; this is {:?} v{PROTOCOL_VERSION}",
                report.session, report.version, self.config.session
            );
            return self.refuse(conn, RefusalCode::WrongSession, detail);
        }
        let key = node_key(&*self.key, &report.name);
        if !tags_equal(&report.proof, &join_failed_proof(&*key, &nonce, &report)) {
            let detail = format!(
                "a join failure from {:?} without its key: give the node the source's secret file, or its own key",
                report.name
            );
            return self.refuse(conn, RefusalCode::BadProof, detail);
        }
        // A node already live under that name is somebody else's business:
        // the report cannot be its, it is joined.
        if self
            .names
            .get(&report.name)
            .is_some_and(|id| self.nodes[id].live())
        {
            let detail = format!("node {:?} is joined", report.name);
            return self.refuse(conn, RefusalCode::NameInUse, detail);
        }
        let failed = FailedBeforeJoin {
            name: report.name.clone(),
            mac: report.mac,
            reason: report.reason,
            at: now,
        };
        let id = match self.failed_before_join.get(&report.name) {
            Some((id, _)) => *id,
            None => {
                let id = NodeId(self.next_id);
                self.next_id += 1;
                id
            }
        };
        self.failed_before_join
            .insert(report.name, (id, failed.clone()));
        self.events.push_back(SourceEvent::JoinFailed(failed));
        self.forget_conn(conn);
        // It counts towards the nodes the start waits for: it will not come.
        if self.state == SourceState::AwaitingNodes && self.present() >= self.config.expected_nodes
        {
            self.start(now, StartTrigger::AllJoined);
        }
        self.check_complete(now);
    }

    /// Takes a node's log lines within its budget: lines are cut to
    /// [`MAX_LOG_LINE`], and those over the second's budget are dropped and
    /// counted (told once the second ends).
    fn on_log(&mut self, now: Time, id: NodeId, lines: Vec<String>) {
        self.end_log_window(now, id);
        let budget = u64::from(self.config.log_bytes_per_sec);
        let record = self.nodes.get_mut(&id).expect("caller checked");
        let mut kept = Vec::new();
        for line in lines {
            let line = cut_log_line(line);
            let cost = line.len() as u64 + 1;
            if record.log.spent + cost > budget {
                record.log.dropped += 1;
            } else {
                record.log.spent += cost;
                kept.push(line);
            }
        }
        if !kept.is_empty() {
            let name = record.report.name.clone();
            self.events.push_back(SourceEvent::NodeLog {
                node: id,
                name,
                lines: kept,
            });
        }
    }

    /// Starts a new log window for `id` if its second is over, telling how
    /// many lines the last one dropped.
    fn end_log_window(&mut self, now: Time, id: NodeId) {
        let budget = self.config.log_bytes_per_sec;
        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };
        if now.saturating_since(record.log.since) < Duration::from_secs(1) {
            return;
        }
        let dropped = record.log.dropped;
        record.log = LogBudget {
            since: now,
            ..LogBudget::default()
        };
        if dropped > 0 {
            let name = record.report.name.clone();
            self.events.push_back(SourceEvent::NodeLog {
                node: id,
                name,
                lines: vec![format!(
                    "ka: {dropped} lines dropped (over the log budget of {budget} bytes/s)"
                )],
            });
        }
    }

    fn on_progress(&mut self, now: Time, id: NodeId, p: Progress) {
        let record = self.nodes.get_mut(&id).expect("caller checked");
        // Offsets only grow; a stale or reordered report must not move them back.
        record.progress.received = record.progress.received.max(p.received);
        record.progress.written = record.progress.written.max(p.written);
        record.progress.holds_from = record.progress.holds_from.max(p.holds_from);
        record.report.received = record.progress.received;
        self.check_slow(now, id);
    }

    /// `id`'s upstream refused it for want of data at the placement of
    /// `epoch`. Unless a newer placement already gave it another upstream,
    /// the source takes it in (with the nodes it feeds, which it can still
    /// serve), and the old upstream hears it no longer feeds it.
    fn on_stranded(&mut self, id: NodeId, epoch: Epoch, from: u64) {
        if self.state != SourceState::Streaming || epoch > self.epoch {
            return;
        }
        let Some(Some(upstream)) = self.topology.parent(id) else {
            return; // the source feeds it already, or it has no place
        };
        match self.nodes[&id].upstream {
            Some((Some(named), since)) if named == upstream && epoch >= since => {}
            _ => return,
        }
        self.events.push_back(SourceEvent::Stranded {
            node: id,
            upstream,
            from,
        });
        self.topology.relink(id, None);
        self.bump_epoch();
        self.send_topology(id);
        self.send_topology_to_parent(Some(upstream));
        self.events.push_back(SourceEvent::Relinked {
            node: id,
            upstream: None,
        });
    }

    fn check_slow(&mut self, now: Time, id: NodeId) {
        if self.state != SourceState::Streaming || self.config.slow_lag == 0 {
            return;
        }
        let Some(parent) = self.topology.parent(id) else {
            return;
        };
        // Children share their upstream's port, so each gets a share of
        // what it receives: a child is judged against its fastest sibling.
        // A lone child is judged against its upstream, or what a stream
        // source has read; one of a source holding the whole image cannot
        // be told from a slow source.
        let fastest_sibling = self
            .topology
            .children(parent)
            .iter()
            .filter(|&&c| c != id)
            .map(|c| self.nodes[c].progress.received)
            .max();
        let upstream_at = match (fastest_sibling, parent) {
            (Some(sibling), _) => sibling,
            (None, Some(p)) => self.nodes[&p].progress.received,
            (None, None) if self.image_readable() => 0,
            (None, None) => self.read,
        };
        let record = self.nodes.get_mut(&id).expect("placed nodes have records");
        if record.slow_handled || record.report.outcome.is_some() {
            return;
        }
        let window = self.config.slow_window;
        let sample = RateSample {
            at: now,
            parent,
            upstream: upstream_at,
            received: record.progress.received,
        };
        let samples = &mut record.rate_samples;
        // A new upstream, or one that fell back (the fastest sibling left),
        // is another yardstick: the window starts again.
        if samples
            .back()
            .is_some_and(|b| b.parent != parent || b.upstream > upstream_at)
        {
            samples.clear();
        }
        // A sample per eighth of the window at most, whatever a node sends;
        // only the newest one at least a window old is kept of the older.
        if samples
            .back()
            .is_none_or(|b| now.saturating_since(b.at) >= window / 8)
        {
            samples.push_back(sample);
        }
        while samples.len() >= 2 && now.saturating_since(samples[1].at) >= window {
            samples.pop_front();
        }
        // Lagging behind an upstream that has the data means the bottleneck is
        // this node (or its link), not anyone above it; a node that lags but
        // keeps pace (catching up after a repair, say) is not slow: only one
        // that receives at under 40 % of its yardstick's rate over the last
        // window is (a share of half a port is no fault).
        let first = samples[0];
        if upstream_at.saturating_sub(sample.received) <= self.config.slow_lag
            || now.saturating_since(first.at) < window
        {
            return;
        }
        let up_advance = upstream_at - first.upstream;
        let own_advance = sample.received.saturating_sub(first.received);
        if own_advance.saturating_mul(5) >= up_advance.saturating_mul(2) {
            return;
        }
        record.slow_handled = true;
        let policy = self.config.slow_policy;
        self.events
            .push_back(SourceEvent::Slow { node: id, policy });
        match policy {
            SlowPolicy::Keep => {}
            SlowPolicy::Drop => {
                let reason = format!(
                    "dropped: stayed more than {} bytes behind its upstream for {:?}",
                    self.config.slow_lag, self.config.slow_window
                );
                if let Some(conn) = self.nodes[&id].conn {
                    self.send(
                        conn,
                        Message::Abort {
                            reason: reason.clone(),
                        },
                    );
                }
                self.remove_node(now, id, reason);
            }
            SlowPolicy::MoveToTail => {
                let moved = self.nodes.get_mut(&id).expect("placed nodes have records");
                moved.moved_as_slow = true;
                if self.topology.children(Some(id)).is_empty() {
                    // Already a leaf: it slows nobody, but a verified
                    // upstream kept only for it can now go.
                    let upstream = self.topology.parent(id).flatten();
                    self.settle(now, upstream);
                    return;
                }
                let old_parent = self.topology.parent(id).expect("placed");
                let orphans = self.topology.remove(id);
                let orphans = self.hand_over(&orphans, old_parent);
                let slot = self.place_for(self.nodes[&id].progress.received);
                self.topology.attach(id, slot);
                self.bump_epoch();
                for (o, upstream) in orphans {
                    self.send_topology(o);
                    self.events
                        .push_back(SourceEvent::Relinked { node: o, upstream });
                }
                self.send_topology_to_parent(old_parent);
                self.send_topology(id);
                self.send_topology_to_parent(slot);
                self.events.push_back(SourceEvent::Relinked {
                    node: id,
                    upstream: slot,
                });
                // The tail may have its copy already.
                self.settle(now, slot);
            }
        }
    }

    /// The heartbeat tick, `late` after it was due.
    fn tick(&mut self, now: Time, late: Duration) {
        // Silence is counted in time the source was awake to hear: while it
        // was stalled, whatever the nodes sent waits unread in its sockets,
        // so a late tick moves every node's last word on by its lateness
        // rather than declaring the whole chain dead at once.
        if late > Duration::ZERO {
            for r in self.nodes.values_mut() {
                r.last_heard = (r.last_heard + late).min(now);
            }
        }
        self.timers.set(Timer::Tick, now + self.config.heartbeat);
        let flooded: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, r)| r.log.dropped > 0)
            .map(|(&id, _)| id)
            .collect();
        for id in flooded {
            self.end_log_window(now, id);
        }
        let dead_after = self.config.dead_after;
        let silent: Vec<(NodeId, Duration)> = self
            .nodes
            .iter()
            .filter(|(_, r)| r.live() && !r.report.released)
            .map(|(&id, r)| (id, now.saturating_since(r.last_heard)))
            .filter(|(_, quiet)| *quiet >= dead_after)
            .collect();
        for (id, quiet) in silent {
            self.declare_dead(
                now,
                id,
                format!("no heartbeat for {:.1} s", quiet.as_secs_f64()),
            );
        }
        let conns: Vec<ConnId> = self
            .nodes
            .values()
            .filter(|r| r.live())
            .filter_map(|r| r.conn)
            .collect();
        for c in conns {
            self.send(c, Message::Heartbeat);
        }
    }

    fn start(&mut self, now: Time, trigger: StartTrigger) {
        let mut live: Vec<&NodeRecord> = self.nodes.values().filter(|r| r.live()).collect();
        // Inventory order first, then by address, then by name: deterministic.
        let ranks: BTreeMap<&str, usize> = self
            .config
            .order
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let rank = |r: &NodeRecord| {
            ranks
                .get(r.report.name.as_str())
                .copied()
                .unwrap_or(usize::MAX)
        };
        // Nodes holding most go nearest the source (after a restart they hold
        // different prefixes), so every upstream holds what its downstream
        // lacks; on a fresh start all hold nothing and the order is the
        // inventory's.
        let held = |r: &NodeRecord| core::cmp::Reverse(r.progress.received);
        live.sort_by(|a, b| {
            (held(a), rank(a), a.data_addr, &a.report.name).cmp(&(
                held(b),
                rank(b),
                b.data_addr,
                &b.report.name,
            ))
        });
        let order: Vec<NodeId> = live.iter().map(|r| r.report.node).collect();
        self.topology = Topology::build(self.config.arity, &order);
        // A node keeping a bounded window may no longer hold what the next
        // one lacks (a restarted source's nodes hold different prefixes):
        // the source feeds that one itself.
        for &id in &order {
            if let Some(p @ Some(_)) = self.topology.parent(id) {
                if !self.holds(p, self.nodes[&id].progress.received) {
                    self.topology.relink(id, None);
                }
            }
        }
        self.state = SourceState::Streaming;
        self.timers.stop(Timer::JoinDeadline);
        self.bump_epoch();
        for &id in &order {
            self.send_topology(id);
        }
        self.actions.push_back(SourceAction::StartReading);
        self.events.push_back(SourceEvent::Started {
            nodes: order.len() as u32,
            trigger,
        });
        self.check_complete(now);
    }

    fn bump_epoch(&mut self) {
        self.epoch = Epoch(self.epoch.0 + 1);
    }

    /// Tells `id` its upstream and downstreams as of the current epoch.
    fn send_topology(&mut self, id: NodeId) {
        let placed = self.topology.parent(id);
        let epoch = self.epoch;
        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };
        if record.upstream.map(|(p, _)| p) != placed {
            record.upstream = placed.map(|p| (p, epoch));
        }
        let Some(conn) = record.conn else {
            return;
        };
        let run = self.config.run;
        let upstream = placed.map(|p| match p {
            None => Upstream {
                node: None,
                addr: self.config.data_addr,
                ticket: link_ticket(&*self.data_key, &run, id),
            },
            Some(n) => {
                let parent = &self.nodes[&n];
                let parent_key = node_key(&*self.key, &parent.report.name);
                Upstream {
                    node: Some(n),
                    addr: parent.data_addr,
                    ticket: link_ticket(&*parent_key, &run, id),
                }
            }
        });
        let downstreams = self.topology.children(Some(id)).to_vec();
        self.send(
            conn,
            Message::Topology {
                epoch: self.epoch,
                upstream,
                downstreams,
            },
        );
    }

    /// Tells a parent its new list of children; for the source itself, closes
    /// data connections to nodes it no longer feeds.
    fn send_topology_to_parent(&mut self, parent: Parent) {
        match parent {
            Some(p) => self.send_topology(p),
            None => {
                let children: BTreeSet<NodeId> =
                    self.topology.children(None).iter().copied().collect();
                let stale: Vec<(NodeId, ConnId)> = self
                    .nodes
                    .iter()
                    .filter(|(id, _)| !children.contains(id))
                    .filter_map(|(&id, r)| r.data_conn.map(|c| (id, c)))
                    .collect();
                for (id, c) in stale {
                    self.nodes.get_mut(&id).expect("listed").data_conn = None;
                    self.forget_conn(c);
                }
            }
        }
    }

    fn declare_dead(&mut self, now: Time, id: NodeId, reason: String) {
        let Some(record) = self.nodes.get(&id) else {
            return;
        };
        if !record.live() {
            return;
        }
        self.events.push_back(SourceEvent::Dead {
            node: id,
            reason: reason.clone(),
        });
        if self.state == SourceState::AwaitingNodes {
            // Death during the join: the node no longer counts towards the
            // start; if it comes back it joins again.
            let record = self.nodes.remove(&id).expect("checked");
            // A node a restarted source took back may have said its verdict
            // already: it was settled then, and its verdict stands.
            if record.report.outcome.is_none() {
                self.unsettled -= 1;
            }
            self.names.remove(&record.report.name);
            if let Some(c) = record.conn {
                self.forget_conn(c);
            }
            let mut report = record.report;
            if report.outcome.is_none() {
                report.outcome = Some(Err(format!(
                    "lost before the start ({reason}) and did not come back"
                )));
                report.finished_at = Some(now);
            }
            report.deaths += 1;
            self.lost_before_start.insert(report.name.clone(), report);
            return;
        }
        self.nodes.get_mut(&id).expect("checked").report.deaths += 1;
        self.remove_node(now, id, reason);
    }

    /// Takes a node out of the running: closes its connections, relinks its
    /// children to its upstream, and records why unless its copy was already
    /// verified.
    fn remove_node(&mut self, now: Time, id: NodeId, reason: String) {
        let record = self.nodes.get_mut(&id).expect("caller checked");
        if !record.settled() {
            self.unsettled -= 1;
        }
        let conn = record.conn.take();
        let data_conn = record.data_conn.take();
        if record.report.outcome.is_none() {
            record.report.outcome = Some(Err(reason));
            record.report.finished_at = Some(now);
        }
        for c in conn.into_iter().chain(data_conn) {
            self.forget_conn(c);
        }
        self.release_queue.retain(|&n| n != id);
        let mut parent = None;
        if let Some(p) = self.topology.parent(id) {
            parent = p;
            let orphans = self.topology.remove(id);
            let orphans = self.hand_over(&orphans, p);
            self.bump_epoch();
            for (o, upstream) in orphans {
                self.send_topology(o);
                self.events
                    .push_back(SourceEvent::Relinked { node: o, upstream });
            }
            self.send_topology_to_parent(p);
        }
        self.settle(now, parent);
    }

    /// Called when a node settled at or below `from`: releases whoever no
    /// longer serves anyone and ends the session when everyone has settled.
    fn settle(&mut self, now: Time, from: Parent) {
        if self.state != SourceState::Streaming {
            return;
        }
        // A verified node that does not wait for the session's end leaves as
        // soon as it feeds nobody, since no repair can need it any more; its
        // leaving may make its own upstream such a leaf in turn.
        let mut cur = from;
        while let Some(n) = cur {
            self.take_over_slow_children(n);
            let r = &self.nodes[&n];
            let leaf = self.topology.contains(n) && self.topology.children(Some(n)).is_empty();
            if r.wait_release || r.report.released || !r.live() || !r.report.is_ok() || !leaf {
                break;
            }
            cur = self.topology.parent(n).flatten();
            self.topology.remove(n);
            self.release(n);
        }
        self.check_complete(now);
    }

    /// When `n` has its copy and feeds only nodes moved to the tail as too
    /// slow, the source feeds those from where they are, so that `n` (and
    /// the verified nodes above it) can be released now instead of when
    /// the slowest of them ends: a slow node is as fast from the source as
    /// from anyone, and by now the source's upload has finished the chain.
    /// Only when the source can serve any offset.
    fn take_over_slow_children(&mut self, n: NodeId) {
        let r = &self.nodes[&n];
        if r.wait_release || r.report.released || !r.live() || !r.report.is_ok() {
            return;
        }
        if !self.topology.contains(n) || !self.image_readable() {
            return;
        }
        let children = self.topology.children(Some(n)).to_vec();
        let slow_only = children.iter().all(|c| {
            let c = &self.nodes[c];
            c.moved_as_slow && c.report.outcome.is_none()
        });
        if children.is_empty() || !slow_only {
            return;
        }
        for &c in &children {
            self.topology.relink(c, None);
        }
        self.bump_epoch();
        for &c in &children {
            self.send_topology(c);
            self.events.push_back(SourceEvent::Relinked {
                node: c,
                upstream: None,
            });
        }
        self.send_topology_to_parent(Some(n));
    }

    fn release(&mut self, n: NodeId) {
        let r = self.nodes.get_mut(&n).expect("caller checked");
        r.report.released = true;
        if let Some(c) = r.conn {
            self.send(c, Message::Release);
        }
        self.events.push_back(SourceEvent::Released { node: n });
    }

    fn check_complete(&mut self, now: Time) {
        if self.state != SourceState::Streaming || self.unsettled > 0 {
            return;
        }
        self.state = SourceState::Releasing;
        let order: Vec<NodeId> = self.topology.breadth_first().flatten().collect();
        let others: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|n| !self.topology.contains(*n))
            .collect();
        self.release_queue = order
            .into_iter()
            .chain(others)
            .filter(|n| self.nodes[n].live() && !self.nodes[n].report.released)
            .collect();
        self.release_next(now);
    }

    fn release_next(&mut self, now: Time) {
        if let Some(n) = self.release_queue.pop_front() {
            self.release(n);
        }
        if self.release_queue.is_empty() {
            self.finish();
        } else {
            self.timers
                .set(Timer::Release, now + self.config.release_delay);
        }
    }

    fn finish(&mut self) {
        self.state = SourceState::Finished;
        let ok = (self.nodes.values().map(|r| &r.report))
            .chain(self.lost_before_start.values())
            .filter(|r| r.is_ok())
            .count() as u32;
        let ko = (self.nodes.len() + self.lost_before_start.len() + self.failed_before_join.len())
            as u32
            - ok;
        self.events.push_back(SourceEvent::Finished { ok, ko });
    }

    fn abort(&mut self, now: Time, reason: String) {
        if matches!(self.state, SourceState::Finished | SourceState::Aborted) {
            return;
        }
        self.state = SourceState::Aborted;
        let mut conns = Vec::new();
        for r in self.nodes.values_mut() {
            if r.report.outcome.is_none() {
                r.report.outcome = Some(Err(format!("session aborted: {reason}")));
                r.report.finished_at = Some(now);
            }
            conns.extend(r.conn);
        }
        for c in conns {
            self.send(
                c,
                Message::Abort {
                    reason: reason.clone(),
                },
            );
        }
        self.events.push_back(SourceEvent::Aborted { reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::StandInKey;
    use crate::codec::{ImageId, Tag};

    const NONCE: Nonce = Nonce([5; 32]);

    #[test]
    fn every_timer_sits_at_its_own_index() {
        crate::timer::assert_indexed::<Timer, 3>();
    }

    fn addr() -> core::net::SocketAddr {
        "10.0.0.1:1".parse().unwrap()
    }

    fn source(expected: u32) -> Source {
        Source::new(
            Time::ZERO,
            SourceConfig::new("s", expected, addr()),
            Box::new(StandInKey(1)),
        )
    }

    /// A join of `name` proved with the source's key.
    fn join(name: &str) -> Join {
        Join {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            name: name.into(),
            mac: [0; 6],
            data_addr: addr(),
            wait_release: false,
            readable: true,
            have: 0,
            holds_from: 0,
            image: None,
            nonce: Nonce([6; 32]),
            proof: Default::default(),
        }
        .proved(&StandInKey(1))
    }

    trait Proved {
        /// This join, proved with the key `root` derives for its name.
        fn proved(self, root: &dyn Mac) -> Self;
    }

    impl Proved for Join {
        fn proved(mut self, root: &dyn Mac) -> Join {
            self.proof = join_proof(&*node_key(root, &self.name), &NONCE, &self);
            self
        }
    }

    /// Admits `name` on connection `conn`.
    fn joined(src: &mut Source, conn: u64, name: &str) {
        src.handle_connected(Time::ZERO, ConnId(conn), NONCE);
        src.handle_message(
            Time::ZERO,
            ConnId(conn),
            Message::Join(Box::new(join(name))),
        );
        assert!(src.names.contains_key(name), "{name} was not admitted");
    }

    /// The node's end of the control connection `joined` opened for `name`.
    fn node_channel(name: &str) -> Channel {
        let key = node_key(&StandInKey(1), name);
        Channel::new(&*key, &NONCE, &Nonce([6; 32]), Side::Client)
    }

    /// The lines of every `NodeLog` event queued, by node name.
    fn logged(src: &mut Source) -> Vec<(String, String)> {
        std::iter::from_fn(|| src.poll_event())
            .filter_map(|e| match e {
                SourceEvent::NodeLog { name, lines, .. } => Some((name, lines)),
                _ => None,
            })
            .flat_map(|(name, lines)| lines.into_iter().map(move |l| (name.clone(), l)))
            .collect()
    }

    #[test]
    fn a_joined_node_is_named_by_its_id() {
        let mut src = source(3);
        joined(&mut src, 1, "a");
        joined(&mut src, 2, "b");
        assert_eq!(src.name(NodeId(1)), Some("a"));
        assert_eq!(src.name(NodeId(2)), Some("b"));
        assert_eq!(src.name(NodeId(3)), None);
    }

    #[test]
    fn a_welcomed_nodes_log_lines_surface_with_its_name() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        let mut ch = node_channel("a");
        let log = Message::Log {
            lines: vec!["ka: a: joined as node 1".into(), "console: hello".into()],
        };
        src.handle_message(Time::ZERO, ConnId(1), ch.seal(log));
        assert_eq!(
            logged(&mut src),
            [
                ("a".to_string(), "ka: a: joined as node 1".to_string()),
                ("a".to_string(), "console: hello".to_string())
            ]
        );
        assert!(src.is_live(NodeId(1)));
    }

    #[test]
    fn log_lines_before_a_welcome_or_on_a_data_connection_are_refused() {
        let mut src = source(2);
        // In the clear, before any join.
        src.handle_connected(Time::ZERO, ConnId(1), NONCE);
        src.handle_message(
            Time::ZERO,
            ConnId(1),
            Message::Log {
                lines: vec!["forged".into()],
            },
        );
        let events: Vec<SourceEvent> = std::iter::from_fn(|| src.poll_event()).collect();
        assert!(
            matches!(&events[..], [SourceEvent::Refused { refusal, .. }] if refusal.code == RefusalCode::NotExpected),
            "{events:?}"
        );
        // On a data connection the source serves.
        joined(&mut src, 2, "a");
        joined(&mut src, 3, "b");
        let _ = std::iter::from_fn(|| src.poll_event()).count();
        let ticket = src
            .data_key
            .keyed(&link_ticket(&*src.data_key, &src.config.run, NodeId(1)).0);
        let hello = crate::auth::DataHello {
            session: "s".into(),
            node: NodeId(1),
            epoch: src.epoch,
            from: 0,
            nonce: Nonce([8; 32]),
        };
        src.handle_connected(Time::ZERO, ConnId(4), NONCE);
        src.handle_message(Time::ZERO, ConnId(4), hello.proved(&*ticket, &NONCE));
        assert!(matches!(src.conns.get(&ConnId(4)), Some(ConnRole::Data(_))));
        src.handle_message(
            Time::ZERO,
            ConnId(4),
            Message::Log {
                lines: vec!["forged".into()],
            },
        );
        assert!(logged(&mut src).is_empty());
        assert!(
            !src.conns.contains_key(&ConnId(4)),
            "the data connection stays"
        );
        // A log in the clear on a node's sealed connection does not open:
        // the connection is not the node's any more.
        src.handle_message(
            Time::ZERO,
            ConnId(2),
            Message::Log {
                lines: vec!["forged".into()],
            },
        );
        assert!(logged(&mut src).is_empty());
        assert!(!src.is_live(NodeId(1)));
    }

    #[test]
    fn a_flooding_node_gets_its_budget_per_second_and_one_note_of_the_rest() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        let _ = std::iter::from_fn(|| src.poll_event()).count();
        let budget = u64::from(src.config.log_bytes_per_sec);
        let mut ch = node_channel("a");
        let line = "x".repeat(99);
        // Ten times the budget within one second.
        let mut at = Time::ZERO;
        let mut kept = 0u64;
        for _ in 0..(10 * budget / 100 / crate::codec::MAX_LOG_LINES as u64) {
            let log = Message::Log {
                lines: vec![line.clone(); crate::codec::MAX_LOG_LINES],
            };
            src.handle_message(at, ConnId(1), ch.seal(log));
            kept += logged(&mut src)
                .iter()
                .map(|(_, l)| l.len() as u64 + 1)
                .sum::<u64>();
            at = at + Duration::from_millis(1);
        }
        assert!(kept <= budget, "{kept} bytes taken, budget {budget}");
        assert!(kept > budget - 200, "{kept} bytes taken, budget {budget}");
        // The second ends: one line tells what was dropped.
        src.handle_timeout(Time::ZERO + Duration::from_millis(1250));
        let notes = logged(&mut src);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].1.contains("lines dropped"), "{notes:?}");
        let dropped: u64 = notes[0].1.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(dropped * 100 + kept, 10 * budget / 100 / 32 * 32 * 100);
    }

    #[test]
    fn an_overlong_log_line_is_cut_and_says_so() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        let mut ch = node_channel("a");
        let log = Message::Log {
            lines: vec!["é".repeat(MAX_LOG_LINE)],
        };
        src.handle_message(Time::ZERO, ConnId(1), ch.seal(log));
        let lines = logged(&mut src);
        assert_eq!(lines.len(), 1);
        let (kept, note) = lines[0].1.split_once('…').expect("cut");
        assert!(kept.len() <= MAX_LOG_LINE);
        assert_eq!(
            note,
            format!(" [{} bytes cut]", 2 * MAX_LOG_LINE - kept.len())
        );
    }

    fn join_failed(name: &str, root: &dyn Mac) -> Message {
        let mut report = JoinFailed {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            name: name.into(),
            mac: [2; 6],
            reason: "target is a directory".into(),
            nonce: Nonce([6; 32]),
            proof: Tag::default(),
        };
        report.proof = join_failed_proof(&*node_key(root, name), &NONCE, &report);
        Message::JoinFailed(Box::new(report))
    }

    #[test]
    fn a_proved_join_failure_is_reported_counted_and_lets_the_others_start() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        src.handle_connected(Time::ZERO, ConnId(2), NONCE);
        src.handle_message(Time::ZERO, ConnId(2), join_failed("b", &StandInKey(1)));
        let events: Vec<SourceEvent> = std::iter::from_fn(|| src.poll_event()).collect();
        assert!(events.iter().any(|e| matches!(e, SourceEvent::JoinFailed(f)
            if f.name == "b" && f.reason == "target is a directory" && f.mac == [2; 6])));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SourceEvent::Started { nodes: 1, .. })),
            "the failed node counts towards the start: {events:?}"
        );
        let report = src.report();
        let b = report
            .iter()
            .find(|r| r.name == "b")
            .expect("b is reported");
        assert!(b.failed_before_join && !b.is_ok());
        assert!(!src.conns.contains_key(&ConnId(2)));
    }

    #[test]
    fn a_join_failure_without_the_nodes_key_is_refused_and_not_recorded() {
        let mut src = source(2);
        src.handle_connected(Time::ZERO, ConnId(1), NONCE);
        src.handle_message(Time::ZERO, ConnId(1), join_failed("b", &StandInKey(2)));
        let events: Vec<SourceEvent> = std::iter::from_fn(|| src.poll_event()).collect();
        assert!(
            matches!(&events[..], [SourceEvent::Refused { refusal, .. }] if refusal.code == RefusalCode::BadProof),
            "{events:?}"
        );
        assert!(src.report().is_empty());
        assert_eq!(src.state(), SourceState::AwaitingNodes);
    }

    #[test]
    fn a_refusal_quoting_a_huge_session_name_still_encodes() {
        // Decoding lets each string field reach MAX_STRING bytes; a refusal
        // that quotes two of them must still fit one field.
        let mut src = source(2);
        src.handle_connected(Time::ZERO, ConnId(1), NONCE);
        let mut j = join("a");
        j.session = "é".repeat(crate::codec::MAX_STRING / 2);
        src.handle_message(Time::ZERO, ConnId(1), Message::Join(Box::new(j)));
        let msg = std::iter::from_fn(|| src.poll_transmit())
            .map(|(_, m)| m)
            .find(|m| matches!(m, Message::Refused(_)))
            .expect("a refusal");
        let Message::Refused(r) = &msg else {
            unreachable!()
        };
        assert_eq!(r.code, RefusalCode::WrongSession);
        assert!(r.detail.len() <= crate::codec::MAX_STRING);
        msg.encode(&mut bytes::BytesMut::new());
    }

    #[test]
    fn a_second_machine_under_a_live_name_is_refused_and_the_first_stays() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        let mut twin = join("a");
        twin.data_addr = "10.0.0.2:1".parse().unwrap();
        let twin = twin.proved(&StandInKey(1));
        assert_eq!(refused(&src, &twin), RefusalCode::NameInUse);
        // The same machine again is a restart faster than its death was
        // noticed: it takes the place over.
        let again = src
            .admit(&NONCE, &join("a"))
            .expect("a restart is admitted");
        assert!(again.supersedes.is_some());
    }

    fn refused(src: &Source, join: &Join) -> RefusalCode {
        src.admit(&NONCE, join).expect_err("admitted").code
    }

    #[test]
    fn admit_refuses_another_version_session_or_secret() {
        let src = source(2);
        let mut j = join("a");
        j.version = PROTOCOL_VERSION + 1;
        assert_eq!(refused(&src, &j), RefusalCode::VersionMismatch);
        let mut j = join("a");
        j.session = "t".into();
        assert_eq!(refused(&src, &j), RefusalCode::WrongSession);
        let j = join("a").proved(&StandInKey(2));
        assert_eq!(refused(&src, &j), RefusalCode::BadProof);
        // The proof covers the name: a node cannot join under another's
        // with its own key.
        let mut j = join("a");
        j.name = "b".into();
        assert_eq!(refused(&src, &j), RefusalCode::BadProof);
        // Nor change what it says once proved.
        let mut j = join("a");
        j.have = 5;
        assert_eq!(refused(&src, &j), RefusalCode::BadProof);
    }

    #[test]
    fn admit_refuses_once_the_session_is_over() {
        let mut src = source(2);
        src.handle_image_failed(Time::ZERO, "gone".into());
        assert_eq!(src.state(), SourceState::Aborted);
        assert_eq!(refused(&src, &join("a")), RefusalCode::SessionOver);
    }

    #[test]
    fn admit_refuses_a_new_name_when_full_but_not_a_known_one() {
        let mut src = source(1);
        joined(&mut src, 1, "a");
        assert_eq!(src.state(), SourceState::Streaming);
        assert_eq!(refused(&src, &join("b")), RefusalCode::SessionFull);
        let again = src.admit(&NONCE, &join("a")).expect("a is known");
        assert_eq!(again.supersedes, Some(NodeId(1)));
        assert_eq!(again.rejoins, Some(NodeId(1)));
    }

    #[test]
    fn admit_counts_a_node_superseded_before_the_start_as_new() {
        let mut src = source(2);
        joined(&mut src, 1, "a");
        // Its old record goes with its death, and so does its place.
        let again = src.admit(&NONCE, &join("a")).expect("a rejoins");
        assert_eq!(again.supersedes, Some(NodeId(1)));
        assert_eq!(again.rejoins, None);
        joined(&mut src, 2, "a");
        assert_eq!(src.names["a"], NodeId(2));
        assert_eq!(src.state(), SourceState::AwaitingNodes);
    }

    #[test]
    fn admit_keeps_a_prefix_only_of_the_image_served() {
        let mut cfg = SourceConfig::new("s", 2, addr());
        cfg.image_id = ImageId([7; 32]);
        cfg.image_size = Some(1000);
        let src = Source::new(Time::ZERO, cfg, Box::new(StandInKey(1)));
        let holding = |have, image| {
            Join {
                have,
                image: Some(ImageId(image)),
                ..join("a")
            }
            .proved(&StandInKey(1))
        };
        let have = |j: &Join| src.admit(&NONCE, j).expect("admitted").have;
        assert_eq!(have(&holding(600, [7; 32])), 600);
        assert_eq!(have(&holding(600, [8; 32])), 0);
        // More than the image holds cannot be a prefix of it.
        assert_eq!(have(&holding(1001, [7; 32])), 0);
    }
}
