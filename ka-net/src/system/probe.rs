//! What the kernel and the disk tools say about block devices: sysfs for
//! what a device is (a partition of which disk, a device-mapper or RAID
//! device), `sfdisk --json` for partition tables, `blkid -p` for what a
//! partition holds, `dumpe2fs` and `xfs_info` for how a file system was made.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{major, minor};
use serde::Deserialize;

use super::layout::{FsKind, MakeOptions};
use crate::image::process::run_captured;
use crate::Error;

/// A device number, `(major, minor)`.
pub(crate) type DevNum = (u64, u64);

/// A kernel block device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SysBlock {
    /// Kernel name (`sda2`, `loop0p3`, `dm-0`).
    pub name: String,
    /// Device number.
    pub dev: DevNum,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
}

impl SysBlock {
    /// Its device node, by the kernel name.
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

/// What a block device is, as far as cloning it file by file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// A partition of a plain disk: what ka rebuilds.
    Partition {
        /// Its number in the table.
        number: u32,
        /// The disk.
        disk: SysBlock,
    },
    /// A device-mapper device; `what` says which kind (LVM, dm-crypt).
    DeviceMapper { what: String },
    /// An md RAID array, or a partition of one.
    Raid,
    /// A loop device used whole: a view of an image file.
    Loop {
        /// The file it shows, as the kernel names it.
        backing: Option<PathBuf>,
    },
    /// A RAM disk (`zram`, `brd`): nothing of it outlives a reboot.
    Ram,
    /// A disk (or a partition of something that is not a plain disk) used
    /// whole, without a partition table ka can rebuild.
    WholeDisk,
}

/// The block device with number `dev`, if the kernel has one (file systems
/// that are not on a block device report an anonymous number sysfs lacks).
pub(crate) fn block_of(dev: DevNum) -> Option<SysBlock> {
    if dev.0 == 0 {
        return None;
    }
    let sysfs = fs::canonicalize(format!("/sys/dev/block/{}:{}", dev.0, dev.1)).ok()?;
    let name = sysfs.file_name()?.to_string_lossy().into_owned();
    Some(SysBlock { name, dev, sysfs })
}

