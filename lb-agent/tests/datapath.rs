//! The datapath, packet by packet: crafted frames through BPF_PROG_TEST_RUN, the
//! output decoded by etherparse with every checksum recomputed.
//! Needs root (BPF, network namespaces).

mod support;

use lb_agent::bpf::NodeConfig;
use lb_common::Reason;
use support::{
    CLUSTER_IP, Lab, NODE_PORT, TCP, UDP, XDP_DROP, XDP_PASS, XDP_TX, backend, fib::*, flow_key,
    packet::*, sa,
};

#[test]
fn clusterip_syn_goes_to_the_maglev_backend_and_the_reply_comes_back_from_the_vip() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.10:80");
    let svc = lab.service(
        &[vip],
        TCP,
        &[
            backend("10.244.1.10:8080", false),
            backend("10.244.1.11:8080", false),
        ],
        CLUSTER_IP,
    );
    let client = sa("198.51.100.7:40000");
    let input = syn(client, vip);
    let (action, output) = lab.xdp(&input);
    println!("input : {}", describe(&input));
    println!("output: {}", describe(&output));
    assert_eq!(
        action, XDP_TX,
        "remote backend behind the uplink: sent back out"
    );
    let out = decode(&output);
    let chosen = svc.expected_backend(client, vip, TCP);
    assert_eq!(out.src_addr(), client, "no SNAT inside the cluster");
    assert_eq!(out.dst_addr(), chosen);
    assert_eq!(out.eth_dst, NODE_B_MAC, "next hop: node B");
    assert_eq!(out.eth_src, UPLINK_MAC);
    assert_eq!(out.ttl, 63);

    // The backend answers the client; the client must see the VIP.
    let reply = tcp(
        (NODE_B_MAC, UPLINK_MAC),
        chosen,
        client,
        SYN | ACK,
        5000,
        1001,
        &[],
    );
    let (action, output) = lab.xdp(&reply);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(out.src_addr(), vip);
    assert_eq!(out.dst_addr(), client);
    assert_eq!(out.eth_dst, ROUTER_MAC);
    assert_eq!(lab.reason(Reason::Tx), 2);
}

#[test]
fn ipv6_clusterip_round_trip() {
    let mut lab = Lab::new();
    let vip = sa("[fd00:96::10]:443");
    let svc = lab.service(
        &[vip],
        TCP,
        &[
            backend("[fd00:244:1::10]:8443", false),
            backend("[fd00:244:1::11]:8443", false),
        ],
        CLUSTER_IP,
    );
    let client = sa("[2001:db8:100::7]:50000");
    let (action, output) = lab.xdp(&syn(client, vip));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    let chosen = svc.expected_backend(client, vip, TCP);
    assert_eq!((out.src_addr(), out.dst_addr()), (client, chosen));
    assert_eq!(out.eth_dst, NODE_B_MAC);
    assert_eq!(out.ttl, 63, "hop limit decremented");
    let reply = tcp(
        (NODE_B_MAC, UPLINK_MAC),
        chosen,
        client,
        SYN | ACK,
        1,
        1001,
        b"hello",
    );
    let (action, output) = lab.xdp(&reply);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, client));
    assert_eq!(out.payload, b"hello");
}

#[test]
fn udp_datagrams_are_translated_both_ways() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.53:53");
    let svc = lab.service(
        &[vip],
        UDP,
        &[backend("10.244.1.53:5353", false)],
        CLUSTER_IP,
    );
    let client = sa("198.51.100.9:33333");
    let (action, output) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"query"));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(out.dst_addr(), sa("10.244.1.53:5353"));
    assert_eq!(out.payload, b"query");
    let (_, output) = lab.xdp(&udp(
        (NODE_B_MAC, UPLINK_MAC),
        sa("10.244.1.53:5353"),
        client,
        b"answer",
    ));
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, client));
    assert_eq!(lab.maps.service_counters(svc.id).unwrap().packets, 2);
    assert_eq!(
        lab.maps
            .backend_counters(svc.backends[0].0)
            .unwrap()
            .packets,
        2
    );
}

#[test]
fn a_flow_stays_on_its_backend_when_the_backend_set_changes() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.20:80");
    let mut svc = lab.service(&[vip], TCP, &[backend("10.244.1.20:80", false)], CLUSTER_IP);
    // Open 50 flows, all on the only backend.
    let clients: Vec<_> = (0..50)
        .map(|i| sa(&format!("198.51.100.20:{}", 20_000 + i)))
        .collect();
    for c in &clients {
        let (_, out) = lab.xdp(&syn(*c, vip));
        assert_eq!(decode(&out).dst_addr(), sa("10.244.1.20:80"));
    }
    // Four more backends: Maglev now sends most new flows elsewhere...
    for i in 21..25 {
        lab.add_backend(&mut svc, sa(&format!("10.244.1.{i}:80")), false);
    }
    let moved = clients
        .iter()
        .filter(|c| svc.expected_backend(**c, vip, TCP) != sa("10.244.1.20:80"))
        .count();
    assert!(
        moved > 20,
        "the new table must move many of these tuples ({moved})"
    );
    // ...but established flows keep their backend.
    for c in &clients {
        let (_, out) = lab.xdp(&tcp(FROM_ROUTER, *c, vip, ACK, 1001, 1, b"data"));
        assert_eq!(
            decode(&out).dst_addr(),
            sa("10.244.1.20:80"),
            "flow from {c} moved"
        );
    }
}

