use super::*;
use std::net::UdpSocket as StdUdp;
use transfer::UNCONFIRMED_RETRIES;

#[test]
fn clean_path_accepts_relative_and_refuses_escapes() {
    assert_eq!(clean_path(Path::new("pxelinux.0")).unwrap(), "pxelinux.0");
    assert_eq!(clean_path(Path::new("./a//b/./c")).unwrap(), "a/b/c");
    // A leading `/` is the TFTP root, never the server's.
    assert_eq!(
        clean_path(Path::new("/grub/grub.cfg")).unwrap(),
        "grub/grub.cfg"
    );
    assert_eq!(clean_path(Path::new("//etc/passwd")).unwrap(), "etc/passwd");
    for bad in [
        "/",
        "/../x",
        "../x",
        "a/../../x",
        "a/..",
        "",
        ".",
        "a\\..\\b",
    ] {
        assert!(clean_path(Path::new(bad)).is_err(), "{bad}");
    }
}

/// Starts a server for `root` with one generated file on its own thread and
/// runtime, and returns its address.
fn start(root: &Path, tune: impl FnOnce(&mut TftpConfig) + Send + 'static) -> SocketAddr {
    let root = root.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let generated: Arc<dyn GeneratedFiles> = Arc::new(|path: &str, client: SocketAddr| {
                if path.starts_with("gen/secret") {
                    return Generated::Refused("not for you".into());
                }
                (path == "gen/hello")
                    .then(|| format!("hello {}", client.ip()).into_bytes())
                    .into()
            });
            let mut config = TftpConfig::new("127.0.0.1:0".parse().unwrap(), root);
            tune(&mut config);
            let server = TftpServer::bind(config, generated).await.unwrap();
            tx.send(server.local_addr()).unwrap();
            server.serve().await.unwrap();
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

/// A request packet: `opcode` 1 read, 2 write, with option pairs.
fn request_packet(opcode: u8, path: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut pkt = vec![0, opcode];
    pkt.extend_from_slice(path.as_bytes());
    pkt.extend_from_slice(b"\0octet\0");
    for (k, v) in options {
        pkt.extend_from_slice(k.as_bytes());
        pkt.push(0);
        pkt.extend_from_slice(v.as_bytes());
        pkt.push(0);
    }
    pkt
}

/// Sends a request and returns the first reply.
fn request(server: SocketAddr, opcode: u8, path: &str) -> (StdUdp, SocketAddr, Vec<u8>) {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&request_packet(opcode, path, &[]), server)
        .unwrap();
    let mut buf = [0u8; 1024];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    (sock, from, buf[..n].to_vec())
}

#[test]
fn serves_generated_and_disk_files_and_refuses_the_rest() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("disk.txt"), "on disk").unwrap();
    let server = start(root.path(), |_| {});

    let (sock, from, reply) = request(server, 1, "gen/hello");
    assert_eq!(reply, b"\0\x03\0\x01hello 127.0.0.1", "one DATA block");
    sock.send_to(&[0, 4, 0, 1], from).unwrap();

    let (sock, from, reply) = request(server, 1, "./disk.txt");
    assert_eq!(reply, b"\0\x03\0\x01on disk");
    sock.send_to(&[0, 4, 0, 1], from).unwrap();

    // A name the provider refuses is not read from disk either.
    std::fs::create_dir(root.path().join("gen")).unwrap();
    std::fs::write(root.path().join("gen/secret"), "on disk").unwrap();
    let (_, _, reply) = request(server, 1, "gen/secret");
    assert_eq!(&reply[..4], &[0, 5, 0, 2], "{reply:?}");
    // As GRUB's network image asks: from the TFTP root.
    let (sock, from, reply) = request(server, 1, "/disk.txt");
    assert_eq!(reply, b"\0\x03\0\x01on disk");
    sock.send_to(&[0, 4, 0, 1], from).unwrap();

    for (opcode, path, code) in [
        (1, "../etc/passwd", 2),
        (1, "/../etc/passwd", 2),
        // The root's etc/passwd, which it has not.
        (1, "/etc/passwd", 1),
        (1, "missing", 1),
        (2, "upload", 0),
    ] {
        let (_, _, reply) = request(server, opcode, path);
        assert_eq!(&reply[..4], &[0, 5, 0, code], "{path}: {reply:?}");
    }
}

/// Receives everything the server sends to `sock` for `window`, returning
/// (datagrams, bytes, whether an ERROR came).
fn drain(sock: &StdUdp, window: Duration) -> (usize, usize, bool) {
    let end = std::time::Instant::now() + window;
    let (mut pkts, mut bytes, mut error) = (0, 0, false);
    let mut buf = vec![0u8; 65536];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return (pkts, bytes, error);
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                pkts += 1;
                bytes += n;
                error |= buf[..n].starts_with(&[0, 5]);
            }
            Err(_) => continue,
        }
    }
}

