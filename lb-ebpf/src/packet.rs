//! One packet API over the two hooks the datapath runs in.
//!
//! - XDP on uplinks: packets from a NIC carry complete checksums, so checksums are
//!   updated in place, and forwarding is XDP_TX or a devmap redirect.
//! - tc ingress on the host side of pod veths: packets from local pods may be
//!   CHECKSUM_PARTIAL (veth offloads on), where only the kernel knows how the
//!   checksum field is to be read, so L4 checksums go through `bpf_l4_csum_replace`.
//!
//! The balancing logic above this module is written once, generic over [`Packet`].

use core::{
    arch::asm,
    ffi::c_void,
    mem::{offset_of, size_of},
    ptr,
};

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_fib_lookup, xdp_md,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup_helper, bpf_l4_csum_replace, bpf_skb_adjust_room,
        bpf_skb_change_tail, bpf_skb_pull_data, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len,
    },
};

use lb_common::Reason;

use crate::{csum, maps::TX_PORTS};

/// Reads the 32-bit context field at `OFF` (packet pointers: `data`, `data_end`).
///
/// Inline assembly, because the verifier accepts only `*(u32 *)(ctx + constant)`
/// for these fields and rewrites each such load into a pointer load. Plain or
/// volatile Rust reads leave LLVM free to compute `ctx + OFF` once into a register
/// and load through it ("dereference of modified ctx ptr"), or to hoist the loads
/// into a caller and pass the pointers as 32-bit values; both are rejected, and
/// which one LLVM picks changes with unrelated code. The asm block is opaque and
/// not `pure`, so it is emitted exactly here, with the offset as an immediate.
#[inline(always)]
fn ctx_u32<const OFF: usize>(ctx: *const c_void) -> usize {
    let v: u64;
    // SAFETY: `ctx` is the context the kernel passed in, and OFF a field of it.
    unsafe {
        asm!(
            "{v} = *(u32 *)({ctx} + {off})",
            v = out(reg) v,
            ctx = in(reg) ctx,
            off = const OFF,
            options(nostack, readonly, preserves_flags),
        );
    }
    // The load zero-extends; a `u32` here would make LLVM clear the upper half
    // with shifts, which the verifier refuses on packet pointers.
    v as usize
}

/// What to do with the packet once the datapath is done with it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    /// Hand it to the kernel stack.
    Pass,
    /// Drop it (always counted under a drop reason first).
    Drop,
    /// Send it back out of the interface it arrived on.
    Bounce,
    /// Send it out of another interface (MACs already rewritten).
    Redirect(u32),
    /// Send it out of an interface whose next hop the kernel must resolve (tc only).
    RedirectNeigh(u32),
}

/// An [`Action`] and the [`Reason`] it is counted under.
pub type Outcome = (Action, Reason);

/// Packs an outcome into one register, for returning from an outlined (BPF-to-BPF)
/// function: the BPF calling convention returns a single 64-bit value.
#[inline(always)]
pub fn pack((action, reason): Outcome) -> u64 {
    let (kind, ifindex) = match action {
        Action::Pass => (0u64, 0),
        Action::Drop => (1, 0),
        Action::Bounce => (2, 0),
        Action::Redirect(i) => (3, i),
        Action::RedirectNeigh(i) => (4, i),
    };
    ((reason as u64) << 40) | (kind << 32) | u64::from(ifindex)
}

#[inline(always)]
pub fn unpack(raw: u64) -> Outcome {
    let ifindex = raw as u32;
    let action = match (raw >> 32) & 0xff {
        1 => Action::Drop,
        2 => Action::Bounce,
        3 => Action::Redirect(ifindex),
        4 => Action::RedirectNeigh(ifindex),
        _ => Action::Pass,
    };
    let reason = Reason::from_index((raw >> 40) as u32).unwrap_or(Reason::PassMalformed);
    (action, reason)
}

/// A packet in one of the hooks. Implementors are a single context pointer and
/// `Copy`, so outlined functions take them by value, in a register.
pub trait Packet: Copy {
    /// Whether L4 checksums may be CHECKSUM_PARTIAL (see the module docs).
    const PARTIAL_CSUM: bool;
    /// Whether the hook can redirect to a next hop the kernel still has to resolve.
    const RESOLVES_NEIGHBOURS: bool;
    /// Whether `bpf_fib_lookup` is to check the MTU against the packet itself
    /// (tc: a GSO packet is as long as the segments it stands for, which the
    /// kernel knows) rather than against the IP length given.
    const FIB_CHECKS_SKB: bool;
    /// Whether the hook runs on uplinks only (XDP), so that every packet it
    /// sees came from the network (see `side`).
    const UPLINKS_ONLY: bool;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ctx(&self) -> *mut c_void;
    fn ingress_ifindex(&self) -> u32;

