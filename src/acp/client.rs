//! gorp's side of ACP: one live agent process and its JSON-RPC connection.
//!
//! [`AgentProcess::spawn`] starts the agent binary in its own process group
//! with piped stdio, connects an ACP v1 client over stdin/stdout, and runs
//! `initialize` (advertising `fs.readTextFile`, `fs.writeTextFile` and form elicitation). The
//! agent's stderr is read line by line: each line goes to `tracing` (target
//! `gorp::acp::stderr`), into a bounded tail ([`AgentProcess::stderr_tail`]),
//! and as a `"stderr"` [`AgentEvent`] to every prompt running at that moment.
//!
//! # Events
//!
//! During [`AgentProcess::prompt`] everything the agent sends for that
//! prompt's session is delivered, in arrival order, as an [`AgentEvent`]:
//!
//! | kind | source | text | data |
//! | --- | --- | --- | --- |
//! | `message` | `agent_message_chunk` | chunk text | the update JSON |
//! | `thought` | `agent_thought_chunk` | chunk text | the update JSON |
//! | `user_message` | `user_message_chunk` | chunk text | the update JSON |
//! | `tool_call` | `tool_call` | title | update JSON plus `id`, `title`, `kind`, `status` |
//! | `tool_call_update` | `tool_call_update` | new title, if any | update JSON plus `id` and whichever of `title`, `kind`, `status` changed |
//! | `plan` | `plan` | entries, one per line | the update JSON |
//! | `commands` | `available_commands_update` | command names, space separated | the update JSON |
//! | `mode` | `current_mode_update` | mode id | the update JSON |
//! | `usage` | `usage_update` | — | the update JSON (`used`, `size`, `cost`, `_meta`) |
//! | `config`, `session_info`, other | remaining update variants (kind = the wire tag for unknown ones) | — | the update JSON |
//! | same kinds | an update that does not match the ACP schema (e.g. `usage_update` with `"used": null`) | `content.text` or `title` if any | the raw update JSON plus `parseError` (counted by [`AgentProcess::unparsed_updates`]) |
//! | `turn_usage` | `usage` of the prompt response (unstable end-turn usage) | — | the usage JSON |
//! | `permission` | `session/request_permission` | chosen option id, or `cancelled` | `policy`, `outcome`, `optionId`, `optionKind`, `options`, `toolCall` |
//! | `permission_request` | `session/request_permission` under `ask`, before it is answered | title | `askId`, `options`, `toolCall` |
//! | `question` | `elicitation/create` (form) under `ask`, before it is answered | message | `askId`, `mode`, `message`, `requestedSchema`, `toolCallId` |
//! | `answer` | `elicitation/create` | `accept`, `decline` or `cancel` | `policy`, `action`, `content`, `mode`, `message`, `toolCallId`, `decision` |
//! | `fs_read` / `fs_write` | allowed `fs/read_text_file` / `fs/write_text_file` | path as requested | `path`, `resolved`, `bytes` (+ `line`, `limit`) |
//! | `fs_denied` | refused fs request | reason | `op`, `path`, `reason` |
//! | `fs_error` | allowed fs request that failed (missing file, I/O) | error | `op`, `path`, `resolved`, `error` |
//! | `stderr` | a stderr line of the agent process | the line | `{}` |
//!
//! # Shutdown
//!
//! [`AgentProcess::shutdown`] sends SIGTERM to the process group and waits
//! until no live member is left (bounded by the shutdown grace) before
//! SIGKILL; dropping an [`AgentProcess`] without `shutdown` sends SIGKILL to
//! the group at once.
//!
//! Updates for a session with no running prompt are not job output and are
//! dropped (counted by [`AgentProcess::unrouted_updates`]); replayed history
//! during [`AgentProcess::load_session`] is counted, not forwarded.
//! `stderr` events are process-wide, so their order relative to protocol
//! events is only approximate.
//!
//! # File-system confinement
//!
//! `fs/*` requests are confined to `fs_root` (canonicalised at spawn):
//! * a path containing a `..` component is refused;
//! * a relative path is resolved against `fs_root`; an absolute path is used
//!   as is;
//! * the deepest existing ancestor of the path is canonicalised (resolving
//!   every symlink) and must lie inside `fs_root`; when the path itself exists
//!   (including a dangling symlink) it is canonicalised too and must resolve
//!   inside `fs_root`;
//! * writes create missing parent directories (they are plain names under a
//!   checked, existing directory).
//!
//! Refusals answer the agent with a JSON-RPC error (`-32602`, message
//! `access denied: ...`) and emit `fs_denied`. The checks are path based; a
//! process racing to swap directories for symlinks between the check and the
//! access is out of scope.
//!
//! Why one file (about 1,100 lines): the process, the connection and the prompt turn share one
//! state (routes, backpressure, shutdown). Update mapping, fs confinement, permission answers
//! and process-group checks are in `client/`.

use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::pin::pin;
use std::process::Stdio as ProcStdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    CancelNotification, ClientCapabilities, ContentBlock, CreateElicitationRequest,
    CreateElicitationResponse, ElicitationCapabilities, ElicitationFormCapabilities,
    FileSystemCapabilities, Implementation, InitializeRequest, InitializeResponse,
    LoadSessionRequest, NewSessionRequest, PermissionOption, PermissionOptionKind, PromptRequest,
    PromptResponse, ReadTextFileRequest, ReadTextFileResponse, RequestPermissionOutcome,
    RequestPermissionRequest, RequestPermissionResponse, SelectedPermissionOutcome, SessionId,
    SessionNotification, SessionUpdate, WriteTextFileRequest, WriteTextFileResponse,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{
    is_connection_terminated, is_incoming_transport_closed, Agent, ByteStreams, Client, ErrorCode,
    JsonRpcMessage, JsonRpcNotification, JsonRpcRequest, UntypedMessage,
};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

mod fs;
mod modes;
mod permission;
mod process;
mod question;
mod session;
mod updates;

