//! The data plane: image data as a fluid, and the durable prefix.
//!
//! Between events a receiving node's offset grows linearly, in segments
//! (start, offset, rate). Its rate is the least of its own port, its
//! sender's port shared among the sender's receivers, and its disk; once it
//! has caught up with its sender it moves at the sender's rate one data hop
//! later, since what reaches it now left the sender that long ago. A change
//! of rate starts a new segment and reaches each receiver one data hop later
//! (at once for receivers still catching up), so a run costs a few events
//! per node instead of one per piece. Each node keeps the last few hops of
//! its segments, for the offset a receiver one hop away sees.
//!
//! A node's machine hears its offset as received and written, and the node
//! records a durable prefix now and then, as the real shell syncs its target
//! and records how far it got: that prefix, never more than the node copied,
//! is what it finds when it restarts.
//!
//! With a window (see the world's docs), a node's machine also hears where
//! its window starts, and a receiver is watched against its sender's
//! window: from the two offsets and rates the world knows when the sender's
//! window will pass the receiver, and checks again then (and at every
//! retime). A receiver the window passed is dropped by its sender's data
//! plane.

use core::time::Duration;
use std::collections::VecDeque;

use ka_core::codec::Progress;
use ka_core::config::{RECORD_EVERY as DURABLE_EVERY, RECORD_STEP as DURABLE_STEP};
use ka_core::ids::ConnId;
use ka_core::time::Time;

use super::{Content, End, Ev, Input, Sim};

/// The data side of a node: a fluid offset and the copy it has made.
#[derive(Debug, Clone)]
pub(super) struct Data {
    /// The current segment: from `t0`, the offset is `off0` plus `rate`
    /// bytes a second.
    pub(super) t0: Time,
    /// The offset at `t0`.
    pub(super) off0: f64,
    /// Bytes a second since `t0`.
    pub(super) rate: f64,
    /// The connection and sender it receives from.
    pub(super) inflow: Option<(ConnId, End)>,
    /// Caught up with the sender: moves at its rate, one latency later.
    pub(super) following: bool,
    /// Our offset when the current inflow began: what we held before it.
    pub(super) inflow_from: f64,
    /// Bumped at every retime: an event scheduled for an older generation
    /// is stale.
    pub(super) gen: u64,
    /// Granules copied so far (a prefix).
    pub(super) copied: usize,
    /// The copy itself.
    pub(super) content: Content,
    /// Nodes (and connections) this node serves.
    pub(super) outflows: Vec<(ConnId, usize)>,
    /// Earlier segments (start, offset, rate), oldest first, for the offset
    /// a receiver one hop away sees.
    pub(super) hist: VecDeque<(Time, f64, f64)>,
    /// The node's offset reached the end of the image and its machine has
    /// been told.
    pub(super) ended: bool,
}

impl Data {
    /// A node's data before it starts: nothing held, nothing flowing, and
    /// `content` as its (empty) copy.
    pub(super) fn new(content: Content) -> Self {
        Data {
            t0: Time::ZERO,
            off0: 0.0,
            rate: 0.0,
            inflow: None,
            following: false,
            inflow_from: 0.0,
            gen: 0,
            copied: 0,
            content,
            outflows: Vec::new(),
            hist: VecDeque::new(),
            ended: false,
        }
    }
}

impl Sim {
    /// Hands the node's machine its data plane's current offsets.
    pub(super) fn report_progress(&mut self, i: usize) {
        // Offsets are analytic; the copy itself is brought up to date only
        // when it matters (a rate change, a relink, the end), which keeps a
        // long chain from re-copying on every heartbeat.
        self.dirty.push(i);
        let received = self.offset_now(i);
        let s = &mut self.nodes[i];
        if received < s.max_reported {
            let what = format!(
                "node{i} offset went back from {} to {received}",
                s.max_reported
            );
            self.violate(what);
            return;
        }
        s.max_reported = received;
        let now = self.now;
        // The shell syncs the target and records the prefix now and then.
        if received >= s.durable + DURABLE_STEP
            || now.saturating_since(s.durable_at) >= DURABLE_EVERY
        {
            s.durable = s.durable.max(received - received % self.granule);
            s.durable_at = now;
        }
        let holds_from = self.holds_from(i).unwrap_or(0);
        if let Some(m) = self.nodes[i].machine.as_mut() {
            m.handle_progress(
                now,
                Progress {
                    received,
                    written: received,
                    holds_from,
                },
            );
        }
    }

    /// Where node `u`'s window starts now, in whole bytes as its machine
    /// hears it; `None` without windows.
    pub(super) fn holds_from(&self, u: usize) -> Option<u64> {
        let w = self.cfg.window?;
        let s = &self.nodes[u];
        Some(s.window_from.max(self.offset_now(u).saturating_sub(w)))
    }

