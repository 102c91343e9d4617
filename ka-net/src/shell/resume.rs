//! What survives a restart: the identity of an image, the durable prefix of a
//! node's copy, and the outcomes a source has decided.
//!
//! A node killed halfway through a clone, started again with the same
//! arguments, should not fetch the first half again; a source killed and
//! started again on the same image should neither make its nodes start over
//! nor forget the nodes that had already finished. Each keeps a small state
//! file for that, in a state directory (`ka … --state-dir`):
//!
//! - `node-<session>-<name>.state`: the target, the image's identity and size,
//!   and the prefix of the target that is written *and durable* (the target is
//!   `fdatasync`ed before the prefix is recorded). Written atomically (a
//!   temporary file, flushed, renamed over the old one), at most a few times a
//!   second, while the image arrives; removed once the copy is checked. A
//!   packed stream's node records a frame end instead: the stream offset it
//!   resumes from (`durable`) and the image bytes before it (`unpacked`),
//!   under a header of version 2, which an older ka refuses rather than
//!   misreads ([`crate::image::packed`] has the why).
//! - `source-<session>-<image>.state`: the outcomes decided so far (node name,
//!   MAC, OK or the reason it failed), rewritten as they are decided and
//!   removed when the session ends.
//!
//! Both are plain `key value` lines with a version header, so an operator
//! can read them and a future version can refuse them clearly.
//!
//! # Expiry
//!
//! A record is trusted for [`STATE_MAX_AGE`] (24 hours) after it was last
//! written (its modification time: both files are rewritten as the session
//! goes on). An older one belongs to a session nobody finished, and what it
//! vouches for may no longer hold: a node's target may have been written by
//! something else since, a source's nodes reinstalled by other means. It is
//! not resumed from; loading it reports its age and removes it, so the next
//! run starts afresh instead of tripping over it again.
//!
//! # Image identity
//!
//! [`image_identity`] names an image without reading it all, so that a node
//! can tell whether a restarted source serves the image its prefix belongs
//! to: for a regular file, its size, modification time (to the nanosecond)
//! and inode — any rewrite changes one of them; for a block device, its size
//! and BLAKE3 of its first and last MiB — a device has no modification time,
//! and the first and last MiB hold the partition tables (primary and GPT
//! backup) and file-system superblocks, which change when the device is
//! repartitioned or reformatted. A stream (command, tar, stdin) cannot be read
//! twice the same, so it gets a random identity per source process
//! ([`random_identity`]): its nodes resume across their own restarts, not
//! across the source's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ka_core::codec::ImageId;

use crate::Error;

const NODE_HEADER: &str = "ka-node-state 1";
/// The header of a packed stream's node state, which has `unpacked`.
const PACKED_NODE_HEADER: &str = "ka-node-state 2";
const SOURCE_HEADER: &str = "ka-source-state 1";

/// How much of each end of a block device goes into its identity.
const DEVICE_PROBE: u64 = 1 << 20;

/// The identity of the file or block device at `path` (see the module docs).
pub fn image_identity(path: &Path) -> Result<ImageId, Error> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    let mut h = blake3::Hasher::new_derive_key("ka 2024 image identity v1");
    if meta.file_type().is_block_device() {
        let mut f =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let size = crate::image::blockdev::size_of(&f)
            .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?;
        h.update(b"device");
        h.update(&size.to_le_bytes());
        let probe = DEVICE_PROBE.min(size);
        let mut buf = vec![0u8; probe as usize];
        for at in [0, size - probe] {
            f.seek(SeekFrom::Start(at))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            h.update(&buf);
        }
    } else {
        h.update(b"file");
        h.update(&meta.len().to_le_bytes());
        h.update(&meta.mtime().to_le_bytes());
        h.update(&meta.mtime_nsec().to_le_bytes());
        h.update(&meta.ino().to_le_bytes());
    }
    Ok(ImageId(*h.finalize().as_bytes()))
}

/// A fresh identity for a stream image, which no other process will match.
pub fn random_identity() -> ImageId {
    ImageId(super::nonce().0)
}