pub use fs::confine;
#[cfg(test)]
use fs::select_lines;
pub use modes::{ModeControl, SessionModes, ASKING_MODES};
pub use permission::{Answerer, AskAnswer};
#[cfg(test)]
use process::stat_is_live_member;
use process::{describe_exit, group_alive};
pub use session::{
    check_options, find_option, ConfigOptionInfo, McpServerSpec, Opened, OpenedWith, SessionSetup,
    MASK,
};
use updates::{enum_str, RawSessionUpdate};
pub use updates::{raw_update_event, update_event, AgentEvent};

/// How to start an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// Program to run (looked up on `PATH` when it has no slash).
    pub binary: String,
    pub args: Vec<String>,
    /// Working directory of the process, also the `cwd` of new/loaded sessions.
    pub cwd: PathBuf,
    /// Extra environment variables (the parent's environment is inherited).
    pub env: Vec<(String, String)>,
    /// The kernel sandbox the process (and everything it starts) runs in.
    pub sandbox: crate::sandbox::Spec,
}

/// Deadlines for the agent's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub initialize: Duration,
    pub new_session: Duration,
    pub load_session: Duration,
    /// Whole prompt turn; on expiry `session/cancel` is sent.
    pub prompt: Duration,
    /// A turn with no update from the agent for this long (time spent waiting for a person's
    /// answer does not count) is stalled: `session/cancel` is sent and the prompt fails with
    /// [`AcpError::Stalled`]. `None`: no watchdog.
    pub stall: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            initialize: Duration::from_secs(30),
            new_session: Duration::from_secs(30),
            load_session: Duration::from_secs(60),
            prompt: Duration::from_secs(30 * 60),
            stall: None,
        }
    }
}

/// How long [`AgentProcess::prompt`] waits for the turn to end after sending
/// `session/cancel` (unless changed with [`AgentProcess::set_cancel_grace`]).
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long [`AgentProcess::shutdown`] lets the process group exit after
/// SIGTERM before it sends SIGKILL (unless changed with
/// [`AgentProcess::set_shutdown_grace`]). Claude Code needs about 1-2 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Poll interval while waiting for a process group to disappear.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// Number of stderr lines kept for [`AgentProcess::stderr_tail`].
pub const STDERR_TAIL_LINES: usize = 100;
const STDERR_LINE_MAX: usize = 4096;

pub use crate::kinds::{EventKind, PermissionPolicy};

/// How to get the agent `binary` names: the install command of the agents gorp is tested with,
/// else how to point gorp at one; and the scripted agent for a first job without an API key.
pub fn install_hint(binary: &str) -> String {
    let name = std::path::Path::new(binary)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(binary);
    let install = match name {
        "claude-agent-acp" => {
            "install Claude Code's ACP agent with `npm install -g \
             @agentclientprotocol/claude-agent-acp` (it needs Node 22 or newer; in a gorp \
             checkout `scripts/setup-claude-agent` installs it with Node 22 and prints the \
             path to set as [acp] agent_binary)"
        }
        "codex-acp" => "install Codex's ACP agent with `npm install -g @zed-industries/codex-acp`",
        "gemini" => {
            "install Gemini CLI with `npm install -g @google/gemini-cli` and run it in ACP mode \
             (agent_args = [\"--experimental-acp\"])"
        }
        _ => {
            "set [acp] agent_binary (or the channel's --agent-binary) to an ACP agent: a path, \
              or a program on PATH"
        }
    };
    format!(
        "{install}. To try gorp without an agent or an API key, use the scripted agent that \
         comes with it: `gorp channels add demo --agent-binary <dir of gorp>/gorp-script-agent`"
    )
}

/// Errors of [`AgentProcess`].
#[derive(Debug, thiserror::Error)]
pub enum AcpError {
    #[error(
        "agent binary not found: {binary} (not on PATH, or a missing interpreter); {}",
        install_hint(binary)
    )]
    BinaryNotFound { binary: String },
    #[error("cannot start agent {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid agent spec: {0}")]
    InvalidSpec(String),
    /// The process ended before `initialize` was answered.
    #[error(
        "agent exited during startup ({status}); {}",
        tail_display(stderr_tail)
    )]
    ExitedEarly { status: String, stderr_tail: String },
    /// The process runs but does not answer `initialize` like an ACP agent
    /// (no answer in time, an error, or garbage).
    #[error("agent does not speak ACP: {reason}; {}", tail_display(stderr_tail))]
    NotAcp { reason: String, stderr_tail: String },
    #[error("{op} timed out after {after:?}")]
    Timeout { op: String, after: Duration },
    /// The agent process ended (or closed its stdout) while a request was
    /// outstanding, or before it.
    #[error("agent process exited ({status}); {}", tail_display(stderr_tail))]
    AgentExited { status: String, stderr_tail: String },
    /// The agent answered a request with a JSON-RPC error.
    #[error("{op} failed: agent error {code}: {message}")]
    Rpc {
        op: String,
        code: i32,
        message: String,
        data: Option<Value>,
    },
    #[error("agent does not support {0}")]
    Unsupported(String),
    /// The agent wrote one message (line) over the limit; it was stopped.
    #[error("the agent wrote one ACP message longer than {limit} bytes; it was stopped")]
    MessageTooLarge { limit: usize },
    #[error("session {0} already has a prompt running")]
    Busy(String),
    /// The agent sent nothing for [`Timeouts::stall`] during a turn; `session/cancel` was sent.
    #[error("stalled: no output from the agent for {after:?}; session/cancel sent")]
    Stalled { after: Duration },
    /// The sandbox asked for cannot be put in place; the agent was not started.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

fn tail_display(tail: &str) -> String {
    if tail.trim().is_empty() {
        "no stderr output".to_string()
    } else {
        format!("stderr tail:\n{tail}")
    }
}

/// Events of a prompt waiting for their reader (the job's event writer) before the agent's
/// messages wait to be read: an agent that floods updates is slowed to the pace of the
/// database instead of filling gorp's memory.
pub const EVENT_QUEUE: usize = 1024;

