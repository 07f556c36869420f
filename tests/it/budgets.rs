//! Daily and monthly budgets at the store level: a spent channel's jobs are held by the claim,
//! the chained claim and the worker's outlook, told why once, and released by the next window
//! or a raised budget. Time is passed in, never slept.

use gorp::budget::SpendPolicy;
use gorp::service::channels::{self, Changes};
use gorp::store::{JobState, NewJob, RunFacts, Source, SpendLimits, SpendWindow, Store};

use crate::support::{setup, Setup};

/// 2026-12-06 10:00 UTC, a Sunday.
const T0: i64 = 1_796_551_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const LEASE: i64 = 30_000;

fn utc() -> SpendPolicy {
    SpendPolicy::default()
}

/// Runs one job of `channel` to success at `at`, recording that its turn cost `cost`.
async fn spend(s: &Setup, channel: i64, cost: f64, at: i64) {
    let id = s
        .store
        .job_insert(NewJob::new(channel, Source::Cli, "spend"), at)
        .await
        .unwrap()
        .job_id;
    let claimed = s
        .store
        .job_claim_many("w", 100, at, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    let job = claimed.into_iter().find(|j| j.id == id).expect("claimed");
    record(&s.store, &job.id, job.attempt, cost, at).await;
    assert!(s
        .store
        .job_complete_if_running(&job.lease().unwrap(), None, at)
        .await
        .unwrap());
}

async fn record(store: &Store, id: &str, attempt: i64, cost: f64, at: i64) {
    let facts = RunFacts {
        cost_usd: Some(cost),
        ..Default::default()
    };
    store.job_record_run(id, attempt, facts, at).await.unwrap();
}

async fn queue(s: &Setup, channel: i64, prompt: &str, at: i64) -> String {
    s.store
        .job_insert(NewJob::new(channel, Source::Cli, prompt), at)
        .await
        .unwrap()
        .job_id
}

async fn set(s: &Setup, name: &str, changes: Changes) {
    channels::update(&s.store, name, changes)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_spent_daily_budget_holds_the_channels_jobs_until_the_next_day() {
    let s = setup().await;
    let capped = s.channel("capped").await;
    let free = s.channel("free").await;
    set(
        &s,
        "capped",
        Changes {
            budget_day_usd: Some(Some(1.0)),
            ..Default::default()
        },
    )
    .await;
    let p = utc();
    // Under the budget, jobs run.
    spend(&s, capped.id, 0.6, T0).await;
    spend(&s, capped.id, 0.5, T0 + 1).await;
    // $1.10 of $1.00: spent.
    let held = queue(&s, capped.id, "held", T0 + 2).await;
    let other = queue(&s, free.id, "other", T0 + 2).await;
    let now = T0 + 3;
    let outlook = s.store.job_next_due(now, &p.limits(now)).await.unwrap();
    assert!(outlook.due, "the free channel's job is due");
    assert_eq!(outlook.held.len(), 1);
    let h = &outlook.held[0];
    assert_eq!((h.job_id.as_str(), h.attempt), (held.as_str(), 0));
    assert_eq!(h.spend.channel, "capped");
    assert!((h.spend.day_usd - 1.1).abs() < 1e-9);
    assert_eq!(h.spend.day_max_usd, Some(1.0));
    assert_eq!(
        h.spend.spent().map(|(w, _, max)| (w, max)),
        Some((SpendWindow::Day, 1.0))
    );

    let claimed = s
        .store
        .job_claim_many("w", 10, now, LEASE, &p.limits(now))
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [other.as_str()], "the spent channel is skipped");
    assert_eq!(
        s.store.job_get(&held).await.unwrap().unwrap().state,
        JobState::Queued,
        "held, not lost"
    );

    // Told once: the second note of the same attempt writes nothing.
    let notes = p.held_notes(&outlook.held, now);
    assert_eq!(s.store.job_note_held(notes.clone()).await.unwrap(), 1);
    assert_eq!(s.store.job_note_held(notes).await.unwrap(), 0);
    let why = s.store.job_held_reason(&held).await.unwrap().unwrap();
    assert_eq!(
        why,
        "held: channel capped has spent $1.1000 of its daily budget of $1.00; its jobs wait \
         until the day ends (2026-12-07 00:00 UTC) or the budget is raised"
    );
    let again = s.store.job_next_due(now, &p.limits(now)).await.unwrap();
    assert!(again.held.is_empty(), "a told job is not told again");
    assert!(!again.due, "the held job is not due");

    // Still held at 23:59 the same day; released at midnight.
    let late = T0 + 14 * HOUR - 60_000;
    assert!(s
        .store
        .job_claim_many("w", 10, late, LEASE, &p.limits(late))
        .await
        .unwrap()
        .iter()
        .all(|j| j.id != held));
    let midnight = T0 + 14 * HOUR;
    assert_eq!(p.window_end(SpendWindow::Day, now), midnight);
    let next_day = s
        .store
        .job_claim_many("w", 10, midnight, LEASE, &p.limits(midnight))
        .await
        .unwrap();
    assert_eq!(next_day.len(), 1);
    assert_eq!(next_day[0].id, held);
    // Its reason is gone with its queued state.
    assert_eq!(s.store.job_held_reason(&held).await.unwrap(), None);
}

#[tokio::test]
async fn a_raised_budget_releases_held_jobs_and_the_config_default_holds_every_channel() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let p = SpendPolicy {
        daily_max: Some(2.0),
        ..utc()
    };
    spend(&s, a.id, 2.0, T0).await;
    spend(&s, b.id, 1.0, T0).await;
    let ja = queue(&s, a.id, "a", T0 + 1).await;
    let jb = queue(&s, b.id, "b", T0 + 1).await;
    let now = T0 + 2;
    let claimed = s
        .store
        .job_claim_many("w", 10, now, LEASE, &p.limits(now))
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [jb.as_str()],
        "a reached [budget] daily_max_cost_usd exactly"
    );
    // The channel's own budget wins over the config's.
    set(
        &s,
        "a",
        Changes {
            budget_day_usd: Some(Some(5.0)),
            ..Default::default()
        },
    )
    .await;
    let claimed = s
        .store
        .job_claim_many("w", 10, now, LEASE, &p.limits(now))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, ja);
    // 0 holds everything; `None` goes back to the config's.
    set(
        &s,
        "b",
        Changes {
            budget_day_usd: Some(Some(0.0)),
            ..Default::default()
        },
    )
    .await;
    assert!(s
        .store
        .job_complete_if_running(&claimed[0].lease().unwrap(), None, now)
        .await
        .unwrap());
    let jb2 = queue(&s, b.id, "b2", now).await;
    let out = s.store.job_next_due(now, &p.limits(now)).await.unwrap();
    // b's first job is still running (claimed above), so nothing of b is a head yet.
    assert!(out.held.is_empty());
    let b_running = s.store.job_get(&jb).await.unwrap().unwrap();
    assert!(s
        .store
        .job_complete_if_running(&b_running.lease().unwrap(), None, now)
        .await
        .unwrap());
    let out = s.store.job_next_due(now, &p.limits(now)).await.unwrap();
    assert_eq!(out.held.len(), 1);
    assert_eq!(out.held[0].job_id, jb2);
    assert_eq!(out.held[0].spend.day_max_usd, Some(0.0));
}

