//! The worker pool with in-test executors: per-channel exclusivity across racing pools,
//! output before outcome, cancel, shutdown release, retries, and rows from other processes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use gorp::executor::{Executor, JobContext, Outcome};
use gorp::store::{now_ms, JobState, NewJob, Source, Store};
use gorp::worker::{PoolConfig, WorkerPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::support::{eventually, setup};

const WAIT: Duration = Duration::from_secs(20);

fn pool_config(concurrency: usize) -> PoolConfig {
    PoolConfig {
        concurrency,
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_millis(50),
        poll_interval: Duration::from_millis(50),
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        spend: Default::default(),
    }
}

/// Runs a pool in the background; returns its shutdown token and join handle.
fn spawn_pool(
    store: &Store,
    exec: Arc<dyn Executor>,
    cfg: PoolConfig,
    owner: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    gorp::worker::PoolHandle,
) {
    let pool = WorkerPool::new(store.clone(), exec, cfg, owner.into());
    let handle = pool.handle();
    let stop = CancellationToken::new();
    let t = stop.clone();
    (stop, tokio::spawn(pool.run(t)), handle)
}

async fn wait_state(store: &Store, id: &str, want: JobState) -> gorp::store::Job {
    eventually(WAIT, &format!("job {id} to be {want}"), || async {
        store.job_get(id).await.unwrap().filter(|j| j.state == want)
    })
    .await
}

/// Records how many jobs of each channel run at once.
#[derive(Default)]
struct Exclusive {
    live: Mutex<HashMap<String, usize>>,
    max_per_channel: AtomicUsize,
    max_total: AtomicUsize,
    total: AtomicUsize,
}

struct ExclusiveExec(Arc<Exclusive>);

impl Executor for ExclusiveExec {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let me = self.0.clone();
        Box::pin(async move {
            let ch = ctx.job.channel.clone();
            {
                let mut live = me.live.lock().unwrap();
                let n = live.entry(ch.clone()).or_default();
                *n += 1;
                me.max_per_channel.fetch_max(*n, Ordering::SeqCst);
            }
            let t = me.total.fetch_add(1, Ordering::SeqCst) + 1;
            me.max_total.fetch_max(t, Ordering::SeqCst);
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await; // hold the slot across other claims
            me.total.fetch_sub(1, Ordering::SeqCst);
            *me.live.lock().unwrap().get_mut(&ch).unwrap() -= 1;
            ctx.emit(
                gorp::store::EventKind::Message,
                Some(format!("done {}", ctx.job.prompt)),
                None,
            )
            .await;
            Outcome::Succeeded {
                stop_reason: Some("end_turn".into()),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pools_never_run_two_jobs_of_one_channel_at_once() {
    let s = setup().await;
    let mut channels = Vec::new();
    for name in ["c0", "c1", "c2", "c3"] {
        channels.push(s.channel(name).await);
    }
    let jobs: Vec<NewJob> = (0..200)
        .map(|i| NewJob::new(channels[i % 4].id, Source::Cli, format!("job {i}")))
        .collect();
    s.store.job_insert_many(jobs, now_ms()).await.unwrap();

    // Two pools, each with its own store (own writer connection), like two processes.
    let exec = Arc::new(Exclusive::default());
    let other = s.other_store().await;
    let (stop1, h1, _) = spawn_pool(
        &s.store,
        Arc::new(ExclusiveExec(exec.clone())),
        pool_config(2), // two slots each over four channels: neither pool can hold them all
        "pool-1",
    );
    let (stop2, h2, _) = spawn_pool(
        &other,
        Arc::new(ExclusiveExec(exec.clone())),
        pool_config(2),
        "pool-2",
    );

    eventually(WAIT, "all 200 jobs to succeed", || async {
        let c = s.store.job_count_by_state().await.unwrap();
        c.iter()
            .any(|(st, n)| *st == JobState::Succeeded && *n == 200)
            .then_some(())
    })
    .await;
    stop1.cancel();
    stop2.cancel();
    h1.await.unwrap();
    h2.await.unwrap();
    assert_eq!(
        exec.max_per_channel.load(Ordering::SeqCst),
        1,
        "one running job per channel"
    );
    assert!(
        exec.max_total.load(Ordering::SeqCst) > 1,
        "channels ran in parallel"
    );
    let mut conn = s.raw().await;
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT substr(text, 12, 6) FROM job_events WHERE kind = 'started'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(owners.len(), 2, "both pools claimed jobs: {owners:?}");
}

/// Emits many events, then succeeds.
struct Chatty(usize);

impl Executor for Chatty {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let n = self.0;
        Box::pin(async move {
            for i in 0..n {
                ctx.emit(gorp::store::EventKind::Message, Some(format!("{i},")), None)
                    .await;
            }
            Outcome::Succeeded {
                stop_reason: Some("end_turn".into()),
            }
        })
    }
}

#[tokio::test]
async fn output_is_committed_before_the_outcome() {
    let s = setup().await;
    let a = s.channel("a").await;
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(Chatty(500)), pool_config(2), "w");
    let id = s
        .store
        .job_insert(NewJob::new(a.id, Source::Cli, "talk"), now_ms())
        .await
        .unwrap()
        .job_id;
    // The first moment the job reads as succeeded, all of its output must be there.
    let reader = s.other_store().await;
    eventually(WAIT, "job to succeed", || async {
        reader
            .job_get(&id)
            .await
            .unwrap()
            .filter(|j| j.state == JobState::Succeeded)
    })
    .await;
    let out = reader.job_output(&id).await.unwrap();
    let want: String = (0..500).map(|i| format!("{i},")).collect();
    assert_eq!(out, want);
    stop.cancel();
    h.await.unwrap();
}

/// Waits for cancellation; reports how it ended.
struct UntilCancelled;

impl Executor for UntilCancelled {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            ctx.emit(
                gorp::store::EventKind::Message,
                Some("working".into()),
                None,
            )
            .await;
            ctx.cancelled().await;
            Outcome::Cancelled {
                reason: format!("stopped: {:?}", ctx.stop_cause()),
            }
        })
    }
}

