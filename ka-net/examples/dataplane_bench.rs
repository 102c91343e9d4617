//! Data-plane benchmark on loopback TCP: a 1 GiB incompressible image on tmpfs
//! (so in the page cache), copied to tmpfs files.
//!
//! ```text
//! cargo run --release -p ka-net --example dataplane_bench [-- SIZE_MIB [RUNS]]
//! ```
//!
//! Scenarios, each run in separate processes (so CPU time and peak RSS are per
//! process) and repeated; the best run is reported:
//!
//! - `plain`: baseline, a plain read/write loop with one 1 MiB buffer on both
//!   ends, no records, no hashing.
//! - `splice`: the sender as in `plain`, the receiver moves socket → pipe →
//!   file with splice(2) (no hashing): the raw cost of the zero-copy path.
//! - `splice+hash`: as `splice`, and hashes each piece through a 32 MiB
//!   read-only mmap window of the page cache it was just written to (what a
//!   splice node would have to do, since the bytes never reach user space).
//! - `ka 1 hop`: ka's source (`send_image`, hashing) → node (`relay`, hashing,
//!   writing) → tmpfs.
//! - `ka 1 hop, src no hash`: the same, with the source not hashing (a
//!   digest computed ahead, as a seekable source can).
//! - `ka 2 hops`: source → node 1 (forwarding) → node 2.
//!
//! All outputs are compared byte for byte with the input, and all digests
//! with each other; the run fails if any differs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use ka_net::{
    open_sink, open_source, relay, send_growing, send_image, ImageHasher, NodeWriter, RelayEvent,
    SessionKey, SinkSpec, SourceSpec, Written,
};

const KEY: SessionKey = SessionKey([0x5a; 32]);
const BUF: usize = 1 << 20;

/// Resource use of this process so far.
fn usage() -> (f64, f64, u64) {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (
        secs(u.user_time()),
        secs(u.system_time()),
        u.max_rss() as u64,
    )
}

/// Printed by every child at its end; parsed by the parent.
fn report(start: Instant, digest: &str) {
    let (user, sys, rss) = usage();
    println!(
        "RESULT {:.6} {user:.3} {sys:.3} {rss} {digest}",
        start.elapsed().as_secs_f64()
    );
}

fn listen() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("PORT {}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    l
}

fn plain_send(addr: &str, input: &Path) {
    let mut s = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    let mut f = std::fs::File::open(input).unwrap();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
    }
    report(start, "-");
}

/// The sender as in `plain_send`, with sendfile(2): the kernel sends from the
/// page cache without a user-space copy.
fn sendfile_send(addr: &str, input: &Path) {
    let s = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    let f = std::fs::File::open(input).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut off: i64 = 0;
    while off < len {
        let n = nix::sys::sendfile::sendfile64(s.as_fd(), f.as_fd(), Some(&mut off), BUF).unwrap();
        assert!(n > 0);
    }
    report(start, "-");
}

fn plain_recv(out: &Path) {
    let l = listen();
    let (mut s, _) = l.accept().unwrap();
    let start = Instant::now();
    let mut f = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n]).unwrap();
    }
    f.sync_all().unwrap();
    report(start, "-");
}

