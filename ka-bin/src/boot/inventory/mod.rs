//! The inventory: one TOML file naming the cluster (see `docs/inventory.md`).
//!
//! Loading validates everything at once — addresses, duplicates, ranges,
//! group members — and every problem points at the file, line and field, so a
//! typo in node 97 of 128 is found before a node boots the wrong config.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::hostlist;
use super::mac::Mac;

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

fn mask(prefix: u8) -> u32 {
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
}

/// One machine of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
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
    pub nodes: Vec<Node>,
    groups: BTreeMap<String, Vec<usize>>,
    by_name: HashMap<String, usize>,
    by_mac: HashMap<Mac, usize>,
    by_ip: HashMap<Ipv4Addr, usize>,
}

/// One problem found in an inventory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field concerned, e.g. `node.mac` (empty for syntax errors).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
    /// The text of the offending line.
    pub source_line: String,
}

/// Why an inventory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read inventory {}: {source} (pass the right file with --inventory FILE)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid inventory.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Everything wrong with it, in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let field = if p.field.is_empty() {
            String::new()
        } else {
            format!("{}: ", p.field)
        };
        out.push_str(&format!(
            "{}:{}:{}: {field}{}\n  {:>4} | {}",
            path.display(),
            p.line,
            p.column,
            p.message,
            p.line,
            p.source_line
        ));
    }
    out
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

// ---- the file as written -------------------------------------------------

type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    network: Spanned<RawNetwork>,
    boot: Spanned<RawBoot>,
    session: Spanned<RawSession>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
    #[serde(default)]
    range: Vec<Spanned<RawRange>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<Vec<S>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    subnet: S,
    netmask: Option<S>,
    gateway: Option<S>,
    #[serde(default)]
    dns: Vec<S>,
    domain: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    server: S,
    tftp_root: S,
    kernel: S,
    initramfs: S,
    console: Option<String>,
    kernel_args: Option<S>,
    local_boot: Option<LocalBoot>,
    bios_boot_file: Option<S>,
    uefi_boot_file: Option<S>,
    ipxe_script: Option<S>,
    after_clone: Option<AfterClone>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    name: S,
    source: S,
    disk: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: S,
    mac: S,
    ip: S,
    disk: Option<S>,
    kernel_args: Option<S>,
    #[serde(default)]
    groups: Vec<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    names: S,
    mac_base: Option<S>,
    macs: Option<Spanned<Vec<S>>>,
    ip_base: Option<S>,
    ips: Option<Spanned<Vec<S>>>,
    disk: Option<S>,
    kernel_args: Option<S>,
    #[serde(default)]
    groups: Vec<S>,
}

// ---- validation ----------------------------------------------------------

