//! The queue engine at the store level: state machine, fencing, rescue, retention,
//! idempotency, cancel, and "bad input writes nothing". Time is passed in, never slept.

use std::time::Duration;

use gorp::store::{
    CancelOutcome, JobFilter, JobState, NewEvent, NewJob, QueueOutlook, Source, SpendLimits,
    StoreError,
};
use gorp::worker::retry_delay;
use rand::SeedableRng;

use crate::support::setup;

const T0: i64 = 1_700_000_000_000;
const LEASE: i64 = 30_000;
const MAX_RESCUES: i64 = 5;

fn job(channel_id: i64, prompt: &str) -> NewJob {
    NewJob::new(channel_id, Source::Cli, prompt)
}

/// Records that the attempt's prompt went to the agent (its `session` event), as the executor
/// does before the turn.
async fn turn_started(s: &crate::support::Setup, job_id: &str, attempt: i64) {
    s.store
        .job_events_append(vec![NewEvent {
            job_id: job_id.into(),
            attempt,
            kind: "session".into(),
            text: None,
            data: None,
            at: T0,
        }])
        .await
        .unwrap();
    s.store.flush().await.unwrap();
}

#[tokio::test]
async fn job_runs_queued_to_running_to_succeeded() {
    let s = setup().await;
    let ch = s.channel("alpha").await;
    let e = s.store.job_insert(job(ch.id, "hello"), T0).await.unwrap();
    assert!(e.created);
    let j = s.store.job_get(&e.job_id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.channel.as_str()),
        (JobState::Queued, 0, "alpha")
    );

    let claimed = s
        .store
        .job_claim_many("w1", 10, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!((c.state, c.attempt), (JobState::Running, 1));
    assert_eq!(c.lease_owner.as_deref(), Some("w1"));
    assert_eq!(c.lease_expires_at, Some(T0 + LEASE));
    assert_eq!(c.started_at, Some(T0));

    let lease = c.lease().unwrap();
    assert!(s
        .store
        .job_complete_if_running(&lease, Some("end_turn".into()), T0 + 5)
        .await
        .unwrap());
    let j = s.store.job_get(&e.job_id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(j.finished_at, Some(T0 + 5));
    assert_eq!(j.lease_owner, None);
    // A second completion of the same attempt is refused.
    assert!(!s
        .store
        .job_complete_if_running(&lease, None, T0 + 6)
        .await
        .unwrap());
}

#[tokio::test]
async fn failed_attempt_is_retried_with_backoff_then_fails_when_attempts_are_spent() {
    let s = setup().await;
    let ch = s.channel("alpha").await;
    let mut nj = job(ch.id, "flaky");
    nj.max_attempts = 2;
    let id = s.store.job_insert(nj, T0).await.unwrap().job_id;

    let a1 = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    let st = s
        .store
        .job_fail_if_running(
            &a1.lease().unwrap(),
            "boom 1".into(),
            Some(T0 + 10_000),
            T0 + 1,
        )
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Queued));
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.run_at, j.error.as_deref()),
        (JobState::Queued, T0 + 10_000, Some("boom 1"))
    );
    // Not due before its run_at.
    assert!(s
        .store
        .job_claim_many("w", 1, T0 + 9_999, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .is_empty());

    let a2 = s
        .store
        .job_claim_many("w", 1, T0 + 10_000, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(a2.attempt, 2);
    let st = s
        .store
        .job_fail_if_running(
            &a2.lease().unwrap(),
            "boom 2".into(),
            Some(T0 + 99_000),
            T0 + 10_001,
        )
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Failed), "attempts spent");
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.error.as_deref()),
        (JobState::Failed, 2, Some("boom 2"))
    );
    assert_eq!(j.finished_at, Some(T0 + 10_001));
}

#[tokio::test]
async fn non_retryable_failure_fails_at_once() {
    let s = setup().await;
    let ch = s.channel("alpha").await;
    let id = s
        .store
        .job_insert(job(ch.id, "x"), T0)
        .await
        .unwrap()
        .job_id;
    let a = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    let st = s
        .store
        .job_fail_if_running(&a.lease().unwrap(), "bad".into(), None, T0)
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Failed));
    assert_eq!(s.store.job_get(&id).await.unwrap().unwrap().attempt, 1);
}