/// Longest line (one JSON-RPC message) gorp reads from an agent. A longer one stops the agent
/// and fails the prompt, so a runaway agent cannot make gorp buffer without bound.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Handlers that took a message this recently are still working through a backlog.
const BUSY_HANDLERS: Duration = Duration::from_millis(100);

enum Route {
    Prompt(mpsc::Sender<AgentEvent>),
    Load(Arc<AtomicUsize>),
}

struct Shared {
    policy: Mutex<PermissionPolicy>,
    /// `ask` requests waiting for their answer, by ask id.
    asks: Mutex<HashMap<u64, permission::PendingAsk>>,
    /// When the agent last sent an update for each session (the stall watchdog).
    activity: Mutex<HashMap<String, std::time::Instant>>,
    next_ask: AtomicU64,
    /// Per session: how long its prompt waited for people (moves the prompt's deadline).
    ask_clocks: Mutex<HashMap<String, permission::AskClock>>,
    /// Cancelled when the connection stops.
    stopped: CancellationToken,
    fs_root: PathBuf,
    routes: Mutex<HashMap<String, Route>>,
    /// The modes each session offers and is in (sessions whose agent advertised modes).
    modes: Mutex<HashMap<String, SessionModes>>,
    /// The config options each session offers, as last reported.
    options: Mutex<HashMap<String, Vec<ConfigOptionInfo>>>,
    stderr: Mutex<VecDeque<String>>,
    unrouted: AtomicU64,
    unparsed: AtomicU64,
    /// Set when the agent wrote a line over [`MAX_MESSAGE_BYTES`].
    oversized: Arc<AtomicBool>,
    /// Lines read from the agent, and messages of the agent gorp's handlers have taken (with
    /// when the last one was): the difference is what the protocol crate holds unread.
    lines_read: Arc<AtomicU64>,
    handled: AtomicU64,
    last_handled: Mutex<std::time::Instant>,
    pid: u32,
}

impl Shared {
    /// Sends `event` to the prompt running on `session`; counts replayed
    /// updates while `session` is loading. Returns whether it was routed.
    /// Notes that a handler took one of the agent's messages.
    fn took_message(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        *self.last_handled.lock().unwrap() = std::time::Instant::now();
    }

    /// True while gorp is behind with what it read: a prompt's event queue is full, or more
    /// than [`EVENT_QUEUE`] lines wait in the protocol crate while its handlers are busy with
    /// them (lines no handler takes — responses, unknown methods — are few, and count only
    /// while the handlers are working, so they can never stop reading for good).
    fn backlogged(&self) -> bool {
        let unread = self
            .lines_read
            .load(Ordering::Relaxed)
            .saturating_sub(self.handled.load(Ordering::Relaxed));
        if unread > EVENT_QUEUE as u64
            && self.last_handled.lock().unwrap().elapsed() < BUSY_HANDLERS
        {
            return true;
        }
        let routes = self.routes.lock().unwrap();
        routes
            .values()
            .any(|r| matches!(r, Route::Prompt(tx) if tx.capacity() == 0))
    }

    /// Notes that the agent did something for `session` now (for the stall watchdog).
    fn active(&self, session: &str) {
        self.activity
            .lock()
            .unwrap()
            .insert(session.to_string(), std::time::Instant::now());
    }

    /// When the agent last did something for `session`.
    fn last_active(&self, session: &str) -> Option<std::time::Instant> {
        self.activity.lock().unwrap().get(session).copied()
    }

