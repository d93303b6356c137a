//! Selective watch caches: a cluster-wide (or namespace-wide) watch whose objects are kept only
//! while some RecordingCanary is interested in them.
//!
//! kube's reflector keeps every object it sees. For Deployments, Services and Pods that would make
//! the controller's memory grow with every unrelated workload in the cluster, so these kinds go
//! through a [`Selective`] store instead: each watch event is offered to an interest predicate
//! (backed by the [`crate::cache::index::Index`]); objects nobody is interested in are dropped at once.
//!
//! A canary that appears after a watch has listed its objects finds them missing here; the
//! controller then reads them once (`prime`) and inserts them with [`Selective::insert_newer`].
//!
//! Also here: the [`index`] from each watched object to the canaries it concerns (and so what the
//! selective stores keep), [`freshness`] (read-your-writes over the caches: the controller's own
//! writes that the watches have not shown yet), and [`small_set`] (the index's sets of one or two).
//!
//! Layer: in-memory state fed by the controller's watches; never calls the API server. Imports
//! [`crate::api`], [`crate::facts`] and [`crate::istio`] (host names).

pub mod freshness;
pub mod index;
pub mod small_set;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

/// `namespace/name` of an object.
pub type Key = (String, String);

/// The key of an object.
pub fn key_of<K: Resource>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// Whether resourceVersion `a` is at least `b`.
///
/// resourceVersions are opaque by contract, but every apiserver backed by etcd (and kine) hands
/// out its storage revision, a decimal integer that only grows: compare them as such. When
/// either is not a number, only equality counts.
pub fn rv_at_least(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a >= b,
        _ => a == b,
    }
}

struct Inner<K> {
    /// namespace → name → object: a canary's reads look in its own namespace only.
    objects: HashMap<String, HashMap<String, Arc<K>>>,
    /// Names seen (by namespace) since the last `Init` of a re-list; `None` outside a re-list.
    relisting: Option<HashMap<String, HashSet<String>>>,
    /// The newest resourceVersion the watch has delivered, kept or not.
    newest: Option<String>,
}

impl<K> Inner<K> {
    fn insert(&mut self, (ns, name): Key, o: Arc<K>) {
        self.objects.entry(ns).or_default().insert(name, o);
    }

    fn remove(&mut self, (ns, name): &Key) {
        if let Some(m) = self.objects.get_mut(ns) {
            m.remove(name);
            if m.is_empty() {
                self.objects.remove(ns);
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(&str, &str, &K) -> bool) {
        self.objects.retain(|ns, m| {
            m.retain(|name, o| keep(ns, name, o));
            !m.is_empty()
        });
    }

    fn retain_in(&mut self, ns: &str, keep: impl Fn(&K) -> bool) {
        if let Some(m) = self.objects.get_mut(ns) {
            m.retain(|_, o| keep(o));
            if m.is_empty() {
                self.objects.remove(ns);
            }
        }
    }
}

/// A store of the objects of one kind that some canary is interested in.
pub struct Selective<K> {
    inner: RwLock<Inner<K>>,
    ready_tx: watch::Sender<bool>,
}

impl<K> Default for Selective<K> {
    fn default() -> Self {
        Self {
            inner: RwLock::new(Inner {
                objects: HashMap::new(),
                relisting: None,
                newest: None,
            }),
            ready_tx: watch::channel(false).0,
        }
    }
}

impl<K: Resource + Clone> Selective<K> {
    /// The object `ns/name`, if it is kept.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        self.inner.read().ok()?.objects.get(ns)?.get(name).cloned()
    }

    /// Every kept object of namespace `ns` for which `pick` holds.
    pub fn in_namespace(&self, ns: &str, pick: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        self.inner
            .read()
            .map(|g| {
                g.objects
                    .get(ns)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| pick(o))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many objects are kept.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .map(|g| g.objects.values().map(HashMap::len).sum())
            .unwrap_or(0)
    }

    /// Whether no object is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one watch event. `interested` decides whether an object is kept.
    pub fn apply(&self, event: &Event<K>, interested: impl Fn(&K) -> bool) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        if let Event::Apply(o) | Event::InitApply(o) | Event::Delete(o) = event
            && let Some(rv) = o.resource_version()
            && g.newest.as_deref().is_none_or(|n| !rv_at_least(n, &rv))
        {
            g.newest = Some(rv);
        }
        match event {
            Event::Apply(o) | Event::InitApply(o) => {
                let k = key_of(o);
                if let Some(seen) = g.relisting.as_mut() {
                    seen.entry(k.0.clone()).or_default().insert(k.1.clone());
                }
                if interested(o) {
                    g.insert(k, Arc::new(o.clone()));
                } else {
                    g.remove(&k);
                }
            }
            Event::Delete(o) => {
                g.remove(&key_of(o));
            }
            Event::Init => g.relisting = Some(HashMap::new()),
            Event::InitDone => {
                // Objects deleted while the watch was down are not in the re-list.
                if let Some(seen) = g.relisting.take() {
                    g.retain(|ns, name, _| seen.get(ns).is_some_and(|s| s.contains(name)));
                }
                drop(g);
                self.ready_tx.send_replace(true);
            }
        }
    }

    /// Inserts an object read outside the watch (a canary's first read, a write's response),
    /// unless the store already holds the same or a newer revision.
    pub fn insert_newer(&self, o: K) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        let k = key_of(&o);
        let newer = match g.objects.get(&k.0).and_then(|m| m.get(&k.1)) {
            Some(have) => !rv_at_least(
                have.resource_version().as_deref().unwrap_or_default(),
                o.resource_version().as_deref().unwrap_or_default(),
            ),
            None => true,
        };
        if newer {
            g.insert(k, Arc::new(o));
        }
    }

