//! Image sources: produce an image as a sequence of records.
//!
//! Every source yields `Data` records whose payload contains no all-zero
//! [`BLOCK`], `Zero` records for holes and zero blocks, and a single `End`
//! record at the image size. Record boundaries fall on `BLOCK` multiples
//! (except at the image end), so nodes hash straight from their receive buffer.
//!
//! Sources are blocking (`std::io`): a file or pipe read is a blocking
//! system call, and tokio would push it to a blocking thread anyway
//! (`tokio::fs` does). A source is read by one dedicated thread (the
//! digest pass of a file, the spooler of a stream), which avoids one thread
//! hop per buffer.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use ka_core::record::{RecordHeader, RecordKind};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::image::blockdev;
use crate::image::{is_zero, BLOCK};
use crate::Error;

/// What to read an image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A regular file or a block device; seekable, so a node can be resumed
    /// from any offset.
    File(PathBuf),
    /// The standard output of `sh -c CMD`; streams once.
    Command(String),
    /// A directory tree, archived by GNU tar (see [`open_source`]); streams once.
    Tar(PathBuf),
    /// This process's standard input; streams once.
    Stdin,
}

/// A producer of image records.
pub trait ImageSource: Send {
    /// Produces the next record. For `Data`, the payload is written to
    /// `buf[..len]`; `buf.len()` bounds the record length and must be a
    /// non-zero multiple of [`BLOCK`]. Returns `Ok(None)` once `End` has been
    /// returned, or when a limit set by [`set_limit`](Self::set_limit) is
    /// reached.
    fn next_record(&mut self, buf: &mut [u8]) -> Result<Option<RecordHeader>, Error>;

    /// Restarts the stream at `offset` (any offset up to the image size; a
    /// node resumes where its copy stops). Only seekable sources can; the
    /// others return [`Error::NotSeekable`].
    fn seek(&mut self, offset: u64) -> Result<(), Error>;

    /// The offset of the next record.
    fn position(&self) -> u64;

    /// The image size, when known before the end (files and block devices).
    fn size(&self) -> Option<u64>;

    /// Stops before `limit`: no record crosses it and `next_record` returns
    /// `Ok(None)` there. Lets a node serve a downstream only what it has
    /// already written. The default (streams) ignores it.
    fn set_limit(&mut self, _limit: u64) {}

    /// The file-backed source behind this one, if any, so the sender can send
    /// `Data` payloads with `sendfile(2)` instead of copying them through
    /// user space.
    fn as_file_source(&mut self) -> Option<&mut FileSource> {
        None
    }
}

