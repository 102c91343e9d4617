//! Reading a running machine's layout ([`read_layout`]): which disks and
//! partitions its mounted file systems live on, and what every partition of
//! those disks holds.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

use super::layout::{Content, DiskLayout, FileSystem, FsKind, Layout, PartitionLayout, TableKind};
use super::probe::{self, BlockKind, DevNum, SysBlock};
use crate::image::blockdev;
use crate::image::mounts::{self, Mount};
use crate::Error;

/// What to read, and how to treat parts of it (`ka serve --system`'s options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// The running system's root directory (`--root`, `/` by default): the
    /// file systems mounted there and below are the system.
    pub root: PathBuf,
    /// Directories whose contents are not sent (`--exclude`), as this
    /// process sees them (under `root`).
    pub exclude: Vec<PathBuf>,
    /// Disks whose partitions are not sent (`--skip-disk`): the node
    /// partitions them the same and leaves them empty.
    pub skip_disks: Vec<PathBuf>,
    /// Partitions sent as bytes whatever they hold (`--raw`).
    pub raw: Vec<PathBuf>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            root: PathBuf::from("/"),
            exclude: Vec::new(),
            skip_disks: Vec::new(),
            raw: Vec::new(),
        }
    }
}

/// A mount under the root that is not part of the clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredMount {
    /// Where it is mounted, as the running system sees it (`/proc`).
    pub mountpoint: String,
    /// Its file-system type.
    pub fstype: String,
    /// Its mount source.
    pub source: String,
}

/// File-system types that are read-only images (snaps, live media): their
/// image is a file the trees already carry, or a medium not part of the
/// machine.
const IMAGE_FSTYPES: [&str; 5] = ["squashfs", "erofs", "iso9660", "udf", "cramfs"];

/// File-system types that hold a machine's own data without a block device
/// number sysfs knows (btrfs reports an anonymous one; ZFS and bcachefs pool
/// several devices): refused, never ignored as virtual.
const DISK_FSTYPES_WITHOUT_DEVICE: [&str; 4] = ["btrfs", "zfs", "bcachefs", "bcache"];

/// GPT type of the BIOS boot partition (GRUB's core image on a GPT disk).
const BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";
/// Partition types of Linux swap.
const SWAP_TYPES: [&str; 2] = ["0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "82"];

/// What a mount under the root turned out to be.
enum MountRole<'a> {
    /// Not part of the clone.
    Ignored,
    /// On a partition ka rebuilds (or sends raw, if `--raw` names it).
    OnPartition {
        mount: &'a Mount,
        kind: Option<FsKind>,
        part: SysBlock,
        number: u32,
        disk: SysBlock,
    },
}

