//! `ka netboot build`: the initramfs install-mode nodes boot, and a TFTP
//! root laid out for `ka tftp`.
//!
//! The image holds busybox (Debian's static build: a shell and the tools the
//! init uses), the `ka` binary with its loader and shared libraries, the
//! programs a system clone runs ([`super::tools`]) with theirs, the chosen
//! kernel modules with a load order computed here, the init and the DHCP
//! script. Never a key: the image goes to whoever asks for it over TFTP, so
//! each node fetches its own key from `ka tftp` instead ([`crate::boot::keys`]).

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::archive::Archive;
use super::elf;
use super::modules::{read_module, Compression, ModuleIndex, DEFAULT_MODULES, SYSTEM_MODULES};
use super::tools::{self, FoundTool, MissingTool, DEFAULT_TOOL_DIRS, SYSTEM_TOOLS};

/// The init the image runs as PID 1.
pub const INIT: &str = include_str!("init.sh");
/// The script udhcpc runs to apply a lease.
pub const UDHCPC_SCRIPT: &str = include_str!("udhcpc.script");

/// Where Debian's `pxelinux` package puts the PXE boot loader.
pub const PXELINUX: &str = "/usr/lib/PXELINUX/pxelinux.0";
/// Where Debian's `syslinux-common` puts the BIOS modules.
pub const SYSLINUX_MODULES: &str = "/usr/lib/syslinux/modules/bios";
/// Debian's `busybox-static`.
pub const BUSYBOX: &str = "/bin/busybox";
/// Debian's `ipxe` package: iPXE for UEFI machines (copied when present).
pub const IPXE_EFI: &str = "/usr/lib/ipxe/ipxe.efi";
/// Debian's `shim-signed`: the first stage of a Secure Boot network boot,
/// signed with Microsoft's UEFI CA, which firmware trusts out of the box
/// (copied as `shimx64.efi` when present, with [`GRUBNET_SIGNED`]).
pub const SHIM_SIGNED: &str = "/usr/lib/shim/shimx64.efi.signed";
/// Debian's `grub-efi-amd64-signed`: GRUB's network image, signed by
/// Debian, which shim verifies and loads by TFTP from its own directory
/// as `grubx64.efi` (copied under that name when present).
pub const GRUBNET_SIGNED: &str = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed";

/// The syslinux modules pxelinux loads: `ldlinux.c32` always, the others
/// for `local_boot = "chain"` (`chain.c32` and the libraries it links).
pub const SYSLINUX_FILES: &[&str] = &["ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32"];

/// Applets the init, `ka netboot install` and a system clone (`chroot`, to
/// install the clone's boot loader from the clone) call, linked even when
/// the busybox binary cannot list its own (e.g. built for another machine).
const NEEDED_APPLETS: &[&str] = &[
    "sh", "mount", "umount", "mkdir", "insmod", "grep", "cat", "echo", "sleep", "setsid", "sync",
    "reboot", "poweroff", "dmesg", "uname", "ip", "udhcpc", "tftp", "hostname", "ls", "ps",
    "chroot",
];

/// What goes into the image and the TFTP root.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The TFTP root to fill.
    pub out: PathBuf,
    /// The kernel image nodes boot.
    pub kernel: PathBuf,
    /// That kernel's modules directory (`lib/modules/<version>`).
    pub modules_dir: PathBuf,
    /// Module names: the defaults unless replaced, plus extras.
    pub modules: Vec<String>,
    /// Modules added only when the kernel has them (those a system clone
    /// mounts with, [`SYSTEM_MODULES`]).
    pub system_modules: Vec<String>,
    /// The `ka` binary to put in the image.
    pub ka: PathBuf,
    /// Strip debug information from the `ka` copy (objcopy, binutils).
    pub strip: bool,
    /// The static busybox.
    pub busybox: PathBuf,
    /// Put the programs a system clone runs ([`SYSTEM_TOOLS`]) in the image.
    pub system_tools: bool,
    /// Where to look for them on this host, in order.
    pub tool_dirs: Vec<PathBuf>,
    /// pxelinux.0.
    pub pxelinux: PathBuf,
    /// The directory with ldlinux.c32 and friends.
    pub syslinux_modules: PathBuf,
    /// Path of the kernel inside the TFTP root (the inventory's `boot.kernel`).
    pub kernel_name: String,
    /// Path of the initramfs inside the TFTP root (`boot.initramfs`).
    pub initramfs_name: String,
}

