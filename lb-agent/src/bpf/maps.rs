//! Typed handles to the datapath's maps: the only place that writes them.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapInfo, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
        xdp::DevMapHash,
    },
};
use lb_common::{
    Affinity, AffinityKey, Backend, CFG_F_CLUSTER_CIDRS, CFG_F_SNAT_V4, CFG_F_SNAT_V6, Config,
    Counters, CtEntry, FlowKey, FragEntry, FragKey, Interface, Reason, Service, ServiceKey,
    ServiceName, SockEvent, SourceRange4, SourceRange6, map_names,
};

use super::Sizes;

/// What `config` says about the node: where source-NATed flows leave from.
/// (Its other field, layout 2's Maglev table size, is kept as found: see
/// [`Maps::set_config`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's IPv4 address for source NAT (none: IPv4 flows are not
    /// source-NATed).
    pub snat_v4: Option<Ipv4Addr>,
    pub snat_v6: Option<Ipv6Addr>,
    /// First and last source port (inclusive).
    pub snat_ports: (u16, u16),
    /// Whether `cluster_cidrs4/6` hold the cluster's pod CIDRs (see
    /// [`Maps::set_cluster_cidrs`]): the datapath then tells clients inside
    /// the cluster from outside ones.
    pub cluster_cidrs: bool,
}

/// Whether a map operation failed only because the key is not there: aya
/// says so as `KeyNotFound` for lookups, and passes the kernel's ENOENT on
/// as a syscall error for deletions.
pub fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// An address prefix as the tries take it: (address, prefix length).
pub type Cidr = (std::net::IpAddr, u8);

pub struct Maps {
    /// What the maps were created with (or, pinned ones, are).
    sizes: Sizes,
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: MaglevTables,
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pub config: Array<MapData, Config>,
    pub tx_ports: DevMapHash<MapData>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, Counters>,
    pub service_names: Array<MapData, ServiceName>,
    pub addr_filter: Array<MapData, u64>,
    pub interfaces: HashMap<MapData, u32, Interface>,
    pub sock_stats: PerCpuArray<MapData, u64>,
    /// The datapath's conntrack counts (read by `crate::conntrack::CtCounts`).
    pub ct_stats: PerCpuArray<MapData, u64>,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub src_ranges4: LpmTrie<MapData, SourceRange4, u32>,
    pub src_ranges6: LpmTrie<MapData, SourceRange6, u32>,
    pub cluster_cidrs4: LpmTrie<MapData, [u8; 4], u32>,
    pub cluster_cidrs6: LpmTrie<MapData, [u8; 16], u32>,
    /// Written by the datapath only (first fragments' translations); read by
    /// dumps and tests.
    pub fragments: HashMap<MapData, FragKey, FragEntry>,
    /// What this handle last wrote into `config` and the cluster CIDR tries,
    /// for the verify-and-repair pass ([`Self::repair_node_maps`]).
    config_written: Option<Config>,
    cidrs_written: Option<Vec<Cidr>>,
}

/// The `src_ranges4` or `src_ranges6` key of a prefix allowed for service
/// id `id`: the id's 32 bits (big-endian, so that they are matched first),
/// then the prefix's.
enum RangeKey {
    V4(Key<SourceRange4>),
    V6(Key<SourceRange6>),
}

fn range_key(id: u32, (addr, len): Cidr) -> RangeKey {
    let (service, bits) = (id.to_be_bytes(), 32 + u32::from(len));
    match addr {
        std::net::IpAddr::V4(a) => RangeKey::V4(Key::new(
            bits,
            SourceRange4 {
                service,
                addr: a.octets(),
            },
        )),
        std::net::IpAddr::V6(a) => RangeKey::V6(Key::new(
            bits,
            SourceRange6 {
                service,
                addr: a.octets(),
            },
        )),
    }
}

/// Makes an LPM trie hold exactly `keys` (value 1).
fn sync_trie<K: aya::Pod>(trie: &mut LpmTrie<MapData, K, u32>, keys: &[Key<K>]) -> Result<()> {
    let have: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for k in keys {
        trie.insert(k, 1, 0)?;
    }
    for k in &have {
        let wanted = keys
            .iter()
            .any(|w| w.prefix_len() == k.prefix_len() && bytes(&w.data()) == bytes(&k.data()));
        if !wanted {
            trie.remove(k)?;
        }
    }
    Ok(())
}

