//! Conntrack's map shape against the alternatives, under BPF_PROG_TEST_RUN,
//! side by side in one run: what one insert into a full table and one hit
//! cost with the LRU flavour and key size conntrack has (one table with a
//! common LRU list, 40-byte keys for both families), with an LRU list per
//! CPU (`BPF_F_NO_COMMON_LRU`), and with an IPv4 table of 16-byte keys and
//! 40-byte values. Inserts run on one CPU and on every CPU at once (where the
//! common list's lock is shared). The programs are `bench_lru*` and
//! `bench_hit*` in lb-ebpf's bench object; every table has conntrack's
//! default size and is full before the first measured run.

use std::{thread, time::Instant};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    CtEntry, FlowKey,
    bench_keys::{CtEntry4, FlowKey4, HIT_KEYS, SLOT_LRU, SLOT_LRU_NC, SLOT_LRU16, key16, key40},
    capacity::CONNTRACK,
};

use crate::{Figure, cpu};

const SECTION: &str = "Conntrack map shapes (BPF_PROG_TEST_RUN, tables of 524288 entries, full)";
const XDP_TX: u32 = 3;
/// The programs, and the `bench_cnt` slot each counts in.
const INSERT_COMMON: (&str, u32) = ("bench_lru", SLOT_LRU);
const INSERT_PER_CPU: (&str, u32) = ("bench_lru_nc", SLOT_LRU_NC);
const INSERT_KEY16: (&str, u32) = ("bench_lru16", SLOT_LRU16);
const HIT_KEY40: &str = "bench_hit40";
const HIT_KEY16: &str = "bench_hit16";

pub fn keys() -> Vec<String> {
    [
        "insert_common_1cpu.ns",
        "insert_per_cpu_1cpu.ns",
        "per_cpu_vs_common_1cpu.ratio",
        "insert_common_all_cpus.ns",
        "insert_per_cpu_all_cpus.ns",
        "per_cpu_vs_common_all_cpus.ratio",
        "insert_key16.ns",
        "key16_vs_key40_insert.ratio",
        "hit_key40.ns",
        "hit_key16.ns",
        "key16_vs_key40_hit.ratio",
    ]
    .iter()
    .map(|k| format!("ct_maps.{k}"))
    .collect()
}

struct Lab {
    bench: Ebpf,
    counter: PerCpuArray<MapData, u64>,
}

impl Lab {
    fn load() -> Result<Self> {
        let mut bench = crate::load_bench(&[
            INSERT_COMMON.0,
            INSERT_PER_CPU.0,
            INSERT_KEY16.0,
            HIT_KEY40,
            HIT_KEY16,
        ])?;
        let counter = PerCpuArray::try_from(bench.take_map("bench_cnt").context("bench_cnt")?)?;
        Ok(Self { bench, counter })
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        crate::bench_prog(&self.bench, name)
    }

    /// Fills the hit tables: the keys the programs look up, then others up
    /// to the tables' size.
    fn fill_hit_tables(&mut self) -> Result<()> {
        let mut t40: HashMap<_, FlowKey, CtEntry> = HashMap::try_from(
            self.bench
                .map_mut("bench_hit40_tbl")
                .context("bench_hit40_tbl")?,
        )?;
        let entry = CtEntry {
            backend: 1,
            ..CtEntry::default()
        };
        for n in 0..u64::from(CONNTRACK) {
            t40.insert(key40(n, 0), entry, 0)
                .context("filling bench_hit40_tbl")?;
        }
        let mut t16: HashMap<_, FlowKey4, CtEntry4> = HashMap::try_from(
            self.bench
                .map_mut("bench_hit16_tbl")
                .context("bench_hit16_tbl")?,
        )?;
        for n in 0..u64::from(CONNTRACK) {
            t16.insert(key16(n, 0), [n, 0, 1, 0, 0], 0)
                .context("filling bench_hit16_tbl")?;
        }
        Ok(())
    }

    /// How many inserts `slot`'s program has made, on every CPU.
    fn count(&self, slot: u32) -> Result<u64> {
        Ok(self.counter.get(&slot, 0)?.iter().sum())
    }

    /// Checks that the last insert `slot`'s program made on `cpu` (its
    /// `n`-th there) is in its table.
    fn check_insert(&self, (prog, slot): (&str, u32), cpu: u32) -> Result<()> {
        let n = self.counter.get(&slot, 0)?[cpu as usize];
        ensure!(n > 0, "{prog} inserted nothing on CPU {cpu}");
        let table = format!("{prog}_tbl");
        let map = self.bench.map(&table).with_context(|| table.clone())?;
        let found = if slot == INSERT_KEY16.1 {
            let t: HashMap<_, FlowKey4, CtEntry4> = HashMap::try_from(map)?;
            t.get(&key16(n - 1, cpu), 0).map(|v| v[0] == n - 1)
        } else {
            let t: HashMap<_, FlowKey, CtEntry> = HashMap::try_from(map)?;
            t.get(&key40(n - 1, cpu), 0)
                .map(|v| v.last_seen_ns == n - 1)
        };
        ensure!(
            found
                .with_context(|| format!("{prog}: the last key of CPU {cpu} is not in {table}"))?,
            "{prog}: wrong value under the last key of CPU {cpu}"
        );
        Ok(())
    }
}

/// One run of `repeat` iterations of `prog` on the calling thread: ns per
/// iteration.
fn run_once(prog: &Xdp, repeat: u32) -> Result<f64> {
    let frame = [0u8; 64];
    let r = lb_testbed::test_run::xdp(prog, &frame, 1, repeat)?;
    ensure!(
        r.ret == XDP_TX,
        "returned {} (a failed insert or a miss)",
        r.ret
    );
    Ok(r.per_iteration.as_nanos() as f64)
}