    /// With windows: when, at the present rates, node `i` falls out of its
    /// sender's window; a check is scheduled then (for this generation of
    /// `i`'s rates: a retime plans again).
    fn plan_window_check(&mut self, i: usize, gen: u64) {
        let Some(w) = self.cfg.window else {
            return;
        };
        let Some((conn, End::Node(u))) = self.nodes[i].data.inflow else {
            return;
        };
        if !self.conns[conn.0 as usize].open || self.nodes[i].data.ended {
            return;
        }
        let mine = self.offset_at(i, self.now);
        let start = self.offset_at(u, self.now) - w as f64;
        // Two bytes past the crossing, so the whole-byte check then finds it.
        let gap = mine + 2.0 - start;
        let closing = self.nodes[u].data.rate - self.nodes[i].data.rate;
        if self.holds_from(u).is_some_and(|h| self.offset_now(i) < h) {
            self.schedule(self.now, Ev::WindowCheck { node: i, gen });
        } else if closing > 0.0 {
            // At least a microsecond on, so rounding cannot make the check
            // and its plan chase each other at one moment.
            let wait =
                Duration::from_secs_f64(gap.max(0.0) / closing).max(Duration::from_micros(1));
            self.schedule(self.now + wait, Ev::WindowCheck { node: i, gen });
        }
    }

    /// A planned check of node `i` against its sender's window: a sender
    /// whose window has passed `i` can no longer serve it, and its data
    /// plane closes the connection (the sender's machine hears it closed,
    /// as from its shell); otherwise plan again.
    pub(super) fn window_check(&mut self, i: usize, gen: u64) {
        let Some((conn, End::Node(u))) = self.nodes[i].data.inflow else {
            return;
        };
        if !self.conns[conn.0 as usize].open {
            return;
        }
        let mine = self.offset_now(i);
        let Some(held) = self.holds_from(u).filter(|&h| mine < h) else {
            return self.plan_window_check(i, gen);
        };
        self.trace(|| {
            format!("node{u:05} drops node{i:05}: it is at {mine}, the window starts at {held}")
        });
        self.window_drops += 1;
        self.close(End::Node(u), conn);
        if self.nodes[u].frozen {
            self.nodes[u].pending.push_back(Input::Closed(conn));
        } else {
            self.node_input(u, Input::Closed(conn));
        }
    }

    /// When the bytes a node's stream holds now were at its sender: one data
    /// hop ago (latency plus the forward delay, see
    /// [`SimConfig::data_hop`](super::SimConfig::data_hop)).
    fn hop_ago(&self) -> Time {
        let hop = self.cfg.data_hop().as_nanos() as u64;
        Time::from_nanos(self.now.as_nanos().saturating_sub(hop))
    }

    /// A node's offset at `t`, from its current segment or, for a time before
    /// it began, from the segments it had before.
    pub(super) fn offset_at(&self, i: usize, t: Time) -> f64 {
        let d = &self.nodes[i].data;
        let size = self.cfg.size as f64;
        // Arrival times are rounded to nanoseconds: snap the last fraction of
        // a byte so a node that arrived holds the whole image.
        let snap = |v: f64| if v > size - 0.01 { size } else { v };
        if t >= d.t0 {
            return snap(d.off0 + d.rate * t.saturating_since(d.t0).as_secs_f64());
        }
        for &(t0, off0, rate) in d.hist.iter().rev() {
            if t >= t0 {
                return snap(off0 + rate * t.saturating_since(t0).as_secs_f64());
            }
        }
        d.hist.front().map_or(d.off0, |&(_, off0, _)| off0)
    }

    /// A node's rate at `t`.
    fn rate_at(&self, i: usize, t: Time) -> f64 {
        let d = &self.nodes[i].data;
        if t >= d.t0 {
            return d.rate;
        }
        d.hist
            .iter()
            .rev()
            .find(|&&(t0, _, _)| t >= t0)
            .map_or(0.0, |&(_, _, r)| r)
    }

    /// The bytes node `i`'s current process has received over the network:
    /// on its closed inflows, and on its open one so far.
    pub(super) fn received(&self, i: usize) -> f64 {
        let d = &self.nodes[i].data;
        let current = d
            .inflow
            .map_or(0.0, |_| self.offset_at(i, self.now).floor() - d.inflow_from);
        self.nodes[i].received + current.max(0.0)
    }

    /// A node's offset now, in whole bytes.
    pub(super) fn offset_now(&self, i: usize) -> u64 {
        self.offset_at(i, self.now) as u64
    }

