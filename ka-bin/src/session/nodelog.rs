//! The source's record of every node: one file per node
//! (`<log dir>/<node>.log`, each line stamped with the time), and the
//! system log, so `tail -f` of one file tells a node's whole story and
//! `journalctl -f` (or `tail -f /var/log/syslog`) follows the whole
//! cluster.
//!
//! The system log is reached through `/dev/log`, as an RFC 3164 datagram
//! tagged `ka` whose message is `NODE: line`. That one socket is served by
//! journald on systemd machines and by rsyslog or syslog-ng elsewhere, so
//! one path reaches whichever the source runs, where journald's native
//! socket would reach journald only. Where no such socket exists the
//! source says so once and goes on; `KA_SYSLOG_SOCKET` names another
//! socket (for tests and containers).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The environment variable that names the system log's socket instead of
/// `/dev/log`: for tests (which must not write to the machine's log) and
/// containers.
pub const SYSLOG_SOCKET_ENV: &str = "KA_SYSLOG_SOCKET";

/// Where a session's node logs go unless told otherwise: `/var/log/ka/SESSION`.
pub fn default_log_dir(session: &str) -> PathBuf {
    Path::new("/var/log/ka").join(session)
}

/// The file of node `name` in `dir`. Node names are proved by their keys,
/// but a name is still never allowed to leave the directory.
pub fn node_file(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    let safe = match safe.as_str() {
        "" | "." | ".." => format!("_{safe}"),
        _ => safe,
    };
    dir.join(format!("{safe}.log"))
}

/// Creates `dir` (and its parents) for node logs, readable by its group at
/// most (0750), and refuses one that is a symbolic link: whoever could
/// plant one would have the source write where they chose.
pub fn make_log_dir(dir: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the log directory {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o750).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("creating the log directory {}", dir.display()))
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("reading the log directory {}", dir.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!(
            "the log directory {} is a symbolic link or not a directory: remove it, or pass another --log-dir",
            dir.display()
        );
    }
    if meta.permissions().mode() & 0o027 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .with_context(|| format!("restricting the log directory {}", dir.display()))?;
    }
    Ok(())
}

/// The system log's socket, written to without ever blocking the source.
struct Syslog {
    socket: UnixDatagram,
    path: PathBuf,
    pid: u32,
}

impl Syslog {
    /// The socket at `KA_SYSLOG_SOCKET`, else `/dev/log`; `None` (said once
    /// on standard error) when there is none.
    fn open() -> Option<Syslog> {
        let path = std::env::var_os(SYSLOG_SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/log"));
        let socket = UnixDatagram::unbound().ok()?;
        if let Err(e) = socket.connect(&path) {
            crate::errln!(
                "ka: no system log at {} ({e}): node lines go to their log files only",
                path.display()
            );
            return None;
        }
        let _ = socket.set_nonblocking(true);
        Some(Syslog {
            socket,
            path,
            pid: std::process::id(),
        })
    }

    /// Sends `NODE: line` tagged `ka`, at facility daemon, level info. A
    /// full socket drops the line: the log must never stall the clone.
    fn send(&self, node: &str, line: &str) -> std::io::Result<()> {
        let msg = format!("<30>ka[{}]: {node}: {line}", self.pid);
        match self.socket.send(msg.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other.map(drop),
        }
    }
}

/// The open log files of a session's nodes and the system log.
pub struct NodeLogs {
    dir: Option<PathBuf>,
    files: HashMap<String, File>,
    syslog: Option<Syslog>,
}

impl NodeLogs {
    /// Logs in `dir` (made if missing, see [`make_log_dir`]), or none; to
    /// the system log too unless `syslog` is false.
    pub fn new(dir: Option<PathBuf>, syslog: bool) -> NodeLogs {
        NodeLogs {
            dir,
            files: HashMap::new(),
            syslog: if syslog { Syslog::open() } else { None },
        }
    }

    /// Appends `lines` to node `name`'s file, each stamped with the time,
    /// and sends them to the system log.
    pub fn write(&mut self, name: &str, lines: &[String]) {
        if let Some(syslog) = &self.syslog {
            for line in lines {
                if let Err(e) = syslog.send(name, line) {
                    crate::errln!(
                        "ka: the system log at {} stopped taking lines ({e}): node lines go to their log files only",
                        syslog.path.display()
                    );
                    self.syslog = None;
                    break;
                }
            }
        }
        let Some(file) = self.file(name) else {
            return;
        };
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut text = String::new();
        for line in lines {
            text.push_str(&stamp);
            text.push(' ');
            text.push_str(line);
            text.push('\n');
        }
        if let Err(e) = file.write_all(text.as_bytes()) {
            crate::errln!("ka: writing the log of {name}: {e}");
        }
    }

    /// Node `name`'s file, opened on first use: created 0640, appended to,
    /// never through a symbolic link.
    fn file(&mut self, name: &str) -> Option<&mut File> {
        let dir = self.dir.as_ref()?;
        if !self.files.contains_key(name) {
            let path = node_file(dir, name);
            let opened = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path);
            match opened {
                Ok(f) => {
                    self.files.insert(name.to_string(), f);
                }
                Err(e) => {
                    crate::errln!(
                        "ka: cannot open the log of {name} at {} ({e}); not logging it",
                        path.display()
                    );
                    return None;
                }
            }
        }
        self.files.get_mut(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_name_never_leaves_the_log_directory() {
        let dir = Path::new("/logs");
        assert_eq!(node_file(dir, "n1"), Path::new("/logs/n1.log"));
        assert_eq!(node_file(dir, "../etc/x"), Path::new("/logs/.._etc_x.log"));
        assert_eq!(node_file(dir, ".."), Path::new("/logs/_...log"));
        assert_eq!(node_file(dir, ""), Path::new("/logs/_.log"));
    }

    #[test]
    fn lines_go_to_the_nodes_file_stamped_and_to_the_syslog_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let sock_path = tmp.path().join("log.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let logs_dir = tmp.path().join("logs");
        make_log_dir(&logs_dir).unwrap();
        let mode = std::fs::metadata(&logs_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        let mut logs = NodeLogs {
            dir: Some(logs_dir.clone()),
            files: HashMap::new(),
            syslog: None,
        };
        let socket = UnixDatagram::unbound().unwrap();
        socket.connect(&sock_path).unwrap();
        logs.syslog = Some(Syslog {
            socket,
            path: sock_path,
            pid: 7,
        });
        logs.write("n1", &["hello".to_string()]);
        let text = std::fs::read_to_string(logs_dir.join("n1.log")).unwrap();
        assert!(text.ends_with(" hello\n"), "{text:?}");
        let mode = std::fs::metadata(logs_dir.join("n1.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o137, 0, "{mode:o}: not 0640 or narrower");
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<30>ka[7]: n1: hello");
    }

    #[test]
    fn a_symlinked_log_directory_or_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(make_log_dir(&link).is_err());
        // A planted link in place of a node's file is not followed.
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), real.join("n1.log")).unwrap();
        let mut logs = NodeLogs {
            dir: Some(real),
            files: HashMap::new(),
            syslog: None,
        };
        logs.write("n1", &["x".to_string()]);
        assert!(!tmp.path().join("elsewhere").exists());
    }
}
