//! Test frames: built with etherparse, and read back by it (a parser
//! independent of lb's) with every checksum recomputed and compared. The
//! datapath tests and the benchmark build and check their frames here.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result, bail, ensure};
use etherparse::{
    Ipv4Header, Ipv6Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};

use crate::fib::{ROUTER_MAC, UPLINK_MAC};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;
pub const PSH: u8 = 0x08;

/// Ethernet addresses (source, destination) of a frame arriving on the
/// [`crate::fib`] uplink from the router.
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

/// A TCP segment with the given flags (IPv4 with Don't Fragment, TTL and hop
/// limit 64, window 64240).
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

/// A SYN from the router (a client outside the node).
pub fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    tcp(FROM_ROUTER, src, dst, SYN, 1000, 0, &[])
}

pub fn udp(macs: ([u8; 6], [u8; 6]), src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let b = builder(macs, src.ip(), dst.ip()).udp(src.port(), dst.port());
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build udp");
    out
}

/// `frame` padded with zeros to at least `len` bytes, as a short Ethernet
/// frame is (the padding follows the IP datagram, whose length says where it
/// ends).
pub fn padded(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    if frame.len() < len {
        frame.resize(len, 0);
    }
    frame
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

    /// The 4-tuple of a TCP or UDP frame; None for any other.
    pub fn ports(&self) -> Option<(SocketAddr, SocketAddr)> {
        matches!(self.l4, L4::Tcp { .. } | L4::Udp { .. })
            .then(|| (self.src_addr(), self.dst_addr()))
    }
}

/// Prints a frame the way etherparse reads it (for logs and messages).
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

/// Decodes a frame and checks every checksum in it; panics with the reason if
/// one is wrong or the frame does not parse (see [`check`]).
pub fn decode(frame: &[u8]) -> Decoded {
    check(frame).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Decodes a frame and checks every checksum in it: an error says which is
/// wrong, or why the frame does not parse.
pub fn check(frame: &[u8]) -> Result<Decoded> {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .map_err(|e| anyhow::anyhow!("output does not parse: {e}: {frame:02x?}"))?;
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = &h.link else {
        bail!("no Ethernet header")
    };
    let payload = h.payload.slice().to_vec();
    let (src, dst, ttl) = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            ensure!(
                ip.header_checksum == ip.calc_header_checksum(),
                "IPv4 header checksum wrong in {ip:?}"
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                ip.time_to_live,
            )
        }
        Some(NetHeaders::Ipv6(ip, _)) => (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.hop_limit,
        ),
        other => bail!("not IP: {other:?}"),
    };
    let l4 = match &h.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let want = match &h.net {
                Some(NetHeaders::Ipv4(ip, _)) => tcp.calc_checksum_ipv4(ip, &payload),
                Some(NetHeaders::Ipv6(ip, _)) => tcp.calc_checksum_ipv6(ip, &payload),
                _ => unreachable!("TCP over IP"),
            }
            .context("TCP checksum")?;
            ensure!(tcp.checksum == want, "TCP checksum wrong in {tcp:?}");
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
            let v4 = matches!(h.net, Some(NetHeaders::Ipv4(..)));
            // IPv4 UDP may go without a checksum (0); IPv6 UDP may not.
            if !(v4 && udp.checksum == 0) {
                let want = match &h.net {
                    Some(NetHeaders::Ipv4(ip, _)) => udp.calc_checksum_ipv4(ip, &payload),
                    Some(NetHeaders::Ipv6(ip, _)) => udp.calc_checksum_ipv6(ip, &payload),
                    _ => unreachable!("UDP over IP"),
                }
                .context("UDP checksum")?;
                ensure!(udp.checksum == want, "UDP checksum wrong in {udp:?}");
            }
            L4::Udp {
                src: udp.source_port,
                dst: udp.destination_port,
            }
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            ensure!(
                icmp.checksum == icmp.icmp_type.calc_checksum(&payload),
                "ICMPv4 checksum wrong in {icmp:?}"
            );
            let b = icmp.to_bytes();
            L4::IcmpError {
                kind: b[0],
                code: b[1],
                rest: [b[4], b[5], b[6], b[7]],
                quoted: quoted(&payload, true)?,
            }
        }
        Some(TransportHeader::Icmpv6(icmp)) => {
            let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
                bail!("ICMPv6 over IPv4")
            };
            let want = icmp
                .icmp_type
                .calc_checksum(s.octets(), d.octets(), &payload)
                .context("ICMPv6 checksum")?;
            ensure!(icmp.checksum == want, "ICMPv6 checksum wrong in {icmp:?}");
            let b = icmp.to_bytes();
            L4::IcmpError {
                kind: b[0],
                code: b[1],
                rest: [b[4], b[5], b[6], b[7]],
                quoted: quoted(&payload, false)?,
            }
        }
        _ => L4::Other(match &h.net {
            Some(NetHeaders::Ipv4(ip, _)) => ip.protocol.0,
            Some(NetHeaders::Ipv6(ip, _)) => ip.next_header.0,
            _ => 0,
        }),
    };
    Ok(Decoded {
        eth_src: eth.source,
        eth_dst: eth.destination,
        src,
        dst,
        ttl,
        l4,
        payload,
    })
}

/// Reads the packet an ICMP error quotes: its IP header and the first 4 bytes
/// (ports) of its L4 header.
fn quoted(bytes: &[u8], v4: bool) -> Result<Quoted> {
    let (src, dst, proto, ip_len, ok) = if v4 {
        let (ip, _) = Ipv4Header::from_slice(bytes).context("quoted IPv4 header")?;
        let ok = ip.header_checksum == ip.calc_header_checksum();
        (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.protocol,
            ip.header_len(),
            ok,
        )
    } else {
        let (ip, _) = Ipv6Header::from_slice(bytes).context("quoted IPv6 header")?;
        (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.next_header,
            ip.header_len(),
            true,
        )
    };
    let p = bytes
        .get(ip_len..ip_len + 4)
        .context("the quoted packet has no ports")?;
    Ok(Quoted {
        src: SocketAddr::new(src, u16::from_be_bytes([p[0], p[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
        proto: proto.0,
        ip_checksum_ok: ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_read_back_and_a_wrong_checksum_is_found() {
        for (s, d) in [
            ("198.51.100.7:40000", "10.96.0.10:80"),
            ("[2001:db8:100::7]:40000", "[fd00:96::10]:80"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let f = padded(tcp(FROM_ROUTER, s, d, SYN | ACK, 7, 9, &[]), 80);
            let dec = check(&f).unwrap();
            assert_eq!(dec.ports(), Some((s, d)));
            assert!(matches!(dec.l4, L4::Tcp { flags, seq: 7, ack: 9, .. } if flags == SYN | ACK));
            let f = udp(FROM_ROUTER, s, d, b"x");
            assert_eq!(check(&f).unwrap().ports(), Some((s, d)));
            // A payload byte changed after the checksum was computed.
            let mut bad = tcp(FROM_ROUTER, s, d, ACK, 1, 2, b"data");
            *bad.last_mut().unwrap() ^= 0xff;
            let e = check(&bad).unwrap_err().to_string();
            assert!(e.contains("TCP checksum wrong"), "{e}");
        }
    }
}
