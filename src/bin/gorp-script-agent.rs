//! `gorp-script-agent`: an ACP agent over stdio whose behaviour is scripted by
//! prompt directives. See `gorp::acp::script_agent` for the directive syntax.

use gorp::acp::script_agent::{run_stdio, ScriptAgentConfig};

fn main() -> anyhow::Result<()> {
    let config = match ScriptAgentConfig::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    // One thread is plenty for a scripted agent, and keeps many warm agents cheap.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(run_stdio(config))
        .map_err(|e| anyhow::anyhow!("ACP connection failed: {e}"))
}
