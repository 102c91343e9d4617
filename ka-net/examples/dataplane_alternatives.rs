//! The alternatives behind the data plane's choices, measured side by side
//! on loopback: how to send, and how a node can receive, hash and write a
//! stream. (The product itself is measured by `scripts/bench`, which runs
//! the real `ka` processes.)
//!
//! ```text
//! cargo run --release -p ka-net --example dataplane_alternatives [-- SIZE_MIB [ROUNDS [VARIANTS]]]
//! ```
//!
//! VARIANTS is a comma-separated list of `name:MiB` (buffer size), by
//! default all of them. A 1 GiB incompressible image on tmpfs goes to a tmpfs
//! file; every variant runs as two fresh processes (sender, receiver), rounds
//! interleave the variants, and each is printed with its best rate and the
//! least CPU time per GiB of each side over the rounds. Receivers that hash must agree on the
//! digest, and every copy is compared with the image.
//!
//! Senders: `sendfile` (from the page cache, no user-space copy) for all
//! receivers but `plain/rw`, whose sender is a `read`/`write` loop.
//!
//! Receivers (`|` separates threads):
//! - `plain`: `read`/`write` loop, no hash: the cost of receiving at all.
//! - `inline`: `recv` → hash → `pwrite` on one thread.
//! - `recv+hash|write`: hash on the receiving thread, a writer thread.
//! - `recv+hash256|write`: the same, receiving and hashing 256 KiB at a time
//!   into the buffer, so the hash reads what `recv` just put in the cache.
//! - `recv|write+hash`: a thread that writes then hashes each buffer.
//! - `recv+write|hash`: receive and write on one thread (the buffer is still
//!   in its cache for the write), hash on another.
//! - `recv|write|hash`: writer and hasher threads of their own (ka's shape).
//! - `splice`: socket → pipe → file by `splice(2)`, no hash: the cost of
//!   the one copy left.
//! - `splice+mmap`: socket → pipe → file by `splice(2)`, hashed through a
//!   populated read-only mapping of the page cache just written.
//! - `splice+pread`: the same, hashed by reading the file back in 256 KiB.
//! - `ka`: ka's own code: `send_growing` of a complete file (how `ka serve`
//!   sends a file image) → `relay` into a `NodeWriter` (records, zero-block
//!   scan, canonical digest).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use ka_net::image::sources::FileSource;
use ka_net::{
    open_sink, relay, send_growing, DigestKey, ImageHasher, NodeWriter, SinkSpec, Written,
};

const KEY: DigestKey = DigestKey([0x5a; 32]);
/// Buffers in flight in the threaded receivers.
const RING: usize = 4;

/// CPU seconds (user + system) of this process so far.
fn cpu() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

/// Printed by every child at its end; parsed by the parent.
fn report(start: Instant, digest: &str) {
    println!(
        "RESULT {:.6} {:.3} {digest}",
        start.elapsed().as_secs_f64(),
        cpu()
    );
}

