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

/// Without a terminal and without `--json` (a journal, a log file), the
/// source prints a summary line every few seconds instead of silence; with
/// `--json`, both ends print only JSON lines of the documented schema
/// (docs/events.md), never Rust debug text.
#[test]
fn a_journal_gets_summary_lines_and_scripts_get_only_json() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    ka_tests::write_secret(&secret, 31);
    let image = dir.path().join("image");
    // 14 MiB at 2 MiB/s: about 7 s, past the first summary at 5 s.
    std::fs::write(&image, ka_tests::pseudo_random(14 << 20, 31)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let secret = secret.to_str().unwrap();
    let serve = |label: &str, json: bool| {
        let mut args = vec![
            "serve",
            "--nodes",
            "2",
            "--listen",
            &listen,
            "--secret-file",
            secret,
            "--image",
            image.to_str().unwrap(),
            "--max-rate",
            "2MiB",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        ka_tests::Proc::start(dir.path(), label, &args)
    };
    let join = |name: &str, json: bool| {
        let target = dir.path().join(format!("{name}.img"));
        let mut args = vec![
            "join",
            "--server",
            &listen,
            "--secret-file",
            secret,
            "--name",
            name,
            "--target",
            target.to_str().unwrap(),
            "--state-dir",
            dir.path().to_str().unwrap(),
            "--wait",
            "60s",
        ];
        if json {
            args.push("--json");
        }
        ka_tests::Proc::start(dir.path(), &format!("{name}-join"), &args)
    };

    // Plain: stderr is a file.
    let s = serve("plain", false);
    wait_listening(&s);
    let nodes = [join("a", false), join("b", false)];
    // Meanwhile, from another terminal: ka status, read from the state dir.
    let state_dir = dir.path().to_str().unwrap();
    let status = |extra: &[&str]| {
        let mut args = vec!["status", "--state-dir", state_dir];
        args.extend_from_slice(extra);
        let o = ka_tests::ka(&args);
        assert!(o.status.success(), "ka status: {}", ka_tests::stderr(&o));
        ka_tests::stdout(&o)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        // The first snapshot may not be written yet: then ka status fails.
        let o = ka_tests::ka(&["status", "--state-dir", state_dir, "--json"]);
        let text = ka_tests::stdout(&o);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or(json_null());
        let receiving = v["nodes"].as_array().is_some_and(|ns| {
            ns.len() == 2
                && ns
                    .iter()
                    .all(|n| n["state"] == "receiving" && n["bytes"].as_u64().unwrap_or(0) > 0)
        });
        if receiving {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "ka status never showed both nodes receiving: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(live["session"], "ka", "{live}");
    assert_eq!(live["state"], "streaming", "{live}");
    assert_eq!(live["running"], true, "{live}");
    let fed_by: Vec<&str> = live["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["upstream"].as_str().unwrap_or("-"))
        .collect();
    // A chain: one node fed by the source, the other by that node.
    assert!(
        fed_by.contains(&"source") && (fed_by.contains(&"a") || fed_by.contains(&"b")),
        "{live}"
    );
    let table = status(&[]);
    assert!(
        table.contains("session ka: streaming") && table.contains("receiving"),
        "{table}"
    );
    let (code, out, err) = s.finish(Duration::from_secs(60));
    // Over: its snapshot is gone with it, and ka status says there is none.
    let after = ka_tests::ka(&["status", "--state-dir", state_dir]);
    assert!(
        !after.status.success() && ka_tests::stderr(&after).contains("no session status"),
        "{}",
        ka_tests::stderr(&after)
    );
    for n in nodes {
        let (c, _, e) = n.finish(Duration::from_secs(30));
        assert_eq!(c, 0, "{e}");
        assert!(
            !e.contains(" { ") && !e.contains("Some("),
            "debug text: {e}"
        );
        assert!(e.contains("copy verified"), "{e}");
    }
    assert_eq!(code, 0, "{out}\n{err}");
    let summaries: Vec<&str> = err.lines().filter(|l| l.contains("2 nodes: ")).collect();
    assert!(
        !summaries.is_empty()
            && summaries
                .iter()
                .all(|l| l.contains("slowest") && l.contains(" %)")),
        "no summary line every 5 s in:\n{err}"
    );
    assert!(
        !err.contains(" { ") && !err.contains("Some("),
        "debug text: {err}"
    );
    assert!(out.contains("node") && out.contains("OK"), "{out}");

    // JSON: every line of both ends parses, has a known kind, no debug text.
    let s = serve("json", true);
    wait_listening(&s);
    let nodes = [join("c", true), join("d", true)];
    let (code, out, err) = s.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    let mut node_kinds = std::collections::BTreeSet::new();
    for n in nodes {
        let (c, out, e) = n.finish(Duration::from_secs(30));
        assert_eq!(c, 0, "{e}");
        for line in out.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            node_kinds.insert(v["event"].as_str().expect("an event").to_string());
            assert!(!line.contains(" { ") && !line.contains("Some("), "{line}");
        }
    }
    for kind in [
        "welcomed",
        "placed",
        "receiving",
        "verified",
        "leaving",
        "left",
    ] {
        assert!(node_kinds.contains(kind), "no {kind} in {node_kinds:?}");
    }
    let mut source_kinds = std::collections::BTreeSet::new();
    for line in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(!line.contains(" { ") && !line.contains("Some("), "{line}");
        if let Some(kind) = v["event"].as_str() {
            source_kinds.insert(kind.to_string());
        }
        if let Some(report) = v.get("report") {
            for n in report["nodes"].as_array().unwrap() {
                // Loopback nodes have no MAC to tell: absent, not zeros.
                assert!(n["mac"].is_null(), "{n}");
            }
        }
    }
    for kind in [
        "image_done",
        "joined",
        "started",
        "verified",
        "released",
        "finished",
    ] {
        assert!(source_kinds.contains(kind), "no {kind} in {source_kinds:?}");
    }
}

fn json_null() -> serde_json::Value {
    serde_json::Value::Null
}

/// Waits (bounded) until `ka serve` says it listens.
fn wait_listening(serve: &ka_tests::Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ka_tests::read_text(&serve.err).contains("waiting for") {
        assert!(
            Instant::now() < deadline,
            "ka serve did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
