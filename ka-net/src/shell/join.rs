//! The node's driver: runs [`ka_core::node::Node`], receives the image into
//! its target and serves its downstreams from what it has written.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ka_core::codec::{Digest, ImageId, Progress};
use ka_core::config::{NodeConfig, RECORD_EVERY, RECORD_STEP};
use ka_core::ids::ConnId;
use ka_core::node::{Node, NodeAction, NodeEvent, Resume};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::conn::{Command, Conns, Event, ReceiveJob, ServeJob, Side, Written};
use super::key::NodeKey;
use super::resume::{self, NodeState};
use super::{nonce, Clock};
use crate::datapath::forward::Downstreams;
use crate::datapath::window::{Window, WindowedSink};
use crate::datapath::{rehash_written, NodeWriter, RelayEnd};
use crate::image::digest::{digest_source, DigestKey, ImageHasher};
use crate::image::packed::FrameEnd;
use crate::image::sinks::{open_sink, SinkSpec};
use crate::system::rebuild::RebuildOptions;
use crate::system::Unpacked;
use crate::Error;

/// What a node joins and where it writes.
pub struct NodeOptions {
    /// The protocol settings (session, name, options). `data_addr` is filled
    /// in from the listener and the route to the source; `source_wait` from
    /// `wait`.
    pub config: NodeConfig,
    /// The source's address.
    pub server: SocketAddr,
    /// Where the image goes.
    pub target: Target,
    /// This node's key (its own, and the digest's), for the session and
    /// name of `config`.
    pub key: NodeKey,
    /// Where to listen for downstreams.
    pub listen_ip: IpAddr,
    /// The port to listen on for downstreams; 0: one the system chooses.
    /// A fixed port lets a firewall between nodes open just that one.
    pub data_port: u16,
    /// How long to keep looking for the source before giving up, at the
    /// start and after losing it: nodes often boot before the source is
    /// started, and a source may be restarted.
    pub wait: Duration,
    /// Where the state that lets a killed node resume its copy is kept
    /// ([`super::resume`]); `None`: never resume (every start is fresh).
    pub state_dir: Option<PathBuf>,
    /// Where to broadcast for the source again after losing it, when it was
    /// found by broadcast (a restarted source may have moved).
    pub rediscover: Option<SocketAddr>,
    /// Lines for this node's log at the source (its events as it prints
    /// them, its console): sent sealed once the source welcomed it.
    pub log: Option<mpsc::Receiver<String>>,
    /// Where a file target's stream is spooled when the source packs it
    /// (a bounded window: [`Target::Packed`]); `None`: in the temporary
    /// directory.
    pub packed_spool: Option<PathBuf>,
}

/// Where a node writes the image.
#[derive(Debug, Clone)]
pub enum Target {
    /// A regular file or a block device, written and served from directly.
    File(PathBuf),
    /// A command's input or a directory to untar into: the image is received
    /// into the `spool` file (served from there) and fed to the sink once it
    /// has all arrived ([`super::spool`]).
    Stream {
        /// The sink.
        spec: SinkSpec,
        /// The spool file to create.
        spool: PathBuf,
    },
    /// A system clone's node: the stream is received into `spool`, of which
    /// only a bounded window is kept ([`crate::datapath::window`]), and the
    /// node's disks are rebuilt from it as it arrives ([`crate::system`]).
    System {
        /// The disks and where to mount the new system.
        rebuild: RebuildOptions,
        /// The spool file to create.
        spool: PathBuf,
        /// The most of the stream held at once, in bytes.
        window: u64,
    },
    /// What a [`Target::File`] becomes when the source packs its stream
    /// ([`ka_core::codec::Encoding::Zstd`]): the stream is received into
    /// `spool`, of which only a bounded window is kept, and unpacked into
    /// `file` as it arrives ([`super::spool::unpack_following`]).
    Packed {
        /// The file or block device the image goes to.
        file: PathBuf,
        /// The spool file to create.
        spool: PathBuf,
        /// The most of the stream held at once, in bytes.
        window: u64,
    },
}

impl Target {
    /// The file the image is received into and served from.
    pub fn file(&self) -> &std::path::Path {
        match self {
            Target::File(p) => p,
            Target::Stream { spool, .. }
            | Target::System { spool, .. }
            | Target::Packed { spool, .. } => spool,
        }
    }
}

/// What unpacks a windowed target's spool as it grows (a system rebuild,
/// a packed stream's unpacker), on a blocking thread of the runtime.
type Unpack = Box<
    dyn FnOnce(
            &std::path::Path,
            watch::Receiver<Written>,
            Arc<Window>,
            tokio::runtime::Handle,
        ) -> Result<Unpacked, Error>
        + Send,
>;

/// How a node's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOutcome {
    /// Whether its copy verified.
    pub ok: bool,
    /// Why it left.
    pub reason: String,
    /// Bytes of the image written.
    pub written: u64,
    /// Where this process's copy went on from, as the source last agreed: a
    /// restart's durable prefix, or 0.
    pub resumed_from: u64,
    /// Bytes this process received from upstreams.
    pub received: u64,
    /// A windowed target's unpacking (a system clone's rebuild, a packed
    /// stream written out), when it completed.
    pub unpacked: Option<Unpacked>,
}

enum Internal {
    Connected {
        conn: ConnId,
        stream: TcpStream,
        to_source: bool,
    },
    ConnectFailed {
        conn: ConnId,
        to_source: bool,
        reason: String,
    },
    ReadBack(Result<Digest, String>),
    /// A spooled stream was fed to its sink; a packed one's result is the
    /// digest of the image it unpacked to.
    Fed {
        result: Result<Option<Digest>, String>,
        size: u64,
        digest: Option<Digest>,
    },
    /// A packed stream's unpacking (of generation `gen`) passed a frame
    /// end, the image before it written to the target.
    FrameEnded {
        gen: u64,
        end: FrameEnd,
    },
    /// A durable prefix was recorded (or could not be), for state generation `gen`.
    Recorded {
        gen: u64,
        result: Result<u64, String>,
    },
    /// A broadcast for the source found it here (or nowhere).
    Discovered(Option<SocketAddr>),
    /// A windowed target's unpacking ended (of generation `gen`).
    Unpacked {
        gen: u64,
        result: Result<Unpacked, String>,
    },
}

/// How often, at most, the durable prefix is recorded, and how stale it may
/// get: a record costs an `fdatasync` of the target and a small atomic write.
const RECORD_MIN_GAP: Duration = Duration::from_millis(250);

/// The node's resume state: where it is kept and how far it is recorded.
struct Durable {
    path: PathBuf,
    target: PathBuf,
    session: String,
    name: String,
    /// Bumped when the copy starts over: records made before are stale.
    gen: u64,
    recorded: u64,
    recorded_at: Instant,
    in_flight: bool,
    /// A packed stream's frame end that came while a record was in flight:
    /// recorded when that one is done.
    frame_end: Option<(ImageId, FrameEnd)>,
    /// The latest record's task: awaited before the state is removed, so a
    /// late write cannot bring it back.
    last: Option<tokio::task::JoinHandle<()>>,
}

