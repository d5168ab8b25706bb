//! A datapath in the testbed's one-node namespace (`lb_testbed::fib`), with
//! maps the tests program directly through the agent's encoding, and runners
//! that push one frame through `BPF_PROG_TEST_RUN` (`lb_testbed::test_run`).
// Each test binary uses a part of it.
#![allow(dead_code, unused_imports)]

pub use lb_testbed::{fib, packet};

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_agent::{
    bpf::{Datapath, LoadOptions, Maps, NodeConfig, Sizes},
    maglev,
    model::{
        BackendSpec, Frontend, FrontendKind, FrontendSpec, PortSpec, Prefix, Proto, Scope, Table,
    },
    reconcile::{
        encoding::{self, Extent, FilterKey, Tables},
        filter::Filter,
    },
};
use lb_common::{FlowKey, Interface, PROTO_TCP, Reason, hash::flow_hash, iface};
use lb_testbed::{fib::FibNamespace, test_run};

pub const SIZES: Sizes = Sizes {
    services: 1024,
    service_ids: 16,
    backends: 256,
    maglev_entries: lb_agent::bpf::MIN_MAGLEV_ENTRIES,
    conntrack: 4096,
};
/// The size of the tables the labs write themselves (the reconciler sizes
/// its own from the backends).
pub const TABLE_SIZE: u32 = 251;
pub const SNAT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const SNAT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const SNAT_PORTS: (u16, u16) = (61_000, 61_099);
/// The node's `config` in every lab: both families source-NATed, in a range
/// of 100 ports (so that tests can exhaust it).
pub const NODE_CONFIG: NodeConfig = NodeConfig {
    snat_v4: Some(SNAT_V4),
    snat_v6: Some(SNAT_V6),
    snat_ports: SNAT_PORTS,
    cluster_cidrs: false,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_NEXT: i32 = -1;
pub const TC_SHOT: i32 = 2;
pub const TC_REDIRECT: i32 = 7;

/// A backend for [`Lab::service`]: address and whether it runs on this node.
pub fn backend(addr: &str, local: bool) -> (SocketAddr, bool) {
    (addr.parse().expect("backend address"), local)
}

pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey::new(src, dst, proto)
}

/// A ClusterIP frontend (internalTrafficPolicy Cluster).
pub const CLUSTER_IP: FrontendSpec = FrontendSpec {
    kind: FrontendKind::ClusterIp,
    scope: Scope::Cluster,
    snat_remote: false,
};

/// A NodePort with externalTrafficPolicy Local: this node's endpoints only,
/// the client's address kept.
pub const NODE_PORT_LOCAL: FrontendSpec = FrontendSpec {
    kind: FrontendKind::NodePort,
    scope: Scope::Local,
    snat_remote: false,
};

/// A LoadBalancer ingress IP with externalTrafficPolicy Cluster.
pub const LOAD_BALANCER: FrontendSpec = FrontendSpec {
    kind: FrontendKind::LoadBalancer,
    scope: Scope::Cluster,
    snat_remote: true,
};

/// A ClusterIP with internalTrafficPolicy Local.
pub const CLUSTER_IP_LOCAL: FrontendSpec = FrontendSpec {
    kind: FrontendKind::ClusterIp,
    scope: Scope::Local,
    snat_remote: false,
};

/// A NodePort with externalTrafficPolicy Cluster: flows to backends on other
/// nodes are source-NATed.
pub const NODE_PORT: FrontendSpec = FrontendSpec {
    kind: FrontendKind::NodePort,
    scope: Scope::Cluster,
    snat_remote: true,
};

/// What [`Lab::service`] created: one Service port with one table.
#[derive(Clone, Debug)]
pub struct Svc {
    pub id: u32,
    pub table: u32,
    /// (backend id, address, local), in the order given.
    pub backends: Vec<(u32, SocketAddr, bool)>,
    frontends: Vec<Frontend>,
    spec: FrontendSpec,
    /// sessionAffinity ClientIP timeout (see [`Lab::update`]).
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (see [`Lab::update`]).
    pub source_ranges: Option<BTreeSet<Prefix>>,
}

impl Svc {
    /// The backend Maglev gives a new flow from `client` to `frontend`.
    pub fn expected_backend(
        &self,
        client: SocketAddr,
        frontend: SocketAddr,
        proto: u8,
    ) -> SocketAddr {
        let size = TABLE_SIZE;
        let table = maglev::build(&self.entries(), size);
        let h = flow_hash(&flow_key(client, frontend, proto));
        let id = table[(h % size) as usize];
        self.backends.iter().find(|b| b.0 == id).unwrap().1
    }

    fn entries(&self) -> Vec<(SocketAddr, u32)> {
        self.backends.iter().map(|(id, a, _)| (*a, *id)).collect()
    }

