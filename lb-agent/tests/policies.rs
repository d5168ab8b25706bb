//! What a Service spec says, in the datapath (crafted frames through
//! BPF_PROG_TEST_RUN, every output checked by etherparse with its checksums):
//! traffic policies, session affinity, loadBalancerSourceRanges, graceful
//! termination of TCP flows, and masquerade for clients from outside the
//! cluster. The maps are programmed through the agent's encoding (see
//! `support`). Needs root.

mod support;

use std::{collections::BTreeSet, time::Duration};

use lb_agent::model::{FrontendKind, FrontendSpec, Prefix, Scope};
use lb_common::Reason;
use support::{
    CLUSTER_IP, CLUSTER_IP_LOCAL, LOAD_BALANCER, Lab, NODE_PORT_LOCAL, TC_REDIRECT, TC_SHOT, TCP,
    UDP, XDP_DROP, XDP_PASS, XDP_TX, backend, fib::*, packet::*, sa,
};

/// A LoadBalancer IP with externalTrafficPolicy Local.
const LOAD_BALANCER_LOCAL: FrontendSpec = FrontendSpec {
    kind: FrontendKind::LoadBalancer,
    scope: Scope::Local,
    snat_remote: false,
};

/// The backend a frame went to.
fn sent_to(frame: &[u8]) -> std::net::SocketAddr {
    decode(frame).dst_addr()
}

#[test]
fn a_local_nodeport_without_a_local_endpoint_drops_new_flows_instead_of_refusing_them() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30100");
    lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.1.100:8080", false)],
        NODE_PORT_LOCAL,
    );
    lab.service(
        &[nodeport],
        UDP,
        &[backend("10.244.1.100:8080", false)],
        NODE_PORT_LOCAL,
    );
    let client = sa("198.51.100.9:40000");
    let (action, _) = lab.xdp(&syn(client, nodeport));
    assert_eq!(
        action, XDP_DROP,
        "no RST: a load balancer's check must see nothing"
    );
    let (action, _) = lab.xdp(&udp(FROM_ROUTER, client, nodeport, b"x"));
    assert_eq!(action, XDP_DROP, "no ICMP port unreachable either");
    assert_eq!(lab.reason(Reason::DropNoLocalEndpoint), 2);
    assert_eq!(lab.reason(Reason::RejectTcpReset), 0);
    assert_eq!(lab.reason(Reason::RejectIcmpUnreachable), 0);
}

#[test]
fn a_local_nodeport_uses_local_endpoints_only_and_keeps_the_client_address() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30101");
    lab.service(
        &[nodeport],
        TCP,
        &[
            backend("10.244.1.101:8080", false),
            backend("10.244.0.5:8080", true),
            backend("10.244.1.102:8080", false),
        ],
        NODE_PORT_LOCAL,
    );
    for port in 40_000..40_020 {
        let client = sa(&format!("198.51.100.9:{port}"));
        let (action, output) = lab.xdp(&syn(client, nodeport));
        assert_eq!(action, XDP_PASS, "to the local pod, through tc");
        // XDP hands a packet for a pod veth to tc untouched; tc sends it.
        let (action, output) = lab.tc_on(lab.uplink, &output);
        assert_eq!(action, TC_REDIRECT);
        let out = decode(&output);
        assert_eq!(out.dst_addr(), sa("10.244.0.5:8080"), "port {port}");
        assert_eq!(out.src_addr(), client, "the client's own address kept");
    }
}

#[test]
fn clients_inside_the_cluster_reach_every_endpoint_of_a_local_load_balancer_ip() {
    let mut lab = Lab::new();
    let lb_ip = sa("203.0.113.50:80");
    lab.service(
        &[lb_ip],
        TCP,
        &[backend("10.244.1.50:8080", false)],
        LOAD_BALANCER_LOCAL,
    );
    let pod = sa("10.244.0.5:41000");
    let from_pod = tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, lb_ip, SYN, 1, 0, &[]);
    // Without the cluster's CIDRs, a pod is a client like any other: no
    // local endpoint, dropped.
    let (action, _) = lab.tc(&from_pod);
    assert_eq!(action, TC_SHOT);
    assert_eq!(lab.reason(Reason::DropNoLocalEndpoint), 1);
    // With them, a pod is inside the cluster and goes cluster-wide, keeping
    // its address (no source NAT: the reply comes back through this node).
    lab.cluster_cidrs(&["10.244.0.0/16", "fd00:244::/48"]);
    let (action, output) = lab.tc(&from_pod);
    assert_eq!(action, TC_REDIRECT);
    let out = decode(&output);
    assert_eq!(
        (out.src_addr(), out.dst_addr()),
        (pod, sa("10.244.1.50:8080"))
    );
    // A client from outside still gets the Local policy.
    let (action, _) = lab.xdp(&syn(sa("198.51.100.50:41000"), lb_ip));
    assert_eq!(action, XDP_DROP);
    assert_eq!(lab.reason(Reason::DropNoLocalEndpoint), 2);
}

