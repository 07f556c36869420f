//! End-to-end tests: `AgentProcess` driving the real Claude Code ACP agent
//! (`@agentclientprotocol/claude-agent-acp`, installed by
//! `scripts/setup-claude-agent`) against the fake Anthropic Messages API in
//! `support/fake_anthropic.rs`. Nothing leaves 127.0.0.1.
//!
//! The agent binary is `$CLAUDE_AGENT_BIN`, else the launcher
//! `$CLAUDE_AGENT_DIR/claude-agent-acp`, else `<crate>/target/claude-agent-acp/claude-agent-acp`.
//! When it is missing every test fails and says how to install it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::claude_env::{agent_binary, claude_env, seed_plugin_blocklist};
use crate::support::fake_anthropic::{chunks, FakeAnthropic, RecordedRequest, Reply, RequestKind};
use gorp::acp::client::{
    AcpError, AgentEvent, AgentProcess, AgentSpec, PermissionPolicy, Timeouts, EVENT_QUEUE,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for waiting on something the agent does in response to us.
const WAIT: Duration = Duration::from_secs(60);

fn timeouts() -> Timeouts {
    Timeouts {
        initialize: WAIT,
        new_session: WAIT,
        load_session: WAIT,
        prompt: Duration::from_secs(120),
        stall: None,
    }
}

/// One fake API plus a scratch area: `home/` (the agent's `$HOME`, where
/// Claude keeps config and session transcripts) and `work/` (cwd, fs root).
struct ClaudeLab {
    dir: TempDir,
    fake: FakeAnthropic,
}

impl ClaudeLab {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["home", "work"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let lab = Self {
            dir,
            fake: FakeAnthropic::start().await,
        };
        lab.seed_plugin_blocklist();
        lab
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub).canonicalize().unwrap()
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    fn work(&self) -> PathBuf {
        self.path("work")
    }

    fn seed_plugin_blocklist(&self) {
        seed_plugin_blocklist(&self.home());
    }

    fn spec(&self) -> AgentSpec {
        let env = claude_env(&self.fake.base_url(), &self.home());
        AgentSpec {
            binary: agent_binary().display().to_string(),
            args: Vec::new(),
            cwd: self.work(),
            env,
            sandbox: gorp::sandbox::Spec::none(),
        }
    }

    async fn spawn(&self, policy: PermissionPolicy) -> AgentProcess {
        AgentProcess::spawn(&self.spec(), timeouts(), policy, self.work())
            .await
            .expect("claude-agent-acp starts")
    }

    /// Asserts that the agent tried to reach no host but the fake.
    fn assert_no_outbound(&self) {
        let outbound = self.fake.requests_of(RequestKind::Proxy);
        assert!(
            outbound.is_empty(),
            "outbound traffic: {:?}",
            outbound.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
    }
}

/// Puts `session` in the mode in which Claude Code asks the client before a tool runs, as
/// gorp's executor does before every prompt (the agent starts sessions in its own `auto`).
async fn asking(agent: &AgentProcess, session: &str) {
    let modes = agent
        .session_modes(session)
        .expect("claude-agent-acp advertises modes");
    let target = modes.asking_mode(None).expect("an asking mode");
    agent
        .set_session_mode(session, &target)
        .await
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", agent.stderr_tail()));
    assert_eq!(agent.session_modes(session).unwrap().current, target);
}

/// A new session in the asking mode.
async fn new_session(agent: &AgentProcess) -> String {
    let session = agent.new_session().await.unwrap();
    asking(agent, &session).await;
    session
}

/// Stops the agent and reports how long Claude Code took to exit.
async fn shutdown(agent: AgentProcess) {
    let started = Instant::now();
    agent.shutdown().await;
    eprintln!("shutdown: {:?}", started.elapsed());
}

/// Runs one prompt and collects every event it produced.
async fn prompt(
    agent: &AgentProcess,
    session: &str,
    text: &str,
) -> (Result<String, AcpError>, Vec<AgentEvent>) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    // Read while the prompt runs: the queue is bounded.
    let events = tokio::spawn(drain(rx));
    let result = agent
        .prompt(session, text, tx, CancellationToken::new())
        .await;
    (result, events.await.unwrap())
}

/// Collects events until every sender is gone (the prompt has returned).
async fn drain(mut rx: mpsc::Receiver<AgentEvent>) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

/// The non-empty texts of one event kind. Claude Code sends an empty
/// `agent_message_chunk` when a text block starts.
fn texts(events: &[AgentEvent], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == kind)
        .filter_map(|e| e.text.clone())
        .filter(|t| !t.is_empty())
        .collect()
}