    /// What of the sender's stream has reached a receiver by now: the sender's
    /// offset one data hop ago (a node that has everything serves from its
    /// disk; the source serves from its image at once).
    fn frontier(&self, e: End) -> f64 {
        match e {
            End::Source => self.cfg.size as f64,
            End::Node(u) => self.offset_at(u, self.hop_ago()),
        }
    }

    /// The rate at which the sender's stream reaches a receiver now.
    fn frontier_rate(&self, e: End) -> f64 {
        match e {
            End::Source => f64::INFINITY,
            End::Node(u) => {
                if self.frontier(e) >= self.cfg.size as f64 {
                    return f64::INFINITY;
                }
                self.rate_at(u, self.hop_ago())
            }
        }
    }

    /// The rate at which image data leaves or enters a port: the payload
    /// share of its raw rate (see
    /// [`SimConfig::payload_rate`](super::SimConfig::payload_rate)).
    fn port_rate(&self, e: End) -> f64 {
        match e {
            End::Source => self.cfg.payload_rate(),
            End::Node(u) => {
                let s = &self.nodes[u];
                if s.frozen || s.cut_until.is_some_and(|t| t > self.now) || s.machine.is_none() {
                    0.0
                } else {
                    self.cfg.payload_rate() / f64::from(s.slow)
                }
            }
        }
    }

    /// The receivers `e` serves, with their connections.
    fn outflows(&self, e: End) -> &[(ConnId, usize)] {
        match e {
            End::Source => &self.source_outflows,
            End::Node(u) => &self.nodes[u].data.outflows,
        }
    }

    /// How many receivers share `e`'s port now (at least one).
    fn fan_out(&self, e: End) -> usize {
        self.outflows(e)
            .iter()
            .filter(|&&(c, d)| self.nodes[d].data.inflow.is_some_and(|(ic, _)| ic == c))
            .count()
            .max(1)
    }

    /// Starts a new segment at the node's current offset with `rate`.
    fn set_rate(&mut self, i: usize, rate: f64) -> bool {
        let off = self.offset_at(i, self.now);
        let now = self.now;
        let horizon = self.cfg.data_hop() * 4;
        let d = &mut self.nodes[i].data;
        if (rate - d.rate).abs() <= 1e-9 {
            return false;
        }
        d.hist.push_back((d.t0, d.off0, d.rate));
        // Only the last few hops' worth of history is ever asked for.
        while d.hist.len() > 2 && d.hist[1].0 + horizon < now {
            d.hist.pop_front();
        }
        d.t0 = now;
        d.off0 = off;
        d.rate = rate;
        true
    }

    /// Recomputes a node's receive rate and schedules what follows from it.
    pub(super) fn retime(&mut self, i: usize) {
        self.settle(i);
        let size = self.cfg.size as f64;
        let off = self.offset_at(i, self.now);
        let (rate, following) = match self.nodes[i].data.inflow {
            Some((conn, from)) if self.conns[conn.0 as usize].open && off < size => {
                let cap = self
                    .port_rate(End::Node(i))
                    .min(self.port_rate(from) / self.fan_out(from) as f64);
                let cap = self.cfg.disk_rate.map_or(cap, |r| cap.min(r));
                let reachable = self.frontier(from);
                if off + 1.0 < reachable {
                    (cap, false)
                } else if off > reachable + 1.0 {
                    // Ahead of this sender (it came from elsewhere before):
                    // wait until the sender's stream gets here.
                    let srate = self.frontier_rate(from);
                    if srate > 0.0 && srate.is_finite() {
                        let wait = Duration::from_secs_f64((off - reachable) / srate);
                        let gen = self.nodes[i].data.gen + 1;
                        self.schedule(self.now + wait, Ev::Retime { node: i, gen });
                    }
                    (0.0, false)
                } else {
                    (cap.min(self.frontier_rate(from)), true)
                }
            }
            _ => (0.0, false),
        };
        let changed = self.set_rate(i, rate);
        let d = &mut self.nodes[i].data;
        d.following = following;
        d.gen += 1;
        let gen = d.gen;
        self.plan_window_check(i, gen);
        // The sender's stream as seen from here changes one data hop after
        // the sender's own rate did: look again then.
        if let Some((_, End::Node(u))) = self.nodes[i].data.inflow {
            let seen = self.hop_ago();
            let ud = &self.nodes[u].data;
            let next = ud
                .hist
                .iter()
                .map(|h| h.0)
                .chain([ud.t0])
                .filter(|&b| b > seen)
                .min();
            if let Some(b) = next {
                self.schedule(b + self.cfg.data_hop(), Ev::Retime { node: i, gen });
            }
        }
        if rate > 0.0 {
            // Rounded up, so the node is really there when the event fires.
            let to_end = Duration::from_secs_f64((size - off) / rate) + Duration::from_nanos(1);
            self.schedule(self.now + to_end, Ev::Arrive { node: i, gen });
            if !following {
                // Catching up: when do we meet the sender's stream?
                if let Some((_, from)) = self.nodes[i].data.inflow {
                    let srate = self.frontier_rate(from);
                    if srate.is_finite() && srate < rate {
                        let gap = (self.frontier(from) - off).max(0.0);
                        let catch = Duration::from_secs_f64(gap / (rate - srate));
                        self.schedule(self.now + catch, Ev::Retime { node: i, gen });
                    }
                }
            }
        } else if off >= size && !self.nodes[i].data.ended {
            self.schedule(self.now, Ev::Arrive { node: i, gen });
        }
        if changed {
            self.propagate(End::Node(i));
        }
    }

