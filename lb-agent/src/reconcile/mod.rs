//! Turns the desired state into map entries, writing only what changed.
//!
//! - [`encoding`]: how the model is written into the maps (keys, values,
//!   filter bits); the only encoder of `services` and `backends` values.
//! - [`filter`]: the reference-counted `addr_filter` bits.
//! - `ids`: the service-id, row and backend-id allocator.
//! - `adoption`: what an earlier agent left in the maps, taken over at start.
//! - `tables`: Maglev rows, built ahead on a few threads and written.
//! - [`Reconciler`] (here): which port owns which entry, in what order entries
//!   are written.
//!
//! Ids are the reconciler's: a service id (counters) per Service port, a Maglev
//! row per table, a backend id per endpoint address. They stay stable while their
//! owner exists, and freed ids are reused last.
//!
//! Write order keeps the datapath consistent at every instant: new backends
//! first, then Maglev rows, then frontends, then removals, and backends are freed
//! last, once nothing points at them.

mod adoption;
pub mod encoding;
pub mod filter;
mod ids;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use anyhow::Result;
use lb_common::{Backend, Service, ServiceKey};

use self::{
    adoption::Adoption,
    encoding::{FilterKey, Rows},
    filter::Filter,
    ids::IdSpaces,
    tables::Prebuilt,
};
use crate::{
    bpf::{Maps, Sizes},
    cluster::{Problem, ProblemKind},
    model::{Desired, PortKey, PortSpec, Prefix},
};

/// A backend slot: its id, what is written there, and how many tables use it.
#[derive(Debug)]
struct BackendSlot {
    id: u32,
    value: Backend,
    users: u32,
}

/// What is written for one Service port.
#[derive(Debug, Default)]
struct Applied {
    id: u32,
    rows: Rows,
    frontends: BTreeMap<ServiceKey, Service>,
    /// Backends (by address) this port holds a reference on.
    backends: BTreeSet<SocketAddr>,
    /// The loadBalancerSourceRanges entries written under `id`.
    ranges: BTreeSet<Prefix>,
}

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_freed: usize,
    pub maglev_entries_written: usize,
}

pub struct Reconciler {
    /// The maps, and with them their sizes (the capacities checked here, the
    /// Maglev table size).
    maps: Maps,
    ports: HashMap<PortKey, Applied>,
    backends: HashMap<SocketAddr, BackendSlot>,
    ids: IdSpaces,
    /// Which port wrote each frontend entry.
    owners: HashMap<ServiceKey, PortKey>,
    /// Found in the maps at start and not yet taken over by a desired port.
    /// Their ids and rows are held (not handed out) until
    /// [`Self::finish_adoption`].
    adoption: Adoption,
    /// Backends whose last user went away during the current pass.
    unused: Vec<SocketAddr>,
    filter: Filter,
    /// ClusterIP address entries (port 0) and how many ClusterIP frontends use each.
    cluster_ips: HashMap<ServiceKey, u32>,
    /// Service ids whose `affinity` entries this pass must check, with the
    /// backends their clients may keep (none: the port is gone, or has no
    /// affinity any more).
    affinity_checks: HashMap<u32, BTreeSet<SocketAddr>>,
}

