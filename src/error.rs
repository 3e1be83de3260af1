//! The proxy's error vocabulary and its one mapping to HTTP.
//!
//! Every refusal the gateway produces itself is a [`ProxyError`]; [`ProxyError::status`],
//! [`ProxyError::code`] and [`ProxyError::body`] are the single table that turns it
//! into OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.
//! Messages never contain a key, a provider secret or a header value.

use bytes::Bytes;

use crate::admin::FieldError;
use crate::keys::cache::AuthError;
use crate::limits::policy::{Hit, Meter, Refusal};

/// Everything the proxy can refuse a request for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// 401: no, malformed, unknown, revoked or expired key.
    Auth(AuthError),
    /// 503: the key is not cached and the store cannot be read.
    KeyStoreUnavailable,
    /// 429: a limit was hit; the body names it, its value and when it resets.
    RateLimited(Refusal),
    /// 400: the request's reservation alone exceeds a limit: retrying cannot help.
    ExceedsLimit(Refusal),
    /// In-band, after a 200 (the status only labels the usage row's error): the
    /// stream was ended before its completion passed a token or spend limit
    /// (`enforce_mid_stream`).
    LimitReachedMidStream(Refusal),
    /// 503: Redis cannot decide the limits and `redis.on_failure` is `deny`.
    RateLimiterUnavailable,
    /// 413: the body is larger than `max_body_bytes`.
    PayloadTooLarge(usize),
    /// 400: the body is empty.
    EmptyBody,
    /// 400: the body is not valid JSON (or not an object).
    InvalidJson(String),
    /// 400: no `model` field.
    MissingModel,
    /// 400: a field has the wrong type or value (`field`, `what`).
    InvalidField(&'static str, &'static str),
    /// 400: a query parameter of a gateway endpoint (`GET /v1/usage`) is unusable.
    InvalidParam(FieldError),
    /// 404: no configured provider offers this model.
    ModelNotFound(String),
    /// 403: the key may not use this model.
    ModelNotAllowed(String),
    /// 404: unknown path.
    NotFound,
    /// 405: known path, wrong method.
    MethodNotAllowed,
    /// 502: the provider could not be reached, or broke the protocol.
    UpstreamUnreachable,
    /// 504: the provider did not answer in time.
    UpstreamTimeout,
    /// 503: the store cannot answer a gateway endpoint (`GET /v1/usage`).
    StoreUnavailable,
    /// 500: a bug; the message is generic on purpose.
    Internal,
}

