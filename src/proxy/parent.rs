//! Egress through a parent proxy (`[upstream] parent`): every upstream connection tollgate
//! makes for a client goes through it, a CONNECT tunnel for TLS (intercepted or passed
//! through) and an absolute-form request for plain HTTP, with Basic credentials when
//! configured. Intercepted TLS is validated end to end through the tunnel, exactly as when
//! direct. Destinations in `no_parent` go direct.
//!
//! Names routed through the parent are resolved by the parent, not here: `[resolve]` and the
//! name checks of `[policy] deny_destinations` apply to direct connections and to address
//! literals only.
//!
//! An explicit client's CONNECT is answered only once the parent has opened the tunnel, so a
//! refusal (407, 403, 502) reaches the client as an HTTP error on its CONNECT. That tunnel is
//! kept briefly as a spare for the connection the pipeline opens next to the same target.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use http::HeaderValue;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Proxy, ProxyError, Side, Target};
use crate::config::{ConfigError, Destinations, ParentUrl, SecretSource, UpstreamConfig};

/// A spare tunnel older than this is not used (the parent may have given up on it).
const SPARE_MAX_AGE: Duration = Duration::from_secs(5);

/// Spare tunnels kept in all.
const SPARES_MAX: usize = 256;

/// The parent's response head may be no longer than this.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The parent proxy and what goes around it.
pub struct Parent {
    url: ParentUrl,
    /// `Proxy-Authorization` for every request to the parent (marked sensitive: never logged).
    authorization: Option<HeaderValue>,
    direct: Destinations,
    spares: Mutex<HashMap<Target, Vec<(TcpStream, Instant)>>>,
}

impl Parent {
    /// The parent of `[upstream]`, its credentials read from `parent_auth_file`; `None` when
    /// none is configured.
    pub fn from_config(upstream: &UpstreamConfig, config_path: &std::path::Path) -> Result<Option<Self>, ConfigError> {
        let Some(url) = upstream.parent.clone() else { return Ok(None) };
        let authorization = match &upstream.parent_auth_file {
            Some(path) => Some(
                basic(&crate::vault::load(&SecretSource::File(path.clone()), "parent proxy credentials").map_err(
                    |e| ConfigError::Invalid {
                        path: config_path.to_path_buf(),
                        field: "upstream.parent_auth_file".into(),
                        reason: e.to_string(),
                    },
                )?)
                .map_err(|reason| ConfigError::Invalid {
                    path: config_path.to_path_buf(),
                    field: "upstream.parent_auth_file".into(),
                    reason: format!("{}: {reason}", path.display()),
                })?,
            ),
            None => None,
        };
        Ok(Some(Self { url, authorization, direct: upstream.no_parent.clone(), spares: Mutex::default() }))
    }

    /// Whether a connection to `target` goes through the parent.
    pub fn routes(&self, target: &Target) -> bool {
        !self.direct.contains(&target.host, target.addr.map(|a| a.ip()))
    }

    /// The parent's address, as written in the configuration.
    pub fn url(&self) -> &ParentUrl {
        &self.url
    }

    /// `Proxy-Authorization` for the parent, if it takes credentials.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// A TCP connection to the parent itself (plain HTTP requests are sent on it in absolute
    /// form).
    pub async fn connect(&self, proxy: &Proxy) -> Result<TcpStream, ProxyError> {
        let parent = Target { host: self.url.host.clone(), port: self.url.port, addr: None };
        proxy.dial_origin(&parent).await.map_err(|e| match e {
            ProxyError::Connect { source, .. } => {
                ProxyError::Connect { target: format!("parent proxy {}", self.url), source }
            }
            e => e,
        })
    }

    /// A tunnel to `target` through the parent: a spare one if fresh, else a new CONNECT.
    pub async fn tunnel(&self, proxy: &Proxy, target: &Target) -> Result<TcpStream, ProxyError> {
        if let Some(spare) = self.take_spare(target) {
            return Ok(spare);
        }
        self.open(proxy, target).await
    }

    /// Opens a tunnel now and keeps it as a spare for the next `tunnel` to `target`: an explicit
    /// client's CONNECT is answered after this succeeds, so the parent's refusal reaches it.
    pub async fn prepare(&self, proxy: &Proxy, target: &Target) -> Result<(), ProxyError> {
        let stream = self.open(proxy, target).await?;
        let now = Instant::now();
        let mut spares = self.spares.lock();
        spares.retain(|_, list| {
            list.retain(|(_, at)| now.duration_since(*at) < SPARE_MAX_AGE);
            !list.is_empty()
        });
        if spares.values().map(Vec::len).sum::<usize>() < SPARES_MAX {
            spares.entry(target.clone()).or_default().push((stream, now));
        }
        Ok(())
    }

