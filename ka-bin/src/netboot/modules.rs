//! Kernel modules for the netboot image: which files, in which load order.
//!
//! The initramfs has no `modprobe` and no `modules.dep` lookup at boot: the
//! order is computed here, at build time, and written into the image as a
//! plain list the init feeds to `insmod`. A module must come after every
//! module it uses symbols from (virtio before virtio_net, or the load fails
//! with "Unknown symbol").
//!
//! Dependencies come from the kernel's `modules.dep` when it has one. A
//! kernel package unpacked with `dpkg -x` has none (depmod runs in its
//! postinst), so then they come from each module's own `.modinfo` section
//! (`depends=`), which is what depmod reads too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// NIC, disk and file-system modules every netboot image carries, so one
/// image boots most machines: virtio (VMs), Intel gigabit and 10G, Realtek
/// and Broadcom NICs; AHCI SATA, SCSI disks, NVMe; ext4 and vfat (the
/// file systems the post-clone identity step mounts). Modules that are
/// built into the kernel are skipped.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "e1000",
    "e1000e",
    "igb",
    "r8169",
    "tg3",
    "ahci",
    "sd_mod",
    "nvme",
    // ext4 asks the crypto API for crc32c at mount time ("softdep"), which
    // modules.dep does not list: without it, mounting fails.
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_utf8",
];

/// File-system modules a system clone mounts besides the defaults' ext4
/// and vfat: XFS, and the character set Debian's kernels mount FAT with
/// by default (`iocharset=ascii`, so an EFI system partition mounts
/// without options). Each is added when the kernel has it, as a module or
/// built in; a kernel without one still gets an image, with a note.
pub const SYSTEM_MODULES: &[&str] = &["xfs", "nls_ascii"];

/// A module's name as the kernel spells it: `-` and `_` are the same.
pub fn canonical(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Why the module list could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The directory is not a kernel's modules directory.
    #[error("{} is not a kernel modules directory (no kernel/ inside): pass the lib/modules/<version> directory of the kernel you boot", .0.display())]
    NotAModulesDir(PathBuf),
    /// A module asked for does not exist in this kernel.
    #[error("module {name} is neither in {} nor built into that kernel: check the name (`find {} -name '{name}.ko*'`) or drop it", dir.display(), dir.display())]
    Unknown {
        /// The name.
        name: String,
        /// The modules directory.
        dir: PathBuf,
    },
    /// A module is compressed, which the image's busybox insmod cannot load.
    #[error("{} is compressed; ka netboot build reads uncompressed modules (as Debian 12 ships them): decompress the modules directory first", .0.display())]
    Compressed(PathBuf),
    /// The dependencies loop.
    #[error("modules depend on each other in a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A file could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// One module file to put in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name, e.g. `virtio_net`.
    pub name: String,
    /// Path of the `.ko` file, absolute.
    pub path: PathBuf,
}

/// Where a module's dependencies are read from.
enum DepSource {
    /// `modules.dep`: name -> dependency names.
    Table(HashMap<String, Vec<String>>),
    /// Each module's `.modinfo`, read on demand.
    Modinfo,
}

/// A kernel's modules directory (`lib/modules/<version>`), indexed by name.
pub struct ModuleIndex {
    dir: PathBuf,
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
    deps: DepSource,
}

