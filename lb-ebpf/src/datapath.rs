//! The pipeline every packet goes through, whichever hook it arrived on:
//! parse -> conntrack or service lookup -> backend choice -> forward (route to
//! the translated tuple) -> translate. Routing comes before the rewrite so that
//! XDP can still hand a packet it cannot send to tc untouched (see `forward`).
//! A later fragment of a datagram takes its translation from the `fragments`
//! entry its first fragment left (see `fragment`) in place of the lookups,
//! and goes on from forward the same way.
//!
//! Each stage is its own BPF function, called one after the other from
//! [`process`], with the packet's state in a per-CPU [`Scratch`] value: the
//! stages' stack frames then overlap instead of adding up (the verifier allows
//! 512 bytes of stack for the deepest call chain), and each stage returns one
//! register (the BPF calling convention has no aggregate returns).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use aya_log_ebpf::{debug, warn};
use lb_common::{
    BACKEND_F_LOCAL, CT_F_FORWARD, PROTO_TCP, Reason, SVC_F_EXTERNAL, SVC_F_LOCAL,
    SVC_F_SNAT_REMOTE, hash::flow_hash,
};

use crate::{
    conntrack, forward, fragment, icmp,
    maps::{SCRATCH, count_flow, count_reason, log_drop_now},
    nat,
    packet::{Action, Outcome, Packet, pack, unpack},
    parse::{self, Parsed},
    reject,
    scratch::{FRAG_FIRST, FRAG_LATER, Scratch},
    service, side,
};

#[inline(always)]
pub fn process<P: Packet>(pkt: P) -> Action {
    let bytes = pkt.total_len();
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        count_reason(Reason::DropMapError, bytes);
        return Action::Pass;
    };
    // SAFETY: this CPU's scratch value; nothing else uses it while we run.
    let s = unsafe { &mut *s };
    let (action, reason) = run(pkt, s, bytes);
    count_reason(reason, bytes);
    action
}

#[inline(always)]
fn run<P: Packet>(pkt: P, s: &mut Scratch, bytes: u32) -> Outcome {
    match parse_stage(pkt, s) {
        Parsed::Pass(reason) => (Action::Pass, reason),
        Parsed::Flow => {
            if !service::may_concern(&s.h.key) {
                return (Action::Pass, Reason::PassNotService);
            }
            match established(pkt, s) {
                Tracked::Yes => send(pkt, s, bytes),
                Tracked::WrongSide => (Action::Pass, Reason::PassWrongSide),
                Tracked::No => new_flow(pkt, s, bytes),
            }
        }
        Parsed::Fragment => {
            if !fragment_stage(s) {
                return (Action::Pass, Reason::PassFragment);
            }
            if !side_stage(pkt, s) {
                return (Action::Pass, Reason::PassWrongSide);
            }
            send(pkt, s, bytes)
        }
        Parsed::IcmpError => match icmp_stage(pkt, s) {
            icmp::TRANSLATED => {
                count_flow(s.entry.service, s.entry.backend, bytes);
                // Already rewritten: what XDP cannot send, the kernel routes.
                s.out = s.h.key;
                let (action, _) = unpack(forward_stage(pkt, s));
                (action, Reason::IcmpErrorTranslated)
            }
            icmp::NOT_OURS => (Action::Pass, Reason::PassNotService),
            icmp::WRONG_SIDE => (Action::Pass, Reason::PassWrongSide),
            _ => (Action::Drop, Reason::DropRewriteFailed),
        },
    }
}

/// A packet conntrack does not know: a new flow if it is for a frontend
/// (opened, routed, sent, and its reply entry settled on the side its
/// replies will come from), else none of lb's business or refused.
#[inline(always)]
fn new_flow<P: Packet>(pkt: P, s: &mut Scratch, bytes: u32) -> Outcome {
    if !service::lookup(&s.h.key, &mut s.svc) {
        if service::is_cluster_address(&s.h.key) {
            // A ClusterIP on a port that is no Service port.
            return unpack(refuse_stage(pkt, s));
        }
        return (Action::Pass, Reason::PassNotService);
    }
    match open_stage(pkt, s) {
        OPENED => {
            // Per-flow logs: compiled in, pruned by the verifier unless the
            // agent loads with debug-level datapath logging.
            debug!(
                &pkt,
                "new flow {}:{} -> service {} backend {} (proto {})",
                s.h.key.src_port,
                s.h.key.dst_port,
                s.entry.service,
                s.entry.backend,
                s.h.key.proto
            );
        }
        NO_BACKEND => return unpack(refuse_stage(pkt, s)),
        // Drops by policy are the Service's intent: counted, not logged.
        policy
            if policy == Reason::DropNoLocalEndpoint as u32
                || policy == Reason::DropSourceRange as u32 =>
        {
            return (Action::Drop, reason_of(policy));
        }
        reason => {
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            if let Some(unlogged) = log_drop_now(now) {
                warn!(
                    &pkt,
                    "new flow to port {} dropped: reason {} ({} more drops on this CPU since the last line)",
                    s.h.key.dst_port,
                    reason,
                    unlogged
                );
            }
            return (Action::Drop, reason_of(reason));
        }
    }
    let sent = send(pkt, s, bytes);
    settle_stage(s);
    sent
}

