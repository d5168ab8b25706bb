//! Where a flow's replies may come from (`CtEntry::ingress`): a reply-shaped
//! packet that arrives on the wrong side is passed on untouched and counted
//! under `pass_wrong_side`, the genuine reply is translated. Crafted frames
//! through BPF_PROG_TEST_RUN in the one-node namespace, decoded by etherparse
//! with every checksum recomputed. Needs root (BPF, network namespaces).

mod support;

use std::net::SocketAddr;

use lb_common::{
    CT_F_CLOSING, CT_F_REPLIED, CT_INGRESS_NETWORK, CT_INGRESS_PODS, CtEntry, PROTO_TCP, Reason,
};
use support::{
    CLUSTER_IP, Lab, NODE_PORT, TC_NEXT, TC_REDIRECT, TCP, UDP, XDP_PASS, XDP_TX, backend, fib::*,
    flow_key, packet::*, sa,
};

/// From the local pod behind `pod0` to its gateway.
const FROM_POD: ([u8; 6], [u8; 6]) = (LOCAL_POD_MAC, POD_GW_MAC);
/// From node B, behind the uplink.
const FROM_NODE_B: ([u8; 6], [u8; 6]) = (NODE_B_MAC, UPLINK_MAC);
/// Flannel's VTEP of node D, as the kernel hands its packets up from `flannel.1`.
const FROM_TUNNEL: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 3, 0], [2, 0, 0, 0, 0, 0x33]);

fn entry(lab: &Lab, src: SocketAddr, dst: SocketAddr, proto: u8) -> CtEntry {
    lab.maps
        .conntrack
        .get(&flow_key(src, dst, proto), 0)
        .unwrap_or_else(|e| panic!("no conntrack entry {src} -> {dst}: {e}"))
}

/// Opens a flow from an outside client to a frontend whose backend is the
/// local pod: XDP hands the SYN to tc on the uplink, which sends it into
/// `pod0`.
fn open_to_local_pod(lab: &mut Lab, client: SocketAddr, frontend: SocketAddr) {
    let input = syn(client, frontend);
    let (action, output) = lab.xdp(&input);
    assert_eq!((action, &output), (XDP_PASS, &input), "handed to tc");
    let (action, _) = lab.tc_on(lab.uplink, &output);
    assert_eq!(action, TC_REDIRECT, "into the pod veth");
}

/// A local pod's flow, both families: its reply entry expects `pod0`; a
/// reply-shaped packet of that flow from the uplink (XDP, then tc on the
/// uplink, which the kernel runs next) passes untouched, counted, and leaves
/// the flow's entries as they were (a spoofed SYN-ACK does not confirm it, a
/// spoofed RST does not close it); the pod's own reply is translated.
#[test]
fn a_local_pods_reply_from_the_uplink_passes_untranslated_and_its_own_is_translated() {
    for (vip, pod, client) in [
        ("10.96.0.61:80", "10.244.0.5:8080", "198.51.100.61:41000"),
        (
            "[fd00:96::61]:80",
            "[fd00:244::5]:8080",
            "[2001:db8:100::61]:41000",
        ),
    ] {
        let (vip, pod, client) = (sa(vip), sa(pod), sa(client));
        let mut lab = Lab::new();
        lab.service(&[vip], TCP, &[backend(&pod.to_string(), true)], CLUSTER_IP);
        open_to_local_pod(&mut lab, client, vip);
        let reply_entry = entry(&lab, pod, client, TCP);
        assert_eq!(
            reply_entry.ingress, lab.pod,
            "{vip}: replies expected from the pod's veth"
        );
        let forward_before = entry(&lab, client, vip, TCP);

        for (flags, what) in [(SYN | ACK, "SYN-ACK"), (RST | ACK, "RST")] {
            let spoofed = tcp(FROM_NODE_B, pod, client, flags, 7, 1001, &[]);
            let (action, output) = lab.xdp(&spoofed);
            assert_eq!(
                (action, &output),
                (XDP_PASS, &spoofed),
                "{vip}: a spoofed {what} from the network passes XDP untouched"
            );
            let (action, output) = lab.tc_on(lab.uplink, &spoofed);
            assert_eq!(
                (action, &output),
                (TC_NEXT, &spoofed),
                "{vip}: and tc on the uplink"
            );
        }
        assert_eq!(lab.reason(Reason::PassWrongSide), 4, "{vip}");
        assert_eq!(
            entry(&lab, pod, client, TCP),
            reply_entry,
            "{vip}: the reply entry is untouched"
        );
        let forward = entry(&lab, client, vip, TCP);
        assert_eq!(forward, forward_before, "{vip}: the forward entry too");
        assert_eq!(forward.flags & (CT_F_REPLIED | CT_F_CLOSING), 0);

        let genuine = tcp(FROM_POD, pod, client, SYN | ACK, 7, 1001, &[]);
        let (action, output) = lab.tc(&genuine);
        assert_eq!(action, TC_REDIRECT, "{vip}");
        let out = decode(&output);
        assert_eq!((out.src_addr(), out.dst_addr()), (vip, client), "{vip}");
        assert_eq!(out.eth_dst, ROUTER_MAC);
        assert_eq!(lab.reason(Reason::PassWrongSide), 4, "{vip}: not counted");
        assert_ne!(entry(&lab, client, vip, TCP).flags & CT_F_REPLIED, 0);
    }
}

