//! Leader election: two controllers, one Lease; the standby takes over when the leader dies.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use recording_canary::runtime::shard::Shard;
use serde_json::json;

use crate::support::{Harness, OWNED, elected_controller_args, split_weights};

const LEASE: &str = "rc-e2e-ha";

/// Waits until the identity holding Lease `lease` ends with `id_suffix` (`-<pid>`).
async fn wait_for_holder(h: &Harness, lease: &str, who: &str, id_suffix: &str, timeout: Duration) {
    h.until(
        &format!("controller {who} to hold the lease {lease}"),
        timeout,
        || async {
            match holder_of(h, lease).await {
                Some(id) if id.ends_with(id_suffix) => Ok(()),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_is_killed_and_finishes_the_ramp() {
    let mut h = Harness::start_without_controller("ha").await;
    let ns = h.ns.clone();
    let args = elected_controller_args(&ns, LEASE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = h.env.kubeconfig.clone();
    let mut a = h.spawn_controller("a", &args, &kubeconfig);
    let a_id = format!("-{}", a.pid());
    wait_for_holder(&h, LEASE, "a", &a_id, Duration::from_secs(30)).await;
    let b = h.spawn_controller("b", &args, &kubeconfig);
    let b_id = format!("-{}", b.pid());

    // A ramp to 50% in steps of 10 every 3 s.
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "3s"}}}),
    )
    .await;
    let at_kill = h.wait_ramp_under_way("frontend", 50).await;
    assert_eq!(
        holder_of(&h, LEASE).await.map(|id| id.ends_with(&a_id)),
        Some(true),
        "b must not lead while a lives"
    );

    // SIGKILL the leader mid-ramp: it cannot release the lease.
    a.kill();
    h.faults_injected(1);
    let killed = Instant::now();
    wait_for_holder(&h, LEASE, "b", &b_id, Duration::from_secs(45)).await;
    let takeover = killed.elapsed();
    println!("leader killed at {at_kill}%; standby took the lease after {takeover:?}");
    assert!(
        takeover <= Duration::from_secs(30),
        "takeover took {takeover:?}, the lease lasts 15 s"
    );

    // The standby finishes the ramp.
    h.wait_status("frontend", "Ready", 50).await;
    // Its caches were warm: it wrote as soon as it led.
    let log =
        std::fs::read_to_string(h.log.with_file_name(format!("{ns}-b.log"))).unwrap_or_default();
    let first_write = takeover_to_first_write(&log)
        .unwrap_or_else(|| panic!("the standby logged no write after it began leading:\n{log}"));
    println!("standby: from leading to its first write {first_write:?}");
    eprintln!(
        "[e2e] {ns}: standby took the lease {takeover:?} after the kill; first write {first_write:?} after leading"
    );
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    drop(b);
    h.finish(true).await;
}

/// The time of a log line (text format: it starts with an RFC 3339 timestamp).
fn log_time(line: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    line.split_whitespace().next()?.parse().ok()
}

