//! The rescuer: returns running jobs whose lease expired (the gorp running them died or hung)
//! to the queue. Such a run was interrupted, not failed, so it does not spend the job's
//! attempts; a job interrupted more than `[worker] max_rescues` times fails. Each rescued job
//! gets a `rescued` event saying why, so its history shows the re-run.

use std::time::Duration;

use crate::background::Service;
use crate::store::{Millis, Rescued, Store, StoreError};

/// How often the rescuer looks for expired leases, unless configured.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

pub struct Rescuer {
    store: Store,
    interval: Duration,
    max_rescues: i64,
    /// When the first running job's lease runs out, as the last pass read it: the next pass
    /// runs then rather than up to an interval later, so a dead node's jobs are queued again
    /// as soon as their leases let them.
    next_expiry: std::sync::atomic::AtomicI64,
}

impl Rescuer {
    pub fn new(store: Store, interval: Duration, max_rescues: u32) -> Self {
        Rescuer {
            store,
            interval,
            max_rescues: i64::from(max_rescues),
            next_expiry: std::sync::atomic::AtomicI64::new(i64::MAX),
        }
    }

    /// One pass at time `now`. On SQLite, jobs of a lease owner that died on this host are
    /// rescued at once instead of after their lease runs out; on a shared database (other
    /// machines, containers that all have pid 1) only leases decide. Every node runs the
    /// rescuer: each expired job is locked and rescued by one of them.
    pub async fn run_once(&self, now: Millis) -> Result<Vec<Rescued>, StoreError> {
        let owners = if self.store.is_shared() {
            Vec::new()
        } else {
            self.store.job_lease_owners().await?
        };
        for owner in owners {
            if crate::instance::holder_is_dead(&owner) {
                tracing::warn!(owner = %owner, "lease owner died; rescuing its jobs now");
                self.store.job_expire_owner(&owner, now).await?;
            }
        }
        let rescued = self.store.job_rescue_expired(now, self.max_rescues).await?;
        for j in &rescued {
            tracing::warn!(job = %j.job_id, attempt = j.attempt, state = %j.state, "rescued job with expired lease");
        }
        let next = self.store.job_next_lease_expiry().await?;
        self.next_expiry.store(
            next.unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(rescued)
    }
}

impl Service for Rescuer {
    type Report = Vec<Rescued>;
    const NAME: &'static str = "rescuer";

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn run_once(&self, now: Millis) -> Result<Vec<Rescued>, StoreError> {
        Rescuer::run_once(self, now).await
    }

    fn counts(report: &Vec<Rescued>) -> Vec<(&'static str, u64)> {
        vec![("rescued", report.len() as u64)]
    }

    /// Just after the first running lease runs out (a lease is expired once `now` passes it).
    fn next_pass(&self, now: Millis) -> Option<Duration> {
        let at = self.next_expiry.load(std::sync::atomic::Ordering::Relaxed);
        (at != i64::MAX).then(|| Duration::from_millis((at + 1 - now).max(0) as u64))
    }
}