/// Refuses a path that is not a regular file or a block device, without
/// opening it: opening a FIFO waits for a writer, so `--image fifo` would
/// hang instead of saying what to do.
pub fn check_servable(path: &Path) -> Result<(), Error> {
    let kind = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Error::Invalid(format!(
            "{} is neither a regular file nor a block device: serve a pipe or a device stream with --stdin or --command 'cat …'",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses to serve a block device (a disk or a partition) that holds a file
/// system mounted read-write, on itself, a partition or a device built on it:
/// its bytes change while they are sent, so every node would get an
/// inconsistent copy. Call it beside [`check_servable`] before anything is
/// sent; `ka serve --force` skips it. A regular file passes (whether
/// something writes to it cannot be told from here), and so does a device
/// mounted read-only or not at all.
pub fn check_not_mounted_rw(path: &Path) -> Result<(), Error> {
    let kind = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .file_type();
    if !kind.is_block_device() {
        return Ok(());
    }
    let info = blockdev::inspect(path)?;
    blockdev::check_not_mounted_rw(&info)?;
    Ok(())
}

/// Opens a source.
///
/// A directory is archived by spawning GNU tar
/// (`tar --sparse --numeric-owner --acls --xattrs -cpf - -C DIR .`), not by the `tar`
/// crate: GNU tar is what the nodes' untar sink runs, it is present on every
/// Debian-like system, and it already handles sparse files, hard links,
/// devices, xattrs, numeric ownership and its own format quirks, which a crate
/// reimplementation would have to match byte for byte. It also runs in its own
/// process, so its file-system walk costs the data plane no thread.
pub fn open_source(spec: &SourceSpec) -> Result<Box<dyn ImageSource>, Error> {
    Ok(match spec {
        SourceSpec::File(path) => Box::new(FileSource::open(path)?),
        SourceSpec::Command(cmd) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            Box::new(CommandSource::spawn(c, cmd.clone())?)
        }
        SourceSpec::Tar(dir) => {
            let meta = std::fs::metadata(dir)
                .map_err(|e| Error::io(format!("tar source {}", dir.display()), e))?;
            if !meta.is_dir() {
                return Err(Error::Invalid(format!(
                    "tar source {} is not a directory",
                    dir.display()
                )));
            }
            let mut c = Command::new("tar");
            let mut dir_arg = OsString::from("--directory=");
            dir_arg.push(dir.as_os_str());
            c.args([
                "--sparse",
                "--numeric-owner",
                "--acls",
                "--xattrs",
                "-cpf",
                "-",
            ])
            .arg(dir_arg)
            .arg(".");
            Box::new(CommandSource::spawn(
                c,
                format!("tar -c {}", dir.display()),
            )?)
        }
        SourceSpec::Stdin => {
            let fd = nix::unistd::dup(0).map_err(|e| Error::io("duplicating stdin", e.into()))?;
            // SAFETY: `dup` returned a fresh descriptor that nothing else owns.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            Box::new(StreamSource::new(file))
        }
    })
}

fn align_down(x: u64) -> u64 {
    x - x % BLOCK
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

/// A regular file or block device. Holes are found with `SEEK_DATA` /
/// `SEEK_HOLE` without reading them; data regions are read and scanned for
/// zero blocks.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    /// The file's or device's length when opened: the largest `size` can be.
    len: u64,
    pos: u64,
    limit: u64,
    /// End (block-aligned, capped at `size`) of the data region `pos` lies in,
    /// as last reported by `SEEK_HOLE`; `pos >= data_end` means unknown.
    data_end: u64,
    /// Whether the file system answers `SEEK_DATA` (block devices do not).
    seek_data: bool,
    /// Read size for the next read; grows while a run of one kind continues
    /// and shrinks at a change, so the bytes read past a data/zero boundary
    /// (read again by the next call) stay a fraction of the run.
    read_size: usize,
    /// One block of scratch space for the probes of [`Self::next_extent`].
    scratch: Vec<u8>,
    ended: bool,
}

/// What [`FileSource::prologue`] found at the current position.
enum Step {
    Record(Option<RecordHeader>),
    InData { region_end: u64 },
}

impl FileSource {
    /// Opens a file or block device; the image is the whole file or device.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_sized(path, None)
    }

    /// Opens a file or block device as an image of `size` bytes (the first
    /// `size` bytes of a larger device: what a node wrote there); `None` means
    /// its whole length.
    pub fn open_sized(path: &Path, size: Option<u64>) -> Result<Self, Error> {
        check_servable(path)?;
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let (len, seek_data) = if meta.file_type().is_block_device() {
            (
                blockdev::size_of(&file)
                    .map_err(|e| Error::io(format!("size of {}", path.display()), e))?,
                false,
            )
        } else if meta.is_file() {
            (meta.len(), true)
        } else {
            return Err(Error::Invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        let size = match size {
            Some(s) if s > len => {
                return Err(Error::Invalid(format!(
                    "{} holds {len} bytes, fewer than the {s} bytes of the image",
                    path.display()
                )))
            }
            Some(s) => s,
            None => len,
        };
        Ok(FileSource {
            file,
            path: path.to_owned(),
            size,
            len,
            pos: 0,
            limit: u64::MAX,
            data_end: 0,
            seek_data,
            read_size: 2 * BLOCK as usize,
            scratch: Vec::new(),
            ended: false,
        })
    }

    /// Where the data region containing or following `pos` starts and ends
    /// (ends block-aligned up); `None` when only a hole remains.
    fn find_data(&mut self) -> Result<Option<(u64, u64)>, Error> {
        if !self.seek_data {
            return Ok(Some((self.pos, self.size)));
        }
        let fd = self.file.as_raw_fd();
        let start = match lseek(fd, self.pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => return Ok(None),
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                // A file system without SEEK_DATA: treat everything as data.
                self.seek_data = false;
                return Ok(Some((self.pos, self.size)));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("SEEK_DATA in {}", self.path.display()),
                    e.into(),
                ))
            }
        };
        if start >= self.size {
            return Ok(None);
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(Errno::ENXIO) => self.size,
            Err(e) => {
                return Err(Error::io(
                    format!("SEEK_HOLE in {}", self.path.display()),
                    e.into(),
                ))
            }
        };
        Ok(Some((start, align_up(end).min(self.size))))
    }

    /// Reads exactly `buf.len()` image bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Invalid(format!(
                    "{} shrank while being read (at {offset})",
                    self.path.display()
                ))
            } else {
                Error::io(format!("reading {} at {offset}", self.path.display()), e)
            }
        })
    }

    /// What comes at `pos`: a record decided without reading (End, a hole,
    /// nothing before the limit), or a data region to scan, ending at
    /// `region_end`.
    fn prologue(&mut self) -> Result<Step, Error> {
        if self.pos >= self.size {
            if self.ended || self.limit < self.size {
                return Ok(Step::Record(None));
            }
            self.ended = true;
            return Ok(Step::Record(Some(RecordHeader {
                kind: RecordKind::End,
                offset: self.size,
                len: 0,
            })));
        }
        let stop = self.limit.min(self.size);
        if self.pos >= stop {
            return Ok(Step::Record(None));
        }
        if self.pos >= self.data_end {
            match self.find_data()? {
                None => return Ok(Step::Record(Some(self.zero_record(stop)))),
                Some((start, end)) => {
                    self.data_end = end;
                    let hole_end = align_down(start).min(stop);
                    if hole_end > self.pos {
                        return Ok(Step::Record(Some(self.zero_record(hole_end))));
                    }
                }
            }
        }
        Ok(Step::InData {
            region_end: self.data_end.min(stop),
        })
    }

    /// Whether the block at `off` (cut at `region_end`) is all zero. Reads a
    /// small probe first: a data block almost always shows a non-zero byte
    /// in it, so only zero blocks are read whole.
    fn block_is_zero(&mut self, off: u64, region_end: u64) -> Result<bool, Error> {
        const PROBE: usize = 512;
        // The block containing `off`, from `off` (a resume may start mid-block).
        let len = ((align_down(off) + BLOCK).min(region_end) - off) as usize;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(BLOCK as usize, 0);
        let probe = len.min(PROBE);
        let result = self.read_at(&mut scratch[..probe], off).and_then(|()| {
            if !is_zero(&scratch[..probe]) {
                return Ok(false);
            }
            self.read_at(&mut scratch[probe..len], off + probe as u64)?;
            Ok(is_zero(&scratch[probe..len]))
        });
        self.scratch = scratch;
        result
    }

    /// The next record *without* reading a `Data` payload into memory: the
    /// payload is the file's bytes at the record's offset, for the sender to
    /// pass to `sendfile(2)` straight from the page cache. Data records are at
    /// most `max_len` bytes.
    pub fn next_extent(&mut self, max_len: usize) -> Result<Option<RecordHeader>, Error> {
        let region_end = match self.prologue()? {
            Step::Record(r) => return Ok(r),
            Step::InData { region_end } => region_end,
        };
        let first_zero = self.block_is_zero(self.pos, region_end)?;
        let mut end = (align_down(self.pos) + BLOCK).min(region_end);
        while end < region_end && (first_zero || end - self.pos < max_len as u64) {
            if self.block_is_zero(end, region_end)? != first_zero {
                break;
            }
            end = (end + BLOCK).min(region_end);
        }
        if first_zero {
            return Ok(Some(self.zero_record(end)));
        }
        let h = RecordHeader {
            kind: RecordKind::Data,
            offset: self.pos,
            len: end - self.pos,
        };
        self.pos = end;
        Ok(Some(h))
    }

    /// Follows a file that is still being written: everything before `upto`
    /// is written and may be read, and once the image is complete its
    /// `size` is known and the source runs to its `End`. Returns whether
    /// there is more to read from the current position now.
    pub fn follow(&mut self, upto: u64, size: Option<u64>) -> Result<bool, Error> {
        match size {
            Some(size) if size > self.len => Err(Error::Invalid(format!(
                "{} holds {} bytes, fewer than the {size} bytes of the image",
                self.path.display(),
                self.len
            ))),
            Some(size) => {
                self.size = size;
                self.limit = u64::MAX;
                Ok(true)
            }
            None => {
                self.limit = upto;
                Ok(upto > self.pos)
            }
        }
    }

    /// The open file or device, e.g. for `sendfile(2)` of extents.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn zero_record(&mut self, end: u64) -> RecordHeader {
        let h = RecordHeader {
            kind: RecordKind::Zero,
            offset: self.pos,
            len: end - self.pos,
        };
        self.pos = end;
        h
    }
}

