//! The packet path: frames run through the loaded XDP and tc programs with
//! `BPF_PROG_TEST_RUN`, as the datapath tests run them, against a node of
//! the testbed's one-node namespace (`lb_testbed::fib`) whose maps the
//! agent's own sync engine wrote from a few Services: a dual-stack ClusterIP
//! (TCP and UDP) with a local and a remote endpoint, a NodePort with
//! externalTrafficPolicy Local, a LoadBalancer with loadBalancerSourceRanges
//! and session affinity behind the flannel device, and a ClusterIP without
//! endpoints.
//!
//! An input is a few frames, each run on one hook: built ones (a client, a
//! pod or a backend to one of the Services' frontends, the node or anywhere;
//! TCP, UDP, ICMP echo or an ICMP error quoting a flow), then damaged or not
//! (cut short, bytes overwritten, padded, marked a fragment), or raw bytes.
//! For each:
//! - the test run succeeds (no verifier or runtime error) with a verdict the
//!   hook allows (never XDP_ABORTED);
//! - a frame the program rewrote parses with etherparse, an independent
//!   parser, and when the frame given was well formed every checksum of the
//!   rewritten one (IPv4 header, TCP, UDP, ICMP) is right.
//!
//! Conntrack, affinity and fragment state is cleared before each input, so
//! that an input replays alone as it ran.
#![no_main]

use std::{
    cell::RefCell,
    net::{Ipv4Addr, Ipv6Addr},
};

use arbitrary::Arbitrary;
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, PacketBuilder, PacketBuilderStep, SlicedPacket, icmpv4,
    icmpv6,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    bpf::{Datapath, LoadOptions, NodeConfig, Sizes},
    cluster::NodeInfo,
    model::Slice,
    reconcile::Reconciler,
    source::SourceEvent,
    sync::Engine,
};
use lb_common::{Interface, iface};
use lb_testbed::{fib, packet, test_run};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const SIZES: Sizes = Sizes {
    services: 1024,
    service_ids: 16,
    backends: 256,
    maglev_entries: 1 << 20,
    conntrack: 4096,
};

const XDP_VERDICTS: [u32; 4] = [1, 2, 3, 4]; // drop, pass, tx, redirect
const TC_VERDICTS: [i32; 4] = [-1, 0, 2, 7]; // unspec, ok, shot, redirect

const SERVICES: &str = r#"[
  {"metadata": {"name": "web", "namespace": "t"},
   "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]}},
  {"metadata": {"name": "np", "namespace": "t"},
   "spec": {"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353, "nodePort": 30053}]}},
  {"metadata": {"name": "lb", "namespace": "t"},
   "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.12", "sessionAffinity": "ClientIP",
            "loadBalancerSourceRanges": ["198.51.100.0/24"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30081}]},
   "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}},
  {"metadata": {"name": "empty", "namespace": "t"},
   "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.13",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}}
]"#;

/// (slice, Service, family, endpoints as (address, node)).
const SLICES: [(&str, &str, &str, &[(&str, &str)]); 5] = [
    (
        "web-4",
        "web",
        "IPv4",
        &[("10.244.0.5", "node-a"), ("10.244.1.7", "node-b")],
    ),
    (
        "web-6",
        "web",
        "IPv6",
        &[("fd00:244::5", "node-a"), ("fd00:244:1::7", "node-b")],
    ),
    (
        "np-4",
        "np",
        "IPv4",
        &[("10.244.0.5", "node-a"), ("10.244.2.9", "node-c")],
    ),
    ("lb-4", "lb", "IPv4", &[("10.244.3.9", "node-d")]),
    ("empty-4", "empty", "IPv4", &[]),
];

