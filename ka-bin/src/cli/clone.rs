//! `ka serve`, `ka join`, `ka go` and `ka demo`: cloning an image through a
//! chain of nodes.
//!
//! Exit codes scripts can trust: 0 when every node verified its copy, 1 when
//! the session ran but some nodes failed, 2 when it could not run at all.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ka_core::config::{NodeConfig, SlowPolicy, SourceConfig};
use ka_core::node::NodeEvent;
use ka_core::source::NodeReport;

use super::display::{human, print_report, Display};
use super::DEFAULT_STATE_DIR;
use ka_net::shell::{
    self, load_or_generate_secret, session_key, ImageInput, NodeOptions, Secret, SourceOptions,
    SourceReport, Target,
};
use ka_net::SinkSpec;
use ka_net::SourceSpec;

use crate::boot::flip::{Flipped, VerifiedFlip};
use crate::boot::{BootState, Inventory};
use crate::netboot::identity::{RootPartition, Step as IdentityStep};

/// The port ka listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4715;
/// The session name unless told otherwise.
pub const DEFAULT_SESSION: &str = "ka";

/// The session failed for some nodes.
pub const EXIT_SOME_FAILED: u8 = 1;
/// The session could not run.
pub const EXIT_COULD_NOT_RUN: u8 = 2;
/// `ka join --identity`: the copy is verified but the identity step failed.
pub const EXIT_NO_IDENTITY: u8 = 3;

/// `ka serve`: the source (the original ka-d-server).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Start as soon as this many nodes have joined.
    #[arg(long, short = 'n')]
    pub nodes: u32,
    /// Session name the nodes must ask for.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// Address to listen on (control and data).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// File holding the session secret (64 hex digits); without it one is generated and printed.
    #[arg(long, value_name = "FILE")]
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
    /// A node is too slow once it lags its upstream by more than this (e.g. 256MiB)…
    #[arg(long, default_value = "256MiB", value_parser = ka_core::units::parse_size)]
    pub slow_lag: u64,
    /// …for this long while gaining on it less than half as fast.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub slow_window: Duration,
    /// Node names in chain order (an inventory's order); others follow by address.
    #[arg(long, value_delimiter = ',')]
    pub order: Vec<String>,
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
    /// Where the session's record is kept (nodes' outcomes), so that `ka
    /// serve` restarted with the same arguments on the same image goes on
    /// with the session: the nodes rejoin and resume, and nodes that had
    /// already finished are still reported. Removed when the session ends.
    /// [default: /var/lib/ka, if usable]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print JSON lines (events, every node's progress about five times a second,
    /// and a final report) instead of the live display.
    #[arg(long)]
    pub json: bool,
    /// Inventory of the nodes: each one whose clone is verified is flipped to
    /// local boot in --boot-state (after_clone in the inventory).
    #[arg(long, short = 'i', value_name = "FILE", requires = "boot_state")]
    pub inventory: Option<PathBuf>,
    /// Boot-mode directory to flip verified nodes in (`ka pxe`/`ka tftp` --state-dir).
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

/// `ka join`: a node (the original ka-d-client).
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The session and how to reach its source.
    #[command(flatten)]
    pub reach: Reach,
    /// Where to write the image: a regular file or a block device.
    #[arg(long, value_name = "PATH", group = "output")]
    pub target: Option<PathBuf>,
    /// Feed the image to the standard input of this shell command.
    #[arg(long, value_name = "CMD", group = "output")]
    pub command: Option<String>,
    /// Untar the image into this directory.
    #[arg(long, value_name = "DIR", group = "output")]
    pub untar: Option<PathBuf>,
    /// Where a --command or --untar image is received before it is fed on.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Stay until the source releases this node (the original -w).
    #[arg(long)]
    pub wait_release: bool,
    /// Also read the written target back and check it.
    #[arg(long, value_parser = ["readback"])]
    pub verify: Option<String>,
    /// Keep looking for the source this long, at the start and whenever it
    /// is lost (a source restarted on the same image is rejoined, and the
    /// copy goes on where it was).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub wait: Duration,
    /// Where this node records how much of its --target is written and
    /// durable, so that `ka join` restarted with the same arguments goes on
    /// from there instead of from the start (created if missing; the record
    /// is removed once the copy is checked). --command and --untar targets
    /// always start over.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Once the copy is verified, give it this node's identity: KEY=VALUE
    /// items hostname, domain, ip (ADDR/PREFIX), gateway, dns, mac (see docs/netboot.md).
    #[arg(long, value_name = "KEY=VALUE,…", value_delimiter = ',')]
    pub identity: Vec<String>,
    /// With --identity: the partition of --target holding the root file
    /// system (a number, `auto`: the first with an etc/, `whole`: no partitions).
    #[arg(long, value_name = "N|auto|whole", default_value = "auto")]
    pub root_partition: RootPartition,
}

