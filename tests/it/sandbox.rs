//! The kernel sandbox with the real `gorp-script-agent`: writes the agent makes itself (not
//! through ACP) and those of the processes it starts are confined to its workspace and its own
//! directories; gorp's database and the other channels' workspaces cannot be read; TCP connects
//! are limited to the allowed ports; gorp cannot be signalled; `sandbox = "none"` is today's
//! unconfined agent. The sandbox in force is in the `session` event and the warm-session row.

use gorp::store::{JobState, SandboxMode};

use crate::acp::Gorp;

/// A directory beside the workspace, outside every allowed path.
fn outside(g: &Gorp) -> std::path::PathBuf {
    let p = g.dir.path().join("outside");
    std::fs::create_dir_all(&p).unwrap();
    p.canonicalize().unwrap()
}

#[tokio::test]
async fn the_agent_and_its_children_write_only_inside_and_cannot_read_gorps_database() {
    let g = Gorp::start(|c| c.acp.sandbox = Some(SandboxMode::Landlock)).await;
    let ch = g.channel("boxed", |_| {}).await;
    let out = outside(&g);
    let db = g.config.database.path.canonicalize().unwrap();
    let prompt = format!(
        "@write-direct inside.txt made inside\n\
         @write-direct {out}/direct.txt escaped\n\
         @sh echo escaped > {out}/shell.txt; echo shell-done\n\
         @sh sh -c 'echo grandchild > {out}/grandchild.txt'\n\
         @sh echo child > child.txt && cat child.txt\n\
         @sh touch \"$HOME/.agentrc\" && touch \"$TMPDIR/scratch\" && echo own-dirs-ok\n\
         @read-direct {db}\n\
         @sh cat {db} > /dev/null; echo cat-exit-$?",
        out = out.display(),
        db = db.display(),
    );
    let (job, output) = g.run(ch, &prompt).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let ws = g.config.channel_dir("boxed");
    assert_eq!(
        std::fs::read_to_string(ws.join("inside.txt")).unwrap(),
        "made inside"
    );
    assert!(output.contains("write-direct ok: inside.txt"), "{output}");
    assert!(
        output.contains("write-direct error: Permission denied"),
        "{output}"
    );
    for f in ["direct.txt", "shell.txt", "grandchild.txt"] {
        assert!(!out.join(f).exists(), "{f} was written outside: {output}");
    }
    assert!(output.contains("shell-done"), "{output}");
    assert_eq!(
        std::fs::read_to_string(ws.join("child.txt")).unwrap(),
        "child\n"
    );
    assert!(output.contains("own-dirs-ok"), "{output}");
    let home = g.config.agent_state_dir("boxed").join("home");
    assert!(home.join(".agentrc").exists(), "HOME is the channel's own");
    assert!(
        output.contains("read-direct error: Permission denied"),
        "{output}"
    );
    assert!(output.contains("cat-exit-1"), "{output}");
    assert!(!output.contains("SQLite format"), "{output}");

    // What is in force is recorded: the session event and the warm row.
    let data = g.session_data(&job.id).await;
    let sandbox = &data["sandbox"];
    assert_eq!(sandbox["mode"], "landlock", "{data}");
    assert!(sandbox["abi"].as_i64().unwrap() >= 1);
    let writable: Vec<&str> = sandbox["writable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(writable.contains(&ws.canonicalize().unwrap().to_str().unwrap()));
    assert!(sandbox["deny_read"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == db.to_str().unwrap()));
    let warm = g.store.warm_get(ch).await.unwrap().unwrap();
    assert!(
        warm.sandbox.as_deref().unwrap().starts_with("landlock ABI"),
        "{warm:?}"
    );
    // gorp itself is not confined.
    std::fs::write(out.join("gorp.txt"), "x").unwrap();
    g.stop().await;
}

/// The credentials of gorp's user (`~/.ssh`, `~/.aws`, …) are not the agent's to read.
#[tokio::test]
async fn the_secret_stores_in_gorps_home_are_unreadable() {
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().canonicalize().unwrap();
    std::fs::create_dir_all(home_path.join(".ssh")).unwrap();
    std::fs::write(home_path.join(".ssh/id_ed25519"), "PRIVATE KEY").unwrap();
    std::fs::create_dir_all(home_path.join(".aws")).unwrap();
    std::fs::write(home_path.join(".aws/credentials"), "aws secret").unwrap();
    std::fs::write(home_path.join("notes.txt"), "plain notes").unwrap();
    // This test runs in its own process (nextest), so gorp's HOME is the fake one.
    std::env::set_var("HOME", &home_path);
    let g = Gorp::start(|c| c.acp.sandbox = Some(SandboxMode::Landlock)).await;
    let ch = g.channel("curious", |_| {}).await;
    let prompt = format!(
        "@read-direct {h}/.ssh/id_ed25519\n@sh cat {h}/.aws/credentials; echo exit-$?\n@read-direct {h}/notes.txt",
        h = home_path.display()
    );
    let (job, out) = g.run(ch, &prompt).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert!(
        out.contains("read-direct error: Permission denied"),
        "{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY") && !out.contains("aws secret"),
        "{out}"
    );
    assert!(out.contains("exit-1"), "{out}");
    assert!(
        out.contains("read-direct ok: plain notes"),
        "the rest stays readable: {out}"
    );
    g.stop().await;
}

