//! Answering a client instead of forwarding its packet, from the address it sent
//! to:
//! - a connection to a service that exists but has no usable backend is
//!   refused the way a host without a listener would: TCP RST, or ICMP / ICMPv6
//!   port unreachable for UDP;
//! - a packet too big for the interface its backend is reached by (an overlay
//!   tunnel's lower MTU) gets ICMP fragmentation needed / ICMPv6 packet too big,
//!   so the client's path-MTU discovery lowers its segment size, as a router's
//!   error would make it (the kernel's own error would quote the translated
//!   packet, which the client cannot match to its socket).
//!
//! The packet is rewritten in place into the answer and sent back out of the
//! interface it came in on, so the client learns at once instead of timing out.

use lb_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, Reason};

use crate::{
    csum,
    packet::{Action, Packet, load, store},
    scratch::{Headers, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const TTL: u8 = 64;
/// Bytes of the refused datagram an ICMP error quotes at most: its IP header (with
/// IPv4 options or IPv6 extension headers) and the first 8 bytes of UDP.
const MAX_QUOTE: usize = 112;

#[inline(always)]
pub fn refuse<P: Packet>(pkt: &mut P, h: &Headers) -> (Action, Reason) {
    let (built, reason) = if h.key.proto == PROTO_TCP {
        if h.flags & TCP_RST != 0 {
            // Never answer a RST.
            return (Action::Drop, Reason::RejectTcpReset);
        }
        (tcp_reset(pkt, h), Reason::RejectTcpReset)
    } else {
        let message = if h.is_v4() {
            [3u8, 3, 0, 0, 0, 0, 0, 0]
        } else {
            [1u8, 4, 0, 0, 0, 0, 0, 0]
        };
        (icmp_error(pkt, h, message), Reason::RejectIcmpUnreachable)
    };
    bounce(built, reason)
}

/// Answers a packet too big for the next hop's `mtu` with ICMP fragmentation
/// needed (IPv4) / ICMPv6 packet too big, quoting it.
#[inline(always)]
pub fn too_big<P: Packet>(pkt: &mut P, h: &Headers, mtu: u16) -> (Action, Reason) {
    let message = if h.is_v4() {
        let m = mtu.to_be_bytes();
        [3u8, 4, 0, 0, 0, 0, m[0], m[1]]
    } else {
        // RFC 8200: every IPv6 link carries 1280 bytes.
        let m = u32::from(if mtu < 1280 { 1280 } else { mtu }).to_be_bytes();
        [2u8, 0, 0, 0, m[0], m[1], m[2], m[3]]
    };
    bounce(icmp_error(pkt, h, message), Reason::IcmpTooBig)
}

#[inline(always)]
fn bounce(built: Result<(), ()>, reason: Reason) -> (Action, Reason) {
    match built {
        Ok(()) => (Action::Bounce, reason),
        Err(()) => (Action::Drop, Reason::DropRewriteFailed),
    }
}

#[inline(always)]
fn swap_macs<P: Packet>(pkt: &P) -> Result<(), ()> {
    let m: [u8; 12] = load(pkt, 0).ok_or(())?;
    store(
        pkt,
        0,
        [
            m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5],
        ],
    )
}

/// Writes a fresh IP header (20 bytes IPv4 / 40 IPv6) at `h.l3`, from the refused
/// packet's destination back to its source. Returns its length.
#[inline(always)]
fn write_ip_header<P: Packet>(pkt: &P, h: &Headers, proto: u8, payload: u16) -> Result<usize, ()> {
    let (src, dst) = (&h.key.dst, &h.key.src);
    if h.is_v4() {
        let len = (20 + payload).to_be_bytes();
        let mut ip = [
            0x45, 0, len[0], len[1], 0, 0, 0x40, 0, TTL, proto, 0, 0, src[0], src[1], src[2],
            src[3], dst[0], dst[1], dst[2], dst[3],
        ];
        let check = !csum::fold(csum::sum(&ip));
        ip[10..12].copy_from_slice(&check.to_ne_bytes());
        store(pkt, h.l3, ip)?;
        Ok(20)
    } else {
        let len = payload.to_be_bytes();
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4] = len[0];
        ip[5] = len[1];
        ip[6] = proto;
        ip[7] = TTL;
        ip[8..24].copy_from_slice(src);
        ip[24..40].copy_from_slice(dst);
        store(pkt, h.l3, ip)?;
        Ok(40)
    }
}

