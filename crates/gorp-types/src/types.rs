//! Rows and values the store reads and writes.

use serde::{Deserialize, Serialize};

/// UTC milliseconds since the Unix epoch: the unit of every timestamp in the database.
pub type Millis = i64;

/// What [`now_ms`] adds to this machine's clock: 0 on SQLite; on PostgreSQL the measured
/// difference to the database server's clock, so every node stamps and compares leases on one
/// clock (the database's) whatever its own clock says.
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The current time in [`Millis`], on the database's clock (see [`set_clock_offset`]).
pub fn now_ms() -> Millis {
    local_now_ms() + CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}

/// This machine's clock in [`Millis`], without the database offset.
pub fn local_now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Sets what [`now_ms`] adds to this machine's clock (the database clock minus this one's).
pub fn set_clock_offset(ms: Millis) {
    CLOCK_OFFSET_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// What [`now_ms`] adds to this machine's clock.
pub fn clock_offset() -> Millis {
    CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Hex SHA-256 of `s`: how channel tokens are stored (both stores hash what they are given).
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Renders a timestamp as `YYYY-MM-DD HH:MM:SS.mmm` UTC.
pub fn format_ms(ms: Millis) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

pub use crate::kinds::{
    CatchUp, EventKind, JobState, Overlap, PermissionPolicy, Source, WarmState,
};

/// A named conversation with one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Channel {
    pub id: i64,
    pub name: String,
    pub webhook_id: String,
    pub agent_binary: Option<String>,
    /// JSON array of extra agent arguments, if overridden.
    pub agent_args: Option<String>,
    pub permission_policy: PermissionPolicy,
    pub matrix_room_id: Option<String>,
    pub acp_session_id: Option<String>,
    pub created_at: Millis,
    /// Overrides `[acp] sandbox` (none: the config's).
    pub sandbox: Option<SandboxMode>,
    /// Overrides `[acp] allowed_ports`: a JSON array of TCP ports (none: the config's).
    pub allowed_ports: Option<String>,
    /// Overrides `[budget] job_max_cost_usd` (none: the config's).
    pub budget_job_usd: Option<f64>,
    /// Overrides `[budget] job_max_tokens` (none: the config's).
    pub budget_job_tokens: Option<i64>,
    /// Overrides `[budget] daily_max_cost_usd` (none: the config's).
    pub budget_day_usd: Option<f64>,
    /// Overrides `[budget] monthly_max_cost_usd` (none: the config's).
    pub budget_month_usd: Option<f64>,
    /// Its Matrix replies end with a footer: duration · tokens · cost.
    pub reply_footer: bool,
    /// Session config options set for the channel: a JSON object, option id (or category) →
    /// value.
    #[serde(with = "json_text")]
    #[schema(value_type = Object)]
    pub agent_options: String,
    /// MCP servers given to its agent's sessions: a JSON array (env and header values are
    /// masked when shown).
    #[serde(
        serialize_with = "json_text::masked",
        deserialize_with = "json_text::deserialize"
    )]
    #[schema(value_type = Vec<Object>)]
    pub mcp_servers: String,
    /// Workspace roots besides the channel's own: a JSON array of absolute paths.
    #[serde(with = "json_text")]
    #[schema(value_type = Vec<String>)]
    pub additional_directories: String,
    /// SHA-256 of the channel's own webhook bearer token (never serialised).
    #[serde(skip)]
    #[schema(ignore)]
    pub webhook_token_sha256: Option<String>,
    /// HMAC secret for `X-Hub-Signature-256` (never serialised).
    #[serde(skip)]
    #[schema(ignore)]
    pub webhook_secret: Option<String>,
    pub webhook_template: Option<String>,
}

impl Channel {
    /// The session config options set for the channel.
    pub fn options(&self) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(&self.agent_options).unwrap_or_default()
    }

    /// The additional directories of its agent's sessions.
    pub fn directories(&self) -> Vec<std::path::PathBuf> {
        serde_json::from_str(&self.additional_directories).unwrap_or_default()
    }

    /// The TCP ports its agent may connect to, when the channel sets them.
    pub fn ports(&self) -> Option<Vec<u16>> {
        self.allowed_ports
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
    }

    /// Whether the channel has webhook credentials of its own.
    pub fn has_webhook_credentials(&self) -> bool {
        self.webhook_token_sha256.is_some() || self.webhook_secret.is_some()
    }
}