#[tokio::test]
async fn cancel_from_another_process_stops_the_running_job() {
    let s = setup().await;
    let a = s.channel("a").await;
    let mut cfg = pool_config(2);
    cfg.heartbeat = Duration::from_secs(3600); // the cancel must not wait for a lease renewal
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(UntilCancelled), cfg, "w");
    let id = s
        .store
        .job_insert(NewJob::new(a.id, Source::Cli, "x"), now_ms())
        .await
        .unwrap()
        .job_id;
    wait_state(&s.store, &id, JobState::Running).await;
    // The "CLI" uses its own store; the pool learns of it through its heartbeat.
    let cli = s.other_store().await;
    assert_eq!(
        cli.job_cancel(&id, now_ms()).await.unwrap(),
        gorp::store::CancelOutcome::Requested
    );
    let j = wait_state(&s.store, &id, JobState::Cancelled).await;
    assert!(j.error.unwrap().contains("UserCancel"));
    assert_eq!(j.stop_reason.as_deref(), Some("cancelled"));
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn cancel_in_process_reaches_the_worker_at_once() {
    let s = setup().await;
    let a = s.channel("a").await;
    let mut cfg = pool_config(2);
    cfg.heartbeat = Duration::from_secs(3600);
    cfg.poll_interval = Duration::from_secs(3600); // only the direct signal can stop it
    let (stop, h, handle) = spawn_pool(&s.store, Arc::new(UntilCancelled), cfg, "w");
    let id = s
        .store
        .job_insert(NewJob::new(a.id, Source::Cli, "x"), now_ms())
        .await
        .unwrap()
        .job_id;
    wait_state(&s.store, &id, JobState::Running).await;
    assert!(handle.cancel_local(&id));
    wait_state(&s.store, &id, JobState::Cancelled).await;
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_short_jobs_finish_and_releases_long_ones() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let mut cfg = pool_config(2);
    cfg.shutdown_grace = Duration::from_millis(200);

    /// Channel "a" finishes when told to; channel "b" never finishes by itself.
    struct Mixed(Arc<tokio::sync::Notify>);
    impl Executor for Mixed {
        fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
            let go = self.0.clone();
            Box::pin(async move {
                if ctx.job.channel == "a" {
                    go.notified().await;
                    Outcome::Succeeded { stop_reason: None }
                } else {
                    ctx.cancelled().await;
                    Outcome::Cancelled {
                        reason: "stopped".into(),
                    }
                }
            })
        }
    }
    let go = Arc::new(tokio::sync::Notify::new());
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(Mixed(go.clone())), cfg, "w");
    let short = s
        .store
        .job_insert(NewJob::new(a.id, Source::Cli, "short"), now_ms())
        .await
        .unwrap()
        .job_id;
    let long = s
        .store
        .job_insert(NewJob::new(b.id, Source::Cli, "long"), now_ms())
        .await
        .unwrap()
        .job_id;
    wait_state(&s.store, &short, JobState::Running).await;
    wait_state(&s.store, &long, JobState::Running).await;
    stop.cancel();
    go.notify_one(); // the short job finishes during the grace period
    h.await.unwrap();
    assert_eq!(
        s.store.job_get(&short).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
    let l = s.store.job_get(&long).await.unwrap().unwrap();
    assert_eq!(
        (l.state, l.attempt, l.lease_owner),
        (JobState::Queued, 0, None),
        "released, attempt not counted"
    );
    let kinds: Vec<String> = s
        .store
        .job_events_list(&long, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["started", "released"]);
}

/// Fails its first attempt, succeeds afterwards.
struct FailOnce;