/// In a controller's log: from the line saying it leads to its first write after that.
fn takeover_to_first_write(log: &str) -> Option<Duration> {
    let mut lines = log.lines().skip_while(|l| !l.contains("leading"));
    let led = log_time(lines.next()?)?;
    let wrote = lines
        .find(|l| l.contains("applying action="))
        .and_then(log_time)?;
    Duration::try_from(wrote.duration_since(led)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_writes_nothing_once_its_renew_deadline_passed() {
    let mut h = Harness::start_without_controller("pause").await;
    let ns = h.ns.clone();
    let args = elected_controller_args(&ns, LEASE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = h.env.kubeconfig.clone();
    let mut a = h.spawn_controller("a", &args, &kubeconfig);
    let a_id = format!("-{}", a.pid());
    wait_for_holder(&h, LEASE, "a", &a_id, Duration::from_secs(30)).await;
    let b = h.spawn_controller("b", &args, &kubeconfig);
    let b_id = format!("-{}", b.pid());
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "2s"}}}),
    )
    .await;
    h.wait_ramp_under_way("frontend", 50).await;

    // The leader freezes (a stalled node, a long GC pause, a debugger): it renews nothing.
    a.signal("STOP");
    h.faults_injected(1);
    wait_for_holder(&h, LEASE, "b", &b_id, Duration::from_secs(45)).await;
    let a_log = h.log.with_file_name(format!("{ns}-a.log"));
    let before = std::fs::read_to_string(&a_log).unwrap_or_default().len();
    // It wakes up after the standby took over: its timers and reconciles all fire at once.
    a.signal("CONT");
    let status = a.exited_within(Duration::from_secs(20)).await;
    let after = std::fs::read_to_string(&a_log).unwrap_or_default();
    let woke = after.get(before..).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the old leader must exit (non-zero) once it finds its lease gone; status {status:?}\n{woke}"
    );
    assert!(
        !woke.contains("applying action="),
        "the old leader wrote after it woke up without a fresh lease:\n{woke}"
    );
    assert!(
        woke.contains("renew deadline") || woke.contains("lease: lost"),
        "the old leader's log does not say why it stopped:\n{woke}"
    );
    // The standby finishes the ramp.
    h.wait_status("frontend", "Ready", 50).await;
    drop(b);
    h.finish(true).await;
}

/// Who holds Lease `lease` in the test namespace.
async fn holder_of(h: &Harness, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &h.ns);
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|s| !s.is_empty())
}

/// The arguments of a process of a two-shard fleet scoped to `ns`, its leases named after `base`.
fn shard_args<'a>(ns: &'a str, base: &'a str) -> [&'a str; 12] {
    [
        "run",
        "--namespace",
        ns,
        "--leader-elect=true",
        "--shards",
        "2",
        "--lease-namespace",
        ns,
        "--lease-name",
        base,
        "--admin-addr",
        "127.0.0.1:0",
    ]
}

/// Waits until two different processes hold the leases of shards 0 and 1; their identities.
async fn wait_for_shard_holders(h: &Harness, base: &str) -> [String; 2] {
    h.until(
        "each shard lease to have its own leader",
        Duration::from_secs(60),
        || async {
            let s0 = holder_of(h, &Shard::lease_name(base, 0, 2)).await;
            let s1 = holder_of(h, &Shard::lease_name(base, 1, 2)).await;
            match (s0, s1) {
                (Some(x), Some(y)) if x != y => Ok([x, y]),
                other => Err(format!("holders {other:?}")),
            }
        },
    )
    .await
}

