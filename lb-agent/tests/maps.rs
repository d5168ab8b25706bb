//! The typed map writers and the sync engine against real (unpinned) maps.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    bpf::{Datapath, LoadOptions, Maps, Sizes},
    cluster::{NodeInfo, ObjectKey},
    health::Health,
    maglev,
    metrics::Metrics,
    model::{Frontend, Proto, Slice},
    reconcile::{Drift, Reconciler, encoding::service_key},
    source::SourceEvent,
    sync::Engine,
};
use lb_common::{Backend, ServiceKey};
use lb_testbed::{
    fib::FibNamespace,
    packet::{decode, syn},
    test_run,
};
use support::{Lab, SIZES, Wired, XDP_TX};

/// Table `r`'s test pattern: non-zero ids no other table has.
fn pattern(r: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| (r * 100_000 + i + 1) as u32).collect()
}

#[test]
fn maglev_tables_of_every_size_read_back_what_was_written_where_it_was() {
    let mut lab = Lab::new();
    let maglev = &mut lab.maps.maglev;
    let elements = maglev.elements();
    assert_eq!(elements, SIZES.maglev_elements());
    // Tables of odd sizes back to back: 251 ids (1008 bytes with the pair
    // padding) straddle page boundaries, a single entry takes one element,
    // 4093 several pages; each write maps just the pages of its table.
    let sizes = [251usize, 1, 4093, 7, 251, 8191];
    let mut at = Vec::new();
    let mut start = 0u32;
    for (r, len) in sizes.iter().enumerate() {
        at.push(start);
        assert_eq!(maglev.write(start, &pattern(r, *len)).unwrap(), *len);
        start += lb_common::maglev_row_elements(*len as u32);
    }
    // Written all, then read all: no table overlaps another.
    for (r, len) in sizes.iter().enumerate() {
        assert_eq!(
            maglev.read(at[r], *len).unwrap(),
            pattern(r, *len),
            "table {r}"
        );
        assert!(maglev.intact(at[r]).unwrap());
    }
    // Only changed entries are stored (and counted).
    let mut t = pattern(2, 4093);
    t[4092] = 7;
    assert_eq!(maglev.write(at[2], &t).unwrap(), 1);
    assert_eq!(maglev.read(at[2], 4093).unwrap(), t);
    assert_eq!(maglev.read(at[3], 7).unwrap(), pattern(3, 7));
    // A write elsewhere shows in the fingerprint; a forgotten table is
    // intact no more (nothing to compare with).
    let mut u = pattern(4, 251);
    u[0] = 1;
    maglev.write(at[4] - 1, &[9, 9, 9]).unwrap();
    assert!(
        !maglev.intact(at[4]).unwrap(),
        "its first entries were overwritten"
    );
    maglev.write(at[4], &u).unwrap();
    assert!(maglev.intact(at[4]).unwrap());
    maglev.forget(at[4]);
    assert!(!maglev.intact(at[4]).unwrap());
    // Past the end, or empty: errors, not writes elsewhere.
    assert!(maglev.write(elements - 1, &[1, 2, 3]).is_err());
    assert!(maglev.read(elements, 1).is_err());
    assert!(maglev.write(0, &[]).is_err());
    assert_eq!(
        maglev.write(elements - 1, &[1, 2]).unwrap(),
        2,
        "the last element"
    );
}

/// Service `s<i>` in namespace `t`: ClusterIP 10.96.1.<i>, TCP port 80 to 8080.
fn service(i: usize) -> Service {
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: s{i}, namespace: t}}\n\
         spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80, targetPort: 8080}}]}}"
    ))
    .unwrap()
}

/// The slice of `s<i>` with `endpoints` ready endpoints 10.244.<i>.10, .11, ...
fn slice(i: usize, endpoints: usize) -> Slice {
    let eps: Vec<String> = (0..endpoints)
        .map(|j| format!("{{addresses: [\"10.244.{i}.{}\"]}}", 10 + j))
        .collect();
    let slice: EndpointSlice = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: s{i}-x, namespace: t, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
        eps.join(", ")
    ))
    .unwrap();
    Slice::from(&slice)
}

/// The `services` key of `s<i>`'s ClusterIP frontend.
fn cluster_ip_key(i: usize) -> ServiceKey {
    service_key(&Frontend {
        addr: [10, 96, 1, i as u8].into(),
        port: 80,
        proto: Proto::Tcp,
    })
}