/// Addresses frames come from and go to.
const V4: [Ipv4Addr; 12] = [
    Ipv4Addr::new(198, 51, 100, 7), // a client behind the router
    Ipv4Addr::new(10, 244, 0, 5),   // the local pod
    Ipv4Addr::new(10, 244, 1, 7),   // a pod on node B
    Ipv4Addr::new(10, 244, 3, 9),   // a pod behind flannel
    Ipv4Addr::new(10, 96, 0, 10),   // ClusterIPs
    Ipv4Addr::new(10, 96, 0, 11),
    Ipv4Addr::new(10, 96, 0, 12),
    Ipv4Addr::new(10, 96, 0, 13),
    Ipv4Addr::new(192, 0, 2, 1),    // the node
    Ipv4Addr::new(203, 0, 113, 10), // the LoadBalancer IP
    Ipv4Addr::new(192, 0, 2, 3),    // node C (a cold neighbour)
    Ipv4Addr::new(203, 0, 113, 99), // nobody's
];
const V6: [Ipv6Addr; 6] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7),
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 5),
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 7),
    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe),
];
const PORTS: [u16; 10] = [80, 53, 30080, 30053, 30081, 8080, 5353, 61_000, 61_050, 81];

fn addr4(i: u8) -> Ipv4Addr {
    V4[usize::from(i) % V4.len()]
}

fn addr6(i: u8) -> Ipv6Addr {
    V6[usize::from(i) % V6.len()]
}

/// An address, or any port number.
#[derive(Arbitrary, Debug)]
enum Port {
    Known(u8),
    Any(u16),
}

impl Port {
    fn get(&self) -> u16 {
        match self {
            Self::Known(i) => PORTS[usize::from(*i) % PORTS.len()],
            Self::Any(p) => *p,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum L4 {
    Tcp {
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp,
    Echo {
        id: u16,
        seq: u16,
    },
    /// Destination unreachable (or packet too big), quoting a TCP or UDP
    /// packet sent the other way.
    Error {
        code: u8,
        too_big: bool,
        quoted_udp: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Cut(u16),
    Set(u16, u8),
    Pad(u8),
    /// Marks the IPv4 packet a fragment (offset in 8-byte units, more).
    Fragment(u16, bool),
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Built {
        v6: bool,
        src: u8,
        dst: u8,
        sport: Port,
        dport: Port,
        ttl: u8,
        l4: L4,
        payload: Vec<u8>,
        damage: Vec<Damage>,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Hook {
    /// XDP on the uplink, from the router.
    XdpUplink,
    /// tc on the pod veth, from the local pod.
    TcPod,
    /// tc on the uplink: what XDP passed.
    TcUplink,
    /// tc on the flannel device: replies from another node's pods.
    TcFlannel,
}

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<(Hook, Frame)>,
}

struct Node {
    engine: Engine,
    dp: Datapath,
    uplink: u32,
    pod: u32,
    flannel: u32,
}

/// The node, set up once per process; the namespace stays until the process
/// ends (the testbed's scope clears namespaces of processes that are gone).
fn with_node<R>(f: impl FnOnce(&mut Node) -> R) -> R {
    thread_local! {
        static NODE: RefCell<Option<Node>> = const { RefCell::new(None) };
    }
    NODE.with_borrow_mut(|node| {
        let node = node.get_or_insert_with(|| {
            // libFuzzer calls the target on the main thread, which stays in
            // the namespace from here on.
            std::mem::forget(fib::FibNamespace::enter().expect("the one-node namespace (as root)"));
            set_up()
        });
        f(node)
    })
}

fn set_up() -> Node {
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: None,
        sizes: SIZES,
        log_level: None,
    })
    .expect("loading the datapath");
    let mut maps = dp.take_maps().expect("maps");
    let ifindex = |name: &str| lb_testbed::ifindex(name).expect("an interface of the namespace");
    let (uplink, pod, flannel) = (ifindex("up0"), ifindex("pod0"), ifindex("flannel.1"));
    maps.set_config(&NodeConfig {
        snat_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
        snat_v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        snat_ports: (61_000, 61_099),
        cluster_cidrs: true,
    })
    .expect("config");
    maps.set_cluster_cidrs(&[
        ("10.244.0.0".parse().unwrap(), 16),
        ("fd00:244::".parse().unwrap(), 48),
    ])
    .expect("cluster CIDRs");
    maps.add_tx_port(uplink).expect("tx port");
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
        maps.set_interface(ifindex(name), &entry)
            .expect("interface");
    }
    let mut engine = Engine::new(
        Reconciler::adopt(maps).expect("reconciler"),
        NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            zone: None,
        },
    );
    let services: Vec<Service> = serde_json::from_str(SERVICES).expect("the Services");
    let slices = SLICES
        .iter()
        .map(|(name, svc, family, eps)| {
            let endpoints: Vec<_> = eps
                .iter()
                .map(|(a, n)| json!({"addresses": [a], "nodeName": n, "conditions": {"ready": true}}))
                .collect();
            let port = json!([{"name": "http", "protocol": "TCP", "port": 8080},
                               {"name": "dns", "protocol": "UDP", "port": 5353}]);
            let s: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "t",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": family,
                "ports": port,
                "endpoints": endpoints,
            }))
            .expect("an EndpointSlice");
            Slice::from(&s)
        })
        .collect();
    engine.take(SourceEvent::Resync {
        services,
        slices,
        problems: Vec::new(),
    });
    let report = engine.sync().expect("the first sync");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    Node {
        engine,
        dp,
        uplink,
        pod,
        flannel,
    }
}