/// A controller's log in this test (`tag` as given to `spawn_controller`).
fn controller_log(h: &Harness, tag: &str) -> String {
    std::fs::read_to_string(h.log.with_file_name(format!("{}-{tag}.log", h.ns))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_take_one_lease_each_and_only_the_namespaces_shard_reconciles_it() {
    let mut h = Harness::start_without_controller("shard").await;
    let ns = h.ns.clone();
    let base = "rc-e2e-shard";
    let args = shard_args(&ns, base);
    let kubeconfig = h.env.kubeconfig.clone();
    let a = h.spawn_controller("a", &args, &kubeconfig);
    let b = h.spawn_controller("b", &args, &kubeconfig);
    let ids = [format!("-{}", a.pid()), format!("-{}", b.pid())];
    let holders = wait_for_shard_holders(&h, base).await;
    assert!(
        holders
            .iter()
            .all(|holder| ids.iter().any(|id| holder.ends_with(id))),
        "the shard leases are held by {holders:?}, not by the two processes {ids:?}"
    );

    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((90, 10)), "{vs:#}");

    // The namespace's shard (FNV-1a of its name, mod 2) is the one whose leader acted.
    let shard = Shard::of(&ns, 2) as usize;
    let owner = if holders[shard].ends_with(&ids[0]) {
        "a"
    } else {
        "b"
    };
    for tag in ["a", "b"] {
        let acted = controller_log(&h, tag).contains("applying plan");
        assert_eq!(
            acted,
            tag == owner,
            "controller {tag} {} (the namespace is in shard {shard}, led by {owner})",
            if acted { "wrote" } else { "did not write" }
        );
    }
    drop((a, b));
    h.finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_process_stands_by_and_takes_over_the_shard_of_a_killed_leader() {
    let mut h = Harness::start_without_controller("shard-standby").await;
    let ns = h.ns.clone();
    let base = "rc-e2e-shard-standby";
    let args = shard_args(&ns, base);
    let kubeconfig = h.env.kubeconfig.clone();
    let mut leaders = vec![
        ("a", h.spawn_controller("a", &args, &kubeconfig)),
        ("b", h.spawn_controller("b", &args, &kubeconfig)),
    ];
    let holders = wait_for_shard_holders(&h, base).await;
    // Both shards are led: the third process can only wait.
    let c = h.spawn_controller("c", &args, &kubeconfig);
    let c_id = format!("-{}", c.pid());
    h.until(
        "the third process to wait for a shard",
        Duration::from_secs(30),
        || async {
            let log = controller_log(&h, "c");
            if log.contains("waiting to lead a shard") {
                Ok(())
            } else {
                Err(format!("its log so far:\n{log}"))
            }
        },
    )
    .await;

    h.app_and_canary("canary.yaml").await;
    h.wait_ready("frontend").await;
    let shard = Shard::of(&ns, 2) as usize;
    let other = 1 - shard;
    let owner = leaders
        .iter()
        .position(|(_, p)| holders[shard].ends_with(&format!("-{}", p.pid())))
        .unwrap_or_else(|| panic!("shard {shard} is led by {}, not by a or b", holders[shard]));
    let (owner_tag, mut owner_process) = leaders.swap_remove(owner);
    assert!(
        !controller_log(&h, "c").contains("applying plan"),
        "the standby wrote while both shards had a leader"
    );

    // SIGKILL the leader of the canary's shard: it cannot release its lease.
    owner_process.kill();
    h.faults_injected(1);
    let killed = Instant::now();
    let lease = Shard::lease_name(base, shard as u32, 2);
    wait_for_holder(
        &h,
        &lease,
        "c (the standby)",
        &c_id,
        Duration::from_secs(45),
    )
    .await;
    let takeover = killed.elapsed();
    assert_eq!(
        holder_of(&h, &Shard::lease_name(base, other as u32, 2))
            .await
            .as_deref(),
        Some(holders[other].as_str()),
        "the other shard must keep its leader"
    );

    // The standby serves the shard it took: the user's next patch goes through it.
    h.patch_canary("frontend", &json!({"spec": {"percent": 20}}))
        .await;
    h.wait_status("frontend", "Ready", 20).await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((80, 20)), "{vs:#}");
    let c_log = controller_log(&h, "c");
    assert!(
        c_log.contains(&format!("shard={shard}")) && c_log.contains("applying plan"),
        "the standby did not lead shard {shard} and write:\n{c_log}"
    );
    let (survivor, _) = &leaders[0];
    assert!(
        !controller_log(&h, survivor).contains("applying plan"),
        "controller {survivor} (shard {other}) wrote for a namespace of shard {shard}"
    );
    eprintln!(
        "[e2e] {ns}: {owner_tag} (shard {shard}) killed; the standby took its lease {takeover:?} later"
    );
    drop((leaders, c));
    h.finish(true).await;
}

/// What a controller's JSON log says about its leadership and its writes.
#[derive(Debug, Default)]
struct Leadership {
    tag: String,
    /// When it started to lead, and its shard (index, count).
    led: Option<(Timestamp, u32, u32)>,
    /// When it got SIGTERM (stopped reconciling).
    shut: Option<Timestamp>,
    /// When it stopped leading: before it sent the release of its Lease.
    released: Option<Timestamp>,
    /// When it logged its exit (`stopped`, or the error it exits with).
    exited: Option<Timestamp>,
    /// Its writes: (time, namespace, what).
    writes: Vec<(Timestamp, String, String)>,
    /// Whether it logged that it waits for the partition.
    waited: Vec<String>,
}

/// Reads controller `tag`'s log (`--log-format json`).
fn leadership(h: &Harness, tag: &str) -> Leadership {
    let mut l = Leadership {
        tag: tag.to_string(),
        ..Default::default()
    };
    for line in controller_log(h, tag).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = v["timestamp"].as_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let msg = v["message"].as_str().unwrap_or_default();
        let field = |k: &str| v[k].as_u64().map(|n| n as u32);
        match msg {
            "leading" => {
                l.led = Some((t, field("shard").unwrap_or(0), field("of").unwrap_or(1)));
            }
            "shutting down" => l.shut = Some(t),
            "stopped" => l.exited = Some(t),
            _ if v["level"] == "ERROR" => l.exited = Some(t),
            m if m.starts_with("lease: releasing") => l.released = Some(t),
            m if m.starts_with("partition: waiting") => l.waited.push(m.to_string()),
            "applying" | "applying plan" => {
                let ns = v["span"]["namespace"]
                    .as_str()
                    .or_else(|| {
                        v["spans"]
                            .as_array()?
                            .iter()
                            .find_map(|s| s["namespace"].as_str())
                    })
                    .unwrap_or_default()
                    .to_string();
                let what = v["action"].as_str().unwrap_or(msg).to_string();
                l.writes.push((t, ns, what));
            }
            _ => {}
        }
    }
    l
}