/// What `channel_insert` needs.
#[derive(Debug, Clone, Default)]
pub struct NewChannel {
    pub name: String,
    pub agent_binary: Option<String>,
    pub agent_args: Option<Vec<String>>,
    pub permission_policy: Option<PermissionPolicy>,
    pub matrix_room_id: Option<String>,
    /// The channel's own webhook bearer token; only its SHA-256 is stored.
    pub webhook_token: Option<String>,
    /// Secret for GitHub-style signatures.
    pub webhook_secret: Option<String>,
    /// Prompt template for GitHub deliveries.
    pub webhook_template: Option<String>,
    pub sandbox: Option<SandboxMode>,
    pub allowed_ports: Option<Vec<u16>>,
}

/// Channel names: `[a-z0-9][a-z0-9_-]{0,63}`, so a name is always a safe directory name.
pub fn validate_channel_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid channel name {name:?}: use 1-64 characters a-z, 0-9, '_' or '-', starting with a letter or digit"
        ))
    }
}

/// A job row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub channel_id: i64,
    pub channel: String,
    pub source: Source,
    pub prompt: String,
    pub state: JobState,
    pub priority: i64,
    /// Runs started so far; fences every transition out of `running`.
    pub attempt: i64,
    pub max_attempts: i64,
    /// Runs cut short by gorp's own death (rescued); they do not spend `max_attempts`.
    pub interruptions: i64,
    pub run_at: Millis,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<Millis>,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub reply_target: Option<String>,
    pub stop_reason: Option<String>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<Millis>,
    /// The channel's permission policy when the row was read (the claim reads it, so a warm
    /// job needs no read of the channel row). Not part of the job's JSON.
    #[serde(skip)]
    #[schema(ignore)]
    pub permission_policy: PermissionPolicy,
    /// A limit on this job's turn below `[acp] prompt_timeout_secs`.
    pub timeout_secs: Option<i64>,
    /// A limit on this job's cost below the channel's per-job budget.
    pub max_cost_usd: Option<f64>,
    /// The channel's per-job budget overrides, read with the row like the policy.
    #[serde(skip)]
    #[schema(ignore)]
    pub budget_job_usd: Option<f64>,
    #[serde(skip)]
    #[schema(ignore)]
    pub budget_job_tokens: Option<i64>,
    /// The job's own session config options (a JSON object), over its channel's.
    #[serde(with = "json_text::option")]
    #[schema(value_type = Option<Object>)]
    pub agent_options: Option<String>,
    /// The channel's options, read with the row like the policy.
    #[serde(skip)]
    #[schema(ignore)]
    pub channel_options: String,
}

impl Job {
    /// The options its turn runs with: the channel's, with the job's own over them.
    pub fn options(&self) -> std::collections::BTreeMap<String, String> {
        let mut all: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&self.channel_options).unwrap_or_default();
        if let Some(own) = &self.agent_options {
            let own: std::collections::BTreeMap<String, String> =
                serde_json::from_str(own).unwrap_or_default();
            all.extend(own);
        }
        all
    }

    /// The fence a worker holds while it runs this attempt.
    pub fn lease(&self) -> Option<Lease> {
        Some(Lease {
            job_id: self.id.clone(),
            attempt: self.attempt,
            owner: self.lease_owner.clone()?,
        })
    }

    /// Runs that counted against `max_attempts`: every run except those cut short by gorp's
    /// own death.
    pub fn counted_attempts(&self) -> i64 {
        self.attempt - self.interruptions
    }
}

/// Identifies one attempt of one job by one worker. Every transition out of `running` is
/// guarded by all three, so a worker that lost its lease can never overwrite a newer attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: String,
    pub attempt: i64,
    pub owner: String,
}

