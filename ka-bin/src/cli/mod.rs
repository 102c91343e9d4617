//! The `ka` command line: one module per subcommand. Each turns its clap
//! arguments into a validated plan (a plain struct), runs it through the
//! library ([`crate::session`], [`crate::boot`], [`crate::netboot`]), and
//! returns an [`ExitStatus`] or an error that says what to do next.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::session::reach::{Reach, DEFAULT_DISCOVER_TO};
use crate::session::{DEFAULT_SESSION, DEFAULT_STATE_DIR};

pub mod demo;
pub mod dhcp;
pub mod display;
pub mod doctor;
pub mod exit;
pub mod go;
pub mod join;
pub mod key;
pub mod netboot;
pub mod pxe;
pub mod serve;
pub mod tftp;

pub use exit::ExitStatus;

/// Where the inventory is read from unless `--inventory` says otherwise.
pub const DEFAULT_INVENTORY: &str = "/etc/ka/cluster.toml";

/// Clone one machine onto many, through a self-healing chain of TCP connections.
#[derive(Debug, Parser)]
#[command(name = "ka", version, about, after_help = exit::HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `ka`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an image to a session of nodes (the source; the original ka-d-server).
    Serve(serve::ServeArgs),
    /// Join a session and write its image to a target (a node; the original ka-d-client).
    Join(join::JoinArgs),
    /// Start a waiting session now with the nodes present (the original -g).
    Go(go::GoArgs),
    /// The keys of a session's nodes: derive one node's own key from the secret.
    Key(key::KeyArgs),
    /// Clone a generated image onto local nodes, verify every copy, print the report.
    Demo(demo::DemoArgs),
    /// Per-node boot modes: install, local, shell (the successor of ka_pxe_step).
    Pxe(pxe::PxeArgs),
    /// Serve PXE files and per-node boot configs over TFTP.
    Tftp(tftp::TftpArgs),
    /// DHCP server configuration and MAC harvesting.
    Dhcp(dhcp::DhcpArgs),
    /// The netboot image install-mode nodes boot: build it, or run inside it.
    Netboot(netboot::NetbootArgs),
    /// Check the boot server from a node's point of view: TFTP, DHCP, image, source.
    Doctor(doctor::DoctorArgs),
}

impl Command {
    /// How much the command logs unless `RUST_LOG` says otherwise: request
    /// logs are what an administrator watches `ka tftp` for; the other
    /// commands stay quiet unless something is wrong.
    pub fn log_level(&self) -> tracing::Level {
        match self {
            Command::Tftp(_) => tracing::Level::INFO,
            _ => tracing::Level::WARN,
        }
    }

    /// Runs the command.
    pub fn run(self) -> anyhow::Result<ExitStatus> {
        match self {
            Command::Serve(args) => serve::run(args),
            Command::Join(args) => join::run(args),
            Command::Go(args) => go::run(args),
            Command::Key(args) => key::run(args),
            Command::Demo(args) => demo::run(args),
            Command::Pxe(args) => pxe::run(args),
            Command::Tftp(args) => tftp::run(args),
            Command::Dhcp(args) => dhcp::run(args),
            Command::Netboot(args) => netboot::run(args),
            Command::Doctor(args) => doctor::run(args),
        }
    }
}

/// The inventory and state directory, shared by the boot subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Inventory file naming the cluster (see docs/inventory.md).
    #[arg(long, short = 'i', value_name = "FILE", default_value = DEFAULT_INVENTORY, global = true)]
    pub inventory: PathBuf,
    /// Directory where boot modes persist.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
}

/// A session, its secret, and how to reach its source: named, or found by
/// UDP broadcast (the original's way, for nodes that boot before the source).
#[derive(Debug, Clone, clap::Args)]
pub struct ReachArgs {
    /// The source, HOST or HOST:PORT; without it the source of the session is
    /// found by UDP broadcast.
    #[arg(long)]
    pub server: Option<String>,
    /// Where discovery broadcasts go when --server is not given.
    #[arg(long, default_value_t = DEFAULT_DISCOVER_TO)]
    pub discover_to: SocketAddr,
    /// Session name.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// File holding the session secret the source wrote, or (ka join) this
    /// node's own key from ka key derive or ka tftp.
    #[arg(long, visible_alias = "key-file", value_name = "FILE")]
    pub secret_file: PathBuf,
}

impl From<ReachArgs> for Reach {
    fn from(a: ReachArgs) -> Reach {
        Reach {
            server: a.server,
            discover_to: a.discover_to,
            session: a.session,
            secret_file: a.secret_file,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_shows_the_exit_status() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("some nodes failed"), "{help}");
    }
}
