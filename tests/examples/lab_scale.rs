//! How ka scales in the network-namespace lab: time to all-verified for
//! chains of N nodes against the floor of the link, CPU busy %, the heal time
//! after a node's death, and the simulator's prediction for the same run.
//!
//! Run through `scripts/lab-scale` (builds `ka`, the simulator and this),
//! as root. Not a test: it prints numbers to read, on a machine that may be
//! busy with other work, so it prints the load average beside them.
//!
//! ```text
//! lab_scale [--nodes 1,2,4,8,16] [--size-mib 64] [--rate-mbit 100] [--plain-nodes 16] [--paired K]
//!           [--serve-args "--max-rate 95mbit"] [--direct-stats yes]
//! ```
//!
//! With `--paired K`, each N runs K times, each ka run followed at once by
//! a plain relay chain of the same N, and a last line per N sets the two
//! side by side: on a VM whose speed drifts between runs, only a pair run
//! back to back compares like with like.
//!
//! `--plain-nodes` (default: the largest N; 0: none) also runs a chain of
//! plain TCP relays, no ka, over the same lab: each relay writes what it
//! reads to a file and forwards it as it comes, with no hashing and no
//! protocol. What that chain cannot do, the lab machine cannot do; it is
//! the baseline that tells ka's shortfall from the emulation's.
//!
//! `--slow K:MBIT` slows node K's port to MBIT Mbit/s in every run, ka's and
//! the plain chain's: after each ka row a line says when ka found the slow
//! node, when the others were released (against the floor) and when the
//! slow one verified (against its own port's floor). The plain chain is as
//! fast as its slowest port, for every node.
//!
//! `--image system` clones this machine's own files (a tar of /usr cut to
//! the size) instead of random bytes, to both ka and the plain chain; with
//! `--serve-args "--compress zstd"` it measures a packed stream against a
//! plain chain that sends every byte.
//!
//! `--serve-args` passes more options to every `ka serve` (say, to pace
//! the source), and `--direct-stats yes` prints each node's direct
//! forwarding counts after its run; the nodes log them at info level, so
//! run it with `RUST_LOG=info`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ka_tests::lab::{cpu_ticks, load_average, Lab, Rate};

const SESSION: Duration = Duration::from_secs(300);

struct Args {
    nodes: Vec<usize>,
    size: u64,
    rate: Rate,
    plain_nodes: Option<Vec<usize>>,
    /// Runs per N, each followed by a plain relay chain of the same N, so
    /// that ka and its baseline meet the same state of a noisy machine.
    paired: usize,
    /// More options for every `ka serve`.
    serve_args: Vec<String>,
    /// Print each node's direct forwarding counts after its run.
    direct_stats: bool,
    /// Print, after each ka row, how long after its upstream each node was
    /// verified: where in the chain the time went.
    hops: bool,
    /// One node whose port is slower than the others: its number and rate.
    slow: Option<(usize, Rate)>,
    /// The image: random bytes, or this machine's own system files.
    system_files: bool,
}

const USAGE: &str =
    "usage: lab_scale [--nodes 1,2,4,8,16] [--size-mib 64] [--rate-mbit 100] [--plain-nodes 16] [--paired K] [--serve-args ARGS] [--direct-stats yes|no] [--hops yes|no] [--slow K:MBIT] [--image random|system]";

/// Prints one ka row of the table.
fn print_row(n: usize, r: &Run, sim: f64, floor: f64, hop: f64) {
    println!(
        "{n:>3} {:>8.3}s {:>6.3} {:>7.3}s {:>4.0}% {:>8.2} {sim:>8.3}s {:>6.3} {:>6.3} {:>9.3}s {:>7} {:>11} {:>15}",
        r.last,
        r.last / floor,
        r.first,
        r.busy,
        r.ka_cpu / r.last,
        sim / floor,
        r.last / sim,
        floor + (n as f64 - 1.0) * hop,
        if n > 1 {
            format!("{:.0}ms", (r.last - r.first) * 1000.0 / (n - 1) as f64)
        } else {
            "-".into()
        },
        r.lag_growth
            .map_or("-".into(), |g| format!("{:+.2}MiB/s", g / (1 << 20) as f64)),
        load_average()
    );
}

