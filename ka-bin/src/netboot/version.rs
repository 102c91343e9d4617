//! Which ka a netboot image carries, written beside the image.
//!
//! A node refuses to join a source of another protocol version, and it
//! says so only on its own console. So `ka netboot build` writes the
//! version of the `ka` it puts into the initramfs into a small file next
//! to it (`<initramfs>.version`), and `ka doctor` compares it with its own
//! before any node boots.
//!
//! The version is read from the `ka` binary itself (its [`STAMP`]), not
//! assumed, because `--ka` may put another build into the image.

use std::fmt;

/// This build's version stamp, kept in the binary so a build of the
/// image can read it from whichever `ka` it packs. The protocol number is
/// spelled out (`concat!` takes literals only); a unit test holds it to
/// [`ka_core::codec::PROTOCOL_VERSION`].
pub const STAMP: &str = concat!(
    "ka-version-stamp:",
    env!("CARGO_PKG_VERSION"),
    ":protocol=8:end"
);

/// Keeps [`STAMP`] in the binary even though nothing else reads it.
#[used]
static KEEP_STAMP: &str = STAMP;

/// What follows the initramfs name to name its version file.
pub const FILE_SUFFIX: &str = ".version";

/// The ka version and protocol version of a `ka` binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KaVersion {
    /// The package version, e.g. `0.1.0`.
    pub version: String,
    /// The wire protocol version ([`ka_core::codec::PROTOCOL_VERSION`]).
    pub protocol: u16,
}

impl KaVersion {
    /// The version of the running `ka`.
    pub fn running() -> KaVersion {
        KaVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: ka_core::codec::PROTOCOL_VERSION,
        }
    }

    /// The version stamped into a `ka` binary's bytes; `None` for a binary
    /// without a stamp (a build older than the stamp, or not ka).
    pub fn of_binary(bytes: &[u8]) -> Option<KaVersion> {
        const PREFIX: &[u8] = b"ka-version-stamp:";
        let mut rest = bytes;
        // The prefix may also stand alone in the binary (this very
        // search): take the first occurrence that parses.
        while let Some(at) = find(rest, PREFIX) {
            let tail = &rest[at + PREFIX.len()..];
            let text = &tail[..tail.len().min(64)];
            if let Some(v) = parse_stamp(text) {
                return Some(v);
            }
            rest = &rest[at + 1..];
        }
        None
    }

    /// The version file's text.
    pub fn to_file(&self) -> String {
        format!("ka {}\nprotocol {}\n", self.version, self.protocol)
    }

    /// Reads a version file's text.
    pub fn from_file(text: &str) -> Result<KaVersion, String> {
        let mut version = None;
        let mut protocol = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("ka", v)) => version = Some(v.trim().to_string()),
                Some(("protocol", p)) => protocol = p.trim().parse::<u16>().ok(),
                _ => {}
            }
        }
        match (version, protocol) {
            (Some(version), Some(protocol)) => Ok(KaVersion { version, protocol }),
            _ => Err("expected the lines `ka VERSION` and `protocol N`".to_string()),
        }
    }
}

impl fmt::Display for KaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ka {} (protocol {})", self.version, self.protocol)
    }
}

/// The version file's path in the TFTP root for the initramfs at
/// `initramfs` (the inventory's `boot.initramfs`).
pub fn file_name(initramfs: &str) -> String {
    format!("{initramfs}{FILE_SUFFIX}")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `VERSION:protocol=N:end` at the start of `text`.
fn parse_stamp(text: &[u8]) -> Option<KaVersion> {
    let text = std::str::from_utf8(text.split(|&b| b == 0).next()?).ok()?;
    let (version, rest) = text.split_once(':')?;
    let protocol = rest.strip_prefix("protocol=")?.split_once(":end")?.0;
    let valid = !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if !valid {
        return None;
    }
    Some(KaVersion {
        version: version.to_string(),
        protocol: protocol.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_names_this_builds_protocol() {
        let mut bytes = b"junk ka-version-stamp: more junk ".to_vec();
        bytes.extend_from_slice(STAMP.as_bytes());
        bytes.push(0);
        assert_eq!(KaVersion::of_binary(&bytes), Some(KaVersion::running()));
    }

    #[test]
    fn the_running_binary_carries_its_stamp() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(KaVersion::of_binary(&exe), Some(KaVersion::running()));
    }

    #[test]
    fn a_binary_without_a_stamp_has_no_version() {
        assert_eq!(KaVersion::of_binary(b"\x7fELF nothing here"), None);
        assert_eq!(
            KaVersion::of_binary(b"ka-version-stamp:1.0:protocol=x:end"),
            None
        );
    }

    #[test]
    fn the_version_file_reads_back() {
        let v = KaVersion {
            version: "0.9.1".into(),
            protocol: 4,
        };
        assert_eq!(KaVersion::from_file(&v.to_file()), Ok(v));
        assert!(KaVersion::from_file("garbage").is_err());
        assert_eq!(file_name("ka/initramfs.img"), "ka/initramfs.img.version");
    }
}
