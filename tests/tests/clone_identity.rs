//! The post-clone identity step and the boot-mode flip, with real processes
//! on loopback and real block devices (loop devices with partitions): two
//! nodes clone a partitioned ext4 disk, each gets its own host name and
//! address written into its copy after the digest check, and the source
//! flips both to local boot in the inventory's state directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ka_bin::boot::{BootState, Inventory, Mode};
use ka_tests::system::Loop;
use ka_tests::{ka, ka_bin, require_tool, run, stderr, stdout, wait_timeout, ChildGuard};

fn check(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what}: {}{}", stdout(o), stderr(o));
}

/// A 20 MiB disk image: an MBR with one ext4 partition from 1 MiB holding
/// the source's identity.
fn source_image(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("etc/systemd/network")).unwrap();
    fs::write(root.join("etc/hostname"), "source\n").unwrap();
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 source\n",
    )
    .unwrap();
    fs::write(
        root.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    // Followed from the machine running ka, this link would hit its own file.
    std::os::unix::fs::symlink("/etc/resolv.conf", root.join("etc/resolv.conf")).unwrap();
    let part = dir.join("part.img");
    check(
        &run(
            Command::new(require_tool("mke2fs", "e2fsprogs"))
                .args(["-q", "-F", "-t", "ext4", "-d"])
                .arg(&root)
                .arg(&part)
                .arg("19M"),
            Duration::from_secs(60),
        ),
        "mke2fs",
    );
    let image = dir.join("disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&image).unwrap();
        f.set_len(20 << 20).unwrap();
        f.write_all_at(&fs::read(&part).unwrap(), 1 << 20).unwrap();
    }
    let mut child = Command::new(require_tool("sfdisk", "fdisk"))
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83\n")
        .unwrap();
    check(&child.wait_with_output().unwrap(), "sfdisk");
    image
}

/// Reads `files` from the first partition of `dev`, mounted read-only.
fn read_back(dir: &Path, dev: &str, files: &[&str]) -> Vec<String> {
    let mnt = dir.join(format!("mnt-{}", dev.rsplit('/').next().unwrap()));
    fs::create_dir_all(&mnt).unwrap();
    // Loop devices here do not always scan their partitions by themselves;
    // partx adds them (an error for ones already known is harmless).
    let _ = run(
        Command::new(require_tool("partx", "util-linux")).args(["--add", dev]),
        Duration::from_secs(30),
    );
    check(
        &run(
            Command::new("mount")
                .args(["-o", "ro", &format!("{dev}p1")])
                .arg(&mnt),
            Duration::from_secs(30),
        ),
        "mount",
    );
    let out = files
        .iter()
        .map(|f| {
            let p = mnt.join(f);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                }
                _ => fs::read_to_string(&p).unwrap_or_else(|e| format!("({e})")),
            }
        })
        .collect();
    check(
        &run(Command::new("umount").arg(&mnt), Duration::from_secs(30)),
        "umount",
    );
    out
}

