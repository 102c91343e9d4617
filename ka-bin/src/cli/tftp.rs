//! `ka tftp`: serve the TFTP root, the per-node boot configs, and each
//! install-mode node its own key ([`crate::boot::keys`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;
use ka_net::shell::Secret;
use ka_net::tftp::{Generated, GeneratedFiles, TftpConfig, TftpServer};

use super::{ClusterArgs, ExitStatus};
use crate::boot::keys;
use crate::boot::modes::{BootState, Modes};
use crate::boot::render;
use crate::boot::Inventory;

/// Real invocations under `ka tftp --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # The inventory's TFTP root, each install-mode node handed its own key:
  ka tftp --secret-file /etc/ka/secret
  # Another inventory and root, on an unprivileged port:
  ka tftp -i /etc/ka/lab.toml --root /srv/lab/tftp --listen 127.0.0.1:6969
  # A network whose MTU is 1400 bytes:
  ka tftp --secret-file /etc/ka/secret --blksize-limit 1368
The Debian package runs it as a service: systemctl enable --now ka-tftp";

/// Arguments of `ka tftp`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct TftpArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:69")]
    listen: SocketAddr,
    /// Directory to serve instead of the inventory's boot.tftp_root.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Largest block size to grant [default: 1468, an unfragmented
    /// Ethernet frame; lower it for networks with a smaller MTU].
    #[arg(long, value_name = "BYTES")]
    blksize_limit: Option<u16>,
    /// Largest window size to grant [default: 16].
    #[arg(long, value_name = "BLOCKS")]
    windowsize_limit: Option<u16>,
    /// Most transfers at once; further requests are dropped unanswered
    /// and their clients retry [default: 256].
    #[arg(long, value_name = "N")]
    max_transfers: Option<usize>,
    /// Most transfers at once from one IP address [default: 8].
    #[arg(long, value_name = "N")]
    max_transfers_per_client: Option<usize>,
    /// Longest a transfer may take, in seconds [default: 600].
    #[arg(long, value_name = "SECS")]
    transfer_lifetime: Option<u64>,
    /// The session secret: each node in install mode is handed its own key
    /// derived from it at ka/keys/NAME.key, from its inventory address only
    /// [default: `secret` beside the inventory, made if missing; `ka serve
    /// -i` reads or makes the same file].
    #[arg(long, value_name = "FILE", env = super::SECRET_FILE_ENV)]
    secret_file: Option<PathBuf>,
    /// Hand out no keys: nodes boot with their key in the image or by hand
    /// (`ka.secret=file:…`), and no secret is read or made.
    #[arg(long, conflicts_with = "secret_file")]
    no_keys: bool,
    /// New transfers a second for clients not yet proven by an ACK, in
    /// all; a client that acknowledged a transfer in the last 10 minutes
    /// is not held to it [default: 50].
    #[arg(long, value_name = "N")]
    new_transfers_per_sec: Option<u32>,
    /// New transfers a second for one client not yet proven, in bursts
    /// of twice as many [default: 10].
    #[arg(long, value_name = "N")]
    new_transfers_per_client_per_sec: Option<u32>,
}

/// Renders boot configs from the inventory and the modes as of each request.
///
/// The modes file is read on every request (it is small), so `ka pxe set`
/// takes effect at once. The inventory is re-read when its modification time
/// changes; if the new version is broken, the last good one keeps serving
/// and the error is logged.
struct BootFiles {
    state: BootState,
    inventory: Mutex<(Option<FileVersion>, Arc<Inventory>)>,
    last_modes: Mutex<Modes>,
    /// The session secret, to derive each node's key from.
    secret: Option<Secret>,
    /// The TFTP root, to refuse the key files an administrator left in it.
    root: PathBuf,
}

impl BootFiles {
    fn inventory(&self) -> Arc<Inventory> {
        let mut cached = self.inventory.lock().expect("inventory lock");
        let path = cached.1.path.clone();
        let mtime = file_version(&path);
        if mtime.is_some() && mtime != cached.0 {
            match Inventory::load(&path) {
                Ok(inv) => {
                    tracing::info!(inventory = %path.display(), nodes = inv.nodes.len(), "inventory reloaded");
                    *cached = (mtime, Arc::new(inv));
                }
                Err(e) => {
                    tracing::error!(
                        "inventory changed but is invalid, still serving the previous one:\n{e}"
                    );
                    cached.0 = mtime;
                }
            }
        }
        cached.1.clone()
    }

    fn modes(&self) -> Modes {
        let mut last = self.last_modes.lock().expect("modes lock");
        match self.state.load() {
            Ok(m) => *last = m,
            Err(e) => tracing::error!("{e}; using the last modes read"),
        }
        last.clone()
    }
}

impl GeneratedFiles for BootFiles {
    fn generate(&self, path: &str, client: SocketAddr) -> Generated {
        let inv = self.inventory();
        let modes = self.modes();
        match keys::answer(&inv, &modes, self.secret.as_ref(), path, client) {
            Generated::FromRoot => {}
            answered => return answered,
        }
        if let Some(content) = render::generated_file(&inv, &modes, path) {
            return Generated::File(content);
        }
        if holds_a_key(&self.root.join(path)) {
            return Generated::Refused(format!(
                "{path} in the TFTP root holds a ka key, which anyone on the boot network could fetch: \
                 remove it; ka tftp --secret-file hands each install-mode node its own key"
            ));
        }
        Generated::FromRoot
    }
}

/// Whether `path` is a small file holding a ka secret or node key (the
/// largest, a node key file, is under 400 bytes).
fn holds_a_key(path: &std::path::Path) -> bool {
    const LARGEST_KEY_FILE: u64 = 4096;
    let small = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() <= LARGEST_KEY_FILE);
    small && std::fs::read(path).is_ok_and(|content| keys::is_key_file(&content))
}

