//! Domain operations every front end calls: HTTP, Matrix and the CLI parse their input, call
//! one of these, and render the result. Each operation is written once here, so the three
//! front ends cannot drift apart (the order of checks, defaults, side effects).
//!
//! - [`approvals`]: permission requests and questions under `ask`: open, wait, decide;
//!   standing rules.
//! - [`questions`]: a question's form: its fields, checking an answer, reading a typed one.
//! - [`channels`]: create (workspace, row, default policy, token), rotate token, delete.
//! - [`jobs`]: enqueue (with metrics) and cancel (with the local stop of a running job).
//! - [`schedules`]: parse a schedule's time, add, pause, resume, remove.
//! - [`usage`]: what the agents' turns cost, by day, channel or source.

pub mod approvals;
pub mod channels;
pub mod jobs;
pub mod questions;
pub mod schedules;
pub mod usage;
