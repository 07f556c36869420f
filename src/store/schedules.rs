//! Schedules: rows, reads, and the guarded firing.

use super::writer::{Op, Write};
use super::*;

impl Store {
    pub async fn schedule_insert(&self, s: NewSchedule, now: Millis) -> Result<Schedule> {
        let id = self
            .call(|reply| Op::ScheduleInsert { s, now, reply })
            .await?;
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
        self.call(|reply| Op::Write {
            w: Write::ScheduleSetEnabled {
                id,
                enabled,
                next_run_at,
            },
            reply,
        })
        .await
        .map(|n| n == 1)
    }

    pub async fn schedule_delete(&self, id: i64) -> Result<bool> {
        self.call(|reply| Op::Write {
            w: Write::ScheduleDelete { id },
            reply,
        })
        .await
        .map(|n| n == 1)
    }

    /// Applies one firing (see [`Firing`]).
    pub async fn schedule_fire(&self, f: Firing, now: Millis) -> Result<Fired> {
        self.call(|reply| Op::ScheduleFire { f, now, reply }).await
    }

    pub async fn schedule_get(&self, id: i64) -> Result<Option<Schedule>> {
        Ok(sqlx::query_as!(
            Schedule,
            r#"SELECT s.id AS "id!", s.channel_id, c.name AS channel, s.cron, s.timezone, s.prompt,
                      s.enabled AS "enabled: bool", s.catch_up, s.overlap, s.next_run_at,
                      s.last_fired_at, s.done AS "done: bool", s.skipped, s.last_skip,
                      s.created_by, s.created_at
               FROM schedules s JOIN channels c ON c.id = s.channel_id WHERE s.id = ?1"#,
            id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    pub async fn schedule_list(&self) -> Result<Vec<Schedule>> {
        Ok(sqlx::query_as!(
            Schedule,
            r#"SELECT s.id AS "id!", s.channel_id, c.name AS channel, s.cron, s.timezone, s.prompt,
                      s.enabled AS "enabled: bool", s.catch_up, s.overlap, s.next_run_at,
                      s.last_fired_at, s.done AS "done: bool", s.skipped, s.last_skip,
                      s.created_by, s.created_at
               FROM schedules s JOIN channels c ON c.id = s.channel_id ORDER BY s.id"#
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Active schedules whose next slot is at or before `until`.
    pub async fn schedule_due(&self, until: Millis) -> Result<Vec<Schedule>> {
        Ok(sqlx::query_as!(
            Schedule,
            r#"SELECT s.id AS "id!", s.channel_id, c.name AS channel, s.cron, s.timezone, s.prompt,
                      s.enabled AS "enabled: bool", s.catch_up, s.overlap, s.next_run_at,
                      s.last_fired_at, s.done AS "done: bool", s.skipped, s.last_skip,
                      s.created_by, s.created_at
               FROM schedules s JOIN channels c ON c.id = s.channel_id
               WHERE s.enabled = 1 AND s.done = 0 AND s.next_run_at <= ?1
               ORDER BY s.next_run_at"#,
            until
        )
        .fetch_all(&self.read)
        .await?)
    }
}
