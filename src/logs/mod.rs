//! Where the service's JSON lines go (`[log]`), without ever making the data plane wait.
//!
//! A line is formatted on the thread that logs it. A data-plane thread gathers its lines in a
//! batch of its own and hands the batch over when it goes idle (the runtime is about to
//! park), when the batch is full, or at the latest every `BATCH_INTERVAL`; other threads
//! hand each line over at once. One writer thread writes the batches to standard output or to
//! a file. While lines keep coming it looks for them every `WRITE_INTERVAL` (sooner once the
//! queue is half full), so a hand-over under load has no writer to wake and costs the data
//! plane no system call; after a quiet spell the first hand-over wakes it. The queue between
//! them is bounded in lines (`buffer_lines`): when the writer falls behind (a stuck stdout
//! pipe, a slow disk), lines are dropped and counted (`tollgate_log_lines_dropped_total`)
//! rather than queued without bound or waited for.
//!
//! Batches cost the data plane one hand-over per idle moment instead of one per line; lines
//! of different threads may interleave out of time order by up to that moment, as nginx's
//! buffered access log does.
//!
//! A file is rotated by size (`FILE.1` the newest of `keep_files`) and reopened on request
//! (SIGHUP, SIGUSR1: after logrotate moved it). The writer thread keeps the last lines for
//! the support file as well.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::LogConfig;

mod line;

pub use line::{AddrText, Direct};

/// How many of the service's last log lines the support file gets.
const RECENT_LINES: usize = 500;
/// A batch is handed over once it holds this much.
const BATCH_BYTES: usize = 16 * 1024;
/// The longest a line waits in its thread's batch (a thread kept busy without going idle).
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often the writer looks for lines while they keep coming.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// How long an idle writer sleeps unless a hand-over wakes it.
const IDLE_INTERVAL: Duration = Duration::from_secs(1);
/// Set by the writer when a look found nothing: the next hand-over wakes it.
static WRITER_IDLE: AtomicBool = AtomicBool::new(false);

/// The last batches written, holding at least `RECENT_LINES` lines, oldest first; kept as
/// written (bytes) and cut into lines only when the support file asks.
static RECENT: Mutex<Recent> = Mutex::new(Recent { batches: VecDeque::new(), lines: 0 });
/// The settings the writer should switch to at its next line (`configure`), if any.
static PENDING: Mutex<Option<LogConfig>> = Mutex::new(None);
/// Set by `reopen` and `configure`; taken by the writer thread.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// The queue to the writer thread, once `init` started it.
static QUEUE: OnceLock<Queue> = OnceLock::new();
/// The writer thread, until `flush` stops it.
static WRITER: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);
/// How many threads hold lines in their batch, not yet handed over.
static HOLDING: AtomicUsize = AtomicUsize::new(0);
/// How long `flush` waits for the threads' batches.
const FLUSH_WAIT: Duration = Duration::from_millis(500);
/// The writer thread, to wake it when the queue fills.
static WRITER_THREAD: OnceLock<std::thread::Thread> = OnceLock::new();

/// A log file that cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("log file {}: {source}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The log filter: `TOLLGATE_LOG`, default `info`.
fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        // cryptoki logs an error for every vendor mechanism it has no name for (`hsm info`).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,cryptoki::mechanism=off"))
}

/// Installs the subscriber of the human commands (`cert`, `hsm`): plain text on stderr, so
/// stdout stays data.
pub fn init_stderr() {
    // A second init (tests) keeps the first subscriber.
    drop(tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).try_init());
}

/// Installs the service's subscriber: JSON lines through the bounded queue to `config`'s
/// output; the filter from `TOLLGATE_LOG` (default `info`).
pub fn init(config: &LogConfig) -> Result<(), OpenError> {
    let mut output = Output::open(config.clone())?;
    let (sender, receiver) = mpsc::channel();
    let queue = Queue {
        sender,
        open: AtomicBool::new(true),
        queued: AtomicUsize::new(0),
        limit: config.buffer_lines,
        batch_lines: (config.buffer_lines / 8).max(1),
        dropped: AtomicU64::new(0),
    };
    // A second init (tests) keeps the first subscriber and its writer.
    if QUEUE.set(queue).is_err() {
        return Ok(());
    }
    let writer = std::thread::Builder::new()
        .name("tollgate-log".into())
        .spawn(move || output.drain(&receiver))
        .map_err(|source| OpenError { path: config.file.clone().unwrap_or_else(|| "stdout".into()), source })?;
    let _ = WRITER_THREAD.set(writer.thread().clone());
    *WRITER.lock() = Some(writer);
    let result = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .event_format(line::JsonLine)
        .with_writer(|| Lines)
        .try_init();
    drop(result);
    Ok(())
}

