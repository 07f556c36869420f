//! Approvals: the pending permission requests (allow once, allow always, deny) and questions
//! (answer, decline), decided through the same service as Matrix, HTTP and the CLI.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::session::{Checked, Viewer};
use super::view::{self, time, Section};
use super::{DashError, DashResult};
use crate::http::HttpState;
use crate::service::approvals::{self, Choice, DecideError};
use crate::service::questions;
use crate::store::{Approval, ApprovalFilter, ApprovalState, DecidedVia, RequestKind};

/// Who decided, as the approval row records it.
const DECIDED_BY: &str = "dashboard";

pub async fn list(viewer: Viewer, State(st): State<HttpState>) -> DashResult<Response> {
    let pending = st
        .store
        .approval_list(&ApprovalFilter {
            state: Some(ApprovalState::Pending),
            limit: 200,
            ..Default::default()
        })
        .await?;
    let recent = st
        .store
        .approval_list(&ApprovalFilter {
            limit: 20,
            ..Default::default()
        })
        .await?;
    let body = html! {
        h1 { "Approvals" }
        @if pending.is_empty() {
            section.empty {
                p { "Nothing waits for a decision." }
                p.muted { "A channel whose permission policy is " code { "ask" } " stops before each tool call it has no rule for, and its request shows here (and in its Matrix room)." }
            }
        }
        @for a in &pending {
            (approval_form(&viewer, a, "/ui/approvals"))
        }
        @let decided: Vec<&Approval> = recent.iter().filter(|a| a.state != ApprovalState::Pending).collect();
        @if !decided.is_empty() {
            h2 { "Decided lately" }
            div.scroll {
                table {
                    thead { tr { th { "request" } th { "channel" } th { "decision" } th { "by" } th { "when" } } }
                    tbody {
                        @for a in decided {
                            tr {
                                td { a href={"/ui/jobs/" (a.job_id)} { (view::first_line(a.title.as_deref().unwrap_or("request"), 80)) } }
                                td { (a.channel) }
                                td { (a.state.as_str()) }
                                td { (a.decided_by.as_deref().unwrap_or("")) }
                                td { (view::maybe_time(a.decided_at)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&viewer, Section::Approvals, "Approvals", body))
}

/// A pending request with its buttons, or a question with its form; decisions come back to
/// `back`.
pub fn approval_form(viewer: &Viewer, a: &Approval, back: &str) -> Markup {
    let action = format!("/ui/approvals/{}", a.id);
    let input = serde_json::to_string_pretty(&a.input).unwrap_or_default();
    html! {
        article.approval aria-label="Pending request" {
            header {
                @if a.request == RequestKind::Question { "❓ " } @else { "🔐 " }
                strong { (view::first_line(a.title.as_deref().unwrap_or("request"), 200)) }
                " · " (a.channel) " · asked " (time(a.created_at)) " · expires " (time(a.expires_at))
            }
            @if a.request == RequestKind::Question {
                @let fields = questions::fields(&a.input["requestedSchema"]);
                form method="post" action=(action) {
                    (view::csrf(viewer))
                    input type="hidden" name="back" value=(back);
                    label for={"answer-" (a.id)} { "Answer " span.muted { (questions::hint(&fields)) } }
                    input id={"answer-" (a.id)} name="answer" required maxlength="4000";
                    button type="submit" name="decision" value="answer" { "Answer" }
                    button.danger type="submit" name="decision" value="deny" formnovalidate { "Decline" }
                }
            } @else {
                details { summary { "Input" } pre { (input) } }
                p.muted { "Allow always adds the rule " code { (approvals::rule_text(a)) } "." }
                form.buttons method="post" action=(action) {
                    (view::csrf(viewer))
                    input type="hidden" name="back" value=(back);
                    button type="submit" name="decision" value="allow" { "Allow once" }
                    button type="submit" name="decision" value="always" { "Allow always" }
                    button.danger type="submit" name="decision" value="deny" { "Deny" }
                }
            }
        }
    }
}

pub async fn decide(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    checked: Checked<HashMap<String, String>>,
) -> Response {
    let form = &checked.form;
    let back = form
        .get("back")
        .filter(|b| super::session::safe_next(b))
        .cloned()
        .unwrap_or_else(|| "/ui/approvals".into());
    let result = match form.get("decision").map(String::as_str) {
        Some("allow") => {
            approvals::decide(
                &st.store,
                &id,
                Choice::AllowOnce,
                DECIDED_BY,
                DecidedVia::Http,
            )
            .await
        }
        Some("always") => {
            approvals::decide(
                &st.store,
                &id,
                Choice::AllowAlways,
                DECIDED_BY,
                DecidedVia::Http,
            )
            .await
        }
        Some("deny") => {
            approvals::decide(&st.store, &id, Choice::Deny, DECIDED_BY, DecidedVia::Http).await
        }
        Some("answer") => {
            let text = form.get("answer").map(String::as_str).unwrap_or("");
            approvals::answer_typed(&st.store, &id, text, DECIDED_BY, DecidedVia::Http).await
        }
        _ => {
            return DashError::BadRequest("decide with allow, always, deny or answer".into())
                .into_response()
        }
    };
    match result {
        Ok(a) => {
            tracing::info!(approval = %a.id, state = a.state.as_str(), "decided from the dashboard");
            view::done(&back, &format!("Decided: {}.", a.state.as_str()))
        }
        Err(DecideError::NotFound(_)) => {
            DashError::NotFound(format!("no approval {id}")).into_response()
        }
        Err(DecideError::Store(e)) => DashError::from(e).into_response(),
        Err(e) => view::refused(&back, &DashError::BadRequest(e.to_string())),
    }
}
