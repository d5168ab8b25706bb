//! Interfaces and addresses of this node, from rtnetlink: the uplinks and node
//! addresses when not given, and pod veths as they come and go.

use std::net::IpAddr;

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

/// A link appearing or going away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Added(Link),
    Removed(Link),
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

/// Sends link additions and removals until `tx` closes. The caller lists the
/// links after subscribing, so nothing falls between the two.
pub async fn watch_links(tx: mpsc::Sender<LinkEvent>) -> Result<()> {
    let (mut conn, _, mut messages) = rtnetlink::new_connection().context("opening rtnetlink")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_LINK))
        .context("subscribing to link events")?;
    let task = tokio::spawn(conn);
    while let Some((message, _)) = messages.next().await {
        let event = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                link_of(&l).map(LinkEvent::Added)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                link_of(&l).map(LinkEvent::Removed)
            }
            _ => None,
        };
        if let Some(e) = event
            && tx.send(e).await.is_err()
        {
            break;
        }
    }
    task.abort();
    Ok(())
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
