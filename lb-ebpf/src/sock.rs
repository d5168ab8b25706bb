//! Socket-level balancing for the node's own clients: the node's processes and
//! hostNetwork pods, whose packets no ingress hook sees (they leave the node
//! from the local stack). cgroup programs on the root cgroup translate a
//! frontend into a backend when a socket connects (TCP, connected UDP) or
//! sends (unconnected UDP), as Cilium's socket LB does, and show the frontend
//! again wherever the application looks at its peer (`getpeername`, the source
//! of a received datagram). No packet of such a flow is ever rewritten: it
//! leaves addressed to the backend, so no conntrack entry and no source NAT
//! are needed, and its replies come straight back.
//!
//! Only sockets of the agent's own network namespace (the node's, by its
//! cookie) are served: pods' sockets, in namespaces of their own, keep going
//! through the tc program on their veth, which also keeps the node's programs
//! out of other nodes' namespaces when several share a kernel (the testbed).
//!
//! The choice uses the packet path's maps and rules: the frontend's Maglev row
//! as a client inside the cluster sees it (externalTrafficPolicy Local leaves
//! the node's own clients cluster-wide, as kube-proxy does; internal Local
//! keeps them on this node's endpoints), session affinity and source ranges
//! with the node's address as the client, a hash of the socket's cookie in
//! place of the flow hash (the source port may not be bound yet). A frontend
//! without usable backends, or a ClusterIP on a port that is no Service port,
//! is refused with ECONNREFUSED at once; what the packet path drops by policy
//! fails with EPERM.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, SVC_F_LOCAL, Service, ServiceKey,
    SockEvent, SockOrigin, hash::socket_hash,
};

use crate::{
    maps::{SOCK_ORIGINS, count_sock},
    service,
};

/// The cookie of the network namespace whose sockets are served: the node's,
/// where the agent runs. Set by the agent at load time (read-only data, like
/// aya-log's level); 0, the default, serves none (cookies start at 1).
#[unsafe(no_mangle)]
static LB_HOST_NETNS: u64 = 0;

/// Return values of cgroup socket programs: let the call proceed, or fail it
/// (with the error `bpf_set_retval` gave, else EPERM).
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The first three words of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as they sit in memory.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// Whether the socket behind `ctx` is one to serve: a TCP or UDP socket of the
/// node's network namespace. Returns its protocol.
#[inline(always)]
fn served(ctx: *mut bpf_sock_addr) -> Option<u8> {
    // SAFETY: a read of read-only data the loader may have set.
    let host = unsafe { ptr::read_volatile(&raw const LB_HOST_NETNS) };
    // SAFETY: the helper takes the program's context.
    if host == 0 || unsafe { bpf_get_netns_cookie(ctx.cast::<c_void>()) } != host {
        return None;
    }
    // SAFETY: a context field every socket-address hook may read.
    let proto = unsafe { ptr::read_volatile(&raw const (*ctx).protocol) } as u8;
    (proto == PROTO_TCP || proto == PROTO_UDP).then_some(proto)
}

/// Reads the address the call carries (`user_ip4` / `user_ip6`, `user_port`)
/// into `key`'s destination. Returns whether it was an IPv4-mapped IPv6 address,
/// which is looked up as the IPv4 address it stands for.
#[inline(always)]
fn read_address(ctx: *mut bpf_sock_addr, v6: bool, key: &mut FlowKey) -> bool {
    // SAFETY: context fields the hook may read, one 32-bit load each (the
    // verifier accepts only such loads of them).
    unsafe {
        key.dst_port = u16::from_be(ptr::read_volatile(&raw const (*ctx).user_port) as u16);
        if !v6 {
            let ip = ptr::read_volatile(&raw const (*ctx).user_ip4);
            key.dst[..4].copy_from_slice(&ip.to_ne_bytes());
            key.family = FAMILY_V4;
            return false;
        }
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = ptr::read_volatile(&raw const (*ctx).user_ip6[i]);
        }
        if words[..3] == V4_MAPPED_PREFIX {
            key.dst[..4].copy_from_slice(&words[3].to_ne_bytes());
            key.family = FAMILY_V4;
            return true;
        }
        for (i, w) in words.iter().enumerate() {
            key.dst[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        key.family = FAMILY_V6;
        false
    }
}

/// Writes `addr` and `port` into the call's address, in the form it came in
/// (`mapped`: as an IPv4-mapped IPv6 address).
#[inline(always)]
fn write_address(ctx: *mut bpf_sock_addr, v6: bool, mapped: bool, addr: &[u8; 16], port: u16) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: context fields these hooks may write, one 32-bit store each.
    unsafe {
        ptr::write_volatile(&raw mut (*ctx).user_port, u32::from(port.to_be()));
        if !v6 {
            ptr::write_volatile(&raw mut (*ctx).user_ip4, word(0));
            return;
        }
        let words = if mapped {
            [
                V4_MAPPED_PREFIX[0],
                V4_MAPPED_PREFIX[1],
                V4_MAPPED_PREFIX[2],
                word(0),
            ]
        } else {
            [word(0), word(4), word(8), word(12)]
        };
        for (i, w) in words.iter().enumerate() {
            ptr::write_volatile(&raw mut (*ctx).user_ip6[i], *w);
        }
    }
}

