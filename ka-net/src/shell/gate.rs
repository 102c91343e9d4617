//! What an unauthenticated peer may hold, and how long.
//!
//! Anyone who can reach a listener can open connections to it. Until a
//! connection has answered its challenge it is a stranger's, and the bounds
//! here keep strangers from holding a process's memory, descriptors or
//! attention:
//!
//! - **A handshake timeout** ([`HANDSHAKE_TIMEOUT`], 5 s): an accepted
//!   connection that has not sent its first message by then is closed. A
//!   node answers a challenge within one round trip; the protocol declares a
//!   silent *member* dead after `dead_after` (1 s by default, four missed
//!   250 ms heartbeats), so 5 s is five times what the chain tolerates from a
//!   node it knows, room for a loaded machine, and still short enough that
//!   idle connections cannot pile up.
//! - **A small first message** ([`FIRST_MESSAGE_MAX`], 4 KiB): before the
//!   first message a connection may not announce a frame longer than the
//!   longest first message the protocol has (a join: two strings of at most
//!   [`MAX_STRING`] and a few fixed fields), so a stranger's partial frame
//!   holds a read buffer of a few KiB, not [`MAX_FRAME`].
//! - **Caps on unanswered connections** ([`MAX_UNANSWERED_PER_IP`] = 64 per
//!   peer address, [`MAX_UNANSWERED`] = 512 in all): a connection beyond
//!   them is closed at once, unread. A connection leaves the count with its
//!   first message (which the machine either accepts, proving its key, or
//!   refuses and closes), so nodes' control and data connections, once
//!   established, never count, and a legitimate join waits for one round
//!   trip only. Even a whole cluster rebooting behind one address rarely has
//!   64 handshakes in the same round trip, and one address alone cannot fill
//!   the total; 512 strangers hold at most 512 descriptors and about 512 ×
//!   8 KiB of buffers, well inside the default 1024-descriptor limit once the
//!   process's own files are counted.
//! - **Accept errors are survived**: out of descriptors (`EMFILE`,
//!   `ENFILE`), of buffers (`ENOBUFS`) or anything else, the listener pauses
//!   for [`ACCEPT_BACKOFF`] and tries again; a session never ends because a
//!   connection could not be accepted, and a process that cannot accept does
//!   not spin.
//!
//! - **Refusals are logged with the peer's address, and not too often**
//!   ([`RefusalLog`]): at most [`REFUSALS_LOGGED_PER_SEC`] lines a second;
//!   the rest are counted, and the count is logged once the second is over,
//!   so a flood of bad joins neither floods the log nor goes unseen.
//! - **The descriptor limit is raised at start** ([`raise_descriptor_limit`]):
//!   the soft `RLIMIT_NOFILE` (1024 on most systems) goes up to the hard
//!   limit (often 524288), which only the administrator set, so a source
//!   feeding hundreds of nodes or a node under a flood runs out of
//!   descriptors as late as the system allows.
//!
//! Finished connection tasks are reaped as they end (the drivers keep them
//! in a [`tokio::task::JoinSet`]), so connections that come and go cost
//! nothing once gone.
//!
//! [`MAX_STRING`]: ka_core::codec::MAX_STRING
//! [`MAX_FRAME`]: ka_core::codec::MAX_FRAME

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ka_core::ids::ConnId;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// How long an accepted connection has to send its first message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest frame (length prefix excluded) an accepted connection may
/// announce before its first message: a join with both strings at
/// [`ka_core::codec::MAX_STRING`] takes under 2.3 KiB.
pub const FIRST_MESSAGE_MAX: usize = 4 * 1024;

/// Unanswered connections allowed from one peer address.
pub const MAX_UNANSWERED_PER_IP: u32 = 64;

/// Unanswered connections allowed in all.
pub const MAX_UNANSWERED: usize = 512;

/// How long a listener pauses after an accept error before it tries again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Refusal lines logged in any one second; more are counted, not logged.
pub const REFUSALS_LOGGED_PER_SEC: u32 = 5;

/// The log of refused peers: each refusal with the peer's address, at most
/// [`REFUSALS_LOGGED_PER_SEC`] a second, then how many were left out.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// When the current one-second window opened.
    window: Option<Instant>,
    /// Lines logged in it.
    logged: u32,
    /// Refusals left out of the log since the last line about them.
    suppressed: u64,
}

impl RefusalLog {
    /// Notes that `peer` (if known) was refused for `reason` at `now`;
    /// returns whether it was logged (else only counted).
    pub fn note(&mut self, now: Instant, peer: Option<SocketAddr>, reason: &str) -> bool {
        self.flush(now);
        if self.logged >= REFUSALS_LOGGED_PER_SEC {
            self.suppressed += 1;
            return false;
        }
        self.logged += 1;
        let peer = peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
        tracing::warn!("refused {peer}: {reason}");
        true
    }

    /// Opens a new window once a second has passed, first logging how many
    /// refusals the last one left out. Call it now and then (the drivers do
    /// at every turn of their loop) so a flood that stops is still counted.
    pub fn flush(&mut self, now: Instant) {
        let Some(opened) = self.window else {
            self.window = Some(now);
            return;
        };
        if now.saturating_duration_since(opened) < Duration::from_secs(1) {
            return;
        }
        if self.suppressed > 0 {
            tracing::warn!(
                "refused {} more connection(s) not logged one by one (at most {REFUSALS_LOGGED_PER_SEC} refusals are logged a second)",
                self.suppressed
            );
        }
        self.window = Some(now);
        self.logged = 0;
        self.suppressed = 0;
    }

