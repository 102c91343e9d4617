//! One module per `ka` subcommand group; each has an argument struct (clap
//! derive) and a `run` function returning an error that tells the user what
//! to do next.

use std::path::PathBuf;

pub mod clone;
pub mod dhcp;
pub mod display;
pub mod netboot;
pub mod pxe;
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

/// Writes `data` to `path` atomically (temporary file, fsync, rename), so a
/// daemon reading the file never sees half of it.
pub fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
