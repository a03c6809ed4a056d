//! The HSM executor: a pool of OS threads per PKCS#11 library, fed by a bounded queue, each
//! job with a deadline. Not tokio's blocking pool: a PKCS#11 call to a dropped network HSM can
//! hang for minutes, and it must not starve anything else.
//!
//! - This file: the queue, the workers and the calls. Each worker owns its sessions (cryptoki
//!   sessions are `Send` but not `Sync`), one per connection it has served; a session that
//!   errored is closed, never reused. A caller whose job misses its deadline gets `Timeout`
//!   (and marks the member down). Work can also be handed over whole (`hand_over`): a
//!   cache-miss mint runs on a worker, and its CA signature, a call on this executor from its
//!   own worker, is made right there in that worker's session.
//! - `idle.rs`: when a queued job wakes a sleeping worker (model-checked under loom).
//! - `pace.rs`: whether a caller waits for its answer in place or under its offload.
//! - `reply.rs`: how a caller waits.
//! - `watchdog.rs`: overdue handed-over calls, stuck workers (replaced, and leaked: an FFI call
//!   cannot be cancelled), jobs left queued.
//!
//! Workers end when their executor closes (dropped, or `shutdown::shutdown`): each finishes its
//! call, closes its sessions and exits, so the process can finalize the library and exit.

mod idle;
mod pace;
mod reply;
mod sync;
mod watchdog;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst,
};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rustls::SignatureScheme;

use super::HsmError;
use super::member::{Connection, OwnedSession};
use super::shutdown::{self, Busy};
use crate::keys::KeyAlgorithm;
use idle::Idle;
use pace::Pace;
use reply::Reply;
use watchdog::{Handed, HandedCall, Slot, finished, stamp};

/// The most workers a library may have, replacements of stuck ones included.
const MAX_WORKERS_FACTOR: usize = 4;

/// How a caller on an async worker spends a long wait: it runs the wait it is given, e.g. under
/// `tokio::task::block_in_place`, which hands the worker's other tasks to another thread. A
/// caller that may block freely passes `&|wait| wait()`.
pub(super) type Offload<'a> = &'a dyn Fn(&mut dyn FnMut());

/// Told of a call a worker made for handed-over work that is past its deadline: the
/// connection, its server's name, the deadline in ms.
pub(super) type Overdue = Arc<dyn Fn(&Arc<Connection>, &str, u64) + Send + Sync>;

/// One library's worker pool.
pub(super) struct Executor {
    /// Tells this executor's workers from every other executor's.
    id: usize,
    library: String,
    queue: Sender<Job>,
    jobs: Receiver<Job>,
    workers: usize,
    slots: parking_lot::Mutex<Vec<Arc<Slot>>>,
    /// Calls being made for handed-over work now: with none, `report_overdue` (run before every
    /// member pick, an inbound handshake's included) takes no lock.
    handed_calls: AtomicUsize,
    spawned: AtomicUsize,
    epoch: Instant,
    gauge: Arc<crate::telemetry::QueueGauge>,
    pace: Arc<Pace>,
    idle: Arc<Idle>,
    overdue: Overdue,
    /// Closed: new jobs are refused and the workers exit.
    closed: Arc<AtomicBool>,
}

/// What a worker does.
pub(super) enum Op {
    Sign { label: String, algorithm: KeyAlgorithm, scheme: SignatureScheme, message: Vec<u8> },
}

enum Job {
    Call(Call),
    Work { work: super::Work, deadline: Instant },
}

struct Call {
    conn: Arc<Connection>,
    server: String,
    op: Op,
    deadline: Instant,
    reply: Arc<Reply>,
}

/// Set on a worker thread: which executor it serves, the sessions it owns and its slot.
struct Here {
    executor: usize,
    sessions: HashMap<u64, OwnedSession>,
    slot: Arc<Slot>,
}

thread_local! {
    static HERE: RefCell<Option<Here>> = const { RefCell::new(None) };
}

static EXECUTOR_IDS: AtomicUsize = AtomicUsize::new(1);

/// Every executor of the process, for `close_all`.
static EXECUTORS: parking_lot::Mutex<Vec<Weak<Executor>>> = parking_lot::Mutex::new(Vec::new());