#[tokio::test]
async fn stale_worker_loses_to_the_newer_attempt() {
    let s = setup().await;
    let ch = s.channel("alpha").await;
    let id = s
        .store
        .job_insert(job(ch.id, "x"), T0)
        .await
        .unwrap()
        .job_id;
    let old = s
        .store
        .job_claim_many("old", 1, T0, 1_000, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    turn_started(&s, &id, 1).await;
    // Worker "old" stops heartbeating; the rescuer re-queues; "new" claims attempt 2.
    let rescued = s
        .store
        .job_rescue_expired(T0 + 2_000, MAX_RESCUES)
        .await
        .unwrap();
    assert_eq!(rescued.len(), 1);
    let new = s
        .store
        .job_claim_many("new", 1, T0 + 2_001, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(new.attempt, 2);

    let old_lease = old.lease().unwrap();
    assert!(!s
        .store
        .job_complete_if_running(&old_lease, None, T0 + 3_000)
        .await
        .unwrap());
    assert_eq!(
        s.store
            .job_fail_if_running(&old_lease, "late".into(), Some(T0), T0 + 3_000)
            .await
            .unwrap(),
        None
    );
    assert!(!s
        .store
        .job_cancel_if_running(&old_lease, "late".into(), T0 + 3_000)
        .await
        .unwrap());
    assert!(!s
        .store
        .job_release_if_running(&old_lease, T0 + 3_000)
        .await
        .unwrap());
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.lease_owner.as_deref()),
        (JobState::Running, 2, Some("new"))
    );

    // Same attempt number but another owner is refused too.
    let mut forged = new.lease().unwrap();
    forged.owner = "old".into();
    assert!(!s
        .store
        .job_complete_if_running(&forged, None, T0 + 3_000)
        .await
        .unwrap());

    assert!(s
        .store
        .job_complete_if_running(&new.lease().unwrap(), None, T0 + 3_001)
        .await
        .unwrap());
    assert_eq!(
        s.store.job_get(&id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
}

#[tokio::test]
async fn claim_takes_one_job_per_channel_in_priority_order() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let a1 = s
        .store
        .job_insert(job(a.id, "a1"), T0)
        .await
        .unwrap()
        .job_id;
    let mut urgent = job(a.id, "a2");
    urgent.priority = 5;
    let a2 = s.store.job_insert(urgent, T0 + 1).await.unwrap().job_id;
    let b1 = s
        .store
        .job_insert(job(b.id, "b1"), T0 + 2)
        .await
        .unwrap()
        .job_id;
    let mut later = job(b.id, "later");
    later.run_at = Some(T0 + 60_000);
    s.store.job_insert(later, T0 + 3).await.unwrap();

    let claimed = s
        .store
        .job_claim_many("w", 10, T0 + 10, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    let mut ids: Vec<_> = claimed.iter().map(|j| j.id.clone()).collect();
    ids.sort();
    let mut want = vec![a2.clone(), b1.clone()];
    want.sort();
    assert_eq!(ids, want, "one per channel, the higher priority first");
    // Both channels busy: nothing more to claim although a1 is due.
    assert!(s
        .store
        .job_claim_many("w", 10, T0 + 10, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .is_empty());
    let a2job = claimed.iter().find(|j| j.id == a2).unwrap();
    s.store
        .job_complete_if_running(&a2job.lease().unwrap(), None, T0 + 11)
        .await
        .unwrap();
    let next = s
        .store
        .job_claim_many("w", 10, T0 + 12, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![a1]
    );
}

#[tokio::test]
async fn database_refuses_a_second_running_job_on_a_channel() {
    let s = setup().await;
    let a = s.channel("a").await;
    s.store.job_insert(job(a.id, "1"), T0).await.unwrap();
    let second = s.store.job_insert(job(a.id, "2"), T0).await.unwrap().job_id;
    s.store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    // Bypass the claim query: the partial unique index alone must refuse.
    let w = s.other_store().await;
    drop(w);
    let mut conn = s.raw().await;
    let err = sqlx::query(sqlx::AssertSqlSafe(s.sql(
        "UPDATE jobs SET state = 'running', lease_owner = 'x', attempt = 1 WHERE id = ?1",
    )))
    .bind(&second)
    .execute(&mut conn)
    .await
    .unwrap_err();
    let err = err.to_string();
    // SQLite: "UNIQUE constraint failed"; PostgreSQL: "duplicate key value violates unique
    // constraint \"jobs_one_running_per_channel\"".
    assert!(
        err.contains("UNIQUE") || err.contains("jobs_one_running_per_channel"),
        "{err}"
    );
}

#[tokio::test]
async fn rescuer_requeues_expired_leases_without_spending_attempts() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let retry = s
        .store
        .job_insert(job(a.id, "again"), T0)
        .await
        .unwrap()
        .job_id;
    let mut once = job(b.id, "once");
    once.max_attempts = 1;
    let single = s.store.job_insert(once, T0).await.unwrap().job_id;
    s.store
        .job_claim_many("dead", 10, T0, 1_000, &SpendLimits::default())
        .await
        .unwrap();
    turn_started(&s, &retry, 1).await;
    turn_started(&s, &single, 1).await;

    assert!(
        s.store
            .job_rescue_expired(T0 + 999, MAX_RESCUES)
            .await
            .unwrap()
            .is_empty(),
        "lease still valid"
    );
    let r = s
        .store
        .job_rescue_expired(T0 + 1_001, MAX_RESCUES)
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
    assert!(
        r.iter().all(|x| x.state == JobState::Queued),
        "an interrupted run spends no attempt, not even a job's only one: {r:?}"
    );

    let j = s.store.job_get(&retry).await.unwrap().unwrap();
    assert_eq!(
        (
            j.state,
            j.attempt,
            j.interruptions,
            j.lease_owner.as_deref()
        ),
        (JobState::Queued, 1, 1, None)
    );
    assert_eq!(j.counted_attempts(), 0);
    assert!(j.error.as_deref().unwrap().contains("lease expired"));

    let ev = s.store.job_events_list(&retry, 0, 100).await.unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["session", "rescued"]);
    let text = ev[1].text.as_ref().unwrap();
    assert!(text.contains("will be re-run"), "{text}");
    assert!(text.contains("during the agent's turn"), "{text}");
    assert!(text.contains("not counted as a failed attempt"), "{text}");
    // The rescued job runs again as attempt 2, and a failure of that run is its first.
    let again = s
        .store
        .job_claim_many("alive", 10, T0 + 1_002, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    let one = again.iter().find(|j| j.id == single).unwrap();
    assert_eq!((one.attempt, one.counted_attempts()), (2, 1));
    let st = s
        .store
        .job_fail_if_running(
            &one.lease().unwrap(),
            "boom".into(),
            Some(T0 + 5_000),
            T0 + 1_003,
        )
        .await
        .unwrap();
    assert_eq!(
        st,
        Some(JobState::Failed),
        "its one counted attempt is spent"
    );
    let other = again.iter().find(|j| j.id == retry).unwrap();
    let st = s
        .store
        .job_fail_if_running(
            &other.lease().unwrap(),
            "boom".into(),
            Some(T0 + 5_000),
            T0 + 1_003,
        )
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Queued), "1 of 3 counted attempts spent");
}

