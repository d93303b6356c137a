//! The `recording-canary` binary: `run` (the controller) and `crd` (prints the CRD YAML).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand, ValueEnum};
use recording_canary::controller::{self, Context};
use recording_canary::runtime::admin::{self, Health};
use recording_canary::runtime::admission;
use recording_canary::runtime::lease::{Elector, Fence, LeaseConfig, PartitionGate};
use recording_canary::runtime::metrics::Metrics;
use recording_canary::runtime::shard::{Partition, Shard};
use tokio::sync::watch;
use tokio::task::JoinError;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "recording-canary",
    version,
    about = "Record production traffic from an Istio-routed canary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the RecordingCanary CRD as YAML.
    Crd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespace to watch (repeatable). Default: all namespaces.
    #[arg(long = "namespace", env = "RC_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Take part in leader election; only the leader reconciles.
    #[arg(long, env = "RC_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "RC_LEASE_NAME", default_value = "recording-canary")]
    lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "RC_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "RC_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The cluster's DNS domain, for Service host names.
    #[arg(long, env = "RC_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// At most this many canaries reconciled at once, and at most this many API requests
    /// waiting for their answer at once (watches and the Lease apart; each is one HTTP/1.1
    /// connection to the apiserver); the others wait their turn.
    #[arg(long, env = "RC_MAX_CONCURRENT_RECONCILES", default_value_t = recording_canary::controller::DEFAULT_MAX_RECONCILES, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
    /// Split the canaries between this many shards (by a stable hash of the namespace); each
    /// process leads one shard, through the Lease `<lease-name>-shard-<i>-of-<N>`. Needs leader
    /// election. Processes of another count lead only once this count's Leases are free or
    /// expired, through the record `<lease-name>-partition`.
    #[arg(long, env = "RC_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    shards: u32,
    /// The generation of this deployment's partition, raised with every change of `--shards`
    /// (the chart passes its release revision): once the partition record has a newer one, a
    /// process of another shard count never takes the partition back.
    #[arg(long, env = "RC_PARTITION_GENERATION", default_value_t = 0)]
    partition_generation: u64,
    /// Name of the MutatingAdmissionPolicy (and its binding) that labels the target's new pods at
    /// admission, as the chart installs it. While both exist, the canaries' status says
    /// `stableLabelling: AdmissionPolicy`; without it, `Controller`.
    #[arg(long, env = "RC_STABLE_LABEL_POLICY")]
    stable_label_policy: Option<String>,
}

