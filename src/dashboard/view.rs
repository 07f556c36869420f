//! The layout every page shares, the login and logout, and small pieces of markup: times,
//! states, buttons that post a form with the CSRF token.

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;

use super::session::{self, Viewer, FLASH_COOKIE, LOGIN_COOKIE, SESSION_COOKIE};
use super::DashError;
use crate::http::HttpState;
use crate::store::{JobState, Millis};

/// The sections of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Jobs,
    Channels,
    Schedules,
    Approvals,
}

const SECTIONS: [(Section, &str, &str); 5] = [
    (Section::Overview, "Overview", "/ui/"),
    (Section::Jobs, "Jobs", "/ui/jobs"),
    (Section::Channels, "Channels", "/ui/channels"),
    (Section::Schedules, "Schedules", "/ui/schedules"),
    (Section::Approvals, "Approvals", "/ui/approvals"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="color-scheme" content="light dark";
            title { (title) " · gorp" }
            link rel="stylesheet" href="/ui/assets/gorp.css";
            script src="/ui/assets/gorp.js" defer {}
        }
    }
}

/// A whole page for a signed-in viewer. The flash message of the previous action is shown once
/// (its cookie is cleared by the response).
pub fn page(viewer: &Viewer, section: Section, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "gorp" }
                    nav aria-label="Sections" {
                        @for (s, label, href) in SECTIONS {
                            @if s == section {
                                a href=(href) aria-current="page" { (label) }
                            } @else {
                                a href=(href) { (label) }
                            }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        input type="hidden" name="_csrf" value=(viewer.csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main id="main" {
                    @if let Some(flash) = &viewer.flash {
                        @let error = flash.starts_with("Error:");
                        p.flash.error[error] role="status" { (flash) }
                    }
                    (body)
                }
            }
        }
    };
    let mut resp = markup.into_response();
    if viewer.flash.is_some() {
        resp.headers_mut()
            .append(header::SET_COOKIE, session::set_cookie(FLASH_COOKIE, "", 0));
    }
    resp
}

/// A page without a session (login, errors).
pub fn bare_page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare {
                main id="main" { (body) }
            }
        }
    }
}

pub fn error_page(status: StatusCode, message: &str) -> Markup {
    bare_page(
        status.canonical_reason().unwrap_or("Error"),
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error-text { (message) }
            p { a href="/ui/" { "Back to the dashboard" } }
        },
    )
}

/// A redirect after a form (303, so the browser GETs the next page), with a flash message.
pub fn done(to: &str, message: &str) -> Response {
    let mut resp = Redirect::to(to).into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, session::flash_cookie(message));
    resp
}

/// [`done`] with the error as the message (`Error: …`), for a form whose input was refused:
/// the page shows why, and nothing was written.
pub fn refused(to: &str, e: &DashError) -> Response {
    done(to, &format!("Error: {e}"))
}

/// A time: UTC text in the page, turned into relative text in the viewer's zone by the script
/// (with the full local time as its title).
pub fn time(ms: Millis) -> Markup {
    let iso = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default();
    html! { time datetime=(iso) { (crate::store::format_ms(ms)) } }
}

pub fn maybe_time(ms: Option<Millis>) -> Markup {
    match ms {
        Some(ms) => time(ms),
        None => html! { span.muted { "—" } },
    }
}

/// A job state: its colour and its name (never colour alone).
pub fn state(s: JobState) -> Markup {
    let mark = match s {
        JobState::Queued => "○",
        JobState::Running => "◐",
        JobState::Succeeded => "✓",
        JobState::Failed => "✗",
        JobState::Cancelled => "⊘",
    };
    html! { span class={"state state-" (s.as_str())} { span aria-hidden="true" { (mark) } " " (s.as_str()) } }
}

