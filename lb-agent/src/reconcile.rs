//! Turns the desired state into map entries, writing only what changed.
//!
//! Ids are the reconciler's: a service id (counters) per Service port, a Maglev
//! row per table, a backend id per endpoint address. They stay stable while their
//! owner exists, and freed ids are reused last (a FIFO behind the never-used
//! ones), so a conntrack entry never finds its backend id reused by another pod
//! soon after.
//!
//! Write order keeps the datapath consistent at every instant: new backends
//! first, then Maglev rows, then frontends, then removals, and backends are freed
//! last, once nothing points at them.
//!
//! On start the reconciler adopts what is in the maps: a desired frontend found
//! in `services` keeps its service id and row, a backend found in `backends`
//! keeps its id, and rows are rewritten entry by entry only where they differ, so
//! an agent restart changes nothing in the datapath.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::SocketAddr,
};

use anyhow::{Context as _, Result};
use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, PROTO_TCP, PROTO_UDP,
    SVC_F_ADDRESS, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_SNAT_REMOTE, SVC_F_TERMINATING_FALLBACK,
    Service, ServiceKey, hash,
};

use crate::{
    bpf::{Maps, Sizes},
    cluster::{Problem, ProblemKind},
    maglev,
    model::{Desired, Frontend, PortKey, PortSpec, Proto, Scope, Table},
};

/// Ids from `0..capacity`, never-used ones first, then freed ones oldest first.
#[derive(Debug)]
struct Ids {
    capacity: u32,
    next_fresh: u32,
    free: VecDeque<u32>,
    in_use: HashSet<u32>,
}

impl Ids {
    fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next_fresh: 0,
            free: VecDeque::new(),
            in_use: HashSet::new(),
        }
    }

    fn available(&self) -> usize {
        (self.capacity - self.next_fresh) as usize + self.free.len()
    }

    fn alloc(&mut self) -> Option<u32> {
        let id = if self.next_fresh < self.capacity {
            self.next_fresh += 1;
            self.next_fresh - 1
        } else {
            self.free.pop_front()?
        };
        self.in_use.insert(id);
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if self.in_use.remove(&id) {
            self.free.push_back(id);
        }
    }

    /// Marks an id found in the maps as in use (adoption, before any `alloc`).
    fn claim(&mut self, id: u32) -> bool {
        if id >= self.capacity || self.in_use.contains(&id) {
            return false;
        }
        if id >= self.next_fresh {
            self.free.extend(self.next_fresh..id);
            self.next_fresh = id + 1;
        } else {
            self.free.retain(|f| *f != id);
        }
        self.in_use.insert(id);
        true
    }
}

/// Maglev entries built ahead at a time (4 MB), whatever the table size.
const PREBUILT_ENTRIES: usize = 1 << 20;

/// A port's Maglev tables built ahead of its reconcile, holding positions in
/// the table's backend order (ids are only known once the backends are written).
#[derive(Default)]
struct Prebuilt {
    cluster: Option<Vec<u32>>,
    local: Option<Vec<u32>>,
}

/// Builds the tables of `keys`' desired ports, on up to four threads when
/// there are enough of them (a single change is built in place, with no thread
/// to start). Maglev depends only on the backends' addresses, so a table over
/// positions maps to the table over ids entry by entry.
fn prebuild_tables(desired: &Desired, keys: &[&PortKey], m: u32) -> Vec<Prebuilt> {
    let build = |key: &PortKey| -> Prebuilt {
        let Some(spec) = desired.port(key).filter(|s| !s.frontends.is_empty()) else {
            return Prebuilt::default();
        };
        let one = |t: &Table| {
            let positions: Vec<(SocketAddr, u32)> = t
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.addr, i as u32))
                .collect();
            (!positions.is_empty()).then(|| maglev::build(&positions, m))
        };
        Prebuilt {
            cluster: one(&spec.cluster),
            local: spec.local.as_ref().and_then(one),
        }
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if workers < 2 || keys.len() < 16 {
        return keys.iter().map(|k| build(k)).collect();
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> = keys
            .chunks(keys.len().div_ceil(workers))
            .map(|part| scope.spawn(|| part.iter().map(|k| build(k)).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a Maglev build thread panicked"))
            .collect()
    })
}

/// A backend slot: its id, what is written there, and how many tables use it.
#[derive(Debug)]
struct BackendSlot {
    id: u32,
    flags: u8,
    users: u32,
}

