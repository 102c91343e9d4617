//! The simulated world: one source, many nodes, a switched network and disks,
//! all driven from one event queue ordered by (time, sequence).
//!
//! Control messages travel over simulated TCP connections (FIFO, a fixed
//! latency per hop, held while a port is cut, queued while a process is
//! frozen). Image data moves as a *fluid*: each receiving node's offset grows
//! linearly at a rate limited by its port, its upstream's port (shared among
//! that upstream's children) and its disk, and, once caught up, by its
//! upstream's own rate one data hop later. That keeps a 10,000-node run to
//! a few events per node instead of one per packet, while the content itself
//! is really copied (bytes in small runs, per-granule tags in large ones) from
//! the upstream's copy, so the end check compares real copies.
//!
//! The link model is calibrated against the real data plane in the
//! network-namespace lab (`scripts/lab-scale`):
//!
//! - **Frame overhead.** Image data moves at a port's *payload* rate: a TCP
//!   segment at MTU 1500 with timestamps carries 1448 bytes in a 1514-byte
//!   frame ([`SimConfig::frame`], [`SimConfig::payload_rate`]). Control
//!   messages are too small to matter and pay only the latency.
//! - **Pieces.** A real node gathers received bytes into a piece and writes
//!   and forwards the piece once it holds a millisecond of the link (at
//!   least 16 KiB), or at the latest after ka-net's `FORWARD_DELAY`
//!   (2 ms): [`SimConfig::piece_time`]. What gathered then takes about as
//!   long again to leave at the port rate. So a node's stream reaches its
//!   downstream `latency + 2 × piece_time` after it reached the node
//!   ([`SimConfig::data_hop`]). The source serves from its image and adds no
//!   forward delay.
//!
//! A fault-free chain of N nodes therefore completes in about
//! `size / payload_rate + (N − 1) × data_hop`, plus a few control-message
//! latencies to set up and to verify.
//!
//! [`Sim`] is one value split by concern across submodules, each adding
//! its own `impl Sim` block over the state defined here:
//!
//! - `queue`: the event queue and the loop that drives the world;
//! - `network`: connections, their order, delivery to processes;
//! - `process`: ka-core's machines, drained after every input, and their
//!   starts, kills and restarts;
//! - `data`: the fluid data plane and the durable prefix;
//! - `content`: the image, the copies and their digests;
//! - [`faults`]: the kinds of trouble, the swarm drawn from the seed, and
//!   applying each fault;
//! - `checks`: the checkers after every event and at the end, and the bound.
//!
//! Randomness comes from one seeded generator, split at the start into one
//! for the image and one for the faults; the first then serves the network
//! (connection nonces, the source's jitter) in event order.
//!
//! # Bounded-window nodes
//!
//! With [`SimConfig::window`] every node is one whose sink cannot be read
//! back (it unpacks the stream as it arrives): it keeps only the last
//! `window` bytes it received, so the window starts at its offset less the
//! window, and a restarted one holds nothing below the prefix it came back
//! with. Its machine is told where the window starts with each progress
//! report, and refuses (through ka-core) a downstream asking for less. An
//! upstream whose downstream falls more than its window behind can no
//! longer serve it: its data plane closes that connection, the downstream
//! reconnects, is refused, tells the source and is fed by it. The checkers
//! add: no upstream serves from below its window, no downstream keeps
//! receiving from one that no longer holds what it takes, and every
//! placement names an upstream that holds the node's offset (as the source
//! knows it) or the source itself.

use core::net::{IpAddr, Ipv4Addr, SocketAddr};
use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};

use ka_core::codec::Digest;
use ka_core::config::{SlowPolicy, SourceConfig};
use ka_core::ids::ConnId;
use ka_core::node::Node;
use ka_core::source::Source;
use ka_core::time::Time;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod checks;
mod content;
mod data;
pub mod faults;
mod network;
mod process;
mod queue;

use content::Content;
use data::Data;
use faults::{Fault, Swarm};
use network::{Conn, End, Input};
use process::{source_config, SimKey};
use queue::{Ev, Queue};

