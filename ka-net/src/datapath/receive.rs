//! A node's receiving thread ([`relay`]): reads the upstream socket into a
//! pooled buffer and writes each piece to the sink itself, so a received
//! byte reaches the disk (and so the downstreams, served from the disk)
//! without changing threads; the [`NodeWriter`]'s hasher thread hashes
//! whole buffers behind it and returns them to the pool. Receiving and
//! writing share a thread because on a slow link every thread handoff is a
//! wakeup, and wakeups, not copies, are what a node spends its CPU on;
//! hashing has a thread of its own so that on a fast link it runs beside
//! them on the other core.
//!
//! While a downstream keeps up, the same thread sends it each piece right
//! after writing it ([`super::forward`]).
//!
//! When to write a piece sets each hop's delay. The thread writes (and
//! forwards) what its buffer holds when the buffer is full *or*
//! [`FORWARD_DELAY`] after its first byte came. On a fast link buffers fill
//! first and the socket wakes the thread per `WAKE_BATCH` bytes (`SO_RCVLOWAT`).
//! On a slow link the thread wakes once the open piece is complete: it
//! holds [`FORWARD_AFTER`] of the link's rate (at least
//! `FORWARD_BYTES_MIN`), or its deadline came, as long as what arrives
//! meanwhile fits half the socket's receive buffer (so the sender never
//! waits for the window). A piece is stored whole before it is forwarded,
//! so its length in time is what each hop adds.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use ka_core::codec::Digest;
use ka_core::config::{FORWARD_AFTER, FORWARD_DELAY};
use ka_core::record::{RecordHeader, RecordKind};
use tokio::sync::oneshot;
use tokio::time::Duration;

use super::forward::{Downstreams, Feeding};
use super::pool::{hasher_gone, relay_stopped, Buf, StopFlag, BUF_SIZE};
use super::writer::{HashJob, Lent, NodeWriter};
use crate::Error;

/// On a fast link (buffers fill before their deadline), a node's receiving
/// thread is woken by its upstream socket only once this much has arrived
/// (`SO_RCVLOWAT`): per 64 KiB, a GSO packet's worth, rather than per
/// segment. On a slow link the low mark is what completes the open piece
/// (see `Receiver::wait`). Linux clamps the receive window to a raised low
/// mark unless the socket's buffer size was set by hand, which
/// `UpstreamSocket::enlarge_receive_buffer` does (with a clamped window a
/// raised low mark slows every hop).
const WAKE_BATCH: usize = 64 << 10;

/// The receive buffer a node asks for on its upstream socket (see
/// `UpstreamSocket::enlarge_receive_buffer`): 4 MiB, a third of a second at
/// 100 Mbit/s, 3 ms at 10 Gbit/s.
const RECEIVE_BUFFER: usize = 4 << 20;

/// On a slow link, how much past the current record one read of the
/// upstream may take along (kept aside and used by the next reads).
const READ_AHEAD: usize = 64 << 10;

/// [`ka_core::config::FORWARD_BYTES_MIN`], as a buffer length.
const FORWARD_BYTES_MIN: usize = ka_core::config::FORWARD_BYTES_MIN as usize;

/// How long the upstream's rate is measured over before it sets the bytes
/// of [`FORWARD_AFTER`] anew.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// What the relay reports as it goes.
#[derive(Debug)]
pub enum RelayEvent {
    /// The sink has taken everything before this offset (written, not yet
    /// flushed to stable storage; [`ImageSink::finish`](crate::ImageSink::finish) does that). A server
    /// may send it on from the sink's file.
    Written(u64),
}

/// How a relay ended: the whole image was received, written, flushed and
/// hashed (by a writer that hashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayEnd {
    /// The image size (the `End` record's offset).
    pub size: u64,
    /// The digest of the received stream (to compare with the source's);
    /// `None` from a writer made [`NodeWriter::unhashed`].
    pub digest: Option<Digest>,
}

/// What a receiving thread hands back when it stops.
struct Received {
    lent: Lent,
    /// Why the sink can take no more, if it failed.
    sink_failed: Option<String>,
    result: Result<RelayEnd, Error>,
}

