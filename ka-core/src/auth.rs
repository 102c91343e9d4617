//! Keys, proofs and authenticated connections.
//!
//! The core decides which key proves what, what every proof covers, and
//! which messages a connection accepts; the keyed primitives themselves
//! (a MAC, a key derivation, a keystream) are supplied by the shell through
//! [`Mac`] (keyed BLAKE3 in ka-net), which keeps cryptography out of the pure
//! core and lets the simulator use a cheap stand-in.
//!
//! # Keys
//!
//! The source holds the session's *root* key (ka-net derives it from the
//! session secret and the session name). Everything else derives from it,
//! and nobody below the source holds more than its own share:
//!
//! | key | derivation | held by |
//! |---|---|---|
//! | a node's key | [`node_key`]: root, `"node"`, its name | the source, and that node only |
//! | the operator key | [`operator_key`]: root, `"operator"` | the source, and `ka go` (which holds the secret) |
//! | the source's data key | [`source_data_key`]: root, `"source data"` | the source only |
//! | a link's ticket | [`link_ticket`]: the upstream's key (a node's, or the source's data key), the source's run, the downstream's id | the upstream (derives it), the downstream (handed it, encrypted, in its [`Message::Topology`]) |
//! | a connection's keys | [`Channel::new`]: the key proved in its handshake, both nonces, a direction | the two ends of that connection |
//!
//! So a key leaked from one node lets an attacker act as that node only: it
//! cannot prove another node's key, the operator's or the root, and the
//! tickets it can learn are those of links that node is an end of.
//!
//! # Handshakes
//!
//! Every connection starts with a [`Message::Challenge`] from the accepting
//! side (the *server*: the source, or the upstream of a data link) carrying
//! its fresh nonce. The connecting side (the *client*) answers with a
//! message carrying its own fresh nonce and a proof: a MAC with its key
//! over the server's nonce and every other field of the message
//! ([`join_proof`], [`hello_proof`], [`go_proof`], [`join_failed_proof`]). The server checks it
//! with the key it derives for the name (or ticket, or operator) the
//! message claims; then both ends derive the connection's keys from that
//! key and both nonces ([`Channel`]). The server's first sealed message (a
//! [`Message::Welcome`], a [`Message::DataAccepted`], a
//! [`Message::GoAck`]) is its proof over the client's nonce: the client
//! acts on nothing the server says before one opens.
//!
//! After the handshake every message travels sealed ([`Message::Sealed`]):
//! a MAC with the connection's key for its direction over a sequence number
//! that counts the messages sent that way, and the message. A message
//! injected, replayed, dropped (with any message after it) or reordered
//! does not open, and the connection is dropped. A data connection's
//! records are not sealed: they are covered end to end by the keyed image
//! digest, which the node checks against the one the source sends sealed,
//! so an injected byte makes a node fail, never succeed.
//!
//! A [`Message::Refused`] travels in the clear: a client refused for a bad
//! proof holds no key the server could prove itself with. Acting on one only
//! makes a node leave (or look elsewhere) without writing, which anybody who
//! can cut its connection can cause anyway.

use crate::codec::{Join, JoinFailed, Message, Nonce, RefusalCode, Tag, Ticket, PROTOCOL_VERSION};
use crate::ids::{Epoch, NodeId};

/// The keyed primitives of one key, as the shell implements them (keyed
/// BLAKE3 in ka-net). The machines hold keys only as this trait, never as
/// bytes, except for the tickets they hand on.
pub trait Mac: Send {
    /// The MAC of `message` under this key.
    fn mac(&self, message: &[u8]) -> Tag;
    /// A new key derived from this one for `context` (a pseudo-random
    /// function of the key and the context): different contexts give
    /// independent keys, and the new key tells nothing of this one.
    fn derive(&self, context: &[u8]) -> [u8; 32];
    /// A key of the same kind as this one, from its 32 bytes (a derived
    /// key, a ticket).
    fn keyed(&self, key: &[u8; 32]) -> Box<dyn Mac>;
    /// Fills `out` with the keystream of this key for `context`, to encrypt
    /// by XOR. A context must never be used twice with different
    /// plaintexts.
    fn keystream(&self, context: &[u8], out: &mut [u8]);
}

