//! Builds a [`Config`] from the YAML tree: defaults, per-key validation and
//! cross-reference checks (unique names, related bounds).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_yaml_ng::Value;

use super::reader::{child, describe, item, Fields, Reader};
use super::{
    values, Ablations, AdminSettings, BaseUrl, Config, ConfigError, ConfigErrors, KeySettings,
    Model, ModelIndex, OnFailure, Price, Provider, RedisSettings, ServerSettings, Storage, Tier,
    Tokenizer, UpstreamTimeouts, UsageSettings, UsdAmount,
};

const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8080,
));
const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9091,
));
const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8081,
));
const DEFAULT_ADMIN_TOKEN_ENV: &str = "AI4FREE_ADMIN_TOKEN";
const DEFAULT_ADMIN_READONLY_TOKEN_ENV: &str = "AI4FREE_ADMIN_READONLY_TOKEN";
const DEFAULT_STORAGE: &str = "sqlite://data/ai4free.db";
const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
const MIN_MAX_BODY_BYTES: u64 = 1024;
/// Bodies are buffered for token counting, so cap them well below memory sizes.
const MAX_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;

const TOP_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "storage",
    "max_body_bytes",
    "providers",
    "tiers",
    "upstream",
    "server",
    "usage",
    "keys",
    "bench_ablate",
    "redis",
    "admin_listen",
    "admin_token_env",
    "admin_readonly_token_env",
];
const PROVIDER_KEYS: &[&str] = &[
    "name",
    "base_url",
    "api_key_env",
    "stream_usage",
    "headers",
    "models",
];
const MODEL_KEYS: &[&str] = &[
    "name",
    "upstream_name",
    "tokenizer",
    "input_price_per_mtok",
    "output_price_per_mtok",
    "cached_input_price_per_mtok",
];
const TIER_KEYS: &[&str] = &[
    "requests_per_second",
    "requests_per_minute",
    "requests_per_hour",
    "requests_per_day",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
    "default_max_tokens",
    "spend_usd_per_day",
    "spend_usd_per_month",
    "enforce_mid_stream",
];
const UPSTREAM_KEYS: &[&str] = &[
    "connect_timeout_ms",
    "first_byte_timeout_ms",
    "idle_timeout_ms",
];
const SERVER_KEYS: &[&str] = &[
    "threads",
    "grace_period_seconds",
    "graceful_shutdown_timeout_seconds",
    "upstream_keepalive_pool_size",
];
const USAGE_KEYS: &[&str] = &[
    "queue_capacity",
    "batch_size",
    "flush_interval_ms",
    "spool_dir",
    "spool_max_bytes",
    "spool_fsync_interval_ms",
    "writer_nice",
];
const KEYS_KEYS: &[&str] = &[
    "refresh_interval_ms",
    "negative_cache_ms",
    "last_used_flush_interval_ms",
];
const REDIS_KEYS: &[&str] = &["url", "timeout_ms", "on_failure", "nodes", "lease_ttl_ms"];

/// Upper bound for millisecond settings (one day): larger is surely a unit mistake.
const MAX_MS: u64 = 24 * 60 * 60 * 1000;
const U32_MAX: u64 = u32::MAX as u64;

/// Parses YAML text into a validated config, collecting every error.
pub(super) fn parse_config(text: &str) -> Result<Config, ConfigErrors> {
    let mut root: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = match e.location() {
            // serde_yaml_ng's message usually names the position already; make
            // sure it is always there, in the same words.
            Some(loc) if !e.to_string().contains("line ") => {
                format!(" at line {} column {}", loc.line(), loc.column())
            }
            _ => String::new(),
        };
        single(format!("invalid YAML: {e}{at}"))
    })?;
    // `<<: *anchor` merge keys let tiers/providers share settings.
    root.apply_merge()
        .map_err(|e| single(format!("invalid YAML merge key (<<): {e}")))?;

    let mut r = Reader::default();
    let config = read_root(&mut r, &root);
    match config {
        Some(config) if r.errors.is_empty() => Ok(config),
        _ if !r.errors.is_empty() => Err(ConfigErrors(r.errors)),
        // Every reader records an error before giving up, so this is unreachable;
        // still, never return a half-built config.
        _ => Err(single(
            "internal error: configuration incomplete".to_owned(),
        )),
    }
}

