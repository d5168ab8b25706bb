//! Builds the datapath (lb-ebpf) for the BPF target and leaves the object in
//! OUT_DIR, where `include_bytes_aligned!` embeds it into the agent.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
