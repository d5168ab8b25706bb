//! Removing a frontend clears the conntrack entries of its UDP flows, as
//! kube-proxy clears UDP conntrack for the Service IPs and ports it removes,
//! and nothing else: TCP flows and flows to frontends that stay keep theirs.
//!
//! Services go through the agent's own sync engine into the maps of a
//! datapath in the one-node namespace (`lb_testbed::fib`, node-a at
//! 192.0.2.1 / 2001:db8::1); flows are opened with crafted frames through
//! BPF_PROG_TEST_RUN (read back by etherparse, checksums checked); a Service
//! is changed, the sync's report of removed UDP frontends goes to the
//! janitor (`lb_agent::conntrack::clear`, what the agent's janitor thread
//! runs), and the entries and the next packets of each flow show what
//! became of it. Needs root.

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    bpf::{Datapath, LoadOptions},
    cluster::{NodeInfo, ObjectKey},
    conntrack::{self, Cleared},
    model::{Frontend, Proto, Slice},
    reconcile::{Reconciler, StaleUdp, encoding::service_key},
    source::SourceEvent,
    sync::{Engine, SyncReport},
};
use lb_common::{CtEntry, FlowKey, Reason, ServiceKey};
use lb_testbed::{fib::FibNamespace, packet::L4, test_run};
use support::{
    SIZES, TC_NEXT, TC_REDIRECT, TC_SHOT, TCP, UDP, Wired, XDP_DROP, XDP_PASS, XDP_TX, fib::*,
    packet::*,
};

/// The Service `name` (namespace `t`), dual-stack with ClusterIPs `ips`:
/// port `port` over UDP (`u`) and TCP (`t`) to target port 5353, with
/// `node_port` a NodePort Service (externalTrafficPolicy Cluster), else a
/// ClusterIP one.
fn service(name: &str, ips: [&str; 2], port: u16, node_port: Option<u16>) -> Service {
    let (kind, np) = match node_port {
        Some(np) => ("NodePort", format!(", nodePort: {np}")),
        None => ("ClusterIP", String::new()),
    };
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {name}, namespace: t}}\n\
         spec:\n  type: {kind}\n  clusterIP: \"{v4}\"\n  clusterIPs: [\"{v4}\", \"{v6}\"]\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  \
         - {{name: u, port: {port}, protocol: UDP, targetPort: 5353{np}}}\n  \
         - {{name: t, port: {port}, protocol: TCP, targetPort: 5353{np}}}\n",
        v4 = ips[0],
        v6 = ips[1],
    ))
    .unwrap()
}

/// The slices of Service `name`: one endpoint (`addrs`, one per family) on
/// node `node`, serving both of its ports.
fn slices(name: &str, addrs: [&str; 2], node: &str) -> Vec<Slice> {
    addrs
        .iter()
        .zip(["IPv4", "IPv6"])
        .map(|(addr, family)| {
            let s: EndpointSlice = serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}-{family}, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: {family}\n\
                 ports: [{{name: u, port: 5353, protocol: UDP}}, {{name: t, port: 5353, protocol: TCP}}]\n\
                 endpoints: [{{addresses: [\"{addr}\"], nodeName: {node}}}]"
            ))
            .unwrap();
            Slice::from(&s)
        })
        .collect()
}

/// `dns`: NodePort Service whose one endpoint is on node-b (so the NodePort
/// source-NATs).
const DNS_IPS: [&str; 2] = ["10.96.5.10", "fd00:96::5:10"];
const DNS_POD: [&str; 2] = ["10.244.1.7", "fd00:244:1::7"];
/// `other`: a ClusterIP Service nobody touches.
const OTHER_IPS: [&str; 2] = ["10.96.5.11", "fd00:96::5:11"];
const OTHER_POD: [&str; 2] = ["10.244.1.8", "fd00:244:1::8"];
/// `self`: a ClusterIP Service whose endpoint is the local pod.
const SELF_IPS: [&str; 2] = ["10.96.5.12", "fd00:96::5:12"];
const LOCAL_POD: [&str; 2] = ["10.244.0.5", "fd00:244::5"];
const NODE: [&str; 2] = ["192.0.2.1", "2001:db8::1"];
const CLIENT: [&str; 2] = ["198.51.100.9", "2001:db8:100::9"];

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn udp_key(addr: SocketAddr) -> ServiceKey {
    service_key(&Frontend {
        addr: addr.ip(),
        port: addr.port(),
        proto: Proto::Udp,
    })
}

/// Where a flow's first packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum From {
    /// The local pod, through tc on its veth.
    Pod,
    /// A client behind the router, through XDP on the uplink.
    Outside,
}

