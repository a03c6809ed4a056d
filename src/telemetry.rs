//! Logging (tracing, JSON lines) and the process metrics rendered at `GET /metrics`.
//!
//! Metrics are plain atomics in one static struct: counting must cost nothing on the hot path,
//! and the Prometheus text is small enough to render by hand.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

/// The metric names that outside checks rely on (SPEC).
pub mod names {
    pub const HSM_SIGN_TOTAL: &str = "tollgate_hsm_sign_total";
    pub const HSM_SIGN_ERRORS_TOTAL: &str = "tollgate_hsm_sign_errors_total";
    pub const CACHE_HITS_TOTAL: &str = "tollgate_cert_cache_hits_total";
    pub const CACHE_MISSES_TOTAL: &str = "tollgate_cert_cache_misses_total";
    pub const MINT_ERRORS_TOTAL: &str = "tollgate_mint_errors_total";
    pub const MINT_FALLBACKS_TOTAL: &str = "tollgate_mint_fallbacks_total";
    pub const CONNECTIONS_ACTIVE: &str = "tollgate_connections_active";
    pub const CONNECTIONS_TOTAL: &str = "tollgate_connections_total";
    pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
    pub const TUNNELS_TOTAL: &str = "tollgate_tunnels_total";
    pub const UNTRUSTED_UPSTREAMS_TOTAL: &str = "tollgate_upstream_untrusted_total";
    pub const UPSTREAM_POOLED: &str = "tollgate_upstream_pooled_connections";
    pub const MASTER_KEY_EXPIRY: &str = "tollgate_master_key_expiry_seconds";
}

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub hsm_sign_total: AtomicU64,
    pub hsm_sign_errors_total: AtomicU64,
    pub cache_hits_total: AtomicU64,
    pub cache_misses_total: AtomicU64,
    pub mint_errors_total: AtomicU64,
    /// Mints with the CA key on the HSM that no HSM worker made (see `Ca::mint_off_runtime`).
    pub mint_fallbacks_total: AtomicU64,
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub tunnels_total: AtomicU64,
    pub untrusted_upstreams_total: AtomicU64,
    pub upstream_pooled: AtomicI64,
    /// Seconds until the master key expires (negative: expired; 0 with no expiry set).
    pub master_key_expiry_seconds: AtomicI64,
    /// Per HSM server.
    pub hsm_members: RwLock<Vec<Arc<MemberMetrics>>>,
    /// Per PKCS#11 library: jobs waiting.
    pub hsm_queues: RwLock<Vec<Arc<QueueGauge>>>,
}

