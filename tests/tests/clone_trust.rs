//! The trust model under attack, with real processes on loopback: a relay
//! that forges a node's verdict, fake sources (without the secret, or with
//! a key stolen from a node) found by broadcast or named, a node's key used
//! under another name, and requests to `ka tftp` for keys that are not the
//! asker's. The attackers are `ka-attacker` (tests/src/bin/ka-attacker.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ka_tests::{
    events, final_report, ka, pseudo_random, read_text as read, ChildGuard, KaTftp, Proc,
};

/// A running `ka-attacker`, its address and its log.
struct Attacker {
    _guard: ChildGuard,
    addr: SocketAddr,
    err: PathBuf,
}

impl Attacker {
    /// Starts `ka-attacker ARGS` in `dir` and waits for its address.
    fn start(dir: &Path, label: &str, args: &[&str]) -> Attacker {
        let (out, err) = (
            dir.join(format!("{label}.out")),
            dir.join(format!("{label}.err")),
        );
        let child = Command::new(env!("CARGO_BIN_EXE_ka-attacker"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start ka-attacker");
        let guard = ChildGuard {
            child,
            what: label.into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = read(&out)
                .lines()
                .find_map(|l| l.strip_prefix("listening on "))
                .and_then(|a| a.trim().parse().ok())
            {
                return Attacker {
                    _guard: guard,
                    addr,
                    err,
                };
            }
            assert!(
                Instant::now() < deadline,
                "{label} did not start: {}",
                read(&err)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        read(&self.err)
    }
}

/// A session directory: a secret, an image, the source's port once serving.
struct Session {
    dir: tempfile::TempDir,
    secret: PathBuf,
    image: PathBuf,
    port: std::cell::Cell<u16>,
}

impl Session {
    fn new(size: usize) -> Session {
        let dir = tempfile::tempdir().unwrap();
        let seed = u64::from(std::process::id()) ^ dir.path().as_os_str().len() as u64;
        let secret = dir.path().join("secret");
        ka_tests::write_secret(&secret, seed);
        let image = dir.path().join("image.img");
        std::fs::write(&image, pseudo_random(size, seed + 1)).unwrap();
        Session {
            dir,
            secret,
            image,
            port: std::cell::Cell::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port.get())
    }

    /// Starts `ka serve` for `nodes` on a port the kernel picks.
    fn serve(&self, nodes: u32) -> Proc {
        let n = nodes.to_string();
        let (secret, image) = (self.secret.to_str().unwrap(), self.image.to_str().unwrap());
        let state = self.path("state");
        let args = [
            "serve",
            "--nodes",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            secret,
            "--image",
            image,
            "--state-dir",
            state.to_str().unwrap(),
            "--json",
        ];
        let p = Proc::start(self.dir.path(), "serve", &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(port) = read(&p.err)
                .lines()
                .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
            {
                self.port.set(port.trim().parse().expect("a port"));
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "ka serve did not start: {}",
                read(&p.err)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `ka join` as `name` with `key` (the secret or a node key),
    /// reaching its source as `reach` says (`--server X`, or
    /// `--discover-to X`), for at most `wait`.
    fn join(&self, name: &str, key: &Path, reach: &[&str], wait: &str) -> Proc {
        let target = self.target(name);
        let state = self.path("state");
        let mut args = vec![
            "join",
            "--secret-file",
            key.to_str().unwrap(),
            "--name",
            name,
            "--target",
            target.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--wait",
            wait,
        ];
        args.extend_from_slice(reach);
        Proc::start(self.dir.path(), name, &args)
    }

    fn target(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.img"))
    }

    /// `ka key derive` for node `name` of session `ka`, into `NAME.key`.
    fn node_key(&self, name: &str) -> PathBuf {
        let out = self.path(&format!("{name}.key"));
        let o = ka(&[
            "key",
            "derive",
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    }

    /// Fills the target of `name` with a pattern: an attack that writes
    /// anything shows.
    fn prefill(&self, name: &str) -> Vec<u8> {
        let before = vec![0x5c; 1 << 20];
        std::fs::write(self.target(name), &before).unwrap();
        before
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_relay_that_forges_a_verified_gets_no_node_reported_ok_without_its_copy() {
    let s = Session::new(8 << 20);
    let serve = s.serve(1);
    let relay = Attacker::start(
        s.dir.path(),
        "relay",
        &["relay", "127.0.0.1:0", &s.server()],
    );
    let node = s.join("a", &s.secret, &["--server", &relay.addr.to_string()], "3s");
    let (code, out, err) = serve.finish(Duration::from_secs(120));
    assert!(
        relay.log().contains("telling it the node verified"),
        "the relay did not get to forge: {}",
        relay.log()
    );
    let report = final_report(&out);
    let a = &report.nodes[0];
    // The source may say OK of a node only if the node holds the image.
    let copy = std::fs::read(s.target("a")).unwrap_or_default();
    let image = std::fs::read(&s.image).unwrap();
    assert!(
        !a.ok || copy == image,
        "the source reported a OK, but a holds {} of {} bytes of the image:\n{out}\n{err}",
        copy.len(),
        image.len()
    );
    // The forgery cost the node its connection, and the node its place:
    // the session, left without nodes, ends saying why.
    assert!(!a.ok, "{a:?}");
    assert!(a.reason.contains("authentication"), "{a:?}");
    assert!(
        events(&out).iter().any(|e| e["event"] == "dead"
            && e["reason"]
                .as_str()
                .unwrap_or("")
                .contains("authentication")),
        "{out}"
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert_ne!(node.finish(Duration::from_secs(30)).0, 0);
}

#[test]
fn a_fake_source_found_by_broadcast_is_not_believed_and_nothing_is_written() {
    let s = Session::new(1 << 20);
    let udp = free_udp_port();
    let fake = Attacker::start(
        s.dir.path(),
        "fake",
        &["source", "127.0.0.1:0", &udp.to_string(), "ka"],
    );
    let before = s.prefill("a");
    let to = format!("127.0.0.1:{udp}");
    let node = s.join("a", &s.secret, &["--discover-to", &to], "3s");
    let (code, _, err) = node.finish(Duration::from_secs(30));
    assert!(fake.log().contains("answering discovery"), "{}", fake.log());
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("impostor"), "{err}");
    assert!(
        std::fs::read(s.target("a")).unwrap() == before,
        "the target was written"
    );
    assert!(
        !fake.log().contains("welcoming"),
        "the node connected: {}",
        fake.log()
    );
}

#[test]
fn a_fake_source_named_by_server_is_refused_before_a_byte_is_written() {
    let s = Session::new(1 << 20);
    let fake = Attacker::start(
        s.dir.path(),
        "fake",
        &["source", "127.0.0.1:0", &free_udp_port().to_string(), "ka"],
    );
    let before = s.prefill("a");
    let node = s.join("a", &s.secret, &["--server", &fake.addr.to_string()], "3s");
    let (code, out, err) = node.finish(Duration::from_secs(30));
    assert!(fake.log().contains("welcoming a"), "{}", fake.log());
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("not believed"), "{err}");
    assert!(
        std::fs::read(s.target("a")).unwrap() == before,
        "the target was written"
    );
    assert!(
        !fake.log().contains("serving a data hello"),
        "{}",
        fake.log()
    );
}

#[test]
fn a_key_stolen_from_one_node_serves_no_other_node_and_no_source() {
    let s = Session::new(1 << 20);
    let (a_key, b_key) = (s.node_key("a"), s.node_key("b"));
    // ka serve will not stand on a node's key.
    let mut serve = Command::new(ka_tests::ka_bin());
    ka_tests::private_logs(&mut serve, s.dir.path()).args([
        "serve",
        "--secret-file",
        a_key.to_str().unwrap(),
        "--image",
        s.image.to_str().unwrap(),
        "--nodes",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        s.dir.path().to_str().unwrap(),
    ]);
    let o = ka_tests::run(&mut serve, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not the session secret"), "{err}");
    // A fake source holding a's key, found by broadcast or named: b, which
    // holds only its own key, believes none of it.
    let udp = free_udp_port();
    let fake = Attacker::start(
        s.dir.path(),
        "fake",
        &[
            "source",
            "127.0.0.1:0",
            &udp.to_string(),
            "ka",
            a_key.to_str().unwrap(),
        ],
    );
    let before = s.prefill("b");
    let to = format!("127.0.0.1:{udp}");
    let (code, _, err) = s
        .join("b", &b_key, &["--discover-to", &to], "3s")
        .finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("impostor"), "{err}");
    let (code, _, err) = s
        .join("b", &b_key, &["--server", &fake.addr.to_string()], "3s")
        .finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("not believed"), "{err}");
    assert!(
        std::fs::read(s.target("b")).unwrap() == before,
        "b's target was written"
    );
}

/// Reads one whole frame from a blocking socket.
fn read_frame(conn: &mut std::net::TcpStream) -> ka_core::codec::Message {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("a frame's length");
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
    conn.read_exact(&mut frame[4..]).expect("a frame's body");
    ka_core::codec::Message::decode_exact(&frame).expect("a well-formed frame")
}

#[test]
fn a_node_key_joins_as_its_node_and_under_no_other_name() {
    use ka_core::codec::{Join, Message, Nonce, RefusalCode, PROTOCOL_VERSION};
    let s = Session::new(4 << 20);
    let a_key = s.node_key("a");
    let serve = s.serve(1);
    // ka join will not send a's key under b's name.
    let o = ka(&[
        "join",
        "--server",
        &s.server(),
        "--secret-file",
        a_key.to_str().unwrap(),
        "--name",
        "b",
        "--target",
        s.target("b").to_str().unwrap(),
        "--wait",
        "5s",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not of node \"b\""), "{err}");
    // A client that does: the source derives b's key, and the proof fails.
    let mut peer = std::net::TcpStream::connect(s.server()).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let Message::Challenge { nonce, .. } = read_frame(&mut peer) else {
        panic!("no challenge")
    };
    let ka_net::shell::KeyFile::Node(key) = ka_net::shell::load_key_file(&a_key).unwrap() else {
        panic!("a node key file")
    };
    let mut join = Join {
        version: PROTOCOL_VERSION,
        session: "ka".into(),
        name: "b".into(),
        mac: [2, 0, 0, 0, 0, 2],
        data_addr: "127.0.0.1:9".parse().unwrap(),
        wait_release: false,
        readable: true,
        have: 0,
        holds_from: 0,
        image: None,
        nonce: Nonce([7; 32]),
        proof: Default::default(),
    };
    join.proof = ka_core::auth::join_proof(&*key.mac_key(), &nonce, &join);
    peer.write_all(&Message::Join(Box::new(join)).to_bytes())
        .unwrap();
    match read_frame(&mut peer) {
        Message::Refused(r) => assert_eq!(r.code, RefusalCode::BadProof, "{r:?}"),
        other => panic!("b was let in with a's key: {other:?}"),
    }
    // a, with nothing but its own key, clones.
    let node = s.join("a", &a_key, &["--server", &s.server()], "60s");
    let (code, out, err) = serve.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{out}\n{err}");
    let report = final_report(&out);
    assert_eq!(report.nodes.len(), 1, "{out}");
    assert!(report.nodes[0].ok && report.nodes[0].name == "a", "{out}");
    assert_eq!(node.finish(Duration::from_secs(30)).0, 0);
    assert!(std::fs::read(s.target("a")).unwrap() == std::fs::read(&s.image).unwrap());
}

// ----- keys over TFTP -----

/// Reads `path` from the TFTP server at `server`, asking from `from`: the
/// file, or the server's error message.
fn tftp_get(server: SocketAddr, from: [u8; 4], path: &str) -> Result<Vec<u8>, String> {
    let sock = UdpSocket::bind(SocketAddr::from((from, 0))).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(path.as_bytes());
    rrq.extend_from_slice(b"\0octet\0");
    sock.send_to(&rrq, server).unwrap();
    let mut file = Vec::new();
    let mut buf = [0u8; 600];
    loop {
        let (n, peer) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        match (buf[1], n) {
            (3, n) if n >= 4 => {
                file.extend_from_slice(&buf[4..n]);
                sock.send_to(&[0, 4, buf[2], buf[3]], peer).unwrap();
                if n - 4 < 512 {
                    return Ok(file);
                }
            }
            (5, n) if n >= 4 => {
                return Err(String::from_utf8_lossy(&buf[4..n])
                    .trim_end_matches('\0')
                    .to_string())
            }
            _ => return Err(format!("a strange packet: {:?}", &buf[..n])),
        }
    }
}

/// An inventory of two nodes on loopback addresses (127.0.0.11 and .12), so
/// a test can ask as either, or as neither.
fn loopback_inventory(dir: &Path) -> PathBuf {
    let text = r#"[network]
subnet = "127.0.0.0/24"

[boot]
server = "127.0.0.1"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"

[session]
name = "lab"
source = "127.0.0.1:4715"
disk = "/dev/vda"

[[node]]
name = "n1"
mac = "52:54:00:09:00:01"
ip = "127.0.0.11"

[[node]]
name = "n2"
mac = "52:54:00:09:00:02"
ip = "127.0.0.12"
"#;
    std::fs::create_dir_all(dir.join("root/ka")).unwrap();
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn ka_tftp_hands_a_node_its_own_key_at_its_address_while_it_installs_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let inv = loopback_inventory(dir.path());
    let state = dir.path().join("state");
    let secret = dir.path().join("secret");
    let hex: String = pseudo_random(32, 99)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&secret, &hex).unwrap();
    let pxe = |args: &[&str]| {
        let mut all = vec!["pxe", "--inventory", inv.to_str().unwrap(), "--state-dir"];
        all.push(state.to_str().unwrap());
        all.extend_from_slice(args);
        let o = ka(&all);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    pxe(&["set", "--mode", "install", "n1", "n2"]);
    let server = KaTftp::start(&inv, &state, &["--secret-file", secret.to_str().unwrap()]);
    let (n1, n2, stranger) = ([127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 99]);

    // n1 gets its own key: the one ka key derive gives for it.
    let got = tftp_get(server.addr, n1, "ka/keys/n1.key").expect("n1's key");
    let want = ka(&[
        "key",
        "derive",
        "--secret-file",
        secret.to_str().unwrap(),
        "--session",
        "lab",
        "--name",
        "n1",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&got).trim(),
        String::from_utf8_lossy(&want.stdout).trim()
    );
    assert!(
        !String::from_utf8_lossy(&got).contains(&hex),
        "the secret went out"
    );
    assert!(tftp_get(server.addr, n2, "ka/keys/n2.key").is_ok());
    // Another node's key, from a node's address or a stranger's.
    assert!(tftp_get(server.addr, n1, "ka/keys/n2.key").is_err());
    assert!(tftp_get(server.addr, stranger, "ka/keys/n1.key").is_err());
    assert!(tftp_get(server.addr, stranger, "ka/keys/n9.key").is_err());
    // n1's clone verified: flipped to local, its key is served no more.
    pxe(&["set", "--mode", "local", "n1"]);
    assert!(tftp_get(server.addr, n1, "ka/keys/n1.key").is_err());
    // Keys left in the root are not served, to anyone.
    std::fs::write(dir.path().join("root/ka/secret"), &hex).unwrap();
    std::fs::write(dir.path().join("root/ka/keys-n2"), &got).unwrap();
    assert!(tftp_get(server.addr, n2, "ka/secret").is_err());
    assert!(tftp_get(server.addr, n2, "ka/keys-n2").is_err());
    // Each refusal is logged with its reason (the log is read as it comes).
    for why in ["not from its address", "local mode", "holds a ka key"] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.log().contains(why) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(server.log().contains(why), "{why}: {}", server.log());
    }
    // With --no-keys, ka tftp hands out nothing.
    let bare = KaTftp::start(&inv, &state, &["--no-keys"]);
    assert!(tftp_get(bare.addr, n2, "ka/keys/n2.key").is_err());
}
