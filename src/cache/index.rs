//! The index: which RecordingCanaries each watched object concerns, and so which objects the
//! selective caches keep.
//!
//! Every watch event is mapped to exactly the canaries it concerns (never to every canary of its
//! namespace): a Deployment by name (a target or a clone) or by our label; a pod by the
//! Deployment that owns it, or by a canary's Service selector; a Service by name; a
//! VirtualService or DestinationRule by the Services its hosts resolve to, by its owner, by the
//! canary named in its restore note, or by a canary that names it in its spec.
//!
//! The index is plain data with pure lookups; the controller keeps it up to date from the
//! canary and Service watches.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::cache::small_set::SmallSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde_json::Value;

use crate::api::{CANARY_LABEL, MeshKind, RecordingCanary};
use crate::istio;

/// A canary, by namespace and name.
pub type CanaryKey = (String, String);

/// What the index remembers of one canary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub uid: String,
    pub target: String,
    pub clone: String,
    pub service: String,
    pub virtual_service: Option<String>,
    pub destination_rule: Option<String>,
    /// The Service's pod selector, once the Service has been seen (empty: none), sorted by key.
    /// (A slice: a `BTreeMap` of one entry takes a 544-byte node.)
    pub selector: Option<Box<[(String, String)]>>,
    /// Objects of this canary that the caches may lack and must be read once.
    pub prime: Prime,
}

/// What a canary's caches may lack: it appeared after the watches listed the cluster, or its
/// Service's selector changed (pods it selects were not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prime {
    /// The target, clone and Service.
    pub objects: bool,
    /// The pods that the Service (or the target) selects.
    pub pods: bool,
    /// The clone, when a write found it other than the cache said.
    pub clone: bool,
}

impl Entry {
    /// Whether this canary's Service selector (once seen, and not empty) selects `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| selects(s.iter().map(|(k, v)| (k, v)), labels))
    }
}

impl Prime {
    pub fn any(&self) -> bool {
        self.objects || self.pods || self.clone
    }
}

/// The index of every canary this process watches, with a map per way of finding one.
#[derive(Debug, Default)]
pub struct Index {
    canaries: HashMap<CanaryKey, Entry>,
    /// `(ns, deployment)` → canaries whose target or clone it is.
    by_deployment: HashMap<(String, String), SmallSet<String>>,
    /// `(ns, service)` → canaries of that Service.
    by_service: HashMap<(String, String), SmallSet<String>>,
    /// UID → canary.
    by_uid: HashMap<String, CanaryKey>,
    /// `(ns, name)` of a VirtualService or DestinationRule named in a spec → canaries.
    by_named_mesh: HashMap<(String, String), SmallSet<String>>,
    /// Namespace → canaries whose Service has a selector.
    selecting: HashMap<String, SmallSet<String>>,
    /// The last canaries each VirtualService/DestinationRule concerned (so that an object that
    /// stops naming a canary's host still reaches it), and the reverse.
    mesh_last: HashMap<MeshKey, SmallSet<CanaryKey>>,
    mesh_of: HashMap<CanaryKey, SmallSet<MeshKey>>,
    /// What every VirtualService/DestinationRule refers to, whether or not a canary exists yet,
    /// and the reverse by Service and by the canary its restore note names: a new canary finds
    /// its objects here without a scan.
    mesh_refs: HashMap<MeshKey, MeshRefs>,
    by_host: HashMap<(String, String), SmallSet<MeshKey>>,
    by_note: HashMap<(String, String), SmallSet<MeshKey>>,
    /// DestinationRules for wildcard hosts (few in any cluster).
    wildcards: SmallSet<MeshKey>,
    /// `(ns, service)` → the canary that owns it as a Gateway API backend, for the few canaries
    /// whose backend Service names are not `<name>-stable`/`<name>-recording` (see
    /// [`Index::backend_owner`]; the others cost nothing here).
    irregular_backends: HashMap<(String, String), String>,
    /// Once set, canaries seen for the first time are primed (the watches have listed).
    watches_started: bool,
    /// Once set, pods newly selected by a Service are read (the pod watch has listed).
    pods_watch_started: bool,
}

/// A VirtualService, DestinationRule or HTTPRoute, by kind, namespace and name.
pub type MeshKey = (MeshKind, String, String);

/// What a VirtualService or DestinationRule refers to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshRefs {
    /// Services (`ns`, `name`) its hosts resolve to.
    pub services: SmallSet<(String, String)>,
    /// UIDs of its owners.
    pub owners: Vec<String>,
    /// The canary its restore note names (in its own namespace).
    pub note: Option<String>,
    /// A DestinationRule for a wildcard host (`*.shop.svc.cluster.local`, `*.local`, `*`): it
    /// concerns the canaries whose Service host it matches, in its own namespace or, from Istio's
    /// root namespace, in every one (its traffic policy stops applying to a host for which the
    /// canary creates a DestinationRule of its own, so the canary carries it over).
    pub wildcard: Option<istio::Wildcard>,
}

