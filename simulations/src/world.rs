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

use core::net::{IpAddr, Ipv4Addr, SocketAddr};
use core::time::Duration;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use ka_core::auth::Mac;
use ka_core::codec::{Digest, Message, Nonce, Progress, Tag};
use ka_core::config::{NodeConfig, SlowPolicy, SourceConfig};
use ka_core::ids::ConnId;
use ka_core::node::{Node, NodeAction, NodeEvent};
use ka_core::source::{Source, SourceAction, SourceEvent, SourceState};
use ka_core::time::Time;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::faults::{swarm, Fault, FaultKind, Swarm};

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
            trace: false,
        }
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
    /// Data connections a node held until its own placement arrived
    /// (`NodeEvent::DownstreamEarly`).
    pub early_downstreams: usize,
    /// Data connections an upstream refused (each costs its node a
    /// reconnect delay), counted as the upstreams send their refusals.
    pub upstream_refusals: usize,
    /// The control jitter the run used (see [`SimConfig::control_jitter`]).
    pub control_jitter: Duration,
}

/// The stand-in keyed MAC: deterministic and cheap, keyed by the session.
struct SimKey(u64);

impl Mac for SimKey {
    fn mac(&self, message: &[u8]) -> Tag {
        let mut out = [0u8; 32];
        let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
        for &b in message {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            h = (h ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            chunk.copy_from_slice(&h.to_be_bytes());
        }
        Tag(out)
    }
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Source,
    Node(usize),
}

#[derive(Debug, Clone)]
struct Conn {
    /// The side that connected, with its process incarnation.
    client: (End, u32),
    /// The side that accepted.
    server: (End, u32),
    open: bool,
    /// When the last input sent on it arrives, towards the server and
    /// towards the client: none may overtake it. Each way keeps its own
    /// order, as TCP does, and the two ways do not wait for each other.
    last_arrival: [Time; 2],
}

/// What travels to a process.
#[derive(Debug, Clone)]
enum Input {
    Msg(ConnId, Message),
    Closed(ConnId),
    Accepted { conn: ConnId, nonce: Nonce },
    Connected { conn: ConnId, to_source: bool },
    ConnectFailed { to_source: bool },
}

#[derive(Debug)]
enum Ev {
    /// An input reaches a process (if it is still the same incarnation).
    Deliver {
        to: End,
        incarnation: u32,
        input: Input,
    },
    /// A machine's timer.
    Timer { to: End, incarnation: u32 },
    /// Recompute a node's data rate (gen guards against stale ones).
    Retime { node: usize, gen: u64 },
    /// A node's offset reaches the end of the image.
    Arrive { node: usize, gen: u64 },
    /// A fault strikes.
    Fault(usize),
    /// A node process starts (at the beginning, late, or after a restart).
    Start(usize),
    /// A frozen node continues.
    Thaw(usize),
    /// The source process starts again (after a restart fault).
    SourceStart,
    /// A restarted source has read its image through and knows its digest.
    SourceHashed { incarnation: u32 },
}

/// Content of an image copy: real bytes in small runs, a tag per granule in large ones.
#[derive(Debug, Clone, PartialEq)]
enum Content {
    Bytes(Vec<u8>),
    Tags(Vec<u64>),
}

impl Content {
    fn copy_from(&mut self, other: &Content, granules: core::ops::Range<usize>) {
        match (self, other) {
            (Content::Bytes(d), Content::Bytes(s)) => {
                d[granules.clone()].copy_from_slice(&s[granules])
            }
            (Content::Tags(d), Content::Tags(s)) => {
                d[granules.clone()].copy_from_slice(&s[granules])
            }
            _ => unreachable!("one content kind per run"),
        }
    }

    fn digest(&self) -> Digest {
        let mut h: u64 = 0x8422_2325_cbf2_9ce4;
        let mut feed = |b: u8| h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        match self {
            Content::Bytes(v) => v.iter().for_each(|&b| feed(b)),
            Content::Tags(v) => v.iter().flat_map(|t| t.to_le_bytes()).for_each(&mut feed),
        }
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&h.to_le_bytes());
        Digest(d)
    }
}