/// `ka go`: start a waiting session now with the nodes present (the original -g).
#[derive(Debug, clap::Args)]
pub struct GoArgs {
    /// The session and how to reach its source.
    #[command(flatten)]
    pub reach: Reach,
}

/// A session, its secret, and how to reach its source: named, or found by
/// UDP broadcast (the original's way, for nodes that boot before the source).
#[derive(Debug, clap::Args)]
pub struct Reach {
    /// The source, HOST or HOST:PORT; without it the source of the session is
    /// found by UDP broadcast.
    #[arg(long)]
    pub server: Option<String>,
    /// Where discovery broadcasts go when --server is not given.
    #[arg(long, default_value_t = SocketAddr::from(([255, 255, 255, 255], DEFAULT_PORT)))]
    pub discover_to: SocketAddr,
    /// Session name.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// File holding the session secret the source printed or wrote.
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
}

impl Reach {
    /// The session's key, from the secret file.
    fn key(&self) -> anyhow::Result<ka_net::SessionKey> {
        let (secret, _) =
            load_or_generate_secret(Some(&self.secret_file)).map_err(|e| anyhow!(e))?;
        Ok(session_key(&secret, &self.session))
    }

    /// The source's address: as given, or found by broadcast within `wait`.
    fn locate(&self, rt: &tokio::runtime::Runtime, wait: Duration) -> anyhow::Result<SocketAddr> {
        if let Some(s) = &self.server {
            return resolve(s);
        }
        eprintln!(
            "ka: looking for the source of session {:?} by broadcast to {}",
            self.session, self.discover_to
        );
        let found = rt
            .block_on(shell::discovery::find(
                &self.session,
                self.discover_to,
                wait,
            ))
            .map_err(|e| anyhow!(e))?;
        eprintln!("ka: found the source at {found}");
        Ok(found)
    }
}

/// `ka demo`: the whole job on this machine.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: u32,
    /// Image size (e.g. 256MiB, 1GiB).
    #[arg(long, default_value = "256MiB", value_parser = ka_core::units::parse_size)]
    pub size: u64,
    /// Keep the work directory (image and copies) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let with_port = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .ok_or_else(|| anyhow!("{server} has no address"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `ka serve`; returns the process exit code.
