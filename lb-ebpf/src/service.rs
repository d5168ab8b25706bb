//! Service lookup and backend choice: the frontend's row as the client's
//! place makes it (traffic policies), who may open flows (source ranges),
//! and which backend (session affinity, else Maglev).

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use lb_common::{
    Affinity, AffinityKey, Backend, CFG_F_CLUSTER_CIDRS, Config, CtEntry, FAMILY_V4, FlowKey,
    SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_SOURCE_RANGES, Service, ServiceKey,
    SourceRange4, SourceRange6, hash,
};

use crate::maps::{
    ADDR_FILTER, AFFINITY, BACKENDS, CLUSTER_CIDRS4, CLUSTER_CIDRS6, CONFIG, MAGLEV, SERVICES,
    SRC_RANGES4, SRC_RANGES6,
};

#[inline(always)]
fn filter_has(addr: &[u8; 16], family: u8, port: u16, proto: u8, role: u32) -> bool {
    let bit = hash::addr_filter_bit(addr, family, port, proto, role);
    match ADDR_FILTER.get(bit / 64) {
        Some(word) => *word & (1u64 << (bit % 64)) != 0,
        None => true,
    }
}

/// Whether the packet may be lb's business: its destination may be a frontend
/// or a ClusterIP, or its source a backend. False is certain (a few array loads,
/// no hash-map lookup); true is checked by the lookups that follow.
#[inline(always)]
pub fn may_concern(key: &FlowKey) -> bool {
    filter_has(
        &key.dst,
        key.family,
        key.dst_port,
        key.proto,
        hash::FILTER_FRONTEND,
    ) || filter_has(&key.src, key.family, key.src_port, 0, hash::FILTER_BACKEND)
        || filter_has(&key.dst, key.family, 0, 0, hash::FILTER_CLUSTER_IP)
}

/// Whether the destination is a ClusterIP (an address-level entry), so that a
/// port that is no Service port is refused rather than routed nowhere.
#[inline(always)]
pub fn is_cluster_address(key: &FlowKey) -> bool {
    let skey = ServiceKey {
        addr: key.dst,
        port: 0,
        proto: 0,
        family: key.family,
        _pad: [0; 4],
    };
    SERVICES.get_ptr(&skey).is_some()
}

/// Copies the frontend a packet with `key` is addressed to into `out`; false if
/// it is not a service.
#[inline(always)]
pub fn lookup(key: &FlowKey, out: &mut Service) -> bool {
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dst_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 4],
    };
    match SERVICES.get_ptr(&skey) {
        Some(svc) => {
            // SAFETY: copying a map value out.
            unsafe { core::ptr::copy_nonoverlapping(svc, out, 1) };
            true
        }
        None => false,
    }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Whether a client address is inside the cluster (in the cluster's pod
/// CIDRs); None when the agent does not know them.
#[inline(always)]
pub fn in_cluster(cfg: &Config, addr: &[u8; 16], family: u8) -> Option<bool> {
    if cfg.flags & CFG_F_CLUSTER_CIDRS == 0 {
        return None;
    }
    Some(if family == FAMILY_V4 {
        CLUSTER_CIDRS4
            .get(&Key::new(32, [addr[0], addr[1], addr[2], addr[3]]))
            .is_some()
    } else {
        CLUSTER_CIDRS6.get(&Key::new(128, *addr)).is_some()
    })
}

/// The frontend as a client inside the cluster (`inside`) sees it: an
/// external frontend with externalTrafficPolicy Local balances such clients
/// over every endpoint, as kube-proxy sends in-cluster traffic cluster-wide.
#[inline(always)]
pub fn scope(svc: &mut Service, inside: bool) {
    if inside && svc.flags & SVC_F_LOCAL != 0 && svc.flags & SVC_F_EXTERNAL != 0 {
        svc.table = svc.cluster_table;
        svc.backend_count = svc.cluster_backend_count;
        svc.flags &= !SVC_F_LOCAL;
    }
}

/// Whether `client` may open flows to the frontend: always, unless the
/// Service port has loadBalancerSourceRanges and the client is in none.
#[inline(always)]
pub fn source_allowed(svc: &Service, client: &[u8; 16], family: u8) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let service = svc.id.to_be_bytes();
    if family == FAMILY_V4 {
        let data = SourceRange4 {
            service,
            addr: [client[0], client[1], client[2], client[3]],
        };
        SRC_RANGES4.get(&Key::new(64, data)).is_some()
    } else {
        let data = SourceRange6 {
            service,
            addr: *client,
        };
        SRC_RANGES6.get(&Key::new(160, data)).is_some()
    }
}

/// The backend for a new flow of `client` with flow hash `hash`: with
/// sessionAffinity ClientIP, the one the client's last new flow went to if
/// that was less than `affinity_timeout` ago and it is still usable (the
/// agent removes entries of backends that leave the port); else Maglev's,
/// which the client then keeps. Refreshed by every new flow, as kube-proxy's
/// `recent` match is.
#[inline(always)]
pub fn choose(svc: &Service, hash: u32, client: &[u8; 16], family: u8) -> Option<(u32, Backend)> {
    if svc.flags & SVC_F_AFFINITY == 0 {
        return pick(svc, hash, family);
    }
    let key = AffinityKey {
        client: *client,
        service: svc.id,
        family,
        _pad: [0; 3],
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let timeout = u64::from(svc.affinity_timeout) * 1_000_000_000;
    if let Some(a) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: an LRU value, valid for this run; plain integer fields.
        let (backend, last) = unsafe { ((*a).backend, (*a).last_ns) };
        if now.wrapping_sub(last) <= timeout
            && let Some(b) = BACKENDS.get(backend)
            && b.is_active()
            && b.family == family
            // SAFETY: as above.
            && unsafe { b.addr == (*a).addr && b.port == (*a).port }
        {
            // SAFETY: as above.
            unsafe { (*a).last_ns = now };
            return Some((backend, *b));
        }
    }
    let (id, backend) = pick(svc, hash, family)?;
    let value = Affinity {
        addr: backend.addr,
        last_ns: now,
        backend: id,
        port: backend.port,
        _pad: [0; 2],
    };
    // A client not remembered gets Maglev's choice all the same.
    let _ = AFFINITY.insert(&key, &value, 0);
    Some((id, backend))
}

/// The backend in entry `hash % table_size` of the service's Maglev table.
#[inline(always)]
pub fn pick(svc: &Service, hash: u32, family: u8) -> Option<(u32, Backend)> {
    let size = svc.table_size;
    if size == 0 {
        return None;
    }
    let entry = hash % size;
    let element = svc.table.wrapping_add(entry / 2);
    let pair = MAGLEV.get(element)?;
    let id = if entry % 2 == 0 {
        pair.ids[0]
    } else {
        pair.ids[1]
    };
    let backend = *BACKENDS.get(id)?;
    if !backend.is_active() || backend.family != family {
        return None;
    }
    Some((id, backend))
}

/// Whether the backend a forward entry points at still exists, as the same
/// address and port (ids are reused only after a quarantine, but check anyway).
#[inline(always)]
pub fn still_serves(e: &CtEntry) -> bool {
    match BACKENDS.get(e.backend) {
        Some(b) => b.is_active() && b.addr == e.nat_dst && b.port == e.nat_dst_port,
        None => false,
    }
}
