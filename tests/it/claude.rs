//! gorp with the real Claude Code agent (`claude-agent-acp`, installed by
//! `scripts/setup-claude-agent`) on the fake Anthropic API: jobs in, rows out. A text turn
//! streamed into event rows, a tool call behind a permission request, a cancel, and
//! `session/load` after a gorp restart. Nothing leaves 127.0.0.1.

use std::time::Duration;

use gorp::config::Config;
use gorp::store::{now_ms, JobState};
use serde_json::json;

use crate::acp::{config_in, Gorp};
use crate::support::claude_env::{agent_binary, claude_env, seed_plugin_blocklist};
use crate::support::eventually;
use crate::support::fake_anthropic::{FakeAnthropic, Reply, RequestKind};

const WAIT: Duration = Duration::from_secs(60);

/// A config that runs Claude Code against `fake`, with its home under `dir`.
fn claude_config(dir: &std::path::Path, fake: &FakeAnthropic) -> Config {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let home = home.canonicalize().unwrap();
    seed_plugin_blocklist(&home);
    config_in(dir, |c| {
        c.acp.agent_binary = agent_binary().display().to_string();
        c.acp.agent_args = Vec::new();
        c.acp.env = claude_env(&fake.base_url(), &home).into_iter().collect();
        c.acp.initialize_timeout_secs = 60;
        c.acp.session_timeout_secs = 60;
        c.acp.prompt_timeout_secs = 120;
    })
}

async fn start(fake: &FakeAnthropic) -> Gorp {
    let dir = tempfile::tempdir().unwrap();
    let config = claude_config(dir.path(), fake);
    Gorp::start_on(dir, config, "gorp-claude").await
}

