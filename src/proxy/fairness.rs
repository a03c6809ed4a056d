//! Per-client fairness: one client address may hold at most `[limits] per_client_connections`
//! and cause at most `per_client_mints_per_sec` new mints (a token bucket of
//! `per_client_mint_burst`), so a client opening random subdomains cannot fill the leaf cache
//! or queue the HSM for everyone else. The address is the real client's: the PROXY protocol's
//! behind a load balancer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::LimitsConfig;

/// The per-client counts of one proxy state.
#[derive(Debug)]
pub struct Fairness {
    max_connections: usize,
    connections: Mutex<HashMap<IpAddr, usize>>,
    mint_rate: f64,
    mint_burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_client: HashMap<IpAddr, Bucket>,
    /// The size after the last sweep: the next one comes when the map has doubled.
    swept_at: usize,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A client's place among its connections; freed on drop.
#[derive(Debug)]
pub struct Slot {
    fairness: Arc<Fairness>,
    client: IpAddr,
}

impl Fairness {
    pub fn new(limits: &LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            max_connections: limits.per_client_connections,
            connections: Mutex::default(),
            mint_rate: f64::from(limits.per_client_mints_per_sec),
            mint_burst: f64::from(limits.per_client_mint_burst.max(1)),
            buckets: Mutex::default(),
        })
    }

    /// A connection slot for `client`, or `None` when it holds the most it may.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let client = client.to_canonical();
        let mut connections = self.connections.lock();
        let held = connections.entry(client).or_insert(0);
        if *held >= self.max_connections {
            return None;
        }
        *held += 1;
        Some(Slot { fairness: self.clone(), client })
    }

    /// Whether `client` may cause one more mint now (and counts it).
    pub fn may_mint(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let (rate, burst) = (self.mint_rate, self.mint_burst);
        let refill = |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        let mut buckets = self.buckets.lock();
        // A full bucket is the same as none: sweep those out whenever the map has doubled.
        if buckets.by_client.len() > (2 * buckets.swept_at).max(1024) {
            buckets.by_client.retain(|_, b| refill(b) < burst);
            buckets.swept_at = buckets.by_client.len();
        }
        let bucket = buckets.by_client.entry(client.to_canonical()).or_insert(Bucket { tokens: burst, at: now });
        let tokens = refill(bucket);
        let allowed = tokens >= 1.0;
        *bucket = Bucket { tokens: if allowed { tokens - 1.0 } else { tokens }, at: now };
        allowed
    }

    /// The connections `client` holds now.
    #[cfg(test)]
    fn held(&self, client: IpAddr) -> usize {
        self.connections.lock().get(&client).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut connections = self.fairness.connections.lock();
        if let Some(held) = connections.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                connections.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fairness(connections: usize, rate: u32, burst: u32) -> Arc<Fairness> {
        let limits = LimitsConfig {
            per_client_connections: connections,
            per_client_mints_per_sec: rate,
            per_client_mint_burst: burst,
            ..LimitsConfig::default()
        };
        Fairness::new(&limits)
    }

    #[test]
    fn a_client_holds_at_most_its_share_of_connections() {
        let f = fairness(2, 1, 1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = f.admit(a).unwrap();
        let _second = f.admit(a).unwrap();
        assert!(f.admit(a).is_none(), "a third from the same client");
        let _other = f.admit(b).expect("another client is not affected");
        assert!(f.admit("::ffff:10.0.0.1".parse().unwrap()).is_none(), "the v4-mapped spelling is the same client");
        drop(first);
        assert_eq!(f.held(a), 1);
        assert!(f.admit(a).is_some(), "a freed slot is free again");
    }

    #[test]
    fn mints_follow_a_token_bucket_per_client() {
        let f = fairness(1, 20, 40);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let allowed = (0..100).filter(|_| f.may_mint(a)).count();
        assert!((40..=41).contains(&allowed), "the burst, and at most one refilled: {allowed}");
        assert!(f.may_mint(b), "another client has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert!(f.may_mint(a), "20 per second refill");
    }

    #[test]
    fn full_buckets_are_swept() {
        let f = fairness(1, 1_000_000, 1);
        for i in 0..5000u32 {
            f.may_mint(IpAddr::from(i.to_be_bytes()));
        }
        assert!(f.buckets.lock().by_client.len() < 5000, "refilled buckets were dropped");
    }
}
