//! Turns the desired state into map entries, writing only what changed.
//!
//! - [`encoding`]: how the model is written into the maps (keys, values,
//!   filter bits); the only encoder of `services` and `backends` values.
//! - [`filter`]: the reference-counted `addr_filter` bits.
//! - `ids`: the service-id and backend-id allocators, and where tables go.
//! - `adoption`: what an earlier agent left in the maps, taken over at start.
//! - `tables`: Maglev tables, sized per port, placed, built ahead on a few
//!   threads and written.
//! - [`Reconciler`] (here): which port owns which entry, in what order entries
//!   are written.
//!
//! Ids are the reconciler's: a service id (counters) per Service port, a range
//! of `maglev` per table, a backend id per endpoint address. They stay stable
//! while their owner exists, and freed ids are reused last.
//!
//! Write order keeps the datapath consistent at every instant: new backends
//! first, then Maglev tables, then frontends, then removals, and backends are freed
//! last, once nothing points at them.

mod adoption;
pub mod departed;
pub mod encoding;
pub mod filter;
mod ids;
mod tables;
mod verify;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Result;
use lb_common::{Backend, PROTO_UDP, Service, ServiceKey};

pub use self::verify::Drift;
use self::{
    adoption::Adoption,
    encoding::{FilterKey, Tables},
    filter::Filter,
    ids::IdSpaces,
    tables::{Prebuilt, TableError},
};
use crate::{
    bpf::{Maps, Sizes},
    cluster::{Problem, ProblemKind},
    model::{Desired, PortKey, PortSpec, Prefix, Proto},
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
    tables: Tables,
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
    /// UDP flows this pass made stale (see [`StaleUdp`]).
    pub udp_gone: StaleUdp,
}

/// What makes UDP flows stale, found by a pass. Their conntrack entries
/// would keep datagrams of open flows going to the old backends, so the agent
/// hands them to the conntrack janitor, as kube-proxy clears UDP conntrack
/// entries. TCP is not collected: its connections end by themselves (FIN,
/// RST, idle), as with kube-proxy, even to a backend that left.
///
/// - `frontends`: UDP frontends that no longer lead to the Service port they
///   led to: removed from `services` (the Service or the port deleted, the
///   port or nodePort renumbered, a type change or an address that took its
///   frontends along), or rewritten for another Service port (kube-proxy
///   clears the Service IPs and ports it removes).
/// - `backends`: (service id, backend id) of backends that left a UDP port:
///   gone from its slices or no longer serving, where the backend itself may
///   live on for other ports (kube-proxy clears the flows of the endpoints
///   it removes; conformance #21).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StaleUdp {
    pub frontends: BTreeSet<ServiceKey>,
    pub backends: BTreeSet<(u32, u32)>,
}

impl StaleUdp {
    /// Notes `key` if it is a UDP frontend (address entries, port 0 and
    /// protocol 0, are none).
    fn note(&mut self, key: &ServiceKey) {
        if key.proto == PROTO_UDP {
            self.frontends.insert(*key);
        }
    }

    pub fn extend(&mut self, other: Self) {
        self.frontends.extend(other.frontends);
        self.backends.extend(other.backends);
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }
}

impl std::fmt::Debug for StaleUdp {
    // A pass that deletes thousands of Services would otherwise print every
    // key in the sync's debug line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} UDP frontends, {} UDP port backends",
            self.frontends.len(),
            self.backends.len()
        )
    }
}

/// The names of the ids in use: what the metrics label each service id's
/// and backend id's counters with. The reconciler keeps them as it hands
/// ids out and takes them back; the scrape reads a copy. They sit behind a
/// lock of their own, held for one insertion or removal, or for the copy,
/// so that a scrape never waits for the reconciler (whose lock a whole sync
/// holds) and never holds up a sync for longer than a copy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdNames {
    /// Service-port ids: the port's name (as written to `service_names`).
    pub services: BTreeMap<u32, String>,
    /// Backend ids: the endpoint's address.
    pub backends: BTreeMap<u32, SocketAddr>,
}

/// [`IdNames`], shared between the reconciler and the metrics.
#[derive(Debug, Clone, Default)]
pub struct SharedIdNames(Arc<Mutex<IdNames>>);

