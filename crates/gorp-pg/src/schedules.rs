//! The `schedules` table: schedules, their reads, and the guarded firing that inserts a
//! schedule's jobs.

use crate::types::{CatchUp, Fired, Firing, Millis, NewSchedule, Overlap, Schedule, Source};
use crate::{retry, PgStore, Result, StoreError};

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
        let id = retry!(async {
            let mut tx = self.pool.begin().await?;
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
            tx.commit().await?;
            Ok::<_, StoreError>(id)
        })?;
        self.committed(true);
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
        let changed = retry!(async {
            let mut tx = self.pool.begin().await?;
            let r = sqlx::query!(
                r#"UPDATE schedules SET enabled = $2, next_run_at = coalesce($3::bigint, next_run_at)
                   WHERE id = $1 AND NOT done"#,
                id,
                enabled,
                next_run_at
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(r.rows_affected() == 1)
        })?;
        self.committed(false);
        Ok(changed)
    }

    pub async fn schedule_delete(&self, id: i64) -> Result<bool> {
        let deleted = retry!(async {
            let mut tx = self.pool.begin().await?;
            let r = sqlx::query!("DELETE FROM schedules WHERE id = $1", id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(r.rows_affected() == 1)
        })?;
        self.committed(false);
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
        let fired = retry!(async {
            let mut tx = self.pool.begin().await?;
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
                // Lost (or paused, removed): nothing written; dropping `tx` rolls back.
                return Ok::<_, StoreError>(Fired::default());
            };
            // Read after the lock: a fresh snapshot that sees every committed run of the schedule.
            let busy_job: Option<String> = sqlx::query_scalar!(
                r#"SELECT id FROM jobs
                   WHERE schedule_id = $1 AND state IN ('queued', 'running') LIMIT 1"#,
                f.schedule_id
            )
            .fetch_optional(&mut *tx)
            .await?;
            let mut notes = Vec::new();
            if f.skipped_slots > 0 {
                notes.push(format!(
                    "{} missed slot(s) skipped (catch_up = {})",
                    f.skipped_slots, f.catch_up
                ));
            }
            // `overlap = skip`: at most one run of the schedule is queued or running, also when
            // several slots are due at once (after a restart).
            let slots: &[Millis] = match (&busy_job, s.overlap) {
                (Some(busy), Overlap::Skip) if !f.slots.is_empty() => {
                    notes.push(format!(
                        "{} slot(s) skipped: the previous run {busy} is still queued or running \
                         (overlap = skip)",
                        f.slots.len()
                    ));
                    &[]
                }
                (None, Overlap::Skip) if f.slots.len() > 1 => {
                    notes.push(format!(
                        "{} slot(s) skipped: the run of the slot due first is still queued \
                         (overlap = skip)",
                        f.slots.len() - 1
                    ));
                    &f.slots[..1]
                }
                _ => &f.slots,
            };
            let skip = (!notes.is_empty()).then(|| notes.join("; "));
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
            let job_ids =
                insert_slot_jobs(&mut tx, &f, s.channel_id, &s.prompt, slots, now).await?;
            tx.commit().await?;
            Ok(Fired {
                won: true,
                job_ids,
                skipped: skip,
            })
        })?;
        if fired.won {
            self.committed(true);
        }
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

/// Inserts the jobs of one firing, one per slot, in slot order, as SQLite's enqueue of
/// `NewJob::new(channel, Source::Schedule, prompt)` with the firing's schedule, slot and
/// `max_attempts` would (priority 0, due now, no key, target or limits). Returns their ids.
async fn insert_slot_jobs(
    conn: &mut sqlx::PgConnection,
    f: &Firing,
    channel_id: i64,
    prompt: &str,
    slots: &[Millis],
    now: Millis,
) -> std::result::Result<Vec<String>, sqlx::Error> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = slots
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    sqlx::query!(
        r#"INSERT INTO jobs (id, channel_id, source, prompt, priority, max_attempts, run_at,
                             created_at, schedule_id, scheduled_for)
           SELECT r.id, $3, $4, $5, 0, $6, $7, $7, $8, r.slot
           FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS r(id, slot, n)
           ORDER BY r.n"#,
        &ids,
        slots,
        channel_id,
        Source::Schedule.as_str(),
        prompt,
        f.max_attempts,
        now,
        f.schedule_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(ids)
}
