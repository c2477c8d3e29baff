//! How long a run will take, printed at the start: the measured time of each scenario from
//! its settings, plus what starting, settling and stopping a target costs. The per-run costs
//! are rough figures from short runs on a 2-core machine (each run's line on stdout shows its
//! time, to check them against); the estimate is a guide, not a limit. Building smartproxy
//! and installing the peers come on top.

use super::{
    scenario::{heartbeat, idle, Direction, Params, Scenario},
    target::Target,
};

/// Starting a proxy, waiting until it answers, waiting until it is idle after the scenario,
/// and stopping it (the eBPF programs load in this time).
const PROXY_OVERHEAD_SECS: f64 = 0.3;
/// The same for direct: only the TCP counters and the pause between runs.
const DIRECT_OVERHEAD_SECS: f64 = 0.1;
/// Bulk throughput assumed for the estimate (the slower targets are around 10 Gbit/s).
const BULK_BITS_PER_SEC: f64 = 10e9;
/// Echo connections opened one after another per second (idle, upgrade).
const OPENS_PER_SEC: f64 = 8_000.0;

/// The scenarios × targets × runs of one invocation.
pub struct Plan {
    secs: f64,
}

impl Plan {
    pub fn new(scenarios: &[Scenario], targets: &[Target], runs: u32, p: &Params) -> Self {
        let mut secs = 0.0;
        for &scenario in scenarios {
            for &target in targets.iter().filter(|t| scenario.applies_to(**t)) {
                let overhead = if target == Target::Direct {
                    DIRECT_OVERHEAD_SECS
                } else {
                    PROXY_OVERHEAD_SECS
                };
                secs += f64::from(runs) * (overhead + scenario_secs(scenario, p));
            }
        }
        Self { secs }
    }

    pub fn show(&self) -> String {
        show_secs(self.secs)
    }

    #[cfg(test)]
    pub fn secs(&self) -> f64 {
        self.secs
    }
}

/// The time one run of `scenario` takes, start to end of its load.
fn scenario_secs(scenario: Scenario, p: &Params) -> f64 {
    match scenario {
        Scenario::Bulk { direction, .. } => {
            let ways = if direction == Direction::BothWays {
                2.0
            } else {
                1.0
            };
            ways * p.bulk_bytes as f64 * 8.0 / BULK_BITS_PER_SEC + 0.1
        }
        // The 200 ms start delay, opening the connections, and the measured time.
        Scenario::Rr { conns, .. } => 0.3 + conns as f64 / OPENS_PER_SEC + p.rr_secs as f64,
        Scenario::Churn { .. } => p.churn_secs as f64 + 0.1,
        // A settling pause of 1 s before, the opens, the pause until the second reading,
        // the closes. Paced: a pause after each batch.
        Scenario::Idle { paced } => {
            let pauses = if paced { idle::pauses(p.idle_conns) } else { 0 };
            1.2 + idle::SETTLED.as_secs_f64()
                + p.idle_conns as f64 / OPENS_PER_SEC
                + pauses as f64 * idle::BATCH_PAUSE.as_secs_f64()
        }
        // A settling pause before, the opens, the warm-up and the measured window.
        Scenario::Heartbeat => {
            idle::SETTLE.as_secs_f64()
                + p.idle_conns as f64 / OPENS_PER_SEC
                + (heartbeat::WARM_UP + heartbeat::MEASURED).as_secs_f64()
        }
        Scenario::SlowReader => p.slow_secs as f64 + 0.5,
        // Opens, 1 s warm-up, the command (guessed at 1 s), 2 s after, an echo on each.
        Scenario::Upgrade => 4.0 + 2.0 * p.upgrade_conns as f64 / OPENS_PER_SEC,
    }
}

/// `12 min 30 s`, `45 s`.
pub fn show_secs(secs: f64) -> String {
    let secs = secs.round() as u64;
    if secs >= 60 {
        format!("{} min {} s", secs / 60, secs % 60)
    } else {
        format!("{secs} s")
    }
}