fn of_kind<'a>(events: &'a [AgentEvent], kind: &str) -> Vec<&'a AgentEvent> {
    events.iter().filter(|e| e.kind == kind).collect()
}

fn model_requests(lab: &ClaudeLab) -> Vec<RecordedRequest> {
    lab.fake.requests_of(RequestKind::Model)
}

/// The `tool_result` blocks in the last user message of a Messages body.
fn tool_results(req: &RecordedRequest) -> Vec<Value> {
    let messages = req.body["messages"].as_array().cloned().unwrap_or_default();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .cloned()
        .unwrap_or(Value::Null);
    last_user["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b["type"] == "tool_result")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The text of a `tool_result` block (a string or an array of text blocks).
fn tool_result_text(block: &Value) -> String {
    match &block["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[tokio::test]
async fn cold_start_and_a_text_turn_stream_ordered_message_events() {
    let lab = ClaudeLab::new().await;
    let reply = "Hello from the fake model, streamed in a few pieces.";
    lab.fake.push(Reply::text(reply));

    let started = Instant::now();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let initialized = started.elapsed();
    let session = new_session(&agent).await;
    let cold_start = started.elapsed();
    eprintln!(
        "claude-agent-acp cold start: initialize {initialized:?}, session/new {cold_start:?}"
    );
    assert!(cold_start < WAIT, "cold start took {cold_start:?}");

    let init = agent.initialize_response();
    assert!(agent.supports_load_session());
    let info = init.agent_info.as_ref().expect("agentInfo");
    assert!(info.name.ends_with("/claude-agent-acp"), "{}", info.name);
    assert!(init.auth_methods.is_empty());

    let turn = Instant::now();
    let (result, events) = prompt(&agent, &session, "say hello").await;
    eprintln!("text turn: {:?}", turn.elapsed());
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert_eq!(texts(&events, "message"), chunks(reply), "{events:#?}");
    assert!(texts(&events, "message").len() > 1);
    let usage = of_kind(&events, "turn_usage");
    assert_eq!(usage.len(), 1, "{events:#?}");
    assert_eq!(usage[0].data["outputTokens"], 5);
    let context = of_kind(&events, "usage");
    assert!(!context.is_empty(), "{events:#?}");
    for update in &context {
        assert!(update.data["used"].is_u64(), "{update:?}");
        assert!(
            update.data["size"].as_u64().unwrap_or(0) >= 200_000,
            "{update:?}"
        );
    }
    assert_eq!(agent.unparsed_updates(), 0);

    let requests = model_requests(&lab);
    assert_eq!(requests.len(), 1, "{:#?}", lab.fake.summary());
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(req.query.as_deref(), Some("beta=true"));
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.credential_header.as_deref(), Some("x-api-key"));
    assert!(!req.headers.contains_key("x-api-key"));
    assert_eq!(req.headers["anthropic-version"], "2023-06-01");
    assert!(req.messages_json().contains("say hello"));
    let user_id = req.body["metadata"]["user_id"].as_str().unwrap_or_default();
    assert!(user_id.contains(&session), "metadata.user_id = {user_id}");
    let tools: Vec<&str> = req.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for tool in ["Bash", "Read", "Write", "Edit"] {
        assert!(tools.contains(&tool), "{tools:?}");
    }

    // A thinking block becomes `thought` events, then the text follows.
    let (thinking, text) = ("Let me think about the answer.", "The answer is 42.");
    lab.fake.push(Reply::Thinking {
        thinking: thinking.into(),
        text: text.into(),
    });
    let (result, events) = prompt(&agent, &session, "what is the answer?").await;
    assert_eq!(result.unwrap(), "end_turn");
    assert_eq!(texts(&events, "thought"), chunks(thinking), "{events:#?}");
    assert_eq!(texts(&events, "message"), chunks(text));
    let pos = |k: &str| events.iter().position(|e| e.kind == k).unwrap();
    assert!(pos("thought") < pos("message"));
    // The second request carries the first turn.
    let requests = model_requests(&lab);
    assert_eq!(requests.len(), 2);
    assert!(requests[1].messages_json().contains(reply));

    assert_eq!(lab.fake.pending_replies(), 0);
    let old_agent = is_zed_0_23(&agent);
    shutdown(agent).await;
    let side: Vec<_> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Side)
        .collect();
    if old_agent {
        assert!(side.is_empty(), "{:#?}", lab.fake.summary());
    } else {
        // The current agent asks for a session title on the side; the fake answers it.
        eprintln!("side requests: {:#?}", lab.fake.summary());
        assert!(side.len() <= 2, "{:#?}", lab.fake.summary());
    }
    lab.assert_no_outbound();
}

#[tokio::test]
async fn allowed_tools_run_and_write_straight_to_disk() {
    let lab = ClaudeLab::new().await;
    let target = lab.work().join("hello.txt");
    lab.fake.push(Reply::tool(
        "Write",
        json!({ "file_path": target, "content": "hello from claude\n" }),
    ));
    lab.fake.push(Reply::text("Wrote hello.txt."));
    lab.fake.push(Reply::tool(
        "Bash",
        json!({ "command": "echo bash-was-here > bash.txt", "description": "Write bash.txt" }),
    ));
    lab.fake.push(Reply::text("Ran it."));
    lab.fake
        .push(Reply::tool("Read", json!({ "file_path": target })));
    lab.fake.push(Reply::text("Read it."));
    let outside = lab.dir.path().canonicalize().unwrap().join("outside.txt");
    lab.fake.push(Reply::tool(
        "Write",
        json!({ "file_path": outside, "content": "outside the fs root\n" }),
    ));
    lab.fake.push(Reply::text("Wrote outside."));

    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = new_session(&agent).await;

    // Write: tool_call, permission (allow_once), the file, completion.
    let (result, events) = prompt(&agent, &session, "write hello.txt").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    let permissions = of_kind(&events, "permission");
    assert_eq!(permissions.len(), 1, "{events:#?}");
    let p = permissions[0];
    assert_eq!(p.data["policy"], "allow");
    assert_eq!(p.data["optionKind"], "allow_once");
    let options: Vec<(&str, &str)> = p.data["options"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| Some((o["id"].as_str()?, o["kind"].as_str()?)))
        .collect();
    eprintln!("Write options: {options:?}");
    let allow_once = options.iter().find(|(_, k)| *k == "allow_once").unwrap().0;
    assert_eq!(p.text.as_deref(), Some(allow_once));
    for kind in ["allow_always", "allow_once", "reject_once"] {
        assert!(options.iter().any(|(_, k)| *k == kind), "{options:?}");
    }
    assert_eq!(p.data["toolCall"]["title"], "Write hello.txt");
    assert_eq!(p.data["toolCall"]["kind"], "edit");
    assert_eq!(
        p.data["toolCall"]["rawInput"]["file_path"],
        target.display().to_string()
    );
    let tool_call = of_kind(&events, "tool_call")[0];
    let tool_id = tool_call.data["id"].as_str().unwrap().to_string();
    assert_eq!(p.data["toolCall"]["toolCallId"], tool_id.as_str());
    let pos = |k: &str| events.iter().position(|e| e.kind == k).unwrap();
    assert!(pos("tool_call") < pos("permission"));
    assert!(events
        .iter()
        .any(|e| e.kind == "tool_call_update" && e.data["status"] == "completed"));
    assert_eq!(texts(&events, "message").concat(), "Wrote hello.txt.");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hello from claude\n"
    );
    // Claude Code writes the file itself: no fs/write_text_file reaches us.
    assert!(of_kind(&events, "fs_write").is_empty(), "{events:#?}");
    let requests = model_requests(&lab);
    let results = tool_results(&requests[1]);
    assert_eq!(results.len(), 1, "{}", requests[1].messages_json());
    assert_eq!(results[0]["tool_use_id"], tool_id.as_str());
    assert!(tool_result_text(&results[0]).contains("File created successfully"));

    // Bash: permission titled with the command; runs in the workspace.
    let (result, events) = prompt(&agent, &session, "run a command").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    let permissions = of_kind(&events, "permission");
    assert_eq!(permissions.len(), 1, "{events:#?}");
    assert_eq!(permissions[0].data["optionKind"], "allow_once");
    assert_eq!(
        permissions[0].data["toolCall"]["title"],
        "echo bash-was-here > bash.txt"
    );
    assert_eq!(permissions[0].data["toolCall"]["kind"], "execute");
    assert_eq!(
        std::fs::read_to_string(lab.work().join("bash.txt")).unwrap(),
        "bash-was-here\n"
    );

    // Read inside the workspace needs no permission and no fs/read_text_file.
    let (result, events) = prompt(&agent, &session, "read it back").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert!(of_kind(&events, "permission").is_empty(), "{events:#?}");
    assert!(of_kind(&events, "fs_read").is_empty(), "{events:#?}");
    let requests = model_requests(&lab);
    let last = requests.last().unwrap();
    let results = tool_results(last);
    assert_eq!(results.len(), 1, "{}", last.messages_json());
    assert!(tool_result_text(&results[0]).contains("hello from claude"));

    // fs confinement does not apply: Claude Code writes outside `fs_root`
    // itself; the permission request is the only gate.
    let (result, events) = prompt(&agent, &session, "write outside").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    let p = of_kind(&events, "permission");
    assert_eq!(p.len(), 1, "{events:#?}");
    assert_eq!(p[0].data["optionKind"], "allow_once", "{events:#?}");
    assert!(of_kind(&events, "fs_denied").is_empty(), "{events:#?}");
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "outside the fs root\n"
    );

    shutdown(agent).await;
    lab.assert_no_outbound();
}

