//! MAC harvesting: turn DHCP traffic into inventory entries.
//!
//! As with the original Ka, power the nodes on one by one in the order you
//! want them numbered; their DHCP requests land in the DHCP server's leases
//! and logs, and `ka dhcp harvest` turns the MACs, in the order they were
//! first seen, into `[[node]]` blocks. It reads:
//!
//! - ISC dhcpd leases files (`lease … { starts …; hardware ethernet …; }`),
//!   ordered by each lease's `starts` time, since dhcpd rewrites the file in
//!   its own order;
//! - dnsmasq lease files (`<expiry> <mac> <ip> <name> <client-id>`), ordered
//!   by expiry (with one lease time, the order the leases were given);
//! - Kea memfile lease files (`kea-leases4.csv`, and `kea-leases6.csv` where
//!   a lease has a hardware address), CSV with a header naming the columns,
//!   ordered by each lease's start (`expire - valid_lifetime`), since Kea's
//!   lease file cleanup rewrites the file in address order. Declined leases
//!   are skipped (they record an address conflict, and Kea blanks their
//!   hardware address); expired-reclaimed and released ones count, since
//!   the machine did ask for an address;
//! - syslog or journal lines with `DHCPDISCOVER` or `DHCPREQUEST` from dhcpd
//!   (`DHCPDISCOVER from <mac> via eth0`) or dnsmasq
//!   (`DHCPDISCOVER(br0) <mac>`, `DHCPREQUEST(br0) <ip> <mac>`), in line order.
//!
//! Files are taken in the order given; a MAC seen twice keeps its first place.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::inventory::Inventory;
use super::mac::Mac;

/// Where a MAC was first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The MAC address.
    pub mac: Mac,
    /// `file:line` of the first sighting.
    pub origin: String,
}

/// The kind of a DHCP record file, detected from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileKind {
    /// ISC dhcpd `dhcpd.leases`.
    #[value(name = "isc")]
    IscLeases,
    /// dnsmasq `dnsmasq.leases`.
    #[value(name = "dnsmasq")]
    DnsmasqLeases,
    /// Kea's memfile `kea-leases4.csv` (or `kea-leases6.csv`).
    #[value(name = "kea")]
    KeaLeases,
    /// Syslog or journal lines.
    #[value(name = "syslog")]
    Syslog,
}

impl FileKind {
    /// Every kind, so that a reader added here is fuzzed with the others.
    pub const ALL: [FileKind; 4] = [
        FileKind::IscLeases,
        FileKind::DnsmasqLeases,
        FileKind::KeaLeases,
        FileKind::Syslog,
    ];

    /// What the kind is called in messages.
    pub fn describe(self) -> &'static str {
        match self {
            FileKind::IscLeases => "ISC dhcpd leases",
            FileKind::DnsmasqLeases => "dnsmasq leases",
            FileKind::KeaLeases => "Kea leases",
            FileKind::Syslog => "syslog lines",
        }
    }
}

/// The first columns of every Kea memfile lease file: DHCPv4
/// (`address,hwaddr,client_id,…`) and DHCPv6 (`address,duid,…`).
const KEA_HEADERS: &[&str] = &["address,hwaddr,", "address,duid,"];

/// Kea's lease state for a declined address (`Lease::STATE_DECLINED`).
const KEA_STATE_DECLINED: &str = "1";

/// Guesses what `text` is.
pub fn detect(text: &str) -> FileKind {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    if lines
        .clone()
        .next()
        .is_some_and(|first| KEA_HEADERS.iter().any(|h| first.starts_with(h)))
    {
        return FileKind::KeaLeases;
    }
    if text.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("lease ") && l.trim_end().ends_with('{')
    }) {
        return FileKind::IscLeases;
    }
    if lines.clone().next().is_some()
        && lines.all(|l| dnsmasq_lease(l).is_some() || l.starts_with("duid "))
    {
        return FileKind::DnsmasqLeases;
    }
    FileKind::Syslog
}

fn dnsmasq_lease(line: &str) -> Option<(u64, Mac)> {
    let mut f = line.split_whitespace();
    let expiry = f.next()?.parse().ok()?;
    let mac = strict_mac(f.next()?)?;
    f.next()?.parse::<Ipv4Addr>().ok()?;
    Some((expiry, mac))
}

/// A MAC written with colons, as DHCP servers log them; bare hex is not
/// accepted here so transaction IDs are never mistaken for MACs.
fn strict_mac(token: &str) -> Option<Mac> {
    let t = token.trim_matches(|c: char| matches!(c, '(' | ')' | ',' | ';' | ':' | '[' | ']'));
    if t.matches(':').count() != 5 {
        return None;
    }
    t.parse().ok()
}

