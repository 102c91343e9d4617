//! The `ka` command line: one module per subcommand. Each turns its clap
//! arguments into a validated plan (a plain struct), runs it through the
//! library ([`crate::session`], [`crate::boot`], [`crate::netboot`]), and
//! returns an [`ExitStatus`] or an error that says what to do next.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;

use clap::{Parser, Subcommand};

use crate::session::reach::{Reach, DEFAULT_DISCOVER_TO};
use crate::session::{DEFAULT_SESSION, DEFAULT_STATE_DIR};

pub mod console;
pub mod demo;
pub mod dhcp;
pub mod display;
pub mod doctor;
pub mod events;
pub mod exit;
pub mod generate;
pub mod go;
pub mod join;
pub mod key;
pub mod netboot;
pub mod pxe;
pub mod serve;
pub mod status;
pub mod tftp;

pub use exit::ExitStatus;

/// Where the inventory is read from unless `--inventory` says otherwise.
pub const DEFAULT_INVENTORY: &str = "/etc/ka/cluster.toml";

/// The variable every `--inventory` falls back to, so one export serves a
/// whole shell session (or a systemd unit) of `ka pxe`, `ka tftp`, ….
pub const INVENTORY_ENV: &str = "KA_INVENTORY";

/// The variable every `--secret-file` falls back to.
pub const SECRET_FILE_ENV: &str = "KA_SECRET_FILE";

/// What `ka --version` prints after the name: the crate version, the
/// protocol version (a source and a node must share it to talk), and the
/// commit it was built from, so a report names exactly what ran.
pub fn version() -> &'static str {
    static VERSION: LazyLock<String> = LazyLock::new(|| {
        let revision = match env!("KA_REVISION") {
            "" => "unknown revision".to_string(),
            commit => format!("revision {commit}"),
        };
        format!(
            "{} (protocol {}, {revision})",
            env!("CARGO_PKG_VERSION"),
            ka_core::codec::PROTOCOL_VERSION
        )
    });
    VERSION.as_str()
}

/// What `ka --help` says ka is, after the one-line summary.
const LONG_ABOUT: &str = "\
Clone one machine onto hundreds at once, through a self-healing chain of TCP connections.

The source streams a disk image, a directory tree or a whole running system
to the first node, which writes it to its disk while it forwards the same
bytes to the next: cloning hundreds of machines takes about as long as
cloning one. A node that dies is cut out within a second and the chain heals
around it; every copy is verified against a keyed digest; nobody without the
session's key can join, pose as the source or fake a success. Around the
chain, ka serves PXE over TFTP, keeps a boot mode per node and writes DHCP
configuration, so bare machines netboot into the installer and come back up
from their new disk.";

/// The typical sequence of commands, under `ka --help`.
const TYPICAL_USE: &str = "\
A cluster install, on the boot server (README.md tells it step by step):
  ka dhcp config -f dnsmasq -o /etc/dnsmasq.d/ka.conf   # DHCP points the nodes at ka
  ka netboot build -o /srv/ka/tftp                      # the image install-mode nodes boot
  ka pxe set --mode install --all                       # their next boot joins the clone
  ka tftp                                               # serves it, and each node its key
  ka serve -i /etc/ka/cluster.toml --image /dev/sda     # the session the inventory describes
Then power the nodes on: each one boots the image, joins, writes its disk,
and once its copy is verified is flipped back to boot from it.
On this machine alone, without a network: ka demo";

/// Everything `ka --help` shows after the options: how ka is used, and how
/// it ends.
fn after_help() -> &'static str {
    static AFTER_HELP: LazyLock<String> =
        LazyLock::new(|| format!("{TYPICAL_USE}\n\n{}", exit::HELP));
    AFTER_HELP.as_str()
}

