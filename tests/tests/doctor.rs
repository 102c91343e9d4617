//! `ka doctor` against a real `ka tftp` (and `ka serve`) on loopback: a
//! healthy boot server passes every check, and each classic mistake is
//! caught with the hint that fixes it.
//!
//! The cluster lives on 127.0.0.0/24: the boot server and source are
//! 127.0.0.1, the nodes 127.0.0.11…, so ka doctor can also fetch a node's
//! key from that node's own address, as the node will.

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ka_bin::netboot::version::KaVersion;
use ka_tests::{ka, pseudo_random, read_text, stderr, stdout, write_secret, KaTftp, Proc};

const PXELINUX: &str = "/usr/lib/PXELINUX/pxelinux.0";
const SYSLINUX_BIOS: &str = "/usr/lib/syslinux/modules/bios";

/// A boot server's files: inventory, TFTP root, boot modes, secret, and
/// the DHCP configuration `ka dhcp config` writes for dnsmasq.
struct BootServer {
    dir: tempfile::TempDir,
    inventory: PathBuf,
    state: PathBuf,
    secret: PathBuf,
    dhcp: PathBuf,
    source_port: u16,
}

impl BootServer {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn new() -> BootServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A port for the source that nothing else holds now.
        let source_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let inventory = d.join("cluster.toml");
        fs::write(
            &inventory,
            format!(
                r#"[network]
subnet = "127.0.0.0/24"

[boot]
server = "127.0.0.1"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"

[session]
name = "doc"
source = "127.0.0.1:{source_port}"
disk = "/dev/vda"

[[range]]
names = "n[01-03]"
mac_base = "52:54:00:0d:00:01"
ip_base = "127.0.0.11"
"#
            ),
        )
        .unwrap();
        let root = d.join("root");
        fs::create_dir_all(root.join("ka")).unwrap();
        for (file, package) in [
            (PXELINUX.to_string(), "pxelinux"),
            (format!("{SYSLINUX_BIOS}/ldlinux.c32"), "syslinux-common"),
            (format!("{SYSLINUX_BIOS}/chain.c32"), "syslinux-common"),
            (format!("{SYSLINUX_BIOS}/libcom32.c32"), "syslinux-common"),
            (format!("{SYSLINUX_BIOS}/libutil.c32"), "syslinux-common"),
        ] {
            let name = Path::new(&file).file_name().unwrap();
            fs::copy(&file, root.join(name)).unwrap_or_else(|e| {
                panic!("{file}: {e}: install the Debian package `{package}` (scripts/apt-packages.txt)")
            });
        }
        fs::write(root.join("ipxe.efi"), pseudo_random(300_000, 4)).unwrap();
        fs::write(root.join("ka/vmlinuz"), pseudo_random(3 << 20, 1)).unwrap();
        fs::write(root.join("ka/initramfs.img"), pseudo_random(5 << 20, 2)).unwrap();
        // What ka netboot build writes beside the image.
        fs::write(
            root.join("ka/initramfs.img.version"),
            KaVersion::running().to_file(),
        )
        .unwrap();
        let state = d.join("state");
        let inv = inventory.to_str().unwrap();
        let o = ka(&[
            "pxe",
            "set",
            "-i",
            inv,
            "--state-dir",
            state.to_str().unwrap(),
            "--mode",
            "install",
            "--all",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let dhcp = d.join("dnsmasq.conf");
        let o = ka(&[
            "dhcp",
            "config",
            "-f",
            "dnsmasq",
            "-i",
            inv,
            "-o",
            dhcp.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let secret = d.join("secret");
        write_secret(&secret, 0xd0c);
        BootServer {
            dir,
            inventory,
            state,
            secret,
            dhcp,
            source_port,
        }
    }

    fn tftp(&self) -> KaTftp {
        KaTftp::start(
            &self.inventory,
            &self.state,
            &["--secret-file", self.secret.to_str().unwrap()],
        )
    }

    /// `ka serve` of this session on the inventory's source address,
    /// waiting for nodes (none come).
    fn serve(&self) -> Proc {
        let image = self.dir.path().join("image");
        fs::write(&image, pseudo_random(1 << 20, 9)).unwrap();
        let listen = format!("127.0.0.1:{}", self.source_port);
        let p = Proc::start(
            self.dir.path(),
            "serve",
            &[
                "serve",
                "--nodes",
                "3",
                "--session",
                "doc",
                "--listen",
                &listen,
                "--secret-file",
                self.secret.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
                "--state-dir",
                self.dir.path().join("serve-state").to_str().unwrap(),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !read_text(&p.err).contains(&listen) {
            assert!(
                Instant::now() < deadline,
                "ka serve did not start within 20 s: {}",
                read_text(&p.err)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Runs ka doctor against the TFTP server at `tftp`; returns its exit
    /// code and standard output.
    fn doctor(&self, tftp: std::net::SocketAddr, extra: &[&str]) -> (i32, String) {
        let tftp = tftp.to_string();
        let mut args = vec![
            "doctor",
            "-i",
            self.inventory.to_str().unwrap(),
            "--state-dir",
            self.state.to_str().unwrap(),
            "--tftp",
            &tftp,
            "--dhcp-config",
            self.dhcp.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let o = ka(&args);
        eprintln!("ka doctor took {:.2} s", t.elapsed().as_secs_f64());
        let out = stdout(&o);
        eprintln!("{out}{}", stderr(&o));
        (o.status.code().unwrap_or(-1), out)
    }
}

/// The output line that contains all of `words`, or a panic showing all.
fn line_with<'a>(out: &'a str, words: &[&str]) -> &'a str {
    out.lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no line with {words:?} in:\n{out}"))
}

#[test]
fn a_healthy_boot_server_passes_every_check() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let _serve = s.serve();
    let secret = s.secret.to_str().unwrap();
    let (code, out) = s.doctor(tftp.addr, &["--secret-file", secret]);
    for line in out.lines() {
        assert!(line.starts_with("✓ "), "not passed: {line}\n{out}");
    }
    assert_eq!(code, 0, "{out}");
    // Every file a node fetches was fetched, per node too.
    for file in [
        "pxelinux.0",
        "ldlinux.c32",
        "chain.c32",
        "ka/vmlinuz",
        "ka/initramfs.img",
        "ipxe.efi",
        "boot.ipxe",
    ] {
        line_with(&out, &["✓ TFTP", file]);
    }
    for n in ["n01", "n02", "n03"] {
        line_with(
            &out,
            &[
                n,
                "pxelinux.cfg/01-52-54-00-0d-00-0",
                "ipxe/52-54-00-0d-00-0",
            ],
        );
        line_with(&out, &[&format!("ka/keys/{n}.key served to its address")]);
    }
    line_with(&out, &["held by ka tftp"]);
    line_with(&out, &["next-server 127.0.0.1"]);
    line_with(&out, &["all 3 nodes have their inventory address"]);
    line_with(
        &out,
        &["netboot image carries", &KaVersion::running().to_string()],
    );
    line_with(&out, &["proves the key of session \"doc\""]);
}

#[test]
fn without_a_source_running_doctor_says_so_and_does_not_fail() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let (code, out) = s.doctor(tftp.addr, &[]);
    let line = line_with(&out, &["no ka serve is running there"]);
    assert!(line.starts_with("? "), "{line}");
    assert!(line.contains("ka serve -i"), "{line}");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_wrong_next_server_is_caught() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let conf = fs::read_to_string(&s.dhcp).unwrap();
    assert!(conf.contains(",,127.0.0.1\n"), "{conf}");
    fs::write(&s.dhcp, conf.replace(",,127.0.0.1\n", ",,127.0.0.9\n")).unwrap();
    let (code, out) = s.doctor(tftp.addr, &[]);
    let line = line_with(
        &out,
        &[
            "✗ DHCP",
            "next-server 127.0.0.9, not the TFTP server 127.0.0.1",
        ],
    );
    assert!(line.contains("set next-server 127.0.0.1"), "{line}");
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_missing_ldlinux_is_caught() {
    let s = BootServer::new();
    fs::remove_file(s.root().join("ldlinux.c32")).unwrap();
    let tftp = s.tftp();
    let (code, out) = s.doctor(tftp.addr, &[]);
    let line = line_with(&out, &["✗ TFTP ldlinux.c32"]);
    assert!(line.contains("TFTP error 1"), "{line}");
    assert!(
        line.contains(&format!(
            "put it at {}",
            s.root().join("ldlinux.c32").display()
        )) && line.contains("syslinux-common"),
        "{line}"
    );
    // The rest is still served and says so.
    line_with(&out, &["✓ TFTP pxelinux.0"]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_port_taken_by_another_server_is_caught() {
    let s = BootServer::new();
    // Another program holds the TFTP port: this test, answering nothing.
    let squatter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = squatter.local_addr().unwrap();
    let (code, out) = s.doctor(addr, &[]);
    let line = line_with(&out, &["✗ UDP port", "not ka tftp"]);
    assert!(
        line.contains(&format!("(pid {})", std::process::id())),
        "the holder is this test: {line}"
    );
    assert!(
        line.contains(&format!("kill {}", std::process::id())),
        "{line}"
    );
    assert!(line.contains(&format!("--listen {addr}")), "{line}");
    // And nothing is served.
    line_with(&out, &["✗ TFTP pxelinux.0", "no answer"]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_node_missing_from_the_dhcp_config_is_caught() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let conf = fs::read_to_string(&s.dhcp).unwrap();
    let entry = "dhcp-host=52:54:00:0d:00:02,127.0.0.12,n02\n";
    assert!(conf.contains(entry), "{conf}");
    fs::write(&s.dhcp, conf.replace(entry, "")).unwrap();
    let (code, out) = s.doctor(tftp.addr, &[]);
    let line = line_with(
        &out,
        &["✗ DHCP", "n02 (52:54:00:0d:00:02) has no host entry"],
    );
    assert!(line.contains("ka dhcp config"), "{line}");
    assert_eq!(out.matches("has no host entry").count(), 1, "{out}");
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_netboot_image_of_another_version_is_caught() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let old = KaVersion {
        version: "0.0.1".into(),
        protocol: KaVersion::running().protocol - 1,
    };
    fs::write(s.root().join("ka/initramfs.img.version"), old.to_file()).unwrap();
    let (code, out) = s.doctor(tftp.addr, &[]);
    let line = line_with(&out, &["✗ netboot image carries ka 0.0.1"]);
    assert!(line.contains("cannot talk"), "{line}");
    assert!(line.contains("ka netboot build --out"), "{line}");
    assert_eq!(code, 1, "{out}");
}

#[test]
fn a_source_of_another_secret_is_caught() {
    let s = BootServer::new();
    let tftp = s.tftp();
    let _serve = s.serve();
    let other = s.dir.path().join("other-secret");
    write_secret(&other, 0xbad);
    let (code, out) = s.doctor(tftp.addr, &["--secret-file", other.to_str().unwrap()]);
    line_with(&out, &["✓ source", "ka serve answers"]);
    let line = line_with(&out, &["✗ source", "does not prove the key"]);
    assert!(line.contains("--secret-file"), "{line}");
    assert_eq!(code, 1, "{out}");
}

#[test]
fn the_probe_reads_what_a_real_dnsmasq_offers() {
    use ka_tests::vmlab::{install_all, VmNet};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inventory = d.join("cluster.toml");
    fs::write(
        &inventory,
        r#"[network]
subnet = "10.78.0.0/24"
[boot]
server = "10.78.0.1"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
[session]
name = "probe"
source = "10.78.0.1:4715"
disk = "/dev/vda"
[[range]]
names = "p[1-2]"
mac_base = "52:54:00:4e:00:01"
ip_base = "10.78.0.11"
"#,
    )
    .unwrap();
    let state = d.join("state");
    let conf = d.join("dnsmasq.conf");
    install_all(&inventory, &state, &conf);

    // The lab's bridge holds the server's address; a veth pair leads to
    // a namespace of its own for the probe, where `v1` has no address, as
    // a booting node's NIC has none (so the DISCOVER leaves from 0.0.0.0).
    // Dropping each namespace deletes it and every device in it.
    let lab = VmNet::create("10.78.0.1/24", 0);
    let node = NodeNamespace::create();
    for args in [
        vec![
            "-n", &lab.ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ],
        vec!["-n", &lab.ns, "link", "set", "v1", "netns", &node.0],
        vec!["-n", &lab.ns, "link", "set", "v0", "master", "br0", "up"],
        vec!["-n", &node.0, "link", "set", "lo", "up"],
        vec!["-n", &node.0, "link", "set", "v1", "up"],
    ] {
        let o = ka_tests::run(
            std::process::Command::new(ka_tests::require_tool("ip", "iproute2")).args(&args),
            Duration::from_secs(20),
        );
        assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
    }
    let mut dhcp = lab.dnsmasq(&conf, d);
    dhcp.wait_for(Duration::from_secs(20), "dnsmasq to listen", |out, err| {
        format!("{out}{err}").contains("sockets bound exclusively to interface br0")
    });

    let mut doctor = std::process::Command::new(ka_tests::require_tool("ip", "iproute2"));
    doctor
        .args(["netns", "exec", &node.0])
        .arg(ka_tests::ka_bin())
        .args([
            "doctor",
            "-i",
            inventory.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--dhcp-config",
            conf.to_str().unwrap(),
            "--probe",
            "v1",
        ]);
    let t = Instant::now();
    let o = ka_tests::run(&mut doctor, Duration::from_secs(90));
    eprintln!("ka doctor --probe took {:.2} s", t.elapsed().as_secs_f64());
    let out = stdout(&o);
    let context = format!(
        "{out}{}\ndnsmasq:\n{}",
        stderr(&o),
        dhcp.out() + &dhcp.err()
    );
    eprintln!("{context}");
    for (kind, file) in [
        ("BIOS", "pxelinux.0"),
        ("UEFI", "ipxe.efi"),
        ("iPXE", "boot.ipxe"),
    ] {
        let want = format!(
            "✓ DHCP probe on v1: 10.78.0.1 offers {kind} client p1 (52:54:00:4e:00:01) 10.78.0.11, next-server 10.78.0.1, boot file {file}"
        );
        assert!(
            out.lines().any(|l| l == want),
            "no line {want:?} in:\n{context}"
        );
    }
    // No TFTP server answers in the probe's namespace: that fails.
    assert_eq!(o.status.code(), Some(1), "{context}");
}

/// The namespace the probe runs in, `kadoc-<pid>`, deleted (with its
/// devices) when dropped.
struct NodeNamespace(String);

impl NodeNamespace {
    fn create() -> NodeNamespace {
        let name = format!("kadoc-{}", std::process::id());
        let o = ka_tests::run(
            std::process::Command::new(ka_tests::require_tool("ip", "iproute2"))
                .args(["netns", "add", &name]),
            Duration::from_secs(20),
        );
        assert!(
            o.status.success(),
            "ip netns add {name} (needs root): {}",
            stderr(&o)
        );
        NodeNamespace(name)
    }
}

impl Drop for NodeNamespace {
    fn drop(&mut self) {
        let _ = ka_tests::run(
            std::process::Command::new("ip").args(["netns", "del", &self.0]),
            Duration::from_secs(20),
        );
    }
}
