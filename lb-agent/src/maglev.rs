//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of
//! prime size M in which each backend owns close to M/N entries, and which
//! changes little when a backend comes or goes.
//!
//! Every node builds the same table from the same backends, because the
//! permutations depend only on each backend's address and port (hashed with
//! [`lb_common::hash::hash_bytes`], stable across builds) and the backends are
//! placed in sorted order. The datapath picks entry `flow_hash % M`.

use std::net::SocketAddr;

use anyhow::{Result, bail};
use lb_common::hash::hash_bytes;

const OFFSET_SEED: u32 = 0x6d61_676c; // "magl"
const SKIP_SEED: u32 = 0x6576_2121; // "ev!!"

/// Whether `n` is prime (table sizes are checked once, so trial division is fine).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks a table size: prime, and large enough to be worth hashing into.
pub fn check_table_size(table_size: u32) -> Result<()> {
    if table_size < 7 || !is_prime(table_size) {
        bail!("the Maglev table size must be a prime of at least 7, not {table_size}");
    }
    Ok(())
}

/// The table sizes, by the most backends each is used for: (most backends,
/// entries). A fixed list, so that every node gives a Service port the same
/// size from the same backends, and so the same table.
///
/// Measured (the median of 8 removals, each of another backend): with a
/// table of M entries over N backends, removing one moves 1/N of the
/// entries plus an excess that grows with N / M up to a few hundred
/// backends (at 4,093 entries: 0.78 % for 7 backends, 0.99 % for 9; at
/// 8,191: 0.80 % for 9, 0.91 % for 12; at 16,381: 0.79 % for 25, 0.95 % for
/// 40; at 32,749: 0.76 % for 80, 0.84 % for 128; at 65,521: 0.87 % for 300,
/// 0.58 % for 1,000, 0.15 % for 5,000). Each size is the smallest prime just
/// under a power of two that keeps the excess near 0.8 % or below for every
/// N it covers (the excess varies with the backends' addresses: 1 % would be
/// crossed by some sets), with 10 entries or more per backend (each
/// backend's share within 10 % of the others'). A single backend needs one
/// entry: every flow is its, and a second backend takes exactly its share
/// whatever the size.
///
/// The price: a port whose backend count crosses a class boundary gets a
/// table of the next size, built anew, which moves most new flows' choice
/// (established flows keep their backend through conntrack). Every node
/// moves alike, so only a flow that changes nodes at that moment is affected.
pub const SIZE_CLASSES: [(u32, u32); 10] = [
    (1, 1),
    (7, 4_093),
    (10, 8_191),
    (30, 16_381),
    (100, 32_749),
    (6_552, 65_521),
    (13_107, 131_071),
    (26_213, 262_139),
    (52_428, 524_287),
    (u32::MAX, 1_048_573),
];

/// The table size of a Service port with `backends` backends (the larger of
/// its two tables' counts, see `reconcile::tables`); 0 for none.
pub fn table_size_for(backends: usize) -> u32 {
    if backends == 0 {
        return 0;
    }
    let n = u32::try_from(backends).unwrap_or(u32::MAX);
    SIZE_CLASSES
        .iter()
        .find(|(most, _)| n <= *most)
        .map_or(SIZE_CLASSES[SIZE_CLASSES.len() - 1].1, |(_, size)| *size)
}

fn identity(addr: &SocketAddr) -> Vec<u8> {
    let mut bytes = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    bytes
}