    /// Refusals counted but not yet logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Counts the accepted connections that have not yet sent a first message,
/// per peer address and in all, and says whether one more may be admitted.
#[derive(Debug, Default)]
pub struct Gate {
    unanswered: HashMap<ConnId, IpAddr>,
    per_ip: HashMap<IpAddr, u32>,
    /// When the listener may accept again after an error.
    paused_until: Option<Instant>,
}

impl Gate {
    /// Whether a new connection from `peer` may be admitted; a refused one
    /// is to be dropped unread.
    pub fn admits(&self, peer: &SocketAddr) -> bool {
        self.unanswered.len() < MAX_UNANSWERED
            && self.per_ip.get(&peer.ip()).copied().unwrap_or(0) < MAX_UNANSWERED_PER_IP
    }

    /// Counts `conn`, admitted from `peer`, until it answers or closes.
    pub fn admitted(&mut self, conn: ConnId, peer: &SocketAddr) {
        let ip = peer.ip();
        self.unanswered.insert(conn, ip);
        *self.per_ip.entry(ip).or_default() += 1;
    }

    /// `conn` sent its first message or closed: it no longer counts.
    pub fn settled(&mut self, conn: ConnId) {
        let Some(ip) = self.unanswered.remove(&conn) else {
            return;
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// How many connections are unanswered.
    #[cfg(test)]
    fn unanswered(&self) -> usize {
        self.unanswered.len()
    }

    /// Waits until the listener may accept, then accepts one connection.
    /// Cancel-safe, so a driver can `select!` on it; the pause after an
    /// error is kept across calls.
    pub async fn accept(&self, listener: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
        if let Some(t) = self.paused_until {
            tokio::time::sleep_until(t).await;
        }
        listener.accept().await
    }

    /// Takes the result of [`Gate::accept`]: the stream and its peer when
    /// it may be admitted; after an error, pauses the listener for
    /// [`ACCEPT_BACKOFF`] (the error stays pending in the kernel, so trying
    /// again at once would spin).
    pub fn accepted(
        &mut self,
        result: std::io::Result<(TcpStream, SocketAddr)>,
    ) -> Option<(TcpStream, SocketAddr)> {
        match result {
            Ok((stream, peer)) => {
                self.paused_until = None;
                if self.admits(&peer) {
                    Some((stream, peer))
                } else {
                    tracing::debug!(%peer, "too many unanswered connections: closing a new one");
                    None
                }
            }
            Err(e) => {
                if self.paused_until.is_none() {
                    tracing::warn!(error = %e, "cannot accept a connection; trying again shortly");
                }
                self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                None
            }
        }
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// and returns the new soft limit (see the module docs). Call it once at
/// start, before anything opens sockets.
pub fn raise_descriptor_limit() -> nix::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn one_address_fills_its_own_cap_only() {
        let mut g = Gate::default();
        for i in 0..u64::from(MAX_UNANSWERED_PER_IP) {
            let a = addr([10, 0, 0, 1], i as u16);
            assert!(g.admits(&a));
            g.admitted(ConnId(i), &a);
        }
        assert!(!g.admits(&addr([10, 0, 0, 1], 9)));
        assert!(g.admits(&addr([10, 0, 0, 2], 9)));
        g.settled(ConnId(0));
        g.settled(ConnId(0));
        assert!(g.admits(&addr([10, 0, 0, 1], 9)));
        assert_eq!(g.unanswered(), MAX_UNANSWERED_PER_IP as usize - 1);
    }

    #[test]
    fn a_flood_of_refusals_logs_a_few_lines_a_second_and_counts_the_rest() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let peer = Some(addr([10, 0, 0, 9], 4000));
        let logged = (0..1000)
            .filter(|i| log.note(t0 + Duration::from_micros(*i), peer, "secret"))
            .count();
        assert_eq!(logged, REFUSALS_LOGGED_PER_SEC as usize);
        assert_eq!(log.suppressed(), 1000 - u64::from(REFUSALS_LOGGED_PER_SEC));
        // Within the second, nothing more; after it, the count goes out and
        // refusals are logged again.
        log.flush(t0 + Duration::from_millis(900));
        assert!(log.suppressed() > 0);
        log.flush(t0 + Duration::from_millis(1001));
        assert_eq!(log.suppressed(), 0);
        assert!(log.note(t0 + Duration::from_millis(1002), None, "secret"));
    }

    #[test]
    fn the_total_cap_holds_across_addresses() {
        let mut g = Gate::default();
        for i in 0..MAX_UNANSWERED as u64 {
            let a = addr([10, 0, (i / 200) as u8, (i % 200) as u8], 1);
            g.admitted(ConnId(i), &a);
        }
        assert!(!g.admits(&addr([10, 1, 0, 1], 1)));
        for i in 0..MAX_UNANSWERED as u64 {
            g.settled(ConnId(i));
        }
        assert_eq!(g.unanswered(), 0);
        assert!(g.per_ip.is_empty());
    }
}
