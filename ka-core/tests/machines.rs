//! The source and node machines talking directly, message by message, with
//! no network in between: each test names one protocol scenario.

use core::net::SocketAddr;
use core::time::Duration;

use std::cell::RefCell;
use std::collections::HashMap;

use ka_core::auth::{
    join_proof, link_ticket, node_key, source_data_key, Channel, DataHello, Mac, Side,
};
use ka_core::codec::{
    Digest, Encoding, ImageId, Join, Message, Nonce, Progress, RefusalCode, Tag, Ticket,
    PROTOCOL_VERSION,
};
use ka_core::config::{NodeConfig, SlowPolicy, SourceConfig};
use ka_core::ids::{ConnId, Epoch, NodeId};
use ka_core::node::{Node, NodeAction, NodeEvent, Phase};
use ka_core::source::{Source, SourceAction, SourceEvent, SourceState, StartTrigger};
use ka_core::time::Time;

/// The tests check the protocol, not the cryptography.
use ka_core::auth::StandInKey as Key;

/// The session's root key in these tests.
const ROOT: Key = Key(1);

/// The ticket every topology in these tests hands a node for its upstream.
const TICKET: Ticket = Ticket([42; 32]);

/// The source run every welcome in these tests names.
const RUN: Nonce = Nonce([77; 32]);

/// The key of node `name` under the root.
fn key_of(name: &str) -> Box<dyn Mac> {
    node_key(&ROOT, name)
}

// The tests play the peers of one machine at a time: the nodes of a
// source, or the source (and upstreams and downstreams) of a node. The
// keys of each connection's far end are kept here, by connection, so the
// tests read as the conversation, and every message after a handshake is
// sealed on its way in and opened on its way out, as a peer would.
thread_local! {
    /// Our ends of the source's connections (we are its nodes).
    static SOURCE_PEERS: RefCell<HashMap<ConnId, Channel>> = RefCell::new(HashMap::new());
    /// Our ends of the node's connections (we are its source, upstream or
    /// downstream).
    static NODE_PEERS: RefCell<HashMap<ConnId, Channel>> = RefCell::new(HashMap::new());
    /// The nonce we challenged the node with, by connection.
    static CHALLENGES: RefCell<HashMap<ConnId, Nonce>> = RefCell::new(HashMap::new());
    /// The node's messages taken out and opened, not yet looked at.
    static NODE_SENT: RefCell<Vec<(ConnId, Message)>> = const { RefCell::new(Vec::new()) };
}

/// Whether `msg` travels sealed once its connection's handshake is done.
fn sealable(msg: &Message) -> bool {
    !msg.is_handshake() && !matches!(msg, Message::Refused(_) | Message::Sealed { .. })
}

/// Hands a message to a machine as its peer on `conn` sends it.
trait Say {
    fn say(&mut self, now: Time, conn: ConnId, msg: Message);
}

impl Say for Source {
    fn say(&mut self, now: Time, conn: ConnId, msg: Message) {
        let msg = SOURCE_PEERS.with(|p| match p.borrow_mut().get_mut(&conn) {
            Some(ch) if sealable(&msg) => ch.seal(msg),
            _ => msg,
        });
        self.handle_message(now, conn, msg);
    }
}

impl Say for Node {
    fn say(&mut self, now: Time, conn: ConnId, msg: Message) {
        take_sent(self);
        if let Message::Challenge { nonce, .. } = &msg {
            CHALLENGES.with(|c| c.borrow_mut().insert(conn, *nonce));
        }
        let msg = NODE_PEERS.with(|p| match p.borrow_mut().get_mut(&conn) {
            Some(ch) if sealable(&msg) => ch.seal(msg),
            _ => msg,
        });
        self.handle_message(now, conn, msg);
        take_sent(self);
    }
}

/// Takes the node's transmits out in order, opening what is sealed and
/// keeping our end of each connection its handshakes open.
fn take_sent(node: &mut Node) {
    while let Some((conn, msg)) = node.poll_transmit() {
        let challenge = CHALLENGES.with(|c| c.borrow().get(&conn).copied());
        match &msg {
            Message::Join(j) => {
                let server = challenge.expect("a join answers our challenge");
                let ch = Channel::new(&*key_of(&j.name), &server, &j.nonce, Side::Server);
                NODE_PEERS.with(|p| p.borrow_mut().insert(conn, ch));
            }
            Message::DataHello { nonce, .. } => {
                let server = challenge.expect("a hello answers our challenge");
                let ticket = ROOT.keyed(&TICKET.0);
                let ch = Channel::new(&*ticket, &server, nonce, Side::Server);
                NODE_PEERS.with(|p| p.borrow_mut().insert(conn, ch));
            }
            _ => {}
        }
        let msg = match msg {
            sealed @ Message::Sealed { .. } => NODE_PEERS.with(|p| {
                let mut p = p.borrow_mut();
                let ch = p.get_mut(&conn).expect("sealed on a connection we know");
                ch.open(sealed).expect("the node's message opens")
            }),
            msg => msg,
        };
        NODE_SENT.with(|s| s.borrow_mut().push((conn, msg)));
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

fn t(ms: u64) -> Time {
    Time::from_nanos(ms * 1_000_000)
}

fn config(n: u32) -> SourceConfig {
    let mut cfg = SourceConfig::new("s", n, addr(1));
    cfg.run = RUN;
    cfg
}

fn source(n: u32) -> Source {
    Source::new(Time::ZERO, config(n), Box::new(Key(1)))
}

/// A join of `name` as a node would send it, with its nonce, before its proof.
fn bare_join(name: &str, conn: u64) -> Join {
    Join {
        version: PROTOCOL_VERSION,
        session: "s".into(),
        name: name.into(),
        mac: [0; 6],
        data_addr: addr(100),
        wait_release: false,
        readable: true,
        have: 0,
        holds_from: 0,
        image: None,
        nonce: Nonce([conn as u8 ^ 0x80; 32]),
        proof: Tag::default(),
    }
}

/// Connects `conn` and joins `name` with the root `key`'s key for it, the
/// join first changed by `edit`; returns what the source answered, opened.
fn join_edited(
    src: &mut Source,
    now: Time,
    conn: u64,
    name: &str,
    key: &dyn Mac,
    edit: impl FnOnce(&mut Join),
) -> Vec<Message> {
    send_join(src, now, conn, name, key, edit);
    drain(src)
        .into_iter()
        .filter(|(c, _)| *c == ConnId(conn))
        .map(|(_, m)| m)
        .collect()
}

/// Connects `conn` and sends the join of `name`, proved with the root
/// `key`'s key for it, the join first changed by `edit`; keeps our end of
/// the connection.
fn send_join(
    src: &mut Source,
    now: Time,
    conn: u64,
    name: &str,
    key: &dyn Mac,
    edit: impl FnOnce(&mut Join),
) {
    let nonce = Nonce([conn as u8; 32]);
    src.handle_connected(now, ConnId(conn), nonce);
    let mut j = bare_join(name, conn);
    edit(&mut j);
    let own = node_key(key, &j.name);
    j.proof = join_proof(&*own, &nonce, &j);
    let ch = Channel::new(&*own, &nonce, &j.nonce, Side::Client);
    SOURCE_PEERS.with(|p| p.borrow_mut().insert(ConnId(conn), ch));
    src.handle_message(now, ConnId(conn), Message::Join(Box::new(j)));
}

/// Connects `conn` and joins `name` with `key`; returns what the source answered.
fn join(src: &mut Source, now: Time, conn: u64, name: &str, key: &dyn Mac) -> Vec<Message> {
    join_edited(src, now, conn, name, key, |_| {})
}

/// The source's transmits, opened on the connections we hold.
fn drain(src: &mut Source) -> Vec<(ConnId, Message)> {
    std::iter::from_fn(|| src.poll_transmit())
        .map(|(conn, msg)| (conn, open_from_source(conn, msg)))
        .collect()
}

/// `msg` from the source on `conn`, opened if sealed.
fn open_from_source(conn: ConnId, msg: Message) -> Message {
    match msg {
        sealed @ Message::Sealed { .. } => SOURCE_PEERS.with(|p| {
            // Left sealed on a connection we did not join (an operator's).
            match p.borrow_mut().get_mut(&conn) {
                Some(ch) => ch.open(sealed).expect("the source's message opens"),
                None => sealed,
            }
        }),
        msg => msg,
    }
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
    let answers = join_edited(&mut src, Time::ZERO, 1, "a", &ROOT, |j| {
        j.version = PROTOCOL_VERSION + 1
    });
    assert_eq!(refusal(&answers), Some(RefusalCode::VersionMismatch));
    let answers = join_edited(&mut src, Time::ZERO, 2, "a", &ROOT, |j| {
        j.session = "other".into()
    });
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
    let mut cfg = config(5);
    cfg.join_timeout = Some(Duration::from_secs(10));
    cfg.min_nodes = 2;
    let mut src = Source::new(Time::ZERO, cfg.clone(), Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    src.say(t(9_900), ConnId(1), Message::Progress(Progress::default()));
    src.handle_timeout(t(10_000));
    assert_eq!(src.state(), SourceState::Aborted);
    assert!(matches!(src.report()[0].outcome, Some(Err(ref e)) if e.contains("join deadline")));

    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    join(&mut src, Time::ZERO, 2, "b", &Key(1));
    for c in [1, 2] {
        src.say(t(9_900), ConnId(c), Message::Progress(Progress::default()));
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
    let mut cfg = config(3);
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
            src.say(t(ms), ConnId(c), Message::Progress(Progress::default()));
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
    let mut cfg = config(3);
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
        src.say(
            now,
            ConnId(1),
            Message::Progress(Progress {
                received: step * 100_000,
                written: 0,
                holds_from: 0,
            }),
        );
        src.say(
            now,
            ConnId(2),
            Message::Progress(Progress {
                received: step * 10,
                written: 0,
                holds_from: 0,
            }),
        );
        src.say(
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
fn nodes_that_fed_only_a_slow_node_are_released_once_verified_and_the_source_takes_it_over() {
    let mut cfg = config(4);
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    cfg.slow_policy = SlowPolicy::MoveToTail;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
        join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
    }
    // b crawls: a races ahead, c and d are stuck behind b.
    let mut step = 0;
    while !events(&mut src)
        .iter()
        .any(|e| matches!(e, SourceEvent::Slow { .. }))
    {
        step += 1;
        assert!(step < 20, "b never judged slow");
        let now = t(step * 250);
        for (conn, rate) in [(1, 100_000), (2, 10), (3, 10), (4, 10)] {
            src.say(now, ConnId(conn), progress(step * rate));
        }
        src.handle_timeout(now);
    }
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(4))));
    // The fast three get their copies; d still feeds b.
    let now = t(step * 250 + 100);
    let total = 2_000_000;
    src.handle_image_done(now, total, Digest([1; 32]), None);
    for conn in [1, 3, 4] {
        src.say(now, ConnId(conn), progress(total));
    }
    drain(&mut src);
    for conn in [1, 3] {
        src.say(
            now,
            ConnId(conn),
            Message::Verified {
                ok: true,
                reason: String::new(),
            },
        );
    }
    assert!(
        !drain(&mut src).iter().any(|(_, m)| *m == Message::Release),
        "a and c still feed the nodes below them"
    );
    src.say(
        now,
        ConnId(4),
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
    );
    let evs = events(&mut src);
    assert!(
        evs.contains(&SourceEvent::Relinked {
            node: NodeId(2),
            upstream: None
        }),
        "the source feeds b from where it is: {evs:?}"
    );
    let mut released: Vec<u64> = drain(&mut src)
        .into_iter()
        .filter(|(_, m)| *m == Message::Release)
        .map(|(c, _)| c.0)
        .collect();
    released.sort();
    assert_eq!(released, [1, 3, 4], "every node but b released at once");
    assert_eq!(src.topology().parent(NodeId(2)), Some(None));
    assert_eq!(src.state(), SourceState::Streaming, "b still receives");
    src.say(now, ConnId(2), progress(total));
    src.say(
        now,
        ConnId(2),
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
    );
    src.handle_timeout(now);
    assert_eq!(src.state(), SourceState::Finished);
    assert!(src.report().iter().all(|r| r.is_ok() && r.released));
}

#[test]
fn releases_wait_for_the_session_and_are_paced() {
    let mut cfg = config(2);
    cfg.release_delay = Duration::from_secs(2);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    for (i, n) in ["a", "b"].iter().enumerate() {
        join_edited(&mut src, Time::ZERO, i as u64 + 1, n, &ROOT, |j| {
            j.wait_release = true
        });
    }
    src.handle_image_done(t(100), 10, Digest([1; 32]), None);
    src.say(
        t(110),
        ConnId(1),
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
    );
    src.say(
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
    src.say(t(2000), ConnId(2), Message::Progress(Progress::default()));
    src.handle_timeout(t(2120));
    assert_eq!(released(&mut src), 1);
    assert_eq!(src.state(), SourceState::Finished);
    assert!(src.report().iter().all(|r| r.is_ok()));
}

#[test]
fn node_verifies_only_when_its_digest_matches() {
    for (theirs, ok) in [(Digest([5; 32]), true), (Digest([6; 32]), false)] {
        let cfg = NodeConfig::new("s", "a", addr(2));
        let mut node = welcomed_node_with(cfg, None, 1, 0, Encoding::Plain);
        node.say(t(1), ConnId(1), image_done());
        node.handle_stream_end(t(2), 1000, theirs);
        assert_eq!(node.verdict().map(|v| v.is_ok()), Some(ok));
        assert_eq!(node.phase(), &Phase::AwaitingRelease);
        let sent: Vec<Message> = sent(&mut node).into_iter().map(|x| x.1).collect();
        assert!(sent
            .iter()
            .any(|m| matches!(m, Message::Verified { ok: o, .. } if *o == ok)));
    }
}

/// `--verify readback` reads the written stream back where it can: a node
/// that joined as a file target and was welcomed to a plain stream reads
/// back; one welcomed to a packed stream keeps only a window of it (its
/// unpacker checked the target), so it concludes on the image's digest.
#[test]
fn only_a_node_that_keeps_its_whole_stream_reads_it_back() {
    for (encoding, reads_back) in [
        (Encoding::Plain, true),
        (Encoding::Zstd { image_size: None }, false),
    ] {
        let mut cfg = NodeConfig::new("s", "a", addr(2));
        cfg.verify_readback = true;
        let mut node = welcomed_node_with(cfg, None, 1, 0, encoding);
        node.say(t(1), ConnId(1), packed_image_done(Some(Digest([5; 32]))));
        actions(&mut node);
        node.handle_stream_end(t(2), 1000, Digest([5; 32]));
        let asked = actions(&mut node).contains(&NodeAction::ReadBack);
        assert_eq!(asked, reads_back, "{encoding:?}");
        let verdict = node.verdict().map(|v| v.is_ok());
        assert_eq!(verdict, (!reads_back).then_some(true), "{encoding:?}");
    }
}

/// A packed stream's copy is checked by the image it unpacks to, whose
/// digest the source sends beside the stream's: what the node wrote must
/// match that one, not the stream's, and a source that sends none leaves
/// nothing to check by.
#[test]
fn a_packed_copy_is_checked_by_the_unpacked_images_digest() {
    let (stream, image, forged) = (Digest([5; 32]), Digest([6; 32]), Digest([7; 32]));
    for (image_digest, wrote, ok, why) in [
        (Some(image), image, true, ""),
        (
            Some(image),
            stream,
            false,
            "digest of the unpacked image differs",
        ),
        (
            Some(forged),
            image,
            false,
            "digest of the unpacked image differs",
        ),
        (None, image, false, "sent no digest of the unpacked image"),
    ] {
        let encoding = Encoding::Zstd { image_size: None };
        let mut node = welcomed_node_with(NodeConfig::new("s", "a", addr(2)), None, 1, 0, encoding);
        node.say(t(1), ConnId(1), packed_image_done(image_digest));
        node.handle_stream_end(t(2), 1000, wrote);
        let verdict = node.verdict().cloned().expect("concluded");
        assert_eq!(
            verdict.is_ok(),
            ok,
            "{image_digest:?} {wrote:?}: {verdict:?}"
        );
        if let Err(e) = verdict {
            assert!(e.contains(why), "{e}");
        }
    }
}

/// The source's end of a packed stream of 1000 bytes that unpacks to an
/// image of digest `image_digest`.
fn packed_image_done(image_digest: Option<Digest>) -> Message {
    Message::ImageDone {
        total: 1000,
        digest: Digest([5; 32]),
        image_digest,
    }
}

/// The source's end of the stream for [`welcomed_node`]'s image.
fn image_done() -> Message {
    Message::ImageDone {
        total: 1000,
        digest: Digest([5; 32]),
        image_digest: None,
    }
}

/// A welcomed node placed at `epoch` with `downstreams`, its outputs so far
/// drained.
fn placed_node(epoch: u64, downstreams: Vec<NodeId>) -> Node {
    let mut node = welcomed_node(None, 1, 0);
    node.say(t(2), ConnId(1), topology(epoch, downstreams));
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
            ticket: TICKET,
        }),
        downstreams,
    }
}