/// A client that closed a connection (by RST: no TIME_WAIT stops it from
/// reusing the port at once) and connects again from the same port gets a
/// new connection, balanced afresh, not the closed one's backend, which may
/// be gone (the kernel's conntrack, too, opens a new connection on a SYN in
/// its closing states). The old flow's reply entry goes with it. A SYN that
/// was never answered follows a removed backend no more than a UDP stream;
/// an established connection keeps its backend whatever it receives.
#[test]
fn a_syn_reusing_a_closed_connections_port_is_balanced_afresh() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.25:80");
    let (a, b) = (sa("10.244.1.25:80"), sa("10.244.1.26:80"));
    let mut svc = lab.service(&[vip], TCP, &[backend(&a.to_string(), false)], CLUSTER_IP);
    let (closed, established, unanswered) = (
        sa("198.51.100.25:40000"),
        sa("198.51.100.25:40001"),
        sa("198.51.100.25:40002"),
    );
    for c in [closed, established] {
        let (_, out) = lab.xdp(&syn(c, vip));
        assert_eq!(decode(&out).dst_addr(), a);
        lab.xdp(&tcp(
            (NODE_B_MAC, UPLINK_MAC),
            a,
            c,
            SYN | ACK,
            7,
            1001,
            &[],
        ));
        lab.xdp(&tcp(FROM_ROUTER, c, vip, ACK, 1001, 8, &[]));
    }
    lab.xdp(&tcp(FROM_ROUTER, closed, vip, RST | ACK, 1001, 8, &[]));
    let (_, out) = lab.xdp(&syn(unanswered, vip));
    assert_eq!(decode(&out).dst_addr(), a);
    // The only backend is replaced.
    lab.add_backend(&mut svc, b, false);
    lab.remove_backend(&mut svc, a);

    for c in [closed, unanswered] {
        let (action, out) = lab.xdp(&syn(c, vip));
        assert_eq!(action, XDP_TX);
        assert_eq!(
            decode(&out).dst_addr(),
            b,
            "the SYN from {c} must go to the live backend"
        );
        let (_, out) = lab.xdp(&tcp(
            (NODE_B_MAC, UPLINK_MAC),
            b,
            c,
            SYN | ACK,
            9,
            1001,
            &[],
        ));
        let out = decode(&out);
        assert_eq!((out.src_addr(), out.dst_addr()), (vip, c));
    }
    // The closed connection's reply entry went with it; the established
    // one's stays.
    let reply_of = |c| lab.maps.conntrack.get(&flow_key(a, c, TCP), 0).is_ok();
    assert!(
        !reply_of(closed),
        "the closed connection's reply entry stays"
    );
    assert!(reply_of(established));
    // The established connection stays where it was, even when its client
    // sends a SYN on it (the backend answers that with a challenge ACK).
    for flags in [SYN, ACK] {
        let (_, out) = lab.xdp(&tcp(FROM_ROUTER, established, vip, flags, 1001, 8, &[]));
        assert_eq!(decode(&out).dst_addr(), a, "flags {flags:#x}");
    }
}

#[test]
fn a_udp_flow_moves_off_a_removed_backend() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.30:5000");
    let mut svc = lab.service(
        &[vip],
        UDP,
        &[
            backend("10.244.1.30:5000", false),
            backend("10.244.1.31:5000", false),
        ],
        CLUSTER_IP,
    );
    let client = sa("198.51.100.30:40000");
    let (_, out) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"1"));
    let first = decode(&out).dst_addr();
    lab.remove_backend(&mut svc, first);
    let (action, out) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"2"));
    assert_eq!(action, XDP_TX);
    let second = decode(&out).dst_addr();
    assert_ne!(
        second, first,
        "the stream must not black-hole on the removed backend"
    );
    assert!(svc.backends.iter().any(|b| b.1 == second));
    // And the replies of its new backend come back from the VIP.
    let (_, out) = lab.xdp(&udp((NODE_B_MAC, UPLINK_MAC), second, client, b"r"));
    assert_eq!(decode(&out).src_addr(), vip);
}

#[test]
fn nodeport_to_a_remote_backend_is_source_natted_and_the_reply_restored() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30080");
    let svc = lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.1.40:8080", false)],
        NODE_PORT,
    );
    let client = sa("198.51.100.40:45000");
    let (action, output) = lab.xdp(&syn(client, nodeport));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    let snat = out.src_addr();
    assert_eq!(
        snat.ip().to_string(),
        "192.0.2.1",
        "leaves with the node's address"
    );
    assert!((support::SNAT_PORTS.0..=support::SNAT_PORTS.1).contains(&snat.port()));
    assert_eq!(out.dst_addr(), sa("10.244.1.40:8080"));
    // The backend answers the node; the client gets it from the NodePort.
    let (action, output) = lab.xdp(&tcp(
        (NODE_B_MAC, UPLINK_MAC),
        sa("10.244.1.40:8080"),
        snat,
        SYN | ACK,
        7,
        1001,
        &[],
    ));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
    assert_eq!(out.eth_dst, ROUTER_MAC);
    // A second client gets a different SNAT port.
    let (_, output) = lab.xdp(&syn(sa("198.51.100.41:45000"), nodeport));
    assert_ne!(decode(&output).src_addr(), snat);
    let _ = svc;
}

/// With the default range (every port from 1024), a source-NATed flow keeps
/// its client's port where that is free toward its backend, as Linux's
/// masquerade does; a second client with the same port gets another one, and a
/// port a local socket listens on is never taken (its replies would go to the
/// socket's owner, or the flow's to the socket).
#[test]
fn snat_keeps_the_clients_port_where_free_and_never_takes_a_local_sockets() {
    let mut lab = Lab::new();
    lab.maps
        .set_config(&NodeConfig {
            snat_ports: (lb_common::SNAT_PORT_MIN, lb_common::SNAT_PORT_MAX),
            ..support::NODE_CONFIG
        })
        .unwrap();
    let nodeport = sa("192.0.2.1:30087");
    lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.1.87:8080", false)],
        NODE_PORT,
    );
    let snat_port = |lab: &mut Lab, client: &str| -> u16 {
        let (action, out) = lab.xdp(&syn(sa(client), nodeport));
        assert_eq!(action, XDP_TX, "{client}");
        decode(&out).src_addr().port()
    };
    assert_eq!(snat_port(&mut lab, "198.51.100.60:45000"), 45000, "kept");
    assert_ne!(
        snat_port(&mut lab, "198.51.100.61:45000"),
        45000,
        "taken by the first client's flow"
    );
    // This node listens on 46000 (a hostNetwork server, say).
    let listener = std::net::TcpListener::bind("0.0.0.0:46000").expect("listen in the lab");
    let p = snat_port(&mut lab, "198.51.100.62:46000");
    assert_ne!(p, 46000, "a local listener's port");
    assert!(p >= lb_common::SNAT_PORT_MIN);
    drop(listener);
    assert_eq!(
        snat_port(&mut lab, "198.51.100.63:46000"),
        46000,
        "free again"
    );
}

