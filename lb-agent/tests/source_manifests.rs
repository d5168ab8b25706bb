//! The manifest source: what `load_dir` reads and reports (with file and line),
//! and how `watch` follows a directory.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Service;
use lb_agent::{
    cluster::{ObjectKey, Problem, ProblemKind},
    model::Prefix,
    source::{
        SourceEvent,
        manifests::{Loaded, load_dir, watch},
    },
};
use tokio::{sync::mpsc, time::timeout};

/// How soon `watch` must report a change.
const WITHIN: Duration = Duration::from_secs(1);

fn svc(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {ip}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
"
    )
}

fn slice(name: &str, service: &str, ip: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
endpoints:
- addresses: [{ip}]
  conditions: {{ready: true}}
ports:
- name: http
  port: 8080
  protocol: TCP
"
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// The 1-based line of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
        + 1
}

fn loc(dir: &Path, file: &str, line: usize) -> Option<String> {
    Some(format!("{}:{line}", dir.join(file).display()))
}

fn names(l: &Loaded) -> (Vec<String>, Vec<String>) {
    (
        l.services
            .iter()
            .map(|s| ObjectKey::of(&s.metadata).to_string())
            .collect(),
        l.slices.iter().map(|s| s.key.to_string()).collect(),
    )
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn cluster_ip(s: &Service) -> &str {
    s.spec.as_ref().unwrap().cluster_ip.as_deref().unwrap()
}

/// The only problem of `kind`.
fn only(l: &Loaded, kind: ProblemKind) -> &Problem {
    let found: Vec<&Problem> = l.problems.iter().filter(|p| p.kind == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind:?} problem in {:#?}",
        l.problems
    );
    found[0]
}

#[test]
fn multi_document_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "# services and their slices\n---\n{}---\n{}---\n# nothing here\n---\n{}...\n{}",
        svc("web", "10.96.0.10"),
        slice("web-1", "web", "10.244.0.5"),
        svc("db", "10.96.0.11").replace("metadata:\n", "metadata:\n  namespace: data\n"),
        slice("db-1", "db", "10.244.0.6").replace("metadata:\n", "metadata:\n  namespace: data\n"),
    );
    write(dir.path(), "all.yaml", &text);
    let l = load_dir(dir.path());
    assert!(l.problems.is_empty(), "{:#?}", l.problems);
    assert_eq!(
        names(&l),
        (
            strs(&["default/web", "data/db"]),
            strs(&["default/web-1", "data/db-1"])
        )
    );
    // The namespace defaults to "default" in the object itself.
    assert_eq!(l.services[0].metadata.namespace.as_deref(), Some("default"));
    assert_eq!(cluster_ip(&l.services[1]), "10.96.0.11");
    let port = &l.services[0].spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!((port.port, port.protocol.as_deref()), (80, Some("TCP")));
    assert_eq!(
        l.slices[0].endpoints[0].address,
        lb_agent::model::Address::Ip("10.244.0.5".parse().unwrap())
    );
}

#[test]
fn json_files_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.json",
        r#"{
  "apiVersion": "v1",
  "kind": "Service",
  "metadata": {"name": "api", "namespace": "prod"},
  "spec": {"clusterIP": "10.96.1.1", "clusterIPs": ["10.96.1.1"], "ports": [{"port": 443, "targetPort": "https"}]}
}"#,
    );
    // kubectl get -o json: kind List, items with their kinds.
    write(
        dir.path(),
        "b.json",
        r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "api-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "api"}},
   "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.1"]}]}
]}"#,
    );
    // kubectl get -o yaml
    write(
        dir.path(),
        "c.yaml",
        &format!(
            "apiVersion: v1\nkind: List\nitems:\n{}",
            [svc("one", "10.96.2.1"), svc("two", "10.96.2.2")]
                .iter()
                .map(|s| {
                    let mut lines = s.lines();
                    let first = format!("- {}\n", lines.next().unwrap());
                    first + &lines.map(|l| format!("  {l}\n")).collect::<String>()
                })
                .collect::<String>()
        ),
    );
    // As the API serves a list: items without kind or apiVersion.
    write(
        dir.path(),
        "d.yaml",
        "apiVersion: v1\nkind: ServiceList\nmetadata: {resourceVersion: \"7\"}\nitems:\n\
         - metadata: {name: three}\n  spec: {clusterIP: 10.96.2.3, ports: [{port: 53, protocol: UDP}]}\n",
    );
    let l = load_dir(dir.path());
    assert!(l.problems.is_empty(), "{:#?}", l.problems);
    assert_eq!(
        names(&l),
        (
            strs(&["prod/api", "default/one", "default/two", "default/three"]),
            strs(&["prod/api-1"])
        )
    );
    assert_eq!(cluster_ip(&l.services[3]), "10.96.2.3");
}

