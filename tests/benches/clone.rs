//! The clone benchmark: the real `ka serve` and `ka join` processes on
//! loopback against a plain socket copy, in one run.
//!
//! ```text
//! scripts/bench [--size-mib 1024] [--runs 3] [--chains 2,4,8] [--sparse-gib 4]
//! ```
//!
//! (`scripts/bench` builds `ka` and runs `cargo bench -p ka-tests --bench clone`;
//! `KA_BIN=/path/to/ka` measures another build of `ka`.)
//!
//! Every scenario runs in fresh processes, rounds interleave the scenarios so
//! that load from elsewhere on a shared machine spreads over all of them, and
//! the fastest round of each is reported. What it prints:
//!
//! - `plain copy`: the baseline, this binary as a sender (`read`/`write` loop,
//!   1 MiB buffer) and a receiver (`read`/`write` into a tmpfs file, then
//!   `fsync`), no records, no verification; timed by the receiver from
//!   `accept` to `fsync`.
//! - `plain copy + hash thread`: the same copy, whose receiver also hashes
//!   every buffer with keyed BLAKE3 on a second thread (ka's node structure,
//!   without records, zero-block detection or forwarding), timed until the
//!   digest is ready. It measures what verification alone costs on this
//!   machine: no verifying receiver does less work.
//! - `plain sendfile + hash thread`: the same hashing receiver, its sender
//!   using `sendfile(2)` from the page cache, as ka's source sends. The
//!   receiver's CPU depends on where its bytes come from: a `write` loop
//!   hands it socket buffers it has just filled, still in a CPU cache, and
//!   the receiver's copy out of them is cheap; `sendfile` hands it the
//!   image's pages from memory, as a network card's writes reach a real
//!   node. The same receiver costs markedly more fed this way, and on two
//!   shared cores runs markedly slower (docs/performance.md has the
//!   numbers), so this row, fed as ka's source feeds a node, is the
//!   baseline for a node's CPU and for ka's speed: the `vs hashed` column
//!   compares every row with it.
//! - `ka 1 hop, digest ready`: one `ka join` writing to tmpfs. The node is
//!   started once `ka serve` has published the image digest, which a file
//!   source computes in the background while it waits for its nodes.
//! - `ka 1 hop, cold start`: the node is started with the source, so the
//!   stream begins at once and the source hashes the image alongside it.
//! - `plain hashing relays, chain of N`: N plain receivers that hash, each
//!   also sending every buffer on to the next (a `tee` into a socket), fed
//!   by the plain sender with `sendfile`, as ka's source feeds its chain:
//!   the least work a verifying chain does on this machine, with as many
//!   processes sharing its cores as the ka chain has.
//! - `ka chain of N`: N nodes, started once the digest is ready, each writing
//!   to tmpfs and serving the next.
//!
//! A last line per chain compares a node's own CPU per GiB (the figure that
//! carries over to real nodes) with the hashing relays' and the hashing
//! receiver's (fed by `sendfile`), and, to show what the feed alone moves,
//! with the receiver fed by the `write` loop.
//!
//! A ka row is timed from the source's `Started` event to the `Verified`
//! event of the last node (each node compares its own digest of what it
//! wrote with the source's). MB/s is the image size over the best round's
//! time, the ratio is against the plain copy's best round, and `median`
//! compares the median rounds (the machine's neighbours move single rounds
//! by tens of percent). CPU is user + system time of every
//! process of the scenario (the source's background hashing included), per
//! GiB delivered (image size × nodes). Peak RSS is the largest VmHWM (the
//! kernel's high-water mark of resident memory) of any node, read as its
//! stream ends.
//!
//! Last, a sparse image (`--sparse-gib`, 10 % data, the rest holes and
//! written zeros) is cloned to one node inside a private network namespace,
//! whose loopback counters then hold exactly the bytes this session put on
//! the wire (TCP/IP headers, record headers and control traffic included).
//!
//! Every copy is compared with the image (BLAKE3 of the whole file) and the
//! run fails if one differs or a node is not verified OK.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ka_tests::require_tool;

/// The scenario whose receiver is the node-CPU baseline: it hashes, and
/// its bytes come from the page cache by `sendfile`, as ka's source sends.
const SENDFILE_HASHED: &str = "plain sendfile + hash thread";
/// The same hashing receiver fed by a `read`/`write` loop.
const COPY_HASHED: &str = "plain copy + hash thread";

/// The plain copy's buffer.
const BUF: usize = 1 << 20;
/// A scenario that takes longer than this has hung.
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

