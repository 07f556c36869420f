//! ACP benchmark: jobs on warm agent sessions with the real `gorp-script-agent` over stdio.
//! Run with `cargo bench --bench acp`. Every figure is reported beside a baseline measured in the
//! same run. Results and how to read them: BENCHMARKS.md.
//!
//! - cold ÷ warm time to first output (the agent started with a 2 s startup delay);
//! - warm overhead: enqueue → first output row committed, p50/p99, minus the agent's own time
//!   to its first chunk (measured by driving the same agent directly, without gorp);
//! - end-to-end jobs/s across 64 warm channels ÷ the raw-SQLite claim+complete baseline;
//! - job event rows persisted per second;
//! - gorp's own resident memory per warm channel (agent processes excluded).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gorp::acp::client::{AgentProcess, AgentSpec, PermissionPolicy, Timeouts};
use gorp::agent::pool::WarmSessionManager;
use gorp::agent::AcpExecutor;
use gorp::config::Config;
use gorp::store::{now_ms, JobState, NewChannel, NewEvent, NewJob, SandboxMode, Source, Store};
use gorp::worker::WorkerPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_gorp-script-agent");

#[path = "../tests/it/support/fake_anthropic.rs"]
mod fake_anthropic;

#[path = "../tests/it/support/claude_env.rs"]
mod claude_env;

#[path = "support/common.rs"]
#[allow(dead_code)]
mod common;