/// A flow the datapath opened, as its first packet showed it.
#[derive(Clone, Debug)]
struct Flow {
    proto: u8,
    from: From,
    client: SocketAddr,
    frontend: SocketAddr,
    /// Where the first packet went, and the source it left with (the
    /// client, the node's address and a source-NAT port, or for a hairpin
    /// the frontend address).
    backend: SocketAddr,
    leaves_from: SocketAddr,
}

impl Flow {
    fn forward_key(&self) -> FlowKey {
        FlowKey::new(self.client, self.frontend, self.proto)
    }

    /// The reply's key, from what the wire showed (not from the entries).
    fn reply_key(&self) -> FlowKey {
        FlowKey::new(self.backend, self.leaves_from, self.proto)
    }
}

/// What became of a packet.
#[derive(Debug)]
enum Fate {
    /// Sent on (translated or not, or an answer the datapath made).
    Sent(Decoded),
    /// Handed to the kernel untouched.
    Passed,
    Dropped,
}

/// node-a: the datapath in the one-node namespace, its maps written by a
/// sync engine.
struct Node {
    dp: Datapath,
    engine: Engine,
    uplink: u32,
    pod: u32,
    // Last: the namespace goes after the programs and maps.
    _fib: FibNamespace,
}

impl Node {
    /// A node that has synced a listing of `services` and `slices`.
    fn new(services: Vec<Service>, slices: Vec<Slice>) -> Self {
        let Wired {
            dp,
            maps,
            uplink,
            pod,
            fib,
        } = Wired::new();
        let engine = Engine::new(
            Reconciler::adopt(maps).unwrap(),
            NodeInfo {
                name: "node-a".into(),
                addresses: NODE.iter().map(|a| a.parse().unwrap()).collect(),
                zone: None,
            },
        );
        let mut node = Self {
            dp,
            engine,
            uplink,
            pod,
            _fib: fib,
        };
        let first = node.sync(SourceEvent::Resync {
            services,
            slices,
            problems: Vec::new(),
        });
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        node
    }

    fn sync(&mut self, event: SourceEvent) -> SyncReport {
        self.engine.take(event);
        self.engine.sync().expect("a change to sync")
    }

    /// Runs the janitor over the maps for `gone`, as the agent's janitor
    /// thread does with each sync's report.
    fn clear(&mut self, gone: &StaleUdp) -> Cleared {
        let mut r = self.engine.reconciler();
        let maps = r.maps_mut();
        conntrack::clear(&mut maps.conntrack, &maps.services, gone).expect("the janitor's walk")
    }

    fn entry(&self, k: &FlowKey) -> Option<CtEntry> {
        self.engine.reconciler().maps().conntrack.get(k, 0).ok()
    }

    fn entries(&self) -> usize {
        self.engine.reconciler().maps().conntrack.keys().count()
    }

    fn reason(&self, reason: Reason) -> u64 {
        let r = self.engine.reconciler();
        let counters = r.maps().reason_counters().unwrap();
        counters
            .into_iter()
            .find(|(x, _)| *x == reason)
            .unwrap()
            .1
            .packets
    }

    /// Runs `frame` through tc on `ifindex`.
    fn tc(&mut self, ifindex: u32, frame: &[u8]) -> Fate {
        let r = test_run::tc(self.dp.tc().unwrap(), frame, ifindex).unwrap();
        match r.ret {
            TC_REDIRECT => Fate::Sent(decode(&r.frame)),
            TC_NEXT => {
                assert_eq!(r.frame, frame, "passed on changed");
                Fate::Passed
            }
            TC_SHOT => Fate::Dropped,
            other => panic!("tc returned {other}"),
        }
    }

