//! A real Kubernetes control plane for the tests and the demo: etcd,
//! kube-apiserver and kube-controller-manager v1.32 on loopback, started by
//! the workplace's `kube-control-plane/up.sh` in a state directory and on
//! ports of this run's own, and stopped (state removed) when dropped.
//!
//! There is no kubelet and no scheduler: [`ControlPlane::register_nodes`]
//! makes the Node objects of a testbed cluster (addresses, pod CIDRs, zones,
//! Ready, and Lease heartbeats so that the node lifecycle controller never
//! marks them or their pods unready), and [`ControlPlane::run_pod`] makes a
//! Pod on its node and sets its status as a kubelet would, so that the real
//! EndpointSlice controller publishes it.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            Container, ContainerPort, Namespace, Node as KubeNode, Pod as KubePod, PodSpec,
            ServiceAccount, Toleration,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    Cluster, Pod,
    ns::{self, lock},
};

/// The workplace's control-plane scripts, beside the repository (override
/// with `LB_KUBE_CONTROL_PLANE`).
fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LB_KUBE_CONTROL_PLANE") {
        return dir.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/kube-control-plane")
}

/// How long `up.sh` may take: a cold start is about 10 s, the first one on a
/// machine also installs etcd from Debian's packages.
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the nodes' Leases are renewed (the node lifecycle controller
/// waits 40 s before it marks a silent node unknown).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long the kubelet stand-in may take over reading and putting back one
/// Pod's status.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Field manager of every patch the testbed makes.
const MANAGER: &str = "lb-testbed";

/// Ports of one control plane: etcd (client, peer, metrics), API server,
/// controller manager.
#[derive(Debug, Clone, Copy)]
struct Ports {
    etcd: u16,
    api: u16,
    kcm: u16,
}

impl Ports {
    /// Five consecutive ports free on loopback, from a base that differs per
    /// process, so that concurrent runs do not meet.
    fn find() -> Result<Self> {
        let start = 20_000 + (std::process::id() % 1_800) as u16 * 5;
        for i in 0..400u16 {
            let base = 20_000 + (start - 20_000 + i * 5) % 9_000;
            let free =
                (base..base + 5).all(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
            if free {
                return Ok(Self {
                    etcd: base,
                    api: base + 3,
                    kcm: base + 4,
                });
            }
        }
        bail!("no five consecutive free ports on 127.0.0.1 between 20000 and 29000")
    }
}

/// State directories: `<temp>/lb-kube-<owner pid>-<API port>`.
const STATE_PREFIX: &str = "lb-kube-";

/// Stops the control planes of runs that died without stopping theirs, and
/// removes their state (a failed run's, kept for its logs, stays until then).
fn remove_stale(tools: &Path) {
    let dirs = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten();
    for dir in dirs {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STATE_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if ns::pid_alive(pid) {
            continue;
        }
        down(tools, &dir.path());
    }
}

/// Pods by (namespace, Pod name): the testbed pod it runs in and whether
/// it should be Ready. (A Pod's name is its testbed pod's, or another for a
/// replica run in that pod's namespace: see [`ControlPlane::run_pod_as`].)
type PodRegistry = BTreeMap<(String, String), (Pod, bool)>;

/// The registry of Pods and what serializes the writes of their status: the
/// test's and the kubelet stand-in's. Without it the stand-in, acting on what
/// it read of the registry a moment before, could put back a Ready condition
/// the test has just changed.
#[derive(Default)]
struct Pods {
    registry: Mutex<PodRegistry>,
    writes: tokio::sync::Mutex<()>,
}

/// What stands in for the nodes' kubelets, every [`HEARTBEAT`]: renews the
/// nodes' Leases, posts their Ready condition again, and puts back the Ready
/// condition of every Pod whose status says otherwise than the test set (the
/// node lifecycle controller marks pods NotReady when it has not heard from
/// a node for a while, after an API outage for example; a kubelet sets them
/// right again, and so does this).
struct Kubelet {
    client: Client,
    nodes: Vec<crate::Node>,
    pods: Arc<Pods>,
}

impl Kubelet {
    async fn run(self) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let nodes: Api<KubeNode> = Api::all(self.client.clone());
        loop {
            // Errors (an API outage a test makes) are retried at the next beat.
            for node in &self.nodes {
                let name = node.name().to_string();
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: Some(40),
                        renew_time: Some(MicroTime(jiff_now())),
                        ..LeaseSpec::default()
                    }),
                };
                let _ = leases
                    .patch(
                        &name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&lease_object(&lease)),
                    )
                    .await;
                let _ = nodes
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(&node_status(node)),
                    )
                    .await;
            }
            let pods: Vec<_> = lock(&self.pods.registry).keys().cloned().collect();
            for key in pods {
                let (ns, name) = &key;
                let api: Api<KubePod> = Api::namespaced(self.client.clone(), ns);
                let _writing = self.pods.writes.lock().await;
                // What the test wants now (it may have changed it, or removed
                // the Pod, since the list above was taken).
                let Some((pod, ready)) = lock(&self.pods.registry).get(&key).cloned() else {
                    continue;
                };
                // Bounded: the test waits for this to write a status.
                let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                    let Ok(Some(now)) = api.get_opt(name).await else {
                        return;
                    };
                    let is_ready = now
                        .status
                        .and_then(|s| s.conditions)
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    if is_ready != ready {
                        let _ = api
                            .patch_status(
                                name,
                                &PatchParams::default(),
                                &Patch::Merge(&pod_status(&pod, ready)),
                            )
                            .await;
                    }
                })
                .await;
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    }
}

