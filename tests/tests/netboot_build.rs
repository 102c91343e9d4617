//! `ka netboot build` puts the programs a system clone runs into the
//! image, each with its loader and libraries, and they work there: the
//! image is unpacked and each program runs chrooted into it, with nothing
//! of the host's libraries in reach, partitioning, making every file
//! system and unpacking a tar stream with ACLs and extended attributes as
//! a node does. A host without some of them still gets an image, and the
//! build names each missing program with its Debian package.
//!
//! The kernel is a stand-in (every default module built in) where what is
//! checked is the user space. tests/tests/pxe_clone_vms.rs boots a real
//! image. The modules test takes the Debian kernel `scripts/fetch-kernel`
//! caches and compresses its modules as RHEL-family (xz) and Ubuntu (zstd)
//! kernels ship them, and gzip: the image must carry them decompressed,
//! byte for byte the modules they were made from.
//!
//! Needs root (chroot, and a mount namespace for /proc inside it) and the
//! Debian packages in scripts/apt-packages.txt.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ka_bin::netboot::archive::{self, Listed};
use ka_bin::netboot::elf;
use ka_bin::netboot::modules::{self, ModuleIndex, DEFAULT_MODULES, SYSTEM_MODULES};
use ka_bin::netboot::tools::{self, SYSTEM_TOOLS};
use ka_tests::{ka_bin, require_tool, run, stderr, stdout};

/// A kernel tree `ka netboot build --kernel-tree` accepts, whose modules are
/// all built in: `boot/vmlinuz-1.0` and `lib/modules/1.0`.
fn stand_in_kernel(dir: &Path) -> PathBuf {
    let tree = dir.join("kernel");
    let modules = tree.join("lib/modules/1.0");
    fs::create_dir_all(modules.join("kernel")).unwrap();
    fs::create_dir_all(tree.join("boot")).unwrap();
    fs::write(tree.join("boot/vmlinuz-1.0"), b"not a kernel").unwrap();
    let builtin: String = DEFAULT_MODULES
        .iter()
        .chain(SYSTEM_MODULES)
        .map(|m| format!("kernel/{m}.ko\n"))
        .collect();
    fs::write(modules.join("modules.builtin"), builtin).unwrap();
    tree
}