/// Builds the byte string a proof or derivation covers: a domain, then
/// length-prefixed parts, so no two different (domain, parts) lists encode
/// the same bytes.
fn covered(domain: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + parts.iter().map(|p| p.len() + 4).sum::<usize>());
    out.extend_from_slice(&(domain.len() as u32).to_be_bytes());
    out.extend_from_slice(domain.as_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// What a node's key is derived for, from the root: `"node"` and its name.
/// ka-net derives the same bytes when it writes a node's key file, so the
/// derivation lives here, once.
pub fn node_key_context(name: &str) -> Vec<u8> {
    covered("ka/key/v5", &[b"node", name.as_bytes()])
}

/// What the key of the image digest is derived for, from the root. Every
/// node is handed it with its own key: it authenticates nothing (the digest
/// a node compares with arrives sealed on its own connection), it only
/// keeps the digest of a known image from being recognised by strangers.
pub fn digest_key_context() -> Vec<u8> {
    covered("ka/key/v5", &[b"digest"])
}

/// The key of node `name`, derived from the root.
pub fn node_key(root: &dyn Mac, name: &str) -> Box<dyn Mac> {
    root.keyed(&root.derive(&node_key_context(name)))
}

/// The operator key, derived from the root: `ka go` proves it. A node's key
/// does not give it.
pub fn operator_key(root: &dyn Mac) -> Box<dyn Mac> {
    root.keyed(&root.derive(&covered("ka/key/v5", &[b"operator"])))
}

/// The key the source's own data links derive from ([`link_ticket`]),
/// derived from the root and held by the source only.
pub fn source_data_key(root: &dyn Mac) -> Box<dyn Mac> {
    root.keyed(&root.derive(&covered("ka/key/v5", &[b"source data"])))
}

/// The ticket of the data link from the holder of `upstream` (a node's key,
/// or the source's data key) to node `downstream`, in the source run `run`.
/// The upstream derives it from its own key when the downstream's hello
/// arrives; the source derives it to hand it to the downstream. The run
/// keeps a ticket from outliving the source process that gave it (a
/// restarted source numbers its nodes anew).
pub fn link_ticket(upstream: &dyn Mac, run: &Nonce, downstream: NodeId) -> Ticket {
    Ticket(upstream.derive(&covered(
        "ka/ticket/v5",
        &[&run.0, &downstream.0.to_be_bytes()],
    )))
}

/// The MAC a proof carries: `key` over the server's nonce and `msg` encoded
/// with its proof field zeroed (so every field of the message is covered).
fn message_proof(key: &dyn Mac, domain: &str, server_nonce: &Nonce, msg: &Message) -> Tag {
    key.mac(&covered(domain, &[&server_nonce.0, &msg.encode_body()]))
}

/// The proof a node's join carries: its key over the server's nonce and
/// every field of `join` but the proof.
pub fn join_proof(key: &dyn Mac, server_nonce: &Nonce, join: &Join) -> Tag {
    let bare = Join {
        proof: Tag::default(),
        ..join.clone()
    };
    message_proof(
        key,
        "ka/join/v5",
        server_nonce,
        &Message::Join(Box::new(bare)),
    )
}

/// The proof a node's report that it cannot join carries: its key over the
/// server's nonce and every field of `report` but the proof. Its own
/// domain keeps it from ever passing for a join's proof.
pub fn join_failed_proof(key: &dyn Mac, server_nonce: &Nonce, report: &JoinFailed) -> Tag {
    let bare = JoinFailed {
        proof: Tag::default(),
        ..report.clone()
    };
    message_proof(
        key,
        "ka/join-failed/v6",
        server_nonce,
        &Message::JoinFailed(Box::new(bare)),
    )
}

/// What a data hello asks for: the fields of a [`Message::DataHello`] but
/// its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataHello {
    /// The session.
    pub session: String,
    /// The downstream node.
    pub node: NodeId,
    /// The topology generation it connects for.
    pub epoch: Epoch,
    /// The offset it wants data from.
    pub from: u64,
    /// The downstream's nonce.
    pub nonce: Nonce,
}

