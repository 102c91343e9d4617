//! Image sinks: consume records and make the image on a node.
//!
//! A sink is written strictly in order (a node's receiving thread feeds it
//! the stream as it arrives); a file or block device can be reopened and
//! resumed at an offset, and read back to verify the copy or to serve a
//! downstream node.
//!
//! Sinks are blocking, for the same reason as sources: one dedicated thread
//! drives a sink.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::image::blockdev::{self, BlockDeviceError};
use crate::image::process::Supervised;
use crate::image::sources::{FileSource, ImageSource};
use crate::image::BLOCK;
use crate::Error;

use super::ZEROS;

/// Where to write an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// A regular file (created if missing, sparse) or a block device (checked
    /// unused and large enough first).
    File(PathBuf),
    /// The standard input of `sh -c CMD`; zeros are written to it as bytes.
    Command(String),
    /// Extract with GNU tar into a directory (created if missing).
    Untar(PathBuf),
}

/// A consumer of image records, written in order.
pub trait ImageSink: Send {
    /// Writes image bytes at `offset`, which must be [`position`](Self::position).
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error>;

    /// Makes `len` bytes at `offset` (which must be
    /// [`position`](Self::position)) read as zero: skipped where the target is
    /// known to be a hole, punched or zeroed by the device otherwise; only
    /// pipes receive them as bytes.
    fn write_zero(&mut self, offset: u64, len: u64) -> Result<(), Error>;

    /// Continues writing at `offset`. Files and block devices accept any
    /// offset up to the image size (bytes before it are assumed already
    /// written); streams only their current position.
    fn resume(&mut self, offset: u64) -> Result<(), Error>;

    /// The offset the next write must start at.
    fn position(&self) -> u64;

    /// Ends the image at `size` (which must be the position): sets a regular
    /// file's length, flushes to stable storage (`fsync`), or closes a
    /// command's input and checks its exit status. Success means the image is
    /// durable.
    fn finish(&mut self, size: u64) -> Result<(), Error>;

    /// A source reading back what was written, stopping at the current
    /// position (see [`ImageSource::set_limit`]); [`Error::NotReadable`] for
    /// sinks that cannot be read back.
    fn readback(&self) -> Result<Box<dyn ImageSource>, Error>;

    /// A handle to read written bytes from by offset, for forwarding them to
    /// a downstream with `sendfile(2)` from the page cache; `None` (the
    /// default) for sinks whose bytes cannot be read back.
    fn forward_file(&self) -> Option<File> {
        None
    }
}

/// Opens a sink for an image of `expected_size` bytes (`None` when the source
/// cannot say, e.g. a command's output). Block devices are checked (size,
/// mounts, swap, holders, exclusive open) before anything is written.
pub fn open_sink(spec: &SinkSpec, expected_size: Option<u64>) -> Result<Box<dyn ImageSink>, Error> {
    Ok(match spec {
        SinkSpec::File(path) => Box::new(FileSink::open(path, expected_size)?),
        SinkSpec::Command(cmd) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            Box::new(CommandSink::spawn(c, cmd.clone())?)
        }
        SinkSpec::Untar(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let mut c = Command::new("tar");
            // -p and --same-owner restore modes and owners; --numeric-owner
            // keeps the source's uid/gid (the node's /etc/passwd is not the
            // image's); POSIX ACLs; all xattr namespaces
            // (security.capability for ping and friends, user.*, trusted.*).
            c.args([
                "-x",
                "-p",
                "--same-owner",
                "--numeric-owner",
                "--acls",
                "--xattrs",
                "--xattrs-include=*",
                "-f",
                "-",
            ])
            .arg("-C")
            .arg(dir);
            Box::new(CommandSink::spawn(
                c,
                format!("tar -x -C {}", dir.display()),
            )?)
        }
    })
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileSink {
    file: File,
    path: PathBuf,
    /// `Some(logical sector size)` for a block device.
    sector: Option<u64>,
    size: Option<u64>,
    pos: u64,
    /// Everything at or beyond this offset is known to be a hole (a regular
    /// file extended by us), so zero records there need no system call.
    clean_from: u64,
}

