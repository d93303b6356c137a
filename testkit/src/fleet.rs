//! The fleet driver, shared by the benchmark `cargo bench --bench fleet` (benches/fleet.rs) and
//! the CI test tests/fleet_budget.rs: N RecordingCanaries created at once over M namespaces, and
//! what the controller spends on them.
//!
//! Phases, each bounded by a deadline; every wait is driven by watches, never by bare sleeps:
//!
//! 1. **floor**: N plain Deployments (1 replica) until all are Ready, without the controller: what
//!    the cluster itself needs for that many rollouts. They are then deleted, pods included.
//! 2. **apps**: for each canary `app-i` a Deployment and a Service, until every Deployment is
//!    Ready (the users' apps run before anyone applies a canary to them; not timed as converge).
//!
//!    With `floor_from_apps` (`RC_FLEET_FLOOR=apps`, 1 replica per target), 1 and 2 are one: the
//!    apps' Deployments are created first, alone and without the controller, which is the
//!    floor's procedure, and timed as the floor; then their Services, until each has an
//!    EndpointSlice with its Ready endpoints; then the controller starts.
//! 3. **converge**: a RecordingCanary at 10 % for each app, all at once, until every canary is
//!    `Ready` at `currentPercent` 10 and its VirtualService `app-i-recording` routes 10 to subset
//!    `rcanary-recording`.
//! 4. **ramp**: every canary patched to 20 %, until all are Ready at 20 with VirtualService weight 20.
//!
//!    With the Gateway API router ([`Router::GatewayApi`]) each app also has an HTTPRoute `app-i`
//!    with its Service as parent (GAMMA; one rule, or two for odd i), created with the Service, and
//!    no VirtualService; the canaries say `router: GatewayAPI`; a canary has converged when it is
//!    Ready at the percent and every rule of `app-i` gives Service `app-i-recording` exactly that
//!    share of its weight. The driver plays the mesh: a watch of the fleet's HTTPRoutes writes,
//!    for every route whose `status.parents` is not for its current generation, `Accepted` and
//!    `ResolvedRefs` True for each parentRef (as Istio or another GAMMA mesh would). Those status
//!    writes are the driver's: they are counted apart (`mesh writes`), not in the controller's
//!    calls. The controller's two Services per canary take cluster IPs, so the driver adds a
//!    ServiceCIDR for the run (the local control plane's own range has 254 addresses).
//!
//!    The ramp also times each canary's **patch → route weights**: from just before the driver's
//!    PATCH of `spec.percent` to the watch event of its route with the new weights (the route's
//!    spec, as benches/side_by_side.rs times it; not the mesh's acceptance). Beside the fleet, a
//!    **naive watcher** (what benches/naive_watcher.py does, in Rust: per canary, a watch of the
//!    RecordingCanary and, on each event, a GET of its route and a PUT with the weights; no
//!    cache) serves K more canaries (`naive`, default min(N, 50)) in a namespace of its own,
//!    outside the controller's scope, each with its own route (a VirtualService, or an HTTPRoute
//!    the mesh accepts too). Their patches are interleaved with the fleet's in the same ramp, and
//!    timed the same way: the two p99s come from the same run, under the same load. (Not with
//!    `cluster_wide`: the controller would take those canaries too.)
//! 5. **steady**: 10 s without any change; the controller should write nothing.
//! 6. **rollback**: every RecordingCanary deleted, until all are gone and so are their clones.
//!
//! Measured per phase: wall time; the controller's API requests by verb and resource, from its
//! `/metrics` (`recording_canary_api_requests_total`); the Events about RecordingCanaries, from the
//! cluster; `apiserver_request_total` by verb (every client, for context); the controller's RSS,
//! peak RSS and CPU time from /proc. Lease requests (leader election) are counted apart.
//!
//! With `shards` N > 1, N controller processes run with `--leader-elect=true --shards N` and the
//! same scope; the driver waits until each leads one shard Lease (kept in the first fleet
//! namespace), reports each process's figures and their sums, and prints how many namespaces and
//! canaries each shard got.
//!
//! The driver asserts nothing: a phase that does not finish is recorded as unfinished (with what
//! was still missing) and the later phases are skipped. The namespaces are always deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GetParams, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Request;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource};
use recording_canary::api::labels::backend_service_names;
use recording_canary::gateway::http_route_resource;
use recording_canary::gateway::status::accepted_for_current_generation;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::support::random_suffix;

/// Label on every fleet namespace.
pub const PART_OF: &str = "recording-canary-fleet";
/// Label on the fleet's namespaces, floor pods and canaries: the run id.
const RUN_LABEL: &str = "rc-fleet-run";
/// Label on the floor Deployments' pods (value: the run id).
const FLOOR_LABEL: &str = "rc-fleet-floor";
const RECORDING_SUBSET: &str = "rcanary-recording";
/// The controller's request counter (OpenMetrics adds `_total` to a counter's samples).
pub const API_METRIC: &str = "recording_canary_api_requests";
/// Verbs that write.
pub const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
/// Weight at creation, and after the ramp.
pub const START_PERCENT: i64 = 10;
pub const RAMP_PERCENT: i64 = 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long the namespaces may take to go at the end (not a failure of the run when exceeded).
const NAMESPACE_CLEANUP: Duration = Duration::from_secs(300);
/// The naive watcher's canaries by default (at most).
const NAIVE_DEFAULT: usize = 50;
/// The ServiceCIDR a Gateway API run adds: 65,534 addresses, two per canary.
const FLEET_SERVICE_CIDR: &str = "10.128.0.0/16";
/// The mesh's status writes in flight at once: as many as the controller's requests
/// (`--max-concurrent-reconciles`), so that the mesh accepts routes as fast as the controller
/// writes them. With 8, under the ramp's burst it accepted about 50 routes a second while the
/// controller wrote about 100, and routes it had not accepted `propagationDelay` after their
/// write made their canaries say `WaitingForRouteAccepted` for a moment, as they should.
const MESH_PARALLEL: usize = 32;
/// What the mesh writes as its `controllerName` in route status.
const MESH_CONTROLLER: &str = "fleet.recordingcanary.dev/mesh";

/// What to run.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub kubeconfig: PathBuf,
    /// Number of RecordingCanaries (and of target Deployments, Services, floor Deployments).
    pub canaries: usize,
    /// Number of namespaces they are spread over (canary i goes to namespace i mod M).
    pub namespaces: usize,
    /// Parallel clients (each its own kube Client, so its own connections) for creates, patches, deletes.
    pub clients: usize,
    /// Replicas of each target Deployment.
    pub replicas: i32,
    /// Deadline of each phase (floor, converge, ramp, rollback).
    pub phase_timeout: Duration,
    /// Deadline of the rollback, when it should differ: a run that stops waiting reports how
    /// far the rollback got, with the controller's calls and memory until then.
    pub rollback_timeout: Option<Duration>,
    /// Length of the steady-state window.
    pub steady: Duration,
    /// Run the controller cluster-wide instead of with one `--namespace` per fleet namespace.
    pub cluster_wide: bool,
    /// Controller processes. 1: one process, `--leader-elect=false`. N > 1: N processes with
    /// `--leader-elect=true --shards N` and the same scope (cluster-wide or the same
    /// `--namespace` list), each leading one shard Lease; the run id (which names the fleet
    /// namespaces) is picked so that the namespaces split between the shards as evenly as the
    /// hash allows.
    pub shards: usize,
    /// Take the floor from the apps' own Deployments (`RC_FLEET_FLOOR=apps`): they are created
    /// first, alone (no Service, no controller), in a fresh fleet, which is the floor's own
    /// procedure; their Services follow, then the controller. This saves the separate floor and
    /// its cleanup (about an hour at 10,000 canaries at the default rates). Needs 1 replica per
    /// target.
    pub floor_from_apps: bool,
    /// Goes into the log file's name (`bench`, `test`).
    pub tag: String,
    /// How the canaries split traffic (`spec.router`), and so which routes the driver creates,
    /// reads and accepts.
    pub router: Router,
    /// Canaries of the naive watcher, beside the fleet (0: none; ignored with `cluster_wide`).
    pub naive: usize,
}

/// The router the fleet's canaries use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Router {
    /// Istio's VirtualService weights between DestinationRule subsets; the canaries leave
    /// `spec.router` unset (Auto, which is Istio here: no HTTPRoute has the Service as parent).
    #[default]
    Istio,
    /// `router: GatewayAPI`: HTTPRoute weights between the canary's two Services; each app has an
    /// HTTPRoute with its Service as parent, and the driver plays the mesh that accepts routes.
    GatewayApi,
}

impl Router {
    /// `istio` or `gateway` (`RC_FLEET_ROUTER`); None for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "istio" => Some(Self::Istio),
            "gateway" | "gatewayapi" | "gateway-api" => Some(Self::GatewayApi),
            _ => None,
        }
    }

    /// The kind of route whose weights the driver reads.
    fn route_kind(self) -> &'static str {
        match self {
            Self::Istio => "VirtualService",
            Self::GatewayApi => "HTTPRoute",
        }
    }
}

impl FleetConfig {
    /// Defaults: 16 clients, 2 replicas per target (1 from 1000 canaries on), 900 s per phase,
    /// a 10 s steady state, the controller scoped to the fleet namespaces unless
    /// `RC_FLEET_CLUSTER_WIDE=1`.
    pub fn new(kubeconfig: PathBuf, canaries: usize, namespaces: usize) -> Self {
        Self {
            kubeconfig,
            canaries,
            namespaces: namespaces.max(1),
            clients: 16,
            replicas: if canaries >= 1000 { 1 } else { 2 },
            phase_timeout: Duration::from_secs(900),
            rollback_timeout: None,
            steady: Duration::from_secs(10),
            cluster_wide: env_flag("RC_FLEET_CLUSTER_WIDE"),
            shards: 1,
            floor_from_apps: false,
            tag: "fleet".into(),
            router: Router::Istio,
            naive: canaries.min(NAIVE_DEFAULT),
        }
    }
}

/// `RC_E2E_KUBECONFIG`, or a message saying how to get a cluster.
pub fn kubeconfig_from_env() -> Result<PathBuf, String> {
    match std::env::var_os("RC_E2E_KUBECONFIG") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "RC_E2E_KUBECONFIG={} is not a readable file: run `bash tests/run.sh`, or start a \
                     cluster with `bash tests/cluster/up.sh` and export RC_E2E_KUBECONFIG=<its kubeconfig>",
                    p.display()
                ))
            }
        }
        _ => Err(
            "RC_E2E_KUBECONFIG is not set: the fleet benchmark and test need a Kubernetes cluster with the \
             Istio and RecordingCanary CRDs. Run `bash tests/run.sh`, or start a cluster with \
             `bash tests/cluster/up.sh` and export RC_E2E_KUBECONFIG=<its kubeconfig> (up.sh prints it: \
             ~/.cache/recording-canary/clusters/<name>/kubeconfig)"
                .into(),
        ),
    }
}

pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

// ------------------------------------------------------------------------------------------------
// The report

/// One phase's figures.
#[derive(Clone, Debug, Default)]
pub struct PhaseReport {
    pub name: String,
    pub finished: bool,
    pub wall: Duration,
    /// The controller's requests in the phase, by (verb, resource); empty when the metric is absent.
    pub calls: BTreeMap<(String, String), u64>,
    /// Occurrences of Events about RecordingCanaries in the fleet namespaces, new in the phase.
    pub events: u64,
    /// Canaries that left Ready in the phase with no change of their spec (flaps).
    pub left_ready: u64,
    /// `apiserver_request_total` by verb in the phase (every client of the apiserver).
    pub apiserver: BTreeMap<String, u64>,
    /// Controller RSS at the end of the phase, and its peak so far (VmHWM), KiB; with several
    /// processes, the sums of theirs.
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Controller CPU time (user + system) spent in the phase (all processes).
    pub cpu_s: f64,
    /// What was missing when the phase did not finish.
    pub detail: String,
    /// Route status writes of the driver playing the mesh (Gateway API router): not the
    /// controller's, so in none of its figures.
    pub mesh_writes: u64,
    /// With several controller processes, each one's own figures (calls, RSS, CPU), in the
    /// order of `FleetReport::processes`; empty with one.
    pub processes: Vec<PhaseReport>,
}

/// Resources whose requests are not the canaries' work: Events (counted apart, from the cluster)
/// and Leases (leader election: a few per process every 5 s, whatever the canaries do).
const NOT_CALLS: [&str; 2] = ["events", "leases"];