/// Ethernet addresses of a frame arriving on `hook`.
fn macs(hook: Hook) -> ([u8; 6], [u8; 6]) {
    match hook {
        Hook::XdpUplink | Hook::TcUplink => (fib::ROUTER_MAC, fib::UPLINK_MAC),
        Hook::TcPod => (fib::LOCAL_POD_MAC, fib::POD_GW_MAC),
        Hook::TcFlannel => ([2, 0, 0, 0, 3, 0], [2, 0, 0, 0, 3, 1]),
    }
}

fn ip_step(
    hook: Hook,
    v6: bool,
    src: u8,
    dst: u8,
    ttl: u8,
) -> PacketBuilderStep<etherparse::IpHeaders> {
    let (s, d) = macs(hook);
    let eth = PacketBuilder::ethernet2(s, d);
    let ttl = ttl.max(1);
    if v6 {
        eth.ipv6(addr6(src).octets(), addr6(dst).octets(), ttl)
    } else {
        eth.ipv4(addr4(src).octets(), addr4(dst).octets(), ttl)
    }
}

/// The shortest frame the kernel test-runs on `hook`: an Ethernet header,
/// and for tc what it reads of the network header before the program runs
/// (it refuses an skb empty past its link header, or shorter than the fixed
/// IPv4 or IPv6 header its EtherType announces, with EINVAL).
fn min_len(hook: Hook, frame: &[u8]) -> usize {
    match (hook, frame.get(12..14)) {
        (Hook::XdpUplink, _) => 14,
        (_, Some([0x08, 0x00])) => 14 + 20,
        (_, Some([0x86, 0xdd])) => 14 + 40,
        _ => 15,
    }
}

fn build(hook: Hook, frame: &Frame) -> (Vec<u8>, bool) {
    let (mut frame, intact) = build_frame(hook, frame);
    if frame.len() < 14 {
        frame.resize(14, 0);
    }
    let min = min_len(hook, &frame);
    if frame.len() < min {
        frame.resize(min, 0);
    }
    (frame, intact)
}