impl Durable {
    /// Nothing recorded yet for `target`, kept at `path`.
    fn new(path: PathBuf, target: PathBuf, session: String, name: String) -> Durable {
        Durable {
            path,
            target,
            session,
            name,
            gen: 0,
            recorded: 0,
            recorded_at: Instant::now(),
            in_flight: false,
            frame_end: None,
            last: None,
        }
    }

    /// The resume state of a node with `opts`: only a file or block device
    /// target resumes, and only with a state directory.
    fn for_node(opts: &NodeOptions) -> Result<Option<Durable>, Error> {
        match (&opts.state_dir, &opts.target) {
            (Some(dir), Target::File(target)) => {
                resume::prepare_state_dir(dir)?;
                Ok(Some(Durable::new(
                    NodeState::path(dir, &opts.config.session, &opts.config.name),
                    target.clone(),
                    opts.config.session.clone(),
                    opts.config.name.clone(),
                )))
            }
            (Some(_), Target::System { .. }) => {
                tracing::info!(
                    "a system clone does not resume after a restart: a restarted node starts over"
                );
                Ok(None)
            }
            (Some(_), Target::Stream { .. }) => {
                tracing::info!(
                    "a --command or --untar target does not resume after a restart: a restarted node starts over"
                );
                Ok(None)
            }
            (Some(_), Target::Packed { .. }) | (None, _) => Ok(None),
        }
    }

    /// Reopens what an earlier run left: the target at its durable prefix,
    /// with the running digest rebuilt by reading the prefix back. `None`
    /// (and the copy starts over) if there is nothing or it does not fit.
    async fn reopen(&self, key: &DigestKey) -> Option<Resumed> {
        let state = match NodeState::load(&self.path) {
            Ok(None) => return None,
            Err(reason) => {
                tracing::warn!(%reason, "not resuming: the copy starts over");
                return None;
            }
            Ok(Some(state)) => state,
        };
        let (target, key) = (self.target.clone(), key.clone());
        let opened = tokio::task::spawn_blocking(move || reopen(state, &target, &key))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        opened.unwrap_or_else(|reason| {
            tracing::warn!(%reason, "not resuming: the copy starts over");
            None
        })
    }

    /// Whether `offset` is to be recorded now: it is past the record, no
    /// record is under way, and the target was just synced (the end of the
    /// image), or [`RECORD_STEP`] more bytes are written and
    /// [`RECORD_MIN_GAP`] has passed, or [`RECORD_EVERY`] has.
    fn record_due(&self, offset: u64, synced: bool, now: Instant) -> bool {
        let since = now.saturating_duration_since(self.recorded_at);
        let due = synced
            || (offset >= self.recorded + RECORD_STEP && since >= RECORD_MIN_GAP)
            || since >= RECORD_EVERY;
        !self.in_flight && offset > self.recorded && due
    }

    /// Records `offset` of `image` as durable (after syncing the target,
    /// unless `synced`) if it is time to, on a blocking thread that reports
    /// back with [`Internal::Recorded`].
    fn maybe_record(
        &mut self,
        image: Option<ImageId>,
        size: Option<u64>,
        offset: u64,
        synced: bool,
        tx: &mpsc::UnboundedSender<Internal>,
    ) {
        let Some(image) = image else {
            return;
        };
        if !self.record_due(offset, synced, Instant::now()) {
            return;
        }
        self.save(image, size, offset, None, synced, tx);
    }

    /// Records a packed stream's frame end of `image`: the target's image
    /// before it is synced, and the stream resumes there after a restart.
    /// Every frame end is recorded (they are [`FRAME_IMAGE`] apart), the
    /// latest one after the record in flight.
    ///
    /// [`FRAME_IMAGE`]: crate::image::packed::FRAME_IMAGE
    fn record_frame_end(
        &mut self,
        image: ImageId,
        end: FrameEnd,
        tx: &mpsc::UnboundedSender<Internal>,
    ) {
        if self.in_flight {
            self.frame_end = Some((image, end));
        } else if end.stream > self.recorded {
            self.save(image, None, end.stream, Some(end.image), false, tx);
        }
    }

    /// Saves the state (syncing the target first unless `synced`) on a
    /// blocking thread that reports back with [`Internal::Recorded`].
    fn save(
        &mut self,
        image: ImageId,
        size: Option<u64>,
        offset: u64,
        unpacked: Option<u64>,
        synced: bool,
        tx: &mpsc::UnboundedSender<Internal>,
    ) {
        self.in_flight = true;
        self.recorded_at = Instant::now();
        let state = NodeState {
            session: self.session.clone(),
            name: self.name.clone(),
            target: self.target.clone(),
            image,
            size,
            durable: offset,
            unpacked,
        };
        let (path, gen, tx) = (self.path.clone(), self.gen, tx.clone());
        self.last = Some(tokio::task::spawn_blocking(move || {
            let result = (if synced {
                Ok(())
            } else {
                resume::sync_target(&state.target)
            })
            .and_then(|()| state.save(&path))
            .map(|()| state.durable)
            .map_err(|e| e.to_string());
            let _ = tx.send(Internal::Recorded { gen, result });
        }));
    }

    /// A record of generation `gen` is done: it counts if the copy has not
    /// started over since. A frame end that waited for it goes next.
    fn recorded(
        &mut self,
        gen: u64,
        result: Result<u64, String>,
        tx: &mpsc::UnboundedSender<Internal>,
    ) {
        self.in_flight = false;
        if gen != self.gen {
            return;
        }
        match result {
            Ok(at) => self.recorded = self.recorded.max(at),
            Err(e) => tracing::warn!(error = %e, "could not record the durable prefix"),
        }
        if let Some((image, end)) = self.frame_end.take() {
            self.record_frame_end(image, end, tx);
        }
    }

