//! Test frames (Ethernet, IPv4/IPv6, TCP/UDP, checksums computed) and a small
//! decoder that checks every checksum of what a program returned.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn finish(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    sum(&octets(src)) + sum(&octets(dst)) + u64::from(proto) + len as u64
}

/// A frame from `src` to `dst` (TCP with `flags`, or UDP when `proto` is UDP),
/// padded with zeros to at least `min_len` bytes (padding after the IP packet,
/// as short Ethernet frames are).
pub fn frame(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    flags: u8,
    min_len: usize,
) -> Vec<u8> {
    let l4: Vec<u8> = if proto == TCP {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        if flags & ACK != 0 {
            t[8..12].copy_from_slice(&2000u32.to_be_bytes());
        }
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let c = finish(pseudo(src.ip(), dst.ip(), TCP, t.len()) + sum(&t));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    } else {
        let payload = [0u8; 10];
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&src.port().to_be_bytes());
        u[2..4].copy_from_slice(&dst.port().to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&payload);
        let mut c = finish(pseudo(src.ip(), dst.ip(), UDP, u.len()) + sum(&u));
        if c == 0 {
            c = 0xffff;
        }
        u[6..8].copy_from_slice(&c.to_be_bytes());
        u
    };
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&macs.1);
    f.extend_from_slice(&macs.0);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = finish(sum(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(&l4);
    if f.len() < min_len {
        f.resize(min_len, 0);
    }
    f
}

/// What [`decode`] read from a frame whose checksums are all right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub ttl: u8,
}

/// Decodes a TCP/UDP frame and checks its IPv4 and L4 checksums.
pub fn decode(f: &[u8]) -> Result<Decoded> {
    if f.len() < 14 {
        bail!("frame of {} bytes", f.len());
    }
    let mut eth_dst = [0u8; 6];
    let mut eth_src = [0u8; 6];
    eth_dst.copy_from_slice(&f[0..6]);
    eth_src.copy_from_slice(&f[6..12]);
    let et = u16::from_be_bytes([f[12], f[13]]);
    let (src, dst, proto, ttl, l4) = match et {
        0x0800 => {
            let ip = f.get(14..34).ok_or_else(|| anyhow::anyhow!("short IPv4"))?;
            if finish(sum(ip)) != 0 {
                bail!("bad IPv4 header checksum");
            }
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let l4 = f
                .get(34..14 + tot)
                .ok_or_else(|| anyhow::anyhow!("short IPv4 payload"))?;
            let s = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
            let d = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
            (s, d, ip[9], ip[8], l4)
        }
        0x86dd => {
            let ip = f.get(14..54).ok_or_else(|| anyhow::anyhow!("short IPv6"))?;
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let l4 = f
                .get(54..54 + plen)
                .ok_or_else(|| anyhow::anyhow!("short IPv6 payload"))?;
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            d.copy_from_slice(&ip[24..40]);
            (IpAddr::from(s), IpAddr::from(d), ip[6], ip[7], l4)
        }
        other => bail!("ethertype {other:#06x}"),
    };
    if l4.len() < 8 {
        bail!("short L4 header");
    }
    let udp_no_csum = proto == UDP && l4[6] == 0 && l4[7] == 0 && src.is_ipv4();
    if !udp_no_csum && finish(pseudo(src, dst, proto, l4.len()) + sum(l4)) != 0 {
        bail!("bad {} checksum", if proto == TCP { "TCP" } else { "UDP" });
    }
    let sp = u16::from_be_bytes([l4[0], l4[1]]);
    let dp = u16::from_be_bytes([l4[2], l4[3]]);
    Ok(Decoded {
        eth_dst,
        eth_src,
        src: SocketAddr::new(src, sp),
        dst: SocketAddr::new(dst, dp),
        proto,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_with_good_checksums() {
        let macs = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        for (s, d) in [
            ("198.51.100.7:40000", "10.96.0.10:80"),
            ("[2001:db8:100::7]:40000", "[fd00:96::10]:80"),
        ] {
            for proto in [TCP, UDP] {
                let f = frame(macs, s.parse().unwrap(), d.parse().unwrap(), proto, SYN, 60);
                let dec = decode(&f).unwrap();
                assert_eq!(dec.src, s.parse().unwrap());
                assert_eq!(dec.dst, d.parse().unwrap());
                assert_eq!(dec.proto, proto);
            }
        }
    }
}
