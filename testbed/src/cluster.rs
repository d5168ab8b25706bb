//! The cluster: namespaces, links, addresses and routes; agents; teardown.
//!
//! ```text
//!                 client (192.168.77.100, fd00:77::100)
//!                    | lbXXXX-c-up
//!   lan namespace:  [ bridge lbXXXX-br ]
//!                    | lbXXXX-a-br            | lbXXXX-b-br
//!                    | lbXXXX-a-up            | lbXXXX-b-up
//!   node-a 192.168.77.10 fd00:77::10       node-b 192.168.77.11 fd00:77::11
//!     lbXXXX-a-p0   lbXXXX-a-p1              lbXXXX-b-p0   lbXXXX-b-p1
//!       | eth0        | eth0                   | eth0        | eth0
//!     pod-a0        pod-a1                   pod-b0        pod-b1
//!   10.244.1.10   10.244.1.11              10.244.2.10   10.244.2.11
//! ```
//!
//! Pods are wired the way Calico and Cilium do it: host-side veths without
//! a bridge, each carrying the node's pod gateway address (10.244.N.1/32,
//! fd00:244:N::1/128), a /32 and /128 route per pod on the node, and in the
//! pod a single /32 and /128 address with an on-link route to the gateway
//! and a default route via it. So every packet a pod sends, even to a pod on
//! the same node, enters the node through the host side of its veth, where
//! lb's tc program sees it before routing.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    agent::{AgentSpec, Confinement},
    client,
    net::{self, IpNet},
    ns::{self, ethtool_in, ip, lock},
    scope::{BPFFS, Scope, cleanup_stale, is_bpffs},
    servers::{Servers, serve_in},
};

/// The agent's default healthz address (inside its node's namespace).
pub const AGENT_HEALTHZ: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);
/// How long every topology wait (links up, addresses usable) may take.
const WAIT_LINKS: Duration = Duration::from_secs(5);

/// What [`Cluster::up`] builds.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pods on each node (1 to 50), named `pod-a0`, `pod-a1`, ...
    pub pods_per_node: usize,
    /// How long an agent may take to answer 200 on its healthz.
    pub agent_ready_timeout: Duration,
    /// Keep the per-run directory (agent logs) after teardown. It is also
    /// kept when the cluster is dropped during a panic (a failing test).
    pub keep_logs: bool,
    /// What the nodes' uplinks are like.
    pub uplinks: Uplinks,
    /// How pods reach pods on the other node.
    pub pod_network: PodNetwork,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pods_per_node: 2,
            agent_ready_timeout: Duration::from_secs(20),
            keep_logs: false,
            uplinks: Uplinks::Nic,
            pod_network: PodNetwork::Routed,
        }
    }
}

/// How the nodes' pod networks are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// Each node routes the other's pod CIDRs via the other node's address,
    /// as a routed CNI (Calico with BGP, kubenet's cloud routes) does.
    Routed,
    /// A VXLAN overlay as Flannel sets it up: `flannel.1` (VXLAN over IPv4,
    /// port 8472, MTU 1450: the uplinks' 1500 less VXLAN's 50) and
    /// `flannel-v6.1` (over IPv6, MTU 1430: less 70), routes to the other
    /// node's pod CIDRs through them via its VTEP with permanent neighbour and
    /// FDB entries, and pod interfaces at the smaller of the two MTUs. Replies to pods on the other node come back
    /// decapsulated on the tunnel device.
    Vxlan,
}

/// A node's VTEP MAC on its VXLAN devices (Flannel derives its own; any fixed
/// one serves).
fn vtep_mac(node_index: usize, v6: bool) -> String {
    format!("02:fa:00:00:{:02x}:{:02x}", node_index + 1, u8::from(v6))
}

/// VXLAN's overhead over an IPv4 and an IPv6 underlay (Flannel's MTUs are
/// the uplink's less these).
const VXLAN_OVERHEAD: [u32; 2] = [50, 70];

/// The two kinds of uplink lb meets: each node's uplink is a veth to the
/// switch (a bridge) either way; what differs is what its peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplinks {
    /// Switch ports that act as physical NICs: complete checksums on the
    /// wire (no tx checksum offload), and XDP transmit works (the switch side
    /// runs an XDP program). Agents started with [`Cluster::start_agents`]
    /// ask for XDP (`--uplink-hook xdp`).
    Nic,
    /// Plain veths, the way kind and docker wire their nodes: offloads at
    /// their defaults (partial checksums), no XDP on the switch side, so XDP
    /// transmits there are dropped. Agents keep the default `--uplink-hook
    /// auto`, which picks tc on a veth.
    Veth,
}

/// A pod: a namespace with `eth0`, the peer of a host-side veth on its node.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    node: String,
    ns: String,
    host_veth: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Pod {
    /// `pod-a0`: also what its servers answer with.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The node it runs on (`node-a`).
    pub fn node(&self) -> &str {
        &self.node
    }
    /// Its namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }
    /// The host side of its veth (in the node's namespace).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
    /// Its interface inside the pod.
    pub fn iface(&self) -> &str {
        "eth0"
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    /// Both addresses, IPv4 first.
    pub fn addrs(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
    /// `ipv4:port` or `[ipv6]:port`.
    pub fn sock(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.addrs()[usize::from(v6)], port)
    }
}

/// A node: a namespace with an uplink to the bridge and a host-side veth
/// per pod.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    ns: String,
    uplink: String,
    bridge_port: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    pod_cidr_v4: IpNet,
    pod_cidr_v6: IpNet,
    pod_iface_prefix: String,
    pin_path: PathBuf,
    pods: Vec<Pod>,
}

