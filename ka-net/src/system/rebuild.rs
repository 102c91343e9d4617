//! The node's side of a system clone: disks rebuilt from the
//! [system stream](super::stream) as it arrives.
//!
//! The plan comes first. Before anything is written, every disk is planned
//! against its target and a disk too small for the data is refused with
//! the sizes. Then each target gets the source's partition table (types and
//! GUIDs kept, one partition grown or shrunk to the disk), each file system
//! is made with the source's type, UUID and label (so fstab and boot loader
//! configurations stay valid) and mounted where the running system mounts
//! it, under a private directory; swap is made anew. Each tree is fed to
//! `tar -x` as its chunks arrive and raw partitions are written in place, so
//! nothing is spooled whole. At the end, [`Rebuilder::finish`] installs the
//! boot loader from the clone itself ([`super::bootloader`]), runs the
//! post-command chrooted in it and unmounts everything.
//!
//! Every failure names its step and carries the tool's own words; whatever
//! was mounted is unmounted when the rebuilder is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};

use super::disk::{self, LayoutFile};
use super::layout::{Content, FsKind, Layout};
use super::stream::Event;
use super::{bootloader, Plan};
use crate::image::blockdev;
use crate::image::process::{widen_pipe, Supervised};
use crate::image::sinks::{FileSink, ImageSink};
use crate::image::{is_zero, BLOCK};
use crate::Error;

/// What a node rebuilds onto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildOptions {
    /// The node's disks, in the order of the source's.
    pub disks: Vec<PathBuf>,
    /// A private directory to mount the new system under (created, and
    /// removed once empty).
    pub workdir: PathBuf,
}

/// One partition of the plan as it stands on this node.
#[derive(Debug, Clone)]
struct Placed {
    /// Its device on this node.
    device: PathBuf,
    /// What the source had there.
    content: Content,
}

enum Current {
    Idle,
    Tree {
        tar: Supervised,
        stdin: ChildStdin,
        mountpoint: String,
    },
    Raw {
        sink: FileSink,
        device: PathBuf,
    },
}

/// Rebuilds a node's disks from a system stream's events (see the module
/// docs).
pub struct Rebuilder {
    opts: RebuildOptions,
    plan: Option<Plan>,
    placed: Vec<Placed>,
    /// Where the new root is mounted.
    root: PathBuf,
    /// Mounted directories, in mount order.
    mounts: Vec<PathBuf>,
    current: Current,
    /// What was done, for the node's log and report.
    done: Vec<String>,
    /// Held while this rebuild runs: it tells a later rebuild that these
    /// mounts are not left over.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Rebuilder {
    /// A rebuilder for `opts`; nothing is touched before the plan arrives.
    pub fn new(opts: RebuildOptions) -> Self {
        let root = opts.workdir.join("root");
        let _lock = hold_lock(&opts.workdir);
        Rebuilder {
            opts,
            plan: None,
            placed: Vec::new(),
            root,
            mounts: Vec::new(),
            current: Current::Idle,
            done: Vec::new(),
            _lock,
        }
    }

    /// Takes the stream's next event.
    pub fn on_event(&mut self, event: Event<'_>) -> Result<(), Error> {
        match event {
            Event::Plan(json) => self.on_plan(&json),
            Event::TreeStart { index } => self.start_tree(index),
            Event::TreeData(bytes) => match &mut self.current {
                Current::Tree {
                    stdin, mountpoint, ..
                } => {
                    if let Err(e) = stdin.write_all(bytes) {
                        // tar stopped reading: its exit status says why.
                        let mountpoint = mountpoint.clone();
                        return Err(self.end_tree().err().unwrap_or_else(|| {
                            step_error(&format!("unpacking {mountpoint}"), e.to_string())
                        }));
                    }
                    Ok(())
                }
                _ => Err(out_of_place("tree bytes outside a tree")),
            },
            Event::TreeEnd => self.end_tree(),
            Event::RawStart { index, len } => self.start_raw(index, len),
            Event::RawData { offset, data } => self.write_raw(offset, data),
            Event::RawEnd => self.end_raw(),
            Event::End => {
                if self.plan.is_none() {
                    return Err(out_of_place("the stream ended without a plan"));
                }
                Ok(())
            }
        }
    }