/// Node 9 connects to `node` (node "a", welcomed in [`RUN`]) on `conn`
/// and asks for data as of `epoch`.
fn downstream_hello(node: &mut Node, now: Time, conn: u64, epoch: u64) {
    hello_to_node(node, now, conn, NodeId(9), epoch, 0);
}

/// `downstream` connects to `node` (node "a", welcomed in [`RUN`]) on
/// `conn` and asks for data from `from` as of `epoch`, proving the ticket
/// the source would have handed it for that link.
fn hello_to_node(node: &mut Node, now: Time, conn: u64, downstream: NodeId, epoch: u64, from: u64) {
    hello_in_run(node, now, conn, downstream, epoch, from, RUN);
}

/// [`hello_to_node`] with the ticket of the source run `run`.
fn hello_in_run(
    node: &mut Node,
    now: Time,
    conn: u64,
    downstream: NodeId,
    epoch: u64,
    from: u64,
    run: Nonce,
) {
    let server = Nonce([conn as u8; 32]);
    node.handle_connected(now, ConnId(conn), server);
    take_sent(node);
    let ticket = ROOT.keyed(&link_ticket(&*key_of("a"), &run, downstream).0);
    let hello = DataHello {
        session: "s".into(),
        node: downstream,
        epoch: Epoch(epoch),
        from,
        nonce: Nonce([conn as u8 ^ 0x20; 32]),
    };
    let ch = Channel::new(&*ticket, &server, &hello.nonce, Side::Client);
    NODE_PEERS.with(|p| p.borrow_mut().insert(ConnId(conn), ch));
    node.say(now, ConnId(conn), hello.proved(&*ticket, &server));
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
    node.say(t(4), ConnId(1), topology(2, vec![NodeId(9)]));
    assert_eq!(answer(&mut node, 5), "accepted");
}

#[test]
fn a_node_that_lost_its_source_holds_a_downstream_the_new_source_placed() {
    // A restarted source numbers its placements from 1 again; a node that
    // lost the old one must not take the new epoch 1 for its own old one.
    let mut node = placed_node(1, vec![]);
    node.handle_closed(t(3), ConnId(1));
    actions(&mut node);
    // Until it is welcomed again it knows no run to check a ticket
    // against: the hello waits for the welcome.
    downstream_hello(&mut node, t(4), 5, 1);
    assert_eq!(answer(&mut node, 5), "waiting");
    // The new source process has a run of its own.
    let new_run = Nonce([78; 32]);
    node.handle_source_connected(t(300), ConnId(2), Nonce([0x41; 32]));
    node.say(
        t(300),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([2; 32]),
        },
    );
    node.say(
        t(300),
        ConnId(2),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 0,
            run: new_run,
            encoding: Default::default(),
        },
    );
    // That one proved a ticket of the old run: worth nothing now.
    let bad_proof = |msgs: Vec<(ConnId, Message)>, conn| {
        msgs.into_iter().any(|(c, m)| {
            c == ConnId(conn) && matches!(m, Message::Refused(r) if r.code == RefusalCode::BadProof)
        })
    };
    assert!(bad_proof(sent(&mut node), 5));
    hello_in_run(&mut node, t(301), 6, NodeId(9), 1, 0, new_run);
    assert_eq!(answer(&mut node, 6), "waiting");
    downstream_hello(&mut node, t(302), 7, 1);
    assert!(
        bad_proof(sent(&mut node), 7),
        "a ticket of the old run was taken"
    );
}

#[test]
fn an_early_downstream_the_source_never_confirms_is_refused_in_time() {
    let mut node = placed_node(1, vec![]);
    downstream_hello(&mut node, t(3), 5, 2);
    assert_eq!(answer(&mut node, 5), "waiting");
    // A placement at epoch 2 without 9 settles it at once.
    downstream_hello(&mut node, t(3), 6, 3);
    node.say(t(4), ConnId(1), topology(2, vec![NodeId(4)]));
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
    src.say(t(1), ConnId(1), progress(500));
    src.say(t(1), ConnId(2), progress(200));
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
    join_edited(src, now, conn, name, &ROOT, |j| {
        j.have = have;
        j.image = Some(image);
    })
}

