//! The scheduler: exactly one job per slot under racing schedulers, catch-up policies across a
//! restart, DST days, one-offs, overlap, failed runs, pre-warm, and invalid input. Time is
//! passed in (`run_once(now)`), never slept.

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use gorp::config::Config;
use gorp::scheduler::{self, Scheduler};
use gorp::service::schedules::{self, AddSchedule, ScheduleError, When};
use gorp::store::{now_ms, JobState, Millis, Store};

use crate::acp::Gorp;
use crate::support::{raw_conn, setup, sql_for, Setup};

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Millis {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .unwrap()
        .timestamp_millis()
}

const HOUR: Millis = 3_600_000;

fn add_req(channel: &str, when: &str, tz: &str, catch_up: &str) -> AddSchedule {
    AddSchedule {
        channel: channel.into(),
        when: when.into(),
        prompt: format!("scheduled: {when}"),
        timezone: Some(tz.into()),
        catch_up: Some(catch_up.parse().unwrap()),
        overlap: Some(gorp::store::Overlap::Queue),
        created_by: "test".into(),
    }
}

async fn add(s: &Setup, req: AddSchedule, now: Millis) -> gorp::store::Schedule {
    schedules::add(&s.store, &Config::default(), req, now)
        .await
        .unwrap()
}

async fn slots_of(s: &Setup, schedule_id: i64) -> Vec<Millis> {
    let mut conn = s.raw().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(s.sql(
        "SELECT scheduled_for FROM jobs WHERE schedule_id = ?1 ORDER BY scheduled_for",
    )))
    .bind(schedule_id)
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// Moves a schedule's next slot to now, as if it had come; returns it.
async fn slot_now(g: &Gorp, schedule_id: i64) -> Millis {
    let slot = now_ms();
    let mut conn = raw_conn(&g.config.database).await;
    sqlx::query(sqlx::AssertSqlSafe(sql_for(
        &g.config.database,
        "UPDATE schedules SET next_run_at = ?1 WHERE id = ?2",
    )))
    .bind(slot)
    .bind(schedule_id)
    .execute(&mut conn)
    .await
    .unwrap();
    slot
}

fn sched(store: &Store) -> Scheduler {
    Scheduler::new(store.clone(), Arc::new(Config::default()))
}

#[tokio::test]
async fn racing_schedulers_fire_each_slot_exactly_once() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 0);
    let sc = add(&s, add_req("alpha", "* * * * *", "UTC", "once"), t0).await;
    let other = s.other_store().await;
    let (a, b) = (sched(&s.store), sched(&other));
    // 30 minutes of ticks, each tick run by both schedulers at once.
    for minute in 1..=30 {
        let now = t0 + minute * 60_000 + 500;
        let (ra, rb) = tokio::join!(a.run_once(now), b.run_once(now));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.jobs + rb.jobs, 1, "minute {minute}: {ra:?} {rb:?}");
    }
    let slots = slots_of(&s, sc.id).await;
    let want: Vec<Millis> = (1..=30).map(|m| t0 + m * 60_000).collect();
    assert_eq!(slots, want);
    let job = s
        .store
        .job_list(&Default::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.source, gorp::store::Source::Schedule);
    assert_eq!(job.schedule_id, Some(sc.id));
}

