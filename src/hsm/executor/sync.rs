//! The primitives the wake-up protocol (`idle.rs`) is written against: parking_lot and std
//! atomics here; loom's in `tests/loom_idle.rs`, which model-checks the same source file.

pub(super) use std::sync::atomic::{AtomicUsize, Ordering, fence};
pub(super) use std::thread::yield_now;

/// A mutex whose guard `Condvar::wait` takes and gives back.
#[derive(Default)]
pub(super) struct Mutex<T>(parking_lot::Mutex<T>);

pub(super) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(super) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock()
    }
}

/// A condition variable over `Mutex`.
#[derive(Default)]
pub(super) struct Condvar(parking_lot::Condvar);

impl Condvar {
    pub(super) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(&mut guard);
        guard
    }

    pub(super) fn notify_one(&self) {
        self.0.notify_one();
    }

    pub(super) fn notify_all(&self) {
        self.0.notify_all();
    }
}
