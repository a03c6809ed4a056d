//! Client-facing hyper connections driven to their end: on shutdown each finishes its
//! in-flight requests and stops. A cut by a stall deadline (`idle`) is logged at info, other
//! ends at debug.
//!
//! The shutdown signal is polled only when it has fired (or on a connection's first poll),
//! not on every wake of the connection: a keep-alive client wakes its connection twice per
//! request, and polling a `watch` receiver takes a lock shared with other connections.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;

use super::Proxy;

/// Drives `conn` to its end; when tollgate shuts down, `graceful` asks it to finish what it
/// has in flight (hyper's HTTP/1.1-with-upgrades and HTTP/2 connections share no trait for
/// that). The connection comes boxed, in an allocation sized to its own protocol: the future
/// driving it stays small for the connection's whole life.
pub async fn serve_client<C>(proxy: &Proxy, conn: Pin<Box<C>>, client: SocketAddr, graceful: fn(Pin<&mut C>))
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    if let Err(e) = UntilShutdown::new(conn, proxy.shutting_down(), graceful).await {
        log_client_end(client, &e);
    }
}

/// A connection and the shutdown signal it watches.
struct UntilShutdown<C, S> {
    conn: Pin<Box<C>>,
    /// Until it fired.
    shutdown: Option<Pin<Box<S>>>,
    graceful: fn(Pin<&mut C>),
    signal: Arc<Signal>,
    /// The task waker `signal` holds (compared, not locked, on each poll).
    task: Option<Waker>,
}

impl<C, S> UntilShutdown<C, S> {
    /// `shutdown` is polled on the first poll, then only after it woke.
    fn new(conn: Pin<Box<C>>, shutdown: S, graceful: fn(Pin<&mut C>)) -> Self {
        let signal = Arc::new(Signal { fired: AtomicBool::new(true), task: Mutex::new(None) });
        Self { conn, shutdown: Some(Box::pin(shutdown)), graceful, signal, task: None }
    }
}

/// The shutdown future's waker: marks it to be polled, and wakes the connection's task.
struct Signal {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock() {
            task.wake_by_ref();
        }
    }
}

impl<C, S> Future for UntilShutdown<C, S>
where
    C: Future<Output = Result<(), hyper::Error>>,
    S: Future<Output = ()>,
{
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is boxed or `Unpin`.
        let this = self.get_mut();
        crate::busy_poll::note_work();
        if let Some(shutdown) = &mut this.shutdown {
            if !this.task.as_ref().is_some_and(|task| task.will_wake(cx.waker())) {
                *this.signal.task.lock() = Some(cx.waker().clone());
                this.task = Some(cx.waker().clone());
            }
            if this.signal.fired.load(Ordering::Relaxed) && this.signal.fired.swap(false, Ordering::Acquire) {
                let waker = Waker::from(this.signal.clone());
                if shutdown.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                    (this.graceful)(this.conn.as_mut());
                    this.shutdown = None;
                }
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

/// How a client connection that ended with an error is logged.
pub fn log_client_end(client: SocketAddr, e: &hyper::Error) {
    match timed_out(e) {
        Some(stall) => tracing::info!(client = %client, error = %stall, "client connection cut"),
        None => tracing::debug!(client = %client, error = %e, "client connection ended with an error"),
    }
}

/// The stall deadline (`idle`) behind a connection error, if that is what ended it.
fn timed_out<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e std::io::Error> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return Some(io);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{mpsc, oneshot};

    /// A connection woken by messages (counted), which ends once asked to drain.
    struct Conn {
        wakes: mpsc::UnboundedReceiver<()>,
        woken: Arc<AtomicUsize>,
        draining: bool,
    }

    impl Future for Conn {
        type Output = Result<(), hyper::Error>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            while let Poll::Ready(Some(())) = self.wakes.poll_recv(cx) {
                self.woken.fetch_add(1, Ordering::Relaxed);
            }
            match self.draining {
                true => Poll::Ready(Ok(())),
                false => Poll::Pending,
            }
        }
    }

    /// A shutdown signal that counts its polls.
    struct Shutdown {
        fired: oneshot::Receiver<()>,
        polls: Arc<AtomicUsize>,
    }

    impl Future for Shutdown {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.fired).poll(cx).map(|_| ())
        }
    }

    #[tokio::test]
    async fn the_shutdown_signal_is_polled_when_it_fires_not_on_every_wake() {
        let (wake, wakes) = mpsc::unbounded_channel();
        let (fire, fired) = oneshot::channel();
        let (polls, woken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let until = UntilShutdown::new(
            Box::pin(Conn { wakes, woken: woken.clone(), draining: false }),
            Shutdown { fired, polls: polls.clone() },
            |conn| conn.get_mut().draining = true,
        );
        let served = tokio::spawn(until);
        for _ in 0..100 {
            wake.send(()).unwrap();
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!served.is_finished(), "the connection ended without a shutdown");
        assert_eq!(woken.load(Ordering::Relaxed), 100, "the connection was not polled on its wakes");
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the shutdown signal was polled on the connection's wakes");
        fire.send(()).unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "the connection did not drain on shutdown: {ended:?}");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
