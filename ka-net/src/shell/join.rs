//! The node's driver: runs [`ka_core::node::Node`], receives the image into
//! its target and serves its downstreams from what it has written.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ka_core::codec::{Digest, Progress};
use ka_core::config::NodeConfig;
use ka_core::ids::ConnId;
use ka_core::node::{Node, NodeAction, NodeEvent, Resume};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::conn::{self, Command, Event, ReceiveJob, ServeJob, Written};
use super::resume::{self, NodeState};
use super::{nonce, Clock};
use crate::datapath::forward::Downstreams;
use crate::datapath::rehash_written;
use crate::datapath::NodeWriter;
use crate::image::digest::{digest_source, ImageHasher, SessionKey};
use crate::image::sinks::{open_sink, SinkSpec};
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
    /// The session key.
    pub key: SessionKey,
    /// Where to listen for downstreams (the port is chosen by the system).
    pub listen_ip: IpAddr,
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
}

impl Target {
    /// The file the image is received into and served from.
    pub fn file(&self) -> &std::path::Path {
        match self {
            Target::File(p) => p,
            Target::Stream { spool, .. } => spool,
        }
    }
}

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
    Fed {
        result: Result<(), String>,
        size: u64,
        digest: Digest,
    },
    /// A durable prefix was recorded (or could not be), for state generation `gen`.
    Recorded {
        gen: u64,
        result: Result<u64, String>,
    },
    /// A broadcast for the source found it here (or nowhere).
    Discovered(Option<SocketAddr>),
}

/// How often, at most, the durable prefix is recorded, and how stale it may
/// get: a record costs an `fdatasync` of the target and a small atomic write.
const RECORD_MIN_GAP: Duration = Duration::from_millis(250);
use ka_core::config::{RECORD_EVERY, RECORD_STEP};

/// The node's resume state: where it is kept and how far it is recorded.
struct Durable {
    path: PathBuf,
    target: PathBuf,
    session: String,
    name: String,
    /// Bumped when the copy starts over: records made before are stale.
    gen: u64,
    recorded: u64,
    recorded_at: std::time::Instant,
    in_flight: bool,
    /// The latest record's task: awaited before the state is removed, so a
    /// late write cannot bring it back.
    last: Option<tokio::task::JoinHandle<()>>,
}

