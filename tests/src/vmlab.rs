//! A network namespace holding a bridge and tap devices, for virtual
//! machines that PXE-boot against real daemons (dnsmasq, `ka tftp`, `ka
//! serve`) run inside the same namespace. Nothing leaves it: the bridge is
//! its only link, and the namespace goes away (with every device in it)
//! when the lab is dropped.
//!
//! Namespaces are named `kavm-<pid>`, so a lab left behind by a killed test
//! run is found by that exact prefix and removed once its process is gone.
//!
//! Also here: [`Vm`], a QEMU machine on one of the lab's taps whose serial
//! console the test reads, and [`Daemon`], a process whose output is
//! collected as it comes. Both are killed by PID when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{ka, require_tool, run, stderr, stdout, strip_ansi, ChildGuard};

/// The prefix of every namespace this module creates.
pub const PREFIX: &str = "kavm-";

/// A namespace with bridge `br0` (holding `address`) and tap devices
/// `tap0`, `tap1`, … enslaved to it.
pub struct VmNet {
    /// The namespace's name.
    pub ns: String,
    /// The taps, in order.
    pub taps: Vec<String>,
}

fn ip(args: &[&str]) {
    let o = run(
        Command::new(require_tool("ip", "iproute2")).args(args),
        Duration::from_secs(20),
    );
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Removes namespaces of earlier runs whose process no longer exists.
pub fn remove_stale() {
    let o = run(
        Command::new(require_tool("ip", "iproute2")).args(["netns", "list"]),
        Duration::from_secs(20),
    );
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(
                Command::new("ip").args(["netns", "del", name]),
                Duration::from_secs(20),
            );
        }
    }
}