#[tokio::test]
async fn missed_slots_follow_each_catch_up_policy() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 30);
    let skip = add(&s, add_req("alpha", "0 * * * *", "UTC", "skip"), t0).await;
    let once = add(&s, add_req("alpha", "0 * * * *", "UTC", "once"), t0).await;
    let all = add(&s, add_req("alpha", "0 * * * *", "UTC", "all"), t0).await;
    assert_eq!(skip.next_run_at, Some(utc(2026, 1, 5, 9, 0)));
    // gorp was down from 08:30 to 12:05: slots 09:00, 10:00, 11:00 and 12:00 were missed.
    let now = utc(2026, 1, 5, 12, 5);
    let report = sched(&s.store).run_once(now).await.unwrap();
    assert_eq!(report.fired, 3);
    assert!(slots_of(&s, skip.id).await.is_empty());
    assert_eq!(slots_of(&s, once.id).await, vec![utc(2026, 1, 5, 12, 0)]);
    let hours: Vec<Millis> = (9..=12).map(|h| utc(2026, 1, 5, h, 0)).collect();
    assert_eq!(slots_of(&s, all.id).await, hours);
    for id in [skip.id, once.id, all.id] {
        let row = s.store.schedule_get(id).await.unwrap().unwrap();
        assert_eq!(row.next_run_at, Some(utc(2026, 1, 5, 13, 0)));
    }
    let skipped = s.store.schedule_get(skip.id).await.unwrap().unwrap();
    assert_eq!(skipped.skipped, 1);
    assert!(skipped
        .last_skip
        .unwrap()
        .contains("4 missed slot(s) skipped"));
    // On time again: each policy fires the 13:00 slot normally.
    sched(&s.store)
        .run_once(utc(2026, 1, 5, 13, 0) + 200)
        .await
        .unwrap();
    assert_eq!(slots_of(&s, skip.id).await, vec![utc(2026, 1, 5, 13, 0)]);
}

#[tokio::test]
async fn catch_up_all_is_bounded() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 0, 0);
    let all = add(&s, add_req("alpha", "*/5 * * * *", "UTC", "all"), t0).await;
    sched(&s.store).run_once(t0 + 10 * HOUR).await.unwrap();
    let slots = slots_of(&s, all.id).await;
    // The ten latest missed slots, and the slot due now (on time, so not a catch-up).
    assert_eq!(slots.len(), scheduler::MAX_CATCH_UP + 1);
    assert_eq!(slots[0], t0 + 10 * HOUR - 10 * 5 * 60_000);
    assert_eq!(*slots.last().unwrap(), t0 + 10 * HOUR);
}

/// Europe/Berlin: 2026-03-29 02:00 → 03:00 (spring forward), 2026-10-25 03:00 → 02:00 (fall
/// back). croner's rule: a fixed-time job whose time falls in the gap runs at the first valid
/// time after it (03:00 CEST = 01:00 UTC); in the repeated hour it runs once, at the first
/// 02:30 (CEST, 00:30 UTC).
#[tokio::test]
async fn daily_0230_job_on_dst_days_runs_as_croner_defines() {
    let s = setup().await;
    s.channel("alpha").await;
    let sc = add(
        &s,
        add_req("alpha", "30 2 * * *", "Europe/Berlin", "all"),
        utc(2026, 3, 27, 12, 0),
    )
    .await;
    assert_eq!(
        sc.next_run_at,
        Some(utc(2026, 3, 28, 1, 30)),
        "02:30 CET = 01:30 UTC"
    );
    let cron = schedules::parse_cron("30 2 * * *").unwrap();
    let tz = schedules::parse_tz("Europe/Berlin").unwrap();
    let spring = schedules::next_after(&cron, tz, utc(2026, 3, 28, 12, 0)).unwrap();
    assert_eq!(
        spring,
        utc(2026, 3, 29, 1, 0),
        "no 02:30 on spring-forward day: runs at 03:00 CEST"
    );
    let after = schedules::next_after(&cron, tz, spring).unwrap();
    assert_eq!(after, utc(2026, 3, 30, 0, 30), "then 02:30 CEST");
    let fall = schedules::next_after(&cron, tz, utc(2026, 10, 24, 12, 0)).unwrap();
    assert_eq!(fall, utc(2026, 10, 25, 0, 30), "first 02:30 (CEST)");
    let next = schedules::next_after(&cron, tz, fall).unwrap();
    assert_eq!(
        next,
        utc(2026, 10, 26, 1, 30),
        "not again at the second 02:30; next day 02:30 CET"
    );

    // Fired through the scheduler across the spring-forward night: one job, at 01:00 UTC.
    let first = sc.next_run_at.unwrap();
    sched(&s.store).run_once(first + 100).await.unwrap();
    sched(&s.store).run_once(spring + 100).await.unwrap();
    assert_eq!(slots_of(&s, sc.id).await, vec![first, spring]);
}

