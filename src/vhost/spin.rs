//! Adaptive busy-poll budget of one poller (after QEMU's adaptive polling in `util/aio-posix.c`).
//!
//! A poller that finds nothing to do spins for a while before it re-enables notifications and
//! sleeps, because waking a sleeping thread costs tens of microseconds. Spinning only pays when the
//! next event comes soon: on a bdev whose completions arrive every 60–1000 µs (rbd over the network)
//! a fixed 50 µs spin burns a whole core for nothing and, on a small host, takes that core from the
//! guest's vCPUs, the OSDs or the other pollers. So the budget follows the waits it sees:
//!
//! * a wait that ended within the budget: the sweet spot, no change;
//! * a wait longer than the maximum (`poll-us`): spinning cannot catch it, halve the budget (down to
//!   zero: sleep at once);
//! * a wait between the budget and the maximum: a longer spin would have caught it, double the
//!   budget (from zero, start at [`GROW_FROM`]), up to the maximum.
//!
//! A "wait" is the time from the moment the poller ran out of work to the next progress, whether it
//! spun all along or slept in between. Busy queues (malloc, null, page-cache hits: waits of a few
//! µs) keep the full budget; slow ones drop to zero within a handful of waits and come back as soon
//! as waits get short again. `poll-us=0` never spins.

use std::time::Duration;

/// The budget a zero budget grows to first.
pub const GROW_FROM: Duration = Duration::from_micros(4);

/// One poller's spin budget.
#[derive(Debug, Clone, Copy)]
pub struct SpinBudget {
    max: Duration,
    cur: Duration,
}

impl SpinBudget {
    /// A budget that starts at, and never exceeds, `max`.
    pub fn new(max: Duration) -> Self {
        Self { max, cur: max }
    }

    /// How long to spin now.
    pub fn budget(&self) -> Duration {
        self.cur
    }

    /// Adjusts the budget to a wait of `waited` (out of work → next progress).
    pub fn observe(&mut self, waited: Duration) {
        if waited <= self.cur {
            return;
        }
        if waited > self.max {
            self.cur /= 2;
            if self.cur < GROW_FROM / 2 {
                self.cur = Duration::ZERO;
            }
        } else {
            self.cur = if self.cur.is_zero() { GROW_FROM } else { self.cur * 2 }.min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: fn(u64) -> Duration = Duration::from_micros;

    #[test]
    fn short_waits_keep_the_full_budget() {
        let mut s = SpinBudget::new(US(50));
        for _ in 0..1000 {
            s.observe(US(3));
        }
        assert_eq!(s.budget(), US(50));
    }

    #[test]
    fn long_waits_drop_the_budget_to_zero() {
        let mut s = SpinBudget::new(US(50));
        s.observe(US(80));
        assert_eq!(s.budget(), US(25), "one long wait halves");
        for _ in 0..10 {
            s.observe(US(500));
        }
        assert_eq!(s.budget(), Duration::ZERO);
    }

    #[test]
    fn catchable_waits_grow_it_back_up_to_the_maximum() {
        let mut s = SpinBudget::new(US(50));
        for _ in 0..10 {
            s.observe(US(500));
        }
        assert_eq!(s.budget(), Duration::ZERO);
        s.observe(US(10));
        assert_eq!(s.budget(), GROW_FROM);
        s.observe(US(10));
        assert_eq!(s.budget(), US(8));
        s.observe(US(10));
        assert_eq!(s.budget(), US(16));
        s.observe(US(10));
        assert_eq!(s.budget(), US(16), "caught: no change");
        s.observe(US(45));
        s.observe(US(45));
        assert_eq!(s.budget(), US(50), "capped at the maximum");
    }

    #[test]
    fn zero_maximum_never_spins() {
        let mut s = SpinBudget::new(Duration::ZERO);
        s.observe(Duration::ZERO);
        assert_eq!(s.budget(), Duration::ZERO);
        s.observe(US(1));
        assert_eq!(s.budget(), Duration::ZERO);
    }
}