    /// The copy starts over: what was recorded no longer holds. (A record
    /// still in flight names the old image, which no source will resume.)
    fn forget(&mut self) {
        self.gen += 1;
        self.recorded = 0;
        self.frame_end = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a restart found on disk, ready to go on from.
struct Resumed {
    resume: Resume,
    at: ResumedAt,
}

/// Where a restarted copy goes on.
enum ResumedAt {
    /// A plain stream's durable prefix.
    Prefix {
        /// The target's writer, standing there.
        writer: NodeWriter,
        /// The digest of the whole image, when the prefix is all of it.
        complete: Option<(u64, Digest)>,
    },
    /// A packed stream's frame end; its writer (into a spool) opens when
    /// receiving begins.
    FrameEnd(FrameEnd),
}

/// Checks the state against the target and rebuilds the running digest by
/// reading the durable prefix back. Blocking.
fn reopen(state: NodeState, target: &Path, key: &DigestKey) -> Result<Option<Resumed>, String> {
    if state.target != target {
        return Err(format!(
            "the state is of target {}, not {}",
            state.target.display(),
            target.display()
        ));
    }
    if state.durable == 0 {
        return Ok(None);
    }
    if state.size.is_some_and(|s| state.durable > s) {
        return Err("the state's prefix is longer than its image".into());
    }
    let meta = std::fs::metadata(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let on_target = state.unpacked.unwrap_or(state.durable);
    if meta.is_file() && meta.len() < on_target {
        return Err(format!(
            "{} is shorter than the recorded prefix of {on_target} bytes",
            target.display(),
        ));
    }
    if let Some(image) = state.unpacked {
        // A packed stream: its unpacker reads the target's prefix back
        // once it knows the source still serves this stream.
        return Ok(Some(Resumed {
            resume: Resume {
                image: state.image,
                have: state.durable,
            },
            at: ResumedAt::FrameEnd(FrameEnd {
                stream: state.durable,
                image,
            }),
        }));
    }
    let mut sink =
        open_sink(&SinkSpec::File(target.to_path_buf()), state.size).map_err(|e| e.to_string())?;
    if state.size.is_none() {
        super::spool::reach_ahead(target).map_err(|e| e.to_string())?;
    }
    sink.resume(state.durable).map_err(|e| e.to_string())?;
    let hasher =
        rehash_written(sink.as_ref(), key).map_err(|e| format!("reading the prefix back: {e}"))?;
    let complete = match state.size {
        Some(size) if size == state.durable => Some((
            size,
            hasher.clone().finish(size).map_err(|e| e.to_string())?,
        )),
        _ => None,
    };
    let writer = NodeWriter::new(sink, hasher).map_err(|e| e.to_string())?;
    Ok(Some(Resumed {
        resume: Resume {
            image: state.image,
            have: state.durable,
        },
        at: ResumedAt::Prefix { writer, complete },
    }))
}

/// Tells the source at `server` that node `name` cannot join and why,
/// proved with the node's `key` ([`ka_core::auth::join_failed_proof`]), so
/// the source reports it instead of waiting for it. `mac` is all zeros when
/// unknown. Gives up after a few seconds: the node is failing anyway.
pub async fn report_join_failed(
    server: SocketAddr,
    session: &str,
    name: &str,
    mac: [u8; 6],
    reason: &str,
    key: &NodeKey,
) -> Result<(), String> {
    use futures_util::{SinkExt, StreamExt};
    use ka_core::codec::{JoinFailed, Message};
    use tokio_util::codec::Framed;
    let within = Duration::from_secs(5);
    let stream = tokio::time::timeout(within, TcpStream::connect(server))
        .await
        .map_err(|_| format!("no answer from {server} within 5 s"))?
        .map_err(|e| format!("cannot reach the source at {server}: {e}"))?;
    let mut framed = Framed::new(stream, super::wire::MessageCodec);
    let server_nonce = match tokio::time::timeout(within, framed.next()).await {
        Ok(Some(Ok(Message::Challenge { nonce, .. }))) => nonce,
        _ => return Err(format!("{server} did not challenge us as a ka source does")),
    };
    let mut report = JoinFailed {
        version: ka_core::codec::PROTOCOL_VERSION,
        session: session.to_string(),
        name: name.to_string(),
        mac,
        reason: reason.to_string(),
        nonce: nonce(),
        proof: Default::default(),
    };
    report.proof = ka_core::auth::join_failed_proof(&*key.mac_key(), &server_nonce, &report);
    framed
        .send(Message::JoinFailed(Box::new(report)))
        .await
        .map_err(|e| format!("sending the report: {e}"))?;
    // The source closes the connection once it took the report, or
    // refuses it.
    match tokio::time::timeout(within, framed.next()).await {
        Ok(Some(Ok(Message::Refused(r)))) => Err(format!("the source refused it: {}", r.detail)),
        Ok(None | Some(Err(_))) => Ok(()),
        Ok(Some(Ok(other))) => Err(format!("unexpected answer {}", other.name())),
        Err(_) => Err("the source did not answer within 5 s".into()),
    }
}

/// Joins the session at `opts.server` and runs until released, refused or
/// failed. `on_event` sees every event, for the console.
pub async fn run_node(
    mut opts: NodeOptions,
    mut on_event: impl FnMut(&Node, &NodeEvent),
) -> Result<NodeOutcome, Error> {
    let clock = Clock::start();
    let listen = SocketAddr::new(opts.listen_ip, opts.data_port);
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        let what = if opts.data_port == 0 {
            "listening for downstream nodes".to_string()
        } else {
            format!(
                "listening for downstream nodes on {listen} (--data-port {}: is another ka join using it?)",
                opts.data_port
            )
        };
        Error::io(what, e)
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listen address", e))?
        .port();
    opts.config.data_addr = SocketAddr::new(route_to(opts.server, opts.listen_ip), port);
    opts.config.source_wait = opts.wait;
    // A file or device is served from in full, and so is a command's or a
    // directory's whole spool; a system clone keeps only a window of its
    // spool and says from where it holds (`holds_from` in its progress).
    opts.config.readable = !matches!(opts.target, Target::System { .. });
    let durable = Durable::for_node(&opts)?;
    let resumed = match &durable {
        Some(d) => d.reopen(opts.key.digest_key()).await,
        None => None,
    };
    let (mut driver, mut inputs) = NodeDriver::new(clock, opts, durable, resumed);
    let outcome = driver.run(&listener, &mut inputs, &mut on_event).await;
    driver.finish().await;
    Ok(outcome)
}

/// The node's one writer is lent to one receive job at a time; a receive
/// the machine asks for while it is out waits for it, and a start over
/// discards it when it comes back.
#[derive(Debug, Default)]
struct Loans {
    /// The receive job holding the writer.
    out: Option<Loan>,
    /// The receive asked for while the writer was out: `(conn, from)`.
    pending: Option<(ConnId, u64)>,
}

/// A receive job holding the writer.
#[derive(Debug, Clone, Copy)]
struct Loan {
    /// Where the job began.
    from: u64,
    /// The copy started over while it ran: what it wrote is of an image
    /// the copy no longer follows.
    discard: bool,
}

/// What to do with a writer that came back.
#[derive(Debug, PartialEq, Eq)]
enum Returned {
    /// Keep it: its job received this many bytes.
    Keep { received: u64 },
    /// Drop it: the copy started over while it was out.
    Discard,
}

impl Loans {
    /// The machine asks to receive on `conn` from `from`: true if the
    /// writer is home and the receive may begin now, false if it waits for
    /// the writer (a later ask replaces an earlier one).
    fn ask(&mut self, conn: ConnId, from: u64) -> bool {
        if self.out.is_some() {
            self.pending = Some((conn, from));
            return false;
        }
        true
    }

    /// The writer went out to a receive job that begins at `from`.
    fn lent(&mut self, from: u64) {
        self.out = Some(Loan {
            from,
            discard: false,
        });
    }

    /// The copy starts over: the writer out is discarded when it returns,
    /// and a waiting receive is dropped (the machine asks again).
    fn start_over(&mut self) {
        if let Some(loan) = &mut self.out {
            loan.discard = true;
        }
        self.pending = None;
    }

    /// The writer came back, standing at `at`.
    fn back(&mut self, at: u64) -> Returned {
        match self.out.take() {
            Some(Loan { discard: true, .. }) => Returned::Discard,
            Some(Loan { from, .. }) => Returned::Keep {
                received: at.saturating_sub(from),
            },
            None => Returned::Keep { received: 0 },
        }
    }

    /// The receive that waited for the writer, to begin now.
    fn take_pending(&mut self) -> Option<(ConnId, u64)> {
        self.pending.take()
    }

    /// Whether the progress of the job out counts: not once it is to be
    /// discarded.
    fn counts_progress(&self) -> bool {
        !self.out.is_some_and(|loan| loan.discard)
    }
}

/// What wakes a node's driver besides its listener and its deadline.
struct Inputs {
    /// From the connections' tasks.
    events: mpsc::UnboundedReceiver<Event>,
    /// From the driver's own background work.
    internal: mpsc::UnboundedReceiver<Internal>,
    /// Lines for the node's log at the source, while their sender lives.
    log: Option<mpsc::Receiver<String>>,
}

/// The next batch of log lines (up to one message's worth), or never once
/// there is no sender.
async fn next_log_lines(log: &mut Option<mpsc::Receiver<String>>) -> Vec<String> {
    let Some(rx) = log else {
        return std::future::pending().await;
    };
    let mut lines = Vec::new();
    if rx
        .recv_many(&mut lines, ka_core::codec::MAX_LOG_LINES)
        .await
        == 0
    {
        *log = None;
    }
    lines
}

/// A node's driver: owns the [`Node`] machine and the shell's state around
/// it, feeds it every input and carries out its actions.
struct NodeDriver {
    node: Node,
    clock: Clock,
    /// The source's address (it may move: see `rediscover`).
    server: SocketAddr,
    rediscover: Option<SocketAddr>,
    target: Target,
    key: NodeKey,
    session: String,
    durable: Option<Durable>,
    /// The writer, while it is home (not lent to a receive job).
    writer: Option<NodeWriter>,
    loans: Loans,
    /// How far the target is written, for the servers that follow it.
    written: watch::Sender<Written>,
    written_rx: watch::Receiver<Written>,
    /// Downstreams that keep up are fed by the receiving thread itself.
    direct: Arc<Downstreams>,
    conns: Conns,
    internal_tx: mpsc::UnboundedSender<Internal>,
    /// Bytes this process received from upstreams.
    received_bytes: u64,
    /// Where the source agreed the copy goes on from.
    resumed_from: u64,
    /// A broadcast for the source is under way.
    discovering: bool,
    /// Only the latest attempt to reach an upstream counts: the topology
    /// may have moved on while an older one was connecting.
    upstream_attempt: Option<ConnId>,
    /// A system clone's or a packed stream's bounded window, once
    /// receiving began.
    window: Option<Arc<Window>>,
    /// Where a file target's stream is spooled if the source packs it.
    packed_spool: PathBuf,
    /// Whether the target is to be read back after writing.
    read_back: bool,
    /// A windowed target (a system clone, a packed stream): the stream's
    /// end as received (and its digest, unless packed), until its
    /// unpacking is done too.
    windowed_end: Option<(u64, Option<Digest>)>,
    /// A windowed target: how its unpacking ended.
    unpack: Option<Result<Unpacked, String>>,
    /// A windowed target's unpacking generation: a start over begins
    /// another, and the old one's result no longer counts.
    unpack_gen: u64,
    /// The running unpacking, which the next one waits for (a rebuild must
    /// have unmounted before the disks are partitioned again).
    unpack_task: Option<tokio::task::JoinHandle<()>>,
    /// A restarted packed stream's node: the frame end its state recorded,
    /// where its spool and its unpacking go on from.
    frame_end: Option<FrameEnd>,
}

impl NodeDriver {
    fn new(
        clock: Clock,
        opts: NodeOptions,
        mut durable: Option<Durable>,
        resumed: Option<Resumed>,
    ) -> (NodeDriver, Inputs) {
        let NodeOptions {
            config,
            server,
            target,
            key,
            rediscover,
            log,
            packed_spool,
            ..
        } = opts;
        let session = config.session.clone();
        let read_back = config.verify_readback;
        let packed_spool = packed_spool.unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "ka-node-{}-{}.packed-spool",
                config.name,
                std::process::id()
            ))
        });
        let mut writer = None;
        let mut start = Written::default();
        let mut resume = None;
        let mut complete = None;
        let mut frame_end = None;
        if let Some(r) = resumed {
            match r.at {
                ResumedAt::Prefix {
                    writer: w,
                    complete: c,
                } => {
                    tracing::info!(
                        from = r.resume.have,
                        "resuming the copy from its durable prefix (read back to rebuild its digest)"
                    );
                    start.size = c.map(|(size, _)| size);
                    writer = Some(w);
                    complete = c;
                }
                ResumedAt::FrameEnd(end) => {
                    tracing::info!(
                        from = end.stream,
                        image = end.image,
                        "resuming a packed stream from the frame end it recorded"
                    );
                    frame_end = Some(end);
                }
            }
            start.upto = r.resume.have;
            resume = Some(r.resume);
            if let Some(d) = &mut durable {
                d.recorded = r.resume.have;
            }
        }
        let mut node = Node::new(clock.now(), config, key.mac_key(), resume);
        if let Some((size, digest)) = complete {
            node.handle_stream_end(clock.now(), size, digest);
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (written, written_rx) = watch::channel(start);
        let driver = NodeDriver {
            node,
            clock,
            server,
            rediscover,
            target,
            key,
            session,
            durable,
            writer,
            loans: Loans::default(),
            written,
            written_rx,
            direct: Arc::new(Downstreams::default()),
            conns: Conns::new(events_tx),
            internal_tx,
            received_bytes: 0,
            resumed_from: 0,
            discovering: false,
            upstream_attempt: None,
            window: None,
            packed_spool,
            read_back,
            windowed_end: None,
            unpack: None,
            unpack_gen: 0,
            unpack_task: None,
            frame_end,
        };
        (
            driver,
            Inputs {
                events,
                internal,
                log,
            },
        )
    }

