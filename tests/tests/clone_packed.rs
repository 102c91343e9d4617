//! Packed streams with real processes on loopback: `ka serve --compress`
//! packs once, every `ka join` forwards the packed bytes and unpacks them
//! into its target; checked by what lands on disk, by the reports, and by
//! what travelled. `auto`'s weighing of the link runs in the
//! network-namespace lab instead, whose interfaces report a speed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ka_tests::{final_report, pseudo_random, require_tool, system_like, Proc};

/// A session directory with a secret, and `ka serve` / `ka join` started
/// in it.
struct Session {
    dir: tempfile::TempDir,
    secret: PathBuf,
}

impl Session {
    fn new(seed: u64) -> Session {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        ka_tests::write_secret(&secret, seed ^ u64::from(std::process::id()));
        Session { dir, secret }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ka serve --json` of `input` for `nodes` nodes on a port the kernel
    /// picks; returns it and its address (from its first line).
    fn serve(&self, nodes: u32, input: &[&str], extra: &[&str]) -> (Proc, String) {
        let n = nodes.to_string();
        let dir = self.dir.path().to_str().unwrap();
        let mut args = vec![
            "serve",
            "--nodes",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--state-dir",
            dir,
            "--spool-dir",
            dir,
            "--json",
        ];
        args.extend_from_slice(input);
        args.extend_from_slice(extra);
        let serve = Proc::start(self.dir.path(), "serve", &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let err = ka_tests::read_text(&serve.err);
            if let Some(addr) = err
                .lines()
                .find_map(|l| l.split(" nodes on ").nth(1))
                .map(str::to_string)
            {
                break addr;
            }
            assert!(Instant::now() < deadline, "ka serve did not start:\n{err}");
            std::thread::sleep(Duration::from_millis(20));
        };
        (serve, addr)
    }

    /// `ka join --json` as `name`, writing with `output` (`--target P`,
    /// `--untar D`, `--command C`).
    fn join(&self, server: &str, name: &str, output: &[&str]) -> Proc {
        let dir = self.dir.path().to_str().unwrap();
        let mut args = vec![
            "join",
            "--server",
            server,
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--name",
            name,
            "--state-dir",
            dir,
            "--spool-dir",
            dir,
            "--wait",
            "30s",
            "--json",
        ];
        args.extend_from_slice(output);
        Proc::start(self.dir.path(), name, &args)
    }

    /// Joins `names` with file targets named after them; returns the
    /// processes and the targets.
    fn join_files(&self, server: &str, names: &[&str]) -> (Vec<Proc>, Vec<PathBuf>) {
        let targets: Vec<PathBuf> = names
            .iter()
            .map(|n| self.path(&format!("{n}.img")))
            .collect();
        let procs = names
            .iter()
            .zip(&targets)
            .map(|(n, t)| self.join(server, n, &["--target", t.to_str().unwrap()]))
            .collect();
        (procs, targets)
    }
}

const WAIT: Duration = Duration::from_secs(60);

/// Waits for every node, asserting it verified and unpacked.
/// Waits for every node to exit 0 having unpacked; returns each node's
/// label and output.
fn all_unpacked(nodes: Vec<Proc>) -> Vec<(String, String)> {
    nodes
        .into_iter()
        .map(|node| {
            let label = node.guard.what.clone();
            let (code, out, err) = node.finish(WAIT);
            assert_eq!(code, 0, "{label}:\n{out}\n{err}");
            assert!(
                out.contains("\"event\":\"unpacked\""),
                "{label} printed no unpacked step:\n{out}"
            );
            (label, out)
        })
        .collect()
}

fn assert_copies(image: &[u8], targets: &[PathBuf]) {
    for t in targets {
        let copy = std::fs::read(t).unwrap();
        assert!(copy == image, "{} differs from the image", t.display());
    }
}

/// `auto` packs an image of system-like files and sends a
/// random one as it is; a packed clone is byte-identical on every node, keeps
/// the image's holes, and costs the wire a fraction of the image.
#[test]
fn auto_packs_what_packs_and_every_copy_is_identical() {
    let s = Session::new(1);
    let image = s.path("image.img");
    let mut bytes = system_like(24 << 20, 1);
    // A hole of 8 MiB at the end: left a hole on every node.
    bytes.resize(32 << 20, 0);
    std::fs::write(&image, &bytes[..24 << 20]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (serve, server) = s.serve(
        3,
        &["--image", image.to_str().unwrap()],
        &["--compress", "auto"],
    );
    let (nodes, targets) = s.join_files(&server, &["n1", "n2", "n3"]);
    all_unpacked(nodes);
    let (code, out, err) = serve.finish(WAIT);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("sending it packed with zstd"), "{err}");
    let report = final_report(&out);
    assert_eq!(report.size, 32 << 20);
    let packed = report.packed.expect("the report gives the packed size");
    assert!(
        packed * 2 < 24 << 20,
        "24 MiB of system-like data and 8 MiB of hole packed to {packed} bytes"
    );
    for n in &report.nodes {
        assert!(n.ok, "{n:?}");
        assert_eq!(n.bytes, packed, "{n:?} received what travelled");
    }
    assert_copies(&bytes, &targets);
    for t in &targets {
        let allocated = std::fs::metadata(t).unwrap().blocks() * 512;
        assert!(
            allocated < 25 << 20,
            "{}: {allocated} bytes allocated for 24 MiB of data",
            t.display()
        );
    }
    // The spools went with the nodes.
    let left: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .collect();
    assert!(left.is_empty(), "spools left: {left:?}");

    // Random bytes do not pack: sent as they are, plain.
    let s = Session::new(2);
    let image = s.path("random.img");
    let bytes = pseudo_random(8 << 20, 2);
    std::fs::write(&image, &bytes).unwrap();
    let (serve, server) = s.serve(
        2,
        &["--image", image.to_str().unwrap()],
        &["--compress", "auto"],
    );
    let (nodes, targets) = s.join_files(&server, &["r1", "r2"]);
    for node in nodes {
        let (code, out, err) = node.finish(WAIT);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(!out.contains("\"event\":\"unpacked\""), "{out}");
    }
    let (code, out, err) = serve.finish(WAIT);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("sending it as it is"), "{err}");
    assert_eq!(final_report(&out).packed, None);
    assert_copies(&bytes, &targets);
}

/// `auto` weighs packing against the link the source listens on: in the
/// network-namespace lab the source's `eth0` is a veth, which reports
/// 10000 Mbit/s, faster than this machine packs (a source with two cores
/// packs a few hundred MB/s), so an image that packs well is sent as it is;
/// told the link is 100 Mbit/s (the rate the lab shapes its ports to), the
/// source packs it. Every copy is identical either way.
#[test]
fn auto_packs_only_when_the_source_outpaces_the_link_it_listens_on() {
    use ka_tests::lab::{Lab, Rate};
    let lab = Lab::new(2, Rate::mbit(100));
    let image = lab.dir().join("system-like.img");
    std::fs::write(&image, system_like(16 << 20, 6)).unwrap();
    let s = lab.session_of(&image);
    for (extra, decided) in [
        (
            &["--compress", "auto"][..],
            "too slow for eth0's 10000 Mbit/s (1250 MB/s): sending it as it is",
        ),
        (
            &["--compress", "auto", "--link-rate", "100Mbit"][..],
            "more than --link-rate carries",
        ),
    ] {
        let serve = s.serve(2, extra);
        let joins = s.join_all(&[]);
        let fin = serve.finish(Duration::from_secs(90));
        assert!(fin.transcript.contains(decided), "{}", fin.transcript);
        s.check(&fin, joins, &[]);
    }
}

/// A node killed mid-stream: the chain heals around it, its downstream
/// resumes in the packed stream from what its new upstream's window (or
/// the source's spool) holds, and the killed node, started again, goes on
/// from the last frame end it recorded (the source ends a frame every
/// 64 MiB of image): it reads its target's prefix back, receives only the
/// rest of the stream, and its copy is checked whole.
#[test]
fn a_node_killed_mid_packed_stream_goes_on_from_its_last_frame_end() {
    let s = Session::new(3);
    let image = s.path("image.img");
    let bytes = system_like(96 << 20, 3);
    std::fs::write(&image, &bytes).unwrap();
    // About 12 MiB packed at 2 MiB/s: 6 s of streaming, the one frame end
    // before the last at two thirds of the stream.
    let end =
        kill_after_a_frame_end_and_restart(&s, &image, &bytes, &["--compress", "zstd:3"], 64 << 20);
    assert_eq!(end, 64 << 20);
}

/// A `.zst` image of several frames (pieces packed apart and put end to
/// end) travels as it is, and a node restarted in it goes on from one of
/// its frame ends, here one that follows a run of zeros of an image whose
/// size the nodes learn only at its end.
#[test]
fn a_node_restarted_in_a_zst_image_of_several_frames_goes_on_from_one() {
    let s = Session::new(5);
    let zstd = require_tool("zstd", "zstd");
    const PIECE: usize = 16 << 20;
    let mut bytes = system_like(4 * PIECE, 5);
    bytes[PIECE..2 * PIECE].fill(0);
    let image = s.path("image.img.zst");
    let mut file = Vec::new();
    for piece in bytes.chunks(PIECE) {
        let raw = s.path("piece");
        std::fs::write(&raw, piece).unwrap();
        let o = std::process::Command::new(&zstd)
            .args(["-q", "-c", "-3"])
            .arg(&raw)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        file.extend_from_slice(&o.stdout);
    }
    std::fs::write(&image, &file).unwrap();
    let end = kill_after_a_frame_end_and_restart(
        &s,
        &image,
        &bytes,
        &["--compress", "auto"],
        2 * PIECE as u64,
    );
    assert!(
        end.is_multiple_of(PIECE as u64) && end >= 2 * PIECE as u64,
        "{end}"
    );
}

/// Serves `image` (of `bytes`) to four nodes with `compress`, paced so
/// that the stream takes seconds; kills n2 once it has recorded a frame
/// end at `at` bytes of image or more, starts it again, and checks that it
/// went on from the frame end its state held, received no more than the
/// stream after it, and that every copy is the image. Returns the image
/// offset n2 went on from.
fn kill_after_a_frame_end_and_restart(
    s: &Session,
    image: &Path,
    bytes: &[u8],
    compress: &[&str],
    at: u64,
) -> u64 {
    let mut extra = vec!["--max-rate", "2MiB", "--order", "n1,n2,n3,n4"];
    extra.extend_from_slice(compress);
    let (serve, server) = s.serve(4, &["--image", image.to_str().unwrap()], &extra);
    let (mut nodes, targets) = s.join_files(&server, &["n1", "n2", "n3", "n4"]);
    let state = ka_net::shell::resume::NodeState::path(s.dir.path(), "ka", "n2");
    let frame_end = || {
        ka_net::shell::resume::NodeState::load(&state)
            .ok()
            .flatten()
            .and_then(|st| Some((st.durable, st.unpacked?)))
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while frame_end().is_none_or(|(_, image)| image < at) {
        assert!(
            Instant::now() < deadline,
            "n2 never recorded a frame end at {at} or later: {:?}",
            frame_end()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes.remove(1).kill9();
    // What the killed process left is what its successor goes on from.
    let (stream_at, image_at) = frame_end().expect("the state outlives its node");
    std::thread::sleep(Duration::from_millis(1000));
    // Started again reading its target back too: its unpacker does that,
    // since only a window of the packed stream is left to read.
    let again = s.join(
        &server,
        "n2",
        &[
            "--target",
            targets[1].to_str().unwrap(),
            "--verify",
            "readback",
        ],
    );
    nodes.insert(1, again);
    let outputs = all_unpacked(nodes);
    let (label, out) = &outputs[1];
    for step in [
        "read back and checked again".to_string(),
        format!("went on from a frame end at {image_at} bytes of image"),
    ] {
        assert!(out.contains(&step), "{label} did not say {step:?}:\n{out}");
    }
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let welcomed = lines.iter().rfind(|v| v["event"] == "welcomed").unwrap();
    let left = lines.iter().find(|v| v["event"] == "left").unwrap();
    let (code, out, err) = serve.finish(WAIT);
    assert_eq!(code, 0, "{out}\n{err}");
    let report = final_report(&out);
    let stream = report.packed.expect("packed");
    assert_eq!(
        welcomed["resumed_from"].as_u64(),
        Some(stream_at),
        "{welcomed}"
    );
    let received = left["received"].as_u64().unwrap();
    eprintln!("n2 went on from {stream_at} of a stream of {stream} ({image_at} of image), received {received}");
    assert!(
        received <= stream - stream_at,
        "the restarted n2 received {received} bytes of the stream's {stream}, \
         more than the {} after its frame end",
        stream - stream_at
    );
    for n in &report.nodes {
        assert!(n.ok, "{n:?}");
    }
    let n2 = report.nodes.iter().find(|n| n.name == "n2").unwrap();
    assert!(n2.deaths >= 1, "n2 was killed: {n2:?}");
    assert_copies(bytes, &targets);
    assert!(!state.exists(), "n2's state outlived its check");
    image_at
}

/// Images that are already compressed: a `.zst` image travels as it is (the
/// stream is the file and ka's trailer), gzip and xz images are decoded at
/// the source (and packed again unless `--compress off`).
#[test]
fn zst_images_travel_as_they_are_and_gzip_and_xz_images_are_decoded() {
    let s = Session::new(4);
    let bytes = system_like(12 << 20, 4);
    let raw = s.path("image.img");
    std::fs::write(&raw, &bytes).unwrap();
    let zstd = require_tool("zstd", "zstd");
    let xz = require_tool("xz", "xz-utils");
    let gzip = require_tool("gzip", "gzip");
    let make = |tool: &Path, args: &[&str], out: &str| {
        let o = std::process::Command::new(tool)
            .args(args)
            .arg(&raw)
            .stdout(std::fs::File::create(s.path(out)).unwrap())
            .output()
            .unwrap();
        assert!(o.status.success(), "{tool:?}: {o:?}");
        s.path(out)
    };
    let zst = make(&zstd, &["-q", "-c", "-9"], "image.img.zst");
    let gz = make(&gzip, &["-c"], "image.img.gz");
    let xzf = make(&xz, &["-c", "-T1"], "image.img.xz");
    for (i, (file, compress, expect)) in [
        (&zst, "auto", "zstd stream: sending it as it is"),
        (&gz, "auto", "gzip: decoding it"),
        (&xzf, "off", "xz: decoding it"),
        (&zst, "off", "zstd stream: decoding it"),
    ]
    .into_iter()
    .enumerate()
    {
        let (serve, server) = s.serve(
            2,
            &["--image", file.to_str().unwrap()],
            &["--compress", compress],
        );
        let names = [format!("a{i}"), format!("b{i}")];
        let (nodes, targets) = s.join_files(&server, &[&names[0], &names[1]]);
        for node in nodes {
            let (code, out, err) = node.finish(WAIT);
            assert_eq!(code, 0, "{file:?} {compress}:\n{out}\n{err}");
        }
        let (code, out, err) = serve.finish(WAIT);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(err.contains(expect), "{file:?} {compress}: {err}");
        let report = final_report(&out);
        assert_eq!(report.size, 12 << 20, "{file:?} {compress}");
        match (i, report.packed) {
            (0, Some(p)) => assert_eq!(
                p,
                std::fs::metadata(&zst).unwrap().len() + 56,
                "the .zst file and the trailer"
            ),
            (1, Some(_)) | (2, None) | (3, None) => {}
            (_, p) => panic!("{file:?} {compress}: packed {p:?}"),
        }
        assert_copies(&bytes, &targets);
    }
}

/// A directory tree packed from `--tar`, unpacked by nodes that untar it and
/// by one that feeds a command.
#[test]
fn tar_streams_pack_and_untar_and_command_targets_unpack() {
    let s = Session::new(5);
    let tree = s.path("tree");
    std::fs::create_dir_all(tree.join("etc/ka")).unwrap();
    std::fs::write(tree.join("etc/ka/words"), system_like(3 << 20, 5)).unwrap();
    std::fs::write(tree.join("noise"), pseudo_random(1 << 20, 5)).unwrap();
    let (serve, server) = s.serve(
        2,
        &["--tar", tree.to_str().unwrap()],
        &["--compress", "zstd:1"],
    );
    let copy = s.path("copy");
    let untar = s.join(&server, "untar", &["--untar", copy.to_str().unwrap()]);
    let tar_file = s.path("stream.tar");
    let cmd = format!("cat > {}", tar_file.display());
    let command = s.join(&server, "command", &["--command", &cmd]);
    for node in [untar, command] {
        let (code, out, err) = node.finish(WAIT);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let (code, out, err) = serve.finish(WAIT);
    assert_eq!(code, 0, "{out}\n{err}");
    let report = final_report(&out);
    let packed = report.packed.expect("packed");
    assert!(packed < report.size * 3 / 4, "{packed} of {}", report.size);
    for f in ["etc/ka/words", "noise"] {
        assert_eq!(
            std::fs::read(copy.join(f)).unwrap(),
            std::fs::read(tree.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(std::fs::metadata(&tar_file).unwrap().len(), report.size);
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&tar_file)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("etc/ka/words"));
}
