//! The test-kit XDP programs (lb-ebpf's `testkit` object): a pass program that
//! gives a veth the NAPI context XDP_TX from its peer needs, and a counting
//! sink. Attachments last as long as the returned value.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, xdp::XdpMode},
};

use crate::ns;

/// The test-kit object (see the `lb-objects` crate).
pub static TESTKIT: &[u8] = lb_objects::TESTKIT;

/// Test-kit programs attached to interfaces of one namespace.
pub struct Attached {
    ebpf: Ebpf,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attached")
    }
}

/// Attaches the test-kit program `program` (`xdp_pass` or `xdp_sink`) to
/// `ifaces` in namespace `ns`.
pub fn attach(ns: &str, program: &str, ifaces: &[String]) -> Result<Attached> {
    let program = program.to_string();
    let ifaces = ifaces.to_vec();
    ns::try_in_netns(ns, move || -> Result<Attached> {
        let mut ebpf = Ebpf::load(TESTKIT).context("loading the test-kit object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(&program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {program}"))?;
        for iface in &ifaces {
            prog.attach(iface, XdpMode::default())
                .with_context(|| format!("attaching {program} to {iface}"))?;
        }
        Ok(Attached { ebpf })
    })?
}

impl Attached {
    /// Packets and bytes `xdp_sink` counted, summed over CPUs.
    pub fn sink_counters(&self) -> Result<(u64, u64)> {
        let map = self.ebpf.map("sink_stats").context("no sink_stats map")?;
        let stats: PerCpuArray<_, [u64; 2]> = PerCpuArray::try_from(map)?;
        let values = stats.get(&0, 0)?;
        Ok(values.iter().fold((0, 0), |(p, b), v| (p + v[0], b + v[1])))
    }
}
