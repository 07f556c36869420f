//! Matrix benchmark: what gorp's Matrix path costs over a bare matrix-sdk bot, on one real
//! Synapse (needs `scripts/setup-synapse`). Run with `cargo bench --bench matrix`.
//!
//! Baseline, measured in the same run: an echo bot built on matrix-sdk with the same store and
//! key-sharing settings as gorp, answering each message in an encrypted room at once. Its round
//! trip (person sends → person has the decrypted answer) is the floor for any Matrix bot.
//!
//! gorp: the same person, the same homeserver, an encrypted channel room, a warm
//! `gorp-script-agent`. For each prompt: time to the 👀 acknowledgement (the job row is
//! committed first) and time to the answer (the reply message carrying the agent's output).
//! Reported as p50/p99 and as ratios to the baseline's p50.

use std::time::{Duration, Instant};

use gorp::config::{Config, MatrixConfig};
use gorp::store::Store;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset};
use matrix_sdk::ruma::events::reaction::OriginalSyncReactionEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use matrix_sdk::{Client, Room, RoomState};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[allow(dead_code)]
#[path = "../tests/it/support/synapse.rs"]
mod synapse;

const AGENT: &str = env!("CARGO_BIN_EXE_gorp-script-agent");
const ROUNDS: usize = 40;
const WAIT: Duration = Duration::from_secs(60);

/// What a person's client sees.
enum Seen {
    Message {
        room: OwnedRoomId,
        sender: OwnedUserId,
        text: String,
        notice: bool,
    },
    Reaction {
        on: OwnedEventId,
        key: String,
    },
}

