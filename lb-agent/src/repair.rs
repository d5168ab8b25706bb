//! When the agent retries and repairs: the verify-and-repair pass
//! ([`crate::reconcile::Reconciler::verify`]) runs every `--verify-every`, and
//! sooner, with backoff, while something failed: a map write (the maps may
//! then differ from what the reconciler believes), or a port refused for lack
//! of room (tried again at each pass, so it is written once room frees up).

use std::time::Duration;

use tokio::time::Instant;

use crate::{interfaces::Interfaces, metrics::Metrics, reconcile::Drift, sync::Engine};

/// The first retry after a failure comes this soon; each one after that
/// waits twice as long, up to the verify period.
const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RepairSchedule {
    every: Duration,
    next: Instant,
    backoff: Duration,
}

impl RepairSchedule {
    /// The first pass one period after `now`.
    pub fn new(every: Duration, now: Instant) -> Self {
        Self {
            every,
            next: now + every,
            backoff: FIRST_RETRY,
        }
    }

    /// When the next pass is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Something failed at `now`: the next pass comes after the current
    /// backoff, unless one is due sooner.
    pub fn failed(&mut self, now: Instant) {
        self.next = self.next.min(now + self.backoff);
    }

    /// A pass ran at `now`; `failing` says whether failures remain. While
    /// they do, passes come with doubling backoff; once they are gone, every
    /// period again.
    pub fn ran(&mut self, now: Instant, failing: bool) {
        if failing {
            self.next = now + self.backoff;
            self.backoff = (self.backoff * 2).min(self.every);
        } else {
            self.next = now + self.every;
            self.backoff = FIRST_RETRY;
        }
    }
}

/// One pass: repairs what drifted (logged and counted per map) and asks the
/// next sync to try again the ports that failed. Returns whether failures
/// remain: ports still refused, or a map that could not be read or written.
pub fn pass(engine: &mut Engine, interfaces: &Interfaces, metrics: &Metrics) -> bool {
    let mut failing = false;
    let started = std::time::Instant::now();
    let verified = engine.verify().map(|reconciled| -> anyhow::Result<Drift> {
        let mut r = engine.reconciler();
        let maps = r.maps_mut();
        let (ifaces, tx_ports) = interfaces.repair(maps)?;
        Ok(Drift {
            node: maps.repair_node_maps()?,
            interfaces: ifaces,
            tx_ports,
            ..reconciled?
        })
    });
    match verified {
        None => {}
        Some(Ok(drift)) => {
            log::debug!("verify pass in {:?}: drift {drift}", started.elapsed());
            metrics.agent.verify_passes.inc();
            for (map, n) in drift.per_map() {
                if n > 0 {
                    metrics
                        .agent
                        .map_drift
                        .get_or_create(&vec![("map".into(), map.into())])
                        .inc_by(n as u64);
                }
            }
            if drift.total() > 0 {
                log::warn!("verify: the maps had drifted and were repaired: {drift}");
            }
        }
        Some(Err(e)) => {
            log::error!("verify: {e:#}");
            metrics.agent.error("map_verify");
            failing = true;
        }
    }
    if engine.retry_failed() {
        log::info!(
            "trying again {} port(s) that could not be written",
            engine.reconciler().failed_ports().len()
        );
        failing = true;
    }
    failing || engine.reconciler().take_repair_due()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_bring_the_pass_forward_with_doubling_backoff_then_the_period_resumes() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let mut s = RepairSchedule::new(every, t0);
        assert_eq!(s.next(), t0 + every);

        s.failed(t0);
        assert_eq!(s.next(), t0 + Duration::from_secs(1));
        // Another failure does not push it back.
        s.failed(t0 + Duration::from_millis(500));
        assert_eq!(s.next(), t0 + Duration::from_secs(1));

        let mut now = t0 + Duration::from_secs(1);
        let mut waits = Vec::new();
        for _ in 0..8 {
            s.ran(now, true);
            waits.push((s.next() - now).as_secs());
            now = s.next();
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);

        s.ran(now, false);
        assert_eq!(s.next(), now + every);
        // The backoff starts over.
        s.failed(now);
        assert_eq!(s.next(), now + Duration::from_secs(1));
    }
}
