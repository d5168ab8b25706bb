//! kube-proxy's rules, generated the way kube-proxy writes them
//! (kubernetes/kubernetes pkg/proxy/iptables and pkg/proxy/nftables, as their
//! proxier tests show the full output), for IPv4 ClusterIP and NodePort
//! Services with externalTrafficPolicy Cluster.
//!
//! iptables mode: `PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC-*` (cluster IP,
//! with `KUBE-MARK-MASQ` for traffic from outside the pod CIDR) or
//! `-> KUBE-NODEPORTS -> KUBE-EXT-* -> KUBE-MARK-MASQ, KUBE-SVC-*`, then
//! `statistic --mode random --probability 1/(n-i)` to `KUBE-SEP-*` chains that
//! DNAT; `POSTROUTING -> KUBE-POSTROUTING` masquerades marked packets; the filter
//! table's `KUBE-FORWARD` accepts them.
//!
//! nftables mode: `table ip kube-proxy` with the `service-ips` and
//! `service-nodeports` verdict maps, `service-*` chains with
//! `numgen random mod n vmap` to `endpoint-*` chains, `mark-for-masquerade` and
//! `masquerading`.

use std::{
    fmt::Write as _,
    hash::{DefaultHasher, Hash, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
};

/// One Service port.
#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddrV4>,
}

impl Svc {
    fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// Node facts the rules depend on.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    /// The cluster's pod CIDR (traffic from outside it is masqueraded).
    pub pod_cidr: String,
    /// The service CIDR (nftables mode drops traffic to unallocated ClusterIPs).
    pub service_cidr: String,
    /// Addresses NodePorts answer on.
    pub node_ips: Vec<Ipv4Addr>,
}

/// A stable 16-character base32 name part, as kube-proxy derives chain names
/// from a hash of the service port (the hash function differs; names are opaque).
fn hash_name(s: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut seed = 0u64;
    while out.len() < len {
        let mut h = DefaultHasher::new();
        (seed, s).hash(&mut h);
        let mut v = h.finish();
        for _ in 0..12 {
            out.push(ALPHABET[(v & 31) as usize] as char);
            v >>= 5;
        }
        seed += 1;
    }
    out.truncate(len);
    out
}