    /// Waits while the prompt's event queue is full.
    async fn route(&self, session: &str, event: impl FnOnce() -> AgentEvent) -> bool {
        let tx = {
            let routes = self.routes.lock().unwrap();
            match routes.get(session) {
                Some(Route::Prompt(tx)) => {
                    self.active(session);
                    tx.clone()
                }
                Some(Route::Load(count)) => {
                    count.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                None => {
                    self.unrouted.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        };
        let _ = tx.send(event()).await;
        true
    }

    /// Sends `event` to the prompt running on `session`; false when no prompt runs there
    /// (nothing is sent, nor counted as replayed history).
    async fn send_to_prompt(&self, session: &str, event: AgentEvent) -> bool {
        let tx = match self.routes.lock().unwrap().get(session) {
            Some(Route::Prompt(tx)) => tx.clone(),
            _ => return false,
        };
        tx.send(event).await.is_ok()
    }

    async fn emit(&self, session: &str, event: AgentEvent) {
        if !self.route(session, || event.clone()).await {
            tracing::debug!(pid = self.pid, session, kind = %event.kind, "agent event outside a prompt dropped");
        }
    }

    async fn stderr_line(&self, line: String) {
        tracing::info!(target: "gorp::acp::stderr", pid = self.pid, "{line}");
        {
            let mut tail = self.stderr.lock().unwrap();
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        let prompts: Vec<mpsc::Sender<AgentEvent>> = {
            let routes = self.routes.lock().unwrap();
            routes
                .values()
                .filter_map(|r| match r {
                    Route::Prompt(tx) => Some(tx.clone()),
                    Route::Load(_) => None,
                })
                .collect()
        };
        for tx in prompts {
            let _ = tx
                .send(AgentEvent::new(
                    EventKind::Stderr.as_str(),
                    Some(line.clone()),
                    json!({}),
                ))
                .await;
        }
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap();
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Routes one `session/update`. Params that do not parse as a
    /// [`SessionNotification`] (e.g. `usage_update` with `"used": null`)
    /// are still routed, as an event built from the raw JSON with a
    /// `parseError` field, and counted.
    async fn on_update(&self, params: Value) {
        let note = match serde_json::from_value::<SessionNotification>(params.clone()) {
            Ok(note) => note,
            Err(e) => {
                self.unparsed.fetch_add(1, Ordering::Relaxed);
                let Some(session) = params.get("sessionId").and_then(Value::as_str) else {
                    tracing::warn!(
                        pid = self.pid,
                        "session/update without a sessionId dropped: {e}"
                    );
                    return;
                };
                tracing::warn!(
                    pid = self.pid,
                    session,
                    "session/update does not match the schema: {e}"
                );
                self.route(session, || {
                    raw_update_event(&params["update"], &e.to_string())
                })
                .await;
                return;
            }
        };
        let session = note.session_id.0.to_string();
        self.note_mode_update(&session, &note.update);
        self.note_options_update(&session, &note.update);
        self.route(&session, || update_event(&note.update)).await;
    }
}

fn stop_reason_str(resp: &PromptResponse) -> String {
    match serde_json::to_value(resp.stop_reason) {
        Ok(Value::String(s)) => s,
        _ => format!("{:?}", resp.stop_reason),
    }
}

/// Waits until the watched exit status is known.
async fn exited(mut rx: watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

/// One live agent process and its ACP connection.
pub struct AgentProcess {
    pid: u32,
    cx: ConnectionTo<Agent>,
    shared: Arc<Shared>,
    init: InitializeResponse,
    timeouts: Timeouts,
    cancel_grace: Duration,
    shutdown_grace: Duration,
    cwd: PathBuf,
    exit_rx: watch::Receiver<Option<String>>,
    stderr_done: watch::Receiver<bool>,
    stop: CancellationToken,
    wait_task: Option<JoinHandle<()>>,
    io_tasks: Vec<JoinHandle<()>>,
    reaped: bool,
    /// The sandbox the process runs in.
    sandbox: crate::sandbox::Report,
    /// What goes with every session it opens.
    setup: SessionSetup,
}

impl std::fmt::Debug for AgentProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentProcess")
            .field("pid", &self.pid)
            .field("cwd", &self.cwd)
            .field("exited", &self.has_exited())
            .finish_non_exhaustive()
    }
}

/// Removes a session route when dropped.
struct RouteGuard<'a> {
    shared: &'a Shared,
    session: String,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.shared.routes.lock().unwrap().remove(&self.session);
        self.shared.drop_asks(&self.session);
    }
}

enum Race<T> {
    Done(Result<T, agent_client_protocol::Error>),
    Cancelled,
    TimedOut,
    Stalled,
    Exited,
}

impl AgentProcess {
    /// Spawns the agent and runs `initialize`. Fails with
    /// [`AcpError::BinaryNotFound`], [`AcpError::Spawn`],
    /// [`AcpError::ExitedEarly`] (with the stderr tail) or
    /// [`AcpError::NotAcp`] (no `initialize` answer within
    /// `timeouts.initialize`, or a protocol error); the process group is
    /// killed on failure.
    pub async fn spawn(
        spec: &AgentSpec,
        timeouts: Timeouts,
        policy: PermissionPolicy,
        fs_root: PathBuf,
    ) -> Result<Self, AcpError> {
        let fs_root = fs_root
            .canonicalize()
            .map_err(|e| AcpError::InvalidSpec(format!("fs_root {}: {e}", fs_root.display())))?;
        let cwd = spec
            .cwd
            .canonicalize()
            .map_err(|e| AcpError::InvalidSpec(format!("cwd {}: {e}", spec.cwd.display())))?;
        if !cwd.is_dir() {
            return Err(AcpError::InvalidSpec(format!(
                "cwd {} is not a directory",
                cwd.display()
            )));
        }

        // Built here, applied in the child just before `exec` (see `crate::sandbox`); the
        // ruleset's fd stays open until the child has started.
        let sandbox = crate::sandbox::prepare(&spec.sandbox)?;
        let mut cmd = tokio::process::Command::new(&spec.binary);
        if let Some(fd) = sandbox.raw_fd() {
            // SAFETY: `enter` makes only async-signal-safe system calls (prctl and
            // landlock_restrict_self) on an fd that is open in the child.
            unsafe {
                cmd.pre_exec(move || crate::sandbox::enter(fd));
            }
        }
        // gorp's own settings (tokens, secrets) are not the agent's business.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with(crate::config::ENV_PREFIX) {
                cmd.env_remove(&key);
            }
        }
        cmd.args(&spec.args)
            .current_dir(&cwd)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .stderr(ProcStdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AcpError::BinaryNotFound {
                binary: spec.binary.clone(),
            },
            _ => AcpError::Spawn {
                binary: spec.binary.clone(),
                source: e,
            },
        })?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tracing::debug!(pid, binary = %spec.binary, "agent process started");

        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            policy: Mutex::new(policy),
            asks: Mutex::new(HashMap::new()),
            activity: Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(0),
            ask_clocks: Mutex::new(HashMap::new()),
            stopped: stop.clone(),
            fs_root,
            routes: Mutex::new(HashMap::new()),
            modes: Mutex::new(HashMap::new()),
            options: Mutex::new(HashMap::new()),
            stderr: Mutex::new(VecDeque::new()),
            unrouted: AtomicU64::new(0),
            unparsed: AtomicU64::new(0),
            oversized: Arc::new(AtomicBool::new(false)),
            lines_read: Default::default(),
            handled: AtomicU64::new(0),
            last_handled: Mutex::new(std::time::Instant::now()),
            pid,
        });

        let (exit_tx, exit_rx) = watch::channel(None);
        let wait_task = tokio::spawn(async move {
            let status = describe_exit(child.wait().await);
            tracing::debug!(pid, %status, "agent process exited");
            let _ = exit_tx.send(Some(status));
        });

        let (stderr_tx, stderr_done) = watch::channel(false);
        let stderr_shared = shared.clone();
        let stderr_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        if line.len() > STDERR_LINE_MAX {
                            let mut cut = STDERR_LINE_MAX;
                            while !line.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            line.truncate(cut);
                            line.push('…');
                        }
                        stderr_shared.stderr_line(line).await;
                    }
                }
            }
            let _ = stderr_tx.send(true);
        });

        let (cx_tx, cx_rx) = oneshot::channel();
        let conn_task = tokio::spawn(run_connection(
            shared.clone(),
            stdin,
            stdout,
            stop.clone(),
            cx_tx,
            pid,
        ));

        let cx = match cx_rx.await {
            Ok(cx) => cx,
            Err(_) => {
                // The connection ended before it started serving.
                let proc = PartialProcess {
                    pid,
                    shared,
                    exit_rx,
                    stop,
                    wait_task: Some(wait_task),
                    io_tasks: vec![stderr_task, conn_task],
                };
                let err = AcpError::NotAcp {
                    reason: "the ACP connection could not be established".into(),
                    stderr_tail: proc.stderr_tail(),
                };
                proc.shutdown().await;
                return Err(err);
            }
        };

        let mut proc = Self {
            pid,
            cx,
            shared,
            init: InitializeResponse::new(ProtocolVersion::V1),
            timeouts,
            cancel_grace: DEFAULT_CANCEL_GRACE,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            cwd,
            exit_rx,
            stderr_done,
            stop,
            wait_task: Some(wait_task),
            io_tasks: vec![stderr_task, conn_task],
            reaped: false,
            sandbox: sandbox.report,
            setup: SessionSetup::default(),
        };

        let request = InitializeRequest::new(ProtocolVersion::V1)
            .client_capabilities(
                ClientCapabilities::new()
                    .fs(FileSystemCapabilities::new()
                        .read_text_file(true)
                        .write_text_file(true))
                    .elicitation(
                        ElicitationCapabilities::new().form(ElicitationFormCapabilities::new()),
                    ),
            )
            .client_info(Implementation::new("gorp", env!("CARGO_PKG_VERSION")));
        let outcome = proc.race(request, timeouts.initialize).await;
        let error = match outcome {
            Race::Done(Ok(resp)) => {
                tracing::debug!(pid, agent = ?resp.agent_info, load_session = resp.agent_capabilities.load_session, "agent initialized");
                proc.init = resp;
                return Ok(proc);
            }
            Race::Done(Err(e)) if is_transport_end(&e) => proc.startup_exit_error().await,
            Race::Exited => proc.startup_exit_error().await,
            Race::Done(Err(e)) => {
                if proc.wait_exit(Duration::from_millis(200)).await.is_some() {
                    proc.startup_exit_error().await
                } else {
                    AcpError::NotAcp {
                        reason: format!("initialize failed: {e}"),
                        stderr_tail: proc.stderr_tail(),
                    }
                }
            }
            Race::TimedOut | Race::Cancelled | Race::Stalled => AcpError::NotAcp {
                reason: format!("no answer to initialize within {:?}", timeouts.initialize),
                stderr_tail: proc.stderr_tail(),
            },
        };
        proc.shutdown().await;
        Err(error)
    }

    /// Process id of the agent (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The permission policy this process answers `session/request_permission` with.
    pub fn policy(&self) -> PermissionPolicy {
        self.shared.policy()
    }

    /// The kernel sandbox the agent (and everything it starts) runs in.
    pub fn sandbox(&self) -> &crate::sandbox::Report {
        &self.sandbox
    }

    /// Whether the agent advertised `loadSession`.
    pub fn supports_load_session(&self) -> bool {
        self.init.agent_capabilities.load_session
    }

    /// The agent's `initialize` answer (capabilities, agent info, auth methods).
    pub fn initialize_response(&self) -> &InitializeResponse {
        &self.init
    }

    /// Changes how long a cancelled or timed-out prompt waits for the agent
    /// to finish the turn.
    pub fn set_cancel_grace(&mut self, grace: Duration) {
        self.cancel_grace = grace;
    }

    /// Changes how long [`Self::shutdown`] waits for the process group to
    /// exit after SIGTERM before it sends SIGKILL.
    pub fn set_shutdown_grace(&mut self, grace: Duration) {
        self.shutdown_grace = grace;
    }

    /// Number of `session/update`s received for sessions that had no prompt
    /// (or load) running.
    pub fn unrouted_updates(&self) -> u64 {
        self.shared.unrouted.load(Ordering::Relaxed)
    }

    /// Number of `session/update`s whose params did not match the ACP schema
    /// (delivered anyway, with a `parseError` in the event data).
    pub fn unparsed_updates(&self) -> u64 {
        self.shared.unparsed.load(Ordering::Relaxed)
    }

    /// The last [`STDERR_TAIL_LINES`] stderr lines, newline separated.
    pub fn stderr_tail(&self) -> String {
        self.shared.stderr_tail()
    }

    /// Whether the agent process has exited (and been reaped).
    pub fn has_exited(&self) -> bool {
        self.exit_rx.borrow().is_some()
    }

    /// The exit status description once the process has exited.
    pub fn exit_status(&self) -> Option<String> {
        self.exit_rx.borrow().clone()
    }

    /// Creates a session with the spec's `cwd`; returns its id.
    pub async fn new_session(&self) -> Result<String, AcpError> {
        let resp = self
            .request(
                "session/new",
                NewSessionRequest::new(self.cwd.clone())
                    .mcp_servers(self.mcp_servers())
                    .additional_directories(self.setup.additional_directories.clone()),
                self.timeouts.new_session,
            )
            .await?;
        let id = resp.session_id.0.to_string();
        self.remember_modes(&id, SessionModes::from_new(&resp));
        self.shared
            .remember_options(&id, resp.config_options.as_deref());
        Ok(id)
    }

    pub(super) fn remember_modes(&self, session: &str, modes: Option<SessionModes>) {
        let mut all = self.shared.modes.lock().unwrap();
        match modes {
            Some(m) => all.insert(session.to_string(), m),
            None => all.remove(session),
        };
    }

    /// Loads a session. The history the agent replays is not job output: it
    /// is counted, not forwarded.
    pub async fn load_session(&self, id: &str) -> Result<(), AcpError> {
        self.load_session_counted(id).await.map(|_| ())
    }

    /// Like [`Self::load_session`], returning how many `session/update`s the
    /// agent replayed.
    pub async fn load_session_counted(&self, id: &str) -> Result<usize, AcpError> {
        if !self.supports_load_session() {
            return Err(AcpError::Unsupported("session/load".into()));
        }
        let count = Arc::new(AtomicUsize::new(0));
        let _guard = self.register(id, Route::Load(count.clone()))?;
        let resp = self
            .request(
                "session/load",
                LoadSessionRequest::new(SessionId::new(id), self.cwd.clone())
                    .mcp_servers(self.mcp_servers())
                    .additional_directories(self.setup.additional_directories.clone()),
                self.timeouts.load_session,
            )
            .await?;
        self.remember_modes(id, SessionModes::from_load(&resp));
        self.shared
            .remember_options(id, resp.config_options.as_deref());
        Ok(count.load(Ordering::Relaxed))
    }

    /// Sends `session/prompt`; each `session/update`, permission decision
    /// and fs request of the session during it is delivered to `events` in
    /// order. Cancelling `cancel` sends `session/cancel` and then waits (at
    /// most the cancel grace) for the prompt to end. Returns the stop reason
    /// (`"end_turn"`, `"cancelled"`, `"max_tokens"`, ...).
    ///
    /// Errors: [`AcpError::AgentExited`] if the process dies mid-prompt;
    /// [`AcpError::Timeout`] (`op` = `session/prompt`) after
    /// `timeouts.prompt`, having sent `session/cancel`; [`AcpError::Timeout`]
    /// (`op` = `session/cancel`) if a cancelled turn does not end within the
    /// grace; [`AcpError::Rpc`] if the agent answers with an error.
    pub async fn prompt(
        &self,
        session_id: &str,
        text: &str,
        events: mpsc::Sender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<String, AcpError> {
        self.prompt_within(session_id, text, events, cancel, self.timeouts.prompt)
            .await
    }

    /// [`Self::prompt`] with a turn limit of `limit` instead of [`Timeouts::prompt`].
    pub async fn prompt_within(
        &self,
        session_id: &str,
        text: &str,
        events: mpsc::Sender<AgentEvent>,
        cancel: CancellationToken,
        limit: Duration,
    ) -> Result<String, AcpError> {
        let _guard = self.register(session_id, Route::Prompt(events.clone()))?;
        self.shared.active(session_id);
        let request = PromptRequest::new(
            SessionId::new(session_id),
            vec![ContentBlock::from(text.to_string())],
        );
        let op = "session/prompt";
        let mut fut = pin!(self.cx.send_request(request).block_task());
        let race = tokio::select! {
            biased;
            r = &mut fut => Race::Done(r),
            _ = exited(self.exit_rx.clone()) => Race::Exited,
            _ = cancel.cancelled() => Race::Cancelled,
            _ = self.prompt_deadline(session_id, limit) => Race::TimedOut,
            _ = self.stall_deadline(session_id) => Race::Stalled,
        };
        let result = match race {
            Race::Done(r) => r,
            Race::Exited => {
                match tokio::time::timeout(Duration::from_millis(200), &mut fut).await {
                    Ok(r) => r,
                    Err(_) => return Err(self.exited_error().await),
                }
            }
            Race::Cancelled => {
                self.send_cancel(session_id);
                match tokio::time::timeout(self.cancel_grace, &mut fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(AcpError::Timeout {
                            op: "session/cancel".into(),
                            after: self.cancel_grace,
                        })
                    }
                }
            }
            Race::TimedOut => {
                self.send_cancel(session_id);
                let _ = tokio::time::timeout(self.cancel_grace, &mut fut).await;
                return Err(AcpError::Timeout {
                    op: op.into(),
                    after: limit,
                });
            }
            Race::Stalled => {
                self.send_cancel(session_id);
                let _ = tokio::time::timeout(self.cancel_grace, &mut fut).await;
                return Err(AcpError::Stalled {
                    after: self.timeouts.stall.unwrap_or_default(),
                });
            }
        };
        match result {
            Ok(resp) => {
                if let Some(usage) = &resp.usage {
                    let _ = events
                        .send(AgentEvent::new(
                            EventKind::TurnUsage.as_str(),
                            None,
                            serde_json::to_value(usage).unwrap_or(Value::Null),
                        ))
                        .await;
                }
                Ok(stop_reason_str(&resp))
            }
            Err(e) => Err(self.map_error(op, e).await),
        }
    }

    /// Stops the agent: SIGTERM to the whole process group, then waits (at
    /// most the shutdown grace, see [`Self::set_shutdown_grace`]) until every
    /// live member of the group has exited, then SIGKILL to whatever is left;
    /// reaps the process.
    ///
    /// Waiting for the whole group, not just the leader, matters for agents
    /// that run a worker process: claude-agent-acp exits within milliseconds
    /// of SIGTERM while its Claude Code child is still writing the session
    /// transcript that a later `session/load` needs.
    pub async fn shutdown(mut self) {
        self.shutdown_now().await
    }

    /// Kills the agent's process group at once (SIGKILL), without waiting: for a node that
    /// lost its lease and must stop the agent before another node may start one. The process
    /// is reaped by a later [`AgentProcess::shutdown`].
    pub fn terminate(&self) {
        kill_group(self.pid);
    }

    async fn shutdown_now(&mut self) {
        self.stop.cancel();
        let group = self.pid as i32;
        if group > 0 {
            // SAFETY: plain syscall on a process group this value created;
            // ESRCH when the group is already gone.
            unsafe {
                libc::killpg(group, libc::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + self.shutdown_grace;
            let _ =
                tokio::time::timeout_at(deadline, self.exit_rx.clone().wait_for(Option::is_some))
                    .await;
            while group_alive(group) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(GROUP_POLL).await;
            }
            if group_alive(group) {
                tracing::debug!(pid = self.pid, grace = ?self.shutdown_grace, "agent process group outlived the shutdown grace; killed");
            }
            // SAFETY: as above.
            unsafe {
                libc::killpg(group, libc::SIGKILL);
            }
        }
        if let Some(task) = self.wait_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        for mut task in self.io_tasks.drain(..) {
            // stderr may be held open by a process that left the group.
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                tracing::debug!(
                    pid = self.pid,
                    "agent I/O task still busy after kill; aborted"
                );
                task.abort();
            }
        }
        self.reaped = true;
    }

    // -- internals --------------------------------------------------------

    /// Ends when the prompt of `session` has run `timeouts.prompt` plus the time it waited
    /// for people to answer permission requests (a wait is not a stalled agent).
    /// Returns when the agent has sent nothing for `session` for [`Timeouts::stall`] (never
    /// without one, or while a person is being asked; the end of an ask counts as activity).
    async fn stall_deadline(&self, session: &str) {
        let Some(stall) = self.timeouts.stall else {
            return std::future::pending().await;
        };
        loop {
            if self.shared.ask_clock(session).is_waiting() {
                tokio::time::sleep(stall.min(Duration::from_secs(1))).await;
                continue;
            }
            let last = self
                .shared
                .last_active(session)
                .unwrap_or_else(std::time::Instant::now);
            let due = tokio::time::Instant::from_std(last + stall);
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    async fn prompt_deadline(&self, session: &str, limit: Duration) {
        let start = tokio::time::Instant::now();
        loop {
            let clock = self.shared.ask_clock(session);
            let due = start + limit + clock.total();
            if clock.is_waiting() {
                // Asking: check again once the wait could have ended.
                tokio::time::sleep_until(
                    due.max(tokio::time::Instant::now() + Duration::from_secs(1)),
                )
                .await;
                continue;
            }
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    fn register(&self, session: &str, route: Route) -> Result<RouteGuard<'_>, AcpError> {
        let mut routes = self.shared.routes.lock().unwrap();
        if routes.contains_key(session) {
            return Err(AcpError::Busy(session.to_string()));
        }
        routes.insert(session.to_string(), route);
        Ok(RouteGuard {
            shared: &self.shared,
            session: session.to_string(),
        })
    }

    fn send_cancel(&self, session_id: &str) {
        if let Err(e) = self
            .cx
            .send_notification(CancelNotification::new(SessionId::new(session_id)))
        {
            tracing::debug!(pid = self.pid, "cannot send session/cancel: {e}");
        }
    }

    /// Sends `req` and waits for the answer, the deadline or the process
    /// exit, whichever comes first.
    async fn race<Req: JsonRpcRequest>(&self, req: Req, limit: Duration) -> Race<Req::Response> {
        let mut fut = pin!(self.cx.send_request(req).block_task());
        let race = tokio::select! {
            biased;
            r = &mut fut => Race::Done(r),
            _ = exited(self.exit_rx.clone()) => Race::Exited,
            _ = tokio::time::sleep(limit) => Race::TimedOut,
        };
        if let Race::Exited = race {
            // A last answer may already be in flight.
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), &mut fut).await {
                return Race::Done(r);
            }
        }
        race
    }

    async fn request<Req: JsonRpcRequest>(
        &self,
        op: &str,
        req: Req,
        limit: Duration,
    ) -> Result<Req::Response, AcpError> {
        match self.race(req, limit).await {
            Race::Done(Ok(resp)) => Ok(resp),
            Race::Done(Err(e)) => Err(self.map_error(op, e).await),
            Race::Exited => Err(self.exited_error().await),
            // Only a prompt watches for stalls.
            Race::TimedOut | Race::Cancelled | Race::Stalled => Err(AcpError::Timeout {
                op: op.into(),
                after: limit,
            }),
        }
    }

    async fn map_error(&self, op: &str, e: agent_client_protocol::Error) -> AcpError {
        if is_transport_end(&e) || self.has_exited() {
            return self.exited_error().await;
        }
        AcpError::Rpc {
            op: op.into(),
            code: e.code.value(),
            message: e.message,
            data: e.data,
        }
    }

    async fn wait_exit(&self, limit: Duration) -> Option<String> {
        let mut rx = self.exit_rx.clone();
        let status = match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
            Ok(Ok(status)) => status.clone(),
            _ => None,
        };
        status
    }

    /// Waits (bounded) for the exit status and the end of stderr, so the
    /// tail holds the agent's last words.
    async fn exit_details(&self) -> (String, String) {
        let status = self
            .wait_exit(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| "stdout closed; process still running".to_string());
        let mut done = self.stderr_done.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
        (status, self.stderr_tail())
    }

    async fn exited_error(&self) -> AcpError {
        if self.shared.oversized.load(Ordering::Relaxed) {
            // The connection is gone: make sure the process is too before anyone reuses it.
            if self.pid > 0 {
                // SAFETY: plain syscall on the process group gorp created for this agent.
                unsafe {
                    libc::killpg(self.pid as i32, libc::SIGKILL);
                }
            }
            let _ = self.wait_exit(Duration::from_secs(2)).await;
            return AcpError::MessageTooLarge {
                limit: MAX_MESSAGE_BYTES,
            };
        }
        let (status, stderr_tail) = self.exit_details().await;
        AcpError::AgentExited {
            status,
            stderr_tail,
        }
    }

    async fn startup_exit_error(&self) -> AcpError {
        let (status, stderr_tail) = self.exit_details().await;
        AcpError::ExitedEarly {
            status,
            stderr_tail,
        }
    }
}

