//! The Kubernetes client: kube's default stack, with every request counted by verb and resource
//! in the `recording_canary_api_requests_total` metric.

use std::sync::Arc;

use kube::client::{Body, ClientBuilder};
use kube::{Client, Config};
use tower::util::MapRequestLayer;

use crate::metrics::Metrics;

/// A client from the environment (KUBECONFIG or the in-cluster config) that counts its requests.
pub async fn counted(metrics: Arc<Metrics>) -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    from_config(config, metrics)
}

/// A client for `config` that counts its requests.
pub fn from_config(config: Config, metrics: Arc<Metrics>) -> Result<Client, kube::Error> {
    let count = MapRequestLayer::new(move |req: http::Request<Body>| {
        metrics.request(req.method().as_str(), req.uri().path(), req.uri().query());
        req
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&count).build())
}
