//! The agent's process group: how it ended, and whether any member still lives.

use super::*;

pub(super) fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => format!("{s}"),
        },
        Err(e) => format!("unknown exit status: {e}"),
    }
}

/// Whether process group `group` still has a member that is not a zombie.
/// Zombies count as gone: an orphaned member is reparented to init (or to
/// a subreaper, possibly this process) and may stay unreaped.
pub(super) fn group_alive(group: i32) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    if unsafe { libc::killpg(group, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    match std::fs::read_dir("/proc") {
        Ok(entries) => entries
            .flatten()
            .any(|entry| live_member_of(&entry.path().join("stat"), group)),
        Err(_) => true,
    }
}

/// Whether the `/proc/<pid>/stat` file at `stat` names a live (not zombie or
/// dead) process in process group `group`.
fn live_member_of(stat: &Path, group: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return false;
    };
    stat_is_live_member(&text, group)
}

/// Parses the fields after the `comm` field of a `/proc/<pid>/stat` line:
/// `state ppid pgrp ...`.
pub(super) fn stat_is_live_member(stat: &str, group: i32) -> bool {
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("Z");
    let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
    pgrp == Some(group) && !matches!(state, "Z" | "X" | "x")
}
