//! Usage with the real `gorp-script-agent`: each attempt's tokens and cost land in the job row
//! and in one usage row, a session's cumulative cost becomes each turn's part of it, every
//! attempt counts, and the report groups by channel, source and day.

use gorp::store::{JobState, UsageBy, UsageFilter};

use crate::acp::Gorp;

fn filter(by: UsageBy, channel: Option<&str>) -> UsageFilter {
    UsageFilter {
        since: 0,
        channel: channel.map(String::from),
        by,
    }
}

#[tokio::test]
async fn each_turn_records_its_own_part_of_the_sessions_cost_and_every_attempt_counts() {
    let g = Gorp::start(|c| c.acp.stall_timeout_secs = 1).await;
    let a = g.channel("alpha", |_| {}).await;
    let b = g.channel("beta", |_| {}).await;
    // Two turns on one warm session: the agent reports 0.25 then 0.50 (its running total).
    for _ in 0..2 {
        let (job, _) = g
            .run(
                a,
                "@usage in=10 out=20 cost=0.25\n@usage in=1 out=2\n@reply ok",
            )
            .await;
        assert_eq!(job.state, JobState::Succeeded);
        let row: (Option<i64>, Option<i64>, Option<f64>) = sqlx::query_as(sqlx::AssertSqlSafe(
            g.sql("SELECT input_tokens, output_tokens, cost_usd FROM jobs WHERE id = ?1"),
        ))
        .bind(&job.id)
        .fetch_one(&mut g.raw().await)
        .await
        .unwrap();
        assert_eq!(
            row,
            (Some(11), Some(22), Some(0.25)),
            "the turn's own figures"
        );
    }
    // A stalled first attempt (its usage reported before the hang) and its retry in a fresh
    // agent (whose running total starts again): both attempts are spend.
    let (job, _) = g
        .run(b, "@usage in=100 out=50 cost=1.5\n@hang-once\n@reply done")
        .await;
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 2));

    let by_channel = g
        .store
        .usage_report(&filter(UsageBy::Channel, None))
        .await
        .unwrap();
    assert_eq!(by_channel.len(), 2);
    // Largest cost first.
    assert_eq!(by_channel[0].key, "beta");
    assert_eq!(
        (
            by_channel[0].jobs,
            by_channel[0].attempts,
            by_channel[0].input_tokens
        ),
        (1, 2, 200)
    );
    assert!(
        (by_channel[0].cost_usd - 3.0).abs() < 1e-9,
        "{by_channel:?}"
    );
    assert_eq!(by_channel[1].key, "alpha");
    assert_eq!((by_channel[1].jobs, by_channel[1].output_tokens), (2, 44));
    assert!((by_channel[1].cost_usd - 0.5).abs() < 1e-9);
    assert!(by_channel.iter().all(|r| r.agent_secs >= 0.0));

    let by_source = g
        .store
        .usage_report(&filter(UsageBy::Source, None))
        .await
        .unwrap();
    assert_eq!(by_source.len(), 1);
    assert_eq!((by_source[0].key.as_str(), by_source[0].jobs), ("cli", 3));
    let by_day = g
        .store
        .usage_report(&filter(UsageBy::Day, Some("alpha")))
        .await
        .unwrap();
    assert_eq!(by_day.len(), 1);
    assert_eq!(by_day[0].key.len(), 10, "YYYY-MM-DD: {by_day:?}");
    let future = UsageFilter {
        since: gorp::store::now_ms() + 60_000,
        ..filter(UsageBy::Channel, None)
    };
    assert!(g.store.usage_report(&future).await.unwrap().is_empty());

    // The SQL view agrees.
    let (jobs, cost): (i64, f64) = sqlx::query_as(sqlx::AssertSqlSafe(g.sql(
        "SELECT CAST(sum(jobs) AS BIGINT), sum(cost_usd) FROM usage_daily WHERE channel = 'beta'",
    )))
    .fetch_one(&mut g.raw().await)
    .await
    .unwrap();
    assert_eq!(jobs, 1);
    assert!((cost - 3.0).abs() < 1e-6);
    g.stop().await;
}

