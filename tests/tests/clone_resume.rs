//! Restarts on real processes over loopback: a node killed mid-stream and
//! started again goes on from its durable prefix; a source killed and started
//! again on the same image lets every node go on; a node whose recorded
//! prefix is of another image starts over. Each test paces the source with
//! `--max-rate` so that "halfway" is a moment the test can hit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use ka_tests::{pseudo_random, read_text as read, Proc};
use serde_json::Value;

/// 128 MiB, a quarter of it holes and a quarter written zeros: 64 MiB of
/// data, about 2.7 s at the pace below.
const SIZE: u64 = 128 << 20;
const PACE: &str = "24MiB";

/// The JSON lines of a process's output.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

struct Session {
    dir: tempfile::TempDir,
    port: u16,
    secret: PathBuf,
    image: PathBuf,
    state: PathBuf,
}

impl Session {
    fn new() -> Session {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        ka_tests::write_secret(&secret, u64::from(std::process::id()) ^ 0x5e5);
        let image = dir.path().join("image.img");
        let f = File::create(&image).unwrap();
        f.set_len(SIZE).unwrap();
        let block = 1 << 20;
        for i in 0..SIZE / block as u64 {
            match i % 4 {
                0 | 1 => f
                    .write_all_at(&pseudo_random(block, i + 1), i * block as u64)
                    .unwrap(),
                2 => f.write_all_at(&vec![0u8; block], i * block as u64).unwrap(),
                _ => {} // a hole
            }
        }
        // The port is chosen here, so a restarted source takes the very same
        // arguments.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let state = dir.path().join("state");
        Session {
            dir,
            port,
            secret,
            image,
            state,
        }
    }

    fn serve(&self, label: &str, nodes: u32) -> Proc {
        self.serve_with(label, nodes, &[])
    }

