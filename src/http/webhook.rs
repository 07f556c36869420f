//! `POST /webhook/session/{id}`: a prompt for a channel, from anything that can send HTTP.
//!
//! Checks, in order, each answered with a JSON error and no row written: unknown webhook id
//! (404), body over the limit (413), credentials (401: `Authorization: Bearer` with a global or
//! the channel's token, or `X-Hub-Signature-256` with the channel's secret), the token's rate
//! limit (429), content type (415), UTF-8 and JSON (400), a prompt (400). Then the job is
//! enqueued and `202` is sent only after its row is committed.
//!
//! A GitHub delivery (`X-GitHub-Event`, `X-GitHub-Delivery`) whose body has no `prompt` becomes
//! a job whose prompt carries the event and its payload (truncated to
//! `[webhook] github_payload_max_bytes`, or rendered through the channel's template),
//! de-duplicated by delivery id. `ping` deliveries are answered and write nothing.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::HttpState;
use crate::auth;
use crate::config::WebhookConfig;
use crate::store::{Channel, JobState, NewJob, Source};

pub(super) fn routes() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new().routes(routes!(webhook))
}

/// A prompt sent to a channel's webhook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// What to ask the agent (not blank).
    #[schema(
        pattern = r"[^\t\n\x0b\x0c\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub prompt: String,
    /// Sending the same key again returns the first job instead of a new one (1-256 bytes).
    #[schema(min_length = 1, max_length = 256)]
    pub idempotency_key: Option<String>,
    /// Higher runs first.
    #[schema(minimum = -1000, maximum = 1000)]
    #[serde(default, deserialize_with = "integral")]
    pub priority: Option<i64>,
    /// Stop the job's turn after this many seconds (below `[acp] prompt_timeout_secs`).
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(default, deserialize_with = "integral")]
    pub timeout_secs: Option<i64>,
    /// Stop the job once its turn costs more than this (USD), below the channel's per-job
    /// budget; it ends `failed` with stop reason `budget`.
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_cost_usd: Option<f64>,
    /// Session config options for this job's turn (option id or category → value, e.g.
    /// `{"model": "…"}`), over the channel's; checked against what the agent offers.
    #[schema(value_type = Option<super::approvals::SessionOptions>)]
    pub options: Option<std::collections::BTreeMap<String, String>>,
}

/// An optional integer as JSON Schema counts integers: `5` and `5.0` alike.
pub(super) fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() <= 9.0e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("invalid type: {n}, expected an integer"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Answer when the job ends (or after this many seconds) instead of at once.
    pub wait: Option<u64>,
}

/// The job was committed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub job_id: String,
    /// False when the idempotency key (or GitHub delivery id) named an existing job.
    pub created: bool,
    pub status_url: String,
    pub events_url: String,
    /// With `?wait`: the state when the wait ended without the job ending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// With `?wait`: the job is `running` and waits for these permission requests or questions
    /// (policy `ask`); the wait ends as soon as one is pending. Decide or answer them with
    /// `POST` to their `url`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub pending_approvals: Vec<PendingApproval>,
    /// With `?wait`: the job is `queued` and held because its channel's daily or monthly
    /// budget is spent: why, and until when. The wait ends as soon as the job is held.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub held: Option<String>,
}

/// A permission request or question a `?wait` caller's job waits for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PendingApproval {
    pub id: String,
    /// `permission` or `question`.
    pub request: crate::store::RequestKind,
    pub title: Option<String>,
    pub kind: Option<String>,
    /// `/api/approvals/{id}`: `GET` it, or `POST` a decision to it.
    pub url: String,
}

/// The job ended (with `?wait`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Finished {
    pub job_id: String,
    pub created: bool,
    pub state: JobState,
    pub stop_reason: Option<String>,
    pub error: Option<String>,
    /// The agent's answer: the job's message events joined.
    pub output: String,
    pub status_url: String,
    pub events_url: String,
}

