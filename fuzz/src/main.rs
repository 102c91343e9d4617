//! One AFL++ harness for every target of `ka_tests::fuzz`, named by the
//! environment variable `KA_FUZZ_TARGET` (AFL++ owns the command line).
//! With `KA_FUZZ_SEEDS=DIR` it writes the target's seeds there instead,
//! for AFL++'s input folder. `scripts/fuzz` builds and runs it.

fn main() {
    let name = std::env::var("KA_FUZZ_TARGET").unwrap_or_else(|_| {
        eprintln!("set KA_FUZZ_TARGET to one of the targets of ka_tests::fuzz::TARGETS");
        std::process::exit(2);
    });
    let target = ka_tests::fuzz::target(&name).unwrap_or_else(|| {
        eprintln!("no fuzz target {name}");
        std::process::exit(2);
    });
    if let Some(dir) = std::env::var_os("KA_FUZZ_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        for (i, seed) in (target.seeds)().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("writing a seed");
        }
        return;
    }
    afl::fuzz!(|data: &[u8]| (target.run)(data));
}