/// Clone one machine onto many, through a self-healing chain of TCP connections.
#[derive(Debug, Parser)]
#[command(
    name = "ka",
    version = version(),
    about,
    long_about = LONG_ABOUT,
    after_help = after_help(),
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `ka`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an image to a session of nodes (the source; the original ka-d-server).
    // Boxed: its flags outweigh every other subcommand's.
    Serve(Box<serve::ServeArgs>),
    /// Join a session and write its image to a target (a node; the original ka-d-client).
    Join(join::JoinArgs),
    /// Start a waiting session now with the nodes present (the original -g).
    Go(go::GoArgs),
    /// Show a running session's table from another terminal.
    Status(status::StatusArgs),
    /// Follow a node's (or every node's) log lines live at the source.
    Console(console::ConsoleArgs),
    /// The keys of a session's nodes: derive one node's own key from the secret.
    Key(key::KeyArgs),
    /// Clone a generated image onto local nodes, verify every copy, print the report.
    Demo(demo::DemoArgs),
    /// Per-node boot modes: install, local, shell (the successor of ka_pxe_step).
    Pxe(pxe::PxeArgs),
    /// Serve PXE files and per-node boot configs over TFTP.
    Tftp(tftp::TftpArgs),
    /// DHCP server configuration and MAC harvesting.
    Dhcp(dhcp::DhcpArgs),
    /// The netboot image install-mode nodes boot: build it, or run inside it.
    Netboot(netboot::NetbootArgs),
    /// Check the boot server from a node's point of view: TFTP, DHCP, image, source.
    Doctor(doctor::DoctorArgs),
}

impl Command {
    /// How much the command logs unless `RUST_LOG` says otherwise: request
    /// logs are what an administrator watches `ka tftp` for; the other
    /// commands stay quiet unless something is wrong.
    pub fn log_level(&self) -> tracing::Level {
        match self {
            Command::Tftp(_) => tracing::Level::INFO,
            _ => tracing::Level::WARN,
        }
    }

    /// Runs the command.
    pub fn run(self) -> anyhow::Result<ExitStatus> {
        match self {
            Command::Serve(args) => serve::run(*args),
            Command::Join(args) => join::run(args),
            Command::Go(args) => go::run(args),
            Command::Status(args) => status::run(args),
            Command::Console(args) => console::run(args),
            Command::Key(args) => key::run(args),
            Command::Demo(args) => demo::run(args),
            Command::Pxe(args) => pxe::run(args),
            Command::Tftp(args) => tftp::run(args),
            Command::Dhcp(args) => dhcp::run(args),
            Command::Netboot(args) => netboot::run(args),
            Command::Doctor(args) => doctor::run(args),
        }
    }
}

/// The inventory and state directory, shared by the boot subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Inventory file naming the cluster (see docs/inventory.md).
    #[arg(long, short = 'i', value_name = "FILE", env = INVENTORY_ENV, default_value = DEFAULT_INVENTORY, global = true)]
    pub inventory: PathBuf,
    /// Directory where boot modes persist.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
}

/// A session, its secret, and how to reach its source: named, or found by
/// UDP broadcast (the original's way, for nodes that boot before the source).
#[derive(Debug, Clone, clap::Args)]
pub struct ReachArgs {
    /// The source, HOST or HOST:PORT; without it the source of the session is
    /// found by UDP broadcast.
    #[arg(long)]
    pub server: Option<String>,
    /// Where discovery broadcasts go when --server is not given.
    #[arg(long, default_value_t = DEFAULT_DISCOVER_TO)]
    pub discover_to: SocketAddr,
    /// Session name.
    #[arg(long, default_value = DEFAULT_SESSION)]
    pub session: String,
    /// File holding the session secret the source wrote, or (ka join) this
    /// node's own key from ka key derive or ka tftp.
    #[arg(long, visible_alias = "key-file", value_name = "FILE", env = SECRET_FILE_ENV)]
    pub secret_file: PathBuf,
}

impl From<ReachArgs> for Reach {
    fn from(a: ReachArgs) -> Reach {
        Reach {
            server: a.server,
            discover_to: a.discover_to,
            session: a.session,
            secret_file: a.secret_file,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_shows_the_exit_status() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("some nodes failed"), "{help}");
    }

