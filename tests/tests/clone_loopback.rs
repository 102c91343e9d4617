//! Real cloning with real processes on loopback: `ka serve` and `ka join`
//! as separate processes, checked by what lands on disk and by the reports.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ka_tests::{ka_bin, pseudo_random, read_text as read, require_tool, Proc};

struct Session {
    dir: tempfile::TempDir,
    port: std::cell::Cell<u16>,
    /// Where the next `ka serve` writes its standard output instead of
    /// `serve.out`.
    serve_stdout: std::cell::Cell<Option<Stdio>>,
    secret: PathBuf,
    image: PathBuf,
}

impl Session {
    /// A session directory with a secret and a sparse image of `size` bytes:
    /// random data, written zeros and never-written holes.
    fn new(size: u64) -> Session {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        // A secret of its own, so tests running side by side never mix.
        ka_tests::write_secret(
            &secret,
            size ^ u64::from(std::process::id()) ^ dir.path().as_os_str().len() as u64,
        );
        let image = dir.path().join("image.img");
        let f = File::create(&image).unwrap();
        f.set_len(size).unwrap();
        let block = 1 << 20;
        let mut off = 0u64;
        let mut i = 0u64;
        while off < size {
            match i % 4 {
                0 | 1 => f.write_all_at(&pseudo_random(block, i), off).unwrap(),
                2 => f.write_all_at(&vec![0u8; block], off).unwrap(),
                _ => {} // a hole
            }
            off += block as u64;
            i += 1;
        }
        Session {
            dir,
            port: std::cell::Cell::new(0),
            serve_stdout: std::cell::Cell::new(None),
            secret,
            image,
        }
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port.get())
    }

    /// Starts `ka serve` of the session's image file.
    fn serve(&self, nodes: u32, extra: &[&str]) -> Proc {
        self.serve_input(nodes, &["--image", self.image.to_str().unwrap()], extra)
    }

    /// Starts `ka serve` of `input` (`--image P`, `--command C`, `--tar D`) on
    /// a port the kernel picks and learns it from its first line, so parallel
    /// tests never race for a port.
    fn serve_input(&self, nodes: u32, input: &[&str], extra: &[&str]) -> Proc {
        let n = nodes.to_string();
        let secret = self.secret.to_str().unwrap();
        let spool = self.dir.path().to_str().unwrap();
        let mut args = vec![
            "serve",
            "--nodes",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            secret,
        ];
        args.extend_from_slice(input);
        let state = self.state_dir();
        args.extend_from_slice(&["--spool-dir", spool, "--state-dir", &state, "--json"]);
        args.extend_from_slice(extra);
        let p = match self.serve_stdout.take() {
            Some(stdout) => Proc::start_with(self.dir.path(), "serve", &args, |c| {
                c.stdout(stdout);
            }),
            None => Proc::start(self.dir.path(), "serve", &args),
        };
        self.learn_port(&p);
        p
    }

    /// Reads the port a `ka serve` bound from its first line.
    fn learn_port(&self, serve: &Proc) {
        for _ in 0..500 {
            let text = read(&serve.err);
            if let Some(port) = text
                .lines()
                .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
            {
                self.port.set(port.trim().parse().expect("a port number"));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "ka serve did not start listening within 10 s: {}",
            read(&serve.err)
        );
    }

    fn join(&self, name: &str, target: &Path, extra: &[&str]) -> Proc {
        self.join_output(name, &["--target", target.to_str().unwrap()], extra)
    }

    /// Starts `ka join` writing to `output` (`--target P`, `--command C`,
    /// `--untar D`).
    fn join_output(&self, name: &str, output: &[&str], extra: &[&str]) -> Proc {
        let server = self.server();
        let secret = self.secret.to_str().unwrap();
        let spool = self.dir.path().to_str().unwrap();
        let mut args = vec![
            "join",
            "--server",
            &server,
            "--secret-file",
            secret,
            "--name",
            name,
        ];
        args.extend_from_slice(output);
        let state = self.state_dir();
        args.extend_from_slice(&["--spool-dir", spool, "--state-dir", &state, "--wait", "60s"]);
        args.extend_from_slice(extra);
        Proc::start(self.dir.path(), name, &args)
    }

    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    /// Where the processes of this test keep their restart state (not the
    /// machine's /var/lib/ka, which tests running side by side would share).
    fn state_dir(&self) -> String {
        self.dir.path().join("state").to_str().unwrap().to_string()
    }
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        let mut got = 0;
        while got < n {
            let m = fb.read(&mut bb[got..n]).unwrap();
            assert!(m > 0);
            got += m;
        }
        if ba[..n] != bb[..n] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

/// The nodes' lines of the source's final JSON report: (name, ok, reason).
fn report(stdout: &str) -> Vec<(String, bool, String)> {
    ka_tests::final_report(stdout)
        .nodes
        .into_iter()
        .map(|n| (n.name, n.ok, n.reason))
        .collect()
}

#[test]
fn five_nodes_clone_a_sparse_image_identically() {
    let s = Session::new(256 << 20);
    let serve = s.serve(5, &[]);
    let names = ["n1", "n2", "n3", "n4", "n5"];
    let nodes: Vec<Proc> = names
        .iter()
        .map(|n| s.join(n, &s.target(n), &["--verify", "readback"]))
        .collect();
    let (code, out, err) = serve.finish(Duration::from_secs(180));
    assert_eq!(code, 0, "serve failed:\n{out}\n{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 5, "{out}");
    assert!(rep.iter().all(|(_, ok, _)| *ok), "{rep:?}");
    // Scripts can follow the session: one verified event per node, and the
    // stream's start before any of them.
    let events = ka_tests::events(&out);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let started = kinds
        .iter()
        .position(|k| *k == "started")
        .expect("a started event");
    for n in names {
        let verified = events
            .iter()
            .position(|e| e["event"] == "verified" && e["node"] == n && e["ok"] == true)
            .unwrap_or_else(|| panic!("no verified event for {n}:\n{out}"));
        assert!(verified > started, "{n} verified before the start:\n{out}");
    }
    for (n, p) in names.iter().zip(nodes) {
        let (code, _, err) = p.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "{n}: {err}");
        let t = s.target(n);
        assert!(
            same_content(&s.image, &t),
            "{n}'s copy differs from the image"
        );
        // Zeros were never written: the copy is as sparse as the image's data.
        let allocated = std::fs::metadata(&t).unwrap().blocks() * 512;
        assert!(
            allocated <= (256 << 20) / 2 + (8 << 20),
            "{n}: {allocated} bytes allocated"
        );
    }
}

#[test]
fn a_node_with_the_wrong_secret_is_refused_and_the_others_finish() {
    let s = Session::new(32 << 20);
    let serve = s.serve(2, &[]);
    let wrong = s.dir.path().join("wrong-secret");
    std::fs::write(&wrong, "cd".repeat(32)).unwrap();
    assert_ne!(std::fs::read_to_string(&s.secret).unwrap(), "cd".repeat(32));
    let server = s.server();
    let intruder = Proc::start(
        s.dir.path(),
        "intruder",
        &[
            "join",
            "--server",
            &server,
            "--secret-file",
            wrong.to_str().unwrap(),
            "--target",
            s.target("intruder").to_str().unwrap(),
            "--name",
            "intruder",
            "--state-dir",
            &s.state_dir(),
            "--wait",
            "20s",
        ],
    );
    let (code, _, err) = intruder.finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(
        err.contains("secret"),
        "the refusal should name the secret: {err}"
    );
    assert!(
        !s.target("intruder").exists(),
        "a refused node must not write anything"
    );
    let a = s.join("a", &s.target("a"), &[]);
    let b = s.join("b", &s.target("b"), &[]);
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(report(&out).iter().all(|(n, ok, _)| *ok && n != "intruder"));
    for p in [a, b] {
        assert_eq!(p.finish(Duration::from_secs(30)).0, 0);
    }
    assert!(same_content(&s.image, &s.target("a")) && same_content(&s.image, &s.target("b")));
}

#[test]
fn wrong_session_is_refused_with_the_reason() {
    let s = Session::new(8 << 20);
    let serve = s.serve(1, &[]);
    let other = s.join("stray", &s.target("stray"), &["--session", "other"]);
    let (code, _, err) = other.finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("session"), "{err}");
    let ok = s.join("a", &s.target("a"), &[]);
    assert_eq!(serve.finish(Duration::from_secs(60)).0, 0);
    assert_eq!(ok.finish(Duration::from_secs(30)).0, 0);
}

