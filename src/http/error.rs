//! API errors: each variant documents its status code; every error is a JSON body
//! `{"error": "<code>", "message": "<readable text>"}`. Database and internal errors are logged
//! and answered as 500 without details.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed JSON, missing prompt, bad UTF-8, invalid values.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: unknown webhook id, job or channel.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the current state (channel exists, channel busy).
    #[error("{0}")]
    Conflict(String),
    /// 413: body over `[webhook] max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: the token's rate limit is exhausted.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: the database is not ready.
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
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// The JSON body of every error response.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code such as `unauthorized`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let body = ErrorBody {
            error: self.code().into(),
            message: self.to_string(),
        };
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert("www-authenticate", "Bearer".parse().expect("static header"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
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