#[test]
fn a_silent_client_gets_one_small_window_and_is_dropped() {
    let root = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(root.path().join("big")).unwrap();
    f.set_len(64 << 20).unwrap();
    let server = start(root.path(), |c| c.timeout = Duration::from_millis(200));

    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    let req = request_packet(
        1,
        "big",
        &[
            ("blksize", "65464"),
            ("windowsize", "65535"),
            ("timeout", "255"),
            ("tsize", "0"),
        ],
    );
    sock.send_to(&req, server).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"\0\x06blksize\x001468\0tsize\x0067108864\0windowsize\x0016\0",
        "capped options, timeout declined"
    );
    sock.send_to(&[0, 4, 0, 0], from).unwrap();
    // 200 ms timeout, 5 retries: given up after about 1.2 s.
    let (pkts, bytes, error) = drain(&sock, Duration::from_secs(3));
    assert!(error, "the server said it gave up");
    // One window of 16, then one probe per timeout, then the ERROR.
    assert_eq!(pkts, 16 + 5 + 1, "{bytes} bytes");
    assert!(bytes < 32 * 1472, "{bytes} bytes");
}

#[test]
fn a_request_never_acknowledged_is_dropped_sooner() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), vec![3u8; 4096]).unwrap();
    let server = start(root.path(), |c| c.timeout = Duration::from_millis(200));
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.send_to(&request_packet(1, "f", &[]), server).unwrap();
    // Block 1, two retransmissions, then the ERROR; not 5 retransmissions.
    let (pkts, bytes, error) = drain(&sock, Duration::from_secs(2));
    assert!(error);
    assert_eq!(pkts, 1 + UNCONFIRMED_RETRIES as usize + 1, "{bytes} bytes");
}

#[test]
fn transfers_are_capped_per_client_and_in_total_and_slots_come_back() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), vec![7u8; 4096]).unwrap();
    let server = start(root.path(), |c| {
        c.max_transfers = 6;
        c.max_transfers_per_client = 4;
        c.timeout = Duration::from_millis(800);
        c.retries = 1;
        // Only the caps on transfers at once are under test here.
        c.max_unproven_transfers = 6;
        c.new_transfers_per_sec = 1000;
        c.new_transfers_per_client_per_sec = 1000;
    });
    // Sends `n` requests from `ip`, each from its own port, and counts the
    // ones answered within 300 ms.
    let answered = |ip: &str, n: usize| -> usize {
        let socks: Vec<StdUdp> = (0..n)
            .map(|_| {
                let s = StdUdp::bind((ip, 0)).unwrap();
                s.send_to(&request_packet(1, "f", &[]), server).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        socks
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                s.recv_from(&mut [0u8; 600]).is_ok()
            })
            .count()
    };
    assert_eq!(answered("127.0.0.1", 10), 4, "per-client cap");
    assert_eq!(answered("127.0.0.2", 10), 2, "total cap");
    // The silent transfers are dropped after 2 timeouts; then all is free.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(answered("127.0.0.3", 10), 4);
}

#[test]
fn a_lifetime_ends_a_transfer_that_keeps_acking_slowly() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), vec![1u8; 100 * 512]).unwrap();
    let server = start(root.path(), |c| c.lifetime = Duration::from_millis(800));
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&request_packet(1, "f", &[]), server).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 600];
    loop {
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        if buf[..n].starts_with(&[0, 5]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        sock.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
    }
    let t = started.elapsed();
    assert!(
        t >= Duration::from_millis(700) && t < Duration::from_secs(2),
        "{t:?}"
    );
}

#[test]
fn open_inside_refuses_symlinks_out_and_directories() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "x").unwrap();
    std::fs::write(root.path().join("ok"), "hello").unwrap();
    std::fs::create_dir(root.path().join("dir")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("leak")).unwrap();
    std::os::unix::fs::symlink("ok", root.path().join("alias")).unwrap();
    let root = std::fs::canonicalize(root.path()).unwrap();
    assert_eq!(open_inside(&root, "ok").unwrap().1, 5);
    assert_eq!(open_inside(&root, "alias").unwrap().1, 5);
    let code = |r: Result<(std::fs::File, u64), (ErrorCode, &str)>| r.err().map(|e| e.0);
    assert_eq!(
        code(open_inside(&root, "leak")),
        Some(ErrorCode::AccessViolation)
    );
    assert_eq!(
        code(open_inside(&root, "dir")),
        Some(ErrorCode::FileNotFound)
    );
    assert_eq!(
        code(open_inside(&root, "nope")),
        Some(ErrorCode::FileNotFound)
    );
}

