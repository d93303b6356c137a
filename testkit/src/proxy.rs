//! A fault-injecting TCP proxy on loopback, between one controller process and the kube-apiserver.
//!
//! The controller gets a kubeconfig whose server is the proxy ([`Proxy::for_kubeconfig`]); the TLS
//! bytes pass through untouched (the apiserver's certificate is for 127.0.0.1, which the proxy's
//! address is too). On command the proxy
//!
//! * delays every chunk by a latency, in each direction, as a slow network does (the chunks keep
//!   their order; a request and its answer each take the latency once);
//! * resets (RST) every open connection, or every new one as soon as it is accepted;
//! * black-holes: new connections are accepted and never forwarded, and open streams stall with
//!   their bytes held in the proxy, as in a network partition. [`Proxy::heal`] lets the held bytes
//!   through, late, as TCP retransmission does once a partition heals.
//!
//! It is bounded: it connects only to the test cluster's apiserver, on a loopback address, and it
//! stops (every connection reset) when it is dropped, so with the test.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube::config::Kubeconfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does to traffic now.
#[derive(Clone, Debug, Default)]
struct Faults {
    latency: Duration,
    refuse_new: bool,
    black_hole: bool,
    /// Bumped to reset every connection open at that moment.
    reset_epoch: u64,
    stopped: bool,
}

/// What the proxy did so far, for a test's assertions that its faults hit.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    delayed: AtomicU64,
    held: AtomicU64,
}

/// A copy of the proxy's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Connections accepted (refused ones included).
    pub accepted: u64,
    /// New connections reset at once.
    pub refused: u64,
    /// Open connections reset on command.
    pub reset: u64,
    /// Bytes forwarded to the apiserver.
    pub bytes_up: u64,
    /// Bytes forwarded to the controller.
    pub bytes_down: u64,
    /// Chunks held back by a latency.
    pub delayed: u64,
    /// Chunks (or new connections) held by a black hole.
    pub held: u64,
}

pub struct Proxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.send_modify(|f| f.stopped = true);
        self.accept.abort();
    }
}

impl Proxy {
    /// A proxy on 127.0.0.1 (a free port) to `upstream`, which must be a loopback address: this
    /// proxy forwards to the local test cluster only.
    pub async fn start(upstream: SocketAddr) -> Self {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy forwards only to a local test cluster, not to {upstream}"
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy on 127.0.0.1");
        let addr = listener.local_addr().expect("the proxy's address");
        let (faults, _) = watch::channel(Faults::default());
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn({
            let (faults, counters) = (faults.clone(), counters.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if faults.borrow().refuse_new {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        reset(client);
                        continue;
                    }
                    tokio::spawn(serve(
                        client,
                        upstream,
                        faults.subscribe(),
                        counters.clone(),
                    ));
                }
            }
        });
        eprintln!("[e2e] fault proxy {addr} -> {upstream}");
        Self {
            addr,
            faults,
            counters,
            accept,
        }
    }

    /// A proxy to the apiserver of `kubeconfig` (its current context); writes a copy of it whose
    /// server is the proxy to `out`, for the controller behind the proxy.
    pub async fn for_kubeconfig(kubeconfig: &Path, out: &Path) -> Self {
        let mut kc = Kubeconfig::read_from(kubeconfig)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", kubeconfig.display()));
        let server = current_cluster(&mut kc)
            .server
            .clone()
            .expect("the kubeconfig's cluster has a server");
        let upstream = server
            .strip_prefix("https://")
            .and_then(|s| s.split('/').next())
            .and_then(|hp| hp.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| {
                panic!("the fault proxy needs an https://<loopback ip>:<port> server, not {server}")
            });
        let proxy = Self::start(upstream).await;
        current_cluster(&mut kc).server = Some(format!("https://{}", proxy.addr));
        let yaml = serde_yaml_ng::to_string(&kc).expect("kubeconfig as YAML");
        std::fs::write(out, yaml).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every chunk from now on waits `latency` in the proxy, in each direction.
    pub fn latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    /// New connections are reset as soon as they are accepted (`true`), or served again.
    pub fn refuse_new(&self, on: bool) {
        self.faults.send_modify(|f| f.refuse_new = on);
    }

    /// Resets every connection open now (the controller sees "connection reset by peer").
    pub fn reset_existing(&self) {
        self.faults.send_modify(|f| f.reset_epoch += 1);
    }

    /// A partition: nothing passes in either direction until [`Proxy::heal`].
    pub fn black_hole(&self) {
        self.faults.send_modify(|f| f.black_hole = true);
    }

    /// No more faults: the held bytes go through (late) and new connections are served.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            f.latency = Duration::ZERO;
            f.refuse_new = false;
            f.black_hole = false;
        });
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            reset: get(&c.reset),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            delayed: get(&c.delayed),
            held: get(&c.held),
        }
    }
}

