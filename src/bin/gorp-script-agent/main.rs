//! `gorp-script-agent`: an ACP agent over stdio whose behaviour is scripted by
//! prompt directives (see `script.rs` for the directive syntax). The test suite, the soak and
//! the benchmarks drive gorp with it; it is not part of the library.

mod script;

use script::{run_stdio, ScriptAgentConfig};

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
