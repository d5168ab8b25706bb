//! Address prefixes, and the fixed plan of the test cluster's addresses.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// An address prefix (`addr/prefix_len`), the address being the network's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// `addr/prefix_len`, with the host bits of `addr` cleared.
    pub const fn new(addr: IpAddr, prefix_len: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let bits = a.to_bits();
                let mask = if prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix_len)
                };
                IpAddr::V4(Ipv4Addr::from_bits(bits & mask))
            }
            IpAddr::V6(a) => {
                let bits = a.to_bits();
                let mask = if prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix_len)
                };
                IpAddr::V6(Ipv6Addr::from_bits(bits & mask))
            }
        };
        Self { addr, prefix_len }
    }

    pub const fn v4(a: Ipv4Addr, prefix_len: u8) -> Self {
        Self::new(IpAddr::V4(a), prefix_len)
    }

    pub const fn v6(a: Ipv6Addr, prefix_len: u8) -> Self {
        Self::new(IpAddr::V6(a), prefix_len)
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (ip, self.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self::new(ip, self.prefix_len) == *self
            }
            _ => false,
        }
    }

    /// The address `n` after the network address (e.g. `host(5)` of
    /// 203.0.113.0/24 is 203.0.113.5). Panics if that is outside the prefix.
    pub fn host(&self, n: u128) -> IpAddr {
        let ip = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from_bits(
                a.to_bits() + u32::try_from(n).unwrap_or_else(|_| panic!("host {n} of {self}")),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() + n)),
        };
        assert!(self.contains(ip), "host {n} is outside {self}");
        ip
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The shared segment the nodes and the client are on.
pub const LAN_V4: IpNet = IpNet::v4(Ipv4Addr::new(192, 168, 77, 0), 24);
pub const LAN_V6: IpNet = IpNet::v6(Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0), 64);
/// LoadBalancer ingress addresses, routed by the client via node-a (as a
/// router or a MetalLB-style announcement would).
pub const LB_V4: IpNet = IpNet::v4(Ipv4Addr::new(203, 0, 113, 0), 24);
/// (`2001:db8:lb::` is not an address: `1b` stands in for "lb".)
pub const LB_V6: IpNet = IpNet::v6(Ipv6Addr::new(0x2001, 0xdb8, 0x1b, 0, 0, 0, 0, 0), 64);
/// externalIPs, routed by the client via node-a.
pub const EXTERNAL_V4: IpNet = IpNet::v4(Ipv4Addr::new(198, 51, 100, 0), 24);
pub const EXTERNAL_V6: IpNet = IpNet::v6(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0), 64);
/// ClusterIPs: routed by nothing (lb translates them before routing).
pub const CLUSTER_IP_V4: IpNet = IpNet::v4(Ipv4Addr::new(10, 96, 0, 0), 16);
pub const CLUSTER_IP_V6: IpNet = IpNet::v6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0), 112);
/// The client's addresses on the segment.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// The textual `10 + i` read as hex, so that pod `i`'s IPv6 address ends
/// the way its IPv4 address does (`.12` / `::12`).
pub(crate) fn v6_suffix(decimal: u32) -> u16 {
    u16::from_str_radix(&decimal.to_string(), 16).unwrap_or(0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(LB_V4.host(5).to_string(), "203.0.113.5");
        assert_eq!(LB_V6.host(5).to_string(), "2001:db8:1b::5");
        assert!(CLUSTER_IP_V6.contains("fd00:96::ffff".parse().unwrap()));
        assert!(!CLUSTER_IP_V6.contains("fd00:96::1:0".parse().unwrap()));
        assert!(!CLUSTER_IP_V4.contains("fd00:96::1".parse().unwrap()));
        assert_eq!(
            IpNet::v4(Ipv4Addr::new(10, 244, 1, 7), 24).to_string(),
            "10.244.1.0/24"
        );
        assert_eq!(v6_suffix(12), 0x12);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn host_outside() {
        CLUSTER_IP_V6.host(0x1_0000);
    }
}
