use clap::Parser;

fn main() {
    let cli = gorp::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("GORP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gorp: cannot start the async runtime: {e}");
            std::process::exit(gorp::cli::EXIT_ERROR);
        }
    };
    let code = runtime.block_on(gorp::cli::run(cli));
    drop(runtime);
    std::process::exit(code);
}
