//! `ka tftp` against clients that ask for much and answer little: a TFTP
//! request needs no reply and may come from a forged address, so whatever
//! it makes the server hold or send must stay small and short-lived.

use std::fs;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ka_tests::{stderr, stdout, write_inventory, KaTftp};

/// A TFTP root with a 64 MiB file (sparse: it costs no disk) and a small one.
fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let inv = write_inventory(dir.path(), "");
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::File::create(root.join("big"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    fs::write(root.join("small"), vec![5u8; 100_000]).unwrap();
    (dir, inv)
}

/// A read request for `path` with option pairs.
fn rrq(path: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(path.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// The greediest options a client may ask for.
const GREEDY: [(&str, &str); 4] = [
    ("blksize", "65464"),
    ("windowsize", "65535"),
    ("timeout", "255"),
    ("tsize", "0"),
];

/// A line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_client_that_acks_the_oack_and_goes_silent_gets_little_and_is_dropped() {
    let (dir, inv) = setup();
    let server = KaTftp::start(
        &inv,
        &dir.path().join("state"),
        &["--transfer-lifetime", "4"],
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&rrq("big", &GREEDY), server.addr).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], [0, 6], "an OACK: {:?}", &buf[..n]);
    let started = Instant::now();
    sock.send_to(&[0, 4, 0, 0], from).unwrap();

    // Silent for 7 s, counting what arrives.
    let (mut bytes, mut packets, mut ended) = (0usize, 0usize, None);
    while started.elapsed() < Duration::from_secs(7) {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            bytes += n;
            packets += 1;
            if buf[..n].starts_with(&[0, 5]) {
                ended.get_or_insert(started.elapsed());
            }
        }
    }
    eprintln!("silent client: {packets} datagrams, {bytes} bytes in 7 s, given up after {ended:?}");
    // One window (16 blocks of 1468) and a probe or two, not gigabytes.
    assert!(bytes < 64 * 1024, "{bytes} bytes sent to a silent client");
    // Given up at its 4 s lifetime, with room for a loaded machine's late
    // timer; without the lifetime a transfer's retries last far longer.
    let ended = ended.expect("the server never gave up the transfer within 7 s");
    assert!(
        ended >= Duration::from_secs(3) && ended <= Duration::from_secs(6),
        "given up after {ended:?}, lifetime 4 s"
    );
}

#[test]
fn a_flood_of_unanswered_requests_is_capped_and_holds_little_memory() {
    let (dir, inv) = setup();
    let server = KaTftp::start(
        &inv,
        &dir.path().join("state"),
        &["--transfer-lifetime", "3"],
    );
    let pid = server.guard.child.id();
    let rss_before = status_kib(pid, "VmRSS:");

    // 300 requests from one address (each from its own port, as 300
    // transfers), then 300 from 300 addresses; none is ever acknowledged.
    let send = |ips: &mut dyn Iterator<Item = String>| -> Vec<UdpSocket> {
        ips.map(|ip| {
            let s = UdpSocket::bind((ip.as_str(), 0)).unwrap();
            s.send_to(&rrq("big", &GREEDY), server.addr).unwrap();
            s
        })
        .collect()
    };
    let answered = |socks: &[UdpSocket]| {
        std::thread::sleep(Duration::from_millis(500));
        socks
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                s.recv_from(&mut [0u8; 1024]).is_ok()
            })
            .count()
    };
    let one = send(&mut (0..300).map(|_| "127.0.0.1".to_string()));
    let one_answered = answered(&one);
    let many = send(&mut (0..300).map(|i| format!("127.0.{}.{}", 1 + i / 200, 1 + i % 200)));
    let many_answered = answered(&many);
    let hwm = status_kib(pid, "VmHWM:");
    eprintln!(
        "flood: {one_answered}/300 answered from one address, {many_answered}/300 from 300; \
         RSS {rss_before} KiB before, peak {hwm} KiB"
    );
    assert_eq!(one_answered, 8, "per-client cap");
    // Clients never proven by an ACK get at most half the table (128
    // transfers), and new ones only at 50 a second in bursts of 50.
    assert!(
        one_answered + many_answered <= 128,
        "{many_answered} unproven transfers past the half of the table"
    );
    assert!(
        (40..=100).contains(&many_answered),
        "{many_answered} new transfers from 300 addresses in half a second at 50 a second"
    );
    assert!(
        hwm < rss_before + 32 * 1024,
        "peak RSS {hwm} KiB (from {rss_before} KiB)"
    );

    // Once the lifetime is up, every place is free again for real clients.
    drop((one, many));
    std::thread::sleep(Duration::from_secs(3));
    let local = dir.path().join("got");
    let o = server.get_hpa("small", &local);
    assert_eq!(
        fs::metadata(&local).map(|m| m.len()).unwrap_or(0),
        100_000,
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}
