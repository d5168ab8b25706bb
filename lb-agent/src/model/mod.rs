//! The desired datapath state, computed from Services, EndpointSlices and node
//! facts by pure functions: no ids, no maps, no I/O. The reconciler turns it into
//! map entries.
//!
//! - [`service_model`]: one Service (and its slices, as [`Slice`]s) on one node
//!   -> its ports.
//! - [`Desired`]: all services' ports, with frontend conflicts between Services
//!   resolved deterministically.

mod desired;
mod service;
mod slice;

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
};

pub use self::{
    desired::{Changes, Desired},
    service::{
        DEFAULT_AFFINITY_TIMEOUT, HEADLESS_LABEL, PROXY_NAME_LABEL, is_ignored, service_model,
    },
    slice::{Address, SERVICE_NAME_LABEL, Slice, SliceEndpoint},
};
use crate::cluster::{ObjectKey, Problem};

/// L4 protocols lb balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The Kubernetes spelling: `TCP`, `UDP`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// The Kubernetes spelling (`spec.ipFamilies`, `addressType`): `IPv4`, `IPv6`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Service port in one address family: the unit that gets a service id,
/// counters and Maglev tables. Named by port name (not number), so that a port
/// whose number changes keeps its id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub service: ObjectKey,
    /// `spec.ports[].name` ("" when unnamed).
    pub port_name: String,
    pub proto: Proto,
    pub family: Family,
}

/// `namespace/name:port-name/PROTO/family`, e.g. `default/web:http/TCP/IPv4`.
/// How a Service port is named in dumps, metrics and the `service_names` map:
/// `namespace/name:port-name/TCP/IPv4` (the port name is empty when unnamed).
impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}/{}",
            self.service, self.port_name, self.proto, self.family
        )
    }
}

/// An address, port and protocol the datapath answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// `10.0.0.1:80/TCP`, `[fd00::1]:53/UDP`.
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    /// A NodePort on one of this node's addresses.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// Reached from outside the cluster: externalTrafficPolicy applies.
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp)
    }
}

/// Which backends a frontend balances over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every endpoint of the Service, on any node.
    Cluster,
    /// Only endpoints on this node (internalTrafficPolicy / externalTrafficPolicy Local).
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendSpec {
    pub kind: FrontendKind,
    pub scope: Scope,
    /// Source-NAT flows to backends on other nodes so their replies come back here
    /// (external frontends with externalTrafficPolicy Cluster).
    pub snat_remote: bool,
}

/// A backend: an endpoint address with the port the slice resolved for this
/// Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// The endpoint is terminating (only chosen when none is ready).
    pub terminating: bool,
}

/// The backends a Maglev table is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub backends: BTreeSet<BackendSpec>,
    /// No endpoint was ready, so these are the serving, terminating ones.
    pub terminating_fallback: bool,
}

/// An address prefix (a CIDR), its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Parses `a.b.c.d/n` or `x::/n` (surrounding blanks allowed, as
    /// kube-proxy's parsing allows them), clearing host bits as kube-proxy
    /// does (`10.0.0.1/8` is `10.0.0.0/8`).
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, len) = s.trim().split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if u32::from(len) > bits {
            return None;
        }
        Some(Self::masked(addr, len))
    }

    fn masked(addr: IpAddr, len: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        Self { addr, len }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

/// `10.0.0.0/8`, `fd00::/64`.
impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What one Service port needs in the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub frontends: std::collections::BTreeMap<Frontend, FrontendSpec>,
    /// Backends for `Scope::Cluster` frontends.
    pub cluster: Table,
    /// Backends for `Scope::Local` frontends; `Some` exactly when one has that scope.
    pub local: Option<Table>,
    /// Serving endpoints that no table chooses (terminating while others are
    /// ready, as in a rolling update): they stay in the backends map so that
    /// their established flows keep flowing until they end, and get no new
    /// flow.
    pub draining: BTreeSet<BackendSpec>,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges, of this port's family: `Some` when the
    /// Service lists any (then its LoadBalancer frontends take new flows only
    /// from these prefixes; `Some` of an empty set, when every one listed is
    /// of the other family or no CIDR, takes none).
    pub source_ranges: Option<BTreeSet<Prefix>>,
}

impl PortSpec {
    /// Every backend the port needs in the backends map: its tables' and the
    /// draining ones (an address may appear more than once).
    pub fn all_backends(&self) -> impl Iterator<Item = &BackendSpec> {
        self.cluster
            .backends
            .iter()
            .chain(self.local.iter().flat_map(|t| t.backends.iter()))
            .chain(&self.draining)
    }
}

/// The model of one Service: its ports, and what was wrong with it (a bad port
/// is skipped, the rest still works).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceModel {
    pub ports: Vec<(PortKey, PortSpec)>,
    pub problems: Vec<Problem>,
    /// kube-proxy's health check node port, for a LoadBalancer Service with
    /// externalTrafficPolicy Local and a `healthCheckNodePort`.
    pub health_check: Option<HealthCheckSpec>,
}

/// A health check node port and what it reports (see `service_health`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub port: u16,
    /// The Service's ready endpoints on this node (in the family that has
    /// more of them: a dual-stack pod counts once).
    pub local_endpoints: usize,
}
