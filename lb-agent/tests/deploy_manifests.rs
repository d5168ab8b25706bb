//! The install files under `deploy/`: every Kubernetes manifest parses into its
//! k8s-openapi type with no field lost on the way (so a misspelled or misplaced
//! field fails here, not silently on a cluster), and says what the agent needs:
//! host network, every node, exactly three capabilities and nothing privileged
//! (no escalation, read-only root, the runtime's seccomp and AppArmor
//! profiles), bpffs from the host where AppArmor lets it be written, metrics on
//! loopback, read-only RBAC on exactly three resources, probes on the healthz
//! port (liveness on `/livez`, which no API server outage fails). The opt-in
//! components patch the DaemonSet into what they say. The systemd unit runs
//! `lb-agent run` with the same capabilities and never cleans the datapath up.
//! (That the capabilities suffice, and each is needed, is
//! `tests/capabilities.rs`'s.)

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value as Json;

const NAME: &str = "lb-agent";
const NAMESPACE: &str = "kube-system";
const IMAGE: &str = "ghcr.io/lb-project/lb-agent";
const BPFFS: &str = "/sys/fs/bpf";
const HEALTHZ_PORT: i32 = 10256;
const METRICS_PORT: i32 = 10249;
/// Kubernetes spelling (no `CAP_` prefix).
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
/// Where the agent's container mounts the host's bpffs, and pins in it.
const BPFFS_MOUNT: &str = "/run/lb/bpffs";
const PIN_PATH: &str = "/run/lb/bpffs/lb";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kube_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The manifest files of deploy/kubernetes (every YAML file but the
/// kustomization), sorted by name.
fn manifest_files() -> Vec<PathBuf> {
    let dir = kube_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("reading a directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter(|p| p.file_name().and_then(|n| n.to_str()) != Some("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// One YAML file as JSON, for plain (untyped) checks.
fn yaml_file(path: &Path) -> Json {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    serde_json::to_value(&value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of `text` as JSON; empty documents are skipped.
fn documents(what: &str, text: &str) -> Vec<Json> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, document)| {
            let value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{what}, document {i}: not YAML: {e}"));
            (!value.is_null()).then(|| {
                serde_json::to_value(&value)
                    .unwrap_or_else(|e| panic!("{what}, document {i}: not JSON-like: {e}"))
            })
        })
        .collect()
}

/// Where `written` and `parsed` (the same document after a trip through its
/// type) first differ, if they do.
fn first_difference(written: &Json, parsed: &Json, path: &str) -> Option<String> {
    match (written, parsed) {
        (Json::Object(w), Json::Object(p)) => {
            for (key, w_value) in w {
                let here = format!("{path}.{key}");
                match p.get(key) {
                    None => {
                        return Some(format!(
                            "`{here}` is not a field of the type (misspelled or misplaced?)"
                        ));
                    }
                    Some(p_value) => {
                        if let Some(d) = first_difference(w_value, p_value, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            p.keys()
                .find(|key| !w.contains_key(*key))
                .map(|key| format!("`{path}.{key}` appeared when parsed"))
        }
        (Json::Array(w), Json::Array(p)) if w.len() == p.len() => w
            .iter()
            .zip(p)
            .enumerate()
            .find_map(|(i, (w, p))| first_difference(w, p, &format!("{path}[{i}]"))),
        _ => (written != parsed)
            .then(|| format!("`{path}`: written {written}, reads back as {parsed}")),
    }
}

/// `doc` as a `T`, refusing anything the type does not keep: k8s-openapi
/// ignores unknown fields, so the typed value is serialized again and must be
/// the document it came from.
fn strict<T: DeserializeOwned + Serialize>(doc: &Json) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(doc, &back, "") {
        None => Ok(typed),
        Some(difference) => Err(difference),
    }
}

#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
}

/// Every document of every manifest file, parsed strictly into its type.
fn manifests() -> Manifests {
    fn parse<T: DeserializeOwned + Serialize>(what: &str, doc: &Json, into: &mut Vec<T>) {
        into.push(strict(doc).unwrap_or_else(|e| panic!("{what}: {e}")));
    }
    let mut m = Manifests::default();
    for file in manifest_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (i, doc) in documents(&name, &read(&file)).iter().enumerate() {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            let what = format!("{name}, document {i} ({api_version} {kind})");
            match (api_version, kind) {
                ("apps/v1", "DaemonSet") => parse(&what, doc, &mut m.daemon_sets),
                ("v1", "ServiceAccount") => parse(&what, doc, &mut m.service_accounts),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    parse(&what, doc, &mut m.cluster_roles)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    parse(&what, doc, &mut m.cluster_role_bindings)
                }
                _ => panic!("{what}: unexpected resource in deploy/kubernetes"),
            }
        }
    }
    m
}

fn one<'a, T>(items: &'a [T], kind: &str) -> &'a T {
    assert_eq!(
        items.len(),
        1,
        "expected exactly one {kind} in deploy/kubernetes"
    );
    &items[0]
}

