//! Migrating pinned maps to a new layout or size (see `super::layout` for
//! which): the old program keeps serving until the new state is ready.
//!
//! 1. At load, each map to migrate is created anew, unpinned, and filled
//!    from its pinned predecessor, a batch of entries per system call
//!    (conntrack entries converted where the layout changed). The pins, and
//!    the programs attached through them, are untouched: the old programs
//!    serve on with the old maps.
//! 2. The agent attaches the new programs (every pinned link is swapped
//!    atomically: `bpf_link_update` for XDP and tcx, the socket programs'
//!    pins moved over the old ones), which use the new maps.
//! 3. [`Pending::finish`]: what the old programs added between the copy and
//!    the swap is copied again (only keys the new map does not hold yet:
//!    the new programs' entries win), then each new map is pinned beside
//!    the old pin and renamed over it (atomic), and the `layout` map last.
//!
//! What is lost: changes the old programs made in that window to entries
//! already copied (a refreshed `last_seen_ns`, a flag such as closing),
//! which the next packet of the flow makes again; entries the old programs
//! deleted in it come back and expire as usual. The agent logs how many
//! entries the second pass added; the e2e `upgrade` case measures them.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use lb_common::{
    BACKEND_F_LOCAL, Backend, CT_F_ACKED, CT_F_FORWARD, CT_F_REPLIED, CT_INGRESS_ANY,
    CT_INGRESS_NETWORK, CT_INGRESS_PODS, CtEntry, FlowKey, PROTO_TCP, SVC_F_ADDRESS, Service,
    ServiceKey, map_names,
};

use super::{
    batch::{self, BPF_ANY, BPF_NOEXIST, Entries},
    layout::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, Conversion, Plan},
};

/// One map being migrated.
struct Moving {
    name: &'static str,
    conversion: Conversion,
    /// The pinned map (still the old programs').
    old: MapData,
    /// The new map (the new programs').
    new: OwnedFd,
    copied: Copied,
}

/// What a copy did for one map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries read from the pinned map.
    pub read: usize,
    /// Entries stored in the new one.
    pub stored: usize,
    /// Entries that did not fit (a smaller hash map; an LRU evicts instead).
    pub full: usize,
    pub took: Duration,
}

/// What one migrated map went through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapReport {
    pub name: &'static str,
    pub conversion: Conversion,
    /// The copy at load.
    pub first: Copied,
    /// Entries the old programs added before the swap, copied by the second
    /// pass (in [`Pending::finish`]).
    pub late: usize,
}

/// What [`Pending::finish`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub maps: Vec<MapReport>,
    /// Pinned links whose program was swapped by the finish itself (those
    /// the agent had not attached anew, e.g. uplinks it waits to learn).
    pub links_swapped: usize,
    /// From the first copy to the last pin replaced.
    pub took: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let maps: Vec<String> = self
            .maps
            .iter()
            .map(|m| {
                format!(
                    "{} ({:?}): {} of {} entries copied in {:?}{}, {} more after the swap",
                    m.name,
                    m.conversion,
                    m.first.stored,
                    m.first.read,
                    m.first.took,
                    if m.first.full > 0 {
                        format!(" ({} did not fit)", m.first.full)
                    } else {
                        String::new()
                    },
                    m.late
                )
            })
            .collect();
        write!(
            f,
            "{}; {} link(s) swapped at the end; {:?} in all",
            maps.join("; "),
            self.links_swapped,
            self.took
        )
    }
}

/// Migrated maps whose pins are still the old ones (see the module docs).
pub struct Pending {
    dir: PathBuf,
    maps: Vec<Moving>,
    /// The new `layout` map, pinned last.
    layout: OwnedFd,
    /// Which backends are local (for conntrack's conversion), by id.
    local: Vec<Option<bool>>,
    started: Instant,
}

fn dup(data: &MapData) -> Result<OwnedFd> {
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating a map descriptor")
}

/// The descriptor of map `name` of the loaded object.
pub fn object_map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("the datapath object has no map {name}"))?;
    let data: &MapData = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::LpmTrie(d)
        | Map::DevMapHash(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d) => d,
        _ => bail!("map {name} is of a type migrations do not handle"),
    };
    dup(data)
}

