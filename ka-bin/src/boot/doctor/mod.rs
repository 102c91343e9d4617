//! `ka doctor`: the boot server checked from a node's point of view.
//!
//! A PXE failure shows only as a node hung at its console, so every step a
//! node takes is tried here for real, before any node is powered on: the
//! inventory loads and names this machine as the source; `ka tftp` holds
//! the TFTP port and serves every file an install-mode node fetches (boot
//! loaders, modules, kernel, initramfs, its own config, and its key only
//! to its own address); the DHCP configuration gives each node its address,
//! the TFTP server and the right boot file per kind of client; the netboot
//! image carries this ka's version; and a running `ka serve` proves the
//! session key.
//!
//! Each check ends as a [`Check`]: passed, failed with what to change, or
//! not run with why. Only failures make `ka doctor` fail.

pub mod dhcp_read;
pub mod port_owner;
pub mod probe;
pub mod tftp_client;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use ka_core::codec::{Message, PROTOCOL_VERSION};

use self::dhcp_read::ClientKind;
use self::tftp_client::FetchError;
use super::inventory::{Inventory, InventoryNode, LocalBoot};
use super::keys;
use super::modes::{BootState, Mode, Modes};
use super::render;
use crate::netboot::version::{self, KaVersion};

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// What a node needs is there.
    Passed,
    /// A node would fail here; the hint says what to change.
    Failed,
    /// The check could not run (or has nothing to check); the text says
    /// why. It fails nothing.
    NotRun,
}

impl Outcome {
    /// The mark `ka doctor` prints before the check.
    pub fn mark(self) -> &'static str {
        match self {
            Outcome::Passed => "✓",
            Outcome::Failed => "✗",
            Outcome::NotRun => "?",
        }
    }
}

/// One checked thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// How it ended.
    pub outcome: Outcome,
    /// What was checked, and what was found.
    pub text: String,
    /// On failure: what to change (the file, the setting, the command).
    pub hint: Option<String>,
}

impl Check {
    fn passed(text: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::Passed,
            text: text.into(),
            hint: None,
        }
    }

    fn failed(text: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::Failed,
            text: text.into(),
            hint: Some(hint.into()),
        }
    }

    fn not_run(text: impl Into<String>) -> Check {
        Check {
            outcome: Outcome::NotRun,
            text: text.into(),
            hint: None,
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.outcome.mark(), self.text)?;
        if let Some(hint) = &self.hint {
            write!(f, " — {hint}")?;
        }
        Ok(())
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// The inventory (`-i`).
    pub inventory: PathBuf,
    /// Where boot modes persist (`ka tftp --state-dir`).
    pub state_dir: PathBuf,
    /// The TFTP server to fetch from; `None`: the inventory's
    /// `boot.server`, port 69.
    pub tftp: Option<SocketAddr>,
    /// A DHCP server's configuration to check; `None`: what `ka dhcp
    /// config` generates.
    pub dhcp_config: Option<PathBuf>,
    /// The session secret, to check that the running source proves it.
    pub secret_file: Option<PathBuf>,
    /// The interface on the boot network to send a real DHCPDISCOVER from
    /// (as a node, with its MAC); `None`: no probe.
    pub probe: Option<String>,
}

/// Runs every check, calling `report` with each as it ends (a slow fetch
/// should not hide the lines before it), and returns them all.
pub fn run(opts: &DoctorOptions, mut report: impl FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut note = |c: Check| {
        report(&c);
        checks.push(c);
    };
    let inv = match Inventory::load(&opts.inventory) {
        Ok(inv) => {
            note(Check::passed(format!(
                "inventory {} loads: {} nodes",
                inv.path.display(),
                inv.nodes.len()
            )));
            inv
        }
        Err(e) => {
            note(Check::failed(
                format!("inventory {} does not load", opts.inventory.display()),
                e.to_string(),
            ));
            return checks;
        }
    };
    check_session(&inv).into_iter().for_each(&mut note);
    let modes = match BootState::new(&opts.state_dir).load() {
        Ok(m) => m,
        Err(e) => {
            note(Check::failed(
                format!("boot modes in {} cannot be read", opts.state_dir.display()),
                format!("{e} (pass ka tftp's --state-dir)"),
            ));
            Modes::default()
        }
    };
    let tftp = opts
        .tftp
        .unwrap_or_else(|| SocketAddr::from((inv.boot.server, 69)));
    check_tftp_port(&inv, tftp).into_iter().for_each(&mut note);
    check_tftp_files(&inv, &modes, tftp)
        .into_iter()
        .for_each(&mut note);
    check_dhcp(&inv, opts.dhcp_config.as_deref())
        .into_iter()
        .for_each(&mut note);
    if let Some(iface) = &opts.probe {
        check_probe(&inv, &modes, iface)
            .into_iter()
            .for_each(&mut note);
    }
    note(check_image_version(&inv));
    check_source(&inv, opts.secret_file.as_deref())
        .into_iter()
        .for_each(&mut note);
    checks
}

