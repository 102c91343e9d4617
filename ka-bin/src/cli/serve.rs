//! `ka serve`: the source (the original ka-d-server). The arguments become
//! a [`ServePlan`]; running it obtains the secret, serves the session while
//! the display shows it, and ends with the report and an exit status.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ka_core::config::{SlowPolicy, SourceConfig};
use ka_core::ids::NodeId;
use ka_core::source::{NodeReport, Source, SourceEvent};

use super::display::{print_report, report_json, Display};
use super::status::{SessionStatus, StatusWriter};
use super::ExitStatus;
use crate::boot::flip::{Flipped, VerifiedFlip};
use crate::boot::{BootState, Inventory, Mode};
use crate::netboot::cmdline::CloneKind;
use crate::session::nodelog::{default_log_dir, make_log_dir, NodeLogs};
use crate::session::secret::{self, Secret};
use crate::session::serve::{self as session, Input, Report, ServeOptions};
use crate::session::{DEFAULT_PORT, DEFAULT_SESSION, DEFAULT_STATE_DIR};
use crate::web::{WebFeed, WebServer};

/// Real invocations under `ka serve --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # A disk to 40 nodes, starting once all of them have joined:
  ka serve --nodes 40 --image /dev/sda --secret-file /etc/ka/secret
  # This running machine, file by file, with /var/tmp sent empty:
  ka serve --nodes 40 --system --exclude /var/tmp --secret-file /etc/ka/secret
  # A gzip image, decoded here and packed with zstd for the wire (nodes unpack it);
  # start 10 minutes after listening if 30 nodes are there:
  ka serve --nodes 40 --image /srv/golden.img.gz --compress zstd --join-timeout 10m --min-nodes 30
  # Another machine's disk, read over ssh and packed for the wire:
  ka serve --nodes 40 --command 'ssh golden dd if=/dev/sda bs=4M' --compress zstd
  # Watch it in a browser at http://127.0.0.1:8080/ (docs/web.md):
  ka serve --nodes 40 --image /srv/golden.img --secret-file /etc/ka/secret --http 127.0.0.1:8080
  # Flip every node of the inventory whose copy is verified to local boot:
  ka serve --nodes 40 --image /srv/golden.img -i /etc/ka/cluster.toml --boot-state /var/lib/ka";

