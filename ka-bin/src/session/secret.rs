//! The session secret and the node keys derived from it. Every key of a
//! session derives from the secret: the source (and `ka go`, and `ka tftp`
//! handing nodes their keys) holds it; a node holds either the secret or,
//! better, only its own key ([`ka_net::NodeKey`], `ka key derive`). The
//! source reads the secret from a file, or generates one and writes it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use ka_net::shell::{load_key_file, load_or_generate_secret, session_key, KeyFile};
use ka_net::{NodeKey, SessionKey};

pub use ka_net::shell::Secret;

/// The secret in `file` (64 hex digits); a node's key is refused with a
/// reason, since it cannot stand for the session.
pub fn load(file: &Path) -> anyhow::Result<Secret> {
    let (secret, _) = load_or_generate_secret(Some(file)).map_err(|e| anyhow!(e))?;
    Ok(secret)
}

/// What node `name` of `session` holds, from `file`: derived from the
/// secret, or the node key in it if that is this node's.
pub fn node_key(file: &Path, session: &str, name: &str) -> anyhow::Result<NodeKey> {
    let keys = load_key_file(file).map_err(|e| anyhow!(e))?;
    keys.node_key(session, name)
        .map_err(|e| anyhow!("{}: {e}", file.display()))
}

/// The node a key file is for, when it holds a node's key rather than the
/// secret: the name a node joins under unless told otherwise.
pub fn key_owner(file: &Path) -> Option<String> {
    match load_key_file(file).ok()? {
        KeyFile::Node(key) => Some(key.name().to_string()),
        KeyFile::Secret(_) => None,
    }
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

/// The root key of `session` under `secret`.
pub fn key(secret: &Secret, session: &str) -> SessionKey {
    session_key(secret, session)
}

/// Writes `key` to `path` (mode 0600), which must not exist yet, or to
/// standard output for `-`.
pub fn write_node_key(key: &NodeKey, path: &Path) -> anyhow::Result<()> {
    if path == Path::new("-") {
        crate::outln!("{}", key.to_text().trim_end());
        return Ok(());
    }
    if path.symlink_metadata().is_ok() {
        anyhow::bail!(
            "{} exists: a key file is never replaced; remove it first, or write elsewhere",
            path.display()
        );
    }
    crate::write_atomically(path, key.to_text().as_bytes(), 0o600)
        .with_context(|| format!("writing the key of {} to {}", key.name(), path.display()))
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
    fn a_node_key_file_stands_for_its_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let secret_path = dir.path().join("secret");
        let secret = write_new(&secret_path).unwrap();
        let key = key(&secret, "lab").node_key("lab", "n1");
        let key_path = dir.path().join("n1.key");
        write_node_key(&key, &key_path).unwrap();
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(write_node_key(&key, &key_path).is_err(), "replaced");
        assert_eq!(node_key(&key_path, "lab", "n1").unwrap(), key);
        assert_eq!(node_key(&secret_path, "lab", "n1").unwrap(), key);
        assert!(node_key(&key_path, "lab", "n2").is_err());
        assert_eq!(key_owner(&key_path).as_deref(), Some("n1"));
        assert_eq!(key_owner(&secret_path), None);
        // A node's key cannot stand for the session.
        let err = load(&key_path).unwrap_err().to_string();
        assert!(err.contains("not the session secret"), "{err}");
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
