//! ka_bin: the `ka` command line, the boot pieces and the session library.
//!
//! - [`session`]: serving an image, joining a session, finding and starting
//!   it, a whole session on loopback, and a node's identity on its verified
//!   copy — plain option structs, no command line.
//! - [`boot`]: the inventory, per-node boot modes, the boot configs
//!   rendered from them, DHCP configuration and MAC harvesting.
//! - [`netboot`]: the netboot image install-mode nodes boot, and what a node
//!   does inside it (it joins through [`session`]).
//! - [`web`]: `ka serve --http`, the session's live web page, its JSON,
//!   event stream and metrics.
//! - [`cli`]: one module per `ka` subcommand, turning its arguments into a
//!   plan, running it, and ending with a [`cli::ExitStatus`].
//!
//! The binary (`src/main.rs`) parses the command line, sets up logging and
//! runs the subcommand; other crates (tests) call the library directly.
#![warn(missing_docs)]

/// `println!` for what ka reports on standard output, which ignores a
/// reader that has gone: `ka serve --json | head` must not end a session
/// (its nodes would lose their source) because nobody reads its lines any
/// more. The exit status still tells the outcome.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` in one write: a line that another process sharing the
/// stream (a journal, a supervisor's pipe, `ka tftp` and `ka serve` started
/// from one script) writes at the same moment never lands inside it, as it
/// can between the pieces `eprintln!` writes one by one.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// `print!` that ignores a reader that has gone, as [`outln!`] does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = write!(stdout, $($arg)*).and_then(|()| stdout.flush());
    }};
}

pub(crate) use {errln, out, outln};

pub mod boot;
pub mod cli;
pub mod netboot;
pub mod session;
pub mod web;

/// The one atomic file writer (a temporary renamed over the file, the
/// directory synced): the secret, DHCP configs, boot modes, the netboot
/// root and the identity step all write through it.
pub(crate) use ka_net::write_atomically;
