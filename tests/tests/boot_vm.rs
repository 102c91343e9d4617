//! Real firmware against `ka tftp`: a QEMU machine (SeaBIOS + iPXE NIC ROM)
//! PXE-boots through pxelinux or an iPXE script, first in install mode, then —
//! after the source reports its clone verified — from its local disk.
//!
//! QEMU's user-mode network hands out the DHCP lease; its boot file is a
//! `tftp://10.0.2.2:PORT/…` URL, and 10.0.2.2 is QEMU's alias for the host's
//! 127.0.0.1, where `ka tftp` listens on a free port. The kernel is a stub
//! with a valid bzImage header (enough for pxelinux and iPXE to load it, not
//! to run it); the disk's boot sector prints `KA-LOCAL-DISK`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ka_bin::boot::{BootState, Inventory, Mode};
use ka_tests::{ka, require_tool, stderr, ChildGuard, KaTftp};

const MAC: &str = "52:54:00:12:34:56";

/// Inventory for QEMU's user network, with one node `vm1`, and a TFTP root
/// with pxelinux, its modules, the stub kernel and an initramfs.
fn lab(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("ka")).unwrap();
    let pxelinux = Path::new("/usr/lib/PXELINUX/pxelinux.0");
    assert!(
        pxelinux.is_file(),
        "{} missing: install the Debian package `pxelinux`",
        pxelinux.display()
    );
    fs::copy(pxelinux, root.join("pxelinux.0")).unwrap();
    for m in ["ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32"] {
        let src = Path::new("/usr/lib/syslinux/modules/bios").join(m);
        assert!(
            src.is_file(),
            "{} missing: install the Debian package `syslinux-common`",
            src.display()
        );
        fs::copy(&src, root.join(m)).unwrap();
    }
    fs::write(root.join("ka/vmlinuz"), stub_bzimage()).unwrap();
    fs::write(
        root.join("ka/initramfs.img"),
        ka_tests::pseudo_random(200_000, 7),
    )
    .unwrap();
    fs::write(dir.join("disk.img"), boot_disk()).unwrap();
    let inv = dir.join("cluster.toml");
    fs::write(
        &inv,
        format!(
            r#"[network]
subnet = "10.0.2.0/24"
gateway = "10.0.2.2"
[boot]
server = "10.0.2.2"
tftp_root = "root"
kernel = "ka/vmlinuz"
initramfs = "ka/initramfs.img"
[session]
name = "vm"
source = "10.0.2.2:4000"
disk = "/dev/vda"
[[node]]
name = "vm1"
mac = "{MAC}"
ip = "10.0.2.15"
"#
        ),
    )
    .unwrap();
    inv
}

/// 64 KiB that pass the bzImage header checks of pxelinux and iPXE.
fn stub_bzimage() -> Vec<u8> {
    let mut k = vec![0u8; 65536];
    k[0x1F1] = 4; // setup sectors
    k[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    k[0x211] = 1; // loaded high: a bzImage
    k
}

/// A 1 MiB disk whose boot sector prints KA-LOCAL-DISK through the BIOS and idles.
fn boot_disk() -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 20] = [
        0xBE, 0x14, 0x7C, // mov si, message (0x7c14)
        0xB4, 0x0E,       // mov ah, 0x0e (teletype)
        0xAC,             // next: lodsb
        0x08, 0xC0,       // or al, al
        0x74, 0x04,       // jz idle
        0xCD, 0x10,       // int 0x10
        0xEB, 0xF7,       // jmp next
        // idle: poll the keyboard forever. SeaBIOS copies the screen to the
        // serial console lazily, on keyboard calls; a bare `hlt` would
        // leave the message's tail unsent.
        0xB4, 0x01,       // mov ah, 0x01
        0xCD, 0x16,       // int 0x16
        0xEB, 0xFA,       // jmp idle
    ];
    let mut disk = vec![0u8; 1 << 20];
    disk[..code.len()].copy_from_slice(&code);
    let msg = b"KA-LOCAL-DISK\r\n\0";
    disk[code.len()..code.len() + msg.len()].copy_from_slice(msg);
    disk[510..512].copy_from_slice(&[0x55, 0xAA]);
    disk
}