    /// Runs `frame` through XDP on the uplink, and what XDP hands to tc
    /// through tc there (as the kernel would).
    fn xdp(&mut self, frame: &[u8]) -> Fate {
        let r = test_run::xdp(self.dp.xdp().unwrap(), frame, self.uplink, 1).unwrap();
        match r.ret {
            XDP_TX => Fate::Sent(decode(&r.frame)),
            XDP_PASS => {
                assert_eq!(r.frame, frame, "XDP passes packets on untouched");
                self.tc(self.uplink, frame)
            }
            XDP_DROP => Fate::Dropped,
            other => panic!("XDP returned {other}"),
        }
    }

    /// A packet of `proto` from `client` to `to`, arriving as `from` does: a
    /// datagram, or a TCP segment with `flags`.
    fn send(
        &mut self,
        from: From,
        proto: u8,
        client: SocketAddr,
        to: SocketAddr,
        flags: u8,
    ) -> Fate {
        let macs = match from {
            From::Pod => (LOCAL_POD_MAC, POD_GW_MAC),
            From::Outside => FROM_ROUTER,
        };
        let frame = if proto == UDP {
            udp(macs, client, to, b"query")
        } else {
            tcp(macs, client, to, flags, 1000, 1, &[])
        };
        match from {
            From::Pod => self.tc(self.pod, &frame),
            From::Outside => self.xdp(&frame),
        }
    }

    /// Opens a flow (a datagram, a SYN) and checks that both of its entries
    /// are where the wire says.
    fn open(&mut self, from: From, proto: u8, client: SocketAddr, frontend: SocketAddr) -> Flow {
        let flags = if proto == TCP { SYN } else { 0 };
        let Fate::Sent(out) = self.send(from, proto, client, frontend, flags) else {
            panic!("{client} -> {frontend} (proto {proto}) not sent");
        };
        let f = Flow {
            proto,
            from,
            client,
            frontend,
            backend: out.dst_addr(),
            leaves_from: out.src_addr(),
        };
        let fwd = self.entry(&f.forward_key()).expect("forward entry");
        assert_eq!(
            (fwd.nat_src_port, fwd.nat_dst_port),
            (f.leaves_from.port(), f.backend.port())
        );
        assert!(self.entry(&f.reply_key()).is_some(), "reply entry of {f:?}");
        f
    }

    /// The flow's next packet (a datagram, an ACK): where it went.
    fn again(&mut self, f: &Flow) -> Fate {
        self.send(f.from, f.proto, f.client, f.frontend, ACK)
    }

    /// Whether the flow's next packet reaches its backend, from where it left.
    fn reaches_backend(&mut self, f: &Flow) -> bool {
        match self.again(f) {
            Fate::Sent(out) => out.ports() == Some((f.leaves_from, f.backend)),
            _ => false,
        }
    }

    /// The backend answers: the reply comes back translated to the client.
    fn reply_returns(&mut self, f: &Flow) -> bool {
        let local = LOCAL_POD
            .iter()
            .any(|p| f.backend.ip() == p.parse::<IpAddr>().unwrap());
        let fate = if local {
            let frame = udp(
                (LOCAL_POD_MAC, POD_GW_MAC),
                f.backend,
                f.leaves_from,
                b"answer",
            );
            self.tc(self.pod, &frame)
        } else {
            let frame = udp(
                (NODE_B_MAC, UPLINK_MAC),
                f.backend,
                f.leaves_from,
                b"answer",
            );
            self.xdp(&frame)
        };
        matches!(fate, Fate::Sent(out) if out.ports() == Some((f.frontend, f.client)))
    }

    /// Both entries of `f` are there (`true`) or both gone.
    fn has_entries(&self, f: &Flow) -> (bool, bool) {
        (
            self.entry(&f.forward_key()).is_some(),
            self.entry(&f.reply_key()).is_some(),
        )
    }
}