/// What is written for one Service port.
#[derive(Debug, Default)]
struct Applied {
    id: u32,
    cluster_row: Option<u32>,
    local_row: Option<u32>,
    frontends: BTreeMap<ServiceKey, Service>,
    /// Backends (by address) this port holds a reference on.
    backends: BTreeSet<SocketAddr>,
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
    maps: Maps,
    sizes: Sizes,
    ports: HashMap<PortKey, Applied>,
    backends: HashMap<SocketAddr, BackendSlot>,
    backend_ids: Ids,
    service_ids: Ids,
    rows: Ids,
    /// Which port wrote each frontend entry.
    owners: HashMap<ServiceKey, PortKey>,
    /// Found in the maps at start and not yet taken over by a desired port. Their
    /// ids and rows are held (not handed out) until [`Self::finish_adoption`].
    adopted_frontends: HashMap<ServiceKey, Service>,
    adopted_backends: HashMap<SocketAddr, (u32, u8)>,
    /// Adopted service ids and rows already taken over by a port.
    taken_service_ids: HashSet<u32>,
    taken_rows: HashSet<u32>,
    /// Backends whose last user went away during the current pass.
    unused: Vec<SocketAddr>,
    /// The `addr_filter` bitmap and how many owned entries stand behind each bit.
    filter: Filter,
    /// ClusterIP address entries (port 0) and how many ClusterIP frontends use each.
    cluster_ips: HashMap<ServiceKey, u32>,
}

/// The `addr_filter` bits, reference-counted: a bit is set before the first
/// entry it stands for is written, and cleared after the last one is removed, so
/// the datapath never skips a packet it should translate.
#[derive(Default)]
struct Filter {
    counts: HashMap<u32, u32>,
    words: HashMap<u32, u64>,
}

/// What one bit of the filter stands for.
#[derive(Clone, Copy)]
struct FilterKey {
    addr: [u8; 16],
    family: u8,
    port: u16,
    proto: u8,
    role: u32,
}

impl FilterKey {
    /// A `services` key: a frontend, or (port 0, protocol 0) a ClusterIP address.
    fn frontend(k: &ServiceKey) -> Self {
        let role = if k.port == 0 && k.proto == 0 {
            hash::FILTER_CLUSTER_IP
        } else {
            hash::FILTER_FRONTEND
        };
        Self {
            addr: k.addr,
            family: k.family,
            port: k.port,
            proto: k.proto,
            role,
        }
    }

    /// A backend address and port (whatever the protocol).
    fn backend(addr: SocketAddr) -> Self {
        let (a, family) = addr16(addr.ip());
        Self {
            addr: a,
            family,
            port: addr.port(),
            proto: 0,
            role: hash::FILTER_BACKEND,
        }
    }

    fn bit(&self) -> u32 {
        hash::addr_filter_bit(&self.addr, self.family, self.port, self.proto, self.role)
    }
}

impl Filter {
    fn add(&mut self, maps: &mut Maps, key: FilterKey) {
        let bit = key.bit();
        let n = self.counts.entry(bit).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.write(maps, bit, true);
        }
    }

    fn remove(&mut self, maps: &mut Maps, key: FilterKey) {
        let bit = key.bit();
        if let Some(n) = self.counts.get_mut(&bit) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&bit);
                self.write(maps, bit, false);
            }
        }
    }

    /// Counts an entry found in the maps at start (its bit is already set).
    fn count(&mut self, key: FilterKey) {
        *self.counts.entry(key.bit()).or_insert(0) += 1;
    }

    fn write(&mut self, maps: &mut Maps, bit: u32, set: bool) {
        let index = bit / 64;
        let word = self
            .words
            .entry(index)
            .or_insert_with(|| maps.addr_filter.get(&index, 0).unwrap_or(0));
        if set {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
        if let Err(e) = maps.set_filter_word(index, *word) {
            log::error!("{e:#}");
        }
    }
}

/// The address-level entry of a ClusterIP frontend's address.
fn address_key(k: &ServiceKey) -> ServiceKey {
    ServiceKey {
        port: 0,
        proto: 0,
        ..*k
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    let (addr, family) = addr16(f.addr);
    ServiceKey {
        addr,
        port: f.port,
        proto: match f.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        },
        family,
        _pad: [0; 4],
    }
}

pub use lb_common::{addr16, socket_addr};

