//! Serving an image to a session of nodes (the source; the original
//! ka-d-server): listen, answer discovery, stream the image down the chain
//! the nodes form, and report on every node at the end.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use ka_core::config::SourceConfig;
use ka_core::source::{Source, SourceEvent};
use ka_net::image::packed::{pack_stream, plan_file, Compression, LinkRate, Plan};
use ka_net::shell::{self, ImageInput, SourceOptions};
use ka_net::SourceSpec;

use super::secret::{self, Secret};
use super::{runtime, spool_path, DEFAULT_STATE_DIR};

pub use ka_net::shell::SourceReport as Report;

/// What the source clones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A regular file or a block device.
    File(PathBuf),
    /// The standard output of this shell command.
    Command(String),
    /// This directory tree, as GNU tar.
    Tar(PathBuf),
    /// This process's standard input.
    Stdin,
    /// This running machine, file system by file system.
    System(ka_net::system::Plan),
}

/// Everything a source needs but its secret.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The session, its nodes and its policies; `data_addr` is where it listens.
    pub config: SourceConfig,
    /// The image.
    pub input: Input,
    /// Where a stream (every input but a file) is spooled, so any node can
    /// be served again; `None`: the temporary directory.
    pub spool_dir: Option<PathBuf>,
    /// Where the session's record is kept, so a restarted source goes on
    /// with the session; `None`: no record.
    pub state_dir: Option<PathBuf>,
    /// A cap on the source's total send rate, in bytes per second.
    pub max_rate: Option<u64>,
    /// Whether and how the image is packed for the wire.
    pub compression: Compression,
    /// The nodes' link rate in bytes per second (`--link-rate`), which
    /// `auto` weighs packing against; `None`: the listening interface's.
    pub link_rate: Option<u64>,
    /// The web page (`--http`), served on the session's runtime, which it
    /// keeps once the session ends (see [`crate::web::WebServer::linger`]).
    pub web: Option<crate::web::WebServer>,
}

/// The default state directory, made ready for a session record; the
/// error says why it cannot be used.
pub fn default_state_dir() -> Result<PathBuf, String> {
    shell::resume::prepare_state_dir(Path::new(DEFAULT_STATE_DIR))
        .map(|()| PathBuf::from(DEFAULT_STATE_DIR))
        .map_err(|e| e.to_string())
}

/// Runs the source until the session ends. `observe` sees every event
/// (`Some`) and is called about five times a second to refresh progress
/// (`None`).
pub fn run(
    opts: ServeOptions,
    secret: &Secret,
    observe: impl FnMut(&Source, Option<&SourceEvent>),
) -> anyhow::Result<Report> {
    let session = opts.config.session.clone();
    let web = opts.web.clone();
    let listen = opts.config.data_addr;
    let nodes = opts.config.expected_nodes;
    // A system's spool holds the whole machine: not in a /tmp that may be
    // memory, and left out of the capture wherever it lands.
    let spool_dir = match (&opts.spool_dir, &opts.input) {
        (None, Input::System(_)) => Some(PathBuf::from("/var/tmp")),
        (dir, _) => dir.clone(),
    };
    let spool = spool_path(spool_dir.as_deref(), &format!("ka-source-{session}"));
    let warnings = ka_net::system::capture::Warnings::default();
    let root = secret::key(secret, &session);
    let digest_key = root.digest_key();
    let compression = opts.compression;
    let encoded = |stream| ImageInput::Encoded {
        stream,
        spool: spool.clone(),
    };
    let fail = |e: ka_net::Error| anyhow!("{e}");
    // A stream is packed only when asked: `auto` cannot sample it without
    // holding it back.
    let stream = |spec: SourceSpec| -> anyhow::Result<ImageInput> {
        Ok(match compression {
            Compression::Zstd(level) => {
                let source = ka_net::open_source(&spec).map_err(fail)?;
                encoded(pack_stream(source, level, None, &digest_key).map_err(fail)?)
            }
            Compression::Off | Compression::Auto => ImageInput::Stream {
                spec,
                spool: spool.clone(),
            },
        })
    };
    let image = match opts.input {
        Input::File(p) => {
            let link = match compression {
                Compression::Auto => nodes_link(listen, opts.max_rate, opts.link_rate),
                _ => None,
            };
            match plan_file(&p, compression, link.as_ref(), &digest_key, &mut |line| {
                crate::errln!("ka: {line}")
            })
            .map_err(fail)?
            {
                Plan::File => ImageInput::File(p),
                Plan::Stream(stream) => encoded(stream),
            }
        }
        Input::Command(c) => stream(SourceSpec::Command(c))?,
        Input::Tar(d) => stream(SourceSpec::Tar(d))?,
        Input::Stdin => stream(SourceSpec::Stdin)?,
        Input::System(plan) => {
            let capture =
                ka_net::system::capture::Capture::new(&plan, vec![spool.clone()]).map_err(fail)?;
            for (i, part) in capture.parts.iter().enumerate() {
                crate::errln!("ka: system part {}: {}", i + 1, describe_part(part));
            }
            match compression {
                Compression::Zstd(level) => {
                    let reader =
                        ka_net::image::sources::StreamSource::new(capture.reader(warnings.clone()));
                    encoded(pack_stream(Box::new(reader), level, None, &digest_key).map_err(fail)?)
                }
                Compression::Off | Compression::Auto => ImageInput::System {
                    capture: Box::new(capture),
                    warnings: warnings.clone(),
                    spool: spool.clone(),
                },
            }
        }
    };
    let source = SourceOptions {
        key: root.clone(),
        config: opts.config,
        image,
        state_dir: opts.state_dir,
        max_rate: opts.max_rate,
    };
    let rt = runtime()?;
    let report = rt.block_on(async {
        if let Some(web) = web.clone() {
            tokio::spawn(web.run());
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}: is another ka serve running?"))?;
        let bound = listener.local_addr().unwrap_or(listen);
        // Nodes without --server find us by broadcast on the same port number.
        let discovery = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), bound.port());
        let _answering =
            match shell::discovery::answer(discovery, session.clone(), bound.port(), root).await {
                Ok(task) => Some(task),
                Err(e) => {
                    crate::errln!(
                        "ka: not answering discovery on UDP {discovery} ({e}); nodes need --server"
                    );
                    None
                }
            };
        crate::errln!("ka: session {session:?} waiting for {nodes} nodes on {bound}");
        let (_go, go_rx) = tokio::sync::mpsc::unbounded_channel();
        shell::run_source(source, listener, go_rx, observe)
            .await
            .map_err(|e| anyhow!("{e}"))
    });
    if let Some(web) = &web {
        web.keep_runtime(rt);
    }
    let _ = std::fs::remove_file(&spool);
    let changed = warnings.list();
    if !changed.is_empty() {
        crate::errln!(
            "ka: {} files changed or vanished while the system was read (their copies are as read):",
            changed.len()
        );
        for w in changed.iter().take(50) {
            crate::errln!("ka:   {w}");
        }
    }
    report
}