/// Makes sure `dir` exists and can hold state files; the error says what to do.
pub fn prepare_state_dir(dir: &Path) -> Result<(), Error> {
    let unusable = |e: std::io::Error| {
        Error::Invalid(format!(
            "the state directory {} is unusable ({e}): pass --state-dir with a writable directory",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(unusable)?;
    let probe = dir.join(format!(".ka-probe-{}", std::process::id()));
    File::create(&probe).map_err(unusable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `text` made safe as part of a file name (and unambiguous): bytes outside
/// `[A-Za-z0-9._-]` become `%XX`.
fn file_part(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `text` on one line: `%`, newlines and tabs escaped.
fn escape(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
        .replace('\t', "%09")
        .replace(' ', "%20")
}

fn unescape(text: &str) -> String {
    text.replace("%20", " ")
        .replace("%09", "\t")
        .replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%25", "%")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// How long after its last write a state record is still resumed from
/// (see the module docs, "Expiry").
pub const STATE_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Reads a state file: `None` when there is none. A file last written more
/// than `max_age` ago is removed and refused with its age.
fn read_state(path: &Path, max_age: Duration) -> Result<Option<String>, String> {
    let modified = match std::fs::metadata(path).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // A clock set back makes a record look new, never old: it is kept.
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age > max_age {
        let removed = match std::fs::remove_file(path) {
            Ok(()) => "removed it".to_string(),
            Err(e) => format!("could not remove it ({e}): remove it by hand"),
        };
        return Err(format!(
            "{} was last written {:.1} h ago, longer than the {} h a state record is trusted: \
             not resuming from it; {removed}",
            path.display(),
            age.as_secs_f64() / 3600.0,
            max_age.as_secs() / 3600
        ));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// What a node needs to resume its copy safely after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The session.
    pub session: String,
    /// The node's name.
    pub name: String,
    /// The target written (a regular file or a block device).
    pub target: PathBuf,
    /// The image the copy belongs to, as its source named it.
    pub image: ImageId,
    /// The image's size, when the source said it.
    pub size: Option<u64>,
    /// The prefix of the target written and flushed to stable storage;
    /// of a packed stream, the offset of a frame end in the stream.
    pub durable: u64,
    /// A packed stream's: the image bytes before that frame end, written
    /// and flushed to the target. `None` for a plain stream.
    pub unpacked: Option<u64>,
}

impl NodeState {
    /// Where the state of node `name` in `session` lives under `dir`.
    pub fn path(dir: &Path, session: &str, name: &str) -> PathBuf {
        dir.join(format!(
            "node-{}-{}.state",
            file_part(session),
            file_part(name)
        ))
    }

    /// Reads the state at `path`: `Ok(None)` if there is none, `Err` with
    /// the reason if it cannot be used (the copy then starts over), among
    /// them a record older than [`STATE_MAX_AGE`], which is removed.
    pub fn load(path: &Path) -> Result<Option<NodeState>, String> {
        Self::load_within(path, STATE_MAX_AGE)
    }

    /// [`NodeState::load`], trusting a record for `max_age` after its last
    /// write.
    pub fn load_within(path: &Path, max_age: Duration) -> Result<Option<NodeState>, String> {
        let Some(text) = read_state(path, max_age)? else {
            return Ok(None);
        };
        let mut lines = text.lines();
        let header = lines.next();
        if header != Some(NODE_HEADER) && header != Some(PACKED_NODE_HEADER) {
            return Err(format!(
                "{} is not a state file this ka version reads",
                path.display()
            ));
        }
        let (mut session, mut name, mut target, mut image, mut size, mut durable) =
            (None, None, None, None, None, None);
        let mut unpacked = None;
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "session" => session = Some(unescape(value)),
                "name" => name = Some(unescape(value)),
                "target" => target = Some(PathBuf::from(unescape(value))),
                "image" => image = unhex::<32>(value).map(ImageId),
                "size" => size = Some(value.parse::<u64>().ok()),
                "durable" => durable = value.parse::<u64>().ok(),
                "unpacked" => unpacked = Some(value.parse::<u64>().ok()),
                _ => {}
            }
        }
        // A packed stream's state has its frame end's image offset, and
        // only it has.
        let unpacked = match (header == Some(PACKED_NODE_HEADER), unpacked) {
            (true, Some(Some(at))) => Some(Some(at)),
            (false, None) => Some(None),
            _ => None,
        };
        match (session, name, target, image, size, durable, unpacked) {
            (
                Some(session),
                Some(name),
                Some(target),
                Some(image),
                Some(size),
                Some(durable),
                Some(unpacked),
            ) => Ok(Some(NodeState {
                session,
                name,
                target,
                image,
                size,
                durable,
                unpacked,
            })),
            _ => Err(format!("{} is incomplete or garbled", path.display())),
        }
    }

    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let header = match self.unpacked {
            None => NODE_HEADER,
            Some(_) => PACKED_NODE_HEADER,
        };
        let mut text = format!(
            "{header}\nsession {}\nname {}\ntarget {}\nimage {}\nsize {}\ndurable {}\n",
            escape(&self.session),
            escape(&self.name),
            escape(&self.target.to_string_lossy()),
            hex(&self.image.0),
            self.size.map_or("unknown".to_string(), |s| s.to_string()),
            self.durable
        );
        if let Some(at) = self.unpacked {
            text.push_str(&format!("unpacked {at}\n"));
        }
        crate::write_atomically(path, text.as_bytes(), 0o644)
    }
}

/// Flushes what has been written to the target at `path` to stable storage
/// (`fdatasync` through a handle of our own: the sink, and its handle, are
/// with the relay's receiving thread).
pub fn sync_target(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().read(true).open(path)?.sync_data()
}

/// The outcome of a node as a restarted source must remember it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedOutcome {
    /// The node's name.
    pub name: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// OK, or why it failed.
    pub outcome: Result<(), String>,
}

/// What a source keeps so that, restarted on the same image, it still
/// accounts for the nodes whose outcome was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    /// The session.
    pub session: String,
    /// The image served.
    pub image: ImageId,
    /// The outcomes decided so far.
    pub outcomes: Vec<RecordedOutcome>,
}

impl SavedSession {
    /// Where the state of `session` serving `image` lives under `dir`: one
    /// file per image, so sources of different images never mix.
    pub fn path(dir: &Path, session: &str, image: &ImageId) -> PathBuf {
        dir.join(format!(
            "source-{}-{}.state",
            file_part(session),
            hex(&image.0[..8])
        ))
    }

    /// Reads the state at `path`: `Ok(None)` if there is none; `Err` with
    /// the reason if it cannot be used, among them a record older than
    /// [`STATE_MAX_AGE`], which is removed.
    pub fn load(path: &Path) -> Result<Option<SavedSession>, String> {
        Self::load_within(path, STATE_MAX_AGE)
    }

    /// [`SavedSession::load`], trusting a record for `max_age` after its
    /// last write.
    pub fn load_within(path: &Path, max_age: Duration) -> Result<Option<SavedSession>, String> {
        let Some(text) = read_state(path, max_age)? else {
            return Ok(None);
        };
        let mut lines = text.lines();
        if lines.next() != Some(SOURCE_HEADER) {
            return Err(format!(
                "{} is not a state file this ka version reads",
                path.display()
            ));
        }
        let (mut session, mut image, mut outcomes) = (None, None, Vec::new());
        for line in lines {
            let mut words = line.splitn(5, ' ');
            match words.next() {
                Some("session") => session = words.next().map(unescape),
                Some("image") => image = words.next().and_then(unhex::<32>).map(ImageId),
                Some("node") => {
                    let name = words.next().map(unescape);
                    let mac = words.next().and_then(unhex::<6>);
                    let outcome = match (words.next(), words.next()) {
                        (Some("ok"), _) => Some(Ok(())),
                        (Some("ko"), reason) => Some(Err(unescape(reason.unwrap_or("")))),
                        _ => None,
                    };
                    match (name, mac, outcome) {
                        (Some(name), Some(mac), Some(outcome)) => {
                            outcomes.push(RecordedOutcome { name, mac, outcome })
                        }
                        _ => return Err(format!("{}: garbled line {line:?}", path.display())),
                    }
                }
                _ => {}
            }
        }
        match (session, image) {
            (Some(session), Some(image)) => Ok(Some(SavedSession {
                session,
                image,
                outcomes,
            })),
            _ => Err(format!("{} is incomplete or garbled", path.display())),
        }
    }

    /// The state as its file holds it.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{SOURCE_HEADER}\nsession {}\nimage {}\n",
            escape(&self.session),
            hex(&self.image.0)
        );
        for o in &self.outcomes {
            let outcome = match &o.outcome {
                Ok(()) => "ok".to_string(),
                Err(reason) => format!("ko {}", escape(reason)),
            };
            text.push_str(&format!(
                "node {} {} {outcome}\n",
                escape(&o.name),
                hex(&o.mac)
            ));
        }
        text
    }

    /// Writes `text` (from [`SavedSession::to_text`]) to `path` atomically.
    pub fn save_text(path: &Path, text: &str) -> std::io::Result<()> {
        crate::write_atomically(path, text.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_round_trips_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = NodeState::path(dir.path(), "ses sion", "n/1");
        assert!(path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .contains("n%2F1"));
        assert_eq!(NodeState::load(&path), Ok(None));
        let state = NodeState {
            session: "ses sion".into(),
            name: "n/1".into(),
            target: "/tmp/a b%c".into(),
            image: ImageId([7; 32]),
            size: Some(12345),
            durable: 4096,
            unpacked: None,
        };
        state.save(&path).unwrap();
        assert_eq!(NodeState::load(&path), Ok(Some(state.clone())));
        let unknown = NodeState {
            size: None,
            ..state.clone()
        };
        unknown.save(&path).unwrap();
        assert_eq!(NodeState::load(&path), Ok(Some(unknown)));
        let packed = NodeState {
            unpacked: Some(3 << 20),
            ..state
        };
        packed.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("ka-node-state 2\n"), "{text}");
        assert_eq!(NodeState::load(&path), Ok(Some(packed)));
        // A frame end without its header, or the header without it, is
        // not read as either kind.
        std::fs::write(&path, text.replace("ka-node-state 2", "ka-node-state 1")).unwrap();
        assert!(NodeState::load(&path).is_err());
        let cut: String = text
            .lines()
            .filter(|l| !l.starts_with("unpacked"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, cut).unwrap();
        assert!(NodeState::load(&path).is_err());
        std::fs::write(&path, "ka-node-state 1\nsession x\n").unwrap();
        assert!(NodeState::load(&path).is_err());
        std::fs::write(&path, "something else").unwrap();
        assert!(NodeState::load(&path).is_err());
    }

    #[test]
    fn saved_session_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = SavedSession {
            session: "s".into(),
            image: ImageId([9; 32]),
            outcomes: vec![
                RecordedOutcome {
                    name: "a".into(),
                    mac: [1, 2, 3, 4, 5, 6],
                    outcome: Ok(()),
                },
                RecordedOutcome {
                    name: "b c".into(),
                    mac: [0; 6],
                    outcome: Err("no heartbeat for 1.0 s\n100% sure".into()),
                },
            ],
        };
        let path = SavedSession::path(dir.path(), "s", &state.image);
        SavedSession::save_text(&path, &state.to_text()).unwrap();
        assert_eq!(SavedSession::load(&path), Ok(Some(state)));
    }

    /// Makes the file at `path` look last written `ago`.
    fn age_file(path: &Path, ago: Duration) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn a_node_record_older_than_a_day_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = NodeState::path(dir.path(), "s", "n1");
        let state = NodeState {
            session: "s".into(),
            name: "n1".into(),
            target: "/tmp/t".into(),
            image: ImageId([3; 32]),
            size: Some(10),
            durable: 4,
            unpacked: None,
        };
        state.save(&path).unwrap();
        age_file(&path, STATE_MAX_AGE - Duration::from_secs(60));
        assert_eq!(
            NodeState::load(&path),
            Ok(Some(state)),
            "a day less a minute is fresh"
        );
        age_file(&path, STATE_MAX_AGE + Duration::from_secs(60));
        let err = NodeState::load(&path).expect_err("a stale record is refused");
        assert!(err.contains("24 h") && err.contains("removed it"), "{err}");
        assert!(!path.exists(), "the stale record is removed");
        assert_eq!(
            NodeState::load(&path),
            Ok(None),
            "and the next run starts afresh"
        );
    }

    #[test]
    fn a_source_record_older_than_its_bound_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = SavedSession {
            session: "s".into(),
            image: ImageId([4; 32]),
            outcomes: vec![],
        };
        let path = SavedSession::path(dir.path(), "s", &state.image);
        SavedSession::save_text(&path, &state.to_text()).unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(SavedSession::load_within(&path, hour), Ok(Some(state)));
        age_file(&path, 2 * hour);
        let err = SavedSession::load_within(&path, hour).expect_err("stale");
        assert!(err.contains("2.0 h ago") && err.contains("1 h"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn file_identity_changes_when_the_file_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"one").unwrap();
        let a = image_identity(&p).unwrap();
        assert_eq!(image_identity(&p).unwrap(), a, "stable while unchanged");
        // Same size, new content (and a new modification time).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"two").unwrap();
        assert_ne!(image_identity(&p).unwrap(), a);
        assert_ne!(random_identity(), random_identity());
    }
}
