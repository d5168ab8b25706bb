//! The testbed cluster driven through a real Kubernetes API: a
//! [`ControlPlane`] of its own, the cluster's nodes registered as Node
//! objects, its pods as Pods (the real EndpointSlice controller turns them
//! into EndpointSlices), and lb-agent on every node run the way
//! `deploy/kubernetes/daemonset.yaml` runs it: the DaemonSet's own args, its
//! ServiceAccount bound by `deploy/kubernetes/rbac.yaml` and nothing wider,
//! in-cluster configuration, no `--iface` or `--node-ip`, its container's
//! volumes and environment, confined as its securityContext says.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{SecurityContext, Service},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{AgentProbe, Cluster, Container, ControlPlane, InCluster, Options, agent::Confinement};

/// The Kubernetes namespace of the testbed's Pods and Services.
pub const NAMESPACE: &str = "lb-testbed";
/// The pods' container port (their servers answer TCP and UDP on it).
pub const POD_PORT: u16 = 8080;
/// The name of the pods' container ports: `web-tcp` and `web-udp`.
pub const POD_PORT_NAME: &str = "web";
/// A label every testbed Pod has (`"true"`): a selector for all of them.
pub const ALL_PODS: &str = "lb-testbed/all";

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The lb-agent container of `deploy/kubernetes/daemonset.yaml`: its args,
/// the paths and ports of its probes, and what the container puts around
/// the process (volumes, environment, securityContext).
#[derive(Debug, Clone)]
pub struct ShippedAgent {
    pub args: Vec<String>,
    pub liveness: AgentProbe,
    pub readiness: AgentProbe,
    /// The ServiceAccount the DaemonSet's pods run as (`kube-system/...`).
    pub service_account: (String, String),
    /// Its hostPath volumes (bpffs: each node's own, see `Node::bpffs`),
    /// literal environment and confinement.
    pub container: Container,
}

impl ShippedAgent {
    /// Reads the DaemonSet from `deploy/kubernetes/daemonset.yaml`.
    pub fn from_deploy() -> Result<Self> {
        let path = deploy_dir().join("kubernetes/daemonset.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ds: DaemonSet = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        let spec = ds
            .spec
            .template
            .spec
            .context("the DaemonSet has no pod spec")?;
        let container = spec
            .containers
            .iter()
            .find(|c| c.name == "lb-agent")
            .context("the DaemonSet has no lb-agent container")?;
        ensure!(
            container.command.is_none(),
            "the lb-agent container overrides the image's entrypoint; the testbed runs `lb-agent ARGS`"
        );
        let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>, what: &str| {
            let get = p
                .and_then(|p| p.http_get.as_ref())
                .with_context(|| format!("the DaemonSet's {what} probe is no httpGet"))?;
            let port = match &get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => {
                    u16::try_from(*p)?
                }
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                    let p = container
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name))
                        .with_context(|| format!("{what} probe port {name:?} is not declared"))?;
                    u16::try_from(p.container_port)?
                }
            };
            anyhow::Ok(AgentProbe {
                path: get.path.clone().unwrap_or_else(|| "/".into()),
                port,
            })
        };
        let mut host_mounts = Vec::new();
        let mut bpffs_mount = None;
        let mut writable = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let host = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| PathBuf::from(&h.path))
                .with_context(|| format!("volume {} is no hostPath volume", m.name))?;
            if m.read_only != Some(true) {
                writable.push(PathBuf::from(&m.mount_path));
            }
            if host == Path::new(crate::scope::BPFFS) {
                bpffs_mount = Some(PathBuf::from(&m.mount_path));
            } else {
                host_mounts.push((host, PathBuf::from(&m.mount_path)));
            }
        }
        let mut env = Vec::new();
        for e in container.env.iter().flatten() {
            match (&e.value, &e.value_from) {
                (Some(v), None) => env.push((e.name.clone(), v.clone())),
                // The kubelet's own (NODE_NAME), which the testbed sets.
                (None, Some(_)) => {}
                _ => bail!("env {}: neither a value nor a valueFrom", e.name),
            }
        }
        let namespace = ds.metadata.namespace.unwrap_or_else(|| "default".into());
        Ok(Self {
            container: Container {
                bpffs_mount: bpffs_mount
                    .context("the lb-agent container mounts no hostPath volume of /sys/fs/bpf")?,
                host_mounts,
                env,
                confinement: Some(confinement(container.security_context.as_ref(), writable)?),
            },
            args: container.args.clone().unwrap_or_default(),
            liveness: probe(container.liveness_probe.as_ref(), "liveness")?,
            readiness: probe(container.readiness_probe.as_ref(), "readiness")?,
            service_account: (
                namespace,
                spec.service_account_name
                    .unwrap_or_else(|| "default".into()),
            ),
        })
    }
}

