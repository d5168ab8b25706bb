//! The typed map writers against real (unpinned) maps.

mod support;

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

/// A full sync builds its Maglev tables ahead, on several threads, over backend
/// positions (ids are assigned later, as backends are written): every row must
/// still be the table over its backends' ids.
#[test]
fn rows_written_by_a_full_sync_are_the_maglev_tables_of_their_backends() {
    use std::{collections::BTreeSet, net::SocketAddr};

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use lb_agent::{
        bpf::{Datapath, LoadOptions, Sizes},
        cluster::NodeInfo,
        maglev,
        model::{Desired, Slice},
        reconcile::{Reconciler, Stats},
        source::SourceEvent,
        store::Store,
    };
    use lb_common::{FAMILY_V4, PROTO_TCP, ServiceKey};

    let sizes = Sizes {
        services: 1024,
        service_ids: 64,
        backends: 1024,
        maglev_table_size: 1021,
        conntrack: 4096,
    };
    let _ns = support::Netns::enter();
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: None,
        sizes,
        log_level: None,
    })
    .unwrap();
    let mut reconciler = Reconciler::adopt(dp.take_maps().unwrap()).unwrap();
    // 40 Services (enough to be built on threads) of 3 to 7 endpoints.
    let n = 40;
    let endpoints = |i: usize| 3 + i % 5;
    let services: Vec<Service> = (0..n)
        .map(|i| {
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: s{i}, namespace: t}}\n\
                 spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80, targetPort: 8080}}]}}"
            ))
            .unwrap()
        })
        .collect();
    let slices: Vec<Slice> = (0..n)
        .map(|i| {
            let eps: Vec<String> = (0..endpoints(i))
                .map(|j| format!("{{addresses: [\"10.244.{i}.{}\"]}}", 10 + j))
                .collect();
            let slice: EndpointSlice = serde_yaml_ng::from_str(&format!(
                "metadata: {{name: s{i}-x, namespace: t, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
                eps.join(", ")
            ))
            .unwrap();
            Slice::from(&slice)
        })
        .collect();
    let mut store = Store::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec!["192.0.2.1".parse().unwrap()],
    });
    let dirty = store.apply(SourceEvent::Resync {
        services,
        slices,
        problems: Vec::new(),
    });
    let mut desired = Desired::new();
    let mut changed = BTreeSet::new();
    for k in &dirty.services {
        changed.extend(desired.set_service(k, store.model(k)).ports);
    }
    assert_eq!(changed.len(), n);
    let problems = reconciler.apply(&desired, &changed, &mut Stats::default());
    assert!(problems.is_empty(), "{problems:?}");
    let maps = reconciler.maps();
    for i in 0..n {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 96, 1, i as u8]);
        let key = ServiceKey {
            addr,
            port: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 4],
        };
        let svc = maps.services.get(&key, 0).unwrap();
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