fn build_frame(hook: Hook, frame: &Frame) -> (Vec<u8>, bool) {
    let Frame::Built {
        v6,
        src,
        dst,
        sport,
        dport,
        ttl,
        l4,
        payload,
        damage,
    } = frame
    else {
        let Frame::Raw(raw) = frame else {
            unreachable!()
        };
        let mut raw = raw.clone();
        raw.truncate(1500);
        return (raw, false);
    };
    let payload = &payload[..payload.len().min(256)];
    let (v6, src, dst, ttl) = (*v6, *src, *dst, *ttl);
    let (sport, dport) = (sport.get(), dport.get());
    let b = ip_step(hook, v6, src, dst, ttl);
    let mut out = Vec::new();
    let built = match l4 {
        L4::Tcp { flags, seq, ack } => {
            let mut t = b.tcp(sport, dport, *seq, 64_240);
            if flags & packet::SYN != 0 {
                t = t.syn();
            }
            if flags & packet::ACK != 0 {
                t = t.ack(*ack);
            }
            if flags & packet::RST != 0 {
                t = t.rst();
            }
            if flags & packet::FIN != 0 {
                t = t.fin();
            }
            if flags & packet::PSH != 0 {
                t = t.psh();
            }
            t.write(&mut out, payload)
        }
        L4::Udp => b.udp(sport, dport).write(&mut out, payload),
        L4::Echo { id, seq } if v6 => b.icmpv6_echo_request(*id, *seq).write(&mut out, payload),
        L4::Echo { id, seq } => b.icmpv4_echo_request(*id, *seq).write(&mut out, payload),
        L4::Error {
            code,
            too_big,
            quoted_udp,
        } => {
            // The packet that caused it went the other way: dst to src.
            let inner = PacketBuilder::ip(if v6 {
                etherparse::IpHeaders::Ipv6(
                    etherparse::Ipv6Header {
                        source: addr6(dst).octets(),
                        destination: addr6(src).octets(),
                        hop_limit: 64,
                        ..Default::default()
                    },
                    Default::default(),
                )
            } else {
                etherparse::IpHeaders::Ipv4(
                    etherparse::Ipv4Header::new(
                        0,
                        64,
                        IpNumber::UDP,
                        addr4(dst).octets(),
                        addr4(src).octets(),
                    )
                    .unwrap(),
                    Default::default(),
                )
            });
            let mut quoted = Vec::new();
            let _ = if *quoted_udp {
                inner.udp(dport, sport).write(&mut quoted, &[])
            } else {
                inner
                    .tcp(dport, sport, 1, 1000)
                    .syn()
                    .write(&mut quoted, &[])
            };
            quoted.extend_from_slice(payload);
            if v6 {
                let t = if *too_big {
                    Icmpv6Type::PacketTooBig { mtu: 1280 }
                } else {
                    Icmpv6Type::DestinationUnreachable(
                        icmpv6::DestUnreachableCode::from_u8(code % 7)
                            .unwrap_or(icmpv6::DestUnreachableCode::Port),
                    )
                };
                b.icmpv6(t).write(&mut out, &quoted)
            } else {
                let h = if *too_big {
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
                } else {
                    icmpv4::DestUnreachableHeader::from_values(code % 16, 0)
                        .unwrap_or(icmpv4::DestUnreachableHeader::Port)
                };
                b.icmpv4(Icmpv4Type::DestinationUnreachable(h))
                    .write(&mut out, &quoted)
            }
        }
    };
    built.expect("building a frame");
    let mut intact = true;
    for d in damage.iter().take(4) {
        intact = false;
        match d {
            Damage::Cut(n) => out.truncate(usize::from(*n)),
            Damage::Set(at, byte) => {
                if !out.is_empty() {
                    let at = usize::from(*at) % out.len();
                    out[at] = *byte;
                }
            }
            Damage::Pad(n) => out.resize(out.len() + usize::from(*n), 0),
            Damage::Fragment(offset, more) => {
                if !v6 && out.len() >= 34 {
                    let v = (offset & 0x1fff) | if *more { 0x2000 } else { 0 };
                    out[20..22].copy_from_slice(&v.to_be_bytes());
                    let sum = etherparse::Ipv4HeaderSlice::from_slice(&out[14..])
                        .map(|h| h.to_header().calc_header_checksum());
                    if let Ok(sum) = sum {
                        out[24..26].copy_from_slice(&sum.to_be_bytes());
                    }
                    // Still well formed: a fragment of a datagram.
                    intact = damage.len() == 1;
                }
            }
        }
    }
    (out, intact)
}

/// Checks every checksum of an ICMP message the way etherparse computes it.
fn icmp_checksum_ok(frame: &[u8]) -> Result<(), String> {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return Ok(());
    };
    match &p.transport {
        Some(etherparse::TransportSlice::Icmpv4(icmp)) => {
            let want = icmp.icmp_type().calc_checksum(icmp.payload());
            (icmp.checksum() == want).then_some(()).ok_or(format!(
                "ICMPv4 checksum {:#x}, want {want:#x}",
                icmp.checksum()
            ))
        }
        Some(etherparse::TransportSlice::Icmpv6(icmp)) => {
            let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
                return Err("ICMPv6 outside IPv6".into());
            };
            let h = ip.header();
            let want = icmp
                .icmp_type()
                .calc_checksum(h.source(), h.destination(), icmp.payload())
                .map_err(|e| e.to_string())?;
            (icmp.checksum() == want).then_some(()).ok_or(format!(
                "ICMPv6 checksum {:#x}, want {want:#x}",
                icmp.checksum()
            ))
        }
        _ => Ok(()),
    }
}

