//! The HSM executor's wake-up protocol (`src/hsm/executor/idle.rs`), model-checked with loom:
//! the same source file, compiled here against loom's atomics, mutex and condition variable, so
//! every interleaving of workers going to sleep and callers queueing jobs (within loom's
//! preemption bound) is tried. A job left in the queue while every worker sleeps is a deadlock
//! in these models (the caller waits for its job forever), which loom reports as a failure.
//!
//! What the models leave out, by design: the watchdog's once-every-250 ms wake-up for jobs left
//! queued (the protocol must not need it) and the crossbeam queue itself (a counter here: the
//! protocol only asks whether it is empty and how long it is).

#![allow(dead_code)]

/// loom's primitives under the names `idle.rs` uses.
mod sync {
    pub use loom::sync::atomic::{AtomicUsize, Ordering, fence};
    pub use loom::thread::yield_now;

    #[derive(Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("no thread panics while holding it")
        }
    }

    #[derive(Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).expect("no thread panics while holding it")
        }

        pub fn notify_one(&self) {
            self.0.notify_one();
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

#[path = "../src/hsm/executor/idle.rs"]
mod idle;

use loom::sync::atomic::AtomicUsize;
use loom::sync::atomic::Ordering::SeqCst;
use loom::sync::{Arc, Condvar, Mutex};

use idle::Idle;

/// The executor around `Idle`, as far as the protocol sees it: a queue (a count of jobs), and
/// a count of jobs done that the test waits on.
struct Executor {
    idle: Idle,
    queue: AtomicUsize,
    taken: AtomicUsize,
    done: Mutex<usize>,
    all_done: Condvar,
}

/// What the jobs are.
#[derive(Clone, Copy)]
enum Jobs {
    /// Calls to a library that answers fast: a busy worker may be left the next job.
    FastCalls,
    /// Calls to a slow or stalled library: every job wakes a sleeper.
    SlowCalls,
    /// Handed-over work (the worker is away meanwhile); the first one waits until another
    /// job is done, as a CA signature on another member waits on that member's worker.
    HandedOver,
}

impl Executor {
    fn new(workers: usize) -> Arc<Self> {
        let executor = Arc::new(Self {
            idle: Idle::default(),
            queue: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            done: Mutex::new(0),
            all_done: Condvar::new(),
        });
        for _ in 0..workers {
            executor.idle.join();
        }
        executor
    }

    /// A caller queues a job.
    fn submit(&self, jobs: Jobs) {
        let backlog = self.queue.fetch_add(1, SeqCst) + 1;
        self.idle.queued(backlog, !matches!(jobs, Jobs::SlowCalls));
    }

    /// Takes a job from the queue: its number, if there was one.
    fn take(&self) -> Option<usize> {
        self.queue.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).ok()?;
        Some(self.taken.fetch_add(1, SeqCst))
    }

    /// A worker's loop: take jobs, sleep when there is none, until the executor closes.
    fn work(&self, jobs: Jobs) {
        loop {
            if let Some(number) = self.take() {
                if let Jobs::HandedOver = jobs {
                    self.idle.away(&|| self.queue.load(SeqCst), true);
                    if number == 0 {
                        self.wait_done(1);
                    }
                    self.idle.back();
                }
                *self.done.lock().unwrap() += 1;
                self.all_done.notify_all();
                continue;
            }
            if !self.idle.sleep(&|| self.queue.load(SeqCst) > 0) {
                return;
            }
        }
    }

    /// Waits until `n` jobs are done: forever, and so a loom deadlock, if one was left behind.
    fn wait_done(&self, n: usize) {
        let mut done = self.done.lock().unwrap();
        while *done < n {
            done = self.all_done.wait(done).unwrap();
        }
    }
}

/// Runs `workers` workers and `callers` callers each queueing `each` jobs; every job must be
/// taken without the watchdog's help.
fn model(workers: usize, callers: usize, each: usize, jobs: Jobs) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(move || {
        let executor = Executor::new(workers);
        let total = callers * each;
        let workers: Vec<_> = (0..workers)
            .map(|_| {
                let executor = executor.clone();
                loom::thread::spawn(move || executor.work(jobs))
            })
            .collect();
        let callers: Vec<_> = (0..callers)
            .map(|_| {
                let executor = executor.clone();
                loom::thread::spawn(move || (0..each).for_each(|_| executor.submit(jobs)))
            })
            .collect();
        callers.into_iter().for_each(|c| c.join().unwrap());
        executor.wait_done(total);
        executor.idle.close();
        workers.into_iter().for_each(|w| w.join().unwrap());
    });
}

#[test]
fn a_lone_worker_never_sleeps_through_a_job_from_a_fast_library() {
    model(1, 1, 2, Jobs::FastCalls);
}

#[test]
fn a_lone_worker_never_sleeps_through_a_job_from_a_slow_library() {
    model(1, 1, 2, Jobs::SlowCalls);
}

#[test]
fn two_workers_take_two_callers_jobs() {
    model(2, 2, 1, Jobs::FastCalls);
}

#[test]
fn a_worker_away_on_handed_over_work_leaves_no_job_behind() {
    model(2, 1, 2, Jobs::HandedOver);
}
