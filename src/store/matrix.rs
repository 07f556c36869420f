//! The `matrix_bot` and `matrix_replies` tables: the bot's connection state, and the per-job
//! reply rows the bot's reply pump works from.

use super::writer::{Applied, Conn, Write};
use super::*;

impl Store {
    /// The job a Matrix message asked for, with who sent it.
    pub async fn job_by_matrix_prompt(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<(String, Option<String>)>> {
        if let Some(pg) = &self.pg {
            return pg.job_by_matrix_prompt(room_id, event_id).await;
        }
        Ok(sqlx::query!(
            r#"SELECT job_id AS "job_id!", sender FROM matrix_replies
               WHERE prompt_event_id = ?2 AND room_id = ?1"#,
            room_id,
            event_id
        )
        .fetch_optional(&self.read)
        .await?
        .map(|r| (r.job_id, r.sender)))
    }

    /// Reply rows the bot has not finished, oldest job first.
    pub async fn matrix_open_replies(&self, limit: i64) -> Result<Vec<MatrixReply>> {
        if let Some(pg) = &self.pg {
            return pg.matrix_open_replies(limit).await;
        }
        Ok(sqlx::query_as!(
            MatrixReply,
            r#"SELECT r.job_id AS "job_id!", c.name AS channel, r.room_id, r.prompt_event_id, r.sender,
                      r.reaction_key, r.reaction_event_id, r.reply_event_id, r.edits,
                      r.rendered_seq, r.noted_attempt, r.updated_at,
                      j.source AS "source: Source", j.state AS "state: JobState", j.attempt,
                      j.max_attempts, j.error, j.stop_reason,
                      coalesce((SELECT max(seq) FROM job_events WHERE job_id = j.id), 0)
                          AS "last_seq!: i64",
                      j.started_at, j.finished_at, j.input_tokens, j.output_tokens, j.cost_usd,
                      c.reply_footer AS "reply_footer: bool"
               FROM matrix_replies r JOIN jobs j ON j.id = r.job_id
                    JOIN channels c ON c.id = j.channel_id
               WHERE r.done = 0
               ORDER BY r.job_id
               LIMIT ?1"#,
            limit
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Records the bot's connection state (`syncing`, `retrying`, `stopped`).
    pub async fn matrix_bot_state(
        &self,
        user_id: &str,
        device_id: &str,
        state: &'static str,
        error: Option<String>,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg
                .matrix_bot_state(user_id, device_id, state, error, now)
                .await;
        }
        self.write(BotState {
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            state,
            error,
            now,
        })
        .await
    }

    /// Records what the bot did for a job's reply.
    pub async fn matrix_reply_update(
        &self,
        job_id: &str,
        u: MatrixReplyUpdate,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.matrix_reply_update(job_id, u, now).await;
        }
        self.write(ReplyUpdate {
            job_id: job_id.to_string(),
            u,
            now,
        })
        .await
    }
}

struct BotState {
    user_id: String,
    device_id: String,
    state: &'static str,
    error: Option<String>,
    now: Millis,
}

impl Write for BotState {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            r#"INSERT INTO matrix_bot (id, user_id, device_id, state, ready_at, error, updated_at)
               VALUES (1, ?1, ?2, ?3, CASE WHEN ?3 = 'syncing' THEN ?5 END, ?4, ?5)
               ON CONFLICT (id) DO UPDATE SET
                   user_id = excluded.user_id, device_id = excluded.device_id,
                   state = excluded.state, error = excluded.error,
                   ready_at = coalesce(excluded.ready_at, matrix_bot.ready_at),
                   updated_at = excluded.updated_at"#,
            self.user_id,
            self.device_id,
            self.state,
            self.error,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct ReplyUpdate {
    job_id: String,
    u: MatrixReplyUpdate,
    now: Millis,
}

impl Write for ReplyUpdate {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        let u = &self.u;
        sqlx::query!(
            r#"UPDATE matrix_replies
               SET reaction_key = ?2, reaction_event_id = ?3, reply_event_id = ?4, edits = ?5,
                   rendered_seq = ?6, noted_attempt = ?7, done = ?8, error = ?9,
                   updated_at = ?10
               WHERE job_id = ?1"#,
            self.job_id,
            u.reaction_key,
            u.reaction_event_id,
            u.reply_event_id,
            u.edits,
            u.rendered_seq,
            u.noted_attempt,
            u.done,
            u.error,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

impl Store {
    /// Approvals of channels with a room that are pending and not posted yet, or decided and
    /// posted but not yet shown as decided; oldest first.
    pub async fn matrix_approvals_due(&self, limit: i64) -> Result<Vec<MatrixApprovalDue>> {
        if let Some(pg) = &self.pg {
            return pg.matrix_approvals_due(limit).await;
        }
        Ok(sqlx::query_as!(
            MatrixApprovalDue,
            r#"SELECT a.id AS "approval_id!", c.matrix_room_id AS "room_id!: String",
                      NULL AS "event_id?: String", a.state AS "state!: ApprovalState",
                      coalesce(ma.attempts, 0) AS "attempts!: i64"
               FROM approvals a
               JOIN channels c ON c.id = a.channel_id
               LEFT JOIN matrix_approvals ma ON ma.approval_id = a.id
               WHERE a.state = 'pending' AND c.matrix_room_id IS NOT NULL
                 AND ma.event_id IS NULL
               UNION ALL
               SELECT a.id, ma.room_id, ma.event_id, a.state, ma.attempts
               FROM matrix_approvals ma JOIN approvals a ON a.id = ma.approval_id
               WHERE ma.shown_state IS NULL AND ma.event_id IS NOT NULL
                 AND a.state <> 'pending'
               LIMIT ?1"#,
            limit
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Records where an approval was posted, or (with `event_id` `None`) a failed attempt to
    /// post or edit it with its `error`; `shown` is the decided state its message now shows.
    pub async fn matrix_approval_record(
        &self,
        approval_id: &str,
        room_id: &str,
        event_id: Option<&str>,
        shown: Option<ApprovalState>,
        error: Option<&str>,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg
                .matrix_approval_record(approval_id, room_id, event_id, shown, error, now)
                .await;
        }
        self.write(ApprovalPost {
            approval_id: approval_id.to_string(),
            room_id: room_id.to_string(),
            event_id: event_id.map(String::from),
            shown,
            error: error.map(String::from),
            now,
        })
        .await
    }

    /// The approval posted as `event_id` in `room_id`, if any.
    pub async fn matrix_approval_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<String>> {
        if let Some(pg) = &self.pg {
            return pg.matrix_approval_by_event(room_id, event_id).await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT approval_id AS "approval_id!" FROM matrix_approvals
               WHERE event_id = ?1 AND room_id = ?2"#,
            event_id,
            room_id
        )
        .fetch_optional(&self.read)
        .await?)
    }
}

struct ApprovalPost {
    approval_id: String,
    room_id: String,
    event_id: Option<String>,
    shown: Option<ApprovalState>,
    error: Option<String>,
    now: Millis,
}

impl Write for ApprovalPost {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        let failed = i64::from(self.error.is_some());
        sqlx::query!(
            r#"INSERT INTO matrix_approvals (approval_id, room_id, event_id, posted_at, shown_state,
                                             attempts, last_error)
               VALUES (?1, ?2, ?3, CASE WHEN ?3 IS NULL THEN NULL ELSE ?6 END, ?4, ?5, ?7)
               ON CONFLICT (approval_id) DO UPDATE
               SET event_id = coalesce(excluded.event_id, matrix_approvals.event_id),
                   posted_at = coalesce(matrix_approvals.posted_at, excluded.posted_at),
                   shown_state = coalesce(excluded.shown_state, matrix_approvals.shown_state),
                   attempts = matrix_approvals.attempts + ?5,
                   last_error = excluded.last_error"#,
            self.approval_id,
            self.room_id,
            self.event_id,
            self.shown,
            failed,
            self.now,
            self.error
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}
