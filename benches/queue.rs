//! Queue benchmark: gorp's engine beside a raw-SQLite baseline measured in the same run, so the
//! ratios hold on a noisy machine. Run with `cargo bench --bench queue` (add `-- --jobs N` to
//! change the size). Results and how to read them: BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use gorp::config::DatabaseConfig;
use gorp::executor::{Executor, JobContext, Outcome};
use gorp::store::{now_ms, JobState, NewChannel, NewJob, Source, Store};
use gorp::worker::{PoolConfig, WorkerPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio_util::sync::CancellationToken;

struct NoOp;

impl Executor for NoOp {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(async { Outcome::Succeeded { stop_reason: None } })
    }
}

fn db_config(dir: &std::path::Path, name: &str) -> DatabaseConfig {
    DatabaseConfig {
        path: dir.join(name),
        ..DatabaseConfig::default()
    }
}

/// A plain connection with the store's file settings (WAL, synchronous=NORMAL).
async fn raw_conn(path: &std::path::Path) -> SqliteConnection {
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

async fn channels(store: &Store, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let c = store
            .channel_insert(
                NewChannel {
                    name: format!("ch{i}"),
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

/// The minimal claim + complete, one job at a time, autocommit: what any SQLite queue must do.
async fn baseline(dir: &std::path::Path, jobs: usize) -> f64 {
    let cfg = db_config(dir, "baseline.db");
    let store = Store::open(&cfg).await.expect("open");
    let ch = channels(&store, 1).await[0];
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
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority DESC, run_at, id LIMIT 1)
             RETURNING id",
        )
        .fetch_one(&mut conn)
        .await
        .expect("claim");
        sqlx::query("UPDATE jobs SET state = 'succeeded', lease_owner = NULL WHERE id = ?1 AND state = 'running'")
            .bind(&id)
            .execute(&mut conn)
            .await
            .expect("complete");
    }
    let secs = start.elapsed().as_secs_f64();
    conn.close().await.ok();
    jobs as f64 / secs
}

/// Enqueue → claim → complete through gorp's store and worker pool, no-op executor.
async fn engine(dir: &std::path::Path, jobs: usize, n_channels: usize, concurrency: usize) -> f64 {
    let cfg = db_config(dir, &format!("engine-{n_channels}-{concurrency}.db"));
    let store = Store::open(&cfg).await.expect("open");
    let chs = channels(&store, n_channels).await;
    let pool = WorkerPool::new(
        store.clone(),
        Arc::new(NoOp),
        PoolConfig {
            concurrency,
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(20),
            poll_interval: Duration::from_millis(500),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
        },
        "bench".into(),
    );
    let stop = CancellationToken::new();
    let pool_task = tokio::spawn(pool.run(stop.clone()));
    let start = Instant::now();
    let producers = 64;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        let chs = chs.clone();
        tasks.push(tokio::spawn(async move {
            for i in (p..jobs).step_by(producers) {
                let j = NewJob::new(chs[i % chs.len()], Source::Cli, "noop");
                store.job_insert(j, now_ms()).await.expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    loop {
        let counts = store.job_count_by_state().await.expect("count");
        let done = counts
            .iter()
            .find(|(s, _)| *s == JobState::Succeeded)
            .map(|(_, n)| *n as usize)
            .unwrap_or(0);
        if done >= jobs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.cancel();
    pool_task.await.ok();
    store.close().await;
    jobs as f64 / secs
}

/// Enqueue rate: one awaited insert at a time vs many concurrent callers sharing commits.
async fn enqueue(dir: &std::path::Path, jobs: usize, callers: usize) -> f64 {
    let cfg = db_config(dir, &format!("enqueue-{callers}.db"));
    let store = Store::open(&cfg).await.expect("open");
    let ch = channels(&store, 1).await[0];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (c..jobs).step_by(callers) {
                store
                    .job_insert(NewJob::new(ch, Source::Cli, "x"), now_ms())
                    .await
                    .expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    let secs = start.elapsed().as_secs_f64();
    store.close().await;
    jobs as f64 / secs
}

/// Claim latency (p50, p99 in µs) with `history` finished jobs in the table.
async fn claim_latency(dir: &std::path::Path, history: usize, samples: usize) -> (f64, f64) {
    let cfg = db_config(dir, &format!("history-{history}.db"));
    let store = Store::open(&cfg).await.expect("open");
    let chs = channels(&store, 16).await;
    store.close().await;
    let mut conn = raw_conn(&cfg.path).await;
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO jobs (id, channel_id, source, prompt, state, attempt, run_at, created_at, started_at, finished_at)
         SELECT printf('h%09d', i), ?2 + (i % 16), 'cli', 'history', 'succeeded', 1, i, i, i, i + 1 FROM n",
    )
    .bind(history as i64)
    .bind(chs[0])
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE")
        .execute(&mut conn)
        .await
        .expect("analyze");
    conn.close().await.ok();

    let store = Store::open(&cfg).await.expect("open");
    let rows: Vec<NewJob> = (0..samples)
        .map(|i| NewJob::new(chs[i % chs.len()], Source::Cli, "x"))
        .collect();
    store.job_insert_many(rows, now_ms()).await.expect("insert");
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let mut got = store
            .job_claim_many("bench", 1, now_ms(), 60_000)
            .await
            .expect("claim");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let job = got.pop().expect("a due job");
        store
            .job_complete_if_running(&job.lease().expect("lease"), None, now_ms())
            .await
            .expect("complete");
    }
    store.close().await;
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let jobs = arg("--jobs", 20_000);
    let history = arg("--history", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        println!(
            "gorp queue benchmark: {jobs} jobs, {} cores",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        );

        let base = baseline(d, jobs).await;
        let eng1 = engine(d, jobs, 1, 8).await;
        let eng64 = engine(d, jobs, 64, 32).await;
        println!("\n| claim+complete | jobs/s | ÷ baseline |\n|---|---:|---:|");
        println!("| raw SQLite baseline (1 job at a time) | {base:.0} | 1.00 |");
        println!(
            "| gorp enqueue→claim→complete, 1 channel | {eng1:.0} | {:.2} |",
            eng1 / base
        );
        println!(
            "| gorp enqueue→claim→complete, 64 channels, 32 slots | {eng64:.0} | {:.2} |",
            eng64 / base
        );

        let single = enqueue(d, jobs / 4, 1).await;
        let group = enqueue(d, jobs, 64).await;
        println!("\n| enqueue | jobs/s | ÷ single |\n|---|---:|---:|");
        println!("| one caller (one commit per job) | {single:.0} | 1.00 |");
        println!(
            "| 64 concurrent callers (group commit) | {group:.0} | {:.2} |",
            group / single
        );

        let (p50_small, p99_small) = claim_latency(d, 1_000, 2_000).await;
        let (p50_big, p99_big) = claim_latency(d, history, 2_000).await;
        println!("\n| claim latency | p50 µs | p99 µs |\n|---|---:|---:|");
        println!("| 1k rows of history | {p50_small:.0} | {p99_small:.0} |");
        println!("| {history} rows of history | {p50_big:.0} | {p99_big:.0} |");
        println!(
            "| ratio (big ÷ small) | {:.2} | {:.2} |",
            p50_big / p50_small,
            p99_big / p99_small
        );
    });
}
