//! The bot's event handlers and the command dispatcher.
//!
//! Handlers run inside the sync loop, so they only validate, write rows and hand off: a message
//! becomes a committed job (the reply pump reacts 👀 once it sees the row), a command runs in its
//! own task. Only `allowed_users` are served; their invites are joined, everyone else's are
//! rejected, and verification requests are cancelled, never accepted.

use std::sync::Arc;

use anyhow::Context;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset};
use matrix_sdk::ruma::events::key::verification::request::ToDeviceKeyVerificationRequestEvent;
use matrix_sdk::ruma::events::reaction::OriginalSyncReactionEvent;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::{
    MembershipState, OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room, RoomState};

use super::command::{self, Command, ScheduleCommand};
use super::render::markdown_to_html;
use super::Services;
use crate::store::{
    format_ms, now_ms, CancelOutcome, Channel, JobFilter, JobState, MatrixTarget, NewChannel,
    NewJob, Source, StoreError,
};

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
                let welcome = bot.inner.welcomes.lock().expect("welcomes").remove(&key);
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

    async fn on_invite(&self, ev: StrippedRoomMemberEvent, room: Room) {
        if ev.state_key != self.inner.me
            || ev.content.membership != MembershipState::Invite
            || room.state() != RoomState::Invited
        {
            return;
        }
        let bot = self.clone();
        // Joining waits for the homeserver; the sync loop must not.
        tokio::spawn(async move { bot.answer_invite(&ev.sender, room).await });
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

    async fn on_message(&self, ev: OriginalSyncRoomMessageEvent, room: Room) {
        if ev.sender == self.inner.me || room.state() != RoomState::Joined {
            return;
        }
        if !self.is_allowed(&ev.sender) {
            tracing::debug!(room = %room.room_id(), from = %ev.sender, "ignoring a message from a user who is not allowed");
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
            tokio::spawn(async move {
                let mut leave = false;
                let text = match parsed {
                    Ok(cmd) => {
                        // Deleting the channel of this very room: answer first, then leave.
                        if let Command::Delete { name } = &cmd {
                            leave = bot.room_channel(&room).await.is_ok_and(|c| &c.name == name);
                        }
                        bot.dispatch(cmd, &room, &sender).await
                    }
                    Err(e) => e.message,
                };
                bot.say(&room, &text).await;
                let store = &bot.inner.services.store;
                if leave
                    && matches!(
                        store.channel_get_by_room(room.room_id().as_str()).await,
                        Ok(None)
                    )
                {
                    let _ = room.leave().await;
                }
            });
            return;
        }
        let store = &self.inner.services.store;
        let channel = match store.channel_get_by_room(room.room_id().as_str()).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                self.say(
                    &room,
                    "This room is not a gorp channel. `!create <name>` makes one, `!help` lists the commands.",
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the channel of a room");
                self.say(&room, &format!("❌ cannot read the channel: {e}"))
                    .await;
                return;
            }
        };
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
        match store.job_insert(job, now_ms()).await {
            Ok(e) => {
                tracing::info!(job = %e.job_id, channel = %channel.name, created = e.created, "Matrix message enqueued")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot enqueue a Matrix message");
                self.say(&room, &format!("❌ not queued: {e}")).await;
            }
        }
    }

    /// A message gorp cannot decrypt (its room key never reached gorp's device, e.g. a client
    /// that shares keys only with verified devices): say so instead of staying silent.
    async fn on_undecryptable(&self, ev: OriginalSyncRoomEncryptedEvent, room: Room) {
        if ev.sender == self.inner.me
            || !self.is_allowed(&ev.sender)
            || room.state() != RoomState::Joined
        {
            return;
        }
        tracing::warn!(room = %room.room_id(), from = %ev.sender, event = %ev.event_id, "cannot decrypt a message");
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "undecryptable").increment(1);
        let bot = self.clone();
        let text = format!(
            "🔒 gorp could not decrypt a message from {}: its room key did not reach gorp's device. Nothing was run. Send it again; if this keeps happening, let your client share keys with unverified devices (gorp's device is never verified).",
            ev.sender
        );
        tokio::spawn(async move { bot.say(&room, &text).await });
    }

    async fn on_reaction(&self, ev: OriginalSyncReactionEvent, room: Room) {
        if ev.sender == self.inner.me || !self.is_allowed(&ev.sender) {
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
        tracing::info!(job = %job_id, by = %ev.sender, "cancel by 🛑 reaction");
        metrics::counter!(crate::metrics::MATRIX_EVENTS, "kind" => "cancel_reaction").increment(1);
        let _ = self.cancel(&job_id).await;
    }

    async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let s = &self.inner.services;
        let outcome = s.store.job_cancel(job_id, now_ms()).await?;
        if outcome == CancelOutcome::Requested {
            if let Some(pool) = &s.pool {
                pool.cancel_local(job_id);
            }
        }
        Ok(outcome)
    }

    /// Posts a Markdown notice.
    async fn say(&self, room: &Room, markdown: &str) {
        let content = RoomMessageEventContent::notice_html(markdown, markdown_to_html(markdown));
        if let Err(e) = room.send(content).await {
            tracing::warn!(room = %room.room_id(), error = %e, "cannot post to the room");
        }
    }

    /// Runs a command; returns the Markdown answer.
    pub async fn dispatch(&self, cmd: Command, room: &Room, sender: &UserId) -> String {
        match self.run_command(cmd, room, sender).await {
            Ok(text) => text,
            Err(e) => format!("❌ {e:#}"),
        }
    }

    async fn room_channel(&self, room: &Room) -> anyhow::Result<Channel> {
        self.inner
            .services
            .store
            .channel_get_by_room(room.room_id().as_str())
            .await?
            .context("this room is not a channel; `!create <name>` makes one")
    }

    async fn run_command(
        &self,
        cmd: Command,
        room: &Room,
        sender: &UserId,
    ) -> anyhow::Result<String> {
        let s = &self.inner.services;
        let store = &s.store;
        Ok(match cmd {
            Command::Help => command::HELP.to_string(),
            Command::Create { name } => self.create(&name, sender).await?,
            Command::Join { name } => {
                let ch = store
                    .channel_get(&name)
                    .await?
                    .with_context(|| format!("no channel {name}"))?;
                match &ch.matrix_room_id {
                    Some(rid) => {
                        let rid = RoomId::parse(rid.as_str())?;
                        let target = self
                            .inner
                            .client
                            .get_room(&rid)
                            .context("gorp is not in the channel's room")?;
                        if target.get_member_no_sync(sender).await?.is_some_and(|m| {
                            matches!(
                                m.membership(),
                                MembershipState::Join | MembershipState::Invite
                            )
                        }) {
                            format!("You are already in **{name}**'s room ({}).", link(&rid))
                        } else {
                            target.invite_user_by_id(sender).await?;
                            format!("Invited you to **{name}**'s room ({}).", link(&rid))
                        }
                    }
                    None => {
                        let rid = self.create_room(&name, sender).await?;
                        store.channel_set_room(ch.id, Some(rid.to_string())).await?;
                        format!(
                            "Channel **{name}** had no room; created {} and invited you.",
                            link(&rid)
                        )
                    }
                }
            }
            Command::List => {
                let list = store.channel_list().await?;
                if list.is_empty() {
                    "No channels yet. `!create <name>` makes one.".into()
                } else {
                    let mut out = String::from("Channels:\n");
                    for c in list {
                        let depth = store.channel_queue_depth(c.id).await?;
                        out.push_str(&format!(
                            "- **{}** — {} — {} queued\n",
                            c.name,
                            c.matrix_room_id
                                .as_deref()
                                .map(|r| format!("`{r}`"))
                                .unwrap_or_else(|| "no room".into()),
                            depth
                        ));
                    }
                    out
                }
            }
            Command::Delete { name } => {
                let ch = store
                    .channel_get(&name)
                    .await?
                    .with_context(|| format!("no channel {name}"))?;
                store.channel_delete(&name).await?;
                let dir = s.config.channel_dir(&name);
                if let Some(rid) = ch
                    .matrix_room_id
                    .as_deref()
                    .and_then(|r| RoomId::parse(r).ok())
                {
                    if rid != room.room_id() {
                        if let Some(r) = self.inner.client.get_room(&rid) {
                            self.say(
                                &r,
                                &format!("Channel **{name}** was deleted; gorp leaves this room."),
                            )
                            .await;
                            let _ = r.leave().await;
                        }
                    }
                }
                format!(
                    "Deleted channel **{name}** and its job history. Its workspace `{}` is kept on disk.",
                    dir.display()
                )
            }
            Command::Status => {
                let ch = self.room_channel(room).await?;
                let warm = store.warm_get(ch.id).await?;
                let depth = store.channel_queue_depth(ch.id).await?;
                let running = store
                    .job_list(&JobFilter {
                        state: Some(JobState::Running),
                        channel: Some(ch.name.clone()),
                        limit: 1,
                        ..Default::default()
                    })
                    .await?;
                let warm_line = match &warm {
                    // The store already reports a warm agent with a running job as `busy`.
                    Some(w) => {
                        let state = w.state.as_str();
                        let mut l = state.to_string();
                        if let Some(pid) = w.pid.filter(|_| state == "warm" || state == "busy") {
                            l.push_str(&format!(" (pid {pid})"));
                        }
                        if let Some(exp) = w.expires_at.filter(|_| state == "warm") {
                            l.push_str(&format!(", stays warm until {} UTC", format_ms(exp)));
                        }
                        l
                    }
                    None => "cold".into(),
                };
                let run_line = match running.first() {
                    Some(j) => format!(
                        "`{}` since {} UTC (attempt {})",
                        j.id,
                        j.started_at.map(format_ms).unwrap_or_default(),
                        j.attempt
                    ),
                    None => "none".into(),
                };
                format!(
                    "**{}**\n- agent: {}\n- queued: {}\n- running: {}\n- ACP session: {}\n- workspace: `{}`",
                    ch.name,
                    warm_line,
                    depth,
                    run_line,
                    ch.acp_session_id
                        .as_deref()
                        .map(|x| format!("`{x}`"))
                        .unwrap_or_else(|| "none (the next job starts one)".into()),
                    s.config.channel_dir(&ch.name).display()
                )
            }
            Command::Jobs { limit } => {
                let ch = store.channel_get_by_room(room.room_id().as_str()).await?;
                let jobs = store
                    .job_list(&JobFilter {
                        channel: ch.as_ref().map(|c| c.name.clone()),
                        limit,
                        ..Default::default()
                    })
                    .await?;
                if jobs.is_empty() {
                    "No jobs.".into()
                } else {
                    let mut out = String::new();
                    for j in jobs {
                        out.push_str(&format!(
                            "- `{}` {} {} {} — {}\n",
                            j.id,
                            state_emoji(j.state),
                            j.channel,
                            j.source,
                            one_line(&j.prompt, 60)
                        ));
                    }
                    out
                }
            }
            Command::Job { id } => {
                let id = self.resolve_job(&id).await?;
                let j = store.job_get(&id).await?.context("job vanished")?;
                let output = store.job_output(&id).await?;
                let mut out = format!(
                    "`{}` {} **{}** on **{}** from {}\n- created {} UTC, attempt {} of {}\n",
                    j.id,
                    state_emoji(j.state),
                    j.state.as_str(),
                    j.channel,
                    j.source,
                    format_ms(j.created_at),
                    j.attempt,
                    j.max_attempts
                );
                if let Some(e) = &j.error {
                    out.push_str(&format!("- error: {}\n", one_line(e, 300)));
                }
                out.push_str(&format!("- prompt: {}\n", one_line(&j.prompt, 200)));
                if !output.is_empty() {
                    let cut = super::render::split_message(&output, 4000);
                    out.push('\n');
                    out.push_str(&cut[0]);
                    if cut.len() > 1 {
                        out.push_str("\n\n… (`gorp job ");
                        out.push_str(&j.id);
                        out.push_str("` shows all of it)");
                    }
                }
                out
            }
            Command::Cancel { id } => {
                let id = match id {
                    Some(id) => self.resolve_job(&id).await?,
                    None => {
                        let ch = self.room_channel(room).await?;
                        store
                            .job_list(&JobFilter {
                                state: Some(JobState::Running),
                                channel: Some(ch.name.clone()),
                                limit: 1,
                                ..Default::default()
                            })
                            .await?
                            .into_iter()
                            .next()
                            .with_context(|| format!("nothing is running in **{}**", ch.name))?
                            .id
                    }
                };
                match self.cancel(&id).await? {
                    CancelOutcome::Cancelled => format!("🛑 `{id}` cancelled before it ran."),
                    CancelOutcome::Requested => format!("🛑 stopping `{id}`…"),
                    CancelOutcome::AlreadyFinished(st) => {
                        format!("`{id}` already finished ({}).", st.as_str())
                    }
                }
            }
            Command::Reset => {
                let ch = self.room_channel(room).await?;
                match &s.warm {
                    Some(w) => w.reset(ch.id).await?,
                    None => store.channel_set_acp_session(ch.id, None).await?,
                }
                format!(
                    "**{}**: the next job starts a new conversation (ACP session).",
                    ch.name
                )
            }
            Command::Warm => {
                let ch = self.room_channel(room).await?;
                let now = now_ms();
                store.warm_request(ch.id, Some(now), now).await?;
                format!(
                    "**{}**: warming the agent; `!status` shows when it is ready.",
                    ch.name
                )
            }
            Command::Token => {
                let ch = self.room_channel(room).await?;
                // A secret is only ever posted where the homeserver cannot read it.
                if !room.latest_encryption_state().await?.is_encrypted() {
                    anyhow::bail!(
                        "this room is not encrypted; gorp posts tokens only in encrypted rooms"
                    );
                }
                let token = crate::auth::new_token();
                store.channel_set_webhook_token(ch.id, &token).await?;
                format!(
                    "New webhook token for **{}** (the old one no longer works):\n\n`POST {}/webhook/session/{}` with `Authorization: Bearer {token}`",
                    ch.name,
                    s.config.public_url(),
                    ch.webhook_id
                )
            }
            Command::Schedule(sc) => self.schedule(sc, room, sender).await?,
        })
    }

    async fn schedule(
        &self,
        sc: ScheduleCommand,
        room: &Room,
        sender: &UserId,
    ) -> anyhow::Result<String> {
        use crate::service::schedules::{self as scheduler, AddSchedule, ScheduleError};
        let s = &self.inner.services;
        let store = &s.store;
        let invalid = |e: ScheduleError| anyhow::anyhow!("{e}");
        Ok(match sc {
            ScheduleCommand::Add { spec, prompt } => {
                let ch = self.room_channel(room).await?;
                let sch = scheduler::add(
                    store,
                    &s.config,
                    AddSchedule {
                        channel: ch.name.clone(),
                        when: spec,
                        prompt,
                        timezone: None,
                        catch_up: None,
                        overlap: None,
                        created_by: format!("matrix:{sender}"),
                    },
                    now_ms(),
                )
                .await
                .map_err(invalid)?;
                format!(
                    "Schedule **{}** added: {} ({}), next run {} UTC.",
                    sch.id,
                    sch.cron
                        .as_deref()
                        .map(|c| format!("`{c}`"))
                        .unwrap_or_else(|| "once".into()),
                    sch.timezone,
                    sch.next_run_at.map(format_ms).unwrap_or_else(|| "-".into())
                )
            }
            ScheduleCommand::List => {
                let ch = store.channel_get_by_room(room.room_id().as_str()).await?;
                let list: Vec<_> = store
                    .schedule_list()
                    .await?
                    .into_iter()
                    .filter(|x| ch.as_ref().is_none_or(|c| c.id == x.channel_id))
                    .collect();
                if list.is_empty() {
                    "No schedules.".into()
                } else {
                    let mut out = String::new();
                    for x in list {
                        out.push_str(&format!(
                            "- **{}** {} {} ({}) next {} — {}\n",
                            x.id,
                            if x.enabled { "▶" } else { "⏸" },
                            x.cron
                                .as_deref()
                                .map(|c| format!("`{c}`"))
                                .unwrap_or_else(|| "once".into()),
                            x.timezone,
                            x.next_run_at
                                .map(|t| format!("{} UTC", format_ms(t)))
                                .unwrap_or_else(|| "-".into()),
                            one_line(&x.prompt, 60)
                        ));
                    }
                    out
                }
            }
            ScheduleCommand::Pause { id } => {
                if !store.schedule_set_enabled(id, false, None).await? {
                    anyhow::bail!("no schedule {id}");
                }
                format!("Schedule **{id}** paused.")
            }
            ScheduleCommand::Resume { id } => {
                if !scheduler::resume(store, id, now_ms())
                    .await
                    .map_err(invalid)?
                {
                    anyhow::bail!("no schedule {id}");
                }
                format!("Schedule **{id}** resumed.")
            }
            ScheduleCommand::Rm { id } => {
                if !store.schedule_delete(id).await? {
                    anyhow::bail!("no schedule {id}");
                }
                format!("Schedule **{id}** deleted.")
            }
            ScheduleCommand::Next { spec } => {
                let tz_name = scheduler::default_timezone(&s.config);
                let zone = scheduler::parse_tz(&tz_name).map_err(invalid)?;
                let cron = scheduler::parse_cron(&spec).map_err(invalid)?;
                let times = scheduler::upcoming(&cron, zone, now_ms(), 5);
                let mut out = format!("`{spec}` in {tz_name} runs next at:\n");
                for t in times {
                    out.push_str(&format!("- {}\n", t.to_rfc3339()));
                }
                out
            }
        })
    }

    async fn resolve_job(&self, prefix: &str) -> anyhow::Result<String> {
        let ids = self
            .inner
            .services
            .store
            .job_ids_with_prefix(prefix, 2)
            .await?;
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => anyhow::bail!("no job {prefix}"),
            _ => anyhow::bail!("`{prefix}` matches more than one job; give more of the id"),
        }
    }

    /// `!create`: an encrypted private room, the workspace directory and the channel row.
    async fn create(&self, name: &str, sender: &UserId) -> anyhow::Result<String> {
        let s = &self.inner.services;
        if s.store.channel_get(name).await?.is_some() {
            anyhow::bail!("channel **{name}** exists; `!join {name}` invites you to its room");
        }
        let dir = s.config.channel_dir(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the workspace {}", dir.display()))?;
        let rid = self.create_room(name, sender).await?;
        let token = crate::auth::new_token();
        let inserted = s
            .store
            .channel_insert(
                NewChannel {
                    name: name.to_string(),
                    permission_policy: Some(s.config.acp.permission_policy),
                    matrix_room_id: Some(rid.to_string()),
                    webhook_token: Some(token.clone()),
                    ..Default::default()
                },
                now_ms(),
            )
            .await;
        let ch = match inserted {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = self.inner.client.get_room(&rid) {
                    let _ = r.leave().await;
                }
                return Err(e.into());
            }
        };
        let url = format!(
            "{}/webhook/session/{}",
            s.config.public_url(),
            ch.webhook_id
        );
        let welcome = format!(
            "This room is gorp channel **{name}**. Every message here is a prompt for its agent (workspace `{}`); `!help` lists the commands.\n\nWebhook: `POST {url}` with `Authorization: Bearer {token}` (the token is shown only here; gorp keeps its hash).",
            dir.display()
        );
        let key = (rid.clone(), sender.to_owned());
        self.inner
            .welcomes
            .lock()
            .expect("welcomes")
            .insert(key.clone(), welcome);
        // The join may have been synced already: then post now (whoever removes it posts it).
        if let Some(r) = self.inner.client.get_room(&rid) {
            let joined = r
                .get_member_no_sync(sender)
                .await
                .ok()
                .flatten()
                .is_some_and(|m| *m.membership() == MembershipState::Join);
            let pending = joined
                .then(|| self.inner.welcomes.lock().expect("welcomes").remove(&key))
                .flatten();
            tracing::debug!(room = %rid, joined, posting = pending.is_some(), "welcome registered");
            if let Some(text) = pending {
                self.say(&r, &text).await;
            }
        }
        Ok(format!(
            "Created channel **{name}**: {} (you are invited).\n\nWebhook: `POST {url}` — its token is in the new room.",
            link(&rid)
        ))
    }

    async fn create_room(&self, name: &str, invite: &UserId) -> anyhow::Result<OwnedRoomId> {
        let mut req = CreateRoom::new();
        req.name = Some(format!("gorp: {name}"));
        req.topic = Some(format!("gorp channel {name}"));
        req.preset = Some(RoomPreset::PrivateChat);
        req.invite = vec![invite.to_owned()];
        req.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
        let room = self
            .inner
            .client
            .create_room(req)
            .await
            .context("cannot create the room")?;
        Ok(room.room_id().to_owned())
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

fn link(room: &RoomId) -> String {
    format!("[{room}](https://matrix.to/#/{room})")
}

fn one_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max || s.lines().nth(1).is_some() {
        out.push('…');
    }
    out.replace('`', "'")
}

/// The status reaction for a job state.
pub fn state_emoji(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "👀",
        JobState::Running => "⏳",
        JobState::Succeeded => "✅",
        JobState::Failed => "❌",
        JobState::Cancelled => "🛑",
    }
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
