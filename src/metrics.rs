//! Prometheus metrics. Counters and histograms are recorded where things happen; gauges that
//! describe the database (jobs by state, warm sessions by state) are read from it when
//! `/metrics` is scraped, so they are right even when other processes write.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::{JobState, Store, WarmState};

pub const JOBS_ENQUEUED: &str = "gorp_jobs_enqueued_total";
pub const JOBS_FINISHED: &str = "gorp_jobs_finished_total";
pub const JOBS: &str = "gorp_jobs";
/// Jobs told they are held because their channel's daily or monthly budget is spent.
pub const JOBS_HELD: &str = "gorp_jobs_held_total";
pub const ENQUEUE_SECONDS: &str = "gorp_enqueue_seconds";
pub const CLAIM_SECONDS: &str = "gorp_claim_seconds";
pub const WARM_SESSIONS: &str = "gorp_warm_sessions";
pub const AGENT_COLD_START_SECONDS: &str = "gorp_agent_cold_start_seconds";
pub const WEBHOOK_RESPONSES: &str = "gorp_webhook_responses_total";
pub const HTTP_REQUESTS: &str = "gorp_http_requests_total";
pub const MATRIX_EVENTS: &str = "gorp_matrix_events_total";
pub const MATRIX_SENDS: &str = "gorp_matrix_sends_total";
pub const MATRIX_SYNC_FAILURES: &str = "gorp_matrix_sync_failures_total";
pub const APPROVALS_PENDING: &str = "gorp_approvals_pending";
pub const APPROVAL_DECISIONS: &str = "gorp_approval_decisions_total";
pub const APPROVAL_WAIT_SECONDS: &str = "gorp_approval_wait_seconds";
/// Tokens the agents reported, by channel and `kind` (`input`, `output`, `cache_read`,
/// `cache_write`): the sum of the committed usage rows, read at scrape time (so it survives
/// restarts and agrees with `gorp usage`).
pub const AGENT_TOKENS: &str = "gorp_agent_tokens_total";
/// What the agents' turns cost (USD), by channel; read like [`AGENT_TOKENS`].
pub const AGENT_COST_USD: &str = "gorp_agent_cost_usd_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0,
                ],
            )
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then this one only renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Renders the metrics, refreshing the gauges read from the database first.
pub async fn render(store: &Store) -> String {
    let h = handle();
    if let Ok(counts) = store.job_count_by_state().await {
        for &st in JobState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == st)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::gauge!(JOBS, "state" => st.as_str()).set(n as f64);
        }
    }
    if let Ok(rows) = store.warm_list().await {
        for &st in WarmState::ALL {
            let n = rows.iter().filter(|r| r.state == st).count();
            metrics::gauge!(WARM_SESSIONS, "state" => st.as_str()).set(n as f64);
        }
    }
    if let Ok(n) = store.approval_pending_count().await {
        metrics::gauge!(APPROVALS_PENDING).set(n as f64);
    }
    let all_time = crate::store::UsageFilter {
        since: 0,
        channel: None,
        by: crate::store::UsageBy::Channel,
    };
    if let Ok(rows) = store.usage_report(&all_time).await {
        for r in rows {
            for (kind, n) in [
                ("input", r.input_tokens),
                ("output", r.output_tokens),
                ("cache_read", r.cache_read_tokens),
                ("cache_write", r.cache_write_tokens),
            ] {
                metrics::gauge!(AGENT_TOKENS, "channel" => r.key.clone(), "kind" => kind)
                    .set(n as f64);
            }
            metrics::gauge!(AGENT_COST_USD, "channel" => r.key.clone()).set(r.cost_usd);
        }
    }
    h.render()
}
