//! The kernel sandbox an agent runs in: Landlock rules prepared in gorp and applied in the
//! agent's process just before `exec`, so they bind the agent and every process it starts
//! (shells, compilers, `rm`), whether it writes through ACP or by itself.
//!
//! Under a [`Spec`] with mode `landlock`:
//! - **Writing** (creating, changing, removing, truncating files and directories) is allowed only
//!   beneath [`Spec::writable`] (the channel's workspace, its private temporary directory, the
//!   agent's per-channel home, `extra_writable`) and to a few device files (`/dev/null`,
//!   `/dev/tty`, …).
//! - **Reading and executing** are allowed everywhere except beneath [`Spec::deny_read`] (gorp's
//!   database, config and Matrix store; the other channels' workspaces and homes). Landlock only
//!   grants, so "everything but" is written as grants on every sibling along the way to each
//!   denied path; a directory on that way can be traversed but not listed, and an entry created
//!   there after the agent started is not readable.
//! - **TCP connect** is limited to [`Spec::allowed_ports`] when given (Landlock ABI 4): a port
//!   filter, not a host filter.
//! - **Signals and abstract Unix sockets** of processes outside the sandbox are out of reach
//!   (Landlock ABI 6), so an agent cannot signal gorp.
//! - Landlock also keeps a sandboxed process from tracing (and reading the memory or
//!   environment of) processes outside it.
//!
//! Preparing opens each path and builds the ruleset in gorp; the child only calls
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `landlock_restrict_self` (both async-signal-safe), so
//! nothing allocates between `fork` and `exec`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};
use serde::Serialize;

pub use crate::kinds::SandboxMode;

/// Device files an agent may write to under the sandbox (shells redirect to `/dev/null`, tools
/// open the terminal). Missing ones are skipped.
const WRITABLE_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// The first Landlock ABI that restricts TCP ports.
const NET_ABI: i32 = 4;
/// The first Landlock ABI that scopes signals and abstract Unix sockets.
const SCOPE_ABI: i32 = 6;

/// The Landlock ABI the running kernel supports (0: none).
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI version (or -1 with errno).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    v.max(0) as i32
}

/// What an agent's sandbox should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// `None`: Landlock where the kernel supports it, else no sandbox (with a warning).
    pub mode: Option<SandboxMode>,
    pub writable: Vec<PathBuf>,
    pub deny_read: Vec<PathBuf>,
    /// TCP ports the agent may connect to; `None` leaves the network alone.
    pub allowed_ports: Option<Vec<u16>>,
}

impl Spec {
    /// No sandbox.
    pub fn none() -> Spec {
        Spec {
            mode: Some(SandboxMode::None),
            writable: Vec::new(),
            deny_read: Vec::new(),
            allowed_ports: None,
        }
    }
}

/// The sandbox in force for an agent, as recorded in its `session` event and warm-session row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub mode: SandboxMode,
    /// The kernel's Landlock ABI (0 when it has none).
    pub abi: i32,
    /// Where the agent may write.
    pub writable: Vec<String>,
    /// Where it may not read.
    pub deny_read: Vec<String>,
    /// How many read grants express "everything but `deny_read`".
    pub read_rules: usize,
    /// TCP ports it may connect to (`None`: any).
    pub allowed_ports: Option<Vec<u16>>,
    /// Signals and abstract Unix sockets outside the sandbox are out of reach.
    pub scoped: bool,
    /// Why there is no sandbox, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Report {
    /// One line: `landlock ABI 7: writes 3 paths, 5 paths unreadable, ports 443`.
    pub fn summary(&self) -> String {
        match self.mode {
            SandboxMode::None => match &self.reason {
                Some(r) => format!("none ({r})"),
                None => "none".to_string(),
            },
            SandboxMode::Landlock => format!(
                "landlock ABI {}: writes {} paths, {} unreadable{}",
                self.abi,
                self.writable.len(),
                self.deny_read.len(),
                match &self.allowed_ports {
                    Some(p) => format!(
                        ", TCP connect to ports {}",
                        p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
                    ),
                    None => String::new(),
                }
            ),
        }
    }
}

/// Why a sandbox that was asked for cannot be put in place; the agent is not started.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SandboxError {
    #[error("sandbox = \"landlock\" cannot be enforced: {0}; the agent was not started")]
    Unsupported(String),
    #[error("cannot prepare the Landlock sandbox: {0}; the agent was not started")]
    Prepare(String),
}

/// A ruleset ready to be applied in the agent's process.
#[derive(Debug)]
pub struct Prepared {
    fd: Option<OwnedFd>,
    pub report: Report,
}

impl Prepared {
    /// The raw ruleset fd to apply in the child (`None`: no sandbox).
    pub fn raw_fd(&self) -> Option<i32> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }
}