fn resume_from(answers: &[Message]) -> Option<u64> {
    answers.iter().find_map(|m| match m {
        Message::Welcome { resume_from, .. } => Some(*resume_from),
        _ => None,
    })
}

const IMAGE: ImageId = ImageId([7; 32]);

fn file_source(n: u32, size: u64) -> Source {
    let mut cfg = config(n);
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
    let data_key = source_data_key(&ROOT);
    let ticket = ROOT.keyed(&link_ticket(&*data_key, &RUN, b).0);
    let hello = DataHello {
        session: "s".into(),
        node: b,
        epoch,
        from: 600,
        nonce: Nonce([41; 32]),
    };
    src.handle_message(t(4), ConnId(40), hello.proved(&*ticket, &nonce));
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
    welcomed_node_with(
        NodeConfig::new("s", "a", addr(2)),
        resume,
        conn,
        resume_from,
        Encoding::Plain,
    )
}

/// [`welcomed_node`], configured by `cfg` and welcomed to a stream in
/// `encoding`.
fn welcomed_node_with(
    cfg: NodeConfig,
    resume: Option<ka_core::node::Resume>,
    conn: u64,
    resume_from: u64,
    encoding: Encoding,
) -> Node {
    let mut node = Node::new(Time::ZERO, cfg, key_of("a"), resume);
    node.handle_source_connected(t(1), ConnId(conn), Nonce([0x40; 32]));
    node.say(
        t(1),
        ConnId(conn),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    node.say(
        t(1),
        ConnId(conn),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from,
            run: RUN,
            encoding,
        },
    );
    node
}

/// What the node sent since we last looked, opened.
fn sent(node: &mut Node) -> Vec<(ConnId, Message)> {
    take_sent(node);
    NODE_SENT.with(|s| std::mem::take(&mut *s.borrow_mut()))
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
        key_of("a"),
        Some(resume),
    );
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
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
            Message::Join(j) => Some(*j),
            _ => None,
        })
        .expect("a join");
    assert_eq!((join.have, join.image), (400, Some(IMAGE)));
    node.say(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 400,
            run: RUN,
            encoding: Default::default(),
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
    node.say(
        t(2),
        ConnId(1),
        Message::Topology {
            epoch: ka_core::ids::Epoch(50),
            upstream: Some(ka_core::codec::Upstream {
                node: Some(NodeId(5)),
                addr: addr(5),
                ticket: TICKET,
            }),
            downstreams: vec![NodeId(9)],
        },
    );
    assert!(actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })));
    node.handle_upstream_connected(t(3), ConnId(2), Nonce([0x50; 32]));
    node.say(
        t(3),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([1; 32]),
        },
    );
    node.say(t(3), ConnId(2), Message::DataAccepted { from: 0 });
    hello_to_node(&mut node, t(3), 3, NodeId(9), 50, 0);
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
    node.handle_source_connected(t(2000), ConnId(10), Nonce([0x40; 32]));
    node.say(
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
            Message::Join(j) => Some(*j),
            _ => None,
        })
        .expect("a join");
    assert_eq!((join.have, join.image), (400, Some(IMAGE)));
    node.say(
        t(2000),
        ConnId(10),
        Message::Welcome {
            node: NodeId(3),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 400,
            run: RUN,
            encoding: Default::default(),
        },
    );
    // The new source's generations start again at 1: they must be obeyed.
    node.say(
        t(2001),
        ConnId(10),
        Message::Topology {
            epoch: ka_core::ids::Epoch(1),
            upstream: Some(ka_core::codec::Upstream {
                node: None,
                addr: addr(1),
                ticket: TICKET,
            }),
            downstreams: vec![],
        },
    );
    assert!(actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })));
    node.handle_upstream_connected(t(2002), ConnId(11), Nonce([0x50; 32]));
    node.say(
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
    node.say(
        t(2),
        ConnId(1),
        Message::ImageDone {
            total: 1000,
            digest: Digest([5; 32]),
            image_digest: None,
        },
    );
    node.handle_stream_end(t(3), 1000, Digest([5; 32]));
    assert_eq!(node.phase(), &Phase::AwaitingRelease);
    node.handle_closed(t(4), ConnId(1));
    node.handle_timeout(t(300));
    node.handle_source_connected(t(300), ConnId(2), Nonce([0x40; 32]));
    node.say(
        t(300),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([3; 32]),
        },
    );
    node.say(
        t(300),
        ConnId(2),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 1000,
            run: RUN,
            encoding: Default::default(),
        },
    );
    assert!(sent(&mut node)
        .iter()
        .any(|(c, m)| *c == ConnId(2) && matches!(m, Message::Verified { ok: true, .. })));
}

#[test]
fn a_verified_node_waits_out_a_silent_source_for_its_release() {
    let mut node = welcomed_node(None, 1, 0);
    node.say(
        t(2),
        ConnId(1),
        Message::ImageDone {
            total: 1000,
            digest: Digest([5; 32]),
            image_digest: None,
        },
    );
    node.handle_stream_end(t(3), 1000, Digest([5; 32]));
    assert_eq!(node.phase(), &Phase::AwaitingRelease);
    actions(&mut node);
    // The source says nothing for 3 s (stopped, while its kernel sent the
    // stream's end): far past dead_after (1 s), well inside source_wait.
    for ms in (250..=3000).step_by(250) {
        node.handle_timeout(t(ms));
        let acts = actions(&mut node);
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, NodeAction::Close { conn } if *conn == ConnId(1))),
            "a verified node left a silent source at {ms} ms"
        );
    }
    // It wakes and releases the node on the connection it kept.
    node.say(t(3100), ConnId(1), Message::Release);
    assert!(actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::Exit { ok: true, .. })));
}

#[test]
fn a_verified_node_still_leaves_a_source_silent_for_source_wait() {
    let mut cfg = NodeConfig::new("s", "a", addr(2));
    cfg.source_wait = Duration::from_secs(2);
    let mut node = welcomed_node_with(cfg, None, 1, 0, Encoding::Plain);
    node.say(
        t(2),
        ConnId(1),
        Message::ImageDone {
            total: 1000,
            digest: Digest([5; 32]),
            image_digest: None,
        },
    );
    node.handle_stream_end(t(3), 1000, Digest([5; 32]));
    actions(&mut node);
    let mut left_at = None;
    for ms in (250..=3000).step_by(50) {
        node.handle_timeout(t(ms));
        if actions(&mut node)
            .iter()
            .any(|a| matches!(a, NodeAction::Close { conn } if *conn == ConnId(1)))
        {
            left_at.get_or_insert(ms);
        }
    }
    let at = left_at.expect("a source silent for source_wait is left");
    assert!((2000..=2100).contains(&at), "left at {at} ms");
}

#[test]
fn node_gives_up_when_the_source_stays_away() {
    let mut cfg = NodeConfig::new("s", "a", addr(2));
    cfg.source_wait = Duration::from_secs(2);
    let mut node = welcomed_node_with(cfg, None, 1, 0, Encoding::Plain);
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
fn children_sharing_their_upstreams_port_are_judged_against_each_other() {
    for f_rate in [100_000, 3_000] {
        let mut cfg = config(7);
        cfg.arity = 3;
        cfg.slow_lag = 1000;
        cfg.slow_window = Duration::from_secs(1);
        let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
        for (i, n) in ["a", "b", "c", "d", "e", "f", "g"].iter().enumerate() {
            join(&mut src, Time::ZERO, i as u64 + 1, n, &Key(1));
        }
        let (a, d, e, f) = (NodeId(1), NodeId(4), NodeId(5), NodeId(6));
        assert_eq!(src.topology().children(Some(a)), &[d, e, f]);
        // a's three children each get a third of a's port.
        let evs = drive_progress(&mut src, |src, step, now| {
            // g, b's only child, has b's port to itself.
            for conn in [1, 2, 3, 7] {
                src.say(now, ConnId(conn), progress(step * 300_000));
            }
            for conn in [4, 5] {
                src.say(now, ConnId(conn), progress(step * 100_000));
            }
            src.say(now, ConnId(6), progress(step * f_rate));
        });
        let slow: Vec<NodeId> = evs
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Slow { node, .. } => Some(*node),
                _ => None,
            })
            .collect();
        let want: &[NodeId] = if f_rate == 100_000 { &[] } else { &[f] };
        assert_eq!(slow, want, "f at {f_rate} a step: {evs:?}");
    }
}

