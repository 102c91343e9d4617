//! `ka netboot build`: the initramfs install-mode nodes boot, and a TFTP
//! root laid out for `ka tftp`.
//!
//! The image holds busybox (Debian's static build: a shell and the tools the
//! init uses), the `ka` binary with its loader and shared libraries, the
//! chosen kernel modules with a load order computed here, the init, the DHCP
//! script, and optionally the session secret.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::archive::Archive;
use super::elf;
use super::modules::{ModuleIndex, DEFAULT_MODULES};

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

/// The syslinux modules pxelinux loads: `ldlinux.c32` always, the others
/// for `local_boot = "chain"` (`chain.c32` and the libraries it links).
pub const SYSLINUX_FILES: &[&str] = &["ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32"];

/// Applets the init and `ka netboot install` call, linked even when the
/// busybox binary cannot list its own (e.g. built for another machine).
const NEEDED_APPLETS: &[&str] = &[
    "sh", "mount", "umount", "mkdir", "insmod", "grep", "cat", "echo", "sleep", "setsid", "sync",
    "reboot", "poweroff", "dmesg", "uname", "ip", "udhcpc", "tftp", "hostname", "ls", "ps",
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
    /// The `ka` binary to put in the image.
    pub ka: PathBuf,
    /// Strip debug information from the `ka` copy (objcopy, binutils).
    pub strip: bool,
    /// The static busybox.
    pub busybox: PathBuf,
    /// A session secret file to bake in as `/etc/ka/secret`.
    pub secret_file: Option<PathBuf>,
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
            ka,
            strip: true,
            busybox: BUSYBOX.into(),
            secret_file: None,
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
    /// Shared libraries (and the loader) copied for `ka`.
    pub libraries: Vec<PathBuf>,
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

/// The initramfs for `opts`, in memory, with what went into it.
pub fn initramfs(
    opts: &BuildOptions,
    ka: &Path,
) -> anyhow::Result<(Archive, Vec<String>, Vec<PathBuf>)> {
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

    a.copy("bin/busybox", &opts.busybox, 0o755);
    for applet in applets(&opts.busybox) {
        if !a.contains(&applet) {
            a.symlink(&applet, "/bin/busybox");
        }
    }

    a.copy("bin/ka", ka, 0o755);
    let needs = elf::needs(ka).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut libraries = Vec::new();
    for lib in needs.interpreter.iter().chain(&needs.libraries) {
        // Copied to the very path the loader resolved (symlinks resolved to
        // their content), so the loader finds them where it looks.
        let name = lib.to_string_lossy();
        a.copy(&name, &fs::canonicalize(lib)?, 0o755);
        libraries.push(lib.clone());
    }

    let index = ModuleIndex::open(&opts.modules_dir)?;
    let order = index.load_order(&opts.modules)?;
    let mut list = String::new();
    let mut names = Vec::new();
    for m in &order {
        let file = format!("{}.ko", m.name);
        a.copy(&format!("lib/modules/ka/{file}"), &m.path, 0o644);
        list.push_str(&file);
        list.push('\n');
        names.push(m.name.clone());
    }
    a.file("etc/ka/modules", list, 0o644);

    if let Some(secret) = &opts.secret_file {
        let text = fs::read_to_string(secret)
            .with_context(|| format!("reading the secret file {}", secret.display()))?;
        if !crate::session::secret::is_secret(&text) {
            bail!(
                "{} does not hold a session secret (64 hex digits, as ka serve writes)",
                secret.display()
            );
        }
        a.file("etc/ka/secret", format!("{}\n", text.trim()), 0o600);
    }
    Ok((a, names, libraries))
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

/// `ka` without its debug information (which is most of a release build's
/// size, and every byte crosses TFTP to every node), in `dir`.
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
    let (archive, modules, libraries) = initramfs(opts, &ka)?;

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
    let gz = archive
        .write_gz(Vec::new())
        .context("writing the initramfs")?;
    let initramfs_bytes = gz.len() as u64;
    put(&opts.initramfs_name, &gz)?;
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
    Ok(Built {
        modules,
        libraries,
        initramfs_bytes,
        files,
        notes,
    })
}
