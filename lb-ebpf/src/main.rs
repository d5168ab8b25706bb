//! The lb datapath.
//!
//! Two entry points run the same pipeline ([`datapath::process`]):
//! - `lb_xdp`, attached (XDP) to the node's uplinks: Service traffic from outside
//!   the node and replies from backends on other nodes;
//! - `lb_tc`, attached (tcx ingress) to the host side of pod veths (traffic from
//!   local pods, whose checksums may be left for offload, see `packet`), to every
//!   other interface replies may arrive on (tunnels of overlay networks, other
//!   NICs), and to the uplinks: as the uplink hook where XDP does not fit (a veth
//!   uplink, a NIC without native XDP), and behind XDP for what XDP hands on
//!   (see `forward`);
//! - `lb_connect4/6`, `lb_sendmsg4/6`, `lb_recvmsg4/6` and `lb_getpeername4/6`,
//!   cgroup socket programs on the root cgroup: Services for the node's own
//!   clients (its processes, hostNetwork pods), at the socket (see `sock`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly for context loads the verifier must see verbatim (see `packet`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod conntrack;
mod csum;
mod datapath;
mod forward;
mod fragment;
mod icmp;
mod maps;
mod mem;
mod nat;
mod packet;
mod parse;
mod reject;
mod scratch;
mod service;
mod side;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::SockEvent;

use crate::{
    maps::TX_PORTS,
    packet::{Action, Tc, Xdp},
};

/// Bytes of headers the tc program wants linear: Ethernet, IPv6 with a few
/// extension headers, TCP with options.
const TC_HEADER_BYTES: u32 = 160;

/// Frags-aware (`xdp.frags`): uplinks with a jumbo MTU accept it, and a packet
/// spanning several buffers is translated in its first, which holds the headers.
#[xdp(frags)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let pkt = Xdp(ctx.ctx);
    match datapath::process(pkt) {
        // (RedirectNeigh is tc's: XDP hands such packets to tc instead.)
        Action::Pass | Action::RedirectNeigh(_) => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce => xdp_action::XDP_TX,
        Action::Redirect(ifindex) => TX_PORTS
            .redirect(ifindex, u64::from(xdp_action::XDP_PASS))
            .unwrap_or(xdp_action::XDP_PASS),
    }
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let mut pkt = Tc(ctx.skb.skb);
    pkt.pull_headers(TC_HEADER_BYTES);
    // SAFETY: redirect helpers take plain integers.
    unsafe {
        match datapath::process(pkt) {
            // Next program in the tcx chain, or the stack.
            Action::Pass => TC_ACT_UNSPEC,
            Action::Drop => TC_ACT_SHOT as i32,
            Action::Bounce => bpf_redirect(packet::Packet::ingress_ifindex(&pkt), 0) as i32,
            Action::Redirect(ifindex) => bpf_redirect(ifindex, 0) as i32,
            Action::RedirectNeigh(ifindex) => {
                bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
            }
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false, SockEvent::Connected)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true, SockEvent::Connected)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false, SockEvent::Sent)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true, SockEvent::Sent)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

lb_ebpf::object_items!();