impl VmNet {
    /// Creates the namespace with the bridge at `address` (e.g.
    /// `10.77.0.1/24`) and `taps` tap devices. Panics, with the reason, when
    /// not run as root or without iproute2.
    pub fn create(address: &str, taps: usize) -> VmNet {
        assert!(
            nix_is_root(),
            "network namespaces need root: run the test as root (CI does)"
        );
        remove_stale();
        let ns = format!("{PREFIX}{}", std::process::id());
        ip(&["netns", "add", &ns]);
        let lab = VmNet {
            ns: ns.clone(),
            taps: (0..taps).map(|i| format!("tap{i}")).collect(),
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", address, "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        for tap in &lab.taps {
            ip(&["-n", &ns, "tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["-n", &ns, "link", "set", tap, "master", "br0", "up"]);
        }
        lab
    }

    /// A command that runs `program` inside the namespace. `ip netns exec`
    /// executes the program in its own place, so the child's PID is the
    /// program's and killing it by PID kills the program.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(require_tool("ip", "iproute2"));
        c.args(["netns", "exec", &self.ns])
            .arg(program)
            .stdin(Stdio::null());
        c
    }

    /// A real dnsmasq serving DHCP on the namespace's bridge from `conf`
    /// (no DNS, in the foreground, its log on its output), its leases in
    /// `dir`.
    pub fn dnsmasq(&self, conf: &Path, dir: &Path) -> Daemon {
        let mut cmd = self.command(require_tool("dnsmasq", "dnsmasq-base"));
        cmd.arg(format!("--conf-file={}", conf.display()))
            .args([
                "--no-daemon",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--user=root",
                "--log-dhcp",
                "--log-facility=-",
            ])
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg("--pid-file=");
        Daemon::start(cmd, "dnsmasq")
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the bridge and taps in it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A child whose standard output and error are collected as they come.
pub struct Daemon {
    /// The process, killed by PID when dropped.
    pub guard: ChildGuard,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

/// Appends every line `r` gives to `into`, on a thread of its own.
fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Daemon {
    /// Starts `cmd` with its output collected; `what` names it in messages.
    pub fn start(mut cmd: Command, what: &str) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), out.clone());
        collect(child.stderr.take().unwrap(), err.clone());
        Daemon {
            guard: ChildGuard {
                child,
                what: what.into(),
            },
            out,
            err,
        }
    }

    /// Its standard output so far.
    pub fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Its standard error so far.
    pub fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until `pred` holds on (stdout, stderr), or panics after `limit`
    /// or when the process exits first, with everything it said.
    pub fn wait_for(&mut self, limit: Duration, what: &str, pred: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if pred(&self.out(), &self.err()) {
                return;
            }
            let exited = self.guard.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{} {}: waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.guard.what,
                exited.map_or("timed out".to_string(), |s| format!("exited ({s})")),
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The firmware a VM boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, with iPXE as the NIC's option ROM (Debian `ipxe-qemu`).
    Bios,
    /// OVMF (Debian `ovmf`) on a q35 machine, with its own virtio-net
    /// driver doing the PXE boot.
    Uefi {
        /// The machine's copy of the variable store (written by the
        /// firmware; keep it across restarts of the same machine).
        vars: PathBuf,
        /// Secure Boot on, with Microsoft's keys enrolled (OVMF's `.ms`
        /// variable store and its SMM build).
        secure_boot: bool,
    },
}

/// OVMF's code image with 4 MiB of flash (Debian `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's empty variable store matching [`OVMF_CODE`]; copy it per machine.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF built for Secure Boot (it needs SMM).
pub const OVMF_CODE_SECURE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// OVMF's variable store with Microsoft's keys enrolled and Secure Boot on.
pub const OVMF_VARS_SECURE: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

/// Where a VM boots from first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFrom {
    /// The network, then the disk (what PXE-booted nodes do).
    Network,
    /// The disk only.
    Disk,
}

/// What one VM is: how it is started by [`Vm::start`].
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its name, in messages.
    pub name: String,
    /// The lab tap its NIC is on.
    pub tap: String,
    /// Its NIC's MAC address.
    pub mac: String,
    /// Its disk (a raw image), as virtio-blk.
    pub disk: PathBuf,
    /// Writes to the disk go to a temporary file QEMU removes, leaving
    /// `disk` as it was.
    pub snapshot: bool,
    /// Its firmware.
    pub firmware: Firmware,
    /// Where it boots from first.
    pub boot: BootFrom,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// A host directory shared with the guest over virtio-9p, with its
    /// mount tag.
    pub share: Option<(String, PathBuf)>,
}

/// A QEMU machine on a tap of the lab, its serial console collected. It
/// runs with `-no-reboot`, so a reboot ends the process; it is killed by
/// PID when dropped.
pub struct Vm {
    /// Its name, in messages.
    pub name: String,
    /// The QEMU process.
    pub guard: ChildGuard,
    console: Arc<Mutex<String>>,
}

impl Vm {
    /// Starts `spec` inside `net`. Panics, naming the Debian package, when
    /// QEMU or the firmware is missing.
    pub fn start(net: &VmNet, spec: &VmSpec) -> Vm {
        let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86");
        let mut cmd = net.command(qemu);
        // This machine's KVM cannot run real-mode firmware: TCG it is.
        cmd.args(["-accel", "tcg", "-smp", "1", "-nographic", "-no-reboot"])
            .arg("-m")
            .arg(spec.memory_mib.to_string());
        let (boot_index_net, boot_index_disk) = match spec.boot {
            BootFrom::Network => ("bootindex=1", "bootindex=2"),
            BootFrom::Disk => ("bootindex=9", "bootindex=1"),
        };
        let nic_rom = match &spec.firmware {
            Firmware::Bios => {
                assert!(
                    Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists()
                        || Path::new("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(),
                    "QEMU's network boot ROM is missing: install the Debian package `ipxe-qemu`"
                );
                cmd.args(["-machine", "pc"]);
                ""
            }
            Firmware::Uefi { vars, secure_boot } => {
                let (code, template) = if *secure_boot {
                    (OVMF_CODE_SECURE, OVMF_VARS_SECURE)
                } else {
                    (OVMF_CODE, OVMF_VARS)
                };
                assert!(
                    Path::new(code).is_file() && Path::new(template).is_file(),
                    "{code} or {template} is missing: install the Debian package `ovmf`"
                );
                if !vars.exists() {
                    std::fs::copy(template, vars).expect("copying OVMF's variable store");
                }
                if *secure_boot {
                    // The variable store only SMM code may write, so the
                    // keys cannot be changed from the guest.
                    cmd.args(["-machine", "q35,smm=on"])
                        .args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
                } else {
                    cmd.args(["-machine", "q35"]);
                }
                cmd.arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={code}"
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ));
                // IPv4 only: an IPv6 PXE entry between the network and the
                // disk would wait out its DHCPv6 timeouts on every boot.
                cmd.args(["-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=no"]);
                // No option ROM: OVMF's own virtio-net driver does the PXE.
                ",romfile="
            }
        };
        cmd.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=disk0{}",
                spec.disk.display(),
                if spec.snapshot { ",snapshot=on" } else { "" }
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk0,{boot_index_disk}"))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                spec.tap
            ))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={},{boot_index_net}{nic_rom}",
                spec.mac
            ));
        if let Some((tag, dir)) = &spec.share {
            cmd.arg("-fsdev")
                .arg(format!(
                    "local,id=share0,path={},security_model=none",
                    dir.display()
                ))
                .arg("-device")
                .arg(format!("virtio-9p-pci,fsdev=share0,mount_tag={tag}"));
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start qemu for {}: {e}", spec.name));
        let console = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let sink = console.clone();
        // To watch a run as it goes: KA_VM_CONSOLE_DIR=DIR appends each
        // console to DIR/<name>.log too.
        let mut copy = std::env::var_os("KA_VM_CONSOLE_DIR").and_then(|d| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&d).join(format!("{}.log", spec.name)))
                .ok()
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(f) = copy.as_mut() {
                    use std::io::Write;
                    let _ = f.write_all(&buf[..n]);
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        collect(child.stderr.take().unwrap(), console.clone());
        Vm {
            name: spec.name.clone(),
            guard: ChildGuard {
                child,
                what: format!("qemu {}", spec.name),
            },
            console,
        }
    }

    /// Its serial console (and QEMU's own messages) so far, without
    /// terminal escapes.
    pub fn console(&self) -> String {
        strip_ansi(&self.console.lock().unwrap())
    }

    /// Whether its QEMU has exited.
    pub fn exited(&mut self) -> bool {
        self.guard.child.try_wait().unwrap().is_some()
    }
}

