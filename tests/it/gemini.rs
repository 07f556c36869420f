//! gorp with the real Gemini CLI in ACP mode (`gemini --acp`, installed by
//! `scripts/setup-gemini-agent`) on the fake Gemini API: a text turn streamed into event rows,
//! tools behind permission requests under `allow`, `deny` and `ask`, a cancel, and
//! `session/load` after a gorp restart. Nothing leaves 127.0.0.1.
//!
//! Unlike Codex, Gemini CLI refuses a tool by telling the model it was cancelled and goes on
//! with the turn: a refused tool's job succeeds with the model's next answer.

use std::time::Duration;

use gorp::config::Config;
use gorp::store::{now_ms, JobState, PermissionPolicy};
use serde_json::json;

use crate::acp::{config_in, Gorp};
use crate::support::eventually;
use crate::support::fake_gemini::{FakeGemini, Reply, RequestKind};
use crate::support::gemini_env::{agent_args, agent_binary, gemini_env, write_settings, MODEL};

const WAIT: Duration = Duration::from_secs(30);

/// A config that runs Gemini CLI against `fake`, with its home under `dir`.
fn gemini_config(dir: &std::path::Path, fake: &FakeGemini) -> Config {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let home = home.canonicalize().unwrap();
    write_settings(&home);
    config_in(dir, |c| {
        c.acp.agent_binary = agent_binary().display().to_string();
        c.acp.agent_args = agent_args();
        c.acp.env = gemini_env(&fake.base_url(), &home).into_iter().collect();
        c.acp.initialize_timeout_secs = 30;
        c.acp.session_timeout_secs = 30;
        c.acp.prompt_timeout_secs = 60;
    })
}

async fn start(fake: &FakeGemini) -> Gorp {
    let dir = tempfile::tempdir().unwrap();
    let config = gemini_config(dir.path(), fake);
    Gorp::start_on(dir, config, "gorp-gemini").await
}

fn assert_no_outbound(fake: &FakeGemini) {
    let outbound: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Proxy || r.kind == RequestKind::Other)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(outbound.is_empty(), "outbound traffic: {outbound:?}");
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
async fn gemini_text_turn_streams_into_event_rows() {
    let fake = FakeGemini::start().await;
    let text = "Hello from the fake model. This answer arrives in several chunks.";
    fake.push(Reply::text(text));
    fake.push(Reply::text("Second answer."));
    let g = start(&fake).await;
    let ch = g.channel("gemini", |_| {}).await;

    let (job, out) = g.run(ch, "say hello").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(out, text);
    let chunks = messages(&g, &job.id).await;
    assert!(chunks.len() > 1, "streamed in chunks: {chunks:?}");
    assert_eq!(chunks.concat(), text);
    assert_eq!(g.history_session(&job.id).await.as_deref(), Some("cold"));
    // The CLI started in `autoEdit`; gorp put the session in `default`.
    let session = g.session_data(&job.id).await;
    assert_eq!(session["mode"], "default", "{session}");
    assert_eq!(session["mode_before"], "autoEdit", "{session}");
    assert_eq!(session["mode_set_with"], "session/set_mode");

    let (second, out) = g.run(ch, "again").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(out, "Second answer.");
    assert_eq!(g.history_session(&second.id).await.as_deref(), Some("warm"));
    let model = fake.requests_of(RequestKind::Model);
    assert_eq!(model.len(), 2, "{:#?}", fake.summary());
    assert_eq!(model[0].model(), Some(MODEL));
    assert!(model[0].keyed, "the API key is sent");
    let contents = model[1].contents_json();
    assert!(
        contents.contains("say hello") && contents.contains("several chunks"),
        "one conversation: {contents}"
    );
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn gemini_tool_calls_ask_permission_and_the_channel_policy_holds() {
    let fake = FakeGemini::start().await;
    let g = start(&fake).await;
    let allow = g.channel("allow", |_| {}).await;
    let deny = g
        .channel("deny", |c| {
            c.permission_policy = Some(PermissionPolicy::Deny)
        })
        .await;

    for (ch, name, kind) in [
        (allow, "allow", "allow_once"),
        (deny, "deny", "reject_once"),
    ] {
        let dir = workspace(&g, name);
        // An existing file: Gemini CLI cannot create a new one through gorp's `fs/` (see
        // docs/agents-tested.md).
        let target = dir.join("hello.txt");
        std::fs::write(&target, "old\n").unwrap();
        fake.push(Reply::call(
            "write_file",
            json!({ "file_path": target, "content": "hi from gemini\n" }),
        ));
        fake.push(Reply::text("Done."));
        fake.push(Reply::call(
            "run_shell_command",
            json!({ "command": "touch ran.txt", "description": "Make ran.txt" }),
        ));
        fake.push(Reply::text("Ran."));
        let (job, out) = g.run(ch, "write hello.txt").await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(out, "Done.");
        let (job2, out2) = g.run(ch, "run a command").await;
        assert_eq!(job2.state, JobState::Succeeded, "{:?}", job2.error);
        assert_eq!(out2, "Ran.");
        for (j, title) in [
            (&job.id, "Writing to hello.txt"),
            (&job2.id, "touch ran.txt"),
        ] {
            let events = g.store.job_events_list(j, 0, 10_000).await.unwrap();
            let perm: Vec<_> = events.iter().filter(|e| e.kind == "permission").collect();
            assert_eq!(perm.len(), 1, "{name}: gorp decided: {events:#?}");
            let data = perm[0].data.as_ref().unwrap();
            assert_eq!(data["optionKind"], kind, "{name}");
            assert_eq!(data["policy"], name);
            assert_eq!(data["toolCall"]["title"], title);
            let session = g.session_data(j).await;
            assert_eq!(session["mode"], "default", "{name}: {session}");
            assert_eq!(session["policy"], name);
        }
        let allowed = name == "allow";
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            if allowed { "hi from gemini\n" } else { "old\n" },
            "{name}: the file was written?"
        );
        assert_eq!(
            dir.join("ran.txt").exists(),
            allowed,
            "{name}: the command ran?"
        );
        if !allowed {
            // The model was told the tool did not run.
            let last = fake.requests_of(RequestKind::Model).pop().unwrap();
            assert!(
                last.contents_json().contains("canceled by the user"),
                "{}",
                last.contents_json()
            );
        }
    }
    g.stop().await;
    assert_no_outbound(&fake);
}