/// The leases of a Kea memfile lease file with a hardware address, as
/// (start time, line, MAC). Columns are found by the header's names, so
/// every Kea version's file reads (they add columns at the end).
fn kea_leases(text: &str) -> Vec<(String, usize, Mac)> {
    let mut lines = text.lines().enumerate();
    let Some((_, header)) = lines.find(|(_, l)| !l.trim().is_empty()) else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.trim().split(',').collect();
    let column = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(hwaddr), expire, lifetime, state) = (
        column("hwaddr"),
        column("expire"),
        column("valid_lifetime"),
        column("state"),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, line) in lines {
        // Kea escapes commas inside a field (`&#x2c`), so a plain split
        // gives the columns.
        let fields: Vec<&str> = line.trim().split(',').collect();
        let field = |at: Option<usize>| at.and_then(|at| fields.get(at)).copied();
        if field(state) == Some(KEA_STATE_DECLINED) {
            continue;
        }
        let Some(mac) = field(Some(hwaddr)).and_then(strict_mac) else {
            continue;
        };
        let number = |at| field(at).and_then(|f| f.parse::<u64>().ok());
        let key = match (number(expire), number(lifetime)) {
            (Some(expire), Some(lifetime)) => format!("{:020}", expire.saturating_sub(lifetime)),
            _ => "~".to_string(),
        };
        out.push((key, i + 1, mac));
    }
    out
}

/// The MACs in one file, in the order they were first seen there.
pub fn scan(name: &str, text: &str) -> Vec<Sighting> {
    scan_as(name, text, detect(text))
}

/// The MACs in one file read as `kind`, in the order they were first seen
/// there.
pub fn scan_as(name: &str, text: &str, kind: FileKind) -> Vec<Sighting> {
    // (sort key, line, mac); the key orders leases files by time.
    let mut seen: Vec<(String, usize, Mac)> = Vec::new();
    match kind {
        FileKind::KeaLeases => seen = kea_leases(text),
        FileKind::IscLeases => {
            let mut start: Option<(usize, String, Option<Mac>)> = None;
            for (i, line) in text.lines().enumerate() {
                let l = line.trim().trim_end_matches(';');
                if l.starts_with("lease ") && l.ends_with('{') {
                    start = Some((i + 1, "~".to_string(), None));
                } else if l == "}" {
                    if let Some((line_no, key, Some(mac))) = start.take() {
                        seen.push((key, line_no, mac));
                    }
                } else if let Some((_, key, mac)) = start.as_mut() {
                    if let Some(rest) = l.strip_prefix("starts ") {
                        *key = isc_time(rest).unwrap_or_else(|| "~".into());
                    } else if let Some(rest) = l.strip_prefix("hardware ethernet ") {
                        *mac = strict_mac(rest.trim());
                    }
                }
            }
        }
        FileKind::DnsmasqLeases => {
            for (i, line) in text.lines().enumerate() {
                if let Some((expiry, mac)) = dnsmasq_lease(line.trim()) {
                    seen.push((format!("{expiry:020}"), i + 1, mac));
                }
            }
        }
        FileKind::Syslog => {
            for (i, line) in text.lines().enumerate() {
                let mut tokens = line.split_whitespace();
                if tokens
                    .by_ref()
                    .any(|t| t.starts_with("DHCPDISCOVER") || t.starts_with("DHCPREQUEST"))
                {
                    if let Some(mac) = tokens.find_map(strict_mac) {
                        seen.push((String::new(), i + 1, mac));
                    }
                }
            }
        }
    }
    seen.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut unique = HashSet::new();
    seen.into_iter()
        .filter(|(_, _, mac)| unique.insert(*mac))
        .map(|(_, line, mac)| Sighting {
            mac,
            origin: format!("{name}:{line}"),
        })
        .collect()
}

/// `starts 3 2026/11/25 10:00:01` or `starts epoch 1764064801` as a sortable
/// RFC 3339 string.
fn isc_time(rest: &str) -> Option<String> {
    let f: Vec<&str> = rest.split_whitespace().collect();
    match f.as_slice() {
        ["epoch", secs] => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.parse().ok()?);
            Some(humantime::format_rfc3339_seconds(t).to_string())
        }
        [_weekday, date, time] => {
            let date = date.replace('/', "-");
            Some(
                humantime::parse_rfc3339(&format!("{date}T{time}Z"))
                    .ok()
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())?,
            )
        }
        _ => None,
    }
}

