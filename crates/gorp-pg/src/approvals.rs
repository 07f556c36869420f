//! The `approvals` and `permission_rules` tables: permission requests and questions of the
//! agent under the policy `ask`, their guarded decisions, and the channel's standing "allow
//! always" rules.
//!
//! An approval is inserted, with its job's `permission_request` event, only while the job's
//! attempt is running (the insert is fenced like a job transition), so nothing shows a request
//! whose job has moved on. A decision is `UPDATE … WHERE state = 'pending'`: the first decision
//! wins and every later one reports that it lost.

use sqlx::PgConnection;

use crate::types::{
    Approval, ApprovalFilter, ApprovalState, DecidedVia, Decision, Millis, NewApproval, NewEvent,
    NewRule, RequestKind, Rule,
};
use crate::{PgStore, Result, StoreError};

/// `SELECT` of whole [`Approval`] rows (`a`, with its channel `c`); the rest of the query
/// follows.
macro_rules! select_approvals {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            ApprovalRow,
            r#"SELECT a.id AS "id!", a.job_id, a.attempt, a.channel_id, c.name AS channel,
                      c.matrix_room_id, a.request AS "request: RequestKind", a.tool_call_id,
                      a.title, a.kind, a.input, a.options,
                      a.state AS "state: ApprovalState", a.option_id, a.answer, a.decided_by,
                      a.decided_via AS "decided_via: DecidedVia", a.rule_id, a.created_at,
                      a.expires_at, a.decided_at
               FROM approvals a JOIN channels c ON c.id = a.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

/// An approval as read from SQL (JSON columns as text).
struct ApprovalRow {
    id: String,
    job_id: String,
    attempt: i64,
    channel_id: i64,
    channel: String,
    matrix_room_id: Option<String>,
    request: RequestKind,
    tool_call_id: Option<String>,
    title: Option<String>,
    kind: Option<String>,
    input: String,
    options: String,
    state: ApprovalState,
    option_id: Option<String>,
    answer: Option<String>,
    decided_by: Option<String>,
    decided_via: Option<DecidedVia>,
    rule_id: Option<i64>,
    created_at: Millis,
    expires_at: Millis,
    decided_at: Option<Millis>,
}

impl From<ApprovalRow> for Approval {
    fn from(r: ApprovalRow) -> Self {
        Approval {
            id: r.id,
            job_id: r.job_id,
            attempt: r.attempt,
            channel_id: r.channel_id,
            channel: r.channel,
            matrix_room_id: r.matrix_room_id,
            request: r.request,
            tool_call_id: r.tool_call_id,
            title: r.title,
            kind: r.kind,
            input: serde_json::from_str(&r.input).unwrap_or(serde_json::Value::Null),
            options: serde_json::from_str(&r.options).unwrap_or_default(),
            state: r.state,
            option_id: r.option_id,
            answer: r.answer.and_then(|a| serde_json::from_str(&a).ok()),
            decided_by: r.decided_by,
            decided_via: r.decided_via,
            rule_id: r.rule_id,
            created_at: r.created_at,
            expires_at: r.expires_at,
            decided_at: r.decided_at,
        }
    }
}

impl PgStore {
    /// Inserts a pending approval and its job's `permission_request` event in one transaction,
    /// only while the job's attempt `new.attempt` is running; `None` when it is not.
    pub async fn approval_insert(&self, new: NewApproval, now: Millis) -> Result<Option<Approval>> {
        let n = &new;
        let input = n.input.to_string();
        let options = serde_json::Value::from(n.options.clone()).to_string();
        let inserted = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"INSERT INTO approvals (id, job_id, attempt, channel_id, tool_call_id, title,
                                          kind, input, options, created_at, expires_at, request)
                   SELECT $1::text, j.id, j.attempt, j.channel_id, $4::text, $5::text, $6::text,
                          $7::text, $8::text, $9::bigint, $10::bigint, $11::text
                   FROM jobs j WHERE j.id = $2 AND j.attempt = $3 AND j.state = 'running'"#,
                n.id,
                n.job_id,
                n.attempt,
                n.tool_call_id,
                n.title,
                n.kind,
                input,
                options,
                now,
                n.expires_at,
                n.request.as_str()
            )
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 0 {
                return Ok(false);
            }
            if let Some(d) = &n.decided {
                decide_in(&mut *tx, &n.id, d, now).await?;
            }
            // Events last: their insert takes the lock that orders event commits.
            insert_event(&mut *tx, &n.event).await?;
            Ok(true)
        });
        if !inserted {
            return Ok(None);
        }
        self.approval_get(&new.id).await
    }

    /// Decides a pending approval. Returns the decided row when this decision won, `None` when
    /// the approval was already decided (or does not exist). An "allow always" decision stores
    /// its rule in the same transaction.
    pub async fn approval_decide(
        &self,
        id: &str,
        decision: Decision,
        now: Millis,
    ) -> Result<Option<Approval>> {
        let won = crate::transaction!(self, false, |tx| {
            let won = decide_in(&mut *tx, id, &decision, now).await?;
            Ok(won)
        });
        if !won {
            return Ok(None);
        }
        self.approval_get(id).await
    }

    /// The approval `id`.
    pub async fn approval_get(&self, id: &str) -> Result<Option<Approval>> {
        Ok(select_approvals!("WHERE a.id = $1", id)
            .fetch_optional(&self.pool)
            .await?
            .map(Approval::from))
    }

    /// The approvals whose id starts with `prefix` (at most `limit`), for short ids typed in
    /// Matrix and the CLI.
    pub async fn approval_find_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<Approval>> {
        let pattern = format!("{}%", prefix.replace(['%', '_'], ""));
        // As SQLite's LIKE: ASCII case-insensitive (ILIKE under "C"), no escape character.
        Ok(select_approvals!(
            "WHERE a.id ILIKE $1 ESCAPE '' ORDER BY a.created_at DESC LIMIT $2",
            pattern,
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Approval::from)
        .collect())
    }

    /// Approvals newest first, filtered by state, channel and job.
    pub async fn approval_list(&self, f: &ApprovalFilter) -> Result<Vec<Approval>> {
        let state = f.state.map(|s| s.as_str());
        let request = f.request.map(|r| r.as_str());
        let limit = if f.limit <= 0 { 50 } else { f.limit.min(1000) };
        Ok(select_approvals!(
            r#"WHERE ($1::text IS NULL OR a.state = $1)
                 AND ($2::text IS NULL OR c.name = $2)
                 AND ($3::text IS NULL OR a.job_id = $3)
                 AND ($5::text IS NULL OR a.request = $5)
               ORDER BY a.created_at DESC, a.id DESC
               LIMIT $4"#,
            state,
            f.channel.as_deref(),
            f.job_id.as_deref(),
            limit,
            request
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Approval::from)
        .collect())
    }

    /// Number of pending approvals (for the gauge).
    pub async fn approval_pending_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar!(
            r#"/* pg */ SELECT count(*) AS "n!: i64" FROM approvals WHERE state = 'pending'"#
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Stores a standing rule (an existing identical rule is kept); returns its id.
    pub async fn rule_insert(&self, rule: NewRule, now: Millis) -> Result<i64> {
        let id = crate::transaction!(self, false, |tx| {
            let id = insert_rule(&mut *tx, &rule, now).await?;
            Ok(id)
        });
        Ok(id)
    }

    /// A channel's rules, oldest first.
    pub async fn rule_list(&self, channel_id: i64) -> Result<Vec<Rule>> {
        Ok(sqlx::query_as!(
            Rule,
            r#"SELECT r.id AS "id!", r.channel_id, c.name AS channel, r.tool_kind, r.matcher,
                      r.created_by, r.created_via, r.approval_id, r.created_at
               FROM permission_rules r JOIN channels c ON c.id = r.channel_id
               WHERE r.channel_id = $1 ORDER BY r.id"#,
            channel_id
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Removes rule `id` of the channel; false when it has no such rule.
    pub async fn rule_delete(&self, channel_id: i64, id: i64) -> Result<bool> {
        let deleted = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                "DELETE FROM permission_rules WHERE id = $1 AND channel_id = $2",
                id,
                channel_id
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(deleted)
    }
}

/// Appends the approval's event to its job's log.
async fn insert_event(conn: &mut PgConnection, e: &NewEvent) -> Result<(), sqlx::Error> {
    let data = e.data.as_ref().map(|d| d.to_string());
    sqlx::query!(
        r#"INSERT INTO job_events (job_id, attempt, kind, text, data, at)
           VALUES ($1, $2, $3, $4, $5, $6)"#,
        e.job_id,
        e.attempt,
        e.kind,
        e.text,
        data,
        e.at
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Applies `d` to the pending approval `id`; whether it won. A refusal is an error: the
/// caller's transaction then rolls back.
async fn decide_in(conn: &mut PgConnection, id: &str, d: &Decision, now: Millis) -> Result<bool> {
    if d.state == ApprovalState::Pending {
        return Err(StoreError::Invalid(
            "a decision must leave the pending state".into(),
        ));
    }
    let mut rule_id = d.rule_id;
    if let Some(rule) = &d.new_rule {
        // Locked, so a concurrent decision cannot win between this check and the update: a
        // losing "allow always" stores no rule.
        let pending = sqlx::query_scalar!(
            r#"SELECT 1 AS "one!" FROM approvals WHERE id = $1 AND state = 'pending' FOR UPDATE"#,
            id
        )
        .fetch_optional(&mut *conn)
        .await?;
        if pending.is_none() {
            return Ok(false);
        }
        rule_id = Some(insert_rule(conn, rule, now).await?);
    }
    let answer = d.answer.as_ref().map(|a| a.to_string());
    let r = sqlx::query!(
        r#"UPDATE approvals
           SET state = $2, option_id = $3, decided_by = $4, decided_via = $5, rule_id = $6,
               decided_at = $7, answer = $8
           WHERE id = $1 AND state = 'pending'"#,
        id,
        d.state.as_str(),
        d.option_id,
        d.by,
        d.via.as_str(),
        rule_id,
        now,
        answer
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Inserts `rule` unless the channel has it already; the rule's id either way.
async fn insert_rule(
    conn: &mut PgConnection,
    rule: &NewRule,
    now: Millis,
) -> Result<i64, sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO permission_rules (channel_id, tool_kind, matcher, created_by, created_via,
                                         approval_id, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (channel_id, tool_kind, matcher) DO NOTHING"#,
        rule.channel_id,
        rule.tool_kind,
        rule.matcher,
        rule.created_by,
        rule.created_via,
        rule.approval_id,
        now
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM permission_rules
           WHERE channel_id = $1 AND tool_kind = $2 AND matcher = $3"#,
        rule.channel_id,
        rule.tool_kind,
        rule.matcher
    )
    .fetch_one(&mut *conn)
    .await
}

/// Expires the pending approvals of a rescued attempt (inside the rescue's transaction).
pub(crate) async fn expire_for_attempt(
    conn: &mut PgConnection,
    job_id: &str,
    attempt: i64,
    now: Millis,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query!(
        r#"UPDATE approvals
           SET state = 'expired', decided_via = 'restart', decided_by = 'gorp', decided_at = $3
           WHERE job_id = $1 AND attempt = $2 AND state = 'pending'"#,
        job_id,
        attempt,
        now
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}