/// Collects problems against the source text, so one run reports them all.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        let source_line = self.text.lines().nth(line - 1).unwrap_or("").to_string();
        self.problems.push(Problem {
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            source_line,
        });
    }

    fn ipv4(&mut self, s: &S, field: &str) -> Option<Ipv4Addr> {
        match s.get_ref().trim().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.report(
                    s.span(),
                    field,
                    format!(
                        "`{}` is not an IPv4 address like 192.168.10.11",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn mac(&mut self, s: &S, field: &str) -> Option<Mac> {
        match s.get_ref().trim().parse::<Mac>() {
            Ok(mac) if mac.is_multicast() || mac.0 == [0; 6] => {
                self.report(
                    s.span(),
                    field,
                    format!(
                        "{mac} is a multicast or zero address, never a NIC's own; check for a typo"
                    ),
                );
                None
            }
            Ok(mac) => Some(mac),
            Err(e) => {
                self.report(s.span(), field, e.to_string());
                None
            }
        }
    }

    /// A path inside the TFTP root: relative, no `..`.
    fn tftp_path(&mut self, s: &S, field: &str) -> String {
        let p = s.get_ref().trim();
        let ok = !p.is_empty()
            && Path::new(p)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !ok {
            self.report(
                s.span(),
                field,
                format!("`{p}` must be a path relative to boot.tftp_root, without `..`"),
            );
        }
        p.to_string()
    }

    fn word(&mut self, s: &S, field: &str, what: &str) -> String {
        let w = s.get_ref().trim();
        let ok = !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            self.report(
                s.span(),
                field,
                format!("`{w}` is not a valid {what}: use letters, digits, `-`, `_` and `.`"),
            );
        }
        w.to_string()
    }

    fn args(&mut self, s: &Option<S>, field: &str) -> String {
        match s {
            Some(s) if s.get_ref().contains(['\n', '\r']) => {
                self.report(s.span(), field, "kernel arguments must fit on one line");
                String::new()
            }
            Some(s) => s.get_ref().split_whitespace().collect::<Vec<_>>().join(" "),
            None => String::new(),
        }
    }

    fn disk(&mut self, s: &S, field: &str) -> String {
        let d = s.get_ref().trim();
        if !d.starts_with('/') || d.contains(char::is_whitespace) {
            self.report(
                s.span(),
                field,
                format!("`{d}` is not a device path like /dev/sda"),
            );
        }
        d.to_string()
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A node definition before duplicates are checked, with where it came from.
struct Draft {
    node: Node,
    name_span: Range<usize>,
    mac_span: Range<usize>,
    ip_span: Range<usize>,
}

impl Inventory {
    /// Reads and validates the inventory at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Inventory, InventoryError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates inventory `text`; `path` names it in errors and anchors a
    /// relative `tftp_root`.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory, InventoryError> {
        let mut ck = Checker {
            text,
            problems: Vec::new(),
        };
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                ck.report(span, "", e.message().trim_end().to_string());
                return Err(InventoryError::Invalid {
                    path: path.to_path_buf(),
                    problems: ck.problems,
                });
            }
        };
        let inv = build(&mut ck, raw, path);
        if ck.problems.is_empty() {
            Ok(inv)
        } else {
            ck.problems.sort_by_key(|p| (p.line, p.column));
            Err(InventoryError::Invalid {
                path: path.to_path_buf(),
                problems: ck.problems,
            })
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }

    /// The node with this MAC address.
    pub fn node_by_mac(&self, mac: &Mac) -> Option<&Node> {
        self.by_mac.get(mac).map(|&i| &self.nodes[i])
    }

    /// The node with this IPv4 address.
    pub fn node_by_ip(&self, ip: Ipv4Addr) -> Option<&Node> {
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
    pub fn select<T: AsRef<str>>(&self, specs: &[T], all: bool) -> Result<Vec<&Node>, SelectError> {
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
        let out: Vec<&Node> = self
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

fn build(ck: &mut Checker<'_>, raw: RawFile, path: &Path) -> Inventory {
    let network = build_network(ck, raw.network.get_ref());
    let boot = build_boot(ck, raw.boot.get_ref(), path);
    let rs = raw.session.get_ref();
    let session_name = ck.word(&rs.name, "session.name", "session name");
    let source = match rs.source.get_ref().trim().parse::<SocketAddrV4>() {
        Ok(a) => a,
        Err(_) => {
            ck.report(
                rs.source.span(),
                "session.source",
                format!(
                    "`{}` is not an IPv4 address with a port, like 192.168.10.1:4000",
                    rs.source.get_ref()
                ),
            );
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
        }
    };
    let default_disk = rs.disk.as_ref().map(|d| ck.disk(d, "session.disk"));

    // Nodes and ranges, merged in file order so "first seen" errors read naturally.
    enum Entry<'r> {
        Node(&'r Spanned<RawNode>),
        Range(&'r Spanned<RawRange>),
    }
    let mut entries: Vec<(usize, Entry<'_>)> = raw
        .node
        .iter()
        .map(|n| (n.span().start, Entry::Node(n)))
        .chain(raw.range.iter().map(|r| (r.span().start, Entry::Range(r))))
        .collect();
    entries.sort_by_key(|(start, _)| *start);

    let mut drafts = Vec::new();
    for (_, entry) in entries {
        match entry {
            Entry::Node(n) => {
                if let Some(d) = build_node(ck, n, default_disk.as_deref(), &network) {
                    drafts.push(d);
                }
            }
            Entry::Range(r) => drafts.extend(build_range(ck, r, default_disk.as_deref(), &network)),
        }
    }

    // Uniqueness, reported at the second use with a pointer to the first.
    let mut by_name = HashMap::new();
    let mut by_mac = HashMap::new();
    let mut by_ip = HashMap::new();
    let mut nodes = Vec::new();
    for d in drafts {
        let i = nodes.len();
        let mut dup = false;
        if let Some(&j) = by_name.get(&d.node.name) {
            let first: &Node = &nodes[j];
            ck.report(
                d.name_span.clone(),
                "node.name",
                format!(
                    "node `{}` is already defined at line {}",
                    d.node.name, first.line
                ),
            );
            dup = true;
        }
        if let Some(&j) = by_mac.get(&d.node.mac) {
            let first: &Node = &nodes[j];
            ck.report(
                d.mac_span.clone(),
                "node.mac",
                format!(
                    "MAC {} of `{}` is already used by `{}` (line {})",
                    d.node.mac, d.node.name, first.name, first.line
                ),
            );
            dup = true;
        }
        if let Some(&j) = by_ip.get(&d.node.ip) {
            let first: &Node = &nodes[j];
            ck.report(
                d.ip_span.clone(),
                "node.ip",
                format!(
                    "IP {} of `{}` is already used by `{}` (line {})",
                    d.node.ip, d.node.name, first.name, first.line
                ),
            );
            dup = true;
        }
        let clashes = |ip: Ipv4Addr, what: &str| {
            (d.node.ip == ip).then(|| format!("IP {ip} of `{}` is the {what}", d.node.name))
        };
        let clash = clashes(boot.server, "boot server's address")
            .or_else(|| network.gateway.and_then(|g| clashes(g, "gateway")));
        if let Some(msg) = clash {
            ck.report(d.ip_span.clone(), "node.ip", msg);
            dup = true;
        }
        if dup {
            continue;
        }
        by_name.insert(d.node.name.clone(), i);
        by_mac.insert(d.node.mac, i);
        by_ip.insert(d.node.ip, i);
        nodes.push(d.node);
    }

    // Groups: from each node's `groups`, then from the [groups] table, whose
    // members must all exist.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for g in &n.groups {
            groups.entry(g.clone()).or_default().push(i);
        }
    }
    for (group, members) in &raw.groups {
        let group_s = Spanned::new(members.span(), group.clone());
        let group_name = ck.word(&group_s, "groups", "group name");
        for m in members.get_ref() {
            let names = match hostlist::expand(m.get_ref().trim()) {
                Ok(names) => names,
                Err(e) => {
                    ck.report(m.span(), "groups", e);
                    continue;
                }
            };
            let missing: Vec<&str> = names
                .iter()
                .filter(|n| !by_name.contains_key(*n))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                ck.report(
                    m.span(),
                    "groups",
                    format!(
                        "group `{group_name}` names unknown nodes: {}; define them with [[node]] or [[range]]",
                        missing.join(", ")
                    ),
                );
                continue;
            }
            for name in names {
                let i = by_name[&name];
                let list = groups.entry(group_name.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
                if !nodes[i].groups.contains(&group_name) {
                    nodes[i].groups.push(group_name.clone());
                }
            }
        }
    }
    for list in groups.values_mut() {
        list.sort_unstable();
    }

    Inventory {
        path: path.to_path_buf(),
        network,
        boot,
        session: Session {
            name: session_name,
            source,
        },
        nodes,
        groups,
        by_name,
        by_mac,
        by_ip,
    }
}

fn build_network(ck: &mut Checker<'_>, rn: &RawNetwork) -> Network {
    let subnet = rn.subnet.get_ref().trim();
    let (addr_s, prefix) = match (subnet.split_once('/'), &rn.netmask) {
        (Some((a, p)), None) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)),
        (None, Some(m)) => {
            let prefix = m.get_ref().trim().parse::<Ipv4Addr>().ok().and_then(|m| {
                let m = u32::from(m);
                // A netmask is ones then zeros.
                (m.leading_ones() + m.trailing_zeros() == 32).then(|| m.leading_ones() as u8)
            });
            if prefix.is_none() {
                ck.report(
                    m.span(),
                    "network.netmask",
                    format!("`{}` is not a netmask like 255.255.255.0", m.get_ref()),
                );
            }
            (subnet, prefix.or(Some(24)))
        }
        (Some(_), Some(m)) => {
            ck.report(
                m.span(),
                "network.netmask",
                "give the prefix in `subnet` (192.168.10.0/24) or a `netmask`, not both",
            );
            (subnet.split('/').next().unwrap_or(subnet), Some(24))
        }
        (None, None) => (subnet, None),
    };
    let address = addr_s.parse::<Ipv4Addr>().ok();
    let (address, prefix) = match (address, prefix) {
        (Some(a), Some(p)) => (a, p),
        _ => {
            ck.report(
                rn.subnet.span(),
                "network.subnet",
                format!("`{subnet}` is not a subnet like 192.168.10.0/24"),
            );
            (Ipv4Addr::UNSPECIFIED, 0)
        }
    };
    let aligned = Ipv4Addr::from(u32::from(address) & mask(prefix));
    if aligned != address {
        ck.report(
            rn.subnet.span(),
            "network.subnet",
            format!("`{subnet}` has host bits set; did you mean {aligned}/{prefix}?"),
        );
    }
    let network = Network {
        address: aligned,
        prefix,
        gateway: None,
        dns: Vec::new(),
        domain: None,
    };
    let gateway = rn.gateway.as_ref().and_then(|g| {
        let ip = ck.ipv4(g, "network.gateway")?;
        if !network.contains(ip) {
            ck.report(
                g.span(),
                "network.gateway",
                format!("gateway {ip} is outside the subnet {network}"),
            );
        }
        Some(ip)
    });
    let dns = rn
        .dns
        .iter()
        .filter_map(|d| ck.ipv4(d, "network.dns"))
        .collect();
    let domain = rn
        .domain
        .as_ref()
        .map(|d| ck.word(d, "network.domain", "DNS domain"));
    Network {
        gateway,
        dns,
        domain,
        ..network
    }
}

fn build_boot(ck: &mut Checker<'_>, rb: &RawBoot, path: &Path) -> Boot {
    let server = ck
        .ipv4(&rb.server, "boot.server")
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let root = PathBuf::from(rb.tftp_root.get_ref().trim());
    // A relative root is relative to the inventory, so a cluster directory can
    // be moved around (and the docs example works from anywhere).
    let tftp_root = if root.is_absolute() {
        root
    } else {
        path.parent().unwrap_or(Path::new(".")).join(root)
    };
    let tftp_file = |ck: &mut Checker<'_>, s: &Option<S>, field: &str, default: &str| match s {
        Some(s) => ck.tftp_path(s, field),
        None => default.to_string(),
    };
    let bios_boot_file = tftp_file(ck, &rb.bios_boot_file, "boot.bios_boot_file", "pxelinux.0");
    let uefi_boot_file = tftp_file(ck, &rb.uefi_boot_file, "boot.uefi_boot_file", "ipxe.efi");
    let ipxe_script = tftp_file(ck, &rb.ipxe_script, "boot.ipxe_script", "boot.ipxe");
    Boot {
        server,
        tftp_root,
        kernel: ck.tftp_path(&rb.kernel, "boot.kernel"),
        initramfs: ck.tftp_path(&rb.initramfs, "boot.initramfs"),
        console: match rb.console.as_deref().map(str::trim) {
            None => Some("ttyS0".to_string()),
            Some("") => None,
            Some(c) => Some(c.to_string()),
        },
        kernel_args: ck.args(&rb.kernel_args, "boot.kernel_args"),
        local_boot: rb.local_boot.unwrap_or(LocalBoot::Chain),
        bios_boot_file,
        uefi_boot_file,
        ipxe_script,
        after_clone: rb.after_clone.unwrap_or(AfterClone::Local),
    }
}

fn check_ip_in(
    ck: &mut Checker<'_>,
    ip: Ipv4Addr,
    span: Range<usize>,
    field: &str,
    net: &Network,
) -> bool {
    if !net.contains(ip) {
        ck.report(span, field, format!("{ip} is outside the subnet {net}"));
        false
    } else if net.prefix < 31 && (ip == net.address || ip == net.broadcast()) {
        ck.report(
            span,
            field,
            format!("{ip} is the network or broadcast address of {net}"),
        );
        false
    } else {
        true
    }
}

fn groups_of(ck: &mut Checker<'_>, groups: &[S], field: &str) -> Vec<String> {
    groups
        .iter()
        .map(|g| ck.word(g, field, "group name"))
        .collect()
}

fn build_node(
    ck: &mut Checker<'_>,
    n: &Spanned<RawNode>,
    default_disk: Option<&str>,
    net: &Network,
) -> Option<Draft> {
    let rn = n.get_ref();
    let before = ck.problems.len();
    let name = ck.word(&rn.name, "node.name", "node name");
    let mac = ck.mac(&rn.mac, "node.mac");
    let ip = ck.ipv4(&rn.ip, "node.ip");
    if let Some(ip) = ip {
        check_ip_in(ck, ip, rn.ip.span(), "node.ip", net);
    }
    let disk = match (&rn.disk, default_disk) {
        (Some(d), _) => ck.disk(d, "node.disk"),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            ck.report(
                rn.name.span(),
                "node.disk",
                format!("node `{name}` has no disk: set `disk` here or a default in [session]"),
            );
            String::new()
        }
    };
    let kernel_args = ck.args(&rn.kernel_args, "node.kernel_args");
    let groups = groups_of(ck, &rn.groups, "node.groups");
    if ck.problems.len() > before {
        return None;
    }
    Some(Draft {
        node: Node {
            name,
            mac: mac?,
            ip: ip?,
            disk,
            kernel_args,
            groups,
            line: line_col(ck.text, n.span().start).0,
        },
        name_span: rn.name.span(),
        mac_span: rn.mac.span(),
        ip_span: rn.ip.span(),
    })
}

