//! gorp with the real Codex agent (`codex-acp`, installed by `scripts/setup-codex-agent`) on
//! the fake OpenAI Responses API: a text turn streamed into event rows, edits and commands
//! behind permission requests under each policy, a cancel, and `session/load` after a gorp
//! restart. Nothing leaves 127.0.0.1.
//!
//! Codex's only way to refuse a tool is to abort the turn ("No, and tell Codex what to do
//! differently"): a refused tool ends the prompt with stop reason `cancelled`, so the job ends
//! `cancelled`, and the model is not asked again in that turn.

use std::time::Duration;

use gorp::config::Config;
use gorp::store::{now_ms, JobState, PermissionPolicy};

use crate::acp::{config_in, Gorp};
use crate::support::codex_env::{agent_binary, codex_env, write_codex_home, MODEL};
use crate::support::eventually;
use crate::support::fake_openai::{FakeOpenAi, Reply, RequestKind, INPUT_TOKENS, OUTPUT_TOKENS};

const WAIT: Duration = Duration::from_secs(30);

/// A config that runs Codex against `fake`, with its home (and `CODEX_HOME`) under `dir`.
fn codex_config(dir: &std::path::Path, fake: &FakeOpenAi) -> Config {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let home = home.canonicalize().unwrap();
    write_codex_home(&home, &fake.api_url());
    config_in(dir, |c| {
        c.acp.agent_binary = agent_binary().display().to_string();
        c.acp.agent_args = Vec::new();
        c.acp.env = codex_env(&fake.base_url(), &home).into_iter().collect();
        c.acp.initialize_timeout_secs = 30;
        c.acp.session_timeout_secs = 30;
        c.acp.prompt_timeout_secs = 60;
    })
}

async fn start(fake: &FakeOpenAi) -> Gorp {
    let dir = tempfile::tempdir().unwrap();
    let config = codex_config(dir.path(), fake);
    Gorp::start_on(dir, config, "gorp-codex").await
}

fn assert_no_outbound(fake: &FakeOpenAi) {
    let outbound: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.kind != RequestKind::Model)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        outbound.is_empty(),
        "requests other than the model's: {outbound:?}"
    );
}

/// Message texts of a job, in order, without empty chunks.
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

