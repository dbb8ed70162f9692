//! Who is calling, and how much they may still do: the keyring built from `[auth]`, per-key token
//! buckets (requests and tokens per minute), and the [`Caller`] every keyed handler receives. No HTTP
//! types here; `http::guard::authenticate` is the middleware that uses it.
//!
//! - Keys are held only as SHA-256 digests. A presented key is hashed and compared with every
//!   configured digest in constant time, without stopping at a match, so timing tells nothing
//!   about which key (or how much of one) matched.
//! - Requests per minute: a bucket of `rpm` requests, refilled continuously; each request takes one.
//! - Tokens per minute: a bucket of `tpm` tokens. A request is admitted while the bucket is above
//!   zero, and charged the tokens it really read and generated as they are known (a stream is
//!   charged token by token), so one large request can take the bucket below zero (at most one
//!   minute's worth), and the key then waits until it has refilled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_engine::Priority;
use subtle::ConstantTimeEq;

use crate::config::{ApiKey, AuthConfig, KeyClass, KeyDigest, RateLimits};

/// A continuously refilled token bucket.
struct Bucket {
    capacity: f64,
    per_second: f64,
    /// Level (may be negative for the tokens bucket) and when it was last brought up to date.
    state: Mutex<(f64, Instant)>,
}

/// One limit's state after a request, for OpenAI's `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Bucket {
    fn per_minute(limit: u64) -> Self {
        let capacity = limit as f64;
        Self { capacity, per_second: capacity / 60.0, state: Mutex::new((capacity, Instant::now())) }
    }

    /// The level now, refilled for the time since it was last read.
    fn refill(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.per_second).min(self.capacity);
        state.1 = now;
    }

    fn status(&self, level: f64) -> LimitStatus {
        LimitStatus {
            limit: self.capacity as u64,
            remaining: level.max(0.0).floor() as u64,
            reset: Duration::from_secs_f64(((self.capacity - level) / self.per_second).max(0.0)),
        }
    }

    /// Until the level reaches `level`.
    fn wait_for(&self, current: f64, level: f64) -> Duration {
        Duration::from_secs_f64(((level - current) / self.per_second).max(0.0))
    }

    /// Takes `n` if the bucket holds them; else says how long until it does.
    fn take(&self, n: f64, now: Instant) -> Result<LimitStatus, (LimitStatus, Duration)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        if state.0 >= n {
            state.0 -= n;
            Ok(self.status(state.0))
        } else {
            Err((self.status(state.0), self.wait_for(state.0, n)))
        }
    }

    /// Whether the bucket is above zero; else how long until it is.
    fn check_positive(&self, now: Instant) -> Result<LimitStatus, (LimitStatus, Duration)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        if state.0 > 0.0 {
            Ok(self.status(state.0))
        } else {
            // Back above zero, by a whole token.
            Err((self.status(state.0), self.wait_for(state.0, 1.0)))
        }
    }

    /// Takes `n` unconditionally, to at most one bucket's worth below zero.
    fn charge(&self, n: f64, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        state.0 = (state.0 - n).max(-self.capacity);
    }
}

/// Which per-minute limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// The limits' states after an admitted (or refused) request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Quota {
    pub requests: Option<LimitStatus>,
    pub tokens: Option<LimitStatus>,
}

/// A request refused by a rate limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limited {
    pub kind: LimitKind,
    pub limit: u64,
    pub retry_after: Duration,
    pub quota: Quota,
}

/// One configured key and its buckets.
pub struct Account {
    pub name: Arc<str>,
    pub class: KeyClass,
    /// May load, unload and reload models.
    pub admin: bool,
    digest: KeyDigest,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    charged: metrics::Counter,
    limits: RateLimits,
}

impl Account {
    fn same_as(&self, key: &ApiKey) -> bool {
        self.name == key.name
            && self.class == key.class
            && self.admin == key.admin
            && self.limits == key.limits
    }

