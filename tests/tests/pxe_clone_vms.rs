//! The README's first install, run as it stands on machines no one here
//! wrote: the `sh first-install` block of README.md ("Booting the nodes")
//! is extracted and run by `sh -e` on a boot server made of a network
//! namespace (a bridge holding the inventory's boot server address, one tap
//! per VM). It writes the inventory, configures dnsmasq with `ka dhcp
//! config`, builds the netboot image from Debian's kernel, sets the nodes
//! to install, starts `ka tftp` (which makes the session secret) and `ka
//! serve -i` (which takes everything else from the inventory); the test
//! then powers on two QEMU virtual machines with empty disks (SeaBIOS +
//! iPXE ROM), which PXE-boot, clone the golden disk image, get their own
//! identities, are flipped to local boot by the source, reboot, and boot
//! their new disks (extlinux, the same kernel, a tiny initrd) to print a
//! marker with their own host name.
//!
//! The block runs with its own paths: `/etc/ka`, `/srv/ka` and
//! `/var/lib/ka` are directories of the test bind-mounted there, in the
//! mount namespace `ip netns exec` gives the script, so nothing of the
//! host's is read or written. What must differ on a test machine is
//! replaced, each replacement named in [`SUBSTITUTIONS`] with its reason,
//! and each must still match the README (a README that drifted fails here).
//!
//! Everything is killed when the test ends, however it ends: the script's
//! process group (ka tftp, dnsmasq and ka serve run in it) and the VMs by
//! their ids; the namespace is deleted, and mount points the test had to
//! create on the host are removed.
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
use ka_tests::vmlab::{check, shows, wait_all_exit, BootFrom, Daemon, Firmware, Vm, VmNet, VmSpec};
use ka_tests::{ka_bin, require_tool, run};

/// The marker the cloned system prints, followed by what it found.
const MARKER: &str = "KA-CLONED-SYSTEM";

/// The README the block is taken from.
const README: &str = include_str!("../../README.md");

/// The fence that opens the block the test runs.
const BLOCK_FENCE: &str = "```sh first-install\n";

/// The host directories the block writes, each replaced by a directory of
/// the test bind-mounted on it inside the script's mount namespace.
const MOUNTED: [&str; 4] = ["/etc/ka", "/srv/ka", "/var/lib/ka", "/var/log/ka"];

/// What the test changes in the block, and why: `(README text, what runs
/// instead, why)`. The `{…}` words are filled in by [`substitutions`].
const SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    (
        "-o /etc/dnsmasq.d/ka.conf",
        "-o {dir}/dnsmasq.conf",
        "the host's dnsmasq configuration is not the test's to write",
    ),
    (
        "systemctl restart dnsmasq",
        "dnsmasq --conf-file={dir}/dnsmasq.conf --no-daemon --port=0 --interface=br0 \
         --bind-interfaces --user=root --log-dhcp --log-facility=- \
         --dhcp-leasefile={dir}/leases --pid-file= &",
        "the test runs its own dnsmasq, in the namespace, on the bridge only",
    ),
    (
        "ka netboot build --out /srv/ka/tftp",
        "ka netboot build --out /srv/ka/tftp --kernel-tree {kernel_tree}",
        "the kernel is Debian's from scripts/fetch-kernel, not the test machine's own",
    ),
    (
        "disk = \"/dev/sda\"",
        "disk = \"/dev/vda\"",
        "the VMs' disks are virtio disks",
    ),
    (
        "--image /srv/ka/golden.img",
        "--image /srv/ka/golden.img --json --dead-after 20s",
        "the test reads the JSON report; emulated machines on a busy host stall for seconds",
    ),
];

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

/// The README's `sh first-install` block.
fn first_install_block() -> &'static str {
    let start = README
        .find(BLOCK_FENCE)
        .expect("README.md has no ```sh first-install block")
        + BLOCK_FENCE.len();
    let len = README[start..]
        .find("\n```")
        .expect("the first-install block of README.md is not closed");
    &README[start..start + len + 1]
}

/// The block as the test runs it: every substitution applied, each of
/// which must match.
fn substitutions(block: &str, dir: &Path, kernel_tree: &Path) -> String {
    let mut script = block.to_string();
    for (readme, instead, why) in SUBSTITUTIONS {
        assert!(
            script.contains(readme),
            "the README's first-install block no longer has `{readme}`, which the test replaces \
             ({why}): update SUBSTITUTIONS in tests/tests/pxe_clone_vms.rs to the README"
        );
        let instead = instead
            .replace("{dir}", dir.to_str().unwrap())
            .replace("{kernel_tree}", kernel_tree.to_str().unwrap());
        script = script.replace(readme, &instead);
    }
    script
}

/// Directories bind-mounted on the host paths of [`MOUNTED`] for the
/// script; the host paths it had to create (as mount points) are removed
/// when it is dropped.
struct MountPoints {
    created: Vec<PathBuf>,
}