/// Receives records from `upstream` (after `leftover`, bytes already read
/// from it) until `End`, writing them through `writer`. Returns once the
/// image is complete and flushed and its digest known.
///
/// The upstream must start at `writer.position()`. `events` hears of
/// progress each time the sink has taken more; it is called from the
/// receiving thread, so a server following the written file (through a
/// `watch`) hears of it without another thread in between. On an error
/// (the upstream closed or sent a bad record, or the sink failed) every
/// byte received is written, and a new relay may resume at
/// `writer.position()`.
///
/// With `direct`, the receiving thread also sends each piece it writes to
/// the downstreams whose serving tasks ([`send_growing`](super::send_growing) with the same
/// `direct`) have lent it their sockets. The upstream is read by that
/// thread alone: a socket still registered with the tokio runtime (pass
/// one made by `into_std`) would wake the runtime at every packet.
///
/// Dropping the future (to relink) stops the receiving thread and waits
/// for it (it stops at once: it is waiting for the socket, or writing one
/// piece), so the writer is whole again and holds everything received;
/// the connection may be left mid-record: close it.
pub async fn relay(
    upstream: &impl AsFd,
    leftover: &[u8],
    writer: &mut NodeWriter,
    direct: Option<&Arc<Downstreams>>,
    events: impl FnMut(RelayEvent) + Send + 'static,
) -> Result<RelayEnd, Error> {
    writer.check()?;
    let socket = upstream
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating the upstream socket", e))?;
    let (stop_tx, stop_rx) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::io("making the relay's stop signal", e))?;
    let lent = writer.take_lent()?;
    let stopped = StopFlag::default();
    let upstream = UpstreamSocket {
        socket: std::net::TcpStream::from(socket),
        ahead: {
            let mut ahead = leftover.to_vec();
            ahead.resize(leftover.len().max(READ_AHEAD), 0);
            ahead
        },
        from: 0,
        to: leftover.len(),
        stop: stop_rx,
        stopped: stopped.clone(),
        wake_at: 1,
        drained: false,
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    upstream.enlarge_receive_buffer();
    // The size just set (or, if that failed, the autotuned size, which only
    // grows): a safe bound.
    let calm_below =
        nix::sys::socket::getsockopt(&upstream.socket, nix::sys::socket::sockopt::RcvBuf)
            .map_or(0, |size| size / 2);
    let position = lent.sink.position();
    let receiver = Receiver {
        up: upstream,
        lent,
        feeding: direct.map(|d| d.start_feeding(position)),
        events: Box::new(events),
        reported: position,
        piece: None,
        due: None,
        fast: false,
        last_write: usize::MAX,
        calm_below,
        forward_bytes: FORWARD_BYTES_MIN,
        rate_bytes: 0,
        rate_since: std::time::Instant::now(),
        sink_failed: None,
    };
    let spawned = std::thread::Builder::new()
        .name("ka-receiver".into())
        .spawn(move || {
            let received = receiver.run();
            let _ = done_tx.send(());
            received
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            // The sink went with the thread that never ran.
            writer.fail(format!("cannot start the receiving thread: {e}"));
            return Err(Error::io("starting the receiving thread", e));
        }
    };
    let mut guard = RelayGuard {
        writer,
        thread: Some(thread),
        stop: stop_tx,
        stopped,
    };
    // An error here means the thread panicked; joining says so.
    let _ = done_rx.await;
    guard.join()
}

/// Stops and joins a relay's receiving thread, whether the relay finished
/// or its future was dropped, and gives the writer back what it lent.
struct RelayGuard<'a> {
    writer: &'a mut NodeWriter,
    thread: Option<std::thread::JoinHandle<Received>>,
    stop: std::os::unix::net::UnixStream,
    stopped: StopFlag,
}

impl RelayGuard<'_> {
    fn join(&mut self) -> Result<RelayEnd, Error> {
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(Received {
                lent,
                sink_failed,
                result,
            }) => {
                self.writer.restore(lent, sink_failed);
                result
            }
            Err(_) => {
                let why = "the receiving thread panicked";
                self.writer.fail(why.into());
                Err(Error::WriterFailed(why.into()))
            }
        }
    }
}

impl Drop for RelayGuard<'_> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // The relay was dropped mid-stream: wake the thread, which is
            // waiting for the socket or about to, and wait for it; it writes
            // what it received and stops.
            use std::io::Write;
            self.stopped.set();
            let _ = (&self.stop).write_all(&[1]);
            let _ = self.join();
        }
    }
}