/// Closes every executor of the process (shutdown).
pub(super) fn close_all() {
    let executors: Vec<Arc<Executor>> = EXECUTORS.lock().iter().filter_map(Weak::upgrade).collect();
    for executor in executors {
        executor.close();
    }
}

impl Executor {
    /// Starts `workers` threads serving a queue of `depth` jobs; `overdue` hears of calls made
    /// for handed-over work that outlive their deadline.
    pub(super) fn start(library: &str, workers: usize, depth: usize, overdue: Overdue) -> Arc<Self> {
        let (queue, jobs) = crossbeam_channel::bounded(depth.max(1));
        let executor = Arc::new(Self {
            id: EXECUTOR_IDS.fetch_add(1, Relaxed),
            library: library.to_string(),
            queue,
            jobs,
            workers: workers.max(1),
            slots: parking_lot::Mutex::new(Vec::new()),
            handed_calls: AtomicUsize::new(0),
            spawned: AtomicUsize::new(0),
            epoch: Instant::now(),
            gauge: crate::telemetry::QueueGauge::register(library),
            pace: Arc::default(),
            idle: Arc::default(),
            overdue,
            closed: Arc::default(),
        });
        {
            let mut executors = EXECUTORS.lock();
            executors.retain(|e| e.strong_count() > 0);
            executors.push(Arc::downgrade(&executor));
        }
        for _ in 0..executor.workers {
            executor.spawn_worker();
        }
        executor.start_watchdog();
        executor
    }

    /// Runs `op` on `conn` and waits for it, at most `timeout`; a wait longer than the inline
    /// budget is spent under `offload`.
    pub(super) fn call(
        &self,
        conn: &Arc<Connection>,
        server: &str,
        op: Op,
        timeout: Duration,
        offload: Offload,
    ) -> Result<Vec<u8>, HsmError> {
        let op = match self.call_here(conn, server, op, timeout) {
            Ok(result) => return result,
            Err(op) => op,
        };
        if self.is_closed() {
            return Err(HsmError::Unavailable("the HSM workers have stopped".into()));
        }
        let reply = Arc::new(Reply::default());
        let started = Instant::now();
        let deadline = started + timeout;
        let job =
            Job::Call(Call { conn: conn.clone(), server: server.to_string(), op, deadline, reply: reply.clone() });
        let inline = self.pace.inline_budget(started.duration_since(self.epoch));
        let fast = !inline.is_zero();
        self.pace.started();
        match self.queue.try_send(job) {
            Ok(()) => self.queued(fast),
            Err(e) => {
                self.pace.dropped();
                return Err(match e {
                    TrySendError::Full(_) => HsmError::QueueFull { library: self.library.clone() },
                    TrySendError::Disconnected(_) => HsmError::Unavailable("executor stopped".into()),
                });
            }
        }
        // A job left to a busy worker (`Idle`), which may be stuck in the library, and still not
        // taken when the wait in place ends wakes another.
        let untaken = || {
            if fast && !reply.taken.load(SeqCst) {
                self.idle.wake_one();
            }
        };
        let result = reply.wait(started + inline, deadline, offload, &untaken);
        result.unwrap_or_else(|| {
            Err(HsmError::Timeout { server: server.to_string(), millis: timeout.as_millis() as u64 })
        })
    }

    /// Whether this thread is one of this executor's workers.
    pub(super) fn runs_this_thread(&self) -> bool {
        HERE.with(|here| here.try_borrow().is_ok_and(|here| here.as_ref().is_some_and(|h| h.executor == self.id)))
    }

    /// A call from one of this executor's own workers (running handed-over work) is made right
    /// there, in that worker's sessions: queueing it would only add a hand-off, and with every
    /// worker running handed-over work nobody would take it. Gives `op` back on any other thread.
    fn call_here(
        &self,
        conn: &Arc<Connection>,
        server: &str,
        op: Op,
        timeout: Duration,
    ) -> Result<Result<Vec<u8>, HsmError>, Op> {
        HERE.with(|here| {
            let Ok(mut here) = here.try_borrow_mut() else { return Err(op) };
            let Some(here) = here.as_mut().filter(|h| h.executor == self.id) else { return Err(op) };
            self.pace.started();
            let began = Instant::now();
            let stamp = stamp(self.epoch, began);
            let timeout_ms = timeout.as_millis() as u64;
            let deadline = stamp + timeout_ms;
            *here.slot.handed.lock() =
                Some(Handed { conn: conn.clone(), server: server.to_string(), deadline, timeout_ms });
            here.slot.busy.store(stamp, Relaxed);
            self.handed_calls.fetch_add(1, Relaxed);
            let _call = HandedCall { executor: self, slot: &here.slot, began };
            Ok(run(conn, server, &op, &mut here.sessions))
        })
    }

