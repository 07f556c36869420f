//! This gorp process as a node of the database it shares: its row in `nodes` (renewed every
//! second, so `gorp nodes` shows who is up), the database clock it reads (on PostgreSQL every
//! node stamps and compares leases on the database server's clock, measured here), and the
//! leader leases that keep a singleton (the Matrix bot) on exactly one node at a time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::background::Service;
use crate::store::{now_ms, Millis, NodeStart, Store, StoreError};

/// How often a node renews its row and its leader leases.
pub const NODE_INTERVAL: Duration = Duration::from_secs(1);
/// The database clock is measured again every this many passes.
const CLOCK_EVERY: u64 = 30;
/// Nodes whose lease ran out this long ago are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(86_400);

/// The lease name of the Matrix bot.
pub const MATRIX: &str = "matrix";

/// Keeps this node's row alive (a [`Service`]).
pub struct NodeKeeper {
    store: Store,
    id: String,
    lease: Duration,
    passes: AtomicU64,
}

impl NodeKeeper {
    /// Measures the database clock and records this node's start.
    pub async fn start(
        store: Store,
        instance: &crate::instance::InstanceId,
        lease: Duration,
        slots: u32,
    ) -> Result<NodeKeeper, StoreError> {
        let (offset, rtt) = store.sync_clock().await?;
        if store.is_shared() {
            tracing::info!(
                offset_ms = offset,
                round_trip_ms = rtt,
                "reading the database's clock"
            );
        }
        let now = now_ms();
        let start = NodeStart {
            id: instance.to_string(),
            host: instance.host().to_string(),
            pid: i64::from(instance.pid()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots: i64::from(slots),
        };
        store
            .node_start(&start, now, now + lease.as_millis() as i64)
            .await?;
        Ok(NodeKeeper {
            store,
            id: start.id,
            lease,
            passes: AtomicU64::new(0),
        })
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct NodeReport {
    pub forgotten: u64,
}

impl Service for NodeKeeper {
    type Report = NodeReport;
    const NAME: &'static str = "node";

    fn interval(&self) -> Duration {
        NODE_INTERVAL
    }

    async fn run_once(&self, now: Millis) -> Result<NodeReport, StoreError> {
        let pass = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
        let mut report = NodeReport::default();
        if pass.is_multiple_of(CLOCK_EVERY) {
            self.store.sync_clock().await?;
            let forget = now - FORGET_AFTER.as_millis() as i64;
            report.forgotten = self.store.node_forget_before(forget).await?;
        }
        if !self
            .store
            .node_heartbeat(&self.id, now, now + self.lease.as_millis() as i64)
            .await?
        {
            // Removed by hand, or marked stopped: write it again.
            tracing::warn!(node = %self.id, "this node's row was gone; recording it again");
        }
        Ok(report)
    }

    fn counts(r: &NodeReport) -> Vec<(&'static str, u64)> {
        vec![("forgotten", r.forgotten)]
    }
}

/// Runs `work` on this node only while it holds the leader lease `name`: waits to take the
/// lease (free, or its holder's ran out), starts `work` with a token, renews the lease every
/// [`NODE_INTERVAL`], and cancels the token when the lease is lost or cannot be renewed for
/// three quarters of its length (so the work stops before another node may take over), then
/// waits to lead again. On `shutdown` the work is stopped and the lease let go of at once.
pub async fn lead<F, Fut>(
    store: Store,
    name: &'static str,
    holder: String,
    lease: Duration,
    shutdown: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease_ms = lease.as_millis() as i64;
    let fence_after = lease.mul_f64(0.75);
    let mut waiting_logged = false;
    loop {
        // Wait for the lease.
        let taken = match store
            .leader_take(name, &holder, now_ms(), now_ms() + lease_ms)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "cannot take the leader lease");
                false
            }
        };
        if !taken && !store.is_shared() {
            // On SQLite the holder runs on this host: one that died (a `kill -9` before this
            // restart) is let go of at once instead of after its lease.
            if let Ok(Some((old, _))) = store.leader_get(name).await {
                if crate::instance::holder_is_dead(&old) {
                    tracing::info!(lease = name, holder = %old, "the leader died; taking over");
                    let _ = store.leader_release(name, &old).await;
                    continue;
                }
            }
        }
        if !taken {
            if !waiting_logged {
                tracing::info!(lease = name, "another node leads; waiting to take over");
                waiting_logged = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(NODE_INTERVAL) => continue,
            }
        }
        waiting_logged = false;
        tracing::info!(lease = name, "this node leads");
        let stop = CancellationToken::new();
        let mut task = tokio::spawn(work(stop.clone()));
        let mut renewed = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(NODE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended_by_shutdown = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = &mut task => {
                    // The work ended by itself: let others lead.
                    let _ = store.leader_release(name, &holder).await;
                    break false;
                }
                _ = tick.tick() => {}
            }
            let sent = tokio::time::Instant::now();
            let left = fence_after.saturating_sub(renewed.elapsed());
            let renewal = store.leader_take(name, &holder, now_ms(), now_ms() + lease_ms);
            match tokio::time::timeout(left.max(Duration::from_millis(1)), renewal).await {
                Ok(Ok(true)) => renewed = sent,
                Ok(Ok(false)) => {
                    tracing::warn!(
                        lease = name,
                        "another node took over the leader lease; stopping here"
                    );
                    break false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = name, error = %e, "cannot renew the leader lease")
                }
                Err(_) => {}
            }
            if renewed.elapsed() >= fence_after {
                tracing::error!(
                    lease = name,
                    "cannot renew the leader lease in time; stopping here (self-fencing)"
                );
                break false;
            }
        };
        stop.cancel();
        if !task.is_finished() {
            let _ = (&mut task).await;
        }
        if ended_by_shutdown {
            let _ = store.leader_release(name, &holder).await;
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(NODE_INTERVAL) => {}
        }
    }
}
