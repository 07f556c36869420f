//! Configuration: `config.toml` plus `GORP_<SECTION>_<KEY>` environment overrides.
//!
//! [`Config::load`] looks for the file named by `GORP_CONFIG_PATH`, else `./config.toml`, else
//! `~/.config/gorp/config.toml`; with no file at all the defaults apply, so `gorp start` works on
//! a fresh machine. Unknown keys, wrong types and bad values are errors that name the file (or
//! environment variable), the key and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::kinds::{PermissionPolicy, SandboxMode};

/// Environment variable naming the config file.
pub const CONFIG_PATH_ENV: &str = "GORP_CONFIG_PATH";
/// Prefix of environment overrides: `GORP_WORKER_CONCURRENCY=4` sets `[worker] concurrency`.
pub const ENV_PREFIX: &str = "GORP_";

/// `GORP_*` variables that are not config keys.
const NON_CONFIG_VARS: &[&str] = &[CONFIG_PATH_ENV, "GORP_LOG", "GORP_LOG_FORMAT"];

/// Config sections, in the order `gorp config check` prints them.
const SECTIONS: &[&str] = &[
    "database",
    "workspace",
    "worker",
    "acp",
    "webhook",
    "matrix",
    "scheduler",
    "budget",
];

/// Parts of key names whose values are secrets, masked by `gorp config check`.
const SECRET_WORDS: &[&str] = &[
    "password",
    "token",
    "secret",
    "passphrase",
    "api_key",
    "apikey",
    "access_key",
    "recovery_key",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub workspace: WorkspaceConfig,
    pub worker: WorkerConfig,
    pub acp: AcpConfig,
    pub webhook: WebhookConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<MatrixConfig>,
    pub scheduler: SchedulerConfig,
    pub budget: BudgetConfig,
    /// Where the configuration came from (a file path, or "defaults").
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// SQLite database file (the default backend).
    pub path: PathBuf,
    /// `postgres://user:password@host:port/dbname` selects PostgreSQL instead of the SQLite
    /// file (its password is masked wherever the config is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Connections in a PostgreSQL pool.
    pub max_connections: u32,
    /// `normal` (default, WAL-safe) or `full` (fsync every commit).
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock before failing.
    pub busy_timeout_ms: u64,
    /// Connections in the read pool.
    pub read_connections: u32,
    /// SQLite's page cache per connection (the writer and each reader), in MiB: most of what
    /// gorp's memory grows by under load.
    pub cache_mib: u32,
    /// Finished jobs (and their events) older than this are deleted; 0 keeps them forever.
    pub retention_days: u32,
}

/// Which database gorp's store is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl DatabaseConfig {
    /// The backend: PostgreSQL when `url` is set, else SQLite.
    pub fn backend(&self) -> Backend {
        if self.url.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Where the database is, for messages: the file, or the URL with its password masked.
    pub fn location(&self) -> String {
        match &self.url {
            Some(u) => mask_url_password(u),
            None => self.path.display().to_string(),
        }
    }
}

/// `postgres://user:********@host/db` for `postgres://user:secret@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
        None => url.to_string(),
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./gorp.db"),
            url: None,
            max_connections: 10,
            synchronous: Synchronous::Normal,
            busy_timeout_ms: 5_000,
            read_connections: 4,
            cache_mib: 32,
            retention_days: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceConfig {
    /// Root of the channels' working directories: `<path>/<channel>`.
    pub path: PathBuf,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./workspace"),
        }
    }
}

/// Default of `[worker] max_rescues`: enough for a crash loop to be noticed and fixed by the
/// operator, few enough that a job that kills gorp every time ends.
pub const DEFAULT_MAX_RESCUES: u32 = 5;

/// Default of `[acp] stall_timeout_secs`: ten minutes without a word from the agent. Longer than
/// Claude Code's own limit on one shell command (10 min) would let a silent build run out, so a
/// turn it reports on is never taken for stalled.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 600;

