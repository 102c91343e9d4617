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
//!
//! Modules may be compressed, as RHEL-family and recent Ubuntu kernels ship
//! them (`.ko.xz`, `.ko.zst`, `.ko.gz`, named so in `modules.dep` too). The
//! image gets them decompressed ([`read_module`]): busybox's `insmod` hands
//! the file to `finit_module` without the kernel's decompress flag, and its
//! own fallback reads gzip and xz at best, never zstd; and the initramfs is
//! compressed as a whole, so modules kept compressed would save little on
//! the wire (a quarter of the modules' share with xz, none with zstd).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
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

/// How a module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `.ko`: a plain ELF object.
    None,
    /// `.ko.xz` (`CONFIG_MODULE_COMPRESS_XZ`: RHEL, Fedora, SUSE).
    Xz,
    /// `.ko.zst` (`CONFIG_MODULE_COMPRESS_ZSTD`: Ubuntu since 23.10, Arch).
    Zstd,
    /// `.ko.gz` (`CONFIG_MODULE_COMPRESS_GZIP`).
    Gzip,
}

impl Compression {
    /// The compression of the module file `name`, or `None` when `name` is
    /// no module file at all.
    pub fn of_file(name: &str) -> Option<Compression> {
        let (_, ext) = name.rsplit_once(".ko")?;
        match ext {
            "" => Some(Compression::None),
            ".xz" => Some(Compression::Xz),
            ".zst" => Some(Compression::Zstd),
            ".gz" => Some(Compression::Gzip),
            _ => None,
        }
    }

    /// The format's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

/// The largest module ka decompresses. The biggest in-tree modules are tens
/// of MiB; past this, the file is no module and would only fill memory.
pub const MAX_MODULE_BYTES: u64 = 512 << 20;

/// `data`, a module compressed as `how`, decompressed. The error says why
/// the data is not a whole stream of that format.
pub fn decompress(how: Compression, data: &[u8]) -> Result<Vec<u8>, String> {
    decompress_at_most(how, data, MAX_MODULE_BYTES)
}

fn decompress_at_most(how: Compression, data: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let too_big = || {
        format!(
            "decompresses to more than {} bytes, more than any kernel module",
            limit
        )
    };
    let mut out = Vec::new();
    match how {
        Compression::None => out.extend_from_slice(data),
        Compression::Xz => {
            let mut limited = LimitedWriter {
                out: &mut out,
                room: limit,
                over: false,
            };
            lzma_rs::xz_decompress(&mut io::BufReader::new(data), &mut limited).map_err(|e| {
                if limited.over {
                    too_big()
                } else {
                    e.to_string()
                }
            })?;
        }
        Compression::Zstd => {
            let mut decoder =
                ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| e.to_string())?;
            read_at_most(&mut decoder, &mut out, limit)?;
            if out.len() as u64 > limit {
                return Err(too_big());
            }
            // The decoder reads the frame's checksum but leaves comparing
            // it to the caller: a flipped bit must not reach the image.
            let frame = decoder.into_frame_decoder();
            if !frame.is_finished() {
                return Err("the data ends inside the zstd frame".into());
            }
            if let (Some(stored), Some(computed)) = (
                frame.get_checksum_from_data(),
                frame.get_calculated_checksum(),
            ) {
                if stored != computed {
                    return Err(format!(
                        "content checksum {computed:08x} is not the {stored:08x} the frame carries"
                    ));
                }
            }
        }
        Compression::Gzip => {
            read_at_most(flate2::read::MultiGzDecoder::new(data), &mut out, limit)?
        }
    }
    if out.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(out)
}

