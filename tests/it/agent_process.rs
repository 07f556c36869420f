//! The ACP client against real processes: `AgentProcess` driving real `gorp-script-agent`
//! processes (and a few non-agents) over stdio.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gorp::acp::client::{
    AcpError, AgentEvent, AgentProcess, AgentSpec, PermissionPolicy, Timeouts, EVENT_QUEUE,
};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_gorp-script-agent");

fn timeouts() -> Timeouts {
    Timeouts {
        initialize: Duration::from_secs(10),
        new_session: Duration::from_secs(10),
        load_session: Duration::from_secs(10),
        prompt: Duration::from_secs(20),
        stall: None,
    }
}

/// A scratch area: `state/` for the agent's sessions, `work/` as cwd and
/// fs root, and `outside/` next to it.
struct Lab {
    dir: TempDir,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["state", "work", "outside"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub).canonicalize().unwrap()
    }

    fn spec(&self, extra: &[&str]) -> AgentSpec {
        let mut args = vec![
            "--state-dir".to_string(),
            self.path("state").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        AgentSpec {
            binary: AGENT.to_string(),
            args,
            cwd: self.path("work"),
            env: Vec::new(),
            sandbox: gorp::sandbox::Spec::none(),
        }
    }

    async fn spawn(&self, policy: PermissionPolicy) -> AgentProcess {
        AgentProcess::spawn(&self.spec(&[]), timeouts(), policy, self.path("work"))
            .await
            .expect("script agent starts")
    }
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

fn texts(events: &[AgentEvent], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.text.clone().unwrap_or_default())
        .collect()
}

fn message(events: &[AgentEvent]) -> String {
    texts(events, "message").concat()
}

#[tokio::test]
async fn reply_in_n_chunks_arrives_as_n_message_events_in_order() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    assert!(agent.supports_load_session());
    let session = agent.new_session().await.unwrap();

    let text = "the quick brown fox jumps over the lazy dog";
    let (result, events) = prompt(
        &agent,
        &session,
        &format!("@chunks 5\n@delay-ms 5\n@reply {text}"),
    )
    .await;
    assert_eq!(result.unwrap(), "end_turn");
    let chunks = texts(&events, "message");
    assert_eq!(chunks.len(), 5, "{events:?}");
    assert_eq!(chunks.concat(), text);
    assert!(chunks.iter().all(|c| !c.is_empty()));

    // No directives: echo.
    let (result, events) = prompt(&agent, &session, "hello there").await;
    assert_eq!(result.unwrap(), "end_turn");
    assert_eq!(message(&events), "echo: hello there");
    agent.shutdown().await;
}

#[tokio::test]
async fn two_prompts_on_one_process_share_the_pid() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();
    let (r1, e1) = prompt(&agent, &session, "@pid").await;
    let (r2, e2) = prompt(&agent, &session, "@pid").await;
    r1.unwrap();
    r2.unwrap();
    assert_eq!(message(&e1), agent.pid().to_string());
    assert_eq!(message(&e1), message(&e2));
    agent.shutdown().await;
}

#[tokio::test]
async fn session_load_in_a_new_process_continues_the_conversation() {
    let lab = Lab::new();
    let first = lab.spawn(PermissionPolicy::Allow).await;
    let session = first.new_session().await.unwrap();
    for text in ["@reply one", "@thought hmm\n@reply two"] {
        let (r, _) = prompt(&first, &session, text).await;
        r.unwrap();
    }
    let first_pid = first.pid();
    first.shutdown().await;

    let second = lab.spawn(PermissionPolicy::Allow).await;
    assert_ne!(second.pid(), first_pid);
    // Replay: 2 user chunks + "one" + "hmm" + "two"; none of it is job output.
    let replayed = second.load_session_counted(&session).await.unwrap();
    assert_eq!(replayed, 5);
    let (r, events) = prompt(&second, &session, "@history").await;
    r.unwrap();
    assert_eq!(message(&events), "3");
    assert!(texts(&events, "user_message").is_empty());

    // Loading an unknown session is an agent error, not a hang.
    match second.load_session("gsa-nope").await {
        Err(AcpError::Rpc { code, .. }) => assert_eq!(code, -32002),
        other => panic!("unexpected {other:?}"),
    }
    second.shutdown().await;
}