fn single(message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        path: String::new(),
        message,
    }])
}

fn read_root(r: &mut Reader, root: &Value) -> Option<Config> {
    if !matches!(root, Value::Mapping(_) | Value::Null) {
        r.error(
            "",
            format!("expected a map at the top level, got {}", describe(root)),
        );
        return None;
    }
    let f = r.fields("", root, TOP_KEYS)?;

    let listen = match f.get("listen") {
        None => DEFAULT_LISTEN,
        Some(v) => socket_addr(r, &f.path("listen"), v, "").unwrap_or(DEFAULT_LISTEN),
    };
    let metrics_listen = match f.get("metrics_listen") {
        None => Some(DEFAULT_METRICS_LISTEN),
        Some(Value::String(s)) if s == "off" => None,
        Some(v) => socket_addr(r, &f.path("metrics_listen"), v, " or \"off\"")
            .or(Some(DEFAULT_METRICS_LISTEN)),
    };
    let admin_listen = match f.get("admin_listen") {
        None => Some(DEFAULT_ADMIN_LISTEN),
        Some(Value::String(s)) if s == "off" => None,
        Some(v) => {
            socket_addr(r, &f.path("admin_listen"), v, " or \"off\"").or(Some(DEFAULT_ADMIN_LISTEN))
        }
    };
    let admin_token_env = env_name_or(r, &f, "admin_token_env", DEFAULT_ADMIN_TOKEN_ENV);
    let admin_readonly_token_env = env_name_or(
        r,
        &f,
        "admin_readonly_token_env",
        DEFAULT_ADMIN_READONLY_TOKEN_ENV,
    );
    if admin_token_env == admin_readonly_token_env {
        r.error(
            &f.path("admin_readonly_token_env"),
            "must name a different variable than admin_token_env",
        );
    }
    let storage = read_storage(r, &f);
    let max_body_bytes = r.uint_or(
        &f,
        "max_body_bytes",
        DEFAULT_MAX_BODY_BYTES,
        MIN_MAX_BODY_BYTES,
        MAX_MAX_BODY_BYTES,
    );
    let providers = read_providers(r, &f);
    let tiers = read_tiers(r, &f);
    let upstream = read_upstream(r, &f);
    let server = read_server(r, &f);
    let usage = read_usage(r, &f);
    let keys = read_keys(r, &f);
    let ablate = read_ablate(r, &f);
    let redis = read_redis(r, &f);

    let index = ModelIndex::build(&providers);
    Some(Config {
        listen,
        metrics_listen,
        admin: AdminSettings {
            listen: admin_listen,
            token_env: admin_token_env,
            readonly_token_env: admin_readonly_token_env,
        },
        storage,
        max_body_bytes: to_usize(max_body_bytes),
        providers,
        tiers,
        upstream,
        server,
        usage,
        keys,
        redis,
        ablate,
        index,
    })
}

fn read_ablate(r: &mut Reader, f: &Fields<'_>) -> Ablations {
    let mut a = Ablations::default();
    let Some(v) = f.get("bench_ablate") else {
        return a;
    };
    let path = f.path("bench_ablate");
    let Some(items) = r.list(&path, v) else {
        return a;
    };
    for (i, v) in items.iter().enumerate() {
        let p = item(&path, i);
        let Some(name) = r.string(&p, v) else {
            continue;
        };
        match name.as_str() {
            "auth" => a.auth = true,
            "limits" => a.limits = true,
            "usage" => a.usage = true,
            "counting" => a.counting = true,
            "metrics" => a.metrics = true,
            other => r.error(
                &p,
                format!("unknown capability {other:?} (expected one of: auth, limits, usage, counting, metrics)"),
            ),
        }
    }
    a
}

