//! A source machine made of loop devices, for system-clone tests: a GPT
//! disk laid out like a real machine's, its file systems mounted under a
//! directory and filled with everything a file tree can hold; and the
//! checks that compare a node's rebuilt disk with it.
//!
//! Loop devices are detached and mounts unmounted when their guards drop,
//! by device and by path.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{require_tool, run, stderr, stdout};

/// A loop device with partition scanning, detached when dropped.
#[derive(Debug)]
pub struct Loop(pub String);

impl Loop {
    /// Attaches `file` to a free loop device, its partitions scanned.
    pub fn attach(file: &Path) -> Loop {
        let o = run(
            Command::new(require_tool("losetup", "mount"))
                .args(["--find", "--show", "--partscan"])
                .arg(file),
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "losetup: {}", stderr(&o));
        Loop(stdout(&o).trim().to_string())
    }

    /// A new sparse file of `size` bytes at `file`, attached.
    pub fn blank(file: &Path, size: u64) -> Loop {
        fs::File::create(file).unwrap().set_len(size).unwrap();
        Loop::attach(file)
    }

    /// The device path.
    pub fn dev(&self) -> &str {
        &self.0
    }

    /// Partition `n`'s device.
    pub fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.0)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // A node killed mid-rebuild leaves this disk's file systems mounted:
        // they must go, or the device (and its file's blocks) stays.
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = format!("{}p", self.0);
        let mut points: Vec<&str> = table
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let dash = f.iter().position(|x| *x == "-")?;
                let source = f.get(dash + 2)?;
                (source.starts_with(&prefix) || *source == self.0).then_some(f[4])
            })
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount, unmounted (by its path) when dropped.
#[derive(Debug)]
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts `dev` at `dir` (created) with `options` (e.g. `nouuid` for a
    /// second xfs of the same UUID).
    pub fn new(dev: &str, dir: &Path, options: &[&str]) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let mut c = Command::new("mount");
        if !options.is_empty() {
            c.arg("-o").arg(options.join(","));
        }
        c.arg(dev).arg(dir);
        sh_ok(&mut c, &format!("mount {dev}"));
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Runs `c` (bounded), asserting success.
pub fn sh_ok(c: &mut Command, what: &str) -> String {
    let o = run(c, Duration::from_secs(120));
    assert!(o.status.success(), "{what}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Runs a bash script (bounded), asserting success; `args` are `$1`….
pub fn bash(script: &str, args: &[&str]) -> String {
    sh_ok(
        Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(script)
            .arg("bash")
            .args(args),
        "bash script",
    )
}

/// The GPT type GUIDs the source uses.
pub mod types {
    /// BIOS boot partition (GRUB's core on GPT).
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    /// EFI system partition.
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Linux swap.
    pub const SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
    /// Linux file system.
    pub const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
}

/// The source machine: a GPT loop disk with a BIOS boot partition, an ESP
/// (vfat, filled with mtools: this kernel may not mount vfat, so it is an
/// unmounted partition and goes raw), swap, an ext4 root and an xfs /home
/// (last, so a larger node grows it), mounted under `root`.
pub struct SourceMachine {
    /// Where its root file system is mounted (the `--root` to serve).
    pub root: PathBuf,
    /// Its disk.
    pub disk: Loop,
    /// Mounts, innermost last (dropped first).
    pub mounts: Vec<Mount>,
    /// The UUIDs of its root, /home and swap, its own (see
    /// [`unique_suffix`]).
    pub uuids: [String; 3],
}

/// The size of the source's disk.
pub const SOURCE_DISK: u64 = 1024 << 20;

/// A GPT source disk's size and its root partition's; the BIOS boot
/// partition (1 MiB), the ESP and swap (32 MiB each) are fixed, and /home
/// takes the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShape {
    /// The whole disk, in bytes.
    pub disk: u64,
    /// The ext4 root partition, in bytes (a multiple of 1 MiB).
    pub root: u64,
}

impl DiskShape {
    /// The test machine's: 1 GiB, of which 512 MiB of root.
    pub const TEST: DiskShape = DiskShape {
        disk: SOURCE_DISK,
        root: 512 << 20,
    };

    /// A disk whose root holds `root_files` bytes of files and whose /home
    /// holds `home_files`, each file system with a quarter more and 64 MiB
    /// for its own metadata and journal (and /home at least the 300 MB
    /// `mkfs.xfs` needs).
    pub fn holding(root_files: u64, home_files: u64) -> DiskShape {
        const MIB: u64 = 1 << 20;
        let fs = |files: u64| (files + files / 4 + 64 * MIB).div_ceil(MIB) * MIB;
        let root = fs(root_files);
        let home = fs(home_files).max(320 * MIB);
        // The table's 1 MiB before the first partition and GPT's backup
        // at the end.
        DiskShape {
            disk: MIB + MIB + 32 * MIB + 32 * MIB + root + home + MIB,
            root,
        }
    }
}

impl SourceMachine {
    /// Builds it in `dir`; `bulk` bytes of random data go in /usr/lib/bulk
    /// (to make a stream long enough to break in the middle).
    pub fn build(dir: &Path, bulk: usize) -> SourceMachine {
        let machine = SourceMachine::partitioned(dir, DiskShape::TEST);
        fill(&machine.root, bulk, &machine.uuids);
        machine
    }

    /// A machine that looks lived in, for measurements: a disk of `shape`
    /// whose root holds copies of this machine's own programs, libraries
    /// and data files (`/usr/bin`, `/usr/sbin`, `/usr/lib`, `/usr/share`)
    /// until `root_files` bytes, and whose /home holds more of them under
    /// `alice/` (`/usr/include`, `/usr/share/doc`, `/usr/local`,
    /// `/usr/lib`) until `home_files` bytes, less the boot loader tools (a
    /// partial /usr cannot run them, so nodes leave the clone's boot as it
    /// is, as for [`SourceMachine::build`]'s); then everything
    /// [`SourceMachine::build`] puts in a tree (links, devices, ACLs,
    /// capabilities, a sparse file, a /tmp to exclude) with 1 MiB of
    /// random bulk. Panics, saying so, if this machine has too few files.
    pub fn build_lived_in(
        dir: &Path,
        shape: DiskShape,
        root_files: u64,
        home_files: u64,
    ) -> (SourceMachine, Copied) {
        let machine = SourceMachine::partitioned(dir, shape);
        let mut copied = copy_real_files(
            &machine.root,
            &["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share"],
            root_files,
        );
        let home = machine.root.join("home/alice");
        fs::create_dir_all(&home).unwrap();
        copied.add(copy_real_files(
            &home,
            &["/usr/include", "/usr/share/doc", "/usr/local", "/usr/lib"],
            home_files,
        ));
        // Part of a /usr is no system to chroot into (no /bin/sh, no
        // loader): without its boot loader tools, a node leaves the clone
        // as it is instead of failing to run them.
        for tool in ka_net::system::bootloader::TOOLS {
            let _ = fs::remove_file(machine.root.join(tool));
        }
        fill(&machine.root, 1 << 20, &machine.uuids);
        (machine, copied)
    }

    /// The disk partitioned as `shape` says, its file systems made (the
    /// ESP filled) and mounted, root and /home empty.
    fn partitioned(dir: &Path, shape: DiskShape) -> SourceMachine {
        for (tool, pkg) in [
            ("sfdisk", "fdisk"),
            ("mkfs.ext4", "e2fsprogs"),
            ("mkfs.xfs", "xfsprogs"),
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
            ("mkswap", "util-linux"),
            ("setfattr", "attr"),
            ("setfacl", "acl"),
            ("setcap", "libcap2-bin"),
        ] {
            require_tool(tool, pkg);
        }
        let disk = Loop::blank(&dir.join("source.img"), shape.disk);
        // File-system UUIDs of this machine's own: xfs refuses to mount a
        // second file system of a UUID already mounted, and tests may build
        // machines side by side.
        let u = unique_suffix();
        let uuids = [
            format!("5e1f7007-0000-4000-8000-{u}"),
            format!("5e1f4043-0000-4000-8000-{u}"),
            format!("5e1f5a00-0000-4000-8000-{u}"),
        ];
        let script = format!(
            "label: gpt\nlabel-id: 5E1F0000-1111-4222-8333-444455556666\n\
             size=1MiB, type={}, name=bios, uuid=5E1F0001-0000-4000-8000-000000000001\n\
             size=32MiB, type={}, name=esp, uuid=5E1F0002-0000-4000-8000-000000000002\n\
             size=32MiB, type={}, name=swap, uuid=5E1F0003-0000-4000-8000-000000000003\n\
             size={}MiB, type={}, name=root, uuid=5E1F0004-0000-4000-8000-000000000004, attrs=\"LegacyBIOSBootable\"\n\
             type={}, name=home, uuid=5E1F0005-0000-4000-8000-000000000005\n",
            types::BIOS_BOOT,
            types::ESP,
            types::SWAP,
            shape.root >> 20,
            types::LINUX,
            types::LINUX
        );
        fs::write(dir.join("source.sfdisk"), script).unwrap();
        bash(
            r#"sfdisk -q "$1" < "$2"; partx -u "$1" || true; udevadm settle 2>/dev/null || true
for i in $(seq 50); do [ -b "$1p5" ] && break; sleep 0.1; done
printf 'fake bios core' | dd of="$1p1" conv=notrunc status=none
mkfs.vfat -n KAESP -i 1234ABCD "$1p2" >/dev/null
mkswap -L kaswap -U "$5" "$1p3" >/dev/null
mkfs.ext4 -q -F -L karoot -U "$3" "$1p4"
mkfs.xfs -q -f -L kahome -m uuid="$4" "$1p5"
"#,
            &[
                disk.dev(),
                dir.join("source.sfdisk").to_str().unwrap(),
                &uuids[0],
                &uuids[1],
                &uuids[2],
            ],
        );
        // The ESP, filled as an installer would, without mounting it.
        fs::write(dir.join("BOOTX64.EFI"), crate::pseudo_random(200_000, 64)).unwrap();
        bash(
            r#"export MTOOLS_SKIP_CHECK=1
mmd -i "$1" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$1" "$2" ::/EFI/BOOT/BOOTX64.EFI
echo 'configfile $prefix/grub.cfg' > "$3"
mcopy -i "$1" "$3" ::/EFI/debian/grub.cfg"#,
            &[
                &disk.part(2),
                dir.join("BOOTX64.EFI").to_str().unwrap(),
                dir.join("esp-grub.cfg").to_str().unwrap(),
            ],
        );
        let root = dir.join("source-root");
        let mut mounts = vec![Mount::new(&disk.part(4), &root, &[])];
        mounts.push(Mount::new(&disk.part(5), &root.join("home"), &[]));
        SourceMachine {
            root,
            disk,
            mounts,
            uuids,
        }
    }

    /// Unmounts its file systems (innermost first), so its disk can be
    /// served as an image that nothing writes.
    pub fn unmount(&mut self) {
        while let Some(m) = self.mounts.pop() {
            drop(m);
        }
    }
}

/// How much [`copy_real_files`] copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Regular files.
    pub files: u64,
    /// Their bytes (apparent sizes).
    pub bytes: u64,
}

impl Copied {
    fn add(&mut self, other: Copied) {
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// Copies this machine's own files from the directories `from` (absolute,
/// taken in order) into `dest`, each under its own path (`/usr/lib/x` →
/// `dest/usr/lib/x`), with modes, owners, links and times, until `bytes`
/// bytes of regular files: whole directories while they fit, else what
/// fits of their contents, in name order. Real files make a stream as a
/// machine's is (many small files, binaries, text), unlike random filler.
/// Panics, saying what to do, if the directories hold too little.
pub fn copy_real_files(dest: &Path, from: &[&str], bytes: u64) -> Copied {
    let mut picked = Vec::new();
    let mut left = bytes;
    let mut copied = Copied::default();
    for dir in from {
        let dir = Path::new(dir);
        if dir.is_dir() {
            pick_files(dir, &mut left, &mut picked, &mut copied);
        }
    }
    // What is left is less than the smallest file not taken.
    assert!(
        left < bytes / 100 + (1 << 20),
        "this machine has only {} MiB of files under {} to copy, not {} MiB: ask for less",
        copied.bytes >> 20,
        from.join(", "),
        bytes >> 20
    );
    let list = dest.join(".ka-copy-list");
    let mut text = Vec::new();
    for p in &picked {
        let rel = p.strip_prefix("/").unwrap_or(p);
        text.extend_from_slice(rel.as_os_str().as_encoded_bytes());
        text.push(0);
    }
    fs::write(&list, text).unwrap();
    bash(
        r#"tar -C / --null --files-from="$1" --create --file=- --numeric-owner --xattrs --acls \
  | tar -C "$2" --extract --file=- --numeric-owner --same-owner --preserve-permissions --xattrs --acls
rm -f "$1""#,
        &[list.to_str().unwrap(), dest.to_str().unwrap()],
    );
    copied
}

/// Adds to `picked` what of `dir` fits in `left` bytes of regular files
/// (see [`copy_real_files`]); never crosses into another file system.
fn pick_files(dir: &Path, left: &mut u64, picked: &mut Vec<PathBuf>, copied: &mut Copied) {
    let dev = fs::symlink_metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    names.sort();
    for p in names {
        if *left == 0 {
            return;
        }
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        let ft = m.file_type();
        let size = if ft.is_dir() {
            files_under(&p)
        } else if ft.is_file() {
            Copied {
                files: 1,
                bytes: m.len(),
            }
        } else if ft.is_symlink() {
            Copied::default()
        } else {
            // Sockets, fifos and devices have no place among copied files.
            continue;
        };
        if size.bytes <= *left {
            *left -= size.bytes;
            copied.add(size);
            picked.push(p);
        } else if ft.is_dir() {
            pick_files(&p, left, picked, copied);
        }
    }
}

/// The regular files under `dir` on its file system: how many, how many
/// bytes.
fn files_under(dir: &Path) -> Copied {
    let mut total = Copied::default();
    let dev = fs::symlink_metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            } else if m.is_file() {
                total.files += 1;
                total.bytes += m.len();
            }
        }
    }
    total
}