impl MountPoints {
    fn create() -> MountPoints {
        let mut created = Vec::new();
        for p in MOUNTED {
            let mut missing = Vec::new();
            let mut at = Path::new(p);
            while !at.exists() {
                missing.push(at.to_path_buf());
                at = at.parent().unwrap();
            }
            fs::create_dir_all(p).unwrap();
            // Deepest first, so each is empty when removed.
            created.extend(missing);
        }
        MountPoints { created }
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in &self.created {
            let _ = fs::remove_dir(p);
        }
    }
}

/// Kills a process group by its id when dropped: the script's, holding
/// the daemons it started in the background.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        for signal in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, "--", &format!("-{}", self.0)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Everything the first install said, for a failure's message.
fn context(first_install: &Daemon) -> String {
    format!(
        "===== the first install: stdout =====\n{}\n===== stderr =====\n{}",
        first_install.out(),
        first_install.err()
    )
}

fn start_vm(lab: &VmNet, i: usize, mac: &str, name: &str, disk: &Path) -> Vm {
    Vm::start(
        lab,
        &VmSpec {
            name: name.to_string(),
            tap: lab.taps[i].clone(),
            mac: mac.to_string(),
            disk: disk.to_path_buf(),
            snapshot: false,
            firmware: Firmware::Bios,
            boot: BootFrom::Network,
            memory_mib: 320,
            share: None,
        },
    )
}

