//! The inventory: one TOML file naming the cluster (see `docs/inventory.md`).
//!
//! Loading validates everything at once — addresses, duplicates, ranges,
//! group members — and every problem points at the file, line and field, so a
//! typo in node 97 of 128 is found before a node boots the wrong config.
//!
//! Inside, the file is read as written (`raw`: serde types that keep every
//! value's place in the file) and turned into the model (`model`) by the
//! builders (`build`), which report every problem through the checker
//! (`check`).

use std::path::Path;

mod build;
mod check;
mod model;
mod raw;

pub use check::{InventoryError, Problem};
pub use model::{
    AfterClone, Boot, Inventory, InventoryNode, LocalBoot, Network, SelectError, Session,
};

use check::Checker;
use raw::RawFile;

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
        let inv = build::build(&mut ck, raw, path);
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
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::boot::Mac;

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
    fn several_disks_only_for_a_system_session() {
        let node = r#"
[[node]]
name = "n1"
mac = "52:54:00:00:00:01"
ip = "192.168.10.10"
disk = "/dev/sda,/dev/sdb"
"#;
        let p = problems(node);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("clone = \"system\""), "{p:?}");
        assert_eq!(p[0].line, line_of(node, "/dev/sda,/dev/sdb"));

        let system = |session_extra: &str, body: &str| {
            let head = HEAD.replace(
                "disk = \"/dev/vda\"",
                &format!("disk = \"/dev/vda\"\n{session_extra}"),
            );
            Inventory::parse(&format!("{head}{body}"), Path::new("/etc/ka/c.toml"))
        };
        let inv = system("clone = \"system\"", node).unwrap();
        assert_eq!(
            inv.session.clone,
            crate::netboot::cmdline::CloneKind::System
        );
        assert_eq!(inv.nodes[0].disk, "/dev/sda,/dev/sdb");
        assert_eq!(
            parse(node.replace(",/dev/sdb", "").as_str())
                .unwrap()
                .session
                .clone,
            crate::netboot::cmdline::CloneKind::Image
        );
        let err = system("clone = \"system\"", &node.replace("/dev/sdb", "sdb")).unwrap_err();
        assert!(
            err.to_string().contains("`sdb` is not a device path"),
            "{err}"
        );
        let err = system("clone = \"disk\"", node).unwrap_err();
        assert!(err.to_string().contains("clone"), "{err}");
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
    fn a_mac_range_never_carries_into_the_vendor_part() {
        for base in ["52:ff:ff:ff:ff:ff", "52:54:00:ff:ff:ff"] {
            let body = format!(
                "\n[[range]]\nnames = \"n[1-2]\"\nmac_base = \"{base}\"\nip_base = \"192.168.10.20\"\n"
            );
            let p = problems(&body);
            assert_eq!(p.len(), 1, "{base}: {p:?}");
            assert!(p[0].message.contains("vendor part"), "{p:?}");
            assert_eq!(p[0].field, "range.mac_base");
        }
        let fits = "\n[[range]]\nnames = \"n[1-2]\"\nmac_base = \"52:54:00:ff:ff:fe\"\nip_base = \"192.168.10.20\"\n";
        assert_eq!(parse(fits).unwrap().nodes.len(), 2);
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
    fn a_secret_on_the_kernel_command_line_is_refused() {
        let secret = "ab".repeat(32);
        let body = format!(
            "\n[[node]]\nname = \"a\"\nmac = \"52:54:00:00:00:01\"\nip = \"192.168.10.10\"\nkernel_args = \"quiet ka.secret={secret}\"\n"
        );
        let p = problems(&body);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("ka tftp --secret-file"), "{p:?}");
        assert_eq!(p[0].field, "node.kernel_args");
        // Where the key comes from may be said.
        let body = body.replace(
            &format!("ka.secret={secret}"),
            "ka.secret=tftp://10.0.0.1:6969",
        );
        parse(&body).expect("a key's source is fine");
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
