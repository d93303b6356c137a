//! The harness every end-to-end test uses: a fresh namespace, its own controller process, the
//! make-before-break watcher, kubectl and kube-rs helpers, and deadline-bound waits.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;

use crate::mbb::MakeBeforeBreak;
use crate::{controller_bin, repo_dir, target_dir};

/// Default deadline of a wait.
pub const WAIT: Duration = Duration::from_secs(60);
/// Interval between two polls of a wait.
const POLL: Duration = Duration::from_millis(250);

pub const ROLE_LABEL: &str = "recordingcanary.dev/role";
pub const STABLE_SUBSET: &str = "rcanary-stable";
pub const RECORDING_SUBSET: &str = "rcanary-recording";
pub const RESTORE_ANNOTATION: &str = "recordingcanary.dev/restore";
pub const SIDECAR_ANNOTATION: &str = "sidecar.speedscale.com/inject";
pub const CLONE: &str = "frontend-recording";
/// The VirtualService and DestinationRule the controller creates for canary `frontend`.
pub const OWNED: &str = "frontend-recording";

/// The cluster the tests run against, from the environment.
#[derive(Clone, Debug)]
pub struct Env {
    pub kubeconfig: PathBuf,
    pub kubectl: String,
}

impl Env {
    /// Reads RC_E2E_KUBECONFIG and RC_KUBECTL. Fails the test (never skips) when no cluster is given.
    pub fn from_env() -> Self {
        let kubeconfig = match std::env::var_os("RC_E2E_KUBECONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => panic!(
                "RC_E2E_KUBECONFIG is not set: these end-to-end tests need a Kubernetes cluster with the \
                 Istio and RecordingCanary CRDs. Run `bash tests/run.sh`, or start a cluster with \
                 `bash tests/cluster/up.sh` and export RC_E2E_KUBECONFIG=<its kubeconfig> \
                 (and RC_KUBECTL=<kubectl>, default `kubectl`)"
            ),
        };
        assert!(
            kubeconfig.is_file(),
            "RC_E2E_KUBECONFIG={} is not a readable file: run `bash tests/run.sh`, or start a cluster with \
             `bash tests/cluster/up.sh` and export RC_E2E_KUBECONFIG=<its kubeconfig>",
            kubeconfig.display()
        );
        let kubectl = std::env::var("RC_KUBECTL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "kubectl".to_string());
        Self {
            kubeconfig,
            kubectl,
        }
    }
}

