//! One Service and its EndpointSlices, on one node -> its ports (kube-proxy's
//! semantics).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointPort,
};

use super::{
    BackendSpec, Family, Frontend, FrontendKind, FrontendSpec, HealthCheckSpec, PortKey, PortSpec,
    Prefix, Proto, Scope, ServiceModel, Table,
    slice::{Address, EndpointTopology, Slice},
};
use crate::cluster::{NodeInfo, ObjectKey, Problem, ProblemKind};

/// Services with this label belong to another proxy.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (no virtual IP).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The annotation that asks the EndpointSlice controller for topology hints
/// by its own heuristic (`Auto`); it decides them, not `trafficDistribution`.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Whether lb leaves this Service alone: another proxy's (`service-proxy-name`
/// label), headless (label or `clusterIP: None`), or `type: ExternalName`.
pub fn is_ignored(svc: &Service) -> bool {
    if let Some(labels) = &svc.metadata.labels
        && (labels.contains_key(PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL))
    {
        return true;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return true;
    }
    let first_ip = spec
        .cluster_ips
        .as_ref()
        .and_then(|ips| ips.first())
        .or(spec.cluster_ip.as_ref());
    first_ip.is_some_and(|ip| ip == "None")
}

/// The desired state of one Service on the node `node`, from the Service and the
/// EndpointSlices that belong to it (the caller selects them by the
/// `kubernetes.io/service-name` label).
///
/// One [`PortKey`] per Service port and address family, in `spec.ports` order,
/// then family order. Ignored Services ([`is_ignored`]) have an empty model.
/// Input that cannot be used is skipped and reported in
/// [`ServiceModel::problems`]: a port with an unsupported protocol or a bad
/// number loses that port, an address that does not parse (or has a family the
/// Service does not have) loses that frontend or endpoint.
pub fn service_model(svc: &Service, slices: &[&Slice], node: &NodeInfo) -> ServiceModel {
    if is_ignored(svc) {
        return ServiceModel::default();
    }
    let Some(spec) = &svc.spec else {
        return ServiceModel::default();
    };
    let key = ObjectKey::of(&svc.metadata);
    let mut problems = Vec::new();

    let addrs = Addresses::of(svc, spec, &key, &mut problems);
    // Frontends follow `type`, whatever else the object still carries: a
    // Service changed from NodePort to ClusterIP may keep its `nodePort`
    // fields, one changed from LoadBalancer its ingress status, until their
    // controllers catch up; kube-proxy serves neither. externalIPs apply to
    // every type.
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (node_ports_apply, ingress_applies) = match kind {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        other => {
            problems.push(Problem::new(
                ProblemKind::Parse,
                Some(key.clone()),
                format!("type {other:?} is no Service type; served as ClusterIP"),
            ));
            (false, false)
        }
    };
    let source_ranges = source_ranges(spec, &key, &mut problems);
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let distribution = Distribution::of(svc, spec, &key, &mut problems);
    let slices: Vec<ParsedSlice<'_>> = slices
        .iter()
        .filter_map(|s| ParsedSlice::parse(s, node, distribution, &mut problems))
        .collect();

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let name = sp.name.as_deref().unwrap_or("");
        let problem = |kind, message: String| {
            Problem::new(kind, Some(key.clone()), format!("port {name:?}: {message}"))
        };
        let proto = match parse_proto(sp.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(other) => {
                problems.push(problem(
                    ProblemKind::UnsupportedProtocol,
                    format!("protocol {other} is not balanced; port skipped"),
                ));
                continue;
            }
        };
        let Some(port) = valid_port(sp.port) else {
            problems.push(problem(
                ProblemKind::BadPort,
                format!("port {} is outside 1..=65535; port skipped", sp.port),
            ));
            continue;
        };
        if !seen.insert((name, proto)) {
            problems.push(problem(
                ProblemKind::BadPort,
                format!("a second {proto} port named {name:?}; port skipped"),
            ));
            continue;
        }
        let node_port = match sp.node_port {
            None => None,
            Some(np) => {
                let valid = valid_port(np);
                if valid.is_none() {
                    problems.push(problem(
                        ProblemKind::BadPort,
                        format!("nodePort {np} is outside 1..=65535; no NodePort frontends"),
                    ));
                }
                valid
            }
        };

        for &family in &addrs.families {
            let mut frontends = BTreeMap::new();
            let mut add = |addr: IpAddr, port: u16, kind: FrontendKind| {
                let local = if kind.is_external() {
                    etp_local
                } else {
                    itp_local
                };
                let frontend = FrontendSpec {
                    kind,
                    scope: if local { Scope::Local } else { Scope::Cluster },
                    snat_remote: kind.is_external() && !local,
                };
                // The same address twice (an externalIP that is also an ingress
                // IP): the first kind, in this order, keeps it.
                frontends
                    .entry(Frontend { addr, port, proto })
                    .or_insert(frontend);
            };
            let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .copied()
                    .filter(|ip| Family::of(ip) == family)
                    .collect()
            };
            for ip in of_family(&addrs.cluster) {
                add(ip, port, FrontendKind::ClusterIp);
            }
            if let Some(np) = node_port.filter(|_| node_ports_apply) {
                for ip in of_family(&node.addresses) {
                    add(ip, np, FrontendKind::NodePort);
                }
            }
            for ip in of_family(&addrs.external) {
                add(ip, port, FrontendKind::ExternalIp);
            }
            if ingress_applies {
                for ip in of_family(&addrs.load_balancer) {
                    add(ip, port, FrontendKind::LoadBalancer);
                }
            }

            let endpoints = merge_endpoints(&slices, family, sp, proto);
            // Topology narrows the cluster-wide choice only: a Local policy
            // already keeps to this node (as kube-proxy does).
            let cluster = choose(
                endpoints.iter().map(|(a, e)| (*a, e)),
                Topology::of(&endpoints),
            );
            let any_local = frontends.values().any(|f| f.scope == Scope::Local);
            let local = any_local.then(|| {
                choose(
                    endpoints
                        .iter()
                        .filter(|(_, e)| e.local)
                        .map(|(a, e)| (*a, e)),
                    None,
                )
            });
            ports.push((
                PortKey {
                    service: key.clone(),
                    port_name: name.to_owned(),
                    proto,
                    family,
                },
                PortSpec {
                    draining: draining(&endpoints, &cluster, local.as_ref()),
                    frontends,
                    cluster,
                    local,
                    affinity_timeout,
                    source_ranges: source_ranges.as_ref().map(|all| {
                        all.iter()
                            .filter(|p| p.family() == family)
                            .copied()
                            .collect()
                    }),
                },
            ));
        }
    }
    let health_check = (ingress_applies && etp_local)
        .then_some(spec.health_check_node_port)
        .flatten()
        .and_then(valid_port)
        .map(|port| {
            // Per family, as kube-proxy counts them (a dual-stack pod is one
            // endpoint in each family's slice, not two).
            let count = |family: Family| {
                slices
                    .iter()
                    .filter(|s| s.family == family)
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|(_, e)| e.local && e.ready)
                    .map(|(ip, _)| *ip)
                    .collect::<BTreeSet<IpAddr>>()
                    .len()
            };
            HealthCheckSpec {
                port,
                local_endpoints: count(Family::V4).max(count(Family::V6)),
            }
        });
    ServiceModel {
        ports,
        problems,
        health_check,
    }
}