/// Builds the ruleset `spec` asks for on this kernel.
pub fn prepare(spec: &Spec) -> Result<Prepared, SandboxError> {
    prepare_on(spec, kernel_abi())
}

/// Set once gorp has warned that the default sandbox cannot hold on this kernel.
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// [`prepare`] on a kernel with Landlock ABI `abi` (0: none).
fn prepare_on(spec: &Spec, abi: i32) -> Result<Prepared, SandboxError> {
    let none = |reason: Option<String>| Prepared {
        fd: None,
        report: Report {
            mode: SandboxMode::None,
            abi,
            writable: Vec::new(),
            deny_read: Vec::new(),
            read_rules: 0,
            allowed_ports: None,
            scoped: false,
            reason,
        },
    };
    match spec.mode {
        Some(SandboxMode::None) => return Ok(none(None)),
        None if abi == 0 => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "the kernel does not support Landlock: agents run without a sandbox \
                     (set [acp] sandbox = \"none\" to say so, or \"landlock\" to refuse to run)"
                );
            }
            return Ok(none(Some(
                "the kernel does not support Landlock".to_string(),
            )));
        }
        Some(SandboxMode::Landlock) if abi == 0 => {
            return Err(SandboxError::Unsupported(
                "the kernel does not support Landlock (Linux 5.13 or newer with Landlock enabled)"
                    .into(),
            ))
        }
        _ => {}
    }
    if spec.allowed_ports.is_some() && abi < NET_ABI {
        return Err(SandboxError::Unsupported(format!(
            "allowed_ports needs Landlock ABI {NET_ABI} (Linux 6.7); this kernel has ABI {abi}"
        )));
    }
    build(spec, abi).map_err(|e| SandboxError::Prepare(e.to_string()))
}

fn build(spec: &Spec, abi: i32) -> Result<Prepared, Box<dyn std::error::Error>> {
    let v = ABI::from(abi);
    let all = AccessFs::from_all(v);
    let read = AccessFs::from_read(v);
    let file = AccessFs::from_file(v);
    let writable: Vec<PathBuf> = spec
        .writable
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let deny: Vec<PathBuf> = spec
        .deny_read
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    // A writable path grants reading too: one that holds a denied path would undo the denial.
    if let Some((w, d)) = writable
        .iter()
        .find_map(|w| deny.iter().find(|d| d.starts_with(w)).map(|d| (w, d)))
    {
        return Err(format!(
            "the writable path {} holds {}, which agents may not read; make a directory of its \
             own writable instead",
            w.display(),
            d.display()
        )
        .into());
    }
    let reads = read_grants(&deny);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)?;
    if spec.allowed_ports.is_some() {
        ruleset = ruleset.handle_access(AccessNet::ConnectTcp)?;
    }
    let scoped = abi >= SCOPE_ABI;
    if scoped {
        ruleset = ruleset.scope(Scope::AbstractUnixSocket | Scope::Signal)?;
    }
    let mut created = ruleset.create()?;
    let grant =
        |path: &Path, access| -> Result<Option<PathBeneath<PathFd>>, Box<dyn std::error::Error>> {
            let Ok(meta) = std::fs::metadata(path) else {
                return Ok(None);
            };
            let access = if meta.is_dir() { access } else { access & file };
            Ok(Some(PathBeneath::new(PathFd::new(path)?, access)))
        };
    for p in &reads {
        if let Some(rule) = grant(p, read)? {
            created = created.add_rule(rule)?;
        }
    }
    for p in &writable {
        if let Some(rule) = grant(p, all)? {
            created = created.add_rule(rule)?;
        }
    }
    for dev in WRITABLE_DEVICES {
        if let Some(rule) = grant(Path::new(dev), all)? {
            created = created.add_rule(rule)?;
        }
    }
    if let Some(ports) = &spec.allowed_ports {
        for port in ports {
            created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
        }
    }
    let fd: Option<OwnedFd> = created.into();
    if fd.is_none() {
        return Err("the kernel gave no ruleset".into());
    }
    Ok(Prepared {
        fd,
        report: Report {
            mode: SandboxMode::Landlock,
            abi,
            writable: writable.iter().map(|p| p.display().to_string()).collect(),
            deny_read: deny.iter().map(|p| p.display().to_string()).collect(),
            read_rules: reads.len(),
            allowed_ports: spec.allowed_ports.clone(),
            scoped,
            reason: None,
        },
    })
}

/// Paths whose grants together cover everything readable except the `deny`ed subtrees: every
/// entry of `/` that is not on the way to a denied path, and likewise down each way. Symbolic
/// links are skipped (their targets are covered where they really are), so a link cannot
/// reopen a denied path.
pub fn read_grants(deny: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if deny.is_empty() {
        out.push(PathBuf::from("/"));
        return out;
    }
    cover(Path::new("/"), deny, &mut out);
    out
}

