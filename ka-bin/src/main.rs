//! `ka`: clone one machine onto many.
use clap::Parser;

/// Clone one machine onto many, through a self-healing chain of TCP connections.
#[derive(Parser)]
#[command(name = "ka", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
