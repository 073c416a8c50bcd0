//! `leaktrace run`: start a command and trace it from its first allocation.
use clap::Args;

use std::ffi::OsString;

use super::CommonArgs;

/// Start CMD and trace it from its first allocation, before main. Reports what it still holds
/// when it exits ("in use at exit") and exits with CMD's status. With --format json or folded
/// and no --output, CMD's standard output is sent to standard error so that standard output
/// carries only the report.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Also trace the processes CMD forks (and theirs), from their first instruction.
    #[arg(long)]
    pub follow_forks: bool,

    /// Also report the OOM kills of processes outside what is traced, anywhere on the node
    /// (as --pid and the agent always do). By default only the traced processes' kills are
    /// printed, logged (--oom-log) and reported.
    #[arg(long)]
    pub oom_all: bool,

    #[command(flatten)]
    pub common: CommonArgs,

    /// The command and its arguments.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub cmd: Vec<OsString>,
}