#[tokio::test]
async fn two_channels_cannot_read_or_write_each_others_workspaces() {
    let g = Gorp::start(|c| c.acp.sandbox = Some(SandboxMode::Landlock)).await;
    let a = g.channel("alpha", |_| {}).await;
    let b = g.channel("beta", |_| {}).await;
    let (_, out) = g
        .run(b, "@write-direct secret.txt beta's secret\n@sh echo $HOME")
        .await;
    assert!(out.contains("write-direct ok"), "{out}");
    let beta_home = g.config.agent_state_dir("beta").join("home");
    assert!(out.contains(beta_home.to_str().unwrap()), "{out}");
    let secret = g.config.channel_dir("beta").join("secret.txt");
    let beta_rc = beta_home.join(".profile");
    std::fs::write(&beta_rc, "beta").unwrap();
    let prompt = format!(
        "@read-direct {s}\n@write-direct {s} overwritten by alpha\n@sh cat {s}; echo exit-$?\n\
         @read-direct {rc}\n@sh ls {ws}; echo ls-exit-$?",
        s = secret.display(),
        rc = beta_rc.display(),
        ws = g.config.channel_dir("beta").display(),
    );
    let (job, out) = g.run(a, &prompt).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(
        out.matches("read-direct error: Permission denied").count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("write-direct error: Permission denied"),
        "{out}"
    );
    assert!(!out.contains("beta's secret"), "{out}");
    assert!(out.contains("ls-exit-2"), "{out}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "beta's secret");
    g.stop().await;
}

#[tokio::test]
async fn sandbox_none_is_the_unconfined_agent_of_before() {
    let g = Gorp::start(|c| c.acp.sandbox = Some(SandboxMode::Landlock)).await;
    let free = g
        .channel("free", |c| c.sandbox = Some(SandboxMode::None))
        .await;
    let boxed = g.channel("boxed", |_| {}).await;
    let out_dir = outside(&g);
    let db = g.config.database.path.canonicalize().unwrap();
    for (ch, name) in [(free, "free"), (boxed, "boxed")] {
        let prompt = format!(
            "@write-direct {o}/{name}.txt x\n@sh head -c 15 {db}\n@sh kill -0 {gorp}; echo kill-exit-$?",
            o = out_dir.display(),
            db = db.display(),
            gorp = std::process::id(),
        );
        let (job, out) = g.run(ch, &prompt).await;
        assert_eq!(job.state, JobState::Succeeded);
        let confined = name == "boxed";
        assert_eq!(
            out_dir.join(format!("{name}.txt")).exists(),
            !confined,
            "{name}: {out}"
        );
        assert_eq!(out.contains("SQLite format 3"), !confined, "{name}: {out}");
        // Signals to gorp (this test process) are out of the sandbox's reach.
        let kill = if confined {
            "kill-exit-1"
        } else {
            "kill-exit-0"
        };
        assert!(out.contains(kill), "{name}: {out}");
        let data = g.session_data(&job.id).await;
        assert_eq!(
            data["sandbox"]["mode"],
            if confined { "landlock" } else { "none" },
            "{data}"
        );
    }
    // Under none the agent keeps gorp's own HOME (no per-channel directory is made).
    assert!(!g.config.agent_state_dir("free").exists());
    g.stop().await;
}

#[tokio::test]
async fn allowed_ports_limit_the_agents_tcp_connects() {
    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (p_open, p_closed) = (
        open.local_addr().unwrap().port(),
        closed.local_addr().unwrap().port(),
    );
    let g = Gorp::start(|c| {
        c.acp.sandbox = Some(SandboxMode::Landlock);
        c.acp.allowed_ports = Some(vec![p_open]);
    })
    .await;
    let ch = g.channel("net", |_| {}).await;
    let any = g
        .channel("any", |c| c.allowed_ports = Some(vec![p_open, p_closed]))
        .await;
    let prompt = format!("@connect 127.0.0.1:{p_open}\n@connect 127.0.0.1:{p_closed}");
    let (_, out) = g.run(ch, &prompt).await;
    assert!(
        out.contains(&format!("connect ok: 127.0.0.1:{p_open}")),
        "{out}"
    );
    assert!(out.contains("connect error: Permission denied"), "{out}");
    let (job, out) = g.run(any, &prompt).await;
    assert_eq!(
        out.matches("connect ok").count(),
        2,
        "the channel's own list: {out}"
    );
    let data = g.session_data(&job.id).await;
    assert_eq!(
        data["sandbox"]["allowed_ports"],
        serde_json::json!([p_open, p_closed])
    );
    drop((open, closed));
    g.stop().await;
}
