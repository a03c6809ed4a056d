//! The watchdog: once every 250 ms it reports calls made for handed-over work that are past
//! their deadline (no caller waits those out: `Overdue` takes their member out), replaces
//! workers stuck in the library for over `STUCK_MS` (and writes their call off, so the library
//! does not look stalled for good), and wakes a worker for any job left queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::Executor;
use super::pace::Pace;
use crate::hsm::member::Connection;

/// A worker busy this long is stuck in the library: it is written off and replaced.
pub(super) const STUCK_MS: u64 = 5_000;

/// A worker's `busy` stamp once the watchdog has written its call off.
const WRITTEN_OFF: u64 = u64::MAX;

/// How often the watchdog looks.
const ROUND: Duration = Duration::from_millis(250);

/// What the watchdog sees of a worker.
#[derive(Default)]
pub(super) struct Slot {
    /// Milliseconds since `epoch` when its current library call started, 0 when none.
    pub(super) busy: AtomicU64,
    /// The call it is making for handed-over work, until reported overdue.
    pub(super) handed: parking_lot::Mutex<Option<Handed>>,
}

/// A call a worker makes for handed-over work: no caller waits out its deadline.
pub(super) struct Handed {
    pub(super) conn: Arc<Connection>,
    pub(super) server: String,
    /// Milliseconds since `epoch`.
    pub(super) deadline: u64,
    pub(super) timeout_ms: u64,
}

/// Ends a call made for handed-over work however it ends, a panic included (the worker
/// survives those): left in its slot, it would be reported overdue and take a healthy member
/// out, and the worker would be written off as stuck.
pub(super) struct HandedCall<'a> {
    pub(super) executor: &'a Executor,
    pub(super) slot: &'a Slot,
    pub(super) began: Instant,
}

impl Drop for HandedCall<'_> {
    fn drop(&mut self) {
        let executor = self.executor;
        finished(&self.slot.busy, &executor.pace, self.began.elapsed(), executor.epoch.elapsed());
        self.slot.handed.lock().take();
        executor.handed_calls.fetch_sub(1, Relaxed);
    }
}

impl Executor {
    /// Starts the watchdog thread; it ends with the executor.
    pub(super) fn start_watchdog(self: &Arc<Self>) {
        let watched = Arc::downgrade(self);
        // Never calls into a library itself (it starts workers that do): not joined at exit.
        let _ = std::thread::Builder::new().name("hsm-watchdog".into()).spawn(move || {
            while let Some(executor) = watched.upgrade() {
                if executor.is_closed() {
                    return;
                }
                executor.report_overdue();
                executor.replace_stuck_workers();
                executor.wake_for_stranded_jobs();
                drop(executor);
                std::thread::sleep(ROUND);
            }
        });
    }

    /// Reports each call made for handed-over work that is past its deadline, once: from the
    /// watchdog, and before the HSM layer picks a member (a caller that stopped waiting for such
    /// work at the deadline goes on at once, and must not pick the hung member again).
    pub(in crate::hsm) fn report_overdue(&self) {
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

    /// The safety net: jobs queued while a worker sleeps (left to a worker that looked awake
    /// and is not coming back soon, such as one stuck in a hung call) wake it. At most one
    /// wake-up per round.
    fn wake_for_stranded_jobs(&self) {
        if !self.jobs.is_empty() {
            self.idle.wake_one();
        }
    }
}

/// `at` in milliseconds since `epoch`, never 0 (a `busy` stamp of 0 marks an idle worker).
pub(super) fn stamp(epoch: Instant, at: Instant) -> u64 {
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
pub(super) fn finished(busy: &AtomicU64, pace: &Pace, took: Duration, now: Duration) {
    if busy.swap(0, Relaxed) != WRITTEN_OFF {
        pace.answered(took, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_written_off_as_stuck_no_longer_holds_the_library_stalled() {
        let pace = Pace::default();
        let ms = Duration::from_millis;
        let budget = |at| pace.inline_budget(ms(at));
        let busy = AtomicU64::new(0);
        // A call starts at 100 ms and hangs.
        pace.started();
        busy.store(100, Relaxed);
        assert!(!write_off_if_stuck(&busy, 100 + STUCK_MS, &pace), "not stuck yet");
        assert_eq!(budget(200), Duration::ZERO, "stalled while it hangs");
        assert!(write_off_if_stuck(&busy, 101 + STUCK_MS, &pace));
        assert!(!write_off_if_stuck(&busy, 200 + STUCK_MS, &pace), "written off once");
        assert_eq!(pace.pending.load(Relaxed), 0);
        assert_eq!(budget(10_000), super::super::pace::INLINE_WAIT, "idle afterwards, not stalled");
        // The hung call comes back after all: not counted a second time.
        finished(&busy, &pace, ms(60_000), ms(60_100));
        assert_eq!(pace.pending.load(Relaxed), 0);
        assert_eq!(budget(60_200), super::super::pace::INLINE_WAIT);
        // The same worker's next call is an ordinary one.
        pace.started();
        busy.store(60_300, Relaxed);
        finished(&busy, &pace, Duration::from_micros(45), ms(60_300));
        assert_eq!(pace.pending.load(Relaxed), 0);
        // A worker that finishes as the watchdog looks is not written off.
        assert!(!write_off_if_stuck(&busy, 70_000, &pace));
    }
}
