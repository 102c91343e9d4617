//! How `ka` ends: the exit status scripts can trust, in one place, and the
//! text `ka --help` shows about it.

use std::process::ExitCode;

use crate::netboot::install;

/// The process exit status of a `ka` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: every node verified its copy; for other commands, done.
    Success,
    /// 1: the session ran, but some nodes failed; `ka doctor`: some
    /// checks failed.
    SomeFailed,
    /// 2: ka could not run (the message says why and what to do).
    CouldNotRun,
    /// 3: `ka join --identity`: the copy is verified, but its identity was
    /// not applied.
    NoIdentity,
    /// `ka netboot install`: what the image's init does next (its own
    /// codes, listed in `ka netboot install --help`).
    Installer(install::Exit),
}

impl ExitStatus {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::SomeFailed => 1,
            ExitStatus::CouldNotRun => 2,
            ExitStatus::NoIdentity => 3,
            ExitStatus::Installer(e) => e as u8,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// The exit statuses as `ka --help` lists them.
pub const HELP: &str = "\
Exit status:
  0  every node verified its copy (other commands: done)
  1  the session ran, but some nodes failed (ka doctor: some checks failed)
  2  ka could not run (the message says why and what to do next)
  3  ka join --identity: the copy is verified, but its identity was not applied
`ka netboot install` has its own codes for the image's init: see its --help.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_status_with_its_code() {
        for status in [
            ExitStatus::Success,
            ExitStatus::SomeFailed,
            ExitStatus::CouldNotRun,
            ExitStatus::NoIdentity,
        ] {
            let line = format!("\n  {}  ", status.code());
            assert!(HELP.contains(&line), "{status:?} missing from the help");
        }
    }
}