impl ImageSource for FileSource {
    fn next_record(&mut self, buf: &mut [u8]) -> Result<Option<RecordHeader>, Error> {
        assert!(
            !buf.is_empty() && buf.len() as u64 % BLOCK == 0,
            "buffer must be whole blocks"
        );
        let region_end = match self.prologue()? {
            Step::Record(r) => return Ok(r),
            Step::InData { region_end } => region_end,
        };
        // In a data region: read and split off leading zero blocks or the
        // leading run of data blocks.
        let mut zero_end = None;
        loop {
            let at = zero_end.unwrap_or(self.pos);
            let mut n = (region_end - at).min(self.read_size.min(buf.len()) as u64) as usize;
            if at % BLOCK != 0 {
                // Resumed mid-block: classify the rest of that block alone, so
                // later records fall on block boundaries again.
                n = n.min((align_up(at) - at) as usize);
            }
            if n == 0 {
                break;
            }
            self.read_at(&mut buf[..n], at)?;
            let blocks = buf[..n].chunks(BLOCK as usize);
            let zeros = blocks.clone().take_while(|b| is_zero(b)).count();
            if zeros == 0 && zero_end.is_none() {
                // Leading data: the record is the run of data blocks.
                let data = blocks
                    .take_while(|b| !is_zero(b))
                    .map(|b| b.len())
                    .sum::<usize>();
                self.read_size = if data == n {
                    (align_up(n as u64) as usize * 2).min(buf.len())
                } else {
                    2 * BLOCK as usize
                };
                let h = RecordHeader {
                    kind: RecordKind::Data,
                    offset: self.pos,
                    len: data as u64,
                };
                self.pos += data as u64;
                return Ok(Some(h));
            }
            let zero_bytes = buf[..n]
                .chunks(BLOCK as usize)
                .take(zeros)
                .map(|b| b.len())
                .sum::<usize>();
            zero_end = Some(at + zero_bytes as u64);
            if zero_bytes < n {
                self.read_size = 2 * BLOCK as usize;
                break;
            }
            // The whole read was zero: keep extending the zero run.
            self.read_size = (align_up(n as u64) as usize * 2).min(buf.len());
        }
        let end = zero_end.expect("a zero run was found");
        Ok(Some(self.zero_record(end)))
    }