/// Whether any check failed: `ka doctor`'s exit status.
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.outcome == Outcome::Failed)
}

/// The inventory's `[session]`, which `ka serve -i` and every node's
/// `ka.server=` use: its address must be one of this machine's.
fn check_session(inv: &Inventory) -> Vec<Check> {
    let s = &inv.session;
    let source = *s.source.ip();
    let what = format!(
        "session {:?}, source {} ([session] of {}: what ka serve -i and the nodes' ka.server= use)",
        s.name,
        s.source,
        inv.path.display()
    );
    // Binding succeeds only for an address this machine has.
    match UdpSocket::bind((source, 0)) {
        Ok(_) => vec![Check::passed(format!("{what}; {source} is this machine's"))],
        Err(e) => vec![Check::failed(
            format!("{what}; {source} is not an address of this machine ({e})"),
            format!(
                "set [session] source in {} to this machine's address on the boot network, or run ka doctor (and ka serve) on {source}",
                inv.path.display()
            ),
        )],
    }
}

/// Who holds the TFTP port: `ka tftp`, and with `--secret-file`.
fn check_tftp_port(inv: &Inventory, tftp: SocketAddr) -> Vec<Check> {
    let port = tftp.port();
    if UdpSocket::bind((tftp.ip(), 0)).is_err() {
        return vec![Check::not_run(format!(
            "who holds UDP port {port}: the TFTP server {} is another machine (run ka doctor there to tell)",
            tftp.ip()
        ))];
    }
    let found = match port_owner::udp_port_use(tftp.ip(), port) {
        Ok(f) => f,
        Err(e) => {
            return vec![Check::not_run(format!(
                "who holds UDP port {port}: /proc/net/udp cannot be read ({e})"
            ))]
        }
    };
    let start = format!(
        "ka tftp -i {} --state-dir DIR --secret-file SECRET",
        inv.path.display()
    );
    if found.sockets == 0 {
        return vec![Check::failed(
            format!(
                "nothing on this machine listens on UDP port {port} for {}",
                tftp.ip()
            ),
            format!("start {start}{}", listen_flag(tftp)),
        )];
    }
    if found.holders.is_empty() {
        return vec![Check::not_run(format!(
            "UDP port {port} is bound, by a process this user cannot see (run ka doctor as root to tell)"
        ))];
    }
    let mut checks = Vec::new();
    for h in &found.holders {
        let is_ka_tftp = h.command_line.split(' ').any(|a| a == "tftp")
            && (h.name == "ka"
                || h.command_line
                    .split(' ')
                    .next()
                    .is_some_and(|a| a.ends_with("/ka") || a == "ka"));
        let who = format!("{} (pid {})", h.name, h.pid);
        if is_ka_tftp {
            if h.command_line.contains("--secret-file") {
                checks.push(Check::passed(format!(
                    "UDP port {port} is held by ka tftp (pid {}), which hands install-mode nodes their keys",
                    h.pid
                )));
            } else {
                checks.push(Check::failed(
                    format!("UDP port {port} is held by ka tftp (pid {}), started without --secret-file: nodes booting ka.secret=tftp (the default) get no key", h.pid),
                    format!("restart it with the session secret: {start}"),
                ));
            }
            continue;
        }
        let kind = match h.name.as_str() {
            "in.tftpd" | "tftpd" => "tftpd-hpa",
            "dnsmasq" => "dnsmasq's TFTP server",
            "atftpd" => "atftpd",
            _ => "another program",
        };
        let stop = match h.name.as_str() {
            "in.tftpd" | "tftpd" => "systemctl disable --now tftpd-hpa".to_string(),
            "dnsmasq" => {
                "remove enable-tftp from dnsmasq's configuration and restart it".to_string()
            }
            "atftpd" => "systemctl disable --now atftpd".to_string(),
            _ => format!("stop it (kill {})", h.pid),
        };
        checks.push(Check::failed(
            format!(
                "UDP port {port} is held by {who}, {kind}, not ka tftp: it serves no per-node boot configs and no keys"
            ),
            format!("{stop}, then {start}{}", listen_flag(tftp)),
        ));
    }
    checks
}

