//! Approvals with the real `gorp-script-agent` over ACP: a permission request under `ask`
//! becomes a committed row and a `permission_request` event; decisions from the service (the
//! one HTTP, Matrix and the CLI call), standing rules, the timeout, a cancel and a shutdown
//! answer the agent; the prompt's deadline does not count the wait. HTTP and the CLI against a
//! real `gorp start` are in `approvals_http`.

use std::time::Duration;

use gorp::service::approvals::{self, Choice, DecideError};
use gorp::store::{
    Approval, ApprovalFilter, ApprovalState, DecidedVia, JobState, PermissionPolicy, RequestKind,
};
use serde_json::json;

use crate::acp::Gorp;
use crate::support::eventually;

const WAIT: Duration = Duration::from_secs(30);

async fn ask_gorp(tweak: impl FnOnce(&mut gorp::config::Config)) -> (Gorp, i64) {
    let g = Gorp::start(tweak).await;
    let ch = g
        .channel("asks", |c| {
            c.permission_policy = Some(PermissionPolicy::Ask)
        })
        .await;
    (g, ch)
}

/// Waits for the job's pending approval.
async fn pending(g: &Gorp, job: &str) -> Approval {
    eventually(WAIT, "a pending approval", || async {
        g.store
            .approval_list(&ApprovalFilter {
                state: Some(ApprovalState::Pending),
                job_id: Some(job.to_string()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .next()
    })
    .await
}

async fn kinds(g: &Gorp, job: &str) -> Vec<String> {
    g.store
        .job_events_list(job, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn a_request_under_ask_waits_for_a_decision_and_the_agent_gets_the_option() {
    let (g, ch) = ask_gorp(|_| {}).await;
    let job = g
        .enqueue(
            ch,
            "@tool-call Look\n@permission Run rm -rf build\n@reply after",
        )
        .await;
    let a = pending(&g, &job).await;
    assert_eq!(a.title.as_deref(), Some("Run rm -rf build"));
    assert_eq!(a.attempt, 1);
    assert_eq!(a.channel, "asks");
    let offered: Vec<(&str, &str)> = a
        .options
        .iter()
        .map(|o| (o.id.as_str(), o.kind.as_str()))
        .collect();
    assert_eq!(
        offered,
        [
            ("allow", "allow_once"),
            ("allow-always", "allow_always"),
            ("reject", "reject_once")
        ]
    );
    // Committed with its event, after the events that came before it.
    let before = kinds(&g, &job).await;
    let at = before
        .iter()
        .position(|k| k == "permission_request")
        .expect("permission_request event");
    assert!(
        before[..at].contains(&"tool_call".to_string()),
        "{before:?}"
    );
    assert!(
        !before.contains(&"permission".to_string()),
        "not answered yet"
    );
    assert_eq!(
        g.store.job_get(&job).await.unwrap().unwrap().state,
        JobState::Running
    );

    let decided = approvals::decide(
        &g.store,
        &a.id[..8],
        Choice::AllowOnce,
        "@alice:x",
        DecidedVia::Http,
    )
    .await
    .unwrap();
    assert_eq!(decided.state, ApprovalState::Allowed);
    assert_eq!(decided.option_id.as_deref(), Some("allow"));
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        g.store.job_output(&job).await.unwrap(),
        "permission: allowafter",
        "the note and the reply are one message (no tool call between them)"
    );
    let events = g.store.job_events_list(&job, 0, 1000).await.unwrap();
    let p = events.iter().find(|e| e.kind == "permission").unwrap();
    let data = p.data.as_ref().unwrap();
    assert_eq!(data["policy"], "ask");
    assert_eq!(data["optionId"], "allow");
    assert_eq!(data["decision"]["approval"], a.id.as_str());
    assert_eq!(data["decision"]["by"], "@alice:x");
    assert_eq!(data["decision"]["via"], "http");
    let row = g.store.approval_get(&a.id).await.unwrap().unwrap();
    assert_eq!(row.decided_by.as_deref(), Some("@alice:x"));
    assert!(row.decided_at.unwrap() >= row.created_at);

    // A second decision loses and writes nothing.
    let again =
        approvals::decide(&g.store, &a.id, Choice::Deny, "@bob:x", DecidedVia::Matrix).await;
    assert!(
        matches!(
            again,
            Err(DecideError::AlreadyDecided {
                state: ApprovalState::Allowed,
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(g.store.approval_get(&a.id).await.unwrap().unwrap(), row);
    g.stop().await;
}

#[tokio::test]
async fn deny_tells_the_agent_no_and_bad_choices_write_nothing() {
    let (g, ch) = ask_gorp(|_| {}).await;
    let job = g
        .enqueue(ch, "@permission Write /etc/hosts\n@reply went on")
        .await;
    let a = pending(&g, &job).await;
    for (choice, want) in [
        (
            Choice::Option("nope".into()),
            "the agent did not offer option \"nope\"",
        ),
        (Choice::Option("".into()), "did not offer"),
    ] {
        let e = approvals::decide(&g.store, &a.id, choice, "x", DecidedVia::Cli)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    for id in ["ffffffffffffffff", "zz", "", "e", "0190-"] {
        let e = approvals::decide(&g.store, id, Choice::Deny, "x", DecidedVia::Cli)
            .await
            .unwrap_err();
        assert!(matches!(e, DecideError::NotFound(_)), "{id:?}: {e}");
    }
    assert_eq!(
        g.store.approval_get(&a.id).await.unwrap().unwrap(),
        a,
        "nothing written"
    );
    approvals::decide(
        &g.store,
        &a.id,
        Choice::Deny,
        "@alice:x",
        DecidedVia::Matrix,
    )
    .await
    .unwrap();
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(
        g.store.job_output(&job).await.unwrap(),
        "permission: rejectwent on"
    );
    g.stop().await;
}

#[tokio::test]
async fn allow_always_stores_a_rule_that_decides_the_next_identical_request() {
    let (g, ch) = ask_gorp(|_| {}).await;
    // The script agent's requests carry only a title (no kind): the rule matches the title.
    let job = g.enqueue(ch, "@permission Fetch https://example.org").await;
    let a = pending(&g, &job).await;
    let d = approvals::decide(
        &g.store,
        &a.id,
        Choice::AllowAlways,
        "@alice:x",
        DecidedVia::Matrix,
    )
    .await
    .unwrap();
    assert_eq!(
        d.option_id.as_deref(),
        Some("allow-always"),
        "the agent gets its own option"
    );
    let rule_id = d.rule_id.expect("a rule");
    assert_eq!(g.wait_done(&job).await.state, JobState::Succeeded);
    let rules = g.store.rule_list(ch).await.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].id, rule_id);
    assert_eq!(
        (rules[0].tool_kind.as_str(), rules[0].matcher.as_str()),
        ("other", "title:Fetch https://example.org")
    );
    assert_eq!(rules[0].created_by, "@alice:x");
    assert_eq!(rules[0].approval_id.as_deref(), Some(a.id.as_str()));

    // The identical request is decided by the rule at once; another one still asks.
    let job = g
        .enqueue(
            ch,
            "@permission Fetch https://example.org\n@permission Fetch https://other.org",
        )
        .await;
    let other = pending(&g, &job).await;
    assert_eq!(other.title.as_deref(), Some("Fetch https://other.org"));
    let all = g
        .store
        .approval_list(&ApprovalFilter {
            job_id: Some(job.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let by_rule = all.iter().find(|x| x.id != other.id).unwrap();
    assert_eq!(by_rule.state, ApprovalState::Allowed);
    assert_eq!(by_rule.decided_via, Some(DecidedVia::Rule));
    assert_eq!(by_rule.rule_id, Some(rule_id));
    assert_eq!(by_rule.option_id.as_deref(), Some("allow-always"));
    approvals::decide(
        &g.store,
        &other.id,
        Choice::Deny,
        "@alice:x",
        DecidedVia::Matrix,
    )
    .await
    .unwrap();
    assert_eq!(g.wait_done(&job).await.state, JobState::Succeeded);
    assert_eq!(
        g.store.job_output(&job).await.unwrap(),
        "permission: allow-always\n\npermission: reject"
    );

    // Without the rule the identical request asks again.
    assert!(g.store.rule_delete(ch, rule_id).await.unwrap());
    assert!(!g.store.rule_delete(ch, rule_id).await.unwrap());
    let job = g.enqueue(ch, "@permission Fetch https://example.org").await;
    let again = pending(&g, &job).await;
    approvals::decide(
        &g.store,
        &again.id,
        Choice::AllowOnce,
        "@alice:x",
        DecidedVia::Matrix,
    )
    .await
    .unwrap();
    assert_eq!(g.wait_done(&job).await.state, JobState::Succeeded);
    g.stop().await;
}

#[tokio::test]
async fn a_request_nobody_answers_is_denied_with_timeout_and_the_prompt_deadline_waits() {
    let (g, ch) = ask_gorp(|c| {
        c.acp.approval_timeout_secs = 2;
        // Shorter than the wait: the wait must not count as the agent stalling.
        c.acp.prompt_timeout_secs = 1;
    })
    .await;
    let (job, out) = g.run(ch, "@permission Run make\n@reply done").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out, "permission: rejectdone");
    let list = g
        .store
        .approval_list(&ApprovalFilter {
            job_id: Some(job.id.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list[0].state, ApprovalState::Denied);
    assert_eq!(list[0].decided_via, Some(DecidedVia::Timeout));
    assert_eq!(list[0].decided_by.as_deref(), Some("gorp"));
    assert!(list[0].decided_at.unwrap() - list[0].created_at >= 2000);
    g.stop().await;
}

/// Waiting for a person is not the agent stalling.
#[tokio::test]
async fn a_wait_for_a_decision_longer_than_the_stall_timeout_is_not_a_stall() {
    let (g, ch) = ask_gorp(|c| c.acp.stall_timeout_secs = 1).await;
    let job = g.enqueue(ch, "@permission Run make\n@reply built").await;
    let a = pending(&g, &job).await;
    // Longer than the stall timeout, by the clock the watchdog reads.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    approvals::decide(&g.store, &a.id, Choice::AllowOnce, "x", DecidedVia::Http)
        .await
        .unwrap();
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(done.attempt, 1);
    assert_eq!(
        g.store.job_output(&job).await.unwrap(),
        "permission: allowbuilt"
    );
    g.stop().await;
}

#[tokio::test]
async fn cancelling_the_job_withdraws_its_request() {
    let (g, ch) = ask_gorp(|_| {}).await;
    let job = g.enqueue(ch, "@permission Run deploy").await;
    let a = pending(&g, &job).await;
    gorp::service::jobs::cancel(&g.store, Some(&g.pool), &job)
        .await
        .unwrap();
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Cancelled);
    let row = g.store.approval_get(&a.id).await.unwrap().unwrap();
    assert_eq!(row.state, ApprovalState::Cancelled);
    assert_eq!(row.decided_via, Some(DecidedVia::Job));
    let late = approvals::decide(&g.store, &a.id, Choice::AllowOnce, "x", DecidedVia::Http).await;
    assert!(matches!(late, Err(DecideError::AlreadyDecided { .. })));
    g.stop().await;
}

#[tokio::test]
async fn a_policy_change_applies_to_the_warm_agent_next_prompt() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("flip", |_| {}).await;
    let (job, out) = g.run(ch, "@pid\n@permission Run ls").await;
    assert_eq!(job.state, JobState::Succeeded);
    let pid = out.lines().next().unwrap().to_string();
    assert!(out.ends_with("permission: allow"), "{out}");
    gorp::service::channels::set_policy(&g.store, "flip", PermissionPolicy::Deny)
        .await
        .unwrap()
        .unwrap();
    let (_, out) = g.run(ch, "@pid\n@permission Run ls").await;
    assert!(out.starts_with(&pid), "the same warm agent: {out}");
    assert!(out.ends_with("permission: reject"), "{out}");
    gorp::service::channels::set_policy(&g.store, "flip", PermissionPolicy::Ask)
        .await
        .unwrap()
        .unwrap();
    let job = g.enqueue(ch, "@permission Run ls").await;
    let a = pending(&g, &job).await;
    approvals::decide(&g.store, &a.id, Choice::AllowOnce, "x", DecidedVia::Http)
        .await
        .unwrap();
    assert_eq!(g.wait_done(&job).await.state, JobState::Succeeded);
    assert!(
        gorp::service::channels::set_policy(&g.store, "nope", PermissionPolicy::Ask)
            .await
            .unwrap()
            .is_none()
    );
    let _ = json!({});
    g.stop().await;
}

/// The `answer` events of a job (how each question was answered).
async fn answers(g: &Gorp, job: &str) -> Vec<serde_json::Value> {
    g.store
        .job_events_list(job, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "answer")
        .map(|e| e.data.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_question_under_ask_is_a_row_and_the_agent_gets_the_checked_answer() {
    let (g, ch) = ask_gorp(|_| {}).await;
    let job = g
        .enqueue(ch, "@ask Which cache? | Redis | SQLite\n@reply after")
        .await;
    let q = pending(&g, &job).await;
    assert_eq!(q.request, RequestKind::Question);
    assert_eq!(q.title.as_deref(), Some("Which cache?"));
    assert_eq!(q.kind.as_deref(), Some("form"));
    assert!(q.options.is_empty());
    assert_eq!(
        q.input["requestedSchema"]["properties"]["choice"]["oneOf"][1]["const"],
        "SQLite"
    );
    let ks = kinds(&g, &job).await;
    assert!(ks.contains(&"question".to_string()), "{ks:?}");
    // Answers that do not fit, and decisions a question does not take, write nothing.
    for (choice, want) in [
        (
            Choice::Answer(json!({ "choice": "Mongo" })),
            "takes one of \"Redis\", \"SQLite\"",
        ),
        (
            Choice::Answer(json!({ "colour": "red" })),
            "no field \"colour\"",
        ),
        (Choice::Answer(json!("Redis")), "JSON object"),
        (Choice::AllowOnce, "is a question"),
        (Choice::Option("allow".into()), "is a question"),
    ] {
        let e = approvals::decide(&g.store, &q.id, choice, "x", DecidedVia::Http)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = approvals::answer_typed(&g.store, &q.id, "{oops", "x", DecidedVia::Cli)
        .await
        .unwrap_err();
    assert!(matches!(e, DecideError::BadAnswer(_)), "{e}");
    assert_eq!(g.store.approval_get(&q.id).await.unwrap().unwrap(), q);
    // A typed answer: the choice's number.
    let a = approvals::answer_typed(&g.store, &q.id[..12], "2", "@alice:x", DecidedVia::Matrix)
        .await
        .unwrap();
    assert_eq!(a.state, ApprovalState::Answered);
    assert_eq!(a.answer, Some(json!({ "choice": "SQLite" })));
    let done = g.wait_done(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        g.store.job_output(&job).await.unwrap(),
        r#"ask: accept {"choice":"SQLite"}after"#
    );
    let ans = answers(&g, &job).await;
    assert_eq!(ans.len(), 1);
    assert_eq!(ans[0]["action"], "accept");
    assert_eq!(ans[0]["policy"], "ask");
    assert_eq!(ans[0]["content"], json!({ "choice": "SQLite" }));
    assert_eq!(ans[0]["decision"]["by"], "@alice:x");
    // A permission decision on an answered question loses like any second decision.
    let late = approvals::decide(&g.store, &q.id, Choice::Deny, "x", DecidedVia::Http).await;
    assert!(matches!(late, Err(DecideError::AlreadyDecided { .. })));
    // Free text goes to the free field; deny declines.
    let job = g.enqueue(ch, "@ask Anything else?").await;
    let q = pending(&g, &job).await;
    let e = approvals::decide(&g.store, &q.id, Choice::AllowAlways, "x", DecidedVia::Cli)
        .await
        .unwrap_err();
    assert!(matches!(e, DecideError::IsQuestion(_)), "{e}");
    approvals::decide(&g.store, &q.id, Choice::Deny, "x", DecidedVia::Cli)
        .await
        .unwrap();
    g.wait_done(&job).await;
    assert_eq!(g.store.job_output(&job).await.unwrap(), "ask: decline");
    let row = g.store.approval_get(&q.id).await.unwrap().unwrap();
    assert_eq!(row.state, ApprovalState::Declined);
    assert_eq!(row.answer, None);
    // A permission request is no question.
    let job = g.enqueue(ch, "@permission Run ls").await;
    let p = pending(&g, &job).await;
    let e = approvals::answer_typed(&g.store, &p.id, "yes", "x", DecidedVia::Cli)
        .await
        .unwrap_err();
    assert!(matches!(e, DecideError::NotQuestion(_)), "{e}");
    g.stop().await;
}

#[tokio::test]
async fn questions_are_declined_under_allow_and_deny_with_an_event() {
    let g = Gorp::start(|_| {}).await;
    for policy in [PermissionPolicy::Allow, PermissionPolicy::Deny] {
        let name = format!("q-{policy}");
        let ch = g
            .channel(&name, |c| c.permission_policy = Some(policy))
            .await;
        let (job, out) = g.run(ch, "@ask Which? | a | b\n@reply went on").await;
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(out, "ask: declinewent on", "{policy}");
        let ans = answers(&g, &job.id).await;
        assert_eq!(ans.len(), 1);
        assert_eq!(ans[0]["action"], "decline");
        assert_eq!(ans[0]["policy"], policy.as_str());
        assert!(
            ans[0]["decision"]["reason"]
                .as_str()
                .unwrap()
                .contains("only `ask` forwards questions"),
            "{ans:?}"
        );
        let rows = g
            .store
            .approval_list(&ApprovalFilter {
                job_id: Some(job.id.clone()),
                limit: 5,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(rows.is_empty(), "nobody was asked: no row");
    }
    g.stop().await;
}

#[tokio::test]
async fn a_question_nobody_answers_is_declined_with_timeout() {
    let (g, ch) = ask_gorp(|c| {
        c.acp.approval_timeout_secs = 1;
        c.acp.prompt_timeout_secs = 1;
    })
    .await;
    let (job, out) = g.run(ch, "@ask Deploy now? | yes | no\n@reply done").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(out, "ask: declinedone");
    let list = g
        .store
        .approval_list(&ApprovalFilter {
            job_id: Some(job.id.clone()),
            request: Some(RequestKind::Question),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, ApprovalState::Declined);
    assert_eq!(list[0].decided_via, Some(DecidedVia::Timeout));
    assert!(list[0].decided_at.unwrap() - list[0].created_at >= 1000);
    g.stop().await;
}
