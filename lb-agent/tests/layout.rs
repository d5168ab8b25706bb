//! Versioned maps (issue 13 item 4) on real pinned maps: the `layout` map,
//! reuse of a pin set of this layout, refusal of what cannot be read as it,
//! migration of the previous release's conntrack (layout 1) and of a new
//! `--conntrack-size`, and the batched walks they copy with. Needs root (BPF,
//! bpffs).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData};
use lb_agent::bpf::{
    Datapath, LoadOptions, Sizes,
    batch::{self, BPF_ANY, BPF_NOEXIST, Entries},
    layout::{Action, Conversion},
};
use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_LOCAL, Backend, CT_F_ACKED, CT_F_FORWARD, CT_F_REPLIED,
    CT_INGRESS_ANY, CT_INGRESS_NETWORK, CT_INGRESS_PODS, CtEntry, FAMILY_V4, FlowKey,
    LAYOUT_VERSION, Layout, PROTO_TCP, PROTO_UDP, SVC_F_ADDRESS, SVC_F_EXTERNAL, SVC_F_LOCAL,
    ServiceKey, map_names, v1, v2,
};
use lb_testbed::{Scope, layout_v1};

const SIZES: Sizes = Sizes {
    services: 1024,
    service_ids: 16,
    backends: 256,
    maglev_entries: lb_agent::bpf::MIN_MAGLEV_ENTRIES,
    conntrack: 8192,
};

/// A scope's pin directory (removed with the scope, even if the test fails).
struct Pins {
    _scope: Scope,
    dir: PathBuf,
}

fn pins() -> Pins {
    let scope = Scope::new().expect("a testbed scope (root)");
    scope.mark_pin_dir().unwrap();
    let dir = scope.pin_dir().join("lb");
    Pins { _scope: scope, dir }
}

fn load(dir: &Path, sizes: Sizes) -> anyhow::Result<Datapath> {
    Datapath::load(&LoadOptions {
        pin_path: Some(dir.to_path_buf()),
        sizes,
        log_level: None,
    })
}

fn pinned_conntrack(dir: &Path) -> HashMap<MapData, FlowKey, CtEntry> {
    let data = MapData::from_pin(dir.join(map_names::CONNTRACK)).unwrap();
    Map::LruHashMap(data).try_into().unwrap()
}

fn pinned_layout(dir: &Path) -> Layout {
    let data = MapData::from_pin(dir.join(map_names::LAYOUT)).unwrap();
    let a: Array<MapData, Layout> = Map::Array(data).try_into().unwrap();
    a.get(&0, 0).unwrap()
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0; 16];
    x[..4].copy_from_slice(&a);
    x
}

