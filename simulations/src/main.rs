//! `simulations`: run a seeded many-node scenario of the ka protocol and print
//! what happened, the checkers' verdict and the numbers.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ka_core::config::SlowPolicy;
use simulations::faults::{parse_late, Fault};
use simulations::{Faults, SimConfig};

/// Simulate a ka session with many nodes, deterministically from a seed.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Number of nodes.
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    /// Image size (bytes; suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "64MiB", value_parser = ka_core::units::parse_size)]
    size: u64,
    /// Seed for every random choice (random if omitted; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to inject.
    #[arg(long, value_enum, default_value_t = FaultMode::None)]
    faults: FaultMode,
    /// One fault of a fixed schedule (repeatable), instead of a swarm:
    /// KIND:NODE@SECONDS[:ARG], e.g. crash:4@1.0, hang:3@1.0:1.5,
    /// cut:3@1.0:0.5, slow:2@0.5:4, restart:2@1.0:0.3, disk:1@2.0,
    /// source@2.0:0.8. Nodes count from 0, in chain order.
    #[arg(long, value_parser = |s: &str| s.parse::<Fault>())]
    fault: Vec<Fault>,
    /// A node that starts late, in a fixed schedule (repeatable):
    /// NODE@SECONDS, e.g. 5@0.3.
    #[arg(long, value_parser = parse_late)]
    late: Vec<(usize, std::time::Duration)>,
    /// Every node keeps only this many bytes of the stream to serve its
    /// downstreams from, as a node unpacking the stream as it arrives does
    /// (suffixes as for --size); default: every node serves from what it wrote.
    #[arg(long, value_parser = ka_core::units::parse_size)]
    window: Option<u64>,
    /// Children per node (1: a chain).
    #[arg(long, default_value_t = 1)]
    arity: u32,
    /// Port rate in Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    rate_mbit: f64,
    /// One-way hop latency in microseconds.
    #[arg(long, default_value_t = 50)]
    latency_us: u64,
    /// Link MTU in bytes: image data moves at the port rate times the
    /// payload share of a full TCP segment's frame (1448/1514 at 1500).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(68..=65535))]
    mtu: u32,
    /// The longest a node holds received bytes before forwarding them, in
    /// microseconds (the real node's FORWARD_DELAY is 2 ms); each hop of data
    /// costs the latency plus twice a piece's time.
    #[arg(long, default_value_t = ka_core::config::FORWARD_DELAY.as_micros() as u64)]
    forward_delay_us: u64,
    /// A piece goes before that once it holds a millisecond of the link or
    /// this many bytes, whichever is more (the real node's: 16384); 0 with
    /// --forward-after-us 0: pieces go only at their deadline.
    #[arg(long, default_value_t = ka_core::config::FORWARD_BYTES_MIN)]
    forward_bytes_min: u64,
    /// The link time a piece holds before it may go early, in microseconds
    /// (the real node's FORWARD_AFTER is 1 ms).
    #[arg(long, default_value_t = ka_core::config::FORWARD_AFTER.as_micros() as u64)]
    forward_after_us: u64,
    /// The most each message from the source is held back, in microseconds,
    /// drawn per message (a busy source writing many connections); 0: none,
    /// or with --faults swarm, a seeded draw (half the seeds) up to 3000.
    #[arg(long, default_value_t = 0)]
    control_jitter_us: u64,
    /// What to do with a node that stays too slow.
    #[arg(long, value_enum, default_value_t = Policy::Tail)]
    slow_policy: Policy,
    /// Print one line per notable event.
    #[arg(long)]
    trace: bool,
    /// Run twice and check both runs have the same trace hash.
    #[arg(long)]
    check_determinism: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FaultMode {
    None,
    Swarm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    Keep,
    Tail,
    Drop,
}