#[test]
fn the_readme_first_install_pxe_boots_clones_and_boots_two_vms() {
    let t0 = Instant::now();
    let tree = ka_tests::debian_kernel();
    let version = kernel_version(&tree);
    require_tool("dnsmasq", "dnsmasq-base");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let script = substitutions(first_install_block(), d, &tree);
    fs::write(d.join("first-install.sh"), &script).unwrap();

    // The directories the block writes, mounted in its place.
    let mounted: Vec<PathBuf> = MOUNTED
        .iter()
        .map(|p| d.join(p.trim_start_matches('/').replace('/', "-")))
        .collect();
    for m in &mounted {
        fs::create_dir_all(m).unwrap();
    }
    let (etc_ka, srv_ka, var_lib_ka, var_log_ka) =
        (&mounted[0], &mounted[1], &mounted[2], &mounted[3]);
    // The golden disk the block serves, where it says it is.
    let work = d.join("golden");
    fs::create_dir_all(&work).unwrap();
    let image_size = source_disk(&work, &tree, &version);
    fs::rename(work.join("disk.img"), srv_ka.join("golden.img")).unwrap();
    let prepared = t0.elapsed();

    // The boot server: the inventory's boot server address on a bridge.
    let server = "192.168.10.1";
    assert!(
        script.contains(&format!("server = \"{server}\"")),
        "the README's inventory no longer has its boot server at {server}:\n{script}"
    );
    let vms_wanted = script.matches("[[node]]").count();
    let lab = VmNet::create(&format!("{server}/24"), vms_wanted);
    let _mount_points = MountPoints::create();
    let mut mounts = String::new();
    for (host, ours) in MOUNTED.iter().zip(&mounted) {
        mounts.push_str(&format!("mount --bind '{}' '{host}' && ", ours.display()));
    }
    let ka_dir = ka_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        ka_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut sh = lab.command("sh");
    sh.arg("-c")
        .arg(format!(
            "{mounts}exec sh -e '{}'",
            d.join("first-install.sh").display()
        ))
        .env("PATH", path)
        .current_dir(d);
    std::os::unix::process::CommandExt::process_group(&mut sh, 0);
    let mut first_install = Daemon::start(sh, "the README's first install");
    let _group = GroupGuard(first_install.guard.child.id());

    // Everything up to ka serve waiting for its nodes, and the word of
    // whichever of ka tftp and ka serve made the secret.
    let made = |err: &str| {
        err.matches("ka tftp: made the session secret /etc/ka/secret")
            .count()
            + err
                .matches("ka: made a new session secret in /etc/ka/secret")
                .count()
    };
    first_install.wait_for(Duration::from_secs(400), "ka serve waiting", |_, err| {
        err.contains("waiting for") && made(err) > 0
    });
    let err = first_install.err();
    for want in [
        "ka: from /etc/ka/cluster.toml: session lab; listen 192.168.10.1:4000; 2 nodes in install mode in /var/lib/ka: node01 node02; chain in inventory order: node01 node02; secret /etc/ka/secret",
        "ka: session \"lab\" waiting for 2 nodes on 192.168.10.1:4000",
    ] {
        assert!(err.contains(want), "no `{want}`:\n{err}");
    }
    // One secret, made by one of the two, readable by root only.
    let secret = etc_ka.join("secret");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&secret).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
    assert_eq!(
        made(&err),
        1,
        "the secret is made once, by ka tftp or ka serve:\n{err}"
    );

    let inventory = Inventory::load(etc_ka.join("cluster.toml")).unwrap();
    assert_eq!(inventory.nodes.len(), vms_wanted);
    let disks: Vec<PathBuf> = inventory
        .nodes
        .iter()
        .map(|n| {
            let p = d.join(format!("{}.img", n.name));
            fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
            p
        })
        .collect();
    let power_on = |lab: &VmNet| -> Vec<Vm> {
        inventory
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| start_vm(lab, i, &n.mac.to_string(), &n.name, &disks[i]))
            .collect()
    };

    // Install: PXE → iPXE script → kernel + ka initramfs → ka join → identity → reboot.
    let mut vms = power_on(&lab);
    wait_all_exit(&mut vms, Duration::from_secs(720), "install", &|| {
        context(&first_install)
    });
    let installed = t0.elapsed();
    for (vm, n) in vms.iter().zip(&inventory.nodes) {
        let c = vm.console();
        for want in [
            format!("ipxe/{}.ipxe... ok", n.mac.to_string().replace(':', "-")),
            format!("is up: interface=eth0 ip={}/24", n.ip),
            format!("fetching this node's key ka/keys/{}.key", n.name),
            format!("identity applied: host name {}", n.name),
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

    // ka serve's report, then ka pxe show; the script ends there.
    let status = ka_tests::wait_timeout(&mut first_install.guard.child, Duration::from_secs(60));
    let status = status.unwrap_or_else(|| {
        panic!(
            "the first install did not end after its nodes did\n{}",
            context(&first_install)
        )
    });
    assert!(
        status.success(),
        "the first install: {status}\n{}",
        context(&first_install)
    );
    let out = first_install.out();
    let report_line = out
        .lines()
        .find(|l| l.starts_with("{\"report\""))
        .unwrap_or_else(|| panic!("no report:\n{out}"));
    let report: serde_json::Value = serde_json::from_str(report_line).unwrap();
    let nodes = report["report"]["nodes"].as_array().unwrap();
    let mut names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["node01", "node02"], "{report_line}");
    assert!(
        nodes
            .iter()
            .all(|n| n["ok"] == true && n["bytes"] == image_size),
        "{report_line}\n{}",
        context(&first_install)
    );
    // The source flipped every node to local boot, and ka pxe show says so.
    let modes = BootState::new(var_lib_ka).load().unwrap();
    for n in &inventory.nodes {
        assert_eq!(modes.get(&n.name).mode, Mode::Local, "{}", n.name);
        let shown = out
            .lines()
            .find(|l| l.starts_with(&format!("{} ", n.name)))
            .unwrap_or_else(|| panic!("{} not in ka pxe show:\n{out}", n.name));
        assert!(shown.contains(" local "), "{shown}");
    }
    // Each node's log on the boot server tells its install: what the
    // netboot image printed on its console, and its verified copy.
    for n in &inventory.nodes {
        let path = var_log_ka
            .join(&inventory.session.name)
            .join(format!("{}.log", n.name));
        let log = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}
{}",
                path.display(),
                context(&first_install)
            )
        });
        for want in ["ka-netboot: ", "ka: copy verified", "source: copy verified"] {
            assert!(
                log.contains(want),
                "{}: no `{want}`:
{log}",
                path.display()
            );
        }
    }
    // Each node fetched its own key from ka tftp, which logs every request.
    let log = first_install.err();
    for n in &inventory.nodes {
        let key = format!("path=\"ka/keys/{}.key\"", n.name);
        assert!(log.contains(&key), "{key} not served:\n{log}");
    }

    // Local: PXE → iPXE script says local → sanboot the disk → extlinux → the clone.
    let mut vms = power_on(&lab);
    wait_all_exit(&mut vms, Duration::from_secs(420), "local boot", &|| {
        context(&first_install)
    });
    for (vm, n) in vms.iter().zip(&inventory.nodes) {
        let c = vm.console();
        let want = format!(
            "{MARKER} host={} addr={}/24 machine-id=[] end",
            n.name, n.ip
        );
        assert!(shows(&c, &want), "{}: no `{want}`:\n{c}", vm.name);
        assert!(
            shows(&c, "Booting from SAN device 0x80"),
            "{}:\n{c}",
            vm.name
        );
        assert!(
            !shows(&c, "ka/initramfs.img"),
            "{}: booted the installer again:\n{c}",
            vm.name
        );
    }
    let leases = fs::read_to_string(d.join("leases")).unwrap_or_default();
    for n in &inventory.nodes {
        assert!(
            leases.contains(&n.ip.to_string()),
            "{leases}\n{}",
            context(&first_install)
        );
    }
    eprintln!(
        "pxe_clone_vms: prepared in {:.0?}, boot server up and {} VMs installed in {:.0?}, booted from disk in {:.0?}; total {:.0?}",
        prepared,
        vms_wanted,
        installed - prepared,
        t0.elapsed() - installed,
        t0.elapsed()
    );
}
