//! Byte-rate limits (governor): the four bandwidth parameters of a job, and host-wide caps
//! shared by every job.
//!
//! A [`Throttle`] is the set of limits that apply where bytes move (e.g. a job's
//! `volumeReadBandwidth` and the host's read cap); [`Throttle::consume`] waits until every
//! one of them allows the bytes. Bursts are bounded to about 1/20 s of the rate (at least
//! 4 KiB, at most 1 MiB), taken in pieces of that size, so the rate holds over any window of
//! a few seconds, not only on average.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use governor::{Quota, RateLimiter, clock::DefaultClock, state::InMemoryState, state::NotKeyed};

use crate::error::{AgentError, Result};

/// Smallest limit ZStack accepts, bytes per second.
pub const MIN_BYTES_PER_SECOND: i64 = 1024;
/// Largest burst, bytes.
const MAX_PIECE: u64 = 1 << 20;
/// Smallest burst, bytes.
const MIN_PIECE: u64 = 4 << 10;

/// Time every limit of this process has made bytes wait, nanoseconds (for `/metrics`).
static TOTAL_WAITED_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time spent waiting on every limit of this process so far, seconds.
pub fn total_waited_seconds() -> f64 {
    TOTAL_WAITED_NANOS.load(Ordering::Relaxed) as f64 / 1e9
}

/// One byte-rate limit.
pub struct ByteRate {
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    piece: NonZeroU32,
    bytes_per_second: u64,
    waited_nanos: AtomicU64,
}

impl std::fmt::Debug for ByteRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteRate").field("bytes_per_second", &self.bytes_per_second).finish()
    }
}

impl ByteRate {
    /// A limit of `bytes_per_second` (at least [`MIN_BYTES_PER_SECOND`]; rates above 4 GiB/s
    /// are held at 4 GiB/s).
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.clamp(1, u64::from(u32::MAX));
        let piece = (rate / 20).clamp(MIN_PIECE, MAX_PIECE).min(rate);
        let rate_nz = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let piece_nz = NonZeroU32::new(u32::try_from(piece).unwrap_or(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate_nz).allow_burst(piece_nz);
        Self {
            limiter: RateLimiter::direct(quota),
            piece: piece_nz,
            bytes_per_second: rate,
            waited_nanos: AtomicU64::new(0),
        }
    }

    /// The rate, bytes per second.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Time spent waiting on this limit so far, seconds.
    pub fn waited_seconds(&self) -> f64 {
        self.waited_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    async fn consume(&self, mut bytes: u64) {
        let start = Instant::now();
        while bytes > 0 {
            let n = bytes.min(u64::from(self.piece.get()));
            let n_nz = NonZeroU32::new(u32::try_from(n).unwrap_or(1)).unwrap_or(NonZeroU32::MIN);
            // n <= piece == burst, so capacity always suffices.
            let _ = self.limiter.until_n_ready(n_nz).await;
            bytes -= n;
        }
        let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited_nanos.fetch_add(waited, Ordering::Relaxed);
        TOTAL_WAITED_NANOS.fetch_add(waited, Ordering::Relaxed);
    }
}

/// The limits that apply to one flow of bytes; cheap to clone, shared by a job's workers.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    limits: Vec<Arc<ByteRate>>,
}

impl Throttle {
    /// No limit.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Adds a limit (a job's own, or a host-wide cap shared across jobs).
    pub fn with(mut self, limit: Option<Arc<ByteRate>>) -> Self {
        self.limits.extend(limit);
        self
    }

    /// Waits until every limit allows `bytes` more bytes.
    pub async fn consume(&self, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        for l in &self.limits {
            l.consume(bytes).await;
        }
    }

    /// The tightest limit, bytes per second (None: unlimited).
    pub fn bytes_per_second(&self) -> Option<u64> {
        self.limits.iter().map(|l| l.bytes_per_second()).min()
    }

    /// Whether any limit applies.
    pub fn is_limited(&self) -> bool {
        !self.limits.is_empty()
    }
}

/// Validates an optional bandwidth parameter: absent (or 0, for clients that cannot send
/// absence) is unlimited; otherwise at least [`MIN_BYTES_PER_SECOND`].
pub fn bandwidth(field: &'static str, value: Option<i64>) -> Result<Option<Arc<ByteRate>>> {
    match value {
        None | Some(0) => Ok(None),
        Some(v) if v < MIN_BYTES_PER_SECOND => {
            Err(AgentError::invalid(field, format!("{v} bytes/s is below the minimum of {MIN_BYTES_PER_SECOND}")))
        }
        Some(v) => Ok(Some(Arc::new(ByteRate::new(u64::try_from(v).unwrap_or(u64::MAX))))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_validation() {
        assert!(bandwidth("volumeReadBandwidth", None).expect("none").is_none());
        assert!(bandwidth("volumeReadBandwidth", Some(0)).expect("zero").is_none());
        let e = bandwidth("volumeReadBandwidth", Some(1023)).expect_err("too low");
        assert!(e.to_string().contains("volumeReadBandwidth") && e.to_string().contains("1023"), "{e}");
        assert!(bandwidth("volumeReadBandwidth", Some(-5)).is_err());
        assert_eq!(bandwidth("x", Some(4096)).expect("ok").expect("some").bytes_per_second(), 4096);
    }

    #[tokio::test]
    async fn transfer_is_never_faster_than_the_limit() {
        // 256 KiB/s; 192 KiB after the first burst must take at least 0.75 s minus one burst.
        let rate = Arc::new(ByteRate::new(256 << 10));
        let t = Throttle::unlimited().with(Some(rate.clone()));
        let start = Instant::now();
        for _ in 0..3 {
            t.consume(64 << 10).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let burst = (256u64 << 10) as f64 / 20.0;
        let floor = ((192u64 << 10) as f64 - burst) / (256u64 << 10) as f64;
        assert!(elapsed >= floor * 0.95, "{elapsed:.3}s for 192 KiB at 256 KiB/s (floor {floor:.3}s)");
        assert!(rate.waited_seconds() > 0.0);
    }

    #[tokio::test]
    async fn the_tightest_of_several_limits_wins() {
        let host = Arc::new(ByteRate::new(128 << 10));
        let job = Arc::new(ByteRate::new(1 << 30));
        let t = Throttle::unlimited().with(Some(job)).with(Some(host));
        let start = Instant::now();
        t.consume(64 << 10).await;
        t.consume(64 << 10).await;
        let floor = ((128u64 << 10) as f64 - 6553.6) / (128u64 << 10) as f64;
        assert!(start.elapsed().as_secs_f64() >= floor * 0.95);
    }
}
