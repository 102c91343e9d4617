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

pub mod go;
pub mod identity;
pub mod join;
pub mod local;
pub mod reach;
pub mod secret;
pub mod serve;

/// The port ka listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4715;
/// The session name unless told otherwise.
pub const DEFAULT_SESSION: &str = "ka";
/// Where session records and boot modes are kept unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ka";

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
