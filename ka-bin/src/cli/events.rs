//! What `ka serve --json` and `ka join --json` print, one JSON object per
//! line, as serde types: the schema scripts and journals read
//! (docs/events.md). Every event of the protocol maps to one of these by an
//! exhaustive match, so a new event cannot reach the output as Rust debug
//! text; the tests print and parse back every kind.

use ka_core::codec::RefusalCode;
use ka_core::config::SlowPolicy;
use ka_core::ids::NodeId;
use ka_core::node::NodeEvent;
use ka_core::source::{SourceEvent, StartTrigger};
use serde::{Deserialize, Serialize};

/// One event of the source's session (`ka serve --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SourceLine {
    /// A node joined (or came back: `rejoin`).
    Joined {
        /// The node's name.
        node: String,
        /// Its number in this session.
        id: u32,
        /// It had joined before (restarted, or reconnected).
        rejoin: bool,
        /// Where its copy goes on from.
        resumed_from: u64,
        /// What it held and had to throw away (another image's bytes).
        discarded: u64,
    },
    /// A connection was refused before it joined.
    Refused {
        /// Why, as a word: see [`refusal_code`].
        code: String,
        /// Why, in words.
        reason: String,
    },
    /// The stream began.
    Started {
        /// The nodes present.
        nodes: u32,
        /// What started it: `all_joined`, `go` or `deadline`.
        trigger: String,
    },
    /// A node's feeder changed.
    Relinked {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// Its new feeder's name; absent when the source feeds it.
        upstream: Option<String>,
    },
    /// A node was declared dead.
    Dead {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// Why.
        reason: String,
    },
    /// A node lacks bytes its feeder's window let go; the source feeds it.
    Stranded {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// The feeder that no longer holds them.
        upstream: String,
        /// The first offset it lacks.
        from: u64,
    },
    /// A node was too slow for the session.
    Slow {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// What was done: `keep`, `move_to_tail` or `drop`.
        policy: String,
    },
    /// A node checked its copy.
    Verified {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// Whether the copy matches the source's digest.
        ok: bool,
        /// Why not, when not.
        reason: String,
    },
    /// A node failed (its own error, before any check).
    Failed {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The source let a verified node go.
    Released {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
    },
    /// The whole image has been read: its size is known.
    ImageDone {
        /// Its size in bytes.
        size: u64,
    },
    /// Every node has an outcome.
    Finished {
        /// Nodes whose copy verified.
        ok: u32,
        /// Nodes that failed.
        ko: u32,
    },
    /// The session stopped before its end.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Lines a node sent for its log (its own events, its console), as the
    /// source keeps them: cut when too long, counted when over its budget.
    Log {
        /// The node.
        node: String,
        /// Its number.
        id: u32,
        /// The lines.
        lines: Vec<String>,
    },
    /// A node could not start (its target missing, too small, read-only…)
    /// and said so with its key; it counts as failed before joining.
    JoinFailed {
        /// The node.
        node: String,
        /// Its MAC address, when it knew it.
        mac: Option<String>,
        /// Why.
        reason: String,
    },
}

/// A source event with its time: seconds since `ka serve` started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceEventLine {
    /// The event.
    #[serde(flatten)]
    pub event: SourceLine,
    /// Seconds since the session began.
    pub t: f64,
}

