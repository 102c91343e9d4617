//! The async shell: drives the ka-core machines over tokio sockets and the data path.
//!
//! One *driver* owns each machine: [`serve`] the source's, [`join`] the
//! node's. A driver is a struct whose fields are the shell's state beside
//! the machine (connections, the node's writer and who holds it, durable
//! records, pacing) and whose methods are its inputs; its loop `select!`s
//! over its connections' events, the data path's progress,
//! `sleep_until(poll_timeout)` and new connections, as quinn's connection
//! driver does, and [`run_source`] and [`run_node`] build it and run that
//! loop. Every TCP connection has its own task ([`conn`]): it writes
//! the frames the machine transmits, reads the peer's frames while the
//! connection is a conversation, and, once the machine turns it into a data
//! connection, hands the raw socket to the data path (sending records to a
//! downstream, or receiving them into the node's writer).
//!
//! A process listens on one port: every connection starts with the
//! acceptor's challenge, and the first answer says whether it is a node's
//! control connection, a downstream's data connection or an operator's go.
//!
//! Until that first answer a connection is a stranger's, and [`gate`] bounds
//! what strangers may hold: a 5 s handshake timeout, a 4 KiB first message,
//! at most 64 unanswered connections per peer address and 512 in all
//! (more are closed unread), and a listener that pauses 100 ms after an
//! accept error (out of descriptors, say) rather than ending the session or
//! spinning; every refusal is logged with the peer's address, a few lines a
//! second at most. Connection tasks are reaped as they end, so connections
//! that come and go cost nothing once gone. While a connection carries
//! messages, [`tcp`] keeps its retransmissions linear and quick, so a
//! heartbeat caught in a short outage comes through soon after it.

pub mod conn;
pub mod discovery;
pub mod gate;
pub mod join;
pub mod key;
pub mod resume;
pub mod serve;
pub mod spool;
pub mod tcp;
pub mod wire;

use std::time::Instant;

use ka_core::time::Time;

pub use join::{report_join_failed, run_node, NodeOptions, NodeOutcome, Target};
pub use key::{
    load_key_file, load_or_generate_secret, session_key, KeyFile, NodeKey, Secret, SessionKey,
};
pub use serve::{go, run_source, ImageInput, SourceOptions, SourceReport};

/// The clock of a driver: nanoseconds since the driver started, as ka-core's [`Time`].
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    /// The time now.
    pub fn now(&self) -> Time {
        Time::from_nanos(self.0.elapsed().as_nanos() as u64)
    }

    /// The instant of a core deadline, for `sleep_until`.
    pub fn instant(&self, t: Time) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0) + std::time::Duration::from_nanos(t.as_nanos())
    }
}

/// A fresh unpredictable nonce for either side of a handshake, or a source's run.
pub fn nonce() -> ka_core::codec::Nonce {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).expect("the OS random source is available");
    ka_core::codec::Nonce(n)
}