impl BuildOptions {
    /// Options with Debian's default paths for everything but the kernel.
    pub fn new(out: PathBuf, kernel: PathBuf, modules_dir: PathBuf, ka: PathBuf) -> BuildOptions {
        BuildOptions {
            out,
            kernel,
            modules_dir,
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            system_modules: SYSTEM_MODULES.iter().map(|m| m.to_string()).collect(),
            ka,
            strip: true,
            busybox: BUSYBOX.into(),
            system_tools: true,
            tool_dirs: DEFAULT_TOOL_DIRS.iter().map(PathBuf::from).collect(),
            pxelinux: PXELINUX.into(),
            syslinux_modules: SYSLINUX_MODULES.into(),
            kernel_name: "ka/vmlinuz".into(),
            initramfs_name: "ka/initramfs.img".into(),
        }
    }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    /// Modules in load order.
    pub modules: Vec<String>,
    /// Shared libraries (and the loader) copied for `ka` and the system tools.
    pub libraries: Vec<PathBuf>,
    /// The system tools in the image, by their path there.
    pub tools: Vec<String>,
    /// The system tools left out, and why: system clones that need them
    /// fail on nodes booting this image.
    pub missing_tools: Vec<MissingTool>,
    /// Size of the compressed initramfs.
    pub initramfs_bytes: u64,
    /// Every file written into the TFTP root, relative to it.
    pub files: Vec<String>,
    /// Notes for the administrator (optional pieces left out).
    pub notes: Vec<String>,
}

fn need_file(path: &Path, what: &str, package: &str) -> anyhow::Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        bail!(
            "{what} {} is missing: install the Debian package `{package}` (apt-get install {package}) or give its path",
            path.display()
        )
    }
}

/// The initramfs, in memory, with what went into it.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The archive to write.
    pub archive: Archive,
    /// Modules in load order.
    pub modules: Vec<String>,
    /// [`BuildOptions::system_modules`] the kernel does not have.
    pub absent_modules: Vec<String>,
    /// The loader and shared libraries copied for `ka` and the system
    /// tools, each once, sorted.
    pub libraries: Vec<PathBuf>,
    /// The system tools copied, by their path in the image.
    pub tools: Vec<String>,
    /// The system tools left out, and why.
    pub missing_tools: Vec<MissingTool>,
}

/// Copies the program `from` to `path` in `a`, with its loader and shared
/// libraries, each at the very path its loader resolved (links resolved to
/// their content), so the loader finds them where it looks. The libraries
/// are added to `libraries`.
fn add_program(
    a: &mut Archive,
    path: &str,
    from: &Path,
    libraries: &mut BTreeSet<PathBuf>,
) -> anyhow::Result<()> {
    let needs = elf::needs(from).map_err(|e| anyhow::anyhow!("{e}"))?;
    let program = fs::canonicalize(from).with_context(|| format!("reading {}", from.display()))?;
    let mut copies = Vec::new();
    for lib in needs.interpreter.iter().chain(&needs.libraries) {
        let content =
            fs::canonicalize(lib).with_context(|| format!("reading {}", lib.display()))?;
        copies.push((lib.clone(), content));
    }
    a.copy(path, &program, 0o755);
    for (lib, content) in copies {
        a.copy(&lib.to_string_lossy(), &content, 0o755);
        libraries.insert(lib);
    }
    Ok(())
}

/// Adds the [`SYSTEM_TOOLS`] found in `opts.tool_dirs`, their aliases as
/// links, and the files they read. Returns the tools added and the ones
/// left out.
fn add_system_tools(
    a: &mut Archive,
    opts: &BuildOptions,
    libraries: &mut BTreeSet<PathBuf>,
) -> (Vec<FoundTool>, Vec<MissingTool>) {
    let (found, mut missing) = tools::find(&opts.tool_dirs);
    let mut added = Vec::new();
    for f in found {
        let path = f.image_path();
        if let Err(e) = add_program(a, &path, &f.path, libraries) {
            missing.push(MissingTool {
                tool: f.tool,
                reason: format!("{} is unusable: {e:#}", f.path.display()),
            });
            continue;
        }
        let dir = path.rsplit_once('/').map_or("bin", |(d, _)| d);
        for alias in f.tool.aliases {
            a.symlink(&format!("{dir}/{alias}"), f.tool.name);
        }
        for file in f.tool.files {
            if Path::new(file).is_file() {
                a.copy(file, Path::new(file), 0o644);
            }
        }
        added.push(f);
    }
    // In the table's order, as found ones are.
    missing.sort_by_key(|m| SYSTEM_TOOLS.iter().position(|t| *t == m.tool));
    (added, missing)
}

