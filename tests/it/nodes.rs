//! Several `gorp start` processes (nodes) on one PostgreSQL database: they share one queue,
//! a channel's turns never overlap whichever node runs them, a node killed with SIGKILL has
//! its channels run again on the others within the lease, each schedule slot fires once
//! while nodes die, and `gorp nodes` shows who holds what.
//!
//! Ground truth for "never overlap" is the agents' own turn log (`--turn-log`): every prompt
//! turn writes a `start` and an `end` line with the wall clock, per channel workspace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use gorp::config::DatabaseConfig;
use gorp::store::{now_ms, NewChannel, NewJob, Source, Store};

use crate::cli::Env;
use crate::support::{eventually, TestPg};

/// The lease every node's jobs and channels are held with in these tests (`lease_secs`).
const LEASE_MS: i64 = 3_000;

/// A directory with one config for every node: the database on PostgreSQL, short leases,
/// the script agent writing its turn log.
struct Cluster {
    env: Env,
    url: String,
    nodes: Vec<Node>,
    store: Store,
}

/// A `gorp start` process, killed if the test ends early.
struct Node {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn pid(&self) -> i64 {
        i64::from(self.child.id())
    }
}

impl Cluster {
    async fn new(concurrency: u32) -> Cluster {
        let pg = TestPg::new().await;
        let url = pg.url.clone();
        std::mem::forget(pg); // scripts/test drops what a run leaves
        let env = Env::new();
        let path = env.config_path();
        // Inside the agents' writable state directory (the sandbox confines their writes).
        let turns = env.dir.path().join("agent-state").join("turns.jsonl");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replacen("[database]\n", &format!("[database]\nurl = \"{url}\"\n"), 1)
            .replace(
                "lease_secs = 10",
                &format!("lease_secs = {}", LEASE_MS / 1000),
            )
            .replace(
                "[worker]\n",
                &format!("[worker]\nconcurrency = {concurrency}\n"),
            )
            .replace(
                "agent_args = [\"--state-dir\", ",
                &format!(
                    "agent_args = [\"--turn-log\", \"{}\", \"--state-dir\", ",
                    turns.display()
                ),
            );
        std::fs::write(&path, text).unwrap();
        env.ok(&["migrate"]);
        let store = Store::open(&DatabaseConfig {
            url: Some(url.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        Cluster {
            env,
            url,
            nodes: Vec::new(),
            store,
        }
    }

    /// Starts one more node; returns its index.
    fn start(&mut self) -> usize {
        let i = self.nodes.len();
        let log = self.env.dir.path().join(format!("node-{i}.log"));
        let child = self
            .env
            .cmd(&["start"])
            .env("GORP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.nodes.push(Node { child, log });
        i
    }

    /// Starts a node whose database connections go through `proxy` (its own config file).
    fn start_through(&mut self, proxy: &Proxy) -> usize {
        let i = self.nodes.len();
        let text = std::fs::read_to_string(self.env.config_path()).unwrap();
        let (_, rest) = self.url.split_once('@').unwrap();
        let (hostport, _) = rest.split_once('/').unwrap();
        let text = text.replacen(hostport, &format!("127.0.0.1:{}", proxy.port), 1);
        let path = self.env.dir.path().join(format!("node-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let log = self.env.dir.path().join(format!("node-{i}.log"));
        let child = self
            .env
            .cmd(&["start"])
            .env("GORP_CONFIG_PATH", &path)
            .env("GORP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.nodes.push(Node { child, log });
        i
    }

    /// Waits until `n` nodes are up; returns their ids by pid.
    async fn up(&self, n: usize) -> HashMap<i64, String> {
        eventually(Duration::from_secs(60), "the nodes to be up", || async {
            let nodes = self.store.node_list(now_ms()).await.unwrap();
            let up: HashMap<i64, String> = nodes
                .into_iter()
                .filter(|n| n.state == "up")
                .map(|n| (n.pid, n.id))
                .collect();
            (up.len() >= n).then_some(up)
        })
        .await
    }

    fn kill(&mut self, i: usize) {
        // SIGKILL: no shutdown, no lease released.
        self.nodes[i].child.kill().unwrap();
        self.nodes[i].child.wait().unwrap();
    }

    async fn channels(&self, n: usize) -> Vec<i64> {
        let mut ids = Vec::new();
        for i in 0..n {
            let ch = self
                .store
                .channel_insert(
                    NewChannel {
                        name: format!("ch{i:02}"),
                        ..Default::default()
                    },
                    now_ms(),
                )
                .await
                .unwrap();
            ids.push(ch.id);
        }
        ids
    }

    async fn count(&self, sql: &str) -> i64 {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        n
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", n.log.display()));
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }
}

/// A TCP proxy to the database that can be cut: while cut, no byte passes either way and
/// connections stay open (a network partition, not a refused connection).
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let cuts = cuts.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::spawn(pipe(dr, uw, cuts.subscribe()));
                    tokio::spawn(pipe(ur, dw, cuts.subscribe()));
                });
            }
        });
        Proxy { port, cut }
    }

    fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the cut came are held until it is healed.
        if cut.wait_for(|c| !*c).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One agent prompt turn, from the turn log.
#[derive(Debug, Clone)]
struct Turn {
    cwd: String,
    pid: i64,
    start: i64,
    end: Option<i64>,
}

fn turns(path: &Path) -> Vec<Turn> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut open: HashMap<i64, Turn> = HashMap::new();
    let mut done = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let pid = v["pid"].as_i64().unwrap();
        let ms = v["ms"].as_i64().unwrap();
        match v["event"].as_str().unwrap() {
            "start" => {
                let t = Turn {
                    cwd: v["cwd"].as_str().unwrap_or_default().to_string(),
                    pid,
                    start: ms,
                    end: None,
                };
                if let Some(prev) = open.insert(pid, t) {
                    done.push(prev);
                }
            }
            "end" => {
                if let Some(mut t) = open.remove(&pid) {
                    t.end = Some(ms);
                    done.push(t);
                }
            }
            _ => {}
        }
    }
    done.extend(open.into_values());
    done
}

/// Pairs of turns of one channel (workspace) that overlap in time. A turn without an end
/// (its agent died mid-turn) counts as never ending.
fn overlaps(turns: &[Turn]) -> Vec<String> {
    let mut by_cwd: BTreeMap<&str, Vec<&Turn>> = BTreeMap::new();
    for t in turns {
        by_cwd.entry(&t.cwd).or_default().push(t);
    }
    let mut bad = Vec::new();
    for (cwd, mut ts) in by_cwd {
        ts.sort_by_key(|t| t.start);
        let mut until = i64::MIN;
        let mut last: Option<&Turn> = None;
        for t in ts {
            if t.start < until {
                bad.push(format!("{cwd}: {:?} started before {:?} ended", t, last));
            }
            let end = t.end.unwrap_or(i64::MAX);
            if end > until {
                until = end;
                last = Some(t);
            }
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_queue_and_a_killed_nodes_channels_move_within_the_lease() {
    const CHANNELS: usize = 32;
    const JOBS: usize = 2_000;
    // 8 slots a node, 24 in all for 32 channels: slots go to the channel whose head waited
    // longest, so the victim's channels run again as soon as their leases let them.
    let mut c = Cluster::new(8).await;
    let channels = c.channels(CHANNELS).await;
    for _ in 0..3 {
        c.start();
    }
    let ids = c.up(3).await;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| {
            NewJob::new(
                channels[i % CHANNELS],
                Source::Cli,
                format!("@sleep-ms 40\n@reply done {i}"),
            )
        })
        .collect();
    c.store.job_insert_many(jobs, now_ms()).await.unwrap();

    // Mid-run: every node has started jobs (their `started` events committed) and runs some
    // now. Kill the one running the most.
    let per_node = eventually(
        Duration::from_secs(60),
        "all three nodes to run jobs",
        || async {
            let started = c
                .count(
                    "SELECT count(DISTINCT data::jsonb ->> 'owner') FROM job_events
                     WHERE kind = 'started'",
                )
                .await;
            let nodes = c.store.node_list(now_ms()).await.unwrap();
            let running: HashMap<String, i64> = nodes
                .iter()
                .filter(|n| n.state == "up" && n.running > 0)
                .map(|n| (n.id.clone(), n.running))
                .collect();
            (started == 3 && running.len() == 3).then_some(running)
        },
    )
    .await;
    let victim_id = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(id, _)| id.clone())
        .unwrap();
    let victim = c
        .nodes
        .iter()
        .position(|n| ids.get(&n.pid()) == Some(&victim_id))
        .unwrap();
    // What the victim holds: its channels' jobs must run elsewhere after the kill.
    let held = c.store.warm_list().await.unwrap();
    let held: HashSet<i64> = held
        .iter()
        .filter(|w| w.holder.as_deref() == Some(victim_id.as_str()))
        .map(|w| w.channel_id)
        .collect();
    c.kill(victim);
    let killed_at = now_ms();
    let done_before = c
        .count("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .await;
    assert!(
        (done_before as usize) < JOBS,
        "the kill came mid-run ({done_before} of {JOBS} done)"
    );

    // Everything finishes on the two nodes left.
    eventually(Duration::from_secs(180), "every job to finish", || async {
        let n = c
            .count(
                "SELECT count(*) FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled')",
            )
            .await;
        (n == 0).then_some(())
    })
    .await;
    let succeeded = c
        .count("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .await;
    assert_eq!(
        succeeded as usize,
        JOBS,
        "every job succeeded, none lost\n{}",
        c.logs()
    );

    // No channel ever ran two turns at once, on any node.
    let turns = turns(&c.env.dir.path().join("agent-state").join("turns.jsonl"));
    assert!(turns.len() >= JOBS, "{} turns logged", turns.len());
    let bad = overlaps(&turns);
    assert!(bad.is_empty(), "overlapping turns: {bad:#?}");

    // The victim's channels ran again on the others, within the lease (and a rescuer pass).
    let mut handover = Vec::new();
    for ch in &held {
        let first: Option<i64> = {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
            let at = sqlx::query_scalar(
                "SELECT min(e.at) FROM job_events e JOIN jobs j ON j.id = e.job_id
                 WHERE j.channel_id = $1 AND e.kind = 'started' AND e.at > $2",
            )
            .bind(ch)
            .bind(killed_at)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            let _ = conn.close().await;
            at
        };
        if let Some(at) = first {
            handover.push(at - killed_at);
        }
    }
    assert!(
        !handover.is_empty(),
        "the victim held channels with work left"
    );
    handover.sort();
    let worst = *handover.last().unwrap();
    println!(
        "handover after kill -9: {} channels, p50 {} ms, max {} ms (lease {} ms)",
        handover.len(),
        handover[handover.len() / 2],
        worst,
        LEASE_MS
    );
    assert!(
        worst <= LEASE_MS + 2_000,
        "the victim's channels ran again {worst} ms after the kill (lease {LEASE_MS} ms)\n{}",
        c.logs()
    );
    // The work was shared: each node left ran jobs, and the victim did before it died.
    let by_owner = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT e.data::jsonb ->> 'owner', count(*) FROM job_events e
             WHERE e.kind = 'started' GROUP BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        rows
    };
    assert_eq!(by_owner.len(), 3, "{by_owner:?}");
    // The victim shows as gone, the others up; its leases are no longer counted as held.
    let nodes = c.store.node_list(now_ms()).await.unwrap();
    let victim_row = nodes.iter().find(|n| n.id == victim_id).unwrap();
    assert_eq!(victim_row.state, "gone");
    assert_eq!(nodes.iter().filter(|n| n.state == "up").count(), 2);
    let listed = c.env.ok(&["nodes", "--all"]);
    assert!(
        listed.contains(&victim_id) && listed.contains("gone") && listed.contains("up"),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_schedule_slot_fires_once_while_nodes_are_killed() {
    let mut c = Cluster::new(4).await;
    let channels = c.channels(1).await;
    // `queue`: a slot whose previous job still runs (on a node just killed) is queued, not
    // skipped, so every slot has its job.
    c.env.ok(&[
        "schedule",
        "add",
        "ch00",
        "* * * * * *",
        "@reply tick",
        "--overlap",
        "queue",
    ]);
    for _ in 0..3 {
        c.start();
    }
    c.up(3).await;
    // Kill a node every ~1.5 s, three times, starting a new one each time.
    let first = now_ms();
    for round in 0..3 {
        let fired_before = c.count("SELECT count(*) FROM jobs").await;
        eventually(Duration::from_secs(30), "slots to fire", || async {
            (c.count("SELECT count(*) FROM jobs").await >= fired_before + 2).then_some(())
        })
        .await;
        let alive: Vec<usize> = (0..c.nodes.len())
            .filter(|i| c.nodes[*i].child.try_wait().unwrap().is_none())
            .collect();
        c.kill(alive[round % alive.len()]);
        c.start();
    }
    let last = now_ms();
    // Wait for the scheduler to be past the window, on the nodes still alive.
    eventually(Duration::from_secs(30), "slots after the kills", || async {
        let n = c
            .count(&format!(
                "SELECT count(*) FROM jobs WHERE scheduled_for > {}",
                last + 2_000
            ))
            .await;
        (n > 0).then_some(())
    })
    .await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
    let slots: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT scheduled_for, count(*) FROM jobs WHERE channel_id = $1 AND scheduled_for
         BETWEEN $2 AND $3 GROUP BY scheduled_for ORDER BY scheduled_for",
    )
    .bind(channels[0])
    .bind(first)
    .bind(last)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    let twice: Vec<&(i64, i64)> = slots.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "slots fired more than once: {twice:?}");
    // And none was skipped: consecutive seconds from the first to the last.
    for w in slots.windows(2) {
        assert_eq!(w[1].0 - w[0].0, 1_000, "a slot was missed: {slots:?}");
    }
    assert!(
        slots.len() as i64 >= (last - first) / 1_000 - 1,
        "{} slots in {} ms",
        slots.len(),
        last - first
    );
    println!(
        "{} slots of a one-second schedule over 3 kills, each fired once",
        slots.len()
    );
    drop(c.nodes.drain(..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_database_stops_its_job_before_another_node_may_take_it() {
    let mut c = Cluster::new(4).await;
    let ch = c.channels(1).await[0];
    let (_, rest) = c.url.split_once('@').unwrap();
    let upstream = rest.split_once('/').unwrap().0.to_string();
    let proxy = Proxy::start(upstream).await;
    let a = c.start_through(&proxy);
    let ids = c.up(1).await;
    let a_id = ids[&c.nodes[a].pid()].clone();
    // A long turn runs on the node behind the proxy.
    let job = c
        .store
        .job_insert(
            NewJob::new(ch, Source::Cli, "@sleep-ms 6000\n@reply long turn"),
            now_ms(),
        )
        .await
        .unwrap()
        .job_id;
    eventually(
        Duration::from_secs(30),
        "the job to run on the first node",
        || async {
            let j = c.store.job_get(&job).await.unwrap().unwrap();
            (j.lease_owner.as_deref() == Some(a_id.as_str())).then_some(())
        },
    )
    .await;
    let b = c.start();
    c.up(2).await;
    let turns_path = c.env.dir.path().join("agent-state").join("turns.jsonl");
    eventually(Duration::from_secs(30), "the turn to start", || async {
        (!turns(&turns_path).is_empty()).then_some(())
    })
    .await;
    // The partition: the first node can no longer renew anything. A watcher notes when its
    // agent process dies (the turn log has no `end` for a killed agent).
    let lease_until = c
        .store
        .job_get(&job)
        .await
        .unwrap()
        .unwrap()
        .lease_expires_at
        .unwrap();
    let agent_pid = turns(&turns_path)[0].pid;
    let died = tokio::spawn(async move {
        loop {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(agent_pid as i32, 0) } != 0 {
                return now_ms();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    proxy.cut(true);
    let cut_at = now_ms();

    // The other node runs the job again once the lease ran out, and it succeeds there.
    let done = eventually(
        Duration::from_secs(60),
        "the job to succeed elsewhere",
        || async {
            let j = c.store.job_get(&job).await.unwrap().unwrap();
            (j.state == gorp::store::JobState::Succeeded).then_some(j)
        },
    )
    .await;
    assert_eq!(
        (done.attempt, done.interruptions),
        (2, 1),
        "run twice, the cut-off run an interruption, not a failed attempt: {done:?}"
    );
    let mut ts = turns(&turns_path);
    assert_eq!(ts.len(), 2, "{ts:?}");
    ts.sort_by_key(|t| t.start);
    let (first, second) = (&ts[0], &ts[1]);
    assert_eq!(first.pid, agent_pid);
    let stopped = first.end.unwrap_or(died.await.unwrap());
    // Self-fencing: the cut-off node stopped its agent's turn before its lease ran out (the
    // last renewal before the cut was at most a lease before the cut), so before any other
    // node could take the job over; the second run started after that.
    assert!(
        stopped < cut_at + LEASE_MS,
        "stopped {} ms after the cut; the lease ran out at most {LEASE_MS} ms after it \
         (last read: {} ms)",
        stopped - cut_at,
        lease_until - cut_at
    );
    assert!(second.start > stopped, "{first:?} / {second:?}");
    println!(
        "cut-off node stopped its turn {} ms after the cut; the job ran again {} ms after it",
        stopped - cut_at,
        second.start - cut_at
    );
    let owners = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT e.data::jsonb ->> 'owner' FROM job_events e
             WHERE e.job_id = $1 AND e.kind = 'started' ORDER BY e.seq",
        )
        .bind(&job)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        rows
    };
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert_eq!(owners[0], a_id);
    assert_ne!(owners[1], a_id);
    let _ = b;
    proxy.cut(false);
}

/// The HTTP address a node's log says it listens on.
async fn http_addr(log: &Path) -> String {
    eventually(
        Duration::from_secs(30),
        "the node's HTTP address",
        || async {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            text.lines()
                .find(|l| l.contains("HTTP listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_nodes_see_enqueues_cancels_and_events_at_once_and_the_listener_reconnects() {
    const TOKEN: &str = "nodes-test-api-token-0123456789";
    let mut c = Cluster::new(4).await;
    // Polling so slow that only a notification explains a quick reaction.
    let path = c.env.config_path();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("poll_interval_ms = 100", "poll_interval_ms = 10000")
        .replace("lease_secs = 3", "lease_secs = 20")
        .replace("heartbeat_secs = 1", "heartbeat_secs = 5")
        .replace(
            "[webhook]\n",
            &format!("[webhook]\ntokens = [\"{TOKEN}\"]\n"),
        );
    std::fs::write(&path, text).unwrap();
    let ch = c.channels(1).await[0];
    let b = c.start();
    let ids = c.up(1).await;
    let b_id = ids[&c.nodes[b].pid()].clone();
    let finish = |job: String, want: gorp::store::JobState| {
        let store = c.store.clone();
        async move {
            let t = std::time::Instant::now();
            eventually(Duration::from_secs(30), "the job to end", || async {
                let j = store.job_get(&job).await.unwrap().unwrap();
                (j.state == want).then_some(())
            })
            .await;
            t.elapsed()
        }
    };

    // Enqueued here (another process), started there at once.
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let job = c
            .store
            .job_insert(
                NewJob::new(ch, Source::Cli, format!("@reply hi {i}")),
                now_ms(),
            )
            .await
            .unwrap()
            .job_id;
        slowest = slowest.max(finish(job, gorp::store::JobState::Succeeded).await);
    }
    assert!(
        slowest < Duration::from_secs(2),
        "{slowest:?} with a 10 s poll"
    );

    // A cancel made by another process reaches the running job at once.
    let long = c
        .store
        .job_insert(NewJob::new(ch, Source::Cli, "@sleep-ms 60000"), now_ms())
        .await
        .unwrap()
        .job_id;
    eventually(Duration::from_secs(30), "the long job to run", || async {
        let j = c.store.job_get(&long).await.unwrap().unwrap();
        (j.state == gorp::store::JobState::Running).then_some(())
    })
    .await;
    c.env.ok(&["cancel", &long]);
    let took = finish(long, gorp::store::JobState::Cancelled).await;
    assert!(
        took < Duration::from_secs(3),
        "{took:?} with a 5 s heartbeat"
    );

    // The listener's connection is cut: it reconnects, and wakeups work again.
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(!cut.is_empty(), "a LISTEN connection to cut");
        let _ = conn.close().await;
    }
    let job = c
        .store
        .job_insert(
            NewJob::new(ch, Source::Cli, "@reply after the cut"),
            now_ms(),
        )
        .await
        .unwrap()
        .job_id;
    let took = finish(job, gorp::store::JobState::Succeeded).await;
    assert!(
        took < Duration::from_secs(3),
        "{took:?} after the listener was cut"
    );

    // SSE on a node that does not run the job sees the other node's events as they commit.
    let a = c.start();
    c.up(2).await;
    let addr = http_addr(&c.nodes[a].log).await;
    let job = c
        .store
        .job_insert(
            NewJob::new(
                ch,
                Source::Cli,
                "@chunks 8\n@delay-ms 300\n@reply one two three four five six seven eight",
            ),
            now_ms(),
        )
        .await
        .unwrap()
        .job_id;
    let mut resp = reqwest::Client::new()
        .get(format!("http://{addr}/api/jobs/{job}/events"))
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut lags = Vec::new();
    let mut buf = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        let arrived = now_ms();
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                if let Ok(ev) = serde_json::from_str::<serde_json::Value>(data) {
                    if ev["kind"] == "message" {
                        lags.push(arrived - ev["at"].as_i64().unwrap());
                    }
                }
            }
        }
    }
    let started_by: String = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&c.url).await.unwrap();
        let o = sqlx::query_scalar(
            "SELECT data::jsonb ->> 'owner' FROM job_events WHERE job_id = $1 AND kind = 'started'",
        )
        .bind(&job)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        o
    };
    assert_eq!(started_by, b_id, "the node holding the channel ran it");
    assert!(lags.len() >= 5, "{lags:?}");
    lags.sort();
    let median = lags[lags.len() / 2];
    println!("SSE on the other node: message events arrived {lags:?} ms after they were written");
    // Polling alone (once a second) would put the median near 500 ms.
    assert!(median < 250, "median lag {median} ms: {lags:?}");
}

/// On SQLite (one host), a leader that died with `kill -9` is replaced at once, not after its
/// lease: a restarted gorp's Matrix bot does not wait out the dead one's lease.
#[tokio::test]
async fn on_sqlite_a_leader_that_died_on_this_host_is_replaced_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&DatabaseConfig {
        path: dir.path().join("gorp.db"),
        ..Default::default()
    })
    .await
    .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let dead = format!("{}:{gone_pid}:deadbeef", host.trim());
    let now = now_ms();
    assert!(store
        .leader_take("matrix", &dead, now, now + 600_000)
        .await
        .unwrap());
    let me = gorp::instance::InstanceId::new().to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(gorp::node::lead(
        store.clone(),
        gorp::node::MATRIX,
        me.clone(),
        Duration::from_secs(600),
        stop.clone(),
        move |work_stop| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                work_stop.cancelled().await;
            }
        },
    ));
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the work started without waiting out the dead leader's 10-minute lease");
    assert_eq!(
        store.leader_get("matrix").await.unwrap().map(|(h, _)| h),
        Some(me.clone())
    );
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        store.leader_get("matrix").await.unwrap(),
        None,
        "let go on shutdown"
    );
}

