//! The `channels` table: named conversations with one agent, their webhook credentials,
//! Matrix rooms and ACP sessions.

use super::writer::{Applied, Conn, Write};
use super::*;
use crate::auth::sha256_hex;

/// `SELECT` of whole [`Channel`] rows; the rest of the query (`WHERE …`) follows.
macro_rules! select_channels {
    ($tail:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Channel,
            r#"SELECT id AS "id!", name, webhook_id, agent_binary, agent_args,
                      permission_policy AS "permission_policy: PermissionPolicy",
                      matrix_room_id, acp_session_id, created_at,
                      sandbox AS "sandbox?: SandboxMode", allowed_ports, budget_job_usd,
                      budget_job_tokens, budget_day_usd, budget_month_usd,
                      reply_footer AS "reply_footer: bool", agent_options, mcp_servers,
                      additional_directories,
                      webhook_token_sha256, webhook_secret, webhook_template
               FROM channels "# + $tail
            $(, $arg)*
        )
    };
}

impl Store {
    pub async fn channel_insert(&self, ch: NewChannel, now: Millis) -> Result<Channel> {
        if let Some(pg) = &self.pg {
            return pg.channel_insert(ch, now).await;
        }
        validate_channel_name(&ch.name).map_err(StoreError::Invalid)?;
        let name = ch.name.clone();
        match self.write(Insert { ch, now }).await {
            Err(e) if e.is_unique_violation() => Err(StoreError::ChannelExists(name)),
            other => other,
        }
    }

    pub async fn channel_get(&self, name: &str) -> Result<Option<Channel>> {
        if let Some(pg) = &self.pg {
            return pg.channel_get(name).await;
        }
        Ok(select_channels!("WHERE name = ?1", name)
            .fetch_optional(&self.read)
            .await?)
    }

    pub async fn channel_get_by_id(&self, id: i64) -> Result<Option<Channel>> {
        if let Some(pg) = &self.pg {
            return pg.channel_get_by_id(id).await;
        }
        Ok(select_channels!("WHERE id = ?1", id)
            .fetch_optional(&self.read)
            .await?)
    }

    pub async fn channel_get_by_webhook_id(&self, webhook_id: &str) -> Result<Option<Channel>> {
        if let Some(pg) = &self.pg {
            return pg.channel_get_by_webhook_id(webhook_id).await;
        }
        Ok(select_channels!("WHERE webhook_id = ?1", webhook_id)
            .fetch_optional(&self.read)
            .await?)
    }

    /// The channel whose Matrix room this is.
    pub async fn channel_get_by_room(&self, room_id: &str) -> Result<Option<Channel>> {
        if let Some(pg) = &self.pg {
            return pg.channel_get_by_room(room_id).await;
        }
        Ok(select_channels!("WHERE matrix_room_id = ?1", room_id)
            .fetch_optional(&self.read)
            .await?)
    }

    pub async fn channel_list(&self) -> Result<Vec<Channel>> {
        if let Some(pg) = &self.pg {
            return pg.channel_list().await;
        }
        Ok(select_channels!("ORDER BY name")
            .fetch_all(&self.read)
            .await?)
    }

    /// Deletes a channel and its job history. Refused while one of its jobs is running.
    pub async fn channel_delete(&self, name: &str) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.channel_delete(name).await;
        }
        self.write(Delete {
            name: name.to_string(),
        })
        .await
    }

    /// Stores the ACP session a channel's conversation continues in.
    pub async fn channel_set_acp_session(
        &self,
        channel_id: i64,
        session: Option<String>,
    ) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.channel_set_acp_session(channel_id, session).await;
        }
        self.write(SetSession {
            channel_id,
            session,
        })
        .await
    }

    /// Links a channel to a Matrix room (or unlinks it).
    pub async fn channel_set_room(&self, channel_id: i64, room_id: Option<String>) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.channel_set_room(channel_id, room_id).await;
        }
        self.write(SetRoom {
            channel_id,
            room_id,
        })
        .await
    }

    /// Replaces a channel's own webhook bearer token (only its SHA-256 is stored); the old
    /// token stops working at once.
    pub async fn channel_set_webhook_token(&self, channel_id: i64, token: &str) -> Result<()> {
        if let Some(pg) = &self.pg {
            return pg.channel_set_webhook_token(channel_id, token).await;
        }
        self.write(SetToken {
            channel_id,
            sha256: sha256_hex(token),
        })
        .await
    }

    /// Sets the channel's permission policy; false when there is no such channel.
    pub async fn channel_set_policy(&self, name: &str, policy: PermissionPolicy) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.channel_set_policy(name, policy).await;
        }
        let u = ChannelUpdate {
            permission_policy: Some(policy),
            ..ChannelUpdate::default()
        };
        self.channel_update(name, u).await
    }

    /// Applies `u` to the channel in one statement; false when there is no such channel.
    pub async fn channel_update(&self, name: &str, u: ChannelUpdate) -> Result<bool> {
        if let Some(pg) = &self.pg {
            return pg.channel_update(name, u).await;
        }
        self.write(Update {
            name: name.to_string(),
            u,
        })
        .await
    }
}

struct Update {
    name: String,
    u: ChannelUpdate,
}

impl Write for Update {
    type Output = bool;
    /// A raised budget can release held jobs.
    const WAKES_WORKERS: bool = true;