#[tokio::test]
async fn permission_decisions_follow_the_policy() {
    for (policy, option, kind) in [
        (PermissionPolicy::Allow, "allow", "allow_once"),
        (PermissionPolicy::Deny, "reject", "reject_once"),
    ] {
        let lab = Lab::new();
        let agent = lab.spawn(policy).await;
        let session = agent.new_session().await.unwrap();
        let (r, events) = prompt(&agent, &session, "@permission deploy to prod").await;
        assert_eq!(r.unwrap(), "end_turn");
        let decisions: Vec<&AgentEvent> =
            events.iter().filter(|e| e.kind == "permission").collect();
        assert_eq!(decisions.len(), 1, "{events:?}");
        let d = decisions[0];
        assert_eq!(d.text.as_deref(), Some(option));
        assert_eq!(d.data["optionKind"], kind);
        assert_eq!(d.data["options"].as_array().unwrap().len(), 3);
        assert_eq!(d.data["toolCall"]["title"], "deploy to prod");
        // The agent reports what it was told, after the decision event.
        assert_eq!(message(&events), format!("permission: {option}"));
        let pos = |k: &str| events.iter().position(|e| e.kind == k).unwrap();
        assert!(pos("permission") < pos("message"));
        agent.shutdown().await;
    }
}

#[tokio::test]
async fn fs_requests_are_confined_to_the_root() {
    let lab = Lab::new();
    std::fs::write(lab.path("outside").join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(lab.path("outside"), lab.path("work").join("link")).unwrap();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();

    // Allowed: write then read inside the root (relative paths).
    let (r, events) = prompt(
        &agent,
        &session,
        "@write notes/a.txt hello\\nworld\n@read notes/a.txt",
    )
    .await;
    r.unwrap();
    assert_eq!(
        std::fs::read_to_string(lab.path("work").join("notes/a.txt")).unwrap(),
        "hello\nworld"
    );
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.kind.as_str())
        .filter(|k| k.starts_with("fs_"))
        .collect();
    assert_eq!(kinds, ["fs_write", "fs_read"]);
    assert_eq!(
        texts(&events, "message"),
        ["write ok: notes/a.txt", "read ok: hello\nworld"]
    );

    // Refused: `..`, a symlink escape, an absolute path outside.
    let outside = lab.path("outside").join("secret.txt");
    for path in [
        "../outside/secret.txt".to_string(),
        "link/secret.txt".to_string(),
        outside.display().to_string(),
    ] {
        let (r, events) = prompt(&agent, &session, &format!("@read {path}")).await;
        r.unwrap();
        let denied: Vec<&AgentEvent> = events.iter().filter(|e| e.kind == "fs_denied").collect();
        assert_eq!(denied.len(), 1, "{path}: {events:?}");
        assert_eq!(denied[0].data["op"], "read");
        assert_eq!(denied[0].data["path"], path.as_str());
        let reply = message(&events);
        assert!(reply.starts_with("read error: access denied"), "{reply}");
        assert!(!reply.contains("top secret"));
    }

    // Writes through the symlink are refused too and leave nothing behind.
    let (r, events) = prompt(&agent, &session, "@write link/planted.txt x").await;
    r.unwrap();
    assert_eq!(texts(&events, "fs_denied").len(), 1);
    assert!(!lab.path("outside").join("planted.txt").exists());

    // A missing file inside the root is an error, not a denial.
    let (r, events) = prompt(&agent, &session, "@read missing.txt").await;
    r.unwrap();
    assert_eq!(texts(&events, "fs_error").len(), 1);
    assert!(message(&events).starts_with("read error:"));
    agent.shutdown().await;
}

#[tokio::test]
async fn session_updates_map_to_events() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();
    let (r, events) = prompt(
        &agent,
        &session,
        "@thought thinking\n@tool-call grep\n@plan read | edit\n@mode code\n@commands build test\n@usage in=10 out=20 cost=0.01\n@reply done",
    )
    .await;
    assert_eq!(r.unwrap(), "end_turn");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.kind.as_str())
        .filter(|k| *k != "stderr")
        .collect();
    assert_eq!(
        kinds,
        [
            "thought",
            "tool_call",
            "tool_call_update",
            "plan",
            "mode",
            "commands",
            "usage",
            "message",
            "turn_usage"
        ]
    );
    let get = |k: &str| events.iter().find(|e| e.kind == k).unwrap();
    assert_eq!(get("thought").text.as_deref(), Some("thinking"));
    let call = get("tool_call");
    assert_eq!(call.text.as_deref(), Some("grep"));
    assert_eq!(call.data["status"], "in_progress");
    assert_eq!(call.data["kind"], "other");
    let update = get("tool_call_update");
    assert_eq!(update.data["id"], call.data["id"]);
    assert_eq!(update.data["status"], "completed");
    assert_eq!(get("plan").text.as_deref(), Some("read\nedit"));
    assert_eq!(get("mode").text.as_deref(), Some("code"));
    assert_eq!(get("commands").text.as_deref(), Some("build test"));
    let usage = &get("usage").data;
    assert_eq!(usage["used"], 30);
    assert_eq!(usage["cost"]["amount"], 0.01);
    assert_eq!(usage["cost"]["currency"], "USD");
    assert_eq!(usage["_meta"]["inputTokens"], 10);
    let turn = &get("turn_usage").data;
    assert_eq!(turn["inputTokens"], 10);
    assert_eq!(turn["outputTokens"], 20);
    agent.shutdown().await;
}