#[tokio::test]
async fn job_that_kills_gorp_every_time_fails_after_max_rescues() {
    let s = setup().await;
    let a = s.channel("a").await;
    let id = s
        .store
        .job_insert(job(a.id, "poison"), T0)
        .await
        .unwrap()
        .job_id;
    let max = 3;
    let mut t = T0;
    for round in 1..=max + 1 {
        let c = s
            .store
            .job_claim_many(
                &format!("gorp-{round}"),
                1,
                t,
                1_000,
                &SpendLimits::default(),
            )
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "round {round}");
        turn_started(&s, &id, c[0].attempt).await;
        t += 2_000;
        let r = s.store.job_rescue_expired(t, max).await.unwrap();
        let want = if round <= max {
            JobState::Queued
        } else {
            JobState::Failed
        };
        assert_eq!(r[0].state, want, "round {round}");
    }
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.interruptions, j.finished_at),
        (JobState::Failed, 4, 4, Some(t))
    );
    let ev = s.store.job_events_list(&id, 0, 100).await.unwrap();
    let last = ev.last().unwrap().text.clone().unwrap();
    assert!(
        last.contains("interrupted during the agent's turn 4 times"),
        "{last}"
    );
    assert!(last.contains("max_rescues = 3"), "{last}");
}

/// A gorp that dies before the prompt reached the agent (while the agent was starting) costs
/// the job nothing: the attempt is given back and no interruption is counted, however often.
#[tokio::test]
async fn rescue_before_the_turn_gives_the_attempt_back() {
    let s = setup().await;
    let a = s.channel("a").await;
    let id = s
        .store
        .job_insert(job(a.id, "slow start"), T0)
        .await
        .unwrap()
        .job_id;
    let mut t = T0;
    for round in 1..=8 {
        let c = s
            .store
            .job_claim_many("starting", 1, t, 1_000, &SpendLimits::default())
            .await
            .unwrap();
        assert_eq!(c[0].attempt, 1, "round {round}");
        t += 2_000;
        let r = s.store.job_rescue_expired(t, 3).await.unwrap();
        assert_eq!(r[0].state, JobState::Queued, "round {round}");
    }
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.interruptions),
        (JobState::Queued, 0, 0)
    );
    let ev = s.store.job_events_list(&id, 0, 100).await.unwrap();
    let text = ev.last().unwrap().text.clone().unwrap();
    assert!(
        text.contains("before its prompt reached the agent"),
        "{text}"
    );
}

