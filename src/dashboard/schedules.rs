//! Schedules: the list with pause, resume and remove; a form to add one, with a live preview of
//! its next fire times.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::session::{Checked, Viewer};
use super::view::{self, maybe_time, Section};
use super::{DashError, DashResult};
use crate::http::HttpState;
use crate::service::schedules::{self, AddSchedule, ScheduleError, When};
use crate::store::{now_ms, Millis};

/// Fire times the preview shows.
const PREVIEW: usize = 5;

pub async fn list(viewer: Viewer, State(st): State<HttpState>) -> DashResult<Response> {
    let list = st.store.schedule_list().await?;
    let channels = st.store.channel_list().await?;
    let tz = schedules::default_timezone(&st.config);
    let body = html! {
        h1 { "Schedules" }
        @if list.is_empty() {
            section.empty { p { "No schedules yet. Add one below: a cron expression, " code { "in 30m" } ", or a time." } }
        } @else {
            div.scroll {
                table {
                    thead { tr { th { "id" } th { "channel" } th { "when" } th { "next" } th { "last fired" } th { "prompt" } th { "" } } }
                    tbody {
                        @for s in &list {
                            tr {
                                td { (s.id) }
                                td { a href={"/ui/channels/" (s.channel)} { (s.channel) } }
                                td { code { (s.cron.as_deref().unwrap_or("once")) } " " span.muted { (s.timezone) } }
                                td {
                                    @if s.done { span.muted { "done" } }
                                    @else if !s.enabled { span.state.state-cancelled { "paused" } }
                                    @else { (maybe_time(s.next_run_at)) }
                                }
                                td { (maybe_time(s.last_fired_at)) }
                                td.prompt { (view::first_line(&s.prompt, 60)) }
                                td.actions {
                                    @if !s.done {
                                        @if s.enabled {
                                            (view::post_button(&viewer, &format!("/ui/schedules/{}/pause", s.id), "Pause", "", &[]))
                                        } @else {
                                            (view::post_button(&viewer, &format!("/ui/schedules/{}/resume", s.id), "Resume", "", &[]))
                                        }
                                    }
                                    (view::post_button(&viewer, &format!("/ui/schedules/{}/remove", s.id), "Remove", "danger", &[]))
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "New schedule" }
            @if channels.is_empty() {
                p.muted { "Create a " a href="/ui/channels" { "channel" } " first." }
            } @else {
                form.stack method="post" action="/ui/schedules" {
                    (view::csrf(&viewer))
                    label for="channel" { "Channel" }
                    select id="channel" name="channel" required {
                        @for c in &channels { option value=(c.name) { (c.name) } }
                    }
                    label for="when" { "When " span.muted { "(cron such as " code { "0 9 * * 1-5" } ", " code { "in 30m" } ", or 2026-12-24T09:00:00+01:00)" } }
                    input id="when" name="when" required maxlength="200" data-preview="/ui/schedules/preview" data-preview-target="when-preview" data-preview-tz="timezone";
                    label for="timezone" { "Time zone" }
                    input id="timezone" name="timezone" value=(tz) maxlength="64";
                    div id="when-preview" aria-live="polite" { p.muted { "The next fire times show here as you type." } }
                    label for="prompt" { "Prompt" }
                    textarea id="prompt" name="prompt" required rows="4" {}
                    button type="submit" { "Add schedule" }
                }
            }
        }
    };
    Ok(view::page(&viewer, Section::Schedules, "Schedules", body))
}

#[derive(Deserialize)]
pub struct PreviewQuery {
    when: Option<String>,
    timezone: Option<String>,
}

/// The next fire times of `when` in `timezone` (an HTML fragment), or why it is refused.
pub async fn preview(
    _viewer: Viewer,
    State(st): State<HttpState>,
    Query(q): Query<PreviewQuery>,
) -> Markup {
    let when = q.when.unwrap_or_default();
    if when.trim().is_empty() {
        return html! { p.muted { "The next fire times show here as you type." } };
    }
    match upcoming(&st, &when, q.timezone.as_deref(), now_ms()) {
        Ok((tz, times)) => html! {
            p { "Next in " (tz) ":" }
            ol.preview { @for t in times { li { (t) } } }
        },
        Err(e) => html! { p.error-text role="alert" { (e) } },
    }
}

fn upcoming(
    st: &HttpState,
    when: &str,
    tz: Option<&str>,
    now: Millis,
) -> Result<(String, Vec<String>), ScheduleError> {
    let tz_name = tz
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| schedules::default_timezone(&st.config));
    let tz = schedules::parse_tz(&tz_name)?;
    let fmt = |t: chrono::DateTime<chrono_tz::Tz>| t.format("%a %Y-%m-%d %H:%M:%S %Z").to_string();
    let times = match schedules::parse_when(when, now)? {
        When::Once(at) => {
            let t = chrono::DateTime::from_timestamp_millis(at)
                .unwrap_or_default()
                .with_timezone(&tz);
            vec![format!("{} (once)", fmt(t))]
        }
        When::Cron { cron, expr } => {
            let v: Vec<String> = schedules::upcoming(&cron, tz, now, PREVIEW)
                .into_iter()
                .map(fmt)
                .collect();
            if v.is_empty() {
                return Err(ScheduleError::Invalid(format!(
                    "cron expression {expr:?} never fires"
                )));
            }
            v
        }
    };
    Ok((tz.name().to_string(), times))
}

pub async fn add(
    State(st): State<HttpState>,
    checked: Checked<HashMap<String, String>>,
) -> Response {
    let form = &checked.form;
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let req = AddSchedule {
        channel: get("channel"),
        when: get("when"),
        prompt: get("prompt"),
        timezone: Some(get("timezone")).filter(|t| !t.trim().is_empty()),
        catch_up: None,
        overlap: None,
        created_by: "dashboard".into(),
    };
    match schedules::add(&st.store, &st.config, req, now_ms()).await {
        Ok(s) => {
            tracing::info!(schedule = s.id, channel = %s.channel, "schedule added from the dashboard");
            view::done("/ui/schedules", &format!("Schedule {} added.", s.id))
        }
        Err(ScheduleError::Store(e)) => view::refused("/ui/schedules", &DashError::from(e)),
        Err(e) => view::refused("/ui/schedules", &DashError::BadRequest(e.to_string())),
    }
}

pub async fn act(
    State(st): State<HttpState>,
    Path((id, action)): Path<(String, String)>,
    _checked: Checked<HashMap<String, String>>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return DashError::NotFound(format!("no schedule {id:?}")).into_response();
    };
    let result = match action.as_str() {
        "pause" => schedules::pause(&st.store, id).await,
        "resume" => schedules::resume(&st.store, id, now_ms()).await,
        "remove" => schedules::remove(&st.store, id).await,
        _ => return DashError::NotFound(format!("no action {action:?}")).into_response(),
    };
    match result {
        Ok(true) => view::done("/ui/schedules", &format!("Schedule {id}: {action}d.")),
        Ok(false) => view::refused(
            "/ui/schedules",
            &DashError::NotFound(format!("no schedule {id} to {action}")),
        ),
        Err(ScheduleError::Store(e)) => view::refused("/ui/schedules", &DashError::from(e)),
        Err(e) => view::refused("/ui/schedules", &DashError::BadRequest(e.to_string())),
    }
}