/// The flows of one family through `dns` at `port` / `node_port`: a pod's
/// and an outside client's (source-NATed), UDP and TCP.
fn open_dns_flows(node: &mut Node, v6: bool, port: u16, node_port: u16) -> [Flow; 4] {
    let i = usize::from(v6);
    let pod = |p| at(LOCAL_POD[i], p);
    let client = |p| at(CLIENT[i], p);
    let vip = at(DNS_IPS[i], port);
    let np = at(NODE[i], node_port);
    [
        node.open(From::Pod, UDP, pod(40_000), vip),
        node.open(From::Outside, UDP, client(40_001), np),
        node.open(From::Pod, TCP, pod(40_002), vip),
        node.open(From::Outside, TCP, client(40_003), np),
    ]
}

/// A node serving `dns` (port 53, nodePort 30053) with its flows of both
/// families open (see [`open_dns_flows`]).
fn dns_node_with_flows() -> (Node, Vec<Flow>) {
    let mut node = Node::new(
        vec![service("dns", DNS_IPS, 53, Some(30_053))],
        slices("dns", DNS_POD, "node-b"),
    );
    let mut flows = Vec::new();
    for v6 in [false, true] {
        flows.extend(open_dns_flows(&mut node, v6, 53, 30_053));
    }
    (node, flows)
}

#[test]
fn a_backend_leaving_a_udp_port_clears_that_ports_flows_to_it_only() {
    // DNS_POD serves `dns` and `other`; it leaves `dns`'s slices for
    // OTHER_POD, and stays a backend (of `other`), so the datapath's check
    // that a flow's backend still exists passes: only the janitor moves the
    // flows.
    let mut all_slices = slices("dns", DNS_POD, "node-b");
    all_slices.extend(slices("other", DNS_POD, "node-b"));
    let mut node = Node::new(
        vec![
            service("dns", DNS_IPS, 53, None),
            service("other", OTHER_IPS, 53, None),
        ],
        all_slices,
    );
    let pod = |i: usize, p| at(LOCAL_POD[i], p);
    let mut left = Vec::new();
    let mut kept = Vec::new();
    for i in 0..2 {
        left.push(node.open(From::Pod, UDP, pod(i, 41_000), at(DNS_IPS[i], 53)));
        kept.push(node.open(From::Pod, UDP, pod(i, 41_001), at(OTHER_IPS[i], 53)));
        kept.push(node.open(From::Pod, TCP, pod(i, 41_002), at(DNS_IPS[i], 53)));
    }
    let mut gone = StaleUdp::default();
    for s in slices("dns", OTHER_POD, "node-b") {
        let report = node.sync(SourceEvent::SliceApplied(Box::new(s)));
        assert!(report.stats.udp_gone.frontends.is_empty());
        gone.extend(report.stats.udp_gone);
    }
    assert_eq!(
        gone.backends.len(),
        2,
        "dns's UDP port, each family: {gone:?}"
    );
    // Before the janitor, the flows still reach the backend that left.
    for f in &left {
        assert!(node.reaches_backend(f), "stale before the janitor: {f:?}");
    }
    let cleared = node.clear(&gone);
    assert_eq!((cleared.forward, cleared.reply), (2, 2), "{cleared:?}");
    for f in &left {
        assert_eq!(node.has_entries(f), (false, false), "{f:?}");
        // The next datagram opens the flow again, to the port's backend now.
        let Fate::Sent(out) = node.again(f) else {
            panic!("{f:?} not sent after the janitor");
        };
        let now = out.ports().expect("ports").1;
        assert!(
            OTHER_POD.contains(&now.ip().to_string().as_str()),
            "{f:?} went to {now}"
        );
    }
    for f in &kept {
        assert_eq!(node.has_entries(f), (true, true), "{f:?}");
        assert!(node.reaches_backend(f), "{f:?}");
    }
}

