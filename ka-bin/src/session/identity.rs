//! The post-clone identity step: give a freshly cloned disk its own node's
//! host name and network settings, so no two clones share an identity.
//!
//! It runs on the node after its copy is verified (the digest covers the
//! image exactly as the source sent it; the identity is a deliberate change
//! made afterwards, and listed on the console). `ka join --identity …`
//! runs it; the netboot image passes the values from the kernel command
//! line, which `ka tftp` renders per node from the inventory.
//!
//! What it writes into the cloned root file system (found by partition
//! number or by looking for `etc/`):
//!
//! | file | what |
//! |---|---|
//! | `etc/hostname` | the host name |
//! | `etc/hosts` | one line for the host (its IP, or 127.0.1.1 without one); old lines for 127.0.1.1 or that IP are dropped |
//! | `etc/machine-id` | emptied: systemd makes a new one at first boot (a copied id would be shared) |
//! | `etc/ka/identity` | every value, shell syntax, for an image's own scripts |
//! | `etc/systemd/network/10-ka.network` | static address for the boot NIC (by MAC), if the image has systemd |
//! | `etc/NetworkManager/system-connections/ka.nmconnection` | the same, if the image has NetworkManager |
//! | `etc/resolv.conf` | the DNS servers, unless it is a symbolic link (then the system manages it) |
//!
//! Symbolic links inside the cloned root are never followed: they point
//! into the node's own tree, and followed from here would land on the
//! machine running ka.

use std::fmt;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::boot::Mac;

/// One machine's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Host name (one DNS label).
    pub hostname: String,
    /// DNS domain, for the fully qualified name.
    pub domain: Option<String>,
    /// Static IPv4 address and prefix length.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// The NIC the address belongs to.
    pub mac: Option<Mac>,
}

/// Whether `name` is a valid host name (RFC 1123 label).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `10.0.0.5/24`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` needs a prefix length, like 10.0.0.5/24"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("`{prefix}` is not a prefix length from 1 to 32"))?;
    Ok((ip, prefix))
}

fn ipv4(key: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{key}: `{s}` is not an IPv4 address"))
}

impl Identity {
    /// Builds an identity from `key=value` items (`hostname=`, `domain=`,
    /// `ip=ADDR/PREFIX`, `gateway=`, `dns=` (repeatable), `mac=`), as
    /// `ka join --identity` takes them.
    pub fn from_items<S: AsRef<str>>(items: &[S]) -> Result<Identity, String> {
        let mut id = Identity::default();
        for item in items {
            let item = item.as_ref();
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("identity item `{item}` is not KEY=VALUE"))?;
            match k {
                "hostname" => id.hostname = v.to_string(),
                "domain" => id.domain = Some(v.to_string()).filter(|d| !d.is_empty()),
                "ip" => id.ip = Some(parse_cidr(v)?),
                "gateway" => id.gateway = Some(ipv4(k, v)?),
                "dns" => id.dns.push(ipv4(k, v)?),
                "mac" => id.mac = Some(v.parse().map_err(|e| format!("mac: {e}"))?),
                _ => {
                    return Err(format!(
                        "unknown identity item `{k}`: use hostname, domain, ip, gateway, dns, mac"
                    ))
                }
            }
        }
        id.check()?;
        Ok(id)
    }

    /// The same values as `key=value` items (the inverse of [`Identity::from_items`]).
    pub fn to_items(&self) -> Vec<String> {
        let mut out = vec![format!("hostname={}", self.hostname)];
        if let Some(d) = &self.domain {
            out.push(format!("domain={d}"));
        }
        if let Some((ip, p)) = self.ip {
            out.push(format!("ip={ip}/{p}"));
        }
        if let Some(g) = self.gateway {
            out.push(format!("gateway={g}"));
        }
        out.extend(self.dns.iter().map(|d| format!("dns={d}")));
        if let Some(m) = self.mac {
            out.push(format!("mac={m}"));
        }
        out
    }

    /// Checks the values make sense together.
    pub fn check(&self) -> Result<(), String> {
        if self.hostname.is_empty() {
            return Err("the identity needs a hostname".into());
        }
        if !valid_hostname(&self.hostname) {
            return Err(format!(
                "`{}` is not a valid host name: letters, digits and `-`, at most 63, not starting or ending with `-`",
                self.hostname
            ));
        }
        if let Some(d) = &self.domain {
            if !d.split('.').all(valid_hostname) {
                return Err(format!("`{d}` is not a valid DNS domain"));
            }
        }
        if self.gateway.is_some() && self.ip.is_none() {
            return Err("a gateway without an ip: give ip=ADDR/PREFIX too".into());
        }
        Ok(())
    }

    fn fqdn(&self) -> String {
        match &self.domain {
            Some(d) => format!("{}.{d}", self.hostname),
            None => self.hostname.clone(),
        }
    }
}