/// The device number of `path` if it is a block device node.
pub(crate) fn rdev_of(path: &Path) -> Option<DevNum> {
    let meta = fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| (major(meta.rdev()), minor(meta.rdev())))
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// What `block` is: a partition of a plain disk, or something ka cannot
/// rebuild (and which).
pub(crate) fn kind_of(block: &SysBlock) -> BlockKind {
    if let Some(what) = mapper_kind(&block.sysfs) {
        return BlockKind::DeviceMapper { what };
    }
    if block.sysfs.join("md").exists() {
        return BlockKind::Raid;
    }
    let number = read_trimmed(block.sysfs.join("partition")).and_then(|n| n.parse().ok());
    let (Some(number), Some(parent)) = (number, block.sysfs.parent()) else {
        if block.sysfs.join("loop").exists() {
            return BlockKind::Loop {
                backing: read_trimmed(block.sysfs.join("loop/backing_file")).map(PathBuf::from),
            };
        }
        // zram has its compressor; brd's RAM disks are major 1.
        if block.sysfs.join("comp_algorithm").exists() || block.dev.0 == 1 {
            return BlockKind::Ram;
        }
        return BlockKind::WholeDisk;
    };
    if parent.join("md").exists() {
        return BlockKind::Raid;
    }
    if let Some(what) = mapper_kind(parent) {
        return BlockKind::DeviceMapper { what };
    }
    let dev = read_trimmed(parent.join("dev")).and_then(|d| {
        let (a, b) = d.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    match (dev, parent.file_name()) {
        (Some(dev), Some(name)) => BlockKind::Partition {
            number,
            disk: SysBlock {
                name: name.to_string_lossy().into_owned(),
                dev,
                sysfs: parent.to_owned(),
            },
        },
        _ => BlockKind::WholeDisk,
    }
}

/// For a device-mapper device, what it is: its UUID's prefix names the
/// subsystem that made it.
fn mapper_kind(sysfs: &Path) -> Option<String> {
    let dm = sysfs.join("dm");
    if !dm.exists() {
        return None;
    }
    let name = read_trimmed(dm.join("name")).unwrap_or_default();
    let uuid = read_trimmed(dm.join("uuid")).unwrap_or_default();
    let what = if uuid.starts_with("LVM-") {
        "an LVM logical volume"
    } else if uuid.starts_with("CRYPT-") {
        "a dm-crypt (LUKS) device"
    } else if uuid.starts_with("mpath-") {
        "a multipath device"
    } else {
        "a device-mapper device"
    };
    Some(if name.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({name})")
    })
}

/// The devices a device-mapper or RAID device is built on (sysfs `slaves`),
/// by kernel name, for messages.
pub(crate) fn built_on(block: &SysBlock) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(block.sysfs.join("slaves"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    names
}

/// The partitions the kernel knows on `disk`, by number.
pub(crate) fn kernel_partitions(disk: &SysBlock) -> BTreeMap<u32, KernelPartition> {
    let mut parts = BTreeMap::new();
    for entry in fs::read_dir(&disk.sysfs).into_iter().flatten().flatten() {
        let dir = entry.path();
        let Some(number) = read_trimmed(dir.join("partition")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let num = |file: &str| read_trimmed(dir.join(file)).and_then(|s| s.parse::<u64>().ok());
        parts.insert(
            number,
            KernelPartition {
                name: entry.file_name().to_string_lossy().into_owned(),
                start_512: num("start").unwrap_or(0),
                size_512: num("size").unwrap_or(0),
            },
        );
    }
    parts
}

/// A partition as the kernel has it (sysfs counts in 512-byte units
/// whatever the disk's sector size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPartition {
    /// Kernel name (`sda2`).
    pub name: String,
    /// First sector, in 512-byte units.
    pub start_512: u64,
    /// Length, in 512-byte units.
    pub size_512: u64,
}

/// A disk's size in bytes and logical sector size, from sysfs.
pub(crate) fn disk_geometry(disk: &SysBlock) -> (u64, u32) {
    let size = read_trimmed(disk.sysfs.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        * 512;
    let sector = read_trimmed(disk.sysfs.join("queue/logical_block_size"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    (size, sector)
}

/// `sfdisk --json DISK`, the parts ka keeps.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SfdiskTable {
    pub label: String,
    pub id: Option<String>,
    pub firstlba: Option<u64>,
    pub lastlba: Option<u64>,
    pub sectorsize: Option<u32>,
    #[serde(default)]
    pub partitions: Vec<SfdiskPartition>,
}

/// One partition of `sfdisk --json`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SfdiskPartition {
    pub node: String,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub type_id: String,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub attrs: Option<String>,
    #[serde(default)]
    pub bootable: bool,
}

impl SfdiskPartition {
    /// Its number: the digits that end its device name (`sda12`, `nvme0n1p3`).
    pub fn number(&self) -> Option<u32> {
        let digits = self.node.len()
            - self
                .node
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .len();
        self.node[self.node.len() - digits..].parse().ok()
    }
}

#[derive(Deserialize)]
struct SfdiskOutput {
    partitiontable: SfdiskTable,
}

/// Reads `disk`'s partition table with `sfdisk --json`.
pub(crate) fn read_table(disk: &Path) -> Result<SfdiskTable, Error> {
    let mut c = Command::new("sfdisk");
    c.arg("--json").arg(disk);
    let out = run_captured(c, None)?;
    parse_table(&out).map_err(|e| {
        Error::Invalid(format!(
            "cannot read the output of `sfdisk --json {}`: {e}",
            disk.display()
        ))
    })
}

pub(crate) fn parse_table(json: &[u8]) -> Result<SfdiskTable, serde_json::Error> {
    serde_json::from_slice::<SfdiskOutput>(json).map(|o| o.partitiontable)
}

/// What `blkid -p` finds on `dev` by reading it (not its cache): `TYPE`,
/// `UUID`, `LABEL`, `VERSION`… Empty when it finds nothing.
pub(crate) fn probe(dev: &Path) -> Result<BTreeMap<String, String>, Error> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .output()
        .map_err(|e| Error::io("running blkid (package util-linux)", e))?;
    // Exit status 2: nothing found, which is an answer, not a failure.
    match out.status.code() {
        Some(0) => Ok(parse_export(&String::from_utf8_lossy(&out.stdout))),
        Some(2) => Ok(BTreeMap::new()),
        _ => Err(Error::Command {
            command: format!("blkid -p -o export {}", dev.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// Parses `blkid -o export`: `KEY=value` lines, the value shell-escaped
/// with backslashes (`EFI\ System`).
pub(crate) fn parse_export(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let mut out = String::new();
            let mut chars = value.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    c => out.push(c),
                }
            }
            Some((key.to_string(), out))
        })
        .collect()
}

/// The active swap devices (`/proc/swaps`), by device number.
pub(crate) fn active_swaps() -> Vec<DevNum> {
    let text = fs::read_to_string("/proc/swaps").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| rdev_of(&crate::image::mounts::unescape_path(name)))
        .collect()
}

/// How the file system on `dev` (mounted at `mounted_at`) was made.
pub(crate) fn make_options(
    kind: FsKind,
    dev: &Path,
    mounted_at: &Path,
    blkid: &BTreeMap<String, String>,
) -> Result<MakeOptions, Error> {
    match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
            let mut c = Command::new("dumpe2fs");
            c.arg("-h").arg(dev);
            Ok(parse_dumpe2fs(&String::from_utf8_lossy(&run_captured(
                c, None,
            )?)))
        }
        FsKind::Xfs => {
            let mut c = Command::new("xfs_info");
            c.arg(mounted_at);
            Ok(parse_xfs_info(&String::from_utf8_lossy(&run_captured(
                c, None,
            )?)))
        }
        FsKind::Vfat => Ok(MakeOptions {
            fat_bits: blkid
                .get("VERSION")
                .and_then(|v| v.strip_prefix("FAT"))
                .and_then(|b| b.parse().ok()),
            ..MakeOptions::default()
        }),
    }
}

