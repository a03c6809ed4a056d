//! The HSM executor: a pool of OS threads per PKCS#11 library, fed by a bounded queue, each
//! job with a deadline. Not tokio's blocking pool: a PKCS#11 call to a dropped network HSM can
//! hang for minutes, and it must not starve anything else.
//!
//! Each worker owns its sessions (cryptoki sessions are `Send` but not `Sync`), one per
//! connection it has served. A queued job wakes a sleeping worker only when the workers awake
//! would leave it waiting (`Idle`). A session that errored is closed, never reused. A caller
//! whose job misses its deadline gets `Timeout` (and marks the member down); a worker stuck
//! inside a call is replaced so the other members keep being served, and leaked (an FFI call
//! cannot be cancelled).
//!
//! Work can also be handed over whole (`hand_over`): a cache-miss mint runs on a worker, and its
//! CA signature, a call on this executor from its own worker, is made right there in that
//! worker's session instead of being queued for another thread. A handed-over call has no
//! deadline of its own to wait out; the watchdog reports it to the HSM layer once past its
//! deadline (`Overdue`), which takes the member out, and the caller that handed the work over
//! stops waiting for it at the same deadline.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst, fence};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rustls::SignatureScheme;

use super::HsmError;
use super::member::{Connection, OwnedSession};
use crate::keys::{KeyAlgorithm, Offload, Work};

/// The most workers a library may have, replacements of stuck ones included.
const MAX_WORKERS_FACTOR: usize = 4;

/// How long a caller waits for its job in place before spending the rest of the wait under its
/// offload (on a tokio worker: a hand-off of the worker's other tasks to another thread, which
/// costs more than a local token's signature). Only while the library answers fast and is not
/// stalled (see `Pace`), so a slow or hung HSM is offloaded at once. Not shorter: on a virtual
/// machine a timed wait that arms the earliest timer costs a hypervisor exit to arm and one to
/// disarm (measured per SoftHSM2 signature: 81 µs with a 200-500 µs wait, 64 µs with 5 ms).
const INLINE_WAIT: Duration = Duration::from_millis(5);

/// A library answering slower than this per call (mean time inside it) is waited for under
/// the offload: a network HSM's round trip. SoftHSM2 signs in ~45 µs.
const FAST_SERVICE: Duration = Duration::from_micros(250);

/// Calls pending and no answer for this long: the library is stalled (a hung network HSM
/// whose calls have not come back yet, so their times are not in the mean).
const STALLED_AFTER: Duration = Duration::from_millis(2);

/// How many times a worker that found the queue empty yields its CPU, looking again each time,
/// before it sleeps: on a busy machine each yield lets the callers run, and a job they queue
/// meanwhile is taken without a wake-up (crossbeam's own receiver does the same before it parks).
const YIELDS: usize = 4;

/// A worker busy this long is stuck in the library: it is written off and replaced.
const STUCK_MS: u64 = 5_000;

/// A worker's `busy` stamp once the watchdog has written its call off.
const WRITTEN_OFF: u64 = u64::MAX;

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
}

/// What the watchdog sees of a worker.
#[derive(Default)]
struct Slot {
    /// Milliseconds since `epoch` when its current library call started, 0 when none.
    busy: AtomicU64,
    /// The call it is making for handed-over work, until reported overdue.
    handed: parking_lot::Mutex<Option<Handed>>,
}

/// A call a worker makes for handed-over work: no caller waits out its deadline.
struct Handed {
    conn: Arc<Connection>,
    server: String,
    /// Milliseconds since `epoch`.
    deadline: u64,
    timeout_ms: u64,
}

/// Ends a call made for handed-over work however it ends, a panic included (the worker
/// survives those): left in its slot, it would be reported overdue and take a healthy member
/// out, and the worker would be written off as stuck.
struct HandedCall<'a> {
    executor: &'a Executor,
    slot: &'a Slot,
    began: Instant,
}

impl Drop for HandedCall<'_> {
    fn drop(&mut self) {
        let executor = self.executor;
        finished(&self.slot.busy, &executor.pace, self.began.elapsed(), executor.epoch.elapsed());
        self.slot.handed.lock().take();
        executor.handed_calls.fetch_sub(1, Relaxed);
    }
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

