//! Jobs on warm ACP sessions, end to end with the real `gorp-script-agent` over stdio:
//! warm reuse, expiry, restart re-warm, crash, timeout, cancel, permissions, fs confinement,
//! usage facts, and agents that are missing or do not speak ACP.

use std::sync::Arc;
use std::time::Duration;

use gorp::agent::pool::WarmSessionManager;
use gorp::agent::AcpExecutor;
use gorp::config::Config;
use gorp::store::{now_ms, Job, JobState, NewChannel, NewJob, Source, Store};
use gorp::worker::{PoolConfig, PoolHandle, WorkerPool};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::support::{eventually, on_postgres, use_test_backend};

pub const SCRIPT_AGENT: &str = env!("CARGO_BIN_EXE_gorp-script-agent");
const WAIT: Duration = Duration::from_secs(30);

/// gorp with the ACP executor on a fresh database and workspace; the script agent keeps its
/// sessions under `state/` so a new agent process can load them.
pub struct Gorp {
    pub dir: TempDir,
    pub config: Arc<Config>,
    pub store: Store,
    pub warm: Arc<WarmSessionManager>,
    pub pool: PoolHandle,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn config_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    c.database.path = dir.join("gorp.db");
    c.workspace.path = dir.join("workspace");
    c.acp.agent_binary = SCRIPT_AGENT.into();
    // The script agent's journals are shared by its processes: writable under the sandbox.
    let journals = dir.join("agent-state");
    std::fs::create_dir_all(&journals).unwrap();
    c.acp.agent_args = vec!["--state-dir".into(), journals.display().to_string()];
    c.acp.extra_writable = vec![journals];
    c.acp.state_path = dir.join("agents");
    c.acp.initialize_timeout_secs = 10;
    c.acp.session_timeout_secs = 10;
    c.worker.max_attempts = 1;
    tweak(&mut c);
    c
}

fn pool_config() -> PoolConfig {
    PoolConfig {
        concurrency: 4,
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        spend: Default::default(),
    }
}