/// CPU time and peak memory of one finished process.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu: f64,
    max_rss_kib: u64,
}

/// A child process whose output lines arrive, timestamped, on a channel, and
/// whose resource use is collected when it is reaped.
struct Running {
    child: Child,
    what: String,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
    reaped: bool,
    /// The largest VmHWM seen, and the thread that samples it.
    hwm: Arc<AtomicU64>,
    stop_sampling: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// The peak resident set (VmHWM, KiB) of a live process; `None` once it has
/// exited. Read from /proc rather than taken from `wait4`, whose `ru_maxrss`
/// also counts the memory of the parent that forked the child.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Running {
    fn start(cmd: &mut Command, what: &str) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for pipe in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        let hwm = Arc::new(AtomicU64::new(0));
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let (pid, peak, stop) = (child.id(), hwm.clone(), stop_sampling.clone());
        // VmHWM only grows: one read just before the process ends is enough,
        // so sampling is sparse (it costs the measured processes nothing)
        // and only a fallback should the process end first. It stops before
        // the process is reaped, so its PID is never reused under us.
        let sampler = std::thread::spawn(move || loop {
            let stopping = stop.load(Ordering::Acquire);
            match vm_hwm_kib(pid) {
                Some(kib) => {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                None => return,
            }
            if stopping {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        });
        Running {
            child,
            what: what.to_string(),
            lines,
            seen: Vec::new(),
            reaped: false,
            hwm,
            stop_sampling,
            sampler: Some(sampler),
        }
    }

    /// Waits for the first line (not seen by an earlier call) that contains
    /// `text`; returns when it was printed and the line.
    fn expect(&mut self, text: &str, deadline: Instant) -> (Instant, String) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return (t, line);
                    }
                }
                Err(e) => panic!(
                    "{}: no line with {text:?} ({e:?}); its output:\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its exit code and resource use.
    fn reap(mut self, deadline: Instant) -> (i32, Usage) {
        self.stop_sampler();
        let pid = self.child.id() as libc::pid_t;
        loop {
            let mut status = 0;
            // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: waits for our own child with valid out-pointers; wait4
            // is used instead of Child::wait because only it returns the
            // child's own rusage (CPU time and peak RSS).
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid {
                self.reaped = true;
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
                let usage = Usage {
                    cpu: secs(ru.ru_utime) + secs(ru.ru_stime),
                    max_rss_kib: self.hwm.load(Ordering::Relaxed),
                };
                return (code, usage);
            }
            assert!(
                r == 0,
                "{}: wait4 failed: {}",
                self.what,
                std::io::Error::last_os_error()
            );
            assert!(
                Instant::now() < deadline,
                "{} did not exit in time; its output:\n{}",
                self.what,
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Running {
    fn stop_sampler(&mut self) {
        self.stop_sampling.store(true, Ordering::Release);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_sampler();
        if !self.reaped {
            // Only our own child, by its PID, and only while it is unreaped
            // (so the PID cannot have been reused).
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `ka` binary: `$KA_BIN` if set (to compare builds), else the one
/// next to this benchmark.
fn ka_binary() -> PathBuf {
    std::env::var_os("KA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(ka_tests::ka_bin)
}

/// This benchmark binary in one of its child roles.
fn this(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("own path"));
    c.args(args);
    c
}

/// How the plain sender puts the image on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// `read` into a buffer, `write` it to the socket: the receiver copies
    /// from socket buffers this sender has just written, still in a CPU
    /// cache.
    Copy,
    /// `sendfile(2)` from the page cache, as ka's source sends: the
    /// receiver copies from the image's pages in memory, like a real node
    /// copying what its network card wrote.
    Sendfile,
}

impl Feed {
    /// The `plain-send` argument that names it.
    fn arg(self) -> &'static str {
        match self {
            Feed::Copy => "copy",
            Feed::Sendfile => "sendfile",
        }
    }

    /// The feed an argument names (a missing one is a copy).
    fn from_arg(arg: Option<&str>) -> Feed {
        match arg {
            Some(a) if a == Feed::Sendfile.arg() => Feed::Sendfile,
            _ => Feed::Copy,
        }
    }
}

/// Starts the plain sender of the image to `addr`, feeding as `feed` says.
fn start_sender(w: &Work, addr: &str, feed: Feed) -> Running {
    Running::start(
        &mut this(&[
            "plain-send",
            addr,
            w.image.to_str().expect("utf-8 path"),
            feed.arg(),
        ]),
        "plain sender",
    )
}

fn plain_send(addr: &str, input: &Path, feed: Feed) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut f = std::fs::File::open(input).expect("open input");
    if feed == Feed::Sendfile {
        while nix::sys::sendfile::sendfile(&s, &f, None, BUF).expect("sendfile") > 0 {}
        return;
    }
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf).expect("read input");
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).expect("send");
    }
}

/// The plain receiver: `read`/`write` into `out`. With `hash`, a second
/// thread also hashes every buffer with keyed BLAKE3 (the structure of a ka
/// node, without records, zero blocks or forwarding), and the time runs
/// until that digest is ready: the least work any verifying receiver does.
/// With `forward`, it is a relay of a plain chain: it also sends every
/// buffer it has written on to that address (a `tee` into a socket).
fn plain_recv(out: &Path, hash: bool, forward: Option<&str>) {
    /// Buffers between the receiving and the hashing thread.
    const RING: usize = 4;
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    println!("PORT {}", l.local_addr().expect("address").port());
    // The next relay listens already: relays are started from the tail.
    let mut next = forward.map(|addr| TcpStream::connect(addr).expect("connect to the next relay"));
    let (mut s, _) = l.accept().expect("accept");
    let start = Instant::now();
    let mut f = std::fs::File::create(out).expect("create output");
    // Without the hash, one buffer that comes straight back: the plain
    // copy's single reused buffer.
    let ring = if hash { RING } else { 1 };
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(ring);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..ring {
        free_tx.send(vec![0u8; BUF]).expect("ring");
    }
    let returns = free_tx.clone();
    let hasher = hash.then(|| {
        std::thread::spawn(move || {
            let mut h = blake3::Hasher::new_keyed(&[0x5a; 32]);
            for (buf, n) in full_rx {
                h.update(&buf[..n]);
                let _ = returns.send(buf);
            }
            h.finalize()
        })
    });
    loop {
        let mut buf = free_rx.recv().expect("a buffer comes back");
        let n = s.read(&mut buf).expect("receive");
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n]).expect("write output");
        if let Some(next) = &mut next {
            next.write_all(&buf[..n]).expect("forward");
        }
        if hash {
            full_tx.send((buf, n)).expect("hasher alive");
        } else {
            free_tx.send(buf).expect("the ring is ours");
        }
    }
    drop(full_tx);
    if let Some(h) = hasher {
        h.join().expect("hasher");
    }
    f.sync_all().expect("fsync");
    // Its own peak memory too: it exits at once, often before the parent's
    // sparse sampling has read it.
    let hwm = vm_hwm_kib(std::process::id()).expect("own /proc status");
    println!("SECONDS {:.6} HWM {hwm}", start.elapsed().as_secs_f64());
}

