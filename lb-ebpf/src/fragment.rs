//! Fragmented datagrams. Only a datagram's first fragment carries its L4
//! header, so only it can be balanced and found in conntrack; the later
//! fragments carry an IP header and data. The first fragment is translated
//! as any datagram (conntrack, or a new flow), and how it was is recorded
//! here under the identity every fragment of the datagram shares: source,
//! destination, protocol and IP identification (IPv4's 16-bit field, IPv6's
//! 32-bit Fragment header one). A later fragment found here gets the same
//! addresses and is routed with the same tuple, so that all of them reach
//! the same backend (or client), which reassembles them. Both directions
//! work alike: requests to frontends and replies from backends.
//!
//! A later fragment not found (it overtook its first fragment, the first
//! went through another node, or the datagram is none of lb's business) is
//! passed to the kernel untranslated (`pass_fragment`). The datapath does not
//! reassemble, and keeps nothing of the fragments themselves.

// Keys and values are passed by reference on purpose: by value, a
// scratch-held key would be copied to the stack first (a `memcpy` on BPF).
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{bindings::BPF_ANY, helpers::generated::bpf_ktime_get_coarse_ns};
use lb_common::{FRAG_TIMEOUT_NS, FragKey};

use crate::{
    maps::FRAGMENTS,
    mem,
    scratch::{Headers, Scratch},
};

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The `fragments` key of the fragment `h` (field by field: a struct literal
/// would become a byte-wise `memcpy` on BPF).
#[inline(always)]
fn key_of(h: &Headers, key: &mut FragKey) {
    mem::copy_addr(&mut key.src, &h.key.src);
    mem::copy_addr(&mut key.dst, &h.key.dst);
    key.id = h.frag_id;
    key.proto = h.key.proto;
    key.family = h.key.family;
    key._pad = [0; 2];
}

/// Records the translation in `s.entry` of the first fragment `s.h` (before
/// it is rewritten: the key is the datagram as it arrived), for its later
/// fragments. A first fragment of the same identity replaces an older entry.
/// Fails only if the map update does; the first fragment goes on all the
/// same (its later fragments are then passed untranslated).
#[inline(always)]
pub fn record(s: &mut Scratch) -> bool {
    key_of(&s.h, &mut s.frag_key);
    let (e, ct) = (&mut s.frag, &s.entry);
    mem::copy_addr(&mut e.nat_src, &ct.nat_src);
    mem::copy_addr(&mut e.nat_dst, &ct.nat_dst);
    e.nat_src_port = ct.nat_src_port;
    e.nat_dst_port = ct.nat_dst_port;
    e.backend = ct.backend;
    e.service = ct.service;
    e.ingress = ct.ingress;
    e.first_ns = now();
    FRAGMENTS
        .insert(&s.frag_key, &s.frag, u64::from(BPF_ANY))
        .is_ok()
}

/// Finds how the first fragment of the later fragment `s.h` was translated,
/// and leaves it in `s.entry` as a conntrack entry would be (the tuple the
/// first fragment left with, its backend and service). An entry older than
/// the reassembly timeout is of an earlier datagram whose identification was
/// reused: not this one's.
#[inline(always)]
pub fn lookup(s: &mut Scratch) -> bool {
    key_of(&s.h, &mut s.frag_key);
    let Some(e) = FRAGMENTS.get_ptr(&s.frag_key) else {
        return false;
    };
    // SAFETY: an LRU value, valid memory for this program run; plain fields.
    let e = unsafe { &*e };
    if now().wrapping_sub(e.first_ns) > FRAG_TIMEOUT_NS {
        return false;
    }
    let ct = &mut s.entry;
    mem::copy_addr(&mut ct.nat_src, &e.nat_src);
    mem::copy_addr(&mut ct.nat_dst, &e.nat_dst);
    ct.nat_src_port = e.nat_src_port;
    ct.nat_dst_port = e.nat_dst_port;
    ct.backend = e.backend;
    ct.service = e.service;
    ct.flags = 0;
    ct._pad = 0;
    ct.last_seen_ns = 0;
    ct.ingress = e.ingress;
    true
}
