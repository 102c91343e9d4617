//! The source and node machines talking directly, message by message, with
//! no network in between: each test names one protocol scenario.

use core::net::SocketAddr;
use core::time::Duration;

use ka_core::auth::{join_proof, Mac};
use ka_core::codec::{
    Digest, ImageId, Join, Message, Nonce, Progress, RefusalCode, Tag, PROTOCOL_VERSION,
};
use ka_core::config::{NodeConfig, SlowPolicy, SourceConfig};
use ka_core::ids::{ConnId, NodeId};
use ka_core::node::{Node, NodeAction, NodeEvent, Phase};
use ka_core::source::{Source, SourceAction, SourceEvent, SourceState, StartTrigger};
use ka_core::time::Time;

struct Key(u8);

impl Mac for Key {
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

fn join_msg(name: &str, nonce: &Nonce, key: &dyn Mac) -> Message {
    Message::Join(Join {
        version: PROTOCOL_VERSION,
        session: "s".into(),
        name: name.into(),
        mac: [0; 6],
        data_addr: addr(100),
        wait_release: false,
        readable: true,
        have: 0,
        image: None,
        proof: join_proof(key, nonce, "s", name),
    })
}

/// Connects `conn` and joins `name` with `key`; returns what the source answered.
fn join(src: &mut Source, now: Time, conn: u64, name: &str, key: &dyn Mac) -> Vec<Message> {
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
            None,
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
                image: ImageId([3; 32]),
                resume_from: 0,
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

/// A welcomed node placed at `epoch` with `downstreams`, its outputs so far
/// drained.
fn placed_node(epoch: u64, downstreams: Vec<NodeId>) -> Node {
    let mut node = welcomed_node(None, 1, 0);
    node.handle_message(t(2), ConnId(1), topology(epoch, downstreams));
    sent(&mut node);
    actions(&mut node);
    node
}

fn topology(epoch: u64, downstreams: Vec<NodeId>) -> Message {
    Message::Topology {
        epoch: ka_core::ids::Epoch(epoch),
        upstream: Some(ka_core::codec::Upstream {
            node: None,
            addr: addr(1),
        }),
        downstreams,
    }
}

/// Node 9 connects to `node` on `conn` and asks for data as of `epoch`.
fn downstream_hello(node: &mut Node, now: Time, conn: u64, epoch: u64) {
    let nonce = Nonce([conn as u8; 32]);
    node.handle_connected(now, ConnId(conn), nonce);
    let proof = ka_core::auth::data_proof(
        &Key(1),
        &nonce,
        "s",
        NodeId(9),
        ka_core::ids::Epoch(epoch),
        0,
    );
    node.handle_message(
        now,
        ConnId(conn),
        Message::DataHello {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            node: NodeId(9),
            epoch: ka_core::ids::Epoch(epoch),
            from: 0,
            proof,
        },
    );
}

/// Whether `conn` was refused as not expected (and closed), accepted (and
/// served), or neither yet.
fn answer(node: &mut Node, conn: u64) -> &'static str {
    let msgs = sent(node);
    let acts = actions(node);
    let refused = msgs.iter().any(|(c, m)| {
        *c == ConnId(conn) && matches!(m, Message::Refused(r) if r.code == RefusalCode::NotExpected)
    });
    let accepted = msgs
        .iter()
        .any(|(c, m)| *c == ConnId(conn) && matches!(m, Message::DataAccepted { from: 0 }));
    let closed = acts.contains(&NodeAction::Close { conn: ConnId(conn) });
    let served = acts
        .iter()
        .any(|a| matches!(a, NodeAction::Serve { conn: c, .. } if *c == ConnId(conn)));
    match (refused && closed, accepted && served) {
        (true, false) => "refused",
        (false, true) => "accepted",
        (false, false) if !closed => "waiting",
        _ => {
            panic!("conn {conn} neither only refused, only accepted nor waiting: {msgs:?} {acts:?}")
        }
    }
}

#[test]
fn node_refuses_a_downstream_it_was_not_given() {
    // Placed at epoch 1 without node 9: a hello from 9 at epoch 1 is wrong.
    let mut node = placed_node(1, vec![NodeId(4)]);
    downstream_hello(&mut node, t(3), 5, 1);
    assert_eq!(answer(&mut node, 5), "refused");
}

#[test]
fn node_holds_a_downstream_that_arrives_before_its_own_placement() {
    // The source placed 9 after us at epoch 2 and told both; 9's hello got
    // here before our placement did. Refusing it would cost a reconnect
    // delay that the whole chain behind 9 would carry to the end.
    let mut node = placed_node(1, vec![]);
    downstream_hello(&mut node, t(3), 5, 2);
    assert_eq!(answer(&mut node, 5), "waiting");
    node.handle_message(t(4), ConnId(1), topology(2, vec![NodeId(9)]));
    assert_eq!(answer(&mut node, 5), "accepted");
}

#[test]
fn a_node_that_lost_its_source_holds_a_downstream_the_new_source_placed() {
    // A restarted source numbers its placements from 1 again; a node that
    // lost the old one must not take the new epoch 1 for its own old one.
    let mut node = placed_node(1, vec![]);
    node.handle_closed(t(3), ConnId(1));
    actions(&mut node);
    downstream_hello(&mut node, t(4), 5, 1);
    assert_eq!(answer(&mut node, 5), "waiting");
}

#[test]
fn an_early_downstream_the_source_never_confirms_is_refused_in_time() {
    let mut node = placed_node(1, vec![]);
    downstream_hello(&mut node, t(3), 5, 2);
    assert_eq!(answer(&mut node, 5), "waiting");
    // A placement at epoch 2 without 9 settles it at once.
    downstream_hello(&mut node, t(3), 6, 3);
    node.handle_message(t(4), ConnId(1), topology(2, vec![NodeId(4)]));
    assert_eq!(answer(&mut node, 5), "refused");
    assert_eq!(answer(&mut node, 6), "waiting");
    // No placement at epoch 3 ever comes: refused once `dead_after` (1 s
    // in the welcome) has passed since its hello, not before.
    node.handle_timeout(t(900));
    assert_eq!(answer(&mut node, 6), "waiting");
    node.handle_timeout(t(3 + 1000));
    assert_eq!(answer(&mut node, 6), "refused");
}

#[test]
fn a_node_that_restarts_from_nothing_mid_stream_goes_after_one_that_holds_more() {
    let mut src = source(2);
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    src.handle_message(t(1), ConnId(1), progress(500));
    src.handle_message(t(1), ConnId(2), progress(200));
    // b restarts holding nothing: a serves from what it wrote, so b goes
    // after it and is not refused.
    src.handle_closed(t(2), ConnId(2));
    let answers = join(&mut src, t(3), 3, "b", &Key(1));
    assert_eq!(refusal(&answers), None);
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(1))));
}

