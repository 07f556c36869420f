//! API errors: each variant documents its status code; every error is a JSON body
//! `{"error": "<code>", "message": "<readable text>"}`. Database and internal errors are logged
//! and answered as 500 without details; a database that cannot take writes now (disk full,
//! locked by another process past `busy_timeout`, I/O error) is a 503.
//!
//! Errors that do not come from a handler get the same body: [`json_errors`] rewrites every
//! non-JSON error response of the router (axum's path/query/body rejections, 405, the 404 of an
//! unknown route, [`limit_uri`]'s 414), and [`super::conn`] rewrites the bodiless responses
//! hyper sends for requests it cannot parse.

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;

/// Longest request target (path and query) the router takes; longer ones get a JSON 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed JSON, missing prompt, bad UTF-8, invalid values.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: unknown webhook id, job, channel, schedule or route.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the current state (channel exists, channel busy).
    #[error("{0}")]
    Conflict(String),
    /// 413: body over `[webhook] max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 414: path and query longer than [`MAX_URI_BYTES`].
    #[error("{0}")]
    UriTooLong(String),
    /// 415: not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: the token's rate limit is exhausted.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: the database cannot take the request now (not ready, full, locked, I/O error);
    /// nothing was written and the same request may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// 500: logged, answered without details.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// An axum query-string rejection (400).
    pub fn query(e: QueryRejection) -> ApiError {
        ApiError::BadRequest(format!("bad query: {}", e.body_text()))
    }

    /// An axum JSON-body rejection: 415 without `Content-Type: application/json`, 413 over
    /// the body limit, else 400 (syntax, missing or unknown fields, wrong types).
    pub fn json(e: JsonRejection) -> ApiError {
        match e.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(e.body_text()),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(e.body_text()),
            _ => ApiError::BadRequest(e.body_text()),
        }
    }
}

/// The stable `error` code of a status: `bad_request`, `not_found`, `method_not_allowed`,
/// `uri_too_long`, `unavailable`, `internal`, …
pub fn error_code(status: StatusCode) -> String {
    match status {
        StatusCode::INTERNAL_SERVER_ERROR => "internal".into(),
        StatusCode::SERVICE_UNAVAILABLE => "unavailable".into(),
        s => match s.canonical_reason() {
            Some(reason) => reason
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join("_"),
            None => format!("http_{}", s.as_u16()),
        },
    }
}

/// The JSON body of every error response.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code such as `unauthorized`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A JSON error response.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: error_code(status),
        message: message.into(),
    };
    let mut resp = (status, Json(body)).into_response();
    match status {
        StatusCode::UNAUTHORIZED => {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        error_response(self.status(), self.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let Some(why) = e.unavailable() {
            tracing::warn!(error = %e, "database unavailable; answering 503");
            return ApiError::Unavailable(format!("{why}; nothing was written, try again later"));
        }
        match e {
            StoreError::UnknownChannel(_) | StoreError::JobNotFound(_) => {
                ApiError::NotFound(e.to_string())
            }
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            StoreError::ChannelExists(_) | StoreError::ChannelBusy(_) => {
                ApiError::Conflict(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Answers 414 (JSON) for a path and query longer than [`MAX_URI_BYTES`], before routing.
pub(super) async fn limit_uri(req: Request, next: Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        return ApiError::UriTooLong(format!(
            "the request target is {len} bytes; at most {MAX_URI_BYTES} are accepted"
        ))
        .into_response();
    }
    next.run(req).await
}

fn is_html(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"))
}

/// Gives every error response that is not JSON yet the JSON body of [`ErrorBody`], keeping
/// its status and headers and its text as the message.
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    // The dashboard's error pages are HTML on purpose.
    if !(status.is_client_error() || status.is_server_error())
        || is_json(resp.headers())
        || is_html(resp.headers())
    {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        // axum adds the `Allow` header after this layer has run.
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        StatusCode::NOT_FOUND if text.is_empty() => format!("no route for {method} {path}"),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let json = error_response(status, message);
    let (json_parts, json_body) = json.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in json_parts.headers.iter() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, Body::new(json_body))
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}
