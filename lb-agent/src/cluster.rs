//! The vocabulary shared by the sources, the model and the reconciler: object
//! keys, node facts and input problems (what the sources send is
//! [`crate::source::SourceEvent`]).

use std::{fmt, net::IpAddr};

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object's metadata (namespace "default" when unset).
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_else(|| "default".into()),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Facts about this node that the desired state depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name (matches `EndpointSlice` endpoints' `nodeName`).
    pub name: String,
    /// Addresses NodePorts answer on (IPv4 and IPv6).
    pub addresses: Vec<IpAddr>,
    /// Its zone (the Node's `topology.kubernetes.io/zone` label): topology
    /// hints prefer endpoints for it.
    pub zone: Option<String>,
}

/// Why some input was skipped. Logged with its object or file, and counted in
/// `lb_input_errors_total{kind}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The object it is about, when known.
    pub object: Option<ObjectKey>,
    /// Where it came from, when it came from a file: `path:line`.
    pub location: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn new(kind: ProblemKind, object: Option<ObjectKey>, message: impl Into<String>) -> Self {
        Self {
            kind,
            object,
            location: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        write!(f, "{} ({})", self.message, self.kind.as_str())
    }
}

/// The kinds of input problems (the `kind` label of `lb_input_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// A file that is not valid YAML/JSON, or an object that does not decode.
    Parse,
    /// A document of a kind lb does not read (it is skipped, not an error for the rest).
    UnsupportedKind,
    /// Manifest mode: a Service without `clusterIP`/`clusterIPs` (there is no allocator).
    MissingClusterIp,
    /// Manifest mode: a NodePort/LoadBalancer Service port without `nodePort`.
    MissingNodePort,
    /// An address that does not parse, or of a family the Service does not have.
    BadAddress,
    /// A port outside 1..=65535.
    BadPort,
    /// A protocol lb does not balance (SCTP).
    UnsupportedProtocol,
    /// Two Services claim the same address, port and protocol; the first (by
    /// namespace/name) keeps it.
    DuplicateFrontend,
    /// More services or backends than the maps hold.
    Capacity,
    /// A loadBalancerSourceRanges entry that is no CIDR: it allows nobody
    /// (the Service's other ranges still do), so a typo never opens a
    /// Service to everyone.
    BadSourceRange,
    /// A health check node port the agent cannot listen on (another process
    /// holds it); retried at every sync.
    HealthCheckPort,
}

impl ProblemKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Parse => "parse",
            Self::UnsupportedKind => "unsupported_kind",
            Self::MissingClusterIp => "missing_cluster_ip",
            Self::MissingNodePort => "missing_node_port",
            Self::BadAddress => "bad_address",
            Self::BadPort => "bad_port",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::DuplicateFrontend => "duplicate_frontend",
            Self::Capacity => "capacity",
            Self::BadSourceRange => "bad_source_range",
            Self::HealthCheckPort => "health_check_port",
        }
    }
}
