//! The caches and the index of one watched scope (a namespace, or the whole cluster).

use super::*;

/// The caches and index of one watched scope (a namespace, or the whole cluster).
pub struct Scope {
    pub namespace: Option<String>,
    pub(super) canaries: Store<RecordingCanary>,
    pub(super) virtual_services: Selective<MeshObject>,
    pub(super) destination_rules: Selective<MeshObject>,
    /// HTTPRoutes (the Gateway API router), kept as VirtualServices are.
    pub(super) http_routes: Selective<MeshObject>,
    pub(super) grpc_routes: Selective<MeshObject>,
    pub(super) deployments: Selective<DeploymentFacts>,
    pub(super) services: Selective<ServiceFacts>,
    pub(super) pods: Selective<PodFacts>,
    /// The EndpointSlices of the canaries' Services: which pods the mesh routes to.
    pub(super) endpoint_slices: Selective<EndpointSliceFacts>,
    pub(super) index: RwLock<Index>,
    /// Triggers from events seen in other scopes (a VirtualService elsewhere naming a host here).
    pub(super) triggers: mpsc::UnboundedSender<ObjectRef<RecordingCanary>>,
    /// Set once the canaries, and so the index, are listed. (kube's `Store::wait_until_ready`
    /// wakes only one of several waiters.)
    pub(super) canaries_listed: tokio::sync::watch::Sender<bool>,
    /// Counts down the routing watches (VirtualServices, DestinationRules, and HTTPRoutes where
    /// the Gateway API is served) that have not listed yet (0: ready).
    pub(super) mesh_listed: Countdown,
}

/// Ready once `n` parts have reported.
pub(super) struct Countdown {
    pub(super) left: tokio::sync::watch::Sender<u8>,
}

impl Countdown {
    pub(super) fn new(n: u8) -> Self {
        Self {
            left: tokio::sync::watch::channel(n).0,
        }
    }

    pub(super) fn done(&self) {
        self.left.send_modify(|l| *l = l.saturating_sub(1));
    }

    pub(super) fn is_ready(&self) -> bool {
        *self.left.borrow() == 0
    }

    pub(super) async fn wait_until_ready(&self) {
        let _ = self.left.subscribe().wait_for(|l| *l == 0).await;
    }
}

impl Scope {
    /// Empty caches and index for `namespace` (None: the whole cluster).
    pub(super) fn new(
        namespace: Option<String>,
        canaries: Store<RecordingCanary>,
        triggers: mpsc::UnboundedSender<ObjectRef<RecordingCanary>>,
        mesh_watches: u8,
    ) -> Self {
        Self {
            namespace,
            canaries,
            virtual_services: Selective::default(),
            destination_rules: Selective::default(),
            http_routes: Selective::default(),
            grpc_routes: Selective::default(),
            deployments: Selective::default(),
            services: Selective::default(),
            pods: Selective::default(),
            endpoint_slices: Selective::default(),
            index: RwLock::new(Index::default()),
            triggers,
            canaries_listed: tokio::sync::watch::channel(false).0,
            mesh_listed: Countdown::new(mesh_watches),
        }
    }

    pub(super) fn covers(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }

    pub(super) fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn mesh_store(&self, kind: MeshKind) -> &Selective<MeshObject> {
        match kind {
            MeshKind::VirtualService => &self.virtual_services,
            MeshKind::DestinationRule => &self.destination_rules,
            MeshKind::HttpRoute => &self.http_routes,
            MeshKind::GrpcRoute => &self.grpc_routes,
        }
    }

    /// Whether every cache has listed once.
    pub(super) fn ready(&self) -> bool {
        self.mesh_listed.is_ready()
            && self.deployments.is_ready()
            && self.services.is_ready()
            && self.pods.is_ready()
            && self.endpoint_slices.is_ready()
    }

    pub(super) async fn wait_until_ready(&self) {
        self.mesh_listed.wait_until_ready().await;
        self.deployments.wait_until_ready().await;
        self.services.wait_until_ready().await;
        self.pods.wait_until_ready().await;
        self.endpoint_slices.wait_until_ready().await;
    }

    /// Drops what the caches kept for canary `ns/…` only, now that it is gone (`gone`: what the
    /// index knew of it). Only its namespace is looked at, and of its pods only those that were
    /// its own: a scan of every cache per deleted canary made a rollback of 10,000 canaries
    /// CPU-bound (tens of milliseconds each).
    pub(super) fn evict(&self, ns: &str, gone: &Entry) {
        let idx = self.index();
        self.deployments
            .retain_in(ns, |d| idx.wants_deployment(&d.metadata));
        self.services.retain_in(ns, |s| {
            s.metadata.name.as_deref().is_none_or(|n| n != gone.service)
                || !idx.for_service(ns, &gone.service).is_empty()
        });
        self.endpoint_slices.retain_in(ns, |s| {
            s.service != gone.service || !idx.for_service(ns, &gone.service).is_empty()
        });
        self.pods.retain_in(ns, |p| {
            let was_its = deployment_of_pod(&p.metadata)
                .is_some_and(|d| d == gone.target || d == gone.clone)
                || p.metadata.labels.as_ref().is_some_and(|l| gone.selects(l));
            !was_its || !idx.for_pod(&p.metadata).is_empty()
        });
    }
}
