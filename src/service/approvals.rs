//! Approvals: a permission request under the policy `ask` becomes a row, a person decides it
//! from Matrix, HTTP or the CLI (or a standing rule does, or the timeout denies it), and the
//! agent is answered from the row.
//!
//! - [`open`] commits the row (with the job's `permission_request` event) before anything shows
//!   it; a request that a channel rule matches is committed already `allowed` (`rule`).
//! - [`wait`] returns once the row is decided: by this process (it wakes at the commit), by
//!   another one such as `gorp approve` (seen at the next poll), or by the timeout, which it
//!   writes itself as `denied` / `timeout`.
//! - [`decide`] is every front end's decision: it checks the choice against the options the
//!   agent offered and writes a guarded transition, so a second decision loses.
//!
//! # Questions
//! A question of the agent (ACP elicitation, a form) is an approval of the request kind
//! `question`: no options and no rules; it is answered with content that [`super::questions`]
//! checks against the form's fields (`answered`), or declined (`declined`, also when the
//! timeout passes).
//!
//! # Standing rules
//! "Allow always" stores a rule for the channel and the request's tool kind, matching the
//! stable part of the request:
//! - a command (`execute`) that is one plain program call: `program:<first word>`, matching
//!   later plain commands of the same program (`git status` → `program:git`); a command with
//!   shell syntax (`;`, `&`, `|`, `<`, `>`, `$`, backquotes, parentheses, braces, a newline)
//!   gets `title:<whole command>` and matches only itself, and never matches a `program:` rule;
//! - a file tool (`edit`, `delete`, `move`) with a path: `path:<its directory>/`, matching later
//!   paths under that directory (a path with a `..` component never matches);
//! - anything else: `title:<title>`, matching the same title.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::store::{
    now_ms, Approval, ApprovalFilter, ApprovalOption, ApprovalState, DecidedVia, Decision,
    EventKind, Job, Millis, NewApproval, NewEvent, NewRule, RequestKind, Rule, Store, StoreError,
};

/// How often a waiting request looks at its row for decisions made by another process.
pub const POLL: Duration = Duration::from_millis(250);

/// A person's (or a caller's) choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The agent's `allow_once` option (else `allow_always`).
    AllowOnce,
    /// The agent's `allow_always` option (else `allow_once`), and a standing rule.
    AllowAlways,
    /// The agent's `reject_once` option (else `reject_always`; else the request is cancelled).
    Deny,
    /// One of the offered options, by id.
    Option(String),
    /// A question's answer: field name → value, checked against the form.
    Answer(Value),
}

/// Why a decision was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no approval with id {0:?}")]
    NotFound(String),
    #[error("approval id {0:?} is ambiguous; give more of it")]
    Ambiguous(String),
    #[error("approval {id} is already {state}")]
    AlreadyDecided { id: String, state: ApprovalState },
    #[error("the agent did not offer {0}; it offered {1}")]
    NotOffered(String, String),
    #[error("approval {0} is a question: answer it or decline it (deny)")]
    IsQuestion(String),
    #[error("approval {0} is a permission request, not a question: allow or deny it")]
    NotQuestion(String),
    #[error("the answer does not fit the question: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`open`] did with a request.
#[derive(Debug)]
pub enum Opened {
    /// Committed, pending: wait for it.
    Pending(Approval),
    /// A standing rule decided it at once.
    Decided(Approval),
    /// The job's attempt is no longer running: nothing was written.
    NotRunning,
}

/// The request as the executor read it from the agent's `permission_request` or `question`
/// event.
#[derive(Debug, Clone)]
pub struct Request {
    pub request: RequestKind,
    pub tool_call_id: Option<String>,
    pub title: Option<String>,
    pub kind: Option<String>,
    pub input: Value,
    pub options: Vec<ApprovalOption>,
}

