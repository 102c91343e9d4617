//! Settings of the source and node machines. Every duration the protocol
//! waits on lives here, so the shell and the simulator set them alike.

use core::net::SocketAddr;
use core::time::Duration;

use crate::codec::{Encoding, ImageId, Nonce};

/// What the source does with a node that stays too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Report it and leave it where it is.
    Keep,
    /// Move it to the tail, so it slows nobody downstream of it.
    MoveToTail,
    /// Drop it from the session (reported KO), so it slows nobody at all.
    Drop,
}

/// How the source runs a session.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The session's name; nodes must ask for it.
    pub session: String,
    /// Start as soon as this many nodes have joined; more are refused.
    pub expected_nodes: u32,
    /// With `join_timeout`: the fewest nodes to start with when it passes.
    pub min_nodes: u32,
    /// Start (or abort, below `min_nodes`) this long after the source began.
    pub join_timeout: Option<Duration>,
    /// Children per node: 1 makes a chain, k a k-ary tree.
    pub arity: u32,
    /// Node names in inventory order; the chain follows it, then nodes not
    /// listed, by address.
    pub order: Vec<String>,
    /// How often the source sends a heartbeat and expects one from each node.
    pub heartbeat: Duration,
    /// Silence after which a node is declared dead. Counted in time the
    /// source was running: a source that was stopped or starved (its tick
    /// came late) does not take its own stall for its nodes' silence.
    pub dead_after: Duration,
    /// Gap between releases of nodes that wait for release (Ka-deploy's `-d`).
    pub release_delay: Duration,
    /// What to do with a node that stays too slow.
    pub slow_policy: SlowPolicy,
    /// A node lagging its upstream by more than this many bytes…
    pub slow_lag: u64,
    /// …for this long is too slow.
    pub slow_window: Duration,
    /// Where the source's data port listens.
    pub data_addr: SocketAddr,
    /// The image's size, when known before streaming (a file or device).
    pub image_size: Option<u64>,
    /// How the stream encodes the image (told to each node in its welcome).
    pub encoding: Encoding,
    /// The image's identity: a node holding a prefix of this image resumes
    /// from it; a prefix of any other starts over.
    pub image_id: ImageId,
    /// This source process's run: fresh random bytes from the shell (a
    /// seeded generator in the simulator). The tickets of data links derive
    /// from it ([`crate::auth::link_ticket`]), so none outlives the process
    /// that handed it out; the welcome tells it to each node.
    pub run: Nonce,
    /// The bytes of log lines ([`crate::codec::Message::Log`]) the source
    /// takes from one node per second; what a node sends beyond it is
    /// dropped and counted, so no node can fill the source's disk or
    /// occupy its CPU with logs.
    pub log_bytes_per_sec: u32,
}

impl SourceConfig {
    /// Defaults for a session of `expected_nodes` nodes: a chain, 250 ms
    /// heartbeats and death after 1 s of silence.
    pub fn new(session: impl Into<String>, expected_nodes: u32, data_addr: SocketAddr) -> Self {
        SourceConfig {
            session: session.into(),
            expected_nodes,
            min_nodes: 1,
            join_timeout: None,
            arity: 1,
            order: Vec::new(),
            heartbeat: Duration::from_millis(250),
            dead_after: Duration::from_millis(1000),
            release_delay: Duration::ZERO,
            slow_policy: SlowPolicy::MoveToTail,
            // A chain's neighbours differ by what their sockets hold, a few
            // megabytes; a node that falls further behind at under 40 % of
            // its upstream's rate for half a second is slow whatever the
            // image's size. Every tenth of a second it goes unnoticed costs
            // the nodes behind it most of that tenth, so the window is as
            // short as a few progress reports (one per 250 ms) allow.
            slow_lag: 4 << 20,
            slow_window: Duration::from_millis(500),
            data_addr,
            image_size: None,
            encoding: Encoding::Plain,
            image_id: ImageId::default(),
            run: Nonce::default(),
            log_bytes_per_sec: 32 << 10,
        }
    }
}

