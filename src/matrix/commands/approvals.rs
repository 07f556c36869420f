//! `!policy`, `!approvals`, `!allow`, `!always`, `!deny`, `!answer` and `!rules`: the
//! permission and question side of this room's channel. Only `allowed_users` reach these handlers (strangers' messages are
//! dropped before any command runs).

use super::super::failure::Answer;
use super::*;
use crate::service::approvals::{self, Choice, DecideError};
use crate::service::channels;
use crate::store::{
    Approval, ApprovalFilter, ApprovalState, DecidedVia, PermissionPolicy, RequestKind,
};

pub(super) async fn policy(cx: &Ctx<'_>, set: Option<PermissionPolicy>) -> Answer {
    let ch = cx.room_channel().await?;
    match set {
        None => Ok(strings::policy_is(&ch.name, ch.permission_policy)),
        Some(p) => {
            channels::set_policy(cx.store(), &ch.name, p).await?;
            tracing::info!(channel = %ch.name, policy = %p, by = %cx.sender, "permission policy set");
            Ok(strings::policy_set(&ch.name, p))
        }
    }
}

async fn pending(cx: &Ctx<'_>, channel: &str) -> Result<Vec<Approval>, failure::Failure> {
    Ok(approvals::list(
        cx.store(),
        &ApprovalFilter {
            state: Some(ApprovalState::Pending),
            request: None,
            channel: Some(channel.to_string()),
            job_id: None,
            limit: 100,
        },
    )
    .await?)
}

pub(super) async fn list(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    let waiting = pending(cx, &ch.name).await?;
    if waiting.is_empty() {
        return Ok(strings::no_pending_approvals(&ch.name));
    }
    Ok(waiting
        .iter()
        .map(|a| {
            strings::approval_line(
                &a.id,
                a.request,
                a.title.as_deref(),
                a.kind.as_deref(),
                &a.job_id,
            )
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

pub(super) async fn decide(cx: &Ctx<'_>, id: Option<&str>, choice: Choice) -> Answer {
    let approval = target(cx, id, None).await?;
    let decided = approvals::decide(
        cx.store(),
        &approval.id,
        choice,
        cx.sender.as_str(),
        DecidedVia::Matrix,
    )
    .await
    .map_err(decide_error)?;
    tracing::info!(approval = %decided.id, state = %decided.state, by = %cx.sender, "request decided by command");
    Ok(strings::decided_reply(&decided.id, decided.state))
}

pub(super) async fn answer(cx: &Ctx<'_>, id: Option<&str>, text: &str) -> Answer {
    let approval = target(cx, id, Some(RequestKind::Question)).await?;
    let decided = approvals::answer_typed(
        cx.store(),
        &approval.id,
        text,
        cx.sender.as_str(),
        DecidedVia::Matrix,
    )
    .await
    .map_err(decide_error)?;
    tracing::info!(approval = %decided.id, by = %cx.sender, "question answered by command");
    Ok(strings::decided_reply(&decided.id, decided.state))
}

fn decide_error(e: DecideError) -> failure::Failure {
    match e {
        DecideError::AlreadyDecided { id, state } => {
            refuse(strings::approval_not_pending(&id, state))
        }
        DecideError::NotOffered(what, _) => refuse(strings::approval_not_offered(&what)),
        DecideError::NotFound(p) | DecideError::Ambiguous(p) => refuse(strings::no_approval(&p)),
        DecideError::IsQuestion(id) => refuse(strings::is_a_question(&id)),
        DecideError::NotQuestion(id) => refuse(strings::not_a_question(&id)),
        DecideError::BadAnswer(why) => refuse(strings::bad_answer(&why)),
        DecideError::Store(e) => e.into(),
    }
}

/// The request an answer in this room is for: the one `id` names (of this room's channel), or
/// the channel's only pending one (of `request` kind when given).
async fn target(
    cx: &Ctx<'_>,
    id: Option<&str>,
    request: Option<RequestKind>,
) -> Result<Approval, failure::Failure> {
    let ch = cx.room_channel().await?;
    // Only a request of this room's channel can be decided here.
    Ok(match id {
        Some(prefix) => {
            let a = approvals::find(cx.store(), prefix)
                .await
                .map_err(|e| match e {
                    DecideError::Ambiguous(p) => refuse(strings::ambiguous_approval(&p)),
                    DecideError::Store(e) => e.into(),
                    _ => refuse(strings::no_approval(prefix)),
                })?;
            if a.channel_id != ch.id {
                return Err(refuse(strings::no_approval(prefix)));
            }
            a
        }
        None => {
            let mut waiting = pending(cx, &ch.name).await?;
            waiting.retain(|a| request.is_none_or(|r| a.request == r));
            match waiting.len() {
                0 => return Err(refuse(strings::NO_PENDING_TO_DECIDE)),
                1 => waiting.remove(0),
                n => return Err(refuse(strings::several_pending(n))),
            }
        }
    })
}

pub(super) async fn rules(cx: &Ctx<'_>, remove: Option<i64>) -> Answer {
    let ch = cx.room_channel().await?;
    if let Some(id) = remove {
        if !cx.store().rule_delete(ch.id, id).await? {
            return Err(refuse(strings::no_rule(id)));
        }
        tracing::info!(channel = %ch.name, rule = id, by = %cx.sender, "rule removed");
        return Ok(strings::rule_removed(id));
    }
    let list = cx.store().rule_list(ch.id).await?;
    if list.is_empty() {
        return Ok(strings::no_rules(&ch.name));
    }
    Ok(list
        .iter()
        .map(|r| strings::rule_line(r.id, &r.tool_kind, &r.matcher, &r.created_by))
        .collect::<Vec<_>>()
        .join("\n"))
}