fn main() -> ExitCode {
    // Failpoints from FAILPOINTS (only in a build with the `failpoints` feature: the fault tests').
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match recording_canary::api::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("recording-canary: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            init_tracing(args.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("recording-canary: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => b.init(),
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let client = recording_canary::runtime::client::counted(
        metrics.clone(),
        usize::from(args.max_concurrent_reconciles),
    )
    .await
    .map_err(|e| format!("cannot reach Kubernetes (KUBECONFIG or in-cluster config): {e}"))?;
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let admin_task = serve_admin(args.admin_addr, &metrics, &health, stopped()).await?;
    tokio::spawn(recording_canary::runtime::memory::trim_every(
        recording_canary::runtime::memory::PERIOD,
    ));
    stop_on_signal(stop_tx.clone());
    let identity = identity();
    health.ready.store(true, Ordering::Relaxed);

    let (fence, mut gate, mut electors) = leadership(&args, &client, &identity)?;
    let partition = Partition {
        shards: args.shards,
        generation: args.partition_generation,
    };
    let mut shard = Shard {
        index: 0,
        count: args.shards,
    };
    let mut elector = None;
    if let Some(gate) = gate.as_mut().filter(|_| electors.len() > 1) {
        // Which shard this process serves is known only once it leads one.
        info!(lease = %args.lease_name, namespace = %args.lease_namespace, shards = args.shards, generation = partition.generation, %identity, "waiting to lead a shard");
        let Some(i) = until_stopped(lead_one(gate, &mut electors), stopped()).await else {
            let _ = admin_task.await;
            return Ok(());
        };
        shard.index = i as u32;
        elector = Some(electors.swap_remove(i));
        info!(
            shard = shard.index,
            of = shard.count,
            generation = partition.generation,
            "leading"
        );
    }

    let ctx = context(
        &args,
        &client,
        &metrics,
        &identity,
        shard,
        &fence,
        stopped(),
    )
    .await;
    // The watches start now, also on a standby: its caches are warm when it takes over, and
    // its reconciles wait on the fence until then.
    let mut controllers = tokio::spawn(futures::future::join_all(
        scopes(&args).map(|ns| controller::run(ctx.clone(), ns, stopped())),
    ));

    let elector = match (elector, gate.as_mut()) {
        (Some(e), _) => Some(e),
        (None, Some(gate)) if !electors.is_empty() => {
            info!(lease = %args.lease_name, namespace = %args.lease_namespace, shards = args.shards, generation = partition.generation, %identity, "waiting to lead (the watch caches fill meanwhile)");
            tokio::select! {
                _ = lead_one(gate, &mut electors[..1]) => {}
                r = &mut controllers => {
                    let why = controllers_failed(r, *stop_tx.borrow());
                    let _ = stop_tx.send(true);
                    let _ = admin_task.await;
                    return why.map_or(Ok(()), Err);
                }
            }
            info!(generation = partition.generation, "leading");
            Some(electors.swap_remove(0))
        }
        _ => None,
    };
    metrics.is_leader.set(1);
    metrics.shard.set(i64::from(shard.index));
    let result = hold(elector, &mut controllers, &metrics, &stop_tx).await;
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    result?;
    info!("stopped");
    Ok(())
}

/// The controller's shared context: what the cluster serves (HTTPRoutes, GRPCRoutes) and this
/// process may read, with the tasks that keep it current (the namespaces' ambient labels, the
/// stable-label policy's presence) running until `stopped`.
async fn context(
    args: &RunArgs,
    client: &kube::Client,
    metrics: &Arc<Metrics>,
    identity: &str,
    shard: Shard,
    fence: &Fence,
    stopped: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Arc<Context> {
    use recording_canary::runtime::client::{gateway_api_served, route_kind_served};
    let scope = args.namespaces.first().map(String::as_str);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            metrics.clone(),
            &args.cluster_domain,
            Some(identity.to_string()),
        )
        .with_shard(shard)
        .with_fence(fence.clone())
        .with_max_reconciles(usize::from(args.max_concurrent_reconciles))
        .with_gateway_api(gateway_api_served(client, scope).await)
        .with_grpc_routes(
            route_kind_served(client, scope, recording_canary::api::MeshKind::GrpcRoute).await,
        ),
    );
    if controller::namespaces::may_watch(client, &args.namespaces).await {
        tokio::spawn(controller::namespaces::watch(
            ctx.clone(),
            args.namespaces.clone(),
        ));
    }
    if let Some(policy) = args.stable_label_policy.clone() {
        // Known before the first status is written; then checked again now and then.
        ctx.set_stable_labelling(admission::check(client, &policy).await);
        tokio::spawn(keep_checking_the_stable_label_policy(
            ctx.clone(),
            policy,
            stopped,
        ));
    }
    ctx
}

/// Leads until the controllers end or the lease is lost (with an elector; without one, until the
/// controllers end). The lease is released on a clean end; on a loss every reconcile is stopped
/// at once (the fence is closed already). `Err`: why the process must exit non-zero.
async fn hold(
    elector: Option<Elector>,
    controllers: &mut tokio::task::JoinHandle<Vec<()>>,
    metrics: &Metrics,
    stop_tx: &watch::Sender<bool>,
) -> Result<(), String> {
    let mut lost: Option<String> = None;
    let ended = match elector {
        Some(mut e) => {
            let ended = tokio::select! {
                r = &mut *controllers => Some(r),
                _ = e.hold() => {
                    lost = Some(match e.partition_refused() {
                        Some(why) => format!("{why}; exiting so that only one partition acts"),
                        None => "lost the lease; exiting so that only one controller acts".into(),
                    });
                    None
                }
            };
            if lost.is_some() {
                controllers.abort();
                metrics.is_leader.set(0);
            } else {
                e.release().await;
            }
            ended
        }
        None => Some((&mut *controllers).await),
    };
    let failed = ended.and_then(|r| controllers_failed(r, *stop_tx.borrow()));
    match lost.or(failed) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Binds the admin server (/metrics, /healthz, /readyz) and serves it until `stopped`.
async fn serve_admin(
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, String> {
    let listener = admin::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    info!(%addr, "admin server listening (/metrics, /healthz, /readyz)");
    Ok(tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stopped,
    )))
}

/// Who this process is in the Leases: its pod's name and its process id.
fn identity() -> String {
    let name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "recording-canary".into());
    format!("{name}-{}", std::process::id())
}