/// `iptables-restore` input for the filter and nat tables, with the jumps from
/// the built-in chains kube-proxy ensures.
pub fn iptables_restore(svcs: &[Svc], node: &NodeFacts) -> String {
    let mut f = String::with_capacity(svcs.len() * 3000 + 4096);
    f.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    f.push_str(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    f.push_str("*nat\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-MARK-MASQ",
        "KUBE-POSTROUTING",
    ] {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    struct Names {
        svc: String,
        ext: String,
        seps: Vec<String>,
    }
    let names: Vec<Names> = svcs
        .iter()
        .map(|s| {
            let key = format!("{}{}", s.port_name(), s.proto);
            Names {
                svc: format!("KUBE-SVC-{}", hash_name(&key, 16)),
                ext: format!("KUBE-EXT-{}", hash_name(&key, 16)),
                seps: s
                    .endpoints
                    .iter()
                    .map(|e| format!("KUBE-SEP-{}", hash_name(&format!("{key}{e}"), 16)))
                    .collect(),
            }
        })
        .collect();
    for (s, n) in svcs.iter().zip(&names) {
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(f, ":{} - [0:0]", n.svc);
        if s.node_port.is_some() {
            let _ = writeln!(f, ":{} - [0:0]", n.ext);
        }
        for sep in &n.seps {
            let _ = writeln!(f, ":{sep} - [0:0]");
        }
    }
    f.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    for (s, n) in svcs.iter().zip(&names) {
        if let (Some(np), false) = (s.node_port, s.endpoints.is_empty()) {
            let _ = writeln!(
                f,
                "-A KUBE-NODEPORTS -m comment --comment {pn} -m {p} -p {p} --dport {np} -j {ext}",
                pn = s.port_name(),
                p = s.proto,
                ext = n.ext
            );
        }
    }
    for (s, n) in svcs.iter().zip(&names) {
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(
            f,
            "-A KUBE-SERVICES -m comment --comment \"{pn} cluster IP\" -m {p} -p {p} -d {ip} --dport {port} -j {svc}",
            pn = s.port_name(),
            p = s.proto,
            ip = s.cluster_ip,
            port = s.port,
            svc = n.svc
        );
    }
    f.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for (s, n) in svcs.iter().zip(&names) {
        if s.node_port.is_none() || s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(
            f,
            "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}",
            ext = n.ext,
            pn = s.port_name(),
            svc = n.svc
        );
    }
    f.push_str(
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (s, n) in svcs.iter().zip(&names) {
        for (e, sep) in s.endpoints.iter().zip(&n.seps) {
            let _ = writeln!(
                f,
                "-A {sep} -m comment --comment {pn} -s {ip} -j KUBE-MARK-MASQ\n-A {sep} -m comment --comment {pn} -m {p} -p {p} -j DNAT --to-destination {e}",
                pn = s.port_name(),
                ip = e.ip(),
                p = s.proto
            );
        }
    }
    for (s, n) in svcs.iter().zip(&names) {
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(
            f,
            "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {p} -p {p} -d {ip} --dport {port} ! -s {pod} -j KUBE-MARK-MASQ",
            svc = n.svc,
            pn = s.port_name(),
            p = s.proto,
            ip = s.cluster_ip,
            port = s.port,
            pod = node.pod_cidr
        );
        let count = s.endpoints.len();
        for (i, (e, sep)) in s.endpoints.iter().zip(&n.seps).enumerate() {
            if i + 1 < count {
                let _ = writeln!(
                    f,
                    "-A {svc} -m comment --comment \"{pn} -> {e}\" -m statistic --mode random --probability {prob:.10} -j {sep}",
                    svc = n.svc,
                    pn = s.port_name(),
                    prob = 1.0 / (count - i) as f64
                );
            } else {
                let _ = writeln!(
                    f,
                    "-A {svc} -m comment --comment \"{pn} -> {e}\" -j {sep}",
                    svc = n.svc,
                    pn = s.port_name()
                );
            }
        }
    }
    f.push_str("COMMIT\n");
    f
}

/// `nft -f` input: kube-proxy's `table ip kube-proxy`.
pub fn nft_script(svcs: &[Svc], node: &NodeFacts) -> String {
    let t = "ip kube-proxy";
    let mut f = String::with_capacity(svcs.len() * 2500 + 8192);
    let _ = writeln!(
        f,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add chain {t} cluster-ips-check\n\
         add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}\n\
         add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}\n\
         add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}\n\
         add chain {t} filter-input {{ type filter hook input priority 0 ; }}\n\
         add chain {t} filter-output {{ type filter hook output priority 0 ; }}\n\
         add chain {t} firewall-check\n\
         add chain {t} mark-for-masquerade\n\
         add chain {t} masquerading\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {t} nodeport-endpoints-check\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         add chain {t} services\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add rule {t} cluster-ips-check ip daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n\
         add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add rule {t} filter-forward ct state new jump cluster-ips-check\n\
         add rule {t} filter-input ct state new jump nodeport-endpoints-check\n\
         add rule {t} filter-input ct state new jump service-endpoints-check\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add rule {t} filter-output-pre-dnat ct state new jump firewall-check\n\
         add rule {t} filter-output ct state new jump cluster-ips-check\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add rule {t} nat-output jump services\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add rule {t} nat-prerouting jump services\n\
         add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add rule {t} reject-chain reject\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        cidr = node.service_cidr
    );
    for ip in &node.node_ips {
        let _ = writeln!(f, "add element {t} nodeport-ips {{ {ip} }}");
    }
    for s in svcs {
        let key = format!("{}/{}/{}/{}", s.namespace, s.name, s.proto, s.port_name);
        let svc = format!("service-{}-{key}", hash_name(&key, 8));
        let ext = format!("external-{}-{key}", hash_name(&key, 8));
        let _ = writeln!(f, "add element {t} cluster-ips {{ {} }}", s.cluster_ip);
        if s.endpoints.is_empty() {
            let _ = writeln!(
                f,
                "add element {t} no-endpoint-services {{ {} . {} . {} comment \"{}\" : goto reject-chain }}",
                s.cluster_ip,
                s.proto,
                s.port,
                s.port_name()
            );
            continue;
        }
        let eps: Vec<String> = s
            .endpoints
            .iter()
            .map(|e| {
                let ek = format!("{key}__{}/{}", e.ip(), e.port());
                format!("endpoint-{}-{ek}", hash_name(&ek, 8))
            })
            .collect();
        // Every chain first: rules refer to chains, which must exist.
        let _ = writeln!(f, "add chain {t} {svc}");
        if s.node_port.is_some() {
            let _ = writeln!(f, "add chain {t} {ext}");
        }
        for name in &eps {
            let _ = writeln!(f, "add chain {t} {name}");
        }
        let _ = writeln!(
            f,
            "add rule {t} {svc} ip daddr {} ip saddr != {} jump mark-for-masquerade",
            s.cluster_ip, node.pod_cidr
        );
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : goto {e}"))
            .collect();
        let _ = writeln!(
            f,
            "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        if s.node_port.is_some() {
            let _ = writeln!(
                f,
                "add rule {t} {ext} jump mark-for-masquerade\nadd rule {t} {ext} goto {svc}"
            );
        }
        for (e, name) in s.endpoints.iter().zip(&eps) {
            let _ = writeln!(
                f,
                "add rule {t} {name} ip saddr {} jump mark-for-masquerade\nadd rule {t} {name} meta l4proto {} dnat to {e}",
                e.ip(),
                s.proto
            );
        }
        let _ = writeln!(
            f,
            "add element {t} service-ips {{ {} . {} . {} : goto {svc} }}",
            s.cluster_ip, s.proto, s.port
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                f,
                "add element {t} service-nodeports {{ {} . {np} : goto {ext} }}",
                s.proto
            );
        }
    }
    f
}

/// `n` ClusterIP Services (one TCP port each) with `eps` endpoints each, as
/// the control-plane comparison loads them.
pub fn many(n: usize, eps: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip: cluster_ip(i),
            port: 80,
            proto: "tcp",
            node_port: None,
            endpoints: (0..eps)
                .map(|j| SocketAddrV4::new(pod_ip(i * eps + j), 8080))
                .collect(),
        })
        .collect()
}

/// The i-th ClusterIP (10.96.0.0/12).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let v = 0x0a60_0000u32 + 10 + i as u32;
    Ipv4Addr::from(v)
}

/// The i-th pod address (10.244.0.0/16 and up).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    let v = 0x0af4_0000u32 + 2 + (i as u32 / 250) * 256 + (i as u32 % 250);
    Ipv4Addr::from(v)
}
