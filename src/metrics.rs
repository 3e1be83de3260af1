//! Every Prometheus metric the gateway exports, and nothing else registers any.
//!
//! Metrics live in the `prometheus` crate's default registry, which Pingora's
//! `pingora-prometheus` service gathers on `metrics_listen`. Label values are
//! bounded by construction: models are configured names (or `unknown`), statuses
//! are HTTP codes, kinds and limits are fixed strings. No key, owner or other
//! per-client value is ever a label.

use once_cell::sync::Lazy;
use prometheus::{CounterVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // A second registration (tests that build several gateways in one process) is
    // harmless: the first one is the one gathered.
    if let Err(e) = prometheus::register(Box::new(c.clone())) {
        log::debug!("metric registration: {e}");
    }
    c
}

// Construction below fails only for an invalid static name or label set, which the
// unit test rules out; `init()` forces every metric at startup, never on a request.
#[allow(clippy::expect_used)]
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid static metric"))
}

#[allow(clippy::expect_used)]
fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid static metric"))
}

#[allow(clippy::expect_used)]
fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid static metric"))
}

#[allow(clippy::expect_used)]
fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid static metric"),
    )
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Requests by configured model and final HTTP status.
pub static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_requests_total",
        "Requests handled, by model and HTTP status",
        &["model", "status"],
    )
});

/// Tokens billed, by model and kind (prompt|completion).
pub static TOKENS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_tokens_total",
        "Tokens billed, by model and kind (prompt|completion)",
        &["model", "kind"],
    )
});

/// Cost billed in USD, by model. (Exact amounts are in the usage store; this is for dashboards.)
#[allow(clippy::expect_used)]
pub static COST_USD: Lazy<CounterVec> = Lazy::new(|| {
    register(
        CounterVec::new(
            Opts::new("ai4free_cost_usd_total", "Cost billed in USD, by model"),
            &["model"],
        )
        .expect("valid static metric"),
    )
});

/// One configured model's series, resolved once when the gateway starts.
/// `with_label_values` hashes its labels and takes the vector's lock on every
/// call; a proxied request bumps four series, so it holds the handles instead.
/// Creating them up front also exports each model's series at zero from the
/// start, so a rate over them is defined before its first request.
pub struct ModelCounters {
    model: String,
    ok: IntCounter,
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
    cost_usd: prometheus::Counter,
}

impl ModelCounters {
    /// The series of `model` (a configured name).
    pub fn new(model: &str) -> ModelCounters {
        ModelCounters {
            model: model.to_owned(),
            ok: REQUESTS.with_label_values(&[model, "200"]),
            prompt_tokens: TOKENS.with_label_values(&[model, "prompt"]),
            completion_tokens: TOKENS.with_label_values(&[model, "completion"]),
            cost_usd: COST_USD.with_label_values(&[model]),
        }
    }

    /// One request that ended with `status`.
    pub fn request(&self, status: u16) {
        if status == 200 {
            self.ok.inc();
        } else {
            REQUESTS
                .with_label_values(&[self.model.as_str(), status_label(status)])
                .inc();
        }
    }

    /// What one request was billed.
    pub fn billed(&self, prompt_tokens: u64, completion_tokens: u64, cost_usd: f64) {
        self.prompt_tokens.inc_by(prompt_tokens);
        self.completion_tokens.inc_by(completion_tokens);
        self.cost_usd.inc_by(cost_usd);
    }
}

/// The `status` label: the codes the gateway answers with, else their class,
/// so the label set stays bounded.
pub fn status_label(status: u16) -> &'static str {
    match status {
        0 => "0",
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// Requests refused by a limit, by limit name.
pub static RATE_LIMITED: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_rate_limited_total",
        "Requests refused with 429, by limit",
        &["limit"],
    )
});

/// Authentication failures by reason.
pub static AUTH_FAILURES: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_auth_failures_total",
        "Requests refused at authentication, by reason",
        &["reason"],
    )
});

/// Upstream failures by kind (connect, timeout, reset, ...).
pub static UPSTREAM_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_upstream_errors_total",
        "Failures talking to providers, by kind",
        &["kind"],
    )
});

/// End-to-end request duration as seen by the gateway.
pub static REQUEST_DURATION: Lazy<Histogram> = Lazy::new(|| {
    histogram(
        "ai4free_request_duration_seconds",
        "Request duration from arrival to the last byte",
        LATENCY_BUCKETS.to_vec(),
    )
});

/// Time from arrival to the first response byte from the provider.
pub static TTFT: Lazy<Histogram> = Lazy::new(|| {
    histogram(
        "ai4free_time_to_first_token_seconds",
        "Time from request arrival to the first response byte from the provider",
        LATENCY_BUCKETS.to_vec(),
    )
});

/// Usage records waiting to be written.
pub static USAGE_QUEUE_DEPTH: Lazy<IntGauge> = Lazy::new(|| {
    gauge(
        "ai4free_usage_queue_depth",
        "Usage records queued for the writer",
    )
});

/// Usage records lost: the queue was full, or the store was down and the spool full.
/// Alert on any increase.
pub static USAGE_RECORDS_DROPPED: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "ai4free_usage_records_dropped_total",
        "Usage records lost (queue full, or store down with the spool full)",
    )
});

/// Bytes of usage rows waiting in the disk spool for the store to come back.
pub static USAGE_SPOOL_BYTES: Lazy<IntGauge> = Lazy::new(|| {
    gauge(
        "ai4free_usage_spool_bytes",
        "Bytes of usage rows spooled to disk and not yet written to the store",
    )
});

/// Usage records put in the disk spool because the store could not take them.
pub static USAGE_RECORDS_SPOOLED: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "ai4free_usage_records_spooled_total",
        "Usage records spooled to disk because the store failed",
    )
});