fn progress(received: u64) -> Message {
    Message::Progress(Progress {
        received,
        written: received,
        holds_from: 0,
    })
}

/// Joins `name` holding `have` bytes of `image`; returns the source's answers.
fn join_holding(
    src: &mut Source,
    now: Time,
    conn: u64,
    name: &str,
    have: u64,
    image: ImageId,
) -> Vec<Message> {
    let nonce = Nonce([conn as u8; 32]);
    src.handle_connected(now, ConnId(conn), nonce);
    let Message::Join(mut j) = join_msg(name, &nonce, &Key(1)) else {
        unreachable!()
    };
    j.have = have;
    j.image = Some(image);
    src.handle_message(now, ConnId(conn), Message::Join(j));
    drain(src)
        .into_iter()
        .filter(|(c, _)| *c == ConnId(conn))
        .map(|(_, m)| m)
        .collect()
}

fn resume_from(answers: &[Message]) -> Option<u64> {
    answers.iter().find_map(|m| match m {
        Message::Welcome { resume_from, .. } => Some(*resume_from),
        _ => None,
    })
}

const IMAGE: ImageId = ImageId([7; 32]);

fn file_source(n: u32, size: u64) -> Source {
    let mut cfg = SourceConfig::new("s", n, addr(1));
    cfg.image_size = Some(size);
    cfg.image_id = IMAGE;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, size);
    src
}

