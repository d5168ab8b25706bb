//! A flow's life in conntrack: the datapath marks what it has seen (the
//! backend's answer, the client's acknowledgement, a FIN or RST) on the
//! flow's entries; an unconfirmed flow (a spoofed SYN's) gives its source-NAT
//! port back within seconds while an established one keeps it; the agent's
//! sweep (`lb_agent::conntrack::expire`) deletes each flow once it has been
//! idle as long as its state allows, and reply entries left on their own.
//!
//! Frames go through the datapath in the one-node namespace with
//! BPF_PROG_TEST_RUN (built and read back by etherparse, checksums checked).
//! Time is not waited for: entries are aged by rewriting their stamps, and
//! the sweep is given the time to judge by. Needs root.

mod support;

use std::net::SocketAddr;

use lb_agent::conntrack::{self, datapath_now};
use lb_common::{
    CT_CLOSING_NS, CT_F_ACKED, CT_F_CLOSING, CT_F_REPLIED, CT_TCP_ESTABLISHED_NS, CT_UDP_NS,
    CT_UNCONFIRMED_NS, CtEntry, FlowKey, Reason, ct_confirmed,
};
use support::{
    CLUSTER_IP, Lab, NODE_PORT, SNAT_PORTS, TCP, UDP, XDP_DROP, XDP_TX, backend, fib::*, flow_key,
    packet::*, sa,
};

const S: u64 = 1_000_000_000;
const NODEPORT: &str = "192.0.2.1:30090";
const BACKEND: &str = "10.244.1.41:8080";

/// Frames from the backend on node-b, arriving on the uplink.
const FROM_NODE_B: ([u8; 6], [u8; 6]) = (NODE_B_MAC, UPLINK_MAC);

/// A NodePort with one remote backend: every flow is source-NATed.
fn nodeport_lab() -> Lab {
    let mut lab = Lab::new();
    lab.service(&[sa(NODEPORT)], TCP, &[backend(BACKEND, false)], NODE_PORT);
    lab
}

fn entry(lab: &Lab, k: &FlowKey) -> Option<CtEntry> {
    lab.maps.conntrack.get(k, 0).ok()
}

/// The client's SYN; returns the source-NAT address it left with (None:
/// dropped).
fn open(lab: &mut Lab, client: SocketAddr) -> Option<SocketAddr> {
    match lab.xdp(&syn(client, sa(NODEPORT))) {
        (XDP_TX, out) => Some(decode(&out).src_addr()),
        (XDP_DROP, _) => None,
        (action, _) => panic!("SYN from {client}: action {action}"),
    }
}

/// The backend's SYN-ACK to the source-NAT address `snat`; returns where it
/// went, translated.
fn answer(lab: &mut Lab, snat: SocketAddr) -> SocketAddr {
    let (action, out) = lab.xdp(&tcp(
        FROM_NODE_B,
        sa(BACKEND),
        snat,
        SYN | ACK,
        5000,
        1001,
        &[],
    ));
    assert_eq!(action, XDP_TX, "SYN-ACK to {snat}");
    let out = decode(&out);
    assert_eq!(
        out.src_addr(),
        sa(NODEPORT),
        "the reply comes from the NodePort"
    );
    out.dst_addr()
}

/// The client's segment with `flags` after the handshake; returns the
/// source port it left with.
fn send(lab: &mut Lab, client: SocketAddr, flags: u8) -> u16 {
    let (action, out) = lab.xdp(&tcp(
        FROM_ROUTER,
        client,
        sa(NODEPORT),
        flags,
        1001,
        5001,
        b"x",
    ));
    assert_eq!(action, XDP_TX, "segment from {client}");
    decode(&out).src_addr().port()
}

/// The whole handshake; returns the source-NAT address of the flow.
fn establish(lab: &mut Lab, client: SocketAddr) -> SocketAddr {
    let snat = open(lab, client).expect("a port for the flow");
    assert_eq!(answer(lab, snat), client);
    send(lab, client, ACK);
    snat
}

/// Sets every entry's stamp to `ago` before now (on the datapath's clock).
fn age_all(lab: &mut Lab, ago: u64) {
    let then = datapath_now() - ago;
    let all: Vec<_> = lab.maps.conntrack.iter().map(Result::unwrap).collect();
    for (k, mut v) in all {
        v.last_seen_ns = then;
        lab.maps.conntrack.insert(k, v, 0).unwrap();
    }
}