/// What a rewritten frame must be: parseable, and with `well_formed` input,
/// right in every checksum.
fn check_output(input: &[u8], output: &[u8], well_formed: bool, what: &str) {
    if output == input {
        return;
    }
    if let Err(e) = etherparse::PacketHeaders::from_ethernet_slice(output) {
        panic!(
            "{what}: the rewritten frame does not parse: {e}\nin:  {input:02x?}\nout: {output:02x?}"
        );
    }
    if !well_formed {
        return;
    }
    let icmp = icmp_checksum_ok(output);
    let l4 = match etherparse::PacketHeaders::from_ethernet_slice(output)
        .unwrap()
        .transport
    {
        Some(etherparse::TransportHeader::Tcp(_) | etherparse::TransportHeader::Udp(_)) => {
            packet::check(output)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        }
        _ => Ok(()),
    };
    let ip4 = match SlicedPacket::from_ethernet(output).map(|p| p.net) {
        Ok(Some(etherparse::NetSlice::Ipv4(ip))) => {
            let h = ip.header().to_header();
            (h.header_checksum == h.calc_header_checksum())
                .then_some(())
                .ok_or_else(|| "IPv4 header checksum wrong".to_string())
        }
        _ => Ok(()),
    };
    for r in [ip4, l4, icmp] {
        if let Err(e) = r {
            panic!(
                "{what}: the rewritten frame is wrong: {e}\nin:  {}\nout: {}\n{input:02x?}\n{output:02x?}",
                packet::describe(input),
                packet::describe(output)
            );
        }
    }
}

fn well_formed(frame: &[u8], intact: bool) -> bool {
    intact && packet::check(frame).is_ok() && icmp_checksum_ok(frame).is_ok()
}

fuzz_target!(|input: Input| {
    with_node(|node| {
        {
            let mut r = node.engine.reconciler();
            let maps = r.maps_mut();
            let keys: Vec<_> = maps.conntrack.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = maps.conntrack.remove(&k);
            }
            let keys: Vec<_> = maps.affinity.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = maps.affinity.remove(&k);
            }
            let keys: Vec<_> = maps.fragments.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = maps.fragments.remove(&k);
            }
        }
        for (i, (hook, frame)) in input.frames.iter().take(4).enumerate() {
            let (bytes, intact) = build(*hook, frame);
            let good = well_formed(&bytes, intact);
            let what = format!("frame {i} on {hook:?}");
            let (verdict, out) = match hook {
                Hook::XdpUplink => {
                    let r = test_run::xdp(node.dp.xdp().unwrap(), &bytes, node.uplink, 1)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    assert!(
                        XDP_VERDICTS.contains(&r.ret),
                        "{what}: XDP verdict {}",
                        r.ret
                    );
                    (i64::from(r.ret), r.frame)
                }
                Hook::TcPod | Hook::TcUplink | Hook::TcFlannel => {
                    let ifindex = match hook {
                        Hook::TcPod => node.pod,
                        Hook::TcUplink => node.uplink,
                        _ => node.flannel,
                    };
                    let r = test_run::tc(node.dp.tc().unwrap(), &bytes, ifindex)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    assert!(TC_VERDICTS.contains(&r.ret), "{what}: tc verdict {}", r.ret);
                    (i64::from(r.ret), r.frame)
                }
            };
            // A dropped frame goes nowhere: what is left of it does not matter.
            let dropped = match hook {
                Hook::XdpUplink => verdict == 1,
                _ => verdict == 2,
            };
            if !dropped {
                check_output(&bytes, &out, good, &what);
            }
        }
    });
});
