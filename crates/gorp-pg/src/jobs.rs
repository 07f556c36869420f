//! The `jobs` table: the queue. Enqueue (multi-row, idempotent per channel), claim (one job
//! per idle channel, in queue order), heartbeat, the fenced outcomes, cancel, rescue of
//! expired leases, retention, and the reads of jobs.
//!
//! Claims lock the channel rows they take heads from (`FOR NO KEY UPDATE … SKIP LOCKED`), so
//! concurrent claimers, on one node or several, never wait for each other and never take two
//! jobs of one channel; the one-running-job-per-channel index stays the backstop.

use std::collections::HashSet;

use sqlx::PgConnection;

use crate::budgets;
use crate::events::insert_events;
use crate::kinds::{EventKind, JobState, PermissionPolicy, Source};
use crate::types::{
    rescue_event, CancelOutcome, Enqueued, Job, JobFilter, Lease, Millis, NewEvent, NewJob,
    QueueOutlook, Rescued, RunFacts, SpendLimits, UsageBy, UsageFilter, UsageRow,
};
use crate::{PgStore, Result, StoreError};

/// `SELECT` of whole [`Job`] rows (`j`, with its channel `c`); the rest of the query
/// (`WHERE …`) follows.
macro_rules! select_jobs {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Job,
            r#"SELECT j.id AS "id!", j.channel_id, c.name AS channel,
                      j.source AS "source: Source", j.prompt, j.state AS "state: JobState",
                      j.priority, j.attempt, j.max_attempts, j.interruptions, j.run_at,
                      j.lease_owner, j.lease_expires_at, j.cancel_requested,
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

/// An `UPDATE jobs j … FROM channels c …` (the statement names the job `j` and joins its
/// channel `c`) that returns the whole [`Job`] rows it changed.
macro_rules! update_returning_jobs {
    ($update:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Job,
            $update + r#"
               RETURNING j.id AS "id!", j.channel_id AS "channel_id!", c.name AS "channel!",
                         j.source AS "source!: Source", j.prompt AS "prompt!",
                         j.state AS "state!: JobState", j.priority AS "priority!",
                         j.attempt AS "attempt!", j.max_attempts AS "max_attempts!",
                         j.interruptions AS "interruptions!", j.run_at AS "run_at!",
                         j.lease_owner, j.lease_expires_at,
                         j.cancel_requested AS "cancel_requested!",
                         j.idempotency_key, j.reply_target, j.stop_reason, j.error,
                         j.created_at AS "created_at!", j.started_at, j.finished_at,
                         j.schedule_id, j.scheduled_for,
                         c.permission_policy AS "permission_policy!: PermissionPolicy",
                         j.timeout_secs, j.max_cost_usd, c.budget_job_usd, c.budget_job_tokens,
                         j.agent_options, c.agent_options AS "channel_options!""#
            $(, $arg)*
        )
    };
}

/// Queue order: what the claim takes first.
fn queue_order(jobs: &mut [Job]) {
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    });
}

impl PgStore {
    // ----- writes ---------------------------------------------------------------------------

    /// Enqueues one job. With an idempotency key that already exists for the channel and
    /// source, returns the existing job with `created: false`.
    pub async fn job_insert(&self, job: NewJob, now: Millis) -> Result<Enqueued> {
        let mut v = self.job_insert_many(vec![job], now).await?;
        v.pop()
            .ok_or_else(|| StoreError::Invalid("no job was enqueued".into()))
    }

