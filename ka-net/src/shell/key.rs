//! The session secret: loading, generating, and the keys derived from it.

use std::path::Path;

use ka_core::codec::Tag;

use crate::image::digest::SessionKey;

/// A session secret as the operator handles it: 32 random bytes, kept as hex
/// in a file the nodes are given.
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
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace ignored). Anything else
    /// is refused, signs included (`+0` parses as a number, not as two hex
    /// digits), and so is the all-zero secret: it is what an empty or
    /// zero-filled file turns into, and anyone could guess it.
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut s = [0u8; 32];
        for (i, b) in s.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
        }
        (s != [0; 32]).then_some(Secret(s))
    }
}

/// Reads the secret from `path`, or, without a path, generates one (the
/// caller prints it for the nodes).
pub fn load_or_generate_secret(path: Option<&Path>) -> Result<(Secret, bool), String> {
    match path {
        None => Ok((Secret::generate(), true)),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the secret file {}: {e}", p.display()))?;
            let secret = Secret::from_hex(&text).ok_or_else(|| {
                format!(
                    "{} does not hold a ka secret (64 hex digits, not all zero); copy the file the source printed or wrote",
                    p.display()
                )
            })?;
            Ok((secret, false))
        }
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

impl ka_core::auth::Mac for SessionKey {
    fn mac(&self, message: &[u8]) -> Tag {
        Tag(*blake3::keyed_hash(&self.0, message).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
