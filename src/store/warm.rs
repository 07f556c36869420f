//! The warm-session lease table and per-job run facts.

use super::writer::{Op, Write};
use super::*;

/// What a warm-session row should say after an upsert.
#[derive(Debug, Clone)]
pub struct WarmUpdate {
    pub state: &'static str,
    pub pid: Option<i64>,
    pub session: Option<String>,
    pub lease_until: Millis,
    /// New `expires_at` (idle + keep-alive), if it changes.
    pub expires_at: Option<Millis>,
    /// Sets `last_used_at` to now.
    pub used: bool,
}

impl Store {
    pub(super) async fn write(&self, w: Write) -> Result<u64> {
        self.call(|reply| Op::Write { w, reply }).await
    }

    /// Takes (or keeps) the row of a channel for `holder` with the given state.
    pub async fn warm_upsert(
        &self,
        channel_id: i64,
        holder: &str,
        u: WarmUpdate,
        now: Millis,
    ) -> Result<()> {
        self.write(Write::WarmUpsert {
            channel_id,
            holder: holder.to_string(),
            state: u.state,
            pid: u.pid,
            session: u.session,
            now,
            lease_until: u.lease_until,
            expires_at: u.expires_at,
            used: u.used,
        })
        .await
        .map(|_| ())
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
        let state = if failed { "failed" } else { "stopped" };
        self.write(Write::WarmStop {
            channel_id,
            holder: holder.to_string(),
            state,
            error: note,
            now,
        })
        .await
        .map(|n| n == 1)
    }

    /// Asks for the channel's agent to be warm at `at` (`None` clears the request).
    pub async fn warm_request(
        &self,
        channel_id: i64,
        at: Option<Millis>,
        now: Millis,
    ) -> Result<()> {
        self.write(Write::WarmRequest {
            channel_id,
            at,
            now,
        })
        .await
        .map(|_| ())
    }

    /// Renews the leases of every session `holder` keeps.
    pub async fn warm_heartbeat(&self, holder: &str, lease_until: Millis) -> Result<u64> {
        self.write(Write::WarmHeartbeat {
            holder: holder.to_string(),
            lease_until,
        })
        .await
    }

    /// On shutdown: keeps `holder`'s sessions marked warm but lets the next gorp take them over.
    pub async fn warm_release_leases(&self, holder: &str, now: Millis) -> Result<u64> {
        self.write(Write::WarmReleaseLeases {
            holder: holder.to_string(),
            now,
        })
        .await
    }

    /// Marks sessions stopped whose holder is gone and whose keep-alive ran out.
    pub async fn warm_expire_orphans(&self, now: Millis) -> Result<u64> {
        self.write(Write::WarmExpireOrphans { now }).await
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
        self.write(Write::WarmStopOrphan {
            channel_id,
            holder: holder.map(str::to_string),
            note: note.to_string(),
            now,
        })
        .await
        .map(|n| n == 1)
    }

    /// Channels that have queued jobs.
    pub async fn channel_ids_with_queued_jobs(&self) -> Result<std::collections::HashSet<i64>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT channel_id AS "id!" FROM jobs WHERE state = 'queued'"#
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .collect())
    }

    pub async fn warm_list(&self) -> Result<Vec<WarmSession>> {
        Ok(sqlx::query_as!(
            WarmSession,
            r#"SELECT w.channel_id AS "channel_id!", c.name AS channel, w.holder,
                      CASE WHEN w.state = 'warm' AND EXISTS (
                               SELECT 1 FROM jobs j WHERE j.channel_id = w.channel_id AND j.state = 'running')
                           THEN 'busy' ELSE w.state END AS "state!: String",
                      w.acp_session_id, w.pid, w.last_used_at, w.expires_at, w.warm_at,
                      w.lease_expires_at, w.started_at, w.error, w.updated_at
               FROM warm_sessions w JOIN channels c ON c.id = w.channel_id
               ORDER BY c.name"#
        )
        .fetch_all(&self.read)
        .await?)
    }

    pub async fn warm_get(&self, channel_id: i64) -> Result<Option<WarmSession>> {
        Ok(sqlx::query_as!(
            WarmSession,
            r#"SELECT w.channel_id AS "channel_id!", c.name AS channel, w.holder,
                      CASE WHEN w.state = 'warm' AND EXISTS (
                               SELECT 1 FROM jobs j WHERE j.channel_id = w.channel_id AND j.state = 'running')
                           THEN 'busy' ELSE w.state END AS "state!: String",
                      w.acp_session_id, w.pid, w.last_used_at, w.expires_at, w.warm_at,
                      w.lease_expires_at, w.started_at, w.error, w.updated_at
               FROM warm_sessions w JOIN channels c ON c.id = w.channel_id
               WHERE w.channel_id = ?1"#,
            channel_id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    /// Records warm/cold, time to first output and usage for one attempt. Sent in order with
    /// the attempt's outcome, so it commits no later than the outcome.
    pub async fn job_record_run(&self, job_id: &str, attempt: i64, facts: RunFacts) -> Result<()> {
        self.write(Write::JobRecordRun {
            job_id: job_id.to_string(),
            attempt,
            facts,
        })
        .await
        .map(|_| ())
    }

    pub async fn channel_get_by_id(&self, id: i64) -> Result<Option<Channel>> {
        Ok(sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args, permission_policy,
                      matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                      webhook_secret, webhook_template
               FROM channels WHERE id = ?1"#,
            id
        )
        .fetch_optional(&self.read)
        .await?)
    }

    /// Lease owners of running jobs (for finding owners that died on this host).
    pub async fn job_lease_owners(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT lease_owner AS "owner!" FROM jobs WHERE state = 'running'"#
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Expires the leases of `owner`'s running jobs at once (the owner is known to be dead),
    /// so the next rescuer pass re-queues them.
    pub async fn job_expire_owner(&self, owner: &str, now: Millis) -> Result<u64> {
        let owner = owner.to_string();
        self.call(|reply| Op::Write {
            w: Write::JobExpireOwner { owner, now },
            reply,
        })
        .await
    }
}
