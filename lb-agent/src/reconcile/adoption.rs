//! What the reconciler finds in the maps at start (an earlier agent's
//! frontends and backends), held until the first full sync has taken over what
//! is still desired; the rest is removed then.
//!
//! A desired frontend found in `services` keeps its service id and tables
//! (where they lie and their size), a backend found in `backends` keeps its
//! id, and tables are rewritten entry by entry only where they differ, so an
//! agent restart changes nothing in the datapath.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use anyhow::{Context as _, Result};
use lb_common::{Backend, SVC_F_EXTERNAL, SVC_F_LOCAL, Service, ServiceKey, socket_addr};

use super::{
    Stats,
    encoding::{Extent, FilterKey, Tables, service_key},
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
    /// Tables found in `services` and held in the table space (those that
    /// overlapped another, or lay outside, are not: their ports get new ones).
    held: HashSet<Extent>,
    /// Found service ids and tables already taken over by a port.
    taken_service_ids: HashSet<u32>,
    taken_tables: HashSet<Extent>,
}

/// The tables a frontend found in `services` names: its own, and the
/// cluster-wide one of a Local external frontend.
fn tables_of(svc: &Service) -> [Option<Extent>; 2] {
    let own = (svc.backend_count > 0 && svc.table_size > 0)
        .then(|| Extent::of(svc.table, svc.table_size));
    let local_external = svc.flags & SVC_F_LOCAL != 0 && svc.flags & SVC_F_EXTERNAL != 0;
    let cluster = (local_external && svc.cluster_backend_count > 0 && svc.table_size > 0)
        .then(|| Extent::of(svc.cluster_table, svc.table_size));
    [own, cluster]
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

    /// Holds every id and table the maps use, so that nothing new is written
    /// over them while desired ports take them over, and counts the filter
    /// bits standing for the entries (the pinned bitmap has them set already).
    pub(super) fn hold(&mut self, ids: &mut IdSpaces, filter: &mut Filter) {
        for (id, _) in self.backends.values() {
            ids.backends.claim(*id);
        }
        for svc in self.frontends.values() {
            ids.services.claim(svc.id);
            for e in tables_of(svc).into_iter().flatten() {
                if ids.tables.claim(e) {
                    self.held.insert(e);
                } else {
                    log::warn!(
                        "a Maglev table found at element {} ({} entries) overlaps another or \
                         lies outside the maglev map: its Service port gets a new one",
                        e.start,
                        svc.table_size
                    );
                }
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
    /// (an earlier agent wrote it), its service id and tables are that entry's.
    /// Returns None if none is; allocates an id if the found one is taken.
    /// Tables of another size than the first one taken are not taken (the
    /// port's two tables share a size); the reconciler gives the port new ones.
    pub(super) fn port(
        &mut self,
        key: &PortKey,
        spec: &PortSpec,
        service_ids: &mut Ids,
    ) -> Option<(u32, Tables)> {
        let mut found: Option<(Option<u32>, Tables)> = None;
        for (f, fs) in &spec.frontends {
            let Some(existing) = self.frontends.get(&service_key(f)) else {
                continue;
            };
            let (id, tables) = found.get_or_insert((None, Tables::default()));
            if id.is_none() && self.taken_service_ids.insert(existing.id) {
                *id = Some(existing.id);
            }
            let [own, cluster] = tables_of(existing);
            for (slot, e) in [(fs.scope, own), (crate::model::Scope::Cluster, cluster)] {
                let Some(e) = e else { continue };
                let fits = tables.size == 0 || tables.size == existing.table_size;
                if tables.get(slot).is_none()
                    && fits
                    && self.held.contains(&e)
                    && self.taken_tables.insert(e)
                {
                    *tables.get_mut(slot) = Some(e);
                    tables.size = existing.table_size;
                }
            }
        }
        let (id, tables) = found?;
        let id = match id {
            Some(id) => id,
            None => service_ids.alloc()?,
        };
        log::debug!("{key:?}: adopted service id {id} tables {tables:?}");
        Some((id, tables))
    }

    /// After the first full sync: removes what was found and not taken over,
    /// and lets go of its ids and tables (those a port took over stay its own).
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
        }
        for e in std::mem::take(&mut self.held) {
            if !self.taken_tables.contains(&e) {
                ids.tables.release(e);
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
        self.taken_tables.clear();
    }
}
