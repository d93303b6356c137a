//! Leader election: two controllers, one Lease; the standby takes over when the leader dies.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use recording_canary::shard::Shard;
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