#[tokio::test]
async fn a_turn_that_passes_its_budget_is_stopped_at_once_and_not_retried() {
    let g = Gorp::start(|c| c.budget.job_max_cost_usd = Some(1.0)).await;
    let ch = g.channel("capped", |_| {}).await;
    let (job, out) = g
        .run(
            ch,
            "@usage in=1 out=1 cost=0.6\n@reply half\n@usage in=1 out=1 cost=0.6\n@hang\n@reply never",
        )
        .await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.stop_reason.as_deref(), Some("budget"));
    assert_eq!(job.attempt, 1, "not retried (max_attempts 3)");
    let error = job.error.clone().unwrap();
    assert!(
        error.contains("cost 1.2000 USD, more than 1.0000 USD ([budget] job_max_cost_usd)"),
        "{error}"
    );
    assert!(!out.contains("never"), "{out}");
    let events = g.store.job_events_list(&job.id, 0, 1000).await.unwrap();
    let budget: Vec<_> = events.iter().filter(|e| e.kind == "budget").collect();
    assert_eq!(budget.len(), 1, "said once");
    let data = budget[0].data.clone().unwrap();
    assert_eq!(data["limit"], "cost_usd");
    assert_eq!(data["max"], 1.0);
    assert!((data["used"].as_f64().unwrap() - 1.2).abs() < 1e-9);
    // What it spent is spend all the same.
    let spent = g
        .store
        .usage_report(&filter(UsageBy::Channel, Some("capped")))
        .await
        .unwrap();
    assert!((spent[0].cost_usd - 1.2).abs() < 1e-9);
    // The agent was restarted: the next job gets a fresh one.
    let (next, out) = g.run(ch, "@reply fine").await;
    assert_eq!((next.state, out.as_str()), (JobState::Succeeded, "fine"));
    assert_ne!(
        g.session_data(&job.id).await["pid"],
        g.session_data(&next.id).await["pid"]
    );

    // A channel's token budget, and a job's own cost limit below the channel's.
    gorp::service::channels::update(
        &g.store,
        "capped",
        gorp::service::channels::Changes {
            budget_job_tokens: Some(Some(50)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    let (job, _) = g.run(ch, "@usage in=30 out=30\n@hang").await;
    assert_eq!(job.stop_reason.as_deref(), Some("budget"));
    assert!(job
        .error
        .unwrap()
        .contains("used 60 tokens, more than 50 (the channel's per-job token budget)"));
    let mut own = gorp::store::NewJob::new(ch, gorp::store::Source::Cli, "@usage cost=0.2\n@hang");
    own.max_cost_usd = Some(0.1);
    let id = g
        .store
        .job_insert(own, gorp::store::now_ms())
        .await
        .unwrap()
        .job_id;
    let job = g.wait_done(&id).await;
    assert_eq!(job.stop_reason.as_deref(), Some("budget"));
    assert!(job.error.unwrap().contains("(the job's max_cost_usd)"));
    g.stop().await;
}

#[tokio::test]
async fn a_jobs_own_timeout_stops_its_turn_below_the_prompt_timeout() {
    let g = Gorp::start(|c| c.acp.prompt_timeout_secs = 600).await;
    let ch = g.channel("quick", |_| {}).await;
    let mut job = gorp::store::NewJob::new(ch, gorp::store::Source::Cli, "@hang");
    job.timeout_secs = Some(1);
    job.max_attempts = 1;
    let id = g
        .store
        .job_insert(job, gorp::store::now_ms())
        .await
        .unwrap()
        .job_id;
    let t = std::time::Instant::now();
    let done = g.wait_done(&id).await;
    assert_eq!(done.state, JobState::Failed);
    assert!(done.error.unwrap().contains("timed out after 1s"));
    assert!(t.elapsed() < std::time::Duration::from_secs(60));
    // Out-of-range limits are refused at enqueue, nothing written.
    for (timeout, cost) in [
        (Some(0), None),
        (Some(700_000), None),
        (None, Some(-1.0)),
        (None, Some(f64::NAN)),
    ] {
        let mut j = gorp::store::NewJob::new(ch, gorp::store::Source::Cli, "x");
        j.timeout_secs = timeout;
        j.max_cost_usd = cost;
        assert!(g.store.job_insert(j, gorp::store::now_ms()).await.is_err());
    }
    g.stop().await;
}

#[tokio::test]
async fn a_spent_daily_budget_holds_the_next_jobs_with_the_reason_until_it_is_raised() {
    let g = Gorp::start(|c| c.budget.daily_max_cost_usd = Some(1.0)).await;
    let ch = g.channel("daily", |_| {}).await;
    let other = g.channel("other", |_| {}).await;
    let (first, _) = g.run(ch, "@usage cost=0.6\n@reply one").await;
    assert_eq!(first.state, JobState::Succeeded);
    // The second job passes the budget (a running job is not stopped by it); the two behind
    // it stay queued.
    let second = g.enqueue(ch, "@usage cost=0.6\n@reply two").await;
    let third = g.enqueue(ch, "@reply three").await;
    let fourth = g.enqueue(ch, "@reply four").await;
    assert_eq!(g.wait_done(&second).await.state, JobState::Succeeded);
    let why = crate::support::eventually(
        std::time::Duration::from_secs(20),
        "the held job to be told why",
        || async { g.store.job_held_reason(&third).await.unwrap() },
    )
    .await;
    assert!(
        why.contains("has spent $1.2000 of its daily budget of $1.00"),
        "{why}"
    );
    for id in [&third, &fourth] {
        assert_eq!(
            g.store.job_get(id).await.unwrap().unwrap().state,
            JobState::Queued
        );
    }
    // Other channels run meanwhile, and enqueueing into the held channel still commits.
    let (job, out) = g.run(other, "@reply free").await;
    assert_eq!((job.state, out.as_str()), (JobState::Succeeded, "free"));
    let fifth = g.enqueue(ch, "@reply five").await;

    // Raised: the held jobs run, in order.
    gorp::service::channels::update(
        &g.store,
        "daily",
        gorp::service::channels::Changes {
            budget_day_usd: Some(Some(10.0)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    let mut started = Vec::new();
    for id in [&third, &fourth, &fifth] {
        let job = g.wait_done(id).await;
        assert_eq!(job.state, JobState::Succeeded);
        started.push(job.started_at.unwrap());
    }
    assert!(started.windows(2).all(|w| w[0] <= w[1]), "{started:?}");
    // Told once: one held event, on the job that was the channel's next.
    let kinds = [g.event_kinds(&third).await, g.event_kinds(&fourth).await];
    let held: Vec<usize> = kinds
        .iter()
        .map(|k| k.iter().filter(|k| *k == "held").count())
        .collect();
    assert_eq!(held, [1, 0]);
    g.stop().await;
}