#[test]
fn slow_child_of_the_source_is_judged_against_its_sibling() {
    let mut cfg = config(2);
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
        src.say(now, ConnId(1), progress(step * 100_000));
        src.say(now, ConnId(2), progress(step * 10));
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
    let mut cfg = config(3);
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
            src.say(now, ConnId(1), progress(5_000_000));
        } else if step == 2 {
            let verified = Message::Verified {
                ok: true,
                reason: String::new(),
            };
            src.say(now, ConnId(1), verified);
        }
        src.say(now, ConnId(2), progress(step * 100_000));
        src.say(now, ConnId(3), progress(step * 10));
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
    let mut cfg = config(1);
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    join(&mut src, Time::ZERO, 1, "a", &Key(1));
    let evs = drive_progress(&mut src, |src, step, now| {
        src.handle_image_progress(now, step * 100_000);
        src.say(now, ConnId(1), progress(step * 10));
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
fn a_node_that_verified_then_dies_before_a_restarted_source_starts_keeps_its_verdict() {
    // A restarted source takes back a node that holds the whole image; it
    // says its verdict again, then dies before the others are back.
    let mut src = file_source(3, 1000);
    join_holding(&mut src, t(1), 1, "a", 1000, IMAGE);
    let ok = Message::Verified {
        ok: true,
        reason: String::new(),
    };
    src.say(t(2), ConnId(1), ok);
    src.handle_closed(t(3), ConnId(1));
    join_holding(&mut src, t(4), 2, "b", 0, IMAGE);
    join_holding(&mut src, t(4), 3, "c", 0, IMAGE);
    src.handle_go(t(5));
    assert_eq!(src.state(), SourceState::Streaming);
    // b verifies; the session still waits for c, live and undecided.
    let ok = Message::Verified {
        ok: true,
        reason: String::new(),
    };
    src.say(t(6), ConnId(2), ok.clone());
    assert_eq!(src.state(), SourceState::Streaming, "c is still copying");
    src.say(t(7), ConnId(3), ok);
    assert_eq!(src.state(), SourceState::Finished);
    let report = src.report();
    assert!(report.iter().all(|r| r.is_ok()), "{report:?}");
    assert!(events(&mut src).contains(&SourceEvent::Finished { ok: 3, ko: 0 }));
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
            src.say(t(ms), ConnId(c), Message::Progress(Progress::default()));
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

// ----- authentication -----

#[test]
fn a_verified_forged_by_a_relay_is_not_taken_and_costs_the_node_its_connection() {
    // A relay between a node and the source passes the handshake on, then
    // says Verified itself: in the clear, or sealed without the key.
    for forged in [
        Message::Verified {
            ok: true,
            reason: String::new(),
        },
        Message::Sealed {
            tag: Tag([0; 32]),
            body: Message::Verified {
                ok: true,
                reason: String::new(),
            }
            .encode_body(),
        },
    ] {
        let mut src = source(1);
        join(&mut src, Time::ZERO, 1, "a", &ROOT);
        src.handle_image_done(t(1), 10, Digest([5; 32]), None);
        drain(&mut src);
        events(&mut src);
        src.handle_message(t(2), ConnId(1), forged);
        let evs = events(&mut src);
        assert!(
            !evs.iter()
                .any(|e| matches!(e, SourceEvent::Verified { .. })),
            "{evs:?}"
        );
        assert!(
            evs.iter().any(|e| matches!(e, SourceEvent::Dead { node: NodeId(1), reason } if reason.contains("authentication"))),
            "{evs:?}"
        );
        let actions: Vec<SourceAction> = std::iter::from_fn(|| src.poll_action()).collect();
        assert!(actions.contains(&SourceAction::Close { conn: ConnId(1) }));
        let report = src.report();
        assert!(
            matches!(&report[0].outcome, Some(Err(e)) if e.contains("authentication")),
            "{report:?}"
        );
    }
}

#[test]
fn a_message_replayed_or_reordered_on_a_node_connection_is_not_taken() {
    let mut src = source(1);
    join(&mut src, Time::ZERO, 1, "a", &ROOT);
    let sealed: Vec<Message> = [progress(10), progress(20)]
        .into_iter()
        .map(|m| SOURCE_PEERS.with(|p| p.borrow_mut().get_mut(&ConnId(1)).unwrap().seal(m)))
        .collect();
    src.handle_message(t(1), ConnId(1), sealed[0].clone());
    assert_eq!(src.progress(NodeId(1)).unwrap().received, 10);
    // The same message again.
    src.handle_message(t(2), ConnId(1), sealed[0].clone());
    assert!(!src.is_live(NodeId(1)));
    // Out of order, on a fresh connection: the second before the first.
    let mut src = source(1);
    join(&mut src, Time::ZERO, 1, "a", &ROOT);
    let second = SOURCE_PEERS.with(|p| {
        let mut p = p.borrow_mut();
        let ch = p.get_mut(&ConnId(1)).unwrap();
        let _first = ch.seal(progress(10));
        ch.seal(progress(20))
    });
    src.handle_message(t(1), ConnId(1), second);
    assert!(!src.is_live(NodeId(1)));
    assert_eq!(src.progress(NodeId(1)).unwrap().received, 0);
}

/// A fresh node "a" that has sent its join on connection 1; returns it.
fn joining_node() -> Node {
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        key_of("a"),
        None,
    );
    actions(&mut node);
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
        t(1),
        ConnId(1),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    assert!(sent(&mut node)
        .iter()
        .any(|(_, m)| matches!(m, Message::Join(_))));
    node
}

fn welcome() -> Message {
    Message::Welcome {
        node: NodeId(1),
        heartbeat_ms: 250,
        dead_after_ms: 1000,
        image_size: Some(1000),
        image: IMAGE,
        resume_from: 0,
        run: RUN,
        encoding: Default::default(),
    }
}

/// Whether the node acted on anything but dropping the connection.
fn acted_on_impostor(node: &mut Node) -> bool {
    let acts = actions(node);
    let evs: Vec<NodeEvent> = std::iter::from_fn(|| node.poll_event()).collect();
    assert!(
        evs.iter()
            .any(|e| matches!(e, NodeEvent::SourceUnproven { .. })),
        "{evs:?}"
    );
    assert!(acts.contains(&NodeAction::Close { conn: ConnId(1) }));
    node.id().is_some()
        || evs.iter().any(|e| matches!(e, NodeEvent::Welcomed { .. }))
        || acts.iter().any(|a| {
            matches!(
                a,
                NodeAction::ConnectUpstream { .. }
                    | NodeAction::Receive { .. }
                    | NodeAction::StartOver
            )
        })
}

#[test]
fn a_node_acts_on_nothing_a_source_without_its_key_says() {
    // An impostor welcomes in the clear, then places the node under itself.
    let mut node = joining_node();
    node.handle_message(t(2), ConnId(1), welcome());
    assert!(!acted_on_impostor(&mut node));
    assert_eq!(node.control(), ka_core::node::ControlState::AwaitingSource);
    // One holding another node's key (a stolen key used as the source)
    // seals its welcome with the keys that key gives.
    let mut node = joining_node();
    let stolen = key_of("b");
    let mut ch = Channel::new(&*stolen, &Nonce([0; 32]), &Nonce([0x40; 32]), Side::Server);
    node.handle_message(t(2), ConnId(1), ch.seal(welcome()));
    assert!(!acted_on_impostor(&mut node));
    // Nor is anything sealed for later taken: a topology after that.
    node.handle_message(t(2), ConnId(1), ch.seal(topology(1, vec![])));
    assert!(actions(&mut node)
        .iter()
        .all(|a| !matches!(a, NodeAction::ConnectUpstream { .. })));
    // It keeps looking for the source, and says why when it gives up.
    let mut now = 2;
    while node.phase() != &Phase::Done && now < 400_000 {
        now += 100;
        node.handle_timeout(t(now));
        actions(&mut node);
    }
    let left = std::iter::from_fn(|| node.poll_event()).find_map(|e| match e {
        NodeEvent::Left { reason, .. } => Some(reason),
        _ => None,
    });
    assert!(
        left.as_deref().is_some_and(|r| r.contains("not believed")),
        "{left:?}"
    );
}

#[test]
fn a_node_takes_no_record_from_an_upstream_without_its_links_ticket() {
    let mut node = welcomed_node(None, 1, 0);
    node.say(t(2), ConnId(1), under_node_5(1));
    actions(&mut node);
    node.handle_upstream_connected(t(3), ConnId(2), Nonce([0x50; 32]));
    node.say(
        t(3),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([2; 32]),
        },
    );
    assert!(sent(&mut node)
        .iter()
        .any(|(c, m)| *c == ConnId(2) && matches!(m, Message::DataHello { .. })));
    // Accepted in the clear, as an impostor upstream would.
    node.handle_message(t(3), ConnId(2), Message::DataAccepted { from: 0 });
    let acts = actions(&mut node);
    assert!(
        !acts.iter().any(|a| matches!(a, NodeAction::Receive { .. })),
        "{acts:?}"
    );
    assert!(acts.contains(&NodeAction::Close { conn: ConnId(2) }));
    assert!(std::iter::from_fn(|| node.poll_event()).any(|e| matches!(
        e,
        NodeEvent::UpstreamLost { reason } if reason.contains("ticket")
    )));
}

#[test]
fn hellos_before_the_welcome_wait_for_it_a_bounded_few_for_a_bounded_time() {
    // The source placed us and told our downstream before our welcome
    // arrived: its hello waits, unchecked, then is checked and held for
    // our placement.
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        key_of("a"),
        None,
    );
    actions(&mut node);
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
        t(1),
        ConnId(1),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    downstream_hello(&mut node, t(2), 5, 1);
    assert_eq!(answer(&mut node, 5), "waiting");
    // Strangers cannot hold more than a few connections that way.
    for conn in 100..140 {
        downstream_hello(&mut node, t(2), conn, 1);
    }
    let msgs = sent(&mut node);
    let refused = msgs
        .iter()
        .filter(|(_, m)| matches!(m, Message::Refused(_)))
        .count();
    assert!(refused >= 40 - 16, "only {refused} refused");
    node.say(t(3), ConnId(1), welcome());
    node.say(t(3), ConnId(1), topology(1, vec![NodeId(9)]));
    let (msgs, acts) = (sent(&mut node), actions(&mut node));
    assert!(msgs
        .iter()
        .any(|(c, m)| *c == ConnId(5) && matches!(m, Message::DataAccepted { from: 0 })));
    assert!(acts.iter().any(|a| matches!(
        a,
        NodeAction::Serve {
            conn: ConnId(5),
            ..
        }
    )));
    // Without a welcome, a held hello is let go once `dead_after` passed.
    let mut node = joining_node();
    downstream_hello(&mut node, t(2), 5, 1);
    node.handle_timeout(t(900));
    assert_eq!(answer(&mut node, 5), "waiting");
    node.handle_timeout(t(1100));
    assert!(actions(&mut node).contains(&NodeAction::Close { conn: ConnId(5) }));
}

#[test]
fn a_node_refuses_a_hello_proved_with_another_links_ticket() {
    // Node 8 holds the ticket of its own link from "a"; it cannot pass for 9.
    let mut node = placed_node(1, vec![NodeId(9)]);
    let server = Nonce([5; 32]);
    node.handle_connected(t(3), ConnId(5), server);
    let ticket8 = ROOT.keyed(&link_ticket(&*key_of("a"), &RUN, NodeId(8)).0);
    let hello = DataHello {
        session: "s".into(),
        node: NodeId(9),
        epoch: Epoch(1),
        from: 0,
        nonce: Nonce([6; 32]),
    };
    node.handle_message(t(3), ConnId(5), hello.proved(&*ticket8, &server));
    let msgs = sent(&mut node);
    assert!(msgs.iter().any(|(c, m)| *c == ConnId(5)
        && matches!(m, Message::Refused(r) if r.code == RefusalCode::BadProof)));
    assert!(!actions(&mut node)
        .iter()
        .any(|a| matches!(a, NodeAction::Serve { .. })));
}

