//! Admission by expected wait: a model refuses new work at once (429) when the work already admitted
//! would keep it waiting longer than `max_queue_wait`, instead of letting a deep queue hold many
//! seconds of requests.
//!
//! The estimate is the work ahead (units admitted and not yet answered: tokens, for encoders) times
//! the recent service time per unit, an exponentially weighted mean the owner thread updates after
//! every batch. Measured under load, it already includes what batching gains. A model that has
//! served nothing yet, or whose queue is empty, admits everything: a single large request on an
//! idle model runs, however long it takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Weight of the newest batch in the mean service time.
const SMOOTHING: f64 = 0.25;

/// Work admitted to one model, and how fast it has been served lately.
pub struct Backlog {
    /// Units admitted and not yet answered.
    units: AtomicU64,
    /// Mean seconds per unit (f64 bits); 0 until the first batch.
    secs_per_unit: AtomicU64,
    /// `None`: never refuse by expected wait.
    max_wait: Option<Duration>,
    expected: metrics::Gauge,
    shed: metrics::Counter,
}

/// Why [`Backlog::admit`] refused: the wait it expected, and the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong {
    pub expected: Duration,
    pub max: Duration,
}

impl TooLong {
    /// When the backlog ahead should have shrunk below the limit: the excess, at least a second.
    pub fn retry_after(&self) -> Duration {
        self.expected.saturating_sub(self.max).max(Duration::from_secs(1))
    }
}

impl Backlog {
    /// `model` labels its metrics.
    pub fn new(model: &str, max_wait: Option<Duration>) -> Self {
        let labels = [("model", model.to_string())];
        Self {
            units: AtomicU64::new(0),
            secs_per_unit: AtomicU64::new(0f64.to_bits()),
            max_wait,
            expected: metrics::gauge!("hearth_expected_queue_wait_seconds", &labels),
            shed: metrics::counter!("hearth_requests_shed_total", &labels),
        }
    }

    /// How long work queued now would wait: the units ahead × the recent time per unit.
    pub fn expected_wait(&self) -> Duration {
        let units = self.units.load(Ordering::Relaxed) as f64;
        Duration::from_secs_f64((units * self.secs_per_unit()).min(1e9))
    }

    fn secs_per_unit(&self) -> f64 {
        f64::from_bits(self.secs_per_unit.load(Ordering::Relaxed))
    }

    /// Units admitted and not yet answered.
    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Relaxed)
    }

    /// Admits `units` of work, or refuses when the work ahead would keep it waiting longer than the
    /// limit. The work counts as ahead of later requests until the returned guard is dropped.
    pub fn admit(self: &Arc<Self>, units: u64) -> Result<Admitted, TooLong> {
        let expected = self.expected_wait();
        self.expected.set(expected.as_secs_f64());
        if let Some(max) = self.max_wait {
            if self.units() > 0 && expected > max {
                self.shed.increment(1);
                return Err(TooLong { expected, max });
            }
        }
        self.units.fetch_add(units, Ordering::Relaxed);
        Ok(Admitted { backlog: Arc::clone(self), units })
    }

    /// Records a batch of `units` served in `elapsed` (called by the owner thread only).
    pub fn record(&self, units: u64, elapsed: Duration) {
        if units == 0 {
            return;
        }
        let sample = elapsed.as_secs_f64() / units as f64;
        let mean = match self.secs_per_unit() {
            0.0 => sample,
            mean => mean + SMOOTHING * (sample - mean),
        };
        self.secs_per_unit.store(mean.to_bits(), Ordering::Relaxed);
    }
}

/// Admitted work; dropping it (answered, or the caller left) takes it out of the backlog.
pub struct Admitted {
    backlog: Arc<Backlog>,
    units: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.backlog.units.fetch_sub(self.units, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(max_ms: Option<u64>) -> Arc<Backlog> {
        Arc::new(Backlog::new("m", max_ms.map(Duration::from_millis)))
    }

    #[test]
    fn nothing_is_refused_before_the_first_measurement() {
        let b = backlog(Some(1));
        let _held: Vec<_> = (0..100).map(|_| b.admit(1_000).unwrap()).collect();
        assert_eq!(b.units(), 100_000);
        assert_eq!(b.expected_wait(), Duration::ZERO);
    }

    #[test]
    fn refuses_once_the_work_ahead_exceeds_the_limit_and_frees_on_drop() {
        let b = backlog(Some(2_000));
        b.record(100, Duration::from_millis(100)); // 1 ms per unit
        let first = b.admit(1_500).unwrap(); // 0 ahead
        let second = b.admit(1_000).unwrap(); // 1.5 s ahead
        assert_eq!(b.expected_wait(), Duration::from_millis(2_500));
        let refused = b.admit(1).err().unwrap();
        assert_eq!(refused.expected, Duration::from_millis(2_500));
        assert_eq!(refused.retry_after(), Duration::from_secs(1), "at least a second");
        drop(first);
        assert_eq!(b.units(), 1_000);
        let _third = b.admit(1).unwrap();
        drop(second);
        assert_eq!(b.units(), 1);
    }

    #[test]
    fn an_idle_model_admits_any_single_request() {
        let b = backlog(Some(10));
        b.record(1, Duration::from_secs(1));
        let _huge = b.admit(1_000_000).unwrap();
        assert!(b.admit(1).is_err());
    }

    #[test]
    fn no_limit_never_refuses() {
        let b = backlog(None);
        b.record(1, Duration::from_secs(1));
        let _a = b.admit(1_000).unwrap();
        assert!(b.admit(1_000).is_ok());
    }

    #[test]
    fn the_service_time_is_a_smoothed_mean() {
        let b = backlog(None);
        b.record(10, Duration::from_millis(10)); // 1 ms/unit: the first sample is taken as is
        b.record(10, Duration::from_millis(50)); // 5 ms/unit: moves a quarter of the way
        let _a = b.admit(1_000).unwrap();
        let wait = b.expected_wait().as_secs_f64();
        assert!((wait - 2.0).abs() < 1e-9, "{wait}");
        let retry = TooLong { expected: Duration::from_millis(4_500), max: Duration::from_secs(2) };
        assert_eq!(retry.retry_after(), Duration::from_millis(2_500));
    }
}