impl Args {
    /// A lab of `n` nodes with `--slow`'s port slowed, if it is one of them.
    fn lab(&self, n: usize) -> Lab {
        let lab = Lab::new(n, self.rate);
        if let Some((k, rate)) = self.slow.filter(|&(k, _)| k <= n) {
            lab.set_rate(lab.node(k), rate);
        }
        lab
    }

    /// `--serve-args`, as `Session::serve` takes them.
    fn serve_args(&self) -> Vec<&str> {
        self.serve_args.iter().map(String::as_str).collect()
    }
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("bad value {value:?} for {flag}; {USAGE}"))
}

fn args() -> Args {
    let mut a = Args {
        nodes: vec![1, 2, 4, 8, 16],
        size: 64 << 20,
        rate: Rate::mbit(100),
        plain_nodes: None,
        paired: 0,
        serve_args: Vec::new(),
        direct_stats: false,
        hops: false,
        slow: None,
        system_files: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value; {USAGE}"));
        match flag.as_str() {
            "--nodes" => a.nodes = value.split(',').map(|n| parse(flag, n)).collect(),
            "--size-mib" => a.size = parse::<u64>(flag, value) << 20,
            "--rate-mbit" => a.rate = Rate::mbit(parse(flag, value)),
            "--plain-nodes" => {
                a.plain_nodes = Some(value.split(',').map(|n| parse(flag, n)).collect())
            }
            "--paired" => a.paired = parse(flag, value),
            "--serve-args" => a.serve_args = value.split_whitespace().map(String::from).collect(),
            "--direct-stats" => a.direct_stats = yes_or_no(flag, value),
            "--hops" => a.hops = yes_or_no(flag, value),
            "--slow" => {
                let (k, mbit) = value
                    .split_once(':')
                    .unwrap_or_else(|| panic!("--slow takes K:MBIT; {USAGE}"));
                a.slow = Some((parse(flag, k), Rate::mbit(parse(flag, mbit))));
            }
            "--image" => {
                a.system_files = match value.as_str() {
                    "random" => false,
                    "system" => true,
                    _ => panic!("--image takes random or system; {USAGE}"),
                }
            }
            _ => panic!("unknown argument {flag}; {USAGE}"),
        }
    }
    a
}

/// The session every run of `a` clones: `--image system` replaces the
/// random image with as much of this machine's own programs, libraries
/// and text as fits (a tar of /usr: what a system image holds, packing
/// about 3:1 with zstd), the same bytes for ka and the plain chain.
fn session<'l>(lab: &'l Lab, a: &Args) -> ka_tests::lab::Session<'l> {
    let s = lab.session(a.size);
    if a.system_files {
        let len = ka_tests::system_files_image(&s.image, a.size);
        assert_eq!(len, a.size, "/usr holds less than the image size");
    }
    s
}

fn yes_or_no(flag: &str, value: &str) -> bool {
    match value {
        "yes" => true,
        "no" => false,
        _ => panic!("{flag} takes yes or no; {USAGE}"),
    }
}

/// When, and the machine's (busy, total) CPU ticks then.
type CpuSample = (Instant, (u64, u64));

/// `/proc/stat`, and the CPU time of the ka processes, sampled every 50 ms
/// while a run lasts, so the machine's busy % can be taken over exactly the
/// stream's interval and ka's own share told apart from other work.
struct CpuSampler {
    samples: Arc<Mutex<Vec<CpuSample>>>,
    /// The last CPU time (clock ticks) seen of each ka process.
    ka: Arc<Mutex<HashMap<i32, u64>>>,
    stop: Arc<AtomicBool>,
}

impl CpuSampler {
    fn start(pids: Vec<i32>) -> CpuSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let ka = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, k, st) = (samples.clone(), ka.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                s.lock().unwrap().push((Instant::now(), cpu_ticks()));
                for &pid in &pids {
                    if let Some(t) = process_ticks(pid) {
                        k.lock().unwrap().insert(pid, t);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CpuSampler { samples, ka, stop }
    }

    /// Busy % of the whole machine (all cores) between `from` and `to`, and
    /// the CPU seconds the ka processes used in all.
    fn finish(&self, from: Instant, to: Instant) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let s = self.samples.lock().unwrap();
        let at = |t: Instant| {
            s.iter()
                .min_by_key(|(i, _)| if *i > t { *i - t } else { t - *i })
                .map(|(_, c)| *c)
                .expect("CPU samples")
        };
        let (a, b) = (at(from), at(to));
        let busy = (b.0 - a.0) as f64 * 100.0 / (b.1 - a.1).max(1) as f64;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let ka = self.ka.lock().unwrap().values().sum::<u64>() as f64 / hz;
        (busy, ka)
    }
}

