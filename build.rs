//! Names the build in `gorp --version`: the crate's version, the git commit it was built from
//! (with `-dirty` when the tree had changes) and that commit's date; `unknown` outside a git
//! checkout.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    // Rebuild when the checked-out commit moves (only paths that exist: a missing one would
    // rerun this script on every build).
    for p in [".git/HEAD", ".git/index", ".git/refs/heads"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let build = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            let dirty = Command::new("git")
                .args(["diff", "--quiet", "HEAD", "--"])
                .status()
                .map(|s| !s.success())
                .unwrap_or(false);
            let date = git(&["log", "-1", "--format=%cs"]).unwrap_or_default();
            format!(
                "{version} (commit {commit}{}, {date})",
                if dirty { "-dirty" } else { "" }
            )
        }
        None => format!("{version} (commit unknown)"),
    };
    // Not a `GORP_` name: cargo also sets it in the environment of the package's tests, whose
    // `gorp` children would read it as configuration.
    println!("cargo:rustc-env=BUILT_GORP_VERSION={build}");
}
