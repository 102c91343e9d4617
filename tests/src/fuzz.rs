//! Every decoder of ka that reads bytes from outside, as one list of fuzz
//! targets, with seeds.
//!
//! A target takes arbitrary bytes, feeds them to one decoder the way ka
//! does, and must never panic (DESIGN.md, "Trust": no input from the
//! network can panic ka; files an operator hands over get a clear error,
//! never a crash). `tests/tests/fuzz_decoders.rs` runs every target under
//! proptest on random bytes and on mutations of its seeds, in every test
//! run; `scripts/fuzz` runs them under a coverage-guided fuzzer (AFL++
//! through cargo-afl) when it is installed. A crash found either way is
//! kept as a regression case in `tests/fuzz/regressions/TARGET/`.

use std::path::Path;

use bytes::BytesMut;
use ka_core::codec::{Message, Progress, Refusal, RefusalCode};
use ka_core::record::{RecordHeader, RecordKind};

/// A fuzz target: a name (also its regression folder) and its entry point.
pub struct Target {
    /// What it decodes, as a folder name.
    pub name: &'static str,
    /// Feeds arbitrary bytes to the decoder; panics only on a bug.
    pub run: fn(&[u8]),
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "wire_codec",
        run: wire_codec,
        seeds: wire_seeds,
    },
    Target {
        name: "record_header",
        run: record_header,
        seeds: record_seeds,
    },
    Target {
        name: "tftp_packet",
        run: ka_net::fuzz::tftp_packet,
        seeds: tftp_seeds,
    },
    Target {
        name: "inventory",
        run: inventory,
        seeds: inventory_seeds,
    },
    Target {
        name: "kernel_cmdline",
        run: kernel_cmdline,
        seeds: cmdline_seeds,
    },
    Target {
        name: "dhcp_leases",
        run: dhcp_leases,
        seeds: lease_seeds,
    },
    Target {
        name: "system_stream",
        run: ka_net::fuzz::system_stream,
        seeds: stream_seeds,
    },
    Target {
        name: "system_plan",
        run: ka_net::fuzz::system_plan,
        seeds: plan_seeds,
    },
    Target {
        name: "layout_file",
        run: ka_net::fuzz::layout_file,
        seeds: layout_seeds,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Frames as a connection reads them: every whole frame off the front of
/// the buffer, until one is incomplete or bad.
fn wire_codec(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = Message::decode(&mut buf) {
        // What decodes must encode again (the shell re-sends messages).
        let mut out = BytesMut::new();
        msg.encode(&mut out);
    }
    let _ = Message::decode_exact(data);
}

/// Record headers as a data connection reads them, 17 bytes at a time.
fn record_header(data: &[u8]) {
    for chunk in data.chunks_exact(RecordHeader::SIZE) {
        let header: &[u8; RecordHeader::SIZE] = chunk.try_into().expect("exact chunks");
        let _ = RecordHeader::decode(header);
    }
}

/// An inventory file, as `ka -i FILE` reads it.
fn inventory(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ka_bin::boot::inventory::Inventory::parse(text, Path::new("/fuzz/cluster.toml"));
    }
}

/// A kernel command line, as the netboot image's init reads it.
fn kernel_cmdline(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ka_bin::netboot::cmdline::Plan::parse(text);
    }
}

