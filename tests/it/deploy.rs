//! Running gorp as a service: a backup of the live database taken with the `sqlite3` CLI
//! (`.backup` and `VACUUM INTO`) while a real `gorp start` takes webhook jobs and runs them is
//! consistent and holds every job acknowledged before the backup began, and a gorp started on
//! it serves them; a database left by an older gorp's migrations is brought up to date by the
//! current binary when it starts, and keeps its jobs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gorp::store::JobState;

use crate::acp::SCRIPT_AGENT;
use crate::cli::{healthy, with_http, Env, API_TOKEN};
use crate::support::eventually;

const WAIT: Duration = Duration::from_secs(60);
/// Channels fed at once, one webhook poster each.
const POSTERS: usize = 4;
/// Backups of each kind, taken while the posters run.
const ROUNDS: usize = 3;
/// Padding in each reply, so the database grows past a few pages while the test runs.
const PAD: usize = 2000;

/// A `gorp start` of `env`, stopped with SIGTERM (as systemd and `docker stop` do) or killed
/// when the test ends early.
struct Gorp(std::process::Child);

impl Gorp {
    fn start(env: &Env) -> Gorp {
        let child = env
            .cmd(&["start"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Gorp(child)
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        self.0.wait().unwrap()
    }
}

impl Drop for Gorp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sqlite3 -bail <db> <sql…>` with a busy timeout; returns stdout, failing on an error.
async fn sqlite3(db: &Path, sql: &[&str]) -> String {
    let out = tokio::process::Command::new("sqlite3")
        .arg("-bail")
        .args(["-cmd", ".timeout 10000"])
        .arg(db)
        .args(sql)
        .output()
        .await
        .expect("sqlite3 (the SQLite command-line shell) is installed");
    assert!(
        out.status.success(),
        "sqlite3 {} {sql:?} failed: {}{}",
        db.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The reply a poster's job `n` asks for; the job's output must be exactly this.
fn reply(poster: usize, n: usize) -> String {
    format!("r-{poster}-{n}-{}", "x".repeat(PAD))
}

/// What the posters have been told: job ids answered `202`, in the order the answers came.
type Acked = Arc<Mutex<Vec<String>>>;

/// Posts prompts to one channel's webhook until `stop`, recording each acknowledged job.
async fn post_until(
    base: String,
    webhook: String,
    poster: usize,
    acked: Acked,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let prompt = format!("@reply {}", reply(poster, n));
        let r = http
            .post(format!("{base}/webhook/session/{webhook}"))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({ "prompt": prompt }))
            .send()
            .await
            .expect("webhook request");
        assert_eq!(r.status(), 202, "webhook answer");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["created"], true);
        acked
            .lock()
            .unwrap()
            .push(v["job_id"].as_str().unwrap().to_string());
        n += 1;
    }
}

/// A directory with a config for a gorp on a copy of the database: no worker (it only
/// serves what is there), its own HTTP port and API token.
fn restore_env(db: &Path) -> (Env, String) {
    let env = Env::new();
    let path = env.config_path();
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            &format!("path = \"{}\"", env.dir.path().join("gorp.db").display()),
            &format!("path = \"{}\"", db.display()),
        )
        .replace("[worker]\n", "[worker]\nconcurrency = 0\n");
    assert!(config.contains(&db.display().to_string()), "{config}");
    std::fs::write(&path, config).unwrap();
    let base = with_http(&env);
    (env, base)
}

/// The ids of every job `gorp jobs` lists (all of them: the copy holds fewer than its limit).
fn listed_by_cli(env: &Env) -> HashSet<String> {
    let out = env.ok(&["jobs", "--json", "--limit", "1000"]);
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        jobs.len() < 1000,
        "the copy holds more jobs than one listing"
    );
    jobs.iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

/// The ids of every job the API lists, page by page.
async fn listed_by_api(base: &str) -> HashSet<String> {
    let http = reqwest::Client::new();
    let mut ids = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/jobs?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: serde_json::Value = http
            .get(url)
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for j in page["jobs"].as_array().unwrap() {
            ids.insert(j["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
}

/// Checks one backup: SQLite finds it sound, and it holds every job in `acked`, with the
/// output of each finished job complete (events are committed before the final state).
async fn check_backup(file: &Path, acked: &[String], what: &str) {
    assert_eq!(
        sqlite3(file, &["PRAGMA integrity_check"]).await.trim(),
        "ok",
        "{what}: integrity_check"
    );
    assert_eq!(
        sqlite3(file, &["PRAGMA foreign_key_check"]).await.trim(),
        "",
        "{what}: foreign_key_check"
    );
    // A succeeded job's output is exactly the reply its prompt asked for, never a part of it.
    let torn = sqlite3(
        file,
        &[
            "SELECT count(*) FROM job_history WHERE state = 'succeeded' \
           AND output IS NOT substr(prompt, length('@reply ') + 1)",
        ],
    )
    .await;
    assert_eq!(
        torn.trim(),
        "0",
        "{what}: succeeded jobs with incomplete output"
    );

    // Another gorp reads the copy: `gorp jobs` lists every job acknowledged before the backup.
    let copy = file.with_extension("restored.db");
    std::fs::copy(file, &copy).unwrap();
    let (env, _base) = restore_env(&copy);
    let listed = listed_by_cli(&env);
    let missing: Vec<&String> = acked.iter().filter(|id| !listed.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged jobs are not in the backup: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Backups of a live, busy gorp with the sqlite3 CLI, both ways the deploy docs give, are
/// sound and lose no acknowledged job; a gorp started on a restored copy is ready (its
/// migrations current, the file writable) and serves every job over the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite3_backups_of_a_running_gorp_hold_every_acknowledged_job() {
    let env = Env::new();
    let base = with_http(&env);
    let mut webhooks = Vec::new();
    for p in 0..POSTERS {
        let out = env.ok(&["channels", "add", &format!("ch{p}"), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        webhooks.push(v["channel"]["webhook_id"].as_str().unwrap().to_string());
    }
    let server = Gorp::start(&env);
    healthy(&base).await;

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = webhooks
        .into_iter()
        .enumerate()
        .map(|(p, w)| tokio::spawn(post_until(base.clone(), w, p, acked.clone(), stop.clone())))
        .collect();

    let db = env.dir.path().join("gorp.db");
    let backups = env.dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let mut taken: Vec<(PathBuf, Vec<String>, &str)> = Vec::new();
    let mut during = 0;
    for round in 0..ROUNDS {
        for kind in [".backup", "VACUUM INTO"] {
            let want = (taken.len() + 1) * 40;
            eventually(WAIT, "more acknowledged jobs", || async {
                (acked.lock().unwrap().len() >= want).then_some(())
            })
            .await;
            let file = backups.join(format!(
                "gorp-{round}-{}.db",
                if kind == ".backup" {
                    "backup"
                } else {
                    "vacuum"
                }
            ));
            let before = acked.lock().unwrap().clone();
            let started = Instant::now();
            if kind == ".backup" {
                sqlite3(&db, &[&format!(".backup '{}'", file.display())]).await;
            } else {
                sqlite3(&db, &[&format!("VACUUM INTO '{}'", file.display())]).await;
            }
            let after = acked.lock().unwrap().len();
            during += after - before.len();
            eprintln!(
                "{kind} #{round}: {} jobs acknowledged before it, {} while it ran ({:?})",
                before.len(),
                after - before.len(),
                started.elapsed()
            );
            taken.push((file, before, kind));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for p in posters {
        p.await.unwrap();
    }
    eprintln!("{during} jobs were acknowledged while a backup ran");
    assert!(during > 0, "the backups ran while gorp was taking jobs");

    for (file, before, kind) in &taken {
        check_backup(file, before, &format!("{kind} {}", file.display())).await;
    }

    // The last backup, restored: a gorp on it is ready and serves every job it holds.
    let (file, before, _) = taken.last().unwrap();
    let restored = env.dir.path().join("restored.db");
    std::fs::copy(file, &restored).unwrap();
    let (renv, rbase) = restore_env(&restored);
    let rserver = Gorp::start(&renv);
    healthy(&rbase).await;
    let http = reqwest::Client::new();
    let ready = http.get(format!("{rbase}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a gorp on the restored copy is ready");
    let served = listed_by_api(&rbase).await;
    assert!(
        before.iter().all(|id| served.contains(id)),
        "the API of a gorp on the restored copy lists every acknowledged job"
    );
    let in_file = sqlite3(&restored, &["SELECT count(*) FROM jobs"]).await;
    assert_eq!(served.len().to_string(), in_file.trim());
    assert!(
        rserver.terminate().success(),
        "the restored gorp stops cleanly"
    );

    // The live gorp meanwhile ran every job it acknowledged, losing none.
    let all = acked.lock().unwrap().clone();
    let store = env.store().await;
    for id in &all {
        let j = eventually(WAIT, "every acknowledged job to finish", || async {
            store
                .job_get(id)
                .await
                .unwrap()
                .filter(|j| j.state.is_terminal())
        })
        .await;
        assert_eq!(j.state, JobState::Succeeded, "job {id}");
    }
    store.close().await;
    assert!(server.terminate().success(), "graceful shutdown exits 0");
}

/// An older gorp's database (the migrations of the release before approvals, questions, the
/// sandbox, usage, budgets and the dashboard: the first six, which sqlx's checksums keep
/// unchanged), with a channel and a queued job written by it: the current `gorp start`
/// applies the rest at start, is ready, and runs the job queued before the upgrade.
#[tokio::test]
async fn a_database_from_an_older_release_is_migrated_at_start_and_keeps_its_jobs() {
    let env = Env::new();
    let base = with_http(&env);
    let db = env.dir.path().join("gorp.db");

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let old = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(repo.join("migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files[..6] {
        std::fs::copy(f, old.path().join(f.file_name().unwrap())).unwrap();
    }
    let migrator = sqlx::migrate::Migrator::new(old.path()).await.unwrap();
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let mut conn = sqlx::ConnectOptions::connect(&opts).await.unwrap();
    migrator.run(&mut conn).await.unwrap();
    sqlx::Connection::close(conn).await.unwrap();

    // What the older gorp wrote: a channel on the scripted agent and a job queued for it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let job = uuid::Uuid::new_v4().to_string();
    sqlite3(
        &db,
        &[&format!(
            "INSERT INTO channels (name, webhook_id, agent_binary, created_at) \
             VALUES ('old', 'old-webhook-id', '{SCRIPT_AGENT}', {now}); \
             INSERT INTO jobs (id, channel_id, source, prompt, run_at, created_at) \
             VALUES ('{job}', 1, 'cli', '@reply queued before the upgrade', {now}, {now});"
        )],
    )
    .await;
    let applied = sqlite3(&db, &["SELECT count(*) FROM _sqlx_migrations"]).await;
    assert_eq!(applied.trim(), "6");

    // The current binary migrates at start and runs the job.
    let server = Gorp::start(&env);
    healthy(&base).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "migrations are current once started");
    let shipped = std::fs::read_dir(repo.join("migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    let applied = sqlite3(
        &db,
        &["SELECT count(*) FROM _sqlx_migrations WHERE success"],
    )
    .await;
    assert_eq!(
        applied.trim(),
        shipped.to_string(),
        "every migration applied"
    );
    let store = env.store().await;
    let j = eventually(
        WAIT,
        "the job queued before the upgrade to finish",
        || async {
            store
                .job_get(&job)
                .await
                .unwrap()
                .filter(|j| j.state.is_terminal())
        },
    )
    .await;
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(
        store.job_output(&job).await.unwrap(),
        "queued before the upgrade"
    );
    assert!(env.ok(&["channels", "list"]).contains("old"));
    store.close().await;
    assert!(server.terminate().success());

    // The database now belongs to the new release: an older binary would refuse it (sqlx
    // finds applied migrations it does not know); going back means restoring the backup.
    let mut conn = sqlx::ConnectOptions::connect(&opts).await.unwrap();
    let err = migrator.run(&mut conn).await.unwrap_err();
    assert!(
        matches!(err, sqlx::migrate::MigrateError::VersionMissing(_)),
        "{err}"
    );
    sqlx::Connection::close(conn).await.unwrap();
}
