//! Typed handles to the datapath's maps.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, xdp::DevMapHash},
};
use lb_common::{Backend, Config, Counters, CtEntry, FlowKey, Service, ServiceKey, map_names};

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pub config: Array<MapData, Config>,
    pub tx_ports: DevMapHash<MapData>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, Counters>,
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the datapath object has no map {name} (or it was taken)"))
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected type", $name))?
    };
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: typed!(ebpf, map_names::SERVICES),
            backends: typed!(ebpf, map_names::BACKENDS),
            maglev: typed!(ebpf, map_names::MAGLEV),
            conntrack: typed!(ebpf, map_names::CONNTRACK),
            config: typed!(ebpf, map_names::CONFIG),
            tx_ports: typed!(ebpf, map_names::TX_PORTS),
            service_stats: typed!(ebpf, map_names::SERVICE_STATS),
            backend_stats: typed!(ebpf, map_names::BACKEND_STATS),
            reasons: typed!(ebpf, map_names::REASONS),
        })
    }
}