/// `ka serve`: the source (the original ka-d-server).
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct ServeArgs {
    /// Start as soon as this many nodes have joined [default with
    /// --inventory: the nodes in install mode in --boot-state].
    #[arg(long, short = 'n', required_unless_present = "inventory")]
    pub nodes: Option<u32>,
    /// Session name the nodes must ask for [default: the inventory's
    /// [session] name, else ka].
    #[arg(long)]
    pub session: Option<String>,
    /// Address to listen on, control and data, TCP, and UDP for discovery
    /// [default: the inventory's [session] source if it is an address of
    /// this machine, else 0.0.0.0 with its port; without an inventory
    /// 0.0.0.0:4715].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// File holding the session secret (64 hex digits) [default with
    /// --inventory: `secret` beside it, made if missing; else one is
    /// generated and written to ka-secret-SESSION].
    #[arg(long, value_name = "FILE", env = super::SECRET_FILE_ENV)]
    pub secret_file: Option<PathBuf>,
    /// The image: a regular file or a block device.
    #[arg(long, value_name = "PATH", group = "input")]
    pub image: Option<PathBuf>,
    /// Clone the standard output of this shell command.
    #[arg(long, value_name = "CMD", group = "input")]
    pub command: Option<String>,
    /// Clone this directory tree (as GNU tar: permissions, owners, links, sparse files).
    #[arg(long, value_name = "DIR", group = "input")]
    pub tar: Option<PathBuf>,
    /// Clone this process's standard input.
    #[arg(long, group = "input")]
    pub stdin: bool,
    /// Clone this running machine file by file: its partition tables, each
    /// file system as a tree, raw partitions, and the boot loader rebuilt on
    /// every node (`ka join --system DISK`; see docs/system.md).
    #[arg(long, group = "input")]
    pub system: bool,
    /// Serve a system stream saved earlier by `ka join --save FILE`.
    #[arg(long, value_name = "FILE", group = "input")]
    pub system_image: Option<PathBuf>,
    /// With --system: the root of the system to clone (its file systems are
    /// those mounted at and below it).
    #[arg(long, value_name = "DIR", default_value = "/", requires = "system")]
    pub root: PathBuf,
    /// With --system: send this directory empty (its mode and owner kept);
    /// repeatable.
    #[arg(long, value_name = "DIR", requires = "system")]
    pub exclude: Vec<PathBuf>,
    /// With --system: leave this disk's file systems out; repeatable.
    #[arg(long, value_name = "DEV", requires = "system")]
    pub skip_disk: Vec<PathBuf>,
    /// With --system: send this partition as bytes, not as a tree (zero runs
    /// as extents); repeatable.
    #[arg(long, value_name = "PART", requires = "system")]
    pub raw: Vec<PathBuf>,
    /// With --system: partition sizes for nodes whose disks differ (see
    /// docs/system.md).
    #[arg(long, value_name = "FILE", requires = "system")]
    pub layout: Option<PathBuf>,
    /// With --system: run this on each node, chrooted into its new system,
    /// once it is unpacked and its boot loader installed.
    #[arg(long, value_name = "CMD", requires = "system")]
    pub post_command: Option<String>,
    /// Serve an --image block device even though a file system on it is
    /// mounted read-write (its copy may then be inconsistent).
    #[arg(long, requires = "image")]
    pub force: bool,
    /// Where a stream (--command, --tar, --stdin) is spooled so any node can be served again.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Children per node: 1 makes a chain, more a tree.
    #[arg(long, default_value_t = 1)]
    pub arity: u32,
    /// Start this long after starting to listen, with the nodes present (at least --min-nodes).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub join_timeout: Option<Duration>,
    /// With --join-timeout: the fewest nodes to start with.
    #[arg(long, default_value_t = 1)]
    pub min_nodes: u32,
    /// Pause between releasing nodes that wait for release (the original -d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub release_delay: Duration,
    /// What to do with a node that keeps falling behind: keep, tail or drop.
    #[arg(long, default_value = "tail", value_parser = parse_policy)]
    pub slow_policy: SlowPolicy,
    /// A node is too slow once it lags its upstream by more than this…
    #[arg(long, default_value = "4MiB", value_parser = ka_core::units::parse_size)]
    pub slow_lag: u64,
    /// …for this long while receiving at under 40 % of its upstream's rate
    /// (or its fastest sibling's).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub slow_window: Duration,
    /// Node names in chain order; others follow by address [default with
    /// --inventory: the inventory's order].
    #[arg(long, value_delimiter = ',')]
    pub order: Option<Vec<String>>,
    /// Declare a node dead after this long without a word from it (it then
    /// leaves the chain, which heals around it). Nodes learn it from the
    /// source and use it for the source in turn.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration, default_value = "1s")]
    pub dead_after: Duration,
    /// Cap the source's total send rate, shared among the nodes it feeds
    /// directly (what udpcast calls --max-bitrate): e.g. 50MiB (bytes per
    /// second) or 100Mbit. Leaves room on a shared network, or paces a test.
    #[arg(long, value_name = "RATE", value_parser = ka_core::units::parse_rate)]
    pub max_rate: Option<u64>,
    /// Pack the stream with Zstandard: compressed once here, forwarded as
    /// it is by every node, unpacked only to be written; the digest stays
    /// the image's own. `zstd` or `zstd:LEVEL` (1–19) always packs; `auto`
    /// packs an image file whose sample shrinks by a fifth or more, if this
    /// machine packs it faster than the nodes' link carries (--link-rate),
    /// and sends other images as they are (a command, tar or system stream is
    /// packed only with `zstd`); `off` never packs. A `.zst` image is sent
    /// as it is (with `off`, decoded first); gzip and xz images are decoded
    /// here. A node that restarts mid-copy starts a packed stream over (a
    /// plain one goes on from its durable prefix), hence `off` by default.
    #[arg(long, value_name = "HOW", default_value = "off")]
    pub compress: ka_net::image::packed::Compression,
    /// The rate of the nodes' links, which `--compress auto` weighs packing
    /// against: e.g. 10Gbit, 1Gbit. An image is packed only if this machine
    /// packs it faster than that, else the copy would wait for the packing.
    /// [default: the speed of the interface this listens on (the fastest
    /// one when listening on every address), at most --max-rate]
    #[arg(long, value_name = "RATE", value_parser = ka_core::units::parse_rate)]
    pub link_rate: Option<u64>,
    /// Where the session's record is kept (nodes' outcomes), so that `ka
    /// serve` restarted with the same arguments on the same image goes on
    /// with the session: the nodes rejoin and resume, and nodes that had
    /// already finished are still reported. Removed when the session ends;
    /// a record last written more than 24 h ago is not gone on with (it is
    /// reported and removed). [default: /var/lib/ka, if usable]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print JSON lines (events, every node's progress about five times a second,
    /// and a final report) instead of the live display.
    #[arg(long)]
    pub json: bool,
    /// Serve a live web page of the session at this address (e.g.
    /// 127.0.0.1:8080): the chain drawn with every node's state, bytes,
    /// rate and ETA, the events and the final report; also its JSON
    /// (/api/session), event stream (/api/events) and Prometheus metrics
    /// (/metrics). Read-only. An address other than loopback needs
    /// --http-token-file (docs/web.md).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// With --http: the token every request must carry (`?token=T` or
    /// `Authorization: Bearer T`), read from FILE, or made there (random,
    /// mode 0600) if FILE is missing.
    #[arg(long, value_name = "FILE", requires = "http")]
    pub http_token_file: Option<PathBuf>,
    /// With --http: how long the page stays up once the session is over,
    /// so browsers get the final report.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration, default_value = "5s", requires = "http")]
    pub http_linger: Duration,
    /// Keep one log file per node here, NODE.log: its events and console
    /// lines as it sends them, and the source's events about it, each line
    /// stamped with the time (`ka console` follows them). The directory is
    /// made 0750, the files 0640. [default: /var/log/ka/SESSION, if usable]
    #[arg(long, value_name = "DIR", env = "KA_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// Do not send the nodes' lines to the system log (/dev/log, tagged
    /// `ka`, as `NODE: line`).
    #[arg(long)]
    pub no_syslog: bool,
    /// Serve the session the inventory describes (docs/inventory.md): its
    /// [session] name, source address and clone kind, its nodes in install
    /// mode in --boot-state, in inventory order, and the secret beside it;
    /// each node whose clone is verified is flipped to local boot (after_clone).
    /// Flags given override what it says.
    #[arg(long, short = 'i', value_name = "FILE", env = super::INVENTORY_ENV)]
    pub inventory: Option<PathBuf>,
    /// Boot-mode directory of the inventory's nodes (`ka pxe`/`ka tftp`
    /// --state-dir) [default: /var/lib/ka].
    #[arg(long, value_name = "DIR", requires = "inventory")]
    pub boot_state: Option<PathBuf>,
}

