//! Truncated, malformed and unusual packets: each has a documented outcome
//! (README, "What the datapath does with odd packets"), none is ever XDP_ABORTED,
//! and a property test pushes 20,000 random and mutated packets through both
//! programs.
//! Needs root (BPF, network namespaces).

mod support;

use etherparse::PacketBuilder;
use lb_common::Reason;
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use support::{
    CLUSTER_IP, Lab, NODE_PORT, TCP, UDP, XDP_ABORTED, XDP_PASS, XDP_TX, backend, fib::*,
    packet::*, sa,
};

const VIP: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:80";

fn lab() -> Lab {
    let mut lab = Lab::new();
    // A dual-stack service has one table per family, as the agent programs it.
    lab.service(
        &[sa(VIP)],
        TCP,
        &[backend("10.244.1.10:8080", false)],
        CLUSTER_IP,
    );
    lab.service(
        &[sa(VIP6)],
        TCP,
        &[backend("[fd00:244:1::10]:8080", false)],
        CLUSTER_IP,
    );
    lab.service(
        &[sa("10.96.0.10:53")],
        UDP,
        &[backend("10.244.1.11:53", false)],
        CLUSTER_IP,
    );
    lab.service(
        &[sa("[fd00:96::10]:53")],
        UDP,
        &[backend("[fd00:244:1::11]:53", false)],
        CLUSTER_IP,
    );
    lab.service(
        &[sa("192.0.2.1:30080")],
        TCP,
        &[backend("10.244.1.12:80", false)],
        NODE_PORT,
    );
    lab.service(
        &[sa("10.96.0.99:80"), sa("10.96.0.99:53")],
        TCP,
        &[],
        CLUSTER_IP,
    );
    lab.service(&[sa("10.96.0.99:53")], UDP, &[], CLUSTER_IP);
    lab
}

fn ipv4_syn_to_vip() -> Vec<u8> {
    syn(sa("198.51.100.1:40000"), sa(VIP))
}

/// Expects `frame` to pass untouched, counted under `reason`.
fn passes(lab: &mut Lab, frame: &[u8], reason: Reason, what: &str) {
    let before = lab.reason(reason);
    let (action, out) = lab.xdp(frame);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_eq!(out, frame, "{what}: must be untouched");
    assert_eq!(
        lab.reason(reason),
        before + 1,
        "{what}: counted as {reason:?}"
    );
}

#[test]
fn truncated_and_malformed_frames_pass_to_the_kernel_untouched() {
    let mut lab = lab();
    let good = ipv4_syn_to_vip();
    // (Frames shorter than an Ethernet header never reach XDP: BPF_PROG_TEST_RUN
    // itself refuses them, as drivers do. The parser's first bounds check would
    // pass them as malformed.)
    passes(
        &mut lab,
        &good[..14],
        Reason::PassMalformed,
        "Ethernet header only",
    );
    passes(
        &mut lab,
        &good[..30],
        Reason::PassMalformed,
        "IPv4 header cut short",
    );
    passes(
        &mut lab,
        &good[..40],
        Reason::PassMalformed,
        "TCP header cut short",
    );

    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    passes(&mut lab, &bad_ihl, Reason::PassMalformed, "IHL below 5");

    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
    passes(
        &mut lab,
        &long_total,
        Reason::PassMalformed,
        "IPv4 total length beyond the frame",
    );

    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    passes(
        &mut lab,
        &bad_version,
        Reason::PassMalformed,
        "version 6 in an IPv4 frame",
    );

    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    passes(
        &mut lab,
        &bad_doff,
        Reason::PassMalformed,
        "TCP data offset below 5",
    );

    let mut zero_udp = udp(
        FROM_ROUTER,
        sa("198.51.100.1:40000"),
        sa("10.96.0.10:53"),
        b"q",
    );
    zero_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&0u16.to_be_bytes());
    passes(
        &mut lab,
        &zero_udp,
        Reason::PassMalformed,
        "zero-length UDP",
    );

    let mut long_udp = udp(
        FROM_ROUTER,
        sa("198.51.100.1:40000"),
        sa("10.96.0.10:53"),
        b"q",
    );
    long_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    passes(
        &mut lab,
        &long_udp,
        Reason::PassMalformed,
        "UDP length beyond the datagram",
    );
}

