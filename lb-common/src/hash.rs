//! The flow hash that picks a Maglev entry.
//!
//! It lives here, not in the datapath alone, so that tests (and `lb-agent dump`) can
//! tell which backend a given 5-tuple lands on. Every node computes the same hash
//! for the same client tuple, so with identical Maglev tables every node picks the
//! same backend for a flow, whichever node the network delivers it to.

use crate::FlowKey;

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    // One round of murmur3's block mixing.
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    // murmur3's fmix32: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Hash of a flow's 5-tuple (client to frontend, as the client sent it).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.dst, 0));
    // IPv4 keys have zeros here; skipping the words keeps the IPv4 path short.
    if key.family != crate::FAMILY_V4 {
        h = mix(h, word(&key.src, 4));
        h = mix(h, word(&key.src, 8));
        h = mix(h, word(&key.src, 12));
        h = mix(h, word(&key.dst, 4));
        h = mix(h, word(&key.dst, 8));
        h = mix(h, word(&key.dst, 12));
    }
    h = mix(h, ((key.src_port as u32) << 16) | key.dst_port as u32);
    h = mix(h, key.proto as u32);
    finish(h)
}

/// Hash of a socket's cookie: which Maglev entry a node-local client's
/// socket takes (socket-level balancing has no 5-tuple yet when it chooses:
/// the source port may be unbound). The same socket keeps its choice.
#[inline(always)]
pub const fn socket_hash(cookie: u64) -> u32 {
    finish(mix(mix(SEED, cookie as u32), (cookie >> 32) as u32))
}

/// Words (u64) of the `addr_filter` bitmap (a power of two).
pub const ADDR_FILTER_WORDS: u32 = 4096;
/// The roles an entry of `addr_filter` stands for:
/// - a frontend (address, port, protocol), checked against a packet's destination;
/// - a backend (address, port), checked against a packet's source (replies);
/// - a ClusterIP address (any port), checked against a packet's destination.
pub const FILTER_FRONTEND: u32 = 0x0f0f_5a5a;
pub const FILTER_BACKEND: u32 = 0x3c3c_a5a5;
pub const FILTER_CLUSTER_IP: u32 = 0x6969_9696;

/// The bit of `addr_filter` standing for an address, port and protocol (0 where
/// the role ignores them) in a role. A clear bit proves there is no such entry,
/// so the datapath skips its hash lookups for traffic that is none of its
/// business, including other traffic to the node's own addresses.
#[inline(always)]
pub const fn addr_filter_bit(addr: &[u8; 16], family: u8, port: u16, proto: u8, role: u32) -> u32 {
    // One multiplicative (Fibonacci) hash of a 64-bit fold: a filter needs a
    // spread, not strength, and this costs one multiply per check.
    let mut x = word(addr, 0) as u64;
    if family != crate::FAMILY_V4 {
        x ^= (word(addr, 4) as u64).rotate_left(13)
            ^ (word(addr, 8) as u64).rotate_left(29)
            ^ (word(addr, 12) as u64).rotate_left(43);
    }
    x ^= (((port as u32) << 8 | proto as u32) as u64) << 32;
    x ^= (role as u64).rotate_left(17);
    const BITS: u32 = (ADDR_FILTER_WORDS * 64).trailing_zeros();
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BITS)) as u32
}

/// The `attempt`-th source-NAT port offset (in `0..span`) to try for a new flow
/// with flow hash `flow`. Every attempt is an independent hash of the flow, so
/// a flow's tries spread over the whole range whatever its size: a claim fails
/// only when every tried port is held (`share^tries` with `share` of the range
/// in use). A fixed stride would not do: with a range like 61000-65535 (4,536
/// ports, many divisors) 1 flow in 200 would cycle through 8 ports or fewer.
/// The same flow gets the same sequence, so a flow whose entries were evicted
/// gets its old port back.
#[inline(always)]
pub const fn snat_probe(flow: u32, attempt: u32, span: u32) -> u32 {
    if span == 0 {
        return 0;
    }
    finish(flow ^ attempt.wrapping_mul(SEED)) % span
}

