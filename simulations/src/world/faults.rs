//! Faults: what can go wrong, when, and to whom.
//!
//! A run either has no faults, an explicit schedule (tests), or a *swarm*:
//! the seed first picks which kinds of fault are enabled and how often, then
//! draws the schedule, so different seeds explore different mixes (as in
//! TigerBeetle's VOPR). The schedule is printed, so any failure replays with
//! `--seed N`. Every draw comes from the run's fault generator, in a fixed
//! order: the kinds, the schedule, then the source's control jitter.
//!
//! The world applies each fault when it strikes. A crash or a restart kills
//! the node's process and resets its connections; a hang freezes it, its
//! inputs waiting until it continues; a cut holds everything on its port; a
//! slow port moves data slower for good; a disk error fails the node's sink;
//! a source restart kills the source, which the nodes must wait out.

use core::fmt;
use core::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Ev, Faults, Sim, SimConfig};

/// A kind of trouble a swarm may enable. A seed first enables a subset of
/// these, then draws every fault of its schedule from that subset, so two
/// seeds differ in the mix of trouble as well as in its timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwarmKind {
    /// Nodes crash ([`FaultKind::Crash`]).
    Crash,
    /// Nodes freeze for a while ([`FaultKind::Hang`]).
    Hang,
    /// Nodes' ports are cut for a while ([`FaultKind::Cut`]).
    Cut,
    /// Nodes' ports slow down for good ([`FaultKind::Slow`]).
    Slow,
    /// Nodes restart on what they recorded as durable ([`FaultKind::Restart`]).
    Restart,
    /// The source restarts, at most once a run ([`FaultKind::SourceRestart`]).
    SourceRestart,
    /// Nodes' disks fail ([`FaultKind::DiskError`]).
    DiskError,
    /// Nodes join after the start: not a fault but a start delay, drawn
    /// with the faults so it mixes with them.
    LateJoin,
}

impl SwarmKind {
    /// Every kind, in the order a seed considers them: the seed's draws
    /// follow this order, so it is part of what a seed means.
    pub const ALL: [SwarmKind; 8] = [
        SwarmKind::Crash,
        SwarmKind::Hang,
        SwarmKind::Cut,
        SwarmKind::Slow,
        SwarmKind::Restart,
        SwarmKind::SourceRestart,
        SwarmKind::DiskError,
        SwarmKind::LateJoin,
    ];

    /// The short name the simulator prints among a run's options.
    pub fn name(self) -> &'static str {
        match self {
            SwarmKind::Crash => "crash",
            SwarmKind::Hang => "hang",
            SwarmKind::Cut => "cut",
            SwarmKind::Slow => "slow",
            SwarmKind::Restart => "restart",
            SwarmKind::SourceRestart => "source",
            SwarmKind::DiskError => "disk",
            SwarmKind::LateJoin => "late",
        }
    }
}

impl fmt::Display for SwarmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing that goes wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// The node's process is killed (kill -9): its sockets reset at once.
    Crash,
    /// The node's process is frozen (SIGSTOP) for a while, then continues.
    Hang(Duration),
    /// The node's port is cut for a while, then restored.
    Cut(Duration),
    /// The node's port becomes this many times slower for the rest of the run.
    Slow(u32),
    /// The node is killed and started again after a delay, keeping the prefix
    /// of its copy it had last recorded as durable (a file or disk target).
    Restart(Duration),
    /// The source's process is killed and started again on the same image
    /// after a delay (the fault's node is ignored): the nodes must wait,
    /// rejoin and finish without starting over.
    SourceRestart(Duration),
    /// The node's disk fails.
    DiskError,
}

/// A fault at a time, on a node (by index, 0-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// When it strikes.
    pub at: Duration,
    /// Which node.
    pub node: usize,
    /// What happens.
    pub kind: FaultKind,
}

