//! The whole original job on machines no one here wrote: a real Debian
//! system, running and being written to, is cloned file by file onto two
//! virtual machines with empty disks — one booting by BIOS, one by UEFI,
//! one disk larger than the source's — which then boot the clone with
//! systemd and say who they are.
//!
//! - The source's disk is built from Debian's packages by
//!   `scripts/debian-vm-image` (mmdebstrap; GPT with a BIOS boot partition,
//!   an ESP, ext4 root, swap and ext4 /home; GRUB for BIOS and UEFI),
//!   cached under target/ka-debian by its recipe. The source VM boots it
//!   from its own disk (SeaBIOS, GRUB) with the writes kept in QEMU's
//!   snapshot file, so the cached image stays as built.
//! - Once up, the source runs `ka serve --system` on its own live root
//!   (the image's `ka-lab-source` unit runs `source.sh` from a 9p share the
//!   test fills: the release `ka`, the secret, the inventory, the boot-state
//!   directory) while a loop keeps writing to its root.
//! - The nodes PXE-boot against dnsmasq (configured by `ka dhcp config`)
//!   and `ka tftp` on the host side of the lab's bridge: the BIOS node
//!   through SeaBIOS and the iPXE ROM; the UEFI node with Secure Boot on
//!   (OVMF with Microsoft's keys) through OVMF's own network stack,
//!   Debian's signed shim and Debian's signed GRUB network image, reading
//!   the GRUB config `ka tftp` generates for it. Both boot the netboot image with
//!   `ka.clone=system`, partition, make file systems, unpack, install GRUB
//!   from the clone, get their identity, are flipped to local boot by the
//!   source (through the shared boot-state directory `ka tftp` reads), and
//!   reboot.
//! - Booted from their own disks (the UEFI node still under Secure Boot:
//!   the network GRUB chain-loads the disk's signed GRUB, which boots the
//!   clone's signed kernel), each node's systemd reaches multi-user
//!   and the image's `ka-lab-marker` unit prints the host name, the root
//!   file system's UUID and the machine-id on the serial console, which the
//!   test checks: the node's own name, the source's root UUID, a machine-id
//!   of its own.
//!
//! Needs root, the Debian packages in scripts/apt-packages.txt, a Debian
//! mirror (for the image's first build) and `scripts/fetch-kernel`'s kernel.
//! Every VM and daemon is killed by PID, the namespace deleted and the
//! temporary directory removed, however the test ends.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ka_bin::boot::{BootState, Mode};
use ka_tests::system::partition_table;
use ka_tests::vmlab::{
    self, check, shows, wait_all_exit, BootFrom, Daemon, Firmware, Vm, VmNet, VmSpec,
};
use ka_tests::{ka_bin, run, stderr, stdout};

/// The host's address on the lab's bridge: DHCP and TFTP.
const SERVER: &str = "10.77.0.1";
/// The source VM's address (set by `source.sh`).
const SOURCE_IP: &str = "10.77.0.2";
const SOURCE_MAC: &str = "52:54:00:77:00:02";
/// The marker the image's `ka-lab-marker` unit prints once multi-user.
const MARKER: &str = "KA-LAB-BOOTED";
/// The 9p mount tag the image's `ka-lab-source` unit looks for.
const SHARE_TAG: &str = "kalab";

/// One node: how it boots and how large its disk is.
struct Node {
    name: &'static str,
    mac: &'static str,
    ip: &'static str,
    uefi: bool,
    /// Secure Boot on (UEFI only): the node boots Debian's signed shim and
    /// GRUB network image, then its clone through the same signed chain.
    secure_boot: bool,
    /// Its disk's size over the source's.
    extra_mib: u64,
    /// Its own kernel arguments for the netboot image.
    kernel_args: &'static str,
}