/// Hash of a byte string with a seed (murmur3-style, little-endian words). Used
/// for Maglev permutations: it must give the same value on every node and every
/// build, which `std`'s hashers do not promise.
pub fn hash_bytes(seed: u32, bytes: &[u8]) -> u32 {
    let mut h = seed;
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let mut tail = [0u8; 4];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = mix(
        h,
        u32::from_le_bytes(tail) ^ (bytes.len() as u32).rotate_left(24),
    );
    finish(h)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// Fills ten backends' source-NAT ranges (the default 4,536 ports each) to
    /// 70% with claims of 32 tries, as the datapath does: none may fail.
    #[test]
    fn snat_probes_find_a_free_port_in_a_range_filled_to_70_percent() {
        const SPAN: u32 = 4_536;
        const TRIES: u32 = 32;
        let mut held = std::vec![[false; SPAN as usize]; 10];
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut failed = 0;
        for _ in 0..(SPAN * 10 * 7 / 10) {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let flow = (rng >> 32) as u32;
            let backend = &mut held[(rng >> 16) as usize % 10];
            match (0..TRIES)
                .map(|i| snat_probe(flow, i, SPAN) as usize)
                .find(|p| !backend[*p])
            {
                Some(p) => backend[p] = true,
                None => failed += 1,
            }
        }
        assert_eq!(failed, 0, "claims that found no free port");
        assert_eq!(snat_probe(7, 3, 1), 0);
        assert_eq!(snat_probe(7, 3, 0), 0);
    }

    /// A flow's probe sequence is its own and fixed: the same flow gets the same
    /// ports in the same order (so a flow whose entries were evicted gets its old
    /// port back, also after an agent upgrade reloads the datapath), and a
    /// neighbouring flow (hash one apart) gets a different sequence. The
    /// literals were computed once from the current `snat_probe`; a change of it
    /// must be deliberate and come with updated literals.
    #[test]
    fn snat_probe_sequence_of_a_flow_is_fixed() {
        const SPAN: u32 = 4_536;
        let seq = |flow: u32| -> std::vec::Vec<u32> {
            (0..6).map(|a| snat_probe(flow, a, SPAN)).collect()
        };
        assert_eq!(seq(0xdead_beef), [2937, 3195, 3627, 314, 1103, 946]);
        assert_eq!(seq(0xdead_bef0), [251, 2762, 4324, 4154, 2305, 91]);
        // Not one port in common among the first attempts, let alone the order.
        let (a, b) = (seq(0xdead_beef), seq(0xdead_bef0));
        assert!(a.iter().all(|p| !b.contains(p)), "{a:?} and {b:?} overlap");
    }

    /// Golden values of [`hash_bytes`]: the Maglev permutations of every node are
    /// built from it, so these are a wire contract between nodes (and between
    /// agent versions during a rolling upgrade): all nodes must choose the same
    /// backend for a flow. A change must be deliberate, come with a note
    /// (mixed-version clusters move flows), and these literals be updated
    /// knowingly, never to make the test pass.
    #[test]
    fn hash_bytes_golden_values() {
        // The seeds lb-agent's maglev.rs uses for offsets ("magl") and skips ("ev!!").
        const OFFSET_SEED: u32 = 0x6d61_676c;
        const SKIP_SEED: u32 = 0x6576_2121;
        // An IPv4 and an IPv6 backend as maglev.rs's `identity` feeds them:
        // address octets, then the port big-endian (10.244.0.2:8080, [fd00::2]:8080).
        const V4: &[u8] = &[10, 244, 0, 2, 0x1f, 0x90];
        const V6: &[u8] = &[
            0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x1f, 0x90,
        ];
        let cases: [(&[u8], u32, u32); 8] = [
            // (input, with OFFSET_SEED, with SKIP_SEED)
            (&[], 0x9910_7609, 0x21f8_c566),
            (&[1], 0xf91e_71dc, 0xc32f_a592),
            (&[1, 2], 0x5524_fa5d, 0x2bc3_4677),
            (&[1, 2, 3], 0x8c9e_f873, 0xe11c_cbf9),
            (&[1, 2, 3, 4], 0x96e1_8264, 0xea93_98dd),
            (&[1, 2, 3, 4, 5, 6, 7], 0xae9d_b571, 0x696f_3404),
            (V4, 0x8667_c1a4, 0xd01c_4a35),
            (V6, 0x5bcd_d2d9, 0xdee4_7c2a),
        ];
        for (input, offset, skip) in cases {
            assert_eq!(
                hash_bytes(OFFSET_SEED, input),
                offset,
                "hash_bytes(OFFSET_SEED, {input:?})"
            );
            assert_eq!(
                hash_bytes(SKIP_SEED, input),
                skip,
                "hash_bytes(SKIP_SEED, {input:?})"
            );
        }
    }

    /// Golden values of [`flow_hash`]: the datapath of every node picks the Maglev
    /// entry `flow_hash % M`, so these are a wire contract between nodes (and
    /// between agent versions during a rolling upgrade): all nodes must choose
    /// the same backend for a flow. A change must be deliberate, come with a note
    /// (mixed-version clusters move flows), and these literals be updated
    /// knowingly, never to make the test pass.
    #[test]
    fn flow_hash_golden_values() {
        use crate::{FAMILY_V6, PROTO_UDP};
        // 192.0.2.7:40000 -> 10.96.0.10:80, TCP.
        let mut v4_tcp = FlowKey {
            src_port: 40_000,
            dst_port: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        v4_tcp.src[..4].copy_from_slice(&[192, 0, 2, 7]);
        v4_tcp.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        // 192.0.2.7:40000 -> 10.96.0.10:53, UDP.
        let v4_udp = FlowKey {
            dst_port: 53,
            proto: PROTO_UDP,
            ..v4_tcp
        };
        // [2001:db8::7]:40000 -> [fd00::a]:443, TCP.
        let v6_tcp = FlowKey {
            src: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            dst: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a],
            src_port: 40_000,
            dst_port: 443,
            proto: PROTO_TCP,
            family: FAMILY_V6,
            ..FlowKey::default()
        };
        assert_eq!(flow_hash(&v4_tcp), 0x3d22_c888, "IPv4 TCP");
        assert_eq!(flow_hash(&v4_udp), 0x127b_69c8, "IPv4 UDP");
        assert_eq!(flow_hash(&v6_tcp), 0xee37_aaab, "IPv6 TCP");
    }

    #[test]
    fn filter_bits_spread_and_depend_on_every_input() {
        // 5,000 frontends (consecutive addresses, a few ports): few collisions.
        let mut seen = std::collections::HashSet::new();
        let mut a = [0u8; 16];
        for i in 0..5_000u32 {
            a[..4].copy_from_slice(&(0x0a60_0000u32 + i).to_be_bytes());
            seen.insert(addr_filter_bit(
                &a,
                crate::FAMILY_V4,
                80 + (i % 4) as u16,
                6,
                FILTER_FRONTEND,
            ));
        }
        assert!(seen.len() > 4_900, "{} distinct bits of 5000", seen.len());
        let base = addr_filter_bit(&a, crate::FAMILY_V4, 80, 6, FILTER_FRONTEND);
        assert_ne!(
            addr_filter_bit(&a, crate::FAMILY_V4, 81, 6, FILTER_FRONTEND),
            base
        );
        assert_ne!(
            addr_filter_bit(&a, crate::FAMILY_V4, 80, 17, FILTER_FRONTEND),
            base
        );
        assert_ne!(
            addr_filter_bit(&a, crate::FAMILY_V4, 80, 6, FILTER_BACKEND),
            base
        );
        let mut v6 = a;
        v6[15] = 1;
        assert_ne!(
            addr_filter_bit(&v6, crate::FAMILY_V6, 80, 6, FILTER_FRONTEND),
            base
        );
    }
    use crate::{FAMILY_V4, PROTO_TCP};

    fn key(src_port: u16) -> FlowKey {
        let mut k = FlowKey {
            src_port,
            dst_port: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        k
    }

    #[test]
    fn source_ports_spread_over_buckets() {
        // 64k consecutive source ports into 16 buckets: each within 5% of its share.
        let mut buckets = [0u32; 16];
        for p in 0..=u16::MAX {
            buckets[(flow_hash(&key(p)) % 16) as usize] += 1;
        }
        let share = 65_536 / 16;
        for (i, b) in buckets.iter().enumerate() {
            assert!(
                b.abs_diff(share) * 20 < share,
                "bucket {i} got {b}, share {share}"
            );
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow_hash(&key(1000));
        let mut k = key(1000);
        k.dst_port = 81;
        assert_ne!(flow_hash(&k), base);
        let mut k = key(1000);
        k.proto = 17;
        assert_ne!(flow_hash(&k), base);
        let mut k = key(1000);
        k.src[3] = 2;
        assert_ne!(flow_hash(&k), base);
    }
}
