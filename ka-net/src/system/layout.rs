//! The description of a running machine's disks that a system stream sends
//! first: partition tables, and for each partition what it holds and how
//! the node gets it (a file tree, swap made anew, raw bytes, or nothing).
//!
//! It is serialised as JSON (serde); the fields marked `serde(skip)` are
//! the source's own (where to read), never sent.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::read::{read_layout, IgnoredMount, ReadOptions};

/// Every disk a running system lives on, in stream order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The disks, in the order of the first file system on each, starting
    /// with the one that holds `/`; a node writes them to its disks in this
    /// order (`ka join --system DISK[,DISK…]`).
    pub disks: Vec<DiskLayout>,
    /// Mounts under the root that are not sent (virtual file systems,
    /// network file systems, images such as snaps), for the source to say
    /// what a clone will lack. Not sent: a node has no use for it.
    #[serde(skip)]
    pub ignored: Vec<IgnoredMount>,
}

/// One disk: its partition table and what each partition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// The source's device, for messages: `/dev/sda`.
    pub device: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes: the unit of every start and size below.
    pub sector_size: u32,
    /// The kind of partition table.
    pub table: TableKind,
    /// The GPT disk GUID or the DOS disk identifier (`0x1234abcd`), kept so
    /// that boot entries and `fstab` lines naming it still match.
    pub id: String,
    /// GPT: the first sector partitions may use.
    pub first_lba: Option<u64>,
    /// GPT: the last sector partitions may use (on the source's disk).
    pub last_lba: Option<u64>,
    /// The partitions, by number.
    pub partitions: Vec<PartitionLayout>,
}

/// The kind of a partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID partition table.
    Gpt,
    /// DOS (MBR) partition table.
    Dos,
}

impl TableKind {
    /// The label `sfdisk` uses for it.
    pub fn sfdisk_label(self) -> &'static str {
        match self {
            TableKind::Gpt => "gpt",
            TableKind::Dos => "dos",
        }
    }
}

/// One partition: its table entry and its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLayout {
    /// Its number in the table (1 for `sda1`).
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub size: u64,
    /// GPT type GUID or MBR type (`83`), as `sfdisk` writes it.
    pub type_id: String,
    /// GPT partition GUID (boot entries and `root=PARTUUID=` name it).
    pub uuid: Option<String>,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT attributes as `sfdisk` writes them (`LegacyBIOSBootable GUID:63`).
    pub attrs: Option<String>,
    /// DOS boot flag.
    pub bootable: bool,
    /// What it holds and how a node gets it.
    pub content: Content,
    /// On the source: its partition device, for raw reads. Not sent.
    #[serde(skip)]
    pub device: Option<PathBuf>,
}

impl PartitionLayout {
    /// Length in bytes.
    pub fn size_bytes(&self, sector_size: u32) -> u64 {
        self.size * u64::from(sector_size)
    }

    /// A DOS extended partition: a container whose own bytes are the chain of
    /// logical partitions' tables, which `sfdisk` writes anew.
    pub fn is_extended(&self, table: TableKind) -> bool {
        table == TableKind::Dos
            && matches!(self.type_id.to_ascii_lowercase().as_str(), "5" | "f" | "85")
    }
}

/// What a partition holds, and so how a node gets it. In JSON the variant
/// is the `type` field beside the variant's own (`{"type": "tree", "kind":
/// "ext4", …}`): `kind` is already the file system's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// A mounted ext2/3/4, xfs or vfat file system, sent as a file tree: the
    /// node makes the file system anew (same type, UUID, label) and unpacks.
    Tree(FileSystem),
    /// Swap, made anew on the node with the same UUID and label (its
    /// contents are of no use to another machine).
    Swap {
        /// Its UUID, which `fstab` and `resume=` may name.
        uuid: Option<String>,
        /// Its label.
        label: Option<String>,
    },
    /// Sent as bytes: a BIOS boot partition, a partition no file system under
    /// the root mounts (an unmounted ESP, a Windows partition), or one named
    /// with `--raw`.
    Raw {
        /// Why, for messages.
        why: String,
    },
    /// Not sent; the node leaves it empty: a partition of a disk given with
    /// `--skip-disk`, or a DOS extended partition (only a container of the
    /// logical partitions, which are listed on their own).
    Skipped {
        /// Why, for messages.
        why: String,
    },
}