/// MACs across files (in the order given), each at its first sighting.
pub fn harvest(files: &[(String, String)]) -> Vec<Sighting> {
    harvest_as(files, None)
}

/// MACs across files (in the order given), each at its first sighting,
/// every file read as `kind`, or as detected when `None`.
pub fn harvest_as(files: &[(String, String)], kind: Option<FileKind>) -> Vec<Sighting> {
    let mut unique = HashSet::new();
    files
        .iter()
        .flat_map(|(name, text)| scan_as(name, text, kind.unwrap_or_else(|| detect(text))))
        .filter(|s| unique.insert(s.mac))
        .collect()
}

/// The widest zero padding a name pattern may ask for: the digits of the
/// largest number.
const MAX_PATTERN_WIDTH: usize = 20;

/// A name pattern such as `node{:03}` (zero-padded to 3) or `n{}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    prefix: String,
    width: usize,
    suffix: String,
}

impl NamePattern {
    /// Parses `prefix{}suffix` or `prefix{:0N}suffix`.
    pub fn parse(s: &str) -> Result<NamePattern, String> {
        let err = || {
            format!("bad --pattern `{s}`: write one placeholder, like node{{:03}} (zero-padded) or node{{}}")
        };
        let open = s.find('{').ok_or_else(err)?;
        let close = open + s[open..].find('}').ok_or_else(err)?;
        let spec = &s[open + 1..close];
        let width: usize = match spec {
            "" => 0,
            _ => spec
                .strip_prefix(":0")
                .and_then(|w| w.parse().ok())
                .ok_or_else(err)?,
        };
        // A number has at most 20 digits; a wider padding would only make
        // names nobody wants (and a huge one, a huge allocation).
        if width > MAX_PATTERN_WIDTH {
            return Err(format!(
                "bad --pattern `{s}`: pad numbers to at most {MAX_PATTERN_WIDTH} digits, like node{{:03}}"
            ));
        }
        let (prefix, suffix) = (&s[..open], &s[close + 1..]);
        if suffix.contains(['{', '}']) || prefix.contains('}') {
            return Err(err());
        }
        Ok(NamePattern {
            prefix: prefix.to_string(),
            width,
            suffix: suffix.to_string(),
        })
    }

    /// The name for number `n`.
    pub fn name(&self, n: u64) -> String {
        format!("{}{:0w$}{}", self.prefix, n, self.suffix, w = self.width)
    }
}

/// A harvested machine, ready for the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNode {
    /// Its name from the pattern.
    pub name: String,
    /// Its MAC.
    pub mac: Mac,
    /// Its IP from the base.
    pub ip: Ipv4Addr,
    /// Where the MAC was first seen.
    pub origin: String,
}

/// Names and addresses the sightings. Number `start` gets `ip_base`, and
/// each next number the next IP. With an inventory, MACs it already has are
/// skipped, and numbers whose name or IP it already uses are passed over.
pub fn assign(
    sightings: &[Sighting],
    pattern: &NamePattern,
    ip_base: Ipv4Addr,
    start: u64,
    inventory: Option<&Inventory>,
) -> Result<Vec<NewNode>, String> {
    let mut out = Vec::new();
    let mut n = start;
    for s in sightings {
        if inventory.is_some_and(|inv| inv.node_by_mac(&s.mac).is_some()) {
            continue;
        }
        loop {
            let ip = u32::from(ip_base)
                .checked_add(u32::try_from(n - start).map_err(|_| "too many nodes".to_string())?)
                .map(Ipv4Addr::from)
                .ok_or_else(|| format!("--ip-base {ip_base} runs past 255.255.255.255"))?;
            let name = pattern.name(n);
            n += 1;
            if let Some(inv) = inventory {
                if inv.node(&name).is_some() || inv.node_by_ip(ip).is_some() {
                    continue;
                }
                if !inv.network.contains(ip) {
                    return Err(format!(
                        "{ip} for {name} is outside the subnet {} of {}; choose another --ip-base",
                        inv.network,
                        inv.path.display()
                    ));
                }
            }
            out.push(NewNode {
                name,
                mac: s.mac,
                ip,
                origin: s.origin.clone(),
            });
            break;
        }
    }
    Ok(out)
}

