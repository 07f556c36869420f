//! Faults under a real `gorp start` (the binary, on 127.0.0.1): the disk filling up under load
//! and another process holding the database's write lock for 10 s. For each: what a client sees
//! (503 with a JSON error, or a wait), that gorp keeps running and recovers, and that every job
//! it acknowledged with a 202 is a committed row while no refused one is.
//!
//! The full disk is a real one: the database lives on a tmpfs mounted with a small `size`, so
//! the kernel answers SQLite's writes with ENOSPC (`SQLITE_FULL`) for the WAL and the database
//! file alike, and space returns by remounting it larger while gorp runs. `PRAGMA
//! max_page_count` would not do: it is a per-connection setting, and gorp's writer connection is
//! private to its store. Mounting needs CAP_SYS_ADMIN (CI runs as root); without it the test
//! fails and says so, it is never skipped.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

const GORP: &str = env!("CARGO_BIN_EXE_gorp");
const TOKEN: &str = "faults-api-token-0123456789";
/// How long another process holds the write lock.
const HOLD: Duration = Duration::from_secs(10);

/// A `gorp start` child process with its own config; killed when dropped.
struct Gorp {
    child: Child,
    base: String,
    db: PathBuf,
    log: PathBuf,
    http: reqwest::Client,
}

impl Gorp {
    /// Starts gorp with its database at `db` and everything else in `dir`; `extra` is appended
    /// to the `[database]` section. Waits until `/healthz` answers.
    async fn start(dir: &Path, db: &Path, extra: &str) -> Gorp {
        let http = reqwest::Client::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.join("config.toml");
            std::fs::write(
                &config,
                format!(
                    r#"
[database]
path = "{db}"
{extra}

[workspace]
path = "{ws}"

[worker]
concurrency = 0
shutdown_grace_secs = 1

[webhook]
bind = "127.0.0.1"
port = {port}
tokens = ["{TOKEN}"]
"#,
                    db = db.display(),
                    ws = dir.join("workspace").display(),
                ),
            )
            .unwrap();
            let log = dir.join("gorp.log");
            let child = Command::new(GORP)
                .arg("start")
                .env("GORP_CONFIG_PATH", &config)
                .env("GORP_LOG", "warn")
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut g = Gorp {
                child,
                base: format!("http://127.0.0.1:{port}"),
                db: db.to_path_buf(),
                log,
                http: http.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && g.running() {
                if let Ok(r) = http.get(format!("{}/healthz", g.base)).send().await {
                    if r.status() == StatusCode::OK {
                        return g;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Most likely another process took the port first: try another.
            drop(g);
        }
        panic!("gorp did not start");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Asserts that gorp is still running and answering.
    async fn assert_alive(&mut self) {
        assert!(self.running(), "gorp exited:\n{}", self.log_text());
        let r = self
            .http
            .get(format!("{}/healthz", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // Reads keep working.
        let r = self
            .http
            .get(format!("{}/api/jobs?limit=1", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates a channel through the API; returns its webhook URL.
    async fn channel(&self, name: &str) -> String {
        let r = self
            .http
            .post(format!("{}/api/channels", self.base))
            .bearer_auth(TOKEN)
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        format!("{}{}", self.base, v["webhook_url"].as_str().unwrap())
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Gorp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client got for one webhook POST.
#[derive(Debug)]
struct Outcome {
    prompt: String,
    status: StatusCode,
    body: Value,
    at: Instant,
}

async fn post(http: &reqwest::Client, webhook: &str, prompt: String) -> Outcome {
    let r = http
        .post(webhook)
        .bearer_auth(TOKEN)
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.expect("every answer is JSON");
    Outcome {
        prompt,
        status,
        body,
        at: Instant::now(),
    }
}

/// Every job's id and prompt, read through a connection of the test's own.
async fn jobs_in(db: &Path) -> HashMap<String, String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, prompt FROM jobs")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    conn.close().await.unwrap();
    rows.into_iter().collect()
}

/// Asserts that every 202 is a committed row with its prompt and no refused prompt is.
fn assert_nothing_acknowledged_lost(outcomes: &[Outcome], rows: &HashMap<String, String>) {
    let stored: HashSet<&str> = rows.values().map(String::as_str).collect();
    for o in outcomes {
        if o.status == StatusCode::ACCEPTED {
            let id = o.body["job_id"].as_str().unwrap();
            assert_eq!(
                rows.get(id).map(String::as_str),
                Some(o.prompt.as_str()),
                "acknowledged job {id} is not in the database"
            );
        } else {
            assert!(
                !stored.contains(o.prompt.as_str()),
                "a refused request ({}) wrote its job",
                o.status
            );
        }
    }
}

fn assert_unavailable(o: &Outcome) {
    assert_eq!(o.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", o.body);
    assert_eq!(o.body["error"], "unavailable", "{:?}", o.body);
    assert!(
        o.body["message"]
            .as_str()
            .unwrap()
            .contains("nothing was written"),
        "{:?}",
        o.body
    );
}

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    target: CString,
}

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Tmpfs {
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let t = Tmpfs { target };
        t.mount_with(0, bytes).unwrap_or_else(|e| {
            panic!(
                "cannot mount a tmpfs at {}: {e}; this test needs CAP_SYS_ADMIN (run it as root)",
                path.display()
            )
        });
        t
    }

    /// Grows (or shrinks) the file system while it is in use.
    fn resize(&self, bytes: u64) {
        self.mount_with(libc::MS_REMOUNT, bytes).expect("remount");
    }

    fn mount_with(&self, flags: libc::c_ulong, bytes: u64) -> std::io::Result<()> {
        let opts = CString::new(format!("size={bytes},mode=0700")).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                self.target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                opts.as_ptr().cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: a valid path; a lazy unmount never blocks on open files.
        unsafe {
            libc::umount2(self.target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

#[tokio::test]
async fn disk_full_under_load_answers_503_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    // Declared before gorp, so gorp is stopped before the unmount.
    let disk = Tmpfs::mount(&mnt, 2 << 20);
    let mut gorp = Gorp::start(dir.path(), &mnt.join("gorp.db"), "").await;
    let webhook = gorp.channel("fill").await;

    // Eight clients enqueue 16 KiB prompts until each has been refused three times in a row.
    let pad = "x".repeat(16 * 1024);
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (http, webhook, pad) = (gorp.http.clone(), webhook.clone(), pad.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut refused = 0;
                for i in 0..400 {
                    let o = post(&http, &webhook, format!("fill {c}-{i} {pad}")).await;
                    refused = if o.status == StatusCode::ACCEPTED {
                        0
                    } else {
                        refused + 1
                    };
                    out.push(o);
                    if refused == 3 {
                        break;
                    }
                }
                out
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }
    let accepted = outcomes
        .iter()
        .filter(|o| o.status == StatusCode::ACCEPTED)
        .count();
    let refused: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.status != StatusCode::ACCEPTED)
        .collect();
    assert!(
        accepted > 10,
        "only {accepted} jobs fit before the disk was full"
    );
    assert!(refused.len() >= 24, "every client was refused three times");
    for o in &refused {
        if o.status != StatusCode::SERVICE_UNAVAILABLE {
            let log = gorp.log_text();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            panic!(
                "{} {:?}; gorp's log ends:\n{}",
                o.status,
                o.body,
                tail.join("\n")
            );
        }
        assert_unavailable(o);
    }
    assert!(
        refused
            .iter()
            .any(|o| o.body["message"].as_str().unwrap().contains("full")),
        "{:?}",
        refused[0].body
    );
    gorp.assert_alive().await;

    // Space returns: new enqueues are accepted at once, with no restart.
    disk.resize(64 << 20);
    for i in 0..5 {
        let o = post(&gorp.http, &webhook, format!("after {i}")).await;
        assert_eq!(o.status, StatusCode::ACCEPTED, "{:?}", o.body);
        outcomes.push(o);
    }
    gorp.assert_alive().await;
    let db = gorp.db.clone();
    let status = gorp.stop();
    assert!(status.success(), "gorp exited with {status}");

    let rows = jobs_in(&db).await;
    assert_nothing_acknowledged_lost(&outcomes, &rows);
    assert_eq!(
        rows.len(),
        accepted + 5,
        "rows beyond the acknowledged ones"
    );
}

/// Holds the database's write lock (`BEGIN IMMEDIATE`) from another connection for [`HOLD`],
/// as another process (a `sqlite3` shell, a backup) would. Returns when it is taken; the
/// handle resolves to the instant it was released.
async fn hold_write_lock(db: &Path) -> tokio::task::JoinHandle<Instant> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .unwrap();
    tokio::spawn(async move {
        // The fault itself: the lock is held for this long.
        tokio::time::sleep(HOLD).await;
        sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
        let released = Instant::now();
        conn.close().await.unwrap();
        released
    })
}

#[tokio::test]
async fn write_lock_held_10s_requests_wait_within_busy_timeout_and_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut gorp = Gorp::start(
        dir.path(),
        &dir.path().join("gorp.db"),
        "busy_timeout_ms = 20000",
    )
    .await;
    let webhook = gorp.channel("wait").await;

    let holder = hold_write_lock(&gorp.db).await;
    let locked_at = Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|i| tokio::spawn(post_owned(gorp.http.clone(), webhook.clone(), i)))
        .collect();
    // Reads are not blocked by a writer (WAL): the API and health answer at once.
    gorp.assert_alive().await;
    assert!(locked_at.elapsed() < HOLD / 2);
    let released = holder.await.unwrap();
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.push(c.await.unwrap());
    }
    for o in &outcomes {
        assert_eq!(o.status, StatusCode::ACCEPTED, "{:?}", o.body);
        // A 202 means committed: none could come while the other process held the lock.
        assert!(o.at >= released, "answered before the lock was released");
    }
    gorp.assert_alive().await;
    let db = gorp.db.clone();
    assert!(gorp.stop().success());
    let rows = jobs_in(&db).await;
    assert_nothing_acknowledged_lost(&outcomes, &rows);
    assert_eq!(rows.len(), outcomes.len());
}

#[tokio::test]
async fn write_lock_held_10s_past_busy_timeout_answers_503_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut gorp = Gorp::start(
        dir.path(),
        &dir.path().join("gorp.db"),
        "busy_timeout_ms = 500",
    )
    .await;
    let webhook = gorp.channel("busy").await;

    let holder = hold_write_lock(&gorp.db).await;
    let locked_at = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(post_owned(gorp.http.clone(), webhook.clone(), i)))
        .collect();
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.push(c.await.unwrap());
    }
    // Each waited out busy_timeout, then was refused while the lock was still held.
    assert!(locked_at.elapsed() < HOLD, "refusals took the whole hold");
    for o in &outcomes {
        assert_unavailable(o);
        assert!(
            o.body["message"].as_str().unwrap().contains("locked"),
            "{:?}",
            o.body
        );
    }
    // Readiness says so too, while reads keep working.
    let ready = gorp
        .http
        .get(format!("{}/readyz", gorp.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    gorp.assert_alive().await;

    holder.await.unwrap();
    for i in 10..14 {
        let o = post_owned(gorp.http.clone(), webhook.clone(), i).await;
        assert_eq!(o.status, StatusCode::ACCEPTED, "{:?}", o.body);
        outcomes.push(o);
    }
    let db = gorp.db.clone();
    assert!(gorp.stop().success());
    let rows = jobs_in(&db).await;
    assert_nothing_acknowledged_lost(&outcomes, &rows);
    assert_eq!(
        rows.len(),
        4,
        "only the requests after the release wrote rows"
    );
}

async fn post_owned(http: reqwest::Client, webhook: String, i: usize) -> Outcome {
    post(&http, &webhook, format!("prompt {i}")).await
}