/// DHCP lease files and logs, as `ka dhcp harvest` reads them, and a name
/// pattern.
fn dhcp_leases(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = ka_bin::boot::harvest::detect(&text);
    let _ = ka_bin::boot::harvest::scan("leases", &text);
    let _ = ka_bin::boot::harvest::harvest(&[("a".into(), text.to_string())]);
    // Every reader on every input, as `--format` makes it: the Kea CSV
    // reader sees logs and the others see CSV.
    for kind in ka_bin::boot::harvest::FileKind::ALL {
        let _ = ka_bin::boot::harvest::scan_as("leases", &text, kind);
    }
    if let Ok(p) = ka_bin::boot::harvest::NamePattern::parse(&text) {
        let _ = p.name(u64::MAX);
    }
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let max = Progress {
        received: u64::MAX,
        written: u64::MAX,
        holds_from: u64::MAX,
    };
    [
        Message::Heartbeat,
        Message::Progress(max),
        Message::Refused(Refusal::new(RefusalCode::BadProof, "x".repeat(300))),
        Message::Stranded {
            epoch: ka_core::ids::Epoch(u64::MAX),
            from: u64::MAX,
        },
        Message::Log {
            lines: vec!["é".repeat(600); ka_core::codec::MAX_LOG_LINES],
        },
        Message::JoinFailed(Box::new(ka_core::codec::JoinFailed {
            version: ka_core::codec::PROTOCOL_VERSION,
            session: "s".into(),
            name: "n".into(),
            mac: [0xff; 6],
            reason: "x".repeat(1024),
            nonce: Default::default(),
            proof: Default::default(),
        })),
    ]
    .iter()
    .map(|m| {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        out.to_vec()
    })
    .collect()
}

fn record_seeds() -> Vec<Vec<u8>> {
    [RecordKind::Data, RecordKind::Zero, RecordKind::End]
        .iter()
        .map(|&kind| {
            RecordHeader {
                kind,
                offset: u64::MAX,
                len: RecordHeader::MAX_DATA_LEN,
            }
            .encode()
            .to_vec()
        })
        .collect()
}

fn tftp_seeds() -> Vec<Vec<u8>> {
    let rrq = |name: &str, opts: &[(&str, &str)]| {
        let mut p = vec![0, 1];
        p.extend_from_slice(name.as_bytes());
        p.push(0);
        p.extend_from_slice(b"octet\0");
        for (k, v) in opts {
            p.extend_from_slice(k.as_bytes());
            p.push(0);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        p
    };
    vec![
        rrq("pxelinux.0", &[]),
        rrq(
            "ka/initramfs.img",
            &[
                ("blksize", "65464"),
                ("tsize", "0"),
                ("timeout", "255"),
                ("windowsize", "65535"),
            ],
        ),
        rrq("../../etc/passwd", &[("blksize", "99999999999999999999")]),
        vec![0, 4, 255, 255],
        b"\x00\x05\x00\x01oops\x00".to_vec(),
    ]
}

fn inventory_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = crate::write_inventory(
        dir.path(),
        "[[node]]\nname = \"x9\"\nmac = \"52:54:00:aa:bb:cc\"\nip = \"10.9.0.99\"\n",
    );
    vec![std::fs::read(path).expect("the inventory just written")]
}

fn cmdline_seeds() -> Vec<Vec<u8>> {
    vec![
        b"console=ttyS0 ka.mode=install ka.server=10.0.0.1:4715 ka.session=lab ka.name=n01 ka.target=/dev/vda ka.secret=file:/etc/ka/secret".to_vec(),
        b"ka.mode=local ka.clone=system ka.target=/dev/vda,/dev/vdb quiet".to_vec(),
    ]
}

fn lease_seeds() -> Vec<Vec<u8>> {
    vec![
        b"lease 10.0.0.5 {\n  starts 4 2024/01/04 10:00:00;\n  hardware ethernet 52:54:00:12:34:56;\n  client-hostname \"n1\";\n}\n".to_vec(),
        b"1704362400 52:54:00:12:34:57 10.0.0.6 n2 01:52:54:00:12:34:57\n".to_vec(),
        b"Jan  4 10:00:00 host dhcpd[1]: DHCPDISCOVER from 52:54:00:12:34:58 via eth0\n".to_vec(),
        b"address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context\n\
          10.0.0.7,52:54:00:12:34:59,01:52:54:00:12:34:59,4000,1704366400,1,0,0,n3,0,\n\
          10.0.0.8,,,4000,1704366500,1,0,0,,1,\n\
          10.0.0.9,52:54:00:12:34:5a,,0,1704366600,1,0,0,,2,{ \"a\": 1&#x2c \"b\": 2 }\n"
            .to_vec(),
        b"node[01-99]".to_vec(),
    ]
}

