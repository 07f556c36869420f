//! Jobs: enqueue one (counted in the metrics by source), cancel one (queued: at once;
//! running: the row asks its worker to stop, and a worker of this process stops at once).

use std::time::Instant;

use crate::store::{now_ms, CancelOutcome, Enqueued, NewJob, Store, StoreError};
use crate::worker::PoolHandle;

/// Enqueues `job`; returns once its row is committed. An idempotency key that already names a
/// job of the channel returns that job with `created: false`.
/// `started` is when the request began, for the enqueue-latency histogram.
pub async fn enqueue(store: &Store, job: NewJob, started: Instant) -> Result<Enqueued, StoreError> {
    let source = job.source.as_str();
    if let Some(o) = &job.agent_options {
        let options: std::collections::BTreeMap<String, String> = serde_json::from_str(o)
            .map_err(|_| StoreError::Invalid("options must be an object of text values".into()))?;
        super::channels::check_options(store, job.channel_id, &options).await?;
    }
    let enq = store.job_insert(job, now_ms()).await?;
    metrics::histogram!(crate::metrics::ENQUEUE_SECONDS, "source" => source)
        .record(started.elapsed().as_secs_f64());
    if enq.created {
        metrics::counter!(crate::metrics::JOBS_ENQUEUED, "source" => source).increment(1);
    }
    Ok(enq)
}

/// Cancels a job. A running job's worker in this process (`pool`) stops at once; a worker
/// elsewhere sees the request at its next heartbeat.
pub async fn cancel(
    store: &Store,
    pool: Option<&PoolHandle>,
    job_id: &str,
) -> Result<CancelOutcome, StoreError> {
    let outcome = store.job_cancel(job_id, now_ms()).await?;
    if outcome == CancelOutcome::Requested {
        if let Some(pool) = pool {
            pool.cancel_local(job_id);
        }
    }
    Ok(outcome)
}