/// Which faults a run gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Faults {
    /// None: the run must meet the analytic pipeline bound.
    None,
    /// A swarm drawn from the seed.
    Swarm,
    /// Exactly these (tests), plus these late joiners.
    Schedule(Vec<Fault>, Vec<(usize, Duration)>),
}

/// The parameters of a run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Image size in bytes.
    pub size: u64,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Faults to inject.
    pub faults: Faults,
    /// Children per node (1: a chain).
    pub arity: u32,
    /// Port rate in bytes per second, each direction.
    pub rate: f64,
    /// One-way latency of a hop (node to node through the switch), for
    /// control messages and data alike.
    pub latency: Duration,
    /// The links' MTU in bytes (1500: Ethernet). Image data pays the frame
    /// overhead of a TCP stream at this MTU; see [`SimConfig::frame`].
    pub mtu: u32,
    /// The longest a real node holds received bytes in a part-filled
    /// buffer before it writes them and so forwards them: ka-net's
    /// `relay::FORWARD_DELAY` (2 ms); see [`SimConfig::piece_time`].
    pub forward_delay: Duration,
    /// A piece goes before its deadline once it holds this long of the
    /// link (ka-net's `FORWARD_AFTER`, 1 ms)…
    pub forward_after: Duration,
    /// …or this many bytes, if more (ka-net's `FORWARD_BYTES_MIN`,
    /// 16 KiB). Zero `forward_after` and zero bytes: pieces go only at
    /// their deadline.
    pub forward_bytes_min: u64,
    /// Disk write rate in bytes per second (`None`: faster than the port).
    pub disk_rate: Option<f64>,
    /// What the source does with a slow node.
    pub slow_policy: SlowPolicy,
    /// The most a message from the source is held back, drawn per message
    /// (each connection keeps its order, as TCP does). A busy source writes
    /// its many connections in no fixed order, so a node may hear of its
    /// new downstream after that downstream has already asked it for data.
    /// A swarm run with zero here draws its own for half the seeds, up to
    /// 3 ms, and runs with that.
    pub control_jitter: Duration,
    /// Every node keeps only this many bytes of the stream to serve its
    /// downstreams from (a node unpacking the stream as it arrives); `None`:
    /// every node serves from what it wrote. See the module docs.
    pub window: Option<u64>,
    /// The source packs its stream (`Encoding::Zstd`): nodes join as
    /// readable file targets and learn from their welcome that they keep
    /// only their `window` of it, as a packing source's nodes do. Needs a
    /// `window`.
    pub packed: bool,
    /// Print one line per notable event.
    pub trace: bool,
}

impl SimConfig {
    /// A run of `nodes` nodes and `size` bytes with 1 Gbit/s ports, 50 µs
    /// hops, MTU 1500 and the real node's pieces (1 ms or 16 KiB, at most
    /// 2 ms).
    pub fn new(nodes: usize, size: u64, seed: u64) -> Self {
        SimConfig {
            nodes,
            size,
            seed,
            faults: Faults::None,
            arity: 1,
            rate: 125e6,
            latency: Duration::from_micros(50),
            mtu: 1500,
            forward_delay: ka_core::config::FORWARD_DELAY,
            forward_after: ka_core::config::FORWARD_AFTER,
            forward_bytes_min: ka_core::config::FORWARD_BYTES_MIN,
            disk_rate: None,
            slow_policy: SlowPolicy::MoveToTail,
            control_jitter: Duration::ZERO,
            window: None,
            packed: false,
            trace: false,
        }
    }

    /// The fewest bytes a node's window may hold: four data hops' worth of
    /// the stream. A downstream that keeps up is a data hop behind its
    /// upstream; with a window smaller than that, every node would fall out
    /// of its upstream's window at once and the source would feed them all.
    pub fn min_window(&self) -> u64 {
        (self.payload_rate() * self.data_hop().as_secs_f64() * 4.0).ceil() as u64
    }

