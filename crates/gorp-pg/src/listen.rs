//! Wakeups across nodes: every node LISTENs on the channels the schema's triggers NOTIFY
//! (`migrations-postgres/0016_nodes.sql`), so a job enqueued on one node is claimed on another
//! within milliseconds, a cancel reaches the node running the job at once, and readers (SSE,
//! `?wait`, the Matrix reply pump) on every node see new rows. Polling stays the fallback: a
//! lost listener connection is reconnected, and everything is woken once after it, since
//! notifications sent meanwhile are lost.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::PgStore;

/// The channels the triggers notify.
pub const CHANNELS: [&str; 3] = ["gorp_jobs", "gorp_cancel", "gorp_events"];

/// Pause before connecting again after the listener failed to.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

impl PgStore {
    /// Listens until the pool is closed, turning notifications into this process's wakeups.
    pub async fn listen(self) {
        let mut listener: Option<PgListener> = None;
        loop {
            if self.pool.is_closed() {
                return;
            }
            let l = match listener.as_mut() {
                Some(l) => l,
                None => match self.connect_listener().await {
                    Ok(l) => {
                        // Whatever was notified while no one listened.
                        self.wake_all();
                        listener.insert(l)
                    }
                    Err(e) => {
                        if self.pool.is_closed() {
                            return;
                        }
                        tracing::warn!(error = %e, "cannot LISTEN for other nodes' changes; polling until it can");
                        tokio::time::sleep(RECONNECT_BACKOFF).await;
                        continue;
                    }
                },
            };
            match l.try_recv().await {
                Ok(Some(n)) => self.notified(n.channel()),
                Ok(None) => {
                    // The connection was lost; the next try_recv reconnects. Notifications
                    // sent meanwhile are lost: wake everything once.
                    tracing::warn!("the LISTEN connection was lost; reconnecting");
                    self.wake_all();
                }
                Err(e) => {
                    if self.pool.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, "LISTEN failed; connecting again");
                    listener = None;
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                }
            }
        }
    }

    async fn connect_listener(&self) -> Result<PgListener, sqlx::Error> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.ignore_pool_close_event(false);
        l.listen_all(CHANNELS).await?;
        Ok(l)
    }

    fn notified(&self, channel: &str) {
        match channel {
            "gorp_jobs" => self.jobs_changed.notify_one(),
            "gorp_cancel" => self.cancels.notify_one(),
            _ => {}
        }
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn wake_all(&self) {
        self.jobs_changed.notify_one();
        self.cancels.notify_one();
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Measures the database clock's offset from this machine's and makes `now_ms()` read the
    /// database's clock. Of five readings the one with the shortest round trip counts (as NTP
    /// does); half that round trip bounds the error. Returns (offset, round trip) in ms.
    pub async fn sync_clock(&self) -> crate::Result<(i64, i64)> {
        let mut conn = self.pool.acquire().await?;
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..5 {
            let before = gorp_types::types::local_now_ms();
            let db = sqlx::query_scalar!(
                r#"SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS "ms!""#
            )
            .fetch_one(&mut *conn)
            .await?;
            let after = gorp_types::types::local_now_ms();
            let rtt = after - before;
            if best.is_none_or(|(_, r)| rtt < r) {
                best = Some((db - (before + after) / 2, rtt));
            }
        }
        let (offset, rtt) = best.expect("five readings");
        gorp_types::types::set_clock_offset(offset);
        Ok((offset, rtt))
    }
}
