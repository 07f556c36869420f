//! The scheduler: cron rows (croner, in IANA time zones) that fire exactly once per slot.
//!
//! Every [`TICK`] the scheduler reads the schedules whose `next_run_at` has come and fires
//! each in one transaction that advances `next_run_at` and inserts the slot's job, guarded by
//! the old `next_run_at`: two gorp processes on one database never fire a slot twice (and
//! `jobs(schedule_id, scheduled_for)` is unique besides).
//!
//! Every slot noticed at most [`ON_TIME`] late fires, whatever the policy (after a short
//! restart a seconds-schedule has several). Slots missed while gorp was down (noticed more
//! than [`ON_TIME`] late) follow the schedule's `catch_up`: `skip` (none, recorded), `once`
//! (one job for the latest missed slot, the default) or `all` (one per missed slot, at most
//! [`MAX_CATCH_UP`]). When the previous run is
//! still queued or running, `overlap = skip` (default) records the skip instead of queueing
//! another. A failed run never disables a schedule. Schedules whose next slot is within
//! `[acp] pre_warm_secs` get their channel's agent warmed ahead (`warm_at` in the lease table).
//!
//! Time zones: croner decides DST behaviour. A fixed-time job (e.g. `30 2 * * *`) whose time
//! does not exist on the spring-forward day runs at the first valid time after the gap (03:00);
//! on the fall-back day it runs once, at the first 02:30. Interval jobs skip the gap and run in
//! both passes of the repeated hour.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{now_ms, Firing, Millis, NewSchedule, Schedule, Store, StoreError};

/// How often the scheduler looks for due slots.
pub const TICK: Duration = Duration::from_secs(1);
/// A slot noticed up to this late counts as on time (not missed).
pub const ON_TIME: Millis = 60_000;
/// Most jobs one `catch_up = all` firing inserts.
pub const MAX_CATCH_UP: usize = 10;
/// Most slots walked when catching up (a minutely schedule down for a week).
const MAX_WALK: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// When a schedule fires.
#[derive(Debug, Clone)]
pub enum When {
    Cron { cron: Box<Cron>, expr: String },
    Once(Millis),
}

/// Parses a croner expression: 5 fields (minute granularity), 6 (with seconds), or an alias
/// such as `@daily`.
pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let expr = expr.trim();
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| {
            ScheduleError::Invalid(format!(
                "invalid cron expression {expr:?}: {e}; expected 5 or 6 fields (e.g. \"0 9 * * 1-5\") or an alias such as @daily"
            ))
        })
}

/// Parses an IANA time zone name.
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(name.trim()).map_err(|_| {
        ScheduleError::Invalid(format!(
            "unknown time zone {name:?}; expected an IANA name such as Europe/Berlin or UTC"
        ))
    })
}

/// Parses when a schedule fires: `in 30m` / `in 2h` / `in 1d` / `in 45s`, an RFC 3339 time
/// (one-offs), or a cron expression.
pub fn parse_when(spec: &str, now: Millis) -> Result<When, ScheduleError> {
    let spec = spec.trim();
    if let Some(rest) = spec.strip_prefix("in ") {
        let rest = rest.trim();
        let (num, unit) = rest.split_at(
            rest.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len()),
        );
        let n: i64 = num.parse().map_err(|_| {
            ScheduleError::Invalid(format!("invalid delay {spec:?}; expected e.g. \"in 30m\""))
        })?;
        let unit_ms = match unit.trim() {
            "s" | "sec" | "secs" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minutes" => 60_000,
            "h" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            other => {
                return Err(ScheduleError::Invalid(format!(
                    "invalid delay unit {other:?} in {spec:?}; expected s, m, h or d"
                )))
            }
        };
        if n <= 0 || n > 366 * 86_400_000 / unit_ms {
            return Err(ScheduleError::Invalid(format!(
                "delay {spec:?} must be positive and at most a year"
            )));
        }
        return Ok(When::Once(now + n * unit_ms));
    }
    if spec.len() >= 20 && spec.as_bytes()[4] == b'-' && spec.contains('T') {
        let t = DateTime::parse_from_rfc3339(spec).map_err(|e| {
            ScheduleError::Invalid(format!(
                "invalid time {spec:?}: {e}; expected RFC 3339 such as 2026-12-01T09:00:00+01:00"
            ))
        })?;
        let at = t.timestamp_millis();
        if at <= now {
            return Err(ScheduleError::Invalid(format!("{spec} is in the past")));
        }
        return Ok(When::Once(at));
    }
    let cron = parse_cron(spec)?;
    Ok(When::Cron {
        cron: Box::new(cron),
        expr: spec.to_string(),
    })
}