fn parse_policy(s: &str) -> Result<SlowPolicy, String> {
    match s {
        "keep" => Ok(SlowPolicy::Keep),
        "tail" => Ok(SlowPolicy::MoveToTail),
        "drop" => Ok(SlowPolicy::Drop),
        _ => Err(format!("unknown policy {s:?}: use keep, tail or drop")),
    }
}

/// Where a session's secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFrom {
    /// This file, which must hold it (`--secret-file`).
    File(PathBuf),
    /// This file beside the inventory, made first if missing: `ka tftp`
    /// reads or makes the same one.
    Shared(PathBuf),
    /// A new one, written to `ka-secret-SESSION` for the nodes.
    Generated,
}

/// A `ka serve` checked and ready to run.
pub struct ServePlan {
    /// What the session library runs.
    pub options: ServeOptions,
    /// Where the secret comes from.
    pub secret: SecretFrom,
    /// JSON lines instead of the live display.
    pub json: bool,
    /// Flips verified nodes to their after-clone boot mode, with `--inventory`.
    pub flip: Option<VerifiedFlip>,
    /// The web page's address and token file, with `--http`.
    pub http: Option<(SocketAddr, Option<PathBuf>)>,
    /// How long the web page outlives the session.
    pub http_linger: Duration,
    /// Where the node logs go; `None`: no files (the default directory
    /// could not be made).
    pub log_dir: Option<PathBuf>,
    /// Send the nodes' lines to the system log too.
    pub syslog: bool,
}

