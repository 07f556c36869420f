//! The `gorp` command line. Human-readable tables by default, `--json` for scripts.
//!
//! Exit codes (stable, for scripts): see the `EXIT_*` constants.
//!
//! Why one file: every command is a thin adapter (parse, call a service or the store, print a
//! table or JSON); the tables share one renderer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod approvals;
mod doctor;

use crate::config::{Config, ConfigError};
use crate::service::channels;
use crate::store::{
    format_ms, now_ms, CancelOutcome, CatchUp, Channel, Event, Job, JobFilter, JobState, NewJob,
    Overlap, PermissionPolicy, Source, Store, StoreError, WarmSession, WarmState,
};

pub const EXIT_OK: i32 = 0;
/// A runtime or database error.
pub const EXIT_ERROR: i32 = 1;
/// Bad arguments or invalid input; nothing was written.
pub const EXIT_USAGE: i32 = 2;
/// The channel or job does not exist.
pub const EXIT_NOT_FOUND: i32 = 3;
/// `--wait` / `tail`: the job failed.
pub const EXIT_JOB_FAILED: i32 = 4;
/// `--wait` / `tail`: the job was cancelled.
pub const EXIT_JOB_CANCELLED: i32 = 5;
/// `--wait`: the wait ran out before the job finished.
pub const EXIT_TIMEOUT: i32 = 6;
/// The configuration is invalid.
pub const EXIT_CONFIG: i32 = 78;

