//! The `dashboard_sessions` table, and the few summary reads only the dashboard's overview needs
//! (outcomes over a window, queue depth per channel).

use crate::kinds::JobState;
use crate::types::{AttemptUsage, ChannelDepth, DashboardSession, Millis};
use crate::{PgStore, Result};

impl PgStore {
    /// The usage rows of a job, one per attempt that ran a turn.
    pub async fn job_usage(&self, job_id: &str) -> Result<Vec<AttemptUsage>> {
        Ok(sqlx::query_as!(
            AttemptUsage,
            r#"SELECT attempt, input_tokens, output_tokens, cache_read_tokens,
                      cache_write_tokens, cost_usd, agent_ms
               FROM usage WHERE job_id = $1 ORDER BY attempt"#,
            job_id
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Opens a session (its cookie secret and CSRF token hashed and kept as given), and drops
    /// the sessions that expired by `now`.
    pub async fn dashboard_session_open(
        &self,
        id_sha256: &str,
        session: DashboardSession,
        now: Millis,
    ) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!("DELETE FROM dashboard_sessions WHERE expires_at <= $1", now)
                .execute(&mut *tx)
                .await?;
            sqlx::query!(
                r#"INSERT INTO dashboard_sessions (id_sha256, token_sha256, csrf, created_at,
                                                   expires_at)
                   VALUES ($1, $2, $3, $4, $5)"#,
                id_sha256,
                session.token_sha256,
                session.csrf,
                now,
                session.expires_at
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// The session whose cookie secret hashes to `id_sha256`, if it has not expired.
    pub async fn dashboard_session_get(
        &self,
        id_sha256: &str,
        now: Millis,
    ) -> Result<Option<DashboardSession>> {
        Ok(sqlx::query_as!(
            DashboardSession,
            r#"SELECT token_sha256, csrf, expires_at FROM dashboard_sessions
               WHERE id_sha256 = $1 AND expires_at > $2"#,
            id_sha256,
            now
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Ends a session (logout). Returns whether there was one.
    pub async fn dashboard_session_close(&self, id_sha256: &str) -> Result<bool> {
        let found = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                "DELETE FROM dashboard_sessions WHERE id_sha256 = $1",
                id_sha256
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(found)
    }

    /// How many jobs are queued and running now (each count reads only its partial index, so
    /// it stays fast however long the history).
    pub async fn job_active_counts(&self) -> Result<(i64, i64)> {
        let r = sqlx::query!(
            r#"/* pg */ SELECT (SELECT count(*) FROM jobs WHERE state = 'queued') AS "queued!",
                               (SELECT count(*) FROM jobs WHERE state = 'running') AS "running!""#
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.queued, r.running))
    }

    /// Jobs that finished at or after `since`, by their final state.
    pub async fn job_outcomes_since(&self, since: Millis) -> Result<Vec<(JobState, i64)>> {
        let rows = sqlx::query!(
            r#"SELECT state AS "state!: JobState", count(*) AS "n!" FROM jobs
               WHERE finished_at >= $1 GROUP BY state"#,
            since
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
    }

    /// Every channel with queued or running jobs, deepest queue first (read from the partial
    /// indexes of queued and running jobs only).
    pub async fn channel_depths(&self) -> Result<Vec<ChannelDepth>> {
        Ok(sqlx::query_as!(
            ChannelDepth,
            r#"/* pg */ SELECT c.name AS "channel!",
                      (SELECT count(*) FROM jobs q
                       WHERE q.channel_id = c.id AND q.state = 'queued') AS "queued!",
                      (SELECT count(*) FROM jobs r
                       WHERE r.channel_id = c.id AND r.state = 'running') AS "running!"
               FROM channels c
               WHERE EXISTS (SELECT 1 FROM jobs q WHERE q.channel_id = c.id AND q.state = 'queued')
                  OR EXISTS (SELECT 1 FROM jobs r WHERE r.channel_id = c.id AND r.state = 'running')
               ORDER BY 2 DESC, 3 DESC, c.name"#
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
