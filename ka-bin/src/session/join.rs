//! Joining a session as a node (the original ka-d-client): find the source,
//! take a place in the chain, write the image to a target while forwarding
//! it, check the copy, and give it the node's identity.
//!
//! The node reports on its own console: text on standard error, or JSON
//! lines on standard output.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use ka_core::config::NodeConfig;
use ka_core::node::NodeEvent;

use crate::cli::events::{NodeEventLine, NodeLine};
use ka_net::shell::{self, NodeOptions, NodeOutcome, Target};
use ka_net::system::rebuild::RebuildOptions;
use ka_net::SinkSpec;

use super::identity::{Identity, RootPartition, Step};
use super::reach::Reach;
use super::{runtime, spool_path};

/// Where a node puts the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A regular file or a block device.
    Target(PathBuf),
    /// The standard input of this shell command.
    Command(String),
    /// Untarred into this directory.
    Untar(PathBuf),
    /// A system clone rebuilt onto these disks.
    System(Vec<PathBuf>),
}

/// Everything a node needs to join a session.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The session and how to reach its source.
    pub reach: Reach,
    /// Where the image goes.
    pub output: Output,
    /// Where a command's or untar's image is received before it is fed
    /// on; `None`: the temporary directory.
    pub spool_dir: Option<PathBuf>,
    /// This node's name; `None`: the name of the node key given, or else
    /// the host name.
    pub name: Option<String>,
    /// Stay until the source releases this node.
    pub wait_release: bool,
    /// Also read the written target back and check it.
    pub verify_readback: bool,
    /// How long to look for the source, at the start and whenever it is lost.
    pub wait: Duration,
    /// Where this node records how much of its target is durable, so a
    /// restarted join goes on from there.
    pub state_dir: PathBuf,
    /// Report as JSON lines on standard output instead of text.
    pub json: bool,
    /// The identity to give the verified copy, if any.
    pub identity: Option<Identity>,
    /// With `identity`: the partition of the target holding the root file system.
    pub root_partition: RootPartition,
    /// A system clone's window: the most of the stream held at once.
    pub window: u64,
    /// The port this node listens on for its downstream's data connection;
    /// 0: one the system chooses.
    pub data_port: u16,
    /// A file whose lines (a console log the netboot init writes) go to
    /// the source while the node runs, besides the node's own events.
    pub console_log: Option<PathBuf>,
}

