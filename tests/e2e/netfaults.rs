//! Network faults between one controller process and the apiserver, through the fault proxy
//! (testkit/src/proxy.rs): a leader cut off while its standby stays connected, and slow and failing
//! requests on the leader's connection (one test shows a liveness finding: requests of a few
//! seconds make a leader step down although every renewal succeeds). None of them stops the
//! shared cluster.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{Proxy, read, write_all};
use crate::support::{
    Harness, Kubelet, OWNED, WRITE_LINE, assert_clean_step_down, controller_log_text,
    elected_controller_args, lease_holder, logged_at, split_weights, wait_for_lease_holder,
    writes_after_the_deadline,
};

/// The controller's renew deadline (src/runtime/lease.rs): a leader writes no later than this after the
/// last renewal it sent.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// `t` + `d`, for comparing log timestamps.
fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t + SignedDuration::try_from(d).expect("a short duration")
}

/// A TCP echo server on loopback, for the proxy's own test.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = read(&mut s, &mut buf).await {
                    if n == 0 || write_all(&mut s, &buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Fills `buf`, or fails at EOF.
async fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match read(s, &mut buf[at..]).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => at += n,
        }
    }
    Ok(())
}

/// Sends `msg` and waits at most `within` for its echo; the round trip, or `Err` with what
/// happened instead.
async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    write_all(s, msg).await.map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(within, read_exact(s, &mut got)).await {
        Err(_) => Err("no answer".into()),
        Ok(Err(e)) => Err(format!("read: {e} ({:?})", e.kind())),
        Ok(Ok(_)) if got == msg => Ok(t.elapsed()),
        Ok(Ok(_)) => Err(format!("wrong echo {got:?}")),
    }
}

/// The proxy itself (no cluster needed): each fault does what the tests below rely on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_delays_resets_and_black_holes_on_command() {
    let proxy = Proxy::start(echo_server().await).await;
    let connect = || TcpStream::connect(proxy.addr());
    let mut s = connect().await.expect("connect");
    let rtt = round_trip(&mut s, b"plain", Duration::from_secs(2)).await;
    assert!(rtt.is_ok(), "a plain round trip: {rtt:?}");

    // Latency: once on the way there, once back.
    proxy.latency(Duration::from_millis(300));
    let rtt = round_trip(&mut s, b"slow", Duration::from_secs(3))
        .await
        .expect("a delayed round trip");
    assert!(rtt >= Duration::from_millis(600), "round trip {rtt:?}");
    proxy.heal();

    // A black hole holds an open stream's bytes and a new connection's; healing lets them through.
    proxy.black_hole();
    let held = round_trip(&mut s, b"held", Duration::from_millis(500)).await;
    assert_eq!(
        held,
        Err("no answer".into()),
        "an open stream in a black hole"
    );
    let mut fresh = connect().await.expect("a black hole accepts");
    let held_new = round_trip(&mut fresh, b"new", Duration::from_millis(500)).await;
    assert_eq!(
        held_new,
        Err("no answer".into()),
        "a new connection in a black hole"
    );
    proxy.heal();
    let mut late = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), read_exact(&mut s, &mut late))
        .await
        .expect("the held bytes arrive once healed")
        .expect("read");
    assert_eq!(&late, b"held");
    let mut late = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(2), read_exact(&mut fresh, &mut late))
        .await
        .expect("the held connection is served once healed")
        .expect("read");
    assert_eq!(&late, b"new");

    // Resets: open connections now, new ones while refusing.
    proxy.reset_existing();
    let r = round_trip(&mut s, b"reset", Duration::from_secs(2)).await;
    assert!(r.is_err(), "a reset connection still answered: {r:?}");
    proxy.refuse_new(true);
    // The RST comes right after the accept: connect() may see it already.
    if let Ok(mut refused) = connect().await {
        let r = round_trip(&mut refused, b"refused", Duration::from_secs(2)).await;
        assert!(r.is_err(), "a refused connection answered: {r:?}");
    }
    proxy.refuse_new(false);
    let mut ok = connect().await.expect("connect");
    assert!(
        round_trip(&mut ok, b"ok", Duration::from_secs(2))
            .await
            .is_ok()
    );
    let st = proxy.stats();
    assert!(
        st.accepted == 4
            && st.reset >= 2
            && st.refused == 1
            && st.delayed >= 2
            && st.held >= 2
            && st.bytes_up > 0
            && st.bytes_down > 0,
        "{st:?}"
    );
}