/// The cluster of the kubeconfig's current context.
fn current_cluster(kc: &mut Kubeconfig) -> &mut kube::config::Cluster {
    let context = kc
        .current_context
        .clone()
        .expect("the kubeconfig has a current context");
    let cluster = kc
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .expect("the current context names a cluster");
    kc.clusters
        .iter_mut()
        .find(|c| c.name == cluster)
        .and_then(|c| c.cluster.as_mut())
        .expect("the current context's cluster is in the kubeconfig")
}

/// Closes `s` with an RST instead of a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// One connection: held while black-holed, then connected upstream and piped both ways until it
/// ends, or until the proxy resets it or stops.
async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    counters: Arc<Counters>,
) {
    let epoch = faults.borrow().reset_epoch;
    let cut = move |f: &Faults| f.stopped || f.reset_epoch != epoch;
    if faults.borrow().black_hole {
        counters.held.fetch_add(1, Ordering::Relaxed);
    }
    let go = faults
        .wait_for(|f| cut(f) || !f.black_hole)
        .await
        .map(|f| !cut(&f))
        .unwrap_or(false);
    if !go {
        counters.reset.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    }
    let _ = client.set_nodelay(true);
    let mut client = client;
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return reset(client);
    };
    let _ = server.set_nodelay(true);
    let was_cut = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pipe(cr, sw, faults.clone(), &counters, &counters.bytes_up);
        let down = pipe(sr, cw, faults.clone(), &counters, &counters.bytes_down);
        tokio::select! {
            _ = futures::future::try_join(up, down) => false,
            _ = faults.wait_for(|f| cut(f)) => true,
        }
    };
    if was_cut {
        counters.reset.fetch_add(1, Ordering::Relaxed);
        reset(client);
        reset(server);
    }
}

/// Copies one direction: chunks are read as they come and written once their latency has passed
/// and no black hole holds them, in order. Ends at EOF (passed on as a half-close) or an error.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    faults: watch::Receiver<Faults>,
    counters: &Counters,
    bytes: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Bounded: a stalled stream pushes back on its sender, as a full TCP window does.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(16);
    let read = {
        let faults = faults.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = read(&mut from, &mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                let due = Instant::now() + faults.borrow().latency;
                if tx.send((due, buf[..n].to_vec())).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let write = async move {
        let mut faults = faults;
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                counters.delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(due).await;
            }
            if faults.borrow().black_hole {
                counters.held.fetch_add(1, Ordering::Relaxed);
                if faults
                    .wait_for(|f| !f.black_hole || f.stopped)
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            write_all(&mut to, &chunk).await?;
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        std::future::poll_fn(|cx| Pin::new(&mut to).poll_shutdown(cx)).await
    };
    futures::future::try_join(read, write).await.map(|_| ())
}

// tokio's AsyncReadExt and AsyncWriteExt need its `io-util` feature, which this crate does not
// enable; these are the two calls the proxy and its test need.

/// Reads what is there (at least one byte), or 0 at EOF.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        Pin::new(&mut *r)
            .poll_read(cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    })
    .await
}

/// Writes all of `buf`.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}
