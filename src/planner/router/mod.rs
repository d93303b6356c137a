//! The routers: how a canary's share of the traffic reaches its clone. The planner's progress,
//! safety and rollback stages talk to the router in force; the rest (the clone, its size, ramps,
//! modes, the report) is shared.
//!
//! - [`istio`]: DestinationRule subsets and VirtualService weights (Istio's sidecar mode);
//! - [`replicas`]: no mesh; the clone's share of the Service's Ready endpoints.

pub(super) mod istio;
pub(super) mod replicas;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// When the subsets in the DestinationRule will have reached the sidecars.
pub(super) struct Propagation {
    /// `propagationDelay` after they were added: the fallback, and the upper bound.
    pub until: Timestamp,
    /// Istio reports the DestinationRule, with the subsets in it, `Reconciled` for its current
    /// generation: they reached every proxy, whatever the delay says.
    pub reconciled: bool,
}

/// The VirtualService as it is: split or not, at which percent.
pub(super) struct Routes<'a> {
    /// The main route object (the VirtualService the canary splits), if there is one yet.
    pub object: Option<&'a Value>,
    pub is_split: bool,
    pub current: i32,
}

/// The router of a canary whose checks passed, with what its checks established.
pub(super) enum Routing<'a> {
    Istio(istio::IstioSubsets<'a>),
    /// No routes: the clone's share of the Service's endpoints.
    Replicas,
}

/// The router in force: the one the status names (it never changes on a running canary), else
/// the one the spec asks for; `Auto` picks the Gateway API when an HTTPRoute already has the
/// Service as a parent or the namespace is in Istio's ambient mode, else Istio.
pub(super) fn chosen(o: &super::Observed) -> Router {
    // Pinned once the canary has written a backend or a route (or sized a clone): a running
    // canary's routes are drained and restored by the router that wrote them. A canary blocked
    // from the start chooses again, as its objects appear.
    if let Some(st) = o.canary.status.as_ref()
        && let Some(r) = st.router
        && (st.destination_rule.is_some()
            || !st.virtual_services.is_empty()
            || st.clone_replicas > 0
            || st.current_percent > 0)
    {
        return r;
    }
    match o.canary.spec.router {
        RouterChoice::Istio => Router::Istio,
        RouterChoice::GatewayApi => Router::GatewayApi,
        RouterChoice::Replicas => Router::Replicas,
        RouterChoice::Auto if o.ambient || !o.http_routes.is_empty() => Router::GatewayApi,
        RouterChoice::Auto => Router::Istio,
    }
}

/// The router a plan works with: as [`chosen`], once the canary has passed its checks.
fn in_force(b: &Builder) -> Router {
    b.status.router.unwrap_or(Router::Istio)
}

use super::block::Checked;
use super::{Action, Builder};
use crate::api::RouterChoice;
use crate::api::status::Router;
use crate::istio::ServiceHost;

/// Step 1 of progress: the backends (the subsets) in place; when they will have propagated.
pub(super) fn backends(b: &mut Builder, k: &Checked) -> Propagation {
    match &k.routing {
        Routing::Istio(i) => istio::subsets(b, k, i),
        Routing::Replicas => Propagation {
            until: b.o.now,
            reconciled: true,
        },
    }
}

/// Step 2: the routes read back.
pub(super) fn read<'a>(b: &mut Builder, k: &Checked<'a>) -> Routes<'a> {
    match &k.routing {
        Routing::Istio(i) => istio::read_routes(b, k, i),
        Routing::Replicas => Routes {
            object: None,
            is_split: true,
            current: b.prev.current_percent,
        },
    }
}

/// Step 4: the weights written (the routes split at the shape's percent).
pub(super) fn write(b: &mut Builder, k: &Checked, routes: &Routes, shape: &crate::istio::Shape) {
    match &k.routing {
        Routing::Istio(i) => istio::write_weights(b, k, i, routes, shape),
        Routing::Replicas => {}
    }
}

/// Safety: the recording weight drained to 0 in every route this canary split; how many routes.
pub(super) fn drain(b: &mut Builder) -> usize {
    match in_force(b) {
        Router::Istio => istio::drain(b),
        // A sick clone pod is not a Ready endpoint: the Service sends it nothing.
        Router::Replicas | Router::GatewayApi => 0,
    }
}

/// Rollback, step 1: the writes that take every route of this canary's split back to the stable
/// pods.
pub(super) fn restore(b: &Builder, host: &ServiceHost) -> Vec<Action> {
    match in_force(b) {
        Router::Istio => istio::restore_routes(b, host),
        Router::Replicas | Router::GatewayApi => Vec::new(),
    }
}

/// Rollback, step 2: whether the mesh reports the restored routes distributed.
pub(super) fn restored_and_reported(b: &Builder, host: &ServiceHost) -> bool {
    match in_force(b) {
        Router::Istio => istio::routes_reconciled(b, host),
        // Nothing to wait for: no route was written.
        Router::Replicas | Router::GatewayApi => true,
    }
}

/// Rollback, step 3: the backends (the subsets) out.
pub(super) fn remove_backends(b: &mut Builder) {
    match in_force(b) {
        Router::Istio => istio::remove_subsets(b),
        Router::Replicas | Router::GatewayApi => {}
    }
}
