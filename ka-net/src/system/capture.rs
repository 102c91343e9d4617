//! The source's side of a system clone: the running machine read as one
//! [system stream](super::stream).
//!
//! Each file system is read by GNU tar from a private, non-recursive bind
//! mount of it, made inside a mount namespace of tar's own (`unshare`): tar
//! sees that file system alone (no /proc, /sys, /dev, tmpfs or other mounts,
//! and the files hidden under mount points too), and the bind mount goes
//! away with tar whatever happens to ka. The machine keeps running: files
//! that change or vanish while tar reads them are reported as warnings, not
//! failures; the copy of such a file is whatever tar read.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::layout::{Content, Layout};
use super::stream::{header, padding_after, SectionKind, MAGIC};
use super::Plan;
use crate::image::process::{widen_pipe, Supervised};
use crate::Error;

/// The largest tree chunk the source makes: one pipe read.
const CHUNK: usize = 1 << 20;

/// What the source sends after the plan, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A mounted file system, as a tar archive.
    Tree {
        /// The partition's position in the layout.
        index: u32,
        /// Where it is mounted now.
        mounted_at: PathBuf,
        /// Where the running system mounts it (for messages).
        mountpoint: String,
        /// Directories whose contents are left out, relative to it.
        excludes: Vec<String>,
    },
    /// A partition's bytes.
    Raw {
        /// The partition's position in the layout.
        index: u32,
        /// Its device.
        device: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
}

/// A system clone's stream, ready to be read: the plan as JSON and the
/// parts that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The plan, as the nodes read it first.
    pub plan_json: String,
    /// What follows, in order.
    pub parts: Vec<Part>,
    /// Files left out wherever they are (the source's own spool, which
    /// must not copy itself), as absolute paths.
    pub skip_files: Vec<PathBuf>,
}

impl Capture {
    /// The stream for `plan`, whose layout was read on this machine (so its
    /// file systems know where they are mounted and its partitions their
    /// devices).
    pub fn new(plan: &Plan, skip_files: Vec<PathBuf>) -> Result<Capture, Error> {
        let plan_json = serde_json::to_string(plan)
            .map_err(|e| Error::Invalid(format!("encoding the system plan: {e}")))?;
        Ok(Capture {
            plan_json,
            parts: parts(&plan.layout)?,
            skip_files,
        })
    }

    /// A reader of the whole stream; warnings (files that changed while
    /// read) are added to `warnings` as they happen.
    pub fn reader(&self, warnings: Warnings) -> SystemReader {
        SystemReader {
            pending: VecDeque::from(self.parts.clone()),
            skip_files: self.skip_files.clone(),
            current: Current::Start(self.plan_json.clone().into_bytes()),
            out: Vec::with_capacity(CHUNK + 64),
            out_at: 0,
            position: 0,
            warnings,
        }
    }
}

/// What to send for `layout`, in stream order: every tree (in mount-point
/// order, see below), then the raw partitions in the layout's order.
fn parts(layout: &Layout) -> Result<Vec<Part>, Error> {
    let mut parts = Vec::new();
    let mut index = 0u32;
    for disk in &layout.disks {
        for p in &disk.partitions {
            match &p.content {
                Content::Tree(fs) => {
                    let mounted_at = fs.mounted_at.clone().ok_or_else(|| {
                        Error::Invalid(format!(
                            "{} ({}) is not mounted on this machine",
                            fs.mountpoint, fs.kind
                        ))
                    })?;
                    parts.push(Part::Tree {
                        index,
                        mounted_at,
                        mountpoint: fs.mountpoint.clone(),
                        excludes: fs.excludes.clone(),
                    });
                }
                Content::Raw { .. } => {
                    let device = p.device.clone().ok_or_else(|| {
                        Error::Invalid(format!(
                            "partition {} of {} has no device on this machine",
                            p.number, disk.device
                        ))
                    })?;
                    parts.push(Part::Raw {
                        index,
                        device,
                        len: p.size * u64::from(disk.sector_size),
                    });
                }
                Content::Swap { .. } | Content::Skipped { .. } => {}
            }
            index += 1;
        }
    }
    // Trees go in mount-point order, so a node unpacks a file system only
    // after the one its mount point lives in: the later tree's root then
    // sets the mount point's owner and mode, as the running system shows it.
    parts.sort_by_key(|p| match p {
        Part::Tree { mountpoint, .. } => (0, mountpoint.matches('/').count(), mountpoint.clone()),
        Part::Raw { index, .. } => (1, *index as usize, String::new()),
    });
    Ok(parts)
}