/// Reads `from` into `out`, stopping one byte past `limit` (which the
/// caller then refuses).
fn read_at_most(from: impl Read, out: &mut Vec<u8>, limit: u64) -> Result<(), String> {
    from.take(limit.saturating_add(1))
        .read_to_end(out)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A `Write` into a vector that fails past a byte budget (lzma-rs writes
/// its output instead of being read).
struct LimitedWriter<'a> {
    out: &'a mut Vec<u8>,
    room: u64,
    /// Whether a write went past the budget.
    over: bool,
}

impl Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.room {
            self.over = true;
            return Err(io::Error::other("output over the limit"));
        }
        self.room -= buf.len() as u64;
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The ELF object of the module file at `path`, decompressed if its name
/// says it is compressed: what goes into the image and what `.modinfo` is
/// read from.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let how = Compression::of_file(name).unwrap_or(Compression::None);
    let data = fs::read(path).map_err(|e| ModuleError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if how == Compression::None {
        return Ok(data);
    }
    let corrupt = |reason: String| ModuleError::Corrupt {
        path: path.to_path_buf(),
        format: how.name(),
        reason,
    };
    let elf = decompress(how, &data).map_err(corrupt)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(corrupt("its content is no ELF object".into()));
    }
    Ok(elf)
}

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
    /// A compressed module does not decompress to a module.
    #[error("{} is not a valid {format}-compressed kernel module ({reason}): the file is damaged; reinstall the kernel package it came from", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The compression its name says.
        format: &'static str,
        /// What the decompressor or the ELF check said.
        reason: String,
    },
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
    /// Path of the module file (`.ko`, or compressed `.ko.xz` and the
    /// like), absolute.
    pub path: PathBuf,
}

