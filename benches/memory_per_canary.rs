//! What the controller keeps per canary, by part: `cargo bench --bench memory_per_canary`.
//!
//! Reads one canary's objects as the API server sent them (`benches/fixtures/`, taken from a
//! local cluster with `kubectl get -o json --show-managed-fields`: a fleet-shaped canary at 20 %,
//! its target and clone Deployments, their pods, the Service, the VirtualService and the
//! DestinationRule), makes `RC_MEM_CANARIES` (1,000) copies under distinct names and namespaces,
//! and feeds them to the same stores, strip functions, index, metrics and Event bookkeeping
//! that the controller uses, the way its watches do (parse the wire JSON, strip, keep). A
//! counting allocator measures what each part keeps: the bytes asked for, the bytes glibc's
//! malloc hands out for them (16-byte chunks with an 8-byte header, 32 at least), and the number
//! of allocations. What it leaves out: kube's controller queue (a reference per canary while
//! one is pending), the freshness tracker (a few records per canary, only while a write's echo
//! is awaited), and the memory of requests in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;

use recording_canary::api::MeshKind;
use recording_canary::api::{RecordingCanary, RecordingCanaryStatus};
use recording_canary::cache::Selective;
use recording_canary::cache::index::{Index, MeshRefs};
use recording_canary::controller::events::Series;
use recording_canary::controller::strip_mesh;
use recording_canary::facts::deployments::DeploymentFacts;
use recording_canary::facts::mesh::MeshObject;
use recording_canary::facts::pods::PodFacts;
use recording_canary::facts::services::ServiceFacts;
use recording_canary::runtime::metrics::Metrics;

struct Counting;

static ASKED: AtomicUsize = AtomicUsize::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// What glibc's malloc takes for `size` bytes (below its mmap threshold).
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

#[allow(unsafe_code)] // a GlobalAlloc is unsafe by definition; it forwards to System
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ASKED.fetch_add(l.size(), Relaxed);
        CHUNKS.fetch_add(chunk(l.size()), Relaxed);
        LIVE.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract is passed through unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        ASKED.fetch_sub(l.size(), Relaxed);
        CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
        LIVE.fetch_sub(1, Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ASKED.fetch_add(new, Relaxed);
        ASKED.fetch_sub(l.size(), Relaxed);
        CHUNKS.fetch_add(chunk(new), Relaxed);
        CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Clone, Copy)]
struct Usage {
    asked: usize,
    chunks: usize,
    live: usize,
}

fn usage() -> Usage {
    Usage {
        asked: ASKED.load(Relaxed),
        chunks: CHUNKS.load(Relaxed),
        live: LIVE.load(Relaxed),
    }
}

const FIXTURES: [&str; 8] = [
    "canary",
    "target",
    "clone",
    "service",
    "target-pod",
    "clone-pod",
    "virtualservice",
    "destinationrule",
];
const FIXTURE_NAME: &str = "app-0001";
const FIXTURE_UID: &str = "5d856417-e51d-4728-bb0c-5dc6f92f5835";

