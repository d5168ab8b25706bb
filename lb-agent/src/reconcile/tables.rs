//! Maglev rows: a port's tables built (for a full sync, ahead of the port's
//! reconcile and on a few threads) and written into `maglev` entry by entry.

use std::net::SocketAddr;

use super::ids::Ids;
use crate::{
    bpf::maps::MaglevRows,
    maglev,
    model::{Desired, PortKey, Table},
};

/// Maglev entries built ahead at a time (4 MB), whatever the table size.
const PREBUILT_ENTRIES: usize = 1 << 20;

/// How many ports' tables are built ahead at a time with tables of
/// `table_size` entries.
pub(super) fn ports_per_batch(table_size: u32) -> usize {
    (PREBUILT_ENTRIES / table_size.max(1) as usize).max(1)
}

/// A port's Maglev tables built ahead of its reconcile, holding positions in
/// the table's backend order (ids are only known once the backends are written).
#[derive(Default)]
pub(super) struct Prebuilt {
    pub(super) cluster: Option<Vec<u32>>,
    pub(super) local: Option<Vec<u32>>,
}

/// Builds the tables of `keys`' desired ports, on up to four threads when
/// there are enough of them (a single change is built in place, with no thread
/// to start). Maglev depends only on the backends' addresses, so a table over
/// positions maps to the table over ids entry by entry.
pub(super) fn prebuild(desired: &Desired, keys: &[&PortKey], table_size: u32) -> Vec<Prebuilt> {
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
            (!positions.is_empty()).then(|| maglev::build(&positions, table_size))
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

/// Why a row was not written.
#[derive(Debug)]
pub(super) enum RowError {
    /// Every row is in use (`--max-services`).
    NoRowLeft,
    /// The write failed (logged); the verify pass writes it again.
    Write,
}

/// Writes (or frees) the row for `table` and returns how many entries changed.
/// An empty or absent table has no row. `backend_id` gives the id each backend
/// of the table was written under; `prebuilt`, when given, is the table built
/// ahead over `table`'s backends with their positions as values (see
/// [`prebuild`]).
pub(super) fn write_row(
    maglev: &mut MaglevRows,
    rows: &mut Ids,
    row: &mut Option<u32>,
    table: Option<&Table>,
    backend_id: impl Fn(&SocketAddr) -> Option<u32>,
    prebuilt: Option<Vec<u32>>,
) -> Result<usize, RowError> {
    let Some(table) = table.filter(|t| !t.backends.is_empty()) else {
        if let Some(r) = row.take() {
            rows.release(r);
        }
        return Ok(0);
    };
    let r = match *row {
        Some(r) => r,
        None => rows.alloc().ok_or(RowError::NoRowLeft)?,
    };
    *row = Some(r);
    let entries: Vec<(SocketAddr, u32)> = table
        .backends
        .iter()
        .filter_map(|b| backend_id(&b.addr).map(|id| (b.addr, id)))
        .collect();
    let built = match prebuilt {
        // Positions turn into ids when every backend has its slot (they were
        // all just upserted, so `entries` is in the table's order).
        Some(positions) if entries.len() == table.backends.len() => positions
            .into_iter()
            .map(|p| entries[p as usize].1)
            .collect(),
        _ => maglev::build(&entries, maglev.table_size() as u32),
    };
    match maglev.write_row(r, &built) {
        Ok(n) => Ok(n),
        Err(e) => {
            log::error!("writing Maglev row {r}: {e:#}");
            Err(RowError::Write)
        }
    }
}