/// Names the boot files a node will ask for but the root lacks: a missing
/// `ldlinux.c32` shows up only as a hung node on a serial console, so say it
/// here, with where to get it.
fn warn_about_missing_files(root: &std::path::Path, inv: &Inventory) {
    let b = &inv.boot;
    let mut wanted = vec![
        (b.kernel.as_str(), "the ka netboot kernel"),
        (b.initramfs.as_str(), "the ka netboot initramfs"),
        (
            b.bios_boot_file.as_str(),
            "Debian pxelinux: /usr/lib/PXELINUX/pxelinux.0",
        ),
        (
            "ldlinux.c32",
            "Debian syslinux-common: /usr/lib/syslinux/modules/bios/ldlinux.c32",
        ),
        (
            b.uefi_boot_file.as_str(),
            "Debian ipxe: /usr/lib/ipxe/ipxe.efi",
        ),
    ];
    if b.local_boot == crate::boot::inventory::LocalBoot::Chain {
        for m in ["chain.c32", "libcom32.c32", "libutil.c32"] {
            wanted.push((m, "Debian syslinux-common: /usr/lib/syslinux/modules/bios/, for local_boot = \"chain\""));
        }
    }
    for (file, hint) in wanted {
        if !root.join(file).is_file() {
            tracing::warn!(
                "{} is missing from the TFTP root ({hint})",
                root.join(file).display()
            );
        }
    }
}

/// An inventory file's modification time and size.
type FileVersion = (SystemTime, u64);

/// Modification time and size: the size catches an edit within the
/// timestamp granularity of coarse file systems.
fn file_version(path: &std::path::Path) -> Option<FileVersion> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A `ka tftp` ready to serve: the boot files it generates, the root it
/// serves, and the server's settings.
struct TftpPlan {
    files: Arc<BootFiles>,
    root: PathBuf,
    nodes: usize,
    config: TftpConfig,
}

/// Reads the inventory and the modes, and checks the TFTP root.
fn plan(args: TftpArgs) -> Result<TftpPlan> {
    let inv = Inventory::load(&args.cluster.inventory)?;
    let mtime = file_version(&inv.path);
    let root = args.root.unwrap_or_else(|| inv.boot.tftp_root.clone());
    let state = BootState::new(&args.cluster.state_dir);
    let modes = state.load()?;
    let nodes = inv.nodes.len();
    let secret = match &args.secret_file {
        _ if args.no_keys => None,
        Some(file) => Some(crate::session::secret::load(file)?),
        None => {
            let file = crate::session::secret::beside_inventory(&args.cluster.inventory);
            let (secret, made) = crate::session::secret::load_or_create(&file)?;
            crate::errln!(
                "ka tftp: {} the session secret {} (ka serve -i reads the same)",
                if made { "made" } else { "using" },
                file.display()
            );
            Some(secret)
        }
    };
    let files = Arc::new(BootFiles {
        state,
        inventory: Mutex::new((mtime, Arc::new(inv))),
        last_modes: Mutex::new(modes),
        secret,
        root: root.clone(),
    });
    warn_about_missing_files(&root, &files.inventory());
    let mut config = TftpConfig::new(args.listen, &root);
    if let Some(b) = args.blksize_limit {
        config.block_size_limit = b;
    }
    if let Some(w) = args.windowsize_limit {
        config.window_size_limit = w;
    }
    if let Some(n) = args.max_transfers {
        config.max_transfers = n;
    }
    if let Some(n) = args.max_transfers_per_client {
        config.max_transfers_per_client = n;
    }
    if let Some(s) = args.transfer_lifetime {
        config.lifetime = std::time::Duration::from_secs(s);
    }
    if let Some(n) = args.new_transfers_per_sec {
        config.new_transfers_per_sec = n;
    }
    if let Some(n) = args.new_transfers_per_client_per_sec {
        config.new_transfers_per_client_per_sec = n;
    }
    // Half the table, whatever its size, for clients not yet proven.
    config.max_unproven_transfers = (config.max_transfers / 2).max(1);
    Ok(TftpPlan {
        files,
        root,
        nodes,
        config,
    })
}

/// Runs `ka tftp` until interrupted.
pub fn run(args: TftpArgs) -> Result<ExitStatus> {
    serve(plan(args)?)?;
    Ok(ExitStatus::Success)
}

/// Serves until interrupted or terminated.
fn serve(plan: TftpPlan) -> Result<()> {
    let TftpPlan {
        files,
        root,
        nodes,
        config,
    } = plan;
    let has_secret = files.secret.is_some();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let server = TftpServer::bind(config, files).await?;
        // Tests and scripts that pass port 0 read the real address here.
        crate::outln!(
            "ka tftp: serving {} and boot configs for {nodes} nodes on {}",
            root.display(),
            server.local_addr()
        );
        if has_secret {
            crate::errln!(
                "ka tftp: handing each install-mode node its own key ({}), to its inventory address only",
                keys::key_path("NAME")
            );
        } else {
            crate::errln!(
                "ka tftp: --no-keys: nodes booting ka.secret=tftp (the default) get no key from here"
            );
        }
        use std::io::Write;
        std::io::stdout().flush().ok();
        // Under systemd (Type=notify) what waits for ka tftp starts only
        // now that its socket is bound; outside systemd (no NOTIFY_SOCKET)
        // this does nothing.
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot tell systemd that ka tftp is ready");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = server.serve() => r?,
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
            _ = term.recv() => tracing::info!("terminated, stopping"),
        }
        Ok(())
    })
}