    fn seek(&mut self, offset: u64) -> Result<(), Error> {
        if offset > self.size {
            return Err(Error::Invalid(format!(
                "cannot seek to {offset}: beyond the image end ({})",
                self.size
            )));
        }
        self.pos = offset;
        self.data_end = 0;
        self.ended = false;
        self.read_size = 2 * BLOCK as usize;
        Ok(())
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    fn as_file_source(&mut self) -> Option<&mut FileSource> {
        Some(self)
    }
}

/// A non-seekable byte stream (a pipe, stdin), cut into records with zero-block
/// detection.
#[derive(Debug)]
pub struct StreamSource<R> {
    reader: R,
    pos: u64,
    /// Bytes read but not yet returned: what followed a data/zero boundary
    /// inside the last read. Copied back in front of the next read, so the
    /// copy costs only at boundaries.
    carry: Vec<u8>,
    eof: bool,
    ended: bool,
}

impl<R: Read + Send> StreamSource<R> {
    /// Wraps a reader; the image starts at offset 0.
    pub fn new(reader: R) -> Self {
        StreamSource {
            reader,
            pos: 0,
            carry: Vec::new(),
            eof: false,
            ended: false,
        }
    }

    /// Fills `buf` from the carry-over and the reader; returns the byte count
    /// (less than `buf.len()` only at end of stream).
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let mut n = self.carry.len().min(buf.len());
        buf[..n].copy_from_slice(&self.carry[..n]);
        self.carry.drain(..n);
        while n < buf.len() && !self.eof {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => self.eof = true,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the source stream", e)),
            }
        }
        Ok(n)
    }

    /// The next record, or `None` at end of stream (before `End`).
    fn next_inner(&mut self, buf: &mut [u8]) -> Result<Option<RecordHeader>, Error> {
        let n = self.fill(buf)?;
        if n == 0 {
            return Ok(None);
        }
        let first_zero = is_zero(&buf[..n.min(BLOCK as usize)]);
        let run = buf[..n]
            .chunks(BLOCK as usize)
            .take_while(|b| is_zero(b) == first_zero)
            .map(|b| b.len())
            .sum::<usize>();
        debug_assert!(self.carry.is_empty());
        self.carry.extend_from_slice(&buf[run..n]);
        let kind = if first_zero {
            RecordKind::Zero
        } else {
            RecordKind::Data
        };
        let h = RecordHeader {
            kind,
            offset: self.pos,
            len: run as u64,
        };
        self.pos += run as u64;
        Ok(Some(h))
    }
}