/// `loadBalancerSourceRanges` (None when it lists nothing). An entry that is
/// no CIDR is reported and allows nobody: the Service stays restricted to the
/// others, never opened.
fn source_ranges(
    spec: &ServiceSpec,
    key: &ObjectKey,
    problems: &mut Vec<Problem>,
) -> Option<Vec<Prefix>> {
    let listed = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty())?;
    let mut out = Vec::new();
    for r in listed {
        match Prefix::parse(r) {
            Some(p) => out.push(p),
            None => problems.push(Problem::new(
                ProblemKind::BadSourceRange,
                Some(key.clone()),
                format!(
                    "loadBalancerSourceRanges entry {r:?} is no CIDR; it allows nobody (the \
                     others still do)"
                ),
            )),
        }
    }
    Some(out)
}

/// A port number in 1..=65535.
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// `protocol` (default TCP) -> Proto, or the unsupported protocol's name.
fn parse_proto(protocol: Option<&str>) -> Result<Proto, &str> {
    match protocol {
        None | Some("TCP") => Ok(Proto::Tcp),
        Some("UDP") => Ok(Proto::Udp),
        Some(other) => Err(other),
    }
}

/// The Service's families and its parsed addresses (checked against the families).
struct Addresses {
    families: Vec<Family>,
    cluster: Vec<IpAddr>,
    external: Vec<IpAddr>,
    load_balancer: Vec<IpAddr>,
}

impl Addresses {
    fn of(svc: &Service, spec: &ServiceSpec, key: &ObjectKey, problems: &mut Vec<Problem>) -> Self {
        let mut bad = |what: &str, addr: &str, why: &str| {
            problems.push(Problem::new(
                ProblemKind::BadAddress,
                Some(key.clone()),
                format!("{what} {addr:?} {why}; skipped"),
            ));
        };

        let cluster_strs: Vec<&String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter(),
            _ => spec.cluster_ip.as_slice().iter(),
        }
        .filter(|s| !s.is_empty() && *s != "None")
        .collect();

        let mut families = Vec::new();
        match &spec.ip_families {
            Some(fams) if !fams.is_empty() => {
                for f in fams {
                    let family = match f.as_str() {
                        "IPv4" => Family::V4,
                        "IPv6" => Family::V6,
                        other => {
                            bad("ipFamily", other, "is not IPv4 or IPv6");
                            continue;
                        }
                    };
                    if !families.contains(&family) {
                        families.push(family);
                    }
                }
            }
            _ => {
                for ip in cluster_strs.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
                    let family = Family::of(&ip);
                    if !families.contains(&family) {
                        families.push(family);
                    }
                }
            }
        }

        let mut parse_list = |what: &str, strs: &mut dyn Iterator<Item = &String>| {
            let mut out = Vec::new();
            for s in strs {
                match s.parse::<IpAddr>() {
                    Ok(ip) if families.contains(&Family::of(&ip)) => out.push(ip),
                    Ok(_) => bad(what, s, "is of a family the Service does not have"),
                    Err(_) => bad(what, s, "does not parse"),
                }
            }
            out
        };
        let cluster = parse_list("clusterIP", &mut cluster_strs.into_iter());
        let external = parse_list("externalIP", &mut spec.external_ips.iter().flatten());
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // ipMode Proxy: the load balancer proxies, traffic arrives at the
            // NodePort; the ingress IP itself is not ours to answer on.
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref());
        let load_balancer = parse_list("loadBalancer ingress IP", &mut ingress.into_iter());

        Self {
            families,
            cluster,
            external,
            load_balancer,
        }
    }
}

/// An endpoint's address and conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// Its node hints: None without any, else whether they name this node.
    for_node: Option<bool>,
    /// Its zone hints: None without any, else whether they name this node's
    /// zone.
    for_zone: Option<bool>,
}

/// `spec.trafficDistribution`, when the Service's slices may be read by it
/// (see [`Distribution::hints`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Distribution {
    /// `PreferClose` (and its newer name `PreferSameZone`).
    SameZone,
    /// `PreferSameNode`.
    SameNode,
}

impl Distribution {
    /// None: no trafficDistribution, one lb does not know (reported), or the
    /// topology-mode annotation, whose controller heuristic decides the
    /// hints (it may withhold them on purpose).
    fn of(
        svc: &Service,
        spec: &ServiceSpec,
        key: &ObjectKey,
        problems: &mut Vec<Problem>,
    ) -> Option<Self> {
        let d = match spec.traffic_distribution.as_deref()? {
            "PreferClose" | "PreferSameZone" => Self::SameZone,
            "PreferSameNode" => Self::SameNode,
            other => {
                problems.push(Problem::new(
                    ProblemKind::Parse,
                    Some(key.clone()),
                    format!(
                        "trafficDistribution {other:?} is not known (PreferClose, \
                         PreferSameZone and PreferSameNode are); endpoints are chosen by their \
                         hints alone"
                    ),
                ));
                return None;
            }
        };
        let annotated = svc
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(TOPOLOGY_MODE_ANNOTATION));
        (!annotated).then_some(d)
    }

    /// The hints an endpoint has, as they concern `node`: (for_node,
    /// for_zone). An endpoint's own hints are kube-proxy's whole input. One
    /// without hints, of a Service with a trafficDistribution, gets the hints
    /// the EndpointSlice controller would give it (its own zone; with
    /// PreferSameNode also its own node): in Kubernetes mode the controller
    /// has given them already, a manifest directory has no controller.
    fn hints(
        this: Option<Self>,
        topology: Option<&EndpointTopology>,
        endpoint_node: Option<&str>,
        node: &NodeInfo,
    ) -> (Option<bool>, Option<bool>) {
        let zone = node.zone.as_deref();
        let t = topology.cloned().unwrap_or_default();
        let for_node = if !t.for_nodes.is_empty() {
            Some(t.for_nodes.iter().any(|n| **n == *node.name))
        } else if this == Some(Self::SameNode) {
            endpoint_node.map(|n| n == node.name)
        } else {
            None
        };
        let for_zone = if !t.for_zones.is_empty() {
            Some(zone.is_some_and(|z| t.for_zones.iter().any(|h| **h == *z)))
        } else if this.is_some() {
            t.zone.as_deref().map(|ez| zone == Some(ez))
        } else {
            None
        };
        (for_node, for_zone)
    }
}

/// How topology narrows a Service port's cluster-wide endpoints
/// (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Endpoints hinted for this node.
    SameNode,
    /// Endpoints hinted for this node's zone.
    SameZone,
}

