//! Finding the source of a session by UDP broadcast, as the original did,
//! with answers a stranger cannot forge.
//!
//! Nodes often boot before anyone types `ka serve`, and an install image
//! should not need the source's address baked in. A node broadcasts
//!
//! ```text
//! KA-DISCOVER 2 <session> <nonce: 64 hex digits> node <name>
//! ```
//!
//! (`ka go` asks as `operator` instead of `node <name>`) to the ka port every
//! second, with a nonce fresh for this search; a source serving that session
//! answers, from its address,
//!
//! ```text
//! KA-HERE 2 <session> <tcp port> <proof: 64 hex digits>
//! ```
//!
//! where the proof is a MAC with the asker's key over its nonce, the session
//! and the port ([`ka_core::auth::discovery_proof`]): the source derives
//! that key from the session's root, and the asker holds it. An answer that
//! does not prove it (a fake source, a source of another secret, a replay
//! from an earlier search) is ignored, so a stranger cannot send a node to
//! an impostor. Where the answer came from is not covered (the packet's
//! address is the source's address as this network sees it); whoever moves
//! it gains nothing, since the connection it leads to proves the keys
//! again.

use std::net::SocketAddr;
use std::time::Duration;

use ka_core::auth::{discovery_proof, tags_equal, Asker, Mac};
use ka_core::codec::{Nonce, Tag};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::key::SessionKey;

const ASK: &str = "KA-DISCOVER 2 ";
const ANSWER: &str = "KA-HERE 2 ";

/// The longest name a question may carry: a node's name is a string field
/// of the protocol.
const MAX_NAME: usize = ka_core::codec::MAX_STRING;

/// A question as a source reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    session: String,
    nonce: Nonce,
    asker: AskerName,
}

/// Who asks, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AskerName {
    Node(String),
    Operator,
}

impl AskerName {
    fn asker(&self) -> Asker<'_> {
        match self {
            AskerName::Node(n) => Asker::Node(n),
            AskerName::Operator => Asker::Operator,
        }
    }
}

fn hex32(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(t: &str) -> Option<[u8; 32]> {
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The question's text.
fn question(session: &str, nonce: &Nonce, asker: Asker<'_>) -> String {
    match asker {
        Asker::Node(name) => format!("{ASK}{session} {} node {name}", hex32(&nonce.0)),
        Asker::Operator => format!("{ASK}{session} {} operator", hex32(&nonce.0)),
    }
}

/// Reads a question, or `None` for anything else.
fn parse_question(text: &str) -> Option<Question> {
    let mut words = text.strip_prefix(ASK)?.split(' ');
    let session = words.next().filter(|s| !s.is_empty())?.to_string();
    let nonce = Nonce(parse_hex32(words.next()?)?);
    let asker = match (words.next()?, words.next()) {
        ("node", Some(name)) if !name.is_empty() && name.len() <= MAX_NAME => {
            AskerName::Node(name.to_string())
        }
        ("operator", None) => AskerName::Operator,
        _ => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(Question {
        session,
        nonce,
        asker,
    })
}

/// The answer's text, proved with `key` (the asker's) over the question.
fn answer_text(session: &str, port: u16, nonce: &Nonce, key: &dyn Mac) -> String {
    let proof = discovery_proof(key, nonce, session, port);
    format!("{ANSWER}{session} {port} {}", hex32(&proof.0))
}

/// Reads an answer to a question about `session` with `nonce`, proved
/// with `key`: the port it names if the proof holds, `Err` with why not
/// for an answer about this session that does not prove, `Ok(None)` for
/// anything else.
fn check_answer(
    text: &str,
    session: &str,
    nonce: &Nonce,
    key: &dyn Mac,
) -> Result<Option<u16>, String> {
    let Some(rest) = text.strip_prefix(ANSWER) else {
        return Ok(None);
    };
    let mut words = rest.split(' ');
    if words.next() != Some(session) {
        return Ok(None);
    }
    let (Some(port), Some(proof), None) = (words.next(), words.next(), words.next()) else {
        return Err("a malformed answer".into());
    };
    let port: u16 = port
        .parse()
        .map_err(|_| "an answer without a port".to_string())?;
    let proof = parse_hex32(proof).ok_or("an answer without a proof")?;
    if !tags_equal(&Tag(proof), &discovery_proof(key, nonce, session, port)) {
        return Err("an answer that does not prove this node's key".into());
    }
    Ok(Some(port))
}

/// Answers discovery questions about `session` arriving on UDP `bind`,
/// naming `tcp_port` and proving each asker's key derived from `root`,
/// until the returned task is aborted.
pub async fn answer(
    bind: SocketAddr,
    session: String,
    tcp_port: u16,
    root: SessionKey,
) -> std::io::Result<JoinHandle<()>> {
    let socket = UdpSocket::bind(bind).await?;
    Ok(tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let Some(q) = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(parse_question)
                .filter(|q| q.session == session)
            else {
                continue;
            };
            let key = q.asker.asker().key(&root);
            let reply = answer_text(&session, tcp_port, &q.nonce, &*key);
            let _ = socket.send_to(reply.as_bytes(), from).await;
        }
    }))
}

