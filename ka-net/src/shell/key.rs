//! The session secret, the keys derived from it, and the files they travel in.
//!
//! The operator holds the session *secret*: 32 random bytes, as 64 hex
//! digits in a file. The source turns it into the session's root key
//! ([`session_key`]: the secret bound to the session name), from which
//! ka-core derives everything else ([`ka_core::auth`]). A node needs only
//! its own share, a [`NodeKey`]: its key and the key of the image digest,
//! for one session and one name, in a file of its own ([`NodeKey::to_text`],
//! `ka key derive`). A node handed that file can act as that node only.
//!
//! The keyed primitives ka-core asks for ([`Mac`]) are keyed BLAKE3, with a
//! one-byte purpose first so a MAC, a derived key and a keystream of one key
//! never coincide:
//!
//! | primitive | BLAKE3 keyed with the key, over |
//! |---|---|
//! | `mac(m)` | `0x01 ‖ m` |
//! | `derive(c)` | `0x02 ‖ c` |
//! | `keystream(c)` | `0x03 ‖ c`, read as an XOF |

use std::path::Path;

use ka_core::auth::{digest_key_context, node_key_context, Mac};
use ka_core::codec::Tag;

use crate::image::digest::DigestKey;

/// A session secret as the operator handles it: 32 random bytes, kept as hex
/// in a file only the source (and `ka go`, and `ka tftp` when it hands nodes
/// their keys) is given.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A new random secret.
    pub fn generate() -> Self {
        let mut s = [0u8; 32];
        getrandom::getrandom(&mut s).expect("the OS random source is available");
        Secret(s)
    }

    /// The secret as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored). Anything else
    /// is refused, signs included (`+0` parses as a number, not as two hex
    /// digits), and so is the all-zero secret: it is what an empty or
    /// zero-filled file turns into, and anyone could guess it.
    pub fn from_hex(text: &str) -> Option<Self> {
        let s = parse_hex32(text.trim())?;
        (s != [0; 32]).then_some(Secret(s))
    }
}

/// 64 lowercase hex digits.
fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly 64 hex digits as 32 bytes.
fn parse_hex32(t: &str) -> Option<[u8; 32]> {
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(s)
}

/// Reads the secret from `path`, or, without a path, generates one (the
/// caller prints it for the nodes).
pub fn load_or_generate_secret(path: Option<&Path>) -> Result<(Secret, bool), String> {
    match path {
        None => Ok((Secret::generate(), true)),
        Some(p) => match load_key_file(p)? {
            KeyFile::Secret(secret) => Ok((secret, false)),
            KeyFile::Node(key) => Err(format!(
                "{} holds the key of node {:?}, not the session secret: give this command the secret file ka serve wrote",
                p.display(),
                key.name()
            )),
        },
    }
}

/// The key of a session: the secret bound to the session name, so one secret
/// reused for two sessions still gives two keys.
pub fn session_key(secret: &Secret, session: &str) -> SessionKey {
    let mut material = Vec::with_capacity(32 + session.len());
    material.extend_from_slice(&secret.0);
    material.extend_from_slice(session.as_bytes());
    SessionKey(blake3::derive_key("ka session key v1", &material))
}

/// The root key of a session ([`session_key`]): what the source holds, and
/// what every other key of the session derives from.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    // A key is a secret: never print it, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// The key of the image digest, which every node is handed too.
    pub fn digest_key(&self) -> DigestKey {
        DigestKey(Blake3(self.0).derive(&digest_key_context()))
    }

    /// What node `name` of `session` holds: its own key (as
    /// [`ka_core::auth::node_key`] derives it from this root) and the
    /// digest key.
    pub fn node_key(&self, session: &str, name: &str) -> NodeKey {
        NodeKey {
            session: session.to_string(),
            name: name.to_string(),
            key: Blake3(self.0).derive(&node_key_context(name)),
            digest: self.digest_key(),
        }
    }
}

impl Mac for SessionKey {
    fn mac(&self, message: &[u8]) -> Tag {
        Blake3(self.0).mac(message)
    }
    fn derive(&self, context: &[u8]) -> [u8; 32] {
        Blake3(self.0).derive(context)
    }
    fn keyed(&self, key: &[u8; 32]) -> Box<dyn Mac> {
        Box::new(Blake3(*key))
    }
    fn keystream(&self, context: &[u8], out: &mut [u8]) {
        Blake3(self.0).keystream(context, out)
    }
}

/// Keyed BLAKE3 with one key: the primitives of every key below the root.
#[derive(Clone)]
struct Blake3([u8; 32]);