/// User plus system CPU time of `pid` so far, in clock ticks.
fn process_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// One clean run of `n` nodes.
struct Run {
    /// Seconds from the stream's start to the last node verified.
    last: f64,
    /// … to the first.
    first: f64,
    /// The machine's busy % over that interval.
    busy: f64,
    /// CPU seconds all ka processes used.
    ka_cpu: f64,
    /// How fast a node's lag behind its upstream grew, in bytes/s, while the
    /// head was between 25 and 75 % of the image: zero when every hop keeps
    /// the link's rate and the lag is only forwarding granularity, positive
    /// when hops run slower than the link.
    lag_growth: Option<f64>,
}

/// The mean per-hop lag's growth from the source's progress lines (see
/// [`Run::lag_growth`]). The lag itself is not usable: each node reports its
/// progress on its own 250 ms heartbeat phase, which offsets it by up to 3 MB
/// at 100 Mbit/s; the offsets are constant, so the growth is exact.
fn lag_growth(fin: &ka_tests::lab::Finished, n: usize, size: u64) -> Option<f64> {
    if n < 2 {
        return None;
    }
    let t0 = fin.first("Started").at;
    let mut points = Vec::new();
    for (at, got) in fin.progress() {
        let r: Vec<u64> = (1..=n)
            .map(|i| got.get(&format!("n{i}")).copied().unwrap_or(0))
            .collect();
        if !(size / 4..size * 3 / 4).contains(&r[0]) {
            continue;
        }
        let lag = r.windows(2).map(|w| w[0] as f64 - w[1] as f64).sum::<f64>() / (n - 1) as f64;
        points.push(((at - t0).as_secs_f64(), lag));
    }
    if points.len() < 2 {
        return None;
    }
    let k = points.len() as f64;
    let (mt, ml) = (
        points.iter().map(|p| p.0).sum::<f64>() / k,
        points.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - ml)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    (var > 0.0).then(|| cov / var)
}

/// One clean run of `n` nodes; `Err` names the nodes that failed and why.
fn run(n: usize, a: &Args) -> Result<Run, String> {
    let lab = a.lab(n);
    let s = session(&lab, a);
    let serve = s.serve(n, &a.serve_args());
    wait_listening(&serve);
    let mut joins = s.join_all(&[]);
    let mut pids = vec![serve.proc.pid().as_raw()];
    pids.extend(joins.iter().map(|j| j.proc.pid().as_raw()));
    let cpu = CpuSampler::start(pids);
    let fin = serve.finish(SESSION);
    let failed: Vec<String> = fin
        .report
        .nodes
        .iter()
        .filter(|l| !l.ok)
        .map(|l| format!("{}: {}", l.name, l.reason))
        .collect();
    if !failed.is_empty() {
        // What happened, for whoever reads the table (standard error).
        let events: String = fin
            .transcript
            .lines()
            .filter(|l| !l.contains("\"progress\""))
            .map(|l| format!("{l}\n"))
            .collect();
        eprintln!("--- a failed run of {n} nodes ---\n{events}");
        for j in &joins {
            if fin.report.nodes.iter().any(|l| l.name == j.name && !l.ok) {
                eprintln!("{}", j.proc.transcript());
            }
        }
        return Err(failed.join("; "));
    }
    if a.direct_stats {
        for j in &mut joins {
            // The counts are logged as the node leaves.
            j.proc.wait_exit(Duration::from_secs(30));
            let stderr = j.proc.stderr();
            let stats = stderr.lines().filter(|l| l.contains("forwarded straight"));
            for line in stats {
                println!("{}: {line}", j.name);
            }
        }
    }
    let started = fin.first("Started").at;
    if a.hops {
        print_hops(&fin, n, started);
        for j in &joins {
            for (at, e) in j.events() {
                if e.starts_with("UpstreamLost") {
                    let ms = at.saturating_duration_since(started).as_secs_f64() * 1e3;
                    println!("{n:>3} {}: {e} at {ms:.0} ms", j.name);
                }
            }
        }
    }
    // Start-up: from the last join (the stream may begin) until every node
    // receives, as the harness saw the lines.
    let last_join = fin.all("Joined").iter().map(|e| e.at).max();
    let all_receiving = joins
        .iter()
        .map(|j| {
            j.events()
                .into_iter()
                .find(|(_, e)| e.starts_with("Receiving"))
                .map(|(at, _)| at)
        })
        .collect::<Option<Vec<Instant>>>()
        .and_then(|v| v.into_iter().max());
    if let (Some(joined), Some(receiving)) = (last_join, all_receiving) {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        println!(
            "{n:>3} start: every node receiving {:.1} ms after the last join, {:.1} ms after Started",
            ms(joined, receiving),
            ms(started, receiving)
        );
    }
    let verified: Vec<Instant> = fin.all("Verified").iter().map(|e| e.at).collect();
    let last = *verified.iter().max().expect("verified");
    let first = *verified.iter().min().expect("verified");
    let (busy, ka_cpu) = cpu.finish(started, last);
    let lag = lag_growth(&fin, n, a.size);
    if let Some((k, rate)) = a.slow.filter(|&(k, _)| k <= n) {
        print_slow(&lab, &fin, n, k, rate, a);
    }
    s.check(&fin, joins, &[]);
    Ok(Run {
        last: (last - started).as_secs_f64(),
        first: (first - started).as_secs_f64(),
        busy,
        ka_cpu,
        lag_growth: lag,
    })
}

