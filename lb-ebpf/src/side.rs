//! Where a tracked flow's packets may arrive from: each conntrack entry says
//! (`CtEntry::ingress`, whose documentation states the rule), and a packet
//! that finds its entry but came in elsewhere is not translated. This keeps
//! a reply-shaped packet from the network (source: a local pod's address and
//! port, destination: its client) from being turned into the Service's
//! answer before the kernel's reverse-path filter ever sees it, and a pod
//! from answering for a backend on another node.
//!
//! The side is a pod interface or the network. XDP runs on uplinks only, so
//! everything it sees comes from the network; tc runs on uplinks, pod veths
//! and tunnels alike and asks `interfaces` (the agent's record of every
//! interface the programs run on) which one it is on, only for entries whose
//! rule needs it: an exact interface is compared as it is.

use lb_common::{CT_INGRESS_ANY, CT_INGRESS_NETWORK, CT_INGRESS_PODS, iface::ROLE_POD};

use crate::{maps::INTERFACES, packet::Packet};

/// Whether `ifindex` is the host side of a pod interface, by the agent's
/// record. One it has not recorded counts as none: the agent records an
/// interface before it attaches tc to it, so every pod interface tc runs on
/// is known.
#[inline(always)]
fn is_pod(ifindex: u32) -> bool {
    // SAFETY: a hash map value, valid memory for this program run.
    INTERFACES
        .get_ptr(&ifindex)
        .is_some_and(|i| unsafe { (*i).role } == ROLE_POD)
}

/// Whether `pkt` arrived where packets translated by an entry with
/// `ingress` may arrive.
#[inline(always)]
pub fn arrived_right<P: Packet>(pkt: &P, ingress: u32) -> bool {
    match ingress {
        CT_INGRESS_ANY => true,
        CT_INGRESS_NETWORK => P::UPLINKS_ONLY || !is_pod(pkt.ingress_ifindex()),
        CT_INGRESS_PODS => !P::UPLINKS_ONLY && is_pod(pkt.ingress_ifindex()),
        ifindex => !P::UPLINKS_ONLY && pkt.ingress_ifindex() == ifindex,
    }
}

/// The `ingress` of the reply entry of a new flow to a backend on this node
/// whose forward packets leave by `egress` (0: not known, the kernel routes
/// them): that interface if it is a pod's, else any pod's (a bridge: the
/// pod's packets arrive on its veth, a port of the bridge the route names).
#[inline(always)]
pub fn local_reply_ingress(egress: u32) -> u32 {
    if egress != 0 && is_pod(egress) {
        egress
    } else {
        CT_INGRESS_PODS
    }
}
