//! The whole job, end to end, on machines no one here wrote: three QEMU
//! virtual machines with empty disks PXE-boot (SeaBIOS + iPXE ROM) against
//! dnsmasq configured by `ka dhcp config` and `ka tftp`, boot the netboot
//! image `ka netboot build` made from Debian's kernel, join the session `ka
//! serve` runs, clone a bootable disk image, get their own identities,
//! are flipped to local boot by the source, reboot, and boot their new
//! disks (extlinux, the same kernel, a tiny initrd) to print a marker with
//! their own host name.
//!
//! Everything runs in a network namespace the test makes (a bridge, one
//! tap per VM); every process is killed by PID and the namespace deleted
//! when the test ends, however it ends.
//!
//! Needs root, the Debian packages in scripts/apt-packages.txt, and a
//! Debian kernel fetched by `scripts/fetch-kernel` (scripts/test runs it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ka_bin::boot::{BootState, Inventory, Mode};
use ka_bin::netboot::archive::Archive;
use ka_bin::netboot::modules::ModuleIndex;
use ka_tests::vmlab::{
    self, check, shows, wait_all_exit, BootFrom, Daemon, Firmware, Vm, VmNet, VmSpec,
};
use ka_tests::{ka_bin, require_tool, run, stdout};

const VMS: usize = 3;
const SERVER: &str = "10.77.0.1";
/// The marker the cloned system prints, followed by what it found.
const MARKER: &str = "KA-CLONED-SYSTEM";

fn mac(i: usize) -> String {
    format!("52:54:00:77:00:{:02x}", i + 1)
}

fn name(i: usize) -> String {
    format!("vm{}", i + 1)
}

fn ip(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

/// The last VM is handed pxelinux.0 by DHCP, as a BIOS machine with a plain
/// PXE ROM would be; the others, whose ROM is iPXE, get ka's iPXE script.
fn via_pxelinux(i: usize) -> bool {
    i == VMS - 1
}

/// The unpacked Debian kernel package: `$KA_TEST_KERNEL_DIR`, or what
/// `scripts/fetch-kernel` left in `target/ka-kernel/current`.
fn kernel_tree() -> PathBuf {
    let dir = std::env::var_os("KA_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ka-kernel/current")
        });
    assert!(
        dir.join("boot").is_dir() && dir.join("lib/modules").is_dir(),
        "no Debian kernel in {}: run `scripts/fetch-kernel` (apt-get download linux-image-<version>-amd64 \
         and dpkg -x it; scripts/test does this), or set KA_TEST_KERNEL_DIR to an unpacked kernel package",
        dir.display()
    );
    dir
}

