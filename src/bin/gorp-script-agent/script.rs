//! `gorp-script-agent`: a real ACP agent that speaks JSON-RPC over stdio and
//! whose behaviour is scripted by the prompt text.
//!
//! It is meant for tests and demos of ACP clients: every observable thing a
//! real agent does (streaming chunks, thoughts, tool calls, permission
//! requests, client file-system calls, usage reports, crashes, hangs,
//! failures) can be triggered deterministically from a prompt.
//!
//! # Protocol surface
//!
//! * `initialize`: advertises `loadSession: true`. With `--startup-delay-ms N`
//!   the answer is delayed by `N` ms (to make cold starts measurable).
//! * `session/new`, `session/load`, `session/prompt`, `session/cancel`.
//! * Sessions are persisted as one append-only journal per session,
//!   `<state-dir>/<session-id>.jsonl` (`--state-dir DIR`, default
//!   `$TMPDIR/gorp-script-agent`), so a later process can `session/load` a
//!   session created by an earlier one. Loading replays the stored history as
//!   `session/update` notifications (a `user_message_chunk` per prompt
//!   followed by the recorded `agent_message_chunk` / `agent_thought_chunk`
//!   replies) before answering the request.
//! * Every prompt is appended to the session's history file when it starts
//!   (so `@history` and crashes see it) and rewritten with its replies and
//!   stop reason when it ends.
//! * `--turn-log FILE` appends one JSON line per event to `FILE` (shared by
//!   any number of agent processes; each line is one `write`): `spawn` when
//!   the process starts serving, `start` and `end` around every prompt turn,
//!   `exit` when it stops serving (stdin closed, or `@crash`). Every line has
//!   `event`, `ms` (wall clock, Unix milliseconds) and `pid`; turn lines add
//!   `session`, `cwd` (the session's working directory) and `tag` (the
//!   prompt's first line, at most 200 characters); `end` adds `stop` (the stop
//!   reason, or `error: …`). A turn with a `start` and no `end` was cut short
//!   by the process dying (SIGKILL, or a panic). Soak tests use it to check
//!   that two turns of one channel never overlap.
//! * `--modes A,B,…` makes every session advertise permission modes, starting in `A`;
//!   `--mode-control set-mode` (default) advertises them as `modes` (changed with
//!   `session/set_mode`), `config-option` as a session config option of category `mode`
//!   (`session/set_config_option`), `refuse` as `modes` whose `session/set_mode` fails. Like
//!   Claude Code, only the mode `default` asks the client: in any other mode `@permission`
//!   decides by itself and replies `permission: self-approved in mode <id>`. Without
//!   `--modes` no modes are advertised and `@permission` always asks.
//! * `--option ID=A,B,…` (repeatable) makes every session offer a select config option `ID`
//!   with those values, starting at `A` (category `model` for the id `model`, `thought_level`
//!   for `effort`), changed with `session/set_config_option`; `@options` replies with the values.
//! * `--resume` advertises `sessionCapabilities.resume` and serves `session/resume` (the
//!   session continues without its history replayed); `--close` advertises
//!   `sessionCapabilities.close` and serves `session/close`; `--load-hang` makes `session/load`
//!   never answer. HTTP MCP servers and additional directories are always advertised and
//!   recorded per session: `@setup` replies with how the session was opened, its MCP servers
//!   and its additional directories as JSON. The turn log gets `open` (`method`, `session`) and
//!   `close` (`session`) lines.
//!
//! # Directives
//!
//! The prompt text (all text content blocks joined with newlines) is read line
//! by line. A line whose first non-blank word is one of the directives below
//! is executed; directives run in order. Every other line, including lines
//! starting with an unknown `@word`, is ignored. A prompt without any
//! directive is answered with a single message `echo: <prompt text>`.
//!
//! | directive | effect |
//! | --- | --- |
//! | `@reply TEXT` | send `TEXT` as agent message chunk(s) (`\n` in `TEXT` is a newline, `\\` a backslash) |
//! | `@chunks N` | later `@reply`s are split into `N` chunks (default 1; a text shorter than `N` characters gets one chunk per character) |
//! | `@delay-ms N` | wait `N` ms between the chunks of a reply (default 0) |
//! | `@sleep-ms N` | wait `N` ms (cancellable) |
//! | `@thought TEXT` | send `TEXT` as an agent thought chunk |
//! | `@tool-call NAME` | send `tool_call` (id `call-K`, title `NAME`, status `in_progress`), then a `tool_call_update` with status `completed` |
//! | `@permission [TITLE]` | send `session/request_permission` with options `allow` (allow_once), `allow-always` (allow_always), `reject` (reject_once); then reply `permission: <option id>` or `permission: cancelled` |
//! | `@ask MESSAGE [\| CHOICE \| …]` | send `elicitation/create` (form mode, scoped to the session): with choices, a field `choice` (one of them) and a free-text field `note`; without, one free-text field `answer`; then reply `ask: accept <content JSON>`, `ask: decline`, `ask: cancel` or `ask: error: <message>` (`ask: client does not support form elicitation` when the client did not advertise it) |
//! | `@write-direct PATH CONTENT` | write `CONTENT` to `PATH` itself, not through ACP (a relative path is the session's cwd); reply `write-direct ok: PATH` or `write-direct error: <message>` |
//! | `@read-direct PATH` | read `PATH` itself, not through ACP; reply `read-direct ok: <content>` or `read-direct error: <message>` |
//! | `@sh COMMAND` | run `sh -c COMMAND` in the session's cwd (a child process); reply `sh exit <code>: <stdout and stderr>` |
//! | `@connect HOST:PORT` | open a TCP connection (2 s timeout); reply `connect ok: HOST:PORT` or `connect error: <message>` |
//! | `@read PATH` | call the client's `fs/read_text_file`; reply `read ok: <content>` or `read error: <message>` |
//! | `@write PATH CONTENT` | call the client's `fs/write_text_file` (`\n` in `CONTENT` is a newline, `\\` a backslash); reply `write ok: <path>` or `write error: <message>` |
//! | `@usage in=N out=N [cost=F] [size=N]` | add `N` tokens and `F` USD to the turn's usage and send a `usage_update`: `cost` is the session's running total in this process (as ACP specifies), `_meta` = `{"inputTokens","outputTokens"}` the turn's totals so far, `used` their sum, `size` default 200000; the prompt response also carries `usage` (unstable end-turn usage) with the turn's tokens |
//! | `@plan A \| B \| C` | send a `plan` update with those entries (medium priority, pending) |
//! | `@mode ID` | send a `current_mode_update` |
//! | `@commands A B C` | send an `available_commands_update` |
//! | `@stderr TEXT` | write `TEXT` as one line to stderr |
//! | `@flood N` | send `N` one-character agent message chunks as fast as the connection takes them |
//! | `@big-reply BYTES` | send one agent message chunk of `BYTES` characters (one ACP line of that size) |
//! | `@pid` | reply with this process id (decimal) |
//! | `@history` | reply with the number of prompts this session has seen, the current one included (decimal) |
//! | `@setup` | reply `setup: {"opened_with", "mcp_servers", "additional_directories"}` (JSON) for this session in this process |
//! | `@options` | reply `options: ID=VALUE …` with the session's config options (`--option`), sorted |
//! | `@stop REASON` | end the turn now with stop reason `end_turn`, `max_tokens`, `max_turn_requests`, `refusal` or `cancelled` |
//! | `@fail MESSAGE` | end the turn now with a JSON-RPC error (code -32603, message `MESSAGE`) |
//! | `@hang` | wait until the turn is cancelled (`session/cancel` or `$/cancel_request`), then stop with `cancelled` |
//! | `@hang-once` | like `@hang`, unless this session already saw a turn with the same prompt (a retry in a resumed session): then go on |
//! | `@crash` | print a line to stderr and exit the process with code 3 |
//!
//! Whenever the turn is cancelled (`session/cancel` for the session, or
//! `$/cancel_request` for the prompt request), the running directive stops at
//! its next wait and the prompt answers with stop reason `cancelled`.
//!
//! Why one file: the directive parser and the agent that plays it are one small program; a
//! tenth of it is tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    AgentCapabilities, AvailableCommand, AvailableCommandsUpdate, CancelNotification,
    CloseSessionRequest, CloseSessionResponse, ContentBlock, ContentChunk, Cost,
    CreateElicitationRequest, CurrentModeUpdate, ElicitationAction, ElicitationFormMode,
    ElicitationPropertySchema, ElicitationSchema, ElicitationSessionScope, EnumOption,
    Implementation, InitializeRequest, InitializeResponse, LoadSessionRequest, LoadSessionResponse,
    McpCapabilities, McpServer, NewSessionRequest, NewSessionResponse, PermissionOption,
    PermissionOptionKind, Plan, PlanEntry, PlanEntryPriority, PlanEntryStatus, PromptRequest,
    PromptResponse, ReadTextFileRequest, RequestPermissionOutcome, RequestPermissionRequest,
    ResumeSessionRequest, ResumeSessionResponse, SessionAdditionalDirectoriesCapabilities,
    SessionCapabilities, SessionCloseCapabilities, SessionConfigOption,
    SessionConfigOptionCategory, SessionConfigSelectOption, SessionId, SessionMode,
    SessionModeState, SessionNotification, SessionResumeCapabilities, SessionUpdate,
    SetSessionConfigOptionRequest, SetSessionConfigOptionResponse, SetSessionModeRequest,
    SetSessionModeResponse, StopReason, StringPropertySchema, ToolCall, ToolCallStatus,
    ToolCallUpdate, ToolCallUpdateFields, ToolKind, Usage, UsageUpdate, WriteTextFileRequest,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{Agent, Client, Error, ErrorCode, Stdio};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Exit code used by `@crash`.
