//! `/healthz` (the process answers), `/readyz` (the database takes a write and its migrations
//! are current) and `/metrics` (Prometheus text). None needs a token; bind to loopback or put
//! them behind your proxy's rules.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::HttpState;

pub(super) fn routes() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The database is writable and its migrations are current.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "ready"), (status = 503, body = ErrorBody)))]
async fn readyz(State(st): State<HttpState>) -> ApiResult<Json<serde_json::Value>> {
    st.store
        .flush()
        .await
        .map_err(|e| ApiError::Unavailable(format!("database not writable: {e}")))?;
    match st.store.migrations_current().await {
        Ok(true) => Ok(Json(serde_json::json!({ "status": "ready" }))),
        Ok(false) => Err(ApiError::Unavailable(
            "database migrations are not current".into(),
        )),
        Err(e) => Err(ApiError::Unavailable(format!(
            "cannot read migrations: {e}"
        ))),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(st): State<HttpState>) -> impl IntoResponse {
    let text = crate::metrics::render(&st.store).await;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
}
