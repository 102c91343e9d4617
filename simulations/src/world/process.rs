//! The processes: ka-core's machines, driven as their shells drive them.
//!
//! The source and every node run ka-core's state machines unchanged. After
//! each input the world drains a machine's outputs until none is left, as
//! the sans-IO contract asks: messages go onto the network, actions move the
//! data plane or open and close connections, events go into the trace, and
//! the next deadline becomes a timer event. A process has incarnations: a
//! killed node loses its machine and its connections, and a restarted one
//! resumes from the durable prefix it recorded; a restarted source is handed
//! only the outcomes its shell recorded, and reads its image through before
//! it can publish the digest again.
//!
//! Machines authenticate with a cheap, deterministic stand-in MAC keyed by
//! the seed: the simulation tests the protocol, not the cryptography. The
//! source holds the root key and each node the key ka-core derives from it
//! for its name; every message after a handshake travels sealed, and data
//! links are proved with the tickets the placements hand out, as over TCP.
//!
//! With windows, nodes are configured as not readable (or, when the source
//! packs its stream, as readable file targets that the welcome makes
//! windowed), and the world checks
//! what their machines decide: nobody serves from below its window, and
//! every placement the source announces (`Relinked`, and the layout at
//! `Started`) names an upstream that holds the node's offset as far as the
//! source knows, or the source itself.

use core::net::SocketAddr;
use core::time::Duration;

use ka_core::codec::Message;
use ka_core::config::{NodeConfig, SourceConfig};
use ka_core::ids::ConnId;
use ka_core::node::{Node, NodeAction, NodeEvent};
use ka_core::source::{Source, SourceAction, SourceEvent};
use ka_core::time::Time;

use super::{End, Ev, Input, Sim, SimConfig};

/// The session's name.
const SESSION: &str = "sim";

/// The identity of the simulated image.
const IMAGE_ID: ka_core::codec::ImageId = ka_core::codec::ImageId([0x5a; 32]);

/// How much faster than a port a restarted source reads and hashes its image.
const HASH_SPEEDUP: f64 = 8.0;

/// The stand-in keyed primitives, keyed by the session (the root) or by
/// what ka-core derives from it: deterministic and cheap.
pub(super) use ka_core::auth::StandInKey as SimKey;

/// The run of the source's `incarnation`-th process in a run of `seed`: a
/// restarted source hands out tickets of its own.
pub(super) fn source_run(seed: u64, incarnation: u64) -> ka_core::codec::Nonce {
    let mut run = [0u8; 32];
    SimKey(seed).hash(4, &incarnation.to_be_bytes(), &mut run);
    ka_core::codec::Nonce(run)
}

/// The source's settings for a run of `cfg`, listening on `addr`.
pub(super) fn source_config(cfg: &SimConfig, addr: SocketAddr) -> SourceConfig {
    let mut scfg = SourceConfig::new(SESSION, cfg.nodes as u32, addr);
    scfg.arity = cfg.arity;
    scfg.slow_policy = cfg.slow_policy;
    // Lag worth acting on: two seconds of transfer, judged over two seconds.
    scfg.slow_lag = (cfg.payload_rate() * 2.0) as u64;
    scfg.slow_window = Duration::from_secs(2);
    // Start when everyone is there, or 100 ms in with whoever is: nodes that
    // come later (late, or restarted after dying before the start) join
    // the running stream at the tail.
    scfg.join_timeout = Some(Duration::from_millis(100));
    scfg.min_nodes = 1;
    scfg.image_id = IMAGE_ID;
    scfg.image_size = Some(cfg.size);
    if cfg.packed {
        assert!(
            cfg.window.is_some(),
            "a packed stream's nodes keep a window"
        );
        scfg.encoding = ka_core::codec::Encoding::Zstd {
            image_size: Some(cfg.size),
        };
    }
    scfg.run = source_run(cfg.seed, 0);
    scfg
}

impl Sim {
    /// Hands `input` to the source's machine.
    pub(super) fn source_input(&mut self, input: Input) {
        let now = self.now;
        match input {
            Input::Msg(c, m) => self.source.handle_message(now, c, m),
            Input::Closed(c) => {
                self.stop_flows_on(c);
                self.source.handle_closed(now, c)
            }
            Input::Accepted { conn, nonce } => self.source.handle_connected(now, conn, nonce),
            Input::Connected { .. } | Input::ConnectFailed { .. } => {}
        }
        self.drain_source();
    }

