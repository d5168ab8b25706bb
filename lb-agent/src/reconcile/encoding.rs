//! How the model's vocabulary is written into the maps: `services` keys and
//! values (frontends and ClusterIP address entries), `backends` values, and the
//! `addr_filter` bit each entry stands behind.
//!
//! The reconciler writes nothing it did not encode here, and the tests program
//! the maps through the same functions, so the datapath is tested on exactly
//! what the agent writes.

use std::net::SocketAddr;

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, PROTO_TCP, PROTO_UDP,
    SVC_F_ADDRESS, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_SNAT_REMOTE,
    SVC_F_SOURCE_RANGES, SVC_F_TERMINATING_FALLBACK, Service, ServiceKey, addr16, hash,
};

use crate::model::{BackendSpec, Frontend, FrontendKind, FrontendSpec, PortSpec, Proto, Scope};

/// A range of `maglev` elements (two entries each) holding one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    pub start: u32,
    pub len: u32,
}

impl Extent {
    /// The extent a table of `entries` entries from element `start` takes.
    pub fn of(start: u32, entries: u32) -> Self {
        Self {
            start,
            len: lb_common::maglev_row_elements(entries),
        }
    }

    pub fn end(&self) -> u32 {
        self.start + self.len
    }
}

/// Where a port's Maglev tables lie (none for an empty or absent table), and
/// their size: both have the same number of entries, as frontends carry one
/// `table_size`. An extent may be longer than its table (what was left when a
/// table shrank in place is given up, the extent keeps what the table takes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// The table over every endpoint (`Scope::Cluster` frontends).
    pub cluster: Option<Extent>,
    /// The table over this node's endpoints (`Scope::Local` frontends).
    pub local: Option<Extent>,
    /// Entries of each table (0: none).
    pub size: u32,
}

impl Tables {
    /// The table frontends of `scope` read.
    pub fn get(&self, scope: Scope) -> Option<Extent> {
        match scope {
            Scope::Cluster => self.cluster,
            Scope::Local => self.local,
        }
    }

    pub fn get_mut(&mut self, scope: Scope) -> &mut Option<Extent> {
        match scope {
            Scope::Cluster => &mut self.cluster,
            Scope::Local => &mut self.local,
        }
    }
}

/// The `services` key of a frontend.
pub fn service_key(f: &Frontend) -> ServiceKey {
    let (addr, family) = addr16(f.addr);
    ServiceKey {
        addr,
        port: f.port,
        proto: match f.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        },
        family,
        _pad: [0; 4],
    }
}

/// The `services` value of frontend `f` of port `spec`, whose service id is
/// `id` and whose tables are `tables`. A frontend without a table (no
/// backend) says so with a backend count of 0: the datapath refuses its
/// flows, or, with a Local policy (`SVC_F_LOCAL`), drops them. A Local
/// frontend also carries the cluster-wide table, which in-cluster clients of
/// an external frontend use.
pub fn frontend_value(spec: &PortSpec, f: &FrontendSpec, id: u32, tables: Tables) -> Service {
    let table = match f.scope {
        Scope::Cluster => &spec.cluster,
        Scope::Local => spec.local.as_ref().unwrap_or(&spec.cluster),
    };
    let placed = tables.get(f.scope);
    let mut flags = 0;
    if f.snat_remote {
        flags |= SVC_F_SNAT_REMOTE;
    }
    if f.kind.is_external() {
        flags |= SVC_F_EXTERNAL;
    }
    if table.terminating_fallback {
        flags |= SVC_F_TERMINATING_FALLBACK;
    }
    if spec.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if f.scope == Scope::Local {
        flags |= SVC_F_LOCAL;
    }
    // loadBalancerSourceRanges restrict the LoadBalancer IPs only; the
    // ClusterIP, NodePorts and externalIPs stay open, as with kube-proxy.
    if spec.source_ranges.is_some() && f.kind == FrontendKind::LoadBalancer {
        flags |= SVC_F_SOURCE_RANGES;
    }
    let count = |placed: Option<Extent>, t: &crate::model::Table| {
        if placed.is_some() {
            t.backends.len() as u32
        } else {
            0
        }
    };
    let any = placed.is_some() || tables.cluster.is_some();
    Service {
        id,
        table: placed.map_or(0, |e| e.start),
        backend_count: count(placed, table),
        flags,
        affinity_timeout: spec.affinity_timeout.unwrap_or(0),
        cluster_table: tables.cluster.map_or(0, |e| e.start),
        cluster_backend_count: count(tables.cluster, &spec.cluster),
        table_size: if any { tables.size } else { 0 },
    }
}

