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
    // Descriptors are what a flood or a large session runs out of first.
    if let Err(e) = ka_net::shell::gate::raise_descriptor_limit() {
        tracing::warn!(error = %e, "cannot raise the limit on open files; keeping the current one");
    }
    match cli.command.run() {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("ka: {e:#}");
            ExitStatus::CouldNotRun.into()
        }
    }
}
