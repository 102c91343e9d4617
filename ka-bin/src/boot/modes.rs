//! Per-node boot modes (the successor of Ka's `ka_pxe_step`).
//!
//! Modes live in one small JSON file in the state directory. Every change
//! takes an exclusive lock, re-reads the file, and replaces it atomically
//! (write a temporary file, fsync, rename, fsync the directory), so `ka pxe
//! set`, the source flipping verified nodes and the TFTP server reading modes
//! never see a half-written file, and a crash leaves the old or the new state.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::inventory::{AfterClone, Inventory, InventoryNode, SelectError};

/// What a node boots into next time it PXE-boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Boot the ka netboot image and join the clone session.
    Install,
    /// Boot the first local disk.
    Local,
    /// Boot the ka netboot image to a shell, for repairs.
    Shell,
}

impl Mode {
    /// The lowercase name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Install => "install",
            Mode::Local => "local",
            Mode::Shell => "shell",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's recorded mode and when it was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMode {
    /// The mode.
    pub mode: Mode,
    /// When it was set; `None` for a node never set, which boots the default.
    #[serde(with = "rfc3339")]
    pub since: Option<SystemTime>,
}

/// Nodes never set boot their local disk: booting an installer by accident
/// would wipe a disk, booting the disk by accident costs one reboot.
pub const DEFAULT_MODE: Mode = Mode::Local;

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    nodes: BTreeMap<String, NodeMode>,
}

/// The modes of every node, as read from the state directory.
#[derive(Debug, Default, Clone)]
pub struct Modes {
    nodes: BTreeMap<String, NodeMode>,
}

impl Modes {
    /// The mode of `node`, or the default for a node never set.
    pub fn get(&self, node: &str) -> NodeMode {
        self.nodes.get(node).copied().unwrap_or(NodeMode {
            mode: DEFAULT_MODE,
            since: None,
        })
    }
}

/// Why the boot state could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system trouble.
    #[error("boot state in {}: {what}: {source} (check --state-dir and its permissions)", dir.display())]
    Io {
        /// The state directory.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The state file is not ours or is damaged.
    #[error("{} is damaged: {reason}; fix or delete it (every node then boots its local disk)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// The node selection was wrong; nothing was changed.
    #[error("{0}; nothing was changed")]
    Select(SelectError),
}

// By hand rather than `#[from]`: that would also make the selection error
// the `source`, and `ka` would print its message twice.
impl From<SelectError> for StateError {
    fn from(e: SelectError) -> Self {
        StateError::Select(e)
    }
}

/// The boot modes of a cluster, kept in a state directory.
#[derive(Debug, Clone)]
pub struct BootState {
    dir: PathBuf,
}

const STATE_FILE: &str = "boot-modes.json";
const LOCK_FILE: &str = "boot-modes.lock";

