//! Model-based property test of the source and node machines: random
//! cluster shapes, random joins (on time or late), crashes, hangs, cuts,
//! restarts, slow ports and disk errors at random times, run through the
//! simulator, whose checkers must all hold after every event and at the end.

use core::time::Duration;

use ka_core::config::SlowPolicy;
use proptest::prelude::*;
use simulations::faults::{Fault, FaultKind};
use simulations::{run, Faults, SimConfig};

fn fault_kind() -> impl Strategy<Value = FaultKind> {
    prop_oneof![
        Just(FaultKind::Crash),
        (50u64..2500).prop_map(|ms| FaultKind::Hang(Duration::from_millis(ms))),
        (50u64..2500).prop_map(|ms| FaultKind::Cut(Duration::from_millis(ms))),
        (2u32..8).prop_map(FaultKind::Slow),
        (10u64..1500).prop_map(|ms| FaultKind::Restart(Duration::from_millis(ms))),
        (10u64..1500).prop_map(|ms| FaultKind::SourceRestart(Duration::from_millis(ms))),
        Just(FaultKind::DiskError),
    ]
}

fn scenario() -> impl Strategy<Value = SimConfig> {
    (
        2usize..12,
        1u32..4,
        16u64..1024,
        any::<u64>(),
        0usize..5,
        0usize..3,
        any::<bool>(),
    )
        .prop_flat_map(|(nodes, arity, kib, seed, nfaults, nlate, drop)| {
            let faults = proptest::collection::vec((0u64..1500, 0..nodes, fault_kind()), nfaults);
            let late = proptest::collection::vec((0..nodes, 1u64..800), nlate);
            (faults, late).prop_map(move |(faults, late)| {
                let mut cfg = SimConfig::new(nodes, kib * 1024, seed);
                cfg.arity = arity;
                // 10 Mbit/s ports: a run lasts long enough for faults to land mid-stream.
                cfg.rate = 10e6 / 8.0;
                cfg.latency = Duration::from_micros(200);
                cfg.slow_policy = if drop {
                    SlowPolicy::Drop
                } else {
                    SlowPolicy::MoveToTail
                };
                let mut faults: Vec<Fault> = faults
                    .into_iter()
                    .map(|(ms, node, kind)| Fault {
                        at: Duration::from_millis(ms),
                        node,
                        kind,
                    })
                    .collect();
                faults.sort_by_key(|f| f.at);
                let mut late_nodes: Vec<(usize, Duration)> = Vec::new();
                for (n, ms) in late {
                    if !late_nodes.iter().any(|&(m, _)| m == n) {
                        late_nodes.push((n, Duration::from_millis(ms)));
                    }
                }
                cfg.faults = Faults::Schedule(faults, late_nodes);
                cfg
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_checker_holds_under_random_faults(cfg in scenario()) {
        let out = run(cfg.clone());
        prop_assert!(out.verdict.is_ok(), "{:?}\nfaults: {:?}\nlate: {:?}", out.verdict, out.swarm.faults, out.swarm.late);
        // Every failure is named with a reason.
        prop_assert_eq!(out.failures.len(), out.ko);
        prop_assert!(out.failures.iter().all(|f| !f.ends_with(": ")));
    }
}

#[test]
fn same_seed_same_trace() {
    let mut cfg = SimConfig::new(40, 64 << 20, 7);
    cfg.faults = Faults::Swarm;
    let a = run(cfg.clone());
    let b = run(cfg);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.events, b.events);
}

#[test]
fn different_seeds_differ() {
    let mut a = SimConfig::new(40, 64 << 20, 7);
    a.faults = Faults::Swarm;
    let mut b = a.clone();
    b.seed = 8;
    assert_ne!(run(a).trace_hash, run(b).trace_hash);
}

#[test]
fn fault_free_chain_meets_the_pipeline_bound() {
    let cfg = SimConfig::new(200, 256 << 20, 1);
    let bound = cfg.pipeline_bound();
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 200);
    let ratio = out.completion.as_secs_f64() / bound.as_secs_f64();
    assert!(
        ratio < 1.05,
        "completion {:?} vs bound {bound:?}",
        out.completion
    );
}

#[test]
fn middle_node_crash_is_healed_and_named() {
    let mut cfg = SimConfig::new(8, 256 << 20, 3);
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(1000),
            node: 4,
            kind: FaultKind::Crash,
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!((out.ok, out.ko), (7, 1));
    assert!(
        out.failures[0].starts_with("node00004: control connection lost"),
        "{:?}",
        out.failures
    );
}

#[test]
fn frozen_node_is_declared_dead_then_rejoins_and_finishes() {
    let mut cfg = SimConfig::new(6, 512 << 20, 4);
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(500),
            node: 2,
            kind: FaultKind::Hang(Duration::from_millis(1500)),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 6, "{:?}", out.failures);
}

#[test]
fn short_cut_is_not_a_death() {
    let mut cfg = SimConfig::new(6, 256 << 20, 5);
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(500),
            node: 3,
            kind: FaultKind::Cut(Duration::from_millis(600)),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 6, "{:?}", out.failures);
}

#[test]
fn restarted_node_catches_up_and_finishes() {
    let mut cfg = SimConfig::new(5, 512 << 20, 6);
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(1500),
            node: 1,
            kind: FaultKind::Restart(Duration::from_millis(300)),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 5, "{:?}", out.failures);
    // 1.5 s into a 4.3 s stream, the last durable record was at most a
    // second old: the restarted process started from there and received
    // only the rest.
    let (from, received) = out.resumed[1];
    assert!(from >= 64 << 20, "resumed from {from}");
    assert!(received <= (512 << 20) - from + (1 << 20), "{received}");
}

#[test]
fn restarted_source_lets_every_node_finish_without_starting_over() {
    let mut cfg = SimConfig::new(8, 512 << 20, 11);
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(2000),
            node: 0,
            kind: FaultKind::SourceRestart(Duration::from_millis(800)),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 8, "{:?}", out.failures);
    // Nobody received a byte twice: the nodes went on from where they were.
    for (i, &(from, received)) in out.resumed.iter().enumerate() {
        assert_eq!(from, 0, "node{i} never restarted");
        assert!(received <= (512 << 20) + (1 << 20), "node{i}: {received}");
    }
}

#[test]
fn source_restart_after_some_nodes_finished_still_accounts_for_them() {
    // A tree finishes its leaves first; the source dies while the rest drain.
    let mut cfg = SimConfig::new(12, 64 << 20, 12);
    cfg.arity = 3;
    let bound = cfg.pipeline_bound();
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: bound.mul_f64(1.02),
            node: 0,
            kind: FaultKind::SourceRestart(Duration::from_millis(300)),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert_eq!(out.ok, 12, "{:?}", out.failures);
}

#[test]
fn slow_head_of_a_tree_is_detected_against_its_sibling() {
    // The two children of the source share its port: 62.5 MB/s each. The
    // slowed one gets 15.6 MB/s, falls 250 MB (the simulator's slow lag)
    // behind its sibling after 5.3 s and keeps falling further for 2 s; the
    // sibling takes 17 s for the image.
    let mut cfg = SimConfig::new(6, 1 << 30, 13);
    cfg.arity = 2;
    cfg.faults = Faults::Schedule(
        vec![Fault {
            at: Duration::from_millis(100),
            node: 0,
            kind: FaultKind::Slow(8),
        }],
        vec![],
    );
    let out = run(cfg);
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    assert!(out.slow >= 1, "the slow source child was never judged slow");
}