/// A remote backend's flow (source-NATed at a NodePort), both families,
/// with the backend behind the uplink (node B) and behind the VXLAN overlay
/// (node D on `flannel.1`): its reply entry expects the network; a
/// reply-shaped packet from the local pod's veth passes untouched, counted;
/// the reply from the network is translated on any network interface (XDP
/// on the uplink, tc on the uplink, tc on the tunnel: a reply may come back
/// on another interface than its request left by).
#[test]
fn a_remote_backends_reply_from_a_pod_passes_untranslated_and_from_the_network_is_translated() {
    let cases = [
        ("192.0.2.1:30061", "10.244.1.61:8080", "198.51.100.62:41001"),
        ("192.0.2.1:30062", "10.244.3.62:8080", "198.51.100.63:41002"),
        (
            "[2001:db8::1]:30061",
            "[fd00:244:1::61]:8080",
            "[2001:db8:100::62]:41001",
        ),
        (
            "[2001:db8::1]:30062",
            "[fd00:244:3::62]:8080",
            "[2001:db8:100::63]:41002",
        ),
    ];
    for (nodeport, remote, client) in cases {
        let (nodeport, remote, client) = (sa(nodeport), sa(remote), sa(client));
        let mut lab = Lab::new();
        let flannel = lb_testbed::ifindex("flannel.1").unwrap();
        lab.service(
            &[nodeport],
            TCP,
            &[backend(&remote.to_string(), false)],
            NODE_PORT,
        );
        let input = syn(client, nodeport);
        let (action, mut output) = lab.xdp(&input);
        if action == XDP_PASS {
            // The overlay: XDP cannot send on the tunnel; tc does.
            let (action, sent) = lab.tc_on(lab.uplink, &output);
            assert_eq!(action, TC_REDIRECT, "{nodeport}");
            output = sent;
        } else {
            assert_eq!(action, XDP_TX, "{nodeport}");
        }
        let snat = decode(&output).src_addr();
        assert_eq!(
            entry(&lab, remote, snat, TCP).ingress,
            CT_INGRESS_NETWORK,
            "{nodeport}: replies expected from the network"
        );

        let spoofed = tcp(FROM_POD, remote, snat, SYN | ACK, 9, 1001, &[]);
        let (action, output) = lab.tc(&spoofed);
        assert_eq!(
            (action, &output),
            (TC_NEXT, &spoofed),
            "{nodeport}: a pod speaking for {remote} passes untouched"
        );
        assert_eq!(lab.reason(Reason::PassWrongSide), 1, "{nodeport}");

        let (action, output) = lab.xdp(&tcp(FROM_NODE_B, remote, snat, SYN | ACK, 9, 1001, &[]));
        assert_eq!(action, XDP_TX, "{nodeport}: from the uplink, XDP");
        let out = decode(&output);
        assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
        let (action, output) = lab.tc_on(
            lab.uplink,
            &tcp(FROM_NODE_B, remote, snat, ACK, 10, 1001, b"a"),
        );
        assert_eq!(action, TC_REDIRECT, "{nodeport}: from the uplink, tc");
        let out = decode(&output);
        assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
        let (action, output) = lab.tc_on(
            flannel,
            &tcp(FROM_TUNNEL, remote, snat, ACK, 11, 1001, b"b"),
        );
        assert_eq!(action, TC_REDIRECT, "{nodeport}: from the tunnel");
        let out = decode(&output);
        assert_eq!((out.src_addr(), out.dst_addr()), (nodeport, client));
        assert_eq!(out.payload, b"b");
        assert_eq!(lab.reason(Reason::PassWrongSide), 1, "{nodeport}");
    }
}

