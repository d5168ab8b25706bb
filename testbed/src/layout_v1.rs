//! Earlier releases' pin sets (map layouts 1 and 2, see
//! `lb_common::LAYOUT_VERSION`), for tests that upgrade from them. Layout 1: its `conntrack` holds 56-byte values (no
//! `ingress`, no confirmation bits), and it has no `layout`, `fragments` or
//! `ct_stats` map.
//!
//! [`make_v1`] turns a pin directory an agent of this build made into that:
//! the conntrack entries it holds, as layout 1 had them, plus any others a
//! test adds, in a layout-1 map pinned in place of this build's; `layout`,
//! `fragments` and `ct_stats` unpinned. The programs attached keep running (this build's,
//! on the maps they were loaded with: the previous release's object is not
//! built here), so traffic flows on while the next agent finds a layout-1
//! pin set and migrates it.
//!
//! [`make_v2_services`] gives a pin directory layout 2's `services` (tables
//! as rows of one size, that size in `config`) and says layout 2.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    CT_F_ACKED, CT_F_FORWARD, CT_F_REPLIED, CT_F_REPLY, Config, CtEntry, FAMILY_V4, FlowKey,
    Layout, PROTO_TCP, ServiceKey, map_names, v1, v2,
};

/// `BPF_MAP_TYPE_LRU_HASH`.
const LRU_HASH: u32 = 9;

/// What [`make_v1`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V1PinSet {
    /// Entries carried over from this build's conntrack.
    pub carried: usize,
    /// Entries the test added.
    pub added: usize,
    /// The layout-1 conntrack's capacity.
    pub max_entries: u32,
}

/// Layout 1's form of a conntrack entry: `ingress` dropped, and the bits
/// layout 1 never set cleared.
pub fn to_v1(e: &CtEntry) -> v1::CtEntry {
    v1::CtEntry {
        nat_src: e.nat_src,
        nat_dst: e.nat_dst,
        nat_src_port: e.nat_src_port,
        nat_dst_port: e.nat_dst_port,
        backend: e.backend,
        service: e.service,
        flags: e.flags & !(CT_F_REPLIED | CT_F_ACKED),
        _pad: 0,
        last_seen_ns: e.last_seen_ns,
    }
}

/// A new, unpinned layout-1 conntrack map of `max_entries`.
pub fn v1_conntrack(max_entries: u32) -> Result<HashMap<MapData, FlowKey, v1::CtEntry>> {
    let def = aya_obj::Map::new_from_params(
        LRU_HASH,
        size_of::<FlowKey>() as u32,
        size_of::<v1::CtEntry>() as u32,
        max_entries,
        0,
    );
    let data = MapData::create(def, map_names::CONNTRACK, None)
        .context("creating a layout-1 conntrack map")?;
    Ok(Map::LruHashMap(data).try_into()?)
}

/// Rewrites the pin set in `dir` as the previous release left one (see the
/// module docs), its conntrack holding what this build's did, as layout 1,
/// and `extra`.
pub fn make_v1(dir: &Path, extra: &[(FlowKey, v1::CtEntry)]) -> Result<V1PinSet> {
    let path = dir.join(map_names::CONNTRACK);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let max_entries = data.info()?.max_entries();
    let current: HashMap<MapData, FlowKey, CtEntry> = Map::LruHashMap(data).try_into()?;
    let mut old = v1_conntrack(max_entries)?;
    let mut carried = 0;
    for entry in current.iter() {
        let (k, v) = entry.context("reading conntrack")?;
        old.insert(k, to_v1(&v), 0)?;
        carried += 1;
    }
    for (k, v) in extra {
        old.insert(k, v, 0)?;
    }
    let fresh = dir.join("conntrack-new");
    let _ = std::fs::remove_file(&fresh);
    old.pin(&fresh)
        .with_context(|| format!("pinning {}", fresh.display()))?;
    std::fs::rename(&fresh, &path).with_context(|| format!("replacing {}", path.display()))?;
    for gone in [map_names::LAYOUT, map_names::FRAGMENTS, map_names::CT_STATS] {
        let p = dir.join(gone);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", p.display()));
            }
            _ => {}
        }
    }
    Ok(V1PinSet {
        carried,
        added: extra.len(),
        max_entries,
    })
}

