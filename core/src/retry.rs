//! How long a failed job waits before its next attempt.
//!
//! A [`RetryPolicy`] maps a failed attempt to a delay. The default is
//! exponential backoff — 1 s, 2 s, 4 s, … capped at one hour — with *equal*
//! jitter (each delay is drawn uniformly from the upper half of its step),
//! so a burst of failures does not come back as a burst of retries.
//!
//! ```
//! use std::time::Duration;
//! use relayq_core::{Jitter, RetryPolicy};
//!
//! // 10 s, 20 s, 40 s, 60 s, 60 s, … exactly: no jitter.
//! let policy = RetryPolicy::exponential()
//!     .base(Duration::from_secs(10))
//!     .cap(Duration::from_secs(60))
//!     .jitter(Jitter::None);
//! assert_eq!(policy.ceiling(1), Duration::from_secs(10));
//! assert_eq!(policy.ceiling(3), Duration::from_secs(40));
//! assert_eq!(policy.ceiling(4), Duration::from_secs(60));
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::job::Job;

/// How much randomness spreads the delays of an exponential policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// The exact delay of each step. Use it when a test checks a schedule.
    None,
    /// Uniform in `[0, delay]`: the widest spread, and retries may come at once.
    Full,
    /// Uniform in `[delay / 2, delay]`: spread, yet never sooner than half
    /// the step. The default.
    #[default]
    Equal,
}

type CustomFn = dyn Fn(&Job, i32) -> Duration + Send + Sync;

#[derive(Clone)]
enum Rule {
    Exponential {
        base: Duration,
        factor: f64,
        cap: Duration,
        jitter: Jitter,
    },
    Custom(Arc<CustomFn>),
}

/// Maps a failed attempt to the delay before the next one.
///
/// Cheap to clone. Build one with [`RetryPolicy::exponential`] (and its
/// setters), [`RetryPolicy::fixed`] or [`RetryPolicy::custom`]; a worker
/// takes a default policy and per-kind overrides.
#[derive(Clone)]
pub struct RetryPolicy {
    rule: Rule,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Exponential {
                base,
                factor,
                cap,
                jitter,
            } => f
                .debug_struct("RetryPolicy::Exponential")
                .field("base", base)
                .field("factor", factor)
                .field("cap", cap)
                .field("jitter", jitter)
                .finish(),
            Rule::Custom(_) => f.write_str("RetryPolicy::Custom"),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::exponential()
    }
}

impl RetryPolicy {
    /// The default base delay: one second.
    pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
    /// The default growth factor: each step doubles.
    pub const DEFAULT_FACTOR: f64 = 2.0;
    /// The default cap: one hour.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(3600);

    /// Exponential backoff: `base * factor^(attempt - 1)`, at most `cap`,
    /// then jittered. Starts at 1 s, doubling, capped at 1 h, equal jitter.
    pub fn exponential() -> Self {
        Self {
            rule: Rule::Exponential {
                base: Self::DEFAULT_BASE,
                factor: Self::DEFAULT_FACTOR,
                cap: Self::DEFAULT_CAP,
                jitter: Jitter::Equal,
            },
        }
    }

    /// The same delay after every failure, without jitter.
    pub fn fixed(delay: Duration) -> Self {
        Self {
            rule: Rule::Exponential {
                base: delay,
                factor: 1.0,
                cap: delay,
                jitter: Jitter::None,
            },
        }
    }

