//! Every map of the datapath. All are BTF maps (so `bpftool map dump` prints named
//! fields), named in at most 15 bytes, and pinned by the agent under its pin path.
//! Sizes here are defaults; the agent sets the real ones at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Affinity, AffinityKey, Backend, Config, Counters, CtEntry, CtEvent, FlowKey, FragEntry,
    FragKey, Interface, Layout, MaglevPair, Reason, Service, ServiceKey, ServiceName, SockEvent,
    SockOrigin, SourceRange4, SourceRange6, capacity, hash, maglev_row_elements,
};

use crate::scratch::Scratch;

/// Frontends: (address, port, protocol) of every ClusterIP, LoadBalancer ingress IP,
/// externalIP, and NodePort on every node address.
#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, Service, { capacity::SERVICES as usize }> = HashMap::new();

/// Backends by id.
#[btf_map(name = "backends")]
pub static BACKENDS: Array<Backend, { capacity::BACKENDS as usize }> = Array::new();

/// Maglev lookup tables of every size, two backend ids per element: each
/// Service names where its table starts and how many entries it has
/// (`Service::table`, `table_size`). Memory-mappable so the agent writes whole
/// tables without a syscall per entry.
#[btf_map(name = "maglev")]
pub static MAGLEV: Array<
    MaglevPair,
    { maglev_row_elements(capacity::MAGLEV_ENTRIES) as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Connection tracking: both directions of every translated flow. One common LRU
/// (per-CPU free lists in front of it): `BPF_F_NO_COMMON_LRU` would split the
/// capacity into one share per CPU, so a CPU that gets most new flows (one RX
/// queue, skewed RSS) would evict live flows while the table is mostly empty.
#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry, { capacity::CONNTRACK as usize }, 0> =
    LruHashMap::new();

/// Fragmented datagrams whose first fragment was translated, by the identity
/// every fragment carries (addresses, protocol, IP identification): how the
/// later fragments, which have no ports to find conntrack with, are
/// translated (see `fragment`). An LRU: nothing says when a datagram's last
/// fragment has passed (fragments may come in any order).
#[btf_map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry, { capacity::FRAGMENTS as usize }, 0> =
    LruHashMap::new();

/// sessionAffinity ClientIP: where each client's last new flow to a Service
/// port went (see `service::choose`). Pinned, so affinity outlives restarts;
/// the agent removes a client's entry when its backend leaves the port.
#[btf_map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { capacity::AFFINITY as usize }, 0> =
    LruHashMap::new();

/// loadBalancerSourceRanges: the prefixes allowed per Service port (by id),
/// one trie per family; the value is unused (1).
#[btf_map(name = "src_ranges4")]
pub static SRC_RANGES4: LpmTrie<SourceRange4, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

#[btf_map(name = "src_ranges6")]
pub static SRC_RANGES6: LpmTrie<SourceRange6, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// The cluster's pod CIDRs (with `CFG_F_CLUSTER_CIDRS`): which clients are
/// inside the cluster. The value is unused (1).
#[btf_map(name = "cluster_cidrs4")]
pub static CLUSTER_CIDRS4: LpmTrie<[u8; 4], u32, { capacity::CLUSTER_CIDRS as usize }> =
    LpmTrie::new();

#[btf_map(name = "cluster_cidrs6")]
pub static CLUSTER_CIDRS6: LpmTrie<[u8; 16], u32, { capacity::CLUSTER_CIDRS as usize }> =
    LpmTrie::new();

/// Node facts (index 0).
#[btf_map(name = "config")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Interfaces XDP may redirect to, keyed by ifindex. Anything else goes through
/// the kernel (XDP_PASS) after translation.
#[btf_map(name = "tx_ports")]
pub static TX_PORTS: DevMapHash<{ capacity::TX_PORTS as usize }> = DevMapHash::new();

/// Packets and bytes per service-port id.
#[btf_map(name = "service_stats")]
pub static SERVICE_STATS: PerCpuArray<Counters, { capacity::SERVICE_IDS as usize }> =
    PerCpuArray::new();

/// Packets and bytes per backend id.
#[btf_map(name = "backend_stats")]
pub static BACKEND_STATS: PerCpuArray<Counters, { capacity::BACKENDS as usize }> =
    PerCpuArray::new();

/// Packets and bytes per [`Reason`]: every packet seen is counted once here.
#[btf_map(name = "reasons")]
pub static REASONS: PerCpuArray<Counters, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Names of service ids, for `lb-agent dump` and metrics. The datapath never
/// reads it; it lives here so that it is created, pinned and typed like the rest.
#[btf_map(name = "service_names")]
pub static SERVICE_NAMES: Array<ServiceName, { capacity::SERVICE_IDS as usize }> = Array::new();

/// The interfaces the programs run on, by ifindex, and why (see
/// `lb_common::Interface`). For `bpftool` and dumps; the datapath never reads it.
#[btf_map(name = "interfaces")]
pub static INTERFACES: HashMap<u32, Interface, { capacity::INTERFACES as usize }> = HashMap::new();

/// Bits standing for frontend and backend addresses (see
/// `lb_common::hash::addr_filter_bit`): a packet whose destination is no frontend
/// and whose source is no backend skips the conntrack and service lookups.
#[btf_map(name = "addr_filter")]
pub static ADDR_FILTER: Array<u64, { hash::ADDR_FILTER_WORDS as usize }> = Array::new();

/// The frontend each node-local socket asked for, by socket and backend (see
/// `sock`): what `getpeername` and received datagrams show in place of the
/// backend. An LRU: sockets are not told of when they close.
#[btf_map(name = "sock_origins")]
pub static SOCK_ORIGINS: LruHashMap<
    SockOrigin,
    ServiceKey,
    { capacity::SOCK_ORIGINS as usize },
    0,
> = LruHashMap::new();

/// System calls the socket programs changed or refused, per [`SockEvent`].
#[btf_map(name = "sock_stats")]
pub static SOCK_STATS: PerCpuArray<u64, { SockEvent::COUNT as usize }> = PerCpuArray::new();

/// What the datapath did to `conntrack`, per [`CtEvent`]: with the agent's
/// deletions and the map's count, how many entries the LRU evicted.
#[btf_map(name = "ct_stats")]
pub static CT_STATS: PerCpuArray<u64, { CtEvent::COUNT as usize }> = PerCpuArray::new();

/// When this CPU last logged a dropped flow, and how many it did not log
/// since: drops are logged once a second per CPU at most (a flood of them
/// would otherwise flood the agent's log), with the count of the rest.
#[btf_map(name = "log_limit")]
pub static LOG_LIMIT: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// The layout version of the pinned maps (index 0, see `lb_common::Layout`).
/// The datapath never reads it; it lives here so that it is created, pinned
/// and typed (BTF, for `bpftool`) like the rest.
#[btf_map(name = "layout")]
pub static LAYOUT: Array<Layout, 1> = Array::new();

/// Per-packet working state, kept off the 512-byte BPF stack. Not pinned: it
/// holds nothing between packets.
#[btf_map(name = "scratch")]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[inline(always)]
fn add(counters: Option<*mut Counters>, bytes: u32) {
    if let Some(c) = counters {
        // SAFETY: a per-CPU array slot, written only by this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// Whether to log a dropped flow now: `Some(n)` with the drops not logged
/// since the last one, or None (counted as not logged).
#[inline(always)]
pub fn log_drop_now(now_ns: u64) -> Option<u64> {
    let slot = LOG_LIMIT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    unsafe {
        let [last, skipped] = *slot;
        if last != 0 && now_ns.wrapping_sub(last) < 1_000_000_000 {
            *slot = [last, skipped + 1];
            return None;
        }
        *slot = [now_ns, 0];
        Some(skipped)
    }
}

#[inline(always)]
pub fn count_sock(event: SockEvent) {
    if let Some(c) = SOCK_STATS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU array slot, written only by this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_ct(event: CtEvent) {
    if let Some(c) = CT_STATS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU array slot, written only by this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u32) {
    add(REASONS.get_ptr_mut(reason as u32), bytes);
}

#[inline(always)]
pub fn count_flow(service: u32, backend: u32, bytes: u32) {
    add(SERVICE_STATS.get_ptr_mut(service), bytes);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes);
}