#[test]
fn unparsable_document_is_skipped_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    let broken = "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  clusterIP: 10.96.0.2: oops\n";
    let text = format!(
        "{}---\n{broken}---\n{}",
        svc("first", "10.96.0.1"),
        svc("third", "10.96.0.3")
    );
    write(dir.path(), "a.yaml", &text);
    write(dir.path(), "b.yaml", &svc("other", "10.96.0.4"));
    let l = load_dir(dir.path());
    assert_eq!(
        names(&l).0,
        strs(&["default/first", "default/third", "default/other"])
    );
    let p = only(&l, ProblemKind::Parse);
    assert_eq!(
        p.location,
        loc(dir.path(), "a.yaml", line_of(&text, "10.96.0.2: oops"))
    );
    assert_eq!(l.problems.len(), 1);

    // A value of the wrong type: the line of the value, and the object's key.
    let text = format!(
        "{}---\n{}",
        svc("ok", "10.96.0.5"),
        svc("bad", "10.96.0.6").replace("port: 80", "port: eighty")
    );
    write(dir.path(), "a.yaml", &text);
    let l = load_dir(dir.path());
    assert_eq!(names(&l).0, strs(&["default/ok", "default/other"]));
    let p = only(&l, ProblemKind::Parse);
    assert_eq!(
        p.location,
        loc(dir.path(), "a.yaml", line_of(&text, "port: eighty"))
    );
    assert_eq!(p.object, Some(ObjectKey::new("default", "bad")));

    // Invalid JSON.
    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    write(
        dir.path(),
        "c.json",
        "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\"\n  \"metadata\": {}\n}\n",
    );
    let l = load_dir(dir.path());
    assert_eq!(names(&l).0, strs(&["default/other"]));
    let p = only(&l, ProblemKind::Parse);
    assert_eq!(p.location, loc(dir.path(), "c.json", 4));
}

#[test]
fn nodes_give_this_nodes_zone_and_the_cluster_cidrs() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str, zone: &str, cidrs: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n\
             spec:\n  podCIDRs: [{cidrs}]\nstatus:\n  addresses: [{{type: InternalIP, address: 192.0.2.9}}]\n"
        )
    };
    let text = format!(
        "{}---\n{}---\n{}",
        node("node-a", "z1", "10.244.1.0/24, 'fd00:244:1::/64'"),
        node("node-b", "z2", "10.244.2.0/24, 10.244.2.0/24"),
        node("node-c", "z2", "10.244.3.0/24, 10.244.300.0/24"),
    );
    write(dir.path(), "nodes.yaml", &text);
    let l = load_dir(dir.path());
    // The CIDR that does not parse is reported where it is.
    let bad = only(&l, ProblemKind::BadAddress);
    assert!(bad.message.contains("10.244.300.0/24"), "{}", bad.message);
    assert_eq!(
        bad.location,
        loc(dir.path(), "nodes.yaml", line_of(&text, "name: node-c") - 3)
    );
    // The node's facts before the Resync, so the first sync has them.
    let events = l.clone().into_events("node-a");
    assert!(
        matches!(&events[0], SourceEvent::NodeZone(Some(z)) if z == "z1"),
        "{:?}",
        events[0]
    );
    let want: Vec<Prefix> = [
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
        "fd00:244:1::/64",
    ]
    .iter()
    .map(|c| Prefix::parse(c).unwrap())
    .collect();
    assert!(
        matches!(&events[1], SourceEvent::ClusterCidrs(c) if *c == want),
        "{:?}",
        events[1]
    );
    assert!(matches!(&events[2], SourceEvent::Resync { .. }));
    // Another node's name: its zone; one without a manifest: none.
    assert!(
        matches!(&l.clone().into_events("node-b")[0], SourceEvent::NodeZone(Some(z)) if z == "z2")
    );
    assert!(matches!(
        &l.into_events("node-x")[0],
        SourceEvent::NodeZone(None)
    ));
}

