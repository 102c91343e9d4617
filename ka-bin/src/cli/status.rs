//! `ka status`: the running session's table from another terminal.
//!
//! `ka serve` publishes a snapshot of its session, [`SessionStatus`], as
//! `<state dir>/<session>.status.json`: rewritten whole (a new file renamed
//! over the old, so a reader never sees half of one) about once a second,
//! and removed when `ka serve` ends (one left behind is a killed source's,
//! and `ka status` says so). `ka status` reads it; it never talks to the
//! source, so a busy or stopped source cannot hang it, and it needs no port
//! or key: the file is readable by root only, like the state directory.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use ka_core::ids::NodeId;
use ka_core::source::{NodeReport, Source, SourceState};
use serde::{Deserialize, Serialize};

use super::display::{human, received};
use super::ExitStatus;
use crate::session::DEFAULT_STATE_DIR;

/// What a status file is named after: the session.
const SUFFIX: &str = ".status.json";

/// How often the snapshot is rewritten while nothing final happens.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// A snapshot of one session, as `ka status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The session's name.
    pub session: String,
    /// The `ka serve` process that writes it.
    pub pid: u32,
    /// When it was written, in seconds since the Unix epoch.
    pub updated: f64,
    /// Seconds since `ka serve` started.
    pub seconds: f64,
    /// The image's size, once known.
    pub image_size: Option<u64>,
    /// What is cloned: the image's path, or the kind of stream.
    #[serde(default)]
    pub image: Option<String>,
    /// `waiting` (for nodes), `streaming`, `releasing`, `finished` or `aborted`.
    pub state: String,
    /// Every node that joined, in the order it joined.
    pub nodes: Vec<NodeStatus>,
}

impl SessionStatus {
    /// A session that no node joined yet: what the web page shows before
    /// the first snapshot.
    pub fn empty(session: &str, image: Option<String>) -> SessionStatus {
        SessionStatus {
            session: session.into(),
            pid: std::process::id(),
            updated: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            seconds: 0.0,
            image_size: None,
            image,
            state: "waiting".into(),
            nodes: Vec::new(),
        }
    }
}

/// One node's line of a [`SessionStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Its number in the session.
    pub id: u32,
    /// `joined` (before the start), `receiving`, `verifying`, `ok`, `ko`,
    /// `dead` (lost, no outcome) or `released` (ok, and let go).
    pub state: String,
    /// Bytes it received.
    pub bytes: u64,
    /// Bytes a second over the last snapshot's interval.
    pub rate: f64,
    /// Who feeds it: `source`, another node's name, or absent.
    pub upstream: Option<String>,
    /// Why it failed, when it did.
    pub reason: String,
    /// Seconds until it has the whole image at its current rate, when
    /// both are known and it is still receiving.
    #[serde(default)]
    pub eta: Option<f64>,
    /// How many times it was declared dead (and came back).
    #[serde(default)]
    pub deaths: u32,
}

/// `ka serve`'s side: writes the snapshot as the session goes.
pub struct StatusWriter {
    /// The file `ka status` reads; `None`: snapshots for the web page only.
    path: Option<PathBuf>,
    /// What is cloned, for the snapshot.
    image: Option<String>,
    started: Instant,
    last: Option<Instant>,
    /// Each node's bytes at the last snapshot, for its rate.
    bytes_before: HashMap<NodeId, u64>,
    /// Set once the file could not be written: said once, then let be (the
    /// session matters more than its status file).
    failed: bool,
}

impl StatusWriter {
    /// A writer of `<state_dir>/<session>.status.json` (with no
    /// `state_dir`, of snapshots only, for the web page) describing the
    /// cloned `image`.
    pub fn new(state_dir: Option<&Path>, session: &str, image: Option<String>) -> StatusWriter {
        StatusWriter {
            path: state_dir.map(|dir| status_path(dir, session)),
            image,
            started: Instant::now(),
            last: None,
            bytes_before: HashMap::new(),
            failed: false,
        }
    }

