//! Service lookup and backend choice (Maglev).

use lb_common::{Backend, Config, CtEntry, FlowKey, Service, ServiceKey};

use crate::maps::{BACKENDS, CONFIG, MAGLEV, SERVICES};

/// The frontend a packet with `key` is addressed to, if it is a service.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Service> {
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dst_port,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(&skey).copied() }
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
    let slot = svc.table.wrapping_mul(size).wrapping_add(hash % size);
    let id = *MAGLEV.get(slot)?;
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
