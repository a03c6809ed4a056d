//! An ICAP client (RFC 3507): decrypted requests (REQMOD) and responses (RESPMOD) handed to a
//! content scanner. The service's OPTIONS are probed on first use and again when their
//! `Options-TTL` runs out or a connection fails; they decide the methods offered, the preview
//! size, which files go whole or not at all (`Transfer-*`), and how many connections the
//! service takes. A message goes out as a preview when the service takes one; `204` after it
//! (or after the whole body, when tollgate kept it: `Allow: 204`) passes the message unchanged,
//! with no byte of it sent twice. A body too large to keep is streamed through the scanner and
//! its answer streamed back, so memory stays bounded whatever the size. Connections are kept
//! per service and reused.
//!
//! This module knows ICAP and HTTP messages, not the proxy: `proxy::scan` decides what is
//! scanned and what a failure means for the client.

pub mod options;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::config::{IcapConfig, IcapUrl};
use options::{Options, Transfer};
use wire::{Chunks, Encapsulated, Head};

/// After a failed OPTIONS probe, messages fail at once for this long instead of each trying to
/// connect to a scanner that is down.
const PROBE_BACKOFF: Duration = Duration::from_secs(1);

/// An idle connection unused this long is closed rather than reused.
const IDLE_MAX: Duration = Duration::from_secs(30);

/// Frames of a streamed answer in flight to the client at most (each up to 64 KiB).
const STREAM_FRAMES: usize = 4;

/// Why a scan did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum IcapError {
    #[error("{url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("{url} does not offer {method} (its OPTIONS: {offered})")]
    NotOffered { url: String, method: &'static str, offered: String },
    #[error("{url}: no answer within {secs} s ({phase})")]
    Timeout { url: String, secs: u64, phase: &'static str },
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} answered {status} {reason}")]
    Status { url: String, status: u16, reason: String },
    #[error("{url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("the message's own body failed while it was scanned: {0}")]
    Body(BoxError),
}

/// The two services and what applies to both.
pub struct Icap {
    pub reqmod: Option<Arc<Service>>,
    pub respmod: Option<Arc<Service>>,
    /// A body declared no larger than this is kept while scanned (a `204` may follow it).
    buffer_bytes: usize,
}

impl Icap {
    /// The services `[icap]` names; `None` when it names none.
    pub fn from_config(config: &IcapConfig) -> Option<Self> {
        if config.reqmod.is_none() && config.respmod.is_none() {
            return None;
        }
        let service =
            |url: &Option<IcapUrl>, method| url.clone().map(|url| Arc::new(Service::new(url, method, config)));
        Some(Self {
            reqmod: service(&config.reqmod, Method::Reqmod),
            respmod: service(&config.respmod, Method::Respmod),
            buffer_bytes: config.buffer_bytes,
        })
    }

    /// Probes every service's OPTIONS once, logging what each offers or why it cannot be used
    /// (the proxy starts either way; messages follow `on_error` while a scanner is away).
    pub async fn probe(&self) {
        for service in self.reqmod.iter().chain(&self.respmod) {
            match service.options().await {
                Ok(options) => tracing::info!(
                    url = %service.url.url, methods = %options.methods.join(", "), preview = options.preview,
                    istag = options.istag.as_deref(), max_connections = options.max_connections,
                    ttl_secs = options.ttl.map(|t| t.as_secs()), "ICAP service ready"
                ),
                Err(e) => tracing::error!(error = %e, "ICAP service unavailable; messages follow [icap] on_error"),
            }
        }
    }

    /// Scans a message with `service`.
    pub async fn scan(&self, service: &Arc<Service>, message: Message) -> Result<(Scanned, Facts), Failed> {
        service.exchange(message, self.buffer_bytes).await
    }
}

/// REQMOD or RESPMOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Reqmod,
    Respmod,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reqmod => "REQMOD",
            Self::Respmod => "RESPMOD",
        }
    }
}

/// An HTTP message to scan.
pub struct Message {
    /// The request head (absolute URI), encapsulated in both methods.
    pub request_head: Vec<u8>,
    /// RESPMOD: the response head.
    pub response_head: Option<Vec<u8>>,
    /// The body; `None` when the message has none.
    pub body: Option<Body>,
    /// The body's declared length, when known.
    pub length: Option<u64>,
    /// The requested resource's file extension (`Transfer-*`).
    pub extension: Option<String>,
    /// Sent as `X-Client-IP` and `X-Client-Username`, as Squid does, for scanners that log or
    /// decide by them.
    pub client: std::net::IpAddr,
    pub user: Option<Arc<str>>,
}