/// An environment variable name with a default.
fn env_name_or(r: &mut Reader, f: &Fields<'_>, key: &str, default: &str) -> String {
    match r.opt_string(f, key) {
        None => default.to_owned(),
        Some(n) => match values::check_env_var_name(&n) {
            Ok(()) => n,
            Err(e) => {
                r.error(&f.path(key), e);
                default.to_owned()
            }
        },
    }
}

/// Values are range-checked far below `usize::MAX` on 64-bit targets; saturate
/// rather than wrap on exotic ones.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An `IP:port` socket address; `alternatives` extends the hint in the error.
fn socket_addr(r: &mut Reader, path: &str, v: &Value, alternatives: &str) -> Option<SocketAddr> {
    let parsed = match v {
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    if parsed.is_none() {
        r.error(
            path,
            format!(
                "expected an IP:port address like \"127.0.0.1:8080\" or \"[::1]:8080\"{alternatives}, got {}",
                describe(v)
            ),
        );
    }
    parsed
}

fn read_storage(r: &mut Reader, f: &Fields<'_>) -> Storage {
    let default = Storage::Sqlite {
        path: DEFAULT_STORAGE
            .trim_start_matches("sqlite://")
            .to_owned()
            .into(),
    };
    let Some(v) = f.get("storage") else {
        return default;
    };
    let path = f.path("storage");
    let Some(text) = r.string(&path, v) else {
        return default;
    };
    values::parse_storage(&text).unwrap_or_else(|e| {
        r.error(&path, e);
        default
    })
}

fn read_providers(r: &mut Reader, f: &Fields<'_>) -> Vec<Provider> {
    read_named_list(
        r,
        f,
        NamedList {
            key: "providers",
            missing: "required key is missing (configure at least one provider)",
            empty: "at least one provider is required",
            duplicate: ("duplicate provider name", ""),
        },
        read_provider,
        |p| &p.name,
    )
}

/// What a required, non-empty list of uniquely named items says when it is wrong.
struct NamedList {
    key: &'static str,
    missing: &'static str,
    empty: &'static str,
    /// Message before and after the quoted duplicate name.
    duplicate: (&'static str, &'static str),
}

/// Reads a required list whose items have unique names, reporting every problem.
fn read_named_list<T>(
    r: &mut Reader,
    f: &Fields<'_>,
    what: NamedList,
    read_one: impl Fn(&mut Reader, &str, &Value) -> Option<T>,
    name_of: impl Fn(&T) -> &String,
) -> Vec<T> {
    let path = f.path(what.key);
    let Some(v) = f.get(what.key) else {
        r.error(&path, what.missing);
        return Vec::new();
    };
    let Some(items) = r.list(&path, v) else {
        return Vec::new();
    };
    if items.is_empty() {
        r.error(&path, what.empty);
    }
    let mut out = Vec::with_capacity(items.len());
    let mut seen: HashSet<String> = HashSet::new();
    for (i, v) in items.iter().enumerate() {
        let item_path = item(&path, i);
        if let Some(one) = read_one(r, &item_path, v) {
            let name = name_of(&one);
            if !seen.insert(name.clone()) {
                r.error(
                    &child(&item_path, "name"),
                    format!("{} {name:?}{}", what.duplicate.0, what.duplicate.1),
                );
            }
            out.push(one);
        }
    }
    out
}

fn read_provider(r: &mut Reader, path: &str, v: &Value) -> Option<Provider> {
    let f = r.fields(path, v, PROVIDER_KEYS)?;
    let name = r.req_string(&f, "name").and_then(|n| {
        values::check_simple_name(&n)
            .map_err(|e| r.error(&f.path("name"), e))
            .ok()
            .map(|()| n)
    });
    let base_url = r.req_string(&f, "base_url").and_then(|u| {
        BaseUrl::parse(&u)
            .map_err(|e| r.error(&f.path("base_url"), e))
            .ok()
    });
    let api_key_env = r.opt_string(&f, "api_key_env").and_then(|n| {
        // Presence in the environment is checked at serve time, not here, so a
        // config can be validated on a machine without the secrets.
        values::check_env_var_name(&n)
            .map_err(|e| r.error(&f.path("api_key_env"), e))
            .ok()
            .map(|()| n)
    });
    let stream_usage = r.bool_or(&f, "stream_usage", true);
    let headers = read_headers(r, &f);
    let models = read_models(r, &f);
    Some(Provider {
        name: name?,
        base_url: base_url?,
        api_key_env,
        stream_usage,
        headers,
        models,
    })
}

fn read_headers(r: &mut Reader, f: &Fields<'_>) -> Vec<(String, String)> {
    let Some(v) = f.get("headers") else {
        return Vec::new();
    };
    let path = f.path("headers");
    let Some(entries) = r.entries(&path, v) else {
        return Vec::new();
    };
    let mut headers: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        let h_path = child(&path, name);
        let lower = match values::check_header_name(name) {
            Ok(lower) => lower,
            Err(e) => {
                r.error(&h_path, e);
                continue;
            }
        };
        // YAML turns `x-version: 2` into a number; sending its text is clearly meant.
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                r.error(
                    &h_path,
                    format!("expected a string header value, got {}", describe(other)),
                );
                continue;
            }
        };
        if let Err(e) = values::check_header_value(&text) {
            r.error(&h_path, e);
            continue;
        }
        if headers.iter().any(|(n, _)| *n == lower) {
            r.error(
                &h_path,
                format!("duplicate header {lower:?} (names are case-insensitive)"),
            );
            continue;
        }
        headers.push((lower, text));
    }
    headers
}

