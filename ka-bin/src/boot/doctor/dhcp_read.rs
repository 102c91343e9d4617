//! What a DHCP server's configuration hands the nodes, read back from the
//! file: each host's fixed address, the next-server (the TFTP server) and
//! the boot file per kind of client. It reads what `ka dhcp config` writes
//! (ISC dhcpd, dnsmasq, Kea) and the same statements written by hand; it
//! is no general parser of those languages.

use std::net::Ipv4Addr;

use super::super::mac::Mac;

/// The kinds of PXE client a boot file is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A BIOS PXE ROM (pxelinux).
    Bios,
    /// UEFI x86-64 firmware (client architecture 7 or 9).
    Uefi,
    /// iPXE itself (user class `iPXE`).
    Ipxe,
}

impl std::fmt::Display for ClientKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientKind::Bios => "BIOS",
            ClientKind::Uefi => "UEFI",
            ClientKind::Ipxe => "iPXE",
        })
    }
}

/// What the configuration hands out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpView {
    /// Host entries: MAC and fixed address (if it gives one).
    pub hosts: Vec<(Mac, Option<Ipv4Addr>)>,
    /// The next-server addresses named (one, normally).
    pub next_servers: Vec<Ipv4Addr>,
    /// The boot file per kind of client.
    pub boot_files: Vec<(ClientKind, String)>,
}

impl DhcpView {
    /// The boot file for `kind`, if the configuration names one.
    pub fn boot_file(&self, kind: ClientKind) -> Option<&str> {
        self.boot_files
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| f.as_str())
    }

    /// The fixed address of the host with `mac`: `None` if no entry has it,
    /// `Some(None)` if its entry gives no address.
    pub fn host(&self, mac: &Mac) -> Option<Option<Ipv4Addr>> {
        self.hosts.iter().find(|(m, _)| m == mac).map(|(_, ip)| *ip)
    }
}

/// Reads a configuration, telling the format by its content: JSON is Kea,
/// `dhcp-host=`/`dhcp-boot=` lines are dnsmasq, anything else ISC dhcpd.
pub fn read(text: &str) -> Result<DhcpView, String> {
    if text.trim_start().starts_with('{') {
        kea(text)
    } else if text.lines().any(|l| {
        l.trim_start().starts_with("dhcp-host=") || l.trim_start().starts_with("dhcp-boot=")
    }) {
        Ok(dnsmasq(text))
    } else {
        Ok(isc(text))
    }
}

/// The kind of client a condition or tag set selects, from its spelling;
/// negated tests (`tag:!ka-ipxe`, Kea's `not member('…')`) select nothing.
fn kind_of(condition: &str) -> ClientKind {
    let mut positive = condition.to_ascii_lowercase();
    while let Some(at) = positive.find("not member(") {
        let end = positive[at..]
            .find(')')
            .map_or(positive.len(), |e| at + e + 1);
        positive.replace_range(at..end, "");
    }
    let positive: Vec<&str> = positive
        .split([',', ' '])
        .filter(|w| !w.starts_with("tag:!") && !w.starts_with('!'))
        .collect();
    let text = positive.join(" ");
    if text.contains("ipxe") {
        ClientKind::Ipxe
    } else if text.contains("efi") || text.contains("00:07") || text.contains("0x0007") {
        ClientKind::Uefi
    } else {
        ClientKind::Bios
    }
}

/// dnsmasq: `dhcp-host=MAC,IP,NAME` and `dhcp-boot=[tag:…,]FILE,[NAME],[ADDRESS]`.
fn dnsmasq(text: &str) -> DhcpView {
    let mut view = DhcpView::default();
    for line in text.lines().map(str::trim) {
        if let Some(host) = line.strip_prefix("dhcp-host=") {
            let fields: Vec<&str> = host.split(',').map(str::trim).collect();
            let mac = fields.iter().find_map(|f| f.parse::<Mac>().ok());
            let ip = fields.iter().find_map(|f| f.parse::<Ipv4Addr>().ok());
            if let Some(mac) = mac {
                view.hosts.push((mac, ip));
            }
        } else if let Some(boot) = line.strip_prefix("dhcp-boot=") {
            let fields: Vec<&str> = boot.split(',').map(str::trim).collect();
            let tags: Vec<&str> = fields
                .iter()
                .take_while(|f| f.starts_with("tag:") || f.starts_with("net:"))
                .copied()
                .collect();
            let rest = &fields[tags.len()..];
            let Some(file) = rest.first() else { continue };
            if let Some(server) = rest.get(2).and_then(|a| a.parse::<Ipv4Addr>().ok()) {
                if !view.next_servers.contains(&server) {
                    view.next_servers.push(server);
                }
            }
            view.boot_files
                .push((kind_of(&tags.join(",")), file.to_string()));
        }
    }
    view
}

