//! System clones: a running machine cloned file by file onto nodes that
//! rebuild their disks from it (`ka serve --system`, `ka join --system`).
//!
//! - [`layout`] describes the source's disks: every disk a file system
//!   under the root lives on, its partition table, and for each partition
//!   how a node gets it — a [`Content::Tree`] (a mounted ext2/3/4, xfs or
//!   vfat file system, sent as files), [`Content::Swap`] (made anew),
//!   [`Content::Raw`] (bytes: a BIOS boot partition, an unmounted
//!   partition, `--raw`) or [`Content::Skipped`] (`--skip-disk`).
//!   [`read_layout`] reads it from the mount table, sysfs, `sfdisk --json`
//!   and `blkid -p`, and refuses before anything is sent what a node could
//!   not rebuild (btrfs, LVM, RAID, LUKS, ZFS, a file system on a whole
//!   disk), saying what to use instead.
//! - [`stream`] is the format of the one image a system session streams:
//!   the plan, then a tar tree per file system and raw partitions.
//! - [`capture`] makes that stream on the source, from the live file
//!   systems.
//! - [`disk`] rebuilds a node's disk: [`plan_disk`] fits the partitions to
//!   it (the last one, or the layout file's `fill`, grows or shrinks; a
//!   [`LayoutFile`] can size the others), [`write_table`] writes the table
//!   with the source's disk id and partition GUIDs, and [`make_filesystem`]
//!   and [`make_swap`] make each file system and swap with the source's
//!   type, UUID and label, so the clone's `fstab` and boot entries find
//!   them.
//! - [`rebuild`] consumes the stream on a node as it arrives, and
//!   [`bootloader`] makes the result boot.
//! - [`unpack_following`] drives a rebuild from a node's windowed spool
//!   ([`crate::datapath::window`]): the node never holds the whole stream.
//!
//! `docs/system.md` tells the same from the operator's side, with the
//! layout file's format.
//!
//! # Repair without the whole stream
//!
//! A system node keeps only a bounded window of the stream, so it can serve
//! a downstream only from what the window still holds; it says so in its
//! progress (`holds_from`) and refuses older offsets. The source spools the
//! whole stream and ka-core places any node no upstream can serve directly
//! under the source, so a repair always finds the bytes it needs and a node
//! never starts over because its upstream died. A node that restarts (its
//! process, or the machine) starts over: its disks are rebuilt from the
//! first byte.

pub mod bootloader;
pub mod capture;
pub mod disk;
pub mod layout;
pub(crate) mod layout_file;
mod probe;
mod read;
pub mod rebuild;
pub mod stream;

pub use disk::{
    make_filesystem, make_swap, min_tree_bytes, partition_path, plan_disk, write_table, DiskPlan,
    LayoutFile, PlannedPartition, SHRINK_MARGIN,
};
pub use layout::{
    read_layout, Content, DiskLayout, FileSystem, FsKind, IgnoredMount, Layout, MakeOptions,
    PartitionLayout, ReadOptions, TableKind,
};

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::datapath::window::{Follower, Window};
use crate::datapath::Written;
use crate::Error;
use rebuild::{RebuildOptions, Rebuilder};
use stream::Decoder;

/// The version of [`Plan`] this ka writes and reads.
pub const PLAN_FORMAT: u32 = 1;

/// What a system stream's nodes read first: the source's layout and what
/// to do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// [`PLAN_FORMAT`] of the ka that made it.
    pub format: u32,
    /// The source's disks.
    pub layout: Layout,
    /// A partition description for nodes whose disks differ (`--layout`),
    /// as its text.
    pub layout_file: Option<String>,
    /// Run on each node, chrooted into the new system, once it is unpacked.
    pub post_command: Option<String>,
    /// The version of ka that captured it, for messages.
    pub made_by: String,
}

impl Plan {
    /// A plan of this ka's format for `layout`.
    pub fn new(layout: Layout, layout_file: Option<String>, post_command: Option<String>) -> Plan {
        Plan {
            format: PLAN_FORMAT,
            layout,
            layout_file,
            post_command,
            made_by: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Checks that `path` holds a saved system stream (`ka join --save`), so
/// `ka serve --system-image` never serves anything else to nodes that will
/// repartition their disks from it.
pub fn check_saved_stream(path: &Path) -> Result<(), Error> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if &magic != stream::MAGIC {
        return Err(Error::Invalid(format!(
            "{} is not a saved system stream (made by `ka join --save FILE` in a `ka serve --system` \
             session); serve a disk image with --image",
            path.display()
        )));
    }
    Ok(())
}

/// How a node's rebuild ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// One line per step done.
    pub steps: Vec<String>,
    /// The keyed digest of the image a packed stream unpacked to, checked
    /// against its trailer: what the copy is checked by at the end
    /// ([`ka_core::node::Node::handle_stream_end`]). `None` for a plain
    /// stream.
    pub image: Option<ka_core::codec::Digest>,
}

/// Rebuilds `opts.disks` from the stream being received into `spool`,
/// following `written`, reading each byte once as it is written and
/// telling `window` what is consumed, then finishes the system (boot
/// loader, post-command, unmounted). A packed stream is unpacked on the
/// way by `unpacker`, and its trailer checked before the system counts as
/// rebuilt. Blocking: run it on a blocking thread of the runtime `rt`.
/// Fails as soon as any step fails, naming it.
pub fn unpack_following(
    spool: &Path,
    written: watch::Receiver<Written>,
    window: Arc<Window>,
    opts: RebuildOptions,
    mut unpacker: Option<crate::image::packed::Unpacker>,
    rt: tokio::runtime::Handle,
) -> Result<Unpacked, Error> {
    let mut follower = Follower::open(spool, written, Arc::clone(&window), rt)?;
    let mut rebuilder = Rebuilder::new(opts);
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; crate::datapath::BUF_SIZE];
    let result = (|| {
        while !decoder.ended() {
            let Some(piece) = follower.next(&mut buf)? else {
                return Err(Error::Invalid(format!(
                    "the stream ended at {} bytes before its END section: \
                     is the source's image a system stream?",
                    follower.position()
                )));
            };
            match &mut unpacker {
                None => decoder.feed(piece, &mut |e| rebuilder.on_event(e))?,
                Some(u) => u.feed(piece, &mut |bytes| {
                    decoder.feed(bytes, &mut |e| rebuilder.on_event(e))
                })?,
            }
        }
        let mut image = None;
        if let Some(mut u) = unpacker.take() {
            // The trailer follows the END section: the image is checked
            // whole before the system is finished.
            while let Some(piece) = follower.next(&mut buf)? {
                u.feed(piece, &mut |rest| {
                    if rest.is_empty() {
                        Ok(())
                    } else {
                        Err(Error::Invalid(
                            "the system stream goes on after its END section".into(),
                        ))
                    }
                })?;
            }
            image = Some(u.finish()?.digest);
        }
        let steps = rebuilder.finish()?;
        Ok(Unpacked { steps, image })
    })();
    if result.is_err() {
        window.close();
    }
    result
}

#[cfg(test)]
mod tests;
