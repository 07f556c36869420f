//! The executor that runs a job's prompt on its channel's warm agent session: it takes the
//! session from the [`WarmSessionManager`], sends the prompt over ACP, records every update
//! as a job event (keeping message boundaries), notes first output and usage, and maps the
//! turn's end to the job's [`Outcome`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tracing::Instrument;

use super::pool::{Live, WarmError, WarmSessionManager};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::acp::client::{self, AcpError, AgentEvent, Answerer, AskAnswer, ASKING_MODES};
use crate::executor::{Executor, JobContext, Outcome, StopCause};
use crate::kinds::PermissionPolicy;
use crate::service::approvals;
use crate::store::{Approval, ApprovalState, DecidedVia, EventKind, RunFacts};

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
    EventKind::Answer,
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
                        | AcpError::Sandbox(_)
                )
            );
            return failed(format!("agent could not start: {e}"), retryable);
        }
    };
    let live = session.live();
    // The channel's policy as the claim read it (it may have changed since the agent started).
    let policy = job.permission_policy;
    live.agent.set_policy(policy);
    let options = job.options();
    let applied = match apply_options(live, &options).await {
        Ok(a) => a,
        Err(refusal) => {
            warm.release(job.channel_id, session).await;
            return failed(refusal, false);
        }
    };
    let configured = warm.config().acp.session_mode.as_deref();
    let wanted = match mode_setting(live, &options, configured) {
        Ok(w) => w,
        Err(refusal) => {
            warm.release(job.channel_id, session).await;
            return failed(refusal, false);
        }
    };
    let mode = match put_in_asking_mode(live, wanted.as_deref().or(configured)).await {
        Ok(mode) => mode,
        Err(refusal) => {
            warm.release(job.channel_id, session).await;
            return failed(refusal, false);
        }
    };
    ctx.emit(
        EventKind::Session,
        Some(
            format!(
                "{} session {} (pid {}){}{}, sandbox {}",
                if session.warm { "warm" } else { "cold" },
                live.session_id,
                live.agent.pid(),
                match (&session.warm, &live.fallback) {
                    (false, Some(why)) => format!(", new session ({why})"),
                    (false, None) if live.resumed() =>
                        format!(", resumed with {}", live.opened_with.method()),
                    _ => String::new(),
                },
                mode.describe(),
                live.agent.sandbox().summary(),
            ) + describe_options(&applied).as_str(),
        ),
        Some(serde_json::json!({
            "warm": session.warm,
            "pid": live.agent.pid(),
            "session_id": live.session_id,
            "resumed": live.resumed(),
            "opened_with": live.opened_with.method(),
            "open_fallback": live.fallback,
            "options": live
                .agent
                .session_options(&live.session_id)
                .iter()
                .map(|o| (o.id.clone(), o.current.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "options_set": applied
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "mcp_servers": live
                .agent
                .session_setup()
                .mcp_servers
                .iter()
                .map(|m| m.name.clone())
                .collect::<Vec<_>>(),
            "additional_directories": live.agent.session_setup().additional_directories,
            "start_ms": session.start_time.as_millis() as u64,
            "policy": live.agent.policy(),
            "mode": mode.mode,
            "mode_before": mode.before,
            "mode_set_with": mode.set_with,
            "modes": mode.available,
            "sandbox": live.agent.sandbox(),
        })),
    )
    .await;

    // Forward the agent's updates to the job's events in order, noting first output and usage.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AgentEvent>(client::EVENT_QUEUE);
    let fwd_ctx = ctx.clone();
    let asks_done = CancellationToken::new();
    let mut asker = Asker {
        ctx: ctx.clone(),
        answerer: live.agent.answerer(),
        timeout: Duration::from_secs(warm.config().acp.approval_timeout_secs),
        stop: asks_done.clone(),
        waiting: tokio::task::JoinSet::new(),
    };
    let cost_before = *live.reported_cost.lock().unwrap();
    let limits = Limits::of(&job, &warm.config().budget);
    // Cancelled when the turn passes a limit; the job's own token stays for user cancels.
    let turn_cancel = ctx.cancel_token().child_token();
    let stop_turn = turn_cancel.clone();
    let forward = tokio::spawn(
        async move {
            let mut facts = RunFacts::default();
            let mut usage = TurnUsage::new(cost_before);
            let mut over: Option<String> = None;
            let mut boundaries = MessageBoundaries::default();
            // Whatever has arrived goes to the writer as one batch: an agent that streams fast
            // is written in large multi-row inserts rather than one event at a time.
            let mut batch = Vec::with_capacity(client::EVENT_QUEUE);
            while rx.recv_many(&mut batch, client::EVENT_QUEUE).await > 0 {
                let mut events = Vec::with_capacity(batch.len());
                for mut ev in batch.drain(..) {
                    if ev.kind == EventKind::PermissionRequest || ev.kind == EventKind::Question {
                        // Everything before it is committed first; its row and event follow.
                        fwd_ctx.emit_all(std::mem::take(&mut events)).await;
                        asker.open(ev).await;
                        continue;
                    }
                    boundaries.mark(&mut ev);
                    if facts.first_output_ms.is_none() && is_one_of(&ev.kind, OUTPUT_KINDS) {
                        facts.first_output_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                    }
                    usage.note(&mut facts, &ev);
                    let data = (!ev.data.is_null()).then_some(ev.data);
                    events.push((ev.kind, ev.text, data));
                    if over.is_none() {
                        if let Some((text, data)) = limits.passed(&facts) {
                            tracing::warn!(limit = %text, "the job passed its budget; stopping the turn");
                            events.push((EventKind::Budget.as_str().into(), Some(text.clone()), Some(data)));
                            over = Some(text);
                            stop_turn.cancel();
                        }
                    }
                }
                fwd_ctx.emit_all(events).await;
            }
            asker.finish().await;
            (facts, usage.last_reported, over)
        }
        .in_current_span(),
    );
    // A lost lease (taken over, or this node cannot renew it) stops the agent at once: not
    // after a cancel's grace, and not after anything that waits on the database.
    let fenced = {
        let (token, ctx, pid) = (ctx.cancel_token().clone(), ctx.clone(), live.agent.pid());
        tokio::spawn(async move {
            token.cancelled().await;
            if matches!(ctx.stop_cause(), Some(StopCause::LeaseLost)) {
                tracing::warn!(pid, "the job's lease is lost; killing its agent");
                crate::acp::client::kill_group(pid);
            }
        })
    };
    let turn_started = Instant::now();
    let prompt_limit = match job.timeout_secs {
        Some(t) => Duration::from_secs(t as u64)
            .min(Duration::from_secs(warm.config().acp.prompt_timeout_secs)),
        None => Duration::from_secs(warm.config().acp.prompt_timeout_secs),
    };
    let result = live
        .agent
        .prompt_within(&live.session_id, &job.prompt, tx, turn_cancel, prompt_limit)
        .await;
    fenced.abort();
    if matches!(ctx.stop_cause(), Some(StopCause::LeaseLost)) {
        live.agent.terminate();
    }
    let agent_ms = turn_started.elapsed().as_millis() as i64;
    // Requests still waiting end with the turn (the agent has been answered `cancelled`).
    asks_done.cancel();
    let (mut facts, reported, over_budget) = forward.await.unwrap_or_default();
    if reported.is_some() {
        *live.reported_cost.lock().unwrap() = reported;
    }
    facts.warm = Some(session.warm);
    facts.agent_ms = Some(agent_ms);
    let _ = ctx
        .store()
        .job_record_run(&job.id, job.attempt, facts, crate::store::now_ms())
        .await;
    let was_cancelled =
        matches!(&result, Ok(stop) if stop == "cancelled") || ctx.stop_cause().is_some();
    // A stalled agent may be stuck for good: the next attempt gets a fresh process that resumes
    // the conversation.
    let stalled = matches!(&result, Err(AcpError::Stalled { .. }));
    // A turn stopped for its budget may still be at work: the agent is restarted.
    if matches!(ctx.stop_cause(), Some(StopCause::LeaseLost)) {
        warm.discard(job.channel_id, session).await;
    } else if stalled
        || over_budget.is_some()
        || (was_cancelled && warm.config().acp.recycle_after_cancel)
    {
        warm.recycle(job.channel_id, session).await;
    } else {
        warm.release(job.channel_id, session).await;
    }

    if let (Some(why), None) = (over_budget, ctx.stop_cause()) {
        return Outcome::Stopped {
            stop_reason: "budget".into(),
            error: format!("budget: {why}; the turn was stopped and the agent restarted"),
        };
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
        Err(e @ AcpError::Stalled { .. }) => failed(format!("{e}; the agent was restarted"), true),
        // The same prompt would make the agent do it again.
        Err(e @ AcpError::MessageTooLarge { .. }) => failed(e.to_string(), false),
        Err(e) => failed(e.to_string(), true),
    }
}

/// Opens an approval for each `permission_request` and `question` of the turn and answers the
/// agent once it is decided.
struct Asker {
    ctx: JobContext,
    answerer: Answerer,
    timeout: Duration,
    /// Cancelled when the turn ended.
    stop: CancellationToken,
    waiting: tokio::task::JoinSet<()>,
}

impl Asker {
    async fn open(&mut self, ev: AgentEvent) {
        let Some(ask_id) = ev.data["askId"].as_u64() else {
            return;
        };
        let req = if ev.kind == EventKind::Question {
            approvals::Request::from_question_data(&ev.data)
        } else {
            approvals::Request::from_event_data(&ev.data)
        };
        let opened = approvals::open(self.ctx.store(), &self.ctx.job, req, self.timeout).await;
        let approval = match opened {
            Ok(approvals::Opened::Pending(a)) => a,
            Ok(approvals::Opened::Decided(a)) => {
                self.answerer.answer(ask_id, answer_of(&a));
                return;
            }
            Ok(approvals::Opened::NotRunning) => {
                self.answerer.answer(
                    ask_id,
                    AskAnswer::cancelled(json!({ "reason": "the attempt is no longer running" })),
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record an approval request");
                self.answerer.answer(
                    ask_id,
                    AskAnswer::cancelled(json!({ "reason": format!("cannot record it: {e}") })),
                );
                return;
            }
        };
        tracing::info!(approval = %approval.id, title = ?approval.title, "waiting for a decision");
        let ctx = self.ctx.clone();
        let answerer = self.answerer.clone();
        // The turn ends, or the job is stopped (cancel, shutdown, lease lost).
        let stop = self.stop.clone();
        let job_stop = self.ctx.cancel_token().clone();
        let either = CancellationToken::new();
        let guard = either.clone();
        self.waiting.spawn(
            async move {
                let watcher = tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = job_stop.cancelled() => {}
                    }
                    guard.cancel();
                });
                let end = || match ctx.stop_cause() {
                    Some(StopCause::Shutdown | StopCause::LeaseLost) => {
                        (ApprovalState::Expired, DecidedVia::Restart)
                    }
                    _ => (ApprovalState::Cancelled, DecidedVia::Job),
                };
                let answer = match approvals::wait(ctx.store(), approval, &either, end).await {
                    Ok(decided) => {
                        tracing::info!(approval = %decided.id, state = %decided.state, via = ?decided.decided_via, by = ?decided.decided_by, "approval request decided");
                        answer_of(&decided)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read an approval request's decision");
                        AskAnswer::cancelled(json!({ "reason": format!("cannot read its decision: {e}") }))
                    }
                };
                answerer.answer(ask_id, answer);
                watcher.abort();
            }
            .in_current_span(),
        );
    }

    /// Waits for every open request to end (after the turn they end at once).
    async fn finish(&mut self) {
        while self.waiting.join_next().await.is_some() {}
    }
}