impl ModuleIndex {
    /// Indexes `dir` (`lib/modules/<version>`): the module files under
    /// `kernel/` and `updates/`, `modules.builtin`, and `modules.dep` if present.
    pub fn open(dir: &Path) -> Result<ModuleIndex, ModuleError> {
        if !dir.join("kernel").is_dir() {
            return Err(ModuleError::NotAModulesDir(dir.to_path_buf()));
        }
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|e| ModuleError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let mut files = HashMap::new();
        // Walk `kernel/` first: a module in `updates/` (e.g. a vendor driver)
        // overrides the in-tree one, as in depmod's search order.
        for sub in ["kernel", "extra", "updates"] {
            let base = dir.join(sub);
            if base.is_dir() {
                walk(&base, &mut |path| {
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if name.contains(".ko") {
                        files.insert(canonical(name), path.to_path_buf());
                    }
                })
                .map_err(|e| ModuleError::Read {
                    path: base.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        let builtin_path = dir.join("modules.builtin");
        let builtin = if builtin_path.is_file() {
            read(&builtin_path)?.lines().map(canonical).collect()
        } else {
            HashSet::new()
        };
        let dep_path = dir.join("modules.dep");
        let deps = if dep_path.is_file() {
            DepSource::Table(parse_modules_dep(&read(&dep_path)?))
        } else {
            DepSource::Modinfo
        };
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            files,
            builtin,
            deps,
        })
    }

    /// Whether this kernel has the module `name`, as a file or built in.
    pub fn has(&self, name: &str) -> bool {
        let name = canonical(name);
        self.files.contains_key(&name) || self.builtin.contains(&name)
    }

    /// Whether dependencies come from `modules.dep` (else from `.modinfo`).
    pub fn has_modules_dep(&self) -> bool {
        matches!(self.deps, DepSource::Table(_))
    }

    fn deps_of(&self, name: &str) -> Result<Vec<String>, ModuleError> {
        match &self.deps {
            DepSource::Table(t) => Ok(t.get(name).cloned().unwrap_or_default()),
            DepSource::Modinfo => {
                let Some(path) = self.files.get(name) else {
                    return Ok(Vec::new());
                };
                let bytes = fs::read(path).map_err(|e| ModuleError::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                modinfo_depends(&bytes).map_err(|reason| ModuleError::Read {
                    path: path.clone(),
                    reason,
                })
            }
        }
    }

    /// The modules to load for `wanted`, each after all its dependencies,
    /// without duplicates, skipping built-in ones. Deterministic: the order
    /// of `wanted`, each preceded by what it needs, depth first.
    pub fn load_order<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<Module>, ModuleError> {
        let mut graph = BTreeMap::new();
        let mut todo: Vec<String> = wanted.iter().map(|w| canonical(w.as_ref())).collect();
        while let Some(name) = todo.pop() {
            if graph.contains_key(&name) {
                continue;
            }
            if !self.files.contains_key(&name) {
                if self.builtin.contains(&name) {
                    graph.insert(name, None);
                    continue;
                }
                return Err(ModuleError::Unknown {
                    name,
                    dir: self.dir.clone(),
                });
            }
            let deps = self.deps_of(&name)?;
            todo.extend(deps.iter().cloned());
            graph.insert(name, Some(deps));
        }
        let roots: Vec<String> = wanted.iter().map(|w| canonical(w.as_ref())).collect();
        let order = dependency_order(&roots, &|n| {
            graph.get(n).cloned().flatten().unwrap_or_default()
        })?;
        let mut out = Vec::new();
        for name in order {
            // Built-in modules have no file: nothing to load.
            let Some(path) = self.files.get(&name) else {
                continue;
            };
            let file = path.to_string_lossy();
            if file.ends_with(".xz") || file.ends_with(".zst") || file.ends_with(".gz") {
                return Err(ModuleError::Compressed(path.clone()));
            }
            out.push(Module {
                name,
                path: path.clone(),
            });
        }
        Ok(out)
    }
}

/// Orders `roots` and their dependencies so that each name comes after
/// everything `deps` says it needs. Depth first in the given order, so the
/// result is stable; a cycle is an error naming it.
pub fn dependency_order(
    roots: &[String],
    deps: &dyn Fn(&str) -> Vec<String>,
) -> Result<Vec<String>, ModuleError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        deps: &dyn Fn(&str) -> Vec<String>,
        marks: &mut HashMap<String, Mark>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), ModuleError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_string());
                return Err(ModuleError::Cycle(cycle));
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        path.push(name.to_string());
        for d in deps(name) {
            visit(&d, deps, marks, path, out)?;
        }
        path.pop();
        marks.insert(name.to_string(), Mark::Done);
        out.push(name.to_string());
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut out = Vec::new();
    for r in roots {
        visit(r, deps, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// `modules.dep`: `kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko …`
/// as canonical names.
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                canonical(module.trim()),
                deps.split_whitespace().map(canonical).collect(),
            ))
        })
        .collect()
}

/// The `depends=` field of a module's `.modinfo` section, as canonical names.
pub fn modinfo_depends(elf_bytes: &[u8]) -> Result<Vec<String>, String> {
    let elf = goblin::elf::Elf::parse(elf_bytes).map_err(|e| format!("not an ELF module: {e}"))?;
    let section = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".modinfo"))
        .ok_or("no .modinfo section: not a kernel module")?;
    let range = section.file_range().ok_or(".modinfo section has no data")?;
    let data = elf_bytes
        .get(range)
        .ok_or(".modinfo section lies outside the file")?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(canonical)
                .collect::<Vec<_>>()
        })
        .collect())
}