impl ServePlan {
    /// Checks `args` and reads the inventory, before anything is served.
    pub fn from_args(mut args: ServeArgs) -> anyhow::Result<ServePlan> {
        // Before anything is made (the default state directory below, the
        // secret beside an inventory), listens or is written.
        if let Some(p) = &args.image {
            ka_net::image::sources::check_servable(p).context("--image")?;
            if !args.force {
                ka_net::image::sources::check_not_mounted_rw(p).context("--image")?;
            }
        }
        let cluster = match args.inventory.clone() {
            Some(path) => Some(FromInventory::take(&path, &mut args)?),
            None => None,
        };
        let session = args.session.unwrap_or_else(|| DEFAULT_SESSION.to_string());
        crate::session::check_session_name(&session)?;
        let listen = args
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)));
        let nodes = args
            .nodes
            .context("say how many nodes to wait for: --nodes N (or --inventory FILE)")?;
        if nodes == 0 {
            bail!("--nodes 0: a session clones to at least one node; give the number of nodes that will join (--nodes N)");
        }
        let mut config = SourceConfig::new(session, nodes, listen);
        config.arity = args.arity.max(1);
        config.join_timeout = args.join_timeout;
        config.min_nodes = args.min_nodes;
        config.release_delay = args.release_delay;
        config.slow_policy = args.slow_policy;
        config.slow_lag = args.slow_lag;
        config.slow_window = args.slow_window;
        config.order = args.order.unwrap_or_default();
        config.dead_after = args.dead_after;
        if args.dead_after <= config.heartbeat {
            bail!(
                "--dead-after {:?} is not longer than the heartbeat ({:?}): every node would be declared dead",
                args.dead_after,
                config.heartbeat
            );
        }
        let state_dir = match args.state_dir {
            Some(dir) => Some(dir),
            // The default is a convenience: without it a restart of the source
            // cannot account for nodes that already finished, nothing worse.
            None => match session::default_state_dir() {
                Ok(dir) => Some(dir),
                Err(e) => {
                    crate::errln!("ka: {e}; going on without a session record");
                    None
                }
            },
        };
        let input = if let Some(p) = args.image {
            Input::File(p)
        } else if let Some(c) = args.command {
            Input::Command(c)
        } else if let Some(d) = args.tar {
            Input::Tar(d)
        } else if args.stdin {
            Input::Stdin
        } else if args.system {
            Input::System(system_plan(
                args.root,
                args.exclude,
                args.skip_disk,
                args.raw,
                args.layout,
                args.post_command,
            )?)
        } else if let Some(p) = args.system_image {
            ka_net::image::sources::check_servable(&p).context("--system-image")?;
            ka_net::system::check_saved_stream(&p).context("--system-image")?;
            Input::File(p)
        } else {
            bail!("say what to clone: --image PATH, --system, --system-image FILE, --command CMD, --tar DIR or --stdin")
        };
        let secret = match (args.secret_file, &cluster) {
            (Some(file), _) => SecretFrom::File(file),
            (
                None,
                Some(FromInventory {
                    shared_secret: Some(file),
                    ..
                }),
            ) => SecretFrom::Shared(file.clone()),
            (None, _) => SecretFrom::Generated,
        };
        let flip = cluster.map(|c| VerifiedFlip::new(c.inventory, c.state));
        let log_dir = match args.log_dir {
            Some(dir) => {
                make_log_dir(&dir).context("--log-dir")?;
                Some(dir)
            }
            // Like the state directory's, the default is a convenience.
            None => {
                let dir = default_log_dir(&config.session);
                match make_log_dir(&dir) {
                    Ok(()) => Some(dir),
                    Err(e) => {
                        crate::errln!("ka: {e:#}; going on without node log files (--log-dir)");
                        None
                    }
                }
            }
        };
        Ok(ServePlan {
            options: ServeOptions {
                config,
                input,
                spool_dir: args.spool_dir,
                state_dir,
                max_rate: args.max_rate,
                compression: args.compress,
                link_rate: args.link_rate,
                web: None,
            },
            secret,
            json: args.json,
            flip,
            http: args.http.map(|addr| (addr, args.http_token_file)),
            http_linger: args.http_linger,
            log_dir,
            syslog: !args.no_syslog,
        })
    }
}

/// What `ka serve --inventory` takes from the inventory: the inventory and
/// boot state whose verified nodes it flips.
struct FromInventory {
    inventory: Inventory,
    state: BootState,
    /// The secret beside the inventory, which `ka tftp` shares (made by
    /// whichever starts first), unless --secret-file names another.
    shared_secret: Option<PathBuf>,
}

impl FromInventory {
    /// Loads the inventory and its boot state, and fills what `args` leaves
    /// unsaid from them: the session, the listen address, the nodes to wait
    /// for and their order, the secret file. Says on standard error what
    /// it took, so the operator sees the session the nodes will look for.
    fn take(path: &Path, args: &mut ServeArgs) -> anyhow::Result<FromInventory> {
        let inventory = Inventory::load(path)?;
        let dir = args
            .boot_state
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let state = BootState::new(&dir);
        let session = &inventory.session;
        check_clone_kind(session.clone, args, path)?;
        let mut taken = Vec::new();
        let mut note = |what: String, given: bool| {
            taken.push(if given {
                format!("{what} (given, the inventory says otherwise)")
            } else {
                what
            })
        };
        match &args.session {
            Some(name) => {
                if *name != session.name {
                    note(format!("session {name}"), true);
                }
            }
            None => {
                args.session = Some(session.name.clone());
                note(format!("session {}", session.name), false);
            }
        }
        let source = SocketAddr::V4(session.source);
        match args.listen {
            Some(listen) => {
                if listen.port() != source.port() {
                    note(format!("listen {listen}"), true);
                }
            }
            None => {
                let listen = listen_for(source);
                args.listen = Some(listen);
                if listen == source {
                    note(format!("listen {listen}"), false);
                } else {
                    crate::errln!(
                        "ka: {} is not an address of this machine: listening on {listen}; \
                         nodes connect to {source} ([session] source), which must lead here",
                        source.ip()
                    );
                    note(format!("listen {listen}"), false);
                }
            }
        }
        let install = install_mode_nodes(&inventory, &state)?;
        if args.nodes.is_none() {
            if install.is_empty() {
                bail!(
                    "no node of {} is in install mode in {}: set the nodes to clone first \
                     (ka pxe set --mode install --all -i {} --state-dir {}), or give --nodes N",
                    path.display(),
                    dir.display(),
                    path.display(),
                    dir.display()
                );
            }
            args.nodes = Some(install.len() as u32);
            note(
                format!(
                    "{} nodes in install mode in {}: {}",
                    install.len(),
                    dir.display(),
                    shorten(&install)
                ),
                false,
            );
        }
        if args.order.is_none() {
            let order: Vec<String> = inventory.nodes.iter().map(|n| n.name.clone()).collect();
            note(
                format!("chain in inventory order: {}", shorten(&order)),
                false,
            );
            args.order = Some(order);
        }
        let shared_secret = match args.secret_file {
            Some(_) => None,
            None => {
                let file = secret::beside_inventory(path);
                note(format!("secret {}", file.display()), false);
                Some(file)
            }
        };
        // One write, so the line stays whole beside `ka tftp` or others
        // writing to the same terminal or log.
        let line = format!("ka: from {}: {}\n", path.display(), taken.join("; "));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        Ok(FromInventory {
            inventory,
            state,
            shared_secret,
        })
    }
}