fn read_models(r: &mut Reader, f: &Fields<'_>) -> Vec<Model> {
    read_named_list(
        r,
        f,
        NamedList {
            key: "models",
            missing: "required key is missing (list at least one model)",
            empty: "at least one model is required",
            duplicate: ("duplicate model name", " in this provider"),
        },
        read_model,
        |m| &m.name,
    )
}

fn read_model(r: &mut Reader, path: &str, v: &Value) -> Option<Model> {
    let f = r.fields(path, v, MODEL_KEYS)?;
    let name = r.req_string(&f, "name").and_then(|n| {
        values::check_model_name(&n)
            .map_err(|e| r.error(&f.path("name"), e))
            .ok()
            .map(|()| n)
    });
    let upstream_name = r.opt_string(&f, "upstream_name").and_then(|n| {
        values::check_model_name(&n)
            .map_err(|e| r.error(&f.path("upstream_name"), e))
            .ok()
            .map(|()| n)
    });
    let tokenizer = match r.opt_string(&f, "tokenizer").as_deref() {
        None => Tokenizer::O200kBase,
        Some(name) => Tokenizer::from_name(name).unwrap_or_else(|| {
            r.error(
                &f.path("tokenizer"),
                format!("expected one of: o200k_base, cl100k_base, got {name:?}"),
            );
            Tokenizer::O200kBase
        }),
    };
    let price =
        |r: &mut Reader, key: &str| r.opt_micros(&f, key).map(|m| Price { micros_per_mtok: m });
    let input_price = price(r, "input_price_per_mtok").unwrap_or_default();
    let output_price = price(r, "output_price_per_mtok").unwrap_or_default();
    let cached_input_price = price(r, "cached_input_price_per_mtok");
    Some(Model {
        name: name?,
        upstream_name,
        tokenizer,
        input_price,
        output_price,
        cached_input_price,
    })
}

fn read_tiers(r: &mut Reader, f: &Fields<'_>) -> BTreeMap<String, Tier> {
    let path = f.path("tiers");
    let mut tiers = BTreeMap::new();
    let Some(v) = f.get("tiers") else {
        r.error(
            &path,
            "required key is missing (configure at least one tier)",
        );
        return tiers;
    };
    let Some(entries) = r.entries(&path, v) else {
        return tiers;
    };
    if entries.is_empty() {
        r.error(&path, "at least one tier is required");
    }
    for (name, v) in entries {
        let t_path = child(&path, name);
        if let Err(e) = values::check_simple_name(name) {
            r.error(&t_path, format!("invalid tier name: {e}"));
        }
        if let Some(tier) = read_tier(r, &t_path, name, v) {
            tiers.insert(name.to_owned(), tier);
        }
    }
    tiers
}

