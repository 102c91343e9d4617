//! The kernel command-line contract of the netboot image: the `ka.*`
//! arguments a node boots with (rendered per node from the inventory by
//! `ka tftp`) and what the image does with them. `docs/netboot.md` is the
//! reference for administrators; [`Plan::parse`] is the one parser.

use std::path::PathBuf;
use std::time::Duration;

use crate::boot::Mac;
use crate::session::identity::{parse_cidr, valid_hostname, Identity, RootPartition};

/// What the node boots into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetbootMode {
    /// Join the session and clone the disk.
    Install,
    /// Bring the network up and give a shell, for repairs.
    Shell,
}

/// What kind of session the node joins, which decides what its disks get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneKind {
    /// An image (`ka serve FILE|DEVICE|…`) written onto one disk as it is.
    #[default]
    Image,
    /// A whole running machine (`ka serve --system`): the node partitions
    /// its disks, makes file systems, unpacks the trees and installs the
    /// boot loader (`ka join --system`).
    System,
}

impl std::fmt::Display for CloneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloneKind::Image => "image",
            CloneKind::System => "system",
        })
    }
}

impl std::str::FromStr for CloneKind {
    type Err = String;

    fn from_str(s: &str) -> Result<CloneKind, String> {
        match s {
            "image" => Ok(CloneKind::Image),
            "system" => Ok(CloneKind::System),
            _ => Err("use image or system".into()),
        }
    }
}

/// Where the node's key comes from: its own key (what `ka tftp
/// --secret-file` hands each install-mode node, the default), or a file
/// holding a key or the session secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `ka.secret=<64 hex digits>`: the session secret on the command line
    /// itself (served to whoever asks for the node's boot config: avoid).
    Inline(String),
    /// `ka.secret=file:/PATH`: a file in the image.
    File(PathBuf),
    /// `ka.secret=tftp` (the default: the node's own key,
    /// [`crate::boot::keys::key_path`], from the DHCP next-server),
    /// `ka.secret=tftp://HOST[:PORT]` (the same from that server),
    /// `ka.secret=tftp:PATH` or `ka.secret=tftp://HOST[:PORT]/PATH`.
    Tftp {
        /// The TFTP server and port; `None`: the DHCP lease's next-server, port 69.
        server: Option<String>,
        /// The file on the server.
        path: String,
    },
}

/// Everything a netboot node does, read from its kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `ka.mode=install|shell` (default install).
    pub mode: NetbootMode,
    /// `ka.server=HOST[:PORT]`; `None`: find the source by broadcast.
    pub server: Option<String>,
    /// `ka.session=NAME` (default `ka`).
    pub session: String,
    /// `ka.name=NAME`: the node's name in the session and the inventory.
    pub name: Option<String>,
    /// `ka.clone=image|system` (default image): what the session serves.
    pub clone_kind: CloneKind,
    /// `ka.target=/dev/…[,/dev/…]`: the disk to clone onto; a system clone
    /// may name several, in the order of the source's disks.
    pub targets: Vec<PathBuf>,
    /// `ka.secret=…` (default `tftp`: the node's own key from the boot server).
    pub secret: SecretSource,
    /// The identity to apply after the clone verified; `None` with `ka.identity=off`.
    pub identity: Option<Identity>,
    /// `ka.root=auto|whole|N`: where the cloned root file system is.
    pub root: RootPartition,
    /// `BOOTIF=01-aa-bb-…` (pxelinux `IPAPPEND 2`, ka's iPXE scripts): the NIC that booted.
    pub boot_mac: Option<Mac>,
    /// `ka.iface=NAME`: run DHCP on this interface instead of the boot NIC.
    pub iface: Option<String>,
    /// `ka.wait=DURATION` (default 30m): how long to look for the source.
    pub wait: Duration,
    /// `ka.verify=readback`: read the disk back and check it too.
    pub verify_readback: bool,
    /// `ka.fail_delay=DURATION|never` (default 60s): wait before rebooting
    /// after a failure; `None`: never reboot, stay at a shell.
    pub fail_delay: Option<Duration>,
    /// `ka.data_port=PORT` (default: one the system chooses): the port the
    /// node listens on for its downstream, for firewalls between nodes.
    pub data_port: u16,
}

/// The `ka.*` keys the image understands.
pub const KEYS: &[&str] = &[
    "mode",
    "clone",
    "server",
    "session",
    "name",
    "target",
    "secret",
    "hostname",
    "domain",
    "ip",
    "gateway",
    "dns",
    "identity",
    "root",
    "iface",
    "wait",
    "verify",
    "fail_delay",
    "data_port",
];

/// Splits a kernel command line as the kernel does: on spaces, where a
/// double-quoted stretch (`ka.x="a b"`) stays one argument, without its quotes.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

