//! The source's driver: runs [`ka_core::source::Source`] over a listener and
//! serves the image to the nodes it feeds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ka_core::auth::{Channel, Side};
use ka_core::codec::{Digest, ImageId, Message};
use ka_core::config::SourceConfig;
use ka_core::ids::ConnId;
use ka_core::source::{NodeReport, Source, SourceAction, SourceEvent};
use ka_core::time::Time;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use super::conn::{Command, Conns, Event, ServeJob, Written};
use super::key::SessionKey;
use super::resume::{self, RecordedOutcome, SavedSession};
use super::wire::MessageCodec;
use super::{nonce, Clock};
use crate::image::digest::digest_file;
use crate::image::sources::{open_source, SourceSpec};
use crate::Error;

/// Where the image comes from.
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
    /// A stream already opened, and how it encodes the image: a packed
    /// or decoded image file, a packed command output
    /// ([`crate::image::packed`]). Spooled like any stream.
    Encoded {
        /// The stream, how it encodes the image, and its packing's counters.
        stream: crate::image::packed::EncodedStream,
        /// The spool file to create.
        spool: PathBuf,
    },
    /// A running machine, file system by file system
    /// ([`crate::system::capture`]), spooled like any stream.
    System {
        /// What to read and send.
        capture: Box<crate::system::capture::Capture>,
        /// Where files that changed while read are reported.
        warnings: crate::system::capture::Warnings,
        /// The spool file to create (left out of the capture).
        spool: PathBuf,
    },
}

/// What the source serves and how.
pub struct SourceOptions {
    /// The protocol settings (session, node count, timeouts, policies).
    pub config: SourceConfig,
    /// The image.
    pub image: ImageInput,
    /// The session's root key ([`super::session_key`]): every node's key,
    /// and the digest's, derive from it.
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
    /// The packed stream's size, when the stream was packed.
    pub packed: Option<u64>,
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

/// How long a finished session still takes in its nodes' last lines.
const LAST_WORDS: Duration = Duration::from_millis(100);

/// How often the display is refreshed between events.
const REFRESH: Duration = Duration::from_millis(200);

/// Runs a session on `listener` until it finishes or aborts. `go` starts it
/// early with the nodes present (the original `-g`); `display` sees every
/// event with the machine (`Some`), and the machine alone every
/// `REFRESH` or so (`None`), for live progress.
pub async fn run_source(
    opts: SourceOptions,
    listener: TcpListener,
    go: mpsc::UnboundedReceiver<()>,
    mut display: impl FnMut(&Source, Option<&SourceEvent>),
) -> Result<SourceReport, Error> {
    let (mut driver, mut inputs) = SourceDriver::new(opts, &listener, go)?;
    let aborted = driver.run(&listener, &mut inputs, &mut display).await?;
    Ok(driver.finish(aborted).await)
}

/// A source's send-rate cap, shared evenly among the connections it serves.
struct Pacing {
    /// The cap in bytes per second; `None`: no cap.
    max_rate: Option<u64>,
    serving: HashSet<ConnId>,
    /// Each connection's share, for its serving task.
    share: watch::Sender<u64>,
    share_rx: watch::Receiver<u64>,
}

impl Pacing {
    fn new(max_rate: Option<u64>) -> Pacing {
        let (share, share_rx) = watch::channel(max_rate.unwrap_or(u64::MAX));
        Pacing {
            max_rate,
            serving: HashSet::new(),
            share,
            share_rx,
        }
    }

    /// What a serving task follows: its share of the cap, if there is one.
    fn receiver(&self) -> Option<watch::Receiver<u64>> {
        self.max_rate.map(|_| self.share_rx.clone())
    }

    /// `conn` is being served.
    fn started(&mut self, conn: ConnId) {
        self.serving.insert(conn);
        self.repace();
    }

    /// `conn` is served no more: the others share its part.
    fn stopped(&mut self, conn: ConnId) {
        if self.serving.remove(&conn) {
            self.repace();
        }
    }

