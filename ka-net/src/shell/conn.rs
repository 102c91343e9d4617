//! One task per TCP connection.
//!
//! While a connection is a conversation the task writes the frames the driver
//! sends and reads the peer's frames back to the driver. After the frames
//! that open a data stream it stops reading frames, since raw records may
//! follow: on the serving side, the `DataHello`; on the receiving side, the
//! first frame after its own `DataHello` went out (the upstream's sealed
//! acceptance, or its refusal, which only the machine can tell apart). It
//! then waits for the driver to hand it a data job: serve records from an
//! offset, or receive them into the node's writer. Data jobs run here, on the
//! raw socket, so image bytes never pass through the driver.
//!
//! A connection this process accepted ([`Side::Accepted`]) is a stranger's
//! until its first message: it must come within
//! [`gate::HANDSHAKE_TIMEOUT`] and announce no more than
//! [`gate::FIRST_MESSAGE_MAX`] bytes, or the connection is closed
//! ([`super::gate`] says why these bounds).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ka_core::codec::Message;
use ka_core::ids::ConnId;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

use super::gate::{self, Gate};
use super::wire::BoundedCodec;
use crate::datapath::forward::Downstreams;
use crate::datapath::{relay, send_growing, NodeWriter, Payload, RelayEnd, RelayEvent};
use crate::image::sources::{FileSource, ImageSource};
use crate::Error;

pub use crate::datapath::Written;

/// Serve records to a downstream from a file that is, or is being, written.
pub struct ServeJob {
    /// The first offset to send.
    pub from: u64,
    /// The file (or block device) to read.
    pub path: PathBuf,
    /// How far it is written; serving follows it until the image is complete.
    pub written: watch::Receiver<Written>,
    /// A cap on this connection's send rate in bytes per second, which may
    /// change while it sends (the source's `--max-rate`, shared among the
    /// connections it serves); `None`: as fast as the path allows.
    pub pace: Option<watch::Receiver<u64>>,
    /// The node's receiving thread, to lend the socket to while the
    /// downstream keeps up (a node's serving; not the source's).
    pub direct: Option<Arc<Downstreams>>,
    /// The node's bounded window over its spool (a system clone's node):
    /// this serving registers in it, so nothing it still has to send is
    /// punched out.
    pub window: Option<Arc<crate::datapath::window::Window>>,
}

/// Receive records from the upstream into the node's writer.
pub struct ReceiveJob {
    /// The node's writer, lent for the duration of the stream.
    pub writer: NodeWriter,
    /// Where to publish how far the sink has been written, for serving.
    pub written: watch::Sender<Written>,
    /// The downstreams the receiving thread forwards to directly.
    pub direct: Arc<Downstreams>,
}

/// What the driver tells a connection task.
pub enum Command {
    /// Send a frame.
    Send(Message),
    /// Close the connection (after the frames already queued).
    Close,
    /// Turn into a data connection that serves records.
    Serve(Box<ServeJob>),
    /// Turn into a data connection that receives records.
    Receive(Box<ReceiveJob>),
}

/// What a connection task tells the driver.
pub enum Event {
    /// A frame arrived.
    Frame(ConnId, Message),
    /// The connection ended; why, for the log.
    Closed(ConnId, String),
    /// The node's sink has taken everything before this offset.
    Progress(u64),
    /// A receive job ended; the writer comes back.
    Received {
        /// The connection.
        conn: ConnId,
        /// The node's writer.
        writer: Box<NodeWriter>,
        /// The end of the image, or why the stream stopped.
        result: Result<RelayEnd, Error>,
    },
    /// A serve job ended.
    Served {
        /// The connection.
        conn: ConnId,
        /// Whether it sent the image to its end, or why it stopped.
        result: Result<(), Error>,
    },
}

/// Progress reports to the driver at most every this many bytes: the core
/// only needs them for heartbeats and the display...
const PROGRESS_STEP: u64 = 4 << 20;

/// ...or after this long with anything new, so a slow stream, or a node
/// that dies before its first [`PROGRESS_STEP`], still reports what it
/// received (its heartbeats every 250 ms carry it to the source's report).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Which end of the connection this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The peer connected to our listener: it owes us an answer to our
    /// challenge, within the handshake bounds.
    Accepted,
    /// We connected to a peer we chose (the source, an upstream); the
    /// machine's own timers bound the wait for it.
    Connected,
}

