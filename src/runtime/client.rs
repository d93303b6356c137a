//! The Kubernetes client: kube's default stack, with every request counted by verb and resource
//! in the `recording_canary_api_requests_total` metric, and at most a fixed number of requests
//! waiting for their answer at once.
//!
//! kube's client speaks HTTP/1.1, one request per connection at a time, so every request that
//! waits for its answer holds a connection (and its TLS state) to the apiserver. Unbounded, the
//! reconciles of 10,000 canaries created together held about 4,800 connections at once.
//! [`InFlight`] keeps the requests under a limit (the same as the reconciles', see
//! `Context::with_max_reconciles`: a reconcile may send a few requests together); the others wait
//! their turn in order. Watches, which stay open for minutes, and the Lease (leader election must
//! never wait behind the canaries' work) are not counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kube::client::{Body, ClientBuilder};
use kube::{Client, Config};
use tokio::sync::Semaphore;
use tower::util::MapRequestLayer;
use tower::{Layer, Service};

use crate::runtime::metrics::Metrics;

/// A client from the environment (KUBECONFIG or the in-cluster config) that counts its requests
/// and keeps at most `in_flight` of them waiting for an answer.
pub async fn counted(metrics: Arc<Metrics>, in_flight: usize) -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    from_config(config, metrics, in_flight)
}

/// A client for `config` that counts its requests and keeps at most `in_flight` of them
/// waiting for an answer.
pub fn from_config(
    config: Config,
    metrics: Arc<Metrics>,
    in_flight: usize,
) -> Result<Client, kube::Error> {
    let count = MapRequestLayer::new(move |req: http::Request<Body>| {
        metrics.request(req.method().as_str(), req.uri().path(), req.uri().query());
        req
    });
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&count)
        .with_layer(&InFlightLayer::new(in_flight))
        .build())
}

/// Whether a request is exempt from the limit: a watch (open for minutes) or a Lease request
/// (leader election must not wait behind the canaries' work, or the leader would miss its renew
/// deadline under load).
pub fn exempt(path: &str, query: Option<&str>) -> bool {
    path.starts_with("/apis/coordination.k8s.io/")
        || query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// Adds [`InFlight`] to a client stack.
#[derive(Clone)]
pub struct InFlightLayer {
    permits: Arc<Semaphore>,
}

impl InFlightLayer {
    /// At most `limit` requests (at least 1) waiting for their answer at once.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
        }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// A service that lets a request through once fewer than its limit of (non-exempt) requests
/// wait for their answer; the permit is held until the response's head arrives. Waiters are
/// served first come, first served.
#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for InFlight<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permits = (!exempt(req.uri().path(), req.uri().query())).then(|| self.permits.clone());
        // The wait is in the returned future, which the caller awaits: kube runs this stack
        // behind one buffer task, and a wait in `poll_ready` would hold every request (watches
        // and the Lease too) behind it. The inner future sends nothing before it is polled.
        let answer = self.inner.call(req);
        Box::pin(async move {
            // A closed semaphore (never closed here) would only lift the limit.
            let _permit = match permits {
                Some(p) => p.acquire_owned().await.ok(),
                None => None,
            };
            answer.await
        })
    }
}

/// Whether the cluster serves the Gateway API's HTTPRoutes (`gateway.networking.k8s.io/v1`) and
/// this process may list them (in `namespace`, or cluster-wide): the controller watches them, and
/// its Gateway API router works, only then (a watch it may not list would keep every canary
/// waiting for its first list). Asked once at start; a cluster that gets the CRDs later needs a
/// restart of the controller.
pub async fn gateway_api_served(client: &kube::Client, namespace: Option<&str>) -> bool {
    route_kind_served(client, namespace, crate::api::MeshKind::HttpRoute).await
}

/// Whether the cluster serves routes of `kind` (a Gateway API kind) and this process may list
/// them (in `namespace`, or cluster-wide).
pub async fn route_kind_served(
    client: &kube::Client,
    namespace: Option<&str>,
    kind: crate::api::MeshKind,
) -> bool {
    let ar = kind.api_resource();
    let served = match client.list_api_group_resources(&ar.api_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == ar.plural),
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            tracing::warn!(error = %e, kind = kind.name(), "could not ask whether the kind is served; it is not watched");
            false
        }
    };
    if !served {
        return false;
    }
    let api: kube::Api<kube::api::DynamicObject> = match namespace {
        Some(ns) => kube::Api::namespaced_with(client.clone(), ns, &ar),
        None => kube::Api::all_with(client.clone(), &ar),
    };
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, kind = kind.name(), "the kind is served, but cannot be listed (RBAC?): it is not watched");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Answers after `delay`, recording the most requests it ever had at once.
    #[derive(Clone)]
    struct Slow {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl Service<http::Request<()>> for Slow {
        type Response = ();
        type Error = Infallible;
        type Future = BoxFuture<Result<(), Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let (now, most, delay) = (self.now.clone(), self.most.clone(), self.delay);
            Box::pin(async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    fn slow() -> Slow {
        Slow {
            now: Arc::default(),
            most: Arc::default(),
            delay: Duration::from_millis(20),
        }
    }

    async fn send_all(svc: &InFlight<Slow>, uris: impl Iterator<Item = String>) {
        let calls: Vec<_> = uris
            .map(|u| {
                let mut s = svc.clone();
                let req = http::Request::get(u).body(()).unwrap_or_default();
                async move { s.call(req).await }
            })
            .collect();
        for r in futures::future::join_all(calls).await {
            assert!(r.is_ok());
        }
    }

    #[tokio::test]
    async fn no_more_than_the_limit_of_requests_wait_for_an_answer_at_once() {
        let inner = slow();
        let svc = InFlightLayer::new(3).layer(inner.clone());
        send_all(
            &svc,
            (0..20).map(|i| format!("/apis/apps/v1/namespaces/a/deployments/d{i}")),
        )
        .await;
        assert_eq!(inner.most.load(Ordering::SeqCst), 3);
        assert_eq!(inner.now.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn watches_and_lease_requests_never_wait_for_a_permit() {
        let inner = slow();
        let svc = InFlightLayer::new(1).layer(inner.clone());
        let mut uris: Vec<String> = (0..5)
            .map(|i| format!("/api/v1/namespaces/n{i}/pods?watch=true&resourceVersion=1"))
            .collect();
        uris.push("/apis/coordination.k8s.io/v1/namespaces/rc/leases/recording-canary".into());
        send_all(&svc, uris.into_iter()).await;
        assert_eq!(inner.most.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn only_watches_and_leases_are_exempt() {
        assert!(exempt("/api/v1/pods", Some("watch=true&labelSelector=a")));
        assert!(exempt("/api/v1/pods", Some("labelSelector=a&watch=1")));
        assert!(exempt(
            "/apis/coordination.k8s.io/v1/namespaces/x/leases/l",
            None
        ));
        assert!(!exempt("/api/v1/pods", Some("labelSelector=watch%3Dtrue")));
        assert!(!exempt("/api/v1/pods", Some("allowWatchBookmarks=true")));
        assert!(!exempt("/apis/apps/v1/deployments", None));
    }
}
