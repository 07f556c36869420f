//! The writer task: the only code that writes to the database.
//!
//! It takes every operation waiting in its queue (up to [`MAX_GROUP`]), applies them in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit. Enqueues of the group
//! become one multi-row insert, and so do events; claims, transitions and the rest run one
//! statement each. `BEGIN IMMEDIATE` takes the write lock up front, so a transaction never fails
//! on lock upgrade when another process (the CLI, `sqlite3`) writes too.
//!
//! Failure handling: an operation that is refused for a reason of its own (unknown channel,
//! channel busy) answers with that error and writes nothing. A database error aborts the group:
//! it is rolled back and each operation is retried in a transaction of its own, so one bad
//! operation never fails its neighbours.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot, Notify};

use super::*;
use crate::auth::sha256_hex;

/// Most operations applied in one transaction.
const MAX_GROUP: usize = 1024;
/// Most rows in one multi-row insert statement.
const MAX_ROWS_PER_INSERT: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T>>;

pub(super) enum Op {
    Flush(Reply<()>),
    Enqueue {
        job: NewJob,
        now: Millis,
        reply: Reply<Enqueued>,
    },
    EnqueueMany {
        jobs: Vec<NewJob>,
        now: Millis,
        reply: Reply<Vec<Enqueued>>,
    },
    Events {
        events: Vec<NewEvent>,
    },
    ChannelInsert {
        ch: NewChannel,
        now: Millis,
        reply: Reply<Channel>,
    },
    ChannelDelete {
        name: String,
        reply: Reply<()>,
    },
    ChannelSetSession {
        channel_id: i64,
        session: Option<String>,
        reply: Reply<()>,
    },
    Claim {
        owner: String,
        limit: i64,
        now: Millis,
        lease_until: Millis,
        reply: Reply<Vec<Job>>,
    },
    Heartbeat {
        owner: String,
        lease_until: Millis,
        reply: Reply<Vec<(String, i64, bool)>>,
    },
    Complete {
        lease: Lease,
        stop_reason: Option<String>,
        now: Millis,
        reply: Reply<bool>,
    },
    CompleteClaim {
        lease: Lease,
        stop_reason: Option<String>,
        now: Millis,
        lease_until: Millis,
        reply: Reply<(bool, Option<Job>)>,
    },
    Fail {
        lease: Lease,
        error: String,
        retry_at: Option<Millis>,
        now: Millis,
        reply: Reply<Option<JobState>>,
    },
    CancelRunning {
        lease: Lease,
        reason: String,
        now: Millis,
        reply: Reply<bool>,
    },
    Release {
        lease: Lease,
        now: Millis,
        reply: Reply<bool>,
    },
    Cancel {
        job_id: String,
        now: Millis,
        reply: Reply<CancelOutcome>,
    },
    Rescue {
        now: Millis,
        max_rescues: i64,
        reply: Reply<Vec<Rescued>>,
    },
    Clean {
        before: Millis,
        limit: i64,
        reply: Reply<u64>,
    },
    ScheduleInsert {
        s: NewSchedule,
        now: Millis,
        reply: Reply<i64>,
    },
    ScheduleFire {
        f: Firing,
        now: Millis,
        reply: Reply<Fired>,
    },
    /// A single-statement write answering with the number of rows it changed.
    Write {
        w: Write,
        reply: Reply<u64>,
    },
}

/// Small single-statement writes: warm-session leases and per-job facts.
pub(super) enum Write {
    WarmUpsert {
        channel_id: i64,
        holder: String,
        state: &'static str,
        pid: Option<i64>,
        session: Option<String>,
        now: Millis,
        lease_until: Millis,
        expires_at: Option<Millis>,
        used: bool,
    },
    WarmStop {
        channel_id: i64,
        holder: String,
        state: &'static str,
        error: Option<String>,
        now: Millis,
    },
    WarmRequest {
        channel_id: i64,
        at: Option<Millis>,
        now: Millis,
    },
    WarmHeartbeat {
        holder: String,
        lease_until: Millis,
    },
    WarmReleaseLeases {
        holder: String,
        now: Millis,
    },
    WarmExpireOrphans {
        now: Millis,
    },
    WarmStopOrphan {
        channel_id: i64,
        holder: Option<String>,
        note: String,
        now: Millis,
    },
    JobExpireOwner {
        owner: String,
        now: Millis,
    },
    ChannelSetRoom {
        channel_id: i64,
        room_id: Option<String>,
    },
    ChannelSetToken {
        channel_id: i64,
        sha256: String,
    },
    MatrixBot {
        user_id: String,
        device_id: String,
        state: &'static str,
        error: Option<String>,
        now: Millis,
    },
    MatrixReply {
        job_id: String,
        u: super::MatrixReplyUpdate,
        now: Millis,
    },
    ScheduleSetEnabled {
        id: i64,
        enabled: bool,
        next_run_at: Option<Millis>,
    },
    ScheduleDelete {
        id: i64,
    },
    JobRecordRun {
        job_id: String,
        attempt: i64,
        facts: RunFacts,
    },
}