    /// Queues `work` for a worker; it is dropped unrun if no worker takes it by `deadline`.
    /// Gives it back when the queue is full or the executor closed.
    pub(super) fn hand_over(&self, work: super::Work, deadline: Instant) -> Result<(), super::Work> {
        if self.is_closed() {
            return Err(work);
        }
        match self.queue.try_send(Job::Work { work, deadline }) {
            Ok(()) => {
                self.queued(self.pace.answering_fast(self.epoch.elapsed()));
                Ok(())
            }
            Err(TrySendError::Full(Job::Work { work, .. }) | TrySendError::Disconnected(Job::Work { work, .. })) => {
                Err(work)
            }
            Err(_) => unreachable!("a work job was sent"),
        }
    }

    /// A job was queued: the gauge, and a sleeping worker woken if the awake ones would leave
    /// it waiting (`fast`: the library answers fast and is not stalled).
    fn queued(&self, fast: bool) {
        let backlog = self.queue.len();
        self.gauge.set(backlog);
        self.idle.queued(backlog, fast);
    }

    /// Closes the executor: new jobs are refused, queued ones answered `Unavailable`, and the
    /// workers exit once their current call is done (closing their sessions).
    fn close(&self) {
        self.closed.store(true, Release);
        self.idle.close();
    }

    /// Whether the executor has closed.
    fn is_closed(&self) -> bool {
        self.closed.load(Acquire)
    }

    fn spawn_worker(self: &Arc<Self>) {
        if self.spawned.fetch_add(1, Relaxed) >= self.workers * MAX_WORKERS_FACTOR {
            self.spawned.fetch_sub(1, Relaxed);
            tracing::error!(library = %self.library, "HSM workers exhausted by stuck calls; not starting more");
            return;
        }
        let Ok(busy) = shutdown::enter() else { return };
        let slot = Arc::new(Slot::default());
        self.slots.lock().push(slot.clone());
        let here = Here { executor: self.id, sessions: HashMap::new(), slot };
        let worker = Worker {
            jobs: self.jobs.clone(),
            epoch: self.epoch,
            gauge: self.gauge.clone(),
            pace: self.pace.clone(),
            idle: self.idle.clone(),
            closed: self.closed.clone(),
        };
        let name = format!("hsm-{}", self.spawned.load(Relaxed));
        // Awake from the start: it looks at the queue before it first sleeps.
        self.idle.join();
        let spawned = shutdown::spawn(name, move || worker.run(here, busy));
        if let Err(e) = spawned {
            self.idle.leave();
            tracing::error!(library = %self.library, error = %e, "cannot start an HSM worker");
        }
    }
}

impl Drop for Executor {
    /// Sleeping workers exit (the queue's sender is still alive until the fields drop).
    fn drop(&mut self) {
        self.close();
    }
}

/// What a worker thread holds of its executor (not the executor itself: dropping the last
/// `Hsm` must close it while its workers still run).
struct Worker {
    jobs: Receiver<Job>,
    epoch: Instant,
    gauge: Arc<crate::telemetry::QueueGauge>,
    pace: Arc<Pace>,
    idle: Arc<Idle>,
    closed: Arc<AtomicBool>,
}