const NODES: [Node; 2] = [
    Node {
        name: "vm1",
        mac: "52:54:00:77:00:11",
        ip: "10.77.0.11",
        uefi: false,
        secure_boot: false,
        extra_mib: 0,
        kernel_args: "",
    },
    Node {
        name: "vm2",
        mac: "52:54:00:77:00:12",
        ip: "10.77.0.12",
        uefi: true,
        secure_boot: true,
        extra_mib: 512,
        // The kernel says it runs under Secure Boot at the info level,
        // which the cluster's `quiet` hides.
        kernel_args: "loglevel=7",
    },
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The source's disk image as `scripts/debian-vm-image` built it, and the
/// identities it was given.
struct Image {
    disk: PathBuf,
    root_uuid: String,
    machine_id: String,
}

/// Builds the Debian image, or finds it in the cache.
fn debian_image() -> Image {
    let o = run(
        &mut Command::new(repo().join("scripts/debian-vm-image")),
        Duration::from_secs(1200),
    );
    check(&o, "scripts/debian-vm-image");
    let out = stdout(&o);
    let dir = PathBuf::from(out.lines().last().expect("the image directory").trim());
    let env = fs::read_to_string(dir.join("image.env")).unwrap();
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} not in {}/image.env", dir.display()))
            .to_string()
    };
    Image {
        disk: dir.join("disk.img"),
        root_uuid: get("ROOT_UUID"),
        machine_id: get("MACHINE_ID"),
    }
}

fn inventory(share: &Path) -> PathBuf {
    let mut text = format!(
        r#"[network]
subnet = "10.77.0.0/24"
gateway = "{SERVER}"
dns = ["{SERVER}"]
domain = "lab.test"

[boot]
server = "{SERVER}"
tftp_root = "tftp"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
console = "ttyS0,115200"
kernel_args = "quiet ka.fail_delay=never"
# UEFI nodes boot Debian's signed shim, which loads Debian's signed GRUB
# network image (grubx64.efi): Secure Boot without keys of our own.
uefi_boot_file = "shimx64.efi"

[session]
name = "sys"
source = "{SOURCE_IP}:4715"
disk = "/dev/vda"
clone = "system"
"#
    );
    for n in &NODES {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{}\"\nmac = \"{}\"\nip = \"{}\"\nkernel_args = \"{}\"\n",
            n.name, n.mac, n.ip, n.kernel_args
        ));
    }
    let path = share.join("cluster.toml");
    fs::write(&path, text).unwrap();
    path
}