    /// Hands `input` to node `i`'s machine.
    pub(super) fn node_input(&mut self, i: usize, input: Input) {
        match input {
            Input::Msg(c, m) => self.with_node(i, |n, now| n.handle_message(now, c, m)),
            Input::Closed(c) => {
                self.stop_flows_on(c);
                self.with_node(i, |n, now| n.handle_closed(now, c))
            }
            Input::Accepted { conn, nonce } => {
                self.with_node(i, |n, now| n.handle_connected(now, conn, nonce))
            }
            Input::Connected {
                conn,
                to_source,
                nonce,
            } => {
                if !self.conns[conn.0 as usize].open {
                    return self.with_node(i, |n, now| {
                        n.handle_connect_failed(now, to_source, "reset".into())
                    });
                }
                if to_source {
                    self.with_node(i, |n, now| n.handle_source_connected(now, conn, nonce))
                } else {
                    self.with_node(i, |n, now| n.handle_upstream_connected(now, conn, nonce))
                }
            }
            Input::ConnectFailed { to_source } => self.with_node(i, |n, now| {
                n.handle_connect_failed(now, to_source, "connection refused".into())
            }),
        }
    }

    /// Carries out everything the source's machine has to say, then sets
    /// its timer.
    pub(super) fn drain_source(&mut self) {
        let now = self.now;
        while let Some((conn, msg)) = self.source.poll_transmit() {
            self.transmit(End::Source, conn, msg);
        }
        while let Some(action) = self.source.poll_action() {
            match action {
                SourceAction::StartReading => {}
                SourceAction::Serve { conn, .. } => {
                    if let Some((End::Node(i), _)) = self.other_end(conn, End::Source) {
                        self.source_outflows.push((conn, i));
                    }
                }
                SourceAction::Close { conn } => self.close(End::Source, conn),
            }
        }
        while let Some(ev) = self.source.poll_event() {
            if matches!(
                ev,
                SourceEvent::Finished { .. } | SourceEvent::Aborted { .. }
            ) {
                self.finished_at = Some(now);
            }
            if let SourceEvent::Aborted { reason } = &ev {
                self.aborted = Some(reason.clone());
            }
            if matches!(ev, SourceEvent::Slow { .. }) {
                self.slow += 1;
            }
            if matches!(ev, SourceEvent::Stranded { .. }) {
                self.stranded += 1;
            }
            match &ev {
                SourceEvent::NodeLog { name, lines, .. } => {
                    // A node's lines surface under its own name only.
                    let mine = format!("sim: {name} ");
                    if let Some(stray) = lines.iter().find(|l| !l.starts_with(&mine)) {
                        self.violate(format!("{stray:?} surfaced as {name}'s log line"));
                    }
                    self.logged.insert(name.clone());
                }
                SourceEvent::Relinked { node, upstream } => self.check_placement(*node, *upstream),
                SourceEvent::Started { .. } => {
                    let placed: Vec<_> = self.source.topology().breadth_first().flatten().collect();
                    for n in placed {
                        let upstream = self.source.topology().parent(n).flatten();
                        self.check_placement(n, upstream);
                    }
                }
                _ => {}
            }

            self.trace(|| format!("source {ev:?}"));
        }
        let next = self.source.poll_timeout().map(|(t, _)| t);
        if let Some(at) = next.filter(|_| next != self.source_timer) {
            self.source_timer = next;
            let incarnation = self.source_incarnation;
            self.schedule(
                at,
                Ev::Timer {
                    to: End::Source,
                    incarnation,
                },
            );
        }
    }

    /// A placement the source just made feeds `node` from an upstream that
    /// holds its offset, as the source knows both, or from the source.
    fn check_placement(
        &mut self,
        node: ka_core::ids::NodeId,
        upstream: Option<ka_core::ids::NodeId>,
    ) {
        let fed = self.source.topology().children(None).len();
        self.source_children_max = self.source_children_max.max(fed);
        let Some(at) = self.source.progress(node).map(|p| p.received) else {
            return;
        };
        if upstream.is_some() && !self.source.holds(upstream, at) {
            let held = upstream.and_then(|u| self.source.progress(u));
            self.violate(format!(
                "{node} placed under {upstream:?}, which does not hold its offset {at} ({held:?})"
            ));
        }
    }

    /// Gives node `i`'s machine its offsets, then one input through `f`,
    /// then drains it.
    pub(super) fn with_node(&mut self, i: usize, f: impl FnOnce(&mut Node, Time)) {
        let now = self.now;
        self.report_progress(i);
        let Some(machine) = self.nodes[i].machine.as_mut() else {
            return;
        };
        f(machine, now);
        self.drain_node(i);
    }

