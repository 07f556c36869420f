//! `/api/*`: jobs, their events (JSON, or SSE resumable with `Last-Event-ID`), cancel,
//! channels and the warm pool. Every route needs `Authorization: Bearer` with one of the global
//! tokens (`[webhook] tokens`); with none configured the API refuses every request.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::HttpState;
use crate::auth;
use crate::service::channels;
use crate::service::schedules::{self, ScheduleError};
use crate::store::{
    now_ms, CancelOutcome, CatchUp, Channel, Event, Job, JobFilter, JobState, Node, Overlap,
    PermissionPolicy, Schedule, Source, WarmSession,
};

/// Most events in one JSON page or SSE batch.
const EVENT_PAGE: i64 = 500;

pub(super) fn routes() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(job_events))
        .routes(routes!(cancel_job))
        .routes(routes!(list_channels, create_channel))
        .routes(routes!(warm_pool))
        .routes(routes!(nodes))
        .routes(routes!(usage))
        .routes(routes!(list_schedules, create_schedule))
        .routes(routes!(delete_schedule))
        .routes(routes!(pause_schedule))
        .routes(routes!(resume_schedule))
}

/// Proof that the request carried a valid API token.
pub struct ApiAuth;

impl FromRequestParts<HttpState> for ApiAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        let tokens = &st.config.webhook.tokens;
        if tokens.is_empty() {
            return Err(ApiError::Unauthorized(
                "the API is disabled: no tokens are configured in [webhook] tokens".into(),
            ));
        }
        match super::webhook::bearer(&parts.headers) {
            Some(t) if auth::token_in(t, tokens) => {
                if st.allow(&format!("token:{}", auth::sha256_hex(t))) {
                    Ok(ApiAuth)
                } else {
                    Err(ApiError::TooManyRequests("rate limit exceeded".into()))
                }
            }
            Some(_) => Err(ApiError::Unauthorized("invalid bearer token".into())),
            None => Err(ApiError::Unauthorized(
                "missing Authorization: Bearer <token>".into(),
            )),
        }
    }
}

