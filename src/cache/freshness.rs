//! Read-your-writes over the watch caches.
//!
//! The controller plans from its watch caches, which lag its own writes by a watch event. Every
//! write it makes is recorded here with the revision it produced (or the UID it deleted). Before a
//! canary is planned again, its recorded writes must be visible in the caches; until they are,
//! the reconcile waits for the watch event instead of planning from a stale picture. That event,
//! the echo of the controller's own write, wakes only the canary that waits for it: echoes wake
//! nobody otherwise, since the reconcile that wrote has already planned what comes next.
//!
//! A write whose echo never arrives (a watch that broke and re-listed past it) is forgotten after
//! [`EXPIRY`]; the writes are guarded by resourceVersion, so planning from a stale read then
//! fails with a conflict rather than doing harm.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::cache::index::CanaryKey;
use crate::cache::rv_at_least;

/// How long a recorded write is waited for.
pub const EXPIRY: Duration = Duration::from_secs(10);

/// The kinds the controller writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Canary,
    Deployment,
    Pod,
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
    Service,
}

impl From<crate::api::MeshKind> for Kind {
    fn from(k: crate::api::MeshKind) -> Self {
        match k {
            crate::api::MeshKind::VirtualService => Kind::VirtualService,
            crate::api::MeshKind::DestinationRule => Kind::DestinationRule,
            crate::api::MeshKind::HttpRoute => Kind::HttpRoute,
            crate::api::MeshKind::GrpcRoute => Kind::GrpcRoute,
        }
    }
}

impl Kind {
    /// The kind's name, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Canary => "RecordingCanary",
            Kind::Deployment => "Deployment",
            Kind::Pod => "Pod",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Service => "Service",
        }
    }
}

/// What a write left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The object at this resourceVersion or a later one.
    AtLeast(String),
    /// The object with this UID gone.
    Gone(String),
}

/// One write: of which object, with what result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub kind: Kind,
    pub name: String,
    pub expect: Expect,
}

/// What a cache holds of an object: (resourceVersion, UID).
pub type Seen = Option<(String, String)>;

type ObjKey = (Kind, String, String);

#[derive(Debug)]
struct Pending {
    canary: CanaryKey,
    expect: Expect,
    at: Instant,
}

/// How a watch event relates to the controller's own writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventVerdict {
    /// The event is exactly the result of one of our writes: nothing else changed.
    pub echo: bool,
    /// A canary that was waiting for this event and may now be planned.
    pub wake: Option<CanaryKey>,
    /// For the event that showed one of our writes: how long after the write it came.
    pub after: Option<Duration>,
}

/// The writes not yet seen in the caches, and when each canary last wrote its mesh objects.
///
/// Every lookup is by object or by canary, never a scan of all pending writes: at 10,000
/// canaries converging, tens of thousands are pending at once, and every watch event and every
/// reconcile asks.
#[derive(Debug, Default)]
pub struct Writes {
    pending: HashMap<ObjKey, Pending>,
    /// The keys of `pending`, by the canary that wrote them.
    by_canary: HashMap<CanaryKey, Vec<ObjKey>>,
    waiting: HashSet<CanaryKey>,
    mesh_written: HashMap<CanaryKey, Timestamp>,
    expired: Vec<Kind>,
}

impl Writes {
    /// Records the writes a reconcile of `canary` made, in namespace `ns`.
    pub fn record(&mut self, canary: &CanaryKey, ns: &str, written: Vec<Written>, now: Instant) {
        for w in written {
            if matches!(
                w.kind,
                Kind::VirtualService | Kind::DestinationRule | Kind::HttpRoute | Kind::Service
            ) {
                self.mesh_written.insert(canary.clone(), Timestamp::now());
            }
            let k = (w.kind, ns.to_string(), w.name);
            let p = Pending {
                canary: canary.clone(),
                expect: w.expect,
                at: now,
            };
            match self.pending.insert(k.clone(), p) {
                Some(old) if &old.canary == canary => {}
                old => {
                    if let Some(old) = old {
                        self.unlink(&old.canary, &k);
                    }
                    self.by_canary.entry(canary.clone()).or_default().push(k);
                }
            }
        }
    }

    /// Drops `k` from `canary`'s list of pending writes.
    fn unlink(&mut self, canary: &CanaryKey, k: &ObjKey) {
        if let Some(keys) = self.by_canary.get_mut(canary) {
            keys.retain(|x| x != k);
            if keys.is_empty() {
                self.by_canary.remove(canary);
            }
        }
    }

    /// When `canary` last wrote a VirtualService, DestinationRule, HTTPRoute or Service in this
    /// process.
    pub fn mesh_written(&self, canary: &CanaryKey) -> Option<Timestamp> {
        self.mesh_written.get(canary).copied()
    }

