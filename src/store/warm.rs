//! The `warm_sessions` table: which channel's agent is warm, who holds it, until when.

use super::writer::{Applied, Conn, Write};
use super::*;

/// `SELECT` of whole [`WarmSession`] rows (`w`, with its channel `c`; a warm session whose
/// channel has a running job shows as `busy`); the rest of the query follows.
macro_rules! select_warm {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            WarmSession,
            r#"SELECT w.channel_id AS "channel_id!", c.name AS channel, w.holder,
                      CASE WHEN w.state = 'warm' AND EXISTS (
                               SELECT 1 FROM jobs j
                               WHERE j.channel_id = w.channel_id AND j.state = 'running')
                           THEN 'busy' ELSE w.state END AS "state!: WarmState",
                      w.acp_session_id, w.pid, w.last_used_at, w.expires_at, w.warm_at,
                      w.lease_expires_at, w.started_at, w.error, w.sandbox, w.agent_info, w.updated_at
               FROM warm_sessions w JOIN channels c ON c.id = w.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

impl Store {
    /// Takes (or keeps) the row of a channel for `holder` with the given state.
    pub async fn warm_upsert(
        &self,
        channel_id: i64,
        holder: &str,
        u: WarmUpdate,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.warm_upsert(channel_id, holder, u, now).await;
        }
        self.write(Upsert {
            channel_id,
            holder: holder.to_string(),
            u,
            now,
        })
        .await
    }

    /// Takes the channel's lease for `holder` until `lease_until` before its agent starts here:
    /// when the row is free, its lease ran out, `holder` has it, or its holder is `dead` (an
    /// instance known to be gone), and no other holder's job is running on the channel. Taking
    /// it over from another holder starts the row from `stopped`. Returns whether `holder`
    /// holds it now.
    pub async fn warm_take(
        &self,
        channel_id: i64,
        holder: &str,
        dead: Option<&str>,
        now: Millis,
        lease_until: Millis,
    ) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg
                .warm_take(channel_id, holder, dead, now, lease_until)
                .await;
        }
        self.write(Take {
            channel_id,
            holder: holder.to_string(),
            dead: dead.map(str::to_string),
            now,
            lease_until,
        })
        .await
    }

    /// Marks a session `holder` had as stopped (or failed), with why. Returns false when
    /// `holder` no longer held it.
    pub async fn warm_stop(
        &self,
        channel_id: i64,
        holder: &str,
        failed: bool,
        note: Option<String>,
        now: Millis,
    ) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.warm_stop(channel_id, holder, failed, note, now).await;
        }
        self.write(Stop {
            channel_id,
            holder: holder.to_string(),
            state: if failed {
                WarmState::Failed
            } else {
                WarmState::Stopped
            },
            error: note,
            now,
        })
        .await
    }

    /// Asks for the channel's agent to be warm at `at` (`None` clears the request).
    pub async fn warm_request(
        &self,
        channel_id: i64,
        at: Option<Millis>,
        now: Millis,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.warm_request(channel_id, at, now).await;
        }
        self.write(Request {
            channel_id,
            at,
            now,
        })
        .await
    }

    /// Renews the leases of every session `holder` keeps.
    pub async fn warm_heartbeat(&self, holder: &str, lease_until: Millis) -> Result<u64> {
        if let Some(pg) = &self.pg {
            return pg.warm_heartbeat(holder, lease_until).await;
        }
        self.write(Heartbeat {
            holder: holder.to_string(),
            lease_until,
        })
        .await
    }

    /// On shutdown: keeps `holder`'s sessions marked warm but lets the next gorp take them over.
    pub async fn warm_release_leases(&self, holder: &str, now: Millis) -> Result<u64> {
        if let Some(pg) = &self.pg {
            return pg.warm_release_leases(holder, now).await;
        }
        self.write(ReleaseLeases {
            holder: holder.to_string(),
            now,
        })
        .await
    }

    /// Marks sessions stopped whose holder is gone and whose keep-alive ran out.
    pub async fn warm_expire_orphans(&self, now: Millis) -> Result<u64> {
        if let Some(pg) = &self.pg {
            return pg.warm_expire_orphans(now).await;
        }
        self.write(ExpireOrphans { now }).await
    }

    /// Marks one orphaned session stopped (it will not be warmed again), if `holder` (the gone
    /// instance) still holds it. Returns whether it did.
    pub async fn warm_stop_orphan(
        &self,
        channel_id: i64,
        holder: Option<&str>,
        note: &str,
        now: Millis,
    ) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.warm_stop_orphan(channel_id, holder, note, now).await;
        }
        self.write(StopOrphan {
            channel_id,
            holder: holder.map(str::to_string),
            note: note.to_string(),
            now,
        })
        .await
    }

    pub async fn warm_list(&self) -> Result<Vec<WarmSession>> {
        if let Some(pg) = &self.pg {
            return pg.warm_list().await;
        }
        Ok(select_warm!("ORDER BY c.name")
            .fetch_all(&self.read)
            .await?)
    }

    pub async fn warm_get(&self, channel_id: i64) -> Result<Option<WarmSession>> {
        if let Some(pg) = &self.pg {
            return pg.warm_get(channel_id).await;
        }
        Ok(select_warm!("WHERE w.channel_id = ?1", channel_id)
            .fetch_optional(&self.read)
            .await?)
    }
}

struct Upsert {
    channel_id: i64,
    holder: String,
    u: WarmUpdate,
    now: Millis,
}