#[test]
fn snat_ports_run_out_with_a_counted_drop_and_come_back_once_idle() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30081");
    lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.1.41:8080", false)],
        NODE_PORT,
    );
    let range = support::SNAT_PORTS.0..=support::SNAT_PORTS.1;
    let span = usize::from(support::SNAT_PORTS.1 - support::SNAT_PORTS.0) + 1;
    // Three clients per port: the range fills up, then claims fail.
    let mut ports = std::collections::BTreeSet::new();
    let mut dropped = 0;
    for i in 0..3 * span {
        let client = sa(&format!("198.51.100.{}:{}", 2 + i % 200, 40_000 + i));
        match lab.xdp(&syn(client, nodeport)) {
            (XDP_TX, out) => {
                let p = decode(&out).src_addr().port();
                assert!(range.contains(&p), "port {p} outside the range");
                assert!(ports.insert(p), "port {p} given to two flows");
            }
            (XDP_DROP, _) => dropped += 1,
            (action, _) => panic!("SYN {i}: action {action}"),
        }
    }
    assert!(
        ports.len() * 10 >= span * 9,
        "only {} of {span} ports used",
        ports.len()
    );
    assert_eq!(ports.len() + dropped, 3 * span);
    assert_eq!(lab.reason(Reason::DropSnatExhausted), dropped as u64);
    // Every flow closed long ago: its port may go to a new flow, and the old
    // flow's forward entry goes with it (it must not come back on that port).
    let entries: Vec<_> = lab.maps.conntrack.iter().map(Result::unwrap).collect();
    for (k, mut e) in entries {
        e.flags |= lb_common::CT_F_CLOSING;
        e.last_seen_ns = 1;
        lab.maps.conntrack.insert(k, e, 0).unwrap();
    }
    let before = lab.maps.conntrack.keys().count();
    let (action, out) = lab.xdp(&syn(sa("203.0.113.9:50000"), nodeport));
    assert_eq!(action, XDP_TX, "no idle port reclaimed");
    assert!(ports.contains(&decode(&out).src_addr().port()));
    // One old forward entry removed, one new forward entry, the reply replaced.
    assert_eq!(lab.maps.conntrack.keys().count(), before);
}

#[test]
fn ipv6_nodeport_with_snat() {
    let mut lab = Lab::new();
    let nodeport = sa("[2001:db8::1]:30443");
    lab.service(
        &[nodeport],
        UDP,
        &[backend("[fd00:244:1::40]:8443", false)],
        NODE_PORT,
    );
    let client = sa("[2001:db8:100::40]:45000");
    let (_, output) = lab.xdp(&udp(FROM_ROUTER, client, nodeport, b"x"));
    let out = decode(&output);
    assert_eq!(out.src, support::SNAT_V6);
    let snat = out.src_addr();
    let (_, output) = lab.xdp(&udp(
        (NODE_B_MAC, UPLINK_MAC),
        sa("[fd00:244:1::40]:8443"),
        snat,
        b"y",
    ));
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
}

#[test]
fn without_an_address_of_the_family_a_flow_that_needs_source_nat_is_dropped() {
    // A node without IPv6: config has no IPv6 source-NAT address.
    let mut lab = Lab::new();
    lab.maps
        .set_config(&lb_agent::bpf::NodeConfig {
            snat_v6: None,
            ..support::NODE_CONFIG
        })
        .unwrap();
    let v6 = sa("[2001:db8::1]:30444");
    let v4 = sa("192.0.2.1:30444");
    for np in [v6, v4] {
        lab.service(
            &[np],
            UDP,
            &[backend(
                if np.is_ipv6() {
                    "[fd00:244:1::41]:8443"
                } else {
                    "10.244.1.41:8443"
                },
                false,
            )],
            NODE_PORT,
        );
    }
    let (action, _) = lab.xdp(&udp(FROM_ROUTER, sa("[2001:db8:100::41]:45000"), v6, b"x"));
    assert_eq!(action, XDP_DROP, "never sent from ::");
    assert_eq!(lab.reason(Reason::DropNoSnatAddress), 1);
    assert_eq!(
        lab.maps.conntrack.keys().count(),
        0,
        "no entry for a flow that was not opened"
    );
    // IPv4 is source-NATed as before.
    let (_, output) = lab.xdp(&udp(FROM_ROUTER, sa("198.51.100.41:45000"), v4, b"x"));
    assert_eq!(decode(&output).src, support::SNAT_V4);
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_address_and_goes_through_tc() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30081");
    lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.0.5:8080", true)],
        NODE_PORT,
    );
    let client = sa("198.51.100.42:45000");
    let input = syn(client, nodeport);
    let (action, output) = lab.xdp(&input);
    assert_eq!(
        (action, &output),
        (XDP_PASS, &input),
        "XDP cannot send into a pod veth: handed to tc untouched"
    );
    assert_eq!(lab.reason(Reason::PassToTc), 1);
    // tc on the same uplink finishes it: the flow is in conntrack already.
    let (action, output) = lab.tc_on(lab.uplink, &output);
    assert_eq!(action, support::TC_REDIRECT, "into the pod veth");
    let out = decode(&output);
    assert_eq!(
        (out.src_addr(), out.dst_addr()),
        (client, sa("10.244.0.5:8080"))
    );
    assert_eq!((out.eth_src, out.eth_dst), (POD_GW_MAC, LOCAL_POD_MAC));
    assert_eq!(out.ttl, 63);
    assert_eq!(lab.reason(Reason::Redirect), 1);
    assert_eq!(
        lab.maps.conntrack.keys().count(),
        2,
        "one flow: tc used the entries XDP made"
    );
}