fn listen_flag(tftp: SocketAddr) -> String {
    if tftp.port() == 69 {
        String::new()
    } else {
        format!(" --listen {tftp}")
    }
}

/// The files every install-mode node fetches, fetched over TFTP.
fn check_tftp_files(inv: &Inventory, modes: &Modes, tftp: SocketAddr) -> Vec<Check> {
    let b = &inv.boot;
    let root = &b.tftp_root;
    let mut checks = Vec::new();
    let mut shared: Vec<(String, &str)> = vec![
        (
            b.bios_boot_file.clone(),
            "BIOS boot file: Debian pxelinux, /usr/lib/PXELINUX/pxelinux.0",
        ),
        (
            "ldlinux.c32".into(),
            "Debian syslinux-common, /usr/lib/syslinux/modules/bios/ldlinux.c32",
        ),
    ];
    if b.local_boot == LocalBoot::Chain {
        for m in ["chain.c32", "libcom32.c32", "libutil.c32"] {
            shared.push((
                m.into(),
                "Debian syslinux-common, /usr/lib/syslinux/modules/bios/ (local_boot = \"chain\")",
            ));
        }
    }
    shared.push((b.kernel.clone(), "the netboot kernel"));
    shared.push((b.initramfs.clone(), "the netboot initramfs"));
    let secure_boot = is_shim(&b.uefi_boot_file);
    for (file, from) in &shared {
        let c = fetch_check(tftp, root, file, from);
        let unreachable = c.text.contains("no answer");
        checks.push(c);
        if unreachable {
            // Each further fetch would wait as long for nothing.
            checks.push(Check::not_run(format!(
                "the other boot files, per-node configs and keys: the TFTP server at {tftp} does not answer"
            )));
            return checks;
        }
    }
    // UEFI: only a cluster with UEFI machines needs it, so a missing file is
    // noted, not failed.
    let uefi = fetch_check(tftp, root, &b.uefi_boot_file, "UEFI boot file");
    let uefi_served = uefi.outcome == Outcome::Passed;
    if uefi_served {
        checks.push(uefi);
        if secure_boot {
            checks.push(fetch_check(
                tftp,
                root,
                "grubx64.efi",
                "Debian grub-efi-amd64-signed, for Secure Boot",
            ));
            checks.push(fetch_check(
                tftp,
                root,
                render::GRUB_CONFIG,
                "generated by ka tftp",
            ));
        } else {
            checks.push(fetch_check(
                tftp,
                root,
                &b.ipxe_script,
                "generated by ka tftp",
            ));
        }
    } else {
        checks.push(Check::not_run(format!(
            "UEFI boot file {} is not served ({}): UEFI nodes cannot boot; BIOS nodes are not affected (Debian {}, then ka netboot build --out {})",
            b.uefi_boot_file,
            uefi.text.rsplit(": ").next().unwrap_or(""),
            if secure_boot { "shim-signed and grub-efi-amd64-signed" } else { "ipxe" },
            root.display()
        )));
    }
    let installing: Vec<&InventoryNode> = inv
        .nodes
        .iter()
        .filter(|n| modes.get(&n.name).mode == Mode::Install)
        .collect();
    if installing.is_empty() {
        checks.push(Check::not_run(format!(
            "per-node boot configs: no node is in install mode, so none will netboot (ka pxe set --mode install NODES -i {})",
            inv.path.display()
        )));
        return checks;
    }
    for node in installing {
        checks.push(check_node_configs(
            inv,
            modes,
            node,
            tftp,
            uefi_served,
            secure_boot,
        ));
        checks.push(check_node_key(node, tftp));
    }
    checks
}

fn is_shim(boot_file: &str) -> bool {
    boot_file
        .rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with("shim"))
}

