//! `ka join`: a node (the original ka-d-client). The arguments become
//! [`JoinOptions`] for the session library; its outcome becomes the exit
//! status.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};

use super::{ExitStatus, ReachArgs};
use crate::session::identity::{Identity, RootPartition};
use crate::session::join::{self, JoinOptions, Joined, Output};
use crate::session::DEFAULT_STATE_DIR;

/// Real invocations under `ka join --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # Write the image to this node's disk, finding the source by broadcast:
  ka join --secret-file /etc/ka/node07.key --target /dev/sda --verify readback
  # Rebuild this node's disk from a `ka serve --system` session:
  ka join --server 10.0.0.1 --secret-file node07.key --system /dev/sda
  # Unpack a `ka serve --tar` stream into a directory:
  ka join --server 10.0.0.1:4715 --secret-file node07.key --untar /mnt/root
  # Give the verified copy this node's identity:
  ka join --secret-file node07.key --target /dev/sda --identity hostname=node07,ip=10.0.0.107/24,gateway=10.0.0.1";

/// `ka join`: a node (the original ka-d-client).
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct JoinArgs {
    /// The session and how to reach its source.
    #[command(flatten)]
    pub reach: ReachArgs,
    /// Where to write the image: a regular file or a block device.
    #[arg(long, value_name = "PATH", group = "output")]
    pub target: Option<PathBuf>,
    /// Feed the image to the standard input of this shell command.
    #[arg(long, value_name = "CMD", group = "output")]
    pub command: Option<String>,
    /// Untar the image into this directory.
    #[arg(long, value_name = "DIR", group = "output")]
    pub untar: Option<PathBuf>,
    /// Rebuild these disks (in the order of the source's) from a `ka serve
    /// --system` session: partitions, file systems, trees, boot loader.
    /// Everything on them is replaced.
    #[arg(long, value_name = "DISK,…", value_delimiter = ',', group = "output")]
    pub system: Vec<PathBuf>,
    /// Save the session's stream to this file (a system stream is served
    /// again later with `ka serve --system-image FILE`).
    #[arg(long, value_name = "FILE", group = "output")]
    pub save: Option<PathBuf>,
    /// With --system: the most of the stream this node holds at once.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = ka_core::units::parse_size)]
    pub window: u64,
    /// Where a --command or --untar image is received before it is fed
    /// on, and where a --target node keeps its window of a packed stream
    /// (`ka serve --compress`) while it unpacks it [default: the temporary
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// This node's name (default: the node named by the key file, or else
    /// the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Stay until the source releases this node (the original -w).
    #[arg(long)]
    pub wait_release: bool,
    /// Also read the written target back and check it (a --target file or
    /// device, packed stream or not, and a --command or --untar node's
    /// spool); a system clone's disks are checked as they are unpacked.
    #[arg(long, value_parser = ["readback"])]
    pub verify: Option<String>,
    /// Keep looking for the source this long, at the start and whenever it
    /// is lost (a source restarted on the same image is rejoined, and the
    /// copy goes on where it was).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub wait: Duration,
    /// Where this node records how much of its --target is written and
    /// durable, so that `ka join` restarted with the same arguments goes on
    /// from there instead of from the start (created if missing; the record
    /// is removed once the copy is checked; one last written more than 24 h
    /// ago is reported and removed, and the copy starts over). --command
    /// and --untar targets always start over.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Listen on this port for the downstream node's data connection, so
    /// a firewall between nodes needs only it open [default: one the system
    /// chooses]. The source sends it to the downstream; it must be free.
    #[arg(long, value_name = "PORT")]
    pub data_port: Option<u16>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Send the lines of this file to the source as they are written (a
    /// console log, as the netboot init writes it), besides this node's
    /// own events: the source keeps them in the node's log.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Once the copy is verified, give it this node's identity: KEY=VALUE
    /// items hostname, domain, ip (ADDR/PREFIX), gateway, dns, mac (see docs/netboot.md).
    #[arg(long, value_name = "KEY=VALUE,…", value_delimiter = ',')]
    pub identity: Vec<String>,
    /// With --identity: the partition of --target holding the root file
    /// system (a number, `auto`: the first with an etc/, `whole`: no partitions).
    #[arg(long, value_name = "N|auto|whole", default_value = "auto")]
    pub root_partition: RootPartition,
}

/// Checks `args` (the identity's syntax too: a typo must not cost a whole
/// clone) and makes the plan.
pub fn plan(args: JoinArgs) -> anyhow::Result<JoinOptions> {
    crate::session::check_session_name(&args.reach.session)?;
    let identity = if args.identity.is_empty() {
        None
    } else {
        Some(Identity::from_items(&args.identity).map_err(|e| anyhow!(e))?)
    };
    let output = match (args.target.or(args.save), args.command, args.untar) {
        (Some(p), _, _) => Output::Target(p),
        (_, Some(c), _) => Output::Command(c),
        (_, _, Some(d)) => Output::Untar(d),
        _ if !args.system.is_empty() => Output::System(args.system),
        _ => bail!(
            "say where the image goes: --target PATH, --system DISK, --save FILE, --command CMD or --untar DIR"
        ),
    };
    Ok(JoinOptions {
        reach: args.reach.into(),
        output,
        spool_dir: args.spool_dir,
        name: args.name,
        wait_release: args.wait_release,
        verify_readback: args.verify.is_some(),
        wait: args.wait,
        state_dir: args.state_dir,
        json: args.json,
        identity,
        root_partition: args.root_partition,
        window: args.window,
        data_port: args.data_port.unwrap_or(0),
        console_log: args.console_log,
    })
}

/// Runs `ka join`.
pub fn run(args: JoinArgs) -> anyhow::Result<ExitStatus> {
    Ok(match join::run(plan(args)?)? {
        Joined::Verified => ExitStatus::Success,
        Joined::Failed => ExitStatus::SomeFailed,
        Joined::VerifiedWithoutIdentity => ExitStatus::NoIdentity,
    })
}
