//! Making a rebuilt system boot: the boot loader is installed from the
//! clone itself, chrooted into it with /dev, /proc and /sys bound (and
//! efivars where the node booted by UEFI), so the loader matches the
//! clone's own kernel and configuration, not the netboot image's.
//!
//! What is installed follows what the clone has:
//! - GRUB (`grub-install` or `grub2-install`): for BIOS on each disk that
//!   holds the root when the clone has the i386-pc modules, and for UEFI on
//!   the EFI system partition when it has the x86_64-efi modules — both at
//!   the distribution's path and at the removable path
//!   (`EFI/BOOT/BOOTX64.EFI`), without touching NVRAM, so a node boots the
//!   clone without a boot entry of its own. The configuration is then
//!   regenerated (`update-grub`, `grub-mkconfig` or `grub2-mkconfig`).
//! - the initramfs is regenerated where the clone has the tool
//!   (`update-initramfs`, `dracut`), so it finds disks by this node's
//!   drivers and UUIDs.
//! - extlinux (`extlinux --install` on the directory holding
//!   `extlinux.conf`) and systemd-boot (`bootctl install`) when GRUB is
//!   absent.
//!
//! A clone without any of these is left as it is: the step says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::layout::{Content, FsKind, Layout, TableKind};
use super::rebuild::run;
use crate::Error;

/// The GPT type of a BIOS boot partition (where GRUB's core sits on GPT).
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";

/// What makes a clone's boot loader installable, relative to its root:
/// without any of these, [`install`] leaves the clone as it is.
pub const TOOLS: &[&str] = &[
    "usr/sbin/grub-install",
    "usr/sbin/grub2-install",
    "usr/sbin/update-initramfs",
    "usr/bin/dracut",
    "usr/sbin/dracut",
    "usr/bin/extlinux",
    "usr/sbin/extlinux",
    "usr/bin/bootctl",
];

/// Installs the boot loader of the clone mounted at `root` onto `disks`
/// (the node's disks, in the layout's order). Returns one line per step.
pub fn install(root: &Path, layout: &Layout, disks: &[PathBuf]) -> Result<Vec<String>, Error> {
    let mut steps = Vec::new();
    let has = |p: &str| root.join(p.trim_start_matches('/')).exists();
    if !TOOLS.iter().any(|t| has(t)) {
        steps.push(
            "no boot loader in the clone (no GRUB, extlinux or systemd-boot): left as it is".into(),
        );
        return Ok(steps);
    }
    let _binds = Binds::mount(root)?;
    let grub = ["usr/sbin/grub-install", "usr/sbin/grub2-install"]
        .into_iter()
        .find(|p| has(p));
    let esp = esp_mountpoint(layout);
    if let Some(grub) = grub {
        let grub = format!("/{grub}");
        // Both GRUB and GRUB 2 packagings keep their platform modules here.
        let lib = "usr/lib/grub";
        if has(&format!("{lib}/i386-pc")) {
            for (d, disk) in layout.disks.iter().zip(disks) {
                if wants_bios_core(d) {
                    chroot(
                        root,
                        &[
                            &grub,
                            "--target=i386-pc",
                            "--recheck",
                            &disk.to_string_lossy(),
                        ],
                        &format!("installing GRUB for BIOS on {}", disk.display()),
                    )?;
                    steps.push(format!("installed GRUB for BIOS on {}", disk.display()));
                }
            }
        }
        if let (Some(esp), true) = (&esp, has(&format!("{lib}/x86_64-efi"))) {
            let dir = format!("--efi-directory={esp}");
            let what = "installing GRUB for UEFI";
            chroot(
                root,
                &[&grub, "--target=x86_64-efi", &dir, "--no-nvram"],
                what,
            )?;
            chroot(
                root,
                &[
                    &grub,
                    "--target=x86_64-efi",
                    &dir,
                    "--no-nvram",
                    "--removable",
                ],
                what,
            )?;
            steps.push(format!(
                "installed GRUB for UEFI on {esp} (and EFI/BOOT/BOOTX64.EFI)"
            ));
        }
        let initramfs = regenerate_initramfs(root, &has)?;
        steps.extend(initramfs);
        let config = if has("usr/sbin/update-grub") {
            vec!["/usr/sbin/update-grub".to_string()]
        } else if has("usr/sbin/grub2-mkconfig") {
            vec![
                "/usr/sbin/grub2-mkconfig".into(),
                "-o".into(),
                "/boot/grub2/grub.cfg".into(),
            ]
        } else {
            vec![
                "/usr/sbin/grub-mkconfig".into(),
                "-o".into(),
                "/boot/grub/grub.cfg".into(),
            ]
        };
        let args: Vec<&str> = config.iter().map(String::as_str).collect();
        chroot(root, &args, "regenerating the GRUB configuration")?;
        steps.push(format!(
            "regenerated the GRUB configuration ({})",
            config[0]
        ));
        return Ok(steps);
    }
    steps.extend(regenerate_initramfs(root, &has)?);
    for dir in ["boot/extlinux", "boot/syslinux"] {
        if has(&format!("{dir}/extlinux.conf"))
            && (has("usr/bin/extlinux") || has("usr/sbin/extlinux"))
        {
            let target = format!("/{dir}");
            chroot(
                root,
                &["extlinux", "--install", &target],
                "installing extlinux",
            )?;
            steps.push(format!("installed extlinux in {target}"));
            return Ok(steps);
        }
    }
    if let (Some(esp), true) = (&esp, has("usr/bin/bootctl")) {
        let path = format!("--esp-path={esp}");
        chroot(
            root,
            &["bootctl", "install", &path, "--no-variables"],
            "installing systemd-boot",
        )?;
        steps.push(format!("installed systemd-boot on {esp}"));
        return Ok(steps);
    }
    steps.push(
        "no boot loader in the clone (no GRUB, extlinux or systemd-boot): left as it is".into(),
    );
    Ok(steps)
}

