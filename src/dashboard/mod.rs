//! The web dashboard, served by `gorp start` on the API's port under `/ui/`: the queue, a job's
//! output live, approvals, channels and schedules. Server-rendered HTML (maud escapes every
//! value), one small script for the live parts (over SSE) and relative times, one stylesheet;
//! every asset is in the binary.
//!
//! - `session`: login with an API token, the session cookie, CSRF.
//! - `view`: the layout and the small pieces every page uses (times, states, forms).
//! - `overview`, `jobs`, `channels`, `schedules`, `approvals`: the pages and their actions.
//!
//! Off unless `[webhook] tokens` has a token: the pages then say so and show nothing. Every
//! action goes through the same service functions as the API, the CLI and Matrix.

mod approvals;
mod channels;
mod jobs;
mod overview;
mod schedules;
pub mod session;
mod view;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::http::HttpState;
use crate::store::StoreError;

/// The dashboard's routes, to merge into the HTTP router.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/assets/{name}", get(asset))
        .route("/ui/login", get(view::login_page).post(view::login))
        .route("/ui/logout", post(view::logout))
        .route("/ui/", get(overview::page))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::page))
        .route("/ui/jobs/{id}/live", get(jobs::live))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/jobs/{id}/retry", post(jobs::retry))
        .route("/ui/channels", get(channels::list).post(channels::create))
        .route("/ui/channels/{name}", get(channels::page))
        .route("/ui/channels/{name}/settings", post(channels::settings))
        .route("/ui/channels/{name}/token", post(channels::rotate_token))
        .route("/ui/channels/{name}/warm", post(channels::warm))
        .route("/ui/channels/{name}/stop", post(channels::stop))
        .route("/ui/schedules", get(schedules::list).post(schedules::add))
        .route("/ui/schedules/preview", get(schedules::preview))
        .route("/ui/schedules/{id}/{action}", post(schedules::act))
        .route("/ui/approvals", get(approvals::list))
        .route("/ui/approvals/{id}", post(approvals::decide))
        .route(
            "/ui/{*rest}",
            get(|| async { DashError::NotFound("no such page".into()) }),
        )
        .layer(axum::middleware::from_fn(security_headers))
}

/// What a dashboard page or action can fail with: an HTML page with the status and the reason.
#[derive(Debug, thiserror::Error)]
pub enum DashError {
    #[error("the dashboard is off: set [webhook] tokens in the configuration to turn it on")]
    Off,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the database cannot take the request now: {0}")]
    Store(StoreError),
}

impl From<StoreError> for DashError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(m) => DashError::BadRequest(m),
            StoreError::UnknownChannel(c) => DashError::NotFound(format!("no channel {c:?}")),
            StoreError::JobNotFound(j) => DashError::NotFound(format!("no job {j}")),
            StoreError::ChannelExists(c) => {
                DashError::Conflict(format!("a channel named {c:?} exists already"))
            }
            e @ StoreError::ChannelBusy(_) => DashError::Conflict(e.to_string()),
            other => DashError::Store(other),
        }
    }
}

impl IntoResponse for DashError {
    fn into_response(self) -> Response {
        let status = match &self {
            DashError::Off | DashError::NotFound(_) => StatusCode::NOT_FOUND,
            DashError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DashError::Forbidden(_) => StatusCode::FORBIDDEN,
            DashError::Conflict(_) => StatusCode::CONFLICT,
            DashError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let DashError::Store(e) = &self {
            tracing::warn!(error = %e, "dashboard request failed");
        }
        (status, view::error_page(status, &self.to_string())).into_response()
    }
}

pub type DashResult<T> = Result<T, DashError>;

/// The vendored assets, compiled in.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "gorp.css",
        "text/css; charset=utf-8",
        include_str!("assets/gorp.css"),
    ),
    (
        "gorp.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/gorp.js"),
    ),
];

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(ct)),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                ),
            ],
            *body,
        )
            .into_response(),
        None => DashError::NotFound(format!("no asset {name:?}")).into_response(),
    }
}

/// Every dashboard response: no framing by other sites, no inline script or style, no sniffing,
/// and pages (not assets) never cached.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_asset = req.uri().path().starts_with("/ui/assets/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}