    /// The analytic pipeline bound: the image at the port's payload rate
    /// (shared by a parent's children, capped by the disk) plus one data hop
    /// per level of the tree below the first. The first level pays only the
    /// latency: the source serves from its image, with no relay buffer.
    pub fn pipeline_bound(&self) -> Duration {
        let depth = tree_depth(self.nodes, self.arity.max(1) as usize) as u32;
        Duration::from_secs_f64(self.size as f64 / self.effective_rate())
            + self.latency * depth
            + self.piece_time() * 2 * depth.saturating_sub(1)
    }

    fn effective_rate(&self) -> f64 {
        // A parent's port is shared by its children.
        let r = self.payload_rate() / f64::from(self.arity.max(1).min(self.nodes.max(1) as u32));
        self.disk_rate.map_or(r, |d| r.min(d))
    }

    /// Payload bytes per full TCP segment and the bytes the port counts for
    /// its frame, at [`SimConfig::mtu`]: MTU − 20 (IPv4) − 20 (TCP) − 12
    /// (the timestamp option Linux sends by default), and MTU + 14 (the
    /// Ethernet header; a port's shaper does not count the FCS). At 1500:
    /// 1448 of 1514. The lab computes the same (`tests/src/lab.rs`,
    /// `Lab::frame`), from the interface's MTU and the TCP settings.
    pub fn frame(&self) -> (u32, u32) {
        (self.mtu.saturating_sub(20 + 20 + 12), self.mtu + 14)
    }

    /// The rate at which image data moves through a port: the port rate
    /// times the payload share of each frame. A bulk stream fills whole
    /// segments, so partial frames are negligible.
    pub fn payload_rate(&self) -> f64 {
        let (payload, wire) = self.frame();
        self.rate * f64::from(payload) / f64::from(wire)
    }

    /// How long after a node's stream reaches it the same bytes reach its
    /// downstream: the hop latency plus twice the piece time. A real node
    /// holds what it receives for a piece's time before writing it, then
    /// sends the piece at the port rate, which takes as long again.
    pub fn data_hop(&self) -> Duration {
        self.latency + self.piece_time() * 2
    }

    /// How long a real node gathers a piece at the rate it receives:
    /// until it holds `forward_after` of the link or `forward_bytes_min`
    /// bytes, whichever is more, and at most `forward_delay`.
    pub fn piece_time(&self) -> Duration {
        if self.forward_after.is_zero() && self.forward_bytes_min == 0 {
            return self.forward_delay;
        }
        // At the rate a node receives: its parent's port may be shared.
        let by_bytes =
            Duration::from_secs_f64(self.forward_bytes_min as f64 / self.effective_rate());
        self.forward_after.max(by_bytes).min(self.forward_delay)
    }
}

fn tree_depth(nodes: usize, arity: usize) -> usize {
    if arity == 1 {
        return nodes;
    }
    let (mut depth, mut level, mut placed) = (0, 1usize, 0usize);
    while placed < nodes {
        level = level.saturating_mul(arity);
        placed = placed.saturating_add(level);
        depth += 1;
    }
    depth
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Nodes whose copy verified.
    pub ok: usize,
    /// Nodes that failed (all of them named, with a reason, in `report`).
    pub ko: usize,
    /// Simulated time when the session finished.
    pub completion: Duration,
    /// The bound the run had to meet.
    pub bound: Duration,
    /// How `bound` was derived.
    pub bound_kind: &'static str,
    /// The checkers' verdict: the first violation, if any.
    pub verdict: Result<(), String>,
    /// Hash of the trace: equal seeds must give equal hashes.
    pub trace_hash: u64,
    /// Events processed.
    pub events: u64,
    /// One line per node that failed: name and reason.
    pub failures: Vec<String>,
    /// The faults injected.
    pub swarm: Swarm,
    /// When each verified node's copy was checked, sorted: shows whether the
    /// nodes a fault did not touch finished near the ideal time.
    pub verified_at: Vec<Duration>,
    /// Per node (by index): where its last process started its copy from
    /// (the durable prefix a restart found), and the bytes it received over
    /// the network since.
    pub resumed: Vec<(u64, u64)>,
    /// How many times the slow policy acted.
    pub slow: usize,
    /// When each node process that ended with its copy verified exited,
    /// sorted: shows whether nodes left as soon as nothing needed them.
    pub exited_ok_at: Vec<Duration>,
    /// Data connections a node held until its own placement arrived
    /// (`NodeEvent::DownstreamEarly`).
    pub early_downstreams: usize,
    /// Data connections an upstream refused (each costs its node a
    /// reconnect delay), counted as the upstreams send their refusals.
    pub upstream_refusals: usize,
    /// The control jitter the run used (see [`SimConfig::control_jitter`]).
    pub control_jitter: Duration,
    /// Data connections an upstream closed because its downstream fell more
    /// than the window behind.
    pub window_drops: usize,
    /// Nodes the source took in after their upstream refused them for want
    /// of data (`SourceEvent::Stranded`).
    pub stranded: usize,
    /// The most nodes the source fed directly at once.
    pub source_children_max: usize,
}

