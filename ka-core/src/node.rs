//! The node side: joins a session, takes data from its upstream, serves its
//! downstreams, checks its copy and waits to be released.
//!
//! Losing an upstream does not lose the place: the node reconnects to the
//! upstream it is told. Losing the source loses the place but never the copy:
//! the node closes its data connections (the source that comes back, perhaps
//! a new process, lays out a new chain), keeps what it holds, and keeps
//! looking for the source; when it is welcomed again it says how much it
//! holds and goes on from there. A node started again after it was killed
//! does the same with the prefix its shell found durable on disk
//! ([`Resume`]). A welcome for another image than the one held makes the node
//! start over ([`NodeAction::StartOver`]).
//!
//! A node whose sink cannot be read back ([`NodeConfig::readable`] false)
//! serves its downstreams only from the window its shell keeps, which the
//! shell reports as [`Progress::holds_from`] through
//! [`Node::handle_progress`]; it refuses a downstream that asks for less
//! ([`RefusalCode::CannotResume`]). A node refused so by its own upstream
//! does not knock there again: it tells the source ([`Message::Stranded`]),
//! which holds everything and feeds it instead.
//!
//! # Authentication
//!
//! A node holds its own key only ([`crate::auth`]). It proves it in its join
//! and acts on nothing the source says before the source's welcome opens
//! with the keys of the connection, which only a holder of the node's key
//! can make; from then on every message of the source must open, or the
//! node drops the connection and looks for the source again. Its
//! placement hands it the ticket of its link: its data hello proves it,
//! and it takes no record before its upstream's acceptance opens with the
//! link's keys. It derives the tickets of the links it serves from its own
//! key and the source's run, so a downstream's hello is checked the moment
//! it arrives.

use std::collections::{BTreeMap, VecDeque};

use crate::auth::{check_data_hello, join_proof, Channel, DataHello, DataRequest, Mac, Side};
use crate::codec::{
    Digest, Encoding, ImageId, Join, Message, Nonce, Progress, Refusal, RefusalCode, Upstream,
    MAX_LOG_LINES, PROTOCOL_VERSION,
};
use crate::config::NodeConfig;
use crate::ids::{ConnId, Epoch, NodeId};
use crate::range_set::RangeSet;
use crate::time::Time;
use crate::timer::{TimerKind, TimerTable};
use core::net::SocketAddr;
use core::time::Duration;

/// The most log lines a node keeps while the source has not welcomed it.
pub const MAX_PENDING_LOG: usize = 256;

/// Where the node's control conversation with the source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlState {
    /// Not connected: waiting to (re)connect to the source.
    AwaitingSource,
    /// Connected: waiting for the source's challenge.
    AwaitingChallenge(ConnId),
    /// Join sent: waiting for the welcome.
    AwaitingWelcome(ConnId),
    /// Admitted: heartbeats flow.
    Joined(ConnId),
}

/// Where the node's copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the whole image and the source's digest.
    AwaitingImage,
    /// Waiting for the read-back check of the written target.
    AwaitingReadback,
    /// Copy checked; waiting for the source's release.
    AwaitingRelease,
    /// Left the session: released, refused, aborted or failed.
    Done,
}

/// An instruction for the node's shell and data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// Open the control connection to the source; answer with
    /// [`Node::handle_source_connected`] or [`Node::handle_connect_failed`].
    ConnectSource,
    /// Open a data connection to the upstream; answer with
    /// [`Node::handle_upstream_connected`] or [`Node::handle_connect_failed`].
    ConnectUpstream {
        /// Where the upstream's data port listens.
        addr: SocketAddr,
        /// The topology generation it is for.
        epoch: Epoch,
    },
    /// Records starting at `from` follow on `conn`: write them, forward them.
    Receive {
        /// The data connection from the upstream.
        conn: ConnId,
        /// The first offset that will arrive.
        from: u64,
    },
    /// Serve records from `from` to a downstream on `conn`.
    Serve {
        /// The data connection to the downstream.
        conn: ConnId,
        /// The downstream.
        node: NodeId,
        /// The first offset to send.
        from: u64,
    },
    /// Close a connection.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Read the written target back and report its digest with
    /// [`Node::handle_readback`].
    ReadBack,
    /// What we held belongs to another image than the source serves: discard
    /// it (the running digest with it) and write the image again from offset
    /// 0. No data connection is open when this comes.
    StartOver,
    /// Leave: the session is over for this node.
    Exit {
        /// Whether this node's copy verified.
        ok: bool,
        /// Why it leaves.
        reason: String,
    },
}

