//! lb-agent: turns cluster state into BPF map state on one node.
//!
//! The pipeline, one folder per stage in the order the state flows:
//!
//! - [`source`]: where cluster state comes from (the Kubernetes API, a
//!   manifest directory) as [`source::SourceEvent`]s, and the
//!   [`source::store`] holding what they reported.
//! - [`model`]: the desired state, computed by pure functions (no ids, no
//!   maps).
//! - [`reconcile`]: the desired state written into map entries, minimal diffs
//!   only: their encoding, ids, `addr_filter` bits, adoption of what an earlier
//!   agent left, Maglev rows.
//! - [`bpf`]: the datapath: loading, pinning and attaching it, its typed maps
//!   and their sizes.
//!
//! [`sync`] runs events through the pipeline (the one engine the agent, the
//! tests and the benchmark drive); [`agent`] is `lb-agent run` around it:
//! node facts, [`interfaces`] and [`netlink`] for the links, [`health`] and
//! [`metrics`], the [`conntrack`] janitor, which clears the UDP flows of
//! frontends a sync removed, and the [`repair`] schedule of the
//! verify-and-repair pass. Beside them: [`cluster`], the vocabulary shared by sources,
//! model and reconciler; [`maglev`], the tables; [`dump`], `lb-agent dump`.
pub mod agent;
pub mod bpf;
pub mod cluster;
pub mod conntrack;
pub mod dump;
pub mod ethtool;
pub mod health;
pub mod interfaces;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod repair;
pub mod service_health;
pub mod snat_ports;
pub mod source;
pub mod sync;
