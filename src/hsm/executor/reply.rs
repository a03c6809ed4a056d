//! Where a worker leaves a job's result, and how its caller waits for it.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::Offload;
use crate::hsm::HsmError;

/// A job's result. The caller sleeps on a condition variable rather than on a channel: a
/// channel's receiver spins and yields before it sleeps, and with a signature taking tens of
/// microseconds that spinning takes the CPU from the very worker being waited for (measured on
/// the 2-core bench machine: 6 % of all cycles in a mint loop).
#[derive(Default)]
pub(super) struct Reply {
    /// A worker has taken the job.
    pub(super) taken: AtomicBool,
    result: parking_lot::Mutex<Option<Result<Vec<u8>, HsmError>>>,
    ready: parking_lot::Condvar,
}

impl Reply {
    pub(super) fn send(&self, result: Result<Vec<u8>, HsmError>) {
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
    pub(super) fn wait(
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::time::Duration;

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
}
