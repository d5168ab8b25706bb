//! Header parsing: Ethernet (with up to two VLAN tags), IPv4 (options allowed),
//! IPv6 (hop-by-hop and destination-options headers skipped, the Fragment
//! header read), TCP, UDP and ICMP.
//!
//! Fragments: the first fragment of a datagram (offset 0, more fragments)
//! holds the L4 header and parses as a flow, marked [`FRAG_FIRST`]; a later
//! one (offset > 0) has no ports and is a [`Parsed::Fragment`], which
//! `fragment` may know the translation of. Fragments of other protocols than
//! TCP and UDP are passed.
//!
//! Every outcome other than a translatable flow is a [`Reason`] to pass the packet
//! to the kernel untouched; nothing here drops.

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason};

use core::ptr;

use crate::{
    mem,
    packet::{Packet, at, load},
    scratch::{FRAG_FIRST, FRAG_LATER, FRAG_NONE, Headers},
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HLEN: usize = 40;
const MAX_IPV6_EXT_HEADERS: usize = 4;
const IPPROTO_FRAGMENT: u8 = 44;
/// IPv4 flags and fragment offset: more fragments, offset (in 8-byte units).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// What the packet in [`Headers`] turned out to be.
#[repr(u32)]
pub enum Parsed {
    /// TCP or UDP: a candidate for balancing.
    Flow,
    /// An ICMP or ICMPv6 error: may be about a translated flow.
    IcmpError,
    /// A later fragment of a TCP or UDP datagram (no ports): translated if its
    /// first fragment was.
    Fragment,
    /// Leave it to the kernel.
    Pass(Reason),
}

#[inline(always)]
fn be16<P: Packet>(pkt: &P, off: usize) -> Option<u16> {
    load::<P, u16>(pkt, off).map(u16::from_be)
}

/// A 16-bit word at `off` bytes into a header already bounds-checked by the
/// caller (native byte order, as in memory). Header fields sit at even offsets of
/// 2-byte-aligned headers, so these are single aligned loads; this avoids copying
/// headers byte by byte.
#[inline(always)]
pub fn word(hdr: *const u8, off: usize) -> u16 {
    // SAFETY: `hdr..hdr + off + 2` lies in the range the caller checked.
    unsafe { ptr::read(hdr.add(off).cast::<u16>()) }
}

/// Copies `N` bytes (a multiple of 2) of an address at `off` into `out`.
#[inline(always)]
pub fn addr<const N: usize>(hdr: *const u8, off: usize, out: &mut [u8; 16]) {
    let mut i = 0;
    while i < N {
        let w = word(hdr, off + i).to_ne_bytes();
        out[i] = w[0];
        out[i + 1] = w[1];
        i += 2;
    }
}

/// Parses the packet into `h`.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, h: &mut Headers) -> Parsed {
    let Some(mut ethertype) = be16(pkt, 12) else {
        return Parsed::Pass(Reason::PassMalformed);
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, QinQ); the tags stay, only IP is parsed.
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(pkt, l3 + 2) else {
            return Parsed::Pass(Reason::PassMalformed);
        };
        ethertype = inner;
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, l3, h),
        ETH_P_IPV6 => parse_ipv6(pkt, l3, h),
        _ => Parsed::Pass(Reason::PassNotIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P, l3: usize, h: &mut Headers) -> Parsed {
    let Some(ip) = at::<P, [u8; 20]>(pkt, l3) else {
        return Parsed::Pass(Reason::PassMalformed);
    };
    let ip = ip.cast::<u8>().cast_const();
    let [ver_ihl, _] = word(ip, 0).to_ne_bytes();
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let tot_len = u16::from_be(word(ip, 2));
    if ver_ihl >> 4 != 4 || ihl < 20 || usize::from(tot_len) < ihl {
        return Parsed::Pass(Reason::PassMalformed);
    }
    // Frames may carry padding after the datagram, but never less than it claims.
    if l3 + usize::from(tot_len) > pkt.total_len() as usize {
        return Parsed::Pass(Reason::PassMalformed);
    }
    let frag = u16::from_be(word(ip, 6));
    let [_, proto] = word(ip, 8).to_ne_bytes();
    mem::zero(&mut h.key);
    h.key.family = FAMILY_V4;
    h.key.proto = proto;
    addr::<4>(ip, 12, &mut h.key.src);
    addr::<4>(ip, 16, &mut h.key.dst);
    h.l3 = l3;
    h.l4 = l3 + ihl;
    h.ip_len = tot_len;
    h.frag_id = u32::from(u16::from_be(word(ip, 4)));
    if frag & IP_OFFSET != 0 {
        return later_fragment(h);
    }
    h.frag = if frag & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    parse_l4(pkt, h, usize::from(tot_len) - ihl)
}