    /// A watch event for object `kind ns/name` at `rv` (UID `uid`; `deleted` for a delete).
    pub fn on_event(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        rv: &str,
        uid: &str,
        deleted: bool,
    ) -> EventVerdict {
        let k = (kind, ns.to_string(), name.to_string());
        let Some(p) = self.pending.get(&k) else {
            return EventVerdict::default();
        };
        let (satisfied, echo) = match &p.expect {
            // Deleted after our write (a pod we labelled went away): nothing left to wait for.
            Expect::AtLeast(_) if deleted => (true, false),
            Expect::AtLeast(want) => (rv_at_least(rv, want), rv == want),
            Expect::Gone(gone) => (deleted && uid == gone, deleted && uid == gone),
        };
        if !satisfied {
            return EventVerdict::default();
        }
        let canary = p.canary.clone();
        let after = Some(p.at.elapsed());
        self.pending.remove(&k);
        self.unlink(&canary, &k);
        let wake = (self.waiting.contains(&canary) && !self.has_pending(&canary)).then(|| {
            self.waiting.remove(&canary);
            canary
        });
        EventVerdict { echo, wake, after }
    }

    fn has_pending(&self, canary: &CanaryKey) -> bool {
        self.by_canary.contains_key(canary)
    }

    /// Whether the caches still lack a write of `canary`. `seen` tells what a cache holds of an
    /// object. Writes seen (or expired) are forgotten; while any is missing, the canary waits
    /// for its echo.
    pub fn stale(
        &mut self,
        canary: &CanaryKey,
        now: Instant,
        seen: impl Fn(Kind, &str, &str) -> Seen,
    ) -> bool {
        let keys = self.by_canary.remove(canary).unwrap_or_default();
        let mut left = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(p) = self.pending.get(&k) else {
                continue;
            };
            let (kind, ns, name) = &k;
            let visible = match (&p.expect, seen(*kind, ns, name)) {
                (Expect::AtLeast(want), Some((rv, _))) => rv_at_least(&rv, want),
                (Expect::AtLeast(_), None) => false,
                (Expect::Gone(uid), Some((_, have_uid))) => &have_uid != uid,
                (Expect::Gone(_), None) => true,
            };
            if !visible && now.duration_since(p.at) > EXPIRY {
                tracing::debug!(?kind, %ns, %name, "a write's watch event never came; planning without it");
                self.expired.push(*kind);
            }
            if visible || now.duration_since(p.at) > EXPIRY {
                self.pending.remove(&k);
            } else {
                left.push(k);
            }
        }
        if !left.is_empty() {
            self.by_canary.insert(canary.clone(), left);
        }
        let stale = self.has_pending(canary);
        if stale {
            self.waiting.insert(canary.clone());
        } else {
            self.waiting.remove(canary);
        }
        stale
    }

    /// Forgets a canary that went away.
    pub fn forget(&mut self, canary: &CanaryKey) {
        for k in self.by_canary.remove(canary).unwrap_or_default() {
            self.pending.remove(&k);
        }
        self.waiting.remove(canary);
        self.mesh_written.remove(canary);
    }

    /// The kinds of the writes given up on since the last call (for metrics).
    pub fn take_expired(&mut self) -> Vec<Kind> {
        std::mem::take(&mut self.expired)
    }

    /// Writes not yet seen (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> CanaryKey {
        ("shop".into(), "front".into())
    }

    /// `v` is the event that showed a write: echo or not, whom it wakes, and the delay measured.
    fn assert_seen(v: &EventVerdict, echo: bool, wake: Option<CanaryKey>) {
        assert!(v.after.is_some(), "the delay since the write is measured");
        assert_eq!((v.echo, &v.wake), (echo, &wake), "{v:?}");
    }

    fn wrote(kind: Kind, name: &str, expect: Expect) -> Written {
        Written {
            kind,
            name: name.into(),
            expect,
        }
    }

    #[test]
    fn the_echo_of_our_own_write_wakes_nobody_and_is_not_an_event_to_plan_from() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Deployment, "x", Expect::AtLeast("10".into()))],
            t,
        );
        let v = w.on_event(Kind::Deployment, "shop", "x", "10", "u", false);
        assert_seen(&v, true, None);
        // The next change is someone else's.
        let v = w.on_event(Kind::Deployment, "shop", "x", "11", "u", false);
        assert_eq!(v, EventVerdict::default());
    }

    #[test]
    fn a_canary_planned_before_its_writes_were_seen_waits_and_is_woken_by_the_last_echo() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![
                wrote(Kind::Canary, "front", Expect::AtLeast("5".into())),
                wrote(Kind::VirtualService, "vs", Expect::Gone("uid-vs".into())),
            ],
            t,
        );
        // The caches hold the canary at 4 and the VS still there: stale.
        let seen = |k: Kind, _: &str, _: &str| match k {
            Kind::Canary => Some(("4".to_string(), "uid-c".to_string())),
            _ => Some(("7".to_string(), "uid-vs".to_string())),
        };
        assert!(w.stale(&c(), t, seen));
        let v = w.on_event(Kind::Canary, "shop", "front", "5", "uid-c", false);
        assert_eq!(v.wake, None, "the VS delete is still missing");
        let v = w.on_event(Kind::VirtualService, "shop", "vs", "8", "uid-vs", true);
        assert_seen(&v, true, Some(c()));
        assert!(!w.stale(&c(), t, |_, _, _| None));
    }

    #[test]
    fn a_later_revision_satisfies_a_write_but_is_not_an_echo() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Pod, "p", Expect::AtLeast("10".into()))],
            t,
        );
        let v = w.on_event(Kind::Pod, "shop", "p", "12", "u", false);
        assert!(!v.echo);
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn caches_that_caught_up_clear_the_writes_and_expired_writes_are_dropped() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Deployment, "x", Expect::AtLeast("10".into()))],
            t,
        );
        assert!(!w.stale(&c(), t, |_, _, _| Some(("11".into(), "u".into()))));
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Deployment, "y", Expect::AtLeast("20".into()))],
            t,
        );
        assert!(w.stale(&c(), t, |_, _, _| None));
        assert!(w.take_expired().is_empty());
        assert!(!w.stale(&c(), t + EXPIRY + Duration::from_secs(1), |_, _, _| None));
        assert_eq!(w.take_expired(), vec![Kind::Deployment], "counted once");
        assert!(w.take_expired().is_empty());
    }

    #[test]
    fn a_write_the_cache_shows_is_not_counted_as_expired_however_late_the_check() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Pod, "p", Expect::AtLeast("10".into()))],
            t,
        );
        let late = t + EXPIRY + Duration::from_secs(5);
        assert!(!w.stale(&c(), late, |_, _, _| Some(("10".into(), "u".into()))));
        assert!(w.take_expired().is_empty());
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn an_object_deleted_after_our_write_is_not_waited_for() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Pod, "p", Expect::AtLeast("10".into()))],
            t,
        );
        assert!(w.stale(&c(), t, |_, _, _| None));
        let v = w.on_event(Kind::Pod, "shop", "p", "11", "u", true);
        assert_seen(&v, false, Some(c()));
        assert!(!w.stale(&c(), t, |_, _, _| None));
    }

    #[test]
    fn a_deleted_object_recreated_with_another_uid_counts_as_gone() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Deployment, "x", Expect::Gone("old".into()))],
            t,
        );
        assert!(!w.stale(&c(), t, |_, _, _| Some(("3".into(), "new".into()))));
    }

    #[test]
    fn mesh_writes_are_timed_and_forgotten_with_the_canary() {
        let mut w = Writes::default();
        let t = Instant::now();
        w.record(
            &c(),
            "shop",
            vec![wrote(Kind::Pod, "p", Expect::AtLeast("1".into()))],
            t,
        );
        assert!(w.mesh_written(&c()).is_none());
        w.record(
            &c(),
            "shop",
            vec![wrote(
                Kind::DestinationRule,
                "d",
                Expect::AtLeast("2".into()),
            )],
            t,
        );
        assert!(w.mesh_written(&c()).is_some());
        w.forget(&c());
        assert!(w.mesh_written(&c()).is_none());
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn each_canary_waits_only_for_its_own_writes_and_a_rewrite_by_another_moves_the_wait() {
        let mut w = Writes::default();
        let t = Instant::now();
        let other: CanaryKey = ("shop".into(), "back".into());
        let pod = |rv: &str| vec![wrote(Kind::Pod, "p", Expect::AtLeast(rv.into()))];
        w.record(&c(), "shop", pod("5"), t);
        w.record(
            &other,
            "shop",
            vec![wrote(Kind::Deployment, "b", Expect::AtLeast("6".into()))],
            t,
        );
        let nothing_seen = |_: Kind, _: &str, _: &str| None;
        assert!(w.stale(&c(), t, nothing_seen));
        assert!(w.stale(&other, t, nothing_seen));
        // The other canary labels the same pod: the write is now its to wait for.
        w.record(&other, "shop", pod("7"), t);
        assert!(!w.stale(&c(), t, nothing_seen), "no write of its own left");
        assert_eq!(w.pending(), 2);
        // Its Deployment's echo alone does not wake it: the pod is still awaited.
        let v = w.on_event(Kind::Deployment, "shop", "b", "6", "u", false);
        assert_seen(&v, true, None);
        let v = w.on_event(Kind::Pod, "shop", "p", "7", "u", false);
        assert_seen(&v, true, Some(other.clone()));
        assert!(!w.stale(&other, t, nothing_seen));
        assert_eq!(w.pending(), 0);
        // Expired writes are dropped, and counted.
        w.record(&c(), "shop", pod("9"), t);
        assert!(!w.stale(&c(), t + EXPIRY + Duration::from_secs(1), nothing_seen));
        assert_eq!(w.take_expired(), [Kind::Pod]);
        assert_eq!(w.pending(), 0);
    }
}
