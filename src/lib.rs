//! gorp: drive ACP coding agents from webhooks, Matrix rooms and cron schedules through a
//! durable SQLite job queue.
//!
//! # Layout
//! - [`config`]: `Config::load()`, `GORP_*` overrides, validation, masked printing.
//! - [`store`]: every SQL statement; the single writer task with group commit; read pool.
//! - [`executor`]: the interface the worker runs jobs through, and the job context.
//! - [`worker`]: the worker pool: claim, heartbeat, fenced outcomes, graceful shutdown.
//! - [`acp`]: the ACP client, the scripted test agent, and the executor on warm sessions.
//! - [`warm`]: `WarmSessionManager`: live agent processes driven by the `warm_sessions` table.
//! - [`scheduler`]: cron schedules (croner) that fire exactly once per slot; pre-warm.
//! - [`rescuer`]: returns jobs whose lease expired.
//! - [`cleaner`]: deletes finished jobs past retention.
//! - [`http`]: webhooks, the JSON/SSE API, health, metrics, OpenAPI (axum).
//! - [`matrix`]: the Matrix bot: rooms as channels, `!` commands, streamed replies, E2EE.
//! - [`auth`]: bearer tokens and GitHub signatures, compared in constant time.
//! - [`metrics`]: Prometheus metrics.
//! - [`app`]: `gorp start`: wires the services together until shutdown.
//! - [`cli`]: the `gorp` command line.

// matrix-sdk's sync futures are deeply nested types.
#![recursion_limit = "256"]

pub mod acp;
pub mod agent;
pub mod app;
pub mod auth;
pub mod background;
pub mod cleaner;
pub mod cli;
pub mod config;
pub mod executor;
pub mod http;
pub mod instance;
pub mod kinds;
pub mod logging;
pub mod matrix;
pub mod metrics;
pub mod rescuer;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod worker;
