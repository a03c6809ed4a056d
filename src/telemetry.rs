//! Logging (tracing, JSON lines) and the process metrics rendered at `GET /metrics`.
//!
//! Metrics are prometheus-client types in one registry, so the exposition (Prometheus text
//! format 0.0.4) escapes label values and keeps each family's series together however many HSM
//! servers and libraries there are. Counters and gauges are single atomics, cheap on the hot
//! path; per-server and per-library series are looked up once and kept by their owner
//! (`MemberMetrics`, `QueueGauge`). The standard `process_*` metrics are read from /proc at
//! each scrape.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    /// `tollgate_hsm_sign_total`: signatures made by the HSM.
    pub hsm_sign_total: Counter,
    pub hsm_sign_errors_total: Counter,
    /// `tollgate_cert_cache_hits_total`.
    pub cache_hits_total: Counter,
    /// `tollgate_cert_cache_misses_total`.
    pub cache_misses_total: Counter,
    pub mint_errors_total: Counter,
    /// Mints with the CA key on the HSM that no HSM worker made (see `Ca::mint_off_runtime`).
    pub mint_fallbacks_total: Counter,
    /// `tollgate_connections_active`: every client connection, for its whole life.
    pub connections_active: Gauge,
    pub connections_total: Counter,
    pub requests_total: Counter,
    pub tunnels_total: Counter,
    pub untrusted_upstreams_total: Counter,
    /// Synced from the log queue's own count at each scrape.
    log_lines_dropped: Counter,
    pub upstream_pooled: Gauge,
    /// Seconds until the master key expires (negative: expired; 0 with no expiry set).
    pub master_key_expiry_seconds: Gauge,
    hsm_member_up: Family<Server, Gauge>,
    hsm_sign_duration: Family<Server, Histogram, fn() -> Histogram>,
    hsm_member_sign_errors: Family<ServerReason, Counter>,
    hsm_queue_depth: Family<Library, Gauge>,
    host_list_entries: Family<List, Gauge>,
    host_list_errors: Family<List, Counter>,
    refused: Family<Reason, Counter>,
    registry: Registry,
}

/// Why a connection was refused before it was served.
#[derive(Clone, Copy, Debug)]
pub enum Refused {
    MaxConnections,
    PerClientConnections,
    /// A mint a client was not allowed to cause (its connection is refused).
    PerClientMints,
    /// No valid PROXY protocol header, or one from a peer not trusted to send it.
    ProxyProtocol,
}