    /// `ka serve` of the session's image, paced, with `extra` arguments.
    fn serve_with(&self, label: &str, nodes: u32, extra: &[&str]) -> Proc {
        let (n, listen) = (nodes.to_string(), format!("127.0.0.1:{}", self.port));
        let mut args = vec![
            "serve",
            "--nodes",
            &n,
            "--listen",
            &listen,
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--image",
            self.image.to_str().unwrap(),
            "--state-dir",
            self.state.to_str().unwrap(),
            "--json",
        ];
        if !extra.contains(&"--max-rate") {
            args.extend_from_slice(&["--max-rate", PACE]);
        }
        args.extend_from_slice(extra);
        let p = Proc::start(self.dir.path(), label, &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&p.err).contains("waiting for") {
            assert!(
                Instant::now() < deadline,
                "{label} did not start listening within 10 s: {}",
                read(&p.err)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// `ka join` as `name`, writing its target; `label` names its output files.
    fn join(&self, name: &str, label: &str) -> Proc {
        self.join_to(name, label, &self.target(name))
    }

    /// `ka join` as `name`, writing `target` (a file or a block device).
    fn join_to(&self, name: &str, label: &str, target: &Path) -> Proc {
        let server = format!("127.0.0.1:{}", self.port);
        Proc::start(
            self.dir.path(),
            label,
            &[
                "join",
                "--server",
                &server,
                "--secret-file",
                self.secret.to_str().unwrap(),
                "--name",
                name,
                "--target",
                target.to_str().unwrap(),
                "--state-dir",
                self.state.to_str().unwrap(),
                "--wait",
                "60s",
                "--json",
            ],
        )
    }

    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.state.join(format!("node-ka-{name}.state"))
    }

    /// The durable prefix `name` has recorded, if any.
    fn durable(&self, name: &str) -> Option<u64> {
        read(&self.state_file(name))
            .lines()
            .find_map(|l| l.strip_prefix("durable ")?.parse().ok())
    }

    /// Waits (at most 30 s) until `name` has recorded at least `at` bytes durable.
    fn wait_durable(&self, name: &str, at: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(d) = self.durable(name).filter(|&d| d >= at) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not record {at} durable bytes within 30 s (has {:?})",
                self.durable(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (ma, mb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    ma.len() == mb.len() && ma == mb
}

/// The source's final report: each node's name, ok, and the whole line.
fn report(stdout: &str) -> Vec<Value> {
    let line = json_lines(stdout)
        .into_iter()
        .find(|v| v.get("report").is_some())
        .unwrap_or_else(|| panic!("no report in:\n{stdout}"));
    line["report"]["nodes"].as_array().unwrap().clone()
}

/// A node's last "welcomed" and its "left" line.
fn node_summary(stdout: &str) -> (Value, Value) {
    let lines = json_lines(stdout);
    let welcomed = lines
        .iter()
        .rev()
        .find(|v| v["event"] == "welcomed")
        .unwrap_or_else(|| panic!("no welcome in:\n{stdout}"))
        .clone();
    // The id is a number, as in the source's events, for scripts to match.
    assert!(
        welcomed["id"].as_u64().is_some_and(|id| id > 0),
        "the welcome carries no numeric id: {welcomed}"
    );
    let left = lines
        .iter()
        .find(|v| v["event"] == "left")
        .unwrap_or_else(|| panic!("no end in:\n{stdout}"))
        .clone();
    (welcomed, left)
}

#[test]
fn a_node_killed_before_its_first_4_mib_reports_what_it_received() {
    let s = Session::new();
    // 3 MB of data at 1 MiB/s: the node has its first MiB after a second,
    // and never 4 MiB (where the data path used to report first).
    std::fs::write(&s.image, pseudo_random(3_000_000, 77)).unwrap();
    let serve = s.serve_with("serve", 1, &["--max-rate", "1MiB"]);
    let a = s.join("a", "a");
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = json_lines(&read(&serve.out))
            .iter()
            .filter_map(|l| l["progress"].as_array()?.first()?["received"].as_u64())
            .max()
            .unwrap_or(0);
        if seen >= 1 << 20 {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the source never saw a's first MiB (it saw {seen} bytes)"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    a.kill9();
    let (code, out, err) = serve.finish(Duration::from_secs(30));
    assert_eq!(code, 1, "{out}\n{err}");
    let rep = report(&out);
    let bytes = rep[0]["bytes"].as_u64().unwrap();
    assert_eq!(rep[0]["ok"], false, "{rep:?}");
    assert!(
        bytes >= seen && bytes < 3_000_000,
        "a's report says {bytes} bytes; the source had seen {seen}"
    );
}

#[test]
fn a_node_writing_a_block_device_resumes_after_a_restart() {
    let s = Session::new();
    // A loop device of the image's size, detached when the test ends.
    let disk = ka_tests::system::Loop::blank(&s.dir.path().join("b.disk"), SIZE);
    let dev = Path::new(disk.dev()).to_path_buf();
    // Slower than the other tests: a loop device's records of what is
    // durable come slowly on a loaded machine, and the session must still
    // be on when b comes back.
    let serve = s.serve_with("serve", 2, &["--max-rate", "8MiB"]);
    let a = s.join("a", "a");
    let b = s.join_to("b", "b-first", &dev);
    // Early enough that the session is still on when b comes back.
    let at = s.wait_durable("b", SIZE / 5);
    b.kill9();
    let b = s.join_to("b", "b-again", &dev);
    let (code, out, err) = serve.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}\n{err}\nb-again:\n{}", read(&b.err));
    let rep = report(&out);
    assert!(rep.iter().all(|n| n["ok"] == true), "{rep:?}");
    assert_eq!(a.finish(Duration::from_secs(30)).0, 0);
    let (code, out, err) = b.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{out}\n{err}");
    let (welcomed, left) = node_summary(&out);
    let from = welcomed["resumed_from"].as_u64().unwrap();
    let received = left["received"].as_u64().unwrap();
    assert!(
        from >= at && from < SIZE,
        "b resumed from {from}, had recorded {at}"
    );
    assert!(
        received <= SIZE - from,
        "the restarted b received {received} bytes, more than the {} it lacked",
        SIZE - from
    );
    assert!(
        same_content(&s.image, &dev),
        "{} differs from the image",
        dev.display()
    );
    assert!(!s.state_file("b").exists(), "b's state outlived its check");
}

#[test]
fn a_node_killed_halfway_resumes_from_its_durable_prefix() {
    let s = Session::new();
    let serve = s.serve("serve", 3);
    let a = s.join("a", "a");
    let c = s.join("c", "c");
    let b = s.join("b", "b-first");
    let at = s.wait_durable("b", SIZE * 2 / 5);
    b.kill9();
    let b = s.join("b", "b-again");
    let (code, out, err) = serve.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}\n{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 3, "{rep:?}");
    assert!(rep.iter().all(|n| n["ok"] == true), "{rep:?}");
    for p in [a, c] {
        assert_eq!(p.finish(Duration::from_secs(30)).0, 0);
    }
    let (code, out, err) = b.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{out}\n{err}");
    let (welcomed, left) = node_summary(&out);
    let from = welcomed["resumed_from"].as_u64().unwrap();
    let received = left["received"].as_u64().unwrap();
    assert!(
        from >= at && from < SIZE,
        "b resumed from {from}, had recorded {at}"
    );
    assert_eq!(left["resumed_from"].as_u64(), Some(from));
    assert!(
        received <= SIZE - from,
        "the restarted b received {received} bytes, more than the {} it lacked",
        SIZE - from
    );
    // The source's report says so too.
    let b_line = rep.iter().find(|n| n["name"] == "b").unwrap();
    assert_eq!(b_line["resumed_from"].as_u64(), Some(from));
    for n in ["a", "b", "c"] {
        assert!(
            same_content(&s.image, &s.target(n)),
            "{n}'s copy differs from the image"
        );
        assert!(
            !s.state_file(n).exists(),
            "{n}'s state should be gone once its copy is checked"
        );
    }
}

#[test]
fn a_source_killed_halfway_and_restarted_lets_every_node_go_on() {
    let s = Session::new();
    let first = s.serve("serve-first", 3);
    let nodes: Vec<Proc> = ["a", "b", "c"].iter().map(|n| s.join(n, n)).collect();
    for n in ["a", "b", "c"] {
        s.wait_durable(n, SIZE * 2 / 5);
    }
    first.kill9();
    // The nodes notice at once (their connections reset) and keep knocking.
    std::thread::sleep(Duration::from_millis(700));
    let again = s.serve("serve-again", 3);
    let (code, out, err) = again.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}\n{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 3, "{rep:?}");
    for n in &rep {
        assert_eq!(n["ok"], true, "{rep:?}");
        assert!(
            n["resumed_from"].as_u64().unwrap() >= SIZE * 2 / 5,
            "{} started over: {n}",
            n["name"]
        );
    }
    for (name, p) in ["a", "b", "c"].iter().zip(nodes) {
        let (code, out, err) = p.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "{name}: {out}\n{err}");
        let (welcomed, left) = node_summary(&out);
        assert!(
            welcomed["resumed_from"].as_u64().unwrap() >= SIZE * 2 / 5,
            "{name}: {welcomed}"
        );
        // Across both sources, no byte came twice.
        assert!(
            left["received"].as_u64().unwrap() <= SIZE,
            "{name} received more than the image: {left}"
        );
        assert!(
            same_content(&s.image, &s.target(name)),
            "{name}'s copy differs from the image"
        );
    }
    assert_eq!(
        std::fs::read_dir(&s.state).unwrap().count(),
        0,
        "every state file is removed at the end"
    );
}

#[test]
fn a_recorded_prefix_of_another_image_starts_over() {
    let s = Session::new();
    // What an earlier session of another image left: garbage on the target
    // and a record claiming half of it durable.
    std::fs::create_dir_all(&s.state).unwrap();
    let target = s.target("a");
    std::fs::write(&target, pseudo_random((SIZE / 2) as usize, 99)).unwrap();
    std::fs::write(
        s.state_file("a"),
        format!(
            "ka-node-state 1\nsession ka\nname a\ntarget {}\nimage {}\nsize {SIZE}\ndurable {}\n",
            target.display(),
            "ab".repeat(32),
            SIZE / 2
        ),
    )
    .unwrap();
    let serve = s.serve("serve", 1);
    let a = s.join("a", "a");
    let (code, out, err) = serve.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = a.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{out}\n{err}");
    let lines = json_lines(&out);
    assert!(
        lines
            .iter()
            .any(|v| v["event"] == "started_over" && v["had"].as_u64() == Some(SIZE / 2)),
        "{out}"
    );
    let (welcomed, left) = node_summary(&out);
    assert_eq!(welcomed["resumed_from"].as_u64(), Some(0));
    assert_eq!(left["received"].as_u64(), Some(SIZE));
    assert!(same_content(&s.image, &target), "the copy differs");
}

/// Leaves on `name`'s target the first `have` bytes of the image and a
/// record of them, as a node killed at that point would have.
fn leave_prefix(s: &Session, name: &str, have: u64) {
    let mut bytes = std::fs::read(&s.image).unwrap();
    bytes.truncate(have as usize);
    std::fs::write(s.target(name), bytes).unwrap();
    std::fs::create_dir_all(&s.state).unwrap();
    ka_net::shell::resume::NodeState {
        session: "ka".into(),
        name: name.into(),
        target: s.target(name),
        image: ka_net::shell::resume::image_identity(&s.image).unwrap(),
        size: Some(SIZE),
        durable: have,
        unpacked: None,
    }
    .save(&s.state_file(name))
    .unwrap();
}

#[test]
fn a_restarted_source_still_reports_the_node_that_finished_before_it_died() {
    let s = Session::new();
    // Two children of the source, both resuming: a nearly done, b barely
    // started. (Nobody is served from 0, so the source hashes the image on
    // its own and a can verify and leave long before b is done.)
    leave_prefix(&s, "a", SIZE * 3 / 4);
    leave_prefix(&s, "b", 8 << 20);
    let first = s.serve_with("serve-first", 2, &["--arity", "2"]);
    let a = s.join("a", "a");
    let b = s.join("b", "b");
    let (code, out, err) = a.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    let (welcomed, _) = node_summary(&out);
    assert_eq!(welcomed["resumed_from"].as_u64(), Some(SIZE * 3 / 4));
    first.kill9();
    let had = s.durable("b").unwrap();
    assert!(had < SIZE, "b must still be receiving when the source dies");
    let again = s.serve_with("serve-again", 2, &["--arity", "2"]);
    let (code, out, err) = again.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("1 node outcome(s) restored"), "{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 2, "{rep:?}");
    let a_line = rep.iter().find(|n| n["name"] == "a").unwrap();
    assert!(
        a_line["ok"] == true && a_line["restored"] == true,
        "a finished under the first source and must be reported OK: {a_line}"
    );
    let b_line = rep.iter().find(|n| n["name"] == "b").unwrap();
    assert!(
        b_line["ok"] == true && b_line["restored"] == false,
        "{b_line}"
    );
    assert!(b_line["resumed_from"].as_u64().unwrap() >= had, "{b_line}");
    let (code, out, err) = b.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{out}\n{err}");
    for n in ["a", "b"] {
        assert!(same_content(&s.image, &s.target(n)), "{n}'s copy differs");
    }
    assert_eq!(std::fs::read_dir(&s.state).unwrap().count(), 0);
}