    /// The port as the model describes it (what the agent encodes from). A
    /// Local frontend gets a second table, of the local backends.
    fn port_spec(&self) -> PortSpec {
        let table = |only_local: bool| Table {
            backends: self
                .backends
                .iter()
                .filter(|(_, _, local)| !only_local || *local)
                .map(|(_, addr, local)| backend_spec(*addr, *local))
                .collect(),
            terminating_fallback: false,
        };
        PortSpec {
            frontends: self.frontends.iter().map(|f| (*f, self.spec)).collect(),
            cluster: table(false),
            local: (self.spec.scope == Scope::Local).then(|| table(true)),
            draining: BTreeSet::new(),
            affinity_timeout: self.affinity_timeout,
            source_ranges: self.source_ranges.clone(),
        }
    }

    /// Where the lab puts the tables: row `table` of tables of
    /// [`TABLE_SIZE`] for the cluster one, a row per service id above the
    /// cluster ones for the local one.
    fn tables(&self) -> Tables {
        let any_local = self.backends.iter().any(|(_, _, l)| *l);
        let row = |r: u32| Extent::of(r * lb_common::maglev_row_elements(TABLE_SIZE), TABLE_SIZE);
        Tables {
            cluster: (!self.backends.is_empty()).then(|| row(self.table)),
            local: (self.spec.scope == Scope::Local && any_local)
                .then(|| row(self.table + SIZES.service_ids / 2)),
            size: TABLE_SIZE,
        }
    }
}

fn backend_spec(addr: SocketAddr, local: bool) -> BackendSpec {
    BackendSpec {
        addr,
        local,
        terminating: false,
    }
}

fn frontend(addr: SocketAddr, proto: u8) -> Frontend {
    Frontend {
        addr: addr.ip(),
        port: addr.port(),
        proto: match proto {
            TCP => Proto::Tcp,
            UDP => Proto::Udp,
            _ => panic!("no Service port has protocol {proto}"),
        },
    }
}

pub struct Lab {
    pub dp: Datapath,
    pub maps: Maps,
    pub uplink: u32,
    pub pod: u32,
    next_service: u32,
    next_backend: u32,
    /// The `addr_filter` bits, set (and cleared) as the agent sets them.
    filter: Filter,
    // Last: the namespace goes after the programs and maps that refer to its devices.
    pub fib: FibNamespace,
}

/// A datapath in the one-node namespace, wired as the agent wires a node:
/// `NODE_CONFIG`, the uplink `up0` in `tx_ports`; `pod0` is the pod veth.
pub struct Wired {
    pub dp: Datapath,
    pub maps: Maps,
    pub uplink: u32,
    pub pod: u32,
    pub fib: FibNamespace,
}

impl Wired {
    pub fn new() -> Self {
        let fib = FibNamespace::enter().expect("the one-node namespace");
        let mut dp = Datapath::load(&LoadOptions {
            pin_path: None,
            sizes: SIZES,
            log_level: None,
        })
        .expect("load datapath");
        let mut maps = dp.take_maps().expect("maps");
        let uplink = lb_testbed::ifindex("up0").unwrap();
        let pod = lb_testbed::ifindex("pod0").unwrap();
        maps.set_config(&NODE_CONFIG).unwrap();
        maps.add_tx_port(uplink).unwrap();
        // The roles the agent records (tc tells pods from the network by them).
        for (name, role, hooks) in [
            ("up0", iface::ROLE_UPLINK, iface::HOOK_XDP | iface::HOOK_TC),
            ("pod0", iface::ROLE_POD, iface::HOOK_TC),
            ("flannel.1", iface::ROLE_OTHER, iface::HOOK_TC),
        ] {
            let mut entry = Interface {
                role,
                hooks,
                ..Interface::default()
            };
            entry.name[..name.len()].copy_from_slice(name.as_bytes());
            let ifindex = lb_testbed::ifindex(name).unwrap();
            maps.set_interface(ifindex, &entry).unwrap();
        }
        Self {
            dp,
            maps,
            uplink,
            pod,
            fib,
        }
    }
}

impl Lab {
    pub fn new() -> Self {
        let Wired {
            dp,
            maps,
            uplink,
            pod,
            fib,
        } = Wired::new();
        Self {
            dp,
            maps,
            uplink,
            pod,
            next_service: 0,
            next_backend: 1,
            filter: Filter::default(),
            fib,
        }
    }

    /// Programs a Service port with its own Maglev row: `frontends`, all of
    /// kind `spec`, lead to it. Entries are the agent's encoding of the port
    /// (see `lb_agent::reconcile::encoding`), written in the agent's order:
    /// backends, row, frontends.
    pub fn service(
        &mut self,
        frontends: &[SocketAddr],
        proto: u8,
        backends: &[(SocketAddr, bool)],
        spec: FrontendSpec,
    ) -> Svc {
        let id = self.next_service;
        self.next_service += 1;
        let mut svc = Svc {
            id,
            table: id,
            backends: Vec::new(),
            frontends: frontends.iter().map(|f| frontend(*f, proto)).collect(),
            spec,
            affinity_timeout: None,
            source_ranges: None,
        };
        for (addr, local) in backends {
            let bid = self.next_backend;
            self.next_backend += 1;
            self.set_backend(bid, *addr, *local);
            svc.backends.push((bid, *addr, *local));
        }
        self.write_table(&svc);
        self.write_frontends(&svc);
        svc
    }