/// Something that happened to the node, for its log and console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Admitted to the session.
    Welcomed {
        /// Our identifier.
        node: NodeId,
        /// The image the source serves.
        image: ImageId,
        /// Where our copy goes on from (0 for a fresh start).
        resumed_from: u64,
    },
    /// What we held belongs to another image: the copy starts over from 0.
    StartedOver {
        /// The prefix we held and discard.
        had: u64,
    },
    /// The source refused us.
    Refused(Refusal),
    /// Our place changed.
    Placed {
        /// Who feeds us now (`None`: the source; absent: nobody yet).
        upstream: Option<Option<NodeId>>,
        /// Whom we feed.
        downstreams: Vec<NodeId>,
    },
    /// Data is flowing from the upstream, from this offset.
    Receiving {
        /// The offset.
        from: u64,
    },
    /// A node asked us for data before the source's word that it is our
    /// downstream reached us; it waits for that word (or `dead_after`).
    DownstreamEarly {
        /// The node.
        node: NodeId,
        /// The placement it named.
        epoch: Epoch,
    },
    /// The data connection to the upstream was lost or refused.
    UpstreamLost {
        /// Why.
        reason: String,
    },
    /// Our upstream no longer holds what we lack (it left its bounded
    /// window): we told the source, and wait for the placement it sends.
    Stranded {
        /// The upstream that refused us.
        upstream: NodeId,
        /// The offset we asked for.
        from: u64,
        /// The upstream's words.
        reason: String,
    },
    /// The source went silent or its connection dropped.
    SourceLost,
    /// Who answered as the source did not prove this node's key (a
    /// message that does not open, or one in the clear after the
    /// handshake): its connection is dropped and nothing it said is acted
    /// on; the node looks for the source again.
    SourceUnproven {
        /// What failed.
        reason: String,
    },
    /// The copy was checked.
    Verified {
        /// Whether it matched the source's digest.
        ok: bool,
        /// Why not, when not.
        reason: String,
    },
    /// We leave the session.
    Left {
        /// Whether our copy verified.
        ok: bool,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamConn {
    /// Asked the shell to connect.
    Connecting,
    /// Connected; waiting for the upstream's challenge.
    AwaitingChallenge(ConnId),
    /// Hello sent; waiting for acceptance.
    AwaitingAccept(ConnId),
    /// Records flow.
    Receiving(ConnId),
}

impl UpstreamConn {
    fn conn(self) -> Option<ConnId> {
        match self {
            UpstreamConn::Connecting => None,
            UpstreamConn::AwaitingChallenge(c)
            | UpstreamConn::AwaitingAccept(c)
            | UpstreamConn::Receiving(c) => Some(c),
        }
    }
}

/// Hellos held unchecked at once, at most: see [`Inbound::Unchecked`].
const MAX_UNCHECKED: usize = 16;

#[derive(Debug, Clone)]
enum Inbound {
    Challenged(Nonce),
    /// A hello that came before our welcome: the source placed us and told
    /// our downstream before its welcome reached us (the two travel on
    /// different connections). Its ticket derives from the source's run,
    /// which the welcome brings, so it is checked then; until then it holds
    /// a connection unproven, so only [`MAX_UNCHECKED`] are kept, each until
    /// `until`.
    Unchecked {
        hello: Box<Message>,
        server_nonce: Nonce,
        until: Time,
    },
    /// A proven hello from a node that names us its upstream at an epoch
    /// newer than ours: the source told it before its word reached us (the
    /// two messages travel on different connections, which a busy source
    /// writes, and a busy node reads, in no fixed order). It is answered when our own placement
    /// at that epoch arrives, or refused at `until`.
    Early {
        request: DataRequest,
        /// The nonce we challenged it with, for the connection's keys.
        server_nonce: Nonce,
        until: Time,
    },
    Serving(NodeId),
}

/// The node's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Send progress (our heartbeat).
    Heartbeat = 0,
    /// The source has been silent too long.
    SourceSilence = 1,
    /// Try the source again.
    ConnectSource = 2,
    /// Try the upstream again.
    ConnectUpstream = 3,
    /// Give up on a source that does not answer (or does not come back).
    SourceWait = 4,
    /// The earliest early downstream's wait for our placement is over.
    EarlyDownstream = 5,
}

impl TimerKind<6> for Timer {
    const VALUES: [Timer; 6] = [
        Timer::Heartbeat,
        Timer::SourceSilence,
        Timer::ConnectSource,
        Timer::ConnectUpstream,
        Timer::SourceWait,
        Timer::EarlyDownstream,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn reason(self) -> &'static str {
        match self {
            Timer::Heartbeat => "heartbeat",
            Timer::SourceSilence => "source silence",
            Timer::ConnectSource => "reconnect to source",
            Timer::ConnectUpstream => "reconnect to upstream",
            Timer::SourceWait => "give up waiting for the source",
            Timer::EarlyDownstream => "answer an early downstream",
        }
    }
}

/// What a restarted node already holds: the durable prefix of a copy of one
/// image, as its shell recorded them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The image the prefix belongs to, as its source named it.
    pub image: ImageId,
    /// The end of the prefix written and flushed to stable storage.
    pub have: u64,
}

/// The node's protocol state machine, driven as the
/// [crate root](crate#the-calling-contract) says: `handle_*` in, then drain
/// `poll_transmit`, `poll_action`, `poll_event`, and arm `poll_timeout`.
/// Carrying out an action may feed it (a sink that fails:
/// [`Node::handle_sink_error`]), so drain the transmits again before a
/// [`NodeAction::Close`] or a [`NodeAction::Exit`] is carried out.
pub struct Node {
    config: NodeConfig,
    /// This node's own key.
    key: Box<dyn Mac>,
    id: Option<NodeId>,
    control: ControlState,
    /// The nonce of our side of the control connection's handshake.
    control_nonce: Nonce,
    /// The control connection's keys, once our join is sent.
    control_channel: Option<Channel>,
    /// The source process's run, from its welcome: the tickets of the
    /// links we serve derive from it.
    run: Option<Nonce>,
    /// Why the last one who answered as the source was not believed, for
    /// the reason we give if the source never comes.
    unproven: Option<String>,
    phase: Phase,
    heartbeat: Duration,
    dead_after: Duration,
    last_heard: Time,
    epoch: Epoch,
    upstream: Option<Upstream>,
    upstream_conn: Option<UpstreamConn>,
    /// The nonce of our side of the upstream connection's handshake.
    upstream_nonce: Nonce,
    /// The upstream connection's keys, once our hello is sent.
    upstream_channel: Option<Channel>,
    /// Downstreams we must serve, with the epoch that assigned them to us.
    downstreams: BTreeMap<NodeId, Epoch>,
    inbound: BTreeMap<ConnId, Inbound>,
    received: RangeSet,
    written: RangeSet,
    /// The lowest offset our shell can still serve to a downstream, as it
    /// last reported: meaningful only when our sink is not readable.
    holds_from: u64,
    /// Our upstream refused us for want of data at this placement and we
    /// told the source: wait for a new placement rather than knock again.
    stranded: Option<Epoch>,
    /// The source's word on the stream's end: its size, its digest and an
    /// encoded stream's image digest.
    image: Option<(u64, Digest, Option<Digest>)>,
    /// Our data plane's: the size and the digest of what it wrote.
    stream_end: Option<(u64, Digest)>,
    verdict: Option<Result<(), String>>,
    image_size: Option<u64>,
    /// How the stream encodes the image.
    encoding: Encoding,
    /// The image our held prefix belongs to.
    image_id: Option<ImageId>,
    /// The prefix our last join claimed: a welcome resuming from less means
    /// the source will not let us keep it.
    join_have: u64,
    /// When we last had the source (or started): `source_wait` runs from here.
    source_since: Time,
    timers: TimerTable<Timer, 6>,
    /// Log lines waiting for the source to welcome us, at most
    /// [`MAX_PENDING_LOG`].
    pending_log: VecDeque<String>,
    /// Lines dropped because the pending ones filled up, told when they go.
    log_dropped: u32,
    transmits: VecDeque<(ConnId, Message)>,
    actions: VecDeque<NodeAction>,
    events: VecDeque<NodeEvent>,
}