#[tokio::test]
async fn one_off_fires_once_and_is_marked_done() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 0);
    let once = add(&s, add_req("alpha", "in 30m", "UTC", "once"), t0).await;
    assert_eq!(
        (once.cron.as_deref(), once.next_run_at),
        (None, Some(t0 + 30 * 60_000))
    );
    let at = add(
        &s,
        add_req("alpha", "2026-01-05T10:00:00+01:00", "UTC", "once"),
        t0,
    )
    .await;
    assert_eq!(at.next_run_at, Some(utc(2026, 1, 5, 9, 0)));
    assert_eq!(
        sched(&s.store)
            .run_once(t0 + 29 * 60_000)
            .await
            .unwrap()
            .fired,
        0
    );
    sched(&s.store)
        .run_once(t0 + 30 * 60_000 + 10)
        .await
        .unwrap();
    sched(&s.store).run_once(t0 + 2 * HOUR).await.unwrap();
    sched(&s.store).run_once(t0 + 3 * HOUR).await.unwrap();
    assert_eq!(slots_of(&s, once.id).await, vec![t0 + 30 * 60_000]);
    assert_eq!(slots_of(&s, at.id).await, vec![utc(2026, 1, 5, 9, 0)]);
    let row = s.store.schedule_get(once.id).await.unwrap().unwrap();
    assert!(row.done);
    assert_eq!(row.next_run_at, None);
    assert_eq!(
        s.store.schedule_list().await.unwrap().len(),
        2,
        "done, not deleted"
    );
}

/// Slots under a minute late are on time, whatever the catch-up policy: after a 21 s outage a
/// seconds-schedule fires each of them. Older slots follow the policy, and the record names it.
#[tokio::test]
async fn slots_under_a_minute_late_fire_under_every_catch_up_policy() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 0);
    let every5 = "*/5 * * * * *";
    let skip = add(&s, add_req("alpha", every5, "UTC", "skip"), t0).await;
    let once = add(&s, add_req("alpha", every5, "UTC", "once"), t0).await;
    let sec = |n: i64| t0 + n * 1_000;
    // Down for 21 s after the first slot was due: slots 5..25 s are all on time.
    sched(&s.store).run_once(sec(26)).await.unwrap();
    let on_time: Vec<Millis> = (1..=5).map(|k| sec(5 * k)).collect();
    assert_eq!(slots_of(&s, skip.id).await, on_time);
    assert_eq!(slots_of(&s, once.id).await, on_time);
    for id in [skip.id, once.id] {
        let row = s.store.schedule_get(id).await.unwrap().unwrap();
        assert_eq!((row.skipped, row.last_skip), (0, None));
        assert_eq!(row.next_run_at, Some(sec(30)));
    }

    // Down 95 s: slots 30 s..85 s are over a minute late at 150 s (missed), 90..150 s are not.
    sched(&s.store).run_once(sec(150)).await.unwrap();
    let late: Vec<Millis> = (18..=30).map(|k| sec(5 * k)).collect();
    let mut want_once = on_time.clone();
    want_once.push(sec(85));
    want_once.extend(&late);
    assert_eq!(slots_of(&s, once.id).await, want_once);
    let mut want_skip = on_time.clone();
    want_skip.extend(&late);
    assert_eq!(slots_of(&s, skip.id).await, want_skip);
    let row = s.store.schedule_get(once.id).await.unwrap().unwrap();
    let note = row.last_skip.unwrap();
    assert!(
        note.contains("11 missed slot(s) skipped (catch_up = once)"),
        "{note}"
    );
    let row = s.store.schedule_get(skip.id).await.unwrap().unwrap();
    let note = row.last_skip.unwrap();
    assert!(
        note.contains("12 missed slot(s) skipped (catch_up = skip)"),
        "{note}"
    );
}

/// With `overlap = skip`, slots due together (after a restart) run once: the first one queues
/// and the others are recorded as overlapping it.
#[tokio::test]
async fn overlap_skip_runs_one_of_several_slots_due_together() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 0);
    let mut req = add_req("alpha", "*/5 * * * * *", "UTC", "once");
    req.overlap = Some(gorp::store::Overlap::Skip);
    let sc = add(&s, req, t0).await;
    sched(&s.store).run_once(t0 + 26_000).await.unwrap();
    assert_eq!(slots_of(&s, sc.id).await, vec![t0 + 5_000]);
    let row = s.store.schedule_get(sc.id).await.unwrap().unwrap();
    let note = row.last_skip.unwrap();
    assert!(note.contains("4 slot(s) skipped"), "{note}");
    assert!(note.contains("overlap = skip"), "{note}");
    assert_eq!(row.next_run_at, Some(t0 + 30_000));
}

