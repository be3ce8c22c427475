//! Support for the cross-crate integration tests in `tests/tests/`: seeds that a failing run
//! prints and a later run replays. (The in-process server they share is `kvtier::testing`, in
//! the library, so the api package's own tests reach it too.)

use std::time::{SystemTime, UNIX_EPOCH};

/// The seed of a randomised test: the value of the environment variable `var` when set (to
/// replay a run), otherwise taken from the clock. Printed either way, with the line that
/// replays it; cargo shows it when the test fails.
pub fn seed(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{var}={v:?} is not a u64: {e}")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    } | 1;
    eprintln!("seed {seed} (replay with {var}={seed})");
    seed
}

/// The next value of a xorshift64 stream (`state` must be non-zero, as [`seed`]s are).
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