    fn take_spare(&self, target: &Target) -> Option<TcpStream> {
        let mut spares = self.spares.lock();
        let list = spares.get_mut(target)?;
        let found = std::iter::from_fn(|| list.pop()).find(|(_, at)| at.elapsed() < SPARE_MAX_AGE);
        if list.is_empty() {
            spares.remove(target);
        }
        found.map(|(stream, _)| stream)
    }

    /// CONNECT through the parent, within the connect timeout.
    async fn open(&self, proxy: &Proxy, target: &Target) -> Result<TcpStream, ProxyError> {
        let secs = proxy.connect_timeout.as_secs();
        let deadline = Instant::now() + proxy.connect_timeout;
        let mut stream = self.connect(proxy).await?;
        let exchange = async {
            stream.write_all(&self.connect_request(target)).await?;
            read_head(&mut stream).await
        };
        let head = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| ProxyError::Timeout { phase: "parent proxy CONNECT", secs, side: Side::Upstream })?
            .map_err(|e| self.refused(target, 0, e.to_string()))?;
        match head {
            (status, _) if (200..300).contains(&status) => Ok(stream),
            (status, reason) => Err(self.refused(target, status, reason)),
        }
    }

    fn connect_request(&self, target: &Target) -> Vec<u8> {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(authorization) = &self.authorization {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(authorization.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request
    }

    /// The parent refused `target` (status 0: it answered something that is not HTTP).
    pub fn refused(&self, target: &Target, status: u16, reason: String) -> ProxyError {
        ProxyError::ParentRefused { parent: self.url.to_string(), target: target.to_string(), status, reason }
    }
}

/// `Basic base64(user:password)` from a `user:password` secret.
fn basic(secret: &SecretString) -> Result<HeaderValue, &'static str> {
    let credentials = secret.expose_secret();
    if !credentials.contains(':') || credentials.contains(['\n', '\r']) {
        return Err("expected one line user:password");
    }
    let token = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(credentials));
    let mut value =
        HeaderValue::try_from(format!("Basic {}", token.as_str())).map_err(|_| "not a valid header value")?;
    value.set_sensitive(true);
    Ok(value)
}

/// Reads the parent's response head, and not one byte past it (what follows belongs to the
/// tunnel): bytes are peeked, and only those of the head consumed. The status and reason.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut head = Vec::with_capacity(256);
    let mut peeked = [0u8; 2048];
    loop {
        let n = stream.peek(&mut peeked).await?;
        if n == 0 {
            return Err(invalid("the parent closed the connection without answering"));
        }
        // The head ends at the first blank line: consume up to it, or all that was peeked.
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&peeked[..n]);
        let end = head[searched_from..].windows(4).position(|w| w == b"\r\n\r\n").map(|i| searched_from + i + 4);
        let take = match end {
            Some(end) => n - (head.len() - end),
            None => n,
        };
        head.truncate(head.len() - (n - take));
        stream.read_exact(&mut peeked[..take]).await?;
        if end.is_some() {
            break;
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(invalid("the parent's response head is too long"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {
            let status = response.code.ok_or_else(|| invalid("no status"))?;
            Ok((status, response.reason.unwrap_or_default().to_string()))
        }
        _ => Err(invalid("the parent answered something that is not HTTP")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_become_one_sensitive_basic_header() {
        let value = basic(&SecretString::from("alice:s3cret:with:colons")).unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value, "Basic YWxpY2U6czNjcmV0OndpdGg6Y29sb25z");
        assert!(basic(&SecretString::from("no-colon")).is_err());
    }

    #[tokio::test]
    async fn the_head_is_read_without_the_tunnel_bytes_after_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // Split across writes, with the first tunnel bytes in the same segment as the end.
            s.write_all(b"HTTP/1.1 200 Connection established\r\nVia: x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"\r\n\r\nBANNER").await.unwrap();
            s
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (status, reason) = read_head(&mut client).await.unwrap();
        assert_eq!((status, reason.as_str()), (200, "Connection established"));
        let mut rest = [0u8; 6];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"BANNER");
        drop(server.await);
    }
}