pub const CRASH_EXIT_CODE: i32 = 3;

/// Default context-window size reported by `@usage` when `size=` is absent.
pub const DEFAULT_USAGE_SIZE: u64 = 200_000;

/// Command-line configuration of the script agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptAgentConfig {
    /// Delay before answering `initialize`.
    pub startup_delay: Duration,
    /// Directory holding one `<session-id>.jsonl` journal per session.
    pub state_dir: PathBuf,
    /// `--turn-log FILE`: append a JSON line per turn start/end (see the module docs).
    pub turn_log: Option<PathBuf>,
    /// `--modes A,B`: the permission modes sessions advertise (the first is the initial one).
    pub modes: Vec<String>,
    /// `--mode-control`: how the modes are advertised and changed.
    pub mode_control: ModeControl,
    /// `--option ID=A,B`: select config options (id, values; the first is the initial one).
    pub options: Vec<(String, Vec<String>)>,
    /// `--resume`: serve `session/resume`.
    pub resume: bool,
    /// `--close`: serve `session/close`.
    pub close: bool,
    /// `--load-hang`: `session/load` never answers.
    pub load_hang: bool,
}

/// How the script agent advertises its modes (`--mode-control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeControl {
    #[default]
    SetMode,
    ConfigOption,
    /// `modes`, but `session/set_mode` answers with an error.
    Refuse,
}

/// The one mode in which the script agent asks the client before a tool runs.
pub const ASKING_MODE: &str = "default";

impl Default for ScriptAgentConfig {
    fn default() -> Self {
        Self {
            startup_delay: Duration::ZERO,
            state_dir: default_state_dir(),
            turn_log: None,
            modes: Vec::new(),
            mode_control: ModeControl::SetMode,
            options: Vec::new(),
            resume: false,
            close: false,
            load_hang: false,
        }
    }
}

/// `$TMPDIR/gorp-script-agent`.
pub fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("gorp-script-agent")
}

/// Usage text of the binary.
pub const USAGE: &str =
    "usage: gorp-script-agent [--startup-delay-ms N] [--state-dir DIR] [--turn-log FILE] \
     [--modes A,B,...] [--mode-control set-mode|config-option|refuse] [--option ID=A,B,...] \
     [--resume] [--close] [--load-hang]\n\
Speaks ACP over stdio; see the gorp::acp::script_agent docs for the prompt directives.";

impl ScriptAgentConfig {
    /// Parses the command-line arguments (without the program name).
    /// Accepts `--flag value` and `--flag=value`.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, String> {
        let mut config = Self::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args.next().ok_or_else(|| format!("{name} needs a value")),
                }
            };
            match flag.as_str() {
                "--startup-delay-ms" => {
                    let v = value("--startup-delay-ms")?;
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| format!("--startup-delay-ms: not a number: {v}"))?;
                    config.startup_delay = Duration::from_millis(ms);
                }
                "--state-dir" => config.state_dir = PathBuf::from(value("--state-dir")?),
                "--turn-log" => config.turn_log = Some(PathBuf::from(value("--turn-log")?)),
                "--modes" => {
                    config.modes = value("--modes")?
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect();
                }
                "--mode-control" => {
                    config.mode_control = match value("--mode-control")?.as_str() {
                        "set-mode" => ModeControl::SetMode,
                        "config-option" => ModeControl::ConfigOption,
                        "refuse" => ModeControl::Refuse,
                        v => return Err(format!("--mode-control: unknown value {v}")),
                    }
                }
                "--option" => {
                    let v = value("--option")?;
                    let (id, values) = v
                        .split_once('=')
                        .ok_or_else(|| format!("--option: expected ID=A,B, got {v}"))?;
                    let values: Vec<String> = values
                        .split(',')
                        .map(str::trim)
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect();
                    if id.is_empty() || values.is_empty() {
                        return Err(format!("--option: expected ID=A,B, got {v}"));
                    }
                    config.options.push((id.to_string(), values));
                }
                "--resume" => config.resume = true,
                "--close" => config.close = true,
                "--load-hang" => config.load_hang = true,
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown argument: {other}\n{USAGE}")),
            }
        }
        Ok(config)
    }
}

// ---------------------------------------------------------------------------
// Directives
// ---------------------------------------------------------------------------

/// One parsed prompt directive. See the module documentation for semantics.
#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    Reply(String),
    Chunks(usize),
    DelayMs(u64),
    SleepMs(u64),
    Thought(String),
    ToolCall(String),
    Permission(String),
    Ask {
        message: String,
        choices: Vec<String>,
    },
    WriteDirect {
        path: String,
        content: String,
    },
    ReadDirect(String),
    Sh(String),
    Connect(String),
    Read(String),
    Write {
        path: String,
        content: String,
    },
    Usage {
        input: u64,
        output: u64,
        cost: Option<f64>,
        size: u64,
    },
    Plan(Vec<String>),
    Mode(String),
    Commands(Vec<String>),
    Stderr(String),
    Flood(usize),
    BigReply(usize),
    Pid,
    History,
    Setup,
    Options,
    Stop(String),
    Fail(String),
    Hang,
    HangOnce,
    Crash,
}