fn walk(dir: &Path, found: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            walk(&entry.path(), found)?;
        } else if ty.is_file() {
            found(&entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The virtio part of a real Debian 6.1 modules.dep.
    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
";

    fn order(roots: &[&str]) -> Vec<String> {
        let table = parse_modules_dep(DEP);
        let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        dependency_order(&roots, &|n| table.get(n).cloned().unwrap_or_default()).unwrap()
    }

    fn before(order: &[String], a: &str, b: &str) -> bool {
        let pos = |n| order.iter().position(|x| x == n).unwrap();
        pos(a) < pos(b)
    }

    #[test]
    fn every_module_follows_its_dependencies() {
        let o = order(&["virtio_pci", "virtio_net", "virtio_blk", "ext4"]);
        let table = parse_modules_dep(DEP);
        for (m, deps) in &table {
            if !o.contains(m) {
                continue;
            }
            for d in deps {
                assert!(before(&o, d, m), "{d} must load before {m}: {o:?}");
            }
        }
        // Each once, and only what was asked for plus its dependencies.
        let unique: HashSet<&String> = o.iter().collect();
        assert_eq!(unique.len(), o.len(), "{o:?}");
        assert_eq!(o.len(), 13, "{o:?}");
        // virtio_ring before virtio: the order NOTES-pxe.md found by hand.
        assert!(before(&o, "virtio_ring", "virtio"));
    }

    #[test]
    fn order_is_stable_and_follows_the_request() {
        assert_eq!(
            order(&["virtio_blk"]),
            ["virtio_ring", "virtio", "virtio_blk"]
        );
        assert_eq!(
            order(&["ext4", "virtio_blk"]),
            order(&["ext4", "virtio_blk"])
        );
        let o = order(&["ext4", "virtio_blk"]);
        assert!(before(&o, "ext4", "virtio_ring"), "{o:?}");
    }

    #[test]
    fn dashes_and_underscores_are_one_name() {
        assert_eq!(
            canonical("kernel/drivers/crypto/crc32c-intel.ko"),
            "crc32c_intel"
        );
        assert_eq!(canonical("nls_cp437.ko.xz"), "nls_cp437");
        assert_eq!(canonical("virtio-net"), "virtio_net");
    }

    #[test]
    fn a_cycle_is_named() {
        let deps = |n: &str| match n {
            "a" => vec!["b".to_string()],
            "b" => vec!["c".to_string()],
            "c" => vec!["a".to_string()],
            _ => vec![],
        };
        match dependency_order(&["a".to_string()], &deps) {
            Err(ModuleError::Cycle(c)) => assert_eq!(c, ["a", "b", "c", "a"]),
            other => panic!("{other:?}"),
        }
    }

    /// A fake modules directory: modules are tiny ELF files whose only
    /// content that matters is `.modinfo`, like real ones.
    fn fake_tree(with_dep_file: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        for (path, deps) in [
            ("kernel/drivers/virtio/virtio_ring.ko", ""),
            ("kernel/drivers/virtio/virtio.ko", "virtio_ring"),
            ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
        ] {
            fs::create_dir_all(m.join(path).parent().unwrap()).unwrap();
            fs::write(
                m.join(path),
                elf_with_modinfo(&format!("license=GPL\0depends={deps}\0")),
            )
            .unwrap();
        }
        fs::write(m.join("modules.builtin"), "kernel/drivers/ata/libata.ko\n").unwrap();
        if with_dep_file {
            fs::write(m.join("modules.dep"), DEP).unwrap();
        }
        dir
    }

    #[test]
    fn modinfo_gives_dependencies_without_modules_dep() {
        let dir = fake_tree(false);
        let index = ModuleIndex::open(dir.path()).unwrap();
        assert!(!index.has_modules_dep());
        let names: Vec<String> = index
            .load_order(&["virtio_blk", "libata"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        // libata is built in: nothing to load.
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
        assert!(index.has("virtio-blk") && index.has("libata"));
        assert!(!index.has("xfs"));
    }

    #[test]
    fn modules_dep_is_preferred_and_unknown_names_fail() {
        let dir = fake_tree(true);
        let index = ModuleIndex::open(dir.path()).unwrap();
        assert!(index.has_modules_dep());
        let order = index.load_order(&["virtio-blk"]).unwrap();
        assert_eq!(
            order.last().unwrap().path,
            dir.path().join("kernel/drivers/block/virtio_blk.ko")
        );
        let err = index
            .load_order(&["virtio_blk", "no_such_nic"])
            .unwrap_err();
        assert!(
            err.to_string().contains("module no_such_nic is neither"),
            "{err}"
        );
        assert!(matches!(
            ModuleIndex::open(&dir.path().join("kernel")),
            Err(ModuleError::NotAModulesDir(_))
        ));
    }

    #[test]
    fn modinfo_of_a_non_module_is_an_error() {
        assert!(modinfo_depends(b"hello").is_err());
    }

    /// A minimal 64-bit little-endian ELF relocatable file with a
    /// `.modinfo` section holding `modinfo` and a section name table.
    fn elf_with_modinfo(modinfo: &str) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let info = modinfo.as_bytes();
        let data_off = 64u64;
        let names_off = data_off + info.len() as u64;
        let sh_off = (names_off + names.len() as u64).next_multiple_of(8);
        let mut f = vec![0u8; sh_off as usize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[40..48].copy_from_slice(&sh_off.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        f[60..62].copy_from_slice(&3u16.to_le_bytes()); // shnum
        f[62..64].copy_from_slice(&2u16.to_le_bytes()); // shstrndx
        f[data_off as usize..names_off as usize].copy_from_slice(info);
        f[names_off as usize..names_off as usize + names.len()].copy_from_slice(names);
        let section = |name: u32, ty: u32, off: u64, size: u64| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[4..8].copy_from_slice(&ty.to_le_bytes());
            s[24..32].copy_from_slice(&off.to_le_bytes());
            s[32..40].copy_from_slice(&size.to_le_bytes());
            s[48..56].copy_from_slice(&1u64.to_le_bytes());
            s
        };
        f.extend(vec![0u8; 64]); // the null section
        f.extend(section(1, 1, data_off, info.len() as u64)); // .modinfo, PROGBITS
        f.extend(section(10, 3, names_off, names.len() as u64)); // .shstrtab, STRTAB
        f
    }
}