/// Fetches `path` from `server` as a well-behaved client at `sock` would:
/// each block acknowledged, to the end; returns the bytes.
fn fetch(sock: &StdUdp, server: SocketAddr, path: &str) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&request_packet(1, path, &[]), server).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let (n, from) = sock.recv_from(&mut buf).expect("a DATA block");
        assert_eq!(&buf[..2], &[0, 3], "{path}: not DATA: {:?}", &buf[..n]);
        got.extend_from_slice(&buf[4..n]);
        sock.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
        if n - 4 < 512 {
            return got;
        }
    }
}

#[test]
fn a_forged_flood_neither_evicts_a_transfer_nor_locks_out_a_known_client() {
    let root = tempfile::tempdir().unwrap();
    let big = vec![9u8; 512 * 40 + 7];
    std::fs::write(root.path().join("pxelinux.0"), b"boot loader").unwrap();
    std::fs::write(root.path().join("initrd"), &big).unwrap();
    let server = start(root.path(), |c| {
        c.max_transfers = 16;
        c.max_transfers_per_client = 8;
        c.max_unproven_transfers = 8;
        c.new_transfers_per_sec = 20;
        c.new_transfers_per_client_per_sec = 10;
        c.timeout = Duration::from_millis(1500);
    });
    // A node fetches its boot loader (it is known from then on) and starts
    // on its initramfs, one block so far.
    let node = StdUdp::bind("127.0.0.1:0").unwrap();
    assert_eq!(fetch(&node, server, "pxelinux.0"), b"boot loader");
    let long = StdUdp::bind("127.0.0.1:0").unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    long.send_to(&request_packet(1, "initrd", &[]), server)
        .unwrap();
    let mut buf = [0u8; 1024];
    let (_, from) = long.recv_from(&mut buf).expect("the first block");
    // 300 read requests from 300 addresses that never acknowledge (forged:
    // whoever sent them does not receive at them).
    let forged: Vec<StdUdp> = (0..300u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
            let s = StdUdp::bind((ip, 0)).unwrap();
            s.send_to(&request_packet(1, "initrd", &[]), server)
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let answered = forged
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            s.recv_from(&mut [0u8; 600]).is_ok()
        })
        .count();
    assert!(
        answered <= 8,
        "{answered} forged requests got a transfer; at most 8 may be unproven"
    );
    // The transfer under way goes on to its end...
    long.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
    let mut got = buf[4..516].to_vec();
    loop {
        let (n, from) = long.recv_from(&mut buf).expect("the next block");
        got.extend_from_slice(&buf[4..n]);
        long.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
        if n - 4 < 512 {
            break;
        }
    }
    assert_eq!(got, big, "the transfer under way was cut short");
    // ...and the known node gets a new one at once, flood or not.
    let again = StdUdp::bind("127.0.0.1:0").unwrap();
    assert_eq!(fetch(&again, server, "initrd"), big);
}

#[test]
fn new_transfers_of_unknown_clients_are_rate_limited_per_client_and_in_all() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), b"x").unwrap();
    let tune = |c: &mut TftpConfig| {
        c.max_transfers = 200;
        c.max_transfers_per_client = 100;
        c.max_unproven_transfers = 200;
        c.new_transfers_per_sec = 30;
        c.new_transfers_per_client_per_sec = 5;
    };
    let answered = |server: SocketAddr, ips: &[[u8; 4]], each: usize| -> usize {
        let socks: Vec<StdUdp> = ips
            .iter()
            .flat_map(|ip| (0..each).map(move |_| *ip))
            .map(|ip| {
                let s = StdUdp::bind((std::net::Ipv4Addr::from(ip), 0)).unwrap();
                s.send_to(&request_packet(1, "f", &[]), server).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        socks
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                s.recv_from(&mut [0u8; 600]).is_ok()
            })
            .count()
    };
    // One client: a burst of twice its rate, then nothing until it refills.
    let server = start(root.path(), tune);
    assert_eq!(
        answered(server, &[[127, 2, 0, 1]], 20),
        10,
        "per-client burst"
    );
    // Many clients: the total burst (its rate), whatever their number.
    let server = start(root.path(), tune);
    let many: Vec<[u8; 4]> = (1..=90).map(|i| [127, 2, 1, i]).collect();
    let n = answered(server, &many, 1);
    assert!(
        (30..=33).contains(&n),
        "{n} new transfers past a total burst of 30"
    );
}
