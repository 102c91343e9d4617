//! Every decoder that reads outside bytes, fed garbage: random bytes, and
//! valid inputs mutated (bytes flipped, cut short, spliced, numbers set to
//! their largest), under proptest. None may panic. Each case found by a
//! fuzzer is replayed first, from `tests/fuzz/regressions/TARGET/`.
//!
//! The case count per target is `KA_FUZZ_CASES` (default 2,000: a few
//! seconds for all targets); with `KA_FUZZ_SECONDS_PER_TARGET`, rounds of
//! that many cases, each from a fresh seed, go on until the time is up
//! (`scripts/fuzz` uses it when no coverage-guided fuzzer is installed).
//! A failure prints the seed of its round.

use std::path::Path;
use std::time::{Duration, Instant};

use ka_tests::fuzz::{Target, TARGETS};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// How many random inputs each target gets.
fn cases() -> u32 {
    std::env::var("KA_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// One edit of a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR the byte at (index mod len) with a value.
    Flip(usize, u8),
    /// Cut the input at (index mod len).
    Truncate(usize),
    /// Put these bytes in at (index mod len).
    Insert(usize, Vec<u8>),
    /// Set 8 bytes from (index mod len) to 0xff: a length or offset at
    /// its largest, little- or big-endian.
    Max(usize),
    /// Append the input to itself, from (index mod len).
    Repeat(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Max),
        any::<usize>().prop_map(Mutation::Repeat),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
    for m in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match m {
            Mutation::Flip(i, x) => {
                let n = data.len();
                if n > 0 {
                    data[at(*i, n)] ^= x;
                }
            }
            Mutation::Truncate(i) => data.truncate(at(*i, data.len())),
            Mutation::Insert(i, b) => {
                let p = at(*i, data.len() + 1);
                data.splice(p..p, b.iter().copied());
            }
            Mutation::Max(i) => {
                let p = at(*i, data.len());
                for b in data.iter_mut().skip(p).take(8) {
                    *b = 0xff;
                }
            }
            Mutation::Repeat(i) => {
                let tail = data[at(*i, data.len())..].to_vec();
                data.extend(tail);
            }
        }
    }
    data
}

/// Replays every saved crash of `target`.
fn replay_regressions(target: &Target) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target.name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries {
        let path = e.expect("a regression file").path();
        let data = std::fs::read(&path).expect("a readable regression file");
        eprintln!("{}: replaying {}", target.name, path.display());
        (target.run)(&data);
        n += 1;
    }
    n
}

fn fuzz(target: &Target) {
    replay_regressions(target);
    let seeds = (target.seeds)();
    assert!(!seeds.is_empty(), "{} has no seeds", target.name);
    for seed in &seeds {
        (target.run)(seed);
    }
    let budget = std::env::var("KA_FUZZ_SECONDS_PER_TARGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let mut round = 0u64;
    loop {
        // Round 0 is the same in every run; later rounds draw a fresh seed.
        let seed = if round == 0 {
            0
        } else {
            u64::from(std::process::id()) ^ started.elapsed().as_nanos() as u64 ^ round << 40
        };
        fuzz_round(target, &seeds, seed);
        round += 1;
        if budget.is_none_or(|b| started.elapsed() >= b) {
            break;
        }
    }
    eprintln!(
        "{}: {round} round(s) of {} cases in {:.1} s",
        target.name,
        cases(),
        started.elapsed().as_secs_f64()
    );
}

/// One round: `cases()` random inputs and as many mutated seeds, drawn
/// from `seed`.
fn fuzz_round(target: &Target, seeds: &[Vec<u8>], seed: u64) {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let rng = |salt: u64| {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&salt.to_le_bytes());
        TestRng::from_seed(RngAlgorithm::ChaCha, &key)
    };
    let mut runner = TestRunner::new_with_rng(config.clone(), rng(1));
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..4096), |data| {
            (target.run)(&data);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{} on random bytes (round seed {seed}): {e}", target.name));
    let mut runner = TestRunner::new_with_rng(config, rng(2));
    let n = seeds.len();
    runner
        .run(
            &(0..n, prop::collection::vec(mutation(), 1..6)),
            |(which, edits)| {
                (target.run)(&apply(seeds[which].clone(), &edits));
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{} on a mutated seed (round seed {seed}): {e}", target.name));
}

#[test]
fn every_decoder_has_a_target() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    for want in [
        "wire_codec",
        "record_header",
        "tftp_packet",
        "inventory",
        "kernel_cmdline",
        "dhcp_leases",
        "system_stream",
        "system_plan",
        "layout_file",
    ] {
        assert!(names.contains(&want), "no fuzz target {want}");
    }
}

macro_rules! fuzz_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            fuzz(ka_tests::fuzz::target(stringify!($name)).expect("a target"));
        }
    )*};
}

fuzz_tests!(
    wire_codec,
    record_header,
    tftp_packet,
    inventory,
    kernel_cmdline,
    dhcp_leases,
    system_stream,
    system_plan,
    layout_file
);