/// `connect` and `sendmsg`: sends the socket to a backend of the frontend it
/// names, remembering the frontend for [`restore`]; refuses it when the
/// frontend has no usable backend. Anything else proceeds untouched.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, v6: bool, event: SockEvent) -> i32 {
    let ctx = ctx.sock_addr;
    let Some(proto) = served(ctx) else {
        return PROCEED;
    };
    let mut key = FlowKey {
        proto,
        ..FlowKey::default()
    };
    let mapped = read_address(ctx, v6, &mut key);
    if !service::may_concern(&key) {
        return PROCEED;
    }
    let mut svc = Service::default();
    if !service::lookup(&key, &mut svc) {
        // A ClusterIP on a port that is no Service port is refused, as on
        // the packet path.
        return if service::is_cluster_address(&key) {
            refuse()
        } else {
            PROCEED
        };
    }
    let Some(cfg) = service::config() else {
        return PROCEED;
    };
    // The node's clients are inside the cluster; as a client they are the
    // node's address (what a backend would see, and what kube-proxy's
    // affinity and source ranges look at).
    service::scope(&mut svc, true);
    let node = node_address(cfg, key.family);
    if !service::source_allowed(&svc, &node, key.family) {
        return drop_call();
    }
    if svc.backend_count == 0 {
        return if svc.flags & SVC_F_LOCAL != 0 {
            drop_call()
        } else {
            refuse()
        };
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.cast::<c_void>()) };
    let Some((_, backend)) = service::choose(&svc, socket_hash(cookie), &node, key.family) else {
        return refuse();
    };
    let origin = SockOrigin {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family: key.family,
        _pad: [0; 5],
    };
    let frontend = ServiceKey {
        addr: key.dst,
        port: key.dst_port,
        proto,
        family: key.family,
        _pad: [0; 4],
    };
    if SOCK_ORIGINS.insert(&origin, &frontend, 0).is_err() {
        count_sock(SockEvent::OriginLost);
    }
    write_address(ctx, v6, mapped, &backend.addr, backend.port);
    count_sock(event);
    PROCEED
}

/// The node's address of `family` (its source-NAT address), all zeros when it
/// has none.
#[inline(always)]
fn node_address(cfg: &Config, family: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    if family == FAMILY_V4 {
        a[..4].copy_from_slice(&cfg.snat_addr_v4);
    } else {
        a = cfg.snat_addr_v6;
    }
    a
}

/// Fails the call with EPERM (the default error of a failing cgroup
/// program): what the packet path drops (a Local policy without a local
/// endpoint, a source range that leaves the node out) cannot be left to time
/// out here without sending it on, untranslated, to wherever the VIP routes.
#[inline(always)]
fn drop_call() -> i32 {
    count_sock(SockEvent::Dropped);
    REFUSE
}

/// Fails the call with ECONNREFUSED, what a client of a Service without
/// endpoints gets on the packet path (a TCP RST, ICMP port unreachable).
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: a helper of cgroup programs taking a plain integer.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    count_sock(SockEvent::Refused);
    REFUSE
}

/// `getpeername` and `recvmsg`: shows the frontend the socket asked for in
/// place of the backend it was sent to. Always proceeds (`recvmsg` programs
/// may not fail the call).
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    let ctx = ctx.sock_addr;
    if served(ctx).is_none() {
        return PROCEED;
    }
    let mut key = FlowKey::default();
    let mapped = read_address(ctx, v6, &mut key);
    let origin = SockOrigin {
        // SAFETY: the helper takes the program's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.cast::<c_void>()) },
        addr: key.dst,
        port: key.dst_port,
        family: key.family,
        _pad: [0; 5],
    };
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { SOCK_ORIGINS.get(&origin) } {
        let (addr, port) = (frontend.addr, frontend.port);
        write_address(ctx, v6, mapped, &addr, port);
        count_sock(SockEvent::Restored);
    }
    PROCEED
}
