//! `ka doctor`: check the boot server from a node's point of view
//! ([`crate::boot::doctor`]), one line per check.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{ClusterArgs, ExitStatus};
use crate::boot::doctor::{self, DoctorOptions};

/// Arguments of `ka doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The TFTP server to fetch from [default: the inventory's
    /// boot.server, port 69].
    #[arg(long, value_name = "ADDR:PORT")]
    tftp: Option<SocketAddr>,
    /// The configuration your DHCP server reads (ISC dhcpd, dnsmasq or
    /// Kea) [default: check what `ka dhcp config` writes].
    #[arg(long, value_name = "FILE")]
    dhcp_config: Option<PathBuf>,
    /// The session secret: check that the running ka serve proves it
    /// [default: `secret` beside the inventory, if it is there, as ka serve
    /// -i and ka tftp use it].
    #[arg(long, value_name = "FILE", env = super::SECRET_FILE_ENV)]
    secret_file: Option<PathBuf>,
    /// Send a real DHCPDISCOVER with a node's MAC out of this interface
    /// (on the boot network; needs root) and check the offer.
    #[arg(long, value_name = "IFACE")]
    probe: Option<String>,
}

/// Runs `ka doctor`: every check, printed as it ends; fails if any failed.
pub fn run(args: DoctorArgs) -> Result<ExitStatus> {
    // Read only: doctor never makes the secret ka serve and ka tftp would.
    let secret_file = args.secret_file.or_else(|| {
        Some(crate::session::secret::beside_inventory(
            &args.cluster.inventory,
        ))
        .filter(|p| p.is_file())
    });
    let opts = DoctorOptions {
        inventory: args.cluster.inventory,
        state_dir: args.cluster.state_dir,
        tftp: args.tftp,
        dhcp_config: args.dhcp_config,
        secret_file,
        probe: args.probe,
    };
    let checks = doctor::run(&opts, |c| crate::outln!("{c}"));
    let failed = checks
        .iter()
        .filter(|c| c.outcome == doctor::Outcome::Failed)
        .count();
    let not_run = checks
        .iter()
        .filter(|c| c.outcome == doctor::Outcome::NotRun)
        .count();
    if failed > 0 {
        crate::errln!(
            "ka doctor: {failed} of {} checks failed ({not_run} could not run): a node would fail there",
            checks.len()
        );
        Ok(ExitStatus::SomeFailed)
    } else {
        crate::errln!(
            "ka doctor: {} checks passed ({not_run} could not run)",
            checks.len() - not_run
        );
        Ok(ExitStatus::Success)
    }
}