/// Which partition of the target holds the root file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootPartition {
    /// The first partition (or the whole device, if it has none) that has an `etc/` directory.
    #[default]
    Auto,
    /// The target itself is the file system.
    Whole,
    /// Partition number N (1 = the first).
    Number(u32),
}

impl FromStr for RootPartition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RootPartition::Auto),
            "whole" | "0" => Ok(RootPartition::Whole),
            n => n
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .map(RootPartition::Number)
                .ok_or_else(|| {
                    format!("`{s}` is not a partition: use auto, whole, or a number from 1")
                }),
        }
    }
}

impl fmt::Display for RootPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootPartition::Auto => f.write_str("auto"),
            RootPartition::Whole => f.write_str("whole"),
            RootPartition::Number(n) => write!(f, "{n}"),
        }
    }
}

/// What the identity step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The device whose file system was changed.
    pub device: PathBuf,
    /// One line per file: what was written or why it was left alone.
    pub changes: Vec<String>,
}

/// Why the identity could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The target cannot carry an identity.
    #[error("{0}")]
    Target(String),
    /// No partition held a root file system.
    #[error("no root file system on {target}: {tried}; pass --root-partition N (ka.root=N)")]
    NoRoot {
        /// The target.
        target: PathBuf,
        /// What was tried.
        tried: String,
    },
    /// Writing the files failed.
    #[error("writing the identity into {device}: {source}")]
    Write {
        /// The device mounted.
        device: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Applies `id` to the root file system on `target` (a block device).
pub fn apply(target: &Path, root: RootPartition, id: &Identity) -> Result<Applied, IdentityError> {
    let meta = fs::metadata(target)
        .map_err(|e| IdentityError::Target(format!("{}: {e}", target.display())))?;
    if !meta.file_type().is_block_device() {
        return Err(IdentityError::Target(format!(
            "{} is not a block device: the identity step mounts the clone, so clone onto a disk, or attach an image file first (losetup -P --show FILE) and clone onto the loop device",
            target.display()
        )));
    }
    let candidates = candidates(target, root)?;
    let mut tried = Vec::new();
    for dev in candidates {
        let mount = match Mounted::any(&dev) {
            Ok(m) => m,
            Err(e) => {
                tried.push(format!("{} does not mount ({e})", dev.display()));
                continue;
            }
        };
        let etc = mount.dir().join("etc");
        let is_root = fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir());
        if !is_root {
            tried.push(format!("{} has no etc/", dev.display()));
            if root == RootPartition::Auto {
                continue;
            }
            return Err(IdentityError::NoRoot {
                target: target.to_path_buf(),
                tried: tried.join("; "),
            });
        }
        let changes = write_identity(mount.dir(), id).map_err(|source| IdentityError::Write {
            device: dev.clone(),
            source,
        })?;
        mount.unmount().map_err(|source| IdentityError::Write {
            device: dev.clone(),
            source,
        })?;
        return Ok(Applied {
            device: dev,
            changes,
        });
    }
    Err(IdentityError::NoRoot {
        target: target.to_path_buf(),
        tried: if tried.is_empty() {
            "it has no partitions".into()
        } else {
            tried.join("; ")
        },
    })
}