/// The agent's answer for a decided approval, with who decided it for the `permission` or
/// `answer` event.
fn answer_of(a: &Approval) -> AskAnswer {
    AskAnswer {
        option_id: approvals::answer(a),
        content: a.answer.clone(),
        detail: json!({
            "approval": a.id,
            "state": a.state,
            "by": a.decided_by,
            "via": a.decided_via,
            "rule": a.rule_id,
        }),
    }
}

/// Puts the session's config options (but its mode, which [`put_in_asking_mode`] sets) at the
/// values `options` asks for, and any other option a previous job changed back to the value it
/// had when the session opened. Returns what it changed, by option id. An option or value the
/// agent does not offer is refused with the reason (the prompt is not sent).
async fn apply_options(
    live: &Live,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let agent = &live.agent;
    let offered = agent.session_options(&live.session_id);
    let is_mode = |o: &client::ConfigOptionInfo| o.category.as_deref() == Some("mode");
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (k, v) in options {
        match client::find_option(&offered, k) {
            Ok(o) if is_mode(o) => continue,
            Ok(o) => {
                o.value_for(v)
                    .map_err(|e| format!("refused: {e} (set for the channel or the job)"))?;
                wanted.push((o.id.clone(), v.clone()));
            }
            // A mode without a mode option is changed with `session/set_mode`.
            Err(_) if k == "mode" && agent.session_modes(&live.session_id).is_some() => continue,
            Err(e) => return Err(format!("refused: {e} (set for the channel or the job)")),
        }
    }
    // Options a previous job set for its turn only go back to their value at the start.
    for o in offered.iter().filter(|o| !is_mode(o)) {
        if wanted.iter().any(|(id, _)| *id == o.id) {
            continue;
        }
        if let Some(default) = live.option_defaults.get(&o.id) {
            if *default != o.current {
                wanted.push((o.id.clone(), default.clone()));
            }
        }
    }
    let mut changed = Vec::new();
    for (id, value) in wanted {
        match agent.set_config_option(&live.session_id, &id, &value).await {
            Ok((_, true)) => changed.push((id, value)),
            Ok((_, false)) => {}
            Err(e) => {
                return Err(format!(
                    "refused: setting option {id} to {value:?} failed: {e}"
                ))
            }
        }
    }
    if !changed.is_empty() {
        live.options_changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(changed)
}

/// The mode the options ask for (by the mode option's id or `mode`). Under `deny` and `ask` it
/// must be one in which the agent asks gorp (one of [`ASKING_MODES`] or `[acp] session_mode`):
/// any other would let the agent decide for itself, and the policy would not hold.
fn mode_setting(
    live: &Live,
    options: &std::collections::BTreeMap<String, String>,
    configured: Option<&str>,
) -> Result<Option<String>, String> {
    let offered = live.agent.session_options(&live.session_id);
    let mode_id = offered
        .iter()
        .find(|o| o.category.as_deref() == Some("mode"))
        .map(|o| o.id.clone());
    let wanted = mode_id
        .as_ref()
        .and_then(|id| options.get(id))
        .or_else(|| options.get("mode"))
        .cloned();
    let Some(w) = wanted else { return Ok(None) };
    let policy = live.agent.policy();
    let asks = ASKING_MODES.contains(&w.as_str()) || configured == Some(w.as_str());
    if policy != PermissionPolicy::Allow && !asks {
        return Err(format!(
            "refused: mode {w:?} lets the agent use tools without asking, so permission policy \
             {policy} could not hold; under {policy} gorp runs the agent only in a mode in which \
             it asks ({}{})",
            ASKING_MODES.join(", "),
            configured.map(|c| format!(", {c}")).unwrap_or_default()
        ));
    }
    Ok(Some(w))
}

/// `, options model=fast` for what a turn changed; nothing when it changed none.
fn describe_options(changed: &[(String, String)]) -> String {
    if changed.is_empty() {
        return String::new();
    }
    let list: Vec<String> = changed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(", options {}", list.join(" "))
}

/// The session mode a prompt runs in, as recorded in the job's `session` event.
#[derive(Debug, Default, PartialEq)]
struct ModeFacts {
    /// The mode the session is in; `None` when the agent advertises no modes.
    mode: Option<String>,
    /// The mode it was in before gorp changed it (only when gorp changed it).
    before: Option<String>,
    /// The ACP method gorp changed it with.
    set_with: Option<&'static str>,
    available: Vec<String>,
}

impl ModeFacts {
    /// `, mode default (was auto)`; nothing for an agent without modes.
    fn describe(&self) -> String {
        match (&self.mode, &self.before) {
            (None, _) => String::new(),
            (Some(m), Some(b)) => format!(", mode {m} (was {b})"),
            (Some(m), None) => format!(", mode {m}"),
        }
    }
}

/// Puts the session in a mode in which the agent asks gorp before it uses a tool, so the
/// channel's permission policy is the one that holds. Under `deny` an agent that offers
/// modes but none that asks (or will not switch) is refused with the reason; under `allow`
/// it runs in its own mode, recorded. An agent that advertises no modes has one behaviour,
/// asking per ACP; it runs.
async fn put_in_asking_mode(live: &Live, wanted: Option<&str>) -> Result<ModeFacts, String> {
    let agent = &live.agent;
    let Some(modes) = agent.session_modes(&live.session_id) else {
        return Ok(ModeFacts::default());
    };
    let policy = agent.policy();
    let enforced = policy != PermissionPolicy::Allow;
    let mut facts = ModeFacts {
        mode: Some(modes.current.clone()),
        available: modes.available.clone(),
        ..ModeFacts::default()
    };
    let Some(target) = modes.asking_mode(wanted) else {
        let why = match wanted {
            Some(w) => format!("[acp] session_mode = {w:?} is not one of the agent's modes"),
            None => format!(
                "the agent offers no mode in which it asks before using a tool (gorp knows {}; \
                 set [acp] session_mode to one)",
                ASKING_MODES.join(", ")
            ),
        };
        if enforced {
            return Err(format!(
                "refused: permission policy {policy} cannot hold on this agent: its session runs \
                 in mode {:?} (modes: {}) and {why}",
                modes.current,
                modes.available.join(", ")
            ));
        }
        tracing::warn!(mode = %modes.current, "the agent decides permissions itself in its mode: {why}");
        return Ok(facts);
    };
    if modes.current == target {
        return Ok(facts);
    }
    match agent.set_session_mode(&live.session_id, &target).await {
        Ok(()) => {
            facts.before = Some(modes.current);
            facts.mode = Some(target);
            facts.set_with = Some(modes.control.method());
            Ok(facts)
        }
        Err(e) if enforced => Err(format!(
            "refused: permission policy {policy} cannot hold on this agent: putting its session in \
             mode {target:?} (from {:?}) failed: {e}",
            modes.current
        )),
        Err(e) => {
            tracing::warn!(mode = %modes.current, "cannot put the session in mode {target}: {e}");
            Ok(facts)
        }
    }
}

/// The limits a job's turn runs under: the smallest of the job's own `max_cost_usd`, the
/// channel's per-job budget and `[budget]`'s.
struct Limits {
    cost: Option<(f64, &'static str)>,
    tokens: Option<(i64, &'static str)>,
}

impl Limits {
    fn of(job: &crate::store::Job, cfg: &crate::config::BudgetConfig) -> Limits {
        let channel_cost = match (job.budget_job_usd, cfg.job_max_cost_usd) {
            (Some(c), _) => Some((c, "the channel's per-job budget")),
            (None, Some(c)) => Some((c, "[budget] job_max_cost_usd")),
            (None, None) => None,
        };
        let cost = match (
            job.max_cost_usd.map(|c| (c, "the job's max_cost_usd")),
            channel_cost,
        ) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let tokens = match (job.budget_job_tokens, cfg.job_max_tokens) {
            (Some(t), _) => Some((t, "the channel's per-job token budget")),
            (None, Some(t)) => Some((t as i64, "[budget] job_max_tokens")),
            (None, None) => None,
        };
        Limits { cost, tokens }
    }

    /// The limit the turn's usage so far passed, said in words and as event data.
    fn passed(&self, f: &RunFacts) -> Option<(String, serde_json::Value)> {
        if let (Some((limit, what)), Some(cost)) = (self.cost, f.cost_usd) {
            if cost > limit {
                return Some((
                    format!("the turn cost {cost:.4} USD, more than {limit:.4} USD ({what})"),
                    json!({ "limit": "cost_usd", "max": limit, "used": cost, "set_by": what }),
                ));
            }
        }
        let used = f.input_tokens.unwrap_or(0) + f.output_tokens.unwrap_or(0);
        if let Some((limit, what)) = self.tokens {
            if used > limit {
                return Some((
                    format!("the turn used {used} tokens, more than {limit} ({what})"),
                    json!({ "limit": "tokens", "max": limit, "used": used, "set_by": what }),
                ));
            }
        }
        None
    }
}

/// A turn's usage as the agent reports it: `usage_update` (the session's cumulative cost, and
/// token counts in `_meta` where the agent gives them) and the turn's end usage (tokens,
/// cache reads and writes).
struct TurnUsage {
    /// The session's cumulative cost before this turn.
    before: Option<f64>,
    /// The last cumulative cost reported in this turn.
    last_reported: Option<f64>,
}

impl TurnUsage {
    fn new(before: Option<f64>) -> Self {
        TurnUsage {
            before,
            last_reported: None,
        }
    }

    fn note(&mut self, facts: &mut RunFacts, ev: &AgentEvent) {
        let d = &ev.data;
        let int = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_i64());
        match ev.kind.parse::<EventKind>() {
            Ok(EventKind::Usage) => {
                if let Some(c) = d.pointer("/cost/amount").and_then(|v| v.as_f64()) {
                    self.last_reported = Some(c);
                    let before = self.before.unwrap_or(0.0);
                    // A total below the last one is a new session (a restarted agent counts
                    // from zero): all of it is this turn's.
                    facts.cost_usd = Some(if c >= before { c - before } else { c });
                }
                let meta = d.get("_meta");
                if let Some(i) = int(meta.and_then(|m| m.get("inputTokens"))) {
                    facts.input_tokens = Some(i);
                }
                if let Some(o) = int(meta.and_then(|m| m.get("outputTokens"))) {
                    facts.output_tokens = Some(o);
                }
            }
            Ok(EventKind::TurnUsage) => {
                if let Some(i) = int(d.get("inputTokens")) {
                    facts.input_tokens = Some(i);
                }
                if let Some(o) = int(d.get("outputTokens")) {
                    facts.output_tokens = Some(o);
                }
                if let Some(r) = int(d.get("cachedReadTokens")) {
                    facts.cache_read_tokens = Some(r);
                }
                if let Some(w) = int(d.get("cachedWriteTokens")) {
                    facts.cache_write_tokens = Some(w);
                }
            }
            _ => {}
        }
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
