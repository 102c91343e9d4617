//! The netboot image: what install-mode nodes boot to clone their disk.
//!
//! [`build`] makes the initramfs (busybox, `ka` and its libraries, the
//! programs a system clone runs ([`tools`]), NIC, disk and file-system
//! drivers in load order, an init) and lays out a TFTP root for `ka tftp`. Inside the image, [`install`] reads the node's plan from the
//! kernel command line ([`cmdline`], the contract in `docs/netboot.md`),
//! joins the session, and the copy gets the node's own identity
//! ([`crate::session::identity`]) once it is verified.

pub mod archive;
pub mod build;
pub mod cmdline;
pub mod elf;
pub mod install;
pub mod modules;
pub mod tools;
pub mod version;
