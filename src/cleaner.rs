//! The retention cleaner: deletes finished jobs (and, by cascade, their events) older than
//! `[database] retention_days`, in batches so the writer is never held for long.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{now_ms, Millis, Store, StoreError};

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

pub struct Cleaner {
    store: Store,
    retention: Duration,
    interval: Duration,
}

impl Cleaner {
    /// A zero `retention` keeps everything.
    pub fn new(store: Store, retention: Duration, interval: Duration) -> Self {
        Cleaner {
            store,
            retention,
            interval,
        }
    }

    /// Deletes every finished job that finished more than `retention` before `now`.
    pub async fn run_once(&self, now: Millis) -> Result<u64, StoreError> {
        if self.retention.is_zero() {
            return Ok(0);
        }
        let before = now - self.retention.as_millis() as i64;
        let mut total = 0;
        loop {
            let n = self.store.job_delete_finished_before(before, BATCH).await?;
            total += n;
            if n < BATCH as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.run_once(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "retention cleaner removed finished jobs"),
                Err(e) => tracing::warn!(error = %e, "retention cleaner failed"),
            }
        }
    }
}