/// A seed when none is given: derived from the address of a stack value and
/// the process id, so the simulator itself reads no clock.
fn fresh_seed() -> u64 {
    let probe = 0u8;
    let addr = &probe as *const u8 as u64;
    (addr ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(fresh_seed);
    let mut cfg = SimConfig::new(cli.nodes, cli.size, seed);
    cfg.faults = match cli.faults {
        FaultMode::None => Faults::None,
        FaultMode::Swarm => Faults::Swarm,
    };
    if !cli.fault.is_empty() || !cli.late.is_empty() {
        if matches!(cli.faults, FaultMode::Swarm) {
            eprintln!(
                "error: --fault and --late make a schedule of their own: leave out --faults swarm"
            );
            return ExitCode::from(2);
        }
        let beyond = cli
            .fault
            .iter()
            .map(|f| f.node)
            .chain(cli.late.iter().map(|l| l.0))
            .find(|&n| n >= cli.nodes);
        if let Some(n) = beyond {
            eprintln!(
                "error: node {n} is not among the {} nodes (they count from 0): give a smaller index or more --nodes",
                cli.nodes
            );
            return ExitCode::from(2);
        }
        let mut faults = cli.fault.clone();
        faults.sort_by_key(|f| f.at);
        cfg.faults = Faults::Schedule(faults, cli.late.clone());
    }
    cfg.arity = cli.arity;
    cfg.rate = cli.rate_mbit * 1e6 / 8.0;
    cfg.latency = std::time::Duration::from_micros(cli.latency_us);
    cfg.mtu = cli.mtu;
    cfg.forward_delay = std::time::Duration::from_micros(cli.forward_delay_us);
    cfg.forward_after = std::time::Duration::from_micros(cli.forward_after_us);
    cfg.forward_bytes_min = cli.forward_bytes_min;
    cfg.control_jitter = std::time::Duration::from_micros(cli.control_jitter_us);
    cfg.slow_policy = match cli.slow_policy {
        Policy::Keep => SlowPolicy::Keep,
        Policy::Tail => SlowPolicy::MoveToTail,
        Policy::Drop => SlowPolicy::Drop,
    };
    cfg.trace = cli.trace;
    cfg.window = cli.window;
    if let Some(w) = cli.window {
        let least = cfg.min_window();
        if w < least {
            eprintln!(
                "error: a --window of {w} bytes is less than four data hops of the stream at these rates: give at least {least}"
            );
            return ExitCode::from(2);
        }
    }
    println!(
        "options: --nodes {} --size {} --seed {seed} --faults {:?} --arity {} --rate-mbit {} --latency-us {} --mtu {} --forward-delay-us {} --forward-after-us {} --forward-bytes-min {} --control-jitter-us {}",
        cli.nodes,
        cli.size,
        cli.faults,
        cli.arity,
        cli.rate_mbit,
        cli.latency_us,
        cli.mtu,
        cli.forward_delay_us,
        cli.forward_after_us,
        cli.forward_bytes_min,
        cli.control_jitter_us
    );
    if let Some(w) = cli.window {
        println!("window: every node serves its downstreams from its last {w} bytes only");
    }
    let (payload, wire) = cfg.frame();
    println!(
        "link: {payload} payload bytes per {wire}-byte frame, {:.3} MB/s of image per port; a data hop costs {:.3} ms",
        cfg.payload_rate() / 1e6,
        cfg.data_hop().as_secs_f64() * 1e3
    );
    let sim = simulations::world::Sim::new(cfg.clone());
    let swarm = sim.swarm().clone();
    if !swarm.faults.is_empty() || !swarm.late.is_empty() {
        let kinds: Vec<&str> = swarm.kinds.iter().map(|k| k.name()).collect();
        if matches!(cfg.faults, Faults::Schedule(..)) {
            println!("schedule:");
        } else {
            println!("swarm: kinds {kinds:?}");
        }
        for f in &swarm.faults {
            println!("  fault {f}");
        }
        for (n, d) in &swarm.late {
            println!("  late join node{n} at {:.3}s", d.as_secs_f64());
        }
    }
    let out = sim.run();
    let mut ok = out.verdict.is_ok();
    if cli.check_determinism {
        let mut again = cfg.clone();
        again.trace = false;
        let second = simulations::run(again);
        let same = second.trace_hash == out.trace_hash;
        println!(
            "determinism: {} (trace hashes {:016x} and {:016x})",
            if same { "same" } else { "DIFFERENT" },
            out.trace_hash,
            second.trace_hash
        );
        ok &= same;
    }
    for f in &out.failures {
        println!("  KO {f}");
    }
    println!(
        "control jitter {:.3} ms: {} data connection(s) held until the upstream's placement arrived, {} refused",
        out.control_jitter.as_secs_f64() * 1e3,
        out.early_downstreams,
        out.upstream_refusals
    );
    if cfg.window.is_some() {
        println!(
            "windows: {} data connection(s) dropped by an upstream whose window passed them, {} node(s) stranded and taken in by the source, which fed up to {} at once",
            out.window_drops, out.stranded, out.source_children_max
        );
    }
    if !out.verified_at.is_empty() {
        let at = |q: f64| {
            out.verified_at[((out.verified_at.len() - 1) as f64 * q) as usize].as_secs_f64()
        };
        println!(
            "nodes verified at: p50 {:.3}s p90 {:.3}s max {:.3}s",
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
    let ratio = out.completion.as_secs_f64() / cfg.pipeline_bound().as_secs_f64();
    println!(
        "summary: nodes OK {} KO {} | simulated completion {:.3}s | pipeline bound {:.3}s (ratio {:.4}) | allowed {:.3}s ({}) | events {} | verdict {} | trace hash {:016x}",
        out.ok,
        out.ko,
        out.completion.as_secs_f64(),
        cfg.pipeline_bound().as_secs_f64(),
        ratio,
        out.bound.as_secs_f64(),
        out.bound_kind,
        out.events,
        match &out.verdict {
            Ok(()) => "PASS".to_string(),
            Err(e) => format!("FAIL: {e}"),
        },
        out.trace_hash
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
