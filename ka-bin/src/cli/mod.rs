//! One module per `ka` subcommand group; each has an argument struct (clap
//! derive) and a `run` function returning an error that tells the user what
//! to do next.

use std::path::PathBuf;

pub mod dhcp;
pub mod display;
pub mod netboot;
pub mod pxe;
pub mod serve;
pub mod tftp;

/// Where the inventory is read from unless `--inventory` says otherwise.
pub const DEFAULT_INVENTORY: &str = "/etc/ka/cluster.toml";
/// Where boot modes are kept unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ka";

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
