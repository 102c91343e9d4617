//! `ka netboot`: build the netboot image and TFTP root (`build`), and the
//! node's side inside that image (`install`, run by its init).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::ExitStatus;
use crate::netboot::build::{self, BuildOptions};
use crate::netboot::install;
use crate::netboot::modules::DEFAULT_MODULES;
use crate::netboot::tools::{self, DEFAULT_TOOL_DIRS};

/// Arguments of `ka netboot`.
#[derive(Debug, Args)]
pub struct NetbootArgs {
    #[command(subcommand)]
    command: NetbootCommand,
}

#[derive(Debug, Subcommand)]
enum NetbootCommand {
    /// Build the initramfs install-mode nodes boot, and a TFTP root for `ka tftp`.
    ///
    /// Writes into --out: pxelinux.0, ldlinux.c32, chain.c32, libcom32.c32,
    /// libutil.c32 (Debian pxelinux and syslinux-common), ipxe.efi when
    /// Debian's ipxe is installed, shimx64.efi and grubx64.efi (Secure
    /// Boot) when Debian's shim-signed and grub-efi-amd64-signed are, the
    /// kernel as ka/vmlinuz and the image as ka/initramfs.img (the
    /// inventory's defaults). See docs/netboot.md.
    Build(Box<BuildArgs>),
    /// Inside the netboot image: clone this node as its kernel command line says.
    ///
    /// The image's init runs this; it reads ka.* arguments from
    /// /proc/cmdline, brings the network up by DHCP, fetches the session
    /// secret, runs `ka join` onto ka.target= (`ka join --system` onto its
    /// disks with ka.clone=system) and applies the node's identity. Exit codes: 0 done (reboot), 1 clone failed, 2 could not
    /// run, 3 verified but no identity (stay), 4 stay (ka.fail_delay=never),
    /// 10 shell mode.
    Install {
        /// The kernel command line to read.
        #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// Print the plan and the `ka join` it would run, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Arguments of `ka netboot build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The TFTP root to fill (the inventory's boot.tftp_root).
    #[arg(long, short = 'o', value_name = "DIR")]
    out: PathBuf,
    /// Where to find the kernel: DIR/boot/vmlinuz-VERSION and
    /// DIR/lib/modules/VERSION (a system root, or a kernel package unpacked
    /// with `dpkg -x`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    kernel_tree: PathBuf,
    /// Which kernel of --kernel-tree (default: the only one, else the running one).
    #[arg(long, value_name = "VERSION")]
    kernel_version: Option<String>,
    /// The kernel image, instead of finding it in --kernel-tree.
    #[arg(long, value_name = "FILE", requires = "modules")]
    kernel: Option<PathBuf>,
    /// The kernel's modules directory (lib/modules/VERSION), with --kernel.
    /// Modules compressed as .ko.xz, .ko.zst or .ko.gz go into the image
    /// decompressed.
    #[arg(long, value_name = "DIR", requires = "kernel")]
    modules: Option<PathBuf>,
    /// Another kernel module to include and load (e.g. ixgbe, xfs); repeatable.
    #[arg(long = "module", value_name = "NAME")]
    extra_modules: Vec<String>,
    /// Include only the --module modules, not the default set (nor the
    /// file systems a system clone mounts).
    #[arg(long)]
    no_default_modules: bool,
    /// Leave out the programs a system clone runs on a node (GNU tar,
    /// sfdisk, mkfs.*, util-linux mount, …) and the file-system modules only
    /// it needs: a smaller image that can only take image clones.
    #[arg(long)]
    no_system_tools: bool,
    /// Where to find those programs on this host: directories separated
    /// by `:`, searched in order.
    #[arg(long, value_name = "DIR:DIR…", default_value_t = DEFAULT_TOOL_DIRS.join(":"))]
    tools_path: String,
    /// The ka binary to put in the image (default: this one).
    #[arg(long, value_name = "FILE")]
    ka: Option<PathBuf>,
    /// Keep ka's debug information (several times larger over TFTP).
    #[arg(long)]
    no_strip: bool,
    /// Static busybox (Debian busybox-static).
    #[arg(long, value_name = "FILE", default_value = build::BUSYBOX)]
    busybox: PathBuf,
    /// Refused: a secret in the image would go to anyone who fetches it.
    /// `ka tftp --secret-file` hands each install-mode node its own key.
    #[arg(long, value_name = "FILE", hide = true)]
    secret_file: Option<PathBuf>,
    /// pxelinux.0 (Debian pxelinux).
    #[arg(long, value_name = "FILE", default_value = build::PXELINUX)]
    pxelinux: PathBuf,
    /// Directory with ldlinux.c32 and chain.c32 (Debian syslinux-common).
    #[arg(long, value_name = "DIR", default_value = build::SYSLINUX_MODULES)]
    syslinux_modules: PathBuf,
    /// Path of the kernel in the TFTP root (the inventory's boot.kernel).
    #[arg(long, value_name = "PATH", default_value = "ka/vmlinuz")]
    kernel_name: String,
    /// Path of the initramfs in the TFTP root (the inventory's boot.initramfs).
    #[arg(long, value_name = "PATH", default_value = "ka/initramfs.img")]
    initramfs_name: String,
}

/// Runs `ka netboot`; returns the exit code.
pub fn run(args: NetbootArgs) -> Result<ExitStatus> {
    match args.command {
        NetbootCommand::Build(b) => build_cmd(*b).map(|()| ExitStatus::Success),
        NetbootCommand::Install { cmdline, dry_run } => {
            Ok(ExitStatus::Installer(install::run(&cmdline, dry_run)))
        }
    }
}

/// The kernel image and modules directory of `tree`.
fn find_kernel(tree: &Path, version: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    let modules = tree.join("lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| {
            format!(
                "no kernel in {}: pass --kernel-tree (e.g. a linux-image package unpacked with `dpkg -x`) or --kernel and --modules",
                tree.display()
            )
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| modules.join(v).join("kernel").is_dir() && tree.join(format!("boot/vmlinuz-{v}")).is_file())
        .collect();
    versions.sort();
    let chosen = match version {
        Some(v) if versions.iter().any(|x| x == v) => v.to_string(),
        Some(v) => bail!(
            "kernel {v} is not in {} (found: {}); both boot/vmlinuz-{v} and lib/modules/{v} are needed",
            tree.display(),
            versions.join(", ")
        ),
        None if versions.len() == 1 => versions[0].clone(),
        None => {
            let running = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|r| r.trim().to_string());
            match running {
                Some(r) if versions.contains(&r) => r,
                _ if versions.is_empty() => bail!(
                    "no kernel in {} (boot/vmlinuz-VERSION with lib/modules/VERSION): install one (apt-get install linux-image-amd64) or pass --kernel-tree",
                    tree.display()
                ),
                _ => bail!(
                    "several kernels in {}: {}; choose one with --kernel-version",
                    tree.display(),
                    versions.join(", ")
                ),
            }
        }
    };
    Ok((
        tree.join(format!("boot/vmlinuz-{chosen}")),
        modules.join(chosen),
    ))
}