/// What `job_insert` needs.
#[derive(Debug, Clone, Serialize)]
pub struct NewJob {
    pub channel_id: i64,
    pub source: Source,
    pub prompt: String,
    pub priority: i64,
    pub max_attempts: i64,
    /// Earliest start; `None` means now.
    pub run_at: Option<Millis>,
    pub idempotency_key: Option<String>,
    pub reply_target: Option<String>,
    /// The schedule and slot this job fires (source `schedule`).
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<Millis>,
    /// A limit on the job's turn (seconds).
    pub timeout_secs: Option<i64>,
    /// A limit on the job's cost (USD).
    pub max_cost_usd: Option<f64>,
    /// Session config options for this job's turn (a JSON object), over its channel's.
    pub agent_options: Option<String>,
}

impl NewJob {
    pub fn new(channel_id: i64, source: Source, prompt: impl Into<String>) -> Self {
        Self {
            channel_id,
            source,
            prompt: prompt.into(),
            priority: 0,
            max_attempts: 3,
            run_at: None,
            idempotency_key: None,
            reply_target: None,
            schedule_id: None,
            scheduled_for: None,
            timeout_secs: None,
            max_cost_usd: None,
            agent_options: None,
        }
    }
}

/// Checks a set of session config options as text can: names and values of sane size. Whether
/// the agent offers them is checked against what it reported (see `acp::client::check_options`).
pub fn validate_options(
    options: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    if options.len() > 32 {
        return Err("at most 32 options".into());
    }
    for (k, v) in options {
        let ok_key = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-./:".contains(&b));
        if !ok_key {
            return Err(format!(
                "option name {k:?}: 1-64 characters a-z, A-Z, 0-9 or _-./:"
            ));
        }
        if v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_control()) {
            return Err(format!(
                "option {k}: the value must be 1-256 printable characters"
            ));
        }
    }
    Ok(())
}

/// Parses `KEY=VALUE` settings into options.
pub fn parse_options<'a>(
    pairs: impl IntoIterator<Item = &'a str>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("option {p:?}: expected NAME=VALUE"));
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    validate_options(&out)?;
    Ok(out)
}

/// Largest accepted prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 1024 * 1024;
/// Largest accepted idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

impl NewJob {
    /// Refuses input that must never be written.
    pub fn validate(&self) -> Result<(), String> {
        if self.prompt.trim().is_empty() {
            return Err("prompt is empty".into());
        }
        if self.prompt.len() > MAX_PROMPT_BYTES {
            return Err(format!("prompt is longer than {MAX_PROMPT_BYTES} bytes"));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err("max_attempts must be between 1 and 100".into());
        }
        if !(-1000..=1000).contains(&self.priority) {
            return Err("priority must be between -1000 and 1000".into());
        }
        if self
            .timeout_secs
            .is_some_and(|t| !(1..=7 * 86_400).contains(&t))
        {
            return Err("timeout_secs must be between 1 and 604800 (a week)".into());
        }
        if self
            .max_cost_usd
            .is_some_and(|c| !c.is_finite() || !(0.0..=1e6).contains(&c))
        {
            return Err("max_cost_usd must be a number from 0 to 1000000".into());
        }
        if let Some(o) = &self.agent_options {
            let map: std::collections::BTreeMap<String, String> =
                serde_json::from_str(o).map_err(|_| {
                    "options must be an object of option names to text values".to_string()
                })?;
            validate_options(&map)?;
        }
        if let Some(k) = &self.idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(format!(
                    "idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// The result of an enqueue: the job's id, and whether this call created it (false when the
/// idempotency key matched an existing job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub job_id: String,
    pub created: bool,
}

/// An event to append to a job's log.
#[derive(Debug, Clone, Serialize)]
pub struct NewEvent {
    pub job_id: String,
    pub attempt: i64,
    pub kind: String,
    pub text: Option<String>,
    pub data: Option<serde_json::Value>,
    pub at: Millis,
}

/// The `rescued` event of a running job whose lease expired, as every backend records it:
/// `state` and `interruptions` are the job's after the rescue, `error` the reason stored on it,
/// `in_turn` whether the run was cut short during the agent's turn.
#[allow(clippy::too_many_arguments)]
pub fn rescue_event(
    job_id: &str,
    attempt: i64,
    in_turn: bool,
    state: JobState,
    interruptions: i64,
    error: &str,
    max_rescues: i64,
    at: Millis,
) -> NewEvent {
    let text = match (state, in_turn) {
        (JobState::Cancelled, _) => format!("{error}; cancel was pending, job cancelled"),
        (JobState::Queued, false) => format!(
            "{error}; run {attempt} was cut short before its prompt reached the agent, so it is \
             not counted; the job will be re-run"
        ),
        (JobState::Queued, true) => format!(
            "{error}; run {attempt} was interrupted during the agent's turn ({interruptions} of \
             at most {max_rescues} interruptions, not counted as a failed attempt); the job will \
             be re-run"
        ),
        _ => format!(
            "{error}; interrupted during the agent's turn {interruptions} times, more than \
             [worker] max_rescues = {max_rescues}: job failed"
        ),
    };
    NewEvent {
        job_id: job_id.to_string(),
        attempt,
        kind: crate::kinds::EventKind::Rescued.as_str().into(),
        text: Some(text),
        data: Some(serde_json::json!({
            "state": state,
            "in_turn": in_turn,
            "interruptions": interruptions,
        })),
        at,
    }
}

/// A stored job event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub seq: i64,
    pub job_id: String,
    pub attempt: i64,
    pub kind: String,
    pub text: Option<String>,
    pub data: Option<serde_json::Value>,
    pub at: Millis,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its worker was asked to stop.
    Requested,
    /// The job had already finished in this state.
    AlreadyFinished(JobState),
}

/// Filters for `job_list`.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub channel: Option<String>,
    pub source: Option<Source>,
    /// Only jobs whose prompt contains this text (case-insensitive for ASCII).
    pub text: Option<String>,
    /// Only jobs created before this (job id) — cursor pagination, newest first.
    pub before: Option<String>,
    pub limit: i64,
}

/// A job returned to the queue or failed by the rescuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescued {
    pub job_id: String,
    pub attempt: i64,
    pub state: JobState,
}