#[test]
fn restarted_source_resumes_each_node_from_its_prefix_holding_most_first() {
    // A fresh source process on the same image: the nodes come back holding
    // different prefixes.
    let mut src = file_source(3, 1000);
    assert_eq!(
        resume_from(&join_holding(&mut src, t(1), 1, "a", 300, IMAGE)),
        Some(300)
    );
    assert_eq!(
        resume_from(&join_holding(&mut src, t(2), 2, "b", 600, IMAGE)),
        Some(600)
    );
    assert_eq!(
        resume_from(&join_holding(&mut src, t(3), 3, "c", 0, IMAGE)),
        Some(0)
    );
    assert_eq!(src.state(), SourceState::Streaming);
    // source -> b (600) -> a (300) -> c (0): every upstream holds what its
    // downstream lacks.
    let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
    assert_eq!(src.topology().children(None), &[b]);
    assert_eq!(src.topology().children(Some(b)), &[a]);
    assert_eq!(src.topology().children(Some(a)), &[c]);
    // The source serves b only what it lacks.
    let nonce = Nonce([40; 32]);
    src.handle_connected(t(4), ConnId(40), nonce);
    let epoch = src.epoch();
    let proof = ka_core::auth::data_proof(&Key(1), &nonce, "s", b, epoch, 600);
    src.handle_message(
        t(4),
        ConnId(40),
        Message::DataHello {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            node: b,
            epoch,
            from: 600,
            proof,
        },
    );
    let actions: Vec<SourceAction> = std::iter::from_fn(|| src.poll_action()).collect();
    assert!(actions.contains(&SourceAction::Serve {
        conn: ConnId(40),
        node: b,
        from: 600
    }));
    let report = src.report();
    let resumed: Vec<u64> = report.iter().map(|r| r.resumed_from).collect();
    assert_eq!(resumed, vec![300, 600, 0]);
}

#[test]
fn a_prefix_of_another_image_is_not_resumed() {
    let mut src = file_source(2, 1000);
    let answers = join_holding(&mut src, t(1), 1, "a", 500, ImageId([8; 32]));
    assert_eq!(resume_from(&answers), Some(0));
    assert!(events(&mut src).iter().any(|e| matches!(
        e,
        SourceEvent::Joined {
            resumed_from: 0,
            discarded: 500,
            ..
        }
    )));
    // A prefix longer than the image cannot be of it either.
    assert_eq!(
        resume_from(&join_holding(&mut src, t(2), 2, "b", 5000, IMAGE)),
        Some(0)
    );
}

/// A node that was welcomed on `conn` (image [`IMAGE`]) and told `epoch`.
fn welcomed_node(resume: Option<ka_core::node::Resume>, conn: u64, resume_from: u64) -> Node {
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        Box::new(Key(1)),
        resume,
    );
    node.handle_source_connected(t(1), ConnId(conn));
    node.handle_message(
        t(1),
        ConnId(conn),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    node.handle_message(
        t(1),
        ConnId(conn),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from,
        },
    );
    node
}

fn sent(node: &mut Node) -> Vec<(ConnId, Message)> {
    std::iter::from_fn(|| node.poll_transmit()).collect()
}

fn actions(node: &mut Node) -> Vec<NodeAction> {
    std::iter::from_fn(|| node.poll_action()).collect()
}

#[test]
fn restarted_node_resumes_from_its_durable_prefix() {
    let resume = ka_core::node::Resume {
        image: IMAGE,
        have: 400,
    };
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        Box::new(Key(1)),
        Some(resume),
    );
    node.handle_source_connected(t(1), ConnId(1));
    node.handle_message(
        t(1),
        ConnId(1),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    let join = sent(&mut node)
        .into_iter()
        .find_map(|(_, m)| match m {
            Message::Join(j) => Some(j),
            _ => None,
        })
        .expect("a join");
    assert_eq!((join.have, join.image), (400, Some(IMAGE)));
    node.handle_message(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 400,
        },
    );
    assert!(!actions(&mut node).contains(&NodeAction::StartOver));
    assert_eq!(node.received().prefix_end(), 400);
}