impl Node {
    /// A node that starts by connecting to its source, holding nothing (a
    /// fresh target) or what a restart found on disk. `key` is this node's
    /// own key ([`crate::auth::node_key`] of its name).
    pub fn new(now: Time, config: NodeConfig, key: Box<dyn Mac>, resume: Option<Resume>) -> Self {
        let have = resume.map_or(0, |r| r.have);
        let mut received = RangeSet::new();
        received.insert(0..have);
        let written = received.clone();
        let mut timers = TimerTable::new();
        timers.set(Timer::SourceWait, now + config.source_wait);
        let mut node = Node {
            heartbeat: config.heartbeat,
            dead_after: config.dead_after,
            config,
            key,
            id: None,
            control: ControlState::AwaitingSource,
            control_nonce: Nonce::default(),
            control_channel: None,
            run: None,
            unproven: None,
            phase: Phase::AwaitingImage,
            last_heard: now,
            epoch: Epoch(0),
            upstream: None,
            upstream_conn: None,
            upstream_nonce: Nonce::default(),
            upstream_channel: None,
            downstreams: BTreeMap::new(),
            inbound: BTreeMap::new(),
            received,
            written,
            // A restarted node that keeps a window serves nothing below the
            // prefix it resumed with (what its spool kept of the rest is not
            // trusted); reports only move its window on from there.
            holds_from: have,
            stranded: None,
            image: None,
            stream_end: None,
            verdict: None,
            image_size: None,
            encoding: Encoding::Plain,
            image_id: resume.filter(|r| r.have > 0).map(|r| r.image),
            join_have: 0,
            source_since: now,
            timers,
            pending_log: VecDeque::new(),
            log_dropped: 0,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
        };
        node.actions.push_back(NodeAction::ConnectSource);
        node
    }

    // ----- inputs -----

    /// Lines for this node's log at the source (its own events, its
    /// console): sent at once on the control connection when the source has
    /// welcomed us, else kept until it does — at most [`MAX_PENDING_LOG`],
    /// the newest dropped and counted beyond that.
    pub fn handle_log(&mut self, _now: Time, lines: impl IntoIterator<Item = String>) {
        for line in lines {
            if self.pending_log.len() < MAX_PENDING_LOG {
                self.pending_log.push_back(line);
            } else {
                self.log_dropped += 1;
            }
        }
        self.flush_log();
    }

    /// The control connection to the source is open; `nonce` must be fresh
    /// and unpredictable: the source will have to prove our key over it.
    pub fn handle_source_connected(&mut self, now: Time, conn: ConnId, nonce: Nonce) {
        if self.phase == Phase::Done {
            return self.actions.push_back(NodeAction::Close { conn });
        }
        self.control = ControlState::AwaitingChallenge(conn);
        self.control_nonce = nonce;
        self.control_channel = None;
        self.last_heard = now;
        self.timers.set(Timer::SourceSilence, now + self.dead_after);
    }

    /// The data connection to the upstream is open; `nonce` must be fresh
    /// and unpredictable: the upstream will have to prove the link's ticket
    /// over it.
    pub fn handle_upstream_connected(&mut self, _now: Time, conn: ConnId, nonce: Nonce) {
        if self.upstream_conn == Some(UpstreamConn::Connecting) {
            self.upstream_conn = Some(UpstreamConn::AwaitingChallenge(conn));
            self.upstream_nonce = nonce;
            self.upstream_channel = None;
        } else {
            // The topology changed while connecting: this connection is for a
            // link that no longer exists.
            self.actions.push_back(NodeAction::Close { conn });
        }
    }

    /// A connection attempt (to the source, or to the upstream) failed.
    pub fn handle_connect_failed(&mut self, now: Time, to_source: bool, reason: String) {
        if to_source {
            if self.control == ControlState::AwaitingSource && self.phase != Phase::Done {
                self.timers
                    .set(Timer::ConnectSource, now + self.config.reconnect_delay);
            }
        } else if self.upstream_conn == Some(UpstreamConn::Connecting) {
            self.upstream_conn = None;
            self.events.push_back(NodeEvent::UpstreamLost { reason });
            self.timers
                .set(Timer::ConnectUpstream, now + self.config.reconnect_delay);
        }
    }

    /// A downstream connected to our data port; `nonce` must be fresh.
    pub fn handle_connected(&mut self, _now: Time, conn: ConnId, nonce: Nonce) {
        self.inbound.insert(conn, Inbound::Challenged(nonce));
        self.transmits.push_back((
            conn,
            Message::Challenge {
                version: PROTOCOL_VERSION,
                nonce,
            },
        ));
    }

    /// A message arrived on `conn`.
    pub fn handle_message(&mut self, now: Time, conn: ConnId, msg: Message) {
        match self.control {
            ControlState::AwaitingChallenge(c)
            | ControlState::AwaitingWelcome(c)
            | ControlState::Joined(c)
                if c == conn =>
            {
                return self.on_control(now, conn, msg);
            }
            _ => {}
        }
        if self.upstream_conn.and_then(UpstreamConn::conn) == Some(conn) {
            return self.on_upstream(now, conn, msg);
        }
        if let Some(&Inbound::Challenged(nonce)) = self.inbound.get(&conn) {
            return self.on_downstream_hello(now, conn, nonce, msg);
        }
        self.close(conn);
    }

    /// A connection closed.
    pub fn handle_closed(&mut self, now: Time, conn: ConnId) {
        match self.control {
            ControlState::AwaitingChallenge(c)
            | ControlState::AwaitingWelcome(c)
            | ControlState::Joined(c)
                if c == conn =>
            {
                return self.lose_source(now);
            }
            _ => {}
        }
        if self.upstream_conn.and_then(UpstreamConn::conn) == Some(conn) {
            self.upstream_conn = None;
            self.upstream_channel = None;
            if !self.has_everything() {
                self.events.push_back(NodeEvent::UpstreamLost {
                    reason: "data connection closed".into(),
                });
                self.timers
                    .set(Timer::ConnectUpstream, now + self.config.reconnect_delay);
            }
            return;
        }
        self.inbound.remove(&conn);
    }