impl Plan {
    /// Reads the plan from a kernel command line (`/proc/cmdline`). Other
    /// arguments are ignored; an unknown `ka.` key is an error (a typo must
    /// not silently change what a node does to its disk).
    pub fn parse(cmdline: &str) -> Result<Plan, String> {
        let mut plan = Plan {
            mode: NetbootMode::Install,
            server: None,
            session: crate::session::DEFAULT_SESSION.to_string(),
            name: None,
            clone_kind: CloneKind::Image,
            targets: Vec::new(),
            secret: SecretSource::Tftp {
                server: None,
                path: String::new(),
            },
            identity: None,
            root: RootPartition::Auto,
            boot_mac: None,
            iface: None,
            wait: Duration::from_secs(30 * 60),
            verify_readback: false,
            fail_delay: Some(Duration::from_secs(60)),
            data_port: 0,
        };
        let mut hostname = None;
        let mut identity_on = true;
        let mut id = Identity::default();
        for arg in split(cmdline) {
            let (key, value) = arg.split_once('=').unwrap_or((&arg, ""));
            if key == "BOOTIF" {
                // `01-` is the ARP hardware type (Ethernet) pxelinux puts first.
                let mac = value.strip_prefix("01-").unwrap_or(value);
                plan.boot_mac = Some(mac.parse().map_err(|e| format!("BOOTIF: {e}"))?);
                continue;
            }
            let Some(key) = key.strip_prefix("ka.") else {
                continue;
            };
            let bad = |what: &str| format!("ka.{key}={value}: {what}");
            match key {
                "mode" => {
                    plan.mode = match value {
                        "install" => NetbootMode::Install,
                        "shell" => NetbootMode::Shell,
                        _ => return Err(bad("use install or shell")),
                    }
                }
                "server" => plan.server = Some(value.to_string()).filter(|s| !s.is_empty()),
                "session" if !value.is_empty() => plan.session = value.to_string(),
                "name" if !value.is_empty() => plan.name = Some(value.to_string()),
                "clone" => plan.clone_kind = value.parse().map_err(|e: String| bad(&e))?,
                "target" => {
                    plan.targets = value.split(',').map(PathBuf::from).collect();
                    if let Some(d) = plan.targets.iter().find(|d| !d.starts_with("/dev/")) {
                        return Err(bad(&format!(
                            "`{}` is not a device path like /dev/sda",
                            d.display()
                        )));
                    }
                }
                "secret" => plan.secret = parse_secret(value).map_err(|e| bad(&e))?,
                "hostname" => hostname = Some(value.to_string()),
                "domain" => id.domain = Some(value.to_string()).filter(|d| !d.is_empty()),
                "ip" => id.ip = Some(parse_cidr(value).map_err(|e| bad(&e))?),
                "gateway" => {
                    id.gateway = Some(value.parse().map_err(|_| bad("not an IPv4 address"))?)
                }
                "dns" => {
                    id.dns = value
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(|d| {
                            d.parse()
                                .map_err(|_| bad(&format!("`{d}` is not an IPv4 address")))
                        })
                        .collect::<Result<_, _>>()?
                }
                "identity" => {
                    identity_on = match value {
                        "on" | "1" | "yes" => true,
                        "off" | "0" | "no" => false,
                        _ => return Err(bad("use on or off")),
                    }
                }
                "root" => plan.root = value.parse().map_err(|e: String| bad(&e))?,
                "iface" if !value.is_empty() => plan.iface = Some(value.to_string()),
                "wait" => {
                    plan.wait = humantime::parse_duration(value)
                        .map_err(|_| bad("not a duration like 30m or 90s"))?
                }
                "verify" if value == "readback" => plan.verify_readback = true,
                "verify" if value == "off" || value.is_empty() => plan.verify_readback = false,
                "fail_delay" if value == "never" => plan.fail_delay = None,
                "fail_delay" => {
                    plan.fail_delay = Some(
                        humantime::parse_duration(value)
                            .map_err(|_| bad("a duration like 60s, or never"))?,
                    )
                }
                "data_port" => {
                    plan.data_port = value
                        .parse()
                        .map_err(|_| bad("a port number, 1 to 65535"))?
                }
                _ if KEYS.contains(&key) => return Err(bad("empty or invalid value")),
                _ => {
                    return Err(format!(
                        "unknown argument ka.{key}: the netboot image knows ka.{}",
                        KEYS.join(", ka.")
                    ))
                }
            }
        }
        // A TFTP source without a path is the node's own key.
        if let (SecretSource::Tftp { path, .. }, Some(name)) = (&mut plan.secret, &plan.name) {
            if path.is_empty() {
                *path = crate::boot::keys::key_path(name);
            }
        }
        if plan.mode == NetbootMode::Install {
            if plan.targets.is_empty() {
                return Err(
                    "ka.target= is missing: name the disk to clone onto, e.g. ka.target=/dev/sda"
                        .into(),
                );
            }
            if plan.clone_kind == CloneKind::Image && plan.targets.len() > 1 {
                return Err(format!(
                    "ka.target= names {} disks, but an image goes onto one: name one disk, \
                     or add ka.clone=system for a system clone (one disk per source disk)",
                    plan.targets.len()
                ));
            }
            if plan.name.is_none() {
                return Err("ka.name= is missing: the node's name in the inventory".into());
            }
        }
        if identity_on {
            // The host name defaults to the node's name: both come from the
            // inventory, where names are unique, so no two clones share one.
            id.hostname = match (hostname, &plan.name) {
                (Some(h), _) => h,
                (None, Some(n)) if valid_hostname(n) => n.clone(),
                (None, Some(n)) => {
                    return Err(format!(
                        "the node name `{n}` is not a valid host name: add ka.hostname=, or ka.identity=off"
                    ))
                }
                (None, None) => String::new(),
            };
            id.mac = plan.boot_mac;
            if !id.hostname.is_empty() {
                id.check()?;
                plan.identity = Some(id);
            }
        }
        Ok(plan)
    }
}

