//! `BPF_PROG_TEST_RUN` of an XDP or tc program on one frame, with the context
//! the programs read (the interface the frame arrives on), as the datapath's
//! tests and the benchmark run them.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, TestRunResult, Xdp};

/// What a test run returned.
#[derive(Debug)]
pub struct Run<R> {
    /// The program's return value.
    pub ret: R,
    /// The frame after the last iteration.
    pub frame: Vec<u8>,
    /// The kernel's time per iteration.
    pub per_iteration: Duration,
}

/// `struct xdp_md` for `frame` arriving on `ifindex`: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_ctx(frame: &[u8], ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Runs `prog` `repeat` times (at least once) on `frame` with context `ctx`,
/// with room for the output to grow (an ICMP error quoting the frame).
fn run<P>(prog: &P, frame: &[u8], ctx: &[u8], repeat: u32) -> Result<Run<u32>>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len().max(4096) + 512];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        ret: r.return_value,
        frame: out,
        per_iteration: r.duration,
    })
}

/// Runs the XDP program `repeat` times (at least once) on `frame` arriving
/// on `ifindex`.
pub fn xdp(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<Run<u32>> {
    run(prog, frame, &xdp_ctx(frame, ifindex), repeat).context("XDP")
}

/// Runs the tc program once on `frame` arriving on `ifindex`.
pub fn tc(prog: &SchedClassifier, frame: &[u8], ifindex: u32) -> Result<Run<i32>> {
    // struct __sk_buff: ifindex at offset 40; everything else zero.
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let r = run(prog, frame, &ctx, 1).context("tc")?;
    Ok(Run {
        // tc verdicts are signed (TC_ACT_UNSPEC is -1).
        ret: r.ret as i32,
        frame: r.frame,
        per_iteration: r.per_iteration,
    })
}

/// Runs the XDP program `count` times on `frame` arriving on `ifindex` with
/// live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`, `batch` at a time): what it
/// transmits goes out on the interface.
pub fn xdp_live_frames(
    prog: &Xdp,
    frame: &[u8],
    ifindex: u32,
    count: u32,
    batch: u32,
) -> Result<()> {
    let ctx = xdp_ctx(frame, ifindex);
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: count,
        attrs: TestRunAttrs::new().xdp_live_frames(batch),
        ..TestRunOptions::default()
    })
    .context("BPF_PROG_RUN live frames")?;
    Ok(())
}