/// A node: its host, its process, its port and its data.
struct Slot {
    /// Its name, as the source reports it.
    name: String,
    /// Where it listens.
    addr: SocketAddr,
    /// Its running process's machine; none while it is down.
    machine: Option<Node>,
    /// Its process's generation, bumped at every start.
    incarnation: u32,
    /// The process is frozen (a hang).
    frozen: bool,
    /// Inputs that reached the process while it was frozen.
    pending: VecDeque<Input>,
    /// Its port is cut until then.
    cut_until: Option<Time>,
    /// Its port is this many times slower.
    slow: u32,
    /// Its offset and its copy.
    data: Data,
    /// The machine's deadline the world has scheduled a timer for.
    timer_at: Option<Time>,
    /// Dropped by policy, failed its disk, or killed for good: not a survivor.
    gone: bool,
    /// Its disk failed.
    disk_failed: bool,
    /// Highest offset ever reported, to check that offsets only grow.
    max_reported: u64,
    /// The prefix last recorded as durable (what a restart finds), and when.
    durable: u64,
    /// When the prefix was last recorded.
    durable_at: Time,
    /// Where this process started its copy from, and the bytes it has
    /// received over the network since (closed inflows only).
    started_from: u64,
    /// The bytes received on closed inflows.
    received: f64,
    /// What it held when the source last restarted: it must never ask for
    /// less again (until it restarts itself).
    floor: Option<u64>,
    /// With a window: the prefix its process started with, below which it
    /// holds nothing (a restarted node's window starts empty).
    window_from: u64,
}

impl Slot {
    /// Node `i`, not started yet, with an empty copy `content`.
    fn new(i: usize, content: Content) -> Self {
        Slot {
            name: format!("node{i:05}"),
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i as u32)), 9000),
            machine: None,
            incarnation: 0,
            frozen: false,
            pending: VecDeque::new(),
            cut_until: None,
            slow: 1,
            data: Data::new(content),
            timer_at: None,
            gone: false,
            disk_failed: false,
            max_reported: 0,
            durable: 0,
            durable_at: Time::ZERO,
            started_from: 0,
            received: 0.0,
            floor: None,
            window_from: 0,
        }
    }
}

