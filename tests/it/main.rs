//! gorp's integration tests: one binary, one module per area.

mod support;

mod acp;
mod agent_process;
mod cli;
mod config;
mod queue;
mod worker;
