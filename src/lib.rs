//! gorp: drive ACP coding agents from webhooks, Matrix rooms and cron schedules through a
//! durable SQLite job queue.
//!
//! # Layout
//! From the ground up; a module refers only to the ones above it in this list (checked by
//! `layers.py`, see the README's Architecture section).
//! - [`kinds`]: the closed sets of values stored as text (states, sources, event kinds, policies).
//! - [`config`]: `Config::load()`, `GORP_*` overrides, validation, masked printing.
//! - [`auth`]: bearer tokens and GitHub signatures, compared in constant time.
//! - [`instance`]: instance ids (`host:pid:nonce`) and "is this holder dead on this host".
//! - [`markdown`]: untrusted Markdown → HTML with only Markdown's own tags.
//! - [`sandbox`]: the Landlock ruleset an agent runs under (writes, reads, ports, scopes).
//! - [`store`]: every SQL statement, one file per table; the group-commit writer; read pool.
//! - [`budget`]: the day and month windows a channel's spend is counted in, and what a job
//!   held by a spent budget is told.
//! - [`metrics`]: Prometheus metrics.
//! - [`background`]: the one loop the rescuer, cleaner, scheduler and warm keeper run in.
//! - [`acp`]: the ACP client (process, connection, updates, fs confinement, permissions,
//!   session modes).
//! - [`executor`]: the interface the worker runs jobs through, and the job context.
//! - [`worker`]: the worker pool: claim, heartbeat, fenced outcomes, graceful shutdown.
//! - [`agent`]: the warm pool of agent processes and the executor that runs jobs on them.
//! - [`rescuer`]: returns jobs whose lease expired. [`cleaner`]: deletes finished jobs past
//!   retention. [`scheduler`]: fires cron schedules exactly once per slot; pre-warm.
//! - [`service`]: domain operations every front end calls (channels, jobs, schedules,
//!   approvals).
//! - [`http`]: webhooks, the JSON/SSE API, health, metrics, OpenAPI (axum).
//! - [`dashboard`]: the web dashboard under `/ui/` (sessions, pages, live job output).
//! - [`matrix`]: the Matrix bot: rooms as channels, `!` commands, streamed replies, E2EE.
//! - [`cli`]: the `gorp` command line. [`app`]: `gorp start` wires the services together.
//! - [`logging`]: log filter and format (`GORP_LOG`, `GORP_LOG_FORMAT=json`).
//!
//! A webhook job: `http::webhook` → `service::jobs::enqueue` → `store` (writer, group commit)
//! → `worker` claims it and runs it in a `job` span → `agent::executor` on a session from
//! `agent::pool` over `acp::client` → events and the fenced outcome back through `store`.

// matrix-sdk's sync futures are deeply nested types.
#![recursion_limit = "256"]

pub mod acp;
pub mod agent;
pub mod app;
pub mod auth;
pub mod background;
pub mod budget;
pub mod cleaner;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod executor;
pub mod http;
pub mod instance;
pub mod kinds;
pub mod logging;
pub mod markdown;
pub mod matrix;
pub mod metrics;
pub mod node;
pub mod rescuer;
pub mod sandbox;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod worker;
