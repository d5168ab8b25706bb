//! The per-packet state, below every stage: the headers as parsed (and, after
//! translation, as translated), and the working set the stages share, kept in
//! the per-CPU `scratch` map (see `maps::SCRATCH`) rather than on the 512-byte
//! BPF stack. Plain data: it imports nothing of the datapath, so every stage
//! and the maps can use it without an import circle.

use aya_ebpf::bindings::{bpf_fib_lookup, bpf_sock_tuple};
use lb_common::{CtEntry, FAMILY_V4, FlowKey, FragEntry, FragKey, PROTO_TCP, PROTO_UDP, Service};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// [`Headers::frag`]: a whole datagram (no fragment, or an IPv6 atomic fragment).
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (offset 0, more fragments): it holds the
/// L4 header, and is translated as a whole datagram would be.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset > 0): IP header and data, no ports.
pub const FRAG_LATER: u8 = 2;

/// Where the headers are and what the 5-tuple is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Headers {
    /// 5-tuple as on the wire (ports in host order).
    pub key: FlowKey,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    /// IP total length (IPv4 `tot_len`, IPv6 payload length + 40), host order.
    pub ip_len: u16,
    /// TCP flags, ICMP type for ICMP, 0 for UDP.
    pub flags: u8,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`]. For a later fragment
    /// `key` has no ports and `l4` is where its data starts.
    pub frag: u8,
    /// A fragment's datagram identification (IPv4: 16 bits, IPv6: 32), host order.
    pub frag_id: u32,
}

impl Headers {
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.key.family == FAMILY_V4
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum(&self) -> usize {
        match self.key.proto {
            PROTO_TCP => self.l4 + 16,
            PROTO_UDP => self.l4 + 6,
            _ => self.l4 + 2,
        }
    }
}

/// Per-packet working state (a per-CPU map value, not stack: see `maps::SCRATCH`).
#[repr(C)]
pub struct Scratch {
    /// The packet's headers; after translation, as translated.
    pub h: Headers,
    /// The conntrack entry in use (found, or being created: forward direction).
    pub entry: CtEntry,
    /// A reply entry being created.
    pub reply: CtEntry,
    /// A second flow key: the reply key of a new flow, the reverse of a quoted flow.
    pub key: FlowKey,
    /// The tuple a packet leaves with once translated (what it is forwarded to).
    pub out: FlowKey,
    /// ICMP errors: the quoted packet.
    pub quoted: Headers,
    /// The service a new flow is for.
    pub svc: Service,
    pub fib: bpf_fib_lookup,
    /// The interface the last route lookup left by (0: none named).
    pub egress: u32,
    /// A socket lookup's tuple (is a source-NAT port a local socket's?).
    pub sock: bpf_sock_tuple,
    /// A fragmented datagram's `fragments` key and entry (see `fragment`).
    pub frag_key: FragKey,
    pub frag: FragEntry,
}