/// The workspace directory of channel `name`, created and canonical.
fn workspace(g: &Gorp, name: &str) -> std::path::PathBuf {
    let dir = g.config.channel_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

#[tokio::test]
async fn codex_text_turn_streams_into_event_rows() {
    let fake = FakeOpenAi::start().await;
    let text = "Hello from the fake model. This answer arrives in several chunks.";
    fake.push(Reply::text(text));
    fake.push(Reply::text("Second answer."));
    let g = start(&fake).await;
    let ch = g.channel("codex", |_| {}).await;

    let (job, out) = g.run(ch, "say hello").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(out, text);
    let chunks = messages(&g, &job.id).await;
    assert!(chunks.len() > 1, "streamed in chunks: {chunks:?}");
    assert_eq!(chunks.concat(), text);
    assert_eq!(g.history_session(&job.id).await.as_deref(), Some("cold"));
    // Codex started in its own `auto` preset; gorp put the session in `read-only`.
    let session = g.session_data(&job.id).await;
    assert_eq!(session["mode"], "read-only", "{session}");
    assert_eq!(session["mode_before"], "auto", "{session}");
    assert_eq!(session["mode_set_with"], "session/set_config_option");

    let (second, out) = g.run(ch, "again").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(out, "Second answer.");
    assert_eq!(g.history_session(&second.id).await.as_deref(), Some("warm"));
    let model = fake.requests_of(RequestKind::Model);
    assert_eq!(model.len(), 2, "{:#?}", fake.summary());
    assert_eq!(model[0].model(), Some(MODEL));
    assert!(model[0].authorized, "the provider's API key is sent");
    let input = model[1].input_json();
    assert!(
        input.contains("say hello") && input.contains("several chunks"),
        "one conversation: {input}"
    );
    // Codex reports the context it uses (`usage_update`: the turn's total tokens of the
    // context window), no cost and no per-turn tokens.
    let usage: Vec<_> = g
        .store
        .job_events_list(&job.id, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "usage")
        .filter_map(|e| e.data)
        .collect();
    assert!(!usage.is_empty(), "a usage event");
    assert_eq!(usage[0]["used"], INPUT_TOKENS + OUTPUT_TOKENS, "{usage:?}");
    assert!(usage.iter().all(|u| u.get("cost").is_none()), "{usage:?}");
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn codex_tool_calls_ask_permission_and_the_channel_policy_holds() {
    let fake = FakeOpenAi::start().await;
    let g = start(&fake).await;
    let allow = g.channel("allow", |_| {}).await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(PermissionPolicy::Deny)
        })
        .await;

    for (ch, name) in [(allow, "allow"), (deny, "deny")] {
        let dir = workspace(&g, name);
        let allowed = name == "allow";
        fake.push(Reply::add_file("hello.txt", "hi from codex"));
        if allowed {
            fake.push(Reply::text("Wrote."));
        }
        fake.push(Reply::escalated_exec("touch ran.txt", "Make ran.txt?"));
        if allowed {
            fake.push(Reply::text("Ran."));
        }
        let before = fake.requests_of(RequestKind::Model).len();
        let (job, out) = g.run(ch, "write hello.txt").await;
        let (job2, out2) = g.run(ch, "run a command").await;
        if allowed {
            assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
            assert_eq!(out, "Wrote.");
            assert_eq!(job2.state, JobState::Succeeded, "{:?}", job2.error);
            assert_eq!(out2, "Ran.");
        } else {
            // Codex aborts the turn when its tool is refused.
            for j in [&job, &job2] {
                assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
                assert_eq!(j.stop_reason.as_deref(), Some("cancelled"));
            }
            assert_eq!(
                fake.requests_of(RequestKind::Model).len() - before,
                2,
                "the model is not asked again after a refusal"
            );
        }
        let edit = format!("Edit {}", dir.join("hello.txt").display());
        for (j, title, kind) in [
            (&job.id, edit.as_str(), "edit"),
            (&job2.id, "touch ran.txt", "execute"),
        ] {
            let events = g.store.job_events_list(j, 0, 10_000).await.unwrap();
            let perm: Vec<_> = events.iter().filter(|e| e.kind == "permission").collect();
            assert_eq!(perm.len(), 1, "{name}: gorp decided: {events:#?}");
            let data = perm[0].data.as_ref().unwrap();
            let option = if allowed { "allow_once" } else { "reject_once" };
            assert_eq!(data["optionKind"], option, "{name}");
            assert_eq!(data["policy"], name);
            assert_eq!(data["toolCall"]["title"], title);
            assert_eq!(data["toolCall"]["kind"], kind);
            let session = g.session_data(j).await;
            assert_eq!(session["mode"], "read-only", "{name}: {session}");
            assert_eq!(session["policy"], name);
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("hello.txt")).ok(),
            allowed.then(|| "hi from codex\n".to_string()),
            "{name}: the file was written?"
        );
        assert_eq!(
            dir.join("ran.txt").exists(),
            allowed,
            "{name}: the command ran?"
        );
    }
    // After two refusals the denied channel's next job is answered in turn.
    fake.push(Reply::text("Still here."));
    let (next, out) = g.run(deny, "are you there?").await;
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert_eq!(out, "Still here.");
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn codex_under_ask_waits_for_a_person_and_runs_the_tool_once_allowed() {
    use gorp::service::approvals::{self, Choice};
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};
    let fake = FakeOpenAi::start().await;
    let g = start(&fake).await;
    let ch = g
        .channel("asks", |c| {
            c.permission_policy = Some(PermissionPolicy::Ask)
        })
        .await;
    let dir = workspace(&g, "asks");
    fake.push(Reply::escalated_exec("touch asked.txt", "Make asked.txt?"));
    fake.push(Reply::text("Made it."));
    fake.push(Reply::escalated_exec(
        "touch refused.txt",
        "Make refused.txt?",
    ));
    for (file, choice, state) in [
        ("asked.txt", Choice::AllowOnce, ApprovalState::Allowed),
        ("refused.txt", Choice::Deny, ApprovalState::Denied),
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
        let command = format!("touch {file}");
        assert_eq!(pending.title.as_deref(), Some(command.as_str()));
        assert_eq!(
            pending.input["rawInput"]["reason"],
            format!("Make {file}?"),
            "{:#}",
            pending.input
        );
        assert!(!dir.join(file).exists(), "nothing runs before the decision");
        let d = approvals::decide(&g.store, &pending.id, choice, "@alice:x", DecidedVia::Http)
            .await
            .unwrap();
        assert_eq!(d.state, state);
        let done = g.wait_done(&job).await;
        let allowed = state == ApprovalState::Allowed;
        if allowed {
            assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
            assert_eq!(g.store.job_output(&job).await.unwrap(), "Made it.");
        } else {
            assert_eq!(done.state, JobState::Cancelled, "{:?}", done.error);
        }
        assert_eq!(dir.join(file).exists(), allowed, "{file}");
    }
    g.stop().await;
    assert_no_outbound(&fake);
}