#[test]
fn node_holding_another_image_starts_over() {
    let resume = ka_core::node::Resume {
        image: ImageId([8; 32]),
        have: 400,
    };
    let mut node = welcomed_node(Some(resume), 1, 0);
    let evs: Vec<NodeEvent> = std::iter::from_fn(|| node.poll_event()).collect();
    assert!(
        evs.contains(&NodeEvent::StartedOver { had: 400 }),
        "{evs:?}"
    );
    assert!(actions(&mut node).contains(&NodeAction::StartOver));
    assert_eq!(node.received().prefix_end(), 0);
    assert_eq!(node.image_id(), Some(IMAGE));
}

#[test]
fn node_that_loses_its_source_leaves_the_chain_keeps_its_copy_and_rejoins() {
    let mut node = welcomed_node(None, 1, 0);
    // Placed at a late epoch, fed by node 5, feeding node 9.
    node.handle_message(
        t(2),
        ConnId(1),
        Message::Topology {
            epoch: ka_core::ids::Epoch(50),
            upstream: Some(ka_core::codec::Upstream {
                node: Some(NodeId(5)),
                addr: addr(5),
            }),
            downstreams: vec![NodeId(9)],
        },
    );
    assert!(actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })));
    node.handle_upstream_connected(t(3), ConnId(2));
    node.handle_message(
        t(3),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([1; 32]),
        },
    );
    node.handle_message(t(3), ConnId(2), Message::DataAccepted { from: 0 });
    node.handle_connected(t(3), ConnId(3), Nonce([2; 32]));
    let proof = ka_core::auth::data_proof(
        &Key(1),
        &Nonce([2; 32]),
        "s",
        NodeId(9),
        ka_core::ids::Epoch(50),
        0,
    );
    node.handle_message(
        t(3),
        ConnId(3),
        Message::DataHello {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            node: NodeId(9),
            epoch: ka_core::ids::Epoch(50),
            from: 0,
            proof,
        },
    );
    sent(&mut node);
    actions(&mut node);
    node.handle_progress(
        t(4),
        Progress {
            received: 400,
            written: 400,
            holds_from: 0,
        },
    );
    // The source process dies: its connection resets.
    node.handle_closed(t(5), ConnId(1));
    let closed = actions(&mut node);
    assert!(closed.contains(&NodeAction::Close { conn: ConnId(2) }));
    assert!(closed.contains(&NodeAction::Close { conn: ConnId(3) }));
    assert_eq!(node.upstream(), None);
    assert_eq!(node.downstreams().count(), 0);
    assert_eq!(node.phase(), &Phase::AwaitingImage, "the node goes on");
    // It keeps trying, quietly, and comes back with what it holds.
    node.handle_timeout(t(205));
    assert!(actions(&mut node).contains(&NodeAction::ConnectSource));
    node.handle_source_connected(t(2000), ConnId(10));
    node.handle_message(
        t(2000),
        ConnId(10),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([3; 32]),
        },
    );
    let join = sent(&mut node)
        .into_iter()
        .find_map(|(_, m)| match m {
            Message::Join(j) => Some(j),
            _ => None,
        })
        .expect("a join");
    assert_eq!((join.have, join.image), (400, Some(IMAGE)));
    node.handle_message(
        t(2000),
        ConnId(10),
        Message::Welcome {
            node: NodeId(3),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 400,
        },
    );
    // The new source's generations start again at 1: they must be obeyed.
    node.handle_message(
        t(2001),
        ConnId(10),
        Message::Topology {
            epoch: ka_core::ids::Epoch(1),
            upstream: Some(ka_core::codec::Upstream {
                node: None,
                addr: addr(1),
            }),
            downstreams: vec![],
        },
    );
    assert!(actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })));
    node.handle_upstream_connected(t(2002), ConnId(11));
    node.handle_message(
        t(2002),
        ConnId(11),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([4; 32]),
        },
    );
    assert!(sent(&mut node)
        .iter()
        .any(|(c, m)| *c == ConnId(11) && matches!(m, Message::DataHello { from: 400, .. })));
}