fn netboot_build(out: &Path, tree: &Path, extra: &[&str]) -> std::process::Output {
    let o = run(
        Command::new(ka_bin())
            .args(["netboot", "build", "--out"])
            .arg(out)
            .arg("--kernel-tree")
            .arg(tree)
            .args(extra),
        Duration::from_secs(180),
    );
    assert!(
        o.status.success(),
        "ka netboot build failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// The image's entries by path.
fn image_entries(initramfs: &Path) -> BTreeMap<String, Listed> {
    archive::read(&fs::read(initramfs).unwrap())
        .unwrap()
        .into_iter()
        .map(|l| (l.path.clone(), l))
        .collect()
}

/// Writes the image's directories, files and links under `root`
/// (device nodes are left out: the test needs none).
fn unpack(entries: &BTreeMap<String, Listed>, root: &Path) {
    for (path, e) in entries {
        let at = root.join(path);
        match e.mode & 0o170000 {
            0o040000 => fs::create_dir_all(&at).unwrap(),
            0o100000 => {
                fs::write(&at, &e.data).unwrap();
                fs::set_permissions(&at, fs::Permissions::from_mode(e.mode & 0o7777)).unwrap();
            }
            0o120000 => symlink(e.link_target().unwrap(), &at).unwrap(),
            _ => {}
        }
    }
}

/// What a node does with the tools, run inside the image: /proc mounted by
/// util-linux's mount, a partition table written, every file system made
/// and recognised, a signature wiped, the test's tree carried through GNU
/// tar as a system stream carries it, the busybox chroot.
///
/// `@NAME@` stands for the tool's path in the image: once /proc is
/// mounted, the image's busybox sh runs its own applet of a command's name
/// whatever PATH says (ka runs programs by PATH, which finds the tools).
const SCRIPT: &str = r#"
set -ex
@mount@ -t proc proc /proc
@mount@ --version | grep -q util-linux
@umount@ --version | grep -q util-linux
cd /work
printf 'label: gpt\n,8MiB,U\n,,L\n' | @sfdisk@ -q disk.img
test "$(@partx@ -g -o NR --show disk.img | wc -l)" = 2
@blockdev@ --help 2>&1 | grep -q getsize64
@mkfs.ext4@ -q -F ext4.img
@mke2fs@ -q -F -t ext3 ext3.img
@mkfs.xfs@ -q -f xfs.img
@mkfs.vfat@ vfat.img >/dev/null
@mkswap@ swap.img >/dev/null
for t in ext4 ext3 xfs vfat swap; do
  test "$(@blkid@ -o value -s TYPE $t.img)" = "$t"
done
@wipefs@ -q -a ext4.img
! @blkid@ ext4.img
@tar@ --version | grep -q 'GNU tar'
@tar@ --create --xattrs --xattrs-include='*' --acls --numeric-owner -f tree.tar -C tree .
mkdir out
@tar@ --extract --file=tree.tar --preserve-permissions --same-owner --numeric-owner \
  --acls --xattrs --xattrs-include='*' -C out
test "$(cat out/etc/hostname)" = node
chroot / true
@umount@ /proc
echo ALL-TOOLS-WORK
"#;

#[test]
fn the_image_carries_working_system_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test chroots into the image: run it as root"
    );
    let unshare = require_tool("unshare", "util-linux");
    let chroot = require_tool("chroot", "coreutils");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = stand_in_kernel(d);

    let o = netboot_build(&d.join("root"), &tree, &[]);
    let out = stdout(&o);
    let (found, missing) = tools::find(
        &tools::DEFAULT_TOOL_DIRS
            .iter()
            .map(PathBuf::from)
            .collect::<Vec<_>>(),
    );
    assert!(
        missing.is_empty(),
        "this host lacks system tools the test needs: {missing:?}; install scripts/apt-packages.txt"
    );
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert!(out.contains("system clone tools: bin/tar "), "{out}");

    // The version file names the ka packed into the image, for ka doctor.
    let version = fs::read_to_string(d.join("root/ka/initramfs.img.version")).unwrap();
    assert_eq!(
        ka_bin::netboot::version::KaVersion::from_file(&version),
        Ok(ka_bin::netboot::version::KaVersion::running()),
        "{version}"
    );

    let entries = image_entries(&d.join("root/ka/initramfs.img"));
    for f in &found {
        let path = f.image_path();
        assert!(
            entries.get(&path).is_some_and(Listed::is_file),
            "{path} is not in the image:\n{out}"
        );
        let needs = elf::needs(&f.path).unwrap();
        for lib in needs.interpreter.iter().chain(&needs.libraries) {
            let key = lib.to_string_lossy().trim_start_matches('/').to_string();
            assert!(
                entries.get(&key).is_some_and(Listed::is_file),
                "{key}, which {path} needs, is not in the image"
            );
            assert!(out.contains(&lib.display().to_string()), "{out}");
        }
        for alias in f.tool.aliases {
            let dir = path.rsplit_once('/').unwrap().0;
            let link = format!("{dir}/{alias}");
            assert_eq!(
                entries.get(&link).and_then(Listed::link_target),
                Some(f.tool.name),
                "{link}"
            );
        }
    }

    // Run them where only the image's own libraries can be found.
    let root = d.join("unpacked");
    unpack(&entries, &root);
    let work = root.join("work");
    fs::create_dir(&work).unwrap();
    for (name, mib) in [
        ("disk.img", 64),
        ("ext4.img", 32),
        ("ext3.img", 32),
        // mkfs.xfs refuses file systems under 300 MiB.
        ("xfs.img", 320),
        ("vfat.img", 64),
        ("swap.img", 16),
    ] {
        let f = fs::File::create(work.join(name)).unwrap();
        f.set_len(mib << 20).unwrap();
    }
    // A tree with what only GNU tar carries: an ACL, an extended attribute
    // and a numeric owner no name in the image stands for.
    let file = work.join("tree/etc/hostname");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, "node\n").unwrap();
    std::os::unix::fs::chown(&file, Some(4321), Some(4321)).unwrap();
    let setfacl = require_tool("setfacl", "acl");
    let o = run(
        Command::new(&setfacl).args(["-m", "u:1234:r"]).arg(&file),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "setfacl: {}", stderr(&o));
    set_xattr(&file, "user.ka", b"clone");

    let mut script = SCRIPT.to_string();
    for f in &found {
        let dir = f.image_path().rsplit_once('/').unwrap().0.to_string();
        for name in std::iter::once(&f.tool.name).chain(f.tool.aliases) {
            script = script.replace(&format!("@{name}@"), &format!("/{dir}/{name}"));
        }
    }
    assert!(
        !script.contains('@'),
        "a tool the script runs is not in the image:\n{script}"
    );

    // A private mount namespace: the /proc mounted inside goes with it,
    // however the script ends.
    let o = run(
        Command::new(unshare)
            .args(["--mount", "--propagation", "private", "--fork"])
            .arg(chroot)
            .arg(&root)
            .args(["/bin/sh", "-c", &script])
            .env_clear()
            .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin"),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success() && stdout(&o).contains("ALL-TOOLS-WORK"),
        "the tools failed inside the image ({}):\n{}\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    let copy = work.join("out/etc/hostname");
    assert_eq!(get_xattr(&copy, "user.ka"), b"clone");
    let meta = fs::metadata(&copy).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta)
        ),
        (4321, 4321)
    );
    let getfacl = require_tool("getfacl", "acl");
    let o = run(
        Command::new(getfacl).args(["-c", "-n"]).arg(&copy),
        Duration::from_secs(10),
    );
    assert!(stdout(&o).contains("user:1234:r--"), "{}", stdout(&o));
}

fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the value pointer and length describe one slice.
    let r = unsafe {
        libc::setxattr(
            c_path(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(path: &Path, name: &str) -> Vec<u8> {
    let cname = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the buffer pointer and length describe one writable slice.
    let n = unsafe {
        libc::getxattr(
            c_path(path).as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n >= 0,
        "{name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf
}

#[test]
fn a_host_without_some_tools_gets_an_image_and_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = stand_in_kernel(d);
    let only_tar = d.join("tools");
    fs::create_dir(&only_tar).unwrap();
    symlink(require_tool("tar", "tar"), only_tar.join("tar")).unwrap();

    let o = netboot_build(
        &d.join("root"),
        &tree,
        &["--tools-path", only_tar.to_str().unwrap()],
    );
    let err = stderr(&o);
    assert!(
        err.contains("system clones (ka.clone=system) will fail"),
        "{err}"
    );
    for t in SYSTEM_TOOLS.iter().filter(|t| t.name != "tar") {
        let line = format!("  {}: Debian package `{}`", t.name, t.package);
        assert!(err.contains(&line), "{line} not in:\n{err}");
    }
    assert!(
        err.contains("apt-get install dosfstools e2fsprogs fdisk mount util-linux xfsprogs"),
        "{err}"
    );
    let entries = image_entries(&d.join("root/ka/initramfs.img"));
    assert!(entries["bin/tar"].is_file());
    assert!(!entries.contains_key("sbin/mkfs.xfs"));
    // Busybox's mount stands in, so the image still boots.
    assert_eq!(entries["bin/mount"].link_target(), Some("/bin/busybox"));

    // Left out on purpose: no warning, a note, and busybox's tar.
    let o = netboot_build(&d.join("root2"), &tree, &["--no-system-tools"]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("note: no system tools in the image"),
        "{}",
        stdout(&o)
    );
    let entries = image_entries(&d.join("root2/ka/initramfs.img"));
    assert_eq!(entries["bin/tar"].link_target(), Some("/bin/busybox"));
}

/// How one module file is packed, as the kernel's `modules_install` packs
/// it with `CONFIG_MODULE_COMPRESS_*`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Packing {
    Plain,
    Xz,
    Zstd,
    Gzip,
}

impl Packing {
    fn extension(self) -> &'static str {
        match self {
            Packing::Plain => "",
            Packing::Xz => ".xz",
            Packing::Zstd => ".zst",
            Packing::Gzip => ".gz",
        }
    }

    /// Compresses `file` in place into `file` + [`Packing::extension`],
    /// with the kernel's own command lines (scripts/Makefile.modinst).
    fn pack(self, file: &Path) {
        let mut cmd = match self {
            Packing::Plain => return,
            Packing::Xz => {
                let mut c = Command::new(require_tool("xz", "xz-utils"));
                c.args(["--check=crc32", "--lzma2=dict=1MiB", "-f"]);
                c
            }
            Packing::Zstd => {
                let mut c = Command::new(require_tool("zstd", "zstd"));
                c.args(["-T0", "--rm", "-f", "-q"]);
                c
            }
            Packing::Gzip => {
                let mut c = Command::new(require_tool("gzip", "gzip"));
                c.args(["-n", "-f"]);
                c
            }
        };
        let o = run(cmd.arg(file), Duration::from_secs(60));
        assert!(
            o.status.success(),
            "{self:?} of {}: {}",
            file.display(),
            stderr(&o)
        );
    }
}

/// A copy of the Debian kernel `kernel` (version `version`) with only the
/// modules `needed` (in load order), module `i` packed as `packing(i)`,
/// and the modules.dep depmod writes for it: every file under the name it
/// has (`.ko.xz`, …), each module's dependencies all listed, the last to
/// load first. Returns the tree for `--kernel-tree`.
fn packed_kernel(
    kernel: &Path,
    version: &str,
    needed: &[modules::Module],
    index: &ModuleIndex,
    to: &Path,
    packing: &dyn Fn(usize) -> Packing,
) -> PathBuf {
    let from = kernel.join("lib/modules").join(version);
    let dir = to.join("lib/modules").join(version);
    fs::create_dir_all(dir.join("kernel")).unwrap();
    fs::create_dir_all(to.join("boot")).unwrap();
    let vmlinuz = format!("boot/vmlinuz-{version}");
    symlink(kernel.join(&vmlinuz), to.join(&vmlinuz)).unwrap();
    fs::copy(from.join("modules.builtin"), dir.join("modules.builtin")).unwrap();
    let mut names = BTreeMap::new();
    for (i, m) in needed.iter().enumerate() {
        let rel = m.path.strip_prefix(&from).unwrap();
        let file = dir.join(rel);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::copy(&m.path, &file).unwrap();
        let how = packing(i);
        how.pack(&file);
        names.insert(
            m.name.clone(),
            format!("{}{}", rel.display(), how.extension()),
        );
    }
    let mut dep = String::new();
    for m in needed {
        let order = index.load_order(&[m.name.as_str()]).unwrap();
        let deps: Vec<&str> = order
            .iter()
            .rev()
            .filter(|d| d.name != m.name)
            .map(|d| names[&d.name].as_str())
            .collect();
        dep.push_str(&format!("{}: {}\n", names[&m.name], deps.join(" ")));
    }
    fs::write(dir.join("modules.dep"), dep).unwrap();
    to.to_path_buf()
}

#[test]
fn compressed_modules_go_into_the_image_decompressed() {
    let kernel = ka_tests::debian_kernel();
    let versions: Vec<String> = fs::read_dir(kernel.join("lib/modules"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "one kernel expected in {}",
        kernel.display()
    );
    let version = &versions[0];
    let index = ModuleIndex::open(&kernel.join("lib/modules").join(version)).unwrap();
    // The default modules: the images are built with --no-system-tools,
    // which leaves out the system clone's file-system modules too.
    let wanted: Vec<&str> = DEFAULT_MODULES
        .iter()
        .copied()
        .filter(|m| index.has(m))
        .collect();
    let needed = index.load_order(&wanted).unwrap();
    assert!(
        needed.len() >= 20 && needed.iter().all(|m| m.path.extension().unwrap() == "ko"),
        "Debian's kernel should give 20 or more plain modules: {needed:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mixed = [Packing::Xz, Packing::Zstd, Packing::Gzip, Packing::Plain];
    let trees: [(&str, &dyn Fn(usize) -> Packing); 4] = [
        ("xz", &|_| Packing::Xz),
        ("zstd", &|_| Packing::Zstd),
        ("gzip", &|_| Packing::Gzip),
        ("mixed", &|i| mixed[i % mixed.len()]),
    ];
    let mut images = Vec::new();
    for (label, packing) in trees {
        let tree = packed_kernel(&kernel, version, &needed, &index, &d.join(label), packing);
        let root = d.join(format!("root-{label}"));
        let o = netboot_build(&root, &tree, &["--no-system-tools"]);
        let initramfs = root.join("ka/initramfs.img");
        let entries = image_entries(&initramfs);
        let list = String::from_utf8(entries["etc/ka/modules"].data.clone()).unwrap();
        let listed: Vec<&str> = list.lines().collect();
        assert_eq!(
            listed.len(),
            needed.len(),
            "{label}: {list}\n{}",
            stdout(&o)
        );
        for m in &needed {
            let file = format!("{}.ko", m.name);
            let pos = listed.iter().position(|l| *l == file);
            assert!(
                pos.is_some(),
                "{label}: {file} not in the load list:\n{list}"
            );
            let got = &entries[&format!("lib/modules/ka/{file}")].data;
            // What insmod reads: the very module the kernel package has,
            // an ELF relocatable object.
            assert!(
                *got == fs::read(&m.path).unwrap(),
                "{label}: {file} in the image differs from {}",
                m.path.display()
            );
            let elf = goblin::elf::Elf::parse(got).unwrap();
            assert_eq!(
                elf.header.e_type,
                goblin::elf::header::ET_REL,
                "{label}: {file}"
            );
            // Loaded after everything it needs.
            for d in modules::modinfo_depends(got).unwrap() {
                if let Some(dpos) = listed.iter().position(|l| *l == format!("{d}.ko")) {
                    assert!(dpos < pos.unwrap(), "{label}: {d} must load before {file}");
                } else {
                    assert!(
                        index.has(&d),
                        "{label}: {d}, which {file} needs, is missing"
                    );
                }
            }
        }
        assert!(
            !entries
                .keys()
                .any(|k| k.ends_with(".xz") || k.ends_with(".zst") || k.ends_with(".gz")),
            "{label}: a compressed file in the image"
        );
        images.push((label, fs::read(&initramfs).unwrap()));
    }
    // However the modules were packed, one image.
    for (label, image) in &images[1..] {
        assert!(
            *image == images[0].1,
            "the {label} image differs from the xz one"
        );
    }
    eprintln!(
        "{} modules; initramfs {} bytes",
        needed.len(),
        images[0].1.len()
    );

    // A damaged module stops the build, named.
    let ext4 = needed
        .iter()
        .find(|m| m.name == "ext4")
        .expect("ext4 is a module");
    let rel = ext4
        .path
        .strip_prefix(kernel.join("lib/modules").join(version))
        .unwrap();
    let broken = d
        .join("xz/lib/modules")
        .join(version)
        .join(format!("{}.xz", rel.display()));
    let mut bytes = fs::read(&broken).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    fs::write(&broken, bytes).unwrap();
    let o = run(
        Command::new(ka_bin())
            .args(["netboot", "build", "--no-system-tools", "--out"])
            .arg(d.join("root-broken"))
            .arg("--kernel-tree")
            .arg(d.join("xz")),
        Duration::from_secs(180),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{} is not a valid xz-compressed kernel module",
            broken.display()
        )),
        "{err}"
    );
    assert!(!d.join("root-broken/ka/initramfs.img").exists());
}
