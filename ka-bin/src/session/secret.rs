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

/// The file holding a cluster's secret: `secret`, next to its inventory
/// (`/etc/ka/secret` for `/etc/ka/cluster.toml`). `ka serve -i` and `ka
/// tftp` both default to it, so the boot server needs no secret made by
/// hand and the two always hold the same one.
pub fn beside_inventory(inventory: &Path) -> PathBuf {
    let dir = match inventory.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dir.join("secret")
}

/// The secret in `path`, made there first if there is none; says whether
/// it was made. Two processes starting together (`ka tftp` and `ka serve`)
/// agree on one secret: it is written whole to a temporary file and linked
/// into place, which fails if `path` appeared meanwhile, and the loser reads
/// the winner's. A `path` that is not a regular file (a planted link, a
/// directory) is refused rather than followed.
pub fn load_or_create(path: &Path) -> anyhow::Result<(Secret, bool)> {
    for _ in 0..2 {
        match path.symlink_metadata() {
            Ok(m) if m.file_type().is_file() => return Ok((load(path)?, false)),
            Ok(_) => anyhow::bail!(
                "{} is not a regular file: remove it (a secret is made there), or give --secret-file",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        match create_new(path) {
            Ok(secret) => return Ok((secret, true)),
            // Another process made it between the look and the link.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("making a new session secret at {}", path.display()))
            }
        }
    }
    anyhow::bail!(
        "{} keeps changing: is something else writing it?",
        path.display()
    )
}

/// A new secret at `path`, which must not exist: written and flushed under
/// a temporary name, then hard-linked into place (the link is the atomic
/// test-and-create; nobody can read it half written).
fn create_new(path: &Path) -> std::io::Result<Secret> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let secret = Secret::generate();
    let tmp = dir.join(format!(
        ".ka-secret.{}.{:016x}.tmp",
        std::process::id(),
        rand_suffix()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", secret.to_hex()).as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map(|()| secret)
}

/// What tells apart the temporary files of threads of one process (the
/// PID tells processes apart): a count, mixed with the time for processes
/// of other PID namespaces sharing the directory.
fn rand_suffix() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos().into());
    COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 32 | nanos
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
    fn the_secret_beside_an_inventory_is_made_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = dir.path().join("cluster.toml");
        let path = beside_inventory(&inventory);
        assert_eq!(path, dir.path().join("secret"));
        assert_eq!(
            beside_inventory(Path::new("cluster.toml")),
            Path::new("./secret")
        );
        // Many starting together: one makes it, every one reads the same.
        let results: Vec<(Secret, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|(_, made)| *made).count(), 1);
        assert!(results.iter().all(|(s, _)| *s == results[0].0));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).unwrap(), results[0].0);
        // Nothing temporary is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("secret")]);
    }

    #[test]
    fn a_link_where_the_secret_goes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("secret");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
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