/// The simulation: the world of one run, built from a [`SimConfig`] by
/// [`Sim::new`] and played out by [`Sim::run`].
pub struct Sim {
    /// The run's parameters (with the control jitter a swarm drew).
    cfg: SimConfig,
    /// The simulated time: the time of the event being processed.
    now: Time,
    /// Events to come.
    queue: Queue,
    /// The network's generator (nonces, the source's jitter).
    rng: ChaCha8Rng,
    /// The source's machine.
    source: Source,
    /// The source's deadline the world has scheduled a timer for.
    source_timer: Option<Time>,
    /// The source's image.
    source_data: Content,
    /// The image's digest.
    source_digest: Digest,
    /// The source has been told its image's digest.
    image_done: bool,
    /// Source outflows: (conn, node).
    source_outflows: Vec<(ConnId, usize)>,
    /// The nodes, by index.
    nodes: Vec<Slot>,
    /// Every connection ever opened, indexed by its id.
    conns: Vec<Conn>,
    /// Bytes per granule of content (1 for real bytes).
    granule: u64,
    /// Granules in the image.
    granules: usize,
    /// The faults and late joins, as drawn or given.
    swarm: Swarm,
    /// The faults, indexed by their events.
    faults: Vec<Fault>,
    /// The hash of every trace line so far.
    trace_hash: u64,
    /// The first violation a checker found.
    violation: Option<String>,
    /// Events processed.
    processed: u64,
    /// When the source finished or aborted.
    finished_at: Option<Time>,
    /// Where the source listens.
    source_addr: SocketAddr,
    /// Which node listens where.
    by_addr: BTreeMap<SocketAddr, usize>,
    /// Nodes whose data changed since the last check.
    dirty: Vec<usize>,
    /// The topology generation last checked.
    checked_epoch: Option<ka_core::ids::Epoch>,
    /// Why the source aborted, if it did.
    aborted: Option<String>,
    /// The source's settings, to start it again the same.
    source_config: SourceConfig,
    /// The source process's generation; it is down between a restart fault
    /// and its start.
    source_incarnation: u32,
    /// The source's process is down: killed and not started again yet.
    source_down: bool,
    /// When the source's current process started.
    source_started_at: Time,
    /// The outcomes the source's shell keeps on disk (name, MAC, outcome):
    /// a restarted source is handed them.
    source_record: Vec<(String, [u8; 6], Result<(), String>)>,
    /// How many times the slow policy acted.
    slow: usize,
    /// See [`Outcome::exited_ok_at`].
    exited_ok_at: Vec<Duration>,
    /// See [`Outcome::early_downstreams`].
    early_downstreams: usize,
    /// See [`Outcome::upstream_refusals`].
    upstream_refusals: usize,
    /// See [`Outcome::window_drops`].
    window_drops: usize,
    /// See [`Outcome::stranded`].
    stranded: usize,
    /// See [`Outcome::source_children_max`].
    source_children_max: usize,
    /// The nodes whose log lines surfaced at the source (any run of it),
    /// by name: every node that verified must be among them.
    logged: std::collections::BTreeSet<String>,
}

