//! The make-before-break watcher that runs beside every test.
//!
//! It watches the test namespace's VirtualServices and DestinationRules and records every revision
//! it sees. At the end, the revisions are replayed in resourceVersion order (they are etcd
//! revisions, so they order writes across both kinds) and two things are checked at every step:
//!
//! * a VirtualService revision must not route to a subset that no DestinationRule for that host
//!   defines at that moment (make before break on the way in);
//! * a DestinationRule revision (or deletion) must not take away a subset that a live
//!   VirtualService still routes to (make before break on the way out);
//! * and the waits between them: a subset is first routed to at least [`MIN_GAP`] after it
//!   appeared in a DestinationRule, and leaves the DestinationRule at least [`MIN_GAP`] after the
//!   last route to it went (the tests run with `propagationDelay` of 1 s or more; the margin
//!   covers watch delivery).
//!
//! Tests that play istiod also check [`MakeBeforeBreak::istio_order`]: each dependent write comes
//! after Istio's `Reconciled` report on the revision it depends on.

/// Live VirtualServices: name → (revision, (host, subset) routed to).
type Routes = BTreeMap<String, (u64, BTreeSet<(String, String)>)>;

/// The shortest wait accepted between dependent writes, as seen by the watches.
pub const MIN_GAP: Duration = Duration::from_millis(900);

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DynamicObject, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::support::{dr_resource, vs_resource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    VirtualService,
    DestinationRule,
}

/// One revision of one object, as seen by the watch.
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
                    .filter_map(|s| s.get("name").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        (host, subsets)
    }

    /// VirtualService: every (normalised host, subset) a destination refers to.
    fn vs_refs(&self, ns: &str) -> BTreeSet<(String, String)> {
        let mut refs = BTreeSet::new();
        let mut add = |d: &Value| {
            if let (Some(h), Some(s)) = (
                d.get("host").and_then(Value::as_str),
                d.get("subset").and_then(Value::as_str),
            ) {
                refs.insert((normalise_host(h, ns), s.to_string()));
            }
        };
        for section in ["http", "tcp", "tls"] {
            let Some(routes) = self
                .object
                .pointer(&format!("/spec/{section}"))
                .and_then(Value::as_array)
            else {
                continue;
            };
            for r in routes {
                for d in r
                    .get("route")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(dest) = d.get("destination") {
                        add(dest);
                    }
                }
                if let Some(m) = r.get("mirror") {
                    add(m);
                }
                for m in r
                    .get("mirrors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(dest) = m.get("destination") {
                        add(dest);
                    }
                }
            }
        }
        refs
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

/// What [`MakeBeforeBreak::check`] found.
pub struct Report {
    pub vs_revisions: usize,
    pub dr_revisions: usize,
    pub violations: Vec<String>,
    pub timeline: String,
}

type Log = Arc<Mutex<Vec<Revision>>>;

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

pub struct MakeBeforeBreak {
    ns: String,
    log: Log,
    tasks: Vec<JoinHandle<()>>,
}

