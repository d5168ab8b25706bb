//! Map layouts shared by the lb datapath and the node agent.
//!
//! Every type here is `#[repr(C)]`, made of integers and byte arrays only, with
//! explicit padding, so that both sides agree on the layout and `bpftool map dump`
//! prints named fields from the map's BTF.
//!
//! Byte order, everywhere in the maps:
//! - addresses are byte arrays in network order; an IPv4 address takes the first
//!   4 bytes of a 16-byte field and the other 12 are zero (`family` says which);
//! - ports and every other integer are in host byte order, so that they read
//!   naturally in a dump (the datapath swaps packet ports once when it builds a key).
#![no_std]

pub mod bench_keys;
pub mod ct_stats;
pub mod hash;
pub mod reason;
pub mod sock;

pub use ct_stats::CtEvent;
pub use reason::Reason;
pub use sock::{SockEvent, SockOrigin};

/// `family` value of an IPv4 entry.
pub const FAMILY_V4: u8 = 4;
/// `family` value of an IPv6 entry.
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Names of the pinned maps, as the datapath declares them (at most 15 bytes: the
/// kernel cuts map names there). The agent pins each under `<pin-path>/<name>`.
pub mod map_names {
    pub const SERVICES: &str = "services";
    pub const BACKENDS: &str = "backends";
    pub const MAGLEV: &str = "maglev";
    pub const CONNTRACK: &str = "conntrack";
    pub const CONFIG: &str = "config";
    pub const TX_PORTS: &str = "tx_ports";
    pub const SERVICE_STATS: &str = "service_stats";
    pub const BACKEND_STATS: &str = "backend_stats";
    pub const REASONS: &str = "reasons";
    pub const SERVICE_NAMES: &str = "service_names";
    pub const ADDR_FILTER: &str = "addr_filter";
    pub const INTERFACES: &str = "interfaces";
    pub const SOCK_ORIGINS: &str = "sock_origins";
    pub const SOCK_STATS: &str = "sock_stats";
    pub const AFFINITY: &str = "affinity";
    pub const SRC_RANGES4: &str = "src_ranges4";
    pub const SRC_RANGES6: &str = "src_ranges6";
    pub const CLUSTER_CIDRS4: &str = "cluster_cidrs4";
    pub const CLUSTER_CIDRS6: &str = "cluster_cidrs6";
    pub const FRAGMENTS: &str = "fragments";
    pub const CT_STATS: &str = "ct_stats";
    /// The layout version of the pinned maps (see [`super::Layout`]).
    pub const LAYOUT: &str = "layout";
    /// Every map the agent pins, in dump order.
    pub const ALL: [&str; 22] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        CONFIG,
        TX_PORTS,
        SERVICE_STATS,
        BACKEND_STATS,
        REASONS,
        SERVICE_NAMES,
        ADDR_FILTER,
        INTERFACES,
        SOCK_ORIGINS,
        SOCK_STATS,
        AFFINITY,
        SRC_RANGES4,
        SRC_RANGES6,
        CLUSTER_CIDRS4,
        CLUSTER_CIDRS6,
        FRAGMENTS,
        CT_STATS,
        LAYOUT,
    ];
}

/// The layout of the maps this build creates: bumped whenever a pinned map's
/// key or value changes size or meaning (a field added, a flag or a field's
/// unit changed), so that an agent never reads a map pinned by another build
/// as its own without knowing what it holds.
///
/// - 1: the first release's maps (no `layout` map was pinned then): a
///   conntrack value of 56 bytes, without `ingress`, and without the
///   `CT_F_REPLIED` / `CT_F_ACKED` bits; no `fragments` map.
/// - 2: [`CtEntry`] gained `ingress` (64 bytes) and the confirmation bits;
///   `fragments` and `layout` were added.
/// - 3: Maglev tables are sized per Service port: [`Service::table`] and
///   `cluster_table` became element offsets into `maglev` (they were row
///   numbers of one table size, [`Config::maglev_size`]), and
///   [`Service::table_size`] took the place of `_reserved`. `maglev` became
///   an element budget (`--maglev-entries`) instead of rows.
pub const LAYOUT_VERSION: u32 = 3;

/// The maps of layout version 1 that differ from this build's: what an
/// upgrade converts from (lb-agent's `bpf::migrate`) and what a test builds
/// a previous release's pin set with.
pub mod v1 {
    /// Layout 1's `conntrack` value: [`super::CtEntry`] without `ingress`
    /// (56 bytes), whose flags never carried `CT_F_REPLIED` / `CT_F_ACKED`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct CtEntry {
        pub nat_src: [u8; 16],
        pub nat_dst: [u8; 16],
        pub nat_src_port: u16,
        pub nat_dst_port: u16,
        pub backend: u32,
        pub service: u32,
        pub flags: u16,
        pub _pad: u16,
        pub last_seen_ns: u64,
    }
}

