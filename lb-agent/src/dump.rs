//! `lb-agent dump`: the datapath's state decoded from the pinned maps, readable
//! whether or not an agent is running.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, CT_F_ACKED, CT_F_CLOSING, CT_F_FORWARD, CT_F_HAIRPIN,
    CT_F_REPLIED, CT_F_REPLY, CT_F_SNAT, PROTO_TCP, PROTO_UDP, SVC_F_ADDRESS, SVC_F_AFFINITY,
    SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_SNAT_REMOTE, SVC_F_SOURCE_RANGES,
    SVC_F_TERMINATING_FALLBACK, iface, socket_addr,
};
use serde::Serialize;

use crate::bpf::{Maps, sock};

#[derive(Serialize)]
pub struct Dump {
    pub config: ConfigDump,
    pub interfaces: Vec<InterfaceDump>,
    pub services: Vec<ServiceDump>,
    /// ClusterIP addresses: other ports of them are refused.
    pub cluster_ips: Vec<String>,
    pub backends: Vec<BackendDump>,
    pub maglev: Vec<TableDump>,
    pub conntrack: ConntrackDump,
    pub reasons: BTreeMap<String, CountersDump>,
    pub socket_lb: SocketLbDump,
}

/// Socket-level balancing for the node's own clients.
#[derive(Serialize)]
pub struct SocketLbDump {
    /// Socket programs with a pinned link (all of them, or none).
    pub programs_attached: usize,
    pub programs: usize,
    /// System calls changed or refused, per event.
    pub calls: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct ConfigDump {
    /// Entries of the `maglev` map, and those its tables take.
    pub maglev_entries: u64,
    pub maglev_entries_used: u64,
    pub snat_v4: Option<String>,
    pub snat_v6: Option<String>,
    pub snat_ports: String,
    /// The cluster's pod CIDRs the datapath tells inside clients by (None:
    /// it tells no clients apart).
    pub cluster_cidrs: Option<Vec<String>>,
}

/// An interface the programs run on.
#[derive(Serialize)]
pub struct InterfaceDump {
    pub ifindex: u32,
    pub name: String,
    pub role: &'static str,
    pub hooks: Vec<&'static str>,
    /// For an uplink: why these hooks.
    pub why: &'static str,
    /// With XDP: what the driver counted as XDP frames it failed to send
    /// (counted by the datapath as `tx` / `redirect` all the same).
    pub xdp_transmit_errors: BTreeMap<String, u64>,
}

#[derive(Serialize, Default, Clone, Copy)]
pub struct CountersDump {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct ServiceDump {
    pub id: u32,
    pub name: String,
    pub frontends: Vec<FrontendDump>,
    pub counters: CountersDump,
    /// sessionAffinity ClientIP: its timeout in seconds, and the clients
    /// remembered now.
    pub affinity_timeout: Option<u32>,
    pub affinity_clients: usize,
    /// loadBalancerSourceRanges written for its LoadBalancer IPs.
    pub source_ranges: Vec<String>,
}

#[derive(Serialize)]
pub struct FrontendDump {
    pub address: String,
    pub protocol: &'static str,
    pub table: u32,
    pub backends: u32,
    pub flags: Vec<&'static str>,
    /// A Local external frontend: the table (its first element) and
    /// backends of clients inside the cluster.
    pub in_cluster: Option<(u32, u32)>,
}

#[derive(Serialize)]
pub struct BackendDump {
    pub id: u32,
    pub address: String,
    pub flags: Vec<&'static str>,
    pub counters: CountersDump,
}

#[derive(Serialize)]
pub struct TableDump {
    /// First element in `maglev` (what frontends' `table` says), and entries.
    pub start: u32,
    pub size: u32,
    /// Entries owned by each backend id.
    pub shares: BTreeMap<u32, u32>,
}

#[derive(Serialize)]
pub struct ConntrackDump {
    pub entries: usize,
    pub shown: Vec<FlowDump>,
}

#[derive(Serialize)]
pub struct FlowDump {
    pub protocol: &'static str,
    pub from: String,
    pub to: String,
    pub becomes_from: String,
    pub becomes_to: String,
    pub direction: &'static str,
    pub flags: Vec<&'static str>,
    pub backend: u32,
    pub service: u32,
    /// Where this direction's packets may arrive (`CtEntry::ingress`):
    /// "anywhere", "the network", "a pod interface", or an interface's name.
    pub arrives_on: String,
}

/// `CtEntry::ingress` in words; an interface by its name in `interfaces`.
fn arrives_on(ingress: u32, names: &BTreeMap<u32, String>) -> String {
    match ingress {
        lb_common::CT_INGRESS_ANY => "anywhere".into(),
        lb_common::CT_INGRESS_NETWORK => "the network".into(),
        lb_common::CT_INGRESS_PODS => "a pod interface".into(),
        i => names
            .get(&i)
            .cloned()
            .unwrap_or_else(|| format!("ifindex {i}")),
    }
}

fn proto(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

fn addr(a: &[u8; 16], family: u8, port: u16) -> String {
    socket_addr(a, family, port).map_or_else(|| "?".into(), |s| s.to_string())
}

fn counters(c: lb_common::Counters) -> CountersDump {
    CountersDump {
        packets: c.packets,
        bytes: c.bytes,
    }
}

pub fn collect(dir: &Path, conntrack_limit: usize) -> Result<Dump> {
    let maps = Maps::open_pinned(dir)
        .with_context(|| format!("no datapath pinned at {}", dir.display()))?;
    let cfg = maps.config.get(&0, 0).context("reading config")?;
    let mut config = ConfigDump {
        maglev_entries: 0,
        maglev_entries_used: 0,
        snat_v4: (cfg.flags & lb_common::CFG_F_SNAT_V4 != 0)
            .then(|| std::net::Ipv4Addr::from(cfg.snat_addr_v4).to_string()),
        snat_v6: (cfg.flags & lb_common::CFG_F_SNAT_V6 != 0)
            .then(|| std::net::Ipv6Addr::from(cfg.snat_addr_v6).to_string()),
        snat_ports: format!("{}-{}", cfg.snat_port_min, cfg.snat_port_max),
        cluster_cidrs: if cfg.flags & lb_common::CFG_F_CLUSTER_CIDRS != 0 {
            let mut cidrs = maps.cluster_cidrs()?;
            cidrs.sort();
            Some(cidrs.iter().map(|(a, len)| format!("{a}/{len}")).collect())
        } else {
            None
        },
    };

    let mut interfaces = Vec::new();
    for entry in maps.interfaces.iter() {
        let (ifindex, i) = entry.context("reading interfaces")?;
        let mut hooks = Vec::new();
        for (bit, name) in [(iface::HOOK_XDP, "xdp"), (iface::HOOK_TC, "tc")] {
            if i.hooks & bit != 0 {
                hooks.push(name);
            }
        }
        let xdp_transmit_errors = if i.hooks & iface::HOOK_XDP != 0 {
            crate::ethtool::xdp_transmit_errors(i.name())
                .unwrap_or_default()
                .into_iter()
                .collect()
        } else {
            BTreeMap::new()
        };
        interfaces.push(InterfaceDump {
            ifindex,
            name: i.name().to_string(),
            role: iface::role_name(i.role),
            hooks,
            why: iface::why_text(i.why),
            xdp_transmit_errors,
        });
    }
    interfaces.sort_by_key(|i| (i.role, i.ifindex));

    let mut by_id: BTreeMap<u32, Vec<FrontendDump>> = BTreeMap::new();
    let mut affinity_timeouts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut tables = BTreeMap::new();
    let mut cluster_ips = Vec::new();
    for entry in maps.services.iter() {
        let (k, v) = entry.context("reading services")?;
        if v.flags & SVC_F_ADDRESS != 0 {
            cluster_ips.push(
                addr(&k.addr, k.family, 0)
                    .trim_end_matches(":0")
                    .to_string(),
            );
            continue;
        }
        let mut flags = Vec::new();
        for (bit, name) in [
            (SVC_F_SNAT_REMOTE, "snat-remote"),
            (SVC_F_EXTERNAL, "external"),
            (SVC_F_AFFINITY, "affinity"),
            (SVC_F_SOURCE_RANGES, "source-ranges"),
            (SVC_F_LOCAL, "local"),
            (SVC_F_TERMINATING_FALLBACK, "terminating-fallback"),
        ] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        if v.backend_count > 0 && v.table_size > 0 {
            tables.insert(v.table, v.table_size);
        }
        let in_cluster = (v.flags & SVC_F_LOCAL != 0 && v.flags & SVC_F_EXTERNAL != 0)
            .then_some((v.cluster_table, v.cluster_backend_count));
        if let Some((start, n)) = in_cluster
            && n > 0
            && v.table_size > 0
        {
            tables.insert(start, v.table_size);
        }
        if v.flags & SVC_F_AFFINITY != 0 {
            affinity_timeouts.insert(v.id, v.affinity_timeout);
        }
        by_id.entry(v.id).or_default().push(FrontendDump {
            address: addr(&k.addr, k.family, k.port),
            protocol: proto(k.proto),
            table: v.table,
            backends: v.backend_count,
            flags,
            in_cluster,
        });
    }
    let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (id, (a, len)) in maps.source_ranges()? {
        ranges.entry(id).or_default().push(format!("{a}/{len}"));
    }
    let mut affinity_clients: BTreeMap<u32, usize> = BTreeMap::new();
    for k in maps.affinity.keys().flatten() {
        *affinity_clients.entry(k.service).or_default() += 1;
    }
    let mut services = Vec::new();
    for (id, mut frontends) in by_id {
        frontends.sort_by(|a, b| a.address.cmp(&b.address));
        let name = maps
            .service_names
            .get(&id, 0)
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        services.push(ServiceDump {
            id,
            name,
            frontends,
            counters: counters(maps.service_counters(id).unwrap_or_default()),
            affinity_timeout: affinity_timeouts.get(&id).copied(),
            affinity_clients: affinity_clients.get(&id).copied().unwrap_or(0),
            source_ranges: ranges.remove(&id).unwrap_or_default(),
        });
    }
    let mut backends = Vec::new();
    let capacity = maps.backends.len();
    for id in 0..capacity {
        let b = maps.backends.get(&id, 0).context("reading backends")?;
        if !b.is_active() {
            continue;
        }
        let mut flags = Vec::new();
        if b.flags & BACKEND_F_LOCAL != 0 {
            flags.push("local");
        }
        if b.flags & BACKEND_F_TERMINATING != 0 {
            flags.push("terminating");
        }
        backends.push(BackendDump {
            id,
            address: addr(&b.addr, b.family, b.port),
            flags,
            counters: counters(maps.backend_counters(id).unwrap_or_default()),
        });
    }
    let mut maglev = Vec::new();
    for (start, size) in tables {
        let mut shares = BTreeMap::new();
        for id in maps.maglev.read(start, size as usize)? {
            *shares.entry(id).or_insert(0) += 1;
        }
        maglev.push(TableDump {
            start,
            size,
            shares,
        });
    }
    config.maglev_entries = u64::from(maps.maglev.elements()) * 2;
    config.maglev_entries_used = maglev
        .iter()
        .map(|t| u64::from(lb_common::maglev_row_elements(t.size)) * 2)
        .sum();
    let names: BTreeMap<u32, String> = interfaces
        .iter()
        .map(|i| (i.ifindex, i.name.clone()))
        .collect();
    let mut shown = Vec::new();
    let mut entries = 0;
    for entry in maps.conntrack.iter() {
        let Ok((k, v)) = entry else { continue };
        entries += 1;
        if shown.len() >= conntrack_limit {
            continue;
        }
        let mut flags = Vec::new();
        if v.flags & CT_F_SNAT != 0 {
            flags.push("snat");
        }
        if v.flags & CT_F_CLOSING != 0 {
            flags.push("closing");
        }
        if v.flags & CT_F_HAIRPIN != 0 {
            flags.push("hairpin");
        }
        if v.flags & CT_F_REPLIED != 0 {
            flags.push("replied");
        }
        if v.flags & CT_F_ACKED != 0 {
            flags.push("acked");
        }
        shown.push(FlowDump {
            protocol: proto(k.proto),
            from: addr(&k.src, k.family, k.src_port),
            to: addr(&k.dst, k.family, k.dst_port),
            becomes_from: addr(&v.nat_src, k.family, v.nat_src_port),
            becomes_to: addr(&v.nat_dst, k.family, v.nat_dst_port),
            direction: if v.flags & CT_F_FORWARD != 0 {
                "forward"
            } else if v.flags & CT_F_REPLY != 0 {
                "reply"
            } else {
                "?"
            },
            flags,
            backend: v.backend,
            service: v.service,
            arrives_on: arrives_on(v.ingress, &names),
        });
    }
    let reasons = maps
        .reason_counters()?
        .into_iter()
        .map(|(r, c)| (r.name().to_string(), counters(c)))
        .collect();
    cluster_ips.sort();
    let socket_lb = SocketLbDump {
        programs_attached: sock::pinned(&dir.join("links")),
        programs: sock::PROGRAMS.len(),
        calls: maps
            .sock_counters()?
            .into_iter()
            .map(|(e, n)| (e.as_str().to_string(), n))
            .collect(),
    };
    Ok(Dump {
        config,
        interfaces,
        services,
        cluster_ips,
        backends,
        maglev,
        conntrack: ConntrackDump { entries, shown },
        reasons,
        socket_lb,
    })
}

/// The dump as text for people.
pub fn render(d: &Dump) -> String {
    let mut o = String::new();
    let c = &d.config;
    let _ = writeln!(
        o,
        "config: maglev {} of {} entries in tables, SNAT {} {} ports {}",
        c.maglev_entries_used,
        c.maglev_entries,
        c.snat_v4.as_deref().unwrap_or("-"),
        c.snat_v6.as_deref().unwrap_or("-"),
        c.snat_ports
    );
    let _ = writeln!(
        o,
        "cluster CIDRs: {}",
        match &c.cluster_cidrs {
            Some(cidrs) => cidrs.join(" "),
            None => "none known (no client is told to be inside the cluster)".into(),
        }
    );
    let _ = writeln!(o, "\ninterfaces ({}):", d.interfaces.len());
    for i in &d.interfaces {
        let _ = writeln!(
            o,
            "  {} (ifindex {}) {} {}{}{}",
            i.name,
            i.ifindex,
            i.role,
            i.hooks.join("+"),
            if i.why.is_empty() { "" } else { ": " },
            i.why
        );
        let failed: u64 = i.xdp_transmit_errors.values().sum();
        if failed > 0 {
            let counters: Vec<String> = i
                .xdp_transmit_errors
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let _ = writeln!(
                o,
                "      XDP transmit errors: {failed} frames counted as tx/redirect were dropped by the driver ({})",
                counters.join(", ")
            );
        }
    }
    let _ = writeln!(o, "\nservices ({} service ports):", d.services.len());
    for s in &d.services {
        let _ = writeln!(
            o,
            "  [{}] {}  packets {} bytes {}",
            s.id, s.name, s.counters.packets, s.counters.bytes
        );
        if let Some(t) = s.affinity_timeout {
            let _ = writeln!(
                o,
                "      sessionAffinity ClientIP, timeout {t} s, {} clients remembered",
                s.affinity_clients
            );
        }
        if !s.source_ranges.is_empty() {
            let _ = writeln!(
                o,
                "      loadBalancerSourceRanges: {}",
                s.source_ranges.join(" ")
            );
        }
        for f in &s.frontends {
            let _ = writeln!(
                o,
                "      {} {:<3} -> table {} ({} backends){}{}{}",
                f.address,
                f.protocol,
                f.table,
                f.backends,
                if f.flags.is_empty() { "" } else { " " },
                f.flags.join(","),
                f.in_cluster
                    .map(|(t, n)| format!("; clients inside the cluster: table {t} ({n} backends)"))
                    .unwrap_or_default()
            );
            if f.flags.contains(&"source-ranges") && s.source_ranges.is_empty() {
                let _ = writeln!(o, "        (no source range: nobody is admitted)");
            }
        }
    }
    let _ = writeln!(
        o,
        "\nClusterIP addresses (other ports refused): {}",
        d.cluster_ips.join(" ")
    );
    let _ = writeln!(o, "\nbackends ({}):", d.backends.len());
    for b in &d.backends {
        let _ = writeln!(
            o,
            "  [{}] {} {} packets {} bytes {}",
            b.id,
            b.address,
            if b.flags.is_empty() {
                "-".to_string()
            } else {
                b.flags.join(",")
            },
            b.counters.packets,
            b.counters.bytes
        );
    }
    let _ = writeln!(o, "\nmaglev tables ({}):", d.maglev.len());
    for t in &d.maglev {
        let total: u32 = t.shares.values().sum();
        let shares: Vec<String> = t
            .shares
            .iter()
            .map(|(id, n)| {
                format!(
                    "backend {id}: {n} ({:.1}%)",
                    f64::from(*n) * 100.0 / f64::from(total.max(1))
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "  at {} ({} entries): {}",
            t.start,
            t.size,
            shares.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "\nconntrack ({} entries, {} shown):",
        d.conntrack.entries,
        d.conntrack.shown.len()
    );
    for f in &d.conntrack.shown {
        let _ = writeln!(
            o,
            "  {:<3} {} -> {}  =>  {} -> {}  {} backend {} service {}{}{} from {}",
            f.protocol,
            f.from,
            f.to,
            f.becomes_from,
            f.becomes_to,
            f.direction,
            f.backend,
            f.service,
            if f.flags.is_empty() { "" } else { " " },
            f.flags.join(","),
            f.arrives_on
        );
    }
    let sl = &d.socket_lb;
    let calls: Vec<String> = sl
        .calls
        .iter()
        .map(|(event, n)| format!("{event} {n}"))
        .collect();
    let _ = writeln!(
        o,
        "\nsocket LB (the node's own clients): {}; calls: {}",
        if sl.programs_attached == sl.programs {
            format!("on ({} programs)", sl.programs)
        } else if sl.programs_attached == 0 {
            "off".to_string()
        } else {
            format!(
                "partly on ({} of {} programs)",
                sl.programs_attached, sl.programs
            )
        },
        calls.join(", ")
    );
    let _ = writeln!(o, "\ndatapath reasons:");
    for (name, c) in &d.reasons {
        if c.packets > 0 {
            let _ = writeln!(
                o,
                "  {name:<26} packets {:<10} bytes {}",
                c.packets, c.bytes
            );
        }
    }
    o
}
