//! The interface between the worker pool and whatever runs a job's prompt.
//!
//! The worker claims a job, hands it to an [`Executor`] with a [`JobContext`], and moves the job
//! to its next state from the returned [`Outcome`]. Executors write the job's output through
//! [`JobContext::emit`]; every event is committed before the job's terminal transition because
//! both travel through the store's single writer in order.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::store::{now_ms, EventKind, Job, NewEvent, Store};

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The prompt finished; `stop_reason` is the agent's (e.g. `end_turn`).
    Succeeded { stop_reason: Option<String> },
    /// The attempt failed. A retryable failure is re-queued with backoff while attempts remain.
    Failed { error: String, retryable: bool },
    /// The attempt stopped because its context was cancelled.
    Cancelled { reason: String },
    /// The job passed one of its limits and stops for good (never retried): `failed` with this
    /// stop reason (`budget`) and `error` saying which limit and the figures.
    Stopped { stop_reason: String, error: String },
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// A user cancelled the job.
    UserCancel,
    /// gorp is shutting down and the grace period ran out: the job is released, not failed.
    Shutdown,
    /// Another worker took the job over (this worker's lease expired).
    LeaseLost,
}

/// Runs job prompts.
pub trait Executor: Send + Sync + 'static {
    /// Runs one attempt of `ctx.job`. Must return soon after `ctx.cancelled()` fires.
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome>;
}

/// What an executor gets for one attempt.
#[derive(Clone)]
pub struct JobContext {
    pub job: Job,
    /// When the job was claimed: its lease runs from here until the first renewal.
    pub claimed: tokio::time::Instant,
    store: Store,
    cancel: CancellationToken,
    cause: Arc<Mutex<Option<StopCause>>>,
}

impl JobContext {
    pub(crate) fn new(job: Job, store: Store) -> Self {
        JobContext {
            job,
            claimed: tokio::time::Instant::now(),
            store,
            cancel: CancellationToken::new(),
            cause: Arc::new(Mutex::new(None)),
        }
    }

    /// The store, for executors that keep per-channel state (the ACP session id).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends an event to the job's log (committed before the job's outcome).
    pub async fn emit(
        &self,
        kind: EventKind,
        text: Option<String>,
        data: Option<serde_json::Value>,
    ) {
        let ev = NewEvent {
            job_id: self.job.id.clone(),
            attempt: self.job.attempt,
            kind: kind.as_str().to_string(),
            text,
            data,
            at: now_ms(),
        };
        if let Err(e) = self.store.job_events_append(vec![ev]).await {
            tracing::error!(job = %self.job.id, error = %e, "cannot record job event");
        }
    }

    /// Appends events to the job's log in one write, in order, and waits for their commit: a
    /// caller that streams faster than the database writes is slowed down rather than queueing
    /// without bound.
    pub async fn emit_all(&self, events: Vec<(String, Option<String>, Option<serde_json::Value>)>) {
        let at = now_ms();
        let rows = events
            .into_iter()
            .map(|(kind, text, data)| NewEvent {
                job_id: self.job.id.clone(),
                attempt: self.job.attempt,
                kind,
                text,
                data,
                at,
            })
            .collect();
        let written = match self.store.job_events_append(rows).await {
            Ok(()) => self.store.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::error!(job = %self.job.id, error = %e, "cannot record job events");
        }
    }

    /// Resolves when the attempt must stop.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// The token that fires when the attempt must stop.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Why the attempt was asked to stop, if it was.
    pub fn stop_cause(&self) -> Option<StopCause> {
        *self.cause.lock().expect("cause lock")
    }

    /// Asks the attempt to stop. The first cause wins.
    pub(crate) fn stop(&self, cause: StopCause) {
        let mut c = self.cause.lock().expect("cause lock");
        if c.is_none() {
            *c = Some(cause);
        }
        drop(c);
        self.cancel.cancel();
    }
}
