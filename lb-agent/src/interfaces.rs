//! Which interfaces run which program, kept equal to the node's links as they
//! come and go.
//!
//! Every interface but `lo` gets a role:
//! - **uplink** (holds a node address, or named with `--iface`): Service
//!   traffic from outside arrives here. It runs tc (tcx ingress) always, and
//!   XDP in front of it where XDP fits ([`UplinkHook`]): XDP hands tc what it
//!   cannot send itself (an unresolved neighbour, an egress XDP cannot use).
//! - **pod** (the host side of a pod veth, by `--pod-ifaces`): tc, for
//!   traffic from local pods.
//! - **other** (by `--other-ifaces`, every other interface by default):
//!   tc, for replies and forwarded traffic arriving there: the tunnel devices
//!   of overlay networks (Flannel's `flannel.1`, Calico's `vxlan.calico` and
//!   `tunl0`, WireGuard), second NICs.
//!
//! The `interfaces` map says what runs where, and why, for `bpftool` and
//! `lb-agent dump`. Links are pinned (`<pin-path>/links/{xdp,tc}-<ifindex>`),
//! so programs stay attached across agent restarts; a restart replaces them
//! atomically. Until the uplinks are known (Kubernetes mode without `--iface`
//! and `--node-ip`, before the Node object arrives), only pod interfaces are
//! touched: nothing the previous run attached elsewhere is removed.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use lb_common::{Interface, iface};

use crate::{
    bpf::{
        Datapath, Maps,
        attach::{self, Hook},
    },
    netlink::{Link, glob_match},
};

/// How uplinks are hooked (`--uplink-hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkHook {
    /// XDP in native mode where the driver runs it, tc on virtual links
    /// (veth: its peer may hand over partial checksums, and drops XDP
    /// transmits unless it runs XDP itself) and where native XDP will not
    /// attach.
    Auto,
    /// XDP (native mode); tc where it will not attach.
    Xdp,
    /// tc only.
    Tc,
}

/// Link kinds whose other end is a socket buffer, not a wire: XDP there sees
/// partial checksums and cannot transmit unless the peer runs XDP.
const VIRTUAL_KINDS: [&str; 2] = ["veth", "netkit"];

/// The hooks an uplink gets: (XDP or not, why).
pub fn uplink_choice(mode: UplinkHook, link: &Link) -> (bool, u32) {
    match mode {
        UplinkHook::Xdp => (true, iface::WHY_XDP_ASKED),
        UplinkHook::Tc => (false, iface::WHY_TC_ASKED),
        UplinkHook::Auto => match &link.kind {
            Some(k) if VIRTUAL_KINDS.contains(&k.as_str()) => (false, iface::WHY_TC_VIRTUAL),
            _ => (true, iface::WHY_XDP_NATIVE),
        },
    }
}

/// What runs on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    role: u32,
    hooks: u32,
    why: u32,
}

pub struct Interfaces {
    links_dir: std::path::PathBuf,
    uplink_hook: UplinkHook,
    pod_patterns: Vec<String>,
    other_patterns: Vec<String>,
    /// Every link of the node, by ifindex.
    links: BTreeMap<u32, Link>,
    /// None until known.
    uplinks: Option<BTreeSet<u32>>,
    attached: BTreeMap<u32, State>,
}

impl Interfaces {
    pub fn new(
        links_dir: std::path::PathBuf,
        uplink_hook: UplinkHook,
        pod_patterns: Vec<String>,
        other_patterns: Vec<String>,
    ) -> Self {
        Self {
            links_dir,
            uplink_hook,
            pod_patterns,
            other_patterns,
            links: BTreeMap::new(),
            uplinks: None,
            attached: BTreeMap::new(),
        }
    }

    /// The uplinks, once known.
    pub fn uplinks(&self) -> Option<&BTreeSet<u32>> {
        self.uplinks.as_ref()
    }

    /// How many interfaces have `role`.
    pub fn count(&self, role: u32) -> usize {
        self.attached.values().filter(|s| s.role == role).count()
    }

    fn role_of(&self, link: &Link) -> Option<u32> {
        if link.name == "lo" {
            return None;
        }
        let uplinks = self.uplinks.as_ref();
        if uplinks.is_some_and(|u| u.contains(&link.index)) {
            return Some(iface::ROLE_UPLINK);
        }
        if self.pod_patterns.iter().any(|p| glob_match(p, &link.name)) {
            return Some(iface::ROLE_POD);
        }
        if uplinks.is_some()
            && self
                .other_patterns
                .iter()
                .any(|p| glob_match(p, &link.name))
        {
            return Some(iface::ROLE_OTHER);
        }
        None
    }

    /// A link appeared (or changed): give it the programs of its role.
    pub fn link_added(&mut self, dp: &mut Datapath, maps: &mut Maps, link: Link) {
        let index = link.index;
        self.links.insert(index, link);
        self.apply(dp, maps, index);
    }

