//! The one loop every background service runs in: the rescuer, the retention cleaner, the
//! scheduler and the warm-session keeper. Each is a [`Service`]: a name, an interval, and
//! one pass (`run_once`, taking `now` so tests drive time) whose counts are logged when any
//! is non-zero. A failed pass is logged and the next tick tries again; shutdown ends the
//! loop between passes.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{now_ms, Millis, StoreError};

/// A background service: one pass at a time, every `interval`.
pub trait Service: Send + Sync + 'static {
    /// What one pass did.
    type Report: Send;

    /// The name its log lines carry.
    const NAME: &'static str;

    fn interval(&self) -> Duration;

    /// One pass at time `now`.
    fn run_once(
        &self,
        now: Millis,
    ) -> impl Future<Output = Result<Self::Report, StoreError>> + Send;

    /// The counts of a pass, by name; logged when any is non-zero.
    fn counts(report: &Self::Report) -> Vec<(&'static str, u64)>;

    /// When the next pass is due, if sooner than the interval (a deadline the last pass saw).
    fn next_pass(&self, _now: Millis) -> Option<Duration> {
        None
    }
}

/// Runs `service` every interval (sooner when it says so) until `shutdown` fires.
pub async fn run<S: Service>(service: S, shutdown: CancellationToken) {
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        next = started + service.interval();
        match service.run_once(now_ms()).await {
            Ok(report) => {
                let counts = S::counts(&report);
                if counts.iter().any(|(_, n)| *n > 0) {
                    let counts: Vec<String> =
                        counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
                    tracing::info!(service = S::NAME, counts = %counts.join(" "), "background pass");
                }
            }
            Err(e) => tracing::warn!(service = S::NAME, error = %e, "background pass failed"),
        }
        if let Some(sooner) = service.next_pass(now_ms()) {
            next = next.min(tokio::time::Instant::now() + sooner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct Counter(Arc<AtomicU64>);

    impl Service for Counter {
        type Report = u64;
        const NAME: &'static str = "counter";
        fn interval(&self) -> Duration {
            Duration::from_millis(1)
        }
        async fn run_once(&self, _now: Millis) -> Result<u64, StoreError> {
            Ok(self.0.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn counts(report: &u64) -> Vec<(&'static str, u64)> {
            vec![("passes", *report)]
        }
    }

    #[tokio::test]
    async fn passes_run_until_shutdown_and_stop_after_it() {
        let n = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Counter(n.clone()), stop.clone()));
        while n.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        task.await.unwrap();
        let after = n.load(Ordering::SeqCst);
        tokio::task::yield_now().await;
        assert_eq!(n.load(Ordering::SeqCst), after, "no pass after shutdown");
    }
}