/// A remote backend whose node was never resolved (no neighbour entry): XDP
/// must not hand the kernel the source-NATed packet (its source is the node's
/// own address: the input path drops it as a martian, and nothing then ever
/// resolves the neighbour). It hands it to tc untouched, and tc sends it with
/// `bpf_redirect_neigh`, which resolves the neighbour.
#[test]
fn a_remote_backend_behind_a_cold_neighbour_is_reached_through_tc_with_neighbour_resolution() {
    for (nodeport, pod, client) in [
        ("192.0.2.1:30082", "10.244.2.7:8080", "198.51.100.43:45001"),
        (
            "[2001:db8::1]:30082",
            "[fd00:244:2::7]:8080",
            "[2001:db8:100::43]:45001",
        ),
    ] {
        let mut lab = Lab::new();
        let nodeport = sa(nodeport);
        lab.service(&[nodeport], UDP, &[backend(pod, false)], NODE_PORT);
        let input = udp(FROM_ROUTER, sa(client), nodeport, b"cold");
        let (action, output) = lab.xdp(&input);
        assert_eq!((action, &output), (XDP_PASS, &input), "{nodeport}");
        assert_eq!(lab.reason(Reason::PassToTc), 1);
        assert_eq!(lab.reason(Reason::PassToKernel), 0);
        let (action, output) = lab.tc_on(lab.uplink, &output);
        assert_eq!(action, support::TC_REDIRECT, "{nodeport}");
        let out = decode(&output);
        let snat: std::net::IpAddr = if nodeport.is_ipv4() {
            support::SNAT_V4.into()
        } else {
            support::SNAT_V6.into()
        };
        assert_eq!(out.src, snat, "source-NATed");
        assert_eq!(out.dst_addr(), sa(pod));
        assert_eq!(lab.reason(Reason::RedirectNeigh), 1);
        assert_eq!(
            lab.reason(Reason::Redirect) + lab.reason(Reason::Tx),
            0,
            "counted once, by where it went"
        );
    }
}

/// Pods of a node behind an overlay (Flannel's VXLAN device): XDP cannot send
/// on `flannel.1`, tc redirects to it; the backend's reply comes back
/// decapsulated on `flannel.1`, where tc translates it back.
#[test]
fn a_backend_behind_a_vxlan_overlay_is_reached_through_tc_and_its_reply_translated_on_the_tunnel() {
    let mut lab = Lab::new();
    let flannel = lb_testbed::ifindex("flannel.1").unwrap();
    let nodeport = sa("192.0.2.1:30083");
    let pod = sa("10.244.3.9:8080");
    lab.service(
        &[nodeport],
        TCP,
        &[backend("10.244.3.9:8080", false)],
        NODE_PORT,
    );
    let client = sa("198.51.100.44:45002");
    let input = syn(client, nodeport);
    let (action, output) = lab.xdp(&input);
    assert_eq!((action, &output), (XDP_PASS, &input));
    let (action, output) = lab.tc_on(lab.uplink, &output);
    assert_eq!(action, support::TC_REDIRECT);
    let out = decode(&output);
    assert_eq!(out.dst_addr(), pod);
    assert_eq!(
        out.eth_dst,
        [2, 0, 0, 0, 3, 0],
        "flannel's neighbour entry for node D's VTEP"
    );
    let snat = out.src_addr();
    // The reply, as the kernel hands it up from the VXLAN device.
    let reply = tcp(
        ([2, 0, 0, 0, 3, 0], [2, 0, 0, 0, 0, 0x33]),
        pod,
        snat,
        SYN | ACK,
        70,
        2,
        &[],
    );
    let (action, output) = lab.tc_on(flannel, &reply);
    assert_eq!(action, support::TC_REDIRECT);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
    assert_eq!(out.eth_dst, ROUTER_MAC, "to the client's router");
}

/// A segment too big for the overlay its backend is reached by (MTU 1450
/// behind a 1500 or jumbo uplink) is answered with ICMP fragmentation needed /
/// packet too big from the address the client sent to, quoting its own
/// packet, so its path-MTU discovery works; the kernel's error would quote the
/// translated packet. An IPv4 datagram that may be fragmented goes to the
/// kernel, which fragments it.
#[test]
fn a_packet_too_big_for_the_overlay_gets_an_icmp_error_the_client_can_match() {
    for (nodeport, pod, client) in [
        ("192.0.2.1:30085", "10.244.3.85:8080", "198.51.100.46:45004"),
        (
            "[2001:db8::1]:30085",
            "[fd00:244:3::85]:8080",
            "[2001:db8:100::46]:45004",
        ),
    ] {
        let mut lab = Lab::new();
        let (nodeport, client) = (sa(nodeport), sa(client));
        lab.service(&[nodeport], TCP, &[backend(pod, false)], NODE_PORT);
        let header = if nodeport.is_ipv4() { 20 + 20 } else { 40 + 20 };
        let mut input = tcp(
            FROM_ROUTER,
            client,
            nodeport,
            ACK,
            1,
            1,
            &vec![7u8; 1500 - header],
        );
        if nodeport.is_ipv4() {
            set_dont_fragment(&mut input, true);
        }
        let (action, output) = lab.xdp(&input);
        assert_eq!(action, XDP_TX, "{nodeport}: answered");
        let out = decode(&output);
        assert_eq!((out.src, out.dst), (nodeport.ip(), client.ip()));
        let support::packet::L4::IcmpError {
            kind,
            code,
            rest,
            quoted,
        } = out.l4
        else {
            panic!("not an ICMP error: {out:?}");
        };
        let mtu = if nodeport.is_ipv4() {
            assert_eq!((kind, code), (3, 4), "fragmentation needed");
            u32::from(u16::from_be_bytes([rest[2], rest[3]]))
        } else {
            assert_eq!((kind, code), (2, 0), "packet too big");
            u32::from_be_bytes(rest)
        };
        assert_eq!(mtu, 1450, "flannel.1's MTU");
        assert_eq!(
            (quoted.src, quoted.dst),
            (client, nodeport),
            "its own packet"
        );
        assert_eq!(lab.reason(Reason::IcmpTooBig), 1);
    }
    // IPv4 without Don't Fragment: the kernel fragments it.
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30086");
    lab.service(
        &[nodeport],
        UDP,
        &[backend("10.244.3.86:8080", false)],
        NODE_PORT,
    );
    let mut input = udp(
        FROM_ROUTER,
        sa("198.51.100.47:45005"),
        nodeport,
        &[1u8; 1472],
    );
    set_dont_fragment(&mut input, false);
    let (action, output) = lab.xdp(&input);
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        decode(&output).dst_addr(),
        sa("10.244.3.86:8080"),
        "translated"
    );
    assert_eq!(lab.reason(Reason::PassToKernel), 1);
}