/// A sync engine over fresh maps of `sizes`, on node-a (192.0.2.1); `before`
/// writes into the maps first, as an earlier agent would have.
fn engine(sizes: Sizes, before: impl FnOnce(&mut Maps)) -> (Datapath, Engine) {
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: None,
        sizes,
        log_level: None,
    })
    .unwrap();
    let mut maps = dp.take_maps().unwrap();
    before(&mut maps);
    let engine = Engine::new(
        Reconciler::adopt(maps).unwrap(),
        NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
            zone: None,
        },
    );
    (dp, engine)
}

/// A full sync builds its Maglev tables ahead, on several threads, over backend
/// positions (ids are assigned later, as backends are written): every row must
/// still be the table over its backends' ids.
#[test]
fn rows_written_by_a_full_sync_are_the_maglev_tables_of_their_backends() {
    let sizes = Sizes {
        services: 1024,
        service_ids: 64,
        backends: 1024,
        maglev_entries: 1 << 20,
        conntrack: 4096,
    };
    let _fib = FibNamespace::enter().unwrap();
    let (_dp, mut engine) = engine(sizes, |_| {});
    // 40 Services (enough to be built on threads) of 3 to 7 endpoints.
    let n = 40;
    let endpoints = |i: usize| 3 + i % 5;
    engine.take(SourceEvent::Resync {
        services: (0..n).map(service).collect(),
        slices: (0..n).map(|i| slice(i, endpoints(i))).collect(),
        problems: Vec::new(),
    });
    let sync = engine.sync().expect("a listing is a sync to do");
    assert_eq!(sync.changed.len(), n);
    assert!(sync.problems.is_empty(), "{:?}", sync.problems);
    let reconciler = engine.reconciler();
    let maps = reconciler.maps();
    for i in 0..n {
        let svc = maps.services.get(&cluster_ip_key(i), 0).unwrap();
        let row = maps.maglev.read_table(&svc).unwrap();
        let ids: BTreeSet<u32> = row.iter().copied().collect();
        assert_eq!(ids.len(), endpoints(i), "service {i}");
        assert_eq!(svc.table_size, maglev::table_size_for(endpoints(i)));
        let entries: Vec<(SocketAddr, u32)> = ids
            .iter()
            .map(|id| {
                let b = maps.backends.get(id, 0).unwrap();
                let ip: [u8; 4] = b.addr[..4].try_into().unwrap();
                (SocketAddr::from((ip, b.port)), *id)
            })
            .collect();
        assert_eq!(row, maglev::build(&entries, svc.table_size), "service {i}");
    }
}

/// The engine syncs nothing before a full listing (a partial store would
/// remove what it lacks); its first sync removes what an earlier agent left
/// and nobody wants any more; after that it syncs exactly what changes.
#[test]
fn the_engine_waits_for_a_listing_finishes_adoption_once_and_then_syncs_changes() {
    let _fib = FibNamespace::enter().unwrap();
    // An earlier agent's frontend, of a Service that is gone.
    let stale = cluster_ip_key(99);
    let (_dp, mut engine) = engine(support::SIZES, |maps| {
        maps.set_service(&stale, &lb_common::Service::default())
            .unwrap();
    });
    let present =
        |engine: &Engine, k: &ServiceKey| engine.reconciler().maps().services.get(k, 0).ok();

    engine.take(SourceEvent::ServiceApplied(Box::new(service(1))));
    assert!(!engine.is_due(), "no listing yet");
    assert!(engine.sync().is_none());
    assert!(present(&engine, &stale).is_some(), "nothing removed yet");

    engine.take(SourceEvent::Resync {
        services: vec![service(1)],
        slices: vec![slice(1, 1)],
        problems: Vec::new(),
    });
    let first = engine.sync().expect("the listing is due");
    assert!(first.first);
    assert_eq!(first.changed.len(), 1);
    assert!(first.latency.is_some());
    assert!(present(&engine, &stale).is_none(), "adoption finished");
    assert_eq!(first.stats.frontends_removed, 1, "{:?}", first.stats);
    assert_eq!(
        present(&engine, &cluster_ip_key(1)).unwrap().backend_count,
        1
    );

    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 2))));
    let second = engine.sync().expect("a changed slice is due");
    assert!(!second.first);
    assert_eq!(second.changed.len(), 1);
    assert_eq!(second.stats.frontends_removed, 0);
    assert_eq!(
        present(&engine, &cluster_ip_key(1)).unwrap().backend_count,
        2
    );
    assert_eq!(second.occupancy.backends, 2);

    // The same slice again changes nothing: no sync is due.
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 2))));
    assert!(!engine.is_due());
}

/// Service `name` in namespace `t`: ClusterIP `cluster_ip`, these
/// externalIPs, TCP port 80 to 8080.
fn with_external_ips(name: &str, cluster_ip: &str, external_ips: &[&str]) -> Service {
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {name}, namespace: t}}\n\
         spec: {{clusterIP: {cluster_ip}, externalIPs: [{}], ports: [{{port: 80, targetPort: 8080}}]}}",
        external_ips.join(", ")
    ))
    .unwrap()
}