#[test]
fn the_flows_entries_tell_its_state_answered_acknowledged_closing() {
    let mut lab = nodeport_lab();
    let client = sa("198.51.100.7:40007");
    let fk = flow_key(client, sa(NODEPORT), TCP);
    let t0 = datapath_now();
    let snat = open(&mut lab, client).unwrap();
    let f = entry(&lab, &fk).expect("forward entry");
    assert_eq!(f.flags & (CT_F_REPLIED | CT_F_ACKED), 0, "{f:?}");
    assert!(f.last_seen_ns >= t0, "stamped when opened: {f:?}");
    let rk = flow_key(sa(BACKEND), snat, TCP);
    let r = entry(&lab, &rk).expect("reply entry");
    assert!(r.last_seen_ns >= t0, "the reply entry too: {r:?}");

    // The backend answers: both entries know (the forward one from the
    // reply's news).
    answer(&mut lab, snat);
    let f = entry(&lab, &fk).unwrap();
    assert_ne!(f.flags & CT_F_REPLIED, 0, "{f:?}");
    assert_ne!(entry(&lab, &rk).unwrap().flags & CT_F_REPLIED, 0);
    assert!(!ct_confirmed(f.flags, TCP), "not acknowledged yet");
    // A retransmitted SYN is no acknowledgement.
    open(&mut lab, client).unwrap();
    assert_eq!(entry(&lab, &fk).unwrap().flags & CT_F_ACKED, 0);
    // The client's ACK confirms it.
    send(&mut lab, client, ACK);
    let f = entry(&lab, &fk).unwrap();
    assert!(ct_confirmed(f.flags, TCP), "{f:?}");
    assert_eq!(f.flags & CT_F_CLOSING, 0);

    // The backend's FIN: the forward entry learns the flow is closing.
    let (action, _) = lab.xdp(&tcp(
        FROM_NODE_B,
        sa(BACKEND),
        snat,
        FIN | ACK,
        5001,
        1002,
        &[],
    ));
    assert_eq!(action, XDP_TX);
    assert_ne!(entry(&lab, &fk).unwrap().flags & CT_F_CLOSING, 0);
}

/// The attack of issue 13: spoofed SYNs fill the source-NAT range of a
/// NodePort with a remote backend, so real clients are refused. Their
/// flows are unconfirmed (the backend's SYN-ACKs go nowhere), so their
/// ports come back once the spoofed clients have been quiet for
/// `CT_UNCONFIRMED_NS` (even while the backend keeps retransmitting its
/// SYN-ACKs), while an established flow keeps its port however idle.
#[test]
fn spoofed_syns_hold_source_nat_ports_for_seconds_and_established_flows_keep_theirs() {
    let mut lab = nodeport_lab();
    let real = sa("198.51.100.245:50005");
    let held = establish(&mut lab, real);
    let span = usize::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    let mut spoofed = Vec::new();
    for i in 0..3 * span {
        let client = sa(&format!("198.51.100.{}:{}", 2 + i % 200, 1024 + i));
        if let Some(snat) = open(&mut lab, client) {
            answer(&mut lab, snat);
            spoofed.push(snat);
        }
    }
    assert_eq!(spoofed.len(), span - 1, "the flood took every other port");
    assert!(!spoofed.contains(&held));
    let newcomer = sa("198.51.100.246:50006");
    assert_eq!(open(&mut lab, newcomer), None, "a real client is refused");
    assert!(lab.reason(Reason::DropSnatExhausted) > 0);

    // A little less than the limit: still held.
    age_all(&mut lab, CT_UNCONFIRMED_NS - 2 * S);
    assert_eq!(open(&mut lab, newcomer), None);
    // The limit passed; the backend retransmits its SYN-ACKs all the while.
    age_all(&mut lab, CT_UNCONFIRMED_NS + S);
    for snat in &spoofed {
        answer(&mut lab, *snat);
    }
    let got = open(&mut lab, newcomer).expect("a port for the real client");
    assert_ne!(got, held, "the established flow's port is not taken");
    // Real clients get the spoofed flows' ports, never the established one's.
    let mut ports = std::collections::BTreeSet::from([got.port()]);
    for i in 0..span / 2 {
        let client = sa(&format!("198.51.100.{}:{}", 2 + i % 200, 52_000 + i));
        let snat = open(&mut lab, client).unwrap_or_else(|| panic!("client {i} refused"));
        assert!(
            ports.insert(snat.port()),
            "port {} given twice",
            snat.port()
        );
    }
    assert!(!ports.contains(&held.port()));
    // The established flow still leaves with its port, its reply comes back.
    assert_eq!(send(&mut lab, real, ACK | PSH), held.port());
    let (action, out) = lab.xdp(&tcp(FROM_NODE_B, sa(BACKEND), held, ACK, 5001, 1002, b"y"));
    assert_eq!(action, XDP_TX);
    assert_eq!(decode(&out).dst_addr(), real);
}