    /// Runs the machine until it exits.
    async fn run(
        &mut self,
        listener: &TcpListener,
        inputs: &mut Inputs,
        on_event: &mut impl FnMut(&Node, &NodeEvent),
    ) -> NodeOutcome {
        loop {
            if let Some(outcome) = self.drain(on_event, &mut inputs.log) {
                return outcome;
            }
            let deadline = self.node.poll_timeout().map(|(t, _)| self.clock.instant(t));
            tokio::select! {
                accepted = self.conns.accept(listener) => {
                    // A downstream, or an operator.
                    if let Some(id) = self.conns.admit(accepted) {
                        self.node.handle_connected(self.clock.now(), id, nonce());
                    }
                }
                Some(msg) = inputs.internal.recv() => self.internal(msg),
                Some(event) = inputs.events.recv() => self.conn_event(event),
                lines = next_log_lines(&mut inputs.log) => self.node.handle_log(self.clock.now(), lines),
                _ = sleep_until(deadline) => self.node.handle_timeout(self.clock.now()),
            }
        }
    }

    /// Drains the machine's outputs: frames to their connections, events to
    /// `on_event`, actions carried out. The outcome once it exits.
    fn drain(
        &mut self,
        on_event: &mut impl FnMut(&Node, &NodeEvent),
        log: &mut Option<mpsc::Receiver<String>>,
    ) -> Option<NodeOutcome> {
        self.send_transmits();
        while let Some(ev) = self.node.poll_event() {
            if let NodeEvent::Welcomed { resumed_from, .. } = &ev {
                self.resumed_from = *resumed_from;
                self.follow_encoding();
            }
            on_event(&self.node, &ev);
        }
        // The lines `on_event` just logged go before anything the events
        // lead to (the exit above all), so a node's last words reach the
        // source.
        if let Some(rx) = log {
            let mut lines = Vec::new();
            while let Ok(line) = rx.try_recv() {
                lines.push(line);
            }
            if !lines.is_empty() {
                self.node.handle_log(self.clock.now(), lines);
                self.send_transmits();
            }
        }
        while let Some(action) = self.node.poll_action() {
            // An action handler may feed the machine (a sink that fails to
            // open): whatever it transmits goes out before a close or exit.
            self.send_transmits();
            if let Some(outcome) = self.act(action) {
                return Some(outcome);
            }
        }
        None
    }

