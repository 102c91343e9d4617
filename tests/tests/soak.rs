//! A soak run: 30 sessions in a row on loopback, each with a random fault
//! (a node killed, a node stopped for less or more than `--dead-after`,
//! every connection of a node cut, the source stopped for more than
//! `--dead-after` or killed and started again, or none) and attack traffic mixed
//! in (idle connections, garbage and oversized frames on the source's
//! port, a TFTP flood of forged requests and garbage at one long-lived
//! `ka tftp`). Every node that was not killed must end verified with a
//! copy identical to the image; the long-lived `ka tftp` must end the run
//! with as many descriptors and about the memory it had after warming up,
//! and still serve; no source may hold more descriptors or memory in a
//! late session than in an early one.
//!
//! The faults come from a seed, printed at the start: `KA_SOAK_SEED=N`
//! replays a run. Binds forged TFTP client addresses in 127.0.0.0/8, which
//! any process may bind on Linux.
//!
//! A source stopped for longer than `--dead-after` is silent to its nodes,
//! and those still receiving leave it and come back. Those that verified
//! their copy while it was stopped (its kernel still had the rest of the
//! stream queued) wait for their release instead: before they did, the
//! release it sent when it woke found their connections closed, and they
//! looked for it until `--wait` ran out and exited 1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ka_tests::{pseudo_random, read_text as read, KaTftp, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Sessions in the run.
const SESSIONS: usize = 30;
/// Nodes per session.
const NODES: usize = 3;
/// The image: 6 MiB of data, streamed at 4 MiB/s, so a fault lands in a
/// stream of about a second and a half.
const SIZE: usize = 6 << 20;
const PACE: &str = "4MiB";

/// A small seeded generator (xorshift64*), split from the run's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The fault of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// `kill -9` of a node, never started again.
    Kill(usize),
    /// SIGSTOP of a node for less than `--dead-after`, then SIGCONT.
    ShortStop(usize),
    /// SIGSTOP of a node for more than `--dead-after` (it is cut off for
    /// the source and its neighbours), then SIGCONT: it comes back.
    LongStop(usize),
    /// `kill -9` of the source, started again with the same arguments.
    SourceRestart,
    /// Every established TCP connection of a node destroyed at once
    /// (`ss -K`): its source, upstream and downstreams see it cut off, and
    /// it sees every connection fail; it rejoins and resumes.
    Cut(usize),
    /// SIGSTOP of the source for more than `--dead-after`, then SIGCONT:
    /// its own late timers must not make it declare its nodes dead, and
    /// nodes that took its silence for a loss rejoin.
    SourceStall,
}

impl Fault {
    fn draw(rng: &mut Rng) -> Fault {
        let node = rng.below(NODES as u64) as usize;
        match rng.below(7) {
            0 => Fault::None,
            1 => Fault::Kill(node),
            2 => Fault::ShortStop(node),
            3 => Fault::LongStop(node),
            4 => Fault::Cut(node),
            5 => Fault::SourceStall,
            _ => Fault::SourceRestart,
        }
    }
}