/// A backend on this node whose route names an interface that is no pod's
/// (pods behind a bridge: the route names the bridge, the pod's packets
/// arrive on its veth, a port of it), played here by a local backend routed
/// by the tunnel: its replies are expected from any pod interface, and from
/// nowhere else.
#[test]
fn a_local_backend_routed_by_a_non_pod_interface_answers_from_any_pod_interface() {
    let mut lab = Lab::new();
    let flannel = lb_testbed::ifindex("flannel.1").unwrap();
    let vip = sa("10.96.0.64:80");
    let pod = sa("10.244.3.64:8080");
    let client = sa("198.51.100.64:41003");
    lab.service(
        &[vip],
        TCP,
        &[backend("10.244.3.64:8080", true)],
        CLUSTER_IP,
    );
    let (action, output) = lab.xdp(&syn(client, vip));
    assert_eq!(action, XDP_PASS);
    let (action, _) = lab.tc_on(lab.uplink, &output);
    assert_eq!(action, TC_REDIRECT);
    assert_eq!(entry(&lab, pod, client, TCP).ingress, CT_INGRESS_PODS);
    let reply = |macs| tcp(macs, pod, client, SYN | ACK, 3, 1001, &[]);
    let (action, output) = lab.tc_on(flannel, &reply(FROM_TUNNEL));
    assert_eq!((action, output), (TC_NEXT, reply(FROM_TUNNEL)));
    let (action, output) = lab.xdp(&reply(FROM_NODE_B));
    assert_eq!((action, output), (XDP_PASS, reply(FROM_NODE_B)));
    assert_eq!(lab.reason(Reason::PassWrongSide), 2);
    let (action, output) = lab.tc(&reply(FROM_POD));
    assert_eq!(action, TC_REDIRECT);
    assert_eq!(decode(&output).src_addr(), vip);
}

/// An ICMP error quoting a packet sent to a local pod travels as the pod's
/// replies do: from the pod it is translated for the client; the same error
/// from the network passes untouched. Both families.
#[test]
fn an_icmp_error_for_a_local_pods_flow_counts_only_from_the_pod() {
    for (vip, pod, client) in [
        ("10.96.0.65:53", "10.244.0.5:5353", "198.51.100.65:41004"),
        (
            "[fd00:96::65]:53",
            "[fd00:244::5]:5353",
            "[2001:db8:100::65]:41004",
        ),
    ] {
        let (vip, pod, client) = (sa(vip), sa(pod), sa(client));
        let mut lab = Lab::new();
        lab.service(&[vip], UDP, &[backend(&pod.to_string(), true)], CLUSTER_IP);
        let (action, output) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"query"));
        assert_eq!(action, XDP_PASS);
        let (action, delivered) = lab.tc_on(lab.uplink, &output);
        assert_eq!(action, TC_REDIRECT);
        assert_eq!(decode(&delivered).dst_addr(), pod);
        // The pod says port unreachable, quoting what it got.
        let error = |macs: ([u8; 6], [u8; 6])| {
            let quote = &delivered[14..];
            let b = etherparse::PacketBuilder::ethernet2(macs.0, macs.1);
            let mut frame = Vec::new();
            match (pod.ip(), client.ip()) {
                (std::net::IpAddr::V4(p), std::net::IpAddr::V4(c)) => b
                    .ipv4(p.octets(), c.octets(), 64)
                    .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                        etherparse::icmpv4::DestUnreachableHeader::Port,
                    ))
                    .write(&mut frame, quote),
                (std::net::IpAddr::V6(p), std::net::IpAddr::V6(c)) => b
                    .ipv6(p.octets(), c.octets(), 64)
                    .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                        etherparse::icmpv6::DestUnreachableCode::Port,
                    ))
                    .write(&mut frame, quote),
                _ => unreachable!(),
            }
            .unwrap();
            frame
        };
        let spoofed = error(FROM_NODE_B);
        let (action, output) = lab.xdp(&spoofed);
        assert_eq!((action, &output), (XDP_PASS, &spoofed), "{vip}");
        let (action, output) = lab.tc_on(lab.uplink, &spoofed);
        assert_eq!((action, &output), (TC_NEXT, &spoofed), "{vip}");
        assert_eq!(lab.reason(Reason::PassWrongSide), 2, "{vip}");
        assert_eq!(lab.reason(Reason::IcmpErrorTranslated), 0, "{vip}");

        let (action, output) = lab.tc(&error(FROM_POD));
        assert_eq!(action, TC_REDIRECT, "{vip}");
        let out = decode(&output);
        assert_eq!((out.src, out.dst), (vip.ip(), client.ip()), "{vip}");
        let L4::IcmpError { quoted, .. } = out.l4 else {
            panic!("{out:?}")
        };
        assert_eq!((quoted.src, quoted.dst), (client, vip), "{vip}");
        assert_eq!(lab.reason(Reason::IcmpErrorTranslated), 1, "{vip}");
    }
}