impl Topology {
    /// Node hints when every ready endpoint has some and one is for this
    /// node; else zone hints, likewise; else none (all endpoints, as when an
    /// endpoint lacks hints, the node has no zone, or no endpoint is hinted
    /// for it).
    fn of(endpoints: &BTreeMap<SocketAddr, Endpoint>) -> Option<Self> {
        let ready = || endpoints.values().filter(|e| e.ready);
        let usable = |hint: fn(&Endpoint) -> Option<bool>| {
            ready().all(|e| hint(e).is_some()) && ready().any(|e| hint(e) == Some(true))
        };
        if usable(|e| e.for_node) {
            Some(Self::SameNode)
        } else if usable(|e| e.for_zone) {
            Some(Self::SameZone)
        } else {
            None
        }
    }

    fn admits(self, e: &Endpoint) -> bool {
        match self {
            Self::SameNode => e.for_node == Some(true),
            Self::SameZone => e.for_zone == Some(true),
        }
    }
}

impl Endpoint {
    /// Which of two entries for the same address wins: ready, then serving,
    /// then not terminating (then local, so that the choice does not depend on
    /// slice order).
    fn rank(self) -> (bool, bool, bool, bool) {
        (self.ready, self.serving, !self.terminating, self.local)
    }
}

/// An IPv4 or IPv6 EndpointSlice, its endpoints parsed once for all Service ports.
struct ParsedSlice<'a> {
    family: Family,
    ports: &'a [EndpointPort],
    endpoints: Vec<(IpAddr, Endpoint)>,
}

