//! Who may use the dashboard: a login with one of the API tokens opens a session (a row, see
//! `store::dashboard`) named by an `HttpOnly`, `SameSite=Strict` cookie; every form carries the
//! session's CSRF token; a logout deletes the row.
//!
//! - [`Viewer`]: the extractor every page takes. Without a good session a page answers with a
//!   redirect to the login form (an HTML page), never with data.
//! - [`Checked`]: the extractor every state-changing request takes: a [`Viewer`] whose form's
//!   `_csrf` field matched the session's (compared in constant time), from a request that did
//!   not come from another site (`Origin`, `Sec-Fetch-Site`).
//! - The login form has its own CSRF token: a random value in a short-lived cookie and in the
//!   form (double submit), so no other site can log a browser in.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::DashError;
use crate::auth::{new_token, sha256_hex};
use crate::http::HttpState;
use crate::store::{now_ms, DashboardSession, Millis};

/// The session cookie.
pub const SESSION_COOKIE: &str = "gorp_session";
/// The login form's double-submit cookie.
pub const LOGIN_COOKIE: &str = "gorp_login";
/// A message for the next page (what a form did), shown once.
pub const FLASH_COOKIE: &str = "gorp_flash";
/// How long a session lasts.
pub const SESSION_MS: Millis = 12 * 3_600_000;
/// Largest form body read.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The session's CSRF token, for the forms of the page.
    pub csrf: String,
    /// The flash message of the previous request, if any.
    pub flash: Option<String>,
    /// SHA-256 of the session cookie's secret (for logout).
    pub(super) id_sha256: String,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for the dashboard: `HttpOnly`, `SameSite=Strict`, path `/ui`;
/// `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, max_age_secs: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("gorp_invalid=; Path=/ui; Max-Age=0"))
}

/// The session cookie; `Secure` when the browser reached gorp over HTTPS (a proxy in front
/// says so with `X-Forwarded-Proto`, the browser with an `https` `Origin`).
pub fn session_cookie(secret: &str, headers: &HeaderMap) -> HeaderValue {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
        || headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| o.starts_with("https://"));
    let secure = if https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={secret}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_MS / 1000
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("gorp_invalid=; Path=/ui; Max-Age=0"))
}

/// A flash message as a cookie value: percent-encoded, at most 300 bytes of text.
pub fn flash_cookie(text: &str) -> HeaderValue {
    let mut t = text.to_string();
    while t.len() > 300 {
        t.pop();
    }
    let encoded: String = form_urlencoded_byte_serialize(&t);
    set_cookie(FLASH_COOKIE, &encoded, 60)
}

fn form_urlencoded_byte_serialize(s: &str) -> String {
    serde_urlencoded::to_string([("m", s)])
        .map(|v| v.trim_start_matches("m=").to_string())
        .unwrap_or_default()
}

fn flash_of(headers: &HeaderMap) -> Option<String> {
    let raw = cookie(headers, FLASH_COOKIE)?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("m={raw}"))
        .ok()?
        .pop()
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

impl FromRequestParts<HttpState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, Response> {
        if st.config.webhook.tokens.is_empty() {
            return Err(DashError::Off.into_response());
        }
        let to_login = || {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/ui/".into());
            let next = if parts.method == Method::GET && safe_next(&next) {
                next
            } else {
                "/ui/".into()
            };
            let q = serde_urlencoded::to_string([("next", next.as_str())]).unwrap_or_default();
            Redirect::to(&format!("/ui/login?{q}")).into_response()
        };
        let Some(secret) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login());
        };
        let id_sha256 = sha256_hex(secret);
        let session = st
            .store
            .dashboard_session_get(&id_sha256, now_ms())
            .await
            .map_err(|e| DashError::from(e).into_response())?;
        match session {
            Some(s) if token_still_configured(&s, &st.config.webhook.tokens) => Ok(Viewer {
                csrf: s.csrf,
                flash: flash_of(&parts.headers),
                id_sha256,
            }),
            _ => Err(to_login()),
        }
    }
}

/// Whether the token a session was opened with is still one of `tokens` (every candidate
/// compared in constant time).
fn token_still_configured(s: &DashboardSession, tokens: &[String]) -> bool {
    let mut found = subtle::Choice::from(0);
    for t in tokens {
        found |= sha256_hex(t).as_bytes().ct_eq(s.token_sha256.as_bytes());
    }
    found.into()
}

/// Whether `next` is a dashboard path to send a browser back to after login (not another
/// site, not a scheme-relative `//host`).
pub fn safe_next(next: &str) -> bool {
    next.starts_with("/ui/") && !next.starts_with("//") && !next.contains(['\\', '\r', '\n'])
}

/// Refuses a state-changing request another site made: an `Origin` that is not this host, or
/// `Sec-Fetch-Site` other than same-origin or none.
pub fn same_origin(headers: &HeaderMap) -> Result<(), DashError> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return Err(DashError::Forbidden(format!(
                "refused a request from another site (Sec-Fetch-Site: {site})"
            )));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // The host the browser used: `Host`, or what a proxy in front forwarded.
        let hosts: Vec<&str> = [header::HOST.as_str(), "x-forwarded-host"]
            .iter()
            .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
            .collect();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        if origin_host.is_empty() || !hosts.contains(&origin_host) {
            return Err(DashError::Forbidden(
                "refused a request from another origin".into(),
            ));
        }
    }
    Ok(())
}

/// Whether `given` is `want`, in constant time.
pub fn tokens_equal(given: &str, want: &str) -> bool {
    given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want.as_bytes()))
}

/// A state-changing request of a signed-in browser: its form (`T`) with the session's CSRF
/// token checked.
pub struct Checked<T> {
    pub viewer: Viewer,
    pub form: T,
}

#[derive(serde::Deserialize)]
struct CsrfField {
    #[serde(rename = "_csrf", default)]
    csrf: String,
}

impl<T: DeserializeOwned + Send> FromRequest<HttpState> for Checked<T> {
    type Rejection = Response;

    async fn from_request(req: Request, st: &HttpState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let viewer = Viewer::from_request_parts(&mut parts, st).await?;
        same_origin(&parts.headers).map_err(IntoResponse::into_response)?;
        let bytes = read_form(&parts.headers, body).await?;
        let field: CsrfField = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| DashError::BadRequest(format!("invalid form: {e}")).into_response())?;
        if !tokens_equal(&field.csrf, &viewer.csrf) {
            return Err(DashError::Forbidden(
                "the form's CSRF token is missing or wrong: reload the page and try again".into(),
            )
            .into_response());
        }
        let form = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| DashError::BadRequest(format!("invalid form: {e}")).into_response())?;
        Ok(Checked { viewer, form })
    }
}

/// A form body: `application/x-www-form-urlencoded`, at most [`MAX_FORM_BYTES`].
pub async fn read_form(headers: &HeaderMap, body: axum::body::Body) -> Result<Bytes, Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(DashError::BadRequest("expected a form".into()).into_response());
    }
    axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| DashError::BadRequest("the form is too large".into()).into_response())
}

/// A new session for `token` (already checked): its cookie secret and the row.
pub async fn open(st: &HttpState, token: &str) -> Result<String, DashError> {
    let secret = new_token();
    let now = now_ms();
    st.store
        .dashboard_session_open(
            &sha256_hex(&secret),
            DashboardSession {
                token_sha256: sha256_hex(token),
                csrf: new_token(),
                expires_at: now + SESSION_MS,
            },
            now,
        )
        .await?;
    Ok(secret)
}