/// Parses the directives of a prompt, in order. A line that names a directive
/// but has a malformed argument (`@chunks x`) becomes an error reply
/// (`Directive::Reply("directive error: ...")`) so scripting mistakes are
/// visible in the transcript.
pub fn parse_directives(text: &str) -> Vec<Directive> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Directive> {
    let line = line.trim();
    if !line.starts_with('@') {
        return None;
    }
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line, ""),
    };
    let num = |what: &str| -> Result<u64, String> {
        rest.parse::<u64>()
            .map_err(|_| format!("{what} needs a non-negative integer, got {rest:?}"))
    };
    let parsed: Result<Directive, String> = match word {
        "@reply" => Ok(Directive::Reply(unescape(rest))),
        "@chunks" => num("@chunks").map(|n| Directive::Chunks(n.max(1) as usize)),
        "@delay-ms" => num("@delay-ms").map(Directive::DelayMs),
        "@sleep-ms" => num("@sleep-ms").map(Directive::SleepMs),
        "@thought" => Ok(Directive::Thought(rest.to_string())),
        "@tool-call" => Ok(Directive::ToolCall(if rest.is_empty() {
            "tool".to_string()
        } else {
            rest.to_string()
        })),
        "@permission" => Ok(Directive::Permission(if rest.is_empty() {
            "scripted action".to_string()
        } else {
            rest.to_string()
        })),
        "@ask" => {
            let mut parts = rest.split('|').map(str::trim);
            match parts.next().filter(|m| !m.is_empty()) {
                Some(message) => Ok(Directive::Ask {
                    message: message.to_string(),
                    choices: parts.filter(|c| !c.is_empty()).map(String::from).collect(),
                }),
                None => Err("@ask needs a message".to_string()),
            }
        }
        "@write-direct" => match rest.split_once(char::is_whitespace) {
            Some((path, content)) => Ok(Directive::WriteDirect {
                path: path.to_string(),
                content: unescape(content.trim_start()),
            }),
            None if !rest.is_empty() => Ok(Directive::WriteDirect {
                path: rest.to_string(),
                content: String::new(),
            }),
            None => Err("@write-direct needs a path".to_string()),
        },
        "@read-direct" if !rest.is_empty() => Ok(Directive::ReadDirect(rest.to_string())),
        "@read-direct" => Err("@read-direct needs a path".to_string()),
        "@sh" if !rest.is_empty() => Ok(Directive::Sh(rest.to_string())),
        "@sh" => Err("@sh needs a command".to_string()),
        "@connect" if !rest.is_empty() => Ok(Directive::Connect(rest.to_string())),
        "@connect" => Err("@connect needs HOST:PORT".to_string()),
        "@read" => {
            if rest.is_empty() {
                Err("@read needs a path".to_string())
            } else {
                Ok(Directive::Read(rest.to_string()))
            }
        }
        "@write" => match rest.split_once(char::is_whitespace) {
            Some((path, content)) => Ok(Directive::Write {
                path: path.to_string(),
                content: unescape(content.trim_start()),
            }),
            None if !rest.is_empty() => Ok(Directive::Write {
                path: rest.to_string(),
                content: String::new(),
            }),
            None => Err("@write needs a path".to_string()),
        },
        "@usage" => parse_usage(rest),
        "@plan" => Ok(Directive::Plan(
            rest.split('|')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        )),
        "@mode" => Ok(Directive::Mode(rest.to_string())),
        "@commands" => Ok(Directive::Commands(
            rest.split_whitespace().map(str::to_string).collect(),
        )),
        "@stderr" => Ok(Directive::Stderr(rest.to_string())),
        "@flood" => rest
            .parse()
            .map(Directive::Flood)
            .map_err(|_| format!("@flood needs a count, got {rest:?}")),
        "@big-reply" => rest
            .parse()
            .map(Directive::BigReply)
            .map_err(|_| format!("@big-reply needs a size in bytes, got {rest:?}")),
        "@pid" => Ok(Directive::Pid),
        "@history" => Ok(Directive::History),
        "@setup" => Ok(Directive::Setup),
        "@options" => Ok(Directive::Options),
        "@stop" => Ok(Directive::Stop(rest.to_string())),
        "@fail" => Ok(Directive::Fail(if rest.is_empty() {
            "scripted failure".to_string()
        } else {
            rest.to_string()
        })),
        "@hang" => Ok(Directive::Hang),
        "@hang-once" => Ok(Directive::HangOnce),
        "@crash" => Ok(Directive::Crash),
        _ => return None,
    };
    Some(parsed.unwrap_or_else(|e| Directive::Reply(format!("directive error: {e}"))))
}

fn parse_usage(rest: &str) -> Result<Directive, String> {
    let mut input = 0;
    let mut output = 0;
    let mut cost = None;
    let mut size = DEFAULT_USAGE_SIZE;
    for field in rest.split_whitespace() {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("@usage field {field:?} is not key=value"))?;
        let bad = || format!("@usage: bad value for {k}: {v:?}");
        match k {
            "in" => input = v.parse().map_err(|_| bad())?,
            "out" => output = v.parse().map_err(|_| bad())?,
            "cost" => cost = Some(v.parse().map_err(|_| bad())?),
            "size" => size = v.parse().map_err(|_| bad())?,
            _ => return Err(format!("@usage: unknown key {k:?}")),
        }
    }
    Ok(Directive::Usage {
        input,
        output,
        cost,
        size,
    })
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits `text` into `n` pieces of nearly equal character counts (fewer when
/// the text has fewer than `n` characters; one empty piece for empty text).
pub fn split_chunks(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = n.clamp(1, chars.len());
    let base = chars.len() / n;
    let extra = chars.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut pos = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(chars[pos..pos + len].iter().collect());
        pos += len;
    }
    out
}

fn parse_stop_reason(s: &str) -> Option<StopReason> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

// ---------------------------------------------------------------------------
// Session state
// ---------------------------------------------------------------------------

/// One recorded agent output of a turn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// `"message"` or `"thought"`.
    pub kind: String,
    pub text: String,
}

/// One prompt turn of a session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Turn {
    pub prompt: String,
    #[serde(default)]
    pub replies: Vec<Reply>,
    /// `None` while the turn runs (or when the process died during it).
    #[serde(default)]
    pub stop_reason: Option<String>,
}

/// A session as loaded: the first line of `<state-dir>/<session-id>.jsonl`, plus its turns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionFile {
    pub session_id: String,
    pub cwd: PathBuf,
    #[serde(default)]
    pub turns: Vec<Turn>,
}

struct Session {
    file: SessionFile,
    /// Cancellation of the running turn, if any.
    cancel: Option<CancellationToken>,
    /// The session's cumulative cost in this process (`@usage cost=`), reported as ACP's
    /// `usage_update.cost`.
    cost: f64,
    /// How it was opened in this process, and what came with it (for `@setup`).
    setup: serde_json::Value,
}

/// `@setup`'s record of how a session was opened.
fn setup_record(method: &str, mcp: &[McpServer], dirs: &[PathBuf]) -> serde_json::Value {
    let names: Vec<String> = mcp
        .iter()
        .map(|m| match m {
            McpServer::Stdio(s) => format!("stdio:{}", s.name),
            McpServer::Http(h) => format!("http:{}", h.name),
            McpServer::Sse(h) => format!("sse:{}", h.name),
            _ => "other".to_string(),
        })
        .collect();
    serde_json::json!({ "opened_with": method, "mcp_servers": names, "additional_directories": dirs })
}

struct AgentState {
    config: ScriptAgentConfig,
    client_can_read: AtomicBool,
    /// The client advertised form elicitation.
    client_can_ask: AtomicBool,
    client_can_write: AtomicBool,
    sessions: Mutex<HashMap<String, Arc<Mutex<Session>>>>,
    /// The current permission mode of each session (with `--modes`).
    modes: Mutex<HashMap<String, String>>,
    /// The current value of each `--option` of each session.
    option_values: Mutex<HashMap<String, std::collections::BTreeMap<String, String>>>,
    counter: AtomicU64,
}

fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A session is a journal: a first line with the session (no turns), then one line per
/// change of a turn, the last line for a turn index winning. Appending keeps saves cheap when
/// many agents run at once (no new file per save).
fn session_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(format!("{id}.jsonl"))
}

/// One journal line after the first.
#[derive(Serialize, Deserialize)]
struct TurnRecord {
    turn: usize,
    #[serde(flatten)]
    body: Turn,
}

/// Writes a new journal for `file` (its turns included).
fn persist(state_dir: &Path, file: &SessionFile) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let head = SessionFile {
        session_id: file.session_id.clone(),
        cwd: file.cwd.clone(),
        turns: Vec::new(),
    };
    let mut out = serde_json::to_vec(&head).map_err(std::io::Error::other)?;
    out.push(b'\n');
    for (turn, body) in file.turns.iter().enumerate() {
        let rec = TurnRecord {
            turn,
            body: body.clone(),
        };
        out.extend(serde_json::to_vec(&rec).map_err(std::io::Error::other)?);
        out.push(b'\n');
    }
    let path = session_path(state_dir, &file.session_id);
    let tmp = path.with_extension(format!("jsonl.tmp{}", std::process::id()));
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, &path)
}

