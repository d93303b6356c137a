//! Leader election with a coordination.k8s.io Lease.
//!
//! Expiry is judged by this process's own clock from when it last saw the lease change
//! (as client-go does), never by comparing its clock with the holder's timestamps, so clock
//! skew between nodes cannot make two leaders. A leader that stops gracefully releases the
//! lease so that a standby takes over at once.
//!
//! No two writers: a standby takes over `duration` (15 s) after it last saw the lease change,
//! which is after the leader's last successful renewal was *sent*. The leader may write only
//! until `renew_deadline` (10 s) after it sent that renewal ([`Fence`]); every renewal attempt is
//! cut off at that deadline, and then the leader stops (the process exits and is restarted). So
//! a hung network connection (a "partition"), a hung renew call or a paused process stops the
//! leader's writes 5 s before a standby can start its own.
//!
//! Shard partitions (see [`crate::runtime::shard`]): with a [`RecordCheck`], every take or renewal of
//! the lease is followed by a read of the partition record, and the fence opens only if the
//! record still admits this process's partition. [`PartitionGate`] moves the record, judging the
//! other partitions' Leases by the same local-clock rule ([`Observer`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::runtime::shard::{self, Gate, Partition, Record, Shard, ToCheck, Waiting};

/// Whether this process may write: it leads, and its lease was renewed recently enough.
/// Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Fence {
    /// `None`: no election, always allowed.
    held: Option<Arc<Mutex<Held>>>,
    /// When a fence without election was created: it leads from then on.
    created: Timestamp,
    leading: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Held {
    /// Writes are allowed until then.
    until: Option<Instant>,
    /// Wall-clock time this process last started to lead.
    since: Option<Timestamp>,
}

impl Fence {
    /// No leader election: this process always writes.
    pub fn always() -> Self {
        Self {
            held: None,
            created: Timestamp::now(),
            leading: watch::channel(true).0,
        }
    }

    /// Leader election: nothing may be written until [`Fence::renewed`].
    pub fn elected() -> Self {
        Self {
            held: Some(Arc::new(Mutex::new(Held::default()))),
            created: Timestamp::now(),
            leading: watch::channel(false).0,
        }
    }

    fn with_held<T>(&self, f: impl FnOnce(&mut Held) -> T) -> Option<T> {
        self.held
            .as_ref()
            .map(|m| f(&mut m.lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// Whether a write may be sent now.
    pub fn may_write(&self) -> bool {
        self.with_held(|h| h.until.is_some_and(|d| Instant::now() < d))
            .unwrap_or(true)
    }

    /// The wall-clock time this process last started to lead: `None` while it may not write.
    /// Waits that a predecessor started (and may have cut short by dying) are measured from no
    /// earlier than this. A renewal that comes after the fence had closed starts a new term.
    pub fn leading_since(&self) -> Option<Timestamp> {
        self.with_held(|h| match h.until {
            Some(d) if Instant::now() < d => h.since,
            _ => None,
        })
        .unwrap_or(Some(self.created))
    }

    /// Writes are allowed until `until`.
    pub fn renewed(&self, until: Instant) {
        let renewed = self.with_held(|h| {
            if h.until.is_none_or(|d| Instant::now() >= d) {
                h.since = Some(Timestamp::now());
            }
            h.until = Some(until);
        });
        if renewed.is_some() {
            self.leading.send_replace(true);
        }
    }

    /// Leadership is gone: no more writes.
    pub fn lost(&self) {
        let lost = self.with_held(|h| *h = Held::default());
        if lost.is_some() {
            self.leading.send_replace(false);
        }
    }

    /// Resolves once this process leads (at once without election).
    pub async fn until_leading(&self) {
        let mut rx = self.leading.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }
}

/// How the lease is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// A standby takes over this long after the leader's last renewal.
    pub duration: Duration,
    /// The leader writes no longer than this after it sent its last successful renewal, and
    /// gives up then. Shorter than `duration`, by more than a write takes.
    pub renew_deadline: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How often a standby retries.
    pub retry_every: Duration,
}

impl LeaseConfig {
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The last (holder, renewTime) seen, and when this process saw it.
    observed: Option<(String, Option<Timestamp>, Instant)>,
    /// When the last successful take or renewal was sent.
    last_ok: Option<Instant>,
    fence: Fence,
    /// With shard partitions: the record that must admit this process after each lease write.
    check: Option<RecordCheck>,
    /// Why the record did not admit this process at the last attempt.
    refused: Option<String>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            last_ok: None,
            fence: Fence::elected(),
            check: None,
            refused: None,
        }
    }

