//! Following a clone from the source: every node's lines (its events, its
//! console log, the source's events about it) land in its log file and on
//! the system log socket; a node that cannot start says so; `ka console`
//! follows the files live. Real `ka serve`/`ka join` processes on
//! loopback; the system log is a datagram socket the test binds.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ka_tests::{final_report, pseudo_random, read_text, write_secret, Proc};

/// A session's files: secret, image, log directory, syslog socket.
struct Logged {
    dir: tempfile::TempDir,
    secret: PathBuf,
    image: PathBuf,
    logs: PathBuf,
    /// What the syslog socket received, read as it comes (a datagram
    /// socket holds only a few unread).
    syslog: Arc<Mutex<Vec<String>>>,
    stop_syslog: Arc<AtomicBool>,
    syslog_path: PathBuf,
    port: u16,
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.stop_syslog.store(true, Ordering::Relaxed);
    }
}

impl Logged {
    fn new(size: usize) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        write_secret(&secret, u64::from(std::process::id()) ^ 0x0106);
        let image = dir.path().join("image.img");
        std::fs::File::create(&image)
            .unwrap()
            .write_all_at(&pseudo_random(size, 7), 0)
            .unwrap();
        let syslog_path = dir.path().join("syslog.sock");
        let socket = UnixDatagram::bind(&syslog_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let syslog = Arc::new(Mutex::new(Vec::new()));
        let stop_syslog = Arc::new(AtomicBool::new(false));
        {
            let (syslog, stop) = (syslog.clone(), stop_syslog.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                        syslog.lock().unwrap().push(line);
                    }
                }
            });
        }
        Logged {
            stop_syslog,
            logs: dir.path().join("logs"),
            dir,
            secret,
            image,
            syslog,
            syslog_path,
            port: 0,
        }
    }

    /// Starts `ka serve --json` with the log directory and syslog socket,
    /// and learns its port.
    fn serve(&mut self, nodes: u32, extra: &[&str]) -> Proc {
        let n = nodes.to_string();
        let state = self.dir.path().join("state");
        let mut args = vec![
            "serve",
            "--nodes",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--image",
            self.image.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--log-dir",
            self.logs.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let sock = self.syslog_path.clone();
        let p = Proc::start_with(self.dir.path(), "serve", &args, |c| {
            c.env("KA_SYSLOG_SOCKET", &sock);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(port) = read_text(&p.err)
                .lines()
                .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
            {
                self.port = port.trim().parse().unwrap();
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ka serve did not listen within 10 s: {}", read_text(&p.err));
    }

    fn join(&self, name: &str, target: &Path, secret: &Path, extra: &[&str]) -> Proc {
        let server = format!("127.0.0.1:{}", self.port);
        let state = self.dir.path().join(format!("state-{name}"));
        let mut args = vec![
            "join",
            "--server",
            &server,
            "--secret-file",
            secret.to_str().unwrap(),
            "--name",
            name,
            "--target",
            target.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--wait",
            "30s",
        ];
        args.extend_from_slice(extra);
        Proc::start(self.dir.path(), name, &args)
    }

    fn node_log(&self, name: &str) -> String {
        read_text(&self.logs.join(format!("{name}.log")))
    }

    /// Every datagram the syslog socket received so far.
    fn syslog_lines(&self) -> Vec<String> {
        self.syslog.lock().unwrap().clone()
    }
}

/// Waits up to `within` for `cond`; panics with `what` and `context()`.
fn wait_for(within: Duration, what: &str, cond: impl Fn() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} within {within:?}:\n{}", context());
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

#[test]
fn every_nodes_lines_reach_its_log_file_the_system_log_and_ka_console() {
    let mut s = Logged::new(12 << 20);
    // About 4 s of streaming: time for console lines while the nodes run.
    let serve = s.serve(3, &["--max-rate", "3MiB"]);
    let console_log = s.dir.path().join("n1-console.log");
    append(&console_log, "boot: written before ka join started");
    let names = ["n1", "n2", "n3"];
    let nodes: Vec<Proc> = names
        .iter()
        .map(|n| {
            let target = s.dir.path().join(format!("{n}.img"));
            let extra: &[&str] = if *n == "n1" {
                &["--console-log", console_log.to_str().unwrap()]
            } else {
                &[]
            };
            s.join(n, &target, &s.secret, extra)
        })
        .collect();
    wait_for(
        Duration::from_secs(20),
        "n1's welcome reached its log",
        || s.node_log("n1").contains("ka: joined as"),
        || format!("{}\n{}", s.node_log("n1"), read_text(&serve.err)),
    );
    // Followers started while n1 runs.
    let status_dir = s.dir.path().join("state");
    let console = |label: &str, what: &[&str]| {
        let mut args = vec!["console"];
        args.extend_from_slice(what);
        args.extend_from_slice(&[
            "--log-dir",
            s.logs.to_str().unwrap(),
            "--state-dir",
            status_dir.to_str().unwrap(),
        ]);
        Proc::start(s.dir.path(), label, &args)
    };
    let one = console("console-n1", &["n1"]);
    let all = console("console-all", &["--all"]);
    std::thread::sleep(Duration::from_millis(500));
    let appended_at = Instant::now();
    append(&console_log, "console: hello from n1 while it installs");
    wait_for(
        Duration::from_secs(5),
        "the console line reached n1's log",
        || s.node_log("n1").contains("console: hello from n1"),
        || s.node_log("n1"),
    );
    let arrived = appended_at.elapsed();
    wait_for(
        Duration::from_secs(5),
        "ka console n1 printed the line",
        || read_text(&one.out).contains("console: hello from n1"),
        || format!("{}\n{}", read_text(&one.out), read_text(&one.err)),
    );
    wait_for(
        Duration::from_secs(5),
        "ka console --all printed it after n1's name",
        || read_text(&all.out).contains("n1: "),
        || format!("{}\n{}", read_text(&all.out), read_text(&all.err)),
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    for n in nodes {
        assert_eq!(n.finish(Duration::from_secs(30)).0, 0);
    }
    eprintln!("a console line reached the source's file {arrived:?} after it was written");
    for n in names {
        let log = s.node_log(n);
        for want in [
            "ka: joined as",
            "ka: fed by",
            "ka: receiving",
            "ka: copy verified",
            "source: joined as",
            "source: released",
            "source: copy verified",
        ] {
            assert!(log.contains(want), "{n}.log lacks {want:?}:\n{log}");
        }
        // Every line is stamped with the time.
        assert!(log.lines().all(|l| l.starts_with("20")), "{log}");
    }
    assert!(s
        .node_log("n1")
        .contains("boot: written before ka join started"));
    assert!(
        !s.node_log("n2").contains("console:"),
        "n1's lines stay in n1's file"
    );
    let all_text = read_text(&all.out);
    for n in names {
        assert!(all_text.contains(&format!("{n}: ")), "{all_text}");
    }
    let syslog = s.syslog_lines();
    assert!(
        syslog
            .iter()
            .any(|l| l.contains("ka[")
                && l.ends_with("n1: console: hello from n1 while it installs")),
        "{syslog:#?}"
    );
    for n in names {
        assert!(
            syslog
                .iter()
                .any(|l| l.contains(&format!("]: {n}: ka: joined as"))),
            "{n} not in {syslog:#?}"
        );
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&s.logs).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o750);
    drop((one, all));
}

#[test]
fn a_node_that_cannot_use_its_target_is_reported_failed_before_joining() {
    let mut s = Logged::new(2 << 20);
    let serve = s.serve(2, &[]);
    let dir_target = s.dir.path().join("a-directory");
    std::fs::create_dir(&dir_target).unwrap();
    // A report proved with another session's key is refused, and nothing
    // is logged for it.
    let stranger_secret = s.dir.path().join("stranger-secret");
    write_secret(&stranger_secret, 99);
    let stranger = s.join("intruder", &dir_target, &stranger_secret, &[]);
    let (code, _, err) = stranger.finish(Duration::from_secs(30));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("could not tell the source"), "{err}");
    let bad = s.join("bad", &dir_target, &s.secret, &[]);
    let (code, _, bad_err) = bad.finish(Duration::from_secs(30));
    assert_ne!(code, 0, "{bad_err}");
    assert!(bad_err.contains("is a directory"), "{bad_err}");
    let good = s.join("good", &s.dir.path().join("good.img"), &s.secret, &[]);
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(
        code, 1,
        "a failed node makes the session exit 1:\n{out}\n{err}"
    );
    assert_eq!(good.finish(Duration::from_secs(30)).0, 0);
    let event = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "join_failed")
        .unwrap_or_else(|| panic!("no join_failed event:\n{out}"));
    assert_eq!(event["node"], "bad");
    assert!(event["reason"].as_str().unwrap().contains("is a directory"));
    let rep = final_report(&out);
    let line = rep
        .nodes
        .iter()
        .find(|n| n.name == "bad")
        .expect("bad is reported");
    assert!(line.failed_before_join && !line.ok, "{:?}", rep.nodes);
    assert!(
        line.reason.contains("failed before joining"),
        "{}",
        line.reason
    );
    assert!(rep.nodes.iter().any(|n| n.name == "good" && n.ok));
    assert!(!rep.nodes.iter().any(|n| n.name == "intruder"));
    assert!(s.node_log("bad").contains("failed before joining"));
    assert!(!s.logs.join("intruder.log").exists());
    let syslog = s.syslog_lines();
    assert!(
        syslog
            .iter()
            .any(|l| l.contains("]: bad: source: failed before joining")),
        "{syslog:#?}"
    );
    assert!(
        !syslog.iter().any(|l| l.contains("intruder")),
        "{syslog:#?}"
    );
}

#[test]
fn a_node_flooding_its_console_gets_only_its_budget_into_the_source_log() {
    let mut s = Logged::new(6 << 20);
    let started = Instant::now();
    // About 3 s of streaming while the node's console floods.
    let serve = s.serve(1, &["--max-rate", "2MiB", "--no-syslog"]);
    let console_log = s.dir.path().join("flood-console.log");
    {
        let mut f = std::fs::File::create(&console_log).unwrap();
        writeln!(f, "{}", "L".repeat(3000)).unwrap();
        let line = "x".repeat(99);
        for _ in 0..50_000 {
            writeln!(f, "{line}").unwrap();
        }
    }
    let node = s.join(
        "flood",
        &s.dir.path().join("flood.img"),
        &s.secret,
        &["--console-log", console_log.to_str().unwrap()],
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(node.finish(Duration::from_secs(30)).0, 0);
    let seconds = started.elapsed().as_secs_f64();
    let log = s.node_log("flood");
    // 32 KiB of lines a second at most, plus each line's time stamp
    // (about a quarter more on lines of 100 bytes), plus the source's own
    // lines: the 5 MB flood never gets through.
    let bound = (seconds + 1.0) * 32768.0 * 1.3 + 4096.0;
    eprintln!(
        "{} bytes of node log for {seconds:.1} s of session (bound {bound:.0}) from a 5 MB flood",
        log.len()
    );
    assert!((log.len() as f64) < bound, "{} bytes", log.len());
    assert!(
        log.contains("lines dropped (over the log budget"),
        "no note of the dropped lines"
    );
    let cut = log
        .lines()
        .find(|l| l.contains("LLLL"))
        .expect("the long line arrives, cut");
    assert!(cut.ends_with("bytes cut]"), "{cut}");
    assert!(cut.len() < 700, "{}", cut.len());
}