impl<'a> ParsedSlice<'a> {
    fn parse(
        slice: &'a Slice,
        node: &NodeInfo,
        distribution: Option<Distribution>,
        problems: &mut Vec<Problem>,
    ) -> Option<Self> {
        let family = match &*slice.address_type {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            _ => return None, // FQDN: not for a proxy
        };
        let key = &slice.key;
        let mut endpoints = Vec::new();
        for ep in &slice.endpoints {
            let ip = match &ep.address {
                Address::Ip(ip) if Family::of(ip) == family => *ip,
                Address::Ip(ip) => {
                    problems.push(Problem::new(
                        ProblemKind::BadAddress,
                        Some(key.clone()),
                        format!("endpoint {:?} is not {family}; skipped", ip.to_string()),
                    ));
                    continue;
                }
                Address::Unparsed(addr) => {
                    problems.push(Problem::new(
                        ProblemKind::BadAddress,
                        Some(key.clone()),
                        format!("endpoint {addr:?} does not parse; skipped"),
                    ));
                    continue;
                }
                Address::Missing => continue,
            };
            let ready = ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(ready);
            let terminating = ep.terminating.unwrap_or(false);
            let local = ep.node_name.as_deref() == Some(node.name.as_str());
            let (for_node, for_zone) = Distribution::hints(
                distribution,
                ep.topology.as_deref(),
                ep.node_name.as_deref(),
                node,
            );
            endpoints.push((
                ip,
                Endpoint {
                    ready,
                    serving,
                    terminating,
                    local,
                    for_node,
                    for_zone,
                },
            ));
        }
        let ports = &*slice.ports;
        for p in ports {
            if let Some(n) = p.port
                && valid_port(n).is_none()
            {
                problems.push(Problem::new(
                    ProblemKind::BadPort,
                    Some(key.clone()),
                    format!(
                        "port {:?} number {n} is outside 1..=65535; skipped",
                        p.name.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        Some(Self {
            family,
            ports,
            endpoints,
        })
    }

    /// The port this slice gives the Service port (matched by name and
    /// protocol), if it has a usable one.
    fn port_for(&self, name: &str, proto: Proto) -> Option<u16> {
        let p = self.ports.iter().find(|p| {
            p.name.as_deref().unwrap_or("") == name
                && parse_proto(p.protocol.as_deref()) == Ok(proto)
        })?;
        valid_port(p.port?)
    }
}

/// Every endpoint of `family` for the Service port `sp`, across slices,
/// de-duplicated by socket address.
fn merge_endpoints(
    slices: &[ParsedSlice<'_>],
    family: Family,
    sp: &ServicePort,
    proto: Proto,
) -> BTreeMap<SocketAddr, Endpoint> {
    let name = sp.name.as_deref().unwrap_or("");
    let mut merged: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(port) = slice.port_for(name, proto) else {
            continue;
        };
        for &(ip, ep) in &slice.endpoints {
            merged
                .entry(SocketAddr::new(ip, port))
                .and_modify(|old| {
                    if ep.rank() > old.rank() {
                        *old = ep;
                    }
                })
                .or_insert(ep);
        }
    }
    merged
}

/// The serving endpoints that neither table has: their flows may go on (as
/// kube-proxy's conntrack lets them), new flows do not go to them.
fn draining(
    endpoints: &BTreeMap<SocketAddr, Endpoint>,
    cluster: &Table,
    local: Option<&Table>,
) -> BTreeSet<BackendSpec> {
    let chosen = |a: &SocketAddr| {
        cluster
            .backends
            .iter()
            .chain(local.into_iter().flat_map(|t| t.backends.iter()))
            .any(|b| b.addr == *a)
    };
    endpoints
        .iter()
        .filter(|(a, e)| e.serving && !chosen(a))
        .map(|(addr, e)| BackendSpec {
            addr: *addr,
            local: e.local,
            terminating: e.terminating,
        })
        .collect()
}

/// kube-proxy's choice: the ready endpoints (those `topology` admits); when
/// none is ready, the serving and terminating ones (topology was already
/// given up when none for it is ready, see [`Topology::of`]).
fn choose<'e>(
    endpoints: impl Iterator<Item = (SocketAddr, &'e Endpoint)> + Clone,
    topology: Option<Topology>,
) -> Table {
    let backend = |(addr, e): (SocketAddr, &Endpoint)| BackendSpec {
        addr,
        local: e.local,
        terminating: e.terminating,
    };
    let ready: BTreeSet<BackendSpec> = endpoints
        .clone()
        .filter(|(_, e)| e.ready && topology.is_none_or(|t| t.admits(e)))
        .map(backend)
        .collect();
    if !ready.is_empty() {
        return Table {
            backends: ready,
            terminating_fallback: false,
        };
    }
    let fallback: BTreeSet<BackendSpec> = endpoints
        .filter(|(_, e)| e.serving && e.terminating)
        .map(backend)
        .collect();
    Table {
        terminating_fallback: !fallback.is_empty(),
        backends: fallback,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml_ng::from_str(yaml).expect("Service YAML")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml_ng::from_str(yaml).expect("EndpointSlice YAML")
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addresses: vec![
                "192.168.1.10".parse().unwrap(),
                "fd00:1::10".parse().unwrap(),
                "192.168.2.10".parse().unwrap(),
            ],
            zone: Some("z1".into()),
        }
    }

    fn model(svc: &Service, slices: &[EndpointSlice]) -> ServiceModel {
        let slices: Vec<Slice> = slices.iter().map(Slice::from).collect();
        let refs: Vec<&Slice> = slices.iter().collect();
        service_model(svc, &refs, &node())
    }

    fn key(name: &str, port: &str, proto: Proto, family: Family) -> PortKey {
        PortKey {
            service: ObjectKey::new("default", name),
            port_name: port.into(),
            proto,
            family,
        }
    }

    /// The spec of one port, which must be there.
    fn port<'m>(m: &'m ServiceModel, key: &PortKey) -> &'m PortSpec {
        m.ports
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no port {key} in {:?}", m.ports))
    }

    fn fe(addr: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    fn spec(kind: FrontendKind, scope: Scope, snat_remote: bool) -> FrontendSpec {
        FrontendSpec {
            kind,
            scope,
            snat_remote,
        }
    }

    /// A table's backends as `addr:port` strings with `L` (local) and `T`
    /// (terminating) markers, e.g. `10.0.1.1:8080 L`.
    fn backends(t: &Table) -> Vec<String> {
        t.backends
            .iter()
            .map(|b| {
                let mut s = b.addr.to_string();
                if b.local || b.terminating {
                    s.push(' ');
                }
                if b.local {
                    s.push('L');
                }
                if b.terminating {
                    s.push('T');
                }
                s
            })
            .collect()
    }

    fn kinds(m: &ServiceModel) -> Vec<ProblemKind> {
        m.problems.iter().map(|p| p.kind).collect()
    }

    const WEB: &str = "
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
";

    const WEB_SLICE: &str = "
metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.1.1], nodeName: node-a, conditions: {ready: true}}
- {addresses: [10.0.2.1], nodeName: node-b}
";

    #[test]
    fn cluster_ip_service() {
        let m = model(&svc(WEB), &[slice(WEB_SLICE)]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        assert_eq!(m.ports.len(), 1);
        let k = key("web", "http", Proto::Tcp, Family::V4);
        assert_eq!(m.ports[0].0, k);
        let p = port(&m, &k);
        assert_eq!(
            p.frontends,
            BTreeMap::from([(
                fe("10.96.0.10", 80, Proto::Tcp),
                spec(FrontendKind::ClusterIp, Scope::Cluster, false)
            )])
        );
        assert_eq!(backends(&p.cluster), ["10.0.1.1:8080 L", "10.0.2.1:8080"]);
        assert!(!p.cluster.terminating_fallback);
        assert_eq!(p.local, None);
        assert_eq!(p.affinity_timeout, None);
    }

    #[test]
    fn no_slices_means_no_backends() {
        let m = model(&svc(WEB), &[]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(p.frontends.len(), 1);
        assert!(p.cluster.backends.is_empty());
        assert!(!p.cluster.terminating_fallback);
    }

    #[test]
    fn node_port_on_every_node_address_of_the_family() {
        let s = svc("
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
");
        let m = model(&s, &[]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let ext = spec(FrontendKind::NodePort, Scope::Cluster, true);
        let http = port(&m, &key("np", "http", Proto::Tcp, Family::V4));
        assert_eq!(
            http.frontends,
            BTreeMap::from([
                (
                    fe("10.96.0.11", 80, Proto::Tcp),
                    spec(FrontendKind::ClusterIp, Scope::Cluster, false)
                ),
                (fe("192.168.1.10", 30080, Proto::Tcp), ext),
                (fe("192.168.2.10", 30080, Proto::Tcp), ext),
            ])
        );
        let dns = port(&m, &key("np", "dns", Proto::Udp, Family::V4));
        assert_eq!(
            dns.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("10.96.0.11", 53, Proto::Udp),
                fe("192.168.1.10", 30053, Proto::Udp),
                fe("192.168.2.10", 30053, Proto::Udp),
            ]
        );
    }

    #[test]
    fn load_balancer_and_external_ips() {
        let s = svc("
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  externalIPs: [203.0.113.5]
  ports:
  - {name: http, port: 80, nodePort: 30081}
  - {name: https, port: 443}
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.7}
    - {ip: 198.51.100.8, ipMode: Proxy}
    - {hostname: lb.example.com}
    - {ip: 203.0.113.5, ipMode: VIP}
");
        let m = model(&s, &[]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let ext = |kind| spec(kind, Scope::Cluster, true);
        let http = port(&m, &key("lb", "http", Proto::Tcp, Family::V4));
        assert_eq!(
            http.frontends,
            BTreeMap::from([
                (
                    fe("10.96.0.12", 80, Proto::Tcp),
                    spec(FrontendKind::ClusterIp, Scope::Cluster, false)
                ),
                (
                    fe("192.168.1.10", 30081, Proto::Tcp),
                    ext(FrontendKind::NodePort)
                ),
                (
                    fe("192.168.2.10", 30081, Proto::Tcp),
                    ext(FrontendKind::NodePort)
                ),
                // Both an externalIP and an ingress IP: the externalIP kind stays.
                (
                    fe("203.0.113.5", 80, Proto::Tcp),
                    ext(FrontendKind::ExternalIp)
                ),
                (
                    fe("198.51.100.7", 80, Proto::Tcp),
                    ext(FrontendKind::LoadBalancer)
                ),
            ])
        );
        // No nodePort (allocateLoadBalancerNodePorts: false): no NodePort frontends.
        let https = port(&m, &key("lb", "https", Proto::Tcp, Family::V4));
        assert_eq!(
            https.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("10.96.0.12", 443, Proto::Tcp),
                fe("198.51.100.7", 443, Proto::Tcp),
                fe("203.0.113.5", 443, Proto::Tcp),
            ]
        );
    }

    #[test]
    fn external_ips_on_a_cluster_ip_service() {
        let s = svc("
metadata: {name: ext, namespace: default}
spec:
  clusterIP: 10.96.0.13
  externalIPs: [203.0.113.9]
  ports: [{port: 8000}]
");
        let m = model(&s, &[]);
        let p = port(&m, &key("ext", "", Proto::Tcp, Family::V4));
        assert_eq!(
            p.frontends[&fe("203.0.113.9", 8000, Proto::Tcp)],
            spec(FrontendKind::ExternalIp, Scope::Cluster, true)
        );
        assert_eq!(p.frontends.len(), 2);
    }

    #[test]
    fn dual_stack() {
        let s = svc("
metadata: {name: ds, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6, IPv4]
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.14]
  externalIPs: [203.0.113.1, 2001:db8::1]
  ports: [{name: http, port: 80, nodePort: 30082}]
");
        let v4 = slice(
            "
metadata: {name: ds-v4, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.1], nodeName: node-a}]
",
        );
        let v6 = slice(
            "
metadata: {name: ds-v6, namespace: default}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ['fd00:10::1'], nodeName: node-b}
- {addresses: ['fd00:10::2'], nodeName: node-a}
",
        );
        let m = model(&s, &[v4, v6]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let k4 = key("ds", "http", Proto::Tcp, Family::V4);
        let k6 = key("ds", "http", Proto::Tcp, Family::V6);
        // Family order follows spec.ipFamilies.
        assert_eq!(
            m.ports.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            [k6.clone(), k4.clone()]
        );
        let p4 = port(&m, &k4);
        assert_eq!(
            p4.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("10.96.0.14", 80, Proto::Tcp),
                fe("192.168.1.10", 30082, Proto::Tcp),
                fe("192.168.2.10", 30082, Proto::Tcp),
                fe("203.0.113.1", 80, Proto::Tcp),
            ]
        );
        assert_eq!(backends(&p4.cluster), ["10.0.1.1:8080 L"]);
        let p6 = port(&m, &k6);
        assert_eq!(
            p6.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("2001:db8::1", 80, Proto::Tcp),
                fe("fd00::10", 80, Proto::Tcp),
                fe("fd00:1::10", 30082, Proto::Tcp),
            ]
        );
        assert_eq!(
            backends(&p6.cluster),
            ["[fd00:10::1]:8080", "[fd00:10::2]:8080 L"]
        );
    }

    #[test]
    fn families_from_cluster_ips_when_ip_families_unset() {
        let s = svc("
metadata: {name: six, namespace: default}
spec:
  clusterIP: fd00::20
  ports: [{port: 80}]
");
        let m = model(&s, &[]);
        assert_eq!(m.ports.len(), 1);
        assert_eq!(m.ports[0].0, key("six", "", Proto::Tcp, Family::V6));
        assert_eq!(
            m.ports[0].1.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("fd00::20", 80, Proto::Tcp)]
        );
    }

    #[test]
    fn named_ports_resolve_through_each_slice() {
        let s = svc("
metadata: {name: multi, namespace: default}
spec:
  clusterIP: 10.96.0.15
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9090, targetPort: prom}
");
        // Two pod generations with different container ports; the second slice
        // has no metrics port, so it contributes nothing to that Service port.
        let a = slice(
            "
metadata: {name: multi-a, namespace: default}
addressType: IPv4
ports: [{name: metrics, port: 9100}, {name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.1]}]
",
        );
        let b = slice(
            "
metadata: {name: multi-b, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.0.1.2]}]
",
        );
        let m = model(&s, &[a, b]);
        let http = port(&m, &key("multi", "http", Proto::Tcp, Family::V4));
        assert_eq!(backends(&http.cluster), ["10.0.1.1:8080", "10.0.1.2:8081"]);
        let metrics = port(&m, &key("multi", "metrics", Proto::Tcp, Family::V4));
        assert_eq!(backends(&metrics.cluster), ["10.0.1.1:9100"]);
    }

    #[test]
    fn unnamed_port_matches_unnamed_slice_port() {
        let s = svc("
metadata: {name: plain, namespace: default}
spec:
  clusterIP: 10.96.0.16
  ports: [{port: 80, targetPort: 8080}]
");
        // No name and an empty name are the same port.
        let a = slice(
            "
metadata: {name: plain-a, namespace: default}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.1]}]
",
        );
        let b = slice(
            "
metadata: {name: plain-b, namespace: default}
addressType: IPv4
ports: [{name: '', port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.1.2]}]
",
        );
        let named = slice(
            "
metadata: {name: plain-c, namespace: default}
addressType: IPv4
ports: [{name: other, port: 8080}]
endpoints: [{addresses: [10.0.1.3]}]
",
        );
        let m = model(&s, &[a, b, named]);
        let p = port(&m, &key("plain", "", Proto::Tcp, Family::V4));
        assert_eq!(backends(&p.cluster), ["10.0.1.1:8080", "10.0.1.2:8080"]);
    }

    #[test]
    fn renumbered_port_keeps_its_key() {
        let before = model(&svc(WEB), &[slice(WEB_SLICE)]);
        let after = model(
            &svc(&WEB.replace("port: 80,", "port: 8000,")),
            &[slice(WEB_SLICE)],
        );
        assert_eq!(before.ports.len(), 1);
        assert_eq!(after.ports.len(), 1);
        assert_eq!(before.ports[0].0, after.ports[0].0);
        assert_eq!(
            after.ports[0]
                .1
                .frontends
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [fe("10.96.0.10", 8000, Proto::Tcp)]
        );
        assert_eq!(before.ports[0].1.cluster, after.ports[0].1.cluster);
    }

    #[test]
    fn same_port_number_tcp_and_udp() {
        let s = svc("
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
");
        // A slice port matches by name and protocol.
        let sl = slice(
            "
metadata: {name: dns-a, namespace: kube-system}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: TCP}
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 54, protocol: TCP}
endpoints: [{addresses: [10.0.0.2]}]
",
        );
        let m = model(&s, &[sl]);
        let k = |name: &str, proto| PortKey {
            service: ObjectKey::new("kube-system", "dns"),
            port_name: name.into(),
            proto,
            family: Family::V4,
        };
        assert_eq!(m.ports.len(), 2);
        let udp = port(&m, &k("dns", Proto::Udp));
        assert_eq!(
            udp.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.53", 53, Proto::Udp)]
        );
        assert_eq!(backends(&udp.cluster), ["10.0.0.2:53"]);
        let tcp = port(&m, &k("dns-tcp", Proto::Tcp));
        assert_eq!(
            tcp.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.53", 53, Proto::Tcp)]
        );
        assert_eq!(backends(&tcp.cluster), ["10.0.0.2:54"]);
    }

    const MERGE_A: &str = "