impl MeshRefs {
    /// Reads the references of a VirtualService, DestinationRule or HTTPRoute.
    pub fn of(meta: &ObjectMeta, spec: &Value, kind: MeshKind, domain: &str) -> Self {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let hosts: Vec<&str> = match kind {
            MeshKind::VirtualService => istio::vs_named_hosts(spec),
            MeshKind::DestinationRule => spec
                .get("host")
                .and_then(Value::as_str)
                .into_iter()
                .collect(),
            MeshKind::HttpRoute | MeshKind::GrpcRoute => Vec::new(),
        };
        let services: SmallSet<(String, String)> = match kind {
            // A GRPCRoute's parentRefs and backendRefs have the HTTPRoute's shape.
            MeshKind::HttpRoute | MeshKind::GrpcRoute => {
                http_route_services(spec, ns).into_iter().collect()
            }
            _ => hosts
                .iter()
                .filter_map(|h| istio::service_of_host(h, ns, domain))
                .map(|(svc, svc_ns)| (svc_ns, svc))
                .collect(),
        };
        Self {
            services,
            owners: meta
                .owner_references
                .iter()
                .flatten()
                .map(|r| r.uid.clone())
                .collect(),
            note: istio::note_owner(
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(crate::api::RESTORE_ANNOTATION))
                    .map(String::as_str),
            ),
            wildcard: match kind {
                MeshKind::DestinationRule => hosts
                    .first()
                    .and_then(|h| istio::Wildcard::of(h, domain))
                    .filter(|_| spec.get("workloadSelector").is_none()),
                _ => None,
            },
        }
    }
}

/// The Services (namespace, name) an HTTPRoute names: as parents (GAMMA: the route splits that
/// Service's traffic) and as backends, each in the route's namespace unless it names another.
fn http_route_services(spec: &Value, ns: &str) -> Vec<(String, String)> {
    let is_service = |r: &Value| {
        r.get("group")
            .and_then(Value::as_str)
            .is_none_or(|g| g.is_empty() || g == "core")
            && r.get("kind").and_then(Value::as_str).unwrap_or("Service") == "Service"
    };
    let of = |r: &Value| {
        let name = r.get("name").and_then(Value::as_str)?;
        let rns = r.get("namespace").and_then(Value::as_str).unwrap_or(ns);
        Some((rns.to_string(), name.to_string()))
    };
    let parents = spec
        .get("parentRefs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        // A parentRef's kind defaults to Gateway.
        .filter(|r| {
            r.get("kind").and_then(Value::as_str) == Some("Service")
                && r.get("group")
                    .and_then(Value::as_str)
                    .is_none_or(|g| g.is_empty() || g == "core")
        })
        .filter_map(of);
    let backends = spec
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("backendRefs").and_then(Value::as_array))
        .flatten()
        .filter(|r| is_service(r))
        .filter_map(of);
    let mut out: Vec<(String, String)> = parents.chain(backends).collect();
    out.sort();
    out.dedup();
    out
}

/// The canary named by our label on an object the controller created.
fn labelled_owner(meta: &ObjectMeta) -> Option<&str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(CANARY_LABEL))
        .map(String::as_str)
}

/// The backend Service names of canary `name` that [`Index::backend_owner`] cannot find by
/// stripping a suffix (a name with dots or capitals, or too long).
fn irregular_backend_names(name: &str) -> Vec<String> {
    let (stable, recording) = crate::api::labels::backend_service_names(name);
    if stable == format!("{name}-stable") && recording == format!("{name}-recording") {
        Vec::new()
    } else {
        vec![stable, recording]
    }
}

fn key(ns: &str, name: &str) -> CanaryKey {
    (ns.to_string(), name.to_string())
}

/// The Deployment that owns a pod through its ReplicaSet `<deployment>-<pod-template-hash>`.
pub fn deployment_of_pod(meta: &ObjectMeta) -> Option<&str> {
    let hash = meta.labels.as_ref()?.get("pod-template-hash")?;
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == "ReplicaSet")
        .and_then(|r| r.name.strip_suffix(hash.as_str()))
        .and_then(|n| n.strip_suffix('-'))
}

/// Whether a non-empty `selector` selects `labels`.
pub fn selects<'a>(
    selector: impl IntoIterator<Item = (&'a String, &'a String)>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let mut any = false;
    for (k, v) in selector {
        if labels.get(k) != Some(v) {
            return false;
        }
        any = true;
    }
    any
}