/// Routes, counts and translates a packet whose translation is in `s.entry`
/// (a flow's conntrack entry, or for a later fragment what its first
/// fragment was given).
#[inline(always)]
fn send<P: Packet>(pkt: P, s: &mut Scratch, bytes: u32) -> Outcome {
    // Route first: XDP may still hand the packet to tc untouched.
    s.out = s.h.key;
    nat::translated(&mut s.out, &s.entry);
    let routed = unpack(forward_stage(pkt, s));
    match routed.1 {
        // tc finds the flow in conntrack (a later fragment: in `fragments`)
        // and counts it there.
        Reason::PassToTc => return routed,
        Reason::IcmpTooBig => return unpack(too_big_stage(pkt, s)),
        _ => {}
    }
    count_flow(s.entry.service, s.entry.backend, bytes);
    if s.h.frag == FRAG_FIRST {
        // Where it goes is settled: its later fragments go the same way.
        record_stage(s);
    }
    if !translate_stage(pkt, s) {
        return (Action::Drop, Reason::DropRewriteFailed);
    }
    routed
}

#[inline(always)]
fn parse_stage<P: Packet>(pkt: P, s: &mut Scratch) -> Parsed {
    parse::parse(&pkt, &mut s.h)
}

/// What conntrack knows of a packet's flow.
enum Tracked {
    /// Nothing (or a UDP flow to balance again): a new flow, if it is one.
    No,
    /// Its entry is in `s.entry`.
    Yes,
    /// It has an entry, but the packet arrived where that direction's
    /// packets cannot come from (see `side`): not to be translated.
    WrongSide,
}

/// Copies the conntrack entry of an existing flow into `s.entry`, unless the
/// packet starts the flow afresh (see [`conntrack::starts_afresh`]): a UDP
/// stream whose backend is gone, or a TCP SYN reusing the tuple of a closing
/// connection. A TCP connection otherwise keeps its backend until it ends,
/// by FIN/RST or idle timeout, as kube-proxy's conntrack keeps it: a pod that
/// left its EndpointSlice (a rolling update) may still be finishing it. A
/// packet from the wrong side leaves the entry as it was: a spoofed RST must
/// not close the flow, nor spoofed replies keep it alive.
#[inline(always)]
fn established<P: Packet>(pkt: P, s: &mut Scratch) -> Tracked {
    let Some(ptr) = conntrack::lookup(&s.h.key) else {
        return Tracked::No;
    };
    // SAFETY: copying a conntrack value out.
    unsafe { core::ptr::copy_nonoverlapping(ptr, &mut s.entry, 1) };
    if !side_stage(pkt, s) {
        return Tracked::WrongSide;
    }
    if s.entry.flags & CT_F_FORWARD != 0 && conntrack::starts_afresh(&s.entry, &s.h) {
        if s.h.key.proto == PROTO_TCP {
            conntrack::forget_reply(&s.entry, &s.h.key);
        }
        return Tracked::No;
    }
    conntrack::touch(ptr, &s.h);
    Tracked::Yes
}

/// Whether the packet arrived where packets translated by `s.entry` may
/// (see `side`).
#[inline(never)]
fn side_stage<P: Packet>(pkt: P, s: &Scratch) -> bool {
    side::arrived_right(&pkt, s.entry.ingress)
}

/// The new flow's forward packet has been routed: its reply entry, if its
/// backend is on this node, now expects the pod interface it went to.
#[inline(never)]
fn settle_stage(s: &Scratch) {
    conntrack::settle_local_reply(s);
}

const OPENED: u32 = u32::MAX;
const NO_BACKEND: u32 = u32::MAX - 1;

fn reason_of(raw: u32) -> Reason {
    Reason::from_index(raw).unwrap_or(Reason::DropMapError)
}

