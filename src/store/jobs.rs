//! The `jobs` table: the queue. Enqueue (multi-row, idempotent per channel), claim (one job
//! per idle channel, in queue order), heartbeat, the fenced outcomes, cancel, rescue of
//! expired leases, retention, and the reads of jobs.
//!
//! Why one file: it is the queue table; its writes are the state machine, kept together so
//! every transition out of `running` can be read side by side with its fence.

use std::collections::HashSet;

use serde::Serialize;

use super::budgets;
use super::events::insert_events;
use super::writer::{Applied, Conn, Op, Write, MAX_ROWS_PER_INSERT};
use super::*;

/// `SELECT` of whole [`Job`] rows (`j`, with its channel `c`); the rest of the query
/// (`WHERE …`) follows.
macro_rules! select_jobs {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Job,
            r#"SELECT j.id AS "id!", j.channel_id, c.name AS channel,
                      j.source AS "source: Source", j.prompt, j.state AS "state: JobState",
                      j.priority, j.attempt, j.max_attempts, j.interruptions, j.run_at,
                      j.lease_owner, j.lease_expires_at,
                      j.cancel_requested AS "cancel_requested: bool",
                      j.idempotency_key, j.reply_target, j.stop_reason, j.error, j.created_at,
                      j.started_at, j.finished_at, j.schedule_id, j.scheduled_for,
                      c.permission_policy AS "permission_policy: PermissionPolicy",
                      j.timeout_secs, j.max_cost_usd, c.budget_job_usd, c.budget_job_tokens,
                      j.agent_options, c.agent_options AS channel_options
               FROM jobs j JOIN channels c ON c.id = j.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

/// An `UPDATE jobs …` that returns the whole [`Job`] rows it changed.
macro_rules! update_returning_jobs {
    ($update:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Job,
            $update + r#"
               RETURNING id AS "id!", channel_id,
                         (SELECT c.name FROM channels c WHERE c.id = jobs.channel_id)
                             AS "channel!: String",
                         source AS "source: Source", prompt, state AS "state: JobState",
                         priority, attempt, max_attempts, interruptions, run_at, lease_owner,
                         lease_expires_at, cancel_requested AS "cancel_requested: bool",
                         idempotency_key, reply_target, stop_reason, error, created_at,
                         started_at, finished_at, schedule_id, scheduled_for,
                         (SELECT c.permission_policy FROM channels c WHERE c.id = jobs.channel_id)
                             AS "permission_policy!: PermissionPolicy",
                         timeout_secs, max_cost_usd,
                         (SELECT c.budget_job_usd FROM channels c WHERE c.id = jobs.channel_id)
                             AS "budget_job_usd?: f64",
                         (SELECT c.budget_job_tokens FROM channels c WHERE c.id = jobs.channel_id)
                             AS "budget_job_tokens?: i64",
                         agent_options,
                         (SELECT c.agent_options FROM channels c WHERE c.id = jobs.channel_id)
                             AS "channel_options!: String""#
            $(, $arg)*
        )
    };
}

impl Store {
    // ----- writes ---------------------------------------------------------------------------

    /// Enqueues one job. Concurrent calls share one transaction (group commit). Returns once the
    /// row is committed. With an idempotency key that already exists for the channel and
    /// source, returns the existing job with `created: false`.
    pub async fn job_insert(&self, job: NewJob, now: Millis) -> Result<Enqueued> {
        if let Some(pg) = &self.pg {
            return pg.job_insert(job, now).await;
        }
        let mut v = self.job_insert_many(vec![job], now).await?;
        v.pop().ok_or(StoreError::WriterGone)
    }

    /// Enqueues many jobs in one transaction.
    pub async fn job_insert_many(&self, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>> {
        if let Some(pg) = &self.pg {
            return pg.job_insert_many(jobs, now).await;
        }
        for j in &jobs {
            j.validate().map_err(StoreError::Invalid)?;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Enqueue { jobs, now, reply }).await?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Claims up to `limit` due jobs for `owner`, at most one per channel and never one whose
    /// channel already has a running job or has spent its budget for the day or month, in
    /// priority order.
    pub async fn job_claim_many(
        &self,
        owner: &str,
        limit: i64,
        now: Millis,
        lease_ms: i64,
        limits: &SpendLimits,
    ) -> Result<Vec<Job>> {
        if let Some(pg) = &self.pg {
            return pg.job_claim_many(owner, limit, now, lease_ms, limits).await;
        }
        self.write(Claim {
            owner: owner.to_string(),
            limit,
            now,
            lease_until: now + lease_ms,
            limits: *limits,
        })
        .await
    }

    /// Renews the leases of every job `owner` is running. Returns (job id, attempt,
    /// cancel requested) for each renewed job.
    pub async fn job_heartbeat(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
    ) -> Result<Vec<(String, i64, bool)>> {
        if let Some(pg) = &self.pg {
            return pg.job_heartbeat(owner, now, lease_ms).await;
        }
        self.write(Heartbeat {
            owner: owner.to_string(),
            lease_until: now + lease_ms,
        })
        .await
    }

    /// `running → succeeded`, if the lease still holds.
    pub async fn job_complete_if_running(
        &self,
        lease: &Lease,
        stop_reason: Option<String>,
        now: Millis,
    ) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.job_complete_if_running(lease, stop_reason, now).await;
        }
        self.write(Complete {
            lease: lease.clone(),
            stop_reason,
            now,
        })
        .await
    }