/// The zone of the node named `node_name` (`node-a` is in `zone-a`): every
/// node is a zone of its own, so topology hints that keep traffic in the zone
/// keep it on the node.
pub fn zone_of(node_name: &str) -> String {
    format!("zone-{}", node_name.trim_start_matches("node-"))
}

impl Node {
    /// `node-a`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its zone (`topology.kubernetes.io/zone`), see [`zone_of`].
    pub fn zone(&self) -> String {
        zone_of(&self.name)
    }
    pub fn ns(&self) -> &str {
        &self.ns
    }
    /// Its interface on the segment (where lb's XDP program goes).
    pub fn uplink(&self) -> &str {
        &self.uplink
    }
    /// The uplink's peer, a port of the bridge (in the lan namespace).
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    /// Both addresses, IPv4 first.
    pub fn addrs(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
    /// `ipv4:port` or `[ipv6]:port` (e.g. a NodePort).
    pub fn sock(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.addrs()[usize::from(v6)], port)
    }
    /// The agent's `--node-ip`: `192.168.77.10,fd00:77::10`.
    pub fn node_ip_arg(&self) -> String {
        format!("{},{}", self.ipv4, self.ipv6)
    }
    pub fn pod_cidr_v4(&self) -> IpNet {
        self.pod_cidr_v4
    }
    pub fn pod_cidr_v6(&self) -> IpNet {
        self.pod_cidr_v6
    }
    /// The pods' gateway: 10.244.N.1 on every host-side veth of the node.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        match self.pod_cidr_v4.host(1) {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => unreachable!(),
        }
    }
    /// fd00:244:N::1 on every host-side veth of the node.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        match self.pod_cidr_v6.host(1) {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => unreachable!(),
        }
    }
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
    /// The host sides of the pods' veths.
    pub fn host_veths(&self) -> Vec<&str> {
        self.pods.iter().map(|p| p.host_veth()).collect()
    }
    /// A glob matching exactly this node's host-side pod veths
    /// (`caliXXXXa*`): the agent's `--pod-ifaces`.
    pub fn pod_iface_pattern(&self) -> String {
        format!("{}*", self.pod_iface_prefix)
    }
    /// Where the node's agent pins: `/sys/fs/bpf/lb-test-<run>/<node>/lb`
    /// (its `--pin-path`, or the default `/sys/fs/bpf/lb` of an agent run as
    /// the DaemonSet runs it, which sees [`Self::bpffs`] as `/sys/fs/bpf`).
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// The node's own `/sys/fs/bpf`: `/sys/fs/bpf/lb-test-<run>/<node>`.
    pub fn bpffs(&self) -> &Path {
        self.pin_path.parent().expect("a pin path has a parent")
    }
}

/// The external client, on the segment, routing the LoadBalancer and
/// externalIP prefixes via node-a.
#[derive(Debug, Clone)]
pub struct Client {
    ns: String,
    iface: String,
    bridge_port: String,
}

impl Client {
    pub fn ns(&self) -> &str {
        &self.ns
    }
    pub fn iface(&self) -> &str {
        &self.iface
    }
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        net::CLIENT_V4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        net::CLIENT_V6
    }
    pub fn addrs(&self) -> [IpAddr; 2] {
        [net::CLIENT_V4.into(), net::CLIENT_V6.into()]
    }
}

/// How a node's agent is started, and what says it is ready; kept for
/// restarts.
#[derive(Debug, Clone)]
struct NodeAgent {
    spec: AgentSpec,
    ready: AgentProbe,
}

/// An HTTP endpoint of the agent on its node's loopback (a probe's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentProbe {
    pub path: String,
    pub port: u16,
}

impl AgentProbe {
    /// The agent's default healthz: `/healthz` on 10256.
    pub fn healthz() -> Self {
        Self {
            path: "/healthz".into(),
            port: AGENT_HEALTHZ.port(),
        }
    }

    /// Its address inside the node's namespace.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port)
    }
}

/// Where a kubelet mounts a pod's ServiceAccount token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What a pod's container puts around the agent's process, as a kubelet and
/// a container runtime set it up from a DaemonSet's container (see
/// `kube_cluster::ShippedAgent`).
#[derive(Debug, Clone)]
pub struct Container {
    /// Where the container mounts the host's /sys/fs/bpf (a hostPath
    /// volume): each node's own bpffs directory ([`Node::bpffs`]) is bound
    /// there.
    pub bpffs_mount: PathBuf,
    /// Its other hostPath volumes: (host path, mount path), bound as a
    /// kubelet binds them (the host's cgroup hierarchy, for instance).
    pub host_mounts: Vec<(PathBuf, PathBuf)>,
    /// Its environment variables with literal values (the kubelet's own,
    /// `NODE_NAME` and the API server's address, come on top).
    pub env: Vec<(String, String)>,
    /// Its securityContext (None: the test's own privileges).
    pub confinement: Option<Confinement>,
}

impl Container {
    /// Where the agent in it pins (`LB_PIN_PATH`, else the agent's default)
    /// relative to its bpffs volume: the pins of `node` are then at
    /// [`Node::pin_path`], as the testbed expects them.
    fn check_pin_path(&self, node: &Node) -> Result<()> {
        let inside = self
            .env
            .iter()
            .find(|(k, _)| k == "LB_PIN_PATH")
            .map_or_else(
                || PathBuf::from(BPFFS).join("lb"),
                |(_, v)| PathBuf::from(v),
            );
        let rel = inside.strip_prefix(&self.bpffs_mount).with_context(|| {
            format!(
                "the agent pins at {} in its container, outside its bpffs volume at {}",
                inside.display(),
                self.bpffs_mount.display()
            )
        })?;
        ensure!(
            node.bpffs().join(rel) == node.pin_path,
            "the agent would pin at {} of {}'s bpffs, not at {}",
            rel.display(),
            node.name,
            node.pin_path.display()
        );
        Ok(())
    }