impl<R: Read + Send> ImageSource for StreamSource<R> {
    fn next_record(&mut self, buf: &mut [u8]) -> Result<Option<RecordHeader>, Error> {
        assert!(
            !buf.is_empty() && buf.len() as u64 % BLOCK == 0,
            "buffer must be whole blocks"
        );
        if self.ended {
            return Ok(None);
        }
        match self.next_inner(buf)? {
            Some(h) => Ok(Some(h)),
            None => {
                self.ended = true;
                Ok(Some(RecordHeader {
                    kind: RecordKind::End,
                    offset: self.pos,
                    len: 0,
                }))
            }
        }
    }

    fn seek(&mut self, offset: u64) -> Result<(), Error> {
        if offset == self.pos {
            return Ok(());
        }
        Err(Error::NotSeekable {
            at: self.pos,
            wanted: offset,
        })
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn size(&self) -> Option<u64> {
        None
    }
}

/// The standard output of a child process (a shell command, or tar). The
/// image ends only once the child has exited successfully, so a command that
/// fails half-way never yields a complete image.
#[derive(Debug)]
pub struct CommandSource {
    stream: StreamSource<ChildStdout>,
    child: crate::image::process::Supervised,
}

impl CommandSource {
    /// Spawns `command` with its standard output piped into the stream;
    /// `label` names it in errors.
    pub fn spawn(mut command: Command, label: String) -> Result<Self, Error> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = crate::image::process::Supervised::spawn(command, label)?;
        let stdout = child.child_mut().stdout.take().expect("stdout is piped");
        crate::image::process::widen_pipe(&stdout);
        Ok(CommandSource {
            stream: StreamSource::new(stdout),
            child,
        })
    }

    /// The child process, e.g. for its PID.
    pub fn child(&self) -> &Child {
        self.child.child()
    }
}

impl ImageSource for CommandSource {
    fn next_record(&mut self, buf: &mut [u8]) -> Result<Option<RecordHeader>, Error> {
        if self.stream.ended {
            return Ok(None);
        }
        match self.stream.next_inner(buf)? {
            Some(h) => Ok(Some(h)),
            None => {
                self.child.wait_success()?;
                self.stream.ended = true;
                Ok(Some(RecordHeader {
                    kind: RecordKind::End,
                    offset: self.stream.pos,
                    len: 0,
                }))
            }
        }
    }

    fn seek(&mut self, offset: u64) -> Result<(), Error> {
        self.stream.seek(offset)
    }

    fn position(&self) -> u64 {
        self.stream.pos
    }

    fn size(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("image.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(FileSource::open(&path).err().map(|e| e.to_string()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO as an image must not wait for a writer")
            .expect("a FIFO is refused");
        assert!(err.contains("--stdin"), "{err}");
    }
    use crate::image::digest::{digest_source, DigestKey, ImageHasher};

    const B: usize = BLOCK as usize;

    /// Collects all records; checks they tile the image and that data records
    /// carry the image's bytes. Returns (records, image bytes reassembled).
    fn drain(src: &mut dyn ImageSource, bufsize: usize) -> (Vec<RecordHeader>, Vec<u8>) {
        let mut buf = vec![0u8; bufsize];
        let mut recs = Vec::new();
        let mut img = Vec::new();
        while let Some(h) = src.next_record(&mut buf).unwrap() {
            assert_eq!(
                h.offset,
                img.len() as u64,
                "records must tile the image: {recs:?}"
            );
            match h.kind {
                RecordKind::Data => {
                    assert!(
                        !buf[..h.len as usize].chunks(B).any(is_zero),
                        "zero block sent as data"
                    );
                    img.extend_from_slice(&buf[..h.len as usize]);
                }
                RecordKind::Zero => img.resize(img.len() + h.len as usize, 0),
                RecordKind::End => {}
            }
            recs.push(h);
            assert!(recs.len() < 100_000, "source does not end");
        }
        assert_eq!(recs.last().map(|h| h.kind), Some(RecordKind::End));
        (recs, img)
    }

