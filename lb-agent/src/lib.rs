//! lb-agent: turns cluster state into BPF map state on one node.
//!
//! - [`cluster`]: the vocabulary shared by sources, model and reconciler.
//! - [`model`]: the desired state, computed by pure functions.
//! - [`bpf`]: loading, pinning and attaching the datapath, and typed access to its maps.
//! - [`maglev`]: Maglev lookup tables.
pub mod agent;
pub mod bpf;
pub mod cluster;
pub mod dump;
pub mod health;
pub mod interfaces;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod source;
pub mod store;
pub mod sync;
