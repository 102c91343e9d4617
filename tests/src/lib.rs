//! Shared helpers for ka's integration tests.
//!
//! Tests here run the real `ka` binary and real Debian daemons and clients.
//! The rules they follow: a missing tool fails the test with the package to
//! install (never a silent skip), every wait is bounded, every child process
//! is killed by its PID, temporary directories are cleaned up, and traffic
//! goes to 127.0.0.1 only.
#![warn(missing_docs)]

pub mod fuzz;
pub mod lab;
pub mod system;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The `ka` binary next to the running test (`target/<profile>/ka`).
///
/// Panics with the build command if it is missing: `cargo test` does not
/// build binaries of other crates for integration tests.
pub fn ka_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps/, a binary of this crate (such
    // as `ka-lab`) from target/<profile>/ itself, next to `ka`.
    let dir = exe.parent().expect("an executable lives in a directory");
    let beside = dir.join("ka");
    let bin = if beside.is_file() {
        beside
    } else {
        dir.parent()
            .map(|d| d.join("ka"))
            .expect("test executable lives in target/<profile>/deps")
    };
    assert!(
        bin.is_file(),
        "{} is missing; build it first: cargo build --release -p ka-bin",
        bin.display()
    );
    bin
}

/// Keeps what `cmd` (a `ka`) writes of node logs under `dir`, and off the
/// machine's system log (no socket there: ka says so once and goes on), so
/// a test leaves nothing in /var/log. A test may point either elsewhere.
pub fn private_logs<'c>(cmd: &'c mut Command, dir: &Path) -> &'c mut Command {
    cmd.env("KA_LOG_DIR", dir.join("node-logs"))
        .env("KA_SYSLOG_SOCKET", dir.join("no-syslog.sock"))
}

/// The path of `tool`, or a panic naming the Debian package that provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{tool}` not found: install the Debian package `{package}` (apt-get install {package}; scripts/test does this from scripts/apt-packages.txt)");
}

