//! `ka netboot install`: what a node does inside the netboot image, after
//! the init has mounted the basics and loaded the modules. Reads the plan
//! from the kernel command line, brings the network up by DHCP, fetches the
//! session secret, joins the session onto the target disk (showing
//! progress) — or, with `ka.clone=system`, rebuilds its disks from a
//! system clone — and applies the node's identity to the verified copy.
//!
//! The exit code tells the init what to do next (see [`Exit`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::cmdline::{CloneKind, NetbootMode, Plan, SecretSource};
use crate::session::join::{self, JoinOptions, Joined, Output};
use crate::session::reach::{Reach, DEFAULT_DISCOVER_TO};
use crate::session::DEFAULT_STATE_DIR;

/// What the init does after `ka netboot install`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The copy is verified and has its identity: reboot into it.
    Done = 0,
    /// The clone failed (the fail delay has passed): reboot, to try again.
    Failed = 1,
    /// Nothing was written (bad command line, no network, no source; the
    /// fail delay has passed): reboot, to try again.
    CouldNotRun = 2,
    /// The copy is verified but has not got its identity: do not reboot
    /// (it would come up as a second copy of the source); stay at a shell.
    NoIdentity = 3,
    /// A failure with `ka.fail_delay=never`: stay at a shell.
    Stay = 4,
    /// `ka.mode=shell`: the network is up; give a shell.
    Shell = 10,
}

/// Where the image's DHCP script records the lease (see `udhcpc.script`).
pub const LEASE_FILE: &str = "/run/ka/lease";
/// The DHCP script in the image.
pub const DHCP_SCRIPT: &str = "/etc/ka/udhcpc.script";

/// Runs the node's part; `cmdline` is normally `/proc/cmdline`. With
/// `dry_run`, prints the plan and the `ka join` it would run, and stops.
pub fn run(cmdline: &Path, dry_run: bool) -> Exit {
    let text = match fs::read_to_string(cmdline) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                Some(Duration::from_secs(60)),
                Exit::CouldNotRun,
                &format!("reading {}: {e}", cmdline.display()),
            )
        }
    };
    let plan = match Plan::parse(&text) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                Some(Duration::from_secs(60)),
                Exit::CouldNotRun,
                &format!("the kernel command line is wrong: {e}"),
            )
        }
    };
    if dry_run {
        crate::outln!("{plan:#?}");
        match join_options(&plan, Path::new("/run/ka/secret")) {
            Ok(o) => crate::outln!("would run: ka join {}", o.command_line()),
            Err(e) => crate::outln!("would not join: {e:#}"),
        }
        return Exit::Done;
    }
    say(&format!(
        "node {} joining session {:?} ({} clone) onto {}",
        plan.name.as_deref().unwrap_or("?"),
        plan.session,
        plan.clone_kind,
        if plan.targets.is_empty() {
            "-".into()
        } else {
            disk_list(&plan.targets)
        }
    ));
    if let Err(e) = network_up(&plan) {
        return fail(
            plan.fail_delay,
            Exit::CouldNotRun,
            &format!("no network: {e:#}"),
        );
    }
    if plan.mode == NetbootMode::Shell {
        say("shell mode (ka.mode=shell): the network is up; nothing is written");
        return Exit::Shell;
    }
    let secret = match fetch_secret(&plan) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                plan.fail_delay,
                Exit::CouldNotRun,
                &format!("no session secret: {e:#}"),
            )
        }
    };
    let options = match join_options(&plan, &secret) {
        Ok(o) => o,
        Err(e) => return fail(plan.fail_delay, Exit::CouldNotRun, &format!("{e:#}")),
    };
    let disks = plan.targets.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let stop = stop.clone();
        std::thread::spawn(move || progress(&disks, &stop))
    };
    let joined = join::run(options);
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    match joined {
        Ok(Joined::Verified) => {
            say("the copy is verified and has this node's identity");
            Exit::Done
        }
        Ok(Joined::VerifiedWithoutIdentity) => {
            say("the copy is verified, but it has NOT got this node's identity (see above).");
            say("Not rebooting: the disk would come up as a second copy of the source.");
            say("Fix it from this shell, or `ka pxe set --mode install` this node and reboot it.");
            Exit::NoIdentity
        }
        Ok(Joined::Failed) => fail(
            plan.fail_delay,
            Exit::Failed,
            "the clone failed (see above)",
        ),
        Err(e) => fail(plan.fail_delay, Exit::CouldNotRun, &format!("{e:#}")),
    }
}

