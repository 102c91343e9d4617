//! `ka tftp` against real TFTP clients (tftp-hpa, atftp) on 127.0.0.1.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ka_tests::{ka, pseudo_random, run, stderr, stdout, write_inventory, KaTftp};

const MIB: usize = 1 << 20;

/// A TFTP root with a kernel-sized file, an initramfs and pxelinux.0.
fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let inv = write_inventory(dir.path(), "");
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("ka")).unwrap();
    fs::write(root.join("ka/vmlinuz"), pseudo_random(6 * MIB + 123, 1)).unwrap();
    fs::write(root.join("ka/initramfs.img"), pseudo_random(MIB, 2)).unwrap();
    fs::write(root.join("pxelinux.0"), pseudo_random(42_000, 3)).unwrap();
    (dir, inv)
}

fn assert_same(got: &Path, want: &Path) {
    let (g, w) = (fs::read(got).unwrap(), fs::read(want).unwrap());
    assert!(
        g == w,
        "{} ({} bytes) differs from {} ({} bytes)",
        got.display(),
        g.len(),
        want.display(),
        w.len()
    );
}

#[test]
fn files_are_byte_identical_with_both_clients_and_large_blocks() {
    let (dir, inv) = setup();
    let server = KaTftp::start(&inv, &dir.path().join("state"), &[]);
    let root = dir.path().join("root");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();

    let o = server.get_hpa("pxelinux.0", &out.join("a"));
    assert_same(&out.join("a"), &root.join("pxelinux.0"));
    assert!(o.status.success(), "{}", stderr(&o));

    let cases: [(&str, &[&str]); 4] = [
        ("plain", &[]),
        ("blksize", &["blksize 1468"]),
        ("blksize+tsize", &["blksize 1468", "tsize 0"]),
        ("blksize+windowsize", &["blksize 1468", "windowsize 16"]),
    ];
    for (name, options) in cases {
        let local = out.join(name);
        let t = Instant::now();
        let o = server.get_atftp("ka/vmlinuz", &local, options);
        let secs = t.elapsed().as_secs_f64();
        assert!(o.status.success(), "{name}: {}{}", stdout(&o), stderr(&o));
        assert_same(&local, &root.join("ka/vmlinuz"));
        eprintln!(
            "atftp {name}: 6 MiB in {secs:.2} s ({:.1} MiB/s)",
            6.0 / secs
        );
    }
}

#[test]
fn server_acknowledges_tsize_blksize_and_windowsize() {
    let (dir, inv) = setup();
    let server = KaTftp::start(&inv, &dir.path().join("state"), &[]);
    // atftp prints the server's OACK in trace mode.
    let mut cmd = std::process::Command::new(ka_tests::require_tool("atftp", "atftp"));
    cmd.args([
        "--trace",
        "--option",
        "tsize 0",
        "--option",
        "blksize 1024",
        "--option",
        "windowsize 4",
        "-g",
        "-r",
        "pxelinux.0",
        "-l",
    ])
    .arg(dir.path().join("p"))
    .args(["127.0.0.1", &server.addr.port().to_string()]);
    let o = run(&mut cmd, Duration::from_secs(30));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{text}");
    assert!(text.contains("tsize: 42000"), "OACK without tsize: {text}");
    assert!(
        text.contains("blksize: 1024"),
        "OACK without blksize: {text}"
    );
    assert!(
        text.contains("windowsize: 4"),
        "OACK without windowsize: {text}"
    );
    assert_same(&dir.path().join("p"), &dir.path().join("root/pxelinux.0"));
}

#[test]
fn inventory_edits_are_picked_up_without_restart() {
    let (dir, inv) = setup();
    let state = dir.path().join("state");
    let server = KaTftp::start(&inv, &state, &[]);
    let path = "pxelinux.cfg/01-52-54-00-09-00-99";
    assert!(fetch_text(&server, dir.path(), path).contains("machines not in the inventory"));
    let mut text = fs::read_to_string(&inv).unwrap();
    text.push_str("\n[[node]]\nname = \"late\"\nmac = \"52:54:00:09:00:99\"\nip = \"10.9.0.99\"\n");
    fs::write(&inv, &text).unwrap();
    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "-m",
        "install",
        "late",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fetch_text(&server, dir.path(), path).contains("ka.name=late"));
    // A broken edit keeps the last good inventory serving.
    fs::write(&inv, "this is not toml [").unwrap();
    assert!(fetch_text(&server, dir.path(), path).contains("ka.name=late"));
}

fn fetch_text(server: &KaTftp, dir: &Path, remote: &str) -> String {
    let local = dir.join("fetched");
    let _ = fs::remove_file(&local);
    let o = server.get_hpa(remote, &local);
    fs::read_to_string(&local)
        .unwrap_or_else(|_| panic!("fetching {remote} failed: {}{}", stdout(&o), stderr(&o)))
}

