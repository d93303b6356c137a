//! The fault matrix: peers and faults a production controller meets.
//!
//! * A Speedscale-like mutating admission webhook that injects its sidecar into the clone
//!   Deployment: the controller must not fight it (no spec write to the clone once it is in
//!   place).
//! * The controller SIGKILLed right after each distinct write it makes (through setup, a ramp
//!   step, a scale and a new image of the target, and the rollback), and restarted each time:
//!   every phase still converges, make-before-break holds, and the rollback leaves the user's
//!   objects as they were.
//! * A GitOps peer (Argo CD's self-heal, as `kubectl apply` every second) putting back the routes
//!   of an adopted VirtualService: the controller re-applies the split after a doubling delay, so
//!   it writes a bounded number of times, says who reverted it, and wins once the peer stops.
//! * Objects deleted by someone else while a canary runs (the clone, the DestinationRule and
//!   VirtualService it created, the target, the Service): re-created, or reported as Blocked
//!   until they are back.
//! * A canary deleted while no controller runs, and one deleted in the middle of a ramp: rolled
//!   back completely.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::mbb::Kind;
use crate::support::{
    CLONE, ControllerProcess, Harness, OWNED, RECORDING_SUBSET, ROLE_LABEL, SIDECAR_ANNOTATION,
    STABLE_SUBSET, WAIT, controller_args, example, http_destinations, labels, pod_name, pod_of,
    pod_ready, split_weights,
};

// ------------------------------------------------------------------------------------------------
// A Speedscale-like mutating admission webhook, served over TLS from the test process.

const SIDECAR_CONTAINER: &str = "speedscale-goproxy";
const SIDECAR_IMAGE: &str = "gcr.io/speedscale/goproxy:v2";

/// One AdmissionReview the webhook answered.
#[derive(Debug, Clone)]
struct Review {
    at: Instant,
    operation: String,
    name: String,
    injected: bool,
}

/// The reviews as `OPERATION name (+sidecar)`, one per line.
fn list(reviews: &[Review], since: Instant) -> String {
    reviews
        .iter()
        .map(|r| {
            format!(
                "  +{:>6.2}s {} {}{}",
                r.at.saturating_duration_since(since).as_secs_f64(),
                r.operation,
                r.name,
                if r.injected { " (+sidecar)" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The webhook server; stops serving when dropped.
struct Webhook {
    port: u16,
    /// The CA that signed the server's certificate, PEM.
    ca_pem: String,
    reviews: Arc<Mutex<Vec<Review>>>,
    task: JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Webhook {
    fn reviews(&self) -> Vec<Review> {
        self.reviews.lock().expect("webhook reviews").clone()
    }

    /// A CA, a certificate for 127.0.0.1 (IP SAN) signed by it, and an HTTPS server on a free
    /// port of 127.0.0.1 that answers `POST /mutate`.
    async fn start() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "recording-canary e2e webhook CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-signed CA");

        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca).expect("server certificate");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("TLS server config");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook port on 127.0.0.1");
        let port = listener.local_addr().expect("webhook address").port();
        let reviews: Arc<Mutex<Vec<Review>>> = Arc::default();
        let log = reviews.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(mutate(req, &log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            ca_pem: ca.pem(),
            reviews,
            task,
        }
    }
}

/// Whether the Deployment asks for the sidecar (on its own metadata, where the Speedscale
/// operator reads it, or on its pod template).
fn wants_sidecar(d: &Value) -> bool {
    let key = SIDECAR_ANNOTATION.replace('/', "~1");
    [
        "/metadata/annotations",
        "/spec/template/metadata/annotations",
    ]
    .iter()
    .any(|p| d.pointer(&format!("{p}/{key}")).and_then(Value::as_str) == Some("true"))
}

fn container_names(d: &Value) -> Vec<String> {
    d.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Answers one AdmissionReview: adds the sidecar container when asked for and absent.
async fn mutate(req: Request<Incoming>, log: &Mutex<Vec<Review>>) -> Response<Full<Bytes>> {
    let reply = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("webhook response")
    };
    if req.uri().path() != "/mutate" {
        return reply(404, json!({"error": "not found"}));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(400, json!({"error": e.to_string()})),
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return reply(400, json!({"error": "not JSON"}));
    };
    let request = &review["request"];
    let object = &request["object"];
    let inject = wants_sidecar(object)
        && !container_names(object)
            .iter()
            .any(|n| n == SIDECAR_CONTAINER);
    log.lock().expect("webhook reviews").push(Review {
        at: Instant::now(),
        operation: request["operation"].as_str().unwrap_or_default().into(),
        name: request["name"]
            .as_str()
            .or_else(|| object.pointer("/metadata/name").and_then(Value::as_str))
            .unwrap_or_default()
            .into(),
        injected: inject,
    });
    let mut response = json!({"uid": request["uid"], "allowed": true});
    if inject {
        let patch = json!([{
            "op": "add",
            "path": "/spec/template/spec/containers/-",
            "value": {
                "name": SIDECAR_CONTAINER,
                "image": SIDECAR_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "resources": {},
            },
        }]);
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(B64.encode(patch.to_string()));
    }
    reply(
        200,
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }),
    )
}

/// Deletes the MutatingWebhookConfiguration when the test ends, however it ends.
struct WebhookConfigGuard {
    kubectl: String,
    kubeconfig: PathBuf,
    name: String,
}

impl Drop for WebhookConfigGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.name,
                "--ignore-not-found",
            ])
            .output();
    }
}

/// Whether a Deployment asking for the sidecar gets it at admission now (a server-side dry
/// run: admission runs, nothing is stored).
async fn injected_at_admission(h: &Harness) -> Result<(), String> {
    let probe = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "webhook-probe", "annotations": {SIDECAR_ANNOTATION: "true"}},
        "spec": {
            "selector": {"matchLabels": {"app": "webhook-probe"}},
            "template": {
                "metadata": {"labels": {"app": "webhook-probe"}},
                "spec": {"containers": [{"name": "app", "image": "probe"}]},
            },
        },
    });
    let path = h.manifest("webhook-probe", &probe.to_string());
    let out = h
        .k(&[
            "create",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            path.to_str().expect("utf-8 path"),
        ])
        .await;
    let d: Value = serde_json::from_str(&out).expect("dry-run Deployment as JSON");
    let names = container_names(&d);
    if names.iter().any(|n| n == SIDECAR_CONTAINER) {
        Ok(())
    } else {
        Err(format!("containers {names:?}"))
    }
}