impl Fault {
    /// When the fault has fully healed (the moment after which the run is
    /// fault-free for this node): the end of a hang, cut or restart delay.
    pub fn heals_at(&self) -> Duration {
        match self.kind {
            FaultKind::Hang(d)
            | FaultKind::Cut(d)
            | FaultKind::Restart(d)
            | FaultKind::SourceRestart(d) => self.at + d,
            FaultKind::Crash | FaultKind::Slow(_) | FaultKind::DiskError => self.at,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.at.as_secs_f64();
        match &self.kind {
            FaultKind::Crash => write!(f, "{at:.3}s crash node{}", self.node),
            FaultKind::Hang(d) => write!(
                f,
                "{at:.3}s hang node{} for {:.3}s",
                self.node,
                d.as_secs_f64()
            ),
            FaultKind::Cut(d) => write!(
                f,
                "{at:.3}s cut node{} for {:.3}s",
                self.node,
                d.as_secs_f64()
            ),
            FaultKind::Slow(x) => write!(f, "{at:.3}s slow node{} by {x}x", self.node),
            FaultKind::Restart(d) => write!(
                f,
                "{at:.3}s restart node{} after {:.3}s",
                self.node,
                d.as_secs_f64()
            ),
            FaultKind::SourceRestart(d) => {
                write!(
                    f,
                    "{at:.3}s restart the source after {:.3}s",
                    d.as_secs_f64()
                )
            }
            FaultKind::DiskError => write!(f, "{at:.3}s disk error on node{}", self.node),
        }
    }
}

/// A fault as the simulator's `--fault` option writes it:
/// `KIND:NODE@SECONDS[:ARG]`, the node 0-based, times in seconds:
/// `crash:4@1.0`, `hang:3@1.0:1.5` (for 1.5 s), `cut:3@1.0:0.5`,
/// `slow:2@0.5:4` (4 times slower), `restart:2@1.0:0.3` (back after
/// 0.3 s), `disk:1@2.0`, and `source@2.0:0.8` (the source restarts, back
/// after 0.8 s).
impl core::str::FromStr for Fault {
    type Err = String;

    fn from_str(spec: &str) -> Result<Fault, String> {
        let usage = "write a fault as KIND:NODE@SECONDS[:ARG], e.g. crash:4@1.0, hang:3@1.0:1.5, \
                     cut:3@1.0:0.5, slow:2@0.5:4, restart:2@1.0:0.3, disk:1@2.0 or source@2.0:0.8";
        let bad = |what: &str| format!("bad fault {spec:?}: {what}; {usage}");
        let (who, when) = spec.split_once('@').ok_or_else(|| bad("no @"))?;
        let (kind, node) = match who.split_once(':') {
            Some((kind, node)) => {
                let node = node.parse().map_err(|_| bad("the node is not a number"))?;
                (kind, node)
            }
            None => (who, 0),
        };
        let (at, arg) = match when.split_once(':') {
            Some((at, arg)) => (at, Some(arg)),
            None => (when, None),
        };
        let secs = |s: &str, what: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad(&format!("{what} is not a number of seconds")))
        };
        let at = secs(at, "the time")?;
        let duration =
            |arg: Option<&str>| secs(arg.ok_or_else(|| bad("no duration"))?, "the duration");
        let kind = match (kind, arg) {
            ("crash", None) => FaultKind::Crash,
            ("disk", None) => FaultKind::DiskError,
            ("hang", arg) => FaultKind::Hang(duration(arg)?),
            ("cut", arg) => FaultKind::Cut(duration(arg)?),
            ("restart", arg) => FaultKind::Restart(duration(arg)?),
            ("source", arg) => FaultKind::SourceRestart(duration(arg)?),
            ("slow", Some(x)) => FaultKind::Slow(
                x.parse()
                    .ok()
                    .filter(|&x| x >= 1)
                    .ok_or_else(|| bad("the slowdown is not a whole factor of 1 or more"))?,
            ),
            ("slow", None) => return Err(bad("no slowdown factor")),
            ("crash" | "disk", Some(_)) => return Err(bad("this kind takes no argument")),
            _ => return Err(bad("unknown kind")),
        };
        Ok(Fault { at, node, kind })
    }
}

/// A late join as the simulator's `--late` option writes it: `NODE@SECONDS`
/// (node 0-based): the node starts that long after the source.
pub fn parse_late(spec: &str) -> Result<(usize, Duration), String> {
    let bad = || format!("bad late join {spec:?}: write NODE@SECONDS, e.g. 5@0.3");
    let (node, at) = spec.split_once('@').ok_or_else(bad)?;
    let node = node.parse().map_err(|_| bad())?;
    let at = at
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(bad)?;
    Ok((node, Duration::from_secs_f64(at)))
}

