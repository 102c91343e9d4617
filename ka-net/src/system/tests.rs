//! Reading and rebuilding layouts on real loop devices with the real tools.
//! These need root, loop devices, util-linux, e2fsprogs, xfsprogs,
//! dosfstools, mtools and btrfs-progs (scripts/apt-packages.txt); they fail,
//! never skip, without them. Every loop device, mount and file they make
//! is undone by name when they end, pass or fail.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::image::blockdev::tests::LoopDev;
use crate::Error;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Runs a command, panicking with its stderr if it fails; returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is its package installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(script: &str) -> String {
    run(Command::new("sh").args(["-c", script]))
}

/// Mounts made by a test, unmounted in reverse order when it ends.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, dev: &Path, at: &Path, extra: &[&str]) {
        fs::create_dir_all(at).unwrap();
        run(Command::new("mount").args(extra).arg(dev).arg(at));
        self.0.push(at.to_owned());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let ok = Command::new("umount").arg(at).status().map(|s| s.success());
            if !matches!(ok, Ok(true)) && !std::thread::panicking() {
                panic!("could not unmount {}", at.display());
            }
        }
    }
}

/// Writes a partition table with sfdisk and waits for the kernel's
/// partition devices.
fn partition(dev: &LoopDev, script: &str, count: usize) {
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--wipe", "always"])
        .arg(&dev.path)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (package fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..100 {
        let n = (1..=16)
            .filter(|n| disk::partition_path(&dev.path, *n).exists())
            .count();
        if n >= count {
            return;
        }
        let _ = Command::new("partx").arg("-u").arg(&dev.path).status();
        let _ = Command::new("partx").arg("-a").arg(&dev.path).output();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the partitions of {} never appeared", dev.path.display());
}

fn part(dev: &LoopDev, n: u32) -> PathBuf {
    disk::partition_path(&dev.path, n)
}

fn blkid(dev: &Path) -> BTreeMap<String, String> {
    probe::probe(dev).unwrap()
}

const DISK_ID: &str = "6E4D9A0B-54B3-4C3E-9B3F-2A5C1D7E8F90";
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
/// The UUIDs of machine `n`'s file systems and swap: each test has its
/// own, since the kernel refuses to mount two xfs with one UUID and the
/// tests run at once.
fn root_uuid(n: u8) -> String {
    format!("3f1c2a9e-6b7d-4e8f-9a0b-1c2d3e4f5a{n:02x}")
}
fn home_uuid(n: u8) -> String {
    format!("5d6e7f80-91a2-4b3c-8d4e-5f6a7b8c9d{n:02x}")
}
fn swap_uuid(n: u8) -> String {
    format!("7a8b9c0d-1e2f-4a3b-9c4d-5e6f7a8b9c{n:02x}")
}
const ESP_ID: &str = "1234-ABCD";

fn part_guid(n: u32) -> String {
    format!("11111111-2222-3333-4444-00000000000{n}")
}

/// A machine's disk on a 1 GiB loop device: GPT with a BIOS boot
/// partition, an ESP (vfat, filled with mtools, not mounted: this kernel
/// has no vfat), / on ext4 with a label, /home on xfs, and swap; / and
/// /home mounted under a temporary root with a few files. Fields drop in
/// order: mounts first, then the root directory, then the loop device.
struct SourceMachine {
    /// Held for its drop, which unmounts.
    _mounts: Mounts,
    root: tempfile::TempDir,
    dev: LoopDev,
}

fn source_machine(n: u8) -> SourceMachine {
    let (root_uuid, home_uuid, swap_uuid) = (root_uuid(n), home_uuid(n), swap_uuid(n));
    let dev = LoopDev::partitioned(GIB);
    let g = part_guid;
    partition(
        &dev,
        &format!(
            "label: gpt\nlabel-id: {DISK_ID}\nfirst-lba: 2048\n\
             start=2048, size=2048, type={BIOS_BOOT}, uuid={}, name=\"bios\", attrs=\"LegacyBIOSBootable GUID:63\"\n\
             start=4096, size=131072, type={ESP}, uuid={}, name=\"EFI system\"\n\
             start=135168, size=524288, type={LINUX}, uuid={}, name=\"root\"\n\
             start=659456, size=655360, type={LINUX}, uuid={}, name=\"home\"\n\
             start=1314816, size=262144, type={SWAP}, uuid={}, name=\"swap\"\n",
            g(1),
            g(2),
            g(3),
            g(4),
            g(5)
        ),
        5,
    );
    let esp = part(&dev, 2);
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-i", "1234ABCD"])
        .arg(&esp));
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1; echo 'grub' > /tmp/ka-esp-$$ && mmd -i {e} ::/EFI ::/EFI/debian && \
         mcopy -i {e} /tmp/ka-esp-$$ ::/EFI/debian/grub.cfg; rc=$?; rm -f /tmp/ka-esp-$$; exit $rc",
        e = esp.display()
    ));
    // / without metadata_csum and with 4 KiB blocks: the clone must repeat both.
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "rootfs",
            "-U",
            &root_uuid,
            "-b",
            "4096",
            "-O",
            "^metadata_csum",
        ])
        .arg(part(&dev, 3)));
    run(Command::new("mkfs.xfs")
        .args(["-q", "-f", "-L", "home", "-m", &format!("uuid={home_uuid}")])
        .arg(part(&dev, 4)));
    run(Command::new("mkswap")
        .args(["-q", "-L", "swap0", "-U", &swap_uuid])
        .arg(part(&dev, 5)));

    let root = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 3), root.path(), &[]);
    mounts.mount(&part(&dev, 4), &root.path().join("home"), &[]);
    let r = root.path();
    fs::create_dir_all(r.join("etc")).unwrap();
    fs::write(
        r.join("etc/fstab"),
        format!(
            "# <fs> <mount point> <type> <options> <dump> <pass>\nUUID={root_uuid} / ext4 errors=remount-ro 0 1\n\
             UUID={home_uuid} /home xfs defaults,noatime 0 2\nUUID=1234-ABCD /boot/efi vfat umask=0077 0 1\n"
        ),
    )
    .unwrap();
    fs::create_dir_all(r.join("var/cache/apt")).unwrap();
    fs::write(r.join("var/cache/apt/pkgcache.bin"), vec![7u8; 1 << 20]).unwrap();
    fs::create_dir_all(r.join("home/ann")).unwrap();
    fs::write(r.join("home/ann/data"), vec![1u8; 8 << 20]).unwrap();
    fs::create_dir_all(r.join("srv/ann")).unwrap();
    fs::create_dir_all(r.join("tmp")).unwrap();
    // A bind mount of part of /home at /srv/ann: sent once, with /home.
    mounts.mount(&r.join("home/ann"), &r.join("srv/ann"), &["--bind"]);
    sh("sync");
    SourceMachine {
        _mounts: mounts,
        root,
        dev,
    }
}