/// Checks `b`, finds the kernel, and makes the build's options.
fn build_plan(b: BuildArgs) -> Result<BuildOptions> {
    let (kernel, modules_dir) = match (b.kernel, b.modules) {
        (Some(k), Some(m)) => (k, m),
        _ => find_kernel(&b.kernel_tree, b.kernel_version.as_deref())?,
    };
    let ka = match b.ka {
        Some(k) => k,
        None => std::env::current_exe().context("finding this ka binary: pass --ka")?,
    };
    let mut opts = BuildOptions::new(b.out, kernel, modules_dir, ka);
    if b.no_default_modules {
        opts.modules.clear();
        opts.system_modules.clear();
    }
    if b.no_system_tools {
        opts.system_tools = false;
        opts.system_modules.clear();
    }
    opts.tool_dirs = std::env::split_paths(&b.tools_path)
        .filter(|d| !d.as_os_str().is_empty())
        .collect();
    if opts.system_tools && opts.tool_dirs.is_empty() {
        bail!(
            "--tools-path names no directory: give one (default {}), or pass --no-system-tools",
            DEFAULT_TOOL_DIRS.join(":")
        );
    }
    opts.modules.extend(b.extra_modules);
    if opts.modules.is_empty() {
        bail!(
            "no modules: drop --no-default-modules or add --module NAME (defaults: {})",
            DEFAULT_MODULES.join(", ")
        );
    }
    opts.strip = !b.no_strip;
    opts.busybox = b.busybox;
    if let Some(file) = b.secret_file {
        bail!(
            "ka netboot build no longer bakes a key into the image: anyone who fetches the image over TFTP would hold it. \
             Leave {} out of the image and start ka tftp with --secret-file {}: it hands each install-mode node its own key",
            file.display(),
            file.display()
        );
    }
    opts.pxelinux = b.pxelinux;
    opts.syslinux_modules = b.syslinux_modules;
    opts.kernel_name = b.kernel_name;
    opts.initramfs_name = b.initramfs_name;
    Ok(opts)
}

/// Runs `ka netboot build`.
fn build_cmd(b: BuildArgs) -> Result<()> {
    let opts = build_plan(b)?;
    let built = build::build(&opts)?;
    print_built(&opts, &built);
    Ok(())
}

/// What was built, for the operator.
fn print_built(opts: &BuildOptions, built: &build::Built) {
    crate::outln!(
        "ka netboot: {} ({:.1} MiB) with {} modules, loaded in this order: {}",
        opts.out.join(&opts.initramfs_name).display(),
        built.initramfs_bytes as f64 / (1 << 20) as f64,
        built.modules.len(),
        built.modules.join(" ")
    );
    if !built.tools.is_empty() {
        crate::outln!("ka netboot: system clone tools: {}", built.tools.join(" "));
    }
    crate::outln!(
        "ka netboot: libraries: {}",
        built
            .libraries
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    crate::outln!("ka netboot: wrote {}", built.files.join(", "));
    for n in &built.notes {
        crate::outln!("ka netboot: note: {n}");
    }
    // On standard error: the image is built, but some nodes will fail.
    let report = tools::missing_report(&built.missing_tools);
    if !report.is_empty() {
        for line in report {
            crate::errln!("ka netboot: warning: {line}");
        }
        crate::errln!(
            "ka netboot: warning: or pass --no-system-tools to leave them all out of the image"
        );
    }
}