impl SharedIdNames {
    /// A copy of the names now.
    pub fn snapshot(&self) -> IdNames {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdNames> {
        // Each update is one map operation: a panic cannot leave it half done.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Reconciler {
    /// The maps, and with them their sizes (the capacities checked here).
    maps: Maps,
    ports: HashMap<PortKey, Applied>,
    backends: HashMap<SocketAddr, BackendSlot>,
    ids: IdSpaces,
    /// Which port wrote each frontend entry.
    owners: HashMap<ServiceKey, PortKey>,
    /// Found in the maps at start and not yet taken over by a desired port.
    /// Their ids and tables are held (not handed out) until
    /// [`Self::finish_adoption`].
    adoption: Adoption,
    /// Backends whose last user went away during the current pass.
    unused: Vec<SocketAddr>,
    filter: Filter,
    /// Backends in no port that keep their filter bit for their flows.
    departed: departed::Departed,
    /// ClusterIP address entries (port 0) and how many ClusterIP frontends use each.
    cluster_ips: HashMap<ServiceKey, u32>,
    /// Service ids whose `affinity` entries this pass must check, with the
    /// backends their clients may keep (none: the port is gone, or has no
    /// affinity any more).
    affinity_checks: HashMap<u32, BTreeSet<SocketAddr>>,
    /// The names of the service and backend ids in `ports` and `backends`.
    names: SharedIdNames,
    /// Ports the last pass could not bring to their desired state (no room,
    /// or a backend write failed): every later pass tries them again.
    failed: BTreeSet<PortKey>,
    /// A map write failed since [`Self::take_repair_due`] last asked: what
    /// the maps hold may differ from what the reconciler believes written
    /// until a verify pass ([`Self::verify`]) repairs it.
    repair_due: bool,
}

impl Reconciler {
    /// Takes over the maps, remembering what is already in them (see `adoption`).
    pub fn adopt(maps: Maps) -> Result<Self> {
        let mut adoption = Adoption::read(&maps)?;
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
            departed: departed::Departed::default(),
            cluster_ips: HashMap::new(),
            affinity_checks: HashMap::new(),
            names: SharedIdNames::default(),
            failed: BTreeSet::new(),
            repair_due: false,
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

    /// Elements of `maglev` the tables take (and space given up this pass).
    pub fn maglev_elements_used(&self) -> u64 {
        self.ids.tables.used_elements()
    }

    pub fn sizes(&self) -> &Sizes {
        self.maps.sizes()
    }

    /// Brings the ports in `changed`, and those that failed before, to their
    /// state in `desired`. Problems (full maps) are returned; the ports they
    /// concern keep their previous state and are tried again by every later
    /// pass, so that they are written once room frees up.
    pub fn apply(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<PortKey>,
        stats: &mut Stats,
    ) -> Vec<Problem> {
        // Table space given up by the last pass: every frontend that named
        // it has been rewritten since. Cleared, so that `maglev` holds only
        // tables in use (what a dump shows, and what lets a smaller
        // --maglev-entries keep every table).
        for freed in self.ids.tables.settle() {
            if let Err(e) = self.maps.maglev.clear(freed.start, freed.len) {
                log::warn!("clearing Maglev space given up: {e:#}");
            }
        }
        let retried = std::mem::take(&mut self.failed);
        let mut problems = BTreeMap::new();
        let keys: Vec<&PortKey> = changed.union(&retried).collect();
        let removed = |s: &Stats| (s.frontends_removed, s.backends_freed);
        let before = removed(stats);
        self.apply_ports(desired, &keys, stats, &mut problems);
        self.free_unused(stats);
        // Ports refused for room get it in the same pass if the pass removed
        // something: a port that came before the removal in the pass's
        // order, or backends (freed last, after every port had its turn).
        if removed(stats) != before && !self.failed.is_empty() {
            let again = std::mem::take(&mut self.failed);
            let keys: Vec<&PortKey> = again.iter().collect();
            for k in &keys {
                problems.remove(*k);
            }
            // (Table space freed in this pass is not free yet: the next pass
            // settles it.)
            self.apply_ports(desired, &keys, stats, &mut problems);
            self.free_unused(stats);
        }
        self.check_affinities();
        self.settle_departed();
        if self.filter.take_failed() {
            self.repair_due = true;
        }
        problems.into_values().collect()
    }

    /// Brings each of `keys` to its desired state; a port that cannot be is
    /// noted in `failed`, with its problem.
    fn apply_ports(
        &mut self,
        desired: &Desired,
        keys: &[&PortKey],
        stats: &mut Stats,
        problems: &mut BTreeMap<PortKey, Problem>,
    ) {
        // Tables of a batch of ports are built ahead on several threads (the
        // builds are most of a full sync's CPU time), a bounded amount at a time.
        for keys in tables::batches(desired, keys) {
            let built = tables::prebuild(desired, keys);
            for (key, pre) in keys.iter().zip(built) {
                // A port without frontends (all lost to other Services) needs nothing.
                let result = match desired.port(key) {
                    Some(spec) if !spec.frontends.is_empty() => self.upsert(key, spec, pre, stats),
                    _ => self.remove(key, stats),
                };
                if let Err(p) = result {
                    problems.insert((*key).clone(), p);
                    self.failed.insert((*key).clone());
                }
            }
        }
    }

    /// The ports waiting for room (or for a backend write that failed).
    pub fn failed_ports(&self) -> &BTreeSet<PortKey> {
        &self.failed
    }

    /// Whether a map write failed since the last call (a verify pass is due).
    pub fn take_repair_due(&mut self) -> bool {
        std::mem::take(&mut self.repair_due)
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
                Err(e) => {
                    log::error!("{e:#}");
                    self.repair_due = true;
                }
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
                Err(e) => {
                    log::error!("{e:#}");
                    self.repair_due = true;
                }
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
                let (id, tables) = match self.adoption.port(key, spec, &mut self.ids.services) {
                    Some(found) => found,
                    None => match self.ids.services.alloc() {
                        Some(id) => (id, Tables::default()),
                        None => {
                            return Err(Self::capacity_problem(
                                key,
                                "no service id left (--max-services)",
                            ));
                        }
                    },
                };
                let name = key.to_string();
                if let Err(e) = self.maps.set_service_name(id, &name) {
                    log::warn!("{e:#}");
                    self.repair_due = true;
                }
                self.names.lock().services.insert(id, name);
                Applied {
                    id,
                    tables,
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

        // 2. Maglev tables, where there is room for them (else the port keeps
        // what it had: its frontends still name its old tables; or, with
        // tables already, their size: see `tables::place`).
        let placement = match tables::place(&mut self.ids.tables, applied.tables, spec) {
            Ok(p) => p,
            Err(_) => {
                self.ports.insert(key.clone(), applied);
                return Err(Self::capacity_problem(
                    key,
                    "no room for its Maglev tables in the maglev map (--maglev-entries)",
                ));
            }
        };
        applied.tables = placement.tables;
        let short_of = placement.short_of;
        let written = self.write_tables(applied.tables, spec, pre);
        stats.maglev_entries_written += written.as_ref().copied().unwrap_or(0);
        if written.is_err() {
            // A failed write: the place is the port's, and the verify pass
            // writes it again.
            self.repair_due = true;
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
                    encoding::frontend_value(spec, fs, applied.id, applied.tables),
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
        // 4. Removals: frontends, and the table space no frontend names now.
        for (k, v) in &applied.frontends {
            if !wanted_frontends.contains_key(k) && self.owners.get(k) == Some(key) {
                self.disown_frontend(k, v, stats);
            }
        }
        for e in placement.retired {
            self.retire(e);
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
            if key.proto == Proto::Udp
                && let Some(slot) = self.backends.get(&addr)
            {
                stats.udp_gone.backends.insert((applied.id, slot.id));
            }
            self.drop_backend(addr);
        }
        let kept = applied.tables.size;
        self.ports.insert(key.clone(), applied);
        match short_of {
            // Written, but retried until its tables have their size.
            Some(want) => Err(Problem::new(
                ProblemKind::Capacity,
                Some(key.service.clone()),
                format!(
                    "port {:?}/{:?}: its Maglev tables stay at {kept} entries, as there is no \
                     room for {want} in the maglev map (--maglev-entries); its backends are \
                     served in them meanwhile",
                    key.port_name, key.proto
                ),
            )),
            None => Ok(()),
        }
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
        // The entry holds a reference on its address entry while its owner's
        // last write is a ClusterIP's: a frontend that changes kind (its
        // Service's ClusterIP turned externalIP, or taken over by another
        // Service's externalIP, or the other way round) takes or gives it
        // back here, whichever port owned it.
        let was_cluster_ip = !first && current.as_ref().is_some_and(encoding::is_cluster_ip);
        if first && !adopted {
            self.filter.add(&mut self.maps, FilterKey::frontend(&k));
        }
        if current.as_ref() != Some(v) {
            match self.maps.set_service(&k, v) {
                Ok(()) => {
                    stats.frontends_written += 1;
                    // Flows opened under another Service port's id lead to its backends.
                    if current.is_some_and(|c| c.id != v.id) {
                        stats.udp_gone.note(&k);
                    }
                }
                Err(e) => {
                    log::error!("{e:#}");
                    self.repair_due = true;
                }
            }
        }
        match (was_cluster_ip, encoding::is_cluster_ip(v)) {
            (false, true) => self.use_cluster_ip(&k, stats),
            (true, false) => self.release_cluster_ip(&k, stats),
            _ => {}
        }
        self.owners.insert(k, port.clone());
    }

    /// Removes frontend `k` (owned by the caller), its filter reference and, for a
    /// ClusterIP, its reference on the address entry.
    fn disown_frontend(&mut self, k: &ServiceKey, v: &Service, stats: &mut Stats) {
        self.owners.remove(k);
        if self.maps.remove_service(k).is_ok() {
            stats.frontends_removed += 1;
            stats.udp_gone.note(k);
        }
        self.filter.remove(&mut self.maps, FilterKey::frontend(k));
        if encoding::is_cluster_ip(v) {
            self.release_cluster_ip(k, stats);
        }
    }

    /// One ClusterIP frontend fewer on this address (gone, or no longer a
    /// ClusterIP): the last removes the address entry.
    fn release_cluster_ip(&mut self, k: &ServiceKey, stats: &mut Stats) {
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
        match self.maps.set_service(&a, &encoding::address_value()) {
            Ok(()) => stats.frontends_written += 1,
            Err(e) => {
                log::error!("{e:#}");
                self.repair_due = true;
            }
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
                // skipped once a table points at it. A departed backend still
                // holds its reference.
                if !self.departed.returned(&addr) {
                    self.filter.add(&mut self.maps, FilterKey::backend(addr));
                }
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
        self.names.lock().backends.insert(id, addr);
        Ok(())
    }

    /// Follows the backends conntrack holds flows of (the janitor's
    /// sweeps): a backend that leaves every port keeps its filter bit while
    /// they last (see [`departed`]).
    pub fn follow_flows(&mut self, flows: departed::SharedFlowBackends) {
        self.departed.follow(flows);
    }

    /// Departed backends still holding their filter bit for their flows.
    pub fn departed_backends(&self) -> usize {
        self.departed.count()
    }

    fn settle_departed(&mut self) {
        let backends = &self.backends;
        self.departed.settle(
            |a| backends.contains_key(a),
            &mut self.filter,
            &mut self.maps,
        );
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
                self.names.lock().backends.remove(&id);
                match self.maps.clear_backend(id) {
                    Ok(()) => stats.backends_freed += 1,
                    Err(e) => {
                        log::error!("{e:#}");
                        self.repair_due = true;
                    }
                }
                self.ids.backends.release(id);
                // Its TCP flows go on: their replies must still be looked up.
                self.departed.left(addr, &mut self.filter, &mut self.maps);
            }
        }
    }

    /// Writes a port's tables where `at` places them; returns the entries
    /// written (both tables are tried when one fails).
    fn write_tables(
        &mut self,
        at: Tables,
        spec: &PortSpec,
        pre: Prebuilt,
    ) -> Result<usize, TableError> {
        let backends = &self.backends;
        let id = |addr: &SocketAddr| backends.get(addr).map(|s| s.id);
        let maglev = &mut self.maps.maglev;
        let cluster = tables::write_table(
            maglev,
            at.cluster,
            at.size,
            Some(&spec.cluster),
            id,
            pre.cluster,
        );
        let local = tables::write_table(
            maglev,
            at.local,
            at.size,
            spec.local.as_ref(),
            id,
            pre.local,
        );
        Ok(cluster? + local?)
    }

    /// Gives up table space no frontend names any more.
    fn retire(&mut self, e: encoding::Extent) {
        self.maps.maglev.forget(e.start);
        self.ids.tables.release(e);
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
        for e in [applied.tables.cluster, applied.tables.local]
            .into_iter()
            .flatten()
        {
            self.retire(e);
        }
        self.ids.services.release(applied.id);
        self.names.lock().services.remove(&applied.id);
        for addr in applied.backends {
            self.drop_backend(addr);
        }
        Ok(())
    }

    /// The names of the ids in use, kept up to date from now on (for the
    /// metrics, on another thread).
    pub fn id_names(&self) -> SharedIdNames {
        self.names.clone()
    }
}