fn options(machine: &SourceMachine) -> ReadOptions {
    ReadOptions {
        root: machine.root.path().to_owned(),
        ..ReadOptions::default()
    }
}

fn tree_of(p: &PartitionLayout) -> &FileSystem {
    match &p.content {
        Content::Tree(fs) => fs,
        other => panic!("partition {} is not a tree: {other:?}", p.number),
    }
}

#[test]
fn gpt_machine_layout_has_every_field() {
    let m = source_machine(1);
    let r = m.root.path();
    let mut opts = options(&m);
    opts.exclude = vec![r.join("var/cache"), r.join("home/ann/")];
    let layout = read_layout(&opts).unwrap();

    assert_eq!(layout.disks.len(), 1, "{layout:#?}");
    let disk = &layout.disks[0];
    assert_eq!(disk.device, m.dev.path.display().to_string());
    assert_eq!(
        (disk.size, disk.sector_size, disk.table),
        (GIB, 512, TableKind::Gpt)
    );
    assert_eq!(disk.id, DISK_ID);
    assert_eq!(
        (disk.first_lba, disk.last_lba),
        (Some(2048), Some(GIB / 512 - 34))
    );

    let p = &disk.partitions;
    let numbers: Vec<u32> = p.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5]);
    let spans: Vec<(u64, u64)> = p.iter().map(|p| (p.start, p.size)).collect();
    assert_eq!(
        spans,
        [
            (2048, 2048),
            (4096, 131072),
            (135168, 524288),
            (659456, 655360),
            (1314816, 262144)
        ]
    );
    let types: Vec<&str> = p.iter().map(|p| p.type_id.as_str()).collect();
    assert_eq!(types, [BIOS_BOOT, ESP, LINUX, LINUX, SWAP]);
    for q in p {
        assert_eq!(q.uuid.as_deref(), Some(part_guid(q.number).as_str()));
        assert_eq!(q.device.as_deref(), Some(part(&m.dev, q.number).as_path()));
        assert!(!q.bootable);
    }
    let names: Vec<&str> = p.iter().map(|p| p.name.as_deref().unwrap()).collect();
    assert_eq!(names, ["bios", "EFI system", "root", "home", "swap"]);
    assert_eq!(p[0].attrs.as_deref(), Some("LegacyBIOSBootable GUID:63"));
    assert_eq!(p[1].attrs, None);

    assert!(
        matches!(&p[0].content, Content::Raw { why } if why.contains("BIOS boot")),
        "{:?}",
        p[0].content
    );
    assert!(
        matches!(&p[1].content, Content::Raw { why } if why.contains("vfat") && why.contains("not mounted")),
        "{:?}",
        p[1].content
    );

    let root = tree_of(&p[2]);
    assert_eq!(root.kind, FsKind::Ext4);
    assert_eq!(root.uuid, root_uuid(1));
    assert_eq!(root.label.as_deref(), Some("rootfs"));
    assert_eq!(root.mountpoint, "/");
    assert_eq!(root.options, "errors=remount-ro", "fstab's options");
    assert_eq!(
        root.excludes,
        ["srv/ann", "var/cache"],
        "the bind mount, then --exclude"
    );
    assert_eq!(root.mounted_at.as_deref(), Some(r));
    assert!(
        root.used >= MIB && root.used < 100 * MIB,
        "used {}",
        root.used
    );
    assert_eq!(root.make.block_size, Some(4096));
    assert!(
        root.make.features.iter().any(|f| f == "extent"),
        "{:?}",
        root.make
    );
    assert!(
        !root.make.features.iter().any(|f| f == "metadata_csum"),
        "{:?}",
        root.make
    );

    let home = tree_of(&p[3]);
    assert_eq!(home.kind, FsKind::Xfs);
    assert_eq!(home.uuid, home_uuid(1));
    assert_eq!(home.label.as_deref(), Some("home"));
    assert_eq!(home.mountpoint, "/home");
    assert_eq!(home.options, "defaults,noatime");
    assert_eq!(home.excludes, ["ann"]);
    assert_eq!(home.mounted_at.as_deref(), Some(r.join("home").as_path()));
    assert!(home.used >= 8 * MIB, "8 MiB of files: used {}", home.used);
    assert!(
        home.make.features.iter().any(|f| f == "crc=1"),
        "{:?}",
        home.make
    );
    assert_eq!(home.make.block_size, Some(4096));

    assert_eq!(
        p[4].content,
        Content::Swap {
            uuid: Some(swap_uuid(1)),
            label: Some("swap0".into())
        }
    );

    assert_eq!(layout.used_bytes(), root.used + home.used + MIB + 64 * MIB);
    let trees: Vec<(usize, u32)> = layout.trees().map(|(d, p, _)| (d, p.number)).collect();
    assert_eq!(trees, [(0, 3), (0, 4)]);
    // The layout survives JSON as a node gets it.
    let back: Layout = serde_json::from_str(&serde_json::to_string(&layout).unwrap()).unwrap();
    assert_eq!(back.disks[0].partitions[2].content, {
        let mut fs = root.clone();
        fs.mounted_at = None;
        Content::Tree(fs)
    });
}