#[test]
fn renumbering_a_port_clears_its_udp_flows_and_keeps_tcp_ones() {
    let (mut node, flows) = dns_node_with_flows();
    let udp_flows: Vec<Flow> = flows.iter().filter(|f| f.proto == UDP).cloned().collect();
    let tcp_flows: Vec<Flow> = flows.iter().filter(|f| f.proto == TCP).cloned().collect();
    for f in &udp_flows {
        assert!(node.reply_returns(f), "before: {f:?}");
        if f.from == From::Outside {
            let node_ip: IpAddr = NODE[usize::from(f.client.is_ipv6())].parse().unwrap();
            assert_eq!(f.leaves_from.ip(), node_ip, "source-NATed: {f:?}");
        }
    }
    assert_eq!(node.entries(), 2 * flows.len());

    // Port 53 -> 54, nodePort 30053 -> 30054.
    let report = node.sync(SourceEvent::ServiceApplied(Box::new(service(
        "dns",
        DNS_IPS,
        54,
        Some(30_054),
    ))));
    let old: BTreeSet<ServiceKey> = (0..2)
        .flat_map(|i| [udp_key(at(DNS_IPS[i], 53)), udp_key(at(NODE[i], 30_053))])
        .collect();
    assert_eq!(
        &report.stats.udp_gone.frontends, &old,
        "the old UDP frontends, no TCP one"
    );

    // The frontends are gone, but a pod's flow to the ClusterIP still goes
    // where it went: the forward entry takes it there without looking at
    // `services` (the address keeps its `addr_filter` bit for port 54).
    // The old NodePort's bit is gone, so its datagrams skip the lookups,
    // unless another frontend's bit collides with it; its entries are there
    // all the same, and so is every reply entry.
    for f in &udp_flows {
        assert_eq!(node.has_entries(f), (true, true), "{f:?}");
        if f.from == From::Pod {
            assert!(node.reaches_backend(f), "stale before the janitor: {f:?}");
        }
    }

    let cleared = node.clear(&report.stats.udp_gone);
    assert_eq!(
        (cleared.forward, cleared.reply, cleared.complete),
        (4, 4, true),
        "{cleared:?}"
    );
    // (One batch holds this whole map: every entry is seen before any goes.)
    assert_eq!(cleared.walked, 2 * flows.len());
    assert_eq!(node.entries(), 2 * tcp_flows.len());
    for f in &udp_flows {
        assert_eq!(node.has_entries(f), (false, false), "{f:?}");
    }
    for f in &tcp_flows {
        assert_eq!(node.has_entries(f), (true, true), "{f:?}");
    }

    // The next datagram of each UDP flow reaches no backend: the ClusterIP's
    // old port is refused (its address still has a Service port), the old
    // NodePort goes to the node's own stack.
    let refused = node.reason(Reason::RejectIcmpUnreachable);
    for f in &udp_flows {
        match (f.from, node.again(f)) {
            (From::Pod, Fate::Sent(out)) => {
                assert!(matches!(out.l4, L4::IcmpError { .. }), "{out:?}");
                assert_eq!(out.dst, f.client.ip(), "the refusal goes to the client");
            }
            (From::Outside, Fate::Passed) => {}
            (_, fate) => panic!("{f:?} after the janitor: {fate:?}"),
        }
    }
    assert_eq!(node.reason(Reason::RejectIcmpUnreachable), refused + 2);
    // TCP flows keep their entries (they end by FIN/RST or idle); the pods'
    // to the ClusterIP, whose address is still served, go on to their
    // backend. (The old NodePort's segments skip the lookups: its
    // `addr_filter` bit is gone.)
    for f in tcp_flows.iter().filter(|f| f.from == From::Pod) {
        assert!(node.reaches_backend(f), "TCP after the janitor: {f:?}");
    }
    for f in &tcp_flows {
        assert_eq!(node.has_entries(f), (true, true), "{f:?}");
    }
    // The same client tuples reach the new port: new flows.
    for v6 in [false, true] {
        let i = usize::from(v6);
        for (from, client, to) in [
            (From::Pod, at(LOCAL_POD[i], 40_000), at(DNS_IPS[i], 54)),
            (From::Outside, at(CLIENT[i], 40_001), at(NODE[i], 30_054)),
        ] {
            let f = node.open(from, UDP, client, to);
            assert_eq!(f.backend, at(DNS_POD[i], 5353));
            assert!(node.reply_returns(&f), "{f:?}");
        }
    }
}

