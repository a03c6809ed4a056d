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
//!
//! tollgate's own fetches (CRLs, OCSP, host lists) go the same way (`net::Via`).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use http::HeaderValue;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Proxy, ProxyError, Side, Target};
use crate::config::{ConfigError, Destinations, ParentUrl, SecretSource, UpstreamConfig};
use crate::net::{Via, ViaError};

/// A spare tunnel older than this is not used (the parent may have given up on it).
const SPARE_MAX_AGE: Duration = Duration::from_secs(5);

/// Spare tunnels kept in all.
const SPARES_MAX: usize = 256;

/// The parent proxy and what goes around it.
pub struct Parent {
    url: ParentUrl,
    /// Where it is, and the `Proxy-Authorization` for every request to it (marked sensitive:
    /// never logged).
    via: Via,
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
        let via = Via { host: url.host.clone(), port: url.port, authorization };
        Ok(Some(Self { url, via, direct: upstream.no_parent.clone(), spares: Mutex::default() }))
    }

    /// Whether a connection to `target` goes through the parent.
    pub fn routes(&self, target: &Target) -> bool {
        !self.direct.contains(&target.host, target.addr.map(|a| a.ip()))
    }

    /// The parent to fetch from `host` through (tollgate's own fetches), unless `no_parent`
    /// lists it.
    pub fn via_for(&self, host: &str) -> Option<&Via> {
        (!self.direct.contains(host, None)).then_some(&self.via)
    }

    /// The parent and what goes around it, for fetches made outside the data plane (host lists).
    pub fn egress(&self) -> (Via, Destinations) {
        (self.via.clone(), self.direct.clone())
    }

    /// `Proxy-Authorization` for the parent, if it takes credentials.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.via.authorization.as_ref()
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
        let opened = tokio::time::timeout_at(deadline, self.via.tunnel(&mut stream, &target.to_string()))
            .await
            .map_err(|_| ProxyError::Timeout { phase: "parent proxy CONNECT", secs, side: Side::Upstream })?;
        match opened {
            Ok(()) => Ok(stream),
            Err(ViaError::Refused { status, reason }) => Err(self.refused(target, status, reason)),
            Err(ViaError::Io(e)) => Err(self.refused(target, 0, e.to_string())),
        }
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
}