    /// Any function of the failed job (as it was leased) and the attempt
    /// that failed (1 for the first). Should it panic, the worker retries
    /// the job as [`RetryPolicy::default`] says, and logs the panic.
    ///
    /// ```
    /// use std::time::Duration;
    /// use relayq_core::RetryPolicy;
    ///
    /// // Slow retries for the low-priority lane, quick ones otherwise.
    /// let policy = RetryPolicy::custom(|job, attempt| {
    ///     let step = if job.priority > 0 { 60 } else { 5 };
    ///     Duration::from_secs(step * u64::try_from(attempt).unwrap_or(1))
    /// });
    /// # let _ = policy;
    /// ```
    pub fn custom(f: impl Fn(&Job, i32) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            rule: Rule::Custom(Arc::new(f)),
        }
    }

    /// Sets the first step of an exponential policy: at most its cap (see
    /// [`Self::check`]). No effect on a custom one.
    pub fn base(mut self, base: Duration) -> Self {
        if let Rule::Exponential { base: b, .. } = &mut self.rule {
            *b = base;
        }
        self
    }

    /// Sets the growth factor of an exponential policy: finite and at
    /// least 1 (a worker given another is not built: see
    /// [`Self::check`]). No effect on a custom one.
    pub fn factor(mut self, factor: f64) -> Self {
        if let Rule::Exponential { factor: f, .. } = &mut self.rule {
            *f = factor;
        }
        self
    }

    /// Checks the policy as the worker it is given does when built:
    /// [`Error::InvalidInput`] naming `field` for an exponential policy
    /// whose factor is below 1 or not finite, or whose base exceeds its
    /// cap (each would mean another policy than the one written).
    pub fn check(&self, field: &'static str) -> Result<()> {
        let Rule::Exponential {
            base, factor, cap, ..
        } = &self.rule
        else {
            return Ok(());
        };
        if !factor.is_finite() || *factor < 1.0 {
            return Err(Error::invalid(
                field,
                format!("the factor must be finite and at least 1, got {factor}"),
            ));
        }
        if base > cap {
            return Err(Error::invalid(
                field,
                format!("the base ({base:?}) exceeds the cap ({cap:?})"),
            ));
        }
        Ok(())
    }

    /// Sets the longest delay of an exponential policy: at least its base
    /// (see [`Self::check`]; the default base is
    /// [`Self::DEFAULT_BASE`]). No effect on a custom one.
    pub fn cap(mut self, cap: Duration) -> Self {
        if let Rule::Exponential { cap: c, .. } = &mut self.rule {
            *c = cap;
        }
        self
    }

    /// Sets the jitter of an exponential policy. No effect on a custom one.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        if let Rule::Exponential { jitter: j, .. } = &mut self.rule {
            *j = jitter;
        }
        self
    }

    /// The delay before the attempt after `attempt` (1 for the first
    /// failure) of `job`, jitter included.
    pub fn delay(&self, job: &Job, attempt: i32) -> Duration {
        match &self.rule {
            Rule::Exponential { jitter, .. } => apply_jitter(self.ceiling(attempt), *jitter),
            Rule::Custom(f) => f(job, attempt),
        }
    }

    /// The un-jittered delay after failed `attempt`: the most an exponential
    /// policy waits. For a custom policy this is [`Duration::ZERO`], as it
    /// depends on the job.
    pub fn ceiling(&self, attempt: i32) -> Duration {
        match &self.rule {
            Rule::Exponential {
                base, factor, cap, ..
            } => {
                // No wait grows from none (and 0 × ∞, a factor's power
                // past f64's range, would be NaN, read as the cap).
                if base.is_zero() {
                    return Duration::ZERO;
                }
                let exponent = attempt.saturating_sub(1).max(0);
                let scaled = base.as_secs_f64() * factor.powi(exponent);
                if !scaled.is_finite() || scaled >= cap.as_secs_f64() {
                    *cap
                } else {
                    Duration::try_from_secs_f64(scaled)
                        .unwrap_or(*cap)
                        .min(*cap)
                }
            }
            Rule::Custom(_) => Duration::ZERO,
        }
    }
}

pub(crate) fn apply_jitter(delay: Duration, jitter: Jitter) -> Duration {
    match jitter {
        Jitter::None => delay,
        Jitter::Full => delay.mul_f64(unit_random()),
        Jitter::Equal => {
            let half = delay / 2;
            half + (delay - half).mul_f64(unit_random())
        }
    }
}