fn send(mode: &str, addr: &str, input: &Path) {
    if mode == "ka" {
        return tokio_rt().block_on(async {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let start = Instant::now();
            let source = FileSource::open(input).expect("open");
            let size = std::fs::metadata(input).expect("stat").len();
            // The whole file is written: the send follows nothing.
            let (_written, complete) = tokio::sync::watch::channel(Written {
                upto: size,
                size: Some(size),
            });
            send_growing(
                source,
                &mut s,
                complete,
                None,
                ka_net::Payload::Lent,
                |_| {},
            )
            .await
            .expect("send");
            report(start, "-");
        });
    }
    let mut s = TcpStream::connect(addr).expect("connect");
    let start = Instant::now();
    let mut f = std::fs::File::open(input).expect("open");
    if mode == "rw" {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("send");
        }
    } else {
        let len = f.metadata().expect("stat").len() as i64;
        let mut off: i64 = 0;
        while off < len {
            let n = nix::sys::sendfile::sendfile64(s.as_fd(), f.as_fd(), Some(&mut off), 1 << 20)
                .expect("sendfile");
            assert!(n > 0);
        }
    }
    report(start, "-");
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Fills `buf` from the socket (fewer bytes only at the end of the stream).
fn recv_full(s: &TcpStream, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let k = nix::sys::socket::recv(
            s.as_raw_fd(),
            &mut buf[n..],
            nix::sys::socket::MsgFlags::MSG_WAITALL,
        )
        .expect("recv");
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

fn out_file(out: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .expect("create output")
}

type Piece = (Arc<Vec<u8>>, usize, u64);

/// Receives into a ring of `RING` buffers and hands each filled one to
/// `stage` (on its own thread), which returns it when done.
fn receive_ring(
    s: &TcpStream,
    bufsz: usize,
    stage: impl FnOnce(mpsc::Receiver<Piece>, mpsc::Sender<Arc<Vec<u8>>>) -> String + Send + 'static,
) -> String {
    let (full_tx, full_rx) = mpsc::sync_channel::<Piece>(RING);
    let (free_tx, free_rx) = mpsc::channel::<Arc<Vec<u8>>>();
    for _ in 0..RING {
        free_tx.send(Arc::new(vec![0u8; bufsz])).expect("ring");
    }
    let worker = std::thread::spawn(move || stage(full_rx, free_tx));
    let mut off = 0u64;
    loop {
        let mut buf = free_rx.recv().expect("a buffer comes back");
        let n = recv_full(
            s,
            Arc::get_mut(&mut buf).expect("returned buffers are unshared"),
        );
        if n == 0 {
            break;
        }
        full_tx.send((buf, n, off)).expect("stage alive");
        off += n as u64;
    }
    drop(full_tx);
    worker.join().expect("stage")
}

fn receive(variant: &str, out: &Path, bufsz: usize) {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    println!("PORT {}", l.local_addr().expect("addr").port());
    std::io::stdout().flush().expect("flush");
    if variant == "ka" {
        let size = std::fs::metadata(out.with_file_name("image"))
            .expect("image")
            .len();
        return tokio_rt().block_on(async {
            let l = tokio::net::TcpListener::from_std({
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .expect("listener");
            let (up, _) = l.accept().await.expect("accept");
            let start = Instant::now();
            let sink = open_sink(&SinkSpec::File(out.to_owned()), Some(size)).expect("sink");
            let mut w = NodeWriter::new(sink, ImageHasher::new(&KEY)).expect("writer");
            let end = relay(&up, &[], &mut w, None, |_| {}).await.expect("relay");
            report(start, &end.digest.expect("a hashing writer").to_string());
        });
    }
    let (s, _) = l.accept().expect("accept");
    let start = Instant::now();
    let f = out_file(out);
    let digest = match variant {
        "plain" => {
            let (mut s, mut f) = (s, f);
            let mut buf = vec![0u8; bufsz];
            loop {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n]).expect("write");
            }
            "-".to_string()
        }
        "inline" => {
            let mut h = ImageHasher::new(&KEY);
            let mut buf = vec![0u8; bufsz];
            let mut off = 0u64;
            loop {
                let n = recv_full(&s, &mut buf);
                if n == 0 {
                    break;
                }
                h.data(off, &buf[..n]).expect("hash");
                f.write_all_at(&buf[..n], off).expect("write");
                off += n as u64;
            }
            h.finish(off).expect("digest").to_string()
        }
        "recv+hash|write" | "recv+hash256|write" => {
            let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize, u64)>(RING);
            let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
            for _ in 0..RING {
                free_tx.send(vec![0u8; bufsz]).expect("ring");
            }
            let writer = std::thread::spawn(move || {
                for (buf, n, off) in full_rx {
                    f.write_all_at(&buf[..n], off).expect("write");
                    let _ = free_tx.send(buf);
                }
            });
            let mut h = ImageHasher::new(&KEY);
            let mut off = 0u64;
            // Hash each piece right after receiving it, while it is still in
            // this core's cache.
            let piece = if variant == "recv+hash|write" {
                bufsz
            } else {
                256 << 10
            };
            loop {
                let mut buf = free_rx.recv().expect("buffer");
                let mut n = 0;
                while n < bufsz {
                    let k = recv_full(&s, &mut buf[n..(n + piece).min(bufsz)]);
                    if k == 0 {
                        break;
                    }
                    h.data(off + n as u64, &buf[n..n + k]).expect("hash");
                    n += k;
                }
                if n == 0 {
                    break;
                }
                full_tx.send((buf, n, off)).expect("writer alive");
                off += n as u64;
            }
            drop(full_tx);
            writer.join().expect("writer");
            h.finish(off).expect("digest").to_string()
        }
        "recv+write|hash" => {
            let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize, u64)>(RING);
            let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
            for _ in 0..RING {
                free_tx.send(vec![0u8; bufsz]).expect("ring");
            }
            let hasher = std::thread::spawn(move || {
                let mut h = ImageHasher::new(&KEY);
                let mut end = 0;
                for (buf, n, off) in full_rx {
                    h.data(off, &buf[..n]).expect("hash");
                    end = off + n as u64;
                    let _ = free_tx.send(buf);
                }
                h.finish(end).expect("digest").to_string()
            });
            let mut off = 0u64;
            loop {
                let mut buf = free_rx.recv().expect("buffer");
                let n = recv_full(&s, &mut buf);
                if n == 0 {
                    break;
                }
                f.write_all_at(&buf[..n], off).expect("write");
                full_tx.send((buf, n, off)).expect("hasher alive");
                off += n as u64;
            }
            drop(full_tx);
            hasher.join().expect("hasher")
        }
        "recv|write+hash" => receive_ring(&s, bufsz, move |full, free| {
            let mut h = ImageHasher::new(&KEY);
            let mut end = 0;
            for (buf, n, off) in full {
                f.write_all_at(&buf[..n], off).expect("write");
                h.data(off, &buf[..n]).expect("hash");
                end = off + n as u64;
                let _ = free.send(buf);
            }
            h.finish(end).expect("digest").to_string()
        }),
        "recv|write|hash" => receive_ring(&s, bufsz, move |full, free| {
            let (hash_tx, hash_rx) = mpsc::channel::<Piece>();
            let hasher = std::thread::spawn(move || {
                let mut h = ImageHasher::new(&KEY);
                let mut end = 0;
                for (buf, n, off) in hash_rx {
                    h.data(off, &buf[..n]).expect("hash");
                    end = off + n as u64;
                    let _ = free.send(buf);
                }
                h.finish(end).expect("digest").to_string()
            });
            for (buf, n, off) in full {
                f.write_all_at(&buf[..n], off).expect("write");
                hash_tx.send((buf, n, off)).expect("hasher alive");
            }
            drop(hash_tx);
            hasher.join().expect("hasher")
        }),
        "splice" | "splice+mmap" | "splice+pread" => {
            use nix::fcntl::{splice, SpliceFFlags};
            let (pr, pw) = nix::unistd::pipe().expect("pipe");
            nix::fcntl::fcntl(
                pw.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETPIPE_SZ(bufsz as i32),
            )
            .expect("pipe size");
            let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_MORE;
            let mut h = ImageHasher::new(&KEY);
            let mut off: i64 = 0;
            let mut hashed = 0u64;
            let mut rbuf = vec![0u8; 256 << 10];
            let step = 2u64 << 20;
            loop {
                let n = splice(s.as_fd(), None, pw.as_fd(), None, bufsz, flags).expect("splice");
                let mut left = n;
                while left > 0 {
                    left -= splice(pr.as_fd(), None, f.as_fd(), Some(&mut off), left, flags)
                        .expect("splice");
                }
                let upto = if n == 0 {
                    off as u64
                } else {
                    off as u64 - off as u64 % step
                };
                if upto > hashed && variant != "splice" {
                    if variant == "splice+mmap" {
                        hash_mapped(&f, &mut h, hashed, upto);
                    } else {
                        while hashed < upto {
                            let k = rbuf.len().min((upto - hashed) as usize);
                            f.read_exact_at(&mut rbuf[..k], hashed).expect("read back");
                            h.data(hashed, &rbuf[..k]).expect("hash");
                            hashed += k as u64;
                        }
                    }
                    hashed = upto;
                }
                if n == 0 {
                    break;
                }
            }
            if variant == "splice" {
                "-".into()
            } else {
                h.finish(off as u64).expect("digest").to_string()
            }
        }
        _ => panic!("unknown variant {variant}"),
    };
    report(start, &digest);
}