    /// The bind mounts of `node`'s container, after `first`; creates their
    /// mount points in the host's tree (empty directories nothing else uses).
    fn mounts(
        &self,
        node: &Node,
        first: Vec<(PathBuf, PathBuf)>,
    ) -> Result<Vec<(PathBuf, PathBuf)>> {
        fs::create_dir_all(node.bpffs())
            .with_context(|| format!("creating {}", node.bpffs().display()))?;
        let mounts: Vec<(PathBuf, PathBuf)> = first
            .into_iter()
            .chain([(node.bpffs().to_path_buf(), self.bpffs_mount.clone())])
            .chain(self.host_mounts.iter().cloned())
            .collect();
        for (_, target) in &mounts {
            fs::create_dir_all(target)
                .with_context(|| format!("creating the mount point {}", target.display()))?;
        }
        Ok(mounts)
    }
}

/// How a DaemonSet's pod runs the agent (see
/// [`Cluster::start_agents_in_cluster`]).
#[derive(Debug, Clone)]
pub struct InCluster {
    /// The container's args; `$(NODE_NAME)` is expanded as the kubelet
    /// expands dependent environment variables.
    pub args: Vec<String>,
    /// A directory with the ServiceAccount's `token`, `ca.crt` and
    /// `namespace` (see `ControlPlane::service_account_files`).
    pub service_account: PathBuf,
    /// The API server, as this process reaches it.
    pub api: SocketAddr,
    /// The readiness probe: what [`Cluster::start_agents_in_cluster`] and
    /// [`Cluster::restart_agent`] wait for.
    pub ready: AgentProbe,
    /// The agent's container.
    pub container: Container,
}

