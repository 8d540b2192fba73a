//! The backup network (`backup::network::cidr::CIDR`): the host address inside the CIDR,
//! and TCP connections to a store that leave from it. The socket is bound to that address
//! and to its interface (SO_BINDTODEVICE), so the traffic takes the backup network even
//! when the store is also reachable another way.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::error::{AgentError, ErrorKind, Result};

/// Where connections to the store leave from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAddr {
    /// The host address inside the CIDR.
    pub ip: IpAddr,
    /// Its interface.
    pub interface: String,
}

impl std::fmt::Display for SourceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.ip, self.interface)
    }
}

/// The first address of this host inside `net` (interfaces that are up, in system order).
pub fn pick(net: &IpNet) -> Result<SourceAddr> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| AgentError::new(ErrorKind::Internal, format!("listing network interfaces: {e}")))?;
    for a in addrs {
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(addr) = a.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if net.contains(&ip) {
            return Ok(SourceAddr { ip, interface: a.interface_name });
        }
    }
    Err(AgentError::new(
        ErrorKind::FailedPrecondition,
        format!("no address of this host is inside the backup network {net}"),
    )
    .with_field("systemTags"))
}

/// Connects to `host:port` from `source`.
pub async fn connect(source: &SourceAddr, host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for remote in tokio::net::lookup_host((host, port)).await? {
        if remote.is_ipv4() != source.ip.is_ipv4() {
            continue;
        }
        let socket = if remote.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Err(e) = socket.bind_device(Some(source.interface.as_bytes())) {
            // Without CAP_NET_RAW the address binding alone still chooses the source.
            tracing::warn!(interface = %source.interface, error = %e, "cannot bind to the backup interface");
        }
        socket.bind(SocketAddr::new(source.ip, 0))?;
        socket.set_nodelay(true)?;
        match socket.connect(remote).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address of the backup network's family ({})", source.ip),
        )
    }))
}