impl SourceLine {
    /// The line for `event`, naming nodes with `name`.
    pub fn of(event: &SourceEvent, name: &dyn Fn(NodeId) -> String) -> SourceLine {
        match event {
            SourceEvent::Joined {
                node,
                name: joined_as,
                rejoin,
                resumed_from,
                discarded,
            } => SourceLine::Joined {
                node: joined_as.clone(),
                id: node.0,
                rejoin: *rejoin,
                resumed_from: *resumed_from,
                discarded: *discarded,
            },
            SourceEvent::Refused { refusal, .. } => SourceLine::Refused {
                code: refusal_code(refusal.code).into(),
                reason: refusal.detail.clone(),
            },
            SourceEvent::Started { nodes, trigger } => SourceLine::Started {
                nodes: *nodes,
                trigger: match trigger {
                    StartTrigger::AllJoined => "all_joined",
                    StartTrigger::Go => "go",
                    StartTrigger::Deadline => "deadline",
                }
                .into(),
            },
            SourceEvent::Relinked { node, upstream } => SourceLine::Relinked {
                node: name(*node),
                id: node.0,
                upstream: upstream.map(name),
            },
            SourceEvent::Dead { node, reason } => SourceLine::Dead {
                node: name(*node),
                id: node.0,
                reason: reason.clone(),
            },
            SourceEvent::Stranded {
                node,
                upstream,
                from,
            } => SourceLine::Stranded {
                node: name(*node),
                id: node.0,
                upstream: name(*upstream),
                from: *from,
            },
            SourceEvent::Slow { node, policy } => SourceLine::Slow {
                node: name(*node),
                id: node.0,
                policy: slow_policy(*policy).into(),
            },
            SourceEvent::Verified { node, ok, reason } => SourceLine::Verified {
                node: name(*node),
                id: node.0,
                ok: *ok,
                reason: reason.clone(),
            },
            SourceEvent::Failed { node, reason } => SourceLine::Failed {
                node: name(*node),
                id: node.0,
                reason: reason.clone(),
            },
            SourceEvent::Released { node } => SourceLine::Released {
                node: name(*node),
                id: node.0,
            },
            SourceEvent::ImageDone { total } => SourceLine::ImageDone { size: *total },
            SourceEvent::Finished { ok, ko } => SourceLine::Finished { ok: *ok, ko: *ko },
            SourceEvent::Aborted { reason } => SourceLine::Aborted {
                reason: reason.clone(),
            },
            SourceEvent::NodeLog {
                node,
                name: logged_by,
                lines,
            } => SourceLine::Log {
                node: logged_by.clone(),
                id: node.0,
                lines: lines.clone(),
            },
            SourceEvent::JoinFailed(failed) => SourceLine::JoinFailed {
                node: failed.name.clone(),
                mac: mac_text(failed.mac),
                reason: failed.reason.clone(),
            },
        }
    }
}

/// A refusal's code as a word for scripts.
pub fn refusal_code(code: RefusalCode) -> &'static str {
    match code {
        RefusalCode::VersionMismatch => "version_mismatch",
        RefusalCode::WrongSession => "wrong_session",
        RefusalCode::BadProof => "bad_proof",
        RefusalCode::SessionFull => "session_full",
        RefusalCode::NameInUse => "name_in_use",
        RefusalCode::SessionOver => "session_over",
        RefusalCode::NotExpected => "not_expected",
        RefusalCode::CannotResume => "cannot_resume",
    }
}

/// A slow-node policy as a word, the one `--slow-policy` takes in words.
pub fn slow_policy(policy: SlowPolicy) -> &'static str {
    match policy {
        SlowPolicy::Keep => "keep",
        SlowPolicy::MoveToTail => "move_to_tail",
        SlowPolicy::Drop => "drop",
    }
}

/// One event of a node (`ka join --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeLine {
    /// Admitted to the session.
    Welcomed {
        /// Our number in the session.
        id: u32,
        /// Where the copy goes on from (0: from the start).
        resumed_from: u64,
    },
    /// What the target held was of another image: the copy starts over.
    StartedOver {
        /// The bytes thrown away.
        had: u64,
    },
    /// The source refused us.
    Refused {
        /// Why, as a word (as the source's `refused` event).
        code: String,
        /// Why, in words.
        reason: String,
    },
    /// Our place in the chain changed.
    Placed {
        /// Who feeds us: `source`, `node` (see `upstream_id`) or `none` yet.
        upstream: String,
        /// The feeding node's number, when a node feeds us.
        upstream_id: Option<u32>,
        /// The numbers of the nodes we feed.
        downstream_ids: Vec<u32>,
    },
    /// Data flows from our feeder, from this offset.
    Receiving {
        /// The offset.
        from: u64,
    },
    /// A node asked us for data before the source told us it is ours.
    DownstreamEarly {
        /// Its number.
        id: u32,
    },
    /// The data connection to our feeder was lost or refused.
    UpstreamLost {
        /// Why.
        reason: String,
    },
    /// Our feeder no longer holds what we lack; the source places us anew.
    Stranded {
        /// The feeder's number.
        upstream_id: u32,
        /// The offset we asked for.
        from: u64,
        /// The feeder's words.
        reason: String,
    },
    /// The source went silent or its connection dropped.
    SourceLost,
    /// Who answered as the source did not prove our key.
    SourceUnproven {
        /// What failed.
        reason: String,
    },
    /// The copy was checked.
    Verified {
        /// Whether it matches the source's digest.
        ok: bool,
        /// Why not, when not.
        reason: String,
    },
    /// We leave the session (before the final `left` line with the counts).
    Leaving {
        /// Whether our copy verified.
        ok: bool,
        /// Why.
        reason: String,
    },
    /// The node's last line: its verdict and what it wrote.
    Left {
        /// Whether the copy verified.
        ok: bool,
        /// Why (or how it ended).
        reason: String,
        /// Bytes written to the target.
        written: u64,
        /// Bytes received.
        received: u64,
        /// Where the copy went on from.
        resumed_from: u64,
    },
}