/// What an operation produced, held until the commit.
enum Out {
    Unit,
    Enqueued(Vec<Enqueued>),
    Channel(Box<Channel>),
    Jobs(Vec<Job>),
    Beats(Vec<(String, i64, bool)>),
    Bool(bool),
    State(Option<JobState>),
    Cancel(CancelOutcome),
    Rescued(Vec<Rescued>),
    Count(u64),
    Id(i64),
    Fired(Fired),
    CompletedNext(bool, Option<Box<Job>>),
}

/// The logical result of one operation; a `sqlx::Error` around it aborts the group.
type Applied = Result<Out>;

impl Op {
    /// True when committing this operation can make a job claimable.
    fn wakes_workers(&self) -> bool {
        !matches!(
            self,
            Op::Flush(_)
                | Op::Events { .. }
                | Op::Heartbeat { .. }
                | Op::Claim { .. }
                | Op::Write { .. }
        )
    }

    fn is_enqueue(&self) -> bool {
        matches!(self, Op::Enqueue { .. } | Op::EnqueueMany { .. })
    }

    fn finish(self, res: Applied) {
        fn send<T>(reply: Reply<T>, res: Applied, pick: impl FnOnce(Out) -> Option<T>) {
            let v = res.and_then(|o| {
                pick(o)
                    .ok_or_else(|| StoreError::Invalid("internal: mismatched writer output".into()))
            });
            let _ = reply.send(v);
        }
        match self {
            Op::Events { .. } => {
                if let Err(e) = res {
                    tracing::error!(error = %e, "job events could not be written");
                }
            }
            Op::Flush(r)
            | Op::ChannelDelete { reply: r, .. }
            | Op::ChannelSetSession { reply: r, .. } => {
                send(r, res, |o| matches!(o, Out::Unit).then_some(()))
            }
            Op::Enqueue { reply, .. } => send(reply, res, |o| match o {
                Out::Enqueued(mut v) if v.len() == 1 => v.pop(),
                _ => None,
            }),
            Op::EnqueueMany { reply, .. } => send(reply, res, |o| match o {
                Out::Enqueued(v) => Some(v),
                _ => None,
            }),
            Op::ChannelInsert { reply, .. } => send(reply, res, |o| match o {
                Out::Channel(c) => Some(*c),
                _ => None,
            }),
            Op::Claim { reply, .. } => send(reply, res, |o| match o {
                Out::Jobs(v) => Some(v),
                _ => None,
            }),
            Op::Heartbeat { reply, .. } => send(reply, res, |o| match o {
                Out::Beats(v) => Some(v),
                _ => None,
            }),
            Op::Complete { reply, .. }
            | Op::CancelRunning { reply, .. }
            | Op::Release { reply, .. } => send(reply, res, |o| match o {
                Out::Bool(b) => Some(b),
                _ => None,
            }),
            Op::Fail { reply, .. } => send(reply, res, |o| match o {
                Out::State(s) => Some(s),
                _ => None,
            }),
            Op::CompleteClaim { reply, .. } => send(reply, res, |o| match o {
                Out::CompletedNext(won, job) => Some((won, job.map(|j| *j))),
                _ => None,
            }),
            Op::ScheduleInsert { reply, .. } => send(reply, res, |o| match o {
                Out::Id(id) => Some(id),
                _ => None,
            }),
            Op::ScheduleFire { reply, .. } => send(reply, res, |o| match o {
                Out::Fired(f) => Some(f),
                _ => None,
            }),
            Op::Cancel { reply, .. } => send(reply, res, |o| match o {
                Out::Cancel(c) => Some(c),
                _ => None,
            }),
            Op::Rescue { reply, .. } => send(reply, res, |o| match o {
                Out::Rescued(v) => Some(v),
                _ => None,
            }),
            Op::Clean { reply, .. } | Op::Write { reply, .. } => send(reply, res, |o| match o {
                Out::Count(n) => Some(n),
                _ => None,
            }),
        }
    }
}

pub(super) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    wake: Arc<Notify>,
    commits: tokio::sync::watch::Sender<u64>,
) {
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let wakes = group.iter().any(Op::wakes_workers);
        let ops = std::mem::take(&mut group);
        match apply_in_tx(&mut conn, &ops).await {
            Ok(outs) => {
                for (op, out) in ops.into_iter().zip(outs) {
                    op.finish(out);
                }
            }
            Err(e) => {
                if ops.len() > 1 {
                    tracing::warn!(error = %e, ops = ops.len(), "write group failed; retrying its operations one by one");
                }
                for op in ops {
                    let one = std::slice::from_ref(&op);
                    let res = match apply_in_tx(&mut conn, one).await {
                        Ok(mut outs) => outs.pop().unwrap_or(Ok(Out::Unit)),
                        Err(e) => Err(StoreError::Db(e)),
                    };
                    op.finish(res);
                }
            }
        }
        commits.send_modify(|n| *n = n.wrapping_add(1));
        if wakes {
            wake.notify_one();
        }
    }
    let _ = conn.close().await;
}

