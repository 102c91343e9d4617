//! `ka dhcp config` checked by the DHCP daemons themselves, and `ka dhcp
//! harvest` on realistic leases files and logs, and on the lease file a
//! real kea-dhcp4 writes for clients in network namespaces the test makes
//! (that one needs root).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ka_bin::boot::Inventory;
use ka_tests::{ka, require_tool, run, stderr, stdout, write_inventory};

fn example() -> String {
    format!(
        "{}/../docs/examples/cluster.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Writes the config for `format` and returns its text.
fn config(format: &str, inventory: &str, out: &Path) -> String {
    let o = ka(&[
        "dhcp",
        "config",
        "--format",
        format,
        "--inventory",
        inventory,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::read_to_string(out).unwrap()
}

/// Runs a daemon's config check; returns (success, output).
fn check(cmd: &mut Command) -> (bool, String) {
    let o = run(cmd, Duration::from_secs(60));
    (o.status.success(), format!("{}{}", stdout(&o), stderr(&o)))
}

fn isc_check(file: &Path) -> (bool, String) {
    check(
        Command::new(require_tool("dhcpd", "isc-dhcp-server"))
            .args(["-t", "-cf"])
            .arg(file),
    )
}

fn dnsmasq_check(file: &Path) -> (bool, String) {
    check(
        Command::new(require_tool("dnsmasq", "dnsmasq-base"))
            .arg("--test")
            .arg(format!("--conf-file={}", file.display())),
    )
}

fn kea_check(file: &Path) -> (bool, String) {
    check(
        Command::new(require_tool("kea-dhcp4", "kea-dhcp4-server"))
            .arg("-t")
            .arg(file),
    )
}

/// Each daemon accepts ka's config, and rejects it once broken — proof that
/// the check really reads the file.
#[test]
fn configs_pass_the_daemons_own_checks() {
    let dir = tempfile::tempdir().unwrap();
    let inv = example();
    type Checker = fn(&Path) -> (bool, String);
    let cases: [(&str, Checker, &str); 3] = [
        ("isc", isc_check, "host broken {"),
        ("dnsmasq", dnsmasq_check, "dhcp-host=zz:zz"),
        ("kea", kea_check, "}}"),
    ];
    for (format, checker, breakage) in cases {
        let file = dir.path().join(format!("{format}.conf"));
        let text = config(format, &inv, &file);
        let (ok, out) = checker(&file);
        assert!(
            ok,
            "{format} rejected ka's config:\n{out}\n--- config ---\n{text}"
        );
        fs::write(&file, format!("{text}\n{breakage}\n")).unwrap();
        let (ok, out) = checker(&file);
        assert!(!ok, "{format} accepted a broken config: {out}");
    }
}

#[test]
fn configs_carry_every_host_and_the_boot_files() {
    let dir = tempfile::tempdir().unwrap();
    let inv = Inventory::load(example()).unwrap();
    let isc = config("isc", &example(), &dir.path().join("i"));
    let dnsmasq = config("dnsmasq", &example(), &dir.path().join("d"));
    let kea: serde_json::Value =
        serde_json::from_str(&config("kea", &example(), &dir.path().join("k"))).unwrap();
    let reservations = kea["Dhcp4"]["subnet4"][0]["reservations"]
        .as_array()
        .unwrap();
    assert_eq!(reservations.len(), inv.nodes.len());
    for n in &inv.nodes {
        assert!(
            isc.contains(&format!(
                "host {} {{ hardware ethernet {}; fixed-address {};",
                n.name, n.mac, n.ip
            )),
            "{isc}"
        );
        assert!(
            dnsmasq.contains(&format!("dhcp-host={},{},{}\n", n.mac, n.ip, n.name)),
            "{dnsmasq}"
        );
        assert!(reservations
            .iter()
            .any(|r| r["hw-address"] == n.mac.to_string() && r["ip-address"] == n.ip.to_string()));
    }
    for file in ["pxelinux.0", "ipxe.efi", "boot.ipxe"] {
        assert!(
            isc.contains(&format!("filename \"{file}\"")),
            "{file} missing from ISC config"
        );
        assert!(
            dnsmasq.contains(&format!(",{file},,192.168.10.1")),
            "{file} missing from dnsmasq config"
        );
    }
    assert!(isc.contains("next-server 192.168.10.1;"));
    assert_eq!(kea["Dhcp4"]["subnet4"][0]["next-server"], "192.168.10.1");
}

const ISC_LEASES: &str = r#"# The format of this file is documented in the dhcpd.leases(5) manual page.
# This lease file was written by isc-dhcp-4.4.3-P1

# authoring-byte-order entry is generated, DO NOT DELETE
authoring-byte-order little-endian;

server-duid "\000\001\000\001,\331\2474RT\000\022\0044";

lease 10.9.0.152 {
  starts 3 2026/11/25 09:12:44;
  ends 3 2026/11/25 21:12:44;
  cltt 3 2026/11/25 09:12:44;
  binding state active;
  next binding state free;
  rewind binding state free;
  hardware ethernet 52:54:00:aa:00:02;
  uid "\001RT\000\252\000\002";
  client-hostname "localhost";
}
lease 10.9.0.151 {
  starts 3 2026/11/25 09:10:02;
  ends 3 2026/11/25 21:10:02;
  cltt 3 2026/11/25 09:10:02;
  binding state active;
  next binding state free;
  rewind binding state free;
  hardware ethernet 52:54:00:aa:00:01;
}
lease 10.9.0.152 {
  starts 3 2026/11/25 09:22:44;
  ends 3 2026/11/25 21:22:44;
  binding state active;
  hardware ethernet 52:54:00:aa:00:02;
}
lease 10.9.0.153 {
  starts 3 2026/11/25 09:15:30;
  ends 3 2026/11/25 21:15:30;
  binding state active;
  hardware ethernet 52:54:00:09:00:01;
}
"#;

const DNSMASQ_LEASES: &str = "\
1795608000 52:54:00:bb:00:02 10.9.0.162 * 01:52:54:00:bb:00:02
1795607000 52:54:00:bb:00:01 10.9.0.161 node-x 01:52:54:00:bb:00:01
";

const SYSLOG: &str = "\
Nov 25 09:30:01 boot systemd[1]: Started dnsmasq.service - dnsmasq - A lightweight DHCP and caching DNS server.
Nov 25 09:30:05 boot dnsmasq-dhcp[812]: 3170622585 available DHCP range: 10.9.0.100 -- 10.9.0.200
Nov 25 09:30:05 boot dnsmasq-dhcp[812]: 3170622585 DHCPDISCOVER(br0) 52:54:00:cc:00:01
Nov 25 09:30:05 boot dnsmasq-dhcp[812]: 3170622585 DHCPOFFER(br0) 10.9.0.171 52:54:00:cc:00:01
Nov 25 09:30:06 boot dnsmasq-dhcp[812]: DHCPREQUEST(br0) 10.9.0.171 52:54:00:cc:00:01
Nov 25 09:30:06 boot dnsmasq-dhcp[812]: DHCPACK(br0) 10.9.0.171 52:54:00:cc:00:01
Nov 25 09:31:12 boot dhcpd[901]: DHCPDISCOVER from 52:54:00:cc:00:02 via eth1
Nov 25 09:31:13 boot dhcpd[901]: DHCPOFFER on 10.9.0.172 to 52:54:00:cc:00:02 via eth1
Nov 25 09:31:13 boot dhcpd[901]: DHCPREQUEST for 10.9.0.172 (10.9.0.1) from 52:54:00:cc:00:02 via eth1
Nov 25 09:31:13 boot dhcpd[901]: DHCPACK on 10.9.0.172 to 52:54:00:cc:00:02 via eth1
Nov 25 09:32:40 boot dhcpd[901]: DHCPDISCOVER from 52:54:00:cc:00:03 (pxe-client) via eth1: network 10.9.0.0/24: no free leases
2026-11-25T09:33:02.123456+00:00 boot dhcpd[901]: DHCPREQUEST for 10.9.0.173 from 52:54:00:cc:00:04 via eth1
Nov 25 09:34:00 boot sshd[1200]: Accepted publickey for root from 10.9.0.2 port 50122 ssh2: RSA SHA256:x
";

#[test]
fn harvest_orders_macs_by_first_sighting_across_formats() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("dhcpd.leases", ISC_LEASES),
        ("dnsmasq.leases", DNSMASQ_LEASES),
        ("syslog", SYSLOG),
    ];
    let mut args = vec![
        "dhcp".to_string(),
        "harvest".into(),
        "--pattern".into(),
        "node{:03}".into(),
        "--ip-base".into(),
        "10.9.0.101".into(),
    ];
    for (name, text) in files {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        args.push(p.display().to_string());
    }
    let o = ka(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let macs: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("mac = \""))
        .map(|m| m.trim_end_matches('"'))
        .collect();
    assert_eq!(
        macs,
        [
            // dhcpd.leases by start time
            "52:54:00:aa:00:01",
            "52:54:00:aa:00:02",
            "52:54:00:09:00:01",
            // dnsmasq.leases by expiry
            "52:54:00:bb:00:01",
            "52:54:00:bb:00:02",
            // syslog in line order, DISCOVER and REQUEST only
            "52:54:00:cc:00:01",
            "52:54:00:cc:00:02",
            "52:54:00:cc:00:03",
            "52:54:00:cc:00:04",
        ],
        "{out}"
    );
    assert!(
        out.contains(
            "[[node]]\nname = \"node001\"\nmac = \"52:54:00:aa:00:01\"\nip = \"10.9.0.101\"\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("name = \"node009\"\nmac = \"52:54:00:cc:00:04\"\nip = \"10.9.0.109\"\n"),
        "{out}"
    );
}

#[test]
fn harvest_skips_known_macs_and_its_output_extends_the_inventory() {
    let dir = tempfile::tempdir().unwrap();
    // n01..n04 use 52:54:00:09:00:01.. and 10.9.0.11..14.
    let inv = write_inventory(dir.path(), "");
    let leases = dir.path().join("dhcpd.leases");
    fs::write(&leases, ISC_LEASES).unwrap();
    let o = ka(&[
        "dhcp",
        "harvest",
        "--inventory",
        inv.to_str().unwrap(),
        "--pattern",
        "n{:02}",
        "--ip-base",
        "10.9.0.11",
        leases.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        !out.contains("52:54:00:09:00:01"),
        "known MAC harvested again: {out}"
    );
    // Names and IPs already taken are passed over: n05 at 10.9.0.15 is next.
    assert!(
        out.contains("name = \"n05\"\nmac = \"52:54:00:aa:00:01\"\nip = \"10.9.0.15\""),
        "{out}"
    );
    assert!(
        out.contains("name = \"n06\"\nmac = \"52:54:00:aa:00:02\"\nip = \"10.9.0.16\""),
        "{out}"
    );
    // Appended to the inventory, the result loads and validates.
    let mut text = fs::read_to_string(&inv).unwrap();
    text.push('\n');
    text.push_str(&out);
    fs::write(&inv, text).unwrap();
    let loaded = Inventory::load(&inv).unwrap();
    assert_eq!(loaded.nodes.len(), 6);
    assert_eq!(
        loaded.node("n06").unwrap().mac.to_string(),
        "52:54:00:aa:00:02"
    );
}

#[test]
fn harvest_reads_standard_input() {
    let mut child = Command::new(ka_tests::ka_bin())
        .args(["dhcp", "harvest", "--ip-base", "10.0.0.5"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(SYSLOG.as_bytes())
        .unwrap();
    let mut guard = ka_tests::ChildGuard {
        child,
        what: "ka dhcp harvest".into(),
    };
    let status = ka_tests::wait_timeout(&mut guard.child, Duration::from_secs(30))
        .expect("harvest finished");
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(guard.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out.matches("[[node]]").count(), 4, "{out}");
    assert!(
        out.contains("name = \"node001\"\nmac = \"52:54:00:cc:00:01\"\nip = \"10.0.0.5\""),
        "{out}"
    );
}

/// `kea-leases4.csv` as Kea 2.2 (Debian 12) writes it: the header Kea's
/// memfile backend writes, a lease renewed (its second row), a declined
/// address (Kea blanks its hardware address), a lease expired and
/// reclaimed (state 2, kept with its MAC), a user context with the commas
/// Kea escapes. Rows in address order, as Kea's lease file cleanup leaves
/// them; the machines asked in the order dd:00:02, dd:00:01, dd:00:03.
const KEA_LEASES: &str = "\
address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context
10.9.0.150,52:54:00:dd:00:01,01:52:54:00:dd:00:01,4000,1795604020,1,0,0,,0,
10.9.0.151,52:54:00:dd:00:02,,4000,1795604010,1,0,0,n2,0,{ \"ISC\": { \"client-classes\": [ \"ALL\"&#x2c \"KNOWN\" ] } }
10.9.0.152,,,4000,1795604015,1,0,0,,1,
10.9.0.153,52:54:00:dd:00:03,,4000,1795604030,1,0,0,,2,
10.9.0.150,52:54:00:dd:00:01,01:52:54:00:dd:00:01,4000,1795606020,1,0,0,,0,
";

fn harvested_macs(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("mac = \""))
        .map(|m| m.trim_end_matches('"').to_string())
        .collect()
}

#[test]
fn harvest_reads_kea_leases_detected_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("kea-leases4.csv");
    fs::write(&leases, KEA_LEASES).unwrap();
    for format in [None, Some("kea")] {
        let mut args = vec!["dhcp", "harvest", "--ip-base", "10.9.0.101"];
        if let Some(f) = format {
            args.extend(["--format", f]);
        }
        args.push(leases.to_str().unwrap());
        let o = ka(&args);
        assert!(o.status.success(), "{format:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(
            harvested_macs(&out),
            [
                "52:54:00:dd:00:02",
                "52:54:00:dd:00:01",
                "52:54:00:dd:00:03"
            ],
            "{format:?}: {out}"
        );
        assert!(
            out.contains("name = \"node001\"\nmac = \"52:54:00:dd:00:02\"\nip = \"10.9.0.101\"\n# first seen: ")
                && out.contains("kea-leases4.csv:3\n"),
            "{out}"
        );
        assert!(
            stderr(&o).contains("3 MAC(s) seen, 3 new"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn harvest_with_no_mac_fails_and_says_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    // A lease file with nothing but a declined address, and a log with no
    // DHCP lines.
    let header = KEA_LEASES.lines().next().unwrap();
    let kea = dir.path().join("kea-leases4.csv");
    fs::write(
        &kea,
        format!("{header}\n10.9.0.152,,,4000,1795604015,1,0,0,,1,\n"),
    )
    .unwrap();
    let log = dir.path().join("syslog");
    fs::write(
        &log,
        "Nov 25 09:34:00 boot sshd[1200]: Accepted publickey for root\n",
    )
    .unwrap();
    let o = ka(&[
        "dhcp",
        "harvest",
        "--ip-base",
        "10.9.0.101",
        kea.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stdout(&o).is_empty(),
        "no [[node]] output expected: {}",
        stdout(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "no MAC address found in {} (read as Kea leases), {} (read as syslog lines)",
            kea.display(),
            log.display()
        )) && err.contains("--format"),
        "{err}"
    );

    // The MACs a Kea file holds are not found when it is read as another
    // format; named, the format is in the message.
    let full = dir.path().join("leases.csv");
    fs::write(&full, KEA_LEASES).unwrap();
    let o = ka(&[
        "dhcp",
        "harvest",
        "--ip-base",
        "10.9.0.101",
        "--format",
        "dnsmasq",
        full.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(read as dnsmasq leases)"),
        "{}",
        stderr(&o)
    );
}

/// Two network namespaces joined by a veth pair, deleted by name when
/// dropped (whatever still runs inside them is the test's own child, which
/// its guard kills first).
struct NetnsPair {
    ip: std::path::PathBuf,
    names: [String; 2],
}

impl NetnsPair {
    fn new(ip: std::path::PathBuf, tag: &str) -> NetnsPair {
        let pid = std::process::id();
        let pair = NetnsPair {
            ip,
            names: [format!("ka-{tag}-srv-{pid}"), format!("ka-{tag}-cli-{pid}")],
        };
        for n in &pair.names {
            pair.ip(&["netns", "add", n]);
        }
        pair
    }

    fn ip(&self, args: &[&str]) {
        let o = run(Command::new(&self.ip).args(args), Duration::from_secs(10));
        assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new(&self.ip).args(["netns", "del", n]).status();
        }
    }
}

/// The MACs Kea's lease file holds after real kea-dhcp4 handed leases to
/// three machines (busybox udhcpc in a network namespace, its MAC changed
/// between runs), in the order they asked.
#[test]
fn harvest_reads_the_lease_file_a_real_kea_writes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs kea-dhcp4 in network namespaces it creates: run it as root"
    );
    let ip = require_tool("ip", "iproute2");
    let kea = require_tool("kea-dhcp4", "kea-dhcp4-server");
    let busybox = require_tool("busybox", "busybox-static");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = NetnsPair::new(ip, "kea");
    let (srv, cli) = (ns.names[0].as_str(), ns.names[1].as_str());
    ns.ip(&[
        "-n", srv, "link", "add", "kea0", "type", "veth", "peer", "name", "cli0", "netns", cli,
    ]);
    ns.ip(&["-n", srv, "addr", "add", "10.99.0.1/24", "dev", "kea0"]);
    ns.ip(&["-n", srv, "link", "set", "kea0", "up"]);
    ns.ip(&["-n", srv, "link", "set", "lo", "up"]);
    // The link has its carrier before Kea starts: Kea opens no socket on
    // an interface that is not running.
    ns.ip(&["-n", cli, "link", "set", "cli0", "up"]);

    let leases = d.join("kea-leases4.csv");
    let config = d.join("kea-dhcp4.conf");
    fs::write(
        &config,
        format!(
            r#"{{ "Dhcp4": {{
  "interfaces-config": {{ "interfaces": [ "kea0" ], "dhcp-socket-type": "raw" }},
  "lease-database": {{ "type": "memfile", "name": "{}", "lfc-interval": 0 }},
  "valid-lifetime": 4000,
  "subnet4": [ {{ "id": 1, "subnet": "10.99.0.0/24",
                  "pools": [ {{ "pool": "10.99.0.100 - 10.99.0.200" }} ] }} ],
  "loggers": [ {{ "name": "kea-dhcp4", "severity": "INFO",
                  "output_options": [ {{ "output": "{}" }} ] }} ]
}} }}"#,
            leases.display(),
            d.join("kea.log").display()
        ),
    )
    .unwrap();
    let server = Command::new("ip")
        .args(["netns", "exec", srv])
        .arg(&kea)
        .arg("-c")
        .arg(&config)
        .env("KEA_LOCKFILE_DIR", d)
        .env("KEA_PIDFILE_DIR", d)
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(d.join("kea.out")).unwrap())
        .stderr(fs::File::create(d.join("kea.err")).unwrap())
        .spawn()
        .unwrap();
    let _server = ka_tests::ChildGuard {
        child: server,
        what: "kea-dhcp4".into(),
    };
    let kea_said = || {
        format!(
            "{}{}",
            fs::read_to_string(d.join("kea.err")).unwrap_or_default(),
            fs::read_to_string(d.join("kea.log")).unwrap_or_default()
        )
    };

    let started = std::time::Instant::now();
    while !kea_said().contains("DHCP4_STARTED") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kea-dhcp4 did not start within 30 s: {}",
            kea_said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let order = [
        "52:54:00:ee:00:03",
        "52:54:00:ee:00:01",
        "52:54:00:ee:00:02",
    ];
    for mac in order {
        ns.ip(&["-n", cli, "link", "set", "cli0", "down"]);
        ns.ip(&["-n", cli, "link", "set", "cli0", "address", mac]);
        ns.ip(&["-n", cli, "link", "set", "cli0", "up"]);
        // udhcpc tries for up to 20 s.
        let o = run(
            Command::new("ip")
                .args(["netns", "exec", cli])
                .arg(&busybox)
                .args([
                    "udhcpc", "-i", "cli0", "-n", "-q", "-f", "-t", "20", "-T", "1",
                ])
                .args(["-s", "/bin/true"]),
            Duration::from_secs(40),
        );
        assert!(
            o.status.success(),
            "{mac} got no lease from kea-dhcp4: {}{}\nkea: {}",
            stdout(&o),
            stderr(&o),
            kea_said()
        );
    }
    let text = fs::read_to_string(&leases).unwrap();
    // The sample the other tests read has Kea's header (later Kea versions
    // add columns at the end).
    let sample_header = KEA_LEASES.lines().next().unwrap();
    assert!(text.starts_with(sample_header), "{text}");
    let o = ka(&[
        "dhcp",
        "harvest",
        "--ip-base",
        "10.99.0.11",
        leases.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}\n{text}", stderr(&o));
    assert_eq!(harvested_macs(&stdout(&o)), order, "{text}");
}