/// Every object a watch delivers during `window` (the state at its start first).
async fn observe<K>(api: Api<K>, cfg: watcher::Config, window: Duration) -> Vec<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut seen = Vec::new();
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let _ = tokio::time::timeout(window, async {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o))
                | Ok(watcher::Event::InitApply(o))
                | Ok(watcher::Event::Delete(o)) => seen.push(o),
                Ok(_) => {}
                Err(e) => eprintln!("[e2e] watch error (retrying): {e}"),
            }
        }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_injecting_webhook_on_the_clone_causes_no_write_fight() {
    const WINDOW: Duration = Duration::from_secs(30);
    let mut h = Harness::start_without_controller("webhook").await;
    let ns = h.ns.clone();
    // The fault: a peer that mutates every write of the clone.
    h.faults_injected(1);

    let t0 = Instant::now();
    let webhook = Webhook::start().await;
    let name = format!("{ns}-speedscale-like");
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "recording-canary-e2e"}},
        "webhooks": [{
            "name": "inject.speedscale-like.rc-e2e.dev",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{}/mutate", webhook.port),
                "caBundle": B64.encode(&webhook.ca_pem),
            },
            "rules": [{
                "operations": ["CREATE", "UPDATE"],
                "apiGroups": ["apps"],
                "apiVersions": ["v1"],
                "resources": ["deployments"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    });
    let _guard = WebhookConfigGuard {
        kubectl: h.env.kubectl.clone(),
        kubeconfig: h.env.kubeconfig.clone(),
        name: name.clone(),
    };
    let path = h.manifest("webhook", &config.to_string());
    h.k(&["apply", "-f", path.to_str().expect("utf-8 path")])
        .await;
    h.until(
        "the webhook to inject the sidecar at admission",
        Duration::from_secs(30),
        || injected_at_admission(&h),
    )
    .await;
    eprintln!("[e2e] {ns}: webhook on 127.0.0.1:{} in force", webhook.port);

    // The normal flow, with the webhook in the way.
    let args = [
        "run",
        "--namespace",
        &ns,
        "--leader-elect=false",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let kubeconfig = h.env.kubeconfig.clone();
    let _controller = h.spawn_controller("", &args, &kubeconfig);
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;

    let clone = h.deployment(CLONE).await.expect("the clone");
    let clone_json = serde_json::to_value(&clone).expect("clone as JSON");
    let names = container_names(&clone_json);
    assert!(
        names.iter().any(|n| n == SIDECAR_CONTAINER),
        "the webhook's container is not in the clone: containers {names:?}"
    );
    let target = h.deployment("frontend").await.expect("the target");
    let target_names = container_names(&serde_json::to_value(&target).expect("target as JSON"));
    assert_eq!(
        target_names,
        vec!["server".to_string()],
        "the target must not be injected (it does not ask for the sidecar)"
    );
    let g0 = clone.metadata.generation.expect("clone generation");

    // The observation window: no spec write to the clone, the canary stays Ready at 10%.
    let window_start = Instant::now();
    let clone_cfg = watcher::Config::default().fields(&format!("metadata.name={CLONE}"));
    let canary_cfg = watcher::Config::default().fields("metadata.name=frontend");
    let (clones, canaries) = tokio::join!(
        observe(h.deployments(), clone_cfg, WINDOW),
        observe(h.canary_api(), canary_cfg, WINDOW),
    );
    let generations: Vec<i64> = std::iter::once(g0)
        .chain(clones.iter().map(|d| d.metadata.generation.unwrap_or(0)))
        .collect();
    let changes = generations.windows(2).filter(|w| w[0] != w[1]).count();
    let in_window: Vec<Review> = webhook
        .reviews()
        .into_iter()
        .filter(|r| r.at >= window_start)
        .collect();
    let revisions: Vec<String> = clones
        .iter()
        .map(|d| {
            let v = serde_json::to_value(d).unwrap_or(Value::Null);
            format!(
                "rv {} generation {} replicas {} containers {:?}",
                d.metadata.resource_version.clone().unwrap_or_default(),
                d.metadata.generation.unwrap_or(0),
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                container_names(&v)
            )
        })
        .collect();
    eprintln!(
        "[e2e] {ns}: {WINDOW:?} window: {} clone revisions, generations {generations:?}, \
         {} admission reviews in the window, {} in all",
        clones.len(),
        in_window.len(),
        webhook.reviews().len()
    );
    assert_eq!(
        changes,
        0,
        "the controller and the webhook fight over the clone: its generation changed {changes} \
         times in {WINDOW:?} (generations seen: {generations:?})\nclone revisions:\n{}\n\
         admission reviews in the window:\n{}",
        revisions.join("\n"),
        list(&in_window, window_start)
    );
    // A write that the webhook turns back into the same object bumps no generation and makes
    // no watch event, but it goes through admission: none may reach the clone in the window.
    let clone_reviews: Vec<Review> = in_window
        .iter()
        .filter(|r| r.name == CLONE)
        .cloned()
        .collect();
    assert!(
        clone_reviews.is_empty(),
        "the controller wrote the clone {} times during the {WINDOW:?} window (admission reviews \
         of {CLONE}; a write the webhook undoes leaves the generation as it was):\n{}",
        clone_reviews.len(),
        list(&clone_reviews, window_start)
    );
    let not_ready: Vec<String> = canaries
        .iter()
        .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
        .filter(|c| {
            c["status"]["phase"] != "Ready"
                || c["status"]["currentPercent"] != 10
                || c["metadata"]["deletionTimestamp"].is_string()
        })
        .map(|c| c["status"].to_string())
        .collect();
    assert!(
        !canaries.is_empty() && not_ready.is_empty(),
        "the canary did not stay Ready at 10% during the window ({} revisions): {not_ready:?}",
        canaries.len()
    );
    // Still in force at the end, and the clone still carries the sidecar.
    let clone = h.deployment(CLONE).await.expect("the clone");
    let names = container_names(&serde_json::to_value(&clone).expect("clone as JSON"));
    assert!(
        names.iter().any(|n| n == SIDECAR_CONTAINER),
        "the sidecar went from the clone: containers {names:?}"
    );
    let reviews = webhook.reviews();
    assert!(
        reviews
            .iter()
            .any(|r| r.name == CLONE && r.operation == "CREATE" && r.injected),
        "the webhook never injected into the clone's CREATE:\n{}",
        list(&reviews, t0)
    );
    eprintln!(
        "[e2e] {ns}: {} admission reviews (times from the webhook's start):\n{}",
        reviews.len(),
        list(&reviews, t0)
    );
    h.finish(true).await;
}

// ------------------------------------------------------------------------------------------------
// The controller SIGKILLed after each distinct write, and restarted.

/// One write to the namespace that the controller made, as a watch saw it.
#[derive(Debug)]
struct Write {
    /// What kind of write; a kill is made once per phase and kind.
    kind: String,
    detail: String,
    /// When the watch delivered it.
    at: Instant,
}

/// Decides, from the previous and the new state of one object (`None`: it did not exist), which
/// write this was; `None` when it is not one of the controller's.
type Classify = fn(Option<&Value>, Option<&Value>) -> Option<(String, String)>;

/// Watches `api` and sends every write `classify` recognises; `synced` is set once listed.
fn watch_writes<K>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: UnboundedSender<Write>,
    synced: Arc<AtomicBool>,
    classify: Classify,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + serde::Serialize + 'static,
{
    tokio::spawn(async move {
        let mut state: BTreeMap<String, Value> = BTreeMap::new();
        let mut relisted: Option<BTreeSet<String>> = None;
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        let send = |prev: Option<&Value>, cur: Option<&Value>, listed: bool| {
            if !listed {
                return;
            }
            if let Some((kind, detail)) = classify(prev, cur) {
                let _ = tx.send(Write {
                    kind,
                    detail,
                    at: Instant::now(),
                });
            }
        };
        while let Some(ev) = stream.next().await {
            let listed = synced.load(Ordering::SeqCst);
            match ev {
                Ok(watcher::Event::Init) => relisted = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(o)) | Ok(watcher::Event::Apply(o)) => {
                    let name = o.meta().name.clone().unwrap_or_default();
                    let v = serde_json::to_value(&o).unwrap_or(Value::Null);
                    if let Some(r) = relisted.as_mut() {
                        r.insert(name.clone());
                    }
                    send(state.get(&name), Some(&v), listed);
                    state.insert(name, v);
                }
                Ok(watcher::Event::Delete(o)) => {
                    let name = o.meta().name.clone().unwrap_or_default();
                    if let Some(prev) = state.remove(&name) {
                        send(Some(&prev), None, listed);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(names) = relisted.take() {
                        let gone: Vec<String> = state
                            .keys()
                            .filter(|n| !names.contains(*n))
                            .cloned()
                            .collect();
                        for n in gone {
                            if let Some(prev) = state.remove(&n) {
                                send(Some(&prev), None, listed);
                            }
                        }
                    }
                    synced.store(true, Ordering::SeqCst);
                }
                Err(e) => eprintln!("[e2e] watch error (retrying): {e}"),
            }
        }
    })
}

fn weights(vs: &Value) -> String {
    split_weights(vs)
        .map(|(s, r)| format!("{s}/{r}"))
        .unwrap_or_else(|| "unsplit".into())
}

fn classify_vs(prev: Option<&Value>, cur: Option<&Value>) -> Option<(String, String)> {
    match (prev, cur) {
        (None, Some(v)) => Some((
            format!("VirtualService created ({})", weights(v)),
            name_of(v),
        )),
        (Some(p), None) => Some(("VirtualService deleted".into(), name_of(p))),
        (Some(p), Some(v)) if p["spec"] != v["spec"] => Some((
            format!("VirtualService weights {}", weights(v)),
            format!("{}: {} -> {}", name_of(v), weights(p), weights(v)),
        )),
        (Some(p), Some(v)) if p["metadata"]["annotations"] != v["metadata"]["annotations"] => {
            Some(("VirtualService annotations".into(), name_of(v)))
        }
        _ => None,
    }
}

fn subsets(dr: &Value) -> Vec<String> {
    dr.pointer("/spec/subsets")
        .and_then(Value::as_array)
        .map(|ss| {
            ss.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn classify_dr(prev: Option<&Value>, cur: Option<&Value>) -> Option<(String, String)> {
    match (prev, cur) {
        (None, Some(v)) => Some((
            format!("DestinationRule created {:?}", subsets(v)),
            name_of(v),
        )),
        (Some(p), None) => Some(("DestinationRule deleted".into(), name_of(p))),
        (Some(p), Some(v)) if p["spec"] != v["spec"] => Some((
            format!("DestinationRule subsets {:?}", subsets(v)),
            format!("{}: {:?} -> {:?}", name_of(v), subsets(p), subsets(v)),
        )),
        (Some(p), Some(v)) if p["metadata"]["annotations"] != v["metadata"]["annotations"] => {
            Some(("DestinationRule annotations".into(), name_of(v)))
        }
        _ => None,
    }
}

fn classify_clone(prev: Option<&Value>, cur: Option<&Value>) -> Option<(String, String)> {
    let replicas = |d: &Value| d.pointer("/spec/replicas").cloned().unwrap_or(Value::Null);
    match (prev, cur) {
        (None, Some(v)) => Some((
            format!("clone created (replicas {})", replicas(v)),
            name_of(v),
        )),
        (Some(p), None) => Some(("clone deleted".into(), name_of(p))),
        (Some(p), Some(v)) if p["spec"]["template"] != v["spec"]["template"] => Some((
            "clone template replaced".into(),
            format!(
                "generation {} -> {}",
                p["metadata"]["generation"], v["metadata"]["generation"]
            ),
        )),
        (Some(p), Some(v)) if replicas(p) != replicas(v) => Some((
            format!("clone scaled to {}", replicas(v)),
            format!("{} -> {}", replicas(p), replicas(v)),
        )),
        (Some(p), Some(v))
            if p["metadata"]["generation"] != v["metadata"]["generation"]
                || own_annotations(p) != own_annotations(v)
                || p["metadata"]["labels"] != v["metadata"]["labels"] =>
        {
            Some(("clone spec or metadata changed".into(), name_of(v)))
        }
        _ => None,
    }
}

/// A Deployment's annotations less those its Deployment controller writes
/// (`deployment.kubernetes.io/revision`).
fn own_annotations(d: &Value) -> BTreeMap<String, Value> {
    d["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.starts_with("deployment.kubernetes.io/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn classify_pod(prev: Option<&Value>, cur: Option<&Value>) -> Option<(String, String)> {
    let (Some(p), Some(v)) = (prev, cur) else {
        return None; // created by a ReplicaSet, or deleted: not the controller's
    };
    let role = |o: &Value| {
        o["metadata"]["labels"][ROLE_LABEL]
            .as_str()
            .map(String::from)
    };
    let (before, after) = (role(p), role(v));
    if before == after {
        return None;
    }
    let kind = match &after {
        Some(r) => format!("pod labelled {r}"),
        None => "pod unlabelled".into(),
    };
    Some((kind, format!("{}: {before:?} -> {after:?}", name_of(v))))
}

fn classify_canary(prev: Option<&Value>, cur: Option<&Value>) -> Option<(String, String)> {
    match (prev, cur) {
        // Created by the test.
        (None, Some(_)) => None,
        // The last finalizer removed by the controller.
        (Some(p), None) => Some(("canary finalizer removed (gone)".into(), name_of(p))),
        (Some(p), Some(v)) if p["metadata"]["finalizers"] != v["metadata"]["finalizers"] => Some((
            format!("canary finalizers {}", v["metadata"]["finalizers"]),
            name_of(v),
        )),
        (Some(p), Some(v)) if p["status"] != v["status"] => {
            let st = &v["status"];
            Some((
                format!(
                    "status {} {}",
                    st["phase"].as_str().unwrap_or("-"),
                    st["currentPercent"]
                ),
                format!(
                    "{}: observedGeneration {}, clone {}/{} ready",
                    name_of(v),
                    st["observedGeneration"],
                    st["cloneReadyReplicas"],
                    st["cloneReplicas"]
                ),
            ))
        }
        _ => None,
    }
}

fn name_of(o: &Value) -> String {
    o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Kills the controller after each write of a kind (per phase) it has not killed on yet, and
/// starts the next one with the same arguments.
struct Killer<'a> {
    h: &'a Harness,
    args: Vec<String>,
    kubeconfig: PathBuf,
    controller: Option<ControllerProcess>,
    /// When the running controller was started: a write seen before was made by a process
    /// already killed, so it does not use up its kind.
    started: Instant,
    phase: String,
    previous_phase: String,
    phase_started: Instant,
    done: BTreeSet<String>,
    kills: Vec<String>,
    writes: usize,
    /// Every write seen, with what it led to.
    timeline: Vec<String>,
    t0: Instant,
}

impl<'a> Killer<'a> {
    fn new(h: &'a Harness, args: Vec<String>) -> Self {
        let mut k = Self {
            h,
            args,
            kubeconfig: h.env.kubeconfig.clone(),
            controller: None,
            started: Instant::now(),
            phase: "start".into(),
            previous_phase: "start".into(),
            phase_started: Instant::now(),
            done: BTreeSet::new(),
            kills: Vec::new(),
            writes: 0,
            timeline: Vec::new(),
            t0: Instant::now(),
        };
        k.spawn();
        k
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let tag = format!("k{}", self.kills.len());
        self.controller = Some(self.h.spawn_controller(&tag, &args, &self.kubeconfig));
        self.started = Instant::now();
    }

    fn on_write(&mut self, w: Write) {
        self.writes += 1;
        let phase = if w.at < self.phase_started {
            &self.previous_phase
        } else {
            &self.phase
        };
        let key = format!("{phase}: {}", w.kind);
        let at = w.at.saturating_duration_since(self.t0).as_secs_f64();
        if w.at < self.started {
            self.timeline.push(format!(
                "  +{at:>6.2}s {key} [{}] (made by a process already killed)",
                w.detail
            ));
            return;
        }
        if !self.done.insert(key.clone()) {
            self.timeline
                .push(format!("  +{at:>6.2}s {key} [{}]", w.detail));
            return;
        }
        self.timeline.push(format!(
            "  +{at:>6.2}s {key} [{}] -> KILL #{}",
            w.detail,
            self.kills.len() + 1
        ));
        let pid = self.controller.as_ref().map(ControllerProcess::pid);
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
        self.kills.push(format!("{key} [{}]", w.detail));
        eprintln!(
            "[e2e] {}: kill #{} (pid {pid:?}) right after: {key} [{}]",
            self.h.ns,
            self.kills.len(),
            w.detail
        );
        self.spawn();
    }

    /// Runs `work` (the user's action and the wait for its end state) while killing on writes.
    async fn phase<T>(
        &mut self,
        rx: &mut UnboundedReceiver<Write>,
        name: &str,
        work: impl Future<Output = T>,
    ) -> T {
        self.previous_phase = std::mem::replace(&mut self.phase, name.to_string());
        self.phase_started = Instant::now();
        let t0 = Instant::now();
        let kills_before = self.kills.len();
        let mut work = std::pin::pin!(work);
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                Some(w) = rx.recv() => self.on_write(w),
            }
        };
        eprintln!(
            "[e2e] {}: phase {name} converged in {:?} with {} kills",
            self.h.ns,
            t0.elapsed(),
            self.kills.len() - kills_before
        );
        out
    }
}

/// The state every phase but the rollback ends in: Ready at `percent`, the VirtualService at
/// `100-percent/percent`, the clone at `clone_replicas` Ready replicas of the target's image,
/// and every live target pod (`target_replicas`, of `image`) Ready and labelled stable.
async fn converged(
    h: &Harness,
    percent: i64,
    target_replicas: usize,
    clone_replicas: i32,
    image: &str,
) {
    h.until(
        &format!(
            "split {}/{percent}, clone at {clone_replicas} ready replicas of {image}, \
             {target_replicas} target pods labelled stable",
            100 - percent
        ),
        Duration::from_secs(120),
        || async {
            let vs = h.vs(OWNED).await.ok_or("no VirtualService")?;
            if split_weights(&vs) != Some((100 - percent, percent)) {
                return Err(format!("weights {:?}", split_weights(&vs)));
            }
            let d = h.deployment(CLONE).await.ok_or("no clone")?;
            let spec = d.spec.clone().unwrap_or_default();
            let st = d.status.clone().unwrap_or_default();
            let clone_image = spec
                .template
                .spec
                .as_ref()
                .and_then(|s| s.containers.iter().find(|c| c.name == "server"))
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let rolled = spec.replicas == Some(clone_replicas)
                && st.observed_generation == d.metadata.generation
                && st.replicas == Some(clone_replicas)
                && st.updated_replicas == Some(clone_replicas)
                && st.ready_replicas == Some(clone_replicas)
                && clone_image == image;
            if !rolled {
                return Err(format!(
                    "clone image {clone_image}, spec replicas {:?}, status {:?}",
                    spec.replicas, st
                ));
            }
            let pods = h.pods(None).await;
            let live: Vec<_> = pods
                .iter()
                .filter(|p| pod_of(p, "frontend") && p.metadata.deletion_timestamp.is_none())
                .collect();
            let good = live
                .iter()
                .filter(|p| {
                    pod_ready(p)
                        && labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable")
                        && p.spec.as_ref().is_some_and(|s| {
                            s.containers.first().and_then(|c| c.image.as_deref()) == Some(image)
                        })
                })
                .count();
            if live.len() != target_replicas || good != target_replicas {
                return Err(format!(
                    "{} live target pods, {good} Ready, labelled stable and of {image}",
                    live.len()
                ));
            }
            Ok(())
        },
    )
    .await;
    h.wait_status("frontend", "Ready", percent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_after_each_write_converges_without_a_violation() {
    const IMAGE: &str = "gcr.io/google-samples/microservices-demo/frontend:v0.10.1";
    const NEW_IMAGE: &str = "registry.example/frontend:v2";
    let mut h = Harness::start_without_controller("killmatrix").await;
    let ns = h.ns.clone();

    // The watches that drive the kills, listed before anything is written.
    let (tx, mut rx) = unbounded_channel::<Write>();
    let mut watches = Vec::new();
    let mut synced = Vec::new();
    let mut flag = || {
        let f = Arc::new(AtomicBool::new(false));
        synced.push(f.clone());
        f
    };
    let all = watcher::Config::default;
    watches.push(watch_writes(
        h.vs_api(),
        all(),
        tx.clone(),
        flag(),
        classify_vs,
    ));
    watches.push(watch_writes(
        h.dr_api(),
        all(),
        tx.clone(),
        flag(),
        classify_dr,
    ));
    watches.push(watch_writes(
        h.deployments(),
        all().fields(&format!("metadata.name={CLONE}")),
        tx.clone(),
        flag(),
        classify_clone,
    ));
    watches.push(watch_writes(
        h.pods_api(),
        all(),
        tx.clone(),
        flag(),
        classify_pod,
    ));
    watches.push(watch_writes(
        h.canary_api(),
        all(),
        tx.clone(),
        flag(),
        classify_canary,
    ));
    drop(tx);
    h.until("the kill driver's watches to list", WAIT, || async {
        let n = synced.iter().filter(|f| f.load(Ordering::SeqCst)).count();
        if n == synced.len() {
            Ok(())
        } else {
            Err(format!("{n} of {} listed", synced.len()))
        }
    })
    .await;

    let args: Vec<String> = [
        "run",
        "--namespace",
        &ns,
        "--leader-elect=false",
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut killer = Killer::new(&h, args);

    killer
        .phase(&mut rx, "setup", async {
            h.app_and_canary("canary.yaml").await;
            converged(&h, 10, 3, 1, IMAGE).await;
        })
        .await;
    killer
        .phase(&mut rx, "ramp", async {
            h.patch_canary("frontend", &json!({"spec": {"percent": 30}}))
                .await;
            converged(&h, 30, 3, 1, IMAGE).await;
        })
        .await;
    killer
        .phase(&mut rx, "scale", async {
            h.k(&["scale", "deployment/frontend", "--replicas=6"]).await;
            // ceil(6 x 30%) = 2
            converged(&h, 30, 6, 2, IMAGE).await;
        })
        .await;
    killer
        .phase(&mut rx, "image", async {
            h.k(&[
                "set",
                "image",
                "deployment/frontend",
                &format!("server={NEW_IMAGE}"),
            ])
            .await;
            h.k(&["rollout", "status", "deployment/frontend", "--timeout=120s"])
                .await;
            converged(&h, 30, 6, 2, NEW_IMAGE).await;
        })
        .await;
    let target_generation = h
        .deployment("frontend")
        .await
        .expect("the target")
        .metadata
        .generation;
    killer
        .phase(&mut rx, "rollback", async {
            h.k(&["delete", "rcanary", "frontend", "--wait=false"])
                .await;
            h.wait_gone(
                &h.canary_api(),
                "rcanary",
                "frontend",
                Duration::from_secs(120),
            )
            .await;
        })
        .await;

    let kills = std::mem::take(&mut killer.kills);
    let writes = killer.writes;
    let timeline = std::mem::take(&mut killer.timeline);
    drop(killer);
    for w in watches {
        w.abort();
    }
    eprintln!(
        "[e2e] {ns}: {} kills over {writes} controller writes seen:\n  {}\nevery write seen (time from the first controller's start):\n{}",
        kills.len(),
        kills.join("\n  "),
        timeline.join("\n")
    );
    h.faults_injected(kills.len());
    assert!(
        kills.len() >= 8,
        "only {} kills over {writes} writes seen: the kill driver saw too little:\n{}",
        kills.len(),
        kills.join("\n")
    );

    // The user's objects as before: ours gone, the target's pods without the role label.
    assert!(
        h.vs(OWNED).await.is_none(),
        "the VirtualService {OWNED} is still there after the rollback"
    );
    assert!(
        h.dr(OWNED).await.is_none(),
        "the DestinationRule {OWNED} is still there after the rollback"
    );
    assert!(
        h.deployment(CLONE).await.is_none(),
        "the clone {CLONE} is still there after the rollback"
    );
    let labelled: Vec<String> = h
        .pods(None)
        .await
        .iter()
        .filter(|p| pod_of(p, "frontend") && labels(p).contains_key(ROLE_LABEL))
        .map(pod_name)
        .collect();
    assert!(
        labelled.is_empty(),
        "target pods still labelled {ROLE_LABEL} after the rollback: {labelled:?}"
    );
    // The controller never writes the target's spec.
    let target = h.deployment("frontend").await.expect("the target");
    assert_eq!(
        target.metadata.generation, target_generation,
        "the target Deployment's spec was written during the rollback"
    );
    h.finish(true).await;
}

// ------------------------------------------------------------------------------------------------
// Shared by the tests below: a recording watch, and how a canary and a VirtualService look.

/// One revision a [`Tape`] recorded.
#[derive(Debug, Clone)]
struct Seen {
    /// When the watch delivered it.
    at: Instant,
    deleted: bool,
    object: Value,
}

/// Every revision a watch delivers (the state at its start first), until dropped.
struct Tape {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Tape {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tape {
    /// Starts the watch and returns once it has listed.
    async fn start<K>(h: &Harness, api: Api<K>, cfg: watcher::Config) -> Self
    where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + serde::Serialize + 'static,
    {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let listed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let seen = seen.clone();
            let listed = listed.clone();
            async move {
                let mut stream = watcher(api, cfg).default_backoff().boxed();
                while let Some(ev) = stream.next().await {
                    let (o, deleted) = match ev {
                        Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => {
                            (o, false)
                        }
                        Ok(watcher::Event::Delete(o)) => (o, true),
                        Ok(watcher::Event::InitDone) => {
                            listed.store(true, Ordering::SeqCst);
                            continue;
                        }
                        Ok(watcher::Event::Init) => continue,
                        Err(e) => {
                            eprintln!("[e2e] watch error (retrying): {e}");
                            continue;
                        }
                    };
                    seen.lock().expect("tape").push(Seen {
                        at: Instant::now(),
                        deleted,
                        object: serde_json::to_value(&o).unwrap_or(Value::Null),
                    });
                }
            }
        });
        h.until("a watch to list", WAIT, || async {
            if listed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not listed yet".to_string())
            }
        })
        .await;
        Self { seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("tape").clone()
    }
}

fn rv_of(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The reason of the canary's Ready condition.
fn ready_reason(c: &Value) -> String {
    c["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or("-")
        .to_string()
}

/// `phase/reason current%` (and the revert count when there is one).
fn canary_line(c: &Value) -> String {
    let st = &c["status"];
    let mut s = format!(
        "{}/{} {}%",
        st["phase"].as_str().unwrap_or("-"),
        ready_reason(c),
        st["currentPercent"]
    );
    if let Some(n) = st["revertCount"].as_i64() {
        s.push_str(&format!(" revertCount {n}"));
    }
    if c["metadata"]["deletionTimestamp"].is_string() {
        s.push_str(" (deleting)");
    }
    s
}

/// What the recorded canary revisions went through after `since`, repeats left out.
fn canary_timeline(tape: &Tape, since: Instant) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut last = String::new();
    if tape.seen().iter().all(|s| s.at < since) {
        return "  (no new revision)".into();
    }
    for s in tape.seen() {
        let line = if s.deleted {
            "gone".to_string()
        } else {
            canary_line(&s.object)
        };
        if s.at >= since && line != last {
            lines.push(format!(
                "  +{:>6.2}s {line}",
                s.at.saturating_duration_since(since).as_secs_f64()
            ));
        }
        last = line;
    }
    lines.join("\n")
}

/// The weight the VirtualService gives the recording subset over all its routes.
fn recording_weight(vs: &Value) -> i64 {
    http_destinations(vs)
        .iter()
        .flatten()
        .filter(|d| d.1.as_deref() == Some(RECORDING_SUBSET))
        .map(|d| d.2.unwrap_or(0))
        .sum()
}

/// Whether the VirtualService routes to the recording subset (with a weight above 0).
fn routes_to_recording(vs: &Value) -> bool {
    recording_weight(vs) > 0
}

/// The VirtualService's HTTP routes as `subset=weight` lists, for messages.
fn route_summary(vs: &Value) -> String {
    http_destinations(vs)
        .into_iter()
        .map(|ds| {
            ds.into_iter()
                .map(|(h, s, w)| {
                    format!(
                        "{h}{}={}",
                        s.map(|s| format!("/{s}")).unwrap_or_default(),
                        w.map(|w| w.to_string()).unwrap_or_else(|| "-".into())
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn uid_of(o: &Value) -> String {
    o["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the canary is Blocked with Ready reason `reason`.
async fn wait_blocked(h: &Harness, reason: &str, timeout: Duration) {
    h.until(
        &format!("rcanary/frontend Blocked with reason {reason}"),
        timeout,
        || async {
            let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
            if c["status"]["phase"] == "Blocked" && ready_reason(&c) == reason {
                Ok(())
            } else {
                Err(canary_line(&c))
            }
        },
    )
    .await;
}

/// What a rollback leaves: no VirtualService, DestinationRule or clone of the canary, and no
/// target pod labelled with a role.
async fn assert_rolled_back(h: &Harness) {
    assert!(
        h.vs(OWNED).await.is_none(),
        "the VirtualService {OWNED} is still there after the rollback"
    );
    assert!(
        h.dr(OWNED).await.is_none(),
        "the DestinationRule {OWNED} is still there after the rollback"
    );
    assert!(
        h.deployment(CLONE).await.is_none(),
        "the clone {CLONE} is still there after the rollback"
    );
    let target_pods: Vec<_> = h
        .pods(None)
        .await
        .into_iter()
        .filter(|p| pod_of(p, "frontend"))
        .collect();
    assert!(
        !target_pods.is_empty(),
        "no pod of the target left to check"
    );
    let labelled: Vec<String> = target_pods
        .iter()
        .filter(|p| labels(p).contains_key(ROLE_LABEL))
        .map(pod_name)
        .collect();
    assert!(
        labelled.is_empty(),
        "target pods still labelled {ROLE_LABEL} after the rollback: {labelled:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// A GitOps peer that puts the user's VirtualService back every second.

/// What the peer did.
#[derive(Debug, Default)]
struct PeerReport {
    applies: usize,
    /// Applies that changed the object (kubectl said `configured`).
    configured: usize,
    failures: Vec<String>,
}

/// `kubectl apply -f manifest` (client-side apply, Argo CD's default) every `period` for
/// `duration`, as a GitOps tool's self-heal would.
fn gitops_peer(
    h: &Harness,
    manifest: PathBuf,
    period: Duration,
    duration: Duration,
) -> JoinHandle<PeerReport> {
    let kubectl = h.env.kubectl.clone();
    let kubeconfig = h.env.kubeconfig.clone();
    let ns = h.ns.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start = Instant::now();
        let mut r = PeerReport::default();
        loop {
            tick.tick().await;
            if start.elapsed() >= duration {
                return r;
            }
            let out = tokio::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["-n", &ns, "apply", "-f"])
                .arg(&manifest)
                .stdin(std::process::Stdio::null())
                .output()
                .await;
            r.applies += 1;
            match out {
                Ok(o) if o.status.success() => {
                    if String::from_utf8_lossy(&o.stdout).contains(" configured") {
                        r.configured += 1;
                    }
                }
                Ok(o) => r
                    .failures
                    .push(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                Err(e) => r.failures.push(e.to_string()),
            }
        }
    })
}

/// The field managers that own `.spec.http` (an atomic list: one, normally), joined by `,`.
fn http_owners(vs: &Value) -> String {
    vs["metadata"]["managedFields"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e.pointer("/fieldsV1/f:spec/f:http").is_some())
                .filter_map(|e| e["manager"].as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// The VirtualService document of examples/istio/adopt/user-vs-dr.yaml: what the user keeps in
/// git (the peer must not touch the DestinationRule).
fn user_vs_manifest() -> String {
    let path = example("adopt/user-vs-dr.yaml");
    let all =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    all.split("\n---\n")
        .find(|doc| doc.contains("kind: VirtualService"))
        .expect("a VirtualService in adopt/user-vs-dr.yaml")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitops_peer_reverting_the_split_every_second_is_outlasted_with_bounded_writes() {
    const PEER_FOR: Duration = Duration::from_secs(30);
    const RECOVERY: Duration = Duration::from_secs(90);
    let mut h = Harness::start("gitops").await;
    let ns = h.ns.clone();
    h.apply_example("app.yaml").await;
    h.apply_example("adopt/user-vs-dr.yaml").await;
    h.apply_example("adopt/canary.yaml").await;
    h.patch_canary("frontend", &json!({"spec": {"propagationDelay": "1s"}}))
        .await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    let vs = h.vs("frontend").await.expect("the user's VirtualService");
    assert!(
        routes_to_recording(&vs),
        "not split before the peer starts: {}",
        route_summary(&vs)
    );

    let manifest = h.manifest("user-vs", &user_vs_manifest());
    let by_name = || watcher::Config::default().fields("metadata.name=frontend");
    let vss = Tape::start(&h, h.vs_api(), by_name()).await;
    let canaries = Tape::start(&h, h.canary_api(), by_name()).await;

    let start = Instant::now();
    let peer = gitops_peer(&h, manifest, Duration::from_secs(1), PEER_FOR);
    let report = peer.await.expect("the GitOps peer task");
    let end = Instant::now();

    // The window: the controller's re-splits (a revision that routes to the recording subset
    // again after one that did not) and the peer's reverts (the other way round).
    let mut routed = true;
    let (mut resplits, mut reverts) = (Vec::new(), Vec::new());
    let (mut resplitters, mut reverters) = (BTreeSet::new(), BTreeSet::new());
    for s in vss.seen() {
        let now = !s.deleted && routes_to_recording(&s.object);
        let at = s.at.saturating_duration_since(start).as_secs_f64();
        if s.at >= start && s.at <= end {
            if !routed && now {
                resplits.push(at);
                resplitters.insert(http_owners(&s.object));
            }
            if routed && !now {
                reverts.push(at);
                reverters.insert(http_owners(&s.object));
            }
        }
        routed = now;
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|t| format!("+{t:.1}s"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let statuses = canary_timeline(&canaries, start);
    let summary = format!(
        "GitOps peer: {} applies in {PEER_FOR:?} ({} changed the VirtualService, {} failed); \
         {} reverts seen [{}]; controller re-splits: {} [{}]",
        report.applies,
        report.configured,
        report.failures.len(),
        reverts.len(),
        fmt(&reverts),
        resplits.len(),
        fmt(&resplits),
    );
    println!("{summary}");
    eprintln!("[e2e] {ns}: {summary}\ncanary status over the window:\n{statuses}");
    assert!(
        report.applies >= 20 && report.failures.is_empty(),
        "the peer did not run as planned: {report:?}"
    );
    assert_eq!(
        reverters,
        BTreeSet::from(["kubectl-client-side-apply".to_string()]),
        "who owns .spec.http in the reverted revisions (the peer only)"
    );
    assert_eq!(
        resplitters,
        BTreeSet::from(["recording-canary".to_string()]),
        "who owns .spec.http in the re-split revisions (the controller only)"
    );
    h.faults_injected(reverts.len());
    assert!(
        reverts.len() >= 2,
        "the peer put the routes back only {} times: the test did not exercise the fight",
        reverts.len()
    );
    assert!(
        resplits.len() >= 2,
        "the controller re-applied the split only {} times in {PEER_FOR:?} against a peer \
         reverting it every second: it must fight back\n{summary}\ncanary status:\n{statuses}",
        resplits.len()
    );
    assert!(
        resplits.len() <= 10,
        "the controller re-applied the split {} times in {PEER_FOR:?}: it does not back off \
         (without a backoff it would be about one per second)\n{summary}\ncanary status:\n{statuses}",
        resplits.len()
    );

    // The canary said so: the revert count, Degraded/SplitReverted while waiting.
    let seen_canaries: Vec<Value> = canaries
        .seen()
        .into_iter()
        .filter(|s| !s.deleted)
        .map(|s| s.object)
        .collect();
    let max_count = seen_canaries
        .iter()
        .filter_map(|c| c["status"]["revertCount"].as_i64())
        .max()
        .unwrap_or(0);
    assert!(
        max_count >= 2,
        "status.revertCount never reached 2 (max {max_count}):\n{statuses}"
    );
    assert!(
        seen_canaries
            .iter()
            .any(|c| c["status"]["phase"] == "Degraded" && ready_reason(c) == "SplitReverted"),
        "the canary was never Degraded with reason SplitReverted while it waited:\n{statuses}"
    );
    assert!(
        seen_canaries
            .iter()
            .any(|c| c["status"]["lastRevertTime"].is_string()),
        "status.lastRevertTime was never set:\n{statuses}"
    );

    // A warning Event naming the writer (from managedFields).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(h.client.clone(), &ns);
    let selector =
        "involvedObject.kind=RecordingCanary,involvedObject.name=frontend,reason=SplitReverted";
    let event = h
        .until(
            "a Warning Event SplitReverted on rcanary/frontend naming kubectl-client-side-apply",
            Duration::from_secs(30),
            || async {
                let list = events
                    .list(&kube::api::ListParams::default().fields(selector))
                    .await
                    .map_err(|e| format!("list events: {e}"))?;
                let messages: Vec<String> = list
                    .items
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e.type_.clone().unwrap_or_default(),
                            e.message.clone().unwrap_or_default()
                        )
                    })
                    .collect();
                list.items
                    .iter()
                    .find(|e| {
                        e.type_.as_deref() == Some("Warning")
                            && e.message
                                .as_deref()
                                .is_some_and(|m| m.contains("kubectl-client-side-apply"))
                    })
                    .and_then(|e| e.message.clone())
                    .ok_or(format!("SplitReverted events: {messages:?}"))
            },
        )
        .await;
    eprintln!("[e2e] {ns}: event: {event}");

    // The peer stopped: the split is back, and the canary Ready at 10%.
    let c = h
        .until(
            "the split back (Ready at 10%, the VirtualService routing to the recording subset) \
             after the peer stopped",
            RECOVERY,
            || async {
                let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
                let vs = h.vs("frontend").await.ok_or("no VirtualService")?;
                let ok = c["status"]["phase"] == "Ready"
                    && c["status"]["currentPercent"] == 10
                    && c["status"]["observedGeneration"] == c["metadata"]["generation"]
                    && split_weights(&vs) == Some((90, 10));
                if ok {
                    Ok(c)
                } else {
                    Err(format!(
                        "{}; routes {}",
                        canary_line(&c),
                        route_summary(&vs)
                    ))
                }
            },
        )
        .await;
    let recovered = end.elapsed();
    println!(
        "split back {recovered:?} after the peer stopped; revertCount {}",
        c["status"]["revertCount"]
    );
    eprintln!(
        "[e2e] {ns}: split back {recovered:?} after the peer stopped (max revertCount {max_count}); \
         canary status since the peer started:\n{}",
        canary_timeline(&canaries, start)
    );
    drop((vss, canaries));
    // The peer changed only routes: make-before-break holds throughout.
    h.finish(true).await;
}

// ------------------------------------------------------------------------------------------------
// Objects deleted by someone else while a canary runs.

/// Waits until the canary is Ready at 10% and the VirtualService it created splits 90/10.
async fn back_at_10(h: &Harness, what: &str) {
    h.until(
        &format!("{what}: the VirtualService {OWNED} at 90/10"),
        Duration::from_secs(90),
        || async {
            let vs = h.vs(OWNED).await.ok_or("no VirtualService")?;
            if split_weights(&vs) == Some((90, 10)) {
                Ok(())
            } else {
                Err(route_summary(&vs))
            }
        },
    )
    .await;
    h.wait_status("frontend", "Ready", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_deleted_by_someone_else_mid_flight_are_recreated_or_reported_without_breaking_traffic()
 {
    let h = Harness::start("deleted").await;
    let ns = h.ns.clone();
    let app = example("app.yaml");
    let app = app.to_str().expect("utf-8 path");
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;
    let canaries = Tape::start(
        &h,
        h.canary_api(),
        watcher::Config::default().fields("metadata.name=frontend"),
    )
    .await;
    // The clone's pods: the controller counts a clone's Ready replicas from them.
    let clone_pods = Tape::start(
        &h,
        h.pods_api(),
        watcher::Config::default().labels("recordingcanary.dev/role=recording"),
    )
    .await;
    let vs_revisions_since = |t: Instant| -> Vec<(u64, Value)> {
        h.mbb
            .revisions()
            .into_iter()
            .filter(|r| r.kind == Kind::VirtualService && r.name == OWNED && r.seen >= t)
            .map(|r| (r.rv, r.object))
            .collect()
    };

    // (a) The clone: re-created. While it is missing or not Ready it gets no traffic.
    let old_clone = h.deployment(CLONE).await.expect("the clone");
    let old_uid = old_clone.metadata.uid.clone().unwrap_or_default();
    let old_pods: BTreeSet<String> = clone_pods
        .seen()
        .iter()
        .map(|s| uid_of(&s.object))
        .collect();
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "deployment", CLONE]).await;
    // Until the controller has reacted, the VirtualService is still at 90/10: first a pod of
    // the re-created clone Ready (the first such revision, from the pod watch), then 90/10
    // again.
    let ready_rv = h
        .until(
            "(a) the pod watch to see a Ready pod of the re-created clone",
            WAIT,
            || async {
                clone_pods
                    .seen()
                    .iter()
                    .filter(|s| {
                        !s.deleted
                            && !old_pods.contains(&uid_of(&s.object))
                            && serde_json::from_value(s.object.clone()).is_ok_and(|p| pod_ready(&p))
                    })
                    .map(|s| rv_of(&s.object))
                    .min()
                    .ok_or(format!(
                        "{} clone pod revisions seen",
                        clone_pods.seen().len()
                    ))
            },
        )
        .await;
    back_at_10(&h, "(a) clone deleted").await;
    let took = t.elapsed();
    let new_clone = h.deployment(CLONE).await.expect("the re-created clone");
    assert_ne!(
        new_clone.metadata.uid.clone().unwrap_or_default(),
        old_uid,
        "the clone was not re-created"
    );
    // The VirtualService after the deletion: drained to 0, and back to 10 only after the new
    // clone's first Ready revision (etcd revisions order writes across kinds).
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let after_delete = vs_revisions_since(t);
    let weights_a: Vec<String> = after_delete
        .iter()
        .map(|(rv, v)| format!("rv {rv}: {}", route_summary(v)))
        .collect();
    eprintln!(
        "[e2e] {ns}: (a) clone deleted: back at 10% in {took:?}; new clone pod Ready at rv {ready_rv}; \
         VirtualService revisions since:\n  {}\ncanary:\n{}",
        weights_a.join("\n  "),
        canary_timeline(&canaries, t)
    );
    let drained = after_delete
        .iter()
        .position(|(_, v)| split_weights(v) == Some((100, 0)));
    assert!(
        drained.is_some(),
        "(a) the clone was deleted but its weight never went to 0 (the recording subset had no \
         Ready pod): {weights_a:#?}"
    );
    let early: Vec<&String> = after_delete
        .iter()
        .zip(&weights_a)
        .skip(drained.unwrap_or(0))
        .filter(|((rv, v), _)| routes_to_recording(v) && *rv < ready_rv)
        .map(|(_, w)| w)
        .collect();
    assert!(
        early.is_empty(),
        "(a) traffic went back to the re-created clone before it had a Ready pod (rv \
         {ready_rv}): {early:?}"
    );

    // (b) The DestinationRule it created: re-created. Someone else deleting a DestinationRule
    // that a VirtualService routes to breaks make-before-break by itself (checked at the end);
    // the controller can only put it back as fast as it can.
    let old_dr = h.dr(OWNED).await.expect("the DestinationRule");
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "destinationrule", OWNED]).await;
    let c_b = h.canary("frontend").await.expect("the canary");
    let vs_b = h.vs(OWNED).await.expect("the VirtualService");
    eprintln!(
        "[e2e] {ns}: (b) right after the DestinationRule was deleted: canary {}; VirtualService {}",
        canary_line(&c_b),
        route_summary(&vs_b)
    );
    h.until(
        "(b) the DestinationRule re-created with both subsets",
        WAIT,
        || async {
            let dr = h.dr(OWNED).await.ok_or("no DestinationRule")?;
            let names: Vec<String> = dr["spec"]["subsets"]
                .as_array()
                .map(|ss| {
                    ss.iter()
                        .filter_map(|s| s["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if uid_of(&dr) != uid_of(&old_dr)
                && names.iter().any(|n| n == STABLE_SUBSET)
                && names.iter().any(|n| n == RECORDING_SUBSET)
            {
                Ok(())
            } else {
                Err(format!("uid {}, subsets {names:?}", uid_of(&dr)))
            }
        },
    )
    .await;
    back_at_10(&h, "(b) DestinationRule deleted").await;
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    let weights_b: Vec<String> = vs_revisions_since(t)
        .iter()
        .map(|(rv, v)| format!("rv {rv}: {}", route_summary(v)))
        .collect();
    eprintln!(
        "[e2e] {ns}: (b) DestinationRule deleted: back in {:?}; VirtualService revisions since: \
         {weights_b:?}\ncanary:\n{}",
        t.elapsed(),
        canary_timeline(&canaries, t)
    );

    // (c) The VirtualService it created: re-created at 10%.
    let old_vs = h.vs(OWNED).await.expect("the VirtualService");
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "virtualservice", OWNED]).await;
    back_at_10(&h, "(c) VirtualService deleted").await;
    let vs_c = h.vs(OWNED).await.expect("the VirtualService");
    assert_ne!(
        uid_of(&vs_c),
        uid_of(&old_vs),
        "(c) the VirtualService was not re-created"
    );
    eprintln!(
        "[e2e] {ns}: (c) VirtualService deleted: back in {:?}\ncanary:\n{}",
        t.elapsed(),
        canary_timeline(&canaries, t)
    );

    // (d) The target: Blocked TargetNotFound until it is back.
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "deployment", "frontend"]).await;
    wait_blocked(&h, "TargetNotFound", WAIT).await;
    let blocked_in = t.elapsed();
    h.k(&["apply", "-f", app]).await;
    back_at_10(&h, "(d) target re-created").await;
    h.until(
        "(d) the re-created target's 3 pods Ready and labelled stable",
        WAIT,
        || async {
            let pods = h.pods(None).await;
            let stable = pods
                .iter()
                .filter(|p| {
                    pod_of(p, "frontend")
                        && pod_ready(p)
                        && labels(p).get(ROLE_LABEL).map(String::as_str) == Some("stable")
                })
                .count();
            if stable == 3 {
                Ok(())
            } else {
                Err(format!("{stable} Ready target pods labelled stable"))
            }
        },
    )
    .await;
    eprintln!(
        "[e2e] {ns}: (d) target deleted: Blocked in {blocked_in:?}, back at 10% {:?} after the \
         deletion\ncanary:\n{}",
        t.elapsed(),
        canary_timeline(&canaries, t)
    );

    // (e) The Service: Blocked ServiceNotFound until it is back.
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "service", "frontend"]).await;
    wait_blocked(&h, "ServiceNotFound", WAIT).await;
    let blocked_in = t.elapsed();
    h.k(&["apply", "-f", app]).await;
    back_at_10(&h, "(e) Service re-created").await;
    eprintln!(
        "[e2e] {ns}: (e) Service deleted: Blocked in {blocked_in:?}, back at 10% {:?} after the \
         deletion\ncanary:\n{}",
        t.elapsed(),
        canary_timeline(&canaries, t)
    );
    drop((canaries, clone_pods));

    // Make-before-break: the only violations allowed are those of the external deletion of the
    // DestinationRule in (b) (it took the subsets away under the VirtualService's routes, which
    // no controller can prevent); every write of the controller's must keep it.
    let report = h.mbb.check(&h.vs_api(), &h.dr_api()).await;
    let deletion = h
        .mbb
        .revisions()
        .into_iter()
        .find(|r| r.kind == Kind::DestinationRule && r.name == OWNED && r.deleted)
        .expect("the watcher saw the deletion of the DestinationRule");
    let external = format!(
        "DestinationRule {OWNED} revision {} (deletion) took away subset",
        deletion.rv
    );
    println!(
        "make-before-break: checked {} VirtualService revisions, {} DestinationRule revisions; \
         {} violations at the external deletion of the DestinationRule (rv {})",
        report.vs_revisions,
        report.dr_revisions,
        report
            .violations
            .iter()
            .filter(|v| v.starts_with(&external))
            .count(),
        deletion.rv
    );
    let others: Vec<&String> = report
        .violations
        .iter()
        .filter(|v| !v.starts_with(&external))
        .collect();
    assert!(
        others.is_empty(),
        "make-before-break violated by other than the external deletion of the DestinationRule \
         (rv {}):\n{}\nrevisions:\n{}",
        deletion.rv,
        others
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        report.timeline
    );
    // The deletion itself is reported, once per subset the VirtualService routed to then.
    let mut at_deletion: Vec<&String> = report
        .violations
        .iter()
        .filter(|v| v.starts_with(&external))
        .collect();
    at_deletion.sort();
    h.record_checked(report.vs_revisions, report.dr_revisions, others.len());
    assert_eq!(
        at_deletion.len(),
        2,
        "expected the external deletion of the DestinationRule (rv {}) to take away both subsets \
         under the VirtualService's routes: {at_deletion:#?}",
        deletion.rv
    );
}

// ------------------------------------------------------------------------------------------------
// Rollback after a deletion the controller did not see happen, and in the middle of a ramp.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_deleted_while_no_controller_runs_is_rolled_back_by_the_next_one() {
    let mut h = Harness::start_without_controller("orphandel").await;
    let args = controller_args(&h.ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = h.env.kubeconfig.clone();
    let mut first = h.spawn_controller("first", &args, &kubeconfig);
    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    h.wait_status("frontend", "Ready", 10).await;

    first.kill();
    h.faults_injected(2);
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    let c = h
        .canary("frontend")
        .await
        .expect("with no controller running, the finalizer keeps the canary");
    assert!(
        c["metadata"]["deletionTimestamp"].is_string(),
        "the canary is not being deleted: {}",
        c["metadata"]
    );
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(
        split_weights(&vs),
        Some((90, 10)),
        "nothing may have changed while no controller ran"
    );

    let t = Instant::now();
    let _second = h.spawn_controller("second", &args, &kubeconfig);
    h.wait_gone(
        &h.canary_api(),
        "rcanary",
        "frontend",
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "[e2e] {}: rolled back by the next controller in {:?}",
        h.ns,
        t.elapsed()
    );
    assert_rolled_back(&h).await;
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_deleted_mid_ramp_rolls_back_cleanly() {
    let mut h = Harness::start("rampdel").await;
    let ns = h.ns.clone();
    h.app_and_canary("canary-ramp.yaml").await;
    // Mid-ramp: a step after the first taken (10% at once, 20% an interval later), short of 50%.
    let w = h
        .until(
            "the ramp at 20% (status and VirtualService)",
            WAIT,
            || async {
                let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
                let vs = h.vs(OWNED).await.ok_or("no VirtualService")?;
                let current = c["status"]["currentPercent"].as_i64().unwrap_or(0);
                let w = recording_weight(&vs);
                if current == 20 && w == 20 {
                    Ok(w)
                } else {
                    Err(format!(
                        "{}; routes {}",
                        canary_line(&c),
                        route_summary(&vs)
                    ))
                }
            },
        )
        .await;
    let t = Instant::now();
    h.faults_injected(1);
    h.k(&["delete", "rcanary", "frontend", "--wait=false"])
        .await;
    h.wait_gone(
        &h.canary_api(),
        "rcanary",
        "frontend",
        Duration::from_secs(60),
    )
    .await;
    let took = t.elapsed();
    h.mbb.catch_up(&h.vs_api(), &h.dr_api()).await;
    // After the deletion the weight only goes down.
    let after: Vec<(u64, bool, i64)> = h
        .mbb
        .revisions()
        .into_iter()
        .filter(|r| r.kind == Kind::VirtualService && r.seen >= t)
        .map(|r| (r.rv, r.deleted, recording_weight(&r.object)))
        .collect();
    eprintln!(
        "[e2e] {ns}: deleted at {w}%, gone in {took:?}; VirtualService revisions since \
         (rv, deleted, recording weight): {after:?}"
    );
    let raised: Vec<_> = after.iter().filter(|(_, d, x)| !d && *x > w).collect();
    assert!(
        raised.is_empty(),
        "the ramp went on after the canary was deleted at {w}%: {raised:?}"
    );
    assert_rolled_back(&h).await;
    h.finish(true).await;
}
