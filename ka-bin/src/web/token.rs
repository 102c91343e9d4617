//! The web page's access token (`--http-token-file`): read from its file,
//! or made there (0600, random) when the file is missing, the way the
//! session secret beside an inventory is made: written whole under a
//! temporary name and linked into place, never through a planted link.

use std::path::Path;

use anyhow::Context;

/// The fewest characters a token may have: a guessable one protects
/// nothing.
pub const MIN_TOKEN_LEN: usize = 16;

/// Whether `given` is `expected`, in time that does not depend on where
/// they differ (a remote prober learns nothing from how fast a guess
/// fails).
pub fn matches(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// The token in `path`, made there first if there is none; says whether it
/// was made.
pub fn load_or_create(path: &Path) -> anyhow::Result<(String, bool)> {
    for _ in 0..2 {
        match path.symlink_metadata() {
            Ok(m) if m.file_type().is_file() => return Ok((load(path)?, false)),
            Ok(_) => anyhow::bail!(
                "--http-token-file {} is not a regular file: remove it (a token is made there) or name another file",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        match create_new(path) {
            Ok(token) => return Ok((token, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("making a new web token at {}", path.display()))
            }
        }
    }
    anyhow::bail!(
        "{} keeps changing: is something else writing it?",
        path.display()
    )
}

/// The token in `path`: one line of URL-safe characters.
fn load(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --http-token-file {}", path.display()))?;
    let token = text.trim();
    let usable = token.len() >= MIN_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if !usable {
        anyhow::bail!(
            "--http-token-file {}: a token is one line of at least {MIN_TOKEN_LEN} letters, digits, \
             '-', '_', '.' or '~'; remove the file to have one made",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// A new random token at `path`, which must not exist.
fn create_new(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // 128 random bits, from the same generator as session secrets.
    let token = crate::session::secret::Secret::generate().to_hex()[..32].to_string();
    let tmp = dir.join(format!(".ka-web-token.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map(|()| token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_private_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-token");
        let (made, fresh) = load_or_create(&path).unwrap();
        assert!(fresh && made.len() == 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, fresh) = load_or_create(&path).unwrap();
        assert_eq!((again.as_str(), fresh), (made.as_str(), false));
        assert!(matches(&made, &again));
        assert!(!matches(&made[..31], &again));
        assert!(!matches("x", &again));
    }

    #[test]
    fn a_link_or_a_short_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let err = load_or_create(&link).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let err = load_or_create(&short).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
    }
}
