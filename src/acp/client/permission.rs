//! Answering the agent's `session/request_permission` by the channel's policy.
//!
//! Under `allow` and `deny` gorp answers at once. Under `ask` the request is handed to whoever
//! runs the prompt: a `permission_request` event (with an `askId`) goes into the prompt's
//! event stream, in order with the agent's other updates, and the agent waits until
//! [`Answerer::answer`] is called with that id. A request outside a running prompt, one whose
//! prompt ends first, and one nobody answers before the connection stops, are answered
//! `cancelled`, as ACP asks of a client whose turn was cancelled. Every answer is a
//! `permission` event.

use std::time::Instant;

use super::*;

/// How an `ask` request (a permission request or a question) was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct AskAnswer {
    /// For a permission request, the option id to answer the agent with (one it offered); for
    /// a question, `accept` or `decline`. `None` answers `cancelled` (`cancel`).
    pub option_id: Option<String>,
    /// An accepted question's content (an object of field → value).
    pub content: Option<Value>,
    /// Who decided and how, recorded as `decision` in the `permission` or `answer` event.
    pub detail: Value,
}

impl AskAnswer {
    /// Answers `cancelled`.
    pub fn cancelled(detail: Value) -> Self {
        AskAnswer {
            option_id: None,
            content: None,
            detail,
        }
    }
}

/// A request waiting for [`Answerer::answer`].
pub(super) struct PendingAsk {
    session: String,
    reply: oneshot::Sender<AskAnswer>,
}

/// Time a session's prompt spent waiting for people: the prompt's deadline moves by it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct AskClock {
    waited: Duration,
    /// Requests waiting now, and since when the first of them waits.
    waiting: usize,
    since: Option<Instant>,
}

impl AskClock {
    /// Waited so far, the running wait included.
    pub(super) fn total(&self) -> Duration {
        self.waited + self.since.map(|s| s.elapsed()).unwrap_or_default()
    }

    pub(super) fn is_waiting(&self) -> bool {
        self.waiting > 0
    }
}

/// Answers `ask` requests of one agent process; cheap to clone and usable from any task.
#[derive(Clone)]
pub struct Answerer {
    shared: Arc<Shared>,
}

impl Answerer {
    /// Answers the request `ask_id` (from its `permission_request` event). False when it is no
    /// longer waiting (answered, or its prompt ended).
    pub fn answer(&self, ask_id: u64, answer: AskAnswer) -> bool {
        let pending = self.shared.asks.lock().unwrap().remove(&ask_id);
        match pending {
            Some(p) => p.reply.send(answer).is_ok(),
            None => false,
        }
    }
}

impl AgentProcess {
    /// Sets the policy later permission requests are answered by.
    pub fn set_policy(&self, policy: PermissionPolicy) {
        *self.shared.policy.lock().unwrap() = policy;
    }

    /// The handle that answers this process's `ask` requests.
    pub fn answerer(&self) -> Answerer {
        Answerer {
            shared: self.shared.clone(),
        }
    }
}

fn option_json(o: &PermissionOption) -> Value {
    json!({ "id": o.option_id.to_string(), "name": o.name, "kind": enum_str(&o.kind) })
}

impl Shared {
    pub(super) fn policy(&self) -> PermissionPolicy {
        *self.policy.lock().unwrap()
    }

    /// Drops the requests of `session` still waiting (its prompt ended): they are answered
    /// `cancelled`.
    pub(super) fn drop_asks(&self, session: &str) {
        self.asks
            .lock()
            .unwrap()
            .retain(|_, p| p.session != session);
        self.ask_clocks.lock().unwrap().remove(session);
        self.activity.lock().unwrap().remove(session);
    }

    pub(super) fn ask_clock(&self, session: &str) -> AskClock {
        self.ask_clocks
            .lock()
            .unwrap()
            .get(session)
            .copied()
            .unwrap_or_default()
    }

    fn clock_start(&self, session: &str) {
        let mut clocks = self.ask_clocks.lock().unwrap();
        let c = clocks.entry(session.to_string()).or_default();
        if c.waiting == 0 {
            c.since = Some(Instant::now());
        }
        c.waiting += 1;
    }