/// `/dev/disk/by-uuid` links to the clone's file systems and swap, made
/// where nothing made them, for as long as the boot loader step runs.
///
/// `grub-mkconfig` names the root `root=UUID=…` only when
/// `/dev/disk/by-uuid/<uuid>` exists, and falls back to the device name
/// (`root=/dev/sda3`) otherwise; initramfs-tools looks there for the resume
/// device. The netboot image has no udev to make these links, so without
/// them every clone would boot by a device name that the next disk or
/// controller added to the node can change. Links udev already made are
/// left as they are; the ones made here are removed when this is dropped.
#[derive(Debug)]
pub struct UuidLinks {
    /// Links made here, removed on drop.
    made: Vec<PathBuf>,
    /// Directories made here (deepest last), removed on drop when empty.
    dirs: Vec<PathBuf>,
}

impl UuidLinks {
    /// Makes `<dev>/disk/by-uuid/<uuid>` → `device` for each pair that has
    /// no link yet (`dev` is `/dev`, bound into the clone while it is
    /// chrooted into).
    pub fn make(dev: &Path, devices: &[(String, PathBuf)]) -> Result<UuidLinks, Error> {
        let mut links = UuidLinks {
            made: Vec::new(),
            dirs: Vec::new(),
        };
        let by_uuid = dev.join("disk/by-uuid");
        // Another node rebuilding on the same machine may make or remove
        // the same names meanwhile: what exists already is left alone.
        use std::io::ErrorKind::AlreadyExists;
        for dir in [dev.join("disk"), by_uuid.clone()] {
            match std::fs::create_dir(&dir) {
                Ok(()) => links.dirs.push(dir),
                Err(e) if e.kind() == AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("making {}", dir.display()), e)),
            }
        }
        for (uuid, device) in devices {
            let link = by_uuid.join(uuid);
            match std::os::unix::fs::symlink(device, &link) {
                Ok(()) => links.made.push(link),
                Err(e) if e.kind() == AlreadyExists => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("linking {} to {}", link.display(), device.display()),
                        e,
                    ))
                }
            }
        }
        Ok(links)
    }
}