/// Output of one kubectl call.
#[derive(Debug)]
pub struct KubectlOutput {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn example(rel: &str) -> PathBuf {
    repo_dir().join("examples/istio").join(rel)
}

/// Five random characters of `[a-z0-9]` for a run's namespaces and names.
pub fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    let mut n = h.finish();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..5)
        .map(|_| {
            let c = alphabet[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect()
}

pub fn vs_resource() -> ApiResource {
    istio_resource("VirtualService", "virtualservices")
}

pub fn dr_resource() -> ApiResource {
    istio_resource("DestinationRule", "destinationrules")
}

fn istio_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn canary_resource() -> ApiResource {
    ApiResource {
        group: "recordingcanary.dev".into(),
        version: "v1alpha1".into(),
        api_version: "recordingcanary.dev/v1alpha1".into(),
        kind: "RecordingCanary".into(),
        plural: "recordingcanaries".into(),
    }
}

/// A kube client for the test cluster.
pub async fn client(env: &Env) -> Client {
    let kc = Kubeconfig::read_from(&env.kubeconfig)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", env.kubeconfig.display()));
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", env.kubeconfig.display()));
    Client::try_from(cfg).expect("kube client")
}

/// A controller process; killed (SIGKILL) when dropped.
pub struct ControllerProcess {
    child: Child,
}

impl ControllerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crashed or evicted controller would go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = StdCommand::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {} failed", self.pid());
    }

    /// Waits at most `timeout` for the process to exit; its exit code, if it did.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a namespace, a controller watching it, and the make-before-break watcher.
pub struct Harness {
    pub env: Env,
    pub ns: String,
    pub client: Client,
    pub log: PathBuf,
    pub mbb: MakeBeforeBreak,
    controller: Option<ControllerProcess>,
    delete_namespace: bool,
    /// Faults this test injected (kills, pauses, deletions by "someone else", reverts...), by
    /// kind.
    faults: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

/// The arguments of a controller that watches only `ns`, without leader election.
pub fn controller_args(ns: &str) -> Vec<String> {
    [
        "run",
        "--namespace",
        ns,
        "--leader-elect=false",
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The arguments of a controller that watches only `ns` and leads through Lease `lease` there.
pub fn elected_controller_args(ns: &str, lease: &str) -> Vec<String> {
    [
        "run",
        "--namespace",
        ns,
        "--leader-elect=true",
        "--lease-namespace",
        ns,
        "--lease-name",
        lease,
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Harness {
    /// Creates namespace `rc-<short>-<random>`, starts the watcher and then the controller.
    pub async fn start(short: &str) -> Self {
        let mut h = Self::start_without_controller(short).await;
        let args = controller_args(&h.ns);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let kubeconfig = h.env.kubeconfig.clone();
        let child = h.spawn_controller("", &args, &kubeconfig);
        h.controller = Some(child);
        h
    }

    /// Like [`Harness::start`], but the test starts its controllers itself
    /// ([`Harness::spawn_controller`]).
    pub async fn start_without_controller(short: &str) -> Self {
        let env = Env::from_env();
        let ns = format!("rc-{short}-{}", random_suffix());
        assert!(ns.len() <= 63, "namespace name {ns} is too long");
        let client = client(&env).await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let nsobj: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            // istio-injection: the cluster's stand-in for Istio's injector labels the pods.
            "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "recording-canary-e2e", "istio-injection": "enabled"}},
        }))
        .expect("namespace object");
        namespaces
            .create(&Default::default(), &nsobj)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {ns}: {e}"));

        let mbb = MakeBeforeBreak::start(client.clone(), &ns).await;

        let logs = target_dir().join("e2e-logs");
        std::fs::create_dir_all(&logs).expect("create target/e2e-logs");
        let log = logs.join(format!("{ns}.log"));
        Self {
            env,
            ns,
            client,
            log,
            mbb,
            controller: None,
            delete_namespace: true,
            faults: Default::default(),
        }
    }

    /// Starts a controller process (the binary cargo built) with `args` and `kubeconfig`; its
    /// log goes to `target/e2e-logs/<ns>[-<tag>].log`. It is killed when the handle is dropped.
    pub fn spawn_controller(
        &self,
        tag: &str,
        args: &[&str],
        kubeconfig: &std::path::Path,
    ) -> ControllerProcess {
        self.spawn_controller_with(tag, args, kubeconfig, &[])
    }

    /// [`Harness::spawn_controller`] with extra environment variables (`FAILPOINTS`, say: the
    /// e2e tests are built with the `failpoints` feature).
    pub fn spawn_controller_with(
        &self,
        tag: &str,
        args: &[&str],
        kubeconfig: &std::path::Path,
        env: &[(&str, &str)],
    ) -> ControllerProcess {
        let log = if tag.is_empty() {
            self.log.clone()
        } else {
            self.log.with_file_name(format!("{}-{tag}.log", self.ns))
        };
        let log_file = File::create(&log).expect("create controller log");
        let out_file = log_file.try_clone().expect("clone log handle");
        let child = StdCommand::new(controller_bin())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,recording_canary=debug")
            .env("NO_COLOR", "1")
            .env_remove("RC_NAMESPACES")
            .env_remove("RC_LEADER_ELECT")
            .env_remove("RC_ADMIN_ADDR")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("FAILPOINTS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_file))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start the controller binary");
        eprintln!(
            "[e2e] namespace {}; controller{} pid {}; log {}",
            self.ns,
            if tag.is_empty() {
                String::new()
            } else {
                format!(" {tag}")
            },
            child.id(),
            log.display()
        );
        ControllerProcess { child }
    }

    /// The namespace is deleted by the test itself.
    pub fn namespace_deleted_by_test(&mut self) {
        self.delete_namespace = false;
    }

    /// Runs kubectl in the test namespace.
    pub async fn kubectl(&self, args: &[&str]) -> KubectlOutput {
        let out = tokio::process::Command::new(&self.env.kubectl)
            .arg("--kubeconfig")
            .arg(&self.env.kubeconfig)
            .args(["-n", &self.ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {} (RC_KUBECTL): {e}", self.env.kubectl));
        KubectlOutput {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs kubectl and fails the test unless it succeeds; returns stdout.
    pub async fn k(&self, args: &[&str]) -> String {
        let o = self.kubectl(args).await;
        assert!(
            o.ok,
            "`kubectl -n {} {}` failed (exit {:?}):\n{}{}",
            self.ns,
            args.join(" "),
            o.code,
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    /// `kubectl apply -f examples/istio/<rel>`.
    pub async fn apply_example(&self, rel: &str) {
        let path = example(rel);
        self.k(&["apply", "-f", path.to_str().expect("utf-8 path")])
            .await;
    }

    /// Writes `yaml` to a file next to the controller log and returns its path.
    pub fn manifest(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.log.with_file_name(format!("{}-{name}.yaml", self.ns));
        std::fs::write(&p, yaml).expect("write manifest");
        p
    }

    /// `kubectl patch rcanary <name> --type merge -p <patch>`.
    pub async fn patch_canary(&self, name: &str, patch: &Value) {
        self.k(&[
            "patch",
            "rcanary",
            name,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ])
        .await;
    }

    /// app.yaml, then `canary_example`, then propagationDelay patched to 1s.
    pub async fn app_and_canary(&self, canary_example: &str) {
        self.apply_example("app.yaml").await;
        self.apply_example(canary_example).await;
        self.patch_canary(
            "frontend",
            &serde_json::json!({"spec": {"propagationDelay": "1s"}}),
        )
        .await;
    }

    /// `kubectl wait --for=condition=Ready rcanary/<name> --timeout=60s`, which must succeed.
    pub async fn wait_ready(&self, name: &str) {
        let target = format!("rcanary/{name}");
        let o = self
            .kubectl(&["wait", "--for=condition=Ready", &target, "--timeout=60s"])
            .await;
        assert!(
            o.ok,
            "`kubectl wait --for=condition=Ready {target}` exited with {:?}: {}{}\nstatus: {}",
            o.code,
            o.stdout,
            o.stderr,
            self.canary(name)
                .await
                .map(|c| c["status"].to_string())
                .unwrap_or_else(|| "(gone)".into())
        );
    }

    pub fn vs_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &vs_resource())
    }

    pub fn dr_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &dr_resource())
    }

    pub fn canary_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &canary_resource())
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn vs(&self, name: &str) -> Option<Value> {
        get_json(&self.vs_api(), name).await
    }

    pub async fn dr(&self, name: &str) -> Option<Value> {
        get_json(&self.dr_api(), name).await
    }

    pub async fn canary(&self, name: &str) -> Option<Value> {
        get_json(&self.canary_api(), name).await
    }

    pub async fn deployment(&self, name: &str) -> Option<Deployment> {
        self.deployments()
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("get deployment {name}: {e}"))
    }

    pub async fn pods(&self, selector: Option<&str>) -> Vec<Pod> {
        let lp = match selector {
            Some(s) => ListParams::default().labels(s),
            None => ListParams::default(),
        };
        self.pods_api()
            .list(&lp)
            .await
            .unwrap_or_else(|e| panic!("list pods: {e}"))
            .items
    }

    /// Polls `probe` until it returns `Some`, at most `timeout`; fails the test with `what` and
    /// the last value `describe` produced otherwise.
    pub async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match probe().await {
                Ok(v) => return v,
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nlast observed: {last}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (at most 60 s) until canary `name` is part-way up its ramp to `target` percent;
    /// returns where it is.
    pub async fn wait_ramp_under_way(&self, name: &str, target: i64) -> i64 {
        self.until(
            &format!("the ramp to be under way (0 < currentPercent < {target})"),
            WAIT,
            || async {
                let c = self.canary(name).await.ok_or("rcanary is gone")?;
                let cur = c["status"]["currentPercent"].as_i64().unwrap_or(0);
                if cur > 0 && cur < target {
                    Ok(cur)
                } else {
                    Err(c["status"].to_string())
                }
            },
        )
        .await
    }

    /// Waits until the canary's status is for its current generation and has `phase` and `current`.
    pub async fn wait_status(&self, name: &str, phase: &str, current: i64) -> Value {
        self.until(
            &format!(
                "rcanary/{name} phase {phase}, currentPercent {current}, observedGeneration current"
            ),
            WAIT,
            || async {
                let c = self.canary(name).await.ok_or("rcanary is gone")?;
                let st = &c["status"];
                let ok = st["phase"] == phase
                    && st["currentPercent"].as_i64() == Some(current)
                    && st["observedGeneration"] == c["metadata"]["generation"];
                if ok { Ok(c) } else { Err(st.to_string()) }
            },
        )
        .await
    }

    /// Waits until `name` of the given API is gone.
    pub async fn wait_gone(
        &self,
        api: &Api<DynamicObject>,
        what: &str,
        name: &str,
        timeout: Duration,
    ) {
        self.until(&format!("{what} {name} to be gone"), timeout, || async {
            match get_json(api, name).await {
                None => Ok(()),
                Some(v) => Err(format!(
                    "still there: deletionTimestamp={} finalizers={}",
                    v["metadata"]["deletionTimestamp"], v["metadata"]["finalizers"]
                )),
            }
        })
        .await
    }

    /// What the namespace looks like, for failure messages.
    pub async fn describe(&self) -> String {
        let mut s = String::new();
        for args in [
            &[
                "get",
                "rcanary,deployment,virtualservice,destinationrule",
                "-o",
                "wide",
            ][..],
            &["get", "pods", "-L", ROLE_LABEL][..],
            &["get", "rcanary", "-o", "yaml"][..],
        ] {
            let o = self.kubectl(args).await;
            s.push_str(&format!(
                "--- kubectl -n {} {}\n{}{}",
                self.ns,
                args.join(" "),
                o.stdout,
                o.stderr
            ));
        }
        s
    }

    /// Counts `n` faults injected by this test, for the safety summary, under the kind named
    /// after the calling test module (`fault_matrix`, `ha`...; see
    /// [`Harness::faults_injected_of_kind`] to name the kind).
    #[track_caller]
    pub fn faults_injected(&self, n: usize) {
        let file = std::panic::Location::caller().file();
        let module = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("e2e");
        self.faults_injected_of_kind(module, n);
    }

    /// Counts `n` faults of `kind` (e.g. `endpoints-held-back`) injected by this test.
    pub fn faults_injected_of_kind(&self, kind: &str, n: usize) {
        *self
            .faults
            .lock()
            .expect("faults")
            .entry(kind.to_string())
            .or_default() += n;
    }

    /// Records figures of a make-before-break check that the test ran itself (instead of
    /// [`Harness::finish`]), `violations` being those it did not expect. The EndpointSlice and
    /// wait figures are those of the watcher's last check.
    pub fn record_checked(&self, vs_revisions: usize, dr_revisions: usize, violations: usize) {
        let last = self.mbb.last_counts();
        let report = crate::mbb::Report {
            vs_revisions,
            dr_revisions,
            eps_revisions: last.eps_revisions,
            endpoint_checks: last.endpoint_checks,
            waits_checked: last.waits_checked,
            waits_by_istio: last.waits_by_istio,
            violations: vec![String::new(); violations],
            timeline: String::new(),
        };
        record_safety(&self.ns, &self.faults.lock().expect("faults"), &report);
    }

    /// Ends the test: checks make-before-break (subsets defined before routes and kept after
    /// them, weight only on subsets with a Ready endpoint, the waits of the canary's
    /// `propagationDelay`) over every revision seen, prints the figures, records them for the
    /// safety summary, and (when `split_expected`) requires that VirtualService revisions were
    /// seen at all.
    pub async fn finish(&mut self, split_expected: bool) {
        let report = self.mbb.check(&self.vs_api(), &self.dr_api()).await;
        record_safety(&self.ns, &self.faults.lock().expect("faults"), &report);
        let figures = format!(
            "checked {} VirtualService revisions, {} DestinationRule revisions, {} EndpointSlice \
             revisions, {} weights against Ready endpoints, {} waits ({} ended by Istio's report)",
            report.vs_revisions,
            report.dr_revisions,
            report.eps_revisions,
            report.endpoint_checks,
            report.waits_checked,
            report.waits_by_istio
        );
        println!("make-before-break: {figures}");
        eprintln!("[e2e] {}: make-before-break: {figures}", self.ns);
        assert!(
            report.violations.is_empty(),
            "make-before-break violated ({} times):\n{}\nrevisions:\n{}",
            report.violations.len(),
            report.violations.join("\n"),
            report.timeline
        );
        if split_expected {
            assert!(
                report.vs_revisions > 0,
                "the watcher saw no VirtualService revision although the test split traffic"
            );
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let Ok(f) = File::open(&self.log) else {
            return format!("(no log at {})", self.log.display());
        };
        let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        let start = all.len().saturating_sub(lines);
        all[start..].join("\n")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.mbb.stop();
        // Stop the controller first, so that the log is complete when printed.
        drop(self.controller.take());
        if std::thread::panicking() {
            eprintln!(
                "\n===== [e2e] test in namespace {} failed; last 150 lines of the controller log ({}):\n{}\n===== end of controller log\n",
                self.ns,
                self.log.display(),
                self.log_tail(150)
            );
        }
        if self.delete_namespace {
            let kubectl = |args: &[&str]| {
                StdCommand::new(&self.env.kubectl)
                    .arg("--kubeconfig")
                    .arg(&self.env.kubeconfig)
                    .args(["-n", &self.ns])
                    .args(args)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            // No controller runs any more to remove the finalizer of a canary left over; without
            // this the namespace would stay Terminating forever.
            let left = kubectl(&["get", "rcanary", "-o", "name"]);
            for c in left.lines().filter(|l| !l.trim().is_empty()) {
                kubectl(&[
                    "patch",
                    c.trim(),
                    "--type",
                    "merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ]);
            }
            kubectl(&[
                "delete",
                "namespace",
                &self.ns,
                "--wait=false",
                "--ignore-not-found",
            ]);
        }
    }
}

/// Appends this test's make-before-break figures to `target/e2e-logs/safety.jsonl`, which
/// tests/run.sh sums up into the safety summary (the README's Safety section).
fn record_safety(
    ns: &str,
    faults: &std::collections::BTreeMap<String, usize>,
    report: &crate::mbb::Report,
) {
    use std::io::Write;
    let line = serde_json::json!({
        "namespace": ns,
        "faults": faults.values().sum::<usize>(),
        "faults_by_kind": faults,
        "vs_revisions": report.vs_revisions,
        "dr_revisions": report.dr_revisions,
        "eps_revisions": report.eps_revisions,
        "endpoint_checks": report.endpoint_checks,
        "waits_checked": report.waits_checked,
        "waits_by_istio": report.waits_by_istio,
        "violations": report.violations.len(),
    });
    let path = target_dir().join("e2e-logs").join("safety.jsonl");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("[e2e] cannot append to {}: {e}", path.display());
    }
}

/// An object as JSON, or `None` when it does not exist.
pub async fn get_json(api: &Api<DynamicObject>, name: &str) -> Option<Value> {
    let obj = api
        .get_opt(name)
        .await
        .unwrap_or_else(|e| panic!("get {name}: {e}"))?;
    Some(serde_json::to_value(obj).expect("object as JSON"))
}

/// One `route` item: (destination host, subset, weight).
pub type Dest = (String, Option<String>, Option<i64>);

/// Every `route` destination of every HTTP route, per route.
pub fn http_destinations(vs: &Value) -> Vec<Vec<Dest>> {
    vs.pointer("/spec/http")
        .and_then(Value::as_array)
        .map(|routes| {
            routes
                .iter()
                .map(|r| {
                    r.get("route")
                        .and_then(Value::as_array)
                        .map(|ds| {
                            ds.iter()
                                .map(|d| {
                                    (
                                        d.pointer("/destination/host")
                                            .and_then(Value::as_str)
                                            .unwrap_or_default()
                                            .to_string(),
                                        d.pointer("/destination/subset")
                                            .and_then(Value::as_str)
                                            .map(String::from),
                                        d.get("weight").and_then(Value::as_i64),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The weights of the stable and recording subsets in the first route that has both.
pub fn split_weights(vs: &Value) -> Option<(i64, i64)> {
    http_destinations(vs).into_iter().find_map(|ds| {
        let w = |s: &str| {
            ds.iter()
                .find(|d| d.1.as_deref() == Some(s))
                .map(|d| d.2.unwrap_or(0))
        };
        Some((w(STABLE_SUBSET)?, w(RECORDING_SUBSET)?))
    })
}

/// The pod's labels (empty when none).
pub fn labels(p: &Pod) -> std::collections::BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

/// Whether the pod is controlled by a ReplicaSet `<deployment>-<its pod-template-hash>`.
pub fn pod_of(p: &Pod, deployment: &str) -> bool {
    let Some(hash) = labels(p).get("pod-template-hash").cloned() else {
        return false;
    };
    let rs = format!("{deployment}-{hash}");
    p.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.controller == Some(true) && r.kind == "ReplicaSet" && r.name == rs)
    })
}

pub fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

// ------------------------------------------------------------------------------------------------
// Network and control-plane faults (tests/e2e/netfaults.rs, tests/restart.rs): who holds a Lease,
// what a controller's log says and when, and a kubelet that restarts exited controllers.

/// Who holds Lease `lease` in the test namespace (`None` when nobody, or the apiserver does not
/// answer).
pub async fn lease_holder(h: &Harness, lease: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(h.client.clone(), &h.ns);
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|s| !s.is_empty())
}

/// Waits until the identity holding Lease `lease` is process `pid`'s (it ends with `-<pid>`).
pub async fn wait_for_lease_holder(h: &Harness, lease: &str, pid: u32, timeout: Duration) {
    let suffix = format!("-{pid}");
    h.until(
        &format!("process {pid} to hold the lease {lease}"),
        timeout,
        || async {
            match lease_holder(h, lease).await {
                Some(id) if id.ends_with(&suffix) => Ok(()),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
}

/// The log of the controller started with `tag` in this test (`""`: the harness's own).
pub fn controller_log_text(h: &Harness, tag: &str) -> String {
    let path = if tag.is_empty() {
        h.log.clone()
    } else {
        h.log.with_file_name(format!("{}-{tag}.log", h.ns))
    };
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The time of a controller log line (text format: it starts with an RFC 3339 timestamp).
pub fn log_line_time(line: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    line.split_whitespace().next()?.parse().ok()
}

/// When the controller logged each line that contains `needle`, in order.
pub fn logged_at(log: &str, needle: &str) -> Vec<k8s_openapi::jiff::Timestamp> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(log_line_time)
        .collect()
}

/// The line a controller logs just before it sends each write (src/controller/writers.rs).
pub const WRITE_LINE: &str = "applying action=";

/// The first line of a controller's log that says it missed its renew deadline (src/runtime/lease.rs),
/// and every write it logged after that line.
pub fn writes_after_the_deadline(
    log: &str,
) -> (
    Option<k8s_openapi::jiff::Timestamp>,
    Vec<k8s_openapi::jiff::Timestamp>,
) {
    let deadline = logged_at(log, "renew deadline").first().copied();
    let after = deadline
        .map(|d| {
            logged_at(log, WRITE_LINE)
                .into_iter()
                .filter(|w| *w > d)
                .collect()
        })
        .unwrap_or_default();
    (deadline, after)
}

/// An elected controller that exited (`exit`, `since` the fault began) stepped down cleanly: a
/// non-zero exit, its log says it missed its renew deadline, and it sent no write after that.
pub fn assert_clean_step_down(h: &Harness, exit: &Exit, since: Instant) {
    let log = controller_log_text(h, &exit.tag);
    let (deadline, late) = writes_after_the_deadline(&log);
    assert!(
        exit.code.is_some_and(|c| c != 0) && deadline.is_some() && late.is_empty(),
        "run {} (pid {}) exited {:?} {:?} after the fault began without a clean step-down \
         (deadline line {deadline:?}, writes after it {late:?}):\n{log}",
        exit.tag,
        exit.pid,
        exit.code,
        exit.at.duration_since(since)
    );
}

/// One exit of a process the [`Kubelet`] runs.
#[derive(Debug, Clone)]
pub struct Exit {
    pub tag: String,
    pub pid: u32,
    pub code: Option<i32>,
    pub at: Instant,
}

#[derive(Debug, Default)]
struct KubeletState {
    pid: Option<u32>,
    exits: Vec<Exit>,
}

/// Plays the kubelet for one controller "pod": starts the process, and after it exits starts it
/// again after a back-off that doubles from `backoff` (the kubelet's crash-loop back-off starts at
/// 10 s). Each run logs to `<ns>-<tag>-<n>.log`. The process is killed when this is dropped.
pub struct Kubelet {
    state: std::sync::Arc<std::sync::Mutex<KubeletState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Dropping the task's future drops (SIGKILLs) the process it runs.
        self.task.abort();
    }
}

impl Kubelet {
    pub fn start(
        h: &Harness,
        tag: &str,
        args: &[String],
        kubeconfig: &Path,
        backoff: Duration,
    ) -> Self {
        let state = std::sync::Arc::new(std::sync::Mutex::new(KubeletState::default()));
        let (ns, log, tag) = (h.ns.clone(), h.log.clone(), tag.to_string());
        let (args, kubeconfig) = (args.to_vec(), kubeconfig.to_path_buf());
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let mut wait = backoff;
                for run in 0.. {
                    let run_tag = format!("{tag}-{run}");
                    let log = log.with_file_name(format!("{ns}-{run_tag}.log"));
                    let mut p = spawn_logged(&log, &args, &kubeconfig);
                    let pid = p.pid();
                    eprintln!(
                        "[e2e] namespace {ns}; controller {run_tag} pid {pid}; log {}",
                        log.display()
                    );
                    {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        s.pid = Some(pid);
                    }
                    let status = loop {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            break status;
                        }
                        tokio::time::sleep(POLL).await;
                    };
                    eprintln!(
                        "[e2e] controller {run_tag} (pid {pid}) exited: {status}; restarting in {wait:?}"
                    );
                    {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        s.pid = None;
                        s.exits.push(Exit {
                            tag: run_tag,
                            pid,
                            code: status.code(),
                            at: Instant::now(),
                        });
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(300));
                }
            }
        });
        Self { state, task }
    }

    fn read<T>(&self, f: impl FnOnce(&KubeletState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The pid of the running process, if one runs now.
    pub fn pid(&self) -> Option<u32> {
        self.read(|s| s.pid)
    }

    /// Every exit so far, in order.
    pub fn exits(&self) -> Vec<Exit> {
        self.read(|s| s.exits.clone())
    }
}

/// Starts the controller binary as [`Harness::spawn_controller`] does, logging to `log`.
fn spawn_logged(log: &Path, args: &[String], kubeconfig: &Path) -> ControllerProcess {
    let log_file = File::create(log).expect("create controller log");
    let out_file = log_file.try_clone().expect("clone log handle");
    let child = StdCommand::new(controller_bin())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,recording_canary=debug")
        .env("NO_COLOR", "1")
        .env_remove("RC_NAMESPACES")
        .env_remove("RC_LEADER_ELECT")
        .env_remove("RC_ADMIN_ADDR")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("start the controller binary");
    ControllerProcess { child }
}