impl Gorp {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Gorp {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path(), tweak);
        use_test_backend(&mut config.database).await;
        Self::start_on(dir, config, "gorp-a").await
    }

    /// Starts a gorp instance (a new "process") on an existing directory and config.
    pub async fn start_on(dir: TempDir, config: Config, instance: &str) -> Gorp {
        let config = Arc::new(config);
        let store = Store::open(&config.database).await.unwrap();
        let warm = WarmSessionManager::new(store.clone(), config.clone(), instance.to_string());
        let pool = WorkerPool::new(
            store.clone(),
            Arc::new(AcpExecutor::new(warm.clone())),
            PoolConfig {
                spend: gorp::budget::SpendPolicy::from_config(&config),
                ..pool_config()
            },
            instance.to_string(),
        );
        let handle = pool.handle();
        let stop = CancellationToken::new();
        let task = Some(tokio::spawn(pool.run(stop.clone())));
        Gorp {
            dir,
            config,
            store,
            warm,
            pool: handle,
            stop,
            task,
        }
    }

    /// Graceful stop: drains the pool, shuts the agents down, releases the leases. Returns
    /// the directory so another instance can start on it.
    pub async fn stop(mut self) -> (TempDir, Config) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        self.warm.shutdown().await;
        self.store.clone().close().await;
        (self.dir, (*self.config).clone())
    }

    pub async fn channel(&self, name: &str, tweak: impl FnOnce(&mut NewChannel)) -> i64 {
        let mut nc = NewChannel {
            name: name.into(),
            ..Default::default()
        };
        tweak(&mut nc);
        self.store.channel_insert(nc, now_ms()).await.unwrap().id
    }

    pub async fn enqueue(&self, channel_id: i64, prompt: &str) -> String {
        self.store
            .job_insert(NewJob::new(channel_id, Source::Cli, prompt), now_ms())
            .await
            .unwrap()
            .job_id
    }

    pub async fn wait_done(&self, id: &str) -> Job {
        eventually(WAIT, &format!("job {id} to finish"), || async {
            self.store
                .job_get(id)
                .await
                .unwrap()
                .filter(|j| j.state.is_terminal())
        })
        .await
    }

    #[allow(dead_code)]
    pub async fn wait_state(&self, id: &str, state: JobState) -> Job {
        eventually(WAIT, &format!("job {id} to be {state}"), || async {
            self.store
                .job_get(id)
                .await
                .unwrap()
                .filter(|j| j.state == state)
        })
        .await
    }

    /// Enqueues, waits for the end, returns the job and its output.
    pub async fn run(&self, channel_id: i64, prompt: &str) -> (Job, String) {
        let id = self.enqueue(channel_id, prompt).await;
        let job = self.wait_done(&id).await;
        let out = self.store.job_output(&id).await.unwrap();
        (job, out)
    }

    /// The `data` of a job's (first) `session` event: warm or cold, pid, mode, sandbox.
    pub async fn session_data(&self, job: &str) -> serde_json::Value {
        self.store
            .job_events_list(job, 0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "session")
            .and_then(|e| e.data)
            .expect("session event")
    }

    pub async fn event_kinds(&self, id: &str) -> Vec<String> {
        self.store
            .job_events_list(id, 0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// A plain connection to this gorp's database, for reading rows behind the store's back.
    pub async fn raw(&self) -> sqlx::AnyConnection {
        crate::support::raw_conn(&self.config.database).await
    }

    /// `sql` in this gorp's database's parameter style.
    pub fn sql(&self, sql: &str) -> String {
        crate::support::sql_for(&self.config.database, sql)
    }

    pub async fn history_session(&self, id: &str) -> Option<String> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(
            self.sql("SELECT session FROM job_history WHERE id = ?1"),
        ))
        .bind(id)
        .fetch_one(&mut self.raw().await)
        .await
        .unwrap()
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn warm_session_is_reused_for_the_next_job() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (j1, pid1) = g.run(ch, "@pid").await;
    let (j2, pid2) = g.run(ch, "@pid").await;
    assert_eq!(
        (j1.state, j2.state),
        (JobState::Succeeded, JobState::Succeeded)
    );
    assert_eq!(pid1, pid2, "same agent process");
    assert_eq!(g.history_session(&j1.id).await.as_deref(), Some("cold"));
    assert_eq!(g.history_session(&j2.id).await.as_deref(), Some("warm"));
    let row = g.store.warm_get(ch).await.unwrap().unwrap();
    assert_eq!(row.state, gorp::store::WarmState::Warm);
    assert_eq!(row.pid.map(|p| p.to_string()), Some(pid1.clone()));
    assert_eq!(row.holder.as_deref(), Some("gorp-a"));
    let expires = row.expires_at.unwrap() - row.last_used_at.unwrap();
    assert_eq!(expires, 3_600_000, "keep_alive_secs defaults to an hour");
    // The channel remembers its ACP session for later processes.
    let channel = g.store.channel_get("alpha").await.unwrap().unwrap();
    assert_eq!(channel.acp_session_id, row.acp_session_id);
    g.stop().await;
}

#[tokio::test]
async fn expired_session_is_shut_down_and_the_next_job_resumes_the_conversation() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (_, first) = g.run(ch, "@history").await;
    assert_eq!(first, "1");
    let pid = g.warm.live_pid(ch).expect("agent is warm");

    // Nothing happens before expiry; everything after it, computed from the table.
    let row = g.store.warm_get(ch).await.unwrap().unwrap();
    let report = g.warm.run_once(row.expires_at.unwrap() - 1).await.unwrap();
    assert_eq!(report.stopped, 0);
    assert!(g.warm.live_pid(ch).is_some());
    let report = g.warm.run_once(row.expires_at.unwrap() + 1).await.unwrap();
    assert_eq!(report.stopped, 1);
    assert_eq!(g.warm.live_pid(ch), None);
    assert_eq!(
        g.store.warm_get(ch).await.unwrap().unwrap().state,
        gorp::store::WarmState::Stopped
    );
    eventually(WAIT, "agent process to exit", || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;

    let (j2, second) = g.run(ch, "@history").await;
    assert_eq!(
        second, "2",
        "the conversation continued through session/load"
    );
    assert_eq!(g.history_session(&j2.id).await.as_deref(), Some("cold"));
    let ev = g.store.job_events_list(&j2.id, 0, 100).await.unwrap();
    let session = ev.iter().find(|e| e.kind == "session").unwrap();
    assert_eq!(session.data.as_ref().unwrap()["resumed"], true);
    assert_ne!(g.warm.live_pid(ch), Some(pid));
    g.stop().await;
}

