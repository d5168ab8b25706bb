#![no_std]
//! The datapath is the `lb` binary (src/main.rs); the `testkit` and `bench`
//! binaries hold programs for tests and benchmarks. This library holds what
//! they share as objects, and lets lb-agent declare a build dependency, so
//! cargo rebuilds the agent when the datapath changes.

/// What every BPF object of this crate needs besides its programs: a panic
/// handler (the verifier rejects any program that could reach it), an empty
/// `main` for host builds (`cargo check`, clippy), and the GPL license the
/// helpers used here require.
#[macro_export]
macro_rules! object_items {
    () => {
        #[cfg(target_arch = "bpf")]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[cfg(not(target_arch = "bpf"))]
        fn main() {}

        #[cfg(target_arch = "bpf")]
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}