/// Boots the VM from `bootfile` (network first, then disk) until its serial
/// console shows every string in `until`, or 150 s pass; returns the console.
fn boot(dir: &Path, bootfile: &str, mac: &str, until: &[&str]) -> String {
    let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists()
            || Path::new("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(),
        "QEMU's network boot ROM is missing: install the Debian package `ipxe-qemu`"
    );
    let child = Command::new(qemu)
        // The paravirtual KVM of these machines triple-faults in the BIOS
        // (see NOTES-pxe.md): emulate.
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-boot",
            "order=nc",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide",
            dir.join("disk.img").display()
        ))
        .args(["-netdev", &format!("user,id=n0,bootfile={bootfile}")])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut guard = ChildGuard {
        child,
        what: "qemu".into(),
    };
    let console = Arc::new(Mutex::new(String::new()));
    let mut out = guard.child.stdout.take().unwrap();
    let sink = console.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let text = ka_tests::strip_ansi(&console.lock().unwrap());
        if until.iter().all(|u| shows(&text, u)) {
            return text;
        }
        let exited = guard.child.try_wait().unwrap().is_some();
        assert!(
            !exited && Instant::now() < deadline,
            "{} before the console showed {until:?}:\n{text}",
            if exited {
                "qemu exited"
            } else {
                "150 s passed"
            }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the console shows `text`, ignoring line breaks and spaces:
/// SeaBIOS copies the screen to the serial port lazily, so a line can arrive
/// broken in two (seen in CI: "P\nXELINUX").
fn shows(console: &str, text: &str) -> bool {
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    squash(console).contains(&squash(text))
}

fn set(inv: &Path, state: &Path, mode: &str) {
    let o = ka(&[
        "pxe",
        "set",
        "-i",
        inv.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "-m",
        mode,
        "vm1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Install mode, then the source's "clone verified" hook, then local boot.
#[test]
fn pxelinux_vm_boots_installer_then_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let inv = lab(dir.path());
    let state = dir.path().join("state");
    let server = KaTftp::start(&inv, &state, &[]);
    let url = format!("tftp://10.0.2.2:{}/pxelinux.0", server.addr.port());

    set(&inv, &state, "install");
    let console = boot(
        dir.path(),
        &url,
        MAC,
        &["Loading ka/vmlinuz... ok", "Loading ka/initramfs.img...ok"],
    );
    assert!(shows(&console, "PXELINUX"), "{console}");
    let log = server.log();
    for path in [
        "pxelinux.0",
        "ldlinux.c32",
        "pxelinux.cfg/01-52-54-00-12-34-56",
        "ka/vmlinuz",
        "ka/initramfs.img",
    ] {
        assert!(
            log.contains(&format!("path=\"{path}\"")),
            "{path} not served:\n{log}"
        );
    }

    let inventory = Inventory::load(&inv).unwrap();
    assert_eq!(
        BootState::new(&state)
            .clone_verified(&inventory, "vm1")
            .unwrap(),
        Some(Mode::Local)
    );
    let console = boot(dir.path(), &url, MAC, &["KA-LOCAL-DISK"]);
    // pxelinux chained to the disk itself: the BIOS never fell through.
    assert!(
        shows(&console, "PXELINUX") && !shows(&console, "Booting from Hard Disk"),
        "{console}"
    );
    assert!(!shows(&console, "Loading ka/vmlinuz"), "{console}");
    assert!(
        server.log().contains("path=\"chain.c32\""),
        "{}",
        server.log()
    );

    // A machine not in the inventory boots its disk too.
    let console = boot(dir.path(), &url, "52:54:00:77:77:77", &["KA-LOCAL-DISK"]);
    assert!(
        shows(&console, "PXELINUX") && !shows(&console, "Booting from Hard Disk"),
        "{console}"
    );
}

#[test]
fn ipxe_vm_boots_installer_then_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let inv = lab(dir.path());
    let state = dir.path().join("state");
    let server = KaTftp::start(&inv, &state, &[]);
    let url = format!("tftp://10.0.2.2:{}/boot.ipxe", server.addr.port());

    set(&inv, &state, "install");
    let console = boot(dir.path(), &url, MAC, &["/ka/initramfs.img... ok"]);
    assert!(
        shows(&console, "ipxe/52-54-00-12-34-56.ipxe... ok"),
        "{console}"
    );
    assert!(shows(&console, "/ka/vmlinuz... ok"), "{console}");

    set(&inv, &state, "local");
    let console = boot(dir.path(), &url, MAC, &["KA-LOCAL-DISK"]);
    assert!(shows(&console, "Booting from SAN device 0x80"), "{console}");
    assert!(!shows(&console, "Booting from Hard Disk"), "{console}");
}
