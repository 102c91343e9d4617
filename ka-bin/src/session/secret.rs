//! The session secret: every key of a session derives from it, so the
//! source and its nodes must hold the same one. The source reads it from a
//! file, or generates one and writes it for the nodes.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use ka_net::shell::{load_or_generate_secret, session_key};
use ka_net::SessionKey;

pub use ka_net::shell::Secret;

/// The secret in `file` (64 hex digits).
pub fn load(file: &Path) -> anyhow::Result<Secret> {
    let (secret, _) = load_or_generate_secret(Some(file)).map_err(|e| anyhow!(e))?;
    Ok(secret)
}

/// Where a secret generated for `session` is written: `ka-secret-SESSION`
/// in the current directory.
pub fn generated_path(session: &str) -> PathBuf {
    PathBuf::from(format!("ka-secret-{session}"))
}

/// A new secret for `session`, written (mode 0600) to
/// [`generated_path`]; returns it and the file it is in.
pub fn generate(session: &str) -> anyhow::Result<(Secret, PathBuf)> {
    let secret = Secret::generate();
    let path = generated_path(session);
    crate::write_atomically(&path, format!("{}\n", secret.to_hex()).as_bytes(), 0o600)
        .with_context(|| format!("writing the generated secret to {}", path.display()))?;
    Ok((secret, path))
}

/// Whether `text` holds a secret (64 hex digits, surrounding space ignored).
pub fn is_secret(text: &str) -> bool {
    Secret::from_hex(text.trim()).is_some()
}

/// The key of `session` under `secret`.
pub(crate) fn key(secret: &Secret, session: &str) -> SessionKey {
    session_key(secret, session)
}