/// As with Claude, the prompt after a cancel is answered in turn whether or not the agent is
/// recycled (`recycle_after_cancel`).
#[tokio::test]
async fn codex_cancel_stops_the_turn_and_the_next_job_answers_in_turn() {
    for recycle in [false, true] {
        let fake = FakeOpenAi::start().await;
        fake.push(Reply::Hang);
        let dir = tempfile::tempdir().unwrap();
        let mut config = codex_config(dir.path(), &fake);
        config.acp.recycle_after_cancel = recycle;
        let g = Gorp::start_on(dir, config, "gorp-codex").await;
        let ch = g.channel("codex", |_| {}).await;
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
        let last = model.last().unwrap().input_json();
        assert!(
            last.contains("think forever") && last.contains("are you there?"),
            "{last}"
        );
        fake.push(Reply::text("Still here."));
        let (_, out) = g.run(ch, "and now?").await;
        assert_eq!(out, "Still here.", "recycle_after_cancel = {recycle}");
        g.stop().await;
        assert_no_outbound(&fake);
    }
}

/// codex-acp advertises `loadSession` (and `session/resume`); gorp re-warms the channel after a
/// restart with `session/load` and the conversation goes on.
#[tokio::test]
async fn codex_session_is_loaded_after_a_gorp_restart() {
    let fake = FakeOpenAi::start().await;
    fake.push(Reply::text("The secret word is pelican."));
    let a = start(&fake).await;
    let ch = a.channel("codex", |_| {}).await;
    let (first, out) = a.run(ch, "remember a secret word").await;
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    assert_eq!(out, "The secret word is pelican.");
    let session = a
        .store
        .channel_get("codex")
        .await
        .unwrap()
        .unwrap()
        .acp_session_id
        .unwrap();
    let first_pid = a.session_data(&first.id).await["pid"].clone();
    let (dir, config) = a.stop().await;

    let b = Gorp::start_on(dir, config, "gorp-codex-2").await;
    let report = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(report.warming, 1);
    b.warm.settle().await;
    assert!(b.warm.live_pid(ch).is_some(), "re-warmed");
    fake.push(Reply::text("It was pelican."));
    let (second, out) = b.run(ch, "what was the word?").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(out, "It was pelican.");
    assert_eq!(b.history_session(&second.id).await.as_deref(), Some("warm"));
    let data = b.session_data(&second.id).await;
    assert_ne!(data["pid"], first_pid, "a new agent process");
    assert_eq!(data["resumed"], true, "{data}");
    assert_eq!(data["session_id"], session.as_str());
    assert_eq!(data["mode"], "read-only", "{data}");
    let model = fake.requests_of(RequestKind::Model);
    let resumed = model.last().unwrap().input_json();
    assert!(
        resumed.contains("remember a secret word") && resumed.contains("pelican"),
        "{resumed}"
    );
    b.stop().await;
    assert_no_outbound(&fake);
}