/// Refuses a session whose input is not what the inventory's nodes boot
/// to receive: a node booted with `ka.clone=system` cannot take an image,
/// nor an image node a system stream.
fn check_clone_kind(kind: CloneKind, args: &ServeArgs, path: &Path) -> anyhow::Result<()> {
    let serves_system = args.system || args.system_image.is_some();
    let says_system = kind == CloneKind::System;
    if says_system && !serves_system {
        bail!(
            "{} says clone = \"system\": its nodes boot to rebuild a whole machine; \
             serve one with --system (or --system-image FILE), or set clone = \"image\"",
            path.display()
        );
    }
    if !says_system && serves_system {
        bail!(
            "{} says clone = \"image\" (the default): its nodes boot to write an image onto one disk; \
             set clone = \"system\" in its [session] to serve --system{}",
            path.display(),
            if args.system_image.is_some() { "-image" } else { "" }
        );
    }
    Ok(())
}

/// Where to listen for a session whose nodes connect to `source`: there,
/// when it is an address of this machine, else every address at its port
/// (a source reached through a NAT or a forwarded port).
fn listen_for(source: SocketAddr) -> SocketAddr {
    // Binding an address succeeds only where the machine has it.
    let local = std::net::UdpSocket::bind(SocketAddr::new(source.ip(), 0)).is_ok();
    if local {
        source
    } else {
        SocketAddr::from(([0, 0, 0, 0], source.port()))
    }
}

/// The inventory's nodes in install mode in `state`, in inventory order.
fn install_mode_nodes(inventory: &Inventory, state: &BootState) -> anyhow::Result<Vec<String>> {
    let modes = state.load()?;
    Ok(inventory
        .nodes
        .iter()
        .filter(|n| modes.get(&n.name).mode == Mode::Install)
        .map(|n| n.name.clone())
        .collect())
}

/// A list of names short enough for one line: a cluster's thousand names
/// would bury what matters.
fn shorten(names: &[String]) -> String {
    if names.len() > 8 {
        format!("{} … {}", names[..4].join(" "), names[names.len() - 1])
    } else {
        names.join(" ")
    }
}

/// Reads this machine's layout for `ka serve --system` and makes the plan
/// the nodes follow; refuses, before anything is served, what cannot be
/// cloned file by file.
fn system_plan(
    root: PathBuf,
    exclude: Vec<PathBuf>,
    skip_disks: Vec<PathBuf>,
    raw: Vec<PathBuf>,
    layout_file: Option<PathBuf>,
    post_command: Option<String>,
) -> anyhow::Result<ka_net::system::Plan> {
    use ka_net::system::{disk::LayoutFile, layout};
    // Parsed before the disks are read, and checked against them after: a
    // typo must fail here, not on every node.
    let layout_file = match &layout_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading --layout {}", f.display()))?;
            let parsed =
                LayoutFile::parse(&text).with_context(|| format!("--layout {}", f.display()))?;
            Some((f, text, parsed))
        }
        None => None,
    };
    let layout = layout::read_layout(&layout::ReadOptions {
        root,
        exclude,
        skip_disks,
        raw,
    })
    .context("--system")?;
    if let Some((f, _, parsed)) = &layout_file {
        parsed
            .check(&layout)
            .with_context(|| format!("--layout {}", f.display()))?;
    }
    let layout_text = layout_file.map(|(_, text, _)| text);
    Ok(ka_net::system::Plan::new(layout, layout_text, post_command))
}

/// Runs `ka serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitStatus> {
    let plan = ServePlan::from_args(args)?;
    let secret = obtain_secret(&plan.secret, &plan.options.config.session)?;
    let json = plan.json;
    let linger = plan.http_linger;
    let (report, web) = serve(plan, &secret)?;
    print_report(&report, json);
    if let Some(web) = &web {
        web.linger(linger);
    }
    Ok(exit_status(&report))
}