/// Reads the layout of the running system under `opts.root`; see the module
/// docs of [`system`](crate::system) for what goes where.
///
/// Refuses, before anything is sent, a system it cannot rebuild file by
/// file (every problem found at once, each with what to do instead), bad
/// `--exclude`, `--raw` and `--skip-disk` arguments, and a partition that
/// would be sent raw while something else has it mounted read-write.
pub fn read_layout(opts: &ReadOptions) -> Result<Layout, Error> {
    let root = fs::canonicalize(&opts.root)
        .map_err(|e| Error::io(format!("--root {}", opts.root.display()), e))?;
    let all_mounts =
        mounts::read_mounts().map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    let visible = visible_under(&all_mounts, &root)?;
    let raw = resolve_partitions(&opts.raw)?;
    let skip = resolve_disks(&opts.skip_disks)?;

    // What each mount is; every refusal is collected so one run tells all.
    let mut problems = Vec::new();
    let mut ignored = Vec::new();
    let mut roles = Vec::new();
    for m in &visible {
        match classify(m, &root, &raw) {
            Ok(MountRole::Ignored) => ignored.push(IgnoredMount {
                mountpoint: display_mountpoint(&root, &m.mount_point),
                fstype: m.fstype.clone(),
                source: m.source.clone(),
            }),
            Ok(role) => roles.push(role),
            Err(problem) => problems.push(problem),
        }
    }
    if !roles
        .iter()
        .any(|r| matches!(r, MountRole::OnPartition { mount, .. } if mount.id == visible[0].id))
        && problems.is_empty()
    {
        let m = visible[0];
        problems.push(format!(
            "the root file system is {} from {}, not a partition of a disk: clone it with `ka serve --tar {}` or `ka serve --image`",
            m.fstype,
            m.source,
            root.display()
        ));
    }

    // Each partition is sent once, from its first mount of the whole file
    // system; further mounts of it (bind mounts) are left out where they sit.
    let mut primary: HashMap<DevNum, usize> = HashMap::new();
    let mut binds = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let MountRole::OnPartition { mount, part, .. } = role else {
            continue;
        };
        if mount.fs_root == Path::new("/") && !primary.contains_key(&part.dev) {
            primary.insert(part.dev, i);
        } else {
            binds.push(i);
        }
    }
    for &i in &binds {
        let MountRole::OnPartition { mount, part, .. } = &roles[i] else {
            continue;
        };
        if !primary.contains_key(&part.dev) && !raw.contains(&part.dev) {
            problems.push(format!(
                "{} is mounted at {} only as its sub-directory {}: ka clones whole file systems; mount {} itself under {} (or send it as bytes with --raw {})",
                part.path().display(),
                display_mountpoint(&root, &mount.mount_point),
                mount.fs_root.display(),
                part.path().display(),
                root.display(),
                part.path().display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(refusal(&root, &problems));
    }

    // Disks in the order of their first file system, `/` first.
    let mut disks: Vec<SysBlock> = Vec::new();
    for role in &roles {
        if let MountRole::OnPartition { disk, .. } = role {
            if !disks.iter().any(|d| d.dev == disk.dev) {
                disks.push(disk.clone());
            }
        }
    }
    check_named_devices(&root, &disks, opts, &raw, &skip, &roles, &visible)?;

    let fstab = read_fstab(&root.join("etc/fstab"));
    let swaps = probe::active_swaps();
    let mut layout = Layout {
        disks: Vec::new(),
        ignored,
    };
    for disk in &disks {
        let table = probe::read_table(&disk.path())?;
        let kernel = probe::kernel_partitions(disk);
        let (size, kernel_sector) = probe::disk_geometry(disk);
        let kind = match table.label.as_str() {
            "gpt" => TableKind::Gpt,
            "dos" => TableKind::Dos,
            other => {
                return Err(Error::NotClonable(format!(
                    "{} has a {other} partition table: ka rebuilds GPT and DOS tables only; clone the disk with `ka serve --image {}`",
                    disk.path().display(),
                    disk.path().display()
                )))
            }
        };
        let mut partitions = Vec::new();
        for entry in &table.partitions {
            let number = entry.number().ok_or_else(|| {
                Error::Invalid(format!(
                    "sfdisk names a partition of {} {}, which ends in no number",
                    disk.path().display(),
                    entry.node
                ))
            })?;
            let device = kernel.get(&number).map(|k| Path::new("/dev").join(&k.name));
            let dev = device.as_deref().and_then(probe::rdev_of);
            let mut partition = PartitionLayout {
                number,
                start: entry.start,
                size: entry.size,
                type_id: entry.type_id.clone(),
                uuid: entry.uuid.clone(),
                name: entry.name.clone(),
                attrs: entry.attrs.clone(),
                bootable: entry.bootable,
                content: Content::Skipped { why: String::new() },
                device: device.clone(),
            };
            partition.content = if skip.contains(&disk.dev) {
                Content::Skipped {
                    why: format!(
                        "its disk {} is skipped (--skip-disk)",
                        disk.path().display()
                    ),
                }
            } else if dev.is_some_and(|d| raw.contains(&d)) {
                Content::Raw {
                    why: "named with --raw".into(),
                }
            } else if partition.is_extended(kind) {
                Content::Skipped {
                    why: "extended partition: only holds the logical partitions, which are listed on their own".into(),
                }
            } else if let Some(&i) = dev.and_then(|d| primary.get(&d)) {
                let MountRole::OnPartition {
                    mount, kind, part, ..
                } = &roles[i]
                else {
                    unreachable!("primary mounts are on partitions");
                };
                let kind = kind.expect("a mount ka rebuilds has a kind");
                Content::Tree(file_system(&root, mount, kind, part, &fstab)?)
            } else {
                let device = device.as_deref().ok_or_else(|| {
                    Error::NotClonable(format!(
                        "partition {number} of {} is in its table but the kernel has no device for it: run `partx -u {}` and try again",
                        disk.path().display(),
                        disk.path().display()
                    ))
                })?;
                unmounted_content(device, &partition, dev, &swaps)?
            };
            partitions.push(partition);
        }
        partitions.sort_by_key(|p| p.number);
        layout.disks.push(DiskLayout {
            device: disk.path().display().to_string(),
            size,
            sector_size: table.sectorsize.unwrap_or(kernel_sector),
            table: kind,
            id: table.id.clone().unwrap_or_default(),
            first_lba: table.firstlba,
            last_lba: table.lastlba,
            partitions,
        });
    }

    let trees = trees_by_mount(&layout, &roles, &primary);
    // A mounted file system whose partition the table on disk no longer
    // lists (repartitioned while in use) would silently be left out.
    for &i in primary.values() {
        let MountRole::OnPartition {
            mount,
            part,
            number,
            disk,
            ..
        } = &roles[i]
        else {
            continue;
        };
        if !trees.contains_key(&mount.id) && !raw.contains(&part.dev) && !skip.contains(&disk.dev) {
            return Err(Error::NotClonable(format!(
                "{} is mounted at {}, but the partition table on {} has no partition {number}: the table was changed while in use; reboot (or run `partx -u {}`) so that the kernel and the disk agree",
                part.path().display(),
                display_mountpoint(&root, &mount.mount_point),
                disk.path().display(),
                disk.path().display()
            )));
        }
    }
    add_bind_excludes(&root, &mut layout, &roles, &binds, &visible, &trees);
    for dir in &opts.exclude {
        add_exclude(&mut layout, dir, &root, &visible, &roles, &trees, &raw)?;
    }
    Ok(layout)
}

/// The mounts the system under `root` is made of, root mount first: mounts
/// stacked on others hide them, and what sits on a hidden mount is hidden
/// with it.
fn visible_under<'a>(mounts: &'a [Mount], root: &Path) -> Result<Vec<&'a Mount>, Error> {
    let top = |mut m: &'a Mount| {
        while let Some(over) = mounts
            .iter()
            .find(|o| o.parent == m.id && o.id != m.id && o.mount_point == m.mount_point)
        {
            m = over;
        }
        m
    };
    let root_mount = mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == root)
        .map(top)
        .ok_or_else(|| {
            Error::NotClonable(format!(
                "--root {} is not a mount point: mount the system's root file system there (or give the directory where it is mounted)",
                root.display()
            ))
        })?;
    let mut visible = vec![root_mount];
    let mut i = 0;
    while i < visible.len() {
        let parent = visible[i];
        for child in mounts.iter().filter(|c| {
            c.parent == parent.id && c.id != parent.id && c.mount_point != parent.mount_point
        }) {
            let child = top(child);
            if child.mount_point.starts_with(root) && !visible.iter().any(|v| v.id == child.id) {
                visible.push(child);
            }
        }
        i += 1;
    }
    // Mount order (the kernel lists mounts as they were made), `/` first.
    let order: HashMap<u64, usize> = mounts.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    visible[1..].sort_by_key(|m| order[&m.id]);
    Ok(visible)
}