/// socket → pipe → file with splice; optionally hash each piece via mmap.
fn splice_recv(out: &Path, hash: bool) {
    use nix::fcntl::{splice, SpliceFFlags};
    let l = listen();
    let (s, _) = l.accept().unwrap();
    let start = Instant::now();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .unwrap();
    let (pr, pw) = nix::unistd::pipe().unwrap();
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&pw),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(BUF as i32),
    )
    .unwrap();
    let mut hasher = blake3::Hasher::new_keyed(&KEY.0);
    let mut off: i64 = 0;
    const WINDOW: u64 = 32 << 20;
    let mut window: Option<(std::ptr::NonNull<std::ffi::c_void>, u64)> = None;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_MORE;
    loop {
        let n = splice(s.as_fd(), None, pw.as_fd(), None, BUF, flags).unwrap();
        if n == 0 {
            break;
        }
        let piece_start = off;
        let mut left = n;
        while left > 0 {
            left -= splice(pr.as_fd(), None, f.as_fd(), Some(&mut off), left, flags).unwrap();
        }
        if hash {
            // Hash the page cache just written through a read-only window
            // mapping, moved (munmap + mmap) only every WINDOW bytes so the
            // cost is page faults, not a map/unmap per piece.
            let mut pos = piece_start as u64;
            while pos < off as u64 {
                let win = pos - pos % WINDOW;
                if window.as_ref().map(|w| w.1) != Some(win) {
                    if let Some((ptr, _)) = window.take() {
                        // SAFETY: unmapping our own mapping; no slice of it survives.
                        unsafe { nix::sys::mman::munmap(ptr, WINDOW as usize).unwrap() };
                    }
                    // SAFETY: a shared read-only mapping of our output file; only
                    // bytes already written (inside the file) are read.
                    let ptr = unsafe {
                        nix::sys::mman::mmap(
                            None,
                            std::num::NonZeroUsize::new(WINDOW as usize).unwrap(),
                            nix::sys::mman::ProtFlags::PROT_READ,
                            nix::sys::mman::MapFlags::MAP_SHARED,
                            &f,
                            win as i64,
                        )
                        .unwrap()
                    };
                    window = Some((ptr, win));
                }
                let (ptr, _) = window.as_ref().unwrap();
                let end = (off as u64).min(win + WINDOW);
                // SAFETY: the window is WINDOW bytes long and mapped; [pos, end) is inside it.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        (ptr.as_ptr() as *const u8).add((pos - win) as usize),
                        (end - pos) as usize,
                    )
                };
                hasher.update(bytes);
                pos = end;
            }
        }
    }
    if let Some((ptr, _)) = window.take() {
        // SAFETY: unmapping our own mapping; no slice of it survives.
        unsafe { nix::sys::mman::munmap(ptr, WINDOW as usize).unwrap() };
    }
    f.sync_all().unwrap();
    report(start, &hasher.finalize().to_hex());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ka_source(addr: &str, input: &Path, hash: bool) {
    runtime().block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        let source = open_source(&SourceSpec::File(input.to_owned())).unwrap();
        let hasher = hash.then(|| ImageHasher::new(&KEY));
        let end = send_image(source, &mut s, hasher, |_| {}).await.unwrap();
        report(
            start,
            &end.digest.map(|d| d.to_string()).unwrap_or("-".into()),
        );
    });
}

fn ka_node(out: &Path, size: u64, forward: Option<&str>) {
    runtime().block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", l.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        let mut down = match forward {
            Some(a) => Some(tokio::net::TcpStream::connect(a).await.unwrap()),
            None => None,
        };
        let (mut up, _) = l.accept().await.unwrap();
        let start = Instant::now();
        let sink = open_sink(&SinkSpec::File(out.to_owned()), Some(size)).unwrap();
        let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).unwrap();
        // A downstream is served from the written file as it grows, as `ka join` does.
        let (written, follow) = tokio::sync::watch::channel(Written::default());
        let serve = down.take().map(|mut down| {
            let from = ka_net::source::FileSource::open_sized(out, Some(size)).unwrap();
            tokio::spawn(async move {
                send_growing(from, &mut down, follow, |_| {}).await.unwrap();
            })
        });
        let end = relay(&mut up, &mut w, |RelayEvent::Written(o)| {
            written.send_modify(|w| w.upto = o);
        })
        .await
        .unwrap();
        written.send_replace(Written {
            upto: end.size,
            size: Some(end.size),
        });
        if let Some(serve) = serve {
            serve.await.unwrap();
        }
        report(start, &end.digest.to_string());
    });
}

struct Res {
    wall: f64,
    cpu: f64,
    rss_kb: u64,
    digest: String,
}

fn spawn(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(c.stdout.take().unwrap());
    (c, out)
}

fn read_port(r: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    format!(
        "127.0.0.1:{}",
        line.trim().strip_prefix("PORT ").expect("PORT line")
    )
}