/// The data side of a node: a fluid offset and the copy it has made.
#[derive(Debug, Clone)]
struct Data {
    t0: Time,
    off0: f64,
    rate: f64,
    /// The connection and sender it receives from.
    inflow: Option<(ConnId, End)>,
    /// Caught up with the sender: moves at its rate, one latency later.
    following: bool,
    /// Our offset when the current inflow began: what we held before it.
    inflow_from: f64,
    gen: u64,
    /// Granules copied so far (a prefix).
    copied: usize,
    content: Content,
    /// Nodes (and connections) this node serves.
    outflows: Vec<(ConnId, usize)>,
    /// Earlier segments (start, offset, rate), oldest first, for the offset
    /// a receiver one hop away sees.
    hist: VecDeque<(Time, f64, f64)>,
    ended: bool,
}

struct Slot {
    name: String,
    addr: SocketAddr,
    machine: Option<Node>,
    incarnation: u32,
    frozen: bool,
    pending: VecDeque<Input>,
    cut_until: Option<Time>,
    slow: u32,
    data: Data,
    timer_at: Option<Time>,
    /// Dropped by policy, failed its disk, or killed for good: not a survivor.
    gone: bool,
    disk_failed: bool,
    /// Highest offset ever reported, to check that offsets only grow.
    max_reported: u64,
    /// The prefix last recorded as durable (what a restart finds), and when.
    durable: u64,
    durable_at: Time,
    /// Where this process started its copy from, and the bytes it has
    /// received over the network since (closed inflows only).
    started_from: u64,
    received: f64,
    /// What it held when the source last restarted: it must never ask for
    /// less again (until it restarts itself).
    floor: Option<u64>,
}

/// The simulation.
pub struct Sim {
    cfg: SimConfig,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: Vec<Option<Ev>>,
    free_events: Vec<usize>,
    rng: ChaCha8Rng,
    source: Source,
    source_timer: Option<Time>,
    source_data: Content,
    source_digest: Digest,
    image_done: bool,
    /// Source outflows: (conn, node).
    source_outflows: Vec<(ConnId, usize)>,
    nodes: Vec<Slot>,
    conns: Vec<Conn>,
    granule: u64,
    granules: usize,
    swarm: Swarm,
    faults: Vec<Fault>,
    trace_hash: u64,
    violation: Option<String>,
    processed: u64,
    finished_at: Option<Time>,
    source_addr: SocketAddr,
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
    source_down: bool,
    /// The outcomes the source's shell keeps on disk (name, MAC, outcome):
    /// a restarted source is handed them.
    source_record: Vec<(String, [u8; 6], Result<(), String>)>,
    /// How many times the slow policy acted.
    slow: usize,
    /// See [`Outcome::early_downstreams`].
    early_downstreams: usize,
    /// See [`Outcome::upstream_refusals`].
    upstream_refusals: usize,
}

const SESSION: &str = "sim";
/// The identity of the simulated image.
const IMAGE_ID: ka_core::codec::ImageId = ka_core::codec::ImageId([0x5a; 32]);
use ka_core::config::{RECORD_EVERY as DURABLE_EVERY, RECORD_STEP as DURABLE_STEP};
/// How much faster than a port a restarted source reads and hashes its image.
const HASH_SPEEDUP: f64 = 8.0;

