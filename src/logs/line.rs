//! The service's JSON line: what tracing-subscriber's flattened JSON format writes
//! (`timestamp`, `level`, the event's fields, `target`), written straight into the line
//! buffer. The generic format serializes every field through serde into an `io::Write`
//! adaptor over that buffer and formats the timestamp from scratch; an access line per
//! request made that a measurable share of a keep-alive request's CPU.

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats an event as one JSON object on one line.
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // The line is built in a `String` of this thread's and handed over in one write: the
        // writer is a `dyn fmt::Write`, and a line is some sixty small pieces.
        with_line(|line| format(line, event), |line| writer.write_str(line))
    }
}

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Builds a line with `build` in this thread's `LINE` (a fresh `String` when a field's
/// formatting logs an event of its own, the buffer then being in use) and gives it to `deliver`.
fn with_line<R>(build: impl FnOnce(&mut String), deliver: impl FnOnce(&str) -> R) -> R {
    LINE.with(|line| match line.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            build(&mut line);
            deliver(&line)
        }
        Err(_) => {
            let mut line = String::new();
            build(&mut line);
            deliver(&line)
        }
    })
}

fn format(out: &mut String, event: &Event<'_>) {
    // A `log` record (rustls logs through `log`) arrives as an event of target `log`, its
    // own target and place in `log.*` fields: its line names its real target instead.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    open(out, meta.level());
    event.record(&mut Fields { out });
    close(out, meta.target());
}

/// `{"timestamp":"…","level":"…"`: what every line starts with.
fn open(out: &mut String, level: &tracing::Level) {
    out.push_str("{\"timestamp\":\"");
    timestamp(out, SystemTime::now());
    out.push_str("\",\"level\":\"");
    out.push_str(level.as_str());
    out.push('"');
}

/// `,"target":"…"}` and the newline: what every line ends with.
fn close(out: &mut String, target: &str) {
    out.push_str(",\"target\":");
    string(out, target);
    out.push_str("}\n");
}

/// Builds the line an INFO event of `target` with `message` and the fields `fields` writes
/// would make, without the event, and gives it to `deliver`. For the access line, one per
/// request: an event goes through the dispatcher, the subscriber's own buffer and a dynamic
/// `Visit` call per field, a measurable share of a keep-alive request's CPU. The caller checks
/// that the target is enabled (`tracing::enabled!`), as the event's macro would.
pub fn direct(target: &str, message: &str, fields: impl FnOnce(&mut Direct<'_>), deliver: impl FnOnce(&[u8])) {
    let build = |out: &mut String| {
        open(out, &tracing::Level::INFO);
        let mut direct = Direct { out };
        direct.str("message", message);
        fields(&mut direct);
        close(direct.out, target);
    };
    with_line(build, |line| deliver(line.as_bytes()))
}

/// The fields of a line built by `direct`, written as an event's would be: `,"name":value`,
/// an absent optional field left out.
pub struct Direct<'a> {
    out: &'a mut String,
}

impl Direct<'_> {
    fn name(&mut self, name: &str) {
        self.out.push_str(",\"");
        self.out.push_str(name);
        self.out.push_str("\":");
    }

    pub fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        string(self.out, value);
    }

    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(name, value);
        }
    }

    pub fn u64(&mut self, name: &str, value: u64) {
        self.name(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub fn f64(&mut self, name: &str, value: f64) {
        self.name(name);
        number(self.out, value);
    }

    pub fn opt_f64(&mut self, name: &str, value: Option<f64>) {
        if let Some(value) = value {
            self.f64(name, value);
        }
    }
}

/// A JSON number; JSON has no NaN or infinity (serde_json writes null for them too).
fn number(out: &mut String, value: f64) {
    let mut digits = zmij::Buffer::new();
    out.push_str(if value.is_finite() { digits.format_finite(value) } else { "null" })
}

/// Writes each field as `,"name":value`.
struct Fields<'a> {
    out: &'a mut String,
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: impl FnOnce(&mut String)) {
        if !field.name().starts_with("log.") {
            self.out.push_str(",\"");
            // Field names are Rust identifiers: nothing to escape.
            self.out.push_str(field.name());
            self.out.push_str("\":");
            value(self.out);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |out| string(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.put(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.put(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |out| number(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |out| out.push_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |out| {
            out.push('"');
            let _ = write!(Escaped(out), "{value}");
            out.push('"');
        });
    }

    /// `%value`, `?value` and the message (`format_args!`): their text, as a string.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |out| {
            out.push('"');
            let _ = write!(Escaped(out), "{value:?}");
            out.push('"');
        });
    }
}

