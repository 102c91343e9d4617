//! Cloning a running machine file by file (`ka serve --system`,
//! `ka join --system DISK[,DISK…]`).
//!
//! The source first describes its disks ([`layout`]): every disk a file
//! system under the root lives on, its partition table, and for each
//! partition how a node gets it — a [`Content::Tree`] (a mounted ext2/3/4,
//! xfs or vfat file system, sent as files), [`Content::Swap`] (made anew),
//! [`Content::Raw`] (bytes: a BIOS boot partition, an unmounted partition,
//! `--raw`) or [`Content::Skipped`] (`--skip-disk`). [`read_layout`] reads it
//! from the mount table, sysfs, `sfdisk --json` and `blkid -p`, and refuses
//! before anything is sent what a node could not rebuild (btrfs, LVM, RAID,
//! LUKS, ZFS, a file system on a whole disk), saying what to use instead.
//!
//! A node then rebuilds each disk ([`disk`]): [`plan_disk`] fits the
//! partitions to its disk (the last one, or the layout file's `fill`, grows
//! or shrinks; a [`LayoutFile`] can size the others), [`write_table`]
//! writes the table with the source's disk id and partition GUIDs, and
//! [`make_filesystem`] and [`make_swap`] make each file system and swap with
//! the source's type, UUID and label, so the clone's `fstab` and boot
//! entries find them. The trees and raw partitions follow in the stream, in
//! [`Layout::trees`] and [`Layout::raw_partitions`] order.
//!
//! `docs/system.md` tells the same from the operator's side, with the
//! layout file's format.

pub mod disk;
pub mod layout;
mod layout_file;
mod probe;
mod read;

pub use disk::{
    make_filesystem, make_swap, min_tree_bytes, partition_path, plan_disk, write_table, DiskPlan,
    LayoutFile, PlannedPartition, SHRINK_MARGIN,
};
pub use layout::{
    read_layout, Content, DiskLayout, FileSystem, FsKind, IgnoredMount, Layout, MakeOptions,
    PartitionLayout, ReadOptions, TableKind,
};

#[cfg(test)]
mod tests;