/// The write fence, the partition gate and one elector per shard's Lease; without leader
/// election, a fence that is always open and neither gate nor electors.
fn leadership(
    args: &RunArgs,
    client: &kube::Client,
    identity: &str,
) -> Result<(Fence, Option<PartitionGate>, Vec<Elector>), String> {
    if args.shards > 1 && !args.leader_elect {
        return Err(format!(
            "--shards {} needs leader election (--leader-elect=true): each process leads one shard through its Lease",
            args.shards
        ));
    }
    if !args.leader_elect {
        return Ok((Fence::always(), None, Vec::new()));
    }
    let fence = Fence::elected();
    let partition = Partition {
        shards: args.shards,
        generation: args.partition_generation,
    };
    let gate = PartitionGate::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        partition,
    );
    let electors = electors(args, client, identity, &fence, &gate);
    Ok((fence, Some(gate), electors))
}

/// The watched scopes: each `--namespace`, or the whole cluster.
fn scopes(args: &RunArgs) -> impl Iterator<Item = Option<String>> + '_ {
    let all = args.namespaces.is_empty().then_some(None);
    all.into_iter()
        .chain(args.namespaces.iter().map(|n| Some(n.clone())))
}

/// `f`'s output, or `None` if `stopped` resolves first.
async fn until_stopped<T>(
    f: impl std::future::Future<Output = T>,
    stopped: impl std::future::Future<Output = ()>,
) -> Option<T> {
    tokio::select! {
        t = f => Some(t),
        _ = stopped => None,
    }
}

/// One elector per shard's Lease, sharing the write fence and the partition's check.
fn electors(
    args: &RunArgs,
    client: &kube::Client,
    identity: &str,
    fence: &Fence,
    gate: &PartitionGate,
) -> Vec<Elector> {
    (0..args.shards)
        .map(|i| {
            let lease = Shard::lease_name(&args.lease_name, i, args.shards);
            Elector::new(
                client.clone(),
                LeaseConfig::new(&lease, &args.lease_namespace, identity),
            )
            .with_fence(fence.clone())
            .with_check(gate.check())
        })
        .collect()
}

/// Checks now and then whether the chart's stable-label policy is in force, until `stop`.
async fn keep_checking_the_stable_label_policy(
    ctx: Arc<Context>,
    policy: String,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(admission::RECHECK) => {}
        }
        ctx.set_stable_labelling(admission::check(&ctx.client, &policy).await);
    }
}

/// Why the controllers' task ended early, if it did: a panic, or an end without a shutdown
/// having been requested. Either way the canaries of this process are no longer reconciled, so
/// the process must exit non-zero (and be restarted, or a standby take over), never report a
/// clean stop.
fn controllers_failed<T>(ended: Result<T, JoinError>, shutdown_requested: bool) -> Option<String> {
    match ended {
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            Some(format!("a controller panicked: {what}; exiting"))
        }
        Err(e) => Some(format!("the controllers stopped: {e}; exiting")),
        Ok(_) if !shutdown_requested => {
            Some("the controllers stopped although no shutdown was requested; exiting".into())
        }
        Ok(_) => None,
    }
}

/// Waits until the partition record admits this process's partition and it then leads one of
/// the shards' Leases (the first free one); returns its index.
async fn lead_one(gate: &mut PartitionGate, electors: &mut [Elector]) -> usize {
    let retry = electors
        .first()
        .map(|e| e.retry_every())
        .unwrap_or(std::time::Duration::from_secs(2));
    loop {
        match gate.step().await {
            Ok(true) => {
                for (i, e) in electors.iter_mut().enumerate() {
                    match e.attempt().await {
                        Ok(true) => return i,
                        Ok(false) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, lease = %e.lease_name(), "lease: could not read or take a lease")
                        }
                    }
                }
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, "partition: could not read or write the partition record or the Leases it names")
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// SIGTERM or Ctrl-C: stop gracefully.
fn stop_on_signal(stop_tx: watch::Sender<bool>) {
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn controllers_that_panic_or_end_unasked_make_the_process_fail() {
        let panicked = tokio::spawn(async { panic!("boom in a reconcile") }).await;
        let why = controllers_failed::<()>(panicked, true);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("panicked: boom in a reconcile")),
            "{why:?}"
        );
        let ended = tokio::spawn(async {}).await;
        assert!(
            controllers_failed(ended, false).is_some(),
            "an end without a shutdown is a failure"
        );
        let stopped = tokio::spawn(async {}).await;
        assert_eq!(
            controllers_failed(stopped, true),
            None,
            "a requested shutdown is clean"
        );
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        assert!(controllers_failed(task.await, true).is_some());
    }
}