/// Chooses a backend of `s.svc` for the new flow `s.h` and records the flow in
/// conntrack, leaving the forward entry in `s.entry`. Returns [`OPENED`],
/// [`NO_BACKEND`] or the drop [`Reason`].
///
/// Traffic policies as kube-proxy has them: a client inside the cluster (in
/// its pod CIDRs) of an externalTrafficPolicy Local frontend balances over
/// every endpoint; a Local frontend without an endpoint here drops the flow;
/// loadBalancerSourceRanges drop clients outside them; a client from outside
/// the cluster reaching a ClusterIP is source-NATed to a remote backend, so
/// that the reply comes back this way (kube-proxy's masquerade of traffic from
/// outside the cluster CIDRs).
#[inline(never)]
fn open_stage<P: Packet>(pkt: P, s: &mut Scratch) -> u32 {
    let Some(cfg) = service::config() else {
        return Reason::DropMapError as u32;
    };
    let family = s.h.key.family;
    let inside = service::in_cluster(cfg, &s.h.key.src, family);
    service::scope(&mut s.svc, inside == Some(true));
    let svc = s.svc;
    if !service::source_allowed(&svc, &s.h.key.src, family) {
        return Reason::DropSourceRange as u32;
    }
    if svc.backend_count == 0 {
        return if svc.flags & SVC_F_LOCAL != 0 {
            Reason::DropNoLocalEndpoint as u32
        } else {
            NO_BACKEND
        };
    }
    let hash = flow_hash(&s.h.key);
    let Some((id, backend)) = service::choose(&svc, hash, &s.h.key.src, family) else {
        return NO_BACKEND;
    };
    let from_outside = svc.flags & SVC_F_EXTERNAL == 0 && inside == Some(false);
    let snat = (svc.flags & SVC_F_SNAT_REMOTE != 0 || from_outside)
        && backend.flags & BACKEND_F_LOCAL == 0;
    match conntrack::open(&pkt, s, svc.id, id, &backend, snat.then_some(cfg), hash) {
        Ok(()) => OPENED,
        Err(reason) => reason as u32,
    }
}

#[inline(never)]
fn refuse_stage<P: Packet>(mut pkt: P, s: &mut Scratch) -> u64 {
    pack(reject::refuse(&mut pkt, &s.h))
}

/// Answers the (untranslated) packet with an ICMP error carrying the MTU the
/// route lookup reported.
#[inline(never)]
fn too_big_stage<P: Packet>(mut pkt: P, s: &mut Scratch) -> u64 {
    // SAFETY: a union of two u16 fields; the lookup wrote `mtu_result`.
    let mtu = unsafe { s.fib.__bindgen_anon_1.mtu_result };
    pack(reject::too_big(&mut pkt, &s.h, mtu))
}

/// Rewrites the packet to `s.entry`'s tuple (a later fragment: its addresses,
/// the only part of the tuple it holds); `s.h` then describes it as translated.
#[inline(never)]
fn translate_stage<P: Packet>(mut pkt: P, s: &mut Scratch) -> bool {
    let done = if s.h.frag == FRAG_LATER {
        nat::rewrite_addrs(&mut pkt, &s.h, &s.entry).map(|_| ())
    } else {
        nat::rewrite(&mut pkt, &s.h, &s.entry)
    };
    if done.is_err() {
        return false;
    }
    nat::translated(&mut s.h.key, &s.entry);
    true
}

/// Copies the translation of a later fragment's datagram into `s.entry`;
/// false if its first fragment was not translated here (or too long ago).
#[inline(never)]
fn fragment_stage(s: &mut Scratch) -> bool {
    fragment::lookup(s)
}

/// Records a first fragment's translation for its later fragments. A failed
/// update loses only those (they are passed untranslated), not this packet,
/// which is counted where it goes like any other.
#[inline(never)]
fn record_stage(s: &mut Scratch) {
    let _ = fragment::record(s);
}

#[inline(never)]
fn icmp_stage<P: Packet>(mut pkt: P, s: &mut Scratch) -> u32 {
    icmp::translate_error(&mut pkt, s)
}

/// Routes the packet to `s.out` (TTL and MACs; see `forward`).
#[inline(never)]
fn forward_stage<P: Packet>(mut pkt: P, s: &mut Scratch) -> u64 {
    pack(forward::forward(
        &mut pkt,
        &s.h,
        &s.out,
        &mut s.fib,
        &mut s.egress,
    ))
}
