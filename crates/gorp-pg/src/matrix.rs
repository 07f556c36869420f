//! The `matrix_bot` and `matrix_replies` tables: the bot's connection state, and the per-job
//! reply rows the bot's reply pump works from.

use crate::kinds::{ApprovalState, JobState, Source};
use crate::types::{MatrixApprovalDue, MatrixReply, MatrixReplyUpdate, Millis};
use crate::{PgStore, Result};

impl PgStore {
    /// The job a Matrix message asked for, with who sent it.
    pub async fn job_by_matrix_prompt(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<(String, Option<String>)>> {
        Ok(sqlx::query!(
            r#"SELECT job_id AS "job_id!", sender FROM matrix_replies
               WHERE prompt_event_id = $2 AND room_id = $1"#,
            room_id,
            event_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.job_id, r.sender)))
    }

    /// Reply rows the bot has not finished, oldest job first.
    pub async fn matrix_open_replies(&self, limit: i64) -> Result<Vec<MatrixReply>> {
        Ok(sqlx::query_as!(
            MatrixReply,
            r#"SELECT r.job_id AS "job_id!", c.name AS channel, r.room_id, r.prompt_event_id,
                      r.sender, r.reaction_key, r.reaction_event_id, r.reply_event_id, r.edits,
                      r.rendered_seq, r.noted_attempt, r.updated_at,
                      j.source AS "source: Source", j.state AS "state: JobState", j.attempt,
                      j.max_attempts, j.error, j.stop_reason,
                      coalesce((SELECT max(seq) FROM job_events WHERE job_id = j.id), 0)
                          AS "last_seq!: i64",
                      j.started_at, j.finished_at, j.input_tokens, j.output_tokens, j.cost_usd,
                      c.reply_footer
               FROM matrix_replies r JOIN jobs j ON j.id = r.job_id
                    JOIN channels c ON c.id = j.channel_id
               WHERE NOT r.done
               ORDER BY r.job_id
               LIMIT $1"#,
            limit
        )
        .fetch_all(&self.pool)
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
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"INSERT INTO matrix_bot (id, user_id, device_id, state, ready_at, error,
                                           updated_at)
                   VALUES (1, $1, $2, $3::text,
                           CASE WHEN $3::text = 'syncing' THEN $5::bigint END, $4, $5::bigint)
                   ON CONFLICT (id) DO UPDATE SET
                       user_id = excluded.user_id, device_id = excluded.device_id,
                       state = excluded.state, error = excluded.error,
                       ready_at = coalesce(excluded.ready_at, matrix_bot.ready_at),
                       updated_at = excluded.updated_at"#,
                user_id,
                device_id,
                state,
                error,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Records what the bot did for a job's reply.
    pub async fn matrix_reply_update(
        &self,
        job_id: &str,
        u: MatrixReplyUpdate,
        now: Millis,
    ) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"UPDATE matrix_replies
                   SET reaction_key = $2, reaction_event_id = $3, reply_event_id = $4, edits = $5,
                       rendered_seq = $6, noted_attempt = $7, done = $8, error = $9,
                       updated_at = $10
                   WHERE job_id = $1"#,
                job_id,
                u.reaction_key,
                u.reaction_event_id,
                u.reply_event_id,
                u.edits,
                u.rendered_seq,
                u.noted_attempt,
                u.done,
                u.error,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Approvals of channels with a room that are pending and not posted yet, or decided and
    /// posted but not yet shown as decided; oldest first.
    pub async fn matrix_approvals_due(&self, limit: i64) -> Result<Vec<MatrixApprovalDue>> {
        // Posts of pending approvals before edits of decided ones, each oldest first.
        Ok(sqlx::query_as!(
            MatrixApprovalDue,
            r#"SELECT d.approval_id AS "approval_id!", d.room_id AS "room_id!",
                      d.event_id AS "event_id?", d.state AS "state!: ApprovalState",
                      d.attempts AS "attempts!"
               FROM (SELECT 0 AS part, a.created_at, a.id AS approval_id,
                            c.matrix_room_id AS room_id, NULL::text AS event_id, a.state,
                            coalesce(ma.attempts, 0) AS attempts
                     FROM approvals a
                     JOIN channels c ON c.id = a.channel_id
                     LEFT JOIN matrix_approvals ma ON ma.approval_id = a.id
                     WHERE a.state = 'pending' AND c.matrix_room_id IS NOT NULL
                       AND ma.event_id IS NULL
                     UNION ALL
                     SELECT 1, a.created_at, a.id, ma.room_id, ma.event_id, a.state, ma.attempts
                     FROM matrix_approvals ma JOIN approvals a ON a.id = ma.approval_id
                     WHERE ma.shown_state IS NULL AND ma.event_id IS NOT NULL
                       AND a.state <> 'pending') d
               ORDER BY d.part, d.created_at, d.approval_id
               LIMIT $1"#,
            limit
        )
        .fetch_all(&self.pool)
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
        let failed = i64::from(error.is_some());
        let shown = shown.map(|s| s.as_str());
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"INSERT INTO matrix_approvals (approval_id, room_id, event_id, posted_at,
                                                 shown_state, attempts, last_error)
                   VALUES ($1, $2, $3::text, CASE WHEN $3::text IS NULL THEN NULL ELSE $6::bigint END,
                           $4, $5::bigint, $7)
                   ON CONFLICT (approval_id) DO UPDATE
                   SET event_id = coalesce(excluded.event_id, matrix_approvals.event_id),
                       posted_at = coalesce(matrix_approvals.posted_at, excluded.posted_at),
                       shown_state = coalesce(excluded.shown_state, matrix_approvals.shown_state),
                       attempts = matrix_approvals.attempts + $5::bigint,
                       last_error = excluded.last_error"#,
                approval_id,
                room_id,
                event_id,
                shown,
                failed,
                now,
                error
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// The approval posted as `event_id` in `room_id`, if any.
    pub async fn matrix_approval_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT approval_id AS "approval_id!" FROM matrix_approvals
               WHERE event_id = $1 AND room_id = $2"#,
            event_id,
            room_id
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}
