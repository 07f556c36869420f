//! The dashboard's jobs page: server time (request in, whole HTML body out, through the same
//! router and middleware as `gorp start`) with 1,000 and with 1,000,000 rows of job history,
//! unfiltered, filtered by state, channel and prompt text, and a later page. Baseline in the
//! same run: the page with 1,000 rows, and the store's `job_list` alone with 1,000,000 rows.
//!
//! `cargo bench --bench dashboard` (`-- --history N --samples N` to change sizes).

#[path = "support/common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use gorp::auth::sha256_hex;
use gorp::config::{Config, DatabaseConfig};
use gorp::http::HttpState;
use gorp::store::{now_ms, DashboardSession, JobFilter, NewChannel, Store};
use sqlx::Connection;
use tower::ServiceExt;

const TOKEN: &str = "dashboard-bench-token-0123456789";
const SECRET: &str = "dashboard-bench-session-secret-0123456789";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A database with `history` finished jobs over 16 channels, and a session for [`SECRET`].
async fn database(dir: &std::path::Path, history: usize) -> (Store, DatabaseConfig) {
    let cfg = DatabaseConfig {
        path: dir.join(format!("history-{history}.db")),
        ..DatabaseConfig::default()
    };
    let store = Store::open(&cfg).await.expect("open");
    let mut first = 0;
    for i in 0..16 {
        let ch = store
            .channel_insert(
                NewChannel {
                    name: format!("ch{i:02}"),
                    ..Default::default()
                },
                now_ms(),
            )
            .await
            .expect("channel");
        if i == 0 {
            first = ch.id;
        }
    }
    store.close().await;
    let mut conn = common::raw_conn(&cfg.path).await;
    // Job ids sort like UUIDv7 (time first); states and prompts vary like real history.
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO jobs (id, channel_id, source, prompt, state, attempt, run_at, created_at,
                           started_at, finished_at, error)
         SELECT printf('%08x-0000-7000-8000-%012x', i, i), ?2 + (i % 16),
                CASE i % 4 WHEN 0 THEN 'webhook' WHEN 1 THEN 'matrix' WHEN 2 THEN 'schedule' ELSE 'cli' END,
                printf('Review pull request #%d and summarise what changed in it', i),
                CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'cancelled' ELSE 'succeeded' END,
                1, i, i, i, i + 1000,
                CASE WHEN i % 50 = 0 THEN 'agent exited' END
         FROM n",
    )
    .bind(history as i64)
    .bind(first)
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE")
        .execute(&mut conn)
        .await
        .expect("analyze");
    conn.close().await.ok();
    let store = Store::open(&cfg).await.expect("open");
    store
        .dashboard_session_open(
            &sha256_hex(SECRET),
            DashboardSession {
                token_sha256: sha256_hex(TOKEN),
                csrf: "c".repeat(64),
                expires_at: now_ms() + 3_600_000,
            },
            now_ms(),
        )
        .await
        .expect("session");
    (store, cfg)
}

/// p50 and p99 (ms) of `samples` GETs of `path`, each read to the end of its body.
async fn page_ms(router: &axum::Router, path: &str, samples: usize) -> (f64, f64, usize) {
    let mut lat = Vec::with_capacity(samples);
    let mut size = 0;
    for _ in 0..samples {
        let req = Request::get(path)
            .header("cookie", format!("gorp_session={SECRET}"))
            .body(Body::empty())
            .unwrap();
        let t = Instant::now();
        let resp = router.clone().oneshot(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{path}");
        let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .expect("body");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        size = body.len();
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100], size)
}

async fn router(store: &Store, cfg: &DatabaseConfig) -> axum::Router {
    let mut config = Config {
        database: cfg.clone(),
        ..Default::default()
    };
    config.webhook.tokens = vec![TOKEN.into()];
    let state = HttpState::new(store.clone(), Arc::new(config), None, None);
    gorp::http::router_with(state, gorp::dashboard::routes())
}

fn main() {
    let history = arg("--history", 1_000_000);
    let samples = arg("--samples", 300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (small, small_cfg) = database(dir.path(), 1_000).await;
        let (big, big_cfg) = database(dir.path(), history).await;
        let r_small = router(&small, &small_cfg).await;
        let r_big = router(&big, &big_cfg).await;
        // A page deep in the history: the cursor of job 500,000 (or the middle).
        let mid = format!("{:08x}-0000-7000-8000-{:012x}", history / 2, history / 2);

        let mut query = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            big.job_list(&JobFilter {
                limit: 50,
                ..Default::default()
            })
            .await
            .expect("list");
            query.push(t.elapsed().as_secs_f64() * 1e3);
        }
        query.sort_by(|a, b| a.total_cmp(b));

        println!("gorp dashboard benchmark: jobs page, {samples} requests each\n");
        println!("| request | p50 ms | p99 ms | body KiB | p50 ÷ baseline |");
        println!("|---|---:|---:|---:|---:|");
        let (base, base99, base_size) = page_ms(&r_small, "/ui/jobs", samples).await;
        println!(
            "| `/ui/jobs`, 1,000 rows of history (baseline) | {base:.2} | {base99:.2} | {} | 1.00 |",
            base_size / 1024
        );
        println!(
            "| `job_list` alone, {history} rows | {:.2} | {:.2} | | {:.2} |",
            query[query.len() / 2],
            query[query.len() * 99 / 100],
            query[query.len() / 2] / base
        );
        for (label, path) in [
            ("`/ui/jobs`", "/ui/jobs".to_string()),
            ("failed only", "/ui/jobs?state=failed".to_string()),
            ("one channel", "/ui/jobs?channel=ch03".to_string()),
            ("a page half way back", format!("/ui/jobs?before={mid}")),
            ("prompt contains \"#99\"", "/ui/jobs?q=%2399".to_string()),
            ("the overview `/ui/`", "/ui/".to_string()),
        ] {
            let (p50, p99, size) = page_ms(&r_big, &path, samples).await;
            println!(
                "| {label}, {history} rows | {p50:.2} | {p99:.2} | {} | {:.2} |",
                size / 1024,
                p50 / base
            );
        }
        small.close().await;
        big.close().await;
    });
}
