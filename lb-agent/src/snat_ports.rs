//! The source-NAT port range: by default the ports below (or above) the
//! node's ephemeral range, so that no source-NATed flow and no connection the
//! node opens itself can share a 4-tuple.
//!
//! lb cannot do what the kernel's NAT does when a local connection's tuple
//! clashes with a NAT mapping (move the local connection to another port): a
//! reply arriving for a tuple both use would be translated for the NAT flow
//! and lost to the local socket. Kubelet probes, hostNetwork pods and the
//! node's own Service clients (socket-level balancing connects them straight to
//! backends) open exactly such connections, from ephemeral ports
//! (`net.ipv4.ip_local_port_range`, 32768-60999 by default). So the default
//! range lies outside it: 1024-32767 on a default node, 31,744 ports per
//! backend address and port. Ports a local socket holds or listens on are
//! never claimed either way (the datapath checks at claim time).

use anyhow::{Context as _, Result, bail};
use lb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};

/// Fewer ports than this outside the ephemeral range, and the range is not
/// worth keeping apart: the whole range is used, with a warning.
const MIN_PORTS: u32 = 1024;

/// `FIRST-LAST`, as `--snat-ports` takes it.
pub fn parse(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("--snat-ports wants FIRST-LAST, e.g. 1024-32767")?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("--snat-ports {s}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("--snat-ports {s}"))?,
    );
    if a == 0 || b < a {
        bail!("--snat-ports {s}: the range must be non-empty and start above 0");
    }
    Ok((a, b))
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range`, of the
/// calling thread's network namespace).
pub fn ephemeral() -> Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok((lo, hi)),
        _ => bail!("net.ipv4.ip_local_port_range is {text:?}"),
    }
}

/// The default range for an ephemeral range of `(lo, hi)`: the larger of
/// the ports from 1024 below it and the ports above it. When neither holds
/// [`MIN_PORTS`], the whole range 1024-65535, with the reason to warn.
pub fn default_range((lo, hi): (u16, u16)) -> ((u16, u16), Option<String>) {
    let below = (u32::from(lo) > u32::from(SNAT_PORT_MIN))
        .then(|| (SNAT_PORT_MIN, lo - 1))
        .filter(|(a, b)| b >= a);
    let above = (hi < SNAT_PORT_MAX).then(|| (hi.max(SNAT_PORT_MIN - 1) + 1, SNAT_PORT_MAX));
    let size = |r: &(u16, u16)| u32::from(r.1) - u32::from(r.0) + 1;
    let best = [below, above].into_iter().flatten().max_by_key(size);
    match best {
        Some(r) if size(&r) >= MIN_PORTS => (r, None),
        _ => (
            (SNAT_PORT_MIN, SNAT_PORT_MAX),
            Some(format!(
                "the node's ephemeral ports (net.ipv4.ip_local_port_range {lo}-{hi}) leave fewer \
                 than {MIN_PORTS} ports for source NAT: using {SNAT_PORT_MIN}-{SNAT_PORT_MAX}, \
                 shared with them, so a connection the node opens to a backend may lose its \
                 replies to a source-NATed flow on the same port; narrow the ephemeral range or \
                 pass --snat-ports"
            )),
        ),
    }
}

/// What the ephemeral range means for an explicit `--snat-ports`: a warning
/// when they overlap.
pub fn overlap_warning((first, last): (u16, u16), (lo, hi): (u16, u16)) -> Option<String> {
    (first <= hi && lo <= last).then(|| {
        format!(
            "--snat-ports {first}-{last} overlaps the node's ephemeral ports \
             (net.ipv4.ip_local_port_range {lo}-{hi}): a connection the node opens to a backend \
             from one of them may lose its replies to a source-NATed flow on the same port"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_lies_outside_the_ephemeral_one() {
        assert_eq!(default_range((32768, 60999)), ((1024, 32767), None));
        // Above is larger.
        assert_eq!(default_range((2000, 30000)), ((30001, 65535), None));
        // Just enough below.
        assert_eq!(default_range((2048, 65535)), ((1024, 2047), None));
        // Not enough anywhere: the whole range, with a warning.
        let (r, warn) = default_range((1024, 65535));
        assert_eq!(r, (1024, 65535));
        assert!(warn.unwrap().contains("1024-65535"));
        let (r, warn) = default_range((1500, 65000));
        assert_eq!(r, (1024, 65535));
        assert!(warn.is_some());
        // An ephemeral range below 1024.
        assert_eq!(default_range((100, 900)), ((1024, 65535), None));
    }

    #[test]
    fn explicit_ranges_are_parsed_and_checked() {
        assert_eq!(parse("1024-32767").unwrap(), (1024, 32767));
        assert_eq!(parse(" 61000 - 65535 ").unwrap(), (61000, 65535));
        for bad in ["", "1024", "0-100", "200-100", "a-b", "1-70000"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(overlap_warning((1024, 32767), (32768, 60999)).is_none());
        assert!(overlap_warning((30000, 40000), (32768, 60999)).is_some());
        assert!(overlap_warning((61000, 65535), (32768, 60999)).is_none());
    }
}
