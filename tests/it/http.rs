//! HTTP on 127.0.0.1: webhooks (every status code, with a row-count check that errors write
//! nothing), GitHub signatures and deliveries, idempotency under concurrent duplicates, the API,
//! SSE resume, `?wait`, health, metrics, and the OpenAPI document against the routes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use gorp::auth;
use gorp::config::Config;
use gorp::http::HttpState;
use gorp::store::{now_ms, JobState, NewChannel, NewEvent, NewJob, Source, SpendLimits, Store};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::acp::Gorp;

const API_TOKEN: &str = "global-api-token-0123456789";
const CHANNEL_TOKEN: &str = "channel-token-abcdefghijklmnop";
const SECRET: &str = "It's a Secret to Everybody";

struct Rig {
    _dir: Option<TempDir>,
    store: Store,
    base: String,
    webhook: String,
    http: reqwest::Client,
}

/// Serves `state` the way `gorp start` does ([`gorp::http::serve`]) on a free port.
async fn serve(state: HttpState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        gorp::http::serve(listener, state, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap()
    });
    format!("http://{addr}")
}

fn config(tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    c.webhook.tokens = vec![API_TOKEN.into()];
    c.webhook.max_body_bytes = 4096;
    tweak(&mut c);
    c
}

async fn channel(store: &Store, name: &str) -> String {
    store
        .channel_insert(
            NewChannel {
                name: name.into(),
                webhook_token: Some(CHANNEL_TOKEN.into()),
                webhook_secret: Some(SECRET.into()),
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .unwrap()
        .webhook_id
}

impl Rig {
    async fn new(tweak: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(tweak);
        config.database.path = dir.path().join("gorp.db");
        config.workspace.path = dir.path().join("ws");
        let store = Store::open(&config.database).await.unwrap();
        let id = channel(&store, "alpha").await;
        let base = serve(HttpState::new(store.clone(), Arc::new(config), None, None)).await;
        Rig {
            _dir: Some(dir),
            store,
            webhook: format!("{base}/webhook/session/{id}"),
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn jobs(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(self.store.read_pool())
            .await
            .unwrap()
    }

    fn post(&self) -> reqwest::RequestBuilder {
        self.http
            .post(&self.webhook)
            .header("content-type", "application/json")
    }

    fn api(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(API_TOKEN)
    }
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let body: Value = resp.json().await.expect("errors are JSON");
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{body}"
    );
    (status, body)
}

#[tokio::test]
async fn webhook_answers_202_after_the_row_is_committed() {
    let r = Rig::new(|_| {}).await;
    for token in [CHANNEL_TOKEN, API_TOKEN] {
        let resp = r
            .post()
            .bearer_auth(token)
            .body(r#"{"prompt":"hello"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(resp.headers().contains_key("x-request-id"));
        let body: Value = resp.json().await.unwrap();
        let id = body["job_id"].as_str().unwrap();
        assert_eq!(body["status_url"], format!("/api/jobs/{id}"));
        assert_eq!(body["events_url"], format!("/api/jobs/{id}/events"));
        // Acknowledged means committed: another connection sees the row now.
        let other = Store::open(&gorp::config::DatabaseConfig {
            path: r._dir.as_ref().unwrap().path().join("gorp.db"),
            ..Default::default()
        })
        .await
        .unwrap();
        let job = other.job_get(id).await.unwrap().expect("committed");
        assert_eq!(
            (job.source, job.state, job.prompt.as_str()),
            (Source::Webhook, JobState::Queued, "hello")
        );
        other.close().await;
    }
}

#[tokio::test]
async fn every_webhook_error_is_json_and_writes_nothing() {
    let r = Rig::new(|c| c.webhook.rate_limit_per_minute = 1000).await;
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            r.post().bearer_auth(CHANNEL_TOKEN).body("{not json"),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"promt":"typo"}"#),
            StatusCode::BAD_REQUEST,
            "prompt",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"  "}"#),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"x","priority":99999}"#),
            StatusCode::BAD_REQUEST,
            "priority",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(vec![b'{', 0xff, 0xfe, b'}']),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            r.post().body(r#"{"prompt":"x"}"#),
            StatusCode::UNAUTHORIZED,
            "missing credentials",
        ),
        (
            r.post()
                .bearer_auth("wrong-token-wrong-token")
                .body(r#"{"prompt":"x"}"#),
            StatusCode::UNAUTHORIZED,
            "invalid bearer",
        ),
        (
            r.post()
                .header("x-hub-signature-256", "sha256=00")
                .body(r#"{"prompt":"x"}"#),
            StatusCode::UNAUTHORIZED,
            "does not match",
        ),
        (
            r.http
                .post(format!("{}/webhook/session/nope", r.base))
                .bearer_auth(API_TOKEN)
                .body(r#"{"prompt":"x"}"#),
            StatusCode::NOT_FOUND,
            "webhook id",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(format!(r#"{{"prompt":"{}"}}"#, "x".repeat(5000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than 4096",
        ),
        (
            r.http
                .post(&r.webhook)
                .bearer_auth(CHANNEL_TOKEN)
                .header("content-type", "text/plain")
                .body(r#"{"prompt":"x"}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            r.http
                .post(&r.webhook)
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"x"}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "(none)",
        ),
        (
            r.http
                .post(format!("{}?wait=soon", r.webhook))
                .bearer_auth(CHANNEL_TOKEN)
                .header("content-type", "application/json")
                .body(r#"{"prompt":"x"}"#),
            StatusCode::BAD_REQUEST,
            "bad query",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"x","max_cost_usd":-1}"#),
            StatusCode::BAD_REQUEST,
            "max_cost_usd must be a number from 0",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"x","timeout_secs":0}"#),
            StatusCode::BAD_REQUEST,
            "timeout_secs must be between 1",
        ),
        (
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"x","max_cost_usd":"lots"}"#),
            StatusCode::BAD_REQUEST,
            "invalid request",
        ),
    ];
    for (req, want, needle) in cases {
        let (status, body) = error_of(req.send().await.unwrap()).await;
        assert_eq!(status, want, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(needle),
            "{want}: {body}"
        );
        assert_eq!(r.jobs().await, 0, "{want} wrote a row");
    }
    // A signature on a channel without a secret is refused too.
    let bare = r
        .store
        .channel_insert(
            NewChannel {
                name: "bare".into(),
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .unwrap();
    let body = br#"{"prompt":"x"}"#;
    let resp = r
        .http
        .post(format!("{}/webhook/session/{}", r.base, bare.webhook_id))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", auth::github_signature(SECRET, body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("no webhook secret"));
    assert_eq!(r.jobs().await, 0);
}

#[tokio::test]
async fn rate_limit_per_token_answers_429_and_writes_nothing() {
    let r = Rig::new(|c| c.webhook.rate_limit_per_minute = 2).await;
    for _ in 0..2 {
        let resp = r
            .post()
            .bearer_auth(CHANNEL_TOKEN)
            .body(r#"{"prompt":"x"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let (status, _) = error_of(
        r.post()
            .bearer_auth(CHANNEL_TOKEN)
            .body(r#"{"prompt":"x"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.jobs().await, 2);
    // Another token has its own budget.
    let resp = r
        .post()
        .bearer_auth(API_TOKEN)
        .body(r#"{"prompt":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn github_delivery_is_verified_turned_into_a_prompt_and_deduplicated() {
    let r = Rig::new(|_| {}).await;
    let payload = json!({ "action": "opened", "repository": { "full_name": "acme/widgets" }, "issue": { "title": "Crash on start" } });
    let body = serde_json::to_vec(&payload).unwrap();
    let send = |body: Vec<u8>, sig: String, delivery: &str, event: &str| {
        r.http
            .post(&r.webhook)
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sig)
            .body(body)
            .send()
    };
    let sig = auth::github_signature(SECRET, &body);
    let resp = send(body.clone(), sig.clone(), "d-1", "issues")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let first: Value = resp.json().await.unwrap();
    let job = r
        .store
        .job_get(first["job_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        job.prompt
            .contains("`issues` event (opened) for acme/widgets"),
        "{}",
        job.prompt
    );
    assert!(job.prompt.contains("Crash on start"), "{}", job.prompt);
    assert_eq!(job.idempotency_key.as_deref(), Some("github:d-1"));

    // The same delivery again: the same job.
    let again: Value = send(body.clone(), sig.clone(), "d-1", "issues")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["job_id"], first["job_id"]);
    assert_eq!(again["created"], false);

    // One flipped bit in the body: refused, nothing written.
    let mut flipped = body.clone();
    flipped[3] ^= 1;
    let (status, _) = error_of(send(flipped, sig, "d-2", "issues").await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A ping is answered and writes nothing.
    let ping = br#"{"zen":"Keep it logically awesome."}"#.to_vec();
    let resp = send(
        ping.clone(),
        auth::github_signature(SECRET, &ping),
        "d-3",
        "ping",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(r.jobs().await, 1);
}

#[tokio::test]
async fn concurrent_duplicates_create_one_job() {
    let r = Rig::new(|_| {}).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let req = if i % 2 == 0 {
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(r#"{"prompt":"once","idempotency_key":"k-1"}"#)
        } else {
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .header("idempotency-key", "k-1")
                .body(r#"{"prompt":"once"}"#)
        };
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().json::<Value>().await.unwrap()
        }));
    }
    let bodies: Vec<Value> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|b| b.unwrap())
        .collect();
    assert!(
        bodies.iter().all(|b| b["job_id"] == bodies[0]["job_id"]),
        "{bodies:?}"
    );
    assert_eq!(bodies.iter().filter(|b| b["created"] == true).count(), 1);
    assert_eq!(r.jobs().await, 1);
}

/// A job with events 1..=n whose state is then set by `finish`.
async fn job_with_events(store: &Store, n: usize) -> (String, Vec<i64>, gorp::store::Lease) {
    let ch = store.channel_get("alpha").await.unwrap().unwrap();
    let id = store
        .job_insert(NewJob::new(ch.id, Source::Cli, "x"), now_ms())
        .await
        .unwrap()
        .job_id;
    let job = store
        .job_claim_many("w", 1, now_ms(), 60_000, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    let events: Vec<NewEvent> = (1..=n)
        .map(|i| NewEvent {
            job_id: id.clone(),
            attempt: 1,
            kind: "message".into(),
            text: Some(format!("part{i} ")),
            data: None,
            at: now_ms(),
        })
        .collect();
    store.job_events_append(events).await.unwrap();
    store.flush().await.unwrap();
    let seqs = store
        .job_events_list(&id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    (id, seqs, job.lease().unwrap())
}

/// Parses an SSE body into (id, event, data) triples.
fn sse(text: &str) -> Vec<(Option<String>, String, Value)> {
    text.split("\n\n")
        .filter(|b| b.contains("data:"))
        .map(|block| {
            let mut id = None;
            let mut event = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            (
                id,
                event,
                serde_json::from_str(&data).unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_and_follows_the_job_to_its_end() {
    let r = Rig::new(|_| {}).await;
    let (id, seqs, lease) = job_with_events(&r.store, 5).await;
    let url = format!("{}/api/jobs/{id}/events", r.base);
    let stream = tokio::spawn({
        let req = r
            .http
            .get(&url)
            .bearer_auth(API_TOKEN)
            .header("accept", "text/event-stream")
            .header("last-event-id", seqs[1].to_string());
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            resp.text().await.unwrap()
        }
    });
    // More output and then the end arrive while the stream is open.
    r.store
        .job_events_append(vec![NewEvent {
            job_id: id.clone(),
            attempt: 1,
            kind: "message".into(),
            text: Some("late".into()),
            data: None,
            at: now_ms(),
        }])
        .await
        .unwrap();
    r.store
        .job_complete_if_running(&lease, Some("end_turn".into()), now_ms())
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(20), stream)
        .await
        .expect("stream ends")
        .unwrap();
    let events = sse(&text);
    let ids: Vec<String> = events.iter().filter_map(|e| e.0.clone()).collect();
    let mut want: Vec<String> = seqs[2..].iter().map(|s| s.to_string()).collect();
    want.push((seqs[4] + 1).to_string());
    assert_eq!(ids, want, "resumed after seq {}: {text}", seqs[1]);
    assert_eq!(events.last().unwrap().1, "end");
    assert_eq!(events.last().unwrap().2["state"], "succeeded");
    assert_eq!(events[0].2["text"], "part3 ");

    // JSON form with ?after.
    let page: Vec<Value> = r
        .api(&format!("/api/jobs/{id}/events?after={}", seqs[3]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
}

#[tokio::test]
async fn api_lists_pages_shows_and_cancels_jobs() {
    let r = Rig::new(|_| {}).await;
    for i in 0..5 {
        r.post()
            .bearer_auth(CHANNEL_TOKEN)
            .body(format!(r#"{{"prompt":"p{i}"}}"#))
            .send()
            .await
            .unwrap();
    }
    let page1: Value = r
        .api("/api/jobs?limit=3&state=queued&source=webhook")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page1["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(page1["jobs"][0]["prompt"], "p4");
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2: Value = r
        .api(&format!("/api/jobs?limit=3&cursor={cursor}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompts: Vec<&str> = page2["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["p1", "p0"]);
    assert!(page2["next_cursor"].is_null());
    let (status, _) = error_of(r.api("/api/jobs?state=sideways").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let id = page1["jobs"][0]["id"].as_str().unwrap();
    let job: Value = r
        .api(&format!("/api/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (job["state"].as_str(), job["output"].as_str()),
        (Some("queued"), Some(""))
    );
    let cancel: Value = r
        .http
        .post(format!("{}/api/jobs/{id}/cancel", r.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancel["outcome"], "cancelled");
    let (status, _) = error_of(r.api("/api/jobs/nope").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The API needs a global token: a channel's webhook token is not enough.
    for req in [
        r.http.get(format!("{}/api/jobs", r.base)),
        r.http
            .get(format!("{}/api/jobs", r.base))
            .bearer_auth(CHANNEL_TOKEN),
    ] {
        let (status, _) = error_of(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn api_creates_channels_whose_token_works_once_shown() {
    let r = Rig::new(|_| {}).await;
    let created = r
        .http
        .post(format!("{}/api/channels", r.base))
        .bearer_auth(API_TOKEN)
        .json(&json!({ "name": "beta", "permission_policy": "deny" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let token = created["webhook_token"].as_str().unwrap();
    assert!(
        created["channel"].get("webhook_secret").is_none(),
        "secrets never serialised"
    );
    let resp = r
        .http
        .post(format!(
            "{}{}",
            r.base,
            created["webhook_url"].as_str().unwrap()
        ))
        .bearer_auth(token)
        .json(&json!({ "prompt": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let list: Vec<Value> = r
        .api("/api/channels")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list.iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    for (body, want) in [
        (json!({ "name": "beta" }), StatusCode::CONFLICT),
        (json!({ "name": "../x" }), StatusCode::BAD_REQUEST),
        (json!({ "name": "ok", "extra": 1 }), StatusCode::BAD_REQUEST),
    ] {
        let resp = r
            .http
            .post(format!("{}/api/channels", r.base))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, _) = error_of(resp).await;
        assert_eq!(status, want, "{body}");
    }
    let warm: Vec<Value> = r
        .api("/api/warm")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(warm.is_empty());
}

#[tokio::test]
async fn wait_returns_the_output_of_a_real_agent_run() {
    let g = Gorp::start(|c| c.webhook.tokens = vec![API_TOKEN.into()]).await;
    let id = channel(&g.store, "alpha").await;
    let base = serve(HttpState::new(
        g.store.clone(),
        g.config.clone(),
        Some(g.pool.clone()),
        Some(g.warm.clone()),
    ))
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{base}/webhook/session/{id}?wait=30"))
        .bearer_auth(CHANNEL_TOKEN)
        .json(&json!({ "prompt": "@chunks 3\n@reply the answer is 42" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["output"], "the answer is 42");
    assert_eq!(body["stop_reason"], "end_turn");
    // A wait that runs out answers 202 with the state so far.
    let resp = reqwest::Client::new()
        .post(format!("{base}/webhook/session/{id}?wait=1"))
        .bearer_auth(CHANNEL_TOKEN)
        .json(&json!({ "prompt": "@hang" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "running");
    let cancel: Value = reqwest::Client::new()
        .post(format!(
            "{base}/api/jobs/{}/cancel",
            body["job_id"].as_str().unwrap()
        ))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancel["outcome"], "requested");
    let job = g.wait_done(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job.state, JobState::Cancelled);
    g.stop().await;
}

#[tokio::test]
async fn wait_on_a_channel_whose_budget_is_spent_answers_at_once_with_the_reason() {
    let g = Gorp::start(|c| c.webhook.tokens = vec![API_TOKEN.into()]).await;
    let id = channel(&g.store, "alpha").await;
    gorp::service::channels::update(
        &g.store,
        "alpha",
        gorp::service::channels::Changes {
            budget_day_usd: Some(Some(0.5)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    let base = serve(HttpState::new(
        g.store.clone(),
        g.config.clone(),
        Some(g.pool.clone()),
        Some(g.warm.clone()),
    ))
    .await;
    let post = |prompt: &'static str| {
        reqwest::Client::new()
            .post(format!("{base}/webhook/session/{id}?wait=60"))
            .bearer_auth(CHANNEL_TOKEN)
            .json(&json!({ "prompt": prompt }))
            .send()
    };
    let resp = post("@usage cost=0.75\n@reply spent").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["output"], "spent");
    // The next job is committed (202) and held; the wait ends as soon as it is told why,
    // long before its 60 seconds.
    let t = std::time::Instant::now();
    let resp = post("@reply later").await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "queued");
    let held = body["held"].as_str().unwrap();
    assert!(
        held.contains("channel alpha has spent $0.7500 of its daily budget of $0.50"),
        "{held}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    let job = body["job_id"].as_str().unwrap();
    assert_eq!(
        g.store.job_get(job).await.unwrap().unwrap().state,
        JobState::Queued
    );
    // `/api/usage` shows the channel's spend against its budget.
    let usage: Value = reqwest::Client::new()
        .get(format!("{base}/api/usage?channel=alpha"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = &usage["budgets"][0];
    assert_eq!(b["channel"], "alpha");
    assert_eq!(
        (b["day_usd"].as_f64(), b["day_max_usd"].as_f64()),
        (Some(0.75), Some(0.5))
    );
    assert!(usage["timezone"].as_str().is_some_and(|z| !z.is_empty()));
    g.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let r = Rig::new(|_| {}).await;
    let ok = r
        .http
        .get(format!("{}/healthz", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let ready: Value = r
        .http
        .get(format!("{}/readyz", r.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    r.post()
        .bearer_auth(CHANNEL_TOKEN)
        .body(r#"{"prompt":"m"}"#)
        .send()
        .await
        .unwrap();
    r.post().body(r#"{"prompt":"m"}"#).send().await.unwrap();
    let text = r
        .http
        .get(format!("{}/metrics", r.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"gorp_jobs{state="queued"} 1"#,
        r#"gorp_webhook_responses_total{status="202"}"#,
        r#"gorp_webhook_responses_total{status="401"}"#,
        "gorp_enqueue_seconds_bucket",
        r#"gorp_warm_sessions{state="warm"} 0"#,
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let r = Rig::new(|_| {}).await;
    let doc: Value = r
        .http
        .get(format!("{}/api/openapi.json", r.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let expected: BTreeSet<(String, String)> = [
        ("POST", "/webhook/session/{id}"),
        ("GET", "/api/jobs"),
        ("GET", "/api/jobs/{id}"),
        ("GET", "/api/jobs/{id}/events"),
        ("POST", "/api/jobs/{id}/cancel"),
        ("GET", "/api/channels"),
        ("POST", "/api/channels"),
        ("GET", "/api/warm"),
        ("GET", "/api/nodes"),
        ("GET", "/api/usage"),
        ("GET", "/api/schedules"),
        ("POST", "/api/schedules"),
        ("DELETE", "/api/schedules/{id}"),
        ("POST", "/api/schedules/{id}/pause"),
        ("POST", "/api/schedules/{id}/resume"),
        ("GET", "/api/approvals"),
        ("GET", "/api/approvals/{id}"),
        ("POST", "/api/approvals/{id}"),
        ("PATCH", "/api/channels/{name}"),
        ("GET", "/api/channels/{name}/rules"),
        ("GET", "/api/channels/{name}/options"),
        ("DELETE", "/api/channels/{name}/rules/{id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(documented, expected);
    // Every documented operation is served (never 404/405 from the router itself).
    for (method, path) in &documented {
        let id = if path.contains("schedules") {
            "999"
        } else {
            "does-not-exist"
        };
        let url = format!(
            "{}{}",
            r.base,
            path.replace("{id}", id).replace("{name}", "nochannel")
        );
        let resp = r
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if status == StatusCode::NOT_FOUND {
            let body: Value = resp
                .json()
                .await
                .expect("a handler's JSON 404, not the router's");
            assert_eq!(body["error"], "not_found", "{method} {path}");
        }
    }
}

#[tokio::test]
async fn api_manages_schedules_and_refuses_bad_ones_without_writing() {
    let r = Rig::new(|_| {}).await;
    let post = |body: Value| {
        r.http
            .post(format!("{}/api/schedules", r.base))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
    };
    for (body, want) in [
        (
            json!({ "channel": "alpha", "when": "61 * * * *", "prompt": "x" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "channel": "alpha", "when": "0 9 * * *", "prompt": "x", "timezone": "Nowhere/Land" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "channel": "ghost", "when": "0 9 * * *", "prompt": "x" }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "channel": "alpha", "when": "0 9 * * *" }),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, body) = error_of(post(body).await.unwrap()).await;
        assert_eq!(status, want, "{body}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM schedules")
        .fetch_one(r.store.read_pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    let resp = post(json!({ "channel": "alpha", "when": "0 9 * * 1-5", "prompt": "standup notes", "timezone": "Europe/Berlin" }))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let s: Value = resp.json().await.unwrap();
    let id = s["id"].as_i64().unwrap();
    assert_eq!(
        (s["cron"].as_str(), s["timezone"].as_str()),
        (Some("0 9 * * 1-5"), Some("Europe/Berlin"))
    );
    let paused: Value = r
        .http
        .post(format!("{}/api/schedules/{id}/pause", r.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paused["enabled"], false);
    let resumed: Value = r
        .http
        .post(format!("{}/api/schedules/{id}/resume", r.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resumed["enabled"], true);
    let list: Vec<Value> = r
        .api("/api/schedules")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    let del = r
        .http
        .delete(format!("{}/api/schedules/{id}", r.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn concurrent_duplicate_github_deliveries_create_one_job() {
    let r = Rig::new(|_| {}).await;
    let body =
        serde_json::to_vec(&json!({ "action": "created", "comment": { "body": "please fix" } }))
            .unwrap();
    let sig = auth::github_signature(SECRET, &body);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let req = r
                .http
                .post(&r.webhook)
                .header("content-type", "application/json")
                .header("x-github-event", "issue_comment")
                .header("x-github-delivery", "dup-delivery-7")
                .header("x-hub-signature-256", sig.clone())
                .body(body.clone());
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::ACCEPTED);
                resp.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let bodies: Vec<Value> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|b| b.unwrap())
        .collect();
    assert!(
        bodies.iter().all(|b| b["job_id"] == bodies[0]["job_id"]),
        "{bodies:?}"
    );
    assert_eq!(bodies.iter().filter(|b| b["created"] == true).count(), 1);
    assert_eq!(r.jobs().await, 1);
}

/// Sends `request` as raw bytes on a new connection; returns the status and the JSON body
/// (the server closes the connection after these errors).
async fn raw_request(base: &str, request: &[u8]) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, head.to_ascii_lowercase(), body)
}

#[tokio::test]
async fn every_error_of_the_router_and_of_http_parsing_is_json() {
    let r = Rig::new(|_| {}).await;
    let job: Value = r
        .post()
        .bearer_auth(CHANNEL_TOKEN)
        .body(r#"{"prompt":"x"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = job["job_id"].as_str().unwrap();
    let url = |p: &str| format!("{}{p}", r.base);
    let long_query = format!("/api/jobs?channel={}", "c".repeat(9000));
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str, &str)> = vec![
        (
            r.http.delete(url("/api/jobs")).bearer_auth(API_TOKEN),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "DELETE is not allowed on /api/jobs",
        ),
        (
            r.http.get(url("/no/such/route")),
            StatusCode::NOT_FOUND,
            "not_found",
            "no route for GET /no/such/route",
        ),
        (
            r.http
                .delete(url("/api/schedules/abc"))
                .bearer_auth(API_TOKEN),
            StatusCode::NOT_FOUND,
            "not_found",
            "positive integers",
        ),
        (
            r.http
                .post(url("/api/schedules/99/resume"))
                .bearer_auth(API_TOKEN),
            StatusCode::NOT_FOUND,
            "not_found",
            "no schedule 99",
        ),
        (
            r.api("/api/jobs?cursor=zzz"),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "cursor",
        ),
        (
            r.api("/api/jobs?limit=lots"),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "bad query",
        ),
        (
            r.api(&format!("/api/jobs/{job}/events"))
                .header("last-event-id", "soon"),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Last-Event-ID",
        ),
        (
            r.http
                .post(url("/api/channels"))
                .bearer_auth(API_TOKEN)
                .header("content-type", "text/plain")
                .body(r#"{"name":"x"}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "application/json",
        ),
        (
            r.http
                .post(url("/api/schedules"))
                .bearer_auth(API_TOKEN)
                .header("content-type", "application/json")
                .body("{"),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "",
        ),
        (
            // Credentials are checked before the query: without them, only 401.
            r.http
                .post(format!("{}?wait=soon", r.webhook))
                .header("content-type", "application/json")
                .body(r#"{"prompt":"x"}"#),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing credentials",
        ),
        (
            r.api(&long_query),
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "at most 8192",
        ),
    ];
    for (req, status, code, needle) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{status}"
        );
        let allow = resp.headers().get("allow").cloned();
        let (got, body) = error_of(resp).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains(needle),
            "{status}: {body}"
        );
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(allow.unwrap(), "GET,HEAD");
        }
    }

    // Requests hyper refuses before they reach the router get the same body.
    let huge = format!(
        "GET /api/jobs?channel={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "c".repeat(70_000)
    );
    let (status, head, body) = raw_request(&r.base, huge.as_bytes()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (414, Some("uri_too_long"))
    );
    assert!(head.contains("content-type: application/json"), "{head}");
    let (status, _, body) = raw_request(&r.base, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(r.jobs().await, 1, "errors wrote rows");
}

#[tokio::test]
async fn webhook_priority_counts_integers_as_json_schema_does() {
    let r = Rig::new(|_| {}).await;
    let resp = r
        .post()
        .bearer_auth(CHANNEL_TOKEN)
        .body(r#"{"prompt":"x","priority":5.0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id = resp.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(r.store.job_get(&id).await.unwrap().unwrap().priority, 5);
    for bad in [
        r#"{"prompt":"x","priority":5.5}"#,
        r#"{"prompt":"x","priority":"5"}"#,
    ] {
        let (status, _) = error_of(
            r.post()
                .bearer_auth(CHANNEL_TOKEN)
                .body(bad)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(r.jobs().await, 1);
}

#[tokio::test]
async fn openapi_document_places_parameters_and_documents_json_errors() {
    let r = Rig::new(|_| {}).await;
    let doc: Value = r
        .http
        .get(format!("{}/api/openapi.json", r.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let params = |path: &str| -> Vec<(String, String, bool)> {
        let op = doc["paths"][path]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap();
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["in"].as_str().unwrap().to_string(),
                    p["required"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let q = |n: &str| (n.to_string(), "query".to_string(), false);
    assert_eq!(
        params("/api/jobs"),
        [
            q("state"),
            q("channel"),
            q("source"),
            q("cursor"),
            q("limit")
        ]
    );
    assert_eq!(
        params("/api/jobs/{id}/events"),
        [
            ("id".into(), "path".into(), true),
            q("after"),
            ("Last-Event-ID".into(), "header".into(), false)
        ]
    );
    assert_eq!(
        params("/webhook/session/{id}"),
        [("id".into(), "path".into(), true), q("wait")]
    );
    let limit = &doc["paths"]["/api/jobs"]["get"]["parameters"][4]["schema"];
    assert_eq!(
        (limit["minimum"].as_i64(), limit["maximum"].as_i64()),
        (Some(1), Some(1000))
    );

    // Every error status of every operation is documented with the JSON error body, and every
    // operation that reads or writes the database documents the 503.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for (status, resp) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        resp["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
            assert!(responses.contains_key("414"), "{method} {path}");
            if !["/healthz", "/metrics"].contains(&path.as_str()) {
                assert!(responses.contains_key("503"), "{method} {path}");
            }
        }
    }
}

#[tokio::test]
async fn api_sets_a_channels_sandbox_and_ports_and_refuses_bad_changes() {
    let r = Rig::new(|_| {}).await;
    let patch = |body: &'static str| {
        r.http
            .patch(format!("{}/api/channels/alpha", r.base))
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = patch(r#"{"sandbox": "none", "allowed_ports": [443]}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ch: Value = resp.json().await.unwrap();
    assert_eq!(ch["sandbox"], "none");
    assert_eq!(ch["allowed_ports"], "[443]");
    let before = r.store.channel_get("alpha").await.unwrap().unwrap();
    for body in [
        r#"[null, null]"#,
        r#"{"budget_job_usd": -1}"#,
        r#"{"budget_job_usd": "1"}"#,
        r#"{"budget_job_tokens": 0}"#,
        r#"{"budget_job_tokens": 1.5}"#,
        r#"{"budget_day_usd": -0.5}"#,
        r#"{"budget_day_usd": "5"}"#,
        r#"{"budget_month_usd": 1e9}"#,
        r#"{"budget_month_usd": true}"#,
        r#"{"budget_day_usd": 5, "budget_month_usd": -1}"#,
        r#"{"sandbox": "jail"}"#,
        r#"{"allowed_ports": [0]}"#,
        r#"{"allowed_ports": [70000]}"#,
        r#"{"allowed_ports": "443"}"#,
        r#"{"permission_policy": "ask", "allowed_ports": [0]}"#,
        r#"{"sandbox": "none", "extra": 1}"#,
    ] {
        let (status, _) = error_of(patch(body).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(
        r.store.channel_get("alpha").await.unwrap().unwrap(),
        before,
        "nothing written"
    );
    let ch: Value = patch(
        r#"{"budget_job_usd": 2.5, "budget_job_tokens": 1000.0, "budget_day_usd": 20,
            "budget_month_usd": 300.5}"#,
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (
            ch["budget_job_usd"].as_f64(),
            ch["budget_job_tokens"].as_i64(),
            ch["budget_day_usd"].as_f64(),
            ch["budget_month_usd"].as_f64()
        ),
        (Some(2.5), Some(1000), Some(20.0), Some(300.5))
    );
    // An empty change is the channel as it is; null goes back to the config's.
    let same: Value = patch("{}").await.unwrap().json().await.unwrap();
    assert_eq!(same["sandbox"], "none");
    let ch: Value =
        patch(r#"{"sandbox": null, "allowed_ports": null, "permission_policy": "ask"}"#)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(ch["sandbox"], Value::Null);
    assert_eq!(ch["allowed_ports"], Value::Null);
    assert_eq!(ch["permission_policy"], "ask");
    let resp = r
        .http
        .patch(format!("{}/api/channels/nope", r.base))
        .bearer_auth(API_TOKEN)
        .json(&json!({ "sandbox": "none" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn api_sets_and_checks_session_options_and_masks_mcp_secrets() {
    let g = Gorp::start(|c| {
        c.webhook.tokens = vec![API_TOKEN.into()];
        c.acp.agent_args.extend(
            [
                "--option",
                "model=fast,smart",
                "--option",
                "effort=low,high",
            ]
            .map(String::from),
        );
    })
    .await;
    let id = channel(&g.store, "alpha").await;
    let base = serve(HttpState::new(
        g.store.clone(),
        g.config.clone(),
        Some(g.pool.clone()),
        Some(g.warm.clone()),
    ))
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("{base}{path}"))
            .bearer_auth(API_TOKEN)
            .send()
    };
    let patch = |body: Value| {
        http.patch(format!("{base}/api/channels/alpha"))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
    };
    let hook = |body: Value| {
        http.post(format!("{base}/webhook/session/{id}?wait=30"))
            .bearer_auth(CHANNEL_TOKEN)
            .json(&body)
            .send()
    };
    let jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
            .fetch_one(g.store.read_pool())
            .await
            .unwrap()
    };

    // Before the agent has run: nothing offered, an option is taken as text.
    let resp = get("/api/channels/alpha/options").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(
        (view["offered"].clone(), view["set"].clone()),
        (Value::Null, json!({}))
    );
    let (status, _) = error_of(get("/api/channels/nope/options").await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let resp = patch(json!({ "options": { "model": "smart" } }))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ch: Value = resp.json().await.unwrap();
    assert_eq!(ch["agent_options"], json!({ "model": "smart" }));

    // A webhook job's own options hold for its turn, over the channel's.
    let resp = hook(json!({ "prompt": "@options", "options": { "effort": "high" } }))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["output"], "options: effort=high model=smart", "{body}");
    let resp = hook(json!({ "prompt": "@options" })).await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["output"], "options: effort=low model=smart", "{body}");

    // The agent has said what it offers.
    let view: Value = get("/api/channels/alpha/options")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let offered = view["offered"].as_array().expect("offered after a run");
    let ids: Vec<&str> = offered.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["model", "effort"], "{view}");
    assert_eq!(offered[0]["values"], json!(["fast", "smart"]));
    assert_eq!(offered[0]["category"], "model");
    assert_eq!(view["set"], json!({ "model": "smart" }));

    // What it does not offer is refused, and nothing is written.
    let before = g.store.channel_get("alpha").await.unwrap().unwrap();
    for options in [json!({ "model": "huge" }), json!({ "colour": "red" })] {
        let (status, e) = error_of(patch(json!({ "options": options })).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{options}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains("values: fast, smart") || m.contains("options: model, effort"),
            "{m}"
        );
    }
    assert_eq!(
        g.store.channel_get("alpha").await.unwrap().unwrap(),
        before,
        "nothing written"
    );
    let count = jobs().await;
    for options in [json!({ "colour": "red" }), json!({ "model": "huge" })] {
        let (status, e) = error_of(
            hook(json!({ "prompt": "@options", "options": options }))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{options}: {e}");
    }
    assert_eq!(jobs().await, count, "no job written");

    // MCP servers: stored as given, shown masked.
    let resp = patch(json!({ "mcp_servers": [{
        "name": "search",
        "url": "http://127.0.0.1:9/mcp",
        "headers": { "Authorization": "Bearer s3cret" }
    }] }))
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("s3cret"), "{text}");
    let ch: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ch["mcp_servers"][0]["headers"]["Authorization"], "********");
    assert!(g
        .store
        .channel_get("alpha")
        .await
        .unwrap()
        .unwrap()
        .mcp_servers
        .contains("Bearer s3cret"));
    for path in ["/api/channels", "/api/channels/alpha/options"] {
        let text = get(path).await.unwrap().text().await.unwrap();
        assert!(!text.contains("s3cret"), "{path}: {text}");
    }
    let list: Value = get("/api/channels").await.unwrap().json().await.unwrap();
    assert_eq!(
        list[0]["mcp_servers"][0]["headers"]["Authorization"], "********",
        "{list}"
    );
    let before = g.store.channel_get("alpha").await.unwrap().unwrap();
    let (status, _) = error_of(
        patch(json!({ "mcp_servers": [{ "name": "bad", "url": "ftp://x" }] }))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(g.store.channel_get("alpha").await.unwrap().unwrap(), before);
    g.stop().await;
}

#[tokio::test]
async fn nodes_lists_the_nodes_sharing_the_database_with_what_they_hold() {
    let r = Rig::new(|_| {}).await;
    let unauthorized = r
        .http
        .get(format!("{}/api/nodes", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let now = gorp::store::now_ms();
    let node = gorp::store::NodeStart {
        id: "host-a:42:abcd0123".into(),
        host: "host-a".into(),
        pid: 42,
        version: "9.9.9".into(),
        slots: 8,
    };
    r.store.node_start(&node, now, now + 30_000).await.unwrap();
    let gone = gorp::store::NodeStart {
        id: "host-b:7:00ff00ff".into(),
        host: "host-b".into(),
        pid: 7,
        version: "9.9.9".into(),
        slots: 4,
    };
    r.store
        .node_start(&gone, now - 60_000, now - 30_000)
        .await
        .unwrap();
    assert!(r
        .store
        .leader_take("matrix", &node.id, now, now + 30_000)
        .await
        .unwrap());
    assert!(
        !r.store
            .leader_take("matrix", &gone.id, now, now + 30_000)
            .await
            .unwrap(),
        "a lease held by a node that is up is not taken"
    );
    let nodes: Value = r
        .http
        .get(format!("{}/api/nodes", r.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let a = nodes.iter().find(|n| n["id"] == node.id.as_str()).unwrap();
    assert_eq!(a["state"], "up");
    assert_eq!(a["slots"], 8);
    assert_eq!(a["leads"], serde_json::json!(["matrix"]));
    let b = nodes.iter().find(|n| n["id"] == gone.id.as_str()).unwrap();
    assert_eq!(b["state"], "gone");
    assert_eq!(b["leads"], serde_json::json!([]));
}