/// Broadcasts for the source of `session` to `to` (normally the broadcast
/// address and the ka port) every second until a source answers with a
/// proof of `key` (the key of `asker`: a node's own, or the operator's) or
/// `wait` passes; returns the source's TCP address.
pub async fn find(
    session: &str,
    asker: Asker<'_>,
    key: Box<dyn Mac>,
    to: SocketAddr,
    wait: Duration,
) -> Result<SocketAddr, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(|e| format!("opening a UDP socket: {e}"))?;
    socket
        .set_broadcast(true)
        .map_err(|e| format!("enabling broadcast: {e}"))?;
    let nonce = super::nonce();
    let ask = question(session, &nonce, asker);
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 512];
    let mut unproven: Option<(SocketAddr, String)> = None;
    while tokio::time::Instant::now() < deadline {
        if let Err(e) = socket.send_to(ask.as_bytes(), to).await {
            tracing::debug!(error = %e, "discovery broadcast failed; retrying");
        }
        let round = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(round.min(deadline), socket.recv_from(&mut buf)).await
        {
            let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
            match check_answer(text, session, &nonce, &*key) {
                Ok(Some(port)) => return Ok(SocketAddr::new(from.ip(), port)),
                Ok(None) => {}
                Err(why) => {
                    if unproven.is_none() {
                        tracing::warn!(%from, %why, "ignoring a discovery answer: a source of another secret, or an impostor");
                    }
                    unproven = Some((from, why));
                }
            }
        }
    }
    let mut err = format!(
        "no source of session {session:?} answered at {to} within {wait:?}: start `ka serve --session {session}` on this network, or pass --server"
    );
    if let Some((from, why)) = unproven {
        err.push_str(&format!(
            " ({from} sent {why}: a source with another secret, or an impostor; it was ignored)"
        ));
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::key::{session_key, Secret};
    use proptest::prelude::*;

    fn root(secret: u8) -> SessionKey {
        session_key(&Secret([secret; 32]), "lab")
    }

    async fn free_port() -> u16 {
        UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn a_node_finds_its_session_and_not_another() {
        let bind = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let task = answer(bind, "lab".into(), 4321, root(1)).await.unwrap();
        let key = root(1).node_key("lab", "n1").mac_key();
        let found = find("lab", Asker::Node("n1"), key, bind, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(found, SocketAddr::from(([127, 0, 0, 1], 4321)));
        let operator = ka_core::auth::operator_key(&root(1));
        let found = find(
            "lab",
            Asker::Operator,
            operator,
            bind,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(found, Ok(SocketAddr::from(([127, 0, 0, 1], 4321))));
        let key = root(1).node_key("other", "n1").mac_key();
        let err = find(
            "other",
            Asker::Node("n1"),
            key,
            bind,
            Duration::from_millis(1500),
        )
        .await
        .unwrap_err();
        assert!(err.contains("no source of session"), "{err}");
        task.abort();
    }

    #[tokio::test]
    async fn a_source_without_the_secret_is_not_believed() {
        // An impostor (here: a source of another secret) answers first.
        let bind = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let task = answer(bind, "lab".into(), 4321, root(2)).await.unwrap();
        let key = root(1).node_key("lab", "n1").mac_key();
        let err = find(
            "lab",
            Asker::Node("n1"),
            key,
            bind,
            Duration::from_millis(1500),
        )
        .await
        .unwrap_err();
        assert!(err.contains("impostor"), "{err}");
        task.abort();
    }

    #[test]
    fn an_answer_is_worth_nothing_to_another_asker_or_question() {
        let r = root(1);
        let (n1, n2) = (r.node_key("lab", "n1"), r.node_key("lab", "n2"));
        let nonce = Nonce([3; 32]);
        let text = answer_text("lab", 4715, &nonce, &*n1.mac_key());
        assert_eq!(
            check_answer(&text, "lab", &nonce, &*n1.mac_key()),
            Ok(Some(4715))
        );
        assert!(check_answer(&text, "lab", &nonce, &*n2.mac_key()).is_err());
        assert!(check_answer(&text, "lab", &Nonce([4; 32]), &*n1.mac_key()).is_err());
        // The port is covered: a relay cannot send the node elsewhere.
        let moved = text.replace(" 4715 ", " 4716 ");
        assert!(check_answer(&moved, "lab", &nonce, &*n1.mac_key()).is_err());
        assert_eq!(
            check_answer("KA-HERE 2 other 1 x", "lab", &nonce, &*n1.mac_key()),
            Ok(None)
        );
    }

    #[test]
    fn questions_round_trip() {
        let nonce = Nonce([9; 32]);
        for asker in [AskerName::Node("n-1.a".into()), AskerName::Operator] {
            let q = parse_question(&question("lab", &nonce, asker.asker())).unwrap();
            assert_eq!(
                q,
                Question {
                    session: "lab".into(),
                    nonce,
                    asker,
                }
            );
        }
        assert_eq!(parse_question("KA-DISCOVER 1 lab"), None);
        assert_eq!(
            parse_question(&format!("{ASK}lab {} node", hex32(&[1; 32]))),
            None
        );
    }

    proptest! {
        #[test]
        fn reading_any_datagram_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_question(&text);
            let key = root(1).node_key("lab", "n1").mac_key();
            prop_assert!(!matches!(check_answer(&text, "lab", &Nonce([1; 32]), &*key), Ok(Some(_))));
        }

        #[test]
        fn reading_near_miss_questions_never_panics(rest in "[ -~]{0,200}") {
            let _ = parse_question(&format!("{ASK}{rest}"));
            let key = root(1).node_key("lab", "n1").mac_key();
            let _ = check_answer(&format!("{ANSWER}{rest}"), "lab", &Nonce([1; 32]), &*key);
        }
    }
}