/// One scenario's best round.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    seconds: f64,
    cpu: f64,
    node_cpu: f64,
    node_rss_kib: u64,
    /// The source's own CPU seconds.
    source_cpu: f64,
    /// The bytes that travelled per node: the packed stream's size when
    /// the source packed it, else the image's.
    wire: u64,
}

impl Outcome {
    /// Counts one of `nodes` nodes' processes.
    fn add_node(&mut self, u: Usage, nodes: usize) {
        self.cpu += u.cpu;
        self.node_cpu += u.cpu / nodes as f64;
        self.node_rss_kib = self.node_rss_kib.max(u.max_rss_kib);
    }

    /// Counts the source's (or plain sender's) process.
    fn add_source(&mut self, u: Usage) {
        self.cpu += u.cpu;
        self.source_cpu = u.cpu;
    }
}

/// The files of a run: image, secret, outputs.
struct Work {
    dir: PathBuf,
    image: PathBuf,
    image_hash: blake3::Hash,
    secret: PathBuf,
}

impl Work {
    /// The image's size.
    fn wire_size(&self) -> u64 {
        std::fs::metadata(&self.image).map_or(0, |m| m.len())
    }

    fn out(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.img"))
    }

    /// Checks the outputs of nodes `0..nodes` and removes them.
    fn check_outputs(&self, scenario: &str, nodes: usize) {
        for i in 0..nodes {
            self.check_and_remove(scenario, &self.out(i));
        }
    }

    /// Checks that `out` holds the image, then removes it (tmpfs is memory).
    fn check_and_remove(&self, scenario: &str, out: &Path) {
        let got = hash_file(out);
        assert_eq!(
            got,
            self.image_hash,
            "{scenario}: {} differs from the image",
            out.display()
        );
        std::fs::remove_file(out).expect("remove output");
    }
}