#[test]
fn a_topologys_ticket_is_the_one_the_upstream_derives() {
    // The source hands b the ticket of the link a -> b; a derives the same
    // from its own key and the run, and nobody else's key gives it.
    let mut src = source(2);
    join(&mut src, Time::ZERO, 1, "a", &ROOT);
    let answers = join(&mut src, Time::ZERO, 2, "b", &ROOT);
    let up = answers
        .iter()
        .find_map(|m| match m {
            Message::Topology {
                upstream: Some(up), ..
            } => Some(*up),
            _ => None,
        })
        .expect("b is placed");
    assert_eq!(up.node, Some(NodeId(1)));
    assert_eq!(up.ticket, link_ticket(&*key_of("a"), &RUN, NodeId(2)));
    assert_ne!(up.ticket, link_ticket(&*key_of("b"), &RUN, NodeId(2)));
    // a's own placement: under the source, with the source's ticket.
    let a_up = drain(&mut src);
    assert!(a_up.is_empty() || a_up.iter().all(|(c, _)| *c != ConnId(2)));
}

#[test]
fn a_source_holding_only_a_nodes_key_admits_nobody_else() {
    // A key stolen from node a, used as if it were the root.
    let mut fake = Source::new(Time::ZERO, config(2), key_of("a"));
    let answers = join(&mut fake, Time::ZERO, 1, "b", &ROOT);
    assert_eq!(refusal(&answers), Some(RefusalCode::BadProof));
}

#[test]
fn a_go_needs_the_operator_key_not_a_nodes() {
    let mut src = source(3);
    join(&mut src, Time::ZERO, 1, "a", &ROOT);
    let server = Nonce([9; 32]);
    let go = |key: &dyn Mac| {
        let nonce = Nonce([10; 32]);
        Message::Go {
            session: "s".into(),
            nonce,
            proof: ka_core::auth::go_proof(key, &server, "s", &nonce),
        }
    };
    src.handle_connected(t(1), ConnId(9), server);
    src.handle_message(t(1), ConnId(9), go(&*key_of("a")));
    assert_eq!(
        refusal(&drain(&mut src).into_iter().map(|x| x.1).collect::<Vec<_>>()),
        Some(RefusalCode::BadProof)
    );
    assert_eq!(src.state(), SourceState::AwaitingNodes);
    let operator = ka_core::auth::operator_key(&ROOT);
    src.handle_connected(t(2), ConnId(10), server);
    src.handle_message(t(2), ConnId(10), go(&*operator));
    assert_eq!(src.state(), SourceState::Streaming);
    // The acknowledgement opens only with the operator's keys.
    let ack = drain(&mut src)
        .into_iter()
        .find(|(c, m)| *c == ConnId(10) && !matches!(m, Message::Challenge { .. }))
        .map(|x| x.1)
        .expect("an answer");
    let mut ch = Channel::new(&*operator, &server, &Nonce([10; 32]), Side::Client);
    assert_eq!(
        ch.open(ack),
        Ok(Message::GoAck {
            started: true,
            nodes: 1
        })
    );
}

// ----- bounded-window nodes -----

/// A welcomed node with a sink that cannot be read back, placed under node 5
/// at `epoch`, feeding node 9, its outputs drained.
fn window_node(epoch: u64) -> Node {
    let mut cfg = NodeConfig::new("s", "a", addr(2));
    cfg.readable = false;
    let mut node = Node::new(Time::ZERO, cfg, key_of("a"), None);
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
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
            Message::Join(j) => Some(*j),
            _ => None,
        })
        .expect("a join");
    assert!(!join.readable, "the join says the node keeps only a window");
    assert_eq!(join.holds_from, 0, "from the start of the image");
    node.say(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 0,
            run: RUN,
            encoding: Default::default(),
        },
    );
    node.say(t(2), ConnId(1), under_node_5(epoch));
    sent(&mut node);
    actions(&mut node);
    node
}

/// A placement under node 5, feeding node 9.
fn under_node_5(epoch: u64) -> Message {
    Message::Topology {
        epoch: ka_core::ids::Epoch(epoch),
        upstream: Some(ka_core::codec::Upstream {
            node: Some(NodeId(5)),
            addr: addr(5),
            ticket: TICKET,
        }),
        downstreams: vec![NodeId(9)],
    }
}

fn window_progress(received: u64, holds_from: u64) -> Progress {
    Progress {
        received,
        written: received,
        holds_from,
    }
}

/// Node 9 asks `node` on `conn` for data from `from` at epoch 1; returns
/// the answer sent on `conn`.
fn ask_from(node: &mut Node, now: Time, conn: u64, from: u64) -> Message {
    hello_to_node(node, now, conn, NodeId(9), 1, from);
    sent(node)
        .into_iter()
        .find(|(c, m)| *c == ConnId(conn) && !matches!(m, Message::Challenge { .. }))
        .map(|(_, m)| m)
        .expect("an answer")
}

#[test]
fn a_window_node_refuses_a_downstream_below_its_window_and_reports_the_window() {
    let mut node = window_node(1);
    node.handle_progress(t(3), window_progress(800, 500));
    // A stale report never moves the window back.
    node.handle_progress(t(3), window_progress(700, 200));
    assert_eq!(node.progress(), window_progress(800, 500));
    match ask_from(&mut node, t(4), 7, 100) {
        Message::Refused(r) => {
            assert_eq!(r.code, RefusalCode::CannotResume);
            assert!(
                r.detail.contains("100") && r.detail.contains("500"),
                "{}",
                r.detail
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(actions(&mut node).contains(&NodeAction::Close { conn: ConnId(7) }));
    assert_eq!(
        ask_from(&mut node, t(5), 8, 500),
        Message::DataAccepted { from: 500 }
    );
    assert!(actions(&mut node).contains(&NodeAction::Serve {
        conn: ConnId(8),
        node: NodeId(9),
        from: 500
    }));
    // A readable node serves anything and says so, whatever its shell
    // reports as a window.
    let mut readable = placed_node(1, vec![NodeId(9)]);
    readable.handle_progress(t(3), window_progress(800, 500));
    assert_eq!(readable.progress().holds_from, 0);
    assert_eq!(
        ask_from(&mut readable, t(4), 7, 100),
        Message::DataAccepted { from: 100 }
    );
}

#[test]
fn a_restarted_window_node_serves_nothing_below_the_prefix_it_resumed_with() {
    let mut cfg = NodeConfig::new("s", "a", addr(2));
    cfg.readable = false;
    let resume = ka_core::node::Resume {
        image: IMAGE,
        have: 400,
    };
    let mut node = Node::new(Time::ZERO, cfg, key_of("a"), Some(resume));
    // Its shell's report of an older window does not move it back.
    node.handle_progress(t(1), window_progress(400, 100));
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
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
            Message::Join(j) => Some(*j),
            _ => None,
        })
        .expect("a join");
    assert_eq!(
        (join.readable, join.have, join.holds_from),
        (false, 400, 400)
    );
    node.say(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: Some(1000),
            image: IMAGE,
            resume_from: 400,
            run: RUN,
            encoding: Default::default(),
        },
    );
    node.say(t(2), ConnId(1), under_node_5(1));
    assert!(matches!(
        ask_from(&mut node, t(3), 7, 399),
        Message::Refused(r) if r.code == RefusalCode::CannotResume
    ));
    assert_eq!(
        ask_from(&mut node, t(3), 8, 400),
        Message::DataAccepted { from: 400 }
    );
}

/// Connects `node` to its upstream on `conn` and delivers `answer` to its
/// data hello; returns what the node sent and did.
fn upstream_answers(
    node: &mut Node,
    now: Time,
    conn: u64,
    answer: Message,
) -> (Vec<(ConnId, Message)>, Vec<NodeAction>) {
    let acts = actions(node);
    assert!(
        acts.iter()
            .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })),
        "no connection to the upstream: {acts:?}"
    );
    node.handle_upstream_connected(now, ConnId(conn), Nonce([0x50; 32]));
    node.say(
        now,
        ConnId(conn),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([conn as u8; 32]),
        },
    );
    let hello = sent(node);
    assert!(hello
        .iter()
        .any(|(c, m)| *c == ConnId(conn) && matches!(m, Message::DataHello { .. })));
    node.say(now, ConnId(conn), answer);
    (sent(node), actions(node))
}

fn cannot_resume() -> Message {
    Message::Refused(ka_core::codec::Refusal::new(
        RefusalCode::CannotResume,
        "offset 300 has left this node's window (it holds from 700)".into(),
    ))
}

#[test]
fn a_node_its_upstream_cannot_serve_tells_the_source_once_and_waits_for_a_new_place() {
    let mut node = welcomed_node(None, 1, 0);
    node.say(t(2), ConnId(1), under_node_5(4));
    node.handle_progress(t(2), window_progress(300, 0));
    let (msgs, acts) = upstream_answers(&mut node, t(3), 2, cannot_resume());
    let stranded = |msgs: &[(ConnId, Message)]| {
        msgs.iter()
            .filter_map(|(c, m)| match m {
                Message::Stranded { epoch, from } if *c == ConnId(1) => Some((epoch.0, *from)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(stranded(&msgs), [(4, 300)]);
    assert!(acts.contains(&NodeAction::Close { conn: ConnId(2) }));
    assert!(std::iter::from_fn(|| node.poll_event()).any(|e| matches!(
        e,
        NodeEvent::Stranded {
            upstream: NodeId(5),
            from: 300,
            ..
        }
    )));
    // It does not knock on that upstream again by itself.
    for ms in (100..5000).step_by(100) {
        node.handle_timeout(t(ms));
        let acts = actions(&mut node);
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, NodeAction::ConnectUpstream { .. })),
            "reconnected at {ms} ms: {acts:?}"
        );
        // The source is there all along.
        node.say(t(ms), ConnId(1), Message::Heartbeat);
        sent(&mut node);
    }
    // A newer placement that keeps that upstream crossed its report: it
    // asks once more, and a second refusal is reported for this placement.
    node.say(t(5000), ConnId(1), under_node_5(6));
    let (msgs, _) = upstream_answers(&mut node, t(5001), 3, cannot_resume());
    assert_eq!(stranded(&msgs), [(6, 300)]);
    // The source takes it in: it connects there and is served.
    node.say(t(5002), ConnId(1), topology(7, vec![NodeId(9)]));
    let (msgs, acts) = upstream_answers(&mut node, t(5003), 4, Message::DataAccepted { from: 300 });
    assert!(stranded(&msgs).is_empty());
    assert!(acts.contains(&NodeAction::Receive {
        conn: ConnId(4),
        from: 300
    }));
}

/// A source whose nodes keep a bounded window, started with `names` joined
/// in order on connections 1, 2, …: a chain in that order.
fn window_source(names: &[&str], arity: u32, size: u64) -> Source {
    let mut cfg = config(names.len() as u32);
    cfg.arity = arity;
    cfg.image_size = Some(size);
    cfg.image_id = IMAGE;
    cfg.order = names.iter().map(|n| n.to_string()).collect();
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, size);
    for (i, name) in names.iter().enumerate() {
        window_join(&mut src, Time::ZERO, i as u64 + 1, name, 0, 0);
    }
    assert_eq!(src.state(), SourceState::Streaming);
    src
}