impl Leadership {
    /// Whether it led a shard that holds namespace `ns`.
    fn covers(&self, ns: &str) -> bool {
        self.led
            .is_some_and(|(_, i, n)| Shard { index: i, count: n }.owns(ns))
    }

    /// When it led: from `leading` to its release, or its exit if it released nothing (lost
    /// its Lease, say), or `now` if it still runs.
    fn term(&self, now: Timestamp) -> Option<(Timestamp, Timestamp)> {
        Some((self.led?.0, self.released.or(self.exited).unwrap_or(now)))
    }
}

/// A JSON-logging process of partition (`shards`, `generation`) over `namespaces`.
fn partition_args(
    namespaces: &[String],
    lease_ns: &str,
    base: &str,
    shards: u32,
    generation: u64,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--leader-elect=true",
        "--lease-namespace",
        lease_ns,
        "--lease-name",
        base,
        "--shards",
        &shards.to_string(),
        "--partition-generation",
        &generation.to_string(),
        "--admin-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for ns in namespaces {
        a.extend(["--namespace".to_string(), ns.clone()]);
    }
    a
}

/// Waits until every shard Lease of `shards` is held, each by a process tagged in `procs`;
/// their tags, by shard.
async fn wait_for_partition(
    h: &Harness,
    base: &str,
    shards: u32,
    procs: &[(String, crate::support::ControllerProcess)],
) -> Vec<String> {
    h.until(
        &format!("each of the {shards} shard Leases to be held by a process of that count"),
        Duration::from_secs(60),
        || async {
            let mut tags = Vec::new();
            for i in 0..shards {
                let holder = holder_of(h, &Shard::lease_name(base, i, shards)).await;
                let tag = procs.iter().find_map(|(tag, p)| {
                    holder
                        .as_deref()
                        .is_some_and(|id| id.ends_with(&format!("-{}", p.pid())))
                        .then(|| tag.clone())
                });
                match tag {
                    Some(t) if !tags.contains(&t) => tags.push(t),
                    _ => return Err(format!("shard {i}: holder {holder:?}")),
                }
            }
            Ok(tags)
        },
    )
    .await
}

/// Waits until controller `tag` logs that it waits for the partition.
async fn wait_for_partition_wait(h: &Harness, tag: &str) {
    h.until(
        &format!("controller {tag} to wait for the partition"),
        Duration::from_secs(30),
        || async {
            let l = leadership(h, tag);
            if l.waited.is_empty() {
                Err(format!(
                    "it logged no wait; led {:?}, {} writes",
                    l.led,
                    l.writes.len()
                ))
            } else {
                Ok(())
            }
        },
    )
    .await;
}

