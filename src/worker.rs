//! The worker pool: claims jobs into `concurrency` slots and runs them through an executor.
//!
//! - The dispatcher claims up to the number of idle slots in one statement. It wakes at once
//!   when this process commits anything that can make a job claimable (an enqueue, a finished
//!   job), and every `poll_interval` to find rows other processes inserted (the CLI,
//!   `sqlite3`), sooner when a retry is due.
//! - One heartbeat renews the leases of all of this process's running jobs and picks up cancel
//!   requests made by other processes; a job whose lease was taken over is told to stop.
//! - Shutdown: claiming stops at once; running jobs get `shutdown_grace` to finish; then they
//!   are stopped and released back to `queued` without counting the attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::SpendPolicy;
use crate::config::Config;
use crate::executor::{Executor, JobContext, Outcome, StopCause};
use tracing::Instrument;

use crate::store::{now_ms, EventKind, HeldJob, Job, JobState, Lease, Millis, Store};

/// How long stopped jobs get to wind down after the grace period before the pool gives up.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Pause after a failed claim before trying again.
const CLAIM_ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// Pool settings, usually from `[worker]`.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub concurrency: usize,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub poll_interval: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub shutdown_grace: Duration,
    /// The day and month budgets are counted in, and `[budget]`'s.
    pub spend: SpendPolicy,
}

impl From<&Config> for PoolConfig {
    fn from(config: &Config) -> Self {
        let w = &config.worker;
        PoolConfig {
            concurrency: w.concurrency as usize,
            lease: Duration::from_secs(w.lease_secs),
            heartbeat: Duration::from_secs(w.heartbeat_secs),
            poll_interval: Duration::from_millis(w.poll_interval_ms),
            retry_base: Duration::from_secs(w.retry_base_secs),
            retry_max: Duration::from_secs(w.retry_max_secs),
            shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
            spend: SpendPolicy::from_config(config),
        }
    }
}

/// The delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped at `max`,
/// with ±20% jitter so retries of many jobs spread out.
pub fn retry_delay(base: Duration, max: Duration, attempt: i64, rng: &mut impl Rng) -> Duration {
    let exp = attempt.clamp(1, 32) as u32 - 1;
    let raw = base.saturating_mul(2u32.saturating_pow(exp)).min(max);
    raw.mul_f64(rng.random_range(0.8..=1.2))
}

/// Running jobs of this pool, by job id.
type Running = Arc<Mutex<HashMap<String, JobContext>>>;

/// A handle to signal a running pool.
#[derive(Clone)]
pub struct PoolHandle {
    running: Running,
    owner: String,
}

impl PoolHandle {
    /// Tells a job this pool is running to stop because a user cancelled it. Returns false
    /// when the job is not running here (the heartbeat picks up cancels made elsewhere).
    pub fn cancel_local(&self, job_id: &str) -> bool {
        match self.running.lock().expect("running lock").get(job_id) {
            Some(ctx) => {
                ctx.stop(StopCause::UserCancel);
                true
            }
            None => false,
        }
    }

    /// Ids of the jobs this pool is running.
    pub fn running_jobs(&self) -> Vec<String> {
        self.running
            .lock()
            .expect("running lock")
            .keys()
            .cloned()
            .collect()
    }