/// The maps of layout version 2 (and 1) that differ from this build's.
pub mod v2 {
    /// Layout 2's `services` value: `table` and `cluster_table` are rows of
    /// `Config::maglev_size` entries (row `r` starts at element
    /// `r * maglev_row_elements(maglev_size)`), and the last field is unused.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Service {
        pub id: u32,
        pub table: u32,
        pub backend_count: u32,
        pub flags: u32,
        pub affinity_timeout: u32,
        pub cluster_table: u32,
        pub cluster_backend_count: u32,
        pub _reserved: u32,
    }
}

/// The single entry (index 0) of `layout`: what the pinned maps are, written
/// by the agent that created them (the datapath never reads it). `bpftool
/// map dump pinned <pin-path>/layout` shows it by name.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Layout {
    /// [`LAYOUT_VERSION`] of the agent that created (or migrated) the maps.
    pub version: u32,
    /// The size of a conntrack value (`CtEntry`) in that layout, for a
    /// reader that knows no version numbers.
    pub conntrack_value_size: u32,
    /// Conntrack entries the pinned map was created with (`--conntrack-size`).
    pub conntrack_entries: u32,
    /// How many times these maps were migrated to a new layout or size
    /// (0: as first created).
    pub migrations: u32,
    /// Wall-clock seconds (UNIX time) when the maps took this layout.
    pub since_unix_s: u64,
}

/// Default capacities; the agent can override them at load time.
pub mod capacity {
    /// Frontends (`services` entries: VIP, NodePort, LoadBalancer and externalIP keys).
    pub const SERVICES: u32 = 65_536;
    /// Service ids (per-service counters) and Maglev rows.
    pub const SERVICE_IDS: u32 = 1_024;
    /// Backend slots.
    pub const BACKENDS: u32 = 65_536;
    /// Maglev entries (4 bytes each) shared by every Service port's tables,
    /// each sized from its backend count: 64 MiB, room for 4,096 tables of
    /// 4,093 entries (2 to 7 backends) or 256 of 65,521 (101 to 6,552).
    pub const MAGLEV_ENTRIES: u32 = 1 << 24;
    /// Connection-tracking entries, one per direction of a flow (preallocated by the
    /// kernel: about 150 bytes each).
    pub const CONNTRACK: u32 = 524_288;
    /// Interfaces the XDP program may redirect to.
    pub const TX_PORTS: u32 = 256;
    /// Interfaces the programs run on (`interfaces` entries): uplinks, pod
    /// veths, tunnels and other NICs.
    pub const INTERFACES: u32 = 16_384;
    /// Sockets of the node's own clients and the backends they were sent to
    /// (`sock_origins`, an LRU: one entry per connected socket or per
    /// unconnected UDP socket and backend, about 100 bytes each).
    pub const SOCK_ORIGINS: u32 = 65_536;
    /// Clients of Service ports with sessionAffinity ClientIP (`affinity`,
    /// an LRU: about 100 bytes each).
    pub const AFFINITY: u32 = 65_536;
    /// loadBalancerSourceRanges prefixes, per family, over all Service ports.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Cluster (pod) CIDRs, per family.
    pub const CLUSTER_CIDRS: u32 = 1_024;
    /// Fragmented datagrams being translated (`fragments`, an LRU: one entry
    /// per datagram whose first fragment was translated, about 150 bytes
    /// each, as conntrack's). An entry is needed only until the datagram's
    /// last fragment has passed, milliseconds on a working path, so 8,192
    /// hold every datagram in flight at thousands of fragmented datagrams a
    /// second.
    pub const FRAGMENTS: u32 = 8_192;
}

/// Key of `services`: one frontend of a Service port.
///
/// A ClusterIP, each LoadBalancer ingress IP, each externalIP and, for NodePorts,
/// each node address gets its own key; all keys of one Service port share a
/// [`Service`] value (same `id`), or differ only where a traffic policy makes them.
///
/// (Address fields of every map type are 8-byte aligned, so the datapath copies
/// them as two 8-byte words.)
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (network order; IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Frontend port (host order).
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Always zero (hash keys compare every byte).
    pub _pad: [u8; 4],
}