/// One line on a run with a slow port: when ka found node `k` slow, when
/// the others were released, and when `k` verified, each against its floor.
fn print_slow(lab: &Lab, fin: &ka_tests::lab::Finished, n: usize, k: usize, rate: Rate, a: &Args) {
    let started = fin.first("Started").at;
    let since = |e: &ka_tests::lab::SourceEvent| (e.at - started).as_secs_f64();
    let slow = format!("n{k}");
    let found = fin
        .event("Slow", &slow)
        .map_or("never".into(), |e| format!("after {:.2} s", since(e)));
    let released = (1..=n)
        .filter(|&i| i != k)
        .filter_map(|i| fin.event("Released", &format!("n{i}")).map(since))
        .fold(0.0, f64::max);
    let verified = fin.event("Verified", &slow).map_or(f64::NAN, since);
    let floor = lab.floor(a.size, a.rate).as_secs_f64();
    let own_floor = lab.floor(a.size, rate).as_secs_f64();
    println!(
        "{n:>3} slow n{k} at {} Mbit/s: found {found}; the others released by {released:.3}s ({:.3} × floor); n{k} verified at {verified:.3}s ({:.3} × its port's floor {own_floor:.3}s)",
        rate.0 / 1_000_000,
        released / floor,
        verified / own_floor
    );
}

/// One line: `n1` verified so many ms after the stream started, each next
/// node so many ms after its upstream (the chain is in the lab's order).
fn print_hops(fin: &ka_tests::lab::Finished, n: usize, started: Instant) {
    let mut previous = started;
    let mut line = format!("{n:>3} hops (ms after the upstream was verified):");
    for i in 1..=n {
        let name = format!("n{i}");
        match fin.event("Verified", &name) {
            Some(e) => {
                let ms = e.at.saturating_duration_since(previous).as_secs_f64() * 1e3;
                line.push_str(&format!(" {ms:.0}"));
                previous = e.at;
            }
            None => line.push_str(" -"),
        }
    }
    println!("{line}");
}

/// The 50 % kill on an 8-node chain (or the largest N asked, if smaller):
/// (seconds from the kill to the death being declared, to the victim's
/// downstream receiving again).
fn heal(a: &Args) -> Result<(usize, f64, f64), String> {
    let n = a.nodes.iter().copied().max().unwrap_or(8).clamp(3, 8);
    let victim = n / 2;
    let lab = Lab::new(n, a.rate);
    let s = session(&lab, a);
    let serve = s.serve(n, &a.serve_args());
    wait_listening(&serve);
    let joins = s.join_all(&[]);
    let name = format!("n{victim}");
    serve.wait_received(&name, a.size / 2, Duration::from_secs(60));
    let killed = joins[victim - 1].proc.kill9();
    let fin = serve.finish(SESSION);
    let failed: Vec<String> = fin
        .report
        .nodes
        .iter()
        .filter(|l| !l.ok && l.name != name)
        .map(|l| format!("{}: {}", l.name, l.reason))
        .collect();
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    let dead = fin.event("Dead", &name).expect("declared dead").at;
    let (again, _) = joins[victim]
        .event_after("Receiving", killed)
        .expect("the downstream received again");
    s.check(&fin, joins, &[(&name, "connection lost")]);
    Ok((
        n,
        (dead - killed).as_secs_f64(),
        (again - killed).as_secs_f64(),
    ))
}