    /// Shares `fence` with the writers: it opens while this elector holds the lease.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Leads only while the partition record admits this process (read after each take or
    /// renewal of the lease, so that a record that moved before the lease was written is seen).
    pub fn with_check(mut self, check: RecordCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// The lease this elector takes.
    pub fn lease_name(&self) -> &str {
        &self.cfg.name
    }

    /// Why the partition record refused this process at its last attempt, if it did.
    pub fn partition_refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Tries once, cut off at the renew deadline when leading; on success the fence opens
    /// until `renew_deadline` after the attempt started.
    pub async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let result = match self.last_ok {
            Some(ok) => {
                let left = (ok + self.cfg.renew_deadline).saturating_duration_since(started);
                match tokio::time::timeout(left, self.take_or_renew_admitted()).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(deadline = ?self.cfg.renew_deadline, "lease: renewal did not complete before the renew deadline");
                        Ok(false)
                    }
                }
            }
            None => self.take_or_renew_admitted().await,
        };
        match result {
            Ok(true) => {
                self.last_ok = Some(started);
                self.fence.renewed(started + self.cfg.renew_deadline);
            }
            Ok(false) if self.last_ok.is_some() => self.give_up(),
            _ => {}
        }
        result
    }

    /// Takes or renews the lease, then (with a [`RecordCheck`]) reads the partition record; a
    /// lease taken for a partition the record no longer admits is released at once.
    async fn take_or_renew_admitted(&mut self) -> Result<bool, kube::Error> {
        if !self.try_acquire_or_renew().await? {
            return Ok(false);
        }
        let Some(check) = &self.check else {
            return Ok(true);
        };
        match check.refusal().await? {
            None => {
                self.refused = None;
                Ok(true)
            }
            Some(why) => {
                warn!(lease = %self.cfg.name, "partition: {why}; giving the lease back");
                self.refused = Some(why);
                self.release_lease().await;
                Ok(false)
            }
        }
    }

    fn give_up(&mut self) {
        self.last_ok = None;
        self.fence.lost();
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Tries once to take or renew the lease. `Ok(true)`: this process leads.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let pp = PostParams::default();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let seen_now = (holder.clone(), renew);
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h.clone(), *r) != seen_now);
        if changed {
            self.observed = Some((seen_now.0, seen_now.1, Instant::now()));
        }
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.cfg.duration);
        let mine = holder == self.cfg.identity;
        let free = holder.is_empty();
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|(_, _, at)| !changed && at.elapsed() > duration);
        if !(mine || free || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(transitions, acquired));
        match self.api.replace(&self.cfg.name, &pp, &lease).await {
            Ok(_) => {
                if !mine {
                    info!(lease = %self.cfg.name, previous = %holder, "acquired the lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How often a standby tries again.
    pub fn retry_every(&self) -> Duration {
        self.cfg.retry_every
    }

    /// Waits until this process leads.
    pub async fn acquire(&mut self) {
        loop {
            match self.attempt().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "lease: could not read or take the lease"),
            }
            tokio::time::sleep(self.cfg.retry_every).await;
        }
    }

    /// Renews until leadership is lost; returns then (the fence is closed by then).
    pub async fn hold(&mut self) {
        let mut next = self.last_ok.map(|ok| ok + self.cfg.renew_every);
        loop {
            // Renewals start `renew_every` after the last successful one *started*, not after it
            // returned: slow answers (a renewal is several requests) must not push the next one
            // towards the deadline. A failed attempt is retried every `retry_every` until then.
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => return,
            }
            let Some(ok) = self.last_ok else {
                return;
            };
            if ok.elapsed() >= self.cfg.renew_deadline {
                warn!(deadline = ?self.cfg.renew_deadline, "lease: not renewed within the renew deadline; stopping");
                self.give_up();
                return;
            }
            match self.attempt().await {
                Ok(true) => next = self.last_ok.map(|ok| ok + self.cfg.renew_every),
                Ok(false) => {
                    match &self.refused {
                        Some(why) => warn!("partition: {why}; stopping"),
                        None => {
                            warn!("lease: lost (taken by another process, or not renewed in time)")
                        }
                    }
                    self.give_up();
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "lease: renewal failed; retrying");
                    next = Some(Instant::now() + self.cfg.retry_every);
                }
            }
        }
    }

    /// Gives the lease up so that a standby takes over without waiting for expiry.
    pub async fn release(&mut self) {
        self.give_up();
        // Logged before the release is sent, so before anyone can take over.
        info!(lease = %self.cfg.name, "lease: releasing it (this process writes no more)");
        self.release_lease().await;
    }

    /// Clears the holder if it is this process (the fence must be closed already, or never opened).
    async fn release_lease(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.cfg.name, "released the lease"),
            Err(e) => warn!(error = %e, "lease: could not release"),
        }
    }
}

/// What a read of another process's Lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// No such Lease.
    Absent,
    /// Forbidden to this process. A process of the same ServiceAccount may not renew it either,
    /// so whoever holds it stops writing within its renew deadline; it is treated as held,
    /// unchanged since this process first tried to read it.
    Unreadable,
    /// The Lease's holder (empty: released), renewal time and duration.
    Seen {
        holder: String,
        renewed: Option<Timestamp>,
        duration: Option<Duration>,
    },
}

impl Read {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Read::Seen {
            holder: spec.holder_identity.unwrap_or_default(),
            renewed: spec.renew_time.map(|t| t.0),
            duration: spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(1) as u64)),
        }
    }
}

