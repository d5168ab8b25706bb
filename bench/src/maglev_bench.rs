//! Maglev: table build time at each Service's table size (chosen from its
//! backend count, `lb_agent::maglev::table_size_for`), and the share of flows
//! that move when one backend is removed (`lb_agent::maglev::build`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::Result;
use lb_agent::maglev;

use crate::{Figure, Target};

const SIZES: [usize; 4] = [10, 100, 1000, 5000];
const SECTION: &str = "Maglev (per-Service table sizes)";

pub fn keys() -> Vec<String> {
    SIZES
        .iter()
        .flat_map(|n| {
            [
                format!("maglev.build_{n}.ms"),
                format!("maglev.moved_{n}.pct"),
            ]
        })
        .chain(std::iter::once("maglev.moved_boundary.pct".to_string()))
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

/// Removes each of 8 backends in turn; the share (%) of flows whose backend
/// changes each time, each table at the size its backend count gets (as the
/// agent builds them: the two sizes differ where the removal crosses a class
/// boundary).
fn moved_shares(b: &[(SocketAddr, u32)]) -> Vec<f64> {
    let n = b.len();
    let before = maglev::table_size_for(n);
    let after = maglev::table_size_for(n - 1);
    let full = maglev::build(b, before);
    [0, n / 5, n / 4, n / 3, n / 2, 2 * n / 3, 4 * n / 5, n - 1]
        .into_iter()
        .map(|k| {
            let mut less = b.to_vec();
            less.remove(k);
            let t = maglev::build(&less, after);
            // A flow of hash h reads entry h % size: count over a common
            // range of hashes (the product would be exact; the larger size
            // times a few is close enough and cheap).
            let span = u64::from(before.max(after)) * 7;
            let changed = (0..span)
                .filter(|h| {
                    full[(*h % u64::from(before)) as usize] != t[(*h % u64::from(after)) as usize]
                })
                .count();
            100.0 * changed as f64 / span as f64
        })
        .collect()
}

pub fn run(quick: bool) -> Result<(Vec<Figure>, Vec<String>)> {
    let rounds = if quick { 5 } else { 15 };
    let mut figs = Vec::new();
    let mut notes = Vec::new();
    for n in SIZES {
        let b = backends(n);
        let m = maglev::table_size_for(n);
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
            &format!("build, {n} backends ({m} entries)"),
            "ms",
            times,
        ));
        figs.push(
            Figure::new(
                SECTION,
                &format!("maglev.moved_{n}.pct"),
                &format!("flows moved when 1 of {n} backends goes"),
                "%",
                moved_shares(&b),
            )
            .target(Target::AtMost(100.0 / n as f64 + 1.0)),
        );
    }
    // The price of sizes by class: a removal that crosses a boundary (the
    // first above one backend: the smallest count of the second prime) gets
    // a table of another size, which moves most flows' choice.
    let n = maglev::SIZE_CLASSES[1].0 as usize + 1;
    let (from, to) = (maglev::table_size_for(n), maglev::table_size_for(n - 1));
    figs.push(Figure::new(
        SECTION,
        "maglev.moved_boundary.pct",
        &format!("  across a size boundary: 1 of {n} goes ({from} -> {to} entries)"),
        "%",
        moved_shares(&backends(n)),
    ));
    notes.push(format!(
        "Maglev: build time of one table at the size its backend count gets ({rounds} builds \
         each); flows moved = share of flows whose backend changes when one backend is removed \
         (8 different backends removed in turn), including the removed backend's own 1/N."
    ));
    Ok((figs, notes))
}