fn kernel_version(tree: &Path) -> String {
    let versions: Vec<String> = fs::read_dir(tree.join("lib/modules"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "one kernel expected in {}",
        tree.display()
    );
    versions[0].clone()
}

/// The tiny initrd of the cloned system: loads the disk and ext4 drivers,
/// mounts the root read-only, prints the marker with the host name, the
/// address ka wrote for it and its machine-id, and powers off (qemu exits).
fn system_initrd(tree: &Path, version: &str) -> Vec<u8> {
    let index = ModuleIndex::open(&tree.join("lib/modules").join(version)).unwrap();
    let order = index
        .load_order(&["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"])
        .unwrap();
    let mut a = Archive::new();
    for d in ["proc", "sys", "dev", "mnt"] {
        a.dir(d, 0o755);
    }
    a.char_device("dev/console", 5, 1, 0o600);
    a.copy("bin/busybox", Path::new("/bin/busybox"), 0o755);
    for applet in [
        "sh", "mount", "umount", "insmod", "cat", "grep", "cut", "sleep", "poweroff", "echo",
    ] {
        a.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut list = String::new();
    for m in &order {
        a.copy(&format!("lib/{}.ko", m.name), &m.path, 0o644);
        list.push_str(&format!("/lib/{}.ko\n", m.name));
    }
    a.file("modules", list, 0o644);
    a.file(
        "init",
        format!(
            r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod $m; done
n=0
while [ ! -b /dev/vda1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
mount -t ext4 -o ro /dev/vda1 /mnt
addr=$(grep '^Address=' /mnt/etc/systemd/network/10-ka.network | cut -d= -f2)
echo "{MARKER} host=$(cat /mnt/etc/hostname) addr=$addr machine-id=[$(cat /mnt/etc/machine-id)] end"
umount /mnt
poweroff -f
"#
        ),
        0o755,
    );
    a.write_gz(Vec::new()).unwrap()
}

/// The source's disk: an MBR with syslinux's boot code, one bootable ext4
/// partition holding extlinux, the kernel, the tiny initrd and an /etc that
/// says it is the source. Returns its size.
fn source_disk(dir: &Path, tree: &Path, version: &str) -> u64 {
    let rootdir = dir.join("rootfs");
    fs::create_dir_all(rootdir.join("boot/extlinux")).unwrap();
    fs::create_dir_all(rootdir.join("etc/systemd/network")).unwrap();
    fs::copy(
        tree.join(format!("boot/vmlinuz-{version}")),
        rootdir.join("boot/vmlinuz"),
    )
    .unwrap();
    fs::write(
        rootdir.join("boot/initrd.img"),
        system_initrd(tree, version),
    )
    .unwrap();
    fs::write(
        rootdir.join("boot/extlinux/extlinux.conf"),
        "DEFAULT system\nPROMPT 0\nTIMEOUT 0\nLABEL system\n  KERNEL /boot/vmlinuz\n  \
         INITRD /boot/initrd.img\n  APPEND console=ttyS0,115200 quiet\n",
    )
    .unwrap();
    fs::write(rootdir.join("etc/hostname"), "ka-source\n").unwrap();
    fs::write(
        rootdir.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tka-source\n",
    )
    .unwrap();
    fs::write(
        rootdir.join("etc/machine-id"),
        "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e\n",
    )
    .unwrap();

    // The partition as its own file first: mke2fs fills it from the
    // directory, extlinux needs it mounted.
    let part = dir.join("part.img");
    let part_mib = 24u64;
    let mke2fs = require_tool("mke2fs", "e2fsprogs");
    // No 64bit feature: syslinux's ext4 reader predates it. 4 KiB blocks:
    // with the 1 KiB blocks mke2fs picks for small file systems, extlinux
    // fails to load the kernel ("I/O error").
    check(
        &run(
            Command::new(mke2fs)
                .args([
                    "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^64bit", "-L", "root", "-d",
                ])
                .arg(&rootdir)
                .arg(&part)
                .arg(format!("{part_mib}M")),
            Duration::from_secs(60),
        ),
        "mke2fs",
    );
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    check(
        &run(
            Command::new(require_tool("mount", "mount"))
                .args(["-o", "loop"])
                .arg(&part)
                .arg(&mnt),
            Duration::from_secs(30),
        ),
        "mount -o loop",
    );
    let installed = run(
        Command::new(require_tool("extlinux", "extlinux"))
            .arg("--install")
            .arg(mnt.join("boot/extlinux")),
        Duration::from_secs(30),
    );
    // Unmount (which frees the loop device) before judging.
    check(
        &run(Command::new("umount").arg(&mnt), Duration::from_secs(30)),
        "umount",
    );
    check(&installed, "extlinux --install");

    let disk = dir.join("disk.img");
    let offset = 1u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&disk).unwrap();
        f.set_len(offset + part_mib * (1 << 20)).unwrap();
        f.write_all_at(&fs::read(&part).unwrap(), offset).unwrap();
    }
    let mut sfdisk = Command::new(require_tool("sfdisk", "fdisk"));
    sfdisk
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sfdisk.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83, bootable\n")
        .unwrap();
    check(&child.wait_with_output().unwrap(), "sfdisk");
    // syslinux's MBR code: boots the active partition's boot sector
    // (extlinux's). Only the 440 bytes of code, not the partition table.
    let mbr = fs::read("/usr/lib/syslinux/mbr/mbr.bin")
        .expect("/usr/lib/syslinux/mbr/mbr.bin: install the Debian package `syslinux-common`");
    assert!(mbr.len() <= 440);
    {
        use std::os::unix::fs::FileExt;
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all_at(&mbr, 0)
            .unwrap();
    }
    fs::remove_file(&part).unwrap();
    fs::metadata(&disk).unwrap().len()
}

fn inventory(dir: &Path) -> PathBuf {
    let mut text = format!(
        r#"[network]
subnet = "10.77.0.0/24"
gateway = "{SERVER}"
dns = ["{SERVER}"]
domain = "lab.test"

[boot]
server = "{SERVER}"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
console = "ttyS0,115200"
kernel_args = "quiet ka.fail_delay=never"

[session]
name = "pxe"
source = "{SERVER}:4715"
disk = "/dev/vda"
"#
    );
    for i in 0..VMS {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{}\"\nmac = \"{}\"\nip = \"{}\"\n",
            name(i),
            mac(i),
            ip(i)
        ));
    }
    let path = dir.join("cluster.toml");
    fs::write(&path, text).unwrap();
    path
}

