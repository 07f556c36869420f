//! Queue benchmark: gorp's engine beside a raw-SQLite baseline measured in the same run, so the
//! ratios hold on a noisy machine. Run with `cargo bench --bench queue` (add `-- --jobs N` to
//! change the size). Results and how to read them: BENCHMARKS.md.
//!
//! `-- --raw-insert [--inserts N]` runs only the raw single-row INSERT baseline (one row per
//! autocommit transaction, one connection, the store's file settings) and prints
//! `raw_insert_per_sec <N>`; `benches/webhook.sh` divides the webhook rate by it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gorp::config::DatabaseConfig;
use gorp::store::{now_ms, JobState, NewJob, Source, SpendLimits, Store};
use gorp::worker::WorkerPool;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

#[path = "support/common.rs"]
mod common;

fn db_config(dir: &std::path::Path, name: &str) -> DatabaseConfig {
    DatabaseConfig {
        path: dir.join(name),
        ..DatabaseConfig::default()
    }
}

/// Enqueue → claim → complete through gorp's store and worker pool, no-op executor.
async fn engine(dir: &std::path::Path, jobs: usize, n_channels: usize, concurrency: usize) -> f64 {
    let cfg = db_config(dir, &format!("engine-{n_channels}-{concurrency}.db"));
    let store = Store::open(&cfg).await.expect("open");
    let chs = common::channels(&store, n_channels).await;
    let pool = WorkerPool::new(
        store.clone(),
        Arc::new(common::NoOp),
        common::pool_config(concurrency),
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
    let ch = common::channels(&store, 1).await[0];
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
    let chs = common::channels(&store, 16).await;
    store.close().await;
    let mut conn = common::raw_conn(&cfg.path).await;
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
            .job_claim_many("bench", 1, now_ms(), 60_000, &SpendLimits::default())
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

/// Raw SQLite single-row INSERT rate: `inserts` rows into a `jobs` table created by
/// `Store::open` (then closed), one plain connection with the store's file settings, each row
/// its own autocommit transaction. The floor any durable-before-ack enqueue must beat by batching.
async fn raw_insert(dir: &std::path::Path, inserts: usize) -> f64 {
    let cfg = db_config(dir, "raw-insert.db");
    let store = Store::open(&cfg).await.expect("open");
    let ch = common::channels(&store, 1).await[0];
    store.close().await;
    let mut conn = common::raw_conn(&cfg.path).await;
    let start = Instant::now();
    for _ in 0..inserts {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO jobs (id, channel_id, source, prompt, priority, max_attempts, run_at,
                               idempotency_key, reply_target, created_at)
             VALUES (?1, ?2, 'webhook', ?3, 0, 3, ?4, NULL, NULL, ?4)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(ch)
        .bind("benchmark prompt")
        .bind(now)
        .execute(&mut conn)
        .await
        .expect("insert");
    }
    let secs = start.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(rows as usize, inserts, "every insert committed a row");
    conn.close().await.ok();
    inserts as f64 / secs
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
    if std::env::args().any(|a| a == "--raw-insert") {
        let inserts = arg("--inserts", 50_000);
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let rate = raw_insert(dir.path(), inserts).await;
            println!("raw_insert_rows {inserts}");
            println!("raw_insert_per_sec {rate:.0}");
        });
        return;
    }
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        println!(
            "gorp queue benchmark: {jobs} jobs, {} cores",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        );

        let base = common::claim_complete_per_sec(d, "baseline.db", jobs).await;
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
