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
//! a hung renew call, a paused process or a partition stops the leader's writes 5 s before a
//! standby can start its own.

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

/// Whether this process may write: it leads, and its lease was renewed recently enough.
/// Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Fence {
    /// `None`: no election, always allowed.
    until: Option<Arc<Mutex<Option<Instant>>>>,
    leading: watch::Sender<bool>,
}

impl Fence {
    /// No leader election: this process always writes.
    pub fn always() -> Self {
        Self {
            until: None,
            leading: watch::channel(true).0,
        }
    }

    /// Leader election: nothing may be written until [`Fence::renewed`].
    pub fn elected() -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(None))),
            leading: watch::channel(false).0,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.until
            .as_ref()
            .and_then(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether a write may be sent now.
    pub fn may_write(&self) -> bool {
        match &self.until {
            None => true,
            Some(_) => self.deadline().is_some_and(|d| Instant::now() < d),
        }
    }

    /// Writes are allowed until `until`.
    pub fn renewed(&self, until: Instant) {
        if let Some(m) = &self.until {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
            self.leading.send_replace(true);
        }
    }

    /// Leadership is gone: no more writes.
    pub fn lost(&self) {
        if let Some(m) = &self.until {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            last_ok: None,
            fence: Fence::elected(),
        }
    }

    /// Shares `fence` with the writers: it opens while this elector holds the lease.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Tries once, cut off at the renew deadline when leading; on success the fence opens
    /// until `renew_deadline` after the attempt started.
    pub async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let result = match self.last_ok {
            Some(ok) => {
                let left = (ok + self.cfg.renew_deadline).saturating_duration_since(started);
                match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(deadline = ?self.cfg.renew_deadline, "lease: renewal did not complete before the renew deadline");
                        Ok(false)
                    }
                }
            }
            None => self.try_acquire_or_renew().await,
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
        let mut wait = self.cfg.renew_every;
        loop {
            tokio::time::sleep(wait).await;
            let Some(ok) = self.last_ok else {
                return;
            };
            if ok.elapsed() >= self.cfg.renew_deadline {
                warn!(deadline = ?self.cfg.renew_deadline, "lease: not renewed within the renew deadline; stopping");
                self.give_up();
                return;
            }
            match self.attempt().await {
                Ok(true) => wait = self.cfg.renew_every,
                Ok(false) => {
                    warn!("lease: lost (taken by another process, or not renewed in time)");
                    self.give_up();
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "lease: renewal failed; retrying");
                    wait = self.cfg.retry_every;
                }
            }
        }
    }

    /// Gives the lease up so that a standby takes over without waiting for expiry.
    pub async fn release(&mut self) {
        self.give_up();
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
        if let Err(e) = self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "lease: could not release");
        }
    }
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
}
