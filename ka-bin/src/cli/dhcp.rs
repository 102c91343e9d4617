//! `ka dhcp`: DHCP configuration for an existing server, and MAC harvesting.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::ExitStatus;
use crate::boot::dhcp::{self, Format};
use crate::boot::harvest::{self, NamePattern};
use crate::boot::Inventory;

/// Real invocations under `ka dhcp --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # dnsmasq's host entries and PXE boot files (check: dnsmasq --test):
  ka dhcp config -f dnsmasq -o /etc/dnsmasq.d/ka.conf
  # ISC dhcpd's, from another inventory, on standard output:
  ka dhcp config -f isc -i /etc/ka/lab.toml
  # [[node]] entries for the MACs seen while nodes were powered on one by one:
  ka dhcp harvest /var/lib/misc/dnsmasq.leases --ip-base 10.0.0.101 --pattern 'node{:03}'";

/// Arguments of `ka dhcp`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct DhcpArgs {
    #[command(subcommand)]
    command: DhcpCommand,
}

#[derive(Debug, Subcommand)]
enum DhcpCommand {
    /// Write static host entries and PXE boot files for your DHCP server.
    ///
    /// BIOS clients get boot.bios_boot_file (pxelinux.0), UEFI x86-64 clients
    /// boot.uefi_boot_file (ipxe.efi), and iPXE itself boot.ipxe_script.
    /// Check the result with `dhcpd -t -cf FILE`, `dnsmasq --test
    /// --conf-file=FILE` or `kea-dhcp4 -t FILE`.
    Config {
        /// Which DHCP server reads it.
        #[arg(long, short = 'f', value_enum)]
        format: Format,
        /// Inventory file naming the cluster.
        #[arg(long, short = 'i', value_name = "FILE", env = super::INVENTORY_ENV, default_value = super::DEFAULT_INVENTORY)]
        inventory: PathBuf,
        /// Write here (atomically) instead of to standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print [[node]] entries for the MACs seen in DHCP leases or logs.
    ///
    /// Power nodes on one at a time in the order you want them numbered, then
    /// run this on the DHCP server's leases file or log (ISC dhcpd leases,
    /// dnsmasq leases, Kea's kea-leases4.csv, syslog/journal lines from
    /// dhcpd or dnsmasq). MACs keep the order they were first seen. Finding
    /// no MAC at all is an error (exit status 2).
    Harvest {
        /// Leases files or logs; `-` or none reads standard input.
        files: Vec<PathBuf>,
        /// What the files are; detected from each file's content if not given.
        #[arg(long, short = 'f', value_enum, value_name = "FORMAT")]
        format: Option<harvest::FileKind>,
        /// Name pattern: `{}` is the number, `{:03}` zero-pads it to 3 digits.
        #[arg(long, default_value = "node{:03}")]
        pattern: String,
        /// IP of the first new node; the next ones count up from it.
        #[arg(long, value_name = "IP")]
        ip_base: Ipv4Addr,
        /// Number of the first new node.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// Skip MACs this inventory already has, and names and IPs it uses.
        #[arg(long, short = 'i', value_name = "FILE", env = super::INVENTORY_ENV)]
        inventory: Option<PathBuf>,
    },
}

/// Runs `ka dhcp`.
pub fn run(args: DhcpArgs) -> Result<ExitStatus> {
    match args.command {
        DhcpCommand::Config {
            format,
            inventory,
            output,
        } => config(&inventory, format, output.as_deref())?,
        DhcpCommand::Harvest {
            files,
            format,
            pattern,
            ip_base,
            start,
            inventory,
        } => {
            let pattern = NamePattern::parse(&pattern).map_err(anyhow::Error::msg)?;
            let inv = inventory.as_ref().map(Inventory::load).transpose()?;
            let texts = read_logs(&files)?;
            harvest(&texts, format, &pattern, ip_base, start, inv.as_ref())?;
        }
    }
    Ok(ExitStatus::Success)
}

/// `ka dhcp config`: the configuration, to `output` (atomically) or
/// standard output.
fn config(inventory: &Path, format: Format, output: Option<&Path>) -> Result<()> {
    let inv = Inventory::load(inventory)?;
    let text = dhcp::render(&inv, format);
    match output {
        Some(path) => {
            crate::write_atomically(path, text.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            crate::errln!("wrote {} ({} hosts)", path.display(), inv.nodes.len());
        }
        None => crate::out!("{text}"),
    }
    Ok(())
}

/// The leases files or logs to harvest, each with the name it is reported
/// under; none or `-` is standard input.
fn read_logs(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    if files.is_empty() || files.iter().any(|f| f.as_os_str() == "-") {
        if files.len() > 1 {
            bail!("`-` (standard input) cannot be mixed with files");
        }
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        texts.push(("<stdin>".to_string(), s));
    } else {
        for f in files {
            // Logs may hold stray non-UTF-8 bytes; they never matter here.
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            texts.push((
                f.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    Ok(texts)
}

/// `ka dhcp harvest`: `[[node]]` entries for the new MACs on standard
/// output, a count on standard error.
fn harvest(
    texts: &[(String, String)],
    format: Option<harvest::FileKind>,
    pattern: &NamePattern,
    ip_base: Ipv4Addr,
    start: u64,
    inv: Option<&Inventory>,
) -> Result<()> {
    let seen = harvest::harvest_as(texts, format);
    if seen.is_empty() {
        let read: Vec<String> = texts
            .iter()
            .map(|(name, text)| {
                let kind = format.unwrap_or_else(|| harvest::detect(text));
                format!("{name} (read as {})", kind.describe())
            })
            .collect();
        bail!(
            "no MAC address found in {}: power a node on so that it asks for an address, \
             check that this is the file your DHCP server writes to (Kea: /var/lib/kea/kea-leases4.csv, \
             ISC dhcpd: /var/lib/dhcp/dhcpd.leases, dnsmasq: /var/lib/misc/dnsmasq.leases), \
             or name its format with --format",
            read.join(", ")
        );
    }
    let nodes = harvest::assign(&seen, pattern, ip_base, start, inv).map_err(anyhow::Error::msg)?;
    crate::out!("{}", harvest::to_toml(&nodes));
    crate::errln!(
        "{} MAC(s) seen, {} new{}",
        seen.len(),
        nodes.len(),
        if inv.is_some() {
            " (not in the inventory)"
        } else {
            ""
        }
    );
    Ok(())
}