fn start_vm(lab: &VmNet, i: usize, disk: &Path) -> Vm {
    Vm::start(
        lab,
        &VmSpec {
            name: name(i),
            tap: lab.taps[i].clone(),
            mac: mac(i),
            disk: disk.to_path_buf(),
            snapshot: false,
            firmware: Firmware::Bios,
            boot: BootFrom::Network,
            memory_mib: 320,
            share: None,
        },
    )
}

fn daemon(cmd: Command, what: &str) -> Daemon {
    Daemon::start(cmd, what)
}

#[test]
fn three_vms_pxe_boot_clone_and_boot_their_own_disks() {
    let t0 = Instant::now();
    let tree = kernel_tree();
    let version = kernel_version(&tree);
    let dnsmasq = require_tool("dnsmasq", "dnsmasq-base");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The TFTP root, as an administrator makes it.
    let root = d.join("root");
    let o = run(
        Command::new(ka_bin())
            .args(["netboot", "build", "--out"])
            .arg(&root)
            .arg("--kernel-tree")
            .arg(&tree),
        Duration::from_secs(180),
    );
    check(&o, "ka netboot build");
    let built = stdout(&o);
    // Dependencies first: virtio_ring before virtio before the drivers.
    let order = built.split("loaded in this order: ").nth(1).unwrap_or("");
    let pos = |m: &str| order.split_whitespace().position(|x| x == m);
    assert!(
        pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_net"),
        "{built}"
    );
    assert!(
        pos("virtio_ring").is_some() && pos("ext4").is_some(),
        "{built}"
    );
    for f in [
        "pxelinux.0",
        "ldlinux.c32",
        "chain.c32",
        "ka/vmlinuz",
        "ka/initramfs.img",
    ] {
        assert!(
            root.join(f).is_file(),
            "{f} missing from the TFTP root:\n{built}"
        );
    }
    // What a system clone mounts: Debian's kernel has XFS (after the crc32c
    // it needs) and the character set its FAT mounts default to.
    assert!(
        pos("libcrc32c") < pos("xfs") && pos("nls_ascii").is_some(),
        "{built}"
    );
    // The programs a system clone runs, each with its loader and libraries.
    let image: std::collections::BTreeMap<String, ka_bin::netboot::archive::Listed> =
        ka_bin::netboot::archive::read(&fs::read(root.join("ka/initramfs.img")).unwrap())
            .unwrap()
            .into_iter()
            .map(|l| (l.path.clone(), l))
            .collect();
    let host_dirs: Vec<PathBuf> = ka_bin::netboot::tools::DEFAULT_TOOL_DIRS
        .iter()
        .map(PathBuf::from)
        .collect();
    let (tools, missing) = ka_bin::netboot::tools::find(&host_dirs);
    assert!(
        missing.is_empty(),
        "this host lacks system tools: {missing:?}"
    );
    for t in &tools {
        let path = t.image_path();
        assert!(
            image.get(&path).is_some_and(|e| e.is_file()),
            "{path} not in the image:\n{built}"
        );
        let needs = ka_bin::netboot::elf::needs(&t.path).unwrap();
        for lib in needs.interpreter.iter().chain(&needs.libraries) {
            let key = lib.to_string_lossy().trim_start_matches('/').to_string();
            assert!(
                image.get(&key).is_some_and(|e| e.is_file()),
                "{key} ({path} needs it) not in the image"
            );
        }
    }

    // The session secret stays with ka serve and ka tftp; each node fetches
    // its own key from ka tftp (the image's default, ka.secret=tftp).
    ka_tests::write_secret(&d.join("secret"), 42);

    let inv = inventory(d);
    let state = d.join("state");
    let inv_s = inv.to_str().unwrap();
    let state_s = state.to_str().unwrap();
    let conf = d.join("dnsmasq.conf");
    vmlab::install_all(&inv, &state, &conf);

    // Test only: steer the last VM to pxelinux (its ROM is iPXE too, which
    // `ka dhcp config` rightly sends to ka's iPXE script). dnsmasq takes the
    // last matching dhcp-boot; the console checks below prove it did.
    let mut dhcp_conf = fs::read_to_string(&conf).unwrap();
    dhcp_conf.push_str(&format!(
        "dhcp-mac=set:pxelinux-test,{}\ndhcp-boot=tag:pxelinux-test,pxelinux.0,,{SERVER}\n",
        mac(VMS - 1)
    ));
    fs::write(&conf, dhcp_conf).unwrap();

    let image_size = source_disk(d, &tree, &version);
    let disks: Vec<PathBuf> = (0..VMS)
        .map(|i| {
            let p = d.join(format!("{}.img", name(i)));
            fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
            p
        })
        .collect();
    let prepared = t0.elapsed();

    let lab = VmNet::create(&format!("{SERVER}/24"), VMS);

    let mut dhcp = lab.command(&dnsmasq);
    dhcp.arg(format!("--conf-file={}", conf.display()))
        .args([
            "--no-daemon",
            "--port=0",
            "--interface=br0",
            "--bind-interfaces",
            "--user=root",
            "--log-dhcp",
            "--log-facility=-",
        ])
        .arg(format!("--dhcp-leasefile={}", d.join("leases").display()))
        .arg("--pid-file=");
    let mut dhcp = daemon(dhcp, "dnsmasq");

    let mut tftp = lab.command(ka_bin());
    tftp.args([
        "tftp",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--listen",
        &format!("{SERVER}:69"),
    ])
    .arg("--secret-file")
    .arg(d.join("secret"));
    let mut tftp = daemon(tftp, "ka tftp");
    tftp.wait_for(Duration::from_secs(20), "its address", |out, _| {
        out.contains("serving")
    });

    let mut serve = lab.command(ka_bin());
    serve
        .args(["serve", "--image"])
        .arg(d.join("disk.img"))
        .args([
            "--nodes",
            "3",
            "--session",
            "pxe",
            "--listen",
            &format!("{SERVER}:4715"),
        ])
        .arg("--secret-file")
        .arg(d.join("secret"))
        .args(["--inventory", inv_s, "--boot-state", state_s, "--json"])
        // Emulated machines on a busy shared host can stall for seconds;
        // the default 1 s would declare them dead mid-clone.
        .args(["--dead-after", "20s"]);
    let mut serve = daemon(serve, "ka serve");
    serve.wait_for(Duration::from_secs(20), "listening", |_, err| {
        err.contains("waiting for 3 nodes")
    });

    // Install: PXE → iPXE script → kernel + ka initramfs → ka join → identity → reboot.
    let mut vms: Vec<Vm> = (0..VMS).map(|i| start_vm(&lab, i, &disks[i])).collect();
    let daemons = |serve: &Daemon, tftp: &Daemon, dhcp: &Daemon| {
        format!(
            "===== ka serve =====\n{}\n{}\n===== ka tftp =====\n{}\n===== dnsmasq =====\n{}",
            serve.out(),
            serve.err(),
            tftp.err(),
            dhcp.err()
        )
    };
    wait_all_exit(&mut vms, Duration::from_secs(720), "install", &|| {
        daemons(&serve, &tftp, &dhcp)
    });
    let installed = t0.elapsed();
    for (i, vm) in vms.iter().enumerate() {
        let c = vm.console();
        let boot_path = if via_pxelinux(i) {
            "PXELINUX".to_string()
        } else {
            format!("ipxe/{}.ipxe... ok", mac(i).replace(':', "-"))
        };
        for want in [
            boot_path,
            format!("is up: interface=eth0 ip={}/24", ip(i)),
            format!("fetching this node's key ka/keys/{}.key", name(i)),
            format!("identity applied: host name {}", name(i)),
            "rebooting into the new system".to_string(),
        ] {
            assert!(
                shows(&c, &want),
                "{}: no `{want}` on the console:\n{c}",
                vm.name
            );
        }
    }
    drop(vms);
    // What each path fetched: ka tftp logs every request.
    let log = tftp.err();
    for i in 0..VMS {
        let config = if via_pxelinux(i) {
            format!("pxelinux.cfg/01-{}", mac(i).replace(':', "-"))
        } else {
            format!("ipxe/{}.ipxe", mac(i).replace(':', "-"))
        };
        assert!(
            log.contains(&format!("path=\"{config}\"")),
            "{config} not served:\n{log}"
        );
    }
    for i in 0..VMS {
        let key = format!("ka/keys/{}.key", name(i));
        assert!(
            log.contains(&format!("path=\"{key}\"")),
            "{key} not served:\n{log}"
        );
    }
    for f in [
        "pxelinux.0",
        "ldlinux.c32",
        "ka/vmlinuz",
        "ka/initramfs.img",
    ] {
        assert!(
            log.contains(&format!("path=\"{f}\"")),
            "{f} not served:\n{log}"
        );
    }

    // The source's final report: three nodes, each verified.
    serve.wait_for(Duration::from_secs(60), "its final report", |out, _| {
        out.contains("{\"report\"")
    });
    let report_line = serve
        .out()
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"report\""))
        .unwrap()
        .to_string();
    let report: serde_json::Value = serde_json::from_str(&report_line).unwrap();
    let nodes = report["report"]["nodes"].as_array().unwrap();
    let mut names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["vm1", "vm2", "vm3"], "{report_line}");
    assert!(
        nodes
            .iter()
            .all(|n| n["ok"] == true && n["bytes"] == image_size),
        "{report_line}\n{}",
        serve.err()
    );
    assert_eq!(report["report"]["size"], image_size);
    let verified = serve
        .out()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "verified" && v["ok"] == true)
        .count();
    assert_eq!(verified, VMS, "{}", serve.out());
    let status = ka_tests::wait_timeout(&mut serve.guard.child, Duration::from_secs(30))
        .expect("ka serve exits after its report");
    assert!(status.success(), "ka serve: {status}\n{}", serve.err());

    // The source flipped every node to local boot.
    let modes = BootState::new(&state).load().unwrap();
    let inventory = Inventory::load(&inv).unwrap();
    for n in &inventory.nodes {
        assert_eq!(modes.get(&n.name).mode, Mode::Local, "{}", n.name);
        assert!(
            serve
                .err()
                .contains(&format!("{}: clone verified, boot mode now local", n.name)),
            "{}",
            serve.err()
        );
    }

    // Local: PXE → iPXE script says local → sanboot the disk → extlinux → the clone.
    let mut vms: Vec<Vm> = (0..VMS).map(|i| start_vm(&lab, i, &disks[i])).collect();
    wait_all_exit(&mut vms, Duration::from_secs(420), "local boot", &|| {
        daemons(&serve, &tftp, &dhcp)
    });
    for (i, vm) in vms.iter().enumerate() {
        let c = vm.console();
        let want = format!(
            "{MARKER} host={} addr={}/24 machine-id=[] end",
            name(i),
            ip(i)
        );
        assert!(shows(&c, &want), "{}: no `{want}`:\n{c}", vm.name);
        // The network boot chose the disk (never the BIOS falling through).
        let local = if via_pxelinux(i) {
            "PXELINUX"
        } else {
            "Booting from SAN device 0x80"
        };
        assert!(shows(&c, local), "{}: {local}?\n{c}", vm.name);
        assert!(!shows(&c, "Booting from Hard Disk"), "{}:\n{c}", vm.name);
        assert!(
            !shows(&c, "ka/initramfs.img"),
            "{}: booted the installer again:\n{c}",
            vm.name
        );
    }
    let leases = fs::read_to_string(d.join("leases")).unwrap_or_default();
    for i in 0..VMS {
        assert!(leases.contains(&ip(i)), "{leases}\n{}", dhcp.err());
    }
    dhcp.wait_for(Duration::from_secs(1), "DHCP log", |_, err| {
        err.contains("DHCPACK")
    });
    drop(tftp);
    eprintln!(
        "pxe_clone_vms: prepared in {:.0?}, installed {VMS} VMs in {:.0?}, booted them from disk in {:.0?}; total {:.0?}",
        prepared,
        installed - prepared,
        t0.elapsed() - installed,
        t0.elapsed()
    );
}
