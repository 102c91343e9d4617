//! `ka console`: follow the nodes' lines at the source, live — the log
//! files `ka serve` keeps per node (`--log-dir`), so it needs no port and
//! no key: reading them is the authentication (root on the source).

use std::path::PathBuf;

use clap::Args;

use super::ExitStatus;
use crate::session::console::{follow, Watch};
use crate::session::nodelog::default_log_dir;
use crate::session::{DEFAULT_SESSION, DEFAULT_STATE_DIR};

/// Real invocations under `ka console --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # Follow node07's events and console as it installs:
  ka console node07
  # Every node's lines, each after its name:
  ka console --all --session lab1";

/// `ka console`: follow one node's lines, or every node's, at the source.
#[derive(Debug, Args)]
#[command(
    after_help = EXAMPLES,
    long_about = "Follow a node's log at the source live: its own events, its console \
lines and the source's events about it, from the last 20 lines on, until Ctrl-C or the \
session ends. Reads the files `ka serve` writes under --log-dir: whoever can read them \
(root on the source; the directory is 0750) can follow the nodes, nobody else. There is \
no remote shell: running commands on a node would need its own authenticated channel \
and a boot mode that opts into it."
)]
pub struct ConsoleArgs {
    /// The node to follow.
    #[arg(
        value_name = "NODE",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub node: Option<String>,
    /// Follow every node, each line after `NODE: ` (new nodes as they appear).
    #[arg(long)]
    pub all: bool,
    /// The session whose nodes to follow.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// Where `ka serve` keeps the node logs [default: /var/log/ka/SESSION].
    #[arg(long, value_name = "DIR", env = "KA_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// Where `ka serve` keeps its status file, which tells when the session
    /// ends.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Lines of each log shown before following.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 20)]
    pub lines: usize,
}

/// Runs `ka console`.
pub fn run(args: ConsoleArgs) -> anyhow::Result<ExitStatus> {
    crate::session::check_session_name(&args.session)?;
    let dir = args
        .log_dir
        .unwrap_or_else(|| default_log_dir(&args.session));
    if !dir.is_dir() {
        anyhow::bail!(
            "no node logs at {}: run this on the source, as root, with the session's --session (or --log-dir as given to ka serve)",
            dir.display()
        );
    }
    let watch = match args.node {
        Some(name) => Watch::Node(name),
        None => Watch::All,
    };
    // The session ends when its status file, there when we began, goes.
    let status = args.state_dir.join(format!("{}.status.json", args.session));
    let running = status.exists();
    follow(
        &dir,
        &watch,
        args.lines,
        |line| crate::outln!("{line}"),
        || running && !status.exists(),
    )?;
    Ok(ExitStatus::Success)
}
