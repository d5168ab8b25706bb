//! Service, EndpointSlice and Node manifests for the testbed's pods and nodes,
//! as the API server would serve them (the agent's manifest mode reads exactly
//! that).

use std::{fmt::Write as _, net::IpAddr};

use crate::cluster::{Cluster, Pod, zone_of};

/// A Service to write: the fields the demo and the tests vary.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    /// ClusterIP, NodePort or LoadBalancer.
    pub kind: &'static str,
    /// One ClusterIP per family served (IPv4 first, then IPv6).
    pub cluster_ips: Vec<IpAddr>,
    /// (name, port, protocol, nodePort).
    pub ports: Vec<(String, u16, &'static str, Option<u16>)>,
    /// The pods' target port (named `name` in the slices).
    pub target_port: u16,
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub external_traffic_policy_local: bool,
    pub internal_traffic_policy_local: bool,
    /// `healthCheckNodePort` (LoadBalancer, externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// sessionAffinity ClientIP with this timeout (seconds).
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges`, as written (they need not parse).
    pub source_ranges: Vec<String>,
    /// `trafficDistribution` (e.g. `PreferClose`).
    pub traffic_distribution: Option<&'static str>,
}

impl ServiceSpec {
    pub fn new(name: &str, kind: &'static str, cluster_ips: Vec<IpAddr>) -> Self {
        Self {
            name: name.into(),
            kind,
            cluster_ips,
            ports: Vec::new(),
            target_port: 8080,
            load_balancer_ips: Vec::new(),
            external_ips: Vec::new(),
            external_traffic_policy_local: false,
            internal_traffic_policy_local: false,
            health_check_node_port: None,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            traffic_distribution: None,
        }
    }

    /// Adds a port served over TCP and UDP (one port name per protocol).
    pub fn tcp_udp(mut self, name: &str, port: u16, node_port: Option<u16>) -> Self {
        self.ports
            .push((format!("{name}-tcp"), port, "TCP", node_port));
        self.ports
            .push((format!("{name}-udp"), port, "UDP", node_port));
        self
    }
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The Service and one EndpointSlice per family, with `ready` pods as ready
/// endpoints and `terminating` ones as serving-and-terminating.
pub fn service_yaml(spec: &ServiceSpec, ready: &[&Pod], terminating: &[&Pod]) -> String {
    let mut y = String::new();
    let families: Vec<&str> = spec.cluster_ips.iter().map(family).collect();
    let _ = writeln!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default",
        spec.name
    );
    let _ = writeln!(y, "spec:\n  type: {}", spec.kind);
    let _ = writeln!(y, "  clusterIP: {}", spec.cluster_ips[0]);
    let _ = writeln!(y, "  clusterIPs: [{}]", join(&spec.cluster_ips));
    let _ = writeln!(y, "  ipFamilies: [{}]", families.join(", "));
    let policy = if families.len() > 1 {
        "PreferDualStack"
    } else {
        "SingleStack"
    };
    let _ = writeln!(y, "  ipFamilyPolicy: {policy}");
    if spec.kind != "ClusterIP" {
        let etp = if spec.external_traffic_policy_local {
            "Local"
        } else {
            "Cluster"
        };
        let _ = writeln!(y, "  externalTrafficPolicy: {etp}");
    }
    if spec.internal_traffic_policy_local {
        let _ = writeln!(y, "  internalTrafficPolicy: Local");
    }
    if let Some(port) = spec.health_check_node_port {
        let _ = writeln!(y, "  healthCheckNodePort: {port}");
    }
    if let Some(t) = spec.affinity_timeout {
        let _ = writeln!(
            y,
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}"
        );
    }
    if !spec.source_ranges.is_empty() {
        let quoted: Vec<String> = spec
            .source_ranges
            .iter()
            .map(|r| format!("{r:?}"))
            .collect();
        let _ = writeln!(y, "  loadBalancerSourceRanges: [{}]", quoted.join(", "));
    }
    if !spec.external_ips.is_empty() {
        let _ = writeln!(y, "  externalIPs: [{}]", join(&spec.external_ips));
    }
    if let Some(d) = spec.traffic_distribution {
        let _ = writeln!(y, "  trafficDistribution: {d}");
    }
    let _ = writeln!(y, "  ports:");
    for (name, port, proto, node_port) in &spec.ports {
        let _ = write!(
            y,
            "  - {{name: {name}, port: {port}, protocol: {proto}, targetPort: {}",
            spec.target_port
        );
        if let Some(np) = node_port {
            let _ = write!(y, ", nodePort: {np}");
        }
        let _ = writeln!(y, "}}");
    }
    if !spec.load_balancer_ips.is_empty() {
        let _ = writeln!(y, "status:\n  loadBalancer:\n    ingress:");
        for ip in &spec.load_balancer_ips {
            let _ = writeln!(y, "    - ip: {ip}");
        }
    }
    for ip in &spec.cluster_ips {
        let v6 = ip.is_ipv6();
        let _ = writeln!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice"
        );
        let _ = writeln!(
            y,
            "metadata:\n  name: {}-{}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {}",
            spec.name,
            if v6 { "v6" } else { "v4" },
            spec.name
        );
        let _ = writeln!(y, "addressType: {}\nendpoints:", family(ip));
        for (pods, is_ready) in [(ready, true), (terminating, false)] {
            for p in pods {
                let addr: IpAddr = if v6 { p.ipv6().into() } else { p.ipv4().into() };
                let _ = writeln!(
                    y,
                    "- addresses: [\"{addr}\"]\n  nodeName: {}\n  zone: {}\n  conditions: {{ready: {is_ready}, serving: true, terminating: {}}}",
                    p.node(),
                    zone_of(p.node()),
                    !is_ready
                );
            }
        }
        if ready.is_empty() && terminating.is_empty() {
            // An empty list, as the API serves a slice without endpoints.
            y.truncate(y.len() - "endpoints:\n".len());
            let _ = writeln!(y, "endpoints: []");
        }
        let _ = writeln!(y, "ports:");
        for (name, _, proto, _) in &spec.ports {
            let _ = writeln!(
                y,
                "- {{name: {name}, port: {}, protocol: {proto}}}",
                spec.target_port
            );
        }
    }
    y
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Cluster {
    /// A Node manifest per node: its zone label and its pod CIDRs (as the
    /// API server serves a Node whose controller allocated them).
    pub fn nodes_yaml(&self) -> String {
        let mut y = String::new();
        for n in self.nodes() {
            let _ = writeln!(
                y,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{topology.kubernetes.io/zone: {}}}\n\
                 spec:\n  podCIDR: {}\n  podCIDRs: [\"{}\", \"{}\"]",
                n.name(),
                n.zone(),
                n.pod_cidr_v4(),
                n.pod_cidr_v4(),
                n.pod_cidr_v6()
            );
        }
        y
    }

    /// ClusterIP number `n` of each family (10.96.0.n, fd00:96::n).
    pub fn cluster_ips(&self, n: u128) -> Vec<IpAddr> {
        self.cluster_ip_prefixes()
            .iter()
            .map(|p| p.host(n))
            .collect()
    }

    /// LoadBalancer ingress IP number `n` of each family.
    pub fn lb_ips(&self, n: u128) -> Vec<IpAddr> {
        self.lb_prefixes().iter().map(|p| p.host(n)).collect()
    }

    /// externalIP number `n` of each family.
    pub fn external_ips(&self, n: u128) -> Vec<IpAddr> {
        self.external_ip_prefixes()
            .iter()
            .map(|p| p.host(n))
            .collect()
    }

    /// The demo's three Services, each with every pod as a ready endpoint:
    /// `web` (ClusterIP 10.96.0.10 port 80), `web-nodeport` (NodePort 30080) and
    /// `web-lb` (LoadBalancer, ingress IP .10 of the LB prefix, port 80, and an
    /// externalIP), TCP and UDP, IPv4 and IPv6, all to the pods' port 8080.
    pub fn demo_manifests(&self) -> Vec<(String, String)> {
        let pods: Vec<&Pod> = self.pods().collect();
        let web =
            ServiceSpec::new("web", "ClusterIP", self.cluster_ips(10)).tcp_udp("http", 80, None);
        let np = ServiceSpec::new("web-nodeport", "NodePort", self.cluster_ips(11)).tcp_udp(
            "http",
            80,
            Some(30080),
        );
        let mut lb = ServiceSpec::new("web-lb", "LoadBalancer", self.cluster_ips(12)).tcp_udp(
            "http",
            80,
            Some(30081),
        );
        lb.load_balancer_ips = self.lb_ips(10);
        lb.external_ips = self.external_ips(10);
        [web, np, lb]
            .iter()
            .map(|s| (format!("{}.yaml", s.name), service_yaml(s, &pods, &[])))
            .collect()
    }
}