/// Builds a table of `table_size` entries over `backends` (address, value to
/// store). The result holds the stored value of the owning backend in each
/// entry; it is empty when there are no backends.
pub fn build(backends: &[(SocketAddr, u32)], table_size: u32) -> Vec<u32> {
    match backends {
        [] => return Vec::new(),
        // Every entry is the one backend's (and a table of one entry has no
        // permutation to walk).
        [(_, only)] => return vec![*only; table_size as usize],
        _ => {}
    }
    let mut sorted: Vec<&(SocketAddr, u32)> = backends.iter().collect();
    sorted.sort_by_key(|(addr, _)| (addr.ip(), addr.port()));
    // The paper's M.
    let m = table_size as usize;
    // Permutation of backend i: offset_i + j * skip_i (mod m), j = 0, 1, ...,
    // walked by adding skip_i and wrapping once, not by a division per step
    // (at 10,000 Services the builds were a tenth of the sync's CPU time).
    let mut perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|(addr, _)| {
            let id = identity(addr);
            let offset = hash_bytes(OFFSET_SEED, &id) as usize % m;
            let skip = hash_bytes(SKIP_SEED, &id) as usize % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    // Which entries are taken, a bit each: the walks probe this (M / 8
    // bytes, in L1 for every size up to 262,139) about M ln M times, and
    // the table itself only M times.
    let mut taken = vec![0u64; m.div_ceil(64)];
    let mut table = vec![0u32; m];
    let mut filled = 0;
    'fill: loop {
        for ((next, skip), (_, value)) in perms.iter_mut().zip(&sorted) {
            // The backend takes its next preferred entry that is still free.
            while taken[*next / 64] & (1 << (*next % 64)) != 0 {
                *next += *skip;
                if *next >= m {
                    *next -= m;
                }
            }
            taken[*next / 64] |= 1 << (*next % 64);
            table[*next] = *value;
            *next += *skip;
            if *next >= m {
                *next -= m;
            }
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn backends(n: u32) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("10.244.{}.{}:8080", i / 200, i % 200 + 2)
                    .parse()
                    .unwrap();
                (addr, i)
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for v in table {
            *counts.entry(*v).or_default() += 1;
        }
        counts
    }

    /// The paper's construction, written plainly: every node (and every agent
    /// version) must build the same table from the same backends, or flows
    /// would change backend with the node that receives them.
    fn reference(backends: &[(SocketAddr, u32)], m: u32) -> Vec<u32> {
        let mut sorted: Vec<&(SocketAddr, u32)> = backends.iter().collect();
        sorted.sort_by_key(|(addr, _)| (addr.ip(), addr.port()));
        let m = u64::from(m);
        let perms: Vec<(u64, u64)> = sorted
            .iter()
            .map(|(addr, _)| {
                let id = identity(addr);
                let offset = u64::from(hash_bytes(OFFSET_SEED, &id)) % m;
                let skip = u64::from(hash_bytes(SKIP_SEED, &id)) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; sorted.len()];
        let mut owner: Vec<Option<usize>> = vec![None; m as usize];
        let mut filled = 0;
        while filled < m {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = ((offset + next[i] * skip) % m) as usize;
                while owner[c].is_some() {
                    next[i] += 1;
                    c = ((offset + next[i] * skip) % m) as usize;
                }
                owner[c] = Some(i);
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break;
                }
            }
        }
        owner.into_iter().map(|o| sorted[o.unwrap()].1).collect()
    }

    #[test]
    fn same_table_as_the_reference_construction() {
        for (n, m) in [(1, 7), (3, 13), (10, 1021), (100, 16_381), (1000, 16_381)] {
            assert_eq!(
                build(&backends(n), m),
                reference(&backends(n), m),
                "{n} backends, size {m}"
            );
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381));
        assert!(is_prime(251));
        assert!(!is_prime(16_383));
        assert!(!is_prime(1));
        assert!(check_table_size(65_537).is_ok());
        assert!(check_table_size(1000).is_err());
    }

    #[test]
    fn every_backend_gets_its_share_within_a_few_percent() {
        for n in [1, 3, 10, 100] {
            let table = build(&backends(n), 16_381);
            assert_eq!(table.len(), 16_381);
            let counts = shares(&table);
            assert_eq!(counts.len(), n as usize, "every backend owns entries");
            let fair = 16_381.0 / f64::from(n);
            for (b, c) in counts {
                let off = (c as f64 - fair).abs() / fair;
                assert!(
                    off < 0.03,
                    "{n} backends: backend {b} has {c}, fair {fair:.0}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        const M: u32 = 16_381;
        for n in [5u32, 10, 50] {
            let before = build(&backends(n), M);
            let mut fewer = backends(n);
            let gone = fewer.remove(n as usize / 2).1;
            let remaining: std::collections::HashSet<u32> = fewer.iter().map(|b| b.1).collect();
            let after = build(&fewer, M);
            let owned_by_gone = before.iter().filter(|v| **v == gone).count();
            assert!(
                owned_by_gone > 0,
                "{n} backends: backend {gone} owned nothing"
            );
            // Every entry of the removed backend now belongs to one that remains:
            // none is left pointing at it.
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if *b == gone {
                    assert!(
                        remaining.contains(a),
                        "{n} backends: entry {i} of removed backend {gone} went to {a}"
                    );
                }
            }
            // Every entry that moved is either one of the removed backend's (above)
            // or collateral disruption, which must stay below 1% of the table
            // (19, 109 and 150 entries of 16,381 for 5, 10 and 50 backends today).
            let moved_others = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != gone && b != a)
                .count();
            assert!(
                moved_others * 100 < M as usize,
                "{n} backends: {moved_others} entries of remaining backends moved \
                 (1% of {M} allowed)"
            );
            let moved =
                before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / f64::from(M);
            assert!(
                moved <= 1.0 / f64::from(n) + 0.01,
                "{n} backends: {:.2}% moved",
                moved * 100.0
            );
        }
    }

    /// Every size is prime (or 1), grows with the backends, and keeps the
    /// flows moved by one removal within 1/N + 1 % (the median of eight
    /// removals) at both ends of every class up to 5,000 backends.
    #[test]
    fn each_backend_count_gets_a_size_that_keeps_disruption_low() {
        let mut last = 0;
        for (most, size) in SIZE_CLASSES {
            assert!(size == 1 || is_prime(size), "{size}");
            assert!(size > last, "sizes grow");
            assert!(u64::from(size) >= 10 * u64::from(most).min(100_000) || most == 1);
            last = size;
        }
        assert_eq!(table_size_for(0), 0);
        assert_eq!(table_size_for(1), 1);
        assert_eq!(table_size_for(10), 8_191);
        assert_eq!(table_size_for(5_000), 65_521);
        for n in [3u32, 7, 9, 10, 12, 30, 32, 100, 102, 300, 1000, 5000] {
            let m = table_size_for(n as usize);
            assert_eq!(
                m,
                table_size_for(n as usize - 1),
                "{n}: not a class's first"
            );
            let all = backends(n);
            let before = build(&all, m);
            let mut moved: Vec<f64> = [0, n / 5, n / 4, n / 3, n / 2, 2 * n / 3, 4 * n / 5, n - 1]
                .into_iter()
                .map(|k| {
                    let mut fewer = all.clone();
                    fewer.remove(k as usize);
                    let after = build(&fewer, m);
                    let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                    changed as f64 / f64::from(m)
                })
                .collect();
            moved.sort_by(f64::total_cmp);
            let median = (moved[3] + moved[4]) / 2.0;
            assert!(
                median <= 1.0 / f64::from(n) + 0.01,
                "{n} backends at {m}: {:.2}% moved",
                median * 100.0
            );
        }
        // A single backend owns every entry of a table of any size.
        assert_eq!(build(&backends(1), 1), vec![0]);
        assert_eq!(build(&backends(1), 7), vec![0; 7]);
    }

    /// The backend set of the golden tables: 3 IPv4 and 2 IPv6 backends with
    /// fixed ids (given out of order: `build` sorts them).
    fn golden_backends() -> Vec<(SocketAddr, u32)> {
        [
            ("[fd00:1::3]:8443", 55),
            ("10.244.1.3:8080", 22),
            ("10.244.0.2:8080", 11),
            ("[fd00::2]:8080", 44),
            ("10.244.2.4:9090", 33),
        ]
        .iter()
        .map(|(addr, id)| (addr.parse().unwrap(), *id))
        .collect()
    }

    /// Golden Maglev table: every node builds its tables independently, and the
    /// datapath of whichever node receives a flow picks entry `flow_hash % M`, so
    /// the table for a given backend set is a wire contract between nodes (and
    /// between agent versions during a rolling upgrade): all nodes must choose
    /// the same backend for a flow. A change of the construction, the seeds or
    /// `identity` must be deliberate, come with a note (mixed-version clusters
    /// move flows), and these literals be updated knowingly, never to make the
    /// test pass.
    #[test]
    fn golden_table_of_13_entries() {
        assert_eq!(
            build(&golden_backends(), 13),
            [33, 11, 22, 33, 11, 44, 55, 22, 33, 55, 44, 11, 22]
        );
    }

    /// Golden digest of a 251-entry table over the same backends: the entries each
    /// backend owns, the first 20 entries, and the sum of entry x index (which
    /// any move of an entry between backends changes). A wire contract between
    /// nodes like the 13-entry table above: a change must be deliberate, come
    /// with a note, and these literals be updated knowingly.
    #[test]
    fn golden_digest_of_251_entries() {
        let table = build(&golden_backends(), 251);
        assert_eq!(table.len(), 251);
        let mut counts: Vec<(u32, usize)> = shares(&table).into_iter().collect();
        counts.sort_unstable();
        assert_eq!(counts, [(11, 51), (22, 50), (33, 50), (44, 50), (55, 50)]);
        assert_eq!(
            table[..20],
            [
                22, 22, 11, 11, 11, 11, 33, 44, 22, 33, 44, 22, 55, 44, 55, 33, 44, 44, 33, 11
            ]
        );
        let weighted: u64 = table
            .iter()
            .enumerate()
            .map(|(i, v)| i as u64 * u64::from(*v))
            .sum();
        assert_eq!(weighted, 1_033_296);
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut b = backends(7);
        let t1 = build(&b, 251);
        b.reverse();
        assert_eq!(build(&b, 251), t1);
    }

    #[test]
    fn no_backends_no_table() {
        assert!(build(&[], 251).is_empty());
    }
}
