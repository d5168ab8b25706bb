//! Attaching the programs to interfaces with BPF links pinned under
//! `<pin-path>/links`, so that they stay attached when the agent exits, and so
//! that a new agent swaps its programs in with `bpf_link_update`: one atomic
//! pointer swap per interface, no window without a program.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    links::{FdLink, LinkError, LinkOrder, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions, TcAttachType},
    xdp::{XdpLink, XdpMode},
};

use super::Datapath;

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `lb_xdp` on an uplink (native mode only: generic XDP would cost more
    /// than tc, which serves where native XDP does not).
    Xdp,
    /// `lb_tc` on tcx ingress (any interface; see `crate::interfaces`).
    Tc,
}

impl Hook {
    fn prefix(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())
    }
}

/// What [`Datapath::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link was created and pinned.
    New,
    /// A pinned link was found and now runs this agent's program.
    Replaced,
}

pub fn link_pin(links_dir: &Path, hook: Hook, ifindex: u32) -> PathBuf {
    links_dir.join(format!("{}-{ifindex}", hook.prefix()))
}

/// The links pinned in `links_dir`: (hook, ifindex, path).
pub fn pinned_links(links_dir: &Path) -> Vec<(Hook, u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(links_dir) else {
        return Vec::new();
    };
    let mut links: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (prefix, index) = name.split_once('-')?;
            let hook = match prefix {
                "xdp" => Hook::Xdp,
                "tc" => Hook::Tc,
                _ => return None,
            };
            Some((hook, index.parse().ok()?, e.path()))
        })
        .collect();
    links.sort();
    links
}

pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

impl Datapath {
    /// Runs `hook`'s program on `ifindex`: takes over the pinned link if there is
    /// one (atomic replacement), or attaches and pins a new one.
    pub fn attach(&mut self, hook: Hook, ifindex: u32, links_dir: &Path) -> Result<Attached> {
        let pin = link_pin(links_dir, hook, ifindex);
        if pin.exists() {
            match self.replace(hook, &pin) {
                Ok(()) => {
                    self.attached.insert(pin);
                    return Ok(Attached::Replaced);
                }
                Err(e) => {
                    // The device behind an old link is gone (or the pin is not a
                    // link of ours): drop it and attach afresh.
                    log::warn!(
                        "pinned link {} unusable ({e:#}); attaching anew",
                        pin.display()
                    );
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
            }
        }
        let link: FdLink = match hook {
            Hook::Xdp => {
                let xdp = self.xdp()?;
                let id = xdp
                    .attach_to_if_index(ifindex, XdpMode::Driver)
                    .with_context(|| format!("attaching XDP (native mode) to ifindex {ifindex}"))?;
                xdp.take_link(id)?.try_into().map_err(|e: LinkError| {
                    anyhow::anyhow!("XDP on ifindex {ifindex} is not a BPF link ({e}): the kernel is too old to pin it")
                })?
            }
            Hook::Tc => {
                let name = ifname(ifindex)
                    .with_context(|| format!("no interface with ifindex {ifindex}"))?;
                let tc = self.tc()?;
                let id = tc
                    .attach_with_options(
                        &name,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching tcx ingress to {name}"))?;
                tc.take_link(id)?.try_into().map_err(|e: LinkError| {
                    anyhow::anyhow!("tc on {name} is not a BPF link ({e}): tcx needs Linux 6.6")
                })?
            }
        };
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        self.attached.insert(pin);
        Ok(Attached::New)
    }

    pub(super) fn replace(&mut self, hook: Hook, pin: &Path) -> Result<()> {
        let fd: FdLink = PinnedLink::from_pin(pin)?.into();
        match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(fd)?;
                let xdp = self.xdp()?;
                let id = xdp.attach_to_link(link)?;
                // The pin keeps the link; our handle can go.
                drop(xdp.take_link(id)?);
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(fd)?;
                let tc = self.tc()?;
                let id = tc.attach_to_link(link)?;
                drop(tc.take_link(id)?);
            }
        }
        Ok(())
    }
}

/// Detaches a pinned link (removing its pin releases it).
pub fn detach(links_dir: &Path, hook: Hook, ifindex: u32) -> Result<bool> {
    let pin = link_pin(links_dir, hook, ifindex);
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => bail!("removing {}: {e}", pin.display()),
    }
}