    fn repace(&self) {
        if let Some(rate) = self.max_rate {
            self.share
                .send_replace((rate / self.serving.len().max(1) as u64).max(1));
        }
    }
}

/// The task that keeps the record of decided outcomes on disk, latest
/// content first, off the driver.
struct Recorder {
    path: PathBuf,
    text: watch::Sender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(path: PathBuf, text: String) -> Recorder {
        let (tx, mut rx) = watch::channel(text);
        let to = path.clone();
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let text = rx.borrow_and_update().clone();
                let path = to.clone();
                let r = tokio::task::spawn_blocking(move || SavedSession::save_text(&path, &text))
                    .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "could not record the session's outcomes");
                }
            }
        });
        Recorder {
            path,
            text: tx,
            task,
        }
    }

    /// Rewrites the record if `text` differs from the last.
    fn update(&self, text: String) {
        self.text.send_if_modified(|old| {
            let changed = *old != text;
            if changed {
                *old = text;
            }
            changed
        });
    }

    /// The session is over: its record has nothing left to resume.
    async fn remove(self) {
        drop(self.text);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `ev` changes what the record of outcomes holds.
fn changes_outcomes(ev: &SourceEvent) -> bool {
    matches!(
        ev,
        SourceEvent::Verified { .. }
            | SourceEvent::Dead { .. }
            | SourceEvent::Failed { .. }
            | SourceEvent::Slow { .. }
            | SourceEvent::Joined { .. }
    )
}

/// What wakes a source's driver besides its listener and its deadline.
struct Inputs {
    /// From the connections' tasks.
    events: mpsc::UnboundedReceiver<Event>,
    /// The image's size and digest, once its pass (or spool) ends.
    digest: mpsc::UnboundedReceiver<Result<(u64, Digest), Error>>,
    /// How far the image can be served (a stream's spool grows).
    image_progress: watch::Receiver<Written>,
    /// An operator's go.
    go: mpsc::UnboundedReceiver<()>,
    go_open: bool,
}

/// A source's driver: owns the [`Source`] machine and the shell's state
/// around it, feeds it every input and carries out its actions.
struct SourceDriver {
    source: Source,
    clock: Clock,
    /// The file servers read: the image, or a stream's spool.
    path: PathBuf,
    /// How far `path` is written; kept until the session ends.
    image_written: watch::Sender<Written>,
    image_watch: watch::Receiver<Written>,
    size: Option<u64>,
    expected: u32,
    pacing: Pacing,
    recorder: Option<Recorder>,
    conns: Conns,
    started_at: Option<Time>,
    refreshed: Time,
    /// A packed stream's counters.
    packing: Option<std::sync::Arc<crate::image::packed::PackStats>>,
    /// Connections refused beyond the refusal log's bound, whose
    /// [`SourceEvent::Refused`] the display does not see either.
    unshown_refusals: HashSet<ConnId>,
}

impl SourceDriver {
    /// Opens the image, starts its digest (a file's own pass, or a stream's
    /// spool) and restores the outcomes an earlier run on it recorded.
    fn new(
        mut opts: SourceOptions,
        listener: &TcpListener,
        go: mpsc::UnboundedReceiver<()>,
    ) -> Result<(Self, Inputs), Error> {
        let clock = Clock::start();
        let key = opts.key.digest_key();
        let (digest_tx, digest) = mpsc::unbounded_channel::<Result<(u64, Digest), Error>>();
        // What servers read from, and how far it is written.
        // A stream is read once, into a spool that servers follow.
        let spool_stream = |stream: Box<dyn crate::ImageSource>, spool: &PathBuf| {
            let (tx, rx) = watch::channel(Written::default());
            let (tx2, key2, spool2, done) =
                (tx.clone(), key.clone(), spool.clone(), digest_tx.clone());
            tokio::task::spawn_blocking(move || {
                let r = super::spool::spool_source(stream, &spool2, &key2, &tx2);
                let _ = done.send(r);
            });
            (spool.clone(), tx, rx, None, resume::random_identity())
        };
        let mut packing = None;
        let (path, image_written, image_watch, size, image_id) = match opts.image {
            ImageInput::File(ref path) => {
                let size = open_source(&SourceSpec::File(path.clone()))?
                    .size()
                    .ok_or_else(|| {
                        Error::Invalid(format!("{}: the image size is unknown", path.display()))
                    })?;
                let (tx, rx) = watch::channel(Written {
                    upto: size,
                    size: Some(size),
                });
                // The digest comes from a pass of its own, started now: it
                // runs while the nodes join (usually long enough to finish),
                // and beside the stream otherwise, so no data connection
                // ever waits for hashing; on separate machines the source's
                // spare core does it.
                let (path2, key2, done) = (path.clone(), key.clone(), digest_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let r = digest_file(&path2, &key2);
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
            ImageInput::Stream {
                ref spec,
                ref spool,
            } => spool_stream(open_source(spec)?, spool),
            ImageInput::Encoded { stream, spool } => {
                opts.config.encoding = stream.encoding;
                packing = stream.stats;
                spool_stream(stream.source, &spool)
            }
            ImageInput::System {
                ref capture,
                ref warnings,
                ref spool,
            } => spool_stream(
                Box::new(crate::image::sources::StreamSource::new(
                    capture.reader(warnings.clone()),
                )),
                spool,
            ),
        };
        opts.config.image_size = size;
        opts.config.image_id = image_id;
        let expected = opts.config.expected_nodes;
        opts.config.data_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listen address", e))?;
        let session = opts.config.session.clone();
        // Each process has its own run: the tickets it hands out are worth
        // nothing to the next.
        opts.config.run = nonce();
        let mut source = Source::new(clock.now(), opts.config, Box::new(opts.key.clone()));
        // A file is all there from the start; a stream's spool is followed.
        if let Some(size) = size {
            source.handle_image_progress(clock.now(), size);
        }
        let state_path = match &opts.state_dir {
            Some(dir) => {
                resume::prepare_state_dir(dir)?;
                Some(SavedSession::path(dir, &session, &image_id))
            }
            None => None,
        };
        if let Some(p) = &state_path {
            restore(&mut source, clock, p, &session, &image_id);
        }
        let recorder = state_path.map(|p| Recorder::start(p, outcomes_text(&source)));
        let (events_tx, events) = mpsc::unbounded_channel();
        let inputs = Inputs {
            events,
            digest,
            image_progress: image_watch.clone(),
            go,
            go_open: true,
        };
        let driver = SourceDriver {
            refreshed: clock.now(),
            source,
            clock,
            path,
            image_written,
            image_watch,
            size,
            expected,
            pacing: Pacing::new(opts.max_rate),
            recorder,
            conns: Conns::new(events_tx),
            started_at: None,
            packing,
            unshown_refusals: HashSet::new(),
        };
        Ok((driver, inputs))
    }

    /// Runs the machine until the session finishes (`None`) or aborts (why).
    async fn run(
        &mut self,
        listener: &TcpListener,
        inputs: &mut Inputs,
        display: &mut impl FnMut(&Source, Option<&SourceEvent>),
    ) -> Result<Option<String>, Error> {
        loop {
            if let Some(aborted) = self.drain(display) {
                self.last_words(inputs, display).await;
                return Ok(aborted);
            }
            let deadline = self
                .source
                .poll_timeout()
                .map(|(t, _)| self.clock.instant(t));
            tokio::select! {
                accepted = self.conns.accept(listener) => {
                    // A node, an operator or a stranger.
                    if let Some(id) = self.conns.admit(accepted) {
                        self.source.handle_connected(self.clock.now(), id, nonce());
                    }
                }
                Some(event) = inputs.events.recv() => self.conn_event(event),
                Some(result) = inputs.digest.recv() => self.image_done(result),
                Some(()) = inputs.go.recv(), if inputs.go_open => self.source.handle_go(self.clock.now()),
                Ok(()) = inputs.image_progress.changed() => {
                    let upto = inputs.image_progress.borrow_and_update().upto;
                    self.source.handle_image_progress(self.clock.now(), upto);
                }
                _ = sleep_until(deadline) => self.source.handle_timeout(self.clock.now()),
            }
            inputs.go_open = !inputs.go.is_closed();
        }
    }

    /// Drains the machine's outputs: frames to their connections, actions
    /// carried out, events to `display` (and the machine alone every
    /// [`REFRESH`]), decided outcomes to the record. `Some` once the
    /// session finished (`None`) or aborted (why).
    fn drain(
        &mut self,
        display: &mut impl FnMut(&Source, Option<&SourceEvent>),
    ) -> Option<Option<String>> {
        self.conns.flush_refusals();
        while let Some((c, m)) = self.source.poll_transmit() {
            if !self.conns.send(c, m) {
                // Beyond the log's bound: left out of the display too.
                self.unshown_refusals.insert(c);
            }
        }
        while let Some(action) = self.source.poll_action() {
            self.act(action);
        }
        let mut done = None;
        if self.clock.now().saturating_since(self.refreshed) >= REFRESH {
            self.refreshed = self.clock.now();
            display(&self.source, None);
        }
        let mut outcomes_changed = false;
        while let Some(ev) = self.source.poll_event() {
            let unshown = matches!(&ev, SourceEvent::Refused { conn, .. } if self.unshown_refusals.remove(conn));
            if !unshown {
                display(&self.source, Some(&ev));
            }
            outcomes_changed |= changes_outcomes(&ev);
            match ev {
                SourceEvent::Finished { .. } => done = Some(None),
                SourceEvent::Aborted { reason } => done = Some(Some(reason)),
                _ => {}
            }
        }
        if let (true, Some(recorder)) = (outcomes_changed, &self.recorder) {
            recorder.update(outcomes_text(&self.source));
        }
        done
    }

    fn act(&mut self, action: SourceAction) {
        match action {
            SourceAction::StartReading => self.started_at = Some(self.clock.now()),
            SourceAction::Serve {
                conn,
                node: _,
                from,
            } => {
                if let Some(tx) = self.conns.get(conn) {
                    let job = ServeJob {
                        from,
                        path: self.path.clone(),
                        written: self.image_watch.clone(),
                        pace: self.pacing.receiver(),
                        direct: None,
                        window: None,
                    };
                    if tx.send(Command::Serve(Box::new(job))).is_ok() {
                        self.pacing.started(conn);
                    }
                }
            }
            SourceAction::Close { conn } => {
                self.conns.close(conn);
                self.pacing.stopped(conn);
            }
        }
    }

    /// A connection's task reports.
    /// Takes in, for a moment, what the nodes still send once the session
    /// ended: a node's last log lines (its verdict as it printed it) follow
    /// its last report on the wire, and belong in its log.
    async fn last_words(
        &mut self,
        inputs: &mut Inputs,
        display: &mut impl FnMut(&Source, Option<&SourceEvent>),
    ) {
        let until = tokio::time::Instant::now() + LAST_WORDS;
        while let Ok(Some(event)) = tokio::time::timeout_at(until, inputs.events.recv()).await {
            if matches!(event, Event::Frame(..)) {
                self.conn_event(event);
                let _ = self.drain(display);
            }
        }
    }

    fn conn_event(&mut self, event: Event) {
        let now = self.clock.now();
        match event {
            Event::Frame(c, m) => {
                self.conns.heard(c);
                self.source.handle_message(now, c, m);
            }
            Event::Closed(c, why) => {
                tracing::debug!(conn = %c, %why, "connection closed");
                self.conns.forget(c);
                self.source.handle_closed(now, c);
            }
            Event::Served { conn, result } => {
                self.pacing.stopped(conn);
                if let Err(e) = result {
                    tracing::info!(conn = %conn, error = %e, "serving a node stopped");
                    if let Some(reason) = self.image_changed() {
                        self.source.handle_image_failed(self.clock.now(), reason);
                    }
                }
            }
            Event::Progress(_) | Event::Received { .. } => {}
        }
    }

    /// Why the file being served no longer holds the image published, if it
    /// does not: a file cut short while it is served would fail every
    /// sender at the same offset, and the nodes would reconnect to it
    /// forever. (A block device cannot shrink; a changed image of the same
    /// length is caught by every node's digest.)
    fn image_changed(&self) -> Option<String> {
        let size = self.size?;
        let meta = std::fs::metadata(&self.path).ok()?;
        (meta.is_file() && meta.len() < size).then(|| {
            format!(
                "{} changed while it was served: it holds {} bytes of the {size} published; serve an image nobody writes to (unmount it, or copy it first)",
                self.path.display(),
                meta.len()
            )
        })
    }

    /// The image's digest pass (or spool) ended.
    fn image_done(&mut self, result: Result<(u64, Digest), Error>) {
        match result {
            Ok((total, d)) => {
                self.size = Some(total);
                // A packed stream's copies are checked by the image in its
                // trailer, made before the stream could end.
                let image = self
                    .packing
                    .as_ref()
                    .map(|p| p.trailer.get().map(|t| t.digest));
                match image {
                    Some(None) => self.source.handle_image_failed(
                        self.clock.now(),
                        "the packed stream ended without its trailer".into(),
                    ),
                    image => {
                        self.source
                            .handle_image_done(self.clock.now(), total, d, image.flatten())
                    }
                }
            }
            Err(e) => self
                .source
                .handle_image_failed(self.clock.now(), e.to_string()),
        }
    }

    /// After the session: lets the last frames (releases, aborts) leave
    /// before the sockets close, removes the record, and reports.
    async fn finish(self, aborted: Option<String>) -> SourceReport {
        let SourceDriver {
            source,
            clock,
            image_written,
            size,
            expected,
            recorder,
            conns,
            started_at,
            packing,
            ..
        } = self;
        conns.finish().await;
        let streaming = started_at.map_or(Duration::ZERO, |t| clock.now().saturating_since(t));
        drop(image_written);
        if let Some(recorder) = recorder {
            recorder.remove().await;
        }
        let stream = size.unwrap_or_default();
        let (size, packed) = match packing {
            Some(p) => (
                p.image.load(std::sync::atomic::Ordering::Relaxed),
                Some(stream),
            ),
            None => (stream, None),
        };
        SourceReport {
            nodes: source.report(),
            size,
            packed,
            streaming,
            aborted,
            expected,
        }
    }
}

/// Restores into `source` the outcomes an earlier run of `session` on the
/// same image recorded at `path`.
fn restore(source: &mut Source, clock: Clock, path: &Path, session: &str, image_id: &ImageId) {
    match SavedSession::load(path) {
        Ok(Some(st))
            if st.session == session && st.image == *image_id && !st.outcomes.is_empty() =>
        {
            tracing::info!(
                outcomes = st.outcomes.len(),
                "going on with the session of an earlier run on this image"
            );
            // One write, so no other process's line lands inside it.
            let line = format!(
                "ka: going on with an interrupted session on this image: {} node outcome(s) restored from {} \
                 (remove it to start a fresh session)\n",
                st.outcomes.len(),
                path.display()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            for o in st.outcomes {
                source.handle_restored(clock.now(), o.name, o.mac, o.outcome);
            }
        }
        Ok(_) => {}
        // Unreadable, or too old to trust (then removed): a fresh session.
        Err(reason) => tracing::warn!(%reason, "not going on with an earlier session"),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Tells the source at `server` to start now with the nodes present, as
/// the operator (whose key derives from the session's root `key`); returns
/// whether this started the stream and how many nodes it has. The answer
/// counts only if it proves the operator key over our nonce.
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
    let Message::Challenge {
        nonce: server_nonce,
        ..
    } = next_frame(&mut framed).await?
    else {
        return Err(format!("{server} is not a ka source"));
    };
    let operator = ka_core::auth::operator_key(key);
    let own = nonce();
    let proof = ka_core::auth::go_proof(&*operator, &server_nonce, session, &own);
    framed
        .send(Message::Go {
            session: session.to_string(),
            nonce: own,
            proof,
        })
        .await
        .map_err(|e| format!("sending go: {e}"))?;
    let mut channel = Channel::new(&*operator, &server_nonce, &own, Side::Client);
    match next_frame(&mut framed).await? {
        Message::Refused(r) => Err(format!("the source refused: {}", r.detail)),
        sealed => match channel.open(sealed) {
            Ok(Message::GoAck { started, nodes }) => Ok((started, nodes)),
            Ok(other) => Err(format!("unexpected answer {}", other.name())),
            Err(e) => Err(format!(
                "{server} did not prove the session key ({e}): it is not this session's source"
            )),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_cap_is_shared_among_the_connections_served() {
        let mut pacing = Pacing::new(Some(1200));
        let share = pacing.receiver().expect("a cap is followed");
        pacing.started(ConnId(1));
        assert_eq!(*share.borrow(), 1200);
        pacing.started(ConnId(2));
        pacing.started(ConnId(3));
        assert_eq!(*share.borrow(), 400);
        pacing.started(ConnId(3));
        assert_eq!(*share.borrow(), 400, "a connection counts once");
    }

    #[test]
    fn a_connection_served_no_more_gives_its_share_back() {
        let mut pacing = Pacing::new(Some(1000));
        let share = pacing.receiver().unwrap();
        pacing.started(ConnId(1));
        pacing.started(ConnId(2));
        assert_eq!(*share.borrow(), 500);
        pacing.stopped(ConnId(2));
        assert_eq!(*share.borrow(), 1000);
        pacing.stopped(ConnId(2));
        pacing.stopped(ConnId(1));
        assert_eq!(*share.borrow(), 1000, "no connection: the whole cap");
    }

    #[test]
    fn a_tiny_cap_shared_by_many_still_lets_each_send() {
        let mut pacing = Pacing::new(Some(2));
        for c in 0..5 {
            pacing.started(ConnId(c));
        }
        assert_eq!(*pacing.receiver().unwrap().borrow(), 1);
    }

    #[test]
    fn without_a_cap_nothing_is_paced() {
        let mut pacing = Pacing::new(None);
        pacing.started(ConnId(1));
        assert!(pacing.receiver().is_none());
    }
}