#[test]
fn verified_node_tells_a_restarted_source_its_verdict() {
    let mut node = welcomed_node(None, 1, 0);
    node.handle_message(
        t(2),
        ConnId(1),
        Message::ImageDone {
            total: 1000,
            digest: Digest([5; 32]),
        },
    );
    node.handle_stream_end(t(3), 1000, Digest([5; 32]));
    assert_eq!(node.phase(), &Phase::AwaitingRelease);
    node.handle_closed(t(4), ConnId(1));
    node.handle_timeout(t(300));
    node.handle_source_connected(t(300), ConnId(2));
    node.handle_message(
        t(300),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([3; 32]),
        },
    );
    node.handle_message(
        t(300),
        ConnId(2),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 1000,
        },
    );
    assert!(sent(&mut node)
        .iter()
        .any(|(c, m)| *c == ConnId(2) && matches!(m, Message::Verified { ok: true, .. })));
}

#[test]
fn node_gives_up_when_the_source_stays_away() {
    let mut cfg = NodeConfig::new("s", "a", addr(2));
    cfg.source_wait = Duration::from_secs(2);
    let mut node = Node::new(Time::ZERO, cfg, Box::new(Key(1)), None);
    node.handle_source_connected(t(1), ConnId(1));
    node.handle_message(
        t(1),
        ConnId(1),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    node.handle_message(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 0,
        },
    );
    // Joined: the wait does not run.
    node.handle_timeout(t(3000));
    assert_ne!(node.phase(), &Phase::Done);
    node.handle_closed(t(3000), ConnId(1));
    let mut now = 3000;
    while node.phase() != &Phase::Done && now < 10_000 {
        now += 100;
        node.handle_timeout(t(now));
        for a in actions(&mut node) {
            if a == NodeAction::ConnectSource {
                node.handle_connect_failed(t(now), true, "refused".into());
            }
        }
    }
    assert!((5000..=5100).contains(&now), "gave up at {now} ms");
    let evs: Vec<NodeEvent> = std::iter::from_fn(|| node.poll_event()).collect();
    assert!(evs.iter().any(|e| matches!(e, NodeEvent::Left { ok: false, reason } if reason.contains("did not come back"))), "{evs:?}");
}

#[test]
fn nodes_verified_before_a_restart_count_and_are_reported() {
    let mut src = file_source(3, 1000);
    src.handle_restored(Time::ZERO, "x".into(), [1; 6], Ok(()));
    join_holding(&mut src, t(1), 1, "a", 0, IMAGE);
    assert_eq!(src.state(), SourceState::AwaitingNodes);
    join_holding(&mut src, t(1), 2, "b", 0, IMAGE);
    assert_eq!(src.state(), SourceState::Streaming, "x counts towards 3");
    assert_eq!(src.topology().len(), 2, "x is not placed");
    let x = src.report().into_iter().find(|r| r.name == "x").unwrap();
    assert!(x.is_ok() && x.restored);
    // If x does come back, its join replaces the restored line.
    let mut src = file_source(2, 1000);
    src.handle_restored(Time::ZERO, "x".into(), [1; 6], Ok(()));
    join_holding(&mut src, t(1), 1, "x", 1000, IMAGE);
    let x = src.report().into_iter().find(|r| r.name == "x").unwrap();
    assert!(!x.restored && x.outcome.is_none());
    assert_eq!(src.report().len(), 1);
}

/// Drives progress reports until a Slow event or 10 steps; returns the events.
fn drive_progress(
    src: &mut Source,
    mut each_step: impl FnMut(&mut Source, u64, Time),
) -> Vec<SourceEvent> {
    let mut evs = Vec::new();
    for step in 1..=10u64 {
        let now = t(step * 250);
        each_step(src, step, now);
        src.handle_timeout(now);
        evs.extend(events(src));
        if evs.iter().any(|e| matches!(e, SourceEvent::Slow { .. })) {
            break;
        }
    }
    evs
}

