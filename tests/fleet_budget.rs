//! The fleet budget: what the controller may spend on 50 RecordingCanaries created at once over 5
//! namespaces (8 parallel clients). Counts its API calls from its own `/metrics`
//! (`recording_canary_api_requests_total`), the Events about the canaries from the cluster, and
//! its writes in a 10 s steady state, and fails if a canary ever leaves Ready with no change of its
//! spec (a flap). Needs a cluster (RC_E2E_KUBECONFIG, set by tests/run.sh);
//! fails, never skips, without one. The figures are printed in every failure message;
//! `cargo bench --bench fleet` runs the same driver at larger scale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use testkit::fleet as driver;

use std::time::Duration;

const CANARIES: usize = 50;
const NAMESPACES: usize = 5;
const CLIENTS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(300);
/// Controller API requests per canary to converge (reads and writes, Events not counted).
const CALLS_PER_CANARY: f64 = 15.0;
/// Events per canary to converge.
const EVENTS_PER_CANARY: f64 = 3.0;
/// What was missing is printed with the table.
const SEE_BELOW: &str = " (what was missing is below the table)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_canaries_converge_within_the_call_and_event_budget() {
    let kubeconfig = driver::kubeconfig_from_env().unwrap_or_else(|msg| panic!("{msg}"));
    let mut cfg = driver::FleetConfig::new(kubeconfig, CANARIES, NAMESPACES);
    cfg.clients = CLIENTS;
    cfg.phase_timeout = DEADLINE;
    cfg.tag = "test".into();

    let report = driver::run(cfg).await;
    let table = report.markdown();
    println!("{table}");

    let mut broken = Vec::new();
    if report.phase("converge").is_none() {
        broken.push(format!(
            "the run stopped before the canaries were created: {}",
            report.failure.as_deref().unwrap_or("(no reason recorded)")
        ));
    } else if !report.finished("converge") {
        broken.push(format!(
            "{CANARIES} canaries did not all converge (Ready at {}% with VirtualService weight {}) within {DEADLINE:?}{}",
            driver::START_PERCENT,
            driver::START_PERCENT,
            SEE_BELOW
        ));
    } else {
        if !report.metric_present {
            broken.push(format!(
                "the controller's /metrics has no {}_total{{verb,resource}}: its API calls cannot be counted",
                driver::API_METRIC
            ));
        }
        let calls = report.calls_per_canary("converge");
        if calls > CALLS_PER_CANARY {
            broken.push(format!(
                "the controller made {calls:.2} API calls per canary to converge (Events not counted); the budget is {CALLS_PER_CANARY}"
            ));
        }
        let events = report.events_per_canary("converge");
        if events > EVENTS_PER_CANARY {
            broken.push(format!(
                "{events:.2} Events per canary to converge; the budget is {EVENTS_PER_CANARY}"
            ));
        }
        if !report.finished("ramp") {
            broken.push(format!(
                "the ramp to {}% did not finish within {DEADLINE:?}{}",
                driver::RAMP_PERCENT,
                SEE_BELOW
            ));
        }
        match report.phase("steady") {
            Some(p) if p.writes() > 0 => broken.push(format!(
                "the controller wrote {} times in the {} s steady state ({}); the budget is 0",
                p.writes(),
                report.config.steady.as_secs(),
                p.writes_breakdown()
            )),
            _ => {}
        }
        let flaps: u64 = report.phases.iter().map(|p| p.left_ready).sum();
        if flaps > 0 {
            broken.push(format!(
                "{flaps} time(s) a canary left Ready with no change of its spec (a flap; by phase in the line under the table); the budget is 0"
            ));
        }
        if report.finished("ramp") && !report.finished("rollback") {
            broken.push(format!(
                "the rollback (deleting every RecordingCanary) did not finish within {DEADLINE:?}{}",
                SEE_BELOW
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "the fleet of {CANARIES} canaries broke its budget:\n- {}\n\n{table}",
        broken.join("\n- ")
    );
}