impl Worker {
    /// Takes jobs until the executor closes; then closes its sessions and lets `busy` go.
    fn run(self, here: Here, busy: Busy) {
        // The sessions this worker opened, by connection id, live in `HERE` so that handed-over
        // work's calls find them. A session of a library generation that was re-initialised
        // away is dropped without closing (its handle may now name someone else's session);
        // see `OwnedSession`.
        let slot = here.slot.clone();
        HERE.with(|h| *h.borrow_mut() = Some(here));
        let jobs = &self.jobs;
        loop {
            let job = match jobs.try_recv() {
                Ok(job) => job,
                Err(crossbeam_channel::TryRecvError::Empty) if self.idle.rest(&|| !jobs.is_empty()) => continue,
                Err(_) => break,
            };
            if self.closed.load(Acquire) {
                refuse(job);
                continue;
            }
            self.gauge.set(jobs.len());
            with_sessions(|sessions| sessions.retain(|_, session| session.is_live()));
            match job {
                Job::Call(call) => self.call(call, &slot),
                Job::Work { work, deadline } => self.work(work, deadline),
            }
        }
        while let Ok(job) = jobs.try_recv() {
            refuse(job);
        }
        // Sessions closed (while their library generation is live) before `busy` lets the
        // library be finalized.
        drop(HERE.with(|h| h.borrow_mut().take()));
        drop(busy);
    }

    fn call(&self, call: Call, slot: &Slot) {
        call.reply.taken.store(true, SeqCst);
        if Instant::now() >= call.deadline {
            let Call { server, reply, .. } = call;
            self.pace.dropped();
            reply.send(Err(HsmError::Timeout { server, millis: 0 }));
            return;
        }
        let began = Instant::now();
        slot.busy.store(stamp(self.epoch, began), Relaxed);
        let result = with_sessions(|sessions| run(&call.conn, &call.server, &call.op, sessions))
            .unwrap_or_else(|| Err(HsmError::Unavailable("HSM worker without its sessions".into())));
        finished(&slot.busy, &self.pace, began.elapsed(), self.epoch.elapsed());
        // Let go of the connection before answering: once answered, the caller may drop the
        // `Hsm`, and the last reference must not be this thread's.
        let Call { conn, reply, .. } = call;
        drop(conn);
        reply.send(result);
    }

    fn work(&self, work: super::Work, deadline: Instant) {
        // Past its deadline the caller has stopped waiting: dropping the work unrun tells it so
        // (whatever it would answer through is dropped with it).
        if Instant::now() >= deadline {
            return;
        }
        self.idle.away(&|| self.jobs.len(), self.pace.answering_fast(self.epoch.elapsed()));
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
            tracing::error!("work handed over to an HSM worker panicked");
        }
        self.idle.back();
    }
}

/// A job the closed executor will not run: a call is told so, work is dropped unrun.
fn refuse(job: Job) {
    if let Job::Call(call) = job {
        call.reply.send(Err(HsmError::Unavailable("the HSM workers have stopped".into())));
    }
}

/// Runs `f` on this worker thread's sessions (`None` off a worker).
fn with_sessions<R>(f: impl FnOnce(&mut HashMap<u64, OwnedSession>) -> R) -> Option<R> {
    HERE.with(|here| here.borrow_mut().as_mut().map(|here| f(&mut here.sessions)))
}