/// Appends the current state of the last turn.
fn append_last_turn(state_dir: &Path, file: &SessionFile) -> std::io::Result<()> {
    use std::io::Write;
    let Some(body) = file.turns.last() else {
        return Ok(());
    };
    let rec = TurnRecord {
        turn: file.turns.len() - 1,
        body: body.clone(),
    };
    let mut line = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .append(true)
        .open(session_path(state_dir, &file.session_id))?
        .write_all(&line)
}

/// Reads a journal back.
fn read_session(bytes: &[u8]) -> Result<SessionFile, String> {
    let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let head = lines.next().ok_or("empty session file")?;
    let mut file: SessionFile = serde_json::from_slice(head).map_err(|e| e.to_string())?;
    for line in lines {
        let rec: TurnRecord = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        if rec.turn < file.turns.len() {
            file.turns[rec.turn] = rec.body;
        } else if rec.turn == file.turns.len() {
            file.turns.push(rec.body);
        } else {
            return Err(format!(
                "turn {} recorded before turn {}",
                rec.turn,
                file.turns.len()
            ));
        }
    }
    Ok(file)
}

impl AgentState {
    /// The modes and mode config option to advertise for `session` (none without `--modes`);
    /// a session seen for the first time starts in the first mode.
    fn advertise(
        &self,
        session: &str,
    ) -> (Option<SessionModeState>, Option<Vec<SessionConfigOption>>) {
        let (modes, mode_option) = self.advertise_modes(session);
        let mut options = self.extra_options(session);
        if let Some(mut m) = mode_option {
            m.append(&mut options);
            options = m;
        }
        (modes, (!options.is_empty()).then_some(options))
    }

    /// The `--option` config options of `session`, at their current values.
    fn extra_options(&self, session: &str) -> Vec<SessionConfigOption> {
        let values = self.option_values(session);
        self.config
            .options
            .iter()
            .map(|(id, list)| {
                let current = values.get(id).cloned().unwrap_or_else(|| list[0].clone());
                let opts = list
                    .iter()
                    .map(|v| SessionConfigSelectOption::new(v.clone(), v.clone()))
                    .collect::<Vec<_>>();
                let o = SessionConfigOption::select(id.clone(), id.clone(), current, opts);
                match id.as_str() {
                    "model" => o.category(SessionConfigOptionCategory::Model),
                    "effort" => o.category(SessionConfigOptionCategory::ThoughtLevel),
                    _ => o,
                }
            })
            .collect()
    }

    /// The current `--option` values of `session` (initialised on first sight).
    fn option_values(&self, session: &str) -> std::collections::BTreeMap<String, String> {
        self.option_values
            .lock()
            .unwrap()
            .entry(session.to_string())
            .or_insert_with(|| {
                self.config
                    .options
                    .iter()
                    .map(|(id, list)| (id.clone(), list[0].clone()))
                    .collect()
            })
            .clone()
    }

    /// Sets an `--option` of `session`; an error text for an unknown option or value.
    fn set_option(&self, session: &str, id: &str, value: &str) -> Result<(), String> {
        let Some((_, list)) = self.config.options.iter().find(|(o, _)| o == id) else {
            return Err(format!("unknown config option {id}"));
        };
        if !list.iter().any(|v| v == value) {
            return Err(format!("option {id} has no value {value:?}"));
        }
        self.option_values(session);
        self.option_values
            .lock()
            .unwrap()
            .get_mut(session)
            .expect("initialised above")
            .insert(id.to_string(), value.to_string());
        Ok(())
    }

    fn advertise_modes(
        &self,
        session: &str,
    ) -> (Option<SessionModeState>, Option<Vec<SessionConfigOption>>) {
        let Some(first) = self.config.modes.first() else {
            return (None, None);
        };
        let current = self
            .modes
            .lock()
            .unwrap()
            .entry(session.to_string())
            .or_insert_with(|| first.clone())
            .clone();
        match self.config.mode_control {
            ModeControl::SetMode | ModeControl::Refuse => (
                Some(SessionModeState::new(
                    current,
                    self.config
                        .modes
                        .iter()
                        .map(|m| SessionMode::new(m.clone(), m.clone()))
                        .collect(),
                )),
                None,
            ),
            ModeControl::ConfigOption => (None, Some(vec![self.mode_option(current)])),
        }
    }

    fn mode_option(&self, current: String) -> SessionConfigOption {
        let values: Vec<SessionConfigSelectOption> = self
            .config
            .modes
            .iter()
            .map(|m| SessionConfigSelectOption::new(m.clone(), m.clone()))
            .collect();
        SessionConfigOption::select("mode", "Mode", current, values)
            .category(SessionConfigOptionCategory::Mode)
    }

    /// Changes `session`'s mode; an error text when the mode is unknown.
    fn set_mode(&self, session: &str, mode: &str) -> Result<(), String> {
        if !self.config.modes.iter().any(|m| m == mode) {
            return Err(format!("unknown mode {mode:?}"));
        }
        let mut modes = self.modes.lock().unwrap();
        match modes.get_mut(session) {
            Some(current) => {
                *current = mode.to_string();
                Ok(())
            }
            None => Err(format!("unknown session {session:?}")),
        }
    }

    /// The session's mode when it decides permissions itself (any mode but [`ASKING_MODE`]).
    fn self_deciding_mode(&self, session: &str) -> Option<String> {
        self.modes
            .lock()
            .unwrap()
            .get(session)
            .filter(|m| *m != ASKING_MODE)
            .cloned()
    }

    fn session(&self, id: &str) -> Option<Arc<Mutex<Session>>> {
        self.sessions.lock().unwrap().get(id).cloned()
    }

    fn new_session_id(&self) -> String {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("gsa-{}-{micros}-{n}", std::process::id())
    }

    fn save(&self, session: &Mutex<Session>) {
        let file = session.lock().unwrap().file.clone();
        if let Err(e) = append_last_turn(&self.config.state_dir, &file) {
            eprintln!(
                "gorp-script-agent: cannot persist session {}: {e}",
                file.session_id
            );
        }
    }
}

fn rpc_error(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::new(code, message)
}

/// Appends one `--turn-log` line: `{"event", "ms", "pid", ...fields}`. The line is written with
/// one `write` on a file opened for appending, so lines of concurrent agents never interleave.
fn log_turn_event(path: Option<&Path>, event: &str, fields: serde_json::Value) {
    use std::io::Write;
    let Some(path) = path else {
        return;
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut line = serde_json::json!({ "event": event, "ms": ms, "pid": std::process::id() });
    if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        line.extend(extra);
    }
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&bytes));
    if let Err(e) = written {
        eprintln!(
            "gorp-script-agent: cannot write turn log {}: {e}",
            path.display()
        );
    }
}

