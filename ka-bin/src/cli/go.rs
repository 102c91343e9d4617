//! `ka go`: start a waiting session now with the nodes present (the
//! original -g).

use anyhow::bail;

use super::{ExitStatus, ReachArgs};
use crate::session::go;

/// `ka go`: start a waiting session now with the nodes present (the original -g).
#[derive(Debug, clap::Args)]
pub struct GoArgs {
    /// The session and how to reach its source.
    #[command(flatten)]
    pub reach: ReachArgs,
}

/// Runs `ka go`.
pub fn run(args: GoArgs) -> anyhow::Result<ExitStatus> {
    let started = go::start(&args.reach.into())?;
    if started.now {
        crate::outln!("started with {} nodes", started.nodes);
    } else if started.nodes == 0 {
        bail!("no node has joined yet: nothing to start");
    } else {
        crate::outln!("already running with {} nodes", started.nodes);
    }
    Ok(ExitStatus::Success)
}
