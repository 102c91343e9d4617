//! The lab removes what it made even when its test process does not end
//! normally: interrupted (SIGTERM, SIGINT), its signal handler removes the
//! lab and the process exits as the signal would have; killed outright
//! (SIGKILL), the next lab removes the leftovers. Each case runs a lab in a
//! process of its own (the `ka-lab` binary), with `ka serve` waiting in it
//! and a loop disk mounted in its work directory, as a system clone's
//! source has: the mount and the loop device go too.
//!
//! Needs root (CI runs as root); the lab panics with the reason otherwise.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ka_tests::lab::{Lab, Rate};
use ka_tests::wait_timeout;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The bound on building a lab and on its removal.
const WAIT: Duration = Duration::from_secs(60);

/// What a `ka-lab` process made, as it printed it.
struct Held {
    child: Child,
    namespaces: Vec<String>,
    dir: PathBuf,
    serve: Pid,
    /// The loop device attached in the work directory.
    disk: String,
    /// Where its file system is mounted.
    mount: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Only if a check failed before the test ended the process itself.
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}

/// Starts `ka-lab` with two nodes and a mounted loop disk, and waits until
/// its lab is ready.
fn hold_a_lab() -> Held {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ka-lab"))
        .args(["2", "--disk"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting ka-lab");
    let stdout = child.stdout.take().expect("ka-lab's piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut held = Held {
        child,
        namespaces: Vec::new(),
        dir: PathBuf::new(),
        serve: Pid::from_raw(0),
        disk: String::new(),
        mount: PathBuf::new(),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("ka-lab did not print `ready` within {WAIT:?}: {e}"));
        match line.split_once(' ') {
            Some(("netns", ns)) => held.namespaces.push(ns.to_string()),
            Some(("dir", dir)) => held.dir = PathBuf::from(dir),
            Some(("serve-pid", pid)) => {
                held.serve = Pid::from_raw(pid.parse().expect("a PID after serve-pid"))
            }
            Some(("loop", dev)) => held.disk = dev.to_string(),
            Some(("mount", dir)) => held.mount = PathBuf::from(dir),
            _ if line == "ready" => break,
            _ => panic!("ka-lab printed an unexpected line: {line:?}"),
        }
    }
    assert_eq!(held.namespaces.len(), 4, "source, two nodes and the switch");
    assert!(held.serve.as_raw() > 0, "ka-lab printed no serve-pid");
    for ns in &held.namespaces {
        assert!(
            namespace_exists(ns),
            "ka-lab printed {ns} but it is not there"
        );
    }
    assert!(
        held.dir.is_dir(),
        "no work directory {}",
        held.dir.display()
    );
    assert!(alive(held.serve), "ka serve {} is not running", held.serve);
    assert!(
        mounted(&held.mount),
        "ka-lab printed mount {} but nothing is mounted there",
        held.mount.display()
    );
    assert!(
        backs(&held.disk, &held.dir),
        "ka-lab printed loop {} but it holds no file of {}",
        held.disk,
        held.dir.display()
    );
    held
}

/// Whether something is mounted at `dir` (in this mount namespace, the
/// host's, where the lab mounts its disks).
fn mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == dir)
}

/// Whether loop device `dev` is attached to a file under `dir`.
fn backs(dev: &str, dir: &Path) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|f| Path::new(f.trim_end()).starts_with(dir))
}

fn namespace_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn alive(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Asserts that nothing `held` listed is left, allowing the orphaned `ka
/// serve` a moment to be reaped, and its disk a moment to be detached: a
/// mount still in use when the lab went is unmounted lazily, and the
/// kernel lets its loop device go only once the last user has.
fn assert_removed(held: &Held, how: &str) {
    for ns in &held.namespaces {
        assert!(!namespace_exists(ns), "{how}: namespace {ns} is left");
    }
    assert!(
        !mounted(&held.mount),
        "{how}: {} is still mounted",
        held.mount.display()
    );
    assert!(
        !held.dir.exists(),
        "{how}: work directory {} is left",
        held.dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(held.serve) || backs(&held.disk, &held.dir) {
        assert!(
            Instant::now() < deadline,
            "{how}: ka serve {} is still running ({}), or loop device {} still attached ({})",
            held.serve,
            alive(held.serve),
            held.disk,
            backs(&held.disk, &held.dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn interrupted_by(signal: Signal) {
    let mut held = hold_a_lab();
    kill(Pid::from_raw(held.child.id() as i32), signal).expect("signalling ka-lab");
    let status = wait_timeout(&mut held.child, WAIT)
        .unwrap_or_else(|| panic!("ka-lab did not exit within {WAIT:?} of {signal}"));
    assert_eq!(
        status.code(),
        Some(128 + signal as i32),
        "ka-lab should exit as {signal} would have, after removing its lab"
    );
    assert_removed(&held, &format!("after {signal}"));
}

#[test]
fn a_lab_interrupted_by_sigterm_removes_what_it_made() {
    interrupted_by(Signal::SIGTERM);
}

#[test]
fn a_lab_interrupted_by_sigint_removes_what_it_made() {
    interrupted_by(Signal::SIGINT);
}

#[test]
fn a_lab_killed_outright_is_removed_by_the_next_lab() {
    let mut held = hold_a_lab();
    held.child.kill().expect("killing ka-lab");
    wait_timeout(&mut held.child, WAIT).expect("ka-lab did not die of SIGKILL");
    // SIGKILL runs no handler: all of it is left, which is what the next
    // lab must clean.
    assert!(
        held.namespaces.iter().all(|ns| namespace_exists(ns))
            && held.dir.is_dir()
            && mounted(&held.mount)
            && backs(&held.disk, &held.dir),
        "a lab killed outright should be left as it was until the next lab"
    );
    let next = Lab::new(1, Rate::mbit(100));
    assert_removed(&held, "after the next lab was built");
    drop(next);
}
