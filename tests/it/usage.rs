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
        let row: (Option<i64>, Option<i64>, Option<f64>) =
            sqlx::query_as("SELECT input_tokens, output_tokens, cost_usd FROM jobs WHERE id = ?1")
                .bind(&job.id)
                .fetch_one(g.store.read_pool())
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
    let (jobs, cost): (i64, f64) =
        sqlx::query_as("SELECT sum(jobs), sum(cost_usd) FROM usage_daily WHERE channel = 'beta'")
            .fetch_one(g.store.read_pool())
            .await
            .unwrap();
    assert_eq!(jobs, 1);
    assert!((cost - 3.0).abs() < 1e-6);
    g.stop().await;
}
