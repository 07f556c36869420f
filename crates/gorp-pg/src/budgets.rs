//! Budgets over a window: each channel's spend in the current day and month, summed from
//! committed `usage` rows (every node on the database sees the same figure), against the
//! channel's budgets. The claim skips a channel whose budget is spent; its next job is told why
//! once, with a `held` event.

use sqlx::PgConnection;

use crate::types::{ChannelSpend, HeldJob, Millis, NewEvent, SpendLimits};
use crate::{PgStore, Result};

impl PgStore {
    /// The spend of every channel in the current windows (or of one), whether or not it has a
    /// budget, by name.
    pub async fn channel_spend(
        &self,
        limits: &SpendLimits,
        channel: Option<&str>,
    ) -> Result<Vec<ChannelSpend>> {
        Ok(sqlx::query_as!(
            ChannelSpend,
            r#"SELECT c.id AS "channel_id!", c.name AS "channel!",
                      coalesce(c.budget_day_usd, $1) AS "day_max_usd?: f64",
                      coalesce(c.budget_month_usd, $2) AS "month_max_usd?: f64",
                      (SELECT coalesce(sum(u.cost_usd), 0) FROM usage u
                       WHERE u.channel_id = c.id AND u.at >= $3) AS "day_usd!: f64",
                      (SELECT coalesce(sum(u.cost_usd), 0) FROM usage u
                       WHERE u.channel_id = c.id AND u.at >= $4) AS "month_usd!: f64"
               FROM channels c
               WHERE $5::text IS NULL OR c.name = $5
               ORDER BY c.name"#,
            limits.daily_max,
            limits.monthly_max,
            limits.day_start,
            limits.month_start,
            channel
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Tells each held job why, once per attempt: a `held` event with `text` and `data`,
    /// written only while the job is still queued at that attempt and has no such event yet.
    /// Returns how many were written.
    pub async fn job_note_held(&self, notes: Vec<NewEvent>) -> Result<u64> {
        if notes.is_empty() {
            return Ok(0);
        }
        let written = crate::transaction!(self, false, |tx| {
            let mut written = 0;
            for n in &notes {
                let data = n.data.as_ref().map(|d| d.to_string());
                let r = sqlx::query!(
                    r#"INSERT INTO job_events (job_id, attempt, kind, text, data, at)
                       SELECT $1, $2, 'held', $3, $4, $5
                       WHERE EXISTS (SELECT 1 FROM jobs
                                     WHERE id = $1 AND state = 'queued' AND attempt = $2)
                         AND NOT EXISTS (SELECT 1 FROM job_events
                                         WHERE job_id = $1 AND kind = 'held' AND attempt = $2)"#,
                    n.job_id,
                    n.attempt,
                    n.text,
                    data,
                    n.at
                )
                .execute(&mut *tx)
                .await?;
                written += r.rows_affected();
            }
            Ok(written)
        });
        Ok(written)
    }

    /// The latest `held` event of a queued job's current attempt: why it waits.
    pub async fn job_held_reason(&self, job_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT e.text FROM job_events e JOIN jobs j ON j.id = e.job_id
               WHERE e.job_id = $1 AND e.kind = 'held' AND e.attempt = j.attempt
                 AND j.state = 'queued'
               ORDER BY e.seq DESC LIMIT 1"#,
            job_id
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }
}

/// The channels whose day or month budget is spent and that have a queued job (or only
/// `channel`, when given), with their figures. Only channels with a budget are summed.
pub(crate) async fn spent_channels(
    conn: &mut PgConnection,
    limits: &SpendLimits,
    channel: Option<i64>,
) -> std::result::Result<Vec<ChannelSpend>, sqlx::Error> {
    let rows = sqlx::query_as!(
        ChannelSpend,
        r#"SELECT c.id AS "channel_id!", c.name AS "channel!",
                  coalesce(c.budget_day_usd, $1) AS "day_max_usd?: f64",
                  coalesce(c.budget_month_usd, $2) AS "month_max_usd?: f64",
                  CASE WHEN coalesce(c.budget_day_usd, $1) IS NULL THEN 0
                       ELSE (SELECT coalesce(sum(u.cost_usd), 0) FROM usage u
                             WHERE u.channel_id = c.id AND u.at >= $3) END AS "day_usd!: f64",
                  CASE WHEN coalesce(c.budget_month_usd, $2) IS NULL THEN 0
                       ELSE (SELECT coalesce(sum(u.cost_usd), 0) FROM usage u
                             WHERE u.channel_id = c.id AND u.at >= $4) END AS "month_usd!: f64"
           FROM channels c
           WHERE ($5::bigint IS NULL OR c.id = $5)
             AND (coalesce(c.budget_day_usd, $1) IS NOT NULL
                  OR coalesce(c.budget_month_usd, $2) IS NOT NULL)
             AND EXISTS (SELECT 1 FROM jobs q WHERE q.channel_id = c.id AND q.state = 'queued')"#,
        limits.daily_max,
        limits.monthly_max,
        limits.day_start,
        limits.month_start,
        channel
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().filter(|s| s.spent().is_some()).collect())
}

/// The ids of [`spent_channels`], for `<> ALL($n)`.
pub(crate) fn id_array(spent: &[ChannelSpend]) -> Vec<i64> {
    spent.iter().map(|s| s.channel_id).collect()
}

/// The next job of each spent channel that is due, whose channel runs nothing, and that has
/// not been told it is held (for its current attempt).
pub(crate) async fn untold_held_heads(
    conn: &mut PgConnection,
    spent: &[ChannelSpend],
    now: Millis,
) -> std::result::Result<Vec<HeldJob>, sqlx::Error> {
    if spent.is_empty() {
        return Ok(Vec::new());
    }
    let ids = id_array(spent);
    let rows = sqlx::query!(
        r#"SELECT j.id AS "id!", j.attempt, j.channel_id
           FROM unnest($1::bigint[]) AS s(channel_id)
           CROSS JOIN LATERAL (SELECT q.id FROM jobs q
                               WHERE q.channel_id = s.channel_id AND q.state = 'queued'
                               ORDER BY q.priority DESC, q.created_at, q.id
                               LIMIT 1) h
           JOIN jobs j ON j.id = h.id
           WHERE j.run_at <= $2
             AND NOT EXISTS (SELECT 1 FROM jobs r
                             WHERE r.channel_id = s.channel_id AND r.state = 'running')
             AND NOT EXISTS (SELECT 1 FROM job_events e
                             WHERE e.job_id = j.id AND e.kind = 'held'
                               AND e.attempt = j.attempt)"#,
        &ids,
        now
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let spend = spent.iter().find(|s| s.channel_id == r.channel_id)?;
            Some(HeldJob {
                job_id: r.id,
                attempt: r.attempt,
                spend: spend.clone(),
            })
        })
        .collect())
}