#[test]
fn raw_skip_and_exclude_arguments_are_checked() {
    let m = source_machine(2);
    let r = m.root.path();

    // --raw of a mounted partition: sent as bytes, not as a tree.
    let mut opts = options(&m);
    opts.raw = vec![part(&m.dev, 4)];
    let layout = read_layout(&opts).unwrap();
    let home = &layout.disks[0].partitions[3];
    assert!(
        matches!(&home.content, Content::Raw { why } if why.contains("--raw")),
        "{home:?}"
    );
    assert_eq!(layout.trees().count(), 1);

    let refused = |opts: ReadOptions, words: &[&str]| {
        let err = read_layout(&opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::NotClonable(_)), "{msg}");
        for w in words {
            assert!(msg.contains(w), "{w:?} not in: {msg}");
        }
    };
    let mut opts = options(&m);
    opts.exclude = vec![r.join("home/ann/data")];
    refused(opts, &["not a directory", "home/ann/data"]);
    let mut opts = options(&m);
    opts.exclude = vec![std::env::temp_dir()];
    refused(opts, &["not under the root"]);
    let mut opts = options(&m);
    opts.exclude = vec![r.join("home")];
    refused(opts, &["a file system is mounted there", "--skip-disk"]);
    let mut opts = options(&m);
    opts.raw = vec![part(&m.dev, 4)];
    opts.exclude = vec![r.join("home/ann")];
    refused(opts, &["sent as bytes"]);
    let mut opts = options(&m);
    opts.skip_disks = vec![m.dev.path.clone()];
    refused(opts, &["holds the root file system"]);
    let mut opts = options(&m);
    opts.skip_disks = vec![part(&m.dev, 3)];
    refused(opts, &["is a partition", &m.dev.path.display().to_string()]);
    let other = LoopDev::new(MIB);
    let mut opts = options(&m);
    opts.skip_disks = vec![other.path.clone()];
    refused(
        opts,
        &["no file system under", &m.dev.path.display().to_string()],
    );
    let mut opts = options(&m);
    opts.raw = vec![m.dev.path.clone()];
    refused(opts, &["not a partition", "ka serve --image"]);
    let mut opts = options(&m);
    opts.root = r.join("var");
    refused(opts, &["not a mount point"]);

    // An --exclude on a file system that is not sent: nothing to leave out.
    // And an image file of the system mounted through a loop device: its
    // file is sent, its mount is not.
    let image = LoopDev::new_in(8 * MIB, &r.join("var"));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image.path));
    let mut mounts = Mounts::default();
    mounts.mount(Path::new("tmpfs"), &r.join("tmp"), &["-t", "tmpfs"]);
    mounts.mount(&image.path, &r.join("mnt/image"), &[]);
    let mut opts = options(&m);
    opts.exclude = vec![r.join("tmp")];
    let layout = read_layout(&opts).unwrap();
    assert!(
        layout
            .ignored
            .iter()
            .any(|i| i.mountpoint == "/tmp" && i.fstype == "tmpfs"),
        "{:?}",
        layout.ignored
    );
    assert!(
        layout.ignored.iter().any(|i| i.mountpoint == "/mnt/image"),
        "{:?}",
        layout.ignored
    );
    assert_eq!(
        tree_of(&layout.disks[0].partitions[2]).excludes,
        ["srv/ann"]
    );
    // Unmounted before its loop device goes.
    drop(mounts);
}

