//! The routers: how a canary's share of the traffic reaches its clone. The planner's progress,
//! safety and rollback stages talk to the router in force; the rest (the clone, its size, ramps,
//! modes, the report) is shared.
//!
//! - [`istio`]: DestinationRule subsets and VirtualService weights (Istio's sidecar mode);
//! - [`gateway`]: two Services of the canary's and HTTPRoute weights (the Gateway API: Istio's
//!   ambient mode, GAMMA meshes);
//! - [`replicas`]: no mesh; the clone's share of the Service's Ready endpoints.

pub(super) mod gateway;
pub(super) mod istio;
pub(super) mod replicas;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// When the backends (subsets, Services) will have reached the proxies.
pub(super) struct Propagation {
    /// `propagationDelay` after they were added: the fallback, and the upper bound.
    pub until: Timestamp,
    /// Istio reports the DestinationRule, with the subsets in it, `Reconciled` for its current
    /// generation: they reached every proxy, whatever the delay says.
    pub reconciled: bool,
    /// The backends are not complete yet: what the split waits for (the wait has not started).
    pub pending: Option<Pending>,
    /// The reason and message while the wait runs.
    pub waiting: (&'static str, String),
    /// A backend the routes send to is gone (someone deleted one of the canary's Services): the
    /// routes must go back to the Service at once, before anything else.
    pub lost: Option<String>,
}

/// What the backends still lack before their propagation wait can start.
pub(super) struct Pending {
    pub reason: &'static str,
    pub message: String,
}

/// The routes as they are: split or not, at which percent.
pub(super) struct Routes<'a> {
    /// The main route object (the VirtualService the canary splits; the first HTTPRoute that is
    /// not split, else the first), if there is one yet.
    pub object: Option<&'a Value>,
    pub is_split: bool,
    pub current: i32,
    /// The kind of `object`.
    pub kind: crate::api::MeshKind,
}

/// The router of a canary whose checks passed, with what its checks established.
pub(super) enum Routing<'a> {
    Istio(istio::IstioSubsets<'a>),
    Gateway(gateway::GatewayRoutes<'a>),
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
    if let Some(st) = o.canary.status.as_ref() {
        let istio = st.destination_rule.is_some() || !st.virtual_services.is_empty();
        let wrote = istio
            || !st.http_routes.is_empty()
            || !st.backend_services.is_empty()
            || st.clone_replicas > 0
            || st.current_percent > 0;
        match st.router {
            Some(r) if wrote => return r,
            // Written by a controller from before routers: Istio's.
            None if istio => return Router::Istio,
            _ => {}
        }
    }
    match o.canary.spec.router {
        RouterChoice::Istio => Router::Istio,
        RouterChoice::GatewayApi => Router::GatewayApi,
        RouterChoice::Replicas => Router::Replicas,
        RouterChoice::Auto if o.ambient || has_gamma_route(o) => Router::GatewayApi,
        RouterChoice::Auto => Router::Istio,
    }
}

/// Whether an HTTPRoute has the Service as a parent (GAMMA), or one of the listed Gateways with a
/// backendRef to it; a route of another Gateway that sends to the Service (ingress) does not make
/// it the Gateway API's.
fn has_gamma_route(o: &super::Observed) -> bool {
    let t = gateway::target(o);
    o.http_routes
        .iter()
        .any(|r| crate::gateway::concerns(r, &t))
}

fn empty() -> &'static std::collections::BTreeSet<String> {
    static EMPTY: std::sync::OnceLock<std::collections::BTreeSet<String>> =
        std::sync::OnceLock::new();
    EMPTY.get_or_init(Default::default)
}

/// The router a plan works with: as [`chosen`], once the canary has passed its checks.
fn in_force(b: &Builder) -> Router {
    b.status.router.unwrap_or(Router::Istio)
}

/// The Ready endpoints that the routes of the router in force send the clone's share to: the
/// recording Service's (Gateway API), else the Service's.
pub(super) fn clone_endpoints<'a>(
    o: &'a super::Observed,
) -> &'a std::collections::BTreeSet<String> {
    match chosen(o) {
        // No recording Service (deleted under the canary): no endpoint the routes can reach.
        Router::GatewayApi => o.backend_services[1].map_or(empty(), |s| &s.endpoints),
        Router::Istio | Router::Replicas => o.endpoints,
    }
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
        Routing::Gateway(g) => gateway::services(b, k, g),
        Routing::Replicas => Propagation {
            until: b.o.now,
            reconciled: true,
            pending: None,
            waiting: ("", String::new()),
            lost: None,
        },
    }
}

/// Step 2: the routes read back.
pub(super) fn read<'a>(b: &mut Builder, k: &Checked<'a>) -> Routes<'a> {
    match &k.routing {
        Routing::Istio(i) => istio::read_routes(b, k, i),
        Routing::Gateway(g) => gateway::read_routes(b, k, g),
        Routing::Replicas => Routes {
            object: None,
            is_split: true,
            current: b.prev.current_percent,
            kind: crate::api::MeshKind::VirtualService,
        },
    }
}

/// Step 4: the weights written (the routes split at the shape's percent).
pub(super) fn write(b: &mut Builder, k: &Checked, routes: &Routes, shape: &super::Shaped) {
    match &k.routing {
        Routing::Istio(i) => istio::write_weights(b, k, i, routes, shape),
        Routing::Gateway(g) => gateway::write_weights(b, k, g, routes, shape),
        Routing::Replicas => {}
    }
}

/// Safety: the recording weight drained to 0 in every route this canary split; how many routes.
pub(super) fn drain(b: &mut Builder) -> usize {
    match in_force(b) {
        Router::Istio => istio::drain(b),
        Router::GatewayApi => gateway::drain(b),
        // A sick clone pod is not a Ready endpoint: the Service sends it nothing.
        Router::Replicas => 0,
    }
}

/// Rollback, step 1: the writes that take every route of this canary's split back to the stable
/// pods.
pub(super) fn restore(b: &Builder, host: &ServiceHost) -> Vec<Action> {
    match in_force(b) {
        Router::Istio => istio::restore_routes(b, host),
        Router::GatewayApi => gateway::restore_routes(b),
        Router::Replicas => Vec::new(),
    }
}

/// Rollback, step 2: whether the mesh reports the restored routes distributed.
pub(super) fn restored_and_reported(b: &Builder, host: &ServiceHost) -> bool {
    match in_force(b) {
        Router::Istio => istio::routes_reconciled(b, host),
        Router::GatewayApi => gateway::routes_accepted(b),
        // Nothing to wait for: no route was written.
        Router::Replicas => true,
    }
}

/// Rollback, step 3: the backends (the subsets) out.
pub(super) fn remove_backends(b: &mut Builder) {
    match in_force(b) {
        Router::Istio => istio::remove_subsets(b),
        Router::GatewayApi => gateway::remove_services(b),
        Router::Replicas => {}
    }
}