    /// `running → succeeded`, and in the same transaction claims the next due job of the
    /// job's channel (`channel_id`) for the same owner, unless the channel's budget is now
    /// spent. Returns whether the fence held and the claimed job.
    pub async fn job_complete_and_claim(
        &self,
        lease: &Lease,
        channel_id: i64,
        stop_reason: Option<String>,
        now: Millis,
        lease_ms: i64,
        limits: &SpendLimits,
    ) -> Result<(bool, Option<Job>)> {
        if let Some(pg) = &self.pg {
            return pg
                .job_complete_and_claim(lease, channel_id, stop_reason, now, lease_ms, limits)
                .await;
        }
        self.write(CompleteClaim {
            done: Complete {
                lease: lease.clone(),
                stop_reason,
                now,
            },
            channel_id,
            lease_until: now + lease_ms,
            limits: *limits,
        })
        .await
    }

    /// `running → queued` (retry at `retry_at`, when given and attempts are left) or
    /// `running → failed`. Returns the new state, or `None` when the fence did not hold.
    pub async fn job_fail_if_running(
        &self,
        lease: &Lease,
        error: String,
        retry_at: Option<Millis>,
        now: Millis,
    ) -> Result<Option<JobState>> {
        if let Some(pg) = &self.pg {
            return pg.job_fail_if_running(lease, error, retry_at, now).await;
        }
        self.write(Fail {
            lease: lease.clone(),
            error,
            retry_at,
            now,
            stop_reason: None,
        })
        .await
    }

    /// `running → failed` for good with a stop reason (a limit it passed, such as `budget`), if
    /// the lease still holds.
    pub async fn job_stop_if_running(
        &self,
        lease: &Lease,
        stop_reason: &str,
        error: String,
        now: Millis,
    ) -> Result<Option<JobState>> {
        if let Some(pg) = &self.pg {
            return pg.job_stop_if_running(lease, stop_reason, error, now).await;
        }
        self.write(Fail {
            lease: lease.clone(),
            error,
            retry_at: None,
            now,
            stop_reason: Some(stop_reason.to_string()),
        })
        .await
    }