    /// Carries out everything node `i`'s machine has to say, then sets its
    /// timer.
    fn drain_node(&mut self, i: usize) {
        let me = End::Node(i);
        let mut log = Vec::new();
        loop {
            let Some(machine) = self.nodes[i].machine.as_mut() else {
                return;
            };
            // Each welcome is told in the node's log, as ka join does.
            if !log.is_empty() {
                machine.handle_log(self.now, std::mem::take(&mut log));
                continue;
            }
            if let Some((conn, msg)) = machine.poll_transmit() {
                // A node refuses nothing but its would-be downstreams.
                if matches!(msg, Message::Refused(_)) {
                    self.upstream_refusals += 1;
                }
                self.transmit(me, conn, msg);
                continue;
            }
            if let Some(action) = machine.poll_action() {
                self.node_action(i, action);
                continue;
            }
            if let Some(ev) = machine.poll_event() {
                if matches!(ev, NodeEvent::DownstreamEarly { .. }) {
                    self.early_downstreams += 1;
                }
                if let NodeEvent::Welcomed { node, .. } = &ev {
                    log.push(format!("sim: {} welcomed as {node}", self.nodes[i].name));
                }
                let line = format!("{} {ev:?}", self.nodes[i].name);
                self.trace(|| line);
                continue;
            }
            break;
        }
        let next = self.nodes[i]
            .machine
            .as_ref()
            .and_then(|m| m.poll_timeout())
            .map(|(t, _)| t);
        if let Some(at) = next.filter(|_| next != self.nodes[i].timer_at) {
            self.nodes[i].timer_at = next;
            let incarnation = self.nodes[i].incarnation;
            self.schedule(
                at,
                Ev::Timer {
                    to: me,
                    incarnation,
                },
            );
        }
    }

    /// Carries out one instruction of node `i`'s machine to its shell.
    fn node_action(&mut self, i: usize, action: NodeAction) {
        let me = End::Node(i);
        match action {
            NodeAction::ConnectSource => {
                let addr = self.source_addr;
                self.connect(me, addr, true);
            }
            NodeAction::ConnectUpstream { addr, .. } => self.connect(me, addr, false),
            NodeAction::Receive { conn, from } => {
                let Some((up, inc)) = self.other_end(conn, me) else {
                    return;
                };
                if self.incarnation(up) != inc {
                    return;
                }
                let have = self.offset_now(i);
                if from != have {
                    self.violate(format!(
                        "node{i} asked to receive from {from} but holds {have}"
                    ));
                }
                if let Some(floor) = self.nodes[i].floor.filter(|&f| from < f) {
                    self.violate(format!(
                        "node{i} started over after the source restarted: receives from {from}, held {floor}"
                    ));
                }
                self.settle(i);
                self.account_inflow(i);
                self.nodes[i].data.inflow = Some((conn, up));
                self.nodes[i].data.inflow_from = have as f64;
                self.nodes[i].data.following = false;
                self.retime(i);
            }
            NodeAction::Serve { conn, node, from } => {
                let Some((End::Node(d), _)) = self.other_end(conn, me) else {
                    return;
                };
                // A readable sink serves anything it wrote, a window what it
                // still holds; a later offset is served as it arrives.
                if let Some(held) = self.holds_from(i).filter(|&h| from < h) {
                    self.violate(format!(
                        "node{i} serves {node} (node{d}) from {from}, below its window (from {held})"
                    ));
                }
                self.nodes[i].data.outflows.push((conn, d));
            }
            NodeAction::Close { conn } => self.close(me, conn),
            NodeAction::StartOver => {
                // The simulated image never changes: a node that kept a prefix
                // must be let to keep it.
                self.violate(format!("node{i} was told to start over"));
            }
            NodeAction::ReadBack => {
                let digest = self.nodes[i].data.content.digest();
                self.with_node(i, |n, now| n.handle_readback(now, digest));
            }
            NodeAction::Exit { ok, reason } => {
                self.trace(|| format!("node{i:05} exits ok={ok}: {reason}"));
                if ok {
                    self.exited_ok_at
                        .push(self.now.saturating_since(Time::ZERO));
                }
                self.kill(i, false);
            }
        }
    }