    /// A link went away: its links went with it; forget its pins and entries.
    pub fn link_removed(&mut self, maps: &mut Maps, link: &Link) {
        self.links.remove(&link.index);
        if let Some(was) = self.attached.remove(&link.index) {
            log::info!(
                "{} interface {} is gone",
                iface::role_name(was.role),
                link.name
            );
            self.release(maps, link.index, was.hooks);
            self.forget(maps, link.index);
        }
    }

    /// Every link there is now (after events may have been missed): links
    /// gone are forgotten, new ones get their programs, and one whose index
    /// now names another interface is treated as gone and new (its programs
    /// went with the old one). Interfaces whose attach failed are tried again.
    pub fn relisted(&mut self, dp: &mut Datapath, maps: &mut Maps, links: Vec<Link>) {
        let now: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
        let gone: Vec<Link> = self
            .links
            .values()
            .filter(|old| now.get(&old.index).is_none_or(|new| new.name != old.name))
            .cloned()
            .collect();
        for link in &gone {
            self.link_removed(maps, link);
        }
        for link in links {
            self.link_added(dp, maps, link);
        }
    }

    /// The verify-and-repair pass for the maps this side writes (see
    /// `crate::repair`): `interfaces` holds each attached interface's role
    /// and hooks (tc reads the role to tell where replies may come from) and
    /// nothing else, and `tx_ports` exactly the interfaces running XDP.
    /// Returns the entries that were wrong, per map.
    pub fn repair(&self, maps: &mut Maps) -> Result<(usize, usize)> {
        let mut found = std::collections::HashMap::new();
        for e in maps.interfaces.iter() {
            let (i, v) = e.context("reading interfaces")?;
            found.insert(i, v);
        }
        let mut interfaces = 0;
        for (i, state) in &self.attached {
            let Some(link) = self.links.get(i) else {
                continue;
            };
            let want = entry(&link.name, *state);
            if found.remove(i) != Some(want) {
                log::warn!("verify: interfaces entry of {} rewritten", link.name);
                maps.set_interface(*i, &want)?;
                interfaces += 1;
            }
        }
        for i in found.into_keys() {
            log::warn!("verify: interfaces entry {i} is no attached interface's: removed");
            maps.remove_interface(i)?;
            interfaces += 1;
        }
        let mut tx: BTreeSet<u32> = self
            .attached
            .iter()
            .filter(|(_, s)| s.hooks & iface::HOOK_XDP != 0)
            .map(|(i, _)| *i)
            .collect();
        let mut tx_ports = 0;
        let present: Vec<u32> = maps.tx_ports.keys().collect::<Result<_, _>>()?;
        for i in present {
            if !tx.remove(&i) {
                log::warn!("verify: tx_ports entry {i} runs no XDP: removed");
                maps.remove_tx_port(i)?;
                tx_ports += 1;
            }
        }
        for i in tx {
            log::warn!("verify: tx_ports lacked ifindex {i}, which runs XDP: added");
            maps.add_tx_port(i)?;
            tx_ports += 1;
        }
        Ok((interfaces, tx_ports))
    }