fn daemon_set() -> DaemonSet {
    one(&manifests().daemon_sets, "DaemonSet").clone()
}

/// Applies a JSON patch (RFC 6902) of `add` operations, the only kind the
/// components use, to `doc`.
fn apply_patch(doc: &mut Json, ops: &Json) {
    for op in ops
        .as_array()
        .expect("a JSON patch is a list of operations")
    {
        assert_eq!(
            op["op"], "add",
            "only `add` operations are applied here: {op}"
        );
        let path = op["path"].as_str().expect("an operation's path");
        let (parent, last) = path.rsplit_once('/').expect("a path below the root");
        let mut target = &mut *doc;
        for token in parent.split('/').skip(1) {
            target = match target {
                Json::Object(o) => o.get_mut(token),
                Json::Array(a) => a.get_mut(token.parse::<usize>().expect("an array index")),
                _ => None,
            }
            .unwrap_or_else(|| panic!("{path}: nothing at {token}"));
        }
        let value = op["value"].clone();
        match target {
            Json::Object(o) => {
                o.insert(last.to_string(), value);
            }
            Json::Array(a) if last == "-" => a.push(value),
            Json::Array(a) => a.insert(last.parse().expect("an array index"), value),
            other => panic!("{path}: cannot add into {other}"),
        }
    }
}

/// The component `components/<name>`: its patches of the DaemonSet.
fn component_patches(name: &str) -> Vec<Json> {
    let dir = kube_dir().join("components").join(name);
    let k = yaml_file(&dir.join("kustomization.yaml"));
    assert_eq!(
        k["apiVersion"], "kustomize.config.k8s.io/v1alpha1",
        "{name}"
    );
    assert_eq!(k["kind"], "Component", "{name}");
    let keys: BTreeSet<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["apiVersion", "kind", "patches"]),
        "{name}"
    );
    k["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .map(|p| {
            assert_eq!(
                p["target"],
                serde_json::json!({"group": "apps", "version": "v1", "kind": "DaemonSet", "name": NAME}),
                "{name}: a patch of the lb-agent DaemonSet"
            );
            yaml_file(&dir.join(p["path"].as_str().expect("a patch file")))
        })
        .collect()
}

/// The DaemonSet as `kustomize build` makes it with the component `name`.
fn daemon_set_with(name: &str) -> DaemonSet {
    let file = kube_dir().join("daemonset.yaml");
    let mut doc = documents("daemonset.yaml", &read(&file)).remove(0);
    for patch in component_patches(name) {
        apply_patch(&mut doc, &patch);
    }
    strict(&doc).unwrap_or_else(|e| panic!("the DaemonSet with {name}: {e}"))
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet without a pod template spec")
}

fn agent(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "the agent pod runs one container");
    let c = &pod.containers[0];
    assert_eq!(c.name, NAME);
    c
}