/// Work moves: a node with one slot holds two channels' warm agents; while one channel's long
/// turn keeps the slot, the other channel's job is not left waiting: its idle agent is handed
/// over and a node with a free slot runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_nodes_idle_channel_moves_to_a_node_with_a_free_slot() {
    let mut c = Cluster::new(1).await;
    let chs = c.channels(2).await;
    let (x, y) = (chs[0], chs[1]);
    let a = c.start();
    let ids = c.up(1).await;
    let a_id = ids[&c.nodes[a].pid()].clone();
    let store = c.store.clone();
    let run = |ch: i64, prompt: &'static str| {
        let store = store.clone();
        async move {
            store
                .job_insert(NewJob::new(ch, Source::Cli, prompt), now_ms())
                .await
                .unwrap()
                .job_id
        }
    };
    let url = c.url.clone();
    let owner_of = |job: String| {
        let url = url.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
            let o: Option<String> = sqlx::query_scalar(
                "SELECT data::jsonb ->> 'owner' FROM job_events
                 WHERE job_id = $1 AND kind = 'started' ORDER BY seq DESC LIMIT 1",
            )
            .bind(&job)
            .fetch_optional(&mut conn)
            .await
            .ok()?;
            let _ = conn.close().await;
            o
        }
    };
    // The first node runs a job on each channel: both agents stay warm there.
    for ch in [x, y] {
        let job = run(ch, "@reply warm").await;
        eventually(Duration::from_secs(30), "the warm-up job", || async {
            let j = c.store.job_get(&job).await.unwrap().unwrap();
            (j.state == gorp::store::JobState::Succeeded).then_some(())
        })
        .await;
    }
    let held: Vec<i64> = c
        .store
        .warm_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.holder.as_deref() == Some(a_id.as_str()))
        .map(|w| w.channel_id)
        .collect();
    assert_eq!(held.len(), 2, "both agents warm on the first node");
    let b = c.start();
    c.up(2).await;
    let b_id = c.up(2).await[&c.nodes[b].pid()].clone();

    // X's long turn takes the first node's only slot; Y's job is due meanwhile.
    let long = run(x, "@sleep-ms 15000\n@reply long").await;
    eventually(Duration::from_secs(30), "the long turn to run", || async {
        (owner_of(long.clone()).await.as_deref() == Some(a_id.as_str())).then_some(())
    })
    .await;
    let enqueued = now_ms();
    let short = run(y, "@reply moved").await;
    let done = eventually(Duration::from_secs(30), "Y's job to finish", || async {
        let j = c.store.job_get(&short).await.unwrap().unwrap();
        (j.state == gorp::store::JobState::Succeeded).then_some(j)
    })
    .await;
    let waited = done.started_at.unwrap() - enqueued;
    assert_eq!(
        owner_of(short.clone()).await.as_deref(),
        Some(b_id.as_str())
    );
    let x_job = c.store.job_get(&long).await.unwrap().unwrap();
    assert_eq!(
        x_job.state,
        gorp::store::JobState::Running,
        "Y ran while X's long turn still held the first node"
    );
    let y_row = c.store.warm_get(y).await.unwrap().unwrap();
    assert_eq!(
        y_row.holder.as_deref(),
        Some(b_id.as_str()),
        "Y's agent moved"
    );
    println!("Y's job started on the node with room {waited} ms after it was enqueued");
    assert!(waited < 10_000, "{waited} ms");
}