/// BLAKE3 of a file, read in small pieces: this process stays small, and
/// the children it starts do not inherit a large mapping.
fn hash_file(p: &Path) -> blake3::Hash {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// The plain copy, its sender feeding the socket as `feed` says; with
/// `hash`, its receiver also hashes what it receives.
fn plain(w: &Work, hash: bool, feed: Feed) -> Outcome {
    let deadline = Instant::now() + SCENARIO_LIMIT;
    let out = w.out(0);
    let mode = if hash { "hash" } else { "-" };
    let mut recv = Running::start(
        &mut this(&["plain-recv", out.to_str().expect("utf-8 path"), mode]),
        "plain receiver",
    );
    let (_, port) = recv.expect("PORT ", deadline);
    let addr = format!("127.0.0.1:{}", &port["PORT ".len()..]);
    let send = start_sender(w, &addr, feed);
    let (_, line) = recv.expect("SECONDS ", deadline);
    let words: Vec<&str> = line.split_whitespace().collect();
    let seconds: f64 = words[1].parse().expect("seconds");
    let hwm_kib: u64 = words[3].parse().expect("peak memory");
    recv.hwm.fetch_max(hwm_kib, Ordering::Relaxed);
    let (rc, ru) = recv.reap(deadline);
    let (sc, su) = send.reap(deadline);
    assert!(rc == 0 && sc == 0, "the plain copy failed");
    w.check_and_remove("plain copy", &out);
    Outcome {
        seconds,
        cpu: ru.cpu + su.cpu,
        node_cpu: ru.cpu,
        node_rss_kib: ru.max_rss_kib,
        source_cpu: su.cpu,
        wire: w.wire_size(),
    }
}

/// A plain chain of `nodes` relays that hash (see [`plain_recv`]), fed by
/// the plain sender with `sendfile`, as ka's source feeds its first node:
/// the least work any verifying chain does, so the baseline for a ka
/// chain's node CPU. Timed from the sender's start to the last relay's
/// digest.
fn plain_chain(w: &Work, nodes: usize) -> Outcome {
    let deadline = Instant::now() + SCENARIO_LIMIT;
    let mut relays: Vec<Running> = Vec::new();
    let mut next: Option<String> = None;
    for i in (0..nodes).rev() {
        let out = w.out(i);
        let mut args = vec!["plain-recv", out.to_str().expect("utf-8 path"), "hash"];
        if let Some(addr) = &next {
            args.push(addr);
        }
        let mut relay = Running::start(&mut this(&args), &format!("plain relay {i}"));
        let (_, port) = relay.expect("PORT ", deadline);
        next = Some(format!("127.0.0.1:{}", &port["PORT ".len()..]));
        relays.push(relay);
    }
    let first = next.expect("at least one relay");
    let started = Instant::now();
    let send = start_sender(w, &first, Feed::Sendfile);
    let mut outcome = Outcome {
        seconds: 0.0,
        cpu: 0.0,
        node_cpu: 0.0,
        node_rss_kib: 0,
        source_cpu: 0.0,
        wire: w.wire_size(),
    };
    for mut relay in relays {
        let (done, line) = relay.expect("SECONDS ", deadline);
        outcome.seconds = outcome
            .seconds
            .max(done.duration_since(started).as_secs_f64());
        let hwm_kib: u64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|v| v.parse().ok())
            .expect("peak memory");
        let what = relay.what.clone();
        let (code, u) = relay.reap(deadline);
        assert_eq!(code, 0, "{what} failed");
        outcome.add_node(u, nodes);
        outcome.node_rss_kib = outcome.node_rss_kib.max(hwm_kib);
    }
    let (code, u) = send.reap(deadline);
    assert_eq!(code, 0, "the plain sender failed");
    outcome.add_source(u);
    w.check_outputs(&format!("plain chain of {nodes}"), nodes);
    outcome
}

/// One ka session: `ka serve` of the image and `nodes` × `ka join`.
/// With `digest_ready`, the nodes start only once the source has published
/// its digest. Returns the outcome and the source's listening port.
fn ka(w: &Work, nodes: usize, digest_ready: bool) -> Outcome {
    ka_with(w, nodes, digest_ready, &[])
}