#[test]
fn internal_traffic_policy_local_without_a_local_endpoint_drops() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.110:80");
    lab.service(
        &[vip],
        TCP,
        &[backend("10.244.1.110:8080", false)],
        CLUSTER_IP_LOCAL,
    );
    let pod = sa("10.244.0.5:42000");
    let (action, output) = lab.tc(&tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, SYN, 1, 0, &[]));
    assert_eq!(
        action,
        TC_SHOT,
        "dropped, not answered with a RST: {}",
        describe(&output)
    );
    assert_eq!(lab.reason(Reason::DropNoLocalEndpoint), 1);
    assert_eq!(lab.reason(Reason::RejectTcpReset), 0);
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_until_its_timeout() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.120:80");
    let backends: Vec<_> = (1..=4)
        .map(|i| backend(&format!("10.244.1.{}:8080", 120 + i), false))
        .collect();
    let mut svc = lab.service(&[vip], TCP, &backends, CLUSTER_IP);
    let client = |port: u16| sa(&format!("198.51.100.12:{port}"));
    // Without affinity, one client's connections spread (Maglev over the
    // 5-tuple).
    let spread: BTreeSet<_> = (43_000..43_040)
        .map(|p| sent_to(&lab.xdp(&syn(client(p), vip)).1))
        .collect();
    assert!(spread.len() >= 3, "{spread:?}");

    svc.affinity_timeout = Some(1);
    lab.update(&svc);
    let first = sent_to(&lab.xdp(&syn(client(44_000), vip)).1);
    for p in 44_001..44_040 {
        assert_eq!(
            sent_to(&lab.xdp(&syn(client(p), vip)).1),
            first,
            "port {p}: a new connection of the same client"
        );
    }
    // Another client has an affinity of its own (not all go to `first`).
    let others: BTreeSet<_> = (20..=50)
        .map(|i| sent_to(&lab.xdp(&syn(sa(&format!("198.51.100.{i}:44100")), vip)).1))
        .collect();
    assert!(others.len() >= 3, "{others:?}");

    // After the timeout, a new connection is balanced afresh: Maglev's choice
    // for its 5-tuple, which for this port is not `first`.
    let fresh = (44_200..45_000)
        .map(client)
        .find(|c| svc.expected_backend(*c, vip, TCP) != first)
        .expect("a 5-tuple Maglev sends elsewhere");
    std::thread::sleep(Duration::from_millis(1_300));
    assert_eq!(
        sent_to(&lab.xdp(&syn(fresh, vip)).1),
        svc.expected_backend(fresh, vip, TCP)
    );

    // A backend that leaves takes its affinities with it.
    let now = sent_to(&lab.xdp(&syn(client(45_001), vip)).1);
    lab.remove_backend(&mut svc, now);
    let next = sent_to(&lab.xdp(&syn(client(45_002), vip)).1);
    assert_ne!(next, now);
    for p in 45_003..45_010 {
        assert_eq!(sent_to(&lab.xdp(&syn(client(p), vip)).1), next);
    }

    // Affinity off: spread again.
    svc.affinity_timeout = None;
    lab.update(&svc);
    let spread: BTreeSet<_> = (46_000..46_040)
        .map(|p| sent_to(&lab.xdp(&syn(client(p), vip)).1))
        .collect();
    assert!(spread.len() >= 2, "{spread:?}");
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients_in_both_families() {
    let mut lab = Lab::new();
    let v4 = sa("203.0.113.60:80");
    let v6 = sa("[2001:db8:60::1]:80");
    let mut svc4 = lab.service(
        &[v4],
        TCP,
        &[backend("10.244.1.60:8080", false)],
        LOAD_BALANCER,
    );
    let mut svc6 = lab.service(
        &[v6],
        TCP,
        &[backend("[fd00:244:1::60]:8080", false)],
        LOAD_BALANCER,
    );
    let inside4 = sa("198.51.100.61:47000");
    let outside4 = sa("192.0.2.200:47000");
    let inside6 = sa("[2001:db8:100::61]:47000");
    let outside6 = sa("[2001:db8:200::1]:47000");
    // Open to all before any range is set.
    assert_eq!(lab.xdp(&syn(outside4, v4)).0, XDP_TX);

    let ranges = |cidrs: &[&str]| -> Option<BTreeSet<Prefix>> {
        Some(cidrs.iter().map(|c| Prefix::parse(c).unwrap()).collect())
    };
    svc4.source_ranges = ranges(&["198.51.100.0/24"]);
    svc6.source_ranges = ranges(&["2001:db8:100::/64"]);
    lab.update(&svc4);
    lab.update(&svc6);
    // (New flows: the one opened above goes on, as kube-proxy's firewall
    // checks new connections only.)
    let outside4 = sa("192.0.2.200:47001");
    assert_eq!(
        lab.xdp(&tcp(
            FROM_ROUTER,
            sa("192.0.2.200:47000"),
            v4,
            ACK,
            2,
            1,
            &[]
        ))
        .0,
        XDP_TX
    );
    let (action, output) = lab.xdp(&syn(inside4, v4));
    assert_eq!(action, XDP_TX, "{}", describe(&output));
    assert_eq!(sent_to(&output), sa("10.244.1.60:8080"));
    assert_eq!(lab.xdp(&syn(outside4, v4)).0, XDP_DROP);
    let (action, output) = lab.xdp(&syn(inside6, v6));
    assert_eq!(action, XDP_TX);
    assert_eq!(sent_to(&output), sa("[fd00:244:1::60]:8080"));
    assert_eq!(lab.xdp(&syn(outside6, v6)).0, XDP_DROP);
    assert_eq!(lab.reason(Reason::DropSourceRange), 2);

    // Ranges of one Service port do not admit clients to another's.
    let other = sa("203.0.113.61:80");
    let mut svc_other = lab.service(
        &[other],
        TCP,
        &[backend("10.244.1.61:8080", false)],
        LOAD_BALANCER,
    );
    svc_other.source_ranges = ranges(&["192.0.2.0/24"]);
    lab.update(&svc_other);
    assert_eq!(lab.xdp(&syn(sa("198.51.100.62:47000"), other)).0, XDP_DROP);
    assert_eq!(lab.xdp(&syn(sa("192.0.2.201:47000"), other)).0, XDP_TX);

    // Ranges that all fail to parse leave the Service shut, not open.
    let closed = sa("203.0.113.62:80");
    let mut svc_closed = lab.service(
        &[closed],
        TCP,
        &[backend("10.244.1.62:8080", false)],
        LOAD_BALANCER,
    );
    svc_closed.source_ranges = Some(BTreeSet::new());
    lab.update(&svc_closed);
    assert_eq!(lab.xdp(&syn(inside4, closed)).0, XDP_DROP);
}

