//! `ka key`: the keys of a session's nodes, for an operator who hands them
//! out by hand (`ka tftp --secret-file` hands netbooting nodes theirs).

use std::path::PathBuf;

use anyhow::bail;

use super::ExitStatus;
use crate::session::{check_session_name, is_name, secret, DEFAULT_SESSION};

/// `ka key`: the keys of a session's nodes.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// The subcommands of `ka key`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Write one node's own key, derived from the session secret: a node
    /// given it (ka join --secret-file KEY) can join as that node only,
    /// where one given the secret could pose as any node or as the source.
    Derive(DeriveArgs),
}

/// Arguments of `ka key derive`.
#[derive(Debug, clap::Args)]
pub struct DeriveArgs {
    /// The session secret (the file ka serve wrote, or was given).
    #[arg(long, value_name = "FILE", env = super::SECRET_FILE_ENV)]
    pub secret_file: PathBuf,
    /// Session name.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// The node's name, as it joins (ka join --name, the inventory's name).
    #[arg(long)]
    pub name: String,
    /// Where to write the key (mode 0600, never replacing a file); `-` for
    /// standard output.
    #[arg(long, short, value_name = "FILE", default_value = "-")]
    pub out: PathBuf,
}

/// Runs `ka key`.
pub fn run(args: KeyArgs) -> anyhow::Result<ExitStatus> {
    match args.command {
        KeyCommand::Derive(a) => derive(a),
    }
}

fn derive(a: DeriveArgs) -> anyhow::Result<ExitStatus> {
    check_session_name(&a.session)?;
    if !is_name(&a.name) || a.name.len() > ka_core::codec::MAX_STRING {
        bail!(
            "node name {:?} is not usable: use letters, digits, '.', '_' or '-'",
            a.name.chars().take(80).collect::<String>()
        );
    }
    let secret = secret::load(&a.secret_file)?;
    let key = secret::key(&secret, &a.session).node_key(&a.session, &a.name);
    secret::write_node_key(&key, &a.out)?;
    if a.out != std::path::Path::new("-") {
        crate::errln!(
            "ka: wrote the key of node {} in session {} to {}: give it to that node only (ka join --secret-file {})",
            a.name,
            a.session,
            a.out.display(),
            a.out.display()
        );
    }
    Ok(ExitStatus::Success)
}