impl DataHello {
    /// The message, with `proof`.
    fn message(&self, proof: Tag) -> Message {
        Message::DataHello {
            version: PROTOCOL_VERSION,
            session: self.session.clone(),
            node: self.node,
            epoch: self.epoch,
            from: self.from,
            nonce: self.nonce,
            proof,
        }
    }

    /// The message a downstream sends, proved with the link's `ticket` key
    /// over the upstream's `server_nonce`.
    pub fn proved(&self, ticket: &dyn Mac, server_nonce: &Nonce) -> Message {
        self.message(hello_proof(ticket, server_nonce, self))
    }
}

/// The proof a downstream's data hello carries: the link's ticket over the
/// server's nonce and every field of the hello.
pub fn hello_proof(ticket: &dyn Mac, server_nonce: &Nonce, hello: &DataHello) -> Tag {
    message_proof(
        ticket,
        "ka/hello/v5",
        server_nonce,
        &hello.message(Tag::default()),
    )
}

/// The proof an operator's go carries: the operator key over the server's
/// nonce, the session and the operator's nonce.
pub fn go_proof(operator: &dyn Mac, server_nonce: &Nonce, session: &str, nonce: &Nonce) -> Tag {
    let bare = Message::Go {
        session: session.to_string(),
        nonce: *nonce,
        proof: Tag::default(),
    };
    message_proof(operator, "ka/go/v5", server_nonce, &bare)
}

/// Who asks a discovery question: a node by its name (proved with its key),
/// or the operator (with the operator key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker<'a> {
    /// The node of this name.
    Node(&'a str),
    /// The operator (`ka go`).
    Operator,
}

impl Asker<'_> {
    /// The key this asker holds, as the source derives it from the root.
    pub fn key(&self, root: &dyn Mac) -> Box<dyn Mac> {
        match self {
            Asker::Node(name) => node_key(root, name),
            Asker::Operator => operator_key(root),
        }
    }
}

/// The proof a source's discovery answer carries: the asker's key over the
/// asker's nonce, the session and the TCP port the source names. An answer
/// is worth nothing to anybody but the asker, and only for that question;
/// where it came from is not covered (the address is the packet's, and a
/// relay that moves it gains nothing: the connection it leads to proves the
/// source's key again).
pub fn discovery_proof(key: &dyn Mac, nonce: &Nonce, session: &str, port: u16) -> Tag {
    key.mac(&covered(
        "ka/discovery/v5",
        &[&nonce.0, session.as_bytes(), &port.to_be_bytes()],
    ))
}

/// What a verified data hello asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRequest {
    /// The downstream node.
    pub node: NodeId,
    /// The topology generation it connects for.
    pub epoch: Epoch,
    /// The offset it wants data from.
    pub from: u64,
    /// The downstream's nonce, for the connection's keys.
    pub nonce: Nonce,
}

/// Checks the first message on a data connection: a [`Message::DataHello`]
/// of this protocol version and `session`, whose proof covers the
/// `server_nonce` this side sent, made with the ticket of the link from the
/// holder of `upstream` (this side's key) to the node it names, in `run`.
/// Returns the request and the ticket's key (for the connection's
/// [`Channel`]), or the refusal to send back. Who may connect is the
/// caller's question.
pub fn check_data_hello(
    upstream: &dyn Mac,
    run: &Nonce,
    server_nonce: &Nonce,
    session: &str,
    msg: Message,
) -> Result<(DataRequest, Box<dyn Mac>), (RefusalCode, String)> {
    let Message::DataHello {
        version,
        session: theirs,
        node,
        epoch,
        from,
        nonce,
        proof,
    } = msg
    else {
        return Err((RefusalCode::NotExpected, "expected a data hello".into()));
    };
    if version != PROTOCOL_VERSION || theirs != session {
        let detail = format!("data connection for session {theirs:?} v{version}; this is {session:?} v{PROTOCOL_VERSION}");
        return Err((RefusalCode::WrongSession, detail));
    }
    let hello = DataHello {
        session: theirs,
        node,
        epoch,
        from,
        nonce,
    };
    let ticket = upstream.keyed(&link_ticket(upstream, run, node).0);
    if !tags_equal(&proof, &hello_proof(&*ticket, server_nonce, &hello)) {
        return Err((
            RefusalCode::BadProof,
            format!("data connection for {node} without its link's ticket"),
        ));
    }
    Ok((
        DataRequest {
            node,
            epoch,
            from,
            nonce,
        },
        ticket,
    ))
}