#[test]
fn a_tcp_flow_keeps_a_backend_that_left_its_slice() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.130:80");
    let mut svc = lab.service(
        &[vip],
        TCP,
        &[
            backend("10.244.1.131:8080", false),
            backend("10.244.1.132:8080", false),
        ],
        CLUSTER_IP,
    );
    let client = sa("198.51.100.13:48000");
    let first = sent_to(&lab.xdp(&syn(client, vip)).1);
    // A rolling update: the pod leaves the slice while it finishes its
    // connections.
    lab.remove_backend(&mut svc, first);
    let data = tcp(FROM_ROUTER, client, vip, ACK | PSH, 2, 1, b"more");
    let (action, output) = lab.xdp(&data);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(out.dst_addr(), first, "the connection stays where it was");
    // A new connection goes to the one left.
    let other = sent_to(&lab.xdp(&syn(sa("198.51.100.13:48001"), vip)).1);
    assert_ne!(other, first);
}

#[test]
fn clients_from_outside_the_cluster_are_masqueraded_to_a_remote_clusterip_backend() {
    let mut lab = Lab::new();
    lab.cluster_cidrs(&["10.244.0.0/16", "fd00:244::/48"]);
    let vip = sa("10.96.0.140:80");
    lab.service(
        &[vip],
        TCP,
        &[backend("10.244.1.140:8080", false)],
        CLUSTER_IP,
    );
    // From outside: source-NATed to the node, so the reply comes back here.
    let outside = sa("198.51.100.14:49000");
    let (action, output) = lab.xdp(&syn(outside, vip));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(out.dst_addr(), sa("10.244.1.140:8080"));
    let snat = out.src_addr();
    assert_eq!(snat.ip(), support::SNAT_V4);
    let reply = tcp(
        (NODE_B_MAC, UPLINK_MAC),
        sa("10.244.1.140:8080"),
        snat,
        SYN | ACK,
        9,
        1001,
        &[],
    );
    let (action, output) = lab.xdp(&reply);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, outside));
    // From a pod: its own address, as before.
    let pod = sa("10.244.0.5:49001");
    let (action, output) = lab.tc(&tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, SYN, 1, 0, &[]));
    assert_eq!(action, TC_REDIRECT);
    assert_eq!(decode(&output).src_addr(), pod);
}