/// Joins `name` with a sink that cannot be read back, holding `have` and
/// serving from `holds_from`.
fn window_join(
    src: &mut Source,
    now: Time,
    conn: u64,
    name: &str,
    have: u64,
    holds_from: u64,
) -> Vec<Message> {
    join_edited(src, now, conn, name, &ROOT, |j| {
        j.readable = false;
        j.have = have;
        j.holds_from = holds_from;
        j.image = (have > 0).then_some(IMAGE);
    })
}

fn report(src: &mut Source, now: Time, conn: u64, received: u64, holds_from: u64) {
    src.say(
        now,
        ConnId(conn),
        Message::Progress(window_progress(received, holds_from)),
    );
}

/// The upstream each topology message in `sent` names for the node on `conn`.
fn told_upstream(sent: &[(ConnId, Message)], conn: u64) -> Vec<Option<NodeId>> {
    sent.iter()
        .filter_map(|(c, m)| match m {
            Message::Topology {
                upstream: Some(u), ..
            } if *c == ConnId(conn) => Some(u.node),
            _ => None,
        })
        .collect()
}

#[test]
fn a_stranded_node_is_fed_by_the_source_with_the_nodes_it_feeds() {
    let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
    let mut src = window_source(&["a", "b", "c"], 1, 10_000);
    drain(&mut src);
    events(&mut src);
    let epoch = src.epoch();
    src.say(t(10), ConnId(2), Message::Stranded { epoch, from: 300 });
    assert_eq!(src.topology().children(None), &[a, b]);
    assert_eq!(src.topology().parent(c), Some(Some(b)), "b still feeds c");
    let sent = drain(&mut src);
    assert_eq!(told_upstream(&sent, 2), [None]);
    assert!(
        sent.iter().any(|(conn, m)| *conn == ConnId(1)
            && matches!(m, Message::Topology { downstreams, .. } if downstreams.is_empty())),
        "a hears it no longer feeds b: {sent:?}"
    );
    assert!(events(&mut src).contains(&SourceEvent::Stranded {
        node: b,
        upstream: a,
        from: 300
    }));
    // The same report again, or one from a node the source feeds, changes
    // nothing.
    let now_epoch = src.epoch();
    src.say(t(11), ConnId(2), Message::Stranded { epoch, from: 300 });
    assert_eq!(src.epoch(), now_epoch);
    assert!(drain(&mut src).is_empty());
}

#[test]
fn a_stranded_report_about_an_older_placement_is_ignored() {
    let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
    let mut src = window_source(&["a", "b", "c"], 1, 10_000);
    let placed_at = src.epoch();
    // b dies; c moves up to a (a's window still holds c's offset 0).
    src.handle_closed(t(10), ConnId(2));
    assert_eq!(src.topology().parent(c), Some(Some(a)));
    drain(&mut src);
    // c's report about its placement under b crossed the new one: stale.
    let epoch = src.epoch();
    src.say(
        t(11),
        ConnId(3),
        Message::Stranded {
            epoch: placed_at,
            from: 0,
        },
    );
    assert_eq!(src.topology().parent(c), Some(Some(a)));
    assert_eq!(src.epoch(), epoch);
    // About its current placement, it is acted on.
    src.say(t(12), ConnId(3), Message::Stranded { epoch, from: 0 });
    assert_eq!(src.topology().parent(c), Some(None));
    assert!(!src.topology().contains(b));
}

#[test]
fn a_dead_nodes_children_go_to_its_parent_only_if_its_window_still_holds_them() {
    // source -> a -> b -> c -> d, every node keeping a window.
    let names = ["a", "b", "c", "d"];
    let (a, b, c, d) = (NodeId(1), NodeId(2), NodeId(3), NodeId(4));
    let mut src = window_source(&names, 1, 100_000);
    assert_eq!(src.topology().children(Some(a)), &[b]);
    // a is far ahead, its window starts at 5000; c lags at 3000.
    report(&mut src, t(5), 1, 9000, 5000);
    report(&mut src, t(5), 2, 8000, 4000);
    report(&mut src, t(5), 3, 3000, 0);
    drain(&mut src);
    events(&mut src);
    // b dies: its child c lacks 3000, which a no longer holds.
    src.handle_closed(t(6), ConnId(2));
    assert_eq!(src.topology().parent(c), Some(None), "the source feeds c");
    assert_eq!(src.topology().parent(d), Some(Some(c)), "c still feeds d");
    assert!(events(&mut src).contains(&SourceEvent::Relinked {
        node: c,
        upstream: None
    }));
    assert_eq!(told_upstream(&drain(&mut src), 3), [None]);
    // Were c at 6000, a would have kept it.
    let mut src = window_source(&names, 1, 100_000);
    report(&mut src, t(5), 1, 9000, 5000);
    report(&mut src, t(5), 2, 8000, 4000);
    report(&mut src, t(5), 3, 6000, 0);
    src.handle_closed(t(6), ConnId(2));
    assert_eq!(src.topology().parent(c), Some(Some(a)));
}

#[test]
fn a_late_window_node_goes_under_the_tail_only_if_the_tail_still_holds_its_prefix() {
    let mut cfg = config(3);
    cfg.image_size = Some(100_000);
    cfg.image_id = IMAGE;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, 100_000);
    window_join(&mut src, Time::ZERO, 1, "a", 0, 0);
    src.handle_go(t(1));
    // a's window starts at 0: a newcomer holding nothing goes under it.
    window_join(&mut src, t(2), 2, "b", 0, 0);
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(1))));
    // b's window has moved past 0 by its report: the next one holding
    // nothing is fed by the source, beyond the chain's arity.
    report(&mut src, t(3), 2, 9000, 1000);
    window_join(&mut src, t(4), 3, "c", 0, 0);
    assert_eq!(src.topology().parent(NodeId(3)), Some(None));
    assert_eq!(src.topology().children(None), &[NodeId(1), NodeId(3)]);
    src.topology().check().unwrap();
}

#[test]
fn a_window_node_holds_from_where_its_join_then_its_reports_say() {
    let mut src = file_source(3, 100_000);
    for (conn, name) in [(1, "a"), (2, "b"), (3, "c")] {
        join(&mut src, Time::ZERO, conn, name, &Key(1));
    }
    report(&mut src, t(5), 3, 2000, 0);
    // b comes back as a node keeping a window, holding 4000 and serving
    // from 3000; it goes under the tail c, which is readable.
    src.handle_closed(t(6), ConnId(2));
    window_join(&mut src, t(7), 4, "b", 4000, 3000);
    assert_eq!(src.topology().parent(NodeId(2)), Some(Some(NodeId(3))));
    assert!(!src.holds(Some(NodeId(2)), 2999));
    assert!(src.holds(Some(NodeId(2)), 3000));
    // Its window moves on; a stale report does not move it back.
    report(&mut src, t(8), 4, 4500, 3500);
    report(&mut src, t(8), 4, 4500, 100);
    assert!(!src.holds(Some(NodeId(2)), 3499));
    assert!(src.holds(Some(NodeId(2)), 3500));
    assert!(src.holds(None, 0), "the source holds everything");
    assert!(
        src.holds(Some(NodeId(1)), 0),
        "a readable node holds everything"
    );
    // A node whose prefix is of another image starts over: its window
    // starts at 0 again.
    src.handle_closed(t(9), ConnId(4));
    join_edited(&mut src, t(10), 5, "b", &ROOT, |j| {
        (j.readable, j.have, j.holds_from) = (false, 4000, 3000);
        j.image = Some(ImageId([8; 32]));
    });
    assert!(src.holds(Some(NodeId(2)), 0));
}

#[test]
fn a_slow_node_goes_under_the_tail_only_if_the_tail_holds_its_offset() {
    let mut cfg = config(3);
    cfg.slow_lag = 1000;
    cfg.slow_window = Duration::from_secs(1);
    cfg.image_size = Some(10_000_000);
    cfg.image_id = IMAGE;
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, 10_000_000);
    for (conn, name) in [(1, "a"), (2, "b"), (3, "c")] {
        window_join(&mut src, Time::ZERO, conn, name, 0, 0);
    }
    // a races ahead, b crawls; c, which came back holding more than b
    // after a restart, keeps a window that has moved past where b is.
    let evs = drive_progress(&mut src, |src, step, now| {
        report(src, now, 1, step * 100_000, 0);
        report(src, now, 2, step * 10, 0);
        report(src, now, 3, step * 20, step * 20);
    });
    assert!(evs.contains(&SourceEvent::Slow {
        node: NodeId(2),
        policy: SlowPolicy::MoveToTail
    }));
    // c moved up to a (a holds from 0); the tail c does not hold b's
    // offset, so the source feeds b.
    assert_eq!(src.topology().parent(NodeId(3)), Some(Some(NodeId(1))));
    assert_eq!(src.topology().parent(NodeId(2)), Some(None));
}

#[test]
fn a_restarted_source_feeds_a_window_node_itself_when_its_upstream_holds_too_little() {
    // The nodes come back to a new source process with different prefixes;
    // the chain puts the most advanced first, but b's window starts after
    // c's prefix.
    let mut cfg = config(3);
    cfg.image_size = Some(100_000);
    cfg.image_id = IMAGE;
    cfg.join_timeout = Some(Duration::from_secs(1));
    let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
    src.handle_image_progress(Time::ZERO, 100_000);
    // They come back at once: the last join starts the stream before
    // anyone reported progress, so the windows are those the joins say.
    window_join(&mut src, t(1), 1, "a", 9000, 5000);
    window_join(&mut src, t(1), 2, "b", 6000, 3500);
    let answers = window_join(&mut src, t(1), 3, "c", 3000, 0);
    assert_eq!(src.state(), SourceState::Streaming);
    let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
    assert_eq!(src.topology().parent(a), Some(None));
    assert_eq!(src.topology().parent(b), Some(Some(a)), "a holds from 5000");
    assert_eq!(src.topology().parent(c), Some(None), "b holds from 3500");
    let told: Vec<(ConnId, Message)> = answers.into_iter().map(|m| (ConnId(3), m)).collect();
    assert_eq!(told_upstream(&told, 3), [None]);
}

