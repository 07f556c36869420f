//! Jobs: the list (filters, keyset paging newest first), a job's page with its output live
//! over SSE, cancel and retry.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use maud::{html, Markup};
use serde::Deserialize;

use super::approvals::approval_form;
use super::session::{Checked, Viewer};
use super::view::{self, maybe_time, state, time, usd, Section};
use super::{DashError, DashResult};
use crate::http::HttpState;
use crate::store::{
    ApprovalFilter, ApprovalState, CancelOutcome, Event, EventKind, Job, JobFilter, JobState,
    NewJob, Source,
};

/// Jobs per page.
const PAGE: i64 = 50;
/// Most steps (tool calls, thoughts, …) a job's page shows: the latest ones.
const MAX_STEPS: usize = 200;
/// Shortest time between two renders of a live job.
const LIVE_MIN_GAP: Duration = Duration::from_millis(250);

#[derive(Deserialize, Default)]
pub struct ListQuery {
    state: Option<String>,
    channel: Option<String>,
    source: Option<String>,
    q: Option<String>,
    before: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

pub async fn list(
    viewer: Viewer,
    State(st): State<HttpState>,
    Query(q): Query<ListQuery>,
) -> DashResult<Response> {
    let bad = |what: &str, v: &str| DashError::BadRequest(format!("unknown {what} {v:?}"));
    let job_state = nonempty(&q.state)
        .map(|s| s.parse::<JobState>().map_err(|_| bad("state", s)))
        .transpose()?;
    let source = nonempty(&q.source)
        .map(|s| s.parse::<Source>().map_err(|_| bad("source", s)))
        .transpose()?;
    let before = nonempty(&q.before).map(str::to_string);
    if before
        .as_deref()
        .is_some_and(|b| b.len() > 64 || !b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'))
    {
        return Err(DashError::BadRequest("`before` is a job id".into()));
    }
    let text = nonempty(&q.q).map(str::to_string);
    if text.as_deref().is_some_and(|t| t.len() > 200) {
        return Err(DashError::BadRequest(
            "search for at most 200 characters".into(),
        ));
    }
    let channel = nonempty(&q.channel).map(str::to_string);
    let jobs = st
        .store
        .job_list(&JobFilter {
            state: job_state,
            channel: channel.clone(),
            source,
            text: text.clone(),
            before,
            limit: PAGE,
        })
        .await?;
    let channels = st.store.channel_list().await?;
    let next = (jobs.len() as i64 == PAGE).then(|| {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(s) = job_state {
            params.push(("state", s.as_str().into()));
        }
        if let Some(c) = &channel {
            params.push(("channel", c.clone()));
        }
        if let Some(s) = source {
            params.push(("source", s.as_str().into()));
        }
        if let Some(t) = &text {
            params.push(("q", t.clone()));
        }
        params.push((
            "before",
            jobs.last().map(|j| j.id.clone()).unwrap_or_default(),
        ));
        format!(
            "/ui/jobs?{}",
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    });
    let filtered = job_state.is_some() || channel.is_some() || source.is_some() || text.is_some();
    let body = html! {
        h1 { "Jobs" }
        form.filters method="get" action="/ui/jobs" role="search" {
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in JobState::ALL {
                        option value=(s.as_str()) selected[job_state == Some(*s)] { (s.as_str()) }
                    }
                }
            }
            label { "Channel "
                select name="channel" {
                    option value="" { "any" }
                    @for c in &channels {
                        option value=(c.name) selected[channel.as_deref() == Some(c.name.as_str())] { (c.name) }
                    }
                }
            }
            label { "Source "
                select name="source" {
                    option value="" { "any" }
                    @for s in Source::ALL {
                        option value=(s.as_str()) selected[source == Some(*s)] { (s.as_str()) }
                    }
                }
            }
            label { "Prompt contains "
                input type="search" name="q" value=(text.as_deref().unwrap_or("")) maxlength="200";
            }
            button type="submit" { "Filter" }
            @if filtered { " " a href="/ui/jobs" { "Clear" } }
        }
        @if jobs.is_empty() {
            section.empty {
                @if filtered {
                    p { "No job matches these filters. " a href="/ui/jobs" { "Show all jobs" } "." }
                } @else {
                    p { "No jobs yet. A prompt to a channel's webhook, its Matrix room, "
                        code { "gorp enqueue" } " or a " a href="/ui/schedules" { "schedule" } " makes one." }
                }
            }
        } @else {
            (jobs_table(&jobs))
            @if let Some(next) = next {
                p.pager { a href=(next) rel="next" { "Older jobs →" } }
            }
        }
    };
    Ok(view::page(&viewer, Section::Jobs, "Jobs", body))
}

/// A table of jobs, newest first.
pub fn jobs_table(jobs: &[Job]) -> Markup {
    html! {
        div.scroll {
            table.jobs {
                thead { tr { th { "job" } th { "state" } th { "channel" } th { "source" } th { "prompt" } th { "created" } th { "attempts" } } }
                tbody {
                    @for j in jobs {
                        tr {
                            td { a.mono href={"/ui/jobs/" (j.id)} { (short(&j.id)) } }
                            td { (state(j.state)) }
                            td { (j.channel) }
                            td { (j.source.as_str()) }
                            td.prompt { (view::first_line(&j.prompt, 80)) }
                            td { (time(j.created_at)) }
                            td { (j.attempt) "/" (j.max_attempts) }
                        }
                    }
                }
            }
        }
    }
}

/// The first 13 characters of a job id (its time part): what people say and type.
pub fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

async fn job_or_404(st: &HttpState, id: &str) -> DashResult<Job> {
    if id.len() > 64 {
        return Err(DashError::NotFound("no such job".into()));
    }
    st.store
        .job_get(id)
        .await?
        .ok_or_else(|| DashError::NotFound(format!("no job {id}")))
}

pub async fn page(
    viewer: Viewer,
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> DashResult<Response> {
    let job = job_or_404(&st, &id).await?;
    let live = live_body(&st, &viewer, &job).await?;
    let body = html! {
        p.crumbs { a href="/ui/jobs" { "Jobs" } " / " span.mono { (short(&job.id)) } }
        h1 { "Job " span.mono { (short(&job.id)) } }
        dl.facts {
            dt { "Channel" } dd { a href={"/ui/channels/" (job.channel)} { (job.channel) } }
            dt { "Source" } dd { (job.source.as_str()) }
            dt { "Created" } dd { (time(job.created_at)) }
            dt { "Id" } dd.mono { (job.id) }
        }
        h2 { "Prompt" }
        pre.prompt { (job.prompt) }
        section id="job-live" data-live={"/ui/jobs/" (job.id) "/live"} aria-live="polite" {
            (live)
        }
    };
    Ok(view::page(
        &viewer,
        Section::Jobs,
        &format!("Job {}", short(&job.id)),
        body,
    ))
}

/// The part of a job's page that follows the job: state, actions, pending approvals, output,
/// timeline, usage.
async fn live_body(st: &HttpState, viewer: &Viewer, job: &Job) -> DashResult<Markup> {
    let events = st.store.job_events_list(&job.id, 0, 100_000).await?;
    let output = st.store.job_output(&job.id).await?;
    let usage = st.store.job_usage(&job.id).await?;
    let pending = if job.state == JobState::Running {
        st.store
            .approval_list(&ApprovalFilter {
                state: Some(ApprovalState::Pending),
                job_id: Some(job.id.clone()),
                limit: 20,
                ..Default::default()
            })
            .await?
    } else {
        Vec::new()
    };
    let held = if job.state == JobState::Queued {
        st.store.job_held_reason(&job.id).await?
    } else {
        None
    };
    let active = !job.state.is_terminal();
    let attempt_events: Vec<&Event> = events.iter().filter(|e| e.attempt == job.attempt).collect();
    Ok(html! {
        div.status {
            (state(job.state))
            span { " attempt " (job.attempt) " of " (job.max_attempts) }
            @if job.cancel_requested && active { span.note { " · cancel requested" } }
            @if let Some(r) = &job.stop_reason { span { " · stop reason " code { (r) } } }
            span { " · started " (maybe_time(job.started_at)) }
            @if let Some(f) = job.finished_at { span { " · finished " (time(f)) } }
        }
        div.actions {
            @if active {
                (view::post_button(viewer, &format!("/ui/jobs/{}/cancel", job.id), "Cancel job", "danger", &[]))
            }
            (view::post_button(viewer, &format!("/ui/jobs/{}/retry", job.id), "Run again", "", &[]))
        }
        @if let Some(why) = &held {
            p.flash.error role="status" { "⏸ " (why) }
        }
        @if let Some(e) = &job.error {
            p.flash.error { (e) }
        }
        @for a in &pending {
            (approval_form(viewer, a, &format!("/ui/jobs/{}", job.id)))
        }
        h2 { "Output" }
        @if output.trim().is_empty() {
            p.muted { @if active { "No output yet." } @else { "The agent wrote nothing." } }
        } @else {
            div.output { (view::markdown(&output)) }
        }
        @let steps: Vec<&&Event> = attempt_events.iter().filter(|e| is_step(e)).collect();
        @let skipped = steps.len().saturating_sub(MAX_STEPS);
        @if !steps.is_empty() {
            h2 { "Steps" }
            @if skipped > 0 {
                p.muted { (skipped) " earlier steps are not shown; " code { "gorp job " (job.id) } " lists every event." }
            }
            ol.steps start=(skipped + 1) {
                @for e in &steps[skipped..] { li { (step(e)) } }
            }
        }
        h2 { "Timeline" }
        ol.timeline {
            @for e in events.iter().filter(|e| is_milestone(e)) {
                li { (time(e.at)) " " span.kind { (e.kind) } " " span.muted { "#" (e.attempt) } " " (e.text.as_deref().map(|t| view::first_line(t, 300)).unwrap_or_default()) }
            }
            li { (maybe_time(job.finished_at.or(Some(job.created_at)))) " " (state(job.state)) }
        }
        @if !usage.is_empty() {
            h2 { "Usage" }
            table {
                thead { tr { th { "attempt" } th { "tokens in" } th { "tokens out" } th { "cache r/w" } th { "cost" } th { "agent time" } } }
                tbody {
                    @for u in &usage {
                        tr {
                            td { (u.attempt) }
                            td { (u.input_tokens) }
                            td { (u.output_tokens) }
                            td { (u.cache_read_tokens) "/" (u.cache_write_tokens) }
                            td { (usd(Some(u.cost_usd))) }
                            td { (format!("{:.1} s", u.agent_ms as f64 / 1000.0)) }
                        }
                    }
                }
            }
        }
    })
}

/// Events that show as steps of the current attempt: tool calls, plans, thoughts, permissions.
fn is_step(e: &Event) -> bool {
    [
        EventKind::ToolCall,
        EventKind::Plan,
        EventKind::Thought,
        EventKind::Permission,
        EventKind::Answer,
        EventKind::FsDenied,
    ]
    .iter()
    .any(|k| e.kind == *k)
}

/// Events that mark the job's life: attempts, errors, retries, restarts, holds, cancels.
fn is_milestone(e: &Event) -> bool {
    [
        EventKind::Started,
        EventKind::Error,
        EventKind::RetryScheduled,
        EventKind::Released,
        EventKind::Rescued,
        EventKind::Budget,
        EventKind::Held,
        EventKind::CancelRequested,
        EventKind::Cancelled,
        EventKind::PermissionRequest,
        EventKind::Question,
    ]
    .iter()
    .any(|k| e.kind == *k)
}

/// One step: a tool call (collapsible, with its input), a plan, a folded thought, a decision.
fn step(e: &Event) -> Markup {
    let text = e.text.as_deref().unwrap_or("");
    let data = e.data.as_ref();
    let field = |k: &str| data.and_then(|d| d.get(k)).and_then(|v| v.as_str());
    if e.kind == EventKind::ToolCall {
        let raw = data
            .and_then(|d| d.get("rawInput"))
            .map(|v| serde_json::to_string_pretty(v).unwrap_or_default());
        return html! {
            details id={"ev-" (e.seq)} {
                summary { "🔧 " (view::first_line(text, 160)) " " span.muted { (field("kind").unwrap_or("")) } }
                @if let Some(raw) = raw { pre { (raw) } }
            }
        };
    }
    if e.kind == EventKind::Thought {
        return html! {
            details id={"ev-" (e.seq)} {
                summary { "💭 thought" }
                div.thought { (text) }
            }
        };
    }
    if e.kind == EventKind::Plan {
        return html! {
            div { "📋 plan" ul { @for line in text.lines() { li { (line) } } } }
        };
    }
    html! { span.kind { (e.kind) } " " (view::first_line(text, 300)) }
}

/// The live part of a job's page as an SSE stream: a `render` event with the new HTML each
/// time the job's rows change (at most every [`LIVE_MIN_GAP`]), then `end` once it has ended.
pub async fn live(
    viewer: Viewer,
    State(st): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> DashResult<Response> {
    let job = job_or_404(&st, &id).await?;
    if !view::wants_sse(&headers) {
        return Ok(live_body(&st, &viewer, &job).await?.into_response());
    }
    Ok(Sse::new(live_stream(st, viewer, id))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn live_stream(
    st: HttpState,
    viewer: Viewer,
    id: String,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let commits = st.store.subscribe_commits();
    // (state, last seq) last rendered; the page itself showed the first render.
    let seen: Option<(JobState, i64, bool)> = None;
    stream::unfold(Some((st, viewer, id, commits, seen)), |s| async move {
        let (st, viewer, id, mut commits, mut seen) = s?;
        loop {
            commits.borrow_and_update();
            let job = st.store.job_get(&id).await.ok().flatten()?;
            let last = st
                .store
                .job_events_list(&id, seen.map_or(0, |s| s.1), 100_000)
                .await
                .ok()?
                .last()
                .map(|e| e.seq)
                .or(seen.map(|s| s.1))
                .unwrap_or(0);
            let now = (job.state, last, job.cancel_requested);
            if seen != Some(now) {
                seen = Some(now);
                let html = live_body(&st, &viewer, &job).await.ok()?.into_string();
                let ev = SseEvent::default().event("render").data(html);
                let end = job.state.is_terminal();
                let mut out = vec![Ok(ev)];
                if end {
                    out.push(Ok(SseEvent::default()
                        .event("end")
                        .data(job.state.as_str())));
                }
                let next = (!end).then_some((st, viewer, id, commits, seen));
                return Some((stream::iter(out), next));
            }
            tokio::time::sleep(LIVE_MIN_GAP).await;
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(1), commits.changed()) => {}
                _ = st.shutdown.cancelled() => return None,
            }
        }
    })
    .flatten()
}

pub async fn cancel(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    checked: Checked<std::collections::HashMap<String, String>>,
) -> Response {
    let _ = &checked.viewer;
    let back = format!("/ui/jobs/{id}");
    if let Err(e) = job_or_404(&st, &id).await {
        return e.into_response();
    }
    match crate::service::jobs::cancel(&st.store, st.pool.as_ref(), &id).await {
        Ok(CancelOutcome::Cancelled) => view::done(&back, "Cancelled."),
        Ok(CancelOutcome::Requested) => {
            view::done(&back, "Cancel requested: the agent is told to stop.")
        }
        Ok(other) => view::done(&back, &format!("Nothing to cancel: {other:?}")),
        Err(e) => view::refused(&back, &DashError::from(e)),
    }
}

/// Runs the job's prompt again as a new job of the same channel and source (and the same
/// Matrix reply target), without its idempotency key.
pub async fn retry(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    checked: Checked<std::collections::HashMap<String, String>>,
) -> Response {
    let _ = &checked.viewer;
    let job = match job_or_404(&st, &id).await {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let mut new = NewJob::new(job.channel_id, job.source, job.prompt.clone());
    new.priority = job.priority;
    new.max_attempts = job.max_attempts;
    new.reply_target = job.reply_target.clone();
    new.timeout_secs = job.timeout_secs;
    new.max_cost_usd = job.max_cost_usd;
    match crate::service::jobs::enqueue(&st.store, new, std::time::Instant::now()).await {
        Ok(e) => {
            tracing::info!(job = %e.job_id, of = %id, "job run again from the dashboard");
            view::done(
                &format!("/ui/jobs/{}", e.job_id),
                &format!("Queued again as a new job (from {}).", short(&id)),
            )
        }
        Err(e) => view::refused(&format!("/ui/jobs/{id}"), &DashError::from(e)),
    }
}