    /// `running → cancelled`, if the lease still holds.
    pub async fn job_cancel_if_running(
        &self,
        lease: &Lease,
        reason: String,
        now: Millis,
    ) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.job_cancel_if_running(lease, reason, now).await;
        }
        self.write(CancelRunning {
            lease: lease.clone(),
            reason,
            now,
        })
        .await
    }

    /// `running → queued` without counting the attempt (graceful shutdown).
    pub async fn job_release_if_running(&self, lease: &Lease, now: Millis) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.job_release_if_running(lease, now).await;
        }
        self.write(Release {
            lease: lease.clone(),
            now,
        })
        .await
    }

    /// Cancels a queued job at once, or asks the worker of a running job to stop.
    pub async fn job_cancel(&self, job_id: &str, now: Millis) -> Result<CancelOutcome> {
        if let Some(pg) = &self.pg {
            return pg.job_cancel(job_id, now).await;
        }
        self.write(Cancel {
            job_id: job_id.to_string(),
            now,
        })
        .await
    }

    /// Returns running jobs whose lease expired to `queued`, recording why. The interrupted
    /// run does not count as a failed attempt; a job interrupted more than `max_rescues` times
    /// is failed instead, and one with a pending cancel is cancelled.
    pub async fn job_rescue_expired(&self, now: Millis, max_rescues: i64) -> Result<Vec<Rescued>> {
        if let Some(pg) = &self.pg {
            return pg.job_rescue_expired(now, max_rescues).await;
        }
        self.write(Rescue { now, max_rescues }).await
    }

    /// Expires the leases of `owner`'s running jobs at once (the owner is known to be dead),
    /// so the next rescuer pass re-queues them.
    pub async fn job_expire_owner(&self, owner: &str, now: Millis) -> Result<u64> {
        if let Some(pg) = &self.pg {
            return pg.job_expire_owner(owner, now).await;
        }
        self.write(ExpireOwner {
            owner: owner.to_string(),
            now,
        })
        .await
    }

    /// Deletes up to `limit` finished jobs (and their events) that finished before `before`.
    pub async fn job_delete_finished_before(&self, before: Millis, limit: i64) -> Result<u64> {
        if let Some(pg) = &self.pg {
            return pg.job_delete_finished_before(before, limit).await;
        }
        self.write(Clean { before, limit }).await
    }

    /// Records warm/cold, time to first output and usage for one attempt. Sent in order with
    /// the attempt's outcome, so it commits no later than the outcome.
    /// `now` is when the turn ended: the usage row counts in the day and month of it.
    pub async fn job_record_run(
        &self,
        job_id: &str,
        attempt: i64,
        facts: RunFacts,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.job_record_run(job_id, attempt, facts, now).await;
        }
        self.write(RecordRun {
            job_id: job_id.to_string(),
            attempt,
            facts,
            now,
        })
        .await
    }

    // ----- reads ----------------------------------------------------------------------------

    /// Spend since `f.since`, grouped by day (UTC), channel or source, largest cost first
    /// (days in order).
    pub async fn usage_report(&self, f: &UsageFilter) -> Result<Vec<UsageRow>> {
        if let Some(pg) = &self.pg {
            return pg.usage_report(f).await;
        }
        let by = f.by.as_str();
        let mut rows = sqlx::query_as!(
            UsageRow,
            r#"SELECT CASE ?3 WHEN 'day' THEN date(u.at / 1000, 'unixepoch')
                              WHEN 'channel' THEN c.name ELSE u.source END AS "key!: String",
                      count(DISTINCT u.job_id) AS "jobs!: i64",
                      count(*) AS "attempts!: i64",
                      sum(u.input_tokens) AS "input_tokens!: i64",
                      sum(u.output_tokens) AS "output_tokens!: i64",
                      sum(u.cache_read_tokens) AS "cache_read_tokens!: i64",
                      sum(u.cache_write_tokens) AS "cache_write_tokens!: i64",
                      sum(u.cost_usd) AS "cost_usd!: f64",
                      sum(u.agent_ms) / 1000.0 AS "agent_secs!: f64"
               FROM usage u JOIN channels c ON c.id = u.channel_id
               WHERE u.at >= ?1 AND (?2 IS NULL OR c.name = ?2)
               GROUP BY 1
               ORDER BY 1"#,
            f.since,
            f.channel,
            by
        )
        .fetch_all(&self.read)
        .await?;
        if f.by != UsageBy::Day {
            rows.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then(a.key.cmp(&b.key)));
        }
        Ok(rows)
    }

    pub async fn job_get(&self, id: &str) -> Result<Option<Job>> {
        if let Some(pg) = &self.pg {
            return pg.job_get(id).await;
        }
        Ok(select_jobs!("WHERE j.id = ?1", id)
            .fetch_optional(&self.read)
            .await?)
    }

    /// Jobs newest first, filtered; `before` is the id of the last job of the previous page.
    pub async fn job_list(&self, f: &JobFilter) -> Result<Vec<Job>> {
        if let Some(pg) = &self.pg {
            return pg.job_list(f).await;
        }
        let state = f.state.map(|s| s.as_str());
        let source = f.source.map(|s| s.as_str());
        let limit = if f.limit <= 0 { 50 } else { f.limit.min(1000) };
        // `instr` rather than LIKE: the text's `%` and `_` are plain characters.
        let text = f.text.as_deref().map(str::to_ascii_lowercase);
        // Always a bound (`~` sorts after every id), so the page is one range of the primary
        // key's index however deep into the history it starts.
        let before = f.before.as_deref().unwrap_or("~");
        Ok(select_jobs!(
            r#"WHERE (?1 IS NULL OR j.state = ?1)
                 AND (?2 IS NULL OR c.name = ?2)
                 AND (?3 IS NULL OR j.source = ?3)
                 AND j.id < ?4
                 AND (?6 IS NULL OR instr(lower(j.prompt), ?6) > 0)
               ORDER BY j.id DESC
               LIMIT ?5"#,
            state,
            f.channel,
            source,
            before,
            limit,
            text
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// What the claim would find now: whether a job it would take is due, the earliest future
    /// `run_at` of such a job (the claim takes each idle channel's next job in queue order, so
    /// only those count: a job behind a head that waits for its retry is not claimable), and
    /// the due jobs held by a spent budget that have not been told so yet.
    pub async fn job_next_due(&self, now: Millis, limits: &SpendLimits) -> Result<QueueOutlook> {
        if let Some(pg) = &self.pg {
            return pg.job_next_due(now, limits).await;
        }
        let mut conn = self.read.acquire().await?;
        let spent = budgets::spent_channels(&mut *conn, limits, None).await?;
        let held_ids = budgets::id_array(&spent);
        let r = sqlx::query!(
            r#"WITH heads AS (
                   SELECT (SELECT q.run_at FROM jobs q
                           WHERE q.channel_id = c.id AND q.state = 'queued'
                           ORDER BY q.priority DESC, q.created_at, q.id
                           LIMIT 1) AS run_at
                   FROM channels c
                   WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                     WHERE r.channel_id = c.id AND r.state = 'running')
                     AND c.id NOT IN (SELECT value FROM json_each(?2)))
               SELECT
                 EXISTS(SELECT 1 FROM heads WHERE run_at <= ?1) AS "due!: bool",
                 (SELECT min(run_at) FROM heads WHERE run_at > ?1) AS "next?: i64""#,
            now,
            held_ids
        )
        .fetch_one(&mut *conn)
        .await?;
        let held = budgets::untold_held_heads(&mut *conn, &spent, now).await?;
        Ok(QueueOutlook {
            due: r.due,
            next: r.next,
            held,
        })
    }

    /// Running jobs of `owner` whose cancel was requested: (job id, attempt).
    pub async fn job_cancel_requests(&self, owner: &str) -> Result<Vec<(String, i64)>> {
        if let Some(pg) = &self.pg {
            return pg.job_cancel_requests(owner).await;
        }
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", attempt FROM jobs
               WHERE state = 'running' AND lease_owner = ?1 AND cancel_requested = 1"#,
            owner
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.attempt)).collect())
    }

    /// Job counts by state (for `gorp jobs` summaries and metrics).
    pub async fn job_count_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        if let Some(pg) = &self.pg {
            return pg.job_count_by_state().await;
        }
        let rows = sqlx::query!(
            r#"SELECT state AS "state!: JobState", count(*) AS "n!: i64" FROM jobs GROUP BY state"#
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
    }

    /// Lease owners of running jobs (for finding owners that died on this host).
    pub async fn job_lease_owners(&self) -> Result<Vec<String>> {
        if let Some(pg) = &self.pg {
            return pg.job_lease_owners().await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT lease_owner AS "owner!" FROM jobs WHERE state = 'running'"#
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// When the first running job's lease runs out (for the rescuer's next pass).
    pub async fn job_next_lease_expiry(&self) -> Result<Option<Millis>> {
        if let Some(pg) = &self.pg {
            return pg.job_next_lease_expiry().await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT min(lease_expires_at) AS "at?: i64" FROM jobs WHERE state = 'running'"#
        )
        .fetch_one(&self.read)
        .await?)
    }

    /// Ids of jobs starting with `prefix` (at most `limit`), so people can type a short id.
    pub async fn job_ids_with_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<String>> {
        if let Some(pg) = &self.pg {
            return pg.job_ids_with_prefix(prefix, limit).await;
        }
        let upper = format!("{prefix}\u{10FFFF}");
        Ok(sqlx::query_scalar!(
            r#"SELECT id AS "id!" FROM jobs WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3"#,
            prefix,
            upper,
            limit
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Channels that have queued jobs.
    pub async fn channel_ids_with_queued_jobs(&self) -> Result<HashSet<i64>> {
        if let Some(pg) = &self.pg {
            return pg.channel_ids_with_queued_jobs().await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT channel_id AS "id!" FROM jobs WHERE state = 'queued'"#
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .collect())
    }

    /// Channels with a queued job that is due at `now`.
    pub async fn channel_ids_with_due_jobs(&self, now: Millis) -> Result<HashSet<i64>> {
        if let Some(pg) = &self.pg {
            return pg.channel_ids_with_due_jobs(now).await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT channel_id AS "id!" FROM jobs
               WHERE state = 'queued' AND run_at <= ?1"#,
            now
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .collect())
    }

    /// Queued jobs of a channel.
    pub async fn channel_queue_depth(&self, channel_id: i64) -> Result<i64> {
        if let Some(pg) = &self.pg {
            return pg.channel_queue_depth(channel_id).await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!: i64" FROM jobs WHERE channel_id = ?1 AND state = 'queued'"#,
            channel_id
        )
        .fetch_one(&self.read)
        .await?)
    }
}

// ----- enqueue ------------------------------------------------------------------------------

/// One job as the multi-row insert reads it from JSON.
#[derive(Serialize)]
pub(super) struct JobRow<'a> {
    id: String,
    channel_id: i64,
    source: &'a str,
    prompt: &'a str,
    priority: i64,
    max_attempts: i64,
    run_at: Millis,
    idempotency_key: Option<&'a str>,
    reply_target: Option<&'a str>,
    created_at: Millis,
    schedule_id: Option<i64>,
    scheduled_for: Option<Millis>,
    timeout_secs: Option<i64>,
    max_cost_usd: Option<f64>,
    agent_options: Option<&'a str>,
}

impl<'a> JobRow<'a> {
    pub(super) fn new(j: &'a NewJob, now: Millis) -> Self {
        JobRow {
            id: uuid::Uuid::now_v7().to_string(),
            channel_id: j.channel_id,
            source: j.source.as_str(),
            prompt: &j.prompt,
            priority: j.priority,
            max_attempts: j.max_attempts,
            run_at: j.run_at.unwrap_or(now),
            idempotency_key: j.idempotency_key.as_deref(),
            reply_target: j.reply_target.as_deref(),
            created_at: now,
            schedule_id: j.schedule_id,
            scheduled_for: j.scheduled_for,
            timeout_secs: j.timeout_secs,
            max_cost_usd: j.max_cost_usd,
            agent_options: j.agent_options.as_deref(),
        }
    }
}

/// Inserts `rows` in multi-row statements (inside the writer's transaction). A row whose
/// idempotency key already names a job of its channel and source is not inserted; its result
/// is that job with `created: false`.
pub(super) async fn insert_jobs(
    conn: &mut Conn,
    rows: &[JobRow<'_>],
) -> std::result::Result<Vec<Enqueued>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(MAX_ROWS_PER_INSERT) {
        let json = serde_json::to_string(chunk).expect("job rows serialise");
        let ids = sqlx::query_scalar!(
            r#"INSERT INTO jobs (id, channel_id, source, prompt, priority, max_attempts, run_at,
                                 idempotency_key, reply_target, created_at, schedule_id,
                                 scheduled_for, timeout_secs, max_cost_usd, agent_options)
               SELECT value ->> 'id', value ->> 'channel_id', value ->> 'source', value ->> 'prompt',
                      value ->> 'priority', value ->> 'max_attempts', value ->> 'run_at',
                      value ->> 'idempotency_key', value ->> 'reply_target', value ->> 'created_at',
                      value ->> 'schedule_id', value ->> 'scheduled_for', value ->> 'timeout_secs',
                      value ->> 'max_cost_usd', value ->> 'agent_options'
               FROM json_each(?1) WHERE true
               ON CONFLICT (channel_id, source, idempotency_key) WHERE idempotency_key IS NOT NULL
               DO NOTHING
               RETURNING id AS "id!""#,
            json
        )
        .fetch_all(&mut *conn)
        .await?;
        inserted.extend(ids);
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if inserted.contains(&row.id) {
            out.push(Enqueued {
                job_id: row.id.clone(),
                created: true,
            });
            continue;
        }
        // Not inserted: the idempotency key already names a job of this channel (possibly
        // from this group).
        let existing = sqlx::query_scalar!(
            r#"SELECT id AS "id!" FROM jobs
               WHERE channel_id = ?1 AND source = ?2 AND idempotency_key = ?3"#,
            row.channel_id,
            row.source,
            row.idempotency_key
        )
        .fetch_one(&mut *conn)
        .await?;
        out.push(Enqueued {
            job_id: existing,
            created: false,
        });
    }
    Ok(out)
}

