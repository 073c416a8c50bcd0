//! The `leaktrace` binary: parses the command line, runs a session, maps errors to exit codes.
use std::process::ExitCode;

use clap::Parser as _;
use leaktrace::session;
use tracing_subscriber::EnvFilter;

mod cli;

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("LEAKTRACE_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let (config, verbose) = cli::Cli::parse().into_session();
    init_logging(verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leaktrace: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(session::run(config)) {
        Ok(outcome) => ExitCode::from(outcome.exit_code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            ExitCode::from(e.exit_code().clamp(1, 255) as u8)
        }
    }
}