pub fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    let (secret, generated) =
        load_or_generate_secret(args.secret_file.as_deref()).map_err(|e| anyhow!(e))?;
    if generated {
        let path = PathBuf::from(format!("ka-secret-{}", args.session));
        ka_net::write_atomically(&path, format!("{}\n", secret.to_hex()).as_bytes(), 0o600)
            .with_context(|| format!("writing the generated secret to {}", path.display()))?;
        eprintln!(
            "ka: no --secret-file given; generated one and wrote it to {} — give that file to the nodes (ka join --secret-file)",
            path.display()
        );
    }
    let mut config = SourceConfig::new(args.session.clone(), args.nodes, args.listen);
    config.arity = args.arity.max(1);
    config.join_timeout = args.join_timeout;
    config.min_nodes = args.min_nodes;
    config.release_delay = args.release_delay;
    config.slow_policy = args.slow_policy;
    config.slow_lag = args.slow_lag;
    config.slow_window = args.slow_window;
    config.order = args.order;
    config.dead_after = args.dead_after;
    if args.dead_after <= config.heartbeat {
        bail!(
            "--dead-after {:?} is not longer than the heartbeat ({:?}): every node would be declared dead",
            args.dead_after,
            config.heartbeat
        );
    }
    let key = session_key(&secret, &args.session);
    let state_dir = match args.state_dir {
        Some(dir) => Some(dir),
        // The default is a convenience: without it a restart of the source
        // cannot account for nodes that already finished, nothing worse.
        None => match shell::resume::prepare_state_dir(Path::new(DEFAULT_STATE_DIR)) {
            Ok(()) => Some(PathBuf::from(DEFAULT_STATE_DIR)),
            Err(e) => {
                eprintln!("ka: {e}; going on without a session record");
                None
            }
        },
    };
    let spool = spool_path(
        args.spool_dir.as_deref(),
        &format!("ka-source-{}", args.session),
    );
    let input = match (args.image, args.command, args.tar, args.stdin) {
        (Some(p), _, _, _) => ImageInput::File(p),
        (_, Some(c), _, _) => ImageInput::Stream {
            spec: SourceSpec::Command(c),
            spool: spool.clone(),
        },
        (_, _, Some(d), _) => ImageInput::Stream {
            spec: SourceSpec::Tar(d),
            spool: spool.clone(),
        },
        (_, _, _, true) => ImageInput::Stream {
            spec: SourceSpec::Stdin,
            spool: spool.clone(),
        },
        _ => bail!("say what to clone: --image PATH, --command CMD, --tar DIR or --stdin"),
    };
    let flip = match (&args.inventory, &args.boot_state) {
        (Some(inv), Some(dir)) => Some(VerifiedFlip::new(
            Inventory::load(inv)?,
            BootState::new(dir),
        )),
        _ => None,
    };
    let rt = runtime()?;
    let report = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}: is another ka serve running?",
                    args.listen
                )
            })?;
        let bound = listener.local_addr().unwrap_or(args.listen);
        // Nodes without --server find us by broadcast on the same port number.
        let discovery = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), bound.port());
        let _answering =
            match shell::discovery::answer(discovery, args.session.clone(), bound.port()).await {
                Ok(task) => Some(task),
                Err(e) => {
                    eprintln!(
                        "ka: not answering discovery on UDP {discovery} ({e}); nodes need --server"
                    );
                    None
                }
            };
        eprintln!(
            "ka: session {:?} waiting for {} nodes on {bound}",
            args.session, args.nodes
        );
        let (_go, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut display = Display::new(args.json);
        let opts = SourceOptions {
            config,
            image: input,
            key,
            state_dir,
            max_rate: args.max_rate,
        };
        let report = shell::run_source(opts, listener, go_rx, |s, e| {
            if let (Some(flip), Some(e)) = (&flip, e) {
                if let Some(text) = describe_flip(flip.on_event(s, e)) {
                    display.note(&text);
                }
            }
            display.update(s, e)
        })
        .await;
        display.finish();
        report.map_err(|e| anyhow!("{e}"))
    })?;
    let _ = std::fs::remove_file(&spool);
    print_report(&report, args.json);
    Ok(exit_code(&report))
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

/// A spool file in `dir` (or the temporary directory), unique to this process.
fn spool_path(dir: Option<&Path>, stem: &str) -> PathBuf {
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("{stem}-{}.spool", std::process::id()))
}

