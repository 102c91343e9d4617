//! `ka`: clone one machine onto many.
//!
//! A thin dispatcher: each subcommand group lives in `ka_bin::cli::*`.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ka_bin::cli;

/// Clone one machine onto many, through a self-healing chain of TCP connections.
#[derive(Parser)]
#[command(name = "ka", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an image to a session of nodes (the source; the original ka-d-server).
    Serve(cli::serve::ServeArgs),
    /// Join a session and write its image to a target (a node; the original ka-d-client).
    Join(cli::serve::JoinArgs),
    /// Start a waiting session now with the nodes present (the original -g).
    Go(cli::serve::GoArgs),
    /// Clone a generated image onto local nodes, verify every copy, print the report.
    Demo(cli::serve::DemoArgs),
    /// Per-node boot modes: install, local, shell (the successor of ka_pxe_step).
    Pxe(cli::pxe::PxeArgs),
    /// Serve PXE files and per-node boot configs over TFTP.
    Tftp(cli::tftp::TftpArgs),
    /// DHCP server configuration and MAC harvesting.
    Dhcp(cli::dhcp::DhcpArgs),
    /// The netboot image install-mode nodes boot: build it, or run inside it.
    Netboot(cli::netboot::NetbootArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Request logs are what an administrator watches `ka tftp` for; the
    // other commands stay quiet unless something is wrong.
    let level = match cli.command {
        Command::Tftp(_) => tracing::Level::INFO,
        _ => tracing::Level::WARN,
    };
    // RUST_LOG adds detail (e.g. RUST_LOG=info for one line per node event,
    // in that node's span); the default keeps each command quiet.
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => cli::serve::serve(args),
        Command::Join(args) => cli::serve::join(args),
        Command::Go(args) => cli::serve::go(args),
        Command::Demo(args) => cli::serve::demo(args),
        Command::Pxe(args) => cli::pxe::run(args).map(|()| 0),
        Command::Tftp(args) => cli::tftp::run(args).map(|()| 0),
        Command::Dhcp(args) => cli::dhcp::run(args).map(|()| 0),
        Command::Netboot(args) => cli::netboot::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ka: {e:#}");
            ExitCode::from(cli::serve::EXIT_COULD_NOT_RUN)
        }
    }
}
