//! The channel commands: `!create`, `!join`, `!list`, `!delete` and `!token`. A channel is a
//! row, a workspace directory and (usually) an encrypted private room the bot made.

use anyhow::Context;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset};
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::{OwnedRoomId, RoomId, UserId};

use super::super::failure::{refuse, Answer, Failure};
use super::super::strings;
use super::Ctx;
use crate::service::channels;

/// `!create <name>`: an encrypted private room, the workspace directory and the channel row.
/// The webhook token is posted only in the new room, once the sender has joined it.
pub(super) async fn create(cx: &Ctx<'_>, name: &str) -> Answer {
    let s = cx.bot.services();
    if s.store.channel_get(name).await?.is_some() {
        return Err(refuse(strings::channel_exists(name)));
    }
    let rid = create_room(cx, name, cx.sender).await?;
    let created = channels::create(
        &s.store,
        &s.config,
        channels::NewChannelSpec {
            name: name.to_string(),
            matrix_room_id: Some(rid.to_string()),
            ..Default::default()
        },
    )
    .await;
    let (ch, dir, token) = match created {
        Ok(c) => (c.channel, c.workspace, c.webhook_token),
        Err(e) => {
            if let Some(r) = cx.bot.client().get_room(&rid) {
                let _ = r.leave().await;
            }
            return Err(match e {
                channels::ChannelError::Store(e) => e.into(),
                e => anyhow::Error::from(e).into(),
            });
        }
    };
    let url = webhook_url(cx, &ch.webhook_id);
    let key = (rid.clone(), cx.sender.to_owned());
    cx.bot.expect_welcome(
        key.clone(),
        strings::welcome(name, &dir.display(), &url, &token),
    );
    // The join may have been synced already: then post now (whoever takes it posts it).
    if let Some(r) = cx.bot.client().get_room(&rid) {
        let joined = r
            .get_member_no_sync(cx.sender)
            .await
            .ok()
            .flatten()
            .is_some_and(|m| *m.membership() == MembershipState::Join);
        let pending = joined.then(|| cx.bot.take_welcome(&key)).flatten();
        tracing::debug!(room = %rid, joined, posting = pending.is_some(), "welcome registered");
        if let Some(text) = pending {
            cx.bot.say(&r, &text).await;
        }
    }
    Ok(strings::channel_created(
        name,
        &strings::room_link(&rid),
        &url,
    ))
}

/// `!join <name>`: an invitation to the channel's room (made now when it has none).
pub(super) async fn join(cx: &Ctx<'_>, name: &str) -> Answer {
    let store = cx.store();
    let ch = store
        .channel_get(name)
        .await?
        .ok_or_else(|| refuse(strings::no_channel(name)))?;
    let Some(rid) = &ch.matrix_room_id else {
        let rid = create_room(cx, name, cx.sender).await?;
        store.channel_set_room(ch.id, Some(rid.to_string())).await?;
        return Ok(strings::room_created_for(name, &strings::room_link(&rid)));
    };
    let rid = RoomId::parse(rid.as_str())?;
    let link = strings::room_link(&rid);
    let target = cx
        .bot
        .client()
        .get_room(&rid)
        .ok_or_else(|| refuse(strings::not_in_channel_room(name)))?;
    let member = target.get_member_no_sync(cx.sender).await?;
    if member.is_some_and(|m| {
        matches!(
            m.membership(),
            MembershipState::Join | MembershipState::Invite
        )
    }) {
        Ok(strings::already_in_room(name, &link))
    } else {
        target.invite_user_by_id(cx.sender).await?;
        Ok(strings::invited(name, &link))
    }
}

/// `!list`: every channel with its room and queue depth.
pub(super) async fn list(cx: &Ctx<'_>) -> Answer {
    let store = cx.store();
    let list = store.channel_list().await?;
    if list.is_empty() {
        return Ok(strings::NO_CHANNELS.into());
    }
    let mut out = String::from(strings::CHANNELS_HEADER);
    for c in list {
        let depth = store.channel_queue_depth(c.id).await?;
        out.push_str(&strings::channel_line(
            &c.name,
            c.matrix_room_id.as_deref(),
            depth,
        ));
    }
    Ok(out)
}