/// A ClusterIP's address entry (port 0: its other ports are refused) stands
/// exactly while some ClusterIP frontend is on the address, also when a
/// frontend changes kind under the same key: a Service's ClusterIP that
/// becomes its externalIP, another Service's externalIP taking over a
/// ClusterIP's frontend (the smaller Service owns a contested frontend) and
/// giving it back, and a ClusterIP taking over an externalIP's frontend.
/// (Found by the model fuzz target: the entry's reference went with the
/// first owner's kind only, so it was left behind, or missing.)
#[test]
fn the_address_entry_follows_a_frontend_that_changes_kind() {
    let _fib = FibNamespace::enter().unwrap();
    let (_dp, mut engine) = engine(support::SIZES, |_| {});
    let address = |ip: &str| {
        lb_agent::reconcile::encoding::address_key(&service_key(&Frontend {
            addr: ip.parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }))
    };
    let sync = |engine: &mut Engine, events: Vec<SourceEvent>| {
        for e in events {
            engine.take(e);
        }
        let report = engine.sync().expect("a sync is due");
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.kind != lb_agent::cluster::ProblemKind::Capacity)
        );
        assert_eq!(engine.verify().unwrap().unwrap(), Drift::default());
    };
    let has = |engine: &Engine, ip: &str| {
        engine
            .reconciler()
            .maps()
            .services
            .get(&address(ip), 0)
            .is_ok()
    };
    let applied = |s: Service| SourceEvent::ServiceApplied(Box::new(s));
    let deleted = |name: &str| SourceEvent::ServiceDeleted(ObjectKey::new("t", name));
    sync(
        &mut engine,
        vec![SourceEvent::Resync {
            services: vec![with_external_ips("one", "10.96.3.1", &[])],
            slices: Vec::new(),
            problems: Vec::new(),
        }],
    );
    assert!(has(&engine, "10.96.3.1"));

    // Its ClusterIP becomes its externalIP: no ClusterIP is left on 10.96.3.1.
    sync(
        &mut engine,
        vec![applied(with_external_ips(
            "one",
            "10.96.3.2",
            &["10.96.3.1"],
        ))],
    );
    assert!(has(&engine, "10.96.3.2"));
    assert!(!has(&engine, "10.96.3.1"), "address entry left behind");
    sync(&mut engine, vec![deleted("one")]);
    assert!(!has(&engine, "10.96.3.2"));

    // `b` has ClusterIP 10.96.3.3; `a`, which sorts first, claims the same
    // frontend as an externalIP and takes it over, then lets it go again.
    sync(
        &mut engine,
        vec![applied(with_external_ips("b", "10.96.3.3", &[]))],
    );
    assert!(has(&engine, "10.96.3.3"));
    sync(
        &mut engine,
        vec![applied(with_external_ips("a", "10.96.3.4", &["10.96.3.3"]))],
    );
    assert!(
        !has(&engine, "10.96.3.3"),
        "address entry of a frontend now external"
    );
    sync(&mut engine, vec![deleted("a")]);
    assert!(
        has(&engine, "10.96.3.3"),
        "address entry of the ClusterIP back"
    );
    assert!(!has(&engine, "10.96.3.4"));
    sync(&mut engine, vec![deleted("b")]);
    assert!(!has(&engine, "10.96.3.3"), "address entry left behind");

    // `d` has externalIP 10.96.3.5; `c`, which sorts first, gets it as its
    // ClusterIP and takes the frontend over as a ClusterIP.
    sync(
        &mut engine,
        vec![applied(with_external_ips("d", "10.96.3.6", &["10.96.3.5"]))],
    );
    assert!(!has(&engine, "10.96.3.5"));
    sync(
        &mut engine,
        vec![applied(with_external_ips("c", "10.96.3.5", &[]))],
    );
    assert!(
        has(&engine, "10.96.3.5"),
        "address entry of the new ClusterIP missing"
    );
    sync(&mut engine, vec![deleted("c"), deleted("d")]);
    let left: Vec<ServiceKey> = engine
        .reconciler()
        .maps()
        .services
        .keys()
        .map(Result::unwrap)
        .collect();
    assert!(left.is_empty(), "entries left: {left:?}");
}

