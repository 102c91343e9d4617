//! The source's driver: runs [`ka_core::source::Source`] over a listener and
//! serves the image to the nodes it feeds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ka_core::codec::{Digest, Message};
use ka_core::config::SourceConfig;
use ka_core::ids::ConnId;
use ka_core::source::{NodeReport, Source, SourceAction, SourceEvent};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use super::conn::{self, Command, Event, ServeJob, Written};
use super::wire::MessageCodec;
use super::{nonce, Clock};
use crate::digest::{digest_source, ImageHasher, SessionKey};
use crate::source::{open_source, SourceSpec};
use crate::Error;

/// What the source serves and how.
pub struct SourceOptions {
    /// The protocol settings (session, node count, timeouts, policies).
    pub config: SourceConfig,
    /// The image: a regular file or a block device.
    pub image: PathBuf,
    /// The session key.
    pub key: SessionKey,
}

/// The end of a session, for the final report.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// One line per node that ever joined.
    pub nodes: Vec<NodeReport>,
    /// The image's size.
    pub size: u64,
    /// From the start of the stream to the end of the session.
    pub streaming: Duration,
    /// Why the session was aborted, if it was.
    pub aborted: Option<String>,
}

/// How often the display is refreshed between events.
const REFRESH: Duration = Duration::from_millis(200);