fn strings(items: &Option<Vec<String>>) -> BTreeSet<&str> {
    items.iter().flatten().map(String::as_str).collect()
}

#[test]
fn every_manifest_parses_strictly_and_there_is_one_of_each() {
    let m = manifests();
    one(&m.daemon_sets, "DaemonSet");
    one(&m.service_accounts, "ServiceAccount");
    one(&m.cluster_roles, "ClusterRole");
    one(&m.cluster_role_bindings, "ClusterRoleBinding");
}

#[test]
fn the_strict_parse_catches_a_misspelled_field() {
    let file = kube_dir().join("daemonset.yaml");
    let mut doc = documents("daemonset.yaml", &read(&file)).remove(0);
    strict::<DaemonSet>(&doc).expect("the DaemonSet as written parses");

    let pod = doc["spec"]["template"]["spec"].as_object_mut().unwrap();
    let host_network = pod.remove("hostNetwork").unwrap();
    pod.insert("hostNetwrok".into(), host_network);
    let err = strict::<DaemonSet>(&doc).expect_err("a misspelled field is refused");
    assert!(err.contains("hostNetwrok"), "{err}");

    let mut doc = documents("daemonset.yaml", &read(&file)).remove(0);
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
        Json::String("BPF".into());
    assert!(
        strict::<DaemonSet>(&doc).is_err(),
        "a mistyped field is refused"
    );
}

#[test]
fn daemon_set_runs_on_every_node_in_the_host_network() {
    let ds = daemon_set();
    assert_eq!(ds.metadata.name.as_deref(), Some(NAME));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = &ds.spec;

    let selector = spec
        .selector
        .match_labels
        .as_ref()
        .expect("selector labels");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (key, value) in selector {
        assert_eq!(
            labels.and_then(|l| l.get(key)),
            Some(value),
            "pod label {key}"
        );
    }

    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );

    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    // The node's network namespace cannot reach the cluster DNS by itself.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert!(pod.affinity.is_none(), "no affinity: every node");
    let selector = pod.node_selector.clone().unwrap_or_default();
    assert!(
        selector.is_empty()
            || selector == BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]),
        "node selector narrower than every Linux node: {selector:?}"
    );

    // A toleration with operator Exists and neither key nor effect matches
    // every taint.
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.value.is_none()
                && t.toleration_seconds.is_none()),
        "no toleration matching every taint: {tolerations:?}"
    );
}

#[test]
fn agent_container_runs_the_agent_with_the_node_name() {
    let ds = daemon_set();
    let pod = pod_spec(&ds);
    let c = agent(pod);

    // The image's ENTRYPOINT is the agent; the container only passes args.
    assert!(
        c.command.is_none(),
        "command would replace the image's ENTRYPOINT"
    );
    assert_eq!(
        c.args.as_deref().unwrap_or_default(),
        [
            "run",
            "--node-name=$(NODE_NAME)",
            "--cgroup-path=/run/lb/host-cgroup"
        ]
    );
    // The socket programs go on the host's cgroup hierarchy: --cgroup-path
    // is where the host's /sys/fs/cgroup is mounted (the container's own
    // /sys/fs/cgroup is its private cgroup namespace's).
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/run/lb/host-cgroup")
        .expect("a volume at --cgroup-path");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the volume of --cgroup-path");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    let env = c.env.as_deref().unwrap_or_default();
    // The pins go into the host's bpffs (see `bpffs_comes_from_the_host`),
    // for `run`, `dump` and `cleanup` alike (all read LB_PIN_PATH).
    let pin_path = env
        .iter()
        .find(|e| e.name == "LB_PIN_PATH")
        .expect("env LB_PIN_PATH");
    assert_eq!(pin_path.value.as_deref(), Some(PIN_PATH));
    assert_eq!(Path::new(PIN_PATH).parent(), Some(Path::new(BPFFS_MOUNT)));
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("env NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // Every container runs the one image, so `kustomize edit set image`
    // rewrites them all.
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let image = container.image.as_deref().unwrap_or_default();
        assert!(
            image.starts_with(&format!("{IMAGE}:")),
            "{}: image {image}",
            container.name
        );
    }
}