/// Hashes `[from, to)` of `f` through a populated read-only mapping.
fn hash_mapped(f: &std::fs::File, h: &mut ImageHasher, from: u64, to: u64) {
    let len = (to - from) as usize;
    let flags = nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_POPULATE;
    // SAFETY: a read-only shared mapping of bytes this process has written
    // and nobody truncates; unmapped before it returns, no slice survives.
    unsafe {
        let ptr = nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(len).expect("non-empty"),
            nix::sys::mman::ProtFlags::PROT_READ,
            flags,
            f,
            from as i64,
        )
        .expect("mmap");
        h.data(
            from,
            std::slice::from_raw_parts(ptr.as_ptr() as *const u8, len),
        )
        .expect("hash");
        nix::sys::mman::munmap(ptr, len).expect("munmap");
    }
}

fn hash_file(p: &Path) -> blake3::Hash {
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

fn child_result(out: &str) -> (f64, f64, String) {
    let line = out
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT in {out:?}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f[1].parse().expect("wall"),
        f[2].parse().expect("cpu"),
        f[3].to_string(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.get(1).copied() {
        Some("send") => return send(a[2], a[3], Path::new(a[4])),
        Some("receive") => {
            return receive(a[2], Path::new(a[3]), a[4].parse().expect("buffer size"))
        }
        _ => {}
    }
    let mib: u64 = a.get(1).map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let rounds: usize = a.get(2).map_or(3, |s| s.parse().expect("ROUNDS"));
    let variants: Vec<String> = a.get(3).map_or_else(
        || {
            [
                "plain/rw:1",
                "plain:1",
                "inline:1",
                "inline:0.25",
                "recv+hash|write:1",
                "recv+hash256|write:1",
                "recv|write+hash:1",
                "recv|write+hash:0.25",
                "recv|write|hash:1",
                "recv|write|hash:4",
                "splice+mmap:1",
                "splice+pread:1",
                "ka:1",
            ]
            .map(String::from)
            .to_vec()
        },
        |s| s.split(',').map(String::from).collect(),
    );
    let size = mib << 20;
    let dir = tempfile::Builder::new()
        .prefix("ka-alternatives")
        .tempdir_in("/dev/shm")
        .expect("tmpfs directory");
    let input = dir.path().join("image");
    {
        let f = std::fs::File::create(&input).expect("image");
        let mut buf = vec![0u8; 1 << 20];
        let mut x = 0x243f6a8885a308d3u64;
        for i in 0..size >> 20 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&buf, i << 20).expect("write image");
        }
    }
    let want = hash_file(&input);
    let out = dir.path().join("out");
    let exe = std::env::current_exe().expect("own path");
    let gib = size as f64 / (1u64 << 30) as f64;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{mib} MiB tmpfs -> tmpfs over loopback, best of {rounds} rounds; load {}",
        load().trim()
    );
    let mut best: Vec<Option<(f64, f64, f64)>> = vec![None; variants.len()];
    let mut digest: Option<String> = None;
    for _ in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            let (name, mib) = v.split_once(':').expect("name:MiB");
            let bufsz = (mib.parse::<f64>().expect("MiB") * (1 << 20) as f64) as usize;
            let (recv_mode, send_mode) = match name {
                "plain/rw" => ("plain", "rw"),
                "ka" => ("ka", "ka"),
                n => (n, "sendfile"),
            };
            let _ = std::fs::remove_file(&out);
            let mut r = Command::new(&exe)
                .args([
                    "receive",
                    recv_mode,
                    out.to_str().expect("utf-8"),
                    &bufsz.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("receiver");
            let mut rout = BufReader::new(r.stdout.take().expect("stdout"));
            let mut line = String::new();
            rout.read_line(&mut line).expect("port");
            let addr = format!("127.0.0.1:{}", line.trim().trim_start_matches("PORT "));
            let s = Command::new(&exe)
                .args(["send", send_mode, &addr, input.to_str().expect("utf-8")])
                .output()
                .expect("sender");
            let mut rest = String::new();
            rout.read_to_string(&mut rest).expect("result");
            assert!(r.wait().expect("wait").success() && s.status.success());
            let (wall, rcpu, d) = child_result(&rest);
            let (_, scpu, _) = child_result(&String::from_utf8_lossy(&s.stdout));
            assert!(hash_file(&out) == want, "{v}: the copy differs");
            if d != "-" {
                assert_eq!(digest.get_or_insert(d.clone()), &d, "{v}: digests differ");
            }
            // The fastest round, and the least CPU of any round: on a
            // shared machine other load inflates both, each in its own way.
            best[i] = Some(match best[i] {
                None => (wall, rcpu / gib, scpu / gib),
                Some((w, r, s)) => (w.min(wall), r.min(rcpu / gib), s.min(scpu / gib)),
            });
        }
    }
    // The baseline: receiving without hashing, from a sendfile sender.
    let base = variants
        .iter()
        .position(|v| v.starts_with("plain:"))
        .and_then(|i| best[i])
        .map_or(1.0, |b| b.0);
    println!(
        "{:<24} {:>7} {:>7} {:>16} {:>16}",
        "receiver:buffer MiB", "MB/s", "ratio", "receiver s/GiB", "sender s/GiB"
    );
    for (v, b) in variants.iter().zip(&best) {
        let (wall, r, s) = b.expect("ran");
        println!(
            "{v:<24} {:>7.0} {:>7.2} {r:>16.2} {s:>16.2}",
            size as f64 / wall / 1e6,
            base / wall
        );
    }
    println!(
        "MB/s: best round; CPU s/GiB: least of any round; ratio: against plain:1 (sendfile sender); load {}",
        load().trim()
    );
}
