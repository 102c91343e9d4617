//! A clone session in the lab: `ka serve` on the source, `ka join` on the
//! nodes, their JSON output read as it comes, and the checks every test makes
//! at the end.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{KaProc, Lab, Line, SOURCE_ADDR};
use crate::pseudo_random;

/// The port `ka serve` listens on in the lab.
pub const PORT: u16 = 4715;

/// An image and a secret in a lab, and how to start `ka` on them.
pub struct Session<'l> {
    lab: &'l Lab,
    /// The image file the source serves.
    pub image: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    secret: PathBuf,
}

impl Lab {
    /// A session on an image of `size` bytes (a multiple of 1 MiB) of
    /// incompressible data without zero runs, so the stream carries every
    /// byte and its progress is linear in time.
    pub fn session(&self, size: u64) -> Session<'_> {
        assert!(
            size > 0 && size.is_multiple_of(1 << 20),
            "the image size must be a positive multiple of 1 MiB"
        );
        let image = self.dir().join("image.img");
        let f = File::create(&image).expect("creating the image");
        for i in 0..size >> 20 {
            f.write_all_at(&pseudo_random(1 << 20, i + 1), i << 20)
                .expect("writing the image");
        }
        Session {
            lab: self,
            image,
            size,
            secret: self.write_secret(),
        }
    }

    /// A session on an existing `image`, a file or a block device (a
    /// source machine's disk, served as it is or file by file), which the
    /// lab neither writes nor removes.
    pub fn session_of(&self, image: &Path) -> Session<'_> {
        let size = File::open(image)
            .and_then(|f| {
                use std::io::{Seek, SeekFrom};
                // A block device's metadata says 0 bytes; its end does not.
                (&f).seek(SeekFrom::End(0))
            })
            .unwrap_or_else(|e| panic!("cannot read the size of {}: {e}", image.display()));
        Session {
            lab: self,
            image: image.to_path_buf(),
            size,
            secret: self.write_secret(),
        }
    }

    /// The session secret, in the lab's work directory.
    fn write_secret(&self) -> PathBuf {
        let secret = self.dir().join("secret");
        crate::write_secret(&secret, u64::from(std::process::id()));
        secret
    }
}