/// Applies `ops` in one transaction and commits; returns each operation's result.
///
/// Plain statements, not sqlx's `Transaction`: when COMMIT fails (`SQLITE_FULL`,
/// `SQLITE_IOERR`) SQLite may already have rolled the transaction back; sqlx 0.9 then fails its
/// own ROLLBACK, keeps counting the transaction as open and refuses every later `begin_with`
/// on the connection, so the writer would never write again.
async fn apply_in_tx(conn: &mut SqliteConnection, ops: &[Op]) -> Result<Vec<Applied>, sqlx::Error> {
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let res = match apply_group(conn, ops).await {
        Ok(outs) => sqlx::raw_sql("COMMIT")
            .execute(&mut *conn)
            .await
            .map(|_| outs),
        Err(e) => Err(e),
    };
    if res.is_err() {
        // What is left of the transaction; this fails when SQLite rolled it back already.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    res
}

async fn apply_group(conn: &mut SqliteConnection, ops: &[Op]) -> Result<Vec<Applied>, sqlx::Error> {
    let mut outs: Vec<Option<Applied>> = (0..ops.len()).map(|_| None).collect();

    // 1. Every enqueue of the group as one multi-row insert.
    if ops.iter().any(Op::is_enqueue) {
        let mut rows = Vec::new();
        let mut spans = Vec::new(); // (op index, first row, row count)
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Enqueue { job, now, .. } => {
                    spans.push((i, rows.len(), 1));
                    rows.push(JobRow::new(job, *now));
                }
                Op::EnqueueMany { jobs, now, .. } => {
                    spans.push((i, rows.len(), jobs.len()));
                    rows.extend(jobs.iter().map(|j| JobRow::new(j, *now)));
                }
                _ => {}
            }
        }
        let results = insert_jobs(conn, &rows).await?;
        for (i, first, n) in spans {
            outs[i] = Some(Ok(Out::Enqueued(results[first..first + n].to_vec())));
        }
    }

    // 2. Every event of the group, in order, as multi-row inserts.
    let events: Vec<&NewEvent> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Events { events } => Some(events.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    if !events.is_empty() {
        insert_events(conn, &events).await?;
        for (i, op) in ops.iter().enumerate() {
            if matches!(op, Op::Events { .. }) {
                outs[i] = Some(Ok(Out::Unit));
            }
        }
    }

    // 3. The rest, in arrival order.
    for (i, op) in ops.iter().enumerate() {
        if outs[i].is_none() {
            outs[i] = Some(apply_one(conn, op).await?);
        }
    }
    Ok(outs
        .into_iter()
        .map(|o| o.unwrap_or(Ok(Out::Unit)))
        .collect())
}

async fn apply_one(conn: &mut SqliteConnection, op: &Op) -> Result<Applied, sqlx::Error> {
    Ok(match op {
        Op::Write { w, .. } => Ok(Out::Count(apply_write(conn, w).await?)),
        Op::ScheduleInsert { s, now, .. } => {
            let id = sqlx::query_scalar!(
                r#"INSERT INTO schedules (channel_id, cron, timezone, prompt, catch_up, overlap,
                                          next_run_at, created_by, created_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                   RETURNING id AS "id!""#,
                s.channel_id,
                s.cron,
                s.timezone,
                s.prompt,
                s.catch_up,
                s.overlap,
                s.next_run_at,
                s.created_by,
                now
            )
            .fetch_one(&mut *conn)
            .await?;
            Ok(Out::Id(id))
        }
        Op::ScheduleFire { f, now, .. } => Ok(Out::Fired(schedule_fire(conn, f, *now).await?)),
        Op::Flush(_) | Op::Events { .. } | Op::Enqueue { .. } | Op::EnqueueMany { .. } => {
            Ok(Out::Unit)
        }
        Op::ChannelInsert { ch, now, .. } => channel_insert(conn, ch, *now).await?,
        Op::ChannelDelete { name, .. } => channel_delete(conn, name).await?,
        Op::ChannelSetSession {
            channel_id,
            session,
            ..
        } => {
            sqlx::query!(
                "UPDATE channels SET acp_session_id = ?2 WHERE id = ?1",
                channel_id,
                session
            )
            .execute(&mut *conn)
            .await?;
            Ok(Out::Unit)
        }
        Op::Claim {
            owner,
            limit,
            now,
            lease_until,
            ..
        } => Ok(Out::Jobs(
            claim(conn, owner, *limit, *now, *lease_until).await?,
        )),
        Op::Heartbeat {
            owner, lease_until, ..
        } => {
            let rows = sqlx::query!(
                r#"UPDATE jobs SET lease_expires_at = ?2
                   WHERE state = 'running' AND lease_owner = ?1
                   RETURNING id AS "id!", attempt, cancel_requested AS "cancel_requested: bool""#,
                owner,
                lease_until
            )
            .fetch_all(&mut *conn)
            .await?;
            Ok(Out::Beats(
                rows.into_iter()
                    .map(|r| (r.id, r.attempt, r.cancel_requested))
                    .collect(),
            ))
        }
        Op::Complete {
            lease,
            stop_reason,
            now,
            ..
        } => Ok(Out::Bool(complete(conn, lease, stop_reason, *now).await?)),
        Op::CompleteClaim {
            lease,
            stop_reason,
            now,
            lease_until,
            ..
        } => {
            let won = complete(conn, lease, stop_reason, *now).await?;
            let next = if won {
                claim_same_channel(conn, lease, *now, *lease_until).await?
            } else {
                None
            };
            Ok(Out::CompletedNext(won, next.map(Box::new)))
        }
        Op::Fail {
            lease,
            error,
            retry_at,
            now,
            ..
        } => {
            let state = sqlx::query_scalar!(
                r#"UPDATE jobs
                   SET state = CASE WHEN ?5 IS NOT NULL AND attempt - interruptions < max_attempts
                                    THEN 'queued' ELSE 'failed' END,
                       run_at = CASE WHEN ?5 IS NOT NULL AND attempt - interruptions < max_attempts
                                     THEN ?5 ELSE run_at END,
                       finished_at = CASE WHEN ?5 IS NOT NULL
                                               AND attempt - interruptions < max_attempts
                                          THEN NULL ELSE ?6 END,
                       stop_reason = NULL,
                       error = ?4, lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3
                   RETURNING state AS "state!: JobState""#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                error,
                retry_at,
                now
            )
            .fetch_optional(&mut *conn)
            .await?;
            Ok(Out::State(state))
        }
        Op::CancelRunning {
            lease, reason, now, ..
        } => {
            let r = sqlx::query!(
                r#"UPDATE jobs
                   SET state = 'cancelled', stop_reason = 'cancelled', error = ?4, finished_at = ?5,
                       lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                reason,
                now
            )
            .execute(&mut *conn)
            .await?;
            Ok(Out::Bool(r.rows_affected() == 1))
        }
        Op::Release { lease, now, .. } => {
            // The attempt is given back: a job interrupted by shutdown did not fail.
            let r = sqlx::query!(
                r#"UPDATE jobs
                   SET state = 'queued', attempt = attempt - 1, run_at = ?4,
                       lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
                lease.job_id,
                lease.attempt,
                lease.owner,
                now
            )
            .execute(&mut *conn)
            .await?;
            Ok(Out::Bool(r.rows_affected() == 1))
        }
        Op::Cancel { job_id, now, .. } => cancel(conn, job_id, *now).await?,
        Op::Rescue {
            now, max_rescues, ..
        } => Ok(Out::Rescued(rescue(conn, *now, *max_rescues).await?)),
        Op::Clean { before, limit, .. } => {
            let r = sqlx::query!(
                r#"DELETE FROM jobs WHERE id IN (
                     SELECT id FROM jobs
                     WHERE finished_at IS NOT NULL AND finished_at < ?1
                       AND state IN ('succeeded', 'failed', 'cancelled')
                     LIMIT ?2)"#,
                before,
                limit
            )
            .execute(&mut *conn)
            .await?;
            Ok(Out::Count(r.rows_affected()))
        }
    })
}

