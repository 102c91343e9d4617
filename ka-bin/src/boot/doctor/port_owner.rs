//! Who holds a UDP port on this machine: the sockets of `/proc/net/udp`
//! and `/proc/net/udp6` bound to it, and the processes whose descriptors
//! (`/proc/PID/fd`) are those sockets. A TFTP port held by tftpd-hpa or
//! dnsmasq instead of `ka tftp` serves files but none of ka's per-node
//! configs or keys, and a node then boots the wrong thing or hangs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// A process holding the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process ID.
    pub pid: u32,
    /// Its name (`/proc/PID/comm`).
    pub name: String,
    /// Its command line, arguments separated by spaces.
    pub command_line: String,
}

/// The UDP sockets bound to `port` that receive datagrams sent to `ip`
/// (bound to it or to the wildcard address), with their holders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortUse {
    /// Sockets found.
    pub sockets: usize,
    /// The processes that hold them; fewer than the sockets when some
    /// processes' descriptors cannot be read (another user's, without root).
    pub holders: Vec<Holder>,
}

/// How many times each socket table is read. The kernel hands a table out
/// a page per `read(2)`, and each read finds its place again by counting
/// sockets from the start: on a busy machine (a boot server answering TFTP
/// transfers, each on a socket of its own) a socket closing before it
/// shifts the rest, and one read can skip a socket that was there all
/// along. A socket skipped by every one of several reads is very unlikely.
const TABLE_READS: usize = 3;

/// Who holds UDP `port` for datagrams to `ip`, from `/proc`.
pub fn udp_port_use(ip: IpAddr, port: u16) -> std::io::Result<PortUse> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        for _ in 0..TABLE_READS {
            let text = match std::fs::read_to_string(table) {
                Ok(t) => t,
                // No IPv6 on this machine.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && table.ends_with('6') => break,
                Err(e) => return Err(e),
            };
            inodes.extend(sockets_on(&text, ip, port));
        }
    }
    inodes.sort_unstable();
    inodes.dedup();
    let mut holders = Vec::new();
    if !inodes.is_empty() {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if holds_any(&entry.path(), &inodes) {
                holders.push(holder(pid, &entry.path()));
            }
        }
    }
    Ok(PortUse {
        sockets: inodes.len(),
        holders,
    })
}

/// The socket inodes of a `/proc/net/udp{,6}` table bound to `port` and
/// receiving for `ip`.
fn sockets_on(table: &str, ip: IpAddr, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
            continue;
        };
        let Some((addr, p)) = local.split_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() != Some(port) {
            continue;
        }
        let Some(bound) = parse_kernel_address(addr) else {
            continue;
        };
        if receives_for(bound, ip) {
            if let Ok(inode) = inode.parse() {
                out.push(inode);
            }
        }
    }
    out
}

/// An address as the kernel prints it: the 32-bit words in host order, hex.
fn parse_kernel_address(hex: &str) -> Option<IpAddr> {
    // Each word as the kernel holds it in memory: little-endian on the
    // machines ka runs on.
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Whether a socket bound to `bound` receives datagrams sent to `ip`.
fn receives_for(bound: IpAddr, ip: IpAddr) -> bool {
    if bound.is_unspecified() || bound == ip {
        return true;
    }
    match bound {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| IpAddr::V4(v4) == ip),
        IpAddr::V4(_) => false,
    }
}

fn holds_any(proc_dir: &Path, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| inodes.contains(&n))
        })
    })
}

fn holder(pid: u32, proc_dir: &Path) -> Holder {
    let name = std::fs::read_to_string(proc_dir.join("comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let command_line = std::fs::read(proc_dir.join("cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Holder {
        pid,
        name,
        command_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addresses_are_read_in_host_order() {
        assert_eq!(
            parse_kernel_address("0100007F"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            parse_kernel_address("00000000000000000000000000000000"),
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        );
        assert_eq!(
            parse_kernel_address("0000000000000000FFFF00000100007F"),
            Some(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()))
        );
    }

    #[test]
    fn a_socket_of_this_process_is_found_with_its_holder() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let found = udp_port_use(IpAddr::V4(Ipv4Addr::LOCALHOST), port).unwrap();
        assert_eq!(found.sockets, 1, "{found:?}");
        // Other tests of this process start commands: a child between its
        // fork and its exec holds a copy of the socket too, so this process
        // is one holder, not necessarily the only one.
        assert!(
            found.holders.iter().any(|h| h.pid == std::process::id()),
            "{found:?}"
        );
        // Another address of the machine is not served by that socket.
        let other = udp_port_use(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port).unwrap();
        assert_eq!(other.sockets, 0);
    }
}