/// What a mount is: ignored (virtual, network, image), on a partition ka
/// rebuilds (or sends raw), or a refusal saying what to do instead.
fn classify<'a>(m: &'a Mount, root: &Path, raw: &[DevNum]) -> Result<MountRole<'a>, String> {
    let at = display_mountpoint(root, &m.mount_point);
    if IMAGE_FSTYPES.contains(&m.fstype.as_str()) && m.mount_point != root {
        return Ok(MountRole::Ignored);
    }
    let by_source = || {
        Some(Path::new(&m.source))
            .filter(|s| s.is_absolute())
            .and_then(probe::rdev_of)
            .and_then(probe::block_of)
    };
    let Some(block) = probe::block_of(m.dev).or_else(by_source) else {
        if DISK_FSTYPES_WITHOUT_DEVICE.contains(&m.fstype.as_str()) {
            return Err(format!(
                "{at} is {} ({}): ka rebuilds only ext2, ext3, ext4, xfs and vfat file systems on partitions; clone its disks with `ka serve --image DISK`",
                m.fstype, m.source
            ));
        }
        return Ok(MountRole::Ignored);
    };
    let dev_path = block.path();
    let dev = dev_path.display();
    match probe::kind_of(&block) {
        BlockKind::Partition { number, disk } => {
            let kind = FsKind::from_name(&m.fstype);
            if kind.is_none() && !raw.contains(&block.dev) {
                return Err(format!(
                    "{at} is {} on {dev}: ka rebuilds only ext2, ext3, ext4, xfs and vfat file systems; send the partition as bytes with --raw {dev} (unmount it or mount it read-only first, or the copy may be inconsistent), or clone the disk with `ka serve --image {}`",
                    m.fstype,
                    disk.path().display()
                ));
            }
            Ok(MountRole::OnPartition {
                mount: m,
                kind,
                part: block,
                number,
                disk,
            })
        }
        BlockKind::DeviceMapper { what } => Err(format!(
            "{at} is {} on {dev}, {what}: ka rebuilds only file systems on plain partitions; clone the disks it is built on ({}) with `ka serve --image DISK` from a system that does not run on them",
            m.fstype,
            probe::built_on(&block).join(", ")
        )),
        BlockKind::Raid => Err(format!(
            "{at} is {} on {dev}, an md RAID device: ka rebuilds only file systems on plain partitions; clone the disks it is built on ({}) with `ka serve --image DISK` from a system that does not run on them",
            m.fstype,
            probe::built_on(&block).join(", ")
        )),
        BlockKind::Ram => Ok(MountRole::Ignored),
        BlockKind::Loop { backing } => match backing {
            // The image file is in a tree already: the mount is a view of it.
            Some(file) if file.starts_with(root) => Ok(MountRole::Ignored),
            _ => Err(format!(
                "{at} is {} on {dev}, a loop device over {}, which is not under the root: its files would not be cloned; unmount it, or keep its image file under the root (it is then sent as a file)",
                m.fstype,
                backing.as_deref().map_or("an unknown file".into(), |f| f.display().to_string())
            )),
        },
        BlockKind::WholeDisk => Err(format!(
            "{at} is {} on {dev}, a whole disk without a partition table: ka rebuilds only partitioned disks; clone it with `ka serve --image {dev}` (from a system that does not run on it, or with {at} read-only)",
            m.fstype
        )),
    }
}

