//! Several nodes on PostgreSQL, each figure beside a baseline measured in the same run:
//!
//! 1. Raw PostgreSQL baseline (one sqlx connection: claim one job with `FOR UPDATE SKIP
//!    LOCKED`, complete it, each its own transaction) vs one gorp store and worker pool on
//!    PostgreSQL with a no-op executor (64 channels, 32 slots).
//! 2. Scale-out: `gorp start` processes (release build) running the script agent, each turn
//!    sleeping 100 ms, 24 channels: 3 nodes of 8 slots vs 1 node of 8 slots.
//! 3. Cross-node pickup: a job committed by this process (a node enqueueing) → its `started`
//!    event written by a `gorp start` node, both on the database's clock.
//!
//! Run with `cargo bench --bench nodes` (`-- --jobs N --per-channel N --pickups N`). It uses
//! `TEST_POSTGRES_URL` or starts `scripts/setup-postgres`'s throwaway cluster. Results and how
//! to read them: BENCHMARKS.md.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gorp::config::DatabaseConfig;
use gorp::store::{now_ms, JobState, NewJob, Source, Store};
use gorp::worker::WorkerPool;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

#[path = "support/common.rs"]
#[allow(dead_code)]
mod common;

const GORP: &str = env!("CARGO_BIN_EXE_gorp");
const AGENT: &str = env!("CARGO_BIN_EXE_gorp-script-agent");