#[test]
fn dos_disk_with_boot_flag_extended_and_untyped_swap() {
    let dev = LoopDev::partitioned(200 * MIB);
    partition(
        &dev,
        "label: dos\nlabel-id: 0x1234abcd\n\
         start=2048, size=204800, type=83, bootable\n\
         start=206848, size=200704, type=5\n\
         start=208896, size=102400, type=83\n\
         start=313344, size=94208, type=82\n",
        4,
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "dosroot"])
        .arg(part(&dev, 1)));
    run(Command::new("mkfs.ext2")
        .args(["-q", "-F"])
        .arg(part(&dev, 5)));
    let root = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 1), root.path(), &[]);
    mounts.mount(&part(&dev, 5), &root.path().join("data"), &["-o", "ro"]);
    let layout = read_layout(&ReadOptions {
        root: root.path().to_owned(),
        ..ReadOptions::default()
    })
    .unwrap();
    drop(mounts);

    let disk = &layout.disks[0];
    assert_eq!(
        (disk.table, disk.id.as_str()),
        (TableKind::Dos, "0x1234abcd")
    );
    assert_eq!((disk.first_lba, disk.last_lba), (None, None));
    let p = &disk.partitions;
    let summary: Vec<(u32, &str, bool)> = p
        .iter()
        .map(|p| (p.number, p.type_id.as_str(), p.bootable))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "83", true),
            (2, "5", false),
            (5, "83", false),
            (6, "82", false)
        ]
    );
    assert!(p.iter().all(|p| p.uuid.is_none() && p.name.is_none()));
    let root_fs = tree_of(&p[0]);
    assert_eq!(
        (root_fs.kind, root_fs.label.as_deref()),
        (FsKind::Ext4, Some("dosroot"))
    );
    assert!(matches!(&p[1].content, Content::Skipped { why } if why.contains("extended")));
    let data = tree_of(&p[2]);
    assert_eq!(
        (data.kind, data.mountpoint.as_str()),
        (FsKind::Ext2, "/data")
    );
    assert!(
        data.options.starts_with("ro,"),
        "the kernel's options: {}",
        data.options
    );
    assert_eq!(
        p[3].content,
        Content::Swap {
            uuid: None,
            label: None
        }
    );

    // Rebuilt on a larger disk: same id, boot flag, types; the last logical
    // partition and its extended partition grow.
    let target = LoopDev::partitioned(400 * MIB);
    let plan = plan_disk(disk, 400 * MIB, 512, None, 0).unwrap();
    let devices = write_table(&target.path, disk, &plan).unwrap();
    assert_eq!(devices.len(), 4);
    assert_eq!(devices[2], part(&target, 5));
    let table = probe::read_table(&target.path).unwrap();
    assert_eq!(
        (table.label.as_str(), table.id.as_deref()),
        ("dos", Some("0x1234abcd"))
    );
    let got: Vec<(Option<u32>, &str, bool, u64)> = table
        .partitions
        .iter()
        .map(|p| (p.number(), p.type_id.as_str(), p.bootable, p.start))
        .collect();
    assert_eq!(
        got,
        [
            (Some(1), "83", true, 2048),
            (Some(2), "5", false, 206848),
            (Some(5), "83", false, 208896),
            (Some(6), "82", false, 313344)
        ]
    );
    assert!(table.partitions[3].size > 94208);
    assert_eq!(
        table.partitions[1].start + table.partitions[1].size,
        table.partitions[3].start + table.partitions[3].size
    );
}

