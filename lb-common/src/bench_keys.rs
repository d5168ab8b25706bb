//! The keys of the benchmark's LRU programs (lb-ebpf's `bench` binary),
//! built alike by the programs and by the harness that checks their tables
//! (the `lb-bench` crate): the map shapes conntrack could take, not
//! anything the datapath uses.

use crate::{FAMILY_V4, FlowKey, PROTO_TCP};

/// Slots of the bench object's per-CPU counter (`bench_cnt`): how many
/// keys `bench_lru`, `bench_lru_nc` and `bench_lru16` inserted, and how many
/// lookups `bench_hit40` and `bench_hit16` made. (Slot 0 is the frame
/// wrapper's flow counter.)
pub const SLOT_LRU: u32 = 1;
pub const SLOT_LRU_NC: u32 = 2;
pub const SLOT_LRU16: u32 = 3;
pub const SLOT_HITS: u32 = 4;

/// The keys the hit programs cycle through (the harness inserts them, with
/// `cpu` 0, among as many others as fill the tables).
pub const HIT_KEYS: u64 = 10_000;

/// An IPv4-only conntrack key: addresses, ports, protocol (16 bytes where
/// [`FlowKey`] takes 40 for both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// An IPv4-only conntrack value's size: translated addresses and ports, ids,
/// flags, time and ingress, which [`crate::CtEntry`] holds for both
/// families in 64 bytes.
pub type CtEntry4 = [u64; 5];

/// Conntrack's key for insert `n` on CPU `cpu`: the counter in the first 8
/// bytes of `src`, the CPU in the next (so that CPUs inserting at once make
/// distinct keys), TCP, IPv4; the rest zero. Built as words: a struct
/// literal would cost a byte-wise memset in a BPF program.
#[inline(always)]
pub fn key40(n: u64, cpu: u32) -> FlowKey {
    let words: [u64; 5] = [
        n,
        u64::from(cpu),
        0,
        0,
        (u64::from(PROTO_TCP) << 32) | (u64::from(FAMILY_V4) << 40),
    ];
    // SAFETY: FlowKey is 40 bytes of plain integers, 8-byte aligned; on a
    // little-endian target the last word puts `proto` and `family` at bytes
    // 36 and 37, where the struct has them.
    unsafe { core::mem::transmute(words) }
}

/// The IPv4 key for insert `n` on CPU `cpu`: the counter's low 32 bits as
/// the source address and its next 16 as the source port, the CPU as the
/// destination.
#[inline(always)]
pub fn key16(n: u64, cpu: u32) -> FlowKey4 {
    FlowKey4 {
        src: n as u32,
        dst: cpu,
        src_port: (n >> 32) as u16,
        dst_port: 0,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}
