//! The inventory file as written: serde types that mirror the TOML and
//! keep every value's place in the file, so a problem can point at it.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::model::{AfterClone, LocalBoot};
use crate::netboot::cmdline::CloneKind;

/// A string with where it is in the file.
pub(super) type S = Spanned<String>;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) network: Spanned<RawNetwork>,
    pub(super) boot: Spanned<RawBoot>,
    pub(super) session: Spanned<RawSession>,
    #[serde(default)]
    pub(super) node: Vec<Spanned<RawNode>>,
    #[serde(default)]
    pub(super) range: Vec<Spanned<RawRange>>,
    #[serde(default)]
    pub(super) groups: BTreeMap<String, Spanned<Vec<S>>>,
}

/// `[network]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    pub(super) subnet: S,
    pub(super) netmask: Option<S>,
    pub(super) gateway: Option<S>,
    #[serde(default)]
    pub(super) dns: Vec<S>,
    pub(super) domain: Option<S>,
}

/// `[boot]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBoot {
    pub(super) server: S,
    pub(super) tftp_root: S,
    pub(super) kernel: S,
    pub(super) initramfs: S,
    pub(super) console: Option<String>,
    pub(super) kernel_args: Option<S>,
    pub(super) local_boot: Option<LocalBoot>,
    pub(super) bios_boot_file: Option<S>,
    pub(super) uefi_boot_file: Option<S>,
    pub(super) ipxe_script: Option<S>,
    pub(super) after_clone: Option<AfterClone>,
}

/// `[session]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSession {
    pub(super) name: S,
    pub(super) source: S,
    pub(super) disk: Option<S>,
    pub(super) clone: Option<CloneKind>,
}

/// One `[[node]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: S,
    pub(super) mac: S,
    pub(super) ip: S,
    pub(super) disk: Option<S>,
    pub(super) kernel_args: Option<S>,
    #[serde(default)]
    pub(super) groups: Vec<S>,
}

/// One `[[range]]`: many nodes by name pattern.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRange {
    pub(super) names: S,
    pub(super) mac_base: Option<S>,
    pub(super) macs: Option<Spanned<Vec<S>>>,
    pub(super) ip_base: Option<S>,
    pub(super) ips: Option<Spanned<Vec<S>>>,
    pub(super) disk: Option<S>,
    pub(super) kernel_args: Option<S>,
    #[serde(default)]
    pub(super) groups: Vec<S>,
}
