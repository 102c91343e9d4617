//! Child processes behind command and tar sources and sinks.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::Error;

/// How much of a child's standard error is kept for the error message: enough
/// for tar's or a shell's last complaint, bounded whatever the child prints.
const STDERR_TAIL: usize = 4096;

/// A child process whose standard error is drained into a bounded tail (so a
/// chatty child never blocks on a full pipe) and which is killed, by its own
/// PID, if dropped before it was waited for.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    label: String,
    tail: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
    waited: bool,
}

/// Asks for a 1 MiB pipe buffer (the default `pipe-max-size`) instead of the
/// default 64 KiB, so a stream moves in a few large reads or writes per
/// buffer rather than sixteen small ones. Best effort: a smaller limit just
/// keeps the default.
pub fn widen_pipe(fd: &impl std::os::fd::AsRawFd) {
    let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// Runs a short command (a probe, a partitioner, a mkfs) to completion, with
/// `input` on its standard input if given, and returns its standard output.
/// An exit other than success becomes [`Error::Command`] with the tail of
/// its standard error, so the message says what the tool itself objected to.
pub fn run_captured(mut command: Command, input: Option<&[u8]>) -> Result<Vec<u8>, Error> {
    let label = command_label(&command);
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| Error::io(format!("starting `{label}`"), e))?;
    // Fed from a thread: a tool that writes before it has read all its input
    // would otherwise block on a full pipe while we block on its stdin.
    let feeder = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(input)) => {
            let input = input.to_vec();
            Some(std::thread::spawn(move || {
                use std::io::Write;
                // A tool that exits without reading it all is judged by its
                // exit status, not by this write.
                let _ = stdin.write_all(&input);
            }))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for `{label}`"), e))?;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    if out.status.success() {
        return Ok(out.stdout);
    }
    let tail = &out.stderr[out.stderr.len().saturating_sub(STDERR_TAIL)..];
    Err(Error::Command {
        command: label,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(tail).trim().to_string(),
    })
}

/// `program arg arg…`, for messages.
fn command_label(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Supervised {
    /// Spawns `command` with standard error captured; `label` names it in errors.
    pub fn spawn(mut command: Command, label: String) -> Result<Self, Error> {
        command.stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(format!("starting `{label}`"), e))?;
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let tail = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&tail);
        let drain = std::thread::Builder::new()
            .name("ka-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stderr.read(&mut buf) {
                    let mut t = sink.lock().expect("stderr tail lock");
                    t.extend_from_slice(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            })
            .map_err(|e| Error::io("starting a stderr reader thread", e))?;
        Ok(Supervised {
            child,
            label,
            tail,
            drain: Some(drain),
            waited: false,
        })
    }

    /// The child.
    pub fn child(&self) -> &Child {
        &self.child
    }

    /// The child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the child and returns its exit status with the tail of its
    /// standard error, for callers that take some failures as warnings
    /// (tar's "file changed as we read it").
    pub fn wait_with_stderr(&mut self) -> Result<(std::process::ExitStatus, String), Error> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("waiting for `{}`", self.label), e))?;
        self.waited = true;
        if let Some(d) = self.drain.take() {
            // The child has exited, so its stderr reaches EOF unless a
            // grandchild still holds it; the reader then ends with it.
            let _ = d.join();
        }
        let stderr = String::from_utf8_lossy(&self.tail.lock().expect("stderr tail lock"))
            .trim()
            .to_string();
        Ok((status, stderr))
    }

    /// Waits for the child; an exit other than success becomes
    /// [`Error::Command`] with the tail of its standard error.
    pub fn wait_success(&mut self) -> Result<(), Error> {
        let (status, stderr) = self.wait_with_stderr()?;
        if status.success() {
            return Ok(());
        }
        Err(Error::Command {
            command: self.label.clone(),
            status: status.to_string(),
            stderr,
        })
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if !self.waited {
            // An abandoned transfer: stop the child rather than leak it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
