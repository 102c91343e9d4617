//! STUB for compiling until the real module lands.
#![allow(missing_docs)]
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout { pub disks: Vec<DiskLayout> }
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableKind { Gpt, Dos }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout { pub device: String, pub size: u64, pub sector_size: u32, pub table: TableKind, pub id: String, pub first_lba: Option<u64>, pub last_lba: Option<u64>, pub partitions: Vec<PartitionLayout> }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLayout { pub number: u32, pub start: u64, pub size: u64, pub type_id: String, pub uuid: Option<String>, pub name: Option<String>, pub attrs: Option<String>, pub bootable: bool, pub content: Content, #[serde(skip)] pub device: Option<PathBuf> }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content { Tree(FileSystem), Swap { uuid: Option<String>, label: Option<String> }, Raw { why: String }, Skipped { why: String } }
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsKind { Ext2, Ext3, Ext4, Xfs, Vfat }
impl std::fmt::Display for FsKind { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{:?}", self) } }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSystem { pub kind: FsKind, pub uuid: String, pub label: Option<String>, pub mountpoint: String, pub options: String, pub used: u64, pub excludes: Vec<String>, #[serde(skip)] pub mounted_at: Option<PathBuf> }
pub struct ReadOptions { pub root: PathBuf, pub exclude: Vec<PathBuf>, pub skip_disks: Vec<PathBuf>, pub raw: Vec<PathBuf> }
pub fn read_layout(_opts: &ReadOptions) -> Result<Layout, crate::Error> { unimplemented!() }
