//! Logs: where they go (stderr), what passes (`GORP_LOG`, else `RUST_LOG`, else
//! [`DEFAULT_FILTER`]) and in which form (`GORP_LOG_FORMAT`: `text`, the default, or `json`,
//! one object per line with the fields of every open span, so all lines of one job can be
//! found by its `job` field).

use tracing_subscriber::EnvFilter;

/// What is logged when neither `GORP_LOG` nor `RUST_LOG` says otherwise: gorp at `info`,
/// `sqlx` at `warn`, and the Matrix library's expected noise left out.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// The form of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// Reads `GORP_LOG_FORMAT` (`text` or `json`; unset or empty is `text`).
    pub fn parse(value: Option<&str>) -> Result<Format, String> {
        match value.map(str::trim) {
            None | Some("") | Some("text") => Ok(Format::Text),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(format!(
                "invalid GORP_LOG_FORMAT {other:?}; expected text or json"
            )),
        }
    }
}

/// The filter from `GORP_LOG` or `RUST_LOG` (the first that is set), else the default. A
/// filter that does not parse is an error naming its variable.
pub fn filter(gorp_log: Option<&str>, rust_log: Option<&str>) -> Result<EnvFilter, String> {
    let (var, value) = match (gorp_log, rust_log) {
        (Some(v), _) => ("GORP_LOG", v),
        (None, Some(v)) => ("RUST_LOG", v),
        (None, None) => {
            return Ok(EnvFilter::new(crate::matrix::log_filter(DEFAULT_FILTER)));
        }
    };
    EnvFilter::try_new(value).map_err(|e| format!("invalid {var} {value:?}: {e}"))
}

/// Installs the process's logger from the environment.
pub fn init() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).ok();
    let format = Format::parse(var("GORP_LOG_FORMAT").as_deref())?;
    let filter = filter(var("GORP_LOG").as_deref(), var("RUST_LOG").as_deref())?;
    // Colours only on a terminal (and never with NO_COLOR): the journal and log files get
    // plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_filter_come_from_the_environment_or_fail_clearly() {
        assert_eq!(Format::parse(None), Ok(Format::Text));
        assert_eq!(Format::parse(Some("json")), Ok(Format::Json));
        assert!(Format::parse(Some("xml"))
            .unwrap_err()
            .contains("text or json"));
        assert!(
            filter(Some("gorp=debug"), Some("[")).is_ok(),
            "GORP_LOG wins"
        );
        let e = filter(None, Some("gorp=[")).unwrap_err();
        assert!(e.contains("RUST_LOG"), "{e}");
        let default = filter(None, None).unwrap().to_string();
        assert!(
            default.contains("sqlx=warn") && default.contains("matrix_sdk"),
            "{default}"
        );
    }
}