/// What the scanner made of a message.
pub enum Scanned {
    /// Unchanged: the body to send on (what was read for the preview, then the rest).
    Unmodified { body: Option<Body> },
    /// The scanner's message instead: a request to send on (REQMOD), or a response to answer
    /// with (either method).
    Modified {
        request: Option<Box<http::request::Parts>>,
        response: Option<Box<http::response::Parts>>,
        body: Option<Body>,
    },
}

/// What the access log records of a scan.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// `clean` (204), `modified`, `blocked` (the scanner found something: `threat`), `ignored`
    /// (the service's Transfer-Ignore).
    pub verdict: &'static str,
    pub istag: Option<String>,
    pub threat: Option<String>,
    pub elapsed: Duration,
}

/// A scan that failed, with the message's body when none of it was lost.
pub struct Failed {
    pub error: IcapError,
    /// `Some`: the body is intact (`Some(None)`: there was none), so the message can still pass.
    pub body: Option<Option<Body>>,
}

impl Failed {
    fn intact(error: IcapError, body: Option<Body>) -> Self {
        Self { error, body: Some(body) }
    }

    fn lost(error: IcapError) -> Self {
        Self { error, body: None }
    }
}

/// One connection to a service, split so a body can be sent while the answer is read.
struct Conn {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    /// Whether it served an exchange before (a failure on it before any byte is retried once).
    reused: bool,
}

/// One ICAP service (URL) and its connections.
pub struct Service {
    url: IcapUrl,
    method: Method,
    timeout: Duration,
    options: Mutex<Option<(Arc<Options>, Option<Instant>)>>,
    /// Held while probing, so one probe runs at a time.
    probing: tokio::sync::Mutex<Option<(Instant, String)>>,
    idle: Mutex<Vec<(Conn, Instant)>>,
    /// One permit per connection in use.
    permits: Arc<Semaphore>,
    /// Permits in all (the configured maximum, or the service's Max-Connections when lower).
    limit: AtomicUsize,
    configured_max: usize,
}