/// The gorp nodes sharing the database, newest first: `up`, `gone` (their lease ran out:
/// killed or cut off) or `stopped` (shut down cleanly), with the channels whose agent each
/// holds, the jobs each runs and what each leads.
#[utoipa::path(get, path = "/api/nodes", tag = "warm",
    responses((status = 200, body = [Node]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn nodes(_auth: ApiAuth, State(st): State<HttpState>) -> ApiResult<Json<Vec<Node>>> {
    Ok(Json(st.store.node_list(now_ms()).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    pub state: Option<JobState>,
    /// A channel name.
    pub channel: Option<String>,
    pub source: Option<Source>,
    /// `next_cursor` of the previous page (a job id).
    #[param(pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub cursor: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// A job id as gorp writes it: a lowercase hyphenated UUID (the form of `next_cursor`).
fn is_job_id(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(JobsQuery),
    responses((status = 200, body = JobPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_jobs(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> ApiResult<Json<JobPage>> {
    let Query(q) = q.map_err(ApiError::query)?;
    if let Some(c) = q.cursor.as_deref().filter(|c| !is_job_id(c)) {
        return Err(ApiError::BadRequest(format!(
            "cursor {c:?} is not a job id; pass the next_cursor of the previous page"
        )));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let jobs = st
        .store
        .job_list(&JobFilter {
            state: q.state,
            channel: q.channel,
            source: q.source,
            before: q.cursor,
            text: None,
            limit,
        })
        .await?;
    let next_cursor = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id.clone()))
        .flatten();
    Ok(Json(JobPage { jobs, next_cursor }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    /// The agent's answer so far: the latest attempt's message events joined.
    pub output: String,
}

/// One job with its output.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_job(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobDetail>> {
    let job = st
        .store
        .job_get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let output = st.store.job_output(&id).await?;
    Ok(Json(JobDetail { job, output }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a larger seq (`Last-Event-ID` takes precedence).
    pub after: Option<i64>,
}

/// A job's events. JSON by default; with `Accept: text/event-stream` an SSE stream (event id =
/// seq, event name = kind) that follows the job until it ends, resumable with `Last-Event-ID`.
#[utoipa::path(get, path = "/api/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path), EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = r"^[0-9]{1,18}$",
            description = "Resume after this event seq (SSE reconnects send it)")),
    responses((status = 200, body = [Event], description = "JSON, or text/event-stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn job_events(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(ApiError::query)?;
    if st.store.job_get(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job {id}")));
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let v = v.trim();
            (!v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<i64>().ok())
                .flatten()
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an event seq".into()))
        })
        .transpose()?;
    let after = last_event_id.or(q.after).unwrap_or(0);
    let wants_sse = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_sse {
        let events = st.store.job_events_list(&id, after, EVENT_PAGE).await?;
        return Ok(Json(events).into_response());
    }
    Ok(Sse::new(event_stream(st, id, after))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Follows a job's events from `after` until the job has ended and every event was sent.
fn event_stream(
    st: HttpState,
    id: String,
    after: i64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let commits = st.store.subscribe_commits();
    stream::unfold(Some((st, id, after, commits)), |state| async move {
        let (st, id, mut after, mut commits) = state?;
        loop {
            commits.borrow_and_update();
            // The state is read before the events: events commit before the terminal state,
            // so a terminal state here means the read below sees every event.
            let job = match st.store.job_get(&id).await {
                Ok(Some(j)) => j,
                _ => return None,
            };
            let events = match st.store.job_events_list(&id, after, EVENT_PAGE).await {
                Ok(e) => e,
                Err(_) => return None,
            };
            if let Some(last) = events.last() {
                after = last.seq;
                let batch: Vec<Result<SseEvent, Infallible>> = events.iter().map(|e| Ok(sse_event(e))).collect();
                return Some((stream::iter(batch), Some((st, id, after, commits))));
            }
            if job.state.is_terminal() {
                let end = SseEvent::default()
                    .event("end")
                    .json_data(serde_json::json!({ "state": job.state, "stop_reason": job.stop_reason, "error": job.error }))
                    .unwrap_or_default();
                return Some((stream::iter(vec![Ok(end)]), None));
            }
            // Woken by this process's commits; other processes' rows are seen within a second.
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(1), commits.changed()) => {}
                _ = st.shutdown.cancelled() => return None,
            }
        }
    })
    .flatten()
}

fn sse_event(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .json_data(e)
        .unwrap_or_default()
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CancelResult {
    pub job_id: String,
    pub outcome: CancelOutcome,
}

/// Cancel a job: queued jobs at once; running jobs are stopped by their worker.
#[utoipa::path(post, path = "/api/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = CancelResult), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn cancel_job(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> ApiResult<Json<CancelResult>> {
    let outcome = crate::service::jobs::cancel(&st.store, st.pool.as_ref(), &id).await?;
    Ok(Json(CancelResult {
        job_id: id,
        outcome,
    }))
}

/// Channels.
#[utoipa::path(get, path = "/api/channels", tag = "channels",
    responses((status = 200, body = [Channel]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_channels(
    _auth: ApiAuth,
    State(st): State<HttpState>,
) -> ApiResult<Json<Vec<Channel>>> {
    Ok(Json(st.store.channel_list().await?))
}

// Patterns in the schemas below: channel names as `validate_channel_name` checks them, and
// for prompts a character that is not whitespace as Rust's `str::trim` counts it (so the
// document refuses a blank prompt exactly as the server does).

/// A new channel.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// Also the workspace directory name.
    #[schema(
        pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    pub agent_binary: Option<String>,
    pub agent_args: Option<Vec<String>>,
    /// Default: `[acp] permission_policy`.
    pub permission_policy: Option<PermissionPolicy>,
    /// Secret for GitHub `X-Hub-Signature-256` deliveries.
    pub webhook_secret: Option<String>,
    /// Prompt template for GitHub deliveries: `{event}`, `{action}`, `{repository}`,
    /// `{delivery}`, `{payload}`.
    pub webhook_template: Option<String>,
    /// Default: `[acp] sandbox`.
    pub sandbox: Option<crate::store::SandboxMode>,
    /// TCP ports the agent may connect to under the sandbox. Default: `[acp] allowed_ports`.
    #[schema(value_type = Option<Vec<super::approvals::TcpPort>>)]
    #[serde(default, deserialize_with = "super::approvals::ports")]
    pub allowed_ports: Option<Vec<u16>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedChannel {
    pub channel: Channel,
    pub webhook_url: String,
    /// The channel's own webhook bearer token. Shown only here: only its hash is stored.
    pub webhook_token: String,
}

/// Create a channel (and its workspace directory).
#[utoipa::path(post, path = "/api/channels", tag = "channels", request_body = CreateChannel,
    responses((status = 201, body = CreatedChannel), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_channel(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    body: Result<Json<CreateChannel>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedChannel>)> {
    let Json(req) = body.map_err(ApiError::json)?;
    let created = channels::create(
        &st.store,
        &st.config,
        channels::NewChannelSpec {
            name: req.name,
            agent_binary: req.agent_binary,
            agent_args: req.agent_args,
            permission_policy: req.permission_policy,
            matrix_room_id: None,
            webhook_secret: req.webhook_secret,
            webhook_template: req.webhook_template,
            sandbox: req.sandbox,
            allowed_ports: req.allowed_ports,
        },
    )
    .await
    .map_err(|e| match e {
        channels::ChannelError::Store(e) => e.into(),
        e @ channels::ChannelError::Workspace { .. } => ApiError::Internal(e.to_string()),
    })?;
    let webhook_url = created.webhook_path();
    let (channel, token) = (created.channel, created.webhook_token);
    Ok((
        StatusCode::CREATED,
        Json(CreatedChannel {
            channel,
            webhook_url,
            webhook_token: token,
        }),
    ))
}

/// The warm-session pool, one row per channel with a lease.
#[utoipa::path(get, path = "/api/warm", tag = "warm",
    responses((status = 200, body = [WarmSession]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn warm_pool(
    _auth: ApiAuth,
    State(st): State<HttpState>,
) -> ApiResult<Json<Vec<WarmSession>>> {
    Ok(Json(st.store.warm_list().await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this channel.
    pub channel: Option<String>,
    /// A window back from now (`30m`, `24h`, `7d`, `4w`: 1 unit to ten years) or a UTC date
    /// (`2026-12-01`); default `7d`.
    #[param(pattern = r"^([0-9]{1,4}[mhdw]|[0-9]{4}-[0-9]{2}-[0-9]{2})$")]
    pub since: Option<String>,
    /// Rows per `day` (UTC), `channel` (default) or `source`.
    pub by: Option<crate::store::UsageBy>,
}

/// What the agents' turns cost: jobs, attempts, tokens (cache reads and writes where the agent
/// reports them), cost and agent time, from the usage rows of every attempt.
#[utoipa::path(get, path = "/api/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = crate::service::usage::Report), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn usage(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<crate::service::usage::Report>> {
    let Query(q) = q.map_err(ApiError::query)?;
    let since = crate::service::usage::parse_since(
        q.since
            .as_deref()
            .unwrap_or(crate::service::usage::DEFAULT_SINCE),
        crate::store::now_ms(),
    )
    .map_err(ApiError::BadRequest)?;
    let filter = crate::store::UsageFilter {
        since,
        channel: q.channel,
        by: q.by.unwrap_or(crate::store::UsageBy::Channel),
    };
    let policy = crate::budget::SpendPolicy::from_config(&st.config);
    Ok(Json(
        crate::service::usage::report(&st.store, filter, &policy, crate::store::now_ms()).await?,
    ))
}

/// A new schedule.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// The channel's name (404 when there is no such channel).
    #[schema(
        pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub channel: String,
    /// A cron expression (`0 9 * * 1-5`, `@daily`), `in 30m` / `in 2h`, or an RFC 3339 time.
    /// Refused with 400 when it does not parse, never fires, or names a time in the past.
    #[schema(min_length = 1)]
    pub when: String,
    #[schema(
        pattern = r"[^\t\n\x0b\x0c\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub prompt: String,
    /// IANA time zone (default: `[scheduler] timezone`, else the system's, else UTC).
    #[schema(schema_with = timezone_schema)]
    pub timezone: Option<String>,
    /// Default `once`.
    pub catch_up: Option<CatchUp>,
    /// Default `skip`.
    pub overlap: Option<Overlap>,
}

/// The time zone names gorp knows (those of `chrono-tz`), or null.
fn timezone_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let names = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|tz| serde_json::Value::from(tz.name()))
        .chain([serde_json::Value::Null]);
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(names))
        .description(Some(
            "IANA time zone (default: `[scheduler] timezone`, else the system's, else UTC).",
        ))
        .build()
}

fn schedule_error(e: ScheduleError) -> ApiError {
    match e {
        ScheduleError::Invalid(m) => ApiError::BadRequest(m),
        ScheduleError::Store(e) => e.into(),
    }
}

/// Schedules.
#[utoipa::path(get, path = "/api/schedules", tag = "schedules",
    responses((status = 200, body = [Schedule]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_schedules(
    _auth: ApiAuth,
    State(st): State<HttpState>,
) -> ApiResult<Json<Vec<Schedule>>> {
    Ok(Json(st.store.schedule_list().await?))
}

/// Add a schedule; invalid expressions and unknown zones are refused and nothing is written.
#[utoipa::path(post, path = "/api/schedules", tag = "schedules", request_body = CreateSchedule,
    responses((status = 201, body = Schedule), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_schedule(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    body: Result<Json<CreateSchedule>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Schedule>)> {
    let Json(req) = body.map_err(ApiError::json)?;
    if let Some(tz) = req.timezone.as_deref() {
        // Exactly the documented names (the scheduler would also take them padded).
        if tz.parse::<chrono_tz::Tz>().is_err() {
            return Err(ApiError::BadRequest(format!(
                "unknown time zone {tz:?}; expected an IANA name such as Europe/Berlin or UTC"
            )));
        }
    }
    let s = schedules::add(
        &st.store,
        &st.config,
        schedules::AddSchedule {
            channel: req.channel,
            when: req.when,
            prompt: req.prompt,
            timezone: req.timezone,
            catch_up: req.catch_up,
            overlap: req.overlap,
            created_by: "api".into(),
        },
        now_ms(),
    )
    .await
    .map_err(schedule_error)?;
    Ok((StatusCode::CREATED, Json(s)))
}

/// Delete a schedule (its past jobs stay).
#[utoipa::path(delete, path = "/api/schedules/{id}", tag = "schedules", params(("id" = i64, Path, minimum = 1)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_schedule(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    ScheduleId(id): ScheduleId,
) -> ApiResult<StatusCode> {
    if schedules::remove(&st.store, id)
        .await
        .map_err(schedule_error)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no schedule {id}")))
    }
}

/// Pause a schedule.
#[utoipa::path(post, path = "/api/schedules/{id}/pause", tag = "schedules", params(("id" = i64, Path, minimum = 1)),
    responses((status = 200, body = Schedule), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn pause_schedule(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    ScheduleId(id): ScheduleId,
) -> ApiResult<Json<Schedule>> {
    if !schedules::pause(&st.store, id)
        .await
        .map_err(schedule_error)?
    {
        return Err(ApiError::NotFound(format!("no active schedule {id}")));
    }
    schedule_json(&st, id).await
}

/// Resume a schedule from its next slot (paused slots are not caught up).
#[utoipa::path(post, path = "/api/schedules/{id}/resume", tag = "schedules", params(("id" = i64, Path, minimum = 1)),
    responses((status = 200, body = Schedule), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn resume_schedule(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    ScheduleId(id): ScheduleId,
) -> ApiResult<Json<Schedule>> {
    if !schedules::resume(&st.store, id, now_ms())
        .await
        .map_err(schedule_error)?
    {
        return Err(ApiError::NotFound(format!("no schedule {id}")));
    }
    schedule_json(&st, id).await
}

/// A schedule id from the path. Like an unknown job id, a path segment that cannot be a
/// schedule id (not a positive integer) names no schedule: 404.
pub struct ScheduleId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for ScheduleId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        match raw.parse::<i64>() {
            Ok(id) if id >= 1 => Ok(ScheduleId(id)),
            _ => Err(ApiError::NotFound(format!(
                "no schedule {raw:?}: schedule ids are positive integers"
            ))),
        }
    }
}

async fn schedule_json(st: &HttpState, id: i64) -> ApiResult<Json<Schedule>> {
    st.store
        .schedule_get(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no schedule {id}")))
}