metadata: {name: web-1, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], conditions: {ready: false, serving: false}}
- {addresses: [10.0.1.2]}
";
    const MERGE_B: &str = "
metadata: {name: web-2, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], nodeName: node-a, conditions: {ready: true}}
- {addresses: [10.0.1.2]}
- {addresses: [10.0.1.3]}
";

    #[test]
    fn slices_merge_and_deduplicate_preferring_ready() {
        let k = key("web", "http", Proto::Tcp, Family::V4);
        for (i, order) in [[MERGE_A, MERGE_B], [MERGE_B, MERGE_A]]
            .into_iter()
            .enumerate()
        {
            let m = model(&svc(WEB), &[slice(order[0]), slice(order[1])]);
            let p = port(&m, &k);
            assert_eq!(
                backends(&p.cluster),
                ["10.0.1.1:8080 L", "10.0.1.2:8080", "10.0.1.3:8080"],
                "slice order {i}"
            );
        }
    }

    #[test]
    fn unready_endpoints_are_skipped() {
        let sl = slice(
            "
metadata: {name: web-u, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], conditions: {ready: false}}
- {addresses: [10.0.1.2], conditions: {ready: false, serving: true}}
- {addresses: [10.0.1.3], conditions: {}}
- {addresses: [10.0.1.4]}
",
        );
        let m = model(&svc(WEB), &[sl]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        // Missing conditions mean ready; unready (even serving, not terminating)
        // ones are not used and do not trigger the fallback.
        assert_eq!(backends(&p.cluster), ["10.0.1.3:8080", "10.0.1.4:8080"]);
        assert!(!p.cluster.terminating_fallback);

        let none_ready = slice(
            "
metadata: {name: web-u, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], conditions: {ready: false}}
- {addresses: [10.0.1.2], conditions: {ready: false, serving: true}}
",
        );
        let m = model(&svc(WEB), &[none_ready]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert!(p.cluster.backends.is_empty(), "{:?}", p.cluster);
        assert!(!p.cluster.terminating_fallback);
    }

    const TERMINATING: &str = "