impl FileSink {
    /// Opens (creating if needed) a file, or checks and opens a block device,
    /// for an image of `size` bytes. A regular file is not truncated, so an
    /// interrupted copy can be resumed; its length is set to `size`.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self, Error> {
        let is_blockdev = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_blockdev {
            let info = blockdev::check_target(path, size.unwrap_or(0))?;
            // O_EXCL on a block device: the kernel refuses it while mounted or
            // claimed by dm/md, closing the race with our checks above.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_EXCL)
                .open(path)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        Error::BlockDevice(BlockDeviceError::Busy(path.to_owned()))
                    } else {
                        Error::io(format!("opening {}", path.display()), e)
                    }
                })?;
            return Ok(FileSink {
                file,
                path: path.to_owned(),
                sector: Some(info.logical_sector_size.into()),
                size,
                pos: 0,
                clean_from: u64::MAX,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::Invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        let mut clean_from = meta.len();
        if let Some(s) = size {
            file.set_len(s)
                .map_err(|e| Error::io(format!("setting the length of {}", path.display()), e))?;
            clean_from = clean_from.min(s);
        }
        Ok(FileSink {
            file,
            path: path.to_owned(),
            sector: None,
            size,
            pos: 0,
            clean_from,
        })
    }

    fn expect_at(&self, offset: u64) -> Result<(), Error> {
        if offset != self.pos {
            return Err(Error::OutOfOrder {
                expected: self.pos,
                got: offset,
            });
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, end: u64) -> Result<(), Error> {
        while offset < end {
            let n = (end - offset).min(BLOCK) as usize;
            self.file
                .write_all_at(&ZEROS[..n], offset)
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Zeroes [offset, end) without sending zero bytes where the kernel can
    /// avoid it: punch a hole (files; unmap on devices that guarantee zeros),
    /// else `BLKZEROOUT` (devices), else write zeros.
    fn zero_range(&self, offset: u64, end: u64) -> Result<(), Error> {
        let align = self.sector.unwrap_or(1);
        let (a, b) = (offset.div_ceil(align) * align, end - end % align);
        if a >= b {
            return self.write_zero_bytes(offset, end);
        }
        self.write_zero_bytes(offset, a)?;
        self.write_zero_bytes(b, end)?;
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), punch, a as i64, (b - a) as i64) {
            Ok(()) => return Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENODEV) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("punching a hole in {}", self.path.display()),
                    e.into(),
                ))
            }
        }
        if self.sector.is_some() && blockdev::zero_out(&self.file, a, b - a).is_ok() {
            return Ok(());
        }
        self.write_zero_bytes(a, b)
    }
}

impl ImageSink for FileSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.expect_at(offset)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {} at {offset}", self.path.display()), e))?;
        self.pos += data.len() as u64;
        self.clean_from = self.clean_from.max(self.pos);
        Ok(())
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.expect_at(offset)?;
        let end = offset + len;
        if offset < self.clean_from {
            self.zero_range(offset, end.min(self.clean_from))?;
        }
        self.pos = end;
        Ok(())
    }

    fn resume(&mut self, offset: u64) -> Result<(), Error> {
        if self.size.is_some_and(|s| offset > s) {
            return Err(Error::Invalid(format!(
                "cannot resume at {offset}: beyond the image"
            )));
        }
        self.pos = offset;
        Ok(())
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn finish(&mut self, size: u64) -> Result<(), Error> {
        self.expect_at(size)?;
        if self.sector.is_none() {
            self.file.set_len(size).map_err(|e| {
                Error::io(format!("setting the length of {}", self.path.display()), e)
            })?;
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("fsync {}", self.path.display()), e))?;
        self.size = Some(size);
        Ok(())
    }

    fn forward_file(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    fn readback(&self) -> Result<Box<dyn ImageSource>, Error> {
        let size = self.size.unwrap_or(self.pos);
        let mut src = FileSource::open_sized(&self.path, Some(size))?;
        src.set_limit(self.pos);
        Ok(Box::new(src))
    }
}

