//! A network namespace holding a bridge and tap devices, for virtual
//! machines that PXE-boot against real daemons (dnsmasq, `ka tftp`, `ka
//! serve`) run inside the same namespace. Nothing leaves it: the bridge is
//! its only link, and the namespace goes away (with every device in it)
//! when the lab is dropped.
//!
//! Namespaces are named `kavm-<pid>`, so a lab left behind by a killed test
//! run is found by that exact prefix and removed once its process is gone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{require_tool, run};

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