/// Writes out the lines still queued and stops the writer (at exit, or before an abort):
/// later lines are dropped.
pub fn flush() {
    hand_over();
    let Some(queue) = QUEUE.get() else { return };
    // The data-plane threads hand their batches over when they next go idle: at exit they
    // are, or about to be.
    let deadline = std::time::Instant::now() + FLUSH_WAIT;
    while HOLDING.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if queue.open.swap(false, Ordering::AcqRel) {
        let _ = queue.sender.send(Message::Stop);
    }
    if let Some(writer) = WRITER.lock().take() {
        writer.thread().unpark();
        let _ = writer.join();
    }
}

/// Checks that `config`'s file can be opened for appending (`run --check`, reload).
pub fn check(config: &LogConfig) -> Result<(), OpenError> {
    match &config.file {
        Some(path) => open_append(path).map(drop).map_err(|source| OpenError { path: path.clone(), source }),
        None => Ok(()),
    }
}

/// Switches the writer to `config` (a reload): it takes effect at the next line.
pub fn configure(config: &LogConfig) {
    *PENDING.lock() = Some(config.clone());
    REOPEN.store(true, Ordering::Release);
}

/// Reopens the log file at the next line (after logrotate moved it away).
pub fn reopen() {
    REOPEN.store(true, Ordering::Release);
}

/// Lines dropped because the writer fell behind, since start.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |queue| queue.dropped.load(Ordering::Relaxed))
}

/// The service's most recent log lines, oldest first (for the support file).
pub fn recent() -> Vec<String> {
    let recent = RECENT.lock();
    let lines: Vec<String> = recent
        .batches
        .iter()
        .flat_map(|(batch, _)| batch.split_inclusive(|&b| b == b'\n'))
        .map(|line| String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line)).into_owned())
        .collect();
    let skip = lines.len().saturating_sub(RECENT_LINES);
    lines.into_iter().skip(skip).collect()
}

