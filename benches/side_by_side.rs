//! Benchmark: recording-canary side by side with Flagger v1.36.1 and a naive reference watcher, on
//! one cluster, in one run: the time from the user's action to the VirtualService sending weight
//! 10 to the new destination, the tool's peak RSS, and the API requests it made meanwhile.
//! Prints one Markdown table on stdout (progress on stderr). Asserts nothing.
//!
//!   bash tests/cluster/up.sh rcanary-side
//!   RC_E2E_KUBECONFIG=~/.cache/recording-canary/clusters/rcanary-side/kubeconfig \
//!     cargo bench --bench side_by_side
//!
//! Env: RC_SIDE_SAMPLES (samples for recording-canary and the naive watcher, default 30),
//! RC_SIDE_FLAGGER_SAMPLES (default 3: each Flagger sample is a whole canary analysis, over a
//! minute), RC_SIDE_TOOLS (default `recording-canary,naive,flagger`), RC_KUBECTL (default: the
//! kubectl of tests/cluster/build.sh's cache), RC_SIDE_CONTROLLER (another recording-canary
//! binary to measure instead of this tree's, e.g. an older release), RC_SIDE_KEEP_LOGS=1 (keep
//! the tools' logs, which are otherwise kept only on failure), RC_SIDE_IDLE_SECS (default 30: how
//! long each tool is left alone after its samples, for the last column), RC_SIDE_RUST_LOG (the
//! controller's RUST_LOG, default `info`; progress lines carry the Unix time, to line up with its
//! log). Flagger comes from tests/cluster/build-flagger.sh (built on first use, cached
//! afterwards).
//!
//! The three tools, each in a namespace of its own:
//! - recording-canary: `run --namespace NS`; the action is `patch rcanary app percent 5 → 10`
//!   (`maxReplicas: 1`, so the clone has its replica before the action); done
//!   when the VirtualService `app-recording` gives subset `rcanary-recording` weight 10.
//! - naive: benches/naive_watcher.py through `kubectl proxy`; the same action on a
//!   RecordingCanary that no controller handles; done when the user's VirtualService `app` gives
//!   subset `rcanary-recording` weight 10.
//! - Flagger: run with `-mesh-provider istio -metrics-server http://127.0.0.1:9
//!   -control-loop-interval 10s -namespace NS`; a Canary with `analysis: {interval: 10s,
//!   threshold: 5, maxWeight: 50, stepWeight: 10, metrics: []}` (no Prometheus here, and with no
//!   metrics Flagger checks none); the action is a new image in the Deployment's pod template (how a
//!   Flagger user starts a canary); done when the VirtualService `podinfo` gives `podinfo-canary`
//!   weight 10. Between samples the canary runs to `Succeeded` (promotion). Its CRDs are applied
//!   to the cluster and left there.
//!
//! API requests: recording-canary's own `recording_canary_api_requests_total`; the naive watcher's
//! own count; Flagger's `rest_client_requests_total` if it exposes it, else (v1.36.1 does not
//! register client-go's metrics) the count of a small HTTP/1.1 proxy that this bench puts between
//! Flagger and `kubectl proxy`. The naive watcher also goes through such a proxy, which checks the
//! proxy's count against the watcher's own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use recording_canary::api::{RECORDING_SUBSET, STABLE_SUBSET};
use recording_canary::runtime::metrics::classify;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Res<T> = Result<T, String>;

const FLAGGER_VERSION: &str = "v1.36.1"; // as in tests/cluster/build-flagger.sh
/// The Canary's `analysis.interval`: Flagger acts on this tick.
const FLAGGER_INTERVAL: Duration = Duration::from_secs(10);
const PERCENT_ACTION: &str = "patch rcanary percent 5 → 10";
/// The percent between samples. Not 0: at 0 the clone has no replica, and the first weight would
/// wait for one to start (the capacity gate), which is the cluster's time, not the controller's.
const BASE_PERCENT: i64 = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How long each tool is left alone after its samples, to count its requests while idle.
fn idle_window() -> Duration {
    Duration::from_secs(env_usize("RC_SIDE_IDLE_SECS", 30) as u64)
}

fn say(msg: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "[side-by-side {}.{:06}] {msg}",
        now.as_secs(),
        now.subsec_micros()
    );
}

// ---------------------------------------------------------------------------------------------
// Processes, namespaces and tasks that must go when the bench ends, whichever way it ends.