/// A Service deleted in the same sync as a change of the node (its zone or
/// addresses, which recomputes every Service) is removed with its entries.
/// (Found by the model fuzz target: the sync recomputed the Services the
/// store still held, so a deleted one stayed in the desired tables and its
/// frontends in the maps.)
#[test]
fn a_service_deleted_while_the_node_changes_leaves_nothing_behind() {
    let _fib = FibNamespace::enter().unwrap();
    let (_dp, mut engine) = engine(support::SIZES, |_| {});
    engine.take(SourceEvent::Resync {
        services: vec![service(1)],
        slices: vec![slice(1, 1)],
        problems: Vec::new(),
    });
    engine.sync().expect("the listing is due");
    assert!(
        engine
            .reconciler()
            .maps()
            .services
            .get(&cluster_ip_key(1), 0)
            .is_ok()
    );
    engine.take(SourceEvent::ServiceDeleted(ObjectKey::new("t", "s1")));
    engine.take(SourceEvent::NodeZone(Some("zone-b".into())));
    engine.sync().expect("a sync is due");
    let left: Vec<ServiceKey> = engine
        .reconciler()
        .maps()
        .services
        .keys()
        .map(Result::unwrap)
        .collect();
    assert!(left.is_empty(), "entries left: {left:?}");
    assert_eq!(engine.desired().len(), 0);
}

/// A LoadBalancer Service `fw` (ClusterIP 10.96.2.1, ingress 203.0.113.1)
/// with these loadBalancerSourceRanges (none: the field left out) and
/// sessionAffinity ClientIP.
fn firewalled(ranges: Option<&[&str]>) -> Service {
    let ranges = ranges
        .map(|r| format!("loadBalancerSourceRanges: [{}]\n  ", r.join(", ")))
        .unwrap_or_default();
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: fw, namespace: t}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.2.1\n  sessionAffinity: ClientIP\n  \
         {ranges}ports: [{{port: 80, targetPort: 8080, nodePort: 30200}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}]}}}}"
    ))
    .unwrap()
}

fn fw_slice(endpoints: &[&str]) -> Slice {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{addresses: [\"{e}\"]}}"))
        .collect();
    let slice: EndpointSlice = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: fw-x, namespace: t, labels: {{kubernetes.io/service-name: fw}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
        eps.join(", ")
    ))
    .unwrap();
    Slice::from(&slice)
}

