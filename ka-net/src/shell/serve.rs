//! The source's driver: runs [`ka_core::source::Source`] over a listener and
//! serves the image to the nodes it feeds.

use std::collections::{HashMap, HashSet};
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
use super::resume::{self, RecordedOutcome, SavedSession};
use super::wire::MessageCodec;
use super::{nonce, Clock};
use crate::image::digest::SessionKey;
use crate::image::sources::{open_source, SourceSpec};
use crate::Error;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A regular file or a block device, served directly.
    File(PathBuf),
    /// A stream (command output, tar of a directory, stdin), copied into the
    /// `spool` file as it is read and served from there ([`super::spool`]).
    Stream {
        /// The stream.
        spec: SourceSpec,
        /// The spool file to create.
        spool: PathBuf,
    },
}

/// What the source serves and how.
pub struct SourceOptions {
    /// The protocol settings (session, node count, timeouts, policies).
    pub config: SourceConfig,
    /// The image.
    pub image: ImageInput,
    /// The session key.
    pub key: SessionKey,
    /// Where the record of decided outcomes is kept, so a source restarted
    /// on the same image still accounts for every node ([`super::resume`]);
    /// `None`: keep none.
    pub state_dir: Option<PathBuf>,
    /// A cap on the source's total send rate in bytes per second, shared
    /// among the connections it serves (udpcast's `--max-bitrate`).
    pub max_rate: Option<u64>,
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
    /// How many nodes the session waited for.
    pub expected: u32,
}

/// The record of decided outcomes, as the state file holds it.
fn outcomes_text(source: &Source) -> String {
    SavedSession {
        session: source.config().session.clone(),
        image: source.config().image_id,
        outcomes: source
            .report()
            .into_iter()
            .filter_map(|r| {
                r.outcome.map(|outcome| RecordedOutcome {
                    name: r.name,
                    mac: r.mac,
                    outcome,
                })
            })
            .collect(),
    }
    .to_text()
}

/// How often the display is refreshed between events.
const REFRESH: Duration = Duration::from_millis(200);