/// `repeat` iterations of `prog` on each of `cpus` at once, each thread
/// pinned to its CPU: the mean ns per iteration.
fn run_on(prog: &Xdp, cpus: &[usize], repeat: u32) -> Result<f64> {
    let times: Vec<Result<f64>> = thread::scope(|s| {
        let runs: Vec<_> = cpus
            .iter()
            .map(|&c| {
                s.spawn(move || {
                    cpu::pin_thread(c)?;
                    run_once(prog, repeat)
                })
            })
            .collect();
        runs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a run panicked")))
            })
            .collect()
    });
    let times: Vec<f64> = times.into_iter().collect::<Result<_>>()?;
    Ok(times.iter().sum::<f64>() / times.len() as f64)
}

pub fn run(quick: bool) -> Result<(Vec<Figure>, Vec<String>)> {
    let t0 = Instant::now();
    let mut lab = Lab::load()?;
    lab.fill_hit_tables()?;
    let one = [cpu::bench_cpu()];
    let all: Vec<usize> = (0..cpu::online_cpus()).collect();
    let (repeat, rounds) = if quick { (200_000, 3) } else { (1_000_000, 7) };
    // Fill the insert tables first: every measured insert then evicts.
    for p in [INSERT_COMMON, INSERT_PER_CPU, INSERT_KEY16] {
        run_on(lab.prog(p.0)?, &all, CONNTRACK).with_context(|| p.0)?;
    }
    let mut f: Vec<Vec<f64>> = vec![Vec::new(); 7];
    for _ in 0..rounds {
        let runs: [(&str, &[usize]); 7] = [
            (INSERT_COMMON.0, &one),
            (INSERT_PER_CPU.0, &one),
            (INSERT_COMMON.0, &all),
            (INSERT_PER_CPU.0, &all),
            (INSERT_KEY16.0, &one),
            (HIT_KEY40, &one),
            (HIT_KEY16, &one),
        ];
        for (i, (prog, cpus)) in runs.into_iter().enumerate() {
            let t = run_on(lab.prog(prog)?, cpus, repeat).with_context(|| prog.to_string())?;
            f[i].push(t);
        }
        for p in [INSERT_COMMON, INSERT_PER_CPU, INSERT_KEY16] {
            for &c in &all {
                lab.check_insert(p, c as u32)?;
            }
        }
    }
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
    let n = all.len();
    let fig = |key: &str, label: String, unit: &str, samples: Vec<f64>| {
        Figure::new(SECTION, &format!("ct_maps.{key}"), &label, unit, samples)
    };
    let figs = vec![
        fig(
            "insert_common_1cpu.ns",
            "insert, one common LRU list (conntrack today), 1 CPU".into(),
            "ns",
            f[0].clone(),
        ),
        fig(
            "insert_per_cpu_1cpu.ns",
            "insert, an LRU list per CPU (BPF_F_NO_COMMON_LRU), 1 CPU".into(),
            "ns",
            f[1].clone(),
        ),
        fig(
            "per_cpu_vs_common_1cpu.ratio",
            "  per-CPU lists / common list, 1 CPU".into(),
            "x",
            ratio(&f[1], &f[0]),
        ),
        fig(
            "insert_common_all_cpus.ns",
            format!("insert, one common LRU list, {n} CPUs at once (mean)"),
            "ns",
            f[2].clone(),
        ),
        fig(
            "insert_per_cpu_all_cpus.ns",
            format!("insert, an LRU list per CPU, {n} CPUs at once (mean)"),
            "ns",
            f[3].clone(),
        ),
        fig(
            "per_cpu_vs_common_all_cpus.ratio",
            format!("  per-CPU lists / common list, {n} CPUs"),
            "x",
            ratio(&f[3], &f[2]),
        ),
        fig(
            "insert_key16.ns",
            "insert, IPv4 table (16-byte key, 40-byte value), 1 CPU".into(),
            "ns",
            f[4].clone(),
        ),
        fig(
            "key16_vs_key40_insert.ratio",
            "  16-byte / 40-byte key, insert".into(),
            "x",
            ratio(&f[4], &f[0]),
        ),
        fig(
            "hit_key40.ns",
            format!("hit, 40-byte key ({HIT_KEYS} flows in turn)"),
            "ns",
            f[5].clone(),
        ),
        fig(
            "hit_key16.ns",
            format!("hit, 16-byte key ({HIT_KEYS} flows in turn)"),
            "ns",
            f[6].clone(),
        ),
        fig(
            "key16_vs_key40_hit.ratio",
            "  16-byte / 40-byte key, hit".into(),
            "x",
            ratio(&f[6], &f[5]),
        ),
    ];
    let notes = vec![format!(
        "Conntrack map shapes: {rounds} rounds of {repeat} iterations per figure, interleaved; \
         every insert table was filled by {} inserts on each CPU first, so each measured insert evicts; \
         with per-CPU lists a CPU evicts from its own list only (a run on 1 CPU uses its share \
         of the table); the hit tables hold {CONNTRACK} entries and the hits cycle through \
         {HIT_KEYS} of them; the last insert of every CPU was checked in its table each round \
         ({} inserts in all); {:.0} s",
        CONNTRACK,
        lab.count(INSERT_COMMON.1)? + lab.count(INSERT_PER_CPU.1)? + lab.count(INSERT_KEY16.1)?,
        t0.elapsed().as_secs_f64()
    )];
    Ok((figs, notes))
}