/// The upstream as the receiving thread reads it: bytes the connection's
/// frame reader had already taken, then the socket (non-blocking, waited
/// on with `poll`, beside the relay's stop signal).
struct UpstreamSocket {
    socket: std::net::TcpStream,
    /// Bytes read from the socket (or by the connection's frame reader)
    /// but not yet used: `ahead[from..to]`. Its length, at least
    /// [`READ_AHEAD`], never changes.
    ahead: Vec<u8>,
    from: usize,
    to: usize,
    /// Readable once the relay is dropped: wakes a waiting thread.
    stop: std::os::unix::net::UnixStream,
    /// Set once the relay is dropped: stops a thread that never waits
    /// (its upstream always has more).
    stopped: StopFlag,
    /// The socket's `SO_RCVLOWAT` as last set.
    wake_at: usize,
    /// The last read from the socket took less than it asked for: it had
    /// no more then.
    drained: bool,
}

impl UpstreamSocket {
    /// Waits until the upstream can be read (its `SO_RCVLOWAT` reached), or
    /// `deadline` passes; an error if the relay was stopped.
    fn wait(&self, deadline: Option<std::time::Instant>) -> Result<(), Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.from < self.to {
            return Ok(());
        }
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    // Whole milliseconds, rounded up: never wake early.
                    let ms = left.as_micros().div_ceil(1000).min(u16::MAX as u128) as u16;
                    PollTimeout::from(ms)
                }
            };
            let mut fds = [
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    if fds[0].any().unwrap_or(false) {
                        return Err(relay_stopped());
                    }
                    return Ok(());
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("waiting for the upstream", e.into())),
            }
        }
    }

    /// Gives the socket a receive buffer of [`RECEIVE_BUFFER`], so that a
    /// receiving thread kept off the CPU for a while (two cores shared by
    /// many nodes) does not close the window on its upstream: a zero
    /// window costs the upstream at least 200 ms (TCP's persist timer),
    /// and the whole chain behind it waits. Left to autotuning, the buffer
    /// stays near 128 KiB, since a node reads little per round trip: about
    /// 80 KB of payload in 1448-byte segments, 6 ms at 100 Mbit/s: many
    /// nodes sharing two cores then see zero windows in every run. As root (`SO_RCVBUFFORCE`) the size is granted in full; else
    /// the kernel caps it at `net.core.rmem_max`.
    fn enlarge_receive_buffer(&self) {
        use nix::sys::socket::{setsockopt, sockopt};
        let forced = setsockopt(&self.socket, sockopt::RcvBufForce, &RECEIVE_BUFFER);
        if forced.is_err() {
            if let Err(e) = setsockopt(&self.socket, sockopt::RcvBuf, &RECEIVE_BUFFER) {
                tracing::debug!(error = %e, "cannot enlarge the upstream's receive buffer");
            }
        }
    }

    /// Makes `poll` report the socket readable only once `bytes` are there
    /// (or it is closed). A read still takes whatever is there.
    fn set_wake_at(&mut self, bytes: usize) -> Result<(), Error> {
        if bytes == self.wake_at {
            return Ok(());
        }
        let value = bytes as libc::c_int;
        // SAFETY: the socket is open for the life of `self`; the option
        // value is a plain int whose size is passed along.
        let r = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(Error::io(
                "setting the upstream's SO_RCVLOWAT",
                std::io::Error::last_os_error(),
            ));
        }
        self.wake_at = bytes;
        Ok(())
    }

    /// Reads up to `want` bytes into `dst`, like [`UpstreamSocket::read`], but
    /// from the socket takes up to all of `dst` (at most [`READ_AHEAD`]
    /// past `want`): bytes past `want` are kept for the next reads.
    fn read_ahead(&mut self, dst: &mut [u8], want: usize) -> std::io::Result<Option<usize>> {
        if self.from < self.to || dst.len() <= want {
            let want = want.min(dst.len());
            return self.read(&mut dst[..want]);
        }
        let got = self.read(dst)?;
        if let Some(n) = got.filter(|&n| n > want) {
            let extra = n - want;
            self.ahead[..extra].copy_from_slice(&dst[want..n]);
            (self.from, self.to) = (0, extra);
            return Ok(Some(want));
        }
        Ok(got)
    }

    /// Reads into `dst` like [`UpstreamSocket::read`], but from the socket takes
    /// up to [`READ_AHEAD`] bytes, kept for the next reads: a record header
    /// comes with what follows it.
    fn read_through(&mut self, dst: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.from == self.to {
            let ahead = &mut self.ahead[..READ_AHEAD];
            match read_socket(&self.socket, ahead, &mut self.drained)? {
                Some(0) => return Ok(Some(0)),
                Some(n) => (self.from, self.to) = (0, n),
                None => return Ok(None),
            }
        }
        self.read(dst)
    }

    /// Reads what is there into `dst` (what was read ahead first);
    /// `Ok(None)` if nothing is there yet.
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.from < self.to {
            let n = dst.len().min(self.to - self.from);
            dst[..n].copy_from_slice(&self.ahead[self.from..self.from + n]);
            self.from += n;
            return Ok(Some(n));
        }
        read_socket(&self.socket, dst, &mut self.drained)
    }
}

