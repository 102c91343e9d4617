//! A read-only TFTP server for network boot.
//!
//! It serves the files of one directory (pxelinux.0, ldlinux.c32, kernels,
//! initramfs, iPXE binaries) plus files generated per request by a
//! [`GeneratedFiles`] provider — in ka, the per-node pxelinux configs and iPXE
//! scripts rendered from the inventory and the current boot modes. Generated
//! files are never written to disk, so a mode change is served on the very
//! next request.
//!
//! Safety: write requests are refused; a requested path must be relative and
//! free of `..`, and after symlinks are resolved it must still lie inside the
//! root, so nothing outside the root can be read.
//!
//! Options: `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349), and
//! `windowsize` (RFC 7440) are granted within limits; ka reports every
//! file's size, so `tsize` always works.
//!
//! Abuse: TFTP has no authentication and a request needs no reply, so a
//! request may come from a forged address. Each transfer therefore holds
//! little and not for long: at most one window of memory (bounded in bytes),
//! a window only in answer to an ACK, single-block retransmissions to a
//! client that went quiet, a bounded number of them, a capped negotiated
//! timeout and a total lifetime; transfers are capped in total and per
//! client address, and requests beyond the caps are dropped unanswered so
//! that a real client simply retries. See [`TftpConfig`] for the limits.
//!
//! A flood of requests from many forged addresses must not crowd out the
//! machines really booting. A client whose transfer has been acknowledged
//! at least once is *proven* (it receives at its address) and stays known
//! for [`KNOWN_CLIENT_FOR`]. Requests from clients not known are held to
//! a rate of new transfers, per address and in all, and their transfers
//! to at most half the table, until their first ACK; a known client's
//! request passes those limits (only the caps on transfers at once apply),
//! so a node that fetched its boot loader gets its kernel and initramfs
//! however many forged requests arrive meanwhile, and a transfer once
//! started is never evicted.
//!
//! The server is ka's own (a small RRQ-only sender on tokio) rather than the
//! `async-tftp` crate it replaces: that crate has no caps on transfers, no
//! lifetime, accepts any timeout and window, and resends a whole window on
//! every timeout, and ka needs none of its write or executor machinery.

pub(crate) mod packet;
pub(crate) mod transfer;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use packet::{ErrorCode, Packet, Request};
use transfer::{Limits, Outcome, Source};

pub use transfer::MAX_WINDOW_BYTES;

/// What a [`GeneratedFiles`] provider makes of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    /// Not one of its names: serve the file from the root.
    FromRoot,
    /// This content.
    File(Vec<u8>),
    /// Refused, for the reason given (logged; the client hears only "access
    /// violation"), and nothing is read from the root: a name that is the
    /// provider's to answer (a node's key, say) is never served from disk.
    Refused(String),
}

impl From<Option<Vec<u8>>> for Generated {
    fn from(content: Option<Vec<u8>>) -> Generated {
        content.map_or(Generated::FromRoot, Generated::File)
    }
}

/// Files a TFTP server generates instead of reading them from its root.
pub trait GeneratedFiles: Send + Sync + 'static {
    /// What to answer for `path` (relative, `/`-separated, already checked
    /// to be free of `..`) asked for by `client`.
    fn generate(&self, path: &str, client: SocketAddr) -> Generated;
}

impl<F> GeneratedFiles for F
where
    F: Fn(&str, SocketAddr) -> Generated + Send + Sync + 'static,
{
    fn generate(&self, path: &str, client: SocketAddr) -> Generated {
        self(path, client)
    }
}

/// No generated files: a plain read-only directory server.
pub fn no_generated_files() -> Arc<dyn GeneratedFiles> {
    Arc::new(|_: &str, _: SocketAddr| Generated::FromRoot)
}

