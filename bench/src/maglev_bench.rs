//! Maglev: table build time at the default table size, and the share of flows
//! that move when one backend is removed (`lb_agent::maglev::build`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::Result;
use lb_agent::maglev;
use lb_common::capacity::MAGLEV_TABLE_SIZE;

use crate::{Figure, Target};

const SIZES: [usize; 3] = [10, 100, 1000];
const SECTION: &str = "Maglev (table size 16381)";

pub fn keys() -> Vec<String> {
    SIZES
        .iter()
        .flat_map(|n| {
            [
                format!("maglev.build_{n}.ms"),
                format!("maglev.moved_{n}.pct"),
            ]
        })
        .chain(std::iter::once(
            "maglev.moved_100_larger_table.pct".to_string(),
        ))
        .collect()
}

fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            let ip = IpAddr::from([10, 244, (i / 250) as u8, (i % 250 + 1) as u8]);
            (SocketAddr::new(ip, 8080), i as u32 + 1)
        })
        .collect()
}

/// A larger prime table size, to show what `--maglev-table-size` buys.
const LARGER_TABLE_SIZE: u32 = 32_749;

/// Removes each of a few backends in turn; the share (%) of table entries
/// (flows) whose backend changes each time.
fn moved_shares(b: &[(SocketAddr, u32)], m: u32) -> Vec<f64> {
    let n = b.len();
    let full = maglev::build(b, m);
    [0, n / 3, n / 2, n - 1]
        .into_iter()
        .map(|k| {
            let mut less = b.to_vec();
            less.remove(k);
            let t = maglev::build(&less, m);
            let changed = full.iter().zip(&t).filter(|(a, b)| a != b).count();
            100.0 * changed as f64 / f64::from(m)
        })
        .collect()
}

pub fn run(quick: bool) -> Result<(Vec<Figure>, Vec<String>)> {
    let rounds = if quick { 5 } else { 15 };
    let m = MAGLEV_TABLE_SIZE;
    let mut figs = Vec::new();
    let mut notes = Vec::new();
    for n in SIZES {
        let b = backends(n);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let table = maglev::build(&b, m);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(table);
        }
        figs.push(Figure::new(
            SECTION,
            &format!("maglev.build_{n}.ms"),
            &format!("build, {n} backends"),
            "ms",
            times,
        ));
        let moved = moved_shares(&b, m);
        figs.push(
            Figure::new(
                SECTION,
                &format!("maglev.moved_{n}.pct"),
                &format!("flows moved when 1 of {n} backends goes"),
                "%",
                moved,
            )
            .target(Target::AtMost(100.0 / n as f64 + 1.0)),
        );
    }
    // The table size is the knob for disruption: Maglev moves more than the
    // removed backend's share, less so the larger the table is per backend.
    let big = LARGER_TABLE_SIZE;
    figs.push(Figure::new(
        SECTION,
        "maglev.moved_100_larger_table.pct",
        &format!("  same, --maglev-table-size {big}"),
        "%",
        moved_shares(&backends(100), big),
    ));
    notes.push(format!(
        "Maglev: build time of one table of {m} entries ({rounds} builds each); flows moved = \
         share of table entries whose backend changes when one backend is removed (4 different \
         backends removed in turn), including the removed backend's own 1/N."
    ));
    Ok((figs, notes))
}
