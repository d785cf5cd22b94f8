//! The one retry delay of the daemons: `first`, doubling after each failure up to `max`,
//! and `first` again once things went well (`reset`).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first` (at most `max`).
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay to wait now; the one after it is twice as long, up to the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        now
    }

    /// The next delay is `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The delay after `failures` failures of a fresh backoff (0: `first`), for callers
    /// that keep the count rather than a `Backoff` (a container's restarts).
    pub fn after(first: Duration, max: Duration, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        first.checked_mul(factor).unwrap_or(max).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_ceiling_and_starts_over_on_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(700));
        let seen: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [ms(100), ms(200), ms(400), ms(700), ms(700)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
        // A first delay above the ceiling is the ceiling.
        assert_eq!(Backoff::new(ms(900), ms(700)).next_delay(), ms(700));
        // Counted failures give the same sequence, and no overflow far out.
        let counted: Vec<Duration> = (0..5)
            .map(|n| Backoff::after(ms(100), ms(700), n))
            .collect();
        assert_eq!(counted, seen);
        assert_eq!(Backoff::after(ms(100), ms(700), 1000), ms(700));
    }
}