/// How a runtime confines a root process with `sc` (whose capabilities the
/// testbed reproduces only as `drop: [ALL]` and a list to `add`), where the
/// volumes at `writable` are not read-only.
fn confinement(sc: Option<&SecurityContext>, writable: Vec<PathBuf>) -> Result<Confinement> {
    let sc = sc.context("the lb-agent container has no securityContext")?;
    ensure!(
        sc.privileged != Some(true),
        "the lb-agent container is privileged: nothing to confine"
    );
    ensure!(
        sc.run_as_user.is_none_or(|u| u == 0),
        "the testbed runs the agent as root (uid 0) only"
    );
    let caps = sc
        .capabilities
        .as_ref()
        .context("the lb-agent container's securityContext lists no capabilities")?;
    ensure!(
        caps.drop.as_deref() == Some(&["ALL".to_string()][..]),
        "the testbed reproduces capabilities as `drop: [ALL]` plus `add` only, not {:?}",
        caps.drop
    );
    let read_only = sc.read_only_root_filesystem == Some(true);
    Ok(Confinement {
        capabilities: caps.add.iter().flatten().cloned().collect(),
        // Unset, escalation is allowed: no_new_privs stays off.
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        read_only,
        writable: if read_only { writable } else { Vec::new() },
    })
}

/// A testbed cluster whose agents follow a real API server.
pub struct KubeCluster {
    /// Dropped first: agents stop before their API server.
    pub cluster: Cluster,
    pub cp: ControlPlane,
    pub shipped: ShippedAgent,
}

impl KubeCluster {
    /// Brings up the namespace cluster (pod servers on [`POD_PORT`]) and a
    /// control plane; creates the RBAC of `deploy/`, the Nodes, and a Pod
    /// per testbed pod (Running, Ready, both addresses; labelled
    /// [`ALL_PODS`], and put in sets by [`Self::pod_set`]); then starts `agent` on
    /// every node as the DaemonSet does and waits for its readiness probe.
    pub fn up(opts: Options, agent: &Path) -> Result<Self> {
        let cluster = Cluster::up(opts)?;
        cluster.start_pod_servers(&[POD_PORT])?;
        let cp = ControlPlane::up()?;
        let shipped = ShippedAgent::from_deploy()?;
        let rbac = deploy_dir().join("kubernetes/rbac.yaml");
        cp.apply_rbac(&std::fs::read_to_string(&rbac)?)
            .with_context(|| format!("applying {}", rbac.display()))?;
        let sa_dir = cluster.run_dir().join("serviceaccount");
        let (sa_ns, sa) = &shipped.service_account;
        cp.service_account_files(sa_ns, sa, &sa_dir)?;
        cp.register_nodes(&cluster)?;
        cp.namespace(NAMESPACE)?;
        for pod in cluster.pods() {
            cp.run_pod(
                NAMESPACE,
                pod,
                &pod_labels(),
                &[(POD_PORT_NAME, POD_PORT)],
                true,
            )?;
        }
        let kc = Self {
            cluster,
            cp,
            shipped,
        };
        kc.cluster.start_agents_in_cluster(
            agent,
            &InCluster {
                args: kc.shipped.args.clone(),
                service_account: sa_dir,
                api: kc.cp.api_addr(),
                ready: kc.shipped.readiness.clone(),
                container: kc.shipped.container.clone(),
            },
        )?;
        Ok(kc)
    }