/// Smallest `[webhook] max_body_bytes` accepted: a smaller limit cannot hold a prompt request.
pub const MIN_BODY_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs run at once (each on a different channel). 0: this process accepts jobs (webhooks,
    /// API) but runs none; another gorp on the same database runs them.
    pub concurrency: u32,
    /// Attempts before a job is `failed` (webhooks and CLI may ask for fewer or more).
    pub max_attempts: u32,
    /// A running job's lease; a worker renews it every `heartbeat_secs`.
    pub lease_secs: u64,
    pub heartbeat_secs: u64,
    /// How often the worker looks for jobs inserted by other processes.
    pub poll_interval_ms: u64,
    /// Retry backoff: `retry_base_secs * 2^(attempt-1)`, capped, with ±20% jitter.
    pub retry_base_secs: u64,
    pub retry_max_secs: u64,
    /// How often expired leases are rescued.
    pub rescue_interval_secs: u64,
    /// How often the retention cleaner runs.
    pub clean_interval_secs: u64,
    /// On shutdown, running jobs get this long to finish before they are released.
    pub shutdown_grace_secs: u64,
    /// Times a job may be re-run after the gorp running it died (its lease expired); such runs
    /// do not spend `max_attempts`. A job interrupted more often (one that kills gorp every
    /// time) fails.
    pub max_rescues: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            max_attempts: 3,
            lease_secs: 30,
            heartbeat_secs: 5,
            poll_interval_ms: 500,
            retry_base_secs: 5,
            retry_max_secs: 3_600,
            rescue_interval_secs: 5,
            clean_interval_secs: 3_600,
            shutdown_grace_secs: 30,
            max_rescues: DEFAULT_MAX_RESCUES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcpConfig {
    /// The ACP agent to spawn per channel (a channel may override it).
    pub agent_binary: String,
    pub agent_args: Vec<String>,
    /// A warm session stays alive this long after its last use.
    pub keep_alive_secs: u64,
    /// Scheduled jobs are pre-warmed this long before their slot.
    pub pre_warm_secs: u64,
    /// Most live agent processes at once; the least recently used is shut down first.
    pub max_warm_sessions: u32,
    /// Most agents starting at once (a job's cold start, a pre-warm, re-warming after a
    /// restart); the others wait their turn.
    pub max_concurrent_starts: u32,
    pub initialize_timeout_secs: u64,
    pub session_timeout_secs: u64,
    /// The hard cap on one prompt turn (a job may ask for less with `timeout_secs`).
    pub prompt_timeout_secs: u64,
    /// A turn with no update from the agent for this long (waiting for a person's answer does
    /// not count) is stalled: cancelled, the agent restarted, and the attempt fails (retried,
    /// resuming the conversation). 0: no watchdog.
    pub stall_timeout_secs: u64,
    /// Default permission policy for new channels: `allow`, `deny` or `ask`.
    pub permission_policy: PermissionPolicy,
    /// Extra environment variables for agent processes (gorp's own environment is inherited,
    /// except its `GORP_*` variables).
    pub env: BTreeMap<String, String>,
    /// After a cancelled prompt, restart the agent and resume its session with `session/load`
    /// (claude-agent-acp 0.23 answered the prompt after a cancel out of turn; the current agent
    /// does not, so it is off by default).
    pub recycle_after_cancel: bool,
    /// The session mode gorp puts every agent session in, so that the agent asks gorp before it
    /// uses a tool and the channel's permission policy decides. Unset: the first mode the agent
    /// offers of `acp::client::ASKING_MODES` (Claude Code's and Gemini CLI's `default`, Codex's
    /// `read-only`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_mode: Option<String>,
    /// Under the policy `ask`, a permission request nobody decides in this long is denied
    /// (`timeout`). The wait does not count against `prompt_timeout_secs`.
    pub approval_timeout_secs: u64,
    /// The kernel sandbox agents run in (a channel may override it): `landlock` (writes only to
    /// the workspace and the agent's own directories, gorp's files unreadable; the agent is not
    /// started where the kernel cannot enforce it) or `none`. Unset: Landlock where the kernel
    /// supports it, else none (with a warning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxMode>,
    /// Each channel's agent gets `<state_path>/<channel>/home` as `HOME` and
    /// `<state_path>/<channel>/tmp` as `TMPDIR` under the sandbox (unless `env` sets them), so
    /// agents keep their logins and sessions apart.
    pub state_path: PathBuf,
    /// More paths sandboxed agents may write to (absolute, existing).
    pub extra_writable: Vec<PathBuf>,
    /// More paths sandboxed agents may not read (absolute), beside gorp's database, config and
    /// Matrix store and the other channels' workspaces and state.
    pub deny_read: Vec<PathBuf>,
    /// TCP ports sandboxed agents may connect to (Landlock ABI 4, Linux 6.7); unset: any. A
    /// port filter, not a host filter. A channel may override it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ports: Option<Vec<u16>>,
    /// MCP servers given to every agent session (`[[acp.mcp_servers]]`); a channel's own server
    /// of the same name replaces one of these.
    pub mcp_servers: Vec<McpServerSpec>,
}

impl Default for AcpConfig {
    fn default() -> Self {
        Self {
            agent_binary: "claude-agent-acp".into(),
            agent_args: Vec::new(),
            keep_alive_secs: 3_600,
            pre_warm_secs: 300,
            max_warm_sessions: 32,
            max_concurrent_starts: 4,
            initialize_timeout_secs: 60,
            session_timeout_secs: 180,
            prompt_timeout_secs: 3_600,
            stall_timeout_secs: DEFAULT_STALL_TIMEOUT_SECS,
            permission_policy: PermissionPolicy::Allow,
            env: BTreeMap::new(),
            recycle_after_cancel: false,
            session_mode: None,
            approval_timeout_secs: 600,
            sandbox: None,
            state_path: PathBuf::from("./agent-state"),
            extra_writable: Vec::new(),
            deny_read: Vec::new(),
            allowed_ports: None,
            mcp_servers: Vec::new(),
        }
    }
}

/// An MCP server the agent connects to for a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServerSpec {
    /// Its name, as the agent shows it.
    pub name: String,
    /// A stdio server: the program to run (absolute path or a name on `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment of a stdio server (values are secrets: masked wherever shown).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// An HTTP server: its URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Headers sent to an HTTP server (values are secrets: masked wherever shown).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Shown instead of a secret value.
pub const MASK: &str = "********";

impl McpServerSpec {
    /// Checks the spec: a name, and exactly one of `command` (stdio) or `url` (HTTP).
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(format!(
                "MCP server name {:?}: 1-64 printable characters",
                self.name
            ));
        }
        match (&self.command, &self.url) {
            (Some(c), None) => {
                if c.trim().is_empty() {
                    return Err(format!("MCP server {name}: empty command"));
                }
                if !self.headers.is_empty() {
                    return Err(format!(
                        "MCP server {name}: headers are for an HTTP server (url), not a command"
                    ));
                }
            }
            (None, Some(u)) => {
                if !(u.starts_with("http://") || u.starts_with("https://"))
                    || u.contains(char::is_whitespace)
                {
                    return Err(format!(
                        "MCP server {name}: url must start with http:// or https:// ({u:?})"
                    ));
                }
                if !self.args.is_empty() || !self.env.is_empty() {
                    return Err(format!(
                        "MCP server {name}: args and env are for a command, not an HTTP server"
                    ));
                }
            }
            _ => {
                return Err(format!(
                "MCP server {name}: give either command (a stdio server) or url (an HTTP server)"
            ))
            }
        }
        for k in self.env.keys().chain(self.headers.keys()) {
            if k.is_empty() || k.contains(['=', '\n', '\r', '\0', ':']) {
                return Err(format!("MCP server {name}: invalid name {k:?}"));
            }
        }
        Ok(())
    }

    /// The same spec with every env and header value replaced by [`MASK`].
    pub fn masked(&self) -> Self {
        let mut m = self.clone();
        m.env.values_mut().for_each(|v| *v = MASK.into());
        m.headers.values_mut().for_each(|v| *v = MASK.into());
        m
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    pub port: u16,
    pub bind: String,
    /// Bearer tokens accepted for every channel. Webhooks are refused when no token is set
    /// and the channel has no secret of its own.
    pub tokens: Vec<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Requests per minute per token (or per channel secret); 0 means no limit.
    pub rate_limit_per_minute: u32,
    /// Longest `?wait=` a webhook may ask for.
    pub max_wait_secs: u64,
    /// GitHub payloads are cut to this size in the job's prompt.
    pub github_payload_max_bytes: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            port: 13_000,
            bind: "127.0.0.1".into(),
            tokens: Vec::new(),
            max_body_bytes: 256 * 1024,
            rate_limit_per_minute: 0,
            max_wait_secs: 600,
            github_payload_max_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatrixConfig {
    pub home_server: String,
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Only these users reach agents; invites from anyone else are rejected.
    pub allowed_users: Vec<String>,
    pub device_name: String,
    /// Session file and matrix-sdk stores (state, crypto); empty: `matrix/` next to the database.
    pub state_dir: PathBuf,
    /// Encrypts the matrix-sdk stores at rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_passphrase: Option<String>,
    /// Recovery key of the bot's server-side key backup, to restore room keys on a new device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_key: Option<String>,
    /// Shortest time between two edits of a streaming reply.
    pub edit_interval_ms: u64,
    /// Most edits of one reply while it streams (the final edit is always sent).
    pub max_edits: u32,
    /// Base URL that webhook links in the room use; empty: `http://<webhook.bind>:<webhook.port>`.
    pub public_url: String,
    /// Longest wait between two attempts to reach the homeserver (backoff doubles from 0.5 s).
    pub retry_max_secs: u64,
}

impl Default for MatrixConfig {
    fn default() -> Self {
        Self {
            home_server: String::new(),
            user_id: String::new(),
            password: None,
            access_token: None,
            allowed_users: Vec::new(),
            device_name: "gorp".into(),
            state_dir: PathBuf::new(),
            store_passphrase: None,
            recovery_key: None,
            edit_interval_ms: 1000,
            max_edits: 30,
            public_url: String::new(),
            retry_max_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// IANA time zone for schedules without one; empty means the system's, else UTC.
    pub timezone: String,
}

/// Limits on what the agents' turns may spend (a channel may override them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// A job whose turn costs more than this (USD, as the agent reports it) is stopped at once
    /// and ends `failed` with stop reason `budget`, never retried. Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_max_cost_usd: Option<f64>,
    /// The same for the turn's tokens (input and output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_max_tokens: Option<u64>,
    /// What each channel may spend per day (USD, in `[scheduler] timezone`). Once a channel's
    /// spend today reaches it, its queued jobs are held until the day ends or the budget is
    /// raised. Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_max_cost_usd: Option<f64>,
    /// The same per calendar month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monthly_max_cost_usd: Option<f64>,
}

impl Config {
    /// Loads the configuration from `GORP_CONFIG_PATH`, `./config.toml` or
    /// `~/.config/gorp/config.toml` (the first that exists), then applies `GORP_*` overrides.
    pub fn load() -> Result<Config, ConfigError> {
        let path = Self::locate()?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with(path.as_deref(), &env)
    }

    /// The config file [`Config::load`] would read, if any. A `GORP_CONFIG_PATH` that names a
    /// missing file is an error rather than a silent fall-back to defaults.
    pub fn locate() -> Result<Option<PathBuf>, ConfigError> {
        if let Some(p) = std::env::var_os(CONFIG_PATH_ENV).filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(ConfigError::Read {
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{CONFIG_PATH_ENV} names a file that does not exist"),
                    ),
                    path: p,
                });
            }
            return Ok(Some(p));
        }
        let local = PathBuf::from("config.toml");
        if local.is_file() {
            return Ok(Some(local));
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = Path::new(&home).join(".config/gorp/config.toml");
            if p.is_file() {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// Loads `path` (or the defaults when `None`) with the given environment overrides.
    pub fn load_with(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let (text, label) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: label.clone(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        let from_env = apply_env(&mut table, env)?;
        let mut config = Self::from_table(table, &label, &from_env)?;
        config.source = label;
        Ok(config)
    }

    /// Parses a config from TOML text (no environment overrides).
    pub fn from_toml(text: &str, label: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: label.to_string(),
                message: e.to_string().trim_end().to_string(),
            })?;
        let mut config = Self::from_table(table, label, &BTreeMap::new())?;
        config.source = label.to_string();
        Ok(config)
    }

    fn from_table(
        table: toml::Table,
        label: &str,
        from_env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.inner().to_string();
                match from_env.get(&key) {
                    Some(var) => ConfigError::Env {
                        var: var.clone(),
                        message,
                    },
                    None => ConfigError::Invalid {
                        path: label.to_string(),
                        key,
                        message,
                    },
                }
            })?;
        config
            .validate()
            .map_err(|(key, message)| match from_env.get(&key) {
                Some(var) => ConfigError::Env {
                    var: var.clone(),
                    message,
                },
                None => ConfigError::Invalid {
                    path: label.to_string(),
                    key,
                    message,
                },
            })?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; returns the offending key and why.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
        if self.database.path.as_os_str().is_empty() {
            return bad("database.path", "expected a file path, got an empty string");
        }
        if let Some(url) = &self.database.url {
            // The driver reads the rest (options, sockets) when it connects.
            let host = url
                .strip_prefix("postgres://")
                .or_else(|| url.strip_prefix("postgresql://"))
                .map(|r| r.rsplit_once('@').map_or(r, |(_, h)| h))
                .map(|h| h.split(['/', '?']).next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty()) || url.chars().any(char::is_whitespace) {
                return bad(
                    "database.url",
                    &format!(
                        "expected postgres://user:password@host:port/dbname, got {:?}",
                        mask_url_password(url)
                    ),
                );
            }
        }
        if self.database.max_connections == 0 || self.database.max_connections > 1000 {
            return bad("database.max_connections", "expected 1 to 1000");
        }
        if self.database.read_connections == 0 {
            return bad("database.read_connections", "expected at least 1");
        }
        if self.database.cache_mib == 0 || self.database.cache_mib > 65_536 {
            return bad("database.cache_mib", "expected 1 to 65536 (MiB)");
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.acp.mcp_servers {
            if let Err(e) = m.validate() {
                return bad("acp.mcp_servers", &e);
            }
            if !names.insert(m.name.as_str()) {
                return bad(
                    "acp.mcp_servers",
                    &format!("two MCP servers are named {:?}", m.name),
                );
            }
        }
        if self.worker.concurrency > 1024 {
            return bad("worker.concurrency", "expected at most 1024");
        }
        if self.worker.max_attempts == 0 {
            return bad("worker.max_attempts", "expected at least 1");
        }
        if self.worker.lease_secs == 0 {
            return bad("worker.lease_secs", "expected at least 1");
        }
        if self.worker.heartbeat_secs == 0 || self.worker.heartbeat_secs >= self.worker.lease_secs {
            return bad(
                "worker.heartbeat_secs",
                "expected at least 1 and less than worker.lease_secs",
            );
        }
        if self.worker.poll_interval_ms == 0 {
            return bad("worker.poll_interval_ms", "expected at least 1");
        }
        if self.worker.rescue_interval_secs == 0 {
            return bad("worker.rescue_interval_secs", "expected at least 1");
        }
        if self.worker.clean_interval_secs == 0 {
            return bad("worker.clean_interval_secs", "expected at least 1");
        }
        if self.acp.agent_binary.trim().is_empty() {
            return bad("acp.agent_binary", "expected a program name or path");
        }
        if self
            .acp
            .session_mode
            .as_deref()
            .is_some_and(|m| m.trim().is_empty() || m.trim() != m)
        {
            return bad(
                "acp.session_mode",
                "expected a mode id the agent offers, such as \"default\"",
            );
        }
        if self.acp.approval_timeout_secs == 0 || self.acp.approval_timeout_secs > 7 * 86_400 {
            return bad(
                "acp.approval_timeout_secs",
                "expected 1 to 604800 seconds (a week)",
            );
        }
        if self.acp.max_warm_sessions == 0 {
            return bad("acp.max_warm_sessions", "expected at least 1");
        }
        if self
            .budget
            .job_max_cost_usd
            .is_some_and(|c| !c.is_finite() || c < 0.0)
        {
            return bad(
                "budget.job_max_cost_usd",
                "expected a cost in USD, 0 or more",
            );
        }
        for (key, v) in [
            ("budget.daily_max_cost_usd", self.budget.daily_max_cost_usd),
            (
                "budget.monthly_max_cost_usd",
                self.budget.monthly_max_cost_usd,
            ),
        ] {
            if v.is_some_and(|c| !c.is_finite() || c < 0.0) {
                return bad(key, "expected a cost in USD, 0 or more");
            }
        }
        if self.budget.job_max_tokens == Some(0) {
            return bad("budget.job_max_tokens", "expected at least 1");
        }
        if self.acp.state_path.as_os_str().is_empty() {
            return bad(
                "acp.state_path",
                "expected a directory path, got an empty string",
            );
        }
        for p in &self.acp.extra_writable {
            if !p.is_absolute() {
                return Err((
                    "acp.extra_writable".into(),
                    format!("expected absolute paths, got {:?}", p.display().to_string()),
                ));
            }
            if !p.exists() {
                return Err((
                    "acp.extra_writable".into(),
                    format!("{} does not exist", p.display()),
                ));
            }
            // Writable means readable: a directory holding gorp's files would hand them over.
            let holds = |file: &Path| {
                let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
                p.canonicalize().is_ok_and(|w| file.starts_with(w))
            };
            if holds(&self.database.path) || holds(&self.workspace.path) {
                return Err((
                    "acp.extra_writable".into(),
                    format!(
                        "{} holds gorp's database or the workspace root, which sandboxed agents \
                         may not read; list a directory of its own",
                        p.display()
                    ),
                ));
            }
        }
        if let Some(p) = self.acp.deny_read.iter().find(|p| !p.is_absolute()) {
            return Err((
                "acp.deny_read".into(),
                format!("expected absolute paths, got {:?}", p.display().to_string()),
            ));
        }
        if self
            .acp
            .allowed_ports
            .as_ref()
            .is_some_and(|p| p.contains(&0))
        {
            return bad("acp.allowed_ports", "expected TCP ports from 1 to 65535");
        }
        if self.acp.max_concurrent_starts == 0 {
            return bad("acp.max_concurrent_starts", "expected at least 1");
        }
        if self.webhook.bind.parse::<std::net::IpAddr>().is_err() {
            return bad("webhook.bind", "expected an IP address such as 127.0.0.1");
        }
        if self.webhook.max_body_bytes < MIN_BODY_BYTES {
            return Err((
                "webhook.max_body_bytes".into(),
                format!("expected at least {MIN_BODY_BYTES} (bytes)"),
            ));
        }
        if self.webhook.tokens.iter().any(|t| t.len() < 16) {
            return bad(
                "webhook.tokens",
                "expected tokens of at least 16 characters",
            );
        }
        if let Some(m) = &self.matrix {
            if !m.home_server.starts_with("http://") && !m.home_server.starts_with("https://") {
                return bad("matrix.home_server", "expected an http:// or https:// URL");
            }
            if !is_matrix_user_id(&m.user_id) {
                return bad(
                    "matrix.user_id",
                    "expected a user id such as @bot:example.org",
                );
            }
            if m.password.is_none() && m.access_token.is_none() {
                return bad("matrix.password", "expected password or access_token");
            }
            if m.retry_max_secs == 0 {
                return bad("matrix.retry_max_secs", "expected at least 1");
            }
            if m.edit_interval_ms < 100 {
                return bad("matrix.edit_interval_ms", "expected at least 100");
            }
            if !m.public_url.is_empty()
                && !m.public_url.starts_with("http://")
                && !m.public_url.starts_with("https://")
            {
                return bad("matrix.public_url", "expected an http:// or https:// URL");
            }
            if let Some(u) = m.allowed_users.iter().find(|u| !is_matrix_user_id(u)) {
                return Err((
                    "matrix.allowed_users".into(),
                    format!("expected user ids such as @alice:example.org, got {u:?}"),
                ));
            }
        }
        if !self.scheduler.timezone.is_empty()
            && self.scheduler.timezone.parse::<chrono_tz::Tz>().is_err()
        {
            return Err((
                "scheduler.timezone".into(),
                format!(
                    "expected an IANA time zone such as Europe/Berlin or UTC, got {:?}",
                    self.scheduler.timezone
                ),
            ));
        }
        Ok(())
    }

    /// The effective configuration with every secret replaced by `********`.
    pub fn masked(&self) -> toml::Value {
        let mut value = toml::Value::try_from(self).expect("config serialises");
        mask_secrets(&mut value);
        value
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let value = self.masked();
        let mut out = format!("# effective configuration (source: {})\n", self.source);
        if let toml::Value::Table(t) = value {
            for section in SECTIONS {
                if let Some(v) = t.get(*section) {
                    let mut one = toml::Table::new();
                    one.insert((*section).to_string(), v.clone());
                    out.push_str(&toml::to_string(&one).expect("table serialises"));
                    out.push('\n');
                }
            }
        }
        out
    }

    /// The directory of a channel: `<workspace>/<name>`.
    pub fn channel_dir(&self, name: &str) -> PathBuf {
        self.workspace.path.join(name)
    }

    /// The agent's own directory of a channel: `<acp.state_path>/<name>` (its `home` and `tmp`
    /// under the sandbox).
    pub fn agent_state_dir(&self, name: &str) -> PathBuf {
        self.acp.state_path.join(name)
    }

    /// Where the Matrix session and stores live.
    pub fn matrix_state_dir(&self) -> PathBuf {
        match &self.matrix {
            Some(m) if !m.state_dir.as_os_str().is_empty() => m.state_dir.clone(),
            _ => self
                .database
                .path
                .parent()
                .map(|p| p.join("matrix"))
                .unwrap_or_else(|| PathBuf::from("matrix")),
        }
    }

    /// The base URL of gorp's HTTP server as people outside reach it.
    pub fn public_url(&self) -> String {
        match &self.matrix {
            Some(m) if !m.public_url.is_empty() => m.public_url.trim_end_matches('/').to_string(),
            _ => format!("http://{}:{}", self.webhook.bind, self.webhook.port),
        }
    }
}

