//! The store: every SQL statement gorp runs lives here, one file per table.
//!
//! - [`jobs`](self::jobs): the queue: enqueue, claim, heartbeat, fenced outcomes, cancel,
//!   rescue, retention, reads.
//! - `events`: a job's event log and output.
//! - `channels`: channels and their webhook credentials, rooms and ACP sessions.
//! - `dashboard`: dashboard sessions, and the overview's summary reads.
//! - `budgets`: each channel's spend in the current day and month, and held jobs.
//! - `warm`: the warm-session lease table.
//! - `schedules`: schedules and their guarded firing.
//! - `approvals`: permission requests under `ask`, their decisions, standing rules.
//! - `matrix`: the Matrix bot's state and per-job reply rows.
//! - `writer`: the group-commit loop every write goes through.
//!
//! Writes go through one writer task that owns the only write connection: it takes whatever
//! write operations are waiting, applies them in one `BEGIN IMMEDIATE` transaction (concurrent
//! enqueues become one multi-row `INSERT`, events likewise) and answers each caller only after
//! the commit. Each table's writes are [`writer::Write`] values that carry their own output
//! type. Reads use a separate pool of `query_only` connections. Methods are named noun-first
//! (`job_claim_many`, `job_complete_if_running`) so a table's operations sort together; a
//! method that moves a job out of `running` ends in `_if_running` and reports whether its
//! fence held.
//!
//! The seam for a second database backend is [`Store`]'s methods and the row types of
//! `types`: no caller outside this module sees SQL, a connection or a `sqlx` type (the one
//! exception, [`Store::read_pool`], serves the metrics gauges).
//!
//! Every query takes `now` from its caller, so tests control time.

mod approvals;
mod budgets;
mod channels;
mod dashboard;
mod events;
mod jobs;
mod matrix;
mod nodes;
mod postgres;
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
use tokio::sync::{mpsc, watch, Notify};

pub use gorp_pg::PG_MIGRATOR;
pub use types::*;
use writer::{Op, Write};

use crate::config::{DatabaseConfig, Synchronous};

/// Embedded migrations from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Operations waiting for the writer before senders wait for room.
const WRITER_QUEUE: usize = 8192;