#[tokio::test]
async fn restart_rewarms_sessions_from_the_table() {
    let a = Gorp::start(|_| {}).await;
    let ch = a.channel("alpha", |_| {}).await;
    let (_, n) = a.run(ch, "@history").await;
    assert_eq!(n, "1");
    let old_pid = a.warm.live_pid(ch).unwrap();
    let (dir, config) = a.stop().await;
    assert!(
        !pid_alive(old_pid) || {
            eventually(WAIT, "old agent to exit", || async {
                (!pid_alive(old_pid)).then_some(())
            })
            .await;
            true
        }
    );

    // A new gorp on the same database: the keeper warms the channel before any job arrives.
    let b = Gorp::start_on(dir, config, "gorp-b").await;
    let report = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(report.warming, 1);
    b.warm.settle().await;
    let new_pid = b.warm.live_pid(ch).expect("re-warmed at start");
    assert_ne!(new_pid, old_pid);
    let row = b.store.warm_get(ch).await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.holder.as_deref()),
        ("warm", Some("gorp-b"))
    );

    let (job, n) = b.run(ch, "@history").await;
    assert_eq!(n, "2", "the re-warmed agent resumed the stored session");
    assert_eq!(b.history_session(&job.id).await.as_deref(), Some("warm"));
    assert_eq!(b.warm.live_pid(ch), Some(new_pid));
    b.stop().await;
}

#[tokio::test]
async fn lease_of_a_dead_holder_is_taken_over() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    // A row left by a gorp that died on this host moments ago: lease still "valid".
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let holder = format!("{}:{}:deadbeef", host.trim(), dead_pid);
    let now = now_ms();
    sqlx::query(sqlx::AssertSqlSafe(g.sql(
        "INSERT INTO warm_sessions (channel_id, holder, state, lease_expires_at, expires_at, updated_at)
         VALUES (?1, ?2, 'warm', ?3, ?4, ?3)",
    )))
    .bind(ch)
    .bind(&holder)
    .bind(now + 60_000)
    .bind(now + 3_600_000)
    .execute(&mut g.raw().await)
    .await
    .unwrap();
    if on_postgres() {
        // Nodes on other machines share the database: a host and pid say nothing there, and
        // only a lease that ran out is taken over.
        let report = g.warm.run_once(now).await.unwrap();
        assert_eq!(report.warming, 0);
        let row = g.store.warm_get(ch).await.unwrap().unwrap();
        assert_eq!(row.holder.as_deref(), Some(holder.as_str()));
        sqlx::query(sqlx::AssertSqlSafe(g.sql(
            "UPDATE warm_sessions SET lease_expires_at = ?1 WHERE channel_id = ?2",
        )))
        .bind(now - 1)
        .bind(ch)
        .execute(&mut g.raw().await)
        .await
        .unwrap();
    }
    let report = g.warm.run_once(now).await.unwrap();
    assert_eq!(report.warming, 1);
    g.warm.settle().await;
    assert!(g.warm.live_pid(ch).is_some());
    assert_eq!(
        g.store
            .warm_get(ch)
            .await
            .unwrap()
            .unwrap()
            .holder
            .as_deref(),
        Some("gorp-a")
    );
    g.stop().await;
}

#[tokio::test]
async fn agent_crash_mid_prompt_fails_the_attempt_and_the_next_job_gets_a_fresh_process() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (_, pid1) = g.run(ch, "@pid").await;
    let (crashed, _) = g.run(ch, "@reply partial\n@crash").await;
    assert_eq!(crashed.state, JobState::Failed);
    let err = crashed.error.unwrap();
    assert!(err.contains("agent exited mid-prompt"), "{err}");
    assert!(err.contains("crash"), "stderr tail is in the error: {err}");
    let (next, pid2) = g.run(ch, "@pid").await;
    assert_eq!(next.state, JobState::Succeeded);
    assert_ne!(pid1, pid2, "a fresh agent process");
    assert_eq!(g.history_session(&next.id).await.as_deref(), Some("cold"));
    g.stop().await;
}