impl Executor for FailOnce {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            if ctx.job.attempt == 1 {
                Outcome::Failed {
                    error: "transient".into(),
                    retryable: true,
                }
            } else {
                ctx.emit(gorp::store::EventKind::Message, Some("ok".into()), None)
                    .await;
                Outcome::Succeeded { stop_reason: None }
            }
        })
    }
}

#[tokio::test]
async fn failed_attempt_is_retried_by_the_pool() {
    let s = setup().await;
    let a = s.channel("a").await;
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(FailOnce), pool_config(1), "w");
    let id = s
        .store
        .job_insert(NewJob::new(a.id, Source::Cli, "x"), now_ms())
        .await
        .unwrap()
        .job_id;
    let j = wait_state(&s.store, &id, JobState::Succeeded).await;
    assert_eq!(j.attempt, 2);
    let kinds: Vec<String> = s
        .store
        .job_events_list(&id, 0, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["started", "error", "retry_scheduled", "started", "message"]
    );
    assert_eq!(s.store.job_output(&id).await.unwrap(), "ok");
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn pool_finds_rows_inserted_by_another_process() {
    let s = setup().await;
    let a = s.channel("a").await;
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(Chatty(1)), pool_config(1), "w");
    // Let the pool go idle, then insert through an independent connection (like sqlite3).
    let mut conn = s.raw().await;
    sqlx::query(sqlx::AssertSqlSafe(s.sql(
        "INSERT INTO jobs (id, channel_id, source, prompt, run_at, created_at) VALUES ('ext-1', ?1, 'cli', 'from sqlite3', ?2, ?2)",
    )))
    .bind(a.id)
    .bind(now_ms())
    .execute(&mut conn)
    .await
    .unwrap();
    wait_state(&s.store, "ext-1", JobState::Succeeded).await;
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn executor_panic_fails_the_attempt_not_the_worker() {
    let s = setup().await;
    let a = s.channel("a").await;
    struct Panics;
    impl Executor for Panics {
        fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
            Box::pin(async move { panic!("executor bug") })
        }
    }
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(Panics), pool_config(1), "w");
    let mut nj = NewJob::new(a.id, Source::Cli, "x");
    nj.max_attempts = 1;
    let id = s.store.job_insert(nj, now_ms()).await.unwrap().job_id;
    let j = wait_state(&s.store, &id, JobState::Failed).await;
    assert!(j.error.unwrap().contains("panicked"));
    stop.cancel();
    h.await.unwrap();
}

/// Writes log output into a shared buffer.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct LoggingExec;

impl Executor for LoggingExec {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            // A task the executor spawns logs inside the job's span too.
            tokio::spawn(
                async { tracing::info!("from the executor's own task") }.in_current_span(),
            )
            .await
            .unwrap();
            tracing::info!("from the executor");
            Outcome::Succeeded { stop_reason: None }
        })
    }
}

/// Every log line of a job's run carries the job's id, attempt and channel (from the worker's
/// span), in the JSON form `GORP_LOG_FORMAT=json` writes.
#[tokio::test]
async fn a_jobs_log_lines_carry_its_id_attempt_and_channel() {
    let buf = LogBuf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let s = setup().await;
    let ch = s.channel("logged").await;
    let enq = s
        .store
        .job_insert(NewJob::new(ch.id, Source::Cli, "log me"), now_ms())
        .await
        .unwrap();
    let (stop, task, _) = spawn_pool(&s.store, Arc::new(LoggingExec), pool_config(1), "w-log");
    wait_state(&s.store, &enq.job_id, JobState::Succeeded).await;
    stop.cancel();
    task.await.unwrap();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    for msg in ["from the executor", "from the executor's own task"] {
        let line = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["fields"]["message"] == msg)
            .unwrap_or_else(|| panic!("no line {msg:?} in {text}"));
        let span = &line["span"];
        assert_eq!(span["name"], "job", "{line}");
        assert_eq!(span["job"], enq.job_id.as_str(), "{line}");
        assert_eq!(span["attempt"], 1, "{line}");
        assert_eq!(span["channel"], "logged", "{line}");
    }
}

/// An idle pool is woken by the enqueue's commit, not by its poll: with an hour between polls,
/// a job enqueued after the pool went idle still runs at once.
#[tokio::test]
async fn an_enqueue_wakes_an_idle_pool() {
    let s = setup().await;
    let a = s.channel("a").await;
    let mut cfg = pool_config(1);
    cfg.poll_interval = Duration::from_secs(3600);
    let (stop, h, _) = spawn_pool(&s.store, Arc::new(LoggingExec), cfg, "w");
    for prompt in ["first", "after the pool went idle"] {
        let id = s
            .store
            .job_insert(NewJob::new(a.id, Source::Cli, prompt), now_ms())
            .await
            .unwrap()
            .job_id;
        wait_state(&s.store, &id, JobState::Succeeded).await;
    }
    stop.cancel();
    h.await.unwrap();
}
