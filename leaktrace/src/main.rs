//! The `leaktrace` binary: parses the command line, runs a session (or compares two reports),
//! maps errors to exit codes.
use std::process::ExitCode;

use clap::Parser as _;
use leaktrace::driver;
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

/// `leaktrace unwind-info`: one JSON line per file with what its unwind table costs.
fn unwind_info(files: &[std::path::PathBuf]) -> ExitCode {
    for path in files {
        let started = std::time::Instant::now();
        match leaktrace::unwind::compile_path(path) {
            Ok(t) => {
                let compile_ms = started.elapsed().as_secs_f64() * 1e3;
                let index = t.page_index().len() * 8;
                let line = serde_json::json!({
                    "path": path, "fdes": t.fdes, "rows": t.rows.len(), "unsupported": t.unsupported,
                    "row_bytes": t.bytes(), "index_bytes": index, "compile_ms": compile_ms,
                });
                println!("{line}");
            }
            Err(e) => {
                eprintln!("leaktrace: error: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `leaktrace diff`: two reports compared, or a one-line error.
fn diff(config: &driver::diff::DiffConfig) -> ExitCode {
    match driver::diff::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            ExitCode::from(e.exit_code().clamp(1, 255) as u8)
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = cli.validate() {
        e.exit();
    }
    let (config, verbose) = match cli.into_action() {
        cli::Action::Trace(config, verbose) => (*config, verbose),
        cli::Action::UnwindInfo(files) => return unwind_info(&files),
        cli::Action::Diff(config) => return diff(&config),
    };
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
    match runtime.block_on(driver::run(config)) {
        Ok(outcome) => ExitCode::from(outcome.exit_code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("leaktrace: error: {e}");
            ExitCode::from(e.exit_code().clamp(1, 255) as u8)
        }
    }
}