    /// Admits one request: takes a request from its bucket, and checks the tokens bucket is above
    /// zero. A request refused by the tokens limit takes no request.
    pub fn admit(&self) -> Result<Quota, Limited> {
        let now = Instant::now();
        let tokens = match &self.tokens {
            None => None,
            Some(bucket) => Some(bucket.check_positive(now).map_err(|(status, wait)| Limited {
                kind: LimitKind::Tokens,
                limit: status.limit,
                retry_after: wait,
                quota: Quota { requests: self.requests.as_ref().map(|b| b.peek(now)), tokens: Some(status) },
            })?),
        };
        let requests = match &self.requests {
            None => None,
            Some(bucket) => Some(bucket.take(1.0, now).map_err(|(status, wait)| Limited {
                kind: LimitKind::Requests,
                limit: status.limit,
                retry_after: wait,
                quota: Quota { requests: Some(status), tokens },
            })?),
        };
        Ok(Quota { requests, tokens })
    }

    /// Charges tokens the request read or generated.
    pub fn charge(&self, tokens: usize) {
        if tokens == 0 {
            return;
        }
        self.charged.increment(tokens as u64);
        if let Some(bucket) = &self.tokens {
            bucket.charge(tokens as f64, Instant::now());
        }
    }

    pub fn priority(&self) -> Priority {
        match self.class {
            KeyClass::Premium => Priority::High,
            KeyClass::Standard => Priority::Normal,
        }
    }
}

impl Bucket {
    fn peek(&self, now: Instant) -> LimitStatus {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        self.status(state.0)
    }
}

/// Every configured key. A config reload replaces the keys; a key that stays keeps its buckets.
pub struct Keyring {
    accounts: std::sync::RwLock<Vec<Arc<Account>>>,
    pub metrics_require_key: bool,
}