impl Reconciler {
    /// Takes over the maps, remembering what is already in them (see `adoption`).
    pub fn adopt(maps: Maps) -> Result<Self> {
        let adoption = Adoption::read(&maps)?;
        let mut ids = IdSpaces::new(maps.sizes());
        let mut filter = Filter::default();
        adoption.hold(&mut ids, &mut filter);
        Ok(Self {
            maps,
            ports: HashMap::new(),
            backends: HashMap::new(),
            ids,
            owners: HashMap::new(),
            adoption,
            unused: Vec::new(),
            filter,
            cluster_ips: HashMap::new(),
            affinity_checks: HashMap::new(),
        })
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Number of frontends (entries of `services`) and backends written.
    pub fn occupancy(&self) -> (usize, usize, usize) {
        (self.owners.len(), self.backends.len(), self.ports.len())
    }

    pub fn sizes(&self) -> &Sizes {
        self.maps.sizes()
    }

    /// Brings the ports in `changed` to their state in `desired`. Problems (full
    /// maps) are returned; the ports they concern keep their previous state.
    pub fn apply(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<PortKey>,
        stats: &mut Stats,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        let keys: Vec<&PortKey> = changed.iter().collect();
        let table_size = self.sizes().maglev_table_size;
        // Tables of a batch of ports are built ahead on several threads (the
        // builds are most of a full sync's CPU time), a bounded amount at a time.
        for keys in keys.chunks(tables::ports_per_batch(table_size)) {
            let built = tables::prebuild(desired, keys, table_size);
            for (key, pre) in keys.iter().zip(built) {
                // A port without frontends (all lost to other Services) needs nothing.
                let result = match desired.port(key) {
                    Some(spec) if !spec.frontends.is_empty() => self.upsert(key, spec, pre, stats),
                    _ => self.remove(key, stats),
                };
                if let Err(p) = result {
                    problems.push(p);
                }
            }
        }
        self.free_unused(stats);
        self.check_affinities();
        problems
    }

    /// Removes the `affinity` entries of the ports this pass changed whose
    /// backend the port no longer balances to (gone, draining, or the port
    /// lost its affinity): such a client's next flow is balanced afresh, as
    /// kube-proxy's affinity follows the endpoints chosen. One walk of the map
    /// for the whole pass.
    fn check_affinities(&mut self) {
        let checks = std::mem::take(&mut self.affinity_checks);
        if checks.is_empty() {
            return;
        }
        let gone = |k: &lb_common::AffinityKey, v: &lb_common::Affinity| {
            checks.get(&k.service).is_some_and(|keep| {
                let addr = lb_common::socket_addr(&v.addr, k.family, v.port);
                !addr.is_some_and(|a| keep.contains(&a))
            })
        };
        match self.maps.remove_affinities(gone) {
            Ok(0) => {}
            Ok(n) => log::debug!("{n} affinity entries of backends that left their port removed"),
            Err(e) => log::error!("cleaning affinity entries: {e:#}"),
        }
    }

    /// Writes the port's loadBalancerSourceRanges entries that are new (before
    /// its frontends say to look them up).
    fn add_ranges(&mut self, applied: &mut Applied, wanted: &BTreeSet<Prefix>) {
        for p in wanted.difference(&applied.ranges.clone()) {
            match self.maps.add_source_range(applied.id, (p.addr, p.len)) {
                Ok(()) => {
                    applied.ranges.insert(*p);
                }
                Err(e) => log::error!("{e:#}"),
            }
        }
    }

    /// Removes the port's entries that are not `wanted` (after its frontends
    /// stopped naming them).
    fn drop_ranges(&mut self, applied: &mut Applied, wanted: &BTreeSet<Prefix>) {
        let gone: Vec<Prefix> = applied.ranges.difference(wanted).copied().collect();
        for p in gone {
            match self.maps.remove_source_range(applied.id, (p.addr, p.len)) {
                Ok(()) => {
                    applied.ranges.remove(&p);
                }
                Err(e) => log::error!("{e:#}"),
            }
        }
    }

    /// After the first full sync: removes whatever was in the maps at start and
    /// is not desired any more.
    pub fn finish_adoption(&mut self, stats: &mut Stats) {
        // Source ranges no port wrote (an earlier agent's, of ports gone).
        let written: BTreeSet<(u32, Prefix)> = self
            .ports
            .values()
            .flat_map(|a| a.ranges.iter().map(move |p| (a.id, *p)))
            .collect();
        match self.maps.source_ranges() {
            Ok(found) => {
                for (id, (addr, len)) in found {
                    if !written.contains(&(id, Prefix { addr, len })) {
                        let _ = self.maps.remove_source_range(id, (addr, len));
                    }
                }
            }
            Err(e) => log::error!("{e:#}"),
        }
        let owners = &self.owners;
        self.adoption.finish(
            &mut self.maps,
            &mut self.filter,
            &mut self.ids,
            |k| owners.contains_key(k),
            stats,
        );
    }

    fn capacity_problem(key: &PortKey, what: &str) -> Problem {
        Problem::new(
            ProblemKind::Capacity,
            Some(key.service.clone()),
            format!(
                "port {:?}/{:?}: {what}; the port is left as it was",
                key.port_name, key.proto
            ),
        )
    }

    fn upsert(
        &mut self,
        key: &PortKey,
        spec: &PortSpec,
        pre: Prebuilt,
        stats: &mut Stats,
    ) -> Result<(), Problem> {
        // Check capacity before touching anything: never a partial table.
        let wanted: BTreeSet<SocketAddr> = spec.all_backends().map(|b| b.addr).collect();
        let new_backends = wanted
            .iter()
            .filter(|a| !self.backends.contains_key(a) && !self.adoption.backends.contains_key(a))
            .count();
        if new_backends > self.ids.backends.available() {
            return Err(Self::capacity_problem(
                key,
                "more backends than the backends map holds",
            ));
        }
        let existing_frontends = self.ports.get(key).map_or(0, |a| a.frontends.len());
        let added_frontends = spec.frontends.len().saturating_sub(existing_frontends);
        if self.owners.len() + added_frontends > self.sizes().services as usize {
            return Err(Self::capacity_problem(
                key,
                "more frontends than the services map holds",
            ));
        }

        let mut applied = match self.ports.remove(key) {
            Some(a) => a,
            None => {
                let (id, rows) = match self.adoption.port(key, spec, &mut self.ids.services) {
                    Some(found) => found,
                    None => match self.ids.services.alloc() {
                        Some(id) => (id, Rows::default()),
                        None => {
                            return Err(Self::capacity_problem(
                                key,
                                "no service id left (--max-services)",
                            ));
                        }
                    },
                };
                if let Err(e) = self.maps.set_service_name(id, &key.to_string()) {
                    log::warn!("{e:#}");
                }
                Applied {
                    id,
                    rows,
                    ..Applied::default()
                }
            }
        };

        // 1. Backends, so that every id a table mentions exists (and the
        // draining ones, which keep their flows).
        for b in spec.all_backends() {
            let fresh = applied.backends.insert(b.addr);
            if let Err(e) = self.use_backend(b.addr, encoding::backend_value(b), fresh, stats) {
                self.ports.insert(key.clone(), applied);
                return Err(Self::capacity_problem(key, &e));
            }
        }

        // 2. Maglev rows.
        let cluster = self.write_table(&mut applied.rows.cluster, Some(&spec.cluster), pre.cluster);
        let local = self.write_table(&mut applied.rows.local, spec.local.as_ref(), pre.local);
        stats.maglev_entries_written +=
            cluster.as_ref().unwrap_or(&0) + local.as_ref().unwrap_or(&0);
        if cluster.is_err() || local.is_err() {
            self.ports.insert(key.clone(), applied);
            return Err(Self::capacity_problem(
                key,
                "no Maglev row left (--max-services)",
            ));
        }

        // 3. Frontends, after the source ranges they name.
        let wanted_ranges = spec.source_ranges.clone().unwrap_or_default();
        self.add_ranges(&mut applied, &wanted_ranges);
        let wanted_frontends: BTreeMap<ServiceKey, Service> = spec
            .frontends
            .iter()
            .map(|(f, fs)| {
                (
                    encoding::service_key(f),
                    encoding::frontend_value(spec, fs, applied.id, applied.rows),
                )
            })
            .collect();
        for (k, v) in &wanted_frontends {
            // What the map holds now: this port's last write, or what an earlier
            // agent left. (An entry another port owned holds that port's id, so it
            // differs and is rewritten.)
            let current = match self.owners.get(k) {
                Some(owner) if owner == key => applied.frontends.get(k).copied(),
                Some(other) => self
                    .ports
                    .get(other)
                    .and_then(|p| p.frontends.get(k))
                    .copied(),
                None => self.adoption.frontends.get(k).copied(),
            };
            self.own_frontend(key, *k, v, current, stats);
        }
        // 4. Removals.
        for (k, v) in &applied.frontends {
            if !wanted_frontends.contains_key(k) && self.owners.get(k) == Some(key) {
                self.disown_frontend(k, v, stats);
            }
        }
        applied.frontends = wanted_frontends;
        self.drop_ranges(&mut applied, &wanted_ranges);
        let keep = if spec.affinity_timeout.is_some() {
            spec.cluster
                .backends
                .iter()
                .chain(spec.local.iter().flat_map(|t| t.backends.iter()))
                .map(|b| b.addr)
                .collect()
        } else {
            BTreeSet::new()
        };
        self.affinity_checks.insert(applied.id, keep);
        let gone: Vec<SocketAddr> = applied.backends.difference(&wanted).copied().collect();
        for addr in gone {
            applied.backends.remove(&addr);
            self.drop_backend(addr);
        }
        self.ports.insert(key.clone(), applied);
        Ok(())
    }

    /// Makes `port` the owner of frontend `k` and writes `v` if the map holds
    /// something else. The first owner of a key takes a filter reference (or the
    /// one an adopted entry held) and, for a ClusterIP, one on its address entry.
    fn own_frontend(
        &mut self,
        port: &PortKey,
        k: ServiceKey,
        v: &Service,
        current: Option<Service>,
        stats: &mut Stats,
    ) {
        let adopted = self.adoption.frontends.remove(&k).is_some();
        let first = !self.owners.contains_key(&k);
        if first && !adopted {
            self.filter.add(&mut self.maps, FilterKey::frontend(&k));
        }
        if current.as_ref() != Some(v) && self.maps.set_service(&k, v).is_ok() {
            stats.frontends_written += 1;
        }
        if first && encoding::is_cluster_ip(v) {
            self.use_cluster_ip(&k, stats);
        }
        self.owners.insert(k, port.clone());
    }

    /// Removes frontend `k` (owned by the caller), its filter reference and, for a
    /// ClusterIP, its reference on the address entry.
    fn disown_frontend(&mut self, k: &ServiceKey, v: &Service, stats: &mut Stats) {
        self.owners.remove(k);
        if self.maps.remove_service(k).is_ok() {
            stats.frontends_removed += 1;
        }
        self.filter.remove(&mut self.maps, FilterKey::frontend(k));
        if encoding::is_cluster_ip(v) {
            let a = encoding::address_key(k);
            if let Some(n) = self.cluster_ips.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.cluster_ips.remove(&a);
                    if self.maps.remove_service(&a).is_ok() {
                        stats.frontends_removed += 1;
                    }
                    self.filter.remove(&mut self.maps, FilterKey::frontend(&a));
                }
            }
        }
    }

    /// One more ClusterIP frontend on this address: the first writes (or takes
    /// over) the address entry that makes other ports of the address refused.
    fn use_cluster_ip(&mut self, k: &ServiceKey, stats: &mut Stats) {
        let a = encoding::address_key(k);
        let n = self.cluster_ips.entry(a).or_insert(0);
        *n += 1;
        if *n > 1 {
            return;
        }
        if self.adoption.frontends.remove(&a).is_some() {
            return;
        }
        self.filter.add(&mut self.maps, FilterKey::frontend(&a));
        if self
            .maps
            .set_service(&a, &encoding::address_value())
            .is_ok()
        {
            stats.frontends_written += 1;
        }
    }

    fn use_backend(
        &mut self,
        addr: SocketAddr,
        value: Backend,
        fresh_user: bool,
        stats: &mut Stats,
    ) -> Result<(), String> {
        if let Some(slot) = self.backends.get_mut(&addr) {
            if fresh_user {
                slot.users += 1;
            }
            if slot.value != value {
                slot.value = value;
                let id = slot.id;
                self.write_backend(id, &value)?;
                stats.backends_written += 1;
            }
            return Ok(());
        }
        // An adopted backend keeps its id (held since start) and filter reference.
        let (id, written) = match self.adoption.backends.remove(&addr) {
            Some((id, found)) => (id, Some(found)),
            None => {
                let id = self
                    .ids
                    .backends
                    .alloc()
                    .ok_or("no backend id left (--max-backends)")?;
                // The filter bit goes first: replies from the backend must not be
                // skipped once a table points at it.
                self.filter.add(&mut self.maps, FilterKey::backend(addr));
                (id, None)
            }
        };
        if written != Some(value) {
            self.write_backend(id, &value)?;
            stats.backends_written += 1;
        }
        self.backends.insert(
            addr,
            BackendSlot {
                id,
                value,
                users: 1,
            },
        );
        Ok(())
    }

    fn write_backend(&mut self, id: u32, value: &Backend) -> Result<(), String> {
        self.maps
            .set_backend(id, value)
            .map_err(|e| format!("{e:#}"))
    }

    fn drop_backend(&mut self, addr: SocketAddr) {
        if let Some(slot) = self.backends.get_mut(&addr) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                self.unused.push(addr);
            }
        }
    }

    /// Frees backends nobody uses at the end of a pass (so one that moved
    /// between ports in the same pass keeps its id).
    fn free_unused(&mut self, stats: &mut Stats) {
        for addr in std::mem::take(&mut self.unused) {
            if let Some(slot) = self.backends.get(&addr)
                && slot.users == 0
            {
                let id = slot.id;
                self.backends.remove(&addr);
                if self.maps.clear_backend(id).is_ok() {
                    stats.backends_freed += 1;
                }
                self.ids.backends.release(id);
                self.filter.remove(&mut self.maps, FilterKey::backend(addr));
            }
        }
    }

    /// Writes (or frees) one of a port's rows; returns the entries written.
    fn write_table(
        &mut self,
        row: &mut Option<u32>,
        table: Option<&crate::model::Table>,
        prebuilt: Option<Vec<u32>>,
    ) -> Result<usize, tables::NoRowLeft> {
        let backends = &self.backends;
        tables::write_row(
            &mut self.maps.maglev,
            &mut self.ids.rows,
            row,
            table,
            |addr| backends.get(addr).map(|s| s.id),
            prebuilt,
        )
    }

    fn remove(&mut self, key: &PortKey, stats: &mut Stats) -> Result<(), Problem> {
        let Some(applied) = self.ports.remove(key) else {
            return Ok(());
        };
        for (k, v) in &applied.frontends {
            if self.owners.get(k) == Some(key) {
                self.disown_frontend(k, v, stats);
            }
        }
        let mut applied = applied;
        self.drop_ranges(&mut applied, &BTreeSet::new());
        self.affinity_checks.insert(applied.id, BTreeSet::new());
        for r in [applied.rows.cluster, applied.rows.local]
            .into_iter()
            .flatten()
        {
            self.ids.rows.release(r);
        }
        self.ids.services.release(applied.id);
        for addr in applied.backends {
            self.drop_backend(addr);
        }
        Ok(())
    }

    /// The service id of a port (for metrics labels).
    pub fn service_ids(&self) -> impl Iterator<Item = (&PortKey, u32)> {
        self.ports.iter().map(|(k, a)| (k, a.id))
    }

    /// Backend ids by address (for metrics labels).
    pub fn backend_ids(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.backends.iter().map(|(a, s)| (*a, s.id))
    }
}