fn is_matrix_user_id(s: &str) -> bool {
    s.starts_with('@') && s.len() > 3 && s[1..].contains(':')
}

fn mask_secrets(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let lower = k.to_ascii_lowercase();
                if lower == "url" {
                    if let toml::Value::String(u) = v {
                        *u = mask_url_password(u);
                    }
                } else if lower == "mcp_servers" {
                    // An MCP server's env and headers carry its credentials.
                    if let toml::Value::Array(servers) = v {
                        for server in servers.iter_mut().filter_map(|s| s.as_table_mut()) {
                            for key in ["env", "headers"] {
                                if let Some(toml::Value::Table(m)) = server.get_mut(key) {
                                    for (_, x) in m.iter_mut() {
                                        *x = toml::Value::String(MASK.into());
                                    }
                                }
                            }
                        }
                    }
                } else if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                    *v = match v {
                        toml::Value::Array(a) => toml::Value::Array(
                            a.iter()
                                .map(|_| toml::Value::String("********".into()))
                                .collect(),
                        ),
                        _ => toml::Value::String("********".into()),
                    };
                } else {
                    mask_secrets(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// Applies `GORP_<SECTION>_<KEY>` variables to the parsed file. Each value is typed after the
/// default at that key (numbers, booleans, comma-separated lists, strings). Returns which
/// variable set which key, so errors can name the variable.
fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let defaults = toml::Value::try_from(Config {
        matrix: Some(MatrixConfig::default()),
        ..Config::default()
    })
    .expect("defaults serialise");
    let mut set = BTreeMap::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NON_CONFIG_VARS.contains(&var.as_str()) {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        else {
            // A misspelt section must not be ignored silently (an unknown key is refused too).
            let section = lower.split('_').next().unwrap_or_default();
            return Err(ConfigError::Env {
                var: var.clone(),
                message: format!(
                    "unknown config section {section:?}; expected GORP_<SECTION>_<KEY> with a \
                     section of {}, or one of {}",
                    SECTIONS.join(", "),
                    NON_CONFIG_VARS.join(", ")
                ),
            });
        };
        let key = &lower[section.len() + 1..];
        let default = defaults.get(section).and_then(|s| s.get(key));
        let value = match default {
            Some(toml::Value::Integer(_)) => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| ConfigError::Env {
                    var: var.clone(),
                    message: format!("expected an integer, got {raw:?}"),
                })?,
            Some(toml::Value::Boolean(_)) => match raw.trim() {
                "true" | "1" | "yes" => toml::Value::Boolean(true),
                "false" | "0" | "no" => toml::Value::Boolean(false),
                _ => {
                    return Err(ConfigError::Env {
                        var: var.clone(),
                        message: format!("expected true or false, got {raw:?}"),
                    })
                }
            },
            Some(toml::Value::Array(_)) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            Some(_) => toml::Value::String(raw.clone()),
            None => {
                // Keys with no default (optional ones): keep the text; serde reports a type
                // mismatch against the variable. Unknown keys are refused by serde too.
                toml::Value::String(raw.clone())
            }
        };
        let section_table = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            _ => {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    message: format!("[{section}] in the config file is not a table"),
                })
            }
        }
        set.insert(format!("{section}.{key}"), var.clone());
    }
    Ok(set)
}