impl Blake3 {
    fn hasher(&self, purpose: u8) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[purpose]);
        h
    }
}

impl Mac for Blake3 {
    fn mac(&self, message: &[u8]) -> Tag {
        Tag(*self.hasher(1).update(message).finalize().as_bytes())
    }
    fn derive(&self, context: &[u8]) -> [u8; 32] {
        *self.hasher(2).update(context).finalize().as_bytes()
    }
    fn keyed(&self, key: &[u8; 32]) -> Box<dyn Mac> {
        Box::new(Blake3(*key))
    }
    fn keystream(&self, context: &[u8], out: &mut [u8]) {
        self.hasher(3).update(context).finalize_xof().fill(out);
    }
}

/// What one node of one session holds: its own key, and the key of the
/// image digest. It proves that node's name and nobody else's.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeKey {
    session: String,
    name: String,
    key: [u8; 32],
    digest: DigestKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("session", &self.session)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The first line of a node key file.
const NODE_KEY_HEADER: &str = "ka-node-key 1";

impl NodeKey {
    /// The session this key is of.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The node this key is of.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key of the image digest.
    pub fn digest_key(&self) -> &DigestKey {
        &self.digest
    }

    /// The node's key, for its machine.
    pub fn mac_key(&self) -> Box<dyn Mac> {
        Box::new(Blake3(self.key))
    }

    /// The key as a file holds it: a header line, the session, the name,
    /// the node's key and the digest key, one `field value` per line.
    pub fn to_text(&self) -> String {
        format!(
            "{NODE_KEY_HEADER}\n# the key of node {} in ka session {}: it lets whoever holds it act as this node, so keep it private\nsession {}\nname {}\nkey {}\ndigest {}\n",
            self.name,
            self.session,
            self.session,
            self.name,
            hex(&self.key),
            hex(&self.digest.0)
        )
    }

    /// Reads what [`NodeKey::to_text`] wrote. Every field must be there once,
    /// nothing else may be (lines starting with `#` aside), and neither key
    /// may be all zeros.
    pub fn from_text(text: &str) -> Result<NodeKey, String> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        if lines.next() != Some(NODE_KEY_HEADER) {
            return Err(format!(
                "not a ka node key (it must start with {NODE_KEY_HEADER:?})"
            ));
        }
        let (mut session, mut name, mut key, mut digest) = (None, None, None, None);
        for line in lines {
            let (field, value) = line.split_once(' ').unwrap_or((line, ""));
            let value = value.trim();
            let slot = match field {
                "session" => &mut session,
                "name" => &mut name,
                "key" => &mut key,
                "digest" => &mut digest,
                other => {
                    let other: String = other.chars().take(40).collect();
                    return Err(format!("unknown field {other:?} in a ka node key"));
                }
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(format!("field {field:?} twice in a ka node key"));
            }
        }
        let missing = |f: &str| format!("a ka node key without its {f:?} line");
        let bytes = |f: &str, v: Option<String>| -> Result<[u8; 32], String> {
            let v = v.ok_or_else(|| missing(f))?;
            match parse_hex32(&v) {
                Some(b) if b != [0; 32] => Ok(b),
                _ => Err(format!(
                    "the {f:?} of a ka node key must be 64 hex digits, not all zero"
                )),
            }
        };
        let session = session
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("session"))?;
        let name = name
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("name"))?;
        Ok(NodeKey {
            session,
            name,
            key: bytes("key", key)?,
            digest: DigestKey(bytes("digest", digest)?),
        })
    }
}

/// What a key file handed to ka holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFile {
    /// The session secret: every key of the session derives from it.
    Secret(Secret),
    /// One node's key.
    Node(NodeKey),
}

impl KeyFile {
    /// Reads a secret (64 hex digits) or a node key ([`NodeKey::to_text`]).
    pub fn from_text(text: &str) -> Result<KeyFile, String> {
        if let Some(secret) = Secret::from_hex(text) {
            return Ok(KeyFile::Secret(secret));
        }
        if text.trim_start().starts_with("ka-node-key") {
            return NodeKey::from_text(text).map(KeyFile::Node);
        }
        Err("neither a ka secret (64 hex digits, not all zero) nor a ka node key".into())
    }

    /// What node `name` of `session` holds, from this file: derived from
    /// the secret, or the node key itself if it is this node's.
    pub fn node_key(&self, session: &str, name: &str) -> Result<NodeKey, String> {
        match self {
            KeyFile::Secret(s) => Ok(session_key(s, session).node_key(session, name)),
            KeyFile::Node(k) if k.session == session && k.name == name => Ok(k.clone()),
            KeyFile::Node(k) => Err(format!(
                "this is the key of node {:?} in session {:?}, not of node {name:?} in session {session:?}: use the node's own key (ka key derive --name {name}) or its name (--name {})",
                k.name, k.session, k.name
            )),
        }
    }
}

