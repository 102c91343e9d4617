//! Sessions as a library, with plain option structs and no command line:
//! [`serve`] an image to a session of nodes, [`join`] a session as a node,
//! [`reach`] a session's source (named, or found by broadcast) and
//! [`go`] start it, run a whole session on this machine ([`local`]), and
//! give a verified copy its node's [`identity`]. The `ka` commands
//! ([`crate::cli`]) and the netboot image's installer
//! ([`crate::netboot::install`]) both call it.
//!
//! This is where ka-bin drives ka-net's async shell: each function here
//! starts its own tokio runtime and blocks until the session is over, so
//! its callers stay synchronous.

use std::path::{Path, PathBuf};

pub mod console;
pub mod go;
pub mod identity;
pub mod join;
pub mod local;
pub mod nodelog;
pub mod reach;
pub mod secret;
pub mod serve;

/// The port ka listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4715;
/// The session name unless told otherwise.
pub const DEFAULT_SESSION: &str = "ka";
/// Where session records and boot modes are kept unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ka";

/// The longest session name.
pub const MAX_SESSION_NAME: usize = 64;

/// Whether `name` is fit to name a session or a node: letters, digits, `-`,
/// `_` and `.`. Names become file names (the generated secret, the state
/// records) and kernel arguments, so they must not reach outside a
/// directory or break a command line.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Refuses a session name that [`is_name`] refuses or that is longer than
/// [`MAX_SESSION_NAME`] (it travels in every join and is quoted in
/// refusals), the inventory's rule on the command line too.
pub fn check_session_name(session: &str) -> anyhow::Result<()> {
    if !is_name(session) || session.len() > MAX_SESSION_NAME {
        anyhow::bail!(
            "session name {:?} is not usable: use 1 to {MAX_SESSION_NAME} letters, digits, '.', '_' or '-'",
            session.chars().take(80).collect::<String>()
        );
    }
    Ok(())
}

/// The runtime a session runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A spool file in `dir` (or the temporary directory), unique to this process.
fn spool_path(dir: Option<&Path>, stem: &str) -> PathBuf {
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("{stem}-{}.spool", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_that_leave_a_directory_or_fill_a_refusal_are_refused() {
        for bad in ["", "../x", "a/b", &"s".repeat(65), "lab one"] {
            assert!(check_session_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["ka", "lab-2026.12", "rack_7"] {
            check_session_name(good).unwrap();
        }
    }
}