/// What a Lease said: its holder and renewal time (`None`: unreadable).
type Said = Option<(String, Option<Timestamp>)>;

/// What this process has seen of other processes' Leases, to tell by its own clock (never by
/// comparing clocks) whether each may still be held: a Lease is free once released or absent,
/// and expired once seen unchanged for longer than its duration.
#[derive(Debug)]
pub struct Observer {
    /// Per Lease: what it said, and when this process first saw that.
    seen: HashMap<String, (Said, Instant)>,
    /// The duration of a Lease that says none (or cannot be read).
    default_duration: Duration,
}

impl Observer {
    pub fn new(default_duration: Duration) -> Self {
        Self {
            seen: HashMap::new(),
            default_duration,
        }
    }

    /// Records what a read of Lease `name` found at `now`; whether it may still be held.
    pub fn held(&mut self, name: &str, read: &Read, now: Instant) -> bool {
        let (state, duration) = match read {
            Read::Absent => {
                self.seen.remove(name);
                return false;
            }
            Read::Seen { holder, .. } if holder.is_empty() => {
                self.seen.remove(name);
                return false;
            }
            Read::Unreadable => (None, self.default_duration),
            Read::Seen {
                holder,
                renewed,
                duration,
            } => (
                Some((holder.clone(), *renewed)),
                duration.unwrap_or(self.default_duration),
            ),
        };
        match self.seen.get(name) {
            Some((s, at)) if *s == state => now.saturating_duration_since(*at) <= duration,
            _ => {
                self.seen.insert(name.to_string(), (state, now));
                true
            }
        }
    }
}

/// Reads the partition record (the Lease `<base>-partition`) for a process of partition `mine`.
#[derive(Clone, Debug)]
pub struct RecordCheck {
    api: Api<Lease>,
    name: String,
    mine: Partition,
}

impl RecordCheck {
    /// The record's Lease and what it says (`None` if its annotations are missing or garbled).
    pub async fn read(&self) -> Result<Option<(Lease, Option<Record>)>, kube::Error> {
        Ok(self.api.get_opt(&self.name).await?.map(|lease| {
            let record = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(Record::from_annotations);
            (lease, record)
        }))
    }

    /// `None` if the record admits this process's partition; else why not.
    pub async fn refusal(&self) -> Result<Option<String>, kube::Error> {
        Ok(match self.read().await? {
            Some((_, Some(r))) if r.admits(self.mine) => None,
            Some((_, Some(r))) => Some(format!(
                "the partition record says {r}, this process is of {}",
                self.mine
            )),
            Some((_, None)) => Some(format!("the partition record {} is unreadable", self.name)),
            None => Some(format!("the partition record {} is gone", self.name)),
        })
    }
}

/// Moves a process of partition `mine` towards leading: reads the record, watches the Leases of
/// the partitions it names, and writes the record when [`shard::gate`] says so.
pub struct PartitionGate {
    check: RecordCheck,
    base: String,
    observer: Observer,
    /// The last waiting message logged, and when (it is repeated now and then).
    said: Option<(String, Instant)>,
}

/// How often a process that waits for the partition says so again.
const SAY_AGAIN: Duration = Duration::from_secs(30);

impl PartitionGate {
    pub fn new(client: Client, namespace: &str, base: &str, mine: Partition) -> Self {
        Self {
            check: RecordCheck {
                api: Api::namespaced(client, namespace),
                name: shard::record_name(base),
                mine,
            },
            base: base.to_string(),
            observer: Observer::new(LeaseConfig::new("", "", "").duration),
            said: None,
        }
    }

    /// The check every elector of this process makes after each take or renewal.
    pub fn check(&self) -> RecordCheck {
        self.check.clone()
    }