/// Queue a prompt for the channel whose webhook id is `id`.
#[utoipa::path(
    post,
    path = "/webhook/session/{id}",
    tag = "webhook",
    params(("id" = String, Path, description = "The channel's stable webhook id"), WaitQuery),
    request_body(content = WebhookRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Committed", body = Accepted),
        (status = 200, description = "Finished (with ?wait)", body = Finished),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 429, body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn webhook(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let started = std::time::Instant::now();
    let channel = st
        .store
        .channel_get_by_webhook_id(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no channel has this webhook id".into()))?;

    let limit = st.config.webhook.max_body_bytes;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit))?;

    let key = authenticate(&st, &channel, &headers, &body)?;
    if !st.allow(&key) {
        return Err(ApiError::TooManyRequests(format!(
            "rate limit of {} requests per minute exceeded",
            st.config.webhook.rate_limit_per_minute
        )));
    }
    // After the credentials: a request without them learns nothing but 401 (or 404).
    let Query(query) = query.map_err(ApiError::query)?;
    let mut job = match decode_body(&headers, &body, &channel, &st.config.webhook)? {
        Decoded::Ping => {
            return Ok((StatusCode::OK, Json(serde_json::json!({ "pong": true }))).into_response());
        }
        Decoded::Job(job) => *job,
    };
    job.max_attempts = i64::from(st.config.worker.max_attempts);
    let enq = crate::service::jobs::enqueue(&st.store, job, started).await?;
    let status_url = format!("/api/jobs/{}", enq.job_id);
    let events_url = format!("/api/jobs/{}/events", enq.job_id);

    let Some(wait) = query.wait.filter(|w| *w > 0) else {
        let body = Accepted {
            job_id: enq.job_id,
            created: enq.created,
            status_url,
            events_url,
            state: None,
            pending_approvals: Vec::new(),
            held: None,
        };
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    };
    let wait = Duration::from_secs(wait.min(st.config.webhook.max_wait_secs));
    match wait_for_end(&st, &enq.job_id, wait).await? {
        WaitEnd::Finished(state) => {
            let job = st
                .store
                .job_get(&enq.job_id)
                .await?
                .ok_or_else(|| ApiError::NotFound("job vanished".into()))?;
            let output = st.store.job_output(&enq.job_id).await?;
            let body = Finished {
                job_id: enq.job_id,
                created: enq.created,
                state,
                stop_reason: job.stop_reason,
                error: job.error,
                output,
                status_url,
                events_url,
            };
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        WaitEnd::Waiting(pending) => {
            let state = st.store.job_get(&enq.job_id).await?.map(|j| j.state);
            let body = Accepted {
                job_id: enq.job_id,
                created: enq.created,
                status_url,
                events_url,
                state,
                pending_approvals: pending
                    .into_iter()
                    .map(|a| PendingApproval {
                        url: format!("/api/approvals/{}", a.id),
                        id: a.id,
                        request: a.request,
                        title: a.title,
                        kind: a.kind,
                    })
                    .collect(),
                held: None,
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        WaitEnd::Held(why) => {
            let body = Accepted {
                job_id: enq.job_id,
                created: enq.created,
                status_url,
                events_url,
                state: Some(JobState::Queued),
                pending_approvals: Vec::new(),
                held: Some(why),
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// What a webhook request's body asks for (see [`decode_body`]).
#[derive(Debug)]
pub enum Decoded {
    /// A GitHub `ping` delivery: answered `200 {"pong": true}`, nothing written.
    Ping,
    /// A job to enqueue. Its `max_attempts` is still [`NewJob::new`]'s; the handler sets it.
    Job(Box<NewJob>),
}

/// Decodes a webhook request that passed the size, credential and rate checks, without side
/// effects: content type (415), UTF-8 and JSON (400), then a GitHub delivery (`X-GitHub-Event`
/// and `X-GitHub-Delivery` with no `prompt` in the body: a ping, or a job de-duplicated by
/// delivery id whose prompt is the channel's template or [`DEFAULT_GITHUB_TEMPLATE`] filled
/// in) or a [`WebhookRequest`] (400 when it does not parse or its prompt is blank;
/// `Idempotency-Key` applies when the body has no key).
pub fn decode_body(
    headers: &HeaderMap,
    body: &[u8],
    channel: &Channel,
    config: &WebhookConfig,
) -> ApiResult<Decoded> {
    require_json(headers)?;
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("body is not valid UTF-8".into()))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;

    let github = github_headers(headers);
    let job = match (&github, value.get("prompt")) {
        (Some((event, _)), None) if event == "ping" => return Ok(Decoded::Ping),
        (Some((event, delivery)), None) => {
            let mut job = NewJob::new(
                channel.id,
                Source::Webhook,
                github_prompt(config, channel, event, delivery, &value),
            );
            job.idempotency_key = Some(format!("github:{delivery}"));
            job
        }
        _ => {
            let req: WebhookRequest = serde_json::from_value(value)
                .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))?;
            if req.prompt.trim().is_empty() {
                return Err(ApiError::BadRequest("prompt is empty".into()));
            }
            let mut job = NewJob::new(channel.id, Source::Webhook, req.prompt);
            job.priority = req.priority.unwrap_or(0);
            job.timeout_secs = req.timeout_secs;
            job.max_cost_usd = req.max_cost_usd;
            job.agent_options = req
                .options
                .filter(|o| !o.is_empty())
                .map(|o| serde_json::to_string(&o).expect("options serialise"));
            job.idempotency_key = req.idempotency_key.or_else(|| {
                headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
            job
        }
    };
    Ok(Decoded::Job(Box::new(job)))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("body is larger than {limit} bytes"))
}

/// Checks the request's credentials; returns the key its rate limit is counted under.
fn authenticate(
    st: &HttpState,
    channel: &Channel,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<String> {
    if let Some(sig) = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
    {
        return match &channel.webhook_secret {
            Some(secret) if auth::verify_github_signature(secret, body, sig) => {
                Ok(format!("secret:{}", channel.id))
            }
            Some(_) => Err(ApiError::Unauthorized(
                "X-Hub-Signature-256 does not match the body".into(),
            )),
            None => Err(ApiError::Unauthorized(
                "this channel has no webhook secret; signatures cannot be checked".into(),
            )),
        };
    }
    let Some(token) = bearer(headers) else {
        return Err(ApiError::Unauthorized(
            "missing credentials: send Authorization: Bearer <token> or X-Hub-Signature-256".into(),
        ));
    };
    let channel_ok = channel
        .webhook_token_sha256
        .as_deref()
        .is_some_and(|h| auth::token_matches_hash(token, h));
    let global_ok = auth::token_in(token, &st.config.webhook.tokens);
    if channel_ok || global_ok {
        Ok(format!("token:{}", auth::sha256_hex(token)))
    } else {
        Err(ApiError::Unauthorized("invalid bearer token".into()))
    }
}

/// The bearer token of a request, if any.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "expected Content-Type: application/json, got {:?}",
            if ct.is_empty() { "(none)" } else { ct }
        )))
    }
}

fn github_headers(headers: &HeaderMap) -> Option<(String, String)> {
    let event = headers.get("x-github-event")?.to_str().ok()?.to_string();
    let delivery = headers.get("x-github-delivery")?.to_str().ok()?.to_string();
    Some((event, delivery))
}

/// The prompt for a GitHub delivery: the channel's template, or a default that names the
/// event and carries the (size-limited) payload.
fn github_prompt(
    config: &WebhookConfig,
    channel: &Channel,
    event: &str,
    delivery: &str,
    payload: &serde_json::Value,
) -> String {
    let max = config.github_payload_max_bytes;
    let mut json = serde_json::to_string_pretty(payload).unwrap_or_default();
    if json.len() > max {
        let mut cut = max;
        while !json.is_char_boundary(cut) {
            cut -= 1;
        }
        json.truncate(cut);
        json.push_str("\n… (payload truncated)");
    }
    let action = payload.get("action").and_then(|v| v.as_str()).unwrap_or("");
    let repo = payload
        .pointer("/repository/full_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let template = channel
        .webhook_template
        .as_deref()
        .unwrap_or(DEFAULT_GITHUB_TEMPLATE);
    // One pass over the template: a value that contains a placeholder (an action of
    // "{payload}{payload}…") stays as it is instead of being filled in again.
    let fills = [
        ("{event}", event),
        ("{action}", action),
        ("{repository}", repo),
        ("{delivery}", delivery),
        ("{payload}", json.as_str()),
    ];
    let mut prompt = String::with_capacity(template.len() + json.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        prompt.push_str(&rest[..i]);
        rest = &rest[i..];
        match fills.iter().find(|(p, _)| rest.starts_with(p)) {
            Some((p, value)) => {
                prompt.push_str(value);
                rest = &rest[p.len()..];
            }
            None => {
                prompt.push('{');
                rest = &rest[1..];
            }
        }
    }
    prompt.push_str(rest);
    prompt
}

/// Used when a channel has no template of its own.
pub const DEFAULT_GITHUB_TEMPLATE: &str =
    "GitHub sent a `{event}` event ({action}) for {repository} (delivery {delivery}).\n\nPayload:\n```json\n{payload}\n```";

/// How a `?wait` ended.
pub enum WaitEnd {
    /// The job ended in this state.
    Finished(JobState),
    /// The wait ran out, or the job waits for these pending approvals.
    Waiting(Vec<crate::store::Approval>),
    /// The job is held by a spent budget, for this reason.
    Held(String),
}

/// Waits until the job is in a terminal state, has a pending approval, is held by a spent
/// budget, or `max` passes. Woken by commits in this process; rows written by other processes
/// are seen within a second.
pub async fn wait_for_end(st: &HttpState, job_id: &str, max: Duration) -> ApiResult<WaitEnd> {
    let store = &st.store;
    let deadline = tokio::time::Instant::now() + max;
    let mut commits = store.subscribe_commits();
    loop {
        commits.borrow_and_update();
        let job = store
            .job_get(job_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job {job_id}")))?;
        if job.state.is_terminal() {
            return Ok(WaitEnd::Finished(job.state));
        }
        if job.state == JobState::Running {
            let pending = store
                .approval_list(&crate::store::ApprovalFilter {
                    state: Some(crate::store::ApprovalState::Pending),
                    job_id: Some(job_id.to_string()),
                    limit: 100,
                    ..Default::default()
                })
                .await?;
            if !pending.is_empty() {
                return Ok(WaitEnd::Waiting(pending));
            }
        }
        if job.state == JobState::Queued {
            if let Some(why) = store.job_held_reason(job_id).await? {
                return Ok(WaitEnd::Held(why));
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(WaitEnd::Waiting(Vec::new()));
        }
        let step = (deadline - now).min(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::timeout(step, commits.changed()) => {}
            _ = st.shutdown.cancelled() => return Ok(WaitEnd::Waiting(Vec::new())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(template: Option<&str>) -> Channel {
        Channel {
            id: 1,
            name: "c".into(),
            webhook_id: "w".into(),
            agent_binary: None,
            agent_args: None,
            permission_policy: crate::store::PermissionPolicy::Deny,
            matrix_room_id: None,
            acp_session_id: None,
            created_at: 0,
            sandbox: None,
            allowed_ports: None,
            budget_job_usd: None,
            budget_job_tokens: None,
            budget_day_usd: None,
            budget_month_usd: None,
            reply_footer: true,
            agent_options: "{}".into(),
            mcp_servers: "[]".into(),
            additional_directories: "[]".into(),
            webhook_token_sha256: None,
            webhook_secret: None,
            webhook_template: template.map(str::to_string),
        }
    }

    /// A value that holds a placeholder is put in as it is, never filled in again: an action
    /// of `{payload}` repeated must not multiply the payload into the prompt.
    #[test]
    fn github_template_is_filled_in_one_pass() {
        let config = WebhookConfig::default();
        let action = "{payload}".repeat(50);
        let payload = serde_json::json!({
            "action": action,
            "repository": { "full_name": "{event}/{delivery}" },
        });
        let prompt = github_prompt(
            &config,
            &channel(Some("{event} {action} {repository} {delivery} {nope} {")),
            "issues",
            "d-{action}",
            &payload,
        );
        assert_eq!(
            prompt,
            format!("issues {action} {{event}}/{{delivery}} d-{{action}} {{nope}} {{")
        );
        let default = github_prompt(&config, &channel(None), "issues", "d-1", &payload);
        let json = serde_json::to_string_pretty(&payload).unwrap();
        assert_eq!(default.matches(&json).count(), 1, "{default}");
        assert!(default.len() < 2 * json.len() + DEFAULT_GITHUB_TEMPLATE.len());
    }
}