/// Whether the AppArmor profile containerd and moby apply by default
/// (`deny /sys/[^f]*/** wklx`, `/sys/f[^s]*/**`, `/sys/fs/[^c]*/**`, ...,
/// `deny @{PROC}/* w` and the like) forbids writing at `path`: under /sys
/// everything but /sys/fs/cgroup, and /proc.
fn default_apparmor_denies_writes(path: &str) -> bool {
    (path.starts_with("/sys/") && !path.starts_with("/sys/fs/cgroup/"))
        || path.starts_with("/proc/")
}

#[test]
fn the_apparmor_rule_is_what_the_default_profile_says() {
    for denied in [
        "/sys/fs/bpf",
        "/sys/fs/bpf/lb",
        "/sys/kernel/debug",
        "/proc/sys/net",
    ] {
        assert!(default_apparmor_denies_writes(denied), "{denied}");
    }
    for allowed in [
        BPFFS_MOUNT,
        PIN_PATH,
        "/sys/fs/cgroup/x",
        "/run/lb/host-cgroup",
    ] {
        assert!(!default_apparmor_denies_writes(allowed), "{allowed}");
    }
}

#[test]
fn agent_has_exactly_three_capabilities_and_nothing_privileged() {
    let ds = daemon_set();
    let pod = pod_spec(&ds);
    let c = agent(pod);
    let sc = c.security_context.as_ref().expect("agent securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(strings(&caps.drop), BTreeSet::from(["ALL"]));
    let add = caps.add.as_deref().unwrap_or_default();
    assert_eq!(add.len(), CAPABILITIES.len(), "capabilities added: {add:?}");
    assert_eq!(strings(&caps.add), BTreeSet::from(CAPABILITIES));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    // No profile named: the runtime's default applies where AppArmor is
    // enabled (RuntimeDefault named explicitly would make the kubelet refuse
    // the pod on nodes without AppArmor), and the old annotations say none.
    assert!(sc.app_armor_profile.is_none(), "{:?}", sc.app_armor_profile);
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert!(
        !annotations.keys().any(|k| k.contains("apparmor")),
        "{annotations:?}"
    );
    // Root, as the capabilities need (see the DaemonSet).
    assert!(
        matches!(sc.run_as_user, None | Some(0)),
        "{:?}",
        sc.run_as_user
    );
    assert_ne!(sc.run_as_non_root, Some(true));
    assert!(
        pod.security_context.is_none(),
        "no pod-wide securityContext"
    );
    // Nothing in the pod is privileged.
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = container.security_context.as_ref();
        assert_ne!(
            sc.and_then(|s| s.privileged),
            Some(true),
            "{}",
            container.name
        );
    }

    // What the agent may write: its writable volumes only (the root
    // filesystem is read-only), that is the bpffs one, where AppArmor's
    // default profile allows writes.
    let writable: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(writable, [BPFFS_MOUNT]);
    assert!(!default_apparmor_denies_writes(BPFFS_MOUNT));
}