/// What the source VM runs once it is up (from the 9p share, mounted at
/// /run/kalab): takes its address, copies ka into its root, starts a
/// writer on its root, and serves itself to the nodes. Everything it says
/// goes to the serial console; ka's output goes to files in the share.
fn source_script() -> String {
    let nodes = NODES.len();
    format!(
        r#"#!/bin/sh
# Written by tests/tests/system_vms.rs.
set -u
say() {{ echo "ka-lab-source: $*"; }}
install -m 0755 /run/kalab/ka /usr/local/bin/ka
for n in /sys/class/net/*; do
  [ "$(cat "$n/address")" = "{SOURCE_MAC}" ] && nic=$(basename "$n")
done
ip link set "$nic" up
ip addr add {SOURCE_IP}/24 dev "$nic"
say "address {SOURCE_IP} on $nic"
# Something writes to the root all along the clone.
( i=0; while :; do
    i=$((i + 1))
    echo "write $i $(date +%s.%N)" >> /var/log/ka-lab-churn.log
    head -c 262144 /dev/urandom > /root/churn.bin
    sleep 0.2
  done ) &
writer=$!
sleep 1
say "KA-LAB-CHURN before=$(wc -l < /var/log/ka-lab-churn.log)"
/usr/local/bin/ka serve --system --nodes {nodes} --session sys \
  --listen {SOURCE_IP}:4715 --secret-file /run/kalab/secret \
  --inventory /run/kalab/cluster.toml --boot-state /run/kalab/state \
  --dead-after 30s --json \
  --post-command 'systemctl disable ka-lab-source.service' \
  > /run/kalab/serve.json 2> /run/kalab/serve.err
status=$?
say "KA-LAB-CHURN after=$(wc -l < /var/log/ka-lab-churn.log)"
kill $writer
say "KA-LAB-SOURCE-DONE status=$status"
"#
    )
}

/// A field `key=value` of the marker line on `console` for `host`.
fn marker_fields(console: &str, host: &str) -> Option<Vec<(String, String)>> {
    let line = console
        .lines()
        .find(|l| l.contains(MARKER) && l.contains(&format!("host={host} ")))?;
    let rest = &line[line.find(MARKER)? + MARKER.len()..];
    rest.contains(" end").then(|| {
        rest.split_whitespace()
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// Waits until `vm`'s console shows `host`'s marker; returns its fields.
fn wait_marker(
    vm: &mut Vm,
    host: &str,
    limit: Duration,
    context: &dyn Fn() -> String,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(f) = marker_fields(&vm.console(), host) {
            return f;
        }
        let exited = vm.exited();
        assert!(
            Instant::now() < deadline && !exited,
            "{}: no `{MARKER} host={host}` within {limit:?} ({}):\n{}\n{}",
            vm.name,
            if exited { "QEMU exited" } else { "timed out" },
            vm.console(),
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `file` holds `what`; panics with `context()` after `limit`
/// or when `vm` (the source) has stopped.
fn wait_file(
    file: &Path,
    limit: Duration,
    what: &str,
    vm: &mut Vm,
    pred: impl Fn(&str) -> bool,
    context: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    loop {
        if pred(&fs::read_to_string(file).unwrap_or_default()) {
            return;
        }
        let exited = vm.exited();
        assert!(
            Instant::now() < deadline && !exited,
            "waiting for {what} in {} ({}):\n===== {} =====\n{}\n{}",
            file.display(),
            if exited {
                "the source VM stopped"
            } else {
                "timed out"
            },
            vm.name,
            vm.console(),
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn running_debian_is_cloned_onto_bios_and_uefi_vms_that_boot_it() {
    let t0 = Instant::now();
    let tree = ka_tests::debian_kernel();
    let image = debian_image();
    let image_ready = t0.elapsed();
    let source_size = fs::metadata(&image.disk).unwrap().len();

    // Disks and the files the VMs share with the host in a directory on
    // disk (the nodes' disks are sparse files; the source's writes go to
    // QEMU's snapshot file).
    let dir = tempfile::Builder::new()
        .prefix("ka-system-vms-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let d = dir.path();
    let share = d.join("share");
    fs::create_dir_all(share.join("state")).unwrap();

    // The TFTP root, as an administrator makes it: the netboot image from
    // Debian's kernel, with the tools a system clone runs and iPXE for UEFI.
    let tftp_root = share.join("tftp");
    let o = run(
        Command::new(ka_bin())
            .args(["netboot", "build", "--out"])
            .arg(&tftp_root)
            .arg("--kernel-tree")
            .arg(&tree),
        Duration::from_secs(300),
    );
    check(&o, "ka netboot build");
    for f in ["shimx64.efi", "grubx64.efi"] {
        assert!(
            tftp_root.join(f).is_file(),
            "ka netboot build left out {f}: install the Debian packages `shim-signed` and \
             `grub-efi-amd64-signed`\n{}",
            stderr(&o)
        );
    }
    ka_tests::write_secret(&share.join("secret"), u64::from(std::process::id()));
    fs::copy(ka_bin(), share.join("ka")).unwrap();
    fs::write(share.join("source.sh"), source_script()).unwrap();

    let inv = inventory(&share);
    let state = share.join("state");
    let (inv_s, state_s) = (inv.to_str().unwrap(), state.to_str().unwrap());
    let conf = d.join("dnsmasq.conf");
    vmlab::install_all(&inv, &state, &conf);
    let disks: Vec<PathBuf> = NODES
        .iter()
        .map(|n| {
            let p = d.join(format!("{}.img", n.name));
            fs::File::create(&p)
                .unwrap()
                .set_len(source_size + (n.extra_mib << 20))
                .unwrap();
            p
        })
        .collect();
    let prepared = t0.elapsed();

    let lab = VmNet::create(&format!("{SERVER}/24"), 1 + NODES.len());
    let dhcp = lab.dnsmasq(&conf, d);
    let mut tftp = lab.command(ka_bin());
    tftp.args([
        "tftp",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--listen",
        &format!("{SERVER}:69"),
    ]);
    // The secret stays with ka serve and ka tftp: each install-mode node
    // fetches its own key (the image's default, ka.secret=tftp).
    tftp.arg("--secret-file").arg(share.join("secret"));
    let mut tftp = Daemon::start(tftp, "ka tftp");
    tftp.wait_for(Duration::from_secs(20), "its address", |out, _| {
        out.contains("serving")
    });

    let source_spec = VmSpec {
        name: "source".into(),
        tap: lab.taps[0].clone(),
        mac: SOURCE_MAC.into(),
        disk: image.disk.clone(),
        snapshot: true,
        firmware: Firmware::Bios,
        boot: BootFrom::Disk,
        memory_mib: 512,
        share: Some((SHARE_TAG.into(), share.clone())),
    };
    let node_spec = |i: usize| {
        let n = &NODES[i];
        VmSpec {
            name: n.name.into(),
            tap: lab.taps[1 + i].clone(),
            mac: n.mac.into(),
            disk: disks[i].clone(),
            snapshot: false,
            firmware: if n.uefi {
                Firmware::Uefi {
                    vars: d.join(format!("{}-vars.fd", n.name)),
                    secure_boot: n.secure_boot,
                }
            } else {
                Firmware::Bios
            },
            boot: BootFrom::Network,
            memory_mib: 512,
            share: None,
        }
    };

    // Everyone at once: the source boots Debian while the nodes PXE-boot
    // the netboot image and look for it.
    let booting = Instant::now();
    let mut source = Vm::start(&lab, &source_spec);
    let mut nodes: Vec<Vm> = (0..NODES.len())
        .map(|i| Vm::start(&lab, &node_spec(i)))
        .collect();
    let serve_err = share.join("serve.err");
    let serve_json = share.join("serve.json");
    let daemons = |tftp: &Daemon, dhcp: &Daemon| {
        format!(
            "===== ka serve (source VM) =====\n{}\n{}\n===== ka tftp =====\n{}\n===== dnsmasq =====\n{}",
            fs::read_to_string(&serve_json).unwrap_or_default(),
            fs::read_to_string(&serve_err).unwrap_or_default(),
            tftp.err(),
            dhcp.err()
        )
    };

    // The source: Debian boots with systemd, its own marker says who it is,
    // and ka serve --system waits for the nodes.
    let source_fields = wait_marker(&mut source, "ka-source", Duration::from_secs(300), &|| {
        daemons(&tftp, &dhcp)
    });
    let source_up = booting.elapsed();
    assert_eq!(field(&source_fields, "root-uuid"), image.root_uuid);
    assert_eq!(field(&source_fields, "machine-id"), image.machine_id);
    assert_eq!(field(&source_fields, "multi-user"), "active");
    wait_file(
        &serve_err,
        Duration::from_secs(120),
        "ka serve waiting for the nodes",
        &mut source,
        |t| t.contains(&format!("waiting for {} nodes", NODES.len())),
        &|| daemons(&tftp, &dhcp),
    );
    let serving = booting.elapsed();

    // The clone: both nodes install and reboot (QEMU exits).
    wait_all_exit(&mut nodes, Duration::from_secs(900), "install", &|| {
        format!(
            "===== source =====\n{}\n{}",
            source.console(),
            daemons(&tftp, &dhcp)
        )
    });
    let installed = booting.elapsed();
    for (n, vm) in NODES.iter().zip(&nodes) {
        let c = vm.console();
        let boot_path = if n.uefi {
            // OVMF's own PXE fetched shim, shim fetched GRUB, which ran.
            "Fetching Netboot Image grubx64.efi".to_string()
        } else {
            format!("ipxe/{}.ipxe... ok", n.mac.replace(':', "-"))
        };
        for want in [
            boot_path,
            format!("is up: interface=eth0 ip={}/24", n.ip),
            "installed GRUB for BIOS on /dev/vda".to_string(),
            "installed GRUB for UEFI on /boot/efi".to_string(),
            format!("identity applied: host name {}", n.name),
            "rebooting into the new system".to_string(),
        ] {
            assert!(
                shows(&c, &want),
                "{}: no `{want}` on the console:\n{c}",
                n.name
            );
        }
        if n.uefi {
            assert!(shows(&c, "Start PXE over IPv4"), "{}:\n{c}", n.name);
        }
        if n.secure_boot {
            for want in [
                "secureboot: Secure boot enabled",
                "Kernel is locked down from EFI Secure Boot",
            ] {
                assert!(
                    shows(&c, want),
                    "{}: the netboot kernel did not run under Secure Boot (no `{want}`):\n{c}",
                    n.name
                );
            }
        }
    }
    drop(nodes);
    let log = tftp.err();
    for n in NODES.iter().filter(|n| n.uefi) {
        for f in [
            "shimx64.efi".to_string(),
            "grubx64.efi".to_string(),
            "grub/grub.cfg".to_string(),
            format!("grub/grub.cfg-01-{}", n.mac),
        ] {
            assert!(
                log.contains(&format!("path=\"{f}\"")),
                "{}: {f} not served:\n{log}",
                n.name
            );
        }
    }

    // The source's report: both nodes verified; the writer ran all along.
    wait_file(
        &serve_json,
        Duration::from_secs(120),
        "the final report",
        &mut source,
        |t| t.contains("{\"report\""),
        &|| daemons(&tftp, &dhcp),
    );
    let out = fs::read_to_string(&serve_json).unwrap();
    let report_line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"report\""))
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(report_line).unwrap();
    let reported = report["report"]["nodes"].as_array().unwrap();
    let names: BTreeSet<&str> = reported
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        NODES.iter().map(|n| n.name).collect(),
        "{report_line}"
    );
    assert!(
        reported.iter().all(|n| n["ok"] == true),
        "{report_line}\n{}",
        fs::read_to_string(&serve_err).unwrap_or_default()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shows(&source.console(), "KA-LAB-SOURCE-DONE") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let sc = source.console();
    assert!(shows(&sc, "KA-LAB-SOURCE-DONE status=0"), "{sc}");
    let churn = |key: &str| -> u64 {
        sc.split(&format!("KA-LAB-CHURN {key}="))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no churn count `{key}` on the source's console:\n{sc}"))
    };
    let (before, after) = (churn("before"), churn("after"));
    assert!(
        after > before + 10,
        "the root was not written during the clone ({before} → {after} writes)"
    );
    // The source flipped both nodes to local boot, in the directory the
    // host's ka tftp reads.
    let modes = BootState::new(&state).load().unwrap();
    for n in &NODES {
        assert_eq!(modes.get(n.name).mode, Mode::Local, "{}", n.name);
    }

    // Local boot: PXE says local, the firmware goes to the disk, GRUB boots
    // the clone, systemd reaches multi-user, the marker says who it is.
    let rebooting = Instant::now();
    let mut nodes: Vec<Vm> = (0..NODES.len())
        .map(|i| Vm::start(&lab, &node_spec(i)))
        .collect();
    let mut machine_ids = vec![image.machine_id.clone()];
    for (n, vm) in NODES.iter().zip(nodes.iter_mut()) {
        let f = wait_marker(vm, n.name, Duration::from_secs(420), &|| {
            daemons(&tftp, &dhcp)
        });
        assert_eq!(field(&f, "root-uuid"), image.root_uuid, "{}", n.name);
        assert_eq!(field(&f, "multi-user"), "active", "{}", n.name);
        let id = field(&f, "machine-id").to_string();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}: machine-id {id:?}",
            n.name
        );
        machine_ids.push(id);
        let c = vm.console();
        if n.secure_boot {
            // The clone's own kernel, by way of the disk's signed GRUB.
            assert!(
                shows(&c, "secureboot: Secure boot enabled"),
                "{}: the clone did not boot under Secure Boot:\n{c}",
                n.name
            );
        }
        assert!(
            !shows(&c, "ka/initramfs.img"),
            "{}: booted the installer again:\n{c}",
            n.name
        );
    }
    let reboot_time = rebooting.elapsed();
    let distinct: BTreeSet<&String> = machine_ids.iter().collect();
    assert_eq!(
        distinct.len(),
        machine_ids.len(),
        "machine-ids (source first): {machine_ids:?}"
    );
    drop(nodes);
    drop(source);

    // The partition tables: the same-size node has the source's; the larger
    // node's last partition (/home) grew to its disk's end.
    let source_table = partition_table(image.disk.to_str().unwrap());
    for (n, disk) in NODES.iter().zip(&disks) {
        let t = partition_table(disk.to_str().unwrap());
        let parts = t["partitions"].as_array().unwrap();
        let src = source_table["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), src.len(), "{}: {t}", n.name);
        assert_eq!(t["id"], source_table["id"], "{}: {t}", n.name);
        for (p, s) in parts.iter().zip(src).take(src.len() - 1) {
            for k in ["start", "size", "type", "uuid", "name"] {
                assert_eq!(p[k], s[k], "{}: {k} of {p}", n.name);
            }
        }
        let (last, src_last) = (&parts[parts.len() - 1], &src[src.len() - 1]);
        let grown = last["size"].as_u64().unwrap() - src_last["size"].as_u64().unwrap();
        assert_eq!(
            grown,
            (n.extra_mib << 20) / 512,
            "{}: the last partition grew by {grown} sectors: {t}",
            n.name
        );
    }

    drop(tftp);
    drop(dhcp);
    eprintln!(
        "system_vms: image ready in {:.0?}, netboot image and disks in {:.0?}; \
         source booted to multi-user in {:.0?} (serving at {:.0?}); \
         nodes installed {:.0?} after start ({:.0?} after the source served); \
         rebooted to multi-user in {:.0?}; total {:.0?}",
        image_ready,
        prepared - image_ready,
        source_up,
        serving,
        installed,
        installed - serving,
        reboot_time,
        t0.elapsed()
    );
}