    /// Hands the frames the machine wants sent to their connections' tasks.
    fn send_transmits(&mut self) {
        self.conns.flush_refusals();
        while let Some((c, m)) = self.node.poll_transmit() {
            self.conns.send(c, m);
        }
    }

    /// Carries out one action; the outcome if it is the exit.
    fn act(&mut self, action: NodeAction) -> Option<NodeOutcome> {
        match action {
            NodeAction::ConnectSource => {
                let id = self.conns.next_id();
                connect(id, self.server, true, &self.internal_tx);
            }
            NodeAction::ConnectUpstream { addr, .. } => {
                // The source's data port is the address we reached it at.
                let addr = if self.node.upstream().is_some_and(|u| u.node.is_none()) {
                    self.server
                } else {
                    addr
                };
                let id = self.conns.next_id();
                self.upstream_attempt = Some(id);
                connect(id, addr, false, &self.internal_tx);
            }
            NodeAction::Receive { conn, from } => {
                if self.loans.ask(conn, from) {
                    self.begin_receive(conn, from);
                }
            }
            NodeAction::Serve {
                conn,
                node: _,
                from,
            } => {
                // A system clone's serving must hold its place in the window
                // even when it begins before this node receives anything.
                let window = match self.spool_window() {
                    Ok(w) => w,
                    Err(e) => {
                        self.node.handle_sink_error(self.clock.now(), e.to_string());
                        return None;
                    }
                };
                if let Some(tx) = self.conns.get(conn) {
                    let job = ServeJob {
                        from,
                        path: self.target.file().to_path_buf(),
                        written: self.written_rx.clone(),
                        pace: None,
                        // A windowed node forwards only from its spool,
                        // where each serving holds its place in the window.
                        direct: window.is_none().then(|| Arc::clone(&self.direct)),
                        window,
                    };
                    let _ = tx.send(Command::Serve(Box::new(job)));
                }
            }
            NodeAction::Close { conn } => {
                self.conns.close(conn);
            }
            NodeAction::StartOver => {
                if let Some(w) = self.window.take() {
                    // A windowed target starts its unpacking over too: the
                    // old one stops reading (a rebuild unmounts) and is
                    // forgotten.
                    let what = match self.target {
                        Target::System { .. } => {
                            "the source serves another system stream: rebuilding the disks from its start"
                        }
                        _ => "the source serves another packed stream: unpacking it from its start",
                    };
                    tracing::warn!("{what}");
                    w.close();
                    self.unpack_gen += 1;
                    self.windowed_end = None;
                    self.unpack = None;
                }
                tracing::warn!(
                    "the source serves another image than the one this copy was made of: starting over from 0"
                );
                if let Some(w) = self.writer.take() {
                    tokio::spawn(w.into_parts());
                }
                self.loans.start_over();
                self.written.send_replace(Written::default());
                self.frame_end = None;
                if let Some(d) = &mut self.durable {
                    d.forget();
                }
            }
            NodeAction::ReadBack => self.read_back(),
            NodeAction::Exit { ok, mut reason } => {
                if reason.starts_with("no source answered") {
                    reason = format!("{reason} at {}: is `ka serve` running there?", self.server);
                }
                if let Some(w) = &self.window {
                    // The receiving thread must not wait for an unpacker
                    // that is gone.
                    w.close();
                }
                tracing::info!(stats = ?self.direct.stats(), "forwarded straight from the receiving thread");
                return Some(NodeOutcome {
                    ok,
                    reason,
                    written: self.written_rx.borrow().upto,
                    resumed_from: self.resumed_from,
                    received: self.received_bytes,
                    unpacked: self.unpack.take().and_then(Result::ok),
                });
            }
        }
        None
    }