/// Whether a `services` value belongs to a ClusterIP frontend (which keeps its
/// address entry written).
pub fn is_cluster_ip(v: &Service) -> bool {
    v.flags & SVC_F_EXTERNAL == 0
}

/// The key of the address entry of a ClusterIP frontend's address (port 0,
/// protocol 0).
pub fn address_key(frontend: &ServiceKey) -> ServiceKey {
    ServiceKey {
        port: 0,
        proto: 0,
        ..*frontend
    }
}

/// The value of an address entry: the address is a ClusterIP, so its ports that
/// are no Service port are refused. It names no service id and no table.
pub fn address_value() -> Service {
    Service {
        id: u32::MAX,
        flags: SVC_F_ADDRESS,
        ..Service::default()
    }
}

/// The `backends` value of a backend.
pub fn backend_value(b: &BackendSpec) -> Backend {
    let mut flags = BACKEND_F_ACTIVE;
    if b.local {
        flags |= BACKEND_F_LOCAL;
    }
    if b.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    Backend::new(b.addr, flags)
}

/// What one bit of `addr_filter` stands for: a `services` key or a backend.
#[derive(Clone, Copy, Debug)]
pub struct FilterKey {
    addr: [u8; 16],
    family: u8,
    port: u16,
    proto: u8,
    role: u32,
}

impl FilterKey {
    /// A `services` key: a frontend, or (port 0, protocol 0) a ClusterIP address.
    pub fn frontend(k: &ServiceKey) -> Self {
        let role = if k.port == 0 && k.proto == 0 {
            hash::FILTER_CLUSTER_IP
        } else {
            hash::FILTER_FRONTEND
        };
        Self {
            addr: k.addr,
            family: k.family,
            port: k.port,
            proto: k.proto,
            role,
        }
    }

    /// A backend address and port (whatever the protocol): replies from it are
    /// looked up.
    pub fn backend(addr: SocketAddr) -> Self {
        let (a, family) = addr16(addr.ip());
        Self {
            addr: a,
            family,
            port: addr.port(),
            proto: 0,
            role: hash::FILTER_BACKEND,
        }
    }

