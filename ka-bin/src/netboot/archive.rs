//! A gzip-compressed newc cpio archive, the format the kernel unpacks as an
//! initramfs.
//!
//! Entries are kept by path and written sorted, so every directory comes
//! before what it holds (the kernel's unpacker creates nothing implicitly)
//! and the same inputs give the same bytes: owners are root, times are zero.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { data: Data, mode: u32 },
    Symlink { target: String },
    CharDevice { major: u32, minor: u32, mode: u32 },
}

#[derive(Debug, Clone)]
enum Data {
    Bytes(Vec<u8>),
    /// Read when the archive is written, so large files are not held twice.
    Path(PathBuf),
}

/// The contents of an initramfs, built up in memory and written once.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// `/a/b/` and `a/b` are one entry, `a/b`.
fn key(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    fn parents(&mut self, path: &str) {
        let mut at = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.entries
                .entry(at.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let k = key(path);
        self.parents(&k);
        self.entries.insert(k, entry);
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Entry::Dir { mode });
    }

    /// A file holding `data`.
    pub fn file(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        let data = Data::Bytes(data.into());
        self.insert(path, Entry::File { data, mode });
    }

    /// A file whose content is read from `from` when the archive is written.
    pub fn copy(&mut self, path: &str, from: &Path, mode: u32) {
        let data = Data::Path(from.to_path_buf());
        self.insert(path, Entry::File { data, mode });
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        let target = target.to_string();
        self.insert(path, Entry::Symlink { target });
    }

    /// A character device node, e.g. `/dev/console` (5, 1): the kernel opens
    /// it for init's standard streams before init can mount devtmpfs.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        self.insert(path, Entry::CharDevice { major, minor, mode });
    }

    /// Whether the archive has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&key(path))
    }

    /// The paths in the archive, in the order they are written.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Writes the archive as gzip-compressed newc cpio.
    pub fn write_gz<W: Write>(&self, out: W) -> io::Result<W> {
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        self.write_cpio(gz)?.finish()
    }

    /// Writes the archive as uncompressed newc cpio.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> io::Result<W> {
        for (i, (path, entry)) in self.entries.iter().enumerate() {
            let b = Builder::new(path).ino(i as u32 + 1).uid(0).gid(0).mtime(0);
            out = match entry {
                Entry::Dir { mode } => {
                    let w = b
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2)
                        .write(out, 0);
                    w.finish()?
                }
                Entry::File { data, mode } => {
                    let owned;
                    let bytes: &[u8] = match data {
                        Data::Bytes(b) => b,
                        Data::Path(p) => {
                            owned = std::fs::read(p).map_err(|e| {
                                io::Error::new(e.kind(), format!("reading {}: {e}", p.display()))
                            })?;
                            &owned
                        }
                    };
                    let size = u32::try_from(bytes.len()).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{path} is larger than 4 GiB, the limit of a cpio entry"),
                        )
                    })?;
                    let mut w = b
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Regular)
                        .nlink(1)
                        .write(out, size);
                    w.write_all(bytes)?;
                    w.finish()?
                }
                Entry::Symlink { target } => {
                    let mut w = b
                        .mode(0o777)
                        .set_mode_file_type(ModeFileType::Symlink)
                        .nlink(1)
                        .write(out, target.len() as u32);
                    w.write_all(target.as_bytes())?;
                    w.finish()?
                }
                Entry::CharDevice { major, minor, mode } => {
                    let w = b
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .nlink(1)
                        .write(out, 0);
                    w.finish()?
                }
            };
        }
        cpio::newc::trailer(out)
    }
}

/// One entry of a written archive, as [`read`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its path, without a leading `/`.
    pub path: String,
    /// Type and permission bits, as `stat` gives them (`0o100755` for an
    /// executable file).
    pub mode: u32,
    /// A file's content, or a symbolic link's target.
    pub data: Vec<u8>,
}

impl Listed {
    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & 0o170000 == 0o100000
    }

    /// A symbolic link's target.
    pub fn link_target(&self) -> Option<&str> {
        (self.mode & 0o170000 == 0o120000)
            .then(|| std::str::from_utf8(&self.data).ok())
            .flatten()
    }
}

/// Reads back an archive as [`Archive::write_gz`] or [`Archive::write_cpio`]
/// wrote it (gzip-compressed or not), to check what an image holds.
pub fn read(bytes: &[u8]) -> io::Result<Vec<Listed>> {
    let plain;
    let mut rest: &[u8] = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut v)?;
        plain = v;
        &plain
    } else {
        bytes
    };
    let mut out = Vec::new();
    loop {
        let mut r = cpio::NewcReader::new(rest)?;
        if r.entry().is_trailer() {
            return Ok(out);
        }
        let (path, mode) = (r.entry().name().to_string(), r.entry().mode());
        let mut data = Vec::new();
        r.read_to_end(&mut data)?;
        out.push(Listed { path, mode, data });
        rest = r.finish()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back every entry: (name, mode, content).
    fn entries(cpio: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        read(cpio)
            .unwrap()
            .into_iter()
            .map(|l| (l.path, l.mode, l.data))
            .collect()
    }

    #[test]
    fn parents_come_first_and_content_survives() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ka");
        std::fs::write(&src, b"ELF...").unwrap();
        let mut a = Archive::new();
        a.copy("/bin/ka", &src, 0o755);
        a.file("etc/ka/modules", "virtio_ring\n", 0o644);
        a.symlink("bin/sh", "busybox");
        a.char_device("dev/console", 5, 1, 0o600);
        a.dir("proc", 0o555);
        let raw = a.write_cpio(Vec::new()).unwrap();
        let got = entries(&raw);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/ka",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/ka",
                "etc/ka/modules",
                "proc"
            ]
        );
        assert_eq!(got[1].1, 0o100755);
        assert_eq!(got[1].2, b"ELF...");
        assert_eq!(got[2].1, 0o120777);
        assert_eq!(got[2].2, b"busybox");
        assert_eq!(got[4].1, 0o020600);
        assert_eq!(got[8].1, 0o040555);

        // Compressed, the same archive; and the same inputs give the same bytes.
        let gz = a.write_gz(Vec::new()).unwrap();
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, raw);
        assert_eq!(a.write_gz(Vec::new()).unwrap(), gz);
        let listed = read(&gz).unwrap();
        assert_eq!(entries(&gz), got);
        assert!(listed[1].is_file() && !listed[0].is_file());
        assert_eq!(listed[2].link_target(), Some("busybox"));
        assert_eq!(listed[1].link_target(), None);
    }

    #[test]
    fn a_missing_source_file_is_named() {
        let mut a = Archive::new();
        a.copy("bin/ka", Path::new("/nonexistent/ka"), 0o755);
        let err = a.write_cpio(Vec::new()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ka"), "{err}");
    }
}
