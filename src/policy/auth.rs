//! Proxy authentication on explicit listeners: `Proxy-Authorization: Basic` checked against an
//! htpasswd file of bcrypt (`$2y$`, `$2b$`, `$2a$`) or argon2 (`$argon2id$`, `$argon2i$`,
//! `$argon2d$`) hashes, which reloads itself when it changes. A hash costs tens of milliseconds
//! to check, so it is checked off the async workers, and a user whose password checked out is
//! remembered for a few minutes (by an HMAC of the password under a key made at start, never
//! the password, and nothing a memory dump could test guesses against offline). Failed
//! attempts are counted per client address: past `MAX_FAILURES` in `FAILURE_WINDOW`, its
//! requests are refused without checking anything. Passwords are never logged or kept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

/// Failed attempts a client address may make per `FAILURE_WINDOW` before it is refused outright.
pub const MAX_FAILURES: u32 = 5;

/// How long failed attempts are remembered.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// How long a checked password is trusted without checking its hash again.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Why an htpasswd file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("users file {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("users file {file}, line {line}: {reason}")]
    Line { file: String, line: usize, reason: String },
}

/// Why a request was not authenticated (the client is told 407 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No `Proxy-Authorization: Basic`.
    Missing,
    /// Unknown user or wrong password.
    Wrong,
    /// Too many failures from this address lately.
    RateLimited,
}

impl Refused {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "no credentials",
            Self::Wrong => "wrong user or password",
            Self::RateLimited => "too many failed attempts from this address",
        }
    }
}

/// A password hash from the file.
#[derive(Clone, Debug)]
enum Hash {
    Bcrypt(String),
    Argon2(String),
}

/// The users of the htpasswd file, current.
pub struct Users {
    file: PathBuf,
    users: RwLock<Arc<HashMap<String, Hash>>>,
    seen: Mutex<Option<(SystemTime, u64)>>,
    /// (user, HMAC-SHA-256 of the password under `remember_key`) checked recently.
    verified: moka::sync::Cache<(String, [u8; 32]), ()>,
    remember_key: aws_lc_rs::hmac::Key,
    failures: moka::sync::Cache<IpAddr, u32>,
}

impl Users {
    /// Reads the file; every line must be `user:hash` with a supported hash.
    pub fn load(file: &Path) -> Result<Arc<Self>, UsersError> {
        let users = Self {
            file: file.to_path_buf(),
            users: RwLock::default(),
            seen: Mutex::default(),
            verified: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(VERIFIED_FOR).build(),
            failures: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(FAILURE_WINDOW).build(),
            remember_key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &crate::keys::random::<32>()),
        };
        users.reload(true)?;
        Ok(Arc::new(users))
    }

    /// The htpasswd file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Reads the file again when it changed (or `force`): the new users replace the old ones,
    /// and what was verified under them is forgotten. On error nothing changes.
    pub fn reload(&self, force: bool) -> Result<bool, UsersError> {
        let file = self.file.display().to_string();
        let read_err = |e: std::io::Error| UsersError::Read { file: file.clone(), reason: e.to_string() };
        let meta = std::fs::metadata(&self.file).map_err(read_err)?;
        let stamp = (meta.modified().map_err(read_err)?, meta.len());
        let mut seen = self.seen.lock();
        if !force && *seen == Some(stamp) {
            return Ok(false);
        }
        let text = Zeroizing::new(std::fs::read_to_string(&self.file).map_err(read_err)?);
        let users = parse(&text, &file)?;
        let count = users.len();
        *self.users.write() = Arc::new(users);
        self.verified.invalidate_all();
        *seen = Some(stamp);
        tracing::info!(file = %file, users = count, "proxy users loaded");
        Ok(true)
    }

    /// Checks a `Proxy-Authorization` header from `client`: the user name, or why not.
    pub async fn check(&self, client: IpAddr, header: Option<&http::HeaderValue>) -> Result<Arc<str>, Refused> {
        if self.failures.get(&client).is_some_and(|n| n >= MAX_FAILURES) {
            return Err(Refused::RateLimited);
        }
        let (user, password) = header.and_then(basic).ok_or(Refused::Missing)?;
        let tag = aws_lc_rs::hmac::sign(&self.remember_key, password.as_bytes());
        let key = (user.clone(), tag.as_ref().try_into().expect("HMAC-SHA-256 is 32 bytes"));
        if self.verified.contains_key(&key) {
            return Ok(user.into());
        }
        let (hash, dummy) = {
            let users = self.users.read();
            // An unknown user is checked against a real user's hash: the same cost, so timing
            // does not tell which names exist.
            (users.get(&user).cloned(), users.values().next().cloned())
        };
        let ok = tokio::task::spawn_blocking(move || verify(hash.as_ref(), dummy.as_ref(), &password))
            .await
            .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
            return Ok(user.into());
        }
        let failures = self.failures.get(&client).unwrap_or(0) + 1;
        self.failures.insert(client, failures);
        Err(Refused::Wrong)
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("file", &self.file).finish_non_exhaustive()
    }
}