/// Source-NAT flows that go to a backend on another node, so that replies come
/// back through this node (NodePort / LoadBalancer / externalIP with
/// externalTrafficPolicy Cluster).
pub const SVC_F_SNAT_REMOTE: u32 = 1 << 0;
/// The frontend is reached from outside the cluster (NodePort, LoadBalancer ingress
/// IP, externalIP): the scope where externalTrafficPolicy and source ranges apply.
pub const SVC_F_EXTERNAL: u32 = 1 << 1;
/// sessionAffinity ClientIP: a client's new flows go where its last one went
/// (`affinity` map), for `affinity_timeout` seconds after it.
pub const SVC_F_AFFINITY: u32 = 1 << 2;
/// loadBalancerSourceRanges: only clients in the Service port's prefixes
/// (`src_ranges4` / `src_ranges6`, by `id`) get new flows; others are dropped.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 3;
/// The table holds terminating (serving) endpoints only: none was ready.
pub const SVC_F_TERMINATING_FALLBACK: u32 = 1 << 4;
/// An address-level entry (port 0, protocol 0): the address is a ClusterIP, so
/// packets to it on a port that is no Service port are refused, as kube-proxy does.
pub const SVC_F_ADDRESS: u32 = 1 << 5;
/// A Local traffic policy applies: `table` holds this node's endpoints only,
/// and without any a new flow is dropped (as kube-proxy drops it), not
/// refused. For an external frontend (externalTrafficPolicy Local), clients
/// inside the cluster (sources in the cluster CIDRs, the node's own sockets)
/// use `cluster_table` instead, as kube-proxy sends them cluster-wide.
pub const SVC_F_LOCAL: u32 = 1 << 6;

/// Value of `services`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service {
    /// Service-port id: index into `service_stats` (and the scope of affinity and
    /// source-range entries). Shared by every frontend of the Service port.
    pub id: u32,
    /// First element of the frontend's Maglev table in `maglev` (see
    /// [`MaglevPair`]). Frontends of one Service port share a table unless a
    /// traffic policy (Local) gives them their own.
    pub table: u32,
    /// Usable backends in the row; 0 means the service exists but has none, and
    /// new connections are refused (TCP RST / ICMP port unreachable).
    pub backend_count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (with `SVC_F_AFFINITY`).
    pub affinity_timeout: u32,
    /// With `SVC_F_LOCAL` on an external frontend: the table (and its usable
    /// backends) over every endpoint, for clients inside the cluster.
    pub cluster_table: u32,
    pub cluster_backend_count: u32,
    /// Entries of `table` and of `cluster_table` (a prime, or 1 for a single
    /// backend), chosen from the Service port's backend count
    /// (lb-agent's `maglev::table_size_for`); 0 with no table.
    pub table_size: u32,
}

/// Value of `maglev`: two consecutive entries of a Maglev row (backend ids).
///
/// BPF arrays store values at an 8-byte stride, so two 4-byte ids share an element
/// to use all the memory. A table of M entries (`Service::table_size`) starting
/// at element `t` (`Service::table`) takes `maglev_row_elements(M)` elements;
/// entry `j` is lane `j % 2` of element `t + j / 2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevPair {
    pub ids: [u32; 2],
}

/// Elements of `maglev` a table of `maglev_size` entries takes.
pub const fn maglev_row_elements(maglev_size: u32) -> u32 {
    maglev_size.div_ceil(2)
}

/// The slot holds a backend (an all-zero slot is free).
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;
/// The backend runs on this node (no source NAT needed to get its replies).
pub const BACKEND_F_LOCAL: u8 = 1 << 1;
/// The endpoint is terminating (used only when no ready endpoint exists).
pub const BACKEND_F_TERMINATING: u8 = 1 << 2;

/// Value of `backends` (an array indexed by backend id).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Pod address (network order; IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Target port (host order).
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 4],
}

impl Backend {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_F_ACTIVE != 0
    }
}

