//! The bot's event handlers and the dispatch of commands to [`commands`].
//!
//! Handlers run inside the sync loop, so they only validate, write rows and hand off: a message
//! becomes a committed job (the reply pump reacts 👀 once it sees the row), a command runs in its
//! own task. Only `allowed_users` are served; their invites are joined, everyone else's are
//! rejected (and logged), and verification requests are cancelled, never accepted.
//!
//! Each handler runs in a span with the room and the event (and the job, once one is enqueued
//! or found); a command's task carries that span along.

use std::sync::Arc;

use anyhow::Context;
use matrix_sdk::ruma::events::key::verification::request::ToDeviceKeyVerificationRequestEvent;
use matrix_sdk::ruma::events::reaction::OriginalSyncReactionEvent;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::member::{
    MembershipState, OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, UserId};
use matrix_sdk::{Client, Room, RoomState};
use tracing::Instrument;

use super::command::{self, Command};
use super::failure::{self, Failure};
use super::render::markdown_to_html;
use super::{commands, strings, Services};
use crate::store::{CancelOutcome, MatrixTarget, NewJob, Source, StoreError};

/// The bot: a logged-in client and gorp's services.
#[derive(Clone)]
pub struct Bot {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    services: Services,
    me: OwnedUserId,
    allowed: Vec<OwnedUserId>,
    /// Welcomes (with the webhook token) waiting for the invitee to join the new room: posted
    /// once they are a member, so their devices receive the room key.
    welcomes: std::sync::Mutex<std::collections::HashMap<(OwnedRoomId, OwnedUserId), String>>,
}