/// The leader reaches the apiserver through the proxy, the standby directly. Mid-ramp the
/// leader's network is cut (a black hole: its requests hang, nothing errors). Its renewal cannot
/// complete, so at its renew deadline it must stop writing and exit; the standby, which still
/// sees the apiserver, takes the lease 15 s after the last renewal and finishes the ramp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_apiserver_stops_writing_before_the_connected_standby_takes_over()
{
    let mut h = Harness::start_without_controller("partition").await;
    let ns = h.ns.clone();
    let lease = "rc-e2e-partition";
    let args = elected_controller_args(&ns, lease);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxied = h.log.with_file_name(format!("{ns}-a.kubeconfig"));
    let proxy = Proxy::for_kubeconfig(&h.env.kubeconfig, &proxied).await;
    let mut a = h.spawn_controller("a", &args, &proxied);
    wait_for_lease_holder(&h, lease, a.pid(), Duration::from_secs(30)).await;
    let kubeconfig = h.env.kubeconfig.clone();
    let b = h.spawn_controller("b", &args, &kubeconfig);

    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "3s"}}}),
    )
    .await;
    let at_cut = h.wait_ramp_under_way("frontend", 50).await;

    proxy.black_hole();
    let cut = Instant::now();
    let cut_at = Timestamp::now();
    h.faults_injected(1);

    // The leader's last renewal was sent before the cut, so its fence closes before
    // cut + RENEW_DEADLINE; it then stops and exits non-zero (a pod's restart is the kubelet's).
    let status = a
        .exited_within(RENEW_DEADLINE + Duration::from_secs(15))
        .await;
    let exited = cut.elapsed();
    let a_log = controller_log_text(&h, "a");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the cut-off leader must exit non-zero once its renew deadline passed; status {status:?} \
         {exited:?} after the cut\n{a_log}"
    );
    let (fence_closed, late) = writes_after_the_deadline(&a_log);
    let fence_closed = fence_closed.unwrap_or_else(|| {
        panic!("the cut-off leader's log does not say it missed its renew deadline:\n{a_log}")
    });
    assert!(
        late.is_empty(),
        "the cut-off leader wrote after its renew deadline ({fence_closed}): {late:?}"
    );
    wait_for_lease_holder(&h, lease, b.pid(), Duration::from_secs(45)).await;
    let took_over = cut.elapsed();
    let b_led = logged_leading(&h, "b").await;

    // No two writers: the leader sent its last write before its renew deadline, and so well
    // before the standby led.
    let a_writes = logged_at(&a_log, WRITE_LINE);
    let last = *a_writes
        .last()
        .unwrap_or_else(|| panic!("the leader logged no write before the cut:\n{a_log}"));
    assert!(
        last < plus(cut_at, RENEW_DEADLINE),
        "the cut-off leader sent a write at {last}, after its renew deadline (cut at {cut_at})\n{a_log}"
    );
    assert!(
        last < b_led && fence_closed < b_led,
        "the standby led at {b_led}, before the cut-off leader stopped (last write {last}, \
         deadline {fence_closed})"
    );

    // The standby finishes the ramp.
    h.wait_status("frontend", "Ready", 50).await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    let st = proxy.stats();
    assert!(
        st.held > 0,
        "the black hole held nothing of the leader's: {st:?}"
    );
    eprintln!(
        "[e2e] {ns}: leader cut off at {at_cut}%; it exited {exited:?} later, its last write (sent \
         into the black hole) {:#} after the cut; the standby led {took_over:?} after the cut; proxy {st:?}",
        last.duration_since(cut_at)
    );
    drop(b);
    drop(proxy);
    h.finish(true).await;
}