/// Why gorp sets the session mode: left in the mode it starts in, the current agent decides
/// permissions itself and never asks, so a `deny` policy would not hold.
#[tokio::test]
async fn a_session_left_in_its_own_mode_runs_tools_without_asking() {
    let lab = ClaudeLab::new().await;
    let target = lab.work().join("unasked.txt");
    lab.fake.push(Reply::tool(
        "Write",
        json!({ "file_path": target, "content": "written without asking\n" }),
    ));
    lab.fake.push(Reply::text("Done."));
    let agent = lab.spawn(PermissionPolicy::Deny).await;
    let session = agent.new_session().await.unwrap();
    let modes = agent.session_modes(&session).expect("modes");
    eprintln!("modes: {modes:?}");
    assert_ne!(
        modes.current, "default",
        "the agent starts in a mode of its own"
    );
    assert!(modes.available.iter().any(|m| m == "default"), "{modes:?}");
    assert_eq!(
        modes.control,
        gorp::acp::client::ModeControl::ConfigOption("mode".into()),
        "the agent advertises a mode config option"
    );
    let (result, events) = prompt(&agent, &session, "write unasked.txt").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert!(of_kind(&events, "permission").is_empty(), "{events:#?}");
    assert!(target.exists(), "the tool ran although the policy is deny");
    shutdown(agent).await;
    lab.assert_no_outbound();
}

