//! The `job_events` table: every job's event log, in commit order, and its output text.
//!
//! Every statement inserting events takes the schema's advisory lock (trigger
//! `job_events_in_seq_order`), so event-inserting transactions commit in seq order and "after
//! seq N" stays a cursor; their transactions are kept short.

use crate::types::{Event, NewEvent};
use crate::{PgStore, Result};

impl PgStore {
    /// Appends events in one short transaction and returns after its commit (there is no writer
    /// queue here, so every later write of this process commits after these events).
    pub async fn job_events_append(&self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let refs: Vec<&NewEvent> = events.iter().collect();
        crate::transaction!(self, false, |tx| {
            insert_events(&mut *tx, &refs).await?;
            Ok(())
        });
        Ok(())
    }

    /// Events of a job with `seq > after`, oldest first.
    pub async fn job_events_list(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query!(
            r#"SELECT seq, job_id, attempt, kind, text, data, at
               FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"#,
            job_id,
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Event {
                seq: r.seq,
                job_id: r.job_id,
                attempt: r.attempt,
                kind: r.kind,
                text: r.text,
                data: r.data.and_then(|d| serde_json::from_str(&d).ok()),
                at: r.at,
            })
            .collect())
    }

    /// The output text of a job's latest attempt: its message chunks joined in order.
    pub async fn job_output(&self, job_id: &str) -> Result<String> {
        let out: Option<String> = sqlx::query_scalar!(
            r#"SELECT string_agg(e.text, '' ORDER BY e.seq) AS "out?: String"
               FROM job_events e JOIN jobs j ON j.id = e.job_id
               WHERE e.job_id = $1 AND e.kind = 'message' AND e.attempt = j.attempt"#,
            job_id
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(out.unwrap_or_default())
    }
}

/// Inserts `events` in order, in one multi-row statement, on `conn` (inside the caller's
/// transaction, which the statement's advisory lock then serializes with every other event
/// writer until it ends: insert events last).
pub(crate) async fn insert_events(
    conn: &mut sqlx::PgConnection,
    events: &[&NewEvent],
) -> std::result::Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let n = events.len();
    let mut job_ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut texts = Vec::with_capacity(n);
    let mut datas = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    for e in events {
        job_ids.push(e.job_id.clone());
        attempts.push(e.attempt);
        kinds.push(e.kind.clone());
        texts.push(e.text.as_deref());
        datas.push(e.data.as_ref().map(|d| d.to_string()));
        ats.push(e.at);
    }
    // `WITH ORDINALITY … ORDER BY`: seq follows the order of `events`. The nullable columns'
    // arrays name their Rust type (`as`): the macros check arrays of non-null elements only.
    sqlx::query!(
        r#"INSERT INTO job_events (job_id, attempt, kind, text, data, at)
           SELECT r.job_id, r.attempt, r.kind, r.text, r.data, r.at
           FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[])
                WITH ORDINALITY AS r(job_id, attempt, kind, text, data, at, n)
           ORDER BY r.n"#,
        &job_ids,
        &attempts,
        &kinds,
        &texts as &[Option<&str>],
        &datas as &[Option<String>],
        &ats
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
