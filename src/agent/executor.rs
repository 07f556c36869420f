//! The executor that runs a job's prompt on its channel's warm agent session: it takes the
//! session from the [`WarmSessionManager`], sends the prompt over ACP, records every update
//! as a job event (keeping message boundaries), notes first output and usage, and maps the
//! turn's end to the job's [`Outcome`].

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tracing::Instrument;

use super::pool::{WarmError, WarmSessionManager};
use crate::acp::client::{self, AcpError, AgentEvent};
use crate::executor::{Executor, JobContext, Outcome, StopCause};
use crate::store::{EventKind, RunFacts};

/// Event kinds that count as the agent's first output.
const OUTPUT_KINDS: &[EventKind] = &[
    EventKind::Message,
    EventKind::Thought,
    EventKind::ToolCall,
    EventKind::Plan,
];

/// Event kinds that end the agent's current message: message chunks after one of these belong
/// to a new message (ACP chunks carry no message id).
const MESSAGE_BREAKS: &[EventKind] = &[
    EventKind::Thought,
    EventKind::ToolCall,
    EventKind::ToolCallUpdate,
    EventKind::Plan,
    EventKind::Permission,
    EventKind::FsRead,
    EventKind::FsWrite,
    EventKind::FsDenied,
    EventKind::FsError,
];

/// Whether `kind` (an event's stored kind) is one of `kinds`.
fn is_one_of(kind: &str, kinds: &[EventKind]) -> bool {
    kinds.iter().any(|k| *kind == *k)
}

/// Put between two of the agent's messages in the job's output, so they do not run together.
pub const MESSAGE_SEPARATOR: &str = "\n\n";

/// Keeps the boundaries between the agent's messages: the first chunk of every message but
/// the first starts with [`MESSAGE_SEPARATOR`], so every reader of the rows (the output, SSE,
/// Matrix) sees them apart.
#[derive(Default)]
struct MessageBoundaries {
    seen_message: bool,
    broken: bool,
}

impl MessageBoundaries {
    fn mark(&mut self, ev: &mut AgentEvent) {
        if ev.kind == EventKind::Message {
            if self.seen_message && self.broken {
                if let Some(t) = ev.text.as_mut().filter(|t| !t.starts_with('\n')) {
                    t.insert_str(0, MESSAGE_SEPARATOR);
                }
            }
            self.seen_message = true;
            self.broken = false;
        } else if is_one_of(&ev.kind, MESSAGE_BREAKS) {
            self.broken = true;
        }
    }
}

/// Runs jobs on warm ACP sessions.
pub struct AcpExecutor {
    warm: Arc<WarmSessionManager>,
}

impl AcpExecutor {
    pub fn new(warm: Arc<WarmSessionManager>) -> Self {
        AcpExecutor { warm }
    }
}

impl Executor for AcpExecutor {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let warm = self.warm.clone();
        Box::pin(async move { run_job(warm, ctx).await })
    }
}

async fn run_job(warm: Arc<WarmSessionManager>, ctx: JobContext) -> Outcome {
    let started = Instant::now();
    let job = ctx.job.clone();
    // A warm agent needs nothing from the channel row; a cold start reads it.
    let acquired = match warm
        .acquire_if_warm(job.channel_id, ctx.cancel_token())
        .await
    {
        Some(s) => Ok(s),
        None => {
            let channel = match ctx.store().channel_get_by_id(job.channel_id).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return failed(format!("channel {} no longer exists", job.channel), false)
                }
                Err(e) => return failed(format!("cannot read channel: {e}"), true),
            };
            warm.acquire(&channel, ctx.cancel_token()).await
        }
    };
    let session = match acquired {
        Ok(s) => s,
        Err(WarmError::Cancelled) => return cancelled(&ctx),
        Err(e) => {
            // An agent that cannot start (missing, not ACP, exits at once) fails the job at
            // once: running it again would fail the same way. The worker records the error.
            let retryable = !matches!(
                e,
                WarmError::Acp(
                    AcpError::BinaryNotFound { .. }
                        | AcpError::NotAcp { .. }
                        | AcpError::ExitedEarly { .. }
                        | AcpError::InvalidSpec(_)
                )
            );
            return failed(format!("agent could not start: {e}"), retryable);
        }
    };
    let live = session.live();
    ctx.emit(
        EventKind::Session,
        Some(format!(
            "{} session {} (pid {}){}",
            if session.warm { "warm" } else { "cold" },
            live.session_id,
            live.agent.pid(),
            if !session.warm && live.resumed {
                ", resumed with session/load"
            } else {
                ""
            }
        )),
        Some(serde_json::json!({
            "warm": session.warm,
            "pid": live.agent.pid(),
            "session_id": live.session_id,
            "resumed": live.resumed,
            "start_ms": session.start_time.as_millis() as u64,
        })),
    )
    .await;

    // Forward the agent's updates to the job's events in order, noting first output and usage.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AgentEvent>(client::EVENT_QUEUE);
    let fwd_ctx = ctx.clone();
    let forward = tokio::spawn(
        async move {
            let mut facts = RunFacts::default();
            let mut boundaries = MessageBoundaries::default();
            // Whatever has arrived goes to the writer as one batch: an agent that streams fast
            // is written in large multi-row inserts rather than one event at a time.
            let mut batch = Vec::with_capacity(client::EVENT_QUEUE);
            while rx.recv_many(&mut batch, client::EVENT_QUEUE).await > 0 {
                let mut events = Vec::with_capacity(batch.len());
                for mut ev in batch.drain(..) {
                    boundaries.mark(&mut ev);
                    if facts.first_output_ms.is_none() && is_one_of(&ev.kind, OUTPUT_KINDS) {
                        facts.first_output_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                    }
                    note_usage(&mut facts, &ev);
                    let data = (!ev.data.is_null()).then_some(ev.data);
                    events.push((ev.kind, ev.text, data));
                }
                fwd_ctx.emit_all(events).await;
            }
            facts
        }
        .in_current_span(),
    );
    let result = live
        .agent
        .prompt(
            &live.session_id,
            &job.prompt,
            tx,
            ctx.cancel_token().clone(),
        )
        .await;
    let mut facts = forward.await.unwrap_or_default();
    facts.warm = Some(session.warm);
    let _ = ctx
        .store()
        .job_record_run(&job.id, job.attempt, facts)
        .await;
    let was_cancelled =
        matches!(&result, Ok(stop) if stop == "cancelled") || ctx.stop_cause().is_some();
    if was_cancelled && warm.config().acp.recycle_after_cancel {
        warm.recycle(job.channel_id, session).await;
    } else {
        warm.release(job.channel_id, session).await;
    }

    match result {
        Ok(stop) if stop == "cancelled" || ctx.stop_cause().is_some() => cancelled(&ctx),
        Ok(stop) => Outcome::Succeeded {
            stop_reason: Some(stop),
        },
        Err(AcpError::AgentExited {
            status,
            stderr_tail,
        }) => failed(
            format!(
                "agent exited mid-prompt ({status}); stderr: {}",
                tail_lines(&stderr_tail, 20)
            ),
            true,
        ),
        Err(e @ AcpError::Timeout { .. }) => failed(format!("{e}; session/cancel sent"), false),
        // The same prompt would make the agent do it again.
        Err(e @ AcpError::MessageTooLarge { .. }) => failed(e.to_string(), false),
        Err(e) => failed(e.to_string(), true),
    }
}

