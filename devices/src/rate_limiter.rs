//! Token-bucket rate limiting for device I/O, with Firecracker's semantics: a bucket of `size`
//! tokens refilled at `size` per `refill_time_ms`, plus a one-time burst spent first. An
//! operation larger than the bucket is let through when the bucket is full and leaves it in
//! debt, so huge requests are slowed rather than blocked forever.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// One token bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    size: u64,
    refill_time: Duration,
    one_time_burst: u64,
    /// Tokens available; negative after an operation larger than the bucket.
    budget: f64,
    last_refill: Instant,
}

/// Settings of a token bucket (Firecracker's `TokenBucket` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenBucketConfig {
    /// Bucket size in tokens (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, at start.
    pub one_time_burst: u64,
    /// Time to refill a whole bucket, in milliseconds.
    pub refill_time_ms: u64,
}

impl TokenBucket {
    /// A full bucket; `None` when `size` or `refill_time_ms` is 0 (no limit).
    pub fn new(config: TokenBucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time_ms == 0 {
            return None;
        }
        Some(Self {
            size: config.size,
            refill_time: Duration::from_millis(config.refill_time_ms),
            one_time_burst: config.one_time_burst,
            budget: config.size as f64,
            last_refill: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill);
        self.last_refill = now;
        let added = elapsed.as_secs_f64() / self.refill_time.as_secs_f64() * self.size as f64;
        self.budget = (self.budget + added).min(self.size as f64);
    }

    /// Takes `tokens`, or says how long to wait before they will be there.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.one_time_burst >= tokens {
            self.one_time_burst -= tokens;
            return Ok(());
        }
        let rest = tokens - self.one_time_burst;
        let needed = rest.min(self.size) as f64;
        if self.budget >= needed {
            self.one_time_burst = 0;
            self.budget -= rest as f64;
            return Ok(());
        }
        let missing = needed - self.budget;
        let wait = self.refill_time.as_secs_f64() * missing / self.size as f64;
        // Round up to a whole millisecond so the timer never fires just short of the budget.
        Err(Duration::from_secs_f64((wait * 1000.0).ceil() / 1000.0).max(Duration::from_millis(1)))
    }
}

/// A bandwidth bucket and an operations bucket; either may be absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

/// Settings of a rate limiter (Firecracker's `RateLimiter` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: TokenBucketConfig,
    /// Operations.
    pub ops: TokenBucketConfig,
}

impl RateLimiterConfig {
    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        (self.bandwidth.size == 0 || self.bandwidth.refill_time_ms == 0)
            && (self.ops.size == 0 || self.ops.refill_time_ms == 0)
    }
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(config: RateLimiterConfig) -> Self {
        let now = Instant::now();
        Self {
            bandwidth: TokenBucket::new(config.bandwidth, now),
            ops: TokenBucket::new(config.ops, now),
        }
    }

    /// Takes one operation of `bytes`, or says how long to wait. Nothing is taken unless both
    /// buckets allow it.
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let saved_ops = self.ops.clone();
        if let Some(ops) = &mut self.ops {
            ops.reduce(1, now)?;
        }
        if let Some(bw) = &mut self.bandwidth {
            if let Err(wait) = bw.reduce(bytes, now) {
                self.ops = saved_ops;
                return Err(wait);
            }
        }
        Ok(())
    }
}

/// A rate limiter with the timer that says when a throttled device may go on: a device
/// asks [`Throttle::admit`] before each operation; when refused it stops, and its worker
/// resumes it when the timer fd becomes readable.
#[derive(Debug)]
pub struct Throttle {
    limiter: RateLimiter,
    timer: TimerFd,
    throttled: bool,
}

impl Throttle {
    /// A throttle enforcing `config`.
    pub fn new(config: RateLimiterConfig) -> std::io::Result<Self> {
        Ok(Self {
            limiter: RateLimiter::new(config),
            timer: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            throttled: false,
        })
    }