#[test]
fn a_type_change_clears_the_udp_flows_of_the_frontends_it_takes_away_only() {
    let (mut node, flows) = dns_node_with_flows();
    // NodePort -> ClusterIP: the node ports go, the ClusterIP stays.
    let report = node.sync(SourceEvent::ServiceApplied(Box::new(service(
        "dns", DNS_IPS, 53, None,
    ))));
    let node_ports: BTreeSet<ServiceKey> = (0..2).map(|i| udp_key(at(NODE[i], 30_053))).collect();
    assert_eq!(&report.stats.udp_gone.frontends, &node_ports);
    let cleared = node.clear(&report.stats.udp_gone);
    assert_eq!((cleared.forward, cleared.reply), (2, 2), "{cleared:?}");
    for f in &flows {
        let gone = f.proto == UDP && f.from == From::Outside;
        if gone {
            assert_eq!(node.has_entries(f), (false, false), "{f:?}");
            assert!(matches!(node.again(f), Fate::Passed), "{f:?}");
        } else {
            // The pods' flows to the ClusterIP, which stays, go on; TCP
            // through the NodePort keeps its entries.
            assert_eq!(node.has_entries(f), (true, true), "{f:?}");
            if f.from == From::Pod {
                assert!(node.reaches_backend(f), "{f:?}");
            }
        }
    }
    for f in flows
        .iter()
        .filter(|f| f.proto == UDP && f.from == From::Pod)
    {
        assert!(node.reply_returns(f), "{f:?}");
    }
}

#[test]
fn deleting_a_service_clears_its_udp_flows_hairpins_included_and_no_others() {
    let mut all_slices = slices("dns", DNS_POD, "node-b");
    all_slices.extend(slices("other", OTHER_POD, "node-b"));
    all_slices.extend(slices("self", LOCAL_POD, "node-a"));
    let mut node = Node::new(
        vec![
            service("dns", DNS_IPS, 53, Some(30_053)),
            service("other", OTHER_IPS, 53, None),
            service("self", SELF_IPS, 53, None),
        ],
        all_slices,
    );
    let mut doomed = Vec::new();
    let mut kept = Vec::new();
    for v6 in [false, true] {
        let i = usize::from(v6);
        for f in open_dns_flows(&mut node, v6, 53, 30_053) {
            if f.proto == UDP {
                doomed.push(f);
            } else {
                kept.push(f);
            }
        }
        // A pod reaching itself through `self`: source-NATed to the VIP.
        let hairpin = node.open(
            From::Pod,
            UDP,
            at(LOCAL_POD[i], 41_000),
            at(SELF_IPS[i], 53),
        );
        assert_eq!(hairpin.backend, at(LOCAL_POD[i], 5353));
        assert_eq!(hairpin.leaves_from, at(SELF_IPS[i], 41_000));
        assert!(node.reply_returns(&hairpin), "{hairpin:?}");
        doomed.push(hairpin);
        // The same client port to `other`, which stays.
        kept.push(node.open(
            From::Pod,
            UDP,
            at(LOCAL_POD[i], 40_000),
            at(OTHER_IPS[i], 53),
        ));
    }
    let before = node.entries();
    assert_eq!(before, 2 * (doomed.len() + kept.len()));

    let mut gone = StaleUdp::default();
    for name in ["dns", "self"] {
        let report = node.sync(SourceEvent::ServiceDeleted(ObjectKey::new("t", name)));
        gone.extend(report.stats.udp_gone);
    }
    // Two syncs' removals in one walk, as the janitor batches them.
    assert_eq!(
        gone.frontends.len(),
        6,
        "dns: 2 ClusterIPs, 2 node ports; self: 2 ClusterIPs"
    );
    let cleared = node.clear(&gone);
    assert_eq!(
        (cleared.forward, cleared.reply),
        (doomed.len(), doomed.len()),
        "{cleared:?}"
    );
    assert_eq!(node.entries(), before - 2 * doomed.len());
    for f in &doomed {
        assert_eq!(node.has_entries(f), (false, false), "{f:?}");
        // No address entry is left either: nothing of lb's, to the kernel.
        assert!(matches!(node.again(f), Fate::Passed), "{f:?}");
    }
    for f in &kept {
        assert_eq!(node.has_entries(f), (true, true), "{f:?}");
        if f.proto == UDP {
            // `other`'s.
            assert!(node.reaches_backend(f), "{f:?}");
        }
    }
    // A second walk finds nothing more.
    let again = node.clear(&gone);
    assert_eq!(again.entries(), 0, "{again:?}");
}