/// A fragment past the first: IP header and data, no ports.
#[inline(always)]
fn later_fragment(h: &mut Headers) -> Parsed {
    h.frag = FRAG_LATER;
    h.flags = 0;
    match h.key.proto {
        PROTO_TCP | PROTO_UDP => Parsed::Fragment,
        _ => Parsed::Pass(Reason::PassFragment),
    }
}

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P, l3: usize, h: &mut Headers) -> Parsed {
    let Some(ip) = at::<P, [u8; IPV6_HLEN]>(pkt, l3) else {
        return Parsed::Pass(Reason::PassMalformed);
    };
    let ip = ip.cast::<u8>().cast_const();
    let [ver, _] = word(ip, 0).to_ne_bytes();
    let payload_len = u16::from_be(word(ip, 4));
    if ver >> 4 != 6 || l3 + IPV6_HLEN + usize::from(payload_len) > pkt.total_len() as usize {
        return Parsed::Pass(Reason::PassMalformed);
    }
    let [next, _] = word(ip, 6).to_ne_bytes();
    mem::zero(&mut h.key);
    h.key.family = FAMILY_V6;
    h.key.proto = next;
    addr::<16>(ip, 8, &mut h.key.src);
    addr::<16>(ip, 24, &mut h.key.dst);
    h.frag = FRAG_NONE;
    h.frag_id = 0;
    let mut later = false;
    let mut l4 = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match h.key.proto {
            // Hop-by-hop and destination options: skip them.
            0 | 60 => {
                let Some(ext) = load::<P, u16>(pkt, l4) else {
                    return Parsed::Pass(Reason::PassMalformed);
                };
                let [next, len] = ext.to_ne_bytes();
                h.key.proto = next;
                l4 += (usize::from(len) + 1) * 8;
            }
            // Fragment header (RFC 8200 4.5): next header, reserved, offset
            // (13 bits) and M flag, identification. The fragmentable part
            // (the L4 header, in the first fragment) follows it.
            IPPROTO_FRAGMENT => {
                let Some(fh) = at::<P, [u8; 8]>(pkt, l4) else {
                    return Parsed::Pass(Reason::PassMalformed);
                };
                let fh = fh.cast::<u8>().cast_const();
                let [next, _] = word(fh, 0).to_ne_bytes();
                let offset_m = u16::from_be(word(fh, 2));
                h.frag_id = (u32::from(u16::from_be(word(fh, 4))) << 16)
                    | u32::from(u16::from_be(word(fh, 6)));
                h.key.proto = next;
                l4 += 8;
                if offset_m & 0xfff8 != 0 {
                    later = true;
                    break;
                }
                // Offset 0 without M is an atomic fragment (RFC 6946): a
                // whole datagram.
                if offset_m & 1 != 0 {
                    h.frag = FRAG_FIRST;
                }
            }
            _ => break,
        }
    }
    let ext_len = l4 - l3 - IPV6_HLEN;
    if ext_len > usize::from(payload_len) {
        return Parsed::Pass(Reason::PassMalformed);
    }
    h.l3 = l3;
    h.l4 = l4;
    h.ip_len = payload_len + IPV6_HLEN as u16;
    if later {
        return later_fragment(h);
    }
    parse_l4(pkt, h, usize::from(payload_len) - ext_len)
}

/// `l4_len`: bytes from the L4 header to the end of the IP datagram.
#[inline(always)]
fn parse_l4<P: Packet>(pkt: &P, h: &mut Headers, l4_len: usize) -> Parsed {
    h.flags = 0;
    let first = h.frag == FRAG_FIRST;
    if first && h.key.proto != PROTO_TCP && h.key.proto != PROTO_UDP {
        return Parsed::Pass(Reason::PassFragment);
    }
    // A first fragment too short for its L4 header (RFC 1858's tiny
    // fragments) is a fragment lb cannot balance, not a malformed packet.
    let short = if first {
        Reason::PassFragment
    } else {
        Reason::PassMalformed
    };
    match h.key.proto {
        PROTO_TCP => {
            let Some(tcp) = at::<P, [u8; 20]>(pkt, h.l4) else {
                return Parsed::Pass(short);
            };
            let tcp = tcp.cast::<u8>().cast_const();
            let [doff, flags] = word(tcp, 12).to_ne_bytes();
            let doff = usize::from(doff >> 4) * 4;
            if doff < 20 {
                return Parsed::Pass(Reason::PassMalformed);
            }
            if doff > l4_len {
                return Parsed::Pass(short);
            }
            h.key.src_port = u16::from_be(word(tcp, 0));
            h.key.dst_port = u16::from_be(word(tcp, 2));
            h.flags = flags;
        }
        PROTO_UDP => {
            let Some(udp) = at::<P, [u8; 8]>(pkt, h.l4) else {
                return Parsed::Pass(short);
            };
            let udp = udp.cast::<u8>().cast_const();
            // A first fragment holds the UDP header and part of the datagram
            // its length counts.
            let len = usize::from(u16::from_be(word(udp, 4)));
            if l4_len < 8 {
                return Parsed::Pass(short);
            }
            if len < 8 || (len > l4_len && !first) {
                return Parsed::Pass(Reason::PassMalformed);
            }
            h.key.src_port = u16::from_be(word(udp, 0));
            h.key.dst_port = u16::from_be(word(udp, 2));
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let v4 = h.is_v4();
            if (h.key.proto == PROTO_ICMP) != v4 {
                return Parsed::Pass(Reason::PassOtherProtocol);
            }
            let Some(icmp_type) = load::<P, u16>(pkt, h.l4) else {
                return Parsed::Pass(Reason::PassMalformed);
            };
            let [icmp_type, _] = icmp_type.to_ne_bytes();
            h.flags = icmp_type;
            return if is_icmp_error(icmp_type, v4) {
                Parsed::IcmpError
            } else {
                Parsed::Pass(Reason::PassOtherProtocol)
            };
        }
        _ => return Parsed::Pass(Reason::PassOtherProtocol),
    }
    Parsed::Flow
}

/// ICMP messages that quote a packet: destination unreachable (incl. fragmentation
/// needed / packet too big), time exceeded, parameter problem.
#[inline(always)]
fn is_icmp_error(icmp_type: u8, v4: bool) -> bool {
    if v4 {
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        matches!(icmp_type, 1..=4)
    }
}