/// Layout 1's conntrack entries as layout 2's: `ingress` by the rule
/// `CtEntry::ingress` states (forward entries from anywhere; reply entries
/// from the pods if their backend is local, else from the network; a reply
/// entry whose backend is gone from anywhere, as layout 1 took every
/// packet), and the flows taken as confirmed (`CT_F_REPLIED`, and
/// `CT_F_ACKED` for TCP): layout 1 did not track it, and an unconfirmed flow
/// would expire after 5 s of its client's silence.
/// `local` says, by backend id, whether a backend is on this node (None: no
/// backend holds the slot).
pub fn conntrack_v1_to_v2(entries: &Entries, local: &[Option<bool>]) -> Result<Entries> {
    let old: Vec<(FlowKey, lb_common::v1::CtEntry)> = entries.typed()?;
    let new: Vec<(FlowKey, CtEntry)> = old
        .into_iter()
        .map(|(k, v)| {
            let ingress = if v.flags & CT_F_FORWARD != 0 {
                CT_INGRESS_ANY
            } else {
                match local.get(v.backend as usize).copied().flatten() {
                    Some(true) => CT_INGRESS_PODS,
                    Some(false) => CT_INGRESS_NETWORK,
                    None => CT_INGRESS_ANY,
                }
            };
            let confirmed = if k.proto == PROTO_TCP {
                CT_F_REPLIED | CT_F_ACKED
            } else {
                CT_F_REPLIED
            };
            (
                k,
                CtEntry {
                    nat_src: v.nat_src,
                    nat_dst: v.nat_dst,
                    nat_src_port: v.nat_src_port,
                    nat_dst_port: v.nat_dst_port,
                    backend: v.backend,
                    service: v.service,
                    flags: v.flags | confirmed,
                    _pad: 0,
                    last_seen_ns: v.last_seen_ns,
                    ingress,
                    _pad2: 0,
                },
            )
        })
        .collect();
    Ok(Entries::from_typed(&new))
}

/// Layout 2's `services` values as layout 3's: a row `r` of `table_size`
/// entries is the table at element `r * maglev_row_elements(table_size)` of
/// that size, where its entries already are (`maglev` is copied as it is).
/// Address entries name no table.
pub fn services_v2_to_v3(entries: &Entries, table_size: u32) -> Result<Entries> {
    let old: Vec<(ServiceKey, lb_common::v2::Service)> = entries.typed()?;
    let stride = lb_common::maglev_row_elements(table_size);
    let new: Vec<(ServiceKey, Service)> = old
        .into_iter()
        .map(|(k, v)| {
            let tables = v.flags & SVC_F_ADDRESS == 0 && table_size > 0;
            let at = |row: u32| {
                if tables {
                    row.saturating_mul(stride)
                } else {
                    0
                }
            };
            (
                k,
                Service {
                    id: v.id,
                    table: at(v.table),
                    backend_count: v.backend_count,
                    flags: v.flags,
                    affinity_timeout: v.affinity_timeout,
                    cluster_table: at(v.cluster_table),
                    cluster_backend_count: v.cluster_backend_count,
                    table_size: if tables { table_size } else { 0 },
                },
            )
        })
        .collect();
    Ok(Entries::from_typed(&new))
}

impl Pending {
    /// Step 1 (see the module docs): fills the new maps of `plan`'s
    /// migrations (made by the loader, unpinned) from the pins in `dir`.
    /// `layout` is the new `layout` map, already written.
    pub fn start(plan: &Plan, dir: &Path, ebpf: &Ebpf, layout: OwnedFd) -> Result<Self> {
        let started = Instant::now();
        let local = if plan.migrations().any(|(_, c)| c == Conversion::ConntrackV1) {
            // The pinned `backends` (the old programs'): a migrated one may
            // not be filled yet.
            let path = dir.join(map_names::BACKENDS);
            let pinned =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            backend_locality(&dup(&pinned)?)?
        } else {
            Vec::new()
        };
        let mut maps = Vec::new();
        for (name, conversion) in plan.migrations() {
            let path = dir.join(name);
            let old =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let new = object_map_fd(ebpf, name)?;
            let copied = copy(name, conversion, &old, &new, &local, BPF_ANY)
                .with_context(|| format!("migrating {}", path.display()))?;
            log::info!(
                "migrating {name} ({conversion:?}): {} of {} entries copied in {:?}",
                copied.stored,
                copied.read,
                copied.took
            );
            maps.push(Moving {
                name,
                conversion,
                old,
                new,
                copied,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            maps,
            layout,
            local,
            started,
        })
    }

    /// The maps being migrated.
    pub fn names(&self) -> Vec<&'static str> {
        self.maps.iter().map(|m| m.name).collect()
    }

