//! Real faults on real processes in the network-namespace lab
//! (`ka_tests::lab`): nodes killed, frozen, cut off, slowed or restarted
//! while a chain streams, and the source itself killed and restarted.
//!
//! Every test ends with the same checks (`Session::check`): each survivor's
//! copy is byte-identical to the image and verified, and each failure is
//! named, with its reason, in the source's final report. Images are small
//! and ports slow (100 Mbit/s), so the stream lasts a few seconds and the
//! moment of a fault, taken from the source's JSON progress, is where the
//! test wants it.
//!
//! Needs root (CI runs as root); the lab panics with the reason otherwise.
//! Labs run one at a time (the lab holds a process-wide lock).

use std::time::{Duration, Instant};

use ka_tests::lab::{Lab, Rate, Session};

/// Every port of the lab.
const RATE: Rate = Rate::mbit(100);
/// The bound on any session of these tests.
const SESSION: Duration = Duration::from_secs(90);
/// The bound on any one wait for progress or an event.
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// Starts a session of `size` bytes on every node of `lab`.
fn start<'l>(
    lab: &'l Lab,
    size: u64,
    serve: &[&str],
    join: &[&str],
) -> (Session<'l>, ka_tests::lab::Serve, Vec<ka_tests::lab::Join>) {
    let s = lab.session(size);
    let serve = s.serve(lab.nodes().len(), serve);
    // The source listens before any node looks for it.
    serve.proc.wait_line("that it listens", 0, WAIT, |_| true);
    let joins = s.join_all(join);
    (s, serve, joins)
}

/// Kills the middle node of an 8-node chain once it has `percent` % of a
/// 64 MiB image.
fn kill_mid_chain_at(percent: u64) {
    let t0 = Instant::now();
    let lab = Lab::new(8, RATE);
    let size = 64 * MIB;
    let (s, serve, joins) = start(&lab, size, &[], &[]);
    let (_, had) = serve.wait_received("n4", size * percent / 100, WAIT);
    let killed = joins[3].proc.kill9();
    let fin = serve.finish(SESSION);
    let dead = fin.event("Dead", "n4").expect("n4 declared dead");
    let line = fin.report.node("n4");
    let started = fin.first("Started").at;
    let verified: Vec<f64> = fin
        .all("Verified")
        .iter()
        .map(|e| (e.at - started).as_secs_f64())
        .collect();
    eprintln!(
        "started at {:?} after t0, kill at {:?} after start, verified at {verified:?}",
        started - t0,
        killed - started
    );
    eprintln!(
        "killed n4 at {:.0} % ({} bytes reported), detected after {:?}, session {:?}, test {:?}",
        had as f64 * 100.0 / size as f64,
        line.bytes,
        dead.at - killed,
        fin.ended - killed,
        t0.elapsed()
    );
    let at = line.bytes as f64 / size as f64 * 100.0;
    assert!(
        (percent as f64 - 10.0..percent as f64 + 10.0).contains(&at),
        "n4 died at {at:.0} %, not about {percent} %"
    );
    s.check(&fin, joins, &[("n4", "connection lost")]);
}

#[test]
fn a_middle_node_killed_at_10_percent() {
    kill_mid_chain_at(10);
}

#[test]
fn a_middle_node_killed_at_50_percent() {
    kill_mid_chain_at(50);
}

#[test]
fn a_middle_node_killed_at_90_percent() {
    kill_mid_chain_at(90);
}
