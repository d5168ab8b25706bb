//! What the reconciler finds in the maps at start (an earlier agent's
//! frontends and backends), held until the first full sync has taken over what
//! is still desired; the rest is removed then.
//!
//! A desired frontend found in `services` keeps its service id and row, a
//! backend found in `backends` keeps its id, and rows are rewritten entry by
//! entry only where they differ, so an agent restart changes nothing in the
//! datapath.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use anyhow::{Context as _, Result};
use lb_common::{Backend, Service, ServiceKey, socket_addr};

use super::{
    Stats,
    encoding::{FilterKey, Rows, service_key},
    filter::Filter,
    ids::{IdSpaces, Ids},
};
use crate::{
    bpf::Maps,
    model::{PortKey, PortSpec},
};

#[derive(Debug, Default)]
pub(super) struct Adoption {
    /// Frontends found in `services` and not yet taken over by a desired port.
    pub(super) frontends: HashMap<ServiceKey, Service>,
    /// Backends found in `backends` (id, value) and not yet taken over.
    pub(super) backends: HashMap<SocketAddr, (u32, Backend)>,
    /// Found service ids and rows already taken over by a port.
    taken_service_ids: HashSet<u32>,
    taken_rows: HashSet<u32>,
}

impl Adoption {
    /// Reads what the maps hold.
    pub(super) fn read(maps: &Maps) -> Result<Self> {
        let mut frontends = HashMap::new();
        for entry in maps.services.iter() {
            let (k, v) = entry.context("reading services")?;
            frontends.insert(k, v);
        }
        let mut backends = HashMap::new();
        for id in 0..maps.sizes().backends {
            let b = maps.backends.get(&id, 0).context("reading backends")?;
            if b.is_active()
                && let Some(addr) = socket_addr(&b.addr, b.family, b.port)
            {
                backends.insert(addr, (id, b));
            }
        }
        log::info!(
            "adopting {} frontends and {} backends found in the maps",
            frontends.len(),
            backends.len()
        );
        Ok(Self {
            frontends,
            backends,
            ..Self::default()
        })
    }

    /// Holds every id and row the maps use, so that nothing new is written over
    /// them while desired ports take them over, and counts the filter bits
    /// standing for the entries (the pinned bitmap has them set already).
    pub(super) fn hold(&self, ids: &mut IdSpaces, filter: &mut Filter) {
        for (id, _) in self.backends.values() {
            ids.backends.claim(*id);
        }
        for svc in self.frontends.values() {
            ids.services.claim(svc.id);
            if svc.backend_count > 0 {
                ids.rows.claim(svc.table);
            }
        }
        for k in self.frontends.keys() {
            filter.count(FilterKey::frontend(k));
        }
        for addr in self.backends.keys() {
            filter.count(FilterKey::backend(*addr));
        }
    }

    /// A port seen for the first time: if one of its frontends is in the maps
    /// (an earlier agent wrote it), its service id and rows are that entry's.
    /// Returns None if none is; allocates an id if the found one is taken.
    pub(super) fn port(
        &mut self,
        key: &PortKey,
        spec: &PortSpec,
        service_ids: &mut Ids,
    ) -> Option<(u32, Rows)> {
        let mut found: Option<(Option<u32>, Rows)> = None;
        for (f, fs) in &spec.frontends {
            let Some(existing) = self.frontends.get(&service_key(f)) else {
                continue;
            };
            let (id, rows) = found.get_or_insert((None, Rows::default()));
            if id.is_none() && self.taken_service_ids.insert(existing.id) {
                *id = Some(existing.id);
            }
            let row = rows.get_mut(fs.scope);
            if row.is_none() && existing.backend_count > 0 && self.taken_rows.insert(existing.table)
            {
                *row = Some(existing.table);
            }
        }
        let (id, rows) = found?;
        let id = match id {
            Some(id) => id,
            None => service_ids.alloc()?,
        };
        log::debug!("{key:?}: adopted service id {id} rows {rows:?}");
        Some((id, rows))
    }

    /// After the first full sync: removes what was found and not taken over,
    /// and lets go of its ids and rows (those a port took over stay its own).
    /// `owned` says whether a desired port writes a key now.
    pub(super) fn finish(
        &mut self,
        maps: &mut Maps,
        filter: &mut Filter,
        ids: &mut IdSpaces,
        owned: impl Fn(&ServiceKey) -> bool,
        stats: &mut Stats,
    ) {
        for (key, svc) in std::mem::take(&mut self.frontends) {
            if !owned(&key) && maps.remove_service(&key).is_ok() {
                stats.frontends_removed += 1;
                stats.udp_gone.note(&key);
            }
            filter.remove(maps, FilterKey::frontend(&key));
            if !self.taken_service_ids.contains(&svc.id) {
                ids.services.release(svc.id);
            }
            if svc.backend_count > 0 && !self.taken_rows.contains(&svc.table) {
                ids.rows.release(svc.table);
            }
        }
        for (addr, (id, _)) in std::mem::take(&mut self.backends) {
            if maps.clear_backend(id).is_ok() {
                stats.backends_freed += 1;
            }
            filter.remove(maps, FilterKey::backend(addr));
            ids.backends.release(id);
        }
        self.taken_service_ids.clear();
        self.taken_rows.clear();
    }
}