fn server_url() -> String {
    if let Ok(u) = std::env::var("TEST_POSTGRES_URL") {
        return u;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/setup-postgres"))
        .output()
        .expect("scripts/setup-postgres");
    assert!(out.status.success(), "scripts/setup-postgres failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A new database on the cluster, migrated; dropped by [`drop_db`].
async fn fresh_db(server: &str) -> (String, String) {
    let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(server).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    admin.close().await.ok();
    let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
    let url = format!("{base}/{name}");
    Store::migrate(&pg_config(&url)).await.expect("migrate");
    (name, url)
}

async fn drop_db(server: &str, name: &str) {
    let mut admin = PgConnection::connect(server).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .ok();
    admin.close().await.ok();
}

fn pg_config(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: Some(url.to_string()),
        ..DatabaseConfig::default()
    }
}

async fn succeeded(store: &Store) -> usize {
    store
        .job_count_by_state()
        .await
        .expect("count")
        .iter()
        .find(|(s, _)| *s == JobState::Succeeded)
        .map(|(_, n)| *n as usize)
        .unwrap_or(0)
}

async fn wait_succeeded(store: &Store, n: usize) {
    while succeeded(store).await < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The raw baseline: claim + complete one job at a time, each its own transaction.
async fn raw_baseline(server: &str, jobs: usize) -> f64 {
    let (name, url) = fresh_db(server).await;
    let store = Store::open(&pg_config(&url)).await.expect("open");
    let chs = common::channels(&store, 64).await;
    let rows = (0..jobs)
        .map(|i| NewJob::new(chs[i % chs.len()], Source::Cli, "noop"))
        .collect();
    store.job_insert_many(rows, now_ms()).await.expect("insert");
    store.close().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let start = Instant::now();
    loop {
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = 'b'
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued'
                         ORDER BY priority DESC, created_at, id
                         LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .fetch_optional(&mut conn)
        .await
        .expect("claim");
        let Some(id) = id else { break };
        sqlx::query(
            "UPDATE jobs SET state = 'succeeded', lease_owner = NULL
             WHERE id = $1 AND state = 'running'",
        )
        .bind(&id)
        .execute(&mut conn)
        .await
        .expect("complete");
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    conn.close().await.ok();
    drop_db(server, &name).await;
    rate
}

/// One gorp store and worker pool on PostgreSQL, no-op executor: enqueue → claim → complete.
async fn engine(server: &str, jobs: usize) -> f64 {
    let (name, url) = fresh_db(server).await;
    let store = Store::open(&pg_config(&url)).await.expect("open");
    store.sync_clock().await.expect("clock");
    let chs = common::channels(&store, 64).await;
    let pool = WorkerPool::new(
        store.clone(),
        Arc::new(common::NoOp),
        common::pool_config(32),
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
    wait_succeeded(&store, jobs).await;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    pool_task.await.ok();
    store.close().await;
    drop_db(server, &name).await;
    rate
}

/// `gorp start` processes on one database, killed when dropped.
struct Nodes {
    _dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Nodes {
    fn start(url: &str, n: usize, concurrency: usize) -> Nodes {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("agent-state")).unwrap();
        let config = format!(
            r#"
[database]
url = "{url}"

[workspace]
path = "{ws}"

[worker]
concurrency = {concurrency}
poll_interval_ms = 500

[webhook]
port = 0

[acp]
agent_binary = "{agent}"
agent_args = ["--state-dir", "{state}"]
extra_writable = ["{state}"]
state_path = "{agents}"
"#,
            ws = d.join("workspace").display(),
            agent = AGENT,
            state = d.join("agent-state").display(),
            agents = d.join("agents").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let children = (0..n)
            .map(|i| {
                let log = std::fs::File::create(d.join(format!("node-{i}.log"))).unwrap();
                Command::new(GORP)
                    .arg("start")
                    .env("GORP_CONFIG_PATH", d.join("config.toml"))
                    .env("GORP_LOG", "warn")
                    .current_dir(d)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("gorp start")
            })
            .collect();
        Nodes {
            _dir: dir,
            children,
        }
    }

    /// The warnings the nodes logged (a benchmark run should have none).
    fn warnings(&self) -> Vec<String> {
        (0..self.children.len())
            .flat_map(|i| {
                let text = std::fs::read_to_string(self._dir.path().join(format!("node-{i}.log")))
                    .unwrap_or_default();
                text.lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("node {i}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    async fn wait_up(&self, store: &Store) {
        loop {
            let up = store
                .node_list(now_ms())
                .await
                .expect("nodes")
                .iter()
                .filter(|n| n.state == "up")
                .count();
            if up >= self.children.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Jobs per second of `nodes` nodes (8 slots each) on 24 channels whose turns sleep 100 ms,
/// after one warm-up job per channel.
async fn scale_out(server: &str, nodes: usize, per_channel: usize) -> f64 {
    let (name, url) = fresh_db(server).await;
    let store = Store::open(&pg_config(&url)).await.expect("open");
    let chs = common::channels(&store, 24).await;
    let cluster = Nodes::start(&url, nodes, 8);
    cluster.wait_up(&store).await;
    let warm: Vec<NewJob> = chs
        .iter()
        .map(|c| NewJob::new(*c, Source::Cli, "@reply warm"))
        .collect();
    store
        .job_insert_many(warm, now_ms())
        .await
        .expect("warm-up");
    wait_succeeded(&store, chs.len()).await;
    let jobs = chs.len() * per_channel;
    let rows = (0..jobs)
        .map(|i| {
            NewJob::new(
                chs[i % chs.len()],
                Source::Cli,
                "@sleep-ms 100\n@reply done",
            )
        })
        .collect();
    let start = Instant::now();
    store.job_insert_many(rows, now_ms()).await.expect("insert");
    wait_succeeded(&store, chs.len() + jobs).await;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    for w in cluster.warnings().iter().take(10) {
        eprintln!("{w}");
    }
    // Where the jobs ran, and how many turns started a cold agent.
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let per_node: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.data::jsonb ->> 'owner', count(*) FROM job_events e
         WHERE e.kind = 'started' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("per node");
    let cold: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE warm = false")
        .fetch_one(&mut conn)
        .await
        .expect("cold");
    conn.close().await.ok();
    let counts: Vec<i64> = per_node.iter().map(|(_, n)| *n).collect();
    eprintln!("{nodes} node(s): jobs per node {counts:?}, cold starts {cold}");
    drop(cluster);
    store.close().await;
    drop_db(server, &name).await;
    rate
}

/// Milliseconds from a job's commit here to its `started` event on a `gorp start` node (p50,
/// p99), on the database's clock.
async fn pickup(server: &str, samples: usize) -> (f64, f64) {
    let (name, url) = fresh_db(server).await;
    let store = Store::open(&pg_config(&url)).await.expect("open");
    store.sync_clock().await.expect("clock");
    let ch = common::channels(&store, 1).await[0];
    let cluster = Nodes::start(&url, 1, 8);
    cluster.wait_up(&store).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 5 {
        let t0 = now_ms();
        let job = store
            .job_insert(NewJob::new(ch, Source::Cli, "@reply x"), t0)
            .await
            .expect("enqueue")
            .job_id;
        let started: i64 = loop {
            let at: Option<i64> = sqlx::query_scalar(
                "SELECT at FROM job_events WHERE job_id = $1 AND kind = 'started'",
            )
            .bind(&job)
            .fetch_optional(&mut conn)
            .await
            .expect("event");
            if let Some(at) = at {
                break at;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        wait_succeeded(&store, i + 1).await;
        if i >= 5 {
            lat.push((started - t0) as f64);
        }
    }
    conn.close().await.ok();
    for w in cluster.warnings().iter().take(10) {
        eprintln!("{w}");
    }
    drop(cluster);
    store.close().await;
    drop_db(server, &name).await;
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let jobs = arg(&args, "--jobs", 10_000);
    let per_channel = arg(&args, "--per-channel", 60);
    let samples = arg(&args, "--pickups", 200);
    let server = server_url();
    // `--only claim|scale|pickup` runs one part.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);

    if run("claim") {
        claim_part(&server, jobs).await;
    }
    if run("scale") {
        scale_part(&server, per_channel).await;
    }
    if run("pickup") {
        pickup_part(&server, samples).await;
    }
}

async fn claim_part(server: &str, jobs: usize) {
    let server = server.to_string();
    let raw = raw_baseline(&server, jobs).await;
    let gorp = engine(&server, jobs).await;
    println!("\n| claim + complete on PostgreSQL ({jobs} jobs) | jobs/s | ÷ baseline |");
    println!("|---|---:|---:|");
    println!("| raw PostgreSQL baseline (one connection, SKIP LOCKED, one job per transaction) | {raw:.0} | 1.00 |");
    println!(
        "| gorp, one node, no-op executor, 64 channels, 32 slots | {gorp:.0} | **{:.2}** |",
        gorp / raw
    );
}

async fn scale_part(server: &str, per_channel: usize) {
    let server = server.to_string();
    let one = scale_out(&server, 1, per_channel).await;
    let three = scale_out(&server, 3, per_channel).await;
    println!(
        "\n| scale-out: 24 channels, turns of 100 ms, {} jobs | jobs/s | ÷ one node |",
        24 * per_channel
    );
    println!("|---|---:|---:|");
    println!("| 1 node, 8 slots | {one:.1} | 1.00 |");
    println!(
        "| 3 nodes, 8 slots each | {three:.1} | **{:.2}** |",
        three / one
    );
}

async fn pickup_part(server: &str, samples: usize) {
    let server = server.to_string();
    let (p50, p99) = pickup(&server, samples).await;
    println!("\n| cross-node pickup ({samples} jobs, one at a time) | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    println!("| commit on this process → `started` on a `gorp start` node | {p50:.0} | {p99:.0} |");
}
