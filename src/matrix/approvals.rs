//! Permission requests and questions in the room: approval rows → Matrix, and people's answers
//! → decisions.
//!
//! The approvals pump posts each pending approval of a channel with a room once it is
//! committed (title, kind, the input as a code block or diff, and how to answer), adds the
//! answer reactions to it (✅ allow once, ♾️ allow always, ❌ deny) so one tap answers, records
//! where it posted in `matrix_approvals`, and edits the message when the approval is decided
//! (by whom and how, or that it timed out, expired or was withdrawn). A request a rule decided
//! at once is never posted.
//!
//! A question of the agent is posted with its message, the form's fields and their numbered
//! choices; the bot adds a keycap reaction (1️⃣ …) per choice of the first choice field, when it
//! is a single choice of at most nine, and ❌ to decline.
//!
//! [`on_reaction`] turns a reaction on a posted request into a decision, only when it comes
//! from one of `allowed_users`; the bot's own reactions, anyone else's and answers to a
//! request already decided change nothing and are logged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::events::reaction::{OriginalSyncReactionEvent, ReactionEventContent};
use matrix_sdk::ruma::events::relation::Annotation;
use matrix_sdk::ruma::events::room::message::{ReplacementMetadata, RoomMessageEventContent};
use matrix_sdk::ruma::{EventId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use tokio_util::sync::CancellationToken;

use super::render::markdown_to_html;
use super::strings;
use crate::config::Config;
use crate::service::approvals::{self, Choice, DecideError};
use crate::service::questions;
use crate::store::{now_ms, DecidedVia, MatrixApprovalDue, RequestKind, Store};

/// Approvals handled per pass.
const BATCH: i64 = 100;
/// A request that cannot be posted or edited is given up after this many tries.
const MAX_TRIES: i64 = 20;

pub struct ApprovalPump {
    client: Client,
    store: Store,
    timeout_secs: u64,
    /// When each failing approval may be tried again.
    retry_at: HashMap<String, Instant>,
}

impl ApprovalPump {
    pub fn new(client: Client, store: Store, config: &Config) -> ApprovalPump {
        ApprovalPump {
            client,
            store,
            timeout_secs: config.acp.approval_timeout_secs,
            retry_at: HashMap::new(),
        }
    }

    /// Runs until `shutdown`: a pass after every commit of this process, and every second for
    /// the decisions other processes make (`gorp approve`).
    #[tracing::instrument(name = "matrix_approvals", skip_all)]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut commits = self.store.subscribe_commits();
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "Matrix approvals pass failed");
            }
            tokio::select! {
                _ = commits.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Posts what is due and edits what was decided. Returns how many it handled.
    pub async fn pass(&mut self) -> anyhow::Result<usize> {
        let due = self.store.matrix_approvals_due(BATCH).await?;
        let mut handled = 0;
        for d in due {
            if d.attempts >= MAX_TRIES
                || self
                    .retry_at
                    .get(&d.approval_id)
                    .is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            let span = tracing::info_span!("matrix_approval", approval = %d.approval_id, room = %d.room_id);
            let _enter = span.enter();
            match self.handle(&d).await {
                Ok(()) => {
                    self.retry_at.remove(&d.approval_id);
                    handled += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot post or edit a permission request");
                    let wait = Duration::from_secs(1u64 << d.attempts.clamp(0, 6));
                    self.retry_at
                        .insert(d.approval_id.clone(), Instant::now() + wait);
                    self.store
                        .matrix_approval_record(
                            &d.approval_id,
                            &d.room_id,
                            None,
                            None,
                            Some(&e.to_string()),
                            now_ms(),
                        )
                        .await?;
                }
            }
        }
        Ok(handled)
    }

    async fn handle(&self, d: &MatrixApprovalDue) -> anyhow::Result<()> {
        let Some(a) = self.store.approval_get(&d.approval_id).await? else {
            return Ok(());
        };
        let room_id = RoomId::parse(d.room_id.as_str())?;
        let room = self
            .client
            .get_room(&room_id)
            .ok_or_else(|| anyhow::anyhow!("gorp is not in the room"))?;
        match d.event_id.as_deref() {
            None => {
                let (text, keys) = match a.request {
                    RequestKind::Permission => (
                        strings::approval_request(
                            &a.id,
                            &a.job_id,
                            a.title.as_deref(),
                            a.kind.as_deref(),
                            &a.input,
                            self.timeout_secs,
                        ),
                        vec![
                            strings::ALLOW_ONCE_KEY,
                            strings::ALLOW_ALWAYS_KEY,
                            strings::DENY_KEY,
                        ],
                    ),
                    RequestKind::Question => {
                        let fields = questions::fields(&a.input["requestedSchema"]);
                        let numbers = number_choices(&fields).map_or(0, |f| f.choices.len());
                        let mut keys = strings::NUMBER_KEYS[..numbers].to_vec();
                        keys.push(strings::DENY_KEY);
                        let text = strings::question_request(
                            &a.id,
                            &a.job_id,
                            a.title.as_deref(),
                            &fields,
                            numbers,
                            self.timeout_secs,
                        );
                        (text, keys)
                    }
                };
                let sent = room
                    .send(RoomMessageEventContent::text_html(
                        &text,
                        markdown_to_html(&text),
                    ))
                    .await?;
                let event_id = sent.response.event_id;
                self.store
                    .matrix_approval_record(
                        &a.id,
                        &d.room_id,
                        Some(event_id.as_str()),
                        None,
                        None,
                        now_ms(),
                    )
                    .await?;
                metrics::counter!(crate::metrics::MATRIX_SENDS, "kind" => "approval").increment(1);
                tracing::info!(event = %event_id, request = %a.request, "request posted");
                // The answers as reactions of the bot's own, so people answer with one tap.
                for key in keys {
                    room.send(ReactionEventContent::new(Annotation::new(
                        event_id.clone(),
                        key.to_string(),
                    )))
                    .await?;
                }
            }
            Some(event_id) => {
                let event_id = EventId::parse(event_id)?;
                let rule = match a.rule_id {
                    Some(id) => self
                        .store
                        .rule_list(a.channel_id)
                        .await?
                        .into_iter()
                        .find(|r| r.id == id)
                        .map(|r| format!("{} {}", r.tool_kind, r.matcher)),
                    None => None,
                };
                let title: Option<String> = a.title.as_deref().map(|t| match a.request {
                    RequestKind::Question => strings::first_words(t),
                    RequestKind::Permission => t.to_string(),
                });
                let mut text = strings::approval_decided(
                    &a.id,
                    title.as_deref(),
                    a.state,
                    a.decided_by.as_deref(),
                    a.decided_via,
                    rule.as_deref(),
                );
                if let Some(answer) = &a.answer {
                    text.push_str(&strings::answer_shown(answer));
                }
                let content = RoomMessageEventContent::text_html(&text, markdown_to_html(&text))
                    .make_replacement(ReplacementMetadata::new(event_id, None));
                room.send(content).await?;
                self.store
                    .matrix_approval_record(&a.id, &d.room_id, None, Some(a.state), None, now_ms())
                    .await?;
                metrics::counter!(crate::metrics::MATRIX_SENDS, "kind" => "approval_edit")
                    .increment(1);
            }
        }
        Ok(())
    }
}

