//! lb-ebpf's BPF objects, built once by this crate's build script (aya-build)
//! and embedded here for the crates that load them. A binary carries only the
//! objects it refers to (unreferenced statics are dropped at link time).
#![no_std]

/// The datapath (`lb_xdp`, `lb_tc`), for the agent.
pub static LB: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The test kit (XDP pass and sink programs), for the testbed.
pub static TESTKIT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/testkit"));

/// The benchmark programs (floor, frame-restoring wrapper, live-frames
/// generator, no-NAT forwarder), for the harness.
pub static BENCH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));
