//! Connection tracking: one entry per direction of a translated flow, keyed by the
//! 5-tuple as it appears on the wire, holding the 4-tuple to rewrite it to.
//!
//! - forward entry: client -> frontend, rewritten to (client or SNAT) -> backend;
//! - reply entry: backend -> (client or SNAT), rewritten to frontend -> client.
//!
//! Both live in one LRU map, so a packet of either direction costs one lookup.

use core::mem::size_of_val;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple},
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
};
use lb_common::{
    BACKEND_F_LOCAL, Backend, CFG_F_SNAT_V4, CFG_F_SNAT_V6, CT_F_ACKED, CT_F_CLOSING, CT_F_FORWARD,
    CT_F_HAIRPIN, CT_F_REPLIED, CT_F_REPLY, CT_F_SNAT, CT_INGRESS_ANY, CT_INGRESS_NETWORK,
    CT_INGRESS_PODS, CT_REFRESH_NS, Config, CtEntry, CtEvent, FlowKey, PROTO_TCP, Reason,
    ct_expired, hash,
};

use crate::{
    maps::{CONNTRACK, count_ct},
    mem,
    packet::Packet,
    scratch::{Headers, Scratch, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    service, side,
};

/// Ports tried for a new source-NAT flow before giving up. The first is the
/// client's own port, as Linux's masquerade keeps it when it can; each other
/// try is an independent hash of the flow (`hash::snat_probe`), so a claim
/// fails only if all of them are held: with 80% of a backend's ports in use, 1
/// new flow in 1.6 million (32 tries: 1 in 1,300). Tries past the first are
/// rare while the range has room, so the bound costs nothing on the common
/// path; a range filled that far (the default range outside the ephemeral
/// ports holds 31,744 per backend) still takes its flows.
const SNAT_TRIES: u32 = 64;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// Bookkeeping for a packet that hit `e`, which decides when the flow expires
/// (`lb_common::ct_expired`): every entry remembers when it was last used; a
/// TCP FIN or RST marks the flow as closing; a packet of the client's with
/// ACK and without SYN marks it acknowledged; the first packet of the
/// backend's marks it replied. The reply entry's news (replied, closing) is
/// copied to the forward entry once, so that the forward entry alone tells
/// the flow's state. Writes only when something changes.
#[inline(always)]
pub fn touch(e: *mut CtEntry, h: &Headers) {
    // SAFETY: `e` points into a conntrack value; concurrent writers only store
    // whole fields of the same meaning.
    unsafe {
        let t = now();
        if t.wrapping_sub((*e).last_seen_ns) > CT_REFRESH_NS {
            (*e).last_seen_ns = t;
        }
        let flags = (*e).flags;
        let mut news = 0;
        if h.key.proto == PROTO_TCP {
            if h.flags & (TCP_FIN | TCP_RST) != 0 {
                news |= CT_F_CLOSING;
            }
            if flags & CT_F_FORWARD != 0 && h.flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
                news |= CT_F_ACKED;
            }
        }
        if flags & CT_F_REPLY != 0 {
            news |= CT_F_REPLIED;
        }
        let news = news & !flags;
        if news == 0 {
            return;
        }
        (*e).flags = flags | news;
        if flags & CT_F_REPLY != 0 {
            let forward = (*e).partner_key(h.key.proto, h.key.family);
            if let Some(f) = CONNTRACK.get_ptr_mut(&forward) {
                // Only this flow's forward entry (a hairpin's or another
                // flow's entry under the same key cannot be: the key is the
                // client's tuple, which the reply entry was made from).
                (*f).flags |= news & (CT_F_REPLIED | CT_F_CLOSING);
            }
        }
    }
}

