//! What the benchmarks share: the worker-pool settings, and the raw-SQLite baseline every gorp
//! benchmark is compared with: the minimal claim + complete
//! of a job, one job at a time, autocommit, through one sqlx connection on a database with
//! gorp's schema and file settings (WAL, synchronous=NORMAL). The claim reads the same
//! partial index gorp's does.

use std::path::Path;
use std::time::{Duration, Instant};

use gorp::config::DatabaseConfig;
use gorp::store::{now_ms, NewChannel, NewJob, Source, Store};
use gorp::worker::PoolConfig;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// Pool settings for benchmarks: background timers slow enough to stay out of the figures.
pub fn pool_config(concurrency: usize) -> PoolConfig {
    PoolConfig {
        concurrency,
        lease: Duration::from_secs(60),
        heartbeat: Duration::from_secs(20),
        poll_interval: Duration::from_millis(500),
        retry_base: Duration::from_secs(1),
        retry_max: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        spend: Default::default(),
    }
}

/// A plain connection with the store's file settings.
pub async fn raw_conn(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .disable_statement_logging()
        .connect()
        .await
        .expect("raw connection")
}

/// Claim + complete per second over `jobs` queued jobs of one channel in `dir/<name>`.
pub async fn claim_complete_per_sec(dir: &Path, name: &str, jobs: usize) -> f64 {
    let cfg = DatabaseConfig {
        path: dir.join(name),
        ..DatabaseConfig::default()
    };
    let store = Store::open(&cfg).await.expect("open");
    let ch = store
        .channel_insert(
            NewChannel {
                name: "baseline".into(),
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .expect("channel")
        .id;
    let rows: Vec<NewJob> = (0..jobs)
        .map(|i| NewJob::new(ch, Source::Cli, format!("p{i}")))
        .collect();
    store.job_insert_many(rows, now_ms()).await.expect("insert");
    store.close().await;
    let mut conn = raw_conn(&cfg.path).await;
    let start = Instant::now();
    for _ in 0..jobs {
        let id: String = sqlx::query_scalar(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = 'b'
             WHERE id = (SELECT id FROM jobs WHERE channel_id = ?1 AND state = 'queued'
                         ORDER BY priority DESC, run_at, created_at, id LIMIT 1)
             RETURNING id",
        )
        .bind(ch)
        .fetch_one(&mut conn)
        .await
        .expect("claim");
        sqlx::query("UPDATE jobs SET state = 'succeeded', lease_owner = NULL WHERE id = ?1 AND state = 'running'")
            .bind(&id)
            .execute(&mut conn)
            .await
            .expect("complete");
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    conn.close().await.ok();
    rate
}

/// An executor whose every job succeeds at once: the engine's own cost, no agent.
pub struct NoOp;

impl gorp::executor::Executor for NoOp {
    fn run(
        &self,
        _ctx: gorp::executor::JobContext,
    ) -> futures::future::BoxFuture<'static, gorp::executor::Outcome> {
        Box::pin(async { gorp::executor::Outcome::Succeeded { stop_reason: None } })
    }
}

/// `n` channels named `ch00`, `ch01`, …; their ids.
pub async fn channels(store: &Store, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let c = store
            .channel_insert(
                NewChannel {
                    name: format!("ch{i:02}"),
                    ..Default::default()
                },
                now_ms(),
            )
            .await
            .expect("channel");
        ids.push(c.id);
    }
    ids
}
