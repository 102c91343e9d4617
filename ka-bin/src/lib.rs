//! ka_bin: the `ka` command line and the configuration it reads.
//!
//! The binary (`src/main.rs`) only parses arguments and dispatches to one
//! module per subcommand group in [`cli`]; the logic lives in library modules
//! such as [`boot`], so other crates (the source, tests) call it directly.
#![warn(missing_docs)]

pub mod boot;
pub mod cli;
pub mod netboot;
pub mod session;

/// The one atomic file writer (a temporary renamed over the file, the
/// directory synced): the secret, DHCP configs, boot modes, the netboot
/// root and the identity step all write through it.
pub(crate) use ka_net::write_atomically;
