//! The `schedules` table: schedules, their reads, and the guarded firing that inserts a
//! schedule's jobs.

use super::jobs::{insert_jobs, JobRow};
use super::writer::{Applied, Conn, Write};
use super::*;

/// `SELECT` of whole [`Schedule`] rows (`s`, with its channel `c`); the rest of the query
/// follows.
macro_rules! select_schedules {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Schedule,
            r#"SELECT s.id AS "id!", s.channel_id, c.name AS channel, s.cron, s.timezone,
                      s.prompt, s.enabled AS "enabled: bool", s.catch_up AS "catch_up: CatchUp",
                      s.overlap AS "overlap: Overlap", s.next_run_at, s.last_fired_at,
                      s.done AS "done: bool", s.skipped, s.last_skip, s.created_by, s.created_at
               FROM schedules s JOIN channels c ON c.id = s.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

impl Store {
    pub async fn schedule_insert(&self, s: NewSchedule, now: Millis) -> Result<Schedule> {
        if let Some(pg) = &self.pg {
            return pg.schedule_insert(s, now).await;
        }
        let id = self.write(Insert { s, now }).await?;
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
        if let Some(pg) = &self.pg {
            return pg.schedule_set_enabled(id, enabled, next_run_at).await;
        }
        self.write(SetEnabled {
            id,
            enabled,
            next_run_at,
        })
        .await
    }

    pub async fn schedule_delete(&self, id: i64) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.schedule_delete(id).await;
        }
        self.write(Delete { id }).await
    }

    /// Applies one firing (see [`Firing`]).
    pub async fn schedule_fire(&self, f: Firing, now: Millis) -> Result<Fired> {
        if let Some(pg) = &self.pg {
            return pg.schedule_fire(f, now).await;
        }
        self.write(Fire { f, now }).await
    }

    pub async fn schedule_get(&self, id: i64) -> Result<Option<Schedule>> {
        if let Some(pg) = &self.pg {
            return pg.schedule_get(id).await;
        }
        Ok(select_schedules!("WHERE s.id = ?1", id)
            .fetch_optional(&self.read)
            .await?)
    }

    pub async fn schedule_list(&self) -> Result<Vec<Schedule>> {
        if let Some(pg) = &self.pg {
            return pg.schedule_list().await;
        }
        Ok(select_schedules!("ORDER BY s.id")
            .fetch_all(&self.read)
            .await?)
    }

    /// Active schedules whose next slot is at or before `until`.
    pub async fn schedule_due(&self, until: Millis) -> Result<Vec<Schedule>> {
        if let Some(pg) = &self.pg {
            return pg.schedule_due(until).await;
        }
        Ok(select_schedules!(
            r#"WHERE s.enabled = 1 AND s.done = 0 AND s.next_run_at <= ?1
               ORDER BY s.next_run_at"#,
            until
        )
        .fetch_all(&self.read)
        .await?)
    }
}

struct Insert {
    s: NewSchedule,
    now: Millis,
}

impl Write for Insert {
    type Output = i64;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<i64> {
        let s = &self.s;
        Ok(Ok(sqlx::query_scalar!(
            r#"INSERT INTO schedules (channel_id, cron, timezone, prompt, catch_up, overlap,
                                      next_run_at, created_by, created_at)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
               RETURNING id AS "id!""#,
            s.channel_id,
            s.cron,
            s.timezone,
            s.prompt,
            s.catch_up,
            s.overlap,
            s.next_run_at,
            s.created_by,
            self.now
        )
        .fetch_one(&mut *conn)
        .await?))
    }
}

struct SetEnabled {
    id: i64,
    enabled: bool,
    next_run_at: Option<Millis>,
}

impl Write for SetEnabled {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"UPDATE schedules SET enabled = ?2, next_run_at = coalesce(?3, next_run_at)
               WHERE id = ?1 AND done = 0"#,
            self.id,
            self.enabled,
            self.next_run_at
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct Delete {
    id: i64,
}

impl Write for Delete {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!("DELETE FROM schedules WHERE id = ?1", self.id)
            .execute(&mut *conn)
            .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

/// Advances the schedule from `f.old_next` (the guard: another scheduler that got there first
/// makes this a no-op) and inserts one job per slot, unless the overlap policy skips them.
struct Fire {
    f: Firing,
    now: Millis,
}

impl Write for Fire {
    type Output = Fired;
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<Fired> {
        let f = &self.f;
        let Some(s) = sqlx::query!(
            r#"SELECT channel_id, prompt, overlap AS "overlap: Overlap",
                      (SELECT j.id FROM jobs j WHERE j.schedule_id = schedules.id
                         AND j.state IN ('queued', 'running') LIMIT 1) AS "busy_job?: String"
               FROM schedules WHERE id = ?1 AND next_run_at = ?2 AND enabled = 1 AND done = 0"#,
            f.schedule_id,
            f.old_next
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(Ok(Fired::default()));
        };
        let (slots, skip) = f.plan(s.overlap, s.busy_job.as_deref());
        let skipped = i64::from(skip.is_some());
        let done = f.new_next.is_none();
        sqlx::query!(
            r#"UPDATE schedules
               SET next_run_at = ?2, last_fired_at = coalesce(?3, last_fired_at), done = ?4,
                   skipped = skipped + ?5, last_skip = coalesce(?6, last_skip)
               WHERE id = ?1"#,
            f.schedule_id,
            f.new_next,
            slots.last().copied(),
            done,
            skipped,
            skip
        )
        .execute(&mut *conn)
        .await?;
        let jobs = f.jobs(s.channel_id, &s.prompt, slots);
        let rows: Vec<JobRow> = jobs.iter().map(|j| JobRow::new(j, self.now)).collect();
        let job_ids = if rows.is_empty() {
            Vec::new()
        } else {
            insert_jobs(conn, &rows)
                .await?
                .into_iter()
                .map(|e| e.job_id)
                .collect()
        };
        Ok(Ok(Fired {
            won: true,
            job_ids,
            skipped: skip,
        }))
    }
}