fn bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: a Pod value is plain bytes.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

fn from_pin(dir: &std::path::Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data)
        .with_context(|| format!("{} is not a map of a known type", path.display()))
}

/// The Maglev table size a layout-2 agent that pinned `dir` wrote into
/// `config` (0: none was written), which its rows have.
pub fn pinned_maglev_size(dir: &std::path::Path) -> Result<u32> {
    let config: Array<MapData, Config> = from_pin(dir, map_names::CONFIG)?
        .try_into()
        .context("map config has an unexpected type")?;
    Ok(config.get(&0, 0).context("reading config")?.maglev_size)
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the datapath object has no map {name} (or it was taken)"))
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected type", $name))?
    };
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf, sizes: Sizes) -> Result<Self> {
        let maglev = match take(ebpf, map_names::MAGLEV)? {
            Map::Array(data) => data,
            _ => bail!("map {} is not an array", map_names::MAGLEV),
        };
        Ok(Self {
            sizes,
            services: typed!(ebpf, map_names::SERVICES),
            backends: typed!(ebpf, map_names::BACKENDS),
            maglev: MaglevTables::new(maglev)?,
            conntrack: typed!(ebpf, map_names::CONNTRACK),
            config: typed!(ebpf, map_names::CONFIG),
            tx_ports: typed!(ebpf, map_names::TX_PORTS),
            service_stats: typed!(ebpf, map_names::SERVICE_STATS),
            backend_stats: typed!(ebpf, map_names::BACKEND_STATS),
            reasons: typed!(ebpf, map_names::REASONS),
            service_names: typed!(ebpf, map_names::SERVICE_NAMES),
            addr_filter: typed!(ebpf, map_names::ADDR_FILTER),
            interfaces: typed!(ebpf, map_names::INTERFACES),
            sock_stats: typed!(ebpf, map_names::SOCK_STATS),
            ct_stats: typed!(ebpf, map_names::CT_STATS),
            affinity: typed!(ebpf, map_names::AFFINITY),
            src_ranges4: typed!(ebpf, map_names::SRC_RANGES4),
            src_ranges6: typed!(ebpf, map_names::SRC_RANGES6),
            cluster_cidrs4: typed!(ebpf, map_names::CLUSTER_CIDRS4),
            cluster_cidrs6: typed!(ebpf, map_names::CLUSTER_CIDRS6),
            fragments: typed!(ebpf, map_names::FRAGMENTS),
            config_written: None,
            cidrs_written: None,
        })
    }

    /// Opens the maps pinned in `dir` (for `lb-agent dump`; no program is loaded).
    pub fn open_pinned(dir: &std::path::Path) -> Result<Self> {
        macro_rules! pinned {
            ($name:expr) => {
                from_pin(dir, $name)?
                    .try_into()
                    .with_context(|| format!("map {} has an unexpected type", $name))?
            };
        }
        let config: Array<MapData, Config> = pinned!(map_names::CONFIG);
        // A pinned datapath's sizes are what its maps are, and the table size
        // what its agent wrote into `config`.
        let entries = |name: &str| -> Result<u32> {
            let path = dir.join(name);
            Ok(MapInfo::from_pin(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .max_entries())
        };
        let sizes = Sizes {
            services: entries(map_names::SERVICES)?,
            service_ids: entries(map_names::SERVICE_STATS)?,
            backends: entries(map_names::BACKENDS)?,
            maglev_entries: entries(map_names::MAGLEV)?.saturating_mul(2),
            conntrack: entries(map_names::CONNTRACK)?,
        };
        let maglev = match from_pin(dir, map_names::MAGLEV)? {
            Map::Array(data) => data,
            _ => bail!("map {} is not an array", map_names::MAGLEV),
        };
        Ok(Self {
            sizes,
            services: pinned!(map_names::SERVICES),
            backends: pinned!(map_names::BACKENDS),
            maglev: MaglevTables::new(maglev)?,
            conntrack: pinned!(map_names::CONNTRACK),
            config,
            tx_ports: pinned!(map_names::TX_PORTS),
            service_stats: pinned!(map_names::SERVICE_STATS),
            backend_stats: pinned!(map_names::BACKEND_STATS),
            reasons: pinned!(map_names::REASONS),
            service_names: pinned!(map_names::SERVICE_NAMES),
            addr_filter: pinned!(map_names::ADDR_FILTER),
            interfaces: pinned!(map_names::INTERFACES),
            sock_stats: pinned!(map_names::SOCK_STATS),
            ct_stats: pinned!(map_names::CT_STATS),
            affinity: pinned!(map_names::AFFINITY),
            src_ranges4: pinned!(map_names::SRC_RANGES4),
            src_ranges6: pinned!(map_names::SRC_RANGES6),
            cluster_cidrs4: pinned!(map_names::CLUSTER_CIDRS4),
            cluster_cidrs6: pinned!(map_names::CLUSTER_CIDRS6),
            fragments: pinned!(map_names::FRAGMENTS),
            config_written: None,
            cidrs_written: None,
        })
    }

    /// The sizes the maps were created with.
    pub fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    /// Writes `config`: the node's facts. Layout 2's table size stays as
    /// found (see [`Config::maglev_size`]).
    pub fn set_config(&mut self, node: &NodeConfig) -> Result<()> {
        let found = self.config.get(&0, 0).context("reading config")?;
        let mut config = Config {
            maglev_size: found.maglev_size,
            snat_port_min: node.snat_ports.0,
            snat_port_max: node.snat_ports.1,
            ..Config::default()
        };
        if let Some(v4) = node.snat_v4 {
            config.snat_addr_v4 = v4.octets();
            config.flags |= CFG_F_SNAT_V4;
        }
        if let Some(v6) = node.snat_v6 {
            config.snat_addr_v6 = v6.octets();
            config.flags |= CFG_F_SNAT_V6;
        }
        if node.cluster_cidrs {
            config.flags |= CFG_F_CLUSTER_CIDRS;
        }
        self.config.set(0, config, 0).context("writing config")?;
        self.config_written = Some(config);
        Ok(())
    }

    /// Puts back what this handle last wrote into `config` and the cluster
    /// CIDR tries if they hold something else now. Returns how many of the
    /// two were wrong.
    pub fn repair_node_maps(&mut self) -> Result<usize> {
        let mut wrong = 0;
        if let Some(want) = self.config_written {
            let have = self.config.get(&0, 0).context("reading config")?;
            if have != want {
                log::warn!("verify: config held {have:?}, not {want:?}: rewritten");
                self.config.set(0, want, 0).context("writing config")?;
                wrong += 1;
            }
        }
        if let Some(want) = self.cidrs_written.clone() {
            let mut have = self.cluster_cidrs()?;
            let mut sorted = want.clone();
            have.sort_unstable();
            sorted.sort_unstable();
            if have != sorted {
                log::warn!(
                    "verify: the cluster CIDR tries held {have:?}, not {sorted:?}: rewritten"
                );
                self.set_cluster_cidrs(&want)?;
                wrong += 1;
            }
        }
        Ok(wrong)
    }

    /// Makes `cluster_cidrs4/6` hold exactly `cidrs`.
    pub fn set_cluster_cidrs(&mut self, cidrs: &[Cidr]) -> Result<()> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (addr, len) in cidrs {
            match addr {
                std::net::IpAddr::V4(a) => v4.push(Key::new(u32::from(*len), a.octets())),
                std::net::IpAddr::V6(a) => v6.push(Key::new(u32::from(*len), a.octets())),
            }
        }
        sync_trie(&mut self.cluster_cidrs4, &v4).context("writing cluster_cidrs4")?;
        sync_trie(&mut self.cluster_cidrs6, &v6).context("writing cluster_cidrs6")?;
        self.cidrs_written = Some(cidrs.to_vec());
        Ok(())
    }

    /// Allows the clients in `prefix` to open flows to the LoadBalancer
    /// frontends of service id `id` (with `SVC_F_SOURCE_RANGES`).
    pub fn add_source_range(&mut self, id: u32, prefix: Cidr) -> Result<()> {
        match range_key(id, prefix) {
            RangeKey::V4(k) => self.src_ranges4.insert(&k, 1, 0),
            RangeKey::V6(k) => self.src_ranges6.insert(&k, 1, 0),
        }
        .with_context(|| {
            format!(
                "writing source range {}/{} of service {id}",
                prefix.0, prefix.1
            )
        })
    }

    /// Forgets a prefix of [`Self::add_source_range`] (absent is fine).
    pub fn remove_source_range(&mut self, id: u32, prefix: Cidr) -> Result<()> {
        let r = match range_key(id, prefix) {
            RangeKey::V4(k) => self.src_ranges4.remove(&k),
            RangeKey::V6(k) => self.src_ranges6.remove(&k),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "removing source range {}/{} of service {id}",
                    prefix.0, prefix.1
                )
            }),
        }
    }

    /// Every source range written: (service id, prefix).
    /// What `cluster_cidrs4/6` hold (whether the datapath reads them is
    /// `config`'s `CFG_F_CLUSTER_CIDRS`).
    pub fn cluster_cidrs(&self) -> Result<Vec<Cidr>> {
        let mut out = Vec::new();
        for k in self.cluster_cidrs4.keys() {
            let k = k.context("reading cluster_cidrs4")?;
            out.push((k.data().into(), k.prefix_len() as u8));
        }
        for k in self.cluster_cidrs6.keys() {
            let k = k.context("reading cluster_cidrs6")?;
            out.push((k.data().into(), k.prefix_len() as u8));
        }
        Ok(out)
    }

    pub fn source_ranges(&self) -> Result<Vec<(u32, Cidr)>> {
        let mut out = Vec::new();
        for k in self.src_ranges4.keys() {
            let k = k.context("reading src_ranges4")?;
            let d = k.data();
            out.push((
                u32::from_be_bytes(d.service),
                (d.addr.into(), (k.prefix_len() - 32) as u8),
            ));
        }
        for k in self.src_ranges6.keys() {
            let k = k.context("reading src_ranges6")?;
            let d = k.data();
            out.push((
                u32::from_be_bytes(d.service),
                (d.addr.into(), (k.prefix_len() - 32) as u8),
            ));
        }
        Ok(out)
    }

    /// Removes the affinity entries `gone` says are gone; returns how many.
    pub fn remove_affinities(
        &mut self,
        gone: impl Fn(&AffinityKey, &Affinity) -> bool,
    ) -> Result<usize> {
        let doomed: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| gone(k, v))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            match self.affinity.remove(k) {
                // The LRU may have evicted it meanwhile.
                Err(e) if !is_not_found(&e) => {
                    return Err(e).context("removing an affinity entry");
                }
                _ => {}
            }
        }
        Ok(doomed.len())
    }

    pub fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<()> {
        self.services
            .insert(key, svc, 0)
            .with_context(|| format!("writing service {key:?}"))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services
            .remove(key)
            .with_context(|| format!("removing service {key:?}"))
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Frees a backend slot (the datapath treats it as gone at once).
    pub fn clear_backend(&mut self, id: u32) -> Result<()> {
        self.set_backend(id, &Backend::default())
    }

    pub fn set_interface(&mut self, ifindex: u32, iface: &Interface) -> Result<()> {
        self.interfaces
            .insert(ifindex, iface, 0)
            .with_context(|| format!("writing interfaces entry {ifindex}"))
    }

    /// Forgets an interface (absent already is fine: it may never have been written).
    pub fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        match self.interfaces.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing interfaces entry {ifindex}")),
        }
    }

    pub fn set_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        self.service_names
            .set(id, ServiceName::new(name), 0)
            .with_context(|| format!("writing the name of service id {id}"))
    }

    /// Writes one 64-bit word of the `addr_filter` bitmap.
    pub fn set_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.addr_filter
            .set(index, word, 0)
            .with_context(|| format!("writing addr_filter word {index}"))
    }

    /// Lets XDP redirect to `ifindex`.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to tx_ports"))
    }

    pub fn remove_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .remove(ifindex)
            .with_context(|| format!("removing ifindex {ifindex} from tx_ports"))
    }

    /// Counters per reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counters)>> {
        reason_counters(&self.reasons)
    }

    /// What the socket programs did, summed over CPUs, per event.
    pub fn sock_counters(&self) -> Result<Vec<(SockEvent, u64)>> {
        sock_counters(&self.sock_stats)
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_per_cpu(&self.service_stats, id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_per_cpu(&self.backend_stats, id)
    }

    /// Handles of their own on the counter maps and `interfaces`, for a
    /// reader on another thread (the metrics scrape): the same kernel maps
    /// through duplicated descriptors, so that the reader needs neither these
    /// `Maps` nor whoever owns them (the reconciler, behind its lock).
    pub fn counter_handles(&self) -> Result<CounterMaps> {
        fn dup<V>(map: &MapData, name: &str) -> Result<V>
        where
            V: TryFrom<Map, Error = aya::maps::MapError>,
        {
            let fd = map
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the descriptor of map {name}"))?;
            let data = MapData::from_fd(fd).with_context(|| format!("reopening map {name}"))?;
            Map::from_map_data(data)
                .and_then(V::try_from)
                .with_context(|| format!("map {name} has an unexpected type"))
        }
        Ok(CounterMaps {
            service_stats: dup(self.service_stats.map(), map_names::SERVICE_STATS)?,
            backend_stats: dup(self.backend_stats.map(), map_names::BACKEND_STATS)?,
            reasons: dup(self.reasons.map(), map_names::REASONS)?,
            sock_stats: dup(self.sock_stats.map(), map_names::SOCK_STATS)?,
            interfaces: dup(self.interfaces.map(), map_names::INTERFACES)?,
        })
    }
}

