//! The source and node machines talking directly, message by message, with
//! no network in between: each test names one protocol scenario.

use core::net::SocketAddr;
use core::time::Duration;

use ka_core::auth::{join_proof, SessionKey};
use ka_core::codec::{Digest, Join, Message, Nonce, Progress, RefusalCode, Tag, PROTOCOL_VERSION};
use ka_core::config::{NodeConfig, SlowPolicy, SourceConfig};
use ka_core::ids::{ConnId, NodeId};
use ka_core::node::{Node, NodeAction, Phase};
use ka_core::source::{Source, SourceAction, SourceEvent, SourceState, StartTrigger};
use ka_core::time::Time;

struct Key(u8);

impl SessionKey for Key {
    fn mac(&self, message: &[u8]) -> Tag {
        let mut t = [self.0; 32];
        for (i, b) in message.iter().enumerate() {
            t[i % 32] = t[i % 32].wrapping_mul(31).wrapping_add(*b);
        }
        Tag(t)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

fn t(ms: u64) -> Time {
    Time::from_nanos(ms * 1_000_000)
}

fn source(n: u32) -> Source {
    Source::new(
        Time::ZERO,
        SourceConfig::new("s", n, addr(1)),
        Box::new(Key(1)),
    )
}

fn join_msg(name: &str, nonce: &Nonce, key: &dyn SessionKey) -> Message {
    Message::Join(Join {
        version: PROTOCOL_VERSION,
        session: "s".into(),
        name: name.into(),
        mac: [0; 6],
        data_addr: addr(100),
        wait_release: false,
        readable: true,
        have: 0,
        proof: join_proof(key, nonce, "s", name),
    })
}

/// Connects `conn` and joins `name` with `key`; returns what the source answered.
fn join(src: &mut Source, now: Time, conn: u64, name: &str, key: &dyn SessionKey) -> Vec<Message> {
    let nonce = Nonce([conn as u8; 32]);
    src.handle_connected(now, ConnId(conn), nonce);
    src.handle_message(now, ConnId(conn), join_msg(name, &nonce, key));
    drain(src)
        .into_iter()
        .filter(|(c, _)| *c == ConnId(conn))
        .map(|(_, m)| m)
        .collect()
}

fn drain(src: &mut Source) -> Vec<(ConnId, Message)> {
    std::iter::from_fn(|| src.poll_transmit()).collect()
}

fn events(src: &mut Source) -> Vec<SourceEvent> {
    std::iter::from_fn(|| src.poll_event()).collect()
}

fn refusal(answers: &[Message]) -> Option<RefusalCode> {
    answers.iter().find_map(|m| match m {
        Message::Refused(r) => Some(r.code),
        _ => None,
    })
}

#[test]
fn wrong_secret_is_refused_with_a_reason() {
    let mut src = source(2);
    let answers = join(&mut src, Time::ZERO, 1, "a", &Key(9));
    assert_eq!(refusal(&answers), Some(RefusalCode::BadProof));
    assert!(src.report().is_empty(), "a stranger must not get a place");
}

#[test]
fn wrong_session_and_version_are_refused() {
    let mut src = source(2);
    let nonce = Nonce([3; 32]);
    src.handle_connected(Time::ZERO, ConnId(1), nonce);
    let Message::Join(mut j) = join_msg("a", &nonce, &Key(1)) else {
        unreachable!()
    };
    j.version = PROTOCOL_VERSION + 1;
    src.handle_message(Time::ZERO, ConnId(1), Message::Join(j.clone()));
    assert_eq!(
        refusal(&drain(&mut src).into_iter().map(|x| x.1).collect::<Vec<_>>()),
        Some(RefusalCode::VersionMismatch)
    );
    src.handle_connected(Time::ZERO, ConnId(2), nonce);
    j.version = PROTOCOL_VERSION;
    j.session = "other".into();
    src.handle_message(Time::ZERO, ConnId(2), Message::Join(j));
    let answers: Vec<Message> = drain(&mut src).into_iter().map(|x| x.1).collect();
    assert_eq!(refusal(&answers), Some(RefusalCode::WrongSession));
}

#[test]
fn starts_when_all_joined_and_refuses_the_next_one() {
    let mut src = source(2);
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    assert_eq!(src.state(), SourceState::AwaitingNodes);
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    assert_eq!(src.state(), SourceState::Streaming);
    assert!(events(&mut src).contains(&SourceEvent::Started {
        nodes: 2,
        trigger: StartTrigger::AllJoined
    }));
    let answers = join(&mut src, Time::ZERO, 3, "c", &Key(1));
    assert_eq!(refusal(&answers), Some(RefusalCode::SessionFull));
}

#[test]
fn go_starts_with_the_nodes_present() {
    let mut src = source(5);
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    src.handle_go(t(10));
    assert_eq!(src.state(), SourceState::Streaming);
    assert!(src.topology().contains(NodeId(1)));
}

#[test]
fn join_deadline_starts_with_enough_nodes_or_aborts() {
    let mut cfg = SourceConfig::new("s", 5, addr(1));
    cfg.join_timeout = Some(Duration::from_secs(10));
    cfg.min_nodes = 2;
    let mut src = Source::new(Time::ZERO, cfg.clone(), Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    src.handle_message(t(9_900), ConnId(1), Message::Progress(Progress::default()));
    src.handle_timeout(t(10_000));
    assert_eq!(src.state(), SourceState::Aborted);
    assert!(matches!(src.report()[0].outcome, Some(Err(ref e)) if e.contains("join deadline")));

    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    for c in [1, 2] {
        src.handle_message(t(9_900), ConnId(c), Message::Progress(Progress::default()));
    }
    src.handle_timeout(t(10_000));
    assert_eq!(src.state(), SourceState::Streaming);
    assert!(events(&mut src).contains(&SourceEvent::Started {
        nodes: 2,
        trigger: StartTrigger::Deadline
    }));
}

#[test]
fn chain_follows_inventory_order() {
    let mut cfg = SourceConfig::new("s", 3, addr(1));
    cfg.order = vec!["c".into(), "a".into(), "b".into()];
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    // ids follow join order: a=1, b=2, c=3; the chain follows the inventory.
    let topo = src.topology();
    assert_eq!(topo.children(None), &[NodeId(3)]);
    assert_eq!(topo.children(Some(NodeId(3))), &[NodeId(1)]);
    assert_eq!(topo.children(Some(NodeId(1))), &[NodeId(2)]);
}

#[test]
fn silent_node_is_declared_dead_and_its_downstream_relinked() {
    let mut src = source(3);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    events(&mut src);
    // a and c keep reporting; b goes silent.
    for ms in (250..=1500).step_by(250) {
        for c in [1, 3] {
            src.handle_message(t(ms), ConnId(c), Message::Progress(Progress::default()));
        }
        src.handle_timeout(t(ms));
    }
    let evs = events(&mut src);
    assert!(evs.iter().any(|e| matches!(e, SourceEvent::Dead { node: NodeId(2), reason } if reason.contains("no heartbeat"))));
    assert_eq!(src.topology().parent(NodeId(3)), Some(Some(NodeId(1))));
    // c was told its new upstream.
    let sent = drain(&mut src);
    assert!(sent.iter().any(|(c, m)| *c == ConnId(3)
        && matches!(m, Message::Topology { upstream: Some(u), .. } if u.node == Some(NodeId(1)))));
}

#[test]
fn dead_node_rejoins_at_the_tail_and_keeps_its_identity() {
    let mut src = source(3);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    src.handle_closed(t(5), ConnId(2));
    let answers = join(&mut src, t(50), 7, "b", &Key(1));
    assert!(answers.iter().any(|m| matches!(
        m,
        Message::Welcome {
            node: NodeId(2),
            ..
        }
    )));
    assert_eq!(
        src.topology().parent(NodeId(2)),
        Some(Some(NodeId(3))),
        "tail of a -> c"
    );
    let b = src.report().into_iter().find(|r| r.name == "b").unwrap();
    assert_eq!((b.deaths, b.outcome), (1, None));
}

#[test]
fn slow_node_is_moved_to_the_tail_and_reported() {
    let mut cfg = SourceConfig::new("s", 3, addr(1));
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    cfg.slow_policy = SlowPolicy::MoveToTail;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    // a races ahead, b crawls, c is stuck behind b.
    let mut evs = Vec::new();
    for step in 1..=10u64 {
        let now = t(step * 250);
        src.handle_message(
            now,
            ConnId(1),
            Message::Progress(Progress {
                received: step * 100_000,
                written: 0,
                holds_from: 0,
            }),
        );
        src.handle_message(
            now,
            ConnId(2),
            Message::Progress(Progress {
                received: step * 10,
                written: 0,
                holds_from: 0,
            }),
        );
        src.handle_message(
            now,
            ConnId(3),
            Message::Progress(Progress {
                received: step * 10,
                written: 0,
                holds_from: 0,
            }),
        );
        src.handle_timeout(now);
        evs.extend(events(&mut src));
        if evs.iter().any(|e| matches!(e, SourceEvent::Slow { .. })) {
            break;
        }
    }
    assert!(
        evs.contains(&SourceEvent::Slow {
            node: NodeId(2),
            policy: SlowPolicy::MoveToTail
        }),
        "{evs:?}"
    );
    assert_eq!(src.topology().parent(NodeId(3)), Some(Some(NodeId(1))));
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(3))));
    assert!(
        !evs.iter().any(|e| matches!(
            e,
            SourceEvent::Slow {
                node: NodeId(3),
                ..
            }
        )),
        "c only lagged behind b"
    );
}