fn refusal(root: &Path, problems: &[String]) -> Error {
    let mut msg = format!(
        "cannot clone the system under {} file by file:",
        root.display()
    );
    for p in problems {
        msg.push_str("\n  - ");
        msg.push_str(p);
    }
    Error::NotClonable(msg)
}

/// `--raw` arguments: partitions, by device number.
fn resolve_partitions(paths: &[PathBuf]) -> Result<Vec<DevNum>, Error> {
    paths
        .iter()
        .map(|p| {
            let block = probe::rdev_of(p).and_then(probe::block_of).ok_or_else(|| {
                Error::NotClonable(format!(
                    "--raw {} is not a block device: name a partition such as /dev/sda2",
                    p.display()
                ))
            })?;
            match probe::kind_of(&block) {
                BlockKind::Partition { .. } => Ok(block.dev),
                _ => Err(Error::NotClonable(format!(
                    "--raw {} is not a partition of a disk: name a partition such as /dev/sda2, or clone a whole device with `ka serve --image {}`",
                    p.display(),
                    p.display()
                ))),
            }
        })
        .collect()
}

/// `--skip-disk` arguments: whole disks, by device number.
fn resolve_disks(paths: &[PathBuf]) -> Result<Vec<DevNum>, Error> {
    paths
        .iter()
        .map(|p| {
            let block = probe::rdev_of(p).and_then(probe::block_of).ok_or_else(|| {
                Error::NotClonable(format!(
                    "--skip-disk {} is not a block device: name a disk such as /dev/sdb",
                    p.display()
                ))
            })?;
            match probe::kind_of(&block) {
                BlockKind::Partition { disk, .. } => Err(Error::NotClonable(format!(
                    "--skip-disk {} is a partition: name its disk, {}",
                    p.display(),
                    disk.path().display()
                ))),
                _ => Ok(block.dev),
            }
        })
        .collect()
}