#[test]
fn bpffs_comes_from_the_host() {
    let ds = daemon_set();
    let pod = pod_spec(&ds);
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let bpffs = volumes
        .iter()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == BPFFS))
        .expect("a hostPath volume for /sys/fs/bpf");
    assert_eq!(
        bpffs.host_path.as_ref().unwrap().type_.as_deref(),
        Some("DirectoryOrCreate")
    );
    assert!(
        !volumes.iter().any(|v| v
            .host_path
            .as_ref()
            .is_some_and(|h| h.path.starts_with("/lib/modules"))),
        "the agent loads no kernel modules"
    );

    let mount_of = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == bpffs.name)
            .cloned()
    };
    let agent_mount = mount_of(agent(pod)).expect("the agent mounts bpffs");
    assert_eq!(agent_mount.mount_path, BPFFS_MOUNT);
    assert_ne!(agent_mount.read_only, Some(true));
    // Sees a bpffs mounted on the host after the container started.
    assert!(
        matches!(
            agent_mount.mount_propagation.as_deref(),
            Some("HostToContainer" | "Bidirectional")
        ),
        "agent bpffs propagation {:?}",
        agent_mount.mount_propagation
    );

    // bpffs on the host is the host's affair (systemd mounts it at boot):
    // nothing in the default pod mounts it, nothing has Bidirectional
    // propagation.
    assert!(pod.init_containers.is_none(), "{:?}", pod.init_containers);
    assert_no_unprivileged_bidirectional(pod);
}

/// Kubernetes refuses Bidirectional propagation in unprivileged containers.
fn assert_no_unprivileged_bidirectional(pod: &PodSpec) {
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for m in c.volume_mounts.iter().flatten() {
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                assert_eq!(
                    c.security_context.as_ref().and_then(|s| s.privileged),
                    Some(true),
                    "{}: Bidirectional propagation needs a privileged container",
                    c.name
                );
            }
        }
    }
}

/// components/mount-bpffs: an init container mounts bpffs on the host (mode
/// 0700) where it is missing, before the agent starts; it alone is privileged,
/// because Bidirectional propagation must be.
#[test]
fn the_mount_bpffs_component_mounts_bpffs_on_the_host_before_the_agent() {
    let ds = daemon_set_with("mount-bpffs");
    let pod = pod_spec(&ds);
    let inits = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "{inits:?}");
    let init = &inits[0];
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == BPFFS))
        .expect("the bpffs volume");
    let mount = init
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == bpffs.name)
        .expect("the init container mounts the bpffs volume");
    assert_eq!(mount.mount_path, BPFFS);
    assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
    let command = init
        .command
        .iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(command.contains("mount -t bpf"), "{command}");
    assert!(command.contains("mode=0700"), "{command}");
    assert!(command.contains(" /sys/fs/bpf"), "{command}");
    assert!(
        init.image
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("{IMAGE}:")),
        "{:?}",
        init.image
    );
    assert_no_unprivileged_bidirectional(pod);
    // The agent itself is as before.
    assert_eq!(agent(pod), agent(pod_spec(&daemon_set())));
}

fn assert_healthz(what: &str, probe: Option<&Probe>, path: &str) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: no HTTP GET probe"));
    assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{what}");
    assert_eq!(get.path.as_deref(), Some(path), "{what}");
    assert!(
        get.host.is_none(),
        "{what}: the probe goes to the node address"
    );
    assert!(
        matches!(get.scheme.as_deref(), None | Some("HTTP")),
        "{what}"
    );
}

#[test]
fn probes_metrics_and_resources() {
    let ds = daemon_set();
    let c = agent(pod_spec(&ds));
    assert_healthz("readinessProbe", c.readiness_probe.as_ref(), "/readyz");
    // Not /healthz or /readyz: an API server outage must not restart the agent.
    assert_healthz("livenessProbe", c.liveness_probe.as_ref(), "/livez");

    let ports: BTreeSet<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, BTreeSet::from([HEALTHZ_PORT, METRICS_PORT]));

    // Metrics stay on loopback (the agent's default): no --metrics-addr, and
    // no scrape annotation, which would send a Prometheus to a closed port.
    let args = c.args.as_deref().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a.starts_with("--metrics-addr")),
        "{args:?}"
    );
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert!(
        !annotations.keys().any(|k| k.starts_with("prometheus.io/")),
        "{annotations:?}"
    );

    let resources = c.resources.as_ref().expect("resources");
    let q = |s: &str| Quantity(s.into());
    assert_eq!(
        resources.requests,
        Some(BTreeMap::from([
            ("cpu".into(), q("100m")),
            ("memory".into(), q("64Mi"))
        ]))
    );
    assert_eq!(
        resources.limits,
        Some(BTreeMap::from([("memory".into(), q("256Mi"))]))
    );
}

