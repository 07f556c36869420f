//! The `gorp` binary: every command, exit codes, `--json`, and the crash test — a `gorp start`
//! killed with SIGKILL mid-job and restarted on the same database.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use gorp::config::DatabaseConfig;
use gorp::store::{JobState, Store};
use tempfile::TempDir;

use crate::acp::SCRIPT_AGENT;
use crate::support::eventually;

pub(crate) const GORP: &str = env!("CARGO_BIN_EXE_gorp");
const WAIT: Duration = Duration::from_secs(60);

/// A directory with a config file pointing everything inside it.
pub(crate) struct Env {
    pub(crate) dir: TempDir,
}

impl Env {
    pub(crate) fn new() -> Env {
        Self::with("")
    }

    pub(crate) fn with(extra: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = format!(
            r#"
[database]
path = "{db}"

[workspace]
path = "{ws}"

[worker]
rescue_interval_secs = 1
heartbeat_secs = 1
lease_secs = 10
poll_interval_ms = 100
shutdown_grace_secs = 1
max_attempts = 3

[webhook]
port = 0

[acp]
agent_binary = "{agent}"
agent_args = ["--state-dir", "{state}"]
extra_writable = ["{state}"]
state_path = "{agents}"
{extra}
"#,
            db = d.join("gorp.db").display(),
            ws = d.join("workspace").display(),
            agent = SCRIPT_AGENT,
            state = d.join("agent-state").display(),
            agents = d.join("agents").display(),
        );
        std::fs::create_dir_all(d.join("agent-state")).unwrap();
        std::fs::write(d.join("config.toml"), config).unwrap();
        Env { dir }
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(GORP);
        c.args(args)
            .env("GORP_CONFIG_PATH", self.config_path())
            .env("GORP_LOG", "warn")
            .current_dir(self.dir.path());
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gorp {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub(crate) fn start(&self) -> Server {
        let child = self
            .cmd(&["start"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Server { child }
    }

    pub(crate) async fn store(&self) -> Store {
        Store::open(&DatabaseConfig {
            path: self.dir.path().join("gorp.db"),
            ..Default::default()
        })
        .await
        .unwrap()
    }
}

/// A `gorp start` process, killed if the test ends early.
pub(crate) struct Server {
    child: Child,
}

impl Server {
    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn count_jobs(path: &Path) -> i64 {
    let store = Store::open(&DatabaseConfig {
        path: path.join("gorp.db"),
        ..Default::default()
    })
    .await
    .unwrap();
    let n = store
        .job_count_by_state()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    store.close().await;
    n
}

#[tokio::test]
async fn config_check_prints_masked_config_and_bad_config_exits_78() {
    let env = Env::with("[acp.env]\nANTHROPIC_API_KEY = \"x\"\n");
    let out = env.ok(&["config", "check"]);
    assert!(
        out.contains("[worker]") && out.contains("concurrency = 8"),
        "{out}"
    );
    assert!(
        out.contains("ANTHROPIC_API_KEY = \"********\""),
        "secrets masked: {out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["config", "check", "--json"])).unwrap();
    assert_eq!(json["worker"]["rescue_interval_secs"], 1);

    let bad = Env::with("bogus_key = 1\n");
    let out = bad.run(&["config", "check"]);
    assert_eq!(code(&out), 78);
    let err = stderr(&out);
    assert!(
        err.contains("config.toml") && err.contains("bogus_key"),
        "{err}"
    );

    let out = bad.run(&["jobs"]);
    assert_eq!(code(&out), 78, "every command refuses a bad config");
    assert!(!bad.dir.path().join("gorp.db").exists(), "nothing written");
}

#[tokio::test]
async fn channels_and_jobs_commands_with_exit_codes() {
    let env = Env::new();
    assert!(env.ok(&["migrate"]).contains("migration"));
    let out = env.ok(&["channels", "add", "alpha"]);
    assert!(
        out.contains("channel alpha created") && out.contains("/webhook/session/"),
        "{out}"
    );
    assert!(env.dir.path().join("workspace/alpha").is_dir());
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "channels", "list"])).unwrap();
    assert_eq!(list[0]["name"], "alpha");

    // Bad input: clear error, exit code, nothing written.
    let out = env.run(&["channels", "add", "../evil"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid channel name"));
    let out = env.run(&["channels", "add", "alpha"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("already exists"));
    let out = env.run(&["enqueue", "nope", "hello"]);
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("unknown channel"));
    let out = env.run(&["enqueue", "alpha", "  "]);
    assert_eq!(code(&out), 2);
    assert_eq!(count_jobs(env.dir.path()).await, 0);
    let out = env.run(&["jobs", "--state", "sideways"]);
    assert_eq!(code(&out), 2, "clap refuses unknown states");

    // Enqueue (no server running), idempotency, list, show, cancel.
    let id = env
        .ok(&["enqueue", "alpha", "hello", "--idempotency-key", "k1"])
        .trim()
        .to_string();
    let again = env.ok(&["enqueue", "alpha", "hello", "--idempotency-key", "k1"]);
    assert!(
        again.starts_with(&id) && again.contains("existing"),
        "{again}"
    );
    let jobs: serde_json::Value =
        serde_json::from_str(&env.ok(&["jobs", "--json", "--state", "queued"])).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["id"], id.as_str());
    let table = env.ok(&["jobs"]);
    assert!(
        table.starts_with("ID") && table.contains(&id) && table.contains("queued"),
        "{table}"
    );
    assert!(env.ok(&["job", &id]).contains("state     queued"));
    let out = env.run(&["job", "0000"]);
    assert_eq!(code(&out), 3);
    assert!(env.ok(&["cancel", &id]).contains("cancelled"));
    assert!(env.ok(&["cancel", &id]).contains("already cancelled"));
    let out = env.run(&["tail", &id]);
    assert_eq!(code(&out), 5, "tail exits with the job's outcome");

    // A new webhook token replaces the old one.
    let db = env.dir.path().join("gorp.db");
    let hash = |db: std::path::PathBuf| async move {
        let store = gorp::store::Store::open(&gorp::config::DatabaseConfig {
            path: db,
            ..Default::default()
        })
        .await
        .unwrap();
        let h = store
            .channel_get("alpha")
            .await
            .unwrap()
            .unwrap()
            .webhook_token_sha256
            .unwrap();
        store.close().await;
        h
    };
    let before = hash(db.clone()).await;
    let rotated: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "channels", "token", "alpha"])).unwrap();
    let token = rotated["webhook_token"].as_str().unwrap().to_string();
    let after = hash(db.clone()).await;
    assert_ne!(before, after);
    assert!(gorp::auth::token_matches_hash(&token, &after));
    let out = env.run(&["channels", "token", "nope"]);
    assert_eq!(code(&out), 3);

    let out = env.run(&["channels", "rm", "nope"]);
    assert_eq!(code(&out), 3);
    env.ok(&["channels", "rm", "alpha"]);
    assert_eq!(
        count_jobs(env.dir.path()).await,
        0,
        "a channel's jobs go with it"
    );
}

#[tokio::test]
async fn enqueue_wait_tail_and_warm_against_a_running_gorp() {
    let env = Env::new();
    env.ok(&["channels", "add", "alpha"]);
    let server = env.start();

    let out = env.run(&[
        "enqueue",
        "alpha",
        "@chunks 3\n@reply hello there world",
        "--wait",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello there world"
    );

    let out = env.run(&[
        "enqueue",
        "alpha",
        "@fail nope",
        "--wait",
        "--max-attempts",
        "1",
        "--json",
    ]);
    assert_eq!(code(&out), 4, "a failed job exits 4");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "failed");

    let id = env
        .ok(&[
            "enqueue",
            "alpha",
            "@chunks 2\n@delay-ms 50\n@reply tailed text",
        ])
        .trim()
        .to_string();
    let out = env.run(&["tail", &id]);
    assert_eq!(code(&out), 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("started") && text.contains("message") && text.contains("[job succeeded]"),
        "{text}"
    );

    let out = env.run(&["enqueue", "alpha", "@hang", "--wait", "--timeout", "1"]);
    assert_eq!(code(&out), 6, "the wait ran out");
    let hung = env.ok(&["jobs", "--state", "running", "--json"]);
    let hung: serde_json::Value = serde_json::from_str(&hung).unwrap();
    let hung_id = hung[0]["id"].as_str().unwrap().to_string();
    assert!(env.ok(&["cancel", &hung_id]).contains("cancel requested"));
    let out = env.run(&["tail", &hung_id]);
    assert_eq!(code(&out), 5, "cancelled");

    env.ok(&["channels", "add", "beta"]);
    let out = env.ok(&["warm", "beta"]);
    assert!(out.contains("beta: warm (pid"), "{out}");
    let pool = env.ok(&["warm"]);
    assert!(
        pool.contains("alpha") && pool.contains("beta") && pool.contains("warm"),
        "{pool}"
    );

    server.signal(libc::SIGTERM);
    assert!(server.wait().success(), "graceful shutdown exits 0");
}

/// SIGKILL a gorp with a running job; restart on the same database: the job is rescued and
/// finishes, a job queued while gorp was down runs too, and the attempts are recorded.
#[tokio::test]
async fn crash_test_killed_gorp_restarts_and_finishes_the_job() {
    let env = Env::new();
    env.ok(&["channels", "add", "alpha"]);
    env.ok(&["channels", "add", "beta"]);
    let server = env.start();
    let id = env
        .ok(&[
            "enqueue",
            "alpha",
            "@reply begun\n@sleep-ms 2000\n@reply  and done",
        ])
        .trim()
        .to_string();
    let store = env.store().await;
    eventually(WAIT, "the job to be running with output", || async {
        let out = store.job_output(&id).await.unwrap();
        (out == "begun").then_some(())
    })
    .await;
    server.signal(libc::SIGKILL);
    let status = server.wait();
    assert!(!status.success());
    let j = store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Running, 1),
        "the dead gorp still holds the lease"
    );

    // While gorp is down a prompt still goes in.
    let queued = env
        .ok(&["enqueue", "beta", "@reply while down"])
        .trim()
        .to_string();

    let server = env.start();
    let j = eventually(WAIT, "the rescued job to finish", || async {
        store
            .job_get(&id)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.attempt, 2, "attempts are recorded");
    let out = store.job_output(&id).await.unwrap();
    assert!(out.starts_with("begun") && out.ends_with("done"), "{out}");
    let events = store.job_events_list(&id, 0, 1000).await.unwrap();
    let rescued = events
        .iter()
        .find(|e| e.kind == "rescued")
        .expect("rescued event");
    assert!(
        rescued.text.as_ref().unwrap().contains("re-run"),
        "{:?}",
        rescued.text
    );
    let starts: Vec<_> = events.iter().filter(|e| e.kind == "started").collect();
    assert_eq!(starts.len(), 2);
    assert!(starts[1]
        .text
        .as_ref()
        .unwrap()
        .contains("re-run: attempt 2"));
    let q = eventually(WAIT, "the job queued while down to finish", || async {
        store
            .job_get(&queued)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(q.state, JobState::Succeeded);
    assert_eq!(store.job_output(&queued).await.unwrap(), "while down");
    assert_eq!(
        count_jobs(env.dir.path()).await,
        2,
        "nothing lost, nothing duplicated"
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    store.close().await;
}

/// SIGTERM with a job running past the grace period: the job is released (attempt not
/// counted) and runs again after restart.
#[tokio::test]
async fn graceful_shutdown_releases_the_running_job_for_the_next_start() {
    let env = Env::new();
    env.ok(&["channels", "add", "alpha"]);
    let server = env.start();
    let id = env
        .ok(&["enqueue", "alpha", "@reply x\n@sleep-ms 3000\n@reply y"])
        .trim()
        .to_string();
    let store = env.store().await;
    eventually(WAIT, "the job to produce output", || async {
        (store.job_output(&id).await.unwrap() == "x").then_some(())
    })
    .await;
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    let j = store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Queued, 0),
        "released without counting"
    );
    let kinds: Vec<String> = store
        .job_events_list(&id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"released".to_string()), "{kinds:?}");

    let server = env.start();
    let j = eventually(WAIT, "the released job to finish", || async {
        store
            .job_get(&id)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!((j.state, j.attempt), (JobState::Succeeded, 1));
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    store.close().await;
}

#[tokio::test]
async fn schedule_commands_add_list_pause_resume_rm_and_next() {
    let env = Env::new();
    env.ok(&["channels", "add", "alpha"]);
    let out = env.ok(&[
        "schedule",
        "next",
        "0 9 * * 1-5",
        "--tz",
        "Europe/Berlin",
        "-n",
        "3",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines.iter().all(|l| l.contains("T09:00:00+0")), "{out}");
    let out = env.run(&["schedule", "next", "every day"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("invalid cron expression"));
    let out = env.run(&[
        "schedule",
        "add",
        "alpha",
        "0 9 * * *",
        "hi",
        "--tz",
        "Mars/Base",
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("unknown time zone"));

    let added: serde_json::Value = serde_json::from_str(&env.ok(&[
        "--json",
        "schedule",
        "add",
        "alpha",
        "@daily",
        "daily digest",
        "--tz",
        "UTC",
        "--catch-up",
        "all",
    ]))
    .unwrap();
    let id = added["id"].as_i64().unwrap().to_string();
    assert_eq!(added["catch_up"], "all");
    env.ok(&["schedule", "add", "alpha", "in 30m", "one-off"]);
    let list = env.ok(&["schedule", "list"]);
    assert!(
        list.contains("@daily") && list.contains("once") && list.contains("active"),
        "{list}"
    );
    env.ok(&["schedule", "pause", &id]);
    assert!(env.ok(&["schedule", "list"]).contains("paused"));
    env.ok(&["schedule", "resume", &id]);
    env.ok(&["schedule", "rm", &id]);
    let out = env.run(&["schedule", "rm", &id]);
    assert_eq!(code(&out), 3);
}

/// `gorp jobs | head`: output to a program that exits early ends the command quietly (killed
/// by SIGPIPE, as other tools are), never with a panic about a broken pipe.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    env.ok(&["channels", "add", "alpha"]);
    for i in 0..3 {
        env.ok(&["enqueue", "alpha", &format!("job {i}")]);
    }
    for args in [&["jobs"][..], &["channels", "list"], &["jobs", "--json"]] {
        let mut child = env
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before gorp writes
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

/// A database path gorp cannot create is a problem of the machine (exit 1), not bad input
/// (exit 2), and the message says which path.
#[test]
fn unwritable_database_path_exits_1_naming_the_path() {
    let env = Env::new();
    let out = env
        .cmd(&["jobs"])
        .env("GORP_DATABASE_PATH", "/proc/gorp-cannot-be-here/gorp.db")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(err.contains("/proc/gorp-cannot-be-here"), "{err}");
}

pub(crate) const API_TOKEN: &str = "approvals-api-token-0123456789";

/// `env` with its webhook on a free port and an API token; returns the base URL.
pub(crate) fn with_http(env: &Env) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = env.config_path();
    let config = std::fs::read_to_string(&path).unwrap().replace(
        "port = 0",
        &format!("port = {port}\ntokens = [\"{API_TOKEN}\"]"),
    );
    std::fs::write(&path, config).unwrap();
    format!("http://127.0.0.1:{port}")
}

pub(crate) async fn healthy(base: &str) {
    let http = reqwest::Client::new();
    eventually(WAIT, "gorp to answer /healthz", || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// The job's approvals, newest first, read through the API.
async fn approvals_of(base: &str, job: &str) -> Vec<serde_json::Value> {
    reqwest::Client::new()
        .get(format!("{base}/api/approvals?job={job}"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Vec<serde_json::Value>>()
        .await
        .unwrap()
}

async fn pending_of(base: &str, job: &str) -> serde_json::Value {
    eventually(WAIT, "a pending approval", || async {
        approvals_of(base, job)
            .await
            .into_iter()
            .find(|a| a["state"] == "pending")
    })
    .await
}

#[tokio::test]
async fn approvals_of_a_webhook_job_from_http_and_the_cli_and_across_a_kill() {
    let env = Env::new();
    let base = with_http(&env);
    let created: serde_json::Value = serde_json::from_str(&env.ok(&[
        "--json",
        "channels",
        "add",
        "hooks",
        "--permission",
        "ask",
    ]))
    .unwrap();
    assert_eq!(created["channel"]["permission_policy"], "ask");
    let webhook = format!("{base}{}", created["webhook_url"].as_str().unwrap());
    let token = created["webhook_token"].as_str().unwrap().to_string();
    let mut server = env.start();
    healthy(&base).await;
    let http = reqwest::Client::new();
    let hook = |prompt: &str, wait: bool| {
        let url = if wait {
            format!("{webhook}?wait=30")
        } else {
            webhook.clone()
        };
        http.post(url)
            .bearer_auth(&token)
            .json(&serde_json::json!({ "prompt": prompt }))
            .send()
    };

    // `?wait` answers as soon as the job waits for a person, and says for what.
    let r = hook("@permission Run make\n@reply built", true)
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["state"], "running", "{body}");
    let job = body["job_id"].as_str().unwrap().to_string();
    let waiting = &body["pending_approvals"][0];
    assert_eq!(waiting["title"], "Run make", "{body}");
    let id = waiting["id"].as_str().unwrap().to_string();
    assert_eq!(waiting["url"], format!("/api/approvals/{id}"));
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "approvals"])).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(env.ok(&["approvals"]).contains("Run make"));
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("gorp_approvals_pending 1"), "{metrics}");

    // Bad input: a clear error, and the approval is untouched.
    let before = approvals_of(&base, &job).await;
    let out = env.run(&["approve", "ffffffffffff"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("no approval"), "{}", stderr(&out));
    let out = env.run(&["approve", &id, "--option", "bogus"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("did not offer"), "{}", stderr(&out));
    let out = env.run(&["approve", "not-hex!"]);
    assert_eq!(code(&out), 3);
    let post = |path: String, body: &'static str, auth: bool| {
        let mut r = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if auth {
            r = r.bearer_auth(API_TOKEN);
        }
        r.send()
    };
    let url = format!("/api/approvals/{id}");
    for (body, auth, want) in [
        (r#"{"decision": "allow"}"#, false, 401),
        (r#"{"decision": "maybe"}"#, true, 400),
        (r#"{}"#, true, 400),
        (r#"{"decision": "allow", "option_id": "allow"}"#, true, 400),
        (r#"{"option_id": "nope"}"#, true, 400),
        (r#"{"decision": "allow""#, true, 400),
        (r#"{"decision": "allow", "extra": 1}"#, true, 400),
    ] {
        let r = post(url.clone(), body, auth).await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let r = post(
        "/api/approvals/ffffffffffffffff".into(),
        r#"{"decision": "allow"}"#,
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(approvals_of(&base, &job).await, before, "nothing written");

    // The CLI decides; the running gorp answers the agent.
    let out = env.ok(&["approve", &id[..10]]);
    assert!(out.contains("allowed"), "{out}");
    let out = env.run(&["deny", &id]);
    assert_eq!(code(&out), 2, "already decided");
    assert!(stderr(&out).contains("already allowed"), "{}", stderr(&out));
    let store = env.store().await;
    let done = eventually(WAIT, "the job to finish", || async {
        store
            .job_get(&job)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        store.job_output(&job).await.unwrap(),
        "permission: allowbuilt"
    );
    let a = &approvals_of(&base, &job).await[0];
    assert_eq!(a["decided_via"], "cli");
    assert!(a["decided_by"].as_str().unwrap().starts_with("cli:"));

    // HTTP decides the next one; a second decision is 409.
    let r = hook("@permission Run deploy\n@reply stopped", false)
        .await
        .unwrap();
    let job2 = r.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = pending_of(&base, &job2).await;
    let url = format!("/api/approvals/{}", a["id"].as_str().unwrap());
    let r = post(url.clone(), r#"{"decision": "deny", "by": "ci-bot"}"#, true)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let decided: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (decided["state"].as_str(), decided["decided_by"].as_str()),
        (Some("denied"), Some("ci-bot"))
    );
    let r = post(url, r#"{"decision": "allow"}"#, true).await.unwrap();
    assert_eq!(r.status(), 409);
    let done = eventually(WAIT, "the second job to finish", || async {
        store
            .job_get(&job2)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(
        store.job_output(&job2).await.unwrap(),
        "permission: rejectstopped"
    );

    // gorp is killed while a request waits: it expires, the job runs again and asks again.
    let r = hook("@permission Run migrate\n@reply migrated", false)
        .await
        .unwrap();
    let job3 = r.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = pending_of(&base, &job3).await;
    server.signal(libc::SIGKILL);
    assert!(!std::mem::replace(&mut server, env.start()).wait().success());
    healthy(&base).await;
    let second = eventually(WAIT, "the re-run to ask again", || async {
        approvals_of(&base, &job3)
            .await
            .into_iter()
            .find(|a| a["state"] == "pending" && a["attempt"] == 2)
    })
    .await;
    let expired = approvals_of(&base, &job3)
        .await
        .into_iter()
        .find(|a| a["id"] == first["id"])
        .unwrap();
    assert_eq!(expired["state"], "expired");
    assert_eq!(expired["decided_via"], "restart");
    env.ok(&["approve", second["id"].as_str().unwrap()]);
    let done = eventually(WAIT, "the re-run to finish", || async {
        store
            .job_get(&job3)
            .await
            .unwrap()
            .filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(done.attempt, 2);
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("gorp_approvals_pending 0"), "{metrics}");
    assert!(
        metrics.contains("gorp_approval_decisions_total{outcome=\"allowed\",via=\"cli\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gorp_approval_wait_seconds_bucket"),
        "{metrics}"
    );
    assert_eq!(
        store.job_output(&job3).await.unwrap(),
        "permission: allowmigrated"
    );

    // Policies and rules from the CLI.
    assert!(env
        .ok(&["channels", "set", "hooks", "--permission", "deny"])
        .contains("deny"));
    let out = env.run(&["channels", "set", "nope", "--permission", "deny"]);
    assert_eq!(code(&out), 3);
    let out = env.run(&["channels", "set", "hooks", "--permission", "maybe"]);
    assert_eq!(code(&out), 2);
    assert!(env.ok(&["rules", "hooks"]).contains("no rules"));
    let out = env.run(&["rules", "hooks", "rm", "1"]);
    assert_eq!(code(&out), 3);
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    store.close().await;
}

#[tokio::test]
async fn questions_of_a_webhook_job_are_answered_over_http_and_from_the_cli() {
    let env = Env::new();
    let base = with_http(&env);
    let created: serde_json::Value = serde_json::from_str(&env.ok(&[
        "--json",
        "channels",
        "add",
        "asked",
        "--permission",
        "ask",
    ]))
    .unwrap();
    let webhook = format!("{base}{}", created["webhook_url"].as_str().unwrap());
    let token = created["webhook_token"].as_str().unwrap().to_string();
    let server = env.start();
    healthy(&base).await;
    let http = reqwest::Client::new();
    let hook = |prompt: &str, wait: bool| {
        let url = if wait {
            format!("{webhook}?wait=30")
        } else {
            webhook.clone()
        };
        http.post(url)
            .bearer_auth(&token)
            .json(&serde_json::json!({ "prompt": prompt }))
            .send()
    };
    let store = env.store().await;
    let finished = |job: String| {
        let store = &store;
        async move {
            eventually(WAIT, "the job to finish", || async {
                store
                    .job_get(&job)
                    .await
                    .unwrap()
                    .filter(|j| j.state.is_terminal())
            })
            .await
        }
    };

    // `?wait` says the job waits for an answer to a question.
    let r = hook("@ask Which region? | eu | us\n@reply set", true)
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["state"], "running", "{body}");
    let job = body["job_id"].as_str().unwrap().to_string();
    let waiting = &body["pending_approvals"][0];
    assert_eq!(waiting["request"], "question", "{body}");
    assert_eq!(waiting["title"], "Which region?");
    let id = waiting["id"].as_str().unwrap().to_string();
    let listed: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!(
            "{base}/api/approvals?state=pending&request=question"
        ))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0]["input"]["requestedSchema"]["properties"]["choice"]["oneOf"][0]["const"],
        "eu"
    );
    assert!(env
        .ok(&["approvals", "--request", "question"])
        .contains("Which region?"));

    // Bad answers are refused and write nothing.
    let before = approvals_of(&base, &job).await;
    let url = format!("{base}/api/approvals/{id}");
    for body in [
        r#"{"answer": {"choice": "mars"}}"#,
        r#"{"answer": {"planet": "eu"}}"#,
        r#"{"answer": "eu"}"#,
        r#"{"answer": {"choice": "eu"}, "decision": "deny"}"#,
        r#"{"decision": "allow"}"#,
        r#"{"option_id": "allow"}"#,
    ] {
        let r = http
            .post(&url)
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let out = env.run(&["answer", &id, "choice=mars"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not fit the question"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["approve", &id]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("is a question"), "{}", stderr(&out));
    assert_eq!(approvals_of(&base, &job).await, before, "nothing written");

    // HTTP answers it; a second answer is 409.
    let r = http
        .post(&url)
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({ "answer": { "choice": "us", "note": "close to users" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a: serde_json::Value = r.json().await.unwrap();
    assert_eq!(a["state"], "answered");
    assert_eq!(a["answer"]["choice"], "us");
    let r = http
        .post(&url)
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({ "decision": "deny" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let done = finished(job.clone()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        store.job_output(&job).await.unwrap(),
        r#"ask: accept {"choice":"us","note":"close to users"}set"#
    );

    // The CLI answers the next one by the choice's number; `deny` declines the third.
    let r = hook("@ask Which region? | eu | us\n@reply set", false)
        .await
        .unwrap();
    let job2 = r.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let q = pending_of(&base, &job2).await;
    let out = env.ok(&["answer", q["id"].as_str().unwrap(), "1"]);
    assert!(out.contains("answered"), "{out}");
    finished(job2.clone()).await;
    assert_eq!(
        store.job_output(&job2).await.unwrap(),
        r#"ask: accept {"choice":"eu"}set"#
    );
    let a = &approvals_of(&base, &job2).await[0];
    assert_eq!(a["decided_via"], "cli");
    let r = hook("@ask Anything to add?\n@reply set", false)
        .await
        .unwrap();
    let job3 = r.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let q = pending_of(&base, &job3).await;
    assert!(env
        .ok(&["deny", q["id"].as_str().unwrap()])
        .contains("declined"));
    finished(job3.clone()).await;
    assert_eq!(store.job_output(&job3).await.unwrap(), "ask: declineset");
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    store.close().await;
}

#[tokio::test]
async fn sandbox_settings_are_checked_and_shown_by_doctor_channels_and_login() {
    // Bad sandbox settings: a clear error naming the key, exit 78, nothing written.
    for (line, want) in [
        (
            "extra_writable = [\"relative/dir\"]",
            "expected absolute paths",
        ),
        ("extra_writable = [\"/no/such/gorp/dir\"]", "does not exist"),
        ("extra_writable = [\"/\"]", "holds gorp's database"),
        ("deny_read = [\"gorp.db\"]", "expected absolute paths"),
        (
            "allowed_ports = [443, 0]",
            "expected TCP ports from 1 to 65535",
        ),
        ("sandbox = \"bubblewrap\"", "landlock"),
        ("[budget]\njob_max_cost_usd = -1", "budget.job_max_cost_usd"),
        ("[budget]\njob_max_tokens = 0", "budget.job_max_tokens"),
        (
            "[budget]\ndaily_max_cost_usd = -0.01",
            "budget.daily_max_cost_usd",
        ),
        (
            "[budget]\nmonthly_max_cost_usd = nan",
            "budget.monthly_max_cost_usd",
        ),
        (
            "[budget]\ndaily_max_cost_usd = \"5\"",
            "budget.daily_max_cost_usd",
        ),
    ] {
        let env = Env::new();
        let path = env.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = if line.starts_with("[budget]") {
            format!("{text}\n{line}\n")
        } else if line.starts_with("extra_writable") {
            text.lines()
                .map(|l| {
                    if l.starts_with("extra_writable") {
                        line
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            text.replace("state_path =", &format!("{line}\nstate_path ="))
        };
        std::fs::write(&path, text).unwrap();
        for args in [&["config", "check"][..], &["jobs"][..]] {
            let out = env.run(args);
            assert_eq!(code(&out), 78, "{line}: {}", stderr(&out));
            assert!(stderr(&out).contains(want), "{line}: {}", stderr(&out));
        }
        assert!(!env.dir.path().join("gorp.db").exists(), "nothing written");
    }

    let env = Env::new();
    let out = env.ok(&["doctor"]);
    assert!(out.contains("the kernel supports Landlock ABI"), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "doctor"])).unwrap();
    assert!(doc["landlock_abi"].as_i64().unwrap() >= 1, "{doc}");
    assert_eq!(doc["ok"], true);

    // Per-channel settings from the CLI.
    let created: serde_json::Value = serde_json::from_str(&env.ok(&[
        "--json",
        "channels",
        "add",
        "boxed",
        "--sandbox",
        "none",
        "--allowed-ports",
        "443,8443",
    ]))
    .unwrap();
    assert_eq!(created["channel"]["sandbox"], "none");
    assert_eq!(created["channel"]["allowed_ports"], "[443,8443]");
    let out = env.ok(&[
        "channels",
        "set",
        "boxed",
        "--sandbox",
        "default",
        "--allowed-ports",
        "any",
    ]);
    assert!(out.contains("sandbox landlock (from [acp])"), "{out}");
    assert!(out.contains("allowed ports any"), "{out}");
    let out = env.ok(&["channels", "set", "boxed", "--sandbox", "landlock"]);
    assert!(out.contains("sandbox landlock,"), "{out}");
    let out = env.ok(&["channels", "set", "boxed", "--budget-job-usd", "2.5"]);
    assert!(
        out.contains("per-job budget 2.5 USD / no token limit"),
        "{out}"
    );
    let out = env.ok(&[
        "channels",
        "set",
        "boxed",
        "--budget-day-usd",
        "20",
        "--budget-month-usd",
        "300",
    ]);
    assert!(out.contains("per day 20 USD, per month 300 USD"), "{out}");
    let out = env.ok(&["channels", "set", "boxed", "--budget-month-usd", "default"]);
    assert!(
        out.contains("per day 20 USD, per month no monthly budget"),
        "{out}"
    );
    let usage = env.ok(&["usage", "--channel", "boxed"]);
    assert!(
        usage.contains("budget of boxed: today: $0.0000 of $20.00 (until ")
            && usage.contains("this month: $0.0000, no budget"),
        "{usage}"
    );
    let jobs_before = env.ok(&["--json", "jobs"]);
    for (args, want) in [
        (&["channels", "set", "boxed", "--allowed-ports", "0"][..], 2),
        (
            &["channels", "set", "boxed", "--allowed-ports", "http"][..],
            2,
        ),
        (&["channels", "set", "boxed", "--sandbox", "jail"][..], 2),
        (&["channels", "set", "boxed"][..], 2),
        (&["channels", "set", "nope", "--sandbox", "none"][..], 3),
        (
            &["channels", "set", "boxed", "--budget-job-usd", "-1"][..],
            2,
        ),
        (
            &["channels", "set", "boxed", "--budget-job-usd", "lots"][..],
            2,
        ),
        (
            &["channels", "set", "boxed", "--budget-job-tokens", "0"][..],
            2,
        ),
        (
            &["channels", "set", "boxed", "--budget-day-usd", "-5"][..],
            2,
        ),
        (
            &["channels", "set", "boxed", "--budget-month-usd", "1e9"][..],
            2,
        ),
        (&["channels", "set", "nope", "--budget-day-usd", "5"][..], 3),
        (&["enqueue", "boxed", "x", "--max-cost-usd", "-2"][..], 2),
        (&["enqueue", "boxed", "x", "--timeout-secs", "0"][..], 2),
        (&["channels", "add", "x", "--allowed-ports", "70000"][..], 2),
    ] {
        let out = env.run(args);
        assert_eq!(code(&out), want, "{args:?}: {}", stderr(&out));
    }

    assert_eq!(
        env.ok(&["--json", "jobs"]),
        jobs_before,
        "refused enqueues wrote nothing"
    );
    // `channels login` prints the agent's HOME and TMPDIR, or runs a command with them.
    let out = env.ok(&["channels", "login", "boxed"]);
    let home = env.dir.path().join("agents/boxed/home");
    assert!(out.contains(&format!("HOME={}", home.display())), "{out}");
    env.ok(&[
        "channels",
        "login",
        "boxed",
        "--",
        "sh",
        "-c",
        "echo \"$HOME\" > \"$TMPDIR/where\"",
    ]);
    let written = std::fs::read_to_string(env.dir.path().join("agents/boxed/tmp/where")).unwrap();
    assert_eq!(written.trim(), home.display().to_string());
    let out = env.run(&["channels", "login", "boxed", "--", "false"]);
    assert_eq!(code(&out), 1);
    let out = env.run(&["channels", "login", "nope"]);
    assert_eq!(code(&out), 3);
}

#[tokio::test]
async fn usage_is_reported_by_the_cli_the_api_and_the_metrics() {
    let env = Env::new();
    let base = with_http(&env);
    env.ok(&["channels", "add", "spend"]);
    env.ok(&["channels", "add", "quiet"]);
    let server = env.start();
    healthy(&base).await;
    for prompt in [
        "@usage in=10 out=20 cost=0.5\n@reply a",
        "@usage in=1 out=2 cost=0.25\n@reply b",
    ] {
        let out = env.run(&["enqueue", "spend", prompt, "--wait"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let out = env.ok(&["usage"]);
    assert!(out.contains("spend") && out.contains("0.7500"), "{out}");
    assert!(!out.contains("quiet"), "no usage, no row: {out}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "usage", "--by", "source", "--since", "1d"]))
            .unwrap();
    assert_eq!(json["rows"][0]["key"], "cli");
    assert_eq!(json["total"]["jobs"], 2);
    assert_eq!(json["total"]["input_tokens"], 11);
    for args in [
        &["usage", "--since", "yesterday"][..],
        &["usage", "--since", "-3d"][..],
        &["usage", "--by", "week"][..],
    ] {
        let out = env.run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
    }
    let http = reqwest::Client::new();
    let api: serde_json::Value = http
        .get(format!("{base}/api/usage?by=day&channel=spend"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["rows"].as_array().unwrap().len(), 1, "{api}");
    assert!((api["total"]["cost_usd"].as_f64().unwrap() - 0.75).abs() < 1e-9);
    let r = http
        .get(format!("{base}/api/usage?since=forever"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gorp_agent_cost_usd_total{channel=\"spend\"} 0.75"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gorp_agent_tokens_total{channel=\"spend\",kind=\"output\"} 22"),
        "{metrics}"
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
}

/// Every command and flag explains itself, and a flag that takes one of a fixed set of values
/// lists them.
#[test]
fn every_command_and_flag_has_help_and_lists_its_values() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() {
                missing.push(format!("{path} <{id}>"));
            }
        }
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_name() != "help" {
                missing.push(format!("{name} (no description)"));
            }
            walk(sub, &name, missing);
        }
    }
    let mut missing = Vec::new();
    walk(&gorp::cli::Cli::command(), "gorp", &mut missing);
    assert!(missing.is_empty(), "without help text: {missing:#?}");

    let env = Env::new();
    let help = env.ok(&["jobs", "--help"]);
    for want in [
        "[possible values: queued, running, succeeded, failed, cancelled]",
        "[possible values: webhook, matrix, schedule, cli]",
    ] {
        assert!(help.contains(want), "{help}");
    }
    // A value outside the set is refused with the set.
    let out = env.run(&["jobs", "--state", "done"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("possible values: queued"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn completions_and_the_version_name_the_build() {
    let env = Env::new();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef gorp"),
        ("fish", "complete -c gorp"),
    ] {
        let script = env.ok(&["completions", shell]);
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(200)]
        );
        assert!(script.contains("enqueue"), "{shell}");
    }
    assert_eq!(code(&env.run(&["completions", "tcsh"])), 2);
    let version = env.ok(&["--version"]);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    assert!(
        version.starts_with(&format!("gorp {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    if let Some(commit) = commit {
        assert!(version.contains(&commit), "{version} names {commit}");
    }
}

/// `env` with the script agent offering `model` (fast, smart) and `effort` (low, high).
fn with_options(env: &Env) {
    let path = env.config_path();
    let config = std::fs::read_to_string(&path).unwrap().replace(
        "agent_args = [",
        r#"agent_args = ["--option", "model=fast,smart", "--option", "effort=low,high", "#,
    );
    std::fs::write(&path, config).unwrap();
}

/// The channel's options as `gorp channels options --json` shows them.
fn options_json(env: &Env, channel: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["--json", "channels", "options", channel])).unwrap()
}

#[tokio::test]
async fn session_options_are_set_checked_and_shown_by_the_cli() {
    let env = Env::new();
    with_options(&env);
    env.ok(&["channels", "add", "c"]);

    // Before the agent has run, an option is taken as text and shown as set.
    env.ok(&["channels", "set", "c", "--option", "model=smart"]);
    let out = env.ok(&["channels", "options", "c"]);
    assert!(out.contains("its agent has not run yet"), "{out}");
    assert!(out.contains("set for the channel: model=smart"), "{out}");
    let view = options_json(&env, "c");
    assert_eq!(view["offered"], serde_json::Value::Null, "{view}");
    assert_eq!(view["set"], serde_json::json!({"model": "smart"}));

    let server = env.start();
    let out = env.run(&["enqueue", "c", "@options", "--wait"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "options: effort=low model=smart"
    );

    // Now the agent has said what it offers.
    let view = options_json(&env, "c");
    let offered = view["offered"].as_array().expect("offered after a run");
    let values = |id: &str| {
        offered
            .iter()
            .find(|o| o["id"] == id)
            .unwrap_or_else(|| panic!("{id} offered: {view}"))["values"]
            .clone()
    };
    assert_eq!(values("model"), serde_json::json!(["fast", "smart"]));
    assert_eq!(values("effort"), serde_json::json!(["low", "high"]));
    assert_eq!(
        view["agent"]["agent"]["name"], "gorp-script-agent",
        "{view}"
    );
    let out = env.ok(&["channels", "options", "c"]);
    assert!(
        out.contains("[fast, smart]  set: smart") && out.contains("[low, high]"),
        "{out}"
    );

    // A job's own option holds for its turn, over the channel's.
    let out = env.run(&[
        "enqueue",
        "c",
        "@options",
        "--option",
        "effort=high",
        "--wait",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "options: effort=high model=smart"
    );

    // A value the agent does not offer: refused with the values, nothing written.
    let out = env.run(&["channels", "set", "c", "--option", "model=huge"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"huge\"") && stderr(&out).contains("values: fast, smart"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        options_json(&env, "c")["set"],
        serde_json::json!({"model": "smart"}),
        "unchanged"
    );
    let jobs = count_jobs(env.dir.path()).await;
    for bad in ["colour=red", "model=huge", "model"] {
        let out = env.run(&["enqueue", "c", "x", "--option", bad]);
        assert_eq!(code(&out), 2, "{bad}: {}", stderr(&out));
    }
    let out = env.run(&["enqueue", "c", "x", "--option", "colour=red"]);
    assert!(
        stderr(&out).contains("no option \"colour\"") && stderr(&out).contains("model"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count_jobs(env.dir.path()).await, jobs, "no job written");

    // Unset: the next turn runs with the agent's own model again.
    env.ok(&["channels", "set", "c", "--unset-option", "model"]);
    assert_eq!(options_json(&env, "c")["set"], serde_json::json!({}));
    let out = env.run(&["enqueue", "c", "@options", "--wait"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "options: effort=low model=fast"
    );
    let out = env.run(&["channels", "options", "nope"]);
    assert_eq!(code(&out), 3);
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
}

#[tokio::test]
async fn mcp_servers_and_directories_are_managed_by_the_cli_and_secrets_never_shown() {
    let env = Env::new();
    env.ok(&["channels", "add", "c"]);
    let db = || async {
        let store = env.store().await;
        let ch = store.channel_get("c").await.unwrap().unwrap();
        store.close().await;
        ch
    };

    let out = env.ok(&[
        "channels",
        "mcp",
        "c",
        "add",
        "search",
        "--url",
        "http://127.0.0.1:9/mcp",
        "--header",
        "Authorization=Bearer s3cret",
    ]);
    assert!(
        out.contains("search  http  http://127.0.0.1:9/mcp"),
        "{out}"
    );
    assert!(
        db().await.mcp_servers.contains("Bearer s3cret"),
        "stored as given"
    );
    for args in [
        &["channels", "mcp", "c"][..],
        &["--json", "channels", "mcp", "c"],
        &["channels", "list"],
        &["--json", "channels", "list"],
    ] {
        let out = env.ok(args);
        assert!(!out.contains("s3cret"), "{args:?}: {out}");
    }
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "channels", "list"])).unwrap();
    assert_eq!(
        listed[0]["mcp_servers"][0]["headers"]["Authorization"], "********",
        "{listed}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "channels", "mcp", "c"])).unwrap();
    assert_eq!(shown[0]["headers"]["Authorization"], "********", "{shown}");

    // Bad servers write nothing.
    let before = db().await;
    for args in [
        &["channels", "mcp", "c", "add", "bad", "--url", "ftp://x"][..],
        &[
            "channels", "mcp", "c", "add", "bad", "--url", "http://x", "--header", "nothing",
        ],
        &["channels", "mcp", "c", "add", "bad"],
    ] {
        let out = env.run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
    }
    assert_eq!(db().await, before, "nothing written");

    // Directories: absolute and existing only.
    let extra = env.dir.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let extra = std::fs::canonicalize(&extra).unwrap();
    for bad in ["relative/dir", "/no/such/gorp/dir"] {
        let out = env.run(&["channels", "set", "c", "--add-dir", bad]);
        assert_eq!(code(&out), 2, "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains(bad), "{}", stderr(&out));
    }
    assert_eq!(db().await, before, "nothing written");
    env.ok(&["channels", "set", "c", "--add-dir", extra.to_str().unwrap()]);
    assert_eq!(db().await.directories(), vec![extra.clone()]);

    // The agent's sessions get both.
    let server = env.start();
    let out = env.run(&["enqueue", "c", "@setup", "--wait"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let setup = String::from_utf8_lossy(&out.stdout);
    assert!(
        setup.contains(r#""mcp_servers":["http:search"]"#),
        "{setup}"
    );
    assert!(
        setup.contains(&serde_json::to_string(&vec![&extra]).unwrap()),
        "{setup}"
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());

    env.ok(&[
        "channels",
        "set",
        "c",
        "--remove-dir",
        extra.to_str().unwrap(),
    ]);
    assert!(db().await.directories().is_empty());
    let out = env.ok(&["channels", "mcp", "c", "rm", "search"]);
    assert!(out.contains("no MCP servers of its own"), "{out}");
    assert_eq!(db().await.mcp_servers, "[]");
    let out = env.run(&["channels", "mcp", "c", "rm", "nope"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no MCP server \"nope\""),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["channels", "mcp", "nope"]);
    assert_eq!(code(&out), 3);
}

/// A port still held when gorp starts (as by an agent gorp was starting when it was killed,
/// which keeps a copy of the listening socket until its `exec`) is tried again: gorp starts
/// serving once the port is free instead of exiting at once.
#[tokio::test]
async fn start_waits_for_a_port_that_frees_up_instead_of_exiting() {
    use std::io::BufRead;
    let env = Env::new();
    let base = with_http(&env);
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut child = env
        .cmd(&["start"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("the port is in use; trying again") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT)
        .expect("gorp says it is trying the busy port again");
    assert!(child.try_wait().unwrap().is_none(), "gorp is still running");
    drop(held);
    let server = Server { child };
    healthy(&base).await;
    drop(server);
}
