//! The make-before-break watcher that runs beside every test.
//!
//! It watches the test namespace's VirtualServices and DestinationRules and records every revision
//! it sees, whole. Beside them it watches, keeping little of each revision, the namespace's
//! EndpointSlices (their Service and the pods they list as Ready endpoints), Pods (name and
//! labels) and RecordingCanaries (their Service and `propagationDelay`). At the end, the revisions
//! of all five kinds are replayed in resourceVersion order (they are etcd revisions, so they order
//! writes across kinds) and these are checked at every step:
//!
//! * a VirtualService revision must not route to a subset that no DestinationRule for that host
//!   defines at that moment (make before break on the way in);
//! * a DestinationRule revision (or deletion) must not take away a subset that a live
//!   VirtualService still routes to (make before break on the way out);
//! * a VirtualService revision must not give weight (or mirrored traffic) to a subset that has
//!   no Ready endpoint at that moment: Istio builds a subset's endpoints from the Service's
//!   EndpointSlices, so at least one pod must be a Ready endpoint in an EndpointSlice of the
//!   host's Service and carry the labels the DestinationRule gives the subset, or the requests
//!   sent there fail (503 UH);
//! * and the waits between them: a subset is first routed to no sooner than the canary's
//!   `propagationDelay` after it appeared in a DestinationRule, and leaves the DestinationRule no
//!   sooner than that after the last route to it went, both less [`WATCH_MARGIN`]; unless Istio
//!   reported the revision waited on `Reconciled` first, which may end the wait early. Without a
//!   canary for the host's Service, the wait is [`MIN_GAP`].
//!
//! Tests that play istiod also check [`MakeBeforeBreak::istio_order`]: each dependent write comes
//! after Istio's `Reconciled` report on the revision it depends on.

/// Live VirtualServices: name → (revision, (host, subset) routed to).
type Routes = BTreeMap<String, (u64, BTreeSet<(String, String)>)>;

/// Live DestinationRules: name → (host, subset name → the pod labels it selects).
type Subsets = BTreeMap<String, (String, BTreeMap<String, Labels>)>;

type Labels = BTreeMap<String, String>;

/// A subset of a host: (normalised host, subset name).
type Key = (String, String);

/// The shortest wait accepted between dependent writes when no canary of the host's Service is
/// known (the tests' shortest `propagationDelay` is 1 s, less a margin for watch delivery).
pub const MIN_GAP: Duration = Duration::from_millis(900);

/// What the wait between two dependent writes may lose, as the watcher sees it, against the
/// canary's `propagationDelay`. The controller waits from its first write's response to the
/// sending of the second, so the two commits are at least the delay apart; the watcher takes each
/// write's time when its watch delivers it, and the two writes come through two watches (one per
/// kind), each with its own lag behind the write's response. Only the difference of the two lags
/// can shorten the wait the watcher sees. Measured on the local control plane at a load average
/// of 10 on two cores (60 writes of each kind, the time from the write's response to the watch's
/// delivery): between -8 and +1.4 ms for DestinationRules, between -11 and +7.7 ms for
/// VirtualServices, so at most about 20 ms lost. 250 ms leaves ten times that for a busier
/// machine (two test threads, a stalled scheduler), and still refuses any wait cut short by more
/// than a quarter of a second, which a 1 s, 3 s or 10 s delay cut to the old fixed 0.9 s is not.
pub const WATCH_MARGIN: Duration = Duration::from_millis(250);

/// The label the endpoint-slice controller puts on the EndpointSlices of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, ListParams, ObjectList, PartialObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::support::{canary_resource, dr_resource, vs_resource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    VirtualService,
    DestinationRule,
}

/// One revision of one VirtualService or DestinationRule, as seen by the watch.
#[derive(Debug, Clone)]
pub struct Revision {
    pub rv: u64,
    pub kind: Kind,
    pub name: String,
    pub deleted: bool,
    /// When the watch delivered it.
    pub seen: Instant,
    /// The object (for a deletion: its last state).
    pub object: Value,
}

impl Revision {
    /// DestinationRule: (normalised host, subset names defined).
    fn dr_subsets(&self, ns: &str) -> (String, BTreeSet<String>) {
        let (host, subsets) = self.dr_subset_labels(ns);
        (host, subsets.into_keys().collect())
    }