/// The devices to look at for the root file system, in order.
fn candidates(target: &Path, root: RootPartition) -> Result<Vec<PathBuf>, IdentityError> {
    if root == RootPartition::Whole {
        return Ok(vec![target.to_path_buf()]);
    }
    reread_partitions(target)?;
    let mut parts = wait_for_partitions(target, Duration::from_secs(10))?;
    if parts.is_empty() {
        // Some block drivers ignore a re-read (loop devices on some
        // kernels); util-linux's partx adds the partitions one by one
        // (BLKPG) where it is installed. Without partitions this changes
        // nothing, and the whole device is tried.
        let added = std::process::Command::new("partx")
            .arg("--add")
            .arg(target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if added {
            parts = wait_for_partitions(target, Duration::from_secs(10))?;
        }
    }
    match root {
        RootPartition::Number(n) => parts
            .into_iter()
            .find(|(num, _)| *num == n)
            .map(|(_, dev)| vec![dev])
            .ok_or_else(|| IdentityError::NoRoot {
                target: target.to_path_buf(),
                tried: format!("it has no partition {n}"),
            }),
        _ if parts.is_empty() => Ok(vec![target.to_path_buf()]),
        _ => Ok(parts.into_iter().map(|(_, dev)| dev).collect()),
    }
}

mod ioctl {
    // BLKRRPART, <linux/fs.h>: re-read the partition table.
    nix::ioctl_none!(blkrrpart, 0x12, 95);
}

/// Asks the kernel to re-read the partition table the clone just wrote.
/// Retried while busy: udev or the writer may still hold the device briefly.
fn reread_partitions(target: &Path) -> Result<(), IdentityError> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(target)
        .map_err(|e| IdentityError::Target(format!("opening {}: {e}", target.display())))?;
    let mut last = None;
    for _ in 0..20 {
        // SAFETY: BLKRRPART takes no argument; the descriptor is open.
        match unsafe { ioctl::blkrrpart(file.as_raw_fd()) } {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                last = Some(nix::errno::Errno::EBUSY);
                std::thread::sleep(Duration::from_millis(250));
            }
            // Devices without partition support (a partition itself, some
            // virtual disks) say EINVAL: there is nothing to re-read.
            Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(e) => {
                return Err(IdentityError::Target(format!(
                    "re-reading the partition table of {}: {e}",
                    target.display()
                )))
            }
        }
    }
    Err(IdentityError::Target(format!(
        "re-reading the partition table of {}: {} (is a partition of it mounted?)",
        target.display(),
        last.map_or("failed".to_string(), |e| e.to_string())
    )))
}