/// A local pod's fragmented answer: its fragments are translated from the
/// pod's veth; a later fragment of the same datagram from the network passes
/// untouched, counted. Both families.
#[test]
fn a_later_fragment_of_a_local_pods_reply_counts_only_from_the_pod() {
    for (vip, pod, client, id) in [
        (
            "10.96.0.66:53",
            "10.244.0.5:5353",
            "198.51.100.66:41005",
            0x1234,
        ),
        (
            "[fd00:96::66]:53",
            "[fd00:244::5]:5353",
            "[2001:db8:100::66]:41005",
            0x0012_3456,
        ),
    ] {
        let (vip, pod, client) = (sa(vip), sa(pod), sa(client));
        let mut lab = Lab::new();
        lab.service(&[vip], UDP, &[backend(&pod.to_string(), true)], CLUSTER_IP);
        let (_, output) = lab.xdp(&udp(FROM_ROUTER, client, vip, b"query"));
        let (action, _) = lab.tc_on(lab.uplink, &output);
        assert_eq!(action, TC_REDIRECT);
        let answer = vec![0x5a; 3000];
        let from_pod = udp_fragments(FROM_POD, pod, client, &answer, id, 1232);
        let from_net = udp_fragments(FROM_NODE_B, pod, client, &answer, id, 1232);
        assert_eq!(from_pod.len(), 3);
        let (action, first) = lab.tc(&from_pod[0]);
        assert_eq!(action, TC_REDIRECT, "{vip}: the first fragment");
        let (action, output) = lab.xdp(&from_net[1]);
        assert_eq!(
            (action, &output),
            (XDP_PASS, &from_net[1]),
            "{vip}: a later fragment from the network"
        );
        assert_eq!(lab.reason(Reason::PassWrongSide), 1, "{vip}");
        let mut sent = vec![first];
        for f in &from_pod[1..] {
            let (action, out) = lab.tc(f);
            assert_eq!(action, TC_REDIRECT, "{vip}");
            sent.push(out);
        }
        let whole = reassemble(&sent).unwrap();
        assert_eq!((whole.src_addr(), whole.dst_addr()), (vip, client), "{vip}");
        assert_eq!(whole.payload, answer);
        assert_eq!(lab.reason(Reason::PassWrongSide), 1, "{vip}");
    }
}

#[test]
fn forward_entries_take_packets_from_anywhere() {
    // A client's packets may come from a pod or the network, on any uplink:
    // the forward entry does not ask.
    let mut lab = Lab::new();
    let vip = sa("10.96.0.67:80");
    lab.service(
        &[vip],
        TCP,
        &[backend("10.244.1.67:8080", false)],
        CLUSTER_IP,
    );
    let client = sa("10.244.0.5:41006");
    let (action, _) = lab.tc(&tcp(FROM_POD, client, vip, SYN, 1, 0, &[]));
    assert_eq!(action, TC_REDIRECT);
    assert_eq!(
        entry(&lab, client, vip, PROTO_TCP).ingress,
        lb_common::CT_INGRESS_ANY
    );
    let (action, output) = lab.xdp(&tcp(FROM_ROUTER, client, vip, ACK, 2, 1, b"x"));
    assert_eq!(action, XDP_TX);
    assert_eq!(decode(&output).dst_addr(), sa("10.244.1.67:8080"));
    assert_eq!(lab.reason(Reason::PassWrongSide), 0);
}