/// A row of the warm-session lease table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarmSession {
    pub channel_id: i64,
    pub channel: String,
    pub holder: Option<String>,
    pub state: WarmState,
    pub acp_session_id: Option<String>,
    pub pid: Option<i64>,
    pub last_used_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub warm_at: Option<Millis>,
    pub lease_expires_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub error: Option<String>,
    /// The sandbox the agent runs in (a one-line summary).
    pub sandbox: Option<String>,
    /// What the agent said of itself when its session opened, and the session's config
    /// options (JSON: `agent`, `capabilities`, `options`).
    pub agent_info: Option<String>,
    pub updated_at: Millis,
}

/// A gorp node (one process start) sharing the database, as `gorp nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// The instance id its job and warm leases carry (`host:pid:nonce`).
    pub id: String,
    pub host: String,
    pub pid: i64,
    /// The gorp version it runs.
    pub version: String,
    /// `up`, `gone` (its lease ran out: killed or cut off) or `stopped` (shut down cleanly).
    pub state: String,
    pub started_at: Millis,
    pub last_seen_at: Millis,
    pub lease_expires_at: Millis,
    pub stopped_at: Option<Millis>,
    /// What the node adds to its clock to read the database's, in ms.
    pub clock_offset_ms: i64,
    /// How many jobs it runs at once.
    pub slots: i64,
    /// Channels whose agent it holds (warm, starting or busy).
    pub channels: i64,
    /// Jobs it is running.
    pub running: i64,
    /// What it leads (`matrix`: the Matrix bot runs there).
    pub leads: Vec<String>,
}

/// What a node writes of itself when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStart {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub slots: i64,
}

/// Facts about one attempt that `job_history` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunFacts {
    /// Whether the agent was already warm when the attempt started.
    pub warm: Option<bool>,
    /// Milliseconds from the start of the attempt to the agent's first output.
    pub first_output_ms: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    /// Tokens read from and written to the model's prompt cache, where the agent reports them.
    pub cache_read_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    /// What the turn cost (the agent reports a session's cumulative cost; this is the turn's
    /// part of it).
    pub cost_usd: Option<f64>,
    /// How long the turn ran.
    pub agent_ms: Option<i64>,
}

/// How `usage_report` groups its rows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum UsageBy {
    /// One row per UTC day (`YYYY-MM-DD`).
    Day,
    Channel,
    Source,
}