    /// This pool's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

pub struct WorkerPool {
    store: Store,
    executor: Arc<dyn Executor>,
    cfg: PoolConfig,
    owner: String,
    running: Running,
}

impl WorkerPool {
    /// `owner` identifies this process in lease columns; it must be unique per process start.
    pub fn new(store: Store, executor: Arc<dyn Executor>, cfg: PoolConfig, owner: String) -> Self {
        WorkerPool {
            store,
            executor,
            cfg,
            owner,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn handle(&self) -> PoolHandle {
        PoolHandle {
            running: self.running.clone(),
            owner: self.owner.clone(),
        }
    }

    /// Runs until `shutdown` fires, then drains as described in the module docs.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.cfg.concurrency));
        let tracker = TaskTracker::new();
        let beat_stop = CancellationToken::new();
        let beat = tokio::spawn(heartbeat_loop(
            self.store.clone(),
            self.owner.clone(),
            self.cfg.clone(),
            self.running.clone(),
            beat_stop.clone(),
        ));
        let wake = self.store.jobs_changed();
        tracing::info!(owner = %self.owner, slots = self.cfg.concurrency, "worker pool started");

        let mut check_first = true; // a timer wake reads before it writes
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let idle = slots.available_permits();
            let mut next_due: Option<Millis> = None;
            if idle > 0 {
                let now = now_ms();
                let limits = self.cfg.spend.limits(now);
                let mut due = true;
                if check_first {
                    match self.store.job_next_due(now, &limits).await {
                        Ok(outlook) => {
                            due = outlook.due;
                            next_due = outlook.next;
                            if !outlook.held.is_empty() {
                                self.tell_held(&outlook.held, now).await;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the queue"),
                    }
                }
                if due {
                    let claim_started = std::time::Instant::now();
                    let claimed = self
                        .store
                        .job_claim_many(
                            &self.owner,
                            idle as i64,
                            now,
                            self.cfg.lease.as_millis() as i64,
                            &limits,
                        )
                        .await;
                    metrics::histogram!(crate::metrics::CLAIM_SECONDS)
                        .record(claim_started.elapsed().as_secs_f64());
                    match claimed {
                        Ok(jobs) => {
                            let short = !check_first && jobs.len() < idle;
                            for job in jobs {
                                let permit = slots.clone().try_acquire_owned().expect("idle slot");
                                let ctx = JobContext::new(job, self.store.clone());
                                self.running
                                    .lock()
                                    .expect("running lock")
                                    .insert(ctx.job.id.clone(), ctx.clone());
                                let run = run_jobs(
                                    ctx,
                                    self.store.clone(),
                                    self.executor.clone(),
                                    self.cfg.clone(),
                                    self.running.clone(),
                                    shutdown.clone(),
                                );
                                tracker.spawn(async move {
                                    run.await;
                                    drop(permit);
                                });
                            }
                            // Woken, and fewer jobs than slots: learn when the next one is due
                            // rather than wait for the poll. On a shared database a job another
                            // node enqueued "now" can be a few ms ahead of this node's reading
                            // of the database clock.
                            if short {
                                if let Ok(o) = self.store.job_next_due(now, &limits).await {
                                    next_due = o.next;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "claim failed");
                            tokio::time::sleep(CLAIM_ERROR_BACKOFF).await;
                        }
                    }
                }
            }
            let mut wait = self.cfg.poll_interval;
            if let Some(at) = next_due {
                let until = Duration::from_millis((at - now_ms()).max(0) as u64);
                wait = wait.min(until);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => check_first = false,
                _ = tokio::time::sleep(wait) => check_first = true,
            }
        }

        // Drain: no more claims; let running jobs finish within the grace period.
        tracker.close();
        let n = self.running.lock().expect("running lock").len();
        if n > 0 {
            tracing::info!(running = n, grace = ?self.cfg.shutdown_grace, "waiting for running jobs");
        }
        if tokio::time::timeout(self.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            let left: Vec<JobContext> = self
                .running
                .lock()
                .expect("running lock")
                .values()
                .cloned()
                .collect();
            tracing::warn!(
                jobs = left.len(),
                "grace period over; releasing running jobs"
            );
            for ctx in left {
                ctx.stop(StopCause::Shutdown);
            }
            if tokio::time::timeout(STOP_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("jobs did not stop; their leases will expire and be rescued");
            }
        }
        beat_stop.cancel();
        let _ = beat.await;
        let _ = self.store.flush().await;
        tracing::info!(owner = %self.owner, "worker pool stopped");
    }

    /// Tells each newly held job why it waits (a `held` event, once per attempt). A held job
    /// runs when the window ends (the next timer wake after it) or when its budget is raised
    /// (the write wakes the pool).
    async fn tell_held(&self, held: &[HeldJob], now: Millis) {
        let notes = self.cfg.spend.held_notes(held, now);
        for n in &notes {
            tracing::info!(job = %n.job_id, reason = n.text.as_deref().unwrap_or(""), "job held");
        }
        match self.store.job_note_held(notes).await {
            Ok(n) => metrics::counter!(crate::metrics::JOBS_HELD).increment(n),
            Err(e) => tracing::warn!(error = %e, "cannot record held jobs"),
        }
    }
}

/// Runs a claimed job in its slot; when it succeeds, the channel's next due job is claimed in
/// the same transaction as the completion and run in the same slot (one write instead of two,
/// and a channel's queue drains without waiting for the dispatcher).
async fn run_jobs(
    ctx: JobContext,
    store: Store,
    executor: Arc<dyn Executor>,
    cfg: PoolConfig,
    running: Running,
    shutdown: CancellationToken,
) {
    let mut next = Some(ctx);
    while let Some(ctx) = next.take() {
        let claim_next = !shutdown.is_cancelled();
        let span = tracing::info_span!(
            "job",
            job = %ctx.job.id,
            attempt = ctx.job.attempt,
            channel = %ctx.job.channel,
            source = %ctx.job.source,
        );
        let run = run_job(&ctx, &store, &executor, &cfg, &running, claim_next);
        if let Some(job) = run.instrument(span).await {
            let ctx = JobContext::new(job, store.clone());
            running
                .lock()
                .expect("running lock")
                .insert(ctx.job.id.clone(), ctx.clone());
            next = Some(ctx);
        }
    }
}

/// Runs one attempt; returns the next job when `claim_next` and one was claimed.
async fn run_job(
    ctx: &JobContext,
    store: &Store,
    executor: &Arc<dyn Executor>,
    cfg: &PoolConfig,
    running: &Running,
    claim_next: bool,
) -> Option<Job> {
    let job: Job = ctx.job.clone();
    let Some(lease) = job.lease() else {
        tracing::error!(job = %job.id, "claimed job has no lease owner");
        return None;
    };
    let rerun = match (job.attempt, job.interruptions) {
        (0 | 1, _) => String::new(),
        (a, 0) => format!(" (re-run: attempt {a} of {})", job.max_attempts),
        (a, i) => format!(
            " (re-run: attempt {a}; {i} interrupted by gorp's death, not counted against \
             max_attempts {})",
            job.max_attempts
        ),
    };
    ctx.emit(
        EventKind::Started,
        Some(format!("started by {}{}", lease.owner, rerun)),
        Some(serde_json::json!({ "owner": lease.owner, "attempt": job.attempt })),
    )
    .await;

    // The executor runs in its own task so a panic fails the attempt instead of the worker.
    let exec_ctx = ctx.clone();
    let outcome = match tokio::spawn(executor.run(exec_ctx).in_current_span()).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed {
            error: format!("executor panicked: {e}"),
            retryable: true,
        },
    };
    running.lock().expect("running lock").remove(&job.id);
    finish(ctx, store, cfg, &lease, outcome, claim_next).await
}

async fn finish(
    ctx: &JobContext,
    store: &Store,
    cfg: &PoolConfig,
    lease: &Lease,
    outcome: Outcome,
    claim_next: bool,
) -> Option<Job> {
    let job = &ctx.job;
    let cause = ctx.stop_cause();
    let now = now_ms();
    let released = || async {
        let ok = store.job_release_if_running(lease, now).await;
        if matches!(ok, Ok(true)) {
            let text = "gorp shut down before the job finished; it runs again after restart";
            ctx.emit(EventKind::Released, Some(text.into()), None).await;
        }
        ok
    };
    let label = match (&outcome, cause) {
        (Outcome::Succeeded { .. }, _) => "succeeded",
        (_, Some(StopCause::Shutdown)) => "released",
        (_, Some(StopCause::LeaseLost)) => "lease_lost",
        (Outcome::Cancelled { .. }, _) => "cancelled",
        (Outcome::Failed { .. }, _) => "failed_attempt",
        (Outcome::Stopped { .. }, _) => "stopped",
    };
    let mut next = None;
    let result = match (outcome, cause) {
        (Outcome::Succeeded { stop_reason }, _) if claim_next => {
            let lease_ms = cfg.lease.as_millis() as i64;
            let limits = cfg.spend.limits(now);
            match store
                .job_complete_and_claim(lease, job.channel_id, stop_reason, now, lease_ms, &limits)
                .await
            {
                Ok((won, job)) => {
                    next = job;
                    Ok(won)
                }
                Err(e) => Err(e),
            }
        }
        (Outcome::Succeeded { stop_reason }, _) => {
            store.job_complete_if_running(lease, stop_reason, now).await
        }
        (_, Some(StopCause::Shutdown)) => released().await,
        (_, Some(StopCause::LeaseLost)) => Ok(false),
        (Outcome::Cancelled { reason }, _) => store.job_cancel_if_running(lease, reason, now).await,
        (Outcome::Stopped { stop_reason, error }, _) => {
            ctx.emit(EventKind::Error, Some(error.clone()), None).await;
            store
                .job_stop_if_running(lease, &stop_reason, error, now)
                .await
                .map(|s| s.is_some())
        }
        (Outcome::Failed { error, retryable }, _) => {
            let failures = job.counted_attempts();
            let delay = retry_delay(cfg.retry_base, cfg.retry_max, failures, &mut rand::rng());
            let retry_at = retryable.then(|| now + delay.as_millis() as i64);
            ctx.emit(EventKind::Error, Some(error.clone()), None).await;
            match store.job_fail_if_running(lease, error, retry_at, now).await {
                Ok(Some(JobState::Queued)) => {
                    let at = retry_at.unwrap_or(now);
                    let text = format!(
                        "attempt {} of {} failed; retry in {:.1}s",
                        failures,
                        job.max_attempts,
                        (at - now) as f64 / 1000.0
                    );
                    ctx.emit(EventKind::RetryScheduled, Some(text), None).await;
                    Ok(true)
                }
                Ok(s) => Ok(s.is_some()),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(true) => {
            metrics::counter!(crate::metrics::JOBS_FINISHED, "outcome" => label).increment(1)
        }
        Ok(false) => {
            tracing::warn!(job = %job.id, attempt = job.attempt, "lease lost; another attempt owns the job")
        }
        Err(e) => {
            tracing::error!(job = %job.id, error = %e, "cannot record job outcome; the rescuer will retry it")
        }
    }
    next
}

/// Reads the cancel requests for this pool's running jobs and stops those jobs. Gives up
/// after `within` (a database that does not answer must not hold up self-fencing).
async fn read_cancels(store: &Store, owner: &str, running: &Running, within: Duration) {
    if running.lock().expect("running lock").is_empty() {
        return;
    }
    let Ok(read) = tokio::time::timeout(within, store.job_cancel_requests(owner)).await else {
        tracing::warn!(timeout = ?within, "cancel requests got no answer in time");
        return;
    };
    match read {
        Ok(ids) => {
            let map = running.lock().expect("running lock");
            for (id, attempt) in ids {
                if let Some(ctx) = map.get(&id).filter(|c| c.job.attempt == attempt) {
                    ctx.stop(StopCause::UserCancel);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read cancel requests"),
    }
}

/// Stops every running job whose lease was last renewed (or claimed) more than `after` ago.
fn fence(running: &Running, renewed: tokio::time::Instant, after: Duration) {
    let map = running.lock().expect("running lock");
    for ctx in map.values() {
        let since = renewed.max(ctx.claimed).elapsed();
        if since >= after && ctx.stop_cause().is_none() {
            tracing::error!(job = %ctx.job.id, since_renewed = ?since, "cannot renew the job's lease; stopping it (self-fencing)");
            ctx.stop(StopCause::LeaseLost);
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn heartbeat_loop(
    store: Store,
    owner: String,
    cfg: PoolConfig,
    running: Running,
    stop: CancellationToken,
) {
    let cancels = store.cancels_requested();
    // Cancel requests are read every poll interval (a cheap read); leases are renewed every
    // heartbeat (a write).
    let mut tick = tokio::time::interval(cfg.poll_interval.min(cfg.heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = tokio::time::Instant::now();
    // When the last renewal that succeeded was sent. A job whose lease was not renewed for
    // three quarters of its length is stopped (self-fencing) by a watch of its own, which no
    // hung database call here can hold up: another node may rescue the job once the lease
    // runs out, and by then it no longer runs here.
    let renewed = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let fence_after = cfg.lease.mul_f64(0.75);
    let watch = {
        let (renewed, running, stop) = (renewed.clone(), running.clone(), stop.clone());
        let every = (fence_after / 20).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let last = *renewed.lock().expect("renewed lock");
                fence(&running, last, fence_after);
            }
        })
    };
    let _watch = AbortOnDrop(watch);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = cancels.notified() => {
                // Another node asked to cancel a job: read the requests now.
                read_cancels(&store, &owner, &running, cfg.heartbeat).await;
                continue;
            }
        }
        if last_beat.elapsed() < cfg.heartbeat {
            read_cancels(&store, &owner, &running, cfg.heartbeat).await;
            continue;
        }
        last_beat = tokio::time::Instant::now();
        // Jobs registered before the heartbeat is sent were claimed before it commits, so a job
        // of this snapshot that was not renewed has been taken over by another worker.
        let before: Vec<(String, i64)> = running
            .lock()
            .expect("running lock")
            .values()
            .map(|c| (c.job.id.clone(), c.job.attempt))
            .collect();
        let sent = tokio::time::Instant::now();
        let beat = store.job_heartbeat(&owner, now_ms(), cfg.lease.as_millis() as i64);
        let renewed_jobs = match tokio::time::timeout(cfg.heartbeat, beat).await {
            Ok(Ok(r)) => {
                *renewed.lock().expect("renewed lock") = sent;
                r
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "heartbeat failed");
                continue;
            }
            Err(_) => {
                tracing::warn!(timeout = ?cfg.heartbeat, "heartbeat got no answer in time");
                continue;
            }
        };
        let map = running.lock().expect("running lock");
        for (id, attempt) in before {
            let Some(ctx) = map.get(&id).filter(|c| c.job.attempt == attempt) else {
                continue; // finished meanwhile
            };
            match renewed_jobs
                .iter()
                .find(|(rid, a, _)| *rid == id && *a == attempt)
            {
                Some((_, _, true)) => ctx.stop(StopCause::UserCancel),
                Some(_) => {}
                None => {
                    tracing::warn!(job = %id, attempt, "lease taken over; stopping this attempt");
                    ctx.stop(StopCause::LeaseLost)
                }
            }
        }
    }
}
