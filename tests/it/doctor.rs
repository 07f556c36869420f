//! `gorp doctor` on the built binary: what a healthy setup reports (the agent started and
//! asked for real), and each broken part failing with its fix and exit code 1.

use std::path::Path;

use crate::cli::Env;

/// Doctor's JSON report and its exit code.
fn doctor(env: &Env) -> (serde_json::Value, i32) {
    let out = env.run(&["--json", "doctor"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor's JSON ({:?}): {e}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

/// The checks named `name`.
fn checks<'a>(report: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == name)
        .collect()
}

fn one<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let found = checks(report, name);
    assert_eq!(found.len(), 1, "{name}: {report:#}");
    found[0]
}

fn edit_config(env: &Env, from: &str, to: &str) {
    let path = env.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} in {text}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[tokio::test]
async fn a_healthy_setup_reports_the_agent_it_started_and_the_database() {
    let env = Env::new();
    let (report, code) = doctor(&env);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    let agent = one(&report, "agent");
    let detail = agent["detail"].as_str().unwrap();
    assert!(
        detail.contains("gorp-script-agent 0.1.0")
            && detail.contains("speaks ACP")
            && detail.contains("load")
            && detail.contains("MCP over HTTP"),
        "{detail}"
    );
    assert_eq!(one(&report, "signed in")["status"], "ok");
    assert!(one(&report, "database")["detail"]
        .as_str()
        .unwrap()
        .contains("does not exist yet"));
    assert_eq!(one(&report, "http port")["status"], "ok");
    assert!(
        !env.dir.path().join("gorp.db").exists(),
        "doctor writes nothing"
    );

    env.ok(&["migrate"]);
    let (report, code) = doctor(&env);
    assert_eq!(code, 0);
    let m = one(&report, "migrations");
    assert_eq!(m["status"], "ok");
    assert!(
        m["detail"].as_str().unwrap().contains("migrations applied"),
        "{m}"
    );
    assert_eq!(one(&report, "db writable")["status"], "ok");
    let text = env.ok(&["doctor"]);
    assert!(text.contains("everything gorp needs is in order"), "{text}");
}

#[tokio::test]
async fn each_broken_part_fails_with_its_fix() {
    // An agent that is not there, one that is not ACP, a channel's own missing agent.
    let env = Env::new();
    let agent = crate::acp::SCRIPT_AGENT;
    edit_config(
        &env,
        &format!("agent_binary = \"{agent}\""),
        "agent_binary = \"/nonexistent/bin/claude-agent-acp\"",
    );
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    assert_eq!(report["ok"], false);
    let a = one(&report, "agent");
    assert_eq!(a["status"], "fail");
    assert!(
        a["fix"]
            .as_str()
            .unwrap()
            .contains("@agentclientprotocol/claude-agent-acp"),
        "{a}"
    );
    let text = String::from_utf8(env.run(&["doctor"]).stdout).unwrap();
    assert!(text.contains("FAIL") && text.contains("fix: "), "{text}");

    edit_config(
        &env,
        "agent_binary = \"/nonexistent/bin/claude-agent-acp\"",
        "agent_binary = \"/bin/false\"",
    );
    let (report, _) = doctor(&env);
    let a = one(&report, "agent");
    assert_eq!(a["status"], "fail");
    assert!(
        a["detail"]
            .as_str()
            .unwrap()
            .contains("does not start as an ACP agent"),
        "{a}"
    );

    // A channel's own agent is checked too.
    let env = Env::new();
    env.ok(&[
        "channels",
        "add",
        "other",
        "--agent-binary",
        "/nonexistent/codex-acp",
    ]);
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    let agents = checks(&report, "agent");
    assert_eq!(agents.len(), 2, "{report:#}");
    assert_eq!(agents[0]["status"], "ok");
    assert_eq!(agents[1]["status"], "fail");
    assert!(
        agents[1]["detail"]
            .as_str()
            .unwrap()
            .contains("channel other"),
        "{}",
        agents[1]
    );
    assert!(agents[1]["fix"]
        .as_str()
        .unwrap()
        .contains("@zed-industries/codex-acp"));

    // A database a newer gorp migrated.
    let env = Env::new();
    env.ok(&["migrate"]);
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}", env.dir.path().join("gorp.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations
                 (version, description, installed_on, success, checksum, execution_time)
             VALUES (99990101, 'from the future', '2030-01-01', 1, x'00', 1)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    let m = one(&report, "migrations");
    assert_eq!(m["status"], "fail");
    assert!(
        m["detail"].as_str().unwrap().contains("newer gorp") && m["fix"].is_string(),
        "{m}"
    );

    // A port another program holds; then one a running gorp serves.
    let env = Env::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    edit_config(&env, "port = 0", &format!("port = {port}"));
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    let p = one(&report, "http port");
    assert_eq!(p["status"], "fail");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("in use by another program"),
        "{p}"
    );
    drop(held);
    let env2 = Env::new();
    let base = crate::cli::with_http(&env2);
    let server = env2.start();
    crate::cli::healthy(&base).await;
    let (report, _) = doctor(&env2);
    let p = one(&report, "http port");
    assert_eq!(p["status"], "warn", "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("running gorp"),
        "{p}"
    );
    drop(server);

    // A homeserver that does not answer.
    let env = Env::with(&format!(
        "\n[matrix]\nhome_server = \"http://127.0.0.1:1\"\nuser_id = \"@bot:localhost\"\npassword = \"pw\"\nallowed_users = [\"@a:localhost\"]\nstate_dir = \"{}\"\n",
        Path::new("/tmp").join("gorp-doctor-no-such-state").display()
    ));
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    let h = one(&report, "homeserver");
    assert_eq!(h["status"], "fail");
    assert!(h["fix"].as_str().unwrap().contains("home_server"), "{h}");
    assert_eq!(one(&report, "bot device")["status"], "warn");
}

#[tokio::test]
async fn a_node_agent_on_a_node_older_than_its_package_needs_is_named() {
    let env = Env::new();
    let pkg = env.dir.path().join("pkg");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::write(
        pkg.join("package.json"),
        r#"{"name":"needs-future-node","engines":{"node":">=99.0.0"}}"#,
    )
    .unwrap();
    let script = pkg.join("bin/agent.js");
    std::fs::write(&script, "#!/usr/bin/env node\nprocess.exit(3);\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let agent = crate::acp::SCRIPT_AGENT;
    edit_config(
        &env,
        &format!("agent_binary = \"{agent}\""),
        &format!("agent_binary = \"{}\"", script.display()),
    );
    let (report, code) = doctor(&env);
    assert_eq!(code, 1);
    let n = one(&report, "node");
    assert_eq!(n["status"], "fail", "{n}");
    assert!(
        n["detail"].as_str().unwrap().contains(">=99.0.0")
            && n["fix"].as_str().unwrap().contains("Node 99 or newer"),
        "{n}"
    );
}