/// The initramfs for `opts`, with `ka` taken from `ka` (`opts.ka`, or its
/// stripped copy).
pub fn initramfs(opts: &BuildOptions, ka: &Path) -> anyhow::Result<Initramfs> {
    need_file(&opts.busybox, "busybox", "busybox-static")?;
    let mut a = Archive::new();
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "root",
        "etc/ka",
        "lib/modules/ka",
    ] {
        a.dir(d, 0o755);
    }
    a.dir("tmp", 0o1777);
    a.char_device("dev/console", 5, 1, 0o600);
    a.file("init", INIT, 0o755);
    a.file("etc/ka/udhcpc.script", UDHCPC_SCRIPT, 0o755);

    let mut libraries = BTreeSet::new();
    add_program(&mut a, "bin/ka", ka, &mut libraries)?;
    let (tools, missing_tools) = if opts.system_tools {
        add_system_tools(&mut a, opts, &mut libraries)
    } else {
        (Vec::new(), Vec::new())
    };
    // No busybox applet of a tool's name anywhere on the image's PATH: one
    // in an earlier directory would run instead of the tool.
    let tool_names: HashSet<&str> = tools
        .iter()
        .flat_map(|t| std::iter::once(t.tool.name).chain(t.tool.aliases.iter().copied()))
        .collect();

    a.copy("bin/busybox", &opts.busybox, 0o755);
    for applet in applets(&opts.busybox) {
        let name = applet.rsplit('/').next().unwrap_or(&applet);
        if !a.contains(&applet) && !tool_names.contains(name) {
            a.symlink(&applet, "/bin/busybox");
        }
    }

    let index = ModuleIndex::open(&opts.modules_dir)?;
    let (present, absent_modules): (Vec<String>, Vec<String>) = opts
        .system_modules
        .iter()
        .cloned()
        .partition(|m| index.has(m));
    let wanted: Vec<String> = opts.modules.iter().cloned().chain(present).collect();
    let order = index.load_order(&wanted)?;
    let mut list = String::new();
    let mut modules = Vec::new();
    for m in &order {
        let file = format!("{}.ko", m.name);
        let at = format!("lib/modules/ka/{file}");
        // Compressed modules go in decompressed: the image's busybox insmod
        // cannot be counted on to read them (see `modules`).
        if m.compression() == Compression::None {
            a.copy(&at, &m.path, 0o644);
        } else {
            a.file(&at, read_module(&m.path)?, 0o644);
        }
        list.push_str(&file);
        list.push('\n');
        modules.push(m.name.clone());
    }
    a.file("etc/ka/modules", list, 0o644);

    Ok(Initramfs {
        archive: a,
        modules,
        absent_modules,
        libraries: libraries.into_iter().collect(),
        tools: tools.iter().map(FoundTool::image_path).collect(),
        missing_tools,
    })
}

/// The applet paths busybox provides (`bin/sh`, `sbin/ip`, …).
fn applets(busybox: &Path) -> Vec<String> {
    let listed = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().trim_start_matches('/').to_string())
                .filter(|l| !l.is_empty() && !l.contains(".."))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut out = listed;
    for a in NEEDED_APPLETS {
        let present = out.iter().any(|l| l.rsplit('/').next() == Some(a));
        if !present {
            out.push(format!("bin/{a}"));
        }
    }
    out
}