#[inline(always)]
fn tcp_reset<P: Packet>(pkt: &mut P, h: &Headers) -> Result<(), ()> {
    let v4 = h.is_v4();
    let tcp: [u8; 20] = load(pkt, h.l4).ok_or(())?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    let segment_len = h.ip_len - (h.l4 - h.l3) as u16;
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence number;
    // anything else with an ACK of everything it occupied in sequence space.
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let data = u32::from(segment_len) - u32::from(tcp[12] >> 4) * 4;
        let occupied = data + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    // From a local pod the checksum may be CHECKSUM_PARTIAL: the field then holds
    // the folded pseudo-header sum, and the kernel completes it on the way out. A
    // complete checksum equals that only by a 1-in-65536 coincidence.
    let partial = P::PARTIAL_CSUM && {
        let check: u16 = load(pkt, h.l4 + 16).ok_or(())?;
        check
            == csum::fold(csum::pseudo(
                v4,
                &h.key.src,
                &h.key.dst,
                PROTO_TCP,
                segment_len,
            ))
    };
    let s = h.key.dst_port.to_be_bytes();
    let d = h.key.src_port.to_be_bytes();
    let q = rst_seq.to_be_bytes();
    let a = rst_ack.to_be_bytes();
    let mut rst = [
        s[0],
        s[1],
        d[0],
        d[1],
        q[0],
        q[1],
        q[2],
        q[3],
        a[0],
        a[1],
        a[2],
        a[3],
        5 << 4,
        rst_flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let pseudo = csum::pseudo(v4, &h.key.dst, &h.key.src, PROTO_TCP, 20);
    let check = if partial {
        csum::fold(pseudo)
    } else {
        !csum::fold(pseudo + csum::sum(&rst))
    };
    rst[16..18].copy_from_slice(&check.to_ne_bytes());
    let ip_len = write_ip_header(pkt, h, PROTO_TCP, 20)?;
    store(pkt, h.l3 + ip_len, rst)?;
    swap_macs(pkt)?;
    pkt.truncate((h.l3 + ip_len + 20) as u32)
}

/// Rewrites the packet into the ICMP / ICMPv6 error `message` (type, code,
/// checksum placeholder, the 4 type-specific bytes) quoting its IP header and
/// the first 8 bytes of L4.
#[inline(always)]
fn icmp_error<P: Packet>(pkt: &mut P, h: &Headers, message: [u8; 8]) -> Result<(), ()> {
    let v4 = h.is_v4();
    let quote = h.l4 - h.l3 + 8;
    if quote > MAX_QUOTE {
        return Err(());
    }
    let (ip_len, proto) = if v4 {
        (20, PROTO_ICMP)
    } else {
        (40, PROTO_ICMPV6)
    };
    let icmp = h.l3 + ip_len;
    let icmp_len = (8 + quote) as u16;
    // Cut the packet after what becomes the quote (first: for a GSO packet the
    // kernel then drops its offload state), then make room for the new IP and
    // ICMP headers in front of it.
    pkt.truncate((h.l3 + quote) as u32)?;
    pkt.grow_after_l2(h.l3, (ip_len + 8) as u32)?;
    write_ip_header(pkt, h, proto, icmp_len)?;
    let mut sum = csum::sum(&message);
    if !v4 {
        sum += csum::pseudo(false, &h.key.dst, &h.key.src, PROTO_ICMPV6, icmp_len);
    }
    for i in 0..MAX_QUOTE / 2 {
        if 2 * i >= quote {
            break;
        }
        let word: u16 = load(pkt, icmp + 8 + 2 * i).ok_or(())?;
        sum += u64::from(word);
    }
    let check = (!csum::fold(sum)).to_ne_bytes();
    store(
        pkt,
        icmp,
        [
            message[0], message[1], check[0], check[1], message[4], message[5], message[6],
            message[7],
        ],
    )?;
    swap_macs(pkt)
}
