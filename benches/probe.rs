//! The load benchmark's open-loop generator, by hand: the small chat completion
//! at fixed arrival rates against proxies that are already running, the targets
//! interleaved within each round, one line per measurement.
//!
//! ```text
//! cargo bench --bench probe -- RATES SECONDS ROUNDS NAME=ADDR[,KEY]...
//! cargo bench --bench probe -- 6000,9000 4 3 bare=127.0.0.1:8001 gw=127.0.0.1:8080,a4f_...
//! ```
//!
//! `scripts/sched-trace.sh` runs it under `perf sched`. Latency counts from
//! each request's scheduled instant, as in `proxy_load` (no coordinated
//! omission).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

// The generator's self-check (run by `proxy_load` before every run) is left
// out here: it loads the cores for seconds, inside `sched-trace.sh`'s trace.
#[allow(unused_imports)]
#[path = "loadgen/mod.rs"]
mod loadgen;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: probe RATES SECONDS ROUNDS NAME=ADDR[,KEY]... \
                     (RATES: requests per second, comma-separated)";

struct Args {
    rates: Vec<f64>,
    duration: Duration,
    rounds: usize,
    targets: Vec<(String, loadgen::Target)>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let [rates, secs, rounds, targets @ ..] = args else {
        return Err(USAGE.into());
    };
    if targets.is_empty() {
        return Err(USAGE.into());
    }
    let rates = rates
        .split(',')
        .map(|r| match r.parse::<f64>() {
            Ok(v) if v > 0.0 => Ok(v),
            _ => Err(format!("not a positive rate: {r:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let duration = secs
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a positive number of seconds: {secs:?}"))?;
    let rounds = rounds
        .parse::<usize>()
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| format!("not a positive number of rounds: {rounds:?}"))?;
    let body = loadgen::chat_body(false, 0);
    let targets = targets
        .iter()
        .map(|t| {
            let (name, rest) = t
                .split_once('=')
                .ok_or_else(|| format!("not NAME=ADDR[,KEY]: {t:?}"))?;
            let (addr, key) = match rest.split_once(',') {
                Some((a, k)) => (a, Some(k)),
                None => (rest, None),
            };
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| format!("{name}: not an address {addr:?}: {e}"))?;
            Ok((name.to_owned(), loadgen::chat_target(addr, key, &body, &[])))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Args {
        rates,
        duration,
        rounds,
        targets,
    })
}

fn main() -> ExitCode {
    // `cargo bench` adds --bench; `cargo test --benches` runs this with --test.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() || args.iter().any(|a| a == "--test" || a == "--list") {
        return ExitCode::SUCCESS;
    }
    let args = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = loadgen::runtime(0).unwrap();
    for &rate in &args.rates {
        for round in 1..=args.rounds {
            for (name, target) in &args.targets {
                let spec = loadgen::RunSpec::new(rate, args.duration);
                let r = match rt.block_on(loadgen::run(target, &spec)) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("{name}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let q = |p| r.latency.value_at_quantile(p);
                println!(
                    "{rate:>7} req/s  round {round}  {name:>12}: p50 {:>6} p99 {:>6} p99.9 {:>6} max {:>6} us  \
                     errors {}  late sends {}",
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    r.latency.max(),
                    r.errors + r.non_2xx,
                    r.late_sends
                );
            }
        }
    }
    ExitCode::SUCCESS
}