impl PhaseReport {
    /// The controller's requests, Events and Leases excluded.
    pub fn calls_total(&self) -> u64 {
        self.calls
            .iter()
            .filter(|((_, r), _)| !NOT_CALLS.contains(&r.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// The controller's requests on `leases` (leader election).
    pub fn lease_calls(&self) -> u64 {
        self.calls
            .iter()
            .filter(|((_, r), _)| r == "leases")
            .map(|(_, n)| n)
            .sum()
    }

    /// The controller's requests on `events` (creating or patching Events).
    pub fn event_calls(&self) -> u64 {
        self.calls
            .iter()
            .filter(|((_, r), _)| r == "events")
            .map(|(_, n)| n)
            .sum()
    }

    /// Write requests of the controller, Events included, Leases (leader election) not.
    pub fn writes(&self) -> u64 {
        self.calls
            .iter()
            .filter(|((v, r), _)| WRITE_VERBS.contains(&v.as_str()) && r != "leases")
            .map(|(_, n)| n)
            .sum()
    }

    /// The write requests (Leases excluded) as `N verb resource` items.
    pub fn writes_breakdown(&self) -> String {
        self.calls
            .iter()
            .filter(|((v, r), n)| WRITE_VERBS.contains(&v.as_str()) && r != "leases" && **n > 0)
            .map(|((v, r), n)| format!("{n} {v} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One controller process of a run.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Its identity in the shard Leases (`POD_NAME-pid`); empty with one process.
    pub identity: String,
    /// The shard whose Lease it leads (0 with one process).
    pub shard: u32,
    /// Fleet namespaces, and canaries, of its shard.
    pub namespaces: usize,
    pub canaries: usize,
    /// Its /metrics port.
    pub admin_port: u16,
    pub log: PathBuf,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct FleetReport {
    pub config: FleetConfig,
    pub run_id: String,
    /// The (first) controller's log.
    pub log: PathBuf,
    /// The controller processes, once started (one, or one per shard).
    pub processes: Vec<ProcessInfo>,
    /// N plain Deployments Ready, without the controller.
    pub floor: Option<Duration>,
    /// The targets and Services, created before the canaries, until all targets are Ready.
    pub apps: Option<Duration>,
    /// Deleting them until their pods were gone.
    pub floor_cleanup: Option<Duration>,
    /// converge, ramp, steady, rollback (as far as the run got).
    pub phases: Vec<PhaseReport>,
    /// Whether the controller exposed `recording_canary_api_requests_total` at every reading.
    pub metric_present: bool,
    /// Why the run stopped early.
    pub failure: Option<String>,
    pub notes: Vec<String>,
    /// Patch → route weights in the ramp: the controller's canaries, and the naive watcher's.
    pub latency: Option<Latency>,
    pub naive_latency: Option<Latency>,
    /// The naive watcher's requests by verb, through the ramp.
    pub naive_requests: BTreeMap<String, u64>,
}

/// Patch → route weights, one sample per canary.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// Sorted.
    pub samples: Vec<Duration>,
    /// Canaries whose route did not show the new weights (no sample).
    pub missing: usize,
}

impl Latency {
    pub fn new(mut samples: Vec<Duration>, missing: usize) -> Self {
        samples.sort();
        Self { samples, missing }
    }

    /// The nearest-rank percentile `p` (0 < p ≤ 100); None without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.samples.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.samples.get(rank.clamp(1, n) - 1).copied()
    }

    /// `p50 … ms, p90 …, p99 …, max …` (or `no samples`).
    pub fn summary(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1000.0)
            })
        };
        if self.samples.is_empty() {
            return "no samples".into();
        }
        format!(
            "p50 {}, p90 {}, p99 {}, max {}",
            ms(self.percentile(50.0)),
            ms(self.percentile(90.0)),
            ms(self.percentile(99.0)),
            ms(self.samples.last().copied())
        )
    }
}

impl FleetReport {
    pub fn phase(&self, name: &str) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.name == name)
    }

    pub fn finished(&self, name: &str) -> bool {
        self.phase(name).is_some_and(|p| p.finished)
    }

    /// The controller's requests (Events excluded) per canary in a phase.
    pub fn calls_per_canary(&self, name: &str) -> f64 {
        self.per_canary(self.phase(name).map_or(0, PhaseReport::calls_total))
    }

    /// Event occurrences per canary in a phase.
    pub fn events_per_canary(&self, name: &str) -> f64 {
        self.per_canary(self.phase(name).map_or(0, |p| p.events))
    }

    /// Write requests in the steady state, when it was measured.
    pub fn steady_writes(&self) -> Option<u64> {
        self.phase("steady").map(PhaseReport::writes)
    }

    fn per_canary(&self, n: u64) -> f64 {
        n as f64 / self.config.canaries.max(1) as f64
    }

    /// The figures as Markdown: the phases, the converge phase's calls by verb and resource, and
    /// the apiserver's requests by verb.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let mut scope = if c.cluster_wide {
            "controller cluster-wide".to_string()
        } else {
            format!("controller scoped to the {} namespaces", c.namespaces)
        };
        if c.shards > 1 {
            let _ = write!(
                scope,
                ", {} controller processes (`--shards {}`, one shard Lease each)",
                c.shards, c.shards
            );
        }
        if c.router == Router::GatewayApi {
            scope.push_str(
                ", **Gateway API router** (`router: GatewayAPI`, one HTTPRoute per app with its Service as parent; the driver plays the mesh)",
            );
        }
        let _ = writeln!(
            s,
            "### Fleet: {} RecordingCanaries in {} namespaces, {} parallel clients, {} replica(s) per target, {scope} (run {})\n",
            c.canaries, c.namespaces, c.clients, c.replicas, self.run_id
        );
        if !self.metric_present {
            let _ = writeln!(
                s,
                "**WARNING: the controller does not expose `{API_METRIC}_total`: every controller call count below is 0 because it was NOT MEASURED.**\n"
            );
        }
        // A phase's own failure is printed below the table, with the phase.
        if let Some(f) = &self.failure
            && !self.phases.iter().any(|p| &p.detail == f)
        {
            let _ = writeln!(s, "**FAILED: {f}**\n");
        }
        let _ = writeln!(
            s,
            "| phase | time | floor | controller calls/canary | Events/canary | writes in {} s steady state | RSS MiB (peak) | CPU s |",
            c.steady.as_secs()
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        let mib = |k: u64| k as f64 / 1024.0;
        for p in &self.phases {
            let time = if p.finished {
                secs(p.wall)
            } else {
                format!("**unfinished** after {}", secs(p.wall))
            };
            let floor = match (p.name.as_str(), self.floor) {
                ("converge", Some(f)) => secs(f),
                _ => String::new(),
            };
            let writes = if p.name == "steady" {
                let w = p.writes();
                if w == 0 {
                    "0".to_string()
                } else {
                    format!("{w} ({})", p.writes_breakdown())
                }
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {time} | {floor} | {:.2} | {:.2} | {writes} | {:.1} ({:.1}) | {:.2} |",
                p.name,
                self.calls_per_canary(&p.name),
                self.events_per_canary(&p.name),
                mib(p.rss_kib),
                mib(p.hwm_kib),
                p.cpu_s
            );
        }
        if let Some(f) = self.floor_cleanup {
            let _ = writeln!(
                s,
                "\nfloor: {} plain Deployments Ready in {}; deleted, pods gone, in {}.",
                c.canaries,
                self.floor.map(secs).unwrap_or_default(),
                secs(f)
            );
        }
        if let (true, Some(f)) = (c.floor_from_apps, self.floor) {
            let _ = writeln!(
                s,
                "\nfloor: the {} apps' own 1-replica Deployments, created first, alone and without the controller (RC_FLEET_FLOOR=apps), Ready in {}.",
                c.canaries,
                secs(f)
            );
        }
        match (c.floor_from_apps, self.apps) {
            (false, Some(a)) => {
                let _ = writeln!(
                    s,
                    "apps: the {} targets (and their Services) were created and Ready in {} before the canaries were applied.",
                    c.canaries,
                    secs(a)
                );
            }
            (true, Some(a)) => {
                let _ = writeln!(
                    s,
                    "apps: then their {} Services had EndpointSlices with Ready endpoints in {}, before the controller started.",
                    c.canaries,
                    secs(a)
                );
            }
            _ => {}
        }
        if !self.phases.is_empty() {
            let _ = writeln!(
                s,
                "flaps: canaries that left Ready with no change of their spec: {}.",
                self.phases
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.left_ready))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if c.router == Router::GatewayApi && !self.phases.is_empty() {
            let _ = writeln!(
                s,
                "mesh: route status writes of the driver playing the mesh (`Accepted`, `ResolvedRefs`; not the controller's, in none of its figures): {}.",
                self.phases
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.mesh_writes))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for p in self.phases.iter().filter(|p| !p.detail.is_empty()) {
            let _ = writeln!(s, "\n**{} did not finish**: {}", p.name, p.detail);
        }
        if self.phases.iter().any(|p| p.lease_calls() > 0) {
            let _ = writeln!(
                s,
                "\nLease calls (leader election; not in calls/canary nor in the steady writes): {}.",
                self.phases
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.lease_calls()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if self.processes.len() > 1 {
            self.per_process_markdown(&mut s);
        }

        if let Some(l) = &self.latency {
            self.latency_markdown(&mut s, l);
        }
        if let Some(p) = self.phase("converge") {
            let _ = writeln!(
                s,
                "\n#### Controller API calls to converge, by verb and resource ({} canaries)\n",
                c.canaries
            );
            let _ = writeln!(s, "| verb | resource | calls | per canary |");
            let _ = writeln!(s, "| --- | --- | --- | --- |");
            for ((v, r), n) in p.calls.iter().filter(|(_, n)| **n > 0) {
                let r = if r == "events" {
                    "events (not in calls/canary)"
                } else {
                    r
                };
                let _ = writeln!(s, "| {v} | {r} | {n} | {:.2} |", self.per_canary(*n));
            }
            let _ = writeln!(
                s,
                "| **total** | (Events excluded) | {} | {:.2} |",
                p.calls_total(),
                self.per_canary(p.calls_total())
            );
        }

        if !self.phases.is_empty() {
            let verbs: Vec<&String> = {
                let mut v: Vec<&String> = self
                    .phases
                    .iter()
                    .flat_map(|p| p.apiserver.keys())
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            let _ = writeln!(
                s,
                "\n#### apiserver_request_total by verb, per phase (every client, for context)\n"
            );
            let _ = writeln!(
                s,
                "| phase | {} | total |",
                verbs
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(s, "|{}", " --- |".repeat(verbs.len() + 2));
            for p in &self.phases {
                let cells: Vec<String> = verbs
                    .iter()
                    .map(|v| p.apiserver.get(*v).copied().unwrap_or(0).to_string())
                    .collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    p.name,
                    cells.join(" | "),
                    p.apiserver.values().sum::<u64>()
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\nnote: {n}");
        }
        if self.processes.len() > 1 {
            for p in &self.processes {
                let _ = writeln!(
                    s,
                    "\ncontroller log (shard {}): {}",
                    p.shard,
                    p.log.display()
                );
            }
        } else {
            let _ = writeln!(s, "\ncontroller log: {}", self.log.display());
        }
        s
    }

    /// Patch → route weights in the ramp, the controller's and the naive watcher's.
    fn latency_markdown(&self, s: &mut String, l: &Latency) {
        let route = match self.config.router {
            Router::Istio => "VirtualService weights",
            Router::GatewayApi => "HTTPRoute weights",
        };
        let _ = writeln!(
            s,
            "\n#### Patch of `spec.percent` → {route} (watched), the ramp, every canary patched at once\n"
        );
        let _ = writeln!(s, "| tool | canaries | p50 | p90 | p99 | max | missing |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
        let row = |s: &mut String, tool: &str, l: &Latency| {
            let ms = |d: Option<Duration>| {
                d.map_or("-".to_string(), |d| {
                    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
                })
            };
            let _ = writeln!(
                s,
                "| {tool} | {} | {} | {} | {} | {} | {} |",
                l.samples.len() + l.missing,
                ms(l.percentile(50.0)),
                ms(l.percentile(90.0)),
                ms(l.percentile(99.0)),
                ms(l.samples.last().copied()),
                l.missing
            );
        };
        row(s, "recording-canary", l);
        if let Some(n) = &self.naive_latency {
            row(s, "naive watcher (in the same ramp)", n);
            let _ = writeln!(
                s,
                "\nnaive watcher: a watch per canary, a GET and a PUT of its route per event, no cache; its requests in the ramp: {}.",
                self.naive_requests
                    .iter()
                    .map(|(v, n)| format!("{n} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    /// The split of the namespaces between the shards, and each process's figures per phase.
    fn per_process_markdown(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n#### Per controller process (the table above sums them; peak RSS is the sum of each one's peak)\n"
        );
        let _ = writeln!(
            s,
            "split: {}.\n",
            self.processes
                .iter()
                .map(|p| format!(
                    "shard {} (pid {}): {} namespaces, {} canaries",
                    p.shard, p.pid, p.namespaces, p.canaries
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            s,
            "| phase | shard | canaries | calls | calls/canary of its shard | Lease calls | writes | RSS MiB (peak) | CPU s |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mib = |k: u64| k as f64 / 1024.0;
        for p in &self.phases {
            for (info, pp) in self.processes.iter().zip(&p.processes) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.2} | {} | {} | {:.1} ({:.1}) | {:.2} |",
                    p.name,
                    info.shard,
                    info.canaries,
                    pp.calls_total(),
                    pp.calls_total() as f64 / info.canaries.max(1) as f64,
                    pp.lease_calls(),
                    pp.writes(),
                    mib(pp.rss_kib),
                    mib(pp.hwm_kib),
                    pp.cpu_s
                );
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

// ------------------------------------------------------------------------------------------------
// The run

/// Runs the phases and always cleans up (the controller is killed, the namespaces deleted).
pub async fn run(cfg: FleetConfig) -> FleetReport {
    let run_id = if cfg.shards > 1 {
        pick_run_id(
            (0..RUN_ID_CANDIDATES).map(|_| random_suffix()),
            cfg.namespaces,
            cfg.canaries,
            cfg.shards,
        )
    } else {
        random_suffix()
    };
    let logs = crate::target_dir().join("fleet-logs");
    let log = log_path(&logs, &run_id, &cfg.tag, 0, cfg.shards);
    let mut report = FleetReport {
        config: cfg.clone(),
        run_id: run_id.clone(),
        log: log.clone(),
        processes: Vec::new(),
        floor: None,
        apps: None,
        floor_cleanup: None,
        phases: Vec::new(),
        metric_present: false,
        failure: None,
        notes: Vec::new(),
        latency: None,
        naive_latency: None,
        naive_requests: BTreeMap::new(),
    };
    if let Err(e) = std::fs::create_dir_all(&logs) {
        report.failure = Some(format!("cannot create {}: {e}", logs.display()));
        return report;
    }
    let mut fleet = match Fleet::connect(cfg, run_id).await {
        Ok(f) => f,
        Err(e) => {
            report.failure = Some(e);
            return report;
        }
    };
    if let Err(e) = fleet.phases(&mut report).await {
        fleet.say(&format!("FAILED: {e}"));
        for c in &fleet.controllers {
            fleet.say(&format!(
                "last lines of the controller log ({}):\n{}",
                c.log.display(),
                log_tail(&c.log, 40)
            ));
        }
        report.failure = Some(e);
    }
    fleet.cleanup(&mut report).await;
    report
}

/// Canary i's namespace index.
fn ns_index(i: usize, namespaces: usize) -> usize {
    i % namespaces
}

/// The fleet namespaces of a run.
fn fleet_namespaces(run_id: &str, namespaces: usize) -> Vec<String> {
    (0..namespaces)
        .map(|j| format!("rc-fleet-{run_id}-{j}"))
        .collect()
}

/// Controller process k's log (of `shards` processes).
fn log_path(dir: &Path, run_id: &str, tag: &str, k: usize, shards: usize) -> PathBuf {
    if shards > 1 {
        dir.join(format!("rc-fleet-{run_id}-{tag}-shard{k}.log"))
    } else {
        dir.join(format!("rc-fleet-{run_id}-{tag}.log"))
    }
}

/// Per shard (of `shards`), its (namespaces, canaries), canary i being in namespace i mod M and
/// a namespace in the shard the controller's own hash puts it in.
pub fn shard_split(namespaces: &[String], canaries: usize, shards: usize) -> Vec<(usize, usize)> {
    let shards = shards.max(1);
    let mut split = vec![(0, 0); shards];
    for (j, ns) in namespaces.iter().enumerate() {
        let s = recording_canary::runtime::shard::Shard::of(ns, shards as u32) as usize;
        split[s].0 += 1;
        // Canaries j, j + M, j + 2M, … (ns_index).
        split[s].1 += canaries / namespaces.len() + usize::from(j < canaries % namespaces.len());
    }
    split
}

/// Most canaries in a shard minus fewest.
fn imbalance(split: &[(usize, usize)]) -> usize {
    let most = split.iter().map(|s| s.1).max().unwrap_or(0);
    let fewest = split.iter().map(|s| s.1).min().unwrap_or(0);
    most - fewest
}

/// Random run ids tried for an even split.
const RUN_ID_CANDIDATES: usize = 256;

/// Among `candidates`, the first run id whose fleet namespaces split the canaries evenly between
/// the shards, else the most even one. The run id names the namespaces, and the namespace decides
/// the shard: a sharding benchmark should measure the shards, not the luck of the hash.
pub fn pick_run_id(
    candidates: impl IntoIterator<Item = String>,
    namespaces: usize,
    canaries: usize,
    shards: usize,
) -> String {
    let mut best: Option<(usize, String)> = None;
    for id in candidates {
        let d = imbalance(&shard_split(
            &fleet_namespaces(&id, namespaces),
            canaries,
            shards,
        ));
        if d == 0 {
            return id;
        }
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, id));
        }
    }
    best.map(|(_, id)| id).unwrap_or_default()
}

/// The shard each process leads, from the holders of the shard Leases (index: shard) and the
/// processes' identities: Ok when every process holds exactly one Lease; else what is missing.
pub fn shards_led(holders: &[Option<String>], identities: &[String]) -> Result<Vec<u32>, String> {
    let mut led = Vec::with_capacity(identities.len());
    for id in identities {
        let mine: Vec<u32> = holders
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_deref() == Some(id.as_str()))
            .map(|(s, _)| s as u32)
            .collect();
        match mine.as_slice() {
            [s] => led.push(*s),
            [] => return Err(format!("{id} leads no shard yet")),
            more => return Err(format!("{id} leads {} shards: {more:?}", more.len())),
        }
    }
    Ok(led)
}

fn app(i: usize) -> String {
    format!("app-{i}")
}

fn clone_of(i: usize) -> String {
    format!("app-{i}-recording")
}

/// What `Fleet::create_apps` creates of each app.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AppParts {
    Deployments,
    Services,
    Both,
}

fn floor_name(i: usize) -> String {
    format!("floor-{i}")
}

type Key = (String, String);

struct Fleet {
    cfg: FleetConfig,
    run_id: String,
    client: Client,
    /// One per parallel worker.
    clients: Vec<Client>,
    namespaces: Arc<Vec<String>>,
    created_namespaces: bool,
    changed: Arc<Notify>,
    canaries: Tracker<CanarySum>,
    /// Each canary's route: its VirtualService `app-i-recording` (Istio) or the user's HTTPRoute
    /// `app-i` (Gateway API).
    routes: Tracker<RouteSum>,
    /// The driver playing the mesh (Gateway API router only).
    mesh: Option<Mesh>,
    /// The ServiceCIDR the run added, to delete at the end.
    service_cidr: Option<String>,
    /// The naive watcher's namespace (None: no naive watcher in this run), and its watches.
    naive_ns: Option<String>,
    naive: Option<Naive>,
    deployments: Tracker<i32>,
    /// The floor's pods, by their Deployment's name (their `app` label).
    floor_pods: Tracker<String>,
    ns_tracker: Tracker<()>,
    /// One, or one per shard.
    controllers: Vec<Controller>,
    clk_tck: f64,
    t0: Instant,
}

impl Fleet {
    async fn connect(cfg: FleetConfig, run_id: String) -> Result<Self, String> {
        let kc = Kubeconfig::read_from(&cfg.kubeconfig)
            .map_err(|e| format!("cannot read {}: {e}", cfg.kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("bad kubeconfig {}: {e}", cfg.kubeconfig.display()))?;
        let client = Client::try_from(config.clone()).map_err(|e| format!("kube client: {e}"))?;
        let clients = (0..cfg.clients.max(1))
            .map(|_| Client::try_from(config.clone()).map_err(|e| format!("kube client: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let namespaces = fleet_namespaces(&run_id, cfg.namespaces);
        let set: Arc<HashSet<String>> = Arc::new(namespaces.iter().cloned().collect());
        let changed = Arc::new(Notify::new());
        let all = watcher::Config::default();
        let canaries = Tracker::start_counting(
            Api::<DynamicObject>::all_with(client.clone(), &canary_resource()),
            all.clone(),
            Some(set.clone()),
            changed.clone(),
            CanarySum::of,
            CanarySum::left_ready,
        );
        // The naive watcher's namespace, outside the controller's scope: its routes are watched
        // (and accepted by the mesh) with the fleet's.
        let naive_ns =
            (cfg.naive > 0 && !cfg.cluster_wide).then(|| format!("rc-fleet-{run_id}-naive"));
        let route_set: Arc<HashSet<String>> =
            Arc::new(set.iter().cloned().chain(naive_ns.clone()).collect());
        let routes = match cfg.router {
            Router::Istio => Tracker::start_carrying(
                Api::<DynamicObject>::all_with(client.clone(), &vs_resource()),
                all.clone(),
                Some(route_set.clone()),
                changed.clone(),
                RouteSum::of_virtual_service,
                RouteSum::carry_since,
            ),
            Router::GatewayApi => Tracker::start_carrying(
                Api::<DynamicObject>::all_with(client.clone(), &http_route_resource()),
                all.clone(),
                Some(route_set.clone()),
                changed.clone(),
                RouteSum::of_http_route,
                RouteSum::carry_since,
            ),
        };
        let mesh = (cfg.router == Router::GatewayApi)
            .then(|| Mesh::start(client.clone(), route_set.clone()));
        let deployments = Tracker::start(
            Api::<Deployment>::all(client.clone()),
            all.clone(),
            Some(set.clone()),
            changed.clone(),
            |d: &Deployment| {
                d.status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0)
            },
        );
        let floor_pods = Tracker::start(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(&format!("{FLOOR_LABEL}={run_id}")),
            Some(set.clone()),
            changed.clone(),
            |p: &Pod| {
                p.meta()
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app"))
                    .cloned()
                    .unwrap_or_default()
            },
        );
        let ns_tracker = Tracker::start(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(&format!("{RUN_LABEL}={run_id}")),
            None,
            changed.clone(),
            |_: &Namespace| (),
        );
        let clk_tck = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0);
        let fleet = Self {
            cfg,
            run_id,
            client,
            clients,
            namespaces: Arc::new(namespaces),
            created_namespaces: false,
            changed,
            canaries,
            routes,
            mesh,
            service_cidr: None,
            naive_ns,
            naive: None,
            deployments,
            floor_pods,
            ns_tracker,
            controllers: Vec::new(),
            clk_tck,
            t0: Instant::now(),
        };
        fleet.say(&format!(
            "run {}: {} canaries in {} namespaces (rc-fleet-{}-*), {} clients, {} replica(s) per target{}",
            fleet.run_id,
            fleet.cfg.canaries,
            fleet.cfg.namespaces,
            fleet.run_id,
            fleet.clients.len(),
            fleet.cfg.replicas,
            match fleet.cfg.router {
                Router::Istio => "",
                Router::GatewayApi => ", Gateway API router (the driver plays the mesh)",
            }
        ));
        Ok(fleet)
    }

    fn say(&self, msg: &str) {
        eprintln!("[fleet {:>6.1}s] {msg}", self.t0.elapsed().as_secs_f64());
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.phase_timeout
    }

    fn ns_of(&self, i: usize) -> &str {
        &self.namespaces[ns_index(i, self.namespaces.len())]
    }

    fn keys(&self, name: impl Fn(usize) -> String) -> Vec<Key> {
        (0..self.cfg.canaries)
            .map(|i| (self.ns_of(i).to_string(), name(i)))
            .collect()
    }

    /// The naive watcher's canaries in this run.
    fn naive_canaries(&self) -> usize {
        if self.naive_ns.is_some() {
            self.cfg.naive
        } else {
            0
        }
    }

    /// The naive watcher's canaries' routes.
    fn naive_keys(&self) -> Vec<Key> {
        let ns = self.naive_ns.clone().unwrap_or_default();
        (0..self.naive_canaries())
            .map(|m| (ns.clone(), naive_name(m)))
            .collect()
    }

    /// The naive watcher's namespace, its canaries at the start percent and their routes at
    /// that weight; then its watches, until each has opened.
    async fn start_naive(&mut self) -> Result<(), String> {
        let Some(ns) = self.naive_ns.clone() else {
            return Ok(());
        };
        let k = self.cfg.naive;
        let t = Instant::now();
        let obj: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                "app.kubernetes.io/part-of": PART_OF, RUN_LABEL: self.run_id}}
        }))
        .map_err(|e| format!("namespace object: {e}"))?;
        create(&Api::<Namespace>::all(self.client.clone()), &obj).await?;
        let (router, run_id, ns_) = (self.cfg.router, self.run_id.clone(), ns.clone());
        self.parallel("naive: create canaries and routes", k, move |c, m| {
            let (ns, run_id) = (ns_.clone(), run_id.clone());
            async move {
                let name = naive_name(m);
                let route = naive_route(&name, router);
                let res = match router {
                    Router::Istio => vs_resource(),
                    Router::GatewayApi => http_route_resource(),
                };
                create(
                    &Api::<DynamicObject>::namespaced_with(c.clone(), &ns, &res),
                    &route,
                )
                .await?;
                let rc = canary(&name, &run_id, router);
                create(
                    &Api::<DynamicObject>::namespaced_with(c, &ns, &canary_resource()),
                    &rc,
                )
                .await
            }
        })
        .await?;
        let naive = Naive::start(self.client.clone(), &ns, k, self.cfg.router);
        let deadline = Instant::now() + Duration::from_secs(60);
        let keys = self.naive_keys();
        let r = self
            .wait_for("naive: watches open", deadline, || {
                let watching = naive.watching();
                let routes = self.routes.map();
                let mut pending: Vec<String> = keys
                    .iter()
                    .filter(|k| {
                        !routes
                            .get(*k)
                            .is_some_and(|r| r.at(self.cfg.router, START_PERCENT))
                    })
                    .map(|k| format!("route {}/{}: not seen at {START_PERCENT} %", k.0, k.1))
                    .collect();
                if watching < k {
                    pending.push(format!("{watching} of {k} naive watches open"));
                }
                Progress::new(k, pending, "naive canaries watched", self.routes.synced())
            })
            .await;
        self.naive = Some(naive);
        r?;
        self.say(&format!(
            "naive: {k} canaries in {ns}, each with its own watch, in {}",
            secs(t.elapsed())
        ));
        Ok(())
    }

    /// Patch → route weights of every canary in the ramp, from the times the patches were sent
    /// (`sent`: the fleet's, then the naive watcher's) and the route watch: the controller's,
    /// and, once its routes show the ramp too (at most 60 s more), the naive watcher's.
    async fn ramp_latency(
        &self,
        report: &mut FleetReport,
        sent: &[Option<Instant>],
        naive_before: &BTreeMap<String, u64>,
    ) {
        let n = self.cfg.canaries;
        let router = self.cfg.router;
        let measure = |keys: &[Key], sent: &[Option<Instant>]| {
            let routes = self.routes.map();
            let mut samples = Vec::new();
            let mut missing = 0;
            for (k, t0) in keys.iter().zip(sent) {
                match (routes.get(k).filter(|r| r.at(router, RAMP_PERCENT)), t0) {
                    (Some(r), Some(t0)) => samples.push(r.since.saturating_duration_since(*t0)),
                    _ => missing += 1,
                }
            }
            Latency::new(samples, missing)
        };
        let fleet = measure(&self.route_keys(), &sent[..n.min(sent.len())]);
        self.say(&format!(
            "ramp: patch → {} weights: {}",
            router.route_kind(),
            fleet.summary()
        ));
        report.latency = Some(fleet);
        let Some(naive) = &self.naive else {
            return;
        };
        let keys = self.naive_keys();
        let deadline = Instant::now() + Duration::from_secs(60);
        let r = self
            .wait_for("ramp: naive watcher", deadline, || {
                let routes = self.routes.map();
                let pending: Vec<String> = keys
                    .iter()
                    .filter(|k| !routes.get(*k).is_some_and(|r| r.at(router, RAMP_PERCENT)))
                    .map(|k| format!("route {}/{}", k.0, k.1))
                    .collect();
                Progress::new(
                    keys.len(),
                    pending,
                    "naive routes at the ramp",
                    self.routes.synced(),
                )
            })
            .await;
        if let Err(e) = r {
            report.notes.push(format!("the naive watcher's ramp: {e}"));
        }
        let l = measure(&keys, sent.get(n..).unwrap_or_default());
        self.say(&format!(
            "ramp: naive watcher, patch → {} weights: {}",
            router.route_kind(),
            l.summary()
        ));
        report.naive_latency = Some(l);
        let after = naive.requests();
        report.naive_requests = after
            .iter()
            .map(|(v, c)| (v.clone(), c - naive_before.get(v).copied().unwrap_or(0)))
            .collect();
    }

    /// Each canary's route, in canary order.
    fn route_keys(&self) -> Vec<Key> {
        match self.cfg.router {
            Router::Istio => self.keys(clone_of),
            Router::GatewayApi => self.keys(app),
        }
    }

    async fn phases(&mut self, report: &mut FleetReport) -> Result<(), String> {
        let n = self.cfg.canaries;
        if self.cfg.floor_from_apps && self.cfg.replicas != 1 {
            return Err(format!(
                "RC_FLEET_FLOOR=apps takes the floor from the targets, and the floor is N 1-replica Deployments, but there are {} replicas per target: set RC_FLEET_REPLICAS=1",
                self.cfg.replicas
            ));
        }
        self.create_namespaces().await?;
        if self.cfg.floor_from_apps {
            // --- floor: the apps' own Deployments, alone, no controller.
            let t = Instant::now();
            self.create_apps("floor: create the apps' Deployments", AppParts::Deployments)
                .await?;
            let keys = self.keys(app);
            self.wait_ready("floor", &keys, 1, "Deployments Ready")
                .await?;
            report.floor = Some(t.elapsed());
            self.say(&format!(
                "floor: {n} Deployments (the apps') Ready in {}",
                secs(t.elapsed())
            ));
            // --- their Services, until each has its Ready endpoints.
            let t = Instant::now();
            self.create_apps("apps: create Services", AppParts::Services)
                .await?;
            self.wait_app_endpoints().await?;
            report.apps = Some(t.elapsed());
            self.say(&format!(
                "apps: {n} Services with Ready endpoints in {}",
                secs(t.elapsed())
            ));
            self.start_controllers(report).await?;
        } else {
            self.floor(report).await?;
            self.start_controllers(report).await?;
            // --- the users' apps: running before anyone applies a canary to them.
            let t = Instant::now();
            self.create_apps("apps: create Deployment, Service", AppParts::Both)
                .await?;
            let keys = self.keys(app);
            self.wait_ready("apps", &keys, self.cfg.replicas, "apps Ready")
                .await?;
            report.apps = Some(t.elapsed());
            self.say(&format!(
                "apps: {n} Deployments Ready in {}",
                secs(t.elapsed())
            ));
        }
        if self.cfg.router == Router::GatewayApi {
            self.wait_routes_accepted().await?;
        }
        if self.cfg.naive > 0 && self.naive_ns.is_none() {
            let msg = "no naive watcher: with the controller cluster-wide it would take the naive watcher's canaries too".to_string();
            self.say(&msg);
            report.notes.push(msg);
        }
        self.start_naive().await?;
        self.settle().await;
        let s0 = self.snapshot().await?;
        self.check_metric(&s0, report);

        // --- converge: the canaries, all at once.
        let t = Instant::now();
        let (namespaces, run_id) = (self.namespaces.clone(), self.run_id.clone());
        let router = self.cfg.router;
        self.parallel("create: RecordingCanary", n, move |c, i| {
            let ns = namespaces[ns_index(i, namespaces.len())].clone();
            let rc = canary(&app(i), &run_id, router);
            async move {
                create(
                    &Api::<DynamicObject>::namespaced_with(c, &ns, &canary_resource()),
                    &rc,
                )
                .await
            }
        })
        .await?;
        self.say(&format!(
            "create: {n} canaries created in {}",
            secs(t.elapsed())
        ));
        let s1 = self
            .timed_phase(report, "converge", t, &s0, START_PERCENT)
            .await?;

        // --- ramp: the fleet's patches, and the naive watcher's interleaved with them; each
        // one's time is taken just before it is sent.
        let t = Instant::now();
        let k = self.naive_canaries();
        let items = Arc::new(ramp_items(n, k));
        let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n + k]));
        let naive_before = self.naive.as_ref().map(Naive::requests).unwrap_or_default();
        let (namespaces, naive_ns) = (self.namespaces.clone(), self.naive_ns.clone());
        let sent_by = sent.clone();
        self.parallel("ramp: patch percent", n + k, move |c, j| {
            let (slot, ns, name) = match items[j] {
                RampItem::Fleet(i) => {
                    (i, namespaces[ns_index(i, namespaces.len())].clone(), app(i))
                }
                RampItem::Naive(m) => (n + m, naive_ns.clone().unwrap_or_default(), naive_name(m)),
            };
            let sent = sent_by.clone();
            async move {
                let api = Api::<DynamicObject>::namespaced_with(c, &ns, &canary_resource());
                let (pp, patch) = (
                    PatchParams::default(),
                    Patch::Merge(json!({"spec": {"percent": RAMP_PERCENT}})),
                );
                retry(&format!("patch rcanary {ns}/{name}"), || {
                    // A retried patch counts from its first attempt.
                    lock(&sent)[slot].get_or_insert_with(Instant::now);
                    api.patch(&name, &pp, &patch)
                })
                .await
                .map(drop)
            }
        })
        .await?;
        let s2 = self
            .timed_phase(report, "ramp", t, &s1, RAMP_PERCENT)
            .await?;
        let sent = lock(&sent).clone();
        self.ramp_latency(report, &sent, &naive_before).await;

        // --- steady state: nothing changes; the controller should not write.
        self.say(&format!(
            "steady: measuring the controller for {} s",
            self.cfg.steady.as_secs()
        ));
        tokio::time::sleep(self.cfg.steady).await;
        let s3 = self.snapshot().await?;
        report.metric_present &= s3.calls.is_some();
        let steady = self.phase_report("steady", true, s3.calls_at - s2.calls_at, &s2, &s3);
        if steady.writes() > 0 {
            self.say(&format!(
                "steady: the controller wrote {} times ({})",
                steady.writes(),
                steady.writes_breakdown()
            ));
        }
        report.phases.push(steady);

        // --- rollback.
        let t = Instant::now();
        let namespaces = self.namespaces.clone();
        self.parallel("rollback: delete RecordingCanaries", n, move |c, i| {
            let ns = namespaces[ns_index(i, namespaces.len())].clone();
            async move {
                delete(
                    &Api::<DynamicObject>::namespaced_with(c, &ns, &canary_resource()),
                    &app(i),
                )
                .await
            }
        })
        .await?;
        let canary_keys = self.keys(app);
        let clone_keys = self.keys(clone_of);
        let deadline = Instant::now() + self.cfg.rollback_timeout.unwrap_or(self.cfg.phase_timeout);
        let r = self
            .wait_for("rollback", deadline, || {
                let canaries = self.canaries.map();
                let deployments = self.deployments.map();
                let mut pending = Vec::new();
                for (c, d) in canary_keys.iter().zip(&clone_keys) {
                    if let Some(s) = canaries.get(c) {
                        pending.push(format!("rcanary {}/{}: phase {}", c.0, c.1, s.phase));
                    } else if deployments.contains_key(d) {
                        pending.push(format!("clone Deployment {}/{} still there", d.0, d.1));
                    }
                }
                let synced = self.canaries.synced() && self.deployments.synced();
                Progress::new(n, pending, "canaries and clones gone", synced)
            })
            .await;
        let wall = t.elapsed();
        let s4 = self
            .snapshot_or_record(report, "rollback", wall, &r)
            .await?;
        report.metric_present &= s4.calls.is_some();
        let mut p = self.phase_report("rollback", r.is_ok(), wall, &s3, &s4);
        if let Err(e) = &r {
            p.detail = e.clone();
        }
        report.phases.push(p);
        r
    }

    /// Waits until every canary is Ready at `percent` with its route at `percent` (VirtualService
    /// weight, or HTTPRoute share of every rule), then records the phase from `t` and `before`.
    async fn timed_phase(
        &self,
        report: &mut FleetReport,
        name: &str,
        t: Instant,
        before: &Snapshot,
        percent: i64,
    ) -> Result<Snapshot, String> {
        let n = self.cfg.canaries;
        let canary_keys = self.keys(app);
        let route_keys = self.route_keys();
        let router = self.cfg.router;
        let deadline = self.deadline();
        let r = self
            .wait_for(name, deadline, || {
                let canaries = self.canaries.map();
                let routes = self.routes.map();
                let mut pending = Vec::new();
                for (c, v) in canary_keys.iter().zip(&route_keys) {
                    let canary = canaries.get(c);
                    let route = routes.get(v);
                    let ok = canary.is_some_and(|s| s.at(percent))
                        && route.is_some_and(|w| w.at(router, percent));
                    if !ok {
                        pending.push(format!(
                            "{}/{}: {}; {} {}: {}",
                            c.0,
                            c.1,
                            canary.map_or("(no rcanary)".to_string(), CanarySum::describe),
                            router.route_kind(),
                            v.1,
                            route.map_or("(none)".to_string(), |w| w.describe(router))
                        ));
                    }
                }
                let synced = self.canaries.synced() && self.routes.synced();
                Progress::new(n, pending, "Ready", synced)
            })
            .await;
        let wall = t.elapsed();
        let after = self.snapshot_or_record(report, name, wall, &r).await?;
        report.metric_present &= after.calls.is_some();
        let mut p = self.phase_report(name, r.is_ok(), wall, before, &after);
        if let Err(e) = &r {
            p.detail = e.clone();
        }
        report.phases.push(p);
        r.map(|()| after)
    }

    fn phase_report(
        &self,
        name: &str,
        finished: bool,
        wall: Duration,
        a: &Snapshot,
        b: &Snapshot,
    ) -> PhaseReport {
        let calls = match (&a.calls, &b.calls) {
            (Some(x), Some(y)) => delta(x, y),
            _ => BTreeMap::new(),
        };
        let cpu_s = |a: &ProcStat, b: &ProcStat| {
            b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / self.clk_tck
        };
        let processes = if self.controllers.len() > 1 {
            a.processes
                .iter()
                .zip(&b.processes)
                .map(|((ca, pa), (cb, pb))| PhaseReport {
                    name: name.to_string(),
                    finished,
                    wall,
                    calls: match (ca, cb) {
                        (Some(x), Some(y)) => delta(x, y),
                        _ => BTreeMap::new(),
                    },
                    rss_kib: pb.rss_kib,
                    hwm_kib: pb.hwm_kib,
                    cpu_s: cpu_s(pa, pb),
                    ..PhaseReport::default()
                })
                .collect()
        } else {
            Vec::new()
        };
        PhaseReport {
            name: name.to_string(),
            finished,
            wall,
            calls,
            events: b.events.saturating_sub(a.events),
            left_ready: b.left_ready.saturating_sub(a.left_ready),
            apiserver: delta(&a.apiserver, &b.apiserver),
            rss_kib: b.proc.rss_kib,
            hwm_kib: b.proc.hwm_kib,
            cpu_s: cpu_s(&a.proc, &b.proc),
            detail: String::new(),
            mesh_writes: b.mesh_writes.saturating_sub(a.mesh_writes),
            processes,
        }
    }

    /// The floor: N plain Deployments (1 replica) until all are Ready, without the controller;
    /// then deleted, until their pods are gone.
    async fn floor(&self, report: &mut FleetReport) -> Result<(), String> {
        let n = self.cfg.canaries;
        let t = Instant::now();
        let floor_keys = self.keys(floor_name);
        let (namespaces, run_id) = (self.namespaces.clone(), self.run_id.clone());
        self.parallel("floor: create Deployments", n, move |c, i| {
            let ns = namespaces[ns_index(i, namespaces.len())].clone();
            let d = floor_deployment(&floor_name(i), &run_id);
            async move { create(&Api::<Deployment>::namespaced(c, &ns), &d).await }
        })
        .await?;
        self.wait_ready("floor", &floor_keys, 1, "Deployments Ready")
            .await?;
        report.floor = Some(t.elapsed());
        self.say(&format!(
            "floor: {n} Deployments Ready in {}",
            secs(t.elapsed())
        ));
        let t = Instant::now();
        let namespaces = self.namespaces.clone();
        self.parallel("floor: delete Deployments", n, move |c, i| {
            let ns = namespaces[ns_index(i, namespaces.len())].clone();
            async move { delete(&Api::<Deployment>::namespaced(c, &ns), &floor_name(i)).await }
        })
        .await?;
        let deadline = self.deadline();
        self.wait_for("floor cleanup", deadline, || {
            let map = self.deployments.map();
            let pods = self.floor_pods.map();
            let mut pending: Vec<String> = floor_keys
                .iter()
                .filter(|k| map.contains_key(*k))
                .map(|k| format!("Deployment {}/{}", k.0, k.1))
                .collect();
            // A floor Deployment is gone with its pod.
            let with_pods: HashSet<Key> = pods
                .iter()
                .map(|((ns, _), app)| (ns.clone(), app.clone()))
                .collect();
            let left = floor_keys
                .iter()
                .filter(|k| !map.contains_key(*k) && !with_pods.contains(*k))
                .count();
            pending.extend(pods.keys().map(|k| format!("pod {}/{}", k.0, k.1)));
            let synced = self.deployments.synced() && self.floor_pods.synced();
            Progress {
                done: if synced { left } else { 0 },
                total: n,
                unit: "floor Deployments and their pods gone",
                pending,
                synced,
            }
        })
        .await?;
        report.floor_cleanup = Some(t.elapsed());
        Ok(())
    }

    /// Records whether the controller exposes its call counter (a warning in the report if not).
    fn check_metric(&self, s0: &Snapshot, report: &mut FleetReport) {
        report.metric_present = s0.calls.is_some();
        if s0.calls.is_none() {
            let msg = format!(
                "the controller's /metrics has no {API_METRIC}_total: controller call counts are NOT measured (reported as 0)"
            );
            self.say(&format!("WARNING: {msg}"));
            report.notes.push(msg);
        }
    }

    /// Creates each app's Deployment, its Service, or both (the Service just after the Deployment);
    /// with the Gateway API router, the app's HTTPRoute just after its Service.
    async fn create_apps(&self, what: &str, parts: AppParts) -> Result<(), String> {
        let (namespaces, replicas) = (self.namespaces.clone(), self.cfg.replicas);
        let router = self.cfg.router;
        self.parallel(what, self.cfg.canaries, move |c, i| {
            let ns = namespaces[ns_index(i, namespaces.len())].clone();
            let name = app(i);
            let (d, s) = (app_deployment(&name, replicas), app_service(&name));
            async move {
                if parts != AppParts::Services {
                    create(&Api::<Deployment>::namespaced(c.clone(), &ns), &d).await?;
                }
                if parts != AppParts::Deployments {
                    create(&Api::<Service>::namespaced(c.clone(), &ns), &s).await?;
                    if router == Router::GatewayApi {
                        let api =
                            Api::<DynamicObject>::namespaced_with(c, &ns, &http_route_resource());
                        create(&api, &app_route(&name, i % 2 == 1)).await?;
                    }
                }
                Ok(())
            }
        })
        .await
    }

    /// Waits until every Deployment of `keys` has `replicas` Ready replicas.
    async fn wait_ready(
        &self,
        what: &str,
        keys: &[Key],
        replicas: i32,
        unit: &'static str,
    ) -> Result<(), String> {
        let deadline = self.deadline();
        self.wait_for(what, deadline, || {
            let map = self.deployments.map();
            let pending: Vec<String> = keys
                .iter()
                .filter(|k| map.get(*k).is_none_or(|r| *r < replicas))
                .map(|k| {
                    format!(
                        "{}/{}: readyReplicas {}",
                        k.0,
                        k.1,
                        map.get(k).copied().unwrap_or(0)
                    )
                })
                .collect();
            Progress::new(keys.len(), pending, unit, self.deployments.synced())
        })
        .await
    }

    /// Waits until every app's Service has an EndpointSlice with all its replicas Ready, so that
    /// the endpoint controller's backlog is not part of the next phase. The EndpointSlices are
    /// watched for this wait only, not while the controller is measured.
    async fn wait_app_endpoints(&self) -> Result<(), String> {
        let slices = Tracker::start(
            Api::<EndpointSlice>::all(self.client.clone()),
            watcher::Config::default().labels("kubernetes.io/service-name"),
            Some(Arc::new(self.namespaces.iter().cloned().collect())),
            self.changed.clone(),
            |e: &EndpointSlice| {
                let service = e
                    .meta()
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .cloned()
                    .unwrap_or_default();
                let ready = e
                    .endpoints
                    .iter()
                    .filter(|p| p.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count();
                (service, i32::try_from(ready).unwrap_or(i32::MAX))
            },
        );
        let keys = self.keys(app);
        let replicas = self.cfg.replicas;
        let deadline = self.deadline();
        self.wait_for("apps: endpoints", deadline, || {
            let ready: HashSet<Key> = slices
                .map()
                .iter()
                .filter(|(_, (_, r))| *r >= replicas)
                .map(|((ns, _), (svc, _))| (ns.clone(), svc.clone()))
                .collect();
            let pending: Vec<String> = keys
                .iter()
                .filter(|k| !ready.contains(*k))
                .map(|k| {
                    format!(
                        "Service {}/{}: no EndpointSlice with its Ready endpoints",
                        k.0, k.1
                    )
                })
                .collect();
            Progress::new(
                keys.len(),
                pending,
                "Services with Ready endpoints",
                slices.synced(),
            )
        })
        .await
    }

    async fn create_namespaces(&mut self) -> Result<(), String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.created_namespaces = true;
        for ns in self.namespaces.iter() {
            let obj: Namespace = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {
                    "app.kubernetes.io/part-of": PART_OF, RUN_LABEL: self.run_id,
                    "istio-injection": "enabled"}}
            }))
            .map_err(|e| format!("namespace object: {e}"))?;
            create(&api, &obj).await?;
        }
        self.say(&format!("created {} namespaces", self.namespaces.len()));
        if self.cfg.router == Router::GatewayApi {
            self.add_service_cidr().await?;
        }
        Ok(())
    }

    /// A ServiceCIDR for the run: the Gateway API router gives each canary two ClusterIP
    /// Services, and the local control plane's own range (a /24) holds 254 addresses.
    async fn add_service_cidr(&mut self) -> Result<(), String> {
        let name = format!("rc-fleet-{}", self.run_id);
        let obj: ServiceCIDR = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/part-of": PART_OF, RUN_LABEL: self.run_id}},
            "spec": {"cidrs": [FLEET_SERVICE_CIDR]}
        }))
        .map_err(|e| format!("ServiceCIDR object: {e}"))?;
        create(&Api::<ServiceCIDR>::all(self.client.clone()), &obj).await?;
        self.service_cidr = Some(name.clone());
        self.say(&format!(
            "added ServiceCIDR {name} ({FLEET_SERVICE_CIDR}) for the canaries' Services"
        ));
        Ok(())
    }

    /// Until the mesh (the driver) has accepted every app's HTTPRoute: its first status writes
    /// are then behind the measured phases.
    async fn wait_routes_accepted(&self) -> Result<(), String> {
        let keys = self.route_keys();
        let deadline = self.deadline();
        self.wait_for("apps: HTTPRoutes accepted", deadline, || {
            let routes = self.routes.map();
            let pending: Vec<String> = keys
                .iter()
                .filter(|k| !routes.get(*k).is_some_and(|r| r.accepted))
                .map(|k| format!("HTTPRoute {}/{}: not accepted yet", k.0, k.1))
                .collect();
            Progress::new(
                keys.len(),
                pending,
                "HTTPRoutes accepted",
                self.routes.synced(),
            )
        })
        .await
    }

    /// Runs `f(client, i)` for i in 0..n on the parallel clients, with progress every 5 s.
    async fn parallel<F, Fut>(&self, what: &str, n: usize, f: F) -> Result<(), String>
    where
        F: Fn(Client, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let f = Arc::new(f);
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let tasks: Vec<_> = self
            .clients
            .iter()
            .map(|c| {
                let (f, next, done, c) = (f.clone(), next.clone(), done.clone(), c.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        if let Err(e) = f(c.clone(), i).await {
                            // The other workers stop at their next item.
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                            return Err(e);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let all = futures::future::join_all(tasks);
        tokio::pin!(all);
        loop {
            tokio::select! {
                results = &mut all => {
                    for r in results {
                        r.map_err(|e| format!("{what}: worker panicked: {e}"))??;
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    self.say(&format!("{what}: {}/{n} after {}", done.load(Ordering::Relaxed), secs(t.elapsed())));
                }
            }
        }
    }

    /// Re-evaluates `check` whenever a watched object changes, until all is done or `deadline`;
    /// prints progress every 5 s.
    async fn wait_for(
        &self,
        what: &str,
        deadline: Instant,
        mut check: impl FnMut() -> Progress,
    ) -> Result<(), String> {
        let t = Instant::now();
        let mut next_report = t + PROGRESS_EVERY;
        loop {
            let p = check();
            if p.synced && p.pending.is_empty() && p.done >= p.total {
                self.say(&format!(
                    "{what}: {}/{} {} after {}",
                    p.done,
                    p.total,
                    p.unit,
                    secs(t.elapsed())
                ));
                return Ok(());
            }
            // A controller that died fails the phase now, not at the deadline.
            self.check_controller()
                .map_err(|e| format!("{what}: {}/{} {}; {e}", p.done, p.total, p.unit))?;
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{what} did not finish within {}: {}/{} {}{}; still waiting for {} item(s), e.g.:\n  {}",
                    secs(deadline.saturating_duration_since(t)),
                    p.done,
                    p.total,
                    p.unit,
                    if p.synced {
                        ""
                    } else {
                        " (a watch never synced)"
                    },
                    p.pending.len(),
                    p.pending
                        .iter()
                        .take(8)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ));
            }
            if now >= next_report {
                let example = p.pending.first().cloned().unwrap_or_default();
                self.say(&format!(
                    "{what}: {}/{} {}{} (e.g. {example})",
                    p.done,
                    p.total,
                    p.unit,
                    if p.synced {
                        ""
                    } else {
                        ", watches not synced yet"
                    }
                ));
                next_report = now + PROGRESS_EVERY;
            }
            tokio::select! {
                _ = self.changed.notified() => {
                    // Let a burst of watch events land before evaluating again.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ = tokio::time::sleep_until(deadline.min(next_report).into()) => {}
            }
        }
    }

    /// Starts the controller process(es); with several, waits until each leads one shard Lease
    /// and records the split of the fleet between them.
    async fn start_controllers(&mut self, report: &mut FleetReport) -> Result<(), String> {
        let n = self.cfg.shards.max(1);
        let logs = report
            .log
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for k in 0..n {
            let log = log_path(&logs, &self.run_id, &self.cfg.tag, k, n);
            // Pushed at once: a later failure still stops the ones started.
            let c = self.start_controller(k, &log).await?;
            self.controllers.push(c);
        }
        if n > 1 {
            self.wait_for_shard_leases().await?;
        }
        let split = shard_split(&self.namespaces, self.cfg.canaries, n);
        report.processes = self
            .controllers
            .iter()
            .map(|c| {
                let (namespaces, canaries) =
                    split.get(c.shard as usize).copied().unwrap_or_default();
                ProcessInfo {
                    pid: c.pid,
                    identity: c.identity.clone(),
                    shard: c.shard,
                    namespaces,
                    canaries,
                    admin_port: c.port,
                    log: c.log.clone(),
                }
            })
            .collect();
        if n > 1 {
            let line = report
                .processes
                .iter()
                .map(|p| {
                    format!(
                        "shard {} (pid {}): {} namespaces, {} canaries",
                        p.shard, p.pid, p.namespaces, p.canaries
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            self.say(&format!("split: {line}"));
            if imbalance(&split) > self.cfg.canaries / n / 5 {
                let msg = format!(
                    "the namespaces split unevenly between the shards ({line}): with {} namespaces no run id tried did better",
                    self.cfg.namespaces
                );
                self.say(&format!("WARNING: {msg}"));
                report.notes.push(msg);
            }
        }
        Ok(())
    }

    /// The shard Leases' base name and namespace (the first fleet namespace: they go with it).
    fn shard_lease(&self) -> (&'static str, &str) {
        ("rc-fleet", &self.namespaces[0])
    }

    /// Until every controller process holds one shard Lease (at most 60 s); records which.
    async fn wait_for_shard_leases(&mut self) -> Result<(), String> {
        let n = self.controllers.len();
        let (base, ns) = self.shard_lease();
        let ns = ns.to_string();
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        let names: Vec<String> = (0..n)
            .map(|i| recording_canary::runtime::shard::Shard::lease_name(base, i as u32, n as u32))
            .collect();
        let identities: Vec<String> = self
            .controllers
            .iter()
            .map(|c| c.identity.clone())
            .collect();
        let t = Instant::now();
        let deadline = t + Duration::from_secs(60);
        loop {
            let mut holders = Vec::with_capacity(n);
            for name in &names {
                let lease = retry(&format!("get Lease {ns}/{name}"), || api.get_opt(name)).await?;
                holders.push(lease.and_then(|l| l.spec).and_then(|s| s.holder_identity));
            }
            let why = match shards_led(&holders, &identities) {
                Ok(led) => {
                    for (c, s) in self.controllers.iter_mut().zip(led) {
                        c.shard = s;
                    }
                    self.say(&format!(
                        "each of the {n} controllers leads one shard Lease ({ns}/{base}-shard-*) after {}",
                        secs(t.elapsed())
                    ));
                    return Ok(());
                }
                Err(why) => why,
            };
            self.check_controller()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "the {n} controllers did not each lead one shard Lease within 60 s: {why}; holders {holders:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts controller process k (of `cfg.shards`).
    async fn start_controller(&self, k: usize, log: &Path) -> Result<Controller, String> {
        let file =
            File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let out = file
            .try_clone()
            .map_err(|e| format!("cannot clone a log handle: {e}"))?;
        let shards = self.cfg.shards.max(1);
        let mut cmd = Command::new(crate::controller_bin());
        cmd.args(["run", "--admin-addr", "127.0.0.1:0"]);
        if shards > 1 {
            let (base, ns) = self.shard_lease();
            cmd.args(["--leader-elect=true", "--shards", &shards.to_string()]);
            cmd.args(["--lease-name", base, "--lease-namespace", ns]);
        } else {
            cmd.arg("--leader-elect=false");
        }
        // Every process gets the same scope, as every replica of the chart does.
        if !self.cfg.cluster_wide {
            for ns in self.namespaces.iter() {
                cmd.args(["--namespace", ns]);
            }
        }
        // Warnings only, plus the one info line that has an `addr` field: "admin server
        // listening … addr=127.0.0.1:PORT", which gives the /metrics port; RC_FLEET_RUST_LOG adds
        // directives (say `recording_canary::controller=debug`, to see each reconcile's writes).
        let mut rust_log = "warn,[{addr}]=info".to_string();
        if let Ok(more) = std::env::var("RC_FLEET_RUST_LOG")
            && !more.trim().is_empty()
        {
            rust_log = format!("{rust_log},{}", more.trim());
        }
        cmd.env("KUBECONFIG", &self.cfg.kubeconfig)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .env_remove("RC_NAMESPACES")
            .env_remove("RC_LEADER_ELECT")
            .env_remove("RC_ADMIN_ADDR")
            .env_remove("RC_LOG_FORMAT")
            .env_remove("RC_SHARDS")
            .env_remove("RC_LEASE_NAME")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE");
        // The Lease identity is POD_NAME-pid: distinct, and recognisable in the Leases.
        let pod_name = format!("rc-fleet-{}-p{k}", self.run_id);
        if shards > 1 {
            cmd.env("POD_NAME", &pod_name);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(|e| format!("cannot start the controller binary: {e}"))?;
        let pid = child.id();
        let mut c = Controller {
            pid,
            child,
            port: 0,
            log: log.to_path_buf(),
            identity: if shards > 1 {
                format!("{pod_name}-{pid}")
            } else {
                String::new()
            },
            shard: 0,
        };
        self.say(&format!(
            "controller {}pid {} ({}); log {}",
            if shards > 1 {
                format!("{}/{shards} ", k + 1)
            } else {
                String::new()
            },
            c.pid,
            if self.cfg.cluster_wide {
                "cluster-wide".to_string()
            } else {
                format!("{} namespaces", self.namespaces.len())
            },
            log.display()
        ));
        // The log is a file: poll it for the admin line.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(port) = admin_port(&std::fs::read_to_string(log).unwrap_or_default()) {
                c.port = port;
                return Ok(c);
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(format!(
                    "the controller exited ({status}) before its admin server listened; log {}:\n{}",
                    log.display(),
                    log_tail(log, 40)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no line with `admin server listening` and `addr=127.0.0.1:PORT` in the controller log within 30 s ({}):\n{}",
                    log.display(),
                    log_tail(log, 40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until the controllers' request counters (Leases aside: leader election renews them every
    /// 5 s) have not moved for 1 s (at most 20 s): their start-up lists and watches are not the
    /// fleet's.
    async fn settle(&self) {
        if self.controllers.is_empty() {
            return;
        }
        let t = Instant::now();
        let mut last: Option<Vec<Option<BTreeMap<Key, f64>>>> = None;
        let mut since = Instant::now();
        'wait: while t.elapsed() < Duration::from_secs(20) {
            let mut now = Vec::with_capacity(self.controllers.len());
            for c in &self.controllers {
                match controller_metrics(c.port).await {
                    Ok(text) => now.push(parse_api_requests(&text).map(without_leases)),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue 'wait;
                    }
                }
            }
            if last.as_ref() == Some(&now) {
                if since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            } else {
                last = Some(now);
                since = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let ports: Vec<String> = self
            .controllers
            .iter()
            .map(|c| c.port.to_string())
            .collect();
        self.say(&format!(
            "controller{} settled after {} (admin port{} {})",
            if ports.len() > 1 { "s" } else { "" },
            secs(t.elapsed()),
            if ports.len() > 1 { "s" } else { "" },
            ports.join(", ")
        ));
    }

    fn check_controller(&self) -> Result<(), String> {
        for c in &self.controllers {
            if proc_stat(c.pid).is_none() {
                return Err(format!(
                    "the controller (pid {}) is gone; log {}:\n{}",
                    c.pid,
                    c.log.display(),
                    log_tail(&c.log, 40)
                ));
            }
        }
        Ok(())
    }

    /// The snapshot at the end of a phase; when it cannot be taken (the controller is gone),
    /// the phase is recorded as unfinished, with why.
    async fn snapshot_or_record(
        &self,
        report: &mut FleetReport,
        name: &str,
        wall: Duration,
        outcome: &Result<(), String>,
    ) -> Result<Snapshot, String> {
        let taken = match self.check_controller() {
            Ok(()) => self.snapshot().await,
            Err(e) => Err(e),
        };
        taken.map_err(|e| {
            let why = outcome.clone().err().unwrap_or(e);
            report.phases.push(PhaseReport {
                name: name.to_string(),
                finished: false,
                wall,
                detail: why.clone(),
                ..PhaseReport::default()
            });
            why
        })
    }

    async fn snapshot(&self) -> Result<Snapshot, String> {
        let mut processes = Vec::with_capacity(self.controllers.len());
        for c in &self.controllers {
            let text = controller_metrics(c.port).await.map_err(|e| {
                format!(
                    "cannot read the controller's metrics on 127.0.0.1:{}: {e}; log {}:\n{}",
                    c.port,
                    c.log.display(),
                    log_tail(&c.log, 40)
                )
            })?;
            // The whole exposition, beside the log, for what the report does not show
            // (write echoes, watch lag): the last reading wins.
            let _ = std::fs::write(c.log.with_extension("metrics.txt"), &text);
            processes.push((
                parse_api_requests(&text),
                proc_stat(c.pid).unwrap_or_default(),
            ));
        }
        let calls_at = Instant::now();
        let calls = if processes.is_empty() {
            None
        } else {
            sum_calls(processes.iter().map(|(c, _)| c.as_ref()))
        };
        let proc_ = processes
            .iter()
            .fold(ProcStat::default(), |a, (_, p)| a.plus(p));
        let events = self.count_events().await?;
        let apiserver = match self
            .client
            .request_text(
                Request::new("")
                    .get("metrics", &GetParams::default())
                    .map_err(|e| e.to_string())?,
            )
            .await
        {
            Ok(text) => apiserver_requests(&text),
            Err(e) => {
                self.say(&format!("cannot read the apiserver's /metrics: {e}"));
                BTreeMap::new()
            }
        };
        Ok(Snapshot {
            calls,
            calls_at,
            events,
            left_ready: self.canaries.counted(),
            mesh_writes: self.mesh.as_ref().map_or(0, Mesh::writes),
            apiserver,
            proc: proc_,
            processes,
        })
    }

    /// Occurrences of Events about RecordingCanaries in the fleet namespaces.
    async fn count_events(&self) -> Result<u64, String> {
        let api: Api<Event> = Api::all(self.client.clone());
        let set: HashSet<&str> = self.namespaces.iter().map(String::as_str).collect();
        let mut lp = ListParams::default()
            .fields("involvedObject.kind=RecordingCanary")
            .limit(500);
        let mut total = 0u64;
        loop {
            let list = retry("list Events", || api.list(&lp)).await?;
            for e in &list.items {
                if e.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|ns| set.contains(ns))
                {
                    total += event_occurrences(e);
                }
            }
            match list.metadata.continue_.as_deref() {
                Some(c) if !c.is_empty() => lp = lp.continue_token(c),
                _ => break,
            }
        }
        Ok(total)
    }

    async fn cleanup(&mut self, report: &mut FleetReport) {
        self.mesh = None;
        self.naive = None;
        if !self.controllers.is_empty() {
            let n = self.controllers.len();
            self.controllers.clear();
            self.say(if n > 1 {
                "controllers stopped"
            } else {
                "controller stopped"
            });
        }
        if !self.created_namespaces {
            return;
        }
        // No controller runs any more to remove the finalizer of a canary left over (a failed run).
        let mut left = 0;
        for ns in self.namespaces.iter() {
            let api =
                Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &canary_resource());
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            for c in list.items {
                let Some(name) = c.metadata.name else {
                    continue;
                };
                left += 1;
                let _ = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        }
        if left > 0 {
            self.say(&format!(
                "removed the finalizer of {left} RecordingCanaries left over"
            ));
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        for ns in self.namespaces.iter().chain(&self.naive_ns) {
            if let Err(e) = delete(&api, ns).await {
                self.say(&format!("cannot delete namespace {ns}: {e}"));
            }
        }
        let t = Instant::now();
        let deadline = t + NAMESPACE_CLEANUP;
        let total = self.namespaces.len() + usize::from(self.naive_ns.is_some());
        let r = self
            .wait_for("namespace cleanup", deadline, || {
                let left = self.ns_tracker.map();
                let pending: Vec<String> = left.keys().map(|k| k.1.clone()).collect();
                Progress::new(total, pending, "namespaces gone", self.ns_tracker.synced())
            })
            .await;
        if let Err(e) = r {
            let msg = format!(
                "the fleet namespaces were not all gone after {}: {e}",
                secs(NAMESPACE_CLEANUP)
            );
            self.say(&msg);
            report.notes.push(msg);
        }
        // The apiserver removes it once its last address is released (its finalizer).
        if let Some(name) = self.service_cidr.take()
            && let Err(e) = delete(&Api::<ServiceCIDR>::all(self.client.clone()), &name).await
        {
            self.say(&format!("cannot delete ServiceCIDR {name}: {e}"));
        }
    }
}

/// Where a wait stands.
struct Progress {
    done: usize,
    total: usize,
    unit: &'static str,
    /// What is not done yet, one line each.
    pending: Vec<String>,
    synced: bool,
}

impl Progress {
    fn new(total: usize, pending: Vec<String>, unit: &'static str, synced: bool) -> Self {
        Self {
            done: if synced {
                total.saturating_sub(pending.len())
            } else {
                0
            },
            total,
            unit,
            pending,
            synced,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Watches

/// A watch over one kind whose objects (in the fleet namespaces) are kept as summaries.
struct Tracker<T> {
    map: Arc<Mutex<HashMap<Key, T>>>,
    synced: Arc<AtomicBool>,
    /// Updates that `start_counting`'s predicate counted (old summary, new summary).
    counted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl<T> Drop for Tracker<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Send + 'static> Tracker<T> {
    fn start<K, F>(
        api: Api<K>,
        config: watcher::Config,
        namespaces: Option<Arc<HashSet<String>>>,
        changed: Arc<Notify>,
        summarize: F,
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> T + Send + 'static,
    {
        Self::start_counting(api, config, namespaces, changed, summarize, |_, _| false)
    }

    /// `start`, also counting the updates of an object for which `counts(old, new)` holds.
    fn start_counting<K, F>(
        api: Api<K>,
        config: watcher::Config,
        namespaces: Option<Arc<HashSet<String>>>,
        changed: Arc<Notify>,
        summarize: F,
        counts: fn(&T, &T) -> bool,
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> T + Send + 'static,
    {
        Self::start_with(
            api,
            config,
            namespaces,
            changed,
            summarize,
            counts,
            |_, _| {},
        )
    }

    /// `start`, with `carry(old, new)` called on each update before the new summary replaces
    /// the old one (to keep what the old one knew, such as since when a value holds).
    fn start_carrying<K, F>(
        api: Api<K>,
        config: watcher::Config,
        namespaces: Option<Arc<HashSet<String>>>,
        changed: Arc<Notify>,
        summarize: F,
        carry: fn(&T, &mut T),
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> T + Send + 'static,
    {
        Self::start_with(
            api,
            config,
            namespaces,
            changed,
            summarize,
            |_, _| false,
            carry,
        )
    }

    fn start_with<K, F>(
        api: Api<K>,
        config: watcher::Config,
        namespaces: Option<Arc<HashSet<String>>>,
        changed: Arc<Notify>,
        summarize: F,
        counts: fn(&T, &T) -> bool,
        carry: fn(&T, &mut T),
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> T + Send + 'static,
    {
        let map: Arc<Mutex<HashMap<Key, T>>> = Arc::default();
        let synced = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(AtomicU64::new(0));
        let (m, s, n) = (map.clone(), synced.clone(), counted.clone());
        let task = tokio::spawn(async move {
            let key = |k: &K| -> Option<Key> {
                let meta = k.meta();
                let ns = meta.namespace.clone().unwrap_or_default();
                if namespaces.as_ref().is_some_and(|set| !set.contains(&ns)) {
                    return None;
                }
                Some((ns, meta.name.clone()?))
            };
            let mut buffer: Option<HashMap<Key, T>> = None;
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                // Errors are retried by the backoff; the stream goes on.
                let Ok(ev) = ev else { continue };
                match ev {
                    watcher::Event::Init => buffer = Some(HashMap::new()),
                    watcher::Event::InitApply(o) => {
                        if let (Some(b), Some(k)) = (buffer.as_mut(), key(&o)) {
                            b.insert(k, summarize(&o));
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(b) = buffer.take() {
                            *lock(&m) = b;
                        }
                        s.store(true, Ordering::Release);
                        changed.notify_one();
                    }
                    watcher::Event::Apply(o) => {
                        if let Some(k) = key(&o) {
                            let mut new = summarize(&o);
                            let mut map = lock(&m);
                            if let Some(old) = map.get(&k) {
                                if counts(old, &new) {
                                    n.fetch_add(1, Ordering::Relaxed);
                                }
                                carry(old, &mut new);
                            }
                            map.insert(k, new);
                            drop(map);
                            changed.notify_one();
                        }
                    }
                    watcher::Event::Delete(o) => {
                        if let Some(k) = key(&o) {
                            lock(&m).remove(&k);
                            changed.notify_one();
                        }
                    }
                }
            }
        });
        Self {
            map,
            synced,
            counted,
            task,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Key, T>> {
        lock(&self.map)
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// How many updates the predicate of `start_counting` counted so far.
    fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }
}

/// What the waits need of a RecordingCanary.
#[derive(Clone, Debug, Default)]
struct CanarySum {
    phase: String,
    current: Option<i64>,
    generation: Option<i64>,
    observed: Option<i64>,
    ready_message: String,
    deleting: bool,
}

impl CanarySum {
    fn of(o: &DynamicObject) -> Self {
        let st = o.data.get("status");
        let field = |f: &str| st.and_then(|s| s.get(f));
        let ready_message = field("conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| {
                let mut m = format!(
                    "{}: {}",
                    c["reason"].as_str().unwrap_or(""),
                    c["message"].as_str().unwrap_or("")
                );
                m.truncate(160);
                m
            })
            .unwrap_or_default();
        Self {
            phase: field("phase")
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_string(),
            current: field("currentPercent").and_then(Value::as_i64),
            generation: o.metadata.generation,
            observed: field("observedGeneration").and_then(Value::as_i64),
            ready_message,
            deleting: o.metadata.deletion_timestamp.is_some(),
        }
    }

    /// A flap: the canary was Ready for its current spec and is no longer, though neither the
    /// spec changed nor the canary is being deleted.
    fn left_ready(old: &Self, new: &Self) -> bool {
        old.phase == "Ready"
            && old.observed == old.generation
            && new.phase != "Ready"
            && new.generation == old.generation
            && !new.deleting
    }

    /// Ready at `percent`, for its current generation.
    fn at(&self, percent: i64) -> bool {
        self.phase == "Ready"
            && self.current == Some(percent)
            && (self.observed.is_none() || self.observed == self.generation)
    }

    fn describe(&self) -> String {
        format!(
            "phase {} currentPercent {:?} observedGeneration {:?}/{:?} Ready {}",
            self.phase, self.current, self.observed, self.generation, self.ready_message
        )
    }
}

/// What the waits need of a route (a VirtualService, or an HTTPRoute).
#[derive(Clone, Debug)]
struct RouteSum {
    /// VirtualService: the weight of each destination with subset `rcanary-recording`, in every
    /// HTTP route. HTTPRoute: per rule, the weight of its backendRefs to the recording Service
    /// and the weight of all its backendRefs (a backendRef's weight is 1 when unset).
    split: Vec<(i64, i64)>,
    /// Whether every parentRef reports `Accepted` and `ResolvedRefs` for the current generation
    /// (HTTPRoute; always true for a VirtualService, which has no such status).
    accepted: bool,
    /// When the watch delivered the first revision with this `split` (a status write does not
    /// move it).
    since: Instant,
}

impl RouteSum {
    fn of_virtual_service(vs: &DynamicObject) -> Self {
        let split = vs
            .data
            .pointer("/spec/http")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("route").and_then(Value::as_array))
            .flatten()
            .filter(|d| {
                d.pointer("/destination/subset").and_then(Value::as_str) == Some(RECORDING_SUBSET)
            })
            .map(|d| (d.get("weight").and_then(Value::as_i64).unwrap_or(0), 100))
            .collect();
        Self {
            split,
            accepted: true,
            since: Instant::now(),
        }
    }

    /// Route `app-i`: its recording Service is the canary's `app-i-recording`.
    fn of_http_route(r: &DynamicObject) -> Self {
        let v = serde_json::to_value(r).unwrap_or_default();
        let (_, recording) = backend_service_names(r.metadata.name.as_deref().unwrap_or_default());
        Self {
            split: http_route_split(&v, &recording),
            accepted: mesh_status(&v).is_none(),
            since: Instant::now(),
        }
    }

    fn carry_since(old: &Self, new: &mut Self) {
        if old.split == new.split {
            new.since = old.since;
        }
    }

    /// At `percent`: a VirtualService routes `percent` to the recording subset (in some HTTP
    /// route); an HTTPRoute gives the recording Service exactly `percent` % of every rule.
    fn at(&self, router: Router, percent: i64) -> bool {
        match router {
            Router::Istio => self.split.iter().any(|(w, _)| *w == percent),
            Router::GatewayApi => {
                !self.split.is_empty()
                    && self
                        .split
                        .iter()
                        .all(|(w, total)| *total > 0 && w * 100 == percent * total)
            }
        }
    }

    fn describe(&self, router: Router) -> String {
        match router {
            Router::Istio => format!(
                "{RECORDING_SUBSET} weights {:?}",
                self.split.iter().map(|(w, _)| w).collect::<Vec<_>>()
            ),
            Router::GatewayApi => format!(
                "(recording weight, rule weight) per rule {:?}{}",
                self.split,
                if self.accepted {
                    ""
                } else {
                    ", not accepted for its generation"
                }
            ),
        }
    }
}

/// Per rule of an HTTPRoute: the weight of its backendRefs to Service `recording`, and of all.
fn http_route_split(route: &Value, recording: &str) -> Vec<(i64, i64)> {
    route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|rule| {
            let refs = rule
                .get("backendRefs")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let weight = |b: &Value| b.get("weight").and_then(Value::as_i64).unwrap_or(1);
            let to_recording = refs
                .iter()
                .filter(|b| {
                    b.get("name").and_then(Value::as_str) == Some(recording)
                        && matches!(
                            b.get("kind").and_then(Value::as_str),
                            None | Some("Service")
                        )
                })
                .map(weight)
                .sum();
            (to_recording, refs.iter().map(weight).sum())
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The naive watcher

/// One patch of the ramp: a canary of the fleet, or of the naive watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RampItem {
    Fleet(usize),
    Naive(usize),
}

/// The ramp's `n + k` patches: the fleet's in order, with the naive watcher's `k` spread evenly
/// among them (never first, so that they meet the fleet's load).
fn ramp_items(n: usize, k: usize) -> Vec<RampItem> {
    let total = n + k;
    let naive_at: HashSet<usize> = (0..k).map(|m| (m + 1) * total / (k + 1)).collect();
    let (mut i, mut m) = (0, 0);
    (0..total)
        .map(|j| {
            if naive_at.contains(&j) && m < k || i >= n {
                m += 1;
                RampItem::Naive(m - 1)
            } else {
                i += 1;
                RampItem::Fleet(i - 1)
            }
        })
        .collect()
}

fn naive_name(m: usize) -> String {
    format!("naive-{m}")
}

/// The naive watcher's route for canary `name`, at the start weight: a VirtualService between
/// the two subsets, or an HTTPRoute (its Service as parent) between `<name>-stable` and
/// `<name>-recording`. No Deployment or Service behind it: only its weights matter here.
fn naive_route(name: &str, router: Router) -> DynamicObject {
    let v = match router {
        Router::Istio => json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name},
            "spec": {"hosts": [name], "http": [{"route": [
                {"destination": {"host": name, "subset": "rcanary-stable"}, "weight": 100 - START_PERCENT},
                {"destination": {"host": name, "subset": RECORDING_SUBSET}, "weight": START_PERCENT},
            ]}]}
        }),
        Router::GatewayApi => {
            let (stable, recording) = backend_service_names(name);
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
                         "rules": [{"backendRefs": [
                             {"name": stable, "port": 80, "weight": 100 - START_PERCENT},
                             {"name": recording, "port": 80, "weight": START_PERCENT},
                         ]}]}
            })
        }
    };
    serde_json::from_value(v).expect("naive route")
}

/// What the naive watcher writes: the weights of route `route` (named after its canary) set to
/// `100 - p` and `p`, as benches/naive_watcher.py does for a VirtualService.
fn naive_weights(route: &mut Value, router: Router, p: i64) {
    match router {
        Router::Istio => {
            for http in route
                .pointer_mut("/spec/http")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                for d in http
                    .get_mut("route")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let w = match d.pointer("/destination/subset").and_then(Value::as_str) {
                        Some("rcanary-stable") => 100 - p,
                        Some(RECORDING_SUBSET) => p,
                        _ => continue,
                    };
                    d["weight"] = json!(w);
                }
            }
        }
        Router::GatewayApi => {
            let name = route
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let (stable, recording) = backend_service_names(name);
            for rule in route
                .pointer_mut("/spec/rules")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                for b in rule
                    .get_mut("backendRefs")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let w = match b.get("name").and_then(Value::as_str) {
                        Some(s) if s == stable => 100 - p,
                        Some(r) if r == recording => p,
                        _ => continue,
                    };
                    b["weight"] = json!(w);
                }
            }
        }
    }
}

/// The naive watcher: per canary, what benches/naive_watcher.py does (a watch of the one
/// RecordingCanary; on every ADDED or MODIFIED event a GET of its route and a PUT with the
/// weights of its `spec.percent`; no cache, no retry: a refused PUT waits for the next event),
/// as a task instead of a process. Stops when dropped.
struct Naive {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Watches that opened at least once.
    watching: Arc<AtomicUsize>,
    /// Requests by verb (`watch`, `get`, `put`).
    requests: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Drop for Naive {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Naive {
    fn start(client: Client, ns: &str, k: usize, router: Router) -> Self {
        let watching = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let res = match router {
            Router::Istio => vs_resource(),
            Router::GatewayApi => http_route_resource(),
        };
        let tasks = (0..k)
            .map(|m| {
                let name = naive_name(m);
                let canaries =
                    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &canary_resource());
                let routes = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &res);
                let (watching, requests) = (watching.clone(), requests.clone());
                tokio::spawn(async move {
                    let count = |verb: &str| *lock(&requests).entry(verb.into()).or_insert(0) += 1;
                    let wp = WatchParams::default().fields(&format!("metadata.name={name}"));
                    let mut opened = false;
                    loop {
                        count("watch");
                        let stream = match canaries.watch(&wp, "0").await {
                            Ok(s) => s,
                            Err(_) => {
                                // Back off before the next attempt (the API server is busy).
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        };
                        if !opened {
                            opened = true;
                            watching.fetch_add(1, Ordering::Relaxed);
                        }
                        let mut stream = stream.boxed();
                        while let Some(Ok(ev)) = stream.next().await {
                            let rc = match ev {
                                WatchEvent::Added(o) | WatchEvent::Modified(o) => o,
                                WatchEvent::Error(_) => break,
                                _ => continue,
                            };
                            let Some(p) = rc.data.pointer("/spec/percent").and_then(Value::as_i64)
                            else {
                                continue;
                            };
                            count("get");
                            let Ok(route) = routes.get(&name).await else {
                                continue;
                            };
                            let mut v = serde_json::to_value(&route).unwrap_or_default();
                            naive_weights(&mut v, router, p);
                            let Ok(route) = serde_json::from_value::<DynamicObject>(v) else {
                                continue;
                            };
                            count("put");
                            // A conflict (someone else wrote the route): the next event.
                            let _ = routes.replace(&name, &PostParams::default(), &route).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            tasks,
            watching,
            requests,
        }
    }

    fn watching(&self) -> usize {
        self.watching.load(Ordering::Relaxed)
    }

    fn requests(&self) -> BTreeMap<String, u64> {
        lock(&self.requests).clone()
    }
}

// ------------------------------------------------------------------------------------------------
// The mesh

/// The driver playing the mesh of the Gateway API router: what Istio (or another GAMMA mesh)
/// does for a route it applies, and what the controller waits for before it reports Ready.
/// Watches the HTTPRoutes of the fleet namespaces; a route whose `status.parents` does not
/// accept its current generation gets, per parentRef, `Accepted` and `ResolvedRefs` True for it
/// (a merge patch of its status, at most [`MESH_PARALLEL`] at once). Its writes are counted apart
/// from the controller's. Stops when dropped.
struct Mesh {
    writes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mesh {
    fn start(client: Client, namespaces: Arc<HashSet<String>>) -> Self {
        let writes = Arc::new(AtomicU64::new(0));
        let w = writes.clone();
        let task = tokio::spawn(async move {
            let api = Api::<DynamicObject>::all_with(client.clone(), &http_route_resource());
            let limit = Arc::new(Semaphore::new(MESH_PARALLEL));
            // Per route (and uid): the last generation accepted or being accepted, so that a
            // revision delivered twice, or before the status write's own, is not written again.
            let written: Arc<Mutex<HashMap<Key, (String, i64)>>> = Arc::default();
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = stream.next().await {
                let Ok(r) = ev else { continue };
                let ns = r.metadata.namespace.clone().unwrap_or_default();
                if !namespaces.contains(&ns) {
                    continue;
                }
                let v = serde_json::to_value(&r).unwrap_or_default();
                let Some(parents) = mesh_status(&v) else {
                    continue;
                };
                let key = (ns.clone(), r.metadata.name.clone().unwrap_or_default());
                let uid = r.metadata.uid.clone().unwrap_or_default();
                let generation = r.metadata.generation.unwrap_or(0);
                {
                    let mut done = lock(&written);
                    if done
                        .get(&key)
                        .is_some_and(|(u, g)| *u == uid && *g >= generation)
                    {
                        continue;
                    }
                    done.insert(key.clone(), (uid, generation));
                }
                let (client, limit, w) = (client.clone(), limit.clone(), w.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = limit.acquire_owned().await else {
                        return;
                    };
                    let api = Api::<DynamicObject>::namespaced_with(
                        client,
                        &key.0,
                        &http_route_resource(),
                    );
                    let (pp, patch) = (
                        PatchParams::default(),
                        Patch::Merge(json!({"status": {"parents": parents}})),
                    );
                    let what = format!("accept HTTPRoute {}/{}", key.0, key.1);
                    if retry(&what, || api.patch_status(&key.1, &pp, &patch))
                        .await
                        .is_ok()
                    {
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Self { writes, task }
    }

    /// Status writes so far.
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// The `status.parents` the mesh writes on a route, or None when the route's status already
/// accepts its current generation on every parentRef.
fn mesh_status(route: &Value) -> Option<Value> {
    let parents = route
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if parents
        .iter()
        .all(|p| accepted_for_current_generation(route, p))
    {
        return None;
    }
    let generation = route
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let cond = |t: &str| {
        json!({"type": t, "status": "True", "reason": t, "message": "accepted by the fleet driver's mesh",
               "observedGeneration": generation, "lastTransitionTime": now})
    };
    Some(Value::Array(
        parents
            .iter()
            .map(|p| {
                json!({"parentRef": p, "controllerName": MESH_CONTROLLER,
                       "conditions": [cond("Accepted"), cond("ResolvedRefs")]})
            })
            .collect(),
    ))
}

// ------------------------------------------------------------------------------------------------
// Objects and API calls

fn canary_resource() -> ApiResource {
    ApiResource {
        group: "recordingcanary.dev".into(),
        version: "v1alpha1".into(),
        api_version: "recordingcanary.dev/v1alpha1".into(),
        kind: "RecordingCanary".into(),
        plural: "recordingcanaries".into(),
    }
}

fn vs_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    }
}

fn deployment_json(name: &str, replicas: i32, pod_labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": pod_labels},
                              "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}
    })
}

fn floor_deployment(name: &str, run_id: &str) -> Deployment {
    serde_json::from_value(deployment_json(
        name,
        1,
        json!({"app": name, FLOOR_LABEL: run_id}),
    ))
    .expect("floor Deployment")
}

fn app_deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(deployment_json(name, replicas, json!({"app": name})))
        .expect("target Deployment")
}

fn app_service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        // Headless: the controller needs only the selector, and a thousand ClusterIPs would
        // exhaust the local control plane's small Service range.
        "spec": {"clusterIP": "None", "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}
    }))
    .expect("Service")
}

/// The user's HTTPRoute of an app: its Service as parent (GAMMA), as in
/// examples/gateway-api/route.yaml; with `two_rules`, a header-matched rule with a timeout
/// before the default one.
fn app_route(name: &str, two_rules: bool) -> DynamicObject {
    let backend = json!([{"name": name, "port": 80}]);
    let rules = if two_rules {
        json!([
            {"name": "canary-test",
             "matches": [{"headers": [{"name": "x-canary-test", "value": "1"}]}],
             "timeouts": {"request": "10s"},
             "backendRefs": backend},
            {"name": "default", "backendRefs": backend},
        ])
    } else {
        json!([{"backendRefs": backend}])
    };
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
                 "rules": rules}
    }))
    .expect("HTTPRoute")
}

fn canary(name: &str, run_id: &str, router: Router) -> DynamicObject {
    let mut spec = json!({"targetRef": {"name": name}, "percent": START_PERCENT});
    if router == Router::GatewayApi {
        spec["router"] = json!("GatewayAPI");
    }
    serde_json::from_value(json!({
        "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
        "metadata": {"name": name, "labels": {RUN_LABEL: run_id}},
        "spec": spec
    }))
    .expect("RecordingCanary")
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// `op`, retried on throttling, 5xx and connection errors (6 attempts, 0.2 s doubling).
async fn retry<T, Fut>(what: &str, mut op: impl FnMut() -> Fut) -> Result<T, String>
where
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 6 && transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// Creates `obj`; one that already exists (a retried create) is fine.
async fn create<K>(api: &Api<K>, obj: &K) -> Result<(), String>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let what = format!(
        "create {} {}/{name}",
        api.resource_url(),
        obj.meta().namespace.clone().unwrap_or_default()
    );
    let pp = PostParams::default();
    match retry(&what, || api.create(&pp, obj)).await {
        Ok(_) => Ok(()),
        Err(e) if e.contains("AlreadyExists") || e.contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes `name`; one that is already gone is fine.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), String>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let what = format!("delete {} {name}", api.resource_url());
    let dp = DeleteParams::background();
    match retry(&what, || api.delete(name, &dp)).await {
        Ok(_) => Ok(()),
        Err(e) if e.contains("NotFound") || e.contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}

/// How many times an Event happened: the larger of `count` (missing or 0 counts as 1) and
/// `series.count`.
pub fn event_occurrences(e: &Event) -> u64 {
    let count = e.count.unwrap_or(0).max(1) as u64;
    let series = e.series.as_ref().and_then(|s| s.count).unwrap_or(0).max(0) as u64;
    count.max(series)
}

// ------------------------------------------------------------------------------------------------
// Measurements

#[derive(Clone, Debug)]
struct Snapshot {
    /// None when the controller does not expose the metric.
    calls: Option<BTreeMap<Key, f64>>,
    /// When the controller's metrics were read.
    calls_at: Instant,
    events: u64,
    /// Canaries seen leaving Ready with no change of spec (`CanarySum::left_ready`), so far.
    left_ready: u64,
    /// The driver's route status writes as the mesh, so far.
    mesh_writes: u64,
    apiserver: BTreeMap<String, f64>,
    /// The sums over the controller processes.
    proc: ProcStat,
    /// Each controller process's calls and /proc figures.
    processes: Vec<(Option<BTreeMap<Key, f64>>, ProcStat)>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub cpu_ticks: u64,
}

impl ProcStat {
    /// Both processes' figures added (the peak: the sum of the peaks).
    fn plus(self, o: &ProcStat) -> ProcStat {
        ProcStat {
            rss_kib: self.rss_kib + o.rss_kib,
            hwm_kib: self.hwm_kib + o.hwm_kib,
            cpu_ticks: self.cpu_ticks + o.cpu_ticks,
        }
    }
}

/// The processes' request counters added; None when one of them lacks the metric.
fn sum_calls<'a>(
    each: impl IntoIterator<Item = Option<&'a BTreeMap<Key, f64>>>,
) -> Option<BTreeMap<Key, f64>> {
    let mut out = BTreeMap::new();
    for m in each {
        for (k, v) in m? {
            *out.entry(k.clone()).or_insert(0.0) += v;
        }
    }
    Some(out)
}

/// The request counters without the Leases' (leader election).
fn without_leases(m: BTreeMap<Key, f64>) -> BTreeMap<Key, f64> {
    m.into_iter().filter(|((_, r), _)| r != "leases").collect()
}

fn delta<K: Ord + Clone>(a: &BTreeMap<K, f64>, b: &BTreeMap<K, f64>) -> BTreeMap<K, u64> {
    b.iter()
        .map(|(k, v)| {
            let d = v - a.get(k).copied().unwrap_or(0.0);
            (k.clone(), d.max(0.0).round() as u64)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// VmRSS, VmHWM (/proc/PID/status) and utime + stime (/proc/PID/stat, clock ticks); None when
/// the process is gone (or a zombie).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the `(comm)` field: state is field 3, utime field 14, stime field 15.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if rest.first() == Some(&"Z") {
        return None;
    }
    let tick = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcStat {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:").unwrap_or(0),
        cpu_ticks: tick(11) + tick(12),
    })
}

/// GET http://127.0.0.1:PORT/metrics (plain HTTP/1.0, so the body ends with the connection).
async fn controller_metrics(port: u16) -> Result<String, String> {
    tokio::task::spawn_blocking(move || -> Result<String, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not an HTTP response: {text:.200}"))?;
        let code = head.split_whitespace().nth(1).unwrap_or("");
        if !head.starts_with("HTTP/1.") || code != "200" {
            return Err(format!(
                "unexpected response: {}",
                head.lines().next().unwrap_or("")
            ));
        }
        Ok(body.to_string())
    })
    .await
    .map_err(|e| format!("metrics reader: {e}"))?
}

/// `recording_canary_api_requests_total` by (verb, resource); None when the metric is absent.
pub fn parse_api_requests(text: &str) -> Option<BTreeMap<Key, f64>> {
    let mut present = false;
    let mut out: BTreeMap<Key, f64> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(meta) = line.strip_prefix('#') {
            // `# TYPE recording_canary_api_requests counter` (a family without samples yet).
            let name = meta.split_whitespace().nth(1).unwrap_or("");
            if name == API_METRIC || name == format!("{API_METRIC}_total") {
                present = true;
            }
            continue;
        }
        let Some((name, labels, value)) = parse_sample(line) else {
            continue;
        };
        if name != format!("{API_METRIC}_total") && name != API_METRIC {
            continue;
        }
        present = true;
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((get("verb").to_lowercase(), get("resource")))
            .or_default() += value;
    }
    present.then_some(out)
}

/// `apiserver_request_total` summed by verb.
pub fn apiserver_requests(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with("apiserver_request_total{") {
            continue;
        }
        if let Some((_, labels, v)) = parse_sample(line) {
            *out.entry(labels.get("verb").cloned().unwrap_or_default())
                .or_insert(0.0) += v;
        }
    }
    out
}

/// One Prometheus/OpenMetrics sample: `name{a="x",b="y"} value [timestamp]`.
pub fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    end = i + 1;
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                o => value.push(o),
                            },
                            '"' => break,
                            o => value.push(o),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                o => key.push(o),
            }
        }
        rest = &r[end..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

/// The port of `admin server listening … addr=127.0.0.1:PORT` in a (text-format) log.
pub fn admin_port(log: &str) -> Option<u16> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("admin server listening"))
        .find_map(|l| {
            let a = &l[l.find("addr=")? + "addr=".len()..];
            let a = a
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()?
                .trim_matches('"');
            a.parse::<SocketAddr>().ok().map(|s| s.port())
        })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A controller process; killed (SIGKILL) when dropped.
struct Controller {
    child: Child,
    pid: u32,
    port: u16,
    log: PathBuf,
    /// Its identity in the shard Leases (empty with one process).
    identity: String,
    /// The shard it leads (0 with one process).
    shard: u32,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_requests_are_parsed_whatever_the_label_order() {
        let text = "# HELP recording_canary_api_requests Requests.\n\
                    # TYPE recording_canary_api_requests counter\n\
                    recording_canary_api_requests_total{verb=\"patch\",resource=\"pods\"} 12\n\
                    recording_canary_api_requests_total{resource=\"recordingcanaries/status\",verb=\"PATCH\"} 3\n\
                    recording_canary_api_requests_total{resource=\"events\",verb=\"create\"} 4 1700000000\n\
                    recording_canary_reconciles_total 9\n\
                    # EOF\n";
        let m = parse_api_requests(text).expect("present");
        assert_eq!(m[&("patch".into(), "pods".into())], 12.0);
        assert_eq!(m[&("patch".into(), "recordingcanaries/status".into())], 3.0);
        assert_eq!(m[&("create".into(), "events".into())], 4.0);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn an_empty_family_is_present_and_a_missing_one_is_not() {
        let empty = "# TYPE recording_canary_api_requests counter\n# EOF\n";
        assert_eq!(parse_api_requests(empty), Some(BTreeMap::new()));
        let none =
            "# TYPE recording_canary_reconciles counter\nrecording_canary_reconciles_total 1\n";
        assert_eq!(parse_api_requests(none), None);
    }

    #[test]
    fn calls_exclude_events_and_writes_include_them() {
        let mut p = PhaseReport::default();
        for (v, r, n) in [
            ("get", "pods", 5),
            ("patch", "pods", 2),
            ("create", "events", 3),
            ("watch", "deployments", 1),
        ] {
            p.calls.insert((v.into(), r.into()), n);
        }
        assert_eq!(p.calls_total(), 8);
        assert_eq!(p.event_calls(), 3);
        assert_eq!(p.writes(), 5);
        assert_eq!(p.writes_breakdown(), "3 create events, 2 patch pods");
    }

    #[test]
    fn apiserver_requests_are_summed_by_verb() {
        let text = "# HELP apiserver_request_total x\n\
            apiserver_request_total{code=\"200\",component=\"apiserver\",resource=\"pods\",verb=\"GET\"} 10\n\
            apiserver_request_total{code=\"404\",component=\"apiserver\",resource=\"pods\",verb=\"GET\"} 2\n\
            apiserver_request_total{code=\"201\",resource=\"a,b{c}\",verb=\"POST\"} 1e+01\n\
            apiserver_request_duration_seconds_count{verb=\"GET\"} 99\n";
        let m = apiserver_requests(text);
        assert_eq!(m["GET"], 12.0);
        assert_eq!(m["POST"], 10.0);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn the_admin_port_is_read_from_the_text_log() {
        let log = "2026-01-01T00:00:00Z  WARN x: y\n\
            2026-01-01T00:00:00Z  INFO recording_canary: admin server listening (/metrics, /healthz, /readyz) addr=127.0.0.1:34157\n";
        assert_eq!(admin_port(log), Some(34157));
        let colored = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m admin server listening \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:8080\n";
        assert_eq!(admin_port(colored), Some(8080));
        assert_eq!(admin_port("nothing here\n"), None);
    }

    #[test]
    fn lease_calls_are_neither_calls_nor_steady_writes() {
        let mut p = PhaseReport::default();
        for (v, r, n) in [
            ("get", "leases", 2),
            ("update", "leases", 2),
            ("patch", "virtualservices", 1),
        ] {
            p.calls.insert((v.into(), r.into()), n);
        }
        assert_eq!(p.calls_total(), 1);
        assert_eq!(p.lease_calls(), 4);
        assert_eq!(p.writes(), 1);
        assert_eq!(p.writes_breakdown(), "1 patch virtualservices");
    }

    #[test]
    fn the_split_counts_every_namespace_and_canary_once() {
        let ns = fleet_namespaces("abcde", 10);
        for shards in 1..=4 {
            let split = shard_split(&ns, 105, shards);
            assert_eq!(split.len(), shards);
            assert_eq!(split.iter().map(|s| s.0).sum::<usize>(), 10);
            assert_eq!(split.iter().map(|s| s.1).sum::<usize>(), 105);
        }
        // Each namespace is where the controller's hash puts it.
        let split = shard_split(&ns, 100, 2);
        let in_0 = ns
            .iter()
            .filter(|n| recording_canary::runtime::shard::Shard::of(n, 2) == 0)
            .count();
        assert_eq!(split[0], (in_0, in_0 * 10));
        // One shard: everything.
        assert_eq!(shard_split(&ns, 100, 1), vec![(10, 100)]);
    }

    #[test]
    fn the_run_id_is_picked_for_an_even_split() {
        let ids: Vec<String> = (0..64).map(|i| format!("r{i:03}")).collect();
        let id = pick_run_id(ids.clone(), 10, 100, 2);
        assert!(ids.contains(&id));
        assert_eq!(
            imbalance(&shard_split(&fleet_namespaces(&id, 10), 100, 2)),
            0
        );
        // No candidate is even (one namespace): the least uneven, the first of equals.
        assert_eq!(pick_run_id(ids.clone(), 1, 100, 2), "r000");
        assert_eq!(pick_run_id(Vec::<String>::new(), 10, 100, 2), "");
    }

    #[test]
    fn each_process_must_lead_exactly_one_shard() {
        let ids = vec!["a-1".to_string(), "b-2".to_string()];
        let h = |v: &[Option<&str>]| -> Vec<Option<String>> {
            v.iter().map(|o| o.map(str::to_string)).collect()
        };
        assert_eq!(
            shards_led(&h(&[Some("b-2"), Some("a-1")]), &ids),
            Ok(vec![1, 0])
        );
        assert!(shards_led(&h(&[Some("a-1"), None]), &ids).is_err());
        assert!(shards_led(&h(&[Some("a-1"), Some("a-1")]), &ids).is_err());
        assert!(shards_led(&h(&[Some("a-1"), Some("old-9")]), &ids).is_err());
    }

    #[test]
    fn several_processes_add_up_and_one_without_the_metric_voids_the_sum() {
        let m = |n: f64| -> BTreeMap<Key, f64> {
            [(("get".to_string(), "pods".to_string()), n)].into()
        };
        let (a, b) = (m(2.0), m(3.0));
        assert_eq!(sum_calls([Some(&a), Some(&b)]), Some(m(5.0)));
        assert_eq!(sum_calls([Some(&a), None]), None);
        let p = ProcStat {
            rss_kib: 10,
            hwm_kib: 12,
            cpu_ticks: 3,
        }
        .plus(&ProcStat {
            rss_kib: 1,
            hwm_kib: 2,
            cpu_ticks: 4,
        });
        assert_eq!((p.rss_kib, p.hwm_kib, p.cpu_ticks), (11, 14, 7));
        let mut l = m(1.0);
        l.insert(("update".into(), "leases".into()), 9.0);
        assert_eq!(without_leases(l), m(1.0));
    }

    fn route_json(rules: Value) -> Value {
        json!({"metadata": {"name": "app-3", "namespace": "ns", "generation": 4},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "app-3", "port": 80}],
                        "rules": rules}})
    }

    #[test]
    fn an_http_route_is_at_a_percent_only_when_every_rule_gives_the_recording_service_that_share() {
        let split = |a: Value| http_route_split(&route_json(a), "app-3-recording");
        let at = |split: Vec<(i64, i64)>, p: i64| {
            RouteSum {
                split,
                accepted: true,
                since: Instant::now(),
            }
            .at(Router::GatewayApi, p)
        };
        let pair = |s: i64, r: i64| {
            json!({"backendRefs": [{"name": "app-3-stable", "port": 80, "weight": s},
                                   {"name": "app-3-recording", "port": 80, "weight": r}]})
        };
        // 9:1 is 10 %, in both rules; 4:1 is 20 %.
        assert!(at(split(json!([pair(9, 1), pair(90, 10)])), 10));
        assert!(!at(split(json!([pair(9, 1), pair(90, 10)])), 20));
        assert!(at(split(json!([pair(4, 1)])), 20));
        // One rule not split yet: not at 10.
        let unsplit = json!({"backendRefs": [{"name": "app-3", "port": 80}]});
        assert_eq!(split(json!([pair(9, 1), unsplit])), vec![(1, 10), (0, 1)]);
        assert!(!at(split(json!([pair(9, 1), unsplit])), 10));
        // Unset weights are 1; no rules is no split.
        let unweighted =
            json!({"backendRefs": [{"name": "app-3-stable"}, {"name": "app-3-recording"}]});
        assert!(at(split(json!([unweighted])), 50));
        assert!(!at(split(json!([])), 0));
        // A VirtualService: some HTTP route with the weight, as before.
        let vs = RouteSum {
            split: vec![(0, 100), (20, 100)],
            accepted: true,
            since: Instant::now(),
        };
        assert!(vs.at(Router::Istio, 20) && !vs.at(Router::Istio, 10));
    }

    #[test]
    fn the_mesh_accepts_each_parent_for_the_current_generation_and_then_leaves_the_route_alone() {
        let mut r = route_json(json!([{"backendRefs": [{"name": "app-3", "port": 80}]}]));
        let parents = mesh_status(&r).expect("a new route is accepted");
        assert_eq!(parents.as_array().map(Vec::len), Some(1));
        assert_eq!(parents[0]["parentRef"], r["spec"]["parentRefs"][0]);
        r["status"] = json!({"parents": parents});
        assert!(mesh_status(&r).is_none(), "accepted: nothing to write");
        // A new generation (the controller's split) is accepted again.
        r["metadata"]["generation"] = json!(5);
        let again = mesh_status(&r).expect("the new generation");
        assert_eq!(again[0]["conditions"][1]["type"], "ResolvedRefs");
        assert_eq!(again[0]["conditions"][1]["observedGeneration"], 5);
    }

    #[test]
    fn the_naive_watcher_sets_both_weights_of_each_kind_of_route() {
        let mut hr = naive_route("naive-2", Router::GatewayApi).data;
        hr["metadata"] = json!({"name": "naive-2"});
        naive_weights(&mut hr, Router::GatewayApi, 20);
        assert_eq!(http_route_split(&hr, "naive-2-recording"), vec![(20, 100)]);
        let mut vs = serde_json::to_value(naive_route("naive-2", Router::Istio)).unwrap();
        naive_weights(&mut vs, Router::Istio, 20);
        let vs: DynamicObject = serde_json::from_value(vs).unwrap();
        assert_eq!(RouteSum::of_virtual_service(&vs).split, vec![(20, 100)]);
        assert_eq!(
            vs.data["spec"]["http"][0]["route"][0]["weight"],
            json!(80),
            "the stable subset"
        );
    }

    #[test]
    fn the_ramp_spreads_the_naive_patches_among_the_fleets_and_keeps_each_once() {
        let items = ramp_items(10, 3);
        assert_eq!(items.len(), 13);
        assert_eq!(items[0], RampItem::Fleet(0), "never first");
        let naive: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i, RampItem::Naive(_)))
            .map(|(j, _)| j)
            .collect();
        assert_eq!(naive, vec![3, 6, 9]);
        let fleet: Vec<usize> = items
            .iter()
            .filter_map(|i| match i {
                RampItem::Fleet(i) => Some(*i),
                RampItem::Naive(_) => None,
            })
            .collect();
        assert_eq!(fleet, (0..10).collect::<Vec<_>>());
        assert_eq!(ramp_items(4, 0).len(), 4);
        // More naive canaries than the fleet's: all of them still, once.
        let many = ramp_items(2, 5);
        assert_eq!(
            many.iter()
                .filter(|i| matches!(i, RampItem::Naive(_)))
                .count(),
            5
        );
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        let ms = Duration::from_millis;
        let l = Latency::new((1..=100).rev().map(ms).collect(), 2);
        assert_eq!(l.percentile(50.0), Some(ms(50)));
        assert_eq!(l.percentile(99.0), Some(ms(99)));
        assert_eq!(l.percentile(100.0), Some(ms(100)));
        let few = Latency::new(vec![ms(30), ms(10), ms(20)], 0);
        assert_eq!(few.percentile(99.0), Some(ms(30)));
        assert_eq!(few.percentile(1.0), Some(ms(10)));
        assert_eq!(Latency::default().percentile(99.0), None);
        assert_eq!(Router::parse("gateway"), Some(Router::GatewayApi));
        assert_eq!(Router::parse(""), Some(Router::Istio));
        assert_eq!(Router::parse("linkerd"), None);
    }

    #[test]
    fn an_event_counts_its_largest_count() {
        let ev = |count: Option<i32>, series: Option<i32>| -> Event {
            serde_json::from_value(json!({
                "metadata": {"name": "e"}, "involvedObject": {},
                "count": count,
                "series": series.map(|c| json!({"count": c})),
            }))
            .expect("event")
        };
        assert_eq!(event_occurrences(&ev(None, None)), 1);
        assert_eq!(event_occurrences(&ev(Some(0), None)), 1);
        assert_eq!(event_occurrences(&ev(Some(4), None)), 4);
        assert_eq!(event_occurrences(&ev(Some(1), Some(6))), 6);
    }
}
