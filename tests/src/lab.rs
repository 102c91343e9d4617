//! The network-namespace lab: an isolated switched network on this machine,
//! with real `ka` processes on it.
//!
//! [`Lab::new`] builds, for one test:
//!
//! - a *switch*: a Linux bridge `br0` alone in its own network namespace;
//! - one namespace per host (the source and each node), each with one
//!   interface `eth0`, the far end of a veth pair whose near end is a port of
//!   the switch, named after the host (`src`, `n1`, `n2`, …);
//! - addresses in 10.200.0.0/24 (source .1, node *i* .10+*i*) that exist only
//!   inside these namespaces: no packet can reach or leave the host's own
//!   network;
//! - a rate limit on every port in both directions, a tc `tbf` on the host's
//!   `eth0` (what the host sends) and one on its switch port (what it
//!   receives), so each port is full duplex at its rate, like a switched
//!   Ethernet port.
//!
//! There is no delay and no loss knob: this kernel has no `netem`, and a knob
//! that silently did nothing would lie. Every link in the lab has the latency
//! of a veth pair (microseconds) plus the queueing of its `tbf`.
//!
//! Interfaces are created directly inside the lab's namespaces, so none ever
//! appears in the host's namespace and their short names cannot collide with
//! another lab's. Namespaces and the work directory carry the test process's
//! PID and a counter (`kalab-<pid>-<n>-…`). Dropping the [`Lab`] kills every
//! process left in its namespaces (by PID) and deletes the namespaces and the
//! work directory, even when the test failed. A test process interrupted by
//! SIGINT, SIGTERM or SIGHUP (Ctrl-C, a CI timeout, a closed terminal) never
//! reaches `Drop`, so the first lab of a process also installs a handler for
//! those signals that removes every lab still alive the same way and then
//! exits with 128 + the signal's number. A lab whose test process was
//! killed outright (SIGKILL: no handler runs) is removed by the next
//! [`Lab::new`], which deletes every `kalab-<pid>-` namespace and work
//! directory (in `/dev/shm` or the temporary directory) whose PID is dead.
//!
//! Labs share the machine's CPU, and timing is what they measure, so at most
//! one lab exists at a time per process: [`Lab::new`] waits for the previous
//! one to be dropped. (Cargo runs test binaries one after another.)
//!
//! The lab needs root and `ip`/`tc`/`bridge` (Debian `iproute2`); without them it
//! panics with the reason, never skips.

mod session;

pub use session::{Finished, Join, NodeLine, Report, Serve, Session, SourceEvent};

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{ka_bin, require_tool, run, wait_timeout};

/// The prefix of every namespace and work directory a lab makes.
const PREFIX: &str = "kalab-";

/// One lab at a time per process (see the module documentation).
static SERIAL: Mutex<()> = Mutex::new(());

/// Labs made by this process so far, for unique names.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What each lab of this process that is not yet dropped has made, for the
/// signal handler to remove (see the module documentation).
static ALIVE: Mutex<Vec<Made>> = Mutex::new(Vec::new());

/// Installs the signal handler once per process.
static HANDLER: std::sync::Once = std::sync::Once::new();

/// The namespaces and the work directory of one lab, by name.
struct Made {
    tag: String,
    namespaces: Vec<String>,
    dir: PathBuf,
}

/// A port rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Rate {
    /// `n` megabits (10⁶ bits) per second.
    pub const fn mbit(n: u64) -> Rate {
        Rate(n * 1_000_000)
    }

    /// Bytes on the wire per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }

    /// A `tbf` bucket: about 5 ms at this rate, but at least one GSO
    /// super-packet as `tbf` counts it ([`TBF_GSO_PACKET`]) and at most two.
    /// A packet larger than the bucket is split by `tbf` into its frames in
    /// software, which no switch does (senders' NICs segment in hardware):
    /// with a 62.5 KB bucket at 100 Mbit/s, every 64 KiB send was split, and
    /// a sender whose writes are large paid for it in the lab only.
    fn burst(self) -> u64 {
        ((self.0 / 8) / 200).clamp(TBF_GSO_PACKET, 2 * TBF_GSO_PACKET)
    }
}

/// The most bytes `tbf` counts for one GSO super-packet: 64 KiB of packet
/// and the headers of the 45 more frames it becomes (Ethernet, IP and TCP
/// with timestamps: 66 bytes each).
const TBF_GSO_PACKET: u64 = 65_536 + 45 * 66;