impl Service {
    fn new(url: IcapUrl, method: Method, config: &IcapConfig) -> Self {
        Self {
            url,
            method,
            timeout: Duration::from_secs(config.timeout_secs),
            options: Mutex::new(None),
            probing: tokio::sync::Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(config.max_connections)),
            limit: AtomicUsize::new(config.max_connections),
            configured_max: config.max_connections,
        }
    }

    pub fn url(&self) -> &str {
        &self.url.url
    }

    fn secs(&self) -> u64 {
        self.timeout.as_secs()
    }

    fn io(&self, source: std::io::Error) -> IcapError {
        IcapError::Io { url: self.url.url.clone(), source }
    }

    fn timed_out(&self, phase: &'static str) -> IcapError {
        IcapError::Timeout { url: self.url.url.clone(), secs: self.secs(), phase }
    }

    fn protocol(&self, reason: impl Into<String>) -> IcapError {
        IcapError::Protocol { url: self.url.url.clone(), reason: reason.into() }
    }

    /// The service's OPTIONS: cached until their TTL, probed otherwise.
    pub async fn options(&self) -> Result<Arc<Options>, IcapError> {
        if let Some(options) = self.fresh_options() {
            return Ok(options);
        }
        let mut last_failure = self.probing.lock().await;
        if let Some(options) = self.fresh_options() {
            return Ok(options);
        }
        if let Some((at, reason)) = last_failure.as_ref()
            && at.elapsed() < PROBE_BACKOFF
        {
            return Err(IcapError::Unavailable { url: self.url.url.clone(), reason: reason.clone() });
        }
        match self.probe().await {
            Ok(options) => {
                *last_failure = None;
                self.set_limit(options.max_connections.unwrap_or(self.configured_max).min(self.configured_max));
                let expires = options.ttl.map(|ttl| Instant::now() + ttl);
                let options = Arc::new(options);
                *self.options.lock() = Some((options.clone(), expires));
                Ok(options)
            }
            Err(e) => {
                let said = e.to_string();
                let reason = said.strip_prefix(&format!("{}: ", self.url.url)).unwrap_or(&said);
                *last_failure = Some((Instant::now(), reason.to_string()));
                Err(e)
            }
        }
    }

    fn fresh_options(&self) -> Option<Arc<Options>> {
        let cached = self.options.lock();
        let (options, expires) = cached.as_ref()?;
        expires.is_none_or(|at| Instant::now() < at).then(|| options.clone())
    }

    /// Forgets the OPTIONS (the next message probes again) and the idle connections: the
    /// service failed, and may come back different (a new ISTag) or not at all.
    fn forget(&self) {
        *self.options.lock() = None;
        self.idle.lock().clear();
    }

    async fn probe(&self) -> Result<Options, IcapError> {
        let mut conn = self.dial().await?;
        let head = wire::request_head("OPTIONS", &self.url.url, &self.authority(), "Encapsulated: null-body=0\r\n");
        let exchange = async {
            conn.write.write_all(&head).await?;
            wire::read_head(&mut conn.read).await
        };
        let head = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.timed_out("OPTIONS"))?
            .map_err(|e| self.io(e))?
            .ok_or_else(|| self.protocol("closed the connection without answering OPTIONS"))?;
        let options = Options::from_head(&head).map_err(|reason| self.protocol(reason))?;
        let has_body = head.get("encapsulated").is_some_and(|e| e.contains("opt-body"));
        if !head.closes() && !has_body {
            self.checkin(conn);
        }
        Ok(options)
    }

    fn set_limit(&self, limit: usize) {
        let limit = limit.max(1);
        let old = self.limit.swap(limit, Ordering::AcqRel);
        match limit.cmp(&old) {
            std::cmp::Ordering::Greater => self.permits.add_permits(limit - old),
            std::cmp::Ordering::Less => {
                // Permits in use are forgotten as they come back.
                let permits = self.permits.clone();
                let excess = old - limit;
                tokio::spawn(async move {
                    if let Ok(taken) = permits.acquire_many_owned(excess as u32).await {
                        taken.forget();
                    }
                });
            }
            std::cmp::Ordering::Equal => {}
        }
    }

    fn authority(&self) -> String {
        match self.url.host.contains(':') {
            true => format!("[{}]:{}", self.url.host, self.url.port),
            false => format!("{}:{}", self.url.host, self.url.port),
        }
    }

    async fn dial(&self) -> Result<Conn, IcapError> {
        let connect = TcpStream::connect((self.url.host.as_str(), self.url.port));
        let stream = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| self.timed_out("connect"))?
            .map_err(|e| IcapError::Unavailable { url: self.url.url.clone(), reason: e.to_string() })?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Ok(Conn { read: BufReader::new(read), write, reused: false })
    }

    /// An idle connection, or a new one.
    async fn checkout(&self) -> Result<Conn, IcapError> {
        let pooled = {
            let mut idle = self.idle.lock();
            idle.retain(|(_, since)| since.elapsed() < IDLE_MAX);
            idle.pop()
        };
        match pooled {
            Some((conn, _)) => Ok(conn),
            None => self.dial().await,
        }
    }

    fn checkin(&self, mut conn: Conn) {
        conn.reused = true;
        let mut idle = self.idle.lock();
        if idle.len() < self.limit.load(Ordering::Acquire) {
            idle.push((conn, Instant::now()));
        }
    }

    /// The ICAP headers of one message.
    fn request(&self, message: &Message, preview: Option<usize>, allow_204: bool, has_body: bool) -> Vec<u8> {
        let request_len = message.request_head.len();
        let encapsulated = match (&message.response_head, has_body) {
            (None, true) => format!("req-hdr=0, req-body={request_len}"),
            (None, false) => format!("req-hdr=0, null-body={request_len}"),
            (Some(response), true) => {
                format!("req-hdr=0, res-hdr={request_len}, res-body={}", request_len + response.len())
            }
            (Some(response), false) => {
                format!("req-hdr=0, res-hdr={request_len}, null-body={}", request_len + response.len())
            }
        };
        let mut headers = format!("Encapsulated: {encapsulated}\r\nX-Client-IP: {}\r\n", message.client);
        if let Some(user) = &message.user
            && !user.contains(['\r', '\n'])
        {
            headers.push_str(&format!("X-Client-Username: {user}\r\n"));
        }
        if allow_204 {
            headers.push_str("Allow: 204\r\n");
        }
        if let Some(preview) = preview {
            headers.push_str(&format!("Preview: {preview}\r\n"));
        }
        let mut out = wire::request_head(self.method.as_str(), &self.url.url, &self.authority(), &headers);
        out.extend_from_slice(&message.request_head);
        if let Some(response) = &message.response_head {
            out.extend_from_slice(response);
        }
        out
    }

    /// One message through the service.
    async fn exchange(self: &Arc<Self>, mut message: Message, buffer_bytes: usize) -> Result<(Scanned, Facts), Failed> {
        let started = Instant::now();
        let body = message.body.take();
        let options = match self.options().await {
            Ok(options) => options,
            Err(e) => return Err(Failed::intact(e, body)),
        };
        let mut facts = Facts { istag: options.istag.clone(), ..Facts::default() };
        if !options.offers(self.method.as_str()) {
            let offered = options.methods.join(", ");
            let e = IcapError::NotOffered { url: self.url.url.clone(), method: self.method.as_str(), offered };
            return Err(Failed::intact(e, body));
        }
        let transfer = options.transfer(message.extension.as_deref());
        if body.is_some() && transfer == Transfer::Ignore {
            facts.verdict = "ignored";
            return Ok((Scanned::Unmodified { body }, facts));
        }
        // The preview: its bytes are kept (they go on after a 204), the rest stays unread.
        let mut preview = Preview::default();
        let mut rest = body;
        if let (Transfer::Preview(size), Some(body)) = (transfer, rest.take()) {
            preview = match Preview::read(body, size).await {
                Ok(preview) => preview,
                Err(e) => return Err(Failed::lost(IcapError::Body(e))),
            };
            rest = preview.rest.take();
        }
        let previewing = matches!(transfer, Transfer::Preview(_)) && preview.taken;
        let has_body = previewing || rest.is_some();
        let retain = message.length.is_some_and(|l| l <= buffer_bytes as u64);
        let allow_204 = !has_body || preview.ieof || retain;
        let permit = match tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Failed::intact(self.timed_out("a free connection"), preview.restore(rest))),
        };
        let request = self.request(&message, previewing.then_some(preview.bytes.len()), allow_204, has_body);

        // Send the heads (and the preview), read the first answer; a pooled connection that
        // turns out closed is replaced once.
        let mut attempts = 0;
        let (conn, head) = loop {
            attempts += 1;
            let mut conn = match self.checkout().await {
                Ok(conn) => conn,
                Err(e) => {
                    self.forget();
                    return Err(Failed::intact(e, preview.restore(rest)));
                }
            };
            let mut out = request.clone();
            if previewing {
                if !preview.bytes.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", preview.bytes.len()).as_bytes());
                    out.extend_from_slice(&preview.bytes);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(wire::last_chunk(preview.ieof));
            }
            if !previewing && has_body {
                // The whole body follows (streamed below); no answer comes before it ends.
                if let Err(e) =
                    tokio::time::timeout(self.timeout, conn.write.write_all(&out)).await.unwrap_or_else(|_| {
                        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "writing to the scanner"))
                    })
                {
                    if conn.reused && attempts == 1 {
                        continue;
                    }
                    self.forget();
                    return Err(Failed::intact(self.io(e), rest));
                }
                break (conn, None);
            }
            let sent = async {
                conn.write.write_all(&out).await?;
                wire::read_head(&mut conn.read).await
            };
            match tokio::time::timeout(self.timeout, sent).await {
                Ok(Ok(Some(head))) => break (conn, Some(head)),
                Ok(Ok(None)) | Ok(Err(_)) if conn.reused && attempts == 1 => continue,
                Ok(Ok(None)) => {
                    self.forget();
                    let e = self.protocol("closed the connection without answering");
                    return Err(Failed::intact(e, preview.restore(rest)));
                }
                Ok(Err(e)) => {
                    self.forget();
                    return Err(Failed::intact(self.io(e), preview.restore(rest)));
                }
                Err(_) => {
                    self.forget();
                    return Err(Failed::intact(self.timed_out("answer to the preview"), preview.restore(rest)));
                }
            }
        };

        let Conn { mut read, write, reused } = conn;
        let head = match head {
            // An answer to the preview (or to a message without a body).
            Some(head) if head.status == 100 && previewing && !preview.ieof => None,
            Some(head) if head.status == 204 => {
                if !head.closes() {
                    self.checkin(Conn { read, write, reused });
                }
                facts.verdict = "clean";
                facts.elapsed = started.elapsed();
                return Ok((Scanned::Unmodified { body: preview.restore(rest) }, facts));
            }
            Some(head) if head.status == 200 => Some(head),
            Some(head) => {
                let e =
                    IcapError::Status { url: self.url.url.clone(), status: head.status, reason: head.reason.clone() };
                if head.status >= 500 {
                    self.forget();
                }
                return Err(Failed::intact(e, preview.restore(rest)));
            }
            None => None,
        };

        // The rest of the body goes to the scanner while its answer is read.
        let (head, write) = match head {
            // Answered after the preview alone: the rest of the body is not sent on.
            Some(head) => (head, Writer::Done(Ok((write, None)))),
            None => {
                let kept = retain.then(|| BytesMut::from(&preview.bytes[..]));
                let task = tokio::spawn(send_rest(
                    write,
                    preview.leftover.take(),
                    rest.take(),
                    kept,
                    buffer_bytes,
                    self.timeout,
                ));
                let (read_half, outcome) = self.final_head(read, task).await;
                read = read_half;
                match outcome {
                    Ok((head, Writer::Done(Ok((write, kept))))) if head.status == 204 => {
                        facts.verdict = "clean";
                        facts.elapsed = started.elapsed();
                        let Some(kept) = kept else {
                            return Err(Failed::lost(self.protocol("answered 204 to a body it was not told it may")));
                        };
                        if !head.closes() {
                            self.checkin(Conn { read, write, reused });
                        }
                        let body = crate::body::boxed(http_body_util::Full::new(kept));
                        return Ok((Scanned::Unmodified { body: Some(body) }, facts));
                    }
                    Ok((head, done)) if head.status == 200 => (head, done),
                    Ok((head, _)) => {
                        self.forget();
                        let status = head.status;
                        return Err(Failed::lost(IcapError::Status {
                            url: self.url.url.clone(),
                            status,
                            reason: head.reason,
                        }));
                    }
                    Err(e) => {
                        self.forget();
                        return Err(Failed::lost(e));
                    }
                }
            }
        };
        drop(rest);

        // A modified message: its heads, then its body streamed from the connection.
        if let Some(istag) = head.get("istag") {
            facts.istag = Some(istag.trim_matches('"').to_string());
        }
        facts.threat = threat(&head);
        facts.verdict =
            if facts.threat.is_some() || head.get("x-violations-found").is_some() { "blocked" } else { "modified" };
        let sections = match head.get("encapsulated").map(Encapsulated::parse) {
            Some(Ok(sections)) => sections,
            Some(Err(e)) => return Err(Failed::lost(self.protocol(e.to_string()))),
            None => return Err(Failed::lost(self.protocol("200 without Encapsulated"))),
        };
        let mut heads = vec![0u8; sections.heads_end];
        match tokio::time::timeout(self.timeout, read.read_exact(&mut heads)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Failed::lost(self.io(e))),
            Err(_) => return Err(Failed::lost(self.timed_out("the modified message's heads"))),
        }
        let section = |range: Option<(usize, usize)>| range.map(|(start, end)| &heads[start..end]);
        let request = match section(sections.req_hdr).map(wire::parse_request_head).transpose() {
            Ok(request) => request,
            Err(e) => return Err(Failed::lost(self.protocol(e.to_string()))),
        };
        let response = match section(sections.res_hdr).map(wire::parse_response_head).transpose() {
            Ok(response) => response,
            Err(e) => return Err(Failed::lost(self.protocol(e.to_string()))),
        };
        if request.is_none() && response.is_none() {
            return Err(Failed::lost(self.protocol("a modified message with no HTTP head")));
        }
        let (request, response) = match self.method {
            // A response to a request wins: that request is not sent.
            Method::Reqmod if response.is_some() => (None, response),
            Method::Reqmod => (request, None),
            Method::Respmod => (None, response),
        };
        if self.method == Method::Respmod && response.is_none() {
            return Err(Failed::lost(self.protocol("RESPMOD answered without a response head")));
        }
        facts.elapsed = started.elapsed();
        let body = match sections.has_body {
            true => {
                let (tx, rx) = tokio::sync::mpsc::channel(STREAM_FRAMES);
                let closes = head.closes();
                let pump = Pump { service: self.clone(), read, reused, write, tx, closes, _permit: permit };
                tokio::spawn(pump.run());
                Some(crate::body::boxed(Streamed(rx)))
            }
            false => {
                if let (Writer::Done(Ok((write, _))), false) = (write, head.closes()) {
                    self.checkin(Conn { read, write, reused });
                }
                None
            }
        };
        let (request, response) = (request.map(Box::new), response.map(Box::new));
        Ok((Scanned::Modified { request, response, body }, facts))
    }

    /// Reads the answer that follows the whole body while `writer` sends it. The wait for it is
    /// timed from when the writer is done (a large body takes as long as it takes to send). A
    /// scanner may answer before the whole body: the writer is then handed back still running.
    async fn final_head(
        &self,
        mut read: BufReader<OwnedReadHalf>,
        mut writer: JoinHandle<WriterResult>,
    ) -> (BufReader<OwnedReadHalf>, Result<(Head, Writer), IcapError>) {
        let mut written: Option<WriterResult> = None;
        let outcome = {
            let head = wire::read_head(&mut read);
            tokio::pin!(head);
            let mut deadline: Option<Instant> = None;
            loop {
                tokio::select! {
                    head = &mut head => break match head {
                        Ok(Some(head)) => Ok(head),
                        Ok(None) => Err(self.protocol("closed the connection without answering")),
                        Err(e) => Err(self.io(e)),
                    },
                    done = &mut writer, if written.is_none() => {
                        let done = done.unwrap_or_else(|e| Err(IcapError::Body(Box::new(e))));
                        if let Err(e) = done {
                            break Err(e);
                        }
                        written = Some(done);
                        deadline = Some(Instant::now() + self.timeout);
                    }
                    () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                        break Err(self.timed_out("answer after the body"));
                    }
                }
            }
        };
        let outcome = match (outcome, written) {
            (Ok(head), Some(done)) => Ok((head, Writer::Done(done))),
            (Ok(head), None) => Ok((head, Writer::Running(writer))),
            (Err(e), _) => {
                writer.abort();
                Err(e)
            }
        };
        (read, outcome)
    }
}

