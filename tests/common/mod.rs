#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod gateway;
pub mod http;
pub mod node;
pub mod pg;
pub mod redis;

/// Polls `cond` every 20 ms until it holds; fails the test with `what` if it
/// still does not after `within`. Returns how long it took.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}