impl Bot {
    pub fn new(client: Client, services: Services) -> anyhow::Result<Bot> {
        let me = client.user_id().context("not logged in")?.to_owned();
        let m = services
            .config
            .matrix
            .as_ref()
            .context("[matrix] is not configured")?;
        let allowed = m
            .allowed_users
            .iter()
            .map(|u| UserId::parse(u.as_str()).map_err(|e| anyhow::anyhow!("{u}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Bot {
            inner: Arc::new(Inner {
                client,
                services,
                me,
                allowed,
                welcomes: Default::default(),
            }),
        })
    }

    fn is_allowed(&self, user: &UserId) -> bool {
        self.inner.allowed.iter().any(|u| u == user)
    }

    /// Attaches the handlers. Call after the catch-up sync.
    pub fn attach(&self) {
        let client = &self.inner.client;
        let bot = self.clone();
        client.add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
            let bot = bot.clone();
            async move { bot.on_invite(ev, room).await }
        });
        let bot = self.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
            let bot = bot.clone();
            async move { bot.on_message(ev, room).await }
        });
        let bot = self.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMemberEvent, room: Room| {
            let bot = bot.clone();
            async move {
                if ev.content.membership != MembershipState::Join {
                    return;
                }
                let Ok(user) = UserId::parse(ev.state_key.as_str()) else {
                    return;
                };
                let key = (room.room_id().to_owned(), user);
                let welcome = bot.take_welcome(&key);
                tracing::debug!(room = %key.0, user = %key.1, pending = welcome.is_some(), "member joined");
                if let Some(text) = welcome {
                    tokio::spawn(async move { bot.say(&room, &text).await });
                }
            }
        });
        let bot = self.clone();
        client.add_event_handler(move |ev: OriginalSyncReactionEvent, room: Room| {
            let bot = bot.clone();
            async move { bot.on_reaction(ev, room).await }
        });
        let bot = self.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent, room: Room| {
            let bot = bot.clone();
            async move { bot.on_undecryptable(ev, room).await }
        });
        client.add_event_handler(
            move |ev: ToDeviceKeyVerificationRequestEvent, client: Client| async move {
                // Never accept: a bot that confirms verifications blindly defeats their purpose.
                tracing::info!(from = %ev.sender, "declining a device verification request");
                if let Some(req) = client
                    .encryption()
                    .get_verification_request(&ev.sender, &ev.content.transaction_id)
                    .await
                {
                    let _ = req.cancel().await;
                }
            },
        );
    }

    /// Answers invites that arrived while gorp was down (the catch-up sync runs before the
    /// handlers, and an invite is state, not a message to leave unanswered).
    pub async fn answer_pending_invites(&self) {
        for room in self.inner.client.invited_rooms() {
            match room.invite_details().await {
                Ok(invite) => self.answer_invite(&invite.inviter_id, room).await,
                Err(e) => {
                    tracing::warn!(room = %room.room_id(), error = %e, "cannot read a pending invite")
                }
            }
        }
    }

    #[tracing::instrument(name = "matrix_invite", skip_all, fields(room = %room.room_id(), from = %ev.sender))]
    async fn on_invite(&self, ev: StrippedRoomMemberEvent, room: Room) {
        if ev.state_key != self.inner.me
            || ev.content.membership != MembershipState::Invite
            || room.state() != RoomState::Invited
        {
            return;
        }
        let bot = self.clone();
        // Joining waits for the homeserver; the sync loop must not.
        tokio::spawn(
            async move { bot.answer_invite(&ev.sender, room).await }
                .instrument(tracing::Span::current()),
        );
    }

    async fn answer_invite(&self, inviter: &UserId, room: Room) {
        let ev_sender = inviter;
        if self.is_allowed(ev_sender) {
            tracing::info!(room = %room.room_id(), from = %ev_sender, "joining on invite");
            // The invite can arrive before the homeserver lets us join: retry briefly.
            let mut delay = std::time::Duration::from_millis(200);
            for _ in 0..5 {
                match room.join().await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(room = %room.room_id(), error = %e, "join failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        } else {
            tracing::info!(room = %room.room_id(), from = %ev_sender, "rejecting an invite from a user who is not allowed");
            if let Err(e) = room.leave().await {
                tracing::warn!(room = %room.room_id(), error = %e, "cannot reject the invite");
            }
        }
    }

    #[tracing::instrument(name = "matrix_message", skip_all, fields(room = %room.room_id(), event = %ev.event_id, job = tracing::field::Empty))]
    async fn on_message(&self, ev: OriginalSyncRoomMessageEvent, room: Room) {
        if ev.sender == self.inner.me || room.state() != RoomState::Joined {
            return;
        }
        if !self.is_allowed(&ev.sender) {
            // Who and where, never what: the body is a stranger's text.
            tracing::info!(from = %ev.sender, "refused a message from a user who is not allowed");
            metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "refused").increment(1);
            return;
        }
        if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
            return;
        }
        let body = match &ev.content.msgtype {
            MessageType::Text(t) => t.body.clone(),
            _ => return,
        };
        // Replies quote the original as "> …" lines; the prompt is what follows.
        let body = strip_reply_fallback(&body);
        if let Some(parsed) = command::parse(&body) {
            metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "command").increment(1);
            let bot = self.clone();
            let sender = ev.sender.clone();
            tokio::spawn(
                async move { bot.run_command(parsed, room, sender).await }
                    .instrument(tracing::Span::current()),
            );
            return;
        }
        let text = match self.enqueue(&ev, &room, body).await {
            Ok(()) => return,
            Err(failure) => failure.answer(),
        };
        self.say(&room, &text).await;
    }

    /// Turns a prompt into a job of the room's channel.
    async fn enqueue(
        &self,
        ev: &OriginalSyncRoomMessageEvent,
        room: &Room,
        body: String,
    ) -> Result<(), Failure> {
        let store = &self.inner.services.store;
        let channel = store
            .channel_get_by_room(room.room_id().as_str())
            .await?
            .ok_or_else(|| failure::refuse(strings::NOT_A_CHANNEL))?;
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "prompt").increment(1);
        let target = MatrixTarget {
            room_id: room.room_id().to_string(),
            event_id: ev.event_id.to_string(),
            sender: ev.sender.to_string(),
        };
        let mut job = NewJob::new(channel.id, Source::Matrix, body);
        // A message delivered twice (a sync replayed after a crash) stays one job.
        job.idempotency_key = Some(ev.event_id.to_string());
        job.reply_target = Some(serde_json::to_string(&target).expect("target serialises"));
        match crate::service::jobs::enqueue(store, job, std::time::Instant::now()).await {
            Ok(e) => {
                tracing::Span::current().record("job", e.job_id.as_str());
                tracing::info!(channel = %channel.name, created = e.created, "Matrix message enqueued");
                Ok(())
            }
            Err(StoreError::Invalid(why)) => Err(failure::refuse(strings::not_queued(&why))),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a parsed command and answers it. Deleting the channel of this very room answers
    /// first, then leaves.
    async fn run_command(
        &self,
        parsed: Result<Command, command::CommandError>,
        room: Room,
        sender: OwnedUserId,
    ) {
        let cmd = match parsed {
            Ok(cmd) => cmd,
            Err(e) => {
                self.say(&room, &failure::refuse(e.message).answer()).await;
                return;
            }
        };
        let leaving = match &cmd {
            Command::Delete { name } => self
                .inner
                .services
                .store
                .channel_get_by_room(room.room_id().as_str())
                .await
                .ok()
                .flatten()
                .is_some_and(|c| &c.name == name),
            _ => false,
        };
        let text = commands::run(self, cmd, &room, &sender).await;
        self.say(&room, &text).await;
        let store = &self.inner.services.store;
        if leaving
            && matches!(
                store.channel_get_by_room(room.room_id().as_str()).await,
                Ok(None)
            )
        {
            let _ = room.leave().await;
        }
    }

    /// A message gorp cannot decrypt (its room key never reached gorp's device, e.g. a client
    /// that shares keys only with verified devices): say so instead of staying silent.
    #[tracing::instrument(name = "matrix_undecryptable", skip_all, fields(room = %room.room_id(), event = %ev.event_id))]
    async fn on_undecryptable(&self, ev: OriginalSyncRoomEncryptedEvent, room: Room) {
        if ev.sender == self.inner.me
            || !self.is_allowed(&ev.sender)
            || room.state() != RoomState::Joined
        {
            return;
        }
        tracing::warn!(from = %ev.sender, "cannot decrypt a message");
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "undecryptable").increment(1);
        let bot = self.clone();
        let text = strings::undecryptable(&ev.sender);
        tokio::spawn(
            async move { bot.say(&room, &text).await }.instrument(tracing::Span::current()),
        );
    }

    #[tracing::instrument(name = "matrix_reaction", skip_all, fields(room = %room.room_id(), event = %ev.event_id, job = tracing::field::Empty))]
    async fn on_reaction(&self, ev: OriginalSyncReactionEvent, room: Room) {
        // An answer to a posted permission request (decided only by allowed users).
        let allowed = self.is_allowed(&ev.sender);
        if super::approvals::on_reaction(
            &self.inner.services.store,
            &self.inner.me,
            allowed,
            &ev,
            &room,
        )
        .await
        {
            return;
        }
        if ev.sender == self.inner.me || !allowed {
            return;
        }
        let key = ev.content.relates_to.key.trim_end_matches('\u{fe0f}');
        if key != "🛑" {
            return;
        }
        let store = &self.inner.services.store;
        let found = store
            .job_by_matrix_prompt(
                room.room_id().as_str(),
                ev.content.relates_to.event_id.as_str(),
            )
            .await;
        let Ok(Some((job_id, sender))) = found else {
            return;
        };
        // Only the person who asked can stop their prompt with a reaction.
        if sender.as_deref() != Some(ev.sender.as_str()) {
            return;
        }
        tracing::Span::current().record("job", job_id.as_str());
        tracing::info!(by = %ev.sender, "cancel by 🛑 reaction");
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "cancel_reaction").increment(1);
        if let Err(e) = self.cancel(&job_id).await {
            tracing::error!(error = %e, "cannot cancel the job of a 🛑 reaction");
        }
    }

    /// Cancels a job: at once when it is queued, by asking its worker when it runs.
    pub(super) async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let s = &self.inner.services;
        crate::service::jobs::cancel(&s.store, s.pool.as_ref(), job_id).await
    }

    /// Posts a Markdown notice.
    pub(super) async fn say(&self, room: &Room, markdown: &str) {
        let content = RoomMessageEventContent::notice_html(markdown, markdown_to_html(markdown));
        if let Err(e) = room.send(content).await {
            tracing::warn!(room = %room.room_id(), error = %e, "cannot post to the room");
        }
    }

    pub(super) fn client(&self) -> &Client {
        &self.inner.client
    }

    pub(super) fn services(&self) -> &Services {
        &self.inner.services
    }

    /// Keeps `text` to post in `key.0` once `key.1` has joined it (see [`Bot::take_welcome`]).
    pub(super) fn expect_welcome(&self, key: (OwnedRoomId, OwnedUserId), text: String) {
        self.inner
            .welcomes
            .lock()
            .expect("welcomes")
            .insert(key, text);
    }

    /// The welcome waiting for `key.1` in `key.0`, removed: whoever takes it posts it.
    pub(super) fn take_welcome(&self, key: &(OwnedRoomId, OwnedUserId)) -> Option<String> {
        self.inner.welcomes.lock().expect("welcomes").remove(key)
    }
}
/// Removes a rich reply's quoted fallback (`> ` lines and the blank line after them).
fn strip_reply_fallback(body: &str) -> String {
    if !body.starts_with("> <") {
        return body.to_string();
    }
    let mut lines = body.lines().skip_while(|l| l.starts_with('>'));
    let rest: Vec<&str> = lines.by_ref().collect();
    rest.join("\n").trim_start_matches('\n').to_string()
}

/// The first line of `s`, cut to `max` characters (`…` marks a cut), backticks made quotes.
pub(super) fn one_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max || s.lines().nth(1).is_some() {
        out.push('…');
    }
    out.replace('`', "'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fallback_is_removed() {
        assert_eq!(
            strip_reply_fallback("> <@a:b> old\n> more\n\nnew prompt"),
            "new prompt"
        );
        assert_eq!(strip_reply_fallback("plain\n> quote"), "plain\n> quote");
    }

    #[test]
    fn one_line_cuts_and_marks() {
        assert_eq!(one_line("abc", 5), "abc");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("a\nb", 5), "a…");
        assert_eq!(one_line("ü`x", 5), "ü'x");
    }
}