/// `Basic base64(user:password)` → (user, password).
fn basic(header: &http::HeaderValue) -> Option<(String, Zeroizing<String>)> {
    use base64::Engine;
    let encoded = header.to_str().ok()?.strip_prefix("Basic ")?.trim();
    let decoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(encoded).ok()?);
    let text = std::str::from_utf8(&decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    (!user.is_empty()).then(|| (user.to_string(), Zeroizing::new(password.to_string())))
}

/// Whether `password` matches `hash`. With no hash (an unknown user) `dummy` is checked all
/// the same, its result thrown away.
fn verify(hash: Option<&Hash>, dummy: Option<&Hash>, password: &str) -> bool {
    let check = |hash: &Hash| match hash {
        Hash::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        Hash::Argon2(hash) => {
            use argon2::PasswordVerifier;
            argon2::Argon2::default().verify_password(password.as_bytes(), hash.as_str()).is_ok()
        }
    };
    match (hash, dummy) {
        (Some(hash), _) => check(hash),
        (None, Some(dummy)) => {
            let _ = check(dummy);
            false
        }
        (None, None) => false,
    }
}

fn parse(text: &str, file: &str) -> Result<HashMap<String, Hash>, UsersError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| UsersError::Line { file: file.into(), line: i + 1, reason: reason.into() };
        let (user, hash) = line.split_once(':').ok_or_else(|| err("expected user:hash"))?;
        let hash = match hash {
            h if h.starts_with("$2y$") || h.starts_with("$2b$") || h.starts_with("$2a$") => {
                h.parse::<bcrypt::HashParts>().map_err(|_| err("malformed bcrypt hash"))?;
                Hash::Bcrypt(h.to_string())
            }
            h if h.starts_with("$argon2") => {
                argon2::password_hash::phc::PasswordHash::new(h).map_err(|_| err("malformed argon2 hash"))?;
                Hash::Argon2(h.to_string())
            }
            _ => return Err(err("unsupported hash: use bcrypt (htpasswd -B) or argon2")),
        };
        if user.is_empty() || users.insert(user.to_string(), hash).is_some() {
            return Err(err("empty or repeated user name"));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bcrypt_and_argon2_are_accepted_with_the_line_named() {
        let bcrypt = bcrypt::hash("s3cret", 4).unwrap();
        let argon2 = {
            use argon2::PasswordHasher;
            argon2::Argon2::default().hash_password_with_salt(b"an0ther", b"sixteen byte salt").unwrap().to_string()
        };
        let users = parse(&format!("# team\nalice:{bcrypt}\ndave:{argon2}\n"), "u").unwrap();
        let alice = users.get("alice");
        assert!(verify(alice, None, "s3cret") && !verify(alice, None, "nope"));
        assert!(verify(users.get("dave"), None, "an0ther") && !verify(users.get("dave"), None, "s3cret"));
        assert!(!verify(None, alice, "s3cret"), "an unknown user with alice's password");
        let err = parse(&format!("alice:{bcrypt}\nbob:$apr1$abc$def\n"), "users.htpasswd").unwrap_err().to_string();
        assert!(err.contains("users.htpasswd") && err.contains("line 2") && err.contains("unsupported"), "{err}");
        let err = parse("carol:{SHA}abc\n", "u").unwrap_err().to_string();
        assert!(err.contains("unsupported"), "{err}");
    }

    #[tokio::test]
    async fn failures_are_limited_per_client_address() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
        let users = Users::load(&file).unwrap();
        let basic = |pair: &str| {
            use base64::Engine;
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            http::HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
        };
        let (guesser, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(users.check(guesser, None).await, Err(Refused::Missing));
        assert_eq!(users.check(guesser, Some(&basic("alice:s3cret"))).await.as_deref(), Ok("alice"));
        for _ in 0..MAX_FAILURES {
            assert_eq!(users.check(guesser, Some(&basic("alice:guess"))).await, Err(Refused::Wrong));
        }
        let right = basic("alice:s3cret");
        assert_eq!(users.check(guesser, Some(&right)).await, Err(Refused::RateLimited), "even the right password");
        assert_eq!(users.check(other, Some(&right)).await.as_deref(), Ok("alice"), "another address is not affected");
    }

    #[test]
    fn basic_credentials_decode_and_nothing_else_does() {
        let header = http::HeaderValue::from_static("Basic YWxpY2U6czNjcmV0"); // alice:s3cret
        let (user, password) = basic(&header).unwrap();
        assert_eq!((user.as_str(), password.as_str()), ("alice", "s3cret"));
        assert!(basic(&http::HeaderValue::from_static("Bearer x")).is_none());
        assert!(basic(&http::HeaderValue::from_static("Basic !!!")).is_none());
    }
}