#[tokio::test]
async fn denied_tool_does_not_run_and_the_model_is_told() {
    let lab = ClaudeLab::new().await;
    let target = lab.work().join("denied.txt");
    lab.fake.push(Reply::tool(
        "Write",
        json!({ "file_path": target, "content": "should not exist\n" }),
    ));
    lab.fake.push(Reply::text("Understood, not writing."));

    let agent = lab.spawn(PermissionPolicy::Deny).await;
    let session = new_session(&agent).await;
    let (result, events) = prompt(&agent, &session, "write denied.txt").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");

    let permissions = of_kind(&events, "permission");
    assert_eq!(permissions.len(), 1, "{events:#?}");
    assert_eq!(permissions[0].text.as_deref(), Some("reject"));
    assert_eq!(permissions[0].data["policy"], "deny");
    assert_eq!(permissions[0].data["optionKind"], "reject_once");
    assert!(!target.exists());
    assert!(events
        .iter()
        .any(|e| e.kind == "tool_call_update" && e.data["status"] == "failed"));
    assert_eq!(
        texts(&events, "message").concat(),
        "Understood, not writing."
    );

    let requests = model_requests(&lab);
    assert_eq!(requests.len(), 2, "{:#?}", lab.fake.summary());
    let results = tool_results(&requests[1]);
    assert_eq!(results.len(), 1, "{}", requests[1].messages_json());
    assert_eq!(results[0]["is_error"], true);
    assert!(
        tool_result_text(&results[0]).contains("User refused permission"),
        "{}",
        results[0]
    );
    shutdown(agent).await;
    lab.assert_no_outbound();
}