/// Sets or clears an IPv4 frame's Don't Fragment bit, fixing its header checksum.
fn set_dont_fragment(frame: &mut [u8], df: bool) {
    let ip = &mut frame[14..34];
    if df {
        ip[6] |= 0x40;
    } else {
        ip[6] &= !0x40;
    }
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let check = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
}

/// A jumbo frame (MTU 9000 uplinks): the XDP program is frags-aware, so a
/// datagram spanning several buffers is translated in its first, with a
/// checksum that still covers all of it.
#[test]
fn a_jumbo_datagram_spanning_several_buffers_is_translated() {
    let mut lab = Lab::new();
    let nodeport = sa("192.0.2.1:30084");
    lab.service(
        &[nodeport],
        UDP,
        &[backend("10.244.1.84:8080", false)],
        NODE_PORT,
    );
    let client = sa("198.51.100.45:45003");
    let payload: Vec<u8> = (0..8000u32).map(|i| (i * 7 + 3) as u8).collect();
    let input = udp(FROM_ROUTER, client, nodeport, &payload);
    assert!(input.len() > 4096, "more than a page: several buffers");
    let (action, output) = lab.xdp(&input);
    let counted: Vec<_> = Reason::ALL
        .iter()
        .filter(|r| lab.reason(**r) > 0)
        .map(|r| r.name())
        .collect();
    assert_eq!(action, XDP_TX, "counted as {counted:?}");
    assert_eq!(output.len(), input.len(), "nothing lost");
    let out = decode(&output);
    assert_eq!(out.dst_addr(), sa("10.244.1.84:8080"));
    assert_eq!(out.payload, payload);
}

#[test]
fn a_service_without_backends_refuses_tcp_with_a_reset() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.50:80");
    lab.service(&[vip], TCP, &[], CLUSTER_IP);
    let client = sa("198.51.100.50:41000");
    let (action, output) = lab.xdp(&tcp(FROM_ROUTER, client, vip, SYN, 777, 0, &[]));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, client));
    assert_eq!(out.eth_dst, ROUTER_MAC, "back to where it came from");
    let support::packet::L4::Tcp {
        flags, seq, ack, ..
    } = out.l4
    else {
        panic!()
    };
    assert_eq!(flags, RST | ACK);
    assert_eq!((seq, ack), (0, 778), "acknowledges the SYN");
    // A stray ACK gets a RST with its ack number as sequence number.
    let (_, output) = lab.xdp(&tcp(FROM_ROUTER, client, vip, ACK, 1000, 4242, b"data"));
    let out = decode(&output);
    let support::packet::L4::Tcp { flags, seq, .. } = out.l4 else {
        panic!()
    };
    assert_eq!((flags, seq), (RST, 4242));
    // A RST is never answered.
    let (action, _) = lab.xdp(&tcp(FROM_ROUTER, client, vip, RST, 1, 0, &[]));
    assert_eq!(action, support::XDP_DROP);
    assert_eq!(lab.reason(Reason::RejectTcpReset), 3);
}

#[test]
fn a_service_without_backends_refuses_udp_with_port_unreachable() {
    for (vip, client) in [
        (sa("10.96.0.51:53"), sa("198.51.100.51:41000")),
        (sa("[fd00:96::51]:53"), sa("[2001:db8:100::51]:41000")),
    ] {
        let mut lab = Lab::new();
        lab.service(&[vip], UDP, &[], CLUSTER_IP);
        let (action, output) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"anyone?"));
        assert_eq!(action, XDP_TX);
        let out = decode(&output);
        assert_eq!((out.src, out.dst), (vip.ip(), client.ip()));
        let support::packet::L4::IcmpError {
            kind, code, quoted, ..
        } = out.l4
        else {
            panic!("{out:?}")
        };
        if vip.is_ipv4() {
            assert_eq!((kind, code), (3, 3));
        } else {
            assert_eq!((kind, code), (1, 4));
        }
        assert_eq!((quoted.src, quoted.dst, quoted.proto), (client, vip, UDP));
        assert!(quoted.ip_checksum_ok);
        assert_eq!(lab.reason(Reason::RejectIcmpUnreachable), 1);
    }
}

#[test]
fn traffic_that_is_not_for_a_service_passes_untouched() {
    let mut lab = Lab::new();
    lab.service(
        &[sa("10.96.0.60:80")],
        TCP,
        &[backend("10.244.1.60:80", false)],
        CLUSTER_IP,
    );
    let frames = [
        syn(sa("198.51.100.60:1000"), sa("10.96.0.60:81")),
        syn(sa("198.51.100.60:1000"), sa("10.96.0.61:80")),
        udp(
            FROM_ROUTER,
            sa("198.51.100.60:1000"),
            sa("10.96.0.60:80"),
            b"wrong protocol",
        ),
    ];
    for f in &frames {
        let (action, output) = lab.xdp(f);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&output, f, "unchanged");
    }
    assert_eq!(lab.reason(Reason::PassNotService), 3);
}

#[test]
fn icmp_fragmentation_needed_from_the_backend_side_reaches_the_client() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.70:80");
    lab.service(&[vip], TCP, &[backend("10.244.1.70:80", false)], CLUSTER_IP);
    let client = sa("198.51.100.70:42000");
    let (_, fwd) = lab.xdp(&syn(client, vip));
    let translated = decode(&fwd);
    assert_eq!(translated.dst_addr(), sa("10.244.1.70:80"));
    // A router between this node and the backend cannot forward the (translated)
    // packet: it sends "fragmentation needed" quoting it, to the client.
    let mut quote = fwd[14..].to_vec();
    quote.truncate(28);
    let icmp = etherparse::PacketBuilder::ethernet2(NODE_B_MAC, UPLINK_MAC)
        .ipv4([192, 0, 2, 2], [198, 51, 100, 70], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut frame = Vec::new();
    icmp.write(&mut frame, &quote).unwrap();
    let (action, output) = lab.xdp(&frame);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(out.dst, client.ip());
    assert_eq!(
        out.src.to_string(),
        "192.0.2.2",
        "a router's error keeps the router's address"
    );
    let support::packet::L4::IcmpError {
        kind, code, quoted, ..
    } = out.l4
    else {
        panic!("{out:?}")
    };
    assert_eq!((kind, code), (3, 4));
    assert_eq!(
        (quoted.src, quoted.dst),
        (client, vip),
        "the client sees its own packet quoted"
    );
    assert!(quoted.ip_checksum_ok);
    assert_eq!(lab.reason(Reason::IcmpErrorTranslated), 1);
}