/// The partitions of `target` as (number, device node), from sysfs, once
/// their device nodes exist (devtmpfs or udev create them after a re-read).
fn wait_for_partitions(
    target: &Path,
    wait: Duration,
) -> Result<Vec<(u32, PathBuf)>, IdentityError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(target)
        .map_err(|e| IdentityError::Target(format!("{}: {e}", target.display())))?
        .rdev();
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ));
    let deadline = Instant::now() + wait;
    loop {
        let mut parts = Vec::new();
        let entries = fs::read_dir(&sys)
            .map_err(|e| IdentityError::Target(format!("reading {}: {e}", sys.display())))?;
        for entry in entries.flatten() {
            let Ok(num) = fs::read_to_string(entry.path().join("partition")) else {
                continue;
            };
            let Ok(num) = num.trim().parse::<u32>() else {
                continue;
            };
            parts.push((num, Path::new("/dev").join(entry.file_name())));
        }
        parts.sort();
        if parts.iter().all(|(_, dev)| dev.exists()) || Instant::now() >= deadline {
            return Ok(parts.into_iter().filter(|(_, dev)| dev.exists()).collect());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A file system mounted on a temporary directory, unmounted when dropped.
struct Mounted {
    dir: Option<tempfile::TempDir>,
}

impl Mounted {
    /// Mounts `dev` with the first block file system type the kernel knows
    /// that accepts it.
    fn any(dev: &Path) -> io::Result<Mounted> {
        let types = fs::read_to_string("/proc/filesystems")?;
        let mut types: Vec<&str> = types
            .lines()
            .filter(|l| !l.starts_with("nodev"))
            .map(str::trim)
            .collect();
        // Root file systems first: the ext4 driver also answers to ext3 and
        // ext2, and logs a complaint for each one tried before ext4.
        types.sort_by_key(|t| !["ext4", "xfs", "btrfs"].contains(t));
        let dir = tempfile::Builder::new().prefix("ka-identity-").tempdir()?;
        let mut last = io::Error::other("the kernel knows no block file systems");
        for fstype in types {
            match nix::mount::mount(
                Some(dev),
                dir.path(),
                Some(fstype),
                nix::mount::MsFlags::MS_NOATIME,
                None::<&str>,
            ) {
                Ok(()) => return Ok(Mounted { dir: Some(dir) }),
                Err(e) => last = io::Error::from(e),
            }
        }
        Err(last)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("mounted").path()
    }

    /// Unmounts, reporting failure (dropping unmounts too, lazily, silently).
    fn unmount(mut self) -> io::Result<()> {
        let dir = self.dir.take().expect("mounted");
        nix::unistd::sync();
        nix::mount::umount(dir.path()).map_err(io::Error::from)?;
        dir.close()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The identity step of one `ka join`: what to write, and where.
#[derive(Debug, Clone)]
pub struct Step {
    identity: Identity,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    /// A disk or partition (`--target`), mounted to write.
    Device(PathBuf, RootPartition),
    /// A directory the image was untarred into (`--untar`): the root itself.
    Directory(PathBuf),
}

impl Step {
    /// The step that writes `identity` into the copy on the block device
    /// `target` (its root file system found as `root` says) or into the
    /// directory `untar`; checked before anything is cloned.
    pub fn new(
        identity: Identity,
        root: RootPartition,
        target: Option<&Path>,
        untar: Option<&Path>,
    ) -> Result<Step, String> {
        let place = match (target, untar) {
            (Some(t), _) => {
                let is_block = fs::metadata(t).is_ok_and(|m| m.file_type().is_block_device());
                if !is_block {
                    return Err(format!(
                        "--identity needs a block device as --target, and {} is not one: attach an image file first (losetup -P --show FILE) and clone onto the loop device",
                        t.display()
                    ));
                }
                Place::Device(t.to_path_buf(), root)
            }
            (None, Some(d)) => Place::Directory(d.to_path_buf()),
            (None, None) => {
                return Err("--identity needs --target DEVICE or --untar DIR: a command's input has no file system to write it into".into())
            }
        };
        Ok(Step { identity, place })
    }

    /// Applies the identity.
    pub fn run(&self) -> Result<Applied, IdentityError> {
        match &self.place {
            Place::Device(dev, root) => apply(dev, *root, &self.identity),
            Place::Directory(dir) => {
                let changes =
                    write_identity(dir, &self.identity).map_err(|source| IdentityError::Write {
                        device: dir.clone(),
                        source,
                    })?;
                Ok(Applied {
                    device: dir.clone(),
                    changes,
                })
            }
        }
    }

    /// Applies the identity and says what happened on standard error (and
    /// as a JSON line on standard output with `json`); whether it worked.
    pub fn run_and_report(&self, node: &str, json: bool) -> bool {
        match self.run() {
            Ok(applied) => {
                for c in &applied.changes {
                    crate::errln!("ka: {node}: identity: {c} on {}", applied.device.display());
                }
                crate::errln!(
                    "ka: {node}: identity applied: host name {}",
                    self.identity.hostname
                );
                if json {
                    crate::outln!(
                        "{{\"event\":\"identity\",\"ok\":true,\"hostname\":{:?},\"device\":{:?}}}",
                        self.identity.hostname,
                        applied.device.display().to_string()
                    );
                }
                true
            }
            Err(e) => {
                crate::errln!(
                    "ka: {node}: the copy is verified but its identity was NOT applied: {e}"
                );
                if json {
                    crate::outln!(
                        "{{\"event\":\"identity\",\"ok\":false,\"reason\":{:?}}}",
                        e.to_string()
                    );
                }
                false
            }
        }
    }
}

/// Whether `rel` under `root` can be written without following a symbolic
/// link: every existing component is a real directory, and the file itself
/// is not a link.
fn safe_path(root: &Path, rel: &str) -> bool {
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return false,
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => return false,
            _ => {}
        }
    }
    true
}

/// Replaces `rel` under `root` with `data` (creating its directories): a
/// temporary file renamed over it, so a crash leaves the old or the new file.
fn replace(root: &Path, rel: &str, data: &str, mode: u32) -> io::Result<()> {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("inside the root"))?;
    crate::write_atomically(&path, data.as_bytes(), mode)
}

/// Writes `id` into the root file system mounted at `root`; returns one
/// line per file.
pub fn write_identity(root: &Path, id: &Identity) -> io::Result<Vec<String>> {
    let mut changes = Vec::new();
    let put = |rel: &str, data: &str, mode: u32, changes: &mut Vec<String>| -> io::Result<()> {
        if !safe_path(root, rel) {
            changes.push(format!(
                "left {rel} alone: it is or passes through a symbolic link"
            ));
            return Ok(());
        }
        replace(root, rel, data, mode)?;
        changes.push(format!("wrote {rel}"));
        Ok(())
    };

    put(
        "etc/hostname",
        &format!("{}\n", id.hostname),
        0o644,
        &mut changes,
    )?;

    if safe_path(root, "etc/hosts") {
        let old = fs::read_to_string(root.join("etc/hosts")).unwrap_or_default();
        put("etc/hosts", &hosts_file(&old, id), 0o644, &mut changes)?;
    } else {
        changes.push("left etc/hosts alone: it is a symbolic link".into());
    }

    let machine_id = root.join("etc/machine-id");
    if fs::symlink_metadata(&machine_id).is_ok_and(|m| m.is_file()) {
        // Empty, not deleted: systemd then generates a fresh id at boot
        // and treats it as the machine's first boot.
        put("etc/machine-id", "", 0o444, &mut changes)?;
    }
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if safe_path(root, "var/lib/dbus/machine-id")
        && fs::symlink_metadata(&dbus_id).is_ok_and(|m| m.is_file())
    {
        fs::remove_file(&dbus_id)?;
        changes.push("removed var/lib/dbus/machine-id (a copy of the source's)".into());
    }

    put("etc/ka/identity", &identity_env(id), 0o644, &mut changes)?;

    if let Some((ip, prefix)) = id.ip {
        if root.join("etc/systemd").is_dir() {
            put(
                "etc/systemd/network/10-ka.network",
                &networkd_file(id, ip, prefix),
                0o644,
                &mut changes,
            )?;
        }
        if root.join("etc/NetworkManager").is_dir() {
            put(
                "etc/NetworkManager/system-connections/ka.nmconnection",
                &nm_file(id, ip, prefix),
                0o600,
                &mut changes,
            )?;
        }
    }
    if !id.dns.is_empty() {
        if safe_path(root, "etc/resolv.conf") {
            let mut text = String::from("# written by ka from the inventory\n");
            if let Some(d) = &id.domain {
                text.push_str(&format!("search {d}\n"));
            }
            for d in &id.dns {
                text.push_str(&format!("nameserver {d}\n"));
            }
            put("etc/resolv.conf", &text, 0o644, &mut changes)?;
        } else {
            changes
                .push("left etc/resolv.conf alone: a symbolic link, managed by the system".into());
        }
    }
    Ok(changes)
}

/// `old` with the host's own line replaced.
pub fn hosts_file(old: &str, id: &Identity) -> String {
    let own_ip = id.ip.map(|(ip, _)| ip.to_string());
    let mut out: Vec<String> = old
        .lines()
        .filter(|line| {
            let first = line.split_whitespace().next().unwrap_or("");
            first != "127.0.1.1" && Some(first) != own_ip.as_deref()
        })
        .map(str::to_string)
        .collect();
    let addr = own_ip.unwrap_or_else(|| "127.0.1.1".into());
    let names = if id.domain.is_some() {
        format!("{} {}", id.fqdn(), id.hostname)
    } else {
        id.hostname.clone()
    };
    let line = format!("{addr}\t{names}");
    // After localhost, as Debian's installer writes it.
    let at = out
        .iter()
        .position(|l| l.split_whitespace().next() == Some("127.0.0.1"))
        .map_or(0, |i| i + 1);
    out.insert(at, line);
    let mut text = out.join("\n");
    text.push('\n');
    text
}

fn identity_env(id: &Identity) -> String {
    let mut s = String::from(
        "# This machine's identity, written by ka after cloning (from the inventory).\n",
    );
    s.push_str(&format!("KA_HOSTNAME={}\n", id.hostname));
    s.push_str(&format!("KA_FQDN={}\n", id.fqdn()));
    if let Some(d) = &id.domain {
        s.push_str(&format!("KA_DOMAIN={d}\n"));
    }
    if let Some((ip, p)) = id.ip {
        s.push_str(&format!("KA_IP={ip}/{p}\n"));
    }
    if let Some(g) = id.gateway {
        s.push_str(&format!("KA_GATEWAY={g}\n"));
    }
    if !id.dns.is_empty() {
        let dns: Vec<String> = id.dns.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!("KA_DNS=\"{}\"\n", dns.join(" ")));
    }
    if let Some(m) = id.mac {
        s.push_str(&format!("KA_MAC={m}\n"));
    }
    s
}