impl Module {
    /// How its file is compressed.
    pub fn compression(&self) -> Compression {
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        Compression::of_file(name).unwrap_or(Compression::None)
    }
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
                    if Compression::of_file(name).is_some() {
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
                let bytes = read_module(path)?;
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

    /// `elf` compressed as `how`, with this crate's own decoders' sibling
    /// encoders (the integration tests use the real xz, zstd and gzip).
    fn compress(how: Compression, elf: &[u8]) -> Vec<u8> {
        match how {
            Compression::None => elf.to_vec(),
            Compression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut io::BufReader::new(elf), &mut out).unwrap();
                out
            }
            Compression::Zstd => {
                ruzstd::encoding::compress_to_vec(elf, ruzstd::encoding::CompressionLevel::Fastest)
            }
            Compression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(elf).unwrap();
                gz.finish().unwrap()
            }
        }
    }

    /// The fake tree with its modules compressed as `how`, and a
    /// modules.dep naming them so, as depmod writes it for such a kernel.
    fn compressed_tree(how: Compression, ext: &str) {
        let dir = fake_tree(false);
        let m = dir.path();
        let mut dep = String::new();
        for (path, deps) in [
            ("kernel/drivers/virtio/virtio_ring.ko", vec![]),
            (
                "kernel/drivers/virtio/virtio.ko",
                vec!["kernel/drivers/virtio/virtio_ring.ko"],
            ),
            (
                "kernel/drivers/block/virtio_blk.ko",
                vec![
                    "kernel/drivers/virtio/virtio.ko",
                    "kernel/drivers/virtio/virtio_ring.ko",
                ],
            ),
        ] {
            let elf = fs::read(m.join(path)).unwrap();
            let packed = compress(how, &elf);
            assert_ne!(packed, elf, "{how:?} left the module as it was");
            fs::remove_file(m.join(path)).unwrap();
            fs::write(m.join(format!("{path}{ext}")), packed).unwrap();
            let deps: Vec<String> = deps.iter().map(|d| format!("{d}{ext}")).collect();
            dep.push_str(&format!("{path}{ext}: {}\n", deps.join(" ")));
        }
        // Both ways of finding dependencies: modules.dep, then .modinfo.
        for with_dep_file in [true, false] {
            if with_dep_file {
                fs::write(m.join("modules.dep"), &dep).unwrap();
            } else {
                fs::remove_file(m.join("modules.dep")).unwrap();
            }
            let index = ModuleIndex::open(m).unwrap();
            assert_eq!(index.has_modules_dep(), with_dep_file);
            let order = index.load_order(&["virtio_blk"]).unwrap();
            let names: Vec<&str> = order.iter().map(|o| o.name.as_str()).collect();
            assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"], "{how:?}");
            let blk = order.last().unwrap();
            assert_eq!(blk.compression(), how);
            assert_eq!(
                blk.path,
                m.join(format!("kernel/drivers/block/virtio_blk.ko{ext}"))
            );
            let elf = read_module(&blk.path).unwrap();
            assert_eq!(modinfo_depends(&elf).unwrap(), ["virtio", "virtio_ring"]);
        }

        // A damaged file is named, with its format.
        let ring = m.join(format!("kernel/drivers/virtio/virtio_ring.ko{ext}"));
        let mut bytes = fs::read(&ring).unwrap();
        bytes.truncate(bytes.len() / 2);
        let end = bytes.len() - 1;
        bytes[end] ^= 0xff;
        fs::write(&ring, bytes).unwrap();
        let index = ModuleIndex::open(m).unwrap();
        let err = index.load_order(&["virtio_blk"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&ring.display().to_string())
                && text.contains(&format!("valid {}-compressed", how.name())),
            "{text}"
        );
    }

    #[test]
    fn xz_modules_are_read_decompressed() {
        compressed_tree(Compression::Xz, ".xz");
    }

    #[test]
    fn zstd_modules_are_read_decompressed() {
        compressed_tree(Compression::Zstd, ".zst");
    }

    #[test]
    fn gzip_modules_are_read_decompressed() {
        compressed_tree(Compression::Gzip, ".gz");
    }

    /// `printf 'a kernel module, in short' | xz --check=crc32
    /// --lzma2=dict=1MiB`, the kernel's own xz options: lzma-rs's encoder
    /// writes no check, so its output cannot show that one is verified.
    const XZ_SAMPLE: &[u8] = &[
        0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x01, 0x69, 0x22, 0xde, 0x36, 0x02, 0x00, 0x21,
        0x01, 0x10, 0x00, 0x00, 0x00, 0xa8, 0x70, 0x8e, 0x86, 0x01, 0x00, 0x18, 0x61, 0x20, 0x6b,
        0x65, 0x72, 0x6e, 0x65, 0x6c, 0x20, 0x6d, 0x6f, 0x64, 0x75, 0x6c, 0x65, 0x2c, 0x20, 0x69,
        0x6e, 0x20, 0x73, 0x68, 0x6f, 0x72, 0x74, 0x00, 0x00, 0x00, 0x00, 0xe7, 0xda, 0x0f, 0x2e,
        0x00, 0x01, 0x2d, 0x19, 0x04, 0x47, 0xc7, 0x64, 0x90, 0x42, 0x99, 0x0d, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x59, 0x5a,
    ];

    #[test]
    fn a_flipped_bit_is_caught_by_each_formats_checksum() {
        let elf = elf_with_modinfo("license=GPL\0depends=\0");
        for how in [Compression::Xz, Compression::Zstd, Compression::Gzip] {
            let (plain, packed) = match how {
                Compression::Xz => (&b"a kernel module, in short"[..], XZ_SAMPLE.to_vec()),
                _ => (&elf[..], compress(how, &elf)),
            };
            assert_eq!(decompress(how, &packed).unwrap(), plain, "{how:?}");
            // The checksum each format carries over the content: gzip's
            // CRC-32 is 8 bytes from the end, zstd's 4; xz's block CRC-32
            // comes before the index (8 bytes here) and the footer (12).
            let at = match how {
                Compression::Gzip => packed.len() - 8,
                Compression::Zstd => packed.len() - 4,
                _ => packed.len() - 24,
            };
            let mut bad = packed.clone();
            bad[at] ^= 1;
            let err = decompress(how, &bad).unwrap_err();
            assert!(
                err.to_lowercase().contains("crc") || err.contains("checksum"),
                "{how:?}: {err}"
            );
            let mut cut = packed.clone();
            cut.truncate(packed.len() / 2);
            assert!(
                decompress(how, &cut).is_err(),
                "{how:?}: a cut stream passed"
            );
        }
    }

    #[test]
    fn compression_comes_from_the_file_name() {
        assert_eq!(Compression::of_file("a.ko"), Some(Compression::None));
        assert_eq!(Compression::of_file("a.ko.xz"), Some(Compression::Xz));
        assert_eq!(Compression::of_file("a.ko.zst"), Some(Compression::Zstd));
        assert_eq!(Compression::of_file("a.ko.gz"), Some(Compression::Gzip));
        assert_eq!(Compression::of_file("a.ko.sig"), None);
        assert_eq!(Compression::of_file("modules.dep"), None);
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        let zeros = vec![0u8; 64 << 10];
        for how in [Compression::Xz, Compression::Zstd, Compression::Gzip] {
            let packed = compress(how, &zeros);
            assert_eq!(decompress_at_most(how, &packed, 64 << 10).unwrap(), zeros);
            let err = decompress_at_most(how, &packed, 1000).unwrap_err();
            assert!(err.contains("more than 1000 bytes"), "{how:?}: {err}");
        }
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
