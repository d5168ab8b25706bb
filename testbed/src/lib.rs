//! A small, faithful cluster out of network namespaces, for lb's tests and
//! demo: a bridge as the shared segment, two nodes routing pod CIDRs to
//! each other as a CNI would, two pods per node wired Calico/Cilium style,
//! and an external client that routes LoadBalancer and externalIP prefixes
//! via node-a. Plus in-process pod servers, clients that use real kernel
//! sockets inside a namespace, and control of the lb agents.
//!
//! Needs root. Every namespace and interface name carries a per-run id;
//! everything is removed when the [`Cluster`] is dropped, on SIGINT /
//! SIGTERM, and when [`Cluster::up`] fails; leftovers of crashed runs are
//! removed at the next [`Cluster::up`].
//!
//! ```no_run
//! use std::time::Duration;
//! use lb_testbed::{Cluster, Options, tcp_request};
//!
//! let c = Cluster::up(Options::default())?;
//! c.start_pod_servers(&[8080])?;
//! let b0 = c.pod("pod-b0");
//! let name = tcp_request(c.pod("pod-a0").ns(), b0.sock(false, 8080), b"hi", Duration::from_secs(2))?;
//! assert_eq!(name, "pod-b0");
//! # anyhow::Ok(())
//! ```

pub mod agent;
mod client;
mod cluster;
pub mod control_plane;
pub mod fib;
pub mod flood;
pub mod interrupt;
pub mod kube_cluster;
pub mod layout_v1;
pub mod manifests;
pub mod net;
mod ns;
pub mod packet;
pub mod relay;
pub mod scope;
pub mod servers;
pub mod test_run;
pub mod xdp;

pub use client::{
    Hello, ProbeError, StreamReport, UdpFlow, curl_in, http_get, socat_udp_in, tcp_echo, tcp_hello,
    tcp_probe, tcp_probe_traced, tcp_request, tcp_stream, udp_probe, udp_request,
};
pub use cluster::{
    AGENT_HEALTHZ, AgentProbe, Client, Cluster, Container, InCluster, Node, Options, Pod,
    PodNetwork, SERVICE_ACCOUNT_DIR, Uplinks,
};
pub use control_plane::ControlPlane;
pub use net::IpNet;
pub use ns::{
    NETNS_DIR, Output, command_in, delete_netns, ifindex, in_netns, ip, kill, netns_path,
    output_with_input, output_with_timeout, pid_alive, run, sysctl_in, try_in_netns,
};
pub use scope::{Scope, cleanup_stale};
pub use servers::{Servers, serve_in};

// A cluster can be shared between threads (e.g. in an `Arc`).
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cluster>();
    send_sync::<Servers>();
};
