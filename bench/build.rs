//! Builds lb-ebpf's BPF objects; the harness embeds `bench` (the per-packet
//! wrapper, the floor, the live-frames generator and the no-NAT forwarder).
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
