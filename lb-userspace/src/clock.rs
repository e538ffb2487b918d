//! The one place the agent reads the time and draws randomness.
//!
//! Decisions that depend on them take the time or the draw as an argument — the L4 plan takes
//! neither, the registry and the balancing pick are handed theirs — so a test can fix them. Code
//! at the edges reads them here; `lb-userspace/clippy.toml` refuses a read anywhere else, so a
//! new one is a visible choice rather than a habit.
#![allow(clippy::disallowed_methods)]

use std::time::{Instant, SystemTime};

/// Monotonic time, for durations and deadlines.
pub fn now() -> Instant {
    Instant::now()
}

/// Tokio's monotonic time: what its timers compare against, and what a test with paused time
/// moves.
pub fn timer_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Wall-clock time, for what is stored or shown (expiry dates, registration times, log lines).
pub fn wall() -> SystemTime {
    SystemTime::now()
}

/// A uniformly random value from the thread's generator (seeded by the OS).
pub fn random<T>() -> T
where
    rand::distributions::Standard: rand::distributions::Distribution<T>,
{
    rand::random()
}

/// The thread's generator, for what takes more than one draw (a token).
pub fn rng() -> rand::rngs::ThreadRng {
    rand::thread_rng()
}