#[test]
fn slow_child_of_the_source_is_judged_against_its_sibling() {
    let mut cfg = SourceConfig::new("s", 2, addr(1));
    cfg.arity = 2;
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    cfg.image_size = Some(10_000_000);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, 10_000_000);
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    assert_eq!(src.topology().children(None), &[NodeId(1), NodeId(2)]);
    let evs = drive_progress(&mut src, |src, step, now| {
        src.handle_message(now, ConnId(1), progress(step * 100_000));
        src.handle_message(now, ConnId(2), progress(step * 10));
    });
    assert!(
        evs.contains(&SourceEvent::Slow {
            node: NodeId(2),
            policy: SlowPolicy::MoveToTail
        }),
        "{evs:?}"
    );
    assert!(!evs.iter().any(|e| matches!(
        e,
        SourceEvent::Slow {
            node: NodeId(1),
            ..
        }
    )));
}

#[test]
fn slow_child_of_the_source_is_judged_anew_when_its_fastest_sibling_leaves() {
    let mut cfg = SourceConfig::new("s", 3, addr(1));
    cfg.arity = 3;
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    cfg.image_size = Some(10_000_000);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, 10_000_000);
    for (conn, name) in [(1, "a"), (2, "b"), (3, "c")] {
        join(&mut src, Time::ZERO, conn, name, &Key(1));
    }
    let evs = drive_progress(&mut src, |src, step, now| {
        // a runs far ahead, verifies and leaves; c is then judged against
        // b, which is behind where a was.
        if step == 1 {
            src.handle_message(now, ConnId(1), progress(5_000_000));
        } else if step == 2 {
            let verified = Message::Verified {
                ok: true,
                reason: String::new(),
            };
            src.handle_message(now, ConnId(1), verified);
        }
        src.handle_message(now, ConnId(2), progress(step * 100_000));
        src.handle_message(now, ConnId(3), progress(step * 10));
    });
    assert!(evs.contains(&SourceEvent::Released { node: NodeId(1) }));
    assert!(
        evs.contains(&SourceEvent::Slow {
            node: NodeId(3),
            policy: SlowPolicy::MoveToTail
        }),
        "{evs:?}"
    );
}

#[test]
fn slow_child_of_a_stream_source_is_judged_against_the_spool() {
    let mut cfg = SourceConfig::new("s", 1, addr(1));
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    let evs = drive_progress(&mut src, |src, step, now| {
        src.handle_image_progress(now, step * 100_000);
        src.handle_message(now, ConnId(1), progress(step * 10));
    });
    assert!(
        evs.contains(&SourceEvent::Slow {
            node: NodeId(1),
            policy: SlowPolicy::MoveToTail
        }),
        "{evs:?}"
    );
}

#[test]
fn a_node_restored_as_failed_is_waited_for_and_may_come_back() {
    // Before the restart b had been declared dead (frozen, say); a had verified.
    let mut src = file_source(2, 1000);
    src.handle_restored(Time::ZERO, "a".into(), [1; 6], Ok(()));
    src.handle_restored(
        Time::ZERO,
        "b".into(),
        [2; 6],
        Err("no heartbeat for 1.0 s".into()),
    );
    assert_eq!(src.state(), SourceState::AwaitingNodes, "b may come back");
    let answers = join_holding(&mut src, t(1), 1, "c", 0, IMAGE);
    assert_eq!(
        refusal(&answers),
        Some(RefusalCode::SessionFull),
        "b's place is kept for b"
    );
    assert_eq!(
        resume_from(&join_holding(&mut src, t(2), 2, "b", 600, IMAGE)),
        Some(600)
    );
    assert_eq!(src.state(), SourceState::Streaming);
    let report = src.report();
    let b = report.iter().find(|r| r.name == "b").unwrap();
    assert!(b.outcome.is_none() && !b.restored);
    assert!(report.iter().find(|r| r.name == "a").unwrap().is_ok());
    // Every node verified before the restart: nothing left to do.
    let mut src = file_source(2, 1000);
    src.handle_restored(Time::ZERO, "a".into(), [1; 6], Ok(()));
    src.handle_restored(Time::ZERO, "b".into(), [2; 6], Ok(()));
    assert_eq!(src.state(), SourceState::Finished);
    assert!(src.report().iter().all(|r| r.is_ok()));
}