#[tokio::test]
async fn hung_prompt_times_out_and_sends_session_cancel() {
    let g = Gorp::start(|c| c.acp.prompt_timeout_secs = 1).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (_, pid1) = g.run(ch, "@pid").await;
    let (job, _) = g.run(ch, "@hang").await;
    assert_eq!(job.state, JobState::Failed);
    let err = job.error.unwrap();
    assert!(
        err.contains("timed out") && err.contains("session/cancel"),
        "{err}"
    );
    // The agent honoured session/cancel and stays usable (warm).
    let (next, pid2) = g.run(ch, "@pid").await;
    assert_eq!(next.state, JobState::Succeeded);
    assert_eq!(pid1, pid2);
    g.stop().await;
}

/// A turn with no word from the agent for `stall_timeout_secs` is cancelled, the agent
/// restarted, and the attempt fails retryable as `stalled`; the retry resumes the channel's
/// session in the fresh agent (`@hang-once` goes on only in a session that saw the prompt).
#[tokio::test]
async fn a_stalled_turn_is_cancelled_and_retried_in_the_resumed_session() {
    let g = Gorp::start(|c| {
        c.acp.stall_timeout_secs = 1;
        // The hard cap is far away: the watchdog, not the timeout, ends the turn.
        c.acp.prompt_timeout_secs = 600;
    })
    .await;
    let ch = g.channel("stall", |_| {}).await;
    let t = std::time::Instant::now();
    let (job, out) = g
        .run(ch, "@reply started\n@hang-once\n@reply went on")
        .await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.attempt, 2);
    assert!(out.ends_with("went on"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let events = g.store.job_events_list(&job.id, 0, 1000).await.unwrap();
    let error = events
        .iter()
        .find(|e| e.kind == "error" && e.attempt == 1)
        .expect("the first attempt's error");
    let text = error.text.clone().unwrap_or_default();
    assert!(
        text.starts_with("stalled: no output from the agent for 1s"),
        "{text}"
    );
    let sessions: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "session")
        .map(|e| e.data.clone().unwrap())
        .collect();
    assert_eq!(sessions.len(), 2);
    assert_ne!(
        sessions[0]["pid"], sessions[1]["pid"],
        "the agent was restarted"
    );
    assert_eq!(sessions[1]["resumed"], true, "{:?}", sessions[1]);
    assert_eq!(sessions[0]["session_id"], sessions[1]["session_id"]);
    g.stop().await;
}

#[tokio::test]
async fn user_cancel_stops_a_running_prompt_and_the_session_resumes_in_a_fresh_agent() {
    let g = Gorp::start(|c| c.acp.recycle_after_cancel = true).await;
    let ch = g.channel("alpha", |_| {}).await;
    let id = g.enqueue(ch, "@reply working\n@hang").await;
    eventually(WAIT, "first output", || async {
        let out = g.store.job_output(&id).await.unwrap();
        (out == "working").then_some(())
    })
    .await;
    let t = std::time::Instant::now();
    assert_eq!(
        g.store.job_cancel(&id, now_ms()).await.unwrap(),
        gorp::store::CancelOutcome::Requested
    );
    assert!(g.pool.cancel_local(&id));
    let job = g.wait_done(&id).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.stop_reason.as_deref(), Some("cancelled"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cancel is prompt: {:?}",
        t.elapsed()
    );
    // The agent is recycled: the keeper's warm-up request is recorded, and the next job
    // resumes the same ACP session in a new process.
    let row = g.store.warm_get(ch).await.unwrap().unwrap();
    assert!(row.warm_at.is_some(), "re-warm requested");
    assert_eq!(g.warm.live_pid(ch), None);
    let (next, _) = g.run(ch, "@pid").await;
    assert_eq!(next.state, JobState::Succeeded);
    let ev = g.store.job_events_list(&next.id, 0, 100).await.unwrap();
    let session = ev
        .iter()
        .find(|e| e.kind == "session")
        .unwrap()
        .data
        .clone()
        .unwrap();
    assert_eq!(session["resumed"], true);
    assert_eq!(
        session["session_id"].as_str(),
        row.acp_session_id.as_deref()
    );
    g.stop().await;
}