metadata: {name: web-t, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.1.2], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.2.1], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
";

    #[test]
    fn terminating_fallback_only_when_none_is_ready() {
        let k = key("web", "http", Proto::Tcp, Family::V4);
        let m = model(&svc(WEB), &[slice(TERMINATING)]);
        let p = port(&m, &k);
        assert_eq!(
            backends(&p.cluster),
            ["10.0.1.1:8080 LT", "10.0.2.1:8080 T"]
        );
        assert!(p.cluster.terminating_fallback);

        let ready = slice(
            "
metadata: {name: web-r, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.3.1], nodeName: node-c}]
",
        );
        let m = model(&svc(WEB), &[slice(TERMINATING), ready]);
        let p = port(&m, &k);
        assert_eq!(backends(&p.cluster), ["10.0.3.1:8080"]);
        assert!(!p.cluster.terminating_fallback);
        // The serving, terminating ones drain: in the backends map for their
        // flows, in no table. The one that stopped serving is gone.
        let draining = Table {
            backends: p.draining.clone(),
            terminating_fallback: false,
        };
        assert_eq!(backends(&draining), ["10.0.1.1:8080 LT", "10.0.2.1:8080 T"]);
        let all: BTreeSet<String> = p.all_backends().map(|b| b.addr.to_string()).collect();
        assert_eq!(all.len(), 3, "{all:?}");
    }

    const LOCAL_POLICIES: &str = "
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: ETP
  internalTrafficPolicy: ITP
  ports: [{name: http, port: 80, nodePort: 30080}]