/// The secret from `file`, or a generated one written for the nodes (and
/// the operator told where).
fn obtain_secret(from: &SecretFrom, session: &str) -> anyhow::Result<Secret> {
    let file = match from {
        SecretFrom::File(file) => return secret::load(file),
        SecretFrom::Shared(file) => file,
        SecretFrom::Generated => {
            let (secret, path) = secret::generate(session)?;
            crate::errln!(
                "ka: no --secret-file given; generated one and wrote it to {} — give that file to the nodes (ka join --secret-file)",
                path.display()
            );
            return Ok(secret);
        }
    };
    let (secret, made) = secret::load_or_create(file)?;
    if made {
        crate::errln!(
            "ka: made a new session secret in {} (readable by root only; ka tftp hands each install-mode node its own key from it)",
            file.display()
        );
    }
    Ok(secret)
}

/// What the session clones, in words for its status and web page.
fn describe_input(input: &Input) -> String {
    match input {
        Input::File(p) => p.display().to_string(),
        Input::Command(c) => format!("the output of `{c}`"),
        Input::Tar(d) => format!("the tree {}", d.display()),
        Input::Stdin => "standard input".into(),
        Input::System(_) => "this machine (--system)".into(),
    }
}

/// The web page's server for `--http`, bound before the session starts;
/// says on standard error where to open it.
fn web_server(
    http: &Option<(SocketAddr, Option<PathBuf>)>,
    session: &str,
    image: &str,
) -> anyhow::Result<Option<WebServer>> {
    let Some((addr, token_file)) = http else {
        return Ok(None);
    };
    let token = match token_file {
        Some(file) => {
            let (token, made) = crate::web::load_token(file)?;
            if made {
                crate::errln!(
                    "ka: made a new web token in {} (readable by root only)",
                    file.display()
                );
            }
            Some(token)
        }
        None => None,
    };
    let feed = WebFeed::new(SessionStatus::empty(session, Some(image.to_string())));
    let server = WebServer::bind(*addr, token, feed)?;
    crate::errln!("ka: web page at {}", server.url());
    Ok(Some(server))
}

/// Serves the session with the live display (and boot-mode flips) until it
/// ends; returns its report and the web page still serving it.
fn serve(mut plan: ServePlan, secret: &Secret) -> anyhow::Result<(Report, Option<WebServer>)> {
    let session_name = plan.options.config.session.clone();
    let image = describe_input(&plan.options.input);
    let web = web_server(&plan.http, &session_name, &image)?;
    plan.options.web = web.clone();
    let mut display = Display::new(plan.json);
    let state_dir = plan.options.state_dir.as_deref();
    if state_dir.is_some() || web.is_some() {
        display = display.with_status(StatusWriter::new(state_dir, &session_name, Some(image)));
    }
    if let Some(web) = &web {
        display = display.with_web(web.feed().clone());
    }
    let flip = plan.flip;
    let mut logs = NodeLogs::new(plan.log_dir, plan.syslog);
    let report = session::run(plan.options, secret, |s, e| {
        if let (Some(flip), Some(e)) = (&flip, e) {
            if let Some(text) = describe_flip(flip.on_event(s, e)) {
                display.note(&text);
            }
        }
        if let Some(e) = e {
            log_event(&mut logs, s, e);
        }
        display.update(s, e)
    });
    display.finish();
    let report = report?;
    if let Some(web) = &web {
        web.feed().report(&report_json(&report));
    }
    Ok((report, web))
}

/// Writes what `event` tells of a node to that node's log: the lines it
/// sent, or the source's own word about it (`source: …`).
fn log_event(logs: &mut NodeLogs, source: &Source, event: &SourceEvent) {
    let name_of = |n: NodeId| source.name(n).map_or_else(|| n.to_string(), str::to_string);
    let (node, line) = match event {
        SourceEvent::NodeLog { name, lines, .. } => return logs.write(name, lines),
        SourceEvent::JoinFailed(f) => (
            f.name.clone(),
            format!("failed before joining: {}", f.reason),
        ),
        SourceEvent::Joined {
            node,
            name,
            rejoin,
            resumed_from,
            ..
        } => (
            name.clone(),
            match (rejoin, resumed_from) {
                (false, 0) => format!("joined as {node}"),
                (_, 0) => format!("rejoined as {node}"),
                (_, from) => format!("joined as {node}; the copy goes on from byte {from}"),
            },
        ),
        SourceEvent::Relinked { node, upstream } => (
            name_of(*node),
            format!(
                "now fed by {}",
                upstream.map_or("the source".to_string(), name_of)
            ),
        ),
        SourceEvent::Dead { node, reason } => (name_of(*node), format!("declared dead: {reason}")),
        SourceEvent::Stranded {
            node,
            upstream,
            from,
        } => (
            name_of(*node),
            format!(
                "lacks byte {from}, which left {}'s window: the source feeds it",
                name_of(*upstream)
            ),
        ),
        SourceEvent::Slow { node, policy } => (
            name_of(*node),
            format!("too slow: {}", super::events::slow_policy(*policy)),
        ),
        SourceEvent::Verified { node, ok: true, .. } => (name_of(*node), "copy verified".into()),
        SourceEvent::Verified {
            node,
            ok: false,
            reason,
        } => (name_of(*node), format!("copy does not match: {reason}")),
        SourceEvent::Failed { node, reason } => (name_of(*node), format!("failed: {reason}")),
        SourceEvent::Released { node } => (name_of(*node), "released".into()),
        _ => return,
    };
    logs.write(&node, &[format!("source: {line}")]);
}

