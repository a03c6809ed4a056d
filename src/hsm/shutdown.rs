//! An orderly end for the PKCS#11 libraries: every thread that calls into a library holds a
//! `Busy` while it does (HSM workers for their whole life, other threads for one operation).
//! `shutdown` refuses new calls, closes the executors (their workers finish their call, close
//! their sessions and exit), waits for the last `Busy` to go, and finalizes each library
//! (C_Finalize) — so the process can exit normally, its C libraries' teardown running with no
//! thread inside them. A call that never comes back (a hung network HSM) holds its `Busy` past
//! the deadline: the process is then ended with `abort`, the one way out that runs no teardown
//! under it (core dumps are off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::HsmError;

/// Threads inside (or about to call into) a PKCS#11 library, and whether new ones may.
struct State {
    closing: bool,
    busy: usize,
}

static STATE: Mutex<State> = Mutex::new(State { closing: false, busy: 0 });
static CHANGED: Condvar = Condvar::new();

/// How long `shutdown` waits for calls in flight: the longest call deadline of any HSM opened.
static PATIENCE_MS: AtomicU64 = AtomicU64::new(2_000);

/// A thread's licence to call into a PKCS#11 library; released on drop.
#[must_use]
pub(super) struct Busy(());

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = STATE.lock();
        state.busy -= 1;
        CHANGED.notify_all();
    }
}

/// Threads that call into the libraries (workers, recovery), joined at shutdown.
static THREADS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// How long `shutdown` waits for those threads to be gone once their calls are done.
const THREADS_GONE: Duration = Duration::from_secs(1);

/// Starts a thread that calls into a PKCS#11 library. `shutdown` waits for it to have
/// exited, thread-local destructors included: a C library's per-thread cleanup (OpenSSL's,
/// under SoftHSM2) racing its process-wide cleanup at exit freed the same memory twice, about
/// once in 12,000 short commands.
pub(super) fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let handle = std::thread::Builder::new().name(name).spawn(f)?;
    let mut threads = THREADS.lock();
    threads.retain(|t| !t.is_finished());
    threads.push(handle);
    Ok(())
}

/// Joins the threads `spawn` started that have exited or exit within `THREADS_GONE`; one
/// still running by then (sleeping in a library's own thread, say) is left.
fn join_threads() {
    let deadline = Instant::now() + THREADS_GONE;
    loop {
        let (finished, running): (Vec<_>, Vec<_>) =
            std::mem::take(&mut *THREADS.lock()).into_iter().partition(|t| t.is_finished());
        for thread in finished {
            let _ = thread.join();
        }
        if running.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(threads = running.len(), "HSM threads still running at exit");
            THREADS.lock().extend(running);
            return;
        }
        THREADS.lock().extend(running);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Enters the libraries, unless the process is shutting down.
pub(super) fn enter() -> Result<Busy, HsmError> {
    let mut state = STATE.lock();
    if state.closing {
        return Err(HsmError::Unavailable("tollgate is shutting down".into()));
    }
    state.busy += 1;
    Ok(Busy(()))
}

/// Sleeps for `duration` or until shutdown begins; false when it has.
pub(super) fn sleep(duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    let mut state = STATE.lock();
    while !state.closing && !CHANGED.wait_until(&mut state, deadline).timed_out() {}
    !state.closing
}

/// Records an HSM's call deadline: `shutdown` waits at least that long for calls in flight.
pub(super) fn note_call_timeout(timeout: Duration) {
    PATIENCE_MS.fetch_max(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Ends all PKCS#11 use in the process: new calls are refused, the executors close, calls in
/// flight get the longest call deadline (at least one second) to come back, then every library
/// is finalized. When a call has not come back by then, the process is ended with `abort`.
pub fn shutdown() {
    STATE.lock().closing = true;
    CHANGED.notify_all();
    super::executor::close_all();
    let patience = Duration::from_millis(PATIENCE_MS.load(Ordering::Relaxed).max(1_000));
    let deadline = Instant::now() + patience;
    let mut state = STATE.lock();
    while state.busy > 0 {
        if CHANGED.wait_until(&mut state, deadline).timed_out() && state.busy > 0 {
            tracing::error!(
                calls = state.busy,
                waited_ms = patience.as_millis() as u64,
                "PKCS#11 calls never came back (a hung HSM?): ending the process without library teardown"
            );
            crate::logs::flush();
            eprintln!("error: {} PKCS#11 call(s) never came back; aborting", state.busy);
            std::process::abort();
        }
    }
    drop(state);
    join_threads();
    super::member::finalize_all();
}