/// One machine of the lab: the source or a node.
#[derive(Debug, Clone)]
pub struct Host {
    /// `source`, or `n1`, `n2`, … for the nodes.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address (on `eth0`).
    pub addr: Ipv4Addr,
    /// Its port on the switch (an interface in the switch's namespace).
    pub port: String,
}

/// The source's address in every lab.
pub const SOURCE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// A switched network of one source and some nodes (see the module
/// documentation).
pub struct Lab {
    tag: String,
    switch: String,
    hosts: Vec<Host>,
    rate: Rate,
    ip: PathBuf,
    tc: PathBuf,
    bridge: PathBuf,
    /// The work directory, removed by `Made::remove` like the rest of the
    /// lab (on drop or on a signal), not by `TempDir`.
    dir: PathBuf,
    // Last: released only after `Drop::drop` cleaned up.
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds a lab of a source and `nodes` nodes (`n1`…), every port at
    /// `rate` both ways. Waits for any other lab of this process to go first.
    pub fn new(nodes: usize, rate: Rate) -> Lab {
        assert!(
            (1..=200).contains(&nodes),
            "a lab has 1 to 200 nodes, not {nodes}"
        );
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            nix::unistd::geteuid().is_root(),
            "the network-namespace lab needs root (network namespaces, veth, tc); CI runs as root — run the tests as root"
        );
        let ip = require_tool("ip", "iproute2");
        let tc = require_tool("tc", "iproute2");
        let bridge = require_tool("bridge", "iproute2");
        remove_stale_labs(&ip);
        HANDLER.call_once(|| remove_labs_on_signals(ip.clone()));
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{PREFIX}{}-{n}", std::process::id());
        // The hosts' "disks" are in memory when they can be: the lab
        // measures the network and ka, not this machine's one shared disk.
        let shm = std::path::PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir_in(base)
            .expect("creating the lab's work directory")
            .keep();
        let mut hosts = vec![Host {
            name: "source".into(),
            netns: format!("{tag}-src"),
            addr: SOURCE_ADDR,
            port: "src".into(),
        }];
        hosts.extend((1..=nodes).map(|i| Host {
            name: format!("n{i}"),
            netns: format!("{tag}-n{i}"),
            addr: Ipv4Addr::new(10, 200, 0, 10 + i as u8),
            port: format!("n{i}"),
        }));
        let mut lab = Lab {
            switch: format!("{tag}-sw"),
            tag,
            hosts,
            rate,
            ip,
            tc,
            bridge,
            dir,
            _serial: serial,
        };
        // Registered before anything is made, so that a signal arriving in
        // the middle of `build` removes what was made so far; from here on,
        // a panic drops `lab`, which does the same.
        alive().push(Made {
            tag: lab.tag.clone(),
            namespaces: lab.namespaces(),
            dir: lab.dir().to_path_buf(),
        });
        lab.build();
        lab
    }

    /// Builds the network with one batch of commands per namespace (each
    /// `ip`/`tc` start costs more than the work it does).
    fn build(&mut self) {
        let sw = self.switch.clone();
        let mut root: Vec<String> = vec![format!("netns add {sw}")];
        let mut switch: Vec<String> = vec![
            "link set lo up".into(),
            // A switch forwards frames; it does not run the host's
            // firewall on them (its `br_nf_*` hooks showed in every profile
            // of an 8-node run).
            "link add br0 type bridge forward_delay 0 stp_state 0 \
             nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0"
                .into(),
            "link set br0 up".into(),
        ];
        for h in &self.hosts {
            root.push(format!("netns add {}", h.netns));
            switch.push(format!(
                "link add {} master br0 type veth peer name eth0 netns {}",
                h.port, h.netns
            ));
            switch.push(format!("link set {} up", h.port));
        }
        batch(&self.ip, None, &root);
        batch(&self.ip, Some(&sw), &switch);
        self.bridge_netfilter_off();
        for h in &self.hosts {
            let host = [
                format!("addr add {}/24 dev eth0", h.addr),
                "link set lo up".into(),
                "link set eth0 up".into(),
            ];
            batch(&self.ip, Some(&h.netns), &host);
        }
        // GRO on both ends of every veth: frames merge into large packets
        // before the bridge and the TCP stacks, which cuts the emulation's
        // per-frame CPU (a real NIC's GRO does the same for a real node).
        // The wire and tbf still count every 1514-byte frame.
        if std::env::var_os("KA_LAB_NO_GRO").is_none() {
            for h in &self.hosts {
                ethtool_gro(Some(&h.netns), "eth0");
                ethtool_gro(Some(&sw), &h.port);
            }
        }
        let hosts = self.hosts.clone();
        self.set_rates(&hosts, self.rate);
    }

    /// The source's host.
    pub fn source(&self) -> &Host {
        &self.hosts[0]
    }

    /// Node `i`, counting from 1 (`n1`).
    pub fn node(&self, i: usize) -> &Host {
        assert!(
            (1..self.hosts.len()).contains(&i),
            "no node {i} in this lab"
        );
        &self.hosts[i]
    }

    /// Every node, in order (`n1`, `n2`, …).
    pub fn nodes(&self) -> &[Host] {
        &self.hosts[1..]
    }

    /// The switch's namespace (the bridge `br0` and one port per host).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// The rate every port was built with.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The lab's work directory (images, targets, secrets), removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets `host`'s port to `rate`, both ways.
    pub fn set_rate(&self, host: &Host, rate: Rate) {
        self.set_rates(std::slice::from_ref(host), rate);
    }

    fn set_rates(&self, hosts: &[Host], rate: Rate) {
        let tbf = |dev: &str| {
            format!(
                "qdisc replace dev {dev} root tbf rate {}bit burst {} latency 50ms",
                rate.0,
                rate.burst()
            )
        };
        for h in hosts {
            batch(&self.tc, Some(&h.netns), &[tbf("eth0")]);
        }
        let ports: Vec<String> = hosts.iter().map(|h| tbf(&h.port)).collect();
        batch(&self.tc, Some(&self.switch), &ports);
    }

    /// Cuts `host` off: the switch stops forwarding its port (bridge port
    /// state *disabled*), so every frame to or from it is lost and neither
    /// end is told (no carrier change, no reset, no FIN).
    ///
    /// Not `ip link set … down`: a veth's carrier going down and up was
    /// measured to black the link out for about 1 s however short the cut
    /// (link-state handling), which would make a short cut a long one.
    pub fn cut(&self, host: &Host) {
        self.bridge_port_state(host, "0", "disabled");
    }

    /// Reconnects `host` (its port forwards again).
    pub fn restore(&self, host: &Host) {
        self.bridge_port_state(host, "3", "forwarding");
    }

    fn bridge_port_state(&self, host: &Host, state: &str, name: &str) {
        checked(
            &self.bridge,
            &[
                "-n",
                &self.switch,
                "link",
                "set",
                "dev",
                &host.port,
                "state",
                state,
            ],
        );
        let shown = checked(
            &self.bridge,
            &["-n", &self.switch, "link", "show", "dev", &host.port],
        );
        assert!(
            shown.contains(&format!("state {name}")),
            "{}'s port is not {name}: {shown}",
            host.name
        );
    }

    /// The fewest seconds any TCP stream can take to carry `bytes` of payload
    /// through one port at `rate`: each full frame of `MTU + 14` bytes on the
    /// wire (what `tbf` counts) carries `MTU − 20 (IP) − 20 (TCP) − 12 (TCP
    /// timestamps, when on)` bytes of payload.
    pub fn floor(&self, bytes: u64, rate: Rate) -> Duration {
        let (payload, wire) = self.frame();
        Duration::from_secs_f64(bytes as f64 * wire as f64 / payload as f64 / rate.bytes_per_sec())
    }

    /// Payload bytes per full TCP segment and the bytes of its frame on the
    /// wire, read from the source's interface and TCP settings.
    pub fn frame(&self) -> (u64, u64) {
        let ns = &self.source().netns;
        let link = self.ip(&["-n", ns, "-o", "link", "show", "dev", "eth0"]);
        let mtu: u64 = link
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no mtu in {link}"));
        let timestamps = self.exec_output(ns, &["cat", "/proc/sys/net/ipv4/tcp_timestamps"]);
        let options = if timestamps.trim() == "0" { 0 } else { 12 };
        (mtu - 20 - 20 - options, mtu + 14)
    }

    /// Runs `ka args…` on `host`; `label` names it in messages.
    pub fn spawn_ka(&self, host: &Host, label: &str, args: &[String]) -> KaProc {
        self.spawn_program(host, label, &ka_bin(), args)
    }

    /// Starts any `program` with `args` on `host` (e.g. a plain TCP relay to
    /// compare ka with), watched like a ka process.
    pub fn spawn_program(
        &self,
        host: &Host,
        label: &str,
        program: &Path,
        args: &[String],
    ) -> KaProc {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", &host.netns])
            .arg(program)
            .args(args)
            // What a process leaves in its temporary directory (a spool, a
            // node's mount points when it is killed) goes with the lab.
            .env("TMPDIR", &self.dir);
        crate::private_logs(&mut cmd, &self.dir);
        KaProc::spawn(cmd, label)
    }

    /// Runs a short command on `host` and returns its standard output;
    /// panics if it fails.
    pub fn exec_output(&self, host_ns: &str, argv: &[&str]) -> String {
        let out = run(
            Command::new(&self.ip)
                .args(["netns", "exec", host_ns])
                .args(argv),
            Duration::from_secs(20),
        );
        assert!(
            out.status.success(),
            "{argv:?} in {host_ns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the switch's bridge from passing frames through the host
    /// firewall. The bridge's own `nf_call_*` options are not enough: the
    /// kernel runs the `br_nf_*` hooks when either they or the switch
    /// namespace's `bridge-nf-call-*` sysctls ask for it, and those are on
    /// by default once `br_netfilter` is loaded (as on the development VM,
    /// where `br_nf_pre_routing` was 14 % of ka's samples in a 16-node
    /// profile). Without `br_netfilter` the files are absent and there is
    /// nothing to turn off.
    fn bridge_netfilter_off(&self) {
        let script = "for f in /proc/sys/net/bridge/bridge-nf-call-iptables \
                      /proc/sys/net/bridge/bridge-nf-call-ip6tables \
                      /proc/sys/net/bridge/bridge-nf-call-arptables; do \
                      if [ -e $f ]; then echo 0 > $f || exit 1; fi; done";
        self.exec_output(&self.switch, &["sh", "-c", script]);
    }

    fn ip(&self, args: &[&str]) -> String {
        checked(&self.ip, args)
    }

    /// The namespaces this lab made (the switch last).
    fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        v.push(self.switch.clone());
        v
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Absent if the signal handler took it: it removes the lab itself.
        let made = {
            let mut alive = alive();
            let i = alive.iter().position(|m| m.tag == self.tag);
            i.map(|i| alive.remove(i))
        };
        if let Some(made) = made {
            made.remove(&self.ip);
        }
    }
}

