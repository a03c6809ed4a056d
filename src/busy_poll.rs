//! Busy-polling on the data-plane threads (`[limits] busy_poll_us`).
//!
//! A data-plane thread with nothing to run parks in `epoll_wait`. In a virtual machine whose
//! idle vCPU halts (no guest halt-polling), the next packet then costs a wake-up through the
//! hypervisor before the thread runs again, and a keep-alive request crosses a thread twice.
//! With busy-polling, a thread that served a client connection within its current window keeps
//! asking the kernel for readiness without blocking (the runtime's zero-timeout poll, with
//! `sched_yield` between polls so that other threads on its core go first), and parks only once
//! the window has passed without client work.
//!
//! The window adapts the way the kernel's haltpoll governor does: it starts at zero, doubles
//! (from `GROW_START`, up to `busy_poll_us`) each time the thread parked and client work came
//! back within `busy_poll_us`, which a longer window would have caught without the park; and it
//! halves, to zero below `GROW_START`, each time work took longer than that. Under steady load
//! it sits at `busy_poll_us`; at light load, where requests come milliseconds apart, it falls
//! to zero and the thread parks as if busy-polling were off.
//!
//! Nor does a thread spin on a core another thread wants: a `sched_yield` that ran someone else
//! (took `CONTENDED` or more) ends that round of polling, since a busy vCPU does not halt.
//!
//! It is on by default (`DEFAULT_MAX`) unless the process runs under a CPU quota (a cgroup's
//! `cpu.max`, as a container with a CPU limit has): there the spinning would count against the
//! quota and could get the data plane throttled.

use std::cell::Cell;
use std::path::Path;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The longest window when `busy_poll_us` is not set and no CPU quota applies.
pub const DEFAULT_MAX: Duration = Duration::from_micros(200);

/// The first window after zero; a window halved below it becomes zero.
const GROW_START: Duration = Duration::from_micros(25);

/// A `sched_yield` that took this long ran another thread: the core is not idle.
const CONTENDED: Duration = Duration::from_micros(20);

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

/// The longest window for `[limits] busy_poll_us` as configured (`None`: not set), with why
/// an unset one is off when it is.
pub fn max_window(configured: Option<u64>) -> (Duration, Option<String>) {
    match configured {
        Some(us) => (Duration::from_micros(us), None),
        None => match cpu_quota() {
            Some(quota) => (Duration::ZERO, Some(quota)),
            None => (DEFAULT_MAX, None),
        },
    }
}

/// The CPU quota this process runs under, as the file that sets it says it (cgroup v2
/// `cpu.max` of its cgroup or an ancestor, or v1 `cpu.cfs_quota_us`), if any.
fn cpu_quota() -> Option<String> {
    let cgroups = procfs::process::Process::myself().and_then(|me| me.cgroups()).ok()?;
    cpu_quota_under(Path::new("/sys/fs/cgroup"), &cgroups.0)
}

/// `cpu_quota` for cgroup file systems mounted under `root`.
fn cpu_quota_under(root: &Path, cgroups: &[procfs::ProcessCGroup]) -> Option<String> {
    for cgroup in cgroups {
        let (mounts, file): (&[&str], _) = if cgroup.hierarchy == 0 {
            (&[""], "cpu.max")
        } else if cgroup.controllers.iter().any(|c| c == "cpu") {
            (&["cpu,cpuacct", "cpu"], "cpu.cfs_quota_us")
        } else {
            continue;
        };
        // A quota on an ancestor limits this cgroup too.
        let dirs = Path::new(cgroup.pathname.trim_start_matches('/')).ancestors();
        let candidates = dirs.flat_map(|dir| mounts.iter().map(move |mount| root.join(mount).join(dir).join(file)));
        for file in candidates {
            if let Ok(text) = std::fs::read_to_string(&file)
                && limits_cpu(&text)
            {
                return Some(format!("{} is {}", file.display(), text.trim()));
            }
        }
    }
    None
}

/// Whether a `cpu.max` ("max 100000" / "50000 100000") or `cpu.cfs_quota_us` ("-1" / "50000")
/// sets a quota.
fn limits_cpu(text: &str) -> bool {
    match text.split_whitespace().next() {
        Some("max") | Some("-1") | None => false,
        Some(quota) => quota.parse::<u64>().is_ok(),
    }
}

/// The next window after client work came back `gap` after the last, across a park.
fn adapt(window: Duration, gap: Duration, max: Duration) -> Duration {
    if gap <= max {
        (window * 2).clamp(GROW_START.min(max), max)
    } else if window / 2 < GROW_START {
        Duration::ZERO
    } else {
        window / 2
    }
}

