//! gorp's integration tests: one binary, one module per area.

mod support;

mod acp;
mod agent_process;
mod approvals;
mod budgets;
mod claude;
mod claude_agent;
mod cli;
mod codex;
mod config;
mod dashboard;
mod deploy;
mod doctor;
mod faults;
mod gemini;
mod http;
mod matrix;
mod nodes;
mod postgres;
mod queue;
mod sandbox;
mod schedule;
mod sessions;
mod synapse;
mod usage;
mod worker;