    /// Step 3 (see the module docs), once the new programs are attached:
    /// the second copy, then the pins. `swap_links` is called first and
    /// swaps every pinned link still running an old program; it returns how
    /// many it swapped.
    pub fn finish(self, swap_links: impl FnOnce() -> Result<usize>) -> Result<Report> {
        let links_swapped = swap_links()?;
        let mut reports = Vec::new();
        for m in &self.maps {
            let late = copy(
                m.name,
                m.conversion,
                &m.old,
                &m.new,
                &self.local,
                BPF_NOEXIST,
            )
            .with_context(|| format!("copying what changed in {} during the swap", m.name))?;
            reports.push(MapReport {
                name: m.name,
                conversion: m.conversion,
                first: m.copied,
                late: late.stored,
            });
        }
        for m in &self.maps {
            replace_pin(&self.dir, m.name, &m.new)?;
        }
        replace_pin(&self.dir, map_names::LAYOUT, &self.layout)?;
        Ok(Report {
            maps: reports,
            links_swapped,
            took: self.started.elapsed(),
        })
    }
}

/// Whether each backend slot's backend is local, by id (None: no backend).
fn backend_locality(fd: &OwnedFd) -> Result<Vec<Option<bool>>> {
    let slots: Vec<(u32, Backend)> = batch::read_all(fd.as_fd())?.typed()?;
    let mut local = vec![None; slots.len()];
    for (id, b) in slots {
        if let Some(l) = local.get_mut(id as usize) {
            *l = b.is_active().then_some(b.flags & BACKEND_F_LOCAL != 0);
        }
    }
    Ok(local)
}

/// Pins the map `fd` as `dir/name`, in place of what was pinned there
/// (pinned beside it, then renamed over it: never a moment without a pin).
pub fn replace_pin(dir: &Path, name: &str, fd: &OwnedFd) -> Result<()> {
    let fresh = dir.join(format!("{name}-new"));
    let _ = std::fs::remove_file(&fresh);
    let data = MapData::from_fd(fd.try_clone().context("duplicating a map descriptor")?)
        .with_context(|| format!("reopening the new {name}"))?;
    data.pin(&fresh)
        .with_context(|| format!("pinning {}", fresh.display()))?;
    let pin = dir.join(name);
    std::fs::rename(&fresh, &pin)
        .with_context(|| format!("moving {} to {}", fresh.display(), pin.display()))
}

/// Copies `old`'s entries into `new`, converted, with `flags`.
fn copy(
    name: &str,
    conversion: Conversion,
    old: &MapData,
    new: &OwnedFd,
    local: &[Option<bool>],
    flags: u64,
) -> Result<Copied> {
    let t0 = Instant::now();
    let mut entries = batch::read_all(old.fd().as_fd())?;
    let read = entries.len();
    let info = batch::map_info(new.as_fd())?;
    if info.map_type == BPF_MAP_TYPE_ARRAY || info.map_type == BPF_MAP_TYPE_PERCPU_ARRAY {
        // An array keeps its indices: those past the new size must be empty.
        entries = keep_indices_below(&entries, info.max_entries, name)?;
    }
    if flags == BPF_NOEXIST {
        // Only what the new map lacks (one call per entry: see
        // `batch::write_all`), still with NOEXIST: an entry the new
        // programs made since this read wins.
        entries = entries.without_keys_of(&batch::read_all(new.as_fd())?);
    }
    match conversion {
        Conversion::Copy => {}
        Conversion::ConntrackV1 => entries = conntrack_v1_to_v2(&entries, local)?,
        Conversion::ServicesV2 { table_size } => entries = services_v2_to_v3(&entries, table_size)?,
    }
    if entries.value_size != value_len_of(&info)? {
        bail!(
            "{name}: {}-byte values to copy into a map of {}-byte values",
            entries.value_size,
            info.value_size
        );
    }
    let w = batch::write_all(new.as_fd(), &entries, flags)?;
    Ok(Copied {
        read,
        stored: w.stored,
        full: w.full,
        took: t0.elapsed(),
    })
}

fn value_len_of(info: &batch::RawMapInfo) -> Result<usize> {
    // Per-CPU types: PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH.
    Ok(if matches!(info.map_type, 5 | 6 | 10) {
        (info.value_size as usize).next_multiple_of(8) * batch::possible_cpus()?
    } else {
        info.value_size as usize
    })
}

/// The entries of an array (u32 keys) below `max`; an error if one past it
/// holds anything (shrinking would drop it).
fn keep_indices_below(entries: &Entries, max: u32, name: &str) -> Result<Entries> {
    let mut kept = Entries::new(entries.key_size, entries.value_size);
    for i in 0..entries.len() {
        let index = u32::from_ne_bytes(entries.key(i)[..4].try_into()?);
        if index < max {
            kept.push(entries.key(i), entries.value(i));
        } else if entries.value(i).iter().any(|b| *b != 0) {
            bail!(
                "{name} holds an entry at index {index}, past the {max} of the new size: \
                 start with a size that keeps it"
            );
        }
    }
    Ok(kept)
}