fn assert_no_outbound(fake: &FakeAnthropic) {
    let outbound = fake.requests_of(RequestKind::Proxy);
    assert!(
        outbound.is_empty(),
        "outbound traffic: {:?}",
        outbound.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}

/// Message texts of a job, in order, without the empty chunk Claude opens each block with.
async fn messages(g: &Gorp, id: &str) -> Vec<String> {
    g.store
        .job_events_list(id, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "message")
        .filter_map(|e| e.text)
        .filter(|t| !t.is_empty())
        .collect()
}

#[tokio::test]
async fn claude_text_turn_streams_into_event_rows() {
    let fake = FakeAnthropic::start().await;
    let text = "Hello from the fake model. This answer arrives in several chunks.";
    fake.push(Reply::text(text));
    fake.push(Reply::text("Second answer."));
    let g = start(&fake).await;
    let ch = g.channel("claude", |_| {}).await;

    let (job, out) = g.run(ch, "say hello").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(out, text);
    let chunks = messages(&g, &job.id).await;
    assert!(chunks.len() > 1, "streamed in chunks: {chunks:?}");
    assert_eq!(chunks.concat(), text);
    assert_eq!(g.history_session(&job.id).await.as_deref(), Some("cold"));

    let (second, out) = g.run(ch, "again").await;
    assert_eq!(out, "Second answer.");
    assert_eq!(g.history_session(&second.id).await.as_deref(), Some("warm"));
    let model = fake.requests_of(RequestKind::Model);
    assert_eq!(model.len(), 2);
    assert!(
        model[1].messages_json().contains("say hello"),
        "one conversation"
    );
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn claude_tool_calls_ask_permission_and_the_channel_policy_holds() {
    let fake = FakeAnthropic::start().await;
    let g = start(&fake).await;
    let allow = g.channel("allow", |_| {}).await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;

    for (ch, name, kind) in [
        (allow, "allow", "allow_once"),
        (deny, "deny", "reject_once"),
    ] {
        let dir = g.config.channel_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let target = dir.join("hello.txt");
        fake.push(Reply::tool(
            "Write",
            json!({ "file_path": target, "content": "hi from claude\n" }),
        ));
        fake.push(Reply::text("Done."));
        fake.push(Reply::tool(
            "Bash",
            json!({ "command": "touch ran.txt", "description": "Make ran.txt" }),
        ));
        fake.push(Reply::text("Ran."));
        let (job, out) = g.run(ch, "write hello.txt").await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(out, "Done.");
        let (job2, out2) = g.run(ch, "run a command").await;
        assert_eq!(job2.state, JobState::Succeeded, "{:?}", job2.error);
        assert_eq!(out2, "Ran.");
        for (j, title) in [(&job.id, "Write hello.txt"), (&job2.id, "touch ran.txt")] {
            let events = g.store.job_events_list(j, 0, 10_000).await.unwrap();
            let perm: Vec<_> = events.iter().filter(|e| e.kind == "permission").collect();
            assert_eq!(perm.len(), 1, "{name}: gorp decided: {events:#?}");
            let data = perm[0].data.as_ref().unwrap();
            assert_eq!(data["optionKind"], kind, "{name}");
            assert_eq!(data["policy"], name);
            assert_eq!(data["toolCall"]["title"], title);
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            let pos = |k: &str| kinds.iter().position(|x| *x == k).unwrap();
            assert!(pos("tool_call") < pos("permission"), "{kinds:?}");
            let session = g.session_data(j).await;
            assert_eq!(session["mode"], "default", "{name}: {session}");
            assert_eq!(session["policy"], name);
        }
        let first = g.session_data(&job.id).await;
        assert_eq!(
            first["mode_set_with"], "session/set_config_option",
            "{first}"
        );
        assert!(first["modes"].as_array().unwrap().len() > 1, "{first}");
        let allowed = name == "allow";
        assert_eq!(target.exists(), allowed, "{name}: the file was written?");
        assert_eq!(
            dir.join("ran.txt").exists(),
            allowed,
            "{name}: the command ran?"
        );
    }
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn claude_under_ask_waits_for_a_person_and_runs_the_tool_once_allowed() {
    use gorp::service::approvals::{self, Choice};
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};
    let fake = FakeAnthropic::start().await;
    let g = start(&fake).await;
    let ch = g
        .channel("asks", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Ask)
        })
        .await;
    let dir = g.config.channel_dir("asks");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    fake.push(Reply::tool(
        "Bash",
        json!({ "command": "touch asked.txt", "description": "Make asked.txt" }),
    ));
    fake.push(Reply::text("Made it."));
    fake.push(Reply::tool(
        "Bash",
        json!({ "command": "touch refused.txt", "description": "Make refused.txt" }),
    ));
    fake.push(Reply::text("Understood, I did not."));
    for (file, choice, answer, state) in [
        (
            "asked.txt",
            Choice::AllowOnce,
            "Made it.",
            ApprovalState::Allowed,
        ),
        (
            "refused.txt",
            Choice::Deny,
            "Understood, I did not.",
            ApprovalState::Denied,
        ),
    ] {
        let job = g.enqueue(ch, &format!("make {file}")).await;
        let pending = eventually(WAIT, "a pending approval", || async {
            g.store
                .approval_list(&ApprovalFilter {
                    state: Some(ApprovalState::Pending),
                    job_id: Some(job.clone()),
                    limit: 5,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .next()
        })
        .await;
        assert_eq!(pending.kind.as_deref(), Some("execute"));
        assert_eq!(
            pending.title.as_deref(),
            Some(format!("touch {file}").as_str())
        );
        assert_eq!(
            pending.input["rawInput"]["command"],
            format!("touch {file}")
        );
        assert!(!dir.join(file).exists(), "nothing runs before the decision");
        let d = approvals::decide(&g.store, &pending.id, choice, "@alice:x", DecidedVia::Http)
            .await
            .unwrap();
        assert_eq!(d.state, state);
        let done = g.wait_done(&job).await;
        assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
        assert_eq!(g.store.job_output(&job).await.unwrap(), answer);
        assert_eq!(
            dir.join(file).exists(),
            state == ApprovalState::Allowed,
            "{file}"
        );
    }
    g.stop().await;
    assert_no_outbound(&fake);
}

/// Claude's AskUserQuestion tool, offered because gorp advertises form elicitation: under
/// `ask` its question becomes a question row that a person answers (by the choice's number);
/// the agent hands the answer to the model as the tool's result. Under `allow` nobody is asked
/// and the question is declined, with an `answer` event.
#[tokio::test]
async fn claude_asks_a_question_and_gets_the_answer_a_person_gave() {
    use gorp::service::approvals;
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};
    let fake = FakeAnthropic::start().await;
    let g = start(&fake).await;
    let ask = g
        .channel("asks", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Ask)
        })
        .await;
    let allow = g.channel("allows", |_| {}).await;
    let question = json!({ "questions": [ {
        "question": "Which cache should I use?",
        "header": "Cache",
        "options": [
            { "label": "Redis", "description": "in memory" },
            { "label": "SQLite", "description": "on disk" }
        ],
        "multiSelect": false
    } ] });
    fake.push(Reply::tool("AskUserQuestion", question.clone()));
    fake.push(Reply::text("Going with it."));
    let job = g.enqueue(ask, "pick a cache").await;
    let q = eventually(WAIT, "a pending question", || async {
        g.store
            .approval_list(&ApprovalFilter {
                state: Some(ApprovalState::Pending),
                job_id: Some(job.clone()),
                limit: 5,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(q.request, gorp::store::RequestKind::Question, "{q:?}");
    assert_eq!(q.title.as_deref(), Some("Which cache should I use?"));
    let schema = &q.input["requestedSchema"];
    assert_eq!(
        schema["properties"]["question_0"]["oneOf"][1]["const"],
        "SQLite"
    );
    let a = approvals::answer_typed(&g.store, &q.id, "2", "@alice:x", DecidedVia::Matrix)
        .await
        .unwrap();
    assert_eq!(a.answer, Some(json!({ "question_0": "SQLite" })));
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(g.store.job_output(&job).await.unwrap(), "Going with it.");
    // The model got the person's answer as the tool's result.
    let last = fake.requests_of(RequestKind::Model).pop().unwrap();
    let sent = last.messages_json();
    assert!(
        sent.contains("Which cache should I use?") && sent.contains("SQLite"),
        "{sent}"
    );

    fake.push(Reply::tool("AskUserQuestion", question));
    fake.push(Reply::text("Nobody answered, so I chose."));
    let (job, out) = g.run(allow, "pick a cache").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out, "Nobody answered, so I chose.");
    let events = g.store.job_events_list(&job.id, 0, 10_000).await.unwrap();
    let answer: Vec<_> = events.iter().filter(|e| e.kind == "answer").collect();
    assert_eq!(answer.len(), 1, "{events:#?}");
    let data = answer[0].data.as_ref().unwrap();
    assert_eq!(data["action"], "decline");
    assert_eq!(data["policy"], "allow");
    assert!(!events.iter().any(|e| e.kind == "question"));
    g.stop().await;
    assert_no_outbound(&fake);
}

/// The current Claude agent under the kernel sandbox, with every tool allowed by the channel's
/// policy: its Write and Bash aimed outside the workspace change nothing, its Bash cannot read
/// another channel's workspace, and inside the workspace both work. Each channel's agent has
/// its own HOME (its `~/.claude`) under gorp's agent state.
#[tokio::test]
async fn claude_under_the_sandbox_writes_and_runs_only_inside_its_workspace() {
    let fake = FakeAnthropic::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = claude_config(dir.path(), &fake);
    config
        .acp
        .env
        .retain(|k, _| k != "HOME" && k != "CLAUDE_CONFIG_DIR");
    config.acp.sandbox = Some(gorp::store::SandboxMode::Landlock);
    for name in ["inbox", "other"] {
        let home = config.agent_state_dir(name).join("home");
        std::fs::create_dir_all(&home).unwrap();
        seed_plugin_blocklist(&home);
    }
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let outside = outside.canonicalize().unwrap();
    let g = Gorp::start_on(dir, config, "gorp-claude").await;
    let ch = g.channel("inbox", |_| {}).await;
    g.channel("other", |_| {}).await;
    let other = g.config.channel_dir("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret.txt"), "other's secret").unwrap();
    let ws = g.config.channel_dir("inbox");
    std::fs::create_dir_all(&ws).unwrap();
    let ws = ws.canonicalize().unwrap();

    fake.push(Reply::tool(
        "Write",
        json!({ "file_path": outside.join("hello.txt"), "content": "escaped\n" }),
    ));
    fake.push(Reply::text("Tried to write."));
    fake.push(Reply::tool(
        "Bash",
        json!({
            "command": format!(
                "touch {}/ran.txt; cat {}/secret.txt",
                outside.display(),
                other.display()
            ),
            "description": "Escape"
        }),
    ));
    fake.push(Reply::text("Tried to run."));
    fake.push(Reply::tool(
        "Write",
        json!({ "file_path": ws.join("inside.txt"), "content": "inside\n" }),
    ));
    fake.push(Reply::text("Wrote inside."));
    fake.push(Reply::tool(
        "Bash",
        json!({ "command": "touch made.txt && ls \"$HOME\"", "description": "Make made.txt" }),
    ));
    fake.push(Reply::text("Made it."));
    for (prompt, answer) in [
        ("write outside", "Tried to write."),
        ("run outside", "Tried to run."),
        ("write inside", "Wrote inside."),
        ("run inside", "Made it."),
    ] {
        let (job, out) = g.run(ch, prompt).await;
        assert_eq!(job.state, JobState::Succeeded, "{prompt}: {:?}", job.error);
        assert_eq!(out, answer, "{prompt}");
        if prompt == "run outside" {
            // What the shell said went back to the model as the tool's result.
            let sent = fake
                .requests_of(RequestKind::Model)
                .pop()
                .unwrap()
                .messages_json();
            assert!(!sent.contains("other's secret"), "{sent}");
            assert!(sent.contains("Permission denied"), "{sent}");
        }
    }
    assert!(!outside.join("hello.txt").exists(), "Write outside");
    assert!(!outside.join("ran.txt").exists(), "Bash outside");
    assert_eq!(
        std::fs::read_to_string(ws.join("inside.txt")).unwrap(),
        "inside\n"
    );
    assert!(ws.join("made.txt").exists());
    let home = g.config.agent_state_dir("inbox").join("home");
    assert!(
        home.join(".claude/projects").is_dir(),
        "the agent's sessions are in its own HOME"
    );
    assert!(!g
        .config
        .agent_state_dir("other")
        .join("home/.claude/projects")
        .exists());
    g.stop().await;
    assert_no_outbound(&fake);
}

/// The tokens and cost the Claude agent reports land in each job's row and in the usage
/// report. Its `usage_update` cost is the session's running total, so each turn is charged what
/// the total grew by since the previous turn's report. Claude Code sometimes makes a side
/// request of its own between turns (a title, a summary); that spend shows in the next report
/// and so in the next job, and the jobs always add up to the session's total.
#[tokio::test]
async fn claude_usage_and_cost_land_in_the_job_and_the_usage_report() {
    use gorp::store::{UsageBy, UsageFilter};
    let fake = FakeAnthropic::start().await;
    let g = start(&fake).await;
    let ch = g.channel("spend", |_| {}).await;
    let mut costs = Vec::new();
    let mut totals = Vec::new();
    for text in ["First answer.", "Second answer."] {
        fake.push(Reply::text(text));
        let (job, out) = g.run(ch, "say something").await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(out, text);
        let row: (Option<i64>, Option<i64>, Option<f64>) =
            sqlx::query_as("SELECT input_tokens, output_tokens, cost_usd FROM jobs WHERE id = ?1")
                .bind(&job.id)
                .fetch_one(g.store.read_pool())
                .await
                .unwrap();
        assert!(row.0.unwrap_or(0) > 0 && row.1.unwrap_or(0) > 0, "{row:?}");
        let cost = row.2.expect("a cost");
        assert!(cost > 0.0, "{row:?}");
        costs.push(cost);
        // The session's running total as the agent reported it at the end of this turn.
        let total: f64 = sqlx::query_scalar(
            "SELECT json_extract(data, '$.cost.amount') FROM job_events
             WHERE job_id = ?1 AND kind = 'usage' AND json_extract(data, '$.cost.amount') IS NOT NULL
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(&job.id)
        .fetch_one(g.store.read_pool())
        .await
        .unwrap();
        totals.push(total);
    }
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(costs[0], totals[0]), "{costs:?} {totals:?}");
    assert!(
        close(costs[1], totals[1] - totals[0]) && costs[1] < totals[1],
        "the second turn is charged its own part, not the running total: {costs:?} {totals:?}"
    );
    let report = g
        .store
        .usage_report(&UsageFilter {
            since: 0,
            channel: None,
            by: UsageBy::Channel,
        })
        .await
        .unwrap();
    assert_eq!(report[0].key, "spend");
    assert_eq!(report[0].jobs, 2);
    assert!((report[0].cost_usd - costs.iter().sum::<f64>()).abs() < 1e-9);
    g.stop().await;
    assert_no_outbound(&fake);
}

/// With the current agent the prompt after a cancel is answered in turn whether or not the
/// agent is recycled (`recycle_after_cancel`; the old 0.23 agent answered out of turn without
/// it), so gorp keeps the warm agent by default.
#[tokio::test]
async fn claude_cancel_stops_the_turn_and_the_next_job_answers_in_turn() {
    for recycle in [false, true] {
        let fake = FakeAnthropic::start().await;
        fake.push(Reply::Hang);
        let dir = tempfile::tempdir().unwrap();
        let mut config = claude_config(dir.path(), &fake);
        config.acp.recycle_after_cancel = recycle;
        let g = Gorp::start_on(dir, config, "gorp-claude").await;
        let ch = g.channel("claude", |_| {}).await;
        let id = g.enqueue(ch, "think forever").await;
        eventually(WAIT, "the hanging turn to stream", || async {
            (!messages(&g, &id).await.is_empty()).then_some(())
        })
        .await;
        let pid = g.session_data(&id).await["pid"].clone();
        assert_eq!(
            g.store.job_cancel(&id, now_ms()).await.unwrap(),
            gorp::store::CancelOutcome::Requested
        );
        assert!(g.pool.cancel_local(&id));
        let job = g.wait_done(&id).await;
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.stop_reason.as_deref(), Some("cancelled"));
        fake.wait_hangs(WAIT, |h| h.disconnected == 1).await;

        fake.push(Reply::text("Back again."));
        let (next, out) = g.run(ch, "are you there?").await;
        assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
        assert_eq!(out, "Back again.", "recycle_after_cancel = {recycle}");
        let now = g.session_data(&next.id).await["pid"].clone();
        assert_eq!(now == pid, !recycle, "recycled only when configured");
        let model = fake.requests_of(RequestKind::Model);
        let last = model.last().unwrap().messages_json();
        assert!(
            last.contains("think forever") && last.contains("are you there?"),
            "{last}"
        );
        // And the answer after that is in turn too.
        fake.push(Reply::text("Still here."));
        let (_, out) = g.run(ch, "and now?").await;
        assert_eq!(out, "Still here.", "recycle_after_cancel = {recycle}");
        g.stop().await;
        assert_no_outbound(&fake);
    }
}