fn note_usage(facts: &mut RunFacts, ev: &AgentEvent) {
    let d = &ev.data;
    match ev.kind.parse::<EventKind>() {
        Ok(EventKind::Usage) => {
            if let Some(c) = d.pointer("/cost/amount").and_then(|v| v.as_f64()) {
                facts.cost_usd = Some(c);
            }
            let meta = d.get("_meta");
            if let Some(i) = meta
                .and_then(|m| m.get("inputTokens"))
                .and_then(|v| v.as_i64())
            {
                facts.input_tokens = Some(i);
            }
            if let Some(o) = meta
                .and_then(|m| m.get("outputTokens"))
                .and_then(|v| v.as_i64())
            {
                facts.output_tokens = Some(o);
            }
        }
        Ok(EventKind::TurnUsage) => {
            if let Some(i) = d.get("inputTokens").and_then(|v| v.as_i64()) {
                facts.input_tokens = Some(i);
            }
            if let Some(o) = d.get("outputTokens").and_then(|v| v.as_i64()) {
                facts.output_tokens = Some(o);
            }
        }
        _ => {}
    }
}

fn cancelled(ctx: &JobContext) -> Outcome {
    let reason = match ctx.stop_cause() {
        Some(StopCause::UserCancel) | None => "cancelled by user",
        Some(StopCause::Shutdown) => "gorp is shutting down",
        Some(StopCause::LeaseLost) => "lease lost to another worker",
    };
    Outcome::Cancelled {
        reason: reason.into(),
    }
}

fn failed(error: String, retryable: bool) -> Outcome {
    Outcome::Failed { error, retryable }
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, text: &str) -> AgentEvent {
        AgentEvent {
            kind: kind.into(),
            text: Some(text.into()),
            data: serde_json::Value::Null,
        }
    }

    fn marked(events: &[(&str, &str)]) -> String {
        let mut b = MessageBoundaries::default();
        events
            .iter()
            .map(|(k, t)| {
                let mut e = ev(k, t);
                b.mark(&mut e);
                e
            })
            .filter(|e| e.kind == "message")
            .map(|e| e.text.unwrap())
            .collect()
    }

    #[test]
    fn messages_separated_by_a_tool_call_keep_their_boundary() {
        let out = marked(&[
            ("message", "Looking at it"),
            ("message", " earlier="),
            ("tool_call", "Read"),
            ("tool_call_update", "Read"),
            ("message", "**Warning:**"),
            ("message", " done"),
        ]);
        assert_eq!(out, "Looking at it earlier=\n\n**Warning:** done");
    }

    #[test]
    fn chunks_of_one_message_and_a_leading_break_are_left_alone() {
        assert_eq!(
            marked(&[
                ("thought", "hm"),
                ("message", "a"),
                ("usage", ""),
                ("message", "b")
            ]),
            "ab"
        );
        assert_eq!(
            marked(&[("message", "a"), ("plan", "p"), ("message", "\nb")]),
            "a\nb",
            "a message that starts on a new line needs no separator"
        );
    }
}