/// One job as the multi-row insert reads it from JSON.
#[derive(Serialize)]
struct JobRow<'a> {
    id: String,
    channel_id: i64,
    source: &'a str,
    prompt: &'a str,
    priority: i64,
    max_attempts: i64,
    run_at: Millis,
    idempotency_key: Option<&'a str>,
    reply_target: Option<&'a str>,
    created_at: Millis,
    schedule_id: Option<i64>,
    scheduled_for: Option<Millis>,
}

impl<'a> JobRow<'a> {
    fn new(j: &'a NewJob, now: Millis) -> Self {
        JobRow {
            id: uuid::Uuid::now_v7().to_string(),
            channel_id: j.channel_id,
            source: j.source.as_str(),
            prompt: &j.prompt,
            priority: j.priority,
            max_attempts: j.max_attempts,
            run_at: j.run_at.unwrap_or(now),
            idempotency_key: j.idempotency_key.as_deref(),
            reply_target: j.reply_target.as_deref(),
            created_at: now,
            schedule_id: j.schedule_id,
            scheduled_for: j.scheduled_for,
        }
    }
}

async fn insert_jobs(
    conn: &mut SqliteConnection,
    rows: &[JobRow<'_>],
) -> Result<Vec<Enqueued>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(MAX_ROWS_PER_INSERT) {
        let json = serde_json::to_string(chunk).expect("job rows serialise");
        let ids = sqlx::query_scalar!(
            r#"INSERT INTO jobs (id, channel_id, source, prompt, priority, max_attempts, run_at,
                                 idempotency_key, reply_target, created_at, schedule_id,
                                 scheduled_for)
               SELECT value ->> 'id', value ->> 'channel_id', value ->> 'source', value ->> 'prompt',
                      value ->> 'priority', value ->> 'max_attempts', value ->> 'run_at',
                      value ->> 'idempotency_key', value ->> 'reply_target', value ->> 'created_at',
                      value ->> 'schedule_id', value ->> 'scheduled_for'
               FROM json_each(?1) WHERE true
               ON CONFLICT (channel_id, source, idempotency_key) WHERE idempotency_key IS NOT NULL
               DO NOTHING
               RETURNING id AS "id!""#,
            json
        )
        .fetch_all(&mut *conn)
        .await?;
        inserted.extend(ids);
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if inserted.contains(&row.id) {
            out.push(Enqueued {
                job_id: row.id.clone(),
                created: true,
            });
            continue;
        }
        // Not inserted: the idempotency key already names a job of this channel (possibly
        // from this group).
        let existing = sqlx::query_scalar!(
            r#"SELECT id AS "id!" FROM jobs
               WHERE channel_id = ?1 AND source = ?2 AND idempotency_key = ?3"#,
            row.channel_id,
            row.source,
            row.idempotency_key
        )
        .fetch_one(&mut *conn)
        .await?;
        out.push(Enqueued {
            job_id: existing,
            created: false,
        });
    }
    Ok(out)
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

