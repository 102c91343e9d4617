//! System clones in the network-namespace lab: how long `ka serve
//! --system` takes to rebuild a lived-in machine on N nodes against the
//! wire floor of its used bytes, what the time goes to, and an image clone
//! of the same disk beside it.
//!
//! Run through `scripts/lab-system` (builds `ka` and this), as root. Not a
//! test: it prints numbers to read (see docs/lab.md, "System clones"). It
//! does check what it cloned, and fails loudly if a node's copy differs.
//!
//! ```text
//! lab_system [--nodes 8] [--files-mib 1040] [--rate-mbit 100] [--image-clone yes|no]
//!            [--window 64MiB] [--story yes|no]
//! ```
//!
//! `--story yes` prints every event of each source (not its progress) on
//! standard error, stamped from the stream's start.
//!
//! The source is a GPT loop disk shaped like the system tests' machine
//! (BIOS boot partition, vfat ESP sent raw, swap, ext4 root, xfs /home),
//! mounted under the lab's work directory in the host's namespaces before
//! any lab process starts, so every lab namespace sees it. Its file systems
//! hold copies of this machine's own files (`--files-mib` of them, 60 % on
//! the root, 40 % on /home: programs, libraries, data), plus the system
//! tests' special entries. Each node gets a sparse loop disk of the
//! source's size and runs `ka join --system` on it in its namespace.
//!
//! After the system clone, every node's root and /home trees are compared
//! with the source's (contents, modes, owners, links, times, xattrs). Then
//! the source's file systems are unmounted and the same disk is served as
//! an image (`ka serve --image`) to the same node disks, which are then
//! compared with the source disk byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ka_tests::lab::{load_average, Finished, Join, Lab, Rate, Serve, Session};
use ka_tests::system::{diff_trees, tree, DiskShape, Entry, Loop, Mount, SourceMachine};

/// The longest a clone may take before the run is abandoned.
const SESSION: Duration = Duration::from_secs(1200);

const MIB: f64 = (1u64 << 20) as f64;

const USAGE: &str = "usage: lab_system [--nodes 8] [--files-mib 1040] [--rate-mbit 100] [--image-clone yes|no] [--window SIZE] [--story yes|no]";

struct Args {
    nodes: usize,
    /// Bytes of this machine's files copied into the source.
    files: u64,
    rate: Rate,
    /// Also clone the same disk as an image.
    image_clone: bool,
    /// `ka join --window`, if not ka's default.
    window: Option<String>,
    /// Print the source's events (not its progress) on standard error.
    story: bool,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 8,
        files: 1040 << 20,
        rate: Rate::mbit(100),
        image_clone: true,
        window: None,
        story: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value; {USAGE}"));
        match flag.as_str() {
            "--nodes" => a.nodes = parse(flag, value),
            "--files-mib" => a.files = parse::<u64>(flag, value) << 20,
            "--rate-mbit" => a.rate = Rate::mbit(parse(flag, value)),
            "--image-clone" => a.image_clone = yes_or_no(flag, value),
            "--window" => a.window = Some(value.clone()),
            "--story" => a.story = yes_or_no(flag, value),
            _ => panic!("unknown argument {flag}; {USAGE}"),
        }
    }
    assert!(
        (1..=32).contains(&a.nodes),
        "--nodes takes 1 to 32 (each node rebuilds a whole disk on this machine)"
    );
    a
}

fn yes_or_no(flag: &str, value: &str) -> bool {
    match value {
        "yes" => true,
        "no" => false,
        _ => panic!("{flag} takes yes or no; {USAGE}"),
    }
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("bad value {value:?} for {flag}; {USAGE}"))
}

/// A process seen under a watched `ka` (the `ka` itself included).
#[derive(Debug, Clone)]
struct Seen {
    /// `source`, or the node's name.
    host: String,
    /// Whether it is the watched `ka` itself.
    is_ka: bool,
    /// Its command name (`tar`, `mkfs.ext4`, …).
    comm: String,
    /// Its own user and system CPU time, in clock ticks.
    ticks: u64,
    /// That of its children it has waited for.
    child_ticks: u64,
    /// Its peak resident memory (`VmHWM`), in bytes.
    peak: u64,
    /// When it was first and last seen.
    first: Instant,
    last: Instant,
}

