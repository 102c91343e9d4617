//! `ka generate`: ka's man pages and shell completions, written from the
//! command line's own definition so they never drift from it. Packagers run
//! it (`scripts/package`); users read what it writes. It is parsed apart
//! from [`Cli`], which the pages and completions describe, so that neither
//! offers it (clap's bash completions would offer even a hidden subcommand).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use super::{Cli, ExitStatus};

/// Write ka's man pages or shell completions (for packagers).
#[derive(Debug, Parser)]
#[command(name = "ka generate", bin_name = "ka generate", version = super::version())]
pub struct GenerateCli {
    #[command(subcommand)]
    what: Generated,
}

#[derive(Debug, Subcommand)]
enum Generated {
    /// One man page per command into DIR: ka.1, ka-serve.1, ka-pxe-set.1, ….
    Man {
        /// Directory to write them to (created if missing).
        dir: PathBuf,
    },
    /// Completions for bash (ka.bash), zsh (_ka) and fish (ka.fish) into DIR.
    Completions {
        /// Directory to write them to (created if missing).
        dir: PathBuf,
    },
}

/// The shells `ka generate completions` writes for: those Debian has
/// standard completion directories for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Runs `ka generate …` if that is what `args` (the whole command line,
/// program name first) asks for; `None` for any other command.
pub fn run_if_asked(args: &[OsString]) -> Option<Result<ExitStatus>> {
    if args.get(1)? != "generate" {
        return None;
    }
    let parsed = GenerateCli::parse_from(&args[1..]);
    Some(run(parsed))
}

/// Runs `ka generate`.
pub fn run(args: GenerateCli) -> Result<ExitStatus> {
    match args.what {
        Generated::Man { dir } => man_pages(&dir)?,
        Generated::Completions { dir } => completions(&dir)?,
    }
    Ok(ExitStatus::Success)
}

/// Writes a man page for `ka` and each of its (visible) subcommands.
pub fn man_pages(dir: &Path) -> Result<()> {
    create(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))
}

/// Writes the completion script of each of [`SHELLS`].
pub fn completions(dir: &Path) -> Result<()> {
    create(dir)?;
    let mut cmd = Cli::command();
    for shell in SHELLS {
        clap_complete::generate_to(shell, &mut cmd, "ka", dir)
            .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
    }
    Ok(())
}

fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_command_line_starting_with_generate_is_taken() {
        let args = |words: &[&str]| words.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(run_if_asked(&args(&["ka"])).is_none());
        assert!(run_if_asked(&args(&["ka", "serve", "generate"])).is_none());
        let dir = tempfile::tempdir().unwrap();
        let man = dir.path().join("man");
        let line = args(&["ka", "generate", "man", man.to_str().unwrap()]);
        let status = run_if_asked(&line).expect("taken").unwrap();
        assert_eq!(status, ExitStatus::Success);
        assert!(man.join("ka.1").is_file());
    }

    #[test]
    fn man_pages_cover_every_visible_command_and_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        for page in [
            "ka.1",
            "ka-serve.1",
            "ka-join.1",
            "ka-tftp.1",
            "ka-pxe-set.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is no man page:\n{text}");
        }
        assert!(!dir.path().join("ka-generate.1").exists());
        let top = std::fs::read_to_string(dir.path().join("ka.1")).unwrap();
        assert!(!names_generate(&top), "the hidden command leaked:\n{top}");
    }

    #[test]
    fn completions_are_written_for_bash_zsh_and_fish() {
        let dir = tempfile::tempdir().unwrap();
        completions(dir.path()).unwrap();
        for file in ["ka.bash", "_ka", "ka.fish"] {
            let text = std::fs::read_to_string(dir.path().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(text.contains("serve"), "{file} lacks the subcommands");
            assert!(!names_generate(&text), "{file} offers the hidden command");
        }
    }

    /// Whether `text` names the hidden command (not merely the word
    /// "generated", which help texts use).
    fn names_generate(text: &str) -> bool {
        text.lines()
            .any(|l| l.contains("generate") && !l.contains("generated"))
    }
}