impl UsageBy {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageBy::Day => "day",
            UsageBy::Channel => "channel",
            UsageBy::Source => "source",
        }
    }
}

impl std::str::FromStr for UsageBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(UsageBy::Day),
            "channel" => Ok(UsageBy::Channel),
            "source" => Ok(UsageBy::Source),
            _ => Err(format!(
                "unknown grouping {s:?}; expected day, channel or source"
            )),
        }
    }
}

/// What a usage report covers.
#[derive(Debug, Clone)]
pub struct UsageFilter {
    /// Attempts whose turn ended at or after this (Unix ms).
    pub since: Millis,
    pub channel: Option<String>,
    pub by: UsageBy,
}

/// One row of a usage report: every attempt of the group, summed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The day, channel or source.
    pub key: String,
    pub jobs: i64,
    pub attempts: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub cost_usd: f64,
    pub agent_secs: f64,
}

/// The windows a channel's spend is counted in, and the budgets of channels without their own.
/// The caller computes the windows (in the scheduler's zone) from its `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpendLimits {
    /// Start of the current day (Unix ms).
    pub day_start: Millis,
    /// Start of the current month (Unix ms).
    pub month_start: Millis,
    /// `[budget] daily_max_cost_usd`.
    pub daily_max: Option<f64>,
    /// `[budget] monthly_max_cost_usd`.
    pub monthly_max: Option<f64>,
}

/// A budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpendWindow {
    Day,
    Month,
}

impl SpendWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendWindow::Day => "day",
            SpendWindow::Month => "month",
        }
    }
}

/// What a channel spent in the current day and month (committed usage rows), and its budgets
/// for them (the channel's own, else the config's; none: no limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelSpend {
    #[serde(skip)]
    #[schema(ignore)]
    pub channel_id: i64,
    pub channel: String,
    pub day_usd: f64,
    pub day_max_usd: Option<f64>,
    pub month_usd: f64,
    pub month_max_usd: Option<f64>,
}

impl ChannelSpend {
    /// The window whose budget is spent, if any (the month first: it holds longer), with the
    /// spend and the budget.
    pub fn spent(&self) -> Option<(SpendWindow, f64, f64)> {
        let over = |spent: f64, max: Option<f64>| max.filter(|m| spent >= *m);
        if let Some(m) = over(self.month_usd, self.month_max_usd) {
            return Some((SpendWindow::Month, self.month_usd, m));
        }
        over(self.day_usd, self.day_max_usd).map(|m| (SpendWindow::Day, self.day_usd, m))
    }
}

/// A channel's next job, due, held because the channel's budget is spent, and not yet told so.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldJob {
    pub job_id: String,
    pub attempt: i64,
    pub spend: ChannelSpend,
}

/// What the claim would find now: whether a job is due, the earliest future `run_at` of a
/// channel's next job, and the due jobs held by a spent budget that have not been told so.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueOutlook {
    pub due: bool,
    pub next: Option<Millis>,
    pub held: Vec<HeldJob>,
}

/// A schedule row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    pub id: i64,
    pub channel_id: i64,
    pub channel: String,
    /// The cron expression; `None` for a one-off.
    pub cron: Option<String>,
    pub timezone: String,
    pub prompt: String,
    pub enabled: bool,
    pub catch_up: CatchUp,
    pub overlap: Overlap,
    pub next_run_at: Option<Millis>,
    pub last_fired_at: Option<Millis>,
    pub done: bool,
    pub skipped: i64,
    pub last_skip: Option<String>,
    pub created_by: String,
    pub created_at: Millis,
}

/// What `schedule_insert` needs (already validated by the scheduler module).
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub channel_id: i64,
    pub cron: Option<String>,
    pub timezone: String,
    pub prompt: String,
    pub catch_up: CatchUp,
    pub overlap: Overlap,
    pub next_run_at: Millis,
    pub created_by: String,
}

/// One firing decided by the scheduler: move `next_run_at` from `old_next` to `new_next` and
/// insert one job per slot, in one transaction guarded by `old_next`.
#[derive(Debug, Clone)]
pub struct Firing {
    pub schedule_id: i64,
    pub old_next: Millis,
    pub new_next: Option<Millis>,
    pub slots: Vec<Millis>,
    /// Missed slots passed over under the `catch_up` policy, for the record.
    pub skipped_slots: usize,
    /// The schedule's `catch_up` policy, named in the record of skipped slots.
    pub catch_up: CatchUp,
    pub max_attempts: i64,
}