/// Every process under the watched `ka` processes, sampled every 100 ms
/// from `/proc`: CPU time and peak memory of ka and of the tools it runs
/// (tar on both sides, mkfs on the nodes), which is what tells where a
/// slow run's time went.
struct ProcessWatch {
    seen: Arc<Mutex<HashMap<(i32, u64), Seen>>>,
    stop: Arc<AtomicBool>,
}

impl ProcessWatch {
    /// Watches each `(pid, host)` and its descendants until dropped.
    fn start(roots: Vec<(i32, String)>) -> ProcessWatch {
        let seen: Arc<Mutex<HashMap<(i32, u64), Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (root, host) in &roots {
                    for pid in std::iter::once(*root).chain(descendants(*root)) {
                        let Some(stat) = ProcStat::read(pid) else {
                            continue;
                        };
                        let peak = peak_rss(pid);
                        let mut seen = s.lock().unwrap();
                        let e = seen.entry((pid, stat.start)).or_insert_with(|| Seen {
                            host: host.clone(),
                            is_ka: pid == *root,
                            comm: stat.comm.clone(),
                            ticks: 0,
                            child_ticks: 0,
                            peak: 0,
                            first: now,
                            last: now,
                        });
                        e.ticks = e.ticks.max(stat.ticks);
                        e.child_ticks = e.child_ticks.max(stat.child_ticks);
                        e.peak = e.peak.max(peak);
                        // A process that execs (sh → tar) changes its name.
                        e.comm = stat.comm;
                        e.last = now;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        ProcessWatch { seen, stop }
    }

    /// Everything seen so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().values().cloned().collect()
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What `/proc/PID/stat` says of a process.
struct ProcStat {
    comm: String,
    ticks: u64,
    child_ticks: u64,
    /// Its start time since boot, in clock ticks (with the PID, a name no
    /// other process has).
    start: u64,
}

impl ProcStat {
    fn read(pid: i32) -> Option<ProcStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat[open + 1..close].to_string();
        // After the name: state (field 3) first, so utime (14) is at 11.
        let f: Vec<u64> = stat[close + 1..]
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        Some(ProcStat {
            comm,
            ticks: f.get(11)? + f.get(12)?,
            child_ticks: f.get(13)? + f.get(14)?,
            start: *f.get(19)?,
        })
    }
}

/// The processes below `pid`, from every thread's `children` list (ka runs
/// its tools from worker threads).
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// The peak resident memory of a process so far (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Bytes `host`'s `eth0` has sent so far, frames as `tbf` counts them.
fn sent(lab: &Lab, netns: &str) -> u64 {
    lab.exec_output(netns, &["cat", "/sys/class/net/eth0/statistics/tx_bytes"])
        .trim()
        .parse()
        .expect("tx_bytes is a number")
}

/// Packets every `tbf` of the lab has dropped so far: the source's own
/// (what it sends) and the switch ports' (what the hosts receive).
fn tbf_drops(lab: &Lab) -> (u64, u64) {
    let dropped = |netns: &str| -> u64 {
        lab.exec_output(netns, &["tc", "-s", "qdisc", "show"])
            .split("dropped ")
            .skip(1)
            .filter_map(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
            .sum()
    };
    (dropped(&lab.source().netns), dropped(lab.switch_netns()))
}

/// One clone: a source, `joins`, and what was watched while it ran.
struct CloneRun {
    fin: Finished,
    joins: Vec<Join>,
    /// When `ka serve` was started.
    spawned: Instant,
    /// When it said it listened (the layout read, for a system).
    listening: Instant,
    seen: Vec<Seen>,
    /// The whole machine's CPU time from the stream's start to the last
    /// node verified.
    machine: MachineCpu,
    /// Bytes the source's port sent, and all the nodes' ports.
    source_sent: u64,
    nodes_sent: u64,
    /// Packets dropped by the source's `tbf` and by the switch ports'.
    drops: (u64, u64),
}

impl CloneRun {
    /// Runs `ka serve` of `input` and every node's `ka join` with
    /// `output` onto its disk (`--system` or `--target`) and `join_extra`,
    /// until the source ends and every node has left.
    fn run(
        lab: &Lab,
        s: &Session,
        input: &[&str],
        disks: &[Loop],
        output: &str,
        join_extra: &[&str],
    ) -> CloneRun {
        let spool = lab.dir().to_str().expect("a UTF-8 lab directory");
        let hosts: Vec<String> = std::iter::once(lab.source())
            .chain(lab.nodes())
            .map(|h| h.netns.clone())
            .collect();
        let sent_before: Vec<u64> = hosts.iter().map(|h| sent(lab, h)).collect();
        let drops_before = tbf_drops(lab);
        let spawned = Instant::now();
        let serve = s.serve_input(lab.nodes().len(), input, &["--spool-dir", spool]);
        let listening = wait_listening(&serve);
        let joins: Vec<Join> = lab
            .nodes()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let mut args = vec!["--spool-dir", spool];
                args.extend_from_slice(join_extra);
                s.join_onto(i + 1, &h.name, output, Path::new(disks[i].dev()), &args)
            })
            .collect();
        let mut roots = vec![(serve.proc.pid().as_raw(), "source".to_string())];
        roots.extend(
            joins
                .iter()
                .map(|j| (j.proc.pid().as_raw(), j.name.clone())),
        );
        let watch = ProcessWatch::start(roots);
        let cpu = CpuLog::start();
        let fin = serve.finish(SESSION);
        let mut joins = joins;
        for j in &mut joins {
            j.proc.wait_exit(Duration::from_secs(120));
        }
        let seen = watch.seen();
        drop(watch);
        let started = fin.first("Started").at;
        let last = fin
            .all("Verified")
            .iter()
            .map(|e| e.at)
            .max()
            .unwrap_or(fin.ended);
        let machine = cpu.finish(started, last);
        let sent_after: Vec<u64> = hosts.iter().map(|h| sent(lab, h)).collect();
        let drops_after = tbf_drops(lab);
        let delta: Vec<u64> = sent_after
            .iter()
            .zip(&sent_before)
            .map(|(a, b)| a - b)
            .collect();
        CloneRun {
            fin,
            joins,
            spawned,
            listening,
            seen,
            machine,
            source_sent: delta[0],
            nodes_sent: delta[1..].iter().sum(),
            drops: (
                drops_after.0 - drops_before.0,
                drops_after.1 - drops_before.1,
            ),
        }
    }

    /// The source's events, each stamped with seconds from the stream's
    /// start, on standard error.
    fn tell_story(&self, kind: &str) {
        let t0 = self.started();
        eprintln!("--- {kind}: the source's events ---");
        for l in &self.fin.lines {
            if !l.text.starts_with("{\"progress\"") {
                eprintln!("[{:8.3}] {}", signed(l.at, t0), l.text);
            }
        }
    }

    /// The nodes that failed, with the source's reason.
    fn failures(&self) -> Vec<String> {
        let mut failed: Vec<String> = self
            .fin
            .report
            .nodes
            .iter()
            .filter(|l| !l.ok)
            .map(|l| format!("{}: {}", l.name, l.reason))
            .collect();
        let n = self.joins.len();
        if self.fin.report.nodes.len() < n {
            failed.push(format!(
                "only {} of {n} nodes are in the report",
                self.fin.report.nodes.len()
            ));
        }
        failed
    }

    fn started(&self) -> Instant {
        self.fin.first("Started").at
    }

    /// Seconds from the stream's start to each node's `Verified`, by name.
    fn verified(&self) -> BTreeMap<String, f64> {
        let t0 = self.started();
        self.fin
            .all("Verified")
            .iter()
            .filter_map(|e| Some((e.node.clone()?, secs(e.at, t0))))
            .collect()
    }

    /// Seconds from the stream's start to the first progress line that
    /// shows each node holding all `size` bytes.
    fn all_received(&self, size: u64) -> BTreeMap<String, f64> {
        let t0 = self.started();
        let mut out = BTreeMap::new();
        for (at, nodes) in self.fin.progress() {
            for (name, got) in nodes {
                if got >= size {
                    out.entry(name).or_insert(secs(at, t0));
                }
            }
        }
        out
    }

    /// CPU seconds of the processes seen on `side` (`source`, or any node)
    /// whose name `select` accepts, their own time only.
    fn cpu(&self, source_side: bool, select: impl Fn(&Seen) -> bool) -> f64 {
        let hz = clock_ticks_per_second();
        self.seen
            .iter()
            .filter(|s| (s.host == "source") == source_side && select(s))
            .map(|s| s.ticks as f64 / hz)
            .sum::<f64>()
            // An empty sum is -0.0, which prints as "-0.0".
            + 0.0
    }

    /// CPU seconds of the children the `ka` processes on one side waited
    /// for but the sampler never saw (tools that ran between samples).
    fn unseen_tools(&self, source_side: bool) -> f64 {
        let hz = clock_ticks_per_second();
        let waited: f64 = self
            .seen
            .iter()
            .filter(|s| (s.host == "source") == source_side && s.is_ka)
            .map(|s| s.child_ticks as f64 / hz)
            .sum();
        (waited - self.cpu(source_side, |s| !s.is_ka)).max(0.0)
    }

    /// The largest peak memory of the processes on one side that `select`
    /// accepts.
    fn peak(&self, source_side: bool, select: impl Fn(&Seen) -> bool) -> u64 {
        self.seen
            .iter()
            .filter(|s| (s.host == "source") == source_side && select(s))
            .map(|s| s.peak)
            .max()
            .unwrap_or(0)
    }

    /// Prints what a clone measured against the wire's floor for
    /// `floor_bytes` (`floor_what`), and why it is above 1.10 × it when it
    /// is.
    fn print(&self, kind: &str, lab: &Lab, floor_bytes: u64, floor_what: &str) {
        let rate = lab.rate();
        let t0 = self.started();
        let size = self.fin.report.size;
        let verified = self.verified();
        if verified.is_empty() {
            println!("{kind}: no node verified (the failures are above, on standard error)");
            return;
        }
        let received = self.all_received(size);
        let last = verified.values().copied().fold(0.0, f64::max);
        let first = verified.values().copied().fold(f64::INFINITY, f64::min);
        let floor = lab.floor(floor_bytes, rate).as_secs_f64();
        let stream_floor = lab.floor(size, rate).as_secs_f64();
        // What the source's port did send (zero runs go as extents, not
        // bytes). A veth counts one set of headers per GSO packet, so its
        // count is about the TCP payload.
        let wire_floor = lab.floor(self.source_sent, rate).as_secs_f64();
        let from_spawn = last + secs(t0, self.spawned);
        println!(
            "{kind}: all {} nodes verified {last:.1} s after the stream started = {:.3} × the floor of {floor_what} ({floor:.1} s)",
            verified.len(),
            last / floor,
        );
        println!(
            "  {:.3} × the floor of the stream's size ({stream_floor:.1} s), {:.3} × the floor of what the source's port sent ({wire_floor:.1} s)",
            last / stream_floor,
            last / wire_floor.max(1e-9)
        );
        println!(
            "  from `ka serve` started: {from_spawn:.1} s (listening after {:.1} s, stream started after {:.1} s); first node verified at {first:.1} s",
            secs(self.listening, self.spawned),
            secs(t0, self.spawned)
        );
        println!(
            "  bytes: {} {:.1} MiB; the stream {:.1} MiB ({:.3} × them); the source's port sent {:.1} MiB ({:.3} ×; TCP payload and one set of headers per GSO packet), all ports {:.1} MiB",
            floor_what,
            floor_bytes as f64 / MIB,
            size as f64 / MIB,
            size as f64 / floor_bytes as f64,
            self.source_sent as f64 / MIB,
            self.source_sent as f64 / floor_bytes as f64,
            (self.source_sent + self.nodes_sent) as f64 / MIB
        );
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &self.fin.events {
            if !matches!(
                e.kind.as_str(),
                "Joined" | "Started" | "Verified" | "Released" | "ImageDone" | "Finished"
            ) {
                *kinds.entry(e.kind.as_str()).or_default() += 1;
            }
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        // The source prints progress five times a second from the task that
        // sends its heartbeats: a long pause is a source that did not run.
        let progress = self.fin.progress();
        let pause = progress
            .windows(2)
            .map(|w| secs(w[1].0, w[0].0))
            .fold(0.0, f64::max);
        println!(
            "  chain events: {}; longest pause between the source's progress lines {pause:.2} s; packets dropped by tbf: {} at the source's port, {} at the switch's ports",
            if kinds.is_empty() {
                "none (no death, relink, stranding or slow node)".to_string()
            } else {
                kinds.join(", ")
            },
            self.drops.0,
            self.drops.1
        );
        if let Some(done) = self.fin.events.iter().find(|e| e.kind == "ImageDone") {
            println!(
                "  the source had read all of it {:.1} s after the stream started",
                secs(done.at, t0)
            );
        }
        let gaps: Vec<f64> = verified
            .iter()
            .filter_map(|(n, v)| Some(v - received.get(n)?))
            .collect();
        if let (Some(r1), Some(rn)) = (
            received.values().copied().reduce(f64::min),
            received.values().copied().reduce(f64::max),
        ) {
            println!(
                "  nodes held every byte at {r1:.1}–{rn:.1} s, and verified {:.1}–{:.1} s after that",
                gaps.iter().copied().fold(f64::INFINITY, f64::min).max(0.0),
                gaps.iter().copied().fold(0.0, f64::max)
            );
        }
        let mkfs = |s: &Seen| s.comm.starts_with("mkfs") || s.comm.starts_with("mke2fs");
        let tar = |s: &Seen| s.comm == "tar";
        let stream = last.max(1e-9);
        let node_ka = self.cpu(false, |s| s.is_ka);
        let node_tar = self.cpu(false, tar);
        let node_mkfs = self.cpu(false, mkfs);
        let node_other =
            self.cpu(false, |s| !s.is_ka && !tar(s) && !mkfs(s)) + self.unseen_tools(false);
        let source_ka = self.cpu(true, |s| s.is_ka);
        let source_tar = self.cpu(true, tar);
        let source_other = self.cpu(true, |s| !s.is_ka && !tar(s)) + self.unseen_tools(true);
        let processes =
            node_ka + node_tar + node_mkfs + node_other + source_ka + source_tar + source_other;
        let m = self.machine;
        println!(
            "  CPU seconds over the stream ({} cores, {:.0} core-s): machine {:.0} % busy: user {:.1}, system {:.1}, irq+softirq {:.1}, steal {:.1}, idle {:.1}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            m.total(),
            100.0 * m.busy() / m.total().max(1e-9),
            m.user,
            m.system,
            m.irq,
            m.steal,
            m.idle
        );
        let rest = (m.busy() - processes).max(0.0);
        if self.seen.iter().any(|s| !s.is_ka) {
            println!(
                "    of which the source's ka {source_ka:.1}, its tar {source_tar:.1}, other tools {source_other:.1}; nodes' ka {node_ka:.1}, tar -x {node_tar:.1}, mkfs {node_mkfs:.1}, other tools {node_other:.1}; everything else (network, loop devices, other work on the machine) {rest:.1}",
            );
        } else {
            println!(
                "    of which the source's ka {source_ka:.1}; nodes' ka {node_ka:.1}; everything else (network, loop devices, other work on the machine) {rest:.1}",
            );
        }
        println!(
            "  in cores: source {:.2}, nodes' ka {:.2}, nodes' tar -x {:.2}",
            (source_ka + source_tar + source_other) / stream,
            node_ka / stream,
            node_tar / stream
        );
        let span = |select: &dyn Fn(&Seen) -> bool| {
            let runs: Vec<&Seen> = self
                .seen
                .iter()
                .filter(|s| s.host != "source" && select(s))
                .collect();
            match (
                runs.iter().map(|s| s.first).min(),
                runs.iter().map(|s| s.last).max(),
            ) {
                (Some(a), Some(b)) => format!("{:.1}–{:.1} s", signed(a, t0), signed(b, t0)),
                _ => "not seen".into(),
            }
        };
        let tools = self.seen.iter().any(|s| !s.is_ka);
        if tools {
            println!(
                "  on the nodes, mkfs ran at {} and tar -x at {} of the stream",
                span(&mkfs),
                span(&tar)
            );
        }
        let node_peaks: Vec<u64> = self
            .seen
            .iter()
            .filter(|s| s.is_ka && s.host != "source")
            .map(|s| s.peak)
            .collect();
        let mean = node_peaks.iter().sum::<u64>() as f64 / node_peaks.len().max(1) as f64;
        let mib = |b: u64| b as f64 / MIB;
        let (node_tools, source_tools) = if tools {
            (
                format!(
                    ", their tar -x at most {:.1} MiB, mkfs {:.1} MiB",
                    mib(self.peak(false, tar)),
                    mib(self.peak(false, mkfs))
                ),
                format!(", its tar {:.1} MiB", mib(self.peak(true, tar))),
            )
        } else {
            Default::default()
        };
        println!(
            "  peak RSS: each ka join {:.1}–{:.1} MiB (mean {:.1}){node_tools}; ka serve {:.1} MiB{source_tools}",
            mib(node_peaks.iter().copied().min().unwrap_or(0)),
            mib(node_peaks.iter().copied().max().unwrap_or(0)),
            mean / MIB,
            mib(self.peak(true, |s| s.is_ka)),
        );
        if last / floor > 1.10 {
            let deaths = self.fin.all("Dead").len();
            let mut why = Vec::new();
            if deaths > 0 {
                why.push(format!(
                    "{deaths} nodes were declared dead though none failed (the longest pause between the source's progress lines was {pause:.2} s: a process that does not run for a second is dead to its peers), and the nodes relinked under the source were fed by it at once, each from its own offset, so its port sent {:.2} × what one chain needs",
                    self.source_sent as f64 / (size as f64).max(1.0)
                ));
            } else if last / wire_floor > 1.10 {
                why.push(format!(
                    "the chain ran at {:.0} % of the port rate with no fault: look at the CPU",
                    100.0 * wire_floor / last
                ));
            }
            let tail = gaps.iter().copied().fold(0.0, f64::max);
            if tail > 0.05 * floor {
                why.push(format!(
                    "a node took {tail:.1} s after its last byte to finish unpacking"
                ));
            }
            if m.idle < 0.05 * m.total() {
                why.push(format!(
                    "the machine had no idle CPU, and ka and its tools used only {:.0} % of it: other work ran beside the lab",
                    100.0 * (processes / m.busy().max(1e-9))
                ));
            }
            println!("  above the 1.10 goal: {}", why.join("; "));
        }
    }
}

fn secs(a: Instant, b: Instant) -> f64 {
    a.saturating_duration_since(b).as_secs_f64()
}

/// Seconds from `b` to `a`, negative when `a` came first.
fn signed(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64()
    } else {
        -(b - a).as_secs_f64()
    }
}

/// The machine's CPU time by kind, from the `cpu` line of `/proc/stat`
/// (clock ticks): user, nice, system, idle, iowait, irq, softirq, steal.
fn cpu_columns() -> [u64; 8] {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .expect("an aggregate cpu line in /proc/stat");
    let mut out = [0u64; 8];
    for (o, v) in out.iter_mut().zip(line.split_whitespace().skip(1)) {
        *o = v.parse().unwrap_or(0);
    }
    out
}

/// The machine's CPU time while a clone ran, by kind, in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct MachineCpu {
    /// User time of every process (nice included): ka, tar, mkfs, and
    /// whatever else runs on the machine.
    user: f64,
    /// Kernel time in system calls (file systems, loop devices, TCP sends).
    system: f64,
    /// Interrupts and soft interrupts: the lab's network (bridge, `tbf`,
    /// TCP receive) mostly.
    irq: f64,
    /// Time the hypervisor gave to other machines.
    steal: f64,
    /// Idle, waiting for I/O included.
    idle: f64,
}