/// `!delete <name>`: removes the channel and its jobs; the bot leaves its room (another room
/// is told first; this very room is left by the dispatcher after the answer).
pub(super) async fn delete(cx: &Ctx<'_>, name: &str) -> Answer {
    let store = cx.store();
    let ch = store
        .channel_get(name)
        .await?
        .ok_or_else(|| refuse(strings::no_channel(name)))?;
    channels::delete(store, name).await?;
    let dir = cx.config().channel_dir(name);
    if let Some(rid) = ch
        .matrix_room_id
        .as_deref()
        .and_then(|r| RoomId::parse(r).ok())
    {
        if rid != cx.room.room_id() {
            if let Some(r) = cx.bot.client().get_room(&rid) {
                cx.bot.say(&r, &strings::channel_deleted_notice(name)).await;
                let _ = r.leave().await;
            }
        }
    }
    Ok(strings::channel_deleted(name, &dir.display()))
}

/// `!token`: a new webhook token for the room's channel, posted only in an encrypted room.
pub(super) async fn token(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    // A secret is only ever posted where the homeserver cannot read it.
    if !cx.room.latest_encryption_state().await?.is_encrypted() {
        return Err(refuse(strings::TOKEN_NEEDS_ENCRYPTION));
    }
    let (ch, token) = channels::rotate_token(cx.store(), &ch.name).await?;
    Ok(strings::new_token(
        &ch.name,
        &webhook_url(cx, &ch.webhook_id),
        &token,
    ))
}

fn webhook_url(cx: &Ctx<'_>, webhook_id: &str) -> String {
    format!("{}/webhook/session/{webhook_id}", cx.config().public_url())
}

/// A new encrypted private room for channel `name`, inviting `invite`.
async fn create_room(cx: &Ctx<'_>, name: &str, invite: &UserId) -> Result<OwnedRoomId, Failure> {
    let mut req = CreateRoom::new();
    req.name = Some(strings::room_name(name));
    req.topic = Some(strings::room_topic(name));
    req.preset = Some(RoomPreset::PrivateChat);
    req.invite = vec![invite.to_owned()];
    req.initial_state = vec![InitialStateEvent::with_empty_state_key(
        RoomEncryptionEventContent::with_recommended_defaults(),
    )
    .to_raw_any()];
    let room = cx
        .bot
        .client()
        .create_room(req)
        .await
        .context("cannot create the room")?;
    Ok(room.room_id().to_owned())
}

/// `!options`.
pub(super) async fn options(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    let view = crate::service::channels::options_view(cx.store(), &ch).await?;
    Ok(strings::options_view(&view))
}

/// `!model` / `!mode`: shows the option, or sets it (checked against what the agent offers;
/// nothing is written when it is refused), or with `default` stops setting it.
pub(super) async fn set_option(cx: &Ctx<'_>, key: &str, set: Option<Option<String>>) -> Answer {
    let ch = cx.room_channel().await?;
    let mut options = ch.options();
    let Some(value) = set else {
        let view = crate::service::channels::options_view(cx.store(), &ch).await?;
        let offered = view.offered.iter().flatten().find(|o| o.is_named(key));
        let current = offered.map(|o| o.current.clone());
        let set = offered
            .and_then(|o| view.set_for(o))
            .or_else(|| options.get(key).map(String::as_str))
            .map(str::to_string);
        return Ok(strings::option_is(
            &ch.name,
            key,
            set.as_deref(),
            current.as_deref(),
        ));
    };
    match &value {
        Some(v) => {
            options.insert(key.to_string(), v.clone());
        }
        None => {
            options.remove(key);
        }
    }
    let changes = crate::service::channels::Changes {
        options: Some(options),
        ..Default::default()
    };
    crate::service::channels::update(cx.store(), &ch.name, changes).await?;
    tracing::info!(channel = %ch.name, option = key, value = ?value, by = %cx.sender, "channel option set");
    Ok(strings::option_set(&ch.name, key, value.as_deref()))
}
