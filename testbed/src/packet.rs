//! Test frames: built with etherparse, and read back by it (a parser
//! independent of lb's) with every checksum recomputed and compared. The
//! datapath tests and the benchmark build and check their frames here.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result, bail, ensure};
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6ExtensionSlice,
    Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, NetHeaders, NetSlice, PacketBuilder,
    PacketHeaders, SlicedPacket, TransportHeader, UdpHeader, defrag::IpDefragPool,
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

/// A UDP datagram (checksum over all of it) sent as IP fragments carrying at
/// most `chunk` bytes of it each (`chunk` a multiple of 8, as fragment
/// offsets count 8-byte units), in order: IPv4 without Don't Fragment and
/// identification `id` (its low 16 bits), IPv6 with a Fragment header of
/// identification `id`; TTL and hop limit 64.
pub fn udp_fragments(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    id: u32,
    chunk: usize,
) -> Vec<Vec<u8>> {
    assert!(
        chunk >= 8 && chunk.is_multiple_of(8),
        "fragments carry 8-byte units"
    );
    let (udp, ether_type) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Header::new(0, 64, IpNumber::UDP, s.octets(), d.octets()).unwrap();
            let udp = UdpHeader::with_ipv4_checksum(src.port(), dst.port(), &ip, payload);
            (udp.expect("udp header"), EtherType::IPV4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = ipv6_header(s.octets(), d.octets(), IpNumber::UDP, 0);
            let udp = UdpHeader::with_ipv6_checksum(src.port(), dst.port(), &ip, payload);
            (udp.expect("udp header"), EtherType::IPV6)
        }
        _ => panic!("mixed address families"),
    };
    let mut datagram = udp.to_bytes().to_vec();
    datagram.extend_from_slice(payload);
    let eth = Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type,
    };
    let pieces: Vec<&[u8]> = datagram.chunks(chunk).collect();
    let mut frames = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let offset = IpFragOffset::try_new((i * chunk / 8) as u16).expect("fragment offset");
        let more = i + 1 < pieces.len();
        let mut f = eth.to_bytes().to_vec();
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(
                    piece.len() as u16,
                    64,
                    IpNumber::UDP,
                    s.octets(),
                    d.octets(),
                )
                .unwrap();
                ip.identification = id as u16;
                ip.dont_fragment = false;
                ip.more_fragments = more;
                ip.fragment_offset = offset;
                // `write` computes the header checksum.
                ip.write(&mut f).unwrap();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ip = ipv6_header(
                    s.octets(),
                    d.octets(),
                    IpNumber::IPV6_FRAGMENTATION_HEADER,
                    (Ipv6FragmentHeader::LEN + piece.len()) as u16,
                );
                ip.write(&mut f).unwrap();
                Ipv6FragmentHeader::new(IpNumber::UDP, offset, more, id)
                    .write(&mut f)
                    .unwrap();
            }
            _ => unreachable!("checked above"),
        }
        f.extend_from_slice(piece);
        frames.push(f);
    }
    frames
}

fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: IpNumber, payload_length: u16) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length,
        next_header: next,
        hop_limit: 64,
        source: src,
        destination: dst,
    }
}

/// One IP fragment as the independent parser reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// Identification (IPv4: 16 bits; IPv6: the Fragment header's 32).
    pub id: u32,
    /// Where its data lies in the datagram, in bytes.
    pub offset: usize,
    /// More fragments follow.
    pub more: bool,
    /// The protocol of the fragmented datagram.
    pub proto: u8,
    /// Its part of the datagram.
    pub data: Vec<u8>,
}

/// Reads an IP fragment, checking its IPv4 header checksum (IPv6 has none);
/// an error if the frame is no fragment or does not parse.
pub fn fragment(frame: &[u8]) -> Result<Fragment> {
    let p = SlicedPacket::from_ethernet(frame)
        .map_err(|e| anyhow::anyhow!("frame does not parse: {e}: {frame:02x?}"))?;
    let mac = |at: usize| -> [u8; 6] { frame[at..at + 6].try_into().unwrap() };
    let (eth_dst, eth_src) = (mac(0), mac(6));
    match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            ensure!(
                h.header_checksum == h.calc_header_checksum(),
                "IPv4 header checksum wrong in {h:?}"
            );
            ensure!(h.is_fragmenting_payload(), "not a fragment: {h:?}");
            Ok(Fragment {
                eth_src,
                eth_dst,
                src: IpAddr::from(h.source),
                dst: IpAddr::from(h.destination),
                ttl: h.time_to_live,
                id: u32::from(h.identification),
                offset: usize::from(h.fragment_offset.value()) * 8,
                more: h.more_fragments,
                proto: h.protocol.0,
                data: ip.payload().payload.to_vec(),
            })
        }
        Some(NetSlice::Ipv6(ip)) => {
            let frag = ip
                .extensions()
                .clone()
                .into_iter()
                .find_map(|e| match e {
                    Ipv6ExtensionSlice::Fragment(f) => Some(f.to_header()),
                    _ => None,
                })
                .context("no IPv6 Fragment header")?;
            let h = ip.header().to_header();
            Ok(Fragment {
                eth_src,
                eth_dst,
                src: IpAddr::from(h.source),
                dst: IpAddr::from(h.destination),
                ttl: h.hop_limit,
                id: frag.identification,
                offset: usize::from(frag.fragment_offset.value()) * 8,
                more: frag.more_fragments,
                proto: frag.next_header.0,
                data: ip.payload().payload.to_vec(),
            })
        }
        other => bail!("not IP: {other:?}"),
    }
}

