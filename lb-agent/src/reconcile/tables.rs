//! Maglev tables: each port's size chosen from its backends, its tables
//! placed in `maglev`, built ahead (for a full sync, on a few threads) and
//! written entry by entry.

use std::net::SocketAddr;

use super::{
    encoding::{Extent, Tables},
    ids::Extents,
};
use crate::{
    bpf::maps::MaglevTables,
    maglev,
    model::{Desired, PortKey, PortSpec, Table},
};

/// Maglev entries built ahead at a time (4 MB), whatever the tables' sizes.
const PREBUILT_ENTRIES: usize = 1 << 20;

/// The entries of both tables of `spec` (they share one size): from the
/// larger backend count of the two, which is the cluster table's wherever
/// this node's endpoints are among the cluster's, so that every node gives
/// the cluster table the same size, and so the same content.
pub(super) fn size_for(spec: &PortSpec) -> u32 {
    let local = spec.local.as_ref().map_or(0, |t| t.backends.len());
    maglev::table_size_for(spec.cluster.backends.len().max(local))
}

/// Splits `keys` into batches whose tables, built ahead, hold at most
/// [`PREBUILT_ENTRIES`] entries (a port with larger tables is a batch of its own).
pub(super) fn batches<'k, 'p>(
    desired: &Desired,
    keys: &'k [&'p PortKey],
) -> Vec<&'k [&'p PortKey]> {
    let mut out = Vec::new();
    let (mut start, mut entries) = (0, 0usize);
    for (i, key) in keys.iter().enumerate() {
        let tables = desired.port(key).map_or(0, |spec| {
            let n = 1 + usize::from(spec.local.is_some());
            n * size_for(spec) as usize
        });
        if i > start && entries + tables > PREBUILT_ENTRIES {
            out.push(&keys[start..i]);
            (start, entries) = (i, 0);
        }
        entries += tables;
    }
    if start < keys.len() {
        out.push(&keys[start..]);
    }
    out
}

/// A port's Maglev tables built ahead of its reconcile, holding positions in
/// the table's backend order (ids are only known once the backends are
/// written), at the port's size ([`size_for`]).
#[derive(Default)]
pub(super) struct Prebuilt {
    pub(super) cluster: Option<Vec<u32>>,
    pub(super) local: Option<Vec<u32>>,
}