#[test]
fn go_starts_with_fewer_nodes() {
    let s = Session::new(16 << 20);
    let serve = s.serve(5, &[]);
    let a = s.join("a", &s.target("a"), &[]);
    let b = s.join("b", &s.target("b"), &[]);
    // Say go once the source has admitted both.
    let mut joined = false;
    for _ in 0..1000 {
        let events = ka_tests::events(&read(&serve.out));
        if events.iter().filter(|e| e["event"] == "joined").count() >= 2 {
            joined = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        joined,
        "the nodes did not join within 20 s: {}",
        read(&serve.err)
    );
    let server = s.server();
    let out = ka_tests::run(
        Command::new(ka_bin()).args([
            "go",
            "--server",
            &server,
            "--secret-file",
            s.secret.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    let started = String::from_utf8_lossy(&out.stdout).contains("started with 2 nodes");
    assert!(
        started,
        "go: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(report(&out).len(), 2);
    for p in [a, b] {
        assert_eq!(p.finish(Duration::from_secs(30)).0, 0);
    }
}

#[test]
fn an_unwritable_target_fails_that_node_only() {
    let s = Session::new(16 << 20);
    let serve = s.serve(2, &[]);
    let ro = s.dir.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("x.img"), b"").unwrap();
    // A directory where a file is expected: no process, root or not, can write it.
    let bad = s.join("bad", &ro, &[]);
    let good = s.join("good", &s.target("good"), &[]);
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 1, "some nodes failed must exit 1:\n{out}\n{err}");
    let rep = report(&out);
    let bad_line = rep
        .iter()
        .find(|(n, _, _)| n == "bad")
        .expect("bad is in the report");
    assert!(!bad_line.1 && !bad_line.2.is_empty(), "{rep:?}");
    assert!(rep.iter().any(|(n, ok, _)| n == "good" && *ok), "{rep:?}");
    assert_ne!(bad.finish(Duration::from_secs(30)).0, 0);
    assert_eq!(good.finish(Duration::from_secs(30)).0, 0);
    assert!(same_content(&s.image, &s.target("good")));
}

#[test]
fn a_block_device_too_small_is_refused_before_any_write() {
    let losetup = require_tool("losetup", "util-linux");
    let s = Session::new(64 << 20);
    let backing = s.dir.path().join("small-disk");
    let f = File::create(&backing).unwrap();
    f.set_len(16 << 20).unwrap();
    let out = Command::new(&losetup)
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(PathBuf, String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).args(["-d", &self.1]).status();
        }
    }
    let _detach = Detach(losetup, dev.clone());
    let serve = s.serve(2, &[]);
    let small = s.join("small", Path::new(&dev), &[]);
    let good = s.join("good", &s.target("good"), &[]);
    let (small_code, _, small_err) = small.finish(Duration::from_secs(60));
    assert_ne!(small_code, 0, "{small_err}");
    assert_eq!(good.finish(Duration::from_secs(60)).0, 0);
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{out}\n{err}");
    let rep = report(&out);
    let line = rep.iter().find(|(n, _, _)| n == "small").unwrap();
    assert!(!line.1, "{rep:?}");
    assert!(
        line.2.contains("small") || line.2.contains("size") || line.2.contains("bytes"),
        "reason should name the size: {}",
        line.2
    );
    // Not one byte reached the device.
    let mut head = vec![0u8; 1 << 20];
    File::open(&dev).unwrap().read_exact(&mut head).unwrap();
    assert!(
        head.iter().all(|&b| b == 0),
        "the refused device was written to"
    );
    let _ = std::io::stdout().flush();
}

#[test]
fn command_mode_streams_a_command_into_commands() {
    let s = Session::new(24 << 20);
    let cmd = format!("cat {}", s.image.display());
    let serve = s.serve_input(3, &["--command", &cmd], &[]);
    let outs: Vec<PathBuf> = (0..3)
        .map(|i| s.dir.path().join(format!("out{i}")))
        .collect();
    let nodes: Vec<Proc> = outs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            s.join_output(
                &format!("c{i}"),
                &["--command", &format!("cat > {}", out.display())],
                &[],
            )
        })
        .collect();
    let (code, out, err) = serve.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{out}\n{err}");
    for (p, o) in nodes.into_iter().zip(&outs) {
        let (code, _, err) = p.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "{err}");
        assert!(
            same_content(&s.image, o),
            "{} differs from the command's output",
            o.display()
        );
    }
    // Spools are removed once the processes are done.
    let spools = std::fs::read_dir(s.dir.path()).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".spool")
    });
    assert_eq!(spools.count(), 0);
}