#[tokio::test]
async fn overlap_skip_records_the_skip_and_queue_queues() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 0);
    let mut req = add_req("alpha", "* * * * *", "UTC", "once");
    req.overlap = Some(gorp::store::Overlap::Skip);
    let skip = add(&s, req, t0).await;
    let queue = add(&s, add_req("alpha", "* * * * *", "UTC", "once"), t0).await;
    let sc = sched(&s.store);
    sc.run_once(t0 + 60_000 + 10).await.unwrap();
    // Nothing runs the jobs, so the next slot finds the previous run still queued.
    let report = sc.run_once(t0 + 120_000 + 10).await.unwrap();
    assert_eq!(report.skipped, 1);
    assert_eq!(slots_of(&s, skip.id).await, vec![t0 + 60_000]);
    assert_eq!(
        slots_of(&s, queue.id).await,
        vec![t0 + 60_000, t0 + 120_000]
    );
    let row = s.store.schedule_get(skip.id).await.unwrap().unwrap();
    assert_eq!(row.skipped, 1);
    assert!(row.last_skip.unwrap().contains("still queued or running"));
    assert_eq!(row.next_run_at, Some(t0 + 180_000), "the schedule moves on");
}

#[tokio::test]
async fn invalid_schedules_are_refused_and_write_nothing() {
    let s = setup().await;
    s.channel("alpha").await;
    let now = utc(2026, 1, 5, 8, 0);
    for (req, needle) in [
        (
            add_req("alpha", "61 * * * *", "UTC", "once"),
            "invalid cron expression",
        ),
        (
            add_req("alpha", "every day", "UTC", "once"),
            "invalid cron expression",
        ),
        (
            add_req("alpha", "0 9 * * *", "Mars/Olympus", "once"),
            "unknown time zone",
        ),
        (
            add_req("alpha", "in 30 fortnights", "UTC", "once"),
            "invalid delay unit",
        ),
        (add_req("alpha", "in -5m", "UTC", "once"), "invalid delay"),
        (
            add_req("alpha", "2020-01-01T00:00:00Z", "UTC", "once"),
            "in the past",
        ),
        (
            add_req("nope", "0 9 * * *", "UTC", "once"),
            "unknown channel",
        ),
    ] {
        let err = schedules::add(&s.store, &Config::default(), req, now)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{err} should say {needle}"
        );
        if needle != "unknown channel" {
            assert!(matches!(err, ScheduleError::Invalid(_)));
        }
    }
    assert_eq!(s.count("schedules").await, 0);
    // A policy is a type: an unknown one is refused where the text is read (HTTP, CLI).
    assert_eq!(
        "sometimes".parse::<gorp::store::CatchUp>().unwrap_err(),
        "unknown catch-up policy \"sometimes\"; expected skip, once or all"
    );
    assert!(matches!(
        schedules::parse_when("@daily", now).unwrap(),
        When::Cron { .. }
    ));
    assert!(
        matches!(
            schedules::parse_when("0 */5 * * * *", now).unwrap(),
            When::Cron { .. }
        ),
        "6 fields"
    );
}

