//! The fleet budget: what the controller may spend on 50 RecordingCanaries created at once over 5
//! namespaces (8 parallel clients). Counts its API calls from its own `/metrics`
//! (`recording_canary_api_requests_total`), the Events about the canaries from the cluster, and
//! its writes in a 10 s steady state, and fails if a canary ever leaves Ready with no change of its
//! spec (a flap). Once with Istio's VirtualServices, once with the Gateway API router (each app
//! with an HTTPRoute that has its Service as parent; the driver plays the mesh that accepts the
//! routes, and its status writes are not the controller's): the same budgets for both. The two
//! fleets take turns on the cluster. Needs a cluster (RC_E2E_KUBECONFIG, set by tests/run.sh);
//! fails, never skips, without one. The figures are printed in every failure message;
//! `cargo bench --bench fleet` runs the same driver at larger scale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use testkit::fleet as driver;

use std::time::Duration;

use tokio::sync::Mutex;

const CANARIES: usize = 50;
const NAMESPACES: usize = 5;
const CLIENTS: usize = 8;
const NAIVE: usize = 10;
const DEADLINE: Duration = Duration::from_secs(300);
/// Controller API requests per canary to converge (reads and writes, Events not counted).
const CALLS_PER_CANARY: f64 = 15.0;
/// Events per canary to converge.
const EVENTS_PER_CANARY: f64 = 3.0;
/// What was missing is printed with the table.
const SEE_BELOW: &str = " (what was missing is below the table)";

/// One fleet on the cluster at a time: each test's figures and times are its own fleet's.
static CLUSTER: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_canaries_converge_within_the_call_and_event_budget() {
    fleet_within_budget(driver::Router::Istio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_canaries_with_the_gateway_api_router_converge_within_the_same_budget() {
    fleet_within_budget(driver::Router::GatewayApi).await;
}

async fn fleet_within_budget(router: driver::Router) {
    let kubeconfig = driver::kubeconfig_from_env().unwrap_or_else(|msg| panic!("{msg}"));
    let mut cfg = driver::FleetConfig::new(kubeconfig, CANARIES, NAMESPACES);
    cfg.clients = CLIENTS;
    cfg.phase_timeout = DEADLINE;
    cfg.router = router;
    // A few canaries of the naive watcher: its comparison runs, cheaply (nothing is asserted of it).
    cfg.naive = NAIVE;
    cfg.tag = match router {
        driver::Router::Istio => "test",
        driver::Router::GatewayApi => "test-gateway",
    }
    .into();
    let route = match router {
        driver::Router::Istio => "VirtualService weight",
        driver::Router::GatewayApi => "the HTTPRoute's share of every rule",
    };

    let report = {
        let _turn = CLUSTER.lock().await;
        driver::run(cfg).await
    };
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
            "{CANARIES} canaries did not all converge (Ready at {}% with {route} {}) within {DEADLINE:?}{}",
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
        "the fleet of {CANARIES} canaries ({router:?} router) broke its budget:\n- {}\n\n{table}",
        broken.join("\n- ")
    );
}