    /// One step towards leading (a few API calls). `Ok(true)`: the record admits this
    /// partition, so this process may try to take a shard's Lease.
    pub async fn step(&mut self) -> Result<bool, kube::Error> {
        let mine = self.check.mine;
        // A write is followed by a fresh read: creating the record, say, is followed by the
        // check of the Leases it names before this process may lead.
        for _ in 0..4 {
            let read = self.check.read().await?;
            let record = match &read {
                None => None,
                Some((_, Some(r))) => Some(*r),
                Some((_, None)) => {
                    self.say(format!(
                        "the partition record {} has no readable {}/{} annotations; waiting (fix or delete it only when no controller runs)",
                        self.check.name,
                        shard::SHARDS_ANNOTATION,
                        shard::GENERATION_ANNOTATION
                    ));
                    return Ok(false);
                }
            };
            let held = self.held(&shard::to_check(mine, record.as_ref())).await?;
            match shard::gate(mine, record.as_ref(), &held) {
                Gate::Open => {
                    self.said = None;
                    return Ok(true);
                }
                Gate::Wait(w) => {
                    self.say(match w {
                        Waiting::Newer(r) => format!(
                            "waiting: the partition record says {r}, newer than this process's {mine}; this process stays a standby"
                        ),
                        Waiting::Held(r, leases) => format!(
                            "waiting for the Leases of the old partition to be released or to expire (the record says {r}, this process is of {mine}); held: {}",
                            leases.join(", ")
                        ),
                    });
                    return Ok(false);
                }
                Gate::Create(r) => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(self.check.name.clone()),
                            annotations: Some(annotations(BTreeMap::new(), &r)),
                            ..Default::default()
                        },
                        spec: None,
                    };
                    match self.check.api.create(&PostParams::default(), &lease).await {
                        Ok(_) => {
                            info!(record = %self.check.name, "partition: created the record: {r}")
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
                Gate::Write(r) => {
                    let Some((mut lease, old)) = read else {
                        return Ok(false);
                    };
                    let kept = lease.metadata.annotations.take().unwrap_or_default();
                    lease.metadata.annotations = Some(annotations(kept, &r));
                    // The resourceVersion read above: a record changed since is not overwritten.
                    match self
                        .check
                        .api
                        .replace(&self.check.name, &PostParams::default(), &lease)
                        .await
                    {
                        Ok(_) => {
                            let from = old.map(|o| o.to_string()).unwrap_or_default();
                            info!(record = %self.check.name, from = %from, "partition: the record now says {r}");
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(false)
    }

    /// Which Leases of `c` may still be held, by what this process has seen of them. A name of
    /// this process's own partition is left out: whoever holds it excludes this process anyway.
    async fn held(&mut self, c: &ToCheck) -> Result<Vec<String>, kube::Error> {
        let own = self.check.mine.lease_names(&self.base);
        let mut names: Vec<String> = c
            .shards
            .iter()
            .flat_map(|&n| {
                Partition {
                    shards: n,
                    generation: 0,
                }
                .lease_names(&self.base)
            })
            .collect();
        if c.legacy {
            names.push(self.base.clone());
        }
        names.retain(|n| !own.contains(n));
        let mut held = Vec::new();
        for name in names {
            if self.observe(&name).await?.1 {
                held.push(name);
            }
        }
        if c.legacy {
            // A build before partitions took the first free of `<base>-shard-0`, `-1` …, so the
            // ones that exist are a prefix.
            for i in 0..64 {
                let name = Shard::legacy_lease_name(&self.base, i);
                let (read, is_held) = self.observe(&name).await?;
                if is_held {
                    held.push(name);
                }
                if matches!(read, Read::Absent | Read::Unreadable) {
                    break;
                }
            }
        }
        Ok(held)
    }

    async fn observe(&mut self, name: &str) -> Result<(Read, bool), kube::Error> {
        let read = match self.check.api.get_opt(name).await {
            Ok(None) => Read::Absent,
            Ok(Some(lease)) => Read::of(&lease),
            Err(kube::Error::Api(s)) if s.code == 403 => Read::Unreadable,
            Err(e) => return Err(e),
        };
        let held = self.observer.held(name, &read, Instant::now());
        Ok((read, held))
    }

    /// Logs why this process waits: when the reason changes, and every [`SAY_AGAIN`] otherwise.
    fn say(&mut self, what: String) {
        let again = self
            .said
            .as_ref()
            .is_none_or(|(s, at)| *s != what || at.elapsed() >= SAY_AGAIN);
        if again {
            info!(partition = %self.check.mine, "partition: {what}");
            self.said = Some((what, Instant::now()));
        }
    }
}

/// `kept` with the record's annotations set (and an empty previous-shards removed).
fn annotations(mut kept: BTreeMap<String, String>, r: &Record) -> BTreeMap<String, String> {
    for (k, v) in r.annotations() {
        match v {
            Some(v) => kept.insert(k.to_string(), v),
            None => kept.remove(k),
        };
    }
    kept
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn lease_body(holder: &str) -> Vec<u8> {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1,
                     "renewTime": "2026-01-01T00:00:00.000000Z"},
        })
        .to_string()
        .into_bytes()
    }

    /// A narrow mock of the API server's Lease endpoint: it answers the first `answered`
    /// requests (GET 404, then create; then GET and PUT as the holder), and never answers
    /// any request after those (a hung connection).
    fn api(answered: usize, calls: Arc<AtomicUsize>, seen: Arc<Mutex<Vec<Instant>>>) -> Client {
        let svc = tower::service_fn(move |req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut v) = seen.lock() {
                v.push(Instant::now());
            }
            async move {
                if n >= answered {
                    std::future::pending::<()>().await;
                }
                let (status, body) = match (req.method().as_str(), n) {
                    ("GET", 0) => (
                        404,
                        br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#.to_vec(),
                    ),
                    _ => (200, lease_body("me")),
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        Client::new(svc, "ns")
    }

    fn config() -> LeaseConfig {
        LeaseConfig {
            duration: Duration::from_millis(900),
            renew_deadline: Duration::from_millis(600),
            renew_every: Duration::from_millis(200),
            retry_every: Duration::from_millis(100),
            ..LeaseConfig::new("l", "ns", "me")
        }
    }

    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_stops_writing_before_a_standby_may_take_over() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Acquire (GET 404, create), one renewal (GET, PUT), then every call hangs.
        let fence = Fence::elected();
        let cfg = config();
        let mut e = Elector::new(api(4, calls.clone(), seen.clone()), cfg.clone())
            .with_fence(fence.clone());
        assert!(!fence.may_write(), "a standby must not write");
        e.acquire().await;
        assert!(fence.may_write());
        let held = tokio::time::timeout(Duration::from_secs(10), e.hold()).await;
        assert!(held.is_ok(), "hold() must return when renewals hang");
        let stopped = Instant::now();
        assert!(
            !fence.may_write(),
            "the fence must be closed once hold() returns"
        );
        let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
        assert!(
            seen.len() >= 5,
            "the hung renewal was attempted: {} calls",
            seen.len()
        );
        // The last renewal that succeeded started with call 2 (GET) and wrote with call 3
        // (PUT). A standby that saw that write takes over `duration` after it; the leader
        // stopped writing `renew_deadline` after the renewal started, well before.
        let (renewal_started, renewal_written) = (seen[2], seen[3]);
        let writes_until = stopped.duration_since(renewal_started);
        assert!(
            writes_until <= cfg.renew_deadline + Duration::from_millis(150),
            "the leader wrote for {writes_until:?} after its last renewal started"
        );
        assert!(
            stopped < renewal_written + cfg.duration,
            "the leader still wrote when a standby could take over"
        );
    }

    #[tokio::test]
    async fn the_fence_opens_only_from_the_renewal_sent_and_for_the_renew_deadline() {
        let fence = Fence::elected();
        assert!(!fence.may_write());
        let sent = Instant::now();
        fence.renewed(sent + Duration::from_millis(300));
        assert!(fence.may_write());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(
            !fence.may_write(),
            "past the renew deadline nothing may be written"
        );
        fence.renewed(Instant::now() + Duration::from_secs(5));
        fence.lost();
        assert!(!fence.may_write());
        assert!(Fence::always().may_write());
    }

    #[test]
    fn leading_since_is_when_this_process_last_started_to_lead() {
        let fence = Fence::elected();
        assert_eq!(fence.leading_since(), None, "a standby does not lead");
        let before = Timestamp::now();
        fence.renewed(Instant::now() + Duration::from_secs(5));
        let since = fence.leading_since().expect("leading");
        assert!(since >= before && since <= Timestamp::now());
        // A renewal within the term keeps the start of the term.
        std::thread::sleep(Duration::from_millis(5));
        fence.renewed(Instant::now() + Duration::from_secs(5));
        assert_eq!(fence.leading_since(), Some(since));
        fence.lost();
        assert_eq!(fence.leading_since(), None, "not leading any more");
        // Leading again starts a new term.
        std::thread::sleep(Duration::from_millis(5));
        fence.renewed(Instant::now() + Duration::from_secs(5));
        assert!(fence.leading_since().is_some_and(|t| t > since));
        let always = Fence::always();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            always.leading_since().is_some_and(|t| t < Timestamp::now()),
            "without election a process leads from when its fence was made"
        );
    }

    #[test]
    fn a_renewal_after_the_fence_closed_starts_a_new_term() {
        let fence = Fence::elected();
        fence.renewed(Instant::now() + Duration::from_millis(1));
        let first = fence.leading_since();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(
            fence.leading_since(),
            None,
            "past its deadline it does not lead"
        );
        fence.renewed(Instant::now() + Duration::from_secs(5));
        assert!(fence.leading_since() > first);
    }

    #[test]
    fn another_process_lease_is_held_until_released_or_seen_unchanged_for_its_duration() {
        let mut o = Observer::new(Duration::from_secs(15));
        let t0 = Instant::now();
        let seen = |holder: &str, renewed: i64| Read::Seen {
            holder: holder.into(),
            renewed: Timestamp::from_second(renewed).ok(),
            duration: Some(Duration::from_secs(10)),
        };
        assert!(!o.held("a", &Read::Absent, t0));
        assert!(!o.held("a", &seen("", 1), t0), "released");
        // Seen for the first time: held, whatever its renewTime says about the holder's clock.
        assert!(o.held("a", &seen("p", 1), t0));
        assert!(o.held("a", &seen("p", 1), t0 + Duration::from_secs(10)));
        assert!(
            !o.held("a", &seen("p", 1), t0 + Duration::from_secs(11)),
            "expired"
        );
        // A renewal makes it held again, for a full duration from when it was seen.
        let t1 = t0 + Duration::from_secs(12);
        assert!(o.held("a", &seen("p", 2), t1));
        assert!(o.held("a", &seen("p", 2), t1 + Duration::from_secs(10)));
        assert!(!o.held("a", &seen("p", 2), t1 + Duration::from_secs(11)));
        // Taken by another process.
        assert!(o.held("a", &seen("q", 2), t1 + Duration::from_secs(12)));
        // A Lease this process may not read: held for the default duration from the first try.
        assert!(o.held("b", &Read::Unreadable, t0));
        assert!(o.held("b", &Read::Unreadable, t0 + Duration::from_secs(15)));
        assert!(!o.held("b", &Read::Unreadable, t0 + Duration::from_secs(16)));
    }

    /// An in-memory API server for Leases in namespace `ns`, with resourceVersion conflicts
    /// (409) as the real one; GETs of names in `forbidden` answer 403.
    #[derive(Clone, Default)]
    struct Leases {
        store: Arc<Mutex<(u64, BTreeMap<String, serde_json::Value>)>>,
        forbidden: Arc<Mutex<Vec<String>>>,
        /// A Lease written (once) just before the next write of the record: another process's
        /// write that lands between this process's checks and its record write.
        before_record_write: Arc<Mutex<Option<serde_json::Value>>>,
        /// How long each answer takes (a slow API server, or a slow network).
        latency: Arc<Mutex<Duration>>,
    }

    impl Leases {
        fn client(&self) -> Client {
            let me = self.clone();
            let svc = tower::service_fn(move |req: Request<Body>| {
                let me = me.clone();
                async move {
                    let latency = *me.latency.lock().unwrap();
                    tokio::time::sleep(latency).await;
                    let (parts, body) = req.into_parts();
                    let body = body.collect_bytes().await.unwrap_or_default();
                    let path = parts.uri.path().to_string();
                    let name = path
                        .strip_prefix("/apis/coordination.k8s.io/v1/namespaces/ns/leases")
                        .map(|rest| rest.trim_start_matches('/').to_string());
                    let (status, out) = me.answer(parts.method.as_str(), name, &body);
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(out.to_string().into_bytes()))
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                }
            });
            Client::new(svc, "ns")
        }

        fn answer(
            &self,
            method: &str,
            name: Option<String>,
            body: &[u8],
        ) -> (u16, serde_json::Value) {
            let status = |code: u16, reason: &str| {
                (
                    code,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "reason": reason, "code": code}),
                )
            };
            let Some(name) = name else {
                return status(404, "NotFound");
            };
            let mut guard = self.store.lock().unwrap();
            let (rv, store) = &mut *guard;
            let new: Option<serde_json::Value> = serde_json::from_slice(body).ok();
            match method {
                "GET" if self.forbidden.lock().unwrap().contains(&name) => status(403, "Forbidden"),
                "GET" => match store.get(&name) {
                    Some(l) => (200, l.clone()),
                    None => status(404, "NotFound"),
                },
                "POST" => {
                    let mut l = new.unwrap_or_default();
                    let name = l["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    if store.contains_key(&name) {
                        return status(409, "AlreadyExists");
                    }
                    *rv += 1;
                    l["metadata"]["resourceVersion"] = rv.to_string().into();
                    store.insert(name, l.clone());
                    (201, l)
                }
                "PUT" => {
                    if name == "rc-partition"
                        && let Some(l) = self.before_record_write.lock().unwrap().take()
                    {
                        *rv += 1;
                        let mut l = l;
                        l["metadata"]["resourceVersion"] = rv.to_string().into();
                        let n = l["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        store.insert(n, l);
                    }
                    let mut l = new.unwrap_or_default();
                    let Some(old) = store.get(&name) else {
                        return status(404, "NotFound");
                    };
                    if l["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                        return status(409, "Conflict");
                    }
                    *rv += 1;
                    l["metadata"]["resourceVersion"] = rv.to_string().into();
                    store.insert(name, l.clone());
                    (200, l)
                }
                _ => status(405, "MethodNotAllowed"),
            }
        }

        fn holder(&self, name: &str) -> Option<String> {
            let store = self.store.lock().unwrap();
            store.1.get(name).and_then(|l| {
                l["spec"]["holderIdentity"]
                    .as_str()
                    .filter(|h| !h.is_empty())
                    .map(String::from)
            })
        }

        fn set_record(&self, r: Record) {
            let mut guard = self.store.lock().unwrap();
            let (rv, store) = &mut *guard;
            *rv += 1;
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some("rc-partition".into()),
                    namespace: Some("ns".into()),
                    annotations: Some(annotations(BTreeMap::new(), &r)),
                    resource_version: Some(rv.to_string()),
                    ..Default::default()
                },
                spec: None,
            };
            store.insert("rc-partition".into(), serde_json::to_value(l).unwrap());
        }

        fn record(&self) -> Option<Record> {
            let store = self.store.lock().unwrap();
            let l: Lease = serde_json::from_value(store.1.get("rc-partition")?.clone()).ok()?;
            Record::from_annotations(l.metadata.annotations.as_ref()?)
        }
    }

    /// A controller process of partition `p`: its gate and one elector per shard, leases of 1 s.
    struct Process {
        gate: PartitionGate,
        electors: Vec<Elector>,
        fence: Fence,
    }

    fn process(api: &Leases, id: &str, shards: u32, generation: u64) -> Process {
        let p = Partition { shards, generation };
        let gate = PartitionGate::new(api.client(), "ns", "rc", p);
        let fence = Fence::elected();
        let electors = (0..shards)
            .map(|i| {
                let cfg = LeaseConfig {
                    duration: Duration::from_secs(1),
                    renew_deadline: Duration::from_millis(600),
                    ..LeaseConfig::new(&Shard::lease_name("rc", i, shards), "ns", id)
                };
                Elector::new(api.client(), cfg)
                    .with_fence(fence.clone())
                    .with_check(gate.check())
            })
            .collect();
        Process {
            gate,
            electors,
            fence,
        }
    }

    impl Process {
        /// One round as `lead_one` makes it: the gate, then every shard's Lease; the shard led.
        async fn try_lead(&mut self) -> Option<usize> {
            if !self.gate.step().await.expect("gate") {
                return None;
            }
            for (i, e) in self.electors.iter_mut().enumerate() {
                if e.attempt().await.expect("lease") {
                    return Some(i);
                }
            }
            None
        }
    }

    #[tokio::test]
    async fn a_leader_whose_answers_are_slow_but_within_the_deadline_keeps_its_lease() {
        // Each answer takes 80 ms, so a renewal (lease read and write, then the partition
        // record) takes about 240 ms. Renewing 200 ms after the last renewal *returned* would
        // start the next one 440 ms after the last one started and finish it at 680 ms, past
        // the 600 ms deadline: the leader would step down though every renewal succeeded.
        // Counted from when the last one started, the next one finishes by about 480 ms.
        let api = Leases::default();
        *api.latency.lock().unwrap() = Duration::from_millis(80);
        let gate = PartitionGate::new(
            api.client(),
            "ns",
            "rc",
            Partition {
                shards: 1,
                generation: 0,
            },
        );
        let fence = Fence::elected();
        let mut e = Elector::new(api.client(), config())
            .with_fence(fence.clone())
            .with_check(gate.check());
        let mut gate = gate;
        assert!(gate.step().await.expect("gate"), "the first partition");
        e.acquire().await;
        assert!(fence.may_write());
        let held = tokio::time::timeout(Duration::from_secs(3), e.hold()).await;
        assert!(
            held.is_err(),
            "the leader gave its lease up although every renewal succeeded"
        );
        assert!(fence.may_write());
    }

    #[tokio::test]
    async fn a_new_shard_count_leads_only_once_every_lease_of_the_old_one_is_released_or_expired() {
        let api = Leases::default();
        let (mut a, mut b) = (process(&api, "a", 2, 1), process(&api, "b", 2, 1));
        assert_eq!(
            a.try_lead().await,
            Some(0),
            "the first process creates the record and leads"
        );
        assert_eq!(b.try_lead().await, Some(1));
        assert_eq!(
            api.record(),
            Some(Record {
                current: Partition {
                    shards: 2,
                    generation: 1
                },
                previous: None
            })
        );
        assert_eq!(api.holder("rc-shard-0-of-2").as_deref(), Some("a"));

        // Three shards now: a new process waits while the two old leaders live.
        let mut c = process(&api, "c", 3, 2);
        for _ in 0..3 {
            assert_eq!(
                c.try_lead().await,
                None,
                "two partitions would lead at once"
            );
            assert!(
                a.electors[0].attempt().await.expect("renew"),
                "the old leader keeps leading"
            );
            assert!(b.electors[1].attempt().await.expect("renew"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(api.record().map(|r| r.current.shards), Some(2));
        // `a` stops gracefully (releases); `b` hangs: its Lease expires by c's clock.
        a.electors[0].release().await;
        assert!(!a.fence.may_write());
        let started = Instant::now();
        let led = loop {
            if let Some(i) = c.try_lead().await {
                break i;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "c never led");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "c led {:?} after b's last renewal, before b's Lease (1 s) expired",
            started.elapsed()
        );
        assert_eq!(led, 0);
        assert!(c.fence.may_write());
        assert_eq!(
            api.record(),
            Some(Record {
                current: Partition {
                    shards: 3,
                    generation: 2
                },
                previous: None
            })
        );
        // b wakes up past its renew deadline: it may not write.
        assert!(!b.electors[1].attempt().await.expect("renew"));
        assert!(!b.fence.may_write());
    }

    #[tokio::test]
    async fn a_leader_stops_at_its_next_renewal_once_the_record_names_another_partition() {
        let api = Leases::default();
        let mut a = process(&api, "a", 2, 1);
        assert_eq!(a.try_lead().await, Some(0));
        assert!(a.electors[0].attempt().await.expect("renew"));
        assert!(a.fence.may_write());
        api.set_record(Record {
            current: Partition {
                shards: 3,
                generation: 2,
            },
            previous: Some(shard::Previous::Shards(2)),
        });
        assert!(!a.electors[0].attempt().await.expect("renew"));
        assert!(!a.fence.may_write(), "the fence closes at once");
        assert!(
            a.electors[0]
                .partition_refused()
                .is_some_and(|why| why.contains("shards=3")),
            "{:?}",
            a.electors[0].partition_refused()
        );
        assert_eq!(
            api.holder("rc-shard-0-of-2"),
            None,
            "and gives its Lease back"
        );
    }

    #[tokio::test]
    async fn an_old_process_restarted_after_the_change_stays_a_standby() {
        let api = Leases::default();
        let mut new = process(&api, "new", 3, 2);
        assert_eq!(new.try_lead().await, Some(0));
        // Its shard-0 lease is the only one held; every Lease of the old count is free.
        let mut old = process(&api, "old", 2, 1);
        for _ in 0..3 {
            assert_eq!(old.try_lead().await, None);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Even when every new leader is gone, the record keeps the newer generation.
        new.electors[0].release().await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(old.try_lead().await, None);
        assert_eq!(
            api.record().map(|r| r.current),
            Some(Partition {
                shards: 3,
                generation: 2
            })
        );
        // Should it take a Lease of its count anyway (a race with the move), the record check
        // after the Lease write refuses it and gives the Lease back.
        assert!(!old.electors[0].attempt().await.expect("attempt"));
        assert!(!old.fence.may_write());
        assert_eq!(api.holder("rc-shard-0-of-2"), None);
        // A process of the same count but an older generation leads through the same Leases.
        let mut same = process(&api, "same", 3, 1);
        assert_eq!(same.try_lead().await, Some(0));
    }

    #[tokio::test]
    async fn a_process_that_moved_the_record_waits_for_an_old_leader_that_slipped_in() {
        let api = Leases::default();
        let mut old = process(&api, "old", 2, 1);
        assert_eq!(old.try_lead().await, Some(0));
        old.electors[0].release().await;
        let mut new = process(&api, "new", 1, 2);
        // Another old process takes `rc-shard-1-of-2` (and reads the record, which still says
        // 2 shards, so it leads) after the new process saw that Lease free, just before the new
        // process moves the record.
        *api.before_record_write.lock().unwrap() = Some(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "rc-shard-1-of-2", "namespace": "ns"},
            "spec": {"holderIdentity": "slipped", "leaseDurationSeconds": 1,
                     "renewTime": "2026-01-01T00:00:00.000000Z"},
        }));
        assert_eq!(
            new.try_lead().await,
            None,
            "the slipped-in leader still writes"
        );
        assert_eq!(
            api.record(),
            Some(Record {
                current: Partition {
                    shards: 1,
                    generation: 2
                },
                previous: Some(shard::Previous::Shards(2))
            }),
            "the record moved (no old process may start leading now) but is not settled"
        );
        assert_eq!(api.holder("rc-shard-1-of-2").as_deref(), Some("slipped"));
        // A later old process is refused by the record and gives its Lease back.
        let mut later = process(&api, "later", 2, 1);
        assert!(!later.electors[0].attempt().await.expect("attempt"));
        assert!(!later.fence.may_write());
        assert_eq!(api.holder("rc-shard-0-of-2"), None);
        assert_eq!(new.try_lead().await, None);
        // Once the slipped-in leader's Lease expired (1 s, by the new process's clock).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(new.try_lead().await, Some(0));
        assert_eq!(api.record().and_then(|r| r.previous), None);
    }

    #[tokio::test]
    async fn a_lease_of_a_build_before_partitions_keeps_a_new_process_waiting() {
        let api = Leases::default();
        // A build before partitions leads `rc-shard-0` (and `rc-shard-1`; the scan stops at the
        // first one missing).
        for (name, who) in [("rc-shard-0", "legacy-0"), ("rc-shard-1", "legacy-1")] {
            let mut e = Elector::new(
                api.client(),
                LeaseConfig {
                    duration: Duration::from_secs(1),
                    ..LeaseConfig::new(name, "ns", who)
                },
            );
            assert!(e.attempt().await.expect("legacy lease"));
            if who == "legacy-0" {
                e.release().await;
            }
        }
        let mut new = process(&api, "new", 1, 1);
        assert_eq!(new.try_lead().await, None);
        assert_eq!(
            api.record(),
            Some(Record {
                current: Partition {
                    shards: 1,
                    generation: 1
                },
                previous: Some(shard::Previous::Legacy)
            })
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(new.try_lead().await, Some(0), "the legacy Lease expired");
        assert_eq!(api.record().and_then(|r| r.previous), None);
    }

    #[tokio::test]
    async fn a_lease_this_process_may_not_read_counts_as_held_for_a_lease_duration() {
        let api = Leases::default();
        let mut old = process(&api, "old", 2, 1);
        assert_eq!(old.try_lead().await, Some(0));
        old.electors[0].release().await;
        api.forbidden.lock().unwrap().push("rc-shard-1-of-2".into());
        let mut new = process(&api, "new", 3, 2);
        assert_eq!(new.try_lead().await, None, "rc-shard-1-of-2 may be held");
        assert_eq!(api.record().map(|r| r.current.shards), Some(2));
    }
}