#[tokio::test]
async fn a_monthly_budget_holds_across_days_and_the_chained_claim_stops_at_a_spent_budget() {
    let s = setup().await;
    let ch = s.channel("monthly").await;
    set(
        &s,
        "monthly",
        Changes {
            budget_month_usd: Some(Some(3.0)),
            ..Default::default()
        },
    )
    .await;
    let p = utc();
    // Spent on Dec 1 and Dec 6: $3.00 of $3.00 this month.
    spend(&s, ch.id, 1.0, T0 - 5 * DAY).await;
    // The next job runs, and its own spend reaches the budget: the completion does not chain
    // the job behind it.
    let first = queue(&s, ch.id, "first", T0).await;
    let second = queue(&s, ch.id, "second", T0).await;
    let claimed = s
        .store
        .job_claim_many("w", 10, T0, LEASE, &p.limits(T0))
        .await
        .unwrap();
    assert_eq!(claimed[0].id, first);
    record(&s.store, &first, 1, 2.0, T0 + 1).await;
    let (won, next) = s
        .store
        .job_complete_and_claim(
            &claimed[0].lease().unwrap(),
            ch.id,
            None,
            T0 + 2,
            LEASE,
            &p.limits(T0 + 2),
        )
        .await
        .unwrap();
    assert!(won);
    assert_eq!(next, None, "the spent budget holds the chained claim");
    // Held on the following days of December, released on January 1.
    for at in [T0 + DAY, T0 + 20 * DAY] {
        let out = s.store.job_next_due(at, &p.limits(at)).await.unwrap();
        assert!(!out.due);
        assert_eq!(out.held.len(), 1, "held at {at}");
        assert_eq!(out.held[0].spend.spent().unwrap().0, SpendWindow::Month);
    }
    let jan = p.window_end(SpendWindow::Month, T0);
    assert_eq!(jan, 1_798_761_600_000, "2027-01-01 00:00 UTC");
    let claimed = s
        .store
        .job_claim_many("w", 10, jan, LEASE, &p.limits(jan))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, second);

    // Without a spent budget the chained claim goes on.
    let third = queue(&s, ch.id, "third", jan).await;
    let (_, next) = s
        .store
        .job_complete_and_claim(
            &claimed[0].lease().unwrap(),
            ch.id,
            None,
            jan + 1,
            LEASE,
            &p.limits(jan + 1),
        )
        .await
        .unwrap();
    assert_eq!(next.map(|j| j.id), Some(third));
}

#[tokio::test]
async fn bad_budgets_are_refused_and_write_nothing() {
    let s = setup().await;
    s.channel("c").await;
    for bad in [-1.0, f64::NAN, f64::INFINITY, 1e7] {
        for changes in [
            Changes {
                budget_day_usd: Some(Some(bad)),
                ..Default::default()
            },
            Changes {
                budget_month_usd: Some(Some(bad)),
                budget_day_usd: Some(Some(1.0)),
                ..Default::default()
            },
        ] {
            let err = channels::update(&s.store, "c", changes).await.unwrap_err();
            assert!(
                err.to_string().contains("a cost budget is a number of USD"),
                "{err}"
            );
        }
    }
    let ch = s.store.channel_get("c").await.unwrap().unwrap();
    assert_eq!((ch.budget_day_usd, ch.budget_month_usd), (None, None));
    // An unknown channel: nothing to change.
    let none = channels::update(
        &s.store,
        "nope",
        Changes {
            budget_day_usd: Some(Some(1.0)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(none, None);
}