// ----- a model of nodes, some keeping a window, around the real source -----
//
// The nodes here are a model of what the node machine and its data plane do
// (received offsets, windows, refusals, Stranded reports, rejoining after
// losing the source), stepped every 50 ms; the source is the real one. Data
// moves whole steps at a time with no latency: the point is the source's
// placements, which the model checks as they are sent.

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The image, in model units.
    pub const SIZE: u64 = 20_000;
    /// Units a node receives per step at full speed; a slow one gets an
    /// eighth.
    const RATE: u64 = 200;
    const STEP_MS: u64 = 50;

    /// One node of a scenario.
    #[derive(Debug, Clone)]
    pub struct Spec {
        /// It serves anything it wrote; else only its last `window` units.
        pub readable: bool,
        pub window: u64,
        /// It starts this late (0: on time).
        pub join_ms: u64,
    }

    #[derive(Debug, Clone)]
    pub enum Fault {
        /// Killed for good.
        Kill,
        /// Killed, and back after this long with what it held (and an
        /// empty window).
        Restart(u64),
        /// Frozen this long: it neither sends, receives nor reads.
        Hang(u64),
        /// Its port slows to an eighth for good.
        Slow,
    }

    #[derive(Debug, Clone)]
    pub struct Scenario {
        pub arity: u32,
        pub nodes: Vec<Spec>,
        /// (ms, node, fault), in time order.
        pub faults: Vec<(u64, usize, Fault)>,
    }

    enum Input {
        Msg(Message),
        Closed,
    }

    struct ModelNode {
        name: String,
        spec: Spec,
        control: Option<ConnId>,
        id: Option<NodeId>,
        received: u64,
        holds_from: u64,
        epoch: u64,
        /// `Some(None)`: the source.
        upstream: Option<Option<NodeId>>,
        /// Its data connection to `upstream` is accepted.
        fed: bool,
        /// Refused for want of data at this placement, and said so.
        stranded: Option<u64>,
        image_done: bool,
        verified: bool,
        slow: bool,
        frozen_until: Option<u64>,
        inbox: Vec<Input>,
        /// No process (killed, or between a restart and its start).
        down: bool,
        /// Killed for good.
        gone: bool,
        start_at: Option<u64>,
        released: bool,
        /// When its last hang or restart ended.
        healed_at: u64,
    }

    impl ModelNode {
        fn serves_from(&self) -> u64 {
            if self.spec.readable {
                0
            } else {
                self.holds_from
            }
        }
        fn running(&self, now: u64) -> bool {
            !self.down && !self.released && self.frozen_until.is_none_or(|t| t <= now)
        }
    }

    /// What a run saw.
    #[derive(Debug, Default)]
    pub struct Seen {
        pub stranded_reports: usize,
        pub fed_by_source_beyond_arity: bool,
        pub placements: usize,
    }

    pub struct World {
        src: Source,
        nodes: Vec<ModelNode>,
        by_conn: BTreeMap<ConnId, usize>,
        next_conn: u64,
        now: u64,
        pub seen: Seen,
        arity: u32,
        /// The first placement that broke the rule, or an abort.
        error: Option<String>,
    }

    impl World {
        pub fn new(scenario: &Scenario) -> World {
            let mut cfg = config(scenario.nodes.len() as u32);
            cfg.arity = scenario.arity;
            cfg.image_size = Some(SIZE);
            cfg.image_id = IMAGE;
            cfg.join_timeout = Some(Duration::from_millis(100));
            cfg.slow_lag = 4 * RATE;
            cfg.slow_window = Duration::from_secs(1);
            let mut src = Source::new(Time::ZERO, cfg, Box::new(Key(1)));
            src.handle_image_progress(Time::ZERO, SIZE);
            src.handle_image_done(Time::ZERO, SIZE, Digest([5; 32]), None);
            let nodes = scenario
                .nodes
                .iter()
                .enumerate()
                .map(|(i, spec)| ModelNode {
                    name: format!("n{i}"),
                    spec: spec.clone(),
                    control: None,
                    id: None,
                    received: 0,
                    holds_from: 0,
                    epoch: 0,
                    upstream: None,
                    fed: false,
                    stranded: None,
                    image_done: false,
                    verified: false,
                    slow: false,
                    frozen_until: None,
                    inbox: Vec::new(),
                    down: true,
                    gone: false,
                    start_at: Some(spec.join_ms),
                    released: false,
                    healed_at: spec.join_ms,
                })
                .collect();
            World {
                src,
                nodes,
                by_conn: BTreeMap::new(),
                next_conn: 1,
                now: 0,
                seen: Seen::default(),
                arity: scenario.arity,
                error: None,
            }
        }

        fn time(&self) -> Time {
            t(self.now)
        }

        /// Runs until the session ends or `limit_ms`; returns the report's
        /// verdict on each node that was not killed for good.
        pub fn run(&mut self, scenario: &Scenario, limit_ms: u64) -> Result<(), String> {
            let mut faults = scenario.faults.iter().peekable();
            while self.now <= limit_ms {
                while let Some((_, i, f)) = faults.next_if(|(at, _, _)| *at <= self.now) {
                    self.fault(*i, f);
                }
                self.start_due();
                self.thaw_due();
                self.move_data();
                self.report();
                if self
                    .src
                    .poll_timeout()
                    .is_some_and(|(at, _)| at <= self.time())
                {
                    self.src.handle_timeout(self.time());
                    self.after_input();
                }
                if let Some(e) = self.error.take() {
                    return Err(e);
                }
                self.src.topology().check()?;
                if matches!(
                    self.src.state(),
                    SourceState::Finished | SourceState::Aborted
                ) {
                    break;
                }
                self.now += STEP_MS;
            }
            if self.src.state() != SourceState::Finished {
                let stuck: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| !n.gone && !n.verified)
                    .map(|n| {
                        format!(
                            "{} at {} upstream {:?} fed {} stranded {:?} epoch {}",
                            n.name, n.received, n.upstream, n.fed, n.stranded, n.epoch
                        )
                    })
                    .collect();
                return Err(format!(
                    "session {:?} at {} ms; not done: {stuck:?}",
                    self.src.state(),
                    self.now
                ));
            }
            let report = self.src.report();
            // A node still on its way back (late, restarting, frozen, or
            // declared dead for it and rejoining) when everyone else was
            // done cannot have finished: its KO is right.
            let back = |n: &&ModelNode| n.start_at.is_none() && n.healed_at + 1500 <= self.now;
            for n in self.nodes.iter().filter(|n| !n.gone).filter(back) {
                let line = report
                    .iter()
                    .find(|r| r.name == n.name)
                    .ok_or_else(|| format!("{} is not in the report", n.name))?;
                if !line.is_ok() {
                    return Err(format!("survivor {} ended {:?}", n.name, line.outcome));
                }
            }
            Ok(())
        }

        fn fault(&mut self, i: usize, fault: &Fault) {
            let now = self.now;
            if self.nodes[i].down || self.nodes[i].released {
                return;
            }
            match *fault {
                Fault::Kill | Fault::Restart(_) => {
                    let n = &mut self.nodes[i];
                    n.down = true;
                    n.gone = matches!(fault, Fault::Kill);
                    n.start_at = match *fault {
                        Fault::Restart(d) => Some(now + d),
                        _ => None,
                    };
                    n.healed_at = n.healed_at.max(n.start_at.unwrap_or(now));
                    n.inbox.clear();
                    n.frozen_until = None;
                    if let Some(c) = n.control.take() {
                        self.src.handle_closed(self.time(), c);
                        self.after_input();
                    }
                }
                Fault::Hang(d) => {
                    let n = &mut self.nodes[i];
                    n.frozen_until = Some(now + d);
                    n.healed_at = n.healed_at.max(now + d);
                }
                Fault::Slow => self.nodes[i].slow = true,
            }
        }

        /// Starts (or restarts) the nodes due: each joins with what it holds.
        fn start_due(&mut self) {
            for i in 0..self.nodes.len() {
                let n = &mut self.nodes[i];
                if n.released || n.start_at.is_none_or(|at| at > self.now) {
                    continue;
                }
                n.start_at = None;
                if n.down {
                    // A new process: its window starts empty.
                    n.down = false;
                    n.holds_from = n.received;
                }
                n.upstream = None;
                n.fed = false;
                n.stranded = None;
                n.epoch = 0;
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                n.control = Some(conn);
                self.by_conn.insert(conn, i);
                let (readable, have, holds_from) = (n.spec.readable, n.received, n.serves_from());
                let name = n.name.clone();
                send_join(&mut self.src, t(self.now), conn.0, &name, &ROOT, |j| {
                    j.readable = readable;
                    j.have = have;
                    j.holds_from = holds_from;
                    j.image = (have > 0).then_some(IMAGE);
                });
                self.after_input();
            }
        }

        fn thaw_due(&mut self) {
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .frozen_until
                    .is_some_and(|until| until <= self.now)
                {
                    self.nodes[i].frozen_until = None;
                    let inbox = core::mem::take(&mut self.nodes[i].inbox);
                    for input in inbox {
                        self.node_input(i, input);
                    }
                }
            }
        }

        fn index_of(&self, id: NodeId) -> Option<usize> {
            self.nodes.iter().position(|n| n.id == Some(id))
        }

        /// One step of the data plane: connections are made or refused,
        /// windows drop who fell behind, and data flows.
        fn move_data(&mut self) {
            for i in 0..self.nodes.len() {
                if !self.nodes[i].running(self.now)
                    || self.nodes[i].control.is_none()
                    || self.nodes[i].received >= SIZE
                {
                    continue;
                }
                let Some(up) = self.nodes[i].upstream else {
                    continue;
                };
                // The upstream's side: who it is, what it holds.
                let upstream = up.map(|id| self.index_of(id).expect("placed nodes joined"));
                let (available, serves_from, up_running) = match upstream {
                    None => (SIZE, 0, true),
                    Some(u) => {
                        let p = &self.nodes[u];
                        (p.received, p.serves_from(), p.running(self.now))
                    }
                };
                let n = &mut self.nodes[i];
                if n.fed && n.received < serves_from {
                    // The upstream's data plane finds the data gone and
                    // closes the connection.
                    n.fed = false;
                }
                if !n.fed {
                    if n.stranded.is_some() || !up_running {
                        continue;
                    }
                    if n.received < serves_from {
                        // Refused with CannotResume: said once per placement.
                        let (epoch, from, conn) =
                            (n.epoch, n.received, n.control.expect("checked"));
                        n.stranded = Some(epoch);
                        self.seen.stranded_reports += 1;
                        let now = t(self.now);
                        self.src.say(
                            now,
                            conn,
                            Message::Stranded {
                                epoch: ka_core::ids::Epoch(epoch),
                                from,
                            },
                        );
                        self.after_input();
                        continue;
                    }
                    n.fed = true;
                }
                if !up_running {
                    continue;
                }
                let rate = if n.slow { RATE / 8 } else { RATE };
                n.received = available.min(n.received + rate).max(n.received);
                if !n.spec.readable {
                    n.holds_from = n.holds_from.max(n.received.saturating_sub(n.spec.window));
                }
            }
        }

        /// Every running node's heartbeat, and its verdict once it has it all.
        fn report(&mut self) {
            let now = t(self.now);
            for i in 0..self.nodes.len() {
                let n = &mut self.nodes[i];
                let Some(conn) = n.control.filter(|_| n.running(self.now) && n.id.is_some()) else {
                    continue;
                };
                let progress = Progress {
                    received: n.received,
                    written: n.received,
                    holds_from: n.serves_from(),
                };
                let verdict = n.received >= SIZE && n.image_done && !n.verified;
                n.verified |= verdict;
                self.src.say(now, conn, Message::Progress(progress));
                self.after_input();
                if verdict {
                    let ok = Message::Verified {
                        ok: true,
                        reason: String::new(),
                    };
                    self.src.say(now, conn, ok);
                    self.after_input();
                }
            }
        }

        /// Carries out what the source said after an input, keeping the
        /// first error.
        fn after_input(&mut self) {
            if let Err(e) = self.deliver() {
                self.error.get_or_insert(e);
            }
        }

        /// Hands the source's messages and closes to the nodes, checking
        /// every placement as it is sent, until the source has nothing more
        /// to say.
        fn deliver(&mut self) -> Result<(), String> {
            loop {
                let mut any = false;
                while let Some((conn, msg)) = self.src.poll_transmit() {
                    let msg = open_from_source(conn, msg);
                    any = true;
                    self.check_placement(conn, &msg)?;
                    if let Some(&i) = self.by_conn.get(&conn) {
                        self.hand_to_node(i, conn, Input::Msg(msg));
                    }
                }
                while let Some(action) = self.src.poll_action() {
                    if let SourceAction::Close { conn } = action {
                        any = true;
                        if let Some(&i) = self.by_conn.get(&conn) {
                            self.hand_to_node(i, conn, Input::Closed);
                        }
                    }
                }
                while let Some(ev) = self.src.poll_event() {
                    if let SourceEvent::Aborted { reason } = ev {
                        return Err(format!("aborted: {reason}"));
                    }
                }
                if !any {
                    return Ok(());
                }
            }
        }

        /// A topology that gives a node a new upstream names one that
        /// holds its offset, as the source knows it, or the source itself.
        fn check_placement(&mut self, conn: ConnId, msg: &Message) -> Result<(), String> {
            let Message::Topology {
                upstream: Some(up), ..
            } = msg
            else {
                return Ok(());
            };
            let Some(&i) = self.by_conn.get(&conn) else {
                return Ok(());
            };
            let n = &self.nodes[i];
            if n.upstream == Some(up.node) {
                return Ok(());
            }
            self.seen.placements += 1;
            let id = n.id.ok_or("a topology before the welcome")?;
            let at = self.src.progress(id).expect("a record").received;
            if !self.src.holds(up.node, at) {
                return Err(format!(
                    "{} placed under {:?}, which does not hold its offset {at} (holds from {:?})",
                    n.name,
                    up.node,
                    up.node.and_then(|p| self.src.progress(p))
                ));
            }
            if self.src.topology().children(None).len() > self.arity as usize {
                self.seen.fed_by_source_beyond_arity = true;
            }
            Ok(())
        }

        fn hand_to_node(&mut self, i: usize, conn: ConnId, input: Input) {
            if self.nodes[i].control != Some(conn) {
                return; // an older connection of a restarted node
            }
            if self.nodes[i].frozen_until.is_some_and(|t| t > self.now) {
                self.nodes[i].inbox.push(input);
                return;
            }
            self.node_input(i, input);
        }

        fn node_input(&mut self, i: usize, input: Input) {
            let now = self.now;
            let n = &mut self.nodes[i];
            if n.down || n.released {
                return;
            }
            match input {
                Input::Closed => {
                    // Lost the source: keep the copy, rejoin shortly.
                    n.control = None;
                    n.start_at = Some(now + 200);
                }
                Input::Msg(Message::Welcome { node, .. }) => {
                    n.id = Some(node);
                    // Its verdict, if it has one, is said again to the new
                    // record the source keeps of it.
                    n.verified = false;
                }
                Input::Msg(Message::ImageDone { .. }) => n.image_done = true,
                Input::Msg(Message::Release) => {
                    n.released = true;
                    let conn = n.control.take().expect("released on its connection");
                    self.src.handle_closed(t(now), conn);
                }
                Input::Msg(Message::Topology {
                    epoch, upstream, ..
                }) => {
                    if epoch.0 < n.epoch {
                        return;
                    }
                    n.epoch = epoch.0;
                    let up = upstream.map(|u| u.node);
                    if up != n.upstream {
                        n.upstream = up;
                        n.fed = false;
                        n.stranded = None;
                    } else if n.stranded.is_some_and(|at| at < epoch.0) {
                        n.stranded = None;
                    }
                }
                Input::Msg(Message::Refused(_)) => {
                    // It leaves; the end check says whether that was right.
                    n.released = true;
                    n.control = None;
                }
                Input::Msg(Message::Heartbeat | Message::Challenge { .. }) => {}
                Input::Msg(other) => panic!("{} got an unexpected {other:?}", n.name),
            }
        }
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            300u64..4000,
            prop_oneof![3 => Just(0u64), 1 => 1u64..1500],
        )
            .prop_map(|(readable, window, join_ms)| Spec {
                readable,
                window,
                join_ms,
            })
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            Just(Fault::Kill),
            (50u64..1500).prop_map(Fault::Restart),
            (100u64..2500).prop_map(Fault::Hang),
            Just(Fault::Slow),
        ]
    }

    pub fn scenario() -> impl Strategy<Value = Scenario> {
        (1u32..4, proptest::collection::vec(spec(), 2..9), 0usize..5).prop_flat_map(
            |(arity, mut nodes, nfaults)| {
                // Someone is there at the start, or the session rightly aborts.
                nodes[0].join_ms = 0;
                let n = nodes.len();
                proptest::collection::vec((200u64..6000, 0..n, fault()), nfaults).prop_map(
                    move |mut faults| {
                        faults.sort_by_key(|f| f.0);
                        Scenario {
                            arity,
                            nodes: nodes.clone(),
                            faults,
                        }
                    },
                )
            },
        )
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    #[test]
    fn every_survivor_verifies_and_every_placement_holds_with_window_nodes(
        scenario in model::scenario()
    ) {
        let mut world = model::World::new(&scenario);
        let verdict = world.run(&scenario, 300_000);
        proptest::prop_assert!(verdict.is_ok(), "{:?}\n{scenario:?}", verdict);
    }
}