/// Reads the key file at `path` ([`KeyFile::from_text`]).
pub fn load_key_file(path: &Path) -> Result<KeyFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    KeyFile::from_text(&text).map_err(|e| {
        format!(
            "{} holds {e}; copy the secret file ka serve wrote, or a node's key from ka key derive",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let s = Secret::generate();
        assert_eq!(Secret::from_hex(&format!("{}\n", s.to_hex())), Some(s));
        assert_eq!(Secret::from_hex("zz"), None);
        assert_eq!(Secret::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn signs_and_the_all_zero_secret_are_refused() {
        // u8::from_str_radix("+0", 16) is Ok(0): a file of "+0" pairs once
        // passed as the all-zero secret.
        assert_eq!(Secret::from_hex(&"+0".repeat(32)), None);
        assert_eq!(Secret::from_hex(&"0".repeat(64)), None);
        assert_eq!(
            Secret::from_hex(&format!("{}1", "0".repeat(63))),
            Some(Secret({
                let mut s = [0; 32];
                s[31] = 1;
                s
            }))
        );
    }

    #[test]
    fn keys_differ_per_session() {
        let s = Secret([7; 32]);
        assert_ne!(session_key(&s, "a").0, session_key(&s, "b").0);
    }

    #[test]
    fn a_node_key_is_the_one_the_core_derives_from_the_root() {
        let root = session_key(&Secret([7; 32]), "lab");
        let from_file = root.node_key("lab", "n1").mac_key();
        let from_core = ka_core::auth::node_key(&root, "n1");
        assert_eq!(from_file.mac(b"m"), from_core.mac(b"m"));
        assert_ne!(
            root.node_key("lab", "n2").mac_key().mac(b"m"),
            from_core.mac(b"m")
        );
        // The digest key is neither the root nor a node's key.
        assert_ne!(root.digest_key().0, root.0);
        assert_eq!(root.node_key("lab", "n1").digest_key(), &root.digest_key());
    }

    #[test]
    fn a_node_key_file_round_trips_and_serves_its_node_only() {
        let root = session_key(&Secret([7; 32]), "lab");
        let key = root.node_key("lab", "n1");
        let text = key.to_text();
        assert!(!text.contains(&hex(&root.0)), "the root leaked");
        let file = KeyFile::from_text(&text).unwrap();
        assert_eq!(file, KeyFile::Node(key.clone()));
        assert_eq!(file.node_key("lab", "n1").unwrap(), key);
        let other = file.node_key("lab", "n2").unwrap_err();
        assert!(other.contains("--name n1"), "{other}");
        assert!(file.node_key("other", "n1").is_err());
        // A secret gives any node's key.
        let secret = KeyFile::from_text(&Secret([7; 32]).to_hex()).unwrap();
        assert_eq!(secret.node_key("lab", "n1").unwrap(), key);
        assert!(!format!("{key:?}").contains(&hex(&key.key)));
    }

    #[test]
    fn a_broken_node_key_file_is_refused_with_the_reason() {
        let good = session_key(&Secret([7; 32]), "lab")
            .node_key("lab", "n1")
            .to_text();
        let cases = [
            (good.replace("ka-node-key 1", "ka-node-key 2"), "must start"),
            (good.replace("name n1\n", ""), "\"name\""),
            (format!("{good}name n2\n"), "twice"),
            (format!("{good}owner me\n"), "unknown field"),
            (
                good.lines()
                    .map(|l| {
                        if l.starts_with("key ") {
                            format!("key {}", "0".repeat(64))
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                "not all zero",
            ),
        ];
        for (text, why) in cases {
            let err = KeyFile::from_text(&text).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert!(KeyFile::from_text("hello").is_err());
    }

    #[test]
    fn the_primitives_of_one_key_never_coincide() {
        let k = Blake3([5; 32]);
        let mut stream = [0u8; 32];
        k.keystream(b"x", &mut stream);
        assert_ne!(k.mac(b"x").0, k.derive(b"x"));
        assert_ne!(k.derive(b"x"), stream);
    }

    proptest! {
        #[test]
        fn reading_any_key_file_never_panics(text in "(ka-node-key 1\n)?[ -~\n]{0,300}") {
            let _ = KeyFile::from_text(&text);
        }

        #[test]
        fn reading_arbitrary_bytes_as_a_key_file_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = KeyFile::from_text(&String::from_utf8_lossy(&bytes));
        }
    }
}