/// One part of a system stream, for the operator.
fn describe_part(part: &ka_net::system::capture::Part) -> String {
    use ka_net::system::capture::Part;
    match part {
        Part::Tree {
            mountpoint,
            mounted_at,
            excludes,
            ..
        } => {
            let mut s = format!(
                "{mountpoint} as a file tree (from {})",
                mounted_at.display()
            );
            if !excludes.is_empty() {
                s.push_str(&format!(", sent empty: {}", excludes.join(", ")));
            }
            s
        }
        Part::Raw { device, len, .. } => format!("{} as raw bytes ({len} bytes)", device.display()),
    }
}

/// The rate the nodes' links carry, for `--compress auto`: `--link-rate`
/// if given, else the speed of the interface `listen` is on (the fastest
/// interface when it listens on every address), capped by `--max-rate`.
/// `None` when nothing says: loopback and most virtual interfaces report no
/// speed.
fn nodes_link(listen: SocketAddr, max_rate: Option<u64>, given: Option<u64>) -> Option<LinkRate> {
    let found = match given {
        Some(bytes_per_sec) => Some(LinkRate {
            bytes_per_sec,
            from: "--link-rate".into(),
        }),
        None => fastest_interface(&listen_interfaces(listen.ip())),
    };
    let capped = |bytes_per_sec| LinkRate {
        bytes_per_sec,
        from: "--max-rate".into(),
    };
    match (found, max_rate) {
        (Some(l), Some(cap)) if cap < l.bytes_per_sec => Some(capped(cap)),
        (None, Some(cap)) => Some(capped(cap)),
        (found, _) => found,
    }
}

/// The interfaces nodes reach `ip` through: the one holding it, or every
/// interface that is up but loopback when `ip` is unspecified.
fn listen_interfaces(ip: IpAddr) -> Vec<String> {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut names: Vec<String> = addrs
        .filter(|a| {
            if ip.is_unspecified() {
                return a.flags.contains(InterfaceFlags::IFF_UP)
                    && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK);
            }
            let held = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v| IpAddr::from(v.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v| IpAddr::from(v.ip())))
            });
            held == Some(ip)
        })
        .map(|a| a.interface_name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The fastest of the interfaces `names` by the speed the kernel reports
/// for it (`/sys/class/net/NAME/speed`, Mbit/s); `None` if none reports one.
fn fastest_interface(names: &[String]) -> Option<LinkRate> {
    names
        .iter()
        .filter_map(|name| {
            let speed = std::fs::read_to_string(format!("/sys/class/net/{name}/speed")).ok()?;
            let mbit = u64::try_from(speed.trim().parse::<i64>().ok()?).ok()?;
            (mbit > 0).then(|| LinkRate {
                bytes_per_sec: mbit * 125_000,
                from: format!("{name}'s {mbit} Mbit/s"),
            })
        })
        .max_by_key(|l| l.bytes_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_auto_weighs_against_is_the_given_rate_capped_by_max_rate() {
        let on_lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let given = nodes_link(on_lo, None, Some(1_250_000_000)).unwrap();
        assert_eq!(
            given,
            LinkRate {
                bytes_per_sec: 1_250_000_000,
                from: "--link-rate".into()
            }
        );
        let capped = nodes_link(on_lo, Some(12_500_000), Some(1_250_000_000)).unwrap();
        assert_eq!(capped.bytes_per_sec, 12_500_000);
        assert_eq!(capped.from, "--max-rate");
        let faster_cap = nodes_link(on_lo, Some(u64::MAX), Some(1_250_000_000)).unwrap();
        assert_eq!(faster_cap.from, "--link-rate");
        // Loopback reports no speed (reading it fails): only a cap says.
        assert_eq!(listen_interfaces("127.0.0.1".parse().unwrap()), ["lo"]);
        assert_eq!(fastest_interface(&["lo".to_string()]), None);
        assert_eq!(nodes_link(on_lo, None, None), None);
        assert_eq!(
            nodes_link(on_lo, Some(1000), None).unwrap().from,
            "--max-rate"
        );
    }
}