/// Compares two tags in time independent of where they differ, so a
/// stranger cannot learn a valid proof byte by byte from response timing.
pub fn tags_equal(a: &Tag, b: &Tag) -> bool {
    a.0.iter()
        .zip(b.0.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Which end of a connection a [`Channel`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepting side, which sent the challenge.
    Server,
    /// The connecting side, which answered it.
    Client,
}

/// Why a message on an authenticated connection was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A message in the clear where only sealed ones may come.
    #[error("an unauthenticated {0} after the handshake")]
    NotSealed(&'static str),
    /// The MAC did not verify: the message was forged or altered, or one
    /// before it was dropped, replayed or reordered.
    #[error("a message that does not authenticate (forged, altered, replayed, reordered, or one before it dropped)")]
    BadTag,
    /// The MAC verified but the content is no message of this version (a
    /// broken peer), or is one that may not be sealed.
    #[error("a sealed message that is not one: {0}")]
    Invalid(String),
}

/// One connection after its handshake: the keys of its two directions and
/// the count of messages each way.
///
/// [`Channel::seal`] wraps each message to send in a [`Message::Sealed`]
/// whose MAC covers the number of messages sent before it, and
/// [`Channel::open`] checks and unwraps each message received, in order.
/// A [`Message::Topology`]'s ticket, the one secret a message carries, is
/// also encrypted: XORed with the keystream of the sending direction's key
/// for that message's number, before the MAC is computed (encrypt, then
/// MAC).
pub struct Channel {
    send: Box<dyn Mac>,
    recv: Box<dyn Mac>,
    sent: u64,
    received: u64,
}

impl core::fmt::Debug for Channel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Channel")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// The channel of a connection whose handshake proved `key` over the
    /// server's and the client's nonces, for the end `side`.
    pub fn new(key: &dyn Mac, server_nonce: &Nonce, client_nonce: &Nonce, side: Side) -> Channel {
        let conn = key.keyed(&key.derive(&covered(
            "ka/channel/v5",
            &[&server_nonce.0, &client_nonce.0],
        )));
        let to_client = conn.keyed(&conn.derive(&covered("ka/direction/v5", &[b"to client"])));
        let to_server = conn.keyed(&conn.derive(&covered("ka/direction/v5", &[b"to server"])));
        let (send, recv) = match side {
            Side::Server => (to_client, to_server),
            Side::Client => (to_server, to_client),
        };
        Channel {
            send,
            recv,
            sent: 0,
            received: 0,
        }
    }

    /// `msg` sealed for sending: the next message this way. Messages must
    /// go out in the order they were sealed.
    ///
    /// # Panics
    /// If `msg` is a handshake message or already sealed: the machines
    /// never seal one (a programming error, not a peer's).
    pub fn seal(&mut self, mut msg: Message) -> Message {
        assert!(
            !msg.is_handshake() && !matches!(msg, Message::Sealed { .. }),
            "{} is never sealed",
            msg.name()
        );
        let seq = self.sent;
        self.sent += 1;
        crypt_ticket(&*self.send, seq, &mut msg);
        let body = msg.encode_body();
        let tag = self.send.mac(&sealed_covered(seq, &body));
        Message::Sealed { tag, body }
    }

    /// Checks and unwraps `msg`, the next message received: it must be
    /// sealed, its MAC must verify for the number of messages received
    /// before it, and it must hold a message that may be sealed. After an
    /// error the connection is to be dropped: nothing after it can open.
    pub fn open(&mut self, msg: Message) -> Result<Message, OpenError> {
        let Message::Sealed { tag, body } = msg else {
            return Err(OpenError::NotSealed(msg.name()));
        };
        let seq = self.received;
        if !tags_equal(&tag, &self.recv.mac(&sealed_covered(seq, &body))) {
            return Err(OpenError::BadTag);
        }
        self.received += 1;
        let mut inner =
            Message::decode_body(&body).map_err(|e| OpenError::Invalid(e.to_string()))?;
        if inner.is_handshake() || matches!(inner, Message::Sealed { .. }) {
            return Err(OpenError::Invalid(format!(
                "a sealed {} (never sealed)",
                inner.name()
            )));
        }
        crypt_ticket(&*self.recv, seq, &mut inner);
        Ok(inner)
    }
}

/// What a sealed message's MAC covers.
fn sealed_covered(seq: u64, body: &[u8]) -> Vec<u8> {
    covered("ka/sealed/v5", &[&seq.to_be_bytes(), body])
}

/// Encrypts (or decrypts: XOR is its own inverse) the ticket of a
/// topology, with the keystream of `key` for message number `seq`: each
/// number is used once per direction of a connection, so no keystream ever
/// covers two tickets.
fn crypt_ticket(key: &dyn Mac, seq: u64, msg: &mut Message) {
    let Message::Topology {
        upstream: Some(up), ..
    } = msg
    else {
        return;
    };
    let mut stream = [0u8; 32];
    key.keystream(
        &covered("ka/ticket-stream/v5", &[&seq.to_be_bytes()]),
        &mut stream,
    );
    for (b, k) in up.ticket.0.iter_mut().zip(stream) {
        *b ^= k;
    }
}

/// A deterministic, non-cryptographic stand-in for [`Mac`]: cheap, and
/// with every property the protocol relies on except resistance to an
/// adversary who can compute. For the simulator and the tests of the
/// machines, which check the protocol, not the cryptography; ka itself
/// keys BLAKE3 (ka-net).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandInKey(pub u64);

impl StandInKey {
    /// FNV-1a of `message` under the key and a `purpose`, spread over `out`.
    pub fn hash(&self, purpose: u64, message: &[u8], out: &mut [u8]) {
        let mut h = (self.0 ^ 0xcbf2_9ce4_8422_2325 ^ purpose).wrapping_mul(0x100_0000_01b3);
        for &b in message {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            h = (h ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            chunk.copy_from_slice(&h.to_be_bytes()[..chunk.len()]);
        }
    }
}

impl Mac for StandInKey {
    fn mac(&self, message: &[u8]) -> Tag {
        let mut out = [0u8; 32];
        self.hash(1, message, &mut out);
        Tag(out)
    }

    fn derive(&self, context: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.hash(2, context, &mut out);
        out
    }

    fn keyed(&self, key: &[u8; 32]) -> Box<dyn Mac> {
        Box::new(StandInKey(u64::from_be_bytes(
            key[..8].try_into().expect("8 bytes"),
        )))
    }

    fn keystream(&self, context: &[u8], out: &mut [u8]) {
        self.hash(3, context, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Progress, Upstream};
    use proptest::prelude::*;

    fn join(name: &str) -> Join {
        Join {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            name: name.into(),
            mac: [0; 6],
            data_addr: "10.0.0.1:1".parse().unwrap(),
            wait_release: false,
            readable: true,
            have: 0,
            holds_from: 0,
            image: None,
            nonce: Nonce([3; 32]),
            proof: Tag::default(),
        }
    }

    #[test]
    fn a_join_proof_covers_the_key_the_nonces_and_every_field() {
        let root = StandInKey(1);
        let key = node_key(&root, "n");
        let nonce = Nonce([7; 32]);
        let proof = join_proof(&*key, &nonce, &join("n"));
        assert!(tags_equal(&proof, &join_proof(&*key, &nonce, &join("n"))));
        // The proof field itself is not covered.
        let proved = Join { proof, ..join("n") };
        assert!(tags_equal(&proof, &join_proof(&*key, &nonce, &proved)));
        let other = node_key(&root, "m");
        assert!(!tags_equal(
            &proof,
            &join_proof(&*other, &nonce, &join("n"))
        ));
        assert!(!tags_equal(
            &proof,
            &join_proof(&*key, &Nonce([8; 32]), &join("n"))
        ));
        for changed in [
            Join {
                have: 1,
                ..join("n")
            },
            Join {
                nonce: Nonce([4; 32]),
                ..join("n")
            },
            Join {
                data_addr: "10.0.0.2:1".parse().unwrap(),
                ..join("n")
            },
        ] {
            assert!(!tags_equal(&proof, &join_proof(&*key, &nonce, &changed)));
        }
    }

    #[test]
    fn a_join_failure_proof_covers_the_key_the_nonce_and_the_reason() {
        let root = StandInKey(1);
        let key = node_key(&root, "n");
        let nonce = Nonce([7; 32]);
        let report = JoinFailed {
            version: PROTOCOL_VERSION,
            session: "s".into(),
            name: "n".into(),
            mac: [1; 6],
            reason: "target is a directory".into(),
            nonce: Nonce([3; 32]),
            proof: Tag::default(),
        };
        let proof = join_failed_proof(&*key, &nonce, &report);
        let proved = JoinFailed {
            proof,
            ..report.clone()
        };
        assert!(tags_equal(
            &proof,
            &join_failed_proof(&*key, &nonce, &proved)
        ));
        assert!(!tags_equal(
            &proof,
            &join_failed_proof(&*node_key(&root, "m"), &nonce, &report)
        ));
        let other_reason = JoinFailed {
            reason: "something else".into(),
            ..report.clone()
        };
        assert!(!tags_equal(
            &proof,
            &join_failed_proof(&*key, &nonce, &other_reason)
        ));
        // Not a join's proof either.
        assert!(!tags_equal(&proof, &join_proof(&*key, &nonce, &join("n"))));
    }

    #[test]
    fn derived_keys_differ_by_name_and_purpose() {
        let root = StandInKey(1);
        let msg = b"m";
        let macs = [
            node_key(&root, "a").mac(msg),
            node_key(&root, "b").mac(msg),
            operator_key(&root).mac(msg),
            source_data_key(&root).mac(msg),
            root.mac(msg),
        ];
        for (i, a) in macs.iter().enumerate() {
            for b in &macs[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            covered("ab", &[b"c"]),
            covered("a", &[b"bc"]),
            "domain and parts run together"
        );
    }

    #[test]
    fn a_ticket_is_bound_to_its_upstream_run_and_downstream() {
        let root = StandInKey(1);
        let (a, b) = (node_key(&root, "a"), node_key(&root, "b"));
        let run = Nonce([1; 32]);
        let t = link_ticket(&*a, &run, NodeId(2));
        assert_eq!(t, link_ticket(&*node_key(&root, "a"), &run, NodeId(2)));
        assert_ne!(t, link_ticket(&*b, &run, NodeId(2)));
        assert_ne!(t, link_ticket(&*a, &Nonce([2; 32]), NodeId(2)));
        assert_ne!(t, link_ticket(&*a, &run, NodeId(3)));
    }

    fn hello(node: u32) -> DataHello {
        DataHello {
            session: "s".into(),
            node: NodeId(node),
            epoch: Epoch(4),
            from: 100,
            nonce: Nonce([9; 32]),
        }
    }

    #[test]
    fn a_data_hello_checks_only_with_its_links_ticket() {
        let root = StandInKey(1);
        let up = node_key(&root, "a");
        let run = Nonce([1; 32]);
        let server_nonce = Nonce([5; 32]);
        let ticket = up.keyed(&link_ticket(&*up, &run, NodeId(2)).0);
        let msg = hello(2).proved(&*ticket, &server_nonce);
        let (req, _) =
            check_data_hello(&*up, &run, &server_nonce, "s", msg.clone()).expect("proved");
        assert_eq!(req.node, NodeId(2));
        assert_eq!(req.from, 100);
        // Another node's id with this ticket, another run, another nonce.
        let as_three = hello(3).proved(&*ticket, &server_nonce);
        let refused = |m| {
            check_data_hello(&*up, &run, &server_nonce, "s", m)
                .err()
                .map(|e| e.0)
        };
        assert_eq!(refused(as_three), Some(RefusalCode::BadProof));
        assert_eq!(
            check_data_hello(&*up, &Nonce([2; 32]), &server_nonce, "s", msg.clone())
                .err()
                .map(|e| e.0),
            Some(RefusalCode::BadProof)
        );
        assert_eq!(
            check_data_hello(&*up, &run, &Nonce([6; 32]), "s", msg)
                .err()
                .map(|e| e.0),
            Some(RefusalCode::BadProof)
        );
    }

    fn pair(key: &dyn Mac) -> (Channel, Channel) {
        let (s, c) = (Nonce([1; 32]), Nonce([2; 32]));
        (
            Channel::new(key, &s, &c, Side::Server),
            Channel::new(key, &s, &c, Side::Client),
        )
    }

    fn topology(ticket: [u8; 32]) -> Message {
        Message::Topology {
            epoch: Epoch(3),
            upstream: Some(Upstream {
                node: Some(NodeId(1)),
                addr: "10.0.0.1:9".parse().unwrap(),
                ticket: Ticket(ticket),
            }),
            downstreams: vec![NodeId(4)],
        }
    }

    #[test]
    fn sealed_messages_open_in_order_and_only_in_order() {
        let key = StandInKey(7);
        let (mut server, mut client) = pair(&key);
        let msgs = [Message::Heartbeat, Message::Release, topology([9; 32])];
        let sealed: Vec<Message> = msgs.iter().map(|m| server.seal(m.clone())).collect();
        // The ticket does not travel in the clear.
        let Message::Sealed { body, .. } = &sealed[2] else {
            unreachable!()
        };
        assert!(!body.windows(32).any(|w| w == [9; 32]));
        for (m, s) in msgs.iter().zip(&sealed) {
            assert_eq!(client.open(s.clone()).as_ref(), Ok(m));
        }
        // Replayed, reordered, or after a dropped one: refused.
        let (mut server, mut client) = pair(&key);
        let s0 = server.seal(Message::Heartbeat);
        let s1 = server.seal(Message::Release);
        assert_eq!(client.open(s1), Err(OpenError::BadTag));
        let (_, mut client) = pair(&key);
        client.open(s0.clone()).unwrap();
        assert_eq!(client.open(s0), Err(OpenError::BadTag));
    }

    #[test]
    fn a_channel_refuses_the_other_direction_another_key_and_plain_messages() {
        let (mut server, mut client) = pair(&StandInKey(7));
        let (mut other, _) = pair(&StandInKey(8));
        // A message reflected back to its sender does not open.
        let to_client = server.seal(Message::Heartbeat);
        assert_eq!(server.open(to_client), Err(OpenError::BadTag));
        assert_eq!(
            client.open(other.seal(Message::Heartbeat)),
            Err(OpenError::BadTag)
        );
        assert_eq!(
            client.open(Message::Verified {
                ok: true,
                reason: String::new()
            }),
            Err(OpenError::NotSealed("Verified"))
        );
    }

    #[test]
    fn a_sealed_handshake_message_is_refused() {
        let key = StandInKey(7);
        let (server, mut client) = pair(&key);
        // Forge the wrapper by hand: seal() refuses to.
        let inner = Message::Challenge {
            version: PROTOCOL_VERSION,
            nonce: Nonce::default(),
        }
        .encode_body();
        let tag = server.send.mac(&sealed_covered(0, &inner));
        let forged = Message::Sealed { tag, body: inner };
        assert!(matches!(client.open(forged), Err(OpenError::Invalid(_))));
    }

    proptest! {
        #[test]
        fn opening_arbitrary_bytes_never_panics_and_never_succeeds(
            tag in any::<[u8; 32]>(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (_, mut client) = pair(&StandInKey(7));
            let r = client.open(Message::Sealed { tag: Tag(tag), body });
            prop_assert!(r.is_err());
        }

        #[test]
        fn every_progress_round_trips_through_a_channel(
            received in any::<u64>(), written in any::<u64>(), holds_from in any::<u64>(),
            ticket in any::<[u8; 32]>(),
        ) {
            let (mut server, mut client) = pair(&StandInKey(3));
            let p = Message::Progress(Progress { received, written, holds_from });
            prop_assert_eq!(server.open(client.seal(p.clone())), Ok(p));
            let t = topology(ticket);
            prop_assert_eq!(client.open(server.seal(t.clone())), Ok(t));
        }
    }
}
