//! Budgets over a window: the day and the month a channel's spend is counted in (in the
//! scheduler's zone), the budgets of channels without their own, and what a held job is told.
//! The worker holds jobs with it and every front end shows it, so it sits below both.
//!
//! The figures come from committed usage rows (`Store::channel_spend`), so every gorp on the
//! database holds the same jobs. A channel's spend can pass its budget by what the jobs that
//! were running when it was reached cost: a running job is only stopped by its per-job limit.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone};
use chrono_tz::Tz;

use crate::config::Config;
use crate::store::{
    format_ms, ChannelSpend, EventKind, HeldJob, Millis, NewEvent, SpendLimits, SpendWindow,
};

/// How spend is counted: the zone of its days and months and `[budget]`'s defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpendPolicy {
    pub tz: Tz,
    pub daily_max: Option<f64>,
    pub monthly_max: Option<f64>,
}

impl Default for SpendPolicy {
    /// UTC days and months, no default budgets (a channel's own still hold).
    fn default() -> Self {
        SpendPolicy {
            tz: Tz::UTC,
            daily_max: None,
            monthly_max: None,
        }
    }
}

impl SpendPolicy {
    /// `[budget]` in the zone of `[scheduler] timezone` (else the system's, else UTC).
    pub fn from_config(config: &Config) -> SpendPolicy {
        let tz = crate::config::default_timezone(config)
            .parse()
            .unwrap_or(Tz::UTC);
        SpendPolicy {
            tz,
            daily_max: config.budget.daily_max_cost_usd,
            monthly_max: config.budget.monthly_max_cost_usd,
        }
    }

    /// The windows that contain `now`.
    pub fn limits(&self, now: Millis) -> SpendLimits {
        let today = self.local_date(now);
        SpendLimits {
            day_start: self.start_of(today),
            month_start: self.start_of(today.with_day(1).unwrap_or(today)),
            daily_max: self.daily_max,
            monthly_max: self.monthly_max,
        }
    }

    /// When the window of `window` that contains `now` ends.
    pub fn window_end(&self, window: SpendWindow, now: Millis) -> Millis {
        let today = self.local_date(now);
        let next = match window {
            SpendWindow::Day => today.checked_add_days(Days::new(1)),
            SpendWindow::Month => today
                .with_day(1)
                .and_then(|d| d.checked_add_months(Months::new(1))),
        };
        next.map_or(Millis::MAX, |d| self.start_of(d))
    }

    /// `ms` as local time in the policy's zone, to the minute, with the zone's name.
    pub fn local(&self, ms: Millis) -> String {
        match DateTime::from_timestamp_millis(ms) {
            Some(t) => format!(
                "{} {}",
                t.with_timezone(&self.tz).format("%Y-%m-%d %H:%M"),
                self.tz
            ),
            None => format_ms(ms),
        }
    }

    fn local_date(&self, now: Millis) -> NaiveDate {
        DateTime::from_timestamp_millis(now)
            .unwrap_or_default()
            .with_timezone(&self.tz)
            .date_naive()
    }

    /// The first instant of local date `d`: its midnight, or the first minute after it that
    /// exists where a clock change skips midnight.
    fn start_of(&self, d: NaiveDate) -> Millis {
        let midnight = d.and_hms_opt(0, 0, 0).unwrap_or_default();
        (0..=24 * 4)
            .map(|q| midnight + chrono::Duration::minutes(15 * q))
            .find_map(|t| self.tz.from_local_datetime(&t).earliest())
            .map_or(0, |t| t.timestamp_millis())
    }

    /// The `held` events that tell each job why it waits.
    pub fn held_notes(&self, held: &[HeldJob], now: Millis) -> Vec<NewEvent> {
        held.iter()
            .filter_map(|h| {
                let (window, spent, max) = h.spend.spent()?;
                let until = self.window_end(window, now);
                Some(NewEvent {
                    job_id: h.job_id.clone(),
                    attempt: h.attempt,
                    kind: EventKind::Held.as_str().into(),
                    text: Some(held_text(
                        &h.spend.channel,
                        window,
                        spent,
                        max,
                        &self.local(until),
                    )),
                    data: Some(serde_json::json!({
                        "window": window.as_str(),
                        "spent_usd": spent,
                        "budget_usd": max,
                        "until": until,
                    })),
                    at: now,
                })
            })
            .collect()
    }
}