/// A file system sent as a tree, and what a node needs to make it anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSystem {
    /// Its type.
    pub kind: FsKind,
    /// Its UUID as `blkid` prints it (`fstab` and boot entries name it).
    pub uuid: String,
    /// Its label.
    pub label: Option<String>,
    /// Where the running system mounts it: `/`, `/home`, `/boot/efi`.
    pub mountpoint: String,
    /// Its mount options: `fstab`'s if it lists the mount point, else the
    /// kernel's (the mount's own, then the file system's).
    pub options: String,
    /// Bytes in use (`statvfs`): what the tree costs to send, and the least
    /// room its partition needs on a node.
    pub used: u64,
    /// Directories inside this file system whose contents are not sent,
    /// relative to its root (`tmp`, `var/cache/foo`): `--exclude`, and the
    /// mount points of bind mounts of a file system that is already sent.
    /// Other file systems mounted inside it are left out by staying on one
    /// file system (`tar --one-file-system`), not listed here.
    pub excludes: Vec<String>,
    /// How the source's file system was made, beyond type, UUID and label.
    #[serde(default)]
    pub make: MakeOptions,
    /// On the source: where it is mounted now (under `--root`). Not sent.
    #[serde(skip)]
    pub mounted_at: Option<PathBuf>,
}

/// What a node's mkfs must repeat of how the source's file system was made.
/// A node's mkfs may be newer than the cloned system and turn on features
/// the clone's own kernel or boot loader cannot read (e2fsprogs' newer
/// defaults and GRUB are the known case), so the source's choices are sent
/// and the node asks for exactly them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeOptions {
    /// Block size in bytes: ext (`mke2fs -b`), xfs (`mkfs.xfs -b size=`).
    pub block_size: Option<u32>,
    /// Inode size in bytes: ext (`mke2fs -I`), xfs (`mkfs.xfs -i size=`).
    pub inode_size: Option<u32>,
    /// ext: the feature names `dumpe2fs -h` lists (made with `-O
    /// none,<features>`); xfs: `name=value` for the metadata, inode and
    /// naming features `xfs_info` reports (`crc=1`, `reflink=1`, `ftype=1`).
    pub features: Vec<String>,
    /// vfat: 12, 16 or 32 (`mkfs.vfat -F`).
    pub fat_bits: Option<u8>,
}

/// The file systems ka rebuilds on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// ext2.
    Ext2,
    /// ext3.
    Ext3,
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
    /// FAT (an EFI system partition).
    Vfat,
}

impl FsKind {
    /// The kind for a type name as the kernel and `blkid` spell it.
    pub fn from_name(name: &str) -> Option<FsKind> {
        Some(match name {
            "ext2" => FsKind::Ext2,
            "ext3" => FsKind::Ext3,
            "ext4" => FsKind::Ext4,
            "xfs" => FsKind::Xfs,
            "vfat" => FsKind::Vfat,
            _ => return None,
        })
    }

    /// The type name as the kernel and `blkid` spell it.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Vfat => "vfat",
        }
    }

    /// Whether it is one of the ext family (same tools, same options).
    pub fn is_ext(self) -> bool {
        matches!(self, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4)
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Layout {
    /// What a node must receive: the trees' used bytes plus the raw
    /// partitions' whole sizes. For progress and for the size check before
    /// anything is sent.
    pub fn used_bytes(&self) -> u64 {
        self.disks
            .iter()
            .flat_map(|d| d.partitions.iter().map(move |p| (d, p)))
            .map(|(d, p)| match &p.content {
                Content::Tree(fs) => fs.used,
                Content::Raw { .. } => p.size_bytes(d.sector_size),
                Content::Swap { .. } | Content::Skipped { .. } => 0,
            })
            .sum()
    }

    /// The file trees in stream order: disks in layout order, partitions by
    /// number, each with its disk's index.
    pub fn trees(&self) -> impl Iterator<Item = (usize, &PartitionLayout, &FileSystem)> {
        self.partitions().filter_map(|(disk, p)| match &p.content {
            Content::Tree(fs) => Some((disk, p, fs)),
            _ => None,
        })
    }

    /// The raw partitions in stream order (as [`trees`](Self::trees)), each
    /// with its disk's index.
    pub fn raw_partitions(&self) -> impl Iterator<Item = (usize, &PartitionLayout)> {
        self.partitions()
            .filter(|(_, p)| matches!(p.content, Content::Raw { .. }))
    }

    /// Every partition, disks in order, partitions by number.
    fn partitions(&self) -> impl Iterator<Item = (usize, &PartitionLayout)> {
        self.disks
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.partitions.iter().map(move |p| (i, p)))
    }
}