/// A Node's status as its kubelet posts it: its addresses (InternalIP, both
/// families) and Ready.
fn node_status(node: &crate::Node) -> serde_json::Value {
    json!({
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ipv4().to_string()},
                {"type": "InternalIP", "address": node.ipv6().to_string()},
                {"type": "Hostname", "address": node.name()},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "lb-testbed stands in for the kubelet",
                "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339(),
            }],
        },
    })
}

/// A Pod's status as its kubelet posts it: Running, its addresses, Ready or
/// not.
fn pod_status(pod: &Pod, ready: bool) -> serde_json::Value {
    let ready = if ready { "True" } else { "False" };
    json!({
        "status": {
            "phase": "Running",
            "podIP": pod.ipv4().to_string(),
            "podIPs": [{"ip": pod.ipv4().to_string()}, {"ip": pod.ipv6().to_string()}],
            "conditions": [
                {"type": "Ready", "status": ready, "lastTransitionTime": now_rfc3339()},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now_rfc3339()},
            ],
        },
    })
}

/// The processes of a control plane (stopped, and their state removed, when
/// dropped).
struct Processes {
    tools: PathBuf,
    state: PathBuf,
    ports: Ports,
}

impl Processes {
    /// Runs `up.sh` (idempotent: starts what is not running) and returns the
    /// admin kubeconfig it prints.
    fn up(&self) -> Result<PathBuf> {
        let mut cmd = Command::new("bash");
        cmd.arg(self.tools.join("up.sh"))
            .arg(&self.state)
            .env("API_PORT", self.ports.api.to_string())
            .env("ETCD_PORT", self.ports.etcd.to_string())
            .env("KCM_PORT", self.ports.kcm.to_string());
        let out = ns::output_with_timeout(&mut cmd, UP_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "kube-control-plane/up.sh {} failed ({}): {}",
            self.state.display(),
            out.status,
            out.stderr.trim()
        );
        let kubeconfig = PathBuf::from(out.stdout.lines().last().unwrap_or_default().trim());
        ensure!(
            kubeconfig.is_file(),
            "up.sh printed no kubeconfig: {}",
            out.stdout
        );
        Ok(kubeconfig)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        down(&self.tools, &self.state);
    }
}

/// Stops the control plane of state directory `state` (down.sh) and removes
/// the directory, unless a test is failing: its logs are kept for the reader.
fn down(tools: &Path, state: &Path) {
    let _ = ns::output_with_timeout(
        Command::new("bash").arg(tools.join("down.sh")).arg(state),
        Duration::from_secs(60),
    );
    if std::thread::panicking() {
        eprintln!(
            "lb-testbed: the control plane's logs are kept in {}",
            state.join("logs").display()
        );
    } else {
        let _ = std::fs::remove_dir_all(state);
    }
}

