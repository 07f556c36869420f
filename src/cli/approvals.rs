//! `gorp approvals`, `gorp approve`, `gorp deny`, `gorp answer`, `gorp rules` and `gorp channels
//! set`: the command-line side of approvals and questions. A decision made here is a row; the gorp running the job
//! sees it within a quarter of a second and answers the agent.

use super::*;
use crate::service::approvals::{self, Choice, DecideError};
use crate::store::{Approval, ApprovalFilter, ApprovalState, DecidedVia, RequestKind, Rule};

/// Who decides from this shell: `cli:$USER`.
fn cli_user() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

impl From<DecideError> for Failure {
    fn from(e: DecideError) -> Self {
        let code = match &e {
            DecideError::NotFound(_) => EXIT_NOT_FOUND,
            DecideError::Ambiguous(_)
            | DecideError::AlreadyDecided { .. }
            | DecideError::NotOffered(..)
            | DecideError::IsQuestion(_)
            | DecideError::NotQuestion(_)
            | DecideError::BadAnswer(_) => EXIT_USAGE,
            DecideError::Store(_) => EXIT_ERROR,
        };
        Failure::new(code, e.to_string())
    }
}

pub(super) async fn list(
    cli: &Cli,
    store: &Store,
    state: Option<ApprovalState>,
    request: Option<RequestKind>,
    all: bool,
    channel: Option<String>,
    limit: i64,
) -> CmdResult {
    let filter = ApprovalFilter {
        state: if all {
            state
        } else {
            Some(state.unwrap_or(ApprovalState::Pending))
        },
        request,
        channel,
        job_id: None,
        limit,
    };
    let list = approvals::list(store, &filter).await?;
    out(cli, serde_json::json!(list), || approvals_table(&list));
    Ok(EXIT_OK)
}

pub(super) async fn decide(cli: &Cli, store: &Store, id: &str, choice: Choice) -> CmdResult {
    let a = approvals::decide(store, id, choice, &cli_user(), DecidedVia::Cli).await?;
    decided(cli, &a);
    Ok(EXIT_OK)
}

pub(super) async fn answer(cli: &Cli, store: &Store, id: &str, text: &str) -> CmdResult {
    let a = approvals::answer_typed(store, id, text, &cli_user(), DecidedVia::Cli).await?;
    decided(cli, &a);
    Ok(EXIT_OK)
}

fn decided(cli: &Cli, a: &Approval) {
    out(cli, serde_json::json!(a), || {
        let how = match &a.answer {
            Some(answer) => answer.to_string(),
            None => a.option_id.clone().unwrap_or_else(|| "no option".into()),
        };
        let mut s = format!(
            "{}: {} ({how}) by {}",
            a.id,
            a.state,
            a.decided_by.as_deref().unwrap_or("?")
        );
        if let Some(rule) = a.rule_id {
            s.push_str(&format!("; rule {rule}: {}", approvals::rule_text(a)));
        }
        s
    });
}

pub(super) async fn rules(cli: &Cli, store: &Store, channel: &str) -> CmdResult {
    let ch = store
        .channel_get(channel)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(channel.to_string()))?;
    let list = store.rule_list(ch.id).await?;
    out(cli, serde_json::json!(list), || rules_table(&list));
    Ok(EXIT_OK)
}

pub(super) async fn rule_rm(cli: &Cli, store: &Store, channel: &str, id: i64) -> CmdResult {
    let ch = store
        .channel_get(channel)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(channel.to_string()))?;
    if !store.rule_delete(ch.id, id).await? {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!("channel {channel} has no rule {id}"),
        ));
    }
    out(
        cli,
        serde_json::json!({ "channel": channel, "deleted": id }),
        || format!("rule {id} of {channel} removed"),
    );
    Ok(EXIT_OK)
}

fn approvals_table(list: &[Approval]) -> String {
    if list.is_empty() {
        return "no approvals\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.channel.clone(),
                a.state.to_string(),
                match a.request {
                    RequestKind::Question => "question".to_string(),
                    RequestKind::Permission => a.kind.clone().unwrap_or_default(),
                },
                format_ms(a.created_at),
                a.decided_by.clone().unwrap_or_default(),
                short(a.title.as_deref().unwrap_or_default(), 50),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CHANNEL",
            "STATE",
            "KIND",
            "CREATED",
            "DECIDED BY",
            "TITLE",
        ],
        &rows,
    )
}

fn rules_table(list: &[Rule]) -> String {
    if list.is_empty() {
        return "no rules\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.tool_kind.clone(),
                r.matcher.clone(),
                r.created_by.clone(),
                format_ms(r.created_at),
            ]
        })
        .collect();
    table(&["ID", "KIND", "MATCHES", "BY", "CREATED"], &rows)
}
