//! The `channels` table: named conversations with one agent, their webhook credentials,
//! Matrix rooms and ACP sessions.

use crate::kinds::{PermissionPolicy, SandboxMode};
use crate::types::{sha256_hex, validate_channel_name, Channel, ChannelUpdate, Millis, NewChannel};
use crate::{PgStore, Result, StoreError};

/// `SELECT` of whole [`Channel`] rows; the rest of the query (`WHERE …`) follows. With
/// `pg_only`, the text starts with `/* pg */` (for a tail without parameters).
macro_rules! select_channels {
    (pg_only $tail:tt) => {
        select_channels!(@query "/* pg */ " + $tail)
    };
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        select_channels!(@query "" + $tail $(, $arg)*)
    };
    (@query $head:literal + $tail:tt $(, $arg:expr)*) => {
        sqlx::query_as!(
            Channel,
            $head + r#"SELECT id, name, webhook_id, agent_binary, agent_args,
                      permission_policy AS "permission_policy: PermissionPolicy",
                      matrix_room_id, acp_session_id, created_at,
                      sandbox AS "sandbox?: SandboxMode", allowed_ports, budget_job_usd,
                      budget_job_tokens, budget_day_usd, budget_month_usd,
                      reply_footer, agent_options, mcp_servers, additional_directories,
                      webhook_token_sha256, webhook_secret, webhook_template
               FROM channels "# + $tail
            $(, $arg)*
        )
    };
}