/// A small cluster of network namespaces; everything it made is removed
/// when it is dropped, on SIGINT / SIGTERM (exit status 130), and when
/// [`Cluster::up`] fails half-way.
pub struct Cluster {
    opts: Options,
    /// Namespaces, pins, logs and agents (see `crate::scope`).
    scope: Scope,
    servers: Mutex<Vec<Servers>>,
    /// The nodes' ways to the API server (in-cluster agents).
    relays: Mutex<Vec<crate::relay::Relay>>,
    lan_ns: String,
    bridge: String,
    nodes: Vec<Node>,
    client: Client,
    agents: Mutex<BTreeMap<String, NodeAgent>>,
    /// `xdp_pass` on the switch ports of the node uplinks (see `crate::xdp`).
    switch_xdp: Mutex<Option<crate::xdp::Attached>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("run", &self.scope.run_id())
            .field("nodes", &self.nodes)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the cluster: removes leftovers of dead runs first, then
    /// creates the namespaces, links, addresses and routes, and waits (5 s
    /// at most) for every link to be up and every address usable.
    pub fn up(opts: Options) -> Result<Self> {
        ensure!(
            (1..=50).contains(&opts.pods_per_node),
            "pods_per_node must be 1 to 50, not {}",
            opts.pods_per_node
        );
        for r in cleanup_stale() {
            eprintln!("lb-testbed: removed leftover {r}");
        }
        let scope = Scope::new()?;
        if opts.keep_logs {
            scope.keep_run_dir();
        }
        let run = scope.run_id().to_string();
        let nsname = |role: &str| scope.netns_name(role);
        let pin_dir = scope.pin_dir().to_path_buf();

        let nodes = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, letter)| {
                let name = format!("node-{letter}");
                let n = i as u8;
                let pod_cidr_v4 = IpNet::v4(Ipv4Addr::new(10, 244, n + 1, 0), 24);
                let pod_cidr_v6 = IpNet::v6(
                    Ipv6Addr::new(0xfd00, 0x244, u16::from(n) + 1, 0, 0, 0, 0, 0),
                    64,
                );
                // Calico's prefix: the agent's default --pod-ifaces matches
                // it, so an agent run as the DaemonSet runs it finds the pods.
                let pod_iface_prefix = format!("cali{run}{letter}");
                let pods = (0..opts.pods_per_node)
                    .map(|j| {
                        let host = 10 + j as u32;
                        Pod {
                            name: format!("pod-{letter}{j}"),
                            node: name.clone(),
                            ns: nsname(&format!("pod-{letter}{j}")),
                            host_veth: format!("{pod_iface_prefix}{j}"),
                            ipv4: match pod_cidr_v4.host(host.into()) {
                                IpAddr::V4(a) => a,
                                IpAddr::V6(_) => unreachable!(),
                            },
                            ipv6: match pod_cidr_v6.host(net::v6_suffix(host).into()) {
                                IpAddr::V6(a) => a,
                                IpAddr::V4(_) => unreachable!(),
                            },
                        }
                    })
                    .collect();
                Node {
                    ns: nsname(&name),
                    uplink: format!("lb{run}-{letter}-up"),
                    bridge_port: format!("lb{run}-{letter}-br"),
                    ipv4: Ipv4Addr::new(192, 168, 77, 10 + n),
                    ipv6: Ipv6Addr::new(
                        0xfd00,
                        0x77,
                        0,
                        0,
                        0,
                        0,
                        0,
                        net::v6_suffix(10 + u32::from(n)),
                    ),
                    pod_cidr_v4,
                    pod_cidr_v6,
                    pod_iface_prefix,
                    pin_path: pin_dir.join(&name).join("lb"),
                    pods,
                    name,
                }
            })
            .collect();
        let cluster = Cluster {
            lan_ns: nsname("lan"),
            bridge: format!("lb{run}-br"),
            client: Client {
                ns: nsname("client"),
                iface: format!("lb{run}-c-up"),
                bridge_port: format!("lb{run}-c-br"),
            },
            nodes,
            opts,
            scope,
            servers: Mutex::new(Vec::new()),
            relays: Mutex::new(Vec::new()),
            agents: Mutex::new(BTreeMap::new()),
            switch_xdp: Mutex::new(None),
        };
        // On an error, dropping `cluster` tears down what was built.
        cluster
            .build()
            .with_context(|| format!("building test cluster {}", cluster.run_id()))?;
        Ok(cluster)
    }

    /// Creates the namespace `name` (one of [`Scope::netns_name`]'s).
    fn add_netns(&self, name: &str, sysctls: &[&str]) -> Result<()> {
        let role = name
            .strip_prefix(&self.scope.netns_name(""))
            .context("a namespace of another run")?;
        self.scope.add_netns(role, sysctls).map(drop)
    }

    fn build(&self) -> Result<()> {
        self.scope.mark_pin_dir()?;

        // The segment: a bridge in its own namespace, a plain switch.
        let lan = self.lan_ns.as_str();
        self.add_netns(
            lan,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                // br_netfilter, if loaded on the host, must not filter here.
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ],
        )?;
        // No STP (ports forward at once), no multicast snooping (NDP's
        // multicast is flooded without an MLD querier).
        ip(
            Some(lan),
            &format!(
                "link add {} type bridge stp_state 0 mcast_snooping 0",
                self.bridge
            ),
        )?;
        ip(Some(lan), &format!("link set {} up", self.bridge))?;

        for node in &self.nodes {
            self.add_netns(
                &node.ns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    // As Cilium does: translated and source-NATed packets
                    // arrive on other interfaces than the reverse route's.
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            self.uplink(
                &node.ns,
                &node.uplink,
                &node.bridge_port,
                node.addrs(),
                true,
            )?;
        }
        self.add_netns(&self.client.ns, &[])?;
        self.uplink(
            &self.client.ns,
            &self.client.iface,
            &self.client.bridge_port,
            self.client.addrs(),
            false,
        )?;

        for node in &self.nodes {
            for pod in &node.pods {
                self.add_netns(&pod.ns, &[])?;
                let (h, p) = (pod.host_veth.as_str(), pod.ns.as_str());
                ip(
                    Some(&node.ns),
                    &format!("link add {h} type veth peer name eth0 netns {p}"),
                )?;
                if self.opts.pod_network == PodNetwork::Vxlan {
                    // Pods at the overlay's MTU, as Flannel's CNI plugin sets it.
                    let mtu = 1500 - VXLAN_OVERHEAD[1];
                    ip(Some(&node.ns), &format!("link set {h} mtu {mtu}"))?;
                    ip(Some(p), &format!("link set eth0 mtu {mtu}"))?;
                }
                // Pod veth offloads stay at their defaults (partial
                // checksums and all), as on a real node.
                ip(
                    Some(&node.ns),
                    &format!("addr add {}/32 dev {h}", node.gateway_v4()),
                )?;
                ip(
                    Some(&node.ns),
                    &format!("addr add {}/128 dev {h} nodad", node.gateway_v6()),
                )?;
                ip(Some(&node.ns), &format!("link set {h} up"))?;
                ip(Some(p), &format!("addr add {}/32 dev eth0", pod.ipv4))?;
                ip(
                    Some(p),
                    &format!("addr add {}/128 dev eth0 nodad", pod.ipv6),
                )?;
                ip(Some(p), "link set eth0 up")?;
            }
        }

        self.wait_links()?;
        // A veth wakes its peer for XDP_TX frames only when the peer runs XDP
        // (veth_xdp_flush checks the receiver's program; GRO's NAPI is not
        // enough). Physical switch ports have no such quirk; give the switch
        // side of each node uplink a pass program so lb's XDP_TX works.
        if self.opts.uplinks == Uplinks::Nic {
            let ports: Vec<String> = self.nodes.iter().map(|n| n.bridge_port.clone()).collect();
            *lock(&self.switch_xdp) = Some(crate::xdp::attach(&self.lan_ns, "xdp_pass", &ports)?);
        }

        // Routes, now that every link is up.
        for node in &self.nodes {
            for pod in &node.pods {
                let (h, p) = (pod.host_veth.as_str(), pod.ns.as_str());
                ip(
                    Some(&node.ns),
                    &format!("route add {}/32 dev {h}", pod.ipv4),
                )?;
                ip(
                    Some(&node.ns),
                    &format!("-6 route add {}/128 dev {h}", pod.ipv6),
                )?;
                ip(
                    Some(p),
                    &format!("route add {}/32 dev eth0 scope link", node.gateway_v4()),
                )?;
                ip(
                    Some(p),
                    &format!("route add default via {} dev eth0", node.gateway_v4()),
                )?;
                ip(
                    Some(p),
                    &format!("-6 route add {}/128 dev eth0", node.gateway_v6()),
                )?;
                ip(
                    Some(p),
                    &format!("-6 route add default via {} dev eth0", node.gateway_v6()),
                )?;
            }
            // The other nodes' pod CIDRs via their node, as a CNI's routes
            // (or BGP) would, or through the overlay. No route for the
            // ClusterIP, LoadBalancer or externalIP ranges: lb translates
            // those packets on the uplink (XDP) and on the host side of the
            // pod veths (tc) before the kernel routes them; without lb they
            // are unreachable, as on a node whose proxy is down. A route to
            // the other node or a blackhole would hide exactly that.
            match self.opts.pod_network {
                PodNetwork::Routed => {
                    for other in self.nodes.iter().filter(|o| o.name != node.name) {
                        ip(
                            Some(&node.ns),
                            &format!("route add {} via {}", other.pod_cidr_v4, other.ipv4),
                        )?;
                        ip(
                            Some(&node.ns),
                            &format!("-6 route add {} via {}", other.pod_cidr_v6, other.ipv6),
                        )?;
                    }
                }
                PodNetwork::Vxlan => self.overlay(node)?,
            }
        }
        // The client reaches LoadBalancer IPs and externalIPs via node-a.
        let a = &self.nodes[0];
        for (prefix, via) in [
            (net::LB_V4, IpAddr::from(a.ipv4)),
            (net::EXTERNAL_V4, a.ipv4.into()),
            (net::LB_V6, a.ipv6.into()),
            (net::EXTERNAL_V6, a.ipv6.into()),
        ] {
            let family = if prefix.is_ipv4() { "" } else { "-6 " };
            ip(
                Some(&self.client.ns),
                &format!("{family}route add {prefix} via {via}"),
            )?;
        }
        self.wait_addresses()
    }

    /// `node`'s side of the VXLAN overlay (see [`PodNetwork::Vxlan`]).
    fn overlay(&self, node: &Node) -> Result<()> {
        let ns = Some(node.ns.as_str());
        let index = |n: &Node| {
            self.nodes
                .iter()
                .position(|o| o.name == n.name)
                .unwrap_or(0)
        };
        for (v6, dev) in [(false, "flannel.1"), (true, "flannel-v6.1")] {
            let (local, family) = if v6 {
                (IpAddr::from(node.ipv6), "-6 ")
            } else {
                (IpAddr::from(node.ipv4), "")
            };
            ip(
                ns,
                &format!(
                    "link add {dev} address {} mtu {} type vxlan id 1 local {local} dev {} \
                     dstport 8472 nolearning",
                    vtep_mac(index(node), v6),
                    1500 - VXLAN_OVERHEAD[usize::from(v6)],
                    node.uplink
                ),
            )?;
            // The VTEP address: the pod CIDR's network address.
            let own = if v6 {
                format!("{}/128", node.pod_cidr_v6.addr())
            } else {
                format!("{}/32", node.pod_cidr_v4.addr())
            };
            ip(ns, &format!("{family}addr add {own} dev {dev}"))?;
            ip(ns, &format!("link set {dev} up"))?;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let (cidr, vtep, underlay) = if v6 {
                    (
                        other.pod_cidr_v6,
                        other.pod_cidr_v6.addr(),
                        IpAddr::from(other.ipv6),
                    )
                } else {
                    (
                        other.pod_cidr_v4,
                        other.pod_cidr_v4.addr(),
                        IpAddr::from(other.ipv4),
                    )
                };
                let mac = vtep_mac(index(other), v6);
                ip(
                    ns,
                    &format!("{family}neigh add {vtep} lladdr {mac} dev {dev} nud permanent"),
                )?;
                crate::ns::run(std::process::Command::new("bridge").args([
                    "-n",
                    &node.ns,
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    dev,
                    "dst",
                    &underlay.to_string(),
                ]))?;
                ip(
                    ns,
                    &format!("{family}route add {cidr} via {vtep} dev {dev} onlink"),
                )?;
            }
        }
        Ok(())
    }

    /// A veth from `ns` (`dev`) to the bridge (`port`), with `addrs` on the
    /// segment.
    fn uplink(
        &self,
        ns: &str,
        dev: &str,
        port: &str,
        addrs: [IpAddr; 2],
        node: bool,
    ) -> Result<()> {
        let lan = self.lan_ns.as_str();
        ip(
            Some(ns),
            &format!("link add {dev} type veth peer name {port} netns {lan}"),
        )?;
        ip(
            Some(lan),
            &format!("link set {port} master {}", self.bridge),
        )?;
        ip(Some(lan), &format!("link set {port} up"))?;
        ip(
            Some(ns),
            &format!(
                "addr add {}/{} dev {dev}",
                addrs[0],
                net::LAN_V4.prefix_len()
            ),
        )?;
        ip(
            Some(ns),
            &format!(
                "addr add {}/{} dev {dev} nodad",
                addrs[1],
                net::LAN_V6.prefix_len()
            ),
        )?;
        if self.opts.uplinks == Uplinks::Veth {
            // As kind and docker leave them.
            return ip(Some(ns), &format!("link set {dev} up")).map(drop);
        }
        // Uplinks stand for physical NICs, which put complete checksums on
        // the wire. A veth by default hands its peer packets with partial
        // (offloaded) checksums, which an XDP program on the receiving side
        // would see as wrong; so no tx checksum offload on the emulated
        // NICs (the nodes' uplinks and the client's interface).
        ethtool_in(ns, &["-K", dev, "tx", "off"])?;
        // Nor on the bridge's side, the switch: with GRO on (below) the
        // bridge port merges segments into super-packets whose checksums
        // are partial again, and a port with tx checksumming would put
        // those (segmented) on the wire as they are. Measured: without this,
        // half the packets of a bulk pod-to-pod stream reach node-b's
        // uplink with a partial checksum.
        ethtool_in(lan, &["-K", port, "tx", "off"])?;
        if node {
            // XDP redirects out of a node's uplink deliver into its peer,
            // which needs NAPI: GRO on gives it that. XDP_TX needs more: the
            // peer must run XDP itself (see `attach_switch_xdp`).
            ethtool_in(lan, &["-K", port, "gro", "on"])?;
        }
        ip(Some(ns), &format!("link set {dev} up")).map(drop)
    }

    fn all_namespaces(&self) -> Vec<String> {
        self.scope.namespaces()
    }

    /// Waits until every link of every namespace has its carrier.
    fn wait_links(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT_LINKS;
        for ns in self.all_namespaces() {
            loop {
                let out = ip(Some(&ns), "-o link show")?;
                let down: Vec<&str> = out
                    .lines()
                    .filter(|l| !l.contains("LOOPBACK") && !l.contains("LOWER_UP"))
                    .filter_map(|l| l.split(':').nth(1))
                    .map(str::trim)
                    .collect();
                if down.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "links not up in {ns} after {WAIT_LINKS:?}: {}",
                        down.join(", ")
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Waits until no IPv6 address is tentative (there is no DAD, so this
    /// is a check more than a wait).
    fn wait_addresses(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT_LINKS;
        for ns in self.all_namespaces() {
            loop {
                let out = ip(Some(&ns), "-6 -o addr show tentative")?;
                if out.trim().is_empty() {
                    break;
                }
                ensure!(
                    !out.contains("dadfailed"),
                    "duplicate address in {ns}: {out}"
                );
                if Instant::now() >= deadline {
                    bail!("addresses still tentative in {ns} after {WAIT_LINKS:?}: {out}");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The run id (4 hex digits) in every name of this cluster.
    pub fn run_id(&self) -> &str {
        self.scope.run_id()
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Every namespace of the cluster.
    pub fn namespaces(&self) -> Vec<String> {
        self.all_namespaces()
    }

    /// The namespace of the bridge.
    pub fn lan_ns(&self) -> &str {
        &self.lan_ns
    }

    /// The bridge (in [`Self::lan_ns`]).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node named `name` (`node-a`, `node-b`). Panics if there is none.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in cluster {}", self.run_id()))
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The pod named `name` (`pod-a0`). Panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in cluster {}", self.run_id()))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The per-run directory (agent logs).
    pub fn run_dir(&self) -> &Path {
        self.scope.run_dir()
    }

    /// `/sys/fs/bpf/lb-test-<run>`: the parent of the nodes' pin paths.
    pub fn pin_dir(&self) -> &Path {
        self.scope.pin_dir()
    }

    /// The segment's prefixes (192.168.77.0/24, fd00:77::/64).
    pub fn lan_prefixes(&self) -> [IpNet; 2] {
        [net::LAN_V4, net::LAN_V6]
    }

    /// LoadBalancer ingress prefixes (203.0.113.0/24, 2001:db8:1b::/64),
    /// routed by the client via node-a.
    pub fn lb_prefixes(&self) -> [IpNet; 2] {
        [net::LB_V4, net::LB_V6]
    }

    /// externalIP prefixes (198.51.100.0/24, 2001:db8:e::/64), routed by
    /// the client via node-a.
    pub fn external_ip_prefixes(&self) -> [IpNet; 2] {
        [net::EXTERNAL_V4, net::EXTERNAL_V6]
    }

    /// ClusterIP ranges (10.96.0.0/16, fd00:96::/112), routed by nothing.
    pub fn cluster_ip_prefixes(&self) -> [IpNet; 2] {
        [net::CLUSTER_IP_V4, net::CLUSTER_IP_V6]
    }

    /// Starts TCP and UDP servers, IPv4 and IPv6, on `ports` in every pod
    /// (see [`crate::servers`] for what they answer). They stop when the
    /// cluster goes, or with [`Self::stop_pod_servers`].
    pub fn start_pod_servers(&self, ports: &[u16]) -> Result<()> {
        for pod in self.pods() {
            let s = serve_in(&pod.ns, &pod.name, &pod.addrs(), ports)?;
            lock(&self.servers).push(s);
        }
        Ok(())
    }

    /// Stops every pod server started so far.
    pub fn stop_pod_servers(&self) {
        drop(std::mem::take(&mut *lock(&self.servers)));
    }

    /// Stops the servers of pod `pod` (as its containers stop: connections
    /// to it are refused from then on); returns once they are closed.
    /// Nothing if none run.
    pub fn stop_pod_server(&self, pod: &str) {
        let stopped: Vec<Servers> = {
            let mut all = lock(&self.servers);
            let (gone, kept) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|s| s.ns() == self.pod(pod).ns());
            *all = kept;
            gone
        };
        drop(stopped);
    }

    /// Starts the servers of pod `pod` on `ports` again (as
    /// [`Self::start_pod_servers`] does for every pod), after
    /// [`Self::stop_pod_server`].
    pub fn start_pod_server(&self, pod: &str, ports: &[u16]) -> Result<()> {
        let p = self.pod(pod);
        let s = serve_in(&p.ns, &p.name, &p.addrs(), ports)?;
        lock(&self.servers).push(s);
        Ok(())
    }

    /// Writes the Node manifests (`nodes.yaml`: zones and pod CIDRs, the
    /// cluster CIDRs) into `manifests_dir`, then starts the lb agent on every
    /// node:
    /// `<agent_bin> run --manifests <dir> --node-name <node> --node-ip <v4>,<v6>
    /// --iface <uplink> --pod-ifaces <pattern> --pin-path <pin path>
    /// --log-level info`, inside the node's namespace, output to
    /// `<run dir>/agent-<node>.log`; then waits for each to answer 200 on
    /// `http://127.0.0.1:10256/healthz` in its namespace.
    pub fn start_agents(&self, agent_bin: &Path, manifests_dir: &Path) -> Result<()> {
        self.write_nodes_yaml(manifests_dir)?;
        self.start_each(|node| {
            let mut args = self.manifest_agent_args(node, manifests_dir);
            args.push("--pin-path".into());
            args.push(node.pin_path.clone().into());
            Ok(NodeAgent {
                spec: AgentSpec {
                    bin: agent_bin.to_path_buf(),
                    args,
                    env: Vec::new(),
                    mounts: Vec::new(),
                    ns: node.ns.clone(),
                    log: self.agent_log_path(&node.name),
                    confinement: None,
                },
                ready: AgentProbe::healthz(),
            })
        })
    }

    /// `nodes.yaml` (the Node manifests) in `manifests_dir`.
    fn write_nodes_yaml(&self, manifests_dir: &Path) -> Result<()> {
        let nodes = manifests_dir.join("nodes.yaml");
        std::fs::write(&nodes, self.nodes_yaml())
            .with_context(|| format!("writing {}", nodes.display()))
    }

    /// The testbed's manifest-mode agent arguments for `node` (all but
    /// `--pin-path`): `run --manifests <dir> --node-name --node-ip --iface
    /// --uplink-hook --pod-ifaces --log-level info`.
    fn manifest_agent_args(&self, node: &Node, manifests_dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["run", "--manifests"].map(OsString::from).to_vec();
        args.push(manifests_dir.into());
        for (k, v) in [
            ("--node-name", node.name.clone()),
            ("--node-ip", node.node_ip_arg()),
            ("--iface", node.uplink.clone()),
            (
                "--uplink-hook",
                match self.opts.uplinks {
                    Uplinks::Nic => "xdp",
                    Uplinks::Veth => "auto",
                }
                .to_string(),
            ),
            ("--pod-ifaces", node.pod_iface_pattern()),
            ("--log-level", "info".to_string()),
        ] {
            args.push(k.into());
            args.push(v.into());
        }
        args
    }

    /// Like [`Self::start_agents`], in manifest mode, but each agent in a
    /// container as `container` describes (a DaemonSet's, see
    /// `kube_cluster::ShippedAgent`): its volumes bound, its environment, its
    /// securityContext; the agent pins where the container's environment
    /// says (no `--pin-path`), which must be [`Node::pin_path`]. `extra_args`
    /// go after the testbed's (the container's own args, say, but `run` and
    /// `--node-name`).
    pub fn start_agents_contained(
        &self,
        agent_bin: &Path,
        manifests_dir: &Path,
        container: &Container,
        extra_args: &[String],
    ) -> Result<()> {
        self.write_nodes_yaml(manifests_dir)?;
        self.start_each(|node| {
            container.check_pin_path(node)?;
            let mut args = self.manifest_agent_args(node, manifests_dir);
            args.extend(extra_args.iter().map(OsString::from));
            Ok(NodeAgent {
                spec: AgentSpec {
                    bin: agent_bin.to_path_buf(),
                    args,
                    env: container.env.clone(),
                    mounts: container.mounts(node, Vec::new())?,
                    ns: node.ns.clone(),
                    log: self.agent_log_path(&node.name),
                    confinement: container.confinement.clone(),
                },
                ready: AgentProbe::healthz(),
            })
        })
    }

    /// Starts on every node the agent `spec_for` describes (kept for
    /// restarts), then waits until each is ready.
    fn start_each(&self, mut spec_for: impl FnMut(&Node) -> Result<NodeAgent>) -> Result<()> {
        for node in &self.nodes {
            let spec = spec_for(node)?;
            lock(&self.agents).insert(node.name.clone(), spec);
            self.spawn_agent(&node.name)?;
        }
        for node in &self.nodes {
            self.wait_agent_ready(&node.name)?;
        }
        Ok(())
    }

    /// Starts the lb agent on every node the way the DaemonSet's pod runs it,
    /// in Kubernetes mode: inside the node's network namespace with
    /// `how.args` only (`$(NODE_NAME)` expanded), the container's environment
    /// and the one a kubelet adds (`NODE_NAME`, `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`), in a mount namespace of its own where the ServiceAccount
    /// files are at [`SERVICE_ACCOUNT_DIR`], the node's own bpffs
    /// ([`Node::bpffs`]) is at the container's bpffs volume and its other
    /// volumes are bound, confined as its securityContext says. The API
    /// server is reached through a relay listening on the node's loopback.
    /// Waits for each agent's readiness probe.
    pub fn start_agents_in_cluster(&self, agent_bin: &Path, how: &InCluster) -> Result<()> {
        fs::create_dir_all(SERVICE_ACCOUNT_DIR)
            .with_context(|| format!("creating the mount point {SERVICE_ACCOUNT_DIR}"))?;
        let api_here = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), how.api.port());
        self.start_each(|node| {
            how.container.check_pin_path(node)?;
            let relay = crate::relay::Relay::start(&node.ns, api_here, how.api)
                .with_context(|| format!("relaying {} to the API server", node.name))?;
            lock(&self.relays).push(relay);
            Ok(NodeAgent {
                spec: AgentSpec {
                    bin: agent_bin.to_path_buf(),
                    args: how
                        .args
                        .iter()
                        .map(|a| a.replace("$(NODE_NAME)", &node.name).into())
                        .collect(),
                    env: how
                        .container
                        .env
                        .iter()
                        .cloned()
                        .chain([
                            ("NODE_NAME".into(), node.name.clone()),
                            ("KUBERNETES_SERVICE_HOST".into(), api_here.ip().to_string()),
                            (
                                "KUBERNETES_SERVICE_PORT".into(),
                                api_here.port().to_string(),
                            ),
                        ])
                        .collect(),
                    mounts: how.container.mounts(
                        node,
                        vec![(how.service_account.clone(), SERVICE_ACCOUNT_DIR.into())],
                    )?,
                    ns: node.ns.clone(),
                    log: self.agent_log_path(&node.name),
                    confinement: how.container.confinement.clone(),
                },
                ready: how.ready.clone(),
            })
        })
    }

    /// Cuts (`true`) or restores the in-cluster agents' way to the API
    /// server: a partition of the nodes from the control plane while the API
    /// server itself stays up (see [`crate::relay::Relay::cut`]).
    pub fn cut_api(&self, cut: bool) {
        for r in lock(&self.relays).iter() {
            if cut {
                r.cut();
            } else {
                r.restore();
            }
        }
    }

    /// A silent partition between every node and the API server (`on`), or
    /// its end (see [`crate::relay::Relay::silence`]).
    pub fn silence_api(&self, on: bool) -> Result<()> {
        for r in lock(&self.relays).iter() {
            r.silence(on)?;
        }
        Ok(())
    }

    fn agent_log_path(&self, node: &str) -> PathBuf {
        self.scope.run_dir().join(format!("agent-{node}.log"))
    }

    fn spawn_agent(&self, node: &str) -> Result<()> {
        let agent = lock(&self.agents)
            .get(node)
            .cloned()
            .with_context(|| format!("no agent was started on {node}"))?;
        if let Some(parent) = self.node(node).pin_path.parent()
            && is_bpffs(BPFFS)
        {
            fs::create_dir_all(parent)?;
        }
        self.scope.start_agent(node, &agent.spec)
    }

    fn wait_agent_ready(&self, node: &str) -> Result<()> {
        let (probe, confinement) = lock(&self.agents)
            .get(node)
            .map(|s| (s.ready.clone(), s.spec.confinement.clone()))
            .unwrap_or_else(|| (AgentProbe::healthz(), None));
        self.wait_agent_probe(node, &probe)?;
        if let Some(c) = confinement {
            self.check_confined(node, &c)?;
        }
        Ok(())
    }

    /// Fails unless the (ready) agent on `node` runs with exactly the
    /// privileges `c` leaves it: a confined agent that came up with more would
    /// show nothing about the confinement.
    fn check_confined(&self, node: &str, c: &Confinement) -> Result<()> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent runs on {node}"))?;
        let p = crate::agent::Privileges::of(pid)?;
        ensure!(
            p.effective == c.capabilities
                && p.permitted == c.capabilities
                && p.bounding == c.capabilities
                && p.inheritable.is_empty()
                && p.ambient.is_empty()
                && p.no_new_privs == c.no_new_privs,
            "the agent on {node} runs with {p:?}, not confined as {c:?}"
        );
        Ok(())
    }

    /// Waits until `probe` answers 200, failing early if the agent exits.
    fn wait_agent_probe(&self, node: &str, probe: &AgentProbe) -> Result<()> {
        let ns = self.node(node).ns.clone();
        let timeout = self.opts.agent_ready_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self.scope.check_agent(node) {
                bail!(
                    "{e:#} before it was ready; its log ends:\n{}",
                    ns::tail(&self.agent_log(node), 30)
                );
            }
            let last =
                match client::http_get(&ns, probe.addr(), &probe.path, Duration::from_secs(1)) {
                    Ok((200, _)) => return Ok(()),
                    Ok((code, body)) => format!("{} HTTP {code}: {}", probe.path, body.trim()),
                    Err(e) => format!("{} {e:#}", probe.path),
                };
            if Instant::now() >= deadline {
                bail!(
                    "the agent on {node} was not ready after {timeout:?} ({last}); its log ends:\n{}",
                    ns::tail(&self.agent_log(node), 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent on `node`: SIGTERM, then SIGKILL after 5 s. Does
    /// nothing if it is not running.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        self.scope.stop_agent(node).map(drop)
    }

    /// Stops the agent on `node` and starts it again with the same
    /// arguments, waiting until it is ready.
    pub fn restart_agent(&self, node: &str) -> Result<()> {
        self.stop_agent(node)?;
        self.spawn_agent(node)?;
        self.wait_agent_ready(node)
    }

    /// Starts the agent on `node` again (after [`Self::stop_agent`]) with its
    /// arguments changed by `edit` (kept for later restarts), waiting until
    /// it is ready: an upgrade or a new setting, with whatever the test did
    /// to the node while no agent ran.
    pub fn start_agent_with(
        &self,
        node: &str,
        edit: impl FnOnce(&mut Vec<OsString>),
    ) -> Result<()> {
        {
            let mut agents = lock(&self.agents);
            let agent = agents
                .get_mut(node)
                .with_context(|| format!("no agent was started on {node}"))?;
            edit(&mut agent.spec.args);
        }
        self.spawn_agent(node)?;
        self.wait_agent_ready(node)
    }

    /// Like [`Self::restart_agent`], waiting for `probe` instead of the
    /// readiness probe (e.g. the liveness probe, while the API server is
    /// away and the agent cannot be ready).
    pub fn restart_agent_until(&self, node: &str, probe: &AgentProbe) -> Result<()> {
        self.stop_agent(node)?;
        self.spawn_agent(node)?;
        self.wait_agent_probe(node, probe)
    }

    /// The pid of the agent running on `node`, if one is.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.scope.agent_pid(node)
    }

    /// The resident set (VmRSS) of the agent running on `node`, in bytes.
    pub fn agent_rss(&self, node: &str) -> Option<u64> {
        self.scope.agent_status_bytes(node, "VmRSS")
    }

    /// The anonymous part of that resident set (RssAnon: heap, stacks,
    /// anonymous mappings), in bytes: what a leak grows. The rest is pages
    /// of the binary and of memory-mapped BPF maps, which the agent's RSS
    /// gains as code paths and map rows are first touched.
    pub fn agent_anon_memory(&self, node: &str) -> Option<u64> {
        self.scope.agent_status_bytes(node, "RssAnon")
    }

    /// Everything the agent on `node` has logged (across restarts).
    pub fn agent_log(&self, node: &str) -> String {
        ns::read_lossy(&self.agent_log_path(node))
    }

    /// Tears everything down now (also what dropping does).
    pub fn down(self) {
        drop(self);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.scope.keep_run_dir();
        }
        drop(std::mem::take(&mut *lock(&self.servers)));
        for node in &self.nodes {
            let _ = self.scope.stop_agent(&node.name);
        }
        drop(std::mem::take(&mut *lock(&self.relays)));
        self.scope.teardown();
    }
}
