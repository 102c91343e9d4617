//! Following log files line by line: a node's console log while it runs
//! (sent to the source by `ka join --console-log`), and the node logs at
//! the source (`ka console`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a followed file is looked at again.
const POLL: Duration = Duration::from_millis(200);
/// The longest line kept whole; a longer one is passed on in pieces.
const MAX_LINE: usize = 4096;

/// A file read from an offset on as it grows, cut into lines.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows `path` from `offset` (0: from its start). The file may not
    /// exist yet.
    pub fn new(path: PathBuf, offset: u64) -> Follower {
        Follower {
            path,
            file: None,
            offset,
            partial: Vec::new(),
        }
    }

    /// Follows `path` from its last `lines` lines.
    pub fn from_last_lines(path: PathBuf, lines: usize) -> Follower {
        let offset = std::fs::read(&path)
            .map(|bytes| last_lines_offset(&bytes, lines))
            .unwrap_or(0);
        Follower::new(path, offset)
    }

    /// The whole lines added since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = &mut self.file else {
            return Vec::new();
        };
        // A file truncated or replaced under us is read from its start.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        let mut added = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_ok() {
            let _ = file.take(1 << 20).read_to_end(&mut added);
        }
        self.offset += added.len() as u64;
        self.partial.extend_from_slice(&added);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if self.partial.len() > MAX_LINE {
            let piece: Vec<u8> = self.partial.drain(..).collect();
            lines.push(String::from_utf8_lossy(&piece).into_owned());
        }
        lines
    }
}

/// Where the last `lines` lines of `bytes` begin.
fn last_lines_offset(bytes: &[u8], lines: usize) -> u64 {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'\n')
        .nth(lines.saturating_sub(1))
        .map_or(0, |(i, _)| i as u64 + 1)
}

/// Sends the lines of `path` (from its start, and as it grows) to `tx`,
/// until the task is dropped. A line that finds `tx` full is dropped: the
/// node does not slow down for its log.
pub async fn tail_lines(path: PathBuf, tx: tokio::sync::mpsc::Sender<String>) {
    let mut follower = Follower::new(path, 0);
    loop {
        for line in follower.new_lines() {
            let _ = tx.try_send(line);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What `ka console` follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// One node's log.
    Node(String),
    /// Every node's, each line after `NODE: `.
    All,
}

/// Prints the node log lines of `dir` as they come (from the last `back`
/// lines of each file), until `stop` says so. Files that appear are
/// picked up.
pub fn follow(
    dir: &Path,
    watch: &Watch,
    back: usize,
    mut print: impl FnMut(&str),
    stop: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let mut followers: BTreeMap<String, Follower> = BTreeMap::new();
    if let Watch::Node(name) = watch {
        let path = super::nodelog::node_file(dir, name);
        followers.insert(name.clone(), Follower::from_last_lines(path, back));
    }
    let mut first = true;
    while !stop() {
        if *watch == Watch::All {
            let entries = std::fs::read_dir(dir).map_err(|e| {
                anyhow::anyhow!(
                    "reading the log directory {} ({e}): is this the source, and are you root? (--log-dir, --session)",
                    dir.display()
                )
            })?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".log"))
                else {
                    continue;
                };
                if !followers.contains_key(name) {
                    // A file there from the start shows its last lines;
                    // one that appears later, all of them.
                    let f = if first {
                        Follower::from_last_lines(path.clone(), back)
                    } else {
                        Follower::new(path.clone(), 0)
                    };
                    followers.insert(name.to_string(), f);
                }
            }
        }
        first = false;
        for (name, f) in &mut followers {
            for line in f.new_lines() {
                match watch {
                    Watch::All => print(&format!("{name}: {line}")),
                    Watch::Node(_) => print(&line),
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_last_lines_start_where_they_should() {
        assert_eq!(last_lines_offset(b"a\nb\nc\n", 2), 2);
        assert_eq!(last_lines_offset(b"a\nb\nc", 1), 4);
        assert_eq!(last_lines_offset(b"a\nb\n", 5), 0);
        assert_eq!(last_lines_offset(b"", 3), 0);
    }

    #[test]
    fn a_follower_gives_whole_lines_as_they_are_appended() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.log");
        let mut f = Follower::new(path.clone(), 0);
        assert!(f.new_lines().is_empty(), "no file yet");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"one\ntw").unwrap();
        assert_eq!(f.new_lines(), ["one"]);
        file.write_all(b"o\nthree\n").unwrap();
        assert_eq!(f.new_lines(), ["two", "three"]);
        let mut tail = Follower::from_last_lines(path, 1);
        assert_eq!(tail.new_lines(), ["three"]);
    }
}