impl Made {
    /// Kills the lab's processes and deletes its namespaces and work
    /// directory.
    fn remove(&self, ip: &Path) {
        for ns in &self.namespaces {
            remove_namespace(ip, ns);
        }
        release_disks(&self.dir);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "lab {}: cannot remove its work directory {}: {e}",
                self.tag,
                self.dir.display()
            );
        }
    }
}

/// The labs not yet dropped; a panic while holding the list leaves it valid.
fn alive() -> MutexGuard<'static, Vec<Made>> {
    ALIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, removes every lab
/// still alive (its processes, namespaces and work directory) and exits
/// with 128 + the signal's number, as the signal itself would have.
fn remove_labs_on_signals(ip: PathBuf) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lab: cannot watch for interrupting signals ({e}); an interrupted lab is removed by the next one");
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            // Taken, not borrowed: a `Drop` racing with this finds nothing
            // left to remove twice.
            let labs = std::mem::take(&mut *alive());
            for made in labs {
                eprintln!(
                    "lab {}: interrupted by signal {signal}; removing it",
                    made.tag
                );
                made.remove(&ip);
            }
            std::process::exit(128 + signal);
        }
    });
}

/// Runs `tool args…` (bounded), panicking with its error output if it fails.
fn checked(tool: &Path, args: &[&str]) -> String {
    let out = run(Command::new(tool).args(args), Duration::from_secs(20));
    assert!(
        out.status.success(),
        "`{} {}` failed: {}",
        tool.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Turns generic receive offload on for `dev` in `ns`.
fn ethtool_gro(ns: Option<&str>, dev: &str) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["netns", "exec", ns]);
    }
    let out = cmd
        .args(["ethtool", "-K", dev, "gro", "on"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ethtool (apt-get install ethtool): {e}"));
    assert!(
        out.status.success(),
        "ethtool -K {dev} gro on failed (apt-get install ethtool): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `tool [-n ns] -batch -` on `lines`, panicking with its error
/// output if any fails.
fn batch(tool: &Path, ns: Option<&str>, lines: &[String]) {
    use std::io::Write;
    let mut cmd = Command::new(tool);
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", tool.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(lines.join("\n").as_bytes())
        .and_then(|_| stdin.write_all(b"\n"))
        .expect("writing a command batch");
    drop(stdin);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).ok();
    }
    let status = wait_timeout(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{} -batch did not finish within 20 s", tool.display()));
    assert!(
        status.success(),
        "`{} {}-batch` failed on\n{}\n{}",
        tool.display(),
        ns.map_or(String::new(), |n| format!("-n {n} ")),
        lines.join("\n"),
        err.trim()
    );
}

/// Kills every process in `ns` (by PID) and deletes it. Never panics: it runs
/// from `Drop`, possibly while a test is already failing.
fn remove_namespace(ip: &Path, ns: &str) {
    for _ in 0..3 {
        let Ok(out) = Command::new(ip).args(["netns", "pids", ns]).output() else {
            break;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = Command::new(ip)
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("lab: could not delete network namespace {ns}");
    }
}

/// Unmounts every mount under `dir` (deepest first) and detaches every
/// loop device whose backing file is under it: a lab's work directory may
/// hold the disks of a system clone and their mounts, which must not stay
/// held (nor be emptied through a mount) when the lab goes, whether it was
/// dropped, interrupted or left by a killed process. Never panics.
fn release_disks(dir: &Path) {
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        let unmounted = Command::new("umount")
            .arg(&m)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            eprintln!("lab: {} is busy; unmounting it lazily", m.display());
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for d in devices.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(d.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end();
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if Path::new(backing).starts_with(dir) {
            let _ = Command::new("losetup")
                .args(["-d", &format!("/dev/{name}")])
                .status();
        }
    }
}

/// A mount point as `/proc/self/mountinfo` writes it (space, tab, newline
/// and backslash as octal escapes), decoded.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The PID in a lab name `kalab-<pid>-…`.
fn lab_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Removes namespaces and work directories of labs whose test process is
/// gone (killed before its `Drop` could run).
fn remove_stale_labs(ip: &Path) {
    let stale = |name: &str| {
        lab_pid(name).is_some_and(|pid| {
            pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    let list = checked(ip, &["netns", "list"]);
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if stale(ns) {
            eprintln!("lab: removing stale namespace {ns} of a dead test process");
            remove_namespace(ip, ns);
        }
    }
    // Both places `Lab::new` may have put a work directory.
    for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) && e.path().is_dir() {
                eprintln!("lab: removing stale work directory {}", e.path().display());
                release_disks(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A line a process printed, with the moment the lab read it.
#[derive(Debug, Clone)]
pub struct Line {
    /// When it was read (the process prints line by line, so this is within
    /// a scheduling delay of when it was printed).
    pub at: Instant,
    /// The line, without its newline.
    pub text: String,
}

type Lines = Arc<Mutex<Vec<Line>>>;

/// A `ka` process in a lab namespace. Its output is read as it comes and
/// stamped; it is killed (by PID) when dropped.
pub struct KaProc {
    child: Child,
    started: Instant,
    label: String,
    out: Lines,
    err: Lines,
    status: Option<ExitStatus>,
}

impl KaProc {
    fn spawn(mut cmd: Command, label: &str) -> KaProc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let out = Lines::default();
        let err = Lines::default();
        read_lines(child.stdout.take().expect("piped stdout"), out.clone());
        read_lines(child.stderr.take().expect("piped stderr"), err.clone());
        KaProc {
            child,
            started: Instant::now(),
            label: label.into(),
            out,
            err,
            status: None,
        }
    }

    /// Its PID (`ip netns exec` execs, so this is `ka` itself).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// What it is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends `signal`; returns when.
    pub fn signal(&self, signal: Signal) -> Instant {
        kill(self.pid(), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal} to {}: {e}", self.label));
        Instant::now()
    }

    /// Kills it outright (SIGKILL): it gets no chance to say goodbye.
    pub fn kill9(&self) -> Instant {
        self.signal(Signal::SIGKILL)
    }

    /// Freezes it (SIGSTOP): its sockets stay open but it says nothing.
    pub fn freeze(&self) -> Instant {
        self.signal(Signal::SIGSTOP)
    }

    /// Thaws it (SIGCONT).
    pub fn thaw(&self) -> Instant {
        self.signal(Signal::SIGCONT)
    }

    /// Every line of standard output so far.
    pub fn lines(&self) -> Vec<Line> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Standard error so far.
    pub fn stderr(&self) -> String {
        let err = self.err.lock().unwrap_or_else(|e| e.into_inner());
        err.iter().map(|l| format!("{}\n", l.text)).collect()
    }

    /// Everything it printed, each line with the seconds since its start,
    /// for failure messages.
    pub fn transcript(&self) -> String {
        let show = |lines: &[Line]| -> String {
            lines
                .iter()
                .map(|l| {
                    let t = l.at.saturating_duration_since(self.started).as_secs_f64();
                    format!("[{t:7.3}] {}\n", l.text)
                })
                .collect()
        };
        let err = self.err.lock().unwrap_or_else(|e| e.into_inner()).clone();
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.label,
            show(&self.lines()),
            self.label,
            show(&err)
        )
    }

    /// Waits (at most `timeout`) for a line of standard output that
    /// satisfies `pred`, looking at lines from index `from` on; returns it
    /// and its index. Panics on timeout, describing `what` it waited for.
    pub fn wait_line(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, Line) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = (from..out.len()).find(|&i| pred(&out[i].text)) {
                    return (i, out[i].clone());
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {what} within {timeout:?}:\n{}",
                self.label,
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (at most `timeout`) for a line of standard error that
    /// satisfies `pred`; panics on timeout, describing `what` it waited
    /// for.
    pub fn wait_stderr_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let err = self.err.lock().unwrap_or_else(|e| e.into_inner());
                if err.iter().any(|l| pred(&l.text)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {what} within {timeout:?}:\n{}",
                self.label,
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits (at most `timeout`) for it to exit; panics with its output if it
    /// does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status = wait_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?}:\n{}",
                self.label,
                self.transcript()
            )
        });
        self.status = Some(status);
        // Let the readers take the last lines.
        std::thread::sleep(Duration::from_millis(20));
        status
    }
}

impl Drop for KaProc {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            // A frozen process dies of SIGKILL too.
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = wait_timeout(&mut self.child, Duration::from_secs(5));
        }
    }
}

fn read_lines(pipe: impl std::io::Read + Send + 'static, into: Lines) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            into.lock().unwrap_or_else(|e| e.into_inner()).push(Line {
                at: Instant::now(),
                text: line,
            });
        }
    });
}