impl Sim {
    /// Builds the world for `cfg`: draws the swarm, makes the source image.
    /// Panics if `cfg.mtu` is below 68, the least an IPv4 link may have.
    pub fn new(mut cfg: SimConfig) -> Self {
        assert!(
            cfg.mtu >= 68,
            "MTU {} is below IPv4's minimum of 68: give at least 68 (1500 for Ethernet)",
            cfg.mtu
        );
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut image_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        let mut fault_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        // Real bytes while they fit comfortably; tags per 1 MiB granule beyond.
        let (granule, source_data) = if cfg.size <= 4 << 20 {
            let mut v = vec![0u8; cfg.size as usize];
            image_rng.fill_bytes(&mut v);
            (1, Content::Bytes(v))
        } else {
            let g = 1u64 << 20;
            let n = cfg.size.div_ceil(g) as usize;
            (
                g,
                Content::Tags((0..n).map(|_| image_rng.next_u64()).collect()),
            )
        };
        let granules = cfg.size.div_ceil(granule) as usize;
        let source_digest = source_data.digest();
        let expected = cfg.pipeline_bound();
        let swarm = match &cfg.faults {
            Faults::None => Swarm::default(),
            Faults::Swarm => swarm(&mut fault_rng, cfg.nodes, expected),
            Faults::Schedule(f, late) => Swarm {
                kinds: vec!["schedule"],
                faults: f.clone(),
                late: late.clone(),
            },
        };
        // Drawn after the swarm, so a seed's faults stay what they were.
        // Half the seeds keep the source's messages in lockstep, which
        // explores other orderings (and runs faster: a jittered run has
        // distinct moments, each checked, where a lockstep run has one).
        if matches!(cfg.faults, Faults::Swarm)
            && cfg.control_jitter.is_zero()
            && fault_rng.gen_bool(0.5)
        {
            cfg.control_jitter = Duration::from_micros(fault_rng.gen_range(1..=3000));
        }
        let source_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 9000);
        let mut scfg = SourceConfig::new(SESSION, cfg.nodes as u32, source_addr);
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
        let mut source = Source::new(Time::ZERO, scfg.clone(), Box::new(SimKey(cfg.seed)));
        // A file image: all of it can be served from the start.
        source.handle_image_progress(Time::ZERO, cfg.size);
        let nodes: Vec<Slot> = (0..cfg.nodes)
            .map(|i| Slot {
                name: format!("node{i:05}"),
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i as u32)), 9000),
                machine: None,
                incarnation: 0,
                frozen: false,
                pending: VecDeque::new(),
                cut_until: None,
                slow: 1,
                data: Data {
                    t0: Time::ZERO,
                    off0: 0.0,
                    rate: 0.0,
                    inflow: None,
                    following: false,
                    inflow_from: 0.0,
                    gen: 0,
                    copied: 0,
                    content: match &source_data {
                        Content::Bytes(v) => Content::Bytes(vec![0; v.len()]),
                        Content::Tags(v) => Content::Tags(vec![0; v.len()]),
                    },
                    outflows: Vec::new(),
                    hist: VecDeque::new(),
                    ended: false,
                },
                timer_at: None,
                gone: false,
                disk_failed: false,
                max_reported: 0,
                durable: 0,
                durable_at: Time::ZERO,
                started_from: 0,
                received: 0.0,
                floor: None,
            })
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
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free_events: Vec::new(),
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
            source_record: Vec::new(),
            slow: 0,
            early_downstreams: 0,
            upstream_refusals: 0,
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
        let last_heal = self
            .faults
            .iter()
            .map(Fault::heals_at)
            .max()
            .unwrap_or(Duration::ZERO);
        let pipeline = self.cfg.pipeline_bound();
        let (bound, bound_kind) = if self.faults.is_empty() && self.swarm.late.is_empty() {
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
                _ => None,
            });
            let slow = f64::from(slowest.max().unwrap_or(1));
            let detect = Duration::from_millis(1000 + 250 + 200 + 500);
            let stream = pipeline.mul_f64(slow) + pipeline;
            (
                last_heal + detect + stream + Duration::from_secs(2),
                "last heal + detection + re-stream at the slowest rate + pipeline",
            )
        };
        let limit = Time::ZERO + bound * 4 + Duration::from_secs(30);
        while let Some(Reverse((at, _, idx))) = self.queue.pop() {
            if at > limit || self.violation.is_some() {
                break;
            }
            self.now = at;
            let ev = self.events[idx].take().expect("queued event present");
            self.free_events.push(idx);
            self.processed += 1;
            self.step(ev);
            if self.finished_at.is_some() {
                break;
            }
        }
        let completion = self
            .finished_at
            .unwrap_or(self.now)
            .saturating_since(Time::ZERO);
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
            .map(|i| {
                let current = self.nodes[i].data.inflow.map_or(0.0, |_| {
                    self.offset_at(i, self.now) - self.nodes[i].data.inflow_from
                });
                let s = &self.nodes[i];
                (s.started_from, (s.received + current.max(0.0)) as u64)
            })
            .collect();
        Outcome {
            verified_at,
            resumed,
            slow: self.slow,
            early_downstreams: self.early_downstreams,
            upstream_refusals: self.upstream_refusals,
            control_jitter: self.cfg.control_jitter,
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

    // ----- the event queue -----

    fn schedule(&mut self, at: Time, ev: Ev) {
        let idx = match self.free_events.pop() {
            Some(i) => {
                self.events[i] = Some(ev);
                i
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, idx)));
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        let line = line();
        for b in line.bytes().chain([b'\n']) {
            self.trace_hash = (self.trace_hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        if self.cfg.trace {
            println!("{} {line}", self.now);
        }
    }

    fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.trace(|| format!("VIOLATION {what}"));
            self.violation = Some(format!("at {}: {what}", self.now));
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                to,
                incarnation,
                input,
            } => self.deliver(to, incarnation, input),
            Ev::Timer { to, incarnation } => match to {
                End::Source => {
                    if incarnation == self.source_incarnation
                        && !self.source_down
                        && self.source_timer.is_some_and(|t| t <= self.now)
                    {
                        self.source_timer = None;
                        self.source.handle_timeout(self.now);
                        self.drain_source();
                    }
                }
                End::Node(i) => {
                    let s = &self.nodes[i];
                    if s.incarnation == incarnation
                        && !s.frozen
                        && s.timer_at.is_some_and(|t| t <= self.now)
                    {
                        self.nodes[i].timer_at = None;
                        self.with_node(i, |n, now| n.handle_timeout(now));
                    }
                }
            },
            Ev::Retime { node, gen } => {
                if self.nodes[node].data.gen == gen {
                    self.retime(node);
                }
            }
            Ev::Arrive { node, gen } => {
                if self.nodes[node].data.gen == gen {
                    self.arrive(node);
                }
            }
            Ev::Fault(f) => self.fault(f),
            Ev::Start(i) => self.start_node(i),
            Ev::Thaw(i) => self.thaw(i),
            Ev::SourceStart => self.start_source(),
            Ev::SourceHashed { incarnation } => {
                if incarnation == self.source_incarnation && !self.source_down {
                    let (size, digest, now) = (self.cfg.size, self.source_digest, self.now);
                    self.source.handle_image_done(now, size, digest);
                    self.drain_source();
                }
            }
        }
        self.check_invariants();
    }

    // ----- the network -----

    /// How long a control message takes over a hop. Control messages are a
    /// few dozen bytes: their share of the port and their frame overhead are
    /// negligible next to the image's, so they pay only the latency.
    fn latency(&self) -> Duration {
        self.cfg.latency
    }

    /// When the bytes a node's stream holds now were at its sender: one data
    /// hop ago (latency plus the forward delay, see [`SimConfig::data_hop`]).
    fn hop_ago(&self) -> Time {
        let hop = self.cfg.data_hop().as_nanos() as u64;
        Time::from_nanos(self.now.as_nanos().saturating_sub(hop))
    }

    fn cut_until(&self, end: End) -> Option<Time> {
        match end {
            End::Source => None,
            End::Node(i) => self.nodes[i].cut_until.filter(|&t| t > self.now),
        }
    }

    /// When something sent now from `a` reaches `b`: one hop later, or one hop
    /// after the later of their ports is restored.
    fn arrival(&self, a: End, b: End) -> Time {
        let held = self.cut_until(a).max(self.cut_until(b)).unwrap_or(self.now);
        held + self.latency()
    }

    fn incarnation(&self, end: End) -> u32 {
        match end {
            End::Source => self.source_incarnation,
            End::Node(i) => self.nodes[i].incarnation,
        }
    }

    fn alive(&self, end: End) -> bool {
        match end {
            End::Source => !self.source_down,
            End::Node(i) => self.nodes[i].machine.is_some(),
        }
    }

    fn send(&mut self, from: End, to: End, input: Input) {
        let at = self.arrival(from, to);
        self.deliver_at(at, to, input);
    }

    /// Hands `input` to `to`'s current process at `at`.
    fn deliver_at(&mut self, at: Time, to: End, input: Input) {
        let incarnation = self.incarnation(to);
        self.schedule(
            at,
            Ev::Deliver {
                to,
                incarnation,
                input,
            },
        );
    }

    fn other_end(&self, conn: ConnId, me: End) -> Option<(End, u32)> {
        let c = self.conns.get(conn.0 as usize)?;
        if c.client.0 == me {
            Some(c.server)
        } else {
            Some(c.client)
        }
    }

    fn transmit(&mut self, from: End, conn: ConnId, msg: Message) {
        let Some(c) = self.conns.get(conn.0 as usize) else {
            return;
        };
        if !c.open {
            return;
        }
        let Some((to, inc)) = self.other_end(conn, from) else {
            return;
        };
        if self.incarnation(to) != inc {
            return;
        }
        let mut at = self.arrival(from, to);
        if from == End::Source && !self.cfg.control_jitter.is_zero() {
            let most = self.cfg.control_jitter.as_nanos() as u64;
            at = at + Duration::from_nanos(self.rng.gen_range(0..=most));
        }
        self.send_in_order(conn, at, to, Input::Msg(conn, msg));
    }

    /// Delivers `input` on `conn` at `at`, or later: after everything sent
    /// on `conn` before it.
    fn send_in_order(&mut self, conn: ConnId, at: Time, to: End, input: Input) {
        let c = &mut self.conns[conn.0 as usize];
        let way = usize::from(c.server.0 != to);
        let at = at.max(c.last_arrival[way]);
        c.last_arrival[way] = at;
        self.deliver_at(at, to, input);
    }

    fn close(&mut self, from: End, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn.0 as usize) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        self.stop_flows_on(conn);
        if let Some((to, inc)) = self.other_end(conn, from) {
            if self.incarnation(to) == inc && self.alive(to) {
                let at = self.arrival(from, to);
                self.send_in_order(conn, at, to, Input::Closed(conn));
            }
        }
    }

    fn connect(&mut self, from: End, to_addr: SocketAddr, to_source: bool) {
        let target = if to_addr == self.source_addr {
            Some(End::Source)
        } else {
            self.by_addr.get(&to_addr).copied().map(End::Node)
        };
        let reachable = target.filter(|&t| self.alive(t));
        match reachable {
            Some(to) => {
                let conn = ConnId(self.conns.len() as u64);
                self.conns.push(Conn {
                    client: (from, self.incarnation(from)),
                    server: (to, self.incarnation(to)),
                    open: true,
                    last_arrival: [Time::ZERO; 2],
                });
                let mut nonce = [0u8; 32];
                self.rng.fill_bytes(&mut nonce);
                // The kernel completes the handshake even for a frozen process.
                self.send(
                    from,
                    to,
                    Input::Accepted {
                        conn,
                        nonce: Nonce(nonce),
                    },
                );
                let back = self.arrival(to, from) + self.latency();
                let incarnation = self.incarnation(from);
                self.schedule(
                    back,
                    Ev::Deliver {
                        to: from,
                        incarnation,
                        input: Input::Connected { conn, to_source },
                    },
                );
            }
            None => {
                // A reset from a dead host's kernel, or nobody at that address.
                let at = self.arrival(from, from) + self.latency();
                let incarnation = self.incarnation(from);
                self.schedule(
                    at,
                    Ev::Deliver {
                        to: from,
                        incarnation,
                        input: Input::ConnectFailed { to_source },
                    },
                );
            }
        }
    }

    fn deliver(&mut self, to: End, incarnation: u32, input: Input) {
        match to {
            End::Source => {
                if incarnation == self.source_incarnation && !self.source_down {
                    self.source_input(input)
                }
            }
            End::Node(i) => {
                let s = &mut self.nodes[i];
                if s.incarnation != incarnation || s.machine.is_none() {
                    return;
                }
                if s.frozen {
                    s.pending.push_back(input);
                    return;
                }
                self.node_input(i, input);
            }
        }
    }

    fn source_input(&mut self, input: Input) {
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

    fn node_input(&mut self, i: usize, input: Input) {
        match input {
            Input::Msg(c, m) => self.with_node(i, |n, now| n.handle_message(now, c, m)),
            Input::Closed(c) => {
                self.stop_flows_on(c);
                self.with_node(i, |n, now| n.handle_closed(now, c))
            }
            Input::Accepted { conn, nonce } => {
                self.with_node(i, |n, now| n.handle_connected(now, conn, nonce))
            }
            Input::Connected { conn, to_source } => {
                if !self.conns[conn.0 as usize].open {
                    return self.with_node(i, |n, now| {
                        n.handle_connect_failed(now, to_source, "reset".into())
                    });
                }
                if to_source {
                    self.with_node(i, |n, now| n.handle_source_connected(now, conn))
                } else {
                    self.with_node(i, |n, now| n.handle_upstream_connected(now, conn))
                }
            }
            Input::ConnectFailed { to_source } => self.with_node(i, |n, now| {
                n.handle_connect_failed(now, to_source, "connection refused".into())
            }),
        }
    }

    // ----- driving the machines -----

    fn drain_source(&mut self) {
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

    fn with_node(&mut self, i: usize, f: impl FnOnce(&mut Node, Time)) {
        let now = self.now;
        self.report_progress(i);
        let Some(machine) = self.nodes[i].machine.as_mut() else {
            return;
        };
        f(machine, now);
        self.drain_node(i);
    }

    /// Hands the node's machine its data plane's current offsets.
    fn report_progress(&mut self, i: usize) {
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
        if let Some(m) = s.machine.as_mut() {
            m.handle_progress(
                now,
                Progress {
                    received,
                    written: received,
                    holds_from: 0,
                },
            );
        }
    }

    fn drain_node(&mut self, i: usize) {
        let me = End::Node(i);
        loop {
            let Some(machine) = self.nodes[i].machine.as_mut() else {
                return;
            };
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
                // A readable sink serves anything it wrote; a later offset is
                // served as it arrives.
                let _ = (node, from);
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
                self.kill(i, false);
            }
        }
    }

    // ----- the fluid data plane -----

    /// A node's offset at `t`, from its current segment or, for a time before
    /// it began, from the segments it had before.
    fn offset_at(&self, i: usize, t: Time) -> f64 {
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

    fn offset_now(&self, i: usize) -> u64 {
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
    /// share of its raw rate (see [`SimConfig::payload_rate`]).
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

    fn outflows(&self, e: End) -> &[(ConnId, usize)] {
        match e {
            End::Source => &self.source_outflows,
            End::Node(u) => &self.nodes[u].data.outflows,
        }
    }

    fn fan_out(&self, e: End) -> usize {
        self.outflows(e)
            .iter()
            .filter(|&&(c, d)| self.nodes[d].data.inflow.is_some_and(|(ic, _)| ic == c))
            .count()
            .max(1)
    }

    /// Brings a node's copy up to its offset now, copying the newly covered
    /// granules from its sender, which must hold them. Senders up the chain
    /// are brought up to date first, as far as needed.
    fn settle(&mut self, i: usize) {
        let mut chain = vec![i];
        loop {
            let x = *chain.last().expect("non-empty");
            let Some((_, End::Node(u))) = self.nodes[x].data.inflow else {
                break;
            };
            if self.nodes[u].data.copied >= self.granules_at(x) || chain.contains(&u) {
                break;
            }
            chain.push(u);
        }
        for &x in chain.iter().rev() {
            self.copy_up_to_now(x);
        }
        self.dirty.push(i);
    }

    fn granules_at(&self, i: usize) -> usize {
        let off = self.offset_at(i, self.now);
        if off >= self.cfg.size as f64 {
            self.granules
        } else {
            (off as u64 / self.granule) as usize
        }
    }

    fn copy_up_to_now(&mut self, i: usize) {
        let upto = self.granules_at(i);
        let d = &self.nodes[i].data;
        if upto <= d.copied {
            return;
        }
        let Some((_, from)) = d.inflow else {
            let what = format!("node{i} advanced to granule {upto} without an upstream");
            return self.violate(what);
        };
        let held = match from {
            End::Source => self.granules,
            End::Node(u) => self.nodes[u].data.copied,
        };
        // Offsets are floating point: one granule of rounding is noise, more
        // is a node taking data its upstream does not have.
        let upto = if upto == held + 1 { held } else { upto };
        let range = d.copied..upto;
        if held < range.end {
            return self.violate(format!(
                "node{i} copied granules {range:?} but its upstream {from:?} holds {held}"
            ));
        }
        let mut content =
            core::mem::replace(&mut self.nodes[i].data.content, Content::Tags(Vec::new()));
        match from {
            End::Source => content.copy_from(&self.source_data, range),
            End::Node(u) => content.copy_from(&self.nodes[u].data.content, range),
        }
        let d = &mut self.nodes[i].data;
        d.content = content;
        d.copied = upto;
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
    fn retime(&mut self, i: usize) {
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

    fn stop_flows_on(&mut self, conn: ConnId) {
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

    fn arrive(&mut self, i: usize) {
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
            let now = self.now;
            self.source.handle_image_done(now, size, digest);
            self.drain_source();
        }
        let digest = self.nodes[i].data.content.digest();
        let size = self.cfg.size;
        self.with_node(i, |n, now| n.handle_stream_end(now, size, digest));
        // Receivers can now read everything from this node's disk.
        self.propagate(End::Node(i));
    }

    // ----- processes and faults -----

    fn start_node(&mut self, i: usize) {
        let s = &mut self.nodes[i];
        s.incarnation += 1;
        s.frozen = false;
        s.pending.clear();
        s.timer_at = None;
        let mut cfg = NodeConfig::new(SESSION, s.name.clone(), s.addr);
        cfg.mac = [2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
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
        s.machine = Some(Node::new(now, cfg, Box::new(SimKey(self.cfg.seed)), resume));
        self.trace(|| format!("node{i:05} starts holding {have}"));
        self.drain_node(i);
    }

    /// Ends a node's process: its connections reset, its flows stop.
    fn kill(&mut self, i: usize, crash: bool) {
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

    fn fault(&mut self, f: usize) {
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

    /// Adds what the node received on its current inflow to its count and
    /// starts counting afresh from its offset now.
    fn account_inflow(&mut self, i: usize) {
        if self.nodes[i].data.inflow.is_some() {
            let off = self.offset_at(i, self.now);
            let d = &mut self.nodes[i].data;
            self.nodes[i].received += (off - d.inflow_from).max(0.0);
            self.nodes[i].data.inflow_from = off;
        }
    }

    /// The source's process dies (kill -9): every connection to it resets,
    /// and whoever it fed stops. Each live node's offset becomes its floor.
    fn kill_source(&mut self) {
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
    fn start_source(&mut self) {
        let now = self.now;
        // The nodes retry every 200 ms: a restarted source waits a second for
        // them before starting with whoever is back (later ones join the stream).
        let mut config = self.source_config.clone();
        config.join_timeout = Some(Duration::from_secs(1));
        let mut source = Source::new(now, config, Box::new(SimKey(self.cfg.seed)));
        source.handle_image_progress(now, self.cfg.size);
        for (name, mac, outcome) in self.source_record.clone() {
            source.handle_restored(now, name, mac, outcome);
        }
        self.source = source;
        self.source_down = false;
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

    /// A node's port or process changed: it and everyone it serves recompute.
    fn retime_around(&mut self, i: usize) {
        self.retime(i);
        self.propagate(End::Node(i));
        let outs = self.nodes[i].data.outflows.clone();
        for (_, d) in outs {
            self.retime(d);
        }
    }

    fn thaw(&mut self, i: usize) {
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

    // ----- checkers -----

    fn check_invariants(&mut self) {
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
            if self.cfg.arity == 1 && !topo.is_chain() {
                return self.violate("arity 1 but the topology is not a simple path".into());
            }
            // Only live nodes have a place.
            let placed: Vec<ka_core::ids::NodeId> = topo.breadth_first().flatten().collect();
            if let Some(n) = placed.into_iter().find(|&n| !self.source.is_live(n)) {
                return self.violate(format!("{n} is in the topology but not live"));
            }
        }
        // Data flows only downstream: a receiver is never ahead of its sender.
        let dirty = core::mem::take(&mut self.dirty);
        for i in dirty {
            if let Some((conn, End::Node(u))) = self.nodes[i].data.inflow {
                if self.conns[conn.0 as usize].open {
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

    fn final_checks(&mut self, completion: Duration, bound: Duration) {
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
            let deadline = self.source.config().join_timeout.unwrap_or(Duration::ZERO);
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
                    if s.data.content != self.source_data {
                        let what =
                            format!("node{i} reported OK but its copy differs from the source");
                        return self.violate(what);
                    }
                    // A node receives only what it lacks: its process never
                    // takes more than the image beyond the prefix it started
                    // with, whatever restarted (it, its upstreams, the source).
                    let current = s
                        .data
                        .inflow
                        .map_or(0.0, |_| self.offset_at(i, self.now) - s.data.inflow_from);
                    let received = s.received + current.max(0.0);
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

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Outcome {
    Sim::new(cfg).run()
}