/// Refuses `--raw` and `--skip-disk` arguments that name nothing in the
/// layout, and a skipped disk that holds `/`.
fn check_named_devices(
    root: &Path,
    disks: &[SysBlock],
    opts: &ReadOptions,
    raw: &[DevNum],
    skip: &[DevNum],
    roles: &[MountRole],
    visible: &[&Mount],
) -> Result<(), Error> {
    let names = || {
        disks
            .iter()
            .map(|d| d.path().display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, dev) in skip.iter().enumerate() {
        if !disks.iter().any(|d| d.dev == *dev) {
            return Err(Error::NotClonable(format!(
                "--skip-disk {}: no file system under {} is on it (the system's disks are {})",
                opts.skip_disks[i].display(),
                root.display(),
                names()
            )));
        }
    }
    let root_disk = roles.iter().find_map(|r| match r {
        MountRole::OnPartition { mount, disk, .. } if mount.id == visible[0].id => Some(disk),
        _ => None,
    });
    if let Some(disk) = root_disk.filter(|d| skip.contains(&d.dev)) {
        return Err(Error::NotClonable(format!(
            "--skip-disk {} holds the root file system: a clone without it would not start; skip only other disks",
            disk.path().display()
        )));
    }
    for (dev, path) in raw.iter().zip(&opts.raw) {
        let on_a_disk = probe::block_of(*dev).is_some_and(|b| {
            matches!(probe::kind_of(&b), BlockKind::Partition { disk, .. } if disks.iter().any(|d| d.dev == disk.dev))
        });
        if !on_a_disk {
            return Err(Error::NotClonable(format!(
                "--raw {}: it is not on a disk the system under {} lives on (those are {}); ka clones only those disks",
                path.display(),
                root.display(),
                names()
            )));
        }
    }
    Ok(())
}

/// The content of a partition no file system under the root mounts: swap,
/// or its bytes (a BIOS boot partition, an unmounted ESP, another system's
/// partition). Sending bytes that something writes meanwhile would give an
/// inconsistent copy, so a partition mounted read-write elsewhere is refused.
fn unmounted_content(
    device: &Path,
    p: &PartitionLayout,
    dev: Option<DevNum>,
    swaps: &[DevNum],
) -> Result<Content, Error> {
    let blkid = probe::probe(device)?;
    let fstype = blkid.get("TYPE").map(String::as_str);
    let type_id = p.type_id.to_ascii_lowercase();
    let typed_swap = SWAP_TYPES.contains(&type_id.as_str());
    if fstype == Some("swap")
        || dev.is_some_and(|d| swaps.contains(&d))
        || (fstype.is_none() && typed_swap)
    {
        return Ok(Content::Swap {
            uuid: blkid.get("UUID").cloned(),
            label: blkid.get("LABEL").cloned(),
        });
    }
    let info = blockdev::inspect(device)?;
    blockdev::check_not_mounted_rw(&info).map_err(|e| {
        Error::NotClonable(format!(
            "{e}. It is not under the root, so ka would send its bytes: mount it under the root, unmount it, or leave its disk out with --skip-disk"
        ))
    })?;
    let why = if type_id == BIOS_BOOT {
        "BIOS boot partition: holds the boot loader's core image".to_string()
    } else {
        match fstype {
            Some(t) => format!("{t}, not mounted under the root"),
            None => "no file system ka knows, not mounted under the root".to_string(),
        }
    };
    Ok(Content::Raw { why })
}

/// A mounted file system as the layout describes it.
fn file_system(
    root: &Path,
    mount: &Mount,
    kind: FsKind,
    part: &SysBlock,
    fstab: &BTreeMap<String, String>,
) -> Result<FileSystem, Error> {
    let device = part.path();
    let blkid = probe::probe(&device)?;
    let uuid = blkid.get("UUID").cloned().ok_or_else(|| {
        Error::NotClonable(format!(
            "{} ({kind} at {}) has no UUID blkid can read: give it one (tune2fs -U random, xfs_admin -U generate) so the clone's boot entries can name it",
            device.display(),
            display_mountpoint(root, &mount.mount_point)
        ))
    })?;
    let mountpoint = utf8_mountpoint(root, &mount.mount_point)?;
    let stat = nix::sys::statvfs::statvfs(&mount.mount_point)
        .map_err(|e| Error::io(format!("statvfs {}", mount.mount_point.display()), e.into()))?;
    let used = (stat.blocks() - stat.blocks_free()) as u64 * stat.fragment_size() as u64;
    let options = fstab
        .get(&mountpoint)
        .cloned()
        .unwrap_or_else(|| merged_options(mount));
    Ok(FileSystem {
        kind,
        uuid,
        label: blkid.get("LABEL").cloned(),
        mountpoint,
        options,
        used,
        excludes: Vec::new(),
        make: probe::make_options(kind, &device, &mount.mount_point, &blkid)?,
        mounted_at: Some(mount.mount_point.clone()),
    })
}

/// The mount's own options, then those of its file system it does not
/// repeat (`rw` and `ro` are the mount's to say).
fn merged_options(m: &Mount) -> String {
    let mut opts: Vec<&str> = m.options.split(',').filter(|o| !o.is_empty()).collect();
    for o in m.super_options.split(',') {
        if !o.is_empty() && o != "rw" && o != "ro" && !opts.contains(&o) {
            opts.push(o);
        }
    }
    opts.join(",")
}

/// `fstab`'s options by mount point; a missing or unreadable `fstab` is an
/// empty one (the kernel's options are used then).
fn read_fstab(path: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_spec, file, _type, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let file = String::from_utf8(mounts::unescape(file)).ok()?;
            Some((normalize_mountpoint(&file), opts.to_string()))
        })
        .collect()
}

