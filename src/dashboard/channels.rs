//! Channels: the list and a form to create one; a channel's page with its policy, budgets,
//! webhook URL, token rotation, warm state (warm now, stop) and recent jobs.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::jobs::jobs_table;
use super::session::{Checked, Viewer};
use super::view::{self, maybe_time, usd, Section};
use super::{DashError, DashResult};
use crate::budget::{spend_lines, SpendPolicy};
use crate::http::HttpState;
use crate::service::channels::{self, Changes, ChannelError, NewChannelSpec};
use crate::store::{now_ms, Channel, JobFilter, PermissionPolicy};

pub async fn list(viewer: Viewer, State(st): State<HttpState>) -> DashResult<Response> {
    let list = st.store.channel_list().await?;
    let depths = st.store.channel_depths().await?;
    let warm = st.store.warm_list().await?;
    let body = html! {
        h1 { "Channels" }
        @if list.is_empty() {
            section.empty {
                p { "No channels yet. A channel is one conversation with one agent, with its own workspace, webhook and (optionally) Matrix room. Create the first one below." }
            }
        } @else {
            div.scroll {
                table {
                    thead { tr { th { "channel" } th { "policy" } th { "queued" } th { "running" } th { "agent" } } }
                    tbody {
                        @for c in &list {
                            @let d = depths.iter().find(|d| d.channel == c.name);
                            @let w = warm.iter().find(|w| w.channel_id == c.id);
                            tr {
                                td { a href={"/ui/channels/" (c.name)} { (c.name) } }
                                td { (c.permission_policy.as_str()) }
                                td { (d.map_or(0, |d| d.queued)) }
                                td { (d.map_or(0, |d| d.running)) }
                                td { (w.map(|w| w.state.as_str()).unwrap_or("stopped")) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "New channel" }
            form.stack method="post" action="/ui/channels" {
                (view::csrf(&viewer))
                label for="name" { "Name " span.muted { "(lowercase letters, digits, - and _; also the workspace directory)" } }
                input id="name" name="name" required maxlength="64" pattern="[a-z0-9][a-z0-9_\\-]{0,63}";
                label for="policy" { "Permission policy" }
                select id="policy" name="permission_policy" {
                    option value="" { "default (" (st.config.acp.permission_policy.as_str()) ")" }
                    @for p in PermissionPolicy::ALL { option value=(p.as_str()) { (p.as_str()) } }
                }
                button type="submit" { "Create channel" }
            }
        }
    };
    Ok(view::page(&viewer, Section::Channels, "Channels", body))
}

/// Creates a channel and shows its webhook token once (the page answers the POST; only the
/// token's hash is stored).
pub async fn create(
    State(st): State<HttpState>,
    checked: Checked<HashMap<String, String>>,
) -> Response {
    let form = &checked.form;
    let name = form
        .get("name")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let policy = match form
        .get("permission_policy")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(p) => match p.parse::<PermissionPolicy>() {
            Ok(p) => Some(p),
            Err(e) => return view::refused("/ui/channels", &DashError::BadRequest(e.to_string())),
        },
    };
    let spec = NewChannelSpec {
        name: name.clone(),
        permission_policy: policy,
        ..Default::default()
    };
    let created = match channels::create(&st.store, &st.config, spec).await {
        Ok(c) => c,
        Err(ChannelError::Store(e)) => return view::refused("/ui/channels", &DashError::from(e)),
        Err(e) => return view::refused("/ui/channels", &DashError::BadRequest(e.to_string())),
    };
    tracing::info!(channel = %name, "channel created from the dashboard");
    let url = format!("{}{}", st.config.public_url(), created.webhook_path());
    let body = html! {
        h1 { "Channel " (created.channel.name) " created" }
        p { "Workspace: " code { (created.workspace.display()) } }
        (token_box(&url, &created.webhook_token))
        p { a href={"/ui/channels/" (created.channel.name)} { "Go to the channel" } }
    };
    view::page(&checked.viewer, Section::Channels, "Channel created", body)
}

fn token_box(url: &str, token: &str) -> Markup {
    html! {
        section.token role="status" {
            p { strong { "The webhook token, shown this once:" } }
            pre.mono id="webhook-token" { (token) }
            p { "Send prompts with:" }
            pre { "curl -H 'Authorization: Bearer " (token) "' -d '{\"prompt\": \"hello\"}' \\\n  " (url) }
        }
    }
}

async fn channel_or_404(st: &HttpState, name: &str) -> DashResult<Channel> {
    st.store
        .channel_get(name)
        .await?
        .ok_or_else(|| DashError::NotFound(format!("no channel {name:?}")))
}

pub async fn page(
    viewer: Viewer,
    State(st): State<HttpState>,
    Path(name): Path<String>,
) -> DashResult<Response> {
    let ch = channel_or_404(&st, &name).await?;
    let warm = st.store.warm_get(ch.id).await?;
    let jobs = st
        .store
        .job_list(&JobFilter {
            channel: Some(ch.name.clone()),
            limit: 10,
            ..Default::default()
        })
        .await?;
    let policy = SpendPolicy::from_config(&st.config);
    let now = now_ms();
    let spend = st
        .store
        .channel_spend(&policy.limits(now), Some(&ch.name))
        .await?;
    let b = &st.config.budget;
    let base = format!("/ui/channels/{}", ch.name);
    let url = format!("{}{}", st.config.public_url(), channels::webhook_path(&ch));
    let cost = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let body = html! {
        p.crumbs { a href="/ui/channels" { "Channels" } " / " (ch.name) }
        h1 { (ch.name) }
        dl.facts {
            dt { "Webhook" } dd.mono { (url) }
            dt { "Matrix room" } dd { (ch.matrix_room_id.as_deref().unwrap_or("—")) }
            dt { "Agent" } dd { (ch.agent_binary.as_deref().unwrap_or("the default ([acp] agent_binary)")) }
            dt { "Sandbox" } dd { (ch.sandbox.map(|s| s.to_string()).unwrap_or_else(|| "default ([acp] sandbox)".into())) }
        }
        div.grid {
            section {
                h2 { "Agent" }
                p {
                    @match &warm {
                        Some(w) => {
                            span class={"warm warm-" (w.state.as_str())} { (w.state.as_str()) }
                            @if let Some(pid) = w.pid { " · pid " (pid) }
                            " · last used " (maybe_time(w.last_used_at))
                            @if let Some(e) = &w.error { br; span.muted { (e) } }
                        }
                        None => { span.warm { "stopped" } " · starts with the next job" }
                    }
                }
                div.actions {
                    (view::post_button(&viewer, &format!("{base}/warm"), "Warm now", "", &[]))
                    (view::post_button(&viewer, &format!("{base}/stop"), "Stop agent", "danger", &[]))
                }
            }
            section {
                h2 { "Webhook token" }
                p.muted { "Only its hash is stored. A new token stops the old one at once." }
                (view::post_button(&viewer, &format!("{base}/token"), "Rotate token", "danger", &[]))
            }
        }
        section {
            h2 { "Settings" }
            form.stack method="post" action={(base) "/settings"} {
                (view::csrf(&viewer))
                label for="permission_policy" { "Permission policy" }
                select id="permission_policy" name="permission_policy" {
                    @for p in PermissionPolicy::ALL {
                        option value=(p.as_str()) selected[ch.permission_policy == *p] { (p.as_str()) }
                    }
                }
                fieldset {
                    legend { "Budgets (USD; empty: the config's)" }
                    label for="budget_job_usd" { "Per job " span.muted { "(config: " (usd(b.job_max_cost_usd)) ")" } }
                    input id="budget_job_usd" name="budget_job_usd" inputmode="decimal" value=(cost(ch.budget_job_usd));
                    label for="budget_day_usd" { "Per day " span.muted { "(config: " (usd(b.daily_max_cost_usd)) ")" } }
                    input id="budget_day_usd" name="budget_day_usd" inputmode="decimal" value=(cost(ch.budget_day_usd));
                    label for="budget_month_usd" { "Per month " span.muted { "(config: " (usd(b.monthly_max_cost_usd)) ")" } }
                    input id="budget_month_usd" name="budget_month_usd" inputmode="decimal" value=(cost(ch.budget_month_usd));
                }
                button type="submit" { "Save" }
            }
            @for s in &spend {
                ul.plain { @for line in spend_lines(&policy, s, now) { li { (line) } } }
            }
        }
        section {
            h2 { "Recent jobs" }
            @if jobs.is_empty() {
                p.muted { "No jobs yet. Send the first prompt to the webhook above." }
            } @else {
                (jobs_table(&jobs))
                p { a href={"/ui/jobs?channel=" (ch.name)} { "All jobs of " (ch.name) } }
            }
        }
    };
    Ok(view::page(&viewer, Section::Channels, &ch.name, body))
}

/// A budget field: empty goes back to the config's; anything else must be a cost.
fn budget_field(
    form: &HashMap<String, String>,
    key: &str,
) -> Result<Option<Option<f64>>, DashError> {
    match form.get(key).map(|s| s.trim()) {
        None => Ok(None),
        Some("") => Ok(Some(None)),
        Some(v) => v
            .trim_start_matches('$')
            .parse::<f64>()
            .map(|c| Some(Some(c)))
            .map_err(|_| DashError::BadRequest(format!("{key}: {v:?} is not a number of USD"))),
    }
}

pub async fn settings(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    checked: Checked<HashMap<String, String>>,
) -> Response {
    let back = format!("/ui/channels/{name}");
    if let Err(e) = channel_or_404(&st, &name).await {
        return e.into_response();
    }
    let form = &checked.form;
    let changes = (|| -> Result<Changes, DashError> {
        let policy = match form.get("permission_policy") {
            Some(p) => Some(
                p.parse::<PermissionPolicy>()
                    .map_err(|e| DashError::BadRequest(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Changes {
            permission_policy: policy,
            budget_job_usd: budget_field(form, "budget_job_usd")?,
            budget_day_usd: budget_field(form, "budget_day_usd")?,
            budget_month_usd: budget_field(form, "budget_month_usd")?,
            ..Default::default()
        })
    })();
    let changes = match changes {
        Ok(c) => c,
        Err(e) => return view::refused(&back, &e),
    };
    match channels::update(&st.store, &name, changes).await {
        Ok(Some(_)) => {
            tracing::info!(channel = %name, "channel settings changed from the dashboard");
            view::done(&back, "Saved.")
        }
        Ok(None) => DashError::NotFound(format!("no channel {name:?}")).into_response(),
        Err(e) => view::refused(&back, &DashError::from(e)),
    }
}

pub async fn rotate_token(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    checked: Checked<HashMap<String, String>>,
) -> Response {
    match channels::rotate_token(&st.store, &name).await {
        Ok((ch, token)) => {
            tracing::info!(channel = %name, "webhook token rotated from the dashboard");
            let url = format!("{}{}", st.config.public_url(), channels::webhook_path(&ch));
            let body = html! {
                h1 { "New token for " (ch.name) }
                p { "The old token no longer works." }
                (token_box(&url, &token))
                p { a href={"/ui/channels/" (ch.name)} { "Back to the channel" } }
            };
            view::page(&checked.viewer, Section::Channels, "New token", body)
        }
        Err(e) => DashError::from(e).into_response(),
    }
}

/// The channel and this process's agent pool, for the agent's buttons; else the response.
async fn channel_and_pool(
    st: &HttpState,
    name: &str,
) -> Result<
    (
        Channel,
        std::sync::Arc<crate::agent::pool::WarmSessionManager>,
    ),
    Response,
> {
    let ch = channel_or_404(st, name)
        .await
        .map_err(IntoResponse::into_response)?;
    let pool = st.warm.clone().ok_or_else(|| {
        view::refused(
            &format!("/ui/channels/{name}"),
            &DashError::Conflict("no agent pool runs in this process".into()),
        )
    })?;
    Ok((ch, pool))
}

pub async fn warm(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    _checked: Checked<HashMap<String, String>>,
) -> Response {
    let back = format!("/ui/channels/{name}");
    let (ch, pool) = match channel_and_pool(&st, &name).await {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    // Starting an agent can take a while: it goes on in the background.
    tokio::spawn(async move {
        if let Err(e) = pool.pre_warm(&ch).await {
            tracing::warn!(channel = %ch.name, error = %e, "cannot warm the agent");
        }
    });
    view::done(&back, "Starting the agent; its state shows here.")
}

pub async fn stop(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    _checked: Checked<HashMap<String, String>>,
) -> Response {
    let back = format!("/ui/channels/{name}");
    let (ch, pool) = match channel_and_pool(&st, &name).await {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    if pool.stop_idle(ch.id, "stopped from the dashboard").await {
        view::done(
            &back,
            "Agent stopped. The next job starts a new one and resumes the conversation.",
        )
    } else {
        view::done(
            &back,
            "No idle agent to stop (none runs, or a job is using it).",
        )
    }
}
