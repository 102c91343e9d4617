//! `ka pxe`: set and show per-node boot modes (the successor of
//! `ka_pxe_step`), and print the boot configs they produce.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::{ClusterArgs, ExitStatus};
use crate::boot::modes::{BootState, Mode};
use crate::boot::render;
use crate::boot::Inventory;

/// Real invocations under `ka pxe --help` (a test parses each `ka` line).
const EXAMPLES: &str = "\
Examples:
  # Reinstall a rack at its next boot, then see where every node stands:
  ka pxe set --mode install @rack1
  ka pxe show
  # Boot nodes 1 to 16 from their disks again:
  ka pxe set --mode local 'node[001-016]'
  # The pxelinux config node007 gets now:
  ka pxe render node007
  # Another cluster's inventory:
  ka pxe -i /etc/ka/lab.toml show --json";

/// Arguments of `ka pxe`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct PxeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: PxeCommand,
}

#[derive(Debug, Subcommand)]
enum PxeCommand {
    /// Set the boot mode of nodes; it applies at their next PXE boot.
    ///
    /// Nodes are names (node007), ranges (node[001-016]) or groups (@rack1).
    /// An unknown name changes nothing.
    Set {
        /// install: join the clone session; local: boot the disk; shell: netboot to a shell.
        #[arg(long, short = 'm', value_enum)]
        mode: Mode,
        /// Every node of the inventory.
        #[arg(long, conflicts_with = "nodes")]
        all: bool,
        /// Nodes to set.
        #[arg(value_name = "NODE", required_unless_present = "all")]
        nodes: Vec<String>,
    },
    /// Show every node with its MAC, IP, mode and since when.
    Show {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the boot config a node gets now (what `ka tftp` serves it).
    Render {
        /// The node.
        node: String,
        /// Print its iPXE script instead of its pxelinux config.
        #[arg(long)]
        ipxe: bool,
    },
}

/// Runs `ka pxe`.
pub fn run(args: PxeArgs) -> Result<ExitStatus> {
    let inv = Inventory::load(&args.cluster.inventory)?;
    let state = BootState::new(&args.cluster.state_dir);
    match args.command {
        PxeCommand::Set { mode, all, nodes } => set(&inv, &state, &nodes, all, mode)?,
        PxeCommand::Show { json } => show(&inv, &state, json)?,
        PxeCommand::Render { node, ipxe } => render(&inv, &state, &node, ipxe)?,
    }
    Ok(ExitStatus::Success)
}

/// `ka pxe set`: sets the nodes' mode and says which changed.
fn set(inv: &Inventory, state: &BootState, nodes: &[String], all: bool, mode: Mode) -> Result<()> {
    let changed = state.set_modes(inv, nodes, all, mode)?;
    let names: Vec<&str> = changed.iter().map(|n| n.name.as_str()).collect();
    // A whole cluster's names would bury the answer; `ka pxe show` lists them.
    let shown = if names.len() > 16 {
        format!(
            "{} … {} (see `ka pxe show`)",
            names[..8].join(" "),
            names[names.len() - 1]
        )
    } else {
        names.join(" ")
    };
    crate::outln!("{} node(s) now boot {mode}: {shown}", names.len());
    Ok(())
}

/// `ka pxe show`: every node with its MAC, IP, mode and since when.
fn show(inv: &Inventory, state: &BootState, json: bool) -> Result<()> {
    let modes = state.load()?;
    let rows: Vec<[String; 5]> = inv
        .nodes
        .iter()
        .map(|n| {
            let m = modes.get(&n.name);
            let since = match m.since {
                Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
                None => "-".to_string(),
            };
            [
                n.name.clone(),
                n.mac.to_string(),
                n.ip.to_string(),
                m.mode.to_string(),
                since,
            ]
        })
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|[name, mac, ip, mode, since]| {
                serde_json::json!({
                    "name": name, "mac": mac, "ip": ip, "mode": mode,
                    "since": (since != "-").then_some(since),
                })
            })
            .collect();
        crate::outln!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_table(["NODE", "MAC", "IP", "MODE", "SINCE"], &rows);
    }
    Ok(())
}

/// `ka pxe render`: the boot config `node` gets now.
fn render(inv: &Inventory, state: &BootState, node: &str, ipxe: bool) -> Result<()> {
    let n = inv.node(node).with_context(|| {
        format!(
            "no node `{node}` in {}; run `ka pxe show`",
            inv.path.display()
        )
    })?;
    let m = state.load()?.get(&n.name);
    let text = if ipxe {
        render::ipxe(inv, Some(n), m)
    } else {
        render::pxelinux(inv, Some(n), m)
    };
    crate::out!("{text}");
    Ok(())
}

fn print_table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
    let mut width = head.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::outln!("{}", padded.join("  ").trim_end());
    };
    line(head);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}