impl Sim {
    /// Builds the world for `cfg`: draws the swarm, makes the source image.
    /// Panics if `cfg.mtu` is below 68, the least an IPv4 link may have, or
    /// if `cfg.window` is below [`SimConfig::min_window`].
    pub fn new(mut cfg: SimConfig) -> Self {
        assert!(
            cfg.mtu >= 68,
            "MTU {} is below IPv4's minimum of 68: give at least 68 (1500 for Ethernet)",
            cfg.mtu
        );
        if let Some(w) = cfg.window {
            let least = cfg.min_window();
            assert!(
                w >= least,
                "a window of {w} bytes is less than four data hops of the stream: give at least {least}"
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut image_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        let mut fault_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        let (granule, source_data) = Content::image(cfg.size, &mut image_rng);
        let granules = cfg.size.div_ceil(granule) as usize;
        let source_digest = source_data.digest();
        let swarm = faults::draw(&mut cfg, &mut fault_rng);
        let source_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 9000);
        let scfg = source_config(&cfg, source_addr);
        let mut source = Source::new(Time::ZERO, scfg.clone(), Box::new(SimKey(cfg.seed)));
        // A file image: all of it can be served from the start.
        source.handle_image_progress(Time::ZERO, cfg.size);
        let nodes: Vec<Slot> = (0..cfg.nodes)
            .map(|i| Slot::new(i, source_data.blank()))
            .collect();
        let faults = swarm.faults.clone();
        let by_addr = nodes
            .iter()
            .enumerate()
            .map(|(i, s): (usize, &Slot)| (s.addr, i))
            .collect();
        let mut sim = Sim {
            cfg,
            now: Time::ZERO,
            queue: Queue::new(),
            rng,
            source,
            source_timer: None,
            source_data,
            source_digest,
            image_done: false,
            source_outflows: Vec::new(),
            nodes,
            conns: Vec::new(),
            granule,
            granules,
            swarm,
            faults,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            violation: None,
            processed: 0,
            finished_at: None,
            source_addr,
            by_addr,
            dirty: Vec::new(),
            checked_epoch: None,
            aborted: None,
            source_config: scfg,
            source_incarnation: 0,
            source_down: false,
            source_started_at: Time::ZERO,
            source_record: Vec::new(),
            slow: 0,
            exited_ok_at: Vec::new(),
            early_downstreams: 0,
            upstream_refusals: 0,
            window_drops: 0,
            stranded: 0,
            source_children_max: 0,
            logged: std::collections::BTreeSet::new(),
        };
        for i in 0..sim.cfg.nodes {
            let delay = sim
                .swarm
                .late
                .iter()
                .find(|&&(n, _)| n == i)
                .map_or(Duration::ZERO, |&(_, d)| d);
            sim.schedule(Time::ZERO + delay, Ev::Start(i));
        }
        for f in 0..sim.faults.len() {
            let at = Time::ZERO + sim.faults[f].at;
            sim.schedule(at, Ev::Fault(f));
        }
        sim.drain_source();
        sim
    }

    /// The faults and late joins of this run.
    pub fn swarm(&self) -> &Swarm {
        &self.swarm
    }

    /// Runs to the end (or to a generous time limit) and reports.
    pub fn run(mut self) -> Outcome {
        let (bound, bound_kind) = self.bound();
        let mut limit = bound * 4 + Duration::from_secs(30);
        if self.cfg.window.is_some() {
            // Room for the source to feed many nodes at once (see
            // `bound_with_windows`); a stuck run is still caught.
            limit *= 4;
        }
        self.run_events(Time::ZERO + limit);
        let completion = self
            .finished_at
            .unwrap_or(self.now)
            .saturating_since(Time::ZERO);
        let (bound, bound_kind) = self.bound_with_windows(bound, bound_kind);
        self.final_checks(completion, bound);
        let report = self.source.report();
        let ok = report.iter().filter(|r| r.is_ok()).count();
        let mut failures: Vec<String> = report
            .iter()
            .filter(|r| !r.is_ok())
            .map(|r| {
                format!(
                    "{}: {}",
                    r.name,
                    r.outcome
                        .clone()
                        .map_or_else(|| "undecided".into(), |o| o.err().unwrap_or_default())
                )
            })
            .collect();
        for s in &self.nodes {
            if !report.iter().any(|r| r.name == s.name) {
                failures.push(format!("{}: never joined the session", s.name));
            }
        }
        let mut verified_at: Vec<Duration> = report
            .iter()
            .filter(|r| r.is_ok())
            .filter_map(|r| r.finished_at.map(|t| t.saturating_since(Time::ZERO)))
            .collect();
        verified_at.sort();
        let resumed = (0..self.nodes.len())
            .map(|i| (self.nodes[i].started_from, self.received(i) as u64))
            .collect();
        let mut exited_ok_at = self.exited_ok_at.clone();
        exited_ok_at.sort();
        Outcome {
            verified_at,
            resumed,
            slow: self.slow,
            exited_ok_at,
            early_downstreams: self.early_downstreams,
            upstream_refusals: self.upstream_refusals,
            control_jitter: self.cfg.control_jitter,
            window_drops: self.window_drops,
            stranded: self.stranded,
            source_children_max: self.source_children_max,
            ok,
            ko: self.cfg.nodes - ok,
            completion,
            bound,
            bound_kind,
            verdict: self.violation.map_or(Ok(()), Err),
            trace_hash: self.trace_hash,
            events: self.processed,
            failures,
            swarm: self.swarm,
        }
    }
}

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Outcome {
    Sim::new(cfg).run()
}
