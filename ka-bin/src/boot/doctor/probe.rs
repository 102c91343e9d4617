//! A real DHCPDISCOVER with a node's MAC, sent on the boot network
//! (`ka doctor --probe IFACE`): what the DHCP server actually offers that
//! node — its address, the next-server and the boot file for each kind of
//! client — whatever its configuration file seems to say. The `dhcproto`
//! crate encodes and decodes the messages.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, Architecture, DhcpOption, Flags, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use super::dhcp_read::ClientKind;
use crate::boot::Mac;

/// How long to wait for an offer: DHCP servers answer within
/// milliseconds; dnsmasq and dhcpd may wait a little to ping the address.
const OFFER_WAIT: Duration = Duration::from_secs(4);

/// What a DHCP server offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The server that offered (option 54, or the sender).
    pub server: Ipv4Addr,
    /// The address offered (`yiaddr`).
    pub address: Ipv4Addr,
    /// The next-server, the TFTP server (`siaddr`).
    pub next_server: Ipv4Addr,
    /// The boot file (option 67, else the `file` field).
    pub boot_file: Option<String>,
}

/// A socket on UDP port 68 of `iface` that may broadcast: the client
/// port, bound to the device so the offer is read where it arrives.
fn client_socket(iface: &str) -> Result<UdpSocket, String> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("opening a UDP socket: {e}"))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e.to_string())?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true).map_err(|e| e.to_string())?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(iface))
        .map_err(|e| format!("binding to interface {iface} ({e}): it needs root (CAP_NET_RAW) and an existing interface"))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)),
    )
    .map_err(|e| format!("binding UDP port 68 on {iface} ({e}): it needs root, and no DHCP client running on {iface}"))?;
    Ok(UdpSocket::from(fd))
}

/// Sends a DHCPDISCOVER as `mac`, a client of `kind`, out of `iface`,
/// and returns the first offer made to it.
pub fn discover(iface: &str, mac: Mac, kind: ClientKind) -> Result<Offer, String> {
    let socket = client_socket(iface)?;
    let mut msg = v4::Message::default();
    msg.set_flags(Flags::default().set_broadcast())
        .set_chaddr(&mac.0);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Discover));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::ServerIdentifier,
        OptionCode::BootfileName,
    ]));
    // What a PXE ROM of this kind says of itself (RFC 4578).
    let (arch, class): (_, &[u8]) = match kind {
        ClientKind::Bios => (
            Architecture::Intelx86PC,
            b"PXEClient:Arch:00000:UNDI:002001",
        ),
        ClientKind::Uefi | ClientKind::Ipxe => {
            (Architecture::X86_64, b"PXEClient:Arch:00007:UNDI:003016")
        }
    };
    opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(arch));
    if kind == ClientKind::Ipxe {
        opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    }
    let xid = msg.xid();
    let bytes = msg
        .to_vec()
        .map_err(|e| format!("encoding DHCPDISCOVER: {e}"))?;
    socket
        .send_to(&bytes, (Ipv4Addr::BROADCAST, 67))
        .map_err(|e| format!("broadcasting on {iface}: {e}"))?;
    let deadline = Instant::now() + OFFER_WAIT;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no DHCP offer for {mac} on {iface} within {OFFER_WAIT:?}"
            ));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("receiving on {iface}: {e}")),
        };
        let Ok(reply) = v4::Message::decode(&mut Decoder::new(&buf[..n])) else {
            continue;
        };
        if reply.xid() != xid
            || reply.chaddr() != mac.0
            || reply.opts().msg_type() != Some(MessageType::Offer)
        {
            continue;
        }
        let server = match reply.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => match from.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            },
        };
        let boot_file = match reply.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(f)) => Some(f.clone()),
            _ => reply.fname().map(<[u8]>::to_vec),
        }
        .map(|f| String::from_utf8_lossy(f.split(|&b| b == 0).next().unwrap_or(&[])).into_owned())
        .filter(|f| !f.is_empty());
        return Ok(Offer {
            server,
            address: reply.yiaddr(),
            next_server: reply.siaddr(),
            boot_file,
        });
    }
}