#[tokio::test]
async fn gemini_under_ask_waits_for_a_person_and_runs_the_tool_once_allowed() {
    use gorp::service::approvals::{self, Choice};
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};
    let fake = FakeGemini::start().await;
    let g = start(&fake).await;
    let ch = g
        .channel("asks", |c| {
            c.permission_policy = Some(PermissionPolicy::Ask)
        })
        .await;
    let dir = workspace(&g, "asks");
    for (file, answer) in [("asked.txt", "Made it."), ("refused.txt", "Understood.")] {
        fake.push(Reply::call(
            "run_shell_command",
            json!({ "command": format!("touch {file}"), "description": format!("Make {file}") }),
        ));
        fake.push(Reply::text(answer));
    }
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
            "Understood.",
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

#[tokio::test]
async fn gemini_cancel_stops_the_turn_and_the_next_job_answers_in_turn() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Hang);
    let g = start(&fake).await;
    let ch = g.channel("gemini", |_| {}).await;
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

    fake.push(Reply::text("Back again."));
    let (next, out) = g.run(ch, "are you there?").await;
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert_eq!(out, "Back again.");
    let last = fake
        .requests_of(RequestKind::Model)
        .pop()
        .unwrap()
        .contents_json();
    assert!(last.contains("are you there?"), "{last}");
    fake.push(Reply::text("Still here."));
    let (_, out) = g.run(ch, "and now?").await;
    assert_eq!(out, "Still here.");
    g.stop().await;
    assert_no_outbound(&fake);
}

/// Renames the chat files of `session` under `home` as if it had started in another minute.
///
/// Gemini CLI 0.61.0 names a session's chat file after the minute the process started it
/// (`session-<YYYY-MM-DDTHH-MM>-<first 8 of the id>.jsonl`), and `session/load` starts a new
/// recording under the same id before it reads the old one: loaded in the same minute as it
/// was started, the session's file is overwritten with an empty conversation and the load
/// fails ("No previous sessions found for this project"), so gorp starts a new session. A gorp
/// restart is rarely within a minute of the session's start; this makes the test's one not be.
fn backdate_sessions(home: &std::path::Path, session: &str) {
    let short = &session[..8];
    let mut moved = 0;
    for project in std::fs::read_dir(home.join(".gemini/tmp")).unwrap() {
        let chats = project.unwrap().path().join("chats");
        for file in std::fs::read_dir(&chats).into_iter().flatten() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("session-") && name.ends_with(&format!("-{short}.jsonl")) {
                let old = format!("session-2000-01-01T00-00-{short}.jsonl");
                std::fs::rename(&path, chats.join(old)).unwrap();
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 1, "one chat file for session {session}");
}

#[tokio::test]
async fn gemini_session_is_loaded_after_a_gorp_restart() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::text("The secret word is pelican."));
    let a = start(&fake).await;
    let ch = a.channel("gemini", |_| {}).await;
    let (first, out) = a.run(ch, "remember a secret word").await;
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    assert_eq!(out, "The secret word is pelican.");
    let session = a
        .store
        .channel_get("gemini")
        .await
        .unwrap()
        .unwrap()
        .acp_session_id
        .unwrap();
    let (dir, config) = a.stop().await;
    backdate_sessions(&dir.path().join("home"), &session);

    let b = Gorp::start_on(dir, config, "gorp-gemini-2").await;
    let report = b.warm.run_once(now_ms()).await.unwrap();
    assert_eq!(report.warming, 1);
    b.warm.settle().await;
    assert!(b.warm.live_pid(ch).is_some(), "re-warmed");
    fake.push(Reply::text("It was pelican."));
    let (second, out) = b.run(ch, "what was the word?").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(out, "It was pelican.");
    let data = b.session_data(&second.id).await;
    assert_eq!(data["session_id"], session.as_str(), "{data}");
    assert_eq!(data["resumed"], true, "{data}");
    let resumed = fake
        .requests_of(RequestKind::Model)
        .pop()
        .unwrap()
        .contents_json();
    assert!(
        resumed.contains("remember a secret word") && resumed.contains("pelican"),
        "{resumed}"
    );
    b.stop().await;
    assert_no_outbound(&fake);
}