/// Descriptors process `pid` holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Destroys every established TCP connection of process `pid` (its
/// listening socket stays); returns how many.
fn cut(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_str()?.to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let established = f.get(3) == Some(&"01");
            let ours = inodes.iter().any(|i| f.get(9) == Some(&i.as_str()));
            (established && ours).then_some(())?;
            u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()
        })
        .collect();
    let ss = ka_tests::require_tool("ss", "iproute2");
    for port in &ports {
        let o = std::process::Command::new(&ss)
            .args(["-K", "-t", "src", &format!("127.0.0.1:{port}")])
            .output()
            .expect("ss runs");
        assert!(
            o.status.success(),
            "ss -K: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    ports.len()
}

fn signal(p: &Proc, sig: Signal) {
    kill(Pid::from_raw(p.pid() as i32), sig).expect("signal a node");
}

/// One session's files: secret, image, targets and state under `dir`.
struct Run {
    dir: PathBuf,
    secret: PathBuf,
    image: PathBuf,
}

impl Run {
    fn serve(&self, label: &str, session: &Path, port: u16) -> Proc {
        let listen = format!("127.0.0.1:{port}");
        let state = session.join("state");
        let args = [
            "serve",
            "--nodes",
            &NODES.to_string(),
            "--listen",
            &listen,
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--image",
            self.image.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--max-rate",
            PACE,
            "--json",
        ];
        let p = Proc::start(session, label, &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&p.err).contains("waiting for") {
            assert!(
                Instant::now() < deadline,
                "{label} did not listen: {}",
                read(&p.err)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    fn join(&self, session: &Path, port: u16, i: usize) -> Proc {
        let (server, name) = (format!("127.0.0.1:{port}"), format!("n{i}"));
        let target = session.join(format!("{name}.img"));
        let state = session.join("node-state");
        Proc::start(
            session,
            &name,
            &[
                "join",
                "--server",
                &server,
                "--secret-file",
                self.secret.to_str().unwrap(),
                "--name",
                &name,
                "--target",
                target.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--wait",
                "30s",
                "--json",
            ],
        )
    }
}

/// Waits (at most 20 s) until the source's progress shows node `name`
/// with at least `bytes`.
fn wait_received(serve: &Proc, name: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = read(&serve.out)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                v["progress"]
                    .as_array()?
                    .iter()
                    .find(|n| n["name"] == name)?["received"]
                    .as_u64()
            })
            .max()
            .unwrap_or(0);
        if got >= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {bytes} bytes (at {got}):\n{}",
            read(&serve.out)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Strangers on the source's port: idle connections (returned, held until
/// the session ends), garbage after the challenge, and frames announcing
/// 4 GiB.
fn attack_source(addr: SocketAddr, rng: &mut Rng) -> Vec<TcpStream> {
    let idle: Vec<TcpStream> = (0..5)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    for _ in 0..5 {
        if let Ok(mut c) = TcpStream::connect(addr) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.read(&mut [0u8; 64]);
            let junk = pseudo_random(100, rng.next());
            let _ = c.write_all(&junk);
        }
    }
    for _ in 0..3 {
        if let Ok(mut c) = TcpStream::connect(addr) {
            let mut frame = vec![0xff; 4];
            frame.extend(pseudo_random(1000, rng.next()));
            let _ = c.write_all(&frame);
        }
    }
    idle
}

/// A TFTP flood at `tftp`: read requests from 100 forged addresses (bound
/// sockets that never answer, returned to be held until the session ends)
/// and 50 garbage datagrams.
fn attack_tftp(tftp: SocketAddr, session: usize, rng: &mut Rng) -> Vec<UdpSocket> {
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(b"pxelinux.0\0octet\0");
    let forged: Vec<UdpSocket> = (0..100u32)
        .filter_map(|i| {
            let ip = std::net::Ipv4Addr::new(127, 3, session as u8, (i + 1) as u8);
            let s = UdpSocket::bind((ip, 0)).ok()?;
            s.send_to(&rrq, tftp).ok()?;
            Some(s)
        })
        .collect();
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..50 {
        let len = 1 + rng.below(600) as usize;
        let _ = junk.send_to(&pseudo_random(len, rng.next()), tftp);
    }
    forged
}

#[test]
fn thirty_sessions_with_faults_and_attacks_keep_every_survivor_verified_and_resources_flat() {
    let seed = std::env::var("KA_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak seed {seed} (replay with KA_SOAK_SEED={seed})");
    // One generator per use, split from the seed: drawn from one stream
    // with the attacks' hundred numbers between them, the faults came out
    // of xorshift's stride with whole kinds missing.
    let mut rng = Rng(seed | 1);
    let mut attack_rng = Rng((seed ^ 0x9e37_79b9_7f4a_7c15).rotate_left(29) | 1);
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    ka_tests::write_secret(&secret, seed ^ 0x50a);
    let image = dir.path().join("image.img");
    let bytes = pseudo_random(SIZE, seed ^ 0x1a6e);
    std::fs::write(&image, &bytes).unwrap();
    let run = Run {
        dir: dir.path().to_path_buf(),
        secret,
        image,
    };

    // The long-lived TFTP server, and a client it knows from the start.
    let inventory = ka_tests::write_inventory(&run.dir, "");
    let boot = b"a boot loader".to_vec();
    std::fs::write(run.dir.join("root/pxelinux.0"), &boot).unwrap();
    let tftp = KaTftp::start(&inventory, &run.dir.join("boot-state"), &[]);
    let tftp_pid = tftp.guard.child.id();
    let fetched = run.dir.join("fetched");
    tftp.get_hpa("pxelinux.0", &fetched);
    assert_eq!(
        std::fs::read(&fetched).unwrap_or_default(),
        boot,
        "ka tftp does not serve"
    );
    let (base_fds, base_rss) = (fds(tftp_pid), rss(tftp_pid));
    let mut tftp_peak_fds = base_fds;
    let mut sources: Vec<(usize, u64)> = Vec::new();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..SESSIONS {
        let fault = Fault::draw(&mut rng);

        let session = run.dir.join(format!("s{i:02}"));
        std::fs::create_dir_all(&session).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut serve = run.serve("serve", &session, port);
        let mut nodes: Vec<Option<Proc>> = (1..=NODES)
            .map(|n| Some(run.join(&session, port, n)))
            .collect();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let idle = attack_source(addr, &mut attack_rng);
        let forged = attack_tftp(tftp.addr, i, &mut attack_rng);
        let victim = |n: usize| format!("n{}", n + 1);
        let watched = match fault {
            Fault::Kill(n) | Fault::ShortStop(n) | Fault::LongStop(n) | Fault::Cut(n) => victim(n),
            _ => "n1".to_string(),
        };
        wait_received(&serve, &watched, SIZE as u64 / 3);
        tftp_peak_fds = tftp_peak_fds.max(fds(tftp_pid));
        sources.push((fds(serve.pid()), rss(serve.pid())));
        // A test slowed by a loaded machine may come when the stream is
        // over: the fault is then left out rather than landing after it.
        let fault = if read(&serve.out).contains("\"verified\"") {
            eprintln!("session {i}: the stream ended before its fault ({fault:?}): none");
            Fault::None
        } else {
            fault
        };
        let kind = format!("{fault:?}");
        *tally
            .entry(kind.split('(').next().unwrap_or_default().to_string())
            .or_default() += 1;
        let mut killed = None;
        match fault {
            Fault::None => {}
            Fault::Kill(n) => {
                nodes[n].take().expect("a node").kill9();
                killed = Some(victim(n));
            }
            Fault::ShortStop(n) | Fault::LongStop(n) => {
                let p = nodes[n].as_ref().expect("a node");
                signal(p, Signal::SIGSTOP);
                let pause = if fault == Fault::ShortStop(n) {
                    300
                } else {
                    1500
                };
                std::thread::sleep(Duration::from_millis(pause));
                signal(p, Signal::SIGCONT);
            }
            Fault::SourceRestart => {
                serve.kill9();
                serve = run.serve("serve-again", &session, port);
            }
            Fault::Cut(n) => {
                let p = nodes[n].as_ref().expect("a node");
                assert!(cut(p.pid()) > 0, "{} had no connection to cut", victim(n));
            }
            Fault::SourceStall => {
                signal(&serve, Signal::SIGSTOP);
                std::thread::sleep(Duration::from_millis(1500));
                signal(&serve, Signal::SIGCONT);
            }
        }
        let (code, out, err) = serve.finish(Duration::from_secs(60));
        let report = ka_tests::final_report(&out);
        let context = || format!("session {i} ({fault:?}, seed {seed}):\n{out}\n{err}");
        if fault == Fault::SourceStall {
            // Nodes may have left a silent source (and come back), but the
            // source must not have taken its own stall for their silence.
            assert!(
                !out.contains("no heartbeat"),
                "a stalled source declared a node silent: {}",
                context()
            );
        }
        let any_ko = report.nodes.iter().any(|n| !n.ok);
        assert_eq!(code, i32::from(any_ko), "exit status {code}: {}", context());
        assert_eq!(report.nodes.len(), NODES, "{}", context());
        // A node stopped past --dead-after is dead if the others finished
        // before it came back: a death for silence, never a wrong copy.
        let stopped_long = match fault {
            Fault::LongStop(n) => Some(victim(n)),
            _ => None,
        };
        let mut verified = Vec::new();
        for n in &report.nodes {
            if killed.as_deref() == Some(n.name.as_str()) {
                assert!(!n.ok, "the killed {} is OK: {}", n.name, context());
            } else if stopped_long.as_deref() == Some(n.name.as_str()) && !n.ok {
                assert!(
                    n.reason.contains("heartbeat"),
                    "{}: {}",
                    n.reason,
                    context()
                );
            } else {
                assert!(n.ok, "{} ({}): {}", n.name, n.reason, context());
                verified.push(n.name.clone());
            }
        }
        // Released nodes exit at once; all get the same few seconds.
        let deadline = Instant::now() + Duration::from_secs(3);
        for (k, p) in nodes.into_iter().enumerate() {
            let Some(mut p) = p else { continue };
            if !verified.contains(&victim(k)) {
                // Dead to the session, it looks for its source in vain.
                p.kill9();
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let status = ka_tests::wait_timeout(&mut p.guard.child, left);
            let (nout, nerr) = (read(&p.out), read(&p.err));
            // Released, it exits 0: even a node that verified while the
            // source was stopped waits for its release rather than leaving.
            assert!(
                status.is_some_and(|s| s.success()),
                "{} ended {status:?}: {nout}\n{nerr}\n{}",
                victim(k),
                context()
            );
            drop(p);
            let copy = std::fs::read(session.join(format!("{}.img", victim(k)))).unwrap();
            assert!(copy == bytes, "{}'s copy differs: {}", victim(k), context());
        }
        drop((idle, forged));
        std::fs::remove_dir_all(&session).unwrap();
    }

    // The TFTP server's transfers of forged requests end after their
    // retries (2 s each, twice): then it holds what it held at the start.
    std::thread::sleep(Duration::from_secs(7));
    let (end_fds, end_rss) = (fds(tftp_pid), rss(tftp_pid));
    let fetched_again = run.dir.join("fetched-again");
    tftp.get_hpa("pxelinux.0", &fetched_again);
    let first = |s: &[(usize, u64)]| {
        s.iter()
            .copied()
            .fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)))
    };
    let (early, late) = (first(&sources[..10]), first(&sources[SESSIONS - 10..]));
    eprintln!(
        "soak: {SESSIONS} sessions in {:.0} s, faults {tally:?}; ka tftp {base_fds} → {end_fds} descriptors \
         (at most {tftp_peak_fds} under a flood), {} → {} KiB; sources at most {} / {} descriptors and \
         {} / {} KiB (first / last ten sessions)",
        t0.elapsed().as_secs_f64(),
        base_rss / 1024,
        end_rss / 1024,
        early.0,
        late.0,
        early.1 / 1024,
        late.1 / 1024
    );
    assert_eq!(
        std::fs::read(&fetched_again).unwrap_or_default(),
        boot,
        "ka tftp no longer serves:\n{}",
        tftp.log()
    );
    assert!(
        end_fds <= base_fds + 2,
        "ka tftp went from {base_fds} to {end_fds} descriptors"
    );
    // A transfer holds a socket and at most one open file; forged requests
    // hold at most the unproven half of the table (128 transfers), and the
    // known client none by then.
    assert!(
        tftp_peak_fds <= base_fds + 2 * 128 + 4,
        "ka tftp held {tftp_peak_fds} descriptors under a flood"
    );
    assert!(
        end_rss <= base_rss + (8 << 20),
        "ka tftp grew from {base_rss} to {end_rss} bytes"
    );
    assert!(
        late.0 <= early.0 + 4,
        "sources held {} descriptors late, {} early",
        late.0,
        early.0
    );
    assert!(
        late.1 <= early.1 + (16 << 20),
        "sources held {} bytes late, {} early",
        late.1,
        early.1
    );
}

#[test]
fn every_fault_is_drawn() {
    let mut rng = Rng(12345);
    let kinds: std::collections::BTreeSet<String> = (0..500)
        .map(|_| format!("{:?}", Fault::draw(&mut rng)))
        .map(|k| k.split('(').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(kinds.len(), 7, "{kinds:?}");
}
