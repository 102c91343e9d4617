//! The source's side of the boot-mode switch: when a node reports its copy
//! verified, flip it to local boot (`ka serve --inventory … --boot-state …`),
//! so its next reboot lands on its new disk instead of cloning again.
//!
//! The flip happens when the source receives the node's verdict, before it
//! releases the node, so a node that reboots as soon as it is released
//! already finds its new mode.

use ka_core::source::{Source, SourceEvent};

use super::inventory::Inventory;
use super::modes::{BootState, Mode};

/// Flips verified nodes of an inventory to local boot.
#[derive(Debug, Clone)]
pub struct VerifiedFlip {
    inventory: Inventory,
    state: BootState,
}

/// What happened to a node's boot mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flipped {
    /// Set to this mode.
    To(Mode),
    /// Left alone: the inventory says `after_clone = "keep"`.
    Kept,
    /// Not done, with why (a node unknown to the inventory, a state
    /// directory that cannot be written); the clone itself is unaffected.
    Failed(String),
}

impl VerifiedFlip {
    /// Flips nodes of `inventory` in the state directory of `state`.
    pub fn new(inventory: Inventory, state: BootState) -> VerifiedFlip {
        VerifiedFlip { inventory, state }
    }

    /// The node called `name` verified its copy.
    pub fn verified(&self, name: &str) -> Flipped {
        match self.state.clone_verified(&self.inventory, name) {
            Ok(Some(mode)) => Flipped::To(mode),
            Ok(None) => Flipped::Kept,
            Err(e) => Flipped::Failed(e.to_string()),
        }
    }

    /// Handles a source event: a successful `Verified` flips that node.
    /// Returns the node's name and what happened, for the log.
    pub fn on_event(&self, source: &Source, event: &SourceEvent) -> Option<(String, Flipped)> {
        let SourceEvent::Verified { node, ok: true, .. } = event else {
            return None;
        };
        let name = source.report().into_iter().find(|r| r.node == *node)?.name;
        let flipped = self.verified(&name);
        Some((name, flipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inventory() -> Inventory {
        let text = r#"
[network]
subnet = "10.0.0.0/24"
[boot]
server = "10.0.0.1"
tftp_root = "/srv/tftp"
kernel = "vmlinuz"
initramfs = "initrd"
[session]
name = "s"
source = "10.0.0.1:4000"
disk = "/dev/vda"
[[range]]
names = "n[1-3]"
mac_base = "52:54:00:00:00:01"
ip_base = "10.0.0.11"
"#;
        Inventory::parse(text, Path::new("c.toml")).unwrap()
    }

    #[test]
    fn verified_nodes_boot_local_and_strangers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory();
        let state = BootState::new(dir.path());
        state
            .set_modes(&inv, &["n[1-3]"], false, Mode::Install)
            .unwrap();
        let flip = VerifiedFlip::new(inv, state.clone());
        assert_eq!(flip.verified("n2"), Flipped::To(Mode::Local));
        let modes = state.load().unwrap();
        assert_eq!(modes.get("n2").mode, Mode::Local);
        assert_eq!(modes.get("n1").mode, Mode::Install);
        match flip.verified("laptop") {
            Flipped::Failed(why) => assert!(why.contains("laptop"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(state.load().unwrap().get("n3").mode, Mode::Install);
    }
}