    /// The data plane's latest offsets, and where the window a node that
    /// cannot read its sink back keeps now starts (`holds_from`; a readable
    /// node's shell may leave it 0). All only grow; smaller values are
    /// ignored. A node resumed from a prefix ([`Resume`]) starts its window
    /// there.
    pub fn handle_progress(&mut self, _now: Time, progress: Progress) {
        self.received.insert(0..progress.received);
        self.written.insert(0..progress.written);
        self.holds_from = self.holds_from.max(progress.holds_from);
    }

    /// The upstream sent the end of the stream; everything up to `total` is
    /// written and flushed, and `digest` is the keyed digest of what we
    /// wrote: of the stream when it is plain, of the image unpacked from it
    /// when it is encoded (the target holds that image whole, even after a
    /// restart that left only part of the stream in this process).
    pub fn handle_stream_end(&mut self, now: Time, total: u64, digest: Digest) {
        self.received.insert(0..total);
        self.written.insert(0..total);
        self.stream_end = Some((total, digest));
        if let Some(UpstreamConn::Receiving(c)) = self.upstream_conn {
            self.upstream_conn = None;
            self.actions.push_back(NodeAction::Close { conn: c });
        }
        self.timers.stop(Timer::ConnectUpstream);
        self.check_copy(now);
    }

    /// The read-back of the written target produced `digest`.
    pub fn handle_readback(&mut self, now: Time, digest: Digest) {
        if self.phase != Phase::AwaitingReadback {
            return;
        }
        let expected = self.image.map(|(_, d, _)| d);
        let verdict = if expected == Some(digest) {
            Ok(())
        } else {
            Err("read-back digest of the written target differs from the source's: the disk did not keep what was written".into())
        };
        self.conclude(now, verdict);
    }

    /// The sink failed (disk error, command died): we cannot go on.
    pub fn handle_sink_error(&mut self, _now: Time, reason: String) {
        if self.phase == Phase::Done {
            return;
        }
        self.send_control(Message::Failed {
            reason: reason.clone(),
        });
        self.leave(false, format!("sink failed: {reason}"));
    }