";

    /// Three endpoints: 10.0.1.1 on node-a in z1, 10.0.2.1 on node-b in z1,
    /// 10.0.3.1 on node-c in z2 (this node is node-a in z1). `HINTS` is
    /// replaced per endpoint.
    fn zoned(hints: [&str; 3]) -> EndpointSlice {
        slice(&format!(
            "
metadata: {{name: web-z, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.0.1.1], nodeName: node-a, zone: z1 {}}}
- {{addresses: [10.0.2.1], nodeName: node-b, zone: z1 {}}}
- {{addresses: [10.0.3.1], nodeName: node-c, zone: z2 {}}}
",
            hints[0], hints[1], hints[2]
        ))
    }

    fn distributed(distribution: &str) -> Service {
        svc(&format!("{WEB}  trafficDistribution: {distribution}\n"))
    }

    fn cluster_of(svc: &Service, slices: &[EndpointSlice]) -> Vec<String> {
        let m = model(svc, slices);
        backends(&port(&m, &key("web", "http", Proto::Tcp, Family::V4)).cluster)
    }

    const FOR_Z1: &str = ", hints: {forZones: [{name: z1}]}";
    const FOR_Z2: &str = ", hints: {forZones: [{name: z2}]}";

    #[test]
    fn zone_hints_keep_cluster_traffic_in_the_zone() {
        // The hints alone decide (kube-proxy reads no trafficDistribution).
        assert_eq!(
            cluster_of(&svc(WEB), &[zoned([FOR_Z1, FOR_Z1, FOR_Z2])]),
            ["10.0.1.1:8080 L", "10.0.2.1:8080"]
        );
        // The ones left out stay for the flows they have.
        let m = model(&svc(WEB), &[zoned([FOR_Z1, FOR_Z1, FOR_Z2])]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(p.draining.len(), 1);
        // A Local policy keeps to the node's own endpoints, hints or not.
        let m = model(
            &policies("Cluster", "Local"),
            &[zoned([FOR_Z2, FOR_Z2, FOR_Z2])],
        );
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(backends(p.local.as_ref().unwrap()), ["10.0.1.1:8080 L"]);
    }

    #[test]
    fn zone_hints_fall_back_to_all_endpoints() {
        let all = ["10.0.1.1:8080 L", "10.0.2.1:8080", "10.0.3.1:8080"];
        // One ready endpoint without hints.
        assert_eq!(cluster_of(&svc(WEB), &[zoned([FOR_Z1, "", FOR_Z2])]), all);
        // No endpoint for this zone.
        assert_eq!(
            cluster_of(&svc(WEB), &[zoned([FOR_Z2, FOR_Z2, FOR_Z2])]),
            all
        );
        // The node has no zone.
        let slices: Vec<Slice> = [zoned([FOR_Z1, FOR_Z1, FOR_Z2])]
            .iter()
            .map(Slice::from)
            .collect();
        let refs: Vec<&Slice> = slices.iter().collect();
        let zoneless = NodeInfo {
            zone: None,
            ..node()
        };
        let m = service_model(&svc(WEB), &refs, &zoneless);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(backends(&p.cluster), all);
        // An unready endpoint without hints does not count.
        let mut s = zoned([FOR_Z1, "", FOR_Z2]);
        s.endpoints.as_mut().unwrap()[1].conditions = Some(Default::default());
        s.endpoints.as_mut().unwrap()[1]
            .conditions
            .as_mut()
            .unwrap()
            .ready = Some(false);
        assert_eq!(cluster_of(&svc(WEB), &[s]), ["10.0.1.1:8080 L"]);
    }

    #[test]
    fn zone_hints_give_way_to_terminating_endpoints_only_when_none_is_ready() {
        let mut s = zoned([FOR_Z1, FOR_Z1, FOR_Z2]);
        for ep in s.endpoints.as_mut().unwrap() {
            ep.conditions = Some(k8s_openapi::api::discovery::v1::EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
            });
        }
        let m = model(&svc(WEB), &[s]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert!(p.cluster.terminating_fallback);
        assert_eq!(p.cluster.backends.len(), 3);
    }

    #[test]
    fn traffic_distribution_hints_unhinted_slices_as_the_controller_would() {
        // A manifest directory has no EndpointSlice controller: PreferClose
        // reads each endpoint's zone as its hint.
        let z1 = ["10.0.1.1:8080 L", "10.0.2.1:8080"];
        assert_eq!(
            cluster_of(&distributed("PreferClose"), &[zoned(["", "", ""])]),
            z1
        );
        assert_eq!(
            cluster_of(&distributed("PreferSameZone"), &[zoned(["", "", ""])]),
            z1
        );
        // PreferSameNode: this node's endpoint.
        assert_eq!(
            cluster_of(&distributed("PreferSameNode"), &[zoned(["", "", ""])]),
            ["10.0.1.1:8080 L"]
        );
        // Given hints win over the zone.
        assert_eq!(
            cluster_of(
                &distributed("PreferClose"),
                &[zoned([FOR_Z2, FOR_Z2, FOR_Z1])]
            ),
            ["10.0.3.1:8080"]
        );
        // Without trafficDistribution, zones alone mean nothing.
        assert_eq!(cluster_of(&svc(WEB), &[zoned(["", "", ""])]).len(), 3);
        // With the topology-mode annotation its heuristic decides the hints.
        let auto = svc(&format!(
            "{}  trafficDistribution: PreferClose\n",
            WEB.replace(
                "namespace: default}",
                "namespace: default, annotations: {service.kubernetes.io/topology-mode: Auto}}"
            )
        ));
        assert_eq!(cluster_of(&auto, &[zoned(["", "", ""])]).len(), 3);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let both = |node: &str, zone: &str| -> String {
            format!(", hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}")
        };
        let s = zoned([
            &both("node-a", "z1"),
            &both("node-b", "z1"),
            &both("node-c", "z2"),
        ]);
        assert_eq!(cluster_of(&svc(WEB), &[s]), ["10.0.1.1:8080 L"]);
        // No node hint for this node: the zone hints.
        let s = zoned([
            &both("node-x", "z1"),
            &both("node-b", "z1"),
            &both("node-c", "z2"),
        ]);
        assert_eq!(
            cluster_of(&svc(WEB), &[s]),
            ["10.0.1.1:8080 L", "10.0.2.1:8080"]
        );
    }

    #[test]
    fn an_unknown_traffic_distribution_is_reported() {
        let m = model(&distributed("PreferFar"), &[zoned(["", "", ""])]);
        assert_eq!(kinds(&m), [ProblemKind::Parse]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(p.cluster.backends.len(), 3);
    }

    fn policies(etp: &str, itp: &str) -> Service {
        svc(&LOCAL_POLICIES.replace("ETP", etp).replace("ITP", itp))
    }

    #[test]
    fn external_traffic_policy_local() {
        let m = model(&policies("Local", "Cluster"), &[slice(WEB_SLICE)]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(
            p.frontends[&fe("10.96.0.10", 80, Proto::Tcp)],
            spec(FrontendKind::ClusterIp, Scope::Cluster, false)
        );
        assert_eq!(
            p.frontends[&fe("192.168.1.10", 30080, Proto::Tcp)],
            spec(FrontendKind::NodePort, Scope::Local, false)
        );
        assert_eq!(backends(&p.cluster), ["10.0.1.1:8080 L", "10.0.2.1:8080"]);
        let local = p.local.as_ref().expect("a local table");
        assert_eq!(backends(local), ["10.0.1.1:8080 L"]);
        assert!(!local.terminating_fallback);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let m = model(&policies("Cluster", "Local"), &[slice(WEB_SLICE)]);
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(
            p.frontends[&fe("10.96.0.10", 80, Proto::Tcp)],
            spec(FrontendKind::ClusterIp, Scope::Local, false)
        );
        assert_eq!(
            p.frontends[&fe("192.168.1.10", 30080, Proto::Tcp)],
            spec(FrontendKind::NodePort, Scope::Cluster, true)
        );
        assert_eq!(
            backends(p.local.as_ref().expect("a local table")),
            ["10.0.1.1:8080 L"]
        );

        // Both Cluster: no local table.
        let m = model(&policies("Cluster", "Cluster"), &[slice(WEB_SLICE)]);
        assert_eq!(m.ports[0].1.local, None);
    }

    #[test]
    fn local_scope_without_local_endpoints_is_empty() {
        let remote_only = slice(
            "
metadata: {name: web-r, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.2.1], nodeName: node-b}]
",
        );
        let m = model(&policies("Local", "Cluster"), &[remote_only]);
        let p = &m.ports[0].1;
        assert_eq!(backends(&p.cluster), ["10.0.2.1:8080"]);
        assert_eq!(p.local, Some(Table::default()));
    }

    #[test]
    fn terminating_fallback_per_scope() {
        // Remote ready endpoint, local ones only terminating: the cluster table
        // takes the ready one, the local table falls back to the local serving
        // terminating one.
        let remote_ready = slice(
            "
metadata: {name: web-r, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.3.1], nodeName: node-c}]
",
        );
        let m = model(
            &policies("Local", "Cluster"),
            &[slice(TERMINATING), remote_ready],
        );
        let p = &m.ports[0].1;
        assert_eq!(backends(&p.cluster), ["10.0.3.1:8080"]);
        assert!(!p.cluster.terminating_fallback);
        let local = p.local.as_ref().unwrap();
        assert_eq!(backends(local), ["10.0.1.1:8080 LT"]);
        assert!(local.terminating_fallback);

        // A local ready one: the local table does not fall back.
        let local_ready = slice(
            "
metadata: {name: web-l, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.9], nodeName: node-a}]
",
        );
        let m = model(
            &policies("Cluster", "Local"),
            &[slice(TERMINATING), local_ready],
        );
        let local = m.ports[0].1.local.as_ref().unwrap();
        assert_eq!(backends(local), ["10.0.1.9:8080 L"]);
        assert!(!local.terminating_fallback);
        assert_eq!(backends(&m.ports[0].1.cluster), ["10.0.1.9:8080 L"]);
    }

    #[test]
    fn ignored_services() {
        let sl = [slice(WEB_SLICE)];
        for yaml in [
            "
metadata: {name: web, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
",
            "
metadata: {name: web, labels: {service.kubernetes.io/headless: ''}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
",
            "
metadata: {name: web}
spec: {clusterIP: None, ports: [{port: 80}]}
",
            "
metadata: {name: web}
spec: {clusterIPs: [None], ports: [{port: 80}]}
",
            "
metadata: {name: web}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
",
        ] {
            let s = svc(yaml);
            assert!(is_ignored(&s), "{yaml}");
            assert_eq!(model(&s, &sl), ServiceModel::default(), "{yaml}");
        }
        assert!(!is_ignored(&svc(WEB)));
    }

    #[test]
    fn bad_ports_and_addresses_are_skipped_with_problems() {
        let s = svc("
metadata: {name: bad, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [not-an-ip, 203.0.113.5, 'fd00::5']
  ports:
  - {name: sctp, port: 132, protocol: SCTP}
  - {name: http, port: 80, nodePort: 70000}
  - {name: zero, port: 0}
  - {name: big, port: 65536}
status:
  loadBalancer:
    ingress: [{ip: 999.1.1.1}, {ip: 198.51.100.1}]
");
        let m = model(&s, &[]);
        assert_eq!(
            kinds(&m),
            [
                ProblemKind::BadAddress,
                ProblemKind::BadAddress,
                ProblemKind::BadAddress,
                ProblemKind::UnsupportedProtocol,
                ProblemKind::BadPort,
                ProblemKind::BadPort,
                ProblemKind::BadPort,
            ],
            "{:?}",
            m.problems
        );
        let obj = Some(ObjectKey::new("default", "bad"));
        assert!(
            m.problems.iter().all(|p| p.object == obj),
            "{:?}",
            m.problems
        );
        assert!(
            m.problems[0].message.contains("not-an-ip"),
            "{}",
            m.problems[0]
        );
        assert!(
            m.problems[1].message.contains("fd00::5"),
            "{}",
            m.problems[1]
        );
        assert!(
            m.problems[2].message.contains("999.1.1.1"),
            "{}",
            m.problems[2]
        );
        assert!(m.problems[3].message.contains("SCTP"), "{}", m.problems[3]);
        assert!(m.problems[4].message.contains("70000"), "{}", m.problems[4]);

        // The rest works: one port, the good addresses, no NodePorts (bad nodePort).
        assert_eq!(m.ports.len(), 1);
        let p = port(&m, &key("bad", "http", Proto::Tcp, Family::V4));
        assert_eq!(
            p.frontends.keys().copied().collect::<Vec<_>>(),
            [
                fe("10.96.0.30", 80, Proto::Tcp),
                fe("198.51.100.1", 80, Proto::Tcp),
                fe("203.0.113.5", 80, Proto::Tcp),
            ]
        );
    }

    #[test]
    fn bad_endpoint_addresses_are_skipped_with_problems() {
        let sl = slice(
            "
metadata: {name: web-bad, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.300]}
- {addresses: ['fd00::1']}
- {addresses: [10.0.1.2]}
",
        );
        let fqdn = slice(
            "
metadata: {name: web-fqdn, namespace: default}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [pod.example.com]}]
",
        );
        let m = model(&svc(WEB), &[sl, fqdn]);
        assert_eq!(
            kinds(&m),
            [ProblemKind::BadAddress, ProblemKind::BadAddress]
        );
        let obj = Some(ObjectKey::new("default", "web-bad"));
        assert!(
            m.problems.iter().all(|p| p.object == obj),
            "{:?}",
            m.problems
        );
        let p = port(&m, &key("web", "http", Proto::Tcp, Family::V4));
        assert_eq!(backends(&p.cluster), ["10.0.1.2:8080"]);
    }

    #[test]
    fn frontends_follow_the_type_not_leftover_fields() {
        // A NodePort Service turned ClusterIP, its nodePort and ingress status
        // still in the object: only the ClusterIP (and externalIPs) are served.
        let yaml = |kind: &str| {
            svc(&format!(
                "
metadata: {{name: t, namespace: default}}
spec:
  type: {kind}
  clusterIP: 10.96.0.40
  externalIPs: [203.0.113.40]
  ports: [{{name: http, port: 80, nodePort: 30040}}]
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.40}}]
"
            ))
        };
        let kinds = |kind: &str| -> BTreeSet<FrontendKind> {
            let m = model(&yaml(kind), &[]);
            port(&m, &key("t", "http", Proto::Tcp, Family::V4))
                .frontends
                .values()
                .map(|f| f.kind)
                .collect()
        };
        use FrontendKind::*;
        assert_eq!(kinds("ClusterIP"), BTreeSet::from([ClusterIp, ExternalIp]));
        assert_eq!(
            kinds("NodePort"),
            BTreeSet::from([ClusterIp, NodePort, ExternalIp])
        );
        assert_eq!(
            kinds("LoadBalancer"),
            BTreeSet::from([ClusterIp, NodePort, ExternalIp, LoadBalancer])
        );
        // No type is ClusterIP; an unknown one is reported and served as one.
        let m = model(&yaml("Special"), &[]);
        assert_eq!(m.problems.len(), 1, "{:?}", m.problems);
        assert!(m.problems[0].message.contains("Special"));
    }

    #[test]
    fn load_balancer_source_ranges_per_family_and_bad_ones_allow_nobody() {
        let s = svc("
metadata: {name: fw, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.41, fd00:96::41]
  loadBalancerSourceRanges: [' 198.51.100.7/24 ', 2001:db8::/32, 10.0.0.0/33, nonsense]
  ports: [{name: http, port: 80, nodePort: 30041}]
");
        let m = model(&s, &[]);
        let bad: Vec<_> = m
            .problems
            .iter()
            .filter(|p| p.kind == ProblemKind::BadSourceRange)
            .collect();
        assert_eq!(bad.len(), 2, "{:?}", m.problems);
        let v4 = port(&m, &key("fw", "http", Proto::Tcp, Family::V4));
        let v6 = port(&m, &key("fw", "http", Proto::Tcp, Family::V6));
        let shown = |p: &PortSpec| -> Vec<String> {
            p.source_ranges
                .as_ref()
                .expect("restricted")
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        // Host bits cleared, as kube-proxy parses them.
        assert_eq!(shown(v4), ["198.51.100.0/24"]);
        assert_eq!(shown(v6), ["2001:db8::/32"]);
        // None listed: unrestricted. Only bad ones: restricted to nobody.
        let open = svc("
metadata: {name: open, namespace: default}
spec: {type: LoadBalancer, clusterIP: 10.96.0.42, ports: [{port: 80, nodePort: 30042}]}
");
        assert_eq!(model(&open, &[]).ports[0].1.source_ranges, None);
        let shut = svc("
metadata: {name: shut, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.43
  loadBalancerSourceRanges: [oops]
  ports: [{port: 80, nodePort: 30043}]
");
        assert_eq!(
            model(&shut, &[]).ports[0].1.source_ranges,
            Some(BTreeSet::new())
        );
    }

    #[test]
    fn a_health_check_node_port_counts_this_nodes_ready_endpoints() {
        let yaml = |kind: &str, etp: &str| {
            svc(&format!(
                "
metadata: {{name: web, namespace: default}}
spec:
  type: {kind}
  clusterIP: 10.96.0.10
  externalTrafficPolicy: {etp}
  healthCheckNodePort: 32000
  ports: [{{name: http, port: 80, nodePort: 30080}}]
"
            ))
        };
        let m = model(&yaml("LoadBalancer", "Local"), &[slice(WEB_SLICE)]);
        // WEB_SLICE has one ready endpoint on node-a (10.0.1.1) and one elsewhere.
        assert_eq!(
            m.health_check,
            Some(HealthCheckSpec {
                port: 32000,
                local_endpoints: 1
            })
        );
        // Only LoadBalancer Services with externalTrafficPolicy Local have one.
        assert_eq!(
            model(&yaml("LoadBalancer", "Cluster"), &[]).health_check,
            None
        );
        assert_eq!(model(&yaml("NodePort", "Local"), &[]).health_check, None);
        // Without slices: the port answers, with no local endpoint.
        assert_eq!(
            model(&yaml("LoadBalancer", "Local"), &[]).health_check,
            Some(HealthCheckSpec {
                port: 32000,
                local_endpoints: 0
            })
        );
    }

    #[test]
    fn session_affinity() {
        let with = |extra: &str| {
            let m = model(&svc(&format!("{WEB}  {extra}\n")), &[]);
            m.ports[0].1.affinity_timeout
        };
        assert_eq!(with("sessionAffinity: None"), None);
        assert_eq!(
            with("sessionAffinity: ClientIP"),
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
        assert_eq!(
            with("sessionAffinity: ClientIP\n  sessionAffinityConfig: {}"),
            Some(10_800)
        );
        let s = svc("
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{name: http, port: 80}]
");
        assert_eq!(model(&s, &[]).ports[0].1.affinity_timeout, Some(60));
    }

    #[test]
    fn built_from_structs() {
        use k8s_openapi::{
            api::{
                core::v1::{ServicePort, ServiceSpec},
                discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions},
            },
            apimachinery::pkg::apis::meta::v1::ObjectMeta,
        };
        let s = Service {
            metadata: ObjectMeta {
                name: Some("st".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.40".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sl = EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                protocol: Some("UDP".into()),
                ..Default::default()
            }]),
            endpoints: Some(vec![SliceEndpoint {
                addresses: vec!["10.0.5.5".into()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..Default::default()
                }),
                node_name: Some("node-a".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let m = service_model(&s, &[&Slice::from(&sl)], &node());
        assert!(m.problems.is_empty());
        let p = port(&m, &key("st", "", Proto::Udp, Family::V4));
        assert_eq!(
            p.cluster.backends.iter().copied().collect::<Vec<_>>(),
            [BackendSpec {
                addr: SocketAddr::new(Ipv4Addr::new(10, 0, 5, 5).into(), 8080),
                local: true,
                terminating: false,
            }]
        );
    }
}
