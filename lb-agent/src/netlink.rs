//! Interfaces and addresses of this node, from rtnetlink: the uplinks and node
//! addresses when not given, and pod veths as they come and go.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressScope},
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::AsyncSocket as _;
use rtnetlink::constants::RTMGRP_LINK;
use tokio::sync::mpsc;

/// An interface: kernel index, name, and the kind of a virtual one (`veth`,
/// `vxlan`, `bridge`, ...; None for a NIC's own driver).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
}

/// A link appearing or going away, or every link at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Added(Link),
    Removed(Link),
    /// Every link there is now: sent when the subscription (re)starts and
    /// after the kernel dropped events, so that what was missed is repaired.
    Listed(Vec<Link>),
    /// The subscription failed; it starts again after a backoff (a `Listed`
    /// follows).
    Lost(String),
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let kind = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    });
    Some(Link {
        index: msg.header.index,
        name,
        kind,
    })
}

pub async fn links() -> Result<Vec<Link>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing links")? {
        if let Some(l) = link_of(&msg) {
            out.push(l);
        }
    }
    task.abort();
    out.sort();
    Ok(out)
}

/// Global-scope addresses, with the index of the link holding each.
pub async fn addresses() -> Result<Vec<(u32, IpAddr)>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing addresses")? {
        if msg.header.scope != AddressScope::Universe {
            continue;
        }
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push((msg.header.index, *ip));
            }
        }
    }
    task.abort();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Glob match with `*` and `?` (interface name patterns like `veth*`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The first restart of a failed subscription comes after this; each next
/// one waits twice as long, up to [`RESTART_AT_MOST`].
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_AT_MOST: Duration = Duration::from_secs(30);
/// A subscription that lived this long was healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Follows the node's links until `tx` closes: each subscription lists the
/// links after subscribing (so nothing falls between) and then sends
/// additions and removals; a subscription that fails is started again with
/// backoff, and says so with [`LinkEvent::Lost`]. `buffer` is the socket's
/// receive buffer: when a burst of changes overflows it the kernel drops
/// events (ENOBUFS), and the links are listed afresh.
pub async fn follow_links(tx: mpsc::Sender<LinkEvent>, buffer: usize) {
    let mut backoff = RESTART_FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let why = match watch_links(&tx, buffer).await {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = RESTART_FIRST;
        }
        log::warn!("link events stopped: {why}; following them again in {backoff:?}");
        if tx.send(LinkEvent::Lost(why)).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESTART_AT_MOST);
    }
}

/// Sizes a socket's receive buffer: beyond `net.core.rmem_max` where the
/// agent may (CAP_NET_ADMIN), else as far as the limit allows.
fn set_receive_buffer(socket: &netlink_sys::Socket, bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let size = libc::c_int::try_from(bytes).context("--link-events-buffer is too large")?;
    // SAFETY: setsockopt reads an int from the pointer given, which lives
    // across the call; the fd is the socket's own.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        socket
            .set_rx_buf_sz(bytes)
            .context("sizing the link events buffer")?;
    }
    Ok(())
}

/// One subscription: Ok when `tx` closed, an error when the subscription
/// failed.
async fn watch_links(tx: &mpsc::Sender<LinkEvent>, buffer: usize) -> Result<()> {
    let (mut conn, _, mut messages) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let socket = conn.socket_mut().socket_mut();
    set_receive_buffer(socket, buffer)?;
    socket
        .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_LINK))
        .context("subscribing to link events")?;
    let task = tokio::spawn(conn);
    let result = async {
        if tx.send(LinkEvent::Listed(links().await?)).await.is_err() {
            return Ok(());
        }
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    link_of(&l).map(LinkEvent::Added)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    link_of(&l).map(LinkEvent::Removed)
                }
                NetlinkPayload::Overrun(_) => {
                    log::warn!(
                        "link events overran their buffer (--link-events-buffer): listing the links afresh"
                    );
                    Some(LinkEvent::Listed(links().await?))
                }
                _ => None,
            };
            if let Some(e) = event
                && tx.send(e).await.is_err()
            {
                return Ok(());
            }
        }
        anyhow::bail!("the netlink socket closed")
    }
    .await;
    task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("lb?-a-*", "lbx-a-p0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }
}