/// Waits until every namespace's canary has ramped `points` further than `from` (or finished).
async fn wait_ramp_progress(hs: &[Harness], from: &[i64], points: i64) -> Vec<i64> {
    let mut now = Vec::new();
    for (hn, start) in hs.iter().zip(from) {
        let at = hn
            .until(
                &format!("the ramp to move {points} points past {start} %"),
                Duration::from_secs(60),
                || async {
                    let c = hn.canary("frontend").await.ok_or("rcanary is gone")?;
                    let cur = c["status"]["currentPercent"].as_i64().unwrap_or(0);
                    if cur >= (start + points).min(50) {
                        Ok(cur)
                    } else {
                        Err(c["status"].to_string())
                    }
                },
            )
            .await;
        now.push(at);
    }
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_shard_count_2_3_1_in_rolling_updates_never_gives_a_namespace_two_writers_or_none()
 {
    const NAMESPACES: usize = 6;
    const LEASE: Duration = Duration::from_secs(15);
    let mut hs = Vec::new();
    for _ in 0..NAMESPACES {
        hs.push(Harness::start_without_controller("part").await);
    }
    let namespaces: Vec<String> = hs.iter().map(|h| h.ns.clone()).collect();
    let h = &hs[0];
    let lease_ns = h.ns.clone();
    let base = "rc-e2e-partition";
    let kubeconfig = h.env.kubeconfig.clone();
    let spawn = |tag: &str, shards: u32, generation: u64| {
        let args = partition_args(&namespaces, &lease_ns, base, shards, generation);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (tag.to_string(), h.spawn_controller(tag, &args, &kubeconfig))
    };

    // Two shards, generation 1.
    let mut two = vec![spawn("two-a", 2, 1), spawn("two-b", 2, 1)];
    wait_for_partition(h, base, 2, &two).await;
    // Every namespace ramps to 50 % in steps of 2 every 3 s: about 75 s, across both changes.
    for hn in &hs {
        hn.apply_example("app.yaml").await;
        hn.apply_example("canary-ramp.yaml").await;
        hn.patch_canary(
            "frontend",
            &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 2, "interval": "3s"}}}),
        )
        .await;
    }
    let mut at = Vec::new();
    for hn in &hs {
        at.push(hn.wait_ramp_under_way("frontend", 50).await);
    }
    // A few steps under each partition, so that each one writes in every namespace for a while.
    let at = wait_ramp_progress(&hs, &at, 4).await;

    // 2 -> 3 as a rolling update does it: the new processes start beside the old ones...
    let mut three = vec![
        spawn("three-a", 3, 2),
        spawn("three-b", 3, 2),
        spawn("three-c", 3, 2),
    ];
    for (tag, _) in &three {
        wait_for_partition_wait(h, tag).await;
    }
    for i in 0..3 {
        assert_eq!(
            holder_of(h, &Shard::lease_name(base, i, 3)).await,
            None,
            "a Lease of 3 shards is held while the 2-shard leaders live"
        );
    }
    // ...then the old ones get SIGTERM.
    for (_, p) in &two {
        p.signal("TERM");
    }
    h.faults_injected(2);
    wait_for_partition(h, base, 3, &three).await;
    for (tag, p) in &mut two {
        let status = p.exited_within(Duration::from_secs(30)).await;
        assert!(status.is_some(), "{tag} did not exit after SIGTERM");
    }
    // The ramps go on under the new partition before the next change.
    h.until(
        "every namespace to be written by its 3-shard leader",
        Duration::from_secs(60),
        || async {
            let logs: Vec<Leadership> = three.iter().map(|(t, _)| leadership(h, t)).collect();
            let unwritten: Vec<&String> = namespaces
                .iter()
                .filter(|ns| !logs.iter().any(|l| l.writes.iter().any(|w| &w.1 == *ns)))
                .collect();
            if unwritten.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet: {unwritten:?}"))
            }
        },
    )
    .await;
    wait_ramp_progress(&hs, &at, 8).await;

    // 3 -> 1, the same way (two replicas: one leads, one stands by).
    let one = vec![spawn("one-a", 1, 3), spawn("one-b", 1, 3)];
    for (tag, _) in &one {
        wait_for_partition_wait(h, tag).await;
    }
    assert_eq!(holder_of(h, base).await, None, "one shard led beside three");
    for (_, p) in &three {
        p.signal("TERM");
    }
    h.faults_injected(3);
    wait_for_partition(h, base, 1, &one[..]).await;
    for (tag, p) in &mut three {
        let status = p.exited_within(Duration::from_secs(30)).await;
        assert!(status.is_some(), "{tag} did not exit after SIGTERM");
    }

    // A process of the 2-shard deployment restarts (a pod of the old ReplicaSet, say): it must
    // stay a standby, for longer than a Lease lasts.
    let restarted = spawn("two-restarted", 2, 1);
    wait_for_partition_wait(h, "two-restarted").await;
    h.faults_injected(1);
    let watched = Instant::now();
    while watched.elapsed() < LEASE + Duration::from_secs(3) {
        for i in 0..2 {
            let holder = holder_of(h, &Shard::lease_name(base, i, 2)).await;
            assert!(
                holder.is_none(),
                "the restarted old process took {}: {holder:?}",
                Shard::lease_name(base, i, 2)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = leadership(h, "two-restarted");
    assert!(r.led.is_none() && r.writes.is_empty(), "{r:?}");
    assert!(
        r.waited.iter().any(|w| w.contains("newer")),
        "the restarted process does not say why it waits: {:?}",
        r.waited
    );

    // Every ramp finishes, under the last partition.
    for hn in &hs {
        hn.until(
            "the canary to finish its ramp (Ready at 50 %)",
            Duration::from_secs(150),
            || async {
                let c = hn.canary("frontend").await.ok_or("rcanary is gone")?;
                let st = &c["status"];
                if st["phase"] == "Ready" && st["currentPercent"].as_i64() == Some(50) {
                    Ok(())
                } else {
                    Err(st.to_string())
                }
            },
        )
        .await;
    }
    let now = Timestamp::now();
    drop(restarted);

    // From the logs: who led which namespaces when, and who wrote what.
    let logs: Vec<Leadership> = two
        .iter()
        .chain(&three)
        .chain(&one)
        .map(|(tag, _)| leadership(h, tag))
        .collect();
    for l in &logs {
        for (t, ns, what) in &l.writes {
            let (from, to) = l
                .term(now)
                .unwrap_or_else(|| panic!("{} wrote ({what} in {ns}) without leading", l.tag));
            assert!(
                l.covers(ns) && from <= *t && *t <= to,
                "{} wrote {what} in {ns} at {t} outside its term {from} .. {to} or its shard {:?}",
                l.tag,
                l.led
            );
        }
    }
    let mut report = Vec::new();
    for ns in &namespaces {
        let mut terms: Vec<(Timestamp, Timestamp, &str)> = logs
            .iter()
            .filter(|l| l.covers(ns))
            .filter_map(|l| l.term(now).map(|(a, b)| (a, b, l.tag.as_str())))
            .collect();
        terms.sort();
        let writers: std::collections::BTreeSet<&str> = logs
            .iter()
            .filter(|l| l.writes.iter().any(|w| &w.1 == ns))
            .map(|l| l.tag.as_str())
            .collect();
        assert!(
            writers.len() >= 3,
            "{ns}: expected a writer of each partition, got {writers:?}"
        );
        for w in terms.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "{ns}: {} led it until {} and {} from {}: two writers",
                w[0].2,
                w[0].1,
                w[1].2,
                w[1].0
            );
        }
        // Without a writer: from when the leader stopped reconciling (SIGTERM) to the next lead.
        let mut longest = Duration::ZERO;
        for w in terms.windows(2) {
            let stopped = logs
                .iter()
                .find(|l| l.tag == w[0].2)
                .and_then(|l| l.shut)
                .unwrap_or(w[0].1)
                .min(w[0].1);
            let gap = Duration::try_from(w[1].0.duration_since(stopped)).unwrap_or_default();
            longest = longest.max(gap);
        }
        assert!(
            longest <= LEASE,
            "{ns} had no writer for {longest:?}: {terms:?}"
        );
        report.push(format!(
            "{ns}: {} terms, longest without a leader {longest:?}",
            terms.len()
        ));
    }
    eprintln!("[e2e] {}: {}", h.ns, report.join("; "));
    drop((two, three, one));
    for hn in &mut hs {
        hn.finish(true).await;
    }
}