    /// Writes the snapshot if [`PUBLISH_EVERY`] has passed, or at once when
    /// the session reached a final state; returns it when it made one (the
    /// web page publishes the same).
    pub fn publish(&mut self, source: &Source) -> Option<SessionStatus> {
        let now = Instant::now();
        let last_word = matches!(source.state(), SourceState::Finished | SourceState::Aborted);
        let due = self
            .last
            .is_none_or(|at| now.duration_since(at) >= PUBLISH_EVERY);
        if !(due || last_word) {
            return None;
        }
        let interval = self.last.map(|at| now.duration_since(at).as_secs_f64());
        self.last = Some(now);
        let status = self.snapshot(source, interval);
        if let (Some(path), false) = (&self.path, self.failed) {
            if let Err(e) = write_atomically(path, &status) {
                self.failed = true;
                tracing::warn!(path = %path.display(), error = %e, "cannot write the session's status file; ka status will not see this session");
            }
        }
        Some(status)
    }

    /// Removes the snapshot: the session is over, and its report printed.
    pub fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }

    fn snapshot(&mut self, source: &Source, interval: Option<f64>) -> SessionStatus {
        let report = source.report();
        let names: HashMap<NodeId, &str> =
            report.iter().map(|r| (r.node, r.name.as_str())).collect();
        let size = source.config().image_size;
        let nodes = report
            .iter()
            .map(|r| {
                let bytes = received(source, r);
                let before = self.bytes_before.insert(r.node, bytes).unwrap_or(bytes);
                let rate = match interval {
                    Some(dt) if dt > 0.0 => bytes.saturating_sub(before) as f64 / dt,
                    _ => 0.0,
                };
                let upstream = source.topology().parent(r.node).map(|parent| match parent {
                    None => "source".to_string(),
                    Some(p) => names.get(&p).map_or(p.to_string(), |n| n.to_string()),
                });
                let state = node_state(source, r, bytes, size);
                let eta = match size {
                    Some(size) if state == "receiving" && rate > 0.0 => {
                        Some(size.saturating_sub(bytes) as f64 / rate)
                    }
                    _ => None,
                };
                NodeStatus {
                    name: r.name.clone(),
                    id: r.node.0,
                    state: state.into(),
                    bytes,
                    rate,
                    upstream,
                    reason: match &r.outcome {
                        Some(Err(e)) => e.clone(),
                        _ => String::new(),
                    },
                    eta,
                    deaths: r.deaths,
                }
            })
            .collect();
        SessionStatus {
            session: source.config().session.clone(),
            pid: std::process::id(),
            updated: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            seconds: self.started.elapsed().as_secs_f64(),
            image_size: size,
            image: self.image.clone(),
            state: match source.state() {
                SourceState::AwaitingNodes => "waiting",
                SourceState::Streaming => "streaming",
                SourceState::Releasing => "releasing",
                SourceState::Finished => "finished",
                SourceState::Aborted => "aborted",
            }
            .into(),
            nodes,
        }
    }
}

/// A node's state word for the status table.
fn node_state(source: &Source, r: &NodeReport, bytes: u64, size: Option<u64>) -> &'static str {
    match &r.outcome {
        Some(Ok(())) if r.released => "released",
        Some(Ok(())) => "ok",
        Some(Err(_)) => "ko",
        None if !source.is_live(r.node) => "dead",
        None if source.state() == SourceState::AwaitingNodes => "joined",
        None if size.is_some_and(|s| bytes >= s) => "verifying",
        None => "receiving",
    }
}

/// Where `session`'s status is published in `state_dir`.
pub fn status_path(state_dir: &Path, session: &str) -> PathBuf {
    state_dir.join(format!("{session}{SUFFIX}"))
}

/// Writes `status` to a new file beside `path` and renames it over `path`:
/// a reader sees the old snapshot or the new one, never a mix. Readable by
/// root only: it names the nodes and their failures.
fn write_atomically(path: &Path, status: &SessionStatus) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    serde_json::to_writer(&mut f, status)?;
    f.write_all(b"\n")?;
    std::fs::rename(&tmp, path)
}