/// The file the netboot init and this installer copy their console lines
/// to; `ka join --console-log` sends it to the source.
pub const CONSOLE_LOG: &str = "/run/ka/console.log";

/// A line on the console, and in [`CONSOLE_LOG`] for the source.
fn say(text: &str) {
    let line = format!("ka-netboot: {text}");
    crate::errln!("{line}");
    if let Ok(mut f) = fs::OpenOptions::new().append(true).open(CONSOLE_LOG) {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}

/// Prints why, waits the fail delay (a shell is on the second console
/// meanwhile), and returns what the init should do.
fn fail(delay: Option<Duration>, code: Exit, why: &str) -> Exit {
    say(&format!("FAILED: {why}"));
    match delay {
        None => {
            say("ka.fail_delay=never: staying here; a shell follows");
            Exit::Stay
        }
        Some(d) => {
            say(&format!(
                "rebooting in {} (a shell is on the second console meanwhile)",
                humantime::format_duration(d)
            ));
            std::thread::sleep(d);
            code
        }
    }
}

/// `/dev/sda,/dev/sdb`.
fn disk_list(disks: &[PathBuf]) -> String {
    disks
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The join `plan` asks for, with the secret in `secret_file`: an image
/// onto `ka.target`, or with `ka.clone=system` a system clone rebuilt onto
/// the `ka.target` disks (`ka join --system`).
pub fn join_options(plan: &Plan, secret_file: &Path) -> anyhow::Result<JoinOptions> {
    let output = match (plan.clone_kind, plan.targets.as_slice()) {
        (_, []) => bail!("ka.target= is missing"),
        (CloneKind::Image, [target]) => Output::Target(target.clone()),
        (CloneKind::Image, _) => bail!(
            "ka.target={} names several disks, but an image goes onto one (or add ka.clone=system)",
            disk_list(&plan.targets)
        ),
        (CloneKind::System, disks) => Output::System(disks.to_vec()),
    };
    Ok(JoinOptions {
        reach: Reach {
            server: plan.server.clone(),
            discover_to: DEFAULT_DISCOVER_TO,
            session: plan.session.clone(),
            secret_file: secret_file.to_path_buf(),
        },
        output,
        // A system clone's window of the stream is held in the image's
        // /tmp, which is RAM: bounded by `window`.
        spool_dir: None,
        name: plan.name.clone(),
        wait_release: false,
        verify_readback: plan.verify_readback,
        wait: plan.wait,
        json: false,
        // The initramfs's own tmpfs: a restarted `ka join` resumes within
        // this boot; a reboot starts the clone over.
        state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        identity: plan.identity.clone(),
        root_partition: plan.root,
        window: ka_net::datapath::window::DEFAULT_WINDOW,
        data_port: plan.data_port,
        // What the init and this installer print on the console, which
        // the source keeps in this node's log.
        console_log: Some(PathBuf::from(CONSOLE_LOG)),
    })
}

/// Brings the boot NIC up by DHCP (busybox udhcpc with the image's script,
/// which applies the lease and records it in [`LEASE_FILE`]). Tries the NIC
/// named by `ka.iface`, else the one whose MAC is `BOOTIF`, else every
/// Ethernet interface in turn.
fn network_up(plan: &Plan) -> anyhow::Result<()> {
    // Drivers probe asynchronously after insmod: give the NIC time to appear.
    let deadline = Instant::now() + Duration::from_secs(15);
    let candidates = loop {
        let c = interfaces(plan)?;
        if !c.is_empty() || Instant::now() >= deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if candidates.is_empty() {
        match (&plan.iface, plan.boot_mac) {
            (Some(i), _) => bail!("no interface {i} (ka.iface): is its driver in the image? (ka netboot build --module)"),
            (None, Some(m)) => bail!("no interface has the boot MAC {m}: is its driver in the image? (ka netboot build --module)"),
            (None, None) => bail!("no network interface: is the NIC's driver in the image? (ka netboot build --module)"),
        }
    }
    let mut errors = Vec::new();
    for iface in &candidates {
        say(&format!("DHCP on {iface}"));
        let out = Command::new("udhcpc")
            .args([
                "-i",
                iface,
                "-s",
                DHCP_SCRIPT,
                "-f",
                "-q",
                "-n",
                "-t",
                "6",
                "-T",
                "3",
                "-A",
                "2",
            ])
            .status();
        match out {
            Ok(s) if s.success() && Path::new(LEASE_FILE).exists() => {
                let lease = fs::read_to_string(LEASE_FILE).unwrap_or_default();
                say(&format!(
                    "{iface} is up: {}",
                    lease.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
                return Ok(());
            }
            Ok(s) => errors.push(format!("{iface}: no lease ({s})")),
            Err(e) => errors.push(format!("{iface}: cannot run udhcpc: {e}")),
        }
    }
    bail!("{}", errors.join("; "))
}

/// Candidate interfaces for DHCP, in the order to try them.
fn interfaces(plan: &Plan) -> anyhow::Result<Vec<String>> {
    let mut all = Vec::new();
    for e in fs::read_dir("/sys/class/net").context("reading /sys/class/net")? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // ARPHRD_ETHER = 1: skips loopback, tunnels and the like.
        let ty = fs::read_to_string(e.path().join("type")).unwrap_or_default();
        if ty.trim() != "1" {
            continue;
        }
        let mac = fs::read_to_string(e.path().join("address")).unwrap_or_default();
        all.push((name, mac.trim().to_string()));
    }
    all.sort();
    if let Some(i) = &plan.iface {
        return Ok(all
            .into_iter()
            .filter(|(n, _)| n == i)
            .map(|(n, _)| n)
            .collect());
    }
    if let Some(m) = plan.boot_mac {
        return Ok(all
            .into_iter()
            .filter(|(_, mac)| mac.parse().ok() == Some(m))
            .map(|(n, _)| n)
            .collect());
    }
    Ok(all.into_iter().map(|(n, _)| n).collect())
}

/// A value of the lease the DHCP script recorded.
fn lease_value(key: &str) -> Option<String> {
    let text = fs::read_to_string(LEASE_FILE).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, v)| *k == key && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_string())
}

/// Puts the node's key (or the session secret) in a file `ka join` reads,
/// and returns its path.
fn fetch_secret(plan: &Plan) -> anyhow::Result<PathBuf> {
    let file = PathBuf::from("/run/ka/secret");
    fs::create_dir_all("/run/ka")?;
    match &plan.secret {
        SecretSource::Inline(hex) => {
            fs::write(&file, format!("{hex}\n"))?;
            Ok(file)
        }
        SecretSource::File(p) => {
            if !p.is_file() {
                bail!(
                    "{} is not in the image: boot with ka.secret=tftp (the default) to fetch this node's key from ka tftp --secret-file",
                    p.display()
                );
            }
            Ok(p.clone())
        }
        SecretSource::Tftp { server, path } => {
            let server = match server {
                Some(s) => s.clone(),
                None => lease_value("siaddr")
                    .filter(|s| s != "0.0.0.0")
                    .or_else(|| lease_value("serverid"))
                    .ok_or_else(|| {
                        anyhow!(
                            "the DHCP lease names no boot server: use ka.secret=tftp://HOST/PATH"
                        )
                    })?,
            };
            let (host, port) = match server.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.to_string()),
                None => (server.clone(), "69".to_string()),
            };
            say(&format!(
                "fetching this node's key {path} from {host}:{port} over TFTP"
            ));
            let out = Command::new("tftp")
                .args(["-g", "-r", path, "-l"])
                .arg(&file)
                .args([&host, &port])
                .output()
                .context("running busybox tftp")?;
            if !out.status.success() {
                let _ = fs::remove_file(&file);
                bail!(
                    "tftp {host} {port} could not fetch {path}: {} (ka tftp hands a node its key only with --secret-file, \
                     to the node's inventory address, while it is in install mode: see its log)",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(file)
        }
    }
}

/// Prints how much has been written to the `disks` every few seconds,
/// until `stop`: the node's console shows the clone moving.
fn progress(disks: &[PathBuf], stop: &AtomicBool) {
    let mut stats = Vec::new();
    for disk in disks {
        let name = fs::canonicalize(disk)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let Some(name) = name else { return };
        stats.push(PathBuf::from(format!("/sys/class/block/{name}/stat")));
    }
    let target = disk_list(disks);
    let written = || -> Option<u64> {
        // Field 7 of the block layer's stat file: sectors written (of 512
        // bytes). A whole disk's counts its partitions' too.
        let mut sum = 0;
        for stat in &stats {
            let text = fs::read_to_string(stat).ok()?;
            sum += text.split_whitespace().nth(6)?.parse::<u64>().ok()? * 512;
        }
        Some(sum)
    };
    let Some(start) = written() else { return };
    let t0 = Instant::now();
    let mut last = (t0, start);
    let mut next = t0 + Duration::from_secs(5);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() < next {
            continue;
        }
        next += Duration::from_secs(5);
        let Some(now_bytes) = written() else { return };
        if now_bytes == last.1 {
            continue;
        }
        let rate = (now_bytes - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        say(&format!(
            "{:.1} MiB written to {} ({:.1} MB/s)",
            (now_bytes - start) as f64 / (1 << 20) as f64,
            target,
            rate / 1e6
        ));
        last = (Instant::now(), now_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_options_from_a_command_line() {
        let plan = Plan::parse(
            "ka.server=10.9.0.1:4715 ka.session=lab ka.name=n01 ka.target=/dev/vda \
             ka.ip=10.9.0.11/24 ka.root=1 BOOTIF=01-52-54-00-09-00-01",
        )
        .unwrap();
        let o = join_options(&plan, Path::new("/run/ka/secret")).unwrap();
        assert_eq!(
            o.command_line(),
            "--server 10.9.0.1:4715 --session lab --secret-file /run/ka/secret --name n01 \
             --target /dev/vda --wait 30m --console-log /run/ka/console.log \
             --identity hostname=n01,ip=10.9.0.11/24,mac=52:54:00:09:00:01 --root-partition 1"
        );
        assert!(!o.wait_release);
        assert_eq!(o.output, Output::Target("/dev/vda".into()));
    }

    #[test]
    fn a_system_clone_joins_with_its_disks() {
        let plan = Plan::parse(
            "ka.server=10.9.0.1:4715 ka.name=n01 ka.clone=system ka.target=/dev/sda,/dev/sdb \
             ka.identity=off",
        )
        .unwrap();
        let o = join_options(&plan, Path::new("/run/ka/secret")).unwrap();
        assert_eq!(
            o.output,
            Output::System(vec!["/dev/sda".into(), "/dev/sdb".into()])
        );
        assert_eq!(
            o.command_line(),
            "--server 10.9.0.1:4715 --session ka --secret-file /run/ka/secret --name n01 \
             --system /dev/sda,/dev/sdb --wait 30m --console-log /run/ka/console.log"
        );
        // An image plan never becomes a system clone, nor the reverse.
        let mut image = plan.clone();
        image.clone_kind = CloneKind::Image;
        let err = join_options(&image, Path::new("/s")).unwrap_err();
        assert!(err.to_string().contains("add ka.clone=system"), "{err}");
        image.targets.truncate(1);
        assert_eq!(
            join_options(&image, Path::new("/s")).unwrap().output,
            Output::Target("/dev/sda".into())
        );
    }
}
