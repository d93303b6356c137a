//! Leader election with a coordination.k8s.io Lease.
//!
//! Expiry is judged by this process's own clock from when it last saw the lease change
//! (as client-go does), never by comparing its clock with the holder's timestamps, so clock
//! skew between nodes cannot make two leaders. A leader that cannot renew within the lease
//! duration gives up (the process exits and is restarted), and a leader that stops gracefully
//! releases the lease so that a standby takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::{info, warn};

/// How the lease is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// A standby takes over this long after the leader's last renewal.
    pub duration: Duration,
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
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
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
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "lease: could not read or take the lease"),
            }
            tokio::time::sleep(self.cfg.retry_every).await;
        }
    }

    /// Renews until leadership is lost; returns then.
    pub async fn hold(&mut self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    warn!("lease: another process took the lease");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "lease: renewal failed");
                    // Give up before a standby could consider the lease expired.
                    if last_ok.elapsed() + self.cfg.renew_every >= self.cfg.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up so that a standby takes over without waiting for expiry.
    pub async fn release(&mut self) {
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