/// Usage records replayed from the disk spool into the store.
pub static USAGE_RECORDS_REPLAYED: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "ai4free_usage_records_replayed_total",
        "Usage records replayed from the disk spool into the store",
    )
});

/// Usage records written to the store.
pub static USAGE_RECORDS_WRITTEN: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "ai4free_usage_records_written_total",
        "Usage records written to the store",
    )
});

/// Failed usage batch writes (each retry counts).
pub static USAGE_WRITE_ERRORS: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "ai4free_usage_write_errors_total",
        "Failed usage batch writes, retries included",
    )
});

/// Time to write one usage batch.
pub static USAGE_FLUSH_SECONDS: Lazy<Histogram> = Lazy::new(|| {
    histogram(
        "ai4free_usage_flush_seconds",
        "Time to write one usage batch",
        LATENCY_BUCKETS.to_vec(),
    )
});

const REDIS_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Redis limiter calls by result: `ok` (admitted, or a probe succeeded), `denied`,
/// `error` (error reply, no connection, bad reply), `timeout` (no answer within
/// `redis.timeout_ms`, or the script ran after the deadline), and two that make no
/// round trip: `short_circuit` (breaker open) and `shielded` (refused by the local
/// shield).
pub static REDIS_CALLS: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_redis_calls_total",
        "Redis rate-limit calls by result (ok, denied, error, timeout; short_circuit and shielded make no call)",
        &["result"],
    )
});

/// Time of each Redis round trip (timeouts included, at the timeout).
pub static REDIS_LATENCY: Lazy<Histogram> = Lazy::new(|| {
    histogram(
        "ai4free_redis_latency_seconds",
        "Time of each Redis rate-limit round trip",
        REDIS_LATENCY_BUCKETS.to_vec(),
    )
});

/// 1 while rate limits are decided without Redis (`redis.on_failure`), else 0.
/// Strictly: how many limiters in this process are degraded (one per gateway).
pub static RATELIMIT_DEGRADED: Lazy<IntGauge> = Lazy::new(|| {
    gauge(
        "ai4free_ratelimit_degraded",
        "1 while rate limits are decided without Redis (redis.on_failure), else 0",
    )
});

/// Settlements, lease releases and lease renewals that did not reach Redis (`op`:
/// settle, release, renew). A failed settlement leaves the reservation as
/// reserved; a failed release or renewal is healed by the lease TTL.
pub static LIMIT_SETTLE_FAILURES: Lazy<IntCounterVec> = Lazy::new(|| {
    counter_vec(
        "ai4free_limit_settle_failures_total",
        "Limit settlements, lease releases and renewals that failed (op: settle, release, renew)",
        &["op"],
    )
});

/// Forces registration of every metric so `/metrics` lists them from the start.
pub fn init() {
    Lazy::force(&REQUESTS);
    Lazy::force(&TOKENS);
    Lazy::force(&COST_USD);
    Lazy::force(&RATE_LIMITED);
    Lazy::force(&LIMIT_SETTLE_FAILURES);
    Lazy::force(&AUTH_FAILURES);
    Lazy::force(&UPSTREAM_ERRORS);
    Lazy::force(&REQUEST_DURATION);
    Lazy::force(&TTFT);
    Lazy::force(&USAGE_QUEUE_DEPTH);
    Lazy::force(&USAGE_RECORDS_DROPPED);
    Lazy::force(&USAGE_SPOOL_BYTES);
    Lazy::force(&USAGE_RECORDS_SPOOLED);
    Lazy::force(&USAGE_RECORDS_REPLAYED);
    Lazy::force(&USAGE_RECORDS_WRITTEN);
    Lazy::force(&USAGE_WRITE_ERRORS);
    Lazy::force(&USAGE_FLUSH_SECONDS);
    Lazy::force(&REDIS_CALLS);
    Lazy::force(&REDIS_LATENCY);
    Lazy::force(&RATELIMIT_DEGRADED);
    // Label sets known up front are exported at zero, so dashboards and alerts see
    // the series before the first event.
    for w in crate::limits::Window::ALL {
        RATE_LIMITED.with_label_values(&[w.limit_name()]);
    }
    for r in crate::limits::redis::CallResult::ALL {
        REDIS_CALLS.with_label_values(&[r.as_str()]);
    }
    for reason in [
        "missing",
        "malformed",
        "unknown",
        "revoked",
        "expired",
        "unavailable",
    ] {
        AUTH_FAILURES.with_label_values(&[reason]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_under_its_own_name() {
        init();
        REQUESTS.with_label_values(&["m", "200"]).inc();
        let names: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for n in [
            "ai4free_requests_total",
            "ai4free_usage_queue_depth",
            "ai4free_usage_records_dropped_total",
            "ai4free_usage_spool_bytes",
            "ai4free_usage_write_errors_total",
            "ai4free_request_duration_seconds",
            "ai4free_time_to_first_token_seconds",
            "ai4free_redis_calls_total",
            "ai4free_redis_latency_seconds",
            "ai4free_ratelimit_degraded",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing: {names:?}");
        }
    }

    #[test]
    fn model_counters_feed_the_labelled_series() {
        let c = ModelCounters::new("counters-test");
        c.request(200);
        c.request(200);
        c.request(429);
        c.billed(3, 4, 0.5);
        let get = |status| REQUESTS.with_label_values(&["counters-test", status]).get();
        assert_eq!((get("200"), get("429")), (2, 1));
        let tokens = |kind| TOKENS.with_label_values(&["counters-test", kind]).get();
        assert_eq!((tokens("prompt"), tokens("completion")), (3, 4));
        assert_eq!(COST_USD.with_label_values(&["counters-test"]).get(), 0.5);
    }
}