impl JoinOptions {
    /// The same join as a `ka join` command line, for people reading a
    /// console.
    pub fn command_line(&self) -> String {
        let mut s = String::new();
        if let Some(server) = &self.reach.server {
            s.push_str(&format!("--server {server} "));
        }
        let output = match &self.output {
            Output::Target(t) => format!("--target {}", t.display()),
            Output::Command(c) => format!("--command {c:?}"),
            Output::Untar(d) => format!("--untar {}", d.display()),
            Output::System(disks) => format!(
                "--system {}",
                disks
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        s.push_str(&format!(
            "--session {} --secret-file {} --name {} {output} --wait {}",
            self.reach.session,
            self.reach.secret_file.display(),
            self.name.as_deref().unwrap_or("?"),
            humantime::format_duration(self.wait),
        ));
        if self.verify_readback {
            s.push_str(" --verify readback");
        }
        if self.data_port != 0 {
            s.push_str(&format!(" --data-port {}", self.data_port));
        }
        if let Some(log) = &self.console_log {
            s.push_str(&format!(" --console-log {}", log.display()));
        }
        if let Some(identity) = &self.identity {
            s.push_str(&format!(
                " --identity {} --root-partition {}",
                identity.to_items().join(","),
                self.root_partition
            ));
        }
        s
    }
}

/// How a join ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The copy is verified (and has its identity, if one was asked for).
    Verified,
    /// The copy failed; the reason was reported.
    Failed,
    /// The copy is verified, but the identity step failed.
    VerifiedWithoutIdentity,
}

/// Joins the session and writes its image; reports on the console as it
/// goes. An error means nothing was cloned (or the node could not go on).
pub fn run(opts: JoinOptions) -> anyhow::Result<Joined> {
    // The MAC the identity gives the node (the netboot image's BOOTIF),
    // for a report that it cannot start.
    let identity_mac = opts
        .identity
        .as_ref()
        .and_then(|i| i.mac)
        .map_or([0; 6], |m| m.0);
    // Checked before cloning: a typo must not cost a whole clone.
    let identity = match opts.identity {
        Some(id) => {
            let (target, untar) = match &opts.output {
                Output::Target(p) => (Some(p.as_path()), None),
                Output::Untar(d) => (None, Some(d.as_path())),
                Output::System(disks) => (disks.first().map(PathBuf::as_path), None),
                Output::Command(_) => (None, None),
            };
            Some(Step::new(id, opts.root_partition, target, untar).map_err(|e| anyhow!(e))?)
        }
        None => None,
    };
    let name = match opts.name {
        Some(n) => n,
        None => match super::secret::key_owner(&opts.reach.secret_file) {
            Some(owner) => owner,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .ok_or_else(|| anyhow!("cannot read the host name: pass --name"))?,
        },
    };
    let key = opts.reach.node_key(&name)?;
    let rt = runtime()?;
    let asker = ka_core::auth::Asker::Node(&name);
    let server = opts.reach.locate(&rt, opts.wait, asker, key.mac_key())?;
    // A node that cannot start still tells the source, so the source
    // reports it instead of waiting for it.
    if let Err(reason) = check_output(&opts.output) {
        let cannot = CannotStart {
            server,
            session: &opts.reach.session,
            name: &name,
            mac: identity_mac,
            reason: &reason,
        };
        cannot.report(&rt, &key, opts.json);
        return Ok(Joined::Failed);
    }
    let mut config = NodeConfig::new(
        opts.reach.session.clone(),
        name.clone(),
        SocketAddr::from(([0, 0, 0, 0], 0)),
    );
    config.wait_release = opts.wait_release;
    config.verify_readback = opts.verify_readback;
    let spool = spool_path(opts.spool_dir.as_deref(), &format!("ka-node-{name}"));
    // A rebuild's steps are `system` events; a packed stream's unpacking
    // into a file target is `unpacked`.
    let step_event = match opts.output {
        Output::System(_) => "system",
        _ => "unpacked",
    };
    let target = match opts.output {
        Output::Target(p) => Target::File(p),
        Output::Command(c) => Target::Stream {
            spec: SinkSpec::Command(c),
            spool: spool.clone(),
        },
        Output::Untar(d) => Target::Stream {
            spec: SinkSpec::Untar(d),
            spool: spool.clone(),
        },
        Output::System(disks) => Target::System {
            rebuild: RebuildOptions {
                disks,
                workdir: std::env::temp_dir().join(format!(
                    "{}{}",
                    ka_net::system::rebuild::WORKDIR_PREFIX,
                    std::process::id()
                )),
            },
            spool: spool.clone(),
            window: opts.window,
        },
    };
    // Room for bursts; a line that finds it full is dropped, never waited
    // for: the clone does not slow down for its log.
    let (log_tx, log_rx) = tokio::sync::mpsc::channel(1024);
    let tail = opts
        .console_log
        .clone()
        .map(|path| rt.spawn(super::console::tail_lines(path, log_tx.clone())));
    let node = NodeOptions {
        config,
        server,
        target,
        key,
        listen_ip: IpAddr::from([0, 0, 0, 0]),
        data_port: opts.data_port,
        wait: opts.wait,
        state_dir: Some(opts.state_dir),
        rediscover: opts.reach.rediscover(),
        log: Some(log_rx),
        packed_spool: Some(spool.clone()),
    };
    let json = opts.json;
    let outcome = rt.block_on(shell::run_node(node, |_, e| {
        if let Some(text) = print_event(&name, e, json) {
            let _ = log_tx.try_send(format!("ka: {text}"));
        }
    }));
    if let Some(tail) = tail {
        tail.abort();
    }
    let _ = std::fs::remove_file(&spool);
    let outcome = outcome?;
    if let Some(unpacked) = &outcome.unpacked {
        for step in &unpacked.steps {
            if json {
                crate::outln!("{{\"node\":{name:?},\"event\":\"{step_event}\",\"step\":{step:?}}}");
            } else {
                crate::errln!("ka: {name}: {step}");
            }
        }
    }
    print_outcome(&outcome, json);
    if !outcome.ok {
        return Ok(Joined::Failed);
    }
    // After the verdict: the digest covers the copy exactly as sent; the
    // identity is this node's own change on top of it.
    match identity {
        Some(step) if !step.run_and_report(&name, json) => Ok(Joined::VerifiedWithoutIdentity),
        _ => Ok(Joined::Verified),
    }
}

/// The node's verdict: one JSON line, or `ka: OK|KO: reason`.
fn print_outcome(outcome: &NodeOutcome, json: bool) {
    if json {
        let line = NodeLine::Left {
            ok: outcome.ok,
            reason: outcome.reason.clone(),
            written: outcome.written,
            received: outcome.received,
            resumed_from: outcome.resumed_from,
        };
        crate::outln!(
            "{}",
            serde_json::to_string(&line).expect("event lines serialize")
        );
    } else {
        crate::errln!(
            "ka: {}: {}",
            if outcome.ok { "OK" } else { "KO" },
            outcome.reason
        );
    }
}

/// Why `output` cannot take an image, found before joining: a target
/// that is a directory, cannot be opened for writing, or whose directory
/// is missing; a disk (a path under /dev) that is not there.
pub fn check_output(output: &Output) -> Result<(), String> {
    match output {
        Output::Target(p) => match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => Err(format!(
                "the target {} is a directory: give a file or a block device (--target)",
                p.display()
            )),
            Ok(_) => std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(drop)
                .map_err(|e| format!("cannot write the target {}: {e}", p.display())),
            // A device that is not there would be made a regular file on
            // /dev's own file system (RAM, on the netboot image): no disk.
            // Another file system mounted below /dev (/dev/shm) takes
            // files like any other.
            Err(_) if on_the_dev_file_system(p) => Err(format!(
                "no disk {} on this node: check ka.target= (or --target) against the node's disks",
                p.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
                match dir {
                    Some(d) if !d.is_dir() => Err(format!(
                        "the target's directory {} does not exist: create it or give another --target",
                        d.display()
                    )),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(format!("cannot look at the target {}: {e}", p.display())),
        },
        Output::System(disks) => match disks.iter().find(|d| !d.exists()) {
            Some(d) => Err(format!(
                "no disk {} on this node: check ka.target= (or --system) against the node's disks",
                d.display()
            )),
            None => Ok(()),
        },
        Output::Command(_) | Output::Untar(_) => Ok(()),
    }
}

/// Whether the missing `target` would be made on the file system of /dev
/// itself: its nearest existing directory is on /dev's device.
fn on_the_dev_file_system(target: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata("/dev") else {
        return false;
    };
    let existing = target.ancestors().skip(1).find(|d| d.is_dir());
    existing
        .and_then(|d| std::fs::metadata(d).ok())
        .is_some_and(|m| m.dev() == dev.dev() && target.starts_with("/dev"))
}

/// A node that cannot start, and why.
struct CannotStart<'a> {
    server: SocketAddr,
    session: &'a str,
    name: &'a str,
    /// All zeros when unknown.
    mac: [u8; 6],
    reason: &'a str,
}

impl CannotStart<'_> {
    /// Says on the console that the node cannot start and why, and tells
    /// the source (proved with the node's `key`).
    fn report(&self, rt: &tokio::runtime::Runtime, key: &ka_net::shell::NodeKey, json: bool) {
        let CannotStart {
            server,
            session,
            name,
            mac,
            reason,
        } = *self;
        let told = rt.block_on(shell::report_join_failed(
            server, session, name, mac, reason, key,
        ));
        if json {
            let line = NodeEventLine {
                node: name.to_string(),
                event: NodeLine::Leaving {
                    ok: false,
                    reason: format!("cannot start: {reason}"),
                },
            };
            crate::outln!(
                "{}",
                serde_json::to_string(&line).expect("event lines serialize")
            );
        } else {
            crate::errln!("ka: {name}: cannot start: {reason}");
        }
        match told {
            Ok(()) => crate::errln!("ka: {name}: the source at {server} was told"),
            Err(e) => crate::errln!("ka: {name}: could not tell the source at {server}: {e}"),
        }
        crate::errln!("ka: KO: {reason}");
    }
}

/// One event of node `name`, as a JSON line or a line of text; the text
/// either way (without `ka: NAME: `), for the node's log at the source.
fn print_event(name: &str, e: &NodeEvent, json: bool) -> Option<String> {
    let text = event_text(e);
    if json {
        let line = NodeEventLine {
            node: name.to_string(),
            event: NodeLine::of(e),
        };
        crate::outln!(
            "{}",
            serde_json::to_string(&line).expect("event lines serialize")
        );
    } else if let Some(text) = &text {
        crate::errln!("ka: {name}: {text}");
    }
    text
}

/// The readable line of a node event; `None` for the last one, whose
/// verdict follows as its own line (`OK`/`KO`).
fn event_text(e: &NodeEvent) -> Option<String> {
    Some(match e {
        NodeEvent::Welcomed {
            node, resumed_from, ..
        } if *resumed_from > 0 => {
            format!("joined as {node}; the copy goes on from byte {resumed_from}")
        }
        NodeEvent::Welcomed { node, .. } => format!("joined as {node}"),
        NodeEvent::StartedOver { had } => format!(
            "the source serves another image than the {had} bytes on the target were of: starting over"
        ),
        NodeEvent::Refused(refusal) => format!("refused by the source: {}", refusal.detail),
        NodeEvent::Placed {
            upstream,
            downstreams,
        } => {
            let from = match upstream {
                None => "nobody yet".to_string(),
                Some(None) => "the source".to_string(),
                Some(Some(n)) => format!("node {n}"),
            };
            match downstreams.as_slice() {
                [] => format!("fed by {from}"),
                ds => format!(
                    "fed by {from}, feeding {}",
                    ds.iter().map(|d| format!("node {d}")).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        NodeEvent::Receiving { from: 0 } => "receiving".to_string(),
        NodeEvent::Receiving { from } => format!("receiving from byte {from}"),
        NodeEvent::DownstreamEarly { node, .. } => {
            format!("node {node} asked for data before the source placed it here; it waits")
        }
        NodeEvent::UpstreamLost { reason } => format!("lost its feeder: {reason}"),
        NodeEvent::Stranded { upstream, from, reason } => format!(
            "node {upstream} no longer holds byte {from} ({reason}); the source places this node anew"
        ),
        NodeEvent::SourceLost => "lost the source; waiting for it to come back".to_string(),
        NodeEvent::SourceUnproven { reason } => format!(
            "not believed, nothing it said is acted on: {reason}; looking for the source again"
        ),
        NodeEvent::Verified { ok: true, .. } => "copy verified".to_string(),
        NodeEvent::Verified { ok: false, reason } => format!("copy does not match: {reason}"),
        NodeEvent::Left { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_that_cannot_take_the_image_is_found_before_joining() {
        let tmp = tempfile::tempdir().unwrap();
        let target = |p: PathBuf| check_output(&Output::Target(p));
        let err = target(tmp.path().to_path_buf()).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        let err = target(tmp.path().join("missing/x.img")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = target(PathBuf::from("/dev/ka-no-such-disk")).unwrap_err();
        assert!(err.contains("no disk"), "{err}");
        assert_eq!(target(tmp.path().join("new.img")), Ok(()));
        // A file system of its own below /dev takes new files.
        let shm = tempfile::tempdir_in("/dev/shm").expect("a /dev/shm to test with");
        assert_eq!(target(shm.path().join("new.img")), Ok(()));
        let existing = tmp.path().join("old.img");
        std::fs::write(&existing, b"x").unwrap();
        assert_eq!(target(existing), Ok(()));
        let err =
            check_output(&Output::System(vec![PathBuf::from("/dev/ka-no-such-disk")])).unwrap_err();
        assert!(err.contains("no disk"), "{err}");
    }
}
