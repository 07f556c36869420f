//! A session's lifecycle and settings with the real `gorp-script-agent`: resumed with
//! `session/resume` where the agent offers it (else `session/load`, else new), a hanging load
//! bounded, `session/close` on expiry, reset and deletion; config options per channel and per
//! job; MCP servers and additional directories given to every opening.

use std::collections::BTreeMap;

use gorp::config::McpServerSpec;
use gorp::service::channels::{self, Changes};
use gorp::store::{now_ms, JobState, NewJob, Source, StoreError};

use crate::acp::{config_in, Gorp};

/// The script agent with more arguments (its journals stay shared).
fn agent_args(g: &mut gorp::config::Config, extra: &[&str]) {
    g.acp.agent_args.extend(extra.iter().map(|s| s.to_string()));
}

/// The lines of the script agent's turn log with `event` = `what`.
fn logged(path: &std::path::Path, what: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == what)
        .collect()
}

#[tokio::test]
async fn a_restarted_agent_continues_with_session_resume_where_offered_else_load() {
    for (flags, method) in [
        (&["--resume"][..], "session/resume"),
        (&[][..], "session/load"),
    ] {
        let g = Gorp::start(|c| agent_args(c, flags)).await;
        let ch = g.channel("talk", |_| {}).await;
        let (job, out) = g.run(ch, "@history").await;
        assert_eq!((job.state, out.as_str()), (JobState::Succeeded, "1"));
        assert_eq!(g.session_data(&job.id).await["opened_with"], "session/new");
        let (dir, config) = g.stop().await;

        let g = Gorp::start_on(dir, config, "gorp-b").await;
        let (job, out) = g.run(ch, "@history\n@setup").await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert!(out.starts_with('2'), "the conversation went on: {out}");
        assert!(
            out.contains(&format!("\"opened_with\":\"{method}\"")),
            "{out}"
        );
        let data = g.session_data(&job.id).await;
        assert_eq!(data["opened_with"], method);
        assert_eq!(data["resumed"], true);
        let text = g
            .store
            .job_events_list(&job.id, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "session")
            .and_then(|e| e.text)
            .unwrap();
        assert!(text.contains(&format!("resumed with {method}")), "{text}");
        g.stop().await;
    }
}

#[tokio::test]
async fn a_load_that_never_answers_does_not_hold_the_channel() {
    let g = Gorp::start(|c| {
        agent_args(c, &["--load-hang"]);
        c.acp.session_timeout_secs = 1;
    })
    .await;
    let ch = g.channel("stuck", |_| {}).await;
    let (job, _) = g.run(ch, "@history").await;
    assert_eq!(job.state, JobState::Succeeded);
    let (dir, config) = g.stop().await;

    let g = Gorp::start_on(dir, config, "gorp-b").await;
    let (job, out) = g.run(ch, "@history").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out, "1", "a new conversation, after the load timed out");
    let data = g.session_data(&job.id).await;
    assert_eq!(data["opened_with"], "session/new");
    let why = data["open_fallback"].as_str().unwrap();
    assert!(why.contains("session/load") && why.contains("1s"), "{why}");
    // The channel keeps working on the new session.
    let (_, out) = g.run(ch, "@history").await;
    assert_eq!(out, "2");
    g.stop().await;
}

#[tokio::test]
async fn sessions_are_closed_on_expiry_reset_and_channel_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("turns.jsonl");
    let log_arg = log.display().to_string();
    let config = config_in(dir.path(), |c| {
        agent_args(c, &["--close", "--turn-log", &log_arg]);
        c.acp.extra_writable.push(logs.clone());
    });
    let g = Gorp::start_on(dir, config, "gorp-a").await;
    let ch = g.channel("closing", |_| {}).await;

    // Expiry: the keeper closes the session before it stops the agent.
    let (job, _) = g.run(ch, "@history").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let first = g.session_data(&job.id).await["session_id"].clone();
    assert!(logged(&log, "close").is_empty());
    g.warm.run_once(now_ms() + 10 * 3_600_000).await.unwrap();
    let closed = logged(&log, "close");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["session"], first);

    // Reset: the old session is closed, a new one opened in the same agent.
    let (job, _) = g.run(ch, "@history").await;
    let resumed = g.session_data(&job.id).await;
    assert_eq!(resumed["opened_with"], "session/load");
    g.warm.reset(ch).await.unwrap();
    let (job, out) = g.run(ch, "@history").await;
    assert_eq!(out, "1", "a new conversation");
    let after = g.session_data(&job.id).await;
    assert_ne!(after["session_id"], first);
    assert_eq!(after["pid"], resumed["pid"], "the same agent");
    let closed = logged(&log, "close");
    assert_eq!(closed.len(), 2, "{closed:?}");
    assert_eq!(closed[1]["session"], first);

    // Deletion: the keeper closes the deleted channel's session.
    g.store.channel_delete("closing").await.unwrap();
    g.warm.run_once(now_ms()).await.unwrap();
    let closed = logged(&log, "close");
    assert_eq!(closed.len(), 3, "{closed:?}");
    assert_eq!(closed[2]["session"], after["session_id"]);
    g.stop().await;
}

fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn config_options_apply_per_channel_and_per_job_and_bad_ones_write_nothing() {
    let g = Gorp::start(|c| {
        agent_args(
            c,
            &[
                "--option",
                "model=fast,smart",
                "--option",
                "effort=low,high",
            ],
        )
    })
    .await;
    let ch = g.channel("opts", |_| {}).await;
    // Before the agent has run, options are checked as text only.
    channels::update(
        &g.store,
        "opts",
        Changes {
            options: Some(options(&[("model", "smart")])),
            ..Changes::default()
        },
    )
    .await
    .unwrap()
    .unwrap();

    let (job, out) = g.run(ch, "@options").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out, "options: effort=low model=smart");
    let data = g.session_data(&job.id).await;
    assert_eq!(data["options_set"], serde_json::json!({"model": "smart"}));
    assert_eq!(data["options"]["model"], "smart");

    // A job's own option holds for its turn only; the category names an option too.
    let mut own = NewJob::new(ch, Source::Cli, "@options");
    own.agent_options = Some(r#"{"thought_level":"high"}"#.into());
    let id = gorp::service::jobs::enqueue(&g.store, own, std::time::Instant::now())
        .await
        .unwrap()
        .job_id;
    let job = g.wait_done(&id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        g.store.job_output(&id).await.unwrap(),
        "options: effort=high model=smart"
    );
    let (_, out) = g.run(ch, "@options").await;
    assert_eq!(
        out, "options: effort=low model=smart",
        "back after that job"
    );

    // The agent has said what it offers: unknown options and values are refused, nothing written.
    let jobs_before = g.store.job_list(&Default::default()).await.unwrap().len();
    for bad in [r#"{"model":"huge"}"#, r#"{"colour":"red"}"#, r#"["model"]"#] {
        let mut j = NewJob::new(ch, Source::Cli, "@options");
        j.agent_options = Some(bad.into());
        let err = gorp::service::jobs::enqueue(&g.store, j, std::time::Instant::now())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{bad}: {err}");
    }
    assert_eq!(
        g.store.job_list(&Default::default()).await.unwrap().len(),
        jobs_before
    );
    let err = channels::update(
        &g.store,
        "opts",
        Changes {
            options: Some(options(&[("model", "huge")])),
            ..Changes::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("values: fast, smart"), "{err}");
    let view = channels::options_view(
        &g.store,
        &g.store.channel_get("opts").await.unwrap().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(view.set, options(&[("model", "smart")]), "unchanged");
    let offered = view.offered.unwrap();
    assert_eq!(offered.len(), 2);
    assert_eq!(offered[0].values, ["fast", "smart"]);
    assert_eq!(view.agent.unwrap()["agent"]["name"], "gorp-script-agent");
    g.stop().await;
}

#[tokio::test]
async fn a_mode_option_that_would_not_ask_is_refused_under_deny_and_ask() {
    let g = Gorp::start(|c| {
        agent_args(
            c,
            &["--modes", "default,auto", "--mode-control", "config-option"],
        )
    })
    .await;
    for policy in ["deny", "ask", "allow"] {
        let name = format!("mode-{policy}");
        let ch = g
            .channel(&name, |c| {
                c.permission_policy = Some(policy.parse().unwrap())
            })
            .await;
        let mut j = NewJob::new(ch, Source::Cli, "@permission edit\n@reply done");
        j.agent_options = Some(r#"{"mode":"auto"}"#.into());
        let id = g.store.job_insert(j, now_ms()).await.unwrap().job_id;
        let job = g.wait_done(&id).await;
        if policy == "allow" {
            assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
            assert_eq!(g.session_data(&id).await["mode"], "auto");
            let out = g.store.job_output(&id).await.unwrap();
            assert!(out.contains("self-approved in mode auto"), "{out}");
        } else {
            assert_eq!(job.state, JobState::Failed);
            let err = job.error.unwrap();
            assert!(
                err.contains("mode \"auto\"") && err.contains(policy),
                "{err}"
            );
            assert!(!err.contains("  "), "one space between words: {err}");
        }
    }
    g.stop().await;
}

#[tokio::test]
async fn mcp_servers_and_directories_reach_every_opening_and_secrets_stay_masked() {
    let extra = tempfile::tempdir().unwrap();
    let extra_dir = std::fs::canonicalize(extra.path()).unwrap();
    let g = Gorp::start(|c| {
        c.acp.mcp_servers = vec![McpServerSpec {
            name: "files".into(),
            command: Some("/bin/true".into()),
            args: vec!["--root".into()],
            env: [("FILES_TOKEN".to_string(), "s3cret-env".to_string())].into(),
            url: None,
            headers: BTreeMap::new(),
        }];
    })
    .await;
    let ch = g.channel("tools", |_| {}).await;
    let search = McpServerSpec {
        name: "search".into(),
        command: None,
        args: vec![],
        env: BTreeMap::new(),
        url: Some("http://127.0.0.1:9/mcp".into()),
        headers: [(
            "Authorization".to_string(),
            "Bearer s3cret-header".to_string(),
        )]
        .into(),
    };
    let updated = channels::update(
        &g.store,
        "tools",
        Changes {
            mcp_servers: Some(vec![search.clone()]),
            additional_directories: Some(vec![extra.path().to_path_buf()]),
            ..Changes::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    let shown = serde_json::to_string(&updated).unwrap();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("********"), "{shown}");

    let target = extra_dir.join("made-by-agent.txt");
    let prompt = format!("@setup\n@write-direct {} hello", target.display());
    let (job, out) = g.run(ch, &prompt).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let expect_dirs = serde_json::to_string(&vec![&extra_dir]).unwrap();
    assert!(
        out.contains(r#""mcp_servers":["stdio:files","http:search"]"#),
        "{out}"
    );
    assert!(out.contains(&expect_dirs), "{out}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hello",
        "an additional directory is writable under the sandbox"
    );
    let data = g.session_data(&job.id).await;
    assert_eq!(data["mcp_servers"], serde_json::json!(["files", "search"]));
    let (dir, config) = g.stop().await;

    // A load after a restart carries them too.
    let g = Gorp::start_on(dir, config, "gorp-b").await;
    let (_, out) = g.run(ch, "@setup").await;
    assert!(out.contains(r#""opened_with":"session/load""#), "{out}");
    assert!(
        out.contains(r#""mcp_servers":["stdio:files","http:search"]"#),
        "{out}"
    );

    // Bad input writes nothing.
    for (changes, why) in [
        (
            Changes {
                additional_directories: Some(vec!["relative/dir".into()]),
                ..Changes::default()
            },
            "absolute",
        ),
        (
            Changes {
                additional_directories: Some(vec!["/no/such/dir/at/all".into()]),
                ..Changes::default()
            },
            "/no/such/dir",
        ),
        (
            Changes {
                mcp_servers: Some(vec![McpServerSpec {
                    url: Some("ftp://x".into()),
                    ..search.clone()
                }]),
                ..Changes::default()
            },
            "http://",
        ),
        (
            Changes {
                mcp_servers: Some(vec![search.clone(), search.clone()]),
                ..Changes::default()
            },
            "two MCP servers",
        ),
    ] {
        let err = channels::update(&g.store, "tools", changes)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    let now = g.store.channel_get("tools").await.unwrap().unwrap();
    assert_eq!(now.mcp_servers, updated.mcp_servers);

    // A listing read and sent back keeps the secrets behind the masks; a mask with no secret
    // behind it is refused.
    let listed: Vec<McpServerSpec> =
        serde_json::from_value(serde_json::to_value(&now).unwrap()["mcp_servers"].clone()).unwrap();
    assert_eq!(listed[0].headers["Authorization"], "********");
    let back = channels::update(
        &g.store,
        "tools",
        Changes {
            mcp_servers: Some(listed.clone()),
            ..Changes::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        back.mcp_servers.contains("Bearer s3cret-header"),
        "{}",
        back.mcp_servers
    );
    let mut renamed = listed;
    renamed[0].name = "other".into();
    let err = channels::update(
        &g.store,
        "tools",
        Changes {
            mcp_servers: Some(renamed),
            ..Changes::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("the mask shown in place of a secret"),
        "{err}"
    );
    assert_eq!(now.additional_directories, updated.additional_directories);
    g.stop().await;
}