fn describe_flip(flipped: Option<(String, Flipped)>) -> Option<String> {
    let (name, flipped) = flipped?;
    Some(match flipped {
        Flipped::To(mode) => format!("{name}: clone verified, boot mode now {mode}"),
        Flipped::Kept => format!("{name}: clone verified, boot mode kept (after_clone = \"keep\")"),
        Flipped::Failed(why) => {
            format!("{name}: clone verified, but its boot mode was not flipped: {why}")
        }
    })
}

/// The exit status a session's report earns: could not run when it was
/// aborted before any node joined, success only when every node verified.
pub fn exit_status(report: &Report) -> ExitStatus {
    if report.aborted.is_some() && report.nodes.is_empty() {
        ExitStatus::CouldNotRun
    } else if !report.nodes.is_empty()
        && report.nodes.iter().all(NodeReport::is_ok)
        && report.aborted.is_none()
    {
        ExitStatus::Success
    } else {
        ExitStatus::SomeFailed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ka_core::ids::NodeId;
    use ka_core::time::Time;

    use super::*;

    fn node(name: &str, outcome: Option<Result<(), String>>) -> NodeReport {
        NodeReport {
            node: NodeId(1),
            name: name.into(),
            mac: [0; 6],
            outcome,
            received: 0,
            joined_at: Time::ZERO,
            finished_at: None,
            deaths: 0,
            resumed_from: 0,
            restored: false,
            released: true,
            failed_before_join: false,
        }
    }

    fn report(nodes: Vec<NodeReport>, aborted: Option<&str>) -> Report {
        Report {
            nodes,
            size: 0,
            packed: None,
            streaming: Duration::ZERO,
            aborted: aborted.map(String::from),
            expected: 2,
        }
    }

    /// An inventory of three nodes, the first two in install mode, and an
    /// image to serve, in `dir`.
    fn cluster(dir: &Path, clone: &str) -> (PathBuf, PathBuf, PathBuf) {
        let inv = dir.join("cluster.toml");
        std::fs::write(
            &inv,
            format!(
                r#"
[network]
subnet = "10.0.0.0/24"
[boot]
server = "10.0.0.1"
tftp_root = "tftp"
kernel = "vmlinuz"
initramfs = "initrd"
[session]
name = "lab"
source = "127.0.0.1:4000"
disk = "/dev/vda"
clone = "{clone}"
[[node]]
name = "zeta"
mac = "52:54:00:00:00:01"
ip = "10.0.0.11"
[[node]]
name = "alpha"
mac = "52:54:00:00:00:02"
ip = "10.0.0.12"
[[node]]
name = "mid"
mac = "52:54:00:00:00:03"
ip = "10.0.0.13"
"#
            ),
        )
        .unwrap();
        let state = dir.join("boot");
        let inventory = Inventory::load(&inv).unwrap();
        BootState::new(&state)
            .set_modes(&inventory, &["zeta", "alpha"], false, Mode::Install)
            .unwrap();
        let image = dir.join("image");
        std::fs::write(&image, b"image").unwrap();
        (inv, state, image)
    }

    fn plan(args: &[&str]) -> anyhow::Result<ServePlan> {
        // Node logs go to a directory of the test's own, gone once it is
        // planned, not under /var/log/ka.
        let logs = tempfile::tempdir().unwrap();
        let logs = ["--log-dir", logs.path().to_str().unwrap()];
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(
            ["ka", "serve"].iter().chain(&logs).chain(args),
        )?;
        match cli.command {
            crate::cli::Command::Serve(args) => ServePlan::from_args(*args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_inventory_gives_the_session_its_nodes_and_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (inv, state, image) = cluster(dir.path(), "image");
        let (inv, state, image) = (
            inv.to_str().unwrap(),
            state.to_str().unwrap(),
            image.to_str().unwrap(),
        );
        let records = dir.path().join("records");
        let records = records.to_str().unwrap();
        let base = [
            "-i",
            inv,
            "--boot-state",
            state,
            "--image",
            image,
            "--state-dir",
            records,
        ];
        let p = plan(&base).unwrap();
        let c = &p.options.config;
        assert_eq!(c.session, "lab");
        // 127.0.0.1 is this machine's: listened on as it is.
        assert_eq!(c.data_addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(c.expected_nodes, 2, "the nodes in install mode");
        assert_eq!(c.order, ["zeta", "alpha", "mid"], "inventory order");
        assert_eq!(p.secret, SecretFrom::Shared(dir.path().join("secret")));
        assert!(p.flip.is_some());

        // Flags win.
        let mut given = base.to_vec();
        given.extend([
            "--session",
            "other",
            "--listen",
            "127.0.0.1:5000",
            "--nodes",
            "3",
        ]);
        given.extend(["--order", "mid", "--secret-file", "/s"]);
        let p = plan(&given).unwrap();
        let c = &p.options.config;
        assert_eq!(
            (c.session.as_str(), c.data_addr.port(), c.expected_nodes),
            ("other", 5000, 3)
        );
        assert_eq!(c.order, ["mid"]);
        assert_eq!(p.secret, SecretFrom::File("/s".into()));
    }

    #[test]
    fn a_source_address_of_another_machine_is_listened_for_on_every_address() {
        assert_eq!(
            listen_for("192.0.2.7:4000".parse().unwrap()),
            "0.0.0.0:4000".parse().unwrap()
        );
        assert_eq!(
            listen_for("127.0.0.1:4000".parse().unwrap()),
            "127.0.0.1:4000".parse().unwrap()
        );
    }

    #[test]
    fn an_inventory_refuses_what_its_nodes_are_not_booted_for() {
        let dir = tempfile::tempdir().unwrap();
        let (inv, state, image) = cluster(dir.path(), "system");
        let (inv, state, image) = (
            inv.to_str().unwrap(),
            state.to_str().unwrap(),
            image.to_str().unwrap(),
        );
        let err = plan(&["-i", inv, "--boot-state", state, "--image", image])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("clone = \"system\"") && err.contains("--system"),
            "{err}"
        );

        let (inv, _, image) = cluster(dir.path(), "image");
        let err = plan(&[
            "-i",
            inv.to_str().unwrap(),
            "--boot-state",
            state,
            "--system-image",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(!err.is_empty());
        let err = plan(&[
            "-i",
            inv.to_str().unwrap(),
            "--boot-state",
            state,
            "--system-image",
            image.to_str().unwrap(),
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("clone = \"image\""), "{err}");

        // Nobody in install mode: nothing to wait for, and how to fix it.
        let empty = dir.path().join("empty");
        let err = plan(&[
            "-i",
            inv.to_str().unwrap(),
            "--boot-state",
            empty.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("ka pxe set --mode install"), "{err}");
    }

    #[test]
    fn zero_nodes_and_a_missing_image_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.img");
        std::fs::write(&image, b"x").unwrap();
        let state = dir.path().join("state").display().to_string();
        let err = plan(&[
            "-n",
            "0",
            "--image",
            image.to_str().unwrap(),
            "--state-dir",
            &state,
        ])
        .err()
        .expect("--nodes 0 refused");
        assert!(format!("{err:#}").contains("--nodes 0:"), "{err:#}");
        let absent = dir.path().join("absent.img");
        let err = plan(&[
            "-n",
            "1",
            "--image",
            absent.to_str().unwrap(),
            "--state-dir",
            &state,
        ])
        .err()
        .expect("a missing image refused");
        let text = format!("{err:#}");
        assert!(
            text.starts_with("--image") && text.contains(&absent.display().to_string()),
            "{text}"
        );
        assert!(plan(&[
            "-n",
            "1",
            "--image",
            image.to_str().unwrap(),
            "--state-dir",
            &state
        ])
        .is_ok());
    }

    #[test]
    fn exit_status_tells_scripts_how_the_session_ended() {
        let ok = || node("n1", Some(Ok(())));
        let failed = || node("n2", Some(Err("disk full".into())));
        assert_eq!(
            exit_status(&report(vec![ok(), ok()], None)),
            ExitStatus::Success
        );
        assert_eq!(
            exit_status(&report(vec![ok(), failed()], None)),
            ExitStatus::SomeFailed
        );
        assert_eq!(
            exit_status(&report(vec![ok(), node("n3", None)], None)),
            ExitStatus::SomeFailed
        );
        assert_eq!(
            exit_status(&report(vec![ok()], Some("interrupted"))),
            ExitStatus::SomeFailed
        );
        assert_eq!(
            exit_status(&report(vec![], Some("no node joined"))),
            ExitStatus::CouldNotRun
        );
        assert_eq!(exit_status(&report(vec![], None)), ExitStatus::SomeFailed);
    }
}
