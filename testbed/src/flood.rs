//! Spoofed traffic, as an attacker sends it: TCP SYNs from addresses that
//! are not the sender's, sent through a raw IP socket (the kernel routes
//! them by destination and fills in nothing but the Ethernet header). The
//! sources are taken from 198.18.0.0/15, the range set aside for benchmarks
//! (RFC 2544), which the testbed routes nowhere: the answers go unanswered.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The spoofed sources' prefix (198.18.0.0/15).
pub const SPOOFED_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// The `i`th spoofed client: addresses of 198.18.0.0/15 in turn (131,072 of
/// them), then the next source port.
pub fn spoofed_source(i: usize) -> SocketAddrV4 {
    let hosts = 1usize << (32 - SPOOFED_V4.1);
    let base = u32::from(SPOOFED_V4.0);
    let addr = Ipv4Addr::from(base + (i % hosts) as u32);
    SocketAddrV4::new(addr, 1024 + (i / hosts) as u16)
}

/// Sends SYNs to `to` from within namespace `ns`, the `i`th from
/// [`spoofed_source`]`(i)` for each `i` of `clients`; returns how many the
/// kernel took.
pub fn spoofed_syns(ns: &str, to: SocketAddrV4, clients: Range<usize>) -> Result<usize> {
    crate::ns::try_in_netns(ns, || -> Result<usize> {
        // IPPROTO_RAW: the packets carry their own IP header (IP_HDRINCL).
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("a raw IPv4 socket")?;
        let dest = SockAddr::from(to);
        let mut packet = Vec::with_capacity(64);
        let count = clients.len();
        for i in clients {
            let from = spoofed_source(i);
            packet.clear();
            etherparse::PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64)
                .tcp(from.port(), to.port(), i as u32, 64_240)
                .syn()
                .write(&mut packet, &[])
                .context("building a SYN")?;
            socket
                .send_to(&packet, &dest)
                .with_context(|| format!("sending the SYN of spoofed client {i}"))?;
        }
        Ok(count)
    })?
}