#[test]
fn other_kinds_are_skipped_but_empty_documents_are_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "---\n---\n# just a comment\n---\n{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata: {{a: b}}\n\
         ---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: old\n",
        svc("web", "10.96.0.10")
    );
    write(dir.path(), "mixed.yaml", &text);
    let l = load_dir(dir.path());
    assert_eq!(names(&l).0, strs(&["default/web"]));
    let unsupported: Vec<&Problem> = l
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::UnsupportedKind)
        .collect();
    assert_eq!(l.problems.len(), 2, "{:#?}", l.problems);
    assert_eq!(unsupported.len(), 2);
    assert_eq!(
        unsupported[0].object,
        Some(ObjectKey::new("default", "settings"))
    );
    assert_eq!(
        unsupported[0].location,
        loc(
            dir.path(),
            "mixed.yaml",
            line_of(&text, "kind: ConfigMap") - 1
        )
    );
    assert!(
        unsupported[0].message.contains("ConfigMap"),
        "{}",
        unsupported[0].message
    );
    assert_eq!(
        unsupported[1].object,
        Some(ObjectKey::new("default", "old"))
    );
    assert_eq!(
        unsupported[1].location,
        loc(dir.path(), "mixed.yaml", line_of(&text, "v1beta1"))
    );
}

#[test]
fn services_without_cluster_ip() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\n{}---\n{}---\n{}",
        svc("web", "10.96.0.10"),
        svc("noip", "X").replace("  clusterIP: X\n", ""),
        svc("headless", "None"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ext\nspec:\n  type: ExternalName\n  externalName: example.com\n",
    );
    write(dir.path(), "svc.yaml", &text);
    // clusterIPs alone is enough.
    write(
        dir.path(),
        "v6.yaml",
        &svc("v6", "X").replace(
            "  clusterIP: X\n",
            "  clusterIPs: [\"fd00::10\"]\n  ipFamilies: [IPv6]\n",
        ),
    );
    let l = load_dir(dir.path());
    assert_eq!(
        names(&l).0,
        strs(&[
            "default/web",
            "default/headless",
            "default/ext",
            "default/v6"
        ])
    );
    let p = only(&l, ProblemKind::MissingClusterIp);
    assert_eq!(l.problems.len(), 1, "{:#?}", l.problems);
    assert_eq!(p.object, Some(ObjectKey::new("default", "noip")));
    let file = dir.path().join("svc.yaml");
    // The document starts on the line after the second "---".
    let doc_line = line_of(&text, "name: noip") - 3;
    assert_eq!(p.location, Some(format!("{}:{doc_line}", file.display())));
    assert!(
        p.message.contains(&file.display().to_string()),
        "{}",
        p.message
    );
}