impl Session<'_> {
    /// Where `ka serve` listens.
    pub fn server(&self) -> String {
        format!("{SOURCE_ADDR}:{PORT}")
    }

    /// The secret file.
    pub fn secret(&self) -> &Path {
        &self.secret
    }

    /// The state directory of host `name` (`source`, `n1`, …) in the lab's
    /// work directory, so that restarts find their records and nothing is
    /// left in `/var/lib/ka`.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.lab.dir().join(format!("state-{name}"))
    }

    /// Starts `ka serve --json` for `nodes` nodes with the chain in the
    /// lab's order (`n1` first) and the source's state directory, plus
    /// `extra` arguments. The same call again restarts the same source.
    pub fn serve(&self, nodes: usize, extra: &[&str]) -> Serve {
        self.serve_input(nodes, &["--image", path_str(&self.image)], extra)
    }

    /// [`Session::serve`] of what `input` names instead of the image
    /// (`--system --root DIR`, `--command CMD`, …).
    pub fn serve_input(&self, nodes: usize, input: &[&str], extra: &[&str]) -> Serve {
        let order: Vec<String> = self.lab.nodes().iter().map(|h| h.name.clone()).collect();
        let mut args: Vec<String> = [
            "serve",
            "--nodes",
            &nodes.to_string(),
            "--listen",
            &self.server(),
            "--secret-file",
            path_str(&self.secret),
            "--json",
            "--order",
            &order.join(","),
            "--state-dir",
            path_str(&self.state_dir("source")),
        ]
        .map(String::from)
        .to_vec();
        args.extend(input.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        Serve {
            proc: self.lab.spawn_ka(self.lab.source(), "ka serve", &args),
        }
    }

    /// Where node `name` writes its copy.
    pub fn target(&self, name: &str) -> PathBuf {
        self.lab.dir().join(format!("{name}.img"))
    }

    /// Starts `ka join --json` on node `i` (1-based), writing to its target,
    /// with its own state directory, looking for the source for 30 s unless
    /// `extra` says `--wait`. The same call again restarts the same node.
    pub fn join(&self, i: usize, extra: &[&str]) -> Join {
        self.join_as(i, &self.lab.node(i).name, extra)
    }

    /// [`Session::join`] on node `i` under the node name `name` (another
    /// host's, to play two machines that share a name).
    pub fn join_as(&self, i: usize, name: &str, extra: &[&str]) -> Join {
        let target = self.target(&self.lab.node(i).name);
        self.join_onto(i, name, "--target", &target, extra)
    }

    /// [`Session::join_as`] writing to `target` as `output` says: `--target`
    /// (a file or a block device), `--system` (a disk rebuilt from a system
    /// clone).
    pub fn join_onto(
        &self,
        i: usize,
        name: &str,
        output: &str,
        target: &Path,
        extra: &[&str],
    ) -> Join {
        let host = self.lab.node(i);
        let mut args: Vec<String> = [
            "join",
            "--server",
            &self.server(),
            "--secret-file",
            path_str(&self.secret),
            "--name",
            name,
            output,
            path_str(target),
            "--state-dir",
            path_str(&self.state_dir(&host.name)),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        if !extra.contains(&"--wait") {
            args.extend(["--wait".into(), "30s".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Join {
            name: name.to_string(),
            target: target.to_path_buf(),
            proc: self
                .lab
                .spawn_ka(host, &format!("ka join {}", host.name), &args),
        }
    }

    /// Starts `ka join` on every node of the lab.
    pub fn join_all(&self, extra: &[&str]) -> Vec<Join> {
        (1..=self.lab.nodes().len())
            .map(|i| self.join(i, extra))
            .collect()
    }

    /// Whether `copy` holds exactly the image's bytes.
    pub fn identical(&self, copy: &Path) -> bool {
        same_content(&self.image, copy)
    }

    /// The checks every fault test ends with, on a finished source and its
    /// nodes: each node named in `failed` (with a part of its reason) is KO
    /// in the source's report; every other node is OK in the report, left
    /// with exit code 0 saying its copy verified, and its copy is
    /// byte-identical to the image. The source's exit code says whether any
    /// node failed.
    pub fn check(&self, fin: &Finished, joins: Vec<Join>, failed: &[(&str, &str)]) {
        let ctx = || fin.transcript.clone();
        let want = if failed.is_empty() { 0 } else { 1 };
        assert_eq!(fin.code, want, "ka serve's exit code\n{}", ctx());
        assert!(fin.report.aborted.is_none(), "aborted\n{}", ctx());
        for (name, why) in failed {
            let line = fin.report.node(name);
            assert!(!line.ok, "{name} should be KO in the report\n{}", ctx());
            assert!(
                line.reason.contains(why),
                "{name}'s reason {:?} should mention {why:?}\n{}",
                line.reason,
                ctx()
            );
        }
        for mut j in joins {
            if failed.iter().any(|(n, _)| *n == j.name) {
                continue;
            }
            let line = fin.report.node(&j.name);
            assert!(
                line.ok,
                "{} should be OK in the report: {line:?}\n{}\n{}",
                j.name,
                ctx(),
                j.proc.transcript()
            );
            let status = j.proc.wait_exit(Duration::from_secs(30));
            assert_eq!(
                status.code(),
                Some(0),
                "{} exited badly\n{}",
                j.name,
                j.proc.transcript()
            );
            let left = j.left().unwrap_or_else(|| {
                panic!("{} printed no end line\n{}", j.name, j.proc.transcript())
            });
            assert_eq!(left["ok"], Value::Bool(true), "{}: {left}", j.name);
            assert!(
                self.identical(&j.target),
                "{}'s copy differs from the image",
                j.name
            );
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("lab paths are UTF-8")
}

/// Whether two files have the same bytes.
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let len = |f: &File| f.metadata().map(|m| m.len()).ok();
    if len(&fa) != len(&fb) {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..n] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Something the source reported (one JSON event line).
#[derive(Debug, Clone)]
pub struct SourceEvent {
    /// When the lab read it.
    pub at: Instant,
    /// The event's kind, as the core's `SourceEvent` variant: `Joined`,
    /// `Started`, `Dead`, `Relinked`, `Slow`, `Verified`, `Released`, …
    pub kind: String,
    /// The name of the node it concerns, if any.
    pub node: Option<String>,
    /// The whole event line as printed (JSON).
    pub text: String,
}

impl SourceEvent {
    /// The event's `reason` field, if it has one.
    pub fn reason(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.text).ok()?;
        v["reason"].as_str().map(str::to_string)
    }
}

/// A running `ka serve --json`.
pub struct Serve {
    /// The process.
    pub proc: KaProc,
}

impl Serve {
    /// Every event so far, nodes named.
    pub fn events(&self) -> Vec<SourceEvent> {
        parse_events(&self.proc.lines())
    }

    /// Waits (at most `timeout`) for an event satisfying `pred`; panics on
    /// timeout with the source's output, describing `what`.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&SourceEvent) -> bool,
    ) -> SourceEvent {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "ka serve reported no {what} within {timeout:?}:\n{}",
                self.proc.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the source has seen `count` `kind` events.
    pub fn wait_count(&self, kind: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.events().iter().filter(|e| e.kind == kind).count() < count {
            assert!(
                Instant::now() < deadline,
                "ka serve reported fewer than {count} {kind} within {timeout:?}:\n{}",
                self.proc.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (at most `timeout`) until the source reports that `node` has
    /// received at least `bytes`; returns when it printed that, and what the
    /// node had.
    pub fn wait_received(&self, node: &str, bytes: u64, timeout: Duration) -> (Instant, u64) {
        let (_, line) = self.proc.wait_line(
            &format!("progress of {node} past {bytes} bytes"),
            0,
            timeout,
            |l| progress_of(l, node).is_some_and(|r| r >= bytes),
        );
        (line.at, progress_of(&line.text, node).unwrap_or_default())
    }

    /// What the source last reported `node` as having received.
    pub fn received(&self, node: &str) -> u64 {
        self.proc
            .lines()
            .iter()
            .rev()
            .find_map(|l| progress_of(&l.text, node))
            .unwrap_or(0)
    }

    /// Waits (at most `timeout`) for the source to exit and reads its report.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let status = self.proc.wait_exit(timeout);
        let lines = self.proc.lines();
        let transcript = self.proc.transcript();
        let report = lines
            .iter()
            .find_map(|l| Report::parse(&l.text))
            .unwrap_or_else(|| panic!("ka serve printed no report:\n{transcript}"));
        Finished {
            code: status.code().unwrap_or(-1),
            report,
            events: parse_events(&lines),
            transcript,
            ended: Instant::now(),
            lines,
        }
    }
}

/// What a progress line says `node` has received.
fn progress_of(line: &str, node: &str) -> Option<u64> {
    if !line.starts_with("{\"progress\"") {
        return None;
    }
    let v: Value = serde_json::from_str(line).ok()?;
    v["progress"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)?["received"]
        .as_u64()
}

fn parse_events(lines: &[Line]) -> Vec<SourceEvent> {
    lines
        .iter()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(&l.text).ok()?;
            let kind = camel_case(v["event"].as_str()?);
            Some(SourceEvent {
                at: l.at,
                node: v["node"].as_str().map(str::to_string),
                kind,
                text: l.text.clone(),
            })
        })
        .collect()
}

/// `image_done` → `ImageDone`: the source's event names as the core's
/// `SourceEvent` variants, which the tests read more naturally.
fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// A source that has exited.
#[derive(Debug)]
pub struct Finished {
    /// Its exit code (0 all OK, 1 some failed, 2 could not run).
    pub code: i32,
    /// Its final report.
    pub report: Report,
    /// Every event it reported.
    pub events: Vec<SourceEvent>,
    /// Everything it printed, for failure messages.
    pub transcript: String,
    /// When the lab saw it exit.
    pub ended: Instant,
    /// Everything it printed on standard output, stamped.
    pub lines: Vec<Line>,
}

impl Finished {
    /// The first event of `kind` about `node`.
    pub fn event(&self, kind: &str, node: &str) -> Option<&SourceEvent> {
        self.events
            .iter()
            .find(|e| e.kind == kind && e.node.as_deref() == Some(node))
    }

    /// The first event of `kind`; panics if there is none.
    pub fn first(&self, kind: &str) -> &SourceEvent {
        self.events
            .iter()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} event:\n{}", self.transcript))
    }

    /// Every progress line: when it was read, and what each node (by name)
    /// had received then.
    pub fn progress(&self) -> Vec<(Instant, HashMap<String, u64>)> {
        self.lines
            .iter()
            .filter_map(|l| {
                if !l.text.starts_with("{\"progress\"") {
                    return None;
                }
                let v: Value = serde_json::from_str(&l.text).ok()?;
                let nodes = v["progress"]
                    .as_array()?
                    .iter()
                    .filter_map(|n| {
                        Some((n["name"].as_str()?.to_string(), n["received"].as_u64()?))
                    })
                    .collect();
                Some((l.at, nodes))
            })
            .collect()
    }

    /// Events of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&SourceEvent> {
        self.events.iter().filter(|e| e.kind == kind).collect()
    }
}

/// The source's final report (`{"report": …}`).
#[derive(Debug, Clone)]
pub struct Report {
    /// The image's size.
    pub size: u64,
    /// Seconds from the start of the stream to the end of the session.
    pub seconds: f64,
    /// Why the session was aborted, if it was.
    pub aborted: Option<String>,
    /// One line per node that joined.
    pub nodes: Vec<NodeLine>,
}

/// A node's line in the report.
#[derive(Debug, Clone)]
pub struct NodeLine {
    /// Its name.
    pub name: String,
    /// Whether its copy verified.
    pub ok: bool,
    /// Why not, when not.
    pub reason: String,
    /// Bytes it had received, as last reported.
    pub bytes: u64,
    /// Seconds from its join to its outcome.
    pub seconds: f64,
    /// How many times it was declared dead.
    pub deaths: u64,
    /// Whether the source released it.
    pub released: bool,
}

impl Report {
    /// Parses a report line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Report> {
        if !line.starts_with("{\"report\"") {
            return None;
        }
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {line}"));
        let r = &v["report"];
        let nodes = r["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("no nodes in the report: {line}"))
            .iter()
            .map(|n| NodeLine {
                name: n["name"].as_str().unwrap_or_default().into(),
                ok: n["ok"].as_bool().unwrap_or(false),
                reason: n["reason"].as_str().unwrap_or_default().into(),
                bytes: n["bytes"].as_u64().unwrap_or(0),
                seconds: n["seconds"].as_f64().unwrap_or(0.0),
                deaths: n["deaths"].as_u64().unwrap_or(0),
                released: n["released"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no released field: {line}")),
            })
            .collect();
        Some(Report {
            size: r["size"].as_u64().unwrap_or(0),
            seconds: r["seconds"].as_f64().unwrap_or(0.0),
            aborted: r["aborted"].as_str().map(String::from),
            nodes,
        })
    }

    /// The line of `name`; panics if the report has none.
    pub fn node(&self, name: &str) -> &NodeLine {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the report: {self:?}"))
    }
}

/// A running `ka join --json`.
pub struct Join {
    /// The node's name.
    pub name: String,
    /// Where it writes its copy.
    pub target: PathBuf,
    /// The process.
    pub proc: KaProc,
}

impl Join {
    /// The node's events so far, stamped: their kinds as the core's
    /// `NodeEvent` variants (`Receiving`, `UpstreamLost`, `Verified`, …).
    pub fn events(&self) -> Vec<(Instant, String)> {
        self.proc
            .lines()
            .into_iter()
            .filter_map(|l| {
                let v: Value = serde_json::from_str(&l.text).ok()?;
                v.get("node")?;
                Some((l.at, camel_case(v["event"].as_str()?)))
            })
            .collect()
    }

    /// The first event starting with `prefix` read after `after`.
    pub fn event_after(&self, prefix: &str, after: Instant) -> Option<(Instant, String)> {
        self.events()
            .into_iter()
            .find(|(at, e)| *at >= after && e.starts_with(prefix))
    }

    /// The node's end line (`{"event":"left",…}`), once it printed it.
    pub fn left(&self) -> Option<Value> {
        self.proc.lines().iter().find_map(|l| {
            let v: Value = serde_json::from_str(&l.text).ok()?;
            (v["event"] == "left").then_some(v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_with_their_node_and_reason() {
        let line = |text: &str| Line {
            at: Instant::now(),
            text: text.to_string(),
        };
        let events = parse_events(&[
            line(
                r#"{"event":"dead","id":12,"node":"n3","reason":"no \"heartbeat\" for 1.0 s","t":1.5}"#,
            ),
            line(r#"{"progress":[]}"#),
            line(r#"{"event":"image_done","size":5,"t":2.0}"#),
        ]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, "Dead");
        assert_eq!(events[0].node.as_deref(), Some("n3"));
        assert_eq!(
            events[0].reason().as_deref(),
            Some(r#"no "heartbeat" for 1.0 s"#)
        );
        assert_eq!(events[1].kind, "ImageDone");
        assert_eq!(events[1].node, None);
    }

    #[test]
    fn progress_lines_name_each_node() {
        let l = r#"{"progress":[{"name":"n1","received":5,"live":true},{"name":"n2","received":7,"live":false}]}"#;
        assert_eq!(progress_of(l, "n2"), Some(7));
        assert_eq!(progress_of(l, "n3"), None);
        assert_eq!(progress_of(r#"{"event":"x"}"#, "n1"), None);
    }
}