fn add(map: &mut HashMap<(String, String), SmallSet<String>>, k: (String, String), v: &str) {
    map.entry(k).or_default().insert(v.to_string());
}

fn del(map: &mut HashMap<(String, String), SmallSet<String>>, k: (String, String), v: &str) {
    if let Some(set) = map.get_mut(&k) {
        set.remove(v);
        if set.is_empty() {
            map.remove(&k);
        }
    }
}

impl Index {
    /// From now on, a canary seen for the first time is primed: the watches have started.
    pub fn watches_started(&mut self) {
        self.watches_started = true;
    }

    /// Adds or updates a canary. A canary new to the index after the watches started is marked
    /// for priming.
    pub fn upsert(&mut self, c: &RecordingCanary) {
        let ns = c.namespace().unwrap_or_default();
        let name = c.name_any();
        let k = key(&ns, &name);
        let fresh = Entry {
            uid: c.metadata.uid.clone().unwrap_or_default(),
            target: c.spec.target_ref.name.clone(),
            clone: c.spec.clone_name(),
            service: c.spec.service_name().to_string(),
            virtual_service: c.spec.virtual_service.clone(),
            destination_rule: c.spec.destination_rule.clone(),
            selector: None,
            prime: Prime {
                objects: self.watches_started,
                pods: self.watches_started,
                clone: false,
            },
        };
        if let Some(e) = self.canaries.get(&k) {
            // Same object, same references (they are immutable): keep what is known.
            if e.uid == fresh.uid
                && e.target == fresh.target
                && e.service == fresh.service
                && e.virtual_service == fresh.virtual_service
                && e.destination_rule == fresh.destination_rule
            {
                return;
            }
        }
        let recreated = self.canaries.contains_key(&k);
        self.remove(&ns, &name);
        let mut e = fresh;
        if recreated {
            e.prime = Prime {
                objects: true,
                pods: true,
                clone: true,
            };
        }
        add(&mut self.by_deployment, key(&ns, &e.target), &name);
        add(&mut self.by_deployment, key(&ns, &e.clone), &name);
        add(&mut self.by_service, key(&ns, &e.service), &name);
        for b in irregular_backend_names(&name) {
            self.irregular_backends.insert(key(&ns, &b), name.clone());
        }
        for m in [&e.virtual_service, &e.destination_rule]
            .into_iter()
            .flatten()
        {
            add(&mut self.by_named_mesh, key(&ns, m), &name);
        }
        self.by_uid.insert(e.uid.clone(), k.clone());
        self.canaries.insert(k.clone(), e);
        self.attach_mesh(&k);
    }