fn clip(s: &str) -> &str {
    // Echoed client input stays short; cut on a char boundary.
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A refusal's amount in its unit: requests and tokens as counts, spend in USD.
fn amount(r: &Refusal, v: u64) -> String {
    match r.hit.meter() {
        Meter::Spend => format!(
            "{} USD",
            crate::usage::format_usd(i128::from(v).saturating_mul(1_000))
        ),
        Meter::Requests | Meter::Tokens => v.to_string(),
    }
}

impl ProxyError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Auth(_) => 401,
            ProxyError::KeyStoreUnavailable => 503,
            ProxyError::RateLimited(_) | ProxyError::LimitReachedMidStream(_) => 429,
            ProxyError::ExceedsLimit(_) => 400,
            ProxyError::RateLimiterUnavailable | ProxyError::StoreUnavailable => 503,
            ProxyError::PayloadTooLarge(_) => 413,
            ProxyError::EmptyBody
            | ProxyError::InvalidJson(_)
            | ProxyError::MissingModel
            | ProxyError::InvalidField(..)
            | ProxyError::InvalidParam(_) => 400,
            ProxyError::ModelNotFound(_) | ProxyError::NotFound => 404,
            ProxyError::ModelNotAllowed(_) => 403,
            ProxyError::MethodNotAllowed => 405,
            ProxyError::UpstreamUnreachable => 502,
            ProxyError::UpstreamTimeout => 504,
            ProxyError::Internal => 500,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            ProxyError::RateLimited(r) | ProxyError::LimitReachedMidStream(r) => {
                match r.hit.meter() {
                    Meter::Requests => "requests",
                    Meter::Tokens => "tokens",
                    Meter::Spend => "spend",
                }
            }
            ProxyError::KeyStoreUnavailable
            | ProxyError::RateLimiterUnavailable
            | ProxyError::StoreUnavailable
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout
            | ProxyError::Internal => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code` (also the usage row's `error` and a metric label).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Auth(AuthError::Missing) => "missing_api_key",
            ProxyError::Auth(AuthError::Revoked) => "revoked_api_key",
            ProxyError::Auth(AuthError::Expired) => "expired_api_key",
            ProxyError::Auth(_) => "invalid_api_key",
            ProxyError::KeyStoreUnavailable => "key_store_unavailable",
            ProxyError::RateLimited(_) | ProxyError::LimitReachedMidStream(_) => {
                "rate_limit_exceeded"
            }
            ProxyError::ExceedsLimit(_) => "request_exceeds_limit",
            ProxyError::RateLimiterUnavailable => "rate_limiter_unavailable",
            ProxyError::PayloadTooLarge(_) => "request_too_large",
            ProxyError::EmptyBody => "empty_body",
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::MissingModel => "missing_model",
            ProxyError::InvalidField(..) => "invalid_field",
            ProxyError::InvalidParam(_) => "invalid_parameter",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::ModelNotFound(_) => "model_not_found",
            ProxyError::ModelNotAllowed(_) => "model_not_allowed",
            ProxyError::NotFound => "not_found",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::Internal => "internal_error",
        }
    }

    /// The offending request field, when there is one (OpenAI's `error.param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            ProxyError::MissingModel
            | ProxyError::ModelNotFound(_)
            | ProxyError::ModelNotAllowed(_) => Some("model"),
            ProxyError::InvalidField(f, _) => Some(f),
            ProxyError::InvalidParam(e) => Some(clip(&e.field)),
            _ => None,
        }
    }

    /// A sentence saying exactly what is wrong.
    pub fn message(&self) -> String {
        match self {
            ProxyError::Auth(AuthError::Missing) => "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
            ProxyError::Auth(AuthError::Malformed(e)) => format!("Incorrect API key provided: {e}."),
            ProxyError::Auth(AuthError::Unknown) | ProxyError::Auth(AuthError::Unavailable) => "Incorrect API key provided.".into(),
            ProxyError::Auth(AuthError::Revoked) => "This API key has been revoked.".into(),
            ProxyError::Auth(AuthError::Expired) => "This API key has expired.".into(),
            ProxyError::KeyStoreUnavailable => "The key store is unavailable; please retry.".into(),
            ProxyError::RateLimited(r) if r.hit == Hit::Concurrency => format!("Rate limit reached for max_concurrent: limit {}, in flight {}. Retry when a request of this key has finished (retry-after).", r.value, r.used),
            ProxyError::RateLimited(r) => format!(
                "Rate limit reached for {}: limit {}, used {}, requested {}. It resets in {}; retry after the time given in the retry-after header.",
                r.hit.name(),
                amount(r, r.value),
                amount(r, r.used),
                amount(r, r.requested),
                crate::limits::format_reset(r.reset),
            ),
            ProxyError::LimitReachedMidStream(r) => format!(
                "Rate limit reached for {}: limit {}. The response was ended here, before it passed the limit; the limit resets in {}.",
                r.hit.name(),
                amount(r, r.value),
                crate::limits::format_reset(r.reset),
            ),
            ProxyError::ExceedsLimit(r) => format!(
                "Request too large for {}: it needs {} but the limit is {}, so it can never be admitted. Lower max_tokens (or max_completion_tokens) or shorten the prompt.",
                r.hit.name(),
                amount(r, r.requested),
                amount(r, r.value),
            ),
            ProxyError::RateLimiterUnavailable => "The rate limiter is unavailable, so this request cannot be admitted; please retry.".into(),
            ProxyError::PayloadTooLarge(max) => format!("Request body too large: the limit is {max} bytes."),
            ProxyError::EmptyBody => "The request body is empty; a JSON object is required.".into(),
            ProxyError::InvalidJson(e) => format!("We could not parse the JSON body of your request: {}.", clip(e)),
            ProxyError::MissingModel => "You must provide a model parameter.".into(),
            ProxyError::InvalidField(f, what) => format!("Invalid value for '{f}': {what}."),
            ProxyError::InvalidParam(e) => format!("Invalid query parameter '{}': {}.", clip(&e.field), clip(&e.message)),
            ProxyError::StoreUnavailable => "The usage store is unavailable; please retry.".into(),
            ProxyError::ModelNotFound(m) => format!("The model `{}` does not exist or you do not have access to it.", clip(m)),
            ProxyError::ModelNotAllowed(m) => format!("This API key is not allowed to use the model `{}`.", clip(m)),
            ProxyError::NotFound => "Unknown request URL. Supported: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models, GET /v1/usage.".into(),
            ProxyError::MethodNotAllowed => "Method not allowed for this URL.".into(),
            ProxyError::UpstreamUnreachable => "The upstream provider could not be reached.".into(),
            ProxyError::UpstreamTimeout => "The upstream provider did not respond in time.".into(),
            ProxyError::Internal => "The gateway had an internal error.".into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.message(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// The same error as one SSE event, for failures after a stream has started.
    pub fn sse_event(&self) -> Bytes {
        let mut v = b"data: ".to_vec();
        v.extend_from_slice(&self.body());
        v.extend_from_slice(b"\n\n");
        Bytes::from(v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = ProxyError::ModelNotFound("x\"y".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("x\"y"));
        assert_eq!(e.status(), 404);
        let long = "é".repeat(500);
        let m = ProxyError::ModelNotFound(long).message();
        assert!(m.len() < 300);
    }

    #[test]
    fn rate_limiter_unavailable_is_a_503_api_error() {
        let e = ProxyError::RateLimiterUnavailable;
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 503);
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["code"], "rate_limiter_unavailable");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limiter is unavailable"));
    }

    #[test]
    fn invalid_params_name_the_param_and_store_outages_are_503() {
        let e = ProxyError::InvalidParam(FieldError::new(
            "group_by",
            "\"week\" is not one of day, model",
        ));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 400);
        assert_eq!(v["error"]["param"], "group_by");
        assert_eq!(v["error"]["code"], "invalid_parameter");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("week"));
        let e = ProxyError::StoreUnavailable;
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 503);
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
    }

    #[test]
    fn limit_refusals_name_the_limit_its_value_and_reset() {
        use crate::limits::policy::Limit;
        use std::time::Duration;
        let r = Refusal {
            hit: Hit::Limit(Limit::TokensPerMinute),
            value: 1_000,
            used: 900,
            requested: 150,
            reset: Duration::from_secs(42),
        };
        let e = ProxyError::RateLimited(r);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 429);
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "tokens");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("tokens_per_minute: limit 1000, used 900, requested 150"),
            "{m}"
        );
        assert!(m.contains("resets in 42s"), "{m}");
        let spend = Refusal {
            hit: Hit::Limit(Limit::SpendPerMonth),
            value: 5_000_000_000,
            used: 4_999_955_000,
            requested: 45_000,
            reset: Duration::from_secs(360),
        };
        let m = ProxyError::RateLimited(spend).message();
        assert!(
            m.contains(
                "spend_usd_per_month: limit 5 USD, used 4.999955 USD, requested 0.000045 USD"
            ),
            "{m}"
        );
        assert!(m.contains("6m0s"), "{m}");
        let big = ProxyError::ExceedsLimit(r);
        assert_eq!(big.status(), 400);
        assert_eq!(big.code(), "request_exceeds_limit");
        assert!(big.message().contains("needs 150 but the limit is 1000"));
        let cc = ProxyError::RateLimited(Refusal {
            hit: Hit::Concurrency,
            value: 2,
            used: 2,
            requested: 1,
            reset: Duration::from_secs(1),
        });
        assert!(cc.message().contains("max_concurrent: limit 2"));
    }

    #[test]
    fn a_mid_stream_cut_speaks_the_429_vocabulary() {
        use crate::limits::policy::Limit;
        let r = Refusal {
            hit: Hit::Limit(Limit::TokensPerMinute),
            value: 300,
            used: 0,
            requested: 0,
            reset: std::time::Duration::from_secs(42),
        };
        let e = ProxyError::LimitReachedMidStream(r);
        let ev = e.sse_event();
        let v: serde_json::Value = serde_json::from_slice(&ev[6..ev.len() - 2]).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "tokens");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("tokens_per_minute: limit 300"), "{m}");
        assert!(m.contains("resets in 42s"), "{m}");
        let spend = ProxyError::LimitReachedMidStream(Refusal {
            hit: Hit::Limit(Limit::SpendPerDay),
            value: 1_500_000,
            ..r
        });
        assert_eq!(spend.error_type(), "spend");
        assert!(
            spend
                .message()
                .contains("spend_usd_per_day: limit 0.0015 USD"),
            "{}",
            spend.message()
        );
    }

    #[test]
    fn sse_event_is_one_event() {
        let ev = ProxyError::UpstreamUnreachable.sse_event();
        assert!(ev.starts_with(b"data: {"));
        assert!(ev.ends_with(b"}\n\n"));
    }
}