#[tokio::test]
async fn rescued_and_retried_jobs_keep_their_place_in_the_channel() {
    let s = setup().await;
    let a = s.channel("a").await;
    let first = s
        .store
        .job_insert(job(a.id, "first"), T0)
        .await
        .unwrap()
        .job_id;
    let c = s
        .store
        .job_claim_many("dead", 1, T0, 1_000, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(c[0].id, first);
    // Newer jobs of the channel arrive while the first one runs.
    let mut newer = Vec::new();
    for i in 0..3 {
        newer.push(
            s.store
                .job_insert(job(a.id, &format!("newer {i}")), T0 + 10 + i)
                .await
                .unwrap()
                .job_id,
        );
    }
    s.store
        .job_rescue_expired(T0 + 2_000, MAX_RESCUES)
        .await
        .unwrap();
    let next = s
        .store
        .job_claim_many("w", 10, T0 + 2_001, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(next[0].id, first, "the rescued job runs before newer ones");

    // A retry waiting for its backoff holds the channel: the newer jobs wait behind it.
    let retry_at = T0 + 10_000;
    s.store
        .job_fail_if_running(
            &next[0].lease().unwrap(),
            "flaky".into(),
            Some(retry_at),
            T0 + 2_002,
        )
        .await
        .unwrap();
    assert!(s
        .store
        .job_claim_many("w", 10, T0 + 2_003, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.store
            .job_next_due(T0 + 2_003, &SpendLimits::default())
            .await
            .unwrap(),
        QueueOutlook {
            due: false,
            next: Some(retry_at),
            held: Vec::new()
        },
        "the worker sleeps until the retry is due"
    );
    let again = s
        .store
        .job_claim_many("w", 10, retry_at, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(again[0].id, first, "the retried job runs before newer ones");
    let (won, after) = s
        .store
        .job_complete_and_claim(
            &again[0].lease().unwrap(),
            again[0].channel_id,
            None,
            retry_at + 1,
            LEASE,
            &SpendLimits::default(),
        )
        .await
        .unwrap();
    assert!(won);
    assert_eq!(after.unwrap().id, newer[0], "then the rest, in order");
}

#[tokio::test]
async fn heartbeat_extends_leases_and_reports_cancel_requests() {
    let s = setup().await;
    let a = s.channel("a").await;
    let id = s.store.job_insert(job(a.id, "x"), T0).await.unwrap().job_id;
    s.store
        .job_claim_many("w", 1, T0, 1_000, &SpendLimits::default())
        .await
        .unwrap();
    let beats = s.store.job_heartbeat("w", T0 + 900, 1_000).await.unwrap();
    assert_eq!(beats, vec![(id.clone(), 1, false)]);
    assert!(
        s.store
            .job_rescue_expired(T0 + 1_500, MAX_RESCUES)
            .await
            .unwrap()
            .is_empty(),
        "renewed lease holds"
    );
    assert!(s
        .store
        .job_heartbeat("other", T0 + 900, 1_000)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(
        s.store.job_cancel(&id, T0 + 1_000).await.unwrap(),
        CancelOutcome::Requested
    );
    let beats = s.store.job_heartbeat("w", T0 + 1_100, 1_000).await.unwrap();
    assert_eq!(beats, vec![(id.clone(), 1, true)]);
}

#[test]
fn backoff_grows_exponentially_and_is_capped() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let base = Duration::from_secs(5);
    let max = Duration::from_secs(300);
    let mut last = Duration::ZERO;
    for attempt in 1..=6 {
        let d = retry_delay(base, max, attempt, &mut rng);
        let nominal = base * 2u32.pow(attempt as u32 - 1);
        assert!(
            d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2),
            "attempt {attempt}: {d:?}"
        );
        assert!(d > last, "attempt {attempt}: {d:?} after {last:?}");
        last = d;
    }
    for attempt in [7, 20, 1000] {
        assert!(retry_delay(base, max, attempt, &mut rng) <= max.mul_f64(1.2));
    }
}

#[tokio::test]
async fn idempotent_enqueue_returns_the_existing_job() {
    let s = setup().await;
    let a = s.channel("a").await;
    let mut nj = job(a.id, "once");
    nj.idempotency_key = Some("delivery-1".into());
    let first = s.store.job_insert(nj.clone(), T0).await.unwrap();
    let second = s.store.job_insert(nj.clone(), T0 + 1).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.job_id, second.job_id);
    // The key is unique per channel and source: another source may use it.
    let mut other = nj.clone();
    other.source = Source::Webhook;
    assert!(s.store.job_insert(other, T0).await.unwrap().created);
    // Another channel's key never names (or blocks) this channel's job.
    let b = s.channel("b").await;
    let mut theirs = nj.clone();
    theirs.channel_id = b.id;
    let in_b = s.store.job_insert(theirs.clone(), T0 + 2).await.unwrap();
    assert!(in_b.created, "channel b's job is created");
    assert_ne!(in_b.job_id, first.job_id);
    let again_b = s.store.job_insert(theirs, T0 + 3).await.unwrap();
    assert_eq!((again_b.created, &again_b.job_id), (false, &in_b.job_id));
    assert_eq!(
        s.store
            .job_get(&in_b.job_id)
            .await
            .unwrap()
            .unwrap()
            .channel,
        "b"
    );
    // Both in one write group too.
    let mut x = job(a.id, "x");
    x.idempotency_key = Some("group".into());
    let mut y = job(b.id, "y");
    y.idempotency_key = Some("group".into());
    let both = s.store.job_insert_many(vec![x, y], T0 + 4).await.unwrap();
    assert!(both[0].created && both[1].created && both[0].job_id != both[1].job_id);

    // Concurrent duplicates (one write group) still create exactly one job.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = s.store.clone();
        let mut nj = job(a.id, "dup");
        nj.idempotency_key = Some("delivery-2".into());
        tasks.push(tokio::spawn(async move {
            store.job_insert(nj, T0).await.unwrap()
        }));
    }
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    assert!(results.iter().all(|r| r.job_id == results[0].job_id));
    assert_eq!(s.count("jobs").await, 6);
}

#[tokio::test]
async fn concurrent_enqueues_are_all_committed() {
    let s = setup().await;
    let a = s.channel("a").await;
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let store = s.store.clone();
            tokio::spawn(async move {
                store
                    .job_insert(job(a.id, &format!("p{i}")), T0)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let ids: std::collections::HashSet<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().job_id)
        .collect();
    assert_eq!(ids.len(), 500);
    assert_eq!(s.count("jobs").await, 500);
    let many = s
        .store
        .job_insert_many((0..100).map(|i| job(a.id, &format!("m{i}"))).collect(), T0)
        .await
        .unwrap();
    assert_eq!(many.len(), 100);
    assert_eq!(s.count("jobs").await, 600);
}

/// Writes sent together share one transaction, yet each fails alone: a refusal of its own
/// (channel exists, channel busy) and a database error (a job for a channel that does not
/// exist breaks the group's multi-row insert, which is then retried one operation at a time)
/// fail only their own callers; every other write of the group commits.
#[tokio::test]
async fn one_failing_write_fails_only_itself_not_its_group() {
    let s = setup().await;
    let a = s.channel("a").await;
    let busy = s.channel("busy").await;
    s.store.job_insert(job(busy.id, "run"), T0).await.unwrap();
    let claimed = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);

    let st = &s.store;
    let good =
        futures::future::join_all((0..20).map(|i| st.job_insert(job(a.id, &format!("g{i}")), T0)));
    let (good, orphan, dup, busy_delete, new_channel) = futures::join!(
        good,
        st.job_insert(job(999_999, "no such channel"), T0),
        st.channel_insert(
            gorp::store::NewChannel {
                name: "a".into(),
                ..Default::default()
            },
            T0
        ),
        st.channel_delete("busy"),
        st.channel_insert(
            gorp::store::NewChannel {
                name: "fresh".into(),
                ..Default::default()
            },
            T0
        ),
    );
    assert!(
        good.iter().all(|r| r.as_ref().is_ok_and(|e| e.created)),
        "{good:?}"
    );
    assert!(matches!(orphan, Err(StoreError::Db(_))), "{orphan:?}");
    assert!(matches!(dup, Err(StoreError::ChannelExists(_))), "{dup:?}");
    assert!(
        matches!(busy_delete, Err(StoreError::ChannelBusy(_))),
        "{busy_delete:?}"
    );
    assert_eq!(new_channel.unwrap().name, "fresh");
    assert_eq!(
        s.count("jobs").await,
        21,
        "the 20 good jobs and the running one"
    );
    assert_eq!(s.count("channels").await, 3);
}

#[tokio::test]
async fn cancel_queued_is_immediate_and_running_sets_the_flag() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let queued = s.store.job_insert(job(a.id, "q"), T0).await.unwrap().job_id;
    let mut later = job(b.id, "r");
    later.priority = 1;
    let running = s.store.job_insert(later, T0).await.unwrap().job_id;
    let mut claimed = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap();
    assert_eq!(claimed[0].id, running);

    assert_eq!(
        s.store.job_cancel(&queued, T0 + 1).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let q = s.store.job_get(&queued).await.unwrap().unwrap();
    assert_eq!(
        (q.state, q.finished_at),
        (JobState::Cancelled, Some(T0 + 1))
    );
    assert!(
        s.store
            .job_claim_many("w", 5, T0 + 2, LEASE, &SpendLimits::default())
            .await
            .unwrap()
            .is_empty(),
        "cancelled job never runs"
    );

    assert_eq!(
        s.store.job_cancel(&running, T0 + 2).await.unwrap(),
        CancelOutcome::Requested
    );
    let r = s.store.job_get(&running).await.unwrap().unwrap();
    assert_eq!((r.state, r.cancel_requested), (JobState::Running, true));
    assert!(s
        .store
        .job_cancel_if_running(
            &claimed.remove(0).lease().unwrap(),
            "cancelled by user".into(),
            T0 + 3
        )
        .await
        .unwrap());
    assert_eq!(
        s.store.job_get(&running).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        s.store.job_cancel(&running, T0 + 4).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    assert!(matches!(
        s.store.job_cancel("nope", T0).await,
        Err(StoreError::JobNotFound(_))
    ));
    let kinds: Vec<_> = s
        .store
        .job_events_list(&running, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["cancel_requested"]);
}

#[tokio::test]
async fn release_returns_the_job_without_counting_the_attempt() {
    let s = setup().await;
    let a = s.channel("a").await;
    let id = s.store.job_insert(job(a.id, "x"), T0).await.unwrap().job_id;
    let c = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    assert!(s
        .store
        .job_release_if_running(&c.lease().unwrap(), T0 + 1)
        .await
        .unwrap());
    let j = s.store.job_get(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.lease_owner),
        (JobState::Queued, 0, None)
    );
}

#[tokio::test]
async fn retention_deletes_old_finished_jobs_and_their_events_only() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    let old = s
        .store
        .job_insert(job(a.id, "old"), T0)
        .await
        .unwrap()
        .job_id;
    let c = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    s.store
        .job_events_append(vec![NewEvent {
            job_id: old.clone(),
            attempt: 1,
            kind: "message".into(),
            text: Some("hi".into()),
            data: None,
            at: T0,
        }])
        .await
        .unwrap();
    s.store
        .job_complete_if_running(&c.lease().unwrap(), None, T0 + 1)
        .await
        .unwrap();
    let recent = s
        .store
        .job_insert(job(b.id, "recent"), T0)
        .await
        .unwrap()
        .job_id;
    let c = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    s.store
        .job_complete_if_running(&c.lease().unwrap(), None, T0 + 100_000)
        .await
        .unwrap();
    let waiting = s
        .store
        .job_insert(job(a.id, "queued long ago"), T0 - 1_000_000)
        .await
        .unwrap()
        .job_id;

    let day = 86_400_000;
    let cleaner = gorp::cleaner::Cleaner::new(
        s.store.clone(),
        Duration::from_millis(50_000),
        Duration::from_secs(1),
    );
    assert_eq!(cleaner.run_once(T0 + 50_001 + 1).await.unwrap(), 1);
    assert!(s.store.job_get(&old).await.unwrap().is_none());
    assert!(s.store.job_get(&recent).await.unwrap().is_some());
    assert!(
        s.store.job_get(&waiting).await.unwrap().is_some(),
        "unfinished jobs are kept"
    );
    assert_eq!(s.count("job_events").await, 0, "events go with their job");
    // Zero retention keeps everything.
    let keep = gorp::cleaner::Cleaner::new(s.store.clone(), Duration::ZERO, Duration::from_secs(1));
    assert_eq!(keep.run_once(T0 + 1000 * day).await.unwrap(), 0);
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    let s = setup().await;
    let a = s.channel("a").await;
    for bad in [
        job(a.id, "   "),
        NewJob {
            max_attempts: 0,
            ..job(a.id, "x")
        },
        NewJob {
            idempotency_key: Some(String::new()),
            ..job(a.id, "x")
        },
        NewJob {
            prompt: "x".repeat(gorp::store::MAX_PROMPT_BYTES + 1),
            ..job(a.id, "")
        },
    ] {
        assert!(matches!(
            s.store.job_insert(bad, T0).await,
            Err(StoreError::Invalid(_))
        ));
    }
    // A channel that does not exist: refused by the database, nothing written.
    assert!(s.store.job_insert(job(a.id + 99, "x"), T0).await.is_err());
    assert_eq!(s.count("jobs").await, 0);
    for name in ["", "../x", "a/b", "UPPER", "-x", &"x".repeat(65)] {
        let r = s
            .store
            .channel_insert(
                gorp::store::NewChannel {
                    name: name.into(),
                    ..Default::default()
                },
                T0,
            )
            .await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{name:?}");
    }
    assert!(matches!(
        s.store
            .channel_insert(
                gorp::store::NewChannel {
                    name: "a".into(),
                    ..Default::default()
                },
                T0
            )
            .await,
        Err(StoreError::ChannelExists(_))
    ));
    assert_eq!(s.count("channels").await, 1);
}