/// Sends `text`, cancels the token as soon as the first non-empty message
/// chunk reaches the client (the model request is then in flight), and
/// returns the result, the events and the time from cancel to answer.
async fn prompt_cancelled_mid_stream(
    agent: &AgentProcess,
    session: &str,
    text: &str,
) -> (Result<String, AcpError>, Vec<AgentEvent>, Duration) {
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let turn = async {
        let result = agent.prompt(session, text, tx, cancel.clone()).await;
        (result, Instant::now())
    };
    let controller = async {
        let mut events = Vec::new();
        let mut cancelled_at = None;
        while let Some(event) = rx.recv().await {
            let streaming =
                event.kind == "message" && event.text.as_deref().is_some_and(|t| !t.is_empty());
            events.push(event);
            if streaming && cancelled_at.is_none() {
                cancelled_at = Some(Instant::now());
                cancel.cancel();
            }
        }
        (events, cancelled_at)
    };
    let ((result, ended_at), (events, cancelled_at)) = tokio::join!(turn, controller);
    let cancelled_at = cancelled_at.unwrap_or_else(|| {
        panic!("no message chunk before the turn ended: {result:?} {events:#?}")
    });
    (result, events, ended_at - cancelled_at)
}

fn is_zed_0_23(agent: &AgentProcess) -> bool {
    agent
        .initialize_response()
        .agent_info
        .as_ref()
        .is_some_and(|i| {
            i.name == "@zed-industries/claude-agent-acp" && i.version.starts_with("0.23.")
        })
}

#[tokio::test]
async fn cancelling_a_hanging_turn_returns_cancelled() {
    let lab = ClaudeLab::new().await;
    lab.fake.push(Reply::Hang);
    lab.fake.push(Reply::text("Back again."));
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = new_session(&agent).await;

    let (result, events, latency) =
        prompt_cancelled_mid_stream(&agent, &session, "think forever").await;
    eprintln!("cancel → stop reason: {latency:?}");
    assert_eq!(result.unwrap(), "cancelled", "{events:#?}");
    assert_eq!(texts(&events, "message").concat(), "Working on it");
    assert_eq!(lab.fake.hangs().started, 1);
    // The agent aborts the HTTP request.
    lab.fake.wait_hangs(WAIT, |h| h.disconnected == 1).await;

    let (result, events) = prompt(&agent, &session, "are you there?").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    if is_zed_0_23(&agent) {
        // claude-agent-acp 0.23.x answers a cancelled prompt before Claude
        // Code's `idle` state for that turn arrives. The next prompt ends on
        // that stale `idle` at once: no output, zero usage...
        assert!(texts(&events, "message").is_empty(), "{events:#?}");
        assert_eq!(of_kind(&events, "turn_usage")[0].data["totalTokens"], 0);
        // ...while Claude answers it in the background; the answer is held
        // back and streamed into the prompt after it.
        lab.fake
            .wait_for(WAIT, "the follow-up model request", |r| {
                r.iter().filter(|r| r.kind == RequestKind::Model).count() == 2
            })
            .await;
        let (result, events) = prompt(&agent, &session, "hello?").await;
        assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
        let text = texts(&events, "message").concat();
        assert!(text.starts_with("Back again."), "{events:#?}");
    } else {
        assert_eq!(texts(&events, "message").concat(), "Back again.");
    }
    let requests = model_requests(&lab);
    let follow_up = requests[1].messages_json();
    assert!(
        follow_up.contains("[Request interrupted by user]"),
        "{follow_up}"
    );
    assert!(follow_up.contains("are you there?"), "{follow_up}");
    shutdown(agent).await;
    lab.assert_no_outbound();
}

