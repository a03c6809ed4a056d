//! The leaf cache: minted leaves keyed by (host, upstream certificate, trust verdict) — without
//! the host when the leaf mirrors the upstream's names, so one leaf serves them all.
//!
//! Concurrent misses for one key wait on a single mint (moka's `or_try_insert_with`), so a
//! flash crowd costs one HSM signature. An entry never outlives its certificate.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use time::OffsetDateTime;

use super::mint::{MintError, Minted};
use crate::telemetry::METRICS;

/// What a minted leaf depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeafKey {
    /// Lower-cased host name (or IP literal) the client asked for; `None` when the leaf does
    /// not depend on it (the upstream certificate names its hosts itself).
    pub host: Option<String>,
    /// SHA-256 of the upstream end-entity certificate.
    pub upstream: [u8; 32],
    /// Whether the upstream certificate validated (trusted CA) or not (untrust CA).
    pub trusted: bool,
}

/// The cache of minted leaves.
#[derive(Clone)]
pub struct LeafCache {
    inner: Cache<LeafKey, Arc<Minted>>,
}

impl LeafCache {
    /// A cache holding at most `capacity` leaves.
    pub fn new(capacity: u64) -> Self {
        let inner = Cache::builder().max_capacity(capacity).expire_after(UntilNotAfter).build();
        Self { inner }
    }

    /// The cached leaf for `key`, or the result of `mint` — run once however many callers
    /// miss at the same time.
    pub async fn get_or_mint<F>(&self, key: LeafKey, mint: F) -> Result<Arc<Minted>, Arc<MintError>>
    where
        F: Future<Output = Result<Arc<Minted>, MintError>>,
    {
        let entry = self.inner.entry(key).or_try_insert_with(mint).await?;
        if entry.is_fresh() {
            METRICS.cache_misses_total.inc();
        } else {
            METRICS.cache_hits_total.inc();
        }
        Ok(entry.into_value())
    }

    /// `get_or_mint`, with the mint charged to the one caller whose mint runs: `charge` is
    /// asked first, and its `false` ends that attempt (`Ok(None)` for that caller). A caller
    /// that joined an attempt another caller's `charge` refused tries again on its own, up to
    /// three times. So a flash crowd costs its clients one charge, not one per connection.
    pub async fn get_or_mint_charged<C, M, F>(
        &self,
        key: LeafKey,
        charge: C,
        mint: M,
    ) -> Result<Option<Arc<Minted>>, Arc<MintError>>
    where
        C: Fn() -> bool,
        M: Fn() -> F,
        F: Future<Output = Result<Arc<Minted>, MintError>>,
    {
        for _ in 0..3 {
            let ran = std::sync::atomic::AtomicBool::new(false);
            let attempt = self
                .get_or_mint(key.clone(), async {
                    ran.store(true, std::sync::atomic::Ordering::Relaxed);
                    if !charge() {
                        return Err(MintError::Limited);
                    }
                    mint().await
                })
                .await;
            match attempt {
                Err(e) if matches!(*e, MintError::Limited) => {
                    if ran.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(None);
                    }
                }
                other => return other.map(Some),
            }
        }
        Ok(None)
    }

    /// A cached leaf, without minting.
    pub async fn get(&self, key: &LeafKey) -> Option<Arc<Minted>> {
        self.inner.get(key).await
    }

    /// Runs pending cache maintenance (expirations); for tests.
    #[cfg(test)]
    pub(crate) async fn inner_sync(&self) {
        self.inner.run_pending_tasks().await;
    }
}

/// Expire each entry at its certificate's notAfter (a minute early, so a client never gets
/// a leaf that expires mid-handshake).
struct UntilNotAfter;

impl Expiry<LeafKey, Arc<Minted>> for UntilNotAfter {
    fn expire_after_create(&self, _key: &LeafKey, value: &Arc<Minted>, _created_at: Instant) -> Option<Duration> {
        let left = value.not_after - OffsetDateTime::now_utc() - time::Duration::minutes(1);
        Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
    }
}
