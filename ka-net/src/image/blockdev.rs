//! Block devices as clone targets and sources: size and sector size by ioctl,
//! and the checks that refuse a device in use *before* a byte is written.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{major, minor};

use crate::image::mounts::{self, Mount};

/// The block-device ioctls of `<linux/fs.h>`.
mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}
use ioctl::{blkgetsize64, blksszget, blkzeroout};

pub use crate::error::BlockDeviceError;

/// What the kernel says about a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    /// The path it was opened by.
    pub path: PathBuf,
    /// Major device number.
    pub major: u64,
    /// Minor device number.
    pub minor: u64,
    /// Size in bytes (`BLKGETSIZE64`).
    pub size: u64,
    /// Logical sector size in bytes (`BLKSSZGET`): the alignment the device
    /// needs for zeroing ranges.
    pub logical_sector_size: u32,
}

/// Size in bytes of the open block device `file` (`BLKGETSIZE64`).
pub fn size_of(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is valid.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Logical sector size of the open block device `file` (`BLKSSZGET`).
pub fn logical_sector_size(file: &File) -> io::Result<u32> {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which is valid.
    unsafe { blksszget(file.as_raw_fd(), &mut ssz) }?;
    Ok(ssz as u32)
}

/// Zeroes `len` bytes at `offset` on the open block device (`BLKZEROOUT`: the
/// device unmaps or writes zeros itself; no zero bytes cross from user space).
/// Both must be multiples of the logical sector size.
pub fn zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 from the pointer, which is valid.
    unsafe { blkzeroout(file.as_raw_fd(), &range) }?;
    Ok(())
}

/// Reads size, sector size and device number of the block device at `path`.
pub fn inspect(path: &Path) -> Result<BlockDeviceInfo, BlockDeviceError> {
    let io_err = |what, source| BlockDeviceError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| io_err("opening", e))?;
    let meta = file.metadata().map_err(|e| io_err("stat", e))?;
    if !meta.file_type().is_block_device() {
        return Err(BlockDeviceError::NotABlockDevice(path.to_owned()));
    }
    Ok(BlockDeviceInfo {
        path: path.to_owned(),
        major: major(meta.rdev()),
        minor: minor(meta.rdev()),
        size: size_of(&file).map_err(|e| io_err("BLKGETSIZE64 on", e))?,
        logical_sector_size: logical_sector_size(&file).map_err(|e| io_err("BLKSSZGET on", e))?,
    })
}

/// Checks that the block device at `path` can take an image of `image_size`
/// bytes: large enough, not mounted, not swap, not held by dm/md (the device
/// and every partition on it). Call before opening it for writing.
pub fn check_target(path: &Path, image_size: u64) -> Result<BlockDeviceInfo, BlockDeviceError> {
    let info = inspect(path)?;
    if info.size < image_size {
        return Err(BlockDeviceError::TooSmall {
            path: path.to_owned(),
            size: info.size,
            needed: image_size,
        });
    }
    check_unused(&info)?;
    Ok(info)
}

/// One kernel block device: the target or one of its partitions.
struct Part {
    name: String,
    dev: (u64, u64),
    sysfs: PathBuf,
}

/// The device and its partitions, from sysfs.
fn device_and_partitions(info: &BlockDeviceInfo) -> Result<Vec<Part>, BlockDeviceError> {
    let io_err = |source| BlockDeviceError::Io {
        what: "reading sysfs for",
        path: info.path.clone(),
        source,
    };
    let sysfs = fs::canonicalize(format!("/sys/dev/block/{}:{}", info.major, info.minor))
        .map_err(io_err)?;
    let name = sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = vec![Part {
        name,
        dev: (info.major, info.minor),
        sysfs: sysfs.clone(),
    }];
    for entry in fs::read_dir(&sysfs).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let p = entry.path();
        if !p.join("partition").exists() {
            continue;
        }
        let Ok(dev) = fs::read_to_string(p.join("dev")) else {
            continue;
        };
        if let Some(dev) = parse_dev(dev.trim()) {
            parts.push(Part {
                name: entry.file_name().to_string_lossy().into_owned(),
                dev,
                sysfs: p,
            });
        }
    }
    Ok(parts)
}

fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The device number of a device node path, if it is one.
fn rdev_of(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| (major(meta.rdev()), minor(meta.rdev())))
}

/// The part a mount's file system sits on: by device number, or by mount
/// source for file systems such as btrfs that report an anonymous one.
fn mounted_part<'a>(
    mount: &Mount,
    find: &impl Fn((u64, u64)) -> Option<&'a Part>,
) -> Option<&'a Part> {
    let by_source = || {
        // Only an absolute source names a device node; `tmpfs` or
        // `server:/export` must not be looked up in the working directory.
        Some(Path::new(&mount.source))
            .filter(|s| s.is_absolute())
            .and_then(rdev_of)
            .and_then(find)
    };
    find(mount.dev).or_else(by_source)
}

/// Refuses the device if it or a partition is mounted (by device number, or
/// by mount source for file systems such as btrfs that report an anonymous
/// device number), active swap, or held by another block device.
pub fn check_unused(info: &BlockDeviceInfo) -> Result<(), BlockDeviceError> {
    let parts = device_and_partitions(info)?;
    let find = |dev: (u64, u64)| parts.iter().find(|p| p.dev == dev);

    let mounts = mounts::read_mounts().map_err(|source| BlockDeviceError::Io {
        what: "reading /proc/self/mountinfo to check",
        path: info.path.clone(),
        source,
    })?;
    for mount in &mounts {
        if let Some(p) = mounted_part(mount, &find) {
            return Err(BlockDeviceError::Mounted {
                path: info.path.clone(),
                part: p.name.clone(),
                mountpoint: mount.mount_point.display().to_string(),
            });
        }
    }

    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if let Some(p) = rdev_of(&mounts::unescape_path(name)).and_then(find) {
                return Err(BlockDeviceError::Swap {
                    path: info.path.clone(),
                    part: p.name.clone(),
                });
            }
        }
    }

    for p in &parts {
        let Ok(holders) = fs::read_dir(p.sysfs.join("holders")) else {
            continue;
        };
        if let Some(h) = holders.flatten().next() {
            return Err(BlockDeviceError::Held {
                path: info.path.clone(),
                part: p.name.clone(),
                holder: h.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    Ok(())
}

/// Refuses the device if a file system on it is mounted read-write: on the
/// device itself, on one of its partitions, or on a device built on them
/// (LVM, dm-crypt, RAID), found through sysfs `holders`. Its bytes change
/// while they are read, so a copy would be inconsistent; a read-only mount
/// (or none) is fine.
pub fn check_not_mounted_rw(info: &BlockDeviceInfo) -> Result<(), BlockDeviceError> {
    let mut parts = device_and_partitions(info)?;
    add_holders(&mut parts);
    let find = |dev: (u64, u64)| parts.iter().find(|p| p.dev == dev);
    let mounts = mounts::read_mounts().map_err(|source| BlockDeviceError::Io {
        what: "reading /proc/self/mountinfo to check",
        path: info.path.clone(),
        source,
    })?;
    for mount in mounts.iter().filter(|m| m.is_read_write()) {
        if let Some(p) = mounted_part(mount, &find) {
            return Err(BlockDeviceError::MountedReadWrite {
                path: info.path.clone(),
                part: p.name.clone(),
                mountpoint: mount.mount_point.display().to_string(),
            });
        }
    }
    Ok(())
}

/// Adds to `parts` every device built on them, and on those in turn.
fn add_holders(parts: &mut Vec<Part>) {
    let mut i = 0;
    while i < parts.len() {
        let holders = fs::read_dir(parts[i].sysfs.join("holders"))
            .into_iter()
            .flatten();
        for h in holders.flatten() {
            let Ok(sysfs) = fs::canonicalize(h.path()) else {
                continue;
            };
            let dev = fs::read_to_string(sysfs.join("dev"))
                .ok()
                .and_then(|d| parse_dev(d.trim()));
            // A device held twice (RAID over two partitions) is listed once,
            // and a cycle, which sysfs never shows, could not loop.
            if let Some(dev) = dev.filter(|&d| parts.iter().all(|p| p.dev != d)) {
                parts.push(Part {
                    name: h.file_name().to_string_lossy().into_owned(),
                    dev,
                    sysfs,
                });
            }
        }
        i += 1;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// A loop device over a temporary file, detached (by its name) on drop.
    pub(crate) struct LoopDev {
        pub(crate) path: PathBuf,
        pub(crate) _backing: tempfile::NamedTempFile,
    }

    impl LoopDev {
        /// Creates a `size`-byte loop device, or panics saying why it cannot:
        /// these tests need root and loop support, and must not pass silently
        /// without them.
        pub(crate) fn new(size: u64) -> LoopDev {
            Self::attach(size, &[], &std::env::temp_dir())
        }

        /// As [`new`](Self::new), with partition scanning (`losetup -P`):
        /// the kernel makes `loopNpM` devices for a partition table on it.
        pub(crate) fn partitioned(size: u64) -> LoopDev {
            Self::attach(size, &["-P"], &std::env::temp_dir())
        }

        /// As [`new`](Self::new), with its file in `dir`.
        pub(crate) fn new_in(size: u64, dir: &Path) -> LoopDev {
            Self::attach(size, &[], dir)
        }

        fn attach(size: u64, flags: &[&str], dir: &Path) -> LoopDev {
            let backing =
                tempfile::NamedTempFile::new_in(dir).expect("temp file for a loop device");
            backing.as_file().set_len(size).unwrap();
            let out = Command::new("losetup")
                .args(flags)
                .args(["-f", "--show"])
                .arg(backing.path())
                .output()
                .expect("running losetup (package mount): block-device tests need it");
            assert!(
                out.status.success(),
                "cannot create a loop device (these tests need root and /dev/loop-control): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
            LoopDev {
                path,
                _backing: backing,
            }
        }
    }

    impl Drop for LoopDev {
        fn drop(&mut self) {
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(&self.path)
                .status()
                .map(|s| s.success());
            if !matches!(ok, Ok(true)) && !std::thread::panicking() {
                panic!("could not detach {}", self.path.display());
            }
        }
    }

    #[test]
    fn loop_device_size_and_sector_size_by_ioctl() {
        let dev = LoopDev::new(8 << 20);
        let info = inspect(&dev.path).unwrap();
        assert_eq!(info.size, 8 << 20);
        assert_eq!(info.logical_sector_size, 512);
        assert_eq!(info.major, 7, "loop devices have major 7");
        check_target(&dev.path, 8 << 20).unwrap();
    }

    #[test]
    fn too_small_device_is_refused() {
        let dev = LoopDev::new(4 << 20);
        let err = check_target(&dev.path, (4 << 20) + 1).unwrap_err();
        assert!(
            matches!(err, BlockDeviceError::TooSmall { size, .. } if size == 4 << 20),
            "{err}"
        );
    }

    #[test]
    fn regular_file_is_not_a_block_device() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            inspect(f.path()),
            Err(BlockDeviceError::NotABlockDevice(_))
        ));
    }

    #[test]
    fn mounted_partition_is_refused_naming_the_mountpoint() {
        let dev = LoopDev::new(16 << 20);
        // Partition it, make a file system on the partition, mount it.
        let sfdisk = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 'start=2048, size=20480, type=83' | sfdisk -q --no-reread {}",
                dev.path.display()
            ))
            .status()
            .expect("sfdisk");
        assert!(sfdisk.success(), "sfdisk failed");
        let part = PathBuf::from(format!("{}p1", dev.path.display()));
        let mut waited = 0;
        while !part.exists() {
            // The loop device was attached without partition scanning, so
            // partx tells the kernel about the partition (BLKPG).
            let _ = Command::new("partx").args(["-a"]).arg(&dev.path).status();
            std::thread::sleep(std::time::Duration::from_millis(50));
            waited += 1;
            assert!(waited < 100, "partition {} never appeared", part.display());
        }
        let mkfs = Command::new("mkfs.ext2")
            .args(["-q", "-F"])
            .arg(&part)
            .status()
            .expect("mkfs.ext2");
        assert!(mkfs.success());
        let mnt = tempfile::tempdir().unwrap();
        let mount = Command::new("mount")
            .arg(&part)
            .arg(mnt.path())
            .status()
            .expect("mount");
        assert!(mount.success(), "mount failed");
        let res = check_target(&dev.path, 1 << 20);
        let umount = Command::new("umount")
            .arg(mnt.path())
            .status()
            .expect("umount");
        assert!(umount.success(), "umount failed");
        let err = res.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, BlockDeviceError::Mounted { .. }), "{msg}");
        assert!(
            msg.contains("p1") && msg.contains(&mnt.path().display().to_string()),
            "{msg}"
        );
        // Unmounted again: accepted.
        check_target(&dev.path, 1 << 20).unwrap();
    }

    #[test]
    fn read_write_mount_is_refused_for_serving_read_only_is_not() {
        let dev = LoopDev::new(16 << 20);
        let mkfs = Command::new("mkfs.ext2")
            .args(["-q", "-F"])
            .arg(&dev.path)
            .status()
            .expect("mkfs.ext2");
        assert!(mkfs.success());
        let info = inspect(&dev.path).unwrap();
        check_not_mounted_rw(&info).unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let mount = |opts: &str| {
            let ok = Command::new("mount")
                .args(["-o", opts])
                .arg(&dev.path)
                .arg(mnt.path())
                .status()
                .expect("mount");
            assert!(ok.success(), "mount -o {opts} failed");
        };
        mount("rw");
        let rw = check_not_mounted_rw(&info);
        let remount = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(mnt.path())
            .status()
            .expect("mount -o remount");
        let ro = check_not_mounted_rw(&info);
        let umount = Command::new("umount")
            .arg(mnt.path())
            .status()
            .expect("umount");
        assert!(umount.success(), "umount failed");
        assert!(remount.success(), "remount,ro failed");
        let err = rw.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BlockDeviceError::MountedReadWrite { .. }),
            "{msg}"
        );
        assert!(msg.contains(&mnt.path().display().to_string()), "{msg}");
        assert!(msg.contains("--system") && msg.contains("--force"), "{msg}");
        ro.unwrap();
        // What the image source's check says of a file and of the device.
        crate::image::sources::check_not_mounted_rw(&dev.path).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        crate::image::sources::check_not_mounted_rw(file.path()).unwrap();
    }

    #[test]
    fn active_swap_is_refused() {
        let dev = LoopDev::new(16 << 20);
        let mkswap = Command::new("mkswap")
            .arg("-q")
            .arg(&dev.path)
            .status()
            .expect("mkswap");
        assert!(mkswap.success(), "mkswap failed");
        let on = Command::new("swapon")
            .arg(&dev.path)
            .status()
            .expect("swapon");
        assert!(on.success(), "swapon failed");
        let res = check_target(&dev.path, 1 << 20);
        let off = Command::new("swapoff")
            .arg(&dev.path)
            .status()
            .expect("swapoff");
        assert!(
            off.success(),
            "swapoff failed: {} stays in use",
            dev.path.display()
        );
        let err = res.unwrap_err();
        assert!(matches!(err, BlockDeviceError::Swap { .. }), "{err}");
        assert!(err.to_string().contains("swapoff"), "{err}");
        check_target(&dev.path, 1 << 20).unwrap();
    }
}