    /// Computes the digest of what reads back from the target; the machine
    /// compares it with the source's.
    fn read_back(&mut self) {
        let Some(w) = self.writer.take() else {
            self.node.handle_sink_error(
                self.clock.now(),
                "read-back requested while the target is busy".into(),
            );
            return;
        };
        let (key, tx) = (self.key.digest_key().clone(), self.internal_tx.clone());
        tokio::spawn(async move {
            let result = match w.into_parts().await {
                Err(e) => Err(e.to_string()),
                Ok((sink, _)) => tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; crate::datapath::BUF_SIZE];
                    sink.readback()
                        .and_then(|mut rb| {
                            digest_source(rb.as_mut(), ImageHasher::new(&key), &mut buf)
                        })
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            };
            let _ = tx.send(Internal::ReadBack(result));
        });
    }

    /// The driver's own background work reports.
    fn internal(&mut self, msg: Internal) {
        let now = self.clock.now();
        match msg {
            Internal::Connected { conn, .. } | Internal::ConnectFailed { conn, .. }
                if !is_source_attempt(&msg) && self.upstream_attempt != Some(conn) => {}
            Internal::Connected {
                conn,
                stream,
                to_source,
            } => {
                self.conns.start(conn, stream, Side::Connected);
                if to_source {
                    self.node.handle_source_connected(now, conn, nonce());
                } else {
                    self.node.handle_upstream_connected(now, conn, nonce());
                }
            }
            Internal::ConnectFailed {
                to_source, reason, ..
            } => {
                if to_source && !self.discovering {
                    if let Some(to) = self.rediscover {
                        // The source may have come back elsewhere.
                        self.discovering = true;
                        let (session, tx) = (self.session.clone(), self.internal_tx.clone());
                        let (name, key) = (self.key.name().to_string(), self.key.mac_key());
                        tokio::spawn(async move {
                            let asker = ka_core::auth::Asker::Node(&name);
                            let wait = Duration::from_secs(1);
                            let found = super::discovery::find(&session, asker, key, to, wait)
                                .await
                                .ok();
                            let _ = tx.send(Internal::Discovered(found));
                        });
                    }
                }
                self.node.handle_connect_failed(now, to_source, reason)
            }
            Internal::Discovered(found) => {
                self.discovering = false;
                if let Some(addr) = found.filter(|a| *a != self.server) {
                    tracing::info!(%addr, "found the source again by broadcast");
                    self.server = addr;
                }
            }
            Internal::Recorded { gen, result } => {
                if let Some(d) = &mut self.durable {
                    d.recorded(gen, result, &self.internal_tx);
                }
            }
            Internal::FrameEnded { gen, .. } if gen != self.unpack_gen => {}
            Internal::FrameEnded { end, .. } => {
                if let (Some(d), Some(image)) = (&mut self.durable, self.node.image_id()) {
                    d.record_frame_end(image, end, &self.internal_tx);
                }
            }
            Internal::Unpacked { gen, .. } if gen != self.unpack_gen => {}
            Internal::Unpacked { result, .. } => {
                if let Err(e) = &result {
                    // The stream is of no use any more: stop at once, KO.
                    if let Some(w) = &self.window {
                        w.close();
                    }
                    self.node.handle_sink_error(now, e.clone());
                }
                self.unpack = Some(result);
                self.windowed_done();
            }
            Internal::ReadBack(Ok(d)) => self.node.handle_readback(now, d),
            Internal::Fed {
                result: Ok(image),
                size,
                digest,
            } => self.copy_ended(size, image.or(digest)),
            Internal::Fed { result: Err(e), .. } => self.node.handle_sink_error(now, e),
            Internal::ReadBack(Err(e)) => self
                .node
                .handle_sink_error(now, format!("reading the target back: {e}")),
        }
    }

    /// A connection's task reports.
    fn conn_event(&mut self, event: Event) {
        let now = self.clock.now();
        match event {
            Event::Frame(c, m) => {
                self.conns.heard(c);
                self.node.handle_message(now, c, m);
            }
            Event::Closed(c, why) => {
                tracing::debug!(conn = %c, %why, "connection closed");
                self.conns.forget(c);
                self.node.handle_closed(now, c);
            }
            Event::Progress(offset) => {
                if self.loans.counts_progress() {
                    self.node.handle_progress(
                        now,
                        Progress {
                            received: offset,
                            written: offset,
                            holds_from: self.holds_from(),
                        },
                    );
                    // A packed stream's offsets are not where it can resume:
                    // its frame ends are ([`Internal::FrameEnded`]).
                    if let (Some(d), Target::File(_)) = (&mut self.durable, &self.target) {
                        let (image, size) = (self.node.image_id(), self.node.image_size());
                        d.maybe_record(image, size, offset, false, &self.internal_tx);
                    }
                }
            }
            Event::Received {
                conn,
                writer,
                result,
            } => self.received(conn, *writer, result),
            Event::Served { conn, result } => {
                if let Err(e) = result {
                    tracing::info!(conn = %conn, error = %e, "serving a downstream stopped");
                    if let Some(w) = &self.window {
                        // Perhaps it asked for what the window has let go:
                        // the machine learns where the window stands, so
                        // the next ask is refused and the downstream goes
                        // to the source instead of knocking here again.
                        let upto = self.written_rx.borrow().upto;
                        self.node.handle_progress(
                            now,
                            Progress {
                                received: upto,
                                written: upto,
                                holds_from: w.holds_from(),
                            },
                        );
                    }
                }
            }
        }
    }

    /// A receive job ended and gave the writer back.
    fn received(&mut self, conn: ConnId, w: NodeWriter, result: Result<RelayEnd, Error>) {
        let now = self.clock.now();
        self.conns.forget(conn);
        let at = w.position();
        match self.loans.back(at) {
            // Of an image the copy no longer follows.
            Returned::Discard => drop(tokio::spawn(w.into_parts())),
            Returned::Keep { received } => {
                // Say exactly where the target stands before anything else:
                // a resume asks for this offset.
                self.received_bytes += received;
                self.node.handle_progress(
                    now,
                    Progress {
                        received: at,
                        written: at,
                        holds_from: self.holds_from(),
                    },
                );
                self.writer = Some(w);
                match result {
                    Ok(end) => self.stream_ended(end),
                    Err(e) if is_upstream_fault(&e) => {
                        tracing::info!(error = %e, "upstream stream stopped");
                        self.node.handle_closed(now, conn);
                    }
                    Err(e) => self.node.handle_sink_error(now, e.to_string()),
                }
            }
        }
        if let Some((conn, from)) = self.loans.take_pending() {
            self.begin_receive(conn, from);
        }
    }

    /// The whole image arrived, was written and hashed.
    fn stream_ended(&mut self, end: RelayEnd) {
        match &self.target {
            Target::File(_) => {
                // The sink's finish flushed it all: durable as it stands.
                if let Some(d) = &mut self.durable {
                    d.in_flight = false;
                    let (image, size) = (self.node.image_id(), self.node.image_size());
                    d.maybe_record(image, size, end.size, true, &self.internal_tx);
                }
                self.copy_ended(end.size, end.digest)
            }
            Target::System { .. } | Target::Packed { .. } => {
                self.windowed_end = Some((end.size, end.digest));
                self.windowed_done();
            }
            Target::Stream { spec, spool } => {
                // The sink gets the image only once all of it is here.
                let (spec, spool, tx) = (spec.clone(), spool.clone(), self.internal_tx.clone());
                let unpack = self.packed().then(|| self.key.digest_key().clone());
                tokio::task::spawn_blocking(move || {
                    let result = super::spool::feed_sink(&spool, end.size, &spec, unpack.as_ref())
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Internal::Fed {
                        result,
                        size: end.size,
                        digest: end.digest,
                    });
                });
            }
        }
    }

    /// Whether the source packs its stream (as its welcome said).
    fn packed(&self) -> bool {
        self.node.encoding() != ka_core::codec::Encoding::Plain
    }

    /// The lowest offset this node can still serve: a system clone's
    /// window's start, 0 for every other target.
    fn holds_from(&self) -> u64 {
        self.window.as_ref().map_or(0, |w| w.holds_from())
    }

    /// Becomes a packed-stream node when the source's welcome says it packs
    /// its stream, and a plain one again if a later source does not. A copy
    /// under way starts over all the same (another source is another image).
    fn follow_encoding(&mut self) {
        let packed = self.packed();
        match &self.target {
            Target::File(file) if packed => {
                tracing::info!(
                    "the source packs its stream: unpacking it into the target as it arrives"
                );
                self.target = Target::Packed {
                    file: file.clone(),
                    spool: self.packed_spool.clone(),
                    window: crate::datapath::window::DEFAULT_WINDOW,
                };
            }
            Target::Packed { file, .. } if !packed => {
                self.target = Target::File(file.clone());
            }
            _ => {}
        }
    }

    /// A windowed target is done once both the stream has ended (its
    /// digest is known) and it is unpacked (the disks rebuilt, the target
    /// written): only then is it checked.
    fn windowed_done(&mut self) {
        if let (Some(Ok(unpacked)), Some((size, digest))) = (&self.unpack, self.windowed_end) {
            // Once: the stream's end is handed to the machine a single time.
            // A packed stream's copy is the image it unpacked to.
            let digest = unpacked.image.or(digest);
            self.windowed_end = None;
            self.copy_ended(size, digest);
        }
    }

    /// The copy is complete: the stream's `size`, and the digest it is
    /// checked by (the stream's, or a packed stream's image's), which every
    /// writer of a copy that needs one has made.
    fn copy_ended(&mut self, size: u64, digest: Option<Digest>) {
        let now = self.clock.now();
        match digest {
            Some(d) => self.node.handle_stream_end(now, size, d),
            None => self
                .node
                .handle_sink_error(now, "the copy ended with no digest to check it by".into()),
        }
    }

    /// Opens the writer of the first receive. A windowed target (a system
    /// clone, a packed stream) receives into its spool's window, and this
    /// also starts what unpacks the spool as it grows.
    fn first_writer(&mut self) -> Result<NodeWriter, Error> {
        // A packed stream's copy is checked by the image it unpacks to: the
        // stream's own digest would be work nobody uses (and a restarted
        // node could not make it, holding only the stream after its frame
        // end).
        let hash = (!self.packed()).then(|| self.key.digest_key().clone());
        let unpack: Unpack = match &self.target {
            Target::File(_) | Target::Stream { .. } => {
                return open_writer(self.target.file(), self.node.image_size(), hash.as_ref())
            }
            Target::Packed { file, .. } => {
                let to = super::spool::UnpackTo {
                    target: file.clone(),
                    key: self.key.digest_key().clone(),
                    expected: match self.node.encoding() {
                        ka_core::codec::Encoding::Zstd { image_size } => image_size,
                        ka_core::codec::Encoding::Plain => None,
                    },
                    read_back: self.read_back,
                    from: self.frame_end,
                };
                let (tx, gen) = (self.internal_tx.clone(), self.unpack_gen);
                Box::new(move |spool, written, window, rt| {
                    super::spool::unpack_following(spool, written, window, &to, rt, &mut |end| {
                        let _ = tx.send(Internal::FrameEnded { gen, end });
                    })
                })
            }
            Target::System { rebuild, .. } => {
                let opts = rebuild.clone();
                let unpacker = match self.node.encoding() {
                    ka_core::codec::Encoding::Plain => None,
                    ka_core::codec::Encoding::Zstd { .. } => {
                        Some(crate::image::packed::Unpacker::new(self.key.digest_key())?)
                    }
                };
                Box::new(move |spool, written, window, rt| {
                    crate::system::unpack_following(spool, written, window, opts, unpacker, rt)
                })
            }
        };
        let spool = self.target.file().to_path_buf();
        let win = self
            .spool_window()?
            .expect("a windowed target has a window");
        let mut sink = open_sink(&SinkSpec::File(spool.clone()), None)?;
        super::spool::reach_ahead(&spool)?;
        if let Some(end) = self.frame_end {
            sink.resume(end.stream)?;
        }
        let sink = Box::new(WindowedSink::new(sink, Arc::clone(&win)));
        let writer = node_writer(sink, hash.as_ref())?;
        let (tx, written) = (self.internal_tx.clone(), self.written_rx.clone());
        let rt = tokio::runtime::Handle::current();
        let (gen, before) = (self.unpack_gen, self.unpack_task.take());
        self.unpack_task = Some(tokio::task::spawn_blocking(move || {
            if let Some(before) = before {
                // The last unpacker must have let go of the target (a
                // rebuild unmounts its disks before they are partitioned
                // again).
                let _ = rt.block_on(before);
            }
            let result = unpack(&spool, written, win, rt).map_err(|e| e.to_string());
            let _ = tx.send(Internal::Unpacked { gen, result });
        }));
        Ok(writer)
    }

    /// A windowed target's window over its spool (made on first need: the
    /// first serving or the first receive); `None` for other targets.
    fn spool_window(&mut self) -> Result<Option<Arc<Window>>, Error> {
        let (Target::System { spool, window, .. } | Target::Packed { spool, window, .. }) =
            &self.target
        else {
            return Ok(None);
        };
        if let Some(w) = &self.window {
            return Ok(Some(Arc::clone(w)));
        }
        let handle = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(spool)
            .map_err(|e| Error::io(format!("creating {}", spool.display()), e))?;
        let from = self.frame_end.map_or(0, |end| end.stream);
        let w = Window::starting_at(handle, *window, from);
        self.window = Some(Arc::clone(&w));
        Ok(Some(w))
    }

    /// Lends the writer (opening it on the first receive) to the receive
    /// job on `conn`, which must start where the target stands.
    fn begin_receive(&mut self, conn: ConnId, from: u64) {
        match self.lend_writer(conn, from) {
            Ok(true) => self.loans.lent(from),
            Ok(false) => {}
            Err(refused) => self.refused_receive(conn, refused),
        }
    }

    /// [`Self::begin_receive`]'s work. `Ok(false)`: the connection is
    /// already gone.
    fn lend_writer(&mut self, conn: ConnId, from: u64) -> Result<bool, RefusedReceive> {
        let w = match self.writer.take() {
            Some(w) => w,
            None => self
                .first_writer()
                .map_err(|e| RefusedReceive::Sink(e.to_string()))?,
        };
        if w.position() != from {
            let at = w.position();
            self.writer = Some(w);
            return Err(if from < at {
                RefusedReceive::Behind
            } else {
                RefusedReceive::Sink(format!(
                    "upstream offered offset {from}, the target is at {at}"
                ))
            });
        }
        let Some(tx) = self.conns.get(conn) else {
            self.writer = Some(w);
            return Ok(false);
        };
        let job = ReceiveJob {
            writer: w,
            written: self.written.clone(),
            direct: Arc::clone(&self.direct),
        };
        if let Err(mpsc::error::SendError(Command::Receive(job))) =
            tx.send(Command::Receive(Box::new(job)))
        {
            self.writer = Some(job.writer);
            return Ok(false);
        }
        Ok(true)
    }

    /// Drops a data connection whose receive could not begin: a stale
    /// offset is asked again (as if the connection had closed), a sink
    /// failure fails us.
    fn refused_receive(&mut self, conn: ConnId, refused: RefusedReceive) {
        let now = self.clock.now();
        match refused {
            RefusedReceive::Behind => {
                self.conns.close(conn);
                self.node.handle_closed(now, conn);
            }
            RefusedReceive::Sink(reason) => self.node.handle_sink_error(now, reason),
        }
    }

    /// After the exit: lets the last frames leave, records what is on disk
    /// if the copy stops unchecked (so a restart goes on from it), and
    /// removes the resume state of a checked copy.
    async fn finish(self) {
        let NodeDriver {
            node,
            conns,
            writer,
            mut durable,
            target,
            ..
        } = self;
        // A packed stream's spool position is no place to resume from: its
        // frame ends are recorded as they are passed.
        let plain = matches!(target, Target::File(_));
        conns.finish().await;
        let verdict_given = node.verdict().is_some();
        let image = node.image_id();
        let size = node.image_size();
        if let Some(w) = writer {
            let parts = w.into_parts().await;
            // Leaving without a verdict (the source never came back, the
            // session was aborted): record what is on disk.
            if let (Some(d), Ok((sink, _)), Some(image), false, true) =
                (&durable, parts, image, verdict_given, plain)
            {
                let at = sink.position();
                if at > d.recorded {
                    let path = d.path.clone();
                    let state = NodeState {
                        session: d.session.clone(),
                        name: d.name.clone(),
                        target: d.target.clone(),
                        image,
                        size,
                        durable: at,
                        unpacked: None,
                    };
                    let _ = tokio::task::spawn_blocking(move || {
                        resume::sync_target(&state.target).and_then(|()| state.save(&path))
                    })
                    .await;
                }
            }
        }
        // A checked copy (good or bad) has nothing left to resume.
        if let (Some(d), true) = (&mut durable, verdict_given) {
            if let Some(task) = d.last.take() {
                let _ = task.await;
            }
            let _ = std::fs::remove_file(&d.path);
        }
    }
}