#[test]
fn releases_wait_for_the_session_and_are_paced() {
    let mut cfg = SourceConfig::new("s", 2, addr(1));
    cfg.release_delay = Duration::from_secs(2);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    for (i, n) in ["a", "b"].iter().enumerate() {
        let nonce = Nonce([9; 32]);
        src.handle_connected(Time::ZERO, ConnId(i as u64 + 1), nonce);
        let Message::Join(mut j) = join_msg(n, &nonce, &Key(1)) else {
            unreachable!()
        };
        j.wait_release = true;
        src.handle_message(Time::ZERO, ConnId(i as u64 + 1), Message::Join(j));
    }
    src.handle_image_done(t(100), 10, Digest([1; 32]));
    src.handle_message(
        t(110),
        ConnId(1),
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
    );
    src.handle_message(
        t(120),
        ConnId(2),
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
    );
    let released = |src: &mut Source| {
        drain(src)
            .into_iter()
            .filter(|(_, m)| *m == Message::Release)
            .count()
    };
    assert_eq!(released(&mut src), 1, "first release at once");
    src.handle_timeout(t(1000));
    assert_eq!(released(&mut src), 0, "the second waits for the delay");
    src.handle_message(t(2000), ConnId(2), Message::Progress(Progress::default()));
    src.handle_timeout(t(2120));
    assert_eq!(released(&mut src), 1);
    assert_eq!(src.state(), SourceState::Finished);
    assert!(src.report().iter().all(|r| r.is_ok()));
}