#[test]
fn a_node_lost_before_the_start_is_reported_failed_unless_it_comes_back() {
    let mut src = source(4);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    src.handle_closed(t(10), ConnId(2));
    src.handle_closed(t(10), ConnId(3));
    assert!(events(&mut src).iter().any(|e| matches!(
        e,
        SourceEvent::Dead {
            node: NodeId(2),
            ..
        }
    )));
    // c comes back before the start; b does not.
    join(&mut src, t(20), 4, "c", &Key(1));
    src.handle_go(t(30));
    assert_eq!(src.state(), SourceState::Streaming);
    assert!(!src.topology().contains(NodeId(2)));
    let report = src.report();
    let names: Vec<&str> = report.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "one line per node, in id order");
    let b = &report[1];
    assert!(
        matches!(&b.outcome, Some(Err(e)) if e.contains("lost before the start")),
        "{b:?}"
    );
    assert_eq!(b.deaths, 1);
    assert_eq!(report[2].outcome, None, "c came back and is in the session");
}

#[test]
fn a_stalled_source_does_not_declare_its_nodes_dead_but_still_finds_the_silent_one() {
    let mut src = source(3);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    events(&mut src);
    let hear = |src: &mut Source, ms: u64, conns: &[u64]| {
        for &c in conns {
            src.handle_message(t(ms), ConnId(c), Message::Progress(Progress::default()));
        }
    };
    for ms in (250..=1000).step_by(250) {
        hear(&mut src, ms, &[1, 2, 3]);
        src.handle_timeout(t(ms));
    }
    // The source does not run for 3 s (SIGSTOP, a starved machine): its
    // next tick comes late, before the nodes' buffered messages are read.
    src.handle_timeout(t(4000));
    let dead = |evs: &[SourceEvent]| {
        evs.iter()
            .filter_map(|e| match e {
                SourceEvent::Dead { node, .. } => Some(*node),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        dead(&events(&mut src)),
        [],
        "a stall is not the nodes' silence"
    );
    // From then on b stays silent: it alone is declared dead, once it has
    // been silent for dead_after of the source's waking time.
    let mut b_dead_at = None;
    for ms in (4000..=6000).step_by(250) {
        hear(&mut src, ms, &[1, 3]);
        src.handle_timeout(t(ms));
        let d = dead(&events(&mut src));
        if !d.is_empty() {
            assert_eq!(d, [NodeId(2)]);
            b_dead_at.get_or_insert(ms);
        }
    }
    let at = b_dead_at.expect("the silent node is still found");
    assert!((4750..=5250).contains(&at), "b declared dead at {at} ms");
    assert!(src.is_live(NodeId(1)) && src.is_live(NodeId(3)));
}

#[test]
fn a_stalled_node_does_not_take_its_own_stall_for_the_sources_silence() {
    let mut node = welcomed_node(None, 1, 0);
    actions(&mut node);
    let closes = |acts: Vec<NodeAction>| {
        acts.iter()
            .any(|a| matches!(a, NodeAction::Close { conn } if *conn == ConnId(1)))
    };
    // The node's process does not run from 1 ms to 4 s; the source's
    // heartbeats wait unread in its socket.
    node.handle_timeout(t(4000));
    assert!(
        !closes(actions(&mut node)),
        "the stall was taken for silence"
    );
    // The source really is silent from then on: lost once what it may have
    // sent during the stall had a heartbeat (250 ms) to arrive.
    let mut lost_at = None;
    for ms in (4050..=6000).step_by(50) {
        node.handle_timeout(t(ms));
        if closes(actions(&mut node)) {
            lost_at.get_or_insert(ms);
        }
    }
    let at = lost_at.expect("a silent source is still noticed");
    assert!((4250..=4300).contains(&at), "source lost at {at} ms");
}