#[tokio::test]
async fn claude_session_is_loaded_after_a_gorp_restart() {
    let fake = FakeAnthropic::start().await;
    fake.push(Reply::text("The secret word is pelican."));
    let a = start(&fake).await;
    let ch = a.channel("claude", |_| {}).await;
    let (first, out) = a.run(ch, "remember a secret word").await;
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    assert_eq!(out, "The secret word is pelican.");
    let session = a
        .store
        .channel_get("claude")
        .await
        .unwrap()
        .unwrap()
        .acp_session_id
        .unwrap();
    let (dir, config) = a.stop().await;

    // A new gorp on the same database re-warms the channel with session/load.
    let b = Gorp::start_on(dir, config, "gorp-claude-2").await;
    let report = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(report.warming, 1);
    b.warm.settle().await;
    assert!(b.warm.live_pid(ch).is_some(), "re-warmed");
    fake.push(Reply::text("It was pelican."));
    let (second, out) = b.run(ch, "what was the word?").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(out, "It was pelican.");
    assert_eq!(b.history_session(&second.id).await.as_deref(), Some("warm"));
    assert_eq!(
        b.store
            .channel_get("claude")
            .await
            .unwrap()
            .unwrap()
            .acp_session_id
            .as_deref(),
        Some(session.as_str())
    );
    let model = fake.requests_of(RequestKind::Model);
    let resumed = model.last().unwrap().messages_json();
    assert!(
        resumed.contains("remember a secret word") && resumed.contains("pelican"),
        "{resumed}"
    );
    b.stop().await;
    assert_no_outbound(&fake);
}