/// `flows` established TCP flows as layout 1 tracked them (both entries
/// each), from clients 198.51.100.0/24 (ports from 20000) to `frontend`
/// (IPv4, port `port`), to backend `backend` (id, address, port) of
/// service-port id `service`, last seen at `now_ns`.
pub fn tcp_flows(
    flows: usize,
    frontend: ([u8; 4], u16),
    (backend_id, backend_addr, backend_port): (u32, [u8; 4], u16),
    service: u32,
    now_ns: u64,
) -> Vec<(FlowKey, v1::CtEntry)> {
    let v4 = |a: [u8; 4]| {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    };
    let mut out = Vec::with_capacity(2 * flows);
    for i in 0..flows {
        let client = v4([198, 51, 100, (i % 250) as u8 + 1]);
        let cport = 20_000 + (i / 250) as u16;
        let entry = |nat_src, nat_src_port, nat_dst, nat_dst_port, flags| v1::CtEntry {
            nat_src,
            nat_dst,
            nat_src_port,
            nat_dst_port,
            backend: backend_id,
            service,
            flags,
            _pad: 0,
            last_seen_ns: now_ns,
        };
        let key = |src, src_port, dst, dst_port| FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        out.push((
            key(client, cport, v4(frontend.0), frontend.1),
            entry(client, cport, v4(backend_addr), backend_port, CT_F_FORWARD),
        ));
        out.push((
            key(v4(backend_addr), backend_port, client, cport),
            entry(v4(frontend.0), frontend.1, client, cport, CT_F_REPLY),
        ));
    }
    out
}

/// The kernel's monotonic clock, as the datapath stamps entries with it
/// (`bpf_ktime_get_coarse_ns`).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `BPF_MAP_TYPE_HASH`.
const HASH: u32 = 1;

/// Rewrites the pin set in `dir` as layout 2 left one: `services` replaced
/// by a layout-2 map (without BTF, as a test cannot build layout 2's)
/// holding `entries`, `config.maglev_size` set to `table_size` (the size of
/// every row, which `maglev` must already hold where `entries` say), and
/// `layout` saying version 2.
pub fn make_v2_services(
    dir: &Path,
    entries: &[(ServiceKey, v2::Service)],
    table_size: u32,
) -> Result<()> {
    let path = dir.join(map_names::SERVICES);
    let max_entries = MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?
        .info()?
        .max_entries();
    let def = aya_obj::Map::new_from_params(
        HASH,
        size_of::<ServiceKey>() as u32,
        size_of::<v2::Service>() as u32,
        max_entries,
        0,
    );
    let data = MapData::create(def, map_names::SERVICES, None)
        .context("creating a layout-2 services map")?;
    let mut old: HashMap<MapData, ServiceKey, v2::Service> = Map::HashMap(data).try_into()?;
    for (k, v) in entries {
        old.insert(k, v, 0)?;
    }
    let fresh = dir.join("services-new");
    let _ = std::fs::remove_file(&fresh);
    old.pin(&fresh)
        .with_context(|| format!("pinning {}", fresh.display()))?;
    std::fs::rename(&fresh, &path).with_context(|| format!("replacing {}", path.display()))?;
    let config = MapData::from_pin(dir.join(map_names::CONFIG)).context("opening config")?;
    let mut config: Array<MapData, Config> = Map::Array(config).try_into()?;
    let mut c = config.get(&0, 0)?;
    c.maglev_size = table_size;
    config.set(0, c, 0)?;
    let layout = MapData::from_pin(dir.join(map_names::LAYOUT)).context("opening layout")?;
    let mut layout: Array<MapData, Layout> = Map::Array(layout).try_into()?;
    let mut l = layout.get(&0, 0)?;
    l.version = 2;
    layout.set(0, l, 0)?;
    Ok(())
}