    /// Drops the kept objects of namespace `ns` for which `keep` is false (a canary of that
    /// namespace went away): the other namespaces are not looked at.
    pub fn retain_in(&self, ns: &str, keep: impl Fn(&K) -> bool) {
        if let Ok(mut g) = self.inner.write() {
            g.retain_in(ns, |o| keep(o));
        }
    }

    /// The newest resourceVersion this store's watch has delivered (of any object, kept or
    /// not). A list "not older than" it holds every change the watch passed by, and is served
    /// from the apiserver's watch cache without waiting for it to catch up with etcd.
    pub fn newest_seen(&self) -> Option<String> {
        self.inner.read().ok()?.newest.clone()
    }

    /// Whether the first list has completed.
    pub fn is_ready(&self) -> bool {
        *self.ready_tx.borrow()
    }

    /// Resolves once the first list has completed.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.ready_tx.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compact_forms_list_and_watch_the_real_kinds() {
        use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, core::v1::Service};
        use kube::Resource as _;
        assert_eq!(
            crate::facts::pods::PodFacts::url_path(&(), Some("ns")),
            Pod::url_path(&(), Some("ns"))
        );
        assert_eq!(
            crate::facts::services::ServiceFacts::url_path(&(), Some("ns")),
            Service::url_path(&(), Some("ns"))
        );
        assert_eq!(
            crate::facts::deployments::DeploymentFacts::url_path(&(), None),
            Deployment::url_path(&(), None)
        );
    }
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn cm(ns: &str, name: &str, rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn remembers_the_newest_revision_the_watch_delivered_kept_or_not() {
        let s = Selective::default();
        assert_eq!(s.newest_seen(), None);
        s.apply(&Event::InitApply(cm("a", "x", "12")), |_| false);
        s.apply(&Event::InitApply(cm("a", "y", "7")), |_| true);
        assert_eq!(s.newest_seen().as_deref(), Some("12"));
        s.apply(&Event::Delete(cm("a", "y", "15")), |_| true);
        assert_eq!(s.newest_seen().as_deref(), Some("15"));
        // An object read outside the watch says nothing about what the watch delivered.
        s.insert_newer(cm("a", "z", "30"));
        assert_eq!(s.newest_seen().as_deref(), Some("15"));
    }

    #[test]
    fn keeps_only_objects_someone_is_interested_in() {
        let s = Selective::default();
        s.apply(&Event::Apply(cm("a", "keep", "1")), |o| {
            o.name_any() == "keep"
        });
        s.apply(&Event::Apply(cm("a", "drop", "2")), |o| {
            o.name_any() == "keep"
        });
        assert!(s.get("a", "keep").is_some());
        assert!(s.get("a", "drop").is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn an_object_losing_interest_is_dropped_and_a_delete_removes_it() {
        let s = Selective::default();
        s.apply(&Event::Apply(cm("a", "x", "1")), |_| true);
        s.apply(&Event::Apply(cm("a", "x", "2")), |_| false);
        assert!(s.get("a", "x").is_none());
        s.apply(&Event::Apply(cm("a", "y", "3")), |_| true);
        s.apply(&Event::Delete(cm("a", "y", "4")), |_| true);
        assert!(s.is_empty());
    }

    #[test]
    fn a_relist_forgets_objects_deleted_while_the_watch_was_down_and_becomes_ready() {
        let s = Selective::default();
        assert!(!s.is_ready());
        s.apply(&Event::Init, |_| true);
        s.apply(&Event::InitApply(cm("a", "gone", "1")), |_| true);
        s.apply(&Event::InitApply(cm("a", "stays", "1")), |_| true);
        s.apply(&Event::InitDone, |_| true);
        assert!(s.is_ready());
        s.apply(&Event::Init, |_| true);
        // Until the re-list is done, what was there stays readable.
        assert!(s.get("a", "gone").is_some());
        s.apply(&Event::InitApply(cm("a", "stays", "5")), |_| true);
        s.apply(&Event::InitDone, |_| true);
        assert!(s.get("a", "gone").is_none());
        assert_eq!(
            s.get("a", "stays").and_then(|o| o.resource_version()),
            Some("5".into())
        );
    }

    #[test]
    fn a_read_outside_the_watch_never_replaces_a_newer_revision() {
        let s = Selective::default();
        s.apply(&Event::Apply(cm("a", "x", "10")), |_| true);
        s.insert_newer(cm("a", "x", "9"));
        assert_eq!(
            s.get("a", "x").and_then(|o| o.resource_version()),
            Some("10".into())
        );
        s.insert_newer(cm("a", "x", "11"));
        assert_eq!(
            s.get("a", "x").and_then(|o| o.resource_version()),
            Some("11".into())
        );
        s.insert_newer(cm("a", "new", "3"));
        assert!(s.get("a", "new").is_some());
    }

    #[test]
    fn resource_versions_compare_as_numbers_and_otherwise_only_by_equality() {
        assert!(rv_at_least("100", "99"));
        assert!(rv_at_least("100", "100"));
        assert!(!rv_at_least("99", "100"));
        assert!(rv_at_least("abc", "abc"));
        assert!(!rv_at_least("abd", "abc"));
    }

    #[test]
    fn in_namespace_filters_by_namespace_and_predicate() {
        let s = Selective::default();
        for (ns, n) in [("a", "1"), ("a", "2"), ("b", "1")] {
            s.apply(&Event::Apply(cm(ns, n, "1")), |_| true);
        }
        assert_eq!(s.in_namespace("a", |_| true).len(), 2);
        assert_eq!(s.in_namespace("a", |o| o.name_any() == "2").len(), 1);
        assert_eq!(s.in_namespace("c", |_| true).len(), 0);
    }
}
