//! Records the source revision `ka --version` names: the commit of the
//! checkout it was built from, or nothing when it was built outside git (a
//! source tarball, `cargo install`), so the version says so rather than the
//! build failing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let revision = git(&["rev-parse", "--short=7", "HEAD"]);
    if revision.is_some() {
        watch_head();
    }
    println!(
        "cargo:rustc-env=KA_REVISION={}",
        revision.unwrap_or_default()
    );
}

/// Asks cargo to run this again whenever HEAD moves: a checkout rewrites
/// HEAD, a commit or reset rewrites the branch's ref (or `packed-refs`),
/// and every move appends to HEAD's reflog. Only existing files are named:
/// cargo would rerun on every build for a missing one.
fn watch_head() {
    let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) else {
        return;
    };
    // A worktree keeps its HEAD in its own git dir, and its branches in the
    // repository's common one.
    let common_dir = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .map_or_else(|| git_dir.clone(), PathBuf::from);
    let mut watched = vec![
        git_dir.join("HEAD"),
        git_dir.join("logs/HEAD"),
        common_dir.join("packed-refs"),
    ];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common_dir.join(branch));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The trimmed output of `git ARGS` run in this crate's directory, or
/// `None` when git is missing, fails, or says nothing.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let output = Command::new("git")
        .args(args)
        .current_dir(Path::new(&dir))
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_string())
}