    /// Creates Service `name` in [`NAMESPACE`] from `spec` (the `spec` of a
    /// Service), or replaces the spec of the one there, and returns it as
    /// the API server keeps it (allocated ClusterIPs and NodePorts).
    pub fn apply_service(&self, name: &str, spec: Value) -> Result<Service> {
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }))?;
        let api: Api<Service> = Api::namespaced(self.cp.client(), NAMESPACE);
        let pp = PatchParams::apply("lb-testbed").force();
        self.cp
            .block_on(api.patch(name, &pp, &Patch::Apply(&svc)))
            .with_context(|| format!("applying Service {name}"))
    }

    pub fn delete_service(&self, name: &str) -> Result<()> {
        let api: Api<Service> = Api::namespaced(self.cp.client(), NAMESPACE);
        self.cp
            .block_on(api.delete(name, &DeleteParams::default()))
            .with_context(|| format!("deleting Service {name}"))
            .map(drop)
    }

    /// Sets a LoadBalancer Service's `status.loadBalancer.ingress`, as a
    /// cloud controller would.
    pub fn set_ingress(&self, name: &str, ips: &[std::net::IpAddr]) -> Result<()> {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        let api: Api<Service> = Api::namespaced(self.cp.client(), NAMESPACE);
        let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
        self.cp
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .with_context(|| format!("setting the ingress of Service {name}"))
            .map(drop)
    }

    /// Makes `pods`, and only them, the members of set `set`: labels them
    /// `lb-testbed/set-<set>` and takes the label off every other testbed
    /// Pod. Returns the selector of the set, for a Service's spec.
    pub fn pod_set(&self, set: &str, pods: &[&str]) -> Result<Value> {
        let key = set_label(set);
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.cp.client(), NAMESPACE);
        for pod in self.cluster.pods() {
            let value = if pods.contains(&pod.name()) {
                json!("true")
            } else {
                Value::Null
            };
            let patch = json!({"metadata": {"labels": {key.as_str(): value}}});
            match self.cp.block_on(api.patch(
                pod.name(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )) {
                Ok(_) => {}
                // A pod deleted by the test is in no set.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("labelling Pod {}", pod.name()));
                }
            }
        }
        Ok(json!({ key: "true" }))
    }

    /// Creates testbed Pod `pod` again (after a forced deletion), Ready.
    pub fn recreate_pod(&self, pod: &str) -> Result<()> {
        let p = self.cluster.pod(pod);
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.cp.client(), NAMESPACE);
        // A pod deleted with grace period 0 may take a moment to go.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cp.block_on(api.get_opt(pod))?.is_some() {
            if Instant::now() > deadline {
                bail!("Pod {pod} is still there 10 s after its deletion");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.cp.run_pod(
            NAMESPACE,
            p,
            &pod_labels(),
            &[(POD_PORT_NAME, POD_PORT)],
            true,
        )
    }

    /// Runs Pod `name` in testbed pod `pod`'s namespace (its node, its
    /// addresses, its servers), in the sets `sets` (see [`Self::pod_set`]),
    /// Ready or not: a replica of a workload, as one Deployment's Pods come
    /// and go. Only one Pod at a time should run in a testbed pod (delete the
    /// one before, [`ControlPlane::force_delete_pod`], first).
    pub fn run_replica(&self, name: &str, pod: &str, sets: &[&str], ready: bool) -> Result<()> {
        let mut labels = pod_labels();
        labels.extend(sets.iter().map(|s| (set_label(s), "true".to_string())));
        self.cp.run_pod_as(
            NAMESPACE,
            name,
            self.cluster.pod(pod),
            &labels,
            &[(POD_PORT_NAME, POD_PORT)],
            ready,
        )
    }

    /// Sets the Ready condition of replica `name` (run in testbed pod `pod`
    /// by [`Self::run_replica`]), as its kubelet would.
    pub fn set_replica_ready(&self, name: &str, pod: &str, ready: bool) -> Result<()> {
        self.cp
            .set_pod_ready_as(NAMESPACE, name, self.cluster.pod(pod), ready)
    }

    /// The endpoints of Service `name` in its EndpointSlices, as the API
    /// server has them now (what the EndpointSlice controller made of the
    /// Pods), sorted by address.
    pub fn endpoints(&self, name: &str) -> Result<Vec<Endpoint>> {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let api: Api<EndpointSlice> = Api::namespaced(self.cp.client(), NAMESPACE);
        let lp =
            kube::api::ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
        let slices = self
            .cp
            .block_on(api.list(&lp))
            .with_context(|| format!("listing the EndpointSlices of {name}"))?;
        let mut out: Vec<Endpoint> = slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .flat_map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                // Unset: ready is true, serving is ready, terminating false.
                let ready = c.ready != Some(false);
                let serving = c.serving.unwrap_or(ready);
                let terminating = c.terminating == Some(true);
                let pod = e.target_ref.as_ref().and_then(|r| r.name.clone());
                e.addresses.iter().map(move |a| Endpoint {
                    address: a.clone(),
                    pod: pod.clone(),
                    ready,
                    serving,
                    terminating,
                })
            })
            .collect();
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    /// The ready endpoint addresses of Service `name` in its EndpointSlices,
    /// as the API server has them now (what the EndpointSlice controller made
    /// of the Pods).
    pub fn ready_endpoints(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .endpoints(name)?
            .into_iter()
            .filter(|e| e.ready)
            .map(|e| e.address)
            .collect())
    }

    /// Waits until the controller manager acts on changes again (after an
    /// API server restart its informers come back on their own backoff, up
    /// to 30 s, and until its EndpointSlice informer has caught up the
    /// controller creates new slices but does not update existing ones): a
    /// throwaway Service over one Pod gets its EndpointSlice, and when it is
    /// moved to another Pod, the slice follows. Returns how long that took.
    pub fn wait_controllers(&self, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        let pods: Vec<&crate::Pod> = self.cluster.pods().take(2).collect();
        ensure!(pods.len() == 2, "the sentinel needs two pods");
        // A new name each time: the slice of an earlier sentinel may not be
        // collected yet.
        static SENTINELS: AtomicUsize = AtomicUsize::new(0);
        let name = format!("sentinel-{}", SENTINELS.fetch_add(1, Ordering::SeqCst));
        for (i, pod) in pods.iter().enumerate() {
            let selector = self.pod_set(&name, &[pod.name()])?;
            if i == 0 {
                self.apply_service(
                    &name,
                    json!({
                        "selector": selector,
                        "ports": [{"port": 1, "targetPort": POD_PORT}],
                        "ipFamilyPolicy": "RequireDualStack",
                    }),
                )?;
            }
            let want: Vec<String> = {
                let mut v: Vec<String> = pod.addrs().iter().map(ToString::to_string).collect();
                v.sort();
                v
            };
            while self.ready_endpoints(&name)? != want {
                ensure!(
                    t.elapsed() < limit,
                    "the EndpointSlice controller did not follow Service {name} to {} in {limit:?}",
                    pod.name()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.delete_service(&name)?;
        self.pod_set(&name, &[])?;
        Ok(t.elapsed())
    }

    /// Writes the EndpointSlices of a Service without a selector, as their
    /// owner (not the EndpointSlice controller) does: one per family, named
    /// `<service>-v4` / `-v6`, the ports `tcp` and `udp` on [`POD_PORT`], the
    /// `pods` ready on their nodes.
    pub fn apply_own_slices(&self, service: &str, pods: &[&str]) -> Result<()> {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let api: Api<EndpointSlice> = Api::namespaced(self.cp.client(), NAMESPACE);
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let name = format!("{service}-{}", if v6 { "v6" } else { "v4" });
            let endpoints: Vec<Value> = pods
                .iter()
                .map(|p| {
                    let pod = self.cluster.pod(p);
                    json!({
                        "addresses": [pod.addrs()[usize::from(v6)].to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": pod.node(),
                    })
                })
                .collect();
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": NAMESPACE,
                    "labels": {
                        "kubernetes.io/service-name": service,
                        "endpointslice.kubernetes.io/managed-by": "lb-testbed",
                    },
                },
                "addressType": family,
                "endpoints": endpoints,
                "ports": [
                    {"name": "tcp", "port": POD_PORT, "protocol": "TCP"},
                    {"name": "udp", "port": POD_PORT, "protocol": "UDP"},
                ],
            });
            self.cp
                .block_on(api.patch(
                    &name,
                    &PatchParams::apply("lb-testbed").force(),
                    &Patch::Apply(&slice),
                ))
                .with_context(|| format!("applying EndpointSlice {name}"))?;
        }
        Ok(())
    }

    /// The Service as the API server has it now.
    pub fn service(&self, name: &str) -> Result<Service> {
        let api: Api<Service> = Api::namespaced(self.cp.client(), NAMESPACE);
        self.cp
            .block_on(api.get(name))
            .with_context(|| format!("reading Service {name}"))
    }
}

/// An endpoint of a Service's EndpointSlices: an address, the Pod it is
/// (the slice's `targetRef`), and its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub pod: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}){}{}{}",
            self.address,
            self.pod.as_deref().unwrap_or("no pod"),
            if self.ready { " ready" } else { "" },
            if self.serving { " serving" } else { "" },
            if self.terminating { " terminating" } else { "" },
        )
    }
}

/// The label that puts a testbed Pod in set `set` (see
/// [`KubeCluster::pod_set`]).
fn set_label(set: &str) -> String {
    format!("lb-testbed/set-{set}")
}

/// A testbed Pod's own labels: [`ALL_PODS`].
fn pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(ALL_PODS.to_string(), "true".to_string())])
}
