//! Workers: the gateway's thread-per-core execution model.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime with its own
//! listening socket (all sharing the port through `SO_REUSEPORT`, so the kernel spreads
//! connections across them) and its own upstream connection pools. A request is accepted,
//! forwarded and relayed on one thread, with no cross-thread wake-ups on the hot path.
//! Shared state (configuration snapshot, metrics, audit queue) is lock-free.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker index (0 outside worker threads).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Number of workers: the configured count, or one per available core when 0.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, usize::from)
    }
}

/// Bind `n` listening sockets on `addr` that share one port (`SO_REUSEPORT`). Port 0 is
/// resolved by the first bind and reused by the others.
pub fn bind_shared(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Keeps one timer always due within [`SENTINEL_PERIOD`].
///
/// Tokio's timer driver unparks itself (an eventfd write and an extra epoll round) whenever
/// a new timer is due earlier than the wake-up it last planned, which with no timers pending
/// is every time. Per-request timers (header read, first byte) would then cost a self-wake
/// per request at low concurrency. With this sentinel pending, the planned wake-up is never
/// more than half a second away, so longer per-request timers register silently.
async fn timer_sentinel() {
    loop {
        tokio::time::sleep(SENTINEL_PERIOD).await;
    }
}

/// Period of the timer sentinel: shorter than any per-request timer in practice.
const SENTINEL_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// Start worker `index` on its own thread, running `task` to completion on a
/// single-threaded runtime.
pub fn spawn<F, Fut>(index: usize, task: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(format!("portcullis-w{index}"))
        .spawn(move || {
            INDEX.with(|i| i.set(index));
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async move {
                    let sentinel = tokio::spawn(timer_sentinel());
                    task().await;
                    sentinel.abort();
                }),
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start worker runtime")
                }
            }
        })
}