fn finish(mut c: Child, mut r: BufReader<std::process::ChildStdout>) -> Res {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(c.wait().unwrap().success(), "child failed");
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"RESULT"), "bad child output {line:?}");
    Res {
        wall: f[1].parse().unwrap(),
        cpu: f[2].parse::<f64>().unwrap() + f[3].parse::<f64>().unwrap(),
        rss_kb: f[4].parse().unwrap(),
        digest: f[5].to_string(),
    }
}

/// One run of a scenario: returns (wall seconds of the last receiver, total
/// CPU seconds of all processes, peak RSS of the receivers in KiB, digests).
fn run(
    scenario: &str,
    input: &Path,
    outs: &[PathBuf],
    size: u64,
) -> (f64, f64, f64, u64, Vec<String>) {
    let size_s = size.to_string();
    let inp = input.to_str().unwrap();
    let o: Vec<&str> = outs.iter().map(|p| p.to_str().unwrap()).collect();
    let (receivers, sender) = match scenario {
        "plain" | "sendfile" | "splice" | "splice+hash" => {
            let mode = match scenario {
                "plain" | "sendfile" => "plain-recv",
                "splice" => "splice-recv",
                _ => "splice-hash-recv",
            };
            let (c, mut r) = spawn(&[mode, o[0]]);
            let addr = read_port(&mut r);
            let send = if scenario == "sendfile" {
                "sendfile-send"
            } else {
                "plain-send"
            };
            let s = spawn(&[send, &addr, inp]);
            (vec![(c, r)], s)
        }
        "ka 1 hop" | "ka 1 hop, src no hash" => {
            let (c, mut r) = spawn(&["ka-node", o[0], &size_s]);
            let addr = read_port(&mut r);
            let mode = if scenario == "ka 1 hop" {
                "ka-source"
            } else {
                "ka-source-nohash"
            };
            let s = spawn(&[mode, &addr, inp]);
            (vec![(c, r)], s)
        }
        "ka 2 hops" => {
            let (c2, mut r2) = spawn(&["ka-node", o[1], &size_s]);
            let a2 = read_port(&mut r2);
            let (c1, mut r1) = spawn(&["ka-node", o[0], &size_s, &a2]);
            let a1 = read_port(&mut r1);
            let s = spawn(&["ka-source", &a1, inp]);
            (vec![(c1, r1), (c2, r2)], s)
        }
        _ => unreachable!(),
    };
    let rx: Vec<Res> = receivers.into_iter().map(|(c, r)| finish(c, r)).collect();
    let tx = finish(sender.0, sender.1);
    let wall = rx.iter().map(|r| r.wall).fold(0.0, f64::max);
    let cpu = tx.cpu + rx.iter().map(|r| r.cpu).sum::<f64>();
    let node_cpu = rx[0].cpu;
    let rss = rx.iter().map(|r| r.rss_kb).max().unwrap();
    let mut digests: Vec<String> = rx.iter().map(|r| r.digest.clone()).collect();
    digests.push(tx.digest);
    (wall, cpu, node_cpu, rss, digests)
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut off = 0;
    loop {
        let n = fa.read_at(&mut ba, off).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        off += n as u64;
    }
}