fn run(
    conn: &Arc<Connection>,
    server: &str,
    op: &Op,
    sessions: &mut HashMap<u64, OwnedSession>,
) -> Result<Vec<u8>, HsmError> {
    let id = conn.id();
    let session = match sessions.entry(id) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(conn.open_session(server)?),
    };
    let result = match op {
        Op::Sign { label, algorithm, scheme, message } => {
            conn.sign(session, server, label, *algorithm, *scheme, message)
        }
    };
    if result.is_err() {
        // Closed (when still live) by dropping: never reused after an error.
        sessions.remove(&id);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_over_call_that_panics_leaves_its_slot_idle() {
        let executor = Executor::start("test-library", 1, 4, Arc::new(|_, _, _| {}));
        let slot = Slot::default();
        let began = Instant::now();
        slot.busy.store(stamp(executor.epoch, began), Relaxed);
        executor.handed_calls.fetch_add(1, Relaxed);
        executor.pace.started();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _call = HandedCall { executor: &executor, slot: &slot, began };
            panic!("inside the library call");
        }));
        assert!(panicked.is_err());
        assert_eq!(slot.busy.load(Relaxed), 0, "the watchdog must not write the worker off");
        assert_eq!(executor.handed_calls.load(Relaxed), 0, "no call is left to report overdue");
        assert_eq!(executor.pace.pending.load(Relaxed), 0, "the call stops counting as pending");
    }

    /// Waits up to 10 s for `n` workers to fall asleep.
    fn wait_until_asleep(idle: &Idle, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while idle.asleep() < n {
            assert!(Instant::now() < deadline, "the idle workers never went to sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to 10 s for `n` signals from jobs.
    fn wait_for_jobs(finished: &crossbeam_channel::Receiver<()>, n: usize, what: &str) {
        for i in 0..n {
            if finished.recv_timeout(Duration::from_secs(10)).is_err() {
                panic!("{what}: job {} of {n} never ran (a worker slept through it)", i + 1);
            }
        }
    }

    #[test]
    fn work_that_waits_on_something_else_does_not_hold_up_the_queue() {
        // The first job waits (as a CA signature on another library's member would) until the
        // second has run: the second must wake the sleeping worker, not wait for the busy one.
        let executor = Executor::start("test-away", 2, 4, Arc::new(|_, _, _| {}));
        let (second_ran, wait_for_second) = crossbeam_channel::bounded::<()>(1);
        let (first_done, finished) = crossbeam_channel::bounded(1);
        let first: super::super::Work = Box::new(move || {
            let _ = first_done.send(wait_for_second.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        let second: super::super::Work = Box::new(move || {
            let _ = second_ran.send(());
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        assert!(executor.hand_over(first, deadline).is_ok());
        std::thread::sleep(Duration::from_millis(50));
        assert!(executor.hand_over(second, deadline).is_ok());
        assert_eq!(finished.recv_timeout(Duration::from_secs(20)), Ok(true), "the second job waited for the first");
    }

    #[test]
    fn the_watchdog_wakes_a_worker_for_a_job_left_behind_one_that_is_not_coming_back() {
        let executor = Executor::start("test-stranded", 2, 4, Arc::new(|_, _, _| {}));
        wait_until_asleep(&executor.idle, 2);
        // A worker that looks awake but is not coming back (stuck in a call the pace has not
        // noticed yet): the job is left to it, and nobody is woken when it is queued.
        executor.idle.join();
        let (done, finished) = crossbeam_channel::bounded(1);
        let work: super::super::Work = Box::new(move || {
            let _ = done.send(());
        });
        assert!(executor.hand_over(work, Instant::now() + Duration::from_secs(60)).is_ok());
        wait_for_jobs(&finished, 1, "a job left behind a worker that looked awake");
    }

    #[test]
    fn every_job_is_taken_however_the_workers_sleep() {
        let executor = Executor::start("test-wake-ups", 2, 64, Arc::new(|_, _, _| {}));
        let (done, finished) = crossbeam_channel::unbounded();
        let submit = |executor: &Executor, done: &crossbeam_channel::Sender<()>| {
            let done = done.clone();
            let mut work: super::super::Work = Box::new(move || {
                let _ = done.send(());
            });
            while let Err(back) = executor.hand_over(work, Instant::now() + Duration::from_secs(60)) {
                work = back;
                std::thread::yield_now();
            }
        };
        // One job at a time, queued as the workers go to sleep or after they have: each must
        // wake one.
        for i in 0..20_000u32 {
            let pause = Instant::now() + Duration::from_nanos(u64::from(i % 64) * 250);
            while Instant::now() < pause {
                std::hint::spin_loop();
            }
            submit(&executor, &done);
            wait_for_jobs(&finished, 1, "a lone job");
        }
        // Bursts from four threads, with pauses that let the workers sleep in between; the last
        // jobs have nobody queueing after them.
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (executor, done) = (&executor, &done);
                scope.spawn(move || {
                    for i in 0..2_000 {
                        submit(executor, done);
                        if (i + t) % 97 == 0 {
                            std::thread::sleep(Duration::from_micros(300));
                        }
                    }
                });
            }
        });
        wait_for_jobs(&finished, 8_000, "bursts");
    }

    #[test]
    fn workers_exit_with_their_executor_and_queued_calls_are_answered() {
        let executor = Executor::start("test-exit", 2, 4, Arc::new(|_, _, _| {}));
        let idle = executor.idle.clone();
        wait_until_asleep(&idle, 2);
        drop(executor);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&idle) > 1 {
            assert!(Instant::now() < deadline, "workers outlived their executor");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