/// Key of `conntrack`: a flow's 5-tuple as seen on the wire in one direction.
/// (8-byte aligned so the datapath copies and clears it in whole words.)
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address (network order; IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (host order).
    pub src_port: u16,
    /// Destination port (host order).
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The entry translates the client-to-service direction (destination NAT to a backend).
pub const CT_F_FORWARD: u16 = 1 << 0;
/// The entry translates the backend-to-client direction (source back to the frontend).
pub const CT_F_REPLY: u16 = 1 << 1;
/// The flow is also source-NATed to this node's address and an allocated port.
pub const CT_F_SNAT: u16 = 1 << 2;
/// A TCP FIN or RST was seen: the flow is closing and its SNAT port may be reused soon.
pub const CT_F_CLOSING: u16 = 1 << 3;
/// Hairpin: a pod reached its own Service and landed on itself; the flow is
/// source-NATed to the frontend address (keeping the client port), because a
/// packet from its own address would be dropped by the pod as martian.
pub const CT_F_HAIRPIN: u16 = 1 << 4;
/// The backend has answered: a packet hit the flow's reply entry (set on the
/// reply entry, and once on the forward entry too, so that each entry tells
/// its flow's state on its own).
pub const CT_F_REPLIED: u16 = 1 << 5;
/// TCP: the client has acknowledged: a packet with ACK and without SYN hit
/// the forward entry (the third packet of the handshake, or anything after).
pub const CT_F_ACKED: u16 = 1 << 6;

/// Value of `conntrack`: the addresses and ports to write into a packet of this flow.
///
/// The datapath rewrites the packet's 4-tuple to `nat_*` exactly; fields that do
/// not change are stored with their current value. Forward entries point at the
/// backend, reply entries at the frontend the client dialed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub nat_src: [u8; 16],
    pub nat_dst: [u8; 16],
    pub nat_src_port: u16,
    pub nat_dst_port: u16,
    /// Backend id chosen for the flow (index into `backends`).
    pub backend: u32,
    /// Service-port id (index into `service_stats`).
    pub service: u32,
    /// `CT_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_coarse_ns` when the flow was last seen, refreshed at most
    /// every [`CT_REFRESH_NS`].
    pub last_seen_ns: u64,
    /// Where packets this entry translates may arrive: [`CT_INGRESS_ANY`],
    /// [`CT_INGRESS_NETWORK`], [`CT_INGRESS_PODS`] or one interface's
    /// ifindex (see [`CT_INGRESS_ANY`] for the rule).
    pub ingress: u32,
    pub _pad2: u32,
}

/// [`CtEntry::ingress`] of a forward entry: a client's packets may arrive
/// anywhere (from a pod, from the network on any uplink or tunnel). A
/// packet that takes a forward entry only goes where a new flow of its tuple
/// would go anyway.
///
/// The rule for reply entries, which translate a backend's packets into the
/// frontend's (and so would let anyone who can send a reply-shaped packet
/// speak as the Service):
/// - a backend on this node answers from its pod, so its replies must arrive
///   on the interface the flow's forward packets were routed out of, the
///   pod's veth (tc runs on its host side): that ifindex exactly. Where that
///   interface is not a pod interface (pods behind a bridge, where the route
///   names the bridge but the pod's packets arrive on its veth, a bridge
///   port) or not known (routed by the kernel, an entry migrated from a
///   layout without the field), any pod interface: [`CT_INGRESS_PODS`];
/// - a backend on another node answers from the network: XDP on an uplink, or
///   tc on any interface that is no pod's (uplinks, overlay tunnels, second
///   NICs): [`CT_INGRESS_NETWORK`]. Not the interface its forward packets
///   left by: with ECMP routes, several uplinks or asymmetric routing, a
///   reply may come back on any of them, as the kernel's loose reverse-path
///   filter allows.
///
/// A packet that finds its entry but arrived elsewhere is not translated:
/// it is passed on untouched (`pass_wrong_side`), so that the kernel's
/// reverse-path filter and routing decide about it as if lb were not there,
/// and it does not refresh or change its flow's entry.
pub const CT_INGRESS_ANY: u32 = 0;
/// [`CtEntry::ingress`]: from the network, any interface that is not a pod's.
pub const CT_INGRESS_NETWORK: u32 = u32::MAX;
/// [`CtEntry::ingress`]: any pod interface (role `iface::ROLE_POD`).
pub const CT_INGRESS_PODS: u32 = u32::MAX - 1;

impl CtEntry {
    /// The key of the other entry of this entry's flow (of protocol `proto`,
    /// family `family`): the tuple this direction leaves with (`nat_*`),
    /// reversed. For a forward entry that is the reply entry inserted with
    /// it, in all three shapes the datapath writes: plain (`nat_src` is the
    /// client), source-NATed (`nat_src` is the node's address and the claimed
    /// port) and hairpin (`nat_src` is the frontend address with the client's
    /// port). For a reply entry it is the client's tuple, its forward entry's
    /// key. Addresses are copied whole, so an IPv4 key keeps its 12 zero bytes.
    #[inline(always)]
    pub fn partner_key(&self, proto: u8, family: u8) -> FlowKey {
        FlowKey {
            src: self.nat_dst,
            dst: self.nat_src,
            src_port: self.nat_dst_port,
            dst_port: self.nat_src_port,
            proto,
            family,
            _pad: [0; 2],
        }
    }
}

