//! What the source shows while a session runs and when it ends.
//!
//! Three audiences, three forms: an operator at a terminal gets one live
//! progress bar per node (indicatif) and a final table; a script (`--json`)
//! gets one JSON object per line — events, every node's progress at each
//! refresh (about five a second), and a final `report` object; logs (`RUST_LOG`) get every event
//! in a tracing span per node. Without a terminal and without `--json`,
//! events are printed as plain lines so a redirected log still says what
//! happened.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ka_core::config::SlowPolicy;
use ka_core::ids::NodeId;
use ka_core::source::{NodeReport, Source, SourceEvent, StartTrigger};

use super::events::{mac_text, SourceEventLine, SourceLine};
use super::status::StatusWriter;
use serde::Serialize;
use serde_json::json;

use crate::session::serve::Report as SourceReport;

/// The source's live view. Feed it every callback of `run_source`.
pub struct Display {
    json: bool,
    started: Instant,
    bars: Option<Bars>,
    spans: HashMap<NodeId, tracing::Span>,
    /// Every node's name from its join: a node superseded by a new join under
    /// its name before the start leaves the source's report under its old
    /// identifier, but that death still needs a name.
    names: HashMap<NodeId, String>,
    /// Without bars or JSON (a journal, a file): when the last summary
    /// line was printed, so one goes out every [`PLAIN_PROGRESS_EVERY`].
    plain_progress_at: Option<Instant>,
    /// The session's snapshot for `ka status`, when it has a place, and
    /// for the web page.
    status: Option<StatusWriter>,
    /// The web page's feed, with `--http`.
    web: Option<crate::web::WebFeed>,
}

/// How often a source without a terminal or `--json` prints a summary
/// line: often enough to show it is alive, rarely enough for a journal.
pub const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// One bar per node, drawn together on standard error.
struct Bars {
    multi: MultiProgress,
    per_node: HashMap<NodeId, ProgressBar>,
}

