//! `leaktrace agent`: the node agent.
use std::{net::SocketAddr, time::Duration};

use clap::Args;
use leaktrace::driver::{AgentConfig, SessionConfig, Target};
use leaktrace_common::features;

use super::{CommonArgs, Kind, parse_duration};

/// Watch every process on the node: growth (the pages each stack keeps), descriptors, temp
/// files and OOM kills everywhere, with tracepoints and no traps; exact heap tracing for the
/// processes --full selects and the --full-auto steepest growers. Reports are served over
/// HTTP (--listen) and written to --output every --interval; the final one when stopped
/// (SIGTERM, SIGINT, --duration).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Trace these processes' heap exactly: pid=N, comm=NAME, exe=PATH, cgroup=PATH or
    /// container=ID-PREFIX. Repeatable.
    #[arg(long, value_name = "SELECTOR")]
    pub full: Vec<leaktrace::driver::Selector>,

    /// Also trace exactly, at most N at a time, the processes whose growth is steepest and
    /// steady over --promote-window; each for --promote-budget.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub full_auto: usize,

    /// How long growth must be steady to promote a process.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub promote_window: Duration,

    /// How long a promoted process is traced exactly before it is demoted.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub promote_budget: Duration,

    /// Serve /metrics, /debug/pprof/heap, /folded, /report.json and /healthz here.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,

    /// Serve nothing over HTTP.
    #[arg(long, conflicts_with = "listen")]
    pub no_listen: bool,

    /// Keep at most this many outstanding blocks of the processes traced exactly (~30 B
    /// each); allocations past it are counted as lost (`heap_table_full`).
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_heap_blocks: usize,

    /// Keep at most this many grown pages node-wide (~30 B each; a huge page, or a fault
    /// that made several resident, counts once: the default follows 4 GiB of growth or
    /// more); pages past it are counted as lost (`growth_table_full`).
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_growth_pages: usize,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl AgentArgs {
    /// The agent's session.
    pub fn session(&self) -> SessionConfig {
        let target = Target::Node(AgentConfig {
            full: self.full.clone(),
            full_auto: self.full_auto,
            window: self.promote_window,
            budget: self.promote_budget,
            listen: (!self.no_listen).then_some(self.listen),
            max_heap_blocks: self.max_heap_blocks,
            max_growth_pages: self.max_growth_pages,
        });
        let mut config = self.common.session(target);
        // Growth everywhere (tier 1), the heap where selected (tier 2).
        config.heap = self.common.traces(Kind::Heap);
        if config.heap {
            config.features |= features::GROWTH;
        }
        config.features |= features::NODE;
        config.report.growth_mode = false;
        // A node holds thousands of stacks: reports keep the top ones unless told otherwise.
        let top = self.common.top.map_or(50, |n| n as usize);
        config.report.top = Some(top);
        // Symbolizing every stack of every process costs seconds: only the heaviest.
        config.report.row_limit = Some(top.saturating_mul(4).max(200));
        config
    }
}