impl Request {
    /// Reads `{"options": [...], "toolCall": {...}}` (the `permission_request` event data).
    pub fn from_event_data(data: &Value) -> Request {
        let tc = &data["toolCall"];
        let text = |v: &Value| v.as_str().map(String::from);
        let options = data["options"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| {
                        Some(ApprovalOption {
                            id: o["id"].as_str()?.to_string(),
                            name: o["name"].as_str().unwrap_or_default().to_string(),
                            kind: o["kind"].as_str().unwrap_or_default().to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut input = serde_json::Map::new();
        for key in ["rawInput", "content", "locations"] {
            if let Some(v) = tc.get(key).filter(|v| !v.is_null()) {
                input.insert(key.into(), v.clone());
            }
        }
        Request {
            request: RequestKind::Permission,
            tool_call_id: text(&tc["toolCallId"]),
            title: text(&tc["title"]),
            kind: text(&tc["kind"]),
            input: Value::Object(input),
            options,
        }
    }

    /// Reads `{"message", "mode", "requestedSchema", "toolCallId"}` (the `question` event
    /// data).
    pub fn from_question_data(data: &Value) -> Request {
        let text = |v: &Value| v.as_str().map(String::from);
        Request {
            request: RequestKind::Question,
            tool_call_id: text(&data["toolCallId"]),
            title: text(&data["message"]),
            kind: text(&data["mode"]),
            input: json!({ "requestedSchema": data["requestedSchema"] }),
            options: Vec::new(),
        }
    }
}

/// The stable part of a request a rule stores and matches (see the module docs).
pub fn matcher(kind: Option<&str>, title: Option<&str>, input: &Value) -> String {
    match kind {
        Some("execute") => match command(input, title) {
            Some(cmd) => match plain_program(&cmd) {
                Some(p) => format!("program:{p}"),
                None => format!("title:{cmd}"),
            },
            None => format!("title:{}", title.unwrap_or_default()),
        },
        Some("edit" | "delete" | "move") => match path(input) {
            Some(p) if !has_dotdot(&p) => {
                let dir = match p.rfind('/') {
                    Some(i) => &p[..=i],
                    None => "",
                };
                format!("path:{dir}")
            }
            _ => format!("title:{}", title.unwrap_or_default()),
        },
        _ => format!("title:{}", title.unwrap_or_default()),
    }
}

/// Whether `rule` allows a request of `kind` with this title and input.
pub fn rule_matches(rule: &Rule, kind: Option<&str>, title: Option<&str>, input: &Value) -> bool {
    if rule.tool_kind != tool_kind(kind) {
        return false;
    }
    if let Some(program) = rule.matcher.strip_prefix("program:") {
        return command(input, title)
            .and_then(|c| plain_program(&c).map(String::from))
            .is_some_and(|p| p == program);
    }
    if let Some(dir) = rule.matcher.strip_prefix("path:") {
        return path(input)
            .is_some_and(|p| !has_dotdot(&p) && !dir.is_empty() && p.starts_with(dir));
    }
    if rule.matcher.starts_with("title:") {
        return matcher(kind, title, input) == rule.matcher;
    }
    false
}

/// The tool kind a rule is stored under: the agent's, or `other` when it named none.
pub fn tool_kind(kind: Option<&str>) -> &str {
    kind.unwrap_or("other")
}

fn command(input: &Value, title: Option<&str>) -> Option<String> {
    input
        .pointer("/rawInput/command")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| title.map(String::from))
}

/// The program of a command that is one plain call (no shell syntax).
fn plain_program(cmd: &str) -> Option<&str> {
    const SHELL: &[char] = &[
        ';', '&', '|', '<', '>', '$', '`', '(', ')', '{', '}', '\n', '\r', '\\', '*', '?', '~',
        '"', '\'',
    ];
    if cmd.contains(SHELL) {
        return None;
    }
    let first = cmd.split_whitespace().next()?;
    // `FOO=bar prog` sets the environment: not a plain call.
    (!first.contains('=')).then_some(first)
}

fn path(input: &Value) -> Option<String> {
    input
        .pointer("/locations/0/path")
        .or_else(|| input.pointer("/rawInput/file_path"))
        .or_else(|| input.pointer("/rawInput/path"))
        .or_else(|| input.pointer("/rawInput/notebook_path"))
        .and_then(Value::as_str)
        .map(String::from)
}

fn has_dotdot(p: &str) -> bool {
    p.split('/').any(|c| c == "..")
}

/// Commits the request as an approval of `job`'s running attempt, decided at once when a rule
/// of the channel matches.
pub async fn open(
    store: &Store,
    job: &Job,
    req: Request,
    timeout: Duration,
) -> Result<Opened, StoreError> {
    let now = now_ms();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let question = req.request == RequestKind::Question;
    // Rules decide permission requests only; a question always goes to a person.
    let rules = if question {
        Vec::new()
    } else {
        store.rule_list(job.channel_id).await?
    };
    let rule = rules
        .iter()
        .find(|r| rule_matches(r, req.kind.as_deref(), req.title.as_deref(), &req.input));
    let expires_at = now + timeout.as_millis() as Millis;
    let data = if question {
        json!({
            "approval": id,
            "toolCallId": req.tool_call_id,
            "mode": req.kind,
            "message": req.title,
            "requestedSchema": req.input["requestedSchema"],
            "expiresAt": expires_at,
        })
    } else {
        json!({
            "approval": id,
            "toolCallId": req.tool_call_id,
            "kind": req.kind,
            "input": req.input,
            "options": req.options,
            "expiresAt": expires_at,
            "rule": rule.map(|r| r.id),
        })
    };
    let event = NewEvent {
        job_id: job.id.clone(),
        attempt: job.attempt,
        kind: if question {
            EventKind::Question
        } else {
            EventKind::PermissionRequest
        }
        .as_str()
        .into(),
        text: req.title.clone(),
        data: Some(data),
        at: now,
    };
    // A rule's decision is part of the insert: the request is never seen pending.
    let decided = rule.map(|r| Decision {
        state: ApprovalState::Allowed,
        option_id: req
            .options
            .iter()
            .find(|o| o.kind == "allow_always")
            .or_else(|| req.options.iter().find(|o| o.kind == "allow_once"))
            .map(|o| o.id.clone()),
        answer: None,
        by: format!("rule {}", r.id),
        via: DecidedVia::Rule,
        rule_id: Some(r.id),
        new_rule: None,
    });
    let new = NewApproval {
        id: id.clone(),
        job_id: job.id.clone(),
        attempt: job.attempt,
        request: req.request,
        tool_call_id: req.tool_call_id.clone(),
        title: req.title.clone(),
        kind: req.kind.clone(),
        input: req.input.clone(),
        options: req.options.clone(),
        expires_at,
        event,
        decided,
    };
    let Some(approval) = store.approval_insert(new, now).await? else {
        return Ok(Opened::NotRunning);
    };
    if approval.state == ApprovalState::Pending {
        return Ok(Opened::Pending(approval));
    }
    count_decision(&approval);
    Ok(Opened::Decided(approval))
}

/// Waits until the approval is decided and returns it. When it expires it is denied with
/// `timeout`; when `stop` fires first it is ended with `end` (`cancelled`/`job` for a cancel,
/// `expired`/`restart` when gorp shuts down).
pub async fn wait(
    store: &Store,
    approval: Approval,
    stop: &CancellationToken,
    end: impl Fn() -> (ApprovalState, DecidedVia),
) -> Result<Approval, StoreError> {
    let mut commits = store.subscribe_commits();
    let id = approval.id.clone();
    let expires_in = Duration::from_millis((approval.expires_at - now_ms()).max(0) as u64);
    let deadline = tokio::time::Instant::now() + expires_in;
    loop {
        if let Some(a) = store.approval_get(&id).await? {
            if a.state != ApprovalState::Pending {
                count_decision(&a);
                return Ok(a);
            }
        }
        let ended = tokio::select! {
            _ = commits.changed() => None,
            _ = tokio::time::sleep(POLL) => None,
            _ = tokio::time::sleep_until(deadline) => Some((approval.refused(), DecidedVia::Timeout)),
            _ = stop.cancelled() => Some(end()),
        };
        if let Some((state, via)) = ended {
            let current = store.approval_get(&id).await?.unwrap_or(approval.clone());
            let option = (state == ApprovalState::Denied)
                .then(|| current.option_of_kind(&["reject_once", "reject_always"]))
                .flatten()
                .map(|o| o.id.clone());
            let decision = Decision {
                state,
                option_id: option,
                answer: None,
                by: "gorp".into(),
                via,
                rule_id: None,
                new_rule: None,
            };
            if let Some(decided) = store.approval_decide(&id, decision, now_ms()).await? {
                count_decision(&decided);
                return Ok(decided);
            }
            // Decided by someone else just now: that decision stands.
        }
    }
}

/// Finds the approval `id` names: a whole id, or a unique prefix of one.
pub async fn find(store: &Store, id: &str) -> Result<Approval, DecideError> {
    let id = id.trim();
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(DecideError::NotFound(id.to_string()));
    }
    if let Some(a) = store.approval_get(id).await? {
        return Ok(a);
    }
    let found = store.approval_find_prefix(id, 2).await?;
    match found.len() {
        0 => Err(DecideError::NotFound(id.to_string())),
        1 => Ok(found.into_iter().next().expect("one")),
        _ => Err(DecideError::Ambiguous(id.to_string())),
    }
}

/// Decides approval `id` (or a unique prefix of it) with `choice`, made by `by` through `via`.
pub async fn decide(
    store: &Store,
    id: &str,
    choice: Choice,
    by: &str,
    via: DecidedVia,
) -> Result<Approval, DecideError> {
    let approval = find(store, id).await?;
    if approval.state != ApprovalState::Pending {
        return Err(DecideError::AlreadyDecided {
            id: approval.id,
            state: approval.state,
        });
    }
    let offered = || {
        approval
            .options
            .iter()
            .map(|o| format!("{} ({})", o.id, o.kind))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let question = approval.request == RequestKind::Question;
    let (state, option, rule, answer) = match &choice {
        Choice::Answer(content) => {
            if !question {
                return Err(DecideError::NotQuestion(approval.id));
            }
            let content = super::questions::check(&approval.input["requestedSchema"], content)
                .map_err(DecideError::BadAnswer)?;
            (ApprovalState::Answered, None, None, Some(content))
        }
        Choice::Deny if question => (ApprovalState::Declined, None, None, None),
        _ if question => return Err(DecideError::IsQuestion(approval.id)),
        Choice::AllowOnce | Choice::AllowAlways => {
            let kinds: &[&str] = if choice == Choice::AllowOnce {
                &["allow_once", "allow_always"]
            } else {
                &["allow_always", "allow_once"]
            };
            let Some(o) = approval.option_of_kind(kinds) else {
                return Err(DecideError::NotOffered("an allow option".into(), offered()));
            };
            let rule = (choice == Choice::AllowAlways).then(|| NewRule {
                channel_id: approval.channel_id,
                tool_kind: tool_kind(approval.kind.as_deref()).to_string(),
                matcher: matcher(
                    approval.kind.as_deref(),
                    approval.title.as_deref(),
                    &approval.input,
                ),
                created_by: by.to_string(),
                created_via: via.as_str().to_string(),
                approval_id: Some(approval.id.clone()),
            });
            (ApprovalState::Allowed, Some(o.id.clone()), rule, None)
        }
        Choice::Deny => (
            ApprovalState::Denied,
            approval
                .option_of_kind(&["reject_once", "reject_always"])
                .map(|o| o.id.clone()),
            None,
            None,
        ),
        Choice::Option(id) => {
            let Some(o) = approval.option(id) else {
                return Err(DecideError::NotOffered(format!("option {id:?}"), offered()));
            };
            let state = if o.kind.starts_with("allow") {
                ApprovalState::Allowed
            } else {
                ApprovalState::Denied
            };
            (state, Some(o.id.clone()), None, None)
        }
    };
    let decision = Decision {
        state,
        option_id: option,
        answer,
        by: by.to_string(),
        via,
        rule_id: None,
        new_rule: rule,
    };
    match store
        .approval_decide(&approval.id, decision, now_ms())
        .await?
    {
        // Counted by the gorp whose job waits for it (this process may be `gorp approve`).
        Some(decided) => Ok(decided),
        None => {
            let now = store.approval_get(&approval.id).await?;
            Err(DecideError::AlreadyDecided {
                id: approval.id,
                state: now.map(|a| a.state).unwrap_or(ApprovalState::Cancelled),
            })
        }
    }
}

/// Answers the question `id` (or a unique prefix of it) with what a person typed (see
/// [`super::questions::from_text`]).
pub async fn answer_typed(
    store: &Store,
    id: &str,
    text: &str,
    by: &str,
    via: DecidedVia,
) -> Result<Approval, DecideError> {
    let approval = find(store, id).await?;
    if approval.request != RequestKind::Question {
        return Err(DecideError::NotQuestion(approval.id));
    }
    if approval.state != ApprovalState::Pending {
        return Err(DecideError::AlreadyDecided {
            id: approval.id,
            state: approval.state,
        });
    }
    let content = super::questions::from_text(&approval.input["requestedSchema"], text)
        .map_err(DecideError::BadAnswer)?;
    decide(store, &approval.id, Choice::Answer(content), by, via).await
}

/// Records a decision in the metrics of the gorp whose job waited for it (whoever decided).
fn count_decision(a: &Approval) {
    let via = a.decided_via.map(|v| v.as_str()).unwrap_or("unknown");
    metrics::counter!(crate::metrics::APPROVAL_DECISIONS, "outcome" => a.state.as_str(), "via" => via)
        .increment(1);
    if let Some(at) = a.decided_at {
        metrics::histogram!(crate::metrics::APPROVAL_WAIT_SECONDS, "outcome" => a.state.as_str())
            .record((at - a.created_at).max(0) as f64 / 1e3);
    }
}

/// Approvals newest first (see [`ApprovalFilter`]).
pub async fn list(store: &Store, f: &ApprovalFilter) -> Result<Vec<Approval>, StoreError> {
    store.approval_list(f).await
}

/// The option id the agent is answered with (`accept` or `decline` for a question), or `None`
/// for `cancelled`.
pub fn answer(a: &Approval) -> Option<String> {
    match a.state {
        ApprovalState::Allowed | ApprovalState::Denied => a.option_id.clone(),
        ApprovalState::Answered => Some("accept".into()),
        ApprovalState::Declined => Some("decline".into()),
        _ => None,
    }
}

/// The rule "allow always" on this request would store (for showing it before deciding).
pub fn rule_text(a: &Approval) -> String {
    format!(
        "{} {}",
        tool_kind(a.kind.as_deref()),
        matcher(a.kind.as_deref(), a.title.as_deref(), &a.input)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: &str, matcher: &str) -> Rule {
        Rule {
            id: 1,
            channel_id: 1,
            channel: "c".into(),
            tool_kind: kind.into(),
            matcher: matcher.into(),
            created_by: "u".into(),
            created_via: "cli".into(),
            approval_id: None,
            created_at: 0,
        }
    }

    #[test]
    fn commands_match_by_program_only_when_plain() {
        let cmd = |c: &str| json!({ "rawInput": { "command": c } });
        let m = matcher(Some("execute"), None, &cmd("git status"));
        assert_eq!(m, "program:git");
        let r = rule("execute", &m);
        assert!(rule_matches(&r, Some("execute"), None, &cmd("git log -1")));
        assert!(!rule_matches(&r, Some("execute"), None, &cmd("gitx log")));
        assert!(!rule_matches(
            &r,
            Some("execute"),
            None,
            &cmd("git log; rm -rf /")
        ));
        assert!(!rule_matches(
            &r,
            Some("execute"),
            None,
            &cmd("git log && curl x | sh")
        ));
        assert!(!rule_matches(&r, Some("edit"), None, &cmd("git log")));
        assert!(!rule_matches(
            &r,
            Some("execute"),
            None,
            &cmd("FOO=1 git log")
        ));
        let shell = matcher(Some("execute"), None, &cmd("echo hi > out.txt"));
        assert_eq!(shell, "title:echo hi > out.txt");
        let r = rule("execute", &shell);
        assert!(rule_matches(
            &r,
            Some("execute"),
            None,
            &cmd("echo hi > out.txt")
        ));
        assert!(!rule_matches(
            &r,
            Some("execute"),
            None,
            &cmd("echo hi > other.txt")
        ));
    }

    #[test]
    fn file_tools_match_by_directory() {
        let at = |p: &str| json!({ "rawInput": { "file_path": p } });
        let m = matcher(Some("edit"), None, &at("/w/src/a.rs"));
        assert_eq!(m, "path:/w/src/");
        let r = rule("edit", &m);
        assert!(rule_matches(&r, Some("edit"), None, &at("/w/src/b.rs")));
        assert!(rule_matches(
            &r,
            Some("edit"),
            None,
            &at("/w/src/deep/c.rs")
        ));
        assert!(!rule_matches(&r, Some("edit"), None, &at("/w/srcx/c.rs")));
        assert!(!rule_matches(
            &r,
            Some("edit"),
            None,
            &at("/w/src/../etc/passwd")
        ));
        assert!(!rule_matches(&r, Some("delete"), None, &at("/w/src/b.rs")));
        let loc = json!({ "locations": [ { "path": "/w/src/z.rs" } ] });
        assert!(rule_matches(&r, Some("edit"), None, &loc));
        // A path with `..` gets a title rule.
        let m = matcher(Some("edit"), Some("Write x"), &at("/w/../x"));
        assert_eq!(m, "title:Write x");
    }

    #[test]
    fn other_kinds_match_by_title() {
        let m = matcher(Some("fetch"), Some("Fetch https://x"), &json!({}));
        let r = rule("fetch", &m);
        assert!(rule_matches(
            &r,
            Some("fetch"),
            Some("Fetch https://x"),
            &json!({})
        ));
        assert!(!rule_matches(
            &r,
            Some("fetch"),
            Some("Fetch https://y"),
            &json!({})
        ));
        assert!(!rule_matches(
            &rule("fetch", "bogus"),
            Some("fetch"),
            None,
            &json!({})
        ));
    }

    #[test]
    fn a_request_is_read_from_the_event_data() {
        let req = Request::from_event_data(&json!({
            "askId": 3,
            "options": [ { "id": "allow", "name": "Allow", "kind": "allow_once" }, { "bad": 1 } ],
            "toolCall": { "toolCallId": "t1", "title": "Run ls", "kind": "execute",
                          "rawInput": { "command": "ls" }, "content": null }
        }));
        assert_eq!(req.tool_call_id.as_deref(), Some("t1"));
        assert_eq!(req.kind.as_deref(), Some("execute"));
        assert_eq!(req.options.len(), 1);
        assert_eq!(req.input, json!({ "rawInput": { "command": "ls" } }));
    }
}
