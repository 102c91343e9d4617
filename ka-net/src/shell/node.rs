//! The node's driver: runs [`ka_core::node::Node`], receives the image into
//! its target and serves its downstreams from what it has written.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ka_core::codec::{Digest, Progress};
use ka_core::config::NodeConfig;
use ka_core::ids::ConnId;
use ka_core::node::{Node, NodeAction, NodeEvent};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::conn::{self, Command, Event, ReceiveJob, ServeJob, Written};
use super::{nonce, Clock};
use crate::digest::{digest_source, ImageHasher, SessionKey};
use crate::relay::NodeWriter;
use crate::sink::{open_sink, SinkSpec};
use crate::Error;

/// What a node joins and where it writes.
pub struct NodeOptions {
    /// The protocol settings (session, name, options). `data_addr` is filled
    /// in from the listener and the route to the source.
    pub config: NodeConfig,
    /// The source's address.
    pub server: SocketAddr,
    /// Where the image goes.
    pub target: Target,
    /// The session key.
    pub key: SessionKey,
    /// Where to listen for downstreams (the port is chosen by the system).
    pub listen_ip: IpAddr,
    /// How long to keep looking for the source before giving up: nodes often
    /// boot before the source is started.
    pub wait: Duration,
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
    let key = opts.key.clone();
    let mut node = Node::new(clock.now(), opts.config, Box::new(key.clone()), 0);
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (internal_tx, mut internal) = mpsc::unbounded_channel::<Internal>();
    let (written_tx, written_rx) = watch::channel(Written::default());
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Command>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut next_conn = 0u64;
    let mut writer: Option<NodeWriter> = None;
    // Only the latest attempt to reach an upstream counts: the topology may
    // have moved on while an older one was connecting.
    let mut upstream_attempt: Option<ConnId> = None;
    let outcome = 'session: loop {
        send_transmits(&mut node, &conns);
        while let Some(ev) = node.poll_event() {
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
                    let w = match writer.take() {
                        Some(w) => Ok(w),
                        None => open_writer(opts.target.file(), node.image_size(), &key),
                    };
                    match w {
                        Ok(w) if w.position() == from => {
                            if let Some(tx) = conns.get(&conn) {
                                let _ = tx.send(Command::Receive(Box::new(ReceiveJob {
                                    writer: w,
                                    written: written_tx.clone(),
                                })));
                            } else {
                                writer = Some(w);
                            }
                        }
                        Ok(w) => {
                            let reason = format!(
                                "upstream offered offset {from}, the target is at {}",
                                w.position()
                            );
                            writer = Some(w);
                            node.handle_sink_error(clock.now(), reason);
                        }
                        Err(e) => node.handle_sink_error(clock.now(), e.to_string()),
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
                        };
                        let _ = tx.send(Command::Serve(Box::new(job)));
                    }
                }
                NodeAction::Close { conn } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.send(Command::Close);
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
                                let mut buf = vec![0u8; crate::relay::BUF_SIZE];
                                sink.readback()
                                    .and_then(|mut rb| {
                                        digest_source(rb.as_mut(), ImageHasher::new(&key), &mut buf)
                                    })
                                    .map(|d| Digest(d.0))
                                    .map_err(|e| e.to_string())
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string())),
                        };
                        let _ = tx.send(Internal::ReadBack(result));
                    });
                }
                NodeAction::Exit { ok, reason } => {
                    break 'session NodeOutcome {
                        ok,
                        reason,
                        written: written_rx.borrow().upto,
                    };
                }
            }
        }
        if node.id().is_none()
            && clock.now().saturating_since(ka_core::time::Time::ZERO) > opts.wait
        {
            let reason = format!(
                "no source answered at {} within {:?}: is `ka serve` running there?",
                opts.server, opts.wait
            );
            break 'session NodeOutcome {
                ok: false,
                reason,
                written: 0,
            };
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
                    Internal::ConnectFailed { to_source, reason, .. } => node.handle_connect_failed(now, to_source, reason),
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
                        node.handle_progress(now, Progress { received: offset, written: offset, holds_from: 0 });
                    }
                    Event::Received { conn, writer: w, result } => {
                        // Say exactly where the target stands before anything
                        // else: a resume asks for this offset.
                        let at = w.position();
                        node.handle_progress(now, Progress { received: at, written: w.written(), holds_from: 0 });
                        writer = Some(*w);
                        conns.remove(&conn);
                        match result {
                            Ok(end) => match &opts.target {
                                Target::File(_) => node.handle_stream_end(now, end.size, Digest(end.digest.0)),
                                Target::Stream { spec, spool } => {
                                    // The sink gets the image only once all of it is here.
                                    let (spec, spool, tx) = (spec.clone(), spool.clone(), internal_tx.clone());
                                    let digest = Digest(end.digest.0);
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
    if let Some(w) = writer {
        let _ = w.into_parts().await;
    }
    Ok(outcome)
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