    /// Its bit in `addr_filter`.
    pub fn bit(&self) -> u32 {
        hash::addr_filter_bit(&self.addr, self.family, self.port, self.proto, self.role)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::{FrontendKind, Table};

    fn port(backends: &[&str], local: Option<&[&str]>) -> PortSpec {
        let table = |addrs: &[&str]| Table {
            backends: addrs
                .iter()
                .map(|a| BackendSpec {
                    addr: a.parse().unwrap(),
                    local: false,
                    terminating: false,
                })
                .collect(),
            terminating_fallback: false,
        };
        PortSpec {
            frontends: BTreeMap::new(),
            cluster: table(backends),
            local: local.map(table),
            draining: BTreeSet::new(),
            affinity_timeout: None,
            source_ranges: None,
        }
    }

    const NODE_PORT_LOCAL: FrontendSpec = FrontendSpec {
        kind: FrontendKind::NodePort,
        scope: Scope::Local,
        snat_remote: false,
    };

    #[test]
    fn a_frontend_reads_the_table_and_count_of_its_scope() {
        let spec = port(
            &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
            Some(&["10.0.0.1:80"]),
        );
        let tables = Tables {
            cluster: Some(Extent::of(4096, 4093)),
            local: Some(Extent::of(9, 4093)),
            size: 4093,
        };
        let cluster_ip = FrontendSpec {
            kind: FrontendKind::ClusterIp,
            scope: Scope::Cluster,
            snat_remote: false,
        };
        let v = frontend_value(&spec, &cluster_ip, 7, tables);
        assert_eq!(
            (v.id, v.table, v.table_size, v.backend_count, v.flags),
            (7, 4096, 4093, 3, 0)
        );
        assert!(is_cluster_ip(&v));
        let v = frontend_value(&spec, &NODE_PORT_LOCAL, 7, tables);
        assert_eq!(
            (v.id, v.table, v.table_size, v.backend_count, v.flags),
            (7, 9, 4093, 1, SVC_F_EXTERNAL | SVC_F_LOCAL)
        );
        // In-cluster clients of a Local external frontend use the cluster table.
        assert_eq!((v.cluster_table, v.cluster_backend_count), (4096, 3));
        assert!(!is_cluster_ip(&v));
        // Without local endpoints: no local table, no backend, and the Local
        // flag that makes the datapath drop rather than refuse.
        let v = frontend_value(
            &spec,
            &NODE_PORT_LOCAL,
            7,
            Tables {
                local: None,
                ..tables
            },
        );
        assert_eq!((v.backend_count, v.flags & SVC_F_LOCAL), (0, SVC_F_LOCAL));
        // The in-cluster table still needs its size.
        assert_eq!((v.cluster_table, v.table_size), (4096, 4093));
        // No table at all: no size either.
        let v = frontend_value(&spec, &cluster_ip, 7, Tables::default());
        assert_eq!((v.backend_count, v.table_size), (0, 0));
    }

    #[test]
    fn source_ranges_restrict_the_load_balancer_ips_only() {
        let mut spec = port(&["10.0.0.1:80"], None);
        spec.source_ranges = Some(BTreeSet::new());
        let tables = Tables {
            cluster: Some(Extent::of(1, 1)),
            local: None,
            size: 1,
        };
        for (kind, restricted) in [
            (FrontendKind::LoadBalancer, true),
            (FrontendKind::NodePort, false),
            (FrontendKind::ExternalIp, false),
            (FrontendKind::ClusterIp, false),
        ] {
            let f = FrontendSpec {
                kind,
                scope: Scope::Cluster,
                snat_remote: kind.is_external(),
            };
            let v = frontend_value(&spec, &f, 2, tables);
            assert_eq!(v.flags & SVC_F_SOURCE_RANGES != 0, restricted, "{kind:?}");
        }
        spec.source_ranges = None;
        let lb = FrontendSpec {
            kind: FrontendKind::LoadBalancer,
            scope: Scope::Cluster,
            snat_remote: true,
        };
        assert_eq!(
            frontend_value(&spec, &lb, 2, tables).flags & SVC_F_SOURCE_RANGES,
            0
        );
    }

    #[test]
    fn a_frontend_without_a_table_has_no_backends_and_flags_follow_the_spec() {
        let mut spec = port(&["10.0.0.1:80"], None);
        spec.affinity_timeout = Some(600);
        spec.cluster.terminating_fallback = true;
        let nodeport = FrontendSpec {
            kind: FrontendKind::NodePort,
            scope: Scope::Cluster,
            snat_remote: true,
        };
        let v = frontend_value(&spec, &nodeport, 1, Tables::default());
        assert_eq!((v.table, v.backend_count), (0, 0));
        assert_eq!(
            v.flags,
            SVC_F_SNAT_REMOTE | SVC_F_EXTERNAL | SVC_F_TERMINATING_FALLBACK | SVC_F_AFFINITY
        );
        assert_eq!(v.affinity_timeout, 600);
    }

    #[test]
    fn address_entries_and_backends_encode_their_roles() {
        let f = service_key(&Frontend {
            addr: "10.96.0.1".parse().unwrap(),
            port: 443,
            proto: Proto::Tcp,
        });
        let a = address_key(&f);
        assert_eq!(
            (a.addr, a.family, a.port, a.proto),
            (f.addr, f.family, 0, 0)
        );
        assert_eq!(address_value().flags, SVC_F_ADDRESS);
        // The address entry and the frontend stand behind bits of other roles.
        assert_eq!(
            FilterKey::frontend(&a).bit(),
            hash::addr_filter_bit(&a.addr, a.family, 0, 0, hash::FILTER_CLUSTER_IP)
        );
        assert_eq!(
            FilterKey::frontend(&f).bit(),
            hash::addr_filter_bit(&f.addr, f.family, 443, PROTO_TCP, hash::FILTER_FRONTEND)
        );
        let b = BackendSpec {
            addr: "[fd00::5]:8080".parse().unwrap(),
            local: true,
            terminating: true,
        };
        let v = backend_value(&b);
        assert_eq!(
            v.flags,
            BACKEND_F_ACTIVE | BACKEND_F_LOCAL | BACKEND_F_TERMINATING
        );
        assert_eq!(
            lb_common::socket_addr(&v.addr, v.family, v.port),
            Some(b.addr)
        );
        assert_eq!(
            FilterKey::backend(b.addr).bit(),
            hash::addr_filter_bit(&v.addr, v.family, 8080, 0, hash::FILTER_BACKEND)
        );
    }
}