impl Drop for UuidLinks {
    fn drop(&mut self) {
        for link in &self.made {
            let _ = std::fs::remove_file(link);
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Runs `cmd` with `sh -c` chrooted into the clone at `root`, with /dev,
/// /proc and /sys bound.
pub fn in_chroot(root: &Path, cmd: &str) -> Result<(), Error> {
    let _binds = Binds::mount(root)?;
    chroot(
        root,
        &["/bin/sh", "-c", cmd],
        &format!("running `{cmd}` in the clone"),
    )
}

fn regenerate_initramfs(root: &Path, has: &dyn Fn(&str) -> bool) -> Result<Vec<String>, Error> {
    if has("usr/sbin/update-initramfs") {
        chroot(
            root,
            &["/usr/sbin/update-initramfs", "-u", "-k", "all"],
            "regenerating the initramfs",
        )?;
        return Ok(vec!["regenerated the initramfs (update-initramfs)".into()]);
    }
    if has("usr/bin/dracut") || has("usr/sbin/dracut") {
        chroot(
            root,
            &["dracut", "--regenerate-all", "--force"],
            "regenerating the initramfs",
        )?;
        return Ok(vec!["regenerated the initramfs (dracut)".into()]);
    }
    let _ = root;
    Ok(Vec::new())
}

/// Whether GRUB's BIOS core goes on this disk: a DOS table (the gap after
/// the MBR) or a GPT with a BIOS boot partition.
fn wants_bios_core(disk: &super::layout::DiskLayout) -> bool {
    match disk.table {
        TableKind::Dos => disk
            .partitions
            .iter()
            .any(|p| matches!(&p.content, Content::Tree(fs) if fs.mountpoint == "/" || fs.mountpoint == "/boot")),
        TableKind::Gpt => disk
            .partitions
            .iter()
            .any(|p| p.type_id.eq_ignore_ascii_case(BIOS_BOOT)),
    }
}

/// Where the running system mounts its EFI system partition, if it does.
fn esp_mountpoint(layout: &Layout) -> Option<String> {
    layout
        .disks
        .iter()
        .flat_map(|d| &d.partitions)
        .find_map(|p| match &p.content {
            Content::Tree(fs) if fs.kind == FsKind::Vfat && fs.mountpoint.starts_with("/boot") => {
                Some(fs.mountpoint.clone())
            }
            _ => None,
        })
}

fn chroot(root: &Path, args: &[&str], what: &str) -> Result<(), Error> {
    let mut c = Command::new("chroot");
    c.arg(root).args(args);
    // A clone's tools look for their own PATH, not the netboot image's.
    c.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    run(c, what)
}

/// /dev, /proc, /sys (and efivars) bound into the clone while it is
/// chrooted into; unbound when dropped.
struct Binds {
    mounted: Vec<PathBuf>,
    /// Mount points made for the binds, removed again: a clone gets nothing
    /// it did not have.
    made: Vec<PathBuf>,
}

impl Binds {
    fn mount(root: &Path) -> Result<Binds, Error> {
        let mut binds = Binds {
            mounted: Vec::new(),
            made: Vec::new(),
        };
        let mut list = vec!["dev", "proc", "sys"];
        if Path::new("/sys/firmware/efi/efivars").is_dir() {
            list.push("sys/firmware/efi/efivars");
        }
        for what in list {
            let dir = root.join(what);
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(format!("making {}", dir.display()), e))?;
                binds.made.push(dir.clone());
            }
            let mut c = Command::new("mount");
            c.arg("--bind").arg(format!("/{what}")).arg(&dir);
            run(c, &format!("binding /{what} into the clone"))?;
            binds.mounted.push(dir);
        }
        Ok(binds)
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for dir in self.mounted.iter().rev() {
            if Command::new("umount")
                .arg(dir)
                .status()
                .map_or(true, |s| !s.success())
            {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_links_are_made_where_missing_and_removed_after() {
        let dev = tempfile::tempdir().unwrap();
        let devices = vec![
            ("1111-2222".to_string(), PathBuf::from("/dev/vda2")),
            (
                "6b61d1a5-0000-4000-8000-0000000000f3".to_string(),
                PathBuf::from("/dev/vda3"),
            ),
        ];
        let by_uuid = dev.path().join("disk/by-uuid");
        {
            let _links = UuidLinks::make(dev.path(), &devices).unwrap();
            for (uuid, device) in &devices {
                assert_eq!(&std::fs::read_link(by_uuid.join(uuid)).unwrap(), device);
            }
        }
        assert!(!dev.path().join("disk").exists(), "made directories stay");
    }

    #[test]
    fn uuid_links_udev_made_are_kept() {
        let dev = tempfile::tempdir().unwrap();
        let by_uuid = dev.path().join("disk/by-uuid");
        std::fs::create_dir_all(&by_uuid).unwrap();
        std::os::unix::fs::symlink("../../sda3", by_uuid.join("abcd")).unwrap();
        let devices = vec![
            ("abcd".to_string(), PathBuf::from("/dev/vda3")),
            ("ef01".to_string(), PathBuf::from("/dev/vda4")),
        ];
        drop(UuidLinks::make(dev.path(), &devices).unwrap());
        assert_eq!(
            std::fs::read_link(by_uuid.join("abcd")).unwrap(),
            PathBuf::from("../../sda3"),
            "a link udev made was replaced"
        );
        assert!(by_uuid.join("abcd").symlink_metadata().is_ok());
        assert!(by_uuid.join("ef01").symlink_metadata().is_err());
    }
}