fn normalize_mountpoint(s: &str) -> String {
    let trimmed = s.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Where the running system sees `path` (mounted under `root`): `/home`.
fn system_path(root: &Path, path: &Path) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    Path::new("/").join(rel)
}

fn display_mountpoint(root: &Path, path: &Path) -> String {
    system_path(root, path).display().to_string()
}

fn utf8_mountpoint(root: &Path, path: &Path) -> Result<String, Error> {
    let p = system_path(root, path);
    p.to_str().map(str::to_string).ok_or_else(|| {
        Error::NotClonable(format!(
            "mount point {} is not UTF-8: the layout names mount points as text; rename it",
            p.display()
        ))
    })
}

/// The visible mount `path` is on: the one with the longest mount point
/// above or at it, other than `except`.
fn containing<'a>(visible: &[&'a Mount], path: &Path, except: Option<u64>) -> Option<&'a Mount> {
    visible
        .iter()
        .filter(|m| Some(m.id) != except && path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .copied()
}

/// Where each tree sits in the layout (disk index, partition index), by
/// the ID of the mount it is sent from.
fn trees_by_mount(
    layout: &Layout,
    roles: &[MountRole],
    primary: &HashMap<DevNum, usize>,
) -> HashMap<u64, (usize, usize)> {
    let mut at = HashMap::new();
    for &i in primary.values() {
        let MountRole::OnPartition {
            mount,
            number,
            disk,
            ..
        } = &roles[i]
        else {
            continue;
        };
        let device = disk.path().display().to_string();
        let Some(d) = layout.disks.iter().position(|l| l.device == device) else {
            continue;
        };
        let p = layout.disks[d]
            .partitions
            .iter()
            .position(|p| p.number == *number && matches!(p.content, Content::Tree(_)));
        if let Some(p) = p {
            at.insert(mount.id, (d, p));
        }
    }
    at
}