fn wait_listening(serve: &ka_tests::lab::Serve) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serve.proc.stderr().contains("waiting for") {
        assert!(Instant::now() < deadline, "{}", serve.proc.transcript());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The simulator's completion time for the same run, in seconds.
fn simulate(n: usize, a: &Args) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let bin: PathBuf = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("simulations"))
        .expect("target/<profile>/examples/<this>");
    assert!(
        bin.is_file(),
        "{} is missing: cargo build --release -p simulations",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(["--nodes", &n.to_string()])
        .args(["--size", &a.size.to_string()])
        .args(["--rate-mbit", &(a.rate.0 / 1_000_000).to_string()])
        .args(["--seed", "1"])
        .output()
        .expect("running the simulator");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("simulated completion ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no completion time in the simulator's output:\n{text}"))
}

/// The port the plain relays listen on.
const PLAIN_PORT: u16 = 7100;

/// `--relay OUT NEXT`: one hop of the plain chain. Listens on
/// [`PLAIN_PORT`], connects on to NEXT (`-` for the tail), then copies what
/// it receives to OUT and to NEXT as it comes, 64 KiB at a time at most.
fn plain_relay(out: &str, next: &str) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("0.0.0.0", PLAIN_PORT)).expect("listen");
    let mut next = (next != "-").then(|| {
        let s =
            std::net::TcpStream::connect((next, PLAIN_PORT)).expect("connect to the next relay");
        s.set_nodelay(true).expect("nodelay");
        s
    });
    println!("LISTENING");
    let (mut up, _) = listener.accept().expect("accept");
    let mut file = std::fs::File::create(out).expect("create the copy");
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = up.read(&mut buf).expect("receive");
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).expect("write the copy");
        if let Some(s) = next.as_mut() {
            s.write_all(&buf[..n]).expect("forward");
        }
    }
    println!("DONE");
}

/// `--send IMAGE NEXT`: the head of the plain chain.
fn plain_send(image: &str, next: &str) {
    let mut s =
        std::net::TcpStream::connect((next, PLAIN_PORT)).expect("connect to the first relay");
    let mut f = std::fs::File::open(image).expect("open the image");
    std::io::copy(&mut f, &mut s).expect("send");
    println!("SENT");
}