/// Fetches `file` and compares it with the root's copy when there is one.
fn fetch_check(tftp: SocketAddr, root: &Path, file: &str, from: &str) -> Check {
    let on_disk = root.join(file);
    match tftp_client::fetch(tftp, file, None) {
        Ok(bytes) => {
            if let Ok(want) = std::fs::read(&on_disk) {
                if want != bytes {
                    return Check::failed(
                        format!(
                            "TFTP {file}: {tftp} serves {} bytes that differ from {} ({} bytes)",
                            bytes.len(),
                            on_disk.display(),
                            want.len()
                        ),
                        format!(
                            "serve {} with ka tftp (--root or the inventory's boot.tftp_root)",
                            root.display()
                        ),
                    );
                }
            }
            Check::passed(format!("TFTP {file}: {} bytes", bytes.len()))
        }
        Err(e) => {
            let hint = match &e {
                FetchError::Refused { code: 1, .. } if !on_disk.exists() => {
                    format!("put it at {} ({from})", on_disk.display())
                }
                FetchError::Refused { .. } => format!(
                    "check that ka tftp serves {} and can read {}",
                    root.display(),
                    on_disk.display()
                ),
                FetchError::NoAnswer(_) => format!(
                    "start ka tftp (on {tftp}) and let UDP port {} through the firewall",
                    tftp.port()
                ),
                FetchError::Failed(_) => "see the error".to_string(),
            };
            Check::failed(format!("TFTP {file}: {e}"), hint)
        }
    }
}

/// A node's own configs: what `ka tftp` serves it is what this inventory
/// and these modes render.
fn check_node_configs(
    inv: &Inventory,
    modes: &Modes,
    node: &InventoryNode,
    tftp: SocketAddr,
    uefi: bool,
    secure_boot: bool,
) -> Check {
    let m = modes.get(&node.name);
    let mut wanted = vec![(
        format!("pxelinux.cfg/01-{}", node.mac.dashed()),
        render::pxelinux(inv, Some(node), m),
    )];
    if uefi && secure_boot {
        wanted.push((
            format!("{}-01-{}", render::GRUB_CONFIG, node.mac),
            render::grub(inv, Some(node), m),
        ));
    } else if uefi {
        wanted.push((
            format!("ipxe/{}.ipxe", node.mac.dashed()),
            render::ipxe(inv, Some(node), m),
        ));
    }
    let who = format!("{} ({}, {})", node.name, node.mac, node.ip);
    for (path, want) in &wanted {
        match tftp_client::fetch(tftp, path, None) {
            Ok(got) if got == want.as_bytes() => {}
            Ok(got) => {
                let got = String::from_utf8_lossy(&got);
                let hint = if got.contains(&format!("ka.name={} ", node.name)) {
                    "ka tftp reads other boot modes or another inventory: start it with this -i and --state-dir"
                } else {
                    "it is not ka tftp's config for this node: start ka tftp with this -i and --state-dir"
                };
                return Check::failed(
                    format!("{who}: TFTP {path} is not what this inventory and its modes give (mode {})", m.mode),
                    hint,
                );
            }
            Err(e) => {
                return Check::failed(
                    format!("{who}: TFTP {path}: {e}"),
                    "ka tftp generates it: start ka tftp with this -i and --state-dir",
                )
            }
        }
    }
    let names: Vec<&str> = wanted.iter().map(|(p, _)| p.as_str()).collect();
    Check::passed(format!("{who}: {} (install mode)", names.join(", ")))
}

/// A node's key is served only to its inventory address: from here it
/// must be refused, unless this machine has that address too (a test on
/// loopback), where it must be served.
fn check_node_key(node: &InventoryNode, tftp: SocketAddr) -> Check {
    let path = keys::key_path(&node.name);
    let own = IpAddr::V4(node.ip);
    let can_be_node =
        UdpSocket::bind((own, 0)).is_ok() && tftp.ip().is_loopback() == own.is_loopback();
    if can_be_node {
        return match tftp_client::fetch(tftp, &path, Some(own)) {
            Ok(text) if keys::is_key_file(&text) => match tftp_client::fetch(tftp, &path, None) {
                Err(FetchError::Refused { code: 2, .. }) => Check::passed(format!(
                    "{}: {path} served to its address {}, refused to others",
                    node.name, node.ip
                )),
                _ => Check::failed(
                    format!("{}: {path} is served to another address than {}", node.name, node.ip),
                    "serve the root with ka tftp, which hands a node its key at its own address only",
                ),
            },
            Ok(_) => Check::failed(
                format!("{}: {path} is not a key", node.name),
                "ka tftp generates it: start ka tftp (not another TFTP server)",
            ),
            Err(e) => Check::failed(
                format!("{}: {path} refused to its own address {} ({e})", node.name, node.ip),
                "start ka tftp with --secret-file (the session secret)",
            ),
        };
    }
    match tftp_client::fetch(tftp, &path, None) {
        Err(FetchError::Refused { code: 2, .. }) => Check::passed(format!(
            "{}: {path} refused to this machine, as it must be: ka tftp hands it to {} only",
            node.name, node.ip
        )),
        Ok(_) => Check::failed(
            format!("{}: {path} is served to this machine, not only to {}", node.name, node.ip),
            "a file of the TFTP root answers for it: serve the root with ka tftp, which never reads ka/keys/ from disk",
        ),
        Err(e) => Check::not_run(format!("{}: {path}: {e}", node.name)),
    }
}