#[test]
fn clones_get_their_own_identity_and_boot_local() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = source_image(d);
    let secret = d.join("secret");
    fs::write(&secret, "ab".repeat(32)).unwrap();
    let inv = ka_tests::write_inventory(d, "");
    let state = d.join("state");
    let (inv_s, state_s) = (inv.to_str().unwrap(), state.to_str().unwrap());
    check(
        &ka(&[
            "pxe",
            "set",
            "-i",
            inv_s,
            "--state-dir",
            state_s,
            "-m",
            "install",
            "--all",
        ]),
        "ka pxe set",
    );
    let disks: Vec<PathBuf> = (1..=2)
        .map(|i| {
            let p = d.join(format!("n{i}.img"));
            fs::File::create(&p).unwrap().set_len(32 << 20).unwrap();
            p
        })
        .collect();
    let loops: Vec<Loop> = disks.iter().map(|p| Loop::attach(p)).collect();

    // A typo or an impossible target is refused before anything is cloned.
    let o = ka(&[
        "join",
        "--server",
        "127.0.0.1:9",
        "--secret-file",
        secret.to_str().unwrap(),
        "--target",
        disks[0].to_str().unwrap(),
        "--identity",
        "hostname=n01",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("losetup -P"), "{}", stderr(&o));
    let o = ka(&[
        "join",
        "--server",
        "127.0.0.1:9",
        "--secret-file",
        secret.to_str().unwrap(),
        "--target",
        &loops[0].0,
        "--identity",
        "hostname=n01,colour=red",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown identity item `colour`"),
        "{}",
        stderr(&o)
    );

    let serve_err = d.join("serve.err");
    let mut serve = ChildGuard {
        child: ka_tests::private_logs(&mut Command::new(ka_bin()), d)
            .args([
                "serve",
                "--nodes",
                "2",
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--image",
            ])
            .arg(&image)
            .arg("--secret-file")
            .arg(&secret)
            .args(["-i", inv_s, "--boot-state", state_s])
            .arg("--state-dir")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(fs::File::create(d.join("serve.out")).unwrap())
            .stderr(fs::File::create(&serve_err).unwrap())
            .spawn()
            .unwrap(),
        what: "ka serve".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let err = fs::read_to_string(&serve_err).unwrap_or_default();
        if let Some(a) = err
            .lines()
            .find_map(|l| l.split("waiting for 2 nodes on ").nth(1))
        {
            break a.trim().to_string();
        }
        assert!(Instant::now() < deadline, "ka serve did not start:\n{err}");
        std::thread::sleep(Duration::from_millis(50));
    };

    let joins: Vec<(ChildGuard, PathBuf)> = [("n01", "10.9.0.11", "auto"), ("n02", "10.9.0.12", "1")]
        .iter()
        .zip(&loops)
        .map(|((name, ip, root), lo)| {
            let err = d.join(format!("{name}.err"));
            let child = Command::new(ka_bin())
                .args(["join", "--server", &addr, "--secret-file", secret.to_str().unwrap()])
                // The inventory's session, which ka serve -i serves.
                .args(["--session", "t"])
                .args(["--name", name, "--target", &lo.0, "--root-partition", root])
                .arg("--state-dir")
                .arg(d)
                .arg("--identity")
                .arg(format!(
                    "hostname={name},domain=lab.test,ip={ip}/24,gateway=10.9.0.1,dns=10.9.0.1,mac=52:54:00:09:00:0{}",
                    &name[2..]
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&err).unwrap())
                .spawn()
                .unwrap();
            (ChildGuard { child, what: name.to_string() }, err)
        })
        .collect();
    for (mut j, err) in joins {
        let status = wait_timeout(&mut j.child, Duration::from_secs(120)).expect("join finishes");
        let text = fs::read_to_string(&err).unwrap();
        assert!(status.success(), "{}: {status}\n{text}", j.what);
        assert!(
            text.contains(&format!("identity applied: host name {}", j.what)),
            "{text}"
        );
        assert!(text.contains("left etc/resolv.conf alone"), "{text}");
    }
    let status = wait_timeout(&mut serve.child, Duration::from_secs(30)).expect("serve ends");
    let err = fs::read_to_string(&serve_err).unwrap();
    assert!(status.success(), "{status}\n{err}");
    let out = fs::read_to_string(d.join("serve.out")).unwrap();
    assert!(out.contains("\"name\":\"n01\",\"ok\":true"), "{out}");
    assert!(out.contains("\"name\":\"n02\",\"ok\":true"), "{out}");

    // Each copy has its own identity; the source's image is untouched.
    for (i, lo) in loops.iter().enumerate() {
        let n = i + 1;
        let got = read_back(
            d,
            &lo.0,
            &[
                "etc/hostname",
                "etc/hosts",
                "etc/machine-id",
                "etc/systemd/network/10-ka.network",
                "etc/resolv.conf",
            ],
        );
        assert_eq!(got[0], format!("n0{n}\n"));
        assert!(
            got[1].contains(&format!("10.9.0.1{n}\tn0{n}.lab.test n0{n}\n")),
            "{}",
            got[1]
        );
        assert!(!got[1].contains("source"), "{}", got[1]);
        assert_eq!(got[2], "");
        assert!(
            got[3].contains(&format!("MACAddress=52:54:00:09:00:0{n}\n")),
            "{}",
            got[3]
        );
        assert!(
            got[3].contains(&format!("Address=10.9.0.1{n}/24\n")),
            "{}",
            got[3]
        );
        assert_eq!(got[4], "-> /etc/resolv.conf");
    }
    let src = Loop::attach(&image);
    assert_eq!(read_back(d, &src.0, &["etc/hostname"])[0], "source\n");
    drop(src);

    // The source flipped both to local boot as their copies verified; the
    // nodes that did not take part keep their mode.
    let modes = BootState::new(&state).load().unwrap();
    let inventory = Inventory::load(&inv).unwrap();
    for n in &inventory.nodes {
        let want = if ["n01", "n02"].contains(&n.name.as_str()) {
            Mode::Local
        } else {
            Mode::Install
        };
        assert_eq!(modes.get(&n.name).mode, want, "{}", n.name);
    }
    for n in ["n01", "n02"] {
        assert!(
            err.contains(&format!("{n}: clone verified, boot mode now local")),
            "{err}"
        );
    }
}