/// components/metrics-on-node-address: metrics on every address, and the
/// scrape annotations for their port.
#[test]
fn the_metrics_component_opens_the_metrics_port_and_announces_it() {
    let ds = daemon_set_with("metrics-on-node-address");
    let c = agent(pod_spec(&ds));
    let args = c.args.as_deref().unwrap_or_default();
    let metrics: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--metrics-addr"))
        .collect();
    assert_eq!(metrics, [&format!("--metrics-addr=0.0.0.0:{METRICS_PORT}")]);
    assert_eq!(
        &args[..args.len() - 1],
        agent(pod_spec(&daemon_set())).args.as_deref().unwrap(),
        "the rest of the args as before"
    );
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations,
        BTreeMap::from([
            ("prometheus.io/scrape".into(), "true".into()),
            ("prometheus.io/port".into(), METRICS_PORT.to_string()),
            ("prometheus.io/path".into(), "/metrics".into()),
        ])
    );
}

#[test]
fn cluster_role_only_reads_services_nodes_and_endpointslices() {
    let m = manifests();
    let role = one(&m.cluster_roles, "ClusterRole");
    assert_eq!(role.metadata.name.as_deref(), Some(NAME));
    assert!(role.aggregation_rule.is_none());

    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "{rule:?}");
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group, resource, verb));
        }
    }
    assert_eq!(granted, expected);
}

#[test]
fn binding_gives_the_role_to_the_agent_service_account() {
    let m = manifests();
    let account = one(&m.service_accounts, "ServiceAccount");
    let role = one(&m.cluster_roles, "ClusterRole");
    let binding = one(&m.cluster_role_bindings, "ClusterRoleBinding");
    let ds = one(&m.daemon_sets, "DaemonSet");

    assert_eq!(account.metadata.name.as_deref(), Some(NAME));
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        pod_spec(ds).service_account_name,
        account.metadata.name,
        "the DaemonSet runs as the bound account"
    );
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);

    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert!(matches!(subject.api_group.as_deref(), None | Some("")));
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
}

#[test]
fn kustomization_lists_every_manifest_and_the_image() {
    let k = yaml_file(&kube_dir().join("kustomization.yaml"));
    let keys: BTreeSet<&str> = k
        .as_object()
        .expect("kustomization is a mapping")
        .keys()
        .map(String::as_str)
        .collect();
    let known = BTreeSet::from([
        "apiVersion",
        "kind",
        "metadata",
        "namespace",
        "namePrefix",
        "nameSuffix",
        "labels",
        "commonLabels",
        "commonAnnotations",
        "resources",
        "components",
        "images",
        "patches",
        "replicas",
        "replacements",
        "configMapGenerator",
        "secretGenerator",
        "generatorOptions",
    ]);
    let unknown: Vec<&&str> = keys.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "unknown kustomization fields: {unknown:?}"
    );
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], NAMESPACE);

    let resources: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource is a path").to_owned())
        .collect();
    for r in &resources {
        assert!(
            kube_dir().join(r).is_file(),
            "resource {r} is not in deploy/kubernetes"
        );
    }
    let on_disk: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(resources, on_disk, "every manifest is a resource and back");
    assert!(resources.contains("rbac.yaml") && resources.contains("daemonset.yaml"));

    let images = k["images"].as_array().expect("images");
    assert!(
        images.iter().any(|i| i["name"] == IMAGE),
        "no images entry for {IMAGE}"
    );
    for image in images {
        let fields: BTreeSet<&str> = image
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            fields.is_subset(&BTreeSet::from(["name", "newName", "newTag", "digest"])),
            "{image}"
        );
    }
}

