//! Network faults between one controller process and the apiserver, through the fault proxy
//! (tests/e2e/proxy.rs): a leader cut off while its standby stays connected, and slow and failing
//! requests on the leader's connection. None of them stops the shared cluster.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{Proxy, read, write_all};
use crate::support::{
    Harness, Kubelet, OWNED, WRITE_LINE, controller_log_text, elected_controller_args, logged_at,
    split_weights, wait_for_lease_holder,
};

/// The controller's renew deadline (src/lease.rs): a leader writes no later than this after the
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
    assert_eq!(held, Err("no answer".into()), "an open stream in a black hole");
    let mut fresh = connect().await.expect("a black hole accepts");
    let held_new = round_trip(&mut fresh, b"new", Duration::from_millis(500)).await;
    assert_eq!(held_new, Err("no answer".into()), "a new connection in a black hole");
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
        st.reset >= 2 && st.refused == 1 && st.delayed >= 2 && st.held >= 2,
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
    let status = a.exited_within(RENEW_DEADLINE + Duration::from_secs(15)).await;
    let exited = cut.elapsed();
    let a_log = controller_log_text(&h, "a");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the cut-off leader must exit non-zero once its renew deadline passed; status {status:?} \
         {exited:?} after the cut\n{a_log}"
    );
    assert!(
        a_log.contains("renew deadline"),
        "the cut-off leader's log does not say why it stopped:\n{a_log}"
    );
    wait_for_lease_holder(&h, lease, b.pid(), Duration::from_secs(45)).await;
    let took_over = cut.elapsed();
    let b_log = controller_log_text(&h, "b");
    let b_led = *logged_at(&b_log, "leading")
        .first()
        .unwrap_or_else(|| panic!("the standby holds the lease but did not log `leading`:\n{b_log}"));

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
        last < b_led,
        "the cut-off leader wrote at {last}, after the standby led at {b_led}"
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
        "[e2e] {ns}: leader cut off at {at_cut}%; it exited {exited:?} later, its last write {} \
         before the cut; the standby led {took_over:?} after the cut; proxy {st:?}",
        cut_at.duration_since(last)
    );
    drop(b);
    drop(proxy);
    h.finish(true).await;
}

/// Slow and failing requests on the leader's only connection to the apiserver, through setup and
/// the ramp: a latency on every request and answer, open connections reset, new ones refused for
/// a moment. The leader has no standby to hand over to; the test plays the kubelet and restarts
/// it if it exits. The canary still converges, and make-before-break holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_failing_requests_on_the_leaders_connection_still_converge() {
    let mut h = Harness::start_without_controller("slow").await;
    let ns = h.ns.clone();
    let lease = "rc-e2e-slow";
    let args = elected_controller_args(&ns, lease);
    let proxied = h.log.with_file_name(format!("{ns}-a.kubeconfig"));
    let proxy = Proxy::for_kubeconfig(&h.env.kubeconfig, &proxied).await;
    let kubelet = Kubelet::start(&h, "a", &args, &proxied, Duration::from_secs(10));
    h.until("the controller to lead", Duration::from_secs(30), || async {
        let pid = kubelet.pid().ok_or("not running")?;
        let holder = crate::support::lease_holder(&h, lease).await;
        match holder {
            Some(id) if id.ends_with(&format!("-{pid}")) => Ok(()),
            other => Err(format!("holder {other:?}")),
        }
    })
    .await;

    // Setup under latency: every request and every answer waits LATENCY in the proxy.
    proxy.latency(LATENCY);
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
    // Latency and resets together.
    proxy.latency(LATENCY);
    proxy.reset_existing();
    h.faults_injected(1);

    h.until("the ramp to finish at 50%", Duration::from_secs(120), || async {
        let c = h.canary("frontend").await.ok_or("rcanary is gone")?;
        let st = &c["status"];
        if st["phase"] == "Ready" && st["currentPercent"] == 50 {
            Ok(())
        } else {
            Err(st.to_string())
        }
    })
    .await;
    proxy.heal();
    let vs = h.vs(OWNED).await.expect("the VirtualService");
    assert_eq!(split_weights(&vs), Some((50, 50)), "{vs:#}");
    let st = proxy.stats();
    assert!(
        st.delayed > 0 && st.reset >= RESETS && st.refused > 0,
        "the faults did not hit the leader's connection: {st:?}"
    );
    let exits = kubelet.exits();
    eprintln!(
        "[e2e] {ns}: converged through latency {LATENCY:?} and {RESETS} reset rounds; proxy {st:?}; \
         controller exits {exits:?}"
    );
    drop(kubelet);
    drop(proxy);
    h.finish(true).await;
}

/// The latency the proxy adds in each direction in the slow-request test: a request and its
/// answer take twice this.
const LATENCY: Duration = Duration::from_secs(1);
/// Rounds of connection resets in the slow-request test.
const RESETS: u64 = 4;