pub(super) async fn insert_events(
    conn: &mut SqliteConnection,
    events: &[&NewEvent],
) -> Result<(), sqlx::Error> {
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

/// The fenced `running → succeeded`.
async fn complete(
    conn: &mut SqliteConnection,
    lease: &Lease,
    stop_reason: &Option<String>,
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query!(
        r#"UPDATE jobs
           SET state = 'succeeded', stop_reason = ?4, finished_at = ?5,
               lease_owner = NULL, lease_expires_at = NULL
           WHERE id = ?1 AND state = 'running' AND attempt = ?2 AND lease_owner = ?3"#,
        lease.job_id,
        lease.attempt,
        lease.owner,
        stop_reason,
        now
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Claims the next due job of the channel whose job `lease` just completed (in the same
/// transaction, so the channel has no running job): one index probe.
async fn claim_same_channel(
    conn: &mut SqliteConnection,
    lease: &Lease,
    now: Millis,
    lease_until: Millis,
) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as!(
        Job,
        r#"UPDATE jobs
           SET state = 'running', attempt = attempt + 1, lease_owner = ?2, lease_expires_at = ?3,
               started_at = ?4, cancel_requested = 0, stop_reason = NULL
           WHERE id = (
               SELECT q.id FROM jobs q
               WHERE q.channel_id = (SELECT channel_id FROM jobs WHERE id = ?1)
                 AND q.state = 'queued'
               ORDER BY q.priority DESC, q.created_at, q.id
               LIMIT 1)
             AND run_at <= ?4
           RETURNING id AS "id!", channel_id,
                     (SELECT c.name FROM channels c WHERE c.id = jobs.channel_id) AS "channel!: String",
                     source AS "source: Source", prompt, state AS "state: JobState",
                     priority, attempt, max_attempts, interruptions, run_at, lease_owner,
                     lease_expires_at, cancel_requested AS "cancel_requested: bool",
                     idempotency_key, reply_target, stop_reason, error, created_at,
                     started_at, finished_at, schedule_id, scheduled_for"#,
        lease.job_id,
        lease.owner,
        lease_until,
        now
    )
    .fetch_optional(&mut *conn)
    .await
}

async fn claim(
    conn: &mut SqliteConnection,
    owner: &str,
    limit: i64,
    now: Millis,
    lease_until: Millis,
) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as!(
        Job,
        r#"WITH heads AS (
               -- The next job of every channel that has no running job, in queue order (a
               -- rescued or retried job keeps its place): one index probe per channel, however
               -- long the queue or the history. A head that is not due yet holds its channel.
               SELECT (SELECT q.id FROM jobs q
                       WHERE q.channel_id = c.id AND q.state = 'queued'
                       ORDER BY q.priority DESC, q.created_at, q.id
                       LIMIT 1) AS id
               FROM channels c
               WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                 WHERE r.channel_id = c.id AND r.state = 'running'))
           UPDATE jobs
           SET state = 'running', attempt = attempt + 1, lease_owner = ?1, lease_expires_at = ?2,
               started_at = ?3, cancel_requested = 0, stop_reason = NULL
           WHERE id IN (
               SELECT j.id FROM heads h JOIN jobs j ON j.id = h.id
               WHERE j.run_at <= ?3
               ORDER BY j.priority DESC, j.created_at, j.id
               LIMIT ?4)
           RETURNING id AS "id!", channel_id,
                     (SELECT c.name FROM channels c WHERE c.id = jobs.channel_id) AS "channel!: String",
                     source AS "source: Source", prompt, state AS "state: JobState",
                     priority, attempt, max_attempts, interruptions, run_at, lease_owner,
                     lease_expires_at, cancel_requested AS "cancel_requested: bool",
                     idempotency_key, reply_target, stop_reason, error, created_at,
                     started_at, finished_at, schedule_id, scheduled_for"#,
        owner,
        lease_until,
        now,
        limit
    )
    .fetch_all(&mut *conn)
    .await
}

async fn channel_insert(
    conn: &mut SqliteConnection,
    ch: &NewChannel,
    now: Millis,
) -> Result<Applied, sqlx::Error> {
    let webhook_id = uuid::Uuid::new_v4().simple().to_string();
    let args = ch
        .agent_args
        .as_ref()
        .map(|a| serde_json::to_string(a).expect("strings serialise"));
    let policy = ch
        .permission_policy
        .clone()
        .unwrap_or_else(|| "allow".into());
    let token_hash = ch.webhook_token.as_deref().map(sha256_hex);
    let c = sqlx::query_as!(
        Channel,
        r#"INSERT INTO channels (name, webhook_id, agent_binary, agent_args, permission_policy,
                                 matrix_room_id, created_at, webhook_token_sha256,
                                 webhook_secret, webhook_template)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
           RETURNING id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                     matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                     webhook_secret, webhook_template"#,
        ch.name,
        webhook_id,
        ch.agent_binary,
        args,
        policy,
        ch.matrix_room_id,
        now,
        token_hash,
        ch.webhook_secret,
        ch.webhook_template
    )
    .fetch_one(&mut *conn)
    .await;
    match c {
        Ok(c) => Ok(Ok(Out::Channel(Box::new(c)))),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Ok(Err(StoreError::ChannelExists(ch.name.clone())))
        }
        Err(e) => Err(e),
    }
}