/// Whether the client's packet `h`, which hit forward entry `e`, starts its
/// flow afresh instead of following `e` (the caller then opens it as new):
///
/// - UDP: the backend is gone; the stream is balanced again, to a live
///   backend, instead of black-holing (as kube-proxy clears UDP conntrack).
/// - TCP: a SYN without ACK on a closing connection. The client reuses the
///   port of a connection it closed (one that ended by RST leaves no
///   TIME_WAIT to stop it); the kernel's conntrack, too, opens a new
///   connection on a SYN in its closing states. The old backend may have
///   stopped since, and would refuse it.
/// - TCP: a SYN without ACK that was never acknowledged, to a backend that is
///   gone: a retransmitted SYN goes to a live backend.
#[inline(always)]
pub fn starts_afresh(e: &CtEntry, h: &Headers) -> bool {
    if h.key.proto != PROTO_TCP {
        return !service::still_serves(e);
    }
    if h.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    e.flags & CT_F_CLOSING != 0 || (e.flags & CT_F_ACKED == 0 && !service::still_serves(e))
}

/// Deletes the reply entry of forward entry `e` (of the client's tuple
/// `key`) if it is still that flow's: the flow is opened afresh, maybe to
/// another backend or source-NAT port, and the old reply must not hold its
/// key. (A source-NAT port given away after the flow idled belongs to
/// another flow now, and stays.)
#[inline(always)]
pub fn forget_reply(e: &CtEntry, key: &FlowKey) {
    let reply_key = e.partner_key(key.proto, key.family);
    let Some(r) = CONNTRACK.get_ptr(&reply_key) else {
        return;
    };
    // SAFETY: the entry stays valid memory for this program run.
    let r = unsafe { &*r };
    if r.flags & CT_F_REPLY != 0 && is_same_flow(r, key) && CONNTRACK.remove(&reply_key).is_ok() {
        count_ct(CtEvent::Removed);
    }
}

/// Opens the flow `s.h` to `backend` (id `backend_id`) of service-port `service`:
/// inserts both entries and leaves the forward one in `s.entry`, the reply one
/// in `s.reply` and its key in `s.key`. With `snat`, the flow leaves with this
/// node's address and a port chosen from `hash`. The reply entry of a
/// backend on this node expects its replies from any pod interface until
/// [`settle_local_reply`] narrows that to the pod's own.
#[inline(always)]
pub fn open<P: Packet>(
    pkt: &P,
    s: &mut Scratch,
    service: u32,
    backend_id: u32,
    backend: &Backend,
    snat: Option<&Config>,
    hash: u32,
) -> Result<(), Reason> {
    let key = &s.h.key;
    let t = now();
    set_entry(
        &mut s.entry,
        (&key.src, key.src_port),
        (&backend.addr, backend.port),
        (backend_id, service),
        (CT_F_FORWARD, CT_INGRESS_ANY),
        t,
    );
    let reply_ingress = if backend.flags & BACKEND_F_LOCAL != 0 {
        CT_INGRESS_PODS
    } else {
        CT_INGRESS_NETWORK
    };
    set_entry(
        &mut s.reply,
        (&key.dst, key.dst_port),
        (&key.src, key.src_port),
        (backend_id, service),
        (CT_F_REPLY, reply_ingress),
        t,
    );
    mem::zero(&mut s.key);
    mem::copy_addr(&mut s.key.src, &backend.addr);
    mem::copy_addr(&mut s.key.dst, &key.src);
    s.key.src_port = backend.port;
    s.key.dst_port = key.src_port;
    s.key.proto = key.proto;
    s.key.family = key.family;
    // The client is the backend (a pod reaching its own Service): it must not
    // get a packet from its own address, which it would drop as martian.
    let hairpin = backend.addr == key.src;
    match (hairpin, snat) {
        (true, _) => {
            // Leave from the frontend address with the client's own port, so the
            // reply (backend -> frontend:port) comes back here and is told apart
            // from other clients by that port.
            s.entry.flags |= CT_F_HAIRPIN;
            s.reply.flags |= CT_F_HAIRPIN;
            mem::copy_addr(&mut s.entry.nat_src, &key.dst);
            mem::copy_addr(&mut s.key.dst, &key.dst);
            insert(&s.key, &s.reply)?;
        }
        (false, None) => insert(&s.key, &s.reply)?,
        (false, Some(cfg)) => {
            // No address of this family to translate from (a node without
            // one, or before the agent knows it): drop, counted, rather than
            // send from 0.0.0.0 or ::.
            let family_flag = if s.h.is_v4() {
                CFG_F_SNAT_V4
            } else {
                CFG_F_SNAT_V6
            };
            if cfg.flags & family_flag == 0 {
                return Err(Reason::DropNoSnatAddress);
            }
            s.entry.flags |= CT_F_SNAT;
            s.reply.flags |= CT_F_SNAT;
            if s.h.is_v4() {
                mem::zero_addr(&mut s.entry.nat_src);
                s.entry.nat_src[..4].copy_from_slice(&cfg.snat_addr_v4);
            } else {
                mem::copy_addr(&mut s.entry.nat_src, &cfg.snat_addr_v6);
            }
            mem::copy_addr(&mut s.key.dst, &s.entry.nat_src);
            // Inserts the reply entry under the port it finds.
            s.entry.nat_src_port = claim_snat_port(pkt, s, cfg, hash, t)?;
        }
    }
    insert(&s.h.key, &s.entry)
}