/// Reads `ka.secret=`; a TFTP source without a path (the node's own key)
/// gets its path once the node's name is known.
fn parse_secret(value: &str) -> Result<SecretSource, String> {
    if value == "tftp" {
        return Ok(SecretSource::Tftp {
            server: None,
            path: String::new(),
        });
    }
    if let Some(rest) = value.strip_prefix("tftp://") {
        let (server, path) = rest.split_once('/').unwrap_or((rest, ""));
        if server.is_empty() {
            return Err("tftp://HOST[:PORT][/PATH] needs a host".into());
        }
        return Ok(SecretSource::Tftp {
            server: Some(server.to_string()),
            path: path.to_string(),
        });
    }
    if let Some(path) = value.strip_prefix("tftp:") {
        if path.is_empty() {
            return Err("tftp:PATH needs a path".into());
        }
        return Ok(SecretSource::Tftp {
            server: None,
            path: path.to_string(),
        });
    }
    if let Some(path) = value.strip_prefix("file:") {
        if !path.starts_with('/') {
            return Err("file:PATH needs an absolute path".into());
        }
        return Ok(SecretSource::File(path.into()));
    }
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(SecretSource::Inline(value.to_string()));
    }
    Err("use tftp (the node's own key from the boot server), tftp://HOST[:PORT], tftp:PATH, tftp://HOST[:PORT]/PATH, file:/PATH or 64 hex digits".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str =
        "BOOT_IMAGE=ka/vmlinuz initrd=initrd.img ka.server=10.9.0.1:4715 ka.session=lab \
        ka.name=n01 ka.target=/dev/vda ka.mode=install ka.ip=10.9.0.11/24 ka.gateway=10.9.0.1 \
        ka.dns=10.9.0.1,10.9.0.2 ka.domain=lab.example console=ttyS0,115200 quiet \
        ka.secret=tftp:ka/secret BOOTIF=01-52-54-00-09-00-01";

    #[test]
    fn an_install_line_from_ka_tftp() {
        let p = Plan::parse(LINE).unwrap();
        assert_eq!(p.mode, NetbootMode::Install);
        assert_eq!(p.server.as_deref(), Some("10.9.0.1:4715"));
        assert_eq!(p.session, "lab");
        assert_eq!(p.name.as_deref(), Some("n01"));
        assert_eq!(p.targets, [PathBuf::from("/dev/vda")]);
        assert_eq!(p.clone_kind, CloneKind::Image);
        assert_eq!(
            p.secret,
            SecretSource::Tftp {
                server: None,
                path: "ka/secret".into()
            }
        );
        let mac: Mac = "52:54:00:09:00:01".parse().unwrap();
        assert_eq!(p.boot_mac, Some(mac));
        let id = p.identity.unwrap();
        assert_eq!(id.hostname, "n01");
        assert_eq!(id.ip, Some(("10.9.0.11".parse().unwrap(), 24)));
        assert_eq!(id.gateway, Some("10.9.0.1".parse().unwrap()));
        assert_eq!(id.dns.len(), 2);
        assert_eq!(id.domain.as_deref(), Some("lab.example"));
        assert_eq!(id.mac, Some(mac));
        assert_eq!(p.root, RootPartition::Auto);
        assert_eq!(p.fail_delay, Some(Duration::from_secs(60)));
        assert_eq!(p.wait, Duration::from_secs(1800));
    }

    #[test]
    fn defaults_overrides_and_quotes() {
        let p = Plan::parse(
            "ka.name=n1 ka.target=/dev/sda ka.hostname=web-1 ka.root=2 ka.fail_delay=never \
             ka.wait=90s ka.verify=readback ka.iface=\"eth 1\" ka.secret=file:/s",
        )
        .unwrap();
        assert_eq!(p.server, None);
        assert_eq!(p.session, "ka");
        assert_eq!(p.identity.unwrap().hostname, "web-1");
        assert_eq!(p.root, RootPartition::Number(2));
        assert_eq!(p.fail_delay, None);
        assert_eq!(p.wait, Duration::from_secs(90));
        assert!(p.verify_readback);
        assert_eq!(p.iface.as_deref(), Some("eth 1"));
        assert_eq!(p.secret, SecretSource::File("/s".into()));
        let p = Plan::parse("ka.name=n1 ka.target=/dev/sda ka.identity=off").unwrap();
        assert_eq!(p.identity, None);
        // By default, the node's own key from the boot server.
        assert_eq!(
            p.secret,
            SecretSource::Tftp {
                server: None,
                path: "ka/keys/n1.key".into()
            }
        );
        let p =
            Plan::parse("ka.secret=tftp://10.0.0.1:6969 ka.name=n1 ka.target=/dev/sda").unwrap();
        assert_eq!(
            p.secret,
            SecretSource::Tftp {
                server: Some("10.0.0.1:6969".into()),
                path: "ka/keys/n1.key".into()
            }
        );
        let hex = "ab".repeat(32);
        let p = Plan::parse(&format!("ka.mode=shell ka.secret={hex}")).unwrap();
        assert_eq!(p.mode, NetbootMode::Shell);
        assert_eq!(p.secret, SecretSource::Inline(hex));
        let p = Plan::parse("ka.name=n1 ka.target=/dev/sda ka.secret=tftp://10.0.0.1:6969/ka/s")
            .unwrap();
        assert_eq!(
            p.secret,
            SecretSource::Tftp {
                server: Some("10.0.0.1:6969".into()),
                path: "ka/s".into()
            }
        );
    }

    #[test]
    fn mistakes_are_refused_with_the_reason() {
        for (line, why) in [
            ("ka.name=n1", "ka.target= is missing"),
            ("ka.target=/dev/sda", "ka.name= is missing"),
            ("ka.name=n1 ka.target=sda", "`sda` is not a device path"),
            (
                "ka.name=n1 ka.target=/dev/sda,sdb ka.clone=system",
                "`sdb` is not a device path",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda,/dev/sdb",
                "add ka.clone=system",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda ka.clone=disk",
                "use image or system",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda ka.sever=x",
                "unknown argument ka.sever",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda ka.ip=10.0.0.1",
                "prefix length",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda ka.secret=abc",
                "64 hex digits",
            ),
            ("ka.name=n_1 ka.target=/dev/sda", "not a valid host name"),
            (
                "ka.name=n1 ka.target=/dev/sda ka.mode=wipe",
                "use install or shell",
            ),
            (
                "ka.name=n1 ka.target=/dev/sda ka.gateway=10.0.0.1",
                "without an ip",
            ),
            ("ka.name=n1 ka.target=/dev/sda BOOTIF=01-zz", "BOOTIF"),
            ("ka.name=n1 ka.target=/dev/sda ka.wait=soon", "duration"),
        ] {
            let err = Plan::parse(line).unwrap_err();
            assert!(err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn a_system_clone_takes_several_disks_in_order() {
        let p = Plan::parse("ka.name=n1 ka.clone=system ka.target=/dev/sdb,/dev/nvme0n1").unwrap();
        assert_eq!(p.clone_kind, CloneKind::System);
        assert_eq!(
            p.targets,
            [PathBuf::from("/dev/sdb"), PathBuf::from("/dev/nvme0n1")]
        );
        let p = Plan::parse("ka.name=n1 ka.target=/dev/sda ka.clone=system").unwrap();
        assert_eq!(p.targets, [PathBuf::from("/dev/sda")]);
        // The last value counts, as for every key: a node's own arguments
        // come after the cluster's.
        let p =
            Plan::parse("ka.clone=system ka.name=n1 ka.target=/dev/sda ka.clone=image").unwrap();
        assert_eq!(p.clone_kind, CloneKind::Image);
        assert_eq!("system".parse::<CloneKind>(), Ok(CloneKind::System));
        assert_eq!(CloneKind::System.to_string(), "system");
        assert_eq!(CloneKind::default(), CloneKind::Image);
    }

    #[test]
    fn split_keeps_quoted_spaces() {
        assert_eq!(split(" a  b=\"c d\" \"e\"\n"), ["a", "b=c d", "e"]);
        assert_eq!(split(""), Vec::<String>::new());
    }
}
