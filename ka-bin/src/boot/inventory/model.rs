//! The inventory as ka uses it: the cluster network, the boot server, the
//! clone session and the nodes, with lookups by name, MAC, IP and group.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use serde::Deserialize;

use crate::boot::hostlist;
use crate::boot::mac::Mac;
use crate::netboot::cmdline::CloneKind;

/// The cluster network the nodes boot on: DHCP configs need its subnet.
#[derive(Debug, Clone)]
pub struct Network {
    /// The network address (host bits zero).
    pub address: Ipv4Addr,
    /// Prefix length, e.g. 24.
    pub prefix: u8,
    /// Default route handed to nodes, if any.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers handed to nodes.
    pub dns: Vec<Ipv4Addr>,
    /// DNS domain handed to nodes.
    pub domain: Option<String>,
}

impl Network {
    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// The broadcast address of the subnet.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !mask(self.prefix))
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.address)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// The netmask of a `/prefix` as a number.
pub(super) fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// How a pxelinux config boots the local disk.
///
/// `LOCALBOOT 0` hangs or loops under some BIOSes, so the default chains to
/// the first disk's boot sector with `chain.c32 hd0` (which needs `chain.c32`,
/// `libcom32.c32` and `libutil.c32` in the TFTP root). `exit` uses
/// `LOCALBOOT -1`, which hands control back to the firmware to try its next
/// boot device: no extra modules, but it relies on a sane boot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalBoot {
    /// `COM32 chain.c32` with `APPEND hd0`.
    Chain,
    /// `LOCALBOOT -1`: return to the firmware.
    Exit,
}

/// What happens to a node's boot mode once its clone is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterClone {
    /// Flip it to `local`, so its next reboot lands on the new disk.
    Local,
    /// Leave the mode alone (the administrator flips it with `ka pxe set`).
    Keep,
}

/// What the boot server hands out.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Address of the TFTP server (DHCP `next-server`).
    pub server: Ipv4Addr,
    /// Directory served over TFTP (resolved against the inventory's directory).
    pub tftp_root: PathBuf,
    /// The ka netboot kernel, relative to the TFTP root.
    pub kernel: String,
    /// The ka netboot initramfs, relative to the TFTP root.
    pub initramfs: String,
    /// `console=` value for the netboot kernel (`None`: no console argument).
    pub console: Option<String>,
    /// Kernel arguments every node gets.
    pub kernel_args: String,
    /// How pxelinux boots the local disk.
    pub local_boot: LocalBoot,
    /// Boot file for BIOS PXE clients.
    pub bios_boot_file: String,
    /// Boot file for UEFI x86-64 PXE clients (an iPXE build).
    pub uefi_boot_file: String,
    /// iPXE script that clients running iPXE are sent to.
    pub ipxe_script: String,
    /// What to do when a node's clone is verified.
    pub after_clone: AfterClone,
}

/// The clone session nodes join when they boot in install mode.
#[derive(Debug, Clone)]
pub struct Session {
    /// Session name (`ka.session=`).
    pub name: String,
    /// Address and port of the source (`ka.server=`).
    pub source: SocketAddrV4,
    /// What the source serves: an image, or a whole machine (`ka serve
    /// --system`), which nodes rebuild onto their disks (`ka.clone=`).
    pub clone: CloneKind,
}

/// One machine of the cluster, as the inventory names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryNode {
    /// Unique name, e.g. `node001`.
    pub name: String,
    /// The MAC address it PXE-boots from.
    pub mac: Mac,
    /// Its fixed IPv4 address.
    pub ip: Ipv4Addr,
    /// The disk the image is written to (`ka.target=`).
    pub disk: String,
    /// Extra kernel arguments for this node.
    pub kernel_args: String,
    /// Groups it belongs to (selected as `@group`).
    pub groups: Vec<String>,
    /// Line of the inventory that defines it.
    pub line: usize,
}

/// A loaded and validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The cluster network.
    pub network: Network,
    /// Boot server settings.
    pub boot: Boot,
    /// The clone session.
    pub session: Session,
    /// The nodes, in file order (ranges expanded in place).
    pub nodes: Vec<InventoryNode>,
    /// Each group's members, as indices into `nodes` in order.
    pub(super) groups: BTreeMap<String, Vec<usize>>,
    /// Indices into `nodes` by name, MAC and IP.
    pub(super) by_name: HashMap<String, usize>,
    pub(super) by_mac: HashMap<Mac, usize>,
    pub(super) by_ip: HashMap<Ipv4Addr, usize>,
}

/// Why a node selection (names, ranges, `@groups`) failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// Some names are not in the inventory.
    #[error("not in inventory {inventory}: {}; run `ka pxe show` to list the nodes", unknown.join(", "))]
    Unknown {
        /// The inventory file.
        inventory: String,
        /// The names or groups that matched nothing.
        unknown: Vec<String>,
    },
    /// A range is malformed.
    #[error("{0}")]
    BadPattern(String),
    /// Nothing was selected.
    #[error("no nodes selected: name some (node001, node[001-004], @group) or pass --all")]
    Empty,
}

impl Inventory {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&InventoryNode> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }

    /// The node with this MAC address.
    pub fn node_by_mac(&self, mac: &Mac) -> Option<&InventoryNode> {
        self.by_mac.get(mac).map(|&i| &self.nodes[i])
    }

    /// The node with this IPv4 address.
    pub fn node_by_ip(&self, ip: Ipv4Addr) -> Option<&InventoryNode> {
        self.by_ip.get(&ip).map(|&i| &self.nodes[i])
    }

    /// Group names, sorted.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// Resolves a command line's node selection: names, ranges such as
    /// `node[001-004]`, groups such as `@rack1`, or every node with `all`.
    /// Returns the nodes in inventory order, each once. Any unknown name fails
    /// the whole selection, so a typo never half-applies a change.
    pub fn select<T: AsRef<str>>(
        &self,
        specs: &[T],
        all: bool,
    ) -> Result<Vec<&InventoryNode>, SelectError> {
        let mut chosen = vec![false; self.nodes.len()];
        let mut unknown = Vec::new();
        if all {
            chosen.iter_mut().for_each(|c| *c = true);
        }
        for spec in specs {
            let spec = spec.as_ref().trim();
            if let Some(group) = spec.strip_prefix('@') {
                match self.groups.get(group) {
                    Some(members) => members.iter().for_each(|&i| chosen[i] = true),
                    None => unknown.push(spec.to_string()),
                }
                continue;
            }
            for name in hostlist::expand(spec).map_err(SelectError::BadPattern)? {
                match self.by_name.get(&name) {
                    Some(&i) => chosen[i] = true,
                    None => unknown.push(name),
                }
            }
        }
        if !unknown.is_empty() {
            return Err(SelectError::Unknown {
                inventory: self.path.display().to_string(),
                unknown,
            });
        }
        let out: Vec<&InventoryNode> = self
            .nodes
            .iter()
            .zip(chosen)
            .filter_map(|(n, c)| c.then_some(n))
            .collect();
        if out.is_empty() {
            return Err(SelectError::Empty);
        }
        Ok(out)
    }
}