/// A byte count for messages, exact too: `12.0 GiB (12884901888 bytes)`.
pub(crate) fn human(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    format!("{} ({bytes} bytes)", human_short(bytes))
}

/// A byte count for messages, rounded: `12.0 GiB`.
pub(crate) fn human_short(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, size: u64, content: Content) -> PartitionLayout {
        PartitionLayout {
            number,
            start: 2048 * u64::from(number),
            size,
            type_id: "83".into(),
            uuid: None,
            name: None,
            attrs: None,
            bootable: false,
            content,
            device: None,
        }
    }

    fn tree(mountpoint: &str, used: u64) -> Content {
        Content::Tree(FileSystem {
            kind: FsKind::Ext4,
            uuid: "u".into(),
            label: None,
            mountpoint: mountpoint.into(),
            options: "rw".into(),
            used,
            excludes: vec![],
            make: MakeOptions::default(),
            mounted_at: Some("/mnt".into()),
        })
    }

    fn two_disks() -> Layout {
        let disk = |device: &str, partitions| DiskLayout {
            device: device.into(),
            size: 1 << 30,
            sector_size: 512,
            table: TableKind::Dos,
            id: "0x1".into(),
            first_lba: None,
            last_lba: None,
            partitions,
        };
        Layout {
            disks: vec![
                disk(
                    "/dev/sda",
                    vec![
                        part(1, 100, Content::Raw { why: "bios".into() }),
                        part(2, 1000, tree("/", 5000)),
                        part(
                            3,
                            10,
                            Content::Swap {
                                uuid: None,
                                label: None,
                            },
                        ),
                    ],
                ),
                disk(
                    "/dev/sdb",
                    vec![
                        part(1, 1000, tree("/home", 7000)),
                        part(2, 99, Content::Skipped { why: "x".into() }),
                    ],
                ),
            ],
            ignored: vec![],
        }
    }

    #[test]
    fn used_bytes_counts_trees_used_and_raw_partitions_whole() {
        assert_eq!(two_disks().used_bytes(), 5000 + 7000 + 100 * 512);
    }

    #[test]
    fn trees_come_disk_by_disk_by_partition_number() {
        let layout = two_disks();
        let trees: Vec<_> = layout
            .trees()
            .map(|(d, p, fs)| (d, p.number, fs.mountpoint.as_str()))
            .collect();
        assert_eq!(trees, [(0, 2, "/"), (1, 1, "/home")]);
        let raws: Vec<_> = layout
            .raw_partitions()
            .map(|(d, p)| (d, p.number))
            .collect();
        assert_eq!(raws, [(0, 1)]);
    }

    #[test]
    fn json_round_trip_leaves_out_the_sources_own_paths() {
        let layout = two_disks();
        let json = serde_json::to_string(&layout).unwrap();
        assert!(
            json.contains(r#""content":{"type":"tree","kind":"ext4""#),
            "{json}"
        );
        assert!(json.contains(r#""kind":"ext4""#), "{json}");
        assert!(json.contains(r#""table":"dos""#), "{json}");
        assert!(!json.contains("/mnt"), "mounted_at is the source's: {json}");
        let back: Layout = serde_json::from_str(&json).unwrap();
        let Content::Tree(fs) = &back.disks[0].partitions[1].content else {
            panic!("not a tree: {back:?}");
        };
        assert_eq!(fs.mounted_at, None);
        assert_eq!(fs.used, 5000);
        assert_eq!(
            back.disks[1].partitions[1].content,
            layout.disks[1].partitions[1].content
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 29), "1.5 GiB (1610612736 bytes)");
        assert_eq!(human_short(3 << 29), "1.5 GiB");
    }
}