/// The connections a driver owns, kept the same way by the source's and
/// the node's: each one's command channel, the tasks that run them, and
/// what the strangers among them may hold ([`Gate`]).
pub struct Conns {
    commands: HashMap<ConnId, mpsc::UnboundedSender<Command>>,
    /// Reaped whenever a connection starts, so connections that come and go
    /// (accepted or made) leave nothing behind.
    tasks: JoinSet<()>,
    gate: Gate,
    /// Each connection's peer, for the log of refusals.
    peers: HashMap<ConnId, SocketAddr>,
    refusals: gate::RefusalLog,
    last_id: u64,
    events: mpsc::UnboundedSender<Event>,
}

impl Conns {
    /// No connections yet; their tasks report on `events`.
    pub fn new(events: mpsc::UnboundedSender<Event>) -> Conns {
        Conns {
            commands: HashMap::new(),
            tasks: JoinSet::new(),
            gate: Gate::default(),
            peers: HashMap::new(),
            refusals: gate::RefusalLog::default(),
            last_id: 0,
            events,
        }
    }

    /// A fresh connection ID.
    pub fn next_id(&mut self) -> ConnId {
        self.last_id += 1;
        ConnId(self.last_id)
    }

    /// Waits until `listener` may accept and accepts one connection
    /// (cancel-safe, for `select!`); give the result to [`Conns::admit`].
    pub async fn accept(&self, listener: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
        self.gate.accept(listener).await
    }

    /// Starts the task of an accepted connection if the gate admits it (a
    /// stranger until it answers its challenge) and returns its ID; drops it
    /// unread otherwise.
    pub fn admit(&mut self, accepted: std::io::Result<(TcpStream, SocketAddr)>) -> Option<ConnId> {
        let (stream, peer) = self.gate.accepted(accepted)?;
        let id = self.next_id();
        self.start(id, stream, Side::Accepted);
        self.gate.admitted(id, &peer);
        Some(id)
    }

    /// Starts the task of connection `id`, made or accepted, over `stream`.
    pub fn start(&mut self, id: ConnId, stream: TcpStream, side: Side) {
        while self.tasks.try_join_next().is_some() {}
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = stream.set_nodelay(true);
        if let Ok(peer) = stream.peer_addr() {
            self.peers.insert(id, peer);
        }
        self.tasks
            .spawn(run(id, stream, side, rx, self.events.clone()));
        self.commands.insert(id, tx);
    }

    /// The command channel of connection `id`, while it is open.
    pub fn get(&self, id: ConnId) -> Option<&mpsc::UnboundedSender<Command>> {
        self.commands.get(&id)
    }

    /// Hands `msg` to connection `id`'s task, if it is open. A refusal is
    /// logged with the peer's address, within [`gate::RefusalLog`]'s
    /// bounds; returns whether it was (`true` for any other message).
    pub fn send(&mut self, id: ConnId, msg: Message) -> bool {
        let shown = match &msg {
            Message::Refused(r) => {
                let reason = format!("{} ({:?})", r.detail, r.code);
                let peer = self.peers.get(&id).copied();
                self.refusals
                    .note(tokio::time::Instant::now(), peer, &reason)
            }
            _ => true,
        };
        if let Some(tx) = self.commands.get(&id) {
            let _ = tx.send(Command::Send(msg));
        }
        shown
    }

    /// Logs how many refusals were left out of the log, once their second
    /// is over (call it at every turn of the driver's loop).
    pub fn flush_refusals(&mut self) {
        self.refusals.flush(tokio::time::Instant::now());
    }

    /// Connection `id` sent a frame: it is no stranger any more.
    pub fn heard(&mut self, id: ConnId) {
        self.gate.settled(id);
    }

    /// Connection `id` is closed, or its task ends on its own: forgets it.
    pub fn forget(&mut self, id: ConnId) {
        self.gate.settled(id);
        self.peers.remove(&id);
        self.commands.remove(&id);
    }

    /// Tells connection `id`'s task to close it, and forgets it.
    pub fn close(&mut self, id: ConnId) {
        self.gate.settled(id);
        self.peers.remove(&id);
        if let Some(tx) = self.commands.remove(&id) {
            let _ = tx.send(Command::Close);
        }
    }

    /// At the end: lets the tasks finish what they send (the last frames, a
    /// downstream still reading) for up to 500 ms, then leaves whatever
    /// still runs to end on its own rather than cutting it off.
    pub async fn finish(self) {
        let Conns {
            commands,
            mut tasks,
            ..
        } = self;
        drop(commands);
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.detach_all();
    }
}

