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
    let path = generated_path(session);
    Ok((write_new(&path)?, path))
}

/// A new secret written to `path`, which must not exist yet: a secret
/// generated earlier is never replaced, since nodes may hold it, and a
/// second `ka serve` that overwrote it would lock them out without a word.
fn write_new(path: &Path) -> anyhow::Result<Secret> {
    if path.symlink_metadata().is_ok() {
        anyhow::bail!(
            "{} exists from an earlier ka serve: reuse it with --secret-file {} (nodes may hold it), or remove it for a new secret",
            path.display(),
            path.display()
        );
    }
    let secret = Secret::generate();
    crate::write_atomically(path, format!("{}\n", secret.to_hex()).as_bytes(), 0o600)
        .with_context(|| format!("writing the generated secret to {}", path.display()))?;
    Ok(secret)
}

/// Whether `text` holds a secret (64 hex digits, surrounding space ignored).
pub fn is_secret(text: &str) -> bool {
    Secret::from_hex(text.trim()).is_some()
}

/// The key of `session` under `secret`.
pub(crate) fn key(secret: &Secret, session: &str) -> SessionKey {
    session_key(secret, session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_secret_is_private_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(generated_path("lab"));
        let secret = write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).unwrap(), secret);
        let again = write_new(&path).unwrap_err().to_string();
        assert!(again.contains("--secret-file"), "{again}");
        assert_eq!(
            load(&path).unwrap(),
            secret,
            "the first secret was replaced"
        );
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(generated_path("lab"))).unwrap();
        assert!(write_new(&dir.path().join(generated_path("lab"))).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
