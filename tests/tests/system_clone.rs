//! System clones on loop devices, with real tools and real file systems:
//! `ka serve --system` reads a mounted machine (GPT: BIOS boot partition,
//! vfat ESP, swap, ext4 root, xfs /home) and nodes rebuild their own loop
//! disks from it with `ka join --system`; their trees, UUIDs, labels,
//! partition tables and raw partitions are compared with the source's.

use std::path::Path;
use std::time::Duration;

use ka_tests::system::{
    blkid, diff_trees, partition_table, tree, Loop, Mount, SourceMachine, SOURCE_DISK,
};
use ka_tests::{pseudo_random, read_text, Proc};

/// A session directory: a secret, and the port `ka serve` bound.
struct Session {
    dir: tempfile::TempDir,
    secret: String,
    port: u16,
    /// Where the next `ka serve` listens.
    listen: String,
}

impl Session {
    fn new() -> Session {
        // Loop files and spools on a real disk, not in a memory /tmp.
        let dir = tempfile::Builder::new()
            .prefix("ka-system-test-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let secret = dir.path().join("secret");
        ka_tests::write_secret(&secret, u64::from(std::process::id()) ^ 0x5e1f);
        Session {
            secret: secret.to_string_lossy().into(),
            dir,
            port: 0,
            listen: "127.0.0.1:0".into(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `ka serve` with `input` and learns its port.
    fn serve(&mut self, label: &str, nodes: u32, input: &[&str]) -> Proc {
        let n = nodes.to_string();
        let state = self.path().join(format!("{label}-state"));
        let spool = self.path().to_string_lossy().to_string();
        let listen = self.listen.clone();
        let mut args = vec![
            "serve",
            "--nodes",
            &n,
            "--listen",
            &listen,
            "--secret-file",
            &self.secret,
            "--json",
            "--spool-dir",
            &spool,
        ];
        let state = state.to_string_lossy().to_string();
        args.extend_from_slice(&["--state-dir", &state]);
        args.extend_from_slice(input);
        let p = Proc::start(self.path(), label, &args);
        for _ in 0..1500 {
            let text = read_text(&p.err);
            if let Some(port) = text
                .lines()
                .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
            {
                self.port = port.trim().parse().unwrap();
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ka serve did not listen within 30 s: {}", read_text(&p.err));
    }

    /// Starts `ka join` named `name` writing to `output`.
    fn join(&self, name: &str, output: &[&str]) -> Proc {
        let server = format!("127.0.0.1:{}", self.port);
        let state = self.path().join(format!("{name}-state"));
        let state = state.to_string_lossy().to_string();
        let spool = self.path().to_string_lossy().to_string();
        let mut args = vec![
            "join",
            "--server",
            &server,
            "--secret-file",
            &self.secret,
            "--name",
            name,
            "--state-dir",
            &state,
            "--spool-dir",
            &spool,
            "--wait",
            "30s",
            "--json",
        ];
        args.extend_from_slice(output);
        Proc::start(self.path(), name, &args)
    }
}

/// A node's rebuilt disk, mounted as the source is (root, then /home).
fn mount_node(dir: &Path, disk: &Loop) -> Vec<Mount> {
    let root = dir.join(format!("mnt-{}", disk.dev().trim_start_matches("/dev/")));
    let mut m = vec![Mount::new(&disk.part(4), &root, &[])];
    // The same xfs UUID as the source's, mounted on the same machine.
    m.push(Mount::new(&disk.part(5), &root.join("home"), &["nouuid"]));
    m
}

fn assert_same_system(source: &SourceMachine, s: &Session, node: &Loop, grown: bool) {
    assert_same_system_but(source, s, node, grown, &[]);
}

/// [`assert_same_system`], where `changed` paths (written while the
/// source was read) may differ or be missing.
fn assert_same_system_but(
    source: &SourceMachine,
    s: &Session,
    node: &Loop,
    grown: bool,
    changed: &[&str],
) {
    let src_table = partition_table(source.disk.dev());
    let table = partition_table(node.dev());
    assert_eq!(table["label"], "gpt");
    assert_eq!(table["id"], src_table["id"], "disk GUID kept");
    let (sp, np) = (
        src_table["partitions"].as_array().unwrap(),
        table["partitions"].as_array().unwrap(),
    );
    assert_eq!(sp.len(), np.len());
    for (a, b) in sp.iter().zip(np) {
        for field in ["type", "uuid", "name", "attrs"] {
            assert_eq!(a[field], b[field], "partition {field}: {a} vs {b}");
        }
    }
    let last = |p: &[serde_json::Value]| p.last().unwrap()["size"].as_u64().unwrap();
    if grown {
        assert!(
            last(np) > last(sp) + 400_000,
            "the last partition grows: {} → {}",
            last(sp),
            last(np)
        );
    }
    for n in 2..=5 {
        let (a, b) = (blkid(&source.disk.part(n)), blkid(&node.part(n)));
        for key in ["TYPE", "UUID", "LABEL"] {
            assert_eq!(a.get(key), b.get(key), "{} partition {n} {key}", node.dev());
        }
    }
    // Raw partitions: byte for byte (the ESP read back with mtools too).
    for n in [1, 2] {
        let a = std::fs::read(source.disk.part(n)).unwrap();
        let b = std::fs::read(node.part(n)).unwrap();
        assert!(a == b, "raw partition {n} differs");
    }
    let listing = ka_tests::system::bash(
        "MTOOLS_SKIP_CHECK=1 mdir -i \"$1\" -/ ::/EFI",
        &[&node.part(2)],
    );
    assert!(
        listing.contains("BOOTX64") && listing.contains("grub"),
        "{listing}"
    );
    let mut mounts = mount_node(s.path(), node);
    let (a, b) = (tree(&source.root), tree(&mounts[0].0));
    let mut allowed = vec!["tmp/"];
    allowed.extend_from_slice(changed);
    let diffs: Vec<String> = diff_trees(&a, &b, &allowed)
        .into_iter()
        .filter(|d| !changed.iter().any(|c| d.starts_with(c)))
        .collect();
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    let tmp = std::fs::symlink_metadata(mounts[0].0.join("tmp")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        tmp.permissions().mode() & 0o7777,
        0o1777,
        "the excluded /tmp keeps its mode"
    );
    assert_eq!(
        std::fs::read_dir(mounts[0].0.join("tmp")).unwrap().count(),
        0,
        "and is empty"
    );
    let (a, b) = (tree(&source.root.join("home")), tree(&mounts[1].0));
    let diffs = diff_trees(&a, &b, &[]);
    assert!(diffs.is_empty(), "/home differs:\n{}", diffs.join("\n"));
    let root_tree = tree(&mounts[0].0);
    let sparse = &root_tree["var/sparse"];
    assert!(
        sparse.allocated < 1 << 20,
        "the sparse file stays sparse: {} bytes allocated",
        sparse.allocated
    );
    // /home before /.
    while mounts.pop().is_some() {}
}

/// Three nodes and a saver: one as large as the source, one larger (its last
/// partition grows), one too small (refused before anything is written),
/// and `ka join --save` whose file `ka serve --system-image` serves again
/// to a fourth node that cannot tell the difference.
#[test]
fn a_running_system_is_rebuilt_on_nodes_saved_and_replayed() {
    let mut s = Session::new();
    let source = SourceMachine::build(s.path(), 24 << 20);
    let same = Loop::blank(&s.path().join("n1.img"), SOURCE_DISK);
    let larger = Loop::blank(&s.path().join("n2.img"), SOURCE_DISK + (512 << 20));
    let small = Loop::blank(&s.path().join("n3.img"), 300 << 20);
    let root = source.root.to_string_lossy().to_string();
    let tmp = source.root.join("tmp").to_string_lossy().to_string();
    // The machine runs: a log grows while the file systems are read, from
    // before the source starts until it has finished (it has 64 MiB
    // already, so tar is still reading it while it grows).
    let growing = source.root.join("var/log/growing");
    std::fs::write(&growing, pseudo_random(64 << 20, 3)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (growing, stop) = (growing.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&growing)
                .unwrap();
            let line = [b'x'; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&line).unwrap();
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let serve = s.serve(
        "serve",
        4,
        &[
            "--system",
            "--root",
            &root,
            "--exclude",
            &tmp,
            "--post-command",
            "echo \"ran in $(cat /etc/hostname)\" > /etc/post-command-ran",
        ],
    );
    let saved = s.path().join("golden.kasys").to_string_lossy().to_string();
    let nodes = [
        s.join("n1", &["--system", same.dev()]),
        s.join("n2", &["--system", larger.dev()]),
        s.join("n3", &["--system", small.dev()]),
        s.join("saver", &["--save", &saved]),
    ];
    let (code, out, err) = serve.finish(Duration::from_secs(240));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    std::fs::remove_file(&growing).unwrap();
    let results: Vec<_> = nodes
        .into_iter()
        .map(|n| n.finish(Duration::from_secs(60)))
        .collect();
    for (i, r) in results.iter().enumerate() {
        eprintln!("node {i}: exit {}\n{}\n{}", r.0, r.1, r.2);
    }
    eprintln!("serve: {err}");
    assert_eq!(code, 1, "one node fails (too small): {out}{err}");
    assert!(
        err.contains("changed or vanished while the system was read")
            && err.contains("var/log/growing"),
        "a file written during the capture is reported, not fatal: {err}"
    );
    assert_eq!(results[0].0, 0, "n1: {}", results[0].2);
    assert_eq!(results[1].0, 0, "n2: {}", results[1].2);
    assert_eq!(results[3].0, 0, "saver: {}", results[3].2);
    assert_ne!(results[2].0, 0);
    let refusal = &results[2].1;
    assert!(
        refusal.contains("does not fit on a disk of 300.0 MiB")
            && refusal.contains("it needs at least"),
        "the refusal gives the disk's size and the size needed: {refusal}"
    );
    let small_head = std::fs::read(small.dev()).unwrap();
    assert!(
        small_head.iter().all(|&b| b == 0),
        "a refused disk is not written at all"
    );
    let growing = ["var/log/growing", "etc/post-command-ran"];
    for disk in [&same, &larger] {
        let m = Mount::new(&disk.part(4), &s.path().join("post"), &[]);
        let ran = std::fs::read_to_string(m.0.join("etc/post-command-ran")).unwrap_or_default();
        assert_eq!(
            ran, "ran in golden\n",
            "the post-command ran chrooted in the clone"
        );
    }
    assert_same_system_but(&source, &s, &same, false, &growing);
    assert_same_system_but(&source, &s, &larger, true, &growing);

    // Replay: the saved stream, served again without the source machine.
    let replayed = Loop::blank(&s.path().join("n4.img"), SOURCE_DISK);
    let serve = s.serve("replay", 1, &["--system-image", &saved]);
    let node = s.join("n4", &["--system", replayed.dev()]);
    let (code, out, err) = serve.finish(Duration::from_secs(120));
    let (ncode, _, nerr) = node.finish(Duration::from_secs(30));
    assert_eq!((code, ncode), (0, 0), "replay: {out}{err}\n{nerr}");
    assert_same_system_but(&source, &s, &replayed, false, &growing);
}

/// The peak resident memory of a process so far, in bytes (0 once gone).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The most any spool file in `dir` holds on disk (its allocated bytes).
fn spool_allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ka-node-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .max()
        .unwrap_or(0)
}

/// A node killed mid-stream (the upstream of the next one), a node that
/// comes late (when its place's upstream no longer holds the start, so the
/// source feeds it), with the stream paced so the faults land in the
/// middle: every survivor verifies with the source's trees, and a node's
/// memory and spool stay bounded by its window, not the system's size.
#[test]
fn survivors_of_a_killed_node_and_a_late_node_are_rebuilt_whole() {
    let mut s = Session::new();
    let source = SourceMachine::build(s.path(), 200 << 20);
    let disks: Vec<Loop> = (1..=4)
        .map(|i| Loop::blank(&s.path().join(format!("k{i}.img")), SOURCE_DISK))
        .collect();
    let root = source.root.to_string_lossy().to_string();
    let tmp = source.root.join("tmp").to_string_lossy().to_string();
    let serve = s.serve(
        "serve",
        4,
        &[
            "--system",
            "--root",
            &root,
            "--exclude",
            &tmp,
            // Starts with the first three; the fourth comes late.
            "--join-timeout",
            "2s",
            "--min-nodes",
            "3",
            "--order",
            "k1,k2,k3,k4",
            // k3 is stopped for two seconds: not dead.
            "--dead-after",
            "10s",
            "--max-rate",
            "25MiB",
        ],
    );
    let window = ["--window", "16MiB"];
    let join = |name: &str, disk: &Loop| {
        let mut args = vec!["--system", disk.dev()];
        args.extend_from_slice(&window);
        s.join(name, &args)
    };
    let k1 = join("k1", &disks[0]);
    let k2 = join("k2", &disks[1]);
    let k3 = join("k3", &disks[2]);
    let mut peak = 0u64;
    let mut spool_peak = 0u64;
    let mut watch = |for_ms: u64, pids: &[u32]| {
        for _ in 0..for_ms / 50 {
            for &p in pids {
                peak = peak.max(peak_rss(p));
            }
            spool_peak = spool_peak.max(spool_allocated(s.path()));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    watch(2000, &[k1.pid(), k2.pid(), k3.pid()]);
    // k2 is killed with its new root mounted and half unpacked.
    let k2_root = disks[1].part(4);
    let mounted = |dev: &str| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&format!(" {dev} ")))
    };
    for _ in 0..600 {
        if mounted(&k2_root) {
            break;
        }
        watch(100, &[k1.pid(), k2.pid(), k3.pid()]);
    }
    assert!(mounted(&k2_root), "k2 mounted its new root within a minute");
    // k3 stops reading (k2 waits for it, k1 goes on), then k2, which feeds
    // k3, is killed: k3 is relinked to k1, whose window has moved past
    // k3's offset, so k1 refuses it and the source feeds it, from where it
    // was.
    let stop = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap()
    };
    stop(k3.pid(), nix::sys::signal::Signal::SIGSTOP);
    watch(2000, &[k1.pid(), k2.pid()]);
    k2.kill9();
    watch(300, &[k1.pid()]);
    stop(k3.pid(), nix::sys::signal::Signal::SIGCONT);
    watch(2000, &[k1.pid(), k3.pid()]);
    // By now the chain's tail is far past the start: the source feeds k4.
    let k4 = join("k4", &disks[3]);
    watch(1000, &[k1.pid(), k3.pid(), k4.pid()]);
    // k2 is started again: it starts over (its disks rebuilt from the
    // stream's first byte), past what its killed process left mounted.
    let k2 = join("k2", &disks[1]);
    let (code, out, err) = serve.finish(Duration::from_secs(240));
    let k: Vec<_> = [k1, k3, k4, k2]
        .into_iter()
        .map(|n| n.finish(Duration::from_secs(60)))
        .collect();
    for r in &k {
        eprintln!("exit {}\n{}\n{}", r.0, r.1, r.2);
    }
    eprintln!("serve: {out}\n{err}");
    for d in &disks {
        assert_same_system(&source, &s, d, false);
    }
    assert_eq!(code, 0, "every node verified, k2 after its restart: {out}");
    // The next rebuild on this machine (k4's or the restarted k2's)
    // unmounts what the killed k2 left mounted, or k2 could not rebuild.
    assert!(
        k[2].1.contains("left mounted") || k[3].1.contains("left mounted"),
        "the killed k2's mounts were cleared: {}\n{}",
        k[2].1,
        k[3].1
    );
    for (r, name) in k.iter().zip(["k1", "k3", "k4", "k2"]) {
        assert_eq!(r.0, 0, "{name} verified: {}", r.2);
        let started_over = r.1.matches("started_over").count();
        assert_eq!(started_over, 0, "{name} never started over: {}", r.1);
    }
    // k3 goes to the source, either at once (the source knew k1's window
    // had moved past it) or after k1 refused it (it learnt it then).
    assert!(
        k[1].1.contains(r#""event":"placed","upstream":"source""#),
        "k3 was relinked to the source: {}",
        k[1].1
    );
    for d in [&disks[0], &disks[2], &disks[3]] {
        assert_same_system(&source, &s, d, false);
    }
    eprintln!(
        "node peak RSS {:.1} MiB, spool peak {:.1} MiB (system stream {} MiB)",
        peak as f64 / (1 << 20) as f64,
        spool_peak as f64 / (1 << 20) as f64,
        200
    );
    assert!(peak > 0 && peak < 256 << 20, "node memory {peak} bytes");
    assert!(
        spool_peak <= (16 << 20) + (8 << 20),
        "a node's spool holds its window, not the stream: {spool_peak} bytes"
    );
}

/// The source killed mid-stream and started again with the same arguments:
/// it reads the machine anew, its nodes rebuild their disks from the new
/// stream's start, and both verify with the source's trees.
/// The source packs its stream here (`--compress zstd`): the nodes unpack
/// it on the way to their rebuild, and start over from the new source's
/// stream as they would from a plain one.
#[test]
fn a_restarted_source_has_its_nodes_rebuild_from_its_new_stream() {
    let mut s = Session::new();
    let source = SourceMachine::build(s.path(), 120 << 20);
    let disks: Vec<Loop> = (1..=2)
        .map(|i| Loop::blank(&s.path().join(format!("r{i}.img")), SOURCE_DISK))
        .collect();
    let root = source.root.to_string_lossy().to_string();
    let tmp = source.root.join("tmp").to_string_lossy().to_string();
    let input = [
        "--system",
        "--root",
        &root,
        "--exclude",
        &tmp,
        "--max-rate",
        "25MiB",
        "--compress",
        "zstd",
    ];
    let serve = s.serve("serve1", 2, &input);
    let port = s.port;
    let nodes: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| s.join(&format!("r{}", i + 1), &["--system", d.dev()]))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    serve.kill9();
    // The same port, so the nodes find it again.
    s.listen = format!("127.0.0.1:{port}");
    let serve = s.serve("serve2", 2, &input);
    let (code, out, err) = serve.finish(Duration::from_secs(240));
    let results: Vec<_> = nodes
        .into_iter()
        .map(|n| n.finish(Duration::from_secs(60)))
        .collect();
    for r in &results {
        eprintln!("exit {}\n{}\n{}", r.0, r.1, r.2);
    }
    assert_eq!(code, 0, "{out}\n{err}");
    let report = ka_tests::final_report(&out);
    let packed = report.packed.expect("the stream was packed");
    assert!(packed < report.size, "{packed} of {}", report.size);
    for r in &results {
        assert_eq!(r.0, 0, "{}", r.2);
    }
    for d in &disks {
        assert_same_system(&source, &s, d, false);
    }
}