/// Show the running session's table (from another terminal than `ka serve`'s).
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The session to show; without it, every session with a status in the
    /// state directory.
    #[arg(long)]
    pub session: Option<String>,
    /// Where `ka serve` keeps its session records (its --state-dir).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Print the snapshot as JSON (with `"running"`: whether its ka serve
    /// still runs) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ka status`: exit 0 when it showed a session, 2 when there is none.
pub fn run(args: StatusArgs) -> anyhow::Result<ExitStatus> {
    let paths = match &args.session {
        Some(s) => vec![status_path(&args.state_dir, s)],
        None => list(&args.state_dir)?,
    };
    if paths.is_empty() {
        anyhow::bail!(
            "no session status in {}: is ka serve running, with this --state-dir?",
            args.state_dir.display()
        );
    }
    for path in paths {
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is session ka serve running with --state-dir {}?)",
                path.display(),
                args.state_dir.display()
            )
        })?;
        let status: SessionStatus = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a ka session status", path.display()))?;
        let running = process_runs(status.pid);
        if args.json {
            let mut v = serde_json::to_value(&status)?;
            v["running"] = serde_json::json!(running);
            crate::outln!("{v}");
        } else {
            crate::outln!("{}", table(&status, running));
        }
    }
    Ok(ExitStatus::Success)
}

/// Every status file in `dir`, by name.
fn list(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {} (ka serve's --state-dir)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Whether process `pid` still exists (signal 0 delivers nothing).
fn process_runs(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // It exists, owned by someone else.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The session's table for a terminal.
fn table(status: &SessionStatus, running: bool) -> String {
    let age = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - status.updated;
    let mut out = format!(
        "session {}: {}{}, {:.0} s, image {}\n",
        status.session,
        status.state,
        match (running, status.state.as_str()) {
            (true, _) | (false, "finished" | "aborted") => String::new(),
            (false, _) => format!(
                " (ka serve, pid {}, is gone; last word {age:.0} s ago)",
                status.pid
            ),
        },
        status.seconds,
        status.image_size.map_or("of unknown size".into(), human),
    );
    out += &format!(
        "{:<16} {:<10} {:>11} {:>11} {:<16} reason",
        "node", "state", "bytes", "rate", "fed by"
    );
    for n in &status.nodes {
        out += &format!(
            "\n{:<16} {:<10} {:>11} {:>9}/s {:<16} {}",
            n.name,
            n.state,
            human(n.bytes),
            human(n.rate as u64),
            n.upstream.as_deref().unwrap_or("-"),
            n.reason
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> SessionStatus {
        SessionStatus {
            session: "lab".into(),
            pid: std::process::id(),
            updated: 0.0,
            seconds: 3.0,
            image_size: Some(1 << 30),
            image: Some("/srv/golden.img".into()),
            state: "streaming".into(),
            nodes: vec![NodeStatus {
                name: "n1".into(),
                id: 1,
                state: "receiving".into(),
                bytes: 1 << 20,
                rate: 2.0 * (1 << 20) as f64,
                upstream: Some("source".into()),
                reason: String::new(),
                eta: Some(511.5),
                deaths: 0,
            }],
        }
    }

    #[test]
    fn a_snapshot_replaces_the_last_whole_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = status_path(dir.path(), "lab");
        let mut s = status();
        write_atomically(&path, &s).unwrap();
        s.state = "finished".into();
        write_atomically(&path, &s).unwrap();
        let back: SessionStatus =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, s);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(list(dir.path()).unwrap(), vec![path]);
    }

    #[test]
    fn the_table_shows_each_node_and_a_gone_source() {
        let s = status();
        let t = table(&s, true);
        assert!(t.contains("session lab: streaming"), "{t}");
        assert!(
            t.contains("n1") && t.contains("receiving") && t.contains("source"),
            "{t}"
        );
        assert!(t.contains("2.00 MiB/s"), "{t}");
        let t = table(&s, false);
        assert!(t.contains("is gone"), "{t}");
    }

    #[test]
    fn a_pid_that_runs_and_one_that_does_not() {
        assert!(process_runs(std::process::id()));
        assert!(!process_runs(u32::MAX));
    }
}