/// `rel` as an exclude: relative, in text.
fn exclude_text(rel: &Path) -> Option<String> {
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| rel.to_str().map(str::to_string))
        .flatten()
}

/// Bind mounts of a file system that is sent elsewhere: their mount points
/// are left out of the tree they sit in, or it would carry their files twice.
fn add_bind_excludes(
    root: &Path,
    layout: &mut Layout,
    roles: &[MountRole],
    binds: &[usize],
    visible: &[&Mount],
    trees: &HashMap<u64, (usize, usize)>,
) {
    for &i in binds {
        let MountRole::OnPartition { mount, .. } = &roles[i] else {
            continue;
        };
        let Some(host) = containing(visible, &mount.mount_point, Some(mount.id)) else {
            continue;
        };
        let Some(&(d, p)) = trees.get(&host.id) else {
            continue;
        };
        let rel = mount
            .mount_point
            .strip_prefix(&host.mount_point)
            .unwrap_or(Path::new(""));
        if let (Some(text), Content::Tree(fs)) = (
            exclude_text(rel),
            &mut layout.disks[d].partitions[p].content,
        ) {
            if !fs.excludes.contains(&text) {
                fs.excludes.push(text);
            }
        }
        tracing::debug!(
            "{} is a bind mount: left out of the tree that holds it",
            display_mountpoint(root, &mount.mount_point)
        );
    }
}