#[tokio::test]
async fn after_a_cancel_a_new_process_with_session_load_is_in_sync() {
    let lab = ClaudeLab::new().await;
    lab.fake.push(Reply::Hang);
    lab.fake.push(Reply::text("Fresh answer."));
    let first = lab.spawn(PermissionPolicy::Allow).await;
    let session = new_session(&first).await;
    let (result, events, _) = prompt_cancelled_mid_stream(&first, &session, "think forever").await;
    assert_eq!(result.unwrap(), "cancelled", "{events:#?}");
    lab.fake.wait_hangs(WAIT, |h| h.disconnected == 1).await;
    shutdown(first).await;

    let second = lab.spawn(PermissionPolicy::Allow).await;
    second
        .load_session(&session)
        .await
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", second.stderr_tail()));
    asking(&second, &session).await;
    let (result, events) = prompt(&second, &session, "are you there?").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert_eq!(texts(&events, "message").concat(), "Fresh answer.");
    let requests = model_requests(&lab);
    assert_eq!(requests.len(), 2, "{:#?}", lab.fake.summary());
    let resumed = requests[1].messages_json();
    // Whether the "[Request interrupted by user]" marker made it into the
    // transcript before the first process was stopped varies; later agents
    // may instead repair the dangling turn ("Continue from where you left
    // off." plus a synthetic "No response requested.").
    assert!(resumed.contains("think forever"), "{resumed}");
    assert!(resumed.contains("are you there?"), "{resumed}");
    shutdown(second).await;
    lab.assert_no_outbound();
}

#[tokio::test]
async fn usage_update_that_breaks_the_schema_still_reaches_the_client() {
    // Without `cache_*_input_tokens` in the API usage, claude-agent-acp
    // 0.23.x computes NaN and sends `usage_update` with `"used": null`,
    // which the ACP schema (`used: u64`) rejects.
    let lab = ClaudeLab::new().await;
    lab.fake.set_minimal_usage(true);
    lab.fake.push(Reply::text("Short answer."));
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = new_session(&agent).await;
    let (result, events) = prompt(&agent, &session, "hi").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert_eq!(texts(&events, "message").concat(), "Short answer.");
    let usage = of_kind(&events, "usage");
    if is_zed_0_23(&agent) {
        assert_eq!(usage.len(), 1, "{events:#?}");
        assert!(usage[0].data["used"].is_null(), "{:?}", usage[0]);
        assert_eq!(usage[0].data["size"], 200000);
        assert!(usage[0].data["parseError"].is_string(), "{:?}", usage[0]);
        assert_eq!(agent.unparsed_updates(), 1);
    } else {
        // Later agents count missing cache fields as zero.
        assert!(!usage.is_empty(), "{events:#?}");
        assert!(usage.iter().all(|u| u.data["used"].is_u64()), "{usage:#?}");
        assert_eq!(agent.unparsed_updates(), 0);
    }
    shutdown(agent).await;
}