impl PgStore {
    /// Creates a channel; refused with `ChannelExists` when its name (or room) is taken.
    pub async fn channel_insert(&self, ch: NewChannel, now: Millis) -> Result<Channel> {
        validate_channel_name(&ch.name).map_err(StoreError::Invalid)?;
        let args = ch
            .agent_args
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let ports = ch
            .allowed_ports
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let policy = ch.permission_policy.unwrap_or(PermissionPolicy::Allow);
        let token_hash = ch.webhook_token.as_deref().map(sha256_hex);
        let sandbox = ch.sandbox.map(|s| s.as_str());
        let c = crate::transaction!(self, false, |tx| {
            let webhook_id = uuid::Uuid::new_v4().simple().to_string();
            let c = sqlx::query_as!(
                Channel,
                r#"INSERT INTO channels (name, webhook_id, agent_binary, agent_args,
                                         permission_policy, matrix_room_id, created_at,
                                         webhook_token_sha256, webhook_secret, webhook_template,
                                         sandbox, allowed_ports)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                   RETURNING id, name, webhook_id, agent_binary, agent_args,
                             permission_policy AS "permission_policy: PermissionPolicy",
                             matrix_room_id, acp_session_id, created_at,
                             sandbox AS "sandbox?: SandboxMode", allowed_ports, budget_job_usd,
                             budget_job_tokens, budget_day_usd, budget_month_usd,
                             reply_footer, agent_options, mcp_servers, additional_directories,
                             webhook_token_sha256, webhook_secret, webhook_template"#,
                ch.name,
                webhook_id,
                ch.agent_binary,
                args,
                policy.as_str(),
                ch.matrix_room_id,
                now,
                token_hash,
                ch.webhook_secret,
                ch.webhook_template,
                sandbox,
                ports
            )
            .fetch_one(&mut *tx)
            .await;
            let c = match c {
                Ok(c) => c,
                // Any unique column (name, room, webhook id) taken: as SQLite, the name's.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Err(StoreError::ChannelExists(ch.name.clone()));
                }
                Err(e) => return Err(e.into()),
            };
            Ok(c)
        });
        Ok(c)
    }

    /// The channel named `name`.
    pub async fn channel_get(&self, name: &str) -> Result<Option<Channel>> {
        Ok(select_channels!("WHERE name = $1", name)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The channel with this id.
    pub async fn channel_get_by_id(&self, id: i64) -> Result<Option<Channel>> {
        Ok(select_channels!("WHERE id = $1", id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The channel whose webhook URL carries `webhook_id`.
    pub async fn channel_get_by_webhook_id(&self, webhook_id: &str) -> Result<Option<Channel>> {
        Ok(select_channels!("WHERE webhook_id = $1", webhook_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The channel whose Matrix room this is.
    pub async fn channel_get_by_room(&self, room_id: &str) -> Result<Option<Channel>> {
        Ok(select_channels!("WHERE matrix_room_id = $1", room_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Every channel, by name.
    pub async fn channel_list(&self) -> Result<Vec<Channel>> {
        Ok(select_channels!(pg_only "ORDER BY name")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes a channel and its job history. Refused while one of its jobs is running.
    pub async fn channel_delete(&self, name: &str) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            // The channel row is the lock a claim takes before starting one of its jobs: once
            // it is ours, no job of the channel starts running until this commits, and the
            // check below (a statement of its own, so a fresh snapshot) sees every claim.
            let id =
                sqlx::query_scalar!("SELECT id FROM channels WHERE name = $1 FOR UPDATE", name)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(id) = id else {
                return Err(StoreError::UnknownChannel(name.to_string()));
            };
            let busy = sqlx::query_scalar!(
                r#"SELECT EXISTS(SELECT 1 FROM jobs WHERE channel_id = $1 AND state = 'running')
                   AS "busy!""#,
                id
            )
            .fetch_one(&mut *tx)
            .await?;
            if busy {
                return Err(StoreError::ChannelBusy(name.to_string()));
            }
            sqlx::query!("DELETE FROM channels WHERE id = $1", id)
                .execute(&mut *tx)
                .await?;
            Ok(())
        });
        Ok(())
    }

    /// Stores the ACP session a channel's conversation continues in.
    pub async fn channel_set_acp_session(
        &self,
        channel_id: i64,
        session: Option<String>,
    ) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                "UPDATE channels SET acp_session_id = $2 WHERE id = $1",
                channel_id,
                session
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Links a channel to a Matrix room (or unlinks it).
    pub async fn channel_set_room(&self, channel_id: i64, room_id: Option<String>) -> Result<()> {
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                "UPDATE channels SET matrix_room_id = $2 WHERE id = $1",
                channel_id,
                room_id
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Replaces a channel's own webhook bearer token (only its SHA-256 is stored); the old
    /// token stops working at once.
    pub async fn channel_set_webhook_token(&self, channel_id: i64, token: &str) -> Result<()> {
        let sha256 = sha256_hex(token);
        crate::transaction!(self, false, |tx| {
            sqlx::query!(
                "UPDATE channels SET webhook_token_sha256 = $2 WHERE id = $1",
                channel_id,
                sha256
            )
            .execute(&mut *tx)
            .await?;
            Ok(())
        });
        Ok(())
    }

    /// Sets the channel's permission policy; false when there is no such channel.
    pub async fn channel_set_policy(&self, name: &str, policy: PermissionPolicy) -> Result<bool> {
        let u = ChannelUpdate {
            permission_policy: Some(policy),
            ..ChannelUpdate::default()
        };
        self.channel_update(name, u).await
    }

    /// Applies `u` to the channel in one statement; false when there is no such channel.
    pub async fn channel_update(&self, name: &str, u: ChannelUpdate) -> Result<bool> {
        // For each override: whether to set it, and to what (NULL: the config's).
        let policy = u.permission_policy.map(|p| p.as_str());
        let (set_sandbox, sandbox) = (u.sandbox.is_some(), u.sandbox.flatten().map(|s| s.as_str()));
        let (set_ports, ports) = (u.allowed_ports.is_some(), u.allowed_ports.clone().flatten());
        let (set_usd, usd) = (u.budget_job_usd.is_some(), u.budget_job_usd.flatten());
        let (set_tokens, tokens) = (u.budget_job_tokens.is_some(), u.budget_job_tokens.flatten());
        let (set_day, day) = (u.budget_day_usd.is_some(), u.budget_day_usd.flatten());
        let (set_month, month) = (u.budget_month_usd.is_some(), u.budget_month_usd.flatten());
        // Wakes the workers: a raised budget can release held jobs.
        let found = crate::transaction!(self, true, |tx| {
            let r = sqlx::query!(
                r#"UPDATE channels
                   SET permission_policy = coalesce($2::text, permission_policy),
                       sandbox = CASE WHEN $3::boolean THEN $4::text ELSE sandbox END,
                       allowed_ports = CASE WHEN $5::boolean THEN $6::text ELSE allowed_ports END,
                       budget_job_usd = CASE WHEN $7::boolean THEN $8::double precision
                                             ELSE budget_job_usd END,
                       budget_job_tokens = CASE WHEN $9::boolean THEN $10::bigint
                                                ELSE budget_job_tokens END,
                       budget_day_usd = CASE WHEN $11::boolean THEN $12::double precision
                                             ELSE budget_day_usd END,
                       budget_month_usd = CASE WHEN $13::boolean THEN $14::double precision
                                               ELSE budget_month_usd END,
                       reply_footer = coalesce($15::boolean, reply_footer),
                       agent_options = coalesce($16::text, agent_options),
                       mcp_servers = coalesce($17::text, mcp_servers),
                       additional_directories = coalesce($18::text, additional_directories)
                   WHERE name = $1"#,
                name,
                policy,
                set_sandbox,
                sandbox,
                set_ports,
                ports,
                set_usd,
                usd,
                set_tokens,
                tokens,
                set_day,
                day,
                set_month,
                month,
                u.reply_footer,
                u.agent_options,
                u.mcp_servers,
                u.additional_directories
            )
            .execute(&mut *tx)
            .await?;
            Ok(r.rows_affected() == 1)
        });
        Ok(found)
    }
}
