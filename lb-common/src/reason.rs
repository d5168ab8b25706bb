//! Why the datapath did what it did with a packet: the index of the per-CPU
//! `reasons` counters. Every packet a program sees is counted under exactly one
//! reason, so the counters add up to the packets seen; a packet XDP hands to tc
//! (`pass_to_tc`) is seen, and counted, by both.

/// A reason index (`reasons` map key).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp = 0,
    /// IP, but not addressed to a service nor a reply of a tracked flow.
    PassNotService,
    /// Too short or malformed to parse (short frame, bad IHL, bad lengths):
    /// passed to the kernel, which drops and counts it as the stack would.
    PassMalformed,
    /// An IP fragment lb does not translate: a later fragment (no ports)
    /// whose datagram's first fragment was not translated here (it has not
    /// arrived yet, went another way, or was none of lb's business), or a
    /// fragment of a protocol other than TCP and UDP. A first fragment is
    /// treated as any TCP or UDP packet, and a later one of a datagram whose
    /// first was translated is translated the same way (the `fragments` map).
    PassFragment,
    /// An L4 protocol lb does not balance (SCTP, GRE, ICMP echo, ...).
    PassOtherProtocol,
    /// Translated, but the kernel routes it on: local delivery (a backend on
    /// the node's own address), no route, a TTL about to expire, VLAN-tagged.
    PassToKernel,
    /// Translated and sent back out of the interface it came in on (XDP_TX).
    Tx,
    /// Translated and redirected to another interface.
    Redirect,
    /// A connection to a service without usable backends, refused with a TCP RST
    /// (an incoming RST to such a service is absorbed and counted here too).
    RejectTcpReset,
    /// A datagram to a service without usable backends, refused with ICMP port unreachable.
    RejectIcmpUnreachable,
    /// An ICMP error about a translated flow, translated back.
    IcmpErrorTranslated,
    /// No source-NAT port was free for a new flow: dropped.
    DropSnatExhausted,
    /// The packet could not be rewritten (a refusal that does not fit the packet,
    /// a failing checksum helper): dropped.
    DropRewriteFailed,
    /// A map update failed (e.g. conntrack insert): dropped.
    DropMapError,
    /// XDP handed the packet, untranslated, to the tc program on the same
    /// interface, because its next hop is for the kernel to resolve (neighbour
    /// unknown) or leaves by an interface XDP cannot send on (a tunnel, a pod
    /// veth, another NIC). Counted again by tc under where it went.
    PassToTc,
    /// Translated and redirected by tc to an interface whose next hop the
    /// kernel resolves first (`bpf_redirect_neigh`).
    RedirectNeigh,
    /// Too big for the interface its backend is reached by (an overlay's lower
    /// MTU), and not to be fragmented: answered with ICMP fragmentation needed /
    /// ICMPv6 packet too big from the address the client sent to.
    IcmpTooBig,
    /// A new flow to a frontend with a Local traffic policy (external or
    /// internal) and no endpoint on this node: dropped, as kube-proxy drops
    /// it (a client or a load balancer's health check must not take a
    /// refusal for an answer).
    DropNoLocalEndpoint,
    /// A new flow to a LoadBalancer IP from outside its Service's
    /// loadBalancerSourceRanges: dropped.
    DropSourceRange,
    /// A new flow that needs source NAT in a family this node has no address
    /// of (`config` without that family's SNAT flag): dropped, never sent
    /// from the unspecified address.
    DropNoSnatAddress,
    /// A packet of a tracked flow that arrived on an interface its flow's
    /// packets of that direction cannot come from (`CtEntry::ingress`): a
    /// reply-shaped packet of a local pod's flow from the network, of a
    /// remote backend's flow from a pod, and ICMP errors and later fragments
    /// translated like such replies. Passed untouched, not translated, so that
    /// the kernel's reverse-path filter and routing decide about it.
    PassWrongSide,
}

impl Reason {
    /// Number of reasons (size of the `reasons` map).
    pub const COUNT: u32 = Self::PassWrongSide as u32 + 1;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::PassNotIp,
        Self::PassNotService,
        Self::PassMalformed,
        Self::PassFragment,
        Self::PassOtherProtocol,
        Self::PassToKernel,
        Self::Tx,
        Self::Redirect,
        Self::RejectTcpReset,
        Self::RejectIcmpUnreachable,
        Self::IcmpErrorTranslated,
        Self::DropSnatExhausted,
        Self::DropRewriteFailed,
        Self::DropMapError,
        Self::PassToTc,
        Self::RedirectNeigh,
        Self::IcmpTooBig,
        Self::DropNoLocalEndpoint,
        Self::DropSourceRange,
        Self::DropNoSnatAddress,
        Self::PassWrongSide,
    ];

    /// The reason with index `i`.
    pub const fn from_index(i: u32) -> Option<Self> {
        if i < Self::COUNT {
            // SAFETY: repr(u32) with discriminants 0..COUNT, checked above.
            Some(unsafe { core::mem::transmute::<u32, Self>(i) })
        } else {
            None
        }
    }

    /// Stable snake_case name, used in metrics labels and dumps.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassNotIp => "pass_not_ip",
            Self::PassNotService => "pass_not_service",
            Self::PassMalformed => "pass_malformed",
            Self::PassFragment => "pass_fragment",
            Self::PassOtherProtocol => "pass_other_protocol",
            Self::PassToKernel => "pass_to_kernel",
            Self::Tx => "tx",
            Self::Redirect => "redirect",
            Self::RejectTcpReset => "reject_tcp_reset",
            Self::RejectIcmpUnreachable => "reject_icmp_unreachable",
            Self::IcmpErrorTranslated => "icmp_error_translated",
            Self::DropSnatExhausted => "drop_snat_exhausted",
            Self::DropRewriteFailed => "drop_rewrite_failed",
            Self::DropMapError => "drop_map_error",
            Self::PassToTc => "pass_to_tc",
            Self::RedirectNeigh => "redirect_neigh",
            Self::IcmpTooBig => "icmp_too_big",
            Self::DropNoLocalEndpoint => "drop_no_local_endpoint",
            Self::DropSourceRange => "drop_source_range",
            Self::DropNoSnatAddress => "drop_no_snat_address",
            Self::PassWrongSide => "pass_wrong_side",
        }
    }

    /// Whether packets counted here were dropped rather than delivered.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropSnatExhausted
                | Self::DropRewriteFailed
                | Self::DropMapError
                | Self::DropNoLocalEndpoint
                | Self::DropSourceRange
                | Self::DropNoSnatAddress
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_index_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
            assert_eq!(Reason::from_index(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_index(Reason::COUNT), None);
    }
}