/// Why a held job waits, in one sentence.
pub fn held_text(channel: &str, window: SpendWindow, spent: f64, max: f64, until: &str) -> String {
    let (budget, period) = match window {
        SpendWindow::Day => ("daily", "day"),
        SpendWindow::Month => ("monthly", "month"),
    };
    format!(
        "held: channel {channel} has spent ${spent:.4} of its {budget} budget of ${max:.2}; \
         its jobs wait until the {period} ends ({until}) or the budget is raised"
    )
}

/// One line per window of a channel's spend against its budgets, e.g.
/// `today: $1.2000 of $5.00 (until 2026-12-07 00:00 UTC)`.
pub fn spend_lines(policy: &SpendPolicy, s: &ChannelSpend, now: Millis) -> Vec<String> {
    [
        ("today", SpendWindow::Day, s.day_usd, s.day_max_usd),
        (
            "this month",
            SpendWindow::Month,
            s.month_usd,
            s.month_max_usd,
        ),
    ]
    .into_iter()
    .map(|(label, window, spent, max)| {
        let until = policy.local(policy.window_end(window, now));
        match max {
            Some(m) if spent >= m => {
                format!("{label}: ${spent:.4} of ${m:.2}, spent: jobs held until {until}")
            }
            Some(m) => format!("{label}: ${spent:.4} of ${m:.2} (until {until})"),
            None => format!("{label}: ${spent:.4}, no budget"),
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> Millis {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn policy(tz: &str) -> SpendPolicy {
        SpendPolicy {
            tz: tz.parse().unwrap(),
            daily_max: Some(5.0),
            monthly_max: None,
        }
    }

    #[test]
    fn windows_are_local_days_and_months() {
        let p = policy("Europe/Berlin");
        // 23:30 UTC on Dec 6 is 00:30 on Dec 7 in Berlin.
        let l = p.limits(ms("2026-12-06T23:30:00Z"));
        assert_eq!(l.day_start, ms("2026-12-06T23:00:00Z"));
        assert_eq!(l.month_start, ms("2026-11-30T23:00:00Z"));
        assert_eq!(l.daily_max, Some(5.0));
        assert_eq!(
            p.window_end(SpendWindow::Day, ms("2026-12-06T23:30:00Z")),
            ms("2026-12-07T23:00:00Z")
        );
        assert_eq!(
            p.window_end(SpendWindow::Month, ms("2026-12-06T23:30:00Z")),
            ms("2026-12-31T23:00:00Z")
        );
        // UTC: the same instant is still Dec 6.
        let u = policy("UTC").limits(ms("2026-12-06T23:30:00Z"));
        assert_eq!(u.day_start, ms("2026-12-06T00:00:00Z"));
        assert_eq!(u.month_start, ms("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn a_day_across_a_clock_change_has_its_real_length() {
        let p = policy("Europe/Berlin");
        // 2026-03-29: clocks go from 02:00 to 03:00, so the day is 23 hours long.
        let noon = ms("2026-03-29T10:00:00Z");
        let l = p.limits(noon);
        assert_eq!(l.day_start, ms("2026-03-28T23:00:00Z"));
        assert_eq!(
            p.window_end(SpendWindow::Day, noon),
            ms("2026-03-29T22:00:00Z")
        );
        // Where the change skips midnight itself (Santiago, 2026-09-06 00:00 → 01:00), the
        // day starts at its first minute.
        let s = policy("America/Santiago");
        let l = s.limits(ms("2026-09-06T12:00:00Z"));
        assert_eq!(l.day_start, ms("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn december_ends_in_january() {
        let p = policy("UTC");
        assert_eq!(
            p.window_end(SpendWindow::Month, ms("2026-12-31T12:00:00Z")),
            ms("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn a_held_note_names_the_window_the_figures_and_the_end() {
        let p = policy("UTC");
        let now = ms("2026-12-06T12:00:00Z");
        let held = HeldJob {
            job_id: "j".into(),
            attempt: 0,
            spend: ChannelSpend {
                channel_id: 1,
                channel: "ops".into(),
                day_usd: 5.25,
                day_max_usd: Some(5.0),
                month_usd: 5.25,
                month_max_usd: Some(100.0),
            },
        };
        let notes = p.held_notes(&[held], now);
        assert_eq!(notes.len(), 1);
        let text = notes[0].text.as_deref().unwrap();
        assert_eq!(
            text,
            "held: channel ops has spent $5.2500 of its daily budget of $5.00; its jobs wait \
             until the day ends (2026-12-07 00:00 UTC) or the budget is raised"
        );
        let data = notes[0].data.as_ref().unwrap();
        assert_eq!(data["window"], "day");
        assert_eq!(data["until"], ms("2026-12-07T00:00:00Z"));
    }
}