/// The DHCP configuration: next-server, boot files and every node's host
/// entry.
fn check_dhcp(inv: &Inventory, file: Option<&Path>) -> Vec<Check> {
    let (name, text) = match file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => (f.display().to_string(), t),
            Err(e) => {
                return vec![Check::failed(
                    format!("DHCP configuration {} cannot be read: {e}", f.display()),
                    "pass the file your DHCP server reads with --dhcp-config",
                )]
            }
        },
        None => (
            "the generated DHCP configuration (ka dhcp config)".to_string(),
            super::dhcp::render(inv, super::dhcp::Format::Dnsmasq),
        ),
    };
    let view = match dhcp_read::read(&text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Check::failed(
                format!("DHCP {name}: {e}"),
                "give ka doctor an ISC dhcpd, dnsmasq or Kea configuration",
            )]
        }
    };
    let regenerate = format!(
        "or regenerate it: ka dhcp config -f isc|dnsmasq|kea -i {} -o FILE",
        inv.path.display()
    );
    let mut checks = Vec::new();
    let server = inv.boot.server;
    match view.next_servers.as_slice() {
        [] => checks.push(Check::failed(
            format!("DHCP {name}: no next-server: PXE ROMs will not know the TFTP server"),
            format!("set next-server {server} (dnsmasq: the address after the boot file in dhcp-boot=), {regenerate}"),
        )),
        [one] if *one == server => checks.push(Check::passed(format!(
            "DHCP {name}: next-server {one}, the TFTP server (boot.server)"
        ))),
        others => {
            let others: Vec<String> = others.iter().map(ToString::to_string).collect();
            checks.push(Check::failed(
                format!(
                    "DHCP {name}: next-server {}, not the TFTP server {server} (boot.server)",
                    others.join(", ")
                ),
                format!("set next-server {server} (dnsmasq: the address after the boot file in dhcp-boot=), {regenerate}"),
            ));
        }
    }
    let b = &inv.boot;
    let kinds = [
        (
            ClientKind::Bios,
            b.bios_boot_file.as_str(),
            "boot.bios_boot_file",
        ),
        (
            ClientKind::Uefi,
            b.uefi_boot_file.as_str(),
            "boot.uefi_boot_file",
        ),
        (ClientKind::Ipxe, b.ipxe_script.as_str(), "boot.ipxe_script"),
    ];
    let mut right = Vec::new();
    for (kind, want, setting) in kinds {
        match view.boot_file(kind) {
            Some(got) if got == want => right.push(format!("{kind} {got}")),
            Some(got) => checks.push(Check::failed(
                format!("DHCP {name}: {kind} clients get boot file {got:?}, not {want:?} ({setting})"),
                format!("hand {kind} clients {want:?}, {regenerate}"),
            )),
            None => checks.push(Check::failed(
                format!("DHCP {name}: no boot file for {kind} clients (the inventory's {setting} is {want:?})"),
                format!("hand {kind} clients {want:?}, {regenerate}"),
            )),
        }
    }
    if !right.is_empty() {
        checks.push(Check::passed(format!(
            "DHCP {name}: boot files {}",
            right.join(", ")
        )));
    }
    let mut missing = 0;
    for n in &inv.nodes {
        match view.host(&n.mac) {
            Some(Some(ip)) if ip == n.ip => {}
            Some(Some(ip)) => {
                missing += 1;
                checks.push(Check::failed(
                    format!(
                        "DHCP {name}: {} ({}) gets {ip}, not its inventory address {}",
                        n.name, n.mac, n.ip
                    ),
                    format!("give {} the fixed address {}, {regenerate}", n.mac, n.ip),
                ));
            }
            Some(None) => {
                missing += 1;
                checks.push(Check::failed(
                    format!(
                        "DHCP {name}: {} ({}) has an entry without a fixed address",
                        n.name, n.mac
                    ),
                    format!("give {} the fixed address {}, {regenerate}", n.mac, n.ip),
                ));
            }
            None => {
                missing += 1;
                checks.push(Check::failed(
                    format!(
                        "DHCP {name}: {} ({}) has no host entry: it gets no address, or not {}",
                        n.name, n.mac, n.ip
                    ),
                    format!("add a host entry for {} with {}, {regenerate}", n.mac, n.ip),
                ));
            }
        }
    }
    if missing == 0 {
        checks.push(Check::passed(format!(
            "DHCP {name}: all {} nodes have their inventory address",
            inv.nodes.len()
        )));
    }
    checks
}