#[tokio::test]
async fn job_list_filters_and_pages_newest_first() {
    let s = setup().await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    for i in 0..5 {
        s.store
            .job_insert(job(a.id, &format!("a{i}")), T0 + i)
            .await
            .unwrap();
        s.store
            .job_insert(job(b.id, &format!("b{i}")), T0 + i)
            .await
            .unwrap();
    }
    let page1 = s
        .store
        .job_list(&JobFilter {
            channel: Some("a".into()),
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page1.iter().map(|j| j.prompt.as_str()).collect::<Vec<_>>(),
        ["a4", "a3", "a2"]
    );
    let page2 = s
        .store
        .job_list(&JobFilter {
            channel: Some("a".into()),
            limit: 3,
            before: Some(page1[2].id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page2.iter().map(|j| j.prompt.as_str()).collect::<Vec<_>>(),
        ["a1", "a0"]
    );
    let none = s
        .store
        .job_list(&JobFilter {
            state: Some(JobState::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    // Prompt text: case-insensitive for ASCII, `%` and `_` are plain characters.
    s.store
        .job_insert(job(b.id, "Fix 100%_of the TESTS"), T0 + 9)
        .await
        .unwrap();
    for (text, want) in [
        ("tests", vec!["Fix 100%_of the TESTS"]),
        ("%_", vec!["Fix 100%_of the TESTS"]),
        ("B3", vec!["b3"]),
        ("%", vec!["Fix 100%_of the TESTS"]),
        ("nothing like it", vec![]),
    ] {
        let found = s
            .store
            .job_list(&JobFilter {
                text: Some(text.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            found.iter().map(|j| j.prompt.as_str()).collect::<Vec<_>>(),
            want,
            "{text}"
        );
    }
}

#[tokio::test]
async fn job_history_view_shows_readable_times_and_output() {
    let s = setup().await;
    let a = s.channel("a").await;
    let id = s
        .store
        .job_insert(job(a.id, "say hi"), T0)
        .await
        .unwrap()
        .job_id;
    let c = s
        .store
        .job_claim_many("w", 1, T0, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    let ev = |text: &str, kind: &str| NewEvent {
        job_id: id.clone(),
        attempt: 1,
        kind: kind.into(),
        text: Some(text.into()),
        data: None,
        at: T0,
    };
    s.store
        .job_events_append(vec![
            ev("Hel", "message"),
            ev("thinking", "thought"),
            ev("lo", "message"),
        ])
        .await
        .unwrap();
    s.store
        .job_complete_if_running(&c.lease().unwrap(), Some("end_turn".into()), T0 + 1_500)
        .await
        .unwrap();
    let mut conn = s.raw().await;
    let row: (String, String, String, f64, String) = sqlx::query_as(sqlx::AssertSqlSafe(s.sql(
        "SELECT channel, state, started, duration_secs, output FROM job_history WHERE id = ?1",
    )))
    .bind(&id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(row.0, "a");
    assert_eq!(row.1, "succeeded");
    assert_eq!(row.2, "2023-11-14 22:13:20.000");
    assert_eq!(row.3, 1.5);
    assert_eq!(row.4, "Hello");
    assert_eq!(s.store.job_output(&id).await.unwrap(), "Hello");
}

#[tokio::test]
async fn completing_claims_the_next_job_in_the_same_transaction() {
    let s = setup().await;
    let a = s.channel("a").await;
    let first = s.store.job_insert(job(a.id, "1"), T0).await.unwrap().job_id;
    let second = s
        .store
        .job_insert(job(a.id, "2"), T0 + 1)
        .await
        .unwrap()
        .job_id;
    let c = s
        .store
        .job_claim_many("w", 1, T0 + 2, LEASE, &SpendLimits::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(c.id, first);
    // A stale fence completes nothing and claims nothing.
    let mut stale = c.lease().unwrap();
    stale.attempt += 1;
    assert_eq!(
        s.store
            .job_complete_and_claim(
                &stale,
                c.channel_id,
                None,
                T0 + 3,
                LEASE,
                &SpendLimits::default()
            )
            .await
            .unwrap(),
        (false, None)
    );
    let (won, next) = s
        .store
        .job_complete_and_claim(
            &c.lease().unwrap(),
            c.channel_id,
            None,
            T0 + 3,
            LEASE,
            &SpendLimits::default(),
        )
        .await
        .unwrap();
    assert!(won);
    let next = next.expect("the channel's next job");
    assert_eq!(
        (next.id.as_str(), next.state, next.lease_owner.as_deref()),
        (second.as_str(), JobState::Running, Some("w"))
    );
    assert_eq!(
        s.store.job_get(&first).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
    // Other channels are the dispatcher's business: only this channel's queue is chained.
    let b = s.channel("b").await;
    s.store
        .job_insert(job(b.id, "elsewhere"), T0)
        .await
        .unwrap();
    let (won, none) = s
        .store
        .job_complete_and_claim(
            &next.lease().unwrap(),
            next.channel_id,
            None,
            T0 + 4,
            LEASE,
            &SpendLimits::default(),
        )
        .await
        .unwrap();
    assert!(won && none.is_none(), "nothing left on this channel");
}

/// Creating a channel makes its workspace, then its row. A taken name leaves the existing
/// channel's workspace as it is; an invalid name makes no directory at all.
#[tokio::test]
async fn channel_creation_makes_the_workspace_and_refusals_leave_directories_alone() {
    use gorp::service::channels::{create, NewChannelSpec};
    let s = setup().await;
    let root = tempfile::tempdir().unwrap();
    let mut config = gorp::config::Config::default();
    config.workspace.path = root.path().to_path_buf();
    let spec = |name: &str| NewChannelSpec {
        name: name.into(),
        ..Default::default()
    };
    let made = create(&s.store, &config, spec("alpha")).await.unwrap();
    assert_eq!(made.workspace, root.path().join("alpha"));
    assert!(made.workspace.is_dir());
    assert_eq!(made.channel.permission_policy, config.acp.permission_policy);
    std::fs::write(made.workspace.join("notes.md"), "kept").unwrap();

    let again = create(&s.store, &config, spec("alpha")).await.unwrap_err();
    assert!(matches!(
        again,
        gorp::service::channels::ChannelError::Store(StoreError::ChannelExists(_))
    ));
    assert_eq!(
        std::fs::read_to_string(made.workspace.join("notes.md")).unwrap(),
        "kept"
    );

    let bad = create(&s.store, &config, spec("../escape"))
        .await
        .unwrap_err();
    assert!(matches!(
        bad,
        gorp::service::channels::ChannelError::Store(StoreError::Invalid(_))
    ));
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        1,
        "only alpha"
    );
    assert_eq!(s.count("channels").await, 1);
}
