//! `ka`: clone one machine onto many.
//!
//! A thin entry point: parse the command line, set up logging, run the
//! subcommand (`ka_bin::cli`), and exit with its status.
use std::process::ExitCode;

use clap::Parser;
use ka_bin::cli::{Cli, ExitStatus};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    if let Some(result) = ka_bin::cli::generate::run_if_asked(&args) {
        return finish(result);
    }
    let cli = Cli::parse_from(args);
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
    finish(cli.command.run())
}

/// The exit code of a command's outcome; an error is said first.
fn finish(result: anyhow::Result<ExitStatus>) -> ExitCode {
    match result {
        Ok(status) => status.into(),
        Err(e) => {
            // One write, as the library's lines are (see `errln!` there).
            let line = format!("ka: {e:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitStatus::CouldNotRun.into()
        }
    }
}