fn key(i: u32) -> FlowKey {
    FlowKey {
        src: v4([10, 9, (i >> 8) as u8, i as u8]),
        dst: v4([10, 96, 0, 1]),
        src_port: 40_000 + (i % 1000) as u16,
        dst_port: 80,
        proto: PROTO_UDP,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

fn entry(i: u32) -> CtEntry {
    CtEntry {
        nat_src: key(i).src,
        nat_dst: v4([10, 244, 0, 10]),
        nat_src_port: key(i).src_port,
        nat_dst_port: 8080,
        backend: 1,
        service: 2,
        flags: CT_F_FORWARD | CT_F_REPLIED,
        _pad: 0,
        last_seen_ns: 1_000 + u64::from(i),
        ingress: CT_INGRESS_ANY,
        _pad2: 0,
    }
}

#[test]
fn a_fresh_pin_set_records_its_layout_and_a_second_agent_reuses_every_map() {
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    assert_eq!(dp.plan().unwrap().pinned_version, None);
    assert!(dp.migrating().is_empty());
    let l = pinned_layout(&p.dir);
    assert_eq!(
        (
            l.version,
            l.conntrack_value_size,
            l.conntrack_entries,
            l.migrations
        ),
        (LAYOUT_VERSION, 64, SIZES.conntrack, 0)
    );
    let mut maps = dp.take_maps().unwrap();
    maps.conntrack.insert(key(1), entry(1), 0).unwrap();
    drop((maps, dp));

    let dp = load(&p.dir, SIZES).unwrap();
    let plan = dp.plan().unwrap();
    assert_eq!(plan.pinned_version, Some(LAYOUT_VERSION));
    for m in &plan.maps {
        let want = if m.name == map_names::LAYOUT {
            Action::Replace
        } else {
            Action::Reuse
        };
        assert_eq!(m.action, want, "{}", m.name);
    }
    assert_eq!(
        pinned_conntrack(&p.dir).get(&key(1), 0).unwrap(),
        entry(1),
        "the entry outlived the agent"
    );
    assert_eq!(pinned_layout(&p.dir).since_unix_s, l.since_unix_s);
}

#[test]
fn a_layout_newer_than_this_agents_is_refused() {
    let p = pins();
    drop(load(&p.dir, SIZES).unwrap());
    let data = MapData::from_pin(p.dir.join(map_names::LAYOUT)).unwrap();
    let mut a: Array<MapData, Layout> = Map::Array(data).try_into().unwrap();
    let mut l = a.get(&0, 0).unwrap();
    l.version = LAYOUT_VERSION + 1;
    a.set(0, l, 0).unwrap();
    let e = format!("{:#}", load(&p.dir, SIZES).err().expect("refused"));
    assert!(
        e.contains(&format!("layout version {}", LAYOUT_VERSION + 1)) && e.contains("newer"),
        "{e}"
    );
}

/// Same key and value sizes, same entry count, but another map type: what a
/// check of sizes alone would have taken for the same map.
#[test]
fn a_same_size_map_of_another_type_is_refused_by_name() {
    let p = pins();
    drop(load(&p.dir, SIZES).unwrap());
    let path = p.dir.join(map_names::AFFINITY);
    let info = aya::maps::MapInfo::from_pin(&path).unwrap();
    // A plain hash where this build has an LRU hash.
    let def =
        aya_obj::Map::new_from_params(1, info.key_size(), info.value_size(), info.max_entries(), 0);
    let other = MapData::create(def, "affinity", None).unwrap();
    std::fs::remove_file(&path).unwrap();
    other.pin(&path).unwrap();
    let e = format!("{:#}", load(&p.dir, SIZES).err().expect("refused"));
    assert!(
        e.contains("/affinity:") && e.contains("type 1 (this agent: 9)"),
        "{e}"
    );
    assert!(e.contains("lb-agent cleanup"), "{e}");
}

/// A layout-1 pin set: conntrack of 56-byte values, no layout map. Its
/// entries come over converted, and entries the old programs add between
/// the first copy and the finish come over in the second pass.
#[test]
fn the_previous_releases_conntrack_is_migrated_entry_by_entry() {
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let mut maps = dp.take_maps().unwrap();
    let local = Backend {
        addr: v4([10, 244, 0, 10]),
        port: 8080,
        family: FAMILY_V4,
        flags: BACKEND_F_ACTIVE | BACKEND_F_LOCAL,
        _pad: [0; 4],
    };
    let remote = Backend {
        addr: v4([10, 244, 1, 10]),
        flags: BACKEND_F_ACTIVE,
        ..local
    };
    maps.set_backend(1, &local).unwrap();
    maps.set_backend(2, &remote).unwrap();
    // Backend 3: no backend (it left).
    drop((maps, dp));
    let now = layout_v1::now_ns();
    let mut flows = layout_v1::tcp_flows(
        600,
        ([10, 96, 0, 1], 80),
        (1, [10, 244, 0, 10], 8080),
        7,
        now,
    );
    flows.extend(layout_v1::tcp_flows(
        300,
        ([10, 96, 0, 2], 80),
        (2, [10, 244, 1, 10], 8080),
        8,
        now,
    ));
    let gone = layout_v1::tcp_flows(
        100,
        ([10, 96, 0, 3], 80),
        (3, [10, 244, 2, 10], 8080),
        9,
        now,
    );
    flows.extend(gone.iter().copied());
    let made = layout_v1::make_v1(&p.dir, &flows).unwrap();
    assert_eq!((made.carried, made.added), (0, 2000));
    assert!(!p.dir.join(map_names::LAYOUT).exists());

    let t0 = Instant::now();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let loaded = t0.elapsed();
    let plan = dp.plan().unwrap();
    assert_eq!(plan.pinned_version, Some(1));
    assert_eq!(
        plan.get(map_names::CONNTRACK).unwrap().action,
        Action::Migrate(Conversion::ConntrackV1)
    );
    assert_eq!(
        plan.get(map_names::AFFINITY).unwrap().action,
        Action::Reuse,
        "a map layout 1 had as layout 2 has it is reused"
    );
    assert_eq!(
        plan.get(map_names::FRAGMENTS).unwrap().action,
        Action::Create
    );
    assert_eq!(dp.migrating(), vec![map_names::CONNTRACK]);
    // Until the finish, the pins are the old programs': layout 1's map.
    let pinned = aya::maps::MapInfo::from_pin(p.dir.join(map_names::CONNTRACK)).unwrap();
    assert_eq!(pinned.value_size(), 56);
    // An old program opens a flow meanwhile (into the pinned map).
    let late_key = key(77);
    {
        let data = MapData::from_pin(p.dir.join(map_names::CONNTRACK)).unwrap();
        let mut old: HashMap<MapData, FlowKey, v1::CtEntry> =
            Map::LruHashMap(data).try_into().unwrap();
        old.insert(late_key, layout_v1::to_v1(&entry(77)), 0)
            .unwrap();
    }
    let report = dp
        .finish_migration(&p.dir.join("links"))
        .unwrap()
        .expect("a migration");
    assert_eq!(report.maps.len(), 1);
    let m = &report.maps[0];
    assert_eq!((m.first.read, m.first.stored, m.late), (2000, 2000, 1));

    let ct = pinned_conntrack(&p.dir);
    let mut n = 0;
    for (k, old) in &flows {
        let new = ct.get(k, 0).expect("every entry came over");
        assert_eq!(
            (new.nat_src, new.nat_dst, new.nat_src_port, new.nat_dst_port),
            (old.nat_src, old.nat_dst, old.nat_src_port, old.nat_dst_port)
        );
        assert_eq!((new.backend, new.service), (old.backend, old.service));
        assert_eq!(new.last_seen_ns, old.last_seen_ns);
        assert_eq!(
            new.flags,
            old.flags | CT_F_REPLIED | CT_F_ACKED,
            "TCP flows confirmed"
        );
        let want = if old.flags & CT_F_FORWARD != 0 {
            CT_INGRESS_ANY
        } else {
            match old.backend {
                1 => CT_INGRESS_PODS,
                2 => CT_INGRESS_NETWORK,
                _ => CT_INGRESS_ANY,
            }
        };
        assert_eq!(new.ingress, want, "{k:?}");
        n += 1;
    }
    let late = ct.get(&late_key, 0).expect("the late flow came over");
    assert_eq!(late.flags, entry(77).flags, "UDP: replied, not acked");
    let l = pinned_layout(&p.dir);
    assert_eq!((l.version, l.migrations), (LAYOUT_VERSION, 1));
    println!(
        "layout 1 -> 2: {n} conntrack entries converted and 1 late one, load with copy {loaded:?}, \
         finish {:?}",
        report.took
    );
    // And the next agent reuses it all.
    drop(dp);
    let dp = load(&p.dir, SIZES).unwrap();
    assert!(!dp.plan().unwrap().migrates());
}

/// A layout-2 pin set's `services` (tables as rows of one size, the size in
/// `config`) comes over as layout 3's: each table at its row's first element
/// with the size it had, so the tables already in `maglev` read as they did.
/// A pin set whose `services` was converted already (an upgrade stopped
/// before `layout` was replaced) is not converted again.
#[test]
fn layout_2_services_come_over_with_their_rows_as_tables() {
    const M: u32 = 251;
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let mut maps = dp.take_maps().unwrap();
    let row = |r: u32| r * lb_common::maglev_row_elements(M);
    let t0: Vec<u32> = (0..M).map(|i| 1 + i % 3).collect();
    let t3: Vec<u32> = (0..M).map(|i| 4 + i % 2).collect();
    maps.maglev.write(row(0), &t0).unwrap();
    maps.maglev.write(row(3), &t3).unwrap();
    drop((maps, dp));
    let key = |last: u8, port: u16| ServiceKey {
        addr: v4([10, 96, 0, last]),
        port,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 4],
    };
    let cluster_ip = v2::Service {
        id: 7,
        table: 0,
        backend_count: 3,
        ..v2::Service::default()
    };
    // A Local NodePort: its own row 3 (this node's endpoints), row 0 for
    // clients inside the cluster.
    let node_port = v2::Service {
        id: 7,
        table: 3,
        backend_count: 2,
        flags: SVC_F_EXTERNAL | SVC_F_LOCAL,
        cluster_table: 0,
        cluster_backend_count: 3,
        ..v2::Service::default()
    };
    let address = v2::Service {
        flags: SVC_F_ADDRESS,
        ..v2::Service::default()
    };
    layout_v1::make_v2_services(
        &p.dir,
        &[
            (key(1, 80), cluster_ip),
            (key(2, 30080), node_port),
            (key(1, 0), address),
        ],
        M,
    )
    .unwrap();

    let mut dp = load(&p.dir, SIZES).unwrap();
    let plan = dp.plan().unwrap();
    assert_eq!(plan.pinned_version, Some(2));
    assert_eq!(
        plan.get(map_names::SERVICES).unwrap().action,
        Action::Migrate(Conversion::ServicesV2 { table_size: M })
    );
    assert_eq!(plan.get(map_names::MAGLEV).unwrap().action, Action::Reuse);
    assert_eq!(
        plan.get(map_names::CONNTRACK).unwrap().action,
        Action::Reuse
    );
    dp.finish_migration(&p.dir.join("links"))
        .unwrap()
        .expect("a migration");
    drop(dp);
    let mut dp = load(&p.dir, SIZES).unwrap();
    assert!(!dp.plan().unwrap().migrates(), "{}", dp.plan().unwrap());
    let maps = dp.take_maps().unwrap();
    let a = maps.services.get(&key(1, 80), 0).unwrap();
    assert_eq!((a.id, a.table, a.table_size, a.backend_count), (7, 0, M, 3));
    assert_eq!(maps.maglev.read_table(&a).unwrap(), t0);
    let b = maps.services.get(&key(2, 30080), 0).unwrap();
    assert_eq!((b.table, b.cluster_table, b.table_size), (row(3), 0, M));
    assert_eq!(maps.maglev.read_table(&b).unwrap(), t3);
    assert_eq!(maps.maglev.read(b.cluster_table, M as usize).unwrap(), t0);
    let addr = maps.services.get(&key(1, 0), 0).unwrap();
    assert_eq!(
        (addr.table, addr.table_size, addr.flags),
        (0, 0, SVC_F_ADDRESS)
    );
    drop((maps, dp));

    // `layout` still saying 2 over a converted `services`: its BTF is this
    // build's, so it is taken as layout 3's and reused as it is.
    {
        let data = MapData::from_pin(p.dir.join(map_names::LAYOUT)).unwrap();
        let mut layout: Array<MapData, Layout> = Map::Array(data).try_into().unwrap();
        let mut l = layout.get(&0, 0).unwrap();
        l.version = 2;
        layout.set(0, l, 0).unwrap();
    }
    let mut dp = load(&p.dir, SIZES).unwrap();
    let plan = dp.plan().unwrap();
    assert_eq!(plan.pinned_version, Some(2));
    assert_eq!(
        plan.get(map_names::SERVICES).unwrap().action,
        Action::Reuse,
        "{plan}"
    );
    let maps = dp.take_maps().unwrap();
    assert_eq!(maps.services.get(&key(2, 30080), 0).unwrap().table, row(3));
}

/// `--conntrack-size` down and up again: each a migration that keeps every
/// entry (as many as the smaller map holds), never a refusal.
#[test]
fn a_new_conntrack_size_migrates_the_entries() {
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let mut maps = dp.take_maps().unwrap();
    const N: u32 = 3000;
    for i in 0..N {
        maps.conntrack.insert(key(i), entry(i), 0).unwrap();
    }
    maps.affinity
        .insert(
            lb_common::AffinityKey::default(),
            lb_common::Affinity::default(),
            0,
        )
        .unwrap();
    drop((maps, dp));
    for size in [4096, 16_384, 8192] {
        let mut dp = load(
            &p.dir,
            Sizes {
                conntrack: size,
                ..SIZES
            },
        )
        .unwrap();
        assert_eq!(
            dp.plan().unwrap().get(map_names::CONNTRACK).unwrap().action,
            Action::Migrate(Conversion::Copy),
            "to {size}"
        );
        let report = dp.finish_migration(&p.dir.join("links")).unwrap().unwrap();
        assert_eq!(report.maps[0].first.stored, N as usize);
        let info = aya::maps::MapInfo::from_pin(p.dir.join(map_names::CONNTRACK)).unwrap();
        assert_eq!(info.max_entries(), size);
        let ct = pinned_conntrack(&p.dir);
        for i in 0..N {
            assert_eq!(ct.get(&key(i), 0).unwrap(), entry(i), "entry {i} at {size}");
        }
        assert_eq!(pinned_layout(&p.dir).conntrack_entries, size);
        println!("conntrack resized to {size}: {report}");
    }
    // The affinity entry was never touched (reused all along).
    let data = MapData::from_pin(p.dir.join(map_names::AFFINITY)).unwrap();
    let aff: HashMap<MapData, lb_common::AffinityKey, lb_common::Affinity> =
        Map::LruHashMap(data).try_into().unwrap();
    assert_eq!(aff.keys().count(), 1);
    assert_eq!(pinned_layout(&p.dir).migrations, 3);
}

/// A smaller array that would drop a slot in use is refused; a larger one
/// keeps every slot.
#[test]
fn arrays_resize_by_index_and_never_drop_a_slot_in_use() {
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let mut maps = dp.take_maps().unwrap();
    let b = Backend {
        addr: v4([10, 244, 0, 10]),
        port: 8080,
        family: FAMILY_V4,
        flags: BACKEND_F_ACTIVE,
        _pad: [0; 4],
    };
    maps.set_backend(200, &b).unwrap();
    drop((maps, dp));
    let bigger = Sizes {
        backends: 512,
        ..SIZES
    };
    let mut dp = load(&p.dir, bigger).unwrap();
    dp.finish_migration(&p.dir.join("links")).unwrap().unwrap();
    let maps = dp.take_maps().unwrap();
    assert_eq!(maps.backends.get(&200, 0).unwrap(), b);
    drop((maps, dp));
    let smaller = Sizes {
        backends: 128,
        ..SIZES
    };
    let e = format!("{:#}", load(&p.dir, smaller).err().expect("refused"));
    assert!(e.contains("index 200"), "{e}");
    // Nothing was replaced by the refused start.
    assert_eq!(
        aya::maps::MapInfo::from_pin(p.dir.join(map_names::BACKENDS))
            .unwrap()
            .max_entries(),
        512
    );
}

#[test]
fn batched_walks_read_and_write_what_one_call_per_entry_does() {
    let p = pins();
    let mut dp = load(&p.dir, SIZES).unwrap();
    let mut maps = dp.take_maps().unwrap();
    for i in 0..5000 {
        maps.conntrack.insert(key(i), entry(i), 0).unwrap();
    }
    use std::os::fd::AsFd as _;
    let fd = maps.conntrack.map().fd().as_fd();
    let t0 = Instant::now();
    let all = batch::read_all(fd).unwrap();
    let took = t0.elapsed();
    let mut batched: Vec<(FlowKey, CtEntry)> = all.typed().unwrap();
    let mut one_by_one: Vec<(FlowKey, CtEntry)> =
        maps.conntrack.iter().map(Result::unwrap).collect();
    batched.sort_by_key(|(k, _)| *k);
    one_by_one.sort_by_key(|(k, _)| *k);
    assert_eq!(batched.len(), 5000);
    assert_eq!(batched, one_by_one);
    // NOEXIST keeps what is there, counting it; ANY overwrites.
    let mut changed = entry(4);
    changed.backend = 99;
    let again = Entries::from_typed(&[(key(4), changed), (key(9999), entry(9999))]);
    let w = batch::write_all(fd, &again, BPF_NOEXIST).unwrap();
    assert_eq!((w.stored, w.existed), (1, 1));
    assert_eq!(maps.conntrack.get(&key(4), 0).unwrap(), entry(4));
    let w = batch::write_all(fd, &again, BPF_ANY).unwrap();
    assert_eq!(w.stored, 2);
    assert_eq!(maps.conntrack.get(&key(4), 0).unwrap().backend, 99);
    // An array: every slot, by index.
    let slots: Vec<(u32, Backend)> = batch::read_all(maps.backends.map().fd().as_fd())
        .unwrap()
        .typed()
        .unwrap();
    assert_eq!(slots.len(), SIZES.backends as usize);
    assert!(slots.iter().enumerate().all(|(i, (k, _))| *k == i as u32));
    println!("5000 conntrack entries read in one batched walk in {took:?}");
}