/// The default zone: `[scheduler] timezone`, else the system's (`TZ`, `/etc/timezone`, the
/// `/etc/localtime` link), else UTC.
pub fn default_timezone(config: &Config) -> String {
    let candidates = [
        Some(config.scheduler.timezone.clone()),
        std::env::var("TZ").ok(),
        std::fs::read_to_string("/etc/timezone").ok(),
        std::fs::read_link("/etc/localtime").ok().and_then(|p| {
            p.to_str()
                .and_then(|s| s.split("zoneinfo/").nth(1))
                .map(str::to_string)
        }),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|s| s.trim().trim_start_matches(':').to_string())
        .find(|s| !s.is_empty() && s.parse::<chrono_tz::Tz>().is_ok())
        .unwrap_or_else(|| "UTC".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_without_a_file() {
        let c = Config::load_with(None, &[]).unwrap();
        assert_eq!(c.database.path, PathBuf::from("./gorp.db"));
        assert_eq!(c.worker.concurrency, 8);
        assert_eq!(c.acp.keep_alive_secs, 3600);
        assert_eq!(c.acp.pre_warm_secs, 300);
        assert_eq!(c.webhook.port, 13000);
        assert_eq!(c.webhook.bind, "127.0.0.1");
        assert!(c.matrix.is_none());
    }

    #[test]
    fn env_overrides_are_typed_by_the_default() {
        let env = vec![
            ("GORP_WORKER_CONCURRENCY".to_string(), "3".to_string()),
            ("GORP_ACP_AGENT_ARGS".to_string(), "--a, --b".to_string()),
            ("GORP_DATABASE_PATH".to_string(), "/tmp/x.db".to_string()),
            ("GORP_LOG".to_string(), "debug".to_string()),
        ];
        let c = Config::load_with(None, &env).unwrap();
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.acp.agent_args, vec!["--a", "--b"]);
        assert_eq!(c.database.path, PathBuf::from("/tmp/x.db"));
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let env = vec![("GORP_WORKER_CONCURRENCY".to_string(), "many".to_string())];
        let err = Config::load_with(None, &env).unwrap_err().to_string();
        assert!(err.contains("GORP_WORKER_CONCURRENCY"), "{err}");
        assert!(err.contains("integer"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_refused() {
        let env = vec![("GORP_WORKER_CONCURENCY".to_string(), "3".to_string())];
        let err = Config::load_with(None, &env).unwrap_err().to_string();
        assert!(err.contains("GORP_WORKER_CONCURENCY"), "{err}");
    }

    #[test]
    fn matrix_settings_are_validated() {
        let base = "[matrix]\nhome_server='https://m.org'\nuser_id='@b:m.org'\npassword='pw'\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        let m = c.matrix.as_ref().unwrap();
        assert_eq!((m.edit_interval_ms, m.max_edits), (1000, 30));
        assert_eq!(m.device_name, "gorp");
        assert_eq!(c.matrix_state_dir(), PathBuf::from("./matrix"));
        assert_eq!(c.public_url(), "http://127.0.0.1:13000");
        for (extra, key) in [
            ("edit_interval_ms = 10\n", "matrix.edit_interval_ms"),
            ("public_url = 'ftp://x'\n", "matrix.public_url"),
            ("allowed_users = ['alice']\n", "matrix.allowed_users"),
        ] {
            let err = Config::from_toml(&format!("{base}{extra}"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let c = Config::from_toml(
            &format!(
                "{base}public_url = 'https://gorp.example.org/'\nstate_dir = '/var/lib/gorp/m'\n"
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.public_url(), "https://gorp.example.org");
        assert_eq!(c.matrix_state_dir(), PathBuf::from("/var/lib/gorp/m"));
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = Config::from_toml(
            "[matrix]\nhome_server='https://m.org'\nuser_id='@b:m.org'\npassword='hunter2hunter2'\nstore_passphrase='sesame-sesame'\nrecovery_key='EsTj 3yST y93F'\n[webhook]\ntokens=['0123456789abcdefXYZ']\n",
            "t.toml",
        )
        .unwrap();
        let out = c.to_masked_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("sesame"), "{out}");
        assert!(!out.contains("EsTj"), "{out}");
        assert!(!out.contains("0123456789abcdef"), "{out}");
        assert!(out.contains("********"), "{out}");
    }
}
