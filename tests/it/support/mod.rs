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

/// A fresh database in its own temp directory.
pub struct Setup {
    pub dir: TempDir,
    pub db: DatabaseConfig,
    pub store: Store,
}

pub async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = DatabaseConfig {
        path: dir.path().join("gorp.db"),
        ..DatabaseConfig::default()
    };
    let store = Store::open(&db).await.expect("open store");
    Setup { dir, db, store }
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
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(self.store.read_pool())
            .await
            .expect("count")
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