#[test]
fn node_verifies_only_when_its_digest_matches() {
    for (theirs, ok) in [(Digest([5; 32]), true), (Digest([6; 32]), false)] {
        let mut node = Node::new(
            Time::ZERO,
            NodeConfig::new("s", "a", addr(2)),
            Box::new(Key(1)),
            0,
        );
        assert_eq!(node.poll_action(), Some(NodeAction::ConnectSource));
        node.handle_source_connected(Time::ZERO, ConnId(1));
        node.handle_message(
            Time::ZERO,
            ConnId(1),
            Message::Challenge {
                version: PROTOCOL_VERSION,
                nonce: Nonce([0; 32]),
            },
        );
        node.handle_message(
            Time::ZERO,
            ConnId(1),
            Message::Welcome {
                node: NodeId(1),
                heartbeat_ms: 250,
                dead_after_ms: 1000,
                image_size: None,
            },
        );
        node.handle_message(
            t(1),
            ConnId(1),
            Message::ImageDone {
                total: 10,
                digest: Digest([5; 32]),
            },
        );
        node.handle_stream_end(t(2), 10, theirs);
        assert_eq!(node.verdict().map(|v| v.is_ok()), Some(ok));
        assert_eq!(node.phase(), &Phase::AwaitingRelease);
        let sent: Vec<Message> = std::iter::from_fn(|| node.poll_transmit())
            .map(|x| x.1)
            .collect();
        assert!(sent
            .iter()
            .any(|m| matches!(m, Message::Verified { ok: o, .. } if *o == ok)));
    }
}

#[test]
fn node_refuses_a_downstream_it_was_not_given() {
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        Box::new(Key(1)),
        0,
    );
    node.handle_connected(Time::ZERO, ConnId(5), Nonce([1; 32]));
    let proof = ka_core::auth::data_proof(
        &Key(1),
        &Nonce([1; 32]),
        "s",
        NodeId(9),
        ka_core::ids::Epoch(1),
        0,
    );
    node.handle_message(
        Time::ZERO,
        ConnId(5),
        Message::DataHello {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            node: NodeId(9),
            epoch: ka_core::ids::Epoch(1),
            from: 0,
            proof,
        },
    );
    let sent: Vec<Message> = std::iter::from_fn(|| node.poll_transmit())
        .map(|x| x.1)
        .collect();
    assert!(sent
        .iter()
        .any(|m| matches!(m, Message::Refused(r) if r.code == RefusalCode::NotExpected)));
    let actions: Vec<NodeAction> = std::iter::from_fn(|| node.poll_action()).collect();
    assert!(actions.contains(&NodeAction::Close { conn: ConnId(5) }));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, NodeAction::Serve { .. })));
}

#[test]
fn source_history_is_trimmed_only_below_the_slowest_live_node() {
    let mut cfg = SourceConfig::new("s", 2, addr(1));
    cfg.seekable = false;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    std::iter::from_fn(|| src.poll_action()).for_each(drop);
    src.handle_message(
        t(1),
        ConnId(1),
        Message::Progress(Progress {
            received: 500,
            written: 500,
            holds_from: 0,
        }),
    );
    src.handle_message(
        t(1),
        ConnId(2),
        Message::Progress(Progress {
            received: 200,
            written: 200,
            holds_from: 0,
        }),
    );
    let trims: Vec<u64> = std::iter::from_fn(|| src.poll_action())
        .filter_map(|a| match a {
            SourceAction::TrimHistory { below } => Some(below),
            _ => None,
        })
        .collect();
    assert_eq!(trims, vec![200]);
    assert_eq!(src.history_low(), 200);
    // b restarts from nothing: the source no longer holds offset 0, but a
    // writes to a readable sink and holds everything, so b goes after a.
    src.handle_closed(t(2), ConnId(2));
    let answers = join(&mut src, t(3), 3, "b", &Key(1));
    assert_eq!(refusal(&answers), None);
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(1))));
}