/// The `[[node]]` blocks for `nodes`, to append to an inventory.
pub fn to_toml(nodes: &[NewNode]) -> String {
    let mut out = format!(
        "# {} machine(s) harvested by `ka dhcp harvest`, in the order first seen.\n",
        nodes.len()
    );
    for n in nodes {
        write!(
            out,
            "\n[[node]]\nname = \"{}\"\nmac = \"{}\"\nip = \"{}\"\n# first seen: {}\n",
            n.name, n.mac, n.ip, n.origin
        )
        .unwrap();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn macs(s: &[Sighting]) -> Vec<String> {
        s.iter().map(|s| s.mac.to_string()).collect()
    }

    #[test]
    fn isc_leases_are_ordered_by_start_time() {
        let text = "\
# The format of this file is documented in the dhcpd.leases(5) manual page.
lease 10.0.0.12 {
  starts 3 2026/11/25 10:00:05;
  hardware ethernet 52:54:00:00:00:02;
}
lease 10.0.0.11 {
  starts 3 2026/11/25 10:00:01;
  hardware ethernet 52:54:00:00:00:01;
}
lease 10.0.0.13 {
  starts epoch 1795600810;
  hardware ethernet 52:54:00:00:00:03;
}
";
        assert_eq!(detect(text), FileKind::IscLeases);
        let s = scan("dhcpd.leases", text);
        assert_eq!(
            macs(&s),
            [
                "52:54:00:00:00:01",
                "52:54:00:00:00:02",
                "52:54:00:00:00:03"
            ]
        );
        assert_eq!(s[0].origin, "dhcpd.leases:6");
    }

    #[test]
    fn dnsmasq_leases_and_syslog() {
        let leases = "1764068400 52:54:00:00:00:0b 10.0.0.51 * 01:52:54:00:00:00:0b\n\
                      1764068300 52:54:00:00:00:0a 10.0.0.50 n1 *\n";
        assert_eq!(detect(leases), FileKind::DnsmasqLeases);
        assert_eq!(
            macs(&scan("l", leases)),
            ["52:54:00:00:00:0a", "52:54:00:00:00:0b"]
        );
        let log = "\
Nov 25 10:00:01 boot dnsmasq-dhcp[99]: 1234567 DHCPDISCOVER(br0) 52:54:00:00:00:0c
Nov 25 10:00:01 boot dnsmasq-dhcp[99]: 1234567 DHCPOFFER(br0) 10.0.0.52 52:54:00:00:00:0c
Nov 25 10:00:02 boot dhcpd[7]: DHCPREQUEST for 10.0.0.9 from 52:54:00:00:00:0d (h) via eth0
Nov 25 10:00:03 boot dnsmasq-dhcp[99]: DHCPREQUEST(br0) 10.0.0.52 52:54:00:00:00:0c
Nov 25 10:00:04 boot sshd[3]: Accepted key for root from 10.0.0.2
";
        assert_eq!(detect(log), FileKind::Syslog);
        let s = scan("syslog", log);
        assert_eq!(macs(&s), ["52:54:00:00:00:0c", "52:54:00:00:00:0d"]);
        assert_eq!(s[1].origin, "syslog:3");
    }

    /// A Kea 2.2 `kea-leases4.csv`, header as Kea writes it: three
    /// machines, one lease renewed (a second row), one address declined,
    /// one lease expired and reclaimed; the cleanup (kea-lfc) has put the
    /// rows in address order.
    const KEA: &str = "\
address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context
10.9.0.150,52:54:00:aa:00:03,01:52:54:00:aa:00:03,4000,1795604030,1,0,0,,0,
10.9.0.151,52:54:00:aa:00:01,,4000,1795604010,1,0,0,node-a,0,{ \"ISC\": { \"client-classes\": [ \"ALL\"&#x2c \"KNOWN\" ] } }
10.9.0.152,,,4000,1795604020,1,0,0,,1,
10.9.0.153,52:54:00:aa:00:02,,0,1795600020,1,0,0,,2,
10.9.0.151,52:54:00:aa:00:01,,4000,1795606010,1,0,0,node-a,0,
";

    #[test]
    fn kea_leases_are_ordered_by_start_and_declined_ones_skipped() {
        assert_eq!(detect(KEA), FileKind::KeaLeases);
        let s = scan("kea-leases4.csv", KEA);
        assert_eq!(
            macs(&s),
            [
                "52:54:00:aa:00:01",
                "52:54:00:aa:00:02",
                "52:54:00:aa:00:03"
            ]
        );
        // The first row of the renewed lease, not the renewal.
        assert_eq!(s[0].origin, "kea-leases4.csv:3");
        assert_eq!(s[1].origin, "kea-leases4.csv:5");
        // A declined lease that kept its hardware address is still skipped.
        let declined = "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context,pool_id\n\
                        10.9.0.160,52:54:00:aa:00:09,,86400,1795690400,1,0,0,,1,,0\n";
        assert_eq!(detect(declined), FileKind::KeaLeases);
        assert!(scan("k", declined).is_empty());
        // DHCPv6: the hardware address is a later column.
        let v6 = "address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,fqdn_fwd,fqdn_rev,hostname,hwaddr,state,user_context\n\
                  2001:db8::10,00:03:00:01:52:54:00:aa:00:04,4000,1795604000,1,3000,0,1,128,0,0,,52:54:00:aa:00:04,0,\n";
        assert_eq!(macs(&scan("k6", v6)), ["52:54:00:aa:00:04"]);
    }

    #[test]
    fn a_forced_format_overrides_detection() {
        let files = [("k".to_string(), KEA.to_string())];
        assert_eq!(
            harvest_as(&files, Some(FileKind::KeaLeases)),
            harvest(&files)
        );
        // Read as another kind, a Kea file yields nothing.
        assert!(harvest_as(&files, Some(FileKind::DnsmasqLeases)).is_empty());
        assert!(harvest_as(&files, Some(FileKind::IscLeases)).is_empty());
        // And a dnsmasq leases file, forced to be syslog, no MAC either.
        let leases = [(
            "l".to_string(),
            "1764068300 52:54:00:00:00:0a 10.0.0.50 n1 *\n".to_string(),
        )];
        assert_eq!(harvest(&leases).len(), 1);
        assert!(harvest_as(&leases, Some(FileKind::Syslog)).is_empty());
    }

    #[test]
    fn patterns() {
        assert_eq!(NamePattern::parse("node{:03}").unwrap().name(7), "node007");
        assert_eq!(NamePattern::parse("n{}-a").unwrap().name(12), "n12-a");
        assert!(NamePattern::parse("node").is_err());
        assert!(NamePattern::parse("node{:3}").is_err());
    }

    #[test]
    fn a_pattern_padding_past_twenty_digits_is_refused_not_allocated() {
        let p = NamePattern::parse("n{:020}").unwrap();
        assert_eq!(p.name(u64::MAX), "n18446744073709551615");
        let err = NamePattern::parse("node{:099999999999}").unwrap_err();
        assert!(err.contains("at most 20 digits"), "{err}");
    }

    #[test]
    fn assign_counts_up_and_skips_what_the_inventory_has() {
        let inv = Inventory::parse(
            r#"
[network]
subnet = "10.0.0.0/24"
[boot]
server = "10.0.0.1"
tftp_root = "/t"
kernel = "k"
initramfs = "i"
[session]
name = "s"
source = "10.0.0.1:4000"
disk = "/dev/vda"
[[node]]
name = "node001"
mac = "52:54:00:00:00:01"
ip = "10.0.0.101"
"#,
            std::path::Path::new("c.toml"),
        )
        .unwrap();
        let sightings: Vec<Sighting> = [
            "52:54:00:00:00:09",
            "52:54:00:00:00:01",
            "52:54:00:00:00:05",
        ]
        .iter()
        .map(|m| Sighting {
            mac: m.parse().unwrap(),
            origin: "x:1".into(),
        })
        .collect();
        let p = NamePattern::parse("node{:03}").unwrap();
        let base: Ipv4Addr = "10.0.0.101".parse().unwrap();
        let got = assign(&sightings, &p, base, 1, Some(&inv)).unwrap();
        let pairs: Vec<(String, String, String)> = got
            .iter()
            .map(|n| (n.name.clone(), n.mac.to_string(), n.ip.to_string()))
            .collect();
        assert_eq!(
            pairs,
            [
                (
                    "node002".into(),
                    "52:54:00:00:00:09".into(),
                    "10.0.0.102".into()
                ),
                (
                    "node003".into(),
                    "52:54:00:00:00:05".into(),
                    "10.0.0.103".into()
                ),
            ]
        );
        let toml = to_toml(&got);
        assert!(
            toml.contains(
                "[[node]]\nname = \"node002\"\nmac = \"52:54:00:00:00:09\"\nip = \"10.0.0.102\"\n"
            ),
            "{toml}"
        );
        let far: Ipv4Addr = "10.0.1.1".parse().unwrap();
        assert!(assign(&sightings, &p, far, 1, Some(&inv))
            .unwrap_err()
            .contains("outside the subnet"));
    }
}
