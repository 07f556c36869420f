//! Tests of the Synapse test support itself (`support/synapse.rs`): startup,
//! registration, device clean-up, raised rate limits, and shutdown.

use std::collections::BTreeSet;
use std::time::Instant;

use serde_json::{json, Value};

use crate::support::synapse::{self, Synapse, RATE_LIMIT_KEYS};

/// Logs in with a password through the raw client API; the access token.
async fn password_login(synapse: &Synapse, localpart: &str, password: &str) -> String {
    let reply: Value = synapse
        .http()
        .post(format!("{}/_matrix/client/v3/login", synapse.base_url()))
        .json(&json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": password,
        }))
        .send()
        .await
        .expect("login request")
        .error_for_status()
        .expect("login status")
        .json()
        .await
        .expect("login JSON");
    reply["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

#[tokio::test]
async fn starts_registers_and_cleans_up_the_registration_device() {
    let synapse = Synapse::start().await.expect("start Synapse");
    eprintln!(
        "Synapse ready on {} in {:?}",
        synapse.base_url(),
        synapse.startup_time()
    );

    assert_eq!(synapse.server_name(), "localhost");
    assert_eq!(synapse.url(), synapse.base_url());
    assert!(synapse.url().starts_with("http://127.0.0.1:"));

    // Registration leaves a device behind.
    let admin = synapse
        .register("admin", "admin-password", true)
        .await
        .expect("register admin");
    assert_eq!(admin.user_id, "@admin:localhost");
    assert_eq!(
        synapse.devices(&admin.access_token).await.expect("devices"),
        vec![admin.device_id.clone()]
    );

    // register_user logs it out: after one password login there is one device.
    let user = synapse
        .register_user("alice", "alice-password")
        .await
        .expect("register alice");
    assert!(user.access_token.is_empty());
    assert_eq!(user.user_id, synapse.user_id("alice"));
    let token = password_login(&synapse, "alice", "alice-password").await;
    let devices = synapse.devices(&token).await.expect("devices");
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_ne!(devices[0], user.device_id);

    // A wrong shared-secret MAC is refused.
    let nonce: Value = synapse
        .http()
        .get(format!("{}/_synapse/admin/v1/register", synapse.base_url()))
        .send()
        .await
        .expect("nonce")
        .json()
        .await
        .expect("nonce JSON");
    let status = synapse
        .http()
        .post(format!("{}/_synapse/admin/v1/register", synapse.base_url()))
        .json(&json!({
            "nonce": nonce["nonce"],
            "username": "mallory",
            "password": "x",
            "admin": false,
            "mac": synapse::registration_mac("wrong secret", nonce["nonce"].as_str().unwrap(), "mallory", "x", false),
        }))
        .send()
        .await
        .expect("register")
        .status();
    assert_eq!(status, 403);
}

#[tokio::test]
async fn rate_limits_do_not_answer_429() {
    let synapse = Synapse::start().await.expect("start Synapse");
    synapse
        .register_user("bob", "bob-password")
        .await
        .expect("register bob");

    // The default rc_login allows a burst of 5 per account.
    let mut token = String::new();
    for _ in 0..12 {
        token = password_login(&synapse, "bob", "bob-password").await;
    }

    let http = synapse.http();
    let room: Value = http
        .post(format!(
            "{}/_matrix/client/v3/createRoom",
            synapse.base_url()
        ))
        .bearer_auth(&token)
        .json(&json!({ "preset": "private_chat" }))
        .send()
        .await
        .expect("createRoom")
        .error_for_status()
        .expect("createRoom status")
        .json()
        .await
        .expect("createRoom JSON");
    let room_id = room["room_id"].as_str().expect("room_id");

    // The default rc_message allows a burst of 10.
    let started = Instant::now();
    for i in 0..40 {
        let response = http
            .put(format!(
                "{}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/txn{i}",
                synapse.base_url()
            ))
            .bearer_auth(&token)
            .json(&json!({ "msgtype": "m.text", "body": format!("message {i}") }))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "message {i}");
    }
    eprintln!("40 messages in {:?}", started.elapsed());
}

#[test]
fn every_rate_limit_of_the_installed_synapse_is_raised() {
    let python = synapse::venv_python().expect("Synapse venv");
    let lib = python.parent().unwrap().parent().unwrap().join("lib");
    let source = lib
        .read_dir()
        .expect("venv lib dir")
        .flatten()
        .map(|entry| {
            entry
                .path()
                .join("site-packages/synapse/config/ratelimiting.py")
        })
        .find(|path| path.is_file())
        .expect("synapse/config/ratelimiting.py in the venv");
    let source = std::fs::read_to_string(source).expect("read ratelimiting.py");

    // Every quoted "rc_..." string Synapse reads.
    let mut read: BTreeSet<String> = BTreeSet::new();
    for (at, _) in source.match_indices("\"rc_") {
        let rest = &source[at + 1..];
        let end = rest.find('"').expect("closing quote");
        read.insert(rest[..end].to_owned());
    }
    // Not rate limits this server needs: federation (no listener), the old
    // spelling of rc_message, and an internal name for remote media limits.
    let not_needed = [
        "rc_federation",
        "rc_messages",
        "rc_messages_per_second",
        "rc_message_burst_count",
        "rc_remote_media_downloads",
    ];
    let set: BTreeSet<String> = RATE_LIMIT_KEYS.iter().map(|key| key.to_string()).collect();
    let missing: Vec<&String> = read
        .iter()
        .filter(|key| !not_needed.contains(&key.as_str()) && !set.contains(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "rate limits Synapse reads but the test config does not raise: {missing:?}"
    );

    // The nested keys come out nested.
    let config = synapse::rate_limit_config();
    assert!(config["rc_login"]["failed_attempts"]["burst_count"].is_number());
    assert!(config["rc_invites"]["per_user"]["per_second"].is_number());
}

#[test]
fn a_missing_venv_fails_with_the_setup_hint() {
    let error = synapse::python_in_venv(std::path::Path::new("/nonexistent/synapse-venv"))
        .expect_err("no venv there");
    assert!(
        error.to_string().contains("scripts/setup-synapse"),
        "{error}"
    );
}

#[tokio::test]
async fn drop_kills_the_server() {
    let synapse = Synapse::start().await.expect("start Synapse");
    let pid = synapse.pid() as libc::pid_t;
    let url = format!("{}/_matrix/client/versions", synapse.base_url());
    drop(synapse);
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "Synapse pid {pid} still exists");
    let answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await;
    assert!(answer.is_err(), "the port still answers");
}