#[test]
fn btrfs_and_a_file_system_on_a_whole_loop_device_are_refused_naming_the_way_out() {
    let dev = LoopDev::partitioned(512 * MIB);
    partition(
        &dev,
        &format!("label: gpt\nstart=2048, size=262144, type={LINUX}\nstart=264192, size=262144, type={LINUX}\n"),
        2,
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(part(&dev, 1)));
    run(Command::new("mkfs.btrfs")
        .args(["-q", "-f"])
        .arg(part(&dev, 2)));
    let whole = LoopDev::new(32 * MIB);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&whole.path));
    let root = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 1), root.path(), &[]);
    mounts.mount(&part(&dev, 2), &root.path().join("srv"), &[]);
    mounts.mount(&whole.path, &root.path().join("data"), &[]);
    let opts = ReadOptions {
        root: root.path().to_owned(),
        ..ReadOptions::default()
    };
    let both = read_layout(&opts).unwrap_err().to_string();
    let p2 = part(&dev, 2).display().to_string();
    // btrfs reports an anonymous device number: found by its mount source.
    assert!(both.contains(&format!("/srv is btrfs on {p2}")), "{both}");
    assert!(both.contains(&format!("--raw {p2}")), "{both}");
    assert!(
        both.contains(&format!("ka serve --image {}", dev.path.display())),
        "{both}"
    );
    // A whole loop device stands for a disk without a partition table; its
    // image file is outside the root, so its files would be lost.
    let w = whole.path.display().to_string();
    assert!(
        both.contains(&format!("/data is ext4 on {w}, a loop device over /tmp/")),
        "{both}"
    );
    assert!(both.contains("not under the root"), "{both}");

    // Sent as bytes instead, the btrfs partition is no obstacle.
    let opts = ReadOptions {
        raw: vec![part(&dev, 2)],
        ..opts
    };
    let msg = read_layout(&opts).unwrap_err().to_string();
    assert!(!msg.contains("btrfs"), "{msg}");
    drop(mounts);
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 1), root.path(), &[]);
    mounts.mount(&part(&dev, 2), &root.path().join("srv"), &[]);
    let layout = read_layout(&opts).unwrap();
    assert!(matches!(
        layout.disks[0].partitions[1].content,
        Content::Raw { .. }
    ));
    assert_eq!(layout.trees().count(), 1);
}