/// How the library has been answering: whether callers wait in place.
#[derive(Default)]
struct Pace {
    /// Time inside the library per call, µs (an exponentially weighted mean). The library's own
    /// time, measured by the worker: a caller's wait also holds queueing and its own wake-up on
    /// a busy machine, which say nothing about the HSM.
    service_us: AtomicU64,
    /// When a worker last finished a call, µs since the executor's epoch.
    answered_at_us: AtomicU64,
    /// Calls queued or running, less those written off as stuck.
    pending: AtomicUsize,
}

impl Pace {
    fn answered(&self, took: Duration, now: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mean = self.service_us.load(Relaxed);
        self.service_us.store(mean - mean / 8 + sample / 8, Relaxed);
        self.answered_at_us.store(u64::try_from(now.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.pending.fetch_sub(1, Relaxed);
    }

    /// A call that will not be answered from the library (refused by the full queue, expired
    /// before a worker took it, or written off as stuck) stops counting as pending: a stuck one
    /// left counted would make the library look stalled whenever it idles for `STALLED_AFTER`,
    /// for good, and every caller would be offloaded.
    fn dropped(&self) {
        self.pending.fetch_sub(1, Relaxed);
    }

    /// How long the next caller waits in place (`now`: since the executor's epoch):
    /// `INLINE_WAIT` while the library answers fast and is not stalled, nothing otherwise.
    fn inline_budget(&self, now: Duration) -> Duration {
        match self.answering_fast(now) {
            true => INLINE_WAIT,
            false => Duration::ZERO,
        }
    }

    /// Whether the library answers fast and is not stalled (`now`: since the executor's epoch).
    fn answering_fast(&self, now: Duration) -> bool {
        let fast = Duration::from_micros(self.service_us.load(Relaxed)) <= FAST_SERVICE;
        let silent = now.saturating_sub(Duration::from_micros(self.answered_at_us.load(Relaxed)));
        let stalled = self.pending.load(Relaxed) > 0 && silent > STALLED_AFTER;
        fast && !stalled
    }
}

/// Workers asleep for want of work, and when a queued job wakes one: only when the workers
/// awake would leave it waiting. That is when none is awake, when more jobs are queued than
/// workers are awake, or when the library is slow or stalled (a network HSM's round trip, a
/// hang: every job wakes a worker, as many as there are). Otherwise the busy worker takes the
/// job as it finishes its call: on a local token, waking a second worker for every job costs
/// context switches on both sides to save a wait of tens of microseconds (README, Performance).
///
/// Awake means able to take the next job soon. A worker running handed-over work is not: the
/// work may wait on another library's workers (a CA signature on another member), which may
/// be waiting on this one's (handed-over work signs on its own library first, so that is only
/// on a retry). A worker inside a library call that hangs is not either, which nobody can know
/// yet: a caller whose job no worker has taken when its wait in place ends wakes one, and the
/// watchdog wakes one for any job left queued. A worker written off as stuck still counts as
/// awake; its replacement takes the jobs, and while the library is stalled every job wakes a
/// worker anyway.
#[derive(Default)]
struct Idle {
    /// Workers not asleep (running a job, or about to look at the queue): each looks at the
    /// queue again before it sleeps.
    awake: AtomicUsize,
    sleepers: parking_lot::Mutex<Sleepers>,
    wake: parking_lot::Condvar,
}

#[derive(Default)]
struct Sleepers {
    asleep: usize,
    /// Wake-ups sent and not yet taken; the woken count as awake from the moment they are sent,
    /// so one job never wakes two workers.
    woken: usize,
    /// The executor is gone: sleepers exit.
    closed: bool,
}

impl Idle {
    /// A worker that found the queue empty: yields a few times, then sleeps until a job wakes
    /// it. False once the executor is gone.
    fn rest(&self, jobs: &Receiver<Job>) -> bool {
        for _ in 0..YIELDS {
            std::thread::yield_now();
            if !jobs.is_empty() {
                return true;
            }
        }
        self.sleep(jobs)
    }

    /// Sleeps until a job wakes this worker, unless one was queued meanwhile. False once the
    /// executor is gone.
    fn sleep(&self, jobs: &Receiver<Job>) -> bool {
        let mut sleepers = self.sleepers.lock();
        self.awake.fetch_sub(1, SeqCst);
        // Pairs with the fence in `queued`: either this worker sees the job just queued, or
        // the job's sender sees this worker no longer awake.
        fence(SeqCst);
        if !jobs.is_empty() || sleepers.closed {
            self.awake.fetch_add(1, SeqCst);
            return !sleepers.closed;
        }
        sleepers.asleep += 1;
        while sleepers.woken == 0 && !sleepers.closed {
            self.wake.wait(&mut sleepers);
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
    fn queued(&self, backlog: usize, fast: bool) -> bool {
        fence(SeqCst);
        let awake = self.awake.load(SeqCst);
        if awake > 0 && fast && backlog <= awake {
            return false;
        }
        self.wake_one()
    }

    /// A worker starts handed-over work: it stops counting as awake until `back`, and jobs
    /// already queued get a worker that is.
    fn away(&self, jobs: &Receiver<Job>, fast: bool) {
        self.awake.fetch_sub(1, SeqCst);
        // Pairs with the fence in `queued`, as in `sleep`.
        fence(SeqCst);
        let backlog = jobs.len();
        if backlog > 0 {
            self.queued(backlog, fast);
        }
    }

    fn back(&self) {
        self.awake.fetch_add(1, SeqCst);
    }

    /// Wakes a sleeping worker, if one is asleep and not already woken.
    fn wake_one(&self) -> bool {
        let mut sleepers = self.sleepers.lock();
        let wake = sleepers.asleep > sleepers.woken;
        if wake {
            sleepers.woken += 1;
            self.awake.fetch_add(1, SeqCst);
            self.wake.notify_one();
        }
        wake
    }

    fn close(&self) {
        self.sleepers.lock().closed = true;
        self.wake.notify_all();
    }
}

/// What a worker does.
pub(super) enum Op {
    Sign { label: String, algorithm: KeyAlgorithm, scheme: SignatureScheme, message: Vec<u8> },
}

enum Job {
    Call(Call),
    Work { work: Work, deadline: Instant },
}

struct Call {
    conn: Arc<Connection>,
    server: String,
    op: Op,
    deadline: Instant,
    reply: Arc<Reply>,
}

/// Where a worker leaves a job's result. The caller sleeps on a condition variable rather than
/// on a channel: a channel's receiver spins and yields before it sleeps, and with a signature
/// taking tens of microseconds that spinning takes the CPU from the very worker being waited
/// for (measured on the 2-core bench machine: 6 % of all cycles in a mint loop).
#[derive(Default)]
struct Reply {
    /// A worker has taken the job.
    taken: std::sync::atomic::AtomicBool,
    result: parking_lot::Mutex<Option<Result<Vec<u8>, HsmError>>>,
    ready: parking_lot::Condvar,
}

impl Reply {
    fn send(&self, result: Result<Vec<u8>, HsmError>) {
        *self.result.lock() = Some(result);
        self.ready.notify_one();
    }

    fn wait_until(&self, deadline: Instant) -> Option<Result<Vec<u8>, HsmError>> {
        let mut result = self.result.lock();
        while result.is_none() {
            if self.ready.wait_until(&mut result, deadline).timed_out() {
                break;
            }
        }
        result.take()
    }

    /// Waits in place until `inline`, then under `offload` until `deadline`; `late` runs between
    /// the two.
    fn wait(
        &self,
        inline: Instant,
        deadline: Instant,
        offload: Offload,
        late: &dyn Fn(),
    ) -> Option<Result<Vec<u8>, HsmError>> {
        let mut result = self.wait_until(inline.min(deadline));
        if result.is_none() && Instant::now() < deadline {
            late();
            offload(&mut || result = self.wait_until(deadline));
        }
        result
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
        });
        for _ in 0..executor.workers {
            executor.spawn_worker();
        }
        let watchdog = Arc::downgrade(&executor);
        let _ = std::thread::Builder::new().name("hsm-watchdog".into()).spawn(move || {
            while let Some(executor) = watchdog.upgrade() {
                executor.report_overdue();
                executor.replace_stuck_workers();
                executor.wake_for_stranded_jobs();
                drop(executor);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
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
        let reply = Arc::new(Reply::default());
        let started = Instant::now();
        let deadline = started + timeout;
        let job =
            Job::Call(Call { conn: conn.clone(), server: server.to_string(), op, deadline, reply: reply.clone() });
        let inline = self.pace.inline_budget(started.duration_since(self.epoch));
        let fast = !inline.is_zero();
        self.pace.pending.fetch_add(1, Relaxed);
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
            self.pace.pending.fetch_add(1, Relaxed);
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
    /// Gives it back when the queue is full.
    pub(super) fn hand_over(&self, work: Work, deadline: Instant) -> Result<(), Work> {
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

    /// The watchdog's safety net: jobs queued while a worker sleeps (left to a worker that
    /// looked awake and is not coming back soon, such as one stuck in a hung call) wake it. At
    /// most one wake-up per watchdog round.
    fn wake_for_stranded_jobs(&self) {
        if !self.queue.is_empty() {
            self.idle.wake_one();
        }
    }

    /// A job was queued: the gauge, and a sleeping worker woken if the awake ones would leave
    /// it waiting (`fast`: the library answers fast and is not stalled).
    fn queued(&self, fast: bool) {
        let backlog = self.queue.len();
        self.gauge.set(backlog);
        self.idle.queued(backlog, fast);
    }

    /// Reports each call made for handed-over work that is past its deadline, once: from the
    /// watchdog, and before the HSM layer picks a member (a caller that stopped waiting for such
    /// work at the deadline goes on at once, and must not pick the hung member again).
    pub(super) fn report_overdue(&self) {
        if self.handed_calls.load(Relaxed) == 0 {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let overdue: Vec<Handed> = {
            let slots = self.slots.lock();
            slots.iter().filter_map(|slot| slot.handed.lock().take_if(|h| now > h.deadline)).collect()
        };
        for handed in overdue {
            (self.overdue)(&handed.conn, &handed.server, handed.timeout_ms);
        }
    }

    fn spawn_worker(self: &Arc<Self>) {
        if self.spawned.fetch_add(1, Relaxed) >= self.workers * MAX_WORKERS_FACTOR {
            self.spawned.fetch_sub(1, Relaxed);
            tracing::error!(library = %self.library, "HSM workers exhausted by stuck calls; not starting more");
            return;
        }
        let slot = Arc::new(Slot::default());
        self.slots.lock().push(slot.clone());
        let jobs = self.jobs.clone();
        let here = Here { executor: self.id, sessions: HashMap::new(), slot };
        let epoch = self.epoch;
        let gauge = self.gauge.clone();
        let pace = self.pace.clone();
        let idle = self.idle.clone();
        let name = format!("hsm-{}", self.spawned.load(Relaxed));
        // Awake from the start: it looks at the queue before it first sleeps.
        self.idle.awake.fetch_add(1, SeqCst);
        let spawned =
            std::thread::Builder::new().name(name).spawn(move || worker(jobs, here, epoch, gauge, pace, idle));
        if let Err(e) = spawned {
            self.idle.awake.fetch_sub(1, SeqCst);
            tracing::error!(library = %self.library, error = %e, "cannot start an HSM worker");
        }
    }

    /// A worker busy far past any deadline is stuck in the library: start a replacement so
    /// the queue keeps moving (the stuck thread is forgotten, it cannot be cancelled).
    fn replace_stuck_workers(self: &Arc<Self>) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let stuck: Vec<Arc<Slot>> = {
            let mut slots = self.slots.lock();
            let (stuck, alive): (Vec<_>, Vec<_>) =
                slots.drain(..).partition(|slot| write_off_if_stuck(&slot.busy, now, &self.pace));
            *slots = alive;
            stuck
        };
        for _ in &stuck {
            tracing::error!(library = %self.library, "an HSM call has been stuck for over 5 s; starting a replacement worker");
            self.spawn_worker();
        }
    }
}

impl Drop for Executor {
    /// Sleeping workers exit (the queue's sender is still alive until the fields drop).
    fn drop(&mut self) {
        self.idle.close();
    }
}

fn worker(
    jobs: Receiver<Job>,
    here: Here,
    epoch: Instant,
    gauge: Arc<crate::telemetry::QueueGauge>,
    pace: Arc<Pace>,
    idle: Arc<Idle>,
) {
    // The sessions this worker opened, by connection id, live in `HERE` so that handed-over
    // work's calls find them. A session of a library generation that was re-initialised away is
    // dropped without closing (its handle may now name someone else's session); see
    // `OwnedSession`.
    let slot = here.slot.clone();
    HERE.with(|h| *h.borrow_mut() = Some(here));
    loop {
        let job = match jobs.try_recv() {
            Ok(job) => job,
            Err(crossbeam_channel::TryRecvError::Empty) if idle.rest(&jobs) => continue,
            Err(_) => break,
        };
        gauge.set(jobs.len());
        with_sessions(|sessions| sessions.retain(|_, session| session.is_live()));
        let call = match job {
            Job::Call(call) => call,
            Job::Work { work, deadline } => {
                // Past its deadline the caller has stopped waiting: dropping the work unrun
                // tells it so (whatever it would answer through is dropped with it).
                if Instant::now() < deadline {
                    idle.away(&jobs, pace.answering_fast(epoch.elapsed()));
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
                        tracing::error!("work handed over to an HSM worker panicked");
                    }
                    idle.back();
                }
                continue;
            }
        };
        call.reply.taken.store(true, SeqCst);
        if Instant::now() >= call.deadline {
            let Call { conn, server, reply, .. } = call;
            drop(conn);
            pace.dropped();
            reply.send(Err(HsmError::Timeout { server, millis: 0 }));
            continue;
        }
        let began = Instant::now();
        slot.busy.store(stamp(epoch, began), Relaxed);
        let result = with_sessions(|sessions| run(&call.conn, &call.server, &call.op, sessions))
            .unwrap_or_else(|| Err(HsmError::Unavailable("HSM worker without its sessions".into())));
        finished(&slot.busy, &pace, began.elapsed(), epoch.elapsed());
        // Let go of the connection before answering: once answered, the caller may drop the
        // `Hsm` and exit, and the last reference must not be this thread's (dropping a
        // `Connection` closes its anchor session, which must not race the library's teardown).
        let Call { conn, reply, .. } = call;
        drop(conn);
        reply.send(result);
    }
    // The executor is gone, which happens as a short-lived command ends: closing sessions now
    // would race the library's own teardown at process exit (SoftHSM corrupts its heap).
    if let Some(mut here) = HERE.with(|h| h.borrow_mut().take()) {
        for (_, session) in here.sessions.drain() {
            session.abandon();
        }
    }
}

/// Runs `f` on this worker thread's sessions (`None` off a worker).
fn with_sessions<R>(f: impl FnOnce(&mut HashMap<u64, OwnedSession>) -> R) -> Option<R> {
    HERE.with(|here| here.borrow_mut().as_mut().map(|here| f(&mut here.sessions)))
}

/// `at` in milliseconds since `epoch`, never 0 (a `busy` stamp of 0 marks an idle worker).
fn stamp(epoch: Instant, at: Instant) -> u64 {
    at.duration_since(epoch).as_millis().max(1) as u64
}

/// The watchdog's side of a worker's `busy` stamp: a call running for over `STUCK_MS` (`now`
/// in ms since the epoch) is written off, unless the worker finishes it at that very moment.
/// A stamp already written off (`WRITTEN_OFF`, in the future) never reads as stuck.
fn write_off_if_stuck(busy: &AtomicU64, now: u64, pace: &Pace) -> bool {
    let since = busy.load(Relaxed);
    let stuck = since != 0
        && now.saturating_sub(since) > STUCK_MS
        && busy.compare_exchange(since, WRITTEN_OFF, Relaxed, Relaxed).is_ok();
    if stuck {
        pace.dropped();
    }
    stuck
}

/// The worker's side: a call that came back is an answer, unless it was written off (already
/// no longer pending; its time, the length of an outage, says nothing of the library's pace).
fn finished(busy: &AtomicU64, pace: &Pace, took: Duration, now: Duration) {
    if busy.swap(0, Relaxed) != WRITTEN_OFF {
        pace.answered(took, now);
    }
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
    use std::cell::Cell;

    use super::*;

    /// Waits on a reply sent `after` from now by another thread; how many times the offload ran.
    fn wait_for(after: Option<Duration>, inline: Duration, timeout: Duration) -> (bool, usize) {
        let reply = Arc::new(Reply::default());
        let sender = after.map(|after| {
            let reply = reply.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                reply.send(Ok(b"sig".to_vec()));
            })
        });
        let offloads = Cell::new(0);
        let offload = |wait: &mut dyn FnMut()| {
            offloads.set(offloads.get() + 1);
            wait()
        };
        let now = Instant::now();
        let result = reply.wait(now + inline, now + timeout, &offload, &|| {});
        if let Some(sender) = sender {
            sender.join().unwrap();
        }
        (matches!(result, Some(Ok(ref s)) if s == b"sig"), offloads.get())
    }

    #[test]
    fn a_handed_over_call_that_panics_leaves_its_slot_idle() {
        let executor = Executor::start("test-library", 1, 4, Arc::new(|_, _, _| {}));
        let slot = Slot::default();
        let began = Instant::now();
        slot.busy.store(stamp(executor.epoch, began), Relaxed);
        executor.handed_calls.fetch_add(1, Relaxed);
        executor.pace.pending.fetch_add(1, Relaxed);
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
        while idle.sleepers.lock().asleep < n {
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
    fn a_job_wakes_a_sleeping_worker_only_when_those_awake_would_leave_it_waiting() {
        let idle = |asleep: usize, awake: usize| {
            let idle = Idle::default();
            idle.sleepers.lock().asleep = asleep;
            idle.awake.store(awake, SeqCst);
            idle
        };
        let busy_one = idle(1, 1);
        assert!(!busy_one.queued(1, true), "the busy worker takes the next job of a fast library");
        assert!(busy_one.queued(2, true), "more jobs queued than workers awake");
        assert_eq!(busy_one.awake.load(SeqCst), 2, "the woken worker counts as awake at once");
        assert!(!busy_one.queued(3, true), "a sleeper already woken is not woken twice");
        assert!(idle(1, 1).queued(1, false), "a slow or stalled library: every job wakes a worker");
        assert!(idle(2, 0).queued(1, true), "nobody awake");
        assert!(!idle(0, 0).queued(1, false), "nobody asleep to wake");
    }

    #[test]
    fn a_worker_going_to_sleep_takes_a_job_queued_meanwhile() {
        // The job was queued after the worker last found the queue empty, and its sender saw the
        // worker still awake, so woke nobody: the worker must look again rather than sleep.
        let idle = Arc::new(Idle::default());
        idle.awake.store(1, SeqCst);
        let (queue, jobs) = crossbeam_channel::bounded(1);
        let work: Work = Box::new(|| {});
        queue.send(Job::Work { work, deadline: Instant::now() }).unwrap();
        let (slept, woke) = crossbeam_channel::bounded(1);
        let sleeper = idle.clone();
        std::thread::spawn(move || {
            let _ = slept.send(sleeper.sleep(&jobs));
        });
        assert_eq!(woke.recv_timeout(Duration::from_secs(10)), Ok(true), "slept through a queued job");
        assert_eq!(idle.awake.load(SeqCst), 1, "still awake");
        assert_eq!(idle.sleepers.lock().asleep, 0);
    }

    #[test]
    fn work_that_waits_on_something_else_does_not_hold_up_the_queue() {
        // The first job waits (as a CA signature on another library's member would) until the
        // second has run: the second must wake the sleeping worker, not wait for the busy one.
        let executor = Executor::start("test-away", 2, 4, Arc::new(|_, _, _| {}));
        let (second_ran, wait_for_second) = crossbeam_channel::bounded::<()>(1);
        let (first_done, finished) = crossbeam_channel::bounded(1);
        let first: Work = Box::new(move || {
            let _ = first_done.send(wait_for_second.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        let second: Work = Box::new(move || {
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
        executor.idle.awake.fetch_add(1, SeqCst);
        let (done, finished) = crossbeam_channel::bounded(1);
        let work: Work = Box::new(move || {
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
            let mut work: Work = Box::new(move || {
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
    fn sleeping_workers_exit_with_their_executor() {
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

    #[test]
    fn a_prompt_answer_is_waited_for_in_place_and_a_late_one_under_the_offload() {
        assert_eq!(wait_for(Some(Duration::ZERO), Duration::from_secs(5), Duration::from_secs(10)), (true, 0));
        assert_eq!(wait_for(Some(Duration::from_millis(50)), Duration::ZERO, Duration::from_secs(10)), (true, 1));
        assert_eq!(
            wait_for(Some(Duration::from_millis(50)), Duration::from_millis(1), Duration::from_secs(10)),
            (true, 1)
        );
        // No answer: the offloaded wait ends at the deadline, empty-handed.
        assert_eq!(wait_for(None, Duration::from_millis(1), Duration::from_millis(30)), (false, 1));
    }

    #[test]
    fn only_a_fast_library_that_is_answering_is_waited_for_in_place() {
        let pace = Pace::default();
        let ms = Duration::from_millis;
        assert_eq!(pace.inline_budget(ms(0)), INLINE_WAIT);
        let call = |took: Duration, at: Duration| {
            pace.pending.fetch_add(1, Relaxed);
            pace.answered(took, at);
        };
        for i in 0..50 {
            call(Duration::from_micros(45), ms(i));
        }
        assert_eq!(pace.inline_budget(ms(50)), INLINE_WAIT, "a local token's signatures");
        // A network HSM's round trips: offloaded after a few calls, and until fast answers
        // have outweighed the slow ones.
        for i in 0..8 {
            call(ms(2), ms(60 + i));
        }
        assert_eq!(pace.inline_budget(ms(70)), Duration::ZERO);
        for i in 0..10 {
            call(Duration::from_micros(45), ms(70 + i));
        }
        assert_eq!(pace.inline_budget(ms(80)), Duration::ZERO);
        for i in 0..60 {
            call(Duration::from_micros(45), ms(80 + i));
        }
        assert_eq!(pace.inline_budget(ms(140)), INLINE_WAIT);
        // A call hangs: once nothing has come back for a while, callers are offloaded at once,
        // however fast the library used to be; an idle library is not stalled.
        pace.pending.fetch_add(1, Relaxed);
        assert_eq!(pace.inline_budget(ms(141)), INLINE_WAIT);
        assert_eq!(pace.inline_budget(ms(150)), Duration::ZERO);
        pace.answered(Duration::from_micros(45), ms(151));
        assert_eq!(pace.inline_budget(ms(1000)), INLINE_WAIT);
    }

    #[test]
    fn a_call_written_off_as_stuck_no_longer_holds_the_library_stalled() {
        let pace = Pace::default();
        let ms = Duration::from_millis;
        let busy = AtomicU64::new(0);
        // A call starts at 100 ms and hangs.
        pace.pending.fetch_add(1, Relaxed);
        busy.store(100, Relaxed);
        assert!(!write_off_if_stuck(&busy, 100 + STUCK_MS, &pace), "not stuck yet");
        assert_eq!(pace.inline_budget(ms(200)), Duration::ZERO, "stalled while it hangs");
        assert!(write_off_if_stuck(&busy, 101 + STUCK_MS, &pace));
        assert!(!write_off_if_stuck(&busy, 200 + STUCK_MS, &pace), "written off once");
        assert_eq!(pace.pending.load(Relaxed), 0);
        assert_eq!(pace.inline_budget(ms(10_000)), INLINE_WAIT, "idle afterwards, not stalled");
        // The hung call comes back after all: not counted a second time.
        finished(&busy, &pace, ms(60_000), ms(60_100));
        assert_eq!(pace.pending.load(Relaxed), 0);
        assert_eq!(pace.inline_budget(ms(60_200)), INLINE_WAIT);
        // The same worker's next call is an ordinary one.
        pace.pending.fetch_add(1, Relaxed);
        busy.store(60_300, Relaxed);
        finished(&busy, &pace, Duration::from_micros(45), ms(60_300));
        assert_eq!(pace.pending.load(Relaxed), 0);
        // A worker that finishes as the watchdog looks is not written off.
        assert!(!write_off_if_stuck(&busy, 70_000, &pace));
    }
}