/// [`ka`], with more options for `ka serve` (`--compress`).
fn ka_with(w: &Work, nodes: usize, digest_ready: bool, serve_args: &[&str]) -> Outcome {
    let deadline = Instant::now() + SCENARIO_LIMIT;
    let n = nodes.to_string();
    let secret = w.secret.to_str().expect("utf-8 path");
    let mut serve = Running::start(
        ka_tests::private_logs(&mut Command::new(ka_binary()), &w.dir)
            .args([
                "serve",
                "--nodes",
                &n,
                "--listen",
                "127.0.0.1:0",
                "--secret-file",
                secret,
                "--image",
                w.image.to_str().expect("utf-8 path"),
                "--state-dir",
                w.dir.to_str().expect("utf-8 path"),
                "--json",
            ])
            .args(serve_args),
        "ka serve",
    );
    let (_, line) = serve.expect("nodes on 127.0.0.1:", deadline);
    let server = line
        .split("nodes on ")
        .nth(1)
        .expect("address")
        .trim()
        .to_string();
    if digest_ready {
        serve.expect("\"event\":\"image_done\"", deadline);
    }
    let mut joins: Vec<Running> = (0..nodes)
        .map(|i| {
            let name = format!("n{i}");
            let out = w.out(i);
            Running::start(
                Command::new(ka_binary()).args([
                    "join",
                    "--server",
                    &server,
                    "--secret-file",
                    secret,
                    "--name",
                    &name,
                    "--target",
                    out.to_str().expect("utf-8 path"),
                    "--state-dir",
                    w.dir.to_str().expect("utf-8 path"),
                    "--wait",
                    "60s",
                    "--json",
                ]),
                &format!("ka join {name}"),
            )
        })
        .collect();
    let (started, _) = serve.expect("\"event\":\"started\"", deadline);
    let mut last = started;
    for j in &mut joins {
        let (t, line) = j.expect(r#""event":"verified""#, deadline);
        assert!(line.contains(r#""ok":true"#), "{}: {line}", j.what);
        last = last.max(t);
    }
    let mut outcome = Outcome {
        seconds: last.duration_since(started).as_secs_f64(),
        cpu: 0.0,
        node_cpu: 0.0,
        node_rss_kib: 0,
        source_cpu: 0.0,
        wire: 0,
    };
    for j in joins {
        let what = j.what.clone();
        let (code, u) = j.reap(deadline);
        assert_eq!(code, 0, "{what} failed");
        outcome.add_node(u, nodes);
    }
    let (_, report) = serve.expect("\"report\"", deadline);
    let report: serde_json::Value = serde_json::from_str(&report).expect("the report is JSON");
    let report = &report["report"];
    outcome.wire = report["packed"]
        .as_u64()
        .or(report["size"].as_u64())
        .expect("the report's size");
    let (code, u) = serve.reap(deadline);
    assert_eq!(code, 0, "ka serve reported failed nodes");
    outcome.add_source(u);
    w.check_outputs(&format!("{nodes} nodes"), nodes);
    outcome
}

/// Packed streams (`ka serve --compress`) in a chain of 4, each beside the
/// same chain sending the same image plain, in interleaved rounds: this
/// machine's own files (a tar of /usr: programs, libraries, text), packed
/// with zstd, and the incompressible image with `auto` (which should find
/// it does not pack and send it plain). CPU is per GiB of image: the
/// source's to pack, each node's to receive, forward, unpack and verify.
fn packing(w: &Work, dir: &Path, size: u64, runs: usize) {
    let system = dir.join("system-files");
    let size = ka_tests::system_files_image(&system, size);
    let sys = work(dir, system);
    type Run<'a> = Box<dyn Fn() -> Outcome + 'a>;
    let scenarios: Vec<(&str, Run)> = vec![
        (
            "system files, plain",
            Box::new(|| ka_with(&sys, 4, true, &[])),
        ),
        (
            "system files, --compress zstd",
            Box::new(|| ka_with(&sys, 4, true, &["--compress", "zstd"])),
        ),
        (
            "incompressible, plain",
            Box::new(|| ka_with(w, 4, true, &[])),
        ),
        (
            "incompressible, --compress auto",
            Box::new(|| ka_with(w, 4, true, &["--compress", "auto"])),
        ),
    ];
    let mut rounds: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    for _ in 0..runs {
        for (i, (_, run)) in scenarios.iter().enumerate() {
            rounds[i].push(run());
        }
    }
    println!();
    println!(
        "packed streams, chain of 4 (system files: {} MiB of /usr as tar; incompressible: the image above)",
        size >> 20
    );
    println!(
        "{:<32} {:>8} {:>8} {:>10} {:>13} {:>15}",
        "scenario", "seconds", "vs plain", "wire MiB", "source s/GiB", "node CPU s/GiB"
    );
    let best = best_rounds(&rounds);
    for (i, ((name, _), o)) in scenarios.iter().zip(&best).enumerate() {
        let image = if i < 2 { size } else { w.wire_size() };
        let gib = image as f64 / (1u64 << 30) as f64;
        let plain = best[i / 2 * 2].seconds;
        println!(
            "{name:<32} {:>8.3} {:>8.3} {:>10.1} {:>13.2} {:>15.2}",
            o.seconds,
            o.seconds / plain,
            o.wire as f64 / (1u64 << 20) as f64,
            o.source_cpu / gib,
            o.node_cpu / gib
        );
    }
    println!(
        "seconds: best round; vs plain: against the plain row of the same image; on loopback \
         the wire is not the limit, so this prices the CPU (the lab measures the wire: docs/lab.md)"
    );
    drop(scenarios);
    std::fs::remove_file(&sys.image).expect("remove the system-files image");
}

/// Writes `size` bytes of incompressible data (xorshift) to `path`.
fn incompressible(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    let mut buf = vec![0u8; BUF];
    let mut x = 0x243f6a8885a308d3u64;
    let mut off = 0;
    while off < size {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - off).min(BUF as u64) as usize;
        f.write_all_at(&buf[..n], off).expect("write image");
        off += n as u64;
    }
}

/// A sparse image like a used disk: 1 MiB pieces, one in ten holding data
/// (with one 64 KiB block in sixteen zeroed), three in ten written zeros, the
/// rest never written (holes). Returns the data bytes ka must send: the
/// non-zero 64 KiB blocks.
fn sparse(path: &Path, size: u64) -> u64 {
    const BLOCK: usize = 64 << 10;
    let f = std::fs::File::create(path).expect("create sparse image");
    f.set_len(size).expect("size sparse image");
    let mut data = 0;
    let zeros = vec![0u8; BUF];
    for (i, off) in (0..size).step_by(BUF).enumerate() {
        match (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60 {
            // 16 classes of about 1/16 each: 1.6 of them data, about 10 %.
            0 => {}
            1 if i % 5 < 3 => {}
            2..=6 => {
                f.write_all_at(&zeros, off).expect("write zeros");
                continue;
            }
            _ => continue,
        }
        let mut buf = ka_tests::pseudo_random(BUF, i as u64 + 1);
        buf[(i % 16) * BLOCK..][..BLOCK].fill(0);
        f.write_all_at(&buf, off).expect("write data");
        data += (BUF - BLOCK) as u64;
    }
    data
}

/// Bytes sent on this network namespace's loopback so far.
fn lo_tx_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/self/net/dev").expect("/proc/self/net/dev");
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .expect("a loopback device");
    // Fields after "lo:": rx bytes packets errs drop fifo frame compressed multicast, tx bytes …
    let fields: Vec<&str> = line
        .split(':')
        .nth(1)
        .expect("counters")
        .split_whitespace()
        .collect();
    fields[8].parse().expect("tx bytes")
}

/// Inside a private network namespace: brings loopback up, clones the sparse
/// image to one node and prints the bytes loopback carried.
fn sparse_inner(w: &Work) {
    let ip = require_tool("ip", "iproute2");
    let up = Command::new(ip)
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "cannot bring loopback up in the namespace");
    let before = lo_tx_bytes();
    let o = ka(w, 1, true);
    let wire = lo_tx_bytes() - before;
    println!("WIRE {wire} {} {:.6}", o.node_rss_kib, o.seconds);
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Single-core speeds of the two passes a node adds to a copy.
fn single_core_speeds(image: &Path) -> String {
    let f = std::fs::File::open(image).expect("open image");
    let len = f.metadata().expect("stat image").len();
    let mut buf = vec![0u8; BUF];
    let (mut read_s, mut hash_s) = (0.0, 0.0);
    let mut h = blake3::Hasher::new_keyed(&[7; 32]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(BUF as u64) as usize;
        let t = Instant::now();
        f.read_exact_at(&mut buf[..n], off).expect("read image");
        read_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        h.update(&buf[..n]);
        hash_s += t.elapsed().as_secs_f64();
        off += n as u64;
    }
    std::hint::black_box(h.finalize());
    format!(
        "one core: pread from the page cache {:.0} MB/s, keyed BLAKE3 {:.0} MB/s",
        len as f64 / read_s / 1e6,
        len as f64 / hash_s / 1e6
    )
}

struct Args {
    size_mib: u64,
    runs: usize,
    chains: Vec<usize>,
    sparse_gib: u64,
}

fn parse_args(args: &[String]) -> Args {
    let mut a = Args {
        size_mib: 1024,
        runs: 3,
        chains: vec![2, 4, 8],
        sparse_gib: 4,
    };
    let mut it = args.iter().filter(|s| *s != "--bench");
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--size-mib" => a.size_mib = number(flag, value),
            "--runs" => a.runs = number(flag, value),
            "--chains" => {
                a.chains = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| number(flag, s))
                    .collect()
            }
            "--sparse-gib" => a.sparse_gib = number(flag, value),
            _ => panic!(
                "unknown option {flag}: use --size-mib N, --runs N, --chains 2,4,8, --sparse-gib N"
            ),
        }
    }
    a
}

