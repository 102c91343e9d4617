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