/// Runs `cmd` to completion, killing it after `timeout`. Output is captured.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).ok();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).ok();
        v
    });
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        kill(&mut child);
        panic!("{desc} did not finish within {timeout:?}; killed it");
    });
    Output {
        status,
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// Runs `ka` with `args`, bounded by 60 s.
pub fn ka(args: &[&str]) -> Output {
    run(Command::new(ka_bin()).args(args), Duration::from_secs(60))
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `child` by its PID and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = wait_timeout(child, Duration::from_secs(5));
}

/// A child process killed (by PID) when dropped, even when a test panics.
pub struct ChildGuard {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A `ka` process started in a test's directory, with its standard output
/// and error in files there (`LABEL.out`, `LABEL.err`), so a failing test
/// shows everything it said; killed by PID if the test ends first.
pub struct Proc {
    /// The process.
    pub guard: ChildGuard,
    /// Its standard output.
    pub out: PathBuf,
    /// Its standard error.
    pub err: PathBuf,
}

impl Proc {
    /// Starts `ka ARGS` in `dir` (whatever ka writes beside itself stays
    /// in the test's directory).
    pub fn start(dir: &Path, label: &str, args: &[&str]) -> Proc {
        Proc::start_with(dir, label, args, |_| {})
    }

    /// [`Proc::start`], with `configure` given the command last: another
    /// standard output, a limit set in the child.
    pub fn start_with(
        dir: &Path,
        label: &str,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Proc {
        let out = dir.join(format!("{label}.out"));
        let err = dir.join(format!("{label}.err"));
        let mut cmd = Command::new(ka_bin());
        private_logs(&mut cmd, dir)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        configure(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting ka {args:?}: {e}"));
        Proc {
            guard: ChildGuard {
                child,
                what: label.into(),
            },
            out,
            err,
        }
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.guard.child.id()
    }

    /// Waits (bounded) and returns (exit code, stdout, stderr).
    pub fn finish(mut self, timeout: Duration) -> (i32, String, String) {
        let status = wait_timeout(&mut self.guard.child, timeout).unwrap_or_else(|| {
            panic!(
                "{} did not finish within {timeout:?}:\n{}\n{}",
                self.guard.what,
                read_text(&self.out),
                read_text(&self.err)
            )
        });
        (
            status.code().unwrap_or(-1),
            read_text(&self.out),
            read_text(&self.err),
        )
    }

    /// kill -9, by PID, and reap.
    pub fn kill9(mut self) {
        self.guard.child.kill().expect("kill -9");
        wait_timeout(&mut self.guard.child, Duration::from_secs(5)).expect("reaped");
    }
}

/// Writes a session secret of its own (64 hex digits from `seed`, as
/// `ka serve` writes one) to `path`, so tests running side by side never
/// mix their sessions.
pub fn write_secret(path: &Path, seed: u64) {
    let hex: String = pseudo_random(32, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(path, format!("{hex}\n"))
        .unwrap_or_else(|e| panic!("writing the secret {}: {e}", path.display()));
}

/// The text of a file, or nothing if it cannot be read (yet).
pub fn read_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A running `ka tftp` on 127.0.0.1 at a port the kernel chose.
pub struct KaTftp {
    /// The process.
    pub guard: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl KaTftp {
    /// Starts `ka tftp` for `inventory` and `state_dir` with extra `args`,
    /// and waits (at most 20 s) for it to report its address.
    pub fn start(inventory: &Path, state_dir: &Path, args: &[&str]) -> KaTftp {
        let mut child = Command::new(ka_bin())
            .arg("tftp")
            .arg("--inventory")
            .arg(inventory)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ka tftp");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let guard = ChildGuard {
            child,
            what: "ka tftp".into(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep reading so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("ka tftp did not report its address within 20 s");
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in ka tftp's first line: {line}"));
        KaTftp { guard, addr, log }
    }

    /// Everything the server logged so far (one line per request).
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Fetches `remote` with tftp-hpa in binary mode into `local`; returns
    /// the client's output (tftp-hpa exits 0 even on errors, so callers check
    /// the output and the file).
    pub fn get_hpa(&self, remote: &str, local: &Path) -> Output {
        let tftp = require_tool("tftp", "tftp-hpa");
        run(
            Command::new(tftp)
                .args([
                    "-m",
                    "binary",
                    &self.addr.ip().to_string(),
                    &self.addr.port().to_string(),
                    "-c",
                    "get",
                    remote,
                ])
                .arg(local),
            Duration::from_secs(60),
        )
    }

    /// Fetches `remote` with atftp and `options` (e.g. `"blksize 1468"`).
    pub fn get_atftp(&self, remote: &str, local: &Path, options: &[&str]) -> Output {
        let mut cmd = Command::new(require_tool("atftp", "atftp"));
        cmd.args(["-g", "-r", remote, "-l"]).arg(local);
        for o in options {
            cmd.args(["--option", o]);
        }
        cmd.args([&self.addr.ip().to_string(), &self.addr.port().to_string()]);
        run(&mut cmd, Duration::from_secs(60))
    }
}

/// Writes a test inventory into `dir`: network 10.9.0.0/24, TFTP root
/// `dir/root`, nodes n01–n04 (MACs 52:54:00:09:00:01…, IPs 10.9.0.11…) in
/// group `rack1`, and returns its path.
pub fn write_inventory(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[network]
subnet = "10.9.0.0/24"
gateway = "10.9.0.1"

[boot]
server = "10.9.0.1"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
console = "ttyS0,115200"

[session]
name = "t"
source = "10.9.0.1:4000"
disk = "/dev/vda"

[[range]]
names = "n[01-04]"
mac_base = "52:54:00:09:00:01"
ip_base = "10.9.0.11"
groups = ["rack1"]
{extra}"#
    );
    std::fs::create_dir_all(dir.join("root")).expect("tftp root");
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write inventory");
    path
}

/// Deterministic pseudo-random bytes (xorshift), so files are incompressible
/// and a wrong block shows up as a mismatch.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `text` without ANSI escape sequences (cursor moves, colours): firmware
/// consoles scatter them through their output.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// `len` bytes that pack like a system's files: words of text (about 3:1
/// with zstd) with a random run of 64 KiB in every MiB (which does not
/// pack), deterministic for `seed`.
pub fn system_like(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "ld-linux-x86-64.so.2 ",
        "GLIBC_2.34 ",
        "/usr/lib/x86_64-linux-gnu ",
        "ELF ",
        "systemd ",
        "kernel ",
        "\n",
        "module ",
        "(void) ",
        "return 0;\n",
        "0x0000 ",
        "#include ",
    ];
    let noise = pseudo_random(64 << 10, seed);
    let mut out = Vec::with_capacity(len + (64 << 10));
    let mut x = seed | 1;
    let mut next_noise = 1 << 20;
    while out.len() < len {
        if out.len() >= next_noise {
            out.extend_from_slice(&noise);
            next_noise += 1 << 20;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

/// Writes at most `size` bytes of this machine's own programs, libraries
/// and text to `path` (a tar of /usr, cut: what a system image holds,
/// packing about 3:1 with zstd) and returns how many it wrote.
pub fn system_files_image(path: &Path, size: u64) -> u64 {
    let script = format!(
        "tar -cf - -C /usr bin sbin lib share 2>/dev/null | head -c {size} > '{}'",
        path.display()
    );
    let ok = Command::new("sh").args(["-c", &script]).status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "making the system-files image {}",
        path.display()
    );
    std::fs::metadata(path)
        .expect("the system-files image")
        .len()
}

/// The final report `ka serve --json` prints as its last object.
#[derive(Debug, serde::Deserialize)]
pub struct FinalReport {
    /// The image's size.
    pub size: u64,
    /// The size of the stream that travelled, when the source packed it.
    #[serde(default)]
    pub packed: Option<u64>,
    /// Seconds from the start of the stream to the end of the session.
    pub seconds: f64,
    /// Why the session was aborted, if it was.
    pub aborted: Option<String>,
    /// One entry per node that ever joined.
    pub nodes: Vec<NodeResult>,
}

/// One node's line of the final report.
#[derive(Debug, serde::Deserialize)]
pub struct NodeResult {
    /// Its name.
    pub name: String,
    /// Whether its copy verified.
    pub ok: bool,
    /// Why not, when not.
    pub reason: String,
    /// Bytes it had received.
    pub bytes: u64,
    /// How many times it was declared dead.
    pub deaths: u32,
    /// It never joined: it reported it could not start.
    #[serde(default)]
    pub failed_before_join: bool,
}

/// Parses the final report out of `ka serve --json`'s standard output;
/// panics with the output when there is none.
pub fn final_report(stdout: &str) -> FinalReport {
    #[derive(serde::Deserialize)]
    struct Line {
        report: FinalReport,
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| l.report)
        .unwrap_or_else(|| panic!("no final report in:\n{stdout}"))
}

/// The JSON events `ka serve --json` printed, in order.
pub fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub mod vmlab;

/// The unpacked Debian kernel package the netboot tests build images from:
/// `$KA_TEST_KERNEL_DIR`, or what `scripts/fetch-kernel` left in
/// `target/ka-kernel/current`. Panics, saying how to get one, without it.
pub fn debian_kernel() -> PathBuf {
    let dir = std::env::var_os("KA_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ka-kernel/current")
        });
    assert!(
        dir.join("boot").is_dir() && dir.join("lib/modules").is_dir(),
        "no Debian kernel in {}: run `scripts/fetch-kernel` (apt-get download linux-image-<version>-amd64 \
         and dpkg -x it; scripts/test does this), or set KA_TEST_KERNEL_DIR to an unpacked kernel package",
        dir.display()
    );
    dir
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_ansi_removes_cursor_moves_and_colours() {
        let raw = "Loading x...\x1b[25;27H\x1b[25;28Hok \x1b[0;1mbold\x1b[0m\x1bc!";
        assert_eq!(super::strip_ansi(raw), "Loading x...ok bold!");
    }
}