/// How a node takes part in a session.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The session to join.
    pub session: String,
    /// This node's name.
    pub name: String,
    /// This node's MAC address.
    pub mac: [u8; 6],
    /// Where this node's data port listens.
    pub data_addr: SocketAddr,
    /// Stay until the source releases us (Ka-deploy's `-w`).
    pub wait_release: bool,
    /// Our sink can be read back (a file, a block device), so we can serve a
    /// downstream any offset we wrote. A node that unpacks the stream as it
    /// arrives (a system clone) cannot: it keeps a bounded window of the
    /// stream, reports where that window starts through
    /// [`Progress::holds_from`](crate::codec::Progress::holds_from), and
    /// refuses a downstream that asks for less
    /// ([`RefusalCode::CannotResume`](crate::codec::RefusalCode::CannotResume)).
    pub readable: bool,
    /// Verify by reading the written stream back, not only as received.
    /// Only a readable node can ([`readable`](Self::readable)): a node that
    /// keeps a window has unpacked the stream, and its unpacker checks what
    /// it wrote (a packed stream's target is read back there when asked).
    pub verify_readback: bool,
    /// Delay before reconnecting to the source or an upstream after a loss.
    pub reconnect_delay: Duration,
    /// Heartbeat until the source's welcome says otherwise.
    pub heartbeat: Duration,
    /// Source silence after which we consider it gone, until its welcome says
    /// otherwise. After a stall of the node itself (its check came more than a
    /// heartbeat late) the source gets one more heartbeat to be heard. Once
    /// the copy is checked, `source_wait` applies instead: the node waits for
    /// its release on the connection it has.
    pub dead_after: Duration,
    /// How long to keep trying to reach the source (at the start, or after
    /// losing it) before giving up: nodes often boot before the source is
    /// started, and a source may be restarted. Also how long a node whose
    /// copy is checked bears a silent source before it leaves it.
    pub source_wait: Duration,
}

impl NodeConfig {
    /// Defaults for a node named `name` with a readable sink.
    pub fn new(session: impl Into<String>, name: impl Into<String>, data_addr: SocketAddr) -> Self {
        NodeConfig {
            session: session.into(),
            name: name.into(),
            mac: [0; 6],
            data_addr,
            wait_release: false,
            readable: true,
            verify_readback: false,
            reconnect_delay: Duration::from_millis(200),
            heartbeat: Duration::from_millis(250),
            dead_after: Duration::from_millis(1000),
            source_wait: Duration::from_secs(300),
        }
    }
}

/// The longest a node holds received bytes before it writes and forwards
/// them. Each hop adds at most this much to the stream's latency; at
/// loopback speeds buffers fill long before it. The shell's receiving thread
/// and the simulator's piece model both use it.
pub const FORWARD_DELAY: Duration = Duration::from_millis(2);

/// On a slow link a piece goes on as soon as it holds this long of the link,
/// without waiting for [`FORWARD_DELAY`]: a piece is stored in full before it
/// is forwarded, so its length in time is what each hop adds.
pub const FORWARD_AFTER: Duration = Duration::from_millis(1);

/// The fewest bytes that make a piece worth forwarding before its deadline
/// (about 1.4 ms at 100 Mbit/s): fewer bytes per wakeup cost more CPU than
/// they save in latency.
pub const FORWARD_BYTES_MIN: u64 = 16 << 10;

/// A node records its durable prefix (for a restart) at least this often…
pub const RECORD_EVERY: Duration = Duration::from_secs(1);

/// …or whenever this many more bytes are written, whichever comes first: a
/// record costs an `fdatasync` of the target, so it is rare, and a restarted
/// node re-receives at most this much.
pub const RECORD_STEP: u64 = 64 << 20;
