//! The fault matrix: peers and faults a production controller meets.
//!
//! * A Speedscale-like mutating admission webhook that injects its sidecar into the clone
//!   Deployment: the controller must not fight it (no spec write to the clone once it is in
//!   place).
//! * The controller SIGKILLed right after each distinct write it makes (through setup, a ramp
//!   step, a scale and a new image of the target, and the rollback), and restarted each time:
//!   every phase still converges, make-before-break holds, and the rollback leaves the user's
//!   objects as they were.

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

use crate::support::{
    CLONE, ControllerProcess, Harness, OWNED, ROLE_LABEL, SIDECAR_ANNOTATION, WAIT, labels,
    pod_name, pod_of, pod_ready, split_weights,
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
