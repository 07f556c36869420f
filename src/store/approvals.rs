//! The `approvals` and `permission_rules` tables: permission requests and questions of the
//! agent under the policy `ask`, their guarded decisions, and the channel's standing "allow
//! always" rules.
//!
//! An approval is inserted, with its job's `permission_request` event, only while the job's
//! attempt is running (the insert is fenced like a job transition), so nothing shows a request
//! whose job has moved on. A decision is `UPDATE … WHERE state = 'pending'`: the first decision
//! wins and every later one reports that it lost.

use super::events::insert_events;
use super::writer::{Applied, Conn, Write};
use super::*;

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

impl Store {
    /// Inserts a pending approval and its job's `permission_request` event in one transaction,
    /// only while the job's attempt `new.attempt` is running; `None` when it is not.
    pub async fn approval_insert(&self, new: NewApproval, now: Millis) -> Result<Option<Approval>> {
        if let Some(pg) = &self.pg {
            return pg.approval_insert(new, now).await;
        }
        let id = new.id.clone();
        if !self.write(Insert { new, now }).await? {
            return Ok(None);
        }
        self.approval_get(&id).await
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
        if let Some(pg) = &self.pg {
            return pg.approval_decide(id, decision, now).await;
        }
        let won = self
            .write(Decide {
                id: id.to_string(),
                decision,
                now,
            })
            .await?;
        if !won {
            return Ok(None);
        }
        self.approval_get(id).await
    }

    pub async fn approval_get(&self, id: &str) -> Result<Option<Approval>> {
        if let Some(pg) = &self.pg {
            return pg.approval_get(id).await;
        }
        Ok(select_approvals!("WHERE a.id = ?1", id)
            .fetch_optional(&self.read)
            .await?
            .map(Approval::from))
    }

    /// The approvals whose id starts with `prefix` (at most `limit`), for short ids typed in
    /// Matrix and the CLI.
    pub async fn approval_find_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<Approval>> {
        if let Some(pg) = &self.pg {
            return pg.approval_find_prefix(prefix, limit).await;
        }
        let pattern = format!("{}%", prefix.replace(['%', '_'], ""));
        Ok(select_approvals!(
            "WHERE a.id LIKE ?1 ORDER BY a.created_at DESC LIMIT ?2",
            pattern,
            limit
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .map(Approval::from)
        .collect())
    }

    /// Approvals newest first, filtered by state, channel and job.
    pub async fn approval_list(&self, f: &ApprovalFilter) -> Result<Vec<Approval>> {
        if let Some(pg) = &self.pg {
            return pg.approval_list(f).await;
        }
        let state = f.state.map(|s| s.as_str());
        let request = f.request.map(|r| r.as_str());
        let limit = if f.limit <= 0 { 50 } else { f.limit.min(1000) };
        Ok(select_approvals!(
            r#"WHERE (?1 IS NULL OR a.state = ?1)
                 AND (?2 IS NULL OR c.name = ?2)
                 AND (?3 IS NULL OR a.job_id = ?3)
                 AND (?5 IS NULL OR a.request = ?5)
               ORDER BY a.created_at DESC, a.id DESC
               LIMIT ?4"#,
            state,
            f.channel,
            f.job_id,
            limit,
            request
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .map(Approval::from)
        .collect())
    }

    /// Number of pending approvals (for the gauge).
    pub async fn approval_pending_count(&self) -> Result<i64> {
        if let Some(pg) = &self.pg {
            return pg.approval_pending_count().await;
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!: i64" FROM approvals WHERE state = 'pending'"#
        )
        .fetch_one(&self.read)
        .await?)
    }

    /// Stores a standing rule (an existing identical rule is kept); returns its id.
    pub async fn rule_insert(&self, rule: NewRule, now: Millis) -> Result<i64> {
        if let Some(pg) = &self.pg {
            return pg.rule_insert(rule, now).await;
        }
        self.write(InsertRule { rule, now }).await
    }

    /// A channel's rules, oldest first.
    pub async fn rule_list(&self, channel_id: i64) -> Result<Vec<Rule>> {
        if let Some(pg) = &self.pg {
            return pg.rule_list(channel_id).await;
        }
        Ok(sqlx::query_as!(
            Rule,
            r#"SELECT r.id AS "id!", r.channel_id, c.name AS channel, r.tool_kind, r.matcher,
                      r.created_by, r.created_via, r.approval_id, r.created_at
               FROM permission_rules r JOIN channels c ON c.id = r.channel_id
               WHERE r.channel_id = ?1 ORDER BY r.id"#,
            channel_id
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Removes rule `id` of the channel; false when it has no such rule.
    pub async fn rule_delete(&self, channel_id: i64, id: i64) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.rule_delete(channel_id, id).await;
        }
        self.write(DeleteRule { channel_id, id }).await
    }
}

struct Insert {
    new: NewApproval,
    now: Millis,
}

impl Write for Insert {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let n = &self.new;
        let input = n.input.to_string();
        let options = serde_json::Value::from(n.options.clone()).to_string();
        let r = sqlx::query!(
            r#"INSERT INTO approvals (id, job_id, attempt, channel_id, tool_call_id, title, kind,
                                      input, options, created_at, expires_at, request)
               SELECT ?1, j.id, j.attempt, j.channel_id, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11
               FROM jobs j WHERE j.id = ?2 AND j.attempt = ?3 AND j.state = 'running'"#,
            n.id,
            n.job_id,
            n.attempt,
            n.tool_call_id,
            n.title,
            n.kind,
            input,
            options,
            self.now,
            n.expires_at,
            n.request
        )
        .execute(&mut *conn)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(Ok(false));
        }
        insert_events(conn, &[&n.event]).await?;
        if let Some(d) = &n.decided {
            if let Err(e) = decide_in(conn, &n.id, d, self.now).await? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(true))
    }
}