impl Refused {
    fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::PerClientConnections => "per_client_connections",
            Self::PerClientMints => "per_client_mints",
            Self::ProxyProtocol => "proxy_protocol",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct List {
    list: String,
}

/// `tollgate_connections_refused_total{reason}`.
pub fn refused(reason: Refused) -> Counter {
    METRICS.refused.get_or_create_owned(&Reason { reason: reason.as_str() })
}

/// A host list's metrics: (entries in its current version, failed loads).
pub fn host_list_metrics(list: &str) -> (Gauge, Counter) {
    let label = List { list: list.to_string() };
    (METRICS.host_list_entries.get_or_create_owned(&label), METRICS.host_list_errors.get_or_create_owned(&label))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Server {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerReason {
    server: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Library {
    library: String,
}

/// Upper bounds (seconds) of the sign latency histogram.
const SIGN_BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The content type of `render_metrics`.
pub const METRICS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The process metrics, for `GET /metrics`.
pub fn render_metrics() -> String {
    METRICS.render()
}

impl Metrics {
    fn new() -> Self {
        let sign_duration: fn() -> Histogram = || Histogram::new(SIGN_BUCKETS);
        let metrics = Self {
            hsm_sign_total: Counter::default(),
            hsm_sign_errors_total: Counter::default(),
            cache_hits_total: Counter::default(),
            cache_misses_total: Counter::default(),
            mint_errors_total: Counter::default(),
            mint_fallbacks_total: Counter::default(),
            connections_active: Gauge::default(),
            connections_total: Counter::default(),
            requests_total: Counter::default(),
            tunnels_total: Counter::default(),
            untrusted_upstreams_total: Counter::default(),
            log_lines_dropped: Counter::default(),
            upstream_pooled: Gauge::default(),
            master_key_expiry_seconds: Gauge::default(),
            hsm_member_up: Family::default(),
            hsm_sign_duration: Family::new_with_constructor(sign_duration),
            hsm_member_sign_errors: Family::default(),
            hsm_queue_depth: Family::default(),
            host_list_entries: Family::default(),
            host_list_errors: Family::default(),
            refused: Family::default(),
            registry: Registry::default(),
        };
        metrics.registered()
    }

    /// Registers every metric (clones share their values) and the process collector.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        let counters = [
            ("tollgate_hsm_sign", "Signatures made by the HSM", &self.hsm_sign_total),
            ("tollgate_hsm_sign_errors", "HSM signatures that failed", &self.hsm_sign_errors_total),
            ("tollgate_cert_cache_hits", "Minted leaves served from the cache", &self.cache_hits_total),
            ("tollgate_cert_cache_misses", "Leaf lookups that had to mint", &self.cache_misses_total),
            ("tollgate_mint_errors", "Mints that failed", &self.mint_errors_total),
            (
                "tollgate_mint_fallbacks",
                "Mints with the CA key on the HSM made on the blocking pool: no HSM worker took them in time (queue \
                 full, no server up) or their signature was overdue",
                &self.mint_fallbacks_total,
            ),
            ("tollgate_connections", "Client connections accepted", &self.connections_total),
            ("tollgate_requests", "HTTP requests relayed", &self.requests_total),
            ("tollgate_tunnels", "Connections passed through without decryption", &self.tunnels_total),
            (
                "tollgate_upstream_untrusted",
                "Upstream certificates that failed validation",
                &self.untrusted_upstreams_total,
            ),
            (
                "tollgate_log_lines_dropped",
                "Log lines dropped because the log writer fell behind (the data plane never waits)",
                &self.log_lines_dropped,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        let gauges = [
            (
                "tollgate_connections_active",
                "Client connections open now, CONNECT tunnels and WebSockets included",
                &self.connections_active,
            ),
            ("tollgate_upstream_pooled_connections", "Upstream connections pooled for reuse", &self.upstream_pooled),
            (
                "tollgate_master_key_expiry_seconds",
                "Seconds until the master key expires (0: no expiry set)",
                &self.master_key_expiry_seconds,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "tollgate_hsm_member_up",
            "Whether the HSM server is connected and authenticated",
            self.hsm_member_up.clone(),
        );
        r.register(
            "tollgate_hsm_sign_duration_seconds",
            "HSM signature latency, queueing included",
            self.hsm_sign_duration.clone(),
        );
        r.register(
            "tollgate_hsm_member_sign_errors",
            "HSM signature failures by reason",
            self.hsm_member_sign_errors.clone(),
        );
        r.register("tollgate_hsm_queue_depth", "HSM jobs waiting per PKCS#11 library", self.hsm_queue_depth.clone());
        r.register(
            "tollgate_host_list_entries",
            "Entries in a host list's current version",
            self.host_list_entries.clone(),
        );
        r.register(
            "tollgate_host_list_errors",
            "Host list loads that failed (the last good version stayed)",
            self.host_list_errors.clone(),
        );
        r.register(
            "tollgate_connections_refused",
            "Client connections refused before they were served, by reason",
            self.refused.clone(),
        );
        r.register_collector(Box::new(ProcessMetrics));
        self
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        {
            // One scrape at a time brings the counter up to the queue's count.
            static SYNC: Mutex<()> = Mutex::new(());
            let _sync = SYNC.lock();
            let (dropped, counted) = (crate::logs::dropped(), self.log_lines_dropped.get());
            if dropped > counted {
                self.log_lines_dropped.inc_by(dropped - counted);
            }
        }
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Metrics of one HSM server, kept by its member.
#[derive(Debug)]
pub struct MemberMetrics {
    server: String,
    up: Gauge,
    sign_duration: Histogram,
}

impl MemberMetrics {
    /// The metrics of a server.
    pub fn register(name: &str) -> Arc<Self> {
        let label = Server { server: name.to_string() };
        Arc::new(Self {
            server: name.to_string(),
            up: METRICS.hsm_member_up.get_or_create_owned(&label),
            sign_duration: METRICS.hsm_sign_duration.get_or_create_owned(&label),
        })
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub fn observe_sign(&self, took: Duration) {
        self.sign_duration.observe(took.as_secs_f64());
    }

    pub fn observe_error(&self, reason: &str) {
        let labels = ServerReason { server: self.server.clone(), reason: reason.to_string() };
        METRICS.hsm_member_sign_errors.get_or_create(&labels).inc();
    }
}

/// Jobs waiting in one library's HSM queue.
#[derive(Debug)]
pub struct QueueGauge(Gauge);

impl QueueGauge {
    /// The gauge of a library.
    pub fn register(library: &str) -> Arc<Self> {
        Arc::new(Self(METRICS.hsm_queue_depth.get_or_create_owned(&Library { library: library.to_string() })))
    }

    pub fn set(&self, depth: usize) {
        self.0.set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
}

/// The standard `process_*` metrics, read from /proc at each scrape.
#[derive(Debug)]
struct ProcessMetrics;

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(process) = procfs::process::Process::myself() else { return Ok(()) };
        let Ok(stat) = process.stat() else { return Ok(()) };
        let ticks = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        let started = procfs::boot_time_secs().map(|boot| boot as f64 + stat.starttime as f64 / ticks).unwrap_or(0.0);
        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?)?;
        let mut gauge = |name: &str, help: &str, value: f64| {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge("process_resident_memory_bytes", "Resident memory size in bytes", (stat.rss * page) as f64)?;
        gauge("process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize as f64)?;
        gauge("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds", started)?;
        gauge("process_threads", "Number of OS threads in the process", stat.num_threads as f64)?;
        if let Ok(fds) = process.fd_count() {
            gauge("process_open_fds", "Number of open file descriptors", fds as f64)?;
        }
        if let Ok(limits) = process.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            gauge("process_max_fds", "Maximum number of open file descriptors", max as f64)?;
        }
        Ok(())
    }
}

/// Counts one open connection for as long as it lives.
#[derive(Debug)]
pub struct ConnectionGuard(());

impl ConnectionGuard {
    /// Counts a newly accepted connection.
    pub fn new() -> Self {
        METRICS.connections_total.inc();
        METRICS.connections_active.inc();
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
        METRICS.connections_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_spec_names_escaped_and_each_family_together() {
        for name in ["a\"b", "back\\slash", "plain"] {
            let member = MemberMetrics::register(name);
            member.set_up(true);
            member.observe_sign(Duration::from_micros(50));
            member.observe_error("timeout");
        }
        QueueGauge::register("/opt/vendor lib/libp11.so").set(3);
        let text = METRICS.render();
        for name in [
            "tollgate_hsm_sign_total",
            "tollgate_cert_cache_hits_total",
            "tollgate_cert_cache_misses_total",
            "tollgate_connections_active",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ] {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{text}");
        }
        assert!(text.contains(r#"tollgate_hsm_member_up{server="a\"b"} 1"#), "{text}");
        assert!(text.contains(r#"tollgate_hsm_member_up{server="back\\slash"} 1"#), "{text}");
        assert!(text.contains(r#"tollgate_hsm_queue_depth{library="/opt/vendor lib/libp11.so"} 3"#), "{text}");
        // Each family is declared once, and every series stands under its own family's TYPE line.
        let mut seen = Vec::new();
        let mut family = "";
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                family = declared.split(' ').next().unwrap();
                assert!(!seen.contains(&family), "{family} declared twice:\n{text}");
                seen.push(family);
            } else if !line.starts_with('#') {
                assert!(line.starts_with(family), "{line:?} is not under its family ({family}):\n{text}");
            }
        }
    }
}