// ----- claim and heartbeat ------------------------------------------------------------------

struct Claim {
    owner: String,
    limit: i64,
    now: Millis,
    lease_until: Millis,
    limits: SpendLimits,
}

impl Write for Claim {
    type Output = Vec<Job>;

    async fn apply(&self, conn: &mut Conn) -> Applied<Vec<Job>> {
        let spent = budgets::spent_channels(&mut *conn, &self.limits, None).await?;
        let held_ids = budgets::id_array(&spent);
        Ok(Ok(update_returning_jobs!(
            r#"WITH heads AS (
                   -- The next job of every channel that has no running job and whose budget is
                   -- not spent, in queue order (a rescued or retried job keeps its place): one
                   -- index probe per channel, however long the queue or the history. A head
                   -- that is not due yet holds its channel.
                   SELECT (SELECT q.id FROM jobs q
                           WHERE q.channel_id = c.id AND q.state = 'queued'
                           ORDER BY q.priority DESC, q.created_at, q.id
                           LIMIT 1) AS id
                   FROM channels c
                   WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                     WHERE r.channel_id = c.id AND r.state = 'running')
                     AND c.id NOT IN (SELECT value FROM json_each(?5)))
               UPDATE jobs
               SET state = 'running', attempt = attempt + 1, lease_owner = ?1,
                   lease_expires_at = ?2, started_at = ?3, cancel_requested = 0,
                   stop_reason = NULL
               WHERE id IN (
                   SELECT j.id FROM heads h JOIN jobs j ON j.id = h.id
                   WHERE j.run_at <= ?3
                   ORDER BY j.priority DESC, j.created_at, j.id
                   LIMIT ?4)"#,
            self.owner,
            self.lease_until,
            self.now,
            self.limit,
            held_ids
        )
        .fetch_all(&mut *conn)
        .await?))
    }
}

