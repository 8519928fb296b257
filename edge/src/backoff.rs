//! The one backoff of Hearth: exponential, with ±20 % jitter, capped, reset after a
//! success. Used by every reconnect loop (MQTT clients of the hub, agent and actuator) and
//! by the gRPC retries and stream reconnects of the agent and the hub.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff between `min` and `max` with ±20 % jitter (never above `max`).
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits start at `min` and double up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.min(max);
        Backoff { cur: min, min, max }
    }

    /// The backoff of MQTT reconnections: 100 ms doubling up to 5 s.
    pub fn mqtt() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next wait: the current step with jitter; the step then doubles (up to `max`).
    pub fn next_wait(&mut self) -> Duration {
        let base = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
            .min(self.max)
    }

    /// Back to `min`: call after a successful connection.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let waits: Vec<_> = (0..12).map(|_| b.next_wait()).collect();
        assert!((ms(80)..=ms(120)).contains(&waits[0]), "{waits:?}");
        assert!((ms(160)..=ms(240)).contains(&waits[1]), "{waits:?}");
        assert!((ms(320)..=ms(480)).contains(&waits[2]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= ms(1000)), "{waits:?}");
        assert!(waits[11] >= ms(800), "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= ms(120));
    }

    #[test]
    fn has_jitter() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_wait());
        }
        assert!(seen.len() > 10, "no jitter: {seen:?}");
    }

    #[test]
    fn min_above_max_is_clamped() {
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(1));
        assert!(b.next_wait() <= Duration::from_secs(1));
    }
}