    /// A sparse file: hole, data, zero block written as data, data, hole, tail.
    fn sparse_file() -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut img = vec![0u8; 40 * B + 100];
        img[3 * B..6 * B].fill(1);
        // 6*B..7*B written as explicit zeros below.
        img[7 * B..9 * B + 5].fill(2);
        img[40 * B + 50] = 3;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(img.len() as u64).unwrap();
        f.as_file()
            .write_all_at(&img[3 * B..10 * B], 3 * B as u64)
            .unwrap();
        f.as_file()
            .write_all_at(&img[40 * B..], 40 * B as u64)
            .unwrap();
        (f, img)
    }

    #[test]
    fn file_source_finds_holes_and_zero_blocks() {
        let (f, img) = sparse_file();
        for bufsize in [B, 4 * B, 16 * B] {
            let mut src = FileSource::open(f.path()).unwrap();
            let (recs, got) = drain(&mut src, bufsize);
            assert!(got == img, "bufsize {bufsize}: content differs");
            let data: u64 = recs
                .iter()
                .filter(|h| h.kind == RecordKind::Data)
                .map(|h| h.len)
                .sum();
            // Blocks 3..6, 7..10 and the tail block are data; nothing else.
            assert_eq!(data, (6 * B + 100) as u64, "bufsize {bufsize}: {recs:?}");
            let data_or_zero = recs.iter().filter(|h| h.kind != RecordKind::End);
            assert!(
                data_or_zero.clone().all(|h| h.offset % BLOCK == 0),
                "records start on blocks: {recs:?}"
            );
            if bufsize > B {
                assert!(
                    data_or_zero.clone().any(|h| h.len > BLOCK),
                    "runs are merged: {recs:?}"
                );
            }
        }
    }

    #[test]
    fn extents_for_sendfile_match_buffered_records() {
        let (f, img) = sparse_file();
        for max in [B, 4 * B] {
            let mut buffered = FileSource::open(f.path()).unwrap();
            let (recs, _) = drain(&mut buffered, max);
            let mut src = FileSource::open(f.path()).unwrap();
            let mut extents = Vec::new();
            let mut got = Vec::new();
            while let Some(h) = src.next_extent(max).unwrap() {
                if h.kind == RecordKind::Data {
                    let mut payload = vec![0u8; h.len as usize];
                    src.read_at(&mut payload, h.offset).unwrap();
                    assert!(
                        !payload.chunks(B).any(is_zero),
                        "zero block in a data extent"
                    );
                    got.extend_from_slice(&payload);
                } else if h.kind == RecordKind::Zero {
                    got.resize(got.len() + h.len as usize, 0);
                }
                extents.push(h);
            }
            // Cuts may differ (the buffered reader adapts its read size);
            // which bytes are data may not.
            let data = |v: &[RecordHeader]| {
                v.iter()
                    .filter(|h| h.kind == RecordKind::Data)
                    .flat_map(|h| (h.offset..h.end()).step_by(B))
                    .collect::<Vec<_>>()
            };
            assert_eq!(data(&extents), data(&recs), "max {max}");
            assert!(extents
                .iter()
                .all(|h| h.kind != RecordKind::Data || h.len <= max as u64));
            assert!(got == img);
        }
    }

    #[test]
    fn file_source_restarts_at_any_offset_in_both_modes() {
        let (f, img) = sparse_file();
        let mut src = FileSource::open(f.path()).unwrap();
        let starts = [
            0,
            3 * B,
            5 * B,
            8 * B,
            20 * B,
            40 * B,
            img.len(),
            1,
            3 * B + 7,
            9 * B + 4,
            40 * B + 60,
        ];
        for extents in [false, true] {
            for start in starts {
                src.seek(start as u64).unwrap();
                let mut buf = vec![0u8; 4 * B];
                let mut got = vec![0u8; start];
                loop {
                    let h = if extents {
                        src.next_extent(4 * B)
                    } else {
                        src.next_record(&mut buf)
                    };
                    let Some(h) = h.unwrap() else { break };
                    assert_eq!(h.offset, got.len() as u64);
                    if h.offset != start as u64 && h.kind != RecordKind::End {
                        assert_eq!(
                            h.offset % BLOCK,
                            0,
                            "back on block boundaries after a resume: start {start} extents {extents} {h:?}"
                        );
                    }
                    match h.kind {
                        RecordKind::Data if extents => {
                            let mut p = vec![0u8; h.len as usize];
                            src.read_at(&mut p, h.offset).unwrap();
                            got.extend_from_slice(&p);
                        }
                        RecordKind::Data => got.extend_from_slice(&buf[..h.len as usize]),
                        RecordKind::Zero => got.resize(got.len() + h.len as usize, 0),
                        RecordKind::End => assert_eq!(h.offset, img.len() as u64),
                    }
                }
                assert!(
                    got[start..] == img[start..],
                    "restart at {start}, extents {extents}"
                );
            }
        }
        assert!(
            src.seek(img.len() as u64 + 1).is_err(),
            "beyond the end is refused"
        );
    }

    #[test]
    fn file_source_limit_stops_before_unwritten_bytes() {
        let (f, _) = sparse_file();
        let mut src = FileSource::open(f.path()).unwrap();
        src.set_limit(8 * B as u64);
        let mut buf = vec![0u8; 16 * B];
        let mut last = 0;
        while let Some(h) = src.next_record(&mut buf).unwrap() {
            assert_ne!(h.kind, RecordKind::End, "no End before the limit");
            last = h.end();
        }
        assert_eq!(last, 8 * B as u64);
    }

    #[test]
    fn stream_and_file_sources_give_the_same_digest() {
        let (f, img) = sparse_file();
        let key = DigestKey([1; 32]);
        let mut buf = vec![0u8; 8 * B];
        let mut file_src = FileSource::open(f.path()).unwrap();
        let d1 = digest_source(&mut file_src, ImageHasher::new(&key), &mut buf).unwrap();
        let mut stream_src = StreamSource::new(&img[..]);
        let (_, got) = drain(&mut StreamSource::new(&img[..]), 8 * B);
        assert!(got == img);
        let d2 = digest_source(&mut stream_src, ImageHasher::new(&key), &mut buf).unwrap();
        assert_eq!(d1, d2);
        assert!(stream_src.seek(0).is_err(), "a stream cannot go back");
    }

    #[test]
    fn command_source_streams_stdout_and_detects_zeros() {
        let spec = SourceSpec::Command("printf abc; head -c 300000 /dev/zero; printf xyz".into());
        let mut src = open_source(&spec).unwrap();
        let (recs, img) = drain(src.as_mut(), 2 * B);
        assert_eq!(img.len(), 300006);
        assert_eq!(&img[..3], b"abc");
        assert_eq!(&img[300003..], b"xyz");
        assert!(
            recs.iter()
                .any(|h| h.kind == RecordKind::Zero && h.len >= BLOCK),
            "{recs:?}"
        );
    }

    #[test]
    fn failing_command_source_never_ends_the_image() {
        let mut src = open_source(&SourceSpec::Command(
            "printf partial; echo boom >&2; exit 3".into(),
        ))
        .unwrap();
        let mut buf = vec![0u8; B];
        let first = src.next_record(&mut buf).unwrap().unwrap();
        assert_eq!(first.kind, RecordKind::Data);
        let err = src.next_record(&mut buf).unwrap_err().to_string();
        assert!(
            err.contains("exit status: 3") && err.contains("boom"),
            "{err}"
        );
    }

    #[test]
    fn tar_source_of_a_missing_directory_fails_clearly() {
        let err = open_source(&SourceSpec::Tar("/nonexistent/ka".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/ka"), "{err}");
    }

    #[test]
    fn stream_source_reassembles_short_reads() {
        // A reader returning 1000 bytes at a time: records must still be whole blocks.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(1000).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut img = vec![5u8; 3 * B + 7];
        img[B..2 * B].fill(0);
        let (recs, got) = drain(&mut StreamSource::new(Trickle(&img)), 4 * B);
        assert!(got == img);
        let kinds: Vec<_> = recs.iter().map(|h| (h.kind, h.len)).collect();
        assert_eq!(
            kinds,
            vec![
                (RecordKind::Data, BLOCK),
                (RecordKind::Zero, BLOCK),
                (RecordKind::Data, BLOCK + 7),
                (RecordKind::End, 0)
            ]
        );
    }
}