/// Runs a session on `listener` until it finishes or aborts. `go` starts it
/// early with the nodes present (the original `-g`); `display` sees every
/// event with the machine (`Some`), and the machine alone every
/// [`REFRESH`] or so (`None`), for live progress.
pub async fn run_source(
    mut opts: SourceOptions,
    listener: TcpListener,
    mut go: mpsc::UnboundedReceiver<()>,
    mut display: impl FnMut(&Source, Option<&SourceEvent>),
) -> Result<SourceReport, Error> {
    let clock = Clock::start();
    let size = open_source(&SourceSpec::File(opts.image.clone()))?
        .size()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the image size is unknown",
                opts.image.display()
            ))
        })?;
    opts.config.image_size = Some(size);
    opts.config.seekable = true;
    opts.config.data_addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listen address", e))?;
    let key = opts.key.clone();
    let mut source = Source::new(clock.now(), opts.config, Box::new(key.clone()));
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (_image_written, image_watch) = watch::channel(Written {
        upto: size,
        size: Some(size),
    });
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Command>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut next_conn = 0u64;
    let mut digest: Option<Digest> = None;
    let mut hashing: Option<ConnId> = None;
    let (digest_tx, mut digest_rx) = mpsc::unbounded_channel::<Result<Digest, Error>>();
    let mut started_at = None;
    let mut go_open = true;
    let mut refreshed = clock.now();
    let aborted = loop {
        while let Some((c, m)) = source.poll_transmit() {
            if let Some(tx) = conns.get(&c) {
                let _ = tx.send(Command::Send(m));
            }
        }
        while let Some(action) = source.poll_action() {
            match action {
                SourceAction::StartReading => started_at = Some(clock.now()),
                SourceAction::Serve {
                    conn,
                    node: _,
                    from,
                } => {
                    // The first full pass from offset 0 also computes the digest.
                    let hasher = (from == 0 && digest.is_none() && hashing.is_none()).then(|| {
                        hashing = Some(conn);
                        ImageHasher::new(&key)
                    });
                    if let Some(tx) = conns.get(&conn) {
                        let job = ServeJob {
                            from,
                            path: opts.image.clone(),
                            written: image_watch.clone(),
                            hasher,
                        };
                        let _ = tx.send(Command::Serve(Box::new(job)));
                    }
                }
                SourceAction::Close { conn } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.send(Command::Close);
                    }
                }
                SourceAction::TrimHistory { .. } => {}
            }
        }
        let mut done = None;
        if clock.now().saturating_since(refreshed) >= REFRESH {
            refreshed = clock.now();
            display(&source, None);
        }
        while let Some(ev) = source.poll_event() {
            display(&source, Some(&ev));
            match ev {
                SourceEvent::Finished { .. } => done = Some(None),
                SourceEvent::Aborted { reason } => done = Some(Some(reason)),
                _ => {}
            }
        }
        if let Some(aborted) = done {
            break aborted;
        }
        let deadline = source.poll_timeout().map(|(t, _)| clock.instant(t));
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| Error::io("accepting a connection", e))?;
                let id = ConnId(next_conn);
                next_conn += 1;
                let (tx, handle) = conn::spawn(id, stream, events_tx.clone());
                conns.insert(id, tx);
                tasks.push(handle);
                source.handle_connected(clock.now(), id, nonce());
            }
            Some(event) = events.recv() => {
                let now = clock.now();
                match event {
                    Event::Frame(c, m) => source.handle_message(now, c, m),
                    Event::Closed(c, why) => {
                        tracing::debug!(conn = %c, %why, "connection closed");
                        conns.remove(&c);
                        source.handle_closed(now, c);
                    }
                    Event::Served { conn, result } => match result {
                        Ok(Some(d)) => {
                            digest = Some(Digest(d.0));
                            source.handle_image_done(now, size, Digest(d.0));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::info!(conn = %conn, error = %e, "serving a node stopped");
                            if hashing == Some(conn) && digest.is_none() {
                                // The hashing pass died with its node: hash on our own.
                                let (path, key, tx) = (opts.image.clone(), key.clone(), digest_tx.clone());
                                tokio::task::spawn_blocking(move || {
                                    let r = open_source(&SourceSpec::File(path)).and_then(|mut s| {
                                        let mut buf = vec![0u8; crate::relay::BUF_SIZE];
                                        digest_source(s.as_mut(), ImageHasher::new(&key), &mut buf)
                                    });
                                    let _ = tx.send(r.map(|d| Digest(d.0)));
                                });
                            }
                        }
                    },
                    Event::Progress(_) | Event::Received { .. } => {}
                }
            }
            Some(result) = digest_rx.recv() => match result {
                Ok(d) => {
                    digest = Some(d);
                    source.handle_image_done(clock.now(), size, d);
                }
                Err(e) => source.handle_image_failed(clock.now(), e.to_string()),
            },
            Some(()) = go.recv(), if go_open => source.handle_go(clock.now()),
            _ = sleep_until(deadline) => source.handle_timeout(clock.now()),
        }
        go_open = !go.is_closed();
    };
    // Let the last frames (releases, aborts) leave before the sockets close.
    drop(conns);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
    }
    let streaming = started_at.map_or(Duration::ZERO, |t| clock.now().saturating_since(t));
    Ok(SourceReport {
        nodes: source.report(),
        size,
        streaming,
        aborted,
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Tells the source at `server` to start now with the nodes present; returns
/// whether this started the stream and how many nodes it has.
pub async fn go(
    server: SocketAddr,
    session: &str,
    key: &SessionKey,
) -> Result<(bool, u32), String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(server))
        .await
        .map_err(|_| format!("no answer from {server} within 5 s"))?
        .map_err(|e| format!("cannot reach the source at {server}: {e}"))?;
    let mut framed = Framed::new(stream, MessageCodec);
    let Message::Challenge { nonce, .. } = next_frame(&mut framed).await? else {
        return Err(format!("{server} is not a ka source"));
    };
    let proof = ka_core::auth::go_proof(key, &nonce, session);
    framed
        .send(Message::Go {
            session: session.to_string(),
            proof,
        })
        .await
        .map_err(|e| format!("sending go: {e}"))?;
    match next_frame(&mut framed).await? {
        Message::GoAck { started, nodes } => Ok((started, nodes)),
        Message::Refused(r) => Err(format!("the source refused: {}", r.detail)),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

async fn next_frame(f: &mut Framed<TcpStream, MessageCodec>) -> Result<Message, String> {
    match tokio::time::timeout(Duration::from_secs(5), f.next()).await {
        Ok(Some(Ok(m))) => Ok(m),
        Ok(Some(Err(e))) => Err(format!("bad answer from the source: {e}")),
        Ok(None) => Err("the source closed the connection".to_string()),
        Err(_) => Err("the source did not answer within 5 s".to_string()),
    }
}