#[test]
fn the_window_model_strands_and_feeds_from_the_source_beyond_the_arity() {
    // A chain of window nodes; the second slows to an eighth, so it falls
    // out of its upstream's window and the nodes behind it out of its.
    let window = |w| model::Spec {
        readable: false,
        window: w,
        join_ms: 0,
    };
    let scenario = model::Scenario {
        arity: 1,
        nodes: vec![window(1000), window(1000), window(1000), window(1000)],
        faults: vec![(500, 1, model::Fault::Slow), (2000, 2, model::Fault::Kill)],
    };
    let mut world = model::World::new(&scenario);
    let verdict = world.run(&scenario, 300_000);
    assert!(verdict.is_ok(), "{verdict:?}");
    assert!(world.seen.stranded_reports > 0, "{:?}", world.seen);
    assert!(world.seen.fed_by_source_beyond_arity, "{:?}", world.seen);
}

/// The lines of every `Log` message in `sent`.
fn log_lines(sent: &[(ConnId, Message)]) -> Vec<String> {
    sent.iter()
        .filter_map(|(_, m)| match m {
            Message::Log { lines } => Some(lines.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_nodes_log_lines_wait_for_its_welcome_and_then_go_sealed() {
    let mut node = Node::new(
        Time::ZERO,
        NodeConfig::new("s", "a", addr(2)),
        key_of("a"),
        None,
    );
    node.handle_log(Time::ZERO, ["before the source".to_string()]);
    assert!(
        node.poll_transmit().is_none(),
        "nothing goes before a welcome"
    );
    node.handle_source_connected(t(1), ConnId(1), Nonce([0x40; 32]));
    node.say(
        t(1),
        ConnId(1),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([0; 32]),
        },
    );
    assert!(log_lines(&sent(&mut node)).is_empty(), "nor with the join");
    node.say(
        t(1),
        ConnId(1),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: None,
            image: IMAGE,
            resume_from: 0,
            run: RUN,
            encoding: Default::default(),
        },
    );
    // `sent` opens every sealed message: a log in the clear would not be
    // a `Log` here but fail to open.
    assert_eq!(log_lines(&sent(&mut node)), ["before the source"]);
    let many: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
    node.handle_log(t(2), many.clone());
    let sent = sent(&mut node);
    let messages = sent
        .iter()
        .filter(|(_, m)| matches!(m, Message::Log { .. }))
        .count();
    assert_eq!(messages, 4, "100 lines in messages of at most 32");
    assert_eq!(log_lines(&sent), many);
}

#[test]
fn a_node_keeps_a_bounded_number_of_lines_while_it_has_no_source() {
    let mut node = welcomed_node(None, 1, 0);
    sent(&mut node);
    node.handle_closed(t(2), ConnId(1));
    let flood: Vec<String> = (0..1000).map(|i| format!("line {i}")).collect();
    node.handle_log(t(2), flood);
    node.handle_source_connected(t(3), ConnId(2), Nonce([0x41; 32]));
    node.say(
        t(3),
        ConnId(2),
        Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce([1; 32]),
        },
    );
    node.say(
        t(3),
        ConnId(2),
        Message::Welcome {
            node: NodeId(1),
            heartbeat_ms: 250,
            dead_after_ms: 1000,
            image_size: None,
            image: IMAGE,
            resume_from: 0,
            run: RUN,
            encoding: Default::default(),
        },
    );
    let lines = log_lines(&sent(&mut node));
    let kept = ka_core::node::MAX_PENDING_LOG;
    assert_eq!(lines.len(), kept + 1, "the lines kept and one note");
    assert_eq!(lines[0], "line 0");
    assert_eq!(lines[kept - 1], format!("line {}", kept - 1));
    assert_eq!(
        lines[kept],
        format!(
            "ka: {} lines dropped while the source was away",
            1000 - kept
        )
    );
}