impl Display {
    /// A display for `--json` or, when standard error is a terminal, with
    /// live bars.
    pub fn new(json: bool) -> Self {
        let bars = (!json && std::io::stderr().is_terminal()).then(|| Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            per_node: HashMap::new(),
        });
        Display {
            json,
            started: Instant::now(),
            bars,
            spans: HashMap::new(),
            names: HashMap::new(),
            plain_progress_at: None,
            status: None,
            web: None,
        }
    }

    /// Also publishes the session's snapshot for `ka status` as it goes.
    pub fn with_status(mut self, status: StatusWriter) -> Self {
        self.status = Some(status);
        self
    }

    /// Also feeds the web page (`--http`): every event line and each
    /// snapshot the status writer makes.
    pub fn with_web(mut self, web: crate::web::WebFeed) -> Self {
        self.web = Some(web);
        self
    }

    /// Shows one event (`Some`) or refreshes progress (`None`).
    pub fn update(&mut self, source: &Source, event: Option<&SourceEvent>) {
        match event {
            Some(e) => {
                if let SourceEvent::Joined { node, name, .. } = e {
                    self.names.insert(*node, name.clone());
                }
                self.log(source, e);
                if let Some(web) = &self.web {
                    web.event(self.event_json(source, e));
                }
                if self.json {
                    let line = self.event_json(source, e);
                    crate::outln!("{}", json_text(&line));
                } else if let Some(text) = describe(&|n| self.name_of(source, n), e) {
                    match &self.bars {
                        Some(bars) => bars.multi.suspend(|| crate::errln!("ka: {text}")),
                        None => crate::errln!("ka: {text}"),
                    }
                }
                self.refresh(source);
            }
            None => self.refresh(source),
        }
    }

    /// Prints a line for the operator on standard error without tearing the
    /// bars (e.g. a node's boot mode flipped after its clone verified).
    pub fn note(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| crate::errln!("ka: {text}")),
            None => crate::errln!("ka: {text}"),
        }
    }

    /// Clears the bars, leaving the terminal to the final report.
    pub fn finish(&mut self) {
        if let Some(status) = &self.status {
            status.remove();
        }
        if let Some(bars) = &self.bars {
            for bar in bars.per_node.values() {
                bar.abandon();
            }
            let _ = bars.multi.clear();
        }
    }

    fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn refresh(&mut self, source: &Source) {
        if let Some(status) = &mut self.status {
            if let (Some(snapshot), Some(web)) = (status.publish(source), &self.web) {
                web.session(snapshot);
            }
        }
        if self.json {
            self.json_progress(source);
        } else if self.bars.is_none() {
            self.plain_progress(source);
        }
        let Some(bars) = &mut self.bars else { return };
        let size = source.config().image_size;
        for r in source.report() {
            let got = received(source, &r);
            let bar = bars.per_node.entry(r.node).or_insert_with(|| {
                let bar = bars
                    .multi
                    .add(ProgressBar::new(size.unwrap_or(0)).with_prefix(r.name.clone()));
                bar.set_style(bar_style(size.is_some()));
                bar
            });
            if let Some(size) = size {
                bar.set_length(size);
            }
            bar.set_position(got);
            let state = state(source, &r, got, size);
            if r.outcome.is_some() && !bar.is_finished() {
                bar.finish_with_message(state);
            } else if !bar.is_finished() {
                bar.set_message(state);
            }
        }
    }

    /// One line of every node's progress at each refresh, so scripts can
    /// act at a point of the stream (a test that kills a node half-way, a
    /// dashboard).
    fn json_progress(&self, source: &Source) {
        let nodes: Vec<serde_json::Value> = source
            .report()
            .iter()
            .map(|r| {
                json!({"name": r.name, "received": received(source, r),
                       "live": source.is_live(r.node)})
            })
            .collect();
        crate::outln!("{}", json!({"progress": nodes, "t": self.seconds()}));
    }

    /// A summary line every [`PLAIN_PROGRESS_EVERY`] once the stream runs:
    /// how many nodes are done, and how far the slowest live one is.
    fn plain_progress(&mut self, source: &Source) {
        let now = Instant::now();
        let report = source.report();
        let streaming = report.iter().any(|r| received(source, r) > 0);
        let due = self
            .plain_progress_at
            .is_none_or(|at| now.duration_since(at) >= PLAIN_PROGRESS_EVERY);
        if !streaming || !due {
            return;
        }
        self.plain_progress_at = Some(now);
        crate::errln!("ka: {}", summary(source, &report));
    }

    /// Logs an event in the span of the node it concerns (`RUST_LOG=info`).
    fn log(&mut self, source: &Source, event: &SourceEvent) {
        let line = json_text(&self.event_json(source, event));
        match event_node(event) {
            Some(n) => {
                let name = self.name_of(source, n);
                let span = self
                    .spans
                    .entry(n)
                    .or_insert_with(|| tracing::info_span!("node", id = %n, name = %name));
                span.in_scope(|| tracing::info!(event = %line));
            }
            None => tracing::info!(event = %line),
        }
    }

    fn event_json(&self, source: &Source, event: &SourceEvent) -> SourceEventLine {
        SourceEventLine {
            event: SourceLine::of(event, &|n| self.name_of(source, n)),
            t: self.seconds(),
        }
    }
}

/// A line of JSON: the types are plain data, so this cannot fail.
fn json_text(line: &impl Serialize) -> String {
    serde_json::to_string(line).expect("event lines serialize")
}

/// A sentence for the operator about an event worth interrupting the bars
/// for; progress-like events are left to the bars.
fn describe(name: &dyn Fn(NodeId) -> String, event: &SourceEvent) -> Option<String> {
    Some(match event {
        SourceEvent::Joined { node, rejoin, .. } => {
            format!(
                "{} {}",
                name(*node),
                if *rejoin { "rejoined" } else { "joined" }
            )
        }
        // The shell logs refusals with the peer's address, rate-limited.
        SourceEvent::Started { nodes, trigger } => {
            let why = match trigger {
                StartTrigger::AllJoined => "every node joined",
                StartTrigger::Go => "ka go",
                StartTrigger::Deadline => "the join timeout",
            };
            format!("streaming to {nodes} node(s) ({why})")
        }
        SourceEvent::Relinked { node, upstream } => format!(
            "{} now fed by {}",
            name(*node),
            upstream.map_or("the source".to_string(), name)
        ),
        SourceEvent::Dead { node, reason } => format!("{} declared dead: {reason}", name(*node)),
        SourceEvent::Stranded {
            node,
            upstream,
            from,
        } => format!(
            "{} lacks offset {from}, which left {}'s window: the source feeds it",
            name(*node),
            name(*upstream)
        ),
        SourceEvent::Slow { node, policy } => format!(
            "{} too slow: {}",
            name(*node),
            match policy {
                SlowPolicy::Keep => "kept in place",
                SlowPolicy::MoveToTail => "moved to the tail of the chain",
                SlowPolicy::Drop => "dropped",
            }
        ),
        SourceEvent::Verified {
            node,
            ok: false,
            reason,
        } => {
            format!("{} copy does not match: {reason}", name(*node))
        }
        SourceEvent::Failed { node, reason } => format!("{} failed: {reason}", name(*node)),
        SourceEvent::JoinFailed(f) => format!("{} failed before joining: {}", f.name, f.reason),
        _ => return None,
    })
}