    /// Sets the uplinks, then brings every interface to its role; removes
    /// pins and `tx_ports` entries no interface has now (left by this run or
    /// an earlier one).
    pub fn set_uplinks(
        &mut self,
        dp: &mut Datapath,
        maps: &mut Maps,
        want: BTreeSet<u32>,
    ) -> Result<()> {
        for i in &want {
            if !self.links.contains_key(i) {
                log::warn!("uplink ifindex {i} is no interface of this host");
            }
        }
        self.uplinks = Some(want);
        let indexes: Vec<u32> = self.links.keys().copied().collect();
        for i in indexes {
            self.apply(dp, maps, i);
        }
        let stale_ports: Vec<u32> = maps
            .tx_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !self.has(*i, iface::HOOK_XDP))
            .collect();
        for i in stale_ports {
            maps.remove_tx_port(i)?;
        }
        self.detach_stale();
        Ok(())
    }

    fn has(&self, index: u32, hook: u32) -> bool {
        self.attached
            .get(&index)
            .is_some_and(|s| s.hooks & hook != 0)
    }

    /// Removes pinned links (of this run or an earlier one) of hooks no
    /// interface runs now. Only once the uplinks are known: before, an
    /// uplink's or another interface's links may be pinned legitimately.
    fn detach_stale(&self) {
        for (hook, index, path) in attach::pinned_links(&self.links_dir) {
            let bit = match hook {
                Hook::Xdp => iface::HOOK_XDP,
                Hook::Tc => iface::HOOK_TC,
            };
            if self.has(index, bit) {
                continue;
            }
            log::info!("detaching stale {hook} link {}", path.display());
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("removing {}: {e}", path.display());
            }
        }
    }

    /// Brings interface `index` to the programs its role wants.
    fn apply(&mut self, dp: &mut Datapath, maps: &mut Maps, index: u32) {
        let Some(link) = self.links.get(&index).cloned() else {
            return;
        };
        let Some(role) = self.role_of(&link) else {
            if let Some(was) = self.attached.remove(&index) {
                log::info!("{} is no longer lb's", link.name);
                self.release(maps, index, was.hooks);
                self.forget(maps, index);
            }
            return;
        };
        if self.attached.get(&index).is_some_and(|w| w.role == role) {
            return;
        }
        let (xdp, why) = if role == iface::ROLE_UPLINK {
            uplink_choice(self.uplink_hook, &link)
        } else {
            (false, iface::WHY_NONE)
        };
        let name = &link.name;
        let role_name = iface::role_name(role);
        // The role before the program: tc reads it to tell a pod interface
        // from the network (a reply of a remote backend's flow must not come
        // from a pod, see `lb_ebpf`'s `side`), and an interface it does not
        // find counts as the network.
        let was = self.attached.get(&index).copied();
        let before = State {
            role,
            hooks: was.map_or(0, |w| w.hooks),
            why,
        };
        record(maps, index, name, before);
        // tc first: with XDP in front, it is where XDP hands packets on to.
        match dp.attach(Hook::Tc, index, &self.links_dir) {
            Ok(how) => log::info!("tc program on {role_name} interface {name} ({how:?})"),
            Err(e) => {
                log::warn!("cannot attach tc to {role_name} interface {name}: {e:#}");
                match was {
                    Some(w) => record(maps, index, name, w),
                    None => self.forget(maps, index),
                }
                return;
            }
        }
        let mut state = State {
            role,
            hooks: iface::HOOK_TC,
            why,
        };
        if xdp {
            match dp.attach(Hook::Xdp, index, &self.links_dir) {
                Ok(how) => match maps.add_tx_port(index) {
                    Ok(()) => {
                        state.hooks |= iface::HOOK_XDP;
                        log::info!("XDP program on uplink {name} ({how:?})");
                    }
                    Err(e) => log::warn!("{e:#}"),
                },
                Err(e) => {
                    state.why = iface::WHY_TC_XDP_REFUSED;
                    log::warn!("uplink {name}: {e:#}; serving it through tc");
                }
            }
        }
        if state.hooks & iface::HOOK_XDP == 0 && self.has(index, iface::HOOK_XDP) {
            // An uplink no more, or XDP refused now.
            self.release(maps, index, iface::HOOK_XDP);
        }
        if role == iface::ROLE_UPLINK {
            log::info!("uplink {name}: {}", iface::why_text(state.why));
        }
        self.attached.insert(index, state);
        record(maps, index, name, state);
    }

    /// Detaches `hooks` from `index` (and takes it out of `tx_ports` with XDP).
    fn release(&self, maps: &mut Maps, index: u32, hooks: u32) {
        if hooks & iface::HOOK_XDP != 0 {
            if let Err(e) = attach::detach(&self.links_dir, Hook::Xdp, index) {
                log::warn!("{e:#}");
            }
            if let Err(e) = maps.remove_tx_port(index) {
                log::debug!("{e:#}");
            }
        }
        if hooks & iface::HOOK_TC != 0
            && let Err(e) = attach::detach(&self.links_dir, Hook::Tc, index)
        {
            log::warn!("{e:#}");
        }
    }

    fn forget(&self, maps: &mut Maps, index: u32) {
        if let Err(e) = maps.remove_interface(index) {
            log::warn!("{e:#}");
        }
    }
}

/// What `interfaces` holds for an interface in `state`.
fn entry(name: &str, state: State) -> Interface {
    Interface {
        name: name_bytes(name),
        role: state.role,
        hooks: state.hooks,
        why: state.why,
        _pad: 0,
    }
}

/// Writes what runs on interface `index` into `interfaces`.
fn record(maps: &mut Maps, index: u32, name: &str, state: State) {
    if let Err(e) = maps.set_interface(index, &entry(name, state)) {
        log::warn!("{e:#}");
    }
}

fn name_bytes(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: Option<&str>) -> Link {
        Link {
            index: 7,
            name: name.into(),
            kind: kind.map(Into::into),
        }
    }

    #[test]
    fn auto_takes_xdp_on_nics_and_tc_on_veths() {
        let nic = link("eth0", None);
        let veth = link("eth0", Some("veth"));
        let bond = link("bond0", Some("bond"));
        assert_eq!(
            uplink_choice(UplinkHook::Auto, &nic),
            (true, iface::WHY_XDP_NATIVE)
        );
        assert_eq!(
            uplink_choice(UplinkHook::Auto, &bond),
            (true, iface::WHY_XDP_NATIVE),
            "a bond runs XDP natively on its slaves"
        );
        assert_eq!(
            uplink_choice(UplinkHook::Auto, &veth),
            (false, iface::WHY_TC_VIRTUAL)
        );
        assert_eq!(
            uplink_choice(UplinkHook::Xdp, &veth),
            (true, iface::WHY_XDP_ASKED)
        );
        assert_eq!(
            uplink_choice(UplinkHook::Tc, &nic),
            (false, iface::WHY_TC_ASKED)
        );
    }
}