fn networkd_file(id: &Identity, ip: Ipv4Addr, prefix: u8) -> String {
    let mut s = String::from("# written by ka from the inventory\n[Match]\n");
    match id.mac {
        Some(m) => s.push_str(&format!("MACAddress={m}\n")),
        // Without the boot NIC's MAC: any wired Ethernet.
        None => s.push_str("Type=ether\n"),
    }
    s.push_str(&format!("\n[Network]\nAddress={ip}/{prefix}\n"));
    if let Some(g) = id.gateway {
        s.push_str(&format!("Gateway={g}\n"));
    }
    for d in &id.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    if let Some(d) = &id.domain {
        s.push_str(&format!("Domains={d}\n"));
    }
    s
}

fn nm_file(id: &Identity, ip: Ipv4Addr, prefix: u8) -> String {
    let mut s =
        String::from("# written by ka from the inventory\n[connection]\nid=ka\ntype=ethernet\n");
    if let Some(m) = id.mac {
        s.push_str(&format!(
            "\n[ethernet]\nmac-address={}\n",
            m.to_string().to_uppercase()
        ));
    }
    s.push_str("\n[ipv4]\nmethod=manual\n");
    match id.gateway {
        Some(g) => s.push_str(&format!("address1={ip}/{prefix},{g}\n")),
        None => s.push_str(&format!("address1={ip}/{prefix}\n")),
    }
    if !id.dns.is_empty() {
        let dns: Vec<String> = id.dns.iter().map(|d| format!("{d};")).collect();
        s.push_str(&format!("dns={}\n", dns.concat()));
    }
    if let Some(d) = &id.domain {
        s.push_str(&format!("dns-search={d};\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::from_items(&[
            "hostname=node007",
            "domain=lab.example",
            "ip=192.168.10.107/24",
            "gateway=192.168.10.1",
            "dns=192.168.10.1",
            "dns=192.168.10.2",
            "mac=52:54:00:0a:01:07",
        ])
        .unwrap()
    }

    #[test]
    fn items_round_trip_and_bad_items_are_explained() {
        let id = id();
        assert_eq!(id.ip, Some(("192.168.10.107".parse().unwrap(), 24)));
        assert_eq!(id.dns.len(), 2);
        assert_eq!(Identity::from_items(&id.to_items()).unwrap(), id);
        for (bad, why) in [
            (&["ip=10.0.0.1"][..], "prefix length"),
            (&["hostname=a_b"][..], "not a valid host name"),
            (
                &["hostname=a", "colour=red"][..],
                "unknown identity item `colour`",
            ),
            (&["hostname=a", "gateway=10.0.0.1"][..], "without an ip"),
            (&["hostname=a", "dns=x"][..], "not an IPv4"),
            (&["ip=10.0.0.1/24"][..], "needs a hostname"),
        ] {
            let err = Identity::from_items(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert_eq!("auto".parse(), Ok(RootPartition::Auto));
        assert_eq!("2".parse(), Ok(RootPartition::Number(2)));
        assert_eq!("whole".parse(), Ok(RootPartition::Whole));
        assert!("-1".parse::<RootPartition>().is_err());
    }

    #[test]
    fn hosts_line_replaces_the_source_s() {
        let old = "127.0.0.1\tlocalhost\n127.0.1.1\tsource.lab.example source\n\n::1 localhost ip6-localhost\n";
        let new = hosts_file(old, &id());
        assert_eq!(
            new,
            "127.0.0.1\tlocalhost\n192.168.10.107\tnode007.lab.example node007\n\n::1 localhost ip6-localhost\n"
        );
        let bare = Identity::from_items(&["hostname=n1"]).unwrap();
        assert_eq!(hosts_file("", &bare), "127.0.1.1\tn1\n");
    }

    #[test]
    fn a_cloned_root_gets_its_own_identity() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc/systemd/network")).unwrap();
        fs::create_dir_all(root.join("var/lib/dbus")).unwrap();
        fs::write(root.join("etc/hostname"), "source\n").unwrap();
        fs::write(
            root.join("etc/hosts"),
            "127.0.0.1 localhost\n127.0.1.1 source\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        fs::write(root.join("var/lib/dbus/machine-id"), "0123\n").unwrap();
        // A link that, followed from the machine running ka, would land
        // outside the clone.
        let outside = dir
            .path()
            .join("..")
            .join(format!("ka-outside-{}", std::process::id()));
        std::os::unix::fs::symlink(&outside, root.join("etc/resolv.conf")).unwrap();

        let changes = write_identity(root, &id()).unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("etc/hostname"), "node007\n");
        assert!(read("etc/hosts").contains("192.168.10.107\tnode007.lab.example node007\n"));
        assert!(!read("etc/hosts").contains("source"));
        assert_eq!(read("etc/machine-id"), "");
        assert!(!root.join("var/lib/dbus/machine-id").exists());
        let networkd = read("etc/systemd/network/10-ka.network");
        assert!(
            networkd.contains("MACAddress=52:54:00:0a:01:07\n"),
            "{networkd}"
        );
        assert!(networkd.contains("Address=192.168.10.107/24\nGateway=192.168.10.1\nDNS=192.168.10.1\nDNS=192.168.10.2\n"), "{networkd}");
        assert!(read("etc/ka/identity").contains("KA_IP=192.168.10.107/24\n"));
        assert!(!root.join("etc/NetworkManager").exists());
        // The link was neither followed nor replaced.
        assert!(!outside.exists());
        assert!(fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("left etc/resolv.conf alone")),
            "{changes:?}"
        );
        // No temporary files left.
        let leftovers: Vec<_> = fs::read_dir(root.join("etc"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_linked_etc_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("etc")).unwrap();
        let changes = write_identity(dir.path(), &id()).unwrap();
        assert!(
            fs::read_dir(elsewhere.path()).unwrap().next().is_none(),
            "{changes:?}"
        );
    }

    #[test]
    fn a_regular_file_target_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        fs::write(&img, [0u8; 4096]).unwrap();
        let err = apply(&img, RootPartition::Auto, &id()).unwrap_err();
        assert!(err.to_string().contains("losetup -P"), "{err}");
    }
}
