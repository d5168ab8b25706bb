//! Builds lb-ebpf's BPF objects; the testbed embeds `testkit` (XDP pass and
//! sink programs for the topology and the benchmarks).
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