    fn on_plan(&mut self, json: &[u8]) -> Result<(), Error> {
        if self.plan.is_some() {
            return Err(out_of_place("a second plan"));
        }
        let plan: Plan = serde_json::from_slice(json).map_err(|e| {
            Error::Invalid(format!(
                "the system plan cannot be read ({e}): is this node's ka the same version as the source's?"
            ))
        })?;
        let layout_file = plan
            .layout_file
            .as_deref()
            .map(LayoutFile::parse)
            .transpose()?;
        if let Some(lf) = &layout_file {
            lf.check(&plan.layout)?;
        }
        self.check_disks(&plan.layout)?;
        self.clear_leftovers();
        // Plan every disk before writing any: a refusal writes nothing.
        let mut plans = Vec::new();
        for (i, (src, target)) in plan.layout.disks.iter().zip(&self.opts.disks).enumerate() {
            let info = blockdev::inspect(target).map_err(|e| match e {
                blockdev::BlockDeviceError::NotABlockDevice(p) => Error::Invalid(format!(
                    "{} is not a block device: a system clone rebuilds whole disks (give --system /dev/sdX)",
                    p.display()
                )),
                e => e.into(),
            })?;
            let p = disk::plan_disk(
                src,
                info.size,
                info.logical_sector_size,
                layout_file.as_ref(),
                i,
            )
            .map_err(|e| step_error(&format!("planning {}", target.display()), e.to_string()))?;
            plans.push(p);
        }
        for ((src, target), p) in plan.layout.disks.iter().zip(&self.opts.disks).zip(&plans) {
            let devices = disk::write_table(target, src, p).map_err(|e| {
                step_error(&format!("partitioning {}", target.display()), e.to_string())
            })?;
            self.done.push(format!(
                "partitioned {} ({:?}, {} partitions)",
                target.display(),
                src.table,
                devices.len()
            ));
            for (part, device) in src.partitions.iter().zip(devices) {
                self.placed.push(Placed {
                    device,
                    content: part.content.clone(),
                });
            }
        }
        for p in &self.placed {
            match &p.content {
                Content::Tree(fs) => {
                    disk::make_filesystem(&p.device, fs).map_err(|e| {
                        step_error(
                            &format!(
                                "making {} on {} for {}",
                                fs.kind,
                                p.device.display(),
                                fs.mountpoint
                            ),
                            e.to_string(),
                        )
                    })?;
                    self.done.push(format!(
                        "made {} {} on {} for {}",
                        fs.kind,
                        fs.uuid,
                        p.device.display(),
                        fs.mountpoint
                    ));
                }
                Content::Swap { uuid, label } => {
                    disk::make_swap(&p.device, uuid.as_deref(), label.as_deref()).map_err(|e| {
                        step_error(
                            &format!("making swap on {}", p.device.display()),
                            e.to_string(),
                        )
                    })?;
                    self.done
                        .push(format!("made swap on {}", p.device.display()));
                }
                Content::Raw { .. } | Content::Skipped { .. } => {}
            }
        }
        self.plan = Some(plan);
        Ok(())
    }