/// Which late joins and faults a swarm enabled, for the printed options.
#[derive(Debug, Clone, Default)]
pub struct Swarm {
    /// The kinds the swarm enabled (none when the run has no swarm: no
    /// faults, or a given schedule).
    pub kinds: Vec<SwarmKind>,
    /// The drawn schedule.
    pub faults: Vec<Fault>,
    /// Nodes that join late, with their start delay.
    pub late: Vec<(usize, Duration)>,
}

/// Draws a swarm of faults for `nodes` nodes over a run expected to last
/// `expected`. Faults strike in the middle 80 % of the run and at most a
/// fifth of the nodes are hit, so a run still says something about survivors.
pub fn swarm(rng: &mut ChaCha8Rng, nodes: usize, expected: Duration) -> Swarm {
    let mut enabled: Vec<SwarmKind> = SwarmKind::ALL
        .iter()
        .copied()
        .filter(|_| rng.gen_bool(0.5))
        .collect();
    if enabled.is_empty() {
        enabled.push(SwarmKind::ALL[rng.gen_range(0..SwarmKind::ALL.len())]);
    }
    let max_hits = (nodes / 5).max(1);
    let count = rng.gen_range(1..=max_hits.min(12));
    let mut faults = Vec::new();
    let mut late = Vec::new();
    let exp = expected.as_secs_f64().max(0.5);
    for _ in 0..count {
        let node = rng.gen_range(0..nodes);
        let at = Duration::from_secs_f64(exp * rng.gen_range(0.1..0.9));
        let kind = match enabled[rng.gen_range(0..enabled.len())] {
            SwarmKind::Crash => FaultKind::Crash,
            SwarmKind::Hang => FaultKind::Hang(Duration::from_millis(rng.gen_range(200..3000))),
            SwarmKind::Cut => FaultKind::Cut(Duration::from_millis(rng.gen_range(100..3000))),
            SwarmKind::Slow => FaultKind::Slow(rng.gen_range(2..8)),
            SwarmKind::Restart => {
                FaultKind::Restart(Duration::from_millis(rng.gen_range(100..2000)))
            }
            SwarmKind::SourceRestart => {
                // One source restart per run: more say nothing new and stretch it.
                if faults
                    .iter()
                    .any(|f: &Fault| matches!(f.kind, FaultKind::SourceRestart(_)))
                {
                    continue;
                }
                FaultKind::SourceRestart(Duration::from_millis(rng.gen_range(100..2000)))
            }
            SwarmKind::DiskError => FaultKind::DiskError,
            SwarmKind::LateJoin => {
                if !late.iter().any(|&(n, _)| n == node) {
                    late.push((node, Duration::from_millis(rng.gen_range(1..500))));
                }
                continue;
            }
        };
        faults.push(Fault { at, node, kind });
    }
    faults.sort_by(|a, b| a.at.cmp(&b.at).then(a.node.cmp(&b.node)));
    Swarm {
        kinds: enabled,
        faults,
        late,
    }
}

/// What goes wrong in a run of `cfg`, drawn from `rng`: nothing, the given
/// schedule, or a swarm. A swarm run with no control jitter set draws one
/// into `cfg` for half the seeds.
pub(super) fn draw(cfg: &mut SimConfig, rng: &mut ChaCha8Rng) -> Swarm {
    let expected = cfg.pipeline_bound();
    let swarm = match &cfg.faults {
        Faults::None => Swarm::default(),
        Faults::Swarm => swarm(rng, cfg.nodes, expected),
        Faults::Schedule(f, late) => Swarm {
            kinds: Vec::new(),
            faults: f.clone(),
            late: late.clone(),
        },
    };
    // Drawn after the swarm, so a seed's faults stay what they were.
    // Half the seeds keep the source's messages in lockstep, which
    // explores other orderings (and runs faster: a jittered run has
    // distinct moments, each checked, where a lockstep run has one).
    if matches!(cfg.faults, Faults::Swarm) && cfg.control_jitter.is_zero() && rng.gen_bool(0.5) {
        cfg.control_jitter = Duration::from_micros(rng.gen_range(1..=3000));
    }
    swarm
}

