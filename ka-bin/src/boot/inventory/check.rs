//! Checking an inventory: every problem is collected with its file, line,
//! column and field, so one run reports them all.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use super::model::Network;
use super::raw::S;
use crate::boot::mac::Mac;
use crate::netboot::cmdline::CloneKind;

/// One problem found in an inventory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field concerned, e.g. `node.mac` (empty for syntax errors).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
    /// The text of the offending line.
    pub source_line: String,
}

/// Why an inventory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read inventory {}: {source} (pass the right file with --inventory FILE)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid inventory.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Everything wrong with it, in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let field = if p.field.is_empty() {
            String::new()
        } else {
            format!("{}: ", p.field)
        };
        out.push_str(&format!(
            "{}:{}:{}: {field}{}\n  {:>4} | {}",
            path.display(),
            p.line,
            p.column,
            p.message,
            p.line,
            p.source_line
        ));
    }
    out
}

/// Collects problems against the source text, so one run reports them all.
pub(super) struct Checker<'a> {
    /// The file's text.
    pub(super) text: &'a str,
    /// What is wrong so far.
    pub(super) problems: Vec<Problem>,
}

impl Checker<'_> {
    /// Records a problem at `span` of the text.
    pub(super) fn report(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        let source_line = self.text.lines().nth(line - 1).unwrap_or("").to_string();
        self.problems.push(Problem {
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            source_line,
        });
    }

    /// An IPv4 address.
    pub(super) fn ipv4(&mut self, s: &S, field: &str) -> Option<Ipv4Addr> {
        match s.get_ref().trim().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.report(
                    s.span(),
                    field,
                    format!(
                        "`{}` is not an IPv4 address like 192.168.10.11",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A NIC's own MAC address (not multicast, not zero).
    pub(super) fn mac(&mut self, s: &S, field: &str) -> Option<Mac> {
        match s.get_ref().trim().parse::<Mac>() {
            Ok(mac) if mac.is_multicast() || mac.0 == [0; 6] => {
                self.report(
                    s.span(),
                    field,
                    format!(
                        "{mac} is a multicast or zero address, never a NIC's own; check for a typo"
                    ),
                );
                None
            }
            Ok(mac) => Some(mac),
            Err(e) => {
                self.report(s.span(), field, e.to_string());
                None
            }
        }
    }

    /// A path inside the TFTP root: relative, no `..`.
    pub(super) fn tftp_path(&mut self, s: &S, field: &str) -> String {
        let p = s.get_ref().trim();
        let ok = !p.is_empty()
            && Path::new(p)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !ok {
            self.report(
                s.span(),
                field,
                format!("`{p}` must be a path relative to boot.tftp_root, without `..`"),
            );
        }
        p.to_string()
    }

    /// A name: letters, digits, `-`, `_` and `.`.
    pub(super) fn word(&mut self, s: &S, field: &str, what: &str) -> String {
        let w = s.get_ref().trim();
        if !crate::session::is_name(w) {
            self.report(
                s.span(),
                field,
                format!("`{w}` is not a valid {what}: use letters, digits, `-`, `_` and `.`"),
            );
        }
        w.to_string()
    }

    /// Kernel arguments, on one line, spaces normalized.
    pub(super) fn args(&mut self, s: &Option<S>, field: &str) -> String {
        match s {
            Some(s) if s.get_ref().contains(['\n', '\r']) => {
                self.report(s.span(), field, "kernel arguments must fit on one line");
                String::new()
            }
            // Boot configs go to whoever asks for them: a secret there is
            // everyone's.
            Some(s) if s.get_ref().split_whitespace().any(is_inline_secret) => {
                self.report(
                    s.span(),
                    field,
                    "ka.secret= with the secret itself hands it to anyone on the boot network: \
                     remove it; ka tftp --secret-file hands each install-mode node its own key",
                );
                String::new()
            }
            Some(s) => s.get_ref().split_whitespace().collect::<Vec<_>>().join(" "),
            None => String::new(),
        }
    }

    /// A device path like /dev/sda; for a system clone, one or more
    /// separated by commas (one per disk of the source).
    pub(super) fn disk(&mut self, s: &S, field: &str, clone: CloneKind) -> String {
        let d = s.get_ref().trim();
        let disks: Vec<&str> = d.split(',').collect();
        if let Some(bad) = disks
            .iter()
            .find(|d| !d.starts_with('/') || d.contains(char::is_whitespace))
        {
            self.report(
                s.span(),
                field,
                format!("`{bad}` is not a device path like /dev/sda"),
            );
        } else if disks.len() > 1 && clone == CloneKind::Image {
            self.report(
                s.span(),
                field,
                format!(
                    "`{d}` names {} disks, but an image goes onto one: name one, or set \
                     clone = \"system\" in [session] for system clones",
                    disks.len()
                ),
            );
        }
        d.to_string()
    }
}

/// The 1-based line and column of byte `offset` of `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Whether `ip` is a usable host address of `net`; reports it if not.
pub(super) fn check_ip_in(
    ck: &mut Checker<'_>,
    ip: Ipv4Addr,
    span: Range<usize>,
    field: &str,
    net: &Network,
) -> bool {
    if !net.contains(ip) {
        ck.report(span, field, format!("{ip} is outside the subnet {net}"));
        false
    } else if net.prefix < 31 && (ip == net.address || ip == net.broadcast()) {
        ck.report(
            span,
            field,
            format!("{ip} is the network or broadcast address of {net}"),
        );
        false
    } else {
        true
    }
}

/// Whether a kernel argument puts a ka secret (64 hex digits) on the command line.
fn is_inline_secret(arg: &str) -> bool {
    arg.strip_prefix("ka.secret=")
        .is_some_and(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}
