//! The `nodes` and `leaders` tables: the gorp processes sharing the database, and the leases
//! on what runs on one node at a time (the Matrix bot). On SQLite there is one node at a time;
//! the same operations run on PostgreSQL, where nodes share the database.

use super::writer::{Applied, Conn, Write};
use super::*;

impl Store {
    /// The database's clock now (ms). On SQLite it is this machine's.
    pub async fn db_clock(&self) -> Result<Millis> {
        if let Some(pg) = &self.pg {
            return pg.db_clock().await;
        }
        Ok(local_now_ms())
    }

    /// True when other gorp processes may share this database from other machines
    /// (PostgreSQL): liveness by host and pid is then not trusted, leases decide.
    pub fn is_shared(&self) -> bool {
        self.pg.is_some()
    }

    /// Records a node's start (its lease until `lease_until`).
    pub async fn node_start(&self, n: &NodeStart, now: Millis, lease_until: Millis) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.node_start(n, now, lease_until).await;
        }
        self.write(Start {
            n: n.clone(),
            now,
            lease_until,
        })
        .await
    }

    /// Renews a node's lease. False when its row is gone or marked stopped.
    pub async fn node_heartbeat(&self, id: &str, now: Millis, lease_until: Millis) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.node_heartbeat(id, now, lease_until).await;
        }
        self.write(Beat {
            id: id.to_string(),
            now,
            lease_until,
        })
        .await
    }

    /// A clean shutdown: the node is marked stopped and lets go of what it leads.
    pub async fn node_stop(&self, id: &str, now: Millis) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.node_stop(id, now).await;
        }
        self.write(StopNode {
            id: id.to_string(),
            now,
        })
        .await
    }

    /// Every node, newest first; `state` as of `now`.
    pub async fn node_list(&self, now: Millis) -> Result<Vec<Node>> {
        if let Some(pg) = &self.pg {
            return pg.node_list(now).await;
        }
        let rows = sqlx::query!(
            r#"SELECT n.id AS "id!", n.host, n.pid, n.version, n.started_at, n.last_seen_at,
                      n.lease_expires_at, n.stopped_at, n.clock_offset_ms, n.slots,
                      CASE WHEN n.stopped_at IS NOT NULL THEN 'stopped'
                           WHEN n.lease_expires_at < ?1 THEN 'gone'
                           ELSE 'up' END AS "state!: String",
                      (SELECT count(*) FROM warm_sessions w
                       WHERE w.holder = n.id AND w.state IN ('starting', 'warm', 'busy'))
                          AS "channels!: i64",
                      (SELECT count(*) FROM jobs j
                       WHERE j.state = 'running' AND j.lease_owner = n.id) AS "running!: i64",
                      (SELECT group_concat(l.name, ',') FROM leaders l
                       WHERE l.holder = n.id AND l.lease_expires_at >= ?1) AS "leads?: String"
               FROM nodes n
               ORDER BY n.started_at DESC, n.id"#,
            now
        )
        .fetch_all(&self.read)
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
        if let Some(pg) = &self.pg {
            return pg.node_forget_before(before).await;
        }
        self.write(Forget { before }).await
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
        if let Some(pg) = &self.pg {
            return pg.leader_take(name, holder, now, lease_until).await;
        }
        self.write(TakeLead {
            name: name.to_string(),
            holder: holder.to_string(),
            now,
            lease_until,
        })
        .await
    }

    /// Lets go of the lease `name` if `holder` has it.
    pub async fn leader_release(&self, name: &str, holder: &str) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.leader_release(name, holder).await;
        }
        self.write(ReleaseLead {
            name: name.to_string(),
            holder: holder.to_string(),
        })
        .await
    }

    /// Who holds the lease `name` (and until when), if anyone.
    pub async fn leader_get(&self, name: &str) -> Result<Option<(String, Millis)>> {
        if let Some(pg) = &self.pg {
            return pg.leader_get(name).await;
        }
        Ok(sqlx::query!(
            "SELECT holder, lease_expires_at FROM leaders WHERE name = ?1",
            name
        )
        .fetch_optional(&self.read)
        .await?
        .map(|r| (r.holder, r.lease_expires_at)))
    }
}

struct Start {
    n: NodeStart,
    now: Millis,
    lease_until: Millis,
}

impl Write for Start {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            r#"INSERT INTO nodes (id, host, pid, version, started_at, last_seen_at,
                                  lease_expires_at, slots)
               VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)
               ON CONFLICT (id) DO UPDATE SET last_seen_at = excluded.last_seen_at,
                   lease_expires_at = excluded.lease_expires_at, stopped_at = NULL"#,
            self.n.id,
            self.n.host,
            self.n.pid,
            self.n.version,
            self.now,
            self.lease_until,
            self.n.slots
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct Beat {
    id: String,
    now: Millis,
    lease_until: Millis,
}

impl Write for Beat {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"UPDATE nodes SET last_seen_at = ?2, lease_expires_at = ?3
               WHERE id = ?1 AND stopped_at IS NULL"#,
            self.id,
            self.now,
            self.lease_until
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct StopNode {
    id: String,
    now: Millis,
}

impl Write for StopNode {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            "UPDATE nodes SET stopped_at = ?2, last_seen_at = ?2, lease_expires_at = ?2
             WHERE id = ?1",
            self.id,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!("DELETE FROM leaders WHERE holder = ?1", self.id)
            .execute(&mut *conn)
            .await?;
        Ok(Ok(()))
    }
}

struct Forget {
    before: Millis,
}

impl Write for Forget {
    type Output = u64;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!("DELETE FROM nodes WHERE lease_expires_at < ?1", self.before)
            .execute(&mut *conn)
            .await?;
        Ok(Ok(r.rows_affected()))
    }
}

struct TakeLead {
    name: String,
    holder: String,
    now: Millis,
    lease_until: Millis,
}

impl Write for TakeLead {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"INSERT INTO leaders (name, holder, acquired_at, lease_expires_at)
               VALUES (?1, ?2, ?3, ?4)
               ON CONFLICT (name) DO UPDATE SET
                   acquired_at = CASE WHEN holder = excluded.holder THEN acquired_at
                                      ELSE excluded.acquired_at END,
                   holder = excluded.holder,
                   lease_expires_at = excluded.lease_expires_at
               WHERE holder = excluded.holder OR lease_expires_at < ?3"#,
            self.name,
            self.holder,
            self.now,
            self.lease_until
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct ReleaseLead {
    name: String,
    holder: String,
}

impl Write for ReleaseLead {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            "DELETE FROM leaders WHERE name = ?1 AND holder = ?2",
            self.name,
            self.holder
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}