impl BootState {
    /// Boot state kept in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> BootState {
        BootState { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            dir: self.dir.clone(),
            what,
            source,
        }
    }

    /// Reads every node's mode. A missing file means nobody set anything yet.
    pub fn load(&self) -> Result<Modes, StateError> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Modes::default()),
            Err(e) => return Err(self.io("reading the modes file")(e)),
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(Modes { nodes: file.nodes })
    }

    /// Sets `node` of `inventory` to `mode`.
    pub fn set_mode(
        &self,
        inventory: &Inventory,
        node: &str,
        mode: Mode,
    ) -> Result<(), StateError> {
        let nodes = inventory.select(&[node], false)?;
        self.set_nodes(&nodes, mode)
    }

    /// Sets the selected nodes (names, ranges, `@groups`, or `all`) to `mode`.
    /// Returns the nodes changed. An unknown name changes nothing.
    pub fn set_modes<'i, S: AsRef<str>>(
        &self,
        inventory: &'i Inventory,
        specs: &[S],
        all: bool,
        mode: Mode,
    ) -> Result<Vec<&'i InventoryNode>, StateError> {
        let nodes = inventory.select(specs, all)?;
        self.set_nodes(&nodes, mode)?;
        Ok(nodes)
    }

    /// The source calls this when `node`'s clone is verified: the node is
    /// flipped to `local` (unless the inventory says `after_clone = "keep"`),
    /// so its next reboot lands on its new disk. Returns the new mode, if any.
    pub fn clone_verified(
        &self,
        inventory: &Inventory,
        node: &str,
    ) -> Result<Option<Mode>, StateError> {
        match inventory.boot.after_clone {
            AfterClone::Local => {
                self.set_mode(inventory, node, Mode::Local)?;
                Ok(Some(Mode::Local))
            }
            AfterClone::Keep => {
                // Still reject unknown names: the caller has a bug otherwise.
                inventory.select(&[node], false)?;
                Ok(None)
            }
        }
    }

    fn set_nodes(&self, nodes: &[&InventoryNode], mode: Mode) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(self.io("creating the state directory"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))
            .map_err(self.io("opening the lock file"))?;
        // Read-modify-write under the lock: two concurrent `set`s must not
        // lose each other's changes.
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| self.io("locking the modes file")(io::Error::from(e)))?;
        let mut modes = self.load()?;
        let now = SystemTime::now();
        for n in nodes {
            let entry = modes.nodes.entry(n.name.clone()).or_insert(NodeMode {
                mode,
                since: Some(now),
            });
            // Setting the same mode again keeps "since": it answers "how
            // long has this node been waiting to install?".
            if entry.mode != mode || entry.since.is_none() {
                *entry = NodeMode {
                    mode,
                    since: Some(now),
                };
            }
        }
        let file = StateFile {
            version: 1,
            nodes: modes.nodes,
        };
        let mut text = serde_json::to_string_pretty(&file).expect("state serializes");
        text.push('\n');
        self.replace(STATE_FILE, text.as_bytes())
    }

    /// Atomically replaces `name` in the state directory with `data`.
    fn replace(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        crate::write_atomically(&self.dir.join(name), data, 0o644)
            .map_err(self.io("writing the modes file"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(after_clone: &str) -> Inventory {
        let text = format!(
            r#"
[network]
subnet = "10.0.0.0/24"
[boot]
server = "10.0.0.1"
tftp_root = "/srv/tftp"
kernel = "vmlinuz"
initramfs = "initrd"
after_clone = "{after_clone}"
[session]
name = "s"
source = "10.0.0.1:4000"
disk = "/dev/vda"
[[range]]
names = "n[1-4]"
mac_base = "52:54:00:00:00:01"
ip_base = "10.0.0.11"
groups = ["even"]
"#
        );
        Inventory::parse(&text, Path::new("c.toml")).unwrap()
    }

    #[test]
    fn unset_nodes_boot_local() {
        let dir = tempfile::tempdir().unwrap();
        let state = BootState::new(dir.path().join("state"));
        let m = state.load().unwrap().get("n1");
        assert_eq!(m.mode, Mode::Local);
        assert_eq!(m.since, None);
    }

    #[test]
    fn set_persists_and_keeps_since_when_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("local");
        let state = BootState::new(dir.path());
        let changed = state
            .set_modes(&inv, &["n[1-2]"], false, Mode::Install)
            .unwrap();
        assert_eq!(changed.len(), 2);
        let first = state.load().unwrap().get("n1");
        assert_eq!(first.mode, Mode::Install);
        assert!(first.since.is_some());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        state
            .set_modes(&inv, &["n1"], false, Mode::Install)
            .unwrap();
        assert_eq!(state.load().unwrap().get("n1"), first);
        assert_eq!(state.load().unwrap().get("n3").mode, Mode::Local);
        // A fresh handle on the same directory sees the same state.
        assert_eq!(
            BootState::new(dir.path()).load().unwrap().get("n2").mode,
            Mode::Install
        );
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn unknown_name_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("local");
        let state = BootState::new(dir.path());
        let err = state
            .set_modes(&inv, &["n1", "n9"], false, Mode::Install)
            .unwrap_err();
        assert!(err.to_string().contains("n9"), "{err}");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        assert_eq!(state.load().unwrap().get("n1").mode, Mode::Local);
    }

    #[test]
    fn verified_clone_flips_to_local() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("local");
        let state = BootState::new(dir.path());
        state
            .set_modes(&inv, &[] as &[&str], true, Mode::Install)
            .unwrap();
        assert_eq!(state.clone_verified(&inv, "n3").unwrap(), Some(Mode::Local));
        let modes = state.load().unwrap();
        assert_eq!(modes.get("n3").mode, Mode::Local);
        assert_eq!(modes.get("n2").mode, Mode::Install);
        assert!(state.clone_verified(&inv, "ghost").is_err());
    }

    #[test]
    fn verified_clone_keeps_mode_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("keep");
        let state = BootState::new(dir.path());
        state.set_mode(&inv, "n1", Mode::Install).unwrap();
        assert_eq!(state.clone_verified(&inv, "n1").unwrap(), None);
        assert_eq!(state.load().unwrap().get("n1").mode, Mode::Install);
    }

    #[test]
    fn damaged_state_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = BootState::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains("fix or delete it"), "{err}");
    }

    #[test]
    fn concurrent_setters_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("local");
        let threads: Vec<_> = ["n1", "n2", "n3", "n4"]
            .into_iter()
            .map(|name| {
                let (inv, dir) = (inv.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        BootState::new(&dir)
                            .set_mode(&inv, name, Mode::Shell)
                            .unwrap();
                        BootState::new(&dir)
                            .set_mode(&inv, name, Mode::Install)
                            .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let modes = BootState::new(dir.path()).load().unwrap();
        for n in ["n1", "n2", "n3", "n4"] {
            assert_eq!(modes.get(n).mode, Mode::Install, "{n}");
        }
    }
}
