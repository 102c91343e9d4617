//! Building the model from the file as written: defaults filled in, ranges
//! expanded into nodes, names, MACs and IPs checked unique, groups
//! resolved.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::check::{check_ip_in, line_col, Checker};
use super::model::{mask, AfterClone, Boot, Inventory, InventoryNode, LocalBoot, Network, Session};
use super::raw::{RawBoot, RawFile, RawNetwork, RawNode, RawRange, S};
use crate::boot::hostlist;
use crate::boot::mac::Mac;
use crate::netboot::cmdline::CloneKind;

/// A node definition before duplicates are checked, with where it came from.
struct Draft {
    node: InventoryNode,
    name_span: Range<usize>,
    mac_span: Range<usize>,
    ip_span: Range<usize>,
}

/// The inventory `raw` describes, read from `path`; problems go to `ck`.
pub(super) fn build(ck: &mut Checker<'_>, raw: RawFile, path: &Path) -> Inventory {
    let network = build_network(ck, raw.network.get_ref());
    let boot = build_boot(ck, raw.boot.get_ref(), path);
    let rs = raw.session.get_ref();
    let session_name = ck.word(&rs.name, "session.name", "session name");
    if session_name.len() > crate::session::MAX_SESSION_NAME {
        ck.report(
            rs.name.span(),
            "session.name",
            format!(
                "a session name has at most {} characters",
                crate::session::MAX_SESSION_NAME
            ),
        );
    }
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
    let clone = rs.clone.unwrap_or_default();
    let default_disk = rs.disk.as_ref().map(|d| ck.disk(d, "session.disk", clone));

    // Nodes and ranges, merged in file order so "first seen" errors read naturally.
    enum Entry<'r> {
        InventoryNode(&'r Spanned<RawNode>),
        Range(&'r Spanned<RawRange>),
    }
    let mut entries: Vec<(usize, Entry<'_>)> = raw
        .node
        .iter()
        .map(|n| (n.span().start, Entry::InventoryNode(n)))
        .chain(raw.range.iter().map(|r| (r.span().start, Entry::Range(r))))
        .collect();
    entries.sort_by_key(|(start, _)| *start);

    let mut drafts = Vec::new();
    for (_, entry) in entries {
        match entry {
            Entry::InventoryNode(n) => {
                if let Some(d) = build_node(ck, n, default_disk.as_deref(), clone, &network) {
                    drafts.push(d);
                }
            }
            Entry::Range(r) => {
                drafts.extend(build_range(ck, r, default_disk.as_deref(), clone, &network))
            }
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
            let first: &InventoryNode = &nodes[j];
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
            let first: &InventoryNode = &nodes[j];
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
            let first: &InventoryNode = &nodes[j];
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
            clone,
        },
        nodes,
        groups,
        by_name,
        by_mac,
        by_ip,
    }
}

/// `[network]`.
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

/// `[boot]`, with defaults and the TFTP root anchored at the inventory.
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

/// A node's or range's group names.
fn groups_of(ck: &mut Checker<'_>, groups: &[S], field: &str) -> Vec<String> {
    groups
        .iter()
        .map(|g| ck.word(g, field, "group name"))
        .collect()
}

/// One `[[node]]`; `None` if it has problems.
fn build_node(
    ck: &mut Checker<'_>,
    n: &Spanned<RawNode>,
    default_disk: Option<&str>,
    clone: CloneKind,
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
        (Some(d), _) => ck.disk(d, "node.disk", clone),
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
        node: InventoryNode {
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

/// One `[[range]]`, expanded; empty if it has problems.
fn build_range(
    ck: &mut Checker<'_>,
    r: &Spanned<RawRange>,
    default_disk: Option<&str>,
    clone: CloneKind,
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
            // The range counts up within its vendor part (the first three
            // octets): a carry into it would name another vendor's NIC, or
            // set the multicast bit (52:ff:ff:ff:ff:ff + 1 = 53:00:…).
            Some(b) => match b
                .offset(count as u64 - 1)
                .filter(|last| last.0[..3] == b.0[..3])
            {
                Some(_) => (0..count)
                    .map(|i| (b.offset(i as u64).expect("checked above"), base.span()))
                    .collect(),
                None => {
                    ck.report(
                        base.span(),
                        "range.mac_base",
                        format!(
                            "{count} MACs from {b} run out of its vendor part ({:02x}:{:02x}:{:02x}): start the range lower or split it",
                            b.0[0], b.0[1], b.0[2]
                        ),
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
        (Some(d), _) => ck.disk(d, "range.disk", clone),
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
            node: InventoryNode {
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