#[test]
fn a_reply_entry_left_without_its_forward_entry_is_cleared_too() {
    let mut node = Node::new(
        vec![service("dns", DNS_IPS, 53, Some(30_053))],
        slices("dns", DNS_POD, "node-b"),
    );
    let f = node.open(
        From::Outside,
        UDP,
        at(CLIENT[0], 40_001),
        at(NODE[0], 30_053),
    );
    // As when the LRU evicted the forward entry.
    node.engine
        .reconciler()
        .maps_mut()
        .conntrack
        .remove(&f.forward_key())
        .unwrap();
    let report = node.sync(SourceEvent::ServiceDeleted(ObjectKey::new("t", "dns")));
    let cleared = node.clear(&report.stats.udp_gone);
    assert_eq!((cleared.forward, cleared.reply), (0, 1), "{cleared:?}");
    // That entry was all that held the flow's source-NAT port.
    assert_eq!(node.has_entries(&f), (false, false));
    assert_eq!(node.entries(), 0);
}

/// The janitor's walk over a big map: 200,000 entries (100,000 flows, 1 in
/// 50 to a removed frontend), walked in some fifty batches while it deletes,
/// all of the stale flows' entries deleted and no other (the time it took is
/// printed, not judged).
#[test]
fn one_walk_over_200_000_entries_clears_exactly_the_stale_flows() {
    use lb_agent::bpf::Sizes;
    use lb_common::{CT_F_FORWARD, CT_F_REPLY};

    const FLOWS: u32 = 100_000;
    const STALE_EVERY: u32 = 50;
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: None,
        sizes: Sizes {
            conntrack: 1 << 18,
            ..SIZES
        },
        log_level: None,
    })
    .expect("load datapath");
    let mut maps = dp.take_maps().unwrap();
    let gone = at("10.96.9.1", 53);
    let live = at("10.96.9.2", 53);
    let t0 = std::time::Instant::now();
    for i in 0..FLOWS {
        let client = SocketAddr::new(
            IpAddr::from([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            40_000,
        );
        let frontend = if i % STALE_EVERY == 0 { gone } else { live };
        let backend = at("10.244.9.9", 5353);
        let fk = FlowKey::new(client, frontend, UDP);
        let rk = FlowKey::new(backend, client, UDP);
        let value = |from: SocketAddr, to: SocketAddr, flags| {
            let mut v = CtEntry {
                flags,
                service: 1,
                backend: 1,
                nat_src_port: from.port(),
                nat_dst_port: to.port(),
                ..CtEntry::default()
            };
            v.nat_src = lb_common::addr16(from.ip()).0;
            v.nat_dst = lb_common::addr16(to.ip()).0;
            v
        };
        maps.conntrack
            .insert(fk, value(client, backend, CT_F_FORWARD), 0)
            .unwrap();
        // Every flow has the same backend: reply keys differ by client.
        maps.conntrack
            .insert(rk, value(frontend, client, CT_F_REPLY), 0)
            .unwrap();
    }
    let filled = t0.elapsed();
    let present = maps.conntrack.keys().count();
    assert_eq!(present, 2 * FLOWS as usize, "the LRU evicted while filling");
    let t1 = std::time::Instant::now();
    let cleared = conntrack::clear(
        &mut maps.conntrack,
        &maps.services,
        &StaleUdp {
            frontends: BTreeSet::from([udp_key(gone)]),
            backends: BTreeSet::new(),
        },
    )
    .unwrap();
    let took = t1.elapsed();
    let stale = (FLOWS / STALE_EVERY) as usize;
    assert_eq!(
        (cleared.forward, cleared.reply, cleared.complete),
        (stale, stale, true)
    );
    // Every entry, but for replies deleted with their forward entry before
    // the walk reached their bucket.
    assert!(
        (present - stale..=present).contains(&cleared.walked),
        "{cleared:?}"
    );
    assert_eq!(maps.conntrack.keys().count(), present - 2 * stale);
    println!(
        "filled {present} entries in {filled:?}; one walk of {} entries cleared {} ({} forward, {} reply) in {took:?}",
        cleared.walked,
        cleared.entries(),
        cleared.forward,
        cleared.reply
    );
}

/// A TCP connection outlives its backend's leaving every Service port (a pod
/// turned not Ready, or taken out of its slices while it runs), as with
/// kube-proxy's conntrack: the backend keeps its `addr_filter` bit, so its
/// replies are still looked up and translated, until a sweep of conntrack
/// finds no flow of it; then the bit is released.
#[test]
fn a_tcp_flow_outlives_its_backend_leaving_every_port_until_its_flows_end() {
    use lb_agent::reconcile::{departed::FlowBackends, encoding::FilterKey};

    let mut node = Node::new(
        vec![service("dns", DNS_IPS, 53, None)],
        slices("dns", DNS_POD, "node-b"),
    );
    let flows = lb_agent::reconcile::departed::SharedFlowBackends::default();
    node.engine.reconciler().follow_flows(flows.clone());
    let tcp_flows: Vec<Flow> = (0..2)
        .map(|i| node.open(From::Pod, TCP, at(LOCAL_POD[i], 42_000), at(DNS_IPS[i], 53)))
        .collect();
    let bit_set = |node: &Node, backend: SocketAddr| {
        let bit = FilterKey::backend(backend).bit();
        let word = node
            .engine
            .reconciler()
            .maps()
            .addr_filter
            .get(&(bit / 64), 0)
            .unwrap();
        word & (1 << (bit % 64)) != 0
    };
    // The backend's SYN-ACK, from node-b through XDP on the uplink.
    let answer = |node: &mut Node, f: &Flow| {
        let frame = tcp(
            (NODE_B_MAC, UPLINK_MAC),
            f.backend,
            f.leaves_from,
            SYN | ACK,
            5000,
            1001,
            &[],
        );
        match node.xdp(&frame) {
            Fate::Sent(out) => out.ports(),
            _ => None,
        }
    };
    for f in &tcp_flows {
        assert_eq!(answer(&mut node, f), Some((f.frontend, f.client)), "{f:?}");
    }

    // DNS_POD leaves dns's slices (OTHER_POD takes its place): it is a
    // backend of no port now.
    for s in slices("dns", OTHER_POD, "node-b") {
        node.sync(SourceEvent::SliceApplied(Box::new(s)));
    }
    assert_eq!(node.engine.reconciler().departed_backends(), 2);
    for f in &tcp_flows {
        assert!(
            bit_set(&node, f.backend),
            "{} lost its filter bit",
            f.backend
        );
        assert_eq!(
            answer(&mut node, f),
            Some((f.frontend, f.client)),
            "the reply of {f:?} after its backend left"
        );
        assert!(node.reaches_backend(f), "{f:?}");
    }

    // A sweep finds the flows: the bits stay, also through a verify pass.
    let now = conntrack::datapath_now();
    let sweep = |node: &mut Node, at: u64| {
        let from = std::time::Instant::now();
        let s = {
            let mut r = node.engine.reconciler();
            conntrack::expire(&mut r.maps_mut().conntrack, at).unwrap()
        };
        assert!(s.complete);
        *flows.lock().unwrap() = FlowBackends {
            swept_from: Some(from),
            held: s.backends.clone(),
        };
        let drift = node.engine.verify().expect("synced").unwrap();
        assert_eq!(drift.total(), 0, "{drift:?}");
        s
    };
    let s = sweep(&mut node, now);
    for f in &tcp_flows {
        assert!(s.backends.contains(&f.backend), "{s:?}");
        assert!(bit_set(&node, f.backend));
        assert_eq!(answer(&mut node, f), Some((f.frontend, f.client)));
    }
    assert_eq!(node.engine.reconciler().departed_backends(), 2);

    // The flows end (expired, as if idle past their state's limit): the next
    // sweep finds none of them, and the bits go.
    let s = sweep(&mut node, now + 2 * lb_common::CT_TCP_ESTABLISHED_NS);
    assert_eq!(s.flows, 2, "{s:?}");
    assert_eq!(node.engine.reconciler().departed_backends(), 0);
    for f in &tcp_flows {
        assert!(!bit_set(&node, f.backend), "{} kept its bit", f.backend);
    }
    // The new backend's bits are untouched.
    for p in OTHER_POD {
        assert!(bit_set(&node, at(p, 5353)), "{p}");
    }
}
