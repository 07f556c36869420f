//! The overview: jobs queued and running now, what finished in the last hour and day, queue depth
//! per channel, the warm pool, pending approvals and the schedules due next. Every read is
//! bounded by an index (partial indexes of queued and running jobs, `finished_at`), so the page
//! stays fast however long the history.

use axum::extract::State;
use axum::response::Response;
use maud::html;

use super::session::Viewer;
use super::view::{self, maybe_time, state, time, Section};
use super::DashResult;
use crate::http::HttpState;
use crate::store::{now_ms, ApprovalFilter, ApprovalState, JobState};

const HOUR: i64 = 3_600_000;

pub async fn page(viewer: Viewer, State(st): State<HttpState>) -> DashResult<Response> {
    let store = &st.store;
    let now = now_ms();
    let (queued, running) = store.job_active_counts().await?;
    let hour = store.job_outcomes_since(now - HOUR).await?;
    let day = store.job_outcomes_since(now - 24 * HOUR).await?;
    let outcome =
        |v: &[(JobState, i64)], s: JobState| v.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
    let depths = store.channel_depths().await?;
    let warm = store.warm_list().await?;
    let pending = store
        .approval_list(&ApprovalFilter {
            state: Some(ApprovalState::Pending),
            limit: 10,
            ..Default::default()
        })
        .await?;
    let mut schedules = store.schedule_list().await?;
    schedules.retain(|s| s.enabled && !s.done && s.next_run_at.is_some());
    schedules.sort_by_key(|s| s.next_run_at);
    schedules.truncate(5);
    let quiet = queued + running == 0 && day.is_empty();

    let body = html! {
        h1 { "Overview" }
        @if quiet {
            section.empty {
                p { "Nothing is queued or running, and nothing finished in the last 24 hours." }
                p {
                    "Create a " a href="/ui/channels" { "channel" }
                    ", then send it a prompt: POST to its webhook, say something in its Matrix room, "
                    "run " code { "gorp enqueue <channel> \"…\"" } ", or add a "
                    a href="/ui/schedules" { "schedule" } "."
                }
            }
        }
        section.cards aria-label="Jobs now and in the last 24 hours" {
            a.card href="/ui/jobs?state=queued" {
                span.big { (queued) } (state(JobState::Queued)) span.muted { "now" }
            }
            a.card href="/ui/jobs?state=running" {
                span.big { (running) } (state(JobState::Running)) span.muted { "now" }
            }
            @for s in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
                a.card href={"/ui/jobs?state=" (s.as_str())} {
                    span.big { (outcome(&day, s)) } (state(s)) span.muted { "last 24 hours" }
                }
            }
        }
        section {
            h2 { "Finished" }
            table {
                thead { tr { th { "window" } th { "succeeded" } th { "failed" } th { "cancelled" } } }
                tbody {
                    @for (label, v) in [("last hour", &hour), ("last 24 hours", &day)] {
                        tr {
                            td { (label) }
                            td { (outcome(v, JobState::Succeeded)) }
                            @if outcome(v, JobState::Failed) > 0 {
                                td.fail { (outcome(v, JobState::Failed)) }
                            } @else {
                                td { "0" }
                            }
                            td { (outcome(v, JobState::Cancelled)) }
                        }
                    }
                }
            }
        }
        div.grid {
            section {
                h2 { "Queues" }
                @if depths.is_empty() {
                    p.muted { "Every queue is empty." }
                } @else {
                    table {
                        thead { tr { th { "channel" } th { "queued" } th { "running" } } }
                        tbody {
                            @for d in &depths {
                                tr {
                                    td { a href={"/ui/channels/" (d.channel)} { (d.channel) } }
                                    td { a href={"/ui/jobs?state=queued&channel=" (d.channel)} { (d.queued) } }
                                    td { (d.running) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Warm pool" }
                @if warm.is_empty() {
                    p.muted { "No agent is running. A channel's agent starts with its first job, or with " em { "Warm now" } " on its page." }
                } @else {
                    table {
                        thead { tr { th { "channel" } th { "state" } th { "pid" } th { "last used" } } }
                        tbody {
                            @for w in &warm {
                                tr {
                                    td { a href={"/ui/channels/" (w.channel)} { (w.channel) } }
                                    td { span class={"warm warm-" (w.state.as_str())} { (w.state.as_str()) } }
                                    td { (w.pid.map(|p| p.to_string()).unwrap_or_default()) }
                                    td { (maybe_time(w.last_used_at)) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { a href="/ui/approvals" { "Pending approvals" } }
                @if pending.is_empty() {
                    p.muted { "Nothing waits for a decision." }
                } @else {
                    ul.plain {
                        @for a in &pending {
                            li {
                                a href={"/ui/jobs/" (a.job_id)} { (a.title.as_deref().unwrap_or("request")) }
                                " · " (a.channel) " · " (time(a.created_at))
                            }
                        }
                    }
                }
            }
            section {
                h2 { a href="/ui/schedules" { "Next schedules" } }
                @if schedules.is_empty() {
                    p.muted { "No schedule is due." }
                } @else {
                    ul.plain {
                        @for s in &schedules {
                            li {
                                (maybe_time(s.next_run_at)) " · " (s.channel) " · "
                                span.prompt { (view::first_line(&s.prompt, 60)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&viewer, Section::Overview, "Overview", body))
}