/// A child process, killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
}
impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends a signal (by number: 10 USR1, 15 TERM) without a libc binding.
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes a namespace on drop (with `kubectl`, as Drop cannot await) unless it is already gone.
/// `rcanary_finalizers`: first strip the finalizers of RecordingCanaries, for when their
/// controller is no longer there to roll them back.
struct NsGuard {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    ns: String,
    rcanary_finalizers: bool,
}
impl Drop for NsGuard {
    fn drop(&mut self) {
        let k = |args: &[&str]| {
            Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        if !matches!(k(&["get", "namespace", &self.ns]), Ok(s) if s.success()) {
            return;
        }
        if self.rcanary_finalizers {
            let _ = k(&[
                "-n",
                &self.ns,
                "patch",
                "rcanary",
                "app",
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
        let _ = k(&["delete", "namespace", &self.ns, "--wait=false"]);
    }
}

/// Background tasks (watches) of one tool, aborted on drop.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);
impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Peak resident set size of a process (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A loopback port that was free a moment ago (for a program that cannot take port 0).
fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// A plain HTTP/1.0 GET on loopback (no chunking); the body.
fn http_get(addr: SocketAddr, path: &str) -> Res<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read {addr}{path}: {e}"))?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "GET {addr}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

/// Sum of the samples of metric `name` (lines `name{...} value` or `name value`), by the values of
/// `labels` joined with spaces.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut seen = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        let Some(value) = value else { continue };
        seen = true;
        let key: Vec<&str> = labels
            .iter()
            .map(|l| {
                rest.split(&format!("{l}=\""))
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("")
            })
            .collect();
        *out.entry(key.join(" ")).or_insert(0) += value as u64;
    }
    seen.then_some(out)
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// `after - before`, per key (verb and resource), largest first, zeros left out.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut d: Vec<(u64, &String)> = after
        .iter()
        .map(|(k, v)| (v.saturating_sub(before.get(k).copied().unwrap_or(0)), k))
        .filter(|(n, _)| *n > 0)
        .collect();
    d.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    d.iter()
        .map(|(n, k)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lines a child prints on a pipe, through a thread.
fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line matching `pred`, within `timeout` (blocking this worker thread only briefly).
fn line_matching(
    rx: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    tokio::task::block_in_place(|| {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    // Nearest rank: the smallest sample with at least p of the samples at or below it.
    let n = sorted.len();
    (n > 0).then(|| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1])
}

fn fmt_dur(d: Option<Duration>) -> String {
    match d {
        None => "–".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

// ---------------------------------------------------------------------------------------------
// A counting HTTP/1.1 proxy (loopback, plain HTTP), for tools that do not count their requests.
// It reads each request's head (and body, by Content-Length or chunks), counts it by verb and
// resource exactly as recording-canary's own metric does (`recording_canary::runtime::metrics::classify`),
// and forwards the bytes; responses (watch streams too) are copied back untouched.

struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CountingProxy {
    fn start(upstream: SocketAddr) -> Res<Self> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy bind: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let c = counts.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { continue };
                let c = c.clone();
                std::thread::spawn(move || {
                    let _ = relay(client, upstream, &c);
                });
            }
        });
        Ok(Self { addr, counts })
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    counts: &Mutex<BTreeMap<String, u64>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
    });
    let mut r = BufReader::new(client);
    let mut w = server;
    loop {
        let mut head = String::new();
        let (mut length, mut chunked) = (0u64, false);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                let _ = w.shutdown(Shutdown::Write);
                return Ok(());
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() && head.is_empty() {
                continue; // a stray CRLF between requests
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
            head.push_str(&line);
            if l.is_empty() {
                break;
            }
        }
        let mut first = head.split_whitespace();
        let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let l = classify(method, path, query);
        if let Ok(mut m) = counts.lock() {
            *m.entry(format!("{} {}", l.verb, l.resource)).or_insert(0) += 1;
        }
        w.write_all(head.as_bytes())?;
        if chunked {
            loop {
                let mut size_line = String::new();
                r.read_line(&mut size_line)?;
                w.write_all(size_line.as_bytes())?;
                let size = u64::from_str_radix(
                    size_line.trim().split(';').next().unwrap_or("0").trim(),
                    16,
                )
                .unwrap_or(0);
                if size == 0 {
                    loop {
                        let mut t = String::new();
                        if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                            w.write_all(t.as_bytes())?;
                            break;
                        }
                        w.write_all(t.as_bytes())?;
                    }
                    break;
                }
                std::io::copy(&mut (&mut r).take(size + 2), &mut w)?;
            }
        } else if length > 0 {
            std::io::copy(&mut (&mut r).take(length), &mut w)?;
        }
        w.flush()?;
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster side.

struct Ctx {
    client: Client,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    repo: PathBuf,
    work: PathBuf,
    run_id: u32,
}

impl Ctx {
    fn kubectl(&self, args: &[&str]) -> Res<String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", self.kubectl.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn namespace(&self, tool: &str, rcanary_finalizers: bool) -> Res<(String, NsGuard)> {
        let ns = format!("rc-side-{tool}-{}", self.run_id);
        let obj: Namespace = serde_json::from_value(
            json!({"metadata": {"name": ns, "labels": {"istio-injection": "enabled"}}}),
        )
        .map_err(|e| e.to_string())?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| format!("create namespace {ns}: {e}"))?;
        let guard = NsGuard {
            kubectl: self.kubectl.clone(),
            kubeconfig: self.kubeconfig.clone(),
            ns: ns.clone(),
            rcanary_finalizers,
        };
        Ok((ns, guard))
    }

    /// Deletes the namespace and waits until it is gone (a controller still running meanwhile
    /// rolls its objects back and removes its finalizers).
    async fn delete_namespace(&self, ns: &str, within: Duration) {
        let api = Api::<Namespace>::all(self.client.clone());
        let _ = api.delete(ns, &DeleteParams::default()).await;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && matches!(api.get_opt(ns).await, Ok(Some(_))) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kubectl proxy` on a free loopback port; its address.
    fn kubectl_proxy(&self, tag: &str) -> Res<(Proc, SocketAddr)> {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["proxy", "--port=0", "--address=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file(&format!("{tag}-kubectl-proxy"))?)
            .spawn()
            .map_err(|e| format!("kubectl proxy: {e}"))?;
        let out = child.stdout.take().ok_or("kubectl proxy: no stdout")?;
        let p = Proc { child };
        let rx = lines_of(out);
        let line = line_matching(&rx, Duration::from_secs(20), |l| {
            l.contains("Starting to serve on")
        })
        .ok_or("kubectl proxy did not start within 20 s")?;
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("kubectl proxy: cannot read its address from {line:?}"))?;
        Ok((p, addr))
    }

    fn log_file(&self, name: &str) -> Res<File> {
        let p = self.work.join(format!("{name}.log"));
        File::create(&p).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// The same log file for a child's stdout and stderr.
    fn log_pair(&self, name: &str) -> Res<(File, File)> {
        let f = self.log_file(name)?;
        let g = f.try_clone().map_err(|e| e.to_string())?;
        Ok((f, g))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    async fn create<K>(&self, api: &Api<K>, obj: Value) -> Res<()>
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let o: K = serde_json::from_value(obj.clone()).map_err(|e| format!("{obj}: {e}"))?;
        api.create(&PostParams::default(), &o)
            .await
            .map_err(|e| format!("create {}: {e}", obj["metadata"]["name"]))?;
        Ok(())
    }
}

fn virtual_service() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    }
}
fn destination_rule() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "DestinationRule".into(),
        plural: "destinationrules".into(),
    }
}
fn recording_canary_resource() -> ApiResource {
    ApiResource {
        group: "recordingcanary.dev".into(),
        version: "v1alpha1".into(),
        api_version: "recordingcanary.dev/v1alpha1".into(),
        kind: "RecordingCanary".into(),
        plural: "recordingcanaries".into(),
    }
}
fn flagger_canary() -> ApiResource {
    ApiResource {
        group: "flagger.app".into(),
        version: "v1beta1".into(),
        api_version: "flagger.app/v1beta1".into(),
        kind: "Canary".into(),
        plural: "canaries".into(),
    }
}

fn deployment(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": image,
                                                       "ports": [{"name": "http", "containerPort": 80}]}]}}}
    })
}
fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}})
}

/// The weight of the first route destination that `is_it` picks (a missing weight is 0).
fn weight_of(vs: &Value, is_it: &dyn Fn(&Value) -> bool) -> Option<i64> {
    vs.pointer("/spec/http")?.as_array()?.iter().find_map(|h| {
        h.get("route")?
            .as_array()?
            .iter()
            .find(|d| d.get("destination").is_some_and(is_it))
            .map(|d| d.get("weight").and_then(Value::as_i64).unwrap_or(0))
    })
}
fn recording_weight(vs: &Value) -> Option<i64> {
    weight_of(vs, &|d| {
        d.get("subset").and_then(Value::as_str) == Some(RECORDING_SUBSET)
    })
}
fn flagger_canary_weight(vs: &Value) -> Option<i64> {
    weight_of(vs, &|d| {
        d.get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| h == "podinfo-canary" || h.starts_with("podinfo-canary."))
    })
}

/// Every revision of VirtualService `name` whose weight `weight` can read, as (weight, when seen).
fn watch_weights(
    api: Api<DynamicObject>,
    name: &str,
    weight: fn(&Value) -> Option<i64>,
    tasks: &mut Tasks,
) -> mpsc::UnboundedReceiver<(i64, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tasks.0.push(tokio::spawn(async move {
        let mut s = watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = s.next().await {
            let Ok(vs) = ev else { continue };
            let at = Instant::now();
            let v = serde_json::to_value(&vs).unwrap_or_default();
            if let Some(w) = weight(&v)
                && tx.send((w, at)).is_err()
            {
                return;
            }
        }
    }));
    rx
}

/// Waits for a weight `want`; when it was seen.
async fn wait_weight(
    rx: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
    want: i64,
    within: Duration,
) -> Res<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((w, at))) if w == want => return Ok(at),
            Ok(Some((w, _))) => last = Some(w),
            Ok(None) => return Err("the VirtualService watch ended".into()),
            Err(_) => {
                return Err(format!(
                    "no weight {want} within {within:?} (last seen: {last:?})"
                ));
            }
        }
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<(i64, Instant)>) {
    while rx.try_recv().is_ok() {}
}

/// Waits until object `name` satisfies `done` (Ok) or `failed` (Err with its text); the object.
async fn wait_object(
    api: Api<DynamicObject>,
    name: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
    failed: impl Fn(&Value) -> Option<String>,
) -> Res<Value> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut s = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    let deadline = tokio::time::Instant::now() + within;
    let mut last = Value::Null;
    loop {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(Ok(o))) => {
                let v = serde_json::to_value(&o).unwrap_or_default();
                if done(&v) {
                    return Ok(v);
                }
                if let Some(why) = failed(&v) {
                    return Err(why);
                }
                last = v;
            }
            Ok(Some(Err(_))) => {}
            Ok(None) => return Err(format!("the watch of {name} ended")),
            Err(_) => {
                return Err(format!(
                    "{name}: not there within {within:?}; its status: {}",
                    last.get("status").unwrap_or(&Value::Null)
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The three tools.

struct Row {
    tool: String,
    action: &'static str,
    samples: Vec<Duration>,
    wanted: usize,
    /// How long the user's own PATCH took to return, per sample (part of each sample).
    acks: Vec<Duration>,
    rss_kib: Option<u64>,
    requests: Option<u64>,
    /// Requests while idle after the samples, over `idle_window()`.
    idle_requests: Option<u64>,
    notes: Vec<String>,
    error: Option<String>,
}

impl Row {
    fn new(tool: &str, action: &'static str, wanted: usize) -> Self {
        Row {
            tool: tool.into(),
            action,
            samples: Vec::new(),
            acks: Vec::new(),
            wanted,
            rss_kib: None,
            requests: None,
            idle_requests: None,
            notes: Vec::new(),
            error: None,
        }
    }
}

/// Percent 5 → 10 (measured), then back to 5, `row.wanted` times, on RecordingCanary `app`.
/// With `status` (the canary's `status.currentPercent`, watched), each sample starts once the
/// status shows 5 % again: the controller's last write for the way back. The naive watcher's
/// last write is its PUT, which `rx` sees.
async fn percent_samples(
    ctx: &Ctx,
    ns: &str,
    rx: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
    row: &mut Row,
    mut status: Option<&mut mpsc::UnboundedReceiver<(i64, Instant)>>,
) -> Res<()> {
    let rcs: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &recording_canary_resource());
    let set = |p: i64| {
        let rcs = rcs.clone();
        async move {
            rcs.patch(
                "app",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"percent": p}})),
            )
            .await
            .map_err(|e| format!("patch percent {p}: {e}"))
        }
    };
    for i in 0..row.wanted {
        drain(rx);
        if let Some(s) = status.as_deref_mut() {
            drain(s);
        }
        let t0 = Instant::now();
        set(10).await?;
        row.acks.push(t0.elapsed());
        let at = wait_weight(rx, 10, Duration::from_secs(60)).await?;
        row.samples.push(at.duration_since(t0));
        say(&format!(
            "{}: sample {}/{}: {:?}",
            row.tool,
            i + 1,
            row.wanted,
            at.duration_since(t0)
        ));
        set(BASE_PERCENT).await?;
        wait_weight(rx, BASE_PERCENT, Duration::from_secs(60)).await?;
        if let Some(s) = status.as_deref_mut() {
            wait_weight(s, BASE_PERCENT, Duration::from_secs(60))
                .await
                .map_err(|e| format!("the canary's status.currentPercent: {e}"))?;
        }
    }
    Ok(())
}

/// The canary's `status.currentPercent` once the status speaks for the current spec
/// (`observedGeneration` = `generation`). Before that check, a revision made by the user's own
/// patch, which still shows the old status, satisfied the wait for the way back: samples started
/// while the controller was still writing the status of the previous change.
fn settled_percent(v: &Value) -> Option<i64> {
    let generation = v.pointer("/metadata/generation").and_then(Value::as_i64)?;
    let observed = v
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64)?;
    (observed == generation)
        .then(|| v.pointer("/status/currentPercent").and_then(Value::as_i64))
        .flatten()
}

async fn run_recording_canary(ctx: &Ctx, row: &mut Row) -> Res<()> {
    let (ns, _guard) = ctx.namespace("rc", true).await?;
    say(&format!("recording-canary: namespace {ns}"));
    let log = ctx.log_path("recording-canary");
    let binary = std::env::var_os("RC_SIDE_CONTROLLER").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_recording-canary")),
        PathBuf::from,
    );
    if std::env::var_os("RC_SIDE_CONTROLLER").is_some() {
        row.notes.push(format!(
            "recording-canary: the binary measured is {} (RC_SIDE_CONTROLLER)",
            binary.display()
        ));
    }
    let (out, err) = ctx.log_pair("recording-canary")?;
    let controller = Command::new(&binary)
        .args([
            "run",
            "--namespace",
            &ns,
            "--leader-elect=false",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &ctx.kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("RC_SIDE_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start recording-canary: {e}"))?;
    let mut controller = Proc { child: controller };
    let res = recording_canary_phase(ctx, &ns, &mut controller, &log, row).await;
    if res.is_err() {
        eprintln!("--- {} (last 30 lines)\n{}", log.display(), tail(&log, 30));
    }
    // The controller rolls the canary back (and removes its finalizer) while the namespace goes.
    ctx.delete_namespace(&ns, Duration::from_secs(120)).await;
    drop(controller);
    res
}

async fn recording_canary_phase(
    ctx: &Ctx,
    ns: &str,
    controller: &mut Proc,
    log: &Path,
    row: &mut Row,
) -> Res<()> {
    // The admin address, from the controller's log line `admin server listening ... addr=...`.
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin: SocketAddr = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .filter(|l| l.contains("admin server listening"))
            .find_map(|l| {
                let i = l.find("127.0.0.1:")?;
                let port: String = l[i + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                format!("127.0.0.1:{port}").parse().ok()
            })
        {
            break a;
        }
        if !controller.running() || Instant::now() > deadline {
            return Err("recording-canary did not start its admin server".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut tasks = Tasks::default();
    let c = ctx.client.clone();
    ctx.create(
        &Api::<Deployment>::namespaced(c.clone(), ns),
        deployment("app", "example/app:1"),
    )
    .await?;
    ctx.create(&Api::<Service>::namespaced(c.clone(), ns), service("app"))
        .await?;
    let vss = Api::<DynamicObject>::namespaced_with(c.clone(), ns, &virtual_service());
    let mut rx = watch_weights(vss, "app-recording", recording_weight, &mut tasks);
    let rcs = Api::<DynamicObject>::namespaced_with(c.clone(), ns, &recording_canary_resource());
    ctx.create(
        &rcs,
        json!({"apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
               "metadata": {"name": "app"},
               "spec": {"targetRef": {"name": "app"}, "percent": BASE_PERCENT, "maxReplicas": 1}}),
    )
    .await?;
    let ready = |v: &Value| {
        v.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    };
    // One watch for the whole run: a watch per sample would close its connection when dropped,
    // and the next patch would wait on a new TLS handshake.
    let mut status = watch_weights(rcs.clone(), "app", settled_percent, &mut tasks);
    wait_object(rcs, "app", Duration::from_secs(120), ready, |_| None).await?;
    wait_weight(&mut rx, BASE_PERCENT, Duration::from_secs(60)).await?;
    wait_weight(&mut status, BASE_PERCENT, Duration::from_secs(60)).await?;
    say(&format!(
        "recording-canary: canary app is Ready at {BASE_PERCENT} %"
    ));

    let metrics = |a| -> Res<Option<BTreeMap<String, u64>>> {
        let text = http_get(a, "/metrics")?;
        Ok(metric_sum(
            &text,
            "recording_canary_api_requests_total",
            &["verb", "resource"],
        ))
    };
    let before = metrics(admin)?;
    percent_samples(ctx, ns, &mut rx, row, Some(&mut status)).await?;
    let after = metrics(admin)?;
    tokio::time::sleep(idle_window()).await;
    let idle = metrics(admin)?;
    row.rss_kib = vm_hwm_kib(controller.pid());
    if let (Some(a), Some(i)) = (&after, &idle) {
        row.idle_requests = Some(total(i) - total(a));
        if total(i) > total(a) {
            row.notes.push(format!(
                "recording-canary requests while idle: {}",
                delta(a, i)
            ));
        }
    }
    match (before, after) {
        (Some(b), Some(a)) => {
            row.requests = Some(total(&a) - total(&b));
            row.notes.push(format!(
                "recording-canary requests (its `recording_canary_api_requests_total`): {}",
                delta(&b, &a)
            ));
        }
        _ => row
            .notes
            .push("recording-canary: no `recording_canary_api_requests_total` in /metrics".into()),
    }
    Ok(())
}

async fn run_naive(ctx: &Ctx, row: &mut Row) -> Res<()> {
    let (ns, _guard) = ctx.namespace("naive", true).await?;
    say(&format!("naive: namespace {ns}"));
    let c = ctx.client.clone();
    ctx.create(
        &Api::<Deployment>::namespaced(c.clone(), &ns),
        deployment("app", "example/app:1"),
    )
    .await?;
    ctx.create(&Api::<Service>::namespaced(c.clone(), &ns), service("app"))
        .await?;
    let host = format!("app.{ns}.svc.cluster.local");
    let drs = Api::<DynamicObject>::namespaced_with(c.clone(), &ns, &destination_rule());
    ctx.create(
        &drs,
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "app"},
               "spec": {"host": host, "subsets": [
                   {"name": STABLE_SUBSET, "labels": {"recordingcanary.dev/role": "stable"}},
                   {"name": RECORDING_SUBSET, "labels": {"recordingcanary.dev/role": "recording"}}]}}),
    )
    .await?;
    let vss = Api::<DynamicObject>::namespaced_with(c.clone(), &ns, &virtual_service());
    ctx.create(
        &vss,
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "app"},
               "spec": {"hosts": ["app"], "http": [{"route": [
                   {"destination": {"host": "app", "subset": STABLE_SUBSET}, "weight": 100},
                   {"destination": {"host": "app", "subset": RECORDING_SUBSET}, "weight": 0}]}]}}),
    )
    .await?;
    let rcs = Api::<DynamicObject>::namespaced_with(c.clone(), &ns, &recording_canary_resource());
    ctx.create(
        &rcs,
        json!({"apiVersion": "recordingcanary.dev/v1alpha1", "kind": "RecordingCanary",
               "metadata": {"name": "app"},
               "spec": {"targetRef": {"name": "app"}, "percent": BASE_PERCENT, "maxReplicas": 1}}),
    )
    .await?;
    let mut tasks = Tasks::default();
    let mut rx = watch_weights(vss, "app", recording_weight, &mut tasks);
    wait_weight(&mut rx, 0, Duration::from_secs(30)).await?;

    let (kproxy, kaddr) = ctx.kubectl_proxy("naive")?;
    let counter = CountingProxy::start(kaddr)?;
    let python = python3()?;
    let script = ctx.repo.join("benches/naive_watcher.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args([&format!("http://{}", counter.addr), &ns, "app", "app"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let out = child.stdout.take().ok_or("naive: no stdout")?;
    let err = child.stderr.take().ok_or("naive: no stderr")?;
    let watcher = Proc { child };
    let out = lines_of(out);
    let err = lines_of(err);
    line_matching(&out, Duration::from_secs(20), |l| l == "watching")
        .ok_or("naive_watcher.py did not open its watch within 20 s")?;
    // Its first event (the canary as it is, at 5 %) costs a GET and a PUT: let those pass first.
    wait_weight(&mut rx, BASE_PERCENT, Duration::from_secs(10)).await?;
    let own_counts = |sig: &str| -> Res<Value> {
        watcher.signal(sig);
        let l = line_matching(&err, Duration::from_secs(10), |l| {
            let counts = l.starts_with("{\"requests\"");
            if !counts {
                eprintln!("naive_watcher.py: {l}");
            }
            counts
        })
        .ok_or("naive_watcher.py did not report its counts")?;
        serde_json::from_str(&l).map_err(|e| format!("{l}: {e}"))
    };
    let own_before = own_counts("USR1")?;
    let proxy_before = counter.snapshot();
    say("naive: watcher running");

    let res = percent_samples(ctx, &ns, &mut rx, row, None).await;
    let own_after = own_counts("USR1");
    let proxy_after = counter.snapshot();
    if res.is_ok() {
        tokio::time::sleep(idle_window()).await;
    }
    row.rss_kib = vm_hwm_kib(watcher.pid());
    let own_idle = own_counts("TERM");
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    if let (Ok(a), Ok(i), true) = (&own_after, &own_idle, res.is_ok()) {
        row.idle_requests = Some(n(i, "requests") - n(a, "requests"));
    }
    if let Ok(a) = &own_after {
        let b = &own_before;
        row.requests = Some(n(a, "requests") - n(b, "requests"));
        row.notes.push(format!(
            "naive requests (its own count): watch {}, get {}, update {}; the counting proxy saw {} ({})",
            n(a, "watch") - n(b, "watch"),
            n(a, "get") - n(b, "get"),
            n(a, "put") - n(b, "put"),
            total(&proxy_after) - total(&proxy_before),
            delta(&proxy_before, &proxy_after)
        ));
    }
    if let Some(k) = vm_hwm_kib(kproxy.pid()) {
        row.notes.push(format!(
            "naive: RSS is the python process; the `kubectl proxy` it needs peaked at {:.1} MiB more",
            k as f64 / 1024.0
        ));
    }
    drop(watcher);
    drop(kproxy);
    drop(tasks);
    ctx.delete_namespace(&ns, Duration::from_secs(60)).await;
    res.and(own_idle.map(|_| ()))
}

/// The real python3 interpreter (not a version manager's shell shim, so that the PID measured is
/// the interpreter's from the start).
fn python3() -> Res<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || p.is_empty() {
        return Err("python3 is required for the naive watcher".into());
    }
    Ok(PathBuf::from(p))
}

async fn run_flagger(ctx: &Ctx, row: &mut Row) -> Res<()> {
    say(&format!(
        "flagger: building or checking {FLAGGER_VERSION} (tests/cluster/build-flagger.sh)"
    ));
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(ctx.repo.join("tests/cluster/build-flagger.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("build-flagger.sh: {e}"))?;
    if !out.status.success() {
        return Err("tests/cluster/build-flagger.sh failed".into());
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    say(&format!("flagger: {} ({:?})", dir.display(), t.elapsed()));
    ctx.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &dir.join("crd.yaml").to_string_lossy(),
    ])?;
    ctx.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "crd/canaries.flagger.app",
        "crd/metrictemplates.flagger.app",
        "crd/alertproviders.flagger.app",
        "--timeout=60s",
    ])?;

    let (ns, _guard) = ctx.namespace("flagger", false).await?;
    say(&format!("flagger: namespace {ns}"));
    let c = ctx.client.clone();
    let deploys = Api::<Deployment>::namespaced(c.clone(), &ns);
    ctx.create(&deploys, deployment("podinfo", "example/podinfo:1.0.0"))
        .await?;

    // Flagger talks to the API server through a counting proxy and `kubectl proxy`.
    let (kproxy, kaddr) = ctx.kubectl_proxy("flagger")?;
    let counter = CountingProxy::start(kaddr)?;
    let kc = ctx.work.join("flagger-kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: p, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: p, user: {{}}}}]\ncontexts: [{{name: p, context: {{cluster: p, user: p}}}}]\n\
             current-context: p\n",
            counter.addr
        ),
    )
    .map_err(|e| format!("{}: {e}", kc.display()))?;
    let port = free_port()?;
    let log = ctx.log_path("flagger");
    let (out, err) = ctx.log_pair("flagger")?;
    let child = Command::new(dir.join("flagger"))
        .arg("-kubeconfig")
        .arg(&kc)
        .args([
            "-mesh-provider",
            "istio",
            "-metrics-server",
            "http://127.0.0.1:9",
            "-control-loop-interval",
            "10s",
            "-namespace",
            &ns,
            "-port",
            &port.to_string(),
            "-log-level",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start flagger: {e}"))?;
    let flagger = Proc { child };
    let res = flagger_phase(ctx, &ns, &flagger, port, &counter, row).await;
    if res.is_err() {
        eprintln!("--- {} (last 40 lines)\n{}", log.display(), tail(&log, 40));
        if let Ok(s) = ctx.kubectl(&["-n", &ns, "describe", "canary", "podinfo"]) {
            eprintln!("--- kubectl describe canary podinfo\n{s}");
        }
    }
    drop(flagger);
    drop(kproxy);
    ctx.delete_namespace(&ns, Duration::from_secs(60)).await;
    res
}

async fn flagger_phase(
    ctx: &Ctx,
    ns: &str,
    flagger: &Proc,
    port: u16,
    counter: &CountingProxy,
    row: &mut Row,
) -> Res<()> {
    let c = ctx.client.clone();
    let canaries = Api::<DynamicObject>::namespaced_with(c.clone(), ns, &flagger_canary());
    ctx.create(
        &canaries,
        json!({"apiVersion": "flagger.app/v1beta1", "kind": "Canary",
               "metadata": {"name": "podinfo"},
               "spec": {
                   "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
                   "progressDeadlineSeconds": 60,
                   "service": {"port": 80},
                   "analysis": {"interval": format!("{}s", FLAGGER_INTERVAL.as_secs()), "threshold": 5, "maxWeight": 50,
                                "stepWeight": 10, "metrics": []}}}),
    )
    .await?;
    let mut tasks = Tasks::default();
    let vss = Api::<DynamicObject>::namespaced_with(c.clone(), ns, &virtual_service());
    let mut rx = watch_weights(vss, "podinfo", flagger_canary_weight, &mut tasks);
    let phase = |v: &Value| {
        v.pointer("/status/phase")
            .and_then(Value::as_str)
            .map(String::from)
    };
    let failed = move |v: &Value| {
        (phase(v).as_deref() == Some("Failed"))
            .then(|| format!("the Canary failed: {}", v["status"]))
    };
    let t = Instant::now();
    wait_object(
        canaries.clone(),
        "podinfo",
        Duration::from_secs(180),
        |v| phase(v).as_deref() == Some("Initialized"),
        failed,
    )
    .await?;
    wait_weight(&mut rx, 0, Duration::from_secs(30)).await?;
    say(&format!(
        "flagger: Canary podinfo Initialized after {:?}",
        t.elapsed()
    ));

    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let own = || {
        http_get(metrics, "/metrics")
            .ok()
            .and_then(|t| metric_sum(&t, "rest_client_requests_total", &["method"]))
    };
    let own_before = own();
    let proxy_before = counter.snapshot();
    let deploys = Api::<Deployment>::namespaced(c.clone(), ns);
    for i in 0..row.wanted {
        // Flagger acts on a tick and the phase just seen was written on one: spread the actions
        // over the tick, (i + 0.5) / n of the way through it, so that the samples do not all
        // catch Flagger at the same point of its cycle.
        tokio::time::sleep(FLAGGER_INTERVAL.mul_f64((i as f64 + 0.5) / row.wanted as f64)).await;
        drain(&mut rx);
        let image = format!("example/podinfo:1.0.{}", i + 1);
        let t0 = Instant::now();
        deploys
            .patch(
                "podinfo",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                    {"name": "podinfo", "image": image}]}}}})),
            )
            .await
            .map_err(|e| format!("patch the Deployment's image: {e}"))?;
        let at = wait_weight(&mut rx, 10, Duration::from_secs(180)).await?;
        row.samples.push(at.duration_since(t0));
        say(&format!(
            "flagger: sample {}/{}: {:?}; waiting for the promotion",
            i + 1,
            row.wanted,
            at.duration_since(t0)
        ));
        wait_object(
            canaries.clone(),
            "podinfo",
            Duration::from_secs(300),
            |v| phase(v).as_deref() == Some("Succeeded"),
            failed,
        )
        .await?;
        say(&format!(
            "flagger: promoted {} after {:?}",
            image,
            t0.elapsed()
        ));
    }
    let own_after = own();
    let proxy_after = counter.snapshot();
    tokio::time::sleep(idle_window()).await;
    let (own_idle, proxy_idle) = (own(), counter.snapshot());
    row.rss_kib = vm_hwm_kib(flagger.pid());
    row.idle_requests = Some(match (&own_after, &own_idle) {
        (Some(a), Some(i)) => total(i) - total(a),
        _ => total(&proxy_idle) - total(&proxy_after),
    });
    row.notes.push(format!(
        "Flagger requests while idle (counting proxy): {}",
        delta(&proxy_after, &proxy_idle)
    ));
    match (own_before, own_after) {
        (Some(b), Some(a)) => {
            row.requests = Some(total(&a) - total(&b));
            row.notes.push(format!(
                "Flagger requests (its `rest_client_requests_total`): {}; the counting proxy saw {}",
                delta(&b, &a),
                total(&proxy_after) - total(&proxy_before)
            ));
        }
        _ => {
            row.requests = Some(total(&proxy_after) - total(&proxy_before));
            row.notes.push(format!(
                "Flagger requests: its /metrics has no `rest_client_requests_total`; counted by the \
                 bench's proxy in front of it: {}",
                delta(&proxy_before, &proxy_after)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn print_table(rows: &[Row]) {
    println!(
        "| tool | user's action | samples | p50 | p90 | p99 | max | RSS MiB (VmHWM) | API requests, measured phase | per sample | idle, requests/min |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let mut s = r.samples.clone();
        s.sort();
        let req = r.requests.map_or("n/a".into(), |n| n.to_string());
        let per = match (r.requests, s.len()) {
            (Some(n), k) if k > 0 => format!("{:.1}", n as f64 / k as f64),
            _ => "n/a".into(),
        };
        let rss = r
            .rss_kib
            .map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0));
        let window = idle_window().as_secs_f64();
        let idle = match r.idle_requests {
            Some(n) if window > 0.0 => format!("{:.1}", n as f64 * 60.0 / window),
            _ => "n/a".into(),
        };
        let samples = if s.len() == r.wanted {
            s.len().to_string()
        } else {
            format!("{} of {}", s.len(), r.wanted)
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.tool,
            r.action,
            samples,
            fmt_dur(percentile(&s, 0.5)),
            fmt_dur(percentile(&s, 0.9)),
            fmt_dur(percentile(&s, 0.99)),
            fmt_dur(s.last().copied()),
            rss,
            req,
            per,
            idle
        );
    }
    println!();
    for r in rows.iter().filter(|r| !r.acks.is_empty()) {
        let mut a = r.acks.clone();
        a.sort();
        println!(
            "- {}: of each sample, the user's own PATCH took p50 {} / p99 {} to return",
            r.tool,
            fmt_dur(percentile(&a, 0.5)),
            fmt_dur(percentile(&a, 0.99)),
        );
    }
    for r in rows {
        for n in &r.notes {
            println!("- {n}");
        }
        if let Some(e) = &r.error {
            println!("- {}: FAILED: {e}", r.tool);
        }
    }
}

fn kubectl_path(repo: &Path) -> PathBuf {
    if let Some(k) = std::env::var_os("RC_KUBECTL") {
        return PathBuf::from(k);
    }
    // The pinned kubectl of tests/cluster/build.sh's cache.
    let lib = repo.join("tests/cluster/lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1" && printf %s "$RC_KUBECTL""#)
        .arg("-")
        .arg(&lib)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .filter(|p| Path::new(p).is_file())
        .map_or_else(|| PathBuf::from("kubectl"), PathBuf::from)
}

#[tokio::main]
async fn main() {
    let Some(kc) = std::env::var_os("RC_E2E_KUBECONFIG") else {
        eprintln!(
            "RC_E2E_KUBECONFIG is not set. Start a cluster and point the bench at it:\n  \
             bash tests/cluster/up.sh rcanary-side\n  \
             export RC_E2E_KUBECONFIG=~/.cache/recording-canary/clusters/rcanary-side/kubeconfig\n  \
             cargo bench --bench side_by_side"
        );
        std::process::exit(2);
    };
    let code = tokio::select! {
        c = run(PathBuf::from(kc)) => c,
        _ = tokio::signal::ctrl_c() => { say("interrupted; cleaning up"); 130 }
    };
    std::process::exit(code);
}

async fn run(kubeconfig: PathBuf) -> i32 {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let samples = env_usize("RC_SIDE_SAMPLES", 30);
    let flagger_samples = env_usize("RC_SIDE_FLAGGER_SAMPLES", 3);
    let tools =
        std::env::var("RC_SIDE_TOOLS").unwrap_or_else(|_| "recording-canary,naive,flagger".into());
    let kubectl = kubectl_path(&repo);
    let client = async {
        let k = Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?;
        let cfg = Config::from_custom_kubeconfig(k, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Client::try_from(cfg).map_err(|e| e.to_string())
    }
    .await;
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", kubeconfig.display());
            return 1;
        }
    };
    let run_id = std::process::id();
    let work = std::env::temp_dir().join(format!("rc-side-{run_id}"));
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("{}: {e}", work.display());
        return 1;
    }
    let ctx = Ctx {
        client,
        kubeconfig,
        kubectl,
        repo,
        work: work.clone(),
        run_id,
    };
    say(&format!(
        "tools {tools}; {samples} samples ({flagger_samples} for Flagger); logs in {}",
        work.display()
    ));
    let started = Instant::now();
    let mut rows = Vec::new();
    for tool in tools.split(',').map(str::trim) {
        let t = Instant::now();
        let (mut row, res) = match tool {
            "recording-canary" => {
                let mut r = Row::new("recording-canary", PERCENT_ACTION, samples);
                let res = run_recording_canary(&ctx, &mut r).await;
                (r, res)
            }
            "naive" => {
                let mut r = Row::new("naive watcher (Python)", PERCENT_ACTION, samples);
                let res = run_naive(&ctx, &mut r).await;
                (r, res)
            }
            "flagger" => {
                let mut r = Row::new(
                    &format!("Flagger {FLAGGER_VERSION}"),
                    "new image in the Deployment",
                    flagger_samples,
                );
                let res = run_flagger(&ctx, &mut r).await;
                (r, res)
            }
            other => {
                eprintln!("RC_SIDE_TOOLS: unknown tool {other:?}");
                return 2;
            }
        };
        if let Err(e) = res {
            say(&format!("{tool}: FAILED: {e}"));
            row.error = Some(e);
        }
        say(&format!("{tool}: done in {:?}", t.elapsed()));
        rows.push(row);
    }
    print_table(&rows);
    println!(
        "\naction → weight 10: from just before the user's write to the first VirtualService revision \
         with weight 10, as seen by a watch; percentiles by nearest rank. Flagger acts on a {}-s \
         tick, so its actions are spread over the tick: the i-th of n is taken (i + 0.5)/n of a \
         tick after the previous promotion. RSS: the tool's peak (VmHWM) over the whole run. API \
         requests: from just before the first action to the end of the last sample, including the \
         way back between samples (percent back to 5; for Flagger the rest of the analysis and the \
         promotion). Idle: the {} s after the last sample, with nothing changing. Total run {:.0} s.",
        FLAGGER_INTERVAL.as_secs(),
        idle_window().as_secs(),
        started.elapsed().as_secs_f64()
    );
    let failed = rows.iter().any(|r| r.error.is_some());
    if failed || std::env::var_os("RC_SIDE_KEEP_LOGS").is_some() {
        say(&format!("logs kept in {}", work.display()));
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    i32::from(failed)
}
