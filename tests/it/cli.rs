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

const GORP: &str = env!("CARGO_BIN_EXE_gorp");
const WAIT: Duration = Duration::from_secs(60);

/// A directory with a config file pointing everything inside it.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Env {
        Self::with("")
    }

    fn with(extra: &str) -> Env {
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
{extra}
"#,
            db = d.join("gorp.db").display(),
            ws = d.join("workspace").display(),
            agent = SCRIPT_AGENT,
            state = d.join("agent-state").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        Env { dir }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(GORP);
        c.args(args)
            .env("GORP_CONFIG_PATH", self.config_path())
            .env("GORP_LOG", "warn")
            .current_dir(self.dir.path());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
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

    fn start(&self) -> Server {
        let child = self
            .cmd(&["start"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Server { child }
    }

    async fn store(&self) -> Store {
        Store::open(&DatabaseConfig {
            path: self.dir.path().join("gorp.db"),
            ..Default::default()
        })
        .await
        .unwrap()
    }
}

/// A `gorp start` process, killed if the test ends early.
struct Server {
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