/// ext features that are state, not choices: `mke2fs -O` refuses them.
const EXT_STATE_FLAGS: [&str; 3] = ["needs_recovery", "orphan_present", "journal_dev"];

fn parse_dumpe2fs(text: &str) -> MakeOptions {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim())
    };
    MakeOptions {
        block_size: field("Block size").and_then(|v| v.parse().ok()),
        inode_size: field("Inode size").and_then(|v| v.parse().ok()),
        features: field("Filesystem features")
            .map(|v| {
                v.split_whitespace()
                    .filter(|f| *f != "(none)" && !EXT_STATE_FLAGS.contains(f))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        fat_bits: None,
    }
}

/// The xfs features a node's `mkfs.xfs` is told, by `xfs_info` section:
/// metadata (`-m`), inode (`-i`) and naming (`-n`) options.
pub(crate) const XFS_FEATURES: [(&str, &str); 9] = [
    ("meta-data", "crc"),
    ("meta-data", "finobt"),
    ("meta-data", "rmapbt"),
    ("meta-data", "reflink"),
    ("meta-data", "bigtime"),
    ("meta-data", "inobtcount"),
    ("meta-data", "sparse"),
    ("meta-data", "nrext64"),
    ("naming", "ftype"),
];

fn parse_xfs_info(text: &str) -> MakeOptions {
    let mut section = "";
    let mut values: Vec<(&str, &str, &str)> = Vec::new();
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            section = line.split('=').next().unwrap_or("").trim();
        }
        for token in line.split(|c: char| c.is_whitespace() || c == ',') {
            if let Some((key, value)) = token.split_once('=') {
                values.push((section, key, value));
            }
        }
    }
    let get = |sec: &str, key: &str| {
        values
            .iter()
            .find(|(s, k, _)| *s == sec && *k == key)
            .map(|(_, _, v)| *v)
    };
    MakeOptions {
        block_size: get("data", "bsize").and_then(|v| v.parse().ok()),
        inode_size: get("meta-data", "isize").and_then(|v| v.parse().ok()),
        features: XFS_FEATURES
            .iter()
            .filter_map(|(sec, key)| get(sec, key).map(|v| format!("{key}={v}")))
            .collect(),
        fat_bits: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sfdisk_json_of_a_gpt_disk() {
        let json = br#"{ "partitiontable": { "label": "gpt", "id": "D69ADCA2-FACB-524D-9B76-9B3B7D12BB03",
            "device": "/dev/nvme0n1", "unit": "sectors", "firstlba": 2048, "lastlba": 2097118, "sectorsize": 512,
            "partitions": [
              {"node": "/dev/nvme0n1p1", "start": 2048, "size": 2048, "type": "21686148-6449-6E6F-744E-656564454649",
               "uuid": "C5779DF0-227A-194E-BD3C-7436FB6DAA21", "name": "bios", "attrs": "LegacyBIOSBootable GUID:63"},
              {"node": "/dev/nvme0n1p12", "start": 4096, "size": 8, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}
            ] } }"#;
        let t = parse_table(json).unwrap();
        assert_eq!(t.label, "gpt");
        assert_eq!(
            (t.firstlba, t.lastlba, t.sectorsize),
            (Some(2048), Some(2097118), Some(512))
        );
        assert_eq!(t.partitions[0].number(), Some(1));
        assert_eq!(t.partitions[1].number(), Some(12));
        assert_eq!(
            t.partitions[0].attrs.as_deref(),
            Some("LegacyBIOSBootable GUID:63")
        );
        assert!(!t.partitions[1].bootable);
        assert_eq!(t.partitions[1].name, None);
    }

    #[test]
    fn blkid_export_values_are_unescaped() {
        let m = parse_export("TYPE=vfat\nPART_ENTRY_NAME=EFI\\ System\nLABEL=a\\\\b\n");
        assert_eq!(m["TYPE"], "vfat");
        assert_eq!(m["PART_ENTRY_NAME"], "EFI System");
        assert_eq!(m["LABEL"], "a\\b");
    }

    #[test]
    fn dumpe2fs_header_gives_features_block_and_inode_size() {
        let text = "Filesystem volume name:   <none>\n\
                    Filesystem features:      has_journal ext_attr needs_recovery extent 64bit metadata_csum\n\
                    Block size:               1024\n\
                    Inode size:\t          256\n";
        let m = parse_dumpe2fs(text);
        assert_eq!(m.block_size, Some(1024));
        assert_eq!(m.inode_size, Some(256));
        assert_eq!(
            m.features,
            [
                "has_journal",
                "ext_attr",
                "extent",
                "64bit",
                "metadata_csum"
            ]
        );
    }

    #[test]
    fn xfs_info_gives_features_by_section() {
        let text = "meta-data=/dev/loop0p4   isize=512    agcount=4, agsize=25600 blks\n\
                    \x20        =               sectsz=512   attr=2, projid32bit=1\n\
                    \x20        =               crc=1        finobt=1, sparse=1, rmapbt=0\n\
                    \x20        =               reflink=1    bigtime=1 inobtcount=1 nrext64=0\n\
                    data     =                  bsize=4096   blocks=102400, imaxpct=25\n\
                    naming   =version 2         bsize=4096   ascii-ci=0, ftype=1\n\
                    log      =internal log      bsize=4096   blocks=16384, version=2\n";
        let m = parse_xfs_info(text);
        assert_eq!(m.block_size, Some(4096));
        assert_eq!(m.inode_size, Some(512));
        assert_eq!(
            m.features,
            [
                "crc=1",
                "finobt=1",
                "rmapbt=0",
                "reflink=1",
                "bigtime=1",
                "inobtcount=1",
                "sparse=1",
                "nrext64=0",
                "ftype=1"
            ]
        );
    }
}
