//! gorp with the real Claude Code agent (`claude-agent-acp`, installed by
//! `scripts/setup-claude-agent`) on the fake Anthropic API: jobs in, rows out. A text turn
//! streamed into event rows, a tool call behind a permission request, a cancel, and
//! `session/load` after a gorp restart. Nothing leaves 127.0.0.1.

use std::path::PathBuf;
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
async fn claude_tool_call_asks_permission_and_the_channel_policy_decides() {
    let fake = FakeAnthropic::start().await;
    let g = start(&fake).await;
    let allow = g.channel("allow", |_| {}).await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(gorp::store::PermissionPolicy::Deny)
        })
        .await;

    for (ch, name, chosen) in [(allow, "allow", "allow"), (deny, "deny", "reject")] {
        let target: PathBuf = g.config.channel_dir(name).join("hello.txt");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let target = target
            .parent()
            .unwrap()
            .canonicalize()
            .unwrap()
            .join("hello.txt");
        fake.push(Reply::tool(
            "Write",
            json!({ "file_path": target, "content": "hi from claude\n" }),
        ));
        fake.push(Reply::text("Done."));
        let (job, out) = g.run(ch, "write hello.txt").await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(out, "Done.");
        let events = g.store.job_events_list(&job.id, 0, 10_000).await.unwrap();
        let perm = events
            .iter()
            .find(|e| e.kind == "permission")
            .expect("permission event");
        assert_eq!(perm.text.as_deref(), Some(chosen), "{name}");
        assert_eq!(
            perm.data.as_ref().unwrap()["toolCall"]["title"],
            "Write hello.txt"
        );
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let pos = |k: &str| kinds.iter().position(|x| *x == k).unwrap();
        assert!(pos("tool_call") < pos("permission"), "{kinds:?}");
        assert_eq!(
            target.exists(),
            name == "allow",
            "{name}: the policy decides whether the tool ran"
        );
    }
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn claude_cancel_stops_the_turn_and_the_next_job_answers_in_turn() {
    let fake = FakeAnthropic::start().await;
    fake.push(Reply::Hang);
    let g = start(&fake).await;
    let ch = g.channel("claude", |_| {}).await;
    let id = g.enqueue(ch, "think forever").await;
    eventually(WAIT, "the hanging turn to stream", || async {
        (!messages(&g, &id).await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        g.store.job_cancel(&id, now_ms()).await.unwrap(),
        gorp::store::CancelOutcome::Requested
    );
    assert!(g.pool.cancel_local(&id));
    let job = g.wait_done(&id).await;
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.stop_reason.as_deref(), Some("cancelled"));
    fake.wait_hangs(WAIT, |h| h.disconnected == 1).await;

    // The agent is recycled and the session resumed, so the next answer is the right one.
    fake.push(Reply::text("Back again."));
    let (next, out) = g.run(ch, "are you there?").await;
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert_eq!(out, "Back again.");
    let model = fake.requests_of(RequestKind::Model);
    let last = model.last().unwrap().messages_json();
    assert!(
        last.contains("think forever") && last.contains("are you there?"),
        "{last}"
    );
    g.stop().await;
    assert_no_outbound(&fake);
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
