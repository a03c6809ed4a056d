//! Where the service's JSON lines go (`[log]`), without ever making the data plane wait.
//!
//! A line is formatted on the thread that logs it, into a bounded queue (tracing-appender's
//! lossy non-blocking writer); one writer thread drains the queue to standard output or to a
//! file. When the writer falls behind (a stuck stdout pipe, a slow disk), lines are dropped
//! and counted (`tollgate_log_lines_dropped_total`) rather than queued without bound or
//! waited for.
//!
//! A file is rotated by size (`FILE.1` the newest of `keep_files`) and reopened on request
//! (SIGHUP, SIGUSR1: after logrotate moved it). The writer thread keeps the last lines for
//! the support file as well.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use crate::config::LogConfig;

mod line;

/// How many of the service's last log lines the support file gets.
const RECENT_LINES: usize = 500;

static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
/// The queue's count of lines it dropped.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
/// The settings the writer should switch to at its next line (`configure`), if any.
static PENDING: Mutex<Option<LogConfig>> = Mutex::new(None);
/// Set by `reopen` and `configure`; taken by the writer thread.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// The writer thread's guard: dropping it writes out the queued lines (`flush`).
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

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
    let output = Output::open(config.clone())?;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(config.buffer_lines)
        .thread_name("tollgate-log")
        .finish(output);
    let _ = DROPPED.set(writer.error_counter());
    let result =
        tracing_subscriber::fmt().with_env_filter(filter()).event_format(line::JsonLine).with_writer(writer).try_init();
    // A second init (tests) keeps the first subscriber.
    drop(result);
    *WRITER.lock() = Some(guard);
    Ok(())
}

/// Writes out the lines still queued and stops the writer (at exit, or before an abort):
/// later lines are dropped.
pub fn flush() {
    let guard = WRITER.lock().take();
    drop(guard);
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
    DROPPED.get().map_or(0, |counter| counter.dropped_lines() as u64)
}

/// The service's most recent log lines, oldest first (for the support file).
pub fn recent() -> Vec<String> {
    RECENT.lock().iter().cloned().collect()
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

    fn remember(buf: &[u8]) {
        // Once the ring is full, the oldest line's buffer is reused: no allocation per line.
        let mut recent = RECENT.lock();
        let mut line =
            if recent.len() == RECENT_LINES { recent.pop_front().unwrap_or_default() } else { String::new() };
        line.clear();
        line.push_str(&String::from_utf8_lossy(buf));
        recent.push_back(line);
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

impl Write for Output {
    /// One formatted line per call (the queue carries whole lines).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.take_requests();
        Self::remember(buf);
        if self.config.file.is_some()
            && self.written > 0
            && self.written + buf.len() as u64 > self.config.max_file_bytes
            && let Some(path) = self.config.file.clone()
        {
            self.rotate(&path);
        }
        self.pending.extend_from_slice(buf);
        self.written += buf.len() as u64;
        if self.pending.len() >= PENDING_MAX {
            self.write_pending()?;
        }
        Ok(buf.len())
    }

    /// Called by the queue's worker whenever the queue runs empty.
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
    fn a_file_rotates_by_size_and_keeps_its_last_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.log");
        let config = LogConfig { file: Some(path.clone()), max_file_bytes: 100, keep_files: 2, ..LogConfig::default() };
        let mut output = Output::open(config).unwrap();
        for i in 0..10 {
            output.write_all(format!("{{\"line\":{i:04}}}......................\n").as_bytes()).unwrap();
        }
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