/// How to run the server, and the limits that keep unauthenticated clients
/// from holding memory, sockets or bandwidth.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Address to listen on; port 69 is the TFTP port.
    pub listen: SocketAddr,
    /// Directory served.
    pub root: PathBuf,
    /// Retransmission timeout when the client does not negotiate one.
    pub timeout: Duration,
    /// Largest `timeout` option accepted, in seconds (default 5); a larger
    /// one is declined and [`TftpConfig::timeout`] applies, so a client
    /// cannot make a transfer linger between retransmissions.
    pub max_client_timeout: u8,
    /// Largest block size granted (default 1468: the largest that fits an
    /// Ethernet frame unfragmented, and what U-Boot asks for; iPXE asks
    /// 1432, pxelinux 1408).
    pub block_size_limit: u16,
    /// Largest window granted (default 16). PXE ROMs, iPXE and pxelinux do
    /// not ask for windows; UEFI asks for 4, atftp for what it is told. A
    /// window is also capped at [`MAX_WINDOW_BYTES`].
    pub window_size_limit: u16,
    /// Timeouts in a row after which a silent client is dropped (default 5;
    /// at most 2 for a client that never acknowledged anything, whose
    /// request may be forged).
    pub retries: u32,
    /// Longest a transfer may take from request to last ACK (default 600 s:
    /// a 64 MiB initramfs in 512-byte lockstep blocks over a 2 ms round
    /// trip takes about 260 s).
    pub lifetime: Duration,
    /// Most transfers at once (default 256; each holds one socket, one open
    /// file and at most one window).
    pub max_transfers: usize,
    /// Most transfers at once from one IP address (default 8: a booting
    /// machine fetches one file at a time).
    pub max_transfers_per_client: usize,
    /// Most transfers at once not yet acknowledged by clients not known
    /// (default half of `max_transfers`): a flood of forged requests holds
    /// at most these, and the rest of the table stays for proven clients.
    pub max_unproven_transfers: usize,
    /// New transfers a second for clients not known, in all (default 50,
    /// in bursts of as many): forged requests can take only so many slots
    /// a second, each for a few seconds.
    pub new_transfers_per_sec: u32,
    /// New transfers a second for one client not known (default 10, in
    /// bursts of 20: pxelinux asks for a dozen config names in a row).
    pub new_transfers_per_client_per_sec: u32,
}

/// How long a client stays known after its last acknowledged transfer
/// (see the module docs): longer than a node takes from its boot loader
/// to its initramfs.
pub const KNOWN_CLIENT_FOR: Duration = Duration::from_secs(600);

/// Most clients remembered as known; the one seen longest ago makes room.
const MAX_KNOWN_CLIENTS: usize = 4096;

/// Most per-address rate buckets kept; past it, an address without one is
/// held to the total rate only (a flood from forged addresses cannot grow
/// the table without bound).
const MAX_RATED_CLIENTS: usize = 4096;