/// Warnings of a capture (files changed or vanished while read), shared
/// with whoever reports them.
#[derive(Debug, Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// Everything reported so far.
    pub fn list(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn add(&self, w: String) {
        tracing::warn!("{w}");
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }
}

enum Current {
    /// The magic and the plan are next.
    Start(Vec<u8>),
    /// Between parts.
    Between,
    /// Reading a tree from tar.
    Tree {
        tar: Supervised,
        stdout: ChildStdout,
        mountpoint: String,
    },
    /// Reading a partition.
    Raw {
        device: File,
        path: PathBuf,
        left: u64,
    },
    /// The END section is out.
    Done,
}

/// The system stream as a [`Read`]er, made part by part as it is read; at
/// most one chunk is held.
pub struct SystemReader {
    pending: VecDeque<Part>,
    skip_files: Vec<PathBuf>,
    current: Current,
    out: Vec<u8>,
    out_at: usize,
    position: u64,
    warnings: Warnings,
}

impl Read for SystemReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
            if !self.fill().map_err(io::Error::other)? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.out_at);
        buf[..n].copy_from_slice(&self.out[self.out_at..self.out_at + n]);
        self.out_at += n;
        Ok(n)
    }
}

impl SystemReader {
    /// Puts the stream's next bytes in `out`; false at its end.
    fn fill(&mut self) -> Result<bool, Error> {
        match std::mem::replace(&mut self.current, Current::Between) {
            Current::Start(plan) => {
                self.push(MAGIC);
                self.push(&header(SectionKind::Plan, 0, plan.len() as u64));
                self.push(&plan);
            }
            Current::Between => match self.pending.pop_front() {
                None => {
                    self.push(&header(SectionKind::End, 0, 0));
                    self.current = Current::Done;
                }
                Some(Part::Tree {
                    index,
                    mounted_at,
                    mountpoint,
                    excludes,
                }) => {
                    let (tar, stdout) = self.start_tar(&mounted_at, &excludes)?;
                    self.push(&header(SectionKind::Tree, index, 0));
                    self.current = Current::Tree {
                        tar,
                        stdout,
                        mountpoint,
                    };
                }
                Some(Part::Raw { index, device, len }) => {
                    let file = File::open(&device)
                        .map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
                    self.push(&header(SectionKind::Raw, index, len));
                    let pad = padding_after(self.position);
                    self.out.resize(self.out.len() + pad as usize, 0);
                    self.position += pad;
                    self.current = Current::Raw {
                        device: file,
                        path: device,
                        left: len,
                    };
                }
            },
            Current::Tree {
                mut tar,
                mut stdout,
                mountpoint,
            } => {
                let mut chunk = vec![0u8; CHUNK];
                let n = read_some(&mut stdout, &mut chunk)
                    .map_err(|e| Error::io(format!("reading tar of {mountpoint}"), e))?;
                if n == 0 {
                    drop(stdout);
                    self.finish_tar(&mut tar, &mountpoint)?;
                    self.push(&0u32.to_le_bytes());
                } else {
                    self.push(&(n as u32).to_le_bytes());
                    self.push(&chunk[..n]);
                    self.current = Current::Tree {
                        tar,
                        stdout,
                        mountpoint,
                    };
                }
            }
            Current::Raw {
                mut device,
                path,
                left,
            } => {
                if left > 0 {
                    let mut chunk = vec![0u8; (left as usize).min(CHUNK)];
                    device
                        .read_exact(&mut chunk)
                        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                    self.push(&chunk);
                    self.current = Current::Raw {
                        device,
                        path,
                        left: left - chunk.len() as u64,
                    };
                }
            }
            Current::Done => {
                self.current = Current::Done;
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn push(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        self.position += bytes.len() as u64;
    }

    /// Starts tar on a private bind mount of the file system mounted at
    /// `mounted_at`.
    fn start_tar(
        &self,
        mounted_at: &Path,
        excludes: &[String],
    ) -> Result<(Supervised, ChildStdout), Error> {
        let view = tempfile::Builder::new()
            .prefix("ka-capture-")
            .tempdir()
            .map_err(|e| Error::io("making a directory for the capture's bind mount", e))?
            .keep();
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                // The view directory is removed once tar is done: the bind
                // mount lives only in this namespace.
                r#"view=$1; src=$2; shift 2
mount --bind -- "$src" "$view" || exit 2
cd "$view" || exit 2
tar "$@"; s=$?
cd /; umount "$view"; rmdir "$view" 2>/dev/null
exit $s"#,
            )
            .arg("ka-capture")
            .arg(&view)
            .arg(mounted_at)
            .args(tar_create_args(mounted_at, excludes, &self.skip_files))
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let label = format!("tar of {}", mounted_at.display());
        let mut tar = Supervised::spawn(c, label)?;
        let stdout = tar.child_mut().stdout.take().expect("stdout is piped");
        widen_pipe(&stdout);
        Ok((tar, stdout))
    }

    /// Waits for tar: exit 1 is GNU tar's "some files differ" (changed or
    /// vanished while read on a live system), reported as warnings.
    fn finish_tar(&mut self, tar: &mut Supervised, mountpoint: &str) -> Result<(), Error> {
        let (status, stderr) = tar.wait_with_stderr()?;
        match status.code() {
            Some(0) => {}
            Some(1) => {
                for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
                    self.warnings.add(format!("{mountpoint}: {}", line.trim()));
                }
            }
            _ => {
                return Err(Error::Command {
                    command: format!("tar of {mountpoint}"),
                    status: status.to_string(),
                    stderr,
                })
            }
        }
        Ok(())
    }
}

/// GNU tar's arguments for one file system, run in the directory that shows
/// it: everything a system needs back (numeric owners, ACLs, every xattr
/// namespace: SELinux labels and file capabilities are xattrs, sparse
/// files), never crossing into another file system, excluded directories
/// sent empty (their own entry keeps mode and owner).
pub fn tar_create_args(
    mounted_at: &Path,
    excludes: &[String],
    skip_files: &[PathBuf],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--create",
        "--file=-",
        "--one-file-system",
        "--numeric-owner",
        "--acls",
        "--xattrs",
        "--xattrs-include=*",
        "--sparse",
        "--warning=no-file-ignored",
        "--anchored",
        "--wildcards",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for e in excludes {
        let e = e.trim_matches('/');
        args.push(format!("--exclude=./{}/*", escape_glob(e)));
    }
    for f in skip_files {
        if let Ok(rel) = f.strip_prefix(mounted_at) {
            args.push(format!(
                "--exclude=./{}",
                escape_glob(&rel.to_string_lossy())
            ));
        }
    }
    args.push(".".into());
    args
}

/// Escapes tar's wildcard characters in a literal path.
fn escape_glob(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Reads until `buf` is full or the pipe ends, so chunks are large.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_directories_and_skipped_files_become_anchored_patterns() {
        let args = tar_create_args(
            Path::new("/mnt/root"),
            &["tmp".into(), "/var/cache/x*y/".into()],
            &[
                PathBuf::from("/mnt/root/var/spool.ka"),
                PathBuf::from("/elsewhere/file"),
            ],
        );
        assert!(args.contains(&"--exclude=./tmp/*".to_string()), "{args:?}");
        assert!(
            args.contains(&"--exclude=./var/cache/x\\*y/*".to_string()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--exclude=./var/spool.ka".to_string()),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a.contains("elsewhere")), "{args:?}");
        assert_eq!(args.last().map(String::as_str), Some("."));
    }
}