    /// DestinationRule: (normalised host, subset name → the labels it selects).
    fn dr_subset_labels(&self, ns: &str) -> (String, BTreeMap<String, Labels>) {
        let host = self
            .object
            .pointer("/spec/host")
            .and_then(Value::as_str)
            .map(|h| normalise_host(h, ns))
            .unwrap_or_default();
        let subsets = self
            .object
            .pointer("/spec/subsets")
            .and_then(Value::as_array)
            .map(|ss| {
                ss.iter()
                    .filter_map(|s| {
                        let name = s.get("name").and_then(Value::as_str)?;
                        let labels = s
                            .get("labels")
                            .and_then(Value::as_object)
                            .map(|l| {
                                l.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").into()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        Some((name.to_string(), labels))
                    })
                    .collect()
            })
            .unwrap_or_default();
        (host, subsets)
    }

    /// VirtualService: every (normalised host, subset) a destination refers to.
    fn vs_refs(&self, ns: &str) -> BTreeSet<(String, String)> {
        self.vs_destinations(ns)
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    /// VirtualService: every (normalised host, subset) a destination or mirror refers to, with
    /// the share of traffic it gives there in percent. A route's destination without a weight
    /// gets all of the route's traffic when it is the only one and none otherwise (as Istio
    /// reads it); a mirror without a percentage gets all of it.
    fn vs_destinations(&self, ns: &str) -> Vec<(Key, f64)> {
        let mut out = Vec::new();
        let mut add = |d: &Value, share: f64| {
            if let (Some(h), Some(s)) = (
                d.get("host").and_then(Value::as_str),
                d.get("subset").and_then(Value::as_str),
            ) {
                out.push(((normalise_host(h, ns), s.to_string()), share));
            }
        };
        let percent = |v: Option<&Value>| v.and_then(Value::as_f64).unwrap_or(100.0);
        for section in ["http", "tcp", "tls"] {
            let Some(routes) = self
                .object
                .pointer(&format!("/spec/{section}"))
                .and_then(Value::as_array)
            else {
                continue;
            };
            for r in routes {
                let dests = r.get("route").and_then(Value::as_array);
                let alone = dests.is_some_and(|ds| ds.len() == 1);
                for d in dests.into_iter().flatten() {
                    if let Some(dest) = d.get("destination") {
                        let share = match d.get("weight").and_then(Value::as_f64) {
                            Some(w) => w,
                            None if alone => 100.0,
                            None => 0.0,
                        };
                        add(dest, share);
                    }
                }
                if let Some(m) = r.get("mirror") {
                    let share = percent(
                        r.pointer("/mirrorPercentage/value")
                            .or_else(|| r.get("mirrorPercent")),
                    );
                    add(m, share);
                }
                for m in r
                    .get("mirrors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(dest) = m.get("destination") {
                        add(dest, percent(m.pointer("/percentage/value")));
                    }
                }
            }
        }
        out
    }

    fn summary(&self, ns: &str) -> String {
        let what = match self.kind {
            Kind::VirtualService => {
                let refs: Vec<String> = self
                    .vs_refs(ns)
                    .into_iter()
                    .map(|(h, s)| format!("{h}/{s}"))
                    .collect();
                let weights: Vec<String> = crate::support::http_destinations(&self.object)
                    .into_iter()
                    .map(|ds| {
                        ds.into_iter()
                            .map(|(h, s, w)| {
                                format!(
                                    "{}{}={}",
                                    h.split('.').next().unwrap_or_default(),
                                    s.map(|s| format!("/{s}")).unwrap_or_default(),
                                    w.map(|w| w.to_string()).unwrap_or_else(|| "-".into())
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect();
                format!(
                    "routes to subsets [{}]; http [{}]",
                    refs.join(", "),
                    weights.join(" | ")
                )
            }
            Kind::DestinationRule => {
                let (h, s) = self.dr_subsets(ns);
                format!(
                    "host {h}, subsets [{}]",
                    s.into_iter().collect::<Vec<_>>().join(", ")
                )
            }
        };
        format!(
            "  rv {:>8} {:?} {}{}: {what}",
            self.rv,
            self.kind,
            self.name,
            if self.deleted { " DELETED" } else { "" }
        )
    }
}

/// What the watcher keeps of a revision of the kinds it reads but does not check.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// An EndpointSlice: the Service it belongs to, and the pods it lists as Ready endpoints
    /// (`conditions.ready` true or absent, as the API defines it).
    EndpointSlice {
        service: String,
        ready: BTreeSet<String>,
    },
    /// A pod's labels.
    Pod { labels: Labels },
    /// A RecordingCanary: the Service it splits (`spec.service`, else the target's name) and its
    /// `propagationDelay` (`None` when it does not parse).
    Canary {
        service: String,
        delay: Option<Duration>,
    },
}

impl Fact {
    fn kind(&self) -> &'static str {
        match self {
            Fact::EndpointSlice { .. } => "EndpointSlice",
            Fact::Pod { .. } => "Pod",
            Fact::Canary { .. } => "RecordingCanary",
        }
    }

    fn of_slice(s: &EndpointSlice) -> Self {
        let ready = s
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.target_ref.as_ref())
            .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
            .filter_map(|r| r.name.clone())
            .collect();
        Fact::EndpointSlice {
            service: s
                .labels()
                .get(SERVICE_NAME_LABEL)
                .cloned()
                .unwrap_or_default(),
            ready,
        }
    }

    fn of_canary(c: &DynamicObject) -> Self {
        let spec = &c.data["spec"];
        let service = spec["service"]
            .as_str()
            .or_else(|| spec["targetRef"]["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let delay = spec["propagationDelay"]
            .as_str()
            .and_then(|d| humantime::parse_duration(d.trim()).ok());
        Fact::Canary { service, delay }
    }
}

/// One revision of an EndpointSlice, Pod or RecordingCanary, as seen by the watch.
#[derive(Debug, Clone)]
pub struct Observation {
    pub rv: u64,
    pub name: String,
    pub deleted: bool,
    /// When the watch delivered it.
    pub seen: Instant,
    /// What the watcher kept (for a deletion: of the last state).
    pub fact: Fact,
}

/// Resolves a host as Istio does for an object in namespace `ns`.
fn normalise_host(host: &str, ns: &str) -> String {
    let host = host.trim().trim_end_matches('.');
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [n] => format!("{n}.{ns}.svc.cluster.local"),
        [n, m] => format!("{n}.{m}.svc.cluster.local"),
        [n, m, "svc"] => format!("{n}.{m}.svc.cluster.local"),
        _ => host.to_string(),
    }
}

/// The Service of namespace `ns` that a normalised host names, if it names one there.
fn service_of(host: &str, ns: &str) -> Option<String> {
    let name = host.strip_suffix(&format!(".{ns}.svc.cluster.local"))?;
    (!name.is_empty() && !name.contains('.')).then(|| name.to_string())
}

/// What [`MakeBeforeBreak::check`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub vs_revisions: usize,
    pub dr_revisions: usize,
    /// EndpointSlice revisions replayed (the endpoints each weight was checked against).
    pub eps_revisions: usize,
    /// Weights > 0 on a subset checked against the Ready endpoints of that moment.
    pub endpoint_checks: usize,
    /// Waits between dependent writes checked (a subset defined then routed to, or unrouted
    /// then taken away).
    pub waits_checked: usize,
    /// Of those, the waits that Istio's `Reconciled` report ended.
    pub waits_by_istio: usize,
    pub violations: Vec<String>,
    pub timeline: String,
}

/// The figures of the last check, for a test that filters the violations itself
/// ([`crate::support::Harness::record_checked`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub eps_revisions: usize,
    pub endpoint_checks: usize,
    pub waits_checked: usize,
    pub waits_by_istio: usize,
}

type Log = Arc<Mutex<Vec<Revision>>>;

/// The other kinds' revisions, and (kind, name, rv, deleted) of each for deduplication.
#[derive(Default)]
struct Observed {
    list: Vec<Observation>,
    keys: HashSet<(&'static str, String, u64, bool)>,
}

type OtherLog = Arc<Mutex<Observed>>;

/// A watch retry after a fixed delay.
struct Steady(Duration);

impl Iterator for Steady {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl kube::runtime::utils::Backoff for Steady {
    fn reset(&mut self) {}
}

/// Runs one watch until aborted: `on` gets each object applied or deleted; `synced` is set once
/// the first list is done.
fn spawn_watch<K, S>(
    stream: S,
    ns: String,
    what: &'static str,
    synced: Arc<AtomicBool>,
    mut on: impl FnMut(K, bool) + Send + 'static,
) -> JoinHandle<()>
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        // Retried every half second, not with kube's default backoff (up to 30 s): a watch still
        // waiting to retry after a control-plane restart would resume only after a later
        // deletion, with a re-list that does not show it (tests/restart.rs).
        let mut stream = stream.backoff(Steady(Duration::from_millis(500))).boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => on(o, false),
                Ok(watcher::Event::Delete(o)) => on(o, true),
                Ok(watcher::Event::InitDone) => synced.store(true, Ordering::SeqCst),
                Ok(watcher::Event::Init) => {}
                Err(e) => eprintln!("[e2e] {ns}: {what} watch error (retrying): {e}"),
            }
        }
    })
}