#[tokio::test]
async fn session_load_in_a_new_process_resumes_the_conversation() {
    let lab = ClaudeLab::new().await;
    lab.fake.push(Reply::text("Noted: the word is PINEAPPLE."));
    let first = lab.spawn(PermissionPolicy::Allow).await;
    assert!(first.supports_load_session());
    let session = new_session(&first).await;
    let (result, _) = prompt(&first, &session, "remember the word PINEAPPLE").await;
    assert_eq!(result.unwrap(), "end_turn");
    let first_pid = first.pid();
    shutdown(first).await;

    // The transcript lives under $HOME/.claude/projects/<cwd, dashed>/.
    let transcript = std::fs::read_dir(lab.home().join(".claude/projects"))
        .unwrap()
        .flatten()
        .map(|d| d.path().join(format!("{session}.jsonl")))
        .find(|p| p.exists());
    assert!(transcript.is_some(), "no transcript for {session}");

    lab.fake.push(Reply::text("The word was PINEAPPLE."));
    let second = lab.spawn(PermissionPolicy::Allow).await;
    assert_ne!(second.pid(), first_pid);
    let started = Instant::now();
    let replayed = second
        .load_session_counted(&session)
        .await
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", second.stderr_tail()));
    eprintln!(
        "session/load: {:?}, {replayed} updates replayed",
        started.elapsed()
    );
    // The user prompt and the reply come back as history.
    assert!(replayed >= 2, "replayed {replayed}");
    asking(&second, &session).await;

    let (result, events) = prompt(&second, &session, "what was the word?").await;
    assert_eq!(result.unwrap(), "end_turn", "{events:#?}");
    assert_eq!(
        texts(&events, "message").concat(),
        "The word was PINEAPPLE."
    );
    let requests = model_requests(&lab);
    assert_eq!(requests.len(), 2, "{:#?}", lab.fake.summary());
    let resumed = requests[1].messages_json();
    assert!(resumed.contains("remember the word PINEAPPLE"), "{resumed}");
    assert!(
        resumed.contains("Noted: the word is PINEAPPLE."),
        "{resumed}"
    );
    assert!(resumed.contains("what was the word?"), "{resumed}");
    let user_id = requests[1].body["metadata"]["user_id"]
        .as_str()
        .unwrap_or_default();
    assert!(user_id.contains(&session), "metadata.user_id = {user_id}");

    // An unknown session id is an error, not a hang.
    let unknown = "00000000-0000-4000-8000-000000000000";
    match second.load_session(unknown).await {
        Err(AcpError::Rpc { code, message, .. }) => {
            eprintln!("session/load of an unknown id: {code} {message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    shutdown(second).await;
    lab.assert_no_outbound();
}

/// One HTTP/1.1 exchange over a fresh connection (`connection: close`);
/// returns the status code and the raw response text.
async fn raw_http(
    fake: &FakeAnthropic,
    method: &str,
    target: &str,
    body: Option<Value>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\nx-api-key: secret\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        fake.addr(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The JSON body of a non-streaming response.
fn json_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[tokio::test]
async fn fake_api_serves_json_sse_side_requests_and_probes() {
    let fake = FakeAnthropic::start().await;
    fake.set_side_text("A title");
    fake.push(Reply::text("scripted one"));
    fake.push(Reply::tool("Bash", json!({ "command": "ls" })));
    let tools = json!([{ "name": "Bash", "input_schema": { "type": "object" } }]);
    let main = |stream: bool| {
        json!({ "model": "claude-sonnet-4-6", "max_tokens": 32000, "stream": stream,
                "tools": tools, "messages": [{ "role": "user", "content": "hi" }] })
    };

    // A quota-style probe is a side request and leaves the queue alone.
    let quota = json!({ "model": "claude-haiku-4-5", "max_tokens": 1,
                        "messages": [{ "role": "user", "content": "quota" }] });
    let (status, response) = raw_http(&fake, "POST", "/v1/messages", Some(quota)).await;
    assert_eq!(status, 200);
    let message = json_body(&response);
    assert_eq!(message["content"][0]["text"], "A title");
    assert_eq!(fake.pending_replies(), 2);

    // Main requests take the queue in order, as JSON or as SSE.
    let (_, response) = raw_http(&fake, "POST", "/v1/messages?beta=true", Some(main(false))).await;
    let message = json_body(&response);
    assert_eq!(message["content"][0]["text"], "scripted one");
    assert_eq!(message["stop_reason"], "end_turn");
    let (status, response) = raw_http(&fake, "POST", "/v1/messages", Some(main(true))).await;
    assert_eq!(status, 200);
    assert!(response.contains("text/event-stream"), "{response}");
    let order = [
        "event: message_start",
        "event: content_block_start",
        "\"type\":\"tool_use\"",
        "input_json_delta",
        "event: content_block_stop",
        "\"stop_reason\":\"tool_use\"",
        "event: message_stop",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|needle| {
            response
                .find(needle)
                .unwrap_or_else(|| panic!("{needle}: {response}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{response}");
    // Queue empty: the default reply.
    let (_, response) = raw_http(&fake, "POST", "/v1/messages", Some(main(false))).await;
    assert_eq!(json_body(&response)["content"][0]["text"], "ok");

    let (status, response) = raw_http(
        &fake,
        "POST",
        "/v1/messages/count_tokens",
        Some(main(false)),
    )
    .await;
    assert_eq!(status, 200);
    assert!(json_body(&response)["input_tokens"].as_u64().unwrap() > 0);
    let (status, _) = raw_http(&fake, "HEAD", "/", None).await;
    assert_eq!(status, 200);
    let (status, _) = raw_http(&fake, "CONNECT", "example.com:443", None).await;
    assert_eq!(status, 502);

    let kinds: Vec<RequestKind> = fake.requests().iter().map(|r| r.kind).collect();
    use RequestKind::*;
    assert_eq!(
        kinds,
        [Side, Model, Model, Model, CountTokens, Other, Proxy]
    );
    let requests = fake.requests();
    assert!(requests
        .iter()
        .all(|r| !r.headers.contains_key("x-api-key")));
    assert_eq!(requests[0].credential_header.as_deref(), Some("x-api-key"));
    assert_eq!(requests[1].query.as_deref(), Some("beta=true"));
    assert_eq!(requests[1].reply, Some(Reply::text("scripted one")));
    assert_eq!(requests[6].path, "example.com:443");
    assert_eq!(fake.hangs(), Default::default());
}