async fn channel_delete(conn: &mut SqliteConnection, name: &str) -> Result<Applied, sqlx::Error> {
    let busy = sqlx::query_scalar!(
        r#"SELECT EXISTS(SELECT 1 FROM jobs j JOIN channels c ON c.id = j.channel_id
                         WHERE c.name = ?1 AND j.state = 'running') AS "busy!: bool""#,
        name
    )
    .fetch_one(&mut *conn)
    .await?;
    if busy {
        return Ok(Err(StoreError::ChannelBusy(name.to_string())));
    }
    let r = sqlx::query!("DELETE FROM channels WHERE name = ?1", name)
        .execute(&mut *conn)
        .await?;
    Ok(if r.rows_affected() == 0 {
        Err(StoreError::UnknownChannel(name.to_string()))
    } else {
        Ok(Out::Unit)
    })
}

async fn cancel(
    conn: &mut SqliteConnection,
    job_id: &str,
    now: Millis,
) -> Result<Applied, sqlx::Error> {
    let Some(row) = sqlx::query!(
        r#"SELECT state AS "state: JobState", attempt FROM jobs WHERE id = ?1"#,
        job_id
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(Err(StoreError::JobNotFound(job_id.to_string())));
    };
    let (outcome, kind, text) = match row.state {
        JobState::Queued => {
            sqlx::query!(
                r#"UPDATE jobs SET state = 'cancelled', stop_reason = 'cancelled', finished_at = ?2
                   WHERE id = ?1 AND state = 'queued'"#,
                job_id,
                now
            )
            .execute(&mut *conn)
            .await?;
            (
                CancelOutcome::Cancelled,
                "cancelled",
                "cancelled before it started",
            )
        }
        JobState::Running => {
            sqlx::query!(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'",
                job_id
            )
            .execute(&mut *conn)
            .await?;
            (
                CancelOutcome::Requested,
                "cancel_requested",
                "cancel requested; the worker stops the agent",
            )
        }
        done => return Ok(Ok(Out::Cancel(CancelOutcome::AlreadyFinished(done)))),
    };
    let ev = NewEvent {
        job_id: job_id.to_string(),
        attempt: row.attempt,
        kind: kind.into(),
        text: Some(text.into()),
        data: None,
        at: now,
    };
    insert_events(conn, &[&ev]).await?;
    Ok(Ok(Out::Cancel(outcome)))
}

