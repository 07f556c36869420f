//! Instance identity: who holds a job's lease or a warm session. One id per process start,
//! `host:pid:random`, so a holder on this host that no longer runs can be told apart from one
//! that is merely slow, and its leases taken over at once.

use std::fmt;
use std::str::FromStr;

/// The id of one gorp process start.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceId {
    host: String,
    pid: u32,
    nonce: String,
}

impl InstanceId {
    /// A new id for this process: this host, this pid, 8 random hex digits.
    pub fn new() -> Self {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        InstanceId {
            host: hostname(),
            pid: std::process::id(),
            nonce: nonce[..8].to_string(),
        }
    }

    /// The host this process runs on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// This process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when the id names a process on this host that no longer exists. False for this
    /// process, for another host (gorp cannot tell) and for a process that still runs.
    pub fn is_dead_on_this_host(&self) -> bool {
        if self.host != hostname() || self.pid == 0 || self.pid == std::process::id() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host, self.pid, self.nonce)
    }
}

impl FromStr for InstanceId {
    type Err = String;

    /// Parses `host:pid:nonce` (what [`fmt::Display`] writes).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid instance id {s:?}; expected host:pid:nonce");
        let mut parts = s.rsplitn(3, ':');
        let (Some(nonce), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let pid = pid.parse::<u32>().map_err(|_| bad())?;
        if host.is_empty() || nonce.is_empty() {
            return Err(bad());
        }
        Ok(InstanceId {
            host: host.to_string(),
            pid,
            nonce: nonce.to_string(),
        })
    }
}

/// True when `holder` (a stored lease owner) is an instance id of a dead process on this
/// host. A holder that is not an instance id (a test's worker name) is never dead.
pub fn holder_is_dead(holder: &str) -> bool {
    holder
        .parse::<InstanceId>()
        .is_ok_and(|id| id.is_dead_on_this_host())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_only_a_gone_local_process_is_dead() {
        let me = InstanceId::new();
        assert_eq!(me.to_string().parse::<InstanceId>(), Ok(me.clone()));
        assert!(!me.is_dead_on_this_host(), "this process is alive");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = format!("{}:{pid}:abcd1234", hostname());
        assert!(holder_is_dead(&gone));
        assert!(!holder_is_dead(&format!("elsewhere:{pid}:abcd1234")));
        assert!(!holder_is_dead("worker-1"));
        assert!("a:b".parse::<InstanceId>().is_err());
    }
}