    /// True if an operation of `bytes` may run now; otherwise arms the timer.
    pub fn admit(&mut self, bytes: u64) -> bool {
        if self.throttled {
            return false;
        }
        match self.limiter.consume(bytes) {
            Ok(()) => true,
            Err(wait) => {
                if let Err(e) = self.timer.reset(wait, None) {
                    tracing::error!("cannot arm a rate-limiter timer: {e}");
                    return true;
                }
                self.throttled = true;
                false
            }
        }
    }

    /// Whether the device is waiting for the timer.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Called when the timer fd is readable: the device may go on.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.throttled = false;
    }
}

impl Throttle {
    /// Replaces the limits (full buckets, as a new limiter starts); a wait already under way
    /// ends when its timer fires.
    pub fn set_config(&mut self, config: RateLimiterConfig) {
        self.limiter = RateLimiter::new(config);
    }
}

/// A rate-limit change requested while a device runs (Firecracker's `PATCH` of a drive or
/// interface): the API side calls [`LimiterUpdate::request`], the device's worker applies it
/// to its [`Throttle`] before its next operation.
#[derive(Debug, Clone, Default)]
pub struct LimiterUpdate {
    pending: Arc<Mutex<Option<RateLimiterConfig>>>,
    flag: Arc<AtomicBool>,
}

impl LimiterUpdate {
    /// Asks the device to use `config` from its next operation on.
    pub fn request(&self, config: RateLimiterConfig) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(config);
        self.flag.store(true, Ordering::Release);
    }

    /// Applies a pending change to `throttle` (one atomic load when there is none).
    pub fn apply(&self, throttle: &mut Throttle) {
        if self.flag.swap(false, Ordering::AcqRel) {
            if let Some(config) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                throttle.set_config(config);
            }
        }
    }
}

impl AsRawFd for Throttle {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time_ms: refill_ms,
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn a_zero_bucket_is_no_limit() {
        let now = Instant::now();
        assert!(TokenBucket::new(TokenBucketConfig::default(), now).is_none());
        let mut unlimited = RateLimiter::new(RateLimiterConfig::default());
        for _ in 0..1000 {
            assert_eq!(unlimited.consume(1 << 30), Ok(()));
        }
    }

    #[test]
    fn the_bucket_empties_and_refills_in_proportion() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce(600, t0), Ok(()));
        assert_eq!(b.reduce(400, t0), Ok(()));
        let wait = b.reduce(100, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(b.reduce(100, t0 + Duration::from_millis(100)), Ok(()));
        // A full refill period fills it, never beyond its size.
        assert_eq!(b.reduce(1000, t0 + Duration::from_secs(10)), Ok(()));
        assert!(b.reduce(1, t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_only_once() {
        let t0 = Instant::now();
        let mut b = bucket(100, 500, 1000, t0);
        assert_eq!(b.reduce(500, t0), Ok(()));
        assert_eq!(b.reduce(100, t0), Ok(()));
        assert!(b.reduce(1, t0).is_err());
        assert_eq!(b.reduce(100, t0 + Duration::from_secs(5)), Ok(()));
        assert!(
            b.reduce(1, t0 + Duration::from_secs(5)).is_err(),
            "the burst does not come back"
        );
    }

    #[test]
    fn oversized_operations_pass_on_a_full_bucket_and_leave_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.reduce(3000, t0), Ok(()));
        // 2000 tokens of debt plus 1000 wanted: three seconds.
        assert_eq!(b.reduce(1000, t0).unwrap_err(), Duration::from_secs(3));
        assert_eq!(b.reduce(1000, t0 + Duration::from_secs(3)), Ok(()));
    }

    #[test]
    fn both_buckets_must_agree() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(RateLimiterConfig {
            bandwidth: TokenBucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            },
            ops: TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 1000,
            },
        });
        rl.bandwidth.as_mut().unwrap().last_refill = t0;
        rl.ops.as_mut().unwrap().last_refill = t0;
        assert_eq!(rl.consume_at(900, t0), Ok(()));
        // The bandwidth bucket refuses: the operation is not taken from the ops bucket.
        assert!(rl.consume_at(900, t0).is_err());
        assert_eq!(rl.consume_at(100, t0), Ok(()));
        assert!(rl.consume_at(0, t0).is_err(), "two operations per second");
    }
}