/// How stale `last_seen_ns` may get before a packet refreshes it.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// How long a flow may stay idle before it expires: the agent's conntrack
/// sweep deletes it, and its source-NAT port may go to another flow.
///
/// - Unconfirmed (a TCP flow whose handshake never completed: the client
///   never acknowledged the backend's SYN-ACK, or a UDP flow the backend never
///   answered): 5 s, counted from the client's last packet. Spoofed SYNs are
///   exactly this: they hold entries and ports for seconds, not hours. (The
///   kernel's SYN_SENT is 120 s; its NAT can evict unassured entries early
///   under pressure, which an LRU cannot do selectively.) A real client that
///   waits longer than that between retransmitted SYNs opens its flow afresh.
/// - Closing (TCP FIN or RST seen): 10 s.
/// - Established TCP: 24 h, kube-proxy's `--conntrack-tcp-timeout-established`
///   default (longer than Linux's 2 h keepalive, so idle pooled connections
///   with keepalives live on).
/// - Answered UDP: 60 s.
pub const CT_UNCONFIRMED_NS: u64 = 5_000_000_000;
pub const CT_CLOSING_NS: u64 = 10_000_000_000;
pub const CT_TCP_ESTABLISHED_NS: u64 = 86_400_000_000_000;
pub const CT_UDP_NS: u64 = 60_000_000_000;

/// Whether a flow whose entries carry `flags` (one entry's, or both ORed) is
/// confirmed: answered by the backend, and for TCP acknowledged by the client.
#[inline(always)]
pub fn ct_confirmed(flags: u16, proto: u8) -> bool {
    let need = if proto == PROTO_TCP {
        CT_F_REPLIED | CT_F_ACKED
    } else {
        CT_F_REPLIED
    };
    flags & need == need
}

/// How long a flow with `flags` may be idle (see [`CT_UNCONFIRMED_NS`]).
#[inline(always)]
pub fn ct_idle_limit_ns(flags: u16, proto: u8) -> u64 {
    if !ct_confirmed(flags, proto) {
        CT_UNCONFIRMED_NS
    } else if flags & CT_F_CLOSING != 0 {
        CT_CLOSING_NS
    } else if proto == PROTO_TCP {
        CT_TCP_ESTABLISHED_NS
    } else {
        CT_UDP_NS
    }
}

/// Whether a flow has expired at `now`: `flags` are its entries' bits ORed,
/// `client_seen` the last use of its forward entry (None: it is gone) and
/// `reply_seen` of its reply entry (None: gone). An unconfirmed flow counts
/// only the client's packets (a backend retransmitting its SYN-ACK to a
/// spoofed client must not keep the flow); a confirmed one either side's.
/// A time of 0 is an entry written before entries carried times: it is taken
/// as just seen (the next packet stamps it).
#[inline(always)]
pub fn ct_expired(
    flags: u16,
    proto: u8,
    client_seen: Option<u64>,
    reply_seen: Option<u64>,
    now: u64,
) -> bool {
    let last = match (client_seen, reply_seen) {
        (Some(c), Some(r)) if ct_confirmed(flags, proto) => {
            if c > r {
                c
            } else {
                r
            }
        }
        (Some(c), _) => c,
        (None, Some(r)) => r,
        (None, None) => return true,
    };
    if last == 0 {
        return false;
    }
    // Saturating: another CPU may have stamped the entry a tick after `now`.
    now.saturating_sub(last) >= ct_idle_limit_ns(flags, proto)
}

/// Key of `fragments`: one fragmented IP datagram, as its fragments carry it
/// (the IP header alone identifies a fragment: only the first holds the ports).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// Source address (network order; IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// The datagram's identification (host order): IPv4's 16-bit
    /// Identification field, IPv6's 32-bit Fragment header identification.
    pub id: u32,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of `fragments`: how the datagram's first fragment was translated
/// (its conntrack entry's tuple), so that the later ones, which carry no
/// ports to look conntrack up with, get the same addresses and go the same
/// way.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragEntry {
    /// The addresses the first fragment left with: written into every later
    /// fragment.
    pub nat_src: [u8; 16],
    pub nat_dst: [u8; 16],
    /// The ports it left with (in the first fragment only): the later
    /// fragments' route lookup uses them, so that it finds the first's route.
    pub nat_src_port: u16,
    pub nat_dst_port: u16,
    /// Backend and service-port ids (for `backend_stats`, `service_stats`).
    pub backend: u32,
    pub service: u32,
    /// Where the later fragments may arrive: the first fragment's conntrack
    /// entry's [`CtEntry::ingress`] (the same rule applies to them).
    pub ingress: u32,
    /// `bpf_ktime_get_coarse_ns` when the first fragment was translated: an
    /// entry older than [`FRAG_TIMEOUT_NS`] is not used (see there).
    pub first_ns: u64,
}

