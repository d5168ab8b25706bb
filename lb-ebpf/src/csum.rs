//! Internet checksum arithmetic (RFC 1071 / RFC 1624).
//!
//! Words are 16-bit values loaded from packet memory in native byte order: the
//! ones'-complement sum is byte-order independent as long as loads and the final
//! store use the same order, so no byte swapping is needed anywhere.

use core::ptr;

/// A running ones'-complement sum of changes (`!old + new` per word), not yet folded.
#[derive(Clone, Copy, Default)]
pub struct Diff(u64);

impl Diff {
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Adds the change of the first `N` bytes of an address (4 for IPv4, 16 for IPv6).
    /// Reads 16-bit words: every address field of the map types and headers it
    /// is used with sits at an 8-byte offset (see `mem::copy_addr`), and byte loads
    /// with shifts would cost several instructions per word.
    #[inline(always)]
    pub fn addr<const N: usize>(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        let (o, n) = (old.as_ptr().cast::<u16>(), new.as_ptr().cast::<u16>());
        let mut i = 0;
        while i < N / 2 {
            // SAFETY: in bounds of the 16-byte arrays, 2-byte aligned as said above.
            self.word(unsafe { ptr::read(o.add(i)) }, unsafe {
                ptr::read(n.add(i))
            });
            i += 1;
        }
    }

    /// Adds the change of an address of either family.
    #[inline(always)]
    pub fn ip(&mut self, v4: bool, old: &[u8; 16], new: &[u8; 16]) {
        if v4 {
            self.addr::<4>(old, new);
        } else {
            self.addr::<16>(old, new);
        }
    }

    /// Adds another diff.
    #[inline(always)]
    pub fn add(&mut self, other: Self) {
        self.0 += other.0;
    }

    /// The change folded to 16 bits (0 when nothing changed).
    #[inline(always)]
    pub fn folded(self) -> u16 {
        fold(self.0)
    }
}

/// Folds a 64-bit sum of 16-bit words into 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Applies a change to a stored (complemented) checksum: HC' = ~(~HC + m' - m).
#[inline(always)]
pub fn apply(check: u16, diff: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(diff))
}

/// Sum of a header built on the stack, as 16-bit words.
#[inline(always)]
pub fn sum<const N: usize>(bytes: &[u8; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < N {
        sum += u64::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// [`pseudo_header`] for an address family chosen at run time.
#[inline(always)]
pub fn pseudo(v4: bool, src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u16) -> u64 {
    if v4 {
        pseudo_header::<4>(src, dst, proto, len)
    } else {
        pseudo_header::<16>(src, dst, proto, len)
    }
}

/// Sum of the pseudo-header fields of a TCP/UDP/ICMPv6 checksum, folded but not
/// complemented: `N` address bytes of source and destination, protocol, length.
#[inline(always)]
pub fn pseudo_header<const N: usize>(src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u16) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += u64::from(u16::from_ne_bytes([src[i], src[i + 1]]));
        sum += u64::from(u16::from_ne_bytes([dst[i], dst[i + 1]]));
        i += 2;
    }
    sum + u64::from(u16::from_ne_bytes([0, proto])) + u64::from(len.to_be())
}