#[tokio::test]
async fn pause_and_resume_skip_the_paused_slots() {
    let s = setup().await;
    s.channel("alpha").await;
    let t0 = utc(2026, 1, 5, 8, 30);
    let sc = add(&s, add_req("alpha", "0 * * * *", "UTC", "all"), t0).await;
    assert!(s
        .store
        .schedule_set_enabled(sc.id, false, None)
        .await
        .unwrap());
    assert_eq!(
        sched(&s.store)
            .run_once(utc(2026, 1, 5, 11, 0))
            .await
            .unwrap()
            .fired,
        0
    );
    assert!(schedules::resume(&s.store, sc.id, utc(2026, 1, 5, 11, 10))
        .await
        .unwrap());
    let row = s.store.schedule_get(sc.id).await.unwrap().unwrap();
    assert_eq!(row.next_run_at, Some(utc(2026, 1, 5, 12, 0)));
    assert!(s.store.schedule_delete(sc.id).await.unwrap());
    assert!(!s.store.schedule_delete(sc.id).await.unwrap());
    // A schedule removed meanwhile (the API fuzzer removed one between the HTTP handler's look-up
    // and the resume, which answered 400) is "no such schedule", as for pause.
    assert!(!schedules::resume(&s.store, sc.id, utc(2026, 1, 5, 11, 20))
        .await
        .unwrap());
    assert!(!schedules::pause(&s.store, sc.id).await.unwrap());
}

#[tokio::test]
async fn failed_run_does_not_disable_the_schedule() {
    let g = Gorp::start(|_| {}).await;
    let ch = g.channel("alpha", |_| {}).await;
    let _ = ch;
    let now = now_ms();
    let sc = schedules::add(
        &g.store,
        &g.config,
        AddSchedule {
            prompt: "@fail upstream is down".into(),
            ..add_req("alpha", "* * * * *", "UTC", "once")
        },
        now,
    )
    .await
    .unwrap();
    let s = Scheduler::new(g.store.clone(), g.config.clone());
    // The slot arrives now (the pool runs on the real clock).
    let first = slot_now(&g, sc.id).await;
    s.run_once(first + 10).await.unwrap();
    let job = g
        .store
        .job_list(&Default::default())
        .await
        .unwrap()
        .remove(0);
    let job = g.wait_done(&job.id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap().contains("upstream is down"));
    let row = g.store.schedule_get(sc.id).await.unwrap().unwrap();
    assert!(row.enabled && !row.done);
    let report = s.run_once(row.next_run_at.unwrap() + 10).await.unwrap();
    assert_eq!(report.jobs, 1, "the next slot fires");
    g.stop().await;
}

#[tokio::test]
async fn pre_warm_starts_the_agent_before_the_slot_so_the_job_runs_warm() {
    // The agent takes 1.5 s to start; a pre-warmed slot must not pay it.
    let g = Gorp::start(|c| {
        c.acp
            .agent_args
            .extend(["--startup-delay-ms".to_string(), "1500".to_string()]);
        c.acp.pre_warm_secs = 300;
    })
    .await;
    g.channel("alpha", |_| {}).await;
    let ch = g.store.channel_get("alpha").await.unwrap().unwrap();
    let now = now_ms();
    let sc = schedules::add(
        &g.store,
        &g.config,
        add_req("alpha", "in 2m", "UTC", "once"),
        now,
    )
    .await
    .unwrap();
    let s = Scheduler::new(g.store.clone(), g.config.clone());
    let report = s.run_once(now).await.unwrap();
    assert_eq!((report.fired, report.prewarmed), (0, 1));
    assert!(g
        .store
        .warm_get(ch.id)
        .await
        .unwrap()
        .unwrap()
        .warm_at
        .is_some());
    // The keeper warms the channel ahead of the slot.
    g.warm.run_once(now).await.unwrap();
    g.warm.settle().await;
    assert!(g.warm.live_pid(ch.id).is_some());
    assert_eq!(
        s.run_once(now + 1000).await.unwrap().prewarmed,
        0,
        "already warm: asked once"
    );
    // The slot arrives (moved to now, so the pool, which runs on the real clock, takes it).
    let slot = slot_now(&g, sc.id).await;
    assert_eq!(s.run_once(slot + 10).await.unwrap().jobs, 1);
    let job = g
        .store
        .job_list(&Default::default())
        .await
        .unwrap()
        .remove(0);
    let job = g.wait_done(&job.id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(g.history_session(&job.id).await.as_deref(), Some("warm"));
    let mut conn = raw_conn(&g.config.database).await;
    let first_output: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql_for(
        &g.config.database,
        "SELECT first_output_ms FROM jobs WHERE id = ?1",
    )))
    .bind(&job.id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(first_output < 1500.0, "no cold start: {first_output} ms");
    g.stop().await;
}