/// What the DHCP server on `iface` really offers one node (the first in
/// install mode, else the first), as a BIOS, a UEFI and an iPXE client.
fn check_probe(inv: &Inventory, modes: &Modes, iface: &str) -> Vec<Check> {
    let Some(node) = inv
        .nodes
        .iter()
        .find(|n| modes.get(&n.name).mode == Mode::Install)
        .or(inv.nodes.first())
    else {
        return vec![Check::not_run("DHCP probe: the inventory has no node")];
    };
    let b = &inv.boot;
    let who = format!("{} ({})", node.name, node.mac);
    let mut checks = Vec::new();
    for (kind, want) in [
        (ClientKind::Bios, &b.bios_boot_file),
        (ClientKind::Uefi, &b.uefi_boot_file),
        (ClientKind::Ipxe, &b.ipxe_script),
    ] {
        let offer = match probe::discover(iface, node.mac, kind) {
            Ok(o) => o,
            Err(e) if e.contains("needs root") => {
                checks.push(Check::not_run(format!("DHCP probe on {iface}: {e}")));
                return checks;
            }
            Err(e) => {
                checks.push(Check::failed(
                    format!("DHCP probe on {iface} as {kind} client {who}: {e}"),
                    format!(
                        "run the DHCP server on {iface}'s network with a host entry for {} (ka dhcp config -i {})",
                        node.mac,
                        inv.path.display()
                    ),
                ));
                continue;
            }
        };
        let mut wrong = Vec::new();
        if offer.address != node.ip {
            wrong.push(format!("address {} instead of {}", offer.address, node.ip));
        }
        if offer.next_server != b.server {
            wrong.push(format!(
                "next-server {} instead of {}",
                offer.next_server, b.server
            ));
        }
        if offer.boot_file.as_deref() != Some(want.as_str()) {
            wrong.push(format!(
                "boot file {} instead of {want:?}",
                offer
                    .boot_file
                    .as_deref()
                    .map_or("none".to_string(), |f| format!("{f:?}"))
            ));
        }
        let what = format!(
            "DHCP probe on {iface}: {} offers {kind} client {who}",
            offer.server
        );
        if wrong.is_empty() {
            checks.push(Check::passed(format!(
                "{what} {}, next-server {}, boot file {want}",
                offer.address, offer.next_server
            )));
        } else {
            checks.push(Check::failed(
                format!("{what} {}", wrong.join(", ")),
                format!(
                    "fix that server's configuration (ka dhcp config -i {} writes it), or stop a second DHCP server on that network",
                    inv.path.display()
                ),
            ));
        }
    }
    checks
}

/// The ka packed into the netboot image speaks this ka's protocol.
fn check_image_version(inv: &Inventory) -> Check {
    let file = inv
        .boot
        .tftp_root
        .join(version::file_name(&inv.boot.initramfs));
    let rebuild = format!(
        "rebuild it: ka netboot build --out {}",
        inv.boot.tftp_root.display()
    );
    let here = KaVersion::running();
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            return Check::not_run(format!(
                "netboot image version: {} cannot be read ({e}); an image built by ka netboot build has it ({rebuild})",
                file.display()
            ))
        }
    };
    match KaVersion::from_file(&text) {
        Ok(image) if image.protocol != here.protocol => Check::failed(
            format!("netboot image carries {image}, this ka is {here}: its nodes and this source cannot talk"),
            rebuild,
        ),
        Ok(image) if image.version != here.version => Check::failed(
            format!("netboot image carries {image}, this ka is {here}"),
            format!("nodes should run the server's ka: {rebuild}"),
        ),
        Ok(image) => Check::passed(format!("netboot image carries {image}, as this ka")),
        Err(e) => Check::failed(format!("netboot image version file {}: {e}", file.display()), rebuild),
    }
}