#[test]
fn pods_reach_a_clusterip_through_the_tc_program() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.80:80");
    lab.service(
        &[vip],
        TCP,
        &[backend("10.244.1.80:8080", false)],
        CLUSTER_IP,
    );
    let pod = sa("10.244.0.5:39000");
    let frame = tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, SYN, 1, 0, &[]);
    let (action, output) = lab.tc(&frame);
    assert_eq!(action, support::TC_REDIRECT);
    let out = decode(&output);
    assert_eq!(
        (out.src_addr(), out.dst_addr()),
        (pod, sa("10.244.1.80:8080"))
    );
    assert_eq!(out.eth_dst, NODE_B_MAC);
    // A pod-to-pod packet is none of lb's business.
    let other = tcp(
        (LOCAL_POD_MAC, POD_GW_MAC),
        pod,
        sa("10.244.1.99:80"),
        SYN,
        1,
        0,
        &[],
    );
    let (action, output) = lab.tc(&other);
    assert_eq!(action, support::TC_NEXT);
    assert_eq!(output, other);
}

#[test]
fn a_pod_gets_a_reset_from_a_service_without_backends_through_tc() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.81:80");
    lab.service(&[vip], TCP, &[], CLUSTER_IP);
    let pod = sa("10.244.0.5:39001");
    let (action, output) = lab.tc(&tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, SYN, 5, 0, &[]));
    assert_eq!(action, support::TC_REDIRECT, "sent back to the pod");
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, pod));
    assert_eq!(out.eth_dst, LOCAL_POD_MAC);
}

#[test]
fn a_pod_reaching_its_own_service_lands_on_itself_from_the_vip() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.90:80");
    lab.service(&[vip], TCP, &[backend("10.244.0.5:8080", true)], CLUSTER_IP);
    let pod = sa("10.244.0.5:39100");
    let (action, output) = lab.tc(&tcp((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, SYN, 1, 0, &[]));
    assert_eq!(action, support::TC_REDIRECT, "back into the pod");
    let out = decode(&output);
    // Not from its own address (the pod would drop that as martian): from the VIP,
    // with the client's port.
    assert_eq!(
        (out.src_addr(), out.dst_addr()),
        (sa("10.96.0.90:39100"), sa("10.244.0.5:8080"))
    );
    assert_eq!(out.eth_dst, LOCAL_POD_MAC);
    // The pod answers the VIP; it gets the answer from the VIP's service port.
    let reply = tcp(
        (LOCAL_POD_MAC, POD_GW_MAC),
        sa("10.244.0.5:8080"),
        sa("10.96.0.90:39100"),
        SYN | ACK,
        9,
        2,
        &[],
    );
    let (action, output) = lab.tc(&reply);
    assert_eq!(action, support::TC_REDIRECT);
    let out = decode(&output);
    assert_eq!((out.src_addr(), out.dst_addr()), (vip, pod));
}

#[test]
fn icmpv6_packet_too_big_from_the_backend_itself_reaches_the_client_from_the_vip() {
    let mut lab = Lab::new();
    let vip = sa("[fd00:96::70]:443");
    lab.service(
        &[vip],
        TCP,
        &[backend("[fd00:244:1::70]:8443", false)],
        CLUSTER_IP,
    );
    let client = sa("[2001:db8:100::70]:42000");
    let (_, fwd) = lab.xdp(&syn(client, vip));
    assert_eq!(decode(&fwd).dst_addr(), sa("[fd00:244:1::70]:8443"));
    // The backend itself says the (translated) packet was too big.
    let quote = fwd[14..14 + 48].to_vec();
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(NODE_B_MAC, UPLINK_MAC)
        .ipv6(
            "fd00:244:1::70"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            "2001:db8:100::70"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut frame, &quote)
        .unwrap();
    let (action, output) = lab.xdp(&frame);
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    assert_eq!(
        (out.src, out.dst),
        (vip.ip(), client.ip()),
        "from the VIP, as the client knows it"
    );
    let support::packet::L4::IcmpError { kind, quoted, .. } = out.l4 else {
        panic!("{out:?}")
    };
    assert_eq!(kind, 2);
    assert_eq!((quoted.src, quoted.dst), (client, vip));
}

#[test]
fn a_clusterip_on_a_port_that_is_no_service_port_is_refused() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.95:80");
    let svc = lab.service(
        &[vip],
        TCP,
        &[backend("10.244.1.95:8080", false)],
        CLUSTER_IP,
    );
    lab.cluster_address(&svc);
    let client = sa("198.51.100.95:41000");
    let (action, output) = lab.xdp(&syn(client, sa("10.96.0.95:81")));
    assert_eq!(action, XDP_TX);
    let out = decode(&output);
    let support::packet::L4::Tcp { flags, .. } = out.l4 else {
        panic!()
    };
    assert_eq!(
        (out.src_addr(), out.dst_addr(), flags),
        (sa("10.96.0.95:81"), client, RST | ACK)
    );
    let (action, output) = lab.xdp(&udp(FROM_ROUTER, client, sa("10.96.0.95:53"), b"q"));
    assert_eq!(action, XDP_TX);
    assert!(matches!(
        decode(&output).l4,
        support::packet::L4::IcmpError {
            kind: 3,
            code: 3,
            ..
        }
    ));
    // The service port itself still works.
    let (action, output) = lab.xdp(&syn(client, vip));
    assert_eq!(action, XDP_TX);
    assert_eq!(decode(&output).dst_addr(), sa("10.244.1.95:8080"));
}