/// Seconds from the plain chain's start to its first and last copy, and the
/// machine's busy % meanwhile.
fn plain_chain(n: usize, a: &Args) -> (f64, f64, f64) {
    let lab = a.lab(n);
    let me = std::env::current_exe().expect("own path");
    // The same image a ka session gets (its secret goes unused).
    let session = session(&lab, a);
    // From the tail back, so each relay's next one already listens.
    let mut relays = Vec::new();
    for i in (1..=n).rev() {
        let next = if i == n {
            "-".to_string()
        } else {
            lab.node(i + 1).addr.to_string()
        };
        let out = lab.dir().join(format!("plain-n{i}"));
        let args = ["--relay".to_string(), out.display().to_string(), next];
        let relay = lab.spawn_program(lab.node(i), &format!("relay n{i}"), &me, &args);
        relay.wait_line("LISTENING", 0, Duration::from_secs(20), |l| {
            l == "LISTENING"
        });
        relays.push(relay);
    }
    let before = (Instant::now(), cpu_ticks());
    let args = [
        "--send".to_string(),
        session.image.display().to_string(),
        lab.node(1).addr.to_string(),
    ];
    let mut send = lab.spawn_program(lab.source(), "plain send", &me, &args);
    let started = Instant::now();
    let mut done = Vec::new();
    for r in &relays {
        let (_, line) = r.wait_line("DONE", 0, SESSION, |l| l == "DONE");
        done.push(line.at);
    }
    let after = cpu_ticks();
    assert!(send.wait_exit(SESSION).success(), "{}", send.transcript());
    let (first, last) = (
        *done.iter().min().expect("relays"),
        *done.iter().max().expect("relays"),
    );
    let busy = 100.0 * (after.0 - (before.1).0) as f64 / (after.1 - (before.1).1).max(1) as f64;
    for i in 1..=n {
        let copy = lab.dir().join(format!("plain-n{i}"));
        assert!(session.identical(&copy), "plain relay n{i}'s copy differs");
    }
    (
        first.duration_since(started).as_secs_f64(),
        last.duration_since(started).as_secs_f64(),
        busy,
    )
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("--relay") => return plain_relay(&argv[2], &argv[3]),
        Some("--send") => return plain_send(&argv[2], &argv[3]),
        _ => {}
    }
    let a = args();
    let probe = Lab::new(1, a.rate);
    let floor = probe.floor(a.size, a.rate).as_secs_f64();
    let (payload, wire) = probe.frame();
    drop(probe);
    let raw = a.size as f64 / a.rate.bytes_per_sec();
    // One 1 MiB relay buffer crossing one port: what each hop adds if a
    // node forwards only whole buffers.
    let hop = (1u64 << 20) as f64 * wire as f64 / payload as f64 / a.rate.bytes_per_sec();
    println!(
        "ka lab scale: {} MiB image, ports {} Mbit/s; floor {floor:.3} s ({payload} payload bytes per {wire}-byte frame; raw rate {raw:.3} s); load average {}",
        a.size >> 20,
        a.rate.0 / 1_000_000,
        load_average()
    );
    println!(
        "{:>3} {:>9} {:>6} {:>8} {:>5} {:>8} {:>9} {:>6} {:>6} {:>10} {:>7} {:>11} {:>15}",
        "N",
        "verified",
        "×floor",
        "first",
        "CPU%",
        "ka cores",
        "simulator",
        "×floor",
        "ka/sim",
        "floor+hops",
        "per hop",
        "lag growth",
        "load avg after"
    );
    for &n in &a.nodes {
        let sim = simulate(n, &a);
        let mut pairs = Vec::new();
        for _ in 0..a.paired.max(1) {
            let r = match run(n, &a) {
                Ok(r) => r,
                Err(failed) => {
                    println!("{n:>3} FAILED: {failed} (simulator {sim:.3}s)");
                    continue;
                }
            };
            print_row(n, &r, sim, floor, hop);
            if a.paired > 0 {
                let (first, last, busy) = plain_chain(n, &a);
                println!(
                    "{n:>3} plain relays {last:>7.3}s {:>6.3} {first:>7.3}s {busy:>4.0}%",
                    last / floor
                );
                pairs.push((r.last / floor, last / floor));
            }
        }
        if !pairs.is_empty() {
            let list = |f: fn(&(f64, f64)) -> f64| {
                pairs
                    .iter()
                    .map(|p| format!("{:.3}", f(p)))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "{n:>3} paired, ×floor: ka {} | plain relays {}",
                list(|p| p.0),
                list(|p| p.1)
            );
        }
    }
    let plain = match (&a.plain_nodes, a.paired) {
        (Some(p), _) => p.clone(),
        (None, 0) => a.nodes.iter().max().into_iter().copied().collect(),
        (None, _) => Vec::new(),
    };
    // `--plain-nodes 0`: no plain chain.
    for n in plain.into_iter().filter(|&n| n > 0) {
        let (first, last, busy) = plain_chain(n, &a);
        println!(
            "plain TCP relays, no ka, {n} nodes: last copy {last:.3}s = {:.3} x floor, first {first:.3}s = {:.3} x floor, CPU {busy:.0}%",
            last / floor,
            first / floor
        );
    }
    if a.serve_args.iter().any(|s| s == "--compress") {
        // The heal run kills a node at half the image's bytes, which a
        // packed stream never carries.
        println!("heal run skipped: the stream is packed");
        return;
    }
    match heal(&a) {
        Ok((n, dead, again)) => println!(
            "heal ({n} nodes, n{} killed at 50 %): declared dead after {dead:.3} s, its downstream receiving again after {again:.3} s",
            n / 2
        ),
        Err(failed) => println!("heal run FAILED: {failed}"),
    }
}
