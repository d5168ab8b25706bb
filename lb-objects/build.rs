//! Builds lb-ebpf's BPF objects (the `lb` datapath, the `testkit` and `bench`
//! programs) for the BPF target, once for the whole workspace, and leaves them
//! in OUT_DIR, where `include_bytes_aligned!` embeds them.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