/// Returns running jobs whose lease expired to the queue. A lease expires only when the gorp
/// holding it died or stopped renewing it (an agent's own failure is recorded by its worker),
/// so the run was interrupted, not failed, and spends none of the job's attempts:
/// - cut short before its prompt reached the agent (no `session` event for the attempt), the
///   attempt is given back, as on a graceful shutdown;
/// - cut short during the agent's turn, it counts as an interruption, and a job interrupted
///   more than `max_rescues` times (one that kills gorp every time) fails.
async fn rescue(
    conn: &mut SqliteConnection,
    now: Millis,
    max_rescues: i64,
) -> Result<Vec<Rescued>, sqlx::Error> {
    let expired = sqlx::query!(
        r#"SELECT j.id AS "id!", j.attempt,
                  EXISTS(SELECT 1 FROM job_events e
                         WHERE e.job_id = j.id AND e.attempt = j.attempt
                           AND e.kind = 'session') AS "in_turn!: bool"
           FROM jobs j WHERE j.state = 'running' AND j.lease_expires_at < ?1"#,
        now
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut rescued = Vec::with_capacity(expired.len());
    let mut events = Vec::with_capacity(expired.len());
    for job in expired {
        let Some(r) = sqlx::query!(
            r#"UPDATE jobs
               SET state = CASE WHEN cancel_requested THEN 'cancelled'
                                WHEN ?3 AND interruptions >= ?4 THEN 'failed'
                                ELSE 'queued' END,
                   finished_at = CASE WHEN cancel_requested OR (?3 AND interruptions >= ?4)
                                      THEN ?5 ELSE NULL END,
                   stop_reason = CASE WHEN cancel_requested THEN 'cancelled' ELSE NULL END,
                   error = 'lease expired: worker ' || lease_owner || ' stopped renewing it',
                   interruptions = interruptions + ?3,
                   attempt = CASE WHEN ?3 THEN attempt ELSE attempt - 1 END,
                   run_at = ?5, lease_owner = NULL, lease_expires_at = NULL
               WHERE id = ?1 AND attempt = ?2 AND state = 'running'
               RETURNING interruptions, state AS "state: JobState", error AS "error!: String""#,
            job.id,
            job.attempt,
            job.in_turn,
            max_rescues,
            now
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            continue;
        };
        let text = match (r.state, job.in_turn) {
            (JobState::Cancelled, _) => format!("{}; cancel was pending, job cancelled", r.error),
            (JobState::Queued, false) => format!(
                "{}; run {} was cut short before its prompt reached the agent, so it is not \
                 counted; the job will be re-run",
                r.error, job.attempt
            ),
            (JobState::Queued, true) => format!(
                "{}; run {} was interrupted during the agent's turn ({} of at most {} \
                 interruptions, not counted as a failed attempt); the job will be re-run",
                r.error, job.attempt, r.interruptions, max_rescues
            ),
            _ => format!(
                "{}; interrupted during the agent's turn {} times, more than [worker] \
                 max_rescues = {}: job failed",
                r.error, r.interruptions, max_rescues
            ),
        };
        events.push(NewEvent {
            job_id: job.id.clone(),
            attempt: job.attempt,
            kind: "rescued".into(),
            text: Some(text),
            data: Some(serde_json::json!({
                "state": r.state,
                "in_turn": job.in_turn,
                "interruptions": r.interruptions,
            })),
            at: now,
        });
        rescued.push(Rescued {
            job_id: job.id,
            attempt: job.attempt,
            state: r.state,
        });
    }
    insert_events(conn, &events.iter().collect::<Vec<_>>()).await?;
    Ok(rescued)
}

async fn apply_write(conn: &mut SqliteConnection, w: &Write) -> Result<u64, sqlx::Error> {
    let r = match w {
        Write::WarmUpsert {
            channel_id,
            holder,
            state,
            pid,
            session,
            now,
            lease_until,
            expires_at,
            used,
        } => {
            sqlx::query!(
                r#"INSERT INTO warm_sessions (channel_id, holder, state, pid, acp_session_id,
                                              lease_expires_at, expires_at, started_at,
                                              last_used_at, updated_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?7, ?8, ?6, CASE WHEN ?9 THEN ?6 END, ?6)
                   ON CONFLICT (channel_id) DO UPDATE SET
                       holder = excluded.holder,
                       state = excluded.state,
                       pid = excluded.pid,
                       acp_session_id = coalesce(excluded.acp_session_id, acp_session_id),
                       lease_expires_at = excluded.lease_expires_at,
                       expires_at = coalesce(excluded.expires_at, expires_at),
                       started_at = CASE WHEN excluded.state = 'starting' THEN excluded.started_at
                                         ELSE started_at END,
                       last_used_at = coalesce(excluded.last_used_at, last_used_at),
                       error = NULL,
                       updated_at = excluded.updated_at"#,
                channel_id,
                holder,
                state,
                pid,
                session,
                now,
                lease_until,
                expires_at,
                used
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmStop {
            channel_id,
            holder,
            state,
            error,
            now,
        } => {
            sqlx::query!(
                r#"UPDATE warm_sessions
                   SET state = ?3, error = ?4, pid = NULL, lease_expires_at = NULL, updated_at = ?5
                   WHERE channel_id = ?1 AND holder = ?2"#,
                channel_id,
                holder,
                state,
                error,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmRequest {
            channel_id,
            at,
            now,
        } => {
            sqlx::query!(
                r#"INSERT INTO warm_sessions (channel_id, state, warm_at, updated_at)
                   VALUES (?1, 'stopped', ?2, ?3)
                   ON CONFLICT (channel_id) DO UPDATE SET warm_at = excluded.warm_at,
                                                          updated_at = excluded.updated_at"#,
                channel_id,
                at,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmHeartbeat {
            holder,
            lease_until,
        } => {
            sqlx::query!(
                r#"UPDATE warm_sessions SET lease_expires_at = ?2
                   WHERE holder = ?1 AND state IN ('starting', 'warm', 'busy')"#,
                holder,
                lease_until
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmReleaseLeases { holder, now } => {
            // Rows stay warm (so the next gorp re-warms them) but anyone may take them over.
            sqlx::query!(
                r#"UPDATE warm_sessions SET lease_expires_at = ?2, pid = NULL, updated_at = ?2
                   WHERE holder = ?1 AND state IN ('starting', 'warm', 'busy')"#,
                holder,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmExpireOrphans { now } => {
            // Sessions nobody holds any more and whose keep-alive ran out.
            sqlx::query!(
                r#"UPDATE warm_sessions SET state = 'stopped', pid = NULL, updated_at = ?1
                   WHERE state IN ('starting', 'warm', 'busy')
                     AND (lease_expires_at IS NULL OR lease_expires_at < ?1)
                     AND expires_at IS NOT NULL AND expires_at <= ?1"#,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::WarmStopOrphan {
            channel_id,
            holder,
            note,
            now,
        } => {
            sqlx::query!(
                r#"UPDATE warm_sessions
                   SET state = 'stopped', error = ?3, pid = NULL, lease_expires_at = NULL,
                       updated_at = ?4
                   WHERE channel_id = ?1 AND holder IS ?2
                     AND state IN ('starting', 'warm', 'busy')"#,
                channel_id,
                holder,
                note,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::JobExpireOwner { owner, now } => {
            sqlx::query!(
                r#"UPDATE jobs SET lease_expires_at = ?2 - 1
                   WHERE state = 'running' AND lease_owner = ?1"#,
                owner,
                now
            )
            .execute(&mut *conn)
            .await?
        }
        Write::ScheduleSetEnabled {
            id,
            enabled,
            next_run_at,
        } => {
            sqlx::query!(
                r#"UPDATE schedules SET enabled = ?2, next_run_at = coalesce(?3, next_run_at)
                   WHERE id = ?1 AND done = 0"#,
                id,
                enabled,
                next_run_at
            )
            .execute(&mut *conn)
            .await?
        }
        Write::ChannelSetRoom {
            channel_id,
            room_id,
        } => {
            sqlx::query!(
                "UPDATE channels SET matrix_room_id = ?2 WHERE id = ?1",
                channel_id,
                room_id
            )
            .execute(&mut *conn)
            .await?
        }
        Write::ChannelSetToken { channel_id, sha256 } => {
            sqlx::query!(
                "UPDATE channels SET webhook_token_sha256 = ?2 WHERE id = ?1",
                channel_id,
                sha256
            )
            .execute(&mut *conn)
            .await?
        }
        Write::MatrixBot {
            user_id,
            device_id,
            state,
            error,
            now,
        } => {
            let state: &str = state;
            sqlx::query!(
                r#"INSERT INTO matrix_bot (id, user_id, device_id, state, ready_at, error, updated_at)
                   VALUES (1, ?1, ?2, ?3, CASE WHEN ?3 = 'syncing' THEN ?5 END, ?4, ?5)
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
            .execute(&mut *conn)
            .await?
        }
        Write::MatrixReply { job_id, u, now } => {
            sqlx::query!(
                r#"UPDATE matrix_replies
                   SET reaction_key = ?2, reaction_event_id = ?3, reply_event_id = ?4, edits = ?5,
                       rendered_seq = ?6, noted_attempt = ?7, done = ?8, error = ?9,
                       updated_at = ?10
                   WHERE job_id = ?1"#,
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
            .execute(&mut *conn)
            .await?
        }
        Write::ScheduleDelete { id } => {
            sqlx::query!("DELETE FROM schedules WHERE id = ?1", id)
                .execute(&mut *conn)
                .await?
        }
        Write::JobRecordRun {
            job_id,
            attempt,
            facts,
        } => {
            sqlx::query!(
                r#"UPDATE jobs SET warm = ?3, first_output_ms = ?4, input_tokens = ?5,
                                   output_tokens = ?6, cost_usd = ?7
                   WHERE id = ?1 AND attempt = ?2"#,
                job_id,
                attempt,
                facts.warm,
                facts.first_output_ms,
                facts.input_tokens,
                facts.output_tokens,
                facts.cost_usd
            )
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(r.rows_affected())
}

/// Advances the schedule from `f.old_next` (the guard: another scheduler that got there first
/// makes this a no-op) and inserts one job per slot, unless the overlap policy skips them.
async fn schedule_fire(
    conn: &mut SqliteConnection,
    f: &Firing,
    now: Millis,
) -> Result<Fired, sqlx::Error> {
    let Some(s) = sqlx::query!(
        r#"SELECT channel_id, prompt, overlap,
                  (SELECT j.id FROM jobs j WHERE j.schedule_id = schedules.id
                     AND j.state IN ('queued', 'running') LIMIT 1) AS "busy_job?: String"
           FROM schedules WHERE id = ?1 AND next_run_at = ?2 AND enabled = 1 AND done = 0"#,
        f.schedule_id,
        f.old_next
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(Fired::default());
    };
    let mut notes = Vec::new();
    if f.skipped_slots > 0 {
        notes.push(format!(
            "{} missed slot(s) skipped (catch_up = {})",
            f.skipped_slots, f.catch_up
        ));
    }
    // `overlap = skip`: at most one run of the schedule is queued or running, also when
    // several slots are due at once (after a restart).
    let slots: &[Millis] = match (&s.busy_job, s.overlap.as_str()) {
        (Some(busy), "skip") if !f.slots.is_empty() => {
            notes.push(format!(
                "{} slot(s) skipped: the previous run {busy} is still queued or running \
                 (overlap = skip)",
                f.slots.len()
            ));
            &[]
        }
        (None, "skip") if f.slots.len() > 1 => {
            notes.push(format!(
                "{} slot(s) skipped: the run of the slot due first is still queued \
                 (overlap = skip)",
                f.slots.len() - 1
            ));
            &f.slots[..1]
        }
        _ => &f.slots,
    };
    let skip = (!notes.is_empty()).then(|| notes.join("; "));
    let skipped = i64::from(skip.is_some());
    let done = f.new_next.is_none();
    sqlx::query!(
        r#"UPDATE schedules
           SET next_run_at = ?2, last_fired_at = coalesce(?3, last_fired_at), done = ?4,
               skipped = skipped + ?5, last_skip = coalesce(?6, last_skip)
           WHERE id = ?1"#,
        f.schedule_id,
        f.new_next,
        slots.last().copied(),
        done,
        skipped,
        skip
    )
    .execute(&mut *conn)
    .await?;
    let jobs: Vec<NewJob> = slots
        .iter()
        .map(|slot| NewJob {
            max_attempts: f.max_attempts,
            schedule_id: Some(f.schedule_id),
            scheduled_for: Some(*slot),
            ..NewJob::new(s.channel_id, Source::Schedule, s.prompt.clone())
        })
        .collect();
    let rows: Vec<JobRow> = jobs.iter().map(|j| JobRow::new(j, now)).collect();
    let job_ids = insert_jobs(conn, &rows)
        .await?
        .into_iter()
        .map(|e| e.job_id)
        .collect();
    Ok(Fired {
        won: true,
        job_ids,
        skipped: skip,
    })
}
