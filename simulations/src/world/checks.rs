//! The checkers: what must hold after every event, and at the end.
//!
//! After every event the source's topology is a tree (a simple path when the
//! arity is 1) over live nodes only, and no receiver is ahead of its sender:
//! data flows only downstream. The rest is checked where the world moves the
//! data: offsets only grow, nobody copies what its sender does not hold, and
//! no node is told to start over.
//!
//! With windows, the source may feed more than `arity` nodes (those no node
//! can feed), so a chain is a simple path below each of the source's
//! children; and no receiver goes on taking data from a sender whose window
//! has passed it by more than a data hop's worth (the sender's data plane
//! must have dropped it).
//!
//! At the end the session has finished (or aborted for a reason that was
//! right), every survivor's copy equals the source's image, no node took
//! more data than it lacked, every failure is named, and the run finished
//! within its bound. The first violation ends the run and is its verdict.

use core::time::Duration;

use ka_core::source::SourceState;

use super::faults::{Fault, FaultKind};
use super::{End, Sim};

impl Sim {
    /// The time the run must finish within, and how it was derived: the
    /// pipeline bound with room for setup when nothing goes wrong; after the
    /// last fault heals, detection and a re-stream at the slowest rate
    /// otherwise.
    pub(super) fn bound(&self) -> (Duration, &'static str) {
        let last_heal = self
            .faults
            .iter()
            .map(Fault::heals_at)
            .max()
            .unwrap_or(Duration::ZERO);
        let pipeline = self.cfg.pipeline_bound();
        if self.faults.is_empty() && self.swarm.late.is_empty() {
            // Joining and the data handshakes cost a fixed dozen or so hops
            // before the first byte; the 5 % is for everything else.
            (
                pipeline.mul_f64(1.05) + self.latency() * 16,
                "pipeline bound x 1.05 + 16 hops of setup",
            )
        } else {
            // After the last fault heals: detection, relink and reconnection,
            // then at worst a whole image from the slowest port (a slowed node
            // moved to the tail, or a restarted one catching up), plus the pipeline.
            let slowest = self.faults.iter().filter_map(|f| match f.kind {
                FaultKind::Slow(x) => Some(x),
                FaultKind::Crash
                | FaultKind::Hang(_)
                | FaultKind::Cut(_)
                | FaultKind::Restart(_)
                | FaultKind::SourceRestart(_)
                | FaultKind::DiskError => None,
            });
            let slow = f64::from(slowest.max().unwrap_or(1));
            let detect = Duration::from_millis(1000 + 250 + 200 + 500);
            let stream = pipeline.mul_f64(slow) + pipeline;
            (
                last_heal + detect + stream + Duration::from_secs(2),
                "last heal + detection + re-stream at the slowest rate + pipeline",
            )
        }
    }

    /// The bound of a run with windows, once it is known how many nodes
    /// the source fed at once: a node left behind its upstream's window
    /// (by a fault, or by an upstream that took the stream faster than it
    /// can pass it on to several children) costs a reconnect and is then
    /// fed by the source, whose port it shares with the others fed so. So
    /// after the last heal and detection, a re-stream at the slowest rate
    /// shared that many ways, plus a reconnect per node dropped or stranded.
    /// Without windows, or when the source never fed more than one node,
    /// `bound` as it was.
    pub(super) fn bound_with_windows(
        &self,
        bound: Duration,
        kind: &'static str,
    ) -> (Duration, &'static str) {
        let fed = self.source_children_max as u32;
        if self.cfg.window.is_none() || fed <= 1 {
            return (bound, kind);
        }
        let last_heal = self
            .faults
            .iter()
            .map(Fault::heals_at)
            .max()
            .unwrap_or(Duration::ZERO);
        let slowest = self.faults.iter().filter_map(|f| match f.kind {
            FaultKind::Slow(x) => Some(x),
            _ => None,
        });
        let slow = slowest.max().unwrap_or(1);
        let detect = Duration::from_millis(1000 + 250 + 200 + 500);
        let pipeline = self.cfg.pipeline_bound();
        let reconnects = Duration::from_millis(250) * (self.window_drops + self.stranded) as u32;
        let windowed = last_heal
            + detect
            + pipeline * (slow * fed)
            + pipeline
            + reconnects
            + Duration::from_secs(2);
        (
            windowed.max(bound),
            "last heal + detection + re-stream at the slowest rate shared by the nodes the source fed + reconnects",
        )
    }