struct Heartbeat {
    owner: String,
    lease_until: Millis,
}

impl Write for Heartbeat {
    type Output = Vec<(String, i64, bool)>;

    async fn apply(&self, conn: &mut Conn) -> Applied<Self::Output> {
        let rows = sqlx::query!(
            r#"UPDATE jobs SET lease_expires_at = ?2
               WHERE state = 'running' AND lease_owner = ?1
               RETURNING id AS "id!", attempt, cancel_requested AS "cancel_requested: bool""#,
            self.owner,
            self.lease_until
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(Ok(rows
            .into_iter()
            .map(|r| (r.id, r.attempt, r.cancel_requested))
            .collect()))
    }
}

// ----- fenced outcomes ----------------------------------------------------------------------

/// The fenced `running → succeeded`.
struct Complete {
    lease: Lease,
    stop_reason: Option<String>,
    now: Millis,
}

impl Complete {
    async fn run(&self, conn: &mut Conn) -> std::result::Result<bool, sqlx::Error> {
        let lease = &self.lease;
        let r = sqlx::query!(
            r#"UPDATE jobs
               SET state = 'succeeded', stop_reason = ?4, finished_at = ?5,
                   lease_owner = NULL, lease_expires_at = NULL
               WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
            lease.job_id,
            lease.attempt,
            lease.owner,
            self.stop_reason,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

impl Write for Complete {
    type Output = bool;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        Ok(Ok(self.run(conn).await?))
    }
}

/// [`Complete`], then the next due job of the same channel for the same owner (the channel
/// has no running job in this transaction): one index probe.
struct CompleteClaim {
    done: Complete,
    channel_id: i64,
    lease_until: Millis,
    limits: SpendLimits,
}

impl Write for CompleteClaim {
    type Output = (bool, Option<Job>);
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<Self::Output> {
        if !self.done.run(conn).await? {
            return Ok(Ok((false, None)));
        }
        let lease = &self.done.lease;
        // The run's usage row committed before this write: a budget it spent holds the rest.
        let channel_id = self.channel_id;
        if !budgets::spent_channels(&mut *conn, &self.limits, Some(channel_id))
            .await?
            .is_empty()
        {
            return Ok(Ok((true, None)));
        }
        let next = update_returning_jobs!(
            r#"UPDATE jobs
               SET state = 'running', attempt = attempt + 1, lease_owner = ?2,
                   lease_expires_at = ?3, started_at = ?4, cancel_requested = 0,
                   stop_reason = NULL
               WHERE id = (
                   SELECT q.id FROM jobs q
                   WHERE q.channel_id = ?1 AND q.state = 'queued'
                   ORDER BY q.priority DESC, q.created_at, q.id
                   LIMIT 1)
                 AND run_at <= ?4
                 -- Fair to other channels: the slot goes back to the dispatcher when another
                 -- idle channel has a due job that comes first in queue order.
                 AND NOT EXISTS (
                     SELECT 1 FROM channels c2
                     WHERE c2.id <> ?1
                       AND NOT EXISTS (SELECT 1 FROM jobs r
                                       WHERE r.channel_id = c2.id AND r.state = 'running')
                       AND EXISTS (
                           SELECT 1 FROM (SELECT q.priority, q.created_at, q.id, q.run_at
                                          FROM jobs q
                                          WHERE q.channel_id = c2.id AND q.state = 'queued'
                                          ORDER BY q.priority DESC, q.created_at, q.id
                                          LIMIT 1) h
                           WHERE h.run_at <= ?4
                             AND (h.priority > jobs.priority
                                  OR (h.priority = jobs.priority
                                      AND (h.created_at, h.id) < (jobs.created_at, jobs.id)))))"#,
            channel_id,
            lease.owner,
            self.lease_until,
            self.done.now
        )
        .fetch_optional(&mut *conn)
        .await?;
        Ok(Ok((true, next)))
    }
}

struct Fail {
    lease: Lease,
    error: String,
    retry_at: Option<Millis>,
    now: Millis,
    /// Why the job stopped, when not an error of the agent's (`budget`).
    stop_reason: Option<String>,
}

impl Write for Fail {
    type Output = Option<JobState>;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<Option<JobState>> {
        let lease = &self.lease;
        Ok(Ok(sqlx::query_scalar!(
            r#"UPDATE jobs
               SET state = CASE WHEN ?5 IS NOT NULL AND attempt - interruptions < max_attempts
                                THEN 'queued' ELSE 'failed' END,
                   run_at = CASE WHEN ?5 IS NOT NULL AND attempt - interruptions < max_attempts
                                 THEN ?5 ELSE run_at END,
                   finished_at = CASE WHEN ?5 IS NOT NULL
                                           AND attempt - interruptions < max_attempts
                                      THEN NULL ELSE ?6 END,
                   stop_reason = ?7,
                   error = ?4, lease_owner = NULL, lease_expires_at = NULL
               WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3
               RETURNING state AS "state!: JobState""#,
            lease.job_id,
            lease.attempt,
            lease.owner,
            self.error,
            self.retry_at,
            self.now,
            self.stop_reason
        )
        .fetch_optional(&mut *conn)
        .await?))
    }
}

struct CancelRunning {
    lease: Lease,
    reason: String,
    now: Millis,
}

impl Write for CancelRunning {
    type Output = bool;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let lease = &self.lease;
        let r = sqlx::query!(
            r#"UPDATE jobs
               SET state = 'cancelled', stop_reason = 'cancelled', error = ?4, finished_at = ?5,
                   lease_owner = NULL, lease_expires_at = NULL
               WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
            lease.job_id,
            lease.attempt,
            lease.owner,
            self.reason,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

/// The attempt is given back: a job interrupted by shutdown did not fail.
struct Release {
    lease: Lease,
    now: Millis,
}

impl Write for Release {
    type Output = bool;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let lease = &self.lease;
        let r = sqlx::query!(
            r#"UPDATE jobs
               SET state = 'queued', attempt = attempt - 1, run_at = ?4,
                   lease_owner = NULL, lease_expires_at = NULL
               WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
            lease.job_id,
            lease.attempt,
            lease.owner,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

// ----- cancel, rescue, retention ------------------------------------------------------------

struct Cancel {
    job_id: String,
    now: Millis,
}

impl Write for Cancel {
    type Output = CancelOutcome;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<CancelOutcome> {
        let (job_id, now) = (&self.job_id, self.now);
        let Some(row) = sqlx::query!(
            r#"SELECT state AS "state: JobState", attempt FROM jobs WHERE id = ?1"#,
            job_id
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(Err(StoreError::JobNotFound(job_id.clone())));
        };
        let (outcome, kind, text) = match row.state {
            JobState::Queued => {
                sqlx::query!(
                    r#"UPDATE jobs SET state = 'cancelled', stop_reason = 'cancelled',
                                       finished_at = ?2
                       WHERE id = ?1 AND state = 'queued'"#,
                    job_id,
                    now
                )
                .execute(&mut *conn)
                .await?;
                (
                    CancelOutcome::Cancelled,
                    EventKind::Cancelled,
                    "cancelled before it started",
                )
            }
            JobState::Running => {
                sqlx::query!(
                    "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'",
                    job_id
                )
                .execute(&mut *conn)
                .await?;
                (
                    CancelOutcome::Requested,
                    EventKind::CancelRequested,
                    "cancel requested; the worker stops the agent",
                )
            }
            done => return Ok(Ok(CancelOutcome::AlreadyFinished(done))),
        };
        let ev = NewEvent {
            job_id: job_id.clone(),
            attempt: row.attempt,
            kind: kind.as_str().into(),
            text: Some(text.into()),
            data: None,
            at: now,
        };
        insert_events(conn, &[&ev]).await?;
        Ok(Ok(outcome))
    }
}

/// Returns running jobs whose lease expired to the queue. A lease expires only when the gorp
/// holding it died or stopped renewing it (an agent's own failure is recorded by its worker),
/// so the run was interrupted, not failed, and spends none of the job's attempts:
/// - cut short before its prompt reached the agent (no `session` event for the attempt), the
///   attempt is given back, as on a graceful shutdown;
/// - cut short during the agent's turn, it counts as an interruption, and a job interrupted
///   more than `max_rescues` times (one that kills gorp every time) fails.
struct Rescue {
    now: Millis,
    max_rescues: i64,
}

impl Write for Rescue {
    type Output = Vec<Rescued>;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<Vec<Rescued>> {
        let (now, max_rescues) = (self.now, self.max_rescues);
        let expired = sqlx::query!(
            r#"SELECT j.id AS "id!", j.attempt,
                      EXISTS(SELECT 1 FROM job_events e
                             WHERE e.job_id = j.id AND e.attempt = j.attempt
                               AND e.kind = 'session') AS "in_turn!: bool"
               FROM jobs j WHERE j.state = 'running' AND j.lease_expires_at < ?1"#,
            now
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut rescued = Vec::with_capacity(expired.len());
        let mut events = Vec::with_capacity(expired.len());
        for job in expired {
            let Some(r) = sqlx::query!(
                r#"UPDATE jobs
                   SET state = CASE WHEN cancel_requested THEN 'cancelled'
                                    WHEN ?3 AND interruptions >= ?4 THEN 'failed'
                                    ELSE 'queued' END,
                       finished_at = CASE WHEN cancel_requested OR (?3 AND interruptions >= ?4)
                                          THEN ?5 ELSE NULL END,
                       stop_reason = CASE WHEN cancel_requested THEN 'cancelled' ELSE NULL END,
                       error = 'lease expired: worker ' || lease_owner || ' stopped renewing it',
                       interruptions = interruptions + ?3,
                       attempt = CASE WHEN ?3 THEN attempt ELSE attempt - 1 END,
                       run_at = ?5, lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = ?1 AND attempt = ?2 AND state = 'running'
                   RETURNING interruptions, state AS "state: JobState", error AS "error!: String""#,
                job.id,
                job.attempt,
                job.in_turn,
                max_rescues,
                now
            )
            .fetch_optional(&mut *conn)
            .await?
            else {
                continue;
            };
            super::approvals::expire_for_attempt(conn, &job.id, job.attempt, now).await?;
            events.push(rescue_event(
                &job.id,
                job.attempt,
                job.in_turn,
                r.state,
                r.interruptions,
                &r.error,
                max_rescues,
                now,
            ));
            rescued.push(Rescued {
                job_id: job.id,
                attempt: job.attempt,
                state: r.state,
            });
        }
        insert_events(conn, &events.iter().collect::<Vec<_>>()).await?;
        Ok(Ok(rescued))
    }
}

struct ExpireOwner {
    owner: String,
    now: Millis,
}

impl Write for ExpireOwner {
    type Output = u64;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!(
            r#"UPDATE jobs SET lease_expires_at = ?2 - 1
               WHERE state = 'running' AND lease_owner = ?1"#,
            self.owner,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected()))
    }
}

struct Clean {
    before: Millis,
    limit: i64,
}

impl Write for Clean {
    type Output = u64;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!(
            r#"DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs
                 WHERE finished_at IS NOT NULL AND finished_at < ?1
                   AND state IN ('succeeded', 'failed', 'cancelled')
                 LIMIT ?2)"#,
            self.before,
            self.limit
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected()))
    }
}

struct RecordRun {
    job_id: String,
    attempt: i64,
    facts: RunFacts,
    now: Millis,
}

impl Write for RecordRun {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        let f = &self.facts;
        sqlx::query!(
            r#"UPDATE jobs SET warm = ?3, first_output_ms = ?4, input_tokens = ?5,
                               output_tokens = ?6, cost_usd = ?7, cache_read_tokens = ?8,
                               cache_write_tokens = ?9
               WHERE id = ?1 AND attempt = ?2"#,
            self.job_id,
            self.attempt,
            f.warm,
            f.first_output_ms,
            f.input_tokens,
            f.output_tokens,
            f.cost_usd,
            f.cache_read_tokens,
            f.cache_write_tokens
        )
        .execute(&mut *conn)
        .await?;
        // The attempt's spend, for budgets and reports (a later record of the same attempt
        // replaces it).
        let now = self.now;
        sqlx::query!(
            r#"INSERT INTO usage (job_id, attempt, channel_id, source, at, input_tokens,
                                  output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
                                  agent_ms)
               SELECT j.id, ?2, j.channel_id, j.source, ?3, coalesce(?4, 0), coalesce(?5, 0),
                      coalesce(?6, 0), coalesce(?7, 0), coalesce(?8, 0.0), coalesce(?9, 0)
               FROM jobs j WHERE j.id = ?1
               ON CONFLICT (job_id, attempt) DO UPDATE SET
                   at = excluded.at, input_tokens = excluded.input_tokens,
                   output_tokens = excluded.output_tokens,
                   cache_read_tokens = excluded.cache_read_tokens,
                   cache_write_tokens = excluded.cache_write_tokens,
                   cost_usd = excluded.cost_usd, agent_ms = excluded.agent_ms"#,
            self.job_id,
            self.attempt,
            now,
            f.input_tokens,
            f.output_tokens,
            f.cache_read_tokens,
            f.cache_write_tokens,
            f.cost_usd,
            f.agent_ms
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}