impl Firing {
    /// What a firing that won its slot does, on every backend: the slots it enqueues and the
    /// note of what it skipped. `overlap = skip` keeps at most one run of the schedule queued or
    /// running, also when several slots are due at once (after a restart); `busy_job` is such a
    /// run, if one exists.
    pub fn plan(&self, overlap: Overlap, busy_job: Option<&str>) -> (&[Millis], Option<String>) {
        let mut notes = Vec::new();
        if self.skipped_slots > 0 {
            notes.push(format!(
                "{} missed slot(s) skipped (catch_up = {})",
                self.skipped_slots, self.catch_up
            ));
        }
        let slots: &[Millis] = match (busy_job, overlap) {
            (Some(busy), Overlap::Skip) if !self.slots.is_empty() => {
                notes.push(format!(
                    "{} slot(s) skipped: the previous run {busy} is still queued or running \
                     (overlap = skip)",
                    self.slots.len()
                ));
                &[]
            }
            (None, Overlap::Skip) if self.slots.len() > 1 => {
                notes.push(format!(
                    "{} slot(s) skipped: the run of the slot due first is still queued \
                     (overlap = skip)",
                    self.slots.len() - 1
                ));
                &self.slots[..1]
            }
            _ => &self.slots,
        };
        (slots, (!notes.is_empty()).then(|| notes.join("; ")))
    }

    /// The jobs of `slots` (from [`Firing::plan`]) for the schedule's channel and prompt.
    pub fn jobs(&self, channel_id: i64, prompt: &str, slots: &[Millis]) -> Vec<NewJob> {
        slots
            .iter()
            .map(|slot| NewJob {
                max_attempts: self.max_attempts,
                schedule_id: Some(self.schedule_id),
                scheduled_for: Some(*slot),
                ..NewJob::new(channel_id, Source::Schedule, prompt)
            })
            .collect()
    }
}

/// What a firing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired {
    /// False when another scheduler had already advanced the schedule.
    pub won: bool,
    pub job_ids: Vec<String>,
    /// Why no job was inserted for a slot (overlap `skip`).
    pub skipped: Option<String>,
}

pub use crate::kinds::{ApprovalState, DecidedVia, RequestKind, SandboxMode};

/// One option of a permission request, as the agent offered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalOption {
    /// The agent's option id (answered back to it).
    pub id: String,
    pub name: String,
    /// `allow_once`, `allow_always`, `reject_once` or `reject_always`.
    pub kind: String,
}

impl From<ApprovalOption> for serde_json::Value {
    fn from(o: ApprovalOption) -> Self {
        serde_json::json!({ "id": o.id, "name": o.name, "kind": o.kind })
    }
}

/// A permission request or a question of the agent under the policy `ask`, and its decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub id: String,
    pub job_id: String,
    pub attempt: i64,
    pub channel_id: i64,
    pub channel: String,
    /// The channel's Matrix room, if it has one (where the request is posted).
    pub matrix_room_id: Option<String>,
    /// `permission` (allow or deny a tool call) or `question` (answer a form or decline).
    pub request: RequestKind,
    pub tool_call_id: Option<String>,
    /// A permission request's title; a question's message.
    pub title: Option<String>,
    /// The tool's kind as the agent named it (`edit`, `execute`, `read`, `fetch`, …); for a
    /// question, its mode (`form`).
    pub kind: Option<String>,
    /// The tool's input as the agent sent it: `rawInput` (command, path, content), `content`
    /// (diffs) and `locations`. For a question: `{"requestedSchema": …}`, the form's fields.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// The options of a permission request (none for a question).
    pub options: Vec<ApprovalOption>,
    pub state: ApprovalState,
    /// The option the agent was answered with.
    pub option_id: Option<String>,
    /// The content an answered question was answered with (field name → value).
    #[schema(value_type = Option<Object>)]
    pub answer: Option<serde_json::Value>,
    /// Who decided: a Matrix user id, `http`, the CLI's user, or `gorp`.
    pub decided_by: Option<String>,
    pub decided_via: Option<DecidedVia>,
    /// The standing rule that decided it, or that its "allow always" created.
    pub rule_id: Option<i64>,
    pub created_at: Millis,
    /// When it is denied with `timeout` if nobody decides.
    pub expires_at: Millis,
    pub decided_at: Option<Millis>,
}