/// Runs `ka join`; returns the process exit code.
pub fn join(args: JoinArgs) -> anyhow::Result<u8> {
    // Checked before cloning: a typo must not cost a whole clone.
    let identity = IdentityStep::from_args(
        &args.identity,
        args.root_partition,
        args.target.as_deref(),
        args.untar.as_deref(),
    )
    .map_err(|e| anyhow!(e))?;
    let key = args.reach.key()?;
    let rt = runtime()?;
    let server = args.reach.locate(&rt, args.wait)?;
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .ok_or_else(|| anyhow!("cannot read the host name: pass --name"))?,
    };
    let mut config = NodeConfig::new(
        args.reach.session.clone(),
        name.clone(),
        SocketAddr::from(([0, 0, 0, 0], 0)),
    );
    config.wait_release = args.wait_release;
    config.verify_readback = args.verify.is_some();
    let spool = spool_path(args.spool_dir.as_deref(), &format!("ka-node-{name}"));
    let target = match (args.target, args.command, args.untar) {
        (Some(p), _, _) => Target::File(p),
        (_, Some(c), _) => Target::Stream {
            spec: SinkSpec::Command(c),
            spool: spool.clone(),
        },
        (_, _, Some(d)) => Target::Stream {
            spec: SinkSpec::Untar(d),
            spool: spool.clone(),
        },
        _ => bail!("say where the image goes: --target PATH, --command CMD or --untar DIR"),
    };
    let opts = NodeOptions {
        config,
        server,
        target,
        key,
        listen_ip: IpAddr::from([0, 0, 0, 0]),
        wait: args.wait,
        state_dir: Some(args.state_dir.clone()),
        rediscover: args
            .reach
            .server
            .is_none()
            .then_some(args.reach.discover_to),
    };
    let json = args.json;
    let outcome = rt.block_on(shell::run_node(opts, |_, e| {
        print_node_event(&name, e, json)
    }));
    let _ = std::fs::remove_file(&spool);
    let outcome = outcome?;
    if json {
        println!(
            "{{\"event\":\"left\",\"ok\":{},\"reason\":{:?},\"written\":{},\"resumed_from\":{},\"received\":{}}}",
            outcome.ok, outcome.reason, outcome.written, outcome.resumed_from, outcome.received
        );
    } else {
        eprintln!(
            "ka: {}: {}",
            if outcome.ok { "OK" } else { "KO" },
            outcome.reason
        );
    }
    if !outcome.ok {
        return Ok(EXIT_SOME_FAILED);
    }
    // After the verdict: the digest covers the copy exactly as sent; the
    // identity is this node's own change on top of it.
    match identity {
        Some(step) if !step.run_and_report(&name, json) => Ok(EXIT_NO_IDENTITY),
        _ => Ok(0),
    }
}

/// Runs `ka go`.
pub fn go(args: GoArgs) -> anyhow::Result<u8> {
    let key = args.reach.key()?;
    let rt = runtime()?;
    let server = args.reach.locate(&rt, Duration::from_secs(10))?;
    let (started, nodes) = rt
        .block_on(shell::go(server, &args.reach.session, &key))
        .map_err(|e| anyhow!(e))?;
    if started {
        println!("started with {nodes} nodes");
    } else if nodes == 0 {
        bail!("no node has joined yet: nothing to start");
    } else {
        println!("already running with {nodes} nodes");
    }
    Ok(0)
}

fn print_node_event(name: &str, e: &NodeEvent, json: bool) {
    match (e, json) {
        (
            NodeEvent::Welcomed {
                node, resumed_from, ..
            },
            true,
        ) => println!(
            "{{\"node\":{name:?},\"event\":\"welcomed\",\"id\":{},\"resumed_from\":{resumed_from}}}",
            node.0
        ),
        (NodeEvent::StartedOver { had }, true) => {
            println!("{{\"node\":{name:?},\"event\":\"started_over\",\"had\":{had}}}")
        }
        (_, true) => println!("{{\"node\":{name:?},\"event\":{:?}}}", format!("{e:?}")),
        (
            NodeEvent::Welcomed {
                node, resumed_from, ..
            },
            false,
        ) if *resumed_from > 0 => {
            eprintln!("ka: {name}: joined as {node}; the copy goes on from byte {resumed_from}")
        }
        (NodeEvent::StartedOver { had }, false) => eprintln!(
            "ka: {name}: the source serves another image than the {had} bytes on the target were of: starting over"
        ),
        (NodeEvent::SourceLost, false) => {
            eprintln!("ka: {name}: lost the source; waiting for it to come back")
        }
        (_, false) => eprintln!("ka: {name}: {e:?}"),
    }
}

fn exit_code(report: &SourceReport) -> u8 {
    if report.aborted.is_some() && report.nodes.is_empty() {
        EXIT_COULD_NOT_RUN
    } else if !report.nodes.is_empty()
        && report.nodes.iter().all(NodeReport::is_ok)
        && report.aborted.is_none()
    {
        0
    } else {
        EXIT_SOME_FAILED
    }
}