fn event_node(event: &SourceEvent) -> Option<NodeId> {
    match event {
        SourceEvent::Joined { node, .. }
        | SourceEvent::Relinked { node, .. }
        | SourceEvent::Dead { node, .. }
        | SourceEvent::Stranded { node, .. }
        | SourceEvent::Slow { node, .. }
        | SourceEvent::Verified { node, .. }
        | SourceEvent::Failed { node, .. }
        | SourceEvent::Released { node }
        | SourceEvent::NodeLog { node, .. } => Some(*node),
        _ => None,
    }
}

impl Display {
    /// A node's name: from the report, else from its join.
    fn name_of(&self, source: &Source, node: NodeId) -> String {
        source
            .report()
            .into_iter()
            .find(|r| r.node == node)
            .map(|r| r.name)
            .or_else(|| self.names.get(&node).cloned())
            .unwrap_or_else(|| node.to_string())
    }
}

/// What a node has, from its latest progress or its report.
/// One line of the whole session: nodes done, and the slowest live one.
fn summary(source: &Source, report: &[NodeReport]) -> String {
    let ok = report
        .iter()
        .filter(|r| matches!(r.outcome, Some(Ok(()))))
        .count();
    let ko = report
        .iter()
        .filter(|r| matches!(r.outcome, Some(Err(_))))
        .count();
    let size = source.config().image_size;
    let slowest = report
        .iter()
        .filter(|r| r.outcome.is_none() && source.is_live(r.node))
        .map(|r| (received(source, r), r.name.as_str()))
        .min();
    let mut line = format!("{} nodes: {ok} OK, {ko} KO", report.len());
    if let Some((got, name)) = slowest {
        line += &match size {
            Some(size) if size > 0 => format!(
                "; slowest {name} at {} of {} ({:.0} %)",
                human(got),
                human(size),
                got as f64 * 100.0 / size as f64
            ),
            _ => format!("; slowest {name} at {}", human(got)),
        };
    }
    line
}

/// What `r`'s node received: its last progress, or its report's count
/// when that is further (a restored or finished node).
pub(super) fn received(source: &Source, r: &NodeReport) -> u64 {
    source
        .progress(r.node)
        .map_or(r.received, |p| p.received.max(r.received))
}

fn state(source: &Source, r: &NodeReport, got: u64, size: Option<u64>) -> String {
    match &r.outcome {
        None if source.is_live(r.node) && size.is_some_and(|s| got >= s) => "verifying".into(),
        None if source.is_live(r.node) => "receiving".into(),
        None => "lost".into(),
        Some(Ok(())) => "OK".into(),
        Some(Err(e)) => format!("KO {e}"),
    }
}

fn bar_style(known_size: bool) -> ProgressStyle {
    // The templates are constants; a typo is a programming error caught by
    // the display tests.
    let template = if known_size {
        "{prefix:<16} [{bar:24}] {percent:>3}% {bytes:>10} {binary_bytes_per_sec:>12} ETA {eta:>4} {msg}"
    } else {
        "{prefix:<16} {spinner} {bytes:>10} {binary_bytes_per_sec:>12} {msg}"
    };
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("#>-")
}

/// Human-readable binary size.
pub fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// One node's line of the final report, for scripts.
#[derive(Serialize)]
struct JsonNode<'a> {
    name: &'a str,
    /// Absent when the node did not say.
    mac: Option<String>,
    ok: bool,
    reason: String,
    bytes: u64,
    seconds: f64,
    deaths: u32,
    /// Where it resumed from after a restart (0: from the start).
    resumed_from: u64,
    /// Its outcome comes from the session record of a restarted source.
    restored: bool,
    /// The source released it; false for a node lost after it verified.
    released: bool,
    /// It never joined: it reported it could not start (`reason` says why).
    failed_before_join: bool,
}

/// Seconds from a node's join to its outcome.
fn node_seconds(n: &NodeReport) -> f64 {
    n.finished_at
        .map_or(0.0, |f| f.saturating_since(n.joined_at).as_secs_f64())
}

fn outcome(n: &NodeReport) -> (bool, String) {
    match &n.outcome {
        // Its copy checked, but it went away before the source let it go
        // (it may not have rebooted into its system): worth a look.
        Some(Ok(())) if !n.released => (true, "verified, then lost before its release".into()),
        Some(Ok(())) => (true, String::new()),
        Some(Err(e)) => (false, e.clone()),
        None => (false, "undecided".into()),
    }
}