#[test]
fn node_ports_are_required_and_ports_checked() {
    let dir = tempfile::tempdir().unwrap();
    let np = |name: &str, ports: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {}\n  clusterIP: 10.96.3.1\n{extra}  ports:\n{ports}",
            if name.starts_with("lb") {
                "LoadBalancer"
            } else {
                "NodePort"
            }
        )
    };
    let good = np("np-good", "  - port: 80\n    nodePort: 30080\n", "");
    let missing = np(
        "np-missing",
        "  - port: 80\n    nodePort: 30080\n  - name: dns\n    port: 53\n    protocol: UDP\n",
        "",
    );
    let lb_missing = np("lb-missing", "  - port: 443\n", "");
    let lb_no_alloc = np(
        "lb-noalloc",
        "  - port: 443\n",
        "  allocateLoadBalancerNodePorts: false\n",
    );
    let bad_port = svc("bigport", "10.96.3.2").replace("port: 80", "port: 70000");
    let bad_node_port = np("np-zero", "  - port: 80\n    nodePort: 0\n", "");
    write(dir.path(), "a.yaml", &[good, missing].join("---\n"));
    write(dir.path(), "b.yaml", &lb_missing);
    write(dir.path(), "c.yaml", &lb_no_alloc);
    write(
        dir.path(),
        "d.yaml",
        &format!("{bad_port}---\n{bad_node_port}"),
    );
    let l = load_dir(dir.path());
    assert_eq!(
        names(&l).0,
        strs(&["default/np-good", "default/lb-noalloc"])
    );
    assert_eq!(l.problems.len(), 4, "{:#?}", l.problems);

    let missing: Vec<&Problem> = l
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::MissingNodePort)
        .collect();
    assert_eq!(missing.len(), 2);
    assert_eq!(
        missing[0].object,
        Some(ObjectKey::new("default", "np-missing"))
    );
    assert_eq!(missing[0].location, loc(dir.path(), "a.yaml", 12));
    assert!(missing[0].message.contains("dns"), "{}", missing[0].message);
    assert_eq!(
        missing[1].object,
        Some(ObjectKey::new("default", "lb-missing"))
    );
    assert_eq!(missing[1].location, loc(dir.path(), "b.yaml", 1));

    let bad: Vec<&Problem> = l
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::BadPort)
        .collect();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].object, Some(ObjectKey::new("default", "bigport")));
    assert_eq!(bad[0].location, loc(dir.path(), "d.yaml", 1));
    assert!(bad[0].message.contains("70000"), "{}", bad[0].message);
    assert_eq!(bad[1].object, Some(ObjectKey::new("default", "np-zero")));
    assert_eq!(bad[1].location, loc(dir.path(), "d.yaml", 13));
    assert!(bad[1].message.contains("nodePort 0"), "{}", bad[1].message);
}

#[test]
fn slices_need_their_service_label() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\n{}",
        slice("good-1", "good", "10.244.0.1"),
        slice("orphan-1", "X", "10.244.0.2")
            .replace("  labels:\n    kubernetes.io/service-name: X\n", "")
    );
    write(dir.path(), "slices.yaml", &text);
    let l = load_dir(dir.path());
    assert_eq!(names(&l).1, strs(&["default/good-1"]));
    let p = only(&l, ProblemKind::Parse);
    assert_eq!(p.object, Some(ObjectKey::new("default", "orphan-1")));
    assert_eq!(
        p.location,
        loc(
            dir.path(),
            "slices.yaml",
            line_of(&text, "name: orphan-1") - 3
        )
    );
    assert!(
        p.message.contains("kubernetes.io/service-name"),
        "{}",
        p.message
    );
}

#[test]
fn duplicates_first_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "b.yaml",
        &format!(
            "{}---\n{}",
            svc("web", "10.96.0.2"),
            slice("web-1", "web", "10.244.0.2")
        ),
    );
    write(
        dir.path(),
        "a.yaml",
        &format!(
            "{}---\n{}",
            svc("web", "10.96.0.1"),
            slice("web-1", "web", "10.244.0.1")
        ),
    );
    // The same name in another namespace is another object.
    write(
        dir.path(),
        "c.yaml",
        &svc("web", "10.96.0.3").replace("metadata:\n", "metadata:\n  namespace: other\n"),
    );
    let l = load_dir(dir.path());
    assert_eq!(
        names(&l),
        (
            strs(&["default/web", "other/web"]),
            strs(&["default/web-1"])
        )
    );
    assert_eq!(cluster_ip(&l.services[0]), "10.96.0.1");
    assert_eq!(
        l.slices[0].endpoints[0].address,
        lb_agent::model::Address::Ip("10.244.0.1".parse().unwrap())
    );
    assert_eq!(l.problems.len(), 2, "{:#?}", l.problems);
    assert_eq!(l.problems[0].object, Some(ObjectKey::new("default", "web")));
    assert_eq!(l.problems[0].location, loc(dir.path(), "b.yaml", 1));
    assert!(
        l.problems[0].message.contains("a.yaml:1"),
        "{}",
        l.problems[0].message
    );
    assert_eq!(
        l.problems[1].object,
        Some(ObjectKey::new("default", "web-1"))
    );
    assert_eq!(l.problems[1].location, loc(dir.path(), "b.yaml", 13));
}