/// Metrics of one HSM server.
#[derive(Debug)]
pub struct MemberMetrics {
    name: String,
    up: AtomicI64,
    /// Counts per `SIGN_BUCKETS` upper bound, then +Inf.
    buckets: [AtomicU64; SIGN_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Upper bounds (seconds) of the sign latency histogram.
const SIGN_BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

impl MemberMetrics {
    /// The metrics of a server, created on first use.
    pub fn register(name: &str) -> Arc<Self> {
        let mut members = METRICS.hsm_members.write();
        if let Some(m) = members.iter().find(|m| m.name == name) {
            return m.clone();
        }
        let m = Arc::new(Self {
            name: name.to_string(),
            up: AtomicI64::new(0),
            buckets: Default::default(),
            sum_micros: AtomicU64::new(0),
            errors: Mutex::new(Default::default()),
        });
        members.push(m.clone());
        m
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(i64::from(up), Relaxed);
    }

    pub fn observe_sign(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = SIGN_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(SIGN_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn observe_error(&self, reason: &str) {
        *self.errors.lock().entry(reason.to_string()).or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let name = &self.name;
        let _ = writeln!(out, "tollgate_hsm_member_up{{server=\"{name}\"}} {}", self.up.load(Relaxed));
        let mut cumulative = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = SIGN_BUCKETS.get(i).map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(
                out,
                "tollgate_hsm_sign_duration_seconds_bucket{{server=\"{name}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "tollgate_hsm_sign_duration_seconds_sum{{server=\"{name}\"}} {sum}");
        let _ = writeln!(out, "tollgate_hsm_sign_duration_seconds_count{{server=\"{name}\"}} {cumulative}");
        for (reason, count) in self.errors.lock().iter() {
            let _ =
                writeln!(out, "tollgate_hsm_member_sign_errors_total{{server=\"{name}\",reason=\"{reason}\"}} {count}");
        }
    }
}

/// Jobs waiting in one library's HSM queue.
#[derive(Debug)]
pub struct QueueGauge {
    library: String,
    depth: AtomicI64,
}

impl QueueGauge {
    /// The gauge of a library, created on first use.
    pub fn register(library: &str) -> Arc<Self> {
        let mut queues = METRICS.hsm_queues.write();
        if let Some(q) = queues.iter().find(|q| q.library == library) {
            return q.clone();
        }
        let q = Arc::new(Self { library: library.to_string(), depth: AtomicI64::new(0) });
        queues.push(q.clone());
        q
    }

    pub fn set(&self, depth: usize) {
        self.depth.store(depth as i64, Relaxed);
    }
}

/// The process-wide metrics.
pub static METRICS: Metrics = Metrics {
    hsm_sign_total: AtomicU64::new(0),
    hsm_sign_errors_total: AtomicU64::new(0),
    cache_hits_total: AtomicU64::new(0),
    cache_misses_total: AtomicU64::new(0),
    mint_errors_total: AtomicU64::new(0),
    mint_fallbacks_total: AtomicU64::new(0),
    connections_active: AtomicI64::new(0),
    connections_total: AtomicU64::new(0),
    requests_total: AtomicU64::new(0),
    tunnels_total: AtomicU64::new(0),
    untrusted_upstreams_total: AtomicU64::new(0),
    upstream_pooled: AtomicI64::new(0),
    master_key_expiry_seconds: AtomicI64::new(0),
    hsm_members: parking_lot::const_rwlock(Vec::new()),
    hsm_queues: parking_lot::const_rwlock(Vec::new()),
};

impl Metrics {
    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        use names::*;
        let Self {
            hsm_sign_total,
            hsm_sign_errors_total,
            cache_hits_total,
            cache_misses_total,
            mint_errors_total,
            mint_fallbacks_total,
            connections_active,
            connections_total,
            requests_total,
            tunnels_total,
            untrusted_upstreams_total,
            upstream_pooled,
            master_key_expiry_seconds,
            hsm_members,
            hsm_queues,
        } = self;
        let mut out = String::with_capacity(2048);
        let counters = [
            (HSM_SIGN_TOTAL, "Signatures made by the HSM.", hsm_sign_total),
            (HSM_SIGN_ERRORS_TOTAL, "HSM signatures that failed.", hsm_sign_errors_total),
            (CACHE_HITS_TOTAL, "Minted leaves served from the cache.", cache_hits_total),
            (CACHE_MISSES_TOTAL, "Leaf lookups that had to mint.", cache_misses_total),
            (MINT_ERRORS_TOTAL, "Mints that failed.", mint_errors_total),
            (
                MINT_FALLBACKS_TOTAL,
                "Mints with the CA key on the HSM made on the blocking pool: no HSM worker took them in time (queue full, \
                 no server up) or their signature was overdue.",
                mint_fallbacks_total,
            ),
            (CONNECTIONS_TOTAL, "Client connections accepted.", connections_total),
            (REQUESTS_TOTAL, "HTTP requests relayed.", requests_total),
            (TUNNELS_TOTAL, "Connections passed through without decryption.", tunnels_total),
            (UNTRUSTED_UPSTREAMS_TOTAL, "Upstream certificates that failed validation.", untrusted_upstreams_total),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        let gauges = [
            (CONNECTIONS_ACTIVE, "Client connections open now.", connections_active),
            (UPSTREAM_POOLED, "Upstream connections pooled for reuse.", upstream_pooled),
            (MASTER_KEY_EXPIRY, "Seconds until the master key expires (0: no expiry set).", master_key_expiry_seconds),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_hsm_member_up Whether the HSM server is connected and authenticated.\n# TYPE tollgate_hsm_member_up gauge"
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_hsm_sign_duration_seconds HSM signature latency, queueing included.\n# TYPE tollgate_hsm_sign_duration_seconds histogram"
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_hsm_member_sign_errors_total HSM signature failures by reason.\n# TYPE tollgate_hsm_member_sign_errors_total counter"
        );
        for member in hsm_members.read().iter() {
            member.render(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_hsm_queue_depth HSM jobs waiting per PKCS#11 library.\n# TYPE tollgate_hsm_queue_depth gauge"
        );
        for queue in hsm_queues.read().iter() {
            let _ = writeln!(
                out,
                "tollgate_hsm_queue_depth{{library=\"{}\"}} {}",
                queue.library,
                queue.depth.load(Relaxed)
            );
        }
        out
    }
}

/// The content type of `render_metrics`.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The process metrics, for `GET /metrics`.
pub fn render_metrics() -> String {
    METRICS.render()
}

/// Counts one open connection for as long as it lives.
#[derive(Debug)]
pub struct ConnectionGuard(());

impl ConnectionGuard {
    /// Counts a newly accepted connection.
    pub fn new() -> Self {
        METRICS.connections_total.fetch_add(1, Relaxed);
        METRICS.connections_active.fetch_add(1, Relaxed);
        Self(())
    }
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        METRICS.connections_active.fetch_sub(1, Relaxed);
    }
}

/// How many of the service's last log lines the support file gets.
const RECENT_LINES: usize = 500;

static RECENT: Mutex<std::collections::VecDeque<String>> = Mutex::new(std::collections::VecDeque::new());

/// The service's most recent log lines, oldest first (for the support file).
pub fn recent_logs() -> Vec<String> {
    RECENT.lock().iter().cloned().collect()
}

/// Standard output, with each line also kept in `RECENT` (the formatter writes one event per
/// call).
struct RecentTee;

impl std::io::Write for RecentTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            // Every relayed request logs a line: once the ring is full, the oldest line's
            // buffer is reused, so keeping lines costs no allocation in steady state.
            let mut recent = RECENT.lock();
            let mut line =
                if recent.len() == RECENT_LINES { recent.pop_front().unwrap_or_default() } else { String::new() };
            line.clear();
            line.push_str(&String::from_utf8_lossy(buf));
            recent.push_back(line);
        }
        std::io::stdout().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Installs the tracing subscriber: JSON lines on stdout, filter from `TOLLGATE_LOG`
/// (default `info`). Human commands (`cert`, `hsm`) log to stderr so stdout stays data.
pub fn init(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        // cryptoki logs an error for every vendor mechanism it has no name for (`hsm info`).
        .unwrap_or_else(|_| EnvFilter::new("info,cryptoki::mechanism=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(|| RecentTee)
            .try_init()
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_spec_names() {
        let text = METRICS.render();
        for name in
            [names::HSM_SIGN_TOTAL, names::CACHE_HITS_TOTAL, names::CACHE_MISSES_TOTAL, names::CONNECTIONS_ACTIVE]
        {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing");
        }
    }
}
