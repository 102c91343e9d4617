//! Rebuilding a source disk's layout on a node's disk: plan the partitions
//! for the node's disk size ([`plan_disk`]), write the table
//! ([`write_table`]), make each file system and swap anew with the source's
//! identity ([`make_filesystem`], [`make_swap`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::layout::{human, human_short};
use super::layout::{Content, DiskLayout, FileSystem, FsKind, TableKind};
pub use super::layout_file::LayoutFile;
use super::layout_file::PartSize;
use super::probe;
use crate::image::blockdev;
use crate::image::process::run_captured;
use crate::Error;

const MIB: u64 = 1 << 20;

/// The room a tree partition keeps beyond its used bytes when a smaller
/// disk makes it shrink: 10 % of the used bytes plus this. Unpacking needs
/// room for the file system's own metadata and journal (tens of MiB on a
/// small ext4 or xfs) and the cloned system needs some free space to start;
/// a partition that is not shrunk (kept at its size or grown) needs nothing
/// more, since its data already fit there.
pub const SHRINK_MARGIN: u64 = 64 * MIB;

/// The smallest xfs `mkfs.xfs` makes (300 MB; smaller ones are only for
/// its own tests).
const XFS_MIN: u64 = 300 * 1000 * 1000;

/// The smallest swap partition worth making.
const SWAP_MIN: u64 = MIB;

/// The largest disk, partition or size a layout may describe (1 PiB), and
/// the most partitions on one disk: far past any real disk, and small
/// enough that no sum or product of them overflows while a disk is
/// planned. A plan past them is corrupt, or not made by ka.
const MAX_LAYOUT_BYTES: u64 = 1 << 50;
const MAX_PARTITIONS: usize = 256;

/// The largest sector size a layout or a disk may have.
const MAX_SECTOR: u32 = 64 * 1024;

/// How long [`write_table`] waits for the kernel's partition devices.
const PARTITION_WAIT: Duration = Duration::from_secs(10);

/// How long a disk sfdisk finds in use is waited for before its refusal
/// stands (see [`write_table`]).
const IN_USE_WAIT: Duration = Duration::from_secs(10);

/// Where each partition goes on a node's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// One per source partition, in the source's order (by number).
    pub partitions: Vec<PlannedPartition>,
    /// The node disk's logical sector size: the unit of every start and size.
    pub sector_size: u32,
    /// GPT: the first usable sector on the node's disk (the source's, in
    /// the node's sectors).
    pub first_lba: Option<u64>,
}

/// Where one partition goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedPartition {
    /// Its number, as on the source.
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub size: u64,
}