/// The entries of the flow of `(client, front)` still in the map: (forward,
/// reply) present.
fn present(
    lab: &Lab,
    client: SocketAddr,
    front: SocketAddr,
    proto: u8,
    reply: FlowKey,
) -> (bool, bool) {
    (
        entry(lab, &flow_key(client, front, proto)).is_some(),
        entry(lab, &reply).is_some(),
    )
}

#[test]
fn the_sweep_expires_each_flow_by_its_state_and_reply_entries_left_alone() {
    let mut lab = nodeport_lab();
    let vip = sa("10.96.0.90:53");
    let pod = "10.244.0.9:5353";
    lab.service(&[vip], UDP, &[backend(pod, true)], CLUSTER_IP);

    // TCP: established, half-open (a spoofed SYN, answered), closing.
    let est = sa("198.51.100.241:41001");
    let est_snat = establish(&mut lab, est);
    let half = sa("198.51.100.231:41002");
    let half_snat = open(&mut lab, half).unwrap();
    answer(&mut lab, half_snat);
    let closing = sa("198.51.100.243:41003");
    let closing_snat = establish(&mut lab, closing);
    send(&mut lab, closing, FIN | ACK);
    // An established flow whose forward entry the LRU evicted: its reply
    // entry is left on its own.
    let orphan = sa("198.51.100.244:41004");
    let orphan_snat = establish(&mut lab, orphan);
    lab.maps
        .conntrack
        .remove(&flow_key(orphan, sa(NODEPORT), TCP))
        .unwrap();
    // UDP (to a pod on this node, through tc): answered, and not.
    let pod_side = |lab: &mut Lab, client: SocketAddr, answered: bool| {
        let (action, _) = lab.tc_on(lab.uplink, &udp(FROM_ROUTER, client, vip, b"q"));
        assert_eq!(action, support::TC_REDIRECT);
        if answered {
            let (action, _) = lab.tc_on(
                lab.pod,
                &udp((LOCAL_POD_MAC, POD_GW_MAC), sa(pod), client, b"a"),
            );
            assert_eq!(action, support::TC_REDIRECT, "the answer from the pod");
        }
    };
    let udp_answered = sa("198.51.100.245:41005");
    let udp_silent = sa("198.51.100.236:41006");
    pod_side(&mut lab, udp_answered, true);
    pod_side(&mut lab, udp_silent, false);
    let before = lab.maps.conntrack.keys().count();
    assert_eq!(before, 2 * 6 - 1);

    let reply = |snat: SocketAddr| flow_key(sa(BACKEND), snat, TCP);
    let udp_reply = |client: SocketAddr| flow_key(sa(pod), client, UDP);
    // Judged at increasing times from now, as if no packet came meanwhile.
    let now = datapath_now();
    let sweep = |lab: &mut Lab, after: u64| {
        conntrack::expire(&mut lab.maps.conntrack, now + after).unwrap()
    };
    let s = sweep(&mut lab, CT_UNCONFIRMED_NS - S);
    assert_eq!((s.entries, s.walked), (0, before), "{s:?}");
    assert!(s.complete);

    let s = sweep(&mut lab, CT_UNCONFIRMED_NS);
    // The half-open flow and the unanswered UDP flow go, both entries each;
    // the orphan reply entry goes too (idle past its limit without its flow).
    assert_eq!(
        present(&lab, half, sa(NODEPORT), TCP, reply(half_snat)),
        (false, false)
    );
    assert_eq!(
        present(&lab, udp_silent, vip, UDP, udp_reply(udp_silent)),
        (false, false)
    );
    assert_eq!(
        entry(&lab, &reply(orphan_snat)),
        None,
        "the orphan reply entry"
    );
    assert_eq!((s.flows, s.entries), (2, 5), "{s:?}");
    assert_eq!(
        present(&lab, closing, sa(NODEPORT), TCP, reply(closing_snat)),
        (true, true)
    );

    let s = sweep(&mut lab, CT_CLOSING_NS);
    assert_eq!((s.flows, s.entries), (1, 2), "the closing flow: {s:?}");
    let s = sweep(&mut lab, CT_UDP_NS);
    assert_eq!((s.flows, s.entries), (1, 2), "the answered UDP flow: {s:?}");
    assert_eq!(
        present(&lab, est, sa(NODEPORT), TCP, reply(est_snat)),
        (true, true)
    );
    let s = sweep(&mut lab, CT_TCP_ESTABLISHED_NS - S);
    assert_eq!(s.entries, 0, "an established flow lives a day: {s:?}");
    // Its reply side still busy (a server pushing to an idle client): kept.
    let mut r = entry(&lab, &reply(est_snat)).unwrap();
    r.last_seen_ns = now + CT_TCP_ESTABLISHED_NS - S;
    lab.maps.conntrack.insert(reply(est_snat), r, 0).unwrap();
    let s = sweep(&mut lab, CT_TCP_ESTABLISHED_NS);
    assert_eq!(s.entries, 0, "the backend's side keeps it: {s:?}");
    let s = sweep(&mut lab, 2 * CT_TCP_ESTABLISHED_NS);
    assert_eq!((s.flows, s.entries), (1, 2), "{s:?}");
    assert_eq!(lab.maps.conntrack.keys().count(), 0);
}

