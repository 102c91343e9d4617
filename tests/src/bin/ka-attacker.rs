//! `ka-attacker`: the attacks on ka's trust model, as real processes on
//! loopback, for tests/tests/clone_trust.rs.
//!
//! - `ka-attacker relay LISTEN SOURCE`: a TCP relay between nodes and a
//!   source, holding no key. It passes the handshake on, then, on the first
//!   node connection only, says `Verified {ok: true}` to the source itself
//!   (in the clear, as a protocol without sealed messages would take it),
//!   and drops every data connection while that connection lives, so the
//!   node receives nothing. After it, it relays faithfully.
//! - `ka-attacker source LISTEN UDP-PORT SESSION [KEY-FILE]`: a fake source.
//!   It answers discovery on UDP-PORT (with a proof made with the key in
//!   KEY-FILE, if given: a node's stolen key; else with garbage), welcomes
//!   every join without checking it (sealing what it says with the keys
//!   KEY-FILE gives, or in the clear), places the node under itself, and
//!   serves any data hello records of 0xAA bytes.
//!
//! Each prints `listening on ADDR` on standard output once ready, and what it
//! did on standard error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ka_core::auth::{Channel, Mac, Side};
use ka_core::codec::{Digest, ImageId, Message, Nonce, Ticket, Upstream, PROTOCOL_VERSION};
use ka_core::ids::{Epoch, NodeId};
use ka_core::record::{RecordHeader, RecordKind};

fn usage() -> ! {
    eprintln!(
        "usage: ka-attacker relay LISTEN SOURCE | ka-attacker source LISTEN UDP-PORT SESSION [KEY-FILE]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("relay") if args.len() == 3 => relay(parse(&args[1]), parse(&args[2])),
        Some("source") if args.len() == 4 || args.len() == 5 => {
            let port: u16 = args[2].parse().unwrap_or_else(|_| usage());
            fake_source(parse(&args[1]), port, &args[3], args.get(4))
        }
        _ => usage(),
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse().unwrap_or_else(|_| usage())
}

/// Reads one frame (length prefix and all) from `from`.
fn read_frame(from: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
    from.read_exact(&mut frame[4..])?;
    Ok(frame)
}

/// The tag byte of a frame.
fn tag(frame: &[u8]) -> u8 {
    frame.get(4).copied().unwrap_or(0)
}

const TAG_JOIN: u8 = 2;
const TAG_DATA_HELLO: u8 = 15;

// ----- the relay -----

fn relay(listen: SocketAddr, source: SocketAddr) {
    let listener = TcpListener::bind(listen).expect("bind the relay");
    println!("listening on {}", listener.local_addr().unwrap());
    std::io::stdout().flush().ok();
    // The node connection the forgery rides on: open while it is true.
    let forging = Arc::new(AtomicBool::new(false));
    let control_conns = Arc::new(AtomicUsize::new(0));
    for node in listener.incoming().map_while(Result::ok) {
        let (forging, control_conns) = (forging.clone(), control_conns.clone());
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(source) else {
                return;
            };
            relay_one(node, upstream, &forging, &control_conns);
        });
    }
}

/// Relays one connection: the source's challenge down, the node's first
/// frame up, then by its kind.
fn relay_one(
    mut node: TcpStream,
    mut source: TcpStream,
    forging: &AtomicBool,
    control_conns: &AtomicUsize,
) {
    let Ok(challenge) = read_frame(&mut source) else {
        return;
    };
    if node.write_all(&challenge).is_err() {
        return;
    }
    let Ok(first) = read_frame(&mut node) else {
        return;
    };
    match tag(&first) {
        TAG_DATA_HELLO if forging.load(Ordering::SeqCst) => {
            eprintln!("ka-attacker: dropping a data connection while the forgery runs");
        }
        TAG_JOIN if control_conns.fetch_add(1, Ordering::SeqCst) == 0 => {
            forging.store(true, Ordering::SeqCst);
            forge_on(node, source, first);
            forging.store(false, Ordering::SeqCst);
        }
        _ => {
            if source.write_all(&first).is_ok() {
                pump_both(node, source);
            }
        }
    }
}

/// The node's first control connection: its join goes up, and once the
/// source's welcome has come down, a forged `Verified {ok: true}` goes up
/// between two of the node's frames.
fn forge_on(node: TcpStream, mut source: TcpStream, join: Vec<u8>) {
    if source.write_all(&join).is_err() {
        return;
    }
    let to_source = Arc::new(Mutex::new(source.try_clone().expect("clone a socket")));
    let up = {
        let (mut node, to_source) = (node.try_clone().expect("clone a socket"), to_source.clone());
        std::thread::spawn(move || {
            while let Ok(frame) = read_frame(&mut node) {
                if to_source.lock().unwrap().write_all(&frame).is_err() {
                    break;
                }
            }
            let _ = to_source.lock().unwrap().shutdown(std::net::Shutdown::Both);
        })
    };
    let mut node_out = node;
    let mut welcomed = false;
    while let Ok(frame) = read_frame(&mut source) {
        if node_out.write_all(&frame).is_err() {
            break;
        }
        if !welcomed {
            welcomed = true;
            let forged = Message::Verified {
                ok: true,
                reason: String::new(),
            }
            .to_bytes();
            eprintln!("ka-attacker: the source welcomed the node; telling it the node verified");
            if to_source.lock().unwrap().write_all(&forged).is_err() {
                break;
            }
        }
    }
    let _ = node_out.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    eprintln!("ka-attacker: the forged connection ended");
}

/// Copies bytes both ways until either side closes.
fn pump_both(node: TcpStream, source: TcpStream) {
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
        })
    };
    let a = pump(
        node.try_clone().expect("clone a socket"),
        source.try_clone().expect("clone a socket"),
    );
    let b = pump(source, node);
    let _ = (a.join(), b.join());
}