impl MachineCpu {
    fn busy(&self) -> f64 {
        self.user + self.system + self.irq + self.steal
    }

    fn total(&self) -> f64 {
        self.busy() + self.idle
    }
}

/// When, and the machine's CPU columns then.
type CpuSample = (Instant, [u64; 8]);

/// The machine's CPU time, sampled every 50 ms while a clone runs, so its
/// use is taken over exactly the stream.
struct CpuLog {
    samples: Arc<Mutex<Vec<CpuSample>>>,
    stop: Arc<AtomicBool>,
}

impl CpuLog {
    fn start() -> CpuLog {
        let samples: Arc<Mutex<Vec<CpuSample>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                s.lock().unwrap().push((Instant::now(), cpu_columns()));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CpuLog { samples, stop }
    }

    /// The machine's CPU time between `from` and `to`.
    fn finish(&self, from: Instant, to: Instant) -> MachineCpu {
        self.stop.store(true, Ordering::Relaxed);
        let s = self.samples.lock().unwrap();
        let at = |t: Instant| {
            s.iter()
                .min_by_key(|(i, _)| if *i > t { *i - t } else { t - *i })
                .map(|(_, c)| *c)
                .expect("CPU samples")
        };
        let (a, b) = (at(from), at(to));
        let d = |i: usize| b[i].saturating_sub(a[i]) as f64 / clock_ticks_per_second();
        MachineCpu {
            user: d(0) + d(1),
            system: d(2),
            irq: d(5) + d(6),
            steal: d(7),
            idle: d(3) + d(4),
        }
    }
}

