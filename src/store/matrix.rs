//! The `matrix_bot` and `matrix_replies` tables: the bot's connection state, and the per-job
//! reply rows the bot's reply pump works from.

use serde::{Deserialize, Serialize};

use super::writer::{Applied, Conn, Write};
use super::*;

/// Where a Matrix job came from: stored as JSON in `jobs.reply_target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixTarget {
    pub room_id: String,
    pub event_id: String,
    pub sender: String,
}

/// An open reply row with the facts of its job that the pump needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixReply {
    pub job_id: String,
    /// The job's channel.
    pub channel: String,
    pub room_id: String,
    pub prompt_event_id: Option<String>,
    pub sender: Option<String>,
    pub reaction_key: Option<String>,
    pub reaction_event_id: Option<String>,
    pub reply_event_id: Option<String>,
    pub edits: i64,
    pub rendered_seq: i64,
    pub noted_attempt: i64,
    pub updated_at: Millis,
    pub source: Source,
    pub state: JobState,
    pub attempt: i64,
    pub max_attempts: i64,
    pub error: Option<String>,
    pub stop_reason: Option<String>,
    /// The job's newest event (0 when it has none).
    pub last_seq: i64,
}

/// What a reply row says after the pump acted on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatrixReplyUpdate {
    pub reaction_key: Option<String>,
    pub reaction_event_id: Option<String>,
    pub reply_event_id: Option<String>,
    pub edits: i64,
    pub rendered_seq: i64,
    pub noted_attempt: i64,
    pub done: bool,
    pub error: Option<String>,
}

impl MatrixReply {
    /// The row as it stands, to be changed and written back.
    pub fn update(&self) -> MatrixReplyUpdate {
        MatrixReplyUpdate {
            reaction_key: self.reaction_key.clone(),
            reaction_event_id: self.reaction_event_id.clone(),
            reply_event_id: self.reply_event_id.clone(),
            edits: self.edits,
            rendered_seq: self.rendered_seq,
            noted_attempt: self.noted_attempt,
            done: false,
            error: None,
        }
    }
}

impl Store {
    /// The job a Matrix message asked for, with who sent it.
    pub async fn job_by_matrix_prompt(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<(String, Option<String>)>> {
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
        Ok(sqlx::query_as!(
            MatrixReply,
            r#"SELECT r.job_id AS "job_id!", c.name AS channel, r.room_id, r.prompt_event_id, r.sender,
                      r.reaction_key, r.reaction_event_id, r.reply_event_id, r.edits,
                      r.rendered_seq, r.noted_attempt, r.updated_at,
                      j.source AS "source: Source", j.state AS "state: JobState", j.attempt,
                      j.max_attempts, j.error, j.stop_reason,
                      coalesce((SELECT max(seq) FROM job_events WHERE job_id = j.id), 0)
                          AS "last_seq!: i64"
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