fn cover(dir: &Path, deny: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_type().map(|t| t.is_symlink()).unwrap_or(true) {
            continue;
        }
        if deny.contains(&path) {
            continue;
        }
        if deny.iter().any(|d| d.starts_with(&path)) {
            cover(&path, deny, out);
        } else {
            out.push(path);
        }
    }
}

/// Applies the ruleset `fd` to the calling process. For the child between `fork` and `exec`:
/// only async-signal-safe system calls.
pub fn enter(fd: i32) -> std::io::Result<()> {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_grants_cover_everything_but_the_denied_paths_and_skip_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["a/x", "a/y", "b"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("a/secret.db"), "s").unwrap();
        std::os::unix::fs::symlink(root.join("a/secret.db"), root.join("b/link")).unwrap();
        let grants = read_grants(&[root.join("a/secret.db"), root.join("a/x")]);
        assert!(grants.contains(&root.join("a/y")));
        assert!(grants.contains(&root.join("b")));
        for p in &grants {
            assert!(
                !root.join("a/secret.db").starts_with(p) && !root.join("a/x").starts_with(p),
                "{p:?} would grant a denied path"
            );
        }
        assert!(!grants.contains(&root.join("b/link")));
        assert_eq!(read_grants(&[]), vec![PathBuf::from("/")]);
    }

    /// The kernel enforces the ruleset on a shell and its children.
    #[test]
    fn a_shell_under_the_sandbox_writes_only_where_allowed_and_cannot_read_denied_files() {
        use std::os::unix::process::CommandExt;
        assert!(kernel_abi() > 0, "this machine's kernel has Landlock");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["ws", "out"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("secret.db"), "top secret").unwrap();
        let spec = Spec {
            mode: Some(SandboxMode::Landlock),
            writable: vec![root.join("ws")],
            deny_read: vec![root.join("secret.db")],
            allowed_ports: None,
        };
        let prepared = prepare(&spec).unwrap();
        assert_eq!(prepared.report.mode, SandboxMode::Landlock);
        let fd = prepared.raw_fd().unwrap();
        let script = "echo in > ws/in.txt; echo out > out/out.txt; \
                      sh -c 'echo child > out/child.txt'; cat secret.db; cat ws/in.txt; \
                      echo dev > /dev/null && echo devnull-ok";
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script).current_dir(&root);
        // SAFETY: `enter` makes only async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || enter(fd));
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(root.join("ws/in.txt").exists(), "{stderr}");
        assert!(
            !root.join("out/out.txt").exists(),
            "a write outside was refused"
        );
        assert!(
            !root.join("out/child.txt").exists(),
            "a child is confined too"
        );
        assert!(!stdout.contains("top secret"), "{stdout}");
        assert!(stdout.contains("in\n"), "{stdout}");
        assert!(stdout.contains("devnull-ok"), "{stdout}");
        assert!(stderr.contains("Permission denied"), "{stderr}");
        // gorp itself is not confined.
        std::fs::write(root.join("out/after.txt"), "x").unwrap();
    }

    #[test]
    fn no_sandbox_is_reported_with_its_reason() {
        let p = prepare(&Spec::none()).unwrap();
        assert!(p.raw_fd().is_none());
        assert_eq!(p.report.mode, SandboxMode::None);
        assert_eq!(p.report.summary(), "none");
    }

    #[test]
    fn a_writable_path_that_holds_a_denied_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("gorp.db"), "").unwrap();
        let e = prepare(&Spec {
            mode: Some(SandboxMode::Landlock),
            writable: vec![root.clone()],
            deny_read: vec![root.join("gorp.db")],
            allowed_ports: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("which agents may not read"), "{e}");
    }

    /// On a kernel without Landlock (or too old for the port filter) an explicit sandbox is
    /// refused, never silently dropped; the default falls back to none and says why.
    #[test]
    fn a_sandbox_the_kernel_cannot_enforce_is_refused_unless_it_is_the_default() {
        let spec = |mode, ports: Option<Vec<u16>>| Spec {
            mode,
            writable: vec![],
            deny_read: vec![],
            allowed_ports: ports,
        };
        let e = prepare_on(&spec(Some(SandboxMode::Landlock), None), 0).unwrap_err();
        assert!(e.to_string().contains("does not support Landlock"), "{e}");
        assert!(e.to_string().contains("the agent was not started"), "{e}");
        let p = prepare_on(&spec(None, None), 0).unwrap();
        assert_eq!(p.report.mode, SandboxMode::None);
        assert_eq!(
            p.report.summary(),
            "none (the kernel does not support Landlock)"
        );
        let e = prepare_on(&spec(None, Some(vec![443])), 3).unwrap_err();
        assert!(
            e.to_string().contains("allowed_ports needs Landlock ABI 4"),
            "{e}"
        );
    }
}