/// Writes an INFO line of `target` with `message` and the fields `fields` writes, the line
/// such an event makes, straight into this thread's batch (see `line::direct`): for lines
/// written per request. The caller checks that the target is enabled (`tracing::enabled!`).
pub fn info(target: &str, message: &str, fields: impl FnOnce(&mut Direct<'_>)) {
    line::direct(target, message, fields, |line| {
        let _ = Lines.write(line);
    });
}

/// Makes this thread gather its lines in batches (a data-plane thread). Its runtime hands
/// them over by calling `hand_over` before it parks, and at least every `BATCH_INTERVAL`.
pub fn batch_this_thread() {
    BATCH.with_borrow_mut(|batch| batch.on = true);
}

/// Hands this thread's batch to the writer, if it holds any line.
pub fn hand_over() {
    let _ = BATCH.try_with(|batch| {
        if let Ok(mut batch) = batch.try_borrow_mut() {
            batch.hand_over();
        }
    });
}

/// What goes to the writer thread.
enum Message {
    /// Whole lines, and how many.
    Lines(Vec<u8>, usize),
    /// Write out what came before, then stop.
    Stop,
}

/// The queue to the writer, bounded in lines.
struct Queue {
    sender: mpsc::Sender<Message>,
    /// Until `flush` stopped the writer.
    open: AtomicBool,
    /// Lines sent and not yet taken by the writer.
    queued: AtomicUsize,
    /// `buffer_lines`.
    limit: usize,
    /// A batch is handed over once it holds this many lines (an eighth of the queue).
    batch_lines: usize,
    dropped: AtomicU64,
}

impl Queue {
    /// Sends `lines` lines to the writer, or drops and counts them when the queue is full or
    /// the writer stopped.
    fn send(&self, buf: Vec<u8>, lines: usize) {
        if self.open.load(Ordering::Acquire) {
            let queued = self.queued.fetch_add(lines, Ordering::AcqRel) + lines;
            if queued <= self.limit && self.sender.send(Message::Lines(buf, lines)).is_ok() {
                // An idle writer, or the queue half full: the writer should not wait for its
                // next look.
                let wake = (WRITER_IDLE.load(Ordering::Relaxed) && WRITER_IDLE.swap(false, Ordering::SeqCst))
                    || queued > self.limit / 2;
                if wake && let Some(writer) = WRITER_THREAD.get() {
                    writer.unpark();
                }
                return;
            }
            self.queued.fetch_sub(lines, Ordering::AcqRel);
        }
        self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
    }
}

/// A thread's lines not yet handed over.
struct Batch {
    /// A data-plane thread's (`batch_this_thread`): other threads hand each line over at once.
    on: bool,
    buf: Vec<u8>,
    lines: usize,
}

impl Batch {
    fn hand_over(&mut self) {
        if self.lines == 0 {
            return;
        }
        // The next batch starts the size of this one: a batch handed over at every idle moment
        // holds a few lines, one handed over full some `BATCH_BYTES`.
        let next = Vec::with_capacity(self.buf.len().next_power_of_two());
        let buf = std::mem::replace(&mut self.buf, next);
        let lines = std::mem::take(&mut self.lines);
        if let Some(queue) = QUEUE.get() {
            queue.send(buf, lines);
        }
        HOLDING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Batch {
    /// A thread that ends hands over what it still holds.
    fn drop(&mut self) {
        self.hand_over();
    }
}

thread_local! {
    static BATCH: RefCell<Batch> = const { RefCell::new(Batch { on: false, buf: Vec::new(), lines: 0 }) };
}

/// The subscriber's writer: each formatted line into this thread's batch, or straight to the
/// queue.
struct Lines;

impl Write for Lines {
    /// One whole line per call (the subscriber writes each line with one `write_all`).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let Some(queue) = QUEUE.get() else { return Ok(line.len()) };
        let batched = BATCH.try_with(|batch| {
            let Ok(mut batch) = batch.try_borrow_mut() else { return false };
            if !batch.on {
                return false;
            }
            if batch.lines == 0 {
                HOLDING.fetch_add(1, Ordering::AcqRel);
            }
            batch.buf.extend_from_slice(line);
            batch.lines += 1;
            if batch.buf.len() >= BATCH_BYTES || batch.lines >= queue.batch_lines {
                batch.hand_over();
            }
            true
        });
        if !matches!(batched, Ok(true)) {
            queue.send(line.to_vec(), 1);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The last batches written (`RECENT`).
struct Recent {
    batches: VecDeque<(Vec<u8>, usize)>,
    lines: usize,
}

impl Recent {
    /// Keeps `batch`, and lets go of the oldest batches no longer needed for `RECENT_LINES`.
    fn keep(&mut self, batch: Vec<u8>, lines: usize) {
        self.batches.push_back((batch, lines));
        self.lines += lines;
        while let Some((_, oldest)) = self.batches.front()
            && self.lines - oldest >= RECENT_LINES
        {
            self.lines -= oldest;
            self.batches.pop_front();
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// The writer thread's end: standard output, or a file it rotates.
struct Output {
    config: LogConfig,
    file: Option<File>,
    /// Bytes in the current file, `pending` included.
    written: u64,
    /// Lines not yet written: written out in one call when the queue runs empty (its worker
    /// flushes then) or this fills, not one system call per line.
    pending: Vec<u8>,
}

/// `pending` is written out past this.
const PENDING_MAX: usize = 64 * 1024;

impl Output {
    fn open(config: LogConfig) -> Result<Self, OpenError> {
        let mut output = Self { config, file: None, written: 0, pending: Vec::with_capacity(PENDING_MAX) };
        output.open_file()?;
        Ok(output)
    }

    fn open_file(&mut self) -> Result<(), OpenError> {
        self.file = None;
        self.written = 0;
        if let Some(path) = &self.config.file {
            let error = |source| OpenError { path: path.clone(), source };
            let file = open_append(path).map_err(error)?;
            self.written = file.metadata().map_err(error)?.len();
            self.file = Some(file);
        }
        Ok(())
    }

    /// Takes a pending reconfiguration or reopen request. A file that cannot be opened now
    /// leaves the previous output in place, said once on standard error.
    fn take_requests(&mut self) {
        if !REOPEN.swap(false, Ordering::AcqRel) {
            return;
        }
        let _ = self.write_pending();
        let previous = (self.config.clone(), self.file.take(), self.written);
        if let Some(config) = PENDING.lock().take() {
            self.config = config;
        }
        if let Err(e) = self.open_file() {
            eprintln!("error: {e}; logging goes on to the previous output");
            (self.config, self.file, self.written) = previous;
        }
    }

    /// FILE → FILE.1 → … → FILE.keep_files (the oldest falls off), then a fresh FILE.
    fn rotate(&mut self, path: &Path) {
        let _ = self.write_pending();
        let numbered = |n: usize| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        for n in (1..self.config.keep_files).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        let _ = std::fs::rename(path, numbered(1));
        if let Err(e) = self.open_file() {
            eprintln!("error: {e}");
        }
    }
}

impl Output {
    /// Writes `pending` to the file (standard error if it could not be opened) or standard
    /// output.
    fn write_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = match (&self.config.file, &mut self.file) {
            (None, _) => std::io::stdout().lock().write_all(&self.pending),
            (Some(_), Some(file)) => file.write_all(&self.pending),
            (Some(_), None) => std::io::stderr().write_all(&self.pending),
        };
        self.pending.clear();
        result
    }
}

impl Output {
    /// The writer thread: writes what arrives, and flushes whenever the queue runs empty,
    /// until `flush` stops it.
    ///
    /// While lines keep coming it looks again every `WRITE_INTERVAL` without being woken: a
    /// thread handing lines over then has no writer to wake, so logging costs the data plane
    /// no system call. A look that finds nothing marks the writer idle; the next hand-over
    /// wakes it, so a line after a quiet spell is written at once.
    fn drain(&mut self, receiver: &mpsc::Receiver<Message>) {
        loop {
            let (mut stop, mut wrote) = self.look(receiver);
            if !stop && !wrote {
                WRITER_IDLE.store(true, Ordering::SeqCst);
                // Lines handed over before the mark saw no idle writer to wake.
                (stop, wrote) = self.look(receiver);
            }
            if stop {
                return;
            }
            if wrote {
                WRITER_IDLE.store(false, Ordering::SeqCst);
                std::thread::park_timeout(WRITE_INTERVAL);
            } else {
                std::thread::park_timeout(IDLE_INTERVAL);
            }
        }
    }

    /// Writes what the queue holds and flushes: whether to stop, and whether any line came.
    fn look(&mut self, receiver: &mpsc::Receiver<Message>) -> (bool, bool) {
        let mut wrote = false;
        let stop = loop {
            match receiver.try_recv() {
                Ok(Message::Lines(batch, lines)) => {
                    if let Some(queue) = QUEUE.get() {
                        queue.queued.fetch_sub(lines, Ordering::AcqRel);
                    }
                    let _ = self.write_batch(&batch);
                    RECENT.lock().keep(batch, lines);
                    wrote = true;
                }
                Ok(Message::Stop) | Err(mpsc::TryRecvError::Disconnected) => break true,
                Err(mpsc::TryRecvError::Empty) => break false,
            }
        };
        let _ = self.flush();
        (stop, wrote)
    }

    /// Writes whole lines: at once when the file has room for all of them, else line by line,
    /// rotating where a line would not fit.
    fn write_batch(&mut self, batch: &[u8]) -> std::io::Result<()> {
        self.take_requests();
        let fits = self.config.file.is_none() || self.written + batch.len() as u64 <= self.config.max_file_bytes;
        if fits {
            self.append(batch)
        } else {
            batch.split_inclusive(|&b| b == b'\n').try_for_each(|line| self.write_line(line))
        }
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.config.file.is_some()
            && self.written > 0
            && self.written + line.len() as u64 > self.config.max_file_bytes
            && let Some(path) = self.config.file.clone()
        {
            self.rotate(&path);
        }
        self.append(line)
    }

    fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        self.pending.extend_from_slice(lines);
        self.written += lines.len() as u64;
        if self.pending.len() >= PENDING_MAX {
            self.write_pending()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_pending()?;
        match &mut self.file {
            Some(file) => file.flush(),
            None => std::io::stdout().flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
    }

    #[test]
    fn the_support_file_gets_the_last_lines_of_the_last_batches() {
        let mut recent = Recent { batches: VecDeque::new(), lines: 0 };
        let batch = |from: usize, count: usize| -> Vec<u8> {
            (from..from + count).flat_map(|i| format!("{{\"n\":{i}}}\n").into_bytes()).collect()
        };
        let mut next = 0;
        for count in [7, 300, 1, 450, 20] {
            recent.keep(batch(next, count), count);
            next += count;
        }
        // Batches no longer needed for the last RECENT_LINES lines were let go.
        assert_eq!(recent.batches.len(), 4, "the 300-line batch holds some of the last 500; the 7-line one none");
        *RECENT.lock() = recent;
        let lines = super::recent();
        assert_eq!(lines.len(), RECENT_LINES);
        assert_eq!(lines.first().unwrap(), &format!("{{\"n\":{}}}", next - RECENT_LINES));
        assert_eq!(lines.last().unwrap(), &format!("{{\"n\":{}}}", next - 1));
    }

    #[test]
    fn a_file_rotates_by_size_and_keeps_its_last_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.log");
        let config = LogConfig { file: Some(path.clone()), max_file_bytes: 100, keep_files: 2, ..LogConfig::default() };
        let mut output = Output::open(config).unwrap();
        let line = |i: usize| format!("{{\"line\":{i:04}}}......................\n");
        for i in 0..4 {
            output.write_batch(line(i).as_bytes()).unwrap();
        }
        // A batch that does not fit is cut at its lines.
        output.write_batch((4..10).map(line).collect::<String>().as_bytes()).unwrap();
        output.flush().unwrap();
        // 35-byte lines, two per 100-byte file: the current file, .1 and .2; .3 never.
        assert_eq!(lines(&path), 2);
        assert_eq!(lines(&dir.path().join("tollgate.log.1")), 2);
        assert_eq!(lines(&dir.path().join("tollgate.log.2")), 2);
        assert!(!dir.path().join("tollgate.log.3").exists());
        assert!(std::fs::read_to_string(&path).unwrap().contains("0009"), "the newest line is in FILE");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o640);
    }
}