/// Reads what `socket` has into `dst`; `Ok(None)` if nothing yet.
/// `drained`: whether the read took less than it asked for (the socket
/// had no more then).
fn read_socket(
    mut socket: &std::net::TcpStream,
    dst: &mut [u8],
    drained: &mut bool,
) -> std::io::Result<Option<usize>> {
    use std::io::Read;
    match socket.read(dst) {
        Ok(n) => {
            *drained = n < dst.len();
            Ok(Some(n))
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The buffer being filled: its bytes are for the image at `offset`, the
/// first `filled` received, the first `written` of those written.
struct Piece {
    buf: Buf,
    offset: u64,
    filled: usize,
    written: usize,
}

/// A relay's receiving thread: reads records, writes their bytes, hands
/// full buffers to the hasher.
struct Receiver {
    up: UpstreamSocket,
    lent: Lent,
    /// The downstreams lent to this thread, fed each piece once written.
    feeding: Option<Feeding>,
    events: Box<dyn FnMut(RelayEvent) + Send>,
    /// The last offset `events` heard of.
    reported: u64,
    piece: Option<Piece>,
    /// When the oldest received and unwritten byte must be written.
    due: Option<std::time::Instant>,
    /// Whether the last piece was written because its buffer filled (a
    /// fast link), not because its deadline came.
    fast: bool,
    /// The bytes of the last write: on a slow link, one piece.
    last_write: usize,
    /// Half the upstream socket's receive buffer: the most a thread
    /// waiting for a whole piece may leave in it.
    calm_below: usize,
    /// A slow link's piece is written once it holds this many bytes
    /// (what arrives in [`FORWARD_AFTER`], at least [`FORWARD_BYTES_MIN`]).
    forward_bytes: usize,
    /// The upstream's rate, measured since `rate_since`: the bytes read.
    rate_bytes: usize,
    rate_since: std::time::Instant,
    sink_failed: Option<String>,
}

impl Receiver {
    /// Receives until `End` or an error, then writes everything received
    /// and queues it for hashing, and hands back what it borrowed.
    fn run(mut self) -> Received {
        let mut result = self.receive();
        // The socket goes back as it came (best effort: it is being closed
        // or handed back for frames).
        let _ = self.up.set_wake_at(1);
        if let Err(e) = self.write_piece().and_then(|_| self.hand_over_piece()) {
            result = result.and(Err(e));
        }
        Received {
            lent: self.lent,
            sink_failed: self.sink_failed,
            result,
        }
    }

    /// Everything before this offset was received.
    fn received(&self) -> u64 {
        match &self.piece {
            Some(p) => p.offset + p.filled as u64,
            None => self.lent.sink.position(),
        }
    }

    /// Notes a sink failure (the writer takes no more) and passes it on.
    fn sink_error(&mut self, e: Error) -> Error {
        self.sink_failed.get_or_insert_with(|| e.to_string());
        e
    }

    fn report(&mut self) {
        let upto = self.lent.sink.position();
        if upto > self.reported {
            self.reported = upto;
            (self.events)(RelayEvent::Written(upto));
        }
    }

    /// Writes the received and unwritten bytes of the buffer being filled:
    /// from here the downstream can be served them.
    /// Returns how many bytes it wrote.
    fn write_piece(&mut self) -> Result<usize, Error> {
        self.due = None;
        let Some(p) = self.piece.as_mut() else {
            return Ok(0);
        };
        if p.written == p.filled {
            return Ok(0);
        }
        let at = p.offset + p.written as u64;
        let bytes = &p.buf.payload(p.filled)[p.written..];
        self.last_write = bytes.len();
        let r = self.lent.sink.write_data(at, bytes);
        if let (Ok(()), Some(feeding)) = (&r, &self.feeding) {
            let header = RecordHeader {
                kind: RecordKind::Data,
                offset: at,
                len: bytes.len() as u64,
            };
            feeding.written(&header, bytes, !self.fast);
        }
        p.written = p.filled;
        r.map_err(|e| self.sink_error(e))?;
        self.report();
        Ok(self.last_write)
    }

    /// Passes the (written) buffer being filled on to the hasher.
    fn hand_over_piece(&mut self) -> Result<(), Error> {
        match self.piece.take() {
            Some(p) if p.filled > 0 => self.lent.hash(HashJob::Data {
                offset: p.offset,
                buf: p.buf,
                len: p.filled,
            }),
            Some(_) => {
                // Nothing in it (the stream stopped just as it was taken):
                // it leaves the pool's count, so the pool may make another.
                // Kept in the count, it would be lost with this thread, and
                // after a few such stops the next relay would wait forever
                // for a buffer.
                self.lent.pool.forget_one();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Waits for the upstream once a read found nothing there. While a
    /// piece is open, the socket wakes the thread only once enough has
    /// arrived: on a fast link [`WAKE_BATCH`] bytes, on a slow one what
    /// completes the piece (see [`Receiver::awaits_whole_piece`]); the piece's
    /// deadline catches the rest.
    fn wait(&mut self) -> Result<(), Error> {
        self.write_if_due()?;
        let lowat = if self.due.is_some() && self.fast {
            WAKE_BATCH
        } else if self.awaits_whole_piece() {
            self.forward_bytes.saturating_sub(self.unwritten()).max(1)
        } else {
            1
        };
        self.up.set_wake_at(lowat)?;
        // Readable or past the deadline: either way read what is there
        // first; the next read or wait writes the piece.
        self.up.wait(self.due)
    }

    /// On a slow link, once a piece is open, the thread is woken not per
    /// packet but once the piece is complete (by its bytes or its
    /// deadline), if what arrives meanwhile (about the last piece) fits
    /// half the socket's buffer: the sender never waits for the window.
    fn awaits_whole_piece(&self) -> bool {
        self.due.is_some() && !self.fast && self.pieces_fit()
    }

    /// Received bytes of the open piece not yet written.
    fn unwritten(&self) -> usize {
        self.piece.as_ref().map_or(0, |p| p.filled - p.written)
    }

    /// Counts `n` bytes just read toward the upstream's rate, and every
    /// [`RATE_WINDOW`] sets what completes a slow link's piece from it.
    fn measure_rate(&mut self, n: usize) {
        self.rate_bytes += n;
        let elapsed = self.rate_since.elapsed();
        if elapsed >= RATE_WINDOW {
            let per_piece =
                self.rate_bytes as f64 * FORWARD_AFTER.as_secs_f64() / elapsed.as_secs_f64();
            self.forward_bytes = (per_piece as usize).clamp(FORWARD_BYTES_MIN, BUF_SIZE);
            self.rate_bytes = 0;
            self.rate_since = std::time::Instant::now();
        }
    }

    /// A piece (the last one written) fits half the socket's buffer.
    fn pieces_fit(&self) -> bool {
        self.last_write <= self.calm_below
    }

    /// Writes the pending bytes once their deadline has passed. A deadline
    /// that comes before the buffer fills marks the link as slow.
    fn write_if_due(&mut self) -> Result<(), Error> {
        match self.due {
            Some(due) if std::time::Instant::now() >= due => {
                self.fast = false;
                self.write_slow_piece()
            }
            _ => Ok(()),
        }
    }

    /// Writes a slow link's piece (its deadline came, or it is complete).
    /// While bytes keep coming, the next piece's deadline starts at once,
    /// without waiting for its first byte: the thread is next woken by that
    /// piece's bytes or deadline, not also by its first packet.
    fn write_slow_piece(&mut self) -> Result<(), Error> {
        let wrote = self.write_piece()?;
        if wrote > 0 && self.pieces_fit() {
            self.due = Some(std::time::Instant::now() + FORWARD_DELAY);
        }
        Ok(())
    }

    /// Before each read: stops if the relay was dropped, and writes the
    /// pending bytes if their time has come while the upstream kept sending
    /// (reads go first and `poll` only when nothing is there, so a busy
    /// upstream never passes through [`Receiver::wait`]).
    fn before_read(&mut self) -> Result<(), Error> {
        if self.up.stopped.is_set() {
            return Err(relay_stopped());
        }
        self.write_if_due()
    }

    /// Reads an exact number of bytes outside the image (a record header).
    fn read_header(&mut self, at: u64) -> Result<RecordHeader, Error> {
        let mut hb = [0u8; RecordHeader::SIZE];
        let mut got = 0;
        while got < hb.len() {
            self.before_read()?;
            // On a slow link the header comes with what follows it.
            let read = if self.fast {
                self.up.read(&mut hb[got..])
            } else {
                self.up.read_through(&mut hb[got..])
            };
            match read {
                Ok(Some(0)) => return Err(Error::UpstreamClosed { at }),
                Ok(Some(n)) => got += n,
                Ok(None) => self.wait()?,
                Err(e) => return Err(read_error(e, at)),
            }
        }
        RecordHeader::decode(&hb).map_err(|error| Error::Record { at, error })
    }

    /// Reads `len` bytes of image data at the received position.
    fn read_data(&mut self, mut len: u64) -> Result<(), Error> {
        while len > 0 {
            let full = self.piece.as_ref().is_some_and(|p| p.filled == BUF_SIZE);
            if full {
                // Fast only if the whole buffer filled before a deadline:
                // on a slow link a buffer also fills, piece by piece.
                self.fast = self.piece.as_ref().is_some_and(|p| p.written == 0);
                self.write_piece()?;
                self.hand_over_piece()?;
            }
            if self.piece.is_none() {
                let offset = self.lent.sink.position();
                let buf = self.lent.pool.take(&self.up.stopped)?;
                self.piece = Some(Piece {
                    buf,
                    offset,
                    filled: 0,
                    written: 0,
                });
            }
            self.before_read()?;
            let p = self.piece.as_mut().expect("a piece to fill");
            let room = BUF_SIZE - p.filled;
            let want = len.min(room as u64) as usize;
            // On a slow link one read also takes what follows this record
            // (the next header, the start of the next payload): one system
            // call per wakeup instead of three. A fast link reads records
            // exactly, so no large payload is copied twice.
            let ask = if self.fast {
                want
            } else {
                room.min(want + READ_AHEAD)
            };
            let at = p.offset + p.filled as u64;
            let dst = &mut p.buf.payload_mut()[p.filled..p.filled + ask];
            match self.up.read_ahead(dst, want) {
                Ok(Some(0)) => return Err(Error::UpstreamClosed { at }),
                Ok(Some(n)) => {
                    p.filled += n;
                    len -= n as u64;
                    // One deadline per piece, set by its first byte (not one
                    // per read: a slow link delivers a packet per read).
                    if self.due.is_none() {
                        self.due = Some(std::time::Instant::now() + FORWARD_DELAY);
                    }
                    if !self.fast {
                        self.measure_rate(n);
                        if self.unwritten() >= self.forward_bytes {
                            self.write_slow_piece()?;
                            continue;
                        }
                    }
                    // The socket had no more: a thread that waits for a
                    // whole piece need not learn that by another read.
                    if self.up.drained && len > 0 && self.awaits_whole_piece() {
                        self.wait()?;
                    }
                }
                Ok(None) => self.wait()?,
                Err(e) => return Err(read_error(e, at)),
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<RelayEnd, Error> {
        loop {
            let at = self.received();
            let h = self.read_header(at)?;
            if h.offset != at {
                return Err(Error::OutOfOrder {
                    expected: at,
                    got: h.offset,
                });
            }
            match h.kind {
                RecordKind::Data => self.read_data(h.len)?,
                RecordKind::Zero => {
                    self.write_piece()?;
                    self.hand_over_piece()?;
                    let r = self.lent.sink.write_zero(h.offset, h.len);
                    r.map_err(|e| self.sink_error(e))?;
                    if let Some(feeding) = &self.feeding {
                        feeding.written(&h, &[], !self.fast);
                    }
                    self.report();
                    self.lent.hash(HashJob::Zero {
                        offset: h.offset,
                        len: h.len,
                    })?;
                }
                RecordKind::End => {
                    let size = h.offset;
                    self.write_piece()?;
                    self.hand_over_piece()?;
                    let r = self.lent.sink.finish(size);
                    r.map_err(|e| self.sink_error(e))?;
                    self.report();
                    let (reply, digest) = std_mpsc::channel();
                    self.lent.hash(HashJob::End { size, reply })?;
                    let digest = digest
                        .recv()
                        .map_err(|_| hasher_gone())?
                        .map_err(Error::WriterFailed)?;
                    return Ok(RelayEnd { size, digest });
                }
            }
        }
    }
}

fn read_error(e: std::io::Error, at: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::UpstreamClosed { at }
    } else {
        Error::io(format!("reading the upstream at offset {at}"), e)
    }
}