/// `ka` without its debug information (most of the size of a build that
/// has any, such as a debug build, and every byte crosses TFTP to every
/// node), in `dir`; a release build, which has none, is used as it is.
fn stripped_ka(ka: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let bytes = fs::read(ka).with_context(|| format!("reading {}", ka.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not an ELF program: {e}", ka.display()))?;
    let has_debug = elf.section_headers.iter().any(|s| {
        elf.shdr_strtab
            .get_at(s.sh_name)
            .is_some_and(|n| n.starts_with(".debug_"))
    });
    if !has_debug {
        return Ok(ka.to_path_buf());
    }
    let out = dir.join("ka");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(ka)
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => Ok(out),
        Ok(s) => bail!("objcopy --strip-debug {} failed ({s})", ka.display()),
        Err(e) => bail!(
            "cannot run objcopy to strip {} ({e}): install the Debian package `binutils`, or pass --no-strip",
            ka.display()
        ),
    }
}

/// Builds the initramfs and fills the TFTP root.
pub fn build(opts: &BuildOptions) -> anyhow::Result<Built> {
    need_file(&opts.kernel, "the kernel", "linux-image-amd64")?;
    need_file(&opts.pxelinux, "the PXE boot loader", "pxelinux")?;
    for f in SYSLINUX_FILES {
        need_file(
            &opts.syslinux_modules.join(f),
            "the syslinux module",
            "syslinux-common",
        )?;
    }
    need_file(&opts.ka, "the ka binary", "ka")?;
    let work = tempfile::tempdir().context("creating a work directory")?;
    let ka = if opts.strip {
        stripped_ka(&opts.ka, work.path())?
    } else {
        opts.ka.clone()
    };
    let image = initramfs(opts, &ka)?;

    let mut files = Vec::new();
    let mut put = |rel: &str, data: &[u8]| -> anyhow::Result<()> {
        let path = opts.out.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::write_atomically(&path, data, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(rel.to_string());
        Ok(())
    };
    let gz = image
        .archive
        .write_gz(Vec::new())
        .context("writing the initramfs")?;
    let initramfs_bytes = gz.len() as u64;
    put(&opts.initramfs_name, &gz)?;
    // Which ka the nodes will run, for `ka doctor` to compare with the
    // server's: read from the binary packed, which `--ka` may choose.
    let packed = fs::read(&opts.ka).with_context(|| format!("reading {}", opts.ka.display()))?;
    let Some(packed_version) = super::version::KaVersion::of_binary(&packed) else {
        bail!(
            "{} carries no ka version stamp: it is not ka, or a build too old for this image; pass --ka with a current ka",
            opts.ka.display()
        );
    };
    put(
        &super::version::file_name(&opts.initramfs_name),
        packed_version.to_file().as_bytes(),
    )?;
    put(&opts.kernel_name, &fs::read(&opts.kernel)?)?;
    put("pxelinux.0", &fs::read(&opts.pxelinux)?)?;
    for f in SYSLINUX_FILES {
        put(f, &fs::read(opts.syslinux_modules.join(f))?)?;
    }
    let mut notes = Vec::new();
    if Path::new(IPXE_EFI).is_file() {
        put("ipxe.efi", &fs::read(IPXE_EFI)?)?;
    } else {
        notes.push(format!(
            "{IPXE_EFI} not found: UEFI machines need it as ipxe.efi in the TFTP root (Debian package `ipxe`)"
        ));
    }
    // Secure Boot machines: `boot.uefi_boot_file = "shimx64.efi"`.
    match (
        Path::new(SHIM_SIGNED).is_file(),
        Path::new(GRUBNET_SIGNED).is_file(),
    ) {
        (true, true) => {
            put("shimx64.efi", &fs::read(SHIM_SIGNED)?)?;
            put("grubx64.efi", &fs::read(GRUBNET_SIGNED)?)?;
        }
        (false, false) => {}
        (has_shim, _) => notes.push(format!(
            "{} not found: Secure Boot machines need shimx64.efi and grubx64.efi in the TFTP root (Debian packages `shim-signed` and `grub-efi-amd64-signed`)",
            if has_shim { GRUBNET_SIGNED } else { SHIM_SIGNED }
        )),
    }
    if !image.absent_modules.is_empty() {
        notes.push(format!(
            "the kernel has no {}: nodes cannot mount such file systems in a system clone",
            image.absent_modules.join(", ")
        ));
    }
    if !opts.system_tools {
        notes.push(
            "no system tools in the image: system clones (ka.clone=system) fail on its nodes"
                .into(),
        );
    }
    Ok(Built {
        modules: image.modules,
        libraries: image.libraries,
        tools: image.tools,
        missing_tools: image.missing_tools,
        initramfs_bytes,
        files,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netboot::archive::{self, Listed};

    /// A kernel modules directory where every default module is built in,
    /// and XFS is a module file needing libcrc32c.
    fn fake_modules(dir: &Path) -> PathBuf {
        let m = dir.join("lib/modules/1.0");
        for f in ["kernel/fs/xfs/xfs.ko", "kernel/lib/libcrc32c.ko"] {
            fs::create_dir_all(m.join(f).parent().unwrap()).unwrap();
            fs::write(m.join(f), f).unwrap();
        }
        let builtin: String = DEFAULT_MODULES
            .iter()
            .chain(&["nls_ascii"])
            .map(|n| format!("kernel/{n}.ko\n"))
            .collect();
        fs::write(m.join("modules.builtin"), builtin).unwrap();
        fs::write(
            m.join("modules.dep"),
            "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\n",
        )
        .unwrap();
        m
    }

    fn options(dir: &Path) -> BuildOptions {
        let ka = std::env::current_exe().unwrap();
        let mut opts =
            BuildOptions::new(dir.join("out"), dir.join("vmlinuz"), fake_modules(dir), ka);
        // `NEEDED_APPLETS` are linked whether busybox lists them or not.
        opts.busybox = PathBuf::from(BUSYBOX);
        opts
    }

    /// The archive's entries by path.
    fn listed(image: &Initramfs) -> std::collections::BTreeMap<String, Listed> {
        let raw = image.archive.write_cpio(Vec::new()).unwrap();
        archive::read(&raw)
            .unwrap()
            .into_iter()
            .map(|l| (l.path.clone(), l))
            .collect()
    }

    #[test]
    fn the_system_tools_come_with_their_libraries_and_shadow_busybox() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(dir.path());
        let image = initramfs(&opts, &opts.ka).unwrap();
        let entries = listed(&image);
        let (found, missing) = tools::find(&opts.tool_dirs);
        // The test suite's packages (scripts/apt-packages.txt) have GNU tar,
        // util-linux's mount and e2fsprogs at least.
        for name in ["tar", "mount", "mke2fs", "sfdisk"] {
            assert!(
                found.iter().any(|f| f.tool.name == name),
                "{name} not on this host: {missing:?}"
            );
        }
        assert_eq!(image.missing_tools, missing);
        for f in &found {
            let path = f.image_path();
            let entry = &entries[&path];
            assert!(entry.is_file(), "{path} is not the tool itself");
            assert_eq!(entry.data, fs::read(&f.path).unwrap(), "{path}");
            let needs = elf::needs(&f.path).unwrap();
            for lib in needs.interpreter.iter().chain(&needs.libraries) {
                let key = lib.to_string_lossy().trim_start_matches('/').to_string();
                assert!(entries[&key].is_file(), "{key} for {path}");
                assert!(image.libraries.contains(lib), "{lib:?}");
            }
            // No busybox applet of the same name anywhere on PATH.
            for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
                for name in std::iter::once(&f.tool.name).chain(f.tool.aliases) {
                    let other = format!("{dir}/{name}");
                    if let Some(e) = entries.get(&other) {
                        assert_ne!(e.link_target(), Some("/bin/busybox"), "{other}");
                    }
                }
            }
        }
        assert_eq!(image.tools.len(), found.len());
        let mke2fs = found.iter().find(|f| f.tool.name == "mke2fs").unwrap();
        let dir = mke2fs.image_path().rsplit_once('/').unwrap().0.to_string();
        assert_eq!(
            entries[&format!("{dir}/mkfs.ext4")].link_target(),
            Some("mke2fs")
        );
        // Busybox still gives what it alone gives.
        let chroot = entries
            .iter()
            .find(|(p, _)| p.rsplit('/').next() == Some("chroot"))
            .map(|(_, e)| e.link_target());
        assert_eq!(chroot, Some(Some("/bin/busybox")));

        // XFS and what it needs, in order; nls_ascii is built in.
        let modules = String::from_utf8(entries["etc/ka/modules"].data.clone()).unwrap();
        assert_eq!(modules, "libcrc32c.ko\nxfs.ko\n");
        assert!(image.absent_modules.is_empty());
    }

    #[test]
    fn a_missing_tool_is_named_and_busybox_stands_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        let only = dir.path().join("tools");
        fs::create_dir(&only).unwrap();
        let tar = tools::find(&opts.tool_dirs)
            .0
            .into_iter()
            .find(|f| f.tool.name == "tar")
            .expect("GNU tar on this host");
        std::os::unix::fs::symlink(&tar.path, only.join("tar")).unwrap();
        opts.tool_dirs = vec![only.clone()];
        opts.system_modules.push("no_such_fs".into());
        let image = initramfs(&opts, &opts.ka).unwrap();
        assert_eq!(image.tools, ["bin/tar"]);
        let missing: Vec<&str> = image.missing_tools.iter().map(|m| m.tool.name).collect();
        assert_eq!(missing.len(), SYSTEM_TOOLS.len() - 1);
        assert!(missing.contains(&"mkfs.xfs") && missing.contains(&"mount"));
        assert!(image.missing_tools[0]
            .reason
            .contains(&only.display().to_string()));
        let entries = listed(&image);
        assert!(entries["bin/tar"].is_file());
        assert_eq!(entries["bin/mount"].link_target(), Some("/bin/busybox"));
        assert!(!entries.contains_key("sbin/mkfs.xfs"));
        assert_eq!(image.absent_modules, ["no_such_fs"]);

        opts.system_tools = false;
        let image = initramfs(&opts, &opts.ka).unwrap();
        assert!(image.tools.is_empty() && image.missing_tools.is_empty());
        assert_eq!(
            listed(&image)["bin/tar"].link_target(),
            Some("/bin/busybox")
        );
    }
}