/// Why a receive could not begin.
enum RefusedReceive {
    /// The upstream offers bytes the target already holds: the machine asked
    /// with an offset from before the previous upstream's relay had settled.
    /// It now knows the target's position; asking again fixes it.
    Behind,
    /// The target cannot take the stream.
    Sink(String),
}

fn is_source_attempt(msg: &Internal) -> bool {
    matches!(
        msg,
        Internal::Connected {
            to_source: true,
            ..
        } | Internal::ConnectFailed {
            to_source: true,
            ..
        }
    )
}

/// Opens the writer of a target written whole (a file, a device, a spool),
/// hashing what it writes with `key`, or not at all without one.
fn open_writer(
    target: &std::path::Path,
    size: Option<u64>,
    key: Option<&DigestKey>,
) -> Result<NodeWriter, Error> {
    let sink = open_sink(&SinkSpec::File(target.to_path_buf()), size)?;
    if size.is_none() {
        // Served to downstreams while its size is unknown: see reach_ahead.
        super::spool::reach_ahead(target)?;
    }
    node_writer(sink, key)
}

/// A writer to `sink` hashing what it writes with `key`, or not at all
/// without one.
fn node_writer(
    sink: Box<dyn crate::image::sinks::ImageSink>,
    key: Option<&DigestKey>,
) -> Result<NodeWriter, Error> {
    match key {
        Some(key) => NodeWriter::new(sink, ImageHasher::new(key)),
        None => NodeWriter::unhashed(sink),
    }
}