/// Single-core speeds of the pieces: reading the page cache, raw keyed
/// BLAKE3, and the canonical ImageHasher (BLAKE3 plus zero tests and headers).
fn hash_speeds(input: &Path) {
    let f = std::fs::File::open(input).unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; BUF];
    let mut read_s = 0.0;
    let mut raw = blake3::Hasher::new_keyed(&KEY.0);
    let mut raw_s = 0.0;
    let mut canon = ImageHasher::new(&KEY);
    let mut canon_s = 0.0;
    let mut off = 0;
    while off < len {
        let t = Instant::now();
        f.read_exact_at(&mut buf, off).unwrap();
        read_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        raw.update(&buf);
        raw_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        canon.data(off, &buf).unwrap();
        canon_s += t.elapsed().as_secs_f64();
        off += BUF as u64;
    }
    let _ = (raw.finalize(), canon.finish(len).unwrap());
    let mbs = |s: f64| len as f64 / s / 1e6;
    println!(
        "one core: pread page cache {:.0} MB/s, BLAKE3 keyed {:.0} MB/s, ImageHasher {:.0} MB/s",
        mbs(read_s),
        mbs(raw_s),
        mbs(canon_s)
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.get(1).copied() {
        Some("plain-send") => return plain_send(a[2], Path::new(a[3])),
        Some("sendfile-send") => return sendfile_send(a[2], Path::new(a[3])),
        Some("plain-recv") => return plain_recv(Path::new(a[2])),
        Some("splice-recv") => return splice_recv(Path::new(a[2]), false),
        Some("splice-hash-recv") => return splice_recv(Path::new(a[2]), true),
        Some("ka-source") => return ka_source(a[2], Path::new(a[3]), true),
        Some("ka-source-nohash") => return ka_source(a[2], Path::new(a[3]), false),
        Some("ka-node") => {
            return ka_node(Path::new(a[2]), a[3].parse().unwrap(), a.get(4).copied())
        }
        _ => {}
    }
    let mib: u64 = a
        .get(1)
        .map(|s| s.parse().expect("SIZE_MIB"))
        .unwrap_or(1024);
    let runs: usize = a.get(2).map(|s| s.parse().expect("RUNS")).unwrap_or(3);
    let size = mib << 20;
    let dir = tempfile::Builder::new()
        .prefix("ka-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let input = dir.path().join("image");
    {
        // Incompressible (xorshift) data: no zero blocks, nothing to skip.
        let f = std::fs::File::create(&input).unwrap();
        let mut buf = vec![0u8; BUF];
        let mut x = 0x243f6a8885a308d3u64;
        for i in 0..size / BUF as u64 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&buf, i * BUF as u64).unwrap();
        }
    }
    // Other work on the machine skews wall-clock rates; say how much there was.
    println!("load average at the start: {}", loadavg());
    hash_speeds(&input);
    let outs = [dir.path().join("out1"), dir.path().join("out2")];
    println!(
        "{mib} MiB image on tmpfs -> tmpfs over loopback TCP, {} CPUs, best of {runs} runs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<24} {:>9} {:>7} {:>14} {:>14} {:>12}",
        "scenario", "MB/s", "ratio", "CPU s/GiB all", "CPU s/GiB node", "peak RSS"
    );
    let scenarios = [
        "plain",
        "sendfile",
        "splice",
        "splice+hash",
        "ka 1 hop",
        "ka 1 hop, src no hash",
        "ka 2 hops",
    ];
    let mut ka_digest: Option<String> = None;
    let gib = size as f64 / (1u64 << 30) as f64;
    // Rounds interleave the scenarios, so load from other processes on a
    // shared machine spreads over all of them; the best run of each counts.
    let mut best: Vec<Option<(f64, f64, f64, u64)>> = vec![None; scenarios.len()];
    for _ in 0..runs {
        for (i, scenario) in scenarios.iter().enumerate() {
            for o in &outs {
                let _ = std::fs::remove_file(o);
            }
            let (wall, cpu, node_cpu, rss, digests) = run(scenario, &input, &outs, size);
            let n_out = if *scenario == "ka 2 hops" { 2 } else { 1 };
            for o in &outs[..n_out] {
                assert!(
                    files_equal(&input, o),
                    "{scenario}: output differs from the input"
                );
            }
            if scenario.starts_with("ka") {
                for d in digests.iter().filter(|d| *d != "-") {
                    let want = ka_digest.get_or_insert_with(|| d.clone());
                    assert_eq!(d, want, "{scenario}: digests differ");
                }
            }
            if best[i].is_none_or(|b| wall < b.0) {
                best[i] = Some((wall, cpu, node_cpu, rss));
            }
        }
    }
    let base = size as f64 / best[0].unwrap().0 / 1e6;
    for (scenario, b) in scenarios.iter().zip(&best) {
        let (wall, cpu, node_cpu, rss) = b.unwrap();
        let mbs = size as f64 / wall / 1e6;
        println!(
            "{scenario:<24} {mbs:>9.0} {:>7.2} {:>14.2} {:>14.2} {:>9} MiB",
            mbs / base,
            cpu / gib,
            node_cpu / gib,
            rss / 1024
        );
    }
    println!(
        "all outputs identical to the input; ka digest {}",
        ka_digest.unwrap_or_default()
    );
    println!("load average at the end: {}", loadavg());
}