/// The field whose choices the number reactions pick: the form's first field with choices,
/// when it takes one of at most nine.
fn number_choices(fields: &[questions::Field]) -> Option<&questions::Field> {
    fields
        .iter()
        .find(|f| !f.choices.is_empty())
        .filter(|f| f.kind != "array" && f.choices.len() <= strings::NUMBER_KEYS.len())
}

/// What a reaction key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// ✅, ♾️ or ❌.
    Choice(Choice),
    /// A keycap 1️⃣ to 9️⃣: the choice with this number (from 1) of a question.
    Number(usize),
}

/// The answer a reaction key stands for.
pub fn choice_of_key(key: &str) -> Option<Key> {
    if let Some(i) = strings::NUMBER_KEYS.iter().position(|k| *k == key) {
        return Some(Key::Number(i + 1));
    }
    let key = key.trim_end_matches('\u{fe0f}');
    if key == strings::ALLOW_ONCE_KEY {
        Some(Key::Choice(Choice::AllowOnce))
    } else if key == strings::ALLOW_ALWAYS_KEY.trim_end_matches('\u{fe0f}') {
        Some(Key::Choice(Choice::AllowAlways))
    } else if key == strings::DENY_KEY {
        Some(Key::Choice(Choice::Deny))
    } else {
        None
    }
}

/// A reaction on a posted permission request; `allowed` says whether its sender may decide.
/// Returns false when the reaction is not on a request (the caller handles it otherwise).
pub async fn on_reaction(
    store: &Store,
    me: &UserId,
    allowed: bool,
    ev: &OriginalSyncReactionEvent,
    room: &Room,
) -> bool {
    let Some(key) = choice_of_key(&ev.content.relates_to.key) else {
        return false;
    };
    let target = ev.content.relates_to.event_id.as_str();
    let approval = match store
        .matrix_approval_by_event(room.room_id().as_str(), target)
        .await
    {
        Ok(Some(id)) => id,
        Ok(None) => return false,
        Err(e) => {
            tracing::error!(error = %e, "cannot look up the request of a reaction");
            return true;
        }
    };
    let span = tracing::info_span!("matrix_approval", approval = %approval, by = %ev.sender);
    let _enter = span.enter();
    if ev.sender == me {
        tracing::info!("the bot's own answer reaction; ignored");
        return true;
    }
    if !allowed {
        tracing::warn!(key = %ev.content.relates_to.key, "a reaction on a permission request from someone not in allowed_users; ignored");
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "refused_approval_reaction")
            .increment(1);
        return true;
    }
    let choice = match key {
        Key::Choice(c) => c,
        Key::Number(n) => {
            // A number picks a question's choice; on anything else it means nothing.
            let picked = match store.approval_get(&approval).await {
                Ok(Some(a)) if a.request == RequestKind::Question => {
                    let fields = questions::fields(&a.input["requestedSchema"]);
                    number_choices(&fields).and_then(|f| {
                        let (value, _) = f.choices.get(n - 1)?;
                        Some(serde_json::json!({ f.name.clone(): value }))
                    })
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the request of a reaction");
                    return true;
                }
            };
            match picked {
                Some(content) => Choice::Answer(content),
                None => {
                    tracing::info!(
                        number = n,
                        "a number reaction that picks no choice; ignored"
                    );
                    return true;
                }
            }
        }
    };
    match approvals::decide(
        store,
        &approval,
        choice,
        ev.sender.as_str(),
        DecidedVia::Matrix,
    )
    .await
    {
        Ok(a) => {
            tracing::info!(state = %a.state, option = ?a.option_id, answer = ?a.answer, "request decided by reaction");
            metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "approval_reaction")
                .increment(1);
        }
        Err(DecideError::AlreadyDecided { state, .. }) => {
            tracing::info!(%state, "a reaction on a request already decided; ignored");
        }
        Err(e) => tracing::warn!(error = %e, "cannot decide a request by reaction"),
    }
    true
}