#[test]
fn fragments_unknown_protocols_and_non_ip_pass() {
    let mut lab = lab();
    let good = ipv4_syn_to_vip();
    // A first fragment with the whole TCP header is translated as any
    // segment (see datapath.rs for fragmented datagrams); one that holds 8
    // bytes of it (a "tiny fragment") cannot be balanced.
    let mut first_fragment = good.clone();
    first_fragment[20] = 0x20; // MF
    assert_eq!(lab.xdp(&first_fragment).0, XDP_TX, "first fragment");
    let mut tiny = good[..14 + 20 + 8].to_vec();
    tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
    tiny[20] = 0x20;
    passes(
        &mut lab,
        &tiny,
        Reason::PassFragment,
        "first fragment without the whole TCP header",
    );
    // Of another datagram (identification) than the first fragment above,
    // whose later fragments are translated like it.
    let mut later_fragment = good.clone();
    later_fragment[18..20].copy_from_slice(&0x0badu16.to_be_bytes());
    later_fragment[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    passes(
        &mut lab,
        &later_fragment,
        Reason::PassFragment,
        "non-first fragment",
    );

    // IPv6: a first fragment (offset 0, M set) whose fragmentable part holds
    // only 4 bytes of TCP.
    let mut v6frag = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sa(VIP6)
                .ip()
                .to_string()
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
        .write(
            &mut v6frag,
            etherparse::IpNumber::IPV6_FRAGMENTATION_HEADER,
            &[6, 0, 0, 1, 0, 0, 0, 1, 0x9c, 0x40, 0, 80],
        )
        .unwrap();
    passes(
        &mut lab,
        &v6frag,
        Reason::PassFragment,
        "IPv6 first fragment with 4 bytes of the TCP header",
    );

    for proto in [47u8, 132] {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
            .ipv4([198, 51, 100, 1], [10, 96, 0, 10], 64)
            .write(
                &mut f,
                etherparse::IpNumber(proto),
                &[0, 80, 0, 80, 0, 0, 0, 0],
            )
            .unwrap();
        passes(
            &mut lab,
            &f,
            Reason::PassOtherProtocol,
            &format!("IP protocol {proto}"),
        );
    }

    let mut echo = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ipv4([198, 51, 100, 1], [10, 96, 0, 10], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    passes(
        &mut lab,
        &echo,
        Reason::PassOtherProtocol,
        "ICMP echo to a VIP",
    );

    let mut arp = good[..14].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    passes(&mut lab, &arp, Reason::PassNotIp, "ARP");
}

#[test]
fn ipv4_options_ipv6_extension_headers_and_vlan_tags_are_translated() {
    let mut lab = lab();
    // IPv4 with a 4-byte option (NOP NOP NOP EOL).
    let mut with_options = Vec::new();
    let mut ip = etherparse::Ipv4Header::new(
        20,
        64,
        etherparse::IpNumber::TCP,
        [198, 51, 100, 2],
        [10, 96, 0, 10],
    )
    .unwrap();
    ip.options = [1u8, 1, 1, 0][..].try_into().unwrap();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(40001, 80, 1, 1000)
        .syn()
        .write(&mut with_options, &[])
        .unwrap();
    let (action, out) = lab.xdp(&with_options);
    assert_eq!(action, XDP_TX);
    let d = decode(&out);
    assert_eq!(d.dst.to_string(), "10.244.1.10");

    // IPv6 with a hop-by-hop options header.
    let mut hbh = Vec::new();
    let ext = etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber::TCP, &[1, 4, 0, 0, 0, 0])
        .unwrap();
    let mut ip6 = etherparse::Ipv6Header {
        source: "2001:db8:100::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        destination: "fd00:96::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        hop_limit: 64,
        next_header: etherparse::IpNumber::IPV6_HEADER_HOP_BY_HOP,
        ..Default::default()
    };
    let exts = etherparse::Ipv6Extensions {
        hop_by_hop_options: Some(ext),
        ..Default::default()
    };
    ip6.payload_length = 0;
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .ip(etherparse::IpHeaders::Ipv6(ip6, exts))
        .tcp(40002, 80, 1, 1000)
        .syn()
        .write(&mut hbh, &[])
        .unwrap();
    let (action, out) = lab.xdp(&hbh);
    assert_eq!(action, XDP_TX);
    assert_eq!(decode(&out).dst.to_string(), "fd00:244:1::10");

    // 802.1Q-tagged: translated, tag kept, handed to the kernel (VLAN device routes).
    let mut tagged = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4([198, 51, 100, 3], [10, 96, 0, 10], 64)
        .tcp(40003, 80, 1, 1000)
        .syn()
        .write(&mut tagged, &[])
        .unwrap();
    let (action, out) = lab.xdp(&tagged);
    assert_eq!(action, XDP_PASS);
    let h = etherparse::PacketHeaders::from_ethernet_slice(&out).unwrap();
    assert_eq!(h.link_exts.len(), 1, "tag kept");
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = h.net else {
        panic!()
    };
    assert_eq!(ip.destination, [10, 244, 1, 10]);
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
}

/// A valid packet built from random choices, aimed at the lab's services or not.
fn valid_packet() -> impl Strategy<Value = Vec<u8>> {
    let dst4 = prop::sample::select(vec![
        "10.96.0.10:80",
        "10.96.0.10:53",
        "192.0.2.1:30080",
        "10.96.0.99:80",
        "10.96.0.99:53",
        "10.96.0.11:80",
    ]);
    let dst6 = prop::sample::select(vec![
        "[fd00:96::10]:80",
        "[fd00:96::10]:53",
        "[fd00:96::11]:80",
    ]);
    let src4 =
        (any::<[u8; 2]>(), 1u16..).prop_map(|(a, p)| sa(&format!("198.51.{}.{}:{p}", a[0], a[1])));
    let src6 = (any::<u16>(), 1u16..).prop_map(|(a, p)| sa(&format!("[2001:db8:100::{a:x}]:{p}")));
    let v4 = (src4, dst4).prop_map(|(s, d)| (s, sa(d)));
    let v6 = (src6, dst6).prop_map(|(s, d)| (s, sa(d)));
    (
        prop_oneof![v4, v6],
        any::<bool>(),
        0u8..32,
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(|((s, d), is_tcp, flags, seq, ack, payload, from_backend)| {
            let macs = if from_backend {
                (NODE_B_MAC, UPLINK_MAC)
            } else {
                FROM_ROUTER
            };
            if is_tcp {
                tcp(
                    macs,
                    s,
                    d,
                    flags & (SYN | ACK | RST | FIN | PSH),
                    seq,
                    ack,
                    &payload,
                )
            } else {
                udp(macs, s, d, &payload)
            }
        })
}

/// Every checksum of a frame is right (per etherparse); false if it does not parse.
fn checksums_valid(frame: &[u8]) -> bool {
    check(frame).is_ok()
}

#[test]
fn twenty_thousand_random_and_mutated_packets_never_abort_and_translations_stay_valid() {
    // proptest closures are Fn: the lab and the tally live in cells.
    let lab = std::cell::RefCell::new(lab());
    let mut runner = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    let translated = std::cell::Cell::new(0u32);
    // Valid packets: every one that comes out changed must still be valid.
    runner
        .run(&valid_packet(), |frame| {
            let (action, out) = lab.borrow_mut().xdp(&frame);
            prop_assert_ne!(action, XDP_ABORTED);
            if out != frame && action != support::XDP_DROP {
                translated.set(translated.get() + 1);
                prop_assert!(
                    checksums_valid(&out),
                    "bad checksums after translating {}",
                    describe(&frame)
                );
            }
            let (tc_action, out) = lab.borrow_mut().tc(&frame);
            prop_assert!(
                [support::TC_NEXT, support::TC_REDIRECT, support::TC_SHOT].contains(&tc_action)
            );
            if out != frame && tc_action != support::TC_SHOT {
                prop_assert!(
                    checksums_valid(&out),
                    "tc: bad checksums after {}",
                    describe(&frame)
                );
            }
            Ok(())
        })
        .unwrap();
    let translated = translated.get();
    assert!(
        translated > 3_000,
        "most random packets hit a service ({translated})"
    );

    // Mutated packets: random bytes overwritten, cut, or grown. Never ABORTED; a
    // packet whose checksums were right before and is changed is right after.
    let mutated = (
        valid_packet(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(mut f, edits, cut, do_cut)| {
            for (i, b) in edits {
                let at = i.index(f.len());
                f[at] = b;
            }
            if do_cut {
                f.truncate(cut.index(f.len()).max(1));
            }
            f
        });
    runner
        .run(&mutated, |frame| {
            let (action, out) = lab.borrow_mut().xdp(&frame);
            prop_assert_ne!(action, XDP_ABORTED);
            if out != frame && action != support::XDP_DROP && checksums_valid(&frame) {
                prop_assert!(
                    checksums_valid(&out),
                    "bad checksums after translating {}",
                    describe(&frame)
                );
            }
            let (tc_action, _) = lab.borrow_mut().tc(&frame);
            prop_assert!(
                [support::TC_NEXT, support::TC_REDIRECT, support::TC_SHOT].contains(&tc_action)
            );
            Ok(())
        })
        .unwrap();
    let _ = XDP_TX;
}