/// The first slot strictly after `after`, in `tz`.
pub fn next_after(cron: &Cron, tz: Tz, after: Millis) -> Option<Millis> {
    let t = tz.timestamp_millis_opt(after).single()?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// The next `n` slots after `from`, in `tz`.
pub fn upcoming(cron: &Cron, tz: Tz, from: Millis, n: usize) -> Vec<DateTime<Tz>> {
    let Some(start) = tz.timestamp_millis_opt(from).single() else {
        return Vec::new();
    };
    cron.iter_after(start).take(n).collect()
}

/// The default zone: `[scheduler] timezone`, else the system's (`TZ`, `/etc/timezone`, the
/// `/etc/localtime` link), else UTC.
pub fn default_timezone(config: &Config) -> String {
    let candidates = [
        Some(config.scheduler.timezone.clone()),
        std::env::var("TZ").ok(),
        std::fs::read_to_string("/etc/timezone").ok(),
        std::fs::read_link("/etc/localtime").ok().and_then(|p| {
            p.to_str()
                .and_then(|s| s.split("zoneinfo/").nth(1))
                .map(str::to_string)
        }),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|s| s.trim().trim_start_matches(':').to_string())
        .find(|s| !s.is_empty() && Tz::from_str(s).is_ok())
        .unwrap_or_else(|| "UTC".into())
}

/// What `add` needs.
#[derive(Debug, Clone)]
pub struct AddSchedule {
    pub channel: String,
    /// Cron expression, `in 30m`, or an RFC 3339 time.
    pub when: String,
    pub prompt: String,
    pub timezone: Option<String>,
    pub catch_up: Option<String>,
    pub overlap: Option<String>,
    pub created_by: String,
}

/// Validates and stores a schedule; nothing is written when any part is invalid.
pub async fn add(
    store: &Store,
    config: &Config,
    req: AddSchedule,
    now: Millis,
) -> Result<Schedule, ScheduleError> {
    let tz_name = req
        .timezone
        .clone()
        .unwrap_or_else(|| default_timezone(config));
    let tz = parse_tz(&tz_name)?;
    let catch_up = req.catch_up.as_deref().unwrap_or("once");
    if !matches!(catch_up, "skip" | "once" | "all") {
        return Err(ScheduleError::Invalid(format!(
            "invalid catch-up policy {catch_up:?}; expected skip, once or all"
        )));
    }
    let overlap = req.overlap.as_deref().unwrap_or("skip");
    if !matches!(overlap, "skip" | "queue") {
        return Err(ScheduleError::Invalid(format!(
            "invalid overlap policy {overlap:?}; expected skip or queue"
        )));
    }
    if req.prompt.trim().is_empty() {
        return Err(ScheduleError::Invalid("prompt is empty".into()));
    }
    let (cron, next) = match parse_when(&req.when, now)? {
        When::Once(at) => (None, at),
        When::Cron { cron, expr } => {
            let next = next_after(&cron, tz, now).ok_or_else(|| {
                ScheduleError::Invalid(format!("cron expression {expr:?} never fires"))
            })?;
            (Some(expr), next)
        }
    };
    let channel = store
        .channel_get(&req.channel)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(req.channel.clone()))?;
    Ok(store
        .schedule_insert(
            NewSchedule {
                channel_id: channel.id,
                cron,
                timezone: tz.name().to_string(),
                prompt: req.prompt,
                catch_up: catch_up.into(),
                overlap: overlap.into(),
                next_run_at: next,
                created_by: req.created_by,
            },
            now,
        )
        .await?)
}

/// Resumes a paused schedule from its next slot after `now` (paused slots are not caught up).
pub async fn resume(store: &Store, id: i64, now: Millis) -> Result<bool, ScheduleError> {
    let s = store
        .schedule_get(id)
        .await?
        .ok_or_else(|| ScheduleError::Invalid(format!("no schedule {id}")))?;
    let next = match &s.cron {
        Some(expr) => next_after(&parse_cron(expr)?, parse_tz(&s.timezone)?, now),
        None => s.next_run_at.map(|t| t.max(now)),
    };
    Ok(store.schedule_set_enabled(id, true, next).await?)
}