/// More flows than conntrack holds: the LRU evicts, and the agent's count of
/// evictions (`conntrack::Pressure`, from the datapath's `ct_stats` and the
/// sweep) is exactly the entries created less those the map still holds,
/// counted independently by walking it. Flows the sweep expires are
/// deletions, not evictions; and while the map has room nothing is counted.
#[test]
fn entries_the_lru_evicts_are_counted_and_deletions_are_not() {
    let mut lab = Lab::new();
    let vip = sa("10.96.0.91:53");
    let pod = "10.244.0.9:5353";
    lab.service(&[vip], UDP, &[backend(pod, true)], CLUSTER_IP);
    let capacity = support::SIZES.conntrack as usize;
    let mut flows = 0u16;
    let mut flood = |lab: &mut Lab, n: u16| {
        for _ in 0..n {
            flows += 1;
            let client = SocketAddr::from(([198, 51, 100, 7], 20_000 + flows));
            let (action, _) = lab.tc_on(lab.uplink, &udp(FROM_ROUTER, client, vip, b"q"));
            assert_eq!(action, support::TC_REDIRECT, "flow {flows}");
        }
    };
    let sweep = |lab: &mut Lab, pressure: &mut conntrack::Pressure, at: u64| {
        let counts = conntrack::CtCounts::read(&lab.maps.ct_stats).unwrap();
        let s = conntrack::expire(&mut lab.maps.conntrack, at).unwrap();
        assert!(s.complete, "{s:?}");
        pressure.deleted(s.entries);
        let held = s.walked - s.entries;
        assert_eq!(held, lab.maps.conntrack.keys().count(), "the sweep's count");
        (counts, held, pressure.observe(counts, held))
    };
    let mut pressure = conntrack::Pressure::default();
    let now = datapath_now();
    assert_eq!(sweep(&mut lab, &mut pressure, now).2, 0, "the baseline");

    // Half full: two entries per flow, none evicted.
    let half = (capacity / 4) as u16;
    flood(&mut lab, half);
    let (counts, held, evicted) = sweep(&mut lab, &mut pressure, now);
    assert_eq!((counts.created, counts.removed), (2 * u64::from(half), 0));
    assert_eq!((held, evicted), (2 * usize::from(half), 0));

    // Half again as many flows as the map has room for entries.
    let more = (capacity * 3 / 4) as u16;
    flood(&mut lab, more);
    let (counts, held, evicted) = sweep(&mut lab, &mut pressure, now);
    let created = 2 * u64::from(half + more);
    assert_eq!(counts.created, created);
    assert!(held <= capacity, "{held} held");
    assert_eq!(
        evicted,
        created - held as u64,
        "evicted: created {created}, held {held}"
    );
    assert!(evicted >= created - capacity as u64, "{evicted}");
    // Counted once.
    assert_eq!(sweep(&mut lab, &mut pressure, now).2, 0);

    // The sweep expires every flow (unanswered UDP): deleted, not evicted.
    let (_, held, evicted) = sweep(&mut lab, &mut pressure, now + CT_UNCONFIRMED_NS + S);
    assert_eq!((held, evicted), (0, 0));
}
