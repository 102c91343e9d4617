//! The layout file (`ka join --system … --layout FILE`): partition sizes
//! for nodes whose disks differ from the source's. Its format is in
//! `docs/system.md`:
//!
//! ```toml
//! [disk.0]          # the layout's first disk (the one that holds /)
//! 2 = "1GiB"        # partition 2 gets 1 GiB
//! 3 = "40GiB"
//! 4 = "fill"        # partition 4 takes what is left
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::layout::Layout;
use crate::Error;

/// A parsed layout file: per disk index and partition number, a size or
/// `fill`. Unlisted partitions keep the source's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutFile {
    /// How messages name the file: its path, or "layout file".
    origin: String,
    disks: BTreeMap<usize, DiskSizes>,
}

/// The sizes asked for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskSizes {
    /// The line of its `[disk.N]` header.
    pub line: usize,
    /// By partition number.
    pub partitions: BTreeMap<u32, SizeEntry>,
}

/// One partition's size, and the line that asks for it (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SizeEntry {
    /// What is asked.
    pub size: PartSize,
    /// Its line in the file.
    pub line: usize,
}

/// A partition size in a layout file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartSize {
    /// This many bytes.
    Bytes(u64),
    /// What the disk has left once every other partition has its size.
    Fill,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    disk: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}

impl LayoutFile {
    /// Parses a layout file's text. Errors name the line and the field.
    pub fn parse(text: &str) -> Result<Self, Error> {
        Self::parse_named(text, "layout file")
    }