#[test]
fn only_manifest_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &svc("web", "10.96.0.1"));
    for junk in [
        ".web.yaml.swp",
        ".hidden.yaml",
        "web.yaml~",
        "#web.yaml#",
        "notes.txt",
        "web.yaml.orig",
    ] {
        write(dir.path(), junk, "this: [is not: valid");
    }
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write(
        &dir.path().join("sub.yaml"),
        "nested.yaml",
        &svc("nested", "10.96.0.2"),
    );
    let l = load_dir(dir.path());
    assert!(l.problems.is_empty(), "{:#?}", l.problems);
    assert_eq!(names(&l).0, strs(&["default/web"]));
}

#[test]
fn missing_directory_is_a_problem_for_load_dir() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nope");
    let l = load_dir(&gone);
    assert!(l.services.is_empty() && l.slices.is_empty());
    assert_eq!(l.problems.len(), 1);
    assert!(
        l.problems[0].message.contains("nope"),
        "{}",
        l.problems[0].message
    );
}

// ---------------------------------------------------------------------------
// watch()
// ---------------------------------------------------------------------------

struct Watching {
    rx: mpsc::Receiver<SourceEvent>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start(dir: &Path) -> Watching {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(watch(dir.to_path_buf(), "node-a".into(), tx));
    Watching { rx, task }
}

type Names = (Vec<String>, Vec<String>, usize);

impl Watching {
    /// The next Resync's service and slice keys and problem count, which must
    /// come within `within`.
    async fn next_within(&mut self, within: Duration) -> SourceEvent {
        timeout(within, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing sent within {within:?}"))
            .expect("watch is running")
    }

    async fn resync_within(&mut self, within: Duration) -> (Names, Vec<Service>) {
        // The Nodes' facts come before every Resync.
        for _ in 0..2 {
            let event = self.next_within(within).await;
            assert!(
                matches!(
                    event,
                    SourceEvent::NodeZone(_) | SourceEvent::ClusterCidrs(_)
                ),
                "expected the node facts first, got {event:?}"
            );
        }
        let event = self.next_within(WITHIN).await;
        let SourceEvent::Resync {
            services,
            slices,
            problems,
        } = event
        else {
            panic!("expected a Resync, got {event:?}");
        };
        let keys = (
            services
                .iter()
                .map(|s| ObjectKey::of(&s.metadata).to_string())
                .collect(),
            slices.iter().map(|s| s.key.to_string()).collect(),
            problems.len(),
        );
        (keys, services)
    }

    async fn resync(&mut self) -> (Names, Vec<Service>) {
        self.resync_within(WITHIN).await
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(event) = timeout(d, self.rx.recv()).await {
            panic!("unexpected {event:?}");
        }
    }
}

#[tokio::test]
async fn watch_follows_writes_edits_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &svc("a", "10.96.0.1"));
    let mut w = start(dir.path());
    assert_eq!(w.resync().await.0, (strs(&["default/a"]), vec![], 0));

    let t = Instant::now();
    write(
        dir.path(),
        "b.yaml",
        &format!(
            "{}---\n{}",
            svc("b", "10.96.0.2"),
            slice("b-1", "b", "10.244.0.2")
        ),
    );
    assert_eq!(
        w.resync().await.0,
        (strs(&["default/a", "default/b"]), strs(&["default/b-1"]), 0)
    );
    assert!(t.elapsed() < WITHIN);

    write(dir.path(), "b.yaml", &svc("b", "10.96.0.22"));
    let (names, services) = w.resync().await;
    assert_eq!(names, (strs(&["default/a", "default/b"]), vec![], 0));
    assert_eq!(cluster_ip(&services[1]), "10.96.0.22");

    fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert_eq!(w.resync().await.0, (strs(&["default/b"]), vec![], 0));

    // A broken file is a Resync with a problem (and without the file's objects).
    write(dir.path(), "b.yaml", "kind: [\n");
    assert_eq!(w.resync().await.0, (vec![], vec![], 1));
    assert!(!w.task.is_finished());
}