/// The `[Section] Key=value` lines of a systemd unit, continuation lines
/// joined, comments dropped.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
        } else {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
    }
    entries
}

#[test]
fn systemd_unit_runs_the_agent_and_never_cleans_up() {
    let entries = unit_entries(&read(&deploy_dir().join("systemd/lb-agent.service")));
    let all = |section: &str, key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let single = |section: &str, key: &str| -> &str {
        match all(section, key)[..] {
            [value] => value,
            ref values => panic!("[{section}] {key}: expected one value, found {values:?}"),
        }
    };

    let exec_start = single("Service", "ExecStart");
    assert!(
        exec_start.starts_with("/usr/local/bin/lb-agent run "),
        "{exec_start}"
    );
    assert!(
        exec_start.contains("--manifests /etc/lb/manifests"),
        "{exec_start}"
    );
    assert!(exec_start.contains("$LB_AGENT_ARGS"), "{exec_start}");
    assert_eq!(
        single("Service", "EnvironmentFile"),
        "-/etc/default/lb-agent"
    );
    // The datapath keeps serving across restarts: nothing the unit runs removes it.
    for (section, key, value) in &entries {
        if key.starts_with("Exec") {
            assert!(!value.contains("cleanup"), "[{section}] {key}={value}");
        }
    }
    assert_eq!(single("Service", "Restart"), "on-failure");
    assert!(
        single("Unit", "After")
            .split_whitespace()
            .any(|u| u == "network-online.target")
    );

    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: Vec<String> = single("Service", key)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(caps.len(), expected.len(), "{key}: {caps:?}");
        assert_eq!(caps.into_iter().collect::<BTreeSet<_>>(), expected, "{key}");
    }
    assert_eq!(single("Service", "NoNewPrivileges"), "yes");
    assert_eq!(single("Service", "LimitMEMLOCK"), "infinity");
    assert_eq!(single("Service", "ProtectSystem"), "strict");
    // bpffs as systemd mounts it, if the host has none.
    let pre = single("Service", "ExecStartPre");
    assert!(
        pre.starts_with('+') && pre.contains("mount -t bpf") && pre.contains("mode=0700"),
        "{pre}"
    );
    assert!(
        all("Service", "ReadWritePaths")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .any(|p| p.trim_start_matches('-') == BPFFS)
    );
    assert_eq!(single("Install", "WantedBy"), "multi-user.target");
}

#[test]
fn dockerfile_image_runs_the_agent() {
    let text = read(&deploy_dir().join("Dockerfile"));
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        from,
        [
            "FROM rust:1.95-bookworm AS builder",
            "FROM debian:bookworm-slim"
        ]
    );
    assert!(
        text.contains("cargo build --release"),
        "builds the release binary"
    );
    assert!(text.contains("-p lb-agent"));
    assert!(text.contains("COPY --from=builder /src/target/release/lb-agent /usr/local/bin/"));
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/lb-agent"]"#));
    // Cargo refuses a workspace whose members are missing: the image copies them all.
    let root = read(&deploy_dir().join("../Cargo.toml"));
    let members = root
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = "))
        .expect("workspace members");
    for member in members.trim_matches(['[', ']']).split(',') {
        let member = member.trim().trim_matches('"');
        assert!(
            text.contains(&format!("COPY {member} {member}\n")),
            "the Dockerfile does not copy workspace member {member}"
        );
    }
}

/// Every component under deploy/kubernetes/components is one the tests
/// above apply and check.
#[test]
fn every_component_is_checked() {
    let dir = kube_dir().join("components");
    let found: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        found,
        BTreeSet::from(["metrics-on-node-address".into(), "mount-bpffs".into()])
    );
    let k = read(&kube_dir().join("kustomization.yaml"));
    for name in &found {
        assert!(
            k.contains(&format!("components/{name}")),
            "kustomization.yaml does not say how to enable {name}"
        );
    }
}