/// Inserts or replaces the entry under `key`, counting it as created when the
/// map did not hold the key (the usual case: a new flow's lookup missed). A
/// replacement (a UDP flow balanced again, a reply key a flow left behind)
/// costs a second update.
#[inline(always)]
fn insert(key: &FlowKey, entry: &CtEntry) -> Result<(), Reason> {
    if CONNTRACK.insert(key, entry, u64::from(BPF_NOEXIST)).is_ok() {
        count_ct(CtEvent::Created);
        return Ok(());
    }
    CONNTRACK
        .insert(key, entry, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropMapError)
}

/// Narrows the reply entry of the flow just opened (`s.reply`, under
/// `s.key`) to a backend on this node to the interface its forward packet
/// was routed out of (`s.egress`), where that is a pod's (see
/// `side::local_reply_ingress`). Called once the forward packet's route is
/// known, before the packet leaves, so before any reply can come.
#[inline(always)]
pub fn settle_local_reply(s: &Scratch) {
    if s.reply.ingress != CT_INGRESS_PODS {
        return;
    }
    let ingress = side::local_reply_ingress(s.egress);
    if ingress == CT_INGRESS_PODS {
        return;
    }
    if let Some(e) = CONNTRACK.get_ptr_mut(&s.key) {
        // SAFETY: a conntrack value; a plain field store.
        unsafe { (*e).ingress = ingress };
    }
}

/// Fills a conntrack value field by field (a struct literal would become a
/// byte-wise `memcpy` on BPF), stamped `t`.
#[inline(always)]
fn set_entry(
    e: &mut CtEntry,
    src: (&[u8; 16], u16),
    dst: (&[u8; 16], u16),
    (backend, service): (u32, u32),
    (flags, ingress): (u16, u32),
    t: u64,
) {
    mem::copy_addr(&mut e.nat_src, src.0);
    mem::copy_addr(&mut e.nat_dst, dst.0);
    e.nat_src_port = src.1;
    e.nat_dst_port = dst.1;
    e.backend = backend;
    e.service = service;
    e.flags = flags;
    e._pad = 0;
    e.last_seen_ns = t;
    e.ingress = ingress;
    e._pad2 = 0;
}

/// Finds a port in the SNAT range for which the reply key `s.key` (with that port
/// as its destination port) is free, idle, or already this flow's, and no local
/// socket's, and inserts `s.reply` there. Tries the client's own port first,
/// then ports in an order derived from the flow hash, so a flow whose forward
/// entry was evicted gets its old port back, and flows that collide at their
/// first port go separate ways instead of queueing up behind each other as
/// consecutive probes would make them.
#[inline(always)]
fn claim_snat_port<P: Packet>(
    pkt: &P,
    s: &mut Scratch,
    cfg: &Config,
    hash: u32,
    t: u64,
) -> Result<u16, Reason> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if min == 0 || max < min {
        return Err(Reason::DropSnatExhausted);
    }
    let span = max - min + 1;
    if span == 0 {
        return Err(Reason::DropSnatExhausted);
    }
    let own = u32::from(s.h.key.src_port);
    for attempt in 0..SNAT_TRIES {
        let port = if attempt == 0 && own >= min && own <= max {
            own as u16
        } else {
            (min + hash::snat_probe(hash, attempt, span)) as u16
        };
        s.key.dst_port = port;
        if local_socket_holds(pkt, s) {
            continue;
        }
        if CONNTRACK
            .insert(&s.key, &s.reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            count_ct(CtEvent::Created);
            return Ok(port);
        }
        if let Some(existing) = CONNTRACK.get_ptr(&s.key) {
            // SAFETY: the entry stays valid memory for this program run.
            let existing = unsafe { &*existing };
            if is_same_flow(existing, &s.h.key) || is_idle(existing, &s.h.key, t) {
                if CONNTRACK
                    .insert(&s.key, &s.reply, u64::from(BPF_ANY))
                    .is_ok()
                {
                    return Ok(port);
                }
                return Err(Reason::DropMapError);
            }
        }
    }
    Err(Reason::DropSnatExhausted)
}