/// A uniform sample in `[0, 1)` from a process-wide SplitMix64 sequence,
/// seeded once from the standard library's per-process random keys. Not
/// cryptographic; it only spreads retries apart.
fn unit_random() -> f64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(0x5eed_u64));
    let mut z = seed.wrapping_add(COUNTER.fetch_add(GAMMA, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // The top 53 bits give every double in [0, 1) on a uniform grid.
    (z >> 11) as f64 / (1_u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::leased_for_tests;

    fn job() -> Job {
        leased_for_tests(1)
    }

    #[test]
    fn a_zero_base_waits_nothing_however_many_attempts() {
        let p = RetryPolicy::exponential()
            .base(Duration::ZERO)
            .factor(1e300)
            .jitter(Jitter::None);
        for attempt in [1, 2, 3, 1_026, i32::MAX] {
            assert_eq!(p.ceiling(attempt), Duration::ZERO, "attempt {attempt}");
        }
    }

    #[test]
    fn default_doubles_from_one_second_up_to_one_hour() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=14).map(|a| p.ceiling(a).as_secs()).collect();
        assert_eq!(
            secs,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
        );
        assert_eq!(p.ceiling(i32::MAX), RetryPolicy::DEFAULT_CAP);
        assert_eq!(
            p.ceiling(0),
            RetryPolicy::DEFAULT_BASE,
            "attempt 0 acts as 1"
        );
    }

    #[test]
    fn no_jitter_gives_the_exact_schedule() {
        let p = RetryPolicy::exponential()
            .base(Duration::from_millis(250))
            .factor(3.0)
            .cap(Duration::from_secs(5))
            .jitter(Jitter::None);
        let got: Vec<Duration> = (1..=5).map(|a| p.delay(&job(), a)).collect();
        assert_eq!(
            got,
            [
                Duration::from_millis(250),
                Duration::from_millis(750),
                Duration::from_millis(2250),
                Duration::from_secs(5),
                Duration::from_secs(5),
            ]
        );
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half_and_varies() {
        let p = RetryPolicy::exponential().base(Duration::from_secs(8));
        let samples: Vec<Duration> = (0..200).map(|_| p.delay(&job(), 1)).collect();
        assert!(
            samples
                .iter()
                .all(|d| (Duration::from_secs(4)..=Duration::from_secs(8)).contains(d))
        );
        assert!(samples.iter().any(|d| *d != samples[0]), "jitter varies");
    }

    #[test]
    fn full_jitter_stays_within_the_step() {
        let p = RetryPolicy::exponential()
            .base(Duration::from_secs(8))
            .jitter(Jitter::Full);
        let samples: Vec<Duration> = (0..200).map(|_| p.delay(&job(), 2)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(16)));
        assert!(
            samples.iter().any(|d| *d < Duration::from_secs(8)),
            "full jitter reaches the lower half"
        );
    }

    #[test]
    fn fixed_and_custom() {
        let fixed = RetryPolicy::fixed(Duration::from_secs(7));
        assert_eq!(fixed.delay(&job(), 1), Duration::from_secs(7));
        assert_eq!(fixed.delay(&job(), 20), Duration::from_secs(7));
        let custom = RetryPolicy::custom(|job, attempt| {
            Duration::from_secs(u64::try_from(job.id * 100 + i64::from(attempt)).unwrap_or(0))
        });
        assert_eq!(custom.delay(&job(), 3), Duration::from_secs(103));
        // Setters for exponential policies leave a custom one alone.
        let custom = custom.base(Duration::ZERO).jitter(Jitter::Full);
        assert_eq!(custom.delay(&job(), 3), Duration::from_secs(103));
    }

    #[test]
    fn odd_factors_and_a_base_past_the_cap_are_refused() {
        for factor in [f64::NAN, f64::INFINITY, 0.5, -2.0] {
            let p = RetryPolicy::exponential().factor(factor);
            let e = p.check("retry").expect_err("refused");
            assert_eq!(e.invalid_field(), Some("retry"), "{factor}");
            // Used anyway, it still yields a delay within the cap.
            assert!(p.ceiling(10) <= RetryPolicy::DEFAULT_CAP, "{factor}");
        }
        let p = RetryPolicy::exponential()
            .base(Duration::from_secs(600))
            .cap(Duration::from_secs(60));
        assert!(p.check("retry").is_err());
        let p = RetryPolicy::exponential()
            .factor(1e300)
            .jitter(Jitter::None);
        assert!(p.check("retry").is_ok());
        assert_eq!(p.ceiling(3), RetryPolicy::DEFAULT_CAP);
        assert!(RetryPolicy::fixed(Duration::ZERO).check("retry").is_ok());
        assert!(
            RetryPolicy::custom(|_, _| Duration::ZERO)
                .check("retry")
                .is_ok()
        );
    }

    #[test]
    fn unit_random_is_in_range() {
        for _ in 0..1000 {
            let x = unit_random();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
