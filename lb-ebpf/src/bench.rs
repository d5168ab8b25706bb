//! XDP programs for lb's benchmarks (`cargo xtask bench`, the `lb-bench` crate);
//! not part of the datapath the agent loads.
//!
//! - `bench_floor`: swaps the Ethernet addresses and returns XDP_TX: the cheapest
//!   program that still touches the packet, the unit per-packet costs are given in.
//! - `bench_nop`: returns XDP_TX at once: the tail-call target that measures
//!   `bench_wrap`'s own cost.
//! - `bench_wrap`: BPF_PROG_TEST_RUN with `repeat` reruns a program on the frame
//!   its previous iteration rewrote, so a NAT program would see its own output.
//!   This wrapper first restores the frame from `bench_tmpl` (optionally giving
//!   every iteration a flow of its own, from a per-CPU counter, checksums fixed),
//!   then tail-calls `bench_jmp[0]` (lb's `lb_xdp`). It returns XDP_ABORTED only
//!   when it cannot do that, which the harness treats as an error.
//! - `bench_gen`: the same restore and flow variation, then XDP_TX: with
//!   BPF_F_TEST_XDP_LIVE_FRAMES it is a packet generator (live frames are
//!   recycled pages that may come back rewritten, hence the full restore).
//! - `bench_fwd`: a minimal IPv4 forwarder without NAT: parse, `bpf_fib_lookup`,
//!   TTL decrement, MAC rewrite, devmap redirect; the reference lb is compared to.
//! - `bench_lru`: inserts one new key into an LRU hash with conntrack's key,
//!   value and size, then XDP_TX: the kernel's own cost for what a new flow does
//!   twice (forward and reply entry), shown next to lb's new-flow cost.
//! - `bench_lru_nc`, `bench_lru16`: the same insert into a table with per-CPU
//!   LRU lists (`BPF_F_NO_COMMON_LRU`), and into one with a 16-byte IPv4 key
//!   and a 40-byte value; `bench_hit40`, `bench_hit16`: a lookup that hits,
//!   with either key. The shapes conntrack could take, measured side by side
//!   (the bench's `ct_maps` part).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    btf_maps::{Array, DevMapHash, LruHashMap, PerCpuArray, ProgramArray},
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_get_smp_processor_id},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    CtEntry, FlowKey,
    bench_keys::{
        CtEntry4, FlowKey4, HIT_KEYS, SLOT_HITS, SLOT_LRU, SLOT_LRU_NC, SLOT_LRU16, key16, key40,
    },
    capacity,
};

/// Largest frame the template holds.
const TMPL_BYTES: usize = 128;

/// Value of `bench_tmpl` (index 0): the frame every run starts from.
#[repr(C)]
pub struct Template {
    /// Frame length: a multiple of 4, at most 128; the frames the program runs
    /// on must have exactly this length (the harness makes sure of it).
    pub len: u32,
    /// 0: restore only. 1: vary the IPv4 source (port, then the low 16 bits
    /// of the address) by a per-CPU counter, fixing the checksums. 2: vary
    /// the source address alone (its low 16 bits, then its high 16 bits): a
    /// client address of its own for every packet.
    pub vary: u32,
    /// With `vary`: distinct flows to cycle through; 0: never repeat (the
    /// counter itself, so up to 2^32 distinct sources).
    pub flows: u32,
    pub _pad: u32,
    pub data: [u8; TMPL_BYTES],
}

#[btf_map(name = "bench_tmpl")]
static TMPL: Array<Template, 1> = Array::new();

/// Index 0: packets `bench_wrap` / `bench_gen` varied (the per-packet flow
/// counter); the others: `lb_common::bench_keys::SLOT_*`.
#[btf_map(name = "bench_cnt")]
static COUNTER: PerCpuArray<u64, 5> = PerCpuArray::new();

/// `bench_lru`'s table: conntrack's key, value, size and flags.
#[btf_map(name = "bench_lru_tbl")]
static LRU: LruHashMap<FlowKey, CtEntry, { capacity::CONNTRACK as usize }> = LruHashMap::new();

/// `bench_lru_nc`'s table: the same with an LRU list per CPU.
#[btf_map(name = "bench_lru_nc_tbl")]
static LRU_NC: LruHashMap<
    FlowKey,
    CtEntry,
    { capacity::CONNTRACK as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// `bench_lru16`'s table: conntrack's size with the IPv4 key and value.
#[btf_map(name = "bench_lru16_tbl")]
static LRU16: LruHashMap<FlowKey4, CtEntry4, { capacity::CONNTRACK as usize }> = LruHashMap::new();

/// `bench_hit40`'s table: conntrack's shape, filled by the harness.
#[btf_map(name = "bench_hit40_tbl")]
static HIT40: LruHashMap<FlowKey, CtEntry, { capacity::CONNTRACK as usize }> = LruHashMap::new();

/// `bench_hit16`'s table: the IPv4 shape, filled by the harness.
#[btf_map(name = "bench_hit16_tbl")]
static HIT16: LruHashMap<FlowKey4, CtEntry4, { capacity::CONNTRACK as usize }> = LruHashMap::new();

/// Index 0: the program `bench_wrap` tail-calls.
#[btf_map(name = "bench_jmp")]
static JMP: ProgramArray<4> = ProgramArray::new();

/// Interfaces `bench_fwd` may redirect to.
#[btf_map(name = "bench_ports")]
static PORTS: DevMapHash<64> = DevMapHash::new();

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let p = data as *mut [u16; 6];
    // SAFETY: 12 bytes checked above; packet data is 2-byte aligned.
    unsafe {
        let m = ptr::read(p);
        ptr::write(p, [m[3], m[4], m[5], m[0], m[1], m[2]]);
    }
    xdp_action::XDP_TX
}