/// How long after its first fragment a datagram's later fragments are
/// translated: Linux's reassembly timeout (`ipfrag_time`, 30 s). A receiver
/// has dropped the datagram by then; an older entry can only belong to an
/// earlier datagram whose identification the sender has since reused.
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// Value of `service_names` (indexed by service id): which Service port an id is,
/// as `namespace/name:port-name/proto/family`, NUL-padded. The datapath never
/// reads it; it lets `lb-agent dump` and metrics name ids without the agent's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub name: [u8; 128],
}

impl Default for ServiceName {
    fn default() -> Self {
        Self { name: [0; 128] }
    }
}

impl ServiceName {
    /// Stores `s`, cut to 127 bytes on a character boundary.
    pub fn new(s: &str) -> Self {
        let mut n = Self::default();
        let mut end = s.len().min(127);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        n.name[..end].copy_from_slice(&s.as_bytes()[..end]);
        n
    }

    pub fn as_str(&self) -> &str {
        let len = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}

/// Value of `interfaces` (keyed by ifindex): an interface the programs run on,
/// which ones, and for an uplink why. Written by the agent for `bpftool` and
/// `lb-agent dump`; the datapath never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Interface {
    /// The interface's name, NUL-padded.
    pub name: [u8; 16],
    /// [`iface::ROLE_UPLINK`], [`iface::ROLE_POD`] or [`iface::ROLE_OTHER`].
    pub role: u32,
    /// [`iface::HOOK_XDP`] and/or [`iface::HOOK_TC`]: the programs attached.
    pub hooks: u32,
    /// An uplink's `iface::WHY_*`: why it runs the hooks it runs.
    pub why: u32,
    pub _pad: u32,
}

impl Interface {
    pub fn name(&self) -> &str {
        let len = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}

/// Codes of [`Interface`]'s fields.
pub mod iface {
    /// Holds a node address: Service traffic from outside arrives here.
    pub const ROLE_UPLINK: u32 = 1;
    /// The host side of a pod veth: traffic from local pods.
    pub const ROLE_POD: u32 = 2;
    /// Any other interface (overlay tunnels, other NICs): replies and
    /// forwarded traffic may arrive here.
    pub const ROLE_OTHER: u32 = 3;

    pub const HOOK_XDP: u32 = 1;
    pub const HOOK_TC: u32 = 2;

    /// Not an uplink.
    pub const WHY_NONE: u32 = 0;
    /// `--uplink-hook xdp`.
    pub const WHY_XDP_ASKED: u32 = 1;
    /// `auto`: a device with native XDP (a NIC's driver).
    pub const WHY_XDP_NATIVE: u32 = 2;
    /// `--uplink-hook tc`.
    pub const WHY_TC_ASKED: u32 = 3;
    /// `auto`: a virtual device (veth and the like): its peer may hand over
    /// partial checksums, and drops XDP transmits unless it runs XDP itself.
    pub const WHY_TC_VIRTUAL: u32 = 4;
    /// XDP would not attach in native mode (no driver support, an MTU too
    /// large for it, ...): served through tc instead.
    pub const WHY_TC_XDP_REFUSED: u32 = 5;

    pub const fn role_name(role: u32) -> &'static str {
        match role {
            ROLE_UPLINK => "uplink",
            ROLE_POD => "pod",
            ROLE_OTHER => "other",
            _ => "unknown",
        }
    }

    pub const fn why_text(why: u32) -> &'static str {
        match why {
            WHY_NONE => "",
            WHY_XDP_ASKED => "xdp: asked for (--uplink-hook xdp)",
            WHY_XDP_NATIVE => "xdp: the driver runs XDP natively",
            WHY_TC_ASKED => "tc: asked for (--uplink-hook tc)",
            WHY_TC_VIRTUAL => {
                "tc: a virtual link (its peer may hand over partial checksums and drops XDP \
                 transmits unless it runs XDP itself)"
            }
            WHY_TC_XDP_REFUSED => "tc: native XDP would not attach (see the agent's log)",
            _ => "unknown",
        }
    }
}

