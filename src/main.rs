use clap::Parser;

fn main() {
    let cli = gorp::cli::Cli::parse();
    if !matches!(
        cli.command,
        gorp::cli::Command::Start | gorp::cli::Command::Doctor
    ) {
        // A command whose output goes to a program that exits early (`gorp jobs | head`) ends
        // quietly, as other command-line tools do, instead of failing on a broken pipe. The
        // server keeps SIGPIPE ignored: a closed socket is an error to handle, not a reason to
        // die; so does doctor, which writes to agents that may have exited (`/bin/false`).
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = gorp::logging::init() {
        eprintln!("gorp: {e}");
        std::process::exit(gorp::cli::EXIT_USAGE);
    }
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