/// Busy and total CPU time of the whole machine so far (from `/proc/stat`,
/// in clock ticks): sample before and after a run and compare.
pub fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .expect("an aggregate cpu line in /proc/stat");
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The machine's load average, as `/proc/loadavg` prints it (1, 5, 15 min).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_carry_the_pid() {
        assert_eq!(lab_pid("kalab-1234-0-n3"), Some(1234));
        assert_eq!(lab_pid("kalab-77-12-sw"), Some(77));
        assert_eq!(lab_pid("kalab-x-0-sw"), None);
        assert_eq!(lab_pid("other-1234-0"), None);
    }

    #[test]
    fn mount_points_are_unescaped_as_mountinfo_escapes_them() {
        assert_eq!(unescape_mountinfo("/dev/shm/a\\040b"), "/dev/shm/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\011z"), "/x\\y\tz");
        assert_eq!(unescape_mountinfo("/plain\\12"), "/plain\\12");
    }

    #[test]
    fn bursts_hold_one_gso_packet_and_at_most_two() {
        assert_eq!(Rate::mbit(100).burst(), TBF_GSO_PACKET);
        assert_eq!(Rate::mbit(1).burst(), TBF_GSO_PACKET);
        assert_eq!(Rate::mbit(200).burst(), 125_000);
        assert_eq!(Rate::mbit(10_000).burst(), 2 * TBF_GSO_PACKET);
    }
}