/// The least room, in bytes, a tree with `used` bytes may shrink to:
/// `used` + 10 % + [`SHRINK_MARGIN`].
pub fn min_tree_bytes(used: u64) -> u64 {
    used + used / 10 + SHRINK_MARGIN
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn align_down(x: u64, align: u64) -> u64 {
    x / align * align
}

/// Refuses a layout (and a layout file's sizes for it) whose numbers no
/// real disk has, before [`plan_disk`] does arithmetic with them.
fn check_bounds(
    src: &DiskLayout,
    target_sector: u32,
    sizes: Option<&super::layout_file::DiskSizes>,
    disk_index: usize,
) -> Result<(), Error> {
    let corrupt = |what: String| {
        Error::Plan(format!(
            "disk {disk_index} ({}) in the layout {what}: the plan is corrupt or was not made by this ka",
            src.device
        ))
    };
    if target_sector > MAX_SECTOR || src.sector_size > MAX_SECTOR {
        return Err(Error::Plan(format!(
            "a sector size over {MAX_SECTOR} bytes (disk {disk_index}: {} in the layout, {target_sector} on the node) is not one a disk has",
            src.sector_size
        )));
    }
    if src.size > MAX_LAYOUT_BYTES {
        return Err(corrupt(format!("is {} bytes, over 1 PiB", src.size)));
    }
    if src.partitions.len() > MAX_PARTITIONS {
        return Err(corrupt(format!("has {} partitions", src.partitions.len())));
    }
    let sectors = src.size / u64::from(src.sector_size.max(1));
    if src.first_lba.is_some_and(|f| f > sectors) || src.last_lba.is_some_and(|l| l > sectors) {
        return Err(corrupt(format!(
            "has its usable area past its end ({sectors} sectors)"
        )));
    }
    for p in &src.partitions {
        if p.start.checked_add(p.size).is_none_or(|end| end > sectors) {
            return Err(corrupt(format!(
                "has partition {} (sectors {}, {} long) past its end ({sectors} sectors)",
                p.number, p.start, p.size
            )));
        }
    }
    for (number, entry) in sizes.map(|s| &s.partitions).into_iter().flatten() {
        if matches!(entry.size, PartSize::Bytes(b) if b > MAX_LAYOUT_BYTES) {
            return Err(Error::Plan(format!(
                "the layout file asks more than 1 PiB for partition {number} of disk {disk_index} (line {})",
                entry.line
            )));
        }
    }
    Ok(())
}

/// Plans source disk `src` (index `disk_index` in its layout) on a node's
/// disk of `target_bytes` bytes with `target_sector`-byte sectors.
///
/// Keeps the source's partitions in their order on disk, with their
/// numbers, types and GUIDs. One partition grows or shrinks to use the disk
/// exactly: the one the layout file marks `fill`, else the last one (unless
/// the layout file gives it a size). Other partitions keep their size or
/// take the layout file's. Starts stay the source's unless something before
/// them changes size (or the sector size differs); then they follow one
/// another, each on a 1 MiB boundary (DOS logical partitions one boundary
/// further, for their table sector). GPT leaves room for the backup table
/// at the disk's end; DOS stops at 2^32 sectors.
///
/// Refuses a disk too small for the layout: a tree partition may shrink only
/// to its used bytes plus [`min_tree_bytes`]'s margin, a raw partition and
/// a skipped one keep their size; the message gives the disk's size, the
/// size the layout needs and the partition that does not fit.
///
/// A layout whose numbers no disk has (a partition past its disk's end, a
/// disk or size over 1 PiB, a sector over 64 KiB, more than 256
/// partitions) is refused first, so nothing below can overflow.
pub fn plan_disk(
    src: &DiskLayout,
    target_bytes: u64,
    target_sector: u32,
    layout_file: Option<&LayoutFile>,
    disk_index: usize,
) -> Result<DiskPlan, Error> {
    if !target_sector.is_power_of_two() || target_sector < 512 {
        return Err(Error::Plan(format!(
            "a sector size of {target_sector} bytes is not one a disk has (512, 4096…)"
        )));
    }
    if !src.sector_size.is_power_of_two() || src.sector_size < 512 {
        return Err(Error::Plan(format!(
            "disk {disk_index} ({}) has a sector size of {} bytes in the layout, which no disk has",
            src.device, src.sector_size
        )));
    }
    check_bounds(
        src,
        target_sector,
        layout_file.and_then(|f| f.disk(disk_index)),
        disk_index,
    )?;
    let ts = u64::from(target_sector);
    let ss = u64::from(src.sector_size);
    let total = target_bytes.min(MAX_LAYOUT_BYTES) / ts;
    let align = (MIB / ts).max(1);
    let to_target = |sectors: u64| (sectors * ss).div_ceil(ts);

    // The usable area: GPT keeps its primary table before `first` and its
    // backup table (header and 128 entries) after `limit`.
    let entry_sectors = (128 * 128u64).div_ceil(ts);
    let (first, limit, first_lba) = match src.table {
        TableKind::Gpt => {
            let first = to_target(src.first_lba.unwrap_or(0)).max(2 + entry_sectors);
            (first, total.saturating_sub(1 + entry_sectors), Some(first))
        }
        TableKind::Dos => (1, total.min(1 << 32), None),
    };

    let sizes = layout_file.and_then(|f| f.disk(disk_index));
    if let (Some(file), Some(sizes)) = (layout_file, sizes) {
        for (&number, entry) in &sizes.partitions {
            if !src.partitions.iter().any(|p| p.number == number) {
                let have: Vec<String> = src
                    .partitions
                    .iter()
                    .map(|p| p.number.to_string())
                    .collect();
                return Err(file.error(
                    entry.line,
                    format!(
                        "disk.{disk_index}.{number}: disk {disk_index} ({}) has no partition {number} (it has {})",
                        src.device,
                        have.join(", ")
                    ),
                ));
            }
        }
    }
    let asked = |number: u32| sizes.and_then(|s| s.partitions.get(&number));

    // Partitions by position; a DOS extended partition holding logical ones
    // is not placed itself but drawn around them.
    let has_logicals = src.table == TableKind::Dos && src.partitions.iter().any(|p| p.number >= 5);
    let extended = src
        .partitions
        .iter()
        .position(|p| has_logicals && p.is_extended(src.table));
    let mut order: Vec<usize> = (0..src.partitions.len())
        .filter(|&i| Some(i) != extended)
        .collect();
    order.sort_by_key(|&i| src.partitions[i].start);
    let Some(&last) = order.last() else {
        return Ok(DiskPlan {
            partitions: Vec::new(),
            sector_size: target_sector,
            first_lba,
        });
    };
    let fill = match sizes.and_then(|s| {
        s.partitions
            .iter()
            .find(|(_, e)| e.size == PartSize::Fill)
            .map(|(&n, _)| n)
    }) {
        Some(n) => src.partitions.iter().position(|p| p.number == n),
        None if asked(src.partitions[last].number).is_some() => None,
        None => Some(last),
    };
    let want: Vec<u64> = src
        .partitions
        .iter()
        .map(|p| match asked(p.number).map(|e| e.size) {
            Some(PartSize::Bytes(b)) => b.div_ceil(ts),
            _ => to_target(p.size),
        })
        .collect();
    let recompute = sizes.is_some_and(|s| !s.partitions.is_empty())
        || ss != ts
        || fill.is_some_and(|f| f != last);

    // Lays the partitions out one after another with the fill partition at
    // `fill_size`; returns (start, size) per source partition and the end.
    let lay_out = |fill_size: u64| {
        let mut placed = vec![(0u64, 0u64); src.partitions.len()];
        let mut prev_end = first;
        let mut moved = recompute;
        let mut ext_start = None;
        let mut logical_end = 0;
        for &i in &order {
            let p = &src.partitions[i];
            let size = if Some(i) == fill { fill_size } else { want[i] };
            let logical = has_logicals && p.number >= 5;
            let start = if !moved {
                p.start
            } else if logical {
                match ext_start {
                    None => {
                        let e = align_up(prev_end, align);
                        ext_start = Some(e);
                        align_up(e + 1, align)
                    }
                    Some(_) => align_up(prev_end + 1, align),
                }
            } else {
                align_up(prev_end, align)
            };
            if logical && ext_start.is_none() {
                ext_start = extended.map(|e| src.partitions[e].start);
            }
            if Some(i) == fill {
                moved = true;
            }
            placed[i] = (start, size);
            prev_end = start + size;
            if logical {
                logical_end = prev_end;
            }
        }
        if let (Some(e), Some(start)) = (extended, ext_start) {
            let keeps_source = !recompute && fill.is_none_or(|f| src.partitions[f].number < 5);
            let end = if keeps_source {
                src.partitions[e].start + src.partitions[e].size
            } else {
                logical_end
            };
            placed[e] = (start, end - start);
        }
        let end = placed.iter().map(|(s, z)| s + z).max().unwrap_or(first);
        (placed, end)
    };

    let describe = |i: usize| {
        let p = &src.partitions[i];
        match &p.content {
            Content::Tree(fs) => format!("partition {} ({} {})", p.number, fs.kind, fs.mountpoint),
            Content::Swap { .. } => format!("partition {} (swap)", p.number),
            Content::Raw { .. } => format!("partition {} (sent as bytes)", p.number),
            Content::Skipped { .. } => format!("partition {} (left empty)", p.number),
        }
    };
    // The least a partition may get, in bytes, and why.
    let least = |i: usize| -> (u64, String) {
        let p = &src.partitions[i];
        let src_bytes = p.size * ss;
        match &p.content {
            Content::Tree(fs) => {
                let mut need = min_tree_bytes(fs.used);
                let mut why = format!("{} used + 10 % + 64 MiB", human_short(fs.used));
                if fs.kind == FsKind::Xfs && need < XFS_MIN {
                    need = XFS_MIN;
                    why = "the smallest xfs mkfs.xfs makes".into();
                }
                // A tree that keeps its source size fits whatever its margin.
                (need.min(src_bytes), why)
            }
            Content::Swap { .. } => (SWAP_MIN.min(src_bytes), "the smallest useful swap".into()),
            Content::Raw { .. } => (src_bytes, "its bytes are sent as they are".into()),
            Content::Skipped { .. } if asked(p.number).is_some() => (0, String::new()),
            Content::Skipped { .. } => (
                src_bytes,
                "a left-empty partition keeps its size unless the layout file gives one".into(),
            ),
        }
    };
    // What a disk needs beyond the partitions' end: GPT's backup table.
    let reserve = match src.table {
        TableKind::Gpt => 1 + entry_sectors,
        TableKind::Dos => 0,
    };
    let needed_bytes = |fill_least: u64| {
        let (_, end) = lay_out(fill_least);
        (end + reserve) * ts
    };

    let (placed, fill_size) = match fill {
        Some(f) => {
            let (_, end0) = lay_out(0);
            let slack = limit.saturating_sub(end0);
            let fill_size = if f == last {
                align_down(slack, align).max(slack.min(want[f]))
            } else {
                align_down(slack, align)
            };
            let (least_bytes, why) = least(f);
            let fill_least = least_bytes.div_ceil(ts);
            let too_small = |what: String| {
                Error::Plan(format!(
                    "disk {disk_index} ({}) does not fit on a disk of {}: it needs at least {}; {what}",
                    src.device,
                    human(target_bytes),
                    human(needed_bytes(align_up(fill_least, align))),
                ))
            };
            if end0 > limit {
                // Even with nothing for the fill partition, one crosses the end.
                let (placed0, _) = lay_out(0);
                let crossing = order
                    .iter()
                    .copied()
                    .find(|&i| placed0[i].0 + placed0[i].1 > limit)
                    .unwrap_or(f);
                return Err(too_small(format!(
                    "{} would end past the usable end of the disk ({}), with {} as small as it may be",
                    describe(crossing),
                    human_short(limit * ts),
                    describe(f)
                )));
            }
            if fill_size < fill_least {
                return Err(too_small(format!(
                    "{} would get {} but needs {} ({why})",
                    describe(f),
                    human(fill_size * ts),
                    human(least_bytes),
                )));
            }
            (lay_out(fill_size).0, Some(fill_size))
        }
        None => (lay_out(0).0, None),
    };

    for &i in &order {
        if Some(i) == fill {
            continue;
        }
        let (start, size) = placed[i];
        let (least_bytes, why) = least(i);
        if size * ts < least_bytes {
            let entry = asked(src.partitions[i].number);
            let what = format!(
                "{} would get {} but needs {} ({why})",
                describe(i),
                human(size * ts),
                human(least_bytes)
            );
            return Err(match (layout_file, entry) {
                (Some(file), Some(e)) => file.error(e.line, what),
                _ => Error::Plan(what),
            });
        }
        if start + size > limit {
            return Err(Error::Plan(format!(
                "disk {disk_index} ({}) does not fit on a disk of {}: it needs at least {}; {} would end past the usable end of the disk ({})",
                src.device,
                human(target_bytes),
                human(needed_bytes(fill_size.map_or(0, |_| align))),
                describe(i),
                human_short(limit * ts),
            )));
        }
    }

    Ok(DiskPlan {
        partitions: src
            .partitions
            .iter()
            .zip(&placed)
            .map(|(p, &(start, size))| PlannedPartition {
                number: p.number,
                start,
                size,
            })
            .collect(),
        sector_size: target_sector,
        first_lba,
    })
}

/// The device of partition `number` of `disk`, as the kernel names it: a
/// disk whose name ends in a digit gets a `p` before the number
/// (`nvme0n1p1`, `loop0p1`, `mmcblk0p1`), others not (`sda1`). `disk` is
/// the kernel's name (`/dev/sda`), not a `/dev/disk/by-*` link.
pub fn partition_path(disk: &Path, number: u32) -> PathBuf {
    let mut name = disk.as_os_str().to_owned();
    if disk
        .as_os_str()
        .to_string_lossy()
        .ends_with(|c: char| c.is_ascii_digit())
    {
        name.push("p");
    }
    name.push(number.to_string());
    PathBuf::from(name)
}

/// The `sfdisk` script that writes `src`'s table as `plan` places it.
pub(crate) fn sfdisk_script(
    target: &Path,
    src: &DiskLayout,
    plan: &DiskPlan,
) -> Result<String, Error> {
    let same = src.partitions.len() == plan.partitions.len()
        && src
            .partitions
            .iter()
            .zip(&plan.partitions)
            .all(|(s, p)| s.number == p.number);
    if !same {
        return Err(Error::Invalid(format!(
            "the plan for {} is not one of its layout: plan the disk again",
            src.device
        )));
    }
    let mut script = format!("label: {}\n", src.table.sfdisk_label());
    if !src.id.is_empty() {
        script.push_str(&format!("label-id: {}\n", src.id));
    }
    if let Some(first) = plan.first_lba {
        script.push_str(&format!("first-lba: {first}\n"));
    }
    script.push_str("unit: sectors\n\n");
    for (p, planned) in src.partitions.iter().zip(&plan.partitions) {
        let mut line = format!(
            "{} : start={}, size={}, type={}",
            partition_path(target, p.number).display(),
            planned.start,
            planned.size,
            p.type_id
        );
        if let Some(uuid) = &p.uuid {
            line.push_str(&format!(", uuid={uuid}"));
        }
        for (key, value) in [("name", &p.name), ("attrs", &p.attrs)] {
            if let Some(v) = value {
                if v.contains(['"', '\n']) {
                    return Err(Error::Plan(format!(
                        "partition {} of {} has a {key} with a quote or a line break ({v:?}), which sfdisk cannot write: rename it on the source",
                        p.number, src.device
                    )));
                }
                line.push_str(&format!(", {key}=\"{v}\""));
            }
        }
        if p.bootable {
            line.push_str(", bootable");
        }
        script.push_str(&line);
        script.push('\n');
    }
    Ok(script)
}

/// Writes `src`'s partition table onto the disk `target` as `plan` places it,
/// and returns each partition's device, in `plan`'s order.
///
/// Refuses a disk in use (mounted, swap, held) or with another sector size
/// than planned. `sfdisk` writes the table for the whole disk (so a GPT's
/// backup lands at the disk's end) with the source's disk id, partition
/// GUIDs, names, attributes and boot flag, and wipes old signatures from the
/// disk and the new partitions, so nothing of an earlier system shows
/// through a partition that is left empty. The kernel is then made to see
/// the new partitions (`sfdisk` re-reads the table; `partx` fills in where
/// that is not enough, as on some loop devices), and their devices are
/// waited for, up to 10 s.
pub fn write_table(
    target: &Path,
    src: &DiskLayout,
    plan: &DiskPlan,
) -> Result<Vec<PathBuf>, Error> {
    let target = std::fs::canonicalize(target)
        .map_err(|e| Error::io(format!("opening {}", target.display()), e))?;
    let ts = u64::from(plan.sector_size);
    let end = plan
        .partitions
        .iter()
        .map(|p| p.start + p.size)
        .max()
        .unwrap_or(0);
    let info = blockdev::check_target(&target, end * ts)?;
    if info.logical_sector_size != plan.sector_size {
        return Err(Error::Plan(format!(
            "{} has {}-byte sectors but the plan was made for {}-byte ones: plan again for this disk",
            target.display(),
            info.logical_sector_size,
            plan.sector_size
        )));
    }
    let script = sfdisk_script(&target, src, plan)?;
    // A disk whose file systems were just unmounted (a rebuild started
    // over, an earlier run's leftovers cleared) can stay busy for a moment:
    // udev probes the devices that closed, and a lazily detached mount
    // lets go when its last user does. sfdisk refuses such a disk before
    // writing anything, so it is asked again until IN_USE_WAIT has passed.
    let deadline = Instant::now() + IN_USE_WAIT;
    loop {
        let mut sfdisk = Command::new("sfdisk");
        sfdisk
            .args(["--quiet", "--wipe", "always", "--wipe-partitions", "always"])
            .arg(&target);
        match run_captured(sfdisk, Some(script.as_bytes())) {
            Err(e) if e.to_string().contains("currently in use") && Instant::now() < deadline => {
                tracing::info!(disk = %target.display(), "disk still in use; asking sfdisk again");
                std::thread::sleep(Duration::from_millis(250));
            }
            result => {
                result?;
                break;
            }
        }
    }
    wait_for_partitions(&target, &info, src, plan)
}

/// Waits until the kernel's partitions of `target` are exactly the planned
/// ones, nudging it with `partx` now and then.
fn wait_for_partitions(
    target: &Path,
    info: &blockdev::BlockDeviceInfo,
    src: &DiskLayout,
    plan: &DiskPlan,
) -> Result<Vec<PathBuf>, Error> {
    let disk = probe::block_of((info.major, info.minor))
        .ok_or_else(|| Error::Invalid(format!("{} is not in /sys/dev/block", target.display())))?;
    let per_512 = u64::from(plan.sector_size) / 512;
    let deadline = Instant::now() + PARTITION_WAIT;
    let mut round = 0u32;
    loop {
        let kernel = probe::kernel_partitions(&disk);
        let matches = plan.partitions.iter().zip(&src.partitions).all(|(p, s)| {
            kernel.get(&p.number).is_some_and(|k| {
                // The kernel sizes an extended partition by its table sector only.
                k.start_512 == p.start * per_512
                    && (s.is_extended(src.table) || k.size_512 == p.size * per_512)
            })
        }) && kernel.len() == plan.partitions.len();
        let devices: Vec<PathBuf> = plan
            .partitions
            .iter()
            .map(|p| match kernel.get(&p.number) {
                Some(k) => Path::new("/dev").join(&k.name),
                None => partition_path(target, p.number),
            })
            .collect();
        if matches && devices.iter().all(|d| probe::rdev_of(d).is_some()) {
            return Ok(devices);
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "the kernel does not show the new partitions of {} after {} s (it has {:?}): run `partx -u {}` and try again",
                target.display(),
                PARTITION_WAIT.as_secs(),
                kernel.values().map(|k| k.name.as_str()).collect::<Vec<_>>(),
                target.display()
            )));
        }
        if round % 10 == 0 && !matches {
            // `partx -u` updates and removes what it knows, `-a` adds the
            // rest (it fails for partitions that exist, which is fine).
            for flag in ["-u", "-a"] {
                let mut c = Command::new("partx");
                c.arg(flag).arg(target);
                let _ = run_captured(c, None);
            }
            for (&number, _) in kernel
                .iter()
                .filter(|(n, _)| !plan.partitions.iter().any(|p| p.number == **n))
            {
                let mut c = Command::new("partx");
                c.args(["-d", "--nr", &number.to_string()]).arg(target);
                let _ = run_captured(c, None);
            }
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A feature or option word sent in a layout, checked before it reaches a
/// command line: lowercase letters, digits and `_`, optionally `=` and
/// digits.
fn is_option_word(s: &str) -> bool {
    let (name, value) = s.split_once('=').unwrap_or((s, "0"));
    !name.is_empty()
        && !value.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && value.chars().all(|c| c.is_ascii_digit())
}

/// Makes `fs`'s file system on `dev`: same type, UUID and label, and as far
/// as the layout says, the same block size, inode size and features (see
/// [`MakeOptions`](super::layout::MakeOptions)). Old signatures on `dev` are
/// wiped first and mkfs is forced, since the device is the node's to
/// overwrite; the tools' chatter is captured and shown only on failure.
pub fn make_filesystem(dev: &Path, fs: &FileSystem) -> Result<(), Error> {
    if let Some(bad) = fs.make.features.iter().find(|f| !is_option_word(f)) {
        return Err(Error::Invalid(format!(
            "the layout asks {} ({}) for the feature {bad:?}, which is no mkfs feature",
            dev.display(),
            fs.mountpoint
        )));
    }
    wipe(dev)?;
    let mut c;
    match fs.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
            c = Command::new(format!("mkfs.{}", fs.kind));
            c.args(["-F", "-q", "-U", &fs.uuid]);
            if let Some(label) = &fs.label {
                c.arg("-L").arg(label);
            }
            if let Some(b) = fs.make.block_size {
                c.arg("-b").arg(b.to_string());
            }
            if let Some(i) = fs.make.inode_size {
                c.arg("-I").arg(i.to_string());
            }
            if !fs.make.features.is_empty() {
                c.arg("-O")
                    .arg(format!("none,{}", fs.make.features.join(",")));
            }
        }
        FsKind::Xfs => {
            c = Command::new("mkfs.xfs");
            c.args(["-f", "-q"]);
            let mut meta = vec![format!("uuid={}", fs.uuid)];
            let mut inode = Vec::new();
            let mut naming = Vec::new();
            // A feature turned off that this mkfs.xfs does not know is off
            // anyway (it predates it); one turned on must be made or refused.
            let usage = xfs_usage();
            let known_or_on = |f: &&String| {
                let (name, value) = f.split_once('=').unwrap_or((f.as_str(), "1"));
                value != "0" || usage.contains(&format!("{name}=0|1"))
            };
            for f in fs.make.features.iter().filter(known_or_on) {
                match f.split_once('=').map(|(k, _)| k) {
                    Some("sparse" | "nrext64") => inode.push(f.clone()),
                    Some("ftype") => naming.push(f.clone()),
                    _ => meta.push(f.clone()),
                }
            }
            if let Some(i) = fs.make.inode_size {
                inode.push(format!("size={i}"));
            }
            c.arg("-m").arg(meta.join(","));
            if !inode.is_empty() {
                c.arg("-i").arg(inode.join(","));
            }
            if !naming.is_empty() {
                c.arg("-n").arg(naming.join(","));
            }
            if let Some(b) = fs.make.block_size {
                c.arg("-b").arg(format!("size={b}"));
            }
            if let Some(label) = &fs.label {
                c.arg("-L").arg(label);
            }
        }
        FsKind::Vfat => {
            let id: String = fs.uuid.chars().filter(|&c| c != '-').collect();
            if id.len() != 8 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(Error::Invalid(format!(
                    "vfat volume ID {:?} of {} is not 8 hex digits (XXXX-XXXX)",
                    fs.uuid, fs.mountpoint
                )));
            }
            c = Command::new("mkfs.vfat");
            c.arg("-i").arg(id);
            if let Some(bits) = fs.make.fat_bits {
                c.arg("-F").arg(bits.to_string());
            }
            if let Some(label) = &fs.label {
                c.arg("-n").arg(label);
            }
        }
    }
    c.arg(dev);
    run_captured(c, None)?;
    Ok(())
}

/// What `mkfs.xfs` says of its options when run without a device.
fn xfs_usage() -> String {
    match Command::new("mkfs.xfs").output() {
        Ok(out) => {
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout)
        }
        Err(_) => String::new(),
    }
}

/// Makes swap on `dev` with the source's UUID and label, over whatever was
/// there.
pub fn make_swap(dev: &Path, uuid: Option<&str>, label: Option<&str>) -> Result<(), Error> {
    wipe(dev)?;
    let mut c = Command::new("mkswap");
    c.arg("-f");
    if let Some(u) = uuid {
        c.arg("-U").arg(u);
    }
    if let Some(l) = label {
        c.arg("-L").arg(l);
    }
    c.arg(dev);
    run_captured(c, None)?;
    Ok(())
}

/// Erases every signature `wipefs` knows on `dev`, so no old file system,
/// RAID member or table shows through the new one.
fn wipe(dev: &Path) -> Result<(), Error> {
    let mut c = Command::new("wipefs");
    c.args(["--all", "--quiet"]).arg(dev);
    run_captured(c, None)?;
    Ok(())
}

#[cfg(test)]
mod tests;