    #[test]
    fn help_says_what_ka_is_and_how_it_is_used() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("self-healing chain"), "{help}");
        for step in ["ka netboot build", "ka tftp", "ka pxe set", "ka serve"] {
            assert!(help.contains(step), "{step} missing from:\n{help}");
        }
        let hidden = help
            .lines()
            .any(|l| l.contains("generate") && !l.contains("generated"));
        assert!(!hidden, "the hidden command shows:\n{help}");
    }

    #[test]
    fn version_names_the_crate_the_protocol_and_the_revision() {
        let version = Cli::command().render_version().to_string();
        let want = format!(
            "ka {} (protocol {}, ",
            env!("CARGO_PKG_VERSION"),
            ka_core::codec::PROTOCOL_VERSION
        );
        assert!(version.starts_with(&want), "{version:?}");
        let revision = version.trim_end().strip_prefix(&want).unwrap();
        let revision = revision.strip_suffix(')').expect("closing parenthesis");
        match revision.strip_prefix("revision ") {
            Some(commit) => assert!(
                commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
                "{version:?}"
            ),
            None => assert_eq!(revision, "unknown revision", "{version:?}"),
        }
    }

    #[test]
    fn version_names_the_commit_of_this_checkout() {
        // The build script reruns whenever HEAD moves, so this holds after
        // every commit and checkout, not only the first build.
        let head = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("git is needed to check the revision ka --version names");
        assert!(
            head.status.success(),
            "this test runs in a git checkout: {}",
            String::from_utf8_lossy(&head.stderr)
        );
        let head = String::from_utf8(head.stdout).unwrap();
        let commit = env!("KA_REVISION");
        assert!(
            !commit.is_empty() && head.starts_with(commit),
            "ka --version names {commit:?}, HEAD is {head}"
        );
        assert!(version().contains(&format!("revision {commit})")));
    }

    /// The `ka …` lines of every help text, split as a shell would.
    fn example_lines(cmd: &clap::Command, out: &mut Vec<(String, Vec<String>)>) {
        let texts = [cmd.get_after_help(), cmd.get_after_long_help()];
        for text in texts.into_iter().flatten() {
            for line in text.to_string().lines() {
                let line = line.trim();
                if !line.starts_with("ka ") {
                    continue;
                }
                // A comment after the command says what it does.
                let command = line.split("  #").next().unwrap();
                let words = shlex::split(command)
                    .unwrap_or_else(|| panic!("unbalanced quotes in {line:?}"));
                out.push((cmd.get_name().to_string(), words));
            }
        }
        for sub in cmd.get_subcommands() {
            example_lines(sub, out);
        }
    }

    #[test]
    fn every_example_in_the_help_parses() {
        let mut examples = Vec::new();
        example_lines(&Cli::command(), &mut examples);
        for (name, words) in &examples {
            if let Err(e) = Cli::try_parse_from(words) {
                panic!("the example {words:?} under `{name}` does not parse:\n{e}");
            }
            if name != "ka" {
                assert_eq!(&words[1], name, "an example of another command: {words:?}");
            }
        }
        for name in ["ka", "serve", "join", "pxe", "tftp", "dhcp"] {
            let count = examples.iter().filter(|(n, _)| n == name).count();
            assert!(count >= 2, "`{name}` shows {count} examples");
        }
    }

    #[test]
    fn help_names_the_environment_variables() {
        let mut cmd = Cli::command();
        cmd.build();
        for path in [
            &["pxe"][..],
            &["tftp"],
            &["dhcp", "config"],
            &["dhcp", "harvest"],
            &["serve"],
            &["doctor"],
        ] {
            let help = subcommand(&cmd, path)
                .clone()
                .render_long_help()
                .to_string();
            assert!(help.contains("[env: KA_INVENTORY"), "{path:?}:\n{help}");
        }
        for path in [
            &["serve"][..],
            &["join"],
            &["go"],
            &["tftp"],
            &["key", "derive"],
            &["doctor"],
        ] {
            let help = subcommand(&cmd, path)
                .clone()
                .render_long_help()
                .to_string();
            assert!(help.contains("[env: KA_SECRET_FILE"), "{path:?}:\n{help}");
        }
    }

    #[test]
    fn the_packaged_tftp_unit_runs_a_command_ka_accepts() {
        let unit = include_str!("../../debian/ka-tftp.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ka-tftp.service has an ExecStart");
        // What systemd makes of it with no KA_TFTP_ARGS: %d is the
        // credentials directory, an unset $VAR no word at all.
        let words: Vec<String> = exec
            .replace("%d", "/run/credentials/ka-tftp.service")
            .split_whitespace()
            .filter(|w| !w.starts_with('$'))
            .map(String::from)
            .collect();
        assert_eq!(words[0], "/usr/bin/ka", "{exec}");
        let parsed = Cli::try_parse_from(&words).unwrap_or_else(|e| panic!("{exec}:\n{e}"));
        assert!(matches!(parsed.command, Command::Tftp(_)), "{exec}");
    }

    fn subcommand<'a>(cmd: &'a clap::Command, path: &[&str]) -> &'a clap::Command {
        path.iter().fold(cmd, |c, name| {
            c.find_subcommand(name)
                .unwrap_or_else(|| panic!("no subcommand {name}"))
        })
    }
}
