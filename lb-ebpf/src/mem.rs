//! Clearing and copying without `memset`/`memcpy` calls. On BPF those are
//! byte-at-a-time loops from aya-ebpf, and LLVM emits them for struct literals,
//! defaults and array copies larger than a few bytes: tens of nanoseconds a
//! packet. These helpers use aligned 8-byte words, and volatile accesses so that
//! LLVM cannot fold them back into a call.

use core::{mem::size_of, ptr};

/// Zeroes a value in whole words: 8-byte stores for 8-byte-aligned types, 4-byte
/// ones for 4-byte-aligned types such as `bpf_fib_lookup` (checked at compile time).
#[inline(always)]
pub fn zero<T>(v: &mut T) {
    const {
        assert!(
            align_of::<T>() >= 4 && size_of::<T>() % 4 == 0,
            "zero() needs a type made of 4-byte words"
        );
    }
    if align_of::<T>() >= 8 && size_of::<T>() % 8 == 0 {
        let p = ptr::from_mut(v).cast::<u64>();
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: in bounds and aligned, per the checks above.
            unsafe { ptr::write_volatile(p.add(i), 0) };
        }
    } else {
        let p = ptr::from_mut(v).cast::<u32>();
        for i in 0..size_of::<T>() / 4 {
            // SAFETY: in bounds and aligned, per the checks above.
            unsafe { ptr::write_volatile(p.add(i), 0) };
        }
    }
}

/// Zeroes a 16-byte address field (word-aligned, as said at [`copy_addr`]).
#[inline(always)]
pub fn zero_addr(a: &mut [u8; 16]) {
    let p = a.as_mut_ptr().cast::<u64>();
    // SAFETY: two aligned words in bounds of a 16-byte array.
    unsafe {
        ptr::write_volatile(p, 0);
        ptr::write_volatile(p.add(1), 0);
    }
}

/// Copies a 16-byte address. Every address field of lb-common's map types sits
/// at an 8-byte offset of an 8-byte-aligned struct, so both are word-aligned.
#[inline(always)]
pub fn copy_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
    let d = dst.as_mut_ptr().cast::<u64>();
    let s = src.as_ptr().cast::<u64>();
    // SAFETY: two words in bounds of 16-byte arrays, aligned as said above.
    unsafe {
        ptr::write_volatile(d, ptr::read_volatile(s));
        ptr::write_volatile(d.add(1), ptr::read_volatile(s.add(1)));
    }
}