/// Waits for `ka serve` to listen; returns when it did.
fn wait_listening(serve: &Serve) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !serve.proc.stderr().contains("waiting for") {
        assert!(
            Instant::now() < deadline,
            "ka serve did not listen within 120 s:\n{}",
            serve.proc.transcript()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

/// The source's trees, to compare every node's with.
struct Trees {
    root: BTreeMap<String, Entry>,
    home: BTreeMap<String, Entry>,
}

/// Mounts node `name`'s rebuilt disk as the source is mounted and lists
/// how its trees differ from the source's (empty when they match).
fn compare_node(lab: &Lab, name: &str, disk: &Loop, source: &Trees) -> Vec<String> {
    let at = lab.dir().join(format!("check-{name}"));
    let root = Mount::new(&disk.part(4), &at, &[]);
    // The source's xfs, with the same UUID, is mounted on this machine.
    let home = Mount::new(&disk.part(5), &at.join("home"), &["nouuid"]);
    let mut diffs: Vec<String> = diff_trees(&source.root, &tree(&root.0), &["tmp/"])
        .into_iter()
        .map(|d| format!("/{d}"))
        .collect();
    diffs.extend(
        diff_trees(&source.home, &tree(&home.0), &[])
            .into_iter()
            .map(|d| format!("/home/{d}")),
    );
    drop(home);
    drop(root);
    let _ = std::fs::remove_dir(&at);
    diffs
}

/// The BLAKE3 digest of a whole file or device.
fn digest(path: &str) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    h.update_reader(f)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    h.finalize()
}

/// Bytes of `path` in blocks of ka's image block size that are not all
/// zeros: what an image clone of it sends.
fn data_bytes(path: &str) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    let block = ka_net::BLOCK as usize;
    let mut buf = vec![0u8; 64 * block];
    let mut data = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("reading {path}: {e}"),
            }
        }
        if n == 0 {
            return data;
        }
        data += buf[..n]
            .chunks(block)
            .filter(|c| !ka_net::is_zero(c))
            .map(|c| c.len() as u64)
            .sum::<u64>();
    }
}

