//! The `schedules` table: schedules, their reads, and the guarded firing that inserts a
//! schedule's jobs.

use crate::types::{CatchUp, Fired, Firing, Millis, NewSchedule, Overlap, Schedule};
use crate::{PgStore, Result, StoreError};

/// `SELECT` of whole [`Schedule`] rows (`s`, with its channel `c`); the rest of the query
/// follows. `/* pg */` keeps the parameterless form's text apart from SQLite's.
macro_rules! select_schedules {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Schedule,
            r#"/* pg */ SELECT s.id, s.channel_id, c.name AS "channel!", s.cron, s.timezone,
                      s.prompt, s.enabled, s.catch_up AS "catch_up: CatchUp",
                      s.overlap AS "overlap: Overlap", s.next_run_at, s.last_fired_at,
                      s.done, s.skipped, s.last_skip, s.created_by, s.created_at
               FROM schedules s JOIN channels c ON c.id = s.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

impl PgStore {
    pub async fn schedule_insert(&self, s: NewSchedule, now: Millis) -> Result<Schedule> {
        let id = crate::transaction!(self, true, |tx| {
            let id = sqlx::query_scalar!(
                r#"INSERT INTO schedules (channel_id, cron, timezone, prompt, catch_up, overlap,
                                          next_run_at, created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   RETURNING id"#,
                s.channel_id,
                s.cron.as_deref(),
                s.timezone,
                s.prompt,
                s.catch_up.as_str(),
                s.overlap.as_str(),
                s.next_run_at,
                s.created_by,
                now
            )
            .fetch_one(&mut *tx)
            .await?;
            Ok(id)
        });
        self.schedule_get(id)
            .await?
            .ok_or_else(|| StoreError::Invalid("schedule vanished".into()))
    }

    /// Pauses or resumes; resuming sets the next slot (slots while paused are not caught up).
    pub async fn schedule_set_enabled(
        &self,
        id: i64,
        enabled: bool,
        next_run_at: Option<Millis>,
    ) -> Result<bool> {
        let changed = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE schedules SET enabled = $2, next_run_at = coalesce($3::bigint, next_run_at)
                   WHERE id = $1 AND NOT done"#,
                id,
                enabled,
                next_run_at
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(changed)
    }

    pub async fn schedule_delete(&self, id: i64) -> Result<bool> {
        let deleted = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!("DELETE FROM schedules WHERE id = $1", id)
                .execute(&mut *tx)
                .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(deleted)
    }

    /// Applies one firing: advances the schedule from `f.old_next` (the guard: another scheduler
    /// that got there first makes this a no-op, `won: false`) and inserts one job per slot,
    /// unless the overlap policy skips them.
    ///
    /// The guard under concurrent schedulers (READ COMMITTED): the first statement locks the
    /// schedule row only while it is still at `old_next`. A second firer of the same slot waits
    /// on that lock; when the first commits, PostgreSQL re-checks the WHERE on the row's new
    /// version (`next_run_at` moved, or `done`), so the second finds no row and loses. One that
    /// starts after the commit sees the new `next_run_at` at once. The reads and writes after
    /// the lock run on fresh snapshots, so they see the winner's jobs (and the unique slot index
    /// `jobs_schedule_slot` stays a backstop).
    pub async fn schedule_fire(&self, f: Firing, now: Millis) -> Result<Fired> {
        let fired = crate::transaction!(self, true, |tx| {
            let Some(s) = sqlx::query!(
                r#"SELECT channel_id, prompt, overlap AS "overlap: Overlap"
                   FROM schedules
                   WHERE id = $1 AND next_run_at = $2 AND enabled AND NOT done
                   FOR NO KEY UPDATE"#,
                f.schedule_id,
                f.old_next
            )
            .fetch_optional(&mut *tx)
            .await?
            else {
                // Lost (or paused, removed): nothing written.
                return Ok(Fired::default());
            };
            // Read after the lock: a fresh snapshot that sees every committed run of the schedule.
            let busy_job: Option<String> = sqlx::query_scalar!(
                r#"SELECT id FROM jobs
                   WHERE schedule_id = $1 AND state IN ('queued', 'running') LIMIT 1"#,
                f.schedule_id
            )
            .fetch_optional(&mut *tx)
            .await?;
            let (slots, skip) = f.plan(s.overlap, busy_job.as_deref());
            let skipped = i64::from(skip.is_some());
            let done = f.new_next.is_none();
            sqlx::query!(
                r#"UPDATE schedules
                   SET next_run_at = $2, last_fired_at = coalesce($3::bigint, last_fired_at),
                       done = $4, skipped = skipped + $5,
                       last_skip = coalesce($6::text, last_skip)
                   WHERE id = $1"#,
                f.schedule_id,
                f.new_next,
                slots.last().copied(),
                done,
                skipped,
                skip.as_deref()
            )
            .execute(&mut *tx)
            .await?;
            let jobs = f.jobs(s.channel_id, &s.prompt, slots);
            let ids = crate::jobs::new_ids(jobs.len());
            let job_ids = crate::jobs::insert_jobs(&mut *tx, &jobs, &ids, now)
                .await?
                .into_iter()
                .map(|e| e.job_id)
                .collect();
            Ok(Fired {
                won: true,
                job_ids,
                skipped: skip,
            })
        });
        Ok(fired)
    }

    pub async fn schedule_get(&self, id: i64) -> Result<Option<Schedule>> {
        Ok(select_schedules!("WHERE s.id = $1", id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn schedule_list(&self) -> Result<Vec<Schedule>> {
        Ok(select_schedules!("ORDER BY s.id")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Active schedules whose next slot is at or before `until`.
    pub async fn schedule_due(&self, until: Millis) -> Result<Vec<Schedule>> {
        Ok(select_schedules!(
            r#"WHERE s.enabled AND NOT s.done AND s.next_run_at <= $1
               ORDER BY s.next_run_at"#,
            until
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
