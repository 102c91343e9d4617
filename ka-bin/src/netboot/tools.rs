//! The host programs a system clone runs on a node, for the netboot image.
//!
//! A node rebuilding a `ka serve --system` stream partitions its disks,
//! makes file systems, mounts them and unpacks file trees into them with
//! external programs (see ka-net's `system` module). Busybox has some of
//! them, but not in a form that can do the job: its tar keeps no ACLs or
//! extended attributes, its mount takes fewer options, and it has no
//! `mkfs.xfs` or `sfdisk` at all. So `ka netboot build` takes the real
//! ones from the building host, each with its loader and shared libraries
//! ([`super::elf`]), as it does for `ka` itself.
//!
//! A host that lacks some of them still gets an image: image clones do not
//! need them. What is missing is reported by name with its Debian package,
//! because a system clone on a node booting that image will fail.

use std::path::{Path, PathBuf};

/// A program a system clone runs on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemTool {
    /// The name ka runs it by, and looks for on the host.
    pub name: &'static str,
    /// Other names that run the same program (`mkfs.ext4` is `mke2fs`,
    /// which reads its name to pick the file system type).
    pub aliases: &'static [&'static str],
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Host files the program reads, copied when present (its defaults
    /// otherwise).
    pub files: &'static [&'static str],
}

/// Every program a system clone runs on a node, besides busybox's applets
/// (`chroot` is one: it only has to enter the clone).
pub const SYSTEM_TOOLS: &[SystemTool] = &[
    // GNU tar: each file tree arrives as a tar stream with ACLs, extended
    // attributes (SELinux labels, file capabilities) and numeric owners.
    tool("tar", &[], "tar", &[]),
    tool("sfdisk", &[], "fdisk", &[]),
    tool("partx", &[], "util-linux", &[]),
    tool("blockdev", &[], "util-linux", &[]),
    tool("wipefs", &[], "util-linux", &[]),
    tool("blkid", &[], "util-linux", &[]),
    // The host's defaults for ext2/3/4 features, so new file systems come
    // out as the host's own mke2fs would make them.
    tool(
        "mke2fs",
        &["mkfs.ext2", "mkfs.ext3", "mkfs.ext4"],
        "e2fsprogs",
        &["/etc/mke2fs.conf"],
    ),
    tool("mkfs.xfs", &[], "xfsprogs", &[]),
    tool("mkfs.fat", &["mkfs.vfat"], "dosfstools", &[]),
    tool("mkswap", &[], "util-linux", &[]),
    // util-linux's mount and umount: ka passes options (`-o nouuid`,
    // `--bind`, `-l`) busybox's may not take.
    tool("mount", &[], "mount", &[]),
    tool("umount", &[], "mount", &[]),
];

const fn tool(
    name: &'static str,
    aliases: &'static [&'static str],
    package: &'static str,
    files: &'static [&'static str],
) -> SystemTool {
    SystemTool {
        name,
        aliases,
        package,
        files,
    }
}

/// Where the tools are looked for on the building host, in this order.
pub const DEFAULT_TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A tool found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTool {
    /// Which tool.
    pub tool: SystemTool,
    /// Where it is on the host (as found; a link is followed when copied).
    pub path: PathBuf,
}

impl FoundTool {
    /// Its path inside the image: `sbin/NAME` if the host keeps it in an
    /// `sbin` directory, else `bin/NAME`. Both are on the image's `PATH`,
    /// whatever directory the host used.
    pub fn image_path(&self) -> String {
        let dir = match self.path.parent().and_then(Path::file_name) {
            Some(d) if d == "sbin" => "sbin",
            _ => "bin",
        };
        format!("{dir}/{}", self.tool.name)
    }
}

/// A tool that will not be in the image, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTool {
    /// Which tool.
    pub tool: SystemTool,
    /// Why it is left out (not found, or found but unusable).
    pub reason: String,
}

/// Looks for every [`SYSTEM_TOOLS`] program in `dirs`, first match wins.
/// Only executable regular files (or links to them) count.
pub fn find(dirs: &[PathBuf]) -> (Vec<FoundTool>, Vec<MissingTool>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for tool in SYSTEM_TOOLS {
        match dirs
            .iter()
            .map(|d| d.join(tool.name))
            .find(|p| is_program(p))
        {
            Some(path) => found.push(FoundTool { tool: *tool, path }),
            None => missing.push(MissingTool {
                tool: *tool,
                reason: format!(
                    "not in {}",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }
    (found, missing)
}

fn is_program(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What to tell the administrator about `missing` tools, one line each:
/// what it means for the nodes, each tool with its Debian package and why
/// it is missing, and what to do. Empty if nothing is missing.
pub fn missing_report(missing: &[MissingTool]) -> Vec<String> {
    if missing.is_empty() {
        return Vec::new();
    }
    let mut packages: Vec<&str> = missing.iter().map(|m| m.tool.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let mut lines = vec![
        "system clones (ka.clone=system) will fail on nodes booting this image where they \
         need one of these programs, which are not in it (image clones are not affected):"
            .to_string(),
    ];
    lines.extend(missing.iter().map(|m| {
        format!(
            "  {}: Debian package `{}` ({})",
            m.tool.name, m.tool.package, m.reason
        )
    }));
    lines.push(format!(
        "install them (apt-get install {}) and build again",
        packages.join(" ")
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn program(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_first_directory_wins_and_the_rest_is_missing_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (sbin, bin) = (dir.path().join("sbin"), dir.path().join("bin"));
        for t in SYSTEM_TOOLS {
            if t.name != "mkfs.xfs" && t.name != "mkfs.fat" {
                program(&bin.join(t.name));
            }
        }
        program(&sbin.join("mount"));
        // Not executable: does not count.
        std::fs::write(sbin.join("mkfs.fat"), "").unwrap();
        let (found, missing) = find(&[sbin.clone(), bin.clone()]);
        assert_eq!(found.len(), SYSTEM_TOOLS.len() - 2);
        let mount = found.iter().find(|f| f.tool.name == "mount").unwrap();
        assert_eq!(mount.path, sbin.join("mount"));
        assert_eq!(mount.image_path(), "sbin/mount");
        let tar = found.iter().find(|f| f.tool.name == "tar").unwrap();
        assert_eq!(tar.image_path(), "bin/tar");
        let names: Vec<&str> = missing.iter().map(|m| m.tool.name).collect();
        assert_eq!(names, ["mkfs.xfs", "mkfs.fat"]);
        assert!(missing[0].reason.contains(&bin.display().to_string()));

        let report = missing_report(&missing);
        assert_eq!(report.len(), 4, "{report:#?}");
        assert!(report[0].contains("system clones (ka.clone=system) will fail"));
        assert!(report[1].starts_with("  mkfs.xfs: Debian package `xfsprogs` (not in "));
        assert!(report[2].starts_with("  mkfs.fat: Debian package `dosfstools`"));
        assert_eq!(
            report[3],
            "install them (apt-get install dosfstools xfsprogs) and build again"
        );
        assert!(missing_report(&[]).is_empty());
    }

    #[test]
    fn every_tool_has_a_package_and_unique_names() {
        let mut names: Vec<&str> = SYSTEM_TOOLS
            .iter()
            .flat_map(|t| std::iter::once(t.name).chain(t.aliases.iter().copied()))
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a name appears twice: {names:?}");
        assert!(SYSTEM_TOOLS.iter().all(|t| !t.package.is_empty()));
    }
}