impl Reconciler {
    /// Takes over the maps, remembering what is already in them (see the module docs).
    pub fn adopt(maps: Maps, sizes: Sizes) -> Result<Self> {
        let mut adopted_frontends = HashMap::new();
        for entry in maps.services.iter() {
            let (k, v) = entry.context("reading services")?;
            adopted_frontends.insert(k, v);
        }
        let mut adopted_backends = HashMap::new();
        for id in 0..sizes.backends {
            let b = maps.backends.get(&id, 0).context("reading backends")?;
            if b.is_active()
                && let Some(addr) = socket_addr(&b.addr, b.family, b.port)
            {
                adopted_backends.insert(addr, (id, b.flags));
            }
        }
        // Hold every id and row the maps use, so that nothing new is written over
        // them while desired ports take them over.
        let mut backend_ids = Ids::new(sizes.backends);
        for (id, _) in adopted_backends.values() {
            backend_ids.claim(*id);
        }
        let mut service_ids = Ids::new(sizes.service_ids);
        let mut rows = Ids::new(sizes.service_ids);
        for svc in adopted_frontends.values() {
            service_ids.claim(svc.id);
            if svc.backend_count > 0 {
                rows.claim(svc.table);
            }
        }
        // The filter bits standing for what is in the maps (the bitmap itself is
        // pinned and already set).
        let mut filter = Filter::default();
        for k in adopted_frontends.keys() {
            filter.count(FilterKey::frontend(k));
        }
        for addr in adopted_backends.keys() {
            filter.count(FilterKey::backend(*addr));
        }
        log::info!(
            "adopting {} frontends and {} backends found in the maps",
            adopted_frontends.len(),
            adopted_backends.len()
        );
        Ok(Self {
            maps,
            sizes,
            ports: HashMap::new(),
            backends: HashMap::new(),
            backend_ids,
            service_ids,
            rows,
            owners: HashMap::new(),
            adopted_frontends,
            adopted_backends,
            taken_service_ids: HashSet::new(),
            taken_rows: HashSet::new(),
            unused: Vec::new(),
            filter,
            cluster_ips: HashMap::new(),
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
        &self.sizes
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
        let m = self.sizes.maglev_table_size;
        // Tables of a chunk of ports are built ahead on several threads (the
        // builds are most of a full sync's CPU time), a bounded amount at a time.
        let chunk = (PREBUILT_ENTRIES / m.max(1) as usize).max(1);
        for keys in keys.chunks(chunk) {
            let tables = prebuild_tables(desired, keys, m);
            for (key, pre) in keys.iter().zip(tables) {
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
        problems
    }

    /// After the first full sync: removes whatever was in the maps at start and
    /// is not desired any more.
    pub fn finish_adoption(&mut self, stats: &mut Stats) {
        for (key, svc) in std::mem::take(&mut self.adopted_frontends) {
            if !self.owners.contains_key(&key) && self.maps.remove_service(&key).is_ok() {
                stats.frontends_removed += 1;
            }
            self.filter
                .remove(&mut self.maps, FilterKey::frontend(&key));
            if !self.taken_service_ids.contains(&svc.id) {
                self.service_ids.release(svc.id);
            }
            if svc.backend_count > 0 && !self.taken_rows.contains(&svc.table) {
                self.rows.release(svc.table);
            }
        }
        for (addr, (id, _)) in std::mem::take(&mut self.adopted_backends) {
            if self.maps.clear_backend(id).is_ok() {
                stats.backends_freed += 1;
            }
            self.filter.remove(&mut self.maps, FilterKey::backend(addr));
            self.backend_ids.release(id);
        }
        self.taken_service_ids.clear();
        self.taken_rows.clear();
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
            .filter(|a| !self.backends.contains_key(a) && !self.adopted_backends.contains_key(a))
            .count();
        if new_backends > self.backend_ids.available() {
            return Err(Self::capacity_problem(
                key,
                "more backends than the backends map holds",
            ));
        }
        let existing_frontends = self.ports.get(key).map_or(0, |a| a.frontends.len());
        let added_frontends = spec.frontends.len().saturating_sub(existing_frontends);
        if self.owners.len() + added_frontends > self.sizes.services as usize {
            return Err(Self::capacity_problem(
                key,
                "more frontends than the services map holds",
            ));
        }

        let mut applied = match self.ports.remove(key) {
            Some(a) => a,
            None => {
                let a = match self.adopt_port(key, spec) {
                    Some(a) => a,
                    None => match self.service_ids.alloc() {
                        Some(id) => Applied {
                            id,
                            ..Applied::default()
                        },
                        None => {
                            return Err(Self::capacity_problem(
                                key,
                                "no service id left (--max-services)",
                            ));
                        }
                    },
                };
                if let Err(e) = self.maps.set_service_name(a.id, &key.to_string()) {
                    log::warn!("{e:#}");
                }
                a
            }
        };

        // 1. Backends, so that every id a table mentions exists (and the
        // draining ones, which keep their flows).
        for b in spec.all_backends() {
            let flags = BACKEND_F_ACTIVE
                | if b.local { BACKEND_F_LOCAL } else { 0 }
                | if b.terminating {
                    BACKEND_F_TERMINATING
                } else {
                    0
                };
            let fresh = applied.backends.insert(b.addr);
            if let Err(e) = self.use_backend(b.addr, flags, fresh, stats) {
                self.ports.insert(key.clone(), applied);
                return Err(Self::capacity_problem(key, &e));
            }
        }

        // 2. Maglev rows.
        let cluster_row = self.write_table(
            &mut applied.cluster_row,
            Some(&spec.cluster),
            pre.cluster,
            stats,
        );
        let local_row = self.write_table(
            &mut applied.local_row,
            spec.local.as_ref(),
            pre.local,
            stats,
        );
        if cluster_row.is_err() || local_row.is_err() {
            self.ports.insert(key.clone(), applied);
            return Err(Self::capacity_problem(
                key,
                "no Maglev row left (--max-services)",
            ));
        }

        // 3. Frontends.
        let mut wanted_frontends = BTreeMap::new();
        for (f, fs) in &spec.frontends {
            let (table, row) = match fs.scope {
                Scope::Cluster => (&spec.cluster, applied.cluster_row),
                Scope::Local => (
                    spec.local.as_ref().unwrap_or(&spec.cluster),
                    applied.local_row,
                ),
            };
            let mut flags = 0;
            if fs.snat_remote {
                flags |= SVC_F_SNAT_REMOTE;
            }
            if fs.kind.is_external() {
                flags |= SVC_F_EXTERNAL;
            }
            if table.terminating_fallback {
                flags |= SVC_F_TERMINATING_FALLBACK;
            }
            if spec.affinity_timeout.is_some() {
                flags |= SVC_F_AFFINITY;
            }
            let value = Service {
                id: applied.id,
                table: row.unwrap_or(0),
                backend_count: if row.is_some() {
                    table.backends.len() as u32
                } else {
                    0
                },
                flags,
                affinity_timeout: spec.affinity_timeout.unwrap_or(0),
                _reserved: 0,
            };
            wanted_frontends.insert(service_key(f), value);
        }
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
                None => self.adopted_frontends.get(k).copied(),
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
        let adopted = self.adopted_frontends.remove(&k).is_some();
        let first = !self.owners.contains_key(&k);
        if first && !adopted {
            self.filter.add(&mut self.maps, FilterKey::frontend(&k));
        }
        if current.as_ref() != Some(v) && self.maps.set_service(&k, v).is_ok() {
            stats.frontends_written += 1;
        }
        if first && v.flags & SVC_F_EXTERNAL == 0 {
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
        if v.flags & SVC_F_EXTERNAL == 0 {
            let a = address_key(k);
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
        let a = address_key(k);
        let n = self.cluster_ips.entry(a).or_insert(0);
        *n += 1;
        if *n > 1 {
            return;
        }
        if self.adopted_frontends.remove(&a).is_some() {
            return;
        }
        self.filter.add(&mut self.maps, FilterKey::frontend(&a));
        let entry = Service {
            id: u32::MAX,
            flags: SVC_F_ADDRESS,
            ..Service::default()
        };
        if self.maps.set_service(&a, &entry).is_ok() {
            stats.frontends_written += 1;
        }
    }

    /// A port seen for the first time: if one of its frontends is already in the
    /// maps (an earlier agent wrote it), keep that entry's service id and rows.
    fn adopt_port(&mut self, key: &PortKey, spec: &PortSpec) -> Option<Applied> {
        let mut found: Option<Applied> = None;
        for (f, fs) in &spec.frontends {
            let Some(existing) = self.adopted_frontends.get(&service_key(f)) else {
                continue;
            };
            let a = found.get_or_insert_with(|| Applied {
                id: u32::MAX,
                ..Applied::default()
            });
            if a.id == u32::MAX && self.taken_service_ids.insert(existing.id) {
                a.id = existing.id;
            }
            let row = match fs.scope {
                Scope::Cluster => &mut a.cluster_row,
                Scope::Local => &mut a.local_row,
            };
            if row.is_none() && existing.backend_count > 0 && self.taken_rows.insert(existing.table)
            {
                *row = Some(existing.table);
            }
        }
        let mut a = found?;
        if a.id == u32::MAX {
            a.id = self.service_ids.alloc()?;
        }
        log::debug!(
            "{key:?}: adopted service id {} rows {:?}/{:?}",
            a.id,
            a.cluster_row,
            a.local_row
        );
        Some(a)
    }

    fn use_backend(
        &mut self,
        addr: SocketAddr,
        flags: u8,
        fresh_user: bool,
        stats: &mut Stats,
    ) -> Result<(), String> {
        if let Some(slot) = self.backends.get_mut(&addr) {
            if fresh_user {
                slot.users += 1;
            }
            if slot.flags != flags {
                slot.flags = flags;
                let id = slot.id;
                self.write_backend(id, addr, flags)?;
                stats.backends_written += 1;
            }
            return Ok(());
        }
        // An adopted backend keeps its id (held since start) and filter reference.
        let (id, written_flags) = match self.adopted_backends.remove(&addr) {
            Some((id, f)) => (id, Some(f)),
            None => {
                let id = self
                    .backend_ids
                    .alloc()
                    .ok_or("no backend id left (--max-backends)")?;
                // The filter bit goes first: replies from the backend must not be
                // skipped once a table points at it.
                self.filter.add(&mut self.maps, FilterKey::backend(addr));
                (id, None)
            }
        };
        if written_flags != Some(flags) {
            self.write_backend(id, addr, flags)?;
            stats.backends_written += 1;
        }
        self.backends.insert(
            addr,
            BackendSlot {
                id,
                flags,
                users: 1,
            },
        );
        Ok(())
    }

    fn write_backend(&mut self, id: u32, addr: SocketAddr, flags: u8) -> Result<(), String> {
        self.maps
            .set_backend(id, &Backend::new(addr, flags))
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
                self.backend_ids.release(id);
                self.filter.remove(&mut self.maps, FilterKey::backend(addr));
            }
        }
    }

    /// Writes (or frees) the row for `table`. An empty or absent table has no row.
    /// `prebuilt`, when given, is the table built ahead over `table`'s backends
    /// with their positions as values (see [`prebuild_tables`]).
    fn write_table(
        &mut self,
        row: &mut Option<u32>,
        table: Option<&Table>,
        prebuilt: Option<Vec<u32>>,
        stats: &mut Stats,
    ) -> Result<(), ()> {
        let Some(table) = table.filter(|t| !t.backends.is_empty()) else {
            if let Some(r) = row.take() {
                self.rows.release(r);
            }
            return Ok(());
        };
        let r = match *row {
            Some(r) => r,
            None => self.rows.alloc().ok_or(())?,
        };
        *row = Some(r);
        let entries: Vec<(SocketAddr, u32)> = table
            .backends
            .iter()
            .filter_map(|b| self.backends.get(&b.addr).map(|s| (b.addr, s.id)))
            .collect();
        let built = match prebuilt {
            // Positions turn into ids when every backend has its slot (they were
            // all just upserted, so `entries` is in the table's order).
            Some(positions) if entries.len() == table.backends.len() => positions
                .into_iter()
                .map(|p| entries[p as usize].1)
                .collect(),
            _ => maglev::build(&entries, self.sizes.maglev_table_size),
        };
        match self.maps.maglev.write_row(r, &built) {
            Ok(n) => stats.maglev_entries_written += n,
            Err(e) => log::error!("writing Maglev row {r}: {e:#}"),
        }
        Ok(())
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
        for r in [applied.cluster_row, applied.local_row]
            .into_iter()
            .flatten()
        {
            self.rows.release(r);
        }
        self.service_ids.release(applied.id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_last_and_claims_work() {
        let mut ids = Ids::new(4);
        assert_eq!(ids.alloc(), Some(0));
        assert_eq!(ids.alloc(), Some(1));
        ids.release(0);
        assert_eq!(ids.alloc(), Some(2), "never-used ids first");
        assert_eq!(ids.alloc(), Some(3));
        assert_eq!(ids.alloc(), Some(0), "then the oldest freed");
        assert_eq!(ids.alloc(), None);
        assert_eq!(ids.available(), 0);

        let mut ids = Ids::new(8);
        assert!(ids.claim(5));
        assert!(!ids.claim(5), "claimed twice");
        assert!(!ids.claim(8), "out of range");
        let got: Vec<_> = (0..7).filter_map(|_| ids.alloc()).collect();
        assert_eq!(got, vec![6, 7, 0, 1, 2, 3, 4]);
    }
}
