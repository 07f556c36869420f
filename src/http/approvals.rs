//! `/api/approvals`, a channel's permission policy and its standing rules. Same bearer tokens
//! as the rest of `/api`. A decision names one of the options the agent offered (or the
//! shorthand `allow`, `allow_always`, `deny`); a question of the agent is answered with
//! `answer` (its form's content) or declined with `deny`. An unknown id is 404, a decided one
//! 409, an option the agent did not offer or an answer that does not fit the form 400, and
//! none of them writes anything.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::ApiAuth;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::HttpState;
use crate::service::approvals::{self, Choice, DecideError};
use crate::service::channels;
use crate::store::{
    Approval, ApprovalFilter, ApprovalState, Channel, DecidedVia, PermissionPolicy, RequestKind,
    Rule, SandboxMode,
};

pub(super) fn routes() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(list_approvals))
        .routes(routes!(get_approval, decide_approval))
        .routes(routes!(set_channel))
        .routes(routes!(channel_options))
        .routes(routes!(list_rules))
        .routes(routes!(delete_rule))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsQuery {
    pub state: Option<ApprovalState>,
    /// `permission` or `question`.
    pub request: Option<RequestKind>,
    /// A channel name.
    pub channel: Option<String>,
    /// A job id.
    pub job: Option<String>,
    /// Most approvals returned, newest first (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// Approvals, newest first (`?state=pending` for the ones waiting for a person).
#[utoipa::path(get, path = "/api/approvals", tag = "approvals", params(ApprovalsQuery),
    responses((status = 200, body = [Approval]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_approvals(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    q: Result<Query<ApprovalsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Approval>>> {
    let Query(q) = q.map_err(ApiError::query)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let filter = ApprovalFilter {
        state: q.state,
        request: q.request,
        channel: q.channel,
        job_id: q.job,
        limit,
    };
    Ok(Json(approvals::list(&st.store, &filter).await?))
}

fn decide_error(e: DecideError) -> ApiError {
    match e {
        DecideError::NotFound(_) | DecideError::Ambiguous(_) => ApiError::NotFound(e.to_string()),
        DecideError::AlreadyDecided { .. } => ApiError::Conflict(e.to_string()),
        DecideError::NotOffered(..)
        | DecideError::IsQuestion(_)
        | DecideError::NotQuestion(_)
        | DecideError::BadAnswer(_) => ApiError::BadRequest(e.to_string()),
        DecideError::Store(e) => e.into(),
    }
}

/// One approval (a whole id).
#[utoipa::path(get, path = "/api/approvals/{id}", tag = "approvals", params(("id" = String, Path)),
    responses((status = 200, body = Approval), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_approval(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Approval>> {
    st.store
        .approval_get(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no approval with id {id:?}")))
}

/// How to answer a pending approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// The agent's allow-once option.
    Allow,
    /// The agent's allow-always option, and a standing rule for the channel.
    AllowAlways,
    /// The agent's reject option; for a question, decline it.
    Deny,
}

/// A decision: `decision`, one of the offered `option_id`s, or a question's `answer` (exactly
/// one of the three).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    pub decision: Option<DecisionKind>,
    /// One of the approval's `options[].id`.
    #[schema(min_length = 1, max_length = 256)]
    pub option_id: Option<String>,
    /// A question's answer: its form's field names to values (text, number, true/false, or a
    /// list of text for a multi-select), as `input.requestedSchema` describes them.
    #[schema(value_type = Option<Object>)]
    pub answer: Option<serde_json::Map<String, serde_json::Value>>,
    /// Who decides, as recorded in `decided_by` (default `http`).
    #[schema(min_length = 1, max_length = 256)]
    pub by: Option<String>,
}

/// Decide a pending approval, or answer a question of the agent. The agent is answered at once
/// by the gorp running the job.
#[utoipa::path(post, path = "/api/approvals/{id}", tag = "approvals", params(("id" = String, Path)),
    request_body = DecideBody,
    responses((status = 200, body = Approval), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn decide_approval(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(id): Path<String>,
    body: Result<Json<DecideBody>, JsonRejection>,
) -> ApiResult<Json<Approval>> {
    let Json(body) = body.map_err(ApiError::json)?;
    let choice =
        match (body.decision, body.option_id, body.answer) {
            (Some(DecisionKind::Allow), None, None) => Choice::AllowOnce,
            (Some(DecisionKind::AllowAlways), None, None) => Choice::AllowAlways,
            (Some(DecisionKind::Deny), None, None) => Choice::Deny,
            (None, Some(o), None) if !o.is_empty() && o.len() <= 256 => Choice::Option(o),
            (None, None, Some(a)) => Choice::Answer(serde_json::Value::Object(a)),
            _ => return Err(ApiError::BadRequest(
                "give exactly one of decision (allow, allow_always, deny), option_id and answer"
                    .into(),
            )),
        };
    let by = match body.by {
        None => "http".to_string(),
        Some(b) if !b.trim().is_empty() && b.len() <= 256 && !b.chars().any(char::is_control) => b,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "by must be 1 to 256 characters without control characters".into(),
            ))
        }
    };
    if approvals::find(&st.store, &id)
        .await
        .map_err(decide_error)?
        .id
        != id
    {
        // The API takes whole ids only (prefixes are for people typing in a room).
        return Err(ApiError::NotFound(format!("no approval with id {id:?}")));
    }
    let decided = approvals::decide(&st.store, &id, choice, &by, DecidedVia::Http)
        .await
        .map_err(decide_error)?;
    Ok(Json(decided))
}

/// Changes to a channel: any of its permission policy, sandbox and allowed ports (none: the
/// channel as it is). `null` for `sandbox` or `allowed_ports` goes back to the config's.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetChannel {
    pub permission_policy: Option<PermissionPolicy>,
    /// `landlock` or `none`; `null`: `[acp] sandbox`. Applies from the agent's next start.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<SandboxMode>)]
    pub sandbox: Option<Option<SandboxMode>>,
    /// TCP ports the agent may connect to under the sandbox; `null`: `[acp] allowed_ports`.
    #[serde(default, deserialize_with = "present_ports")]
    #[schema(value_type = Option<Vec<TcpPort>>)]
    pub allowed_ports: Option<Option<Vec<u16>>>,
    /// The most one job's turn may cost (USD) before it is stopped; `null`: `[budget]
    /// job_max_cost_usd`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_job_usd: Option<Option<f64>>,
    /// The most tokens one job's turn may use; `null`: `[budget] job_max_tokens`.
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub budget_job_tokens: Option<Option<i64>>,
    /// What the channel may spend per day (USD, in `[scheduler] timezone`); once spent, its
    /// queued jobs are held until the day ends or the budget is raised; `null`: `[budget]
    /// daily_max_cost_usd`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_day_usd: Option<Option<f64>>,
    /// The same per calendar month; `null`: `[budget] monthly_max_cost_usd`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_month_usd: Option<Option<f64>>,
    /// Whether the channel's Matrix replies end with a footer: duration · tokens · cost.
    pub reply_footer: Option<bool>,
    /// The session config options set for the channel (replacing its set), option id or
    /// category → value, applied before every prompt (`GET /api/channels/{name}/options`
    /// lists what the agent offers). `{}` clears them.
    #[schema(value_type = Option<SessionOptions>)]
    pub options: Option<std::collections::BTreeMap<String, String>>,
    /// The MCP servers given to its agent's sessions (replacing its list), from the agent's
    /// next start.
    pub mcp_servers: Option<Vec<crate::config::McpServerSpec>>,
    /// Workspace roots besides the channel's own (absolute, existing directories; replacing
    /// its list), from the agent's next start.
    #[schema(value_type = Option<Vec<String>>)]
    pub additional_directories: Option<Vec<std::path::PathBuf>>,
}

/// An optional whole number as JSON Schema counts integers; present (even `null`) is `Some`.
fn present_integer<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<i64>>, D::Error> {
    super::webhook::integral(d).map(Some)
}

/// A list of TCP ports as JSON Schema counts integers (`443` and `443.0` alike), each 1 to
/// 65535.
pub(super) fn ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    use serde::de::Error;
    let Some(list) = Option::<Vec<serde_json::Number>>::deserialize(d)? else {
        return Ok(None);
    };
    list.iter()
        .map(|n| {
            n.as_u64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64))
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| D::Error::custom(format!("{n} is not a TCP port (1 to 65535)")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn present_ports<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Vec<u16>>>, D::Error> {
    ports(d).map(Some)
}

/// A TCP port, 1 to 65535 (only its schema is used).
pub struct TcpPort;

impl utoipa::PartialSchema for TcpPort {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(65535))
            .into()
    }
}

impl ToSchema for TcpPort {}

/// Session config options: an object of option names (1-64 of `A-Za-z0-9_-./:`) to values
/// (1-256 characters, no control characters), at most 32 (only its schema is used).
pub struct SessionOptions;

impl utoipa::PartialSchema for SessionOptions {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let name = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_./:-]{1,64}$"));
        let value = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(256))
            .pattern(Some("^[^\\x00-\\x1f\\x7f-\\x9f]+$"));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(name))
            .additional_properties(Some(value))
            .max_properties(Some(32))
            .into()
    }
}