    /// Adds `pseudo` (a change of pseudo-header fields) and `data` (a change of
    /// bytes the checksum covers directly) to the L4 checksum at `off`.
    /// `udp`: a zero checksum means "none" and must stay zero.
    fn update_l4_csum(&mut self, off: usize, pseudo: u16, data: u16, udp: bool) -> Result<(), ()>;

    /// Whether the packet can be redirected to `ifindex` from this hook.
    fn can_redirect(&self, ifindex: u32) -> bool;

    /// Inserts `len` bytes between the link-layer header (`l2_len` bytes: Ethernet
    /// and any VLAN tags) and the IP header.
    fn grow_after_l2(&mut self, l2_len: usize, len: u32) -> Result<(), ()>;

    /// Cuts the packet to `len` bytes.
    fn truncate(&mut self, len: u32) -> Result<(), ()>;

    /// Packet length in the linear (directly accessible) area.
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    /// Whole packet length, including any part not directly accessible.
    fn total_len(&self) -> u32;

    /// `bpf_fib_lookup` for this packet's context.
    #[inline(always)]
    fn fib_lookup(&self, params: &mut bpf_fib_lookup, flags: u32) -> i64 {
        // SAFETY: params is a valid, writable bpf_fib_lookup.
        unsafe {
            fib_lookup_helper(
                self.ctx(),
                ptr::from_mut(params),
                size_of::<bpf_fib_lookup>() as i32,
                flags,
            )
        }
    }
}

/// Header offsets are far below this. Offsets kept in the scratch map come back
/// from memory without bounds the verifier knows, and it needs bounds before an
/// offset is added to a packet pointer: masking gives them, where a comparison
/// would be rewritten by LLVM into shapes the verifier cannot follow.
const OFFSET_MASK: usize = 0x3fff;

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
/// (Accesses are at least 2 bytes wide: for a 1-byte access LLVM turns the bounds
/// check `p + 1 > end` into `p >= end`, which gives the verifier no range.)
#[inline(always)]
pub fn at<P: Packet, T>(pkt: &P, off: usize) -> Option<*mut T> {
    const {
        assert!(
            size_of::<T>() >= 2,
            "packet accesses must be at least 2 bytes"
        )
    };
    let start = pkt.data() + (off & OFFSET_MASK);
    if start + size_of::<T>() > pkt.data_end() {
        return None;
    }
    Some(start as *mut T)
}

/// Reads a `T` at `off`.
#[inline(always)]
pub fn load<P: Packet, T: Copy>(pkt: &P, off: usize) -> Option<T> {
    // SAFETY: `at` checked the bounds; packet data is 2-byte aligned and every T
    // read here is a byte array or a 16-bit word at an even offset.
    at::<P, T>(pkt, off).map(|p| unsafe { ptr::read(p) })
}

/// Writes a `T` at `off`.
#[inline(always)]
pub fn store<P: Packet, T: Copy>(pkt: &P, off: usize, v: T) -> Result<(), ()> {
    let p = at::<P, T>(pkt, off).ok_or(())?;
    // SAFETY: as in `load`.
    unsafe { ptr::write(p, v) };
    Ok(())
}

#[derive(Clone, Copy)]
pub struct Xdp(pub *mut xdp_md);

