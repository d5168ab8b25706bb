//! Test packets: built with etherparse, and decoded by it (an independent parser)
//! with every checksum recomputed and compared.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    Ipv4Header, Ipv6Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};

use super::netns::{ROUTER_MAC, UPLINK_MAC};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;
pub const PSH: u8 = 0x08;

/// Ethernet addresses of a frame arriving on the uplink from the router.
pub const FROM_ROUTER: ([u8; 6], [u8; 6]) = (ROUTER_MAC, UPLINK_MAC);

fn builder(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    }
}

/// A TCP segment with the given flags.
pub fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = builder(macs, src.ip(), dst.ip()).tcp(src.port(), dst.port(), seq, 64_240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build tcp");
    out
}

pub fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    tcp(FROM_ROUTER, src, dst, SYN, 1000, 0, &[])
}

pub fn udp(macs: ([u8; 6], [u8; 6]), src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let b = builder(macs, src.ip(), dst.ip()).udp(src.port(), dst.port());
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build udp");
    out
}

/// What the independent parser read from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// An ICMP error and the packet it quotes (addresses and ports).
    IcmpError {
        kind: u8,
        code: u8,
        /// The 4 type-specific bytes (the next-hop MTU of "too big" errors).
        rest: [u8; 4],
        quoted: Quoted,
    },
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// Whether the quoted IPv4 header checksum is right (always true for IPv6).
    pub ip_checksum_ok: bool,
}

impl Decoded {
    pub fn src_addr(&self) -> SocketAddr {
        match self.l4 {
            L4::Tcp { src, .. } | L4::Udp { src, .. } => SocketAddr::new(self.src, src),
            _ => panic!("no ports in {self:?}"),
        }
    }

    pub fn dst_addr(&self) -> SocketAddr {
        match self.l4 {
            L4::Tcp { dst, .. } | L4::Udp { dst, .. } => SocketAddr::new(self.dst, dst),
            _ => panic!("no ports in {self:?}"),
        }
    }
}

/// Prints a frame the way etherparse reads it (for logs and the closing note).
pub fn describe(frame: &[u8]) -> String {
    match PacketHeaders::from_ethernet_slice(frame) {
        Ok(h) => format!(
            "{:?} {:?} {:?} payload {} bytes",
            h.link,
            h.net,
            h.transport,
            h.payload.slice().len()
        ),
        Err(e) => format!("unparsable: {e}"),
    }
}

/// Decodes a frame and checks every checksum in it; panics with the reason if one
/// is wrong or the frame does not parse.
pub fn decode(frame: &[u8]) -> Decoded {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .unwrap_or_else(|e| panic!("output does not parse: {e}: {frame:02x?}"));
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = &h.link else {
        panic!("no Ethernet header")
    };
    let payload = h.payload.slice().to_vec();
    let (src, dst, ttl, pseudo_src, pseudo_dst) = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 header checksum wrong in {ip:?}"
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                ip.time_to_live,
                ip.source.to_vec(),
                ip.destination.to_vec(),
            )
        }
        Some(NetHeaders::Ipv6(ip, _)) => (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.hop_limit,
            ip.source.to_vec(),
            ip.destination.to_vec(),
        ),
        other => panic!("not IP: {other:?}"),
    };
    let l4 = match &h.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let want = match &h.net {
                Some(NetHeaders::Ipv4(ip, _)) => tcp.calc_checksum_ipv4(ip, &payload).unwrap(),
                Some(NetHeaders::Ipv6(ip, _)) => tcp.calc_checksum_ipv6(ip, &payload).unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(tcp.checksum, want, "TCP checksum wrong in {tcp:?}");
            let mut flags = 0;
            for (set, bit) in [
                (tcp.syn, SYN),
                (tcp.ack, ACK),
                (tcp.rst, RST),
                (tcp.fin, FIN),
                (tcp.psh, PSH),
            ] {
                if set {
                    flags |= bit;
                }
            }
            L4::Tcp {
                src: tcp.source_port,
                dst: tcp.destination_port,
                flags,
                seq: tcp.sequence_number,
                ack: tcp.acknowledgment_number,
            }
        }
        Some(TransportHeader::Udp(udp)) => {
            let want = match &h.net {
                Some(NetHeaders::Ipv4(ip, _)) => udp.calc_checksum_ipv4(ip, &payload).unwrap(),
                Some(NetHeaders::Ipv6(ip, _)) => udp.calc_checksum_ipv6(ip, &payload).unwrap(),
                _ => unreachable!(),
            };
            if !(udp.checksum == 0 && matches!(h.net, Some(NetHeaders::Ipv4(..)))) {
                assert_eq!(udp.checksum, want, "UDP checksum wrong in {udp:?}");
            }
            L4::Udp {
                src: udp.source_port,
                dst: udp.destination_port,
            }
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type.calc_checksum(&payload),
                "ICMPv4 checksum wrong in {icmp:?}"
            );
            let b = icmp.to_bytes();
            L4::IcmpError {
                kind: b[0],
                code: b[1],
                rest: [b[4], b[5], b[6], b[7]],
                quoted: quoted(&payload, true),
            }
        }
        Some(TransportHeader::Icmpv6(icmp)) => {
            let want = icmp
                .icmp_type
                .calc_checksum(
                    pseudo_src.clone().try_into().unwrap(),
                    pseudo_dst.clone().try_into().unwrap(),
                    &payload,
                )
                .unwrap();
            assert_eq!(icmp.checksum, want, "ICMPv6 checksum wrong in {icmp:?}");
            let b = icmp.to_bytes();
            L4::IcmpError {
                kind: b[0],
                code: b[1],
                rest: [b[4], b[5], b[6], b[7]],
                quoted: quoted(&payload, false),
            }
        }
        _ => L4::Other(match &h.net {
            Some(NetHeaders::Ipv4(ip, _)) => ip.protocol.0,
            Some(NetHeaders::Ipv6(ip, _)) => ip.next_header.0,
            _ => 0,
        }),
    };
    Decoded {
        eth_src: eth.source,
        eth_dst: eth.destination,
        src,
        dst,
        ttl,
        l4,
        payload,
    }
}

/// Reads the packet an ICMP error quotes: its IP header and the first 4 bytes
/// (ports) of its L4 header.
fn quoted(bytes: &[u8], v4: bool) -> Quoted {
    let (src, dst, proto, ip_len, ok) = if v4 {
        let (ip, _) = Ipv4Header::from_slice(bytes).expect("quoted IPv4 header");
        let ok = ip.header_checksum == ip.calc_header_checksum();
        (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.protocol,
            ip.header_len(),
            ok,
        )
    } else {
        let (ip, _) = Ipv6Header::from_slice(bytes).expect("quoted IPv6 header");
        (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.next_header,
            ip.header_len(),
            true,
        )
    };
    let p = &bytes[ip_len..ip_len + 4];
    Quoted {
        src: SocketAddr::new(src, u16::from_be_bytes([p[0], p[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
        proto: proto.0,
        ip_checksum_ok: ok,
    }
}