/// Whether a socket of this node would take the replies `s.key` stands for
/// (backend -> source-NAT address and port): a connection the node itself
/// holds with the backend from that port (TCP: also in TIME_WAIT), or a
/// listener on that port. The port range is shared with the kernel's own
/// ephemeral ports; such a port is left to the socket.
#[inline(always)]
fn local_socket_holds<P: Packet>(pkt: &P, s: &mut Scratch) -> bool {
    let k = &s.key;
    let size = if k.family == lb_common::FAMILY_V4 {
        // SAFETY: plain integers in a union of plain integers.
        let t = unsafe { &mut s.sock.__bindgen_anon_1.ipv4 };
        t.saddr = u32::from_ne_bytes([k.src[0], k.src[1], k.src[2], k.src[3]]);
        t.daddr = u32::from_ne_bytes([k.dst[0], k.dst[1], k.dst[2], k.dst[3]]);
        t.sport = k.src_port.to_be();
        t.dport = k.dst_port.to_be();
        size_of_val(t)
    } else {
        // SAFETY: as above.
        let t = unsafe { &mut s.sock.__bindgen_anon_1.ipv6 };
        for i in 0..4 {
            let j = 4 * i;
            t.saddr[i] = u32::from_ne_bytes([k.src[j], k.src[j + 1], k.src[j + 2], k.src[j + 3]]);
            t.daddr[i] = u32::from_ne_bytes([k.dst[j], k.dst[j + 1], k.dst[j + 2], k.dst[j + 3]]);
        }
        t.sport = k.src_port.to_be();
        t.dport = k.dst_port.to_be();
        size_of_val(t)
    };
    let tuple: *mut bpf_sock_tuple = &mut s.sock;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helper calls on our context with a tuple of the size given; a
    // socket found is released at once.
    unsafe {
        let sk = if k.proto == PROTO_TCP {
            bpf_skc_lookup_tcp(pkt.ctx(), tuple, size as u32, netns, 0)
        } else {
            bpf_sk_lookup_udp(pkt.ctx(), tuple, size as u32, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
        true
    }
}

#[inline(always)]
fn is_same_flow(reply: &CtEntry, key: &FlowKey) -> bool {
    reply.nat_dst == key.src
        && reply.nat_dst_port == key.src_port
        && reply.nat_src == key.dst
        && reply.nat_src_port == key.dst_port
}

/// Whether the flow holding a SNAT port has expired (`lb_common::ct_expired`,
/// over both its entries: a one-way UDP stream keeps its port), so that the
/// port may go to another flow.
#[inline(always)]
fn is_idle(reply: &CtEntry, key: &FlowKey, t: u64) -> bool {
    let forward_key = reply.partner_key(key.proto, key.family);
    let forward = CONNTRACK.get_ptr(&forward_key);
    let mut flags = reply.flags;
    let mut client_seen = None;
    if let Some(f) = forward {
        // SAFETY: the entry stays valid memory for this program run.
        let f = unsafe { &*f };
        flags |= f.flags;
        client_seen = Some(f.last_seen_ns);
    }
    if !ct_expired(flags, key.proto, client_seen, Some(reply.last_seen_ns), t) {
        return false;
    }
    // The old flow must not come back on the port we are about to give away.
    if forward.is_some() && CONNTRACK.remove(&forward_key).is_ok() {
        count_ct(CtEvent::Removed);
    }
    true
}