/// What one scheduler pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    pub fired: usize,
    pub jobs: usize,
    pub skipped: usize,
    pub lost: usize,
    pub prewarmed: usize,
}

pub struct Scheduler {
    store: Store,
    config: Arc<Config>,
}

impl Scheduler {
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        Scheduler { store, config }
    }

    /// One pass at `now`: fire due schedules, then ask for agents to be warm ahead of slots
    /// within `pre_warm_secs`.
    pub async fn run_once(&self, now: Millis) -> Result<TickReport, StoreError> {
        let mut report = TickReport::default();
        for s in self.store.schedule_due(now).await? {
            let Some(firing) = self.plan(&s, now) else {
                continue;
            };
            let fired = self.store.schedule_fire(firing, now).await?;
            if !fired.won {
                report.lost += 1;
                continue;
            }
            report.fired += 1;
            report.jobs += fired.job_ids.len();
            if let Some(why) = fired.skipped {
                report.skipped += 1;
                tracing::info!(schedule = s.id, channel = %s.channel, "{why}");
            }
        }
        let horizon = now + (self.config.acp.pre_warm_secs * 1000) as i64;
        for s in self.store.schedule_due(horizon).await? {
            if s.next_run_at.is_some_and(|t| t > now)
                && self.needs_warming(s.channel_id, horizon).await?
            {
                self.store
                    .warm_request(s.channel_id, Some(now), now)
                    .await?;
                report.prewarmed += 1;
            }
        }
        Ok(report)
    }

    /// Whether the channel's agent is not already warm past `until` (or asked for).
    async fn needs_warming(&self, channel_id: i64, until: Millis) -> Result<bool, StoreError> {
        Ok(match self.store.warm_get(channel_id).await? {
            None => true,
            Some(w) => {
                let live = matches!(w.state.as_str(), "warm" | "busy" | "starting")
                    && w.expires_at.is_some_and(|e| e > until);
                !live && w.warm_at.is_none()
            }
        })
    }

    /// Decides which slots of a due schedule to fire.
    fn plan(&self, s: &Schedule, now: Millis) -> Option<Firing> {
        let first = s.next_run_at?;
        let max_attempts = i64::from(self.config.worker.max_attempts.max(1));
        let Some(expr) = &s.cron else {
            // A one-off: fired (or skipped, when missed and catch_up = skip), then done.
            let missed = now - first > ON_TIME;
            let fire = !(missed && s.catch_up == "skip");
            return Some(Firing {
                schedule_id: s.id,
                old_next: first,
                new_next: None,
                slots: if fire { vec![first] } else { Vec::new() },
                skipped_slots: usize::from(!fire),
                catch_up: s.catch_up.clone(),
                max_attempts,
            });
        };
        let (cron, tz) = match (parse_cron(expr), parse_tz(&s.timezone)) {
            (Ok(c), Ok(t)) => (c, t),
            _ => {
                tracing::error!(
                    schedule = s.id,
                    "stored schedule no longer parses; skipping it"
                );
                return None;
            }
        };
        // Every slot from `first` up to now (bounded), then the next one after now.
        let mut slots = vec![first];
        while slots.len() < MAX_WALK {
            match next_after(&cron, tz, *slots.last().expect("non-empty")) {
                Some(t) if t <= now => slots.push(t),
                _ => break,
            }
        }
        let new_next = next_after(&cron, tz, now.max(*slots.last().expect("non-empty")));
        // Slots are in time order, so the missed ones (more than ON_TIME late) come first.
        let (missed, on_time) = slots.split_at(slots.partition_point(|t| now - t > ON_TIME));
        let caught_up: &[Millis] = match s.catch_up.as_str() {
            "skip" => &[],
            "all" => &missed[missed.len().saturating_sub(MAX_CATCH_UP)..],
            _ => &missed[missed.len().saturating_sub(1)..],
        };
        Some(Firing {
            schedule_id: s.id,
            old_next: first,
            new_next,
            skipped_slots: missed.len() - caught_up.len(),
            slots: caught_up.iter().chain(on_time).copied().collect(),
            catch_up: s.catch_up.clone(),
            max_attempts,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.run_once(now_ms()).await {
                Ok(r) if r.fired + r.prewarmed + r.lost > 0 => tracing::info!(
                    fired = r.fired,
                    jobs = r.jobs,
                    skipped = r.skipped,
                    lost = r.lost,
                    prewarmed = r.prewarmed,
                    "scheduler"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "scheduler pass failed"),
            }
        }
    }
}