/// A node event with the node's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEventLine {
    /// The node's name.
    pub node: String,
    /// The event.
    #[serde(flatten)]
    pub event: NodeLine,
}

impl NodeLine {
    /// The line for `event`.
    pub fn of(event: &NodeEvent) -> NodeLine {
        match event {
            NodeEvent::Welcomed {
                node, resumed_from, ..
            } => NodeLine::Welcomed {
                id: node.0,
                resumed_from: *resumed_from,
            },
            NodeEvent::StartedOver { had } => NodeLine::StartedOver { had: *had },
            NodeEvent::Refused(refusal) => NodeLine::Refused {
                code: refusal_code(refusal.code).into(),
                reason: refusal.detail.clone(),
            },
            NodeEvent::Placed {
                upstream,
                downstreams,
            } => NodeLine::Placed {
                upstream: match upstream {
                    None => "none",
                    Some(None) => "source",
                    Some(Some(_)) => "node",
                }
                .into(),
                upstream_id: upstream.flatten().map(|n| n.0),
                downstream_ids: downstreams.iter().map(|n| n.0).collect(),
            },
            NodeEvent::Receiving { from } => NodeLine::Receiving { from: *from },
            NodeEvent::DownstreamEarly { node, .. } => NodeLine::DownstreamEarly { id: node.0 },
            NodeEvent::UpstreamLost { reason } => NodeLine::UpstreamLost {
                reason: reason.clone(),
            },
            NodeEvent::Stranded {
                upstream,
                from,
                reason,
            } => NodeLine::Stranded {
                upstream_id: upstream.0,
                from: *from,
                reason: reason.clone(),
            },
            NodeEvent::SourceLost => NodeLine::SourceLost,
            NodeEvent::SourceUnproven { reason } => NodeLine::SourceUnproven {
                reason: reason.clone(),
            },
            NodeEvent::Verified { ok, reason } => NodeLine::Verified {
                ok: *ok,
                reason: reason.clone(),
            },
            NodeEvent::Left { ok, reason } => NodeLine::Leaving {
                ok: *ok,
                reason: reason.clone(),
            },
        }
    }
}