    fn clock_stop(&self, session: &str) {
        // The time spent asking is not the agent's silence.
        self.active(session);
        let mut clocks = self.ask_clocks.lock().unwrap();
        if let Some(c) = clocks.get_mut(session) {
            c.waiting = c.waiting.saturating_sub(1);
            if c.waiting == 0 {
                if let Some(since) = c.since.take() {
                    c.waited += since.elapsed();
                }
            }
        }
    }

    /// Hands an `ask` request to the prompt running on `session` as the event `kind` (its
    /// `data` gets the `askId`) and waits for its answer.
    pub(super) async fn ask(
        &self,
        session: &str,
        kind: EventKind,
        text: Option<String>,
        mut data: Value,
    ) -> AskAnswer {
        let session = session.to_string();
        let id = self.next_ask.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, rx) = oneshot::channel();
        self.asks.lock().unwrap().insert(
            id,
            PendingAsk {
                session: session.clone(),
                reply,
            },
        );
        data["askId"] = json!(id);
        let event = AgentEvent::new(kind.as_str(), text, data);
        self.clock_start(&session);
        let unanswered = |why: &str| AskAnswer::cancelled(json!({ "reason": why }));
        let answer = if self.send_to_prompt(&session, event).await {
            tokio::select! {
                r = rx => r.unwrap_or_else(|_| unanswered("the prompt ended")),
                _ = self.stopped.cancelled() => unanswered("the connection stopped"),
            }
        } else {
            unanswered("no prompt is running")
        };
        self.clock_stop(&session);
        self.asks.lock().unwrap().remove(&id);
        answer
    }

    pub(super) async fn decide_permission(
        &self,
        req: &RequestPermissionRequest,
    ) -> RequestPermissionResponse {
        let policy = self.policy();
        let options: Vec<Value> = req.options.iter().map(option_json).collect();
        let tool_call = serde_json::to_value(&req.tool_call).unwrap_or(Value::Null);
        let mut decision = Value::Null;
        let chosen = match policy {
            PermissionPolicy::Allow | PermissionPolicy::Deny => {
                let preferred: &[PermissionOptionKind] = if policy == PermissionPolicy::Allow {
                    &[
                        PermissionOptionKind::AllowOnce,
                        PermissionOptionKind::AllowAlways,
                    ]
                } else {
                    &[
                        PermissionOptionKind::RejectOnce,
                        PermissionOptionKind::RejectAlways,
                    ]
                };
                preferred
                    .iter()
                    .find_map(|kind| req.options.iter().find(|o| o.kind == *kind))
            }
            PermissionPolicy::Ask => {
                let answer = self
                    .ask(
                        &req.session_id.0,
                        EventKind::PermissionRequest,
                        req.tool_call.fields.title.clone(),
                        json!({ "options": options, "toolCall": tool_call }),
                    )
                    .await;
                decision = answer.detail;
                // Only an option the agent offered is sent back.
                answer
                    .option_id
                    .and_then(|id| req.options.iter().find(|o| *o.option_id.0 == *id))
            }
        };
        let (event, response) = match chosen {
            Some(option) => (
                AgentEvent::new(
                    EventKind::Permission.as_str(),
                    Some(option.option_id.to_string()),
                    json!({
                        "policy": policy,
                        "outcome": "selected",
                        "optionId": option.option_id.to_string(),
                        "optionKind": enum_str(&option.kind),
                        "options": options,
                        "toolCall": tool_call,
                        "decision": decision,
                    }),
                ),
                RequestPermissionResponse::new(RequestPermissionOutcome::Selected(
                    SelectedPermissionOutcome::new(option.option_id.clone()),
                )),
            ),
            None => (
                AgentEvent::new(
                    EventKind::Permission.as_str(),
                    Some("cancelled".to_string()),
                    json!({
                        "policy": policy,
                        "outcome": "cancelled",
                        "optionId": null,
                        "optionKind": null,
                        "options": options,
                        "toolCall": tool_call,
                        "decision": decision,
                    }),
                ),
                RequestPermissionResponse::new(RequestPermissionOutcome::Cancelled),
            ),
        };
        self.emit(&req.session_id.0, event).await;
        response
    }
}