#[tokio::test]
async fn watch_sees_editor_style_atomic_renames() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &svc("web", "10.96.0.1"));
    let mut w = start(dir.path());
    let (_, services) = w.resync().await;
    assert_eq!(cluster_ip(&services[0]), "10.96.0.1");

    // Write a temporary file next to it, then rename it over the original.
    write(dir.path(), ".web.yaml.tmp", &svc("web", "10.96.0.2"));
    fs::rename(
        dir.path().join(".web.yaml.tmp"),
        dir.path().join("web.yaml"),
    )
    .unwrap();
    let (names, services) = w.resync().await;
    assert_eq!(names, (strs(&["default/web"]), vec![], 0));
    assert_eq!(cluster_ip(&services[0]), "10.96.0.2");

    // Renamed out of the directory: gone.
    let outside = tempfile::tempdir().unwrap();
    fs::rename(dir.path().join("web.yaml"), outside.path().join("web.yaml")).unwrap();
    assert_eq!(w.resync().await.0, (vec![], vec![], 0));
    // And back in.
    fs::rename(outside.path().join("web.yaml"), dir.path().join("web.yaml")).unwrap();
    assert_eq!(w.resync().await.0, (strs(&["default/web"]), vec![], 0));
}

#[tokio::test]
async fn watch_sends_nothing_when_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let text = svc("web", "10.96.0.1");
    write(dir.path(), "web.yaml", &text);
    let mut w = start(dir.path());
    w.resync().await;

    // Touch, rewrite with the same bytes, and add files that are not read.
    let f = fs::File::options()
        .write(true)
        .open(dir.path().join("web.yaml"))
        .unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    write(dir.path(), "web.yaml", &text);
    write(dir.path(), ".web.yaml.swp", "junk");
    write(dir.path(), "README.md", "# manifests");
    w.nothing_for(Duration::from_millis(1500)).await;

    // But a real change still comes through.
    write(dir.path(), "web.yaml", &svc("web", "10.96.0.9"));
    let (_, services) = w.resync().await;
    assert_eq!(cluster_ip(&services[0]), "10.96.0.9");
}

#[tokio::test]
async fn watch_debounces_bursts() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = start(dir.path());
    assert_eq!(w.resync().await.0, (vec![], vec![], 0));
    for i in 0..20 {
        write(
            dir.path(),
            &format!("s{i:02}.yaml"),
            &svc(&format!("s{i:02}"), &format!("10.96.1.{i}")),
        );
    }
    // Whatever the number of Resyncs, the last one holds all 20, and there are
    // far fewer than 20 of them.
    let mut count = 0;
    loop {
        let (names, _) = w.resync_within(Duration::from_secs(2)).await;
        count += 1;
        if names.0.len() == 20 {
            break;
        }
    }
    assert!(count <= 3, "{count} Resyncs for one burst");
    w.nothing_for(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn watch_needs_the_directory_and_stops_with_the_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = watch(dir.path().join("missing"), "node-a".into(), tx)
        .await
        .expect_err("a missing directory is an error");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("missing") && msg.contains("does not exist"),
        "{msg}"
    );

    let mut w = start(dir.path());
    w.resync().await;
    let Watching { rx, task } = w;
    drop(rx);
    let result = timeout(Duration::from_secs(2), task)
        .await
        .expect("watch returned")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn empty_documents_are_skipped_but_an_empty_list_item_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    // Empty documents (only a comment, nothing between two `---`) are no objects.
    write(
        dir.path(),
        "a.yaml",
        &format!("# nothing here\n---\n---\n{}", svc("one", "10.96.3.1")),
    );
    // A List item that is null is an object that is not there.
    write(
        dir.path(),
        "b.yaml",
        &format!(
            "apiVersion: v1\nkind: List\nitems:\n- null\n{}",
            svc("two", "10.96.3.2")
                .lines()
                .enumerate()
                .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
                .collect::<String>()
        ),
    );
    let l = load_dir(dir.path());
    assert_eq!(names(&l).0, strs(&["default/one", "default/two"]));
    let p = only(&l, ProblemKind::Parse);
    assert!(p.message.contains("not a Kubernetes object"), "{p:?}");
    assert_eq!(p.location, loc(dir.path(), "b.yaml", 1));
    assert_eq!(l.problems.len(), 1, "{:#?}", l.problems);
}