#[tokio::test]
async fn events_stay_with_their_session() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let a = agent.new_session().await.unwrap();
    let b = agent.new_session().await.unwrap();
    let ((ra, ea), (rb, eb)) = tokio::join!(
        prompt(&agent, &a, "@chunks 3\n@delay-ms 5\n@reply aaaaaa"),
        prompt(&agent, &b, "@chunks 3\n@delay-ms 5\n@reply bbbbbb"),
    );
    ra.unwrap();
    rb.unwrap();
    assert_eq!(message(&ea), "aaaaaa");
    assert_eq!(message(&eb), "bbbbbb");
    agent.shutdown().await;
}

#[tokio::test]
async fn crash_mid_prompt_reports_agent_exited_with_stderr_tail() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();
    let (r, _events) = prompt(
        &agent,
        &session,
        "@stderr about to go down\n@reply partial\n@crash",
    )
    .await;
    match r {
        Err(AcpError::AgentExited {
            status,
            stderr_tail,
        }) => {
            assert_eq!(status, "exit code 3");
            assert!(stderr_tail.contains("about to go down"), "{stderr_tail}");
            assert!(stderr_tail.contains("@crash"), "{stderr_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(agent.has_exited());
    // Later requests fail fast with the same diagnosis.
    assert!(matches!(
        agent.new_session().await,
        Err(AcpError::AgentExited { .. })
    ));
    agent.shutdown().await;
}

#[tokio::test]
async fn cancel_token_sends_session_cancel_and_returns_cancelled() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();
    let (tx, mut rx) = mpsc::channel::<AgentEvent>(EVENT_QUEUE);
    let cancel = CancellationToken::new();
    // Cancel as soon as the agent shows it is inside the turn.
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(e) = rx.recv().await {
                if e.kind == "message" {
                    cancel.cancel();
                }
                seen.push(e);
            }
            seen
        })
    };
    let started = Instant::now();
    let r = agent
        .prompt(&session, "@reply working\n@hang", tx, cancel)
        .await;
    assert_eq!(r.unwrap(), "cancelled");
    assert!(started.elapsed() < Duration::from_secs(5));
    let seen = watcher.await.unwrap();
    assert_eq!(message(&seen), "working");

    // The process is still healthy and the session usable.
    let (r, events) = prompt(&agent, &session, "@reply still here").await;
    r.unwrap();
    assert_eq!(message(&events), "still here");
    agent.shutdown().await;
}