async fn run(
    conn: ConnId,
    stream: TcpStream,
    side: Side,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut answered = side == Side::Connected;
    if answered {
        // A peer we chose: its messages get through outages at once; a
        // stranger's only once it has answered (below).
        super::tcp::for_messages(std::os::fd::AsRawFd::as_raw_fd(&stream));
    }
    let codec = if answered {
        BoundedCodec::default()
    } else {
        BoundedCodec {
            limit: gate::FIRST_MESSAGE_MAX,
        }
    };
    let mut framed = Framed::new(stream, codec);
    let handshake = tokio::time::sleep(gate::HANDSHAKE_TIMEOUT);
    tokio::pin!(handshake);
    let mut reading = true;
    // Our data hello went out: the next frame is the last before records.
    let mut hello_sent = false;
    loop {
        tokio::select! {
            () = &mut handshake, if !answered => {
                let why = format!("no answer to the challenge within {:?}", gate::HANDSHAKE_TIMEOUT);
                let _ = events.send(Event::Closed(conn, why));
                return;
            }
            frame = framed.next(), if reading => match frame {
                Some(Ok(msg)) => {
                    if !answered {
                        // The machine decides on this message: it proves
                        // its key, or the connection is refused.
                        answered = true;
                        framed.codec_mut().limit = BoundedCodec::default().limit;
                        super::tcp::for_messages(std::os::fd::AsRawFd::as_raw_fd(framed.get_ref()));
                    }
                    if hello_sent || matches!(msg, Message::DataHello { .. }) {
                        reading = false;
                    }
                    if events.send(Event::Frame(conn, msg)).is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = events.send(Event::Closed(conn, format!("bad frame: {e}")));
                    return;
                }
                None => {
                    let _ = events.send(Event::Closed(conn, "closed by the peer".into()));
                    return;
                }
            },
            command = commands.recv() => match command {
                None | Some(Command::Close) => return,
                Some(Command::Send(msg)) => {
                    hello_sent |= matches!(msg, Message::DataHello { .. });
                    if let Err(e) = framed.send(msg).await {
                        let _ = events.send(Event::Closed(conn, format!("send failed: {e}")));
                        return;
                    }
                }
                Some(Command::Serve(mut job)) => {
                    let mut stream = framed.into_parts().io;
                    let pace = job.pace.take();
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                    // The cap holds from the first byte: the select below
                    // may poll the sender first, and a sender that never
                    // finds the socket full (loopback) never yields to the
                    // pacing branch at all.
                    if let Some(rate) = pace.as_ref().map(|p| *p.borrow()) {
                        if let Err(e) = set_pacing_rate(fd, rate) {
                            tracing::warn!(error = %e, "cannot cap the send rate of a data connection");
                        }
                    }
                    super::tcp::for_bulk(fd);
                    // The pace holds from the first byte: left to the task
                    // below, it raced the sender, and a loopback socket took
                    // megabytes unpaced first.
                    if let Some(rate) = pace.as_ref().map(|p| *p.borrow()) {
                        if let Err(e) = set_pacing_rate(fd, rate) {
                            tracing::warn!(error = %e, "cannot cap the send rate of a data connection");
                        }
                    }
                    tokio::select! {
                        _ = follow_pace(fd, pace) => unreachable!("pacing never ends"),
                        result = serve(&mut stream, *job) => {
                            let sent_all = result.is_ok();
                            let _ = events.send(Event::Served { conn, result });
                            if sent_all {
                                // Let the downstream read to the end; it closes first.
                                let mut sink = [0u8; 64];
                                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut sink)).await;
                            }
                            // After a failure, close at once: the downstream
                            // reconnects sooner.
                        }
                        _ = closed(&mut commands) => {
                            // The driver hears of every job's end, for its log.
                            let stopped = Error::Invalid("the data connection was closed by its server".into());
                            let _ = events.send(Event::Served { conn, result: Err(stopped) });
                        }
                    }
                    return;
                }
                Some(Command::Receive(job)) => {
                    let parts = framed.into_parts();
                    super::tcp::for_bulk(std::os::fd::AsRawFd::as_raw_fd(&parts.io));
                    receive(conn, parts.read_buf.freeze(), parts.io, *job, &mut commands, &events).await;
                    return;
                }
            },
        }
    }
}