impl ToSchema for SessionOptions {}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Change a channel's permission policy (its next prompt runs under it), sandbox or allowed
/// ports (from its agent's next start).
#[utoipa::path(patch, path = "/api/channels/{name}", tag = "channels", params(("name" = String, Path)),
    request_body = SetChannel,
    responses((status = 200, body = Channel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn set_channel(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Map<String, serde_json::Value>>, JsonRejection>,
) -> ApiResult<Json<Channel>> {
    // An object only (serde would also read a struct from an array).
    let Json(body) = body.map_err(ApiError::json)?;
    let body: SetChannel = serde_json::from_value(serde_json::Value::Object(body))
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    let changes = channels::Changes {
        permission_policy: body.permission_policy,
        sandbox: body.sandbox,
        allowed_ports: body.allowed_ports,
        budget_job_usd: body.budget_job_usd,
        budget_job_tokens: body.budget_job_tokens,
        budget_day_usd: body.budget_day_usd,
        budget_month_usd: body.budget_month_usd,
        reply_footer: body.reply_footer,
        options: body.options,
        mcp_servers: body.mcp_servers,
        additional_directories: body.additional_directories,
    };
    let channel = channels::update(&st.store, &name, changes)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no channel {name:?}")))?;
    Ok(Json(channel))
}

async fn channel_named(st: &HttpState, name: &str) -> ApiResult<Channel> {
    st.store
        .channel_get(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no channel {name:?}")))
}

/// A channel's session config options: those set for it, and those its agent offers (as it
/// said when its session last opened; `offered` is `null` before its first start).
#[utoipa::path(get, path = "/api/channels/{name}/options", tag = "channels", params(("name" = String, Path)),
    responses((status = 200, body = channels::OptionsView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn channel_options(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(name): Path<String>,
) -> ApiResult<Json<channels::OptionsView>> {
    let channel = channel_named(&st, &name).await?;
    Ok(Json(channels::options_view(&st.store, &channel).await?))
}

/// A channel's standing "allow always" rules.
#[utoipa::path(get, path = "/api/channels/{name}/rules", tag = "channels", params(("name" = String, Path)),
    responses((status = 200, body = [Rule]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_rules(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Rule>>> {
    let channel = channel_named(&st, &name).await?;
    Ok(Json(st.store.rule_list(channel.id).await?))
}

/// Remove a standing rule; later requests it matched ask again.
#[utoipa::path(delete, path = "/api/channels/{name}/rules/{id}", tag = "channels",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_rule(
    _auth: ApiAuth,
    State(st): State<HttpState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let channel = channel_named(&st, &name).await?;
    let Some(rule) = id.parse::<i64>().ok().filter(|i| *i >= 1) else {
        return Err(ApiError::NotFound(format!(
            "no rule {id:?}: rule ids are positive integers"
        )));
    };
    if st.store.rule_delete(channel.id, rule).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "channel {name:?} has no rule {rule}"
        )))
    }
}
