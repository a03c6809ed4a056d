//! Workers asleep for want of work, and when a queued job wakes one: only when the workers
//! awake would leave it waiting. That is when none is awake, when more jobs are queued than
//! workers are awake, or when the library is slow or stalled (a network HSM's round trip, a
//! hang: every job wakes a worker, as many as there are). Otherwise the busy worker takes the
//! job as it finishes its call: on a local token, waking a second worker for every job costs
//! context switches on both sides to save a wait of tens of microseconds (README, Performance).
//!
//! Awake means able to take the next job soon. A worker running handed-over work is not
//! (`away`): the work may wait on another library's workers (a CA signature on another member),
//! which may be waiting on this one's. A worker inside a library call that hangs is not either,
//! which nobody can know yet: a caller whose job no worker has taken when its wait in place
//! ends wakes one, and the watchdog wakes one for any job left queued. A worker written off as
//! stuck still counts as awake; its replacement takes the jobs, and while the library is
//! stalled every job wakes a worker anyway.
//!
//! The protocol, a Dekker-style pairing of SeqCst fences between a worker going to sleep and a
//! job's sender, is model-checked under loom by `tests/loom_idle.rs`, compiled from this very
//! file against loom's primitives (so it uses nothing of tollgate but `super::sync`).

use super::sync::{AtomicUsize, Condvar, Mutex, Ordering::SeqCst, fence, yield_now};

/// How many times a worker that found the queue empty yields its CPU, looking again each time,
/// before it sleeps: on a busy machine each yield lets the callers run, and a job they queue
/// meanwhile is taken without a wake-up (crossbeam's own receiver does the same before it parks).
const YIELDS: usize = 4;

/// The sleeping workers of one executor.
#[derive(Default)]
pub(super) struct Idle {
    /// Workers not asleep (running a job, or about to look at the queue): each looks at the
    /// queue again before it sleeps.
    awake: AtomicUsize,
    sleepers: Mutex<Sleepers>,
    wake: Condvar,
}

#[derive(Default)]
pub(super) struct Sleepers {
    pub(super) asleep: usize,
    /// Wake-ups sent and not yet taken; the woken count as awake from the moment they are sent,
    /// so one job never wakes two workers.
    woken: usize,
    /// The executor is gone: sleepers exit.
    closed: bool,
}

impl Idle {
    /// A worker joins, awake: it looks at the queue before it first sleeps.
    pub(super) fn join(&self) {
        self.awake.fetch_add(1, SeqCst);
    }

    /// A worker that could not start after `join`.
    pub(super) fn leave(&self) {
        self.awake.fetch_sub(1, SeqCst);
    }

    /// A worker that found the queue empty (`queued` says whether it still is): yields a few
    /// times, then sleeps until a job wakes it. False once the executor is closed.
    pub(super) fn rest(&self, queued: &dyn Fn() -> bool) -> bool {
        for _ in 0..YIELDS {
            yield_now();
            if queued() {
                return true;
            }
        }
        self.sleep(queued)
    }

    /// Sleeps until a job wakes this worker, unless one was queued meanwhile. False once the
    /// executor is closed.
    pub(super) fn sleep(&self, queued: &dyn Fn() -> bool) -> bool {
        let mut sleepers = self.sleepers.lock();
        self.awake.fetch_sub(1, SeqCst);
        // Pairs with the fence in `queued`: either this worker sees the job just queued, or
        // the job's sender sees this worker no longer awake.
        fence(SeqCst);
        if queued() || sleepers.closed {
            self.awake.fetch_add(1, SeqCst);
            return !sleepers.closed;
        }
        sleepers.asleep += 1;
        while sleepers.woken == 0 && !sleepers.closed {
            sleepers = self.wake.wait(sleepers);
        }
        sleepers.asleep -= 1;
        if sleepers.woken > 0 {
            // Its waker already counted it awake.
            sleepers.woken -= 1;
        } else {
            self.awake.fetch_add(1, SeqCst);
        }
        !sleepers.closed
    }

    /// After a job was queued (`backlog` jobs in the queue now): wakes a sleeping worker if the
    /// workers awake would leave it waiting (`fast`: the library answers fast and is not
    /// stalled). Whether it woke one.
    pub(super) fn queued(&self, backlog: usize, fast: bool) -> bool {
        fence(SeqCst);
        let awake = self.awake.load(SeqCst);
        if awake > 0 && fast && backlog <= awake {
            return false;
        }
        self.wake_one()
    }

    /// A worker starts handed-over work (`backlog` jobs queued, read after it stopped counting
    /// as awake): it no longer counts as awake until `back`, and jobs already queued get a
    /// worker that is.
    pub(super) fn away(&self, backlog: &dyn Fn() -> usize, fast: bool) {
        self.awake.fetch_sub(1, SeqCst);
        // Pairs with the fence in `queued`, as in `sleep`.
        fence(SeqCst);
        let backlog = backlog();
        if backlog > 0 {
            self.queued(backlog, fast);
        }
    }

    /// The worker is back from handed-over work.
    pub(super) fn back(&self) {
        self.awake.fetch_add(1, SeqCst);
    }

    /// Wakes a sleeping worker, if one is asleep and not already woken.
    pub(super) fn wake_one(&self) -> bool {
        let mut sleepers = self.sleepers.lock();
        let wake = sleepers.asleep > sleepers.woken;
        if wake {
            sleepers.woken += 1;
            self.awake.fetch_add(1, SeqCst);
            self.wake.notify_one();
        }
        wake
    }

    /// The executor closes: sleepers wake and exit, and workers going to sleep exit instead.
    pub(super) fn close(&self) {
        self.sleepers.lock().closed = true;
        self.wake.notify_all();
    }

    /// Workers asleep now.
    #[cfg(test)]
    pub(super) fn asleep(&self) -> usize {
        self.sleepers.lock().asleep
    }
}