    /// Enqueues many jobs in one transaction.
    pub async fn job_insert_many(&self, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>> {
        for j in &jobs {
            j.validate().map_err(StoreError::Invalid)?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids = new_ids(jobs.len());
        let out = crate::transaction!(self, true, |tx| {
            let out = insert_jobs(&mut *tx, &jobs, &ids, now).await?;
            Ok(out)
        });
        Ok(out)
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
        let mut jobs = crate::transaction!(self, false, |tx| {
            let spent = budgets::spent_channels(&mut *tx, limits, None).await?;
            let held = budgets::id_array(&spent);
            // 1. The channels to take heads from, locked; a channel another claimer holds is
            //    skipped, not waited for.
            let channels = sqlx::query_scalar!(
                r#"SELECT c.id
                   FROM channels c
                   CROSS JOIN LATERAL (SELECT q.priority, q.created_at, q.id, q.run_at
                                       FROM jobs q
                                       WHERE q.channel_id = c.id AND q.state = 'queued'
                                       ORDER BY q.priority DESC, q.created_at, q.id
                                       LIMIT 1) h
                   LEFT JOIN warm_sessions w ON w.channel_id = c.id
                   WHERE h.run_at <= $1
                     AND c.id <> ALL ($2::bigint[])
                     AND NOT EXISTS (SELECT 1 FROM jobs r
                                     WHERE r.channel_id = c.id AND r.state = 'running')
                     AND (w.holder IS NULL OR w.holder = $4
                          OR w.lease_expires_at IS NULL OR w.lease_expires_at < $1)
                   ORDER BY h.priority DESC, h.created_at, h.id
                   LIMIT $3
                   FOR NO KEY UPDATE OF c SKIP LOCKED"#,
                now,
                &held,
                limit,
                owner
            )
            .fetch_all(&mut *tx)
            .await?;
            if channels.is_empty() {
                return Ok(Vec::new());
            }
            // 2. Their heads, read again under the locks (this statement's snapshot sees every
            //    claim committed before the locks were taken).
            let jobs = claim_heads(&mut *tx, &channels, owner, now, now + lease_ms).await?;
            Ok(jobs)
        });
        queue_order(&mut jobs);
        Ok(jobs)
    }

    /// Renews the leases of every job `owner` is running. Returns (job id, attempt,
    /// cancel requested) for each renewed job.
    pub async fn job_heartbeat(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
    ) -> Result<Vec<(String, i64, bool)>> {
        let rows = crate::statement!(
            self,
            false,
            sqlx::query!(
                r#"UPDATE jobs SET lease_expires_at = $2
                       WHERE state = 'running' AND lease_owner = $1
                       RETURNING id AS "id!", attempt, cancel_requested"#,
                owner,
                now + lease_ms
            )
            .fetch_all(&self.pool)
            .await?
        );
        Ok(rows
            .into_iter()
            .map(|r| (r.id, r.attempt, r.cancel_requested))
            .collect())
    }

    /// `running → succeeded`, if the lease still holds.
    pub async fn job_complete_if_running(
        &self,
        lease: &Lease,
        stop_reason: Option<String>,
        now: Millis,
    ) -> Result<bool> {
        let done = crate::transaction!(self, true, |tx| {
            let done = complete(&mut *tx, lease, stop_reason.as_deref(), now).await?;
            Ok(done)
        });
        Ok(done)
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
        let out = crate::transaction!(self, true, |tx| {
            if !complete(&mut *tx, lease, stop_reason.as_deref(), now).await? {
                return Ok((false, None));
            }
            // The run's usage row committed before this transaction: a budget it spent holds
            // the rest.
            if !budgets::spent_channels(&mut *tx, limits, Some(channel_id))
                .await?
                .is_empty()
            {
                return Ok((true, None));
            }
            // The channel row is the claimers' per-channel lock; wait for it (another
            // claimer's transaction is short) rather than skip.
            sqlx::query!(
                "SELECT id FROM channels WHERE id = $1 FOR NO KEY UPDATE",
                channel_id
            )
            .fetch_optional(&mut *tx)
            .await?;
            // Fair to other channels: the slot goes back to the dispatcher when another idle
            // channel this node may take (its lease free, expired or ours) has a due head that
            // comes first in queue order.
            let behind = sqlx::query_scalar!(
                r#"SELECT EXISTS (
                       SELECT 1
                       FROM (SELECT q.priority, q.created_at, q.id FROM jobs q
                             WHERE q.channel_id = $1 AND q.state = 'queued'
                             ORDER BY q.priority DESC, q.created_at, q.id
                             LIMIT 1) mine
                       CROSS JOIN channels c2
                       CROSS JOIN LATERAL (SELECT q.priority, q.created_at, q.id, q.run_at
                                           FROM jobs q
                                           WHERE q.channel_id = c2.id AND q.state = 'queued'
                                           ORDER BY q.priority DESC, q.created_at, q.id
                                           LIMIT 1) h
                       LEFT JOIN warm_sessions w ON w.channel_id = c2.id
                       WHERE c2.id <> $1 AND h.run_at <= $2
                         AND (h.priority > mine.priority
                              OR (h.priority = mine.priority
                                  AND (h.created_at, h.id) < (mine.created_at, mine.id)))
                         AND NOT EXISTS (SELECT 1 FROM jobs r
                                         WHERE r.channel_id = c2.id AND r.state = 'running')
                         AND (w.holder IS NULL OR w.holder = $3
                              OR w.lease_expires_at IS NULL OR w.lease_expires_at < $2)
                   ) AS "behind!""#,
                channel_id,
                now,
                lease.owner
            )
            .fetch_one(&mut *tx)
            .await?;
            if behind {
                return Ok((true, None));
            }
            let next = claim_heads(&mut *tx, &[channel_id], &lease.owner, now, now + lease_ms)
                .await?
                .pop();
            Ok((true, next))
        });
        Ok(out)
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
        self.fail(lease, &error, retry_at, now, None).await
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
        self.fail(lease, &error, None, now, Some(stop_reason)).await
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        retry_at: Option<Millis>,
        now: Millis,
        stop_reason: Option<&str>,
    ) -> Result<Option<JobState>> {
        let state = crate::statement!(
            self,
            true,
            sqlx::query_scalar!(
                r#"UPDATE jobs
                       SET state = CASE WHEN $5::bigint IS NOT NULL
                                             AND attempt - interruptions < max_attempts
                                        THEN 'queued' ELSE 'failed' END,
                           run_at = CASE WHEN $5::bigint IS NOT NULL
                                              AND attempt - interruptions < max_attempts
                                         THEN $5 ELSE run_at END,
                           finished_at = CASE WHEN $5::bigint IS NOT NULL
                                                   AND attempt - interruptions < max_attempts
                                              THEN NULL ELSE $6::bigint END,
                           stop_reason = $7,
                           error = $4, lease_owner = NULL, lease_expires_at = NULL
                       WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3
                       RETURNING state AS "state!: JobState""#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                error,
                retry_at,
                now,
                stop_reason
            )
            .fetch_optional(&self.pool)
            .await?
        );
        Ok(state)
    }

    /// `running → cancelled`, if the lease still holds.
    pub async fn job_cancel_if_running(
        &self,
        lease: &Lease,
        reason: String,
        now: Millis,
    ) -> Result<bool> {
        let r = crate::statement!(
            self,
            true,
            sqlx::query!(
                r#"UPDATE jobs
                       SET state = 'cancelled', stop_reason = 'cancelled', error = $4,
                           finished_at = $5, lease_owner = NULL, lease_expires_at = NULL
                       WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3"#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                reason,
                now
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected() == 1)
    }

    /// `running → queued` without counting the attempt (graceful shutdown).
    pub async fn job_release_if_running(&self, lease: &Lease, now: Millis) -> Result<bool> {
        let r = crate::statement!(
            self,
            true,
            sqlx::query!(
                r#"UPDATE jobs
                       SET state = 'queued', attempt = attempt - 1, run_at = $4,
                           lease_owner = NULL, lease_expires_at = NULL
                       WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3"#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                now
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected() == 1)
    }

    /// Cancels a queued job at once, or asks the worker of a running job to stop.
    pub async fn job_cancel(&self, job_id: &str, now: Millis) -> Result<CancelOutcome> {
        let out = crate::transaction!(self, true, |tx| {
            // Locked: a claim or an outcome of the same job waits, so the state read here is
            // the one changed below. NO KEY: an event insert's foreign-key check (KEY SHARE)
            // is not blocked by it, so it cannot deadlock with the event lock.
            let Some(row) = sqlx::query!(
                r#"SELECT state AS "state: JobState", attempt FROM jobs WHERE id = $1
                   FOR NO KEY UPDATE"#,
                job_id
            )
            .fetch_optional(&mut *tx)
            .await?
            else {
                return Err(StoreError::JobNotFound(job_id.to_string()));
            };
            let (outcome, kind, text) = match row.state {
                JobState::Queued => {
                    sqlx::query!(
                        r#"UPDATE jobs SET state = 'cancelled', stop_reason = 'cancelled',
                                           finished_at = $2
                           WHERE id = $1 AND state = 'queued'"#,
                        job_id,
                        now
                    )
                    .execute(&mut *tx)
                    .await?;
                    (
                        CancelOutcome::Cancelled,
                        EventKind::Cancelled,
                        "cancelled before it started",
                    )
                }
                JobState::Running => {
                    sqlx::query!(
                        "UPDATE jobs SET cancel_requested = true WHERE id = $1 AND state = 'running'",
                        job_id
                    )
                    .execute(&mut *tx)
                    .await?;
                    (
                        CancelOutcome::Requested,
                        EventKind::CancelRequested,
                        "cancel requested; the worker stops the agent",
                    )
                }
                done => return Ok(CancelOutcome::AlreadyFinished(done)),
            };
            let ev = NewEvent {
                job_id: job_id.to_string(),
                attempt: row.attempt,
                kind: kind.as_str().into(),
                text: Some(text.into()),
                data: None,
                at: now,
            };
            insert_events(&mut *tx, &[&ev]).await?;
            Ok(outcome)
        });
        Ok(out)
    }

    /// Returns running jobs whose lease expired to `queued`, recording why. The interrupted
    /// run does not count as a failed attempt; a job interrupted more than `max_rescues` times
    /// is failed instead, and one with a pending cancel is cancelled.
    pub async fn job_rescue_expired(&self, now: Millis, max_rescues: i64) -> Result<Vec<Rescued>> {
        let rescued = crate::transaction!(self, true, |tx| {
            let rescued = rescue(&mut *tx, now, max_rescues).await?;
            Ok(rescued)
        });
        Ok(rescued)
    }

    /// Expires the leases of `owner`'s running jobs at once (the owner is known to be dead),
    /// so the next rescuer pass re-queues them.
    pub async fn job_expire_owner(&self, owner: &str, now: Millis) -> Result<u64> {
        let r = crate::statement!(
            self,
            false,
            sqlx::query!(
                r#"UPDATE jobs SET lease_expires_at = $2::bigint - 1
                       WHERE state = 'running' AND lease_owner = $1"#,
                owner,
                now
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected())
    }

    /// Deletes up to `limit` finished jobs (and their events) that finished before `before`.
    pub async fn job_delete_finished_before(&self, before: Millis, limit: i64) -> Result<u64> {
        let r = crate::statement!(
            self,
            true,
            sqlx::query!(
                r#"DELETE FROM jobs WHERE id IN (
                         SELECT id FROM jobs
                         WHERE finished_at IS NOT NULL AND finished_at < $1
                           AND state IN ('succeeded', 'failed', 'cancelled')
                         LIMIT $2)"#,
                before,
                limit
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected())
    }

    /// Records warm/cold, time to first output and usage for one attempt.
    /// `now` is when the turn ended: the usage row counts in the day and month of it.
    pub async fn job_record_run(
        &self,
        job_id: &str,
        attempt: i64,
        facts: RunFacts,
        now: Millis,
    ) -> Result<()> {
        let f = &facts;
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"UPDATE jobs SET warm = $3, first_output_ms = $4, input_tokens = $5,
                                   output_tokens = $6, cost_usd = $7, cache_read_tokens = $8,
                                   cache_write_tokens = $9
                   WHERE id = $1 AND attempt = $2"#,
                job_id,
                attempt,
                f.warm,
                f.first_output_ms,
                f.input_tokens,
                f.output_tokens,
                f.cost_usd,
                f.cache_read_tokens,
                f.cache_write_tokens
            )
            .execute(&mut *tx)
            .await?;
            // The attempt's spend, for budgets and reports (a later record of the same attempt
            // replaces it).
            sqlx::query!(
                r#"INSERT INTO usage (job_id, attempt, channel_id, source, at, input_tokens,
                                      output_tokens, cache_read_tokens, cache_write_tokens,
                                      cost_usd, agent_ms)
                   SELECT j.id, $2, j.channel_id, j.source, $3, coalesce($4::bigint, 0),
                          coalesce($5::bigint, 0),
                          coalesce($6::bigint, 0), coalesce($7::bigint, 0),
                          coalesce($8::float8, 0), coalesce($9::bigint, 0)
                   FROM jobs j WHERE j.id = $1
                   ON CONFLICT (job_id, attempt) DO UPDATE SET
                       at = excluded.at, input_tokens = excluded.input_tokens,
                       output_tokens = excluded.output_tokens,
                       cache_read_tokens = excluded.cache_read_tokens,
                       cache_write_tokens = excluded.cache_write_tokens,
                       cost_usd = excluded.cost_usd, agent_ms = excluded.agent_ms"#,
                job_id,
                attempt,
                now,
                f.input_tokens,
                f.output_tokens,
                f.cache_read_tokens,
                f.cache_write_tokens,
                f.cost_usd,
                f.agent_ms
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    // ----- reads ----------------------------------------------------------------------------

    /// Spend since `f.since`, grouped by day (UTC), channel or source, largest cost first
    /// (days in order).
    pub async fn usage_report(&self, f: &UsageFilter) -> Result<Vec<UsageRow>> {
        let by = f.by.as_str();
        let mut rows = sqlx::query_as!(
            UsageRow,
            r#"SELECT CASE $3::text WHEN 'day' THEN left(utc_text(u.at), 10)
                                    WHEN 'channel' THEN c.name::text
                                    ELSE u.source END AS "key!: String",
                      count(DISTINCT u.job_id) AS "jobs!: i64",
                      count(*) AS "attempts!: i64",
                      sum(u.input_tokens)::bigint AS "input_tokens!: i64",
                      sum(u.output_tokens)::bigint AS "output_tokens!: i64",
                      sum(u.cache_read_tokens)::bigint AS "cache_read_tokens!: i64",
                      sum(u.cache_write_tokens)::bigint AS "cache_write_tokens!: i64",
                      sum(u.cost_usd) AS "cost_usd!: f64",
                      (sum(u.agent_ms) / 1000.0)::float8 AS "agent_secs!: f64"
               FROM usage u JOIN channels c ON c.id = u.channel_id
               WHERE u.at >= $1 AND ($2::text IS NULL OR c.name = $2)
               GROUP BY 1
               ORDER BY 1"#,
            f.since,
            f.channel,
            by
        )
        .fetch_all(&self.pool)
        .await?;
        if f.by != UsageBy::Day {
            rows.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then(a.key.cmp(&b.key)));
        }
        Ok(rows)
    }

    pub async fn job_get(&self, id: &str) -> Result<Option<Job>> {
        Ok(select_jobs!("WHERE j.id = $1", id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Jobs newest first, filtered; `before` is the id of the last job of the previous page.
    pub async fn job_list(&self, f: &JobFilter) -> Result<Vec<Job>> {
        let state = f.state.map(|s| s.as_str());
        let source = f.source.map(|s| s.as_str());
        let limit = if f.limit <= 0 { 50 } else { f.limit.min(1000) };
        // `strpos` rather than LIKE: the text's `%` and `_` are plain characters.
        let text = f.text.as_deref().map(str::to_ascii_lowercase);
        // Always a bound (`~` sorts after every id in the "C" collation), so the page is one
        // range of the primary key's index however deep into the history it starts.
        let before = f.before.as_deref().unwrap_or("~");
        Ok(select_jobs!(
            r#"WHERE ($1::text IS NULL OR j.state = $1)
                 AND ($2::text IS NULL OR c.name = $2)
                 AND ($3::text IS NULL OR j.source = $3)
                 AND j.id < $4
                 AND ($6::text IS NULL OR strpos(lower(j.prompt), $6) > 0)
               ORDER BY j.id DESC
               LIMIT $5"#,
            state,
            f.channel,
            source,
            before,
            limit,
            text
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// What the claim would find now: whether a job it would take is due, the earliest future
    /// `run_at` of such a job, and the due jobs held by a spent budget that have not been told
    /// so yet.
    pub async fn job_next_due(&self, now: Millis, limits: &SpendLimits) -> Result<QueueOutlook> {
        let mut conn = self.pool.acquire().await?;
        let spent = budgets::spent_channels(&mut conn, limits, None).await?;
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
                     AND c.id <> ALL ($2::bigint[]))
               SELECT
                 EXISTS(SELECT 1 FROM heads WHERE run_at <= $1) AS "due!: bool",
                 (SELECT min(run_at) FROM heads WHERE run_at > $1) AS "next?: i64""#,
            now,
            &held_ids
        )
        .fetch_one(&mut *conn)
        .await?;
        let held = budgets::untold_held_heads(&mut conn, &spent, now).await?;
        Ok(QueueOutlook {
            due: r.due,
            next: r.next,
            held,
        })
    }

    /// Running jobs of `owner` whose cancel was requested: (job id, attempt).
    pub async fn job_cancel_requests(&self, owner: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", attempt FROM jobs
               WHERE state = 'running' AND lease_owner = $1 AND cancel_requested"#,
            owner
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.attempt)).collect())
    }

    /// Job counts by state (for `gorp jobs` summaries and metrics).
    pub async fn job_count_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        let rows = sqlx::query!(
            r#"/* pg */ SELECT state AS "state!: JobState", count(*) AS "n!: i64"
               FROM jobs GROUP BY state"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
    }

    /// Lease owners of running jobs (for finding owners that died on this host).
    pub async fn job_lease_owners(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar!(
            r#"/* pg */ SELECT DISTINCT lease_owner AS "owner!" FROM jobs
               WHERE state = 'running'"#
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// When the first running job's lease runs out (for the rescuer's next pass).
    pub async fn job_next_lease_expiry(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar!(
            r#"/* pg */ SELECT min(lease_expires_at) AS "at?: i64" FROM jobs
               WHERE state = 'running'"#
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Ids of jobs starting with `prefix` (at most `limit`), so people can type a short id.
    pub async fn job_ids_with_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<String>> {
        let upper = format!("{prefix}\u{10FFFF}");
        Ok(sqlx::query_scalar!(
            r#"SELECT id AS "id!" FROM jobs WHERE id >= $1 AND id < $2 ORDER BY id LIMIT $3"#,
            prefix,
            upper,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Channels that have queued jobs.
    pub async fn channel_ids_with_queued_jobs(&self) -> Result<HashSet<i64>> {
        Ok(sqlx::query_scalar!(
            r#"/* pg */ SELECT DISTINCT channel_id AS "id!" FROM jobs WHERE state = 'queued'"#
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect())
    }

    /// Channels with a queued job that is due at `now`.
    pub async fn channel_ids_with_due_jobs(&self, now: Millis) -> Result<HashSet<i64>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT channel_id AS "id!" FROM jobs
               WHERE state = 'queued' AND run_at <= $1"#,
            now
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect())
    }

    /// Queued jobs of a channel.
    pub async fn channel_queue_depth(&self, channel_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!: i64" FROM jobs WHERE channel_id = $1 AND state = 'queued'"#,
            channel_id
        )
        .fetch_one(&self.pool)
        .await?)
    }
}

// ----- enqueue ------------------------------------------------------------------------------

/// Ids for `n` new jobs: UUID v7, so they sort by creation time.
pub(crate) fn new_ids(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect()
}

/// Inserts `jobs` (ids `ids`) in one multi-row statement. A row whose idempotency key already
/// names a job of its channel and source is not inserted; its result is that job with
/// `created: false`.
pub(crate) async fn insert_jobs(
    conn: &mut PgConnection,
    jobs: &[NewJob],
    ids: &[String],
    now: Millis,
) -> std::result::Result<Vec<Enqueued>, sqlx::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let col = |f: &dyn Fn(&NewJob) -> Option<String>| jobs.iter().map(f).collect::<Vec<_>>();
    let channel_ids: Vec<i64> = jobs.iter().map(|j| j.channel_id).collect();
    let sources: Vec<String> = jobs.iter().map(|j| j.source.as_str().to_string()).collect();
    let prompts: Vec<String> = jobs.iter().map(|j| j.prompt.clone()).collect();
    let priorities: Vec<i64> = jobs.iter().map(|j| j.priority).collect();
    let max_attempts: Vec<i64> = jobs.iter().map(|j| j.max_attempts).collect();
    let run_ats: Vec<i64> = jobs.iter().map(|j| j.run_at.unwrap_or(now)).collect();
    let keys = col(&|j| j.idempotency_key.clone());
    let targets = col(&|j| j.reply_target.clone());
    let schedule_ids: Vec<Option<i64>> = jobs.iter().map(|j| j.schedule_id).collect();
    let slots: Vec<Option<i64>> = jobs.iter().map(|j| j.scheduled_for).collect();
    let timeouts: Vec<Option<i64>> = jobs.iter().map(|j| j.timeout_secs).collect();
    let max_costs: Vec<Option<f64>> = jobs.iter().map(|j| j.max_cost_usd).collect();
    let options = col(&|j| j.agent_options.clone());
    let inserted: HashSet<String> = sqlx::query_scalar!(
        r#"INSERT INTO jobs (id, channel_id, source, prompt, priority, max_attempts, run_at,
                             idempotency_key, reply_target, created_at, schedule_id,
                             scheduled_for, timeout_secs, max_cost_usd, agent_options)
           SELECT r.id, r.channel_id, r.source, r.prompt, r.priority, r.max_attempts, r.run_at,
                  r.idempotency_key, r.reply_target, $16, r.schedule_id, r.scheduled_for,
                  r.timeout_secs, r.max_cost_usd, r.agent_options
           FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                       $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::bigint[],
                       $11::bigint[], $12::bigint[], $13::float8[], $14::text[], $15::int[])
                AS r(id, channel_id, source, prompt, priority, max_attempts, run_at,
                     idempotency_key, reply_target, schedule_id, scheduled_for, timeout_secs,
                     max_cost_usd, agent_options, ord)
           ORDER BY r.ord
           ON CONFLICT (channel_id, source, idempotency_key) WHERE idempotency_key IS NOT NULL
           DO NOTHING
           RETURNING id AS "id!""#,
        ids,
        &channel_ids,
        &sources,
        &prompts,
        &priorities,
        &max_attempts,
        &run_ats,
        &keys as &[Option<String>],
        &targets as &[Option<String>],
        &schedule_ids as &[Option<i64>],
        &slots as &[Option<i64>],
        &timeouts as &[Option<i64>],
        &max_costs as &[Option<f64>],
        &options as &[Option<String>],
        &(0..jobs.len() as i32).collect::<Vec<i32>>(),
        now
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let mut out = Vec::with_capacity(jobs.len());
    for (job, id) in jobs.iter().zip(ids) {
        if inserted.contains(id) {
            out.push(Enqueued {
                job_id: id.clone(),
                created: true,
            });
            continue;
        }
        // Not inserted: the idempotency key already names a job of this channel (possibly
        // from this statement, or one a concurrent enqueue committed first).
        let existing = sqlx::query_scalar!(
            r#"SELECT id AS "id!" FROM jobs
               WHERE channel_id = $1 AND source = $2 AND idempotency_key = $3"#,
            job.channel_id,
            job.source.as_str(),
            job.idempotency_key
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

// ----- claim --------------------------------------------------------------------------------

/// Claims the due head of each of `channels` (locked by the caller) that has no running job
/// and whose warm-session lease is free, expired or `owner`'s: the lease is taken (or renewed)
/// until `lease_until` in the same statement, so a channel's jobs run on the node holding its
/// agent. Taking a lease over from another node starts the row from `stopped` (that node's
/// agent is not ours; it stops it when it sees the row is no longer its own).
async fn claim_heads(
    conn: &mut PgConnection,
    channels: &[i64],
    owner: &str,
    now: Millis,
    lease_until: Millis,
) -> std::result::Result<Vec<Job>, sqlx::Error> {
    update_returning_jobs!(
        r#"WITH heads AS (
               SELECT h.id, c0.id AS channel_id
               FROM channels c0
               CROSS JOIN LATERAL (SELECT q.id, q.run_at FROM jobs q
                                   WHERE q.channel_id = c0.id AND q.state = 'queued'
                                   ORDER BY q.priority DESC, q.created_at, q.id
                                   LIMIT 1) h
               WHERE c0.id = ANY ($1::bigint[]) AND h.run_at <= $4
                 AND NOT EXISTS (SELECT 1 FROM jobs r
                                 WHERE r.channel_id = c0.id AND r.state = 'running')
           ), lease AS (
               INSERT INTO warm_sessions AS w (channel_id, holder, state, lease_expires_at,
                                               updated_at)
               SELECT channel_id, $2, 'stopped', $3, $4 FROM heads
               ON CONFLICT (channel_id) DO UPDATE
               SET holder = excluded.holder, lease_expires_at = excluded.lease_expires_at,
                   updated_at = excluded.updated_at,
                   state = CASE WHEN w.holder = excluded.holder THEN w.state ELSE 'stopped' END,
                   pid = CASE WHEN w.holder = excluded.holder THEN w.pid END
               WHERE w.holder IS NULL OR w.holder = excluded.holder
                  OR w.lease_expires_at IS NULL OR w.lease_expires_at < $4
               RETURNING channel_id
           )
           UPDATE jobs j
           SET state = 'running', attempt = j.attempt + 1, lease_owner = $2,
               lease_expires_at = $3, started_at = $4, cancel_requested = false,
               stop_reason = NULL
           FROM heads h JOIN lease l USING (channel_id) JOIN channels c ON c.id = h.channel_id
           WHERE j.id = h.id AND j.state = 'queued'"#,
        channels,
        owner,
        lease_until,
        now
    )
    .fetch_all(&mut *conn)
    .await
}

// ----- fenced outcomes ----------------------------------------------------------------------

/// The fenced `running → succeeded`.
async fn complete(
    conn: &mut PgConnection,
    lease: &Lease,
    stop_reason: Option<&str>,
    now: Millis,
) -> std::result::Result<bool, sqlx::Error> {
    let r = sqlx::query!(
        r#"UPDATE jobs
           SET state = 'succeeded', stop_reason = $4, finished_at = $5,
               lease_owner = NULL, lease_expires_at = NULL
           WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3"#,
        lease.job_id,
        lease.attempt,
        lease.owner,
        stop_reason,
        now
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Returns running jobs whose lease expired to the queue. A lease expires only when the gorp
/// holding it died or stopped renewing it, so the run was interrupted, not failed, and spends
/// none of the job's attempts:
/// - cut short before its prompt reached the agent (no `session` event for the attempt), the
///   attempt is given back, as on a graceful shutdown;
/// - cut short during the agent's turn, it counts as an interruption, and a job interrupted
///   more than `max_rescues` times fails.
async fn rescue(
    conn: &mut PgConnection,
    now: Millis,
    max_rescues: i64,
) -> std::result::Result<Vec<Rescued>, sqlx::Error> {
    // Locked and skipped when locked: two nodes' rescuers never wait for each other, and each
    // expired job is rescued once.
    let expired = sqlx::query!(
        r#"SELECT j.id AS "id!", j.attempt,
                  EXISTS(SELECT 1 FROM job_events e
                         WHERE e.job_id = j.id AND e.attempt = j.attempt
                           AND e.kind = 'session') AS "in_turn!: bool"
           FROM jobs j WHERE j.state = 'running' AND j.lease_expires_at < $1
           FOR NO KEY UPDATE OF j SKIP LOCKED"#,
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
                                WHEN $3 AND interruptions >= $4 THEN 'failed'
                                ELSE 'queued' END,
                   finished_at = CASE WHEN cancel_requested OR ($3 AND interruptions >= $4)
                                      THEN $5::bigint ELSE NULL END,
                   stop_reason = CASE WHEN cancel_requested THEN 'cancelled' ELSE NULL END,
                   error = 'lease expired: worker ' || lease_owner || ' stopped renewing it',
                   interruptions = interruptions + CASE WHEN $3 THEN 1 ELSE 0 END,
                   attempt = CASE WHEN $3 THEN attempt ELSE attempt - 1 END,
                   run_at = $5, lease_owner = NULL, lease_expires_at = NULL
               WHERE id = $1 AND attempt = $2 AND state = 'running'
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
        crate::approvals::expire_for_attempt(conn, &job.id, job.attempt, now).await?;
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
    if !events.is_empty() {
        insert_events(conn, &events.iter().collect::<Vec<_>>()).await?;
    }
    Ok(rescued)
}
