//! The `warm_sessions` table: which channel's agent is warm, who holds it, until when.

use crate::types::{Millis, WarmSession, WarmState, WarmUpdate};
use crate::{PgStore, Result};

/// `SELECT` of whole [`WarmSession`] rows (`w`, with its channel `c`; a warm session whose
/// channel has a running job shows as `busy`); the rest of the query follows. `/* pg */` keeps
/// the parameterless form's text apart from SQLite's.
macro_rules! select_warm {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            WarmSession,
            r#"/* pg */ SELECT w.channel_id AS "channel_id!", c.name AS "channel!", w.holder,
                      CASE WHEN w.state = 'warm' AND EXISTS (
                               SELECT 1 FROM jobs j
                               WHERE j.channel_id = w.channel_id AND j.state = 'running')
                           THEN 'busy' ELSE w.state END AS "state!: WarmState",
                      w.acp_session_id, w.pid, w.last_used_at, w.expires_at, w.warm_at,
                      w.lease_expires_at, w.started_at, w.error, w.sandbox, w.agent_info,
                      w.updated_at
               FROM warm_sessions w JOIN channels c ON c.id = w.channel_id "# + $tail
            $(, $arg)*
        )
    };
}

impl PgStore {
    /// Takes (or keeps) the row of a channel for `holder` with the given state.
    pub async fn warm_upsert(
        &self,
        channel_id: i64,
        holder: &str,
        u: WarmUpdate,
        now: Millis,
    ) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"INSERT INTO warm_sessions AS w (channel_id, holder, state, pid, acp_session_id,
                                                   lease_expires_at, expires_at, started_at,
                                                   last_used_at, updated_at, sandbox, agent_info)
                   VALUES ($1, $2, $3, $4, $5, $7, $8, $6, CASE WHEN $9::boolean THEN $6::bigint END, $6,
                           $10, $11)
                   ON CONFLICT (channel_id) DO UPDATE SET
                       holder = excluded.holder,
                       state = excluded.state,
                       pid = excluded.pid,
                       acp_session_id = coalesce(excluded.acp_session_id, w.acp_session_id),
                       lease_expires_at = excluded.lease_expires_at,
                       expires_at = coalesce(excluded.expires_at, w.expires_at),
                       started_at = CASE WHEN excluded.state = 'starting' THEN excluded.started_at
                                         ELSE w.started_at END,
                       last_used_at = coalesce(excluded.last_used_at, w.last_used_at),
                       sandbox = coalesce(excluded.sandbox, w.sandbox),
                       agent_info = coalesce(excluded.agent_info, w.agent_info),
                       error = NULL,
                       updated_at = excluded.updated_at"#,
                channel_id,
                holder,
                u.state.as_str(),
                u.pid,
                u.session.as_deref(),
                now,
                u.lease_until,
                u.expires_at,
                u.used,
                u.sandbox.as_deref(),
                u.agent_info.as_deref()
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
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
        let taken = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"INSERT INTO warm_sessions AS w (channel_id, holder, state, lease_expires_at,
                                                   updated_at)
                   SELECT $1, $2, 'stopped', $4, $3
                   WHERE NOT EXISTS (SELECT 1 FROM jobs r
                                     WHERE r.channel_id = $1 AND r.state = 'running'
                                       AND r.lease_owner <> $2
                                       AND r.lease_owner IS DISTINCT FROM $5::text
                                       AND r.lease_expires_at >= $3)
                   ON CONFLICT (channel_id) DO UPDATE
                   SET holder = excluded.holder, lease_expires_at = excluded.lease_expires_at,
                       updated_at = excluded.updated_at,
                       state = CASE WHEN w.holder = excluded.holder THEN w.state
                                    ELSE 'stopped' END,
                       pid = CASE WHEN w.holder = excluded.holder THEN w.pid END
                   WHERE w.holder IS NULL OR w.holder = excluded.holder
                      OR w.lease_expires_at IS NULL OR w.lease_expires_at < $3
                      OR w.holder = $5::text"#,
                channel_id,
                holder,
                now,
                lease_until,
                dead
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(taken)
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
        let state = if failed {
            WarmState::Failed
        } else {
            WarmState::Stopped
        };
        let stopped = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE warm_sessions
                   SET state = $3, error = $4, pid = NULL, lease_expires_at = NULL,
                       updated_at = $5
                   WHERE channel_id = $1 AND holder = $2"#,
                channel_id,
                holder,
                state.as_str(),
                note.as_deref(),
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(stopped)
    }

    /// Asks for the channel's agent to be warm at `at` (`None` clears the request).
    pub async fn warm_request(
        &self,
        channel_id: i64,
        at: Option<Millis>,
        now: Millis,
    ) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                r#"INSERT INTO warm_sessions (channel_id, state, warm_at, updated_at)
                   VALUES ($1, 'stopped', $2, $3)
                   ON CONFLICT (channel_id) DO UPDATE SET warm_at = excluded.warm_at,
                                                          updated_at = excluded.updated_at"#,
                channel_id,
                at,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Renews the leases of every session `holder` keeps.
    pub async fn warm_heartbeat(&self, holder: &str, lease_until: Millis) -> Result<u64> {
        let n = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE warm_sessions SET lease_expires_at = $2
                   WHERE holder = $1 AND state IN ('starting', 'warm', 'busy')"#,
                holder,
                lease_until
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected())
        });
        Ok(n)
    }

    /// On shutdown: keeps `holder`'s sessions marked warm but lets the next gorp take them over.
    pub async fn warm_release_leases(&self, holder: &str, now: Millis) -> Result<u64> {
        let n = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE warm_sessions SET lease_expires_at = $2, pid = NULL, updated_at = $2
                   WHERE holder = $1 AND state IN ('starting', 'warm', 'busy')"#,
                holder,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected())
        });
        Ok(n)
    }

    /// Marks sessions stopped whose holder is gone and whose keep-alive ran out.
    pub async fn warm_expire_orphans(&self, now: Millis) -> Result<u64> {
        let n = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE warm_sessions SET state = 'stopped', pid = NULL, updated_at = $1
                   WHERE state IN ('starting', 'warm', 'busy')
                     AND (lease_expires_at IS NULL OR lease_expires_at < $1)
                     AND expires_at IS NOT NULL AND expires_at <= $1"#,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected())
        });
        Ok(n)
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
        let stopped = crate::transaction!(self, false, |tx| {
            let r = sqlx::query!(
                r#"UPDATE warm_sessions
                   SET state = 'stopped', error = $3, pid = NULL, lease_expires_at = NULL,
                       updated_at = $4
                   WHERE channel_id = $1 AND holder IS NOT DISTINCT FROM $2::text
                     AND state IN ('starting', 'warm', 'busy')"#,
                channel_id,
                holder,
                note,
                now
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(stopped)
    }

    pub async fn warm_list(&self) -> Result<Vec<WarmSession>> {
        Ok(select_warm!("ORDER BY c.name")
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn warm_get(&self, channel_id: i64) -> Result<Option<WarmSession>> {
        Ok(select_warm!("WHERE w.channel_id = $1", channel_id)
            .fetch_optional(&self.pool)
            .await?)
    }
}