/// Records `--exclude DIR` in the tree that holds it.
fn add_exclude(
    layout: &mut Layout,
    dir: &Path,
    root: &Path,
    visible: &[&Mount],
    roles: &[MountRole],
    trees: &HashMap<u64, (usize, usize)>,
    raw: &[DevNum],
) -> Result<(), Error> {
    let meta =
        fs::metadata(dir).map_err(|e| Error::io(format!("--exclude {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::NotClonable(format!(
            "--exclude {} is not a directory: --exclude leaves out a directory's contents; name the directory that holds it",
            dir.display()
        )));
    }
    let path =
        fs::canonicalize(dir).map_err(|e| Error::io(format!("--exclude {}", dir.display()), e))?;
    if !path.starts_with(root) {
        return Err(Error::NotClonable(format!(
            "--exclude {} is not under the root {}: give the directory as this machine sees it, under the root",
            dir.display(),
            root.display()
        )));
    }
    let Some(host) = containing(visible, &path, None) else {
        return Ok(());
    };
    let role = roles.iter().find_map(|r| match r {
        MountRole::OnPartition { mount, part, .. } if mount.id == host.id => Some(part),
        _ => None,
    });
    let Some(part) = role else {
        tracing::info!(
            "--exclude {}: it is on {}, which is not sent anyway",
            dir.display(),
            host.fstype
        );
        return Ok(());
    };
    if raw.contains(&part.dev) {
        return Err(Error::NotClonable(format!(
            "--exclude {}: it is on {}, which is sent as bytes (--raw), so nothing in it can be left out",
            dir.display(),
            part.path().display()
        )));
    }
    let Some(&(d, p)) = trees.get(&host.id) else {
        // A bind mount (left out whole) or a skipped disk: nothing of it is sent.
        return Ok(());
    };
    let rel = path
        .strip_prefix(&host.mount_point)
        .unwrap_or(Path::new(""));
    if rel.as_os_str().is_empty() {
        return Err(Error::NotClonable(format!(
            "--exclude {}: a file system is mounted there ({} on {}); exclude directories inside it, or its disk with --skip-disk",
            dir.display(),
            host.fstype,
            part.path().display()
        )));
    }
    let text = exclude_text(rel).ok_or_else(|| {
        Error::NotClonable(format!(
            "--exclude {} is not UTF-8: the layout names excludes as text",
            dir.display()
        ))
    })?;
    if let Content::Tree(fs) = &mut layout.disks[d].partitions[p].content {
        if !fs.excludes.contains(&text) {
            fs.excludes.push(text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(id: u64, parent: u64, point: &str, fstype: &str) -> Mount {
        Mount {
            id,
            parent,
            dev: (0, id),
            fs_root: PathBuf::from("/"),
            mount_point: PathBuf::from(point),
            options: "rw,relatime".into(),
            fstype: fstype.into(),
            source: "src".into(),
            super_options: "rw,inode64".into(),
        }
    }

    #[test]
    fn stacked_mounts_hide_what_they_cover_and_its_submounts() {
        let mounts = vec![
            mount(1, 0, "/", "ext4"),
            mount(10, 1, "/mnt/sys", "ext4"),
            mount(11, 10, "/mnt/sys/home", "xfs"),
            // Mounted over /mnt/sys/home: hides 11.
            mount(12, 11, "/mnt/sys/home", "ext4"),
            mount(13, 10, "/mnt/sys/boot", "ext4"),
            // Mounted over /mnt/sys/boot… then a submount of the hidden one.
            mount(14, 13, "/mnt/sys/boot", "ext2"),
            mount(15, 13, "/mnt/sys/boot/efi", "vfat"),
            mount(16, 1, "/mnt/other", "ext4"),
        ];
        let visible = visible_under(&mounts, Path::new("/mnt/sys")).unwrap();
        let ids: Vec<u64> = visible.iter().map(|m| m.id).collect();
        assert_eq!(ids, [10, 12, 14]);
        let err = visible_under(&mounts, Path::new("/mnt/nothing")).unwrap_err();
        assert!(err.to_string().contains("not a mount point"), "{err}");
    }

    #[test]
    fn fstab_options_by_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fstab");
        fs::write(
            &path,
            "# comment\nUUID=1 / ext4 errors=remount-ro 0 1\nUUID=2 /home/ xfs defaults,noatime 0 2\n\
             UUID=3 /mnt/a\\040b ext4 ro 0 0\nUUID=4 none swap sw 0 0\nbroken\n",
        )
        .unwrap();
        let fstab = read_fstab(&path);
        assert_eq!(fstab["/"], "errors=remount-ro");
        assert_eq!(fstab["/home"], "defaults,noatime");
        assert_eq!(fstab["/mnt/a b"], "ro");
        assert_eq!(read_fstab(&dir.path().join("missing")).len(), 0);
    }

    #[test]
    fn kernel_options_merge_mount_and_file_system() {
        let m = mount(1, 0, "/", "xfs");
        assert_eq!(merged_options(&m), "rw,relatime,inode64");
    }

    #[test]
    fn paths_as_the_running_system_sees_them() {
        let root = Path::new("/mnt/sys");
        assert_eq!(display_mountpoint(root, Path::new("/mnt/sys")), "/");
        assert_eq!(
            display_mountpoint(root, Path::new("/mnt/sys/home")),
            "/home"
        );
        assert_eq!(
            display_mountpoint(Path::new("/"), Path::new("/boot/efi")),
            "/boot/efi"
        );
        assert_eq!(
            exclude_text(Path::new("var/cache")).as_deref(),
            Some("var/cache")
        );
        assert_eq!(exclude_text(Path::new("../x")), None);
    }
}