#[test]
fn per_mac_config_follows_the_mode_without_restart() {
    let (dir, inv) = setup();
    let state = dir.path().join("state");
    let server = KaTftp::start(&inv, &state, &[]);
    let d = dir.path();
    let by_mac = "pxelinux.cfg/01-52-54-00-09-00-02";

    // Never set: local boot.
    let local = fetch_text(&server, d, by_mac);
    assert!(local.contains("COM32 chain.c32\n  APPEND hd0"), "{local}");

    let inv_s = inv.to_str().unwrap();
    let state_s = state.to_str().unwrap();
    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "install",
        "n02",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let install = fetch_text(&server, d, by_mac);
    assert!(
        install.contains(
            "APPEND ka.server=10.9.0.1:4000 ka.session=t ka.name=n02 ka.target=/dev/vda ka.mode=install ka.ip=10.9.0.12/24 ka.gateway=10.9.0.1 console=ttyS0,115200"
        ),
        "{install}"
    );
    assert!(
        install.contains("KERNEL ka/vmlinuz\n  INITRD ka/initramfs.img"),
        "{install}"
    );
    // The hex-IP name (10.9.0.12) gives the same config.
    assert_eq!(fetch_text(&server, d, "pxelinux.cfg/0A09000C"), install);
    let script = fetch_text(&server, d, "ipxe/52-54-00-09-00-02.ipxe");
    assert!(
        script.starts_with("#!ipxe\n")
            && script.contains("ka.name=n02")
            && script.contains("\nboot\n"),
        "{script}"
    );

    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "shell",
        "@rack1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fetch_text(&server, d, by_mac).contains("ka.mode=shell"));
    assert!(fetch_text(&server, d, "pxelinux.cfg/01-52-54-00-09-00-04")
        .contains("ka.name=n04 ka.target=/dev/vda ka.mode=shell"));

    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv_s,
        "--state-dir",
        state_s,
        "--mode",
        "local",
        "--all",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fetch_text(&server, d, by_mac).contains("chain.c32"));
    assert!(fetch_text(&server, d, "ipxe/52-54-00-09-00-02.ipxe")
        .contains("sanboot --no-describe --drive 0x80"));
}

#[test]
fn unknown_machines_get_the_local_default() {
    let (dir, inv) = setup();
    let server = KaTftp::start(&inv, &dir.path().join("state"), &[]);
    let d = dir.path();
    for path in [
        "pxelinux.cfg/01-de-ad-be-ef-00-01",
        "pxelinux.cfg/default",
        "ipxe/de-ad-be-ef-00-01.ipxe",
    ] {
        let text = fetch_text(&server, d, path);
        assert!(
            text.contains("machines not in the inventory"),
            "{path}: {text}"
        );
    }
    assert!(fetch_text(&server, d, "boot.ipxe").contains("chain ipxe/${netX/mac:hexhyp}.ipxe"));
    // An unknown hex-IP name is "not found", so pxelinux moves on to `default`.
    let o = server.get_hpa("pxelinux.cfg/0A0900FE", &d.join("x"));
    assert!(
        stdout(&o).contains("not found") || stderr(&o).contains("not found"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn traversal_absolute_symlinks_and_writes_are_refused() {
    let (dir, inv) = setup();
    let outside = dir.path().join("private");
    fs::write(&outside, "do not serve").unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("root/leak")).unwrap();
    std::os::unix::fs::symlink("../private", dir.path().join("root/leak2")).unwrap();
    let server = KaTftp::start(&inv, &dir.path().join("state"), &[]);
    for remote in [
        "../private",
        "ka/../../private",
        "/etc/passwd",
        "leak",
        "leak2",
        "ka",
    ] {
        let local = dir.path().join("got");
        let _ = fs::remove_file(&local);
        let o = server.get_hpa(remote, &local);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            text.contains("Error code"),
            "{remote} was not refused: {text}"
        );
        let got = fs::read(&local).unwrap_or_default();
        assert!(
            !got.starts_with(b"do not serve") && !got.starts_with(b"root:"),
            "{remote} leaked"
        );
    }
    // Writes are refused and create nothing.
    let src = dir.path().join("upload");
    fs::write(&src, "x").unwrap();
    let o = run(
        std::process::Command::new(ka_tests::require_tool("tftp", "tftp-hpa"))
            .args([
                "-m",
                "binary",
                "127.0.0.1",
                &server.addr.port().to_string(),
                "-c",
                "put",
            ])
            .arg(&src)
            .arg("uploaded"),
        Duration::from_secs(30),
    );
    assert!(
        stdout(&o).contains("read-only") || stderr(&o).contains("read-only"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(!dir.path().join("root/uploaded").exists());
}

#[test]
fn twenty_concurrent_fetches_are_all_identical() {
    let (dir, inv) = setup();
    // Twenty machines, but all on 127.0.0.1: one address, twenty transfers.
    let server = KaTftp::start(
        &inv,
        &dir.path().join("state"),
        &["--max-transfers-per-client", "20"],
    );
    let atftp = ka_tests::require_tool("atftp", "atftp");
    let t = Instant::now();
    let children: Vec<(std::path::PathBuf, ka_tests::ChildGuard)> = (0..20)
        .map(|i| {
            let local = dir.path().join(format!("copy{i}"));
            let child = std::process::Command::new(&atftp)
                .args(["--option", "blksize 1468", "-g", "-r", "ka/vmlinuz", "-l"])
                .arg(&local)
                .args(["127.0.0.1", &server.addr.port().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start atftp");
            (
                local,
                ka_tests::ChildGuard {
                    child,
                    what: format!("atftp {i}"),
                },
            )
        })
        .collect();
    for (local, mut guard) in children {
        let status = ka_tests::wait_timeout(&mut guard.child, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("{} did not finish in 120 s", guard.what));
        assert!(status.success(), "{} failed", guard.what);
        assert_same(&local, &dir.path().join("root/ka/vmlinuz"));
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "20 concurrent fetches of 6 MiB: {secs:.2} s ({:.1} MiB/s total)",
        120.0 / secs
    );
}