impl Durable {
    /// Records `offset` as durable (after syncing the target, unless `synced`)
    /// if it is time to, on a blocking thread that reports back.
    fn maybe_record(
        &mut self,
        node: &Node,
        offset: u64,
        synced: bool,
        tx: &mpsc::UnboundedSender<Internal>,
    ) {
        let due = synced
            || (offset >= self.recorded + RECORD_STEP
                && self.recorded_at.elapsed() >= RECORD_MIN_GAP)
            || self.recorded_at.elapsed() >= RECORD_EVERY;
        let Some(image) = node.image_id() else {
            return;
        };
        if self.in_flight || offset <= self.recorded || !due {
            return;
        }
        self.in_flight = true;
        self.recorded_at = std::time::Instant::now();
        let state = NodeState {
            session: self.session.clone(),
            name: self.name.clone(),
            target: self.target.clone(),
            image,
            size: node.image_size(),
            durable: offset,
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

    /// The copy starts over: what was recorded no longer holds. (A record
    /// still in flight names the old image, which no source will resume.)
    fn forget(&mut self) {
        self.gen += 1;
        self.recorded = 0;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a restart found on disk, ready to go on from.
struct Resumed {
    writer: NodeWriter,
    resume: Resume,
    /// The digest of the whole image, when the prefix is all of it.
    complete: Option<(u64, Digest)>,
}

/// Checks the state against the target and rebuilds the running digest by
/// reading the durable prefix back. Blocking.
fn reopen(state: NodeState, target: &Path, key: &SessionKey) -> Result<Option<Resumed>, String> {
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
    if meta.is_file() && meta.len() < state.durable {
        return Err(format!(
            "{} is shorter than the recorded prefix of {} bytes",
            target.display(),
            state.durable
        ));
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
        writer,
        resume: Resume {
            image: state.image,
            have: state.durable,
        },
        complete,
    }))
}

/// Joins the session at `opts.server` and runs until released, refused or
/// failed. `on_event` sees every event, for the console.
pub async fn run_node(
    mut opts: NodeOptions,
    mut on_event: impl FnMut(&Node, &NodeEvent),
) -> Result<NodeOutcome, Error> {
    let clock = Clock::start();
    let listener = TcpListener::bind(SocketAddr::new(opts.listen_ip, 0))
        .await
        .map_err(|e| Error::io("listening for downstream nodes", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listen address", e))?
        .port();
    opts.config.data_addr = SocketAddr::new(route_to(opts.server, opts.listen_ip), port);
    opts.config.source_wait = opts.wait;
    let session = opts.config.session.clone();
    let key = opts.key.clone();
    let mut durable = match (&opts.state_dir, &opts.target) {
        (Some(dir), Target::File(target)) => {
            resume::prepare_state_dir(dir)?;
            Some(Durable {
                path: NodeState::path(dir, &opts.config.session, &opts.config.name),
                target: target.clone(),
                session: opts.config.session.clone(),
                name: opts.config.name.clone(),
                gen: 0,
                recorded: 0,
                recorded_at: std::time::Instant::now(),
                in_flight: false,
                last: None,
            })
        }
        (Some(_), Target::Stream { .. }) => {
            tracing::info!(
                "a --command or --untar target does not resume after a restart: a restarted node starts over"
            );
            None
        }
        (None, _) => None,
    };
    let mut resumed = None;
    if let Some(d) = &mut durable {
        match NodeState::load(&d.path) {
            Ok(None) => {}
            Err(reason) => tracing::warn!(%reason, "not resuming: the copy starts over"),
            Ok(Some(state)) => {
                let (target, key) = (d.target.clone(), key.clone());
                let opened = tokio::task::spawn_blocking(move || reopen(state, &target, &key))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match opened {
                    Ok(r) => resumed = r,
                    Err(reason) => tracing::warn!(%reason, "not resuming: the copy starts over"),
                }
            }
        }
    }
    let mut writer: Option<NodeWriter> = None;
    let mut start = Written::default();
    let mut resume = None;
    let mut complete = None;
    if let Some(r) = resumed {
        tracing::info!(
            from = r.resume.have,
            "resuming the copy from its durable prefix (read back to rebuild its digest)"
        );
        start.upto = r.resume.have;
        start.size = r.complete.map(|(size, _)| size);
        writer = Some(r.writer);
        resume = Some(r.resume);
        complete = r.complete;
        if let Some(d) = &mut durable {
            d.recorded = r.resume.have;
        }
    }
    let mut node = Node::new(clock.now(), opts.config, Box::new(key.clone()), resume);
    if let Some((size, digest)) = complete {
        node.handle_stream_end(clock.now(), size, digest);
    }
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (internal_tx, mut internal) = mpsc::unbounded_channel::<Internal>();
    let (written_tx, written_rx) = watch::channel(start);
    // Downstreams that keep up are fed by the receiving thread itself.
    let direct = Arc::new(Downstreams::default());
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Command>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut next_conn = 0u64;
    // The writer is lent to one receive job at a time; a receive asked for
    // while it is still out waits for it, and a start over discards it.
    let mut lent = false;
    let mut pending_receive: Option<(ConnId, u64)> = None;
    let mut discard_lent = false;
    let mut receiving_from = 0u64;
    let mut received_bytes = 0u64;
    let mut resumed_from = 0u64;
    let mut discovering = false;
    // Only the latest attempt to reach an upstream counts: the topology may
    // have moved on while an older one was connecting.
    let mut upstream_attempt: Option<ConnId> = None;
    let outcome = 'session: loop {
        send_transmits(&mut node, &conns);
        while let Some(ev) = node.poll_event() {
            if let NodeEvent::Welcomed {
                resumed_from: r, ..
            } = &ev
            {
                resumed_from = *r;
            }
            on_event(&node, &ev);
        }
        while let Some(action) = node.poll_action() {
            // An action handler may feed the machine (a sink that fails to
            // open): whatever it transmits goes out before a close or exit.
            send_transmits(&mut node, &conns);
            match action {
                NodeAction::ConnectSource => {
                    connect(next_id(&mut next_conn), opts.server, true, &internal_tx)
                }
                NodeAction::ConnectUpstream { addr, .. } => {
                    // The source's data port is the address we reached it at.
                    let addr = if node.upstream().is_some_and(|u| u.node.is_none()) {
                        opts.server
                    } else {
                        addr
                    };
                    let id = next_id(&mut next_conn);
                    upstream_attempt = Some(id);
                    connect(id, addr, false, &internal_tx);
                }
                NodeAction::Receive { conn, from } => {
                    if lent {
                        pending_receive = Some((conn, from));
                        continue;
                    }
                    match begin_receive(
                        conn,
                        from,
                        &mut writer,
                        &opts.target,
                        node.image_size(),
                        &key,
                        &conns,
                        &written_tx,
                        &direct,
                    ) {
                        Ok(true) => {
                            lent = true;
                            receiving_from = from;
                        }
                        Ok(false) => {}
                        Err(refused) => {
                            refused_receive(&mut node, clock.now(), conn, refused, &mut conns)
                        }
                    }
                }
                NodeAction::Serve {
                    conn,
                    node: _,
                    from,
                } => {
                    if let Some(tx) = conns.get(&conn) {
                        let job = ServeJob {
                            from,
                            path: opts.target.file().to_path_buf(),
                            written: written_rx.clone(),
                            pace: None,
                            direct: Some(Arc::clone(&direct)),
                        };
                        let _ = tx.send(Command::Serve(Box::new(job)));
                    }
                }
                NodeAction::Close { conn } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.send(Command::Close);
                    }
                }
                NodeAction::StartOver => {
                    tracing::warn!(
                        "the source serves another image than the one this copy was made of: starting over from 0"
                    );
                    if let Some(w) = writer.take() {
                        tokio::spawn(w.into_parts());
                    }
                    discard_lent = lent;
                    pending_receive = None;
                    written_tx.send_replace(Written::default());
                    if let Some(d) = &mut durable {
                        d.forget();
                    }
                }
                NodeAction::ReadBack => {
                    let Some(w) = writer.take() else {
                        node.handle_sink_error(
                            clock.now(),
                            "read-back requested while the target is busy".into(),
                        );
                        continue;
                    };
                    // Only the digest of what reads back is computed here; the
                    // machine compares it with the source's.
                    let (key, tx) = (key.clone(), internal_tx.clone());
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
                NodeAction::Exit { ok, mut reason } => {
                    if reason.starts_with("no source answered") {
                        reason =
                            format!("{reason} at {}: is `ka serve` running there?", opts.server);
                    }
                    tracing::info!(stats = ?direct.stats(), "forwarded straight from the receiving thread");
                    break 'session NodeOutcome {
                        ok,
                        reason,
                        written: written_rx.borrow().upto,
                        resumed_from,
                        received: received_bytes,
                    };
                }
            }
        }
        let deadline = node.poll_timeout().map(|(t, _)| clock.instant(t));
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let id = next_id(&mut next_conn);
                    let (tx, handle) = conn::spawn(id, stream, events_tx.clone());
                    conns.insert(id, tx);
                    tasks.push(handle);
                    node.handle_connected(clock.now(), id, nonce());
                }
            }
            Some(msg) = internal.recv() => {
                let now = clock.now();
                match msg {
                    Internal::Connected { conn, .. } | Internal::ConnectFailed { conn, .. }
                        if !is_source_attempt(&msg) && upstream_attempt != Some(conn) => {}
                    Internal::Connected { conn, stream, to_source } => {
                        let (tx, handle) = conn::spawn(conn, stream, events_tx.clone());
                        conns.insert(conn, tx);
                        tasks.push(handle);
                        if to_source {
                            node.handle_source_connected(now, conn);
                        } else {
                            node.handle_upstream_connected(now, conn);
                        }
                    }
                    Internal::ConnectFailed { to_source, reason, .. } => {
                        if to_source && !discovering {
                            if let Some(to) = opts.rediscover {
                                // The source may have come back elsewhere.
                                discovering = true;
                                let (session, tx) = (session.clone(), internal_tx.clone());
                                tokio::spawn(async move {
                                    let found = super::discovery::find(&session, to, Duration::from_secs(1)).await.ok();
                                    let _ = tx.send(Internal::Discovered(found));
                                });
                            }
                        }
                        node.handle_connect_failed(now, to_source, reason)
                    }
                    Internal::Discovered(found) => {
                        discovering = false;
                        if let Some(addr) = found.filter(|a| *a != opts.server) {
                            tracing::info!(%addr, "found the source again by broadcast");
                            opts.server = addr;
                        }
                    }
                    Internal::Recorded { gen, result } => {
                        if let Some(d) = durable.as_mut().filter(|d| d.gen == gen) {
                            d.in_flight = false;
                            match result {
                                Ok(at) => d.recorded = d.recorded.max(at),
                                Err(e) => tracing::warn!(error = %e, "could not record the durable prefix"),
                            }
                        } else if let Some(d) = &mut durable {
                            d.in_flight = false;
                        }
                    }
                    Internal::ReadBack(Ok(d)) => node.handle_readback(now, d),
                    Internal::Fed { result: Ok(()), size, digest } => node.handle_stream_end(now, size, digest),
                    Internal::Fed { result: Err(e), .. } => node.handle_sink_error(now, e),
                    Internal::ReadBack(Err(e)) => node.handle_sink_error(now, format!("reading the target back: {e}")),
                }
            }
            Some(event) = events.recv() => {
                let now = clock.now();
                match event {
                    Event::Frame(c, m) => node.handle_message(now, c, m),
                    Event::Closed(c, why) => {
                        tracing::debug!(conn = %c, %why, "connection closed");
                        conns.remove(&c);
                        node.handle_closed(now, c);
                    }
                    Event::Progress(offset) => {
                        if !discard_lent {
                            node.handle_progress(now, Progress { received: offset, written: offset, holds_from: 0 });
                            if let Some(d) = &mut durable {
                                d.maybe_record(&node, offset, false, &internal_tx);
                            }
                        }
                    }
                    Event::Received { conn, writer: w, result } => {
                        lent = false;
                        conns.remove(&conn);
                        if std::mem::take(&mut discard_lent) {
                            // Of an image the copy no longer follows.
                            tokio::spawn(w.into_parts());
                        } else {
                            // Say exactly where the target stands before anything
                            // else: a resume asks for this offset.
                            let at = w.position();
                            received_bytes += at.saturating_sub(receiving_from);
                            node.handle_progress(now, Progress { received: at, written: w.position(), holds_from: 0 });
                            writer = Some(*w);
                            match result {
                                Ok(end) => match &opts.target {
                                    Target::File(_) => {
                                        // The sink's finish flushed it all: durable as it stands.
                                        if let Some(d) = &mut durable {
                                            d.in_flight = false;
                                            d.maybe_record(&node, end.size, true, &internal_tx);
                                        }
                                        node.handle_stream_end(now, end.size, end.digest)
                                    }
                                    Target::Stream { spec, spool } => {
                                        // The sink gets the image only once all of it is here.
                                        let (spec, spool, tx) = (spec.clone(), spool.clone(), internal_tx.clone());
                                        let digest = end.digest;
                                        tokio::task::spawn_blocking(move || {
                                            let result = super::spool::feed_sink(&spool, end.size, &spec).map_err(|e| e.to_string());
                                            let _ = tx.send(Internal::Fed { result, size: end.size, digest });
                                        });
                                    }
                                },
                                Err(e) if is_upstream_fault(&e) => {
                                    tracing::info!(error = %e, "upstream stream stopped");
                                    node.handle_closed(now, conn);
                                }
                                Err(e) => node.handle_sink_error(now, e.to_string()),
                            }
                        }
                        if let Some((conn, from)) = pending_receive.take() {
                            match begin_receive(conn, from, &mut writer, &opts.target, node.image_size(), &key, &conns, &written_tx, &direct) {
                                Ok(true) => {
                                    lent = true;
                                    receiving_from = from;
                                }
                                Ok(false) => {}
                                Err(refused) => refused_receive(&mut node, now, conn, refused, &mut conns),
                            }
                        }
                    }
                    Event::Served { conn, result } => {
                        if let Err(e) = result {
                            tracing::info!(conn = %conn, error = %e, "serving a downstream stopped");
                        }
                    }
                }
            }
            _ = sleep_until(deadline) => node.handle_timeout(clock.now()),
        }
    };
    drop(conns);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
    }
    let verdict_given = node.verdict().is_some();
    let image = node.image_id();
    let size = node.image_size();
    if let Some(w) = writer {
        let parts = w.into_parts().await;
        // Leaving without a verdict (the source never came back, the session
        // was aborted): record what is on disk, so a restart goes on from it.
        if let (Some(d), Ok((sink, _)), Some(image), false) =
            (&durable, parts, image, verdict_given)
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
    Ok(outcome)
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

/// Drops a data connection whose receive could not begin: a stale offset is
/// asked again (as if the connection had closed), a sink failure fails us.
fn refused_receive(
    node: &mut Node,
    now: ka_core::time::Time,
    conn: ConnId,
    refused: RefusedReceive,
    conns: &mut HashMap<ConnId, mpsc::UnboundedSender<Command>>,
) {
    match refused {
        RefusedReceive::Behind => {
            if let Some(tx) = conns.remove(&conn) {
                let _ = tx.send(Command::Close);
            }
            node.handle_closed(now, conn);
        }
        RefusedReceive::Sink(reason) => node.handle_sink_error(now, reason),
    }
}

/// Lends the writer (opening it on the first receive) to the receive job on
/// `conn`, which must start where the target stands. `Ok(false)`: the
/// connection is already gone.
#[allow(clippy::too_many_arguments)]
fn begin_receive(
    conn: ConnId,
    from: u64,
    writer: &mut Option<NodeWriter>,
    target: &Target,
    size: Option<u64>,
    key: &SessionKey,
    conns: &HashMap<ConnId, mpsc::UnboundedSender<Command>>,
    written: &watch::Sender<Written>,
    direct: &Arc<Downstreams>,
) -> Result<bool, RefusedReceive> {
    let w = match writer.take() {
        Some(w) => w,
        None => open_writer(target.file(), size, key)
            .map_err(|e| RefusedReceive::Sink(e.to_string()))?,
    };
    if w.position() != from {
        let at = w.position();
        *writer = Some(w);
        return Err(if from < at {
            RefusedReceive::Behind
        } else {
            RefusedReceive::Sink(format!(
                "upstream offered offset {from}, the target is at {at}"
            ))
        });
    }
    let Some(tx) = conns.get(&conn) else {
        *writer = Some(w);
        return Ok(false);
    };
    let job = ReceiveJob {
        writer: w,
        written: written.clone(),
        direct: Arc::clone(direct),
    };
    if let Err(mpsc::error::SendError(Command::Receive(job))) =
        tx.send(Command::Receive(Box::new(job)))
    {
        *writer = Some(job.writer);
        return Ok(false);
    }
    Ok(true)
}

/// Hands the frames the machine wants sent to their connections' tasks.
fn send_transmits(node: &mut Node, conns: &HashMap<ConnId, mpsc::UnboundedSender<Command>>) {
    while let Some((c, m)) = node.poll_transmit() {
        if let Some(tx) = conns.get(&c) {
            let _ = tx.send(Command::Send(m));
        }
    }
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

fn next_id(counter: &mut u64) -> ConnId {
    *counter += 1;
    ConnId(*counter)
}

fn open_writer(
    target: &std::path::Path,
    size: Option<u64>,
    key: &SessionKey,
) -> Result<NodeWriter, Error> {
    let sink = open_sink(&SinkSpec::File(target.to_path_buf()), size)?;
    if size.is_none() {
        // Served to downstreams while its size is unknown: see reach_ahead.
        super::spool::reach_ahead(target)?;
    }
    NodeWriter::new(sink, ImageHasher::new(key))
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