#[test]
fn packets_of_unknown_addresses_skip_the_lookups() {
    let mut lab = Lab::new();
    lab.service(
        &[sa("10.96.0.96:80")],
        TCP,
        &[backend("10.244.1.96:80", false)],
        CLUSTER_IP,
    );
    // Neither end is a frontend or backend address: passed at once, counted.
    let frame = syn(sa("198.51.100.96:1000"), sa("203.0.113.9:80"));
    let (action, output) = lab.xdp(&frame);
    assert_eq!((action, output), (XDP_PASS, frame));
    assert_eq!(lab.reason(Reason::PassNotService), 1);
    // The filter is exact about what it was told: the backend's own traffic to a
    // non-service port is looked up (and passed), a backend reply is translated.
    let (action, _) = lab.xdp(&syn(sa("198.51.100.96:1001"), sa("10.96.0.96:80")));
    assert_eq!(action, XDP_TX);
    let reply = tcp(
        (NODE_B_MAC, UPLINK_MAC),
        sa("10.244.1.96:80"),
        sa("198.51.100.96:1001"),
        SYN | ACK,
        1,
        1001,
        &[],
    );
    let (action, output) = lab.xdp(&reply);
    assert_eq!(action, XDP_TX);
    assert_eq!(decode(&output).src_addr(), sa("10.96.0.96:80"));
}

/// A datagram of `len` bytes, each telling its place (so a piece out of place
/// shows in the reassembled payload).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Runs each frame through XDP on the uplink, expecting `action` for each.
fn xdp_all(lab: &mut Lab, frames: &[Vec<u8>], action: u32) -> Vec<Vec<u8>> {
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (got, out) = lab.xdp(f);
            assert_eq!(got, action, "fragment {i}: {}", describe(f));
            out
        })
        .collect()
}