#[tokio::test]
async fn hang_past_the_prompt_timeout_is_a_timeout() {
    let lab = Lab::new();
    let mut t = timeouts();
    t.prompt = Duration::from_millis(300);
    let agent = AgentProcess::spawn(&lab.spec(&[]), t, PermissionPolicy::Allow, lab.path("work"))
        .await
        .unwrap();
    let session = agent.new_session().await.unwrap();
    let started = Instant::now();
    let (r, _) = prompt(&agent, &session, "@hang").await;
    match r {
        Err(AcpError::Timeout { op, after }) => {
            assert_eq!(op, "session/prompt");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    // session/cancel reached the agent: the next turn runs normally.
    let (r, events) = prompt(&agent, &session, "@pid").await;
    r.unwrap();
    assert_eq!(message(&events), agent.pid().to_string());
    agent.shutdown().await;
}

#[tokio::test]
async fn fail_directive_is_an_rpc_error() {
    let lab = Lab::new();
    let agent = lab.spawn(PermissionPolicy::Allow).await;
    let session = agent.new_session().await.unwrap();
    let (r, _) = prompt(&agent, &session, "@fail the model is on fire").await;
    match r {
        Err(AcpError::Rpc { op, message, .. }) => {
            assert_eq!(op, "session/prompt");
            assert_eq!(message, "the model is on fire");
        }
        other => panic!("unexpected {other:?}"),
    }
    let (r, _) = prompt(&agent, &session, "@stop max_tokens").await;
    assert_eq!(r.unwrap(), "max_tokens");
    agent.shutdown().await;
}

fn non_agent(lab: &Lab, binary: &str, args: &[&str]) -> AgentSpec {
    AgentSpec {
        binary: binary.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        cwd: lab.path("work"),
        env: Vec::new(),
        sandbox: gorp::sandbox::Spec::none(),
    }
}

fn short_init() -> Timeouts {
    Timeouts {
        initialize: Duration::from_millis(1500),
        ..timeouts()
    }
}

#[tokio::test]
async fn cat_is_not_an_acp_agent() {
    let lab = Lab::new();
    let started = Instant::now();
    let r = AgentProcess::spawn(
        &non_agent(&lab, "cat", &[]),
        short_init(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(1500) + Duration::from_secs(2));
    match r {
        Err(AcpError::NotAcp { reason, .. }) => assert!(reason.contains("initialize"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn silent_process_fails_within_the_initialize_timeout() {
    let lab = Lab::new();
    let started = Instant::now();
    let r = AgentProcess::spawn(
        &non_agent(&lab, "sleep", &["100"]),
        short_init(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1500));
    assert!(elapsed < Duration::from_millis(1500) + Duration::from_secs(2));
    match r {
        Err(AcpError::NotAcp { reason, .. }) => assert!(reason.contains("no answer"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn process_exiting_at_startup_reports_status_and_stderr() {
    let lab = Lab::new();
    let r = AgentProcess::spawn(
        &non_agent(&lab, "sh", &["-c", "echo 'no api key' >&2; exit 7"]),
        short_init(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await;
    match r {
        Err(AcpError::ExitedEarly {
            status,
            stderr_tail,
        }) => {
            assert_eq!(status, "exit code 7");
            assert!(stderr_tail.contains("no api key"), "{stderr_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn missing_binary_is_reported() {
    let lab = Lab::new();
    let r = AgentProcess::spawn(
        &non_agent(&lab, "/nonexistent/agent-binary", &[]),
        short_init(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await;
    match r {
        Err(e @ AcpError::BinaryNotFound { .. }) => {
            let text = e.to_string();
            assert!(text.contains("/nonexistent/agent-binary"), "{text}");
            assert!(text.contains("set [acp] agent_binary"), "{text}");
            assert!(text.contains("gorp-script-agent"), "{text}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The agents gorp is tested with come with their install command.
    for (binary, want) in [
        (
            "claude-agent-acp",
            "npm install -g @agentclientprotocol/claude-agent-acp",
        ),
        ("/opt/bin/claude-agent-acp", "Node 22"),
        ("codex-acp", "npm install -g @zed-industries/codex-acp"),
        ("gemini", "@google/gemini-cli"),
    ] {
        let hint = gorp::acp::client::install_hint(binary);
        assert!(hint.contains(want), "{binary}: {hint}");
    }
}

#[tokio::test]
async fn startup_delay_is_observable() {
    let lab = Lab::new();
    let started = Instant::now();
    let agent = AgentProcess::spawn(
        &lab.spec(&["--startup-delay-ms", "600"]),
        timeouts(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(600));
    // Once warm, a session and a prompt do not pay the delay again.
    let warm = Instant::now();
    let session = agent.new_session().await.unwrap();
    let (r, _) = prompt(&agent, &session, "@reply hi").await;
    r.unwrap();
    assert!(warm.elapsed() < Duration::from_millis(600));
    agent.shutdown().await;

    // A delay longer than the initialize timeout is a clean failure.
    let r = AgentProcess::spawn(
        &lab.spec(&["--startup-delay-ms", "5000"]),
        Timeouts {
            initialize: Duration::from_millis(300),
            ..timeouts()
        },
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await;
    assert!(matches!(r, Err(AcpError::NotAcp { .. })), "{r:?}");
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; a zombie is already dead.
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[tokio::test]
async fn shutdown_kills_the_whole_process_group() {
    let lab = Lab::new();
    let pid_file = lab.path("work").join("helper.pid");
    // The agent runs behind a shell that leaves a helper in the group.
    let script = format!(
        "sleep 1000 & echo $! > '{}'; exec '{}' --state-dir '{}'",
        pid_file.display(),
        AGENT,
        lab.path("state").display()
    );
    let agent = AgentProcess::spawn(
        &non_agent(&lab, "sh", &["-c", &script]),
        timeouts(),
        PermissionPolicy::Allow,
        lab.path("work"),
    )
    .await
    .unwrap();
    let helper: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leader = agent.pid();
    assert!(alive(helper));
    agent.shutdown().await;
    assert!(!alive(leader));
    // The helper is killed by the same signal; its reaping by init may lag.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(helper) && Instant::now() < deadline {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(helper), "helper {helper} survived shutdown");
}

#[tokio::test]
async fn agent_process_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AgentProcess>();
    let lab = Lab::new();
    let agent = std::sync::Arc::new(lab.spawn(PermissionPolicy::Allow).await);
    let task = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let session = agent.new_session().await.unwrap();
            let (tx, rx) = mpsc::channel(EVENT_QUEUE);
            let events = tokio::spawn(drain(rx));
            let r = agent
                .prompt(&session, "@reply from a task", tx, CancellationToken::new())
                .await;
            (r.unwrap(), message(&events.await.unwrap()))
        })
    };
    let (reason, text) = task.await.unwrap();
    assert_eq!(reason, "end_turn");
    assert_eq!(text, "from a task");
    std::sync::Arc::try_unwrap(agent).unwrap().shutdown().await;
}