// ----- the fake source -----

/// The key the fake source holds: a node's stolen key, or nothing.
struct Stolen(Option<ka_net::NodeKey>);

impl Stolen {
    fn key(&self) -> Option<Box<dyn Mac>> {
        self.0.as_ref().map(|k| k.mac_key())
    }
}

fn fake_source(listen: SocketAddr, udp_port: u16, session: &str, key_file: Option<&String>) {
    let stolen = Arc::new(Stolen(key_file.map(|f| {
        match ka_net::shell::load_key_file(std::path::Path::new(f)).expect("a key file") {
            ka_net::shell::KeyFile::Node(k) => k,
            ka_net::shell::KeyFile::Secret(_) => {
                panic!("the fake source holds no secret, only a node's key")
            }
        }
    })));
    let listener = TcpListener::bind(listen).expect("bind the fake source");
    let addr = listener.local_addr().unwrap();
    let udp = UdpSocket::bind(SocketAddr::new(listen.ip(), udp_port)).expect("bind discovery");
    {
        let (stolen, session) = (stolen.clone(), session.to_string());
        std::thread::spawn(move || answer_discovery(udp, &session, addr.port(), &stolen));
    }
    println!("listening on {addr}");
    std::io::stdout().flush().ok();
    for conn in listener.incoming().map_while(Result::ok) {
        let stolen = stolen.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            serve_one(conn, addr, &stolen);
        });
    }
}

/// Answers every discovery question about the session, proving what the
/// stolen key can (or with garbage).
fn answer_discovery(udp: UdpSocket, session: &str, port: u16, stolen: &Stolen) {
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = udp.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let mut words = text.split(' ');
        let (Some("KA-DISCOVER"), Some(_), Some(s), Some(nonce)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        if s != session {
            continue;
        }
        let mut nonce_bytes = [0u8; 32];
        for (i, b) in nonce_bytes.iter_mut().enumerate() {
            *b = nonce
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
        let proof = match stolen.key() {
            Some(key) => {
                ka_core::auth::discovery_proof(&*key, &Nonce(nonce_bytes), session, port).0
            }
            None => [0x5a; 32],
        };
        let hex: String = proof.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("ka-attacker: answering discovery from {from}");
        let _ = udp.send_to(format!("KA-HERE 2 {session} {port} {hex}").as_bytes(), from);
    }
}

/// Speaks the source's part to one connection, without checking anything.
fn serve_one(mut conn: TcpStream, me: SocketAddr, stolen: &Stolen) {
    let server_nonce = Nonce([0x11; 32]);
    let challenge = Message::Challenge {
        version: PROTOCOL_VERSION,
        nonce: server_nonce,
    };
    if conn.write_all(&challenge.to_bytes()).is_err() {
        return;
    }
    let Ok(first) = read_frame(&mut conn) else {
        return;
    };
    let Ok(msg) = Message::decode_exact(&first) else {
        return;
    };
    // What it says is sealed with the keys the stolen key gives (the most a
    // thief can do), or goes in the clear.
    let channel = |client_nonce: &Nonce| {
        stolen
            .key()
            .map(|k| Channel::new(&*k, &server_nonce, client_nonce, Side::Server))
    };
    let say = |conn: &mut TcpStream, ch: &mut Option<Channel>, msg: Message| {
        let msg = match ch {
            Some(ch) => ch.seal(msg),
            None => msg,
        };
        conn.write_all(&msg.to_bytes())
    };
    match msg {
        Message::Join(join) => {
            eprintln!(
                "ka-attacker: welcoming {} without checking its proof",
                join.name
            );
            let mut ch = channel(&join.nonce);
            let script = [
                Message::Welcome {
                    node: NodeId(1),
                    heartbeat_ms: 250,
                    dead_after_ms: 5000,
                    image_size: Some(1 << 20),
                    image: ImageId([0xaa; 32]),
                    resume_from: 0,
                    run: Nonce([0x22; 32]),
                    encoding: Default::default(),
                },
                Message::Topology {
                    epoch: Epoch(1),
                    upstream: Some(Upstream {
                        node: None,
                        addr: me,
                        ticket: Ticket([0x33; 32]),
                    }),
                    downstreams: vec![],
                },
                Message::ImageDone {
                    total: 1 << 20,
                    digest: Digest([0x44; 32]),
                    image_digest: None,
                },
            ];
            for m in script {
                if say(&mut conn, &mut ch, m).is_err() {
                    return;
                }
            }
            // Heartbeats until the node leaves.
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if say(&mut conn, &mut ch, Message::Heartbeat).is_err() {
                    eprintln!("ka-attacker: the node left");
                    return;
                }
            }
        }
        Message::DataHello { from, nonce, .. } => {
            eprintln!("ka-attacker: serving a data hello from offset {from} without checking it");
            let mut ch = channel(&nonce);
            if say(&mut conn, &mut ch, Message::DataAccepted { from }).is_err() {
                return;
            }
            let data = vec![0xaa_u8; 64 << 10];
            let mut offset = from;
            while offset < 1 << 20 {
                let header = RecordHeader {
                    kind: RecordKind::Data,
                    offset,
                    len: data.len() as u64,
                };
                if conn.write_all(&header.encode()).is_err() || conn.write_all(&data).is_err() {
                    return;
                }
                offset += data.len() as u64;
            }
            let end = RecordHeader {
                kind: RecordKind::End,
                offset,
                len: 0,
            };
            let _ = conn.write_all(&end.encode());
        }
        other => eprintln!("ka-attacker: ignoring a {}", other.name()),
    }
}