/// Whether `console` shows `text`, ignoring line breaks and spaces:
/// firmware copies the screen to the serial port lazily and wraps lines.
pub fn shows(console: &str, text: &str) -> bool {
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    squash(console).contains(&squash(text))
}

/// Every VM's console under a header with its name, for failure messages.
pub fn consoles(vms: &[&Vm]) -> String {
    vms.iter()
        .map(|v| format!("===== {} =====\n{}", v.name, v.console()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until every VM's QEMU has exited (a reboot ends QEMU with
/// `-no-reboot`), or panics with every console and `context()`.
pub fn wait_all_exit(vms: &mut [Vm], limit: Duration, phase: &str, context: &dyn Fn() -> String) {
    let deadline = Instant::now() + limit;
    loop {
        let running: Vec<String> = vms
            .iter_mut()
            .filter_map(|vm| (!vm.exited()).then(|| vm.name.clone()))
            .collect();
        if running.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{phase}: {running:?} still running after {limit:?}\n{}\n{}",
                consoles(&vms.iter().collect::<Vec<_>>()),
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts that a command succeeded, showing everything it said if not.
pub fn check(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Prepares a boot server as every VM test starts one: each node of
/// `inventory` in install mode in `state`, and dnsmasq's configuration for
/// them written to `conf` by `ka dhcp config`.
pub fn install_all(inventory: &Path, state: &Path, conf: &Path) {
    let (inv, state) = (inventory.to_str().unwrap(), state.to_str().unwrap());
    check(
        &ka(&[
            "pxe",
            "set",
            "-i",
            inv,
            "--state-dir",
            state,
            "-m",
            "install",
            "--all",
        ]),
        "ka pxe set",
    );
    check(
        &ka(&[
            "dhcp",
            "config",
            "--format",
            "dnsmasq",
            "-i",
            inv,
            "-o",
            conf.to_str().unwrap(),
        ]),
        "ka dhcp config",
    );
}