fn read_tier(r: &mut Reader, path: &str, name: &str, v: &Value) -> Option<Tier> {
    let f = r.fields(path, v, TIER_KEYS)?;
    let u32_limit = |r: &mut Reader, key: &str| r.opt_uint(&f, key, 1, U32_MAX).map(to_u32);
    let u64_limit = |r: &mut Reader, key: &str| r.opt_uint(&f, key, 1, u64::MAX);
    let spend = |r: &mut Reader, key: &str| {
        let micros = r.opt_micros(&f, key)?;
        if micros == 0 {
            r.error(&f.path(key), "must be positive (omit the key for no limit)");
            return None;
        }
        Some(UsdAmount { micros })
    };
    Some(Tier {
        name: name.to_owned(),
        requests_per_second: u32_limit(r, "requests_per_second"),
        requests_per_minute: u32_limit(r, "requests_per_minute"),
        requests_per_hour: u32_limit(r, "requests_per_hour"),
        requests_per_day: u32_limit(r, "requests_per_day"),
        tokens_per_minute: u64_limit(r, "tokens_per_minute"),
        tokens_per_day: u64_limit(r, "tokens_per_day"),
        max_concurrent: u32_limit(r, "max_concurrent"),
        default_max_tokens: u32_limit(r, "default_max_tokens"),
        spend_usd_per_day: spend(r, "spend_usd_per_day"),
        spend_usd_per_month: spend(r, "spend_usd_per_month"),
        enforce_mid_stream: r.bool_or(&f, "enforce_mid_stream", false),
    })
}

/// Opens an optional settings section; absent reads as all defaults.
fn section<'v>(r: &mut Reader, f: &Fields<'v>, key: &str, allowed: &[&str]) -> Option<Fields<'v>> {
    let v = f.get(key)?;
    r.fields(&f.path(key), v, allowed)
}

fn ms_or(
    r: &mut Reader,
    f: Option<&Fields<'_>>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Duration {
    let ms = match f {
        Some(f) => r.uint_or(f, key, default, min, max),
        None => default,
    };
    Duration::from_millis(ms)
}

fn uint_or(
    r: &mut Reader,
    f: Option<&Fields<'_>>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> u64 {
    match f {
        Some(f) => r.uint_or(f, key, default, min, max),
        None => default,
    }
}

fn read_upstream(r: &mut Reader, f: &Fields<'_>) -> UpstreamTimeouts {
    let s = section(r, f, "upstream", UPSTREAM_KEYS);
    let s = s.as_ref();
    UpstreamTimeouts {
        connect: ms_or(r, s, "connect_timeout_ms", 3_000, 1, MAX_MS),
        first_byte: ms_or(r, s, "first_byte_timeout_ms", 120_000, 1, MAX_MS),
        idle: ms_or(r, s, "idle_timeout_ms", 60_000, 1, MAX_MS),
    }
}

fn read_server(r: &mut Reader, f: &Fields<'_>) -> ServerSettings {
    let s = section(r, f, "server", SERVER_KEYS);
    let s = s.as_ref();
    ServerSettings {
        threads: to_usize(uint_or(r, s, "threads", 2, 1, 256)),
        grace_period_seconds: uint_or(r, s, "grace_period_seconds", 10, 0, 86_400),
        graceful_shutdown_timeout_seconds: uint_or(
            r,
            s,
            "graceful_shutdown_timeout_seconds",
            5,
            0,
            86_400,
        ),
        upstream_keepalive_pool_size: to_usize(uint_or(
            r,
            s,
            "upstream_keepalive_pool_size",
            256,
            0,
            1_000_000,
        )),
    }
}