/// The standard input of a child process (a shell command, or tar -x). The
/// image is complete only when the child exits successfully.
#[derive(Debug)]
pub struct CommandSink {
    stdin: Option<ChildStdin>,
    child: Supervised,
    label: String,
    pos: u64,
}

impl CommandSink {
    /// Spawns `command` with its standard input fed by the image (standard
    /// output discarded: a node has no terminal); `label` names it in errors.
    pub fn spawn(mut command: Command, label: String) -> Result<Self, Error> {
        command.stdin(Stdio::piped()).stdout(Stdio::null());
        let mut child = Supervised::spawn(command, label.clone())?;
        let stdin = child.child_mut().stdin.take();
        if let Some(pipe) = &stdin {
            crate::image::process::widen_pipe(pipe);
        }
        Ok(CommandSink {
            stdin,
            child,
            label,
            pos: 0,
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Invalid(format!("`{}` already finished", self.label)))?;
        match stdin.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                // The child exited early: its exit status and stderr say why.
                self.stdin = None;
                self.child.wait_success()?;
                Err(Error::Command {
                    command: self.label.clone(),
                    status: "exited successfully before reading the whole image".into(),
                    stderr: String::new(),
                })
            }
            Err(e) => Err(Error::io(format!("writing to `{}`", self.label), e)),
        }
    }

    fn expect_at(&self, offset: u64) -> Result<(), Error> {
        if offset != self.pos {
            return Err(Error::OutOfOrder {
                expected: self.pos,
                got: offset,
            });
        }
        Ok(())
    }
}