struct Rig {
    store: Store,
    warm: Arc<WarmSessionManager>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn config(dir: &Path, name: &str, agent_args: Vec<String>) -> Config {
    let mut c = Config::default();
    c.database.path = dir.join(format!("{name}.db"));
    c.workspace.path = dir.join(format!("{name}-ws"));
    c.acp.agent_binary = AGENT.into();
    // The agents' journals are shared by their processes: writable under the sandbox.
    if let Some(i) = agent_args.iter().position(|a| a == "--state-dir") {
        let state = PathBuf::from(&agent_args[i + 1]);
        std::fs::create_dir_all(&state).expect("state dir");
        c.acp.extra_writable = vec![state];
    }
    c.acp.state_path = dir.join(format!("{name}-agents"));
    c.acp.agent_args = agent_args;
    c.acp.max_warm_sessions = 128;
    c.worker.max_attempts = 1;
    c
}

async fn rig(config: Config, concurrency: usize) -> Rig {
    let config = Arc::new(config);
    let store = Store::open(&config.database).await.expect("open");
    let warm = WarmSessionManager::new(store.clone(), config.clone(), "bench".into());
    let pool = WorkerPool::new(
        store.clone(),
        Arc::new(AcpExecutor::new(warm.clone())),
        common::pool_config(concurrency),
        "bench".into(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(pool.run(stop.clone()));
    Rig {
        store,
        warm,
        stop,
        task,
    }
}

impl Rig {
    async fn channel(&self, name: &str) -> i64 {
        self.store
            .channel_insert(
                NewChannel {
                    name: name.into(),
                    ..Default::default()
                },
                now_ms(),
            )
            .await
            .expect("channel")
            .id
    }

    async fn run(&self, ch: i64, prompt: &str) -> String {
        let id = self
            .store
            .job_insert(NewJob::new(ch, Source::Cli, prompt), now_ms())
            .await
            .expect("enqueue")
            .job_id;
        loop {
            let j = self.store.job_get(&id).await.expect("get").expect("job");
            if j.state.is_terminal() {
                assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
                return id;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn first_output_ms(&self, id: &str) -> f64 {
        let v: Option<f64> = sqlx::query_scalar("SELECT first_output_ms FROM jobs WHERE id = ?1")
            .bind(id)
            .fetch_one(self.store.read_pool())
            .await
            .expect("facts");
        v.expect("first output recorded")
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.ok();
        self.warm.shutdown().await;
        self.store.close().await;
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user + system) of this process and of its reaped children.
fn cpu_secs() -> (f64, f64) {
    let usage = |who| {
        // SAFETY: getrusage only writes into the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    (usage(libc::RUSAGE_SELF), usage(libc::RUSAGE_CHILDREN))
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Cold ÷ warm time to first output with a 2 s agent startup delay.
async fn cold_vs_warm(dir: &Path) -> (f64, f64) {
    let state = dir.join("state-cold");
    let args = vec![
        "--state-dir".into(),
        state.display().to_string(),
        "--startup-delay-ms".into(),
        "2000".into(),
    ];
    let r = rig(config(dir, "cold", args), 4).await;
    let ch = r.channel("c").await;
    let cold = r.run(ch, "@reply hi").await;
    let mut warm = Vec::new();
    for _ in 0..20 {
        let id = r.run(ch, "@reply hi").await;
        warm.push(r.first_output_ms(&id).await);
    }
    let cold_ms = r.first_output_ms(&cold).await;
    r.stop().await;
    (cold_ms, pct(&mut warm, 0.5))
}

/// Cold-start time to first output (no startup delay) of `n` channels' agents under `mode`:
/// what building and applying the sandbox adds to a cold start.
async fn sandbox_cold(dir: &Path, mode: SandboxMode, n: usize) -> Vec<f64> {
    let name = format!("sandbox-{mode}");
    let state = dir.join(format!("state-{name}"));
    let mut c = config(
        dir,
        &name,
        vec!["--state-dir".into(), state.display().to_string()],
    );
    c.acp.sandbox = Some(mode);
    let r = rig(c, 1).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ch = r.channel(&format!("c{i}")).await;
        let id = r.run(ch, "@reply hi").await;
        out.push(r.first_output_ms(&id).await);
    }
    r.stop().await;
    out
}

/// Cold ÷ warm time to first output with the real Claude Code agent on the fake API.
async fn claude_cold_vs_warm(dir: &Path) -> (f64, f64) {
    let fake = fake_anthropic::FakeAnthropic::start().await;
    fake.set_default_reply(fake_anthropic::Reply::text("Hello from the fake model."));
    let home = dir.join("claude-home");
    std::fs::create_dir_all(&home).expect("home");
    let home = home.canonicalize().expect("home");
    claude_env::seed_plugin_blocklist(&home);
    let mut c = config(dir, "claude", vec![]);
    c.acp.agent_binary = claude_env::agent_binary().display().to_string();
    c.acp.env = claude_env::claude_env(&fake.base_url(), &home)
        .into_iter()
        .collect();
    let r = rig(c, 2).await;
    let ch = r.channel("claude").await;
    let cold = r.run(ch, "hello").await;
    let cold_ms = r.first_output_ms(&cold).await;
    let mut warm = Vec::new();
    for _ in 0..10 {
        let id = r.run(ch, "hello again").await;
        warm.push(r.first_output_ms(&id).await);
    }
    r.stop().await;
    (cold_ms, pct(&mut warm, 0.5))
}

/// The agent's own prompt → first chunk time, driving it directly.
async fn agent_alone(dir: &Path, samples: usize) -> Vec<f64> {
    let ws = dir.join("alone");
    std::fs::create_dir_all(&ws).expect("dir");
    let spec = AgentSpec {
        binary: AGENT.into(),
        args: vec![
            "--state-dir".into(),
            dir.join("state-alone").display().to_string(),
        ],
        cwd: ws.clone(),
        env: Vec::new(),
        sandbox: gorp::sandbox::Spec::none(),
    };
    let agent = AgentProcess::spawn(&spec, Timeouts::default(), PermissionPolicy::Allow, ws)
        .await
        .expect("spawn");
    let session = agent.new_session().await.expect("session");
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<gorp::acp::client::AgentEvent>(
            gorp::acp::client::EVENT_QUEUE,
        );
        let t = Instant::now();
        let reader = tokio::spawn(async move {
            let mut first = None;
            while let Some(ev) = rx.recv().await {
                if first.is_none() && ev.kind == "message" {
                    first = Some(t.elapsed());
                }
            }
            first
        });
        agent
            .prompt(&session, "@reply hi", tx, CancellationToken::new())
            .await
            .expect("prompt");
        let first = reader.await.expect("reader");
        out.push(first.expect("a message chunk").as_secs_f64() * 1e3);
    }
    agent.shutdown().await;
    out
}

/// Enqueue → first message row committed, on a warm channel (ms).
async fn warm_overhead(dir: &Path, samples: usize) -> Vec<f64> {
    let args = vec![
        "--state-dir".into(),
        dir.join("state-ovh").display().to_string(),
    ];
    let r = rig(config(dir, "overhead", args), 4).await;
    let ch = r.channel("o").await;
    r.run(ch, "@reply warm-up").await;
    let mut conn = SqliteConnectOptions::new()
        .filename(dir.join("overhead.db"))
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .disable_statement_logging()
        .connect()
        .await
        .expect("reader");
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let id = r
            .store
            .job_insert(NewJob::new(ch, Source::Cli, "@reply hi"), now_ms())
            .await
            .expect("enqueue")
            .job_id;
        loop {
            let seen: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM job_events WHERE job_id = ?1 AND kind = 'message' LIMIT 1",
            )
            .bind(&id)
            .fetch_optional(&mut conn)
            .await
            .expect("poll");
            if seen.is_some() {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        loop {
            let j = r.store.job_get(&id).await.expect("get").expect("job");
            if j.state.is_terminal() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    conn.close().await.ok();
    r.stop().await;
    lat
}

/// No-op jobs per second across 64 warm channels, and gorp's RSS per warm channel.
async fn throughput(dir: &Path, jobs: usize) -> (f64, f64) {
    let args = vec![
        "--state-dir".into(),
        dir.join("state-tp").display().to_string(),
    ];
    let r = rig(config(dir, "throughput", args), 64).await;
    let mut chs = Vec::new();
    for i in 0..64 {
        chs.push(r.channel(&format!("t{i}")).await);
    }
    let before = rss_kb();
    let mut warmups = Vec::new();
    for ch in &chs {
        let store = r.store.clone();
        let ch = *ch;
        warmups.push(
            store
                .job_insert(NewJob::new(ch, Source::Cli, "@reply warm"), now_ms())
                .await
                .expect("enqueue")
                .job_id,
        );
    }
    for id in &warmups {
        loop {
            let j = r.store.job_get(id).await.expect("get").expect("job");
            if j.state.is_terminal() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let after = rss_kb();
    let per_channel = (after.saturating_sub(before)) as f64 / 64.0;

    let rows: Vec<NewJob> = (0..jobs)
        .map(|i| NewJob::new(chs[i % 64], Source::Cli, "@reply x"))
        .collect();
    let t = Instant::now();
    let (self0, children0) = cpu_secs();
    r.store
        .job_insert_many(rows, now_ms())
        .await
        .expect("enqueue");
    loop {
        // Counted through the partial index on finished jobs, so polling stays cheap.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL")
            .fetch_one(r.store.read_pool())
            .await
            .expect("count");
        if n as usize >= jobs + 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = jobs as f64 / t.elapsed().as_secs_f64();
    let (self1, _) = cpu_secs();
    r.stop().await;
    let (_, children1) = cpu_secs(); // agents are counted once reaped
    println!(
        "(CPU per job: gorp {:.3} ms, agents {:.3} ms including their start-up)",
        (self1 - self0) * 1e3 / jobs as f64,
        (children1 - children0) * 1e3 / jobs as f64
    );
    (rate, per_channel)
}

/// Job event rows committed per second through the store's writer.
async fn event_rate(dir: &Path, rows: usize) -> f64 {
    let cfg = config(dir, "events", vec![]);
    let store = Store::open(&cfg.database).await.expect("open");
    let ch = store
        .channel_insert(
            NewChannel {
                name: "e".into(),
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .expect("channel")
        .id;
    let id = store
        .job_insert(NewJob::new(ch, Source::Cli, "x"), now_ms())
        .await
        .expect("job")
        .job_id;
    let t = Instant::now();
    for i in 0..rows {
        store
            .job_events_append(vec![NewEvent {
                job_id: id.clone(),
                attempt: 1,
                kind: "message".into(),
                text: Some(format!("chunk {i} of streamed agent output ")),
                data: None,
                at: now_ms(),
            }])
            .await
            .expect("append");
    }
    store.flush().await.expect("flush");
    let rate = rows as f64 / t.elapsed().as_secs_f64();
    store.close().await;
    rate
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        if std::env::args().any(|a| a == "--sandbox-only") {
            // Alternate the two modes so drift on a busy machine hits both alike.
            let (mut none, mut landlock) = (Vec::new(), Vec::new());
            for round in 0..4 {
                let sub = d.join(format!("round{round}"));
                std::fs::create_dir_all(&sub).expect("dir");
                none.extend(sandbox_cold(&sub, SandboxMode::None, 10).await);
                landlock.extend(sandbox_cold(&sub, SandboxMode::Landlock, 10).await);
            }
            let mut prep = Vec::new();
            let spec = gorp::sandbox::Spec {
                mode: Some(SandboxMode::Landlock),
                writable: vec![d.join("round1")],
                deny_read: vec![d.join("round0")],
                allowed_ports: None,
            };
            for _ in 0..200 {
                let t = Instant::now();
                let p = gorp::sandbox::prepare(&spec).expect("prepare");
                prep.push(t.elapsed().as_secs_f64() * 1e3);
                drop(p);
            }
            let (n50, l50) = (pct(&mut none, 0.5), pct(&mut landlock, 0.5));
            println!("| cold start, time to first output (40 each, p50) | ms |\n|---|---:|");
            println!("| sandbox none | {n50:.1} |");
            println!("| sandbox landlock | {l50:.1} |");
            println!("| landlock ÷ none | {:.2} |", l50 / n50.max(0.001));
            println!(
                "| building the ruleset alone (p50 / p99 of 200) | {:.2} / {:.2} |",
                pct(&mut prep, 0.5),
                pct(&mut prep, 0.99)
            );
            return;
        }
        if std::env::args().any(|a| a == "--throughput-only") {
            let base = common::claim_complete_per_sec(d, "baseline.db", 20_000).await;
            let (rate, _) = throughput(d, 5_000).await;
            println!(
                "baseline {base:.0} jobs/s, gorp {rate:.0} jobs/s, ratio {:.2}",
                rate / base
            );
            return;
        }
        println!("gorp ACP benchmark (gorp-script-agent over stdio)");

        let (cold, warm) = cold_vs_warm(d).await;
        println!("\n| time to first output | ms |\n|---|---:|");
        println!("| cold (agent startup delay 2000 ms) | {cold:.1} |");
        println!("| warm (p50 of 20) | {warm:.2} |");
        println!("| cold ÷ warm | {:.0} |", cold / warm.max(0.001));
        let (ccold, cwarm) = claude_cold_vs_warm(d).await;
        println!("| Claude Code (claude-agent-acp, fake API): cold | {ccold:.1} |");
        println!("| Claude Code: warm (p50 of 10) | {cwarm:.1} |");
        println!(
            "| Claude Code: cold ÷ warm | {:.1} |",
            ccold / cwarm.max(0.001)
        );

        let mut alone = agent_alone(d, 300).await;
        let mut ovh = warm_overhead(d, 300).await;
        let (a50, a99) = (pct(&mut alone, 0.5), pct(&mut alone, 0.99));
        let (o50, o99) = (pct(&mut ovh, 0.5), pct(&mut ovh, 0.99));
        println!("\n| warm path | p50 ms | p99 ms |\n|---|---:|---:|");
        println!("| agent alone: prompt → first chunk | {a50:.2} | {a99:.2} |");
        println!("| gorp: enqueue → first output row committed | {o50:.2} | {o99:.2} |");
        println!(
            "| warm overhead (difference) | {:.2} | {:.2} |",
            o50 - a50,
            o99 - a99
        );

        let base = common::claim_complete_per_sec(d, "baseline.db", 20_000).await;
        let (rate, rss) = throughput(d, 5_000).await;
        println!("\n| end to end | value |\n|---|---:|");
        println!("| raw SQLite claim+complete baseline (jobs/s) | {base:.0} |");
        println!("| gorp jobs/s across 64 warm channels (`@reply x`) | {rate:.0} |");
        println!("| ratio | {:.2} |", rate / base);
        println!("| gorp RSS per warm channel (KB, agents excluded) | {rss:.0} |");

        let ev = event_rate(d, 200_000).await;
        println!("| job event rows persisted per second | {ev:.0} |");
    });
}
