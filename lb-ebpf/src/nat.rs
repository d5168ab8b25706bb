//! Address and port translation of TCP and UDP packets, with incremental checksum
//! updates: the IPv4 header checksum for the addresses, the L4 checksum for the
//! addresses (pseudo-header) and the ports. A first fragment is translated as a
//! whole datagram (its L4 checksum covers the whole datagram, and an
//! incremental update stays right for it); a later fragment has only its
//! addresses rewritten ([`rewrite_addrs`]): it holds neither ports nor checksum.

use core::ptr;

use lb_common::{CtEntry, FlowKey, PROTO_UDP};

use crate::{
    csum::{self, Diff},
    mem,
    packet::{Packet, at, load, store},
    scratch::Headers,
};

/// Updates `key` to the 5-tuple a packet has after [`rewrite`] with `to`.
#[inline(always)]
pub fn translated(key: &mut FlowKey, to: &CtEntry) {
    mem::copy_addr(&mut key.src, &to.nat_src);
    mem::copy_addr(&mut key.dst, &to.nat_dst);
    key.src_port = to.nat_src_port;
    key.dst_port = to.nat_dst_port;
}

/// Offsets of the addresses in the IP header.
#[inline(always)]
pub fn addr_offsets(h: &Headers) -> (usize, usize) {
    if h.is_v4() {
        (h.l3 + 12, h.l3 + 16)
    } else {
        (h.l3 + 8, h.l3 + 24)
    }
}

/// Writes the tuple `to.nat_*` into the packet's IP and TCP/UDP headers (`h`
/// describes the packet now) and fixes the checksums.
#[inline(always)]
pub fn rewrite<P: Packet>(pkt: &mut P, h: &Headers, to: &CtEntry) -> Result<(), ()> {
    let from = &h.key;
    let addrs = rewrite_addrs(pkt, h, to)?;
    let mut ports = Diff::default();
    ports.word(from.src_port.to_be(), to.nat_src_port.to_be());
    ports.word(from.dst_port.to_be(), to.nat_dst_port.to_be());
    store(pkt, h.l4, to.nat_src_port.to_be())?;
    store(pkt, h.l4 + 2, to.nat_dst_port.to_be())?;
    pkt.update_l4_csum(h.l4_csum(), addrs, ports.folded(), from.proto == PROTO_UDP)
}

/// Writes the addresses `to.nat_*` into the IP header (`h` describes the
/// packet now) and fixes the IPv4 header checksum; returns the change of the
/// addresses, folded, for the L4 pseudo-header.
#[inline(always)]
pub fn rewrite_addrs<P: Packet>(pkt: &mut P, h: &Headers, to: &CtEntry) -> Result<u16, ()> {
    let from = &h.key;
    let mut addrs = Diff::default();
    let (src_off, dst_off) = addr_offsets(h);
    let v4 = h.is_v4();
    addrs.ip(v4, &from.src, &to.nat_src);
    addrs.ip(v4, &from.dst, &to.nat_dst);
    write_addr(pkt, v4, src_off, &to.nat_src)?;
    write_addr(pkt, v4, dst_off, &to.nat_dst)?;
    if v4 {
        let check: u16 = load(pkt, h.l3 + 10).ok_or(())?;
        store(pkt, h.l3 + 10, csum::apply(check, addrs.folded()))?;
    }
    Ok(addrs.folded())
}

/// Writes an address of either family at `off`.
#[inline(always)]
pub fn write_addr<P: Packet>(pkt: &P, v4: bool, off: usize, addr: &[u8; 16]) -> Result<(), ()> {
    if v4 {
        write_words::<P, 2>(pkt, off, addr)
    } else {
        write_words::<P, 8>(pkt, off, addr)
    }
}

/// Stores the first `N` 16-bit words of `addr` at `off`. IP headers are only
/// 2-byte aligned, and a wider or byte-array store would become byte stores or a
/// `memmove` call.
#[inline(always)]
fn write_words<P: Packet, const N: usize>(pkt: &P, off: usize, addr: &[u8; 16]) -> Result<(), ()> {
    let p = at::<P, [u16; N]>(pkt, off).ok_or(())?.cast::<u16>();
    let a = addr.as_ptr().cast::<u16>();
    for i in 0..N {
        // SAFETY: `at` checked the bounds; `addr` sits at an 8-byte offset of an
        // 8-byte-aligned map type or scratch value.
        unsafe { ptr::write_volatile(p.add(i), ptr::read(a.add(i))) };
    }
    Ok(())
}