pub struct MakeBeforeBreak {
    ns: String,
    client: Client,
    log: Log,
    others: OtherLog,
    last: Mutex<Counts>,
    tasks: Vec<JoinHandle<()>>,
}

impl MakeBeforeBreak {
    /// Starts the watches and returns once each has listed the namespace.
    pub async fn start(client: Client, ns: &str) -> Self {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let others: OtherLog = Arc::new(Mutex::new(Observed::default()));
        let mut tasks = Vec::new();
        let mut synced = Vec::new();
        let mut flag = || {
            let f = Arc::new(AtomicBool::new(false));
            synced.push(f.clone());
            f
        };
        for (kind, ar) in [
            (Kind::VirtualService, vs_resource()),
            (Kind::DestinationRule, dr_resource()),
        ] {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            let log = log.clone();
            tasks.push(spawn_watch(
                watcher(api, watcher::Config::default()),
                ns.to_string(),
                if kind == Kind::VirtualService {
                    "VirtualService"
                } else {
                    "DestinationRule"
                },
                flag(),
                move |obj, deleted| record(&log, kind, obj, deleted),
            ));
        }
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let o = others.clone();
        tasks.push(spawn_watch(
            watcher(slices, slice_config()),
            ns.to_string(),
            "EndpointSlice",
            flag(),
            move |s: EndpointSlice, deleted| observe(&o, &s.metadata, deleted, Fact::of_slice(&s)),
        ));
        // Pods: metadata only (name and labels are all the check needs).
        let pods: Api<PartialObjectMeta<Pod>> = Api::namespaced(client.clone(), ns);
        let o = others.clone();
        tasks.push(spawn_watch(
            watcher(pods, watcher::Config::default()),
            ns.to_string(),
            "Pod",
            flag(),
            move |p: PartialObjectMeta<Pod>, deleted| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                observe(&o, &p.metadata, deleted, Fact::Pod { labels })
            },
        ));
        let canaries: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &canary_resource());
        let o = others.clone();
        tasks.push(spawn_watch(
            watcher(canaries, watcher::Config::default()),
            ns.to_string(),
            "RecordingCanary",
            flag(),
            move |c: DynamicObject, deleted| observe(&o, &c.metadata, deleted, Fact::of_canary(&c)),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !synced.iter().all(|f| f.load(Ordering::SeqCst)) {
            assert!(
                Instant::now() < deadline,
                "the watches of {ns} (VirtualServices, DestinationRules, EndpointSlices, Pods, \
                 RecordingCanaries) did not start within 30s (are the Istio CRDs installed?)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            ns: ns.to_string(),
            client,
            log,
            others,
            last: Mutex::new(Counts::default()),
            tasks,
        }
    }

    /// Every VirtualService and DestinationRule revision seen so far, in resourceVersion order.
    pub fn revisions(&self) -> Vec<Revision> {
        let mut v = self.log.lock().expect("mbb log").clone();
        v.sort_by_key(|r| r.rv);
        v
    }

    /// Every EndpointSlice, Pod and RecordingCanary revision seen so far, in resourceVersion
    /// order.
    pub fn observations(&self) -> Vec<Observation> {
        let mut v = self.others.lock().expect("mbb log").list.clone();
        v.sort_by_key(|o| o.rv);
        v
    }

    /// The figures of the last [`MakeBeforeBreak::check`].
    pub fn last_counts(&self) -> Counts {
        *self.last.lock().expect("mbb counts")
    }

    /// Stops watching.
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Waits until the watches have caught up with the API server, then replays every revision.
    pub async fn check(&self, vs_api: &Api<DynamicObject>, dr_api: &Api<DynamicObject>) -> Report {
        self.catch_up(vs_api, dr_api).await;
        self.replay()
    }

    /// Waits (at most 20s) until the watches have recorded the current revision of every object
    /// that exists, and the deletion of every object that no longer does.
    pub async fn catch_up(&self, vs_api: &Api<DynamicObject>, dr_api: &Api<DynamicObject>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let live = self.current(vs_api, dr_api).await;
            let mut seen: HashSet<(&'static str, &str, u64)> = HashSet::new();
            let mut last: BTreeMap<(&'static str, &str), (u64, bool)> = BTreeMap::new();
            let revs = self.revisions();
            let obs = self.observations();
            let all = revs
                .iter()
                .map(|r| (kind_name(r.kind), r.name.as_str(), r.rv, r.deleted))
                .chain(
                    obs.iter()
                        .map(|o| (o.fact.kind(), o.name.as_str(), o.rv, o.deleted)),
                );
            for (kind, name, rv, deleted) in all {
                seen.insert((kind, name, rv));
                let l = last.entry((kind, name)).or_insert((rv, deleted));
                if rv >= l.0 {
                    *l = (rv, deleted);
                }
            }
            let mut behind: Vec<String> = live
                .iter()
                .filter(|(kind, name, rv)| !seen.contains(&(*kind, name.as_str(), *rv)))
                .map(|(kind, name, rv)| format!("{kind} {name} rv {rv}"))
                .collect();
            let names: HashSet<(&'static str, &str)> = live
                .iter()
                .map(|(kind, name, _)| (*kind, name.as_str()))
                .collect();
            for ((kind, name), (_, deleted)) in last {
                if !deleted && !names.contains(&(kind, name)) {
                    behind.push(format!("deletion of {kind} {name}"));
                }
            }
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "make-before-break watcher did not catch up within 20s; not seen: {}",
                behind.join(", ")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (kind, name, resourceVersion) of every object of the watched kinds that exists now.
    async fn current(
        &self,
        vs_api: &Api<DynamicObject>,
        dr_api: &Api<DynamicObject>,
    ) -> Vec<(&'static str, String, u64)> {
        let ns = &self.ns;
        let canaries: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &canary_resource());
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let all = ListParams::default();
        let slice_lp = ListParams::default().labels(SERVICE_NAME_LABEL);
        // A 404 means the namespace is gone, and with it every object.
        fn items<K: Clone>(
            kind: &'static str,
            r: kube::Result<ObjectList<PartialObjectMeta<K>>>,
        ) -> Vec<(&'static str, String, u64)> {
            let list = match r {
                Ok(l) => l.items,
                Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
                Err(e) => panic!("list {kind}s: {e}"),
            };
            list.into_iter()
                .map(|o| {
                    (
                        kind,
                        o.metadata.name.clone().unwrap_or_default(),
                        parse_rv(o.metadata.resource_version.as_deref()),
                    )
                })
                .collect()
        }
        let mut out = items("VirtualService", vs_api.list_metadata(&all).await);
        out.extend(items("DestinationRule", dr_api.list_metadata(&all).await));
        out.extend(items(
            "EndpointSlice",
            slices.list_metadata(&slice_lp).await,
        ));
        out.extend(items("Pod", pods.list_metadata(&all).await));
        out.extend(items("RecordingCanary", canaries.list_metadata(&all).await));
        out
    }

    /// Replays every revision seen so far (see [`replay`]).
    fn replay(&self) -> Report {
        let report = replay(&self.ns, &self.revisions(), &self.observations());
        *self.last.lock().expect("mbb counts") = Counts {
            eps_revisions: report.eps_revisions,
            endpoint_checks: report.endpoint_checks,
            waits_checked: report.waits_checked,
            waits_by_istio: report.waits_by_istio,
        };
        report
    }
}

/// Replays revisions of namespace `ns`'s objects in resourceVersion order and checks each step
/// (see the module's documentation). Apart from the watches, so that a test can replay a timeline
/// it changed on purpose and see the check catch it.
pub fn replay(ns: &str, revs: &[Revision], obs: &[Observation]) -> Report {
    let mut steps: Vec<Step> = revs
        .iter()
        .map(Step::Mesh)
        .chain(obs.iter().map(Step::Other))
        .collect();
    steps.sort_by_key(|s| s.rv());
    let mut w = World::default();
    let mut report = Report::default();
    let violations = &mut report.violations;
    // Waits under way: since when each subset is defined, and since when it is routed to
    // no more (each with the shortest propagationDelay its canary asked for meanwhile).
    let mut defined_at: BTreeMap<Key, Wait> = BTreeMap::new();
    let mut unrouted_at: BTreeMap<Key, Wait> = BTreeMap::new();
    // Istio's reports, as in `istio_order`: subsets a DestinationRule revision defining them
    // was reported distributed with; VirtualServices that routed to each subset, and those
    // reported distributed without the route.
    let mut reported: BTreeSet<Key> = BTreeSet::new();
    let mut routed_by: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    let mut cleared: BTreeSet<(String, Key)> = BTreeSet::new();
    let mut timeline = Vec::new();
    let mut last_labels: BTreeMap<&str, &Labels> = BTreeMap::new();
    for step in &steps {
        let r = match step {
            Step::Other(o) => {
                match &o.fact {
                    Fact::EndpointSlice { .. } => report.eps_revisions += 1,
                    // The canary's delay, for the waits under way on its Service's hosts.
                    Fact::Canary { service, delay } if !o.deleted => {
                        for (key, wait) in defined_at.iter_mut().chain(unrouted_at.iter_mut()) {
                            if service_of(&key.0, ns).as_ref() == Some(service) {
                                wait.delay = shortest(wait.delay, *delay);
                            }
                        }
                    }
                    _ => {}
                }
                // Pods: only creations, label changes and deletions in the timeline.
                let shown = match &o.fact {
                    Fact::Pod { labels } => {
                        let before = last_labels.insert(&o.name, labels);
                        o.deleted || before != Some(labels)
                    }
                    _ => true,
                };
                if shown {
                    timeline.push(o.summary());
                }
                w.apply(o);
                continue;
            }
            Step::Mesh(r) => r,
        };
        timeline.push(r.summary(ns));
        match r.kind {
            Kind::VirtualService => {
                report.vs_revisions += 1;
                let before = w.vss.clone();
                let now = if r.deleted {
                    w.vss.remove(&r.name);
                    BTreeSet::new()
                } else {
                    let refs = r.vs_refs(ns);
                    w.vss.insert(r.name.clone(), (r.rv, refs.clone()));
                    refs
                };
                // Routes that went away, and routes that are new.
                let keys: BTreeSet<Key> = before
                    .values()
                    .chain(w.vss.values())
                    .flat_map(|(_, refs)| refs.iter().cloned())
                    .collect();
                for key in keys {
                    let (was, is) = (routed(&before, &key), routed(&w.vss, &key));
                    if was && !is {
                        unrouted_at.insert(
                            key.clone(),
                            Wait {
                                since: r.seen,
                                delay: w.delay(&key.0, ns),
                            },
                        );
                    }
                    if !was && is {
                        unrouted_at.remove(&key);
                        if let Some(wait) = defined_at.get(&key) {
                            report.waits_checked += 1;
                            let waited = r.seen.duration_since(wait.since);
                            if reported.contains(&key) {
                                report.waits_by_istio += 1;
                            } else if waited < wait.required() {
                                violations.push(format!(
                                        "VirtualService {} revision {} routes to subset {} of {} only {waited:?} after it was defined ({}; Istio had not reported it distributed)",
                                        r.name, r.rv, key.1, key.0, wait.expected()
                                    ));
                            }
                        }
                    }
                }
                for key in &now {
                    routed_by
                        .entry(key.clone())
                        .or_default()
                        .insert(r.name.clone());
                    cleared.remove(&(r.name.clone(), key.clone()));
                }
                if !r.deleted && istio_reconciled(&r.object) {
                    for (key, by) in &routed_by {
                        if by.contains(&r.name) && !now.contains(key) {
                            cleared.insert((r.name.clone(), key.clone()));
                        }
                    }
                }
                if r.deleted {
                    continue;
                }
                for key in &now {
                    if !w.defined(key) {
                        violations.push(format!(
                                "VirtualService {} revision {} routes to subset {} of {}, \
                                 which no DestinationRule defined at that moment (DestinationRules: {:?})",
                                r.name, r.rv, key.1, key.0, w.drs
                            ));
                    }
                }
                // Weight only where the mesh has endpoints.
                let mut weighted: BTreeMap<Key, f64> = BTreeMap::new();
                for (key, share) in r.vs_destinations(ns) {
                    let s = weighted.entry(key).or_default();
                    *s = s.max(share);
                }
                for (key, share) in weighted {
                    if share <= 0.0 || !w.defined(&key) {
                        continue;
                    }
                    let Some(service) = service_of(&key.0, ns) else {
                        continue;
                    };
                    report.endpoint_checks += 1;
                    if let Err(why) = w.has_endpoint(&key, &service) {
                        violations.push(format!(
                                "VirtualService {} revision {} gives {share}% to subset {} of {}, which has no Ready endpoint: {why}",
                                r.name, r.rv, key.1, key.0
                            ));
                    }
                }
            }
            Kind::DestinationRule => {
                report.dr_revisions += 1;
                let before = w.drs.clone();
                if r.deleted {
                    w.drs.remove(&r.name);
                } else {
                    w.drs.insert(r.name.clone(), r.dr_subset_labels(ns));
                }
                let keys: BTreeSet<Key> = before
                    .values()
                    .chain(w.drs.values())
                    .flat_map(|(h, ss)| ss.keys().map(|s| (h.clone(), s.clone())))
                    .collect();
                for key in keys {
                    let (was, is) = (defined(&before, &key), w.defined(&key));
                    if !was && is {
                        defined_at.insert(
                            key.clone(),
                            Wait {
                                since: r.seen,
                                delay: w.delay(&key.0, ns),
                            },
                        );
                    }
                    if !was || is {
                        continue;
                    }
                    if let Some(wait) = unrouted_at.remove(&key) {
                        report.waits_checked += 1;
                        let waited = r.seen.duration_since(wait.since);
                        let by_istio = routed_by.get(&key).is_some_and(|by| {
                            by.iter()
                                .all(|vs| cleared.contains(&(vs.clone(), key.clone())))
                        });
                        if by_istio {
                            report.waits_by_istio += 1;
                        } else if waited < wait.required() {
                            violations.push(format!(
                                    "DestinationRule {} revision {} took away subset {} of {} only {waited:?} after the last route to it went ({}; Istio had not reported every VirtualService that routed to it distributed without the route)",
                                    r.name, r.rv, key.1, key.0, wait.expected()
                                ));
                        }
                    }
                    for (vs, (vs_rv, refs)) in &w.vss {
                        if refs.contains(&key) {
                            violations.push(format!(
                                    "DestinationRule {} revision {}{} took away subset {} of {} \
                                     while VirtualService {vs} (revision {vs_rv}) still routed to it",
                                    r.name,
                                    r.rv,
                                    if r.deleted { " (deletion)" } else { "" },
                                    key.1,
                                    key.0
                                ));
                        }
                    }
                    defined_at.remove(&key);
                    reported.remove(&key);
                    routed_by.remove(&key);
                }
                if !r.deleted && istio_reconciled(&r.object) {
                    let (host, subsets) = r.dr_subsets(ns);
                    reported.extend(subsets.into_iter().map(|s| (host.clone(), s)));
                }
            }
        }
    }
    report.timeline = timeline.join("\n");
    report
}

/// One revision in the replay.
enum Step<'a> {
    Mesh(&'a Revision),
    Other(&'a Observation),
}

impl Step<'_> {
    fn rv(&self) -> u64 {
        match self {
            Step::Mesh(r) => r.rv,
            Step::Other(o) => o.rv,
        }
    }
}

/// A wait under way between two dependent writes.
struct Wait {
    /// When the watcher saw the write waited on.
    since: Instant,
    /// The shortest `propagationDelay` a canary of the host's Service asked for since (`None`:
    /// no canary known).
    delay: Option<Duration>,
}

impl Wait {
    /// The shortest wait accepted, as the watcher sees it.
    fn required(&self) -> Duration {
        match self.delay {
            Some(d) => d.saturating_sub(WATCH_MARGIN),
            None => MIN_GAP,
        }
    }

    fn expected(&self) -> String {
        match self.delay {
            Some(d) => format!(
                "propagationDelay {d:?}: at least {:?} expected, {WATCH_MARGIN:?} allowed for watch delivery",
                self.required()
            ),
            None => format!("no canary known for the host: at least {MIN_GAP:?} expected"),
        }
    }
}

/// The shorter of two delays, a known one winning over none.
fn shortest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn routed(vss: &Routes, key: &Key) -> bool {
    vss.values().any(|(_, refs)| refs.contains(key))
}

fn defined(drs: &Subsets, key: &Key) -> bool {
    drs.values()
        .any(|(h, ss)| *h == key.0 && ss.contains_key(&key.1))
}

/// The namespace as the replay has it at one revision.
#[derive(Default)]
struct World {
    vss: Routes,
    drs: Subsets,
    /// EndpointSlice name → (its Service, the pods it lists as Ready endpoints).
    slices: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Pod name → labels.
    pods: BTreeMap<String, Labels>,
    /// RecordingCanary name → (its Service, its propagationDelay).
    canaries: BTreeMap<String, (String, Option<Duration>)>,
}

impl World {
    fn apply(&mut self, o: &Observation) {
        match (&o.fact, o.deleted) {
            (Fact::EndpointSlice { .. }, true) => {
                self.slices.remove(&o.name);
            }
            (Fact::EndpointSlice { service, ready }, false) => {
                self.slices
                    .insert(o.name.clone(), (service.clone(), ready.clone()));
            }
            (Fact::Pod { .. }, true) => {
                self.pods.remove(&o.name);
            }
            (Fact::Pod { labels }, false) => {
                self.pods.insert(o.name.clone(), labels.clone());
            }
            (Fact::Canary { .. }, true) => {
                self.canaries.remove(&o.name);
            }
            (Fact::Canary { service, delay }, false) => {
                self.canaries
                    .insert(o.name.clone(), (service.clone(), *delay));
            }
        }
    }

    fn defined(&self, key: &Key) -> bool {
        defined(&self.drs, key)
    }

    /// The shortest `propagationDelay` of the canaries of the host's Service, if any is known.
    fn delay(&self, host: &str, ns: &str) -> Option<Duration> {
        let service = service_of(host, ns)?;
        self.canaries
            .values()
            .filter(|(s, _)| *s == service)
            .fold(None, |acc, (_, d)| shortest(acc, *d))
    }

    /// Whether some pod carrying the subset's labels (as a DestinationRule defining it gives
    /// them) is a Ready endpoint in an EndpointSlice of `service`; why not, otherwise.
    fn has_endpoint(&self, key: &Key, service: &str) -> Result<(), String> {
        let selectors: Vec<&Labels> = self
            .drs
            .values()
            .filter(|(h, _)| *h == key.0)
            .filter_map(|(_, ss)| ss.get(&key.1))
            .collect();
        let ready: BTreeSet<&String> = self
            .slices
            .values()
            .filter(|(s, _)| s == service)
            .flat_map(|(_, pods)| pods)
            .collect();
        let selects = |pod: &String| {
            self.pods.get(pod).is_some_and(|labels| {
                selectors
                    .iter()
                    .any(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
        };
        // A Service with no Ready endpoint at all (deleted, or none of its pods Ready yet): no
        // subset could serve, so where the weight goes changes nothing (the split is not why
        // requests fail); only weight on an empty subset beside one that could serve misroutes.
        if ready.is_empty() || ready.iter().any(|p| selects(p)) {
            return Ok(());
        }
        let shown: Vec<String> = ready
            .iter()
            .map(|p| {
                let role = self
                    .pods
                    .get(*p)
                    .map(|l| {
                        l.iter()
                            .filter(|(k, _)| selectors.iter().any(|s| s.contains_key(*k)))
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|| "no such pod".into());
                format!("{p} ({role})")
            })
            .collect();
        Err(format!(
            "no pod with labels {selectors:?} is a Ready endpoint of Service {service} (its EndpointSlices list as Ready: [{}])",
            shown.join(", ")
        ))
    }
}

impl Observation {
    fn summary(&self) -> String {
        let what = match &self.fact {
            Fact::EndpointSlice { service, ready } => format!(
                "Service {service}, Ready [{}]",
                ready.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            Fact::Pod { labels } => format!(
                "labels {}",
                labels
                    .iter()
                    .filter(|(k, _)| !k.starts_with("security.istio.io"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Fact::Canary { service, delay } => {
                format!("Service {service}, propagationDelay {delay:?}")
            }
        };
        format!(
            "  rv {:>8} {} {}{}: {what}",
            self.rv,
            self.fact.kind(),
            self.name,
            if self.deleted { " DELETED" } else { "" }
        )
    }
}

/// Whether Istio reports this revision's own generation as distributed to every proxy: its
/// `Reconciled` condition is `True` and `observedGeneration` (the condition's, else the status's;
/// a number or a string) equals `metadata.generation`. The watcher's own reading of Istio's
/// contract, written apart from the controller's.
fn istio_reconciled(obj: &Value) -> bool {
    let int = |v: &Value| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    let generation = obj.pointer("/metadata/generation").and_then(int);
    let status = &obj["status"];
    let Some(cond) = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Reconciled"))
    else {
        return false;
    };
    let observed = int(&cond["observedGeneration"]).or_else(|| int(&status["observedGeneration"]));
    cond["status"] == "True" && generation.is_some() && observed == generation
}

impl MakeBeforeBreak {
    /// The order when Istio reports propagation (a test that plays istiod), replayed in
    /// resourceVersion order: a VirtualService starts routing to a subset only after a
    /// DestinationRule revision defining it was reported `Reconciled` for its generation, and a
    /// subset leaves the DestinationRules only after every VirtualService that routed to it was
    /// reported `Reconciled` at a revision without that route (a deleted VirtualService never
    /// is). Returns how many dependent writes were checked, and the violations.
    pub fn istio_order(&self) -> (usize, Vec<String>) {
        let ns = &self.ns;
        let mut drs: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
        let mut vss: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
        // Subsets some DestinationRule revision defining them was reported distributed with.
        let mut distributed: BTreeSet<(String, String)> = BTreeSet::new();
        // VirtualServices that routed to each subset, and those reported distributed without.
        let mut routed_by: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        let mut cleared: BTreeSet<(String, (String, String))> = BTreeSet::new();
        let defined = |drs: &BTreeMap<String, (String, BTreeSet<String>)>| {
            drs.values()
                .flat_map(|(h, ss)| ss.iter().map(|s| (h.clone(), s.clone())))
                .collect::<BTreeSet<_>>()
        };
        let (mut checked, mut violations) = (0, Vec::new());
        for r in self.revisions() {
            match r.kind {
                Kind::DestinationRule => {
                    let before = defined(&drs);
                    if r.deleted {
                        drs.remove(&r.name);
                    } else {
                        drs.insert(r.name.clone(), r.dr_subsets(ns));
                    }
                    let now = defined(&drs);
                    for key in before.difference(&now) {
                        checked += 1;
                        for vs in routed_by.remove(key).unwrap_or_default() {
                            if !cleared.contains(&(vs.clone(), key.clone())) {
                                violations.push(format!(
                                    "DestinationRule {} revision {} took away subset {} of {} before Istio reported VirtualService {vs} distributed without a route to it",
                                    r.name, r.rv, key.1, key.0
                                ));
                            }
                        }
                        distributed.remove(key);
                    }
                    if !r.deleted && istio_reconciled(&r.object) {
                        let (host, subsets) = r.dr_subsets(ns);
                        distributed.extend(subsets.into_iter().map(|s| (host.clone(), s)));
                    }
                }
                Kind::VirtualService => {
                    let before = vss.remove(&r.name).unwrap_or_default();
                    let now = if r.deleted {
                        BTreeSet::new()
                    } else {
                        r.vs_refs(ns)
                    };
                    for key in now.difference(&before) {
                        checked += 1;
                        if !distributed.contains(key) {
                            violations.push(format!(
                                "VirtualService {} revision {} routes to subset {} of {} before Istio reported a DestinationRule with it distributed",
                                r.name, r.rv, key.1, key.0
                            ));
                        }
                    }
                    for key in &now {
                        routed_by
                            .entry(key.clone())
                            .or_default()
                            .insert(r.name.clone());
                        cleared.remove(&(r.name.clone(), key.clone()));
                    }
                    if !r.deleted && istio_reconciled(&r.object) {
                        for (key, by) in &routed_by {
                            if by.contains(&r.name) && !now.contains(key) {
                                cleared.insert((r.name.clone(), key.clone()));
                            }
                        }
                    }
                    if !r.deleted {
                        vss.insert(r.name.clone(), now);
                    }
                }
            }
        }
        (checked, violations)
    }
}

fn parse_rv(rv: Option<&str>) -> u64 {
    rv.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        panic!("resourceVersion {rv:?} is not a number; the make-before-break replay needs etcd revisions")
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::VirtualService => "VirtualService",
        Kind::DestinationRule => "DestinationRule",
    }
}

/// The EndpointSlices of Services only (those the endpoint-slice controller writes).
fn slice_config() -> watcher::Config {
    watcher::Config::default().labels(SERVICE_NAME_LABEL)
}

fn record(log: &Log, kind: Kind, obj: DynamicObject, deleted: bool) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let rv = parse_rv(obj.metadata.resource_version.as_deref());
    let mut log = log.lock().expect("mbb log");
    // A relist repeats revisions already seen.
    if log
        .iter()
        .any(|r| r.kind == kind && r.name == name && r.rv == rv && r.deleted == deleted)
    {
        return;
    }
    log.push(Revision {
        rv,
        kind,
        name,
        deleted,
        seen: Instant::now(),
        object: serde_json::to_value(&obj).unwrap_or(Value::Null),
    });
}

fn observe(
    log: &OtherLog,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    deleted: bool,
    fact: Fact,
) {
    let seen = Instant::now();
    let name = meta.name.clone().unwrap_or_default();
    let rv = parse_rv(meta.resource_version.as_deref());
    let mut log = log.lock().expect("mbb log");
    // A relist repeats revisions already seen.
    if !log.keys.insert((fact.kind(), name.clone(), rv, deleted)) {
        return;
    }
    log.list.push(Observation {
        rv,
        name,
        deleted,
        seen,
        fact,
    });
}

/// The replay on timelines written by hand: no cluster needed.
#[cfg(test)]
mod replay_tests {
    use super::*;
    use serde_json::json;

    const NS: &str = "shop";

    fn mesh(rv: u64, kind: Kind, at: Instant, object: Value) -> Revision {
        Revision {
            rv,
            kind,
            name: object["metadata"]["name"].as_str().unwrap_or("x").into(),
            deleted: false,
            seen: at,
            object,
        }
    }

    fn fact(rv: u64, name: &str, at: Instant, fact: Fact) -> Observation {
        Observation {
            rv,
            name: name.into(),
            deleted: false,
            seen: at,
            fact,
        }
    }

    fn dr(rv: u64, at: Instant, status: Value) -> Revision {
        mesh(
            rv,
            Kind::DestinationRule,
            at,
            json!({"metadata": {"name": "web", "generation": 1}, "spec": {"host": "web", "subsets": [
                {"name": "stable", "labels": {"role": "stable"}},
                {"name": "recording", "labels": {"role": "recording"}},
            ]}, "status": status}),
        )
    }

    fn split(rv: u64, at: Instant, recording: i64) -> Revision {
        mesh(
            rv,
            Kind::VirtualService,
            at,
            json!({"metadata": {"name": "web"}, "spec": {"hosts": ["web"], "http": [{"route": [
                {"destination": {"host": "web", "subset": "stable"}, "weight": 100 - recording},
                {"destination": {"host": "web", "subset": "recording"}, "weight": recording},
            ]}]}}),
        )
    }

    fn pod(rv: u64, name: &str, at: Instant, role: &str) -> Observation {
        let labels = [("app".into(), "web".into()), ("role".into(), role.into())].into();
        fact(rv, name, at, Fact::Pod { labels })
    }

    fn slice(rv: u64, at: Instant, ready: &[&str]) -> Observation {
        let ready = ready.iter().map(|p| p.to_string()).collect();
        let service = "web".into();
        fact(rv, "web-abc", at, Fact::EndpointSlice { service, ready })
    }

    fn canary(rv: u64, at: Instant, delay: u64) -> Observation {
        let delay = Some(Duration::from_secs(delay));
        let service = "web".into();
        fact(rv, "web", at, Fact::Canary { service, delay })
    }

    #[test]
    fn weight_on_a_subset_whose_pods_are_no_ready_endpoint_is_a_violation() {
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        let obs = [
            canary(1, t, 1),
            pod(2, "web-1", t, "stable"),
            pod(3, "web-recording-1", t, "recording"),
            slice(4, t, &["web-1"]),
            // Ready, but only from revision 8 on.
            slice(8, s(5), &["web-1", "web-recording-1"]),
        ];
        let revs = [
            dr(5, s(1), Value::Null),
            split(6, s(3), 0),
            split(7, s(4), 10),
            split(9, s(6), 20),
        ];
        let report = replay(NS, &revs, &obs);
        assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
        assert!(
            report.violations[0].starts_with("VirtualService web revision 7 gives 10% to subset recording of web.shop.svc.cluster.local, which has no Ready endpoint"),
            "{}",
            report.violations[0]
        );
        // stable at 6, 7 and 9; recording at 7 and 9 (0 % at 6 is no weight).
        assert_eq!(report.endpoint_checks, 5);
        assert_eq!(report.eps_revisions, 2);
    }

    #[test]
    fn weight_on_a_host_with_no_ready_endpoint_at_all_is_no_violation() {
        // The Service deleted (its EndpointSlice gone): the drain to 100/0 moves traffic between
        // two empty subsets; no split could serve, so the split is not why requests fail.
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        let obs = [
            canary(1, t, 1),
            pod(2, "web-1", t, "stable"),
            pod(3, "web-recording-1", t, "recording"),
            slice(4, t, &["web-1", "web-recording-1"]),
            slice(8, s(5), &[]),
        ];
        let revs = [
            dr(5, s(1), Value::Null),
            split(6, s(3), 10),
            split(9, s(6), 0),
        ];
        let report = replay(NS, &revs, &obs);
        assert!(report.violations.is_empty(), "{:#?}", report.violations);
    }

    #[test]
    fn a_lone_destination_without_weight_and_a_mirror_get_traffic() {
        let vs = mesh(
            1,
            Kind::VirtualService,
            Instant::now(),
            json!({"metadata": {"name": "web"}, "spec": {"http": [
                {"route": [{"destination": {"host": "web", "subset": "a"}}]},
                {"route": [{"destination": {"host": "web", "subset": "b"}},
                           {"destination": {"host": "web", "subset": "c"}, "weight": 100}],
                 "mirror": {"host": "web", "subset": "d"}, "mirrorPercentage": {"value": 5.5}},
                {"route": [{"destination": {"host": "web", "subset": "c"}}],
                 "mirrors": [{"destination": {"host": "web", "subset": "e"}}]},
            ]}}),
        );
        let shares: Vec<(String, f64)> = vs
            .vs_destinations(NS)
            .into_iter()
            .map(|((_, s), w)| (s, w))
            .collect();
        let expected = [
            ("a", 100.0),
            ("b", 0.0),
            ("c", 100.0),
            ("d", 5.5),
            ("c", 100.0),
            ("e", 100.0),
        ];
        assert_eq!(shares, expected.map(|(s, w)| (s.to_string(), w)).to_vec());
    }

    #[test]
    fn waits_are_held_to_the_canary_delay_and_to_the_floor_without_a_canary() {
        let t = Instant::now();
        let ms = |m: u64| t + Duration::from_millis(m);
        let ready = [
            pod(2, "web-1", t, "stable"),
            pod(3, "web-recording-1", t, "recording"),
            slice(4, t, &["web-1", "web-recording-1"]),
        ];
        let revs = [dr(10, ms(0), Value::Null), split(11, ms(1_000), 10)];
        // A 3 s canary: a split 1 s after the subsets is short, once per subset.
        let mut obs = ready.to_vec();
        obs.push(canary(1, t, 3));
        let report = replay(NS, &revs, &obs);
        assert_eq!(report.waits_checked, 2);
        assert_eq!(report.violations.len(), 2, "{:#?}", report.violations);
        assert!(report.violations[0].contains("propagationDelay 3s"));
        // The same at 2.8 s is within the margin.
        let revs_late = [dr(10, ms(0), Value::Null), split(11, ms(2_800), 10)];
        assert!(replay(NS, &revs_late, &obs).violations.is_empty());
        // No canary: the floor of 0.9 s.
        assert!(replay(NS, &revs, &ready).violations.is_empty());
        let revs_early = [dr(10, ms(0), Value::Null), split(11, ms(800), 10)];
        assert_eq!(replay(NS, &revs_early, &ready).violations.len(), 2);
        // The canary lowered to 1 s during the wait: the shorter delay holds.
        obs.push(canary(105, ms(500), 1));
        obs.sort_by_key(|o| o.rv);
        let revs = [dr(10, ms(0), Value::Null), split(200, ms(1_000), 10)];
        assert!(replay(NS, &revs, &obs).violations.is_empty());
    }

    #[test]
    fn istio_reconciled_ends_a_wait_early() {
        let t = Instant::now();
        let ms = |m: u64| t + Duration::from_millis(m);
        let obs = [
            canary(1, t, 60),
            pod(2, "web-1", t, "stable"),
            pod(3, "web-recording-1", t, "recording"),
            slice(4, t, &["web-1", "web-recording-1"]),
        ];
        let reconciled = json!({"observedGeneration": "1",
            "conditions": [{"type": "Reconciled", "status": "True"}]});
        let revs = [
            dr(10, ms(0), Value::Null),
            dr(11, ms(400), reconciled),
            split(12, ms(500), 10),
        ];
        let report = replay(NS, &revs, &obs);
        assert!(report.violations.is_empty(), "{:#?}", report.violations);
        assert_eq!((report.waits_checked, report.waits_by_istio), (2, 2));
        // Not reported: the 60 s delay holds.
        let revs = [dr(10, ms(0), Value::Null), split(12, ms(500), 10)];
        assert_eq!(replay(NS, &revs, &obs).violations.len(), 2);
    }
}
