//! Small XDP programs for lb's test topologies and benchmarks (not part of the
//! datapath the agent loads):
//!
//! - `xdp_pass` gives a veth the NAPI context that XDP_TX from its peer needs (a
//!   veth only wakes its peer for XDP_TX frames when the peer runs XDP);
//! - `xdp_sink` counts what arrives, per CPU, and drops it: the receiving end of
//!   a forwarding benchmark.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::Counters;

/// Index 0: packets and bytes that reached `xdp_sink`.
#[btf_map(name = "sink_stats")]
static SINK_STATS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Frags-aware, so its veth's peer may take a jumbo MTU.
#[xdp(frags)]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_sink(ctx: XdpContext) -> u32 {
    if let Some(c) = SINK_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::XDP_DROP
}

lb_ebpf::object_items!();