impl Write for Upsert {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        let u = &self.u;
        sqlx::query!(
            r#"INSERT INTO warm_sessions (channel_id, holder, state, pid, acp_session_id,
                                          lease_expires_at, expires_at, started_at,
                                          last_used_at, updated_at, sandbox, agent_info)
               VALUES (?1, ?2, ?3, ?4, ?5, ?7, ?8, ?6, CASE WHEN ?9 THEN ?6 END, ?6, ?10, ?11)
               ON CONFLICT (channel_id) DO UPDATE SET
                   holder = excluded.holder,
                   state = excluded.state,
                   pid = excluded.pid,
                   acp_session_id = coalesce(excluded.acp_session_id, acp_session_id),
                   lease_expires_at = excluded.lease_expires_at,
                   expires_at = coalesce(excluded.expires_at, expires_at),
                   started_at = CASE WHEN excluded.state = 'starting' THEN excluded.started_at
                                     ELSE started_at END,
                   last_used_at = coalesce(excluded.last_used_at, last_used_at),
                   sandbox = coalesce(excluded.sandbox, sandbox),
                   agent_info = coalesce(excluded.agent_info, agent_info),
                   error = NULL,
                   updated_at = excluded.updated_at"#,
            self.channel_id,
            self.holder,
            u.state,
            u.pid,
            u.session,
            self.now,
            u.lease_until,
            u.expires_at,
            u.used,
            u.sandbox,
            u.agent_info
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct Stop {
    channel_id: i64,
    holder: String,
    state: WarmState,
    error: Option<String>,
    now: Millis,
}

impl Write for Stop {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"UPDATE warm_sessions
               SET state = ?3, error = ?4, pid = NULL, lease_expires_at = NULL, updated_at = ?5
               WHERE channel_id = ?1 AND holder = ?2"#,
            self.channel_id,
            self.holder,
            self.state,
            self.error,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct Request {
    channel_id: i64,
    at: Option<Millis>,
    now: Millis,
}

impl Write for Request {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            r#"INSERT INTO warm_sessions (channel_id, state, warm_at, updated_at)
               VALUES (?1, 'stopped', ?2, ?3)
               ON CONFLICT (channel_id) DO UPDATE SET warm_at = excluded.warm_at,
                                                      updated_at = excluded.updated_at"#,
            self.channel_id,
            self.at,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct Heartbeat {
    holder: String,
    lease_until: Millis,
}

impl Write for Heartbeat {
    type Output = u64;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!(
            r#"UPDATE warm_sessions SET lease_expires_at = ?2
               WHERE holder = ?1 AND state IN ('starting', 'warm', 'busy')"#,
            self.holder,
            self.lease_until
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected()))
    }
}

/// Rows stay warm (so the next gorp re-warms them) but anyone may take them over.
struct ReleaseLeases {
    holder: String,
    now: Millis,
}

impl Write for ReleaseLeases {
    type Output = u64;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!(
            r#"UPDATE warm_sessions SET lease_expires_at = ?2, pid = NULL, updated_at = ?2
               WHERE holder = ?1 AND state IN ('starting', 'warm', 'busy')"#,
            self.holder,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected()))
    }
}

/// Sessions nobody holds any more and whose keep-alive ran out.
struct ExpireOrphans {
    now: Millis,
}

impl Write for ExpireOrphans {
    type Output = u64;

    async fn apply(&self, conn: &mut Conn) -> Applied<u64> {
        let r = sqlx::query!(
            r#"UPDATE warm_sessions SET state = 'stopped', pid = NULL, updated_at = ?1
               WHERE state IN ('starting', 'warm', 'busy')
                 AND (lease_expires_at IS NULL OR lease_expires_at < ?1)
                 AND expires_at IS NOT NULL AND expires_at <= ?1"#,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected()))
    }
}

struct StopOrphan {
    channel_id: i64,
    holder: Option<String>,
    note: String,
    now: Millis,
}

impl Write for StopOrphan {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"UPDATE warm_sessions
               SET state = 'stopped', error = ?3, pid = NULL, lease_expires_at = NULL,
                   updated_at = ?4
               WHERE channel_id = ?1 AND holder IS ?2
                 AND state IN ('starting', 'warm', 'busy')"#,
            self.channel_id,
            self.holder,
            self.note,
            self.now
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct Take {
    channel_id: i64,
    holder: String,
    dead: Option<String>,
    now: Millis,
    lease_until: Millis,
}

impl Write for Take {
    type Output = bool;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let r = sqlx::query!(
            r#"INSERT INTO warm_sessions (channel_id, holder, state, lease_expires_at, updated_at)
               SELECT ?1, ?2, 'stopped', ?4, ?3
               WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                 WHERE r.channel_id = ?1 AND r.state = 'running'
                                   AND r.lease_owner <> ?2 AND r.lease_owner IS NOT ?5
                                   AND r.lease_expires_at >= ?3)
               ON CONFLICT (channel_id) DO UPDATE
               SET holder = excluded.holder, lease_expires_at = excluded.lease_expires_at,
                   updated_at = excluded.updated_at,
                   state = CASE WHEN holder = excluded.holder THEN state ELSE 'stopped' END,
                   pid = CASE WHEN holder = excluded.holder THEN pid END
               WHERE holder IS NULL OR holder = excluded.holder
                  OR lease_expires_at IS NULL OR lease_expires_at < ?3
                  OR holder = ?5"#,
            self.channel_id,
            self.holder,
            self.now,
            self.lease_until,
            self.dead
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}