/// Prints the final report: a table on standard output, or one JSON object.
pub fn print_report(report: &SourceReport, json: bool) {
    let secs = report.streaming.as_secs_f64().max(1e-9);
    if json {
        crate::outln!("{}", report_json(report));
        return;
    }
    print_report_table(report, secs);
}

/// The final report as `ka serve --json` prints it (and the web page
/// shows it): `{"report": {…}}`.
pub fn report_json(report: &SourceReport) -> serde_json::Value {
    let secs = report.streaming.as_secs_f64().max(1e-9);
    {
        let nodes: Vec<JsonNode> = report
            .nodes
            .iter()
            .map(|n| {
                let (ok, reason) = outcome(n);
                JsonNode {
                    name: &n.name,
                    mac: mac_text(n.mac),
                    ok,
                    reason,
                    bytes: n.received,
                    seconds: node_seconds(n),
                    deaths: n.deaths,
                    resumed_from: n.resumed_from,
                    restored: n.restored,
                    released: n.released,
                    failed_before_join: n.failed_before_join,
                }
            })
            .collect();
        json!({"report": {"size": report.size, "packed": report.packed, "seconds": secs, "expected": report.expected,
                          "aborted": report.aborted, "nodes": nodes}})
    }
}

/// The final report as a table for a terminal.
fn print_report_table(report: &SourceReport, secs: f64) {
    crate::outln!(
        "{:<16} {:<4} {:>12} {:>9} {:>9}  reason",
        "node",
        "",
        "bytes",
        "seconds",
        "MB/s"
    );
    // By name, as an administrator looks a node up: node2 before node10.
    let mut by_name: Vec<_> = report.nodes.iter().collect();
    by_name.sort_by(|a, b| alphanumeric_sort::compare_str(&a.name, &b.name));
    for n in by_name {
        let t = node_seconds(n);
        let (ok, reason) = outcome(n);
        let rate = if t > 0.0 {
            n.received as f64 / t / 1e6
        } else {
            0.0
        };
        crate::outln!(
            "{:<16} {:<4} {:>12} {:>9.2} {:>9.1}  {reason}",
            n.name,
            if ok { "OK" } else { "KO" },
            n.received,
            t,
            rate
        );
    }
    let ok = report.nodes.iter().filter(|n| n.is_ok()).count();
    let before_join = report.nodes.iter().filter(|n| n.failed_before_join).count();
    if before_join > 0 {
        crate::outln!("{before_join} node(s) failed before joining (their reasons above)");
    }
    let missing = (report.expected as usize).saturating_sub(report.nodes.len());
    if missing > 0 {
        crate::outln!(
            "{missing} of the {} nodes waited for never joined",
            report.expected
        );
    }
    let packed = report.packed.map_or(String::new(), |p| {
        format!(
            " (packed to {}, {:.2}:1)",
            human(p),
            report.size as f64 / p.max(1) as f64
        )
    });
    crate::outln!(
        "{ok}/{} nodes OK; {}{packed} in {:.2} s of streaming ({:.1} MB/s per node){}",
        report.nodes.len(),
        human(report.size),
        secs,
        report.size as f64 / secs / 1e6,
        report
            .aborted
            .as_ref()
            .map_or(String::new(), |a| format!("; aborted: {a}"))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_reported_in_the_order_people_number_them() {
        let mut names = vec![
            "node10",
            "node2",
            "node01",
            "rack10-n1",
            "rack2-n3",
            "rack2-n1",
            "gpu",
            "node",
        ];
        names.sort_by(|a, b| alphanumeric_sort::compare_str(a, b));
        assert_eq!(
            names,
            [
                "gpu",
                "node",
                "node01",
                "node2",
                "node10",
                "rack2-n1",
                "rack2-n3",
                "rack10-n1"
            ]
        );
        let order = alphanumeric_sort::compare_str;
        assert!(order("n99999999999999999999999", "n100000000000000000000000").is_lt());
        assert!(order("n7", "n7").is_eq());
        // Same number, different text: still an order, the same every run.
        assert!(order("n07", "n7").is_ne());
    }

    #[test]
    fn bar_templates_are_valid() {
        // `bar_style` panics on a template typo; build both.
        bar_style(true);
        bar_style(false);
    }

    #[test]
    fn human_sizes_are_binary() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(256 << 20), "256.00 MiB");
    }
}