    /// Forgets canary `ns/name`; returns what the index knew of it.
    pub fn remove(&mut self, ns: &str, name: &str) -> Option<Entry> {
        let k = key(ns, name);
        let e = self.canaries.remove(&k)?;
        del(&mut self.by_deployment, key(ns, &e.target), name);
        del(&mut self.by_deployment, key(ns, &e.clone), name);
        del(&mut self.by_service, key(ns, &e.service), name);
        for b in irregular_backend_names(name) {
            self.irregular_backends.remove(&key(ns, &b));
        }
        for m in [&e.virtual_service, &e.destination_rule]
            .into_iter()
            .flatten()
        {
            del(&mut self.by_named_mesh, key(ns, m), name);
        }
        if self.by_uid.get(&e.uid) == Some(&k) {
            self.by_uid.remove(&e.uid);
        }
        if let Some(set) = self.selecting.get_mut(ns) {
            set.remove(name);
        }
        for m in self.mesh_of.remove(&k).unwrap_or_default() {
            if let Some(set) = self.mesh_last.get_mut(&m) {
                set.remove(&k);
            }
        }
        Some(e)
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<&Entry> {
        self.canaries.get(&key(ns, name))
    }

    /// Every canary's key.
    pub fn keys(&self) -> impl Iterator<Item = &CanaryKey> {
        self.canaries.keys()
    }

    /// Marks (part of) a canary's caches as complete.
    pub fn primed(&mut self, ns: &str, name: &str, done: Prime) {
        if let Some(e) = self.canaries.get_mut(&key(ns, name)) {
            e.prime.objects &= !done.objects;
            e.prime.pods &= !done.pods;
            e.prime.clone &= !done.clone;
        }
    }

    /// Asks for a canary's clone to be read again: a write found it other than the cache said
    /// (a Deployment of that name that is not ours is kept by no watch until read once).
    pub fn reprime(&mut self, ns: &str, name: &str) {
        if let Some(e) = self.canaries.get_mut(&key(ns, name)) {
            e.prime.clone = true;
        }
    }

    /// Other canaries of namespace `ns` that share canary `name`'s target or Service.
    pub fn sharing(&self, ns: &str, name: &str) -> Vec<String> {
        let Some(e) = self.canaries.get(&key(ns, name)) else {
            return Vec::new();
        };
        let mut out: BTreeSet<String> = BTreeSet::new();
        for set in [
            self.by_deployment.get(&key(ns, &e.target)),
            self.by_deployment.get(&key(ns, &e.clone)),
            self.by_service.get(&key(ns, &e.service)),
        ]
        .into_iter()
        .flatten()
        {
            out.extend(set.iter().filter(|n| *n != name).cloned());
        }
        out.into_iter().collect()
    }

    /// From now on, a Service selector seen for the first time or changed means its pods must be
    /// read: the pod watch has started listing.
    pub fn pods_watch_started(&mut self) {
        self.pods_watch_started = true;
    }

    /// Records the selector of Service `ns/name` (`None`: the Service is gone). Canaries whose
    /// selector changed must read the pods it selects. Returns the canaries of that Service.
    pub fn service_seen(
        &mut self,
        ns: &str,
        name: &str,
        selector: Option<BTreeMap<String, String>>,
    ) -> Vec<CanaryKey> {
        let names = self
            .by_service
            .get(&key(ns, name))
            .cloned()
            .unwrap_or_default();
        let now: Box<[(String, String)]> = selector.unwrap_or_default().into_iter().collect();
        for n in &names {
            let Some(e) = self.canaries.get_mut(&key(ns, n)) else {
                continue;
            };
            if e.selector.as_ref() == Some(&now) {
                continue;
            }
            // Before the pod watch lists, its list covers whatever the selector picks.
            if self.pods_watch_started && !now.is_empty() {
                e.prime.pods = true;
            }
            e.selector = Some(now.clone());
            let set = self.selecting.entry(ns.to_string()).or_default();
            if now.is_empty() {
                set.remove(n);
            } else {
                set.insert(n.clone());
            }
        }
        names.into_iter().map(|n| key(ns, &n)).collect()
    }

    /// Canaries a Deployment concerns: as target, as clone, or by our label; only canaries of
    /// this index (another shard's canary, or one that is gone, is not woken).
    pub fn for_deployment(&self, meta: &ObjectMeta) -> Vec<CanaryKey> {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let name = meta.name.as_deref().unwrap_or_default();
        let mut out: BTreeSet<CanaryKey> = self
            .by_deployment
            .get(&key(ns, name))
            .into_iter()
            .flatten()
            .map(|n| key(ns, n))
            .collect();
        if let Some(owner) = labelled_owner(meta) {
            let k = key(ns, owner);
            if self.canaries.contains_key(&k) {
                out.insert(k);
            }
        }
        out.into_iter().collect()
    }

    /// Whether the cache keeps this Deployment: a canary's target or clone, or one we created.
    pub fn wants_deployment(&self, meta: &ObjectMeta) -> bool {
        labelled_owner(meta).is_some() || !self.for_deployment(meta).is_empty()
    }

    /// Canaries a pod concerns: its Deployment's, and those whose Service selects it.
    pub fn for_pod(&self, meta: &ObjectMeta) -> Vec<CanaryKey> {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let mut out: BTreeSet<CanaryKey> = BTreeSet::new();
        if let Some(d) = deployment_of_pod(meta) {
            for n in self.by_deployment.get(&key(ns, d)).into_iter().flatten() {
                out.insert(key(ns, n));
            }
        }
        if let Some(labels) = meta.labels.as_ref() {
            // One key, its name overwritten per canary: a pod event passes every canary of its
            // namespace that selects pods, and most do not select this pod.
            let mut k = key(ns, "");
            for n in self.selecting.get(ns).into_iter().flatten() {
                k.1.clear();
                k.1.push_str(n);
                if self.canaries.get(&k).is_some_and(|e| e.selects(labels)) {
                    out.insert(k.clone());
                }
            }
        }
        out.into_iter().collect()
    }

    /// Canaries a Service concerns: those of that Service, and the canary whose Gateway API
    /// backend it is (its Services and their EndpointSlices are kept and wake it).
    pub fn for_service(&self, ns: &str, name: &str) -> Vec<CanaryKey> {
        let mut out: Vec<CanaryKey> = self
            .by_service
            .get(&key(ns, name))
            .into_iter()
            .flatten()
            .map(|n| key(ns, n))
            .collect();
        if let Some(k) = self.backend_owner(ns, name)
            && !out.contains(&k)
        {
            out.push(k);
        }
        out
    }

    /// The canary of this index whose Gateway API backend Service `ns/name` is (see
    /// [`crate::api::labels::backend_service_names`]): `<canary>-stable` or
    /// `<canary>-recording`, found by stripping the suffix, else one of the few irregular names.
    pub fn backend_owner(&self, ns: &str, name: &str) -> Option<CanaryKey> {
        let regular = name
            .strip_suffix("-stable")
            .or_else(|| name.strip_suffix("-recording"))
            .map(|base| key(ns, base))
            .filter(|k| self.canaries.contains_key(k));
        regular.or_else(|| {
            self.irregular_backends
                .get(&key(ns, name))
                .map(|c| key(ns, c))
        })
    }

    /// Canaries a VirtualService (`m.0`) or DestinationRule `m` with references `refs` concerns:
    /// by the Services its hosts name, its owner, its restore note, or a spec that names it.
    pub fn for_mesh(&self, m: &MeshKey, refs: &MeshRefs) -> Vec<CanaryKey> {
        let (kind, ns, name) = m;
        let mut out: BTreeSet<CanaryKey> = BTreeSet::new();
        for svc in &refs.services {
            for n in self.by_service.get(svc).into_iter().flatten() {
                out.insert(key(&svc.0, n));
            }
        }
        for uid in &refs.owners {
            if let Some(k) = self.by_uid.get(uid) {
                out.insert(k.clone());
            }
        }
        if let Some(owner) = &refs.note {
            let k = key(ns, owner);
            if self.canaries.contains_key(&k) {
                out.insert(k);
            }
        }
        if let Some(w) = &refs.wildcard {
            // A scan of every canary: wildcard DestinationRules are few and rarely change.
            let everywhere = ns == istio::ROOT_NAMESPACE;
            for (k, e) in &self.canaries {
                if (everywhere || k.0 == *ns) && w.matches(&e.service, &k.0) {
                    out.insert(k.clone());
                }
            }
        }
        for n in self.by_named_mesh.get(&key(ns, name)).into_iter().flatten() {
            let k = key(ns, n);
            let named = self.canaries.get(&k).and_then(|e| match kind {
                MeshKind::VirtualService => e.virtual_service.as_deref(),
                MeshKind::DestinationRule => e.destination_rule.as_deref(),
                MeshKind::HttpRoute | MeshKind::GrpcRoute => None,
            });
            if named == Some(name.as_str()) {
                out.insert(k);
            }
        }
        out.into_iter().collect()
    }

    /// Records a VirtualService/DestinationRule event (`None`: deleted). Returns the canaries it
    /// concerns now and those it concerned before.
    pub fn mesh_seen(&mut self, m: MeshKey, refs: Option<MeshRefs>) -> Vec<CanaryKey> {
        if let Some(old) = self.mesh_refs.remove(&m) {
            for svc in old.services {
                if let Some(set) = self.by_host.get_mut(&svc) {
                    set.remove(&m);
                }
            }
            if let Some(n) = old.note
                && let Some(set) = self.by_note.get_mut(&key(&m.1, &n))
            {
                set.remove(&m);
            }
            if old.wildcard.is_some() {
                self.wildcards.remove(&m);
            }
        }
        let now = match &refs {
            Some(r) => self.for_mesh(&m, r),
            None => Vec::new(),
        };
        if let Some(r) = refs {
            for svc in &r.services {
                self.by_host
                    .entry(svc.clone())
                    .or_default()
                    .insert(m.clone());
            }
            if let Some(n) = &r.note {
                self.by_note
                    .entry(key(&m.1, n))
                    .or_default()
                    .insert(m.clone());
            }
            if r.wildcard.is_some() {
                self.wildcards.insert(m.clone());
            }
            self.mesh_refs.insert(m.clone(), r);
        }
        let before = self.mesh_last.remove(&m).unwrap_or_default();
        for k in &before {
            if let Some(set) = self.mesh_of.get_mut(k) {
                set.remove(&m);
            }
        }
        let now: SmallSet<CanaryKey> = now.into_iter().collect();
        for k in &now {
            self.mesh_of.entry(k.clone()).or_default().insert(m.clone());
        }
        let mut all: Vec<CanaryKey> = before.iter().chain(&now).cloned().collect();
        all.sort();
        all.dedup();
        if !now.is_empty() {
            self.mesh_last.insert(m, now);
        }
        all
    }

    /// Whether a VirtualService/DestinationRule has been recorded here.
    pub fn knows_mesh(&self, m: &MeshKey) -> bool {
        self.mesh_refs.contains_key(m)
    }

    /// A canary new to the index: links it to the VirtualServices and DestinationRules seen
    /// before it that concern it (by its Service's host, a restore note, a name in its spec).
    fn attach_mesh(&mut self, k: &CanaryKey) {
        let Some(e) = self.canaries.get(k) else {
            return;
        };
        let mut candidates: BTreeSet<MeshKey> = BTreeSet::new();
        candidates.extend(
            self.by_host
                .get(&key(&k.0, &e.service))
                .into_iter()
                .flatten()
                .cloned(),
        );
        candidates.extend(self.by_note.get(k).into_iter().flatten().cloned());
        candidates.extend(self.wildcards.iter().cloned());
        for (kind, n) in [
            (MeshKind::VirtualService, &e.virtual_service),
            (MeshKind::DestinationRule, &e.destination_rule),
        ] {
            if let Some(n) = n {
                candidates.insert((kind, k.0.clone(), n.clone()));
            }
        }
        for m in candidates {
            let Some(refs) = self.mesh_refs.get(&m) else {
                continue;
            };
            if self.for_mesh(&m, refs).contains(k) {
                self.mesh_last
                    .entry(m.clone())
                    .or_default()
                    .insert(k.clone());
                self.mesh_of.entry(k.clone()).or_default().insert(m);
            }
        }
    }

    /// The VirtualServices and DestinationRules a canary concerns, as last seen.
    pub fn mesh_of(&self, ns: &str, name: &str) -> Vec<MeshKey> {
        self.mesh_of
            .get(&key(ns, name))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use serde_json::json;

    fn canary(ns: &str, name: &str, target: &str, service: Option<&str>) -> RecordingCanary {
        let mut spec = json!({"targetRef": {"name": target}, "percent": 10});
        if let Some(s) = service {
            spec["service"] = json!(s);
        }
        serde_json::from_value(json!({
            "apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": spec,
        }))
        .unwrap()
    }

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn pod_of(ns: &str, deploy: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("pod-template-hash".into(), "abc12".into());
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(format!("{deploy}-abc12-xyz")),
            labels: Some(l),
            owner_references: Some(vec![OwnerReference {
                kind: "ReplicaSet".into(),
                name: format!("{deploy}-abc12"),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn index() -> Index {
        let mut i = Index::default();
        i.upsert(&canary("shop", "front", "frontend", None));
        i.upsert(&canary("shop", "cart", "cart", Some("cart-svc")));
        i.upsert(&canary("other", "front", "frontend", None));
        i
    }

    fn k(ns: &str, n: &str) -> CanaryKey {
        key(ns, n)
    }

    /// What the index says of an object given as JSON.
    fn mesh(i: &Index, obj: &Value, vs: bool) -> Vec<CanaryKey> {
        let kind = if vs {
            MeshKind::VirtualService
        } else {
            MeshKind::DestinationRule
        };
        let meta: ObjectMeta = serde_json::from_value(obj["metadata"].clone()).unwrap();
        let m = (
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let refs = MeshRefs::of(&meta, &obj["spec"], kind, "cluster.local");
        i.for_mesh(&m, &refs)
    }

    #[test]
    fn a_canarys_gateway_api_backend_services_concern_it_and_only_it() {
        let mut i = index();
        assert_eq!(
            i.for_service("shop", "front-stable"),
            vec![k("shop", "front")]
        );
        assert_eq!(
            i.for_service("shop", "front-recording"),
            vec![k("shop", "front")]
        );
        assert_eq!(
            i.for_service("other", "front-recording"),
            vec![k("other", "front")]
        );
        assert!(i.for_service("shop", "cart-svc-stable").is_empty());
        assert!(i.for_service("shop", "gone-stable").is_empty());
        // A name that is not a DNS label: found through the irregular names, forgotten with it.
        i.upsert(&canary("shop", "web.v2", "web", None));
        let (stable, recording) = crate::api::labels::backend_service_names("web.v2");
        assert_eq!(i.for_service("shop", &stable), vec![k("shop", "web.v2")]);
        assert_eq!(i.for_service("shop", &recording), vec![k("shop", "web.v2")]);
        i.remove("shop", "web.v2");
        assert!(i.for_service("shop", &stable).is_empty());
        assert!(i.irregular_backends.is_empty());
        // The Service of one canary and the backend of another.
        i.upsert(&canary("shop", "api", "api", Some("front-stable")));
        assert_eq!(
            i.for_service("shop", "front-stable"),
            vec![k("shop", "api"), k("shop", "front")]
        );
    }

    #[test]
    fn a_deployment_concerns_only_the_canaries_that_target_or_clone_it() {
        let i = index();
        assert_eq!(
            i.for_deployment(&meta("shop", "frontend")),
            vec![k("shop", "front")]
        );
        assert_eq!(
            i.for_deployment(&meta("shop", "frontend-recording")),
            vec![k("shop", "front")]
        );
        assert!(i.for_deployment(&meta("shop", "unrelated")).is_empty());
        assert!(!i.wants_deployment(&meta("shop", "unrelated")));
        let mut labelled = meta("shop", "leftover-recording");
        labelled.labels = Some(BTreeMap::from([(CANARY_LABEL.into(), "gone".into())]));
        // Ours by its label: kept in the cache, but it wakes only a canary of this index (not
        // one that is gone, nor another shard's, whose process owns it).
        assert!(i.wants_deployment(&labelled));
        assert!(i.for_deployment(&labelled).is_empty());
        labelled.labels = Some(BTreeMap::from([(CANARY_LABEL.into(), "front".into())]));
        assert_eq!(i.for_deployment(&labelled), vec![k("shop", "front")]);
    }

    #[test]
    fn a_pod_concerns_its_deployments_canary_and_those_whose_service_selects_it() {
        let mut i = index();
        assert_eq!(
            i.for_pod(&pod_of("shop", "frontend", &[])),
            vec![k("shop", "front")]
        );
        assert_eq!(
            i.for_pod(&pod_of("shop", "frontend-recording", &[])),
            vec![k("shop", "front")]
        );
        let stranger = pod_of("shop", "legacy", &[("app", "cart")]);
        assert!(i.for_pod(&stranger).is_empty());
        i.service_seen(
            "shop",
            "cart-svc",
            Some(BTreeMap::from([("app".into(), "cart".into())])),
        );
        assert_eq!(i.for_pod(&stranger), vec![k("shop", "cart")]);
        // A pod with the same owner name in another namespace concerns that namespace's canary.
        assert_eq!(
            i.for_pod(&pod_of("other", "frontend", &[])),
            vec![k("other", "front")]
        );
    }

    #[test]
    fn the_deployment_of_a_pod_comes_from_its_controlling_replicaset() {
        assert_eq!(
            deployment_of_pod(&pod_of("a", "web-v2", &[])),
            Some("web-v2")
        );
        let mut orphan = pod_of("a", "web", &[]);
        orphan.owner_references = None;
        assert_eq!(deployment_of_pod(&orphan), None);
    }

    #[test]
    fn virtual_services_map_by_host_destination_owner_note_and_name() {
        let i = index();
        let by_host = json!({"metadata": {"namespace": "shop", "name": "v"},
            "spec": {"hosts": ["frontend"], "http": [{"route": [{"destination": {"host": "frontend"}}]}]}});
        assert_eq!(mesh(&i, &by_host, true), vec![k("shop", "front")]);
        // A gateway VirtualService: an external host, a destination naming the Service.
        let gateway = json!({"metadata": {"namespace": "shop", "name": "g"},
            "spec": {"hosts": ["shop.example.com"], "gateways": ["gw"],
                     "http": [{"route": [{"destination": {"host": "cart-svc.shop.svc.cluster.local"}}]}]}});
        assert_eq!(mesh(&i, &gateway, true), vec![k("shop", "cart")]);
        // A mesh VirtualService in another namespace naming the Service's long host.
        let elsewhere = json!({"metadata": {"namespace": "edge", "name": "e"},
            "spec": {"hosts": ["frontend.shop.svc.cluster.local"]}});
        assert_eq!(mesh(&i, &elsewhere, true), vec![k("shop", "front")]);
        let owned = json!({"metadata": {"namespace": "shop", "name": "front-recording",
            "ownerReferences": [{"uid": "uid-cart"}]}, "spec": {}});
        assert_eq!(mesh(&i, &owned, true), vec![k("shop", "cart")]);
        let noted = json!({"metadata": {"namespace": "shop", "name": "x", "annotations":
            {"recordingcanary.dev/restore": "{\"canary\":\"cart\",\"weights\":[]}"}}, "spec": {}});
        assert_eq!(mesh(&i, &noted, true), vec![k("shop", "cart")]);
        let unrelated = json!({"metadata": {"namespace": "shop", "name": "u"},
            "spec": {"hosts": ["payments"]}});
        assert!(mesh(&i, &unrelated, true).is_empty());
    }

    #[test]
    fn destination_rules_map_by_host() {
        let i = index();
        let dr = json!({"metadata": {"namespace": "shop", "name": "d"},
            "spec": {"host": "cart-svc.shop.svc.cluster.local"}});
        assert_eq!(mesh(&i, &dr, false), vec![k("shop", "cart")]);
        // The same short host in another namespace is another Service.
        let other = json!({"metadata": {"namespace": "other", "name": "d"},
            "spec": {"host": "frontend"}});
        assert_eq!(mesh(&i, &other, false), vec![k("other", "front")]);
    }

    #[test]
    fn wildcard_destination_rules_map_to_the_canaries_whose_host_they_match_in_their_namespace_or_from_the_root()
     {
        let i = index();
        let shop = json!({"metadata": {"namespace": "shop", "name": "w"},
            "spec": {"host": "*.shop.svc.cluster.local"}});
        assert_eq!(
            mesh(&i, &shop, false),
            vec![k("shop", "cart"), k("shop", "front")]
        );
        // A wildcard DR elsewhere applies to its own namespace's clients only (and those are
        // not the canaries' concern here); one in the root namespace applies to every host.
        let elsewhere = json!({"metadata": {"namespace": "other", "name": "w"},
            "spec": {"host": "*.local"}});
        assert_eq!(mesh(&i, &elsewhere, false), vec![k("other", "front")]);
        let root = json!({"metadata": {"namespace": "istio-system", "name": "w"},
            "spec": {"host": "*.local"}});
        assert_eq!(mesh(&i, &root, false).len(), 3);
        let selected = json!({"metadata": {"namespace": "istio-system", "name": "w"},
            "spec": {"host": "*", "workloadSelector": {"matchLabels": {"a": "b"}}}});
        assert!(mesh(&i, &selected, false).is_empty());
        // A canary created after it finds it.
        let mut i = Index::default();
        let meta: ObjectMeta = serde_json::from_value(root["metadata"].clone()).unwrap();
        let m = (
            MeshKind::DestinationRule,
            "istio-system".to_string(),
            "w".to_string(),
        );
        i.mesh_seen(
            m.clone(),
            Some(MeshRefs::of(
                &meta,
                &root["spec"],
                MeshKind::DestinationRule,
                "cluster.local",
            )),
        );
        i.upsert(&canary("shop", "front", "frontend", None));
        assert_eq!(i.mesh_of("shop", "front"), vec![m]);
    }

    #[test]
    fn canaries_seen_after_the_watches_started_are_primed_and_selector_changes_reprime_pods() {
        let mut i = Index::default();
        i.upsert(&canary("shop", "early", "a", None));
        assert!(!i.get("shop", "early").unwrap().prime.any());
        i.service_seen(
            "shop",
            "a",
            Some(BTreeMap::from([("app".into(), "a".into())])),
        );
        assert!(!i.get("shop", "early").unwrap().prime.pods);
        i.watches_started();
        i.pods_watch_started();
        i.upsert(&canary("shop", "late", "b", None));
        assert!(i.get("shop", "late").unwrap().prime.objects);
        i.primed(
            "shop",
            "late",
            Prime {
                objects: true,
                pods: true,
                clone: true,
            },
        );
        assert!(!i.get("shop", "late").unwrap().prime.any());
        let changed = i.service_seen(
            "shop",
            "a",
            Some(BTreeMap::from([("app".into(), "a2".into())])),
        );
        assert_eq!(changed, vec![k("shop", "early")]);
        assert!(i.get("shop", "early").unwrap().prime.pods);
        // Seeing the same canary again keeps what is known.
        i.primed(
            "shop",
            "early",
            Prime {
                pods: true,
                ..Prime::default()
            },
        );
        i.upsert(&canary("shop", "early", "a", None));
        assert!(!i.get("shop", "early").unwrap().prime.any());
    }

    #[test]
    fn a_canary_created_after_its_virtual_service_finds_it_and_an_object_that_stops_naming_it_still_reaches_it_once()
     {
        let mut i = Index::default();
        let vs = json!({"metadata": {"namespace": "shop", "name": "v"},
            "spec": {"hosts": ["frontend"]}});
        let meta: ObjectMeta = serde_json::from_value(vs["metadata"].clone()).unwrap();
        let m = (
            MeshKind::VirtualService,
            "shop".to_string(),
            "v".to_string(),
        );
        let refs = MeshRefs::of(
            &meta,
            &vs["spec"],
            MeshKind::VirtualService,
            "cluster.local",
        );
        assert!(
            i.mesh_seen(m.clone(), Some(refs)).is_empty(),
            "no canary yet"
        );
        i.upsert(&canary("shop", "front", "frontend", None));
        assert_eq!(i.mesh_of("shop", "front"), vec![m.clone()]);
        // The user points the VirtualService elsewhere: the canary hears of it one last time.
        let moved = json!({"hosts": ["payments"]});
        let refs = MeshRefs::of(&meta, &moved, MeshKind::VirtualService, "cluster.local");
        assert_eq!(
            i.mesh_seen(m.clone(), Some(refs.clone())),
            vec![k("shop", "front")]
        );
        assert!(i.mesh_of("shop", "front").is_empty());
        assert!(i.mesh_seen(m.clone(), Some(refs)).is_empty());
        assert!(i.knows_mesh(&m));
        // Deleted: forgotten by host too, so a later canary does not find it.
        i.mesh_seen(m.clone(), None);
        assert!(!i.knows_mesh(&m));
        i.upsert(&canary("shop", "pay", "payments", None));
        assert!(i.mesh_of("shop", "pay").is_empty());
    }
}
