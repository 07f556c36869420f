//! Shared setup for the integration tests.

#![allow(dead_code)]

pub mod browser;
pub mod claude_env;
pub mod codex_env;
pub mod fake_anthropic;
pub mod fake_gemini;
pub mod fake_openai;
pub mod gemini_env;
pub mod synapse;

use std::future::Future;
use std::time::Duration;

use gorp::config::DatabaseConfig;
use gorp::store::{now_ms, Channel, NewChannel, Store};
use tempfile::TempDir;

/// A fresh database in its own temp directory: an SQLite file there, or, when the
/// environment says `TEST_BACKEND=postgres`, a new database of its own on the PostgreSQL
/// cluster of `scripts/setup-postgres` (the conformance run: the same tests on both backends).
pub struct Setup {
    pub dir: TempDir,
    pub db: DatabaseConfig,
    pub store: Store,
    /// The PostgreSQL database made for this test, dropped with it.
    pub pg: Option<TestPg>,
}

/// Which backend the conformance tests run on.
pub fn on_postgres() -> bool {
    std::env::var("TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The test cluster's URL (`TEST_POSTGRES_URL`, else the cluster `scripts/setup-postgres`
/// starts or finds running, once per test binary). A missing PostgreSQL fails the test.
pub fn pg_server_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TEST_POSTGRES_URL") {
            return url;
        }
        let repo = env!("CARGO_MANIFEST_DIR");
        let out = std::process::Command::new(format!("{repo}/scripts/setup-postgres"))
            .current_dir(repo)
            .output()
            .expect("run scripts/setup-postgres");
        assert!(
            out.status.success(),
            "scripts/setup-postgres failed (it installs Debian's postgresql when missing): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A database of its own on the test cluster, dropped (connections and all) when dropped.
pub struct TestPg {
    /// The cluster's URL (its default database), for administration.
    pub server: String,
    pub name: String,
    pub url: String,
}

impl TestPg {
    /// A new, empty database on the test cluster ([`pg_server_url`]).
    pub async fn new() -> TestPg {
        use sqlx::Connection;
        let server = pg_server_url().to_string();
        let name = format!("it_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&server)
            .await
            .expect("connect to the test cluster");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let _ = admin.close().await;
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        TestPg { server, name, url }
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        // Synchronously (Drop cannot await): psql ends the test's connections and drops it.
        let _ = std::process::Command::new("psql")
            .args([
                self.server.as_str(),
                "-X",
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

pub async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = if on_postgres() {
        Some(TestPg::new().await)
    } else {
        None
    };
    let db = DatabaseConfig {
        path: dir.path().join("gorp.db"),
        url: pg.as_ref().map(|p| p.url.clone()),
        ..DatabaseConfig::default()
    };
    let store = Store::open(&db).await.expect("open store");
    Setup { dir, db, store, pg }
}

impl Setup {
    /// A second, independent handle on the same file (another "process").
    pub async fn other_store(&self) -> Store {
        Store::open(&self.db).await.expect("open second store")
    }

    pub async fn channel(&self, name: &str) -> Channel {
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
    }

    /// Row count of a table, read through a plain connection.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        let mut conn = self.raw().await;
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .expect("count")
    }

    /// A plain connection to the test's database, whichever backend it is on, for reading
    /// and changing rows behind the store's back. Write SQL for it with [`Setup::sql`].
    pub async fn raw(&self) -> sqlx::AnyConnection {
        raw_conn(&self.db).await
    }

    /// `sql` with SQLite's `?N` parameters as PostgreSQL's `$N` when the test runs there.
    pub fn sql(&self, sql: &str) -> String {
        sql_for(&self.db, sql)
    }
}

/// A plain connection to the database of `db` (its PostgreSQL URL, else its SQLite file).
pub async fn raw_conn(db: &DatabaseConfig) -> sqlx::AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let url = match &db.url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", db.path.display()),
    };
    sqlx::AnyConnection::connect(&url)
        .await
        .expect("connect to the test database")
}

/// `sql` with SQLite's `?N` parameters as PostgreSQL's `$N` when `db` is on PostgreSQL.
pub fn sql_for(db: &DatabaseConfig, sql: &str) -> String {
    if db.url.is_some() {
        sql.replace('?', "$")
    } else {
        sql.to_string()
    }
}

/// Points `db` at a new database on the test cluster when the run is on PostgreSQL. The
/// database outlives the test (a restarted gorp reuses it); `scripts/test` starts each run
/// on a fresh cluster.
pub async fn use_test_backend(db: &mut DatabaseConfig) {
    if on_postgres() {
        let pg = TestPg::new().await;
        db.url = Some(pg.url.clone());
        std::mem::forget(pg);
    }
}

/// Polls `check` every 10 ms until it yields `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
