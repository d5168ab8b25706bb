//! A device's own statistics (what `ethtool -S` prints, read with the
//! `SIOCETHTOOL` ioctl): where drivers count the XDP frames they failed to
//! send. The datapath counts a frame under `tx` or `redirect` when it decides
//! to send it; a driver may still drop it afterwards (a veth whose peer runs no
//! XDP drops every XDP_TX frame), and only the driver knows. These counters
//! make that visible in `lb-agent dump` and the metrics.

use std::{io, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;
/// More counters than any driver has (mlx5 has about 1,000 with many queues).
const MAX_STATS: usize = 1 << 16;

/// Runs the ethtool command in `data` (a struct starting with its `cmd`) on
/// `ifname`.
fn ioctl(ifname: &str, data: *mut libc::c_void) -> io::Result<()> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    // SAFETY: an ifreq of zeroes with a NUL-terminated name of at most
    // IFNAMSIZ - 1 bytes, and `data` pointing at a buffer the command fits.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        let name = ifname.as_bytes();
        if name.len() >= ifr.ifr_name.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = data.cast();
        if libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Every statistic of `ifname`, by name, as `ethtool -S` lists them. A device
/// without driver statistics (lo, most virtual ones) has none.
pub fn stats(ifname: &str) -> Result<Vec<(String, u64)>> {
    // struct ethtool_sset_info with room for one count.
    #[repr(C)]
    struct SsetInfo {
        cmd: u32,
        reserved: u32,
        mask: u64,
        count: u32,
    }
    let mut info = SsetInfo {
        cmd: ETHTOOL_GSSET_INFO,
        reserved: 0,
        mask: 1 << ETH_SS_STATS,
        count: 0,
    };
    match ioctl(ifname, (&raw mut info).cast()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("ethtool statistics of {ifname}")),
    }
    if info.mask & (1 << ETH_SS_STATS) == 0 || info.count == 0 {
        return Ok(Vec::new());
    }
    let n = info.count as usize;
    if n > MAX_STATS {
        bail!("{ifname} claims {n} statistics");
    }
    // struct ethtool_gstrings: cmd, string_set, len, then the names. Words,
    // so that the buffer is aligned for the header.
    let mut names = vec![0u32; 3 + n * ETH_GSTRING_LEN / 4];
    names[0] = ETHTOOL_GSTRINGS;
    names[1] = ETH_SS_STATS;
    names[2] = n as u32;
    ioctl(ifname, names.as_mut_ptr().cast())
        .with_context(|| format!("ethtool statistics names of {ifname}"))?;
    // struct ethtool_stats: cmd, n_stats, then the values (u64).
    let mut values = vec![0u64; 1 + n];
    values[0] = u64::from(ETHTOOL_GSTATS);
    ioctl(ifname, values.as_mut_ptr().cast())
        .with_context(|| format!("ethtool statistics of {ifname}"))?;
    let bytes: Vec<u8> = names[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(bytes
        .chunks(ETH_GSTRING_LEN)
        .zip(&values[1..])
        .map(|(name, v)| {
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            (String::from_utf8_lossy(&name[..end]).into_owned(), *v)
        })
        .collect())
}

/// Whether a statistic counts XDP frames the driver failed to send: an XDP_TX
/// or a redirect that did not go out (veth: `rx_queue_0_xdp_tx_errors`,
/// `tx_queue_0_xdp_xmit_errors`; mlx5: `rx_xdp_tx_err`; virtio_net:
/// `rx_queue_0_xdp_tx_drops`). Not the frames an XDP program dropped on
/// purpose (`xdp_drops`: lb's own drops, counted by reason).
pub fn is_xdp_transmit_error(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("xdp") && (n.contains("err") || (n.contains("drop") && n.contains("tx")))
}

/// The XDP transmit-error statistics of `ifname` (see
/// [`is_xdp_transmit_error`]).
pub fn xdp_transmit_errors(ifname: &str) -> Result<Vec<(String, u64)>> {
    Ok(stats(ifname)?
        .into_iter()
        .filter(|(name, _)| is_xdp_transmit_error(name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_errors_are_told_from_deliberate_drops() {
        for name in [
            "rx_queue_0_xdp_tx_errors",
            "tx_queue_3_xdp_xmit_errors",
            "rx_xdp_tx_err",
            "tx_xdp_err",
            "rx_queue_1_xdp_tx_drops",
            "XDP_TX_ERR",
        ] {
            assert!(is_xdp_transmit_error(name), "{name}");
        }
        for name in [
            "rx_queue_0_xdp_drops",
            "rx_queue_0_xdp_tx",
            "tx_queue_0_xdp_xmit",
            "rx_errors",
            "tx_dropped",
            "peer_ifindex",
        ] {
            assert!(!is_xdp_transmit_error(name), "{name}");
        }
    }
}