/// A MAC address for the report: `None` when the node did not say (all
/// zeros on the wire), rather than a fake `00:00:00:00:00:00`.
pub fn mac_text(mac: [u8; 6]) -> Option<String> {
    (mac != [0; 6]).then(|| mac.map(|b| format!("{b:02x}")).join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ka_core::codec::{ImageId, Refusal};
    use ka_core::ids::{ConnId, Epoch};

    fn name(n: NodeId) -> String {
        format!("n{}", n.0)
    }

    /// Every source event, one of each kind.
    fn every_source_event() -> Vec<SourceEvent> {
        let node = NodeId(3);
        vec![
            SourceEvent::Joined {
                node,
                name: "n3".into(),
                rejoin: true,
                resumed_from: 7,
                discarded: 1,
            },
            SourceEvent::Refused {
                conn: ConnId(9),
                refusal: Refusal::new(RefusalCode::NameInUse, "taken".into()),
            },
            SourceEvent::Started {
                nodes: 2,
                trigger: StartTrigger::Deadline,
            },
            SourceEvent::Relinked {
                node,
                upstream: Some(NodeId(1)),
            },
            SourceEvent::Relinked {
                node,
                upstream: None,
            },
            SourceEvent::Dead {
                node,
                reason: "silent".into(),
            },
            SourceEvent::Stranded {
                node,
                upstream: NodeId(1),
                from: 5,
            },
            SourceEvent::Slow {
                node,
                policy: SlowPolicy::MoveToTail,
            },
            SourceEvent::Verified {
                node,
                ok: false,
                reason: "digest".into(),
            },
            SourceEvent::Failed {
                node,
                reason: "disk".into(),
            },
            SourceEvent::Released { node },
            SourceEvent::ImageDone { total: 10 },
            SourceEvent::Finished { ok: 1, ko: 2 },
            SourceEvent::Aborted {
                reason: "gone".into(),
            },
            SourceEvent::NodeLog {
                node,
                name: "n3".into(),
                lines: vec!["ka: n3: joined as node 3".into()],
            },
            SourceEvent::JoinFailed(ka_core::source::FailedBeforeJoin {
                name: "n4".into(),
                mac: [0, 1, 2, 3, 4, 5],
                reason: "the target is a directory".into(),
                at: ka_core::time::Time::ZERO,
            }),
        ]
    }

    #[test]
    fn every_source_event_prints_as_json_that_parses_back() {
        let mut kinds = std::collections::BTreeSet::new();
        for event in every_source_event() {
            let line = SourceEventLine {
                event: SourceLine::of(&event, &name),
                t: 1.5,
            };
            let text = serde_json::to_string(&line).unwrap();
            assert!(!text.contains("Some("), "debug text in {text}");
            let back: SourceEventLine = serde_json::from_str(&text).unwrap();
            assert_eq!(back, line, "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            kinds.insert(v["event"].as_str().unwrap().to_string());
        }
        assert_eq!(kinds.len(), 15, "{kinds:?}");
    }

    #[test]
    fn source_lines_name_nodes_and_spell_words() {
        let text = |e: &SourceEvent| serde_json::to_string(&SourceLine::of(e, &name)).unwrap();
        let events = every_source_event();
        assert_eq!(
            text(&events[3]),
            r#"{"event":"relinked","node":"n3","id":3,"upstream":"n1"}"#
        );
        assert_eq!(
            text(&events[4]),
            r#"{"event":"relinked","node":"n3","id":3,"upstream":null}"#
        );
        assert!(text(&events[1]).contains(r#""code":"name_in_use""#));
        assert!(text(&events[2]).contains(r#""trigger":"deadline""#));
        assert!(text(&events[7]).contains(r#""policy":"move_to_tail""#));
        assert_eq!(text(&events[12]), r#"{"event":"finished","ok":1,"ko":2}"#);
    }

    #[test]
    fn every_node_event_prints_as_json_that_parses_back() {
        let events = vec![
            NodeEvent::Welcomed {
                node: NodeId(2),
                image: ImageId([1; 32]),
                resumed_from: 4,
            },
            NodeEvent::StartedOver { had: 8 },
            NodeEvent::Refused(Refusal::new(RefusalCode::WrongSession, "no".into())),
            NodeEvent::Placed {
                upstream: Some(Some(NodeId(1))),
                downstreams: vec![NodeId(4)],
            },
            NodeEvent::Placed {
                upstream: Some(None),
                downstreams: vec![],
            },
            NodeEvent::Placed {
                upstream: None,
                downstreams: vec![],
            },
            NodeEvent::Receiving { from: 0 },
            NodeEvent::DownstreamEarly {
                node: NodeId(4),
                epoch: Epoch(1),
            },
            NodeEvent::UpstreamLost {
                reason: "reset".into(),
            },
            NodeEvent::Stranded {
                upstream: NodeId(1),
                from: 3,
                reason: "window".into(),
            },
            NodeEvent::SourceLost,
            NodeEvent::SourceUnproven {
                reason: "proof".into(),
            },
            NodeEvent::Verified {
                ok: true,
                reason: String::new(),
            },
            NodeEvent::Left {
                ok: true,
                reason: "released".into(),
            },
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for event in &events {
            let line = NodeEventLine {
                node: "a".into(),
                event: NodeLine::of(event),
            };
            let text = serde_json::to_string(&line).unwrap();
            assert!(!text.contains("Some("), "debug text in {text}");
            let back: NodeEventLine = serde_json::from_str(&text).unwrap();
            assert_eq!(back, line, "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            kinds.insert(v["event"].as_str().unwrap().to_string());
        }
        assert_eq!(kinds.len(), 12, "{kinds:?}");
        let placed = serde_json::to_string(&NodeLine::of(&events[3])).unwrap();
        assert_eq!(
            placed,
            r#"{"event":"placed","upstream":"node","upstream_id":1,"downstream_ids":[4]}"#
        );
    }

    #[test]
    fn an_unknown_mac_is_absent_not_zeros() {
        assert_eq!(mac_text([0; 6]), None);
        assert_eq!(
            mac_text([0x52, 0x54, 0, 0xa, 0, 1]).as_deref(),
            Some("52:54:00:0a:00:01")
        );
    }
}