/// Applies `d` to the pending approval `id`; whether it won.
async fn decide_in(conn: &mut Conn, id: &str, d: &Decision, now: Millis) -> Applied<bool> {
    if d.state == ApprovalState::Pending {
        return Ok(Err(StoreError::Invalid(
            "a decision must leave the pending state".into(),
        )));
    }
    let mut rule_id = d.rule_id;
    if let Some(rule) = &d.new_rule {
        let pending = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!: i64" FROM approvals WHERE id = ?1 AND state = 'pending'"#,
            id
        )
        .fetch_one(&mut *conn)
        .await?;
        if pending == 0 {
            return Ok(Ok(false));
        }
        rule_id = Some(insert_rule(conn, rule, now).await?);
    }
    let answer = d.answer.as_ref().map(|a| a.to_string());
    let r = sqlx::query!(
        r#"UPDATE approvals
           SET state = ?2, option_id = ?3, decided_by = ?4, decided_via = ?5, rule_id = ?6,
               decided_at = ?7, answer = ?8
           WHERE id = ?1 AND state = 'pending'"#,
        id,
        d.state,
        d.option_id,
        d.by,
        d.via,
        rule_id,
        now,
        answer
    )
    .execute(&mut *conn)
    .await?;
    Ok(Ok(r.rows_affected() == 1))
}

struct Decide {
    id: String,
    decision: Decision,
    now: Millis,
}

impl Write for Decide {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        decide_in(conn, &self.id, &self.decision, self.now).await
    }
}

async fn insert_rule(
    conn: &mut Conn,
    rule: &NewRule,
    now: Millis,
) -> std::result::Result<i64, sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO permission_rules (channel_id, tool_kind, matcher, created_by, created_via,
                                         approval_id, created_at)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
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
           WHERE channel_id = ?1 AND tool_kind = ?2 AND matcher = ?3"#,
        rule.channel_id,
        rule.tool_kind,
        rule.matcher
    )
    .fetch_one(&mut *conn)
    .await
}

struct InsertRule {
    rule: NewRule,
    now: Millis,
}

impl Write for InsertRule {
    type Output = i64;

    async fn apply(&self, conn: &mut Conn) -> Applied<i64> {
        Ok(Ok(insert_rule(conn, &self.rule, self.now).await?))
    }
}

struct DeleteRule {
    channel_id: i64,
    id: i64,
}

impl Write for DeleteRule {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            "DELETE FROM permission_rules WHERE id = ?1 AND channel_id = ?2",
            self.id,
            self.channel_id
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

/// Expires the pending approvals of a rescued attempt (inside the rescue's transaction).
pub(super) async fn expire_for_attempt(
    conn: &mut Conn,
    job_id: &str,
    attempt: i64,
    now: Millis,
) -> std::result::Result<u64, sqlx::Error> {
    let r = sqlx::query!(
        r#"UPDATE approvals
           SET state = 'expired', decided_via = 'restart', decided_by = 'gorp', decided_at = ?3
           WHERE job_id = ?1 AND attempt = ?2 AND state = 'pending'"#,
        job_id,
        attempt,
        now
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}