#[test]
fn tar_mode_clones_a_tree_with_links_modes_and_sparse_files() {
    let s = Session::new(1 << 20);
    let tree = s.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc/deep")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "golden\n").unwrap();
    std::fs::write(tree.join("etc/deep/data.bin"), pseudo_random(3 << 20, 9)).unwrap();
    std::os::unix::fs::symlink("hostname", tree.join("etc/name-link")).unwrap();
    std::fs::hard_link(tree.join("etc/hostname"), tree.join("etc/hard")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let sparse = File::create(tree.join("sparse.img")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    sparse.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    let serve = s.serve_input(2, &["--tar", tree.to_str().unwrap()], &[]);
    let dests: Vec<PathBuf> = (0..2)
        .map(|i| s.dir.path().join(format!("dest{i}")))
        .collect();
    let nodes: Vec<Proc> = dests
        .iter()
        .enumerate()
        .map(|(i, d)| s.join_output(&format!("t{i}"), &["--untar", d.to_str().unwrap()], &[]))
        .collect();
    let (code, out, err) = serve.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{out}\n{err}");
    for (p, d) in nodes.into_iter().zip(&dests) {
        let (code, _, err) = p.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "{err}");
        assert!(same_content(
            &tree.join("etc/deep/data.bin"),
            &d.join("etc/deep/data.bin")
        ));
        assert_eq!(
            std::fs::read_to_string(d.join("etc/hostname")).unwrap(),
            "golden\n"
        );
        assert_eq!(
            std::fs::read_link(d.join("etc/name-link")).unwrap(),
            PathBuf::from("hostname")
        );
        let meta = std::fs::metadata(d.join("etc/hostname")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(
            meta.ino(),
            std::fs::metadata(d.join("etc/hard")).unwrap().ino(),
            "hard link kept"
        );
        let sp = std::fs::metadata(d.join("sparse.img")).unwrap();
        assert_eq!(sp.len(), 64 << 20);
        assert!(
            sp.blocks() * 512 < 1 << 20,
            "sparse file stayed sparse: {} bytes allocated",
            sp.blocks() * 512
        );
    }
}

#[test]
fn a_node_without_server_finds_its_source_by_broadcast() {
    let s = Session::new(8 << 20);
    let serve = s.serve(1, &[]);
    // The loopback network's broadcast address: nothing leaves this machine.
    let to = format!("127.255.255.255:{}", s.port.get());
    let node = Proc::start(
        s.dir.path(),
        "finder",
        &[
            "join",
            "--discover-to",
            &to,
            "--secret-file",
            s.secret.to_str().unwrap(),
            "--target",
            s.target("finder").to_str().unwrap(),
            "--name",
            "finder",
            "--state-dir",
            &s.state_dir(),
            "--wait",
            "30s",
        ],
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, _, err) = node.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("found the source at 127.0.0.1"), "{err}");
    assert!(same_content(&s.image, &s.target("finder")));
}

#[test]
fn the_demo_clones_and_verifies_every_copy() {
    let out = ka_tests::run(
        Command::new(ka_bin()).args(["demo", "--nodes", "3", "--size", "48MiB"]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3/3 nodes OK"), "{stdout}");
    assert!(stdout.contains("3/3 copies byte-identical"), "{stdout}");
}

/// Reads one whole control frame from a blocking socket.
fn read_frame(conn: &mut std::net::TcpStream) -> ka_core::codec::Message {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("a frame's length");
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
    conn.read_exact(&mut frame[4..]).expect("a frame's body");
    ka_core::codec::Message::decode_exact(&frame).expect("a well-formed frame")
}

#[test]
fn a_node_of_another_protocol_version_is_refused_and_the_others_finish() {
    use ka_core::codec::{Join, Message, RefusalCode, PROTOCOL_VERSION};
    let s = Session::new(16 << 20);
    let serve = s.serve(1, &[]);
    // A node from a future ka: it knows the secret and proves it, but speaks
    // another version. Played by hand, since no shipped ka speaks it.
    let mut peer = std::net::TcpStream::connect(s.server()).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let Message::Challenge { nonce, .. } = read_frame(&mut peer) else {
        panic!("the source did not open with a challenge")
    };
    let secret = std::fs::read_to_string(&s.secret).unwrap();
    let key = ka_net::shell::session_key(
        &ka_net::shell::Secret::from_hex(secret.trim()).unwrap(),
        "ka",
    );
    let mut join = Join {
        version: PROTOCOL_VERSION + 1,
        session: "ka".into(),
        name: "future".into(),
        mac: [2, 0, 0, 0, 0, 1],
        data_addr: "127.0.0.1:9".parse().unwrap(),
        wait_release: false,
        readable: true,
        have: 0,
        holds_from: 0,
        image: None,
        nonce: ka_core::codec::Nonce([1; 32]),
        proof: Default::default(),
    };
    let own = ka_core::auth::node_key(&key, "future");
    join.proof = ka_core::auth::join_proof(&*own, &nonce, &join);
    peer.write_all(&Message::Join(Box::new(join)).to_bytes())
        .unwrap();
    match read_frame(&mut peer) {
        Message::Refused(r) => {
            assert_eq!(r.code, RefusalCode::VersionMismatch, "{r:?}");
            assert!(r.detail.contains("same ka version"), "{}", r.detail);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The session goes on for a node of this version.
    let node = s.join("a", &s.target("a"), &[]);
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 1, "the refused peer is not a node: {rep:?}");
    assert!(rep[0].1, "{rep:?}");
    assert_eq!(node.finish(Duration::from_secs(30)).0, 0);
    assert!(same_content(&s.image, &s.target("a")));
}

#[test]
fn a_node_that_boots_before_its_source_keeps_looking_and_joins() {
    let s = Session::new(8 << 20);
    // A port for the source-to-be: free now, reserved by nothing.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    s.port.set(port);
    let mut early = s.join("early", &s.target("early"), &[]);
    // The node has been refused (nothing listens) for a while and is still
    // looking, quietly.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        early.guard.child.try_wait().unwrap().is_none() && read(&early.err).lines().count() <= 3,
        "the node should wait quietly:\n{}",
        read(&early.err)
    );
    let listen = format!("127.0.0.1:{port}");
    let serve = Proc::start(
        s.dir.path(),
        "serve",
        &[
            "serve",
            "--nodes",
            "1",
            "--listen",
            &listen,
            "--secret-file",
            s.secret.to_str().unwrap(),
            "--image",
            s.image.to_str().unwrap(),
            "--state-dir",
            &s.state_dir(),
            "--json",
        ],
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, _, err) = early.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
    assert!(same_content(&s.image, &s.target("early")));
}

#[test]
fn a_source_whose_output_reader_leaves_still_serves_its_nodes() {
    // `ka serve --json | head -1`: once the reader is gone every write to
    // standard output fails (EPIPE). The session must go on to its report
    // and exit status; a panic would leave the nodes without their source.
    let s = Session::new(16 << 20);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    s.serve_stdout.set(Some(writer.into()));
    let serve = s.serve(2, &[]);
    let a = s.join("a", &s.target("a"), &[]);
    let b = s.join("b", &s.target("b"), &[]);
    for node in [a, b] {
        let (code, out, err) = node.finish(Duration::from_secs(60));
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let (code, _, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "ka serve: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(same_content(&s.image, &s.target("a")));
    assert!(same_content(&s.image, &s.target("b")));
}

#[test]
fn an_image_that_is_a_fifo_or_missing_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for (image, says) in [
        (fifo.clone(), "neither a regular file nor a block device"),
        (dir.path().join("absent.img"), "No such file"),
    ] {
        // Opening a FIFO waits for a writer: unchecked, this would hang
        // until the bound below kills it.
        let out = refused_serve(dir.path(), "1", &image);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    // No secret was generated for a session that could not run.
    assert_eq!(files_in(dir.path()), ["image.fifo"]);
}

/// `ka serve --nodes NODES --image IMAGE` in `dir`, which must exit 2
/// (bounded: a serve that hangs is killed after 20 s).
fn refused_serve(dir: &Path, nodes: &str, image: &Path) -> std::process::Output {
    let out = ka_tests::run(
        ka_tests::private_logs(&mut Command::new(ka_bin()), dir)
            .current_dir(dir)
            .args([
                "serve",
                "--nodes",
                nodes,
                "--listen",
                "127.0.0.1:0",
                "--image",
                image.to_str().unwrap(),
            ]),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    out
}

/// The names of the files in `dir`.
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn zero_nodes_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.img");
    std::fs::write(&image, b"an image").unwrap();
    let out = refused_serve(dir.path(), "0", &image);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--nodes 0: a session clones to at least one node"),
        "{err}"
    );
    // Nothing was served: no secret generated, nothing said on stdout.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(files_in(dir.path()), ["image.img"]);
}

#[test]
fn an_image_cut_short_while_it_is_served_ends_the_session_saying_so() {
    // Every sender would fail at the same offset and the node would
    // reconnect to it forever; the session ends instead, with the reason.
    let s = Session::new(64 << 20);
    // Half the image is data: about 4 s of stream at this rate.
    let serve = s.serve(1, &["--max-rate", "8MiB"]);
    let node = s.join("n", &s.target("n"), &[]);
    for _ in 0..1000 {
        if read(&serve.out).contains("\"event\":\"started\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    File::options()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (code, out, err) = serve.finish(Duration::from_secs(30));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("changed while it was served"), "{out}");
    let (code, out, err) = node.finish(Duration::from_secs(30));
    assert_ne!(code, 0, "{out}\n{err}");
}

#[test]
fn a_source_without_a_secret_file_writes_one_for_its_nodes() {
    let s = Session::new(8 << 20);
    let serve = Proc::start(
        s.dir.path(),
        "serve",
        &[
            "serve",
            "--nodes",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--image",
            s.image.to_str().unwrap(),
            "--state-dir",
            &s.state_dir(),
            "--json",
        ],
    );
    s.learn_port(&serve);
    let err = read(&serve.err);
    assert!(err.contains("wrote it to ka-secret-ka"), "{err}");
    let generated = s.dir.path().join("ka-secret-ka");
    let hex = std::fs::read_to_string(&generated).unwrap();
    assert_eq!(hex.trim().len(), 64, "{hex:?}");
    assert_ne!(
        hex.trim(),
        std::fs::read_to_string(&s.secret).unwrap().trim(),
        "a fresh secret, not the test's"
    );
    let server = s.server();
    let node = Proc::start(
        s.dir.path(),
        "n",
        &[
            "join",
            "--server",
            &server,
            "--secret-file",
            generated.to_str().unwrap(),
            "--target",
            s.target("n").to_str().unwrap(),
            "--name",
            "n",
            "--state-dir",
            &s.state_dir(),
            "--wait",
            "30s",
        ],
    );
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(node.finish(Duration::from_secs(30)).0, 0);
    assert!(same_content(&s.image, &s.target("n")));
}

#[test]
fn an_image_changed_after_it_was_hashed_fails_every_node_with_the_reason() {
    let s = Session::new(16 << 20);
    let serve = s.serve(2, &[]);
    // The source hashes a file image as soon as it starts: wait for that.
    let mut hashed = false;
    for _ in 0..500 {
        if ka_tests::events(&read(&serve.out))
            .iter()
            .any(|e| e["event"] == "image_done")
        {
            hashed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(hashed, "no image_done within 10 s: {}", read(&serve.out));
    // Someone writes to the image before the nodes come: what they receive
    // no longer matches the published digest.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 5 << 20).unwrap();
    drop(f);
    let nodes: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| s.join(n, &s.target(n), &[]))
        .collect();
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 1, "failed nodes must exit 1:\n{out}\n{err}");
    let rep = report(&out);
    assert_eq!(rep.len(), 2, "{out}");
    for (name, ok, reason) in &rep {
        assert!(!ok, "{name} must be KO: {rep:?}");
        assert!(
            reason.contains("differs from the source"),
            "{name}: {reason}"
        );
    }
    for p in nodes {
        assert_eq!(p.finish(Duration::from_secs(30)).0, 1);
    }
}

/// The TCP sockets of this network namespace in `state` (`/proc/net/tcp`:
/// 0A listening, 01 established), as (local port, remote port).
fn tcp_sockets(state: &str) -> Vec<(u16, u16)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[3] == state).then(|| (port(f[1]), port(f[2])))
        })
        .collect()
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_node_given_a_data_port_feeds_its_downstream_there() {
    let s = Session::new(16 << 20);
    let port = free_port();
    let port_s = port.to_string();
    // Paced, so the chain is seen while the data flows: n1 first, n2 fed by it.
    let serve = s.serve(2, &["--order", "n1,n2", "--max-rate", "4MiB"]);
    let n1 = s.join("n1", &s.target("n1"), &["--data-port", &port_s]);
    let n2 = s.join("n2", &s.target("n2"), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut listening, mut fed) = (false, false);
    while !(listening && fed) && std::time::Instant::now() < deadline {
        listening |= tcp_sockets("0A").iter().any(|(local, _)| *local == port);
        fed |= tcp_sockets("01").iter().any(|(_, remote)| *remote == port);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "serve failed:\n{out}\n{err}");
    assert!(listening, "n1 never listened on --data-port {port}");
    assert!(fed, "n2's data connection never went to n1's port {port}");
    for (n, p) in [("n1", n1), ("n2", n2)] {
        let (code, _, err) = p.finish(Duration::from_secs(30));
        assert_eq!(code, 0, "{n}: {err}");
        assert!(same_content(&s.image, &s.target(n)), "{n}'s copy differs");
    }
}

#[test]
fn a_data_port_in_use_is_refused_with_the_reason() {
    let s = Session::new(1 << 20);
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let serve = s.serve(1, &[]);
    let n1 = s.join("n1", &s.target("n1"), &["--data-port", &port]);
    let (code, _, err) = n1.finish(Duration::from_secs(30));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("--data-port {port}")), "{err}");
    serve.kill9();
}