#[tokio::test]
async fn permission_decisions_follow_the_channel_policy_and_are_recorded() {
    let g = Gorp::start(|_| {}).await;
    let allow = g.channel("allow", |_| {}).await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;
    for (ch, want) in [(allow, "allow"), (deny, "reject")] {
        let (job, out) = g.run(ch, "@permission Run rm -rf build").await;
        assert_eq!(job.state, JobState::Succeeded);
        assert!(
            out.starts_with("permission: ") && out.contains(want),
            "{out}"
        );
        let ev = g.store.job_events_list(&job.id, 0, 100).await.unwrap();
        let p = ev
            .iter()
            .find(|e| e.kind == "permission")
            .expect("permission event");
        let data = p.data.as_ref().unwrap();
        assert!(
            data["optionKind"].as_str().unwrap().starts_with(want),
            "{data}"
        );
    }
    g.stop().await;
}

/// The `session` event of a job.
async fn session_event(g: &Gorp, job: &str) -> gorp::store::Event {
    g.store
        .job_events_list(job, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "session")
        .expect("session event")
}

/// gorp with the script agent advertising `modes` (starting in the first) by `control`.
async fn gorp_with_modes(modes: &str, control: &str) -> Gorp {
    Gorp::start(|c| {
        c.acp
            .agent_args
            .extend(["--modes", modes, "--mode-control", control].map(String::from));
    })
    .await
}

#[tokio::test]
async fn a_session_in_a_self_deciding_mode_is_put_in_the_asking_mode_for_every_policy() {
    for control in ["set-mode", "config-option"] {
        let g = gorp_with_modes("auto,default,plan", control).await;
        let deny = g
            .channel("deny", |c| {
                c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
            })
            .await;
        let allow = g.channel("allow", |_| {}).await;
        for (ch, policy, want) in [(deny, "deny", "reject"), (allow, "allow", "allow")] {
            let (job, out) = g.run(ch, "@permission Run rm -rf build").await;
            assert_eq!(job.state, JobState::Succeeded, "{control}: {:?}", job.error);
            // In `auto` the agent would have approved the tool itself.
            assert_eq!(out, format!("permission: {want}"), "{control}");
            let session = session_event(&g, &job.id).await;
            let data = session.data.unwrap();
            assert_eq!(data["policy"], policy);
            assert_eq!(data["mode"], "default", "{control}: {data}");
            assert_eq!(data["mode_before"], "auto", "{control}: {data}");
            let method = if control == "set-mode" {
                "session/set_mode"
            } else {
                "session/set_config_option"
            };
            assert_eq!(data["mode_set_with"], method);
            assert_eq!(
                data["modes"],
                serde_json::json!(["auto", "default", "plan"])
            );
            assert!(
                session
                    .text
                    .unwrap()
                    .contains("mode default (was auto), sandbox "),
                "{control}"
            );
        }
        // The agent switches mode by itself during a turn: the next prompt is put back.
        let (job, _) = g.run(deny, "@mode auto\n@reply switched").await;
        assert_eq!(job.state, JobState::Succeeded);
        let (job, out) = g.run(deny, "@permission Write /etc/passwd").await;
        assert_eq!(out, "permission: reject", "{control}");
        let data = session_event(&g, &job.id).await.data.unwrap();
        assert_eq!(data["mode_before"], "auto", "{control}: {data}");
        g.stop().await;
    }
}

#[tokio::test]
async fn deny_on_an_agent_that_cannot_ask_is_refused_and_allow_runs_in_its_mode() {
    let g = gorp_with_modes("auto,plan", "set-mode").await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;
    let allow = g.channel("allow", |_| {}).await;
    let (job, out) = g.run(deny, "@permission Run rm -rf build").await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempt, 1, "not retried");
    let error = job.error.unwrap();
    assert!(
        error.contains("permission policy deny cannot hold on this agent")
            && error.contains("mode \"auto\" (modes: auto, plan)"),
        "{error}"
    );
    assert_eq!(out, "", "the prompt never reached the agent");
    let (job, out) = g.run(allow, "@permission Run ls").await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(out, "permission: self-approved in mode auto");
    let data = session_event(&g, &job.id).await.data.unwrap();
    assert_eq!(data["mode"], "auto");
    assert!(data["mode_before"].is_null());
    g.stop().await;

    // An agent whose set_mode fails is refused too.
    let g = gorp_with_modes("auto,default", "refuse").await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;
    let (job, _) = g.run(deny, "@permission Run rm -rf build").await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap();
    assert!(
        error.contains("putting its session in mode \"default\" (from \"auto\") failed"),
        "{error}"
    );
    g.stop().await;
}