/// A JSON string.
fn string(out: &mut String, text: &str) {
    out.push('"');
    escape(out, text);
    out.push('"');
}

/// Appends `text` escaped for the inside of a JSON string.
fn escape(out: &mut String, text: &str) {
    let mut start = 0;
    for (i, &byte) in text.as_bytes().iter().enumerate() {
        if !ESCAPED[usize::from(byte)] {
            continue;
        }
        out.push_str(&text[start..i]);
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                let _ = write!(out, "\\u{byte:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// The bytes a JSON string cannot hold as they are: `"`, `\`, control characters and DEL.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0x7f] = true;
    table
};

/// Escapes what is written through it (a `Display` or `Debug` value's text).
struct Escaped<'a>(&'a mut String);

impl Write for Escaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        escape(self.0, text);
        Ok(())
    }
}

/// A socket address's text (`192.0.2.1:443`, `[2001:db8::1]:443`) on the stack, for a line
/// field given as `&str`: the `Display` of a `SocketAddr` goes through the formatting
/// machinery piece by piece, and every access line carries one.
pub struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl AddrText {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        let mut text = Self { buf: [0; 64], len: 0 };
        match addr {
            std::net::SocketAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(".");
                    }
                    text.push(digits.format(octet));
                }
                text.push(":");
                text.push(digits.format(v4.port()));
            }
            // `[v6%scope]:port` fits in 64 bytes.
            std::net::SocketAddr::V6(_) => {
                let _ = write!(text, "{addr}");
            }
        }
        text
    }

    fn push(&mut self, piece: &str) {
        let end = (self.len + piece.len()).min(self.buf.len());
        self.buf[self.len..end].copy_from_slice(&piece.as_bytes()[..end - self.len]);
        self.len = end;
    }

    pub fn as_str(&self) -> &str {
        // Whole pieces of ASCII text were copied in; a cut never falls inside a character.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl Write for AddrText {
    fn write_str(&mut self, piece: &str) -> fmt::Result {
        self.push(piece);
        Ok(())
    }
}

thread_local! {
    /// The last second formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS` text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), as tracing-subscriber writes it.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            text.clear();
            let (days, rest) = (secs / 86_400, secs % 86_400);
            let (year, month, day) = civil_from_days(days as i64);
            let _ =
                write!(text, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rest / 3600, rest / 60 % 60, rest % 60);
        }
        out.push_str(text);
    });
    // `.ffffffZ`, zero-padded by hand: `{:06}` goes through the formatter's padding.
    let mut micros = [b'0'; 6];
    let mut rest = since.subsec_micros();
    for digit in micros.iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.push('.');
    out.push_str(std::str::from_utf8(&micros).unwrap_or_default());
    out.push('Z');
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_match_the_calendar() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (1_796_249_834, "2026-12-02T22:17:14.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
        ];
        for (secs, want) in cases {
            let mut text = String::new();
            timestamp(&mut text, UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(text, want);
        }
        let mut text = String::new();
        timestamp(&mut text, UNIX_EPOCH + Duration::from_micros(1_796_249_834_773_312));
        assert_eq!(text, "2026-12-02T22:17:14.773312Z");
        text.clear();
        timestamp(&mut text, UNIX_EPOCH + Duration::from_micros(1_796_249_834_000_042));
        assert_eq!(text, "2026-12-02T22:17:14.000042Z");
    }

    #[test]
    fn strings_are_escaped_as_json_wants() {
        let mut text = String::new();
        string(&mut text, "a\"b\\c\nd\u{1}e\u{7f}é\u{2028}");
        assert_eq!(text, "\"a\\\"b\\\\c\\nd\\u0001e\\u007fé\u{2028}\"");
        let parsed: String = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}e\u{7f}é\u{2028}");
    }

    #[test]
    fn socket_addresses_read_as_their_display() {
        for addr in
            ["192.0.2.1:443", "0.0.0.0:0", "255.255.255.255:65535", "[2001:db8::1]:8443", "[::ffff:192.0.2.1]:1"]
        {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(AddrText::new(addr).as_str(), addr.to_string());
        }
        let scoped = std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap(),
            65535,
            0,
            u32::MAX,
        ));
        assert_eq!(AddrText::new(scoped).as_str(), scoped.to_string());
    }

    /// Where a test subscriber's lines go.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every kind of field a line carries, through a real subscriber, parsed back as JSON.
    #[test]
    fn lines_are_json_with_every_field() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().event_format(JsonLine).with_writer(move || writer.clone()).finish();
        let error = std::io::Error::other("disk \"full\"");
        tracing::subscriber::with_default(subscriber, || {
            let client: std::net::SocketAddr = "127.0.0.1:5".parse().unwrap();
            let nothing: Option<&str> = None;
            tracing::info!(
                target: "tollgate::access",
                client = %client,
                user = Some("a\"lice"),
                rule = nothing,
                version = ?http::Version::HTTP_11,
                status = 200u16,
                delta = -3i64,
                duration_ms = 0.25,
                nan = f64::NAN,
                cached = true,
                error = &error as &(dyn std::error::Error + 'static),
                "request {}", 7
            );
        });
        let text = String::from_utf8(sink.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "tollgate::access");
        assert_eq!(line["message"], "request 7");
        assert_eq!(line["client"], "127.0.0.1:5");
        assert_eq!(line["user"], "a\"lice");
        assert!(line.get("rule").is_none(), "an absent field is left out");
        assert_eq!(line["version"], "HTTP/1.1");
        assert_eq!(line["status"], 200);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["duration_ms"], 0.25);
        assert!(line["nan"].is_null());
        assert_eq!(line["cached"], true);
        assert_eq!(line["error"], "disk \"full\"");
        let stamp = line["timestamp"].as_str().unwrap();
        assert!(time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).is_ok(), "{stamp}");
    }

    /// A line built without an event is the very line its event makes: the same fields in
    /// the same order, byte for byte after the timestamp.
    #[test]
    fn a_direct_line_is_the_line_its_event_makes() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().event_format(JsonLine).with_writer(move || writer.clone()).finish();
        let nothing: Option<&str> = None;
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "tollgate::access",
                client = "127.0.0.1:5",
                user = Some("a\"lice\n"),
                rule = nothing,
                status = 200u16,
                duration_ms = 0.25,
                icap_ms = None::<f64>,
                icap_threat = Some("Eicar-Signature"),
                "request"
            );
        });
        let event = String::from_utf8(sink.0.lock().clone()).unwrap();
        let mut direct_line = String::new();
        direct(
            "tollgate::access",
            "request",
            |line| {
                line.str("client", "127.0.0.1:5");
                line.opt_str("user", Some("a\"lice\n"));
                line.opt_str("rule", nothing);
                line.u64("status", 200);
                line.f64("duration_ms", 0.25);
                line.opt_f64("icap_ms", None);
                line.opt_str("icap_threat", Some("Eicar-Signature"));
            },
            |line| direct_line = String::from_utf8(line.to_vec()).unwrap(),
        );
        let after_timestamp = |line: &str| line[line.find(",\"level\"").unwrap()..].to_owned();
        assert_eq!(after_timestamp(&direct_line), after_timestamp(&event));
        assert!(direct_line.ends_with("}\n") && direct_line.lines().count() == 1, "{direct_line}");
        let parsed: serde_json::Value = serde_json::from_str(&direct_line).unwrap();
        assert_eq!(parsed["user"], "a\"lice\n");
    }

    /// A `log` record (rustls logs through `log`) is written under its own target, without
    /// the bridge's `log.*` bookkeeping fields.
    #[test]
    fn log_records_keep_their_target() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().event_format(JsonLine).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            // One statement: the record borrows the format_args! temporary.
            tracing_log::format_trace(
                &log::Record::builder()
                    .target("rustls::conn")
                    .level(log::Level::Warn)
                    .module_path_static(Some("rustls::conn"))
                    .line(Some(7))
                    .args(format_args!("Sending warning alert {}", "CloseNotify"))
                    .build(),
            )
            .unwrap();
        });
        let text = String::from_utf8(sink.0.lock().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["target"], "rustls::conn", "{line}");
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["message"], "Sending warning alert CloseNotify", "{line}");
        assert!(line.as_object().unwrap().keys().all(|k| !k.starts_with("log.")), "{line}");
    }
}