struct Person {
    client: Client,
    rx: mpsc::UnboundedReceiver<Seen>,
    _sync: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

async fn client(synapse: &synapse::Synapse, dir: &std::path::Path, name: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(synapse.base_url())
        .sqlite_store(dir, None)
        .build()
        .await
        .expect("client");
    client
        .matrix_auth()
        .login_username(name, &format!("{name}-password"))
        .send()
        .await
        .expect("login");
    client
        .sync_once(SyncSettings::default().timeout(Duration::ZERO))
        .await
        .expect("first sync");
    client.add_event_handler(
        |ev: StrippedRoomMemberEvent, room: Room, c: Client| async move {
            if Some(ev.state_key.as_ref()) == c.user_id() && room.state() == RoomState::Invited {
                tokio::spawn(async move {
                    let _ = room.join().await;
                });
            }
        },
    );
    client
}

fn sync_forever(client: &Client) -> tokio::task::JoinHandle<()> {
    let c = client.clone();
    tokio::spawn(async move {
        let settings = SyncSettings::default().timeout(Duration::from_secs(10));
        loop {
            if c.sync_once(settings.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

impl Person {
    async fn login(synapse: &synapse::Synapse, name: &str) -> Person {
        let dir = TempDir::new().unwrap();
        let client = client(synapse, dir.path(), name).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let t = tx.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
            let t = t.clone();
            async move {
                let (text, notice) = match (&ev.content.relates_to, &ev.content.msgtype) {
                    (Some(Relation::Replacement(r)), _) => {
                        (r.new_content.msgtype.body().to_string(), false)
                    }
                    (_, MessageType::Notice(n)) => (n.body.clone(), true),
                    (_, m) => (m.body().to_string(), false),
                };
                let _ = t.send(Seen::Message {
                    room: room.room_id().to_owned(),
                    sender: ev.sender,
                    text,
                    notice,
                });
            }
        });
        client.add_event_handler(move |ev: OriginalSyncReactionEvent| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Seen::Reaction {
                    on: ev.content.relates_to.event_id,
                    key: ev.content.relates_to.key,
                });
            }
        });
        let sync = sync_forever(&client);
        Person {
            client,
            rx,
            _sync: sync,
            _dir: dir,
        }
    }

    async fn next(&mut self, mut pred: impl FnMut(&Seen) -> bool) -> Instant {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) if pred(&s) => return Instant::now(),
                Ok(Some(_)) => {}
                _ => panic!("timed out"),
            }
        }
    }

    async fn message_from(&mut self, from: &OwnedUserId, room: &OwnedRoomId, needle: &str) {
        self.next(|s| {
            matches!(s, Seen::Message { room: r, sender, text, .. }
                if r == room && sender == from && text.contains(needle))
        })
        .await;
    }

    /// An encrypted DM with `other`, once they have joined.
    async fn dm(&mut self, other: &OwnedUserId) -> OwnedRoomId {
        let mut req = CreateRoom::new();
        req.preset = Some(RoomPreset::PrivateChat);
        req.is_direct = true;
        req.invite = vec![other.clone()];
        req.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
        let room = self.client.create_room(req).await.expect("create");
        let id = room.room_id().to_owned();
        loop {
            let m = room.get_member_no_sync(other).await.ok().flatten();
            if m.is_some_and(|m| *m.membership() == MembershipState::Join) {
                return id;
            }
            // The join arrives through this person's own sync task.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&self, room: &OwnedRoomId, text: &str) -> (OwnedEventId, Instant) {
        let r = self.client.get_room(room).expect("room");
        let t0 = Instant::now();
        let id = r
            .send(RoomMessageEventContent::text_plain(text))
            .await
            .expect("send")
            .response
            .event_id;
        (id, t0)
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let synapse = synapse::Synapse::start().await.expect("Synapse");
    for name in ["alice", "echo", "gorp"] {
        synapse
            .register_user(name, &format!("{name}-password"))
            .await
            .expect("register");
    }
    let mut alice = Person::login(&synapse, "alice").await;
    let echo_id: OwnedUserId = "@echo:localhost".try_into().unwrap();
    let gorp_id: OwnedUserId = "@gorp:localhost".try_into().unwrap();

    // Baseline: a bare matrix-sdk echo bot.
    let echo_dir = TempDir::new().unwrap();
    let echo = client(&synapse, echo_dir.path(), "echo").await;
    let me = echo_id.clone();
    echo.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
        let me = me.clone();
        async move {
            if ev.sender == me {
                return;
            }
            let body = ev.content.body().to_string();
            tokio::spawn(async move {
                let _ = room
                    .send(RoomMessageEventContent::text_plain(format!("echo {body}")))
                    .await;
            });
        }
    });
    let _echo_sync = sync_forever(&echo);
    let echo_room = alice.dm(&echo_id).await;
    let mut base = Vec::new();
    for i in 0..ROUNDS + 3 {
        let (_, t0) = alice.send(&echo_room, &format!("ping-{i}")).await;
        alice
            .message_from(&echo_id, &echo_room, &format!("echo ping-{i}"))
            .await;
        if i >= 3 {
            base.push(t0.elapsed());
        }
    }

    // gorp, in-process, with the scripted agent.
    let dir = TempDir::new().unwrap();
    let mut config = Config::default();
    config.database.path = dir.path().join("gorp.db");
    config.workspace.path = dir.path().join("ws");
    config.acp.agent_binary = AGENT.into();
    config.acp.agent_args = vec![
        "--state-dir".into(),
        dir.path().join("agent").display().to_string(),
    ];
    std::fs::create_dir_all(dir.path().join("agent")).unwrap();
    config.acp.extra_writable = vec![dir.path().join("agent")];
    config.acp.state_path = dir.path().join("agents");
    config.webhook.port = 0;
    config.matrix = Some(MatrixConfig {
        home_server: synapse.base_url().to_string(),
        user_id: gorp_id.to_string(),
        password: Some("gorp-password".into()),
        allowed_users: vec!["@alice:localhost".into()],
        ..MatrixConfig::default()
    });
    let store = Store::open(&config.database).await.unwrap();
    let stop = CancellationToken::new();
    let gorp = tokio::spawn(gorp::app::run(
        config,
        store.clone(),
        gorp::instance::InstanceId::new(),
        stop.clone(),
    ));
    loop {
        let ready: Option<i64> =
            sqlx::query_scalar("SELECT ready_at FROM matrix_bot WHERE state = 'syncing'")
                .fetch_optional(store.read_pool())
                .await
                .unwrap();
        if ready.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dm = alice.dm(&gorp_id).await;
    alice.send(&dm, "!create bench").await;
    alice
        .next(|s| {
            matches!(s, Seen::Message { sender, text, notice: true, .. }
                if sender == &gorp_id && text.contains("This room is gorp channel"))
        })
        .await;
    let room: OwnedRoomId = store
        .channel_get("bench")
        .await
        .unwrap()
        .unwrap()
        .matrix_room_id
        .unwrap()
        .try_into()
        .unwrap();
    let (mut acks, mut answers) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS + 3 {
        let (id, t0) = alice.send(&room, &format!("@reply pong-{i}")).await;
        let needle = format!("pong-{i}");
        let (mut acked, mut answered, mut done) = (None, None, false);
        // The reply is complete once the job's ✅ is there too (it may come before the text).
        while acked.is_none() || answered.is_none() || !done {
            let deadline = tokio::time::Instant::now() + WAIT;
            let s = match tokio::time::timeout_at(deadline, alice.rx.recv()).await {
                Ok(Some(s)) => s,
                _ => panic!("timed out in round {i}"),
            };
            let now = Instant::now();
            match s {
                Seen::Reaction { on, key } if on == id && key == "👀" => acked = Some(now),
                Seen::Reaction { on, key } if on == id && key == "✅" => done = true,
                Seen::Message {
                    room: r,
                    sender,
                    text,
                    ..
                } if r == room && sender == gorp_id && text.contains(&needle) => {
                    answered.get_or_insert(now);
                }
                _ => {}
            }
        }
        if i >= 3 {
            acks.push(acked.unwrap() - t0);
            answers.push(answered.unwrap() - t0);
        }
    }
    stop.cancel();
    let _ = gorp.await;

    let b50 = pct(&mut base, 0.5);
    let b99 = pct(&mut base, 0.99);
    let a50 = pct(&mut acks, 0.5);
    let a99 = pct(&mut acks, 0.99);
    let r50 = pct(&mut answers, 0.5);
    let r99 = pct(&mut answers, 0.99);
    println!("Matrix round trips on one Synapse, {ROUNDS} rounds each (after 3 warm-up rounds)");
    println!(
        "  baseline echo bot      p50 {:7.1} ms  p99 {:7.1} ms",
        ms(b50),
        ms(b99)
    );
    println!(
        "  gorp 👀 acknowledgement p50 {:7.1} ms  p99 {:7.1} ms  ({:.2}x baseline p50)",
        ms(a50),
        ms(a99),
        a50.as_secs_f64() / b50.as_secs_f64()
    );
    println!(
        "  gorp answer            p50 {:7.1} ms  p99 {:7.1} ms  ({:.2}x baseline p50)",
        ms(r50),
        ms(r99),
        r50.as_secs_f64() / b50.as_secs_f64()
    );
}