#[tokio::test]
async fn a_configured_session_mode_must_be_one_the_agent_offers() {
    let g = Gorp::start(|c| {
        c.acp
            .agent_args
            .extend(["--modes", "auto,default,ask"].map(String::from));
        c.acp.session_mode = Some("ask".into());
    })
    .await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;
    let (job, _) = g.run(deny, "@reply hi").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let data = session_event(&g, &job.id).await.data.unwrap();
    assert_eq!(data["mode"], "ask");
    g.stop().await;

    let g = Gorp::start(|c| {
        c.acp
            .agent_args
            .extend(["--modes", "auto,default"].map(String::from));
        c.acp.session_mode = Some("manual".into());
    })
    .await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;
    let (job, _) = g.run(deny, "@reply hi").await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("[acp] session_mode = \"manual\" is not one of the agent's modes"),
        "{:?}",
        job.error
    );
    g.stop().await;
}

#[tokio::test]
async fn file_access_outside_the_workspace_is_refused_and_recorded() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let ws = g.config.channel_dir("alpha");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(g.dir.path().join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(g.dir.path().join("secret.txt"), ws.join("link.txt")).unwrap();
    std::fs::write(ws.join("notes.txt"), "inside").unwrap();

    let (job, out) = g
        .run(
            ch,
            "@read notes.txt\n@read ../secret.txt\n@read link.txt\n@write ../escape.txt x",
        )
        .await;
    assert_eq!(job.state, JobState::Succeeded);
    assert!(out.contains("read ok: inside"), "{out}");
    assert!(!out.contains("top secret"), "{out}");
    let kinds = g.event_kinds(&job.id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "fs_denied").count(),
        3,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"fs_read".to_string()));
    assert!(!g.dir.path().join("escape.txt").exists());
    g.stop().await;
}

#[tokio::test]
async fn usage_and_first_output_are_recorded_in_job_history() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (job, out) = g
        .run(
            ch,
            "@thought planning\n@tool-call Read\n@usage in=10 out=20 cost=0.01\n@reply done",
        )
        .await;
    assert_eq!((job.state, out.as_str()), (JobState::Succeeded, "done"));
    type Facts = (
        Option<f64>,
        Option<i64>,
        Option<i64>,
        Option<f64>,
        Option<String>,
    );
    let row: Facts = sqlx::query_as(sqlx::AssertSqlSafe(g.sql(
        "SELECT first_output_ms, input_tokens, output_tokens, cost_usd, session FROM job_history WHERE id = ?1",
    )))
    .bind(&job.id)
    .fetch_one(&mut g.raw().await)
    .await
    .unwrap();
    assert!(row.0.is_some());
    assert_eq!((row.1, row.2, row.3), (Some(10), Some(20), Some(0.01)));
    assert_eq!(row.4.as_deref(), Some("cold"));
    let kinds = g.event_kinds(&job.id).await;
    for k in [
        "started",
        "session",
        "thought",
        "tool_call",
        "tool_call_update",
        "usage",
        "message",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k} in {kinds:?}");
    }
    g.stop().await;
}

#[tokio::test]
async fn missing_or_non_acp_agents_fail_fast_with_a_clear_error() {
    let g = Gorp::start(|c| c.acp.initialize_timeout_secs = 5).await;
    let cat = g
        .channel("cat", |c| c.agent_binary = Some("/bin/cat".into()))
        .await;
    let missing = g
        .channel("missing", |c| {
            c.agent_binary = Some("/nonexistent/agent".into())
        })
        .await;
    let t = std::time::Instant::now();
    let (job, _) = g.run(cat, "hello").await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error.as_ref().unwrap().contains("does not speak ACP"),
        "{:?}",
        job.error
    );
    let (job, _) = g.run(missing, "hello").await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error.as_ref().unwrap().contains("not found"),
        "{:?}",
        job.error
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "no hang: {:?}",
        t.elapsed()
    );
    let row = g.store.warm_get(cat).await.unwrap().unwrap();
    assert_eq!(row.state, gorp::store::WarmState::Failed);
    g.stop().await;
}