    /// Reads and parses the layout file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading layout file {}", path.display()), e))?;
        Self::parse_named(&text, &path.display().to_string())
    }

    fn parse_named(text: &str, origin: &str) -> Result<Self, Error> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| Error::LayoutFile(format!("{origin}: {}", e.to_string().trim_end())))?;
        let line_of = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        };
        let err =
            |line: usize, what: String| Error::LayoutFile(format!("{origin} line {line}: {what}"));
        let mut disks = BTreeMap::new();
        for (disk_key, parts) in raw.disk {
            let disk_line = line_of(disk_key.span());
            let index: usize = disk_key.get_ref().parse().map_err(|_| {
                err(
                    disk_line,
                    format!(
                        "[disk.{}]: a disk is named by its index in the layout, from 0: [disk.0]",
                        disk_key.get_ref()
                    ),
                )
            })?;
            let mut partitions = BTreeMap::new();
            let mut fill: Option<u32> = None;
            for (part_key, value) in parts {
                let line = line_of(part_key.span());
                let field = format!("disk.{index}.{}", part_key.get_ref());
                let number: u32 = part_key
                    .get_ref()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        err(
                            line,
                            format!("{field}: a partition is named by its number, from 1 (`2 = \"1GiB\"`)"),
                        )
                    })?;
                let size = match value.get_ref().trim() {
                    "fill" => {
                        if let Some(other) = fill {
                            return Err(err(
                                line,
                                format!("{field}: partition {other} of disk {index} already says \"fill\"; only one partition per disk can take what is left"),
                            ));
                        }
                        fill = Some(number);
                        PartSize::Fill
                    }
                    s => match ka_core::units::parse_size(s) {
                        Ok(0) => return Err(err(line, format!("{field}: a partition of 0 bytes cannot be made; give a size such as \"512MiB\", or \"fill\""))),
                        Ok(bytes) => PartSize::Bytes(bytes),
                        Err(e) => {
                            return Err(err(
                                line,
                                format!("{field} = {:?}: {e}; give a size such as \"512MiB\" or \"20GiB\", or \"fill\"", value.get_ref()),
                            ))
                        }
                    },
                };
                partitions.insert(number, SizeEntry { size, line });
            }
            disks.insert(
                index,
                DiskSizes {
                    line: disk_line,
                    partitions,
                },
            );
        }
        Ok(LayoutFile {
            origin: origin.to_string(),
            disks,
        })
    }

    /// Refuses a file that names a disk the layout lacks, or a partition a
    /// disk lacks: a node checks it before it touches its disks.
    pub fn check(&self, layout: &Layout) -> Result<(), Error> {
        for (&index, sizes) in &self.disks {
            let Some(disk) = layout.disks.get(index) else {
                let have: Vec<String> = layout
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("{i} ({})", d.device))
                    .collect();
                return Err(self.error(
                    sizes.line,
                    format!(
                        "[disk.{index}]: the layout has no disk {index} (its disks: {})",
                        have.join(", ")
                    ),
                ));
            };
            for (&number, entry) in &sizes.partitions {
                if !disk.partitions.iter().any(|p| p.number == number) {
                    let have: Vec<String> = disk
                        .partitions
                        .iter()
                        .map(|p| p.number.to_string())
                        .collect();
                    return Err(self.error(
                        entry.line,
                        format!(
                            "disk.{index}.{number}: disk {index} ({}) has no partition {number} (it has {})",
                            disk.device,
                            have.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The sizes asked for disk `index`, if any.
    pub(crate) fn disk(&self, index: usize) -> Option<&DiskSizes> {
        self.disks.get(&index)
    }

    /// An error about line `line` of this file.
    pub(crate) fn error(&self, line: usize, what: String) -> Error {
        Error::Plan(format!("{} line {line}: {what}", self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_fill_by_disk_and_partition() {
        let f = LayoutFile::parse(
            "# nodes with larger disks\n[disk.0]\n2 = \"512MiB\"\n3 = \"20GiB\"\n4 = \"fill\"\n\n[disk.1]\n1 = \"1GiB\"\n",
        )
        .unwrap();
        let d0 = f.disk(0).unwrap();
        assert_eq!(d0.line, 2);
        assert_eq!(
            d0.partitions[&2],
            SizeEntry {
                size: PartSize::Bytes(512 << 20),
                line: 3
            }
        );
        assert_eq!(d0.partitions[&3].size, PartSize::Bytes(20 << 30));
        assert_eq!(
            d0.partitions[&4],
            SizeEntry {
                size: PartSize::Fill,
                line: 5
            }
        );
        assert_eq!(
            f.disk(1).unwrap().partitions[&1].size,
            PartSize::Bytes(1 << 30)
        );
        assert!(f.disk(2).is_none());
        assert!(LayoutFile::parse("").unwrap().disk(0).is_none());
    }

    fn parse_err(text: &str) -> String {
        LayoutFile::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_size_names_its_line_and_field() {
        let msg = parse_err("[disk.0]\n1 = \"1GiB\"\n2 = \"12 parsecs\"\n");
        assert!(
            msg.starts_with("layout file line 3: disk.0.2 = \"12 parsecs\""),
            "{msg}"
        );
        assert!(msg.contains("512MiB"), "{msg}");
        let msg = parse_err("[disk.0]\n1 = \"0MiB\"\n");
        assert!(msg.contains("line 2") && msg.contains("0 bytes"), "{msg}");
    }

    #[test]
    fn two_fills_on_one_disk_are_refused() {
        let msg = parse_err("[disk.0]\n1 = \"fill\"\n2 = \"fill\"\n");
        assert!(
            msg.contains("line 3") && msg.contains("only one partition"),
            "{msg}"
        );
        // One per disk is fine.
        LayoutFile::parse("[disk.0]\n1 = \"fill\"\n[disk.1]\n2 = \"fill\"\n").unwrap();
    }

    #[test]
    fn names_that_are_not_numbers_are_refused() {
        let msg = parse_err("[disk.sda]\n1 = \"1GiB\"\n");
        assert!(
            msg.contains("line 1") && msg.contains("[disk.sda]"),
            "{msg}"
        );
        let msg = parse_err("[disk.0]\nroot = \"1GiB\"\n");
        assert!(
            msg.contains("line 2") && msg.contains("disk.0.root"),
            "{msg}"
        );
        let msg = parse_err("[disk.0]\n0 = \"1GiB\"\n");
        assert!(msg.contains("from 1"), "{msg}");
    }

    #[test]
    fn toml_errors_keep_their_line() {
        let msg = parse_err("[disk.0]\n1 = 512\n");
        assert!(msg.contains("line 2"), "{msg}");
        let msg = parse_err("[disks.0]\n");
        assert!(msg.contains("line 1") && msg.contains("disks"), "{msg}");
        let msg = parse_err("[disk.0]\n1 = \"1GiB\"\n1 = \"2GiB\"\n");
        assert!(msg.contains("line 3") && msg.contains("duplicate"), "{msg}");
    }

    #[test]
    fn the_documented_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/layout.toml");
        let f = LayoutFile::load(&path).unwrap();
        let d0 = f.disk(0).unwrap();
        assert_eq!(d0.partitions[&2].size, PartSize::Bytes(1 << 30));
        assert_eq!(d0.partitions[&3].size, PartSize::Bytes(40 << 30));
        assert_eq!(d0.partitions[&4].size, PartSize::Fill);
        assert_eq!(f.disk(1).unwrap().partitions[&1].size, PartSize::Fill);
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sizes.toml");
        std::fs::write(&path, "[disk.0]\n1 = \"big\"\n").unwrap();
        let msg = LayoutFile::load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{} line 2", path.display())),
            "{msg}"
        );
        let msg = LayoutFile::load(&dir.path().join("none.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("none.toml"), "{msg}");
    }
}
