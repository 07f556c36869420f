//! The Matrix bot against a real Synapse: gorp runs in-process (`app::run`: HTTP, worker pool,
//! warm sessions, scheduler and the bot) with the scripted ACP agent; a person is a real
//! matrix-sdk client with its own encrypted store, syncing in the background.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gorp::config::{Config, MatrixConfig};
use gorp::store::{now_ms, JobState, NewJob, Source, SpendLimits, Store};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::EncryptionInfo;
use matrix_sdk::event_handler::SyncEvent;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset};
use matrix_sdk::ruma::events::reaction::{OriginalSyncReactionEvent, ReactionEventContent};
use matrix_sdk::ruma::events::relation::Annotation;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::{
    MembershipState, OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::typing::SyncTypingEvent;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use matrix_sdk::{Client, Room, RoomState};
use matrix_sdk_base::crypto::CollectStrategy;
use serde::de::DeserializeOwned;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acp::config_in;
use crate::support::eventually;
use crate::support::synapse::Synapse;

/// The longest any single wait may take.
const WAIT: Duration = Duration::from_secs(30);

/// Everything gorp logs at info and above (and gorp's own debug), kept for the tests to read.
/// One buffer per process: nextest runs each test in its own.
fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(Default::default)
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs to the test output (filtered by `RUST_LOG`) and to [`log_buffer`].
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::from_default_env()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(|| LogWriter)
                .with_filter(EnvFilter::new("info,gorp=debug")),
        )
        .try_init();
}

/// The log so far.
fn logged() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

/// An event a person's client saw.
struct Seen<Ev> {
    event: Ev,
    room_id: OwnedRoomId,
    encrypted: bool,
}

struct SyncTask(JoinHandle<()>);

impl Drop for SyncTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn forward<Ev>(client: &Client) -> mpsc::UnboundedReceiver<Seen<Ev>>
where
    Ev: SyncEvent + DeserializeOwned + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    client.add_event_handler(
        move |event: Ev, room: Room, encryption: Option<EncryptionInfo>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Seen {
                    event,
                    room_id: room.room_id().to_owned(),
                    encrypted: encryption.is_some(),
                });
            }
        },
    );
    rx
}

async fn next<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    what: &str,
    mut matches: impl FnMut(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
            Ok(None) => panic!("event channel closed while waiting for {what}"),
            Ok(Some(item)) if matches(&item) => return item,
            Ok(Some(_)) => {}
        }
    }
}

/// A person: a logged-in matrix-sdk client that accepts every invite.
struct Person {
    client: Client,
    user_id: OwnedUserId,
    messages: mpsc::UnboundedReceiver<Seen<OriginalSyncRoomMessageEvent>>,
    reactions: mpsc::UnboundedReceiver<Seen<OriginalSyncReactionEvent>>,
    members: mpsc::UnboundedReceiver<Seen<OriginalSyncRoomMemberEvent>>,
    typing: mpsc::UnboundedReceiver<Seen<SyncTypingEvent>>,
    _sync: SyncTask,
    _dir: TempDir,
}

impl Person {
    async fn login(synapse: &Synapse, name: &str) -> Person {
        Self::login_with(synapse, name, CollectStrategy::AllDevices).await
    }