/// An agent that exits at once (`/bin/false`) cannot start: the job fails on its first
/// attempt (no retry with backoff) and records the error once.
#[tokio::test]
async fn agent_that_exits_at_once_fails_without_retry_and_one_error_event() {
    let g = Gorp::start(|c| c.worker.max_attempts = 3).await;
    let f = g
        .channel("false", |c| c.agent_binary = Some("/bin/false".into()))
        .await;
    let id = g
        .store
        .job_insert(
            NewJob {
                max_attempts: 3,
                ..NewJob::new(f, Source::Cli, "hello")
            },
            now_ms(),
        )
        .await
        .unwrap()
        .job_id;
    let job = g.wait_done(&id).await;
    assert_eq!((job.state, job.attempt), (JobState::Failed, 1), "{job:?}");
    let error = job.error.unwrap();
    assert!(error.contains("agent could not start"), "{error}");
    assert!(error.contains("exited during startup"), "{error}");
    let kinds = g.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "error").count(),
        1,
        "{kinds:?}"
    );
    assert!(!kinds.contains(&"retry_scheduled".to_string()), "{kinds:?}");
    g.stop().await;
}

/// Two agent messages with a tool call between them stay apart in the output.
#[tokio::test]
async fn separate_agent_messages_keep_their_boundary_in_the_output() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let (job, out) = g
        .run(
            ch,
            "@reply Checked earlier=\n@tool-call Read\n@reply **Warning:** stale",
        )
        .await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(out, "Checked earlier=\n\n**Warning:** stale");
    let history: String = sqlx::query_scalar(sqlx::AssertSqlSafe(
        g.sql("SELECT output FROM job_history WHERE id = ?1"),
    ))
    .bind(&job.id)
    .fetch_one(&mut g.raw().await)
    .await
    .unwrap();
    assert_eq!(history, out, "job_history shows the same output");
    g.stop().await;
}

/// After a restart, orphaned warm rows are warmed again a few at a time (channels with queued
/// jobs first, then the most recently used) and only as many as fit under the cap; the rest
/// are marked stopped, saying why.
#[tokio::test]
async fn restart_rewarms_a_bounded_number_within_the_cap_queued_channels_first() {
    let a = Gorp::start(|_| {}).await;
    let mut channels = Vec::new();
    for name in ["c0", "c1", "c2", "c3", "c4"] {
        let ch = a.channel(name, |_| {}).await;
        a.run(ch, "@pid").await; // c4 is the most recently used
        channels.push(ch);
    }
    let (dir, mut config) = a.stop().await;
    config.acp.max_warm_sessions = 2;
    config.acp.max_concurrent_starts = 1;
    // c0, the least recently used, has a job waiting (not due yet, so no worker takes it).
    let b = Gorp::start_on(dir, config, "gorp-b").await;
    b.store
        .job_insert(
            NewJob {
                run_at: Some(now_ms() + 3_600_000),
                ..NewJob::new(channels[0], Source::Cli, "later")
            },
            now_ms(),
        )
        .await
        .unwrap();

    let first = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(first.warming, 1, "one start at a time");
    assert_eq!(first.stopped, 3, "three rows do not fit under the cap of 2");
    b.warm.settle().await;
    assert!(
        b.warm.live_pid(channels[0]).is_some(),
        "the channel with a queued job first"
    );
    let second = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!((second.warming, second.stopped), (1, 0));
    b.warm.settle().await;
    assert!(
        b.warm.live_pid(channels[4]).is_some(),
        "then the most recently used"
    );
    for ch in &channels[1..4] {
        assert!(b.warm.live_pid(*ch).is_none());
        let row = b.store.warm_get(*ch).await.unwrap().unwrap();
        assert_eq!(row.state, gorp::store::WarmState::Stopped);
        assert!(
            row.error
                .as_deref()
                .unwrap_or_default()
                .contains("max_warm_sessions (2)"),
            "{:?}",
            row.error
        );
    }
    let third = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(
        (third.warming, third.stopped),
        (0, 0),
        "nothing left to warm"
    );
    b.stop().await;
}