fn build_range(
    ck: &mut Checker<'_>,
    r: &Spanned<RawRange>,
    default_disk: Option<&str>,
    net: &Network,
) -> Vec<Draft> {
    let rr = r.get_ref();
    let before = ck.problems.len();
    let names = match hostlist::expand(rr.names.get_ref().trim()) {
        Ok(names) => names,
        Err(e) => {
            ck.report(rr.names.span(), "range.names", e);
            return Vec::new();
        }
    };
    for name in &names {
        ck.word(
            &Spanned::new(rr.names.span(), name.clone()),
            "range.names",
            "node name",
        );
    }
    let count = names.len();

    // MACs: a base that counts up, or one per name.
    let macs: Vec<(Mac, Range<usize>)> = match (&rr.mac_base, &rr.macs) {
        (Some(base), None) => match ck.mac(base, "range.mac_base") {
            Some(b) => match b.offset(count as u64 - 1) {
                Some(_) => (0..count)
                    .map(|i| (b.offset(i as u64).expect("checked above"), base.span()))
                    .collect(),
                None => {
                    ck.report(
                        base.span(),
                        "range.mac_base",
                        "the range runs past ff:ff:ff:ff:ff:ff",
                    );
                    Vec::new()
                }
            },
            None => Vec::new(),
        },
        (None, Some(list)) => {
            if list.get_ref().len() != count {
                ck.report(
                    list.span(),
                    "range.macs",
                    format!(
                        "{} MACs for {count} names; give exactly one per name",
                        list.get_ref().len()
                    ),
                );
            }
            list.get_ref()
                .iter()
                .filter_map(|m| ck.mac(m, "range.macs").map(|mac| (mac, m.span())))
                .collect()
        }
        _ => {
            ck.report(
                rr.names.span(),
                "range",
                "give either `mac_base` (consecutive MACs) or `macs` (one per name)",
            );
            Vec::new()
        }
    };
    let ips: Vec<(Ipv4Addr, Range<usize>)> = match (&rr.ip_base, &rr.ips) {
        (Some(base), None) => match ck.ipv4(base, "range.ip_base") {
            Some(b) => {
                let mut out = Vec::new();
                for i in 0..count as u32 {
                    let Some(ip) = u32::from(b).checked_add(i).map(Ipv4Addr::from) else {
                        break;
                    };
                    if !check_ip_in(ck, ip, base.span(), "range.ip_base", net) {
                        break;
                    }
                    out.push((ip, base.span()));
                }
                out
            }
            None => Vec::new(),
        },
        (None, Some(list)) => {
            if list.get_ref().len() != count {
                ck.report(
                    list.span(),
                    "range.ips",
                    format!(
                        "{} IPs for {count} names; give exactly one per name",
                        list.get_ref().len()
                    ),
                );
            }
            let mut out = Vec::new();
            for s in list.get_ref() {
                if let Some(ip) = ck.ipv4(s, "range.ips") {
                    if check_ip_in(ck, ip, s.span(), "range.ips", net) {
                        out.push((ip, s.span()));
                    }
                }
            }
            out
        }
        _ => {
            ck.report(
                rr.names.span(),
                "range",
                "give either `ip_base` (consecutive IPs) or `ips` (one per name)",
            );
            Vec::new()
        }
    };
    let disk = match (&rr.disk, default_disk) {
        (Some(d), _) => ck.disk(d, "range.disk"),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            ck.report(
                rr.names.span(),
                "range.disk",
                "this range has no disk: set `disk` here or a default in [session]",
            );
            String::new()
        }
    };
    let kernel_args = ck.args(&rr.kernel_args, "range.kernel_args");
    let groups = groups_of(ck, &rr.groups, "range.groups");
    if ck.problems.len() > before {
        return Vec::new();
    }
    let line = line_col(ck.text, r.span().start).0;
    names
        .into_iter()
        .zip(macs)
        .zip(ips)
        .map(|((name, (mac, mac_span)), (ip, ip_span))| Draft {
            node: Node {
                name,
                mac,
                ip,
                disk: disk.clone(),
                kernel_args: kernel_args.clone(),
                groups: groups.clone(),
                line,
            },
            name_span: rr.names.span(),
            mac_span,
            ip_span,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = r#"
[network]
subnet = "192.168.10.0/24"
gateway = "192.168.10.1"

[boot]
server = "192.168.10.1"
tftp_root = "/srv/tftp"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"

[session]
name = "lab"
source = "192.168.10.1:4000"
disk = "/dev/vda"
"#;

    fn parse(body: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(&format!("{HEAD}{body}"), Path::new("/etc/ka/cluster.toml"))
    }

    fn problems(body: &str) -> Vec<Problem> {
        match parse(body) {
            Err(InventoryError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// Line of `needle` in the full text, to check error positions.
    fn line_of(body: &str, needle: &str) -> usize {
        let text = format!("{HEAD}{body}");
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn nodes_and_ranges_expand_in_file_order() {
        let inv = parse(
            r#"
[[node]]
name = "head"
mac = "52:54:00:00:00:01"
ip = "192.168.10.10"
disk = "/dev/sda"
kernel_args = "  quiet   splash "
groups = ["infra"]

[[range]]
names = "node[001-003]"
mac_base = "52:54:00:00:00:fe"
ip_base = "192.168.10.11"
groups = ["rack1"]

[[range]]
names = "gpu[1-2]"
macs = ["52:54:00:01:00:01", "52-54-00-01-00-09"]
ips = ["192.168.10.50", "192.168.10.60"]

[groups]
rack1 = ["gpu1"]
"#,
        )
        .unwrap();
        let names: Vec<&str> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["head", "node001", "node002", "node003", "gpu1", "gpu2"]
        );
        let n3 = inv.node("node003").unwrap();
        assert_eq!(n3.mac.to_string(), "52:54:00:00:01:00");
        assert_eq!(n3.ip, Ipv4Addr::new(192, 168, 10, 13));
        assert_eq!(n3.disk, "/dev/vda");
        assert_eq!(inv.node("head").unwrap().kernel_args, "quiet splash");
        assert_eq!(
            inv.node("gpu2").unwrap().mac.to_string(),
            "52:54:00:01:00:09"
        );
        let rack1: Vec<&str> = inv
            .select(&["@rack1"], false)
            .unwrap()
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(rack1, ["node001", "node002", "node003", "gpu1"]);
        assert_eq!(inv.network.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(inv.boot.console.as_deref(), Some("ttyS0"));
        assert_eq!(inv.boot.local_boot, LocalBoot::Chain);
        let mac: Mac = "52:54:00:00:00:fe".parse().unwrap();
        assert_eq!(inv.node_by_mac(&mac).unwrap().name, "node001");
        assert_eq!(
            inv.node_by_ip(Ipv4Addr::new(192, 168, 10, 60))
                .unwrap()
                .name,
            "gpu2"
        );
    }

    #[test]
    fn duplicate_mac_points_at_second_use_and_names_the_first() {
        let body = r#"
[[node]]
name = "a"
mac = "52:54:00:00:00:01"
ip = "192.168.10.10"

[[node]]
name = "b"
mac = "52:54:00:00:00:01" # again
ip = "192.168.10.11"
"#;
        let p = problems(body);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].line, line_of(body, "# again"));
        assert_eq!(p[0].field, "node.mac");
        assert!(
            p[0].message.contains("already used by `a`"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn duplicate_ip_across_a_range_is_found() {
        let body = r#"
[[node]]
name = "a"
mac = "52:54:00:00:00:01"
ip = "192.168.10.12"

[[range]]
names = "n[1-4]"
mac_base = "52:54:00:00:01:00"
ip_base = "192.168.10.10"
"#;
        let p = problems(body);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message
                .contains("192.168.10.12 of `n3` is already used by `a`"),
            "{p:?}"
        );
        assert_eq!(p[0].line, line_of(body, "ip_base"));
    }

    #[test]
    fn bad_values_are_all_reported_with_lines() {
        let body = r#"
[[node]]
name = "x y"
mac = "52:54:00:00:00"
ip = "192.168.11.5"

[[node]]
name = "m"
mac = "01:00:5e:00:00:01"
ip = "192.168.10.255"
"#;
        let p = problems(body);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["node.name", "node.mac", "node.ip", "node.mac", "node.ip"],
            "{p:?}"
        );
        assert_eq!(p[1].line, line_of(body, "52:54:00:00:00\""));
        assert!(p[2].message.contains("outside the subnet"));
        assert!(p[3].message.contains("multicast"));
        assert!(p[4].message.contains("broadcast"));
    }

    #[test]
    fn syntax_and_unknown_fields_have_lines() {
        let body = "\n[[node]]\nname = \"a\"\nmac = \"52:54:00:00:00:01\"\nip = \"192.168.10.10\"\ncolour = \"red\"\n";
        let p = problems(body);
        assert_eq!(p[0].line, line_of(body, "colour"), "{p:?}");
        assert!(p[0].message.contains("colour"), "{p:?}");
        let p = problems("\n[[node]\n");
        assert_eq!(p[0].line, line_of("\n[[node]\n", "[[node]"), "{p:?}");
    }

    #[test]
    fn error_display_names_file_line_and_field() {
        let err =
            parse("\n[[node]]\nname = \"a\"\nmac = \"zz\"\nip = \"192.168.10.10\"\n").unwrap_err();
        let text = err.to_string();
        let line = line_of("\n[[node]]\nname = \"a\"\nmac = \"zz\"\n", "mac = \"zz\"");
        assert!(
            text.starts_with(&format!("/etc/ka/cluster.toml:{line}:7: node.mac:")),
            "{text}"
        );
        assert!(text.contains("| mac = \"zz\""), "{text}");
    }

    #[test]
    fn group_with_unknown_member_fails() {
        let body = "\n[[node]]\nname = \"a\"\nmac = \"52:54:00:00:00:01\"\nip = \"192.168.10.10\"\n\n[groups]\nr = [\"a\", \"b[1-2]\"]\n";
        let p = problems(body);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("unknown nodes: b1, b2"), "{p:?}");
        assert_eq!(p[0].line, line_of(body, "r = ["));
    }

    #[test]
    fn range_list_lengths_must_match() {
        let p = problems("\n[[range]]\nnames = \"n[1-3]\"\nmacs = [\"52:54:00:00:00:01\"]\nip_base = \"192.168.10.20\"\n");
        assert!(p[0].message.contains("1 MACs for 3 names"), "{p:?}");
    }

    #[test]
    fn subnet_with_host_bits_suggests_the_network() {
        let text = HEAD.replace("192.168.10.0/24", "192.168.10.7/24");
        let err = Inventory::parse(&text, Path::new("c.toml")).unwrap_err();
        assert!(
            err.to_string().contains("did you mean 192.168.10.0/24"),
            "{err}"
        );
    }

    #[test]
    fn select_rejects_unknown_names_and_empty_selection() {
        let inv = parse("\n[[range]]\nnames = \"n[1-3]\"\nmac_base = \"52:54:00:00:00:01\"\nip_base = \"192.168.10.20\"\n").unwrap();
        let err = inv.select(&["n1", "n9", "@nope"], false).unwrap_err();
        assert_eq!(
            err,
            SelectError::Unknown {
                inventory: "/etc/ka/cluster.toml".into(),
                unknown: vec!["n9".into(), "@nope".into()],
            }
        );
        assert_eq!(
            inv.select::<&str>(&[], false).unwrap_err(),
            SelectError::Empty
        );
        assert_eq!(inv.select::<&str>(&[], true).unwrap().len(), 3);
        let two: Vec<&str> = inv
            .select(&["n[3-3]", "n1", "n3"], false)
            .unwrap()
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(two, ["n1", "n3"]);
    }
}