/// Runs `ka demo`; returns the process exit code.
pub fn demo(args: DemoArgs) -> anyhow::Result<u8> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("ka-demo-")
        .tempdir()
        .context("creating a work directory")?;
    let image = dir.path().join("image.img");
    eprintln!(
        "ka demo: writing a {} image with data, zero runs and a sparse hole to {}",
        human(args.size),
        image.display()
    );
    make_demo_image(&image, args.size)?;
    let secret = Secret::generate();
    let session = "demo".to_string();
    let key = session_key(&secret, &session);
    let rt = runtime()?;
    let targets: Vec<PathBuf> = (0..args.nodes)
        .map(|i| dir.path().join(format!("node{i:02}.img")))
        .collect();
    let report = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("listening on loopback")?;
        let addr = listener.local_addr()?;
        let config = SourceConfig::new(session.clone(), args.nodes, addr);
        let (_go, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut display = Display::new(false);
        let opts = SourceOptions {
            config,
            image: ImageInput::File(image.clone()),
            key: key.clone(),
            state_dir: None,
            max_rate: None,
        };
        let source = shell::run_source(opts, listener, go_rx, |s, e| display.update(s, e));
        let mut nodes = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let mut config = NodeConfig::new(
                session.clone(),
                format!("node{i:02}"),
                SocketAddr::from(([127, 0, 0, 1], 0)),
            );
            config.verify_readback = true;
            let opts = NodeOptions {
                config,
                server: addr,
                target: Target::File(target.clone()),
                key: key.clone(),
                listen_ip: IpAddr::from([127, 0, 0, 1]),
                wait: Duration::from_secs(30),
                state_dir: None,
                rediscover: None,
            };
            nodes.push(tokio::spawn(shell::run_node(opts, |_, _| {})));
        }
        let report = source.await;
        display.finish();
        let report = report.map_err(|e| anyhow!("{e}"))?;
        for n in nodes {
            let _ = n.await;
        }
        anyhow::Ok(report)
    })?;
    print_report(&report, false);
    // Check every copy ourselves, independently of the protocol's digests.
    let want = file_digest(&image)?;
    let mut identical = 0;
    for t in &targets {
        match file_digest(t) {
            Ok(d) if d == want => identical += 1,
            Ok(_) => eprintln!("ka demo: {} differs from the image", t.display()),
            Err(e) => eprintln!("ka demo: {}: {e:#}", t.display()),
        }
    }
    let allocated = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0)
    };
    println!(
        "independent check: {identical}/{} copies byte-identical to the image ({} on disk each of {} logical: zeros were never written)",
        targets.len(),
        human(allocated(&targets[0])),
        human(args.size)
    );
    if args.keep {
        let kept = dir.keep();
        println!("kept the image and copies in {}", kept.display());
    }
    Ok(if identical == targets.len() && exit_code(&report) == 0 {
        0
    } else {
        EXIT_SOME_FAILED
    })
}

/// A demo image like a used disk: stretches of incompressible data, stretches
/// of text, runs of written zeros, and a never-written hole in the middle.
fn make_demo_image(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut xof = blake3::Hasher::new()
        .update(b"ka demo image")
        .finalize_xof();
    let hole = (size / 2)..(size / 2 + size / 8);
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let len = chunk.min(size - off) as usize;
        if !hole.contains(&off) {
            match i % 8 {
                // Zeros written as bytes: the source finds them by scanning.
                3 => buf[..len].fill(0),
                5 => {
                    let line =
                        format!("ka demo block {i}: the quick brown fox jumps over the lazy dog\n");
                    for (j, b) in buf[..len].iter_mut().enumerate() {
                        *b = line.as_bytes()[j % line.len()];
                    }
                }
                _ => xof.fill(&mut buf[..len]),
            }
            f.write_all_at(&buf[..len], off)?;
        }
        off += len as u64;
        i += 1;
    }
    f.sync_all()?;
    Ok(())
}

fn file_digest(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}