/// The pieces that exist when the connection failed to start.
struct PartialProcess {
    pid: u32,
    shared: Arc<Shared>,
    exit_rx: watch::Receiver<Option<String>>,
    stop: CancellationToken,
    wait_task: Option<JoinHandle<()>>,
    io_tasks: Vec<JoinHandle<()>>,
}

impl PartialProcess {
    fn stderr_tail(&self) -> String {
        self.shared.stderr_tail()
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        let group = self.pid as i32;
        if group > 0 && self.exit_rx.borrow().is_none() {
            // SAFETY: plain syscall on the process group created at spawn.
            unsafe {
                libc::killpg(group, libc::SIGKILL);
            }
        }
        if let Some(task) = self.wait_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        for task in self.io_tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.stop.cancel();
            // Also when the leader has exited: a worker process (Claude
            // Code under claude-agent-acp) may outlive it.
            if self.pid > 0 {
                // SAFETY: plain syscall on the process group created at spawn;
                // ESRCH when the group is gone.
                unsafe {
                    libc::killpg(self.pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

fn is_transport_end(e: &agent_client_protocol::Error) -> bool {
    is_incoming_transport_closed(e) || is_connection_terminated(e)
}

/// Drives the client side of the connection until `stop` or the agent's
/// stdout closes.
async fn run_connection(
    shared: Arc<Shared>,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    stop: CancellationToken,
    cx_tx: oneshot::Sender<ConnectionTo<Agent>>,
    pid: u32,
) {
    let on_update = shared.clone();
    let on_permission = shared.clone();
    let on_question = shared.clone();
    let on_read = shared.clone();
    let on_write = shared.clone();
    let backlog = shared.clone();
    let stdout =
        super::line_limit::LineLimit::new(stdout, MAX_MESSAGE_BYTES, shared.oversized.clone())
            .counting_lines(shared.lines_read.clone())
            .with_backpressure(Arc::new(move || backlog.backlogged()));
    let transport = ByteStreams::new(stdin.compat_write(), stdout.compat());
    let result = Client
        .v1()
        .name("gorp")
        .on_receive_notification(
            async move |note: RawSessionUpdate, _cx: ConnectionTo<Agent>| {
                on_update.took_message();
                on_update.on_update(note.0).await;
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .on_receive_request(
            async move |req: RequestPermissionRequest,
                        responder: Responder<RequestPermissionResponse>,
                        _cx: ConnectionTo<Agent>| {
                on_permission.took_message();
                let resp = on_permission.decide_permission(&req).await;
                responder.respond(resp)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: CreateElicitationRequest,
                        responder: Responder<CreateElicitationResponse>,
                        _cx: ConnectionTo<Agent>| {
                on_question.took_message();
                let resp = on_question.answer_question(&req).await;
                responder.respond(resp)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: ReadTextFileRequest,
                        responder: Responder<ReadTextFileResponse>,
                        _cx: ConnectionTo<Agent>| {
                on_read.took_message();
                responder.respond_with_result(on_read.fs_read(&req).await)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: WriteTextFileRequest,
                        responder: Responder<WriteTextFileResponse>,
                        _cx: ConnectionTo<Agent>| {
                on_write.took_message();
                responder.respond_with_result(on_write.fs_write(&req).await)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .connect_with(transport, async move |cx: ConnectionTo<Agent>| {
            let _ = cx_tx.send(cx.clone());
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = cx.incoming_closed() => {}
            }
            Ok(())
        })
        .await;
    match result {
        Ok(()) => tracing::debug!(pid, "agent connection closed"),
        Err(e) => tracing::debug!(pid, "agent connection ended with error: {e}"),
    }
    if shared.oversized.load(Ordering::Relaxed) {
        // Nobody reads the agent any more: stop it, so its prompt ends and its slot is freed.
        tracing::warn!(
            pid,
            limit = MAX_MESSAGE_BYTES,
            "agent wrote an oversized message; stopping it"
        );
        if pid > 0 {
            // SAFETY: plain syscall on the process group gorp created for this agent.
            unsafe {
                libc::killpg(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Kills the process group of the agent whose pid is `pid` (SIGKILL, no wait). Agents run in
/// their own process group, whose id is their pid.
pub fn kill_group(pid: u32) {
    let group = pid as i32;
    if group > 0 {
        // SAFETY: plain syscall on a process group gorp created; ESRCH when it is gone.
        unsafe {
            libc::killpg(group, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "x").unwrap();
        assert_eq!(
            confine(&root, Path::new("sub/a.txt")).unwrap(),
            root.join("sub/a.txt")
        );
        assert_eq!(
            confine(&root, &root.join("new/dir/b.txt")).unwrap(),
            root.join("new/dir/b.txt")
        );
        assert!(confine(&root, Path::new("../x")).is_err());
        assert!(confine(&root, Path::new("sub/../../x")).is_err());
        assert!(confine(&root, Path::new("/etc/passwd")).is_err());
        std::os::unix::fs::symlink("/etc", root.join("esc")).unwrap();
        assert!(confine(&root, Path::new("esc/passwd")).is_err());
        std::os::unix::fs::symlink("/nonexistent/zzz", root.join("dangling")).unwrap();
        assert!(confine(&root, Path::new("dangling")).is_err());
    }

    #[test]
    fn update_outside_the_schema_becomes_a_raw_event() {
        let params = json!({
            "sessionId": "s1",
            "update": {
                "sessionUpdate": "usage_update",
                "used": null,
                "size": 200000,
                "cost": { "amount": 0.01, "currency": "USD" },
            },
        });
        let err = serde_json::from_value::<SessionNotification>(params.clone()).unwrap_err();
        let event = raw_update_event(&params["update"], &err.to_string());
        assert_eq!(event.kind, "usage");
        assert_eq!(event.text, None);
        assert!(event.data["used"].is_null());
        assert_eq!(event.data["size"], 200000);
        assert!(event.data["parseError"].as_str().unwrap().contains("null"));

        let chunk = json!({
            "sessionUpdate": "agent_message_chunk",
            "content": { "type": "text", "text": "hi" },
            "extra": 1,
        });
        let event = raw_update_event(&chunk, "bad");
        assert_eq!(
            (event.kind.as_str(), event.text.as_deref()),
            ("message", Some("hi"))
        );
        let event = raw_update_event(&json!({ "sessionUpdate": "brand_new" }), "bad");
        assert_eq!(event.kind, "brand_new");
    }

    #[test]
    fn proc_stat_parsing() {
        let live = "4242 (node (worker)) S 1 4200 4200 0 -1 4194560 0 0";
        assert!(stat_is_live_member(live, 4200));
        assert!(!stat_is_live_member(live, 4242));
        let zombie = "4243 (claude) Z 1 4200 4200 0 -1 4194560 0 0";
        assert!(!stat_is_live_member(zombie, 4200));
        assert!(!stat_is_live_member("garbage", 4200));
        // This process is alive, in its own group.
        let own = unsafe { libc::getpgrp() };
        assert!(group_alive(own));
    }

    #[test]
    fn line_selection() {
        let text = "a\nb\nc\n";
        assert_eq!(select_lines(text, None, None), text);
        assert_eq!(select_lines(text, Some(2), None), "b\nc\n");
        assert_eq!(select_lines(text, Some(1), Some(2)), "a\nb\n");
    }
}