/// The source's port answers with a ka challenge of this protocol, and,
/// given the secret, the source proves the session key (its discovery
/// answer, which starts nothing).
fn check_source(inv: &Inventory, secret_file: Option<&Path>) -> Vec<Check> {
    let source = SocketAddr::V4(inv.session.source);
    let serve = format!(
        "ka serve -i {} --session {} --listen {source} --secret-file SECRET",
        inv.path.display(),
        inv.session.name
    );
    let version = match read_challenge(source) {
        Ok(v) => v,
        Err(ChallengeError::NothingThere(e)) => {
            return vec![Check::not_run(format!(
                "source {source}: no ka serve is running there ({e}); nodes wait for it (start it: {serve})"
            ))]
        }
        Err(ChallengeError::NotKa(e)) => {
            return vec![Check::failed(
                format!("source {source}: what listens there is not a ka source ({e})"),
                format!("free the port, or set [session] source to ka serve's --listen in {}", inv.path.display()),
            )]
        }
    };
    let mut checks = Vec::new();
    if version != PROTOCOL_VERSION {
        checks.push(Check::failed(
            format!(
                "source {source}: ka serve speaks protocol {version}, this ka {PROTOCOL_VERSION}"
            ),
            "run the same ka on the source, the nodes' image and here",
        ));
        return checks;
    }
    checks.push(Check::passed(format!(
        "source {source}: ka serve answers (protocol {version})"
    )));
    let Some(secret_file) = secret_file else {
        checks.push(Check::not_run(
            "source's key: give --secret-file to check that it proves the session secret"
                .to_string(),
        ));
        return checks;
    };
    match proves_key(inv, source, secret_file) {
        Ok(()) => checks.push(Check::passed(format!(
            "source {source} proves the key of session {:?} from {}",
            inv.session.name,
            secret_file.display()
        ))),
        Err(e) => checks.push(Check::failed(
            format!("source {source} does not prove the key of session {:?}: {e}", inv.session.name),
            format!(
                "start ka serve with --session {} --secret-file {} (the secret ka tftp hands keys from)",
                inv.session.name,
                secret_file.display()
            ),
        )),
    }
    checks
}

enum ChallengeError {
    NothingThere(String),
    NotKa(String),
}

/// Connects and reads the source's first message, its challenge.
fn read_challenge(source: SocketAddr) -> Result<u16, ChallengeError> {
    let mut stream = TcpStream::connect_timeout(&source, Duration::from_secs(3))
        .map_err(|e| ChallengeError::NothingThere(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| ChallengeError::NotKa(e.to_string()))?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 512];
    loop {
        match Message::decode(&mut buf) {
            Ok(Some(Message::Challenge { version, .. })) => return Ok(version),
            Ok(Some(other)) => {
                return Err(ChallengeError::NotKa(format!(
                    "it began with {}",
                    other.name()
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(ChallengeError::NotKa(e.to_string())),
        }
        if buf.len() > 4096 {
            return Err(ChallengeError::NotKa(
                "no challenge in its first 4 KiB".into(),
            ));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ChallengeError::NotKa("it closed the connection".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(ChallengeError::NotKa(format!(
                    "no challenge within 5 s ({e})"
                )))
            }
        }
    }
}

/// Asks the source's discovery port, as the operator, and believes only an
/// answer that proves the operator key derived from the secret.
fn proves_key(inv: &Inventory, source: SocketAddr, secret_file: &Path) -> Result<(), String> {
    let secret = crate::session::secret::load(secret_file).map_err(|e| format!("{e:#}"))?;
    let root = crate::session::secret::key(&secret, &inv.session.name);
    let operator = ka_core::auth::operator_key(&root);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let found = rt.block_on(ka_net::shell::discovery::find(
        &inv.session.name,
        ka_core::auth::Asker::Operator,
        operator,
        source,
        Duration::from_secs(3),
    ))?;
    if found.port() != source.port() {
        return Err(format!("it answered for {found}"));
    }
    Ok(())
}
