//! Benchmark: N RecordingCanaries created at once over M namespaces. Prints, per phase (converge,
//! ramp, 10 s steady state, rollback), the wall time against the floor (N plain Deployments
//! Ready), the controller's API calls and Events per canary, its writes in the steady state, its
//! RSS and CPU; the ramp's patch → route weights (p50 to max) beside a naive watcher's in the
//! same ramp; then its calls by verb and resource to converge, and the apiserver's requests by
//! verb. Asserts nothing but that every phase finished and that no canary flapped (left Ready
//! with no change of its spec). See testkit/src/fleet.rs.
//!
//!   RC_E2E_KUBECONFIG=<kubeconfig> cargo bench --bench fleet
//!
//! Env: RC_FLEET_CANARIES (default 100), RC_FLEET_NAMESPACES (default 10), RC_FLEET_CLIENTS
//! (default 16), RC_FLEET_TIMEOUT_SECS (default 900, per phase), RC_FLEET_ROLLBACK_TIMEOUT_SECS
//! (the rollback's own, if set: the report then says how far it got), RC_FLEET_REPLICAS (replicas per
//! target; default 2, 1 from 1000 canaries on), RC_FLEET_CLUSTER_WIDE=1 (run the controller
//! without --namespace), RC_FLEET_SHARDS (default 1: one process, no leader election; N > 1: N
//! processes with `--leader-elect=true --shards N` and the same scope, each leading one shard
//! Lease, reported one by one and summed), RC_FLEET_FLOOR=apps (take the floor from the apps' own
//! 1-replica Deployments, created first and alone, instead of a separate floor run and its
//! cleanup; needs RC_FLEET_REPLICAS=1, the default from 1000 canaries on), RC_FLEET_ROUTER
//! (`istio`, the default: VirtualService weights; `gateway`: `router: GatewayAPI`, each app with an
//! HTTPRoute that has its Service as parent, the driver playing the mesh that accepts the routes),
//! RC_FLEET_NAIVE (canaries of the naive watcher beside the fleet, default min(N, 50); 0: none;
//! none either with RC_FLEET_CLUSTER_WIDE=1), RC_FLEET_RUST_LOG (more directives for the
//! controller's log, e.g. `recording_canary::controller=debug`). Progress goes to stderr, the
//! Markdown tables to stdout.
//! The namespaces `rc-fleet-<run>-<j>` are deleted at the end; the controllers' logs stay in
//! target/fleet-logs/.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use testkit::fleet as driver;

use std::time::Duration;

#[tokio::main]
async fn main() {
    let kubeconfig = match driver::kubeconfig_from_env() {
        Ok(k) => k,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let canaries = driver::env_usize("RC_FLEET_CANARIES", 100);
    let namespaces = driver::env_usize("RC_FLEET_NAMESPACES", 10);
    let mut cfg = driver::FleetConfig::new(kubeconfig, canaries, namespaces);
    cfg.clients = driver::env_usize("RC_FLEET_CLIENTS", 16).max(1);
    cfg.phase_timeout = Duration::from_secs(driver::env_usize("RC_FLEET_TIMEOUT_SECS", 900) as u64);
    cfg.rollback_timeout = std::env::var("RC_FLEET_ROLLBACK_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    cfg.replicas = driver::env_usize("RC_FLEET_REPLICAS", cfg.replicas as usize) as i32;
    cfg.shards = driver::env_usize("RC_FLEET_SHARDS", 1).max(1);
    cfg.floor_from_apps = match std::env::var("RC_FLEET_FLOOR").as_deref() {
        Err(_) | Ok("" | "separate") => false,
        Ok("apps") => true,
        Ok(other) => {
            eprintln!("RC_FLEET_FLOOR={other}: expected `separate` (the default) or `apps`");
            std::process::exit(2);
        }
    };
    cfg.router = match driver::Router::parse(&std::env::var("RC_FLEET_ROUTER").unwrap_or_default())
    {
        Some(r) => r,
        None => {
            eprintln!("RC_FLEET_ROUTER: expected `istio` (the default) or `gateway`");
            std::process::exit(2);
        }
    };
    cfg.naive = driver::env_usize("RC_FLEET_NAIVE", cfg.naive);
    cfg.tag = match cfg.router {
        driver::Router::Istio => "bench",
        driver::Router::GatewayApi => "bench-gateway",
    }
    .into();

    let report = driver::run(cfg).await;
    println!("{}", report.markdown());

    let mut problems = Vec::new();
    if let Some(f) = &report.failure {
        problems.push(f.clone());
    }
    for phase in ["converge", "ramp", "steady", "rollback"] {
        if !report.finished(phase) {
            problems.push(format!("phase {phase} did not finish"));
        }
    }
    let flaps: u64 = report.phases.iter().map(|p| p.left_ready).sum();
    if flaps > 0 {
        problems.push(format!(
            "{flaps} time(s) a canary left Ready with no change of its spec (flaps)"
        ));
    }
    if !report.metric_present {
        eprintln!(
            "fleet: WARNING: the controller does not expose {}_total; its call counts were not measured",
            driver::API_METRIC
        );
    }
    if !problems.is_empty() {
        eprintln!("fleet: FAILED:\n  {}", problems.join("\n  "));
        std::process::exit(1);
    }
}