/// Prints a failed clone's story (without progress lines) and its failed
/// nodes' output, on standard error.
fn tell_failure(c: &CloneRun) {
    let events: String = c
        .fin
        .transcript
        .lines()
        .filter(|l| !l.contains("\"progress\""))
        .map(|l| format!("{l}\n"))
        .collect();
    eprintln!("--- the source ---\n{events}");
    for j in &c.joins {
        if c.fin.report.nodes.iter().any(|l| l.name == j.name && !l.ok) {
            eprintln!("{}", j.proc.transcript());
        }
    }
}

fn main() {
    let a = args();
    let mut problems: Vec<String> = Vec::new();
    let lab = Lab::new(a.nodes, a.rate);
    let root_files = a.files * 3 / 5;
    let home_files = a.files - root_files;
    let shape = DiskShape::holding(root_files, home_files);
    let t = Instant::now();
    let (mut source, copied) =
        SourceMachine::build_lived_in(lab.dir(), shape, root_files, home_files);
    let built = t.elapsed().as_secs_f64();
    let root = source
        .root
        .to_str()
        .expect("a UTF-8 lab directory")
        .to_string();
    let tmp = format!("{root}/tmp");
    let layout = ka_net::system::read_layout(&ka_net::system::ReadOptions {
        root: source.root.clone(),
        exclude: vec![PathBuf::from(&tmp)],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("reading the source's layout: {e}"));
    let used = layout.used_bytes();
    // The lab's processes run in mount namespaces of their own, copied
    // from the host's when they start: the source must be mounted by now.
    let seen = lab.exec_output(
        &lab.source().netns,
        &["findmnt", "-n", "-o", "SOURCE", "--mountpoint", &root],
    );
    assert_eq!(
        seen.trim(),
        source.disk.part(4),
        "the source's root is not visible in the lab's namespace"
    );
    println!(
        "ka lab system clones: {} nodes, ports {} Mbit/s, load average {}",
        a.nodes,
        a.rate.0 / 1_000_000,
        load_average()
    );
    println!(
        "source: {:.0} MiB GPT disk (ext4 / {:.0} MiB, xfs /home the rest, vfat ESP and BIOS boot sent raw, swap); {} files of this machine ({:.0} MiB) copied in {built:.0} s; used bytes (the plan's) {:.1} MiB",
        shape.disk as f64 / MIB,
        shape.root as f64 / MIB,
        copied.files,
        copied.bytes as f64 / MIB,
        used as f64 / MIB
    );
    let t = Instant::now();
    let trees = Trees {
        root: tree(&source.root),
        home: tree(&source.root.join("home")),
    };
    let listed = t.elapsed().as_secs_f64();
    let disks: Vec<Loop> = lab
        .nodes()
        .iter()
        .map(|h| Loop::blank(&lab.dir().join(format!("{}-disk.img", h.name)), shape.disk))
        .collect();
    let s = lab.session_of(Path::new(source.disk.dev()));

    let mut window = Vec::new();
    if let Some(w) = &a.window {
        window.extend(["--window", w.as_str()]);
    }
    let mut join_extra = vec!["--session", "system"];
    join_extra.extend_from_slice(&window);
    let system = CloneRun::run(
        &lab,
        &s,
        &[
            "--system",
            "--root",
            &root,
            "--exclude",
            &tmp,
            "--session",
            "system",
        ],
        &disks,
        "--system",
        &join_extra,
    );
    let failed = system.failures();
    if !failed.is_empty() {
        tell_failure(&system);
        problems.push(format!("system clone: failed nodes: {}", failed.join("; ")));
    }
    if a.story {
        system.tell_story("system clone");
    }
    system.print("system clone", &lab, used, "used bytes");
    let t = Instant::now();
    let mut identical = 0;
    let verified: Vec<(&str, &Loop)> = lab
        .nodes()
        .iter()
        .zip(&disks)
        .filter(|(h, _)| {
            !failed
                .iter()
                .any(|f| f.starts_with(&format!("{}:", h.name)))
        })
        .map(|(h, d)| (h.name.as_str(), d))
        .collect();
    // Two at a time: reading and hashing every file of a node is most of
    // the work, and this machine has few cores.
    let compared: Vec<(&str, Vec<String>)> = verified
        .chunks(2)
        .flat_map(|pair| {
            std::thread::scope(|scope| {
                let running: Vec<_> = pair
                    .iter()
                    .map(|(name, disk)| {
                        let (lab, trees) = (&lab, &trees);
                        scope.spawn(move || (*name, compare_node(lab, name, disk, trees)))
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|r| r.join().expect("comparing a node's trees"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (name, diffs) in compared {
        if diffs.is_empty() {
            identical += 1;
        } else {
            let shown: Vec<&str> = diffs.iter().take(20).map(String::as_str).collect();
            eprintln!(
                "!!! {name}'s trees DIFFER from the source's in {} places:\n{}",
                diffs.len(),
                shown.join("\n")
            );
            problems.push(format!("{name}'s trees differ in {} places", diffs.len()));
        }
    }
    println!(
        "  trees: {identical} of {} nodes identical to the source ({} entries on /, {} on /home; listed in {listed:.0} s, nodes compared in {:.0} s)",
        a.nodes,
        trees.root.len(),
        trees.home.len(),
        t.elapsed().as_secs_f64()
    );
    drop(system);

    if a.image_clone {
        source.unmount();
        let dev = source.disk.dev().to_string();
        let data = data_bytes(&dev);
        let image = CloneRun::run(
            &lab,
            &s,
            &["--image", &dev, "--session", "image"],
            &disks,
            "--target",
            &["--session", "image"],
        );
        let failed = image.failures();
        if !failed.is_empty() {
            tell_failure(&image);
            problems.push(format!("image clone: failed nodes: {}", failed.join("; ")));
        }
        if a.story {
            image.tell_story("image clone");
        }
        image.print("image clone", &lab, data, "its data blocks");
        let floor_used = lab.floor(used, a.rate).as_secs_f64();
        let last = image.verified().values().copied().fold(0.0, f64::max);
        println!(
            "  against the system's used bytes: {:.3} × their floor ({floor_used:.1} s)",
            last / floor_used
        );
        let t = Instant::now();
        let want = digest(&dev);
        let mut same = 0;
        for (h, disk) in lab.nodes().iter().zip(&disks) {
            if digest(disk.dev()) == want {
                same += 1;
            } else {
                eprintln!(
                    "!!! {}'s disk DIFFERS from the source's after the image clone",
                    h.name
                );
                problems.push(format!("{}'s disk differs after the image clone", h.name));
            }
        }
        println!(
            "  disks: {same} of {} byte-identical to the source's (checked in {:.0} s)",
            a.nodes,
            t.elapsed().as_secs_f64()
        );
    }
    drop(disks);
    drop(source);
    drop(lab);
    if !problems.is_empty() {
        eprintln!("!!! PROBLEMS:\n{}", problems.join("\n"));
        std::process::exit(1);
    }
}