type WriterResult = Result<(OwnedWriteHalf, Option<Bytes>), IcapError>;

/// The task sending the rest of a body: running, or its outcome (the write half back, and the
/// whole body when it was kept).
enum Writer {
    Running(JoinHandle<WriterResult>),
    Done(WriterResult),
}

/// The first bytes of a body, read for the preview.
#[derive(Default)]
struct Preview {
    /// The preview's bytes (at most the preview size).
    bytes: Bytes,
    /// Bytes read past the preview (a frame that straddled its end), sent first after it.
    leftover: Option<Bytes>,
    /// Whether the body ended within the preview.
    ieof: bool,
    /// Whether a preview was read at all.
    taken: bool,
    rest: Option<Body>,
}

impl Preview {
    async fn read(mut body: Body, size: usize) -> Result<Self, BoxError> {
        let mut buf = BytesMut::new();
        let mut leftover = None;
        loop {
            if buf.len() >= size {
                break;
            }
            match body.frame().await {
                None => {
                    return Ok(Self { bytes: buf.freeze(), leftover: None, ieof: true, taken: true, rest: None });
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else { continue };
                    let room = size - buf.len();
                    if data.len() > room {
                        leftover = Some(data.split_off(room));
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
        // Full: the body may still be at its end, which says the preview holds all of it.
        let ieof = leftover.is_none() && http_body::Body::is_end_stream(&body);
        let rest = (!ieof).then_some(body);
        Ok(Self { bytes: buf.freeze(), leftover, ieof, taken: true, rest })
    }

    /// The whole body again: the preview's bytes, then what was read past them, then the rest.
    fn restore(&mut self, rest: Option<Body>) -> Option<Body> {
        if !self.taken {
            return rest;
        }
        let head: Vec<Bytes> = [Some(std::mem::take(&mut self.bytes)), self.leftover.take()]
            .into_iter()
            .flatten()
            .filter(|b| !b.is_empty())
            .collect();
        Some(crate::body::boxed(Prefixed { head: head.into_iter().collect(), rest }))
    }
}

/// Bytes already read, then the rest of a body.
struct Prefixed {
    head: std::collections::VecDeque<Bytes>,
    rest: Option<Body>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(bytes) = self.head.pop_front() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        match self.rest.as_mut() {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.as_ref().is_none_or(http_body::Body::is_end_stream)
    }
}

/// A body streamed from the scanner's connection by a `Pump`.
struct Streamed(tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>);

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|item| item.map(|piece| piece.map(Frame::data)))
    }
}

/// Reads a modified message's chunked body into a bounded channel; at its end, the connection
/// goes back to the pool if the request's body was sent whole and nothing went wrong.
struct Pump {
    service: Arc<Service>,
    read: BufReader<OwnedReadHalf>,
    reused: bool,
    write: Writer,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
    closes: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Pump {
    async fn run(mut self) {
        let timeout = self.service.timeout;
        let mut chunks = Chunks::default();
        loop {
            let piece = match tokio::time::timeout(timeout, chunks.next(&mut self.read)).await {
                Ok(Ok(piece)) => piece,
                Ok(Err(e)) => {
                    let e = self.service.io(e);
                    tracing::warn!(error = %e, "ICAP answer broke off while streamed");
                    let _ = self.tx.send(Err(Box::new(e))).await;
                    return self.service.forget();
                }
                Err(_) => {
                    let e = self.service.timed_out("the modified body");
                    tracing::warn!(error = %e, "ICAP answer stalled while streamed");
                    let _ = self.tx.send(Err(Box::new(e))).await;
                    return self.service.forget();
                }
            };
            let Some(piece) = piece else { break };
            if self.tx.send(Ok(piece)).await.is_err() {
                // The client is gone: the connection is mid-message, not reusable.
                return;
            }
        }
        drop(self.tx);
        let write = match self.write {
            Writer::Done(done) => done,
            Writer::Running(task) => match tokio::time::timeout(timeout, task).await {
                Ok(Ok(done)) => done,
                _ => return,
            },
        };
        if let (Ok((write, _)), false) = (write, self.closes) {
            self.service.checkin(Conn { read: self.read, write, reused: self.reused });
        }
    }
}

/// Sends what was read past the preview, then the rest of the body, then the last chunk;
/// keeps a copy when `kept` is given and the body stays within `buffer_bytes`.
async fn send_rest(
    mut write: OwnedWriteHalf,
    leftover: Option<Bytes>,
    rest: Option<Body>,
    mut kept: Option<BytesMut>,
    buffer_bytes: usize,
    timeout: Duration,
) -> WriterResult {
    let url = String::new();
    let io = |source: std::io::Error| IcapError::Io { url: url.clone(), source };
    let send = async |write: &mut OwnedWriteHalf, data: &[u8]| -> Result<(), IcapError> {
        match tokio::time::timeout(timeout, wire::write_chunk(write, data)).await {
            Ok(result) => result.map_err(io),
            Err(_) => Err(io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the scanner stopped reading"))),
        }
    };
    let keep = |data: &[u8], kept: &mut Option<BytesMut>| {
        if let Some(buf) = kept {
            match buf.len() + data.len() <= buffer_bytes {
                true => buf.extend_from_slice(data),
                false => *kept = None,
            }
        }
    };
    if let Some(data) = leftover {
        keep(&data, &mut kept);
        send(&mut write, &data).await?;
    }
    if let Some(mut body) = rest {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(IcapError::Body)?;
            if let Ok(data) = frame.into_data() {
                keep(&data, &mut kept);
                send(&mut write, &data).await?;
            }
        }
    }
    match tokio::time::timeout(timeout, write.write_all(wire::last_chunk(false))).await {
        Ok(Ok(())) => Ok((write, kept.map(BytesMut::freeze))),
        Ok(Err(e)) => Err(io(e)),
        Err(_) => Err(io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the scanner stopped reading"))),
    }
}

/// What the scanner found, from `X-Infection-Found` (`…; Threat=NAME;`) or `X-Virus-ID`.
fn threat(head: &Head) -> Option<String> {
    if let Some(found) = head.get("x-infection-found") {
        let named = found.split(';').find_map(|part| part.trim().strip_prefix("Threat=")).map(str::trim);
        return Some(named.unwrap_or(found).to_string());
    }
    head.get("x-virus-id").map(str::to_string)
}