// Frags-aware like `lb_xdp`: programs sharing a tail-call array must agree.
#[xdp(frags)]
pub fn bench_nop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp(frags)]
pub fn bench_wrap(ctx: XdpContext) -> u32 {
    if prepare(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: tail call on our own context; returns only on failure.
    unsafe { JMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    match prepare(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
}

/// Restores the frame and applies the flow variation.
#[inline(always)]
fn prepare(ctx: &XdpContext) -> Option<()> {
    let t = TMPL.get_ptr(0)?;
    let data = ctx.data();
    let end = ctx.data_end();
    // SAFETY: `t` points at the map value; reads of plain integers.
    let (len, vary, flows) = unsafe { ((*t).len as usize, (*t).vary, (*t).flows) };
    // The harness gives the program frames of exactly `len` bytes. (Checking
    // `data + len == end` here would let LLVM drop the per-word packet bounds
    // checks below, which the verifier needs to see.)
    // SAFETY: every packet store is bounds-checked against `end`; template
    // reads stay inside the 128-byte array (offsets below 128).
    unsafe {
        let src = (&raw const (*t).data).cast::<u8>();
        let mut off = 0usize;
        while off < TMPL_BYTES {
            let p = data + off;
            if off + 8 > len || p + 8 > end {
                break;
            }
            ptr::write(p as *mut u64, ptr::read(src.add(off).cast::<u64>()));
            off += 8;
        }
        let p = data + off;
        if off + 4 <= len && off < TMPL_BYTES && p + 4 <= end {
            ptr::write(p as *mut u32, ptr::read(src.add(off).cast::<u32>()));
        }
    }
    if vary != 0 {
        vary_source(data, end, flows, vary)?;
    }
    Some(())
}

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// `!old + new` of one 16-bit word (ones'-complement difference).
#[inline(always)]
fn diff(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

#[inline(always)]
fn apply(check: u16, d: u64) -> u16 {
    !fold(u64::from(!check) + d)
}

/// Gives this packet flow `counter % flows` (or `counter`): adds it to the
/// source port (`mode` 1) or the low half of the source address (`mode` 2),
/// and its upper 16 bits to the low (1) or high (2) half of the address.
/// IPv4 without options, TCP or UDP, Ethernet without tags.
#[inline(always)]
fn vary_source(data: usize, end: usize, flows: u32, mode: u32) -> Option<()> {
    let c = COUNTER.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    let n = unsafe {
        let n = *c;
        *c = n + 1;
        n
    };
    let idx = if flows != 0 {
        (n % u64::from(flows)) as u32
    } else {
        n as u32
    };
    // Ethernet 14 + IPv4 20, then ports; the TCP checksum ends at 52.
    if data + 54 > end {
        return None;
    }
    // SAFETY: all accesses below are inside the 54 bytes checked above, at even
    // offsets (packet data is 2-byte aligned).
    unsafe {
        if ptr::read((data + 12) as *const u16) != ETH_P_IP_BE {
            return None;
        }
        let ttl_proto = ptr::read((data + 22) as *const [u8; 2]);
        let csum_off = match ttl_proto[1] {
            PROTO_TCP => 50,
            PROTO_UDP => 40,
            _ => return None,
        };
        // `lo` takes the counter's low 16 bits, `hi` its upper 16 bits.
        let (lo_off, hi_off) = if mode == 2 { (28, 26) } else { (34, 28) };
        let lo_p = (data + lo_off) as *mut u16;
        let old_lo = ptr::read(lo_p);
        let new_lo = u16::from_be(old_lo).wrapping_add(idx as u16).to_be();
        let hi_p = (data + hi_off) as *mut u16;
        let old_hi = ptr::read(hi_p);
        let new_hi = u16::from_be(old_hi)
            .wrapping_add((idx >> 16) as u16)
            .to_be();
        ptr::write(lo_p, new_lo);
        ptr::write(hi_p, new_hi);
        // The IPv4 header checksum covers the address words; the L4 one
        // covers both (the address through the pseudo-header).
        let l4_d = diff(old_lo, new_lo) + diff(old_hi, new_hi);
        let ip_d = if mode == 2 {
            l4_d
        } else {
            diff(old_hi, new_hi)
        };
        let ip_check_p = (data + 24) as *mut u16;
        ptr::write(ip_check_p, apply(ptr::read(ip_check_p), ip_d));
        let l4_check_p = (data + csum_off) as *mut u16;
        let check = ptr::read(l4_check_p);
        if csum_off == 40 && check == 0 {
            return Some(());
        }
        let mut new = apply(check, l4_d);
        if csum_off == 40 && new == 0 {
            new = 0xffff;
        }
        ptr::write(l4_check_p, new);
    }
    Some(())
}

/// This CPU's counter `i`, advanced by one: its value before.
#[inline(always)]
fn next(i: u32) -> Option<u64> {
    let c = COUNTER.get_ptr_mut(i)?;
    // SAFETY: this CPU's slot.
    unsafe {
        let n = *c;
        *c = n + 1;
        Some(n)
    }
}

#[inline(always)]
fn cpu() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_smp_processor_id() }
}

#[inline(always)]
fn done(r: Result<(), i32>) -> u32 {
    match r {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

#[xdp]
pub fn bench_lru(_ctx: XdpContext) -> u32 {
    let Some(n) = next(SLOT_LRU) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: CtEntry is 64 bytes of plain integers, 8-byte aligned.
    let value: CtEntry = unsafe { core::mem::transmute([n; 8]) };
    done(LRU.insert(&key40(n, cpu()), &value, 0))
}

#[xdp]
pub fn bench_lru_nc(_ctx: XdpContext) -> u32 {
    let Some(n) = next(SLOT_LRU_NC) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: as in `bench_lru`.
    let value: CtEntry = unsafe { core::mem::transmute([n; 8]) };
    done(LRU_NC.insert(&key40(n, cpu()), &value, 0))
}

#[xdp]
pub fn bench_lru16(_ctx: XdpContext) -> u32 {
    let Some(n) = next(SLOT_LRU16) else {
        return xdp_action::XDP_ABORTED;
    };
    done(LRU16.insert(&key16(n, cpu()), &[n; 5], 0))
}

/// A lookup of one of the [`HIT_KEYS`] in turn, which must hit.
#[xdp]
pub fn bench_hit40(_ctx: XdpContext) -> u32 {
    let Some(n) = next(SLOT_HITS) else {
        return xdp_action::XDP_ABORTED;
    };
    match HIT40.get_ptr(&key40(n % HIT_KEYS, 0)) {
        // SAFETY: a map value, read once (as a hit's entry copy would).
        Some(v) if unsafe { (*v).backend } != u32::MAX => xdp_action::XDP_TX,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// [`bench_hit40`] with the IPv4 key.
#[xdp]
pub fn bench_hit16(_ctx: XdpContext) -> u32 {
    let Some(n) = next(SLOT_HITS) else {
        return xdp_action::XDP_ABORTED;
    };
    match HIT16.get_ptr(&key16(n % HIT_KEYS, 0)) {
        // SAFETY: as above.
        Some(v) if unsafe { (*v)[2] } != u64::MAX => xdp_action::XDP_TX,
        _ => xdp_action::XDP_ABORTED,
    }
}

#[xdp]
pub fn bench_fwd(ctx: XdpContext) -> u32 {
    forward(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let data = ctx.data();
    if data + 34 > ctx.data_end() {
        return None;
    }
    // SAFETY: the Ethernet and IPv4 headers (34 bytes) were checked above;
    // all accesses are at even offsets.
    unsafe {
        if ptr::read((data + 12) as *const u16) != ETH_P_IP_BE {
            return None;
        }
        let ip = data + 14;
        let vihl = ptr::read(ip as *const [u8; 2]);
        if vihl[0] != 0x45 {
            return None;
        }
        let ttl_p = (ip + 8) as *mut [u8; 2];
        let ttl_proto = ptr::read(ttl_p);
        if ttl_proto[0] <= 1 {
            return None;
        }
        let mut fib: bpf_fib_lookup = core::mem::zeroed();
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = vihl[1];
        fib.l4_protocol = ttl_proto[1];
        fib.__bindgen_anon_1.tot_len = u16::from_be(ptr::read((ip + 2) as *const u16));
        fib.ifindex = (*ctx.ctx).ingress_ifindex;
        fib.__bindgen_anon_3.ipv4_src = ptr::read_unaligned((ip + 12) as *const u32);
        fib.__bindgen_anon_4.ipv4_dst = ptr::read_unaligned((ip + 16) as *const u32);
        let rc = fib_lookup_helper(
            ctx.ctx.cast::<c_void>(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
            return None;
        }
        let new = [ttl_proto[0] - 1, ttl_proto[1]];
        let check_p = (ip + 10) as *mut u16;
        let d = diff(u16::from_ne_bytes(ttl_proto), u16::from_ne_bytes(new));
        ptr::write(ttl_p, new);
        ptr::write(check_p, apply(ptr::read(check_p), d));
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        ptr::write(data as *mut [u8; 12], macs);
        Some(
            PORTS
                .redirect(fib.ifindex, u64::from(xdp_action::XDP_PASS))
                .unwrap_or(xdp_action::XDP_PASS),
        )
    }
}

lb_ebpf::object_items!();
