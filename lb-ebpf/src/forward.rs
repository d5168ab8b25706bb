//! Forwarding a packet to the tuple it leaves with: `bpf_fib_lookup` for the
//! next hop, then TTL decrement, MAC rewrite and a redirect. It runs before the
//! NAT rewrite (both are incremental, so the order does not matter for the
//! checksums), so that XDP can still hand the packet on untouched:
//!
//! - XDP sends only where it can: back out of the uplink (XDP_TX) or to
//!   another uplink (`tx_ports`). A next hop the kernel has yet to resolve, or
//!   an egress XDP cannot send on (a tunnel device, a pod veth, a second NIC),
//!   is left to the tc program on the same interface: the packet goes up
//!   untranslated (`pass_to_tc`), tc finds its conntrack entry and finishes it.
//!   Handing the kernel a translated packet instead loses it whenever its
//!   source is the node's own address (source NAT): the input path drops it
//!   as a martian before the neighbour is ever resolved.
//! - tc redirects to any interface, with `bpf_redirect_neigh` when the
//!   neighbour is unresolved (the kernel resolves it and sends the packet).
//!
//! A packet too big for the egress (an overlay tunnel's lower MTU) that must
//! not be fragmented is answered with an ICMP error by the caller
//! (`icmp_too_big`, see `reject::too_big`); what else neither hook can settle
//! (local delivery, no route, a TTL about to expire, a VLAN-tagged frame, an
//! IPv4 packet the kernel may fragment) goes to the kernel translated, to be
//! routed like any other packet.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    bpf_fib_lookup,
};
use lb_common::{FlowKey, Reason};

use crate::{
    csum, mem,
    packet::{Action, Outcome, Packet, load, store},
    parse::ETH_HLEN,
    scratch::Headers,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Forwards the packet whose headers are at `h`'s offsets to the tuple `k` (what
/// it has after translation); `fib` is room for the lookup. A `pass_to_tc`
/// outcome has left the packet untouched; so has `icmp_too_big`, which the
/// caller answers (the next hop's MTU is in `fib.mtu_result`). `egress` gets
/// the interface the route leaves by, whether or not this hook sends the
/// packet there itself, or 0 where the lookup did not name one.
#[inline(always)]
pub fn forward<P: Packet>(
    pkt: &mut P,
    h: &Headers,
    k: &FlowKey,
    fib: &mut bpf_fib_lookup,
    egress: &mut u32,
) -> Outcome {
    *egress = 0;
    // VLAN-tagged: the FIB of the physical port is not the VLAN's; the kernel,
    // which knows the VLAN device, routes it.
    if h.l3 != ETH_HLEN {
        return (Action::Pass, Reason::PassToKernel);
    }
    mem::zero(fib);
    fib.l4_protocol = k.proto;
    fib.sport = k.src_port.to_be();
    fib.dport = k.dst_port.to_be();
    // 0 asks the kernel to check the skb against the egress MTU: a GSO
    // packet (tens of kilobytes from a veth with offloads on) passes when its
    // segments fit, where its IP length would fail as "fragmentation needed".
    fib.__bindgen_anon_1.tot_len = if P::FIB_CHECKS_SKB { 0 } else { h.ip_len };
    fib.ifindex = pkt.ingress_ifindex();
    if k.family == lb_common::FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = words(&k.src)[0];
        fib.__bindgen_anon_4.ipv4_dst = words(&k.dst)[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&k.src);
        fib.__bindgen_anon_4.ipv6_dst = words(&k.dst);
    }
    let rc = pkt.fib_lookup(fib, 0);
    // Only these two results set the egress (the others return before it).
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        *egress = fib.ifindex;
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return if P::RESOLVES_NEIGHBOURS {
            (Action::RedirectNeigh(fib.ifindex), Reason::RedirectNeigh)
        } else {
            (Action::Pass, Reason::PassToTc)
        };
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) && !may_fragment(pkt, h) {
        return (Action::Drop, Reason::IcmpTooBig);
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return (Action::Pass, Reason::PassToKernel);
    }
    let out = fib.ifindex;
    let bounce = out == pkt.ingress_ifindex();
    if !bounce && !pkt.can_redirect(out) {
        return (Action::Pass, Reason::PassToTc);
    }
    if decrement_ttl(pkt, h).is_err() {
        return (Action::Pass, Reason::PassToKernel);
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    if store(pkt, 0, macs).is_err() {
        return (Action::Pass, Reason::PassToKernel);
    }
    if bounce {
        (Action::Bounce, Reason::Tx)
    } else {
        (Action::Redirect(out), Reason::Redirect)
    }
}

/// Whether a router may fragment the packet: IPv4 without Don't Fragment.
#[inline(always)]
fn may_fragment<P: Packet>(pkt: &P, h: &Headers) -> bool {
    h.is_v4() && load::<P, [u8; 2]>(pkt, h.l3 + 6).is_some_and(|frag| frag[0] & 0x40 == 0)
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Decrements the TTL / hop limit as a router must. Err when it would reach zero:
/// the kernel then sends the ICMP time-exceeded.
#[inline(always)]
fn decrement_ttl<P: Packet>(pkt: &mut P, h: &Headers) -> Result<(), ()> {
    if h.is_v4() {
        // TTL shares a checksum word with the protocol byte.
        let word: [u8; 2] = load(pkt, h.l3 + 8).ok_or(())?;
        if word[0] <= 1 {
            return Err(());
        }
        let new = [word[0] - 1, word[1]];
        let check: u16 = load(pkt, h.l3 + 10).ok_or(())?;
        let mut diff = csum::Diff::default();
        diff.word(u16::from_ne_bytes(word), u16::from_ne_bytes(new));
        store(pkt, h.l3 + 8, new)?;
        store(pkt, h.l3 + 10, csum::apply(check, diff.folded()))
    } else {
        // Next header and hop limit (no checksum covers them).
        let word: [u8; 2] = load(pkt, h.l3 + 6).ok_or(())?;
        if word[1] <= 1 {
            return Err(());
        }
        store(pkt, h.l3 + 6, [word[0], word[1] - 1])
    }
}