fn read_usage(r: &mut Reader, f: &Fields<'_>) -> UsageSettings {
    let s = section(r, f, "usage", USAGE_KEYS);
    let s = s.as_ref();
    let queue_capacity = uint_or(r, s, "queue_capacity", 65_536, 1, 16_777_216);
    let batch_size = uint_or(r, s, "batch_size", 512, 1, 1_000_000);
    if batch_size > queue_capacity {
        // A batch larger than the queue could never fill; almost surely a typo.
        r.error(
            "usage.batch_size",
            format!("must not exceed usage.queue_capacity ({queue_capacity}), got {batch_size}"),
        );
    }
    let spool_dir = s.and_then(|s| r.opt_string(s, "spool_dir"));
    if spool_dir.as_deref() == Some("") {
        r.error(
            "usage.spool_dir",
            "must not be empty (omit it for the default)",
        );
    }
    UsageSettings {
        queue_capacity: to_usize(queue_capacity),
        batch_size: to_usize(batch_size),
        flush_interval: ms_or(r, s, "flush_interval_ms", 200, 1, MAX_MS),
        spool_dir: spool_dir.filter(|d| !d.is_empty()).map(PathBuf::from),
        // At least a MiB so one batch always fits; at most a TiB (a unit mistake above).
        spool_max_bytes: uint_or(r, s, "spool_max_bytes", 1 << 30, 1 << 20, 1 << 40),
        spool_fsync_interval: ms_or(r, s, "spool_fsync_interval_ms", 200, 0, 60_000),
        // Nice values above 19 do not exist; 0 leaves the writer at the proxy's priority.
        writer_nice: u8::try_from(uint_or(r, s, "writer_nice", 10, 0, 19)).unwrap_or(10),
    }
}

fn read_keys(r: &mut Reader, f: &Fields<'_>) -> KeySettings {
    let s = section(r, f, "keys", KEYS_KEYS);
    let s = s.as_ref();
    KeySettings {
        // At most one second so a revoked key stops working within a second.
        refresh_interval: ms_or(r, s, "refresh_interval_ms", 250, 10, 1_000),
        // Long negative caching would delay newly created keys; a minute is plenty.
        negative_cache: ms_or(r, s, "negative_cache_ms", 1_000, 0, 60_000),
        // `last_used_at` is informational; an hour bounds how stale it can get.
        last_used_flush_interval: ms_or(r, s, "last_used_flush_interval_ms", 30_000, 10, 3_600_000),
    }
}

fn read_redis(r: &mut Reader, f: &Fields<'_>) -> Option<RedisSettings> {
    let s = section(r, f, "redis", REDIS_KEYS)?;
    let url = r.req_string(&s, "url").and_then(|u| {
        values::check_redis_url(&u)
            .map_err(|e| r.error(&s.path("url"), e))
            .ok()
            .map(|()| u)
    });
    // A request waits at most this long for Redis, so keep it well under any
    // client timeout; over 5 s is surely a unit mistake.
    let timeout = ms_or(r, Some(&s), "timeout_ms", 20, 1, 5_000);
    let on_failure = match r.opt_string(&s, "on_failure").as_deref() {
        None => OnFailure::default(),
        Some("local_share") => OnFailure::LocalShare,
        Some("allow") => OnFailure::Allow,
        Some("deny") => OnFailure::Deny,
        Some(other) => {
            r.error(
                &s.path("on_failure"),
                format!("expected one of: local_share, allow, deny, got {other:?}"),
            );
            OnFailure::default()
        }
    };
    let nodes = to_u32(r.uint_or(&s, "nodes", 1, 1, 10_000));
    // Renewed every third of it; a dead node's slots free within one TTL.
    let lease_ttl = ms_or(
        r,
        Some(&s),
        "lease_ttl_ms",
        super::DEFAULT_LEASE_TTL_MS,
        300,
        3_600_000,
    );
    Some(RedisSettings {
        url: url?,
        timeout,
        on_failure,
        nodes,
        lease_ttl,
    })
}