impl Approval {
    /// The offered option with this id.
    pub fn option(&self, id: &str) -> Option<&ApprovalOption> {
        self.options.iter().find(|o| o.id == id)
    }

    /// The state a refusal (a deny, or the timeout) leaves it in: `denied`, or `declined` for a
    /// question.
    pub fn refused(&self) -> ApprovalState {
        match self.request {
            RequestKind::Permission => ApprovalState::Denied,
            RequestKind::Question => ApprovalState::Declined,
        }
    }

    /// The first offered option of one of `kinds`, in the order of `kinds`.
    pub fn option_of_kind(&self, kinds: &[&str]) -> Option<&ApprovalOption> {
        kinds
            .iter()
            .find_map(|k| self.options.iter().find(|o| o.kind == *k))
    }
}

/// What `approval_insert` needs; `event` is the job's `permission_request` event, committed
/// with the row.
#[derive(Debug, Clone)]
pub struct NewApproval {
    pub id: String,
    pub job_id: String,
    pub attempt: i64,
    pub request: RequestKind,
    pub tool_call_id: Option<String>,
    pub title: Option<String>,
    pub kind: Option<String>,
    pub input: serde_json::Value,
    pub options: Vec<ApprovalOption>,
    pub expires_at: Millis,
    pub event: NewEvent,
    /// Decided at once in the same transaction (by a standing rule): never seen pending.
    pub decided: Option<Decision>,
}

/// A decision on a pending approval.
#[derive(Debug, Clone)]
pub struct Decision {
    pub state: ApprovalState,
    pub option_id: Option<String>,
    /// A question's answer (for `answered`).
    pub answer: Option<serde_json::Value>,
    pub by: String,
    pub via: DecidedVia,
    /// The rule that decided it.
    pub rule_id: Option<i64>,
    /// The rule its "allow always" creates (in the same transaction).
    pub new_rule: Option<NewRule>,
}

/// Filter of `approval_list`.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFilter {
    pub state: Option<ApprovalState>,
    pub request: Option<RequestKind>,
    pub channel: Option<String>,
    pub job_id: Option<String>,
    pub limit: i64,
}

/// A standing "allow always" rule to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRule {
    pub channel_id: i64,
    pub tool_kind: String,
    pub matcher: String,
    pub created_by: String,
    pub created_via: String,
    pub approval_id: Option<String>,
}

/// A channel's standing rule: later requests of `tool_kind` matching `matcher` are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rule {
    pub id: i64,
    pub channel_id: i64,
    pub channel: String,
    pub tool_kind: String,
    /// `program:<name>`, `path:<directory>/` or `title:<exact title>`.
    pub matcher: String,
    pub created_by: String,
    pub created_via: String,
    pub approval_id: Option<String>,
    pub created_at: Millis,
}

/// Changes to a channel's settings, applied together: each `Some` is set; for the overrides,
/// `Some(None)` goes back to the config's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelUpdate {
    pub permission_policy: Option<PermissionPolicy>,
    pub sandbox: Option<Option<SandboxMode>>,
    /// A JSON array of TCP ports.
    pub allowed_ports: Option<Option<String>>,
    pub budget_job_usd: Option<Option<f64>>,
    pub budget_job_tokens: Option<Option<i64>>,
    pub budget_day_usd: Option<Option<f64>>,
    pub budget_month_usd: Option<Option<f64>>,
    pub reply_footer: Option<bool>,
    /// The whole set of session config options (a JSON object).
    pub agent_options: Option<String>,
    /// The whole list of MCP servers (a JSON array).
    pub mcp_servers: Option<String>,
    /// The whole list of additional directories (a JSON array).
    pub additional_directories: Option<String>,
}