/// A handle on the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::Sender<Op>,
    read: SqlitePool,
    /// Woken whenever a job is inserted (or becomes claimable) in this process.
    jobs_changed: Arc<Notify>,
    /// Woken when another node asks to cancel a running job (PostgreSQL).
    cancels: Arc<Notify>,
    /// Counts this process's commits; readers wait on it for new rows.
    commits: watch::Sender<u64>,
    /// On PostgreSQL, the store every method hands its work to; `writer` and `read` are then
    /// never used (the writer task is not started and the read pool never connects).
    pg: Option<gorp_pg::PgStore>,
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations and starts the writer.
    pub async fn open(cfg: &DatabaseConfig) -> Result<Store> {
        if cfg.backend() == crate::config::Backend::Postgres {
            return Store::open_postgres(cfg).await;
        }
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
            cancels: Arc::new(Notify::new()),
            commits,
            pg: None,
        })
    }

    /// Opens the PostgreSQL database of `cfg.url` and applies its pending migrations.
    async fn open_postgres(cfg: &DatabaseConfig) -> Result<Store> {
        let pool = postgres::connect(cfg).await?;
        postgres::run_migrations(cfg, &pool).await?;
        let jobs_changed = Arc::new(Notify::new());
        let cancels = Arc::new(Notify::new());
        let (commits, _) = watch::channel(0);
        // Never started: every method hands its work to `pg`.
        let (writer, _) = mpsc::channel(1);
        let read = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(SqliteConnectOptions::from_str("sqlite::memory:")?);
        let pg = gorp_pg::PgStore::new(
            pool,
            gorp_pg::Wakes {
                jobs_changed: jobs_changed.clone(),
                cancels: cancels.clone(),
                commits: commits.clone(),
            },
        );
        // Other nodes' changes wake this one; the listener ends when the pool closes.
        tokio::spawn(pg.clone().listen());
        Ok(Store {
            writer,
            read,
            pg: Some(pg),
            jobs_changed,
            cancels,
            commits,
        })
    }

    /// Applies the pending migrations; returns the schema version (the same number on both
    /// backends).
    pub async fn migrate(cfg: &DatabaseConfig) -> Result<i64> {
        if cfg.backend() == crate::config::Backend::Postgres {
            return postgres::migrate(cfg).await;
        }
        let store = Store::open(cfg).await?;
        store.close().await;
        Ok(MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0))
    }

    /// True when every embedded migration has been applied (for readiness checks).
    pub async fn migrations_current(&self) -> Result<bool> {
        use sqlx::migrate::Migrate;
        let (applied, migrator) = match &self.pg {
            Some(pg) => {
                let mut conn = pg.pool().acquire().await?;
                let applied = conn.list_applied_migrations("_sqlx_migrations").await?;
                (applied, &PG_MIGRATOR)
            }
            None => {
                let mut conn = self.read.acquire().await?;
                let applied = conn.list_applied_migrations("_sqlx_migrations").await?;
                (applied, &MIGRATOR)
            }
        };
        Ok(migrator
            .iter()
            .all(|m| applied.iter().any(|a| a.version == m.version)))
    }

    /// Notified when jobs are inserted or become claimable in this process.
    pub fn jobs_changed(&self) -> Arc<Notify> {
        self.jobs_changed.clone()
    }

    /// Notified when another node asks to cancel a running job (on PostgreSQL; on SQLite
    /// cancels reach the worker directly or through its poll).
    pub fn cancels_requested(&self) -> Arc<Notify> {
        self.cancels.clone()
    }

    /// On PostgreSQL, makes [`now_ms`] read the database's clock (see
    /// [`gorp_types::types::set_clock_offset`]); returns (offset, round trip) in ms. On SQLite
    /// nothing changes: (0, 0).
    pub async fn sync_clock(&self) -> Result<(i64, i64)> {
        match &self.pg {
            Some(pg) => pg.sync_clock().await,
            None => Ok((0, 0)),
        }
    }

    /// Changes after every commit this process makes (jobs, events, transitions), so readers
    /// can wait for new rows instead of polling. On SQLite other processes' writes do not show
    /// here; on PostgreSQL every node's do (LISTEN/NOTIFY).
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// The SQLite read pool, for tests that read the file directly (on PostgreSQL a pool that
    /// has no tables: read through your own connection to the database instead).
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    /// Waits until every write sent so far is committed, then stops the writer.
    pub async fn close(self) {
        if let Some(pg) = &self.pg {
            pg.close().await;
            return;
        }
        let _ = self.flush().await;
        self.read.close().await;
    }

    async fn send(&self, op: Op) -> Result<()> {
        self.writer
            .send(op)
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    /// Sends one write to the writer and waits for its committed result.
    async fn write<W: Write>(&self, w: W) -> Result<W::Output> {
        let (op, rx) = Op::write(w);
        self.send(op).await?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Waits until every write sent before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        if self.pg.is_some() {
            // Every PostgreSQL write has committed by the time its call returned.
            return Ok(());
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Flush(reply)).await?;
        rx.await.map_err(|_| StoreError::WriterGone)?
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

impl Store {
    /// Reads the database at `cfg.path` read-only: which migrations it has applied against
    /// those this gorp has, whether gorp could write it, and the channels' agents.
    pub async fn inspect(cfg: &DatabaseConfig) -> Result<DatabaseReport> {
        use sqlx::Connection;
        if cfg.backend() == crate::config::Backend::Postgres {
            return postgres::inspect(cfg).await;
        }
        let path = cfg.path.clone();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        let writable = |p: &std::path::Path| -> Option<String> {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: access(2) on a NUL-terminated path.
            let r = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
            (r != 0).then(|| format!("{}: {}", p.display(), std::io::Error::last_os_error()))
        };
        let known = MIGRATOR.migrations.len();
        let mut report = DatabaseReport {
            backend: "sqlite",
            location: path.display().to_string(),
            exists: path.exists(),
            applied: 0,
            known,
            unknown: Vec::new(),
            not_writable: None,
            channel_agents: Vec::new(),
        };
        if !report.exists {
            report.not_writable = writable(&dir);
            return Ok(report);
        }
        report.not_writable = writable(&path).or_else(|| writable(&dir));
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .busy_timeout(std::time::Duration::from_millis(cfg.busy_timeout_ms));
        let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
        let has_table: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&mut conn)
        .await?;
        if has_table > 0 {
            let versions: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&mut conn)
                    .await?;
            report.applied = versions.len();
            report.unknown = versions
                .into_iter()
                .filter(|v| !MIGRATOR.migrations.iter().any(|m| m.version == *v))
                .collect();
            let has_channels: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'channels'",
            )
            .fetch_one(&mut conn)
            .await?;
            if has_channels > 0 {
                report.channel_agents = sqlx::query_as(
                    "SELECT name, agent_binary, agent_args FROM channels
                     WHERE agent_binary IS NOT NULL OR agent_args IS NOT NULL ORDER BY name",
                )
                .fetch_all(&mut conn)
                .await?;
            }
        }
        conn.close().await?;
        Ok(report)
    }
}
