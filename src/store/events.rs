//! The `job_events` table: every job's event log, in commit order, and its output text.

use serde::Serialize;

use super::writer::{Conn, Op, MAX_ROWS_PER_INSERT};
use super::*;

impl Store {
    /// Appends events without waiting for the commit. Ordering is kept with every later write
    /// from this process, so a transition sent afterwards commits after these events.
    pub async fn job_events_append(&self, events: Vec<NewEvent>) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.job_events_append(events).await;
        }
        if events.is_empty() {
            return Ok(());
        }
        self.send(Op::Events(events)).await
    }

    /// Events of a job with `seq > after`, oldest first.
    pub async fn job_events_list(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        if let Some(pg) = &self.pg {
            return pg.job_events_list(job_id, after, limit).await;
        }
        let rows = sqlx::query!(
            r#"SELECT seq AS "seq!", job_id, attempt, kind, text, data, at
               FROM job_events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"#,
            job_id,
            after,
            limit
        )
        .fetch_all(&self.read)
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
        if let Some(pg) = &self.pg {
            return pg.job_output(job_id).await;
        }
        let out: Option<String> = sqlx::query_scalar!(
            r#"SELECT group_concat(text, '') AS "out?: String" FROM (
                   SELECT e.text FROM job_events e JOIN jobs j ON j.id = e.job_id
                   WHERE e.job_id = ?1 AND e.kind = 'message' AND e.attempt = j.attempt
                   ORDER BY e.seq)"#,
            job_id
        )
        .fetch_one(&self.read)
        .await?;
        Ok(out.unwrap_or_default())
    }
}

/// One event as the multi-row insert reads it from JSON.
#[derive(Serialize)]
struct EventRow<'a> {
    job_id: &'a str,
    attempt: i64,
    kind: &'a str,
    text: Option<&'a str>,
    data: Option<String>,
    at: Millis,
}

/// Inserts `events` in order, in multi-row statements (inside the writer's transaction).
pub(super) async fn insert_events(
    conn: &mut Conn,
    events: &[&NewEvent],
) -> std::result::Result<(), sqlx::Error> {
    for chunk in events.chunks(MAX_ROWS_PER_INSERT) {
        let rows: Vec<EventRow> = chunk
            .iter()
            .map(|e| EventRow {
                job_id: &e.job_id,
                attempt: e.attempt,
                kind: &e.kind,
                text: e.text.as_deref(),
                data: e.data.as_ref().map(|d| d.to_string()),
                at: e.at,
            })
            .collect();
        let json = serde_json::to_string(&rows).expect("event rows serialise");
        sqlx::query!(
            r#"INSERT INTO job_events (job_id, attempt, kind, text, data, at)
               SELECT value ->> 'job_id', value ->> 'attempt', value ->> 'kind', value ->> 'text',
                      value ->> 'data', value ->> 'at'
               FROM json_each(?1)"#,
            json
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