    /// Records the run's first violation (later ones follow from it).
    pub(super) fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.trace(|| format!("VIOLATION {what}"));
            self.violation = Some(format!("at {}: {what}", self.now));
        }
    }

    /// The checks after every event: the topology when it changed, and the
    /// receivers whose data changed since the last check.
    pub(super) fn check_invariants(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let epoch = self.source.epoch();
        if self.checked_epoch != Some(epoch) {
            self.checked_epoch = Some(epoch);
            let topo = self.source.topology();
            if let Err(e) = topo.check() {
                return self.violate(format!("topology: {e}"));
            }
            if self.cfg.arity == 1 && self.cfg.window.is_none() && !topo.is_chain() {
                return self.violate("arity 1 but the topology is not a simple path".into());
            }
            if self.cfg.arity == 1 && self.cfg.window.is_some() {
                let forked = topo
                    .breadth_first()
                    .flatten()
                    .find(|&n| topo.children(Some(n)).len() > 1);
                if let Some(n) = forked {
                    return self.violate(format!("arity 1 but {n} feeds more than one node"));
                }
            }
            // Only live nodes have a place.
            let placed: Vec<ka_core::ids::NodeId> = topo.breadth_first().flatten().collect();
            if let Some(n) = placed.into_iter().find(|&n| !self.source.is_live(n)) {
                return self.violate(format!("{n} is in the topology but not live"));
            }
        }
        // Data flows only downstream: a receiver is never ahead of its sender.
        let dirty = core::mem::take(&mut self.dirty);
        // What a receiver may lag behind the moment its sender's window
        // passed it: the world looks again at least every data hop.
        let slack = (self.cfg.payload_rate() * self.cfg.data_hop().as_secs_f64()) as u64 + 2;
        for i in dirty {
            if let Some((conn, End::Node(u))) = self.nodes[i].data.inflow {
                if self.conns[conn.0 as usize].open {
                    if let Some(held) = self.holds_from(u) {
                        let at = self.offset_now(i);
                        if at + slack < held {
                            return self.violate(format!(
                                "node{i} at {at} still receives from node{u}, whose window starts at {held}"
                            ));
                        }
                    }
                    let mine = self.offset_at(i, self.now);
                    let theirs = self
                        .offset_at(u, self.now)
                        .max(self.nodes[i].data.inflow_from);
                    if mine > theirs + 1.0 {
                        return self.violate(format!(
                            "node{i} at {mine} is ahead of its upstream node{u} at {theirs}"
                        ));
                    }
                }
            }
        }
    }

    /// The checks at the end of a run that finished at `completion` and
    /// had to by `bound`.
    pub(super) fn final_checks(&mut self, completion: Duration, bound: Duration) {
        if self.violation.is_some() {
            return;
        }
        if self.finished_at.is_none() {
            let state = self.source.state();
            let stuck = self
                .nodes
                .iter()
                .enumerate()
                .find(|(_, s)| s.machine.as_ref().is_some_and(|m| m.verdict().is_none()))
                .map(|(i, s)| {
                    let m = s.machine.as_ref().expect("found");
                    format!(
                        "; first stuck: node{i} at {} rate {} inflow {:?} following {} | core: {:?} upstream {:?} phase {:?}",
                        self.offset_at(i, self.now),
                        s.data.rate,
                        s.data.inflow,
                        s.data.following,
                        m.control(),
                        m.upstream(),
                        m.phase()
                    )
                })
                .unwrap_or_default();
            return self.violate(format!(
                "session did not finish by the time limit (source {state:?}){stuck}"
            ));
        }
        if let Some(reason) = &self.aborted {
            // Aborting at the join deadline is right when too few nodes could
            // have joined by then: the rest were late or struck down early.
            // The deadline runs from the start of the source process that
            // aborted (a restarted one waits a second from its restart).
            let deadline = self
                .source_started_at
                .saturating_since(ka_core::time::Time::ZERO)
                + self.source.config().join_timeout.unwrap_or(Duration::ZERO);
            let could_join = (0..self.cfg.nodes)
                .filter(|&i| !self.swarm.late.iter().any(|&(n, _)| n == i))
                .filter(|&i| !self.faults.iter().any(|f| f.node == i && f.at <= deadline))
                .count() as u32;
            if reason.contains("join deadline") && could_join < self.source.config().min_nodes {
                return;
            }
        }
        if self.source.state() != SourceState::Finished {
            return self.violate(format!("session ended as {:?}", self.source.state()));
        }
        let report = self.source.report();
        // A node still cut off, frozen or restarting when everyone else was
        // done cannot have rejoined: its KO is the right answer, not a bug,
        // as long as the report names it.
        let margin = Duration::from_millis(1500);
        let excused = |i: usize| {
            self.faults
                .iter()
                .any(|f| f.node == i && f.heals_at() + margin > completion)
                || self
                    .swarm
                    .late
                    .iter()
                    .any(|&(n, d)| n == i && d + margin > completion)
        };
        for (i, s) in self.nodes.iter().enumerate() {
            let Some(r) = report.iter().find(|r| r.name == s.name) else {
                if excused(i) || s.gone {
                    continue;
                }
                let what = format!("node{i} never joined");
                return self.violate(what);
            };
            if s.gone || (excused(i) && !r.is_ok()) {
                if r.is_ok() && s.disk_failed {
                    let what = format!("node{i} reported OK after its disk failed");
                    return self.violate(what);
                }
                continue;
            }
            match &r.outcome {
                Some(Ok(())) => {
                    if !self.logged.contains(&s.name) {
                        let what = format!(
                            "node{i} verified, but no line of its log surfaced at the source"
                        );
                        return self.violate(what);
                    }
                    if s.data.content != self.source_data {
                        let what =
                            format!("node{i} reported OK but its copy differs from the source");
                        return self.violate(what);
                    }
                    // A node receives only what it lacks: its process never
                    // takes more than the image beyond the prefix it started
                    // with, whatever restarted (it, its upstreams, the source).
                    let received = self.received(i);
                    let lacked = (self.cfg.size - s.started_from) as f64;
                    if received > lacked + self.granule as f64 + 1.0 {
                        let what = format!(
                            "node{i} received {received:.0} bytes but lacked only {lacked:.0} (started from {})",
                            s.started_from
                        );
                        return self.violate(what);
                    }
                }
                Some(Err(e)) if e.contains("dropped") => {}
                other => {
                    let what = format!("surviving node{i} did not finish OK: {other:?}");
                    return self.violate(what);
                }
            }
        }
        if completion > bound {
            self.violate(format!(
                "finished at {:.3}s, over the bound of {:.3}s",
                completion.as_secs_f64(),
                bound.as_secs_f64()
            ));
        }
    }
}