impl ImageSink for CommandSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.expect_at(offset)?;
        self.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.expect_at(offset)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(BLOCK) as usize;
            self.write_all(&ZEROS[..n])?;
            left -= n as u64;
        }
        self.pos += len;
        Ok(())
    }

    fn resume(&mut self, offset: u64) -> Result<(), Error> {
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

    fn finish(&mut self, size: u64) -> Result<(), Error> {
        self.expect_at(size)?;
        // Closing stdin is the child's end of input.
        self.stdin = None;
        self.child.wait_success()
    }

    fn readback(&self) -> Result<Box<dyn ImageSource>, Error> {
        Err(Error::NotReadable(self.label.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::blockdev::tests::LoopDev;
    use crate::image::digest::{digest_source, DigestKey, ImageHasher};
    use crate::image::sources::open_source;
    use crate::image::sources::SourceSpec;
    use ka_core::record::RecordKind;
    use std::os::unix::fs::MetadataExt;

    const B: usize = BLOCK as usize;
    const KEY: DigestKey = DigestKey([3; 32]);

    /// Copies a whole source into a sink, record by record.
    fn copy(src: &mut dyn ImageSource, sink: &mut dyn ImageSink) -> u64 {
        let mut buf = vec![0u8; 4 * B];
        while let Some(h) = src.next_record(&mut buf).unwrap() {
            match h.kind {
                RecordKind::Data => sink.write_data(h.offset, &buf[..h.len as usize]).unwrap(),
                RecordKind::Zero => sink.write_zero(h.offset, h.len).unwrap(),
                RecordKind::End => {
                    sink.finish(h.offset).unwrap();
                    return h.offset;
                }
            }
        }
        panic!("source without End");
    }

    fn digest(src: &mut dyn ImageSource) -> ka_core::codec::Digest {
        digest_source(src, ImageHasher::new(&KEY), &mut vec![0u8; 4 * B]).unwrap()
    }

    /// 64 MiB image: mostly hole, some data, an explicit zero block, odd tail.
    fn image_file() -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut img = vec![0u8; 1024 * B + 513];
        for (i, x) in img[10 * B..20 * B].iter_mut().enumerate() {
            *x = (i * 7 % 253) as u8 + 1;
        }
        img[500 * B + 1] = 1;
        img[1024 * B + 512] = 9;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(img.len() as u64).unwrap();
        f.as_file()
            .write_all_at(&img[10 * B..21 * B], 10 * B as u64)
            .unwrap();
        f.as_file()
            .write_all_at(&img[500 * B..501 * B], 500 * B as u64)
            .unwrap();
        f.as_file()
            .write_all_at(&img[1024 * B..], 1024 * B as u64)
            .unwrap();
        (f, img)
    }

    #[test]
    fn file_to_file_is_sparse_exact_and_verifies() {
        let (src_file, img) = image_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        let mut src = open_source(&SourceSpec::File(src_file.path().into())).unwrap();
        let mut sink = open_sink(&SinkSpec::File(out.clone()), src.size()).unwrap();
        let size = copy(src.as_mut(), sink.as_mut());
        assert_eq!(size, img.len() as u64);
        let written = std::fs::read(&out).unwrap();
        assert!(written == img, "content differs");
        // Only the data blocks take space: 10 + 1 + 1 blocks, not 64 MiB.
        let used = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            used <= 13 * BLOCK,
            "zeros were written as bytes: {used} bytes allocated"
        );
        let mut src = open_source(&SourceSpec::File(src_file.path().into())).unwrap();
        assert_eq!(
            digest(sink.readback().unwrap().as_mut()),
            digest(src.as_mut())
        );
    }

    #[test]
    fn readback_catches_corruption_in_data_and_in_zero_regions() {
        let (src_file, img) = image_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        let mut src = FileSource::open(src_file.path()).unwrap();
        let mut sink = FileSink::open(&out, Some(img.len() as u64)).unwrap();
        copy(&mut src, &mut sink);
        let want = digest(&mut FileSource::open(src_file.path()).unwrap());
        assert_eq!(digest(sink.readback().unwrap().as_mut()), want);
        let f = OpenOptions::new().write(true).open(&out).unwrap();
        // A flipped byte in data, then a stray byte in a hole.
        for (at, byte) in [(15 * B as u64, 0u8), (700 * B as u64 + 3, 1u8)] {
            let mut old = [0u8];
            File::open(&out)
                .unwrap()
                .read_exact_at(&mut old, at)
                .unwrap();
            f.write_all_at(&[byte ^ old[0] ^ 0x5a], at).unwrap();
            assert_ne!(digest(sink.readback().unwrap().as_mut()), want);
            f.write_all_at(&old, at).unwrap();
        }
        assert_eq!(digest(sink.readback().unwrap().as_mut()), want);
    }

    #[test]
    fn zero_records_punch_old_data_when_overwriting() {
        let (src_file, img) = image_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("old.img");
        std::fs::write(&out, vec![0xeeu8; 2 * img.len()]).unwrap();
        let mut src = FileSource::open(src_file.path()).unwrap();
        let mut sink = FileSink::open(&out, Some(img.len() as u64)).unwrap();
        copy(&mut src, &mut sink);
        assert!(
            std::fs::read(&out).unwrap() == img,
            "old bytes survived in a zero region"
        );
    }

    #[test]
    fn file_sink_resumes_after_reopen() {
        let (src_file, img) = image_file();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("resumed.img");
        let mut src = FileSource::open(src_file.path()).unwrap();
        let mut buf = vec![0u8; 4 * B];
        {
            let mut sink = FileSink::open(&out, Some(img.len() as u64)).unwrap();
            // Write up to block 15, then "crash" (drop without finish).
            while sink.position() < 15 * BLOCK {
                let h = src.next_record(&mut buf).unwrap().unwrap();
                match h.kind {
                    RecordKind::Data => sink.write_data(h.offset, &buf[..h.len as usize]).unwrap(),
                    RecordKind::Zero => sink.write_zero(h.offset, h.len).unwrap(),
                    RecordKind::End => unreachable!(),
                }
            }
            // A half-written record beyond the resume point: must be overwritten.
            sink.file.write_all_at(&[0x55; 100], 16 * BLOCK).unwrap();
        }
        let resume_at = 12 * BLOCK;
        let mut sink = FileSink::open(&out, Some(img.len() as u64)).unwrap();
        sink.resume(resume_at).unwrap();
        src.seek(resume_at).unwrap();
        copy(&mut src, &mut sink);
        assert!(std::fs::read(&out).unwrap() == img);
    }

    #[test]
    fn block_device_sink_zeroes_old_data_and_verifies() {
        let (src_file, img) = image_file();
        let dev = LoopDev::new(80 << 20);
        // Old content everywhere on the device.
        std::fs::write(&dev.path, vec![0xabu8; 80 << 20]).unwrap();
        let mut src = open_source(&SourceSpec::File(src_file.path().into())).unwrap();
        let mut sink = open_sink(&SinkSpec::File(dev.path.clone()), src.size()).unwrap();
        copy(src.as_mut(), sink.as_mut());
        let mut on_disk = vec![0u8; img.len()];
        File::open(&dev.path)
            .unwrap()
            .read_exact_at(&mut on_disk, 0)
            .unwrap();
        assert!(on_disk == img, "device content differs from the image");
        let mut src = open_source(&SourceSpec::File(src_file.path().into())).unwrap();
        assert_eq!(
            digest(sink.readback().unwrap().as_mut()),
            digest(src.as_mut())
        );
        // While the sink holds the device (O_EXCL), a second sink is refused.
        let err = open_sink(&SinkSpec::File(dev.path.clone()), Some(img.len() as u64))
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::BlockDevice(BlockDeviceError::Busy(_))),
            "{err}"
        );
        drop(sink);
        open_sink(&SinkSpec::File(dev.path.clone()), Some(img.len() as u64)).unwrap();
    }

    #[test]
    fn block_device_smaller_than_image_is_refused_before_writing() {
        let dev = LoopDev::new(4 << 20);
        std::fs::write(&dev.path, vec![0x11u8; 4 << 20]).unwrap();
        let err = open_sink(&SinkSpec::File(dev.path.clone()), Some(5 << 20))
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::BlockDevice(BlockDeviceError::TooSmall { .. })),
            "{err}"
        );
        let mut first = [0u8; 16];
        File::open(&dev.path)
            .unwrap()
            .read_exact_at(&mut first, 0)
            .unwrap();
        assert_eq!(
            first, [0x11; 16],
            "nothing may be written to a refused device"
        );
    }

    #[test]
    fn command_sink_gets_zeros_as_bytes_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cmd.out");
        let mut sink =
            open_sink(&SinkSpec::Command(format!("cat > {}", out.display())), None).unwrap();
        sink.write_data(0, b"hello").unwrap();
        sink.write_zero(5, 100_000).unwrap();
        sink.write_data(100_005, b"!").unwrap();
        assert!(matches!(sink.resume(3), Err(Error::NotSeekable { .. })));
        assert!(matches!(sink.readback(), Err(Error::NotReadable(_))));
        sink.finish(100_006).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 100_006);
        assert!(got.starts_with(b"hello") && got.ends_with(b"!") && is_zero_run(&got[5..100_005]));

        let mut bad = open_sink(
            &SinkSpec::Command("cat >/dev/null; echo nope >&2; exit 4".into()),
            None,
        )
        .unwrap();
        bad.write_data(0, b"x").unwrap();
        let err = bad.finish(1).unwrap_err().to_string();
        assert!(
            err.contains("exit status: 4") && err.contains("nope"),
            "{err}"
        );
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        use std::ffi::CString;
        let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated strings and a value slice with its length.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr: {}", io::Error::last_os_error());
    }

    fn get_xattr(path: &Path, name: &str) -> Vec<u8> {
        use std::ffi::CString;
        let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid NUL-terminated strings and a buffer with its length.
        let r =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(r >= 0, "getxattr {name}: {}", io::Error::last_os_error());
        buf.truncate(r as usize);
        buf
    }

    fn is_zero_run(b: &[u8]) -> bool {
        b.iter().all(|&x| x == 0)
    }

    #[test]
    fn command_sink_that_exits_early_is_an_error() {
        let mut sink = open_sink(&SinkSpec::Command("exit 0".into()), None).unwrap();
        let mut res = Ok(());
        // Keep writing until the pipe breaks (the child is gone).
        for i in 0..1000u64 {
            res = sink.write_data(i * BLOCK, &[1u8; B]);
            if res.is_err() {
                break;
            }
        }
        assert!(res.is_err(), "writing to an exited command must fail");
    }

    #[test]
    fn tar_round_trip_keeps_modes_owners_links_and_sparse_files() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let src = tempfile::tempdir().unwrap();
        let p = src.path();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::fs::write(p.join("sub/a.txt"), b"alpha").unwrap();
        // chown first: it clears the setuid bit.
        std::os::unix::fs::chown(p.join("sub/a.txt"), Some(1234), Some(4321)).unwrap();
        std::fs::set_permissions(p.join("sub/a.txt"), std::fs::Permissions::from_mode(0o4751))
            .unwrap();
        std::fs::hard_link(p.join("sub/a.txt"), p.join("hard")).unwrap();
        symlink("sub/a.txt", p.join("soft")).unwrap();
        let acl = Command::new("setfacl")
            .args(["-m", "u:4242:r"])
            .arg(p.join("sub/a.txt"))
            .status()
            .expect("setfacl (package acl)");
        assert!(acl.success(), "setfacl failed");
        set_xattr(&p.join("sub/a.txt"), "user.ka-test", b"kept");
        let sparse = File::create(p.join("sparse")).unwrap();
        sparse.set_len(100 << 20).unwrap();
        sparse.write_all_at(b"end", (100 << 20) - 3).unwrap();
        drop(sparse);

        let mut source = open_source(&SourceSpec::Tar(p.to_owned())).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let out = dst.path().join("tree");
        let mut sink = open_sink(&SinkSpec::Untar(out.clone()), None).unwrap();
        copy(source.as_mut(), sink.as_mut());

        let a = std::fs::metadata(out.join("sub/a.txt")).unwrap();
        assert_eq!(a.mode() & 0o7777, 0o4751);
        assert_eq!((a.uid(), a.gid()), (1234, 4321));
        assert_eq!(std::fs::read(out.join("hard")).unwrap(), b"alpha");
        assert_eq!(
            std::fs::metadata(out.join("hard")).unwrap().ino(),
            a.ino(),
            "hard link kept"
        );
        assert_eq!(
            std::fs::read_link(out.join("soft")).unwrap(),
            Path::new("sub/a.txt")
        );
        let facl = Command::new("getfacl")
            .arg("-cn")
            .arg(out.join("sub/a.txt"))
            .output()
            .expect("getfacl");
        let facl = String::from_utf8_lossy(&facl.stdout).into_owned();
        assert!(facl.contains("user:4242:r--"), "ACL lost: {facl}");
        assert_eq!(
            get_xattr(&out.join("sub/a.txt"), "user.ka-test"),
            b"kept",
            "xattr lost"
        );
        let s = std::fs::metadata(out.join("sparse")).unwrap();
        assert_eq!(s.len(), 100 << 20);
        assert!(
            s.blocks() * 512 < 1 << 20,
            "sparse file was inflated: {} bytes",
            s.blocks() * 512
        );
        let mut tail = [0u8; 3];
        File::open(out.join("sparse"))
            .unwrap()
            .read_exact_at(&mut tail, (100 << 20) - 3)
            .unwrap();
        assert_eq!(&tail, b"end");
    }
}