/// The datapath's counters and its `interfaces` map through handles of their
/// own (see [`Maps::counter_handles`]): read only, from any thread.
pub struct CounterMaps {
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, Counters>,
    sock_stats: PerCpuArray<MapData, u64>,
    interfaces: HashMap<MapData, u32, Interface>,
}

impl CounterMaps {
    /// Counters per reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counters)>> {
        reason_counters(&self.reasons)
    }

    /// What the socket programs did, summed over CPUs, per event.
    pub fn sock_counters(&self) -> Result<Vec<(SockEvent, u64)>> {
        sock_counters(&self.sock_stats)
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_per_cpu(&self.service_stats, id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_per_cpu(&self.backend_stats, id)
    }

    /// The interfaces the programs run on (entries that cannot be read are
    /// skipped).
    pub fn interfaces(&self) -> Vec<(u32, Interface)> {
        self.interfaces.iter().flatten().collect()
    }
}

impl std::fmt::Debug for CounterMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CounterMaps")
    }
}

fn reason_counters(map: &PerCpuArray<MapData, Counters>) -> Result<Vec<(Reason, Counters)>> {
    Reason::ALL
        .iter()
        .map(|r| Ok((*r, sum_per_cpu(map, *r as u32)?)))
        .collect()
}

fn sock_counters(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(SockEvent, u64)>> {
    SockEvent::ALL
        .iter()
        .map(|e| {
            let values = map
                .get(&(*e as u32), 0)
                .with_context(|| format!("reading sock_stats {}", e.as_str()))?;
            Ok((*e, values.iter().sum()))
        })
        .collect()
}

/// A row's fingerprint: a hash of its backend ids in order.
fn fingerprint(table: &[u32]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    table.hash(&mut h);
    h.finish()
}

fn sum_per_cpu(map: &PerCpuArray<MapData, Counters>, index: u32) -> Result<Counters> {
    let values = map
        .get(&index, 0)
        .with_context(|| format!("reading counters {index}"))?;
    Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}

/// The `maglev` array, written and read a table at a time through memory
/// mappings of the pages a table spans (one mapping per write, not a system
/// call per entry; the map is `BPF_F_MMAPABLE`). A mapping of the whole array
/// would be populated at once (the kernel maps every page of a BPF array at
/// mmap time) and count all the tables' memory, tens of MB at thousands of
/// Services, in the agent's RSS for as long as it runs.
///
/// The mapping is an array of u32 backend ids: each 8-byte element holds two
/// (see [`lb_common::MaglevPair`]). Where each table lies is the reconciler's
/// (see `reconcile::ids::Extents`): this only checks that it lies inside.
pub struct MaglevTables {
    map: MapData,
    page: usize,
    /// Elements of the array (8 bytes, two entries, each).
    elements: u32,
    /// A fingerprint of each table as last written, by its first element
    /// (entries, fingerprint): what the verify pass compares a table's
    /// content with (keeping the tables themselves would double the agent's
    /// memory).
    written: std::collections::HashMap<u32, (usize, u64)>,
}

/// One table's pages, mapped; unmapped on drop.
struct TableWindow {
    base: NonNull<libc::c_void>,
    len: usize,
    entries: *mut u32,
}

impl Drop for TableWindow {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `MaglevTables::window` mapped.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

impl MaglevTables {
    fn new(map: MapData) -> Result<Self> {
        let info = map.info().context("reading the maglev map's info")?;
        if info.value_size() as usize != size_of::<lb_common::MaglevPair>() {
            bail!(
                "the maglev map has {}-byte values, not pairs of ids",
                info.value_size()
            );
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })?;
        let tables = Self {
            map,
            page,
            elements: info.max_entries(),
            written: std::collections::HashMap::new(),
        };
        // Fail at start, not at the first write, if the map cannot be mapped.
        tables.window(0, 1)?;
        Ok(tables)
    }

    /// Elements of the array (two entries each).
    pub fn elements(&self) -> u32 {
        self.elements
    }

    /// The kernel's id of the array (what `bpftool map show id` takes).
    pub fn map_id(&self) -> Result<u32> {
        Ok(self
            .map
            .info()
            .context("reading the maglev map's info")?
            .id())
    }

    /// Maps the pages holding a table of `entries` entries from element `start`.
    fn window(&self, start: u32, entries: usize) -> Result<TableWindow> {
        let elements = entries.div_ceil(2);
        if entries == 0 || start as usize + elements > self.elements as usize {
            bail!(
                "a Maglev table of {entries} entries at element {start} does not lie inside \
                 the maglev map ({} elements)",
                self.elements
            );
        }
        let first = start as usize * 8;
        let end = first + entries * 4;
        let first_page = first / self.page * self.page;
        let len = (end - first_page).div_ceil(self.page) * self.page;
        let fd = self.map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping pages of a BPF array fd the way the kernel documents
        // for BPF_F_MMAPABLE maps (page-aligned offset, inside the array); the
        // result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                libc::off_t::try_from(first_page)?,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the maglev map");
        }
        let base = NonNull::new(ptr).context("mmap returned null")?;
        // SAFETY: `first - first_page` is inside the mapping, and 4-byte aligned.
        let entries = unsafe { ptr.cast::<u8>().add(first - first_page).cast::<u32>() };
        Ok(TableWindow { base, len, entries })
    }

    /// Writes a table from element `start`, storing only the entries that
    /// change; returns how many did. Each entry is a single aligned 4-byte
    /// store, so the datapath always reads a whole backend id (of the old
    /// table or the new one).
    pub fn write(&mut self, start: u32, table: &[u32]) -> Result<usize> {
        let w = self.window(start, table.len())?;
        let mut changed = 0;
        for (i, v) in table.iter().enumerate() {
            // SAFETY: i < table.len(), inside the mapped table; volatile
            // because the kernel reads the same memory concurrently.
            unsafe {
                let e = w.entries.add(i);
                if std::ptr::read_volatile(e) != *v {
                    std::ptr::write_volatile(e, *v);
                    changed += 1;
                }
            }
        }
        self.written
            .insert(start, (table.len(), fingerprint(table)));
        Ok(changed)
    }

    /// Whether the table at `start` holds what [`Self::write`] last wrote
    /// there (false for one never written through this handle).
    pub fn intact(&self, start: u32) -> Result<bool> {
        let Some((entries, expected)) = self.written.get(&start) else {
            return Ok(false);
        };
        Ok(fingerprint(&self.read(start, *entries)?) == *expected)
    }

    /// Zeroes `elements` elements from `start` (space no table uses), writing
    /// only those that are not zero already.
    pub fn clear(&mut self, start: u32, elements: u32) -> Result<()> {
        let entries = elements as usize * 2;
        let w = self.window(start, entries)?;
        for i in 0..entries {
            // SAFETY: i < entries, inside the mapping; volatile as in `write`.
            unsafe {
                let e = w.entries.add(i);
                if std::ptr::read_volatile(e) != 0 {
                    std::ptr::write_volatile(e, 0);
                }
            }
        }
        Ok(())
    }

    /// Forgets what was written at `start` (its space was given up).
    pub fn forget(&mut self, start: u32) {
        self.written.remove(&start);
    }

    /// Reads back the table a `services` value names (its own: `table`).
    pub fn read_table(&self, svc: &lb_common::Service) -> Result<Vec<u32>> {
        self.read(svc.table, svc.table_size as usize)
    }

    /// Reads a table of `entries` entries from element `start` back.
    pub fn read(&self, start: u32, entries: usize) -> Result<Vec<u32>> {
        let w = self.window(start, entries)?;
        // SAFETY: the table lies inside the mapping.
        Ok((0..entries)
            .map(|i| unsafe { std::ptr::read_volatile(w.entries.add(i)) })
            .collect())
    }
}
