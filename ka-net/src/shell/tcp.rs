//! Socket options that let heartbeats through a short outage.
//!
//! A node is declared dead after `dead_after` (1 s) without a word on its
//! control connection, and its heartbeats come every 250 ms. A link cut
//! for half a second must not make that silence: but TCP retransmits a
//! lost segment after its retransmission timeout (RTO, at least 200 ms on
//! Linux), then doubles the timeout at each loss, so a heartbeat caught in
//! a 500 ms cut came through only after 1.1 s in the lab, and behind a
//! port queue full of bulk data catching up after the cut, later still.
//!
//! A control connection is a *thin stream*: a few small messages in
//! flight, never a window full. For those Linux offers two remedies, set
//! on every connection while it carries messages ([`for_messages`]):
//!
//! - `TCP_THIN_LINEAR_TIMEOUTS`: the first six retransmissions of a thin
//!   stream keep the same timeout instead of doubling it, so the first one
//!   after the link comes back is at most one timeout away;
//! - `TCP_RTO_MIN_US` (Linux 6.15 and later): a lower floor on the timeout
//!   for this socket, [`MESSAGES_RTO_MIN`] (40 ms) instead of 200 ms; on a
//!   LAN the round trip is well under a millisecond, so the timeout is set
//!   by the floor and the queueing in front of the link.
//!
//! Linux counts a stream as thin only once it has left its initial slow
//! start, which a loss ends by setting the slow-start threshold; but BBR
//! (the default congestion control of many systems, this lab's among them)
//! keeps the threshold unset, so under BBR a control connection is never
//! thin and the first option does nothing. A connection carrying messages
//! therefore uses CUBIC (or Reno, which every kernel has): for a few small
//! messages the congestion control costs nothing, and it makes the stream
//! count as thin at its first loss.
//!
//! Together, six linear retransmissions span a 500 ms cut and the next
//! one is at most a timeout after it heals. A connection that turns into a
//! data connection gets the defaults back ([`for_bulk`]): a full window is
//! no thin stream, and a low floor there would only retransmit what a
//! queue merely delayed. A kernel without an option keeps its default;
//! nothing else depends on them.

use std::os::fd::RawFd;
use std::time::Duration;

/// The floor of the retransmission timeout on a connection carrying
/// messages (see the module docs): 100 ms, so that the six linear
/// retransmissions span more than a 500 ms cut, and two come within a
/// heartbeat of its end.
pub const MESSAGES_RTO_MIN: Duration = Duration::from_millis(100);

/// The congestion controls a connection carrying messages may use, in
/// order of preference (see the module docs).
const MESSAGES_CONGESTION: [&[u8]; 2] = [b"cubic", b"reno"];

/// The system's congestion control, as the first socket had it, which
/// bulk connections get back.
static BULK_CONGESTION: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();

/// Linux's default floor of the retransmission timeout (`TCP_RTO_MIN`).
const DEFAULT_RTO_MIN: Duration = Duration::from_millis(200);

/// `TCP_RTO_MIN_US` from Linux's `include/uapi/linux/tcp.h` (6.15), which
/// the libc crate does not name yet.
const TCP_RTO_MIN_US: libc::c_int = 45;

/// Sets the options of a connection carrying control messages and
/// heartbeats (see the module docs).
pub fn for_messages(fd: RawFd) {
    BULK_CONGESTION.get_or_init(|| congestion(fd));
    if !MESSAGES_CONGESTION.iter().any(|cc| set_congestion(fd, cc)) {
        tracing::debug!("cannot choose the congestion control of a control connection");
    }
    set(
        fd,
        libc::TCP_THIN_LINEAR_TIMEOUTS,
        1,
        "linear retransmission timeouts",
    );
    let floor = MESSAGES_RTO_MIN.as_micros() as libc::c_int;
    set(
        fd,
        TCP_RTO_MIN_US,
        floor,
        "a lower retransmission timeout floor",
    );
}

/// Gives a connection that now carries bulk data the defaults back.
pub fn for_bulk(fd: RawFd) {
    if let Some(Some(cc)) = BULK_CONGESTION.get() {
        set_congestion(fd, cc);
    }
    set(
        fd,
        libc::TCP_THIN_LINEAR_TIMEOUTS,
        0,
        "exponential retransmission timeouts",
    );
    let floor = DEFAULT_RTO_MIN.as_micros() as libc::c_int;
    set(
        fd,
        TCP_RTO_MIN_US,
        floor,
        "the default retransmission timeout floor",
    );
}

/// The floor of the retransmission timeout of socket `fd`, if the kernel
/// says (for tests).
pub fn rto_min(fd: RawFd) -> Option<Duration> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a socket the caller holds open; the kernel writes at
    // most `len` bytes into `value`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_RTO_MIN_US,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| Duration::from_micros(value as u64))
}

/// The congestion control of socket `fd`, by name.
pub fn congestion(fd: RawFd) -> Option<Vec<u8>> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `fd` is a socket the caller holds open; the kernel writes at
    // most `len` bytes into `name`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0).then(|| {
        let name = &name[..len as usize];
        name.split(|&b| b == 0).next().unwrap_or(name).to_vec()
    })
}

/// Makes socket `fd` use the congestion control `name`; whether it could.
fn set_congestion(fd: RawFd, name: &[u8]) -> bool {
    // SAFETY: `fd` is a socket the caller holds open; the kernel reads
    // `name.len()` bytes of `name`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    r == 0
}

fn set(fd: RawFd, option: libc::c_int, value: libc::c_int, what: &str) {
    // SAFETY: `fd` is a socket the caller holds open; the value is a plain
    // int whose size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // An older kernel: its default is all there is.
        let e = std::io::Error::last_os_error();
        tracing::debug!(error = %e, "cannot set {what} on a connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_message_connection_gets_a_low_timeout_floor_and_a_data_one_the_default() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let Some(default) = rto_min(s.as_raw_fd()) else {
            eprintln!("this kernel has no TCP_RTO_MIN_US (before 6.15): nothing to check");
            return;
        };
        assert_eq!(default, DEFAULT_RTO_MIN);
        let system = congestion(s.as_raw_fd()).expect("a congestion control");
        for_messages(s.as_raw_fd());
        assert_eq!(rto_min(s.as_raw_fd()), Some(MESSAGES_RTO_MIN));
        let chosen = congestion(s.as_raw_fd()).unwrap();
        assert!(
            MESSAGES_CONGESTION.contains(&chosen.as_slice()),
            "{chosen:?}"
        );
        for_bulk(s.as_raw_fd());
        assert_eq!(rto_min(s.as_raw_fd()), Some(DEFAULT_RTO_MIN));
        assert_eq!(congestion(s.as_raw_fd()), Some(system));
    }
}