/// Slow and failing requests on the leader's only connection to the apiserver, through setup and
/// the ramp: every request and answer delayed (a request takes [`SLOW`] twice), open connections
/// reset and new ones refused for a moment, then slow again. There is no standby to hand over to;
/// the test plays the kubelet and restarts the leader if it exits. The canary converges, every
/// step-down is clean (non-zero exit, no write after the renew deadline), and make-before-break
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_failing_requests_on_the_leaders_connection_still_converge() {
    let mut h = Harness::start_without_controller("slow").await;
    let ns = h.ns.clone();
    let lease = "rc-e2e-slow";
    let args = elected_controller_args(&ns, lease);
    let proxied = h.log.with_file_name(format!("{ns}-a.kubeconfig"));
    let proxy = Proxy::for_kubeconfig(&h.env.kubeconfig, &proxied).await;
    let kubelet = Kubelet::start(&h, "a", &args, &proxied, Duration::from_secs(10));
    h.until(
        "the controller to lead",
        Duration::from_secs(30),
        || async {
            let pid = kubelet.pid().ok_or("not running")?;
            match lease_holder(&h, lease).await {
                Some(id) if id.ends_with(&format!("-{pid}")) => Ok(()),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;

    // Setup under latency.
    proxy.latency(SLOW);
    let faulty = Instant::now();
    h.faults_injected(1);
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "3s"}}}),
    )
    .await;
    h.wait_ramp_under_way("frontend", 50).await;

    // The ramp under resets: open connections reset every 2 s, new ones refused for 1 s after.
    proxy.latency(Duration::ZERO);
    for _ in 0..RESETS {
        proxy.reset_existing();
        proxy.refuse_new(true);
        h.faults_injected(1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.refuse_new(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // And slow again to the end.
    proxy.latency(SLOW);
    h.faults_injected(1);

    // A bound that leaves room for one step-down: the kubelet's 10 s back-off, then the
    // lease's expiry.
    h.until(
        "the ramp to finish at 50%",
        Duration::from_secs(120),
        || async {
            let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
            let st = &c["status"];
            if st["phase"] == "Ready" && st["currentPercent"] == 50 {
                Ok(())
            } else {
                Err(st.to_string())
            }
        },
    )
    .await;
    proxy.heal();
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    let st = proxy.stats();
    assert!(
        st.delayed > 0 && st.reset >= RESETS && st.refused > 0,
        "the faults did not hit the leader's connection: {st:?}"
    );
    // A leader may still lose its lease here: one failed renewal that comes late enough after a
    // slow one costs it (the finding of the next test). It must then step down cleanly.
    let exits = kubelet.exits();
    for e in &exits {
        assert_clean_step_down(&h, e, faulty);
    }
    eprintln!(
        "[e2e] {ns}: converged through {SLOW:?} each way and {RESETS} reset rounds; proxy {st:?}; \
         the leader stepped down {} times",
        exits.len()
    );
    drop(kubelet);
    drop(proxy);
    h.finish(true).await;
}

/// Requests that take seconds (3 s each here; a renewal is three: the Lease read and write and
/// the partition record) make a renewal outlast the renew deadline, and the leader steps down
/// although the apiserver answers every renewal. Renewals now start `renew_every` after the last
/// one *started* (not after it returned), so a renewal may take up to about 5 s of the 10 s
/// deadline (the unit test `a_leader_whose_answers_are_slow_but_within_the_deadline_keeps_its_lease`);
/// past that, stepping down is the safe answer: the slow leader exits non-zero, logs why, sends no
/// write after its deadline, and the standby, connected directly, takes over and finishes the ramp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_a_few_seconds_make_the_leader_step_down_and_the_standby_finish() {
    let mut h = Harness::start_without_controller("slower").await;
    let ns = h.ns.clone();
    let lease = "rc-e2e-slower";
    let args = elected_controller_args(&ns, lease);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxied = h.log.with_file_name(format!("{ns}-a.kubeconfig"));
    let proxy = Proxy::for_kubeconfig(&h.env.kubeconfig, &proxied).await;
    let mut a = h.spawn_controller("a", &args, &proxied);
    wait_for_lease_holder(&h, lease, a.pid(), Duration::from_secs(30)).await;
    let kubeconfig = h.env.kubeconfig.clone();
    let b = h.spawn_controller("b", &args, &kubeconfig);
    h.apply_example("app.yaml").await;
    h.apply_example("canary-ramp.yaml").await;
    h.patch_canary(
        "frontend",
        &json!({"spec": {"propagationDelay": "1s", "ramp": {"stepPercent": 10, "interval": "3s"}}}),
    )
    .await;
    let at = h.wait_ramp_under_way("frontend", 50).await;

    proxy.latency(SLOWER);
    let slow = Instant::now();
    h.faults_injected(1);
    // Three renewals at most: the first slow one succeeds, the next cannot finish in time.
    let status = a.exited_within(Duration::from_secs(30)).await;
    let exited = slow.elapsed();
    let a_log = controller_log_text(&h, "a");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the leader kept running with requests of {:?} (status {status:?}): if the renewal now \
         tolerates slow requests, this test's finding is fixed; turn it around\n{a_log}",
        SLOWER * 2
    );
    let (deadline, late) = writes_after_the_deadline(&a_log);
    assert!(
        deadline.is_some(),
        "the slow leader's log does not say it missed its renew deadline:\n{a_log}"
    );
    assert!(
        late.is_empty(),
        "the slow leader wrote after its renew deadline ({deadline:?}): {late:?}"
    );
    let st = proxy.stats();
    assert!(
        st.reset == 0 && st.refused == 0 && st.delayed > 0,
        "only latency, nothing failed: {st:?}"
    );
    wait_for_lease_holder(&h, lease, b.pid(), Duration::from_secs(45)).await;
    let b_led = logged_leading(&h, "b").await;
    let a_last = logged_at(&a_log, WRITE_LINE).last().copied();
    assert!(
        a_last.is_none_or(|w| w < b_led),
        "the slow leader wrote at {a_last:?}, after the standby led at {b_led}"
    );
    h.wait_status("frontend", "Ready", 50).await;
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    eprintln!(
        "[e2e] {ns}: requests of {:?} from {at}%: the leader stepped down {exited:?} later; proxy {st:?}",
        SLOWER * 2
    );
    drop(b);
    drop(proxy);
    h.finish(true).await;
}

/// The latency the proxy adds in each direction in the slow-request test: a request and its
/// answer take twice this, within the renewal's budget of about 1.25 s a request.
const SLOW: Duration = Duration::from_millis(500);
/// The same, over the renewal's budget: a request takes 3 s.
const SLOWER: Duration = Duration::from_millis(1500);
/// Rounds of connection resets in the slow-request test.
const RESETS: u64 = 4;

/// When controller `tag` logged that it leads. The Lease shows a new holder a moment before its
/// log says so (it takes the partition record's Lease first, and a loaded machine delays the
/// line): waited for, at most 30 s.
async fn logged_leading(h: &Harness, tag: &str) -> Timestamp {
    h.until(
        &format!("controller {tag} to log that it leads"),
        Duration::from_secs(30),
        || async {
            let log = controller_log_text(h, tag);
            logged_at(&log, "leading")
                .first()
                .copied()
                .ok_or_else(|| format!("it holds the lease but has not logged `leading`:\n{log}"))
        },
    )
    .await
}