    /// Writes the address entries of the service's ClusterIP addresses, as the
    /// agent does for every ClusterIP frontend: their other ports are refused.
    pub fn cluster_address(&mut self, svc: &Svc) {
        for f in &svc.frontends {
            let key = encoding::address_key(&encoding::service_key(f));
            self.filter.add(&mut self.maps, FilterKey::frontend(&key));
            self.maps
                .set_service(&key, &encoding::address_value())
                .unwrap();
        }
    }

    fn set_backend(&mut self, id: u32, addr: SocketAddr, local: bool) {
        self.filter.add(&mut self.maps, FilterKey::backend(addr));
        let value = encoding::backend_value(&backend_spec(addr, local));
        self.maps.set_backend(id, &value).unwrap();
    }

    fn write_frontends(&mut self, svc: &Svc) {
        let port = svc.port_spec();
        for f in &svc.frontends {
            let key = encoding::service_key(f);
            self.filter.add(&mut self.maps, FilterKey::frontend(&key));
            let value = encoding::frontend_value(&port, &svc.spec, svc.id, svc.tables());
            self.maps.set_service(&key, &value).unwrap();
        }
    }

    /// Rewrites the service's Maglev tables from its current backends.
    fn write_table(&mut self, svc: &Svc) {
        let size = TABLE_SIZE;
        let table = maglev::build(&svc.entries(), size);
        if let Some(at) = svc.tables().cluster {
            self.maps.maglev.write(at.start, &table).unwrap();
        }
        if let Some(at) = svc.tables().local {
            let local: Vec<(SocketAddr, u32)> = svc
                .backends
                .iter()
                .filter(|(_, _, l)| *l)
                .map(|(id, a, _)| (*a, *id))
                .collect();
            self.maps
                .maglev
                .write(at.start, &maglev::build(&local, size))
                .unwrap();
        }
    }

    /// Writes the service again after a change of its affinity or source
    /// ranges, the agent's way: ranges first, then the frontends.
    pub fn update(&mut self, svc: &Svc) {
        for p in svc.source_ranges.iter().flatten() {
            self.maps.add_source_range(svc.id, (p.addr, p.len)).unwrap();
        }
        self.write_frontends(svc);
    }

    /// Gives the datapath the cluster's pod CIDRs (`--cluster-cidr`).
    pub fn cluster_cidrs(&mut self, cidrs: &[&str]) {
        let cidrs: Vec<_> = cidrs
            .iter()
            .map(|c| {
                let p = Prefix::parse(c).unwrap();
                (p.addr, p.len)
            })
            .collect();
        self.maps.set_cluster_cidrs(&cidrs).unwrap();
        self.maps
            .set_config(&NodeConfig {
                cluster_cidrs: true,
                ..NODE_CONFIG
            })
            .unwrap();
    }

    /// Adds a backend to a service (new id, table rewritten, frontends updated).
    pub fn add_backend(&mut self, svc: &mut Svc, addr: SocketAddr, local: bool) {
        let bid = self.next_backend;
        self.next_backend += 1;
        self.set_backend(bid, addr, local);
        svc.backends.push((bid, addr, local));
        self.write_table(svc);
        self.write_frontends(svc);
    }

    /// Removes a backend the way the agent does: table first, then the slot.
    pub fn remove_backend(&mut self, svc: &mut Svc, addr: SocketAddr) {
        let i = svc
            .backends
            .iter()
            .position(|b| b.1 == addr)
            .expect("backend of the service");
        let (bid, _, _) = svc.backends.remove(i);
        self.write_table(svc);
        self.write_frontends(svc);
        self.maps.clear_backend(bid).unwrap();
        self.filter.remove(&mut self.maps, FilterKey::backend(addr));
    }

    /// Runs the XDP program on `frame` arriving on the uplink.
    pub fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.xdp_on(self.uplink, frame)
    }

    pub fn xdp_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let r = test_run::xdp(self.dp.xdp().unwrap(), frame, ifindex, 1).unwrap();
        (r.ret, r.frame)
    }

    /// Runs the tc program on `frame` arriving from a pod on `pod0`.
    pub fn tc(&mut self, frame: &[u8]) -> (i32, Vec<u8>) {
        self.tc_on(self.pod, frame)
    }

    /// Runs the tc program on `frame` arriving on `ifindex` (the uplink: what
    /// XDP handed on; a tunnel device: a reply from another node).
    pub fn tc_on(&mut self, ifindex: u32, frame: &[u8]) -> (i32, Vec<u8>) {
        let r = test_run::tc(self.dp.tc().unwrap(), frame, ifindex).unwrap();
        (r.ret, r.frame)
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        self.maps
            .reason_counters()
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .unwrap()
            .1
            .packets
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

pub const TCP: u8 = PROTO_TCP;
pub const UDP: u8 = lb_common::PROTO_UDP;