    /// Starts a new process on node `i`, on the prefix it recorded as
    /// durable.
    pub(super) fn start_node(&mut self, i: usize) {
        let s = &mut self.nodes[i];
        s.incarnation += 1;
        s.frozen = false;
        s.pending.clear();
        s.timer_at = None;
        let mut cfg = NodeConfig::new(SESSION, s.name.clone(), s.addr);
        cfg.mac = [2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        // A packed stream's node joins as a file target would: its
        // machine learns from the welcome that it serves from a window.
        cfg.readable = self.cfg.window.is_none() || self.cfg.packed;
        // What a restarted node finds: the prefix it last recorded as durable
        // (never more than it had copied; what lies beyond is written again).
        let copied = if s.data.copied >= self.granules {
            self.cfg.size
        } else {
            s.data.copied as u64 * self.granule
        };
        let have = s.durable.min(copied);
        if have < self.cfg.size {
            s.data.copied = (have / self.granule) as usize;
        }
        s.started_from = have;
        // A new process keeps nothing of its old window.
        s.window_from = have;
        s.received = 0.0;
        s.floor = s.floor.map(|f| f.min(have));
        s.data.off0 = have as f64;
        s.data.t0 = self.now;
        s.data.rate = 0.0;
        s.data.hist.clear();
        s.data.ended = false;
        s.max_reported = have;
        let now = self.now;
        let resume = Some(ka_core::node::Resume {
            image: IMAGE_ID,
            have,
        });
        let key = ka_core::auth::node_key(&SimKey(self.cfg.seed), &cfg.name);
        s.machine = Some(Node::new(now, cfg, key, resume));
        self.trace(|| format!("node{i:05} starts holding {have}"));
        self.drain_node(i);
    }

    /// Ends a node's process: its connections reset, its flows stop.
    pub(super) fn kill(&mut self, i: usize, crash: bool) {
        if self.nodes[i].machine.is_none() {
            return;
        }
        self.settle(i);
        self.account_inflow(i);
        self.nodes[i].machine = None;
        self.nodes[i].frozen = false;
        self.nodes[i].pending.clear();
        let me = End::Node(i);
        let inc = self.nodes[i].incarnation;
        let mine: Vec<ConnId> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.open && (c.client == (me, inc) || c.server == (me, inc)))
            .map(|(k, _)| ConnId(k as u64))
            .collect();
        for c in mine {
            self.close(me, c);
        }
        if crash {
            self.trace(|| format!("node{i:05} killed"));
        }
    }

    /// The source's process dies (kill -9): every connection to it resets,
    /// and whoever it fed stops. Each live node's offset becomes its floor.
    pub(super) fn kill_source(&mut self) {
        self.trace(|| "source killed".into());
        // What the source's shell had written to its state file as outcomes
        // were decided.
        self.source_record = self
            .source
            .report()
            .into_iter()
            .filter_map(|r| r.outcome.map(|o| (r.name, r.mac, o)))
            .collect();
        let me = (End::Source, self.source_incarnation);
        let mine: Vec<ConnId> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.open && (c.client == me || c.server == me))
            .map(|(k, _)| ConnId(k as u64))
            .collect();
        for c in mine {
            self.close(End::Source, c);
        }
        self.source_down = true;
        self.source_timer = None;
        self.source_incarnation += 1;
        for i in 0..self.nodes.len() {
            if self.nodes[i].machine.is_some() {
                let at = self.offset_now(i);
                self.nodes[i].floor = Some(at);
            }
        }
    }

    /// The source starts again with the same settings on the same image,
    /// knowing only what its shell recorded: the outcomes decided so far.
    pub(super) fn start_source(&mut self) {
        let now = self.now;
        // The nodes retry every 200 ms: a restarted source waits a second for
        // them before starting with whoever is back (later ones join the stream).
        let mut config = self.source_config.clone();
        config.join_timeout = Some(Duration::from_secs(1));
        config.run = source_run(self.cfg.seed, u64::from(self.source_incarnation));
        let mut source = Source::new(now, config, Box::new(SimKey(self.cfg.seed)));
        source.handle_image_progress(now, self.cfg.size);
        for (name, mac, outcome) in self.source_record.clone() {
            source.handle_restored(now, name, mac, outcome);
        }
        self.source = source;
        self.source_down = false;
        self.source_started_at = now;
        self.image_done = false;
        self.source_outflows.clear();
        let restored = self.source_record.len();
        self.trace(|| format!("source starts again, {restored} outcomes restored"));
        // It reads the whole image to publish its digest.
        let hashing =
            Duration::from_secs_f64(self.cfg.size as f64 / (self.cfg.rate * HASH_SPEEDUP));
        let incarnation = self.source_incarnation;
        self.schedule(now + hashing, Ev::SourceHashed { incarnation });
        self.drain_source();
    }
}