impl Sim {
    /// Fault number `f` of the schedule strikes.
    pub(super) fn fault(&mut self, f: usize) {
        let fault = self.faults[f].clone();
        let i = fault.node;
        self.trace(|| format!("FAULT {fault}"));
        match fault.kind {
            FaultKind::Crash => {
                self.kill(i, true);
                self.nodes[i].gone = true;
            }
            FaultKind::Restart(d) => {
                if self.nodes[i].machine.is_some() && !self.nodes[i].gone {
                    self.kill(i, true);
                    self.schedule(self.now + d, Ev::Start(i));
                }
            }
            FaultKind::Hang(d) => {
                if self.nodes[i].machine.is_some() && !self.nodes[i].frozen {
                    self.settle(i);
                    self.nodes[i].frozen = true;
                    self.retime_around(i);
                    self.schedule(self.now + d, Ev::Thaw(i));
                }
            }
            FaultKind::Cut(d) => {
                self.settle(i);
                let until = self.now + d;
                self.nodes[i].cut_until = Some(until);
                self.retime_around(i);
                // When the port comes back, rates recover.
                let gen = self.nodes[i].data.gen;
                self.schedule(until, Ev::Retime { node: i, gen });
                self.schedule(until, Ev::Thaw(i));
            }
            FaultKind::Slow(x) => {
                self.nodes[i].slow = x;
                self.retime_around(i);
            }
            FaultKind::SourceRestart(d) => {
                if !self.source_down && self.finished_at.is_none() {
                    self.kill_source();
                    self.schedule(self.now + d, Ev::SourceStart);
                }
            }
            FaultKind::DiskError => {
                if self.nodes[i].machine.is_some() && !self.nodes[i].data.ended {
                    self.nodes[i].disk_failed = true;
                    self.nodes[i].gone = true;
                    self.with_node(i, |n, now| {
                        n.handle_sink_error(now, "I/O error writing the target".into())
                    });
                }
            }
        }
    }

    /// A node's hang or cut ends: its port is restored, or its process
    /// continues and takes the inputs that waited for it, and its timers
    /// that came due meanwhile fire.
    pub(super) fn thaw(&mut self, i: usize) {
        if self.nodes[i].cut_until.is_some_and(|t| t <= self.now) {
            self.nodes[i].cut_until = None;
        }
        if self.nodes[i].frozen {
            self.nodes[i].frozen = false;
            // Time passed while frozen: timers due now fire.
            while let Some(input) = self.nodes[i].pending.pop_front() {
                if self.nodes[i].machine.is_none() {
                    break;
                }
                self.node_input(i, input);
            }
            self.with_node(i, |n, now| n.handle_timeout(now));
        }
        self.retime_around(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_as_the_option_writes_them() {
        let f = |s: &str| s.parse::<Fault>();
        let secs = Duration::from_secs_f64;
        assert_eq!(
            f("crash:4@1.5"),
            Ok(Fault {
                at: secs(1.5),
                node: 4,
                kind: FaultKind::Crash
            })
        );
        assert_eq!(
            f("hang:3@1:0.25").map(|f| f.kind),
            Ok(FaultKind::Hang(secs(0.25)))
        );
        assert_eq!(f("slow:2@0.5:4").map(|f| f.kind), Ok(FaultKind::Slow(4)));
        assert_eq!(
            f("source@2:0.8").map(|f| (f.node, f.kind)),
            Ok((0, FaultKind::SourceRestart(secs(0.8))))
        );
        for bad in [
            "crash:4",
            "hang:3@1",
            "slow:2@1:0",
            "melt:1@1",
            "crash:x@1",
            "crash:1@-1",
            "disk:1@1:2",
        ] {
            let err = f(bad).expect_err(bad);
            assert!(
                err.contains(bad) && err.contains("KIND:NODE@SECONDS"),
                "{err}"
            );
        }
        assert_eq!(parse_late("5@0.3"), Ok((5, secs(0.3))));
        assert!(parse_late("5").unwrap_err().contains("NODE@SECONDS"));
    }
}