/// One canary's objects as JSON text, renamed for canary `i` (names of the same length).
fn objects_of(fixtures: &[String], i: usize, namespaces: usize) -> Vec<Vec<u8>> {
    let name = format!("a{i:07}");
    let ns = format!("n{:03}", i % namespaces);
    let uid = format!("{i:08x}{}", &FIXTURE_UID[8..]);
    fixtures
        .iter()
        .map(|f| {
            f.replace(FIXTURE_NAME, &name)
                .replace(FIXTURE_UID, &uid)
                .replace("\"f1\"", &format!("\"{ns}\""))
                .replace("\"f1/", &format!("\"{ns}/"))
                .replace(".f1.svc", &format!(".{ns}.svc"))
                .into_bytes()
        })
        .collect()
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> T {
    match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fixture {what} does not parse: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let n: usize = std::env::var("RC_MEM_CANARIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let namespaces = 100.min(n).max(1);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fixtures");
    let fixtures: Vec<String> = FIXTURES
        .iter()
        .map(|f| {
            std::fs::read_to_string(format!("{dir}/{f}.json")).unwrap_or_else(|e| {
                eprintln!("{dir}/{f}.json: {e}");
                std::process::exit(1);
            })
        })
        .collect();
    println!(
        "inline sizes (bytes): ObjectMeta {}, RecordingCanary {}, DeploymentFacts {}, ServiceFacts {}, PodFacts {}, MeshObject {}",
        size_of::<kube::api::ObjectMeta>(),
        size_of::<RecordingCanary>(),
        size_of::<DeploymentFacts>(),
        size_of::<ServiceFacts>(),
        size_of::<PodFacts>(),
        size_of::<MeshObject>()
    );
    let wire: Vec<Vec<Vec<u8>>> = (0..n)
        .map(|i| objects_of(&fixtures, i, namespaces))
        .collect();
    println!(
        "memory per canary: {n} canaries in {namespaces} namespaces; the wire JSON of one canary's objects: {} bytes",
        wire[0].iter().map(Vec::len).sum::<usize>()
    );

    let mut rows: Vec<(&str, Usage)> = Vec::new();
    let mut measure = |what: &'static str, f: &mut dyn FnMut()| {
        let before = usage();
        f();
        let after = usage();
        rows.push((
            what,
            Usage {
                asked: after.asked - before.asked,
                chunks: after.chunks - before.chunks,
                live: after.live - before.live,
            },
        ));
    };

    let (canaries, mut canary_writer) = reflector::store::<RecordingCanary>();
    measure("RecordingCanary (kube's reflector store)", &mut || {
        for w in &wire {
            let mut c: RecordingCanary = parse(&w[0], "canary");
            c.metadata.managed_fields = None;
            canary_writer.apply_watcher_event(&Event::Apply(c));
        }
    });
    let mut index = Index::default();
    index.watches_started();
    index.pods_watch_started();
    measure(
        "the index (canary, Service selector, VS and DR)",
        &mut || {
            for c in canaries.state() {
                index.upsert(&c);
            }
            for w in &wire {
                let s: ServiceFacts = parse(&w[3], "service");
                let sel = Some(s.selector());
                index.service_seen(&s.namespace().unwrap_or_default(), &s.name_any(), sel);
                for (kind, j) in [
                    (MeshKind::VirtualService, 6),
                    (MeshKind::DestinationRule, 7),
                ] {
                    let o: DynamicObject = parse(&w[j], "mesh object");
                    let spec = o.data.get("spec").cloned().unwrap_or_default();
                    let refs = MeshRefs::of(&o.metadata, &spec, kind, "cluster.local");
                    index.mesh_seen(
                        (kind, o.namespace().unwrap_or_default(), o.name_any()),
                        Some(refs),
                    );
                }
            }
        },
    );
    let deployments = Selective::<DeploymentFacts>::default();
    measure(
        "Deployments, target and clone (DeploymentFacts)",
        &mut || {
            for w in &wire {
                for j in [1, 2] {
                    let mut d: DeploymentFacts = parse(&w[j], "Deployment");
                    d.strip_lag();
                    deployments.apply(&Event::Apply(d), |_| true);
                }
            }
        },
    );
    let services = Selective::<ServiceFacts>::default();
    measure("Service (ServiceFacts)", &mut || {
        for w in &wire {
            let mut s: ServiceFacts = parse(&w[3], "service");
            s.strip();
            services.apply(&Event::Apply(s), |_| true);
        }
    });
    let pods = Selective::<PodFacts>::default();
    measure("pods, one of each Deployment (PodFacts)", &mut || {
        for w in &wire {
            for j in [4, 5] {
                let mut p: PodFacts = parse(&w[j], "pod");
                p.strip();
                pods.apply(&Event::Apply(p), |_| true);
            }
        }
    });
    let virtual_services = Selective::<MeshObject>::default();
    let destination_rules = Selective::<MeshObject>::default();
    measure(
        "VirtualService and DestinationRule (MeshObject)",
        &mut || {
            for w in &wire {
                for (j, store) in [(6, &virtual_services), (7, &destination_rules)] {
                    let mut o: MeshObject = parse(&w[j], "mesh object");
                    strip_mesh(&mut o);
                    store.apply(&Event::Apply(o), |_| true);
                }
            }
        },
    );
    let metrics = Metrics::default();
    let no_status = RecordingCanaryStatus::default();
    measure("metrics (the per-canary series)", &mut || {
        for c in canaries.state() {
            let status = c.status.as_ref().unwrap_or(&no_status);
            metrics.set_canary(
                &c.namespace().unwrap_or_default(),
                &c.name_any(),
                20,
                status,
            );
        }
    });
    let mut series = Series::default();
    measure("the last Event", &mut || {
        let now = k8s_openapi::jiff::Timestamp::now();
        for c in canaries.state() {
            let key = (c.namespace().unwrap_or_default(), c.name_any());
            series.next(&key, 1, now, || {
                format!("{}.{:x}", key.1, 0x1234_5678_9abc_u64)
            });
        }
    });

    let total = rows.iter().fold((0, 0, 0), |t, (_, u)| {
        (t.0 + u.asked, t.1 + u.chunks, t.2 + u.live)
    });
    println!();
    println!("| part | bytes asked / canary | malloc chunks / canary | allocations / canary |");
    println!("| --- | ---: | ---: | ---: |");
    for (what, u) in &rows {
        println!(
            "| {what} | {:.0} | {:.0} | {:.1} |",
            u.asked as f64 / n as f64,
            u.chunks as f64 / n as f64,
            u.live as f64 / n as f64
        );
    }
    println!(
        "| **total** | {:.0} | {:.0} | {:.1} |",
        total.0 as f64 / n as f64,
        total.1 as f64 / n as f64,
        total.2 as f64 / n as f64
    );
    // Keep everything alive until the figures are printed.
    drop((
        canaries,
        deployments,
        services,
        pods,
        virtual_services,
        destination_rules,
        metrics,
        series,
        index,
    ));
}
