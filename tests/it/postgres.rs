//! `[database] url` on a real PostgreSQL (the throwaway cluster of `scripts/setup-postgres`):
//! `gorp migrate` builds the schema and says which backend it used, `gorp doctor` reads it,
//! `gorp start` runs jobs there and the CLI enqueues and waits on them; and the bad inputs the issue
//! names — an unreachable server, wrong credentials, a database of a newer schema, a URL that
//! is no PostgreSQL URL — each get a clear message and exit code, nothing written.

use crate::cli::Env;
use crate::support::TestPg;

/// A new, empty database on the test cluster; its URL. It outlives the test (`scripts/test`
/// drops what a run leaves).
async fn fresh_database() -> String {
    let pg = TestPg::new().await;
    let url = pg.url.clone();
    std::mem::forget(pg);
    url
}

async fn table_count(url: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    n
}

/// `env` with `[database] url = url`.
fn on_postgres(env: &Env, url: &str) {
    let path = env.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("[database]\n", &format!("[database]\nurl = \"{url}\"\n"), 1);
    std::fs::write(&path, text).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn migrate_builds_the_schema_doctor_reads_it_and_start_runs_jobs_there() {
    let url = fresh_database().await;
    let env = Env::new();
    on_postgres(&env, &url);
    assert_eq!(table_count(&url).await, 0);

    let out = env.ok(&["migrate"]);
    assert!(
        out.contains("(postgres) is at migration 16") && out.contains(":********@"),
        "{out}"
    );
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    assert!(!out.contains(password), "the password is masked: {out}");
    let tables = table_count(&url).await;
    assert!(tables >= 14, "{tables} tables");
    // Again: nothing to do, the same version.
    assert!(env.ok(&["migrate"]).contains("is at migration 16"));
    assert_eq!(table_count(&url).await, tables);

    let shown = env.ok(&["config", "check"]);
    assert!(
        shown.contains("url = \"postgres://gorp:********@"),
        "{shown}"
    );
    assert!(!shown.contains(password), "{shown}");

    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "doctor"])).unwrap();
    let find = |name: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .cloned()
            .unwrap()
    };
    let m = find("migrations");
    assert_eq!(m["status"], "ok", "{m}");
    assert!(m["detail"].as_str().unwrap().contains("(postgres)"), "{m}");
    assert_eq!(find("db writable")["status"], "ok");

    // The whole path on PostgreSQL: a channel, a running gorp, a job enqueued by the CLI and
    // waited for, its output read back.
    env.ok(&["channels", "add", "alpha"]);
    let server = env.start();
    let out = env.run(&[
        "enqueue",
        "alpha",
        "@chunks 3\n@reply on postgres",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on postgres");
    let jobs: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "jobs", "--channel", "alpha"])).unwrap();
    assert_eq!(jobs[0]["state"], "succeeded", "{jobs}");
    drop(server);
    assert!(
        !env.dir.path().join("gorp.db").exists(),
        "no SQLite file written"
    );
}

#[tokio::test]
async fn bad_database_urls_get_a_clear_message_and_write_nothing() {
    let url = fresh_database().await;
    let (scheme_user, host_db) = url.rsplit_once('@').unwrap();
    let user = scheme_user.rsplit_once(':').unwrap().0;

    // Wrong password.
    let env = Env::new();
    on_postgres(&env, &format!("{user}:not-the-password@{host_db}"));
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refused the credentials")
            && !stderr(&out).contains("not-the-password"),
        "{}",
        stderr(&out)
    );
    assert_eq!(table_count(&url).await, 0);

    // Nothing listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new();
    on_postgres(&env, &format!("postgres://gorp:pw@127.0.0.1:{free}/gorp"));
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach PostgreSQL at postgres://gorp:********@127.0.0.1"),
        "{}",
        stderr(&out)
    );

    // Not a PostgreSQL URL: a configuration error before anything is opened.
    for bad in ["mysql://u:p@h/db", "postgres://", "postgres:// spaced/db"] {
        let env = Env::new();
        on_postgres(&env, bad);
        let out = env.run(&["migrate"]);
        assert_eq!(out.status.code(), Some(78), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("database.url"), "{}", stderr(&out));
        assert!(!env.dir.path().join("gorp.db").exists());
    }

    // A database a newer gorp migrated.
    let env = Env::new();
    on_postgres(&env, &url);
    env.ok(&["migrate"]);
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations
                 (version, description, installed_on, success, checksum, execution_time)
             VALUES (99990101, 'from the future', now(), true, '\\x00', 1)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("was migrated by a newer gorp (migration 99990101"),
        "{}",
        stderr(&out)
    );
    let (doc, code) = {
        let out = env.run(&["--json", "doctor"]);
        (
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
            out.status.code(),
        )
    };
    assert_eq!(code, Some(1));
    let m = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "migrations")
        .unwrap();
    assert_eq!(m["status"], "fail", "{m}");
}

/// Errors that say the database cannot take a request now (so HTTP answers 503 and callers
/// may try again) are told apart from errors of the request, on PostgreSQL as on SQLite.
#[tokio::test]
async fn a_server_that_drops_the_connection_is_unavailable_and_a_bad_request_is_not() {
    use gorp::store::StoreError;
    use sqlx::Connection;
    let url = fresh_database().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let bad = sqlx::query("SELECT 1/0")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(StoreError::Db(bad).unavailable(), None);
    // The server ends this connection as it does when it shuts down (57P01).
    let gone = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let e = StoreError::Db(gone);
    assert_eq!(
        e.unavailable(),
        Some("the database server is not available"),
        "{e}"
    );
}
