//! gorp's integration tests: one binary, one module per area.

mod support;

mod config;
mod queue;
mod worker;
