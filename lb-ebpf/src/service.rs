//! Service lookup and backend choice (Maglev).

use lb_common::{
    Backend, Config, CtEntry, FlowKey, Service, ServiceKey, hash, maglev_row_elements,
};

use crate::maps::{ADDR_FILTER, BACKENDS, CONFIG, MAGLEV, SERVICES};

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

/// The backend in slot `hash % maglev_size` of the service's Maglev row.
#[inline(always)]
pub fn pick(svc: &Service, cfg: &Config, hash: u32, family: u8) -> Option<(u32, Backend)> {
    let size = cfg.maglev_size;
    if size == 0 {
        return None;
    }
    let entry = hash % size;
    let element = svc
        .table
        .wrapping_mul(maglev_row_elements(size))
        .wrapping_add(entry / 2);
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
