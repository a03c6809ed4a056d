//! Busy-polling on the data-plane threads (`[limits] busy_poll_us`, off by default).
//!
//! A data-plane thread with nothing to run parks in `epoll_wait`. In a virtual machine whose
//! idle vCPU halts (no guest halt-polling), the next packet then costs a wake-up through the
//! hypervisor before the thread runs again, and a keep-alive request crosses a thread twice.
//! With busy-polling on, a thread that served a client connection in the last `busy_poll_us`
//! keeps asking the kernel for readiness without blocking (the runtime's zero-timeout poll,
//! with `sched_yield` between polls so that other threads on its core go first), and parks
//! only once that long has passed without client work. The price is CPU: the spinning shows
//! as the thread's own, most under moderate load.

use std::cell::Cell;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Client connection polls on this thread.
    static WORK: Cell<u64> = const { Cell::new(0) };
    /// The poller's waker while it sleeps; the runtime's unpark hook wakes it.
    static SLEEPER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// A client connection of this thread was polled.
#[inline]
pub fn note_work() {
    WORK.set(WORK.get().wrapping_add(1));
}

/// The data-plane runtimes' unpark hook: the thread woke from a park, so the poller looks
/// whether client work came with it.
pub fn unparked() {
    if let Some(waker) = SLEEPER.take() {
        waker.wake();
    }
}

/// The poller, spawned on a data-plane runtime for its life when `window` is not zero.
pub async fn run(window: Duration) {
    let mut seen = WORK.get();
    let mut last_work = Instant::now();
    loop {
        // A yielded task is polled again after the runtime's zero-timeout I/O poll; while
        // this one is queued the runtime never blocks.
        tokio::task::yield_now().await;
        let work = WORK.get();
        if work != seen {
            seen = work;
            last_work = Instant::now();
        } else if last_work.elapsed() >= window {
            sleep_until_unparked().await;
            continue;
        }
        std::thread::yield_now();
    }
}

/// Pending until the runtime's next unpark.
async fn sleep_until_unparked() {
    let mut asleep = false;
    std::future::poll_fn(|cx| match std::mem::replace(&mut asleep, true) {
        false => {
            SLEEPER.set(Some(cx.waker().clone()));
            Poll::Pending
        }
        true => Poll::Ready(()),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        use nix::sys::resource::{UsageWho, getrusage};
        let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
        let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
        Duration::from_micros(micros(usage.user_time()) + micros(usage.system_time()))
    }

    /// While client work keeps coming the thread never parks; once the window has passed
    /// without any it parks and stops spending CPU; a park that brings client work starts the
    /// polling again.
    #[test]
    fn the_thread_polls_while_work_comes_and_sleeps_after_the_window() {
        let parks = Arc::new(AtomicUsize::new(0));
        let counted = parks.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                counted.fetch_add(1, Ordering::Relaxed);
            })
            .on_thread_unpark(unparked)
            .build()
            .expect("runtime");
        let window = Duration::from_millis(30);
        runtime.spawn(run(window));
        runtime.block_on(async {
            // Client work every 2 ms for 60 ms (the timer would park the thread 30 times).
            for _ in 0..30 {
                note_work();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert_eq!(parks.load(Ordering::Relaxed), 0, "the thread parked while client work came");

            // No work: after the window the thread parks, and sleeping costs no CPU.
            tokio::time::sleep(window + Duration::from_millis(20)).await;
            let parked = parks.load(Ordering::Relaxed);
            assert!(parked > 0, "the thread never parked after the window");
            let cpu = thread_cpu();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let spent = thread_cpu() - cpu;
            assert!(spent < Duration::from_millis(30), "{spent:?} of CPU over 100 ms without work");

            // Work arriving with an unpark (here, the timer's) starts polling again.
            let parked = parks.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            note_work();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                note_work();
            }
            assert!(
                parks.load(Ordering::Relaxed) <= parked + 1,
                "the thread kept parking while client work came after a park"
            );
        });
    }
}
