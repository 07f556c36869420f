//! HTTP: webhooks, the JSON/SSE API, health and metrics (axum).
//!
//! - `POST /webhook/session/{id}`: a prompt for the channel whose stable webhook id is `{id}`;
//!   answered `202` only after the job row is committed (see [`webhook`]).
//! - `/api/*`: jobs, events (JSON or SSE), cancel, channels, the warm pool; bearer token.
//! - `/healthz`, `/readyz`, `/metrics`; `/api/openapi.json` is generated from the handlers.
//!
//! [`router`] builds the app without binding, so tests drive it with `oneshot` or a real
//! listener; [`serve`] runs it until shutdown, letting in-flight requests finish.

pub mod api;
pub mod error;
pub mod ops;
pub mod webhook;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::store::Store;
use crate::warm::WarmSessionManager;
use crate::worker::PoolHandle;

/// What handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub store: Store,
    pub config: Arc<Config>,
    /// The local worker pool, so cancels reach running jobs at once.
    pub pool: Option<PoolHandle>,
    pub warm: Option<Arc<WarmSessionManager>>,
    /// Per-token limiter, when `[webhook] rate_limit_per_minute` is set.
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    /// Fires when the server stops: open event streams and `?wait` requests end.
    pub shutdown: CancellationToken,
}

impl HttpState {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        pool: Option<PoolHandle>,
        warm: Option<Arc<WarmSessionManager>>,
    ) -> Self {
        // Install the recorder before anything is counted.
        crate::metrics::handle();
        let limiter = NonZeroU32::new(config.webhook.rate_limit_per_minute)
            .map(|n| Arc::new(governor::RateLimiter::keyed(Quota::per_minute(n))));
        HttpState {
            store,
            config,
            pool,
            warm,
            limiter,
            shutdown: CancellationToken::new(),
        }
    }

    /// Counts one request against `key`'s budget; false when it is exhausted.
    pub(crate) fn allow(&self, key: &str) -> bool {
        match &self.limiter {
            Some(l) => l.check_key(&key.to_string()).is_ok(),
            None => true,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "gorp", description = "Drive ACP coding agents through a durable SQLite job queue."),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes with their OpenAPI description, built from the same registrations.
pub fn routes() -> (Router<HttpState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(webhook::routes())
        .merge(api::routes())
        .merge(ops::routes())
        .split_for_parts()
}

/// The whole app.
pub fn router(state: HttpState) -> Router {
    let (routes, doc) = routes();
    let doc = Arc::new(doc);
    routes
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json((*doc).clone()) }
            }),
        )
        .layer(axum::middleware::from_fn(count_responses))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Counts responses by route and status (webhooks separately, as the issue of most interest).
async fn count_responses(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    if route.starts_with("/webhook/") {
        metrics::counter!(crate::metrics::WEBHOOK_RESPONSES, "status" => status.clone())
            .increment(1);
    }
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route, "status" => status)
        .increment(1);
    resp
}

/// Serves `router(state)` on `listener` until `shutdown`; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP listening");
    state.shutdown = shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
