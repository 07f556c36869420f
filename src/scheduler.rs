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

use std::sync::Arc;
use std::time::Duration;

use crate::background::Service;
use crate::config::Config;
use crate::service::schedules::{next_after, parse_cron, parse_tz};
use crate::store::{CatchUp, Firing, Millis, Schedule, Store, StoreError, WarmState};

/// How often the scheduler looks for due slots.
pub const TICK: Duration = Duration::from_secs(1);
/// A slot noticed up to this late counts as on time (not missed).
pub const ON_TIME: Millis = 60_000;
/// Most jobs one `catch_up = all` firing inserts.
pub const MAX_CATCH_UP: usize = 10;
/// Most slots walked when catching up (a minutely schedule down for a week).
const MAX_WALK: usize = 20_000;

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
                let live = matches!(
                    w.state,
                    WarmState::Warm | WarmState::Busy | WarmState::Starting
                ) && w.expires_at.is_some_and(|e| e > until);
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
            let fire = !(missed && s.catch_up == CatchUp::Skip);
            return Some(Firing {
                schedule_id: s.id,
                old_next: first,
                new_next: None,
                slots: if fire { vec![first] } else { Vec::new() },
                skipped_slots: usize::from(!fire),
                catch_up: s.catch_up,
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
        let caught_up: &[Millis] = match s.catch_up {
            CatchUp::Skip => &[],
            CatchUp::All => &missed[missed.len().saturating_sub(MAX_CATCH_UP)..],
            CatchUp::Once => &missed[missed.len().saturating_sub(1)..],
        };
        Some(Firing {
            schedule_id: s.id,
            old_next: first,
            new_next,
            skipped_slots: missed.len() - caught_up.len(),
            slots: caught_up.iter().chain(on_time).copied().collect(),
            catch_up: s.catch_up,
            max_attempts,
        })
    }
}

impl Service for Scheduler {
    type Report = TickReport;
    const NAME: &'static str = "scheduler";

    fn interval(&self) -> Duration {
        TICK
    }

    async fn run_once(&self, now: Millis) -> Result<TickReport, StoreError> {
        Scheduler::run_once(self, now).await
    }

    fn counts(r: &TickReport) -> Vec<(&'static str, u64)> {
        let n = |v: usize| v as u64;
        vec![
            ("fired", n(r.fired)),
            ("jobs", n(r.jobs)),
            ("skipped", n(r.skipped)),
            ("lost", n(r.lost)),
            ("prewarmed", n(r.prewarmed)),
        ]
    }
}
