//! Matrix: channels' rooms, and the per-job reply rows the bot's reply pump works from.

use serde::{Deserialize, Serialize};

use super::writer::Write;
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
    /// The channel whose room this is.
    pub async fn channel_get_by_room(&self, room_id: &str) -> Result<Option<Channel>> {
        Ok(sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                      matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                      webhook_secret, webhook_template
               FROM channels WHERE matrix_room_id = ?1"#,
            room_id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    /// Links a channel to a Matrix room (or unlinks it).
    pub async fn channel_set_room(&self, channel_id: i64, room_id: Option<String>) -> Result<()> {
        self.write(Write::ChannelSetRoom {
            channel_id,
            room_id,
        })
        .await
        .map(|_| ())
    }

    /// Replaces a channel's own webhook bearer token (only its SHA-256 is stored); the old
    /// token stops working at once.
    pub async fn channel_set_webhook_token(&self, channel_id: i64, token: &str) -> Result<()> {
        self.write(Write::ChannelSetToken {
            channel_id,
            sha256: crate::auth::sha256_hex(token),
        })
        .await
        .map(|_| ())
    }

    /// Queued jobs of a channel.
    pub async fn channel_queue_depth(&self, channel_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!: i64" FROM jobs WHERE channel_id = ?1 AND state = 'queued'"#,
            channel_id
        )
        .fetch_one(&self.read)
        .await?)
    }

    /// Ids of jobs starting with `prefix` (at most `limit`), so people can type a short id.
    pub async fn job_ids_with_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<String>> {
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
            r#"SELECT r.job_id AS "job_id!", r.room_id, r.prompt_event_id, r.sender,
                      r.reaction_key, r.reaction_event_id, r.reply_event_id, r.edits,
                      r.rendered_seq, r.noted_attempt, r.updated_at,
                      j.source AS "source: Source", j.state AS "state: JobState", j.attempt,
                      j.max_attempts, j.error, j.stop_reason,
                      coalesce((SELECT max(seq) FROM job_events WHERE job_id = j.id), 0)
                          AS "last_seq!: i64"
               FROM matrix_replies r JOIN jobs j ON j.id = r.job_id
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
        self.write(Write::MatrixBot {
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            state,
            error,
            now,
        })
        .await
        .map(|_| ())
    }

    /// Records what the bot did for a job's reply.
    pub async fn matrix_reply_update(
        &self,
        job_id: &str,
        u: MatrixReplyUpdate,
        now: Millis,
    ) -> Result<()> {
        self.write(Write::MatrixReply {
            job_id: job_id.to_string(),
            u,
            now,
        })
        .await
        .map(|_| ())
    }
}
