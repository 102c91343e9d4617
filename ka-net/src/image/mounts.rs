//! The kernel's table of mounts (`/proc/self/mountinfo`), read once per
//! question: which file systems sit on a device (the checks that refuse a
//! device in use) and which make up a running system (`ka serve --system`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's ID.
    pub id: u64,
    /// The ID of the mount it sits on: for a mount stacked on another at the
    /// same point, that one, which it hides.
    pub parent: u64,
    /// The device number the kernel reports (`major:minor`); anonymous
    /// (major 0) for virtual file systems and for btrfs.
    pub dev: (u64, u64),
    /// The directory of the file system seen at the mount point: `/` for a
    /// whole file system, another path for a bind mount of a sub-directory.
    pub fs_root: PathBuf,
    /// Where it is mounted, as this process sees it.
    pub mount_point: PathBuf,
    /// The options of this mount (`rw,relatime`).
    pub options: String,
    /// The file-system type (`ext4`, `tmpfs`).
    pub fstype: String,
    /// The mount source (`/dev/sda2`, `tmpfs`, `server:/export`).
    pub source: String,
    /// The options of the file system itself (its super block): `rw` or
    /// `ro`, then the file system's own options.
    pub super_options: String,
}

impl Mount {
    /// Whether the file system itself is writable: a read-only bind of a
    /// read-write file system is still written through its other mounts.
    pub fn is_read_write(&self) -> bool {
        self.super_options.split(',').any(|o| o == "rw")
    }
}

/// Reads this process's mount table.
pub fn read_mounts() -> io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Parses `mountinfo` text; lines that do not parse are skipped (the format
/// is the kernel's and stable, so that means a field this parser does not
/// need changed shape, not a mount that matters).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS
    let fields: Vec<&str> = line.split(' ').collect();
    let dash = fields.iter().position(|f| *f == "-")?;
    if dash < 6 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    Some(Mount {
        id: fields[0].parse().ok()?,
        parent: fields[1].parse().ok()?,
        dev: (major.parse().ok()?, minor.parse().ok()?),
        fs_root: unescape_path(fields[3]),
        mount_point: unescape_path(fields[4]),
        options: fields[5].to_string(),
        fstype: fields.get(dash + 1)?.to_string(),
        source: String::from_utf8_lossy(&unescape(fields.get(dash + 2)?)).into_owned(),
        super_options: fields.get(dash + 3).unwrap_or(&"").to_string(),
    })
}

/// `mountinfo` and `fstab` write a space, tab, newline and backslash in a
/// path as an octal escape (`\040`); this undoes it, byte for byte.
pub fn unescape(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match octal {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// [`unescape`] into a path, which may not be UTF-8.
pub fn unescape_path(s: &str) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&unescape(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mountinfo_line_with_optional_fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    garbage\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        let m = &mounts[0];
        assert_eq!((m.id, m.parent), (36, 35));
        assert_eq!(m.dev, (98, 0));
        assert_eq!(m.fs_root, PathBuf::from("/mnt1"));
        assert_eq!(m.mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m.options, "rw,noatime");
        assert_eq!(m.fstype, "ext3");
        assert_eq!(m.source, "/dev/root");
        assert_eq!(m.super_options, "rw,errors=continue");
        assert!(m.is_read_write());
        assert_eq!(mounts[1].fstype, "proc");
    }

    #[test]
    fn escapes_are_undone_and_a_lone_backslash_is_kept() {
        assert_eq!(unescape("/mnt/a\\040b"), b"/mnt/a b");
        assert_eq!(unescape("/x\\"), b"/x\\");
        assert_eq!(unescape("/x\\09"), b"/x\\09");
    }
}
