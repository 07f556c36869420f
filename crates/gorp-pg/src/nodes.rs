//! The `nodes` and `leaders` tables: the gorp processes sharing the database, and the leases
//! on what runs on one node at a time (the Matrix bot). Also the database clock.

use crate::types::{Millis, Node, NodeStart};
use crate::{PgStore, Result};

impl PgStore {
    /// The database server's clock now, in ms since the epoch.
    pub async fn db_clock(&self) -> Result<Millis> {
        Ok(sqlx::query_scalar!(
            r#"SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS "ms!""#
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records a node's start (its lease until `lease_until`).
    pub async fn node_start(&self, n: &NodeStart, now: Millis, lease_until: Millis) -> Result<()> {
        crate::statement!(
            self,
            false,
            sqlx::query!(
                r#"INSERT INTO nodes (id, host, pid, version, started_at, last_seen_at,
                                      lease_expires_at, clock_offset_ms, slots)
                   VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8)
                   ON CONFLICT (id) DO UPDATE SET last_seen_at = excluded.last_seen_at,
                       lease_expires_at = excluded.lease_expires_at, stopped_at = NULL,
                       clock_offset_ms = excluded.clock_offset_ms"#,
                n.id,
                n.host,
                n.pid,
                n.version,
                now,
                lease_until,
                gorp_types::types::clock_offset(),
                n.slots
            )
            .execute(&self.pool)
            .await?
        );
        Ok(())
    }

    /// Renews a node's lease. False when its row is gone or marked stopped.
    pub async fn node_heartbeat(&self, id: &str, now: Millis, lease_until: Millis) -> Result<bool> {
        let r = crate::statement!(
            self,
            false,
            sqlx::query!(
                r#"UPDATE nodes SET last_seen_at = $2, lease_expires_at = $3,
                                    clock_offset_ms = $4
                   WHERE id = $1 AND stopped_at IS NULL"#,
                id,
                now,
                lease_until,
                gorp_types::types::clock_offset()
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected() == 1)
    }

    /// A clean shutdown: the node is marked stopped and lets go of what it leads.
    pub async fn node_stop(&self, id: &str, now: Millis) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                "UPDATE nodes SET stopped_at = $2, last_seen_at = $2, lease_expires_at = $2
                 WHERE id = $1",
                id,
                now
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query!("DELETE FROM leaders WHERE holder = $1", id)
                .execute(&mut *tx)
                .await?;
            Ok(())
        });
        Ok(())
    }

    /// Every node, newest first; `state` as of `now`.
    pub async fn node_list(&self, now: Millis) -> Result<Vec<Node>> {
        let rows = sqlx::query!(
            r#"SELECT n.id AS "id!", n.host, n.pid, n.version, n.started_at, n.last_seen_at,
                      n.lease_expires_at, n.stopped_at, n.clock_offset_ms, n.slots,
                      CASE WHEN n.stopped_at IS NOT NULL THEN 'stopped'
                           WHEN n.lease_expires_at < $1 THEN 'gone'
                           ELSE 'up' END AS "state!",
                      (SELECT count(*) FROM warm_sessions w
                       WHERE w.holder = n.id AND w.state IN ('starting', 'warm', 'busy'))
                          AS "channels!: i64",
                      (SELECT count(*) FROM jobs j
                       WHERE j.state = 'running' AND j.lease_owner = n.id) AS "running!: i64",
                      (SELECT string_agg(l.name, ',' ORDER BY l.name) FROM leaders l
                       WHERE l.holder = n.id AND l.lease_expires_at >= $1) AS leads
               FROM nodes n
               ORDER BY n.started_at DESC, n.id"#,
            now
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Node {
                id: r.id,
                host: r.host,
                pid: r.pid,
                version: r.version,
                state: r.state,
                started_at: r.started_at,
                last_seen_at: r.last_seen_at,
                lease_expires_at: r.lease_expires_at,
                stopped_at: r.stopped_at,
                clock_offset_ms: r.clock_offset_ms,
                slots: r.slots,
                channels: r.channels,
                running: r.running,
                leads: r
                    .leads
                    .map(|l| l.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Forgets nodes whose lease ran out before `before` (stopped or gone long ago).
    pub async fn node_forget_before(&self, before: Millis) -> Result<u64> {
        let r = crate::statement!(
            self,
            false,
            sqlx::query!("DELETE FROM nodes WHERE lease_expires_at < $1", before)
                .execute(&self.pool)
                .await?
        );
        Ok(r.rows_affected())
    }

    /// Takes or renews the lease `name` for `holder` until `lease_until`: when it is free, its
    /// lease ran out, or `holder` has it. Returns whether `holder` holds it now.
    pub async fn leader_take(
        &self,
        name: &str,
        holder: &str,
        now: Millis,
        lease_until: Millis,
    ) -> Result<bool> {
        let r = crate::statement!(
            self,
            false,
            sqlx::query!(
                r#"INSERT INTO leaders AS l (name, holder, acquired_at, lease_expires_at)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO UPDATE SET
                       acquired_at = CASE WHEN l.holder = excluded.holder THEN l.acquired_at
                                          ELSE excluded.acquired_at END,
                       holder = excluded.holder,
                       lease_expires_at = excluded.lease_expires_at
                   WHERE l.holder = excluded.holder OR l.lease_expires_at < $3"#,
                name,
                holder,
                now,
                lease_until
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected() == 1)
    }

    /// Lets go of the lease `name` if `holder` has it.
    pub async fn leader_release(&self, name: &str, holder: &str) -> Result<bool> {
        let r = crate::statement!(
            self,
            false,
            sqlx::query!(
                "DELETE FROM leaders WHERE name = $1 AND holder = $2",
                name,
                holder
            )
            .execute(&self.pool)
            .await?
        );
        Ok(r.rows_affected() == 1)
    }

    /// Who holds the lease `name` (and until when), if anyone.
    pub async fn leader_get(&self, name: &str) -> Result<Option<(String, Millis)>> {
        Ok(sqlx::query!(
            "SELECT holder, lease_expires_at FROM leaders WHERE name = $1",
            name
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.holder, r.lease_expires_at)))
    }
}
