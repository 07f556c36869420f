//! `gorp::scheduler`: `parse_when`, `parse_cron`, `parse_tz`, then `next_after` and `upcoming`
//! on what parses.
//!
//! The input is up to three lines: the spec, a time zone (UTC when missing or unknown), and
//! `now` in Unix milliseconds (2026-01-01 when missing; clamped to 1970..2200, the clocks gorp
//! runs under).
//!
//! Checks, besides not panicking or running away: a one-off is after `now` (and at most a
//! year after it for `in …`); a cron keeps the trimmed spec and parses again with
//! `parse_cron`; the next slot is after `now`; `upcoming` is strictly increasing, starts at
//! that slot, and each slot is `next_after` the one before (what `!schedule next` shows is
//! what the scheduler fires).
#![no_main]

use gorp::service::schedules::{next_after, parse_cron, parse_tz, parse_when, upcoming, When};
use libfuzzer_sys::fuzz_target;

const DEFAULT_NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const MAX_NOW: i64 = 7_258_118_400_000; // 2200-01-01T00:00:00Z
const YEAR_MS: i64 = 366 * 86_400_000;

fuzz_target!(|input: &str| {
    let mut lines = input.splitn(3, '\n');
    let spec = lines.next().unwrap_or("");
    let tz_name = lines.next().unwrap_or("UTC");
    let now = lines
        .next()
        .and_then(|l| l.trim().parse::<i64>().ok())
        .map_or(DEFAULT_NOW, |n| n.clamp(0, MAX_NOW));

    let tz = parse_tz(tz_name).unwrap_or(chrono_tz_utc());
    let _ = parse_cron(spec);

    match parse_when(spec, now) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(When::Once(at)) => {
            assert!(at > now, "{spec:?}: {at} not after {now}");
            if spec.trim().starts_with("in ") {
                assert!(at - now <= YEAR_MS, "{spec:?}");
            }
        }
        Ok(When::Cron { cron, expr }) => {
            assert_eq!(expr, spec.trim());
            assert!(parse_cron(&expr).is_ok());
            let next = next_after(&cron, tz, now);
            if let Some(t) = next {
                assert!(t > now, "{spec:?} in {tz_name:?}: next {t} not after {now}");
            }
            let slots: Vec<i64> = upcoming(&cron, tz, now, 4)
                .iter()
                .map(|d| d.timestamp_millis())
                .collect();
            assert_eq!(
                slots.first().copied(),
                next,
                "{spec:?} in {tz_name:?} from {now}"
            );
            for w in slots.windows(2) {
                assert!(w[0] < w[1], "{spec:?}: {slots:?}");
                assert_eq!(
                    next_after(&cron, tz, w[0]),
                    Some(w[1]),
                    "{spec:?} in {tz_name:?}: {slots:?}"
                );
            }
        }
    }
});

fn chrono_tz_utc() -> chrono_tz::Tz {
    chrono_tz::UTC
}