/// Builds the tables of `keys`' desired ports, on up to four threads when
/// there are enough of them (a single change is built in place, with no thread
/// to start). Maglev depends only on the backends' addresses, so a table over
/// positions maps to the table over ids entry by entry.
pub(super) fn prebuild(desired: &Desired, keys: &[&PortKey]) -> Vec<Prebuilt> {
    let build = |key: &PortKey| -> Prebuilt {
        let Some(spec) = desired.port(key).filter(|s| !s.frontends.is_empty()) else {
            return Prebuilt::default();
        };
        let size = size_for(spec);
        let one = |t: &Table| {
            let positions: Vec<(SocketAddr, u32)> = t
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.addr, i as u32))
                .collect();
            (!positions.is_empty()).then(|| maglev::build(&positions, size))
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

/// Why a port's tables were not written.
#[derive(Debug)]
pub(super) enum TableError {
    /// No free range of `maglev` is long enough (`--maglev-entries`).
    NoRoom,
    /// The write failed (logged); the verify pass writes it again.
    Write,
}

/// Where a port's tables go, decided before anything is written.
pub(super) struct Placement {
    /// The tables as they will be once written.
    pub(super) tables: Tables,
    /// Space the port gives up: to release once its frontends name the new
    /// tables (see [`Extents::release`]).
    pub(super) retired: Vec<Extent>,
    /// The size the tables should have, where there was no room for it and
    /// they stay at the size they had (see [`place`]).
    pub(super) short_of: Option<u32>,
}

/// Places the tables `spec` needs, given where they are now (`current`):
/// a table stays where it is if its extent is long enough for the new size
/// (shrinking it gives the rest up), else it gets a new extent and gives the
/// old one up. An empty or absent table has none. Nothing is allocated if
/// one table finds no room.
///
/// Without room for the new size, a port that has tables keeps their size
/// (`short_of` says so, and the port is retried until room frees up): its
/// new backends are served at once, only with more disruption than its
/// size class promises. This is what keeps a port whose space is given up
/// only at the next pass (an upgrade's first sync, where the old rows
/// shrink) in service meanwhile.
///
/// A table rewritten in place at another size is safe while frontends still
/// carry the old size: the old size's entries are then a mix of the new
/// table's and the old one's, and both name backends that exist until the
/// pass ends.
pub(super) fn place(
    extents: &mut Extents,
    current: Tables,
    spec: &PortSpec,
) -> Result<Placement, TableError> {
    let size = size_for(spec);
    match place_at(extents, current, spec, size) {
        Err(TableError::NoRoom) if current.size != 0 && current.size != size => {
            let mut kept = place_at(extents, current, spec, current.size)?;
            kept.short_of = Some(size);
            Ok(kept)
        }
        placed => placed,
    }
}

/// [`place`] at `size`.
fn place_at(
    extents: &mut Extents,
    current: Tables,
    spec: &PortSpec,
    size: u32,
) -> Result<Placement, TableError> {
    let need = lb_common::maglev_row_elements(size);
    let wanted = |t: Option<&Table>| t.is_some_and(|t| !t.backends.is_empty());
    let mut tables = Tables {
        size,
        ..Tables::default()
    };
    let (mut retired, mut shrunk, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    for (is_wanted, now, next) in [
        (
            wanted(Some(&spec.cluster)),
            current.cluster,
            &mut tables.cluster,
        ),
        (
            wanted(spec.local.as_ref()),
            current.local,
            &mut tables.local,
        ),
    ] {
        *next = match (is_wanted, now) {
            (false, now) => {
                retired.extend(now);
                None
            }
            (true, Some(e)) if e.len >= need => {
                shrunk.push(e);
                Some(Extent {
                    start: e.start,
                    len: need,
                })
            }
            (true, now) => match extents.alloc(need) {
                Some(e) => {
                    fresh.push(e);
                    retired.extend(now);
                    Some(e)
                }
                None => {
                    for e in fresh {
                        extents.unalloc(e);
                    }
                    return Err(TableError::NoRoom);
                }
            },
        };
    }
    // The table stays at the head, so the tail can be given up now (it is
    // free from the next pass on, when every frontend names the new size).
    for e in shrunk {
        extents.shrink(e, need);
    }
    Ok(Placement {
        tables,
        retired,
        short_of: None,
    })
}

/// Writes one table of a port at its place (`at`, none for an empty or
/// absent table) and returns how many entries changed. `backend_id` gives
/// the id each backend of the table was written under; `prebuilt`, when
/// given, is the table built ahead over `table`'s backends with their
/// positions as values (see [`prebuild`]).
pub(super) fn write_table(
    maglev: &mut MaglevTables,
    at: Option<Extent>,
    size: u32,
    table: Option<&Table>,
    backend_id: impl Fn(&SocketAddr) -> Option<u32>,
    prebuilt: Option<Vec<u32>>,
) -> Result<usize, TableError> {
    let (Some(at), Some(table)) = (at, table) else {
        return Ok(0);
    };
    let entries: Vec<(SocketAddr, u32)> = table
        .backends
        .iter()
        .filter_map(|b| backend_id(&b.addr).map(|id| (b.addr, id)))
        .collect();
    let built = match prebuilt {
        // Positions turn into ids when every backend has its slot (they were
        // all just upserted, so `entries` is in the table's order).
        Some(positions)
            if entries.len() == table.backends.len() && positions.len() == size as usize =>
        {
            positions
                .into_iter()
                .map(|p| entries[p as usize].1)
                .collect()
        }
        _ => maglev::build(&entries, size),
    };
    match maglev.write(at.start, &built) {
        Ok(n) => Ok(n),
        Err(e) => {
            log::error!("writing the Maglev table at element {}: {e:#}", at.start);
            Err(TableError::Write)
        }
    }
}
