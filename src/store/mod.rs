//! The store: every SQL statement gorp runs lives here (and in `writer.rs`).
//!
//! Writes go through one writer task that owns the only write connection: it takes whatever
//! write operations are waiting, applies them in one `BEGIN IMMEDIATE` transaction (concurrent
//! enqueues become one multi-row `INSERT`, events likewise) and answers each caller only after
//! the commit. Reads use a separate pool of `query_only` connections. Methods are named
//! noun-first (`job_claim_many`, `job_complete_if_running`) so a table's operations sort
//! together; a method that moves a job out of `running` ends in `_if_running` and reports
//! whether its fence held.
//!
//! Every query takes `now` from its caller, so tests control time.

mod matrix;
mod schedules;
mod types;
mod warm;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::ConnectOptions;
use tokio::sync::{mpsc, oneshot, watch, Notify};

pub use matrix::{MatrixReply, MatrixReplyUpdate, MatrixTarget};
pub use types::*;
pub use warm::WarmUpdate;
use writer::Op;

use crate::config::{DatabaseConfig, Synchronous};

/// Embedded migrations from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Operations waiting for the writer before senders wait for room.
const WRITER_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    #[error("channel {0:?} already exists")]
    ChannelExists(String),
    #[error("channel {0:?} has a running job; cancel it first")]
    ChannelBusy(String),
    #[error("no job with id {0:?}")]
    JobNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the database writer has stopped")]
    WriterGone,
    /// The database's directory or file cannot be created or opened (permissions, a missing
    /// mount): a problem of the machine, not of the input.
    #[error("cannot open the database: {0}")]
    Open(String),
}