/// Key of `affinity`: a client of a Service port with sessionAffinity
/// ClientIP.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client address (network order; IPv4 in the first 4 bytes).
    pub client: [u8; 16],
    /// Service-port id.
    pub service: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of `affinity`: where the client's last new flow went, and when.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity {
    /// The backend's address and port: the id is used only while its slot
    /// still holds them (ids are reused, later, for other endpoints).
    pub addr: [u8; 16],
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow (kube-proxy
    /// counts the timeout from each new connection, not from each packet).
    pub last_ns: u64,
    /// Backend id.
    pub backend: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Data of a `src_ranges4` key (after the LPM prefix length): a Service
/// port's id, big-endian so that the whole id is matched before the
/// address, and an IPv4 prefix. An entry of prefix length 32 + n allows the
/// clients in that /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRange4 {
    pub service: [u8; 4],
    pub addr: [u8; 4],
}

/// Data of a `src_ranges6` key: as [`SourceRange4`], for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRange6 {
    pub service: [u8; 4],
    pub addr: [u8; 16],
}

/// Per-service, per-backend and per-reason counters (per-CPU maps: sum over CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// `config` flag: `snat_addr_v4` holds this node's IPv4 address for source NAT.
pub const CFG_F_SNAT_V4: u32 = 1 << 0;
/// `config` flag: `snat_addr_v6` holds this node's IPv6 address for source NAT.
pub const CFG_F_SNAT_V6: u32 = 1 << 1;
/// `config` flag: `cluster_cidrs4` / `cluster_cidrs6` hold the cluster's pod
/// CIDRs, so the datapath can tell clients inside the cluster from outside
/// ones (kube-proxy's detect-local by cluster CIDR). Without it, no client
/// counts as inside (no short cut for externalTrafficPolicy Local) and none
/// as outside (no masquerade to ClusterIPs).
pub const CFG_F_CLUSTER_CIDRS: u32 = 1 << 2;

/// The single entry (index 0) of `config`: node facts the datapath needs.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Layout 2's single Maglev table size, which its programs read per
    /// packet. Layout 3's datapath reads each Service's `table_size` instead;
    /// its agent keeps what it finds here, so that layout-2 programs still
    /// serving during an upgrade read their rows right (0 in a datapath
    /// created by layout 3).
    pub maglev_size: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// Address source-NATed flows leave this node with (IPv4, network order).
    pub snat_addr_v4: [u8; 4],
    /// First and last port of the source-NAT range (host order, inclusive).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Address source-NATed flows leave this node with (IPv6).
    pub snat_addr_v6: [u8; 16],
}