/// A plan with one GPT disk (BIOS boot, an ESP, / on ext4, swap) and a
/// layout file that lets / fill the disk, as JSON.
fn sample_plan() -> Vec<u8> {
    use ka_net::system::layout::{
        Content, DiskLayout, FileSystem, FsKind, Layout, MakeOptions, PartitionLayout, TableKind,
    };
    let part =
        |number: u32, start: u64, size: u64, type_id: &str, content: Content| PartitionLayout {
            number,
            start,
            size,
            type_id: type_id.into(),
            uuid: Some(format!("00000000-0000-0000-0000-00000000000{number}")),
            name: Some(format!("part{number}")),
            attrs: None,
            bootable: false,
            content,
            device: None,
        };
    let root = Content::Tree(FileSystem {
        kind: FsKind::Ext4,
        uuid: "uuid".into(),
        label: None,
        mountpoint: "/".into(),
        options: "defaults".into(),
        used: 50 << 20,
        excludes: vec![],
        make: MakeOptions::default(),
        mounted_at: None,
    });
    let raw = || Content::Raw { why: "seed".into() };
    let disk = DiskLayout {
        device: "/dev/sda".into(),
        size: 1 << 30,
        sector_size: 512,
        table: TableKind::Gpt,
        id: "D69ADCA2-FACB-524D-9B76-9B3B7D12BB03".into(),
        first_lba: Some(2048),
        last_lba: Some(2097118),
        partitions: vec![
            part(1, 2048, 2048, "21686148-6449-6E6F-744E-656564454649", raw()),
            part(
                2,
                4096,
                131072,
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                raw(),
            ),
            part(
                3,
                135168,
                524288,
                "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                root,
            ),
            part(
                4,
                659456,
                780288,
                "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
                Content::Swap {
                    uuid: None,
                    label: None,
                },
            ),
        ],
    };
    let layout = Layout {
        disks: vec![disk],
        ignored: vec![],
    };
    let plan = ka_net::system::Plan::new(
        layout,
        Some(String::from_utf8(layout_seeds()[0].clone()).expect("text")),
        None,
    );
    serde_json::to_vec(&plan).expect("a plan serialises")
}

fn stream_seeds() -> Vec<Vec<u8>> {
    use ka_net::system::stream::{header, padding_after, SectionKind, MAGIC};
    // One byte of piece size, then a stream: the magic, a plan, a tree of
    // two chunks, a raw partition on its block boundary, and the end.
    let plan = sample_plan();
    let mut s = MAGIC.to_vec();
    s.extend_from_slice(&header(SectionKind::Plan, 0, plan.len() as u64));
    s.extend_from_slice(&plan);
    s.extend_from_slice(&header(SectionKind::Tree, 3, 0));
    for chunk in [&b"tar bytes"[..], b"more"] {
        s.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        s.extend_from_slice(chunk);
    }
    s.extend_from_slice(&0u32.to_le_bytes());
    s.extend_from_slice(&header(SectionKind::Raw, 2, 5));
    s.resize(s.len() + padding_after(s.len() as u64) as usize, 0);
    s.extend_from_slice(b"raw!!");
    s.extend_from_slice(&header(SectionKind::End, 0, 0));
    let mut seed = vec![13u8];
    seed.extend(s);
    vec![seed]
}

fn plan_seeds() -> Vec<Vec<u8>> {
    vec![sample_plan()]
}

fn layout_seeds() -> Vec<Vec<u8>> {
    vec![b"# nodes with other disks\n[disk.0]\n2 = \"256MiB\"\n3 = \"fill\"\n".to_vec()]
}