/// A stream that stopped because of the upstream (closed, garbled) rather
/// than our own disk: the cure is another upstream, not giving up.
fn is_upstream_fault(e: &Error) -> bool {
    match e {
        Error::UpstreamClosed { .. }
        | Error::Record { .. }
        | Error::Truncated { .. }
        | Error::Invalid(_) => true,
        Error::Io { context, .. } => context.contains("upstream"),
        _ => false,
    }
}

fn connect(conn: ConnId, addr: SocketAddr, to_source: bool, tx: &mpsc::UnboundedSender<Internal>) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let msg = match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await
        {
            Ok(Ok(stream)) => Internal::Connected {
                conn,
                stream,
                to_source,
            },
            Ok(Err(e)) => Internal::ConnectFailed {
                conn,
                to_source,
                reason: format!("{addr}: {e}"),
            },
            Err(_) => Internal::ConnectFailed {
                conn,
                to_source,
                reason: format!("{addr}: no answer within 3 s"),
            },
        };
        let _ = tx.send(msg);
    });
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The address of ours that the route to `server` leaves from, so the source
/// can tell our downstream where to reach us. Asking the kernel with an
/// unconnected-then-connected UDP socket sends nothing.
fn route_to(server: SocketAddr, listen_ip: IpAddr) -> IpAddr {
    if !listen_ip.is_unspecified() {
        return listen_ip;
    }
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| s.connect(server).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(server.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ConnId = ConnId(1);
    const B: ConnId = ConnId(2);

    #[test]
    fn a_receive_asked_for_while_the_writer_is_out_begins_when_it_returns() {
        let mut loans = Loans::default();
        assert!(loans.ask(A, 0), "the writer is home: begin now");
        loans.lent(0);
        assert!(!loans.ask(B, 100), "the writer is out: wait");
        assert!(!loans.ask(B, 200), "a later ask replaces the earlier");
        assert_eq!(loans.back(200), Returned::Keep { received: 200 });
        assert_eq!(loans.take_pending(), Some((B, 200)));
        assert_eq!(loans.take_pending(), None);
        assert!(loans.ask(A, 200), "home again");
    }

    #[test]
    fn bytes_received_count_from_where_the_receive_began() {
        let mut loans = Loans::default();
        loans.lent(1000);
        assert_eq!(loans.back(5000), Returned::Keep { received: 4000 });
        loans.lent(5000);
        assert_eq!(loans.back(5000), Returned::Keep { received: 0 });
    }

    #[test]
    fn a_start_over_while_the_writer_is_out_discards_it_and_its_progress() {
        let mut loans = Loans::default();
        loans.lent(0);
        assert!(!loans.ask(B, 300));
        assert!(loans.counts_progress());
        loans.start_over();
        assert!(!loans.counts_progress(), "progress of the old image");
        assert_eq!(loans.back(300), Returned::Discard);
        assert_eq!(loans.take_pending(), None, "the machine asks again");
        assert!(loans.counts_progress());
        loans.lent(0);
        assert_eq!(loans.back(10), Returned::Keep { received: 10 });
    }

    #[test]
    fn a_start_over_with_the_writer_home_discards_no_later_loan() {
        let mut loans = Loans::default();
        loans.start_over();
        loans.lent(0);
        assert!(loans.counts_progress());
        assert_eq!(loans.back(7), Returned::Keep { received: 7 });
    }

    fn durable(dir: &Path) -> Durable {
        Durable::new(
            dir.join("node.state"),
            dir.join("target"),
            "s".into(),
            "n1".into(),
        )
    }

    #[test]
    fn the_durable_prefix_is_recorded_per_step_or_per_second_and_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let d = durable(dir.path());
        let t0 = d.recorded_at;
        assert!(!d.record_due(RECORD_STEP - 1, false, t0 + RECORD_MIN_GAP));
        assert!(!d.record_due(RECORD_STEP, false, t0), "a step, too soon");
        assert!(d.record_due(RECORD_STEP, false, t0 + RECORD_MIN_GAP));
        assert!(
            d.record_due(1, false, t0 + RECORD_EVERY),
            "a byte, a second on"
        );
        assert!(d.record_due(1, true, t0), "the synced end, at once");
    }

    #[test]
    fn nothing_is_recorded_while_a_record_is_under_way_or_behind_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = durable(dir.path());
        let (tx, _rx) = mpsc::unbounded_channel();
        let t0 = d.recorded_at;
        d.in_flight = true;
        assert!(!d.record_due(RECORD_STEP, true, t0 + RECORD_EVERY));
        d.recorded(d.gen, Ok(100), &tx);
        assert!(!d.in_flight);
        assert!(!d.record_due(100, true, t0 + RECORD_EVERY));
        assert!(d.record_due(101, true, t0 + RECORD_EVERY));
    }

    #[test]
    fn a_record_made_before_a_start_over_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = durable(dir.path());
        let (tx, _rx) = mpsc::unbounded_channel();
        std::fs::write(&d.path, "old").unwrap();
        d.in_flight = true;
        let old = d.gen;
        d.forget();
        assert!(!d.path.exists(), "the old state is gone");
        d.recorded(old, Ok(500), &tx);
        assert_eq!(d.recorded, 0);
        assert!(!d.in_flight);
        d.recorded(d.gen, Ok(500), &tx);
        assert_eq!(d.recorded, 500);
        d.recorded(d.gen, Ok(200), &tx);
        assert_eq!(d.recorded, 500, "a late, shorter record never goes back");
        d.recorded(d.gen, Err("disk full".into()), &tx);
        assert_eq!(d.recorded, 500);
    }
}