/// Reassembles a datagram from its fragment frames, in any order, with
/// etherparse's defragmenter (fragments join only if their addresses,
/// protocol and identification agree), and decodes it as [`check`] does,
/// every checksum over the whole datagram checked; the Ethernet addresses and
/// TTL are the first frame's. An error if they do not make one datagram.
pub fn reassemble(frames: &[Vec<u8>]) -> Result<Decoded> {
    let mut pool: IpDefragPool = IpDefragPool::new();
    let mut whole = None;
    for (i, f) in frames.iter().enumerate() {
        let p = SlicedPacket::from_ethernet(f)
            .map_err(|e| anyhow::anyhow!("fragment {i} does not parse: {e}"))?;
        let done = pool
            .process_sliced_packet(&p, (), ())
            .map_err(|e| anyhow::anyhow!("fragment {i}: {e}"))?;
        if let Some(d) = done {
            ensure!(
                i + 1 == frames.len(),
                "complete after {} of {} fragments",
                i + 1,
                frames.len()
            );
            whole = Some(d);
        }
    }
    let whole = whole.context("the fragments do not make a whole datagram")?;
    let first = fragment(&frames[0])?;
    let mut frame = frames[0][..12].to_vec();
    match (first.src, first.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&EtherType::IPV4.0.to_be_bytes());
            let len = u16::try_from(whole.payload.len())?;
            let ip = Ipv4Header::new(len, first.ttl, whole.ip_number, s.octets(), d.octets())?;
            ip.write(&mut frame)?;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&EtherType::IPV6.0.to_be_bytes());
            let len = u16::try_from(whole.payload.len())?;
            let mut ip = ipv6_header(s.octets(), d.octets(), whole.ip_number, len);
            ip.hop_limit = first.ttl;
            ip.write(&mut frame)?;
        }
        _ => bail!("mixed address families"),
    }
    frame.extend_from_slice(&whole.payload);
    check(&frame).context("the reassembled datagram")
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

    #[test]
    fn fragments_reassemble_and_a_changed_byte_is_found() {
        for (s, d) in [
            ("198.51.100.7:40000", "10.96.0.10:53"),
            ("[2001:db8:100::7]:40000", "[fd00:96::10]:53"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
            let frames = udp_fragments(FROM_ROUTER, s, d, &payload, 0x1234_5678, 1224);
            assert_eq!(frames.len(), 3, "3008 bytes in pieces of 1224");
            let parts: Vec<Fragment> = frames.iter().map(|f| fragment(f).unwrap()).collect();
            let id = if s.is_ipv4() { 0x5678 } else { 0x1234_5678 };
            for (i, p) in parts.iter().enumerate() {
                assert_eq!((p.src, p.dst, p.id, p.proto), (s.ip(), d.ip(), id, 17));
                assert_eq!((p.offset, p.more), (i * 1224, i < 2));
            }
            assert!(check(&frames[1]).is_ok(), "a later fragment reads as IP");
            // In any order.
            let shuffled = vec![frames[2].clone(), frames[0].clone(), frames[1].clone()];
            let whole = reassemble(&shuffled).unwrap();
            assert_eq!(whole.ports(), Some((s, d)));
            assert_eq!(whole.payload, payload);
            // A byte of the last fragment changed: the datagram's checksum is wrong.
            let mut bad = frames.clone();
            *bad[2].last_mut().unwrap() ^= 0xff;
            let e = format!("{:#}", reassemble(&bad).unwrap_err());
            assert!(e.contains("UDP checksum wrong"), "{e}");
            // A fragment missing: no datagram.
            assert!(reassemble(&frames[..2]).is_err());
        }
    }
}
