//! The retention cleaner: deletes finished jobs (and, by cascade, their events) older than
//! `[database] retention_days`, in batches so the writer is never held for long.

use std::time::Duration;

use crate::background::Service;
use crate::store::{Millis, Store, StoreError};

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
}

impl Service for Cleaner {
    type Report = u64;
    const NAME: &'static str = "cleaner";

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn run_once(&self, now: Millis) -> Result<u64, StoreError> {
        Cleaner::run_once(self, now).await
    }

    fn counts(deleted: &u64) -> Vec<(&'static str, u64)> {
        vec![("deleted", *deleted)]
    }
}
