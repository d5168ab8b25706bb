//! lb-agent: turns cluster state into BPF map state on one node.
//!
//! - [`bpf`]: loading, pinning and attaching the datapath, and typed access to its maps.
//! - [`maglev`]: Maglev lookup tables.
pub mod bpf;
pub mod maglev;