/// Each scenario's best (fastest) round: the one least disturbed by other
/// load on a shared machine.
fn best_rounds(rounds: &[Vec<Outcome>]) -> Vec<Outcome> {
    rounds
        .iter()
        .map(|r| {
            *r.iter()
                .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
                .expect("every scenario ran")
        })
        .collect()
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("bad value {value:?} for {flag}: a whole number is needed"))
}

fn work(dir: &Path, image: PathBuf) -> Work {
    let secret = dir.join("secret");
    if !secret.exists() {
        ka_tests::write_secret(&secret, u64::from(std::process::id()));
    }
    Work {
        dir: dir.to_path_buf(),
        image_hash: hash_file(&image),
        image,
        secret,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.first().copied() {
        Some("plain-send") => {
            return plain_send(a[1], Path::new(a[2]), Feed::from_arg(a.get(3).copied()))
        }
        Some("plain-recv") => {
            return plain_recv(
                Path::new(a[1]),
                a.get(2) == Some(&"hash"),
                a.get(3).copied(),
            )
        }
        Some("sparse-inner") => {
            let (dir, image) = (Path::new(a[1]), PathBuf::from(a[2]));
            return sparse_inner(&work(dir, image));
        }
        _ => {}
    }
    let opts = parse_args(&args);
    let size = opts.size_mib << 20;
    // tmpfs: the image stays in the page cache and the copies cost no disk.
    let tmp = tempfile::Builder::new()
        .prefix("ka-bench-")
        .tempdir_in("/dev/shm")
        .expect("a directory on /dev/shm");
    let image = tmp.path().join("image");
    incompressible(&image, size);
    let w = work(tmp.path(), image);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ka clone benchmark: {} MiB of incompressible data on tmpfs, cloned to tmpfs over loopback TCP",
        opts.size_mib
    );
    println!(
        "by the real `ka serve` / `ka join` processes; {cpus} CPUs shared by all processes; best of {} rounds",
        opts.runs
    );
    println!("load average at the start: {}", loadavg());
    println!("{}", single_core_speeds(&w.image));

    let mut scenarios: Vec<(String, Box<dyn Fn() -> Outcome>)> = vec![
        (
            "plain copy (read/write loop)".into(),
            Box::new(|| plain(&w, false, Feed::Copy)),
        ),
        (COPY_HASHED.into(), Box::new(|| plain(&w, true, Feed::Copy))),
        (
            SENDFILE_HASHED.into(),
            Box::new(|| plain(&w, true, Feed::Sendfile)),
        ),
        (
            "ka 1 hop, digest ready".into(),
            Box::new(|| ka(&w, 1, true)),
        ),
        ("ka 1 hop, cold start".into(), Box::new(|| ka(&w, 1, false))),
    ];
    for &n in &opts.chains {
        let w = &w;
        scenarios.push((
            format!("plain hashing relays, chain of {n}"),
            Box::new(move || plain_chain(w, n)),
        ));
        scenarios.push((format!("ka chain of {n}"), Box::new(move || ka(w, n, true))));
    }
    // Every round's outcome: the best round of each scenario is its row (the
    // least disturbed by other load), and the medians show a typical round.
    let mut rounds: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    for _ in 0..opts.runs {
        for (i, (_, run)) in scenarios.iter().enumerate() {
            rounds[i].push(run());
        }
    }
    let best = best_rounds(&rounds);
    let gib = size as f64 / (1u64 << 30) as f64;
    let find = |name: &str| scenarios.iter().position(|(n, _)| n == name);
    let hashed_at = find(SENDFILE_HASHED).expect("the hashed sendfile copy is a scenario");
    let (base, hashed) = (best[0].seconds, best[hashed_at].seconds);
    let base_median = median(rounds[0].iter().map(|o| o.seconds).collect());
    println!(
        "{:<34} {:>7} {:>6} {:>7} {:>9} {:>10} {:>15} {:>14}",
        "scenario",
        "MB/s",
        "ratio",
        "median",
        "vs hashed",
        "CPU s/GiB",
        "node CPU s/GiB",
        "node peak RSS"
    );
    for (((name, _), o), runs) in scenarios.iter().zip(&best).zip(&rounds) {
        let nodes = match name.split_once("chain of ") {
            Some((_, n)) => n.parse::<f64>().expect("node count"),
            None => 1.0,
        };
        let typical = median(runs.iter().map(|o| o.seconds).collect());
        println!(
            "{name:<34} {:>7.0} {:>6.2} {:>7.2} {:>9.2} {:>10.2} {:>15.2} {:>10} MiB",
            size as f64 / o.seconds / 1e6,
            base / o.seconds,
            base_median / typical,
            hashed / o.seconds,
            o.cpu / (gib * nodes),
            o.node_cpu / gib,
            o.node_rss_kib / 1024
        );
    }
    println!(
        "ka rows: from the source's Started event to the last node's Verified event; \
         digest ready = the source hashed the image while waiting for its nodes (that CPU is counted), \
         cold start = the nodes were waiting, the stream began at once and the source hashed alongside"
    );
    println!(
        "ratio: best round against the plain copy's best round; median: median round against the plain \
         copy's median round; vs hashed: best round against the best round of the plain sendfile copy \
         whose receiver also hashes on a second thread (keyed BLAKE3, until the digest is ready), fed as \
         ka's source feeds a node"
    );
    println!("CPU s/GiB: all processes, per GiB delivered (image size x nodes)");
    // A node's own CPU, the figure that carries over to real nodes, against
    // the least a verifying receiver and a verifying relay chain spend.
    let node_cpu = |name: &str| find(name).map(|i| best[i].node_cpu / gib);
    let receiver = node_cpu(SENDFILE_HASHED).expect("the hashed sendfile copy ran");
    let hot_receiver = node_cpu(COPY_HASHED).expect("the hashed copy ran");
    for &n in &opts.chains {
        if let (Some(ka), Some(relays)) = (
            node_cpu(&format!("ka chain of {n}")),
            node_cpu(&format!("plain hashing relays, chain of {n}")),
        ) {
            println!(
                "node CPU, chain of {n}: ka {ka:.2} s/GiB = {:.2} x the hashing relays' {relays:.2}, \
                 {:.2} x the hashing receiver's {receiver:.2} (both fed by sendfile, as ka's source \
                 feeds its first node); {:.2} x the receiver fed by a read/write loop ({hot_receiver:.2})",
                ka / relays,
                ka / receiver,
                ka / hot_receiver
            );
        }
    }
    drop(scenarios);
    packing(&w, tmp.path(), size, opts.runs);
    std::fs::remove_file(&w.image).expect("remove image");

    if opts.sparse_gib > 0 {
        let sparse_image = tmp.path().join("sparse");
        let data = sparse(&sparse_image, opts.sparse_gib << 30);
        // A private network namespace: its loopback carries this session only.
        let mut unshare = Command::new(require_tool("unshare", "util-linux"));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            unshare.args(["--user", "--map-root-user"]);
        }
        let exe = std::env::current_exe().expect("own path");
        unshare.arg("--net").arg("--").arg(exe).args([
            "sparse-inner",
            tmp.path().to_str().expect("utf-8 path"),
            sparse_image.to_str().expect("utf-8 path"),
        ]);
        let mut inner = Running::start(&mut unshare, "sparse clone in a network namespace");
        let deadline = Instant::now() + SCENARIO_LIMIT;
        let (_, line) = inner.expect("WIRE ", deadline);
        let (code, _) = inner.reap(deadline);
        assert_eq!(code, 0, "the sparse clone failed");
        let f: Vec<&str> = line.split_whitespace().collect();
        let wire: u64 = f[1].parse().expect("wire bytes");
        let rss: u64 = f[2].parse().expect("rss");
        let secs: f64 = f[3].parse().expect("seconds");
        println!(
            "sparse {} GiB image, {:.1} % data, ka 1 hop: {:.0} MB of data, {:.0} MB on the wire = {:.3} x data, {secs:.2} s, node peak RSS {} MiB",
            opts.sparse_gib,
            data as f64 / (opts.sparse_gib << 30) as f64 * 100.0,
            data as f64 / 1e6,
            wire as f64 / 1e6,
            wire as f64 / data as f64,
            rss / 1024
        );
        println!(
            "  (wire = bytes sent on loopback in a private network namespace: TCP/IP headers, record headers and control traffic included)"
        );
    }
    println!("load average at the end: {}", loadavg());
}