/// The `tag` of a turn-log line: the prompt's first line, at most 200 characters.
fn turn_tag(prompt: &str) -> String {
    prompt
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

/// Serves the script agent on this process's stdin/stdout until stdin closes.
pub async fn run_stdio(config: ScriptAgentConfig) -> Result<(), Error> {
    let turn_log = config.turn_log.clone();
    log_turn_event(turn_log.as_deref(), "spawn", serde_json::json!({}));
    let served = serve_stdio(config).await;
    log_turn_event(turn_log.as_deref(), "exit", serde_json::json!({}));
    served
}

async fn serve_stdio(config: ScriptAgentConfig) -> Result<(), Error> {
    let state = Arc::new(AgentState {
        config,
        client_can_read: AtomicBool::new(false),
        client_can_ask: AtomicBool::new(false),
        client_can_write: AtomicBool::new(false),
        sessions: Mutex::new(HashMap::new()),
        modes: Mutex::new(HashMap::new()),
        option_values: Mutex::new(HashMap::new()),
        counter: AtomicU64::new(0),
    });

    let s_init = state.clone();
    let s_new = state.clone();
    let s_load = state.clone();
    let s_resume = state.clone();
    let s_close = state.clone();
    let s_mode = state.clone();
    let s_option = state.clone();
    let s_prompt = state.clone();
    let s_cancel = state;

    Agent
        .v1()
        .name("gorp-script-agent")
        .on_receive_request(
            async move |req: InitializeRequest, responder: Responder<InitializeResponse>, _cx| {
                // Deliberately inline: the delay models a slow cold start.
                if !s_init.config.startup_delay.is_zero() {
                    tokio::time::sleep(s_init.config.startup_delay).await;
                }
                let fs = &req.client_capabilities.fs;
                s_init.client_can_ask.store(
                    req.client_capabilities
                        .elicitation
                        .as_ref()
                        .is_some_and(|e| e.form.is_some()),
                    Ordering::SeqCst,
                );
                s_init
                    .client_can_read
                    .store(fs.read_text_file, Ordering::SeqCst);
                s_init
                    .client_can_write
                    .store(fs.write_text_file, Ordering::SeqCst);
                responder.respond(
                    InitializeResponse::new(ProtocolVersion::V1)
                        .agent_capabilities(
                            AgentCapabilities::new()
                                .load_session(true)
                                .mcp_capabilities(McpCapabilities::new().http(true))
                                .session_capabilities(
                                    SessionCapabilities::new()
                                        .additional_directories(
                                            SessionAdditionalDirectoriesCapabilities::new(),
                                        )
                                        .resume(
                                            s_init
                                                .config
                                                .resume
                                                .then(SessionResumeCapabilities::new),
                                        )
                                        .close(
                                            s_init.config.close.then(SessionCloseCapabilities::new),
                                        ),
                                ),
                        )
                        .agent_info(Implementation::new(
                            "gorp-script-agent",
                            env!("CARGO_PKG_VERSION"),
                        )),
                )
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: NewSessionRequest, responder: Responder<NewSessionResponse>, _cx| {
                let id = s_new.new_session_id();
                let file = SessionFile {
                    session_id: id.clone(),
                    cwd: req.cwd.clone(),
                    turns: Vec::new(),
                };
                if let Err(e) = persist(&s_new.config.state_dir, &file) {
                    return responder.respond_with_error(rpc_error(
                        ErrorCode::INTERNAL_ERROR,
                        format!("cannot write session state: {e}"),
                    ));
                }
                s_new.sessions.lock().unwrap().insert(
                    id.clone(),
                    Arc::new(Mutex::new(Session {
                        file,
                        cancel: None,
                        cost: 0.0,
                        setup: setup_record(
                            "session/new",
                            &req.mcp_servers,
                            &req.additional_directories,
                        ),
                    })),
                );
                log_turn_event(
                    s_new.config.turn_log.as_deref(),
                    "open",
                    serde_json::json!({ "method": "session/new", "session": id }),
                );
                let (modes, options) = s_new.advertise(&id);
                responder.respond(
                    NewSessionResponse::new(id)
                        .modes(modes)
                        .config_options(options),
                )
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: LoadSessionRequest,
                        responder: Responder<LoadSessionResponse>,
                        cx: ConnectionTo<Client>| {
                if s_load.config.load_hang {
                    // Never answered: the client's timeout must free the channel.
                    cx.spawn(async move {
                        let _keep = responder;
                        std::future::pending::<()>().await;
                        Ok(())
                    })?;
                    return Ok(());
                }
                handle_load(&s_load, req, responder, &cx)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: ResumeSessionRequest,
                        responder: Responder<ResumeSessionResponse>,
                        _cx: ConnectionTo<Client>| {
                if !s_resume.config.resume {
                    return responder.respond_with_error(rpc_error(
                        ErrorCode::METHOD_NOT_FOUND,
                        "session/resume is not offered (no --resume)",
                    ));
                }
                let id = req.session_id.0.to_string();
                match open_stored(&s_resume, &id) {
                    Ok(session) => {
                        session.lock().unwrap().setup = setup_record(
                            "session/resume",
                            &req.mcp_servers,
                            &req.additional_directories,
                        );
                        log_turn_event(
                            s_resume.config.turn_log.as_deref(),
                            "open",
                            serde_json::json!({ "method": "session/resume", "session": id }),
                        );
                        let (modes, options) = s_resume.advertise(&id);
                        responder.respond(
                            ResumeSessionResponse::new()
                                .modes(modes)
                                .config_options(options),
                        )
                    }
                    Err(e) => responder.respond_with_error(e),
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: CloseSessionRequest,
                        responder: Responder<CloseSessionResponse>,
                        _cx: ConnectionTo<Client>| {
                if !s_close.config.close {
                    return responder.respond_with_error(rpc_error(
                        ErrorCode::METHOD_NOT_FOUND,
                        "session/close is not offered (no --close)",
                    ));
                }
                let id = req.session_id.0.to_string();
                let Some(session) = s_close.sessions.lock().unwrap().remove(&id) else {
                    return responder.respond_with_error(rpc_error(
                        ErrorCode::RESOURCE_NOT_FOUND,
                        format!("session {id} is not open"),
                    ));
                };
                if let Some(t) = session.lock().unwrap().cancel.as_ref() {
                    t.cancel();
                }
                log_turn_event(
                    s_close.config.turn_log.as_deref(),
                    "close",
                    serde_json::json!({ "session": id }),
                );
                responder.respond(CloseSessionResponse::new())
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: SetSessionModeRequest,
                        responder: Responder<SetSessionModeResponse>,
                        _cx| {
                if s_mode.config.mode_control != ModeControl::SetMode {
                    return responder.respond_with_error(rpc_error(
                        ErrorCode::INTERNAL_ERROR,
                        "session/set_mode is refused by --mode-control",
                    ));
                }
                match s_mode.set_mode(&req.session_id.0, &req.mode_id.0) {
                    Ok(()) => responder.respond(SetSessionModeResponse::new()),
                    Err(e) => responder.respond_with_error(rpc_error(ErrorCode::INVALID_PARAMS, e)),
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: SetSessionConfigOptionRequest,
                        responder: Responder<SetSessionConfigOptionResponse>,
                        _cx| {
                let value = req.value.as_value_id().map(|v| v.to_string());
                let sid = req.session_id.0.to_string();
                let result = match (s_option.config.mode_control, &*req.config_id.0, value) {
                    (ModeControl::ConfigOption, "mode", Some(v)) => s_option.set_mode(&sid, &v),
                    (_, id, Some(v)) => s_option.set_option(&sid, id, &v),
                    (_, id, None) => Err(format!("option {id} takes a value id")),
                };
                match result {
                    Ok(()) => {
                        let (_, options) = s_option.advertise(&sid);
                        responder.respond(SetSessionConfigOptionResponse::new(
                            options.unwrap_or_default(),
                        ))
                    }
                    Err(e) => responder.respond_with_error(rpc_error(ErrorCode::INVALID_PARAMS, e)),
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: PromptRequest,
                        responder: Responder<PromptResponse>,
                        cx: ConnectionTo<Client>| {
                let state = s_prompt.clone();
                let task_cx = cx.clone();
                // The turn's cancellation is installed here, inside the
                // dispatch loop, so a session/cancel that follows the prompt
                // on the wire always finds it.
                let token = CancellationToken::new();
                let session = state.session(&req.session_id.0);
                if let Some(session) = &session {
                    session.lock().unwrap().cancel = Some(token.clone());
                }
                // Run the turn outside the dispatch loop: it sends requests to
                // the client and waits for session/cancel.
                cx.spawn(async move {
                    run_prompt(state, session, token, req, responder, task_cx).await;
                    Ok(())
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_notification(
            async move |note: CancelNotification, _cx: ConnectionTo<Client>| {
                if let Some(session) = s_cancel.session(&note.session_id.0) {
                    if let Some(token) = session.lock().unwrap().cancel.as_ref() {
                        token.cancel();
                    }
                }
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .connect_to(Stdio::new())
        .await
}

/// The session `id`: open in this process, or read back from its journal.
fn open_stored(state: &AgentState, id: &str) -> Result<Arc<Mutex<Session>>, Error> {
    if !valid_session_id(id) {
        return Err(rpc_error(
            ErrorCode::INVALID_PARAMS,
            format!("malformed session id {id:?}"),
        ));
    }
    if let Some(s) = state.session(id) {
        return Ok(s);
    }
    let path = session_path(&state.config.state_dir, id);
    let file: SessionFile = match std::fs::read(&path) {
        Ok(bytes) => read_session(&bytes).map_err(|e| {
            rpc_error(
                ErrorCode::INTERNAL_ERROR,
                format!("corrupt session file {}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(rpc_error(
                ErrorCode::RESOURCE_NOT_FOUND,
                format!("session {id} not found"),
            ))
        }
        Err(e) => {
            return Err(rpc_error(
                ErrorCode::INTERNAL_ERROR,
                format!("cannot read {}: {e}", path.display()),
            ))
        }
    };
    let session = Arc::new(Mutex::new(Session {
        file,
        cancel: None,
        cost: 0.0,
        setup: serde_json::Value::Null,
    }));
    Ok(state
        .sessions
        .lock()
        .unwrap()
        .entry(id.to_string())
        .or_insert(session)
        .clone())
}

fn handle_load(
    state: &AgentState,
    req: LoadSessionRequest,
    responder: Responder<LoadSessionResponse>,
    cx: &ConnectionTo<Client>,
) -> Result<(), Error> {
    let id = req.session_id.0.to_string();
    let session = match open_stored(state, &id) {
        Ok(s) => s,
        Err(e) => return responder.respond_with_error(e),
    };
    session.lock().unwrap().setup = setup_record(
        "session/load",
        &req.mcp_servers,
        &req.additional_directories,
    );
    log_turn_event(
        state.config.turn_log.as_deref(),
        "open",
        serde_json::json!({ "method": "session/load", "session": id }),
    );
    let turns = session.lock().unwrap().file.turns.clone();
    let sid = req.session_id.clone();
    for turn in turns {
        cx.send_notification(SessionNotification::new(
            sid.clone(),
            SessionUpdate::UserMessageChunk(ContentChunk::new(ContentBlock::from(turn.prompt))),
        ))?;
        for reply in turn.replies {
            let chunk = ContentChunk::new(ContentBlock::from(reply.text));
            let update = if reply.kind == "thought" {
                SessionUpdate::AgentThoughtChunk(chunk)
            } else {
                SessionUpdate::AgentMessageChunk(chunk)
            };
            cx.send_notification(SessionNotification::new(sid.clone(), update))?;
        }
    }
    let (modes, options) = state.advertise(&id);
    responder.respond(
        LoadSessionResponse::new()
            .modes(modes)
            .config_options(options),
    )
}

fn prompt_text(blocks: &[ContentBlock]) -> String {
    let mut parts = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::Text(t) => parts.push(t.text.clone()),
            ContentBlock::ResourceLink(link) => parts.push(format!("[resource {}]", link.uri)),
            _ => {}
        }
    }
    parts.join("\n")
}

/// What ended a turn early.
enum Halt {
    Stop(StopReason),
    Fail(Error),
}

struct TurnRunner<'a> {
    state: &'a AgentState,
    session: &'a Arc<Mutex<Session>>,
    cx: &'a ConnectionTo<Client>,
    sid: SessionId,
    token: CancellationToken,
    chunks: usize,
    delay: Duration,
    replies: Vec<Reply>,
    usage: Option<(u64, u64)>,
}

impl TurnRunner<'_> {
    fn send(&self, update: SessionUpdate) -> Result<(), Halt> {
        self.cx
            .send_notification(SessionNotification::new(self.sid.clone(), update))
            .map_err(Halt::Fail)
    }

    fn check_cancelled(&self) -> Result<(), Halt> {
        if self.token.is_cancelled() {
            Err(Halt::Stop(StopReason::Cancelled))
        } else {
            Ok(())
        }
    }

    async fn sleep(&self, d: Duration) -> Result<(), Halt> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.token.cancelled() => Err(Halt::Stop(StopReason::Cancelled)),
        }
    }

    async fn message(&mut self, text: &str) -> Result<(), Halt> {
        let pieces = split_chunks(text, self.chunks);
        let mut sent = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 && !self.delay.is_zero() {
                if let Err(h) = self.sleep(self.delay).await {
                    self.record("message", &sent);
                    return Err(h);
                }
            }
            self.send(SessionUpdate::AgentMessageChunk(ContentChunk::new(
                ContentBlock::from(piece.clone()),
            )))?;
            sent.push_str(piece);
        }
        self.record("message", &sent);
        Ok(())
    }

    /// A single-chunk message regardless of `@chunks`.
    /// `path` as the agent itself opens it: relative to the session's cwd.
    fn session_path(&self, path: &str) -> PathBuf {
        self.session.lock().unwrap().file.cwd.join(path)
    }

    fn note(&mut self, text: String) -> Result<(), Halt> {
        self.send(SessionUpdate::AgentMessageChunk(ContentChunk::new(
            ContentBlock::from(text.clone()),
        )))?;
        self.record("message", &text);
        Ok(())
    }

    fn record(&mut self, kind: &str, text: &str) {
        if !text.is_empty() {
            self.replies.push(Reply {
                kind: kind.to_string(),
                text: text.to_string(),
            });
        }
    }

    fn next_call_id(&self) -> String {
        format!(
            "call-{}",
            self.state.counter.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Runs one directive.
    async fn run(&mut self, directive: Directive) -> Result<(), Halt> {
        self.check_cancelled()?;
        match directive {
            Directive::Reply(text) => self.message(&text).await?,
            Directive::Chunks(n) => self.chunks = n,
            Directive::DelayMs(ms) => self.delay = Duration::from_millis(ms),
            Directive::SleepMs(ms) => self.sleep(Duration::from_millis(ms)).await?,
            Directive::Thought(text) => {
                self.send(SessionUpdate::AgentThoughtChunk(ContentChunk::new(
                    ContentBlock::from(text.clone()),
                )))?;
                self.record("thought", &text);
            }
            Directive::ToolCall(name) => {
                let id = self.next_call_id();
                self.send(SessionUpdate::ToolCall(
                    ToolCall::new(id.clone(), name.clone())
                        .kind(ToolKind::Other)
                        .status(ToolCallStatus::InProgress)
                        .raw_input(serde_json::json!({ "name": name })),
                ))?;
                self.send(SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
                    id,
                    ToolCallUpdateFields::new()
                        .status(ToolCallStatus::Completed)
                        .raw_output(serde_json::json!({ "ok": true })),
                )))?;
            }
            Directive::Permission(title) => {
                if let Some(mode) = self.state.self_deciding_mode(&self.sid.0) {
                    self.note(format!("permission: self-approved in mode {mode}"))?;
                    return Ok(());
                }
                let id = self.next_call_id();
                let request = RequestPermissionRequest::new(
                    self.sid.clone(),
                    ToolCallUpdate::new(id, ToolCallUpdateFields::new().title(title)),
                    vec![
                        PermissionOption::new("allow", "Allow", PermissionOptionKind::AllowOnce),
                        PermissionOption::new(
                            "allow-always",
                            "Always allow",
                            PermissionOptionKind::AllowAlways,
                        ),
                        PermissionOption::new("reject", "Reject", PermissionOptionKind::RejectOnce),
                    ],
                );
                let sent = self.cx.send_request(request).block_task();
                let outcome = tokio::select! {
                    r = sent => r,
                    _ = self.token.cancelled() => return Err(Halt::Stop(StopReason::Cancelled)),
                };
                let text = match outcome {
                    Ok(resp) => match resp.outcome {
                        RequestPermissionOutcome::Selected(sel) => {
                            format!("permission: {}", sel.option_id)
                        }
                        RequestPermissionOutcome::Cancelled => "permission: cancelled".to_string(),
                        _ => "permission: unknown outcome".to_string(),
                    },
                    Err(e) => format!("permission: error: {}", e.message),
                };
                self.note(text)?;
            }
            Directive::Ask { message, choices } => {
                if !self.state.client_can_ask.load(Ordering::SeqCst) {
                    self.note("ask: client does not support form elicitation".to_string())?;
                    return Ok(());
                }
                let mut form = ElicitationSchema::new();
                if choices.is_empty() {
                    form.properties.insert(
                        "answer".into(),
                        ElicitationPropertySchema::String(StringPropertySchema::new()),
                    );
                } else {
                    let mut choice = StringPropertySchema::new();
                    choice.title = Some("Choice".into());
                    choice.one_of = Some(
                        choices
                            .iter()
                            .map(|c| EnumOption::new(c.clone(), c.clone()))
                            .collect(),
                    );
                    form.properties
                        .insert("choice".into(), ElicitationPropertySchema::String(choice));
                    let mut note = StringPropertySchema::new();
                    note.title = Some("Note".into());
                    form.properties
                        .insert("note".into(), ElicitationPropertySchema::String(note));
                }
                let request = CreateElicitationRequest::new(
                    ElicitationFormMode::new(ElicitationSessionScope::new(self.sid.clone()), form),
                    message,
                );
                let sent = self.cx.send_request(request).block_task();
                let outcome = tokio::select! {
                    r = sent => r,
                    _ = self.token.cancelled() => return Err(Halt::Stop(StopReason::Cancelled)),
                };
                let text = match outcome {
                    Ok(resp) => match resp.action {
                        ElicitationAction::Accept(a) => format!(
                            "ask: accept {}",
                            serde_json::to_string(&a.content).unwrap_or_default()
                        ),
                        ElicitationAction::Decline => "ask: decline".to_string(),
                        ElicitationAction::Cancel => "ask: cancel".to_string(),
                        _ => "ask: unknown action".to_string(),
                    },
                    Err(e) => format!("ask: error: {}", e.message),
                };
                self.note(text)?;
            }
            Directive::Read(path) => {
                let text = if !self.state.client_can_read.load(Ordering::SeqCst) {
                    "read error: client does not support fs/read_text_file".to_string()
                } else {
                    let sent = self
                        .cx
                        .send_request(ReadTextFileRequest::new(self.sid.clone(), path))
                        .block_task();
                    let r = tokio::select! {
                        r = sent => r,
                        _ = self.token.cancelled() => return Err(Halt::Stop(StopReason::Cancelled)),
                    };
                    match r {
                        Ok(resp) => format!("read ok: {}", resp.content),
                        Err(e) => format!("read error: {}", e.message),
                    }
                };
                self.note(text)?;
            }
            Directive::Write { path, content } => {
                let text = if !self.state.client_can_write.load(Ordering::SeqCst) {
                    "write error: client does not support fs/write_text_file".to_string()
                } else {
                    let sent = self
                        .cx
                        .send_request(WriteTextFileRequest::new(
                            self.sid.clone(),
                            path.clone(),
                            content,
                        ))
                        .block_task();
                    let r = tokio::select! {
                        r = sent => r,
                        _ = self.token.cancelled() => return Err(Halt::Stop(StopReason::Cancelled)),
                    };
                    match r {
                        Ok(_) => format!("write ok: {path}"),
                        Err(e) => format!("write error: {}", e.message),
                    }
                };
                self.note(text)?;
            }
            Directive::Usage {
                input,
                output,
                cost,
                size,
            } => {
                // Like ACP agents: the cost is the session's running total; the tokens in
                // `_meta` are the turn's so far.
                let (i, o) = self.usage.unwrap_or((0, 0));
                let (i, o) = (i + input, o + output);
                self.usage = Some((i, o));
                let mut meta = serde_json::Map::new();
                meta.insert("inputTokens".into(), i.into());
                meta.insert("outputTokens".into(), o.into());
                let mut update = UsageUpdate::new(i + o, size).meta(meta);
                if let Some(amount) = cost {
                    let total = {
                        let mut s = self.session.lock().unwrap();
                        s.cost += amount;
                        s.cost
                    };
                    update = update.cost(Cost::new(total, "USD"));
                }
                self.send(SessionUpdate::UsageUpdate(update))?;
            }
            Directive::Plan(entries) => {
                self.send(SessionUpdate::Plan(Plan::new(
                    entries
                        .into_iter()
                        .map(|e| {
                            PlanEntry::new(e, PlanEntryPriority::Medium, PlanEntryStatus::Pending)
                        })
                        .collect(),
                )))?;
            }
            Directive::Mode(id) => {
                self.send(SessionUpdate::CurrentModeUpdate(CurrentModeUpdate::new(id)))?;
            }
            Directive::Commands(names) => {
                self.send(SessionUpdate::AvailableCommandsUpdate(
                    AvailableCommandsUpdate::new(
                        names
                            .into_iter()
                            .map(|n| {
                                let d = format!("the {n} command");
                                AvailableCommand::new(n, d)
                            })
                            .collect(),
                    ),
                ))?;
            }
            Directive::Stderr(text) => eprintln!("{text}"),
            Directive::Flood(n) => {
                for _ in 0..n {
                    self.send(SessionUpdate::AgentMessageChunk(ContentChunk::new(
                        ContentBlock::from(".".to_string()),
                    )))?;
                }
                self.record("message", &format!("(flood of {n} chunks)"));
            }
            Directive::BigReply(bytes) => {
                self.send(SessionUpdate::AgentMessageChunk(ContentChunk::new(
                    ContentBlock::from("x".repeat(bytes)),
                )))?;
                self.record("message", &format!("({bytes}-byte reply)"));
            }
            Directive::WriteDirect { path, content } => {
                let full = self.session_path(&path);
                let text = match std::fs::write(&full, content) {
                    Ok(()) => format!("write-direct ok: {path}"),
                    Err(e) => format!("write-direct error: {e}"),
                };
                self.note(text)?;
            }
            Directive::ReadDirect(path) => {
                let full = self.session_path(&path);
                let text = match std::fs::read_to_string(&full) {
                    Ok(c) => format!("read-direct ok: {c}"),
                    Err(e) => format!("read-direct error: {e}"),
                };
                self.note(text)?;
            }
            Directive::Sh(command) => {
                let cwd = self.session.lock().unwrap().file.cwd.clone();
                let run = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&command)
                    .current_dir(&cwd)
                    .stdin(std::process::Stdio::null())
                    .output();
                let text = match run.await {
                    Ok(out) => format!(
                        "sh exit {}: {}{}",
                        out.status.code().unwrap_or(-1),
                        String::from_utf8_lossy(&out.stdout).trim_end(),
                        String::from_utf8_lossy(&out.stderr).trim_end()
                    ),
                    Err(e) => format!("sh error: {e}"),
                };
                self.note(text)?;
            }
            Directive::Connect(addr) => {
                let connect = tokio::net::TcpStream::connect(addr.as_str());
                let text = match tokio::time::timeout(Duration::from_secs(2), connect).await {
                    Ok(Ok(_)) => format!("connect ok: {addr}"),
                    Ok(Err(e)) => format!("connect error: {e}"),
                    Err(_) => "connect error: timed out".to_string(),
                };
                self.note(text)?;
            }
            Directive::Pid => self.note(std::process::id().to_string())?,
            Directive::Setup => {
                let setup = self.session.lock().unwrap().setup.clone();
                self.note(format!("setup: {setup}"))?;
            }
            Directive::Options => {
                let values = self.state.option_values(&self.sid.0);
                let list: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
                self.note(format!("options: {}", list.join(" ")))?;
            }
            Directive::History => {
                let n = self.session.lock().unwrap().file.turns.len();
                self.note(n.to_string())?;
            }
            Directive::Stop(reason) => {
                return match parse_stop_reason(&reason) {
                    Some(r) => Err(Halt::Stop(r)),
                    None => Err(Halt::Fail(rpc_error(
                        ErrorCode::INVALID_PARAMS,
                        format!("@stop: unknown stop reason {reason:?}"),
                    ))),
                };
            }
            Directive::Fail(message) => {
                return Err(Halt::Fail(rpc_error(ErrorCode::INTERNAL_ERROR, message)));
            }
            Directive::Hang => {
                self.token.cancelled().await;
                return Err(Halt::Stop(StopReason::Cancelled));
            }
            Directive::HangOnce => {
                let seen_before = {
                    let s = self.session.lock().unwrap();
                    let turns = &s.file.turns;
                    let (current, earlier) = turns.split_last().expect("the running turn");
                    earlier.iter().any(|t| t.prompt == current.prompt)
                };
                if !seen_before {
                    self.token.cancelled().await;
                    return Err(Halt::Stop(StopReason::Cancelled));
                }
            }
            Directive::Crash => {
                self.finish_turn(None);
                log_turn_event(
                    self.state.config.turn_log.as_deref(),
                    "exit",
                    serde_json::json!({ "crash": true }),
                );
                eprintln!(
                    "gorp-script-agent: @crash: exiting with code {CRASH_EXIT_CODE} (pid {})",
                    std::process::id()
                );
                std::process::exit(CRASH_EXIT_CODE);
            }
        }
        Ok(())
    }

    /// Stores the replies (and stop reason) of the running turn.
    fn finish_turn(&self, stop_reason: Option<&str>) {
        {
            let mut s = self.session.lock().unwrap();
            if let Some(turn) = s.file.turns.last_mut() {
                turn.replies = self.replies.clone();
                turn.stop_reason = stop_reason.map(str::to_string);
            }
        }
        self.state.save(self.session);
    }
}

async fn run_prompt(
    state: Arc<AgentState>,
    session: Option<Arc<Mutex<Session>>>,
    token: CancellationToken,
    req: PromptRequest,
    responder: Responder<PromptResponse>,
    cx: ConnectionTo<Client>,
) {
    let id = req.session_id.0.to_string();
    let Some(session) = session else {
        let _ = responder.respond_with_error(rpc_error(
            ErrorCode::RESOURCE_NOT_FOUND,
            format!("session {id} is not open in this process (use session/new or session/load)"),
        ));
        return;
    };
    let text = prompt_text(&req.prompt);
    let turn_log = state.config.turn_log.clone();
    let turn_fields = |extra: serde_json::Value| {
        let mut v = serde_json::json!({
            "session": id,
            "cwd": session.lock().unwrap().file.cwd,
            "tag": turn_tag(&text),
        });
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    log_turn_event(
        turn_log.as_deref(),
        "start",
        turn_fields(serde_json::json!({})),
    );
    {
        let mut s = session.lock().unwrap();
        s.file.turns.push(Turn {
            prompt: text.clone(),
            replies: Vec::new(),
            stop_reason: None,
        });
    }
    state.save(&session);

    // `$/cancel_request` for this prompt cancels the turn like session/cancel.
    let request_cancel = responder.cancellation();
    let watcher_token = token.clone();
    let watcher = tokio::spawn(async move {
        request_cancel.cancelled().await;
        watcher_token.cancel();
    });

    let mut turn = TurnRunner {
        state: &state,
        session: &session,
        cx: &cx,
        sid: req.session_id.clone(),
        token: token.clone(),
        chunks: 1,
        delay: Duration::ZERO,
        replies: Vec::new(),
        usage: None,
    };

    let directives = parse_directives(&text);
    let outcome: Result<(), Halt> = if directives.is_empty() {
        turn.note(format!("echo: {text}"))
    } else {
        let mut result = Ok(());
        for d in directives {
            result = turn.run(d).await;
            if result.is_err() {
                break;
            }
        }
        result
    };
    let result = match outcome {
        Ok(()) => Ok(StopReason::EndTurn),
        Err(Halt::Stop(r)) => Ok(r),
        Err(Halt::Fail(e)) => Err(e),
    };
    let reason_text = match &result {
        Ok(r) => serde_json::to_value(r)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{r:?}")),
        Err(e) => format!("error: {}", e.message),
    };
    turn.finish_turn(Some(&reason_text));
    log_turn_event(
        turn_log.as_deref(),
        "end",
        turn_fields(serde_json::json!({ "stop": reason_text })),
    );
    let usage = turn.usage;
    drop(turn);
    watcher.abort();
    session.lock().unwrap().cancel = None;

    let _ = match result {
        Ok(reason) => {
            let mut resp = PromptResponse::new(reason);
            if let Some((i, o)) = usage {
                resp = resp.usage(Usage::new(i + o, i, o));
            }
            responder.respond(resp)
        }
        Err(e) => responder.respond_with_error(e),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives_in_order() {
        let d = parse_directives(
            "hello\n@chunks 3\n  @reply hi there\n@usage in=10 out=20 cost=0.01\n@unknown x\n@write /a b\\nc\n@plan a | b",
        );
        assert_eq!(
            d,
            vec![
                Directive::Chunks(3),
                Directive::Reply("hi there".into()),
                Directive::Usage {
                    input: 10,
                    output: 20,
                    cost: Some(0.01),
                    size: DEFAULT_USAGE_SIZE
                },
                Directive::Write {
                    path: "/a".into(),
                    content: "b\nc".into()
                },
                Directive::Plan(vec!["a".into(), "b".into()]),
            ]
        );
        assert!(parse_directives("just text").is_empty());
        assert_eq!(
            parse_directives("@chunks x"),
            vec![Directive::Reply(
                "directive error: @chunks needs a non-negative integer, got \"x\"".into()
            )]
        );
    }

    #[test]
    fn splits_into_exact_chunks() {
        let c = split_chunks("hello world", 5);
        assert_eq!(c.len(), 5);
        assert_eq!(c.concat(), "hello world");
        assert_eq!(split_chunks("ab", 5), vec!["a", "b"]);
        assert_eq!(split_chunks("", 3), vec![""]);
    }

    #[test]
    fn parses_flags() {
        let c = ScriptAgentConfig::from_args(
            ["--startup-delay-ms", "250", "--state-dir=/x"].map(String::from),
        )
        .unwrap();
        assert_eq!(c.startup_delay, Duration::from_millis(250));
        assert_eq!(c.state_dir, PathBuf::from("/x"));
        assert_eq!(c.turn_log, None);
        let c = ScriptAgentConfig::from_args(["--turn-log", "/t.jsonl"].map(String::from)).unwrap();
        assert_eq!(c.turn_log, Some(PathBuf::from("/t.jsonl")));
        assert!(ScriptAgentConfig::from_args(["--bogus".to_string()]).is_err());
    }

    #[test]
    fn turn_log_appends_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turns.jsonl");
        log_turn_event(None, "start", serde_json::json!({}));
        log_turn_event(
            Some(&path),
            "start",
            serde_json::json!({ "tag": turn_tag("job 7\n@sleep-ms 1") }),
        );
        log_turn_event(
            Some(&path),
            "end",
            serde_json::json!({ "stop": "end_turn" }),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "start");
        assert_eq!(lines[0]["tag"], "job 7");
        assert_eq!(lines[0]["pid"], std::process::id());
        assert_eq!(lines[1]["stop"], "end_turn");
        assert!(lines[1]["ms"].as_u64().unwrap() >= lines[0]["ms"].as_u64().unwrap());
    }

    #[test]
    fn session_journal_replays_to_the_latest_turn_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = SessionFile {
            session_id: "s1".into(),
            cwd: "/w".into(),
            turns: Vec::new(),
        };
        persist(dir.path(), &file).unwrap();
        file.turns.push(Turn {
            prompt: "one".into(),
            replies: Vec::new(),
            stop_reason: None,
        });
        append_last_turn(dir.path(), &file).unwrap();
        file.turns[0].stop_reason = Some("end_turn".into());
        append_last_turn(dir.path(), &file).unwrap();
        let bytes = std::fs::read(session_path(dir.path(), "s1")).unwrap();
        assert_eq!(read_session(&bytes).unwrap(), file);
        assert!(read_session(b"").is_err());
    }

    #[test]
    fn stop_reasons_parse() {
        assert_eq!(parse_stop_reason("max_tokens"), Some(StopReason::MaxTokens));
        assert_eq!(parse_stop_reason("nope"), None);
    }
}