/// Checks that every output fragment goes from `src` to `dst` (addresses)
/// by Ethernet `eth_dst`, routed (TTL 63), and returns the reassembled datagram.
fn one_datagram(
    frames: &[Vec<u8>],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    eth_dst: [u8; 6],
) -> Decoded {
    for (i, f) in frames.iter().enumerate() {
        let p = fragment(f).unwrap_or_else(|e| panic!("fragment {i}: {e:#}"));
        assert_eq!(
            (p.src, p.dst),
            (src, dst),
            "fragment {i} (offset {})",
            p.offset
        );
        assert_eq!((p.eth_dst, p.ttl), (eth_dst, 63), "fragment {i}");
    }
    reassemble(frames).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A UDP datagram larger than the path MTU arrives as IP fragments, and only
/// the first carries the ports: every fragment must reach the backend the
/// first was balanced to (of three), so that it can reassemble the datagram,
/// whose UDP checksum (over all of it) must still hold; the backend's
/// fragmented answer comes back from the VIP, every fragment of it.
#[test]
fn a_fragmented_datagram_reaches_one_backend_and_its_fragmented_answer_comes_from_the_vip() {
    for (vip, client, pods) in [
        (
            "10.96.0.110:53",
            "198.51.100.110:40110",
            [
                "10.244.1.110:5353",
                "10.244.1.111:5353",
                "10.244.1.112:5353",
            ],
        ),
        (
            "[fd00:96::110]:53",
            "[2001:db8:100::110]:40110",
            [
                "[fd00:244:1::110]:5353",
                "[fd00:244:1::111]:5353",
                "[fd00:244:1::112]:5353",
            ],
        ),
    ] {
        let mut lab = Lab::new();
        let (vip, client) = (sa(vip), sa(client));
        let svc = lab.service(&[vip], UDP, &pods.map(|p| backend(p, false)), CLUSTER_IP);
        let chosen = svc.expected_backend(client, vip, UDP);
        let request = pattern(3000, 1);
        let frames = udp_fragments(FROM_ROUTER, client, vip, &request, 0x4242, 1232);
        assert_eq!(frames.len(), 3);
        let out = xdp_all(&mut lab, &frames, XDP_TX);
        let whole = one_datagram(&out, client.ip(), chosen.ip(), NODE_B_MAC);
        assert_eq!(whole.ports(), Some((client, chosen)), "{vip}");
        assert_eq!(whole.payload, request);
        // The map holds the datagram as it arrived, and where it went.
        let entries: Vec<_> = lab.maps.fragments.iter().map(Result::unwrap).collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let (k, e) = entries[0];
        let fkey = support::flow_key(client, vip, UDP);
        assert_eq!(
            (k.src, k.dst, k.id, k.proto),
            (fkey.src, fkey.dst, 0x4242, UDP)
        );
        let bkey = support::flow_key(client, chosen, UDP);
        assert_eq!((e.nat_src, e.nat_dst), (bkey.src, bkey.dst));
        assert_eq!(
            (e.nat_src_port, e.nat_dst_port),
            (client.port(), chosen.port())
        );

        let answer = pattern(2500, 2);
        let frames = udp_fragments((NODE_B_MAC, UPLINK_MAC), chosen, client, &answer, 7, 1232);
        let out = xdp_all(&mut lab, &frames, XDP_TX);
        let whole = one_datagram(&out, vip.ip(), client.ip(), ROUTER_MAC);
        assert_eq!(whole.ports(), Some((vip, client)), "{vip}");
        assert_eq!(whole.payload, answer);
        assert_eq!(lab.reason(Reason::Tx), 6);
        assert_eq!(lab.reason(Reason::PassFragment), 0);
        assert_eq!(lab.maps.service_counters(svc.id).unwrap().packets, 6);
    }
}

/// The fragments of a source-NATed flow (a NodePort, backend on another
/// node) all leave with the node's address, and the first with the flow's
/// port: the whole tuple of the conntrack entry, not just the backend.
#[test]
fn fragments_of_a_source_natted_flow_all_leave_from_the_node() {
    for (nodeport, pod, client, snat) in [
        (
            "192.0.2.1:30120",
            "10.244.1.120:8080",
            "198.51.100.120:45120",
            std::net::IpAddr::from(support::SNAT_V4),
        ),
        (
            "[2001:db8::1]:30120",
            "[fd00:244:1::120]:8080",
            "[2001:db8:100::120]:45120",
            support::SNAT_V6.into(),
        ),
    ] {
        let mut lab = Lab::new();
        let (nodeport, pod, client) = (sa(nodeport), sa(pod), sa(client));
        lab.service(&[nodeport], UDP, &[(pod, false)], NODE_PORT);
        let request = pattern(2000, 3);
        let frames = udp_fragments(FROM_ROUTER, client, nodeport, &request, 0x9abc, 1024);
        let out = xdp_all(&mut lab, &frames, XDP_TX);
        let whole = one_datagram(&out, snat, pod.ip(), NODE_B_MAC);
        let (from, to) = whole.ports().unwrap();
        assert_eq!(to, pod);
        assert!(
            (support::SNAT_PORTS.0..=support::SNAT_PORTS.1).contains(&from.port()),
            "{from}"
        );
        assert_eq!(whole.payload, request);
        let answer = pattern(1800, 4);
        let frames = udp_fragments((NODE_B_MAC, UPLINK_MAC), pod, from, &answer, 0x9abc, 1024);
        let out = xdp_all(&mut lab, &frames, XDP_TX);
        let whole = one_datagram(&out, nodeport.ip(), client.ip(), ROUTER_MAC);
        assert_eq!(whole.ports(), Some((nodeport, client)));
        assert_eq!(whole.payload, answer);
    }
}

/// A pod's fragmented datagram to a ClusterIP goes through tc (whose L4
/// checksum update is the kernel's helper), and the remote backend's
/// fragmented answer, arriving on the uplink, is handed by XDP to tc (XDP
/// cannot send into a pod veth) fragment by fragment, untouched, and
/// translated there.
#[test]
fn a_pods_fragmented_datagram_goes_through_tc_and_the_answer_from_xdp_to_tc() {
    for (vip, pod, backend_addr) in [
        ("10.96.0.121:53", "10.244.0.5:39121", "10.244.1.121:5353"),
        (
            "[fd00:96::121]:53",
            "[fd00:244::5]:39121",
            "[fd00:244:1::121]:5353",
        ),
    ] {
        let mut lab = Lab::new();
        let (vip, pod, remote) = (sa(vip), sa(pod), sa(backend_addr));
        lab.service(&[vip], UDP, &[(remote, false)], CLUSTER_IP);
        let request = pattern(3000, 5);
        let frames = udp_fragments((LOCAL_POD_MAC, POD_GW_MAC), pod, vip, &request, 0x51, 1232);
        let out: Vec<_> = frames
            .iter()
            .map(|f| {
                let (action, out) = lab.tc(f);
                assert_eq!(action, support::TC_REDIRECT, "{}", describe(f));
                out
            })
            .collect();
        let whole = one_datagram(&out, pod.ip(), remote.ip(), NODE_B_MAC);
        assert_eq!(whole.ports(), Some((pod, remote)), "{vip}");
        assert_eq!(whole.payload, request);

        let answer = pattern(3000, 6);
        let frames = udp_fragments((NODE_B_MAC, UPLINK_MAC), remote, pod, &answer, 0x52, 1232);
        let mut out = Vec::new();
        for f in &frames {
            let (action, passed) = lab.xdp(f);
            assert_eq!((action, &passed), (XDP_PASS, f), "handed to tc untouched");
            let (action, sent) = lab.tc_on(lab.uplink, &passed);
            assert_eq!(action, support::TC_REDIRECT, "into the pod veth");
            out.push(sent);
        }
        let whole = one_datagram(&out, vip.ip(), pod.ip(), LOCAL_POD_MAC);
        assert_eq!(whole.ports(), Some((vip, pod)), "{vip}");
        assert_eq!(whole.payload, answer);
        assert_eq!(lab.reason(Reason::PassToTc), 3);
        assert_eq!(lab.reason(Reason::Redirect), 6);
    }
}

/// A later fragment that overtakes its first (or whose first went another
/// way) has nothing to be translated by: passed to the kernel untouched and
/// counted under `pass_fragment`; once the first has been translated, the
/// same fragment is translated too. Fragments of a datagram that is none of
/// lb's business pass untouched; an entry older than the reassembly timeout
/// is not used.
#[test]
fn a_later_fragment_without_its_first_passes_untranslated_and_counted() {
    for (vip, client, pod) in [
        (
            "10.96.0.122:53",
            "198.51.100.122:40122",
            "10.244.1.122:5353",
        ),
        (
            "[fd00:96::122]:53",
            "[2001:db8:100::122]:40122",
            "[fd00:244:1::122]:5353",
        ),
    ] {
        let mut lab = Lab::new();
        let (vip, client, pod) = (sa(vip), sa(client), sa(pod));
        lab.service(&[vip], UDP, &[(pod, false)], CLUSTER_IP);
        let frames = udp_fragments(FROM_ROUTER, client, vip, &pattern(2000, 7), 0x77, 1024);
        assert_eq!(frames.len(), 2);
        let (action, out) = lab.xdp(&frames[1]);
        assert_eq!((action, &out), (XDP_PASS, &frames[1]), "{vip}: untouched");
        assert_eq!(lab.reason(Reason::PassFragment), 1);
        let out = xdp_all(&mut lab, &frames, XDP_TX);
        let whole = one_datagram(&out, client.ip(), pod.ip(), NODE_B_MAC);
        assert_eq!(whole.ports(), Some((client, pod)));
        assert_eq!(lab.reason(Reason::PassFragment), 1);

        // Another datagram of the same identity, long after: the entry is
        // too old to be its first fragment's.
        for (k, mut e) in lab
            .maps
            .fragments
            .iter()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
        {
            e.first_ns = 0;
            lab.maps.fragments.insert(k, e, 0).unwrap();
        }
        let (action, out) = lab.xdp(&frames[1]);
        assert_eq!(
            (action, &out),
            (XDP_PASS, &frames[1]),
            "{vip}: a stale entry"
        );
        assert_eq!(lab.reason(Reason::PassFragment), 2);

        // None of lb's business: its first fragment is not a Service's, its
        // later one is not known.
        let other = sa(if vip.is_ipv4() {
            "10.96.0.123:53"
        } else {
            "[fd00:96::123]:53"
        });
        let frames = udp_fragments(FROM_ROUTER, client, other, &pattern(2000, 8), 0x78, 1024);
        for f in &frames {
            let (action, out) = lab.xdp(f);
            assert_eq!((action, &out), (XDP_PASS, f), "{other}: untouched");
        }
        assert_eq!(lab.reason(Reason::PassNotService), 1);
        assert_eq!(lab.reason(Reason::PassFragment), 3);
    }
}