impl Packet for Xdp {
    const PARTIAL_CSUM: bool = false;
    const RESOLVES_NEIGHBOURS: bool = false;
    const FIB_CHECKS_SKB: bool = false;
    const UPLINKS_ONLY: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        ctx_u32::<{ offset_of!(xdp_md, data) }>(self.0.cast())
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        ctx_u32::<{ offset_of!(xdp_md, data_end) }>(self.0.cast())
    }
    #[inline(always)]
    fn ctx(&self) -> *mut c_void {
        self.0.cast()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.0).ingress_ifindex }
    }

    /// With jumbo frames a packet may span several buffers (the program is
    /// frags-aware); headers are always in the first, the one `data` points to.
    #[inline(always)]
    fn total_len(&self) -> u32 {
        // SAFETY: plain helper call on our context.
        unsafe { bpf_xdp_get_buff_len(self.0) as u32 }
    }

    #[inline(always)]
    fn update_l4_csum(&mut self, off: usize, pseudo: u16, data: u16, udp: bool) -> Result<(), ()> {
        let check: u16 = load(self, off).ok_or(())?;
        if udp && check == 0 {
            return Ok(());
        }
        let mut new = csum::apply(check, csum::fold(u64::from(pseudo) + u64::from(data)));
        if udp && new == 0 {
            new = 0xffff;
        }
        store(self, off, new)
    }

    #[inline(always)]
    fn can_redirect(&self, ifindex: u32) -> bool {
        TX_PORTS.get_ifindex(ifindex).is_some()
    }

    #[inline(always)]
    fn grow_after_l2(&mut self, l2_len: usize, len: u32) -> Result<(), ()> {
        // SAFETY: plain helper call on our context.
        if unsafe { bpf_xdp_adjust_head(self.0, -(len as i32)) } != 0 {
            return Err(());
        }
        // Move the link-layer header to the new front: Ethernet, then each VLAN tag.
        let len = len as usize;
        let eth: [u8; 14] = load(self, len).ok_or(())?;
        store(self, 0, eth)?;
        let mut off = 14;
        while off < l2_len && off < 22 {
            let tag: [u8; 4] = load(self, len + off).ok_or(())?;
            store(self, off, tag)?;
            off += 4;
        }
        Ok(())
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<(), ()> {
        // Shrinks fragments first, then the first buffer.
        let delta = len as i32 - self.total_len() as i32;
        // SAFETY: plain helper call on our context.
        if delta > 0 || unsafe { bpf_xdp_adjust_tail(self.0, delta) } != 0 {
            return Err(());
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
pub struct Tc(pub *mut __sk_buff);

impl Tc {
    /// Makes at least the first `len` bytes (or the whole packet) directly readable.
    #[inline(always)]
    pub fn pull_headers(&mut self, len: u32) {
        let total = self.total_len();
        let want = if total < len { total } else { len };
        if self.len() < want {
            // SAFETY: plain helper call on our context. On failure the parser
            // simply finds the packet short and passes it.
            unsafe { bpf_skb_pull_data(self.0, want) };
        }
    }
}

impl Packet for Tc {
    const PARTIAL_CSUM: bool = true;
    const RESOLVES_NEIGHBOURS: bool = true;
    const FIB_CHECKS_SKB: bool = true;
    const UPLINKS_ONLY: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        ctx_u32::<{ offset_of!(__sk_buff, data) }>(self.0.cast())
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        ctx_u32::<{ offset_of!(__sk_buff, data_end) }>(self.0.cast())
    }
    #[inline(always)]
    fn ctx(&self) -> *mut c_void {
        self.0.cast()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.0).ifindex }
    }

    #[inline(always)]
    fn total_len(&self) -> u32 {
        unsafe { (*self.0).len }
    }

    #[inline(always)]
    fn update_l4_csum(&mut self, off: usize, pseudo: u16, data: u16, udp: bool) -> Result<(), ()> {
        let mangled = if udp {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let skb = self.0;
        // "By diff" mode (size 0 in the low flag bits): the kernel adds the diff,
        // and for CHECKSUM_PARTIAL packets applies only pseudo-header changes,
        // because the rest is summed when the checksum is completed.
        // SAFETY: plain helper calls on our context.
        unsafe {
            if pseudo != 0
                && bpf_l4_csum_replace(
                    skb,
                    off as u32,
                    0,
                    u64::from(pseudo),
                    u64::from(BPF_F_PSEUDO_HDR) | mangled,
                ) != 0
            {
                return Err(());
            }
            if data != 0 && bpf_l4_csum_replace(skb, off as u32, 0, u64::from(data), mangled) != 0 {
                return Err(());
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn can_redirect(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn grow_after_l2(&mut self, _l2_len: usize, len: u32) -> Result<(), ()> {
        // The kernel inserts after the skb's MAC header, VLAN tags included.
        // SAFETY: plain helper call on our context.
        match unsafe { bpf_skb_adjust_room(self.0, len as i32, BPF_ADJ_ROOM_MAC, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<(), ()> {
        // SAFETY: plain helper call on our context.
        match unsafe { bpf_skb_change_tail(self.0, len, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
}