/// How often `--wait` and `tail` read the database for progress.
const POLL: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(
    name = "gorp",
    version = env!("BUILT_GORP_VERSION"),
    about = "Drive ACP coding agents from webhooks, Matrix and cron through a durable SQLite job queue"
)]
pub struct Cli {
    /// Config file (default: $GORP_CONFIG_PATH, ./config.toml, ~/.config/gorp/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the worker pool and background services until SIGINT/SIGTERM.
    Start,
    /// Print a shell completion script (`gorp completions bash > /etc/bash_completion.d/gorp`).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage channels (a named conversation with one agent).
    Channels {
        #[command(subcommand)]
        command: ChannelsCommand,
    },
    /// Queue a prompt for a channel.
    Enqueue {
        /// The channel's name.
        channel: String,
        /// The prompt text.
        prompt: String,
        /// Wait for the job to finish and print its output.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (exit code 6).
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        timeout: u64,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i64,
        /// Runs before the job fails for good (default: [worker] max_attempts).
        #[arg(long)]
        max_attempts: Option<i64>,
        /// Enqueueing the same key twice returns the first job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Stop the job's turn after this many seconds (below [acp] prompt_timeout_secs).
        #[arg(long, value_name = "SECS")]
        timeout_secs: Option<i64>,
        /// Stop the job once its turn costs more than this (USD), below the channel's budget.
        #[arg(long, value_name = "USD")]
        max_cost_usd: Option<f64>,
        /// A session config option for this job's turn, over the channel's (repeatable; see
        /// `gorp channels options`).
        #[arg(long = "option", value_name = "NAME=VALUE")]
        options: Vec<String>,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<JobState>,
        /// Only this channel's jobs.
        #[arg(long)]
        channel: Option<String>,
        /// Only jobs from this source.
        #[arg(long)]
        source: Option<Source>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one job and its events.
    Job {
        /// The job's id.
        id: String,
    },
    /// Follow a job's events until it ends.
    Tail {
        /// The job's id.
        id: String,
        /// Start after this event seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Cancel a job (queued: at once; running: its worker stops the agent).
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Cron schedules and one-offs.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Permission requests and questions under the policy `ask` (pending ones unless --all or
    /// --state).
    Approvals {
        /// Only requests in this state.
        #[arg(long)]
        state: Option<crate::store::ApprovalState>,
        /// Only `permission` requests or only `question`s.
        #[arg(long)]
        request: Option<crate::store::RequestKind>,
        /// Every state.
        #[arg(long)]
        all: bool,
        /// Only this channel's requests.
        #[arg(long)]
        channel: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Allow a pending permission request (an id or a unique prefix of one).
    Approve {
        /// The request's id, or a unique prefix of it.
        id: String,
        /// Allow always: the agent's allow-always option, and a standing rule for the channel.
        #[arg(long, conflicts_with = "option")]
        always: bool,
        /// Answer with this option id of the request instead.
        #[arg(long)]
        option: Option<String>,
    },
    /// Deny a pending permission request, or decline a question.
    Deny {
        /// The request's id, or a unique prefix of it.
        id: String,
    },
    /// Answer a pending question of the agent: the number or text of a choice, free text,
    /// `name=value; name=value`, or a JSON object of the form's fields.
    Answer {
        /// The question's id, or a unique prefix of it.
        id: String,
        /// The answer (several words are joined with spaces).
        #[arg(required = true, num_args = 1.., value_name = "ANSWER")]
        answer: Vec<String>,
    },
    /// A channel's standing "allow always" rules.
    Rules {
        /// The channel's name.
        channel: String,
        #[command(subcommand)]
        command: Option<RulesCommand>,
    },
    /// What the agents' turns cost: jobs, tokens, cost and agent time from the usage rows.
    Usage {
        /// Only this channel.
        #[arg(long)]
        channel: Option<String>,
        /// A window back from now (30m, 24h, 7d, 4w) or a UTC date (2026-12-01).
        #[arg(long, default_value = crate::service::usage::DEFAULT_SINCE)]
        since: String,
        /// Rows per day (UTC), channel or source.
        #[arg(long, default_value = "channel")]
        by: crate::store::UsageBy,
    },
    /// Check this machine and config for real, changing nothing: the kernel sandbox, every
    /// configured agent (found, its Node, starts, speaks ACP, version, capabilities, signed
    /// in), the database (migrations, writable), the Matrix homeserver and the bot's device,
    /// the HTTP port. Each failure says how to fix it; exit code 1 when something is broken.
    Doctor,
    /// The gorp nodes sharing this database: id, host, state (up, gone, stopped), started,
    /// last seen, channels whose agent each holds, jobs each runs, what each leads.
    Nodes {
        /// Also nodes that stopped or are gone.
        #[arg(long)]
        all: bool,
    },
    /// Show the warm-session pool, or pre-warm a channel's agent now.
    Warm {
        /// Pre-warm this channel (the running gorp starts its agent).
        channel: Option<String>,
        /// Return at once instead of waiting for the agent to be warm.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (exit code 6).
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Add a schedule: WHEN is a cron expression ("0 9 * * 1-5", "@daily"), "in 30m" / "in 2h",
    /// or an RFC 3339 time for a one-off.
    Add {
        /// The channel's name.
        channel: String,
        /// A cron expression, `in 30m`, or an RFC 3339 time.
        when: String,
        /// The prompt each firing queues.
        prompt: String,
        /// IANA time zone (default: [scheduler] timezone, else the system's, else UTC).
        #[arg(long)]
        tz: Option<String>,
        /// Missed slots while gorp was down: skip, once (default) or all.
        #[arg(long)]
        catch_up: Option<CatchUp>,
        /// When the previous run is still queued or running: skip (default) or queue.
        #[arg(long)]
        overlap: Option<Overlap>,
    },
    /// List schedules.
    List,
    /// Pause a schedule.
    Pause {
        /// The schedule's id.
        id: i64,
    },
    /// Resume a schedule from its next slot.
    Resume {
        /// The schedule's id.
        id: i64,
    },
    /// Delete a schedule (its past jobs stay).
    Rm {
        /// The schedule's id.
        id: i64,
    },
    /// Print the next fire times of a cron expression.
    Next {
        /// The cron expression.
        cron: String,
        /// IANA time zone (default: [scheduler] timezone, else the system's, else UTC).
        #[arg(long)]
        tz: Option<String>,
        /// How many fire times.
        #[arg(short = 'n', default_value_t = 5)]
        count: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Remove a rule; later requests it matched ask again.
    Rm {
        /// The rule's id.
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate the configuration and print it with secrets masked.
    Check,
}

#[derive(Subcommand, Debug)]
pub enum McpCommand {
    /// Add (or replace) a server: a program it runs (stdio) or a URL (HTTP).
    Add {
        /// The server's name.
        server: String,
        /// A stdio server: the program to run.
        #[arg(long, required_unless_present = "url", conflicts_with = "url")]
        command: Option<String>,
        /// An argument of the program (repeatable).
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// An environment variable of the program (repeatable; shown masked).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// An HTTP server: its URL.
        #[arg(long)]
        url: Option<String>,
        /// A header sent to the HTTP server (repeatable; shown masked).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
    },
    /// Remove a server.
    Rm {
        /// The server's name.
        server: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChannelsCommand {
    /// Create a channel and its workspace directory.
    Add {
        /// The channel's name: lowercase letters, digits, `-` and `_` (also its directory).
        name: String,
        /// Agent program for this channel (default: [acp] agent_binary).
        #[arg(long)]
        agent_binary: Option<String>,
        /// Agent argument (repeat for several).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Permission policy: allow, deny or ask.
        #[arg(long)]
        permission: Option<PermissionPolicy>,
        /// Secret for GitHub-style X-Hub-Signature-256 webhook deliveries.
        #[arg(long)]
        webhook_secret: Option<String>,
        /// Prompt template for GitHub deliveries ({event}, {action}, {repository}, {delivery}, {payload}).
        #[arg(long)]
        webhook_template: Option<String>,
        /// Kernel sandbox: landlock or none (default: [acp] sandbox).
        #[arg(long)]
        sandbox: Option<crate::store::SandboxMode>,
        /// TCP ports the agent may connect to under the sandbox, comma separated (default:
        /// [acp] allowed_ports).
        #[arg(long, value_parser = parse_ports)]
        allowed_ports: Option<PortSetting>,
    },
    /// Change a channel: its next prompt runs under the new policy; the sandbox and ports apply
    /// from its agent's next start.
    Set {
        /// The channel's name.
        name: String,
        /// Permission policy: allow, deny or ask.
        #[arg(long, required_unless_present_any = ["sandbox", "allowed_ports", "budget_job_usd", "budget_job_tokens", "budget_day_usd", "budget_month_usd", "reply_footer", "options", "unset_options", "add_dirs", "remove_dirs"])]
        permission: Option<PermissionPolicy>,
        /// Kernel sandbox: landlock, none, or default ([acp] sandbox).
        #[arg(long, value_parser = parse_sandbox)]
        sandbox: Option<SandboxSetting>,
        /// TCP ports the agent may connect to, comma separated, or any ([acp] allowed_ports).
        #[arg(long, value_parser = parse_ports)]
        allowed_ports: Option<PortSetting>,
        /// The most one job's turn may cost (USD), or default ([budget] job_max_cost_usd).
        #[arg(long, value_parser = parse_cost)]
        budget_job_usd: Option<Setting<f64>>,
        /// The most tokens one job's turn may use, or default ([budget] job_max_tokens).
        #[arg(long, value_parser = parse_tokens)]
        budget_job_tokens: Option<Setting<i64>>,
        /// What the channel may spend per day (USD), or default ([budget] daily_max_cost_usd).
        /// Once spent, its queued jobs are held until the day ends or the budget is raised.
        #[arg(long, value_parser = parse_cost)]
        budget_day_usd: Option<Setting<f64>>,
        /// The same per calendar month, or default ([budget] monthly_max_cost_usd).
        #[arg(long, value_parser = parse_cost)]
        budget_month_usd: Option<Setting<f64>>,
        /// Whether the channel's Matrix replies end with duration · tokens · cost: on or off.
        #[arg(long, value_parser = parse_on_off)]
        reply_footer: Option<bool>,
        /// Set a session config option (model, mode, …) applied before every prompt
        /// (repeatable; checked against what the agent offers: `gorp channels options`).
        #[arg(long = "option", value_name = "NAME=VALUE")]
        options: Vec<String>,
        /// Stop setting an option (repeatable).
        #[arg(long = "unset-option", value_name = "NAME")]
        unset_options: Vec<String>,
        /// Give the agent one more workspace root, an existing directory (repeatable; from
        /// its next start, writable under the sandbox).
        #[arg(long = "add-dir", value_name = "PATH")]
        add_dirs: Vec<std::path::PathBuf>,
        /// Take a workspace root away (repeatable).
        #[arg(long = "remove-dir", value_name = "PATH")]
        remove_dirs: Vec<std::path::PathBuf>,
    },
    /// The session config options a channel sets and those its agent offers (as it said when
    /// its session last opened).
    Options {
        /// The channel's name.
        name: String,
    },
    /// The MCP servers given to a channel's agent sessions: list, add or remove (from the
    /// agent's next start).
    Mcp {
        /// The channel's name.
        name: String,
        #[command(subcommand)]
        command: Option<McpCommand>,
    },
    /// Run a command (such as an agent's own login) as the channel's agent: with its HOME and
    /// TMPDIR (created if needed), in its workspace. Without a command, print them.
    Login {
        /// The channel's name.
        name: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List channels.
    List,
    /// Delete a channel and its job history (not its workspace directory).
    Rm {
        /// The channel's name.
        name: String,
    },
    /// Give a channel a new webhook bearer token (shown once); the old one stops working.
    Token {
        /// The channel's name.
        name: String,
    },
}

/// `--sandbox` of `channels set`: a mode, or `None` for the config's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSetting(pub Option<crate::store::SandboxMode>);

fn parse_sandbox(s: &str) -> Result<SandboxSetting, String> {
    match s {
        "default" => Ok(SandboxSetting(None)),
        other => other
            .parse()
            .map(|m| SandboxSetting(Some(m)))
            .map_err(|e: String| format!("{e}, or default")),
    }
}

/// A value, or `None` (`default`) for the config's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting<T>(pub Option<T>);

fn parse_cost(s: &str) -> Result<Setting<f64>, String> {
    if s == "default" {
        return Ok(Setting(None));
    }
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && (0.0..=1e6).contains(&c) => Ok(Setting(Some(c))),
        _ => Err(format!(
            "{s:?} is not a cost in USD from 0 to 1000000, nor default"
        )),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

fn parse_tokens(s: &str) -> Result<Setting<i64>, String> {
    if s == "default" {
        return Ok(Setting(None));
    }
    match s.parse::<i64>() {
        Ok(t) if t >= 1 => Ok(Setting(Some(t))),
        _ => Err(format!(
            "{s:?} is not a number of tokens (1 or more), nor default"
        )),
    }
}

/// `--allowed-ports`: a list of TCP ports, or `None` (`any`) for the config's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSetting(pub Option<Vec<u16>>);

fn parse_ports(s: &str) -> Result<PortSetting, String> {
    if s == "any" {
        return Ok(PortSetting(None));
    }
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{p:?} is not a TCP port (1 to 65535); give ports separated by commas, or any"
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|p| PortSetting(Some(p)))
}

/// A command's failure, carrying its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::UnknownChannel(_) | StoreError::JobNotFound(_) => EXIT_NOT_FOUND,
            StoreError::Invalid(_) | StoreError::ChannelExists(_) | StoreError::ChannelBusy(_) => {
                EXIT_USAGE
            }
            _ => EXIT_ERROR,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(EXIT_CONFIG, e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::new(EXIT_ERROR, format!("{e:#}"))
    }
}

type CmdResult = Result<i32, Failure>;

/// Loads the config named by `--config`, else as [`Config::load`] does.
pub fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    match &cli.config {
        Some(p) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            Config::load_with(Some(p), &env)
        }
        None => Config::load(),
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match dispatch(&cli).await {
        Ok(code) => code,
        Err(f) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": f.message, "exit_code": f.code })
                );
            } else {
                eprintln!("gorp: {}", f.message);
            }
            f.code
        }
    }
}

async fn dispatch(cli: &Cli) -> CmdResult {
    // Needs no configuration: works on a machine where gorp is not set up yet.
    if let Command::Completions { shell } = &cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut cmd, "gorp", &mut std::io::stdout());
        return Ok(EXIT_OK);
    }
    let config = load_config(cli)?;
    match &cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            if cli.json {
                let v = serde_json::to_value(config.masked())
                    .map_err(|e| Failure::new(EXIT_ERROR, e.to_string()))?;
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", config.to_masked_toml());
            }
            Ok(EXIT_OK)
        }
        Command::Migrate => {
            let n = Store::migrate(&config.database).await?;
            let db = &config.database;
            out(
                cli,
                serde_json::json!({
                    "migrations": n,
                    "backend": db.backend().as_str(),
                    "database": db.location(),
                }),
                || {
                    format!(
                        "database {} ({}) is at migration {n}",
                        db.location(),
                        db.backend().as_str()
                    )
                },
            );
            Ok(EXIT_OK)
        }
        Command::Start => start(config).await,
        Command::Doctor => doctor::doctor(cli, &config).await,
        cmd => {
            let store = Store::open(&config.database).await?;
            let code = data_command(cli, cmd, &config, &store).await;
            store.close().await;
            code
        }
    }
}

async fn start(config: Config) -> CmdResult {
    let store = Store::open(&config.database).await?;
    let instance = crate::instance::InstanceId::new();
    let shutdown = crate::app::shutdown_on_signals();
    crate::app::run(config, store.clone(), instance, shutdown).await?;
    store.close().await;
    Ok(EXIT_OK)
}

async fn data_command(cli: &Cli, cmd: &Command, config: &Config, store: &Store) -> CmdResult {
    match cmd {
        Command::Channels { command } => channels(cli, command, config, store).await,
        Command::Enqueue {
            channel,
            prompt,
            wait,
            timeout,
            priority,
            max_attempts,
            idempotency_key,
            timeout_secs,
            max_cost_usd,
            options,
        } => {
            let options = crate::store::parse_options(options.iter().map(String::as_str))
                .map_err(|e| Failure::new(EXIT_USAGE, e))?;
            let ch = store
                .channel_get(channel)
                .await?
                .ok_or_else(|| StoreError::UnknownChannel(channel.clone()))?;
            let mut job = NewJob::new(ch.id, Source::Cli, prompt.clone());
            job.priority = *priority;
            job.max_attempts = max_attempts.unwrap_or(i64::from(config.worker.max_attempts));
            job.idempotency_key = idempotency_key.clone();
            job.timeout_secs = *timeout_secs;
            job.max_cost_usd = *max_cost_usd;
            job.agent_options = (!options.is_empty())
                .then(|| serde_json::to_string(&options).expect("options serialise"));
            let e = crate::service::jobs::enqueue(store, job, std::time::Instant::now()).await?;
            if !*wait {
                out(cli, serde_json::json!(e), || {
                    if e.created {
                        e.job_id.clone()
                    } else {
                        format!("{} (existing job for this idempotency key)", e.job_id)
                    }
                });
                return Ok(EXIT_OK);
            }
            if !cli.json {
                eprintln!("queued {}; waiting", e.job_id);
            }
            wait_for(cli, store, &e.job_id, Duration::from_secs(*timeout)).await
        }
        Command::Jobs {
            state,
            channel,
            source,
            limit,
        } => {
            let jobs = store
                .job_list(&JobFilter {
                    state: *state,
                    channel: channel.clone(),
                    source: *source,
                    text: None,
                    before: None,
                    limit: *limit,
                })
                .await?;
            out(cli, serde_json::json!(jobs), || jobs_table(&jobs));
            Ok(EXIT_OK)
        }
        Command::Job { id } => {
            let job = store
                .job_get(id)
                .await?
                .ok_or_else(|| StoreError::JobNotFound(id.clone()))?;
            let events = store.job_events_list(id, 0, i64::MAX).await?;
            let output = store.job_output(id).await?;
            out(
                cli,
                serde_json::json!({ "job": job, "events": events, "output": output }),
                || job_detail(&job, &events, &output),
            );
            Ok(EXIT_OK)
        }
        Command::Tail { id, after } => tail(cli, store, id, *after).await,
        Command::Cancel { id } => {
            let outcome = crate::service::jobs::cancel(store, None, id).await?;
            out(
                cli,
                serde_json::json!({ "job_id": id, "outcome": outcome }),
                || match outcome {
                    CancelOutcome::Cancelled => format!("{id}: cancelled"),
                    CancelOutcome::Requested => {
                        format!("{id}: running; cancel requested, its worker stops the agent")
                    }
                    CancelOutcome::AlreadyFinished(s) => format!("{id}: already {s}"),
                },
            );
            Ok(EXIT_OK)
        }
        Command::Warm {
            channel,
            no_wait,
            timeout,
        } => warm(cli, store, channel.as_deref(), *no_wait, *timeout).await,
        Command::Nodes { all } => {
            let now = now_ms();
            let nodes: Vec<crate::store::Node> = store
                .node_list(now)
                .await?
                .into_iter()
                .filter(|n| *all || n.state == "up")
                .collect();
            out(cli, serde_json::json!(nodes), || nodes_table(&nodes, now));
            Ok(EXIT_OK)
        }
        Command::Schedule { command } => schedule(cli, command, config, store).await,
        Command::Approvals {
            request,
            state,
            all,
            channel,
            limit,
        } => approvals::list(cli, store, *state, *request, *all, channel.clone(), *limit).await,
        Command::Approve { id, always, option } => {
            let choice = match (option, always) {
                (Some(o), _) => crate::service::approvals::Choice::Option(o.clone()),
                (None, true) => crate::service::approvals::Choice::AllowAlways,
                (None, false) => crate::service::approvals::Choice::AllowOnce,
            };
            approvals::decide(cli, store, id, choice).await
        }
        Command::Answer { id, answer } => {
            approvals::answer(cli, store, id, &answer.join(" ")).await
        }
        Command::Deny { id } => {
            approvals::decide(cli, store, id, crate::service::approvals::Choice::Deny).await
        }
        Command::Usage { channel, since, by } => {
            let since = crate::service::usage::parse_since(since, now_ms())
                .map_err(|e| Failure::new(EXIT_USAGE, e))?;
            let filter = crate::store::UsageFilter {
                since,
                channel: channel.clone(),
                by: *by,
            };
            let policy = crate::budget::SpendPolicy::from_config(config);
            let now = now_ms();
            let report = crate::service::usage::report(store, filter, &policy, now).await?;
            out(cli, serde_json::json!(report), || {
                usage_table(&report, &policy, now)
            });
            Ok(EXIT_OK)
        }
        Command::Rules { channel, command } => match command {
            None => approvals::rules(cli, store, channel).await,
            Some(RulesCommand::Rm { id }) => approvals::rule_rm(cli, store, channel, *id).await,
        },
        Command::Start
        | Command::Migrate
        | Command::Config { .. }
        | Command::Doctor
        | Command::Completions { .. } => {
            unreachable!("handled by dispatch")
        }
    }
}

async fn channels(cli: &Cli, cmd: &ChannelsCommand, config: &Config, store: &Store) -> CmdResult {
    match cmd {
        ChannelsCommand::Add {
            name,
            agent_binary,
            agent_args,
            permission,
            webhook_secret,
            webhook_template,
            sandbox,
            allowed_ports,
        } => {
            let created = channels::create(
                store,
                config,
                channels::NewChannelSpec {
                    name: name.clone(),
                    agent_binary: agent_binary.clone(),
                    agent_args: (!agent_args.is_empty()).then(|| agent_args.clone()),
                    permission_policy: *permission,
                    matrix_room_id: None,
                    webhook_secret: webhook_secret.clone(),
                    webhook_template: webhook_template.clone(),
                    sandbox: *sandbox,
                    allowed_ports: allowed_ports.clone().and_then(|p| p.0),
                },
            )
            .await
            .map_err(|e| match e {
                channels::ChannelError::Store(e) => Failure::from(e),
                e => Failure::new(EXIT_ERROR, e.to_string()),
            })?;
            let url = created.webhook_path();
            let (ch, dir, token) = (created.channel, created.workspace, created.webhook_token);
            out(
                cli,
                serde_json::json!({ "channel": ch, "webhook_url": url, "webhook_token": token }),
                || {
                    format!(
                        "channel {} created\n  workspace:     {}\n  webhook:       POST {url}\n  webhook token: {token}  (shown once; only its hash is stored)",
                        ch.name,
                        dir.display(),
                    )
                },
            );
            Ok(EXIT_OK)
        }
        ChannelsCommand::Set {
            name,
            permission,
            sandbox,
            allowed_ports,
            budget_job_usd,
            budget_job_tokens,
            budget_day_usd,
            budget_month_usd,
            reply_footer,
            options,
            unset_options,
            add_dirs,
            remove_dirs,
        } => {
            let current = store
                .channel_get(name)
                .await?
                .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
            let new_options = if options.is_empty() && unset_options.is_empty() {
                None
            } else {
                let set = crate::store::parse_options(options.iter().map(String::as_str))
                    .map_err(|e| Failure::new(EXIT_USAGE, e))?;
                let mut all = current.options();
                for k in unset_options {
                    all.remove(k);
                }
                all.extend(set);
                Some(all)
            };
            let new_dirs = if add_dirs.is_empty() && remove_dirs.is_empty() {
                None
            } else {
                let mut dirs = current.directories();
                for d in remove_dirs {
                    let canon = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
                    dirs.retain(|x| x != d && *x != canon);
                }
                for d in channels::check_directories(add_dirs)? {
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
                Some(dirs)
            };
            let changes = channels::Changes {
                options: new_options,
                additional_directories: new_dirs,
                mcp_servers: None,
                permission_policy: *permission,
                sandbox: sandbox.map(|s| s.0),
                allowed_ports: allowed_ports.clone().map(|p| p.0),
                budget_job_usd: budget_job_usd.map(|s| s.0),
                budget_job_tokens: budget_job_tokens.map(|s| s.0),
                budget_day_usd: budget_day_usd.map(|s| s.0),
                budget_month_usd: budget_month_usd.map(|s| s.0),
                reply_footer: *reply_footer,
            };
            let ch = channels::update(store, name, changes)
                .await?
                .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
            out(cli, serde_json::json!(ch), || {
                let money = |c: Option<f64>| c.map(|c| format!("{c} USD"));
                format!(
                    "channel {name}: permission policy {}, sandbox {}, allowed ports {}, per-job budget {} / {}, per day {}, per month {}",
                    ch.permission_policy,
                    ch.sandbox
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| format!("{} (from [acp])", sandbox_default(config))),
                    match ch.ports().or_else(|| config.acp.allowed_ports.clone()) {
                        Some(p) => p.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
                        None => "any".into(),
                    },
                    money(ch.budget_job_usd.or(config.budget.job_max_cost_usd))
                        .unwrap_or_else(|| "no cost limit".into()),
                    ch.budget_job_tokens
                        .or(config.budget.job_max_tokens.map(|t| t as i64))
                        .map(|t| format!("{t} tokens"))
                        .unwrap_or_else(|| "no token limit".into()),
                    money(ch.budget_day_usd.or(config.budget.daily_max_cost_usd))
                        .unwrap_or_else(|| "no daily budget".into()),
                    money(ch.budget_month_usd.or(config.budget.monthly_max_cost_usd))
                        .unwrap_or_else(|| "no monthly budget".into()),
                )
            });
            Ok(EXIT_OK)
        }
        ChannelsCommand::Login { name, command } => login(cli, config, store, name, command).await,
        ChannelsCommand::Options { name } => {
            let ch = store
                .channel_get(name)
                .await?
                .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
            let view = channels::options_view(store, &ch).await?;
            out(cli, serde_json::json!(view), || options_text(&view));
            Ok(EXIT_OK)
        }
        ChannelsCommand::Mcp { name, command } => {
            let ch = store
                .channel_get(name)
                .await?
                .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
            let mut servers: Vec<crate::config::McpServerSpec> =
                serde_json::from_str(&ch.mcp_servers).unwrap_or_default();
            match command {
                None => {}
                Some(McpCommand::Rm { server }) => {
                    let before = servers.len();
                    servers.retain(|s| s.name != *server);
                    if servers.len() == before {
                        return Err(Failure::new(
                            EXIT_USAGE,
                            format!("channel {name} has no MCP server {server:?}"),
                        ));
                    }
                }
                Some(McpCommand::Add {
                    server,
                    command,
                    args,
                    env,
                    url,
                    headers,
                }) => {
                    let pairs = |list: &[String], what: &str| {
                        list.iter()
                            .map(|p| match p.split_once('=') {
                                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                                None => Err(Failure::new(
                                    EXIT_USAGE,
                                    format!("{what} {p:?}: expected NAME=VALUE"),
                                )),
                            })
                            .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
                    };
                    let spec = crate::config::McpServerSpec {
                        name: server.clone(),
                        command: command.clone(),
                        args: args.clone(),
                        env: pairs(env, "--env")?,
                        url: url.clone(),
                        headers: pairs(headers, "--header")?,
                    };
                    spec.validate().map_err(|e| Failure::new(EXIT_USAGE, e))?;
                    servers.retain(|s| s.name != *server);
                    servers.push(spec);
                }
            }
            if command.is_some() {
                let changes = channels::Changes {
                    mcp_servers: Some(servers.clone()),
                    ..channels::Changes::default()
                };
                channels::update(store, name, changes)
                    .await?
                    .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
            }
            let masked: Vec<_> = servers.iter().map(|s| s.masked()).collect();
            out(cli, serde_json::json!(masked), || {
                if masked.is_empty() {
                    format!("channel {name}: no MCP servers of its own")
                } else {
                    masked
                        .iter()
                        .map(|s| match (&s.command, &s.url) {
                            (_, Some(u)) => format!("{}  http  {u}", s.name),
                            (c, None) => format!(
                                "{}  stdio  {} {}",
                                s.name,
                                c.as_deref().unwrap_or(""),
                                s.args.join(" ")
                            ),
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            });
            Ok(EXIT_OK)
        }
        ChannelsCommand::List => {
            let list = store.channel_list().await?;
            out(cli, serde_json::json!(list), || channels_table(&list));
            Ok(EXIT_OK)
        }
        ChannelsCommand::Token { name } => {
            let (ch, token) = channels::rotate_token(store, name).await?;
            let url = channels::webhook_path(&ch);
            out(
                cli,
                serde_json::json!({ "channel": name, "webhook_url": url, "webhook_token": token }),
                || {
                    format!(
                        "channel {name}: new webhook token {token}  (shown once; the old token no longer works)\n  webhook:       POST {url}"
                    )
                },
            );
            Ok(EXIT_OK)
        }
        ChannelsCommand::Rm { name } => {
            channels::delete(store, name).await?;
            out(cli, serde_json::json!({ "deleted": name }), || {
                format!("channel {name} deleted")
            });
            Ok(EXIT_OK)
        }
    }
}

async fn schedule(cli: &Cli, cmd: &ScheduleCommand, config: &Config, store: &Store) -> CmdResult {
    use crate::service::schedules::{self as scheduler, AddSchedule, ScheduleError};
    let invalid = |e: ScheduleError| match e {
        ScheduleError::Invalid(m) => Failure::new(EXIT_USAGE, m),
        ScheduleError::Store(e) => Failure::from(e),
    };
    let not_found = |id: i64| Failure::new(EXIT_NOT_FOUND, format!("no schedule {id}"));
    match cmd {
        ScheduleCommand::Add {
            channel,
            when,
            prompt,
            tz,
            catch_up,
            overlap,
        } => {
            let user = std::env::var("USER").unwrap_or_else(|_| "cli".into());
            let s = scheduler::add(
                store,
                config,
                AddSchedule {
                    channel: channel.clone(),
                    when: when.clone(),
                    prompt: prompt.clone(),
                    timezone: tz.clone(),
                    catch_up: *catch_up,
                    overlap: *overlap,
                    created_by: format!("cli:{user}"),
                },
                now_ms(),
            )
            .await
            .map_err(invalid)?;
            out(cli, serde_json::json!(s), || {
                format!(
                    "schedule {} added: {} ({}), next run {} UTC",
                    s.id,
                    s.cron.clone().unwrap_or_else(|| "once".into()),
                    s.timezone,
                    s.next_run_at.map(format_ms).unwrap_or_else(|| "-".into())
                )
            });
            Ok(EXIT_OK)
        }
        ScheduleCommand::List => {
            let list = store.schedule_list().await?;
            out(cli, serde_json::json!(list), || schedules_table(&list));
            Ok(EXIT_OK)
        }
        ScheduleCommand::Pause { id } => {
            if !scheduler::pause(store, *id).await.map_err(invalid)? {
                return Err(not_found(*id));
            }
            out(
                cli,
                serde_json::json!({ "id": id, "enabled": false }),
                || format!("schedule {id} paused"),
            );
            Ok(EXIT_OK)
        }
        ScheduleCommand::Resume { id } => {
            if !scheduler::resume(store, *id, now_ms())
                .await
                .map_err(invalid)?
            {
                return Err(not_found(*id));
            }
            out(
                cli,
                serde_json::json!({ "id": id, "enabled": true }),
                || format!("schedule {id} resumed"),
            );
            Ok(EXIT_OK)
        }
        ScheduleCommand::Rm { id } => {
            if !scheduler::remove(store, *id).await.map_err(invalid)? {
                return Err(not_found(*id));
            }
            out(cli, serde_json::json!({ "deleted": id }), || {
                format!("schedule {id} deleted")
            });
            Ok(EXIT_OK)
        }
        ScheduleCommand::Next { cron, tz, count } => {
            let tz_name = tz
                .clone()
                .unwrap_or_else(|| scheduler::default_timezone(config));
            let zone = scheduler::parse_tz(&tz_name).map_err(invalid)?;
            let parsed = scheduler::parse_cron(cron).map_err(invalid)?;
            let times = scheduler::upcoming(&parsed, zone, now_ms(), (*count).clamp(1, 100));
            let list: Vec<String> = times.iter().map(|t| t.to_rfc3339()).collect();
            out(
                cli,
                serde_json::json!({ "cron": cron, "timezone": tz_name, "next": list }),
                || list.join("\n"),
            );
            Ok(EXIT_OK)
        }
    }
}

fn schedules_table(list: &[crate::store::Schedule]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.channel.clone(),
                s.cron.clone().unwrap_or_else(|| "once".into()),
                s.timezone.clone(),
                if s.done {
                    "done".into()
                } else if s.enabled {
                    "active".into()
                } else {
                    "paused".into()
                },
                s.next_run_at.map(format_ms).unwrap_or_else(|| "-".into()),
                s.catch_up.to_string(),
                s.skipped.to_string(),
                short(&s.prompt, 30),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CHANNEL",
            "WHEN",
            "TZ",
            "STATUS",
            "NEXT (UTC)",
            "CATCH-UP",
            "SKIPPED",
            "PROMPT",
        ],
        &rows,
    )
}

/// `gorp warm [channel]`: the pool, or a pre-warm request that the running gorp carries out.
async fn warm(
    cli: &Cli,
    store: &Store,
    channel: Option<&str>,
    no_wait: bool,
    timeout: u64,
) -> CmdResult {
    let Some(name) = channel else {
        let rows = store.warm_list().await?;
        out(cli, serde_json::json!(rows), || warm_table(&rows, now_ms()));
        return Ok(EXIT_OK);
    };
    let ch = store
        .channel_get(name)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
    let asked = now_ms();
    store.warm_request(ch.id, Some(asked), asked).await?;
    if no_wait {
        out(
            cli,
            serde_json::json!({ "channel": name, "requested": true }),
            || format!("{name}: pre-warm requested; the running gorp starts the agent"),
        );
        return Ok(EXIT_OK);
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let row = store.warm_get(ch.id).await?;
        if let Some(r) = row.filter(|r| r.warm_at.is_none() && r.updated_at >= asked) {
            let ok = matches!(r.state, WarmState::Warm | WarmState::Busy);
            out(cli, serde_json::json!(r), || match ok {
                true => format!("{name}: warm (pid {})", r.pid.unwrap_or(0)),
                false => format!(
                    "{name}: {} {}",
                    r.state,
                    r.error.clone().unwrap_or_default()
                ),
            });
            return Ok(if ok { EXIT_OK } else { EXIT_ERROR });
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(
                EXIT_TIMEOUT,
                format!("{name}: no running gorp warmed the agent within {timeout}s (is `gorp start` running?)"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until the job ends (or `timeout`), then prints its outcome and output. A job held by
/// a spent budget is said so once (on stderr) and waited for.
async fn wait_for(cli: &Cli, store: &Store, id: &str, timeout: Duration) -> CmdResult {
    let deadline = Instant::now() + timeout;
    let mut held: Option<String> = None;
    loop {
        let job = store
            .job_get(id)
            .await?
            .ok_or_else(|| StoreError::JobNotFound(id.into()))?;
        if job.state.is_terminal() {
            let output = store.job_output(id).await?;
            out(
                cli,
                serde_json::json!({ "job_id": id, "state": job.state, "stop_reason": job.stop_reason, "error": job.error, "output": output }),
                || match job.state {
                    JobState::Succeeded => output.clone(),
                    _ => format!(
                        "{output}\n[{}] {}",
                        job.state,
                        job.error.clone().unwrap_or_default()
                    ),
                },
            );
            return Ok(exit_for(job.state));
        }
        if job.state == JobState::Queued && held.is_none() {
            held = store.job_held_reason(id).await?;
            if let Some(why) = &held {
                eprintln!("{id}: {why}");
            }
        }
        if Instant::now() >= deadline {
            out(
                cli,
                serde_json::json!({ "job_id": id, "state": job.state, "timed_out": true, "held": held }),
                || format!("{id}: still {} after the wait ran out", job.state),
            );
            return Ok(EXIT_TIMEOUT);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn tail(cli: &Cli, store: &Store, id: &str, mut after: i64) -> CmdResult {
    loop {
        // Read the state first: events committed before a terminal state are then all seen.
        let job = store
            .job_get(id)
            .await?
            .ok_or_else(|| StoreError::JobNotFound(id.into()))?;
        let events = store.job_events_list(id, after, 1000).await?;
        for e in &events {
            after = e.seq;
            if cli.json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                println!("{}", event_line(e));
            }
        }
        if events.is_empty() && job.state.is_terminal() {
            if !cli.json {
                println!("[job {}]", job.state);
            }
            return Ok(exit_for(job.state));
        }
        if events.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
}

fn exit_for(state: JobState) -> i32 {
    match state {
        JobState::Failed => EXIT_JOB_FAILED,
        JobState::Cancelled => EXIT_JOB_CANCELLED,
        _ => EXIT_OK,
    }
}

fn out(cli: &Cli, json: serde_json::Value, human: impl FnOnce() -> String) {
    if cli.json {
        println!("{json}");
    } else {
        let s = human();
        if s.ends_with('\n') {
            print!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// Renders rows as a left-aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn short(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line
            .chars()
            .take(n.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.channel.clone(),
                j.source.to_string(),
                j.state.to_string(),
                format!("{}/{}", j.attempt, j.max_attempts),
                format_ms(j.created_at),
                short(&j.prompt, 40),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CHANNEL",
            "SOURCE",
            "STATE",
            "ATTEMPT",
            "CREATED (UTC)",
            "PROMPT",
        ],
        &rows,
    )
}

fn channels_table(list: &[Channel]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.webhook_id.clone(),
                c.agent_binary.clone().unwrap_or_else(|| "(default)".into()),
                c.permission_policy.to_string(),
                c.matrix_room_id.clone().unwrap_or_default(),
                c.acp_session_id.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "WEBHOOK ID",
            "AGENT",
            "PERMISSIONS",
            "MATRIX ROOM",
            "ACP SESSION",
        ],
        &rows,
    )
}

fn nodes_table(nodes: &[crate::store::Node], now: i64) -> String {
    if nodes.is_empty() {
        return "no node is up (gorp nodes --all lists those that stopped)".into();
    }
    let ago = |ms: i64| format!("{:.1}s ago", (now - ms).max(0) as f64 / 1000.0);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.host.clone(),
                n.state.clone(),
                crate::store::format_ms(n.started_at),
                ago(n.last_seen_at),
                n.slots.to_string(),
                n.channels.to_string(),
                n.running.to_string(),
                if n.leads.is_empty() {
                    "-".into()
                } else {
                    n.leads.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "HOST",
            "STATE",
            "STARTED",
            "LAST SEEN",
            "SLOTS",
            "CHANNELS",
            "RUNNING",
            "LEADS",
        ],
        &rows,
    )
}

fn warm_table(rows: &[WarmSession], now: i64) -> String {
    let secs = |ms: i64| format!("{}s", ms / 1000);
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let live = matches!(
                r.state,
                WarmState::Warm | WarmState::Busy | WarmState::Starting
            );
            vec![
                r.channel.clone(),
                r.state.to_string(),
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                r.last_used_at
                    .map(|t| secs(now - t))
                    .unwrap_or_else(|| "-".into()),
                match (live, r.expires_at) {
                    (true, Some(e)) => secs((e - now).max(0)),
                    _ => "-".into(),
                },
                r.holder.clone().unwrap_or_default(),
                r.sandbox.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "CHANNEL",
            "STATE",
            "PID",
            "IDLE",
            "EXPIRES IN",
            "NODE",
            "SANDBOX",
        ],
        &rows,
    )
}

fn usage_table(
    r: &crate::service::usage::Report,
    policy: &crate::budget::SpendPolicy,
    now: i64,
) -> String {
    let head = match r.by {
        crate::store::UsageBy::Day => "DAY (UTC)",
        crate::store::UsageBy::Channel => "CHANNEL",
        crate::store::UsageBy::Source => "SOURCE",
    };
    let row = |u: &crate::store::UsageRow| {
        vec![
            u.key.clone(),
            u.jobs.to_string(),
            u.attempts.to_string(),
            u.input_tokens.to_string(),
            u.output_tokens.to_string(),
            format!("{}/{}", u.cache_read_tokens, u.cache_write_tokens),
            format!("{:.4}", u.cost_usd),
            format!("{:.1}", u.agent_secs),
        ]
    };
    let mut rows: Vec<Vec<String>> = r.rows.iter().map(row).collect();
    rows.push(row(&r.total));
    let mut s = format!(
        "since {}\n{}",
        format_ms(r.since),
        table(
            &[
                head,
                "JOBS",
                "ATTEMPTS",
                "TOKENS IN",
                "TOKENS OUT",
                "CACHE R/W",
                "COST USD",
                "AGENT S",
            ],
            &rows,
        )
    );
    for b in &r.budgets {
        let lines = crate::budget::spend_lines(policy, b, now);
        s.push_str(&format!("\nbudget of {}: {}", b.channel, lines.join("; ")));
    }
    s
}

/// What `[acp] sandbox` comes to on this kernel.
fn sandbox_default(config: &Config) -> String {
    match config.acp.sandbox {
        Some(m) => m.to_string(),
        None if crate::sandbox::kernel_abi() > 0 => "landlock".into(),
        None => "none".into(),
    }
}

/// `gorp doctor`: each check on a line, `ok` or `FAIL` with what to do; exit 1 when the
/// config asks for what cannot hold here.
/// `gorp channels login`: the channel's agent directories, or a command run in them.
async fn login(
    cli: &Cli,
    config: &Config,
    store: &Store,
    name: &str,
    command: &[String],
) -> CmdResult {
    let ch = store
        .channel_get(name)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
    let own = config.agent_state_dir(&ch.name);
    let (home, tmp) = (own.join("home"), own.join("tmp"));
    for d in [&home, &tmp] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot create {}: {e}", d.display())))?;
    }
    let workspace = config.channel_dir(&ch.name);
    let Some((program, args)) = command.split_first() else {
        out(
            cli,
            serde_json::json!({ "channel": name, "HOME": home, "TMPDIR": tmp, "workspace": workspace }),
            || {
                format!(
                    "HOME={}\nTMPDIR={}\n# workspace: {}\n# run an agent's own login with these, e.g.:\n#   gorp channels login {name} -- claude /login",
                    home.display(),
                    tmp.display(),
                    workspace.display()
                )
            },
        );
        return Ok(EXIT_OK);
    };
    std::fs::create_dir_all(&workspace).map_err(|e| {
        Failure::new(
            EXIT_ERROR,
            format!("cannot create {}: {e}", workspace.display()),
        )
    })?;
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(&workspace)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .status()
        .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot run {program}: {e}")))?;
    if status.success() {
        Ok(EXIT_OK)
    } else {
        Err(Failure::new(
            EXIT_ERROR,
            format!("{program} exited with {status}"),
        ))
    }
}

fn event_line(e: &Event) -> String {
    let text = e
        .text
        .clone()
        .unwrap_or_else(|| e.data.as_ref().map(|d| d.to_string()).unwrap_or_default());
    format!("{:>6}  {}  {:<16} {}", e.seq, format_ms(e.at), e.kind, text)
}

fn job_detail(j: &Job, events: &[Event], output: &str) -> String {
    let t = |v: Option<i64>| v.map(format_ms).unwrap_or_else(|| "-".into());
    let mut s = format!(
        "job       {}\nchannel   {}\nsource    {}\nstate     {}\nattempt   {}/{}\npriority  {}\ncreated   {}\nstarted   {}\nfinished  {}\n",
        j.id,
        j.channel,
        j.source,
        j.state,
        j.attempt,
        j.max_attempts,
        j.priority,
        format_ms(j.created_at),
        t(j.started_at),
        t(j.finished_at),
    );
    if let Some(r) = &j.stop_reason {
        s.push_str(&format!("stop      {r}\n"));
    }
    if let Some(e) = &j.error {
        s.push_str(&format!("error     {e}\n"));
    }
    s.push_str(&format!("prompt    {}\n\nevents\n", short(&j.prompt, 200)));
    for e in events {
        s.push_str(&event_line(e));
        s.push('\n');
    }
    s.push_str("\noutput\n");
    s.push_str(output);
    s.push('\n');
    s
}

/// `gorp channels options` as text.
fn options_text(view: &channels::OptionsView) -> String {
    let mut lines = Vec::new();
    match &view.offered {
        None => lines.push(format!(
            "channel {}: its agent has not run yet, so its options are not known (gorp warm {} starts it)",
            view.channel, view.channel
        )),
        Some(list) if list.is_empty() => {
            lines.push(format!("channel {}: the agent offers no options", view.channel))
        }
        Some(list) => {
            lines.push(format!("channel {}: options the agent offers", view.channel));
            for o in list {
                let set = view
                    .set_for(o)
                    .map(|v| format!("  set: {v}"))
                    .unwrap_or_default();
                lines.push(format!(
                    "  {} ({}{}): {}  [{}]{set}",
                    o.id,
                    o.kind,
                    o.category.as_deref().map(|c| format!(", {c}")).unwrap_or_default(),
                    o.current,
                    o.values.join(", ")
                ));
            }
        }
    }
    let unknown: Vec<String> = view
        .set_elsewhere()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !unknown.is_empty() {
        lines.push(format!("  set for the channel: {}", unknown.join(" ")));
    }
    lines.join("\n")
}
