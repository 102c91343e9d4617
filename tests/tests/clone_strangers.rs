//! Strangers on the source's port: connections that never answer the
//! challenge, that announce huge frames, that flood the listener past the
//! process's descriptors, or that come and go by the ten thousand. The
//! session's own nodes must clone regardless, and the source must not grow.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ka_tests::{pseudo_random, read_text as read, Proc};

/// Starts `ka ARGS` in `dir`; with `nofile`, under that descriptor limit.
fn start(dir: &Path, label: &str, args: &[&str], nofile: Option<u64>) -> Proc {
    start_limited(dir, label, args, nofile.map(|n| (n, n)))
}

/// Starts `ka ARGS` in `dir`; with `nofile`, under that soft and hard
/// descriptor limit.
fn start_limited(dir: &Path, label: &str, args: &[&str], nofile: Option<(u64, u64)>) -> Proc {
    Proc::start_with(dir, label, args, |cmd| {
        if let Some((soft, hard)) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches nothing of
            // the parent's; it runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    })
}

/// A session directory with a secret and an image.
struct Session {
    dir: tempfile::TempDir,
    image: PathBuf,
    addr: std::cell::Cell<Option<SocketAddr>>,
}

impl Session {
    fn new(size: usize) -> Session {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let seed = u64::from(std::process::id()) ^ size as u64;
        ka_tests::write_secret(&secret, seed);
        let image = dir.path().join("image.img");
        std::fs::write(&image, pseudo_random(size, seed + 1)).unwrap();
        Session {
            dir,
            image,
            addr: std::cell::Cell::new(None),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Starts `ka serve` for `nodes` on a port the kernel picks, and learns it.
    fn serve(&self, nodes: u32, nofile: Option<u64>) -> Proc {
        let n = nodes.to_string();
        let (secret, image) = (self.path("secret"), self.path("image.img"));
        let (spool, state) = (self.path(""), self.path("state"));
        let args = [
            "serve",
            "--nodes",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            &secret,
            "--image",
            &image,
            "--spool-dir",
            &spool,
            "--state-dir",
            &state,
            "--json",
        ];
        let p = start(self.dir.path(), "serve", &args, nofile);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(port) = read(&p.err)
                .lines()
                .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
            {
                let port: u16 = port.trim().parse().expect("a port number");
                self.addr
                    .set(Some(SocketAddr::from(([127, 0, 0, 1], port))));
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ka serve did not start listening: {}", read(&p.err));
    }

    fn addr(&self) -> SocketAddr {
        self.addr.get().expect("a source started")
    }

    fn join(&self, name: &str) -> Proc {
        self.join_limited(name, None)
    }

    /// Starts `ka join` as node `name`; with `nofile`, under that
    /// descriptor limit.
    fn join_limited(&self, name: &str, nofile: Option<u64>) -> Proc {
        let server = self.addr().to_string();
        let (secret, target) = (self.path("secret"), self.path(&format!("{name}.img")));
        let (spool, state) = (self.path(""), self.path("state"));
        let args = [
            "join",
            "--server",
            &server,
            "--secret-file",
            &secret,
            "--name",
            name,
            "--target",
            &target,
            "--spool-dir",
            &spool,
            "--state-dir",
            &state,
            "--wait",
            "60s",
        ];
        start(self.dir.path(), name, &args, nofile)
    }

    /// The nodes `names` join, the session ends well, and every copy is
    /// the image. Returns what the source wrote on standard error.
    fn clone_to(&self, serve: Proc, names: &[&str]) -> String {
        let nodes: Vec<Proc> = names.iter().map(|n| self.join(n)).collect();
        self.finish_clone(serve, names, nodes)
    }

    /// [`Session::clone_to`] with the nodes already started.
    fn finish_clone(&self, serve: Proc, names: &[&str], nodes: Vec<Proc>) -> String {
        let (code, out, err) = serve.finish(Duration::from_secs(120));
        assert_eq!(code, 0, "serve failed:\n{out}\n{err}");
        let report = ka_tests::final_report(&out);
        assert_eq!(report.nodes.len(), names.len(), "{out}");
        assert!(report.nodes.iter().all(|n| n.ok), "{out}");
        let image = std::fs::read(&self.image).unwrap();
        for (name, p) in names.iter().zip(nodes) {
            let (code, _, err) = p.finish(Duration::from_secs(30));
            assert_eq!(code, 0, "{name}: {err}");
            let copy = std::fs::read(self.path(&format!("{name}.img"))).unwrap();
            assert!(copy == image, "{name}'s copy differs from the image");
        }
        err
    }
}

/// A connection to `to` from the loopback address `from` (any 127/8
/// address is this machine), so strangers can come from other addresses
/// than the nodes.
fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(to) = to else {
        unreachable!("the source listens on IPv4")
    };
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (local, remote) = (sockaddr(from, 0), sockaddr(to.ip().octets(), to.port()));
    // SAFETY: a fresh socket is owned at once; bind and connect get a valid
    // sockaddr_in and its size.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        check(libc::bind(
            raw,
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        check(libc::connect(
            raw,
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        Ok(TcpStream::from(fd))
    }
}

/// Whether the peer closed `conn` within `within` (reading and dropping
/// whatever it sent before).
fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(start.elapsed())
            }
            Err(_) => return None,
        }
    }
}

/// How each of `conns` ends within `within`: `None` while still open,
/// `Some(challenged)` once the peer closed it, `challenged` telling whether
/// it sent anything first. Watched all at once, a sweep every 50 ms.
fn ends_within(conns: &mut [TcpStream], within: Duration) -> Vec<Option<bool>> {
    let deadline = Instant::now() + within;
    let mut sent = vec![false; conns.len()];
    let mut ends: Vec<Option<bool>> = vec![None; conns.len()];
    for c in conns.iter() {
        c.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && ends.iter().any(Option::is_none) {
        for (i, c) in conns.iter_mut().enumerate() {
            if ends[i].is_some() {
                continue;
            }
            loop {
                match c.read(&mut buf) {
                    Ok(0) => ends[i] = Some(sent[i]),
                    Ok(_) => {
                        sent[i] = true;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        ends[i] = Some(sent[i])
                    }
                    Err(_) => {}
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ends
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kb * 1024
}

#[test]
fn a_connection_that_never_answers_is_closed_after_the_handshake_timeout() {
    let s = Session::new(1 << 20);
    let serve = s.serve(1, None);
    let mut idle = TcpStream::connect(s.addr()).unwrap();
    let waited = closed_within(&mut idle, Duration::from_secs(15))
        .expect("the source keeps a silent connection open past 15 s");
    assert!(
        waited >= Duration::from_secs(4) && waited <= Duration::from_secs(8),
        "closed after {waited:?}, not after the 5 s handshake timeout"
    );
    // A stranger that announces a frame longer than any first message is
    // closed at once, before it can make the source hold 64 KiB for it.
    let mut big = TcpStream::connect(s.addr()).unwrap();
    big.write_all(&60_000u32.to_be_bytes()).unwrap();
    big.write_all(&[0u8; 1000]).unwrap();
    let waited = closed_within(&mut big, Duration::from_secs(3))
        .expect("a stranger's 60 KB frame header kept its connection open");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    s.clone_to(serve, &["n1"]);
}

#[test]
fn fifteen_hundred_idle_strangers_do_not_stop_a_session() {
    // The source may hold 1024 descriptors: more strangers than that, all
    // silent, held open by this test while two nodes clone.
    let s = Session::new(8 << 20);
    let serve = s.serve(2, Some(1024));
    let mut strangers = Vec::new();
    for _ in 0..1500 {
        match connect_from([127, 0, 0, 2], s.addr()) {
            Ok(c) => strangers.push(c),
            Err(e) => panic!("connecting stranger {}: {e}", strangers.len()),
        }
    }
    // The source challenges every connection it admits and closes one past
    // the cap at once, unread and unchallenged. So how each stranger ends
    // tells which way it went, however slowly a loaded machine accepts:
    // without the cap every one of them would be challenged. At most 64
    // from one address are admitted per 5 s handshake timeout.
    let ends = ends_within(&mut strangers, Duration::from_secs(40));
    let open = ends.iter().filter(|e| e.is_none()).count();
    let challenged = ends.iter().filter(|e| **e == Some(true)).count();
    assert_eq!(open, 0, "{open} strangers still open after 40 s");
    assert!(
        (64..=500).contains(&challenged),
        "{challenged} of 1500 strangers were challenged; the cap admits 64 from one address per handshake timeout"
    );
    s.clone_to(serve, &["n1", "n2"]);
    drop(strangers);
}

#[test]
fn a_source_out_of_descriptors_pauses_and_goes_on() {
    // 48 descriptors: a few dozen strangers exhaust them; the source must
    // wait for its handshake timeout to free them, not end the session.
    let s = Session::new(4 << 20);
    let serve = s.serve(2, Some(48));
    let strangers: Vec<TcpStream> = (0..60)
        .map(|_| connect_from([127, 0, 0, 3], s.addr()).expect("a stranger connects"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let err = s.clone_to(serve, &["n1", "n2"]);
    assert!(
        err.contains("cannot accept a connection"),
        "the source never ran out of descriptors:\n{err}"
    );
    drop(strangers);
}

#[test]
fn connections_that_come_and_go_leave_no_memory_behind() {
    let s = Session::new(4 << 20);
    let serve = s.serve(2, None);
    let cycle = |n: usize| {
        for _ in 0..n {
            let mut c = TcpStream::connect(s.addr()).unwrap();
            // The challenge arrives once the source has taken the
            // connection in: each cycle costs it a task and a record.
            let mut len = [0u8; 4];
            c.read_exact(&mut len).expect("a challenge");
        }
    };
    cycle(2_000);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss(serve.pid());
    cycle(20_000);
    std::thread::sleep(Duration::from_millis(300));
    let after = rss(serve.pid());
    eprintln!("source VmRSS: {before} bytes before 20,000 cycles, {after} after");
    assert!(
        after < before + (4 << 20),
        "the source grew from {before} to {after} bytes over 20,000 connections"
    );
    s.clone_to(serve, &["n1", "n2"]);
}

#[test]
fn a_flood_of_bad_joins_is_logged_with_addresses_a_few_lines_a_second() {
    let s = Session::new(1 << 20);
    let serve = s.serve(1, None);
    std::fs::write(s.dir.path().join("wrong"), "5a".repeat(32)).unwrap();
    let (server, wrong) = (s.addr().to_string(), s.path("wrong"));
    // 80 operators with the wrong secret, from 127.0.0.1, in about a
    // second or two: each one is refused.
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..20 {
                    let out = ka_tests::ka(&["go", "--server", &server, "--secret-file", &wrong]);
                    let said = ka_tests::stderr(&out);
                    assert!(
                        said.contains("refused"),
                        "a wrong secret was not refused: {said}"
                    );
                }
            });
        }
    });
    let flood = t0.elapsed();
    // The count of what was left out is logged once its second is over.
    std::thread::sleep(Duration::from_millis(1500));
    let err = s.clone_to(serve, &["n1"]);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("refused 127.0.0.1:"))
        .collect();
    let seconds = flood.as_secs_f64().ceil() as usize + 2;
    eprintln!(
        "{} refusal lines for 80 bad joins in {flood:?}",
        lines.len()
    );
    assert!(!lines.is_empty(), "no refusal names its peer:\n{err}");
    assert!(
        lines.len() <= 5 * seconds,
        "{} refusal lines in about {seconds} s:\n{err}",
        lines.len()
    );
    assert!(
        err.contains("more connection(s) not logged"),
        "the refusals left out are not counted:\n{err}"
    );
}

/// The soft limit on open files of process `pid`.
fn soft_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn ka_raises_its_soft_descriptor_limit_to_the_hard_limit() {
    let s = Session::new(1 << 20);
    let serve = start_limited(
        s.dir.path(),
        "serve",
        &[
            "serve",
            "--nodes",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--image",
            &s.path("image.img"),
            "--secret-file",
            &s.path("secret"),
            "--state-dir",
            &s.path("state"),
        ],
        Some((64, 4096)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let soft = soft_nofile(serve.pid());
        if soft == Some(4096) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ka's soft limit stayed at {soft:?}, not the hard limit 4096"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    serve.kill9();
}

/// The TCP port process `pid` listens on (its only listening socket).
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let listening = f.get(3) == Some(&"0A");
        if !listening || !inodes.iter().any(|i| f.get(9) == Some(&i.as_str())) {
            return None;
        }
        u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()
    })
}

/// CPU time process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime, fields 14 and 15 of stat(5).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_node_out_of_descriptors_waits_without_spinning() {
    let s = Session::new(4 << 20);
    let serve = s.serve(2, None);
    // A node with 40 descriptors and strangers on its data port past them.
    let n1 = s.join_limited("n1", Some(40));
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(p) = listening_port(n1.pid()) {
            break p;
        }
        assert!(Instant::now() < deadline, "n1 never listened");
        std::thread::sleep(Duration::from_millis(50));
    };
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let strangers: Vec<TcpStream> = (0..100)
        .map(|_| connect_from([127, 0, 0, 4], to).expect("a stranger connects"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (t0, before) = (Instant::now(), cpu_ticks(n1.pid()));
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(n1.pid()) - before;
    // SAFETY: sysconf only reads a constant of the system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / per_sec / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.25,
        "a node out of descriptors used {:.0} % of a CPU",
        share * 100.0
    );
    drop(strangers);
    let n2 = s.join("n2");
    s.finish_clone(serve, &["n1", "n2"], vec![n1, n2]);
}