/// ISC dhcpd: `next-server A;`, `filename "F";` (in `if`/`elsif`/`else`
/// branches by client kind) and `host … { hardware ethernet M;
/// fixed-address A; }`.
fn isc(text: &str) -> DhcpView {
    let mut view = DhcpView::default();
    // Statements, without comments, split at `;`, `{` and `}` (kept).
    let mut clean = String::new();
    for line in text.lines() {
        clean.push_str(line.split('#').next().unwrap_or(""));
        clean.push('\n');
    }
    let mut condition = String::new();
    let mut host: Option<(Option<Mac>, Option<Ipv4Addr>)> = None;
    let mut statement = String::new();
    for c in clean.chars() {
        if !matches!(c, ';' | '{' | '}') {
            statement.push(c);
            continue;
        }
        let s = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        statement.clear();
        match c {
            '{' => {
                if s.starts_with("host ") {
                    host = Some((None, None));
                } else if s.starts_with("if ")
                    || s.starts_with("elsif ")
                    || s.starts_with("} elsif")
                {
                    condition = s;
                } else if s == "else" {
                    condition = "else".into();
                }
            }
            '}' => {
                if let Some((Some(mac), ip)) = host.take() {
                    view.hosts.push((mac, ip));
                }
            }
            _ => {
                if let Some(mac) = s.strip_prefix("hardware ethernet ") {
                    if let (Some(h), Ok(mac)) = (host.as_mut(), mac.trim().parse::<Mac>()) {
                        h.0 = Some(mac);
                    }
                } else if let Some(ip) = s.strip_prefix("fixed-address ") {
                    if let (Some(h), Ok(ip)) = (host.as_mut(), ip.trim().parse::<Ipv4Addr>()) {
                        h.1 = Some(ip);
                    }
                } else if let Some(addr) = s.strip_prefix("next-server ") {
                    if let Ok(ip) = addr.trim().parse::<Ipv4Addr>() {
                        if !view.next_servers.contains(&ip) {
                            view.next_servers.push(ip);
                        }
                    }
                } else if let Some(file) = s.strip_prefix("filename ") {
                    let file = file.trim().trim_matches('"').to_string();
                    let kind = if condition.is_empty() || condition == "else" {
                        ClientKind::Bios
                    } else {
                        kind_of(&condition)
                    };
                    view.boot_files.push((kind, file));
                }
            }
        }
    }
    view
}

/// Kea DHCPv4: reservations of the `subnet4` entries, `next-server` and
/// `boot-file-name` of the subnets and client classes.
fn kea(text: &str) -> Result<DhcpView, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let dhcp4 = &json["Dhcp4"];
    if dhcp4.is_null() {
        return Err("no `Dhcp4` object: not a Kea DHCPv4 configuration".into());
    }
    let mut view = DhcpView::default();
    let next_server = |v: &serde_json::Value, view: &mut DhcpView| {
        if let Some(ip) = v["next-server"].as_str().and_then(|s| s.parse().ok()) {
            if !view.next_servers.contains(&ip) {
                view.next_servers.push(ip);
            }
        }
    };
    for class in dhcp4["client-classes"].as_array().into_iter().flatten() {
        next_server(class, &mut view);
        if let Some(file) = class["boot-file-name"].as_str() {
            let test = class["test"].as_str().unwrap_or("");
            view.boot_files.push((kind_of(test), file.to_string()));
        }
    }
    for subnet in dhcp4["subnet4"].as_array().into_iter().flatten() {
        next_server(subnet, &mut view);
        for r in subnet["reservations"].as_array().into_iter().flatten() {
            if let Some(mac) = r["hw-address"].as_str().and_then(|m| m.parse().ok()) {
                let ip = r["ip-address"].as_str().and_then(|s| s.parse().ok());
                view.hosts.push((mac, ip));
            }
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::dhcp::{render, Format};
    use crate::boot::Inventory;
    use std::path::Path;

    fn inv() -> Inventory {
        Inventory::parse(
            r#"
[network]
subnet = "10.1.0.0/16"
gateway = "10.1.0.254"
[boot]
server = "10.1.0.1"
tftp_root = "/srv/tftp"
kernel = "vmlinuz"
initramfs = "initrd"
uefi_boot_file = "shimx64.efi"
[session]
name = "s"
source = "10.1.0.1:4000"
disk = "/dev/sda"
[[range]]
names = "n[1-3]"
mac_base = "52:54:00:00:00:01"
ip_base = "10.1.1.1"
"#,
            Path::new("c.toml"),
        )
        .unwrap()
    }

    #[test]
    fn every_generated_format_reads_back_as_the_inventory_says() {
        let inv = inv();
        for format in [Format::Isc, Format::Dnsmasq, Format::Kea] {
            let view = read(&render(&inv, format)).unwrap();
            assert_eq!(view.next_servers, vec![inv.boot.server], "{format:?}");
            assert_eq!(
                view.boot_file(ClientKind::Bios),
                Some("pxelinux.0"),
                "{format:?}"
            );
            assert_eq!(
                view.boot_file(ClientKind::Uefi),
                Some("shimx64.efi"),
                "{format:?}"
            );
            assert_eq!(
                view.boot_file(ClientKind::Ipxe),
                Some("boot.ipxe"),
                "{format:?}"
            );
            for n in &inv.nodes {
                assert_eq!(view.host(&n.mac), Some(Some(n.ip)), "{format:?} {}", n.name);
            }
            assert_eq!(view.hosts.len(), 3, "{format:?}");
        }
    }

    #[test]
    fn hand_written_dnsmasq_lines_are_read() {
        let view = read(
            "dhcp-host=node1,52-54-00-00-00-09,10.0.0.9\n\
             dhcp-boot=pxelinux.0,boothost,10.0.0.2\n",
        )
        .unwrap();
        assert_eq!(
            view.hosts,
            vec![(
                "52:54:00:00:00:09".parse().unwrap(),
                Some("10.0.0.9".parse().unwrap())
            )]
        );
        assert_eq!(
            view.next_servers,
            vec!["10.0.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(view.boot_file(ClientKind::Bios), Some("pxelinux.0"));
        assert_eq!(view.boot_file(ClientKind::Uefi), None);
    }

    #[test]
    fn broken_kea_json_says_so() {
        assert!(read("{ not json").unwrap_err().contains("JSON"));
    }
}
