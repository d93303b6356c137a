//! The routers: how a canary's share of the traffic reaches its clone. The planner's progress,
//! safety and rollback stages talk to the router in force; the rest (the clone, its size, ramps,
//! modes, the report) is shared.
//!
//! - [`istio`]: DestinationRule subsets and VirtualService weights (Istio's sidecar mode).

pub(super) mod istio;

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
}

use super::block::Checked;
use super::{Action, Builder};
use crate::istio::ServiceHost;

/// Step 1 of progress: the backends (the subsets) in place; when they will have propagated.
pub(super) fn backends(b: &mut Builder, k: &Checked) -> Propagation {
    match &k.routing {
        Routing::Istio(i) => istio::subsets(b, k, i),
    }
}

/// Step 2: the routes read back.
pub(super) fn read<'a>(b: &mut Builder, k: &Checked<'a>) -> Routes<'a> {
    match &k.routing {
        Routing::Istio(i) => istio::read_routes(b, k, i),
    }
}

/// Step 4: the weights written (the routes split at the shape's percent).
pub(super) fn write(b: &mut Builder, k: &Checked, routes: &Routes, shape: &crate::istio::Shape) {
    match &k.routing {
        Routing::Istio(i) => istio::write_weights(b, k, i, routes, shape),
    }
}

/// Safety: the recording weight drained to 0 in every route this canary split; how many routes.
pub(super) fn drain(b: &mut Builder) -> usize {
    istio::drain(b)
}

/// Rollback, step 1: the writes that take every route of this canary's split back to the stable
/// pods.
pub(super) fn restore(b: &Builder, host: &ServiceHost) -> Vec<Action> {
    istio::restore_routes(b, host)
}

/// Rollback, step 2: whether the mesh reports the restored routes distributed.
pub(super) fn restored_and_reported(b: &Builder, host: &ServiceHost) -> bool {
    istio::routes_reconciled(b, host)
}

/// Rollback, step 3: the backends (the subsets) out.
pub(super) fn remove_backends(b: &mut Builder) {
    istio::remove_subsets(b)
}
