//! The agent's file-system requests (`fs/read_text_file`, `fs/write_text_file`), confined to
//! the channel's workspace; see "File-system confinement" in the parent module.

use super::*;

impl Shared {
    pub(super) async fn deny(
        &self,
        session: &str,
        op: &str,
        path: &Path,
        reason: String,
    ) -> agent_client_protocol::Error {
        self.emit(
            session,
            AgentEvent::new(
                EventKind::FsDenied.as_str(),
                Some(reason.clone()),
                json!({ "op": op, "path": path.display().to_string(), "reason": reason }),
            ),
        )
        .await;
        agent_client_protocol::Error::new(
            ErrorCode::INVALID_PARAMS,
            format!("access denied: {reason}"),
        )
    }

    pub(super) async fn fs_failed(
        &self,
        session: &str,
        op: &str,
        path: &Path,
        resolved: &Path,
        err: std::io::Error,
    ) -> agent_client_protocol::Error {
        let code = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorCode::RESOURCE_NOT_FOUND
        } else {
            ErrorCode::INTERNAL_ERROR
        };
        let message = format!("{op} {}: {err}", path.display());
        self.emit(
            session,
            AgentEvent::new(
                EventKind::FsError.as_str(),
                Some(message.clone()),
                json!({
                    "op": op,
                    "path": path.display().to_string(),
                    "resolved": resolved.display().to_string(),
                    "error": err.to_string(),
                }),
            ),
        )
        .await;
        agent_client_protocol::Error::new(code, message)
    }

    pub(super) async fn fs_read(
        &self,
        req: &ReadTextFileRequest,
    ) -> Result<ReadTextFileResponse, agent_client_protocol::Error> {
        let session = req.session_id.0.to_string();
        let resolved = match confine(&self.fs_root, &req.path) {
            Ok(r) => r,
            Err(reason) => return Err(self.deny(&session, "read", &req.path, reason).await),
        };
        let content = match tokio::fs::read_to_string(&resolved).await {
            Ok(c) => c,
            Err(e) => {
                return Err(self
                    .fs_failed(&session, "read", &req.path, &resolved, e)
                    .await)
            }
        };
        let content = select_lines(&content, req.line, req.limit);
        self.emit(
            &session,
            AgentEvent::new(
                EventKind::FsRead.as_str(),
                Some(req.path.display().to_string()),
                json!({
                    "path": req.path.display().to_string(),
                    "resolved": resolved.display().to_string(),
                    "bytes": content.len(),
                    "line": req.line,
                    "limit": req.limit,
                }),
            ),
        )
        .await;
        Ok(ReadTextFileResponse::new(content))
    }

    pub(super) async fn fs_write(
        &self,
        req: &WriteTextFileRequest,
    ) -> Result<WriteTextFileResponse, agent_client_protocol::Error> {
        let session = req.session_id.0.to_string();
        let resolved = match confine(&self.fs_root, &req.path) {
            Ok(r) => r,
            Err(reason) => return Err(self.deny(&session, "write", &req.path, reason).await),
        };
        let result = async {
            if let Some(parent) = resolved.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::write(&resolved, req.content.as_bytes()).await
        }
        .await;
        if let Err(e) = result {
            return Err(self
                .fs_failed(&session, "write", &req.path, &resolved, e)
                .await);
        }
        self.emit(
            &session,
            AgentEvent::new(
                EventKind::FsWrite.as_str(),
                Some(req.path.display().to_string()),
                json!({
                    "path": req.path.display().to_string(),
                    "resolved": resolved.display().to_string(),
                    "bytes": req.content.len(),
                }),
            ),
        )
        .await;
        Ok(WriteTextFileResponse::new())
    }
}

/// Applies the 1-based `line` start and `limit` line count of a read request.
pub(super) fn select_lines(content: &str, line: Option<u32>, limit: Option<u32>) -> String {
    if line.is_none() && limit.is_none() {
        return content.to_string();
    }
    let skip = line.map(|l| l.saturating_sub(1) as usize).unwrap_or(0);
    let take = limit.map(|l| l as usize).unwrap_or(usize::MAX);
    content
        .split_inclusive('\n')
        .skip(skip)
        .take(take)
        .collect()
}

/// Resolves `requested` inside the canonical directory `root`, or says why
/// not. See the module docs for the rules.
pub fn confine(root: &Path, requested: &Path) -> Result<PathBuf, String> {
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(format!("{} contains '..'", requested.display()));
    }
    let joined = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    // Split into the deepest existing ancestor and the missing tail.
    let mut existing = joined.as_path();
    let mut missing: Vec<std::ffi::OsString> = Vec::new();
    while std::fs::symlink_metadata(existing).is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return Err(format!("{} has no existing ancestor", joined.display())),
        }
    }
    let canonical = existing
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", existing.display()))?;
    if !canonical.starts_with(root) {
        return Err(format!(
            "{} resolves to {}, outside {}",
            requested.display(),
            canonical.display(),
            root.display()
        ));
    }
    let mut resolved = canonical;
    for name in missing.iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}
