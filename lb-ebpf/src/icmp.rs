//! ICMP errors about translated flows (destination unreachable, fragmentation
//! needed / packet too big, time exceeded, parameter problem).
//!
//! An error quotes a packet Q that some node could not deliver. The error travels
//! to Q's sender, so it goes the way a packet in Q's reverse direction goes: the
//! conntrack entry for reverse(Q) says how such a packet is translated, and the
//! error is translated to match. Its destination becomes that entry's destination,
//! the quoted packet becomes the reverse of the entry's output (what the sender
//! actually sent), and if the error came from Q's destination itself, its source
//! is translated as well. This works in both directions: errors from the backend
//! side reach the client (path-MTU discovery towards the service), errors from the
//! client side reach the backend.

use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::{
    conntrack,
    csum::{self, Diff},
    mem,
    nat::{addr_offsets, write_addr},
    packet::{Packet, at, load, store},
    parse,
    scratch::Scratch,
    side,
};

/// The error was translated; `s.h` describes its new outer header.
pub const TRANSLATED: u32 = 0;
/// The error is not about a flow lb translated: pass it on untouched.
pub const NOT_OURS: u32 = 1;
/// Rewriting failed half way: drop.
pub const FAILED: u32 = 2;
/// The error is about a translated flow, but arrived where packets that
/// flow's entry translates cannot come from (an error about a forward packet
/// travels as its reply does; see `side`): pass it on untouched.
pub const WRONG_SIDE: u32 = 3;

/// Translates the ICMP error in `s.h`; returns [`TRANSLATED`], [`NOT_OURS`],
/// [`FAILED`] or [`WRONG_SIDE`].
#[inline(always)]
pub fn translate_error<P: Packet>(pkt: &mut P, s: &mut Scratch) -> u32 {
    if !find_quoted_flow(pkt, s) {
        return NOT_OURS;
    }
    if !side::arrived_right(pkt, s.entry.ingress) {
        return WRONG_SIDE;
    }
    match rewrite(pkt, s) {
        Ok(()) => TRANSLATED,
        Err(()) => FAILED,
    }
}

/// Parses the quoted packet into `s.quoted` and copies the conntrack entry of
/// its reverse direction into `s.entry`.
#[inline(always)]
fn find_quoted_flow<P: Packet>(pkt: &P, s: &mut Scratch) -> bool {
    let q = &mut s.quoted;
    q.l3 = s.h.l4 + 8;
    mem::zero(&mut q.key);
    q.key.family = s.h.key.family;
    if s.h.is_v4() {
        let Some(ip) = at::<P, [u8; 20]>(pkt, q.l3) else {
            return false;
        };
        let ip = ip.cast::<u8>();
        // SAFETY: `at` checked the 20 bytes.
        let (version_ihl, proto) = unsafe { (*ip, *ip.add(9)) };
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return false;
        }
        q.key.proto = proto;
        parse::addr::<4>(ip, 12, &mut q.key.src);
        parse::addr::<4>(ip, 16, &mut q.key.dst);
        q.l4 = q.l3 + ihl;
    } else {
        let Some(ip) = at::<P, [u8; 40]>(pkt, q.l3) else {
            return false;
        };
        let ip = ip.cast::<u8>();
        // SAFETY: `at` checked the 40 bytes.
        q.key.proto = unsafe { *ip.add(6) };
        parse::addr::<16>(ip, 8, &mut q.key.src);
        parse::addr::<16>(ip, 24, &mut q.key.dst);
        q.l4 = q.l3 + 40;
    }
    if q.key.proto != PROTO_TCP && q.key.proto != PROTO_UDP {
        return false;
    }
    let Some(ports) = load::<P, [u8; 4]>(pkt, q.l4) else {
        return false;
    };
    q.key.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    q.key.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    // The reverse direction, field by field (no byte-wise `memcpy`).
    mem::zero(&mut s.key);
    mem::copy_addr(&mut s.key.src, &q.key.dst);
    mem::copy_addr(&mut s.key.dst, &q.key.src);
    s.key.src_port = q.key.dst_port;
    s.key.dst_port = q.key.src_port;
    s.key.proto = q.key.proto;
    s.key.family = q.key.family;
    let Some(entry) = conntrack::lookup(&s.key) else {
        return false;
    };
    // SAFETY: copying a conntrack value out.
    unsafe { core::ptr::copy_nonoverlapping(entry, &mut s.entry, 1) };
    true
}

/// Rewrites the quoted packet and the outer header; leaves `s.h` describing the
/// outer header as it now is, for forwarding.
#[inline(always)]
fn rewrite<P: Packet>(pkt: &mut P, s: &mut Scratch) -> Result<(), ()> {
    let v4 = s.h.is_v4();
    let q = &s.quoted;
    let out = &s.entry;
    // The quoted packet becomes the reverse of what the entry makes of reverse(Q).
    // Every byte of it is covered by the ICMP checksum.
    let mut icmp = Diff::default();
    let mut addrs = Diff::default();
    addrs.ip(v4, &q.key.src, &out.nat_dst);
    addrs.ip(v4, &q.key.dst, &out.nat_src);
    let (src_off, dst_off) = addr_offsets(q);
    write_addr(pkt, v4, src_off, &out.nat_dst)?;
    write_addr(pkt, v4, dst_off, &out.nat_src)?;
    if v4 {
        let old: u16 = load(pkt, q.l3 + 10).ok_or(())?;
        let new = csum::apply(old, addrs.folded());
        store(pkt, q.l3 + 10, new)?;
        icmp.word(old, new);
    }
    let mut ports = Diff::default();
    ports.word(q.key.src_port.to_be(), out.nat_dst_port.to_be());
    ports.word(q.key.dst_port.to_be(), out.nat_src_port.to_be());
    store(pkt, q.l4, out.nat_dst_port.to_be())?;
    store(pkt, q.l4 + 2, out.nat_src_port.to_be())?;
    // The quoted L4 checksum, if the quote reaches it (UDP's always does).
    let udp = q.key.proto == PROTO_UDP;
    if let Some(old) = load::<P, u16>(pkt, q.l4_csum()) {
        if !(udp && old == 0) {
            let mut both = addrs;
            both.add(ports);
            let mut new = csum::apply(old, both.folded());
            if udp && new == 0 {
                new = 0xffff;
            }
            store(pkt, q.l4_csum(), new)?;
            icmp.word(old, new);
        }
    }
    icmp.add(addrs);
    icmp.add(ports);

    // The outer header: to the sender of the quoted packet, and from the frontend
    // (or SNAT address) if the error came from the quoted packet's destination.
    let h = &mut s.h;
    let mut outer = Diff::default();
    let new_src = if h.key.src == q.key.dst {
        out.nat_src
    } else {
        h.key.src
    };
    outer.ip(v4, &h.key.src, &new_src);
    outer.ip(v4, &h.key.dst, &out.nat_dst);
    h.key.src = new_src;
    h.key.dst = out.nat_dst;
    let (src_off, dst_off) = addr_offsets(h);
    write_addr(pkt, v4, src_off, &h.key.src)?;
    write_addr(pkt, v4, dst_off, &h.key.dst)?;
    if v4 {
        let old: u16 = load(pkt, h.l3 + 10).ok_or(())?;
        store(pkt, h.l3 + 10, csum::apply(old, outer.folded()))?;
    }
    // ICMPv6's checksum covers a pseudo-header with the outer addresses; ICMPv4's does not.
    let pseudo = if v4 { 0 } else { outer.folded() };
    pkt.update_l4_csum(h.l4 + 2, pseudo, icmp.folded(), false)
}