/// A button that posts to `action` with the CSRF token (and `fields`).
pub fn post_button(
    viewer: &Viewer,
    action: &str,
    label: &str,
    class: &str,
    fields: &[(&str, &str)],
) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="_csrf" value=(viewer.csrf);
            @for (k, v) in fields {
                input type="hidden" name=(k) value=(v);
            }
            button type="submit" class=(class) { (label) }
        }
    }
}

/// The hidden CSRF field of a form.
pub fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name="_csrf" value=(viewer.csrf); }
}

/// Untrusted Markdown (agent output) as safe HTML.
pub fn markdown(md: &str) -> Markup {
    PreEscaped(crate::markdown::markdown_to_html(md))
}

/// `USD` with four decimals, or a dash.
pub fn usd(c: Option<f64>) -> String {
    c.map(|c| format!("${c:.4}")).unwrap_or_else(|| "—".into())
}

/// The first line of `text`, at most `max` characters.
pub fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

// ---- login and logout ------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

pub async fn login_page(State(st): State<HttpState>, Query(q): Query<LoginQuery>) -> Response {
    if st.config.webhook.tokens.is_empty() {
        return DashError::Off.into_response();
    }
    let nonce = crate::auth::new_token();
    let next = q
        .next
        .filter(|n| session::safe_next(n))
        .unwrap_or_else(|| "/ui/".into());
    let error = match q.error.as_deref() {
        Some("token") => Some("That token is not one of the API tokens."),
        Some("form") => Some("The login form expired; try again."),
        _ => None,
    };
    let body = bare_page(
        "Log in",
        html! {
            div.login {
                h1 { "gorp" }
                p { "Log in with one of the API tokens (" code { "[webhook] tokens" } ")." }
                @if let Some(e) = error {
                    p.flash.error role="alert" { (e) }
                }
                form method="post" action="/ui/login" {
                    input type="hidden" name="_login" value=(nonce);
                    input type="hidden" name="next" value=(next);
                    label for="token" { "API token" }
                    input id="token" name="token" type="password" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
            }
        },
    );
    let mut resp = body.into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(LOGIN_COOKIE, &nonce, 600),
    );
    resp
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(rename = "_login", default)]
    login: String,
    #[serde(default)]
    token: String,
    next: Option<String>,
}

pub async fn login(State(st): State<HttpState>, req: Request) -> Response {
    if st.config.webhook.tokens.is_empty() {
        return DashError::Off.into_response();
    }
    let (parts, body) = req.into_parts();
    if let Err(e) = session::same_origin(&parts.headers) {
        return e.into_response();
    }
    let bytes = match session::read_form(&parts.headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&bytes) else {
        return DashError::BadRequest("invalid login form".into()).into_response();
    };
    let next = form
        .next
        .filter(|n| session::safe_next(n))
        .unwrap_or_else(|| "/ui/".into());
    let q = |error: &str| {
        serde_urlencoded::to_string([("next", next.as_str()), ("error", error)]).unwrap_or_default()
    };
    let expected = session::cookie(&parts.headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !session::tokens_equal(&form.login, expected) {
        return Redirect::to(&format!("/ui/login?{}", q("form"))).into_response();
    }
    if !crate::auth::token_in(&form.token, &st.config.webhook.tokens) {
        tracing::warn!("dashboard login with a wrong token");
        return Redirect::to(&format!("/ui/login?{}", q("token"))).into_response();
    }
    let secret = match session::open(&st, &form.token).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    tracing::info!("dashboard login");
    let mut resp = Redirect::to(&next).into_response();
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        session::session_cookie(&secret, &parts.headers),
    );
    h.append(header::SET_COOKIE, session::set_cookie(LOGIN_COOKIE, "", 0));
    resp
}

pub async fn logout(
    State(st): State<HttpState>,
    checked: super::session::Checked<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(e) = st
        .store
        .dashboard_session_close(&checked.viewer.id_sha256)
        .await
    {
        return DashError::from(e).into_response();
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, "", 0),
    );
    resp
}

/// Whether the request asked for the live event stream.
pub fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}
