//! The `recording-canary` binary: `run` (the controller) and `crd` (prints the CRD YAML).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand, ValueEnum};
use recording_canary::admin::{self, Health};
use recording_canary::admission;
use recording_canary::controller::{self, Context};
use recording_canary::lease::{Elector, Fence, LeaseConfig};
use recording_canary::metrics::Metrics;
use recording_canary::shard::Shard;
use tokio::sync::watch;
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
    /// process leads one shard, through the Lease `<lease-name>-shard-<i>`. Needs leader election.
    #[arg(long, env = "RC_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    shards: u32,
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
    let client = recording_canary::client::counted(
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

    let listener = admin::bind(args.admin_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.admin_addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    info!(%addr, "admin server listening (/metrics, /healthz, /readyz)");
    let admin_task = tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stopped(),
    ));

    tokio::spawn(recording_canary::memory::trim_every(
        recording_canary::memory::PERIOD,
    ));

    // SIGTERM or Ctrl-C: stop gracefully.
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = signal_tx.send(true);
    });

    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "recording-canary".into());
    let identity = format!("{identity}-{}", std::process::id());
    health.ready.store(true, Ordering::Relaxed);

    if args.shards > 1 && !args.leader_elect {
        return Err(format!(
            "--shards {} needs leader election (--leader-elect=true): each process leads one shard through its Lease",
            args.shards
        ));
    }
    let fence = if args.leader_elect {
        Fence::elected()
    } else {
        Fence::always()
    };
    let mut electors: Vec<Elector> = if args.leader_elect {
        (0..args.shards)
            .map(|i| {
                let lease = Shard::lease_name(&args.lease_name, i, args.shards);
                Elector::new(
                    client.clone(),
                    LeaseConfig::new(&lease, &args.lease_namespace, &identity),
                )
                .with_fence(fence.clone())
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut shard = Shard {
        index: 0,
        count: args.shards,
    };
    let mut elector = None;
    if electors.len() > 1 {
        // Which shard this process serves is known only once it leads one.
        info!(lease = %args.lease_name, namespace = %args.lease_namespace, shards = args.shards, %identity, "waiting to lead a shard");
        tokio::select! {
            i = lead_one(&mut electors) => {
                shard.index = i as u32;
                elector = Some(electors.swap_remove(i));
            }
            _ = stopped() => { let _ = admin_task.await; return Ok(()); }
        }
        info!(shard = shard.index, of = shard.count, "leading");
    }

    let ctx = Arc::new(
        Context::new(
            client.clone(),
            metrics.clone(),
            &args.cluster_domain,
            Some(identity.clone()),
        )
        .with_shard(shard)
        .with_fence(fence.clone())
        .with_max_reconciles(usize::from(args.max_concurrent_reconciles)),
    );
    if let Some(policy) = args.stable_label_policy.clone() {
        // Known before the first status is written; then checked again now and then.
        ctx.set_stable_labelling(admission::check(&client, &policy).await);
        let (ctx, stop) = (ctx.clone(), stopped());
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(admission::RECHECK) => {}
                }
                ctx.set_stable_labelling(admission::check(&ctx.client, &policy).await);
            }
        });
    }
    let scopes: Vec<Option<String>> = if args.namespaces.is_empty() {
        vec![None]
    } else {
        args.namespaces.iter().map(|n| Some(n.clone())).collect()
    };
    // The watches start now, also on a standby: its caches are warm when it takes over, and
    // its reconciles wait on the fence until then.
    let mut controllers = tokio::spawn(futures::future::join_all(
        scopes
            .into_iter()
            .map(|ns| controller::run(ctx.clone(), ns, stopped())),
    ));

    let mut lost = false;
    let elector = match elector {
        Some(e) => Some(e),
        None if !electors.is_empty() => {
            let mut e = electors.swap_remove(0);
            info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting to lead (the watch caches fill meanwhile)");
            tokio::select! {
                _ = e.acquire() => {}
                _ = stopped() => {
                    let _ = controllers.await;
                    let _ = admin_task.await;
                    return Ok(());
                }
            }
            info!("leading");
            Some(e)
        }
        None => None,
    };
    metrics.is_leader.set(1);
    metrics.shard.set(i64::from(shard.index));
    match elector {
        Some(mut e) => {
            tokio::select! {
                _ = &mut controllers => {}
                _ = e.hold() => { lost = true; }
            }
            if lost {
                // Stop every reconcile now: the fence is closed already.
                controllers.abort();
                metrics.is_leader.set(0);
            } else {
                e.release().await;
            }
        }
        None => {
            let _ = (&mut controllers).await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    if lost {
        return Err("lost the lease; exiting so that only one controller acts".into());
    }
    info!("stopped");
    Ok(())
}

/// Waits until this process leads one of the shards' Leases (the first free one); returns its index.
async fn lead_one(electors: &mut [Elector]) -> usize {
    let retry = electors
        .first()
        .map(|e| e.retry_every())
        .unwrap_or(std::time::Duration::from_secs(2));
    loop {
        for (i, e) in electors.iter_mut().enumerate() {
            match e.attempt().await {
                Ok(true) => return i,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "lease: could not read or take a lease"),
            }
        }
        tokio::time::sleep(retry).await;
    }
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