#[test]
fn a_partition_sent_as_bytes_while_mounted_elsewhere_read_write_is_refused() {
    let dev = LoopDev::partitioned(256 * MIB);
    partition(
        &dev,
        &format!("label: gpt\nstart=2048, size=131072, type={LINUX}\nstart=133120, size=65536, type={LINUX}\n"),
        2,
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(part(&dev, 1)));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(part(&dev, 2)));
    let root = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 1), root.path(), &[]);
    mounts.mount(&part(&dev, 2), elsewhere.path(), &[]);
    let msg = read_layout(&ReadOptions {
        root: root.path().to_owned(),
        ..ReadOptions::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("mounted read-write") && msg.contains("not under the root"),
        "{msg}"
    );
}

#[test]
fn round_trip_onto_a_larger_disk_keeps_every_identity() {
    let m = source_machine(3);
    let layout = read_layout(&options(&m)).unwrap();
    let src = &layout.disks[0];
    let target = LoopDev::partitioned(2 * GIB);
    let plan = plan_disk(src, 2 * GIB, 512, None, 0).unwrap();
    let devices = write_table(&target.path, src, &plan).unwrap();
    let want: Vec<PathBuf> = (1..=5).map(|n| part(&target, n)).collect();
    assert_eq!(devices, want);

    // The ESP's bytes as a raw partition would bring them; first a vfat made
    // by make_filesystem, checked, then overwritten.
    let esp_fs = FileSystem {
        kind: FsKind::Vfat,
        uuid: "ABCD-1234".into(),
        label: Some("EFI".into()),
        mountpoint: "/boot/efi".into(),
        options: "umask=0077".into(),
        used: 0,
        excludes: vec![],
        make: MakeOptions {
            fat_bits: Some(32),
            ..MakeOptions::default()
        },
        mounted_at: None,
    };
    make_filesystem(&devices[1], &esp_fs).unwrap();
    let made = blkid(&devices[1]);
    assert_eq!(
        (
            made["TYPE"].as_str(),
            made["UUID"].as_str(),
            made["LABEL"].as_str(),
            made["VERSION"].as_str()
        ),
        ("vfat", "ABCD-1234", "EFI", "FAT32")
    );
    let mut from = fs::File::open(part(&m.dev, 2)).unwrap();
    let mut to = fs::OpenOptions::new()
        .write(true)
        .open(&devices[1])
        .unwrap();
    std::io::copy(&mut from, &mut to).unwrap();
    to.sync_all().unwrap();
    drop(to);

    for (p, dev) in src.partitions.iter().zip(&devices) {
        match &p.content {
            Content::Tree(fs) => make_filesystem(dev, fs).unwrap(),
            Content::Swap { uuid, label } => {
                make_swap(dev, uuid.as_deref(), label.as_deref()).unwrap()
            }
            Content::Raw { .. } | Content::Skipped { .. } => {}
        }
    }

    let table = probe::read_table(&target.path).unwrap();
    assert_eq!(table.label, "gpt");
    assert_eq!(table.id.as_deref(), Some(DISK_ID));
    assert_eq!(
        table.lastlba,
        Some(2 * GIB / 512 - 34),
        "backup header at the disk's end"
    );
    for (t, s) in table.partitions.iter().zip(&src.partitions) {
        assert_eq!(t.number(), Some(s.number));
        assert_eq!(
            (&t.type_id, &t.uuid, &t.name, &t.attrs),
            (&s.type_id, &s.uuid, &s.name, &s.attrs),
            "partition {}",
            s.number
        );
        assert_eq!(t.start, s.start);
    }
    let last = &table.partitions[4];
    assert!(
        last.size > src.partitions[4].size,
        "the last partition grew: {last:?}"
    );
    assert_eq!((last.start + last.size) % 2048, 0);

    let id = |d: &Path| {
        let b = blkid(d);
        (
            b.get("TYPE").cloned(),
            b.get("UUID").cloned(),
            b.get("LABEL").cloned(),
        )
    };
    for (n, d) in devices.iter().enumerate().skip(1) {
        assert_eq!(
            id(d),
            id(&part(&m.dev, n as u32 + 1)),
            "partition {}",
            n + 1
        );
    }
    assert_eq!(id(&devices[1]).1.as_deref(), Some(ESP_ID));
    // / is made as the source was: 4 KiB blocks, no metadata_csum.
    let features = |d: &Path| {
        let out = run(Command::new("dumpe2fs").arg("-h").arg(d));
        out.lines()
            .find_map(|l| l.strip_prefix("Filesystem features:"))
            .map(|f| f.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap()
    };
    let (src_root, dst_root) = (features(&part(&m.dev, 3)), features(&devices[2]));
    assert!(
        !dst_root.contains(&"metadata_csum".to_string()),
        "{dst_root:?}"
    );
    let mut a = src_root.clone();
    let mut b = dst_root.clone();
    a.retain(|f| f != "needs_recovery");
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let xfs = |d: &Path| {
        let out = run(Command::new("xfs_db").args(["-r", "-c", "version"]).arg(d));
        out.trim().to_string()
    };
    assert_eq!(xfs(&devices[3]), xfs(&part(&m.dev, 4)));

    // Written over a disk in use: refused before anything is written.
    let mut busy = Mounts::default();
    busy.mount(&devices[2], &m.root.path().join("tmp"), &[]);
    let err = write_table(&target.path, src, &plan).unwrap_err();
    drop(busy);
    assert!(err.to_string().contains("mounted"), "{err}");
}

#[test]
fn two_disks_come_in_mount_order_and_one_can_be_skipped() {
    let a = LoopDev::partitioned(64 * MIB);
    let b = LoopDev::partitioned(64 * MIB);
    for d in [&a, &b] {
        partition(
            d,
            &format!("label: gpt\nstart=2048, size=40960, type={LINUX}\n"),
            1,
        );
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(part(d, 1)));
    }
    let root = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&a, 1), root.path(), &[]);
    mounts.mount(&part(&b, 1), &root.path().join("srv"), &[]);
    let opts = ReadOptions {
        root: root.path().to_owned(),
        ..ReadOptions::default()
    };
    let layout = read_layout(&opts).unwrap();
    let devices: Vec<&str> = layout.disks.iter().map(|d| d.device.as_str()).collect();
    let want = [a.path.display().to_string(), b.path.display().to_string()];
    assert_eq!(devices, want);
    let trees: Vec<(usize, &str)> = layout
        .trees()
        .map(|(d, _, fs)| (d, fs.mountpoint.as_str()))
        .collect();
    assert_eq!(trees, [(0, "/"), (1, "/srv")]);

    let skipped = read_layout(&ReadOptions {
        skip_disks: vec![b.path.clone()],
        ..opts.clone()
    })
    .unwrap();
    assert_eq!(
        skipped.disks.len(),
        2,
        "a skipped disk is still partitioned"
    );
    assert!(
        matches!(&skipped.disks[1].partitions[0].content, Content::Skipped { why } if why.contains("--skip-disk")),
        "{:?}",
        skipped.disks[1]
    );
    assert_eq!(skipped.trees().count(), 1);

    // Only part of b's file system under the root (a bind mount of a
    // sub-directory, b itself mounted elsewhere): refused.
    drop(mounts);
    let elsewhere = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&a, 1), root.path(), &[]);
    mounts.mount(&part(&b, 1), elsewhere.path(), &[]);
    fs::create_dir_all(elsewhere.path().join("share")).unwrap();
    mounts.mount(
        &elsewhere.path().join("share"),
        &root.path().join("srv"),
        &["--bind"],
    );
    let msg = read_layout(&opts).unwrap_err().to_string();
    assert!(
        msg.contains(&format!(
            "{} is mounted at /srv only as its sub-directory /share",
            part(&b, 1).display()
        )),
        "{msg}"
    );
    drop(mounts);
}

#[test]
fn a_mounted_partition_gone_from_the_table_is_refused() {
    let dev = LoopDev::partitioned(64 * MIB);
    partition(
        &dev,
        &format!("label: gpt\nstart=2048, size=40960, type={LINUX}\nstart=43008, size=40960, type={LINUX}\n"),
        2,
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(part(&dev, 1)));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(part(&dev, 2)));
    let root = tempfile::tempdir().unwrap();
    let mut mounts = Mounts::default();
    mounts.mount(&part(&dev, 1), root.path(), &[]);
    mounts.mount(&part(&dev, 2), &root.path().join("srv"), &[]);
    // Partition 2 deleted on disk while mounted: the kernel keeps it.
    run(Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--delete"])
        .arg(&dev.path)
        .arg("2"));
    let msg = read_layout(&ReadOptions {
        root: root.path().to_owned(),
        ..ReadOptions::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("/srv") && msg.contains("has no partition 2"),
        "{msg}"
    );
    drop(mounts);
}
