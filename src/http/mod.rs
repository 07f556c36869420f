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
pub mod approvals;
pub mod conn;
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

use crate::agent::pool::WarmSessionManager;
use crate::config::Config;
use crate::store::Store;
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

/// Documents, on every operation, the error responses the router gives any request (each with
/// the JSON [`error::ErrorBody`]): 414 for a request target over [`error::MAX_URI_BYTES`], 503
/// when the database cannot take the request now; with a bearer token also 401 and 429; with
/// parameters 400; with a request body 400, 413 and 415.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let mut add = vec![("414", "Request target too long")];
                if path != "/healthz" && path != "/metrics" {
                    add.push((
                        "503",
                        "The database cannot take the request now; retry later",
                    ));
                }
                if op.security.is_some() || path.starts_with("/webhook/") {
                    add.push(("401", "Missing or invalid credentials"));
                    add.push(("429", "Rate limit exceeded"));
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    add.push(("400", "Invalid parameters"));
                }
                if op.request_body.is_some() {
                    add.push(("400", "Invalid body"));
                    add.push(("413", "Body too large"));
                    add.push(("415", "Not application/json"));
                }
                for (status, what) in add {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(what).into());
                }
            }
        }
    }
}

/// The routes with their OpenAPI description, built from the same registrations.
pub fn routes() -> (Router<HttpState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(webhook::routes())
        .merge(api::routes())
        .merge(approvals::routes())
        .merge(ops::routes())
        .split_for_parts();
    utoipa::Modify::modify(&CommonErrors, &mut doc);
    (router, doc)
}

/// The whole app.
pub fn router(state: HttpState) -> Router {
    router_with(state, Router::new())
}

/// The whole app with `extra` routes of another front end (the dashboard) merged in, under the
/// same middleware.
pub fn router_with(state: HttpState, extra: Router<HttpState>) -> Router {
    let (routes, doc) = routes();
    let doc = Arc::new(doc);
    routes
        .merge(extra)
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json((*doc).clone()) }
            }),
        )
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            error::ApiError::NotFound(format!("no route for {method} {}", uri.path()))
        })
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(error::limit_uri))
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
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, state, Router::new(), shutdown).await
}

/// [`serve`] with `extra` routes merged in (see [`router_with`]).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    mut state: HttpState,
    extra: Router<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP listening");
    state.shutdown = shutdown.clone();
    axum::serve(conn::JsonErrorListener(listener), router_with(state, extra))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