impl Keyring {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            accounts: std::sync::RwLock::new(Self::accounts(config, &[])),
            metrics_require_key: config.metrics_require_key,
        }
    }

    /// Accounts for `config`'s keys, reusing those in `kept` whose key, name, class and limits are
    /// unchanged (so a reload does not refill anyone's buckets).
    fn accounts(config: &AuthConfig, kept: &[Arc<Account>]) -> Vec<Arc<Account>> {
        config
            .keys
            .iter()
            .map(|key| {
                if let Some(same) = kept.iter().find(|a| a.digest == key.digest && a.same_as(key)) {
                    return Arc::clone(same);
                }
                Arc::new(Account {
                    name: Arc::clone(&key.name),
                    class: key.class,
                    admin: key.admin,
                    digest: key.digest,
                    requests: key.limits.requests_per_minute.map(Bucket::per_minute),
                    tokens: key.limits.tokens_per_minute.map(Bucket::per_minute),
                    charged: metrics::counter!("hearth_key_tokens_total", "key" => key.name.to_string()),
                    limits: key.limits,
                })
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Account>>> {
        self.accounts.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the keys (a config reload). Returns how many keys there are now.
    pub fn replace(&self, config: &AuthConfig) -> usize {
        let mut accounts = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        *accounts = Self::accounts(config, &accounts);
        accounts.len()
    }

    /// Whether any key is configured (otherwise the server is open).
    pub fn enabled(&self) -> bool {
        !self.read().is_empty()
    }

    /// The account whose key was presented. Compares with every key, in constant time.
    pub fn find(&self, presented: &str) -> Option<Arc<Account>> {
        let digest = KeyDigest::of(presented);
        let mut found = None;
        for account in self.read().iter() {
            let equal: bool = account.digest.0.ct_eq(&digest.0).into();
            if equal {
                found = Some(Arc::clone(account));
            }
        }
        found
    }
}

/// Who sent a request: a key's account, or anyone (a server without keys). Keyed handlers take it
/// from the request's extensions (the auth middleware puts it there).
#[derive(Clone, Default)]
pub struct Caller(Option<Arc<Account>>);

impl Caller {
    pub fn anonymous() -> Self {
        Self(None)
    }

    pub fn of(account: Arc<Account>) -> Self {
        Self(Some(account))
    }

    pub fn priority(&self) -> Priority {
        self.0.as_ref().map_or(Priority::Normal, |a| a.priority())
    }

    /// Charges tokens to the caller's tokens-per-minute limit (nothing for anonymous callers).
    pub fn charge(&self, tokens: usize) {
        if let Some(account) = &self.0 {
            account.charge(tokens);
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|a| &*a.name)
    }

    /// Whether the caller came with an admin key.
    pub fn is_admin(&self) -> bool {
        self.0.as_ref().is_some_and(|a| a.admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(limits: RateLimits) -> Keyring {
        let key = |name: &str, key: &str, class| ApiKey {
            name: name.into(),
            class,
            digest: KeyDigest::of(key),
            limits,
            admin: false,
        };
        Keyring::new(&AuthConfig {
            keys: vec![
                key("a", "key-a-0123456789abcdef", KeyClass::Premium),
                key("b", "key-b-0123456789abcdef", KeyClass::Standard),
            ],
            keys_file: None,
            metrics_require_key: false,
        })
    }

    #[test]
    fn keys_are_found_by_their_digest() {
        let ring = keyring(RateLimits::default());
        assert_eq!(ring.find("key-a-0123456789abcdef").map(|a| a.priority()), Some(Priority::High));
        assert_eq!(ring.find("key-b-0123456789abcdef").map(|a| a.name.to_string()).as_deref(), Some("b"));
        assert!(ring.find("key-a-0123456789abcde").is_none());
        assert!(ring.find("").is_none());
    }

    #[test]
    fn requests_per_minute_refill_continuously() {
        let bucket = Bucket::per_minute(2);
        let t0 = Instant::now();
        assert_eq!(bucket.take(1.0, t0).unwrap().remaining, 1);
        let status = bucket.take(1.0, t0).unwrap();
        assert_eq!((status.limit, status.remaining), (2, 0));
        assert_eq!(status.reset, Duration::from_secs(60), "two requests at 2/min refill in a minute");
        let (_, wait) = bucket.take(1.0, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
        assert!(bucket.take(1.0, t0 + Duration::from_secs(29)).is_err());
        assert!(bucket.take(1.0, t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn tokens_are_charged_after_the_fact_into_bounded_debt() {
        let bucket = Bucket::per_minute(600); // 10 per second
        let t0 = Instant::now();
        assert!(bucket.check_positive(t0).is_ok());
        bucket.charge(5_000.0, t0);
        let (status, wait) = bucket.check_positive(t0).unwrap_err();
        assert_eq!(status.remaining, 0);
        // At most one minute of debt: -600, back above zero after 60.1 s.
        assert_eq!(wait, Duration::from_secs_f64(60.1));
        assert!(bucket.check_positive(t0 + Duration::from_secs(60)).is_err());
        assert!(bucket.check_positive(t0 + Duration::from_millis(60_200)).is_ok());
    }

    #[test]
    fn a_request_refused_for_tokens_takes_no_request() {
        let ring = keyring(RateLimits { requests_per_minute: Some(10), tokens_per_minute: Some(100) });
        let account = ring.find("key-a-0123456789abcdef").unwrap();
        let quota = account.admit().unwrap();
        assert_eq!(quota.requests.map(|s| s.remaining), Some(9));
        assert_eq!(quota.tokens.map(|s| (s.limit, s.remaining)), Some((100, 100)));
        account.charge(150);
        let refused = account.admit().unwrap_err();
        assert_eq!((refused.kind, refused.limit), (LimitKind::Tokens, 100));
        assert!(refused.retry_after > Duration::from_secs(30), "{:?}", refused.retry_after);
        assert_eq!(refused.quota.requests.map(|s| s.remaining), Some(9));
        // The other key's buckets are its own.
        assert!(ring.find("key-b-0123456789abcdef").unwrap().admit().is_ok());
    }
}