    /// A deadline from [`Node::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.timers.expire(Timer::Heartbeat, now)
            && self.send_control(Message::Progress(self.progress()))
        {
            self.timers.set(Timer::Heartbeat, now + self.heartbeat);
        }
        if let Some(late) = self.timers.overdue(Timer::SourceSilence, now) {
            let bound = self.source_silence_bound();
            // A check that comes more than a heartbeat late means this node
            // was not running (stopped, starved of CPU): what the source
            // sent meanwhile waits unread, so the silence cannot be judged
            // yet. It gets one heartbeat of waking time to arrive.
            if late > self.heartbeat {
                let quiet = now.saturating_since(self.last_heard);
                let allowed = bound.saturating_sub(self.heartbeat);
                if quiet > allowed {
                    self.last_heard = self.last_heard + (quiet - allowed);
                }
            }
            if now.saturating_since(self.last_heard) >= bound {
                if let Some(c) = self.control_conn() {
                    self.actions.push_back(NodeAction::Close { conn: c });
                }
                self.lose_source(now);
            } else {
                self.timers
                    .set(Timer::SourceSilence, self.last_heard + bound);
            }
        }
        if self.timers.expire(Timer::ConnectSource, now)
            && self.control == ControlState::AwaitingSource
            && self.phase != Phase::Done
        {
            self.actions.push_back(NodeAction::ConnectSource);
        }
        if self.timers.expire(Timer::ConnectUpstream, now) {
            self.connect_upstream();
        }
        if self.timers.expire(Timer::EarlyDownstream, now) {
            self.answer_early_downstreams(now);
        }
        if self.timers.expire(Timer::SourceWait, now)
            && !matches!(self.control, ControlState::Joined(_))
        {
            let waited = now.saturating_since(self.source_since).as_secs_f64();
            let mut reason = if self.id.is_some() {
                format!("lost the source and it did not come back within {waited:.0} s")
            } else {
                format!("no source answered within {waited:.0} s")
            };
            if let Some(why) = &self.unproven {
                reason.push_str(&format!(
                    " (the last one to answer was not believed: {why})"
                ));
            }
            if let Some(c) = self.control_conn() {
                self.actions.push_back(NodeAction::Close { conn: c });
            }
            self.leave(false, reason);
        }
    }

    // ----- outputs -----

    /// The next message to send, and on which connection.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Message)> {
        self.transmits.pop_front()
    }

    /// The next instruction for the shell and data plane.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<NodeAction> {
        self.actions.pop_front()
    }

    /// The next thing that happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When to call [`Node::handle_timeout`] next, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        if self.phase == Phase::Done {
            return None;
        }
        self.timers.next().map(|(t, timer)| (t, timer.reason()))
    }

    // ----- views -----

    /// The image's size, once the source said it (in its welcome, or with
    /// the end of the image).
    pub fn image_size(&self) -> Option<u64> {
        self.image_size.or(self.image.map(|(total, ..)| total))
    }

    /// How the stream encodes the image, as the source's welcome said
    /// ([`Encoding::Plain`] until then).
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The image our copy belongs to: as a source last named it, or as a
    /// restart found it.
    pub fn image_id(&self) -> Option<ImageId> {
        self.image_id
    }

    /// Our identifier, once admitted.
    pub fn id(&self) -> Option<NodeId> {
        self.id
    }

    /// The control conversation's state.
    pub fn control(&self) -> ControlState {
        self.control
    }

    /// Where our copy stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Our upstream, if placed.
    pub fn upstream(&self) -> Option<Upstream> {
        self.upstream
    }

    /// The downstreams we serve.
    pub fn downstreams(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.downstreams.keys().copied()
    }

    /// What we have received.
    pub fn received(&self) -> &RangeSet {
        &self.received
    }

    /// What we have written.
    pub fn written(&self) -> &RangeSet {
        &self.written
    }

    /// The verdict on our copy, once checked.
    pub fn verdict(&self) -> Option<&Result<(), String>> {
        self.verdict.as_ref()
    }

    /// The progress we report.
    pub fn progress(&self) -> Progress {
        Progress {
            received: self.received.prefix_end(),
            written: self.written.prefix_end(),
            holds_from: if self.config.readable {
                0
            } else {
                self.holds_from
            },
        }
    }

    // ----- internals -----

    fn control_conn(&self) -> Option<ConnId> {
        match self.control {
            ControlState::AwaitingSource => None,
            ControlState::AwaitingChallenge(c)
            | ControlState::AwaitingWelcome(c)
            | ControlState::Joined(c) => Some(c),
        }
    }

    fn has_everything(&self) -> bool {
        self.stream_end.is_some()
    }

    fn close(&mut self, conn: ConnId) {
        self.inbound.remove(&conn);
        self.actions.push_back(NodeAction::Close { conn });
    }

    /// Sends the pending log lines, if we are joined, in messages of at
    /// most [`MAX_LOG_LINES`].
    fn flush_log(&mut self) {
        if !matches!(self.control, ControlState::Joined(_)) {
            return;
        }
        if self.log_dropped > 0 {
            // Told after the lines kept, so it goes even over a full buffer.
            let note = format!(
                "ka: {} lines dropped while the source was away",
                self.log_dropped
            );
            self.log_dropped = 0;
            self.pending_log.push_back(note);
        }
        while !self.pending_log.is_empty() {
            let n = self.pending_log.len().min(MAX_LOG_LINES);
            let lines: Vec<String> = self.pending_log.drain(..n).collect();
            self.send_control(Message::Log { lines });
        }
    }

    /// Queues `msg` for the source, sealed, if we are joined; whether we are.
    fn send_control(&mut self, msg: Message) -> bool {
        let (ControlState::Joined(c), Some(channel)) = (self.control, &mut self.control_channel)
        else {
            return false;
        };
        let sealed = channel.seal(msg);
        self.transmits.push_back((c, sealed));
        true
    }

    /// Who answered as the source did not prove our key: nothing it said is
    /// acted on; its connection is dropped and we look for the source again.
    fn source_unproven(&mut self, now: Time, conn: ConnId, reason: String) {
        self.events.push_back(NodeEvent::SourceUnproven {
            reason: reason.clone(),
        });
        self.unproven = Some(reason);
        self.actions.push_back(NodeAction::Close { conn });
        self.lose_source(now);
    }

    /// How long the source may be silent before this node leaves it:
    /// `dead_after`, except once the copy is checked. A node waiting for
    /// its release has nothing more to receive, and leaving would close the
    /// connection the release is to come on: a source stopped for a moment
    /// (its own kernel still sending the stream's end meanwhile) would
    /// wake to find its verified nodes gone, and they would never hear
    /// the session is over. So it gives a silent source `source_wait`.
    fn source_silence_bound(&self) -> Duration {
        if self.phase == Phase::AwaitingRelease {
            self.config.source_wait.max(self.dead_after)
        } else {
            self.dead_after
        }
    }

    fn lose_source(&mut self, now: Time) {
        let was_joined = matches!(self.control, ControlState::Joined(_));
        self.control = ControlState::AwaitingSource;
        self.control_channel = None;
        self.timers.stop(Timer::Heartbeat);
        self.timers.stop(Timer::SourceSilence);
        if self.phase == Phase::Done {
            return;
        }
        if was_joined {
            self.source_since = now;
            self.timers
                .set(Timer::SourceWait, now + self.config.source_wait);
        }
        // Our place came from the source: a source that comes back (perhaps a
        // new process) lays out a new chain, so leave the old one now. What we
        // hold stays, and the join says so.
        if let Some(c) = self.upstream_conn.take().and_then(UpstreamConn::conn) {
            self.actions.push_back(NodeAction::Close { conn: c });
        }
        self.upstream_channel = None;
        self.upstream = None;
        self.stranded = None;
        self.timers.stop(Timer::ConnectUpstream);
        // Epochs count the placements of one source process, and a
        // restarted source counts from 1 again: a downstream that the new
        // one placed must not find us at an epoch of the old one.
        self.epoch = Epoch(0);
        let inbound: Vec<ConnId> = self.inbound.keys().copied().collect();
        for c in inbound {
            self.close(c);
        }
        self.downstreams.clear();
        self.events.push_back(NodeEvent::SourceLost);
        self.timers
            .set(Timer::ConnectSource, now + self.config.reconnect_delay);
    }

    /// The source does not know the image our prefix belongs to: forget the
    /// prefix, its digest and any verdict on it.
    fn start_over(&mut self) {
        let had = self.received.prefix_end();
        self.received = RangeSet::new();
        self.written = RangeSet::new();
        self.holds_from = 0;
        self.stream_end = None;
        self.image = None;
        self.verdict = None;
        self.phase = Phase::AwaitingImage;
        self.events.push_back(NodeEvent::StartedOver { had });
        self.actions.push_back(NodeAction::StartOver);
    }

    fn on_control(&mut self, now: Time, conn: ConnId, msg: Message) {
        // In the clear come only the challenge and a refusal of our join;
        // everything after must open with the connection's keys, which
        // only a holder of our key can make.
        let msg = match (self.control, &mut self.control_channel) {
            (ControlState::AwaitingChallenge(_), _) => msg,
            (ControlState::AwaitingWelcome(_), _) if matches!(msg, Message::Refused(_)) => msg,
            (_, Some(channel)) => match channel.open(msg) {
                Ok(msg) => msg,
                Err(e) => {
                    let reason = format!("the source did not prove this node's key: {e}");
                    return self.source_unproven(now, conn, reason);
                }
            },
            (_, None) => {
                let reason = format!("the source sent a {} before the handshake", msg.name());
                return self.source_unproven(now, conn, reason);
            }
        };
        self.last_heard = now;
        match (self.control, msg) {
            (ControlState::AwaitingChallenge(_), Message::Challenge { version, nonce }) => {
                if version != PROTOCOL_VERSION {
                    let reason = format!(
                        "the source speaks protocol v{version}, this node v{PROTOCOL_VERSION}: run the same ka version on both"
                    );
                    return self.leave(false, reason);
                }
                let have = self.received.prefix_end();
                self.join_have = have;
                let mut join = Join {
                    version: PROTOCOL_VERSION,
                    session: self.config.session.clone(),
                    name: self.config.name.clone(),
                    mac: self.config.mac,
                    data_addr: self.config.data_addr,
                    wait_release: self.config.wait_release,
                    readable: self.config.readable,
                    have,
                    holds_from: self.progress().holds_from,
                    image: self.image_id.filter(|_| have > 0),
                    nonce: self.control_nonce,
                    proof: Default::default(),
                };
                join.proof = join_proof(&*self.key, &nonce, &join);
                self.control_channel = Some(Channel::new(
                    &*self.key,
                    &nonce,
                    &self.control_nonce,
                    Side::Client,
                ));
                self.transmits
                    .push_back((conn, Message::Join(Box::new(join))));
                self.control = ControlState::AwaitingWelcome(conn);
            }
            (
                ControlState::AwaitingWelcome(_),
                Message::Welcome {
                    node,
                    heartbeat_ms,
                    dead_after_ms,
                    image_size,
                    image,
                    resume_from,
                    run,
                    encoding,
                },
            ) => {
                self.id = Some(node);
                self.encoding = encoding;
                if encoding != Encoding::Plain {
                    // An encoded stream is unpacked from a window of it, so
                    // this node serves only what its window still holds.
                    self.config.readable = false;
                }
                self.run = Some(run);
                self.unproven = None;
                self.heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(10)));
                self.dead_after = Duration::from_millis(u64::from(dead_after_ms.max(50)));
                self.control = ControlState::Joined(conn);
                self.timers.stop(Timer::SourceWait);
                let have = self.received.prefix_end();
                if (resume_from < self.join_have || self.image_id.is_some_and(|i| i != image))
                    && have > 0
                    && self.phase != Phase::Done
                {
                    self.start_over();
                    self.image_size = None;
                }
                self.image_id = Some(image);
                self.image_size = image_size.or(self.image_size);
                self.events.push_back(NodeEvent::Welcomed {
                    node,
                    image,
                    resumed_from: resume_from.min(self.received.prefix_end()),
                });
                self.send_control(Message::Progress(self.progress()));
                self.flush_log();
                self.timers.set(Timer::Heartbeat, now + self.heartbeat);
                self.timers.set(Timer::SourceSilence, now + self.dead_after);
                // A source that restarted knows nothing of us: say again what we
                // concluded, so it need not wait.
                if let Some(v) = self.verdict.clone() {
                    let (ok, reason) = match v {
                        Ok(()) => (true, String::new()),
                        Err(e) => (false, e),
                    };
                    self.send_control(Message::Verified { ok, reason });
                }
                self.check_unchecked(now);
            }
            (_, Message::Refused(refusal)) => {
                self.events.push_back(NodeEvent::Refused(refusal.clone()));
                let reason = format!("refused by the source: {}", refusal.detail);
                self.leave(false, reason);
            }
            (
                ControlState::Joined(_),
                Message::Topology {
                    epoch,
                    upstream,
                    downstreams,
                },
            ) => self.on_topology(now, epoch, upstream, downstreams),
            (
                ControlState::Joined(_),
                Message::ImageDone {
                    total,
                    digest,
                    image_digest,
                },
            ) => {
                self.image = Some((total, digest, image_digest));
                self.check_copy(now);
            }
            (ControlState::Joined(_), Message::Release) => {
                let ok = matches!(self.verdict, Some(Ok(())));
                self.leave(ok, "released by the source".into());
            }
            (_, Message::Abort { reason }) => {
                self.leave(false, format!("the source aborted: {reason}"))
            }
            (ControlState::Joined(_), Message::Heartbeat) => {}
            (_, other) => {
                let reason = format!("the source sent an unexpected {}", other.name());
                self.source_unproven(now, conn, reason);
            }
        }
    }

    fn on_topology(
        &mut self,
        now: Time,
        epoch: Epoch,
        upstream: Option<Upstream>,
        downstreams: Vec<NodeId>,
    ) {
        if epoch < self.epoch {
            return;
        }
        self.epoch = epoch;
        if upstream != self.upstream {
            if let Some(c) = self.upstream_conn.take().and_then(UpstreamConn::conn) {
                self.actions.push_back(NodeAction::Close { conn: c });
            }
            self.upstream = upstream;
            self.stranded = None;
            self.timers.stop(Timer::ConnectUpstream);
            self.connect_upstream();
        } else if self.stranded.is_some_and(|at| at < epoch) {
            // A newer placement that keeps the upstream that refused us: it
            // left the source before our word reached it. Ask once more; a
            // refusal now is told again, for this placement.
            self.connect_upstream();
        }
        // Downstreams no longer ours lose their connection; new ones are
        // expected from this epoch on.
        let kept: BTreeMap<NodeId, Epoch> = downstreams
            .iter()
            .map(|&d| (d, self.downstreams.get(&d).copied().unwrap_or(epoch)))
            .collect();
        let dropped: Vec<ConnId> = self
            .inbound
            .iter()
            .filter(|(_, i)| matches!(i, Inbound::Serving(n) if !kept.contains_key(n)))
            .map(|(&c, _)| c)
            .collect();
        for c in dropped {
            self.close(c);
        }
        self.downstreams = kept;
        self.events.push_back(NodeEvent::Placed {
            upstream: upstream.map(|u| u.node),
            downstreams,
        });
        self.answer_early_downstreams(now);
    }

    fn connect_upstream(&mut self) {
        if self.has_everything() || self.phase == Phase::Done || self.upstream_conn.is_some() {
            return;
        }
        if let Some(up) = self.upstream {
            self.upstream_conn = Some(UpstreamConn::Connecting);
            self.actions.push_back(NodeAction::ConnectUpstream {
                addr: up.addr,
                epoch: self.epoch,
            });
        }
    }

    fn on_upstream(&mut self, now: Time, conn: ConnId, msg: Message) {
        // The upstream's acceptance must open with the link's keys: only the
        // holder of the link's ticket (our upstream, or the source) can make
        // it, and we take no record before it.
        let msg = match (self.upstream_conn, &mut self.upstream_channel, msg) {
            (_, _, refused @ Message::Refused(_)) => refused,
            (Some(UpstreamConn::AwaitingAccept(_)), Some(channel), msg) => {
                match channel.open(msg) {
                    Ok(msg) => msg,
                    Err(e) => {
                        let reason = format!("the upstream did not prove our link's ticket: {e}");
                        return self.drop_upstream(now, conn, reason);
                    }
                }
            }
            (_, _, msg) => msg,
        };
        match (self.upstream_conn, msg) {
            (Some(UpstreamConn::AwaitingChallenge(_)), Message::Challenge { nonce, .. }) => {
                let (Some(id), Some(up)) = (self.id, self.upstream) else {
                    return self.drop_upstream(
                        now,
                        conn,
                        "connected upstream before being admitted".into(),
                    );
                };
                let ticket = self.key.keyed(&up.ticket.0);
                let hello = DataHello {
                    session: self.config.session.clone(),
                    node: id,
                    epoch: self.epoch,
                    from: self.received.prefix_end(),
                    nonce: self.upstream_nonce,
                };
                self.transmits
                    .push_back((conn, hello.proved(&*ticket, &nonce)));
                self.upstream_channel = Some(Channel::new(
                    &*ticket,
                    &nonce,
                    &self.upstream_nonce,
                    Side::Client,
                ));
                self.upstream_conn = Some(UpstreamConn::AwaitingAccept(conn));
            }
            (Some(UpstreamConn::AwaitingAccept(_)), Message::DataAccepted { from }) => {
                self.stranded = None;
                self.upstream_conn = Some(UpstreamConn::Receiving(conn));
                self.actions.push_back(NodeAction::Receive { conn, from });
                self.events.push_back(NodeEvent::Receiving { from });
            }
            (_, Message::Refused(r)) => match self.upstream.and_then(|u| u.node) {
                Some(up) if r.code == RefusalCode::CannotResume => self.strand(conn, up, r.detail),
                _ => self.drop_upstream(now, conn, format!("upstream refused us: {}", r.detail)),
            },
            (_, other) => self.drop_upstream(
                now,
                conn,
                format!("upstream sent an unexpected {}", other.name()),
            ),
        }
    }

    /// Our upstream node no longer holds what we lack. Asking it again
    /// would only be refused again, so we tell the source, once for this
    /// placement, and wait for the placement it sends (it feeds us itself:
    /// it holds everything).
    fn strand(&mut self, conn: ConnId, upstream: NodeId, reason: String) {
        self.upstream_conn = None;
        self.actions.push_back(NodeAction::Close { conn });
        self.timers.stop(Timer::ConnectUpstream);
        let from = self.received.prefix_end();
        self.events.push_back(NodeEvent::Stranded {
            upstream,
            from,
            reason,
        });
        if !matches!(self.control, ControlState::Joined(_)) {
            // Without the source there is no placement to keep: the next
            // one comes with the welcome.
            return;
        }
        if self.stranded != Some(self.epoch) {
            self.stranded = Some(self.epoch);
            let epoch = self.epoch;
            self.send_control(Message::Stranded { epoch, from });
        }
    }

    fn drop_upstream(&mut self, now: Time, conn: ConnId, reason: String) {
        self.upstream_conn = None;
        self.upstream_channel = None;
        self.actions.push_back(NodeAction::Close { conn });
        self.events.push_back(NodeEvent::UpstreamLost { reason });
        self.timers
            .set(Timer::ConnectUpstream, now + self.config.reconnect_delay);
    }

    fn on_downstream_hello(&mut self, now: Time, conn: ConnId, server_nonce: Nonce, msg: Message) {
        let run = match (self.control, self.run) {
            (ControlState::Joined(_), Some(run)) => run,
            _ => {
                let unchecked = self
                    .inbound
                    .values()
                    .filter(|i| matches!(i, Inbound::Unchecked { .. }))
                    .count();
                if unchecked >= MAX_UNCHECKED || self.phase == Phase::Done {
                    let detail = "this node has no place in the session yet".to_string();
                    return self.refuse_downstream(conn, RefusalCode::NotExpected, detail);
                }
                let until = now + self.dead_after;
                let hello = Box::new(msg);
                self.inbound.insert(
                    conn,
                    Inbound::Unchecked {
                        hello,
                        server_nonce,
                        until,
                    },
                );
                return self.arm_early_timer();
            }
        };
        let request =
            match check_data_hello(&*self.key, &run, &server_nonce, &self.config.session, msg) {
                Ok((request, _)) => request,
                Err((code, detail)) => return self.refuse_downstream(conn, code, detail),
            };
        let DataRequest { node, epoch, .. } = request;
        if !self.downstreams.contains_key(&node) && epoch > self.epoch {
            // Refusing would cost the downstream a reconnect delay, and the
            // data reaching us meanwhile would stand queued before it for
            // the rest of the stream, every byte late by that much.
            let until = now + self.dead_after;
            self.inbound.insert(
                conn,
                Inbound::Early {
                    request,
                    server_nonce,
                    until,
                },
            );
            self.arm_early_timer();
            self.events
                .push_back(NodeEvent::DownstreamEarly { node, epoch });
            return;
        }
        self.answer_downstream(conn, request, server_nonce);
    }

    /// Accepts a proven data connection if the source made its node our
    /// downstream at its epoch or before, and refuses it otherwise. The
    /// acceptance is sealed with the link's keys: the downstream's proof
    /// that we hold its ticket.
    fn answer_downstream(&mut self, conn: ConnId, request: DataRequest, server_nonce: Nonce) {
        let DataRequest {
            node,
            epoch,
            from,
            nonce,
        } = request;
        match self.downstreams.get(&node) {
            Some(&assigned) if epoch >= assigned => {}
            _ => {
                return self.refuse_downstream(
                    conn,
                    RefusalCode::NotExpected,
                    format!(
                        "{node} is not our downstream at {epoch} (we are at {})",
                        self.epoch
                    ),
                )
            }
        }
        if !self.config.readable && from < self.holds_from {
            // What it lacks has left our window; the source will feed it
            // once it hears so from it.
            return self.refuse_downstream(
                conn,
                RefusalCode::CannotResume,
                format!(
                    "{node} asked for offset {from}, which has left this node's window (it holds from {})",
                    self.holds_from
                ),
            );
        }
        // One connection per downstream: a reconnect replaces the old one.
        let old: Vec<ConnId> = self
            .inbound
            .iter()
            .filter(|(_, i)| matches!(i, Inbound::Serving(n) if *n == node))
            .map(|(&c, _)| c)
            .collect();
        for c in old {
            self.close(c);
        }
        self.inbound.insert(conn, Inbound::Serving(node));
        let Some(run) = self.run else {
            unreachable!("a hello is checked only once the source's run is known")
        };
        let ticket = self
            .key
            .keyed(&crate::auth::link_ticket(&*self.key, &run, node).0);
        let mut channel = Channel::new(&*ticket, &server_nonce, &nonce, Side::Server);
        self.transmits
            .push_back((conn, channel.seal(Message::DataAccepted { from })));
        self.actions
            .push_back(NodeAction::Serve { conn, node, from });
    }

    /// Answers each early downstream whose epoch we have reached, and
    /// refuses those that waited until their time ran out (an unchecked
    /// one, whose welcome never came, too).
    fn answer_early_downstreams(&mut self, now: Time) {
        let due: Vec<(ConnId, DataRequest, Nonce)> = self
            .inbound
            .iter()
            .filter_map(|(&c, i)| match *i {
                Inbound::Early {
                    request,
                    server_nonce,
                    until,
                } if request.epoch <= self.epoch || until <= now => {
                    Some((c, request, server_nonce))
                }
                _ => None,
            })
            .collect();
        for (conn, request, server_nonce) in due {
            self.inbound.remove(&conn);
            self.answer_downstream(conn, request, server_nonce);
        }
        let expired: Vec<ConnId> = self
            .inbound
            .iter()
            .filter(|(_, i)| matches!(i, Inbound::Unchecked { until, .. } if *until <= now))
            .map(|(&c, _)| c)
            .collect();
        for conn in expired {
            let detail = "this node was not welcomed in time to check the hello".to_string();
            self.refuse_downstream(conn, RefusalCode::NotExpected, detail);
        }
        self.arm_early_timer();
    }

    /// Checks the hellos that came before our welcome, now that we know the
    /// source's run.
    fn check_unchecked(&mut self, now: Time) {
        let held: Vec<ConnId> = self
            .inbound
            .iter()
            .filter(|(_, i)| matches!(i, Inbound::Unchecked { .. }))
            .map(|(&c, _)| c)
            .collect();
        for conn in held {
            if let Some(Inbound::Unchecked {
                hello,
                server_nonce,
                ..
            }) = self.inbound.remove(&conn)
            {
                self.on_downstream_hello(now, conn, server_nonce, *hello);
            }
        }
        self.arm_early_timer();
    }

    fn arm_early_timer(&mut self) {
        let next = self
            .inbound
            .values()
            .filter_map(|i| match *i {
                Inbound::Early { until, .. } | Inbound::Unchecked { until, .. } => Some(until),
                _ => None,
            })
            .min();
        match next {
            Some(t) => self.timers.set(Timer::EarlyDownstream, t),
            None => self.timers.stop(Timer::EarlyDownstream),
        }
    }

    fn refuse_downstream(&mut self, conn: ConnId, code: RefusalCode, detail: String) {
        self.transmits
            .push_back((conn, Message::Refused(Refusal::new(code, detail))));
        self.close(conn);
    }

    fn check_copy(&mut self, now: Time) {
        if self.phase != Phase::AwaitingImage {
            return;
        }
        let (Some((total, digest, image_digest)), Some((got_total, got_digest))) =
            (self.image, self.stream_end)
        else {
            return;
        };
        if got_total != total {
            return self.conclude(
                now,
                Err(format!("received {got_total} bytes, the image has {total}")),
            );
        }
        let mismatch = match (self.encoding, image_digest) {
            (Encoding::Plain, _) => {
                (got_digest != digest).then_some("digest of the received image differs from the source's")
            }
            (_, Some(image_digest)) => (got_digest != image_digest)
                .then_some("digest of the unpacked image differs from the source's"),
            (_, None) => Some(
                "the source sent no digest of the unpacked image to check the copy by: run the same ka version on both",
            ),
        };
        if let Some(why) = mismatch {
            return self.conclude(now, Err(why.into()));
        }
        // A windowed node's stream is gone but for its window: its unpacker
        // has checked what it wrote before the stream's end reached us.
        if self.config.verify_readback && self.config.readable {
            self.phase = Phase::AwaitingReadback;
            self.actions.push_back(NodeAction::ReadBack);
        } else {
            self.conclude(now, Ok(()));
        }
    }

    fn conclude(&mut self, _now: Time, verdict: Result<(), String>) {
        let (ok, reason) = match &verdict {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.clone()),
        };
        self.verdict = Some(verdict);
        self.phase = Phase::AwaitingRelease;
        self.events.push_back(NodeEvent::Verified {
            ok,
            reason: reason.clone(),
        });
        self.send_control(Message::Verified { ok, reason });
    }

    fn leave(&mut self, ok: bool, reason: String) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        let conns: Vec<ConnId> = self
            .control_conn()
            .into_iter()
            .chain(self.upstream_conn.take().and_then(UpstreamConn::conn))
            .chain(self.inbound.keys().copied())
            .collect();
        self.inbound.clear();
        for c in conns {
            self.actions.push_back(NodeAction::Close { conn: c });
        }
        self.control = ControlState::AwaitingSource;
        self.control_channel = None;
        self.upstream_channel = None;
        self.events.push_back(NodeEvent::Left {
            ok,
            reason: reason.clone(),
        });
        self.actions.push_back(NodeAction::Exit { ok, reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timer_sits_at_its_own_index() {
        crate::timer::assert_indexed::<Timer, 6>();
    }
}
