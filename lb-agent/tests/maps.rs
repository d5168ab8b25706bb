//! The typed map writers and the sync engine against real (unpinned) maps.

mod support;

use std::{collections::BTreeSet, net::SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    bpf::{Datapath, LoadOptions, Maps, Sizes},
    cluster::NodeInfo,
    maglev,
    model::{Frontend, Proto, Slice},
    reconcile::{Reconciler, encoding::service_key},
    source::SourceEvent,
    sync::Engine,
};
use lb_common::ServiceKey;
use lb_testbed::fib::FibNamespace;
use support::{Lab, SIZES};

/// Row `r`'s test pattern: non-zero ids no other row has.
fn pattern(r: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| (r * 100_000 + i + 1) as u32).collect()
}

#[test]
fn maglev_rows_read_back_what_was_written_at_every_row() {
    let mut lab = Lab::new();
    let maglev = &mut lab.maps.maglev;
    let (rows, len) = (maglev.rows(), maglev.table_size());
    assert_eq!(rows, SIZES.service_ids as usize);
    // Rows of 251 ids (1008 bytes with the pair padding) straddle page
    // boundaries: each write maps just the pages of its row.
    for r in 0..rows {
        assert_eq!(maglev.write_row(r as u32, &pattern(r, len)).unwrap(), len);
    }
    // Written all, then read all: no row overlaps another.
    for r in 0..rows {
        assert_eq!(
            maglev.read_row(r as u32).unwrap(),
            pattern(r, len),
            "row {r}"
        );
    }
    // Only changed entries are stored (and counted).
    let mut t = pattern(3, len);
    t[len - 1] = 7;
    assert_eq!(maglev.write_row(3, &t).unwrap(), 1);
    assert_eq!(maglev.read_row(3).unwrap(), t);
    assert_eq!(maglev.read_row(4).unwrap(), pattern(4, len));
    // Out of range and wrong lengths are errors, not writes elsewhere.
    assert!(maglev.write_row(rows as u32, &t).is_err());
    assert!(maglev.read_row(rows as u32).is_err());
    assert!(maglev.write_row(0, &t[..len - 1]).is_err());
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
        maglev_table_size: 1021,
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
        let row = maps.maglev.read_row(svc.table).unwrap();
        let ids: BTreeSet<u32> = row.iter().copied().collect();
        assert_eq!(ids.len(), endpoints(i), "service {i}");
        let entries: Vec<(SocketAddr, u32)> = ids
            .iter()
            .map(|id| {
                let b = maps.backends.get(id, 0).unwrap();
                let ip: [u8; 4] = b.addr[..4].try_into().unwrap();
                (SocketAddr::from((ip, b.port)), *id)
            })
            .collect();
        assert_eq!(
            row,
            maglev::build(&entries, sizes.maglev_table_size),
            "service {i}"
        );
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
    let id = engine
        .reconciler()
        .service_ids()
        .next()
        .map(|(_, id)| id)
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