impl MakeBeforeBreak {
    /// Starts both watches and returns once both have listed the namespace.
    pub async fn start(client: Client, ns: &str) -> Self {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut synced = Vec::new();
        for (kind, ar) in [
            (Kind::VirtualService, vs_resource()),
            (Kind::DestinationRule, dr_resource()),
        ] {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            let flag = Arc::new(AtomicBool::new(false));
            synced.push(flag.clone());
            let log = log.clone();
            let ns = ns.to_string();
            tasks.push(tokio::spawn(async move {
                // Retried every half second, not with kube's default backoff (up to 30 s): a
                // watch still waiting to retry after a control-plane restart would resume only
                // after a later deletion, with a re-list that does not show it (tests/restart.rs).
                let mut stream = watcher(api, watcher::Config::default())
                    .backoff(Steady(Duration::from_millis(500)))
                    .boxed();
                while let Some(ev) = stream.next().await {
                    let (obj, deleted) = match ev {
                        Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => {
                            (o, false)
                        }
                        Ok(watcher::Event::Delete(o)) => (o, true),
                        Ok(watcher::Event::InitDone) => {
                            flag.store(true, Ordering::SeqCst);
                            continue;
                        }
                        Ok(watcher::Event::Init) => continue,
                        Err(e) => {
                            eprintln!("[e2e] {ns}: {kind:?} watch error (retrying): {e}");
                            continue;
                        }
                    };
                    record(&log, kind, obj, deleted);
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !synced.iter().all(|f| f.load(Ordering::SeqCst)) {
            assert!(
                Instant::now() < deadline,
                "the VirtualService/DestinationRule watches of {ns} did not start within 30s \
                 (are the Istio CRDs installed?)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            ns: ns.to_string(),
            log,
            tasks,
        }
    }

    /// Every revision seen so far, in resourceVersion order.
    pub fn revisions(&self) -> Vec<Revision> {
        let mut v = self.log.lock().expect("mbb log").clone();
        v.sort_by_key(|r| r.rv);
        v
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
            let mut behind = Vec::new();
            let mut live = HashSet::new();
            for (kind, api) in [
                (Kind::VirtualService, vs_api),
                (Kind::DestinationRule, dr_api),
            ] {
                // A 404 means the namespace is gone, and with it every object.
                let items = match api.list(&ListParams::default()).await {
                    Ok(l) => l.items,
                    Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
                    Err(e) => panic!("list {kind:?}s: {e}"),
                };
                for o in items {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    let rv = parse_rv(o.metadata.resource_version.as_deref());
                    live.insert((kind, name.clone()));
                    let seen = self
                        .log
                        .lock()
                        .expect("mbb log")
                        .iter()
                        .any(|r| r.kind == kind && r.name == name && r.rv == rv);
                    if !seen {
                        behind.push(format!("{kind:?} {name} rv {rv}"));
                    }
                }
            }
            let mut last: BTreeMap<(Kind, String), &Revision> = BTreeMap::new();
            let revs = self.revisions();
            for r in &revs {
                last.insert((r.kind, r.name.clone()), r);
            }
            for ((kind, name), r) in last {
                if !r.deleted && !live.contains(&(kind, name.clone())) {
                    behind.push(format!("deletion of {kind:?} {name}"));
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

    fn replay(&self) -> Report {
        let ns = &self.ns;
        let revs = self.revisions();
        let mut vss: Routes = BTreeMap::new();
        let mut drs: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
        let defined =
            |drs: &BTreeMap<String, (String, BTreeSet<String>)>, host: &str, subset: &str| {
                drs.values().any(|(h, ss)| h == host && ss.contains(subset))
            };
        let mut violations = Vec::new();
        let (mut n_vs, mut n_dr) = (0, 0);
        // When each (host, subset) last became defined, and last stopped being routed to.
        let mut defined_at: BTreeMap<(String, String), Instant> = BTreeMap::new();
        let mut unrouted_at: BTreeMap<(String, String), Instant> = BTreeMap::new();
        let routed =
            |vss: &Routes, key: &(String, String)| vss.values().any(|(_, refs)| refs.contains(key));
        for r in &revs {
            match r.kind {
                Kind::VirtualService => {
                    n_vs += 1;
                    let before = vss.clone();
                    if r.deleted {
                        vss.remove(&r.name);
                    } else {
                        vss.insert(r.name.clone(), (r.rv, r.vs_refs(ns)));
                    }
                    // Routes that went away, and routes that are new.
                    let keys: BTreeSet<(String, String)> = before
                        .values()
                        .chain(vss.values())
                        .flat_map(|(_, refs)| refs.iter().cloned())
                        .collect();
                    for key in keys {
                        let (was, is) = (routed(&before, &key), routed(&vss, &key));
                        if was && !is {
                            unrouted_at.insert(key.clone(), r.seen);
                        }
                        if !was
                            && is
                            && let Some(at) = defined_at.get(&key)
                            && r.seen.duration_since(*at) < MIN_GAP
                        {
                            violations.push(format!(
                                "VirtualService {} revision {} routes to subset {} of {} only {:?} after it was defined (at least {MIN_GAP:?} expected)",
                                r.name, r.rv, key.1, key.0, r.seen.duration_since(*at)
                            ));
                        }
                    }
                    if r.deleted {
                        continue;
                    }
                    let refs = r.vs_refs(ns);
                    for (host, subset) in &refs {
                        if !defined(&drs, host, subset) {
                            violations.push(format!(
                                "VirtualService {} revision {} routes to subset {subset} of {host}, \
                                 which no DestinationRule defined at that moment (DestinationRules: {:?})",
                                r.name, r.rv, drs
                            ));
                        }
                    }
                }
                Kind::DestinationRule => {
                    n_dr += 1;
                    let before = drs.clone();
                    if r.deleted {
                        drs.remove(&r.name);
                    } else {
                        drs.insert(r.name.clone(), r.dr_subsets(ns));
                    }
                    for (host, subsets) in before.values().chain(drs.values()) {
                        for subset in subsets {
                            let key = (host.clone(), subset.clone());
                            let (was, is) =
                                (defined(&before, host, subset), defined(&drs, host, subset));
                            if !was && is {
                                defined_at.insert(key.clone(), r.seen);
                            }
                            if was
                                && !is
                                && let Some(at) = unrouted_at.get(&key)
                                && r.seen.duration_since(*at) < MIN_GAP
                            {
                                violations.push(format!(
                                    "DestinationRule {} revision {} took away subset {subset} of {host} only {:?} after the last route to it went (at least {MIN_GAP:?} expected)",
                                    r.name, r.rv, r.seen.duration_since(*at)
                                ));
                            }
                        }
                    }
                    for (vs, (vs_rv, refs)) in &vss {
                        for (host, subset) in refs {
                            if defined(&before, host, subset) && !defined(&drs, host, subset) {
                                violations.push(format!(
                                    "DestinationRule {} revision {}{} took away subset {subset} of {host} \
                                     while VirtualService {vs} (revision {vs_rv}) still routed to it",
                                    r.name,
                                    r.rv,
                                    if r.deleted { " (deletion)" } else { "" }
                                ));
                            }
                        }
                    }
                }
            }
        }
        let timeline = revs
            .iter()
            .map(|r| r.summary(ns))
            .collect::<Vec<_>>()
            .join("\n");
        Report {
            vs_revisions: n_vs,
            dr_revisions: n_dr,
            violations,
            timeline,
        }
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
