//! Per-client call rate limit: one token bucket per key — an authenticated client id, or the
//! peer address for calls that carry no valid identity (enrolment, failed authentication) —
//! refilled at `calls_per_minute / 60` tokens a second up to `burst`. A call takes one token;
//! without one it is refused (`ResourceExhausted` at the gRPC edge, counted as
//! `rate_limited`).
//!
//! The table is bounded by `max_tracked` keys. When it is full, buckets that have refilled
//! completely are dropped (a full bucket is the same as a fresh one, so nothing is forgiven);
//! the sweep runs at most once a second. If every tracked key is still active, new keys share
//! one overflow bucket: a flood of new identities neither grows memory nor resets the buckets
//! of the clients already tracked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[rate_limit]` in the coordinator config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained calls (Enroll, Subscribe, FetchModel, UploadUpdate) one client — or one peer
    /// address without a valid identity — may make per minute (0 = no limit).
    pub calls_per_minute: u32,
    /// Calls allowed at once after a quiet spell (the bucket's size).
    pub burst: u32,
    /// Most keys tracked at once (bounds the table's memory).
    pub max_tracked: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            calls_per_minute: 120,
            burst: 60,
            max_tracked: 100_000,
        }
    }
}

impl RateLimitConfig {
    /// Checks the values; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.calls_per_minute > 0 && self.burst == 0 {
            return Err("rate_limit.burst must be >= 1 when calls_per_minute > 0".into());
        }
        if self.max_tracked == 0 || self.max_tracked > 10_000_000 {
            return Err("rate_limit.max_tracked must be in 1..=10000000".into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Adds what accrued since the last call, up to `burst`.
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one accrues.
    fn take(&mut self, rate: f64) -> Result<(), Duration> {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<String, Bucket>,
    overflow: Option<Bucket>,
    last_sweep: Option<Instant>,
}

/// The limiter: shared by every call of one server.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_tracked: usize,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// A limiter for `cfg` (`calls_per_minute = 0` allows everything).
    pub fn new(cfg: &RateLimitConfig) -> Self {
        RateLimiter {
            rate: f64::from(cfg.calls_per_minute) / 60.0,
            burst: f64::from(cfg.burst.max(1)),
            max_tracked: cfg.max_tracked.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: None,
                last_sweep: None,
            }),
        }
    }

    /// Takes one call's token for `key`; `Err(wait)` when over the limit.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`RateLimiter::check`] at time `now` (monotonic; for tests).
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate, self.burst);
        let mut t = self.table.lock().expect("rate limit table");
        if let Some(b) = t.buckets.get_mut(key) {
            b.refill(now, rate, burst);
            return b.take(rate);
        }
        if t.buckets.len() >= self.max_tracked {
            let due = t
                .last_sweep
                .is_none_or(|l| now.saturating_duration_since(l) >= Duration::from_secs(1));
            if due {
                t.last_sweep = Some(now);
                t.buckets.retain(|_, b| {
                    let dt = now.saturating_duration_since(b.at).as_secs_f64();
                    b.tokens + dt * rate < burst
                });
            }
        }
        if t.buckets.len() >= self.max_tracked {
            let b = t.overflow.get_or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            b.refill(now, rate, burst);
            return b.take(rate);
        }
        let mut b = Bucket {
            tokens: burst,
            at: now,
        };
        let r = b.take(rate);
        t.buckets.insert(key.to_string(), b);
        r
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().expect("rate limit table").buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_minute: u32, burst: u32, max: usize) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            calls_per_minute: per_minute,
            burst,
            max_tracked: max,
        })
    }

    #[test]
    fn a_burst_then_the_sustained_rate_per_key() {
        let l = limiter(60, 3, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at("a", t0).unwrap();
        }
        let wait = l.check_at("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // Another key has its own bucket.
        l.check_at("b", t0).unwrap();
        // One call a second accrues (60 a minute); never more than the burst.
        let t1 = t0 + Duration::from_millis(1000);
        l.check_at("a", t1).unwrap();
        assert!(l.check_at("a", t1).is_err());
        let later = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.check_at("a", later).unwrap();
        }
        assert!(l.check_at("a", later).is_err());
    }

    #[test]
    fn zero_means_no_limit() {
        let l = limiter(0, 1, 1);
        let t0 = Instant::now();
        for i in 0..1000 {
            l.check_at(&format!("k{i}"), t0).unwrap();
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_new_keys_cannot_reset_active_ones() {
        let l = limiter(60, 2, 3);
        let t0 = Instant::now();
        for k in ["a", "b", "c"] {
            l.check_at(k, t0).unwrap();
            l.check_at(k, t0).unwrap();
            assert!(l.check_at(k, t0).is_err());
        }
        // Full of active keys: newcomers share one overflow bucket (burst 2).
        l.check_at("x", t0).unwrap();
        l.check_at("y", t0).unwrap();
        assert!(l.check_at("z", t0).is_err());
        assert_eq!(l.tracked(), 3);
        // The tracked keys are still limited: nothing was evicted to make room.
        assert!(l.check_at("a", t0).is_err());
        // Once their buckets have refilled they are dropped, and new keys get their own.
        let t1 = t0 + Duration::from_secs(10);
        l.check_at("n", t1).unwrap();
        assert_eq!(l.tracked(), 1);
        for i in 0..100 {
            let _ = l.check_at(&format!("flood{i}"), t1);
        }
        assert!(l.tracked() <= 3);
    }

    #[test]
    fn config_is_checked() {
        RateLimitConfig::default().validate().unwrap();
        let bad = RateLimitConfig {
            burst: 0,
            ..RateLimitConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("rate_limit.burst"));
        let bad = RateLimitConfig {
            max_tracked: 0,
            ..RateLimitConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("rate_limit.max_tracked"));
    }
}