/// The reconciler keeps `src_ranges4` equal to each port's ranges (written
/// before the frontend that names them, removed after), sweeps an earlier
/// agent's leftovers at adoption, and removes the affinity entries of a
/// backend that leaves its port.
#[test]
fn source_ranges_and_affinities_follow_their_ports() {
    let _fib = FibNamespace::enter().unwrap();
    // An earlier agent's range, under an id nobody will own.
    let (_dp, mut engine) = engine(support::SIZES, |maps| {
        maps.add_source_range(15, ("192.0.2.0".parse().unwrap(), 24))
            .unwrap();
    });
    let ranges = |engine: &Engine| -> Vec<String> {
        let mut r: Vec<String> = engine
            .reconciler()
            .maps()
            .source_ranges()
            .unwrap()
            .into_iter()
            .map(|(id, (a, l))| format!("{id} {a}/{l}"))
            .collect();
        r.sort();
        r
    };
    engine.take(SourceEvent::Resync {
        services: vec![firewalled(Some(&["198.51.100.0/24", "10.1.2.3/8"]))],
        slices: vec![fw_slice(&["10.244.9.1", "10.244.9.2"])],
        problems: Vec::new(),
    });
    engine.sync().expect("the listing");
    let id = *engine
        .reconciler()
        .id_names()
        .snapshot()
        .services
        .keys()
        .next()
        .unwrap();
    assert_eq!(
        ranges(&engine),
        [format!("{id} 10.0.0.0/8"), format!("{id} 198.51.100.0/24")],
        "the leftover of id 15 is swept"
    );

    engine.take(SourceEvent::ServiceApplied(Box::new(firewalled(Some(&[
        "198.51.100.0/25",
    ])))));
    engine.sync().expect("a changed Service");
    assert_eq!(ranges(&engine), [format!("{id} 198.51.100.0/25")]);
    engine.take(SourceEvent::ServiceApplied(Box::new(firewalled(None))));
    engine.sync().expect("a changed Service");
    assert!(ranges(&engine).is_empty());

    // Two clients with an affinity, one to each backend; the second backend
    // leaves: its client's entry goes, the other stays.
    let affine = |engine: &Engine, client: [u8; 4], backend: [u8; 4]| {
        let mut key = lb_common::AffinityKey {
            service: id,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        key.client[..4].copy_from_slice(&client);
        let mut value = lb_common::Affinity {
            port: 8080,
            last_ns: 1,
            ..Default::default()
        };
        value.addr[..4].copy_from_slice(&backend);
        engine
            .reconciler()
            .maps_mut()
            .affinity
            .insert(key, value, 0)
            .unwrap();
    };
    affine(&engine, [198, 51, 100, 1], [10, 244, 9, 1]);
    affine(&engine, [198, 51, 100, 2], [10, 244, 9, 2]);
    engine.take(SourceEvent::SliceApplied(Box::new(fw_slice(&[
        "10.244.9.1",
    ]))));
    engine.sync().expect("a changed slice");
    let clients: Vec<[u8; 4]> = engine
        .reconciler()
        .maps()
        .affinity
        .keys()
        .map(|k| k.unwrap().client[..4].try_into().unwrap())
        .collect();
    assert_eq!(clients, [[198, 51, 100, 1]]);
    // The Service gone: all of its affinities go.
    engine.take(SourceEvent::ServiceDeleted(
        lb_agent::cluster::ObjectKey::new("t", "fw"),
    ));
    engine.sync().expect("a deleted Service");
    assert_eq!(engine.reconciler().maps().affinity.keys().count(), 0);
}

/// The value of the sample `key` (a metric's name and its labels) in `text`.
fn sample(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

/// A scrape takes neither the reconciler nor its lock: it reads the
/// datapath's counters through map handles of its own and labels them with
/// the ids' names, which the reconciler keeps as it hands ids out. So it
/// completes while the reconciler is locked (as a whole sync holds it), and
/// still shows what the datapath counted a moment ago, under the right names;
/// the names follow the Services.
#[test]
fn a_scrape_completes_while_the_reconciler_is_locked() {
    let Wired {
        mut dp,
        maps,
        uplink,
        fib: _fib,
        ..
    } = Wired::new();
    let mut engine = Engine::new(
        Reconciler::adopt(maps).unwrap(),
        NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
            zone: None,
        },
    );
    engine.take(SourceEvent::Resync {
        services: vec![service(1)],
        slices: vec![slice(1, 2)],
        problems: Vec::new(),
    });
    engine.sync().expect("the listing");
    let metrics = {
        let r = engine.reconciler();
        Arc::new(Metrics::new(
            r.maps().counter_handles().unwrap(),
            r.id_names(),
            Health::new(Instant::now(), None),
        ))
    };

    // A client behind the router opens a connection to the ClusterIP: XDP
    // sends it to one of the two backends (on node B, behind the uplink).
    let client: SocketAddr = "198.51.100.7:50000".parse().unwrap();
    let vip: SocketAddr = "10.96.1.1:80".parse().unwrap();
    let out = test_run::xdp(dp.xdp().unwrap(), &syn(client, vip), uplink, 1).unwrap();
    assert_eq!(out.ret, XDP_TX);
    let backend = decode(&out.frame).dst_addr();

    let scrape = |metrics: &Arc<Metrics>| {
        let (tx, rx) = mpsc::channel();
        let m = metrics.clone();
        let scraper = thread::spawn(move || tx.send(m.encode().unwrap()).unwrap());
        // The scrape of the agent's server runs on a thread of its own, as
        // here; if it waited for the lock, it would still be waiting.
        let text = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the scrape did not finish while the reconciler was locked");
        scraper.join().unwrap();
        text
    };
    let held = engine.reconciler();
    let text = scrape(&metrics);
    let names = held.id_names().snapshot();
    drop(held);

    let port = names.services.values().next().expect("the port's name");
    let other = names
        .backends
        .values()
        .find(|a| **a != backend)
        .expect("the other backend");
    for (key, value) in [
        (format!("lb_service_packets_total{{service=\"{port}\"}}"), 1),
        (
            format!("lb_backend_packets_total{{backend=\"{backend}\"}}"),
            1,
        ),
        (
            format!("lb_backend_packets_total{{backend=\"{other}\"}}"),
            0,
        ),
        (
            "lb_datapath_packets_total{reason=\"tx\",verdict=\"pass\"}".into(),
            1,
        ),
        ("lb_service_ports".into(), 1),
    ] {
        assert_eq!(sample(&text, &key), Some(value), "{key} in:\n{text}");
    }

    // The Service goes: its port and its backends are no longer named.
    engine.take(SourceEvent::ServiceDeleted(ObjectKey::new("t", "s1")));
    engine.sync().expect("a deleted Service");
    let held = engine.reconciler();
    let text = scrape(&metrics);
    drop(held);
    assert_eq!(sample(&text, "lb_service_ports"), Some(0), "{text}");
    assert!(
        !text.contains("lb_service_packets_total{") && !text.contains("lb_backend_packets_total{"),
        "{text}"
    );
}

/// Everything the reconciler writes, read back from the maps.
#[derive(Debug, PartialEq)]
struct Written {
    services: HashMap<ServiceKey, lb_common::Service>,
    backends: Vec<Backend>,
    /// The rows the frontends name, by row.
    rows: BTreeMap<u32, Vec<u32>>,
    filter: Vec<u64>,
    ranges: BTreeSet<(u32, IpAddr, u8)>,
    names: Vec<String>,
}

impl Written {
    fn read(engine: &Engine) -> Self {
        let r = engine.reconciler();
        let maps = r.maps();
        let services: HashMap<_, _> = maps.services.iter().map(Result::unwrap).collect();
        let rows = services
            .values()
            .filter(|s| s.backend_count > 0)
            .map(|s| (s.table, maps.maglev.read_table(s).unwrap()))
            .collect();
        Self {
            services,
            backends: (0..maps.sizes().backends)
                .map(|id| maps.backends.get(&id, 0).unwrap())
                .collect(),
            rows,
            filter: (0..lb_common::hash::ADDR_FILTER_WORDS)
                .map(|i| maps.addr_filter.get(&i, 0).unwrap())
                .collect(),
            ranges: maps
                .source_ranges()
                .unwrap()
                .into_iter()
                .map(|(id, (a, l))| (id, a, l))
                .collect(),
            names: (0..maps.sizes().service_ids)
                .map(|id| maps.service_names.get(&id, 0).unwrap().as_str().to_owned())
                .collect(),
        }
    }
}

/// Writes one Maglev entry behind the reconciler's back, through a handle
/// of its own (as `bpftool map update` would).
fn scribble_on_maglev(maps: &Maps, table: u32, entry: usize, id: u32) {
    let data = MapData::from_id(maps.maglev.map_id().unwrap()).unwrap();
    let mut array: Array<MapData, lb_common::MaglevPair> =
        Array::try_from(Map::Array(data)).unwrap();
    let index = table + (entry / 2) as u32;
    let mut pair = array.get(&index, 0).unwrap();
    // A pair holds two ids; `entry`'s is the first or the second.
    pair.ids[entry % 2] = id;
    array.set(index, pair, 0).unwrap();
}

/// Whatever happens to the maps behind the agent's back (a failed write, a
/// `bpftool map update` or `delete`), the verify pass finds it, puts back
/// what the desired state says, and counts it per map; a second pass finds
/// nothing.
#[test]
fn the_verify_pass_repairs_what_was_changed_by_hand_and_counts_it_per_map() {
    let _fib = FibNamespace::enter().unwrap();
    let (_dp, mut engine) = engine(support::SIZES, |_| {});
    assert!(engine.verify().is_none(), "no pass before the first sync");
    engine.take(SourceEvent::Resync {
        services: vec![
            service(1),
            service(2),
            service(3),
            firewalled(Some(&["192.0.2.0/24"])),
        ],
        slices: vec![
            slice(1, 2),
            slice(2, 2),
            slice(3, 3),
            fw_slice(&["10.244.9.10"]),
        ],
        problems: Vec::new(),
    });
    assert!(engine.sync().unwrap().problems.is_empty());
    assert_eq!(
        engine.verify().unwrap().unwrap(),
        Drift::default(),
        "nothing has drifted yet"
    );
    let before = Written::read(&engine);
    let fw_id = before
        .ranges
        .iter()
        .next()
        .map(|(id, _, _)| *id)
        .expect("fw's source range");
    let filter_bits: u32 = before.filter.iter().map(|w| w.count_ones()).sum();
    assert!(filter_bits > 0);

    {
        let mut r = engine.reconciler();
        let maps = r.maps_mut();
        // services: one frontend gone, one changed, one nobody's.
        maps.remove_service(&cluster_ip_key(1)).unwrap();
        let mut s2 = maps.services.get(&cluster_ip_key(2), 0).unwrap();
        s2.backend_count = 1;
        maps.set_service(&cluster_ip_key(2), &s2).unwrap();
        maps.set_service(&cluster_ip_key(99), &s2).unwrap();
        // backends: a slot in use cleared, a free one made to look used.
        let s3 = maps.services.get(&cluster_ip_key(3), 0).unwrap();
        let row = maps.maglev.read_table(&s3).unwrap();
        maps.clear_backend(row[0]).unwrap();
        let mut stray = maps.backends.get(&row[0], 0).unwrap();
        stray.flags = lb_common::BACKEND_F_ACTIVE;
        maps.set_backend(support::SIZES.backends - 1, &stray)
            .unwrap();
        // maglev: one entry of s3's row.
        scribble_on_maglev(maps, s3.table, 5, support::SIZES.backends - 1);
        // addr_filter: every bit gone (every frontend a black hole).
        for i in 0..lb_common::hash::ADDR_FILTER_WORDS {
            maps.set_filter_word(i, 0).unwrap();
        }
        // src_ranges4: fw's range gone, another in its place.
        maps.remove_source_range(fw_id, ("192.0.2.0".parse().unwrap(), 24))
            .unwrap();
        maps.add_source_range(fw_id, ("198.51.100.0".parse().unwrap(), 24))
            .unwrap();
        // service_names: one renamed.
        maps.set_service_name(s3.id, "vandalised").unwrap();
    }
    assert_ne!(Written::read(&engine), before);

    let drift = engine.verify().unwrap().unwrap();
    assert_eq!(
        drift,
        Drift {
            services: 3,
            backends: 2,
            maglev: 1,
            addr_filter: filter_bits as usize,
            source_ranges: 2,
            service_names: 1,
            // (The agent's own maps, checked beside: not this pass's.)
            ..Drift::default()
        }
    );
    assert_eq!(drift.total(), 9 + filter_bits as usize);
    assert_eq!(Written::read(&engine), before, "every map as it was");
    assert_eq!(engine.verify().unwrap().unwrap(), Drift::default());
}

/// A port refused for lack of room is not forgotten: every later pass tries
/// it again (a retry is a pass of its own when nothing else changes), and the
/// pass that frees room writes it.
#[test]
fn a_port_refused_for_room_is_written_once_room_frees_up() {
    let _fib = FibNamespace::enter().unwrap();
    let sizes = Sizes {
        backends: 4,
        ..support::SIZES
    };
    let (_dp, mut engine) = engine(sizes, |_| {});
    let present = |engine: &Engine, i: usize| {
        engine
            .reconciler()
            .maps()
            .services
            .get(&cluster_ip_key(i), 0)
            .ok()
    };
    engine.take(SourceEvent::Resync {
        services: vec![service(1), service(2)],
        slices: vec![slice(1, 3), slice(2, 3)],
        problems: Vec::new(),
    });
    let first = engine.sync().unwrap();
    assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
    assert!(
        first.problems[0].to_string().contains("backends map"),
        "{}",
        first.problems[0]
    );
    let refused = if present(&engine, 1).is_some() { 2 } else { 1 };
    let kept = 3 - refused;
    assert!(present(&engine, kept).is_some());
    assert!(present(&engine, refused).is_none());
    assert_eq!(engine.reconciler().failed_ports().len(), 1);

    // Nothing changed: no sync is due until a retry is asked for, and the
    // retry still finds no room.
    assert!(!engine.is_due());
    assert!(engine.retry_failed());
    assert!(engine.is_due());
    let retried = engine.sync().unwrap();
    assert_eq!(retried.problems.len(), 1);
    assert!(present(&engine, refused).is_none());

    // The other Service goes: its backends are freed at the end of the pass,
    // and the refused port is written in that same pass.
    let gone = format!("s{kept}");
    engine.take(SourceEvent::ServiceDeleted(ObjectKey::new("t", &gone)));
    engine.take(SourceEvent::SliceDeleted(ObjectKey::new(
        "t",
        format!("{gone}-x"),
    )));
    let freed = engine.sync().unwrap();
    assert!(freed.problems.is_empty(), "{:?}", freed.problems);
    assert!(present(&engine, kept).is_none());
    assert_eq!(present(&engine, refused).unwrap().backend_count, 3);
    assert!(engine.reconciler().failed_ports().is_empty());
    assert!(!engine.retry_failed());
    assert_eq!(engine.verify().unwrap().unwrap(), Drift::default());
}

/// Each port's tables have the size its backends get. A table that outgrows
/// its place moves to a new one (the frontend follows; the old space is free
/// from the next pass on), one that shrinks stays where it is. A port that
/// finds no room keeps what it had and is written by a retry once room has
/// been freed.
#[test]
fn tables_follow_their_backend_count_and_a_full_maglev_map_is_retried() {
    let _fib = FibNamespace::enter().unwrap();
    // 32,768 elements: 16 tables of 4,093 entries (2,047 elements), or 4 of
    // 16,381 (8,191).
    let sizes = Sizes {
        maglev_entries: lb_agent::bpf::MIN_MAGLEV_ENTRIES,
        ..support::SIZES
    };
    let (_dp, mut engine) = engine(sizes, |_| {});
    // Service i's frontend, checked: its table has `size` entries and is the
    // Maglev table of the `n` backends it names.
    let checked_at = |engine: &Engine, i: usize, n: usize, size: u32| -> lb_common::Service {
        let r = engine.reconciler();
        let maps = r.maps();
        let svc = maps.services.get(&cluster_ip_key(i), 0).unwrap();
        assert_eq!(
            (svc.backend_count, svc.table_size),
            (n as u32, size),
            "service {i}"
        );
        let table = maps.maglev.read_table(&svc).unwrap();
        let ids: BTreeSet<u32> = table.iter().copied().collect();
        let entries: Vec<(SocketAddr, u32)> = ids
            .iter()
            .map(|id| {
                let b = maps.backends.get(id, 0).unwrap();
                let ip: [u8; 4] = b.addr[..4].try_into().unwrap();
                (SocketAddr::from((ip, b.port)), *id)
            })
            .collect();
        assert_eq!(entries.len(), n, "service {i}: every backend has entries");
        assert_eq!(
            table,
            maglev::build(&entries, svc.table_size),
            "service {i}"
        );
        svc
    };
    // ... of the size its backends get.
    let checked =
        |engine: &Engine, i: usize, n: usize| checked_at(engine, i, n, maglev::table_size_for(n));
    let used = |engine: &Engine| engine.reconciler().maglev_elements_used();
    let sync = |engine: &mut Engine| {
        let s = engine.sync().expect("a sync is due");
        s.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };

    engine.take(SourceEvent::Resync {
        services: vec![service(1)],
        slices: vec![slice(1, 1)],
        problems: Vec::new(),
    });
    assert!(sync(&mut engine).is_empty());
    let one = checked(&engine, 1, 1);
    assert_eq!(used(&engine), 1, "one backend: one entry");
    // 1 -> 5 -> 9 backends: each a larger size, each a new place.
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 5))));
    assert!(sync(&mut engine).is_empty());
    let five = checked(&engine, 1, 5);
    assert_ne!(five.table, one.table);
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 9))));
    assert!(sync(&mut engine).is_empty());
    let nine = checked(&engine, 1, 9);
    assert!(nine.table != five.table && nine.table != one.table);
    // 9 -> 3: smaller, in place; the rest is given up.
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 3))));
    assert!(sync(&mut engine).is_empty());
    let three = checked(&engine, 1, 3);
    assert_eq!(three.table, nine.table);
    assert_eq!(
        used(&engine),
        2047 + 2049,
        "the shrunk table's tail waits a pass (the tables given up before are free)"
    );

    // Four Services of 20 endpoints (8,191 elements each): three fit in
    // what is left, the fourth finds no room and keeps nothing written.
    for i in 2..=5 {
        engine.take(SourceEvent::ServiceApplied(Box::new(service(i))));
        engine.take(SourceEvent::SliceApplied(Box::new(slice(i, 20))));
    }
    let problems = sync(&mut engine);
    assert_eq!(used(&engine), 2047 + 3 * 8191, "space given up is free now");
    // ... and cleared: the 1-entry and 4,093-entry tables' elements, 0 to 2,047,
    // which no table took again.
    assert_eq!((one.table, five.table), (0, 1));
    let freed = engine.reconciler().maps().maglev.read(0, 2 * 2048).unwrap();
    assert!(freed.iter().all(|e| *e == 0), "space given up is zeroed");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("--maglev-entries"), "{}", problems[0]);
    let placed: Vec<usize> = (2..=5)
        .filter(|i| {
            engine
                .reconciler()
                .maps()
                .services
                .get(&cluster_ip_key(*i), 0)
                .is_ok()
        })
        .collect();
    assert_eq!(placed.len(), 3);
    let refused = (2..=5).find(|i| !placed.contains(i)).unwrap();
    for i in &placed {
        checked(&engine, *i, 20);
    }
    // A port that grows past what is free keeps its table and its size, and
    // serves its new backends in it (and says so).
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 12))));
    let problems = sync(&mut engine);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("stay at 4093 entries")),
        "{problems:?}"
    );
    assert_eq!(checked_at(&engine, 1, 12, 4093).table, three.table);

    // Service 1 shrinks back (in place), and one of the three goes: its
    // space is free from the next pass, which the retry is.
    let gone = placed[0];
    engine.take(SourceEvent::SliceApplied(Box::new(slice(1, 3))));
    engine.take(SourceEvent::ServiceDeleted(ObjectKey::new(
        "t",
        format!("s{gone}"),
    )));
    engine.take(SourceEvent::SliceDeleted(ObjectKey::new(
        "t",
        format!("s{gone}-x"),
    )));
    let problems = sync(&mut engine);
    assert_eq!(
        problems.len(),
        1,
        "not in the pass that freed it: {problems:?}"
    );
    assert_eq!(checked(&engine, 1, 3).table, three.table);
    assert!(engine.retry_failed());
    let problems = sync(&mut engine);
    assert!(problems.is_empty(), "{problems:?}");
    checked(&engine, refused, 20);
    assert!(engine.reconciler().failed_ports().is_empty());
    assert_eq!(engine.verify().unwrap().unwrap(), Drift::default());
}