/// Runs a session on `listener` until it finishes or aborts. `go` starts it
/// early with the nodes present (the original `-g`); `display` sees every
/// event with the machine (`Some`), and the machine alone every
/// `REFRESH` or so (`None`), for live progress.
pub async fn run_source(
    mut opts: SourceOptions,
    listener: TcpListener,
    mut go: mpsc::UnboundedReceiver<()>,
    mut display: impl FnMut(&Source, Option<&SourceEvent>),
) -> Result<SourceReport, Error> {
    let clock = Clock::start();
    let key = opts.key.clone();
    let (digest_tx, mut digest_rx) = mpsc::unbounded_channel::<Result<(u64, Digest), Error>>();
    // What servers read from, and how far it is written.
    let (path, image_written, image_watch, mut size, image_id) = match &opts.image {
        ImageInput::File(path) => {
            let size = open_source(&SourceSpec::File(path.clone()))?
                .size()
                .ok_or_else(|| {
                    Error::Invalid(format!("{}: the image size is unknown", path.display()))
                })?;
            let (tx, rx) = watch::channel(Written {
                upto: size,
                size: Some(size),
            });
            // The digest comes from a pass of its own, started now: it runs
            // while the nodes join (usually long enough to finish), and beside
            // the stream otherwise, so no data connection ever waits for
            // hashing; on separate machines the source's spare core does it.
            let (path2, key2, done) = (path.clone(), key.clone(), digest_tx.clone());
            tokio::task::spawn_blocking(move || {
                let r = crate::image::digest::digest_file(&path2, &key2);
                let _ = done.send(r.map(|d| (size, d)));
            });
            (
                path.clone(),
                tx,
                rx,
                Some(size),
                resume::image_identity(path)?,
            )
        }
        ImageInput::Stream { spec, spool } => {
            let stream = open_source(spec)?;
            let (tx, rx) = watch::channel(Written::default());
            let (tx2, key2, spool2, done) =
                (tx.clone(), key.clone(), spool.clone(), digest_tx.clone());
            tokio::task::spawn_blocking(move || {
                let r = super::spool::spool_source(stream, &spool2, &key2, &tx2);
                let _ = done.send(r);
            });
            (spool.clone(), tx, rx, None, resume::random_identity())
        }
    };
    opts.config.image_size = size;
    opts.config.image_id = image_id;
    let expected = opts.config.expected_nodes;
    // A file is re-read, a stream is re-read from its spool: any offset can
    // be served again.
    opts.config.seekable = true;
    opts.config.data_addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listen address", e))?;
    let session = opts.config.session.clone();
    let mut source = Source::new(clock.now(), opts.config, Box::new(key.clone()));
    // A file is all there from the start; a stream's spool is followed below.
    if let Some(size) = size {
        source.handle_image_progress(clock.now(), size);
    }
    let mut image_progress = image_watch.clone();
    let state_path = match &opts.state_dir {
        Some(dir) => {
            resume::prepare_state_dir(dir)?;
            Some(SavedSession::path(dir, &session, &image_id))
        }
        None => None,
    };
    if let Some(p) = &state_path {
        match SavedSession::load(p) {
            Ok(Some(st))
                if st.session == session && st.image == image_id && !st.outcomes.is_empty() =>
            {
                tracing::info!(
                    outcomes = st.outcomes.len(),
                    "going on with the session of an earlier run on this image"
                );
                eprintln!(
                    "ka: going on with an interrupted session on this image: {} node outcome(s) restored from {} \
                     (remove it to start a fresh session)",
                    st.outcomes.len(),
                    p.display()
                );
                for o in st.outcomes {
                    source.handle_restored(clock.now(), o.name, o.mac, o.outcome);
                }
            }
            Ok(_) => {}
            Err(reason) => tracing::warn!(%reason, "ignoring an unreadable session record"),
        }
    }
    // The record is rewritten by one task, latest content first, off the driver.
    let (record_tx, mut record_rx) = watch::channel(outcomes_text(&source));
    let recorder = state_path.clone().map(|path| {
        tokio::spawn(async move {
            while record_rx.changed().await.is_ok() {
                let text = record_rx.borrow_and_update().clone();
                let path = path.clone();
                let r = tokio::task::spawn_blocking(move || SavedSession::save_text(&path, &text))
                    .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "could not record the session's outcomes");
                }
            }
        })
    });
    let (pace_tx, pace_rx) = watch::channel(opts.max_rate.unwrap_or(u64::MAX));
    let mut serving: HashSet<ConnId> = HashSet::new();
    let repace = |serving: &HashSet<ConnId>| {
        if let Some(rate) = opts.max_rate {
            pace_tx.send_replace((rate / serving.len().max(1) as u64).max(1));
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Command>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut next_conn = 0u64;
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
                    if let Some(tx) = conns.get(&conn) {
                        let job = ServeJob {
                            from,
                            path: path.clone(),
                            written: image_watch.clone(),
                            pace: opts.max_rate.map(|_| pace_rx.clone()),
                            direct: None,
                        };
                        if tx.send(Command::Serve(Box::new(job))).is_ok() {
                            serving.insert(conn);
                            repace(&serving);
                        }
                    }
                }
                SourceAction::Close { conn } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.send(Command::Close);
                    }
                    if serving.remove(&conn) {
                        repace(&serving);
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
        let mut outcomes_changed = false;
        while let Some(ev) = source.poll_event() {
            display(&source, Some(&ev));
            match ev {
                SourceEvent::Finished { .. } => done = Some(None),
                SourceEvent::Aborted { reason } => done = Some(Some(reason)),
                SourceEvent::Verified { .. }
                | SourceEvent::Dead { .. }
                | SourceEvent::Failed { .. }
                | SourceEvent::Slow { .. }
                | SourceEvent::Joined { .. } => outcomes_changed = true,
                _ => {}
            }
        }
        if outcomes_changed && state_path.is_some() {
            let text = outcomes_text(&source);
            record_tx.send_if_modified(|old| {
                let changed = *old != text;
                if changed {
                    *old = text;
                }
                changed
            });
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
                    Event::Served { conn, result } => {
                        if serving.remove(&conn) {
                            repace(&serving);
                        }
                        if let Err(e) = result {
                            tracing::info!(conn = %conn, error = %e, "serving a node stopped");
                        }
                    }
                    Event::Progress(_) | Event::Received { .. } => {}
                }
            }
            Some(result) = digest_rx.recv() => match result {
                Ok((total, d)) => {
                    size = Some(total);
                    source.handle_image_done(clock.now(), total, d);
                }
                Err(e) => source.handle_image_failed(clock.now(), e.to_string()),
            },
            Some(()) = go.recv(), if go_open => source.handle_go(clock.now()),
            Ok(()) = image_progress.changed() => {
                let upto = image_progress.borrow_and_update().upto;
                source.handle_image_progress(clock.now(), upto);
            }
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
    drop(image_written);
    // The session is over: its record has nothing left to resume.
    drop(record_tx);
    if let Some(task) = recorder {
        let _ = task.await;
    }
    if let Some(p) = &state_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(SourceReport {
        nodes: source.report(),
        size: size.unwrap_or_default(),
        streaming,
        aborted,
        expected,
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