/// The poller, spawned on a data-plane runtime for its life when `max` is not zero.
pub async fn run(max: Duration) {
    poll(max, CONTENDED).await
}

/// `run`, ending a round of polling when a yield took `contended` or more.
async fn poll(max: Duration, contended: Duration) {
    let mut window = Duration::ZERO;
    let mut seen = WORK.get();
    let mut last_work = Instant::now();
    let mut parked = false;
    loop {
        // A yielded task is polled again after the runtime's zero-timeout I/O poll; while
        // this one is queued the runtime never blocks.
        tokio::task::yield_now().await;
        let work = WORK.get();
        if work != seen {
            let now = Instant::now();
            if std::mem::take(&mut parked) {
                window = adapt(window, now - last_work, max);
            }
            seen = work;
            last_work = now;
        } else if last_work.elapsed() >= window {
            parked = true;
            sleep_until_unparked().await;
            continue;
        }
        let yielded = Instant::now();
        std::thread::yield_now();
        if yielded.elapsed() >= contended {
            // Another thread had this core meanwhile. A busy vCPU does not halt, so parking
            // costs no hypervisor wake-up, and spinning on would only take turns from it. This
            // park says nothing of how far apart client work comes: the window stays.
            sleep_until_unparked().await;
        }
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

    /// A current-thread runtime like a data-plane thread's, with the poller, counting parks.
    /// The poller here never takes a slow yield for a shared core (the tests run beside
    /// others on few cores): the tests of the window see the window alone.
    fn runtime_with_poller(max: Duration) -> (tokio::runtime::Runtime, Arc<AtomicUsize>) {
        runtime_with(max, Duration::MAX)
    }

    fn runtime_with(max: Duration, contended: Duration) -> (tokio::runtime::Runtime, Arc<AtomicUsize>) {
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
        runtime.spawn(poll(max, contended));
        (runtime, parks)
    }

    #[test]
    fn a_quota_turns_the_default_off_and_a_set_value_is_taken_as_it_is() {
        assert!(!limits_cpu("max 100000\n"));
        assert!(!limits_cpu("-1\n"));
        assert!(!limits_cpu(""));
        assert!(limits_cpu("50000 100000\n"));
        assert!(limits_cpu("150000\n"));
        assert_eq!(max_window(Some(0)), (Duration::ZERO, None));
        assert_eq!(max_window(Some(350)), (Duration::from_micros(350), None));
        // A quota found on the cgroup or on an ancestor, v2 and v1.
        let root = tempfile::tempdir().expect("tempdir");
        let write = |path: &str, text: &str| {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        let group = |hierarchy, controllers: &[&str], pathname: &str| procfs::ProcessCGroup {
            hierarchy,
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            pathname: pathname.into(),
        };
        let v2 = [group(0, &[], "/pods/p1/c1")];
        write("pods/p1/c1/cpu.max", "max 100000\n");
        assert_eq!(cpu_quota_under(root.path(), &v2), None);
        write("pods/p1/cpu.max", "50000 100000\n");
        let found = cpu_quota_under(root.path(), &v2).expect("the ancestor's quota");
        assert!(found.ends_with("pods/p1/cpu.max is 50000 100000"), "{found}");
        let v1 = [group(4, &["memory"], "/x"), group(1, &["cpu", "cpuacct"], "/system.slice/tollgate.service")];
        write("cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
        assert_eq!(cpu_quota_under(root.path(), &v1), None);
        write("cpu,cpuacct/system.slice/tollgate.service/cpu.cfs_quota_us", "150000\n");
        let found = cpu_quota_under(root.path(), &v1).expect("the service's quota");
        assert!(found.ends_with("tollgate.service/cpu.cfs_quota_us is 150000"), "{found}");

        let (window, quota) = max_window(None);
        match quota {
            Some(reason) => assert!(window.is_zero() && reason.contains("/sys/fs/cgroup"), "{reason}"),
            None => assert_eq!(window, DEFAULT_MAX),
        }
    }

    #[test]
    fn the_window_grows_while_parks_are_short_and_falls_to_zero_when_they_are_long() {
        let max = Duration::from_micros(200);
        let mut window = Duration::ZERO;
        let mut grown = vec![];
        for _ in 0..5 {
            window = adapt(window, Duration::from_micros(150), max);
            grown.push(window.as_micros());
        }
        assert_eq!(grown, [25, 50, 100, 200, 200], "a wake within the maximum doubles the window, up to it");
        assert_eq!(adapt(window, max, max), max, "a wake at exactly the maximum still counts as short");
        let mut shrunk = vec![];
        for _ in 0..5 {
            window = adapt(window, Duration::from_millis(4), max);
            shrunk.push(window.as_micros());
        }
        assert_eq!(shrunk, [100, 50, 25, 0, 0], "a wake past the maximum halves the window, to zero below 25 µs");
        assert_eq!(adapt(Duration::ZERO, Duration::from_micros(5), Duration::from_micros(10)).as_micros(), 10);
    }

    /// Under steady client work the window grows until the thread stops parking; once the
    /// work stops it parks and spends no CPU; work arriving after a later park brings the
    /// polling back.
    #[test]
    fn the_thread_polls_while_work_comes_and_sleeps_after_the_window() {
        let window = Duration::from_millis(30);
        let (runtime, parks) = runtime_with_poller(window);
        runtime.block_on(async {
            // Client work every 2 ms: the window doubles from 25 µs past 2 ms within a few
            // parks, and after that the thread no longer parks (the timer would park it 30 times).
            for _ in 0..30 {
                note_work();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let growing = parks.load(Ordering::Relaxed);
            assert!(growing <= 12, "the thread parked {growing} times while the window should have grown");
            for _ in 0..30 {
                note_work();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // (Two parks of slack: a thread descheduled past its window on a busy machine
            // parks once, and the window doubles again.)
            let steady = parks.load(Ordering::Relaxed) - growing;
            assert!(steady <= 2, "the thread parked {steady} times in 30 while client work came");

            // No work: after the window the thread parks, and sleeping costs no CPU.
            tokio::time::sleep(window + Duration::from_millis(20)).await;
            let parked = parks.load(Ordering::Relaxed);
            assert!(parked > growing, "the thread never parked after the window");
            let cpu = thread_cpu();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let spent = thread_cpu() - cpu;
            assert!(spent < Duration::from_millis(30), "{spent:?} of CPU over 100 ms without work");

            // Work arriving with an unpark (here, the timer's) starts polling again: the long
            // idle halved the window once, and one short park doubles it back.
            let parked = parks.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            note_work();
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                note_work();
            }
            let again = parks.load(Ordering::Relaxed) - parked;
            assert!(again <= 3, "the thread parked {again} times while client work came after a park");
        });
    }

    /// A thread that shares its core with a busy one parks instead of spinning: its vCPU does
    /// not halt, and each poll would take the core from the other thread.
    #[test]
    fn a_thread_sharing_its_core_with_a_busy_one_parks_instead_of_spinning() {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let allowed = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
        let cpu = (0..CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false)).expect("a CPU");
        let mut one = CpuSet::new();
        one.set(cpu).expect("cpu set");
        let pin = move || sched_setaffinity(Pid::from_raw(0), &one).expect("pin");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = std::thread::spawn({
            let stop = stop.clone();
            move || {
                pin();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }
        });
        pin();
        let (runtime, parks) = runtime_with(Duration::from_millis(30), CONTENDED);
        runtime.block_on(async {
            // Grow the window past the gaps, then keep the work coming with the core shared.
            for _ in 0..60 {
                note_work();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let before = parks.load(Ordering::Relaxed);
            for _ in 0..30 {
                note_work();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let shared = parks.load(Ordering::Relaxed) - before;
            assert!(shared >= 20, "the thread parked {shared} times in 30 gaps on a core it shares with a busy thread");
        });
        stop.store(true, Ordering::Relaxed);
        busy.join().expect("busy thread");
    }

    /// At light load, client work further apart than the maximum, the window stays at zero:
    /// the thread parks between each piece of work and spends next to no CPU, where a fixed
    /// window would spin for most of each gap.
    #[test]
    fn light_load_keeps_the_window_at_zero() {
        let max = Duration::from_millis(4);
        let (runtime, parks) = runtime_with_poller(max);
        runtime.block_on(async {
            let cpu = thread_cpu();
            for _ in 0..40 {
                note_work();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let spent = thread_cpu() - cpu;
            // A fixed 4 ms window would spin 4 ms of each 5 (160 ms); the adaptive one none.
            assert!(spent < Duration::from_millis(40), "{spent:?} of CPU over 200 ms of light load");
            let parked = parks.load(Ordering::Relaxed);
            assert!(parked >= 39, "the thread parked {parked} times in 40 gaps longer than the maximum");
        });
    }
}