impl TftpConfig {
    /// Defaults for serving `root` on `listen`.
    pub fn new(listen: SocketAddr, root: impl Into<PathBuf>) -> TftpConfig {
        TftpConfig {
            listen,
            root: root.into(),
            timeout: Duration::from_secs(2),
            max_client_timeout: 5,
            block_size_limit: 1468,
            window_size_limit: 16,
            retries: 5,
            lifetime: Duration::from_secs(600),
            max_transfers: 256,
            max_transfers_per_client: 8,
            max_unproven_transfers: 128,
            new_transfers_per_sec: 50,
            new_transfers_per_client_per_sec: 10,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            timeout: self.timeout,
            max_client_timeout: self.max_client_timeout,
            block_size: self.block_size_limit,
            window_size: self.window_size_limit,
            retries: self.retries,
            lifetime: self.lifetime,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The root is not a readable directory.
    #[error("TFTP root {}: {source} (create it or point boot.tftp_root at it)", path.display())]
    Root {
        /// The root given.
        path: PathBuf,
        /// Why it is unusable.
        source: std::io::Error,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source} (port 69 needs root or CAP_NET_BIND_SERVICE; is another TFTP server running?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The listening socket failed while running.
    #[error("TFTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// A bound, not yet running TFTP server.
pub struct TftpServer {
    socket: UdpSocket,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// What every transfer task reads.
struct Shared {
    /// Canonical root: every served file must resolve inside it.
    root: PathBuf,
    /// The listening address: transfers answer from it too, so replies
    /// leave by the interface the request came to.
    local_ip: IpAddr,
    generated: Arc<dyn GeneratedFiles>,
    limits: Limits,
    max_transfers: usize,
    max_per_client: usize,
    max_unproven: usize,
    /// New transfers a second for clients not known: in all, per client.
    rate: f64,
    rate_per_client: f64,
    /// Transfers in progress.
    table: Mutex<Table>,
}

/// Transfers in progress, by client, and what the server knows of clients.
#[derive(Default)]
struct Table {
    /// Client endpoints (address and port: the client's transfer ID) with
    /// a transfer; a retransmitted request for one is a duplicate.
    peers: std::collections::HashSet<SocketAddr>,
    /// Transfers per client IP address.
    per_ip: HashMap<IpAddr, usize>,
    /// Transfers of clients not known that no ACK has proven yet.
    unproven: usize,
    /// Clients proven by an ACK, and when last.
    known: HashMap<IpAddr, Instant>,
    /// The rate of new transfers of clients not known, in all.
    bucket: Option<Bucket>,
    /// The rate of new transfers of each client not known.
    buckets: HashMap<IpAddr, Bucket>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Refills for the time since the last take, then takes a token if
    /// there is one.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether it would be full again by `now` (so forgetting it changes
    /// nothing).
    fn refilled(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= burst
    }
}

/// A place in [`Table`], given back when the transfer task ends however it
/// ends.
struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Counted among the unproven transfers until its first ACK.
    unproven: bool,
}

impl Slot {
    /// The client acknowledged a packet: it receives at its address. It is
    /// known from now on, and its transfer no longer counts as unproven.
    fn proven(&mut self) {
        let mut t = self.shared.table.lock().expect("tftp table lock");
        if self.unproven {
            self.unproven = false;
            t.unproven -= 1;
        }
        let now = Instant::now();
        if t.known.len() >= MAX_KNOWN_CLIENTS && !t.known.contains_key(&self.peer.ip()) {
            let oldest = t.known.iter().min_by_key(|(_, &at)| at).map(|(&ip, _)| ip);
            if let Some(ip) = oldest {
                t.known.remove(&ip);
            }
        }
        t.known.insert(self.peer.ip(), now);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.shared.table.lock().expect("tftp table lock");
        if self.unproven {
            t.unproven -= 1;
        }
        t.peers.remove(&self.peer);
        if let Some(n) = t.per_ip.get_mut(&self.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.peer.ip());
            }
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The same client endpoint already has a transfer (a retransmitted
    /// request).
    Duplicate,
    /// [`TftpConfig::max_transfers`] reached.
    Full,
    /// [`TftpConfig::max_transfers_per_client`] reached.
    ClientFull,
    /// [`TftpConfig::max_unproven_transfers`] reached, and the client is
    /// not known.
    UnprovenFull,
    /// [`TftpConfig::new_transfers_per_sec`] reached, and the client is
    /// not known.
    RateLimited,
    /// [`TftpConfig::new_transfers_per_client_per_sec`] reached, and the
    /// client is not known.
    ClientRateLimited,
}

impl Shared {
    /// Takes a place for `peer` at `now`, or says why not.
    fn admit(self: &Arc<Self>, peer: SocketAddr, now: Instant) -> Result<Slot, Refusal> {
        let mut guard = self.table.lock().expect("tftp table lock");
        let t = &mut *guard;
        if t.peers.contains(&peer) {
            return Err(Refusal::Duplicate);
        }
        if t.peers.len() >= self.max_transfers {
            return Err(Refusal::Full);
        }
        if t.per_ip.get(&peer.ip()).copied().unwrap_or(0) >= self.max_per_client {
            return Err(Refusal::ClientFull);
        }
        let ip = peer.ip();
        let known = t
            .known
            .get(&ip)
            .is_some_and(|&at| now.saturating_duration_since(at) < KNOWN_CLIENT_FOR);
        if !known {
            t.known.remove(&ip);
            if t.unproven >= self.max_unproven {
                return Err(Refusal::UnprovenFull);
            }
            let (rate, burst) = (self.rate, self.rate.max(1.0));
            let (per_rate, per_burst) =
                (self.rate_per_client, (2.0 * self.rate_per_client).max(1.0));
            if t.buckets.len() >= MAX_RATED_CLIENTS {
                t.buckets
                    .retain(|_, b| !b.refilled(per_rate, per_burst, now));
            }
            let own = t.buckets.len() < MAX_RATED_CLIENTS || t.buckets.contains_key(&ip);
            if own {
                let b = t
                    .buckets
                    .entry(ip)
                    .or_insert_with(|| Bucket::full(per_burst, now));
                if !b.take(per_rate, per_burst, now) {
                    return Err(Refusal::ClientRateLimited);
                }
            }
            let total = t.bucket.get_or_insert_with(|| Bucket::full(burst, now));
            if !total.take(rate, burst, now) {
                return Err(Refusal::RateLimited);
            }
            t.unproven += 1;
        }
        *t.per_ip.entry(ip).or_insert(0) += 1;
        t.peers.insert(peer);
        Ok(Slot {
            shared: self.clone(),
            peer,
            unproven: !known,
        })
    }
}

impl TftpServer {
    /// Binds the socket and checks the root; [`TftpServer::serve`] runs it.
    /// Must be called within a tokio runtime.
    pub async fn bind(
        config: TftpConfig,
        generated: Arc<dyn GeneratedFiles>,
    ) -> Result<TftpServer, TftpError> {
        let root = std::fs::canonicalize(&config.root).map_err(|source| TftpError::Root {
            path: config.root.clone(),
            source,
        })?;
        if !root.is_dir() {
            return Err(TftpError::Root {
                path: config.root,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let bind_err = |source| TftpError::Bind {
            addr: config.listen,
            source,
        };
        let socket = UdpSocket::bind(config.listen).await.map_err(bind_err)?;
        let addr = socket.local_addr().map_err(bind_err)?;
        Ok(TftpServer {
            socket,
            addr,
            shared: Arc::new(Shared {
                root,
                local_ip: addr.ip(),
                generated,
                limits: config.limits(),
                max_transfers: config.max_transfers.max(1),
                max_per_client: config.max_transfers_per_client.max(1),
                max_unproven: config.max_unproven_transfers.max(1),
                rate: f64::from(config.new_transfers_per_sec.max(1)),
                rate_per_client: f64::from(config.new_transfers_per_client_per_sec.max(1)),
                table: Mutex::new(Table::default()),
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves requests until the listening socket fails. Each transfer runs
    /// in its own task with its own socket, so clients do not wait on each
    /// other.
    pub async fn serve(self) -> Result<(), TftpError> {
        // Requests are short; a longer datagram is truncated, loses its
        // final NUL and is dropped as malformed.
        let mut buf = [0u8; 1024];
        let mut refused = RefusalLog::default();
        loop {
            let (n, peer) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                // An ICMP error for an earlier reply is reported on some
                // systems as a failed receive; it is not the listener's fault.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(Packet::Request(req)) = packet::parse(&buf[..n]) else {
                continue;
            };
            if req.write {
                tracing::warn!(client = %peer, path = req.filename, "TFTP write refused: the server is read-only");
                let reply = packet::error(ErrorCode::NotDefined, "read-only server");
                // A one-packet answer no larger than the request: no leverage.
                let _ = self.socket.send_to(&reply, peer).await;
                continue;
            }
            match self.shared.admit(peer, Instant::now()) {
                Ok(slot) => {
                    tokio::spawn(transfer(self.shared.clone(), slot, req));
                }
                Err(Refusal::Duplicate) => {}
                // Dropped unanswered: a real client retries its request, a
                // forged one costs nothing more.
                Err(why) => refused.note(peer, why),
            }
        }
    }
}

/// Logs refused requests at most once per 10 s, so a flood cannot flood the
/// log too.
#[derive(Default)]
struct RefusalLog {
    since: Option<Instant>,
    count: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, why: Refusal) {
        self.count += 1;
        let now = Instant::now();
        if self
            .since
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            tracing::warn!(
                client = %peer,
                ?why,
                refused = self.count,
                "TFTP requests dropped: too many transfers at once, or new ones a second from clients not yet known (raise --max-transfers or --max-transfers-per-client if these are real clients)"
            );
            self.since = Some(now);
            self.count = 0;
        }
    }
}

/// Runs one read transfer for `req` from `slot.peer`.
async fn transfer(shared: Arc<Shared>, mut slot: Slot, req: Request) {
    let peer = slot.peer;
    let deadline = Instant::now() + shared.limits.lifetime;
    // A new port per transfer (the server's transfer ID) on the listening
    // address, connected so the kernel drops datagrams from anyone but the
    // client.
    let socket = match UdpSocket::bind(SocketAddr::new(shared.local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(client = %peer, error = %e, "TFTP: cannot open a transfer socket");
            return;
        }
    };
    if let Err(e) = socket.connect(peer).await {
        tracing::warn!(client = %peer, error = %e, "TFTP: cannot reach the client");
        return;
    }
    let path = req.filename.clone();
    let opened = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || open(&shared, &path, peer)).await
    };
    let (source, size) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err((code, msg))) => {
            let _ = socket.send(&packet::error(code, msg)).await;
            return;
        }
        Err(e) => {
            tracing::error!(client = %peer, error = %e, "TFTP: opening the file failed");
            return;
        }
    };
    let plan = transfer::negotiate(&req.options, &shared.limits, size);
    let started = Instant::now();
    let mut first_ack = || {
        if slot.unproven {
            slot.proven();
        }
    };
    let outcome = transfer::send(
        &socket,
        &source,
        size,
        &plan,
        &shared.limits,
        deadline,
        &mut first_ack,
    )
    .await;
    // A client that took a whole file is known from its last ACK on.
    if matches!(outcome, Outcome::Done) {
        slot.proven();
    }
    let secs = started.elapsed().as_secs_f64();
    let path = &req.filename;
    match outcome {
        Outcome::Done => tracing::debug!(client = %peer, path, secs, "TFTP sent"),
        Outcome::ClientError(msg) => {
            tracing::info!(client = %peer, path, msg, "TFTP transfer ended by the client")
        }
        Outcome::Silent => tracing::info!(client = %peer, path, "TFTP client stopped answering"),
        Outcome::TooLong => {
            tracing::warn!(client = %peer, path, secs, "TFTP transfer stopped at its time limit")
        }
        Outcome::Io(e) => tracing::info!(client = %peer, path, error = %e, "TFTP transfer failed"),
    }
    // The socket and the file go before the place in the table, so what
    // the table admits bounds the descriptors held.
    drop((socket, source));
    drop(slot);
}

/// Opens what `path` names for `client`: a generated file, or a file under
/// the root. Runs on the blocking pool (file system and provider).
fn open(
    shared: &Shared,
    path: &str,
    client: SocketAddr,
) -> Result<(Source, u64), (ErrorCode, &'static str)> {
    let rel = clean_path(Path::new(path)).map_err(|why| {
        tracing::warn!(%client, path, why, "TFTP request refused");
        (ErrorCode::AccessViolation, "access violation")
    })?;
    match shared.generated.generate(&rel, client) {
        Generated::File(data) => {
            tracing::info!(%client, path = rel, bytes = data.len(), "TFTP generated");
            let len = data.len() as u64;
            return Ok((Source::Memory(data), len));
        }
        Generated::Refused(why) => {
            tracing::warn!(%client, path = rel, %why, "TFTP request refused");
            return Err((ErrorCode::AccessViolation, "access violation"));
        }
        Generated::FromRoot => {}
    }
    match open_inside(&shared.root, &rel) {
        Ok((file, len)) => {
            tracing::info!(%client, path = rel, bytes = len, "TFTP file");
            Ok((Source::File(Arc::new(file)), len))
        }
        Err(e) => {
            tracing::info!(%client, path, error = ?e, "TFTP request failed");
            Err(e)
        }
    }
}

/// The request path as a clean relative `/`-separated path, or why not.
///
/// A leading `/` names the TFTP root, as with tftpd-hpa's `-s` and
/// dnsmasq: boot loaders that build paths from a prefix ask for them so
/// (GRUB's network image asks for `/grub/grub.cfg`). Nothing outside the
/// root is reachable that way: `/etc/passwd` is the root's `etc/passwd`.
pub fn clean_path(path: &Path) -> Result<String, &'static str> {
    let s = path.to_str().ok_or("not UTF-8")?.trim_start_matches('/');
    if s.is_empty() {
        return Err("empty path");
    }
    if s.contains('\\') || s.contains('\0') {
        return Err("backslash or NUL in path");
    }
    let mut parts = Vec::new();
    for c in Path::new(s).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or("not UTF-8")?),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    if parts.is_empty() {
        return Err("empty path");
    }
    Ok(parts.join("/"))
}

/// Opens `rel` under `root` for reading, refusing anything that resolves
/// (through symlinks) outside the root or is not a regular file.
fn open_inside(root: &Path, rel: &str) -> Result<(std::fs::File, u64), (ErrorCode, &'static str)> {
    const NOT_FOUND: (ErrorCode, &str) = (ErrorCode::FileNotFound, "file not found");
    const DENIED: (ErrorCode, &str) = (ErrorCode::AccessViolation, "access violation");
    let real = std::fs::canonicalize(root.join(rel)).map_err(|_| NOT_FOUND)?;
    if !real.starts_with(root) {
        return Err(DENIED);
    }
    let file = std::fs::File::open(&real).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => DENIED,
        _ => NOT_FOUND,
    })?;
    let meta = file.metadata().map_err(|_| NOT_FOUND)?;
    if !meta.is_file() {
        return Err(NOT_FOUND);
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests;
