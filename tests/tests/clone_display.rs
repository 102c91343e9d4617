//! The operator's view: on a terminal, `ka demo` (the same display as
//! `ka serve`) draws one live progress bar per node, then the report table.
//! The terminal is a real pseudo-terminal, so the display's own terminal
//! detection decides, as it would for an operator.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ka_tests::{ka_bin, strip_ansi, ChildGuard};
use nix::pty::{openpty, Winsize};

#[test]
fn a_terminal_gets_one_progress_bar_per_node_and_the_report() {
    let size = Winsize {
        ws_row: 40,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).expect("open a pseudo-terminal");
    let child = Command::new(ka_bin())
        .args(["demo", "--nodes", "3", "--size", "512MiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .expect("start ka demo");
    let mut guard = ChildGuard {
        child,
        what: "ka demo".into(),
    };
    // Everything the bars drew; the reader ends when the last holder of the
    // terminal's other end (the demo) exits.
    let mut master = std::fs::File::from(pty.master);
    let screen = std::thread::spawn(move || {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&raw).into_owned()
    });
    let mut out = guard.child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ka demo still running after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let screen = strip_ansi(&screen.join().unwrap());
    assert!(status.success(), "demo failed:\n{stdout}\n{screen}");
    for node in ["node00", "node01", "node02"] {
        // Bars are redrawn in place with cursor moves, not new lines: look
        // at what follows each drawing of the node's name.
        let drawings: Vec<&str> = screen
            .match_indices(&format!("{node} "))
            .map(|(at, _)| &screen[at..(at + 100).min(screen.len())])
            .collect();
        assert!(
            drawings
                .iter()
                .any(|d| d.contains('[') && d.contains("% ") && d.contains("/s ETA")),
            "no progress bar for {node} in:\n{screen}"
        );
        assert!(
            drawings
                .iter()
                .any(|d| d.contains("100%") && d.contains("OK")),
            "{node}'s bar never showed it done and OK:\n{screen}"
        );
    }
    assert!(stdout.contains("3/3 nodes OK"), "{stdout}");
    // The report lists nodes by name, whatever order they joined in.
    let rows: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("node0"))
        .collect();
    assert_eq!(rows, ["node00", "node01", "node02"], "{stdout}");
    assert!(
        stdout.contains("3/3 copies byte-identical"),
        "the demo's independent check is missing:\n{stdout}"
    );
}
