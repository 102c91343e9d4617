//! Proofs of the session secret.
//!
//! The core decides what a proof covers and checks it; the keyed MAC itself is
//! supplied by the shell through [`Mac`] (BLAKE3 keyed hashing under the
//! session key in ka-net), which keeps cryptography and the key itself out of
//! the pure core and lets the simulator use a cheap stand-in. Every proof covers a nonce chosen by the
//! side that checks it, so a recorded proof cannot be replayed, and a domain
//! string, so a proof for one purpose is never valid for another.

use crate::codec::{Message, Nonce, RefusalCode, Tag, PROTOCOL_VERSION};
use crate::ids::{Epoch, NodeId};

/// A keyed MAC over the session secret: the machines hold one to make and
/// check proofs, never the key it is keyed with.
pub trait Mac: Send {
    /// The MAC of `message` under the session secret.
    fn mac(&self, message: &[u8]) -> Tag;
}

/// Builds the byte string a proof covers: a domain, then length-prefixed parts,
/// so no two different (domain, parts) lists encode the same bytes.
fn covered(domain: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + parts.iter().map(|p| p.len() + 4).sum::<usize>());
    out.extend_from_slice(domain.as_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// The proof a node sends in its join.
pub fn join_proof(key: &dyn Mac, nonce: &Nonce, session: &str, name: &str) -> Tag {
    key.mac(&covered(
        "ka/join/v1",
        &[&nonce.0, session.as_bytes(), name.as_bytes()],
    ))
}

/// The proof a downstream sends when it opens a data connection.
pub fn data_proof(
    key: &dyn Mac,
    nonce: &Nonce,
    session: &str,
    node: NodeId,
    epoch: Epoch,
    from: u64,
) -> Tag {
    key.mac(&covered(
        "ka/data/v1",
        &[
            &nonce.0,
            session.as_bytes(),
            &node.0.to_be_bytes(),
            &epoch.0.to_be_bytes(),
            &from.to_be_bytes(),
        ],
    ))
}

/// The proof an operator's `go` carries.
pub fn go_proof(key: &dyn Mac, nonce: &Nonce, session: &str) -> Tag {
    key.mac(&covered("ka/go/v1", &[&nonce.0, session.as_bytes()]))
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
}

/// Checks the first message on a data connection: a
/// [`Message::DataHello`] of this protocol version and `session`, whose
/// proof covers the `nonce` this side sent. Returns the request, or the
/// refusal to send back. Who may connect is the caller's question.
pub fn check_data_hello(
    key: &dyn Mac,
    nonce: &Nonce,
    session: &str,
    msg: Message,
) -> Result<DataRequest, (RefusalCode, String)> {
    let Message::DataHello {
        version,
        session: theirs,
        node,
        epoch,
        from,
        proof,
    } = msg
    else {
        return Err((RefusalCode::NotExpected, "expected a data hello".into()));
    };
    if version != PROTOCOL_VERSION || theirs != session {
        let detail = format!("data connection for session {theirs:?} v{version}; this is {session:?} v{PROTOCOL_VERSION}");
        return Err((RefusalCode::WrongSession, detail));
    }
    if !tags_equal(&proof, &data_proof(key, nonce, session, node, epoch, from)) {
        return Err((
            RefusalCode::BadProof,
            "data connection without the session secret".into(),
        ));
    }
    Ok(DataRequest { node, epoch, from })
}

/// Compares two tags in time independent of where they differ, so a
/// stranger cannot learn a valid proof byte by byte from response timing.
pub fn tags_equal(a: &Tag, b: &Tag) -> bool {
    a.0.iter()
        .zip(b.0.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
pub(crate) mod test_key {
    use super::*;

    /// A deterministic, non-cryptographic keyed hash for tests of the core.
    pub struct TestKey(pub u64);

    impl Mac for TestKey {
        fn mac(&self, message: &[u8]) -> Tag {
            let mut out = [0u8; 32];
            let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
            for (i, chunk) in out.chunks_mut(8).enumerate() {
                for &b in message {
                    h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                }
                h ^= i as u64;
                chunk.copy_from_slice(&h.to_be_bytes());
            }
            Tag(out)
        }
    }

    #[test]
    fn proofs_differ_by_domain_key_and_nonce() {
        let nonce = Nonce([7; 32]);
        let k = TestKey(1);
        let join = join_proof(&k, &nonce, "s", "n");
        assert!(tags_equal(&join, &join_proof(&k, &nonce, "s", "n")));
        assert!(!tags_equal(
            &join,
            &join_proof(&TestKey(2), &nonce, "s", "n")
        ));
        assert!(!tags_equal(
            &join,
            &join_proof(&k, &Nonce([8; 32]), "s", "n")
        ));
        assert!(!tags_equal(&join, &go_proof(&k, &nonce, "s")));
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert!(!tags_equal(
            &join_proof(&k, &nonce, "ab", "c"),
            &join_proof(&k, &nonce, "a", "bc")
        ));
    }
}
