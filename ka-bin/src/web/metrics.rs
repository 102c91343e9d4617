//! The session in the Prometheus text format (version 0.0.4), for
//! `GET /metrics`: one gauge or counter per line, HELP and TYPE first.

use std::fmt::Write;

use crate::cli::status::SessionStatus;

/// Every state a node can be in, so each has a line even at zero (a
/// dashboard's series must not vanish when a count drops to nothing).
const NODE_STATES: [&str; 7] = [
    "joined",
    "receiving",
    "verifying",
    "ok",
    "ko",
    "dead",
    "released",
];

/// Every state a session can be in, for `ka_session_state`.
const SESSION_STATES: [&str; 5] = ["waiting", "streaming", "releasing", "finished", "aborted"];

/// `status` as Prometheus text.
pub fn metrics_text(status: &SessionStatus) -> String {
    let mut out = String::new();
    let session = escape(&status.session);
    metric(
        &mut out,
        "ka_session_state",
        "gauge",
        "1 for the state the session is in (waiting, streaming, releasing, finished, aborted).",
    );
    for state in SESSION_STATES {
        let _ = writeln!(
            out,
            "ka_session_state{{session=\"{session}\",state=\"{state}\"}} {}",
            u8::from(status.state == state)
        );
    }
    metric(
        &mut out,
        "ka_session_seconds",
        "gauge",
        "Seconds since ka serve started.",
    );
    let _ = writeln!(
        out,
        "ka_session_seconds{{session=\"{session}\"}} {}",
        status.seconds
    );
    metric(
        &mut out,
        "ka_image_bytes",
        "gauge",
        "The image's size in bytes (absent until it is known).",
    );
    if let Some(size) = status.image_size {
        let _ = writeln!(out, "ka_image_bytes{{session=\"{session}\"}} {size}");
    }
    metric(&mut out, "ka_nodes", "gauge", "Nodes in each state.");
    for state in NODE_STATES {
        let count = status.nodes.iter().filter(|n| n.state == state).count();
        let _ = writeln!(
            out,
            "ka_nodes{{session=\"{session}\",state=\"{state}\"}} {count}"
        );
    }
    metric(
        &mut out,
        "ka_node_received_bytes",
        "gauge",
        "Bytes each node received.",
    );
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "ka_node_received_bytes{{session=\"{session}\",node=\"{}\"}} {}",
            escape(&n.name),
            n.bytes
        );
    }
    metric(
        &mut out,
        "ka_node_rate_bytes_per_second",
        "gauge",
        "Each node's receive rate over the last second.",
    );
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "ka_node_rate_bytes_per_second{{session=\"{session}\",node=\"{}\"}} {}",
            escape(&n.name),
            n.rate
        );
    }
    metric(
        &mut out,
        "ka_node_deaths_total",
        "counter",
        "Times each node was declared dead.",
    );
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "ka_node_deaths_total{{session=\"{session}\",node=\"{}\"}} {}",
            escape(&n.name),
            n.deaths
        );
    }
    out
}

/// A metric's HELP and TYPE lines.
fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: backslash, double quote and
/// line feed escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::status::NodeStatus;

    #[test]
    fn every_node_has_its_lines_and_labels_are_escaped() {
        let mut status = SessionStatus::empty("lab", Some("/srv/img".into()));
        status.state = "streaming".into();
        status.image_size = Some(1000);
        status.nodes.push(NodeStatus {
            name: "n\"1\\\n".into(),
            id: 1,
            state: "receiving".into(),
            bytes: 400,
            rate: 100.5,
            upstream: Some("source".into()),
            reason: String::new(),
            eta: Some(5.97),
            deaths: 2,
        });
        let text = metrics_text(&status);
        for line in [
            "ka_session_state{session=\"lab\",state=\"streaming\"} 1",
            "ka_session_state{session=\"lab\",state=\"waiting\"} 0",
            "ka_image_bytes{session=\"lab\"} 1000",
            "ka_nodes{session=\"lab\",state=\"receiving\"} 1",
            "ka_nodes{session=\"lab\",state=\"ok\"} 0",
            "ka_node_received_bytes{session=\"lab\",node=\"n\\\"1\\\\\\n\"} 400",
            "ka_node_rate_bytes_per_second{session=\"lab\",node=\"n\\\"1\\\\\\n\"} 100.5",
            "ka_node_deaths_total{session=\"lab\",node=\"n\\\"1\\\\\\n\"} 2",
            "# TYPE ka_node_deaths_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // Every sample's metric has its HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split('{').next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