    /// A sender's rate changed: receivers catching up recompute now; every
    /// receiver feels the change itself one data hop later.
    fn propagate(&mut self, from: End) {
        let outflows = self.outflows(from).to_vec();
        for (conn, d) in outflows {
            if self.nodes[d].data.inflow.map(|(c, _)| c) != Some(conn) {
                continue;
            }
            if !self.nodes[d].data.following {
                self.retime(d);
            }
            let gen = self.nodes[d].data.gen;
            let at = self.now + self.cfg.data_hop();
            self.schedule(at, Ev::Retime { node: d, gen });
        }
    }

    /// `conn` closed: whoever received on it stops, and its sender's other
    /// receivers get a bigger share.
    pub(super) fn stop_flows_on(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(conn.0 as usize) else {
            return;
        };
        let ends = [c.client.0, c.server.0];
        for end in ends {
            if let End::Node(i) = end {
                if self.nodes[i].data.inflow.is_some_and(|(c, _)| c == conn) {
                    self.settle(i);
                    self.account_inflow(i);
                    self.nodes[i].data.inflow = None;
                    self.retime(i);
                }
            }
        }
        for end in ends {
            let flows = match end {
                End::Source => &mut self.source_outflows,
                End::Node(u) => &mut self.nodes[u].data.outflows,
            };
            let before = flows.len();
            flows.retain(|&(c, _)| c != conn);
            if flows.len() != before {
                // The remaining receivers of this sender get a bigger share.
                self.propagate(end);
            }
        }
    }

    /// A node's offset reached the end of the image: once its copy is whole,
    /// it is durable, its machine hears the stream ended, and (for the first
    /// source's first full read) the source learns its digest.
    pub(super) fn arrive(&mut self, i: usize) {
        self.settle(i);
        if self.nodes[i].data.ended {
            return;
        }
        if self.nodes[i].data.copied < self.granules {
            // Rounding put us a hair ahead of our sender: look again a hop later.
            let gen = self.nodes[i].data.gen;
            self.schedule(self.now + self.cfg.data_hop(), Ev::Arrive { node: i, gen });
            return;
        }
        self.nodes[i].data.ended = true;
        // The sink's finish flushed everything: the whole copy is durable.
        self.nodes[i].durable = self.cfg.size;
        self.set_rate(i, 0.0);
        // The first source hashes its image as it serves it from offset 0; a
        // restarted one hashes it on its own (SourceHashed).
        let from_source = matches!(self.nodes[i].data.inflow, Some((_, End::Source)));
        if from_source && !self.image_done && self.source_incarnation == 0 {
            self.image_done = true;
            let (size, digest) = (self.cfg.size, self.source_digest);
            let (now, image) = (self.now, self.image_digest());
            self.source.handle_image_done(now, size, digest, image);
            self.drain_source();
        }
        let digest = self.nodes[i].data.content.digest();
        let size = self.cfg.size;
        self.with_node(i, |n, now| n.handle_stream_end(now, size, digest));
        // Receivers can now read everything from this node's disk.
        self.propagate(End::Node(i));
    }

    /// Adds what the node received on its current inflow to its count and
    /// starts counting afresh from its offset now. Counted in whole bytes,
    /// as a node holds them: a fraction counted here would be received
    /// again by the next inflow, which starts at the whole bytes held, and
    /// a node that changes upstream often would seem to take more than it
    /// lacked.
    pub(super) fn account_inflow(&mut self, i: usize) {
        if self.nodes[i].data.inflow.is_some() {
            let off = self.offset_at(i, self.now).floor();
            let d = &mut self.nodes[i].data;
            self.nodes[i].received += (off - d.inflow_from).max(0.0);
            self.nodes[i].data.inflow_from = off;
        }
    }

    /// A node's port or process changed: it and everyone it serves recompute.
    pub(super) fn retime_around(&mut self, i: usize) {
        self.retime(i);
        self.propagate(End::Node(i));
        let outs = self.nodes[i].data.outflows.clone();
        for (_, d) in outs {
            self.retime(d);
        }
    }
}
