//! `ka`: clone one machine onto many.
//!
//! A thin entry point: parse the command line, set up logging, run the
//! subcommand (`ka_bin::cli`), and exit with its status.
use std::process::ExitCode;

use clap::Parser;
use ka_bin::cli::{Cli, ExitStatus};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // RUST_LOG adds detail (e.g. RUST_LOG=info for one line per node event,
    // in that node's span); the default keeps each command quiet.
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(cli.command.log_level().into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.run() {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("ka: {e:#}");
            ExitStatus::CouldNotRun.into()
        }
    }
}
