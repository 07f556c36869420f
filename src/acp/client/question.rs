//! Answering the agent's questions (`elicitation/create`) by the channel's policy.
//!
//! gorp advertises form elicitation only. Under `ask` a form question of a running prompt is
//! handed to whoever runs the prompt like a permission request: a `question` event (with an
//! `askId`, the message and the requested schema) goes into the prompt's event stream and the
//! agent waits until [`super::Answerer::answer`] is called with `accept` and the content, or
//! `decline`. Under `allow` and `deny` nobody is asked: the question is declined at once. A
//! question outside a running prompt is cancelled, a URL question declined. Every answer is an
//! `answer` event (`action`, `content`, `policy`, `reason` or `decision`).

use std::collections::BTreeMap;

use agent_client_protocol::v1::schema::{
    CreateElicitationRequest, CreateElicitationResponse, ElicitationAcceptAction,
    ElicitationAction, ElicitationContentValue, ElicitationMode, ElicitationScope,
};

use super::*;

/// The session a question belongs to (none for a question tied to a request, such as one
/// asked during `initialize`), and the tool call that asks it.
fn scope_of(scope: &ElicitationScope) -> (Option<String>, Option<String>) {
    match scope {
        ElicitationScope::Session(s) => (
            Some(s.session_id.0.to_string()),
            s.tool_call_id.as_ref().map(|t| t.0.to_string()),
        ),
        _ => (None, None),
    }
}

impl Shared {
    pub(super) async fn answer_question(
        &self,
        req: &CreateElicitationRequest,
    ) -> CreateElicitationResponse {
        let policy = self.policy();
        let (mode, (session, tool_call), schema) = match &req.mode {
            ElicitationMode::Form(f) => (
                "form",
                scope_of(&f.scope),
                serde_json::to_value(&f.requested_schema).unwrap_or(Value::Null),
            ),
            ElicitationMode::Url(u) => ("url", scope_of(&u.scope), Value::Null),
            other => ("other", scope_of(other.scope()), Value::Null),
        };
        let declined = |why: String| AskAnswer {
            option_id: Some("decline".into()),
            content: None,
            detail: json!({ "reason": why }),
        };
        let answer = match (&session, mode, policy) {
            (None, ..) => AskAnswer::cancelled(json!({
                "reason": "the question belongs to no session"
            })),
            (Some(_), "form", PermissionPolicy::Ask) => {
                self.ask(
                    session.as_deref().unwrap_or_default(),
                    EventKind::Question,
                    Some(req.message.clone()),
                    json!({
                        "mode": mode,
                        "message": req.message,
                        "requestedSchema": schema,
                        "toolCallId": tool_call,
                    }),
                )
                .await
            }
            (Some(_), "form", _) => declined(format!(
                "the channel's permission policy is {policy}: only `ask` forwards questions to people"
            )),
            (Some(_), _, _) => declined(format!("gorp answers form questions only, not {mode}")),
        };
        let content = answer.content.clone().unwrap_or(Value::Null);
        let (action, response) = match answer.option_id.as_deref() {
            Some("accept") => {
                match serde_json::from_value::<BTreeMap<String, ElicitationContentValue>>(
                    answer.content.clone().unwrap_or_else(|| json!({})),
                ) {
                    Ok(c) => (
                        "accept",
                        ElicitationAction::Accept(ElicitationAcceptAction::new().content(c)),
                    ),
                    Err(e) => {
                        tracing::warn!(pid = self.pid, "answer content is not form content: {e}");
                        ("cancel", ElicitationAction::Cancel)
                    }
                }
            }
            Some("decline") => ("decline", ElicitationAction::Decline),
            _ => ("cancel", ElicitationAction::Cancel),
        };
        let event = AgentEvent::new(
            EventKind::Answer.as_str(),
            Some(action.to_string()),
            json!({
                "policy": policy,
                "action": action,
                "content": content,
                "mode": mode,
                "message": req.message,
                "toolCallId": tool_call,
                "decision": answer.detail,
            }),
        );
        match &session {
            Some(s) => self.emit(s, event).await,
            None => {
                tracing::info!(pid = self.pid, message = %req.message, "question outside a session cancelled")
            }
        }
        CreateElicitationResponse::new(response)
    }
}