    async fn apply(&self, conn: &mut Conn) -> Applied<bool> {
        let u = &self.u;
        // For each override: whether to set it, and to what (NULL: the config's).
        let (set_sandbox, sandbox) = (u.sandbox.is_some(), u.sandbox.flatten());
        let (set_ports, ports) = (u.allowed_ports.is_some(), u.allowed_ports.clone().flatten());
        let (set_usd, usd) = (u.budget_job_usd.is_some(), u.budget_job_usd.flatten());
        let (set_tokens, tokens) = (u.budget_job_tokens.is_some(), u.budget_job_tokens.flatten());
        let (set_day, day) = (u.budget_day_usd.is_some(), u.budget_day_usd.flatten());
        let (set_month, month) = (u.budget_month_usd.is_some(), u.budget_month_usd.flatten());
        let r = sqlx::query!(
            r#"UPDATE channels
               SET permission_policy = coalesce(?2, permission_policy),
                   sandbox = CASE WHEN ?3 THEN ?4 ELSE sandbox END,
                   allowed_ports = CASE WHEN ?5 THEN ?6 ELSE allowed_ports END,
                   budget_job_usd = CASE WHEN ?7 THEN ?8 ELSE budget_job_usd END,
                   budget_job_tokens = CASE WHEN ?9 THEN ?10 ELSE budget_job_tokens END,
                   budget_day_usd = CASE WHEN ?11 THEN ?12 ELSE budget_day_usd END,
                   budget_month_usd = CASE WHEN ?13 THEN ?14 ELSE budget_month_usd END,
                   reply_footer = coalesce(?15, reply_footer),
                   agent_options = coalesce(?16, agent_options),
                   mcp_servers = coalesce(?17, mcp_servers),
                   additional_directories = coalesce(?18, additional_directories)
               WHERE name = ?1"#,
            self.name,
            u.permission_policy,
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
        .execute(&mut *conn)
        .await?;
        Ok(Ok(r.rows_affected() == 1))
    }
}

struct Insert {
    ch: NewChannel,
    now: Millis,
}

impl Write for Insert {
    type Output = Channel;

    async fn apply(&self, conn: &mut Conn) -> Applied<Channel> {
        let ch = &self.ch;
        let webhook_id = uuid::Uuid::new_v4().simple().to_string();
        let args = ch
            .agent_args
            .as_ref()
            .map(|a| serde_json::to_string(a).expect("strings serialise"));
        let policy = ch.permission_policy.unwrap_or(PermissionPolicy::Allow);
        let token_hash = ch.webhook_token.as_deref().map(sha256_hex);
        let ports = ch
            .allowed_ports
            .as_ref()
            .map(|p| serde_json::to_string(p).expect("ports serialise"));
        let c = sqlx::query_as!(
            Channel,
            r#"INSERT INTO channels (name, webhook_id, agent_binary, agent_args, permission_policy,
                                     matrix_room_id, created_at, webhook_token_sha256,
                                     webhook_secret, webhook_template, sandbox, allowed_ports)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
               RETURNING id AS "id!", name, webhook_id, agent_binary, agent_args,
                         permission_policy AS "permission_policy: PermissionPolicy",
                         matrix_room_id, acp_session_id, created_at,
                         sandbox AS "sandbox?: SandboxMode", allowed_ports, budget_job_usd,
                         budget_job_tokens, budget_day_usd, budget_month_usd,
                         reply_footer AS "reply_footer: bool", agent_options, mcp_servers,
                         additional_directories,
                         webhook_token_sha256, webhook_secret, webhook_template"#,
            ch.name,
            webhook_id,
            ch.agent_binary,
            args,
            policy,
            ch.matrix_room_id,
            self.now,
            token_hash,
            ch.webhook_secret,
            ch.webhook_template,
            ch.sandbox,
            ports
        )
        .fetch_one(&mut *conn)
        .await;
        match c {
            Ok(c) => Ok(Ok(c)),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Ok(Err(StoreError::ChannelExists(ch.name.clone())))
            }
            Err(e) => Err(e),
        }
    }
}

struct Delete {
    name: String,
}

impl Write for Delete {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        let name = &self.name;
        let busy = sqlx::query_scalar!(
            r#"SELECT EXISTS(SELECT 1 FROM jobs j JOIN channels c ON c.id = j.channel_id
                             WHERE c.name = ?1 AND j.state = 'running') AS "busy!: bool""#,
            name
        )
        .fetch_one(&mut *conn)
        .await?;
        if busy {
            return Ok(Err(StoreError::ChannelBusy(name.clone())));
        }
        let r = sqlx::query!("DELETE FROM channels WHERE name = ?1", name)
            .execute(&mut *conn)
            .await?;
        Ok(if r.rows_affected() == 0 {
            Err(StoreError::UnknownChannel(name.clone()))
        } else {
            Ok(())
        })
    }
}

struct SetSession {
    channel_id: i64,
    session: Option<String>,
}

impl Write for SetSession {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            "UPDATE channels SET acp_session_id = ?2 WHERE id = ?1",
            self.channel_id,
            self.session
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct SetRoom {
    channel_id: i64,
    room_id: Option<String>,
}

impl Write for SetRoom {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            "UPDATE channels SET matrix_room_id = ?2 WHERE id = ?1",
            self.channel_id,
            self.room_id
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}

struct SetToken {
    channel_id: i64,
    sha256: String,
}

impl Write for SetToken {
    type Output = ();

    async fn apply(&self, conn: &mut Conn) -> Applied<()> {
        sqlx::query!(
            "UPDATE channels SET webhook_token_sha256 = ?2 WHERE id = ?1",
            self.channel_id,
            self.sha256
        )
        .execute(&mut *conn)
        .await?;
        Ok(Ok(()))
    }
}