/// A dashboard session as its cookie finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSession {
    /// SHA-256 of the API token it was opened with.
    pub token_sha256: String,
    /// What every form of the session carries.
    pub csrf: String,
    pub expires_at: Millis,
}

/// Jobs of one channel by the state that matters for its queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelDepth {
    pub channel: String,
    pub queued: i64,
    pub running: i64,
}

/// What one attempt of a job spent (its usage row).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptUsage {
    pub attempt: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub cost_usd: f64,
    pub agent_ms: i64,
}

/// Where a Matrix job came from: stored as JSON in `jobs.reply_target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixTarget {
    pub room_id: String,
    pub event_id: String,
    pub sender: String,
}

/// An open reply row with the facts of its job that the pump needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixReply {
    pub job_id: String,
    /// The job's channel.
    pub channel: String,
    pub room_id: String,
    pub prompt_event_id: Option<String>,
    pub sender: Option<String>,
    pub reaction_key: Option<String>,
    pub reaction_event_id: Option<String>,
    pub reply_event_id: Option<String>,
    pub edits: i64,
    pub rendered_seq: i64,
    pub noted_attempt: i64,
    pub updated_at: Millis,
    pub source: Source,
    pub state: JobState,
    pub attempt: i64,
    pub max_attempts: i64,
    pub error: Option<String>,
    pub stop_reason: Option<String>,
    /// The job's newest event (0 when it has none).
    pub last_seq: i64,
    /// The last attempt's turn, for the reply's footer.
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    /// The channel wants the footer.
    pub reply_footer: bool,
}

/// What a reply row says after the pump acted on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatrixReplyUpdate {
    pub reaction_key: Option<String>,
    pub reaction_event_id: Option<String>,
    pub reply_event_id: Option<String>,
    pub edits: i64,
    pub rendered_seq: i64,
    pub noted_attempt: i64,
    pub done: bool,
    pub error: Option<String>,
}

impl MatrixReply {
    /// The row as it stands, to be changed and written back.
    pub fn update(&self) -> MatrixReplyUpdate {
        MatrixReplyUpdate {
            reaction_key: self.reaction_key.clone(),
            reaction_event_id: self.reaction_event_id.clone(),
            reply_event_id: self.reply_event_id.clone(),
            edits: self.edits,
            rendered_seq: self.rendered_seq,
            noted_attempt: self.noted_attempt,
            done: false,
            error: None,
        }
    }
}

/// An approval the Matrix bot has to post (no `event_id` yet) or whose message it has to edit
/// to show the decision.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixApprovalDue {
    pub approval_id: String,
    pub room_id: String,
    /// The posted message, when there is one.
    pub event_id: Option<String>,
    pub state: ApprovalState,
    pub attempts: i64,
}

/// What a warm-session row should say after an upsert.
#[derive(Debug, Clone)]
pub struct WarmUpdate {
    pub state: WarmState,
    pub pid: Option<i64>,
    pub session: Option<String>,
    pub lease_until: Millis,
    /// New `expires_at` (idle + keep-alive), if it changes.
    pub expires_at: Option<Millis>,
    /// Sets `last_used_at` to now.
    pub used: bool,
    /// The sandbox the agent runs in (its summary), when it changes.
    pub sandbox: Option<String>,
    /// What the agent said of itself and its session's options (JSON), when they change.
    pub agent_info: Option<String>,
}

/// Serde for columns that hold JSON text: shown as the JSON value itself.
pub mod json_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(serde_json::Value::deserialize(d)?.to_string())
    }

    /// Like [`serialize`], every value of an `env` or `headers` object masked.
    pub fn masked<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        mask(text).serialize(s)
    }

    /// The JSON with every value of an `env` or `headers` object replaced by `********`.
    pub fn mask(text: &str) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        if let Some(list) = v.as_array_mut() {
            for server in list {
                for key in ["env", "headers"] {
                    if let Some(map) = server.get_mut(key).and_then(|m| m.as_object_mut()) {
                        map.values_mut().for_each(|x| *x = "********".into());
                    }
                }
            }
        }
        v
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
            match text {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
            let v = Option::<serde_json::Value>::deserialize(d)?;
            Ok(v.filter(|v| !v.is_null()).map(|v| v.to_string()))
        }
    }
}