impl Drop for SourceMachine {
    fn drop(&mut self) {
        while let Some(m) = self.mounts.pop() {
            drop(m);
        }
    }
}

/// Everything a file tree can hold, in the mounted source: contents, hard
/// links, a sparse file, symlinks, device nodes, a fifo, numeric owners
/// without names, modes, times, xattrs, POSIX ACLs, file capabilities, and
/// a directory of mode 1777 to be excluded.
fn fill(root: &Path, bulk: usize, [root_uuid, home_uuid, swap_uuid]: &[String; 3]) {
    let r = |p: &str| root.join(p);
    for d in [
        "etc",
        "usr/bin",
        "usr/lib",
        "var/log",
        "dev",
        "tmp",
        "boot",
        "home/alice",
    ] {
        fs::create_dir_all(r(d)).unwrap();
    }
    fs::write(
        r("etc/fstab"),
        format!(
            "UUID={root_uuid} / ext4 errors=remount-ro 0 1\n\
             UUID={home_uuid} /home xfs defaults 0 2\n\
             UUID={swap_uuid} none swap sw 0 0\n"
        ),
    )
    .unwrap();
    fs::write(r("etc/hostname"), "golden\n").unwrap();
    fs::write(r("etc/machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    fs::write(r("usr/lib/bulk"), crate::pseudo_random(bulk, 7)).unwrap();
    fs::write(r("usr/bin/tool"), crate::pseudo_random(300_000, 8)).unwrap();
    fs::write(r("usr/bin/ping"), crate::pseudo_random(50_000, 9)).unwrap();
    fs::write(r("home/alice/notes.txt"), "alice's notes\n").unwrap();
    fs::write(r("tmp/scratch"), "not to be cloned\n").unwrap();
    fs::write(r("boot/grub.cfg"), "menuentry golden {}\n").unwrap();
    // A shell, so a post-command can run chrooted into the clone.
    fs::create_dir_all(r("bin")).unwrap();
    fs::copy(require_tool("busybox", "busybox-static"), r("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r("bin/sh")).unwrap();
    bash(
        r#"cd "$1"
ln usr/bin/tool usr/bin/tool-hardlink
ln -s tool usr/bin/tool-symlink
ln -s /nonexistent/target etc/dangling
truncate -s 64M var/sparse
printf 'middle' | dd of=var/sparse bs=1 seek=33554432 conv=notrunc status=none
mknod dev/null c 1 3
mknod dev/loopx b 7 200
mkfifo var/fifo
chown 1234:5678 usr/bin/tool
chown -h 4321:8765 usr/bin/tool-symlink
chown 1000:1000 home/alice home/alice/notes.txt
chmod 4755 usr/bin/ping
chmod 1777 tmp
chmod 0640 etc/hostname
setfattr -n user.ka -v "cloned" usr/bin/tool
setfattr -n trusted.ka -v "trusted" var/log
setfacl -m u:2001:rwx,g:2002:r-x var/log
setfacl -d -m u:2001:rwx var/log
setcap cap_net_raw+ep usr/bin/ping
touch -h -d '2001-02-03 04:05:06' usr/bin/tool-symlink
touch -d '1999-12-31 23:59:59' etc/hostname
"#,
        &[root.to_str().unwrap()],
    );
}

/// Twelve hex digits no other machine built now shares: the process, the
/// time and a counter.
fn unique_suffix() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let x = (u64::from(std::process::id()) << 24) ^ u64::from(t) ^ (n << 44);
    format!("{:012x}", x & 0xffff_ffff_ffff)
}

/// One entry of a tree as a comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Type, mode, owner, size, device number and link target.
    pub stat: String,
    /// Modification time (not for directories, which tar sets last).
    pub mtime: Option<i64>,
    /// Extended attributes (ACLs and capabilities are xattrs), sorted.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Content digest of a regular file.
    pub content: Option<blake3::Hash>,
    /// Hard link group: the first path of its inode, for files with links.
    pub link_group: Option<String>,
    /// Allocated bytes (to see sparse files stay sparse).
    pub allocated: u64,
}

/// Every entry under `dir` (not crossing into other file systems), by
/// relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let dev = fs::metadata(dir).unwrap().dev();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
            let ft = m.file_type();
            let link = if ft.is_symlink() {
                fs::read_link(&p).unwrap().to_string_lossy().to_string()
            } else {
                String::new()
            };
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            };
            let rdev = if kind == 'c' || kind == 'b' {
                m.rdev()
            } else {
                0
            };
            let size = if kind == 'd' { 0 } else { m.len() };
            let stat = format!(
                "{kind} {:o} {}:{} {size} {rdev} {link}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            );
            let link_group = (kind == 'f' && m.nlink() > 1)
                .then(|| inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone());
            let content = (kind == 'f').then(|| blake3::hash(&fs::read(&p).unwrap()));
            let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&p)
                .map(|names| {
                    names
                        .map(|n| {
                            let v = xattr::get(&p, &n).ok().flatten().unwrap_or_default();
                            (n.to_string_lossy().to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            xattrs.sort();
            out.insert(
                rel,
                Entry {
                    stat,
                    mtime: (kind != 'd').then(|| m.mtime()),
                    xattrs,
                    content,
                    link_group,
                    allocated: m.blocks() * 512,
                },
            );
            if kind == 'd' && m.dev() == dev {
                stack.push(p);
            }
        }
    }
    out
}

/// The differences between two trees, one line each (empty when equal).
/// `allowed` paths may be missing from `b` or differ in content (excluded
/// directories' contents).
pub fn diff_trees(
    a: &BTreeMap<String, Entry>,
    b: &BTreeMap<String, Entry>,
    allowed: &[&str],
) -> Vec<String> {
    let mut out = Vec::new();
    let skip = |p: &str| allowed.iter().any(|x| p.starts_with(x));
    for (p, ea) in a {
        match b.get(p) {
            None if skip(p) => {}
            None => out.push(format!("{p}: missing")),
            Some(eb) => {
                let mut ea = ea.clone();
                let mut eb = eb.clone();
                ea.allocated = 0;
                eb.allocated = 0;
                if ea != eb {
                    out.push(format!("{p}: {ea:?} != {eb:?}"));
                }
            }
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            out.push(format!("{p}: extra"));
        }
    }
    out
}

/// `blkid` fields of a device: TYPE, UUID, LABEL….
pub fn blkid(dev: &str) -> BTreeMap<String, String> {
    let text = sh_ok(
        Command::new("blkid").args(["-p", "-o", "export", dev]),
        &format!("blkid {dev}"),
    );
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `sfdisk --json` of a disk.
pub fn partition_table(dev: &str) -> serde_json::Value {
    let text = sh_ok(
        Command::new("sfdisk").args(["--json", dev]),
        "sfdisk --json",
    );
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["partitiontable"].clone()
}