    /// Unmounts what a `ka join --system` that died (killed, or its machine
    /// reset without a reboot) left mounted. Each rebuild holds a lock on a
    /// file beside its private directory for as long as it runs; a
    /// directory whose lock can be taken belongs to nobody (process IDs are
    /// reused too soon to tell). Otherwise the disks would stay busy and a
    /// restarted node could not rebuild them.
    fn clear_leftovers(&mut self) {
        let Some(parent) = self.opts.workdir.parent() else {
            return;
        };
        let Ok(mounts) = crate::image::mounts::read_mounts() else {
            return;
        };
        let mut owners: Vec<PathBuf> = Vec::new();
        let mut stale: Vec<PathBuf> = Vec::new();
        for point in mounts.into_iter().map(|m| m.mount_point) {
            let Ok(rest) = point.strip_prefix(parent) else {
                continue;
            };
            let Some(dir) = rest.components().next() else {
                continue;
            };
            let dir = parent.join(dir);
            if dir == self.opts.workdir
                || !dir
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(WORKDIR_PREFIX))
            {
                continue;
            }
            if owners.contains(&dir) || owner_gone(&dir) {
                if !owners.contains(&dir) {
                    owners.push(dir);
                }
                stale.push(point);
            }
        }
        // Innermost first.
        stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in &stale {
            unmount_patiently(dir);
        }
        for dir in &owners {
            let _ = std::fs::remove_dir(dir.join("root"));
            let _ = std::fs::remove_dir(dir);
            let _ = std::fs::remove_file(lock_path(dir));
        }
        if !stale.is_empty() {
            self.done.push(format!(
                "unmounted {} file systems an earlier ka join left mounted",
                stale.len()
            ));
        }
    }

    fn check_disks(&self, layout: &Layout) -> Result<(), Error> {
        if self.opts.disks.len() < layout.disks.len() {
            let theirs: Vec<&str> = layout.disks.iter().map(|d| d.device.as_str()).collect();
            return Err(Error::Invalid(format!(
                "the source's system is on {} disks ({}) but this node was given {}: \
                 name one target disk per source disk with --system DISK,DISK…",
                layout.disks.len(),
                theirs.join(", "),
                self.opts.disks.len()
            )));
        }
        Ok(())
    }

    fn placed(&self, index: u32) -> Result<&Placed, Error> {
        self.placed
            .get(index as usize)
            .ok_or_else(|| out_of_place("a section for a partition the plan does not have"))
    }

    fn start_tree(&mut self, index: u32) -> Result<(), Error> {
        let p = self.placed(index)?.clone();
        let Content::Tree(fs) = &p.content else {
            return Err(out_of_place("a tree for a partition that holds none"));
        };
        let dir = self.mount_point(&fs.mountpoint);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("making {}", dir.display()), e))?;
        let mut mount = Command::new("mount");
        mount.arg("-t").arg(fs.kind.to_string());
        if fs.kind == FsKind::Xfs {
            // The source's own file system, with the same UUID, may be
            // mounted on the same machine (a test, or a node cloning itself).
            mount.args(["-o", "nouuid"]);
        }
        mount.arg(&p.device).arg(&dir);
        run(
            mount,
            &format!("mounting {} at {}", p.device.display(), fs.mountpoint),
        )?;
        self.mounts.push(dir.clone());
        let mut tar = Command::new("tar");
        tar.args(TAR_EXTRACT)
            .arg("-C")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut tar = Supervised::spawn(tar, format!("tar -x into {}", fs.mountpoint))?;
        let stdin = tar.child_mut().stdin.take().expect("stdin is piped");
        widen_pipe(&stdin);
        self.current = Current::Tree {
            tar,
            stdin,
            mountpoint: fs.mountpoint.clone(),
        };
        Ok(())
    }

    fn end_tree(&mut self) -> Result<(), Error> {
        let Current::Tree {
            mut tar,
            stdin,
            mountpoint,
        } = std::mem::replace(&mut self.current, Current::Idle)
        else {
            return Err(out_of_place("a tree's end outside a tree"));
        };
        drop(stdin);
        tar.wait_success()
            .map_err(|e| step_error(&format!("unpacking {mountpoint}"), e.to_string()))?;
        self.done.push(format!("unpacked {mountpoint}"));
        Ok(())
    }

    fn start_raw(&mut self, index: u32, len: u64) -> Result<(), Error> {
        let p = self.placed(index)?.clone();
        let sink = FileSink::open(&p.device, Some(len)).map_err(|e| {
            step_error(
                &format!("opening {} for its raw copy", p.device.display()),
                e.to_string(),
            )
        })?;
        self.current = Current::Raw {
            sink,
            device: p.device,
        };
        Ok(())
    }

    fn write_raw(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let Current::Raw { sink, device } = &mut self.current else {
            return Err(out_of_place("raw bytes outside a raw partition"));
        };
        // Zero blocks are zeroed by the device (or skipped where it reads
        // zeros anyway), not written byte by byte.
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let n = ((BLOCK - pos % BLOCK) as usize).min(data.len() - at);
            let piece = &data[at..at + n];
            let r = if is_zero(piece) {
                sink.write_zero(pos, n as u64)
            } else {
                sink.write_data(pos, piece)
            };
            r.map_err(|e| step_error(&format!("writing {}", device.display()), e.to_string()))?;
            at += n;
        }
        Ok(())
    }

    fn end_raw(&mut self) -> Result<(), Error> {
        let Current::Raw { mut sink, device } = std::mem::replace(&mut self.current, Current::Idle)
        else {
            return Err(out_of_place("a raw partition's end outside one"));
        };
        let len = sink.position();
        sink.finish(len)
            .map_err(|e| step_error(&format!("writing {}", device.display()), e.to_string()))?;
        self.done
            .push(format!("wrote {} raw ({len} bytes)", device.display()));
        Ok(())
    }

    /// After the whole stream: the boot loader from the clone, the
    /// post-command chrooted in it, then everything unmounted. Returns the
    /// steps done.
    pub fn finish(&mut self) -> Result<Vec<String>, Error> {
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| out_of_place("the stream ended without a plan"))?;
        if !matches!(self.current, Current::Idle) {
            return Err(out_of_place("the stream ended inside a section"));
        }
        if has_root(&plan.layout) {
            let disks: Vec<PathBuf> = self.opts.disks[..plan.layout.disks.len()].to_vec();
            let _links = bootloader::UuidLinks::make(Path::new("/dev"), &self.uuids())?;
            let steps = bootloader::install(&self.root, &plan.layout, &disks)?;
            self.done.extend(steps);
            if let Some(cmd) = &plan.post_command {
                bootloader::in_chroot(&self.root, cmd)
                    .map_err(|e| step_error("running the post-command", e.to_string()))?;
                self.done.push(format!("ran the post-command `{cmd}`"));
            }
        }
        self.unmount_all()?;
        Ok(self.done.clone())
    }

    /// Each file system's and swap's UUID with its device on this node.
    fn uuids(&self) -> Vec<(String, PathBuf)> {
        self.placed
            .iter()
            .filter_map(|p| match &p.content {
                Content::Tree(fs) => Some((fs.uuid.clone(), p.device.clone())),
                Content::Swap {
                    uuid: Some(uuid), ..
                } => Some((uuid.clone(), p.device.clone())),
                _ => None,
            })
            .collect()
    }

    /// Where the running system's `mountpoint` is mounted here.
    fn mount_point(&self, mountpoint: &str) -> PathBuf {
        self.root.join(mountpoint.trim_start_matches('/'))
    }

    fn unmount_all(&mut self) -> Result<(), Error> {
        let mut first_error = None;
        while let Some(dir) = self.mounts.pop() {
            let mut c = Command::new("umount");
            c.arg(&dir);
            if let Err(e) = run(c, &format!("unmounting {}", dir.display())) {
                // Lazily, so a busy mount does not stay behind for ever.
                let _ = Command::new("umount").arg("-l").arg(&dir).status();
                first_error.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_dir(&self.opts.workdir);
        if self.mounts.is_empty() {
            let _ = std::fs::remove_file(lock_path(&self.opts.workdir));
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Rebuilder {
    fn drop(&mut self) {
        self.current = Current::Idle;
        let _ = self.unmount_all();
    }
}

/// Unmounts `dir`, giving what still writes there (the `tar` of a killed
/// `ka join`, which stops at the end of its input) a few seconds to finish:
/// a file system detached lazily would go on writing to a disk that is
/// being repartitioned.
fn unmount_patiently(dir: &Path) {
    for _ in 0..50 {
        if Command::new("umount")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}

/// The lock file of a rebuild's private directory `dir`.
fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the lock of the rebuild in `workdir`, held while the returned
/// file lives.
fn hold_lock(workdir: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::File::create(lock_path(workdir)).ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

/// Whether the rebuild that made `dir` is gone: its lock is free (or was
/// never taken).
fn owner_gone(dir: &Path) -> bool {
    match std::fs::File::open(lock_path(dir)) {
        Err(_) => true,
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
    }
}

/// How a rebuild's private directory is named, followed by the PID of the
/// `ka join` that owns it: `<tmp>/ka-system-<pid>`.
pub const WORKDIR_PREFIX: &str = "ka-system-";

/// GNU tar's arguments to unpack a tree as it was: modes, numeric owners,
/// ACLs and every xattr namespace (SELinux labels, file capabilities).
const TAR_EXTRACT: &[&str] = &[
    "--extract",
    "--file=-",
    "--preserve-permissions",
    "--same-owner",
    "--numeric-owner",
    "--acls",
    "--xattrs",
    "--xattrs-include=*",
];

/// Runs a command to success; its failure names `what` and quotes it.
pub(super) fn run(mut c: Command, what: &str) -> Result<(), Error> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| step_error(what, format!("cannot start {:?}: {e}", c.get_program())))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(step_error(what, format!("{} ({})", text, out.status)))
}

fn step_error(step: &str, why: String) -> Error {
    Error::Invalid(format!("{step}: {why}"))
}

fn out_of_place(what: &str) -> Error {
    Error::Invalid(format!("the system stream is out of order: {what}"))
}

/// Whether the layout holds a root file system (a system to boot), not only
/// data file systems.
fn has_root(layout: &Layout) -> bool {
    layout
        .disks
        .iter()
        .flat_map(|d| &d.partitions)
        .any(|p| matches!(&p.content, Content::Tree(fs) if fs.mountpoint == "/"))
}