impl StoreError {
    /// True when the error is a unique-constraint violation.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(e)) if e.is_unique_violation())
    }

    /// Why the database cannot take this request now, when the cause is the database's
    /// condition rather than the request, so the same request may succeed later: the disk is
    /// full (`SQLITE_FULL`), the disk failed (`SQLITE_IOERR`), another process holds the lock
    /// past `busy_timeout` (`SQLITE_BUSY`/`SQLITE_LOCKED`), the file cannot be opened or
    /// written (`SQLITE_CANTOPEN`/`SQLITE_READONLY`), no connection is free, or the writer
    /// stopped. `None` for every other error.
    pub fn unavailable(&self) -> Option<&'static str> {
        match self {
            StoreError::WriterGone => Some("the database writer has stopped"),
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => {
                Some("no database connection is available")
            }
            StoreError::Db(sqlx::Error::Io(_)) => Some("database I/O error"),
            StoreError::Db(sqlx::Error::Database(e)) => {
                // SQLite reports extended result codes; the primary code is the low byte.
                let code = e.code()?.parse::<i32>().ok()? & 0xff;
                match code {
                    5 | 6 => Some("the database is locked by another process"),
                    8 => Some("the database is read-only"),
                    10 => Some("disk I/O error"),
                    13 => Some("the database or disk is full"),
                    14 => Some("the database file cannot be opened"),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A handle on the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::Sender<Op>,
    read: SqlitePool,
    /// Woken whenever a job is inserted (or becomes claimable) in this process.
    jobs_changed: Arc<Notify>,
    /// Counts this process's commits; readers wait on it for new rows.
    commits: watch::Sender<u64>,
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations and starts the writer.
    pub async fn open(cfg: &DatabaseConfig) -> Result<Store> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Open(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let opts = connect_options(&cfg.path, cfg);
        let mut write_conn = opts
            .connect()
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", cfg.path.display())))?;
        MIGRATOR.run(&mut write_conn).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(cfg.read_connections)
            .min_connections(1)
            .connect_with(opts.pragma("query_only", "ON"))
            .await?;
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let jobs_changed = Arc::new(Notify::new());
        let (commits, _) = watch::channel(0);
        tokio::spawn(writer::run(
            write_conn,
            rx,
            jobs_changed.clone(),
            commits.clone(),
        ));
        Ok(Store {
            writer: tx,
            read,
            jobs_changed,
            commits,
        })
    }

    /// Applies pending migrations and reports how many there are in all.
    pub async fn migrate(cfg: &DatabaseConfig) -> Result<usize> {
        let store = Store::open(cfg).await?;
        store.close().await;
        Ok(MIGRATOR.iter().count())
    }

    /// True when every embedded migration has been applied (for readiness checks).
    pub async fn migrations_current(&self) -> Result<bool> {
        use sqlx::migrate::Migrate;
        let mut conn = self.read.acquire().await?;
        let applied = conn.list_applied_migrations("_sqlx_migrations").await?;
        Ok(MIGRATOR
            .iter()
            .all(|m| applied.iter().any(|a| a.version == m.version)))
    }

    /// Notified when jobs are inserted or become claimable in this process.
    pub fn jobs_changed(&self) -> Arc<Notify> {
        self.jobs_changed.clone()
    }

    /// Changes after every commit this process makes (jobs, events, transitions), so readers
    /// can wait for new rows instead of polling. Other processes' writes do not show here.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Waits until every write sent so far is committed, then stops the writer.
    pub async fn close(self) {
        let _ = self.flush().await;
        self.read.close().await;
    }

    /// The read pool, for the few read-only reports that live outside this module.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Waits until every write sent before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        self.call(Op::Flush).await
    }

    // ----- channels -------------------------------------------------------------------------

    pub async fn channel_insert(&self, ch: NewChannel, now: Millis) -> Result<Channel> {
        validate_channel_name(&ch.name).map_err(StoreError::Invalid)?;
        if let Some(p) = &ch.permission_policy {
            if !matches!(p.as_str(), "allow" | "deny") {
                return Err(StoreError::Invalid(format!(
                    "invalid permission policy {p:?}; expected allow or deny"
                )));
            }
        }
        let name = ch.name.clone();
        match self
            .call(|reply| Op::ChannelInsert { ch, now, reply })
            .await
        {
            Err(e) if e.is_unique_violation() => Err(StoreError::ChannelExists(name)),
            other => other,
        }
    }

    pub async fn channel_get(&self, name: &str) -> Result<Option<Channel>> {
        Ok(sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                      matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                      webhook_secret, webhook_template
               FROM channels WHERE name = ?1"#,
            name
        )
        .fetch_optional(&self.read)
        .await?)
    }

    pub async fn channel_get_by_webhook_id(&self, webhook_id: &str) -> Result<Option<Channel>> {
        Ok(sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                      matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                      webhook_secret, webhook_template
               FROM channels WHERE webhook_id = ?1"#,
            webhook_id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    pub async fn channel_list(&self) -> Result<Vec<Channel>> {
        Ok(sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                      matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                      webhook_secret, webhook_template
               FROM channels ORDER BY name"#
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Deletes a channel and its job history. Refused while one of its jobs is running.
    pub async fn channel_delete(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.call(|reply| Op::ChannelDelete { name, reply }).await
    }

    /// Stores the ACP session a channel's conversation continues in.
    pub async fn channel_set_acp_session(
        &self,
        channel_id: i64,
        session: Option<String>,
    ) -> Result<()> {
        self.call(|reply| Op::ChannelSetSession {
            channel_id,
            session,
            reply,
        })
        .await
    }

    // ----- jobs: writes ---------------------------------------------------------------------

    /// Enqueues one job. Concurrent calls share one transaction (group commit). Returns once the
    /// row is committed. With an idempotency key that already exists for the source, returns
    /// the existing job with `created: false`.
    pub async fn job_insert(&self, job: NewJob, now: Millis) -> Result<Enqueued> {
        job.validate().map_err(StoreError::Invalid)?;
        self.call(|reply| Op::Enqueue { job, now, reply }).await
    }

    /// Enqueues many jobs in one transaction.
    pub async fn job_insert_many(&self, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>> {
        for j in &jobs {
            j.validate().map_err(StoreError::Invalid)?;
        }
        self.call(|reply| Op::EnqueueMany { jobs, now, reply })
            .await
    }

    /// Claims up to `limit` due jobs for `owner`, at most one per channel and never one whose
    /// channel already has a running job, in priority order. One statement.
    pub async fn job_claim_many(
        &self,
        owner: &str,
        limit: i64,
        now: Millis,
        lease_ms: i64,
    ) -> Result<Vec<Job>> {
        let owner = owner.to_string();
        self.call(|reply| Op::Claim {
            owner,
            limit,
            now,
            lease_until: now + lease_ms,
            reply,
        })
        .await
    }

    /// Renews the leases of every job `owner` is running. Returns (job id, attempt,
    /// cancel requested) for each renewed job.
    pub async fn job_heartbeat(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: i64,
    ) -> Result<Vec<(String, i64, bool)>> {
        let owner = owner.to_string();
        self.call(|reply| Op::Heartbeat {
            owner,
            lease_until: now + lease_ms,
            reply,
        })
        .await
    }

    /// `running → succeeded`, if the lease still holds.
    pub async fn job_complete_if_running(
        &self,
        lease: &Lease,
        stop_reason: Option<String>,
        now: Millis,
    ) -> Result<bool> {
        let lease = lease.clone();
        self.call(|reply| Op::Complete {
            lease,
            stop_reason,
            now,
            reply,
        })
        .await
    }

    /// `running → succeeded`, and in the same transaction claims the same channel's next due
    /// job for the same owner. Returns whether the fence held and the claimed job.
    pub async fn job_complete_and_claim(
        &self,
        lease: &Lease,
        stop_reason: Option<String>,
        now: Millis,
        lease_ms: i64,
    ) -> Result<(bool, Option<Job>)> {
        let lease = lease.clone();
        self.call(|reply| Op::CompleteClaim {
            lease,
            stop_reason,
            now,
            lease_until: now + lease_ms,
            reply,
        })
        .await
    }

    /// `running → queued` (retry at `retry_at`, when given and attempts are left) or
    /// `running → failed`. Returns the new state, or `None` when the fence did not hold.
    pub async fn job_fail_if_running(
        &self,
        lease: &Lease,
        error: String,
        retry_at: Option<Millis>,
        now: Millis,
    ) -> Result<Option<JobState>> {
        let lease = lease.clone();
        self.call(|reply| Op::Fail {
            lease,
            error,
            retry_at,
            now,
            reply,
        })
        .await
    }

    /// `running → cancelled`, if the lease still holds.
    pub async fn job_cancel_if_running(
        &self,
        lease: &Lease,
        reason: String,
        now: Millis,
    ) -> Result<bool> {
        let lease = lease.clone();
        self.call(|reply| Op::CancelRunning {
            lease,
            reason,
            now,
            reply,
        })
        .await
    }

    /// `running → queued` without counting the attempt (graceful shutdown).
    pub async fn job_release_if_running(&self, lease: &Lease, now: Millis) -> Result<bool> {
        let lease = lease.clone();
        self.call(|reply| Op::Release { lease, now, reply }).await
    }

    /// Cancels a queued job at once, or asks the worker of a running job to stop.
    pub async fn job_cancel(&self, job_id: &str, now: Millis) -> Result<CancelOutcome> {
        let job_id = job_id.to_string();
        self.call(|reply| Op::Cancel { job_id, now, reply }).await
    }

    /// Returns running jobs whose lease expired to `queued`, recording why. The interrupted
    /// run does not count as a failed attempt; a job interrupted more than `max_rescues` times
    /// is failed instead, and one with a pending cancel is cancelled.
    pub async fn job_rescue_expired(&self, now: Millis, max_rescues: i64) -> Result<Vec<Rescued>> {
        self.call(|reply| Op::Rescue {
            now,
            max_rescues,
            reply,
        })
        .await
    }

    /// Deletes up to `limit` finished jobs (and their events) that finished before `before`.
    pub async fn job_delete_finished_before(&self, before: Millis, limit: i64) -> Result<u64> {
        self.call(|reply| Op::Clean {
            before,
            limit,
            reply,
        })
        .await
    }

    /// Appends events without waiting for the commit. Ordering is kept with every later write
    /// from this process, so a transition sent afterwards commits after these events.
    pub async fn job_events_append(&self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.writer
            .send(Op::Events { events })
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    // ----- jobs: reads ----------------------------------------------------------------------

    pub async fn job_get(&self, id: &str) -> Result<Option<Job>> {
        Ok(sqlx::query_as!(
            Job,
            r#"SELECT j.id AS "id!", j.channel_id, c.name AS channel,
                      j.source AS "source: Source", j.prompt, j.state AS "state: JobState",
                      j.priority, j.attempt, j.max_attempts, j.interruptions, j.run_at, j.lease_owner,
                      j.lease_expires_at, j.cancel_requested AS "cancel_requested: bool",
                      j.idempotency_key, j.reply_target, j.stop_reason, j.error, j.created_at,
                      j.started_at, j.finished_at, j.schedule_id, j.scheduled_for
               FROM jobs j JOIN channels c ON c.id = j.channel_id
               WHERE j.id = ?1"#,
            id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    /// Jobs newest first, filtered; `before` is the id of the last job of the previous page.
    pub async fn job_list(&self, f: &JobFilter) -> Result<Vec<Job>> {
        let state = f.state.map(|s| s.as_str());
        let source = f.source.map(|s| s.as_str());
        let limit = if f.limit <= 0 { 50 } else { f.limit.min(1000) };
        Ok(sqlx::query_as!(
            Job,
            r#"SELECT j.id AS "id!", j.channel_id, c.name AS channel,
                      j.source AS "source: Source", j.prompt, j.state AS "state: JobState",
                      j.priority, j.attempt, j.max_attempts, j.interruptions, j.run_at, j.lease_owner,
                      j.lease_expires_at, j.cancel_requested AS "cancel_requested: bool",
                      j.idempotency_key, j.reply_target, j.stop_reason, j.error, j.created_at,
                      j.started_at, j.finished_at, j.schedule_id, j.scheduled_for
               FROM jobs j JOIN channels c ON c.id = j.channel_id
               WHERE (?1 IS NULL OR j.state = ?1)
                 AND (?2 IS NULL OR c.name = ?2)
                 AND (?3 IS NULL OR j.source = ?3)
                 AND (?4 IS NULL OR j.id < ?4)
               ORDER BY j.id DESC
               LIMIT ?5"#,
            state,
            f.channel,
            source,
            f.before,
            limit
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Events of a job with `seq > after`, oldest first.
    pub async fn job_events_list(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
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

    /// Whether a job the claim would take is due now, and the earliest future `run_at` of such
    /// a job: the claim takes each idle channel's next job in queue order, so only those count
    /// (a job behind a head that waits for its retry is not claimable).
    pub async fn job_next_due(&self, now: Millis) -> Result<(bool, Option<Millis>)> {
        let r = sqlx::query!(
            r#"WITH heads AS (
                   SELECT (SELECT q.run_at FROM jobs q
                           WHERE q.channel_id = c.id AND q.state = 'queued'
                           ORDER BY q.priority DESC, q.created_at, q.id
                           LIMIT 1) AS run_at
                   FROM channels c
                   WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                     WHERE r.channel_id = c.id AND r.state = 'running'))
               SELECT
                 EXISTS(SELECT 1 FROM heads WHERE run_at <= ?1) AS "due!: bool",
                 (SELECT min(run_at) FROM heads WHERE run_at > ?1) AS "next?: i64""#,
            now
        )
        .fetch_one(&self.read)
        .await?;
        Ok((r.due, r.next))
    }

    /// Running jobs of `owner` whose cancel was requested: (job id, attempt).
    pub async fn job_cancel_requests(&self, owner: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", attempt FROM jobs
               WHERE state = 'running' AND lease_owner = ?1 AND cancel_requested = 1"#,
            owner
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.attempt)).collect())
    }

    /// Job counts by state (for `gorp jobs` summaries and metrics).
    pub async fn job_count_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        let rows = sqlx::query!(
            r#"SELECT state AS "state!: JobState", count(*) AS "n!: i64" FROM jobs GROUP BY state"#
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
    }
}

fn connect_options(path: &Path, cfg: &DatabaseConfig) -> SqliteConnectOptions {
    SqliteConnectOptions::from_str("sqlite://")
        .expect("static url")
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match cfg.synchronous {
            Synchronous::Normal => SqliteSynchronous::Normal,
            Synchronous::Full => SqliteSynchronous::Full,
        })
        .foreign_keys(true)
        .busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))
        .pragma("temp_store", "memory")
        .pragma(
            "cache_size",
            format!("-{}", u64::from(cfg.cache_mib) * 1024),
        )
        .disable_statement_logging()
}