/// Keeps the kernel's pacing of socket `fd` at the rate `pace` says
/// (`SO_MAX_PACING_RATE`: TCP spaces its segments out, whatever writes them,
/// sendfile included). Never resolves; it is dropped with its connection.
async fn follow_pace(fd: std::os::fd::RawFd, pace: Option<watch::Receiver<u64>>) {
    let Some(mut pace) = pace else {
        return std::future::pending().await;
    };
    loop {
        let rate = *pace.borrow_and_update();
        if let Err(e) = set_pacing_rate(fd, rate) {
            tracing::warn!(error = %e, "cannot cap the send rate of a data connection");
        }
        if pace.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Caps the send rate of socket `fd` at `rate` bytes per second.
fn set_pacing_rate(fd: std::os::fd::RawFd, rate: u64) -> std::io::Result<()> {
    // SAFETY: `fd` is the socket of a connection this task owns and keeps
    // open while pacing is followed; the option value is a plain u64 whose
    // size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Resolves when the driver closes the connection or goes away.
async fn closed(commands: &mut mpsc::UnboundedReceiver<Command>) {
    loop {
        match commands.recv().await {
            None | Some(Command::Close) => return,
            Some(_) => {}
        }
    }
}

/// Serves the job's file from its offset to the image's end, in one stream
/// that follows the file while it is being written.
async fn serve(stream: &mut TcpStream, job: ServeJob) -> Result<(), Error> {
    let ServeJob {
        from,
        path,
        mut written,
        pace: _,
        direct,
        window,
    } = job;
    let reader = match &window {
        Some(w) => Some(w.register(from).ok_or_else(|| {
            Error::Invalid(format!(
                "offset {from} has left this node's window (it holds from {})",
                w.holds_from()
            ))
        })?),
        None => None,
    };
    // A node's target may not even exist before its first write.
    let size = loop {
        let w = *written.borrow_and_update();
        if w.size.is_some() || w.upto > from {
            break w.size;
        }
        if written.changed().await.is_err() {
            return Err(Error::Invalid(
                "the image stopped being written before it was complete".into(),
            ));
        }
    };
    let mut source = FileSource::open_sized(&path, size)?;
    source.seek(from)?;
    // A window punches what this serving has sent: its bytes must be copied
    // out, not lent (see `Payload::Copied`).
    let payload = match reader {
        Some(_) => Payload::Copied,
        None => Payload::Lent,
    };
    send_growing(source, stream, written, direct.as_ref(), payload, |sent| {
        if let Some(r) = &reader {
            r.advance(sent);
        }
    })
    .await?;
    Ok(())
}

/// Tells the driver, every [`PROGRESS_EVERY`], how far `written` got if it
/// moved past what was last `reported`. Never returns.
async fn report_progress(
    written: watch::Receiver<Written>,
    reported: &std::sync::atomic::AtomicU64,
    events: &mpsc::UnboundedSender<Event>,
) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let upto = written.borrow().upto;
        if upto > reported.fetch_max(upto, std::sync::atomic::Ordering::Relaxed) {
            let _ = events.send(Event::Progress(upto));
        }
    }
}

async fn receive(
    conn: ConnId,
    leftover: bytes::Bytes,
    stream: TcpStream,
    job: ReceiveJob,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    events: &mpsc::UnboundedSender<Event>,
) {
    let ReceiveJob {
        mut writer,
        written,
        direct,
    } = job;
    // Progress is published from the relay's receiving thread: the serving
    // tasks that follow `written` wake without another thread in between.
    // The driver hears of it per PROGRESS_STEP from there, and every
    // PROGRESS_EVERY from `report_progress` below, which also catches
    // what arrived in a burst just before a pause (a paced or stalled
    // upstream) that no later write would report.
    let reported = Arc::new(std::sync::atomic::AtomicU64::new(writer.position()));
    let published = written.clone();
    let progress = events.clone();
    let reported_by_relay = reported.clone();
    let on_written = move |RelayEvent::Written(offset)| {
        published.send_modify(|w| w.upto = w.upto.max(offset));
        let before = reported_by_relay.load(std::sync::atomic::Ordering::Relaxed);
        if offset >= before + PROGRESS_STEP {
            reported_by_relay.fetch_max(offset, std::sync::atomic::Ordering::Relaxed);
            let _ = progress.send(Event::Progress(offset));
        }
    };
    // The receiving thread owns the socket from here. Left registered with
    // the runtime, every packet that arrives would also wake a runtime
    // thread for nothing (four wakeups per piece received).
    // Records may already sit in the frame reader's buffer: they are read first.
    let result = match stream.into_std() {
        Err(e) => Err(Error::io("taking the upstream socket from the runtime", e)),
        Ok(stream) => tokio::select! {
            result = relay(&stream, &leftover, &mut writer, Some(&direct), on_written) => result,
            _ = closed(commands) => Err(Error::Invalid("the data connection was closed by this node".into())),
            _ = report_progress(written.subscribe(), &reported, events) => unreachable!("reports until the relay ends"),
        },
    };
    if let Ok(end) = &result {
        written.send_replace(Written {
            upto: end.size,
            size: Some(end.size),
        });
    }
    let _ = events.send(Event::Received {
        conn,
        writer: Box::new(writer),
        result,
    });
}