/// Peak resident memory of this test process (nextest runs each test in its own process).
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// An agent that floods 100,000 updates is read at the pace of the database: every update is
/// a row, the job succeeds, and gorp's memory stays bounded.
#[tokio::test]
async fn agent_flooding_updates_is_recorded_with_bounded_memory() {
    // SQLite's page caches are most of what memory grows by; keep them small so the test sees
    // the rest.
    let g = Gorp::start(|c| c.database.cache_mib = 2).await;
    let ch = g.channel("alpha", |_| {}).await;
    g.run(ch, "@reply warm").await;
    let before = peak_rss_mib();
    let id = g.enqueue(ch, &format!("@flood {FLOOD}\n@reply done")).await;
    // Debug builds parse and write each update at a few thousand a second on a busy machine.
    let job = eventually(Duration::from_secs(170), "the flood to end", || async {
        g.store
            .job_get(&id)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    let out = g.store.job_output(&id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out.len(), FLOOD + "done".len());
    assert!(out.ends_with("done"));
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(
        g.sql("SELECT count(*) FROM job_events WHERE job_id = ?1 AND kind = 'message'"),
    ))
    .bind(&job.id)
    .fetch_one(&mut g.raw().await)
    .await
    .unwrap();
    assert_eq!(rows, FLOOD as i64 + 1);
    let grew = peak_rss_mib() - before;
    eprintln!("peak RSS grew by {grew} MiB in a 100,000-update flood (from {before} MiB)");
    assert!(grew < FLOOD_RSS_MIB, "peak RSS grew by {grew} MiB");
    g.stop().await;
}

/// An agent that writes one 100 MB line is stopped once the line passes the limit: the job
/// fails with a clear error (not retried), gorp buffers at most the limit, and the channel's
/// next job gets a fresh agent.
#[tokio::test]
async fn agent_writing_a_100_mb_line_fails_the_job_with_bounded_memory() {
    let g = Gorp::start(|c| {
        c.worker.max_attempts = 3;
        c.database.cache_mib = 2;
    })
    .await;
    let ch = g.channel("alpha", |_| {}).await;
    let (_, pid) = g.run(ch, "@pid").await;
    let before = peak_rss_mib();
    let (job, _) = g.run(ch, "@reply before\n@big-reply 104857600").await;
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Failed, 1),
        "not retried"
    );
    let error = job.error.unwrap();
    assert!(
        error.contains("longer than 16777216 bytes") && error.contains("stopped"),
        "{error}"
    );
    let grew = peak_rss_mib() - before;
    eprintln!("peak RSS grew by {grew} MiB reading a 100 MB line (from {before} MiB)");
    assert!(grew < FLOOD_RSS_MIB, "peak RSS grew by {grew} MiB");
    let (next, new_pid) = g.run(ch, "@pid").await;
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert_ne!(new_pid, pid, "a fresh agent");
    g.stop().await;
}

/// Updates the flooding agent sends.
const FLOOD: usize = 100_000;

/// Bound on the growth of a test process's peak memory in the flood tests (with 2 MiB page
/// caches): one 16 MiB message buffer and the bounded event queues. Measured: 16–17 MiB; a
/// 100 MB line buffered whole, or 100,000 updates queued, would take far more.
const FLOOD_RSS_MIB: u64 = 32;

#[tokio::test]
async fn least_recently_used_session_is_evicted_at_the_cap() {
    let g = Gorp::start(|c| c.acp.max_warm_sessions = 2).await;
    let a = g.channel("a", |_| {}).await;
    let b = g.channel("b", |_| {}).await;
    let c = g.channel("c", |_| {}).await;
    g.run(a, "@pid").await;
    g.run(b, "@pid").await;
    g.run(a, "@pid").await; // b is now the least recently used
    g.run(c, "@pid").await;
    assert!(g.warm.live_pid(a).is_some());
    assert!(g.warm.live_pid(b).is_none(), "b evicted");
    assert!(g.warm.live_pid(c).is_some());
    assert_eq!(
        g.store.warm_get(b).await.unwrap().unwrap().state,
        gorp::store::WarmState::Stopped
    );
    g.stop().await;
}