/// The widest source-NAT port range: the one Linux's masquerade picks from
/// (every port from 1024). The agent's default is the part of it outside the
/// node's ephemeral ports (see lb-agent's `snat_ports`); a port a local socket
/// holds for a backend, or listens on, is never claimed for that backend.
pub const SNAT_PORT_MIN: u16 = 1_024;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Conversions between socket addresses and the map fields (userspace only:
/// the agent, its tests and the benchmark build every key the same way).
#[cfg(feature = "user")]
mod sockets {
    use core::net::{IpAddr, SocketAddr};

    use super::{Backend, FAMILY_V4, FAMILY_V6, FlowKey};

    /// An address as the maps hold it: 16 bytes in network order (IPv4 in the
    /// first 4), and its `FAMILY_*`.
    pub fn addr16(ip: IpAddr) -> ([u8; 16], u8) {
        let mut a = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => {
                a[..4].copy_from_slice(&v4.octets());
                (a, FAMILY_V4)
            }
            IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
        }
    }

    /// The socket address of map fields; `None` for an unknown family.
    pub fn socket_addr(addr: &[u8; 16], family: u8, port: u16) -> Option<SocketAddr> {
        let ip = match family {
            FAMILY_V4 => IpAddr::from([addr[0], addr[1], addr[2], addr[3]]),
            FAMILY_V6 => IpAddr::from(*addr),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    impl FlowKey {
        /// The key of packets from `src` to `dst` (same family) with `proto`.
        pub fn new(src: SocketAddr, dst: SocketAddr, proto: u8) -> Self {
            let (s, family) = addr16(src.ip());
            let (d, _) = addr16(dst.ip());
            Self {
                src: s,
                dst: d,
                src_port: src.port(),
                dst_port: dst.port(),
                proto,
                family,
                _pad: [0; 2],
            }
        }
    }

    impl Backend {
        /// The backend at `addr` with `BACKEND_F_*` `flags`.
        pub fn new(addr: SocketAddr, flags: u8) -> Self {
            let (a, family) = addr16(addr.ip());
            Self {
                addr: a,
                port: addr.port(),
                family,
                flags,
                _pad: [0; 4],
            }
        }
    }
}

#[cfg(feature = "user")]
pub use sockets::{addr16, socket_addr};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding the compiler may leave
    // uninitialised (padding is explicit), and is valid for any bit pattern.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::bench_keys::FlowKey4 {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::MaglevPair {}
    unsafe impl aya::Pod for super::ServiceName {}
    unsafe impl aya::Pod for super::Interface {}
    unsafe impl aya::Pod for super::SockOrigin {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::SourceRange4 {}
    unsafe impl aya::Pod for super::SourceRange6 {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
    unsafe impl aya::Pod for super::Layout {}
    unsafe impl aya::Pod for super::v1::CtEntry {}
    unsafe impl aya::Pod for super::v2::Service {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn flows_expire_by_state_and_unconfirmed_ones_by_the_clients_packets_only() {
        use super::*;
        const S: u64 = 1_000_000_000;
        let t0 = 1_000 * S;
        let syn_only = CT_F_FORWARD | CT_F_REPLIED;
        let established = CT_F_FORWARD | CT_F_REPLIED | CT_F_ACKED;
        assert!(!ct_confirmed(syn_only, PROTO_TCP), "answered, never acked");
        assert!(ct_confirmed(established, PROTO_TCP));
        assert!(
            ct_confirmed(CT_F_REPLIED, PROTO_UDP),
            "UDP needs an answer only"
        );
        assert!(!ct_confirmed(CT_F_ACKED, PROTO_UDP));
        // A spoofed SYN: the backend's SYN-ACK retransmissions keep the reply
        // entry fresh, but only the client's side counts.
        let e =
            |flags, c: Option<u64>, r: Option<u64>, now| ct_expired(flags, PROTO_TCP, c, r, now);
        assert!(!e(syn_only, Some(t0), Some(t0 + 4 * S), t0 + 4 * S));
        assert!(e(syn_only, Some(t0), Some(t0 + 4 * S), t0 + 5 * S));
        // Established: either side keeps it, for a day.
        assert!(!e(
            established,
            Some(t0),
            Some(t0 + 3600 * S),
            t0 + 86_400 * S
        ));
        assert!(e(established, Some(t0), Some(t0), t0 + 86_400 * S));
        assert!(!e(established, Some(t0), Some(t0), t0 + 86_399 * S));
        // Closing: 10 s.
        assert!(e(
            established | CT_F_CLOSING,
            Some(t0),
            Some(t0),
            t0 + 10 * S
        ));
        assert!(!e(
            established | CT_F_CLOSING,
            Some(t0),
            Some(t0),
            t0 + 9 * S
        ));
        // Answered UDP: 60 s; unanswered: 5 s.
        assert!(!ct_expired(
            CT_F_REPLIED,
            PROTO_UDP,
            Some(t0),
            None,
            t0 + 59 * S
        ));
        assert!(ct_expired(
            CT_F_REPLIED,
            PROTO_UDP,
            Some(t0),
            None,
            t0 + 60 * S
        ));
        assert!(ct_expired(
            CT_F_FORWARD,
            PROTO_UDP,
            Some(t0),
            None,
            t0 + 5 * S
        ));
        // Only one entry left: its own time; none: expired; an unstamped
        // entry (written before entries carried times): not expired.
        assert!(!e(syn_only, None, Some(t0), t0 + 4 * S));
        assert!(e(0, None, None, t0));
        assert!(!e(syn_only, Some(0), None, t0));
        // A stamp a tick ahead of `now` (another CPU): not expired.
        assert!(!e(syn_only, Some(t0 + 1), None, t0));
    }

    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<Service>(), 8 * 4);
        assert_eq!(size_of::<Backend>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(
            size_of::<CtEntry>(),
            16 + 16 + 2 + 2 + 4 + 4 + 2 + 2 + 8 + 4 + 4
        );
        assert_eq!(size_of::<Counters>(), 16);
        assert_eq!(size_of::<Config>(), 4 + 4 + 4 + 2 + 2 + 16);
        assert_eq!(size_of::<Interface>(), 16 + 4 * 4);
        assert_eq!(size_of::<SockOrigin>(), 8 + 16 + 2 + 1 + 5);
        assert_eq!(size_of::<AffinityKey>(), 16 + 4 + 1 + 3);
        assert_eq!(size_of::<Affinity>(), 16 + 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SourceRange4>(), 8);
        assert_eq!(size_of::<SourceRange6>(), 20);
        assert_eq!(size_of::<FragKey>(), 16 + 16 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<FragEntry>(), 16 + 16 + 2 + 2 + 4 + 4 + 4 + 8);
        assert_eq!(size_of::<Layout>(), 4 * 4 + 8);
        assert_eq!(
            size_of::<v1::CtEntry>(),
            16 + 16 + 2 + 2 + 4 + 4 + 2 + 2 + 8
        );
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}
