//! How a library has been answering, and so whether a caller waits for its answer in place or
//! spends the wait under its offload (on a tokio worker, `block_in_place`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// How long a caller waits for its job in place before spending the rest of the wait under its
/// offload (on a tokio worker: a hand-off of the worker's other tasks to another thread, which
/// costs more than a local token's signature). Only while the library answers fast and is not
/// stalled, so a slow or hung HSM is offloaded at once. Not shorter: on a virtual machine a
/// timed wait that arms the earliest timer costs a hypervisor exit to arm and one to disarm
/// (measured per SoftHSM2 signature: 81 µs with a 200-500 µs wait, 64 µs with 5 ms).
pub(super) const INLINE_WAIT: Duration = Duration::from_millis(5);

/// A library answering slower than this per call (mean time inside it) is waited for under
/// the offload: a network HSM's round trip. SoftHSM2 signs in ~45 µs.
const FAST_SERVICE: Duration = Duration::from_micros(250);

/// Calls pending and no answer for this long: the library is stalled (a hung network HSM
/// whose calls have not come back yet, so their times are not in the mean).
const STALLED_AFTER: Duration = Duration::from_millis(2);

/// The library's pace, measured by its workers.
#[derive(Default)]
pub(super) struct Pace {
    /// Time inside the library per call, µs (an exponentially weighted mean). The library's own
    /// time, measured by the worker: a caller's wait also holds queueing and its own wake-up on
    /// a busy machine, which say nothing about the HSM.
    service_us: AtomicU64,
    /// When a worker last finished a call, µs since the executor's epoch.
    answered_at_us: AtomicU64,
    /// Calls queued or running, less those written off as stuck.
    pub(super) pending: AtomicUsize,
}

impl Pace {
    /// A call is queued or made.
    pub(super) fn started(&self) {
        self.pending.fetch_add(1, Relaxed);
    }

    /// A call came back after `took` (`now`: since the executor's epoch).
    pub(super) fn answered(&self, took: Duration, now: Duration) {
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
    pub(super) fn dropped(&self) {
        self.pending.fetch_sub(1, Relaxed);
    }

    /// How long the next caller waits in place (`now`: since the executor's epoch):
    /// `INLINE_WAIT` while the library answers fast and is not stalled, nothing otherwise.
    pub(super) fn inline_budget(&self, now: Duration) -> Duration {
        match self.answering_fast(now) {
            true => INLINE_WAIT,
            false => Duration::ZERO,
        }
    }

    /// Whether the library answers fast and is not stalled (`now`: since the executor's epoch).
    pub(super) fn answering_fast(&self, now: Duration) -> bool {
        let fast = Duration::from_micros(self.service_us.load(Relaxed)) <= FAST_SERVICE;
        let silent = now.saturating_sub(Duration::from_micros(self.answered_at_us.load(Relaxed)));
        let stalled = self.pending.load(Relaxed) > 0 && silent > STALLED_AFTER;
        fast && !stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fast_library_that_is_answering_is_waited_for_in_place() {
        let pace = Pace::default();
        let ms = Duration::from_millis;
        assert_eq!(pace.inline_budget(ms(0)), INLINE_WAIT);
        let call = |took: Duration, at: Duration| {
            pace.started();
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
        pace.started();
        assert_eq!(pace.inline_budget(ms(141)), INLINE_WAIT);
        assert_eq!(pace.inline_budget(ms(150)), Duration::ZERO);
        pace.answered(Duration::from_micros(45), ms(151));
        assert_eq!(pace.inline_budget(ms(1000)), INLINE_WAIT);
    }
}