    /// A person whose client shares room keys as `strategy` says.
    async fn login_with(synapse: &Synapse, name: &str, strategy: CollectStrategy) -> Person {
        let password = format!("{name}-password");
        let user = synapse
            .register_user(name, &password)
            .await
            .expect("register");
        let dir = TempDir::new().unwrap();
        let client = Client::builder()
            .homeserver_url(synapse.base_url())
            .sqlite_store(dir.path(), None)
            .with_room_key_recipient_strategy(strategy)
            .build()
            .await
            .expect("client");
        client
            .matrix_auth()
            .login_username(&user.localpart, &password)
            .send()
            .await
            .expect("login");
        client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .expect("first sync");
        client.add_event_handler(
            |ev: StrippedRoomMemberEvent, room: Room, c: Client| async move {
                if Some(ev.state_key.as_ref()) == c.user_id()
                    && ev.content.membership == MembershipState::Invite
                    && room.state() == RoomState::Invited
                {
                    let _ = room.join().await;
                }
            },
        );
        client.add_event_handler(
            |ev: matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent,
             room: Room| async move {
                eprintln!(
                    "undecryptable event {} from {} in {}",
                    ev.event_id,
                    ev.sender,
                    room.room_id()
                );
            },
        );
        let messages = forward(&client);
        let reactions = forward(&client);
        let members = forward(&client);
        let typing = forward(&client);
        let c = client.clone();
        let sync = SyncTask(tokio::spawn(async move {
            let settings = SyncSettings::default().timeout(Duration::from_secs(10));
            loop {
                if c.sync_once(settings.clone()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
        Person {
            user_id: client.user_id().unwrap().to_owned(),
            client,
            messages,
            reactions,
            members,
            typing,
            _sync: sync,
            _dir: dir,
        }
    }

    /// A new private room inviting `other` (encrypted if asked); returns once `other`'s
    /// membership there becomes `answer` (join or leave).
    async fn open_room(
        &mut self,
        other: &OwnedUserId,
        encrypted: bool,
        answer: MembershipState,
    ) -> OwnedRoomId {
        let mut req = CreateRoom::new();
        req.preset = Some(RoomPreset::PrivateChat);
        req.is_direct = true;
        req.invite = vec![other.clone()];
        if encrypted {
            req.initial_state = vec![InitialStateEvent::with_empty_state_key(
                RoomEncryptionEventContent::with_recommended_defaults(),
            )
            .to_raw_any()];
        }
        let room = self.client.create_room(req).await.expect("create");
        let id = room.room_id().to_owned();
        self.membership(&id, other, answer).await;
        id
    }

    /// Waits until `user`'s membership in `room` becomes `state`.
    async fn membership(&mut self, room: &RoomId, user: &OwnedUserId, state: MembershipState) {
        let what = format!("{user} to be {state} in {room}");
        next(&mut self.members, &what, |s| {
            s.room_id == room && &s.event.state_key == user && s.event.content.membership == state
        })
        .await;
    }

    fn room(&self, id: &RoomId) -> Room {
        self.client.get_room(id).expect("a room the person is in")
    }

    async fn say(&self, room: &RoomId, text: &str) -> OwnedEventId {
        self.room(room)
            .send(RoomMessageEventContent::text_plain(text))
            .await
            .expect("send")
            .response
            .event_id
    }

    /// The next message from `from` in `room` that `pred` accepts (edits included).
    async fn message_from(
        &mut self,
        from: &OwnedUserId,
        room: &RoomId,
        what: &str,
        mut pred: impl FnMut(&OriginalSyncRoomMessageEvent) -> bool,
    ) -> Seen<OriginalSyncRoomMessageEvent> {
        next(&mut self.messages, what, |s| {
            &s.event.sender == from && s.room_id == room && pred(&s.event)
        })
        .await
    }

    /// The next reaction `key` from `from` on `event`.
    async fn reaction(
        &mut self,
        from: &OwnedUserId,
        event: &OwnedEventId,
        key: &str,
    ) -> Seen<OriginalSyncReactionEvent> {
        next(&mut self.reactions, &format!("reaction {key}"), |s| {
            &s.event.sender == from
                && &s.event.content.relates_to.event_id == event
                && s.event.content.relates_to.key == key
        })
        .await
    }
}

/// The text a message shows: the new content for an edit, else the body.
fn shown(ev: &OriginalSyncRoomMessageEvent) -> String {
    match &ev.content.relates_to {
        Some(Relation::Replacement(r)) => r.new_content.msgtype.body().to_string(),
        _ => ev.content.body().to_string(),
    }
}

/// The HTML a message shows (edits: the new content's).
fn shown_html(ev: &OriginalSyncRoomMessageEvent) -> Option<String> {
    let mt = match &ev.content.relates_to {
        Some(Relation::Replacement(r)) => &r.new_content.msgtype,
        _ => &ev.content.msgtype,
    };
    match mt {
        MessageType::Text(t) => t.formatted.as_ref().map(|f| f.body.clone()),
        MessageType::Notice(t) => t.formatted.as_ref().map(|f| f.body.clone()),
        _ => None,
    }
}

fn edit_of(ev: &OriginalSyncRoomMessageEvent) -> Option<&OwnedEventId> {
    match &ev.content.relates_to {
        Some(Relation::Replacement(r)) => Some(&r.event_id),
        _ => None,
    }
}

fn reply_to(ev: &OriginalSyncRoomMessageEvent) -> Option<&OwnedEventId> {
    match &ev.content.relates_to {
        Some(Relation::Reply(r)) => Some(&r.in_reply_to.event_id),
        _ => None,
    }
}

/// gorp (in-process, with the bot) on one Synapse, and Alice, who is allowed.
struct World {
    synapse: Synapse,
    _dir: TempDir,
    config: Config,
    store: Store,
    bot: OwnedUserId,
    alice: Person,
    gorp: Option<(CancellationToken, JoinHandle<()>)>,
}

impl World {
    async fn start(tweak: impl FnOnce(&mut Config)) -> World {
        Self::start_as(false, tweak).await
    }

    /// With `token`, the bot logs in with an access token (whose device it must use) instead
    /// of its password.
    async fn start_as(token: bool, tweak: impl FnOnce(&mut Config)) -> World {
        let mut w = Self::prepare(token, tweak).await;
        w.start_gorp().await;
        w
    }

    /// Synapse, the accounts and the config, without gorp running yet.
    async fn prepare(token: bool, tweak: impl FnOnce(&mut Config)) -> World {
        init_logging();
        let synapse = Synapse::start().await.expect("start Synapse");
        let registered = if token {
            synapse.register("gorp", "gorp-password", false).await
        } else {
            synapse.register_user("gorp", "gorp-password").await
        }
        .expect("register the bot");
        let alice = Person::login(&synapse, "alice").await;
        let dir = TempDir::new().unwrap();
        let home = synapse.base_url().to_string();
        let allowed = alice.user_id.to_string();
        let config = config_in(dir.path(), |c| {
            c.webhook.port = 0;
            c.worker.max_attempts = 2;
            c.worker.rescue_interval_secs = 1;
            c.worker.retry_base_secs = 1;
            c.worker.retry_max_secs = 1;
            c.matrix = Some(MatrixConfig {
                home_server: home,
                user_id: "@gorp:localhost".into(),
                password: (!token).then(|| "gorp-password".into()),
                access_token: token.then(|| registered.access_token.clone()),
                allowed_users: vec![allowed],
                store_passphrase: Some("passphrase for tests".into()),
                edit_interval_ms: 200,
                retry_max_secs: 1,
                max_edits: 5,
                ..MatrixConfig::default()
            });
            tweak(c);
        });
        let store = Store::open(&config.database).await.unwrap();
        World {
            synapse,
            _dir: dir,
            config,
            store,
            bot: "@gorp:localhost".try_into().unwrap(),
            alice,
            gorp: None,
        }
    }

    async fn start_gorp(&mut self) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(gorp::app::run(
            self.config.clone(),
            self.store.clone(),
            gorp::instance::InstanceId::new(),
            stop.clone(),
        ));
        let task = tokio::spawn(async move {
            task.await.unwrap().expect("gorp runs");
        });
        self.gorp = Some((stop, task));
        // Ready: logged in, caught up, handlers attached. Earlier messages are not answered.
        let since = now_ms();
        eventually(WAIT, "the bot to be ready", || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT ready_at FROM matrix_bot WHERE state = 'syncing' AND ready_at >= ?1",
            )
            .bind(since)
            .fetch_optional(self.store.read_pool())
            .await
            .ok()
            .flatten()
        })
        .await;
    }

    async fn stop_gorp(&mut self) {
        if let Some((stop, task)) = self.gorp.take() {
            stop.cancel();
            task.await.unwrap();
        }
    }

    /// Alice opens an encrypted direct chat with the bot and waits for it to join.
    async fn dm(&mut self) -> OwnedRoomId {
        let bot = self.bot.clone();
        self.alice
            .open_room(&bot, true, MembershipState::Join)
            .await
    }

    /// A command in `room`; returns the bot's answer.
    async fn command(&mut self, room: &RoomId, text: &str) -> String {
        self.alice.say(room, text).await;
        let bot = self.bot.clone();
        // Answers are notices; job replies are text messages.
        let seen = self
            .alice
            .message_from(&bot, room, &format!("the answer to {text}"), |e| {
                edit_of(e).is_none() && matches!(e.content.msgtype, MessageType::Notice(_))
            })
            .await;
        assert!(seen.encrypted, "answers in encrypted rooms are encrypted");
        shown(&seen.event)
    }

    /// Sends a command that lets a job go on; its answer (a notice) and the job's next
    /// message that `reply` accepts come in either order. Returns the answer.
    async fn command_and_reply(
        &mut self,
        room: &RoomId,
        text: &str,
        mut reply: impl FnMut(&OriginalSyncRoomMessageEvent) -> bool,
    ) -> String {
        self.alice.say(room, text).await;
        let bot = self.bot.clone();
        let (mut answer, mut replied) = (None, false);
        while answer.is_none() || !replied {
            let what = format!("the answer to {text} and the job's reply");
            let seen = self.alice.message_from(&bot, room, &what, |_| true).await;
            let is_answer = edit_of(&seen.event).is_none()
                && matches!(seen.event.content.msgtype, MessageType::Notice(_));
            if answer.is_none() && is_answer {
                assert!(seen.encrypted, "answers in encrypted rooms are encrypted");
                answer = Some(shown(&seen.event));
            } else {
                replied |= reply(&seen.event);
            }
        }
        answer.unwrap()
    }

    /// `!create name` from a DM; returns the new room once Alice is in it, and the welcome.
    async fn create_channel(&mut self, name: &str) -> (OwnedRoomId, String) {
        let dm = self.dm().await;
        self.alice.say(&dm, &format!("!create {name}")).await;
        // The answer (in the DM) and the welcome (in the new room, once Alice has joined) come
        // in either order.
        let bot = self.bot.clone();
        let (mut answer, mut welcome) = (None, None);
        while answer.is_none() || welcome.is_none() {
            let seen = next(
                &mut self.alice.messages,
                "the answer and the welcome",
                |s| {
                    s.event.sender == bot
                        && matches!(s.event.content.msgtype, MessageType::Notice(_))
                },
            )
            .await;
            assert!(seen.encrypted, "notices in encrypted rooms are encrypted");
            if seen.room_id == dm {
                answer = Some(shown(&seen.event));
            } else {
                welcome = Some((seen.room_id.clone(), shown(&seen.event)));
            }
        }
        let (answer, (room, welcome)) = (answer.unwrap(), welcome.unwrap());
        assert!(
            answer.contains(&format!("Created channel **{name}**")),
            "{answer}"
        );
        let ch = self
            .store
            .channel_get(name)
            .await
            .unwrap()
            .expect("channel row");
        assert_eq!(ch.matrix_room_id.as_deref(), Some(room.as_str()));
        assert!(
            answer.contains(&format!("/webhook/session/{}", ch.webhook_id)),
            "the answer carries the webhook URL: {answer}"
        );
        assert!(welcome.contains("This room is gorp channel"), "{welcome}");
        (room, welcome)
    }

    async fn job_for(&self, event: &OwnedEventId) -> String {
        let key = event.to_string();
        eventually(WAIT, "the job of a message", || async {
            sqlx::query_scalar::<_, String>("SELECT id FROM jobs WHERE idempotency_key = ?1")
                .bind(&key)
                .fetch_optional(self.store.read_pool())
                .await
                .unwrap()
        })
        .await
    }

    /// The bot's events in `room`, in timeline order: event id, type (`m.room.encrypted` for
    /// what Alice cannot decrypt, such as redacted encrypted events) and what it redacts.
    async fn bot_timeline(&self, room: &RoomId) -> Vec<(String, String, Option<String>)> {
        let room = self.alice.room(room);
        let mut out = Vec::new();
        let mut from: Option<String> = None;
        loop {
            let mut opts = MessagesOptions::forward();
            opts.limit = 100u32.into();
            opts.from = from.clone();
            let page = room.messages(opts).await.expect("/messages");
            for ev in &page.chunk {
                let v: serde_json::Value = ev.raw().deserialize_as().expect("event JSON");
                if v["sender"] != self.bot.as_str() {
                    continue;
                }
                let redacts = v["redacts"]
                    .as_str()
                    .or_else(|| v["content"]["redacts"].as_str())
                    .map(str::to_string);
                out.push((
                    v["event_id"].as_str().unwrap_or_default().to_string(),
                    v["type"].as_str().unwrap_or_default().to_string(),
                    redacts,
                ));
            }
            match page.end {
                Some(end) if !page.chunk.is_empty() => from = Some(end),
                _ => return out,
            }
        }
    }

    /// Reads `room`'s timeline: at no point does gorp show two status reactions at once (each
    /// replaced reaction is redacted before the next is sent), and at least `min` were sent.
    async fn assert_one_status_reaction_at_a_time(&self, room: &RoomId, min: usize) {
        let timeline = self.bot_timeline(room).await;
        // gorp redacts only its status reactions; redacted ones can no longer be decrypted.
        let redacted: HashSet<&str> = timeline
            .iter()
            .filter_map(|(_, _, r)| r.as_deref())
            .collect();
        let reactions: HashSet<&str> = timeline
            .iter()
            .filter(|(id, kind, _)| kind == "m.reaction" || redacted.contains(id.as_str()))
            .map(|(id, _, _)| id.as_str())
            .collect();
        assert!(
            reactions.len() >= min,
            "at least {min} status reactions: {timeline:?}"
        );
        let mut shown = 0;
        for (id, _, redacts) in &timeline {
            if reactions.contains(id.as_str()) {
                shown += 1;
                assert!(
                    shown <= 1,
                    "two status reactions at once at {id}: {timeline:?}"
                );
            }
            if redacts.as_deref().is_some_and(|r| reactions.contains(r)) {
                shown -= 1;
            }
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(self.store.read_pool())
            .await
            .unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.gorp {
            stop.cancel();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_in_a_channel_room_streams_one_edited_reply_with_status_reactions() {
    let mut w = World::start(|_| {}).await;
    let (room, welcome) = w.create_channel("demo").await;
    assert!(welcome.contains("Authorization: Bearer "), "{welcome}");
    assert!(w
        .alice
        .room(&room)
        .latest_encryption_state()
        .await
        .unwrap()
        .is_encrypted());

    let prompt = "@chunks 12\n@delay-ms 120\n@tool-call Read src/main.rs\n@reply **bold** answer with `code` and more text to stream\\n\\n```rust\\nfn main() {}\\n```";
    let asked = w.alice.say(&room, prompt).await;
    let bot = w.bot.clone();

    // 👀 comes only after the job row is committed.
    w.alice.reaction(&bot, &asked, "👀").await;
    // Already committed when 👀 arrives: read once, no waiting.
    let job_id: String = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = ?1")
        .bind(asked.as_str())
        .fetch_optional(w.store.read_pool())
        .await
        .unwrap()
        .expect("the job row exists before 👀 is shown");
    let job = w.store.job_get(&job_id).await.unwrap().unwrap();
    assert_eq!(job.source, Source::Matrix);
    let target: serde_json::Value =
        serde_json::from_str(job.reply_target.as_deref().unwrap()).unwrap();
    assert_eq!(target["room_id"], room.as_str());
    assert_eq!(target["event_id"], asked.as_str());
    assert_eq!(target["sender"], w.alice.user_id.as_str());

    w.alice.reaction(&bot, &asked, "⏳").await;
    let first = w
        .alice
        .message_from(&bot, &room, "the reply", |e| edit_of(e).is_none())
        .await;
    assert_eq!(
        reply_to(&first.event),
        Some(&asked),
        "the reply answers the prompt"
    );
    assert!(first.encrypted);
    let reply_id = first.event.event_id.clone();
    next(&mut w.alice.typing, "the bot typing", |s| {
        s.room_id == room && s.event.content.user_ids.contains(&bot)
    })
    .await;

    // Edits follow as output streams; the job ends ✅ and the reply's row is done.
    w.alice.reaction(&bot, &asked, "✅").await;
    let done = w.store.job_get(&job_id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    let edits_row: i64 = eventually(WAIT, "the reply to be final", || async {
        sqlx::query_scalar("SELECT edits FROM matrix_replies WHERE job_id = ?1 AND done = 1")
            .bind(&job_id)
            .fetch_optional(w.store.read_pool())
            .await
            .unwrap()
    })
    .await;
    assert!(
        (2..=5 + 1).contains(&edits_row),
        "streamed in edits, at most max_edits plus the final one: {edits_row}"
    );
    let mut edits = Vec::new();
    while edits.len() < edits_row as usize {
        let e = w
            .alice
            .message_from(&bot, &room, "an edit of the reply", |e| {
                edit_of(e) == Some(&reply_id)
            })
            .await;
        edits.push(e);
    }
    // Streaming edits are spaced by edit_interval_ms (200 ms here), counted from the reply;
    // only the final edit may follow sooner.
    let mut sent_at: Vec<u64> = vec![first.event.origin_server_ts.get().into()];
    sent_at.extend(
        edits[..edits.len() - 1]
            .iter()
            .map(|e| u64::from(e.event.origin_server_ts.get())),
    );
    for pair in sent_at.windows(2) {
        assert!(
            pair[1] >= pair[0] + 150,
            "streaming edits at most every 200 ms: {sent_at:?}"
        );
    }
    // The last edit holds the whole answer, rendered as HTML.
    let last = edits.last().unwrap();
    let text = shown(&last.event);
    assert!(
        text.contains("more text to stream") && text.contains("fn main"),
        "{text}"
    );
    let html = shown_html(&last.event).expect("the final answer has HTML");
    assert!(html.contains("<strong>bold</strong>"), "{html}");
    assert!(
        html.contains("<pre><code class=\"language-rust\">"),
        "{html}"
    );
    assert!(text.contains("🔧"), "the tool call is summarised: {text}");
    assert_eq!(
        text.matches("🔧").count(),
        1,
        "one line per tool call: {text}"
    );
    let metrics = gorp::metrics::handle().render();
    for line in [
        "gorp_matrix_events_total{kind=\"prompt\"}",
        "gorp_matrix_events_total{kind=\"command\"}",
        "gorp_matrix_sends_total{kind=\"reaction\"}",
        "gorp_matrix_sends_total{kind=\"edit\"}",
    ] {
        assert!(metrics.contains(line), "{line} in /metrics:\n{metrics}");
    }
    let first_edit = shown(&edits[0].event);
    assert!(
        first_edit.len() < text.len(),
        "earlier edits show less of the answer: {first_edit:?}"
    );
    // 👀, ⏳ and ✅, one after the other.
    w.assert_one_status_reaction_at_a_time(&room, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_allowed_users_reach_the_agent() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("guarded").await;
    let mut mallory = Person::login(&w.synapse, "mallory").await;

    // Mallory's invite is rejected.
    let bot = w.bot.clone();
    mallory.open_room(&bot, false, MembershipState::Leave).await;

    // In a channel room Mallory's messages never become jobs.
    w.alice
        .room(&room)
        .invite_user_by_id(&mallory.user_id)
        .await
        .unwrap();
    let mid = mallory.user_id.clone();
    w.alice.membership(&room, &mid, MembershipState::Join).await;
    let hers = mallory.say(&room, "@reply pwned").await;
    let hers_cmd = mallory.say(&room, "!delete guarded").await;
    let ours = w.alice.say(&room, "@reply hello").await;
    w.alice.reaction(&bot, &ours, "✅").await;
    assert_eq!(
        w.count("SELECT count(*) FROM jobs").await,
        1,
        "only Alice's prompt is a job"
    );
    let key = hers.to_string();
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE idempotency_key = ?1")
            .bind(&key)
            .fetch_one(w.store.read_pool())
            .await
            .unwrap(),
        0
    );
    assert!(
        w.store.channel_get("guarded").await.unwrap().is_some(),
        "her command did nothing"
    );
    // Each refusal is one log line with who and where, never what she wrote.
    let refusals = || {
        logged()
            .lines()
            .filter(|l| l.contains("refused a message from a user who is not allowed"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let lines = eventually(WAIT, "both refusals in the log", || async {
        let lines = refusals();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, event) in lines.iter().zip([&hers, &hers_cmd]) {
        assert!(line.contains(mallory.user_id.as_str()), "{line}");
        assert!(line.contains(room.as_str()), "{line}");
        assert!(line.contains(event.as_str()), "{line}");
        assert!(
            !line.contains("pwned") && !line.contains("!delete"),
            "{line}"
        );
    }
    assert!(!logged().contains("pwned"), "her message is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_answer_and_bad_ones_get_usage() {
    let mut w = World::start(|_| {}).await;
    let (room, welcome) = w.create_channel("ops").await;

    let help = w.command(&room, "!help").await;
    for c in [
        "!create",
        "!join",
        "!list",
        "!delete",
        "!status",
        "!jobs",
        "!job",
        "!cancel",
        "!reset",
        "!warm",
        "!schedule",
    ] {
        assert!(help.contains(c), "help lists {c}: {help}");
    }
    let list = w.command(&room, "!list").await;
    assert!(list.contains("**ops**"), "{list}");

    let unknown = w.command(&room, "!frobnicate").await;
    assert!(unknown.contains("unknown command"), "{unknown}");
    assert!(unknown.starts_with("❌ "), "{unknown}");
    let bad = w.command(&room, "!jobs 0").await;
    assert!(bad.contains("!jobs"), "{bad}");
    assert!(bad.starts_with("❌ "), "{bad}");
    let bad_name = w.command(&room, "!create ../etc").await;
    assert!(
        bad_name.to_lowercase().contains("invalid channel name"),
        "{bad_name}"
    );
    assert!(bad_name.starts_with("❌ "), "{bad_name}");
    // A job id is described plainly.
    let bad_id = w.command(&room, "!job nonexistent").await;
    assert!(bad_id.starts_with("❌ "), "{bad_id}");
    assert!(
        bad_id.contains("a job id looks like `0190a5d2-ac96-7c4b-bcce-b302099a8057`"),
        "{bad_id}"
    );
    assert!(!bad_id.contains("starting with"), "{bad_id}");
    assert_eq!(
        w.count("SELECT count(*) FROM channels").await,
        1,
        "a bad name writes nothing"
    );

    // A job to look at.
    let asked = w.alice.say(&room, "@reply forty-two").await;
    let bot = w.bot.clone();
    w.alice.reaction(&bot, &asked, "✅").await;
    let job_id = w.job_for(&asked).await;

    let jobs = w.command(&room, "!jobs").await;
    assert!(jobs.contains(&job_id), "{jobs}");
    let job = w.command(&room, &format!("!job {}", &job_id[..13])).await;
    assert!(
        job.contains("forty-two") && job.contains("succeeded"),
        "{job}"
    );
    let missing = w.command(&room, "!job ffffffff").await;
    assert!(missing.contains("no job"), "{missing}");
    assert!(missing.starts_with("❌ "), "{missing}");

    let status = w.command(&room, "!status").await;
    assert!(
        status.contains("**ops**") && status.contains("queued: 0"),
        "{status}"
    );
    assert!(status.contains("running: none"), "{status}");
    let session_before = w
        .store
        .channel_get("ops")
        .await
        .unwrap()
        .unwrap()
        .acp_session_id
        .expect("a session");
    assert!(status.contains(&session_before), "{status}");

    let reset = w.command(&room, "!reset").await;
    assert!(reset.contains("new conversation"), "{reset}");
    assert_eq!(
        w.store
            .channel_get("ops")
            .await
            .unwrap()
            .unwrap()
            .acp_session_id,
        None
    );
    let asked = w.alice.say(&room, "@history").await;
    let bot = w.bot.clone();
    w.alice.reaction(&bot, &asked, "✅").await;
    let id = w.job_for(&asked).await;
    assert_eq!(
        w.store.job_output(&id).await.unwrap(),
        "1",
        "a new session has seen one prompt"
    );
    let session_after = w
        .store
        .channel_get("ops")
        .await
        .unwrap()
        .unwrap()
        .acp_session_id
        .expect("a session");
    assert_ne!(session_before, session_after);

    let warm = w.command(&room, "!warm").await;
    assert!(warm.contains("warming"), "{warm}");

    // A new webhook token replaces the one from the welcome.
    let bearer = |text: &str| -> String {
        let start = text.find("Bearer ").expect("a token") + "Bearer ".len();
        text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect()
    };
    let old = bearer(&welcome);
    let answer = w.command(&room, "!token").await;
    let new = bearer(&answer);
    assert_ne!(old, new);
    let stored = w
        .store
        .channel_get("ops")
        .await
        .unwrap()
        .unwrap()
        .webhook_token_sha256
        .unwrap();
    assert!(gorp::auth::token_matches_hash(&new, &stored));
    assert!(
        !gorp::auth::token_matches_hash(&old, &stored),
        "the old token no longer works"
    );

    let nothing = w.command(&room, "!cancel").await;
    assert!(nothing.contains("nothing is running"), "{nothing}");
    assert!(nothing.starts_with("❌ "), "{nothing}");

    // Schedules.
    let next_runs = w.command(&room, "!schedule next \"0 9 * * MON\"").await;
    assert_eq!(next_runs.matches("T09:00:00").count(), 5, "{next_runs}");
    let bad_cron = w.command(&room, "!schedule add \"61 * * * *\" hi").await;
    assert!(bad_cron.starts_with("❌"), "{bad_cron}");
    assert!(bad_cron.contains("minute is 0-59"), "{bad_cron}");
    // Not a cron at all: gorp's own words, one consistent field count, not croner's.
    let not_cron = w.command(&room, "!schedule add \"not a cron\" x").await;
    assert!(not_cron.starts_with("❌ "), "{not_cron}");
    assert!(
        not_cron.contains("`not a cron` has 3 fields but a cron expression has 5 fields"),
        "{not_cron}"
    );
    assert!(not_cron.contains("6 with seconds first"), "{not_cron}");
    for croner in ["between 5 and 7", "Pattern", "expected 5 or 6 fields"] {
        assert!(!not_cron.contains(croner), "{not_cron}");
    }
    let next_bad = w.command(&room, "!schedule next \"not a cron\"").await;
    assert!(next_bad.starts_with("❌ "), "{next_bad}");
    assert!(next_bad.contains("has 3 fields"), "{next_bad}");
    assert_eq!(w.count("SELECT count(*) FROM schedules").await, 0);
    let added = w
        .command(&room, "!schedule add \"0 9 * * *\" say good morning")
        .await;
    assert!(added.contains("Schedule **1** added"), "{added}");
    let s = w.store.schedule_get(1).await.unwrap().unwrap();
    assert_eq!(s.channel, "ops");
    assert_eq!(s.prompt, "say good morning");
    assert_eq!(s.created_by, format!("matrix:{}", w.alice.user_id));
    let listed = w.command(&room, "!schedule list").await;
    assert!(listed.contains("good morning"), "{listed}");
    assert!(w
        .command(&room, "!schedule pause 1")
        .await
        .contains("paused"));
    assert!(!w.store.schedule_get(1).await.unwrap().unwrap().enabled);
    assert!(w
        .command(&room, "!schedule resume 1")
        .await
        .contains("resumed"));
    assert!(w.store.schedule_get(1).await.unwrap().unwrap().enabled);
    assert!(w.command(&room, "!schedule rm 1").await.contains("deleted"));
    assert!(w.store.schedule_get(1).await.unwrap().is_none());
    let gone = w.command(&room, "!schedule rm 1").await;
    assert!(
        gone.starts_with("❌ ") && gone.contains("no schedule 1"),
        "{gone}"
    );

    // Join: the bot invites Alice again to a room she left.
    w.alice.room(&room).leave().await.unwrap();
    let dm = w.dm().await;
    let joined = w.command(&dm, "!join ops").await;
    assert!(joined.contains("Invited you"), "{joined}");

    // Delete: the row goes, the workspace stays, the bot leaves the room.
    let deleted = w.command(&dm, "!delete ops").await;
    assert!(deleted.contains("Deleted channel **ops**"), "{deleted}");
    assert!(w.store.channel_get("ops").await.unwrap().is_none());
    assert!(
        w.config.channel_dir("ops").is_dir(),
        "the workspace is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reacting_stop_to_ones_own_prompt_cancels_it() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("stopper").await;
    let asked = w.alice.say(&room, "@reply started\n@hang").await;
    let bot = w.bot.clone();
    w.alice.reaction(&bot, &asked, "⏳").await;
    let job_id = w.job_for(&asked).await;
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            asked.clone(),
            "🛑".into(),
        )))
        .await
        .unwrap();
    w.alice.reaction(&bot, &asked, "🛑").await;
    let job = w.store.job_get(&job_id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let reply = w
        .alice
        .message_from(&bot, &room, "the final reply", |e| {
            shown(e).contains("🛑 cancelled")
        })
        .await;
    let text = shown(&reply.event);
    assert!(text.contains("started"), "output so far stays");
    // Said once, as a person would: the last line before the turn's footer.
    let (body, footer) = text.rsplit_once("\n\n").unwrap();
    assert!(body.ends_with("🛑 cancelled"), "{text}");
    assert!(footer.starts_with("⏱ "), "{text}");
    assert_eq!(text.matches("cancelled").count(), 1, "{text}");
    // 👀, ⏳ and 🛑, one after the other.
    w.assert_one_status_reaction_at_a_time(&room, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_internal_error_shows_only_an_error_id_whose_details_are_in_the_log() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("fragile").await;
    use sqlx::ConnectOptions;
    // The database refuses new schedules with a message only the operator should see.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&w.config.database.path)
        .connect()
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_schedules BEFORE INSERT ON schedules \
         BEGIN SELECT RAISE(ABORT, 'secret detail 7c1d at /var/lib/gorp'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);

    let answer = w
        .command(&room, "!schedule add \"0 9 * * *\" say good morning")
        .await;
    assert!(
        answer.starts_with("❌ Something went wrong on gorp's side (error id "),
        "{answer}"
    );
    assert!(!answer.contains("secret detail"), "{answer}");
    assert!(!answer.contains("/var/lib"), "{answer}");
    let id = answer
        .split("error id ")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .expect("an error id");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{answer}");
    let log = logged();
    let line = log
        .lines()
        .find(|l| l.contains(id))
        .unwrap_or_else(|| panic!("no log line with {id}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("secret detail 7c1d at /var/lib/gorp"),
        "{line}"
    );
    // The line carries the request's span: the room and the event.
    assert!(line.contains(room.as_str()), "{line}");
    assert_eq!(w.count("SELECT count(*) FROM schedules").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_and_scheduled_jobs_post_to_the_channel_room_and_long_output_is_split() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("feed").await;
    let ch = w.store.channel_get("feed").await.unwrap().unwrap();
    let bot = w.bot.clone();

    let job = w
        .store
        .job_insert(
            NewJob::new(ch.id, Source::Webhook, "@reply from the webhook"),
            now_ms(),
        )
        .await
        .unwrap();
    let posted = w
        .alice
        .message_from(&bot, &room, "the webhook job's output", |e| {
            shown(e).contains("from the webhook")
        })
        .await;
    let text = shown(&posted.event);
    assert!(
        text.starts_with("**webhook**") || text.starts_with("webhook"),
        "{text}"
    );
    assert!(text.contains(&job.job_id[..8]), "{text}");

    // A schedule due now fires into the room.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    gorp::service::schedules::add(
        &w.store,
        &w.config,
        gorp::service::schedules::AddSchedule {
            channel: "feed".into(),
            when: at,
            prompt: "@reply from the schedule".into(),
            timezone: None,
            catch_up: None,
            overlap: None,
            created_by: "test".into(),
        },
        now_ms(),
    )
    .await
    .unwrap();
    let posted = w
        .alice
        .message_from(&bot, &room, "the scheduled job's output", |e| {
            shown(e).contains("from the schedule")
        })
        .await;
    assert!(shown(&posted.event).contains("schedule"));

    // 40 KB of output with a code fence in the middle, after a first chunk (so the reply
    // exists and the answer's first part arrives as an edit): several messages, fences intact.
    let mut long = String::from("intro\\n```text\\n");
    for i in 0..1500 {
        long.push_str(&format!("line {i:04} of the long output\\n"));
    }
    long.push_str("```\\noutro");
    let long_job = w
        .store
        .job_insert(
            NewJob::new(
                ch.id,
                Source::Cli,
                format!("@reply started\n@sleep-ms 1500\n@reply {long}"),
            ),
            now_ms(),
        )
        .await
        .unwrap()
        .job_id;
    let reply_id: OwnedEventId = eventually(WAIT, "the long job's reply", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT reply_event_id FROM matrix_replies WHERE job_id = ?1 AND reply_event_id IS NOT NULL",
        )
        .bind(&long_job)
        .fetch_optional(w.store.read_pool())
        .await
        .unwrap()
    })
    .await
    .try_into()
    .unwrap();
    // The reply's latest content is the first part; further parts are new messages; the
    // last part holds "outro".
    let mut first = String::new();
    let mut rest = Vec::new();
    let mut saw_edit = false;
    while !(first.contains("outro") || rest.last().is_some_and(|t: &String| t.contains("outro"))) {
        let m = w
            .alice
            .message_from(&bot, &room, "a part of the long output", |_| true)
            .await;
        if m.event.event_id == reply_id {
            first = shown(&m.event);
        } else if edit_of(&m.event) == Some(&reply_id) {
            saw_edit = true;
            first = shown(&m.event);
        } else if edit_of(&m.event).is_none() && first.contains("line ") {
            rest.push(shown(&m.event));
        }
    }
    assert!(saw_edit, "the first part came as an edit of the reply");
    let mut parts = vec![first];
    parts.extend(rest);
    let all = parts.join("\n");
    assert!(parts.len() >= 2, "split into several messages");
    for p in &parts {
        assert!(p.len() <= 16 * 1024 + 100, "part of {} bytes", p.len());
        assert_eq!(
            p.matches("```").count() % 2,
            0,
            "a part never leaves a fence open: {}",
            &p[..200.min(p.len())]
        );
    }
    for i in [0, 700, 1499] {
        assert!(
            all.contains(&format!("line {i:04} of the long output")),
            "line {i} arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_the_device_answers_nothing_old_and_reports_rerun_jobs() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("durable").await;
    let bot = w.bot.clone();
    let session_file = w.config.matrix_state_dir().join("session.json");
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&session_file).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&session_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    w.stop_gorp().await;
    // Sent while gorp is down: never answered, never a job.
    let missed = w.alice.say(&room, "@reply too late").await;
    w.start_gorp().await;
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&session_file).unwrap()).unwrap();
    assert_eq!(before["device_id"], after["device_id"], "the same device");

    // The E2EE conversation goes on after the restart.
    let asked = w.alice.say(&room, "@reply after the restart").await;
    w.alice.reaction(&bot, &asked, "✅").await;
    let reply = w
        .alice
        .message_from(&bot, &room, "the answer after the restart", |e| {
            shown(e).contains("after the restart")
        })
        .await;
    assert!(reply.encrypted);
    let key = missed.to_string();
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE idempotency_key = ?1")
            .bind(&key)
            .fetch_one(w.store.read_pool())
            .await
            .unwrap(),
        0,
        "the message sent while gorp was down is not answered"
    );

    // A job whose gorp died mid-job is re-run, and the room is told. The dead gorp is a lease
    // owner on this host whose process no longer exists: it claims a job (with a clock ahead,
    // so the live workers have not taken it yet) and never reports back.
    let ch = w.store.channel_get("durable").await.unwrap().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let dead_owner = format!("{}:999999:deadbeef", host.trim());
    let later = now_ms() + 3_600_000;
    let orphan = w
        .store
        .job_insert(
            NewJob {
                run_at: Some(later),
                ..NewJob::new(ch.id, Source::Cli, "@reply rerun done")
            },
            now_ms(),
        )
        .await
        .unwrap();
    let claimed = w
        .store
        .job_claim_many(&dead_owner, 1, later, 3_600_000, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, orphan.job_id);
    // Its prompt had reached the agent when it died.
    w.store
        .job_events_append(vec![gorp::store::NewEvent {
            job_id: orphan.job_id.clone(),
            attempt: 1,
            kind: "session".into(),
            text: None,
            data: None,
            at: now_ms(),
        }])
        .await
        .unwrap();
    let notice = w
        .alice
        .message_from(&bot, &room, "the restart notice", |e| {
            shown(e).contains("gorp restarted")
        })
        .await;
    assert!(
        shown(&notice.event).contains(&orphan.job_id[..8]),
        "{}",
        shown(&notice.event)
    );
    w.alice
        .message_from(&bot, &room, "the re-run's output", |e| {
            shown(e).contains("rerun done")
        })
        .await;
    let job = w.store.job_get(&orphan.job_id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bot_reconnects_after_the_homeserver_goes_away_and_failures_say_what_happened() {
    let mut w = World::start(|_| {}).await;
    let (room, _) = w.create_channel("resilient").await;
    let bot = w.bot.clone();

    // A failing prompt: ❌ and the reason, in the reply.
    let asked = w.alice.say(&room, "@fail the tool exploded").await;
    w.alice.reaction(&bot, &asked, "❌").await;
    let failed = w
        .alice
        .message_from(&bot, &room, "the failure reply", |e| {
            shown(e).contains("the tool exploded")
        })
        .await;
    assert!(
        shown(&failed.event).contains("failed"),
        "{}",
        shown(&failed.event)
    );

    // A job that finishes while the homeserver is away …
    let during = w
        .alice
        .say(&room, "@sleep-ms 1500\n@reply finished during the outage")
        .await;
    w.alice.reaction(&bot, &during, "⏳").await;
    let during_job = w.job_for(&during).await;

    // The homeserver dies: the bot records it and keeps retrying …
    w.synapse.kill();
    let state = |s: &'static str| {
        let store = w.store.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM matrix_bot WHERE state = ?1")
                .bind(s)
                .fetch_optional(store.read_pool())
                .await
                .unwrap()
        }
    };
    eventually(WAIT, "the bot to notice the homeserver is gone", || {
        state("retrying")
    })
    .await;
    // … and is back once the homeserver is.
    let finished = eventually(WAIT, "the job to finish during the outage", || async {
        w.store
            .job_get(&during_job)
            .await
            .unwrap()
            .filter(|j| j.state == JobState::Succeeded)
    })
    .await;
    assert!(finished.finished_at.is_some());
    w.synapse.resume().await.expect("Synapse comes back");
    eventually(WAIT, "the bot to sync again", || state("syncing")).await;
    // … is answered once it is back.
    w.alice
        .message_from(
            &bot,
            &room,
            "the answer of the job that finished meanwhile",
            |e| shown(e).contains("finished during the outage"),
        )
        .await;
    w.alice.reaction(&bot, &during, "✅").await;
    let asked = w.alice.say(&room, "@reply back online").await;
    w.alice.reaction(&bot, &asked, "✅").await;
    w.alice
        .message_from(&bot, &room, "the answer after the outage", |e| {
            shown(e).contains("back online")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_verification_is_never_accepted() {
    use futures::StreamExt;
    use matrix_sdk::encryption::verification::VerificationRequestState;

    let mut w = World::start(|_| {}).await;
    let dm = w.dm().await;
    // The conversation works without any verification.
    let answer = w.command(&dm, "!list").await;
    assert!(answer.contains("No channels"), "{answer}");

    let session = std::fs::read(w.config.matrix_state_dir().join("session.json")).unwrap();
    let session: serde_json::Value = serde_json::from_slice(&session).unwrap();
    let device_id = session["device_id"].as_str().unwrap().to_string();
    let device = w
        .alice
        .client
        .encryption()
        .get_device(&w.bot, device_id.as_str().into())
        .await
        .unwrap()
        .expect("Alice knows the bot's device");
    assert!(!device.is_verified());
    let request = device.request_verification().await.unwrap();
    let mut changes = request.changes();
    if !request.is_cancelled() {
        tokio::time::timeout(WAIT, async {
            while let Some(state) = changes.next().await {
                if matches!(state, VerificationRequestState::Cancelled(_)) {
                    return;
                }
                assert!(
                    !matches!(
                        state,
                        VerificationRequestState::Ready { .. }
                            | VerificationRequestState::Transitioned { .. }
                            | VerificationRequestState::Done
                    ),
                    "the bot must not take part in a verification: {state:?}"
                );
            }
        })
        .await
        .expect("the bot cancels the request");
    }
    assert!(request.is_cancelled());
    assert!(!device.is_verified());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_access_token_logs_in_as_its_own_device() {
    let mut w = World::start_as(true, |_| {}).await;
    let token = w
        .config
        .matrix
        .as_ref()
        .unwrap()
        .access_token
        .clone()
        .unwrap();
    let devices = w.synapse.devices(&token).await.unwrap();
    assert_eq!(
        devices.len(),
        1,
        "no device besides the token's: {devices:?}"
    );
    let session: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.config.matrix_state_dir().join("session.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(session["device_id"], devices[0].as_str());
    assert!(
        !session.to_string().contains("gorp-password"),
        "no password in the session file"
    );
    let dm = w.dm().await;
    assert!(w.command(&dm, "!help").await.contains("!create"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_key_restores_the_bots_identity_on_a_new_device() {
    use matrix_sdk::encryption::EncryptionSettings;

    let mut w = World::prepare(false, |_| {}).await;
    // The operator set up recovery for the bot's account from another client.
    let operator_dir = TempDir::new().unwrap();
    let operator = Client::builder()
        .homeserver_url(w.synapse.base_url())
        .sqlite_store(operator_dir.path(), None)
        .with_encryption_settings(EncryptionSettings {
            auto_enable_cross_signing: true,
            // `recovery().enable()` creates the backup; an automatic one would race it.
            auto_enable_backups: false,
            ..EncryptionSettings::default()
        })
        .build()
        .await
        .unwrap();
    operator
        .matrix_auth()
        .login_username("gorp", "gorp-password")
        .send()
        .await
        .unwrap();
    operator
        .sync_once(SyncSettings::default().timeout(Duration::ZERO))
        .await
        .unwrap();
    // Cross-signing is bootstrapped in the background after login.
    operator
        .encryption()
        .wait_for_e2ee_initialization_tasks()
        .await;
    let key = operator
        .encryption()
        .recovery()
        .enable()
        .await
        .expect("enable recovery");
    w.config.matrix.as_mut().unwrap().recovery_key = Some(key);
    w.start_gorp().await;

    let session: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.config.matrix_state_dir().join("session.json")).unwrap(),
    )
    .unwrap();
    let device_id = session["device_id"].as_str().unwrap().to_string();
    assert_ne!(
        Some(device_id.as_str()),
        operator.device_id().map(|d| d.as_str())
    );
    // The new device is signed by the bot's own cross-signing identity, which only the
    // recovered secrets allow; Alice sees that.
    let dm = w.dm().await;
    assert!(w.command(&dm, "!list").await.contains("No channels"));
    let alice = w.alice.client.clone();
    let bot = w.bot.clone();
    eventually(WAIT, "the bot's device to be cross-signed", || {
        let alice = alice.clone();
        let bot = bot.clone();
        let device_id = device_id.clone();
        async move {
            let _ = alice.encryption().request_user_identity(&bot).await;
            let device = alice
                .encryption()
                .get_device(&bot, device_id.as_str().into())
                .await
                .ok()
                .flatten()?;
            device.is_cross_signed_by_owner().then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_gorp_cannot_decrypt_gets_an_explanation_not_silence() {
    let w = World::start(|c| {
        c.matrix
            .as_mut()
            .unwrap()
            .allowed_users
            .push("@bob:localhost".into());
    })
    .await;
    // Bob's client gives room keys only to verified devices, and nobody verifies the bot.
    let mut bob = Person::login_with(&w.synapse, "bob", CollectStrategy::OnlyTrustedDevices).await;
    let bot = w.bot.clone();
    let room = bob.open_room(&bot, true, MembershipState::Join).await;
    bob.say(&room, "!create secret").await;
    let notice = bob
        .message_from(&bot, &room, "the explanation", |e| {
            matches!(e.content.msgtype, MessageType::Notice(_))
        })
        .await;
    let text = shown(&notice.event);
    assert!(text.contains("could not decrypt"), "{text}");
    assert!(
        w.store.channel_get("secret").await.unwrap().is_none(),
        "nothing was run"
    );
}

/// Under `ask` the real Claude Code agent's tool calls are posted in the channel's room and
/// decided by an allowed person's reaction: ✅ runs the tool, ♾️ also stores a rule that decides
/// the next identical request without a message, ❌ tells the agent no. A stranger's reaction,
/// the bot's own and a second answer change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claude_under_ask_is_approved_by_reactions_of_allowed_people_only() {
    use crate::support::claude_env::{agent_binary, claude_env, seed_plugin_blocklist};
    use crate::support::fake_anthropic::{FakeAnthropic, Reply};
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};

    let fake = FakeAnthropic::start().await;
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().canonicalize().unwrap();
    seed_plugin_blocklist(&home_path);
    let base = fake.base_url();
    let mut w = World::start(|c| {
        c.acp.agent_binary = agent_binary().display().to_string();
        c.acp.agent_args = Vec::new();
        c.acp.env = claude_env(&base, &home_path).into_iter().collect();
        c.acp.initialize_timeout_secs = 60;
        c.acp.session_timeout_secs = 60;
        c.acp.permission_policy = gorp::store::PermissionPolicy::Ask;
    })
    .await;
    let (room, _) = w.create_channel("careful").await;
    let dir = w.config.channel_dir("careful").canonicalize().unwrap();
    let mut mallory = Person::login(&w.synapse, "mallory").await;
    w.alice
        .room(&room)
        .invite_user_by_id(&mallory.user_id)
        .await
        .unwrap();
    let mid = mallory.user_id.clone();
    w.alice.membership(&room, &mid, MembershipState::Join).await;
    mallory.membership(&room, &mid, MembershipState::Join).await;
    let bot = w.bot.clone();
    let bash = |file: &str| {
        Reply::tool(
            "Bash",
            serde_json::json!({ "command": format!("touch {file}"), "description": "Make a file" }),
        )
    };
    for (file, answer) in [
        ("one.txt", "Made one."),
        ("two.txt", "Made two."),
        ("three.txt", "Made three."),
        ("four.txt", "Fine, I did not."),
    ] {
        fake.push(bash(file));
        fake.push(Reply::text(answer));
    }
    let store = w.store.clone();
    let approvals_of = |job: String| {
        let store = store.clone();
        async move {
            store
                .approval_list(&ApprovalFilter {
                    job_id: Some(job),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    let request_for = |file: &'static str| {
        move |e: &OriginalSyncRoomMessageEvent| {
            edit_of(e).is_none()
                && shown(e).contains("The agent asks to use a tool")
                && shown(e).contains(&format!("touch {file}"))
        }
    };

    // ✅ from Alice runs the tool; Mallory's ✅ and the bot's own reactions change nothing.
    let asked = w.alice.say(&room, "make one.txt").await;
    let job = w.job_for(&asked).await;
    let posted = w
        .alice
        .message_from(
            &bot,
            &room,
            "the request for one.txt",
            request_for("one.txt"),
        )
        .await;
    assert!(posted.encrypted);
    let text = shown(&posted.event);
    assert!(
        text.contains("execute") && text.contains("!allow"),
        "{text}"
    );
    let request = posted.event.event_id.clone();
    for key in ["✅", "♾️", "❌"] {
        w.alice.reaction(&bot, &request, key).await;
    }
    mallory
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            request.clone(),
            "✅".into(),
        )))
        .await
        .unwrap();
    eventually(
        WAIT,
        "the stranger's reaction to be refused in the log",
        || async {
            logged()
                .contains("a reaction on a permission request from someone not in allowed_users")
                .then_some(())
        },
    )
    .await;
    let a = &approvals_of(job.clone()).await[0];
    assert_eq!(
        a.state,
        ApprovalState::Pending,
        "nobody allowed has answered"
    );
    assert!(!dir.join("one.txt").exists());
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            request.clone(),
            "✅".into(),
        )))
        .await
        .unwrap();
    let edited = w
        .alice
        .message_from(&bot, &room, "the request edited with its decision", |e| {
            edit_of(e) == Some(&request)
        })
        .await;
    let text = shown(&edited.event);
    assert!(
        text.contains("Allowed once") && text.contains(w.alice.user_id.as_str()),
        "{text}"
    );
    w.alice
        .message_from(&bot, &room, "the answer", |e| {
            shown(e).contains("Made one.")
        })
        .await;
    assert!(dir.join("one.txt").exists(), "the tool ran");
    let a = &approvals_of(job.clone()).await[0];
    assert_eq!(a.state, ApprovalState::Allowed);
    assert_eq!(a.decided_via, Some(DecidedVia::Matrix));
    assert_eq!(a.decided_by.as_deref(), Some(w.alice.user_id.as_str()));
    // A second answer on a decided request changes nothing.
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            request.clone(),
            "❌".into(),
        )))
        .await
        .unwrap();
    eventually(WAIT, "the late answer to be ignored in the log", || async {
        logged()
            .contains("a reaction on a request already decided; ignored")
            .then_some(())
    })
    .await;
    assert_eq!(
        approvals_of(job.clone()).await[0].state,
        ApprovalState::Allowed
    );
    assert!(logged().contains("the bot's own answer reaction; ignored"));

    // ♾️ allows and stores a rule; the next identical request is decided with no message.
    let asked = w.alice.say(&room, "make two.txt").await;
    let job2 = w.job_for(&asked).await;
    let posted = w
        .alice
        .message_from(
            &bot,
            &room,
            "the request for two.txt",
            request_for("two.txt"),
        )
        .await;
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            posted.event.event_id.clone(),
            "♾️".into(),
        )))
        .await
        .unwrap();
    w.alice
        .message_from(&bot, &room, "the second answer", |e| {
            shown(e).contains("Made two.")
        })
        .await;
    let ch = w.store.channel_get("careful").await.unwrap().unwrap();
    let rules = w.store.rule_list(ch.id).await.unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        (rules[0].tool_kind.as_str(), rules[0].matcher.as_str()),
        ("execute", "program:touch")
    );
    assert_eq!(approvals_of(job2).await[0].rule_id, Some(rules[0].id));
    let asked = w.alice.say(&room, "make three.txt").await;
    let job3 = w.job_for(&asked).await;
    let answer = w
        .alice
        .message_from(&bot, &room, "the third answer", |e| {
            shown(e).contains("Made three.") || request_for("three.txt")(e)
        })
        .await;
    assert!(
        shown(&answer.event).contains("Made three."),
        "no request was posted"
    );
    assert!(dir.join("three.txt").exists());
    let by_rule = &approvals_of(job3).await[0];
    assert_eq!(by_rule.decided_via, Some(DecidedVia::Rule));
    assert_eq!(
        w.count(&format!(
            "SELECT count(*) FROM matrix_approvals WHERE approval_id = '{}'",
            by_rule.id
        ))
        .await,
        0
    );

    // Without the rule, ❌ tells the agent no and the job ends with its answer.
    assert_eq!(
        w.command(&room, "!rules")
            .await
            .matches("program:touch")
            .count(),
        1
    );
    assert!(w
        .command(&room, &format!("!rules rm {}", rules[0].id))
        .await
        .contains("removed"));
    let asked = w.alice.say(&room, "make four.txt").await;
    let job4 = w.job_for(&asked).await;
    let posted = w
        .alice
        .message_from(
            &bot,
            &room,
            "the request for four.txt",
            request_for("four.txt"),
        )
        .await;
    let request = posted.event.event_id.clone();
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            request.clone(),
            "❌".into(),
        )))
        .await
        .unwrap();
    let edited = w
        .alice
        .message_from(&bot, &room, "the denial shown", |e| {
            edit_of(e) == Some(&request)
        })
        .await;
    assert!(
        shown(&edited.event).contains("Denied"),
        "{}",
        shown(&edited.event)
    );
    w.alice
        .message_from(&bot, &room, "the fourth answer", |e| {
            shown(e).contains("Fine, I did not.")
        })
        .await;
    let done = w.store.job_get(&job4).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert!(!dir.join("four.txt").exists(), "the tool did not run");
    assert_eq!(approvals_of(job4).await[0].state, ApprovalState::Denied);
    let requests = fake.requests_of(crate::support::fake_anthropic::RequestKind::Model);
    let last = requests.last().unwrap().messages_json();
    assert!(last.contains("is_error"), "the model was told: {last}");
    drop(home);
}

#[tokio::test]
async fn a_question_of_the_agent_is_answered_in_the_room_by_a_number_or_a_command() {
    use gorp::store::{ApprovalFilter, ApprovalState, DecidedVia};
    let mut w = World::start(|c| {
        c.acp.permission_policy = gorp::store::PermissionPolicy::Ask;
    })
    .await;
    let (room, _) = w.create_channel("quiz").await;
    let bot = w.bot.clone();
    let store = w.store.clone();
    let question_of = |job: String| {
        let store = store.clone();
        async move {
            store
                .approval_list(&ApprovalFilter {
                    job_id: Some(job),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .remove(0)
        }
    };

    // The question is posted with its numbered choices and the reactions that pick them.
    let asked = w
        .alice
        .say(&room, "@ask Which region? | eu | us\n@reply set")
        .await;
    let job = w.job_for(&asked).await;
    let posted = w
        .alice
        .message_from(&bot, &room, "the question", |e| {
            edit_of(e).is_none() && shown(e).contains("The agent asks")
        })
        .await;
    assert!(posted.encrypted);
    let text = shown(&posted.event);
    assert!(
        text.contains("Which region?") && text.contains("1. eu") && text.contains("2. us"),
        "{text}"
    );
    assert!(text.contains("!answer"), "{text}");
    let question = posted.event.event_id.clone();
    for key in ["1\u{fe0f}\u{20e3}", "2\u{fe0f}\u{20e3}", "❌"] {
        w.alice.reaction(&bot, &question, key).await;
    }
    assert_eq!(question_of(job.clone()).await.state, ApprovalState::Pending);
    w.alice
        .room(&room)
        .send(ReactionEventContent::new(Annotation::new(
            question.clone(),
            "2\u{fe0f}\u{20e3}".into(),
        )))
        .await
        .unwrap();
    let edited = w
        .alice
        .message_from(&bot, &room, "the question edited with its answer", |e| {
            edit_of(e) == Some(&question)
        })
        .await;
    let text = shown(&edited.event);
    assert!(
        text.contains("Answered")
            && text.contains(w.alice.user_id.as_str())
            && text.contains("choice: us"),
        "{text}"
    );
    w.alice
        .message_from(&bot, &room, "the reply", |e| {
            shown(e).contains(r#"ask: accept {"choice":"us"}"#)
        })
        .await;
    let q = question_of(job).await;
    assert_eq!(q.state, ApprovalState::Answered);
    assert_eq!(q.decided_via, Some(DecidedVia::Matrix));
    assert_eq!(q.decided_by.as_deref(), Some(w.alice.user_id.as_str()));

    // `!answer` with free text; `!deny` declines the next one.
    let asked = w.alice.say(&room, "@ask Anything to add?\n@reply ok").await;
    let job = w.job_for(&asked).await;
    w.alice
        .message_from(&bot, &room, "the second question", |e| {
            edit_of(e).is_none() && shown(e).contains("Anything to add?")
        })
        .await;
    let answer = w
        .command_and_reply(&room, "!answer ship it on Friday", |e| {
            shown(e).contains(r#"ask: accept {"answer":"ship it on Friday"}"#)
        })
        .await;
    assert!(answer.contains("answered"), "{answer}");
    assert_eq!(question_of(job).await.state, ApprovalState::Answered);
    let asked = w
        .alice
        .say(&room, "@ask Deploy? | yes | no\n@reply ok")
        .await;
    let job = w.job_for(&asked).await;
    w.alice
        .message_from(&bot, &room, "the third question", |e| {
            edit_of(e).is_none() && shown(e).contains("Deploy?")
        })
        .await;
    let answer = w.command(&room, "!answer choice=maybe").await;
    assert!(answer.contains("does not fit the question"), "{answer}");
    assert_eq!(question_of(job.clone()).await.state, ApprovalState::Pending);
    let answer = w
        .command_and_reply(&room, "!deny", |e| shown(e).contains("ask: decline"))
        .await;
    assert!(answer.contains("declined"), "{answer}");
    assert_eq!(question_of(job).await.state, ApprovalState::Declined);
}

#[tokio::test]
async fn usage_and_budgets_are_read_and_set_in_the_room_and_a_held_job_is_told_why() {
    let mut w = World::start(|c| c.budget.job_max_tokens = Some(100_000)).await;
    let (room, _) = w.create_channel("spender").await;
    let bot = w.bot.clone();
    let none = w.command(&room, "!usage").await;
    assert!(none.contains("has spent nothing"), "{none}");
    w.alice
        .say(&room, "@usage in=5 out=7 cost=0.25\n@reply spent")
        .await;
    // The finished reply ends with the turn's footer.
    let reply = w
        .alice
        .message_from(&bot, &room, "the reply with its footer", |e| {
            shown(e).contains("spent") && shown(e).contains("USD")
        })
        .await;
    let text = shown(&reply.event);
    let footer = text.lines().last().unwrap();
    assert!(
        footer.starts_with("⏱ ") && footer.ends_with(" s · 12 tokens (5 in, 7 out) · 0.2500 USD"),
        "{text}"
    );
    let usage = w.command(&room, "!usage 1d").await;
    assert!(
        usage.contains("0.2500 USD")
            && usage.contains("**total**")
            && usage.contains("5 tokens in"),
        "{usage}"
    );
    let bad = w.command(&room, "!usage someday").await;
    assert!(
        bad.starts_with("❌ ") && bad.contains("!usage [since]"),
        "{bad}"
    );
    let shown_budget = w.command(&room, "!budget").await;
    assert!(
        shown_budget.contains("no cost limit")
            && shown_budget.contains("**100000 tokens** (from the config)"),
        "{shown_budget}"
    );
    let set = w.command(&room, "!budget job 2.5").await;
    assert!(set.contains("**2.5 USD** (the channel's)"), "{set}");
    let ch = w.store.channel_get("spender").await.unwrap().unwrap();
    assert_eq!(ch.budget_job_usd, Some(2.5));
    let bad = w.command(&room, "!budget job -3").await;
    assert!(bad.starts_with("❌ "), "{bad}");
    assert_eq!(
        w.store
            .channel_get("spender")
            .await
            .unwrap()
            .unwrap()
            .budget_job_usd,
        Some(2.5),
        "nothing written"
    );

    // A daily budget already spent ($0.25 of $0.20): the next prompt is committed but held,
    // the room is told why once, and raising the budget lets it run.
    let set = w.command(&room, "!budget day 0.2").await;
    assert!(
        set.contains("today: $0.2500 of $0.20, spent: jobs held until"),
        "{set}"
    );
    w.alice.say(&room, "@reply after the raise").await;
    let held = w
        .alice
        .message_from(&bot, &room, "the held notice", |e| {
            matches!(e.content.msgtype, MessageType::Notice(_)) && shown(e).contains(" is held:")
        })
        .await;
    let text = shown(&held.event);
    assert!(
        text.contains("channel spender has spent $0.2500 of its daily budget of $0.20")
            && text.contains("!budget day"),
        "{text}"
    );
    // Raising the budget wakes the worker at once: the held job runs.
    let raised = w
        .command_and_reply(&room, "!budget day 5", |e| {
            shown(e).contains("after the raise")
        })
        .await;
    assert!(
        raised.contains("today: $0.2500 of $5.00 (until"),
        "{raised}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_options_are_shown_and_set_in_the_room_by_allowed_people_only() {
    let mut w = World::start(|c| {
        c.acp
            .agent_args
            .extend(["--option", "model=fast,smart"].map(String::from))
    })
    .await;
    let (room, _) = w.create_channel("opts").await;
    let options = |w: &World| {
        let store = w.store.clone();
        async move { store.channel_get("opts").await.unwrap().unwrap().options() }
    };
    // A prompt's output, once its job has finished.
    async fn run(w: &mut World, room: &RoomId, prompt: &str) -> String {
        let asked = w.alice.say(room, prompt).await;
        let id = w.job_for(&asked).await;
        let job = eventually(WAIT, "the job to finish", || async {
            w.store
                .job_get(&id)
                .await
                .unwrap()
                .filter(|j| j.state.is_terminal())
        })
        .await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        w.store.job_output(&id).await.unwrap()
    }

    let before = w.command(&room, "!options").await;
    assert!(before.contains("its agent has not run yet"), "{before}");
    assert_eq!(run(&mut w, &room, "@options").await, "options: model=fast");
    let shown = w.command(&room, "!options").await;
    assert!(
        shown.contains("`model`") && shown.contains("`fast`, `smart`"),
        "{shown}"
    );

    let set = w.command(&room, "!model smart").await;
    assert!(set.contains("model is now **smart**"), "{set}");
    assert_eq!(
        options(&w).await,
        [("model".to_string(), "smart".to_string())].into()
    );
    assert_eq!(run(&mut w, &room, "@options").await, "options: model=smart");
    let shown = w.command(&room, "!model").await;
    assert!(shown.contains("**smart** (set for the channel)"), "{shown}");

    // A value the agent does not offer: ❌ with the values, nothing written.
    let bad = w.command(&room, "!model huge").await;
    assert!(
        bad.starts_with("❌ ") && bad.contains("huge") && bad.contains("fast, smart"),
        "{bad}"
    );
    assert_eq!(
        options(&w).await,
        [("model".to_string(), "smart".to_string())].into()
    );

    let back = w.command(&room, "!model default").await;
    assert!(back.contains("no longer sets a model"), "{back}");
    assert!(options(&w).await.is_empty());
    assert_eq!(run(&mut w, &room, "@options").await, "options: model=fast");

    // A stranger in the room changes nothing.
    let mallory = Person::login(&w.synapse, "mallory").await;
    w.alice
        .room(&room)
        .invite_user_by_id(&mallory.user_id)
        .await
        .unwrap();
    let mid = mallory.user_id.clone();
    w.alice.membership(&room, &mid, MembershipState::Join).await;
    let hers = mallory.say(&room, "!model smart").await;
    eventually(WAIT, "the stranger's command to be refused", || async {
        logged()
            .lines()
            .any(|l| {
                l.contains("refused a message from a user who is not allowed")
                    && l.contains(hers.as_str())
            })
            .then_some(())
    })
    .await;
    assert!(options(&w).await.is_empty(), "her command did nothing");
}

/// Several `gorp start` nodes on one PostgreSQL database: the bot (one device, one crypto
/// store in a shared `state_dir`) runs on the node holding the `matrix` leader lease; when that
/// node is killed with SIGKILL another takes the lease once it runs out and answers in the
/// same encrypted room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bot_answers_from_another_node_after_its_node_is_killed() {
    use sqlx::Connection;
    let mut w = World::prepare(false, |_| {}).await;
    let pg = crate::support::TestPg::new().await;
    let url = pg.url.clone();
    std::mem::forget(pg); // scripts/test drops what a run leaves
                          // The test reads what the nodes write.
    w.store = Store::open(&gorp::config::DatabaseConfig {
        url: Some(url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let d = w._dir.path().to_path_buf();
    let m = w.config.matrix.clone().unwrap();
    let config = format!(
        r#"
[database]
url = "{url}"

[workspace]
path = "{ws}"

[worker]
lease_secs = 3
heartbeat_secs = 1
rescue_interval_secs = 1
poll_interval_ms = 100

[webhook]
port = 0

[acp]
agent_binary = "{agent}"
agent_args = {args:?}
extra_writable = ["{state}"]
state_path = "{agents}"

[matrix]
home_server = "{home}"
user_id = "{user}"
password = "gorp-password"
allowed_users = {allowed:?}
store_passphrase = "passphrase for tests"
state_dir = "{matrix_state}"
edit_interval_ms = 200
retry_max_secs = 1
max_edits = 5
"#,
        ws = w.config.workspace.path.display(),
        agent = w.config.acp.agent_binary,
        args = w.config.acp.agent_args,
        state = w.config.acp.extra_writable[0].display(),
        agents = w.config.acp.state_path.display(),
        home = m.home_server,
        user = m.user_id,
        allowed = m.allowed_users,
        matrix_state = d.join("matrix-shared").display(),
    );
    let path = d.join("nodes.toml");
    std::fs::write(&path, config).unwrap();
    // Killed when the test ends, however it ends.
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let node = |n: usize| {
        let log = std::fs::File::create(d.join(format!("node-{n}.log"))).unwrap();
        Node(
            std::process::Command::new(crate::cli::GORP)
                .arg("start")
                .env("GORP_CONFIG_PATH", &path)
                .env("GORP_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let leader = |after: i64| {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
            let holder: Option<String> = sqlx::query_scalar(
                "SELECT l.holder FROM leaders l, matrix_bot b
                 WHERE l.name = 'matrix' AND b.state = 'syncing' AND b.ready_at >= $1",
            )
            .bind(after)
            .fetch_optional(&mut conn)
            .await
            .ok()?;
            let _ = conn.close().await;
            holder
        }
    };
    let mut a = node(0);
    let first = eventually(WAIT, "the bot to be ready on the first node", || leader(0)).await;
    assert!(first.contains(&format!(":{}:", a.0.id())), "{first}");
    let (room, _) = w.create_channel("ops").await;
    let b = node(1);
    let b_pid = i64::from(b.0.id());
    // The second node is up (its row renewed) but does not lead.
    eventually(WAIT, "the second node to be up", || {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE pid = $1")
                .bind(b_pid)
                .fetch_one(&mut conn)
                .await
                .ok()?;
            let _ = conn.close().await;
            (n == 1).then_some(())
        }
    })
    .await;
    let answer = w.command(&room, "!list").await;
    assert!(answer.contains("**ops**"), "{answer}");

    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed = now_ms();
    let second = eventually(
        Duration::from_secs(60),
        "the bot to be ready on the other node",
        || leader(killed),
    )
    .await;
    let failover = now_ms() - killed;
    assert!(second.contains(&format!(":{}:", b.0.id())), "{second}");
    println!("the bot answered again {failover} ms after its node was killed (lease 3000 ms)");
    // The same room, the same encrypted conversation: commands and jobs are answered.
    let answer = w.command(&room, "!list").await;
    assert!(answer.contains("**ops**"), "{answer}");
    w.alice.say(&room, "@reply from the other node").await;
    let bot = w.bot.clone();
    w.alice
        .message_from(&bot, &room, "the job's reply", |e| {
            shown(e).contains("from the other node")
        })
        .await;
    drop(b);
}