/// A running control plane and an admin client for it.
pub struct ControlPlane {
    /// Dropped first: the heartbeats stop before the processes do.
    rt: tokio::runtime::Runtime,
    client: Client,
    /// The Pods made by [`Self::run_pod`] and whether they should be Ready.
    pods: Arc<Pods>,
    kubeconfig: PathBuf,
    procs: Processes,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("state", &self.procs.state)
            .field("ports", &self.procs.ports)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts a control plane of this run's own (state in a new directory
    /// under the temporary directory) and waits until it serves.
    pub fn up() -> Result<Self> {
        let tools = tools_dir();
        ensure!(
            tools.join("up.sh").is_file(),
            "no control-plane scripts at {} (set LB_KUBE_CONTROL_PLANE to the kube-control-plane directory)",
            tools.display()
        );
        remove_stale(&tools);
        let ports = Ports::find()?;
        let state = std::env::temp_dir().join(format!(
            "{STATE_PREFIX}{}-{}",
            std::process::id(),
            ports.api
        ));
        // From here on, dropping `procs` stops what was started.
        let procs = Processes {
            tools,
            state,
            ports,
        };
        let kubeconfig = procs.up()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        // rustls needs a process-wide crypto provider (an error: one is set).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config = rt.block_on(kube::Config::from_custom_kubeconfig(
            kc,
            &kube::config::KubeConfigOptions::default(),
        ))?;
        let client = {
            // The client spawns its connection task on the current runtime.
            let _guard = rt.enter();
            Client::try_from(config).context("building the admin client")?
        };
        Ok(Self {
            procs,
            kubeconfig,
            rt,
            client,
            pods: Arc::default(),
        })
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's address (on this process's loopback).
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.procs.ports.api)
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.procs.state.join("pki/ca.crt")
    }

    /// The admin client (`system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on the control plane's runtime (for the API calls of
    /// synchronous tests).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The last lines of a component's log (`kube-apiserver`, `etcd`,
    /// `kube-controller-manager`).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        ns::tail(
            &ns::read_lossy(&self.procs.state.join(format!("logs/{component}.log"))),
            lines,
        )
    }

    fn pid_of(&self, component: &str) -> Option<u32> {
        std::fs::read_to_string(self.procs.state.join(format!("run/{component}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the API server (SIGTERM, then SIGKILL after 10 s), leaving etcd
    /// and the controller manager running: an API outage.
    pub fn stop_api_server(&self) -> Result<()> {
        self.stop("kube-apiserver")
    }

    /// Stops one component (SIGTERM, then SIGKILL after 10 s) and forgets its
    /// pid file: up.sh's `alive` check reads it, so a stopped component is
    /// one it starts again.
    fn stop(&self, component: &str) -> Result<()> {
        let pid = self
            .pid_of(component)
            .with_context(|| format!("no {component} pid file"))?;
        ns::kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns::pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if ns::pid_alive(pid) {
            ns::kill(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(self.procs.state.join(format!("run/{component}.pid")));
        Ok(())
    }

    /// Starts the API server again (after [`Self::stop_api_server`]) and waits
    /// until it serves. The controller manager is restarted with it: its
    /// informers would otherwise come back on their own backoff, a minute or
    /// more after the API server, and the tests need its EndpointSlice
    /// controller (lb's own recovery is what they measure).
    pub fn start_api_server(&self) -> Result<()> {
        self.stop("kube-controller-manager")?;
        self.procs.up().map(drop)
    }

    /// Makes a namespace (no error if it exists).
    pub fn namespace(&self, name: &str) -> Result<()> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        self.block_on(async {
            let api: Api<Namespace> = Api::all(self.client());
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
            }
        })
    }

    /// Creates the objects of a YAML file of ServiceAccounts, ClusterRoles and
    /// ClusterRoleBindings (such as `deploy/kubernetes/rbac.yaml`), creating
    /// their namespaces as needed.
    pub fn apply_rbac(&self, yaml: &str) -> Result<()> {
        use serde::Deserialize as _;
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_json::Value::deserialize(doc)?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let pp = PostParams::default();
            let client = self.client();
            let created = match kind.as_str() {
                "ServiceAccount" => {
                    let sa: ServiceAccount = serde_json::from_value(value)?;
                    let ns = sa.metadata.namespace.clone().unwrap_or("default".into());
                    self.namespace(&ns)?;
                    self.block_on(Api::namespaced(client, &ns).create(&pp, &sa))
                        .map(drop)
                }
                "ClusterRole" => {
                    let r: ClusterRole = serde_json::from_value(value)?;
                    self.block_on(Api::all(client).create(&pp, &r)).map(drop)
                }
                "ClusterRoleBinding" => {
                    let b: ClusterRoleBinding = serde_json::from_value(value)?;
                    self.block_on(Api::all(client).create(&pp, &b)).map(drop)
                }
                other => bail!("apply_rbac: a {other:?} document; only RBAC kinds are expected"),
            };
            match created {
                Ok(()) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e).with_context(|| format!("creating a {kind}")),
            }
        }
        Ok(())
    }

    /// What a kubelet mounts into a pod of ServiceAccount `namespace/name`
    /// at `/var/run/secrets/kubernetes.io/serviceaccount`: a token (from the
    /// TokenRequest API, valid a day), the cluster CA and the namespace,
    /// written to `dir`.
    pub fn service_account_files(&self, namespace: &str, name: &str, dir: &Path) -> Result<()> {
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(86_400),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let token = self
            .block_on(api.create_token_request(name, &PostParams::default(), &req))
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
            .status
            .and_then(|s| s.token)
            .context("a TokenRequest answered without a token")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), token)?;
        std::fs::copy(self.ca_cert(), dir.join("ca.crt"))?;
        std::fs::write(dir.join("namespace"), namespace)?;
        Ok(())
    }

    /// Registers the cluster's nodes as a kubelet would: Node objects with
    /// the nodes' addresses (InternalIP, both families), pod CIDRs, zone
    /// labels (`zone-a`, `zone-b`, ...) and a Ready condition; then, for as
    /// long as the control plane lives, a kubelet stand-in renews their
    /// Leases and keeps their and their Pods' status as the test set it.
    pub fn register_nodes(&self, cluster: &Cluster) -> Result<()> {
        for node in cluster.nodes() {
            let name = node.name().to_string();
            let zone = node.zone();
            let obj: KubeNode = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "topology.kubernetes.io/zone": zone,
                    },
                },
                "spec": {
                    "podCIDR": node.pod_cidr_v4().to_string(),
                    "podCIDRs": [node.pod_cidr_v4().to_string(), node.pod_cidr_v6().to_string()],
                },
            }))?;
            let api: Api<KubeNode> = Api::all(self.client());
            self.block_on(async {
                api.create(&PostParams::default(), &obj).await?;
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&node_status(node)),
                )
                .await?;
                anyhow::Ok(())
            })
            .with_context(|| format!("registering Node {name}"))?;
        }
        let kubelet = Kubelet {
            client: self.client(),
            nodes: cluster.nodes().to_vec(),
            pods: self.pods.clone(),
        };
        self.rt.spawn(kubelet.run());
        Ok(())
    }

    /// Creates Pod `pod` (a testbed pod) in `namespace` on its node, with
    /// `labels` and one container port per `(name, port)`, and sets its
    /// status as a kubelet would: Running, the pod's addresses, Ready
    /// `ready`. Retries while the namespace's default ServiceAccount (which
    /// admission requires) does not exist yet.
    pub fn run_pod(
        &self,
        namespace: &str,
        pod: &Pod,
        labels: &BTreeMap<String, String>,
        ports: &[(&str, u16)],
        ready: bool,
    ) -> Result<()> {
        self.run_pod_as(namespace, pod.name(), pod, labels, ports, ready)
    }

    /// [`Self::run_pod`] under another name: Pod `name` runs in testbed pod
    /// `pod` (its node, its addresses), as one replica after another of a
    /// Deployment may be given the same addresses. Only one Pod should run
    /// in a testbed pod at a time.
    pub fn run_pod_as(
        &self,
        namespace: &str,
        name: &str,
        pod: &Pod,
        labels: &BTreeMap<String, String>,
        ports: &[(&str, u16)],
        ready: bool,
    ) -> Result<()> {
        let obj = KubePod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(pod.node().into()),
                containers: vec![Container {
                    name: "server".into(),
                    image: Some("lb-testbed/server".into()),
                    ports: Some(
                        ports
                            .iter()
                            .flat_map(|(name, port)| {
                                ["TCP", "UDP"].map(|proto| ContainerPort {
                                    name: Some(format!("{name}-{}", proto.to_lowercase())),
                                    container_port: i32::from(*port),
                                    protocol: Some(proto.into()),
                                    ..ContainerPort::default()
                                })
                            })
                            .collect(),
                    ),
                    ..Container::default()
                }],
                // Tolerate the node lifecycle taints for good: the pods must
                // not be evicted if a heartbeat is late.
                tolerations: Some(
                    [
                        "node.kubernetes.io/not-ready",
                        "node.kubernetes.io/unreachable",
                    ]
                    .map(|key| Toleration {
                        key: Some(key.into()),
                        operator: Some("Exists".into()),
                        effect: Some("NoExecute".into()),
                        ..Toleration::default()
                    })
                    .to_vec(),
                ),
                termination_grace_period_seconds: Some(3600),
                ..PodSpec::default()
            }),
            ..KubePod::default()
        };
        let api: Api<KubePod> = Api::namespaced(self.client(), namespace);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.block_on(api.create(&PostParams::default(), &obj)) {
                Ok(_) => break,
                Err(kube::Error::Api(e))
                    if e.message.contains("serviceaccount") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating Pod {name}"));
                }
            }
        }
        self.set_pod_ready_as(namespace, name, pod, ready)
    }

    /// Sets a Pod's status as a kubelet would: Running, its addresses, and
    /// its Ready condition.
    /// The kubelet stand-in (see [`Self::register_nodes`]) keeps it so.
    pub fn set_pod_ready(&self, namespace: &str, pod: &Pod, ready: bool) -> Result<()> {
        self.set_pod_ready_as(namespace, pod.name(), pod, ready)
    }

    /// [`Self::set_pod_ready`] of Pod `name`, which runs in testbed pod `pod`.
    pub fn set_pod_ready_as(
        &self,
        namespace: &str,
        name: &str,
        pod: &Pod,
        ready: bool,
    ) -> Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client(), namespace);
        self.block_on(async {
            let _writing = self.pods.writes.lock().await;
            lock(&self.pods.registry).insert(
                (namespace.to_string(), name.to_string()),
                (pod.clone(), ready),
            );
            api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&pod_status(pod, ready)),
            )
            .await
        })
        .with_context(|| format!("setting the status of Pod {name}"))
        .map(drop)
    }

    /// Deletes a Pod gracefully: with no kubelet to finish it, it stays
    /// terminating (its endpoint serving but not ready) until
    /// [`Self::force_delete_pod`].
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client(), namespace);
        self.block_on(api.delete(name, &DeleteParams::default()))
            .with_context(|| format!("deleting Pod {name}"))
            .map(drop)
    }

    /// Sets a Node's taints (`NoSchedule`, by key; none: untainted), as the
    /// cluster autoscaler taints a node it is about to remove.
    pub fn set_node_taints(&self, node: &str, keys: &[&str]) -> Result<()> {
        let taints: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| json!({"key": k, "effect": "NoSchedule"}))
            .collect();
        let api: Api<KubeNode> = Api::all(self.client());
        self.block_on(api.patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"taints": taints}})),
        ))
        .with_context(|| format!("setting the taints of Node {node}"))
        .map(drop)
    }

    /// Removes a Pod at once (what the kubelet does when its containers
    /// have stopped).
    pub fn force_delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client(), namespace);
        let deleted = self.block_on(async {
            let _writing = self.pods.writes.lock().await;
            lock(&self.pods.registry).remove(&(namespace.to_string(), name.to_string()));
            api.delete(name, &DeleteParams::default().grace_period(0))
                .await
        });
        match deleted {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("force-deleting Pod {name}")),
        }
    }
}

/// A Lease as a server-side-apply body (with its kind, which typed objects
/// leave out).
fn lease_object(lease: &Lease) -> serde_json::Value {
    let mut v = serde_json::to_value(lease).unwrap_or_default();
    v["apiVersion"] = json!("coordination.k8s.io/v1");
    v["kind"] = json!("Lease");
    v
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Now, to the second (what `metav1.Time` holds).
fn now_rfc3339() -> String {
    let now = jiff_now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}
