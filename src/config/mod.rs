//! Configuration: the YAML file parsed ONCE into validated, typed [`Config`].
//!
//! This module owns the public configuration types, error reporting and the
//! model-name index. The YAML is first parsed into an untyped
//! [`serde_yaml_ng::Value`] tree (a syntax error is a single error carrying the
//! line and column), then walked by a small hand-written validating reader
//! (`reader`/`parse`) that records every problem together with the path of the
//! offending key and keeps going. We deliberately do not use serde derive on
//! these types: derive stops at the first error, and operators fixing a config
//! file deserve the whole list at once.

mod parse;
mod reader;
mod values;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The tokenizer a model counts with; config names it as in `tokenizer: o200k_base`.
pub use crate::tokens::count::Tokenizer;

/// The whole, validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the proxy listens on (`listen`, default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Prometheus endpoint address (`metrics_listen`, default `127.0.0.1:9091`);
    /// `None` when explicitly set to `"off"`.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin API's listener and tokens (`admin_listen`, `admin_token_env`,
    /// `admin_readonly_token_env`).
    pub admin: AdminSettings,
    /// Where keys and usage are persisted (`storage`, default `sqlite://data/ai4free.db`).
    pub storage: Storage,
    /// Largest accepted request body in bytes (`max_body_bytes`, default 8 MiB).
    pub max_body_bytes: usize,
    /// Upstream providers in config order (the order decides bare-name model resolution).
    pub providers: Vec<Provider>,
    /// Tiers by name.
    pub tiers: BTreeMap<String, Tier>,
    /// Upstream timeouts (`upstream`).
    pub upstream: UpstreamTimeouts,
    /// Pingora server settings (`server`).
    pub server: ServerSettings,
    /// Usage-recording queue settings (`usage`).
    pub usage: UsageSettings,
    /// API key cache settings (`keys`).
    pub keys: KeySettings,
    /// Cluster-wide limits in Redis (`redis`); `None` = single-node local limits.
    pub redis: Option<RedisSettings>,
    /// Capabilities switched off for benchmark ablations (`bench_ablate`).
    pub ablate: Ablations,
    /// Built once at load so request-path lookups are a hash probe.
    index: ModelIndex,
}

/// Private lookup tables for [`Config::resolve_model`], built once at load.
#[derive(Debug, Clone, Default)]
struct ModelIndex {
    /// Provider name → provider index.
    providers: HashMap<String, usize>,
    /// Per provider: model name → model index.
    models: Vec<HashMap<String, usize>>,
    /// Bare model name → first (provider, model) offering it, in config order.
    bare: HashMap<String, (usize, usize)>,
}

/// Where the admin API listens and where its bearer tokens come from. The tokens
/// themselves are never in the config file: they are read from the environment at
/// start-up (see `admin::api::AdminTokens::from_env`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// `admin_listen` (default `127.0.0.1:8081`, loopback); `None` when set to `"off"`.
    pub listen: Option<SocketAddr>,
    /// `admin_token_env` (default `AI4FREE_ADMIN_TOKEN`): the variable holding the
    /// read-write token. Unset or empty: the admin listener is not started.
    pub token_env: String,
    /// `admin_readonly_token_env` (default `AI4FREE_ADMIN_READONLY_TOKEN`): the
    /// variable holding a token that may only read. Unset or empty: no such token.
    pub readonly_token_env: String,
}

/// Persistence backend selected by the `storage` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum Storage {
    /// `sqlite://<path>` (relative or absolute) or `sqlite::memory:` (path `:memory:`).
    Sqlite {
        /// Database file path, or `:memory:`.
        path: PathBuf,
    },
    /// `postgres://...` or `postgresql://...`, passed through verbatim.
    Postgres {
        /// The connection URL (may contain a password; Debug redacts it).
        url: String,
    },
}

// Manual Debug because a Postgres URL may carry a password and Config gets logged.
impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            Storage::Postgres { url } => f
                .debug_struct("Postgres")
                .field("url", &values::redact_url_password(url))
                .finish(),
        }
    }
}

/// One upstream OpenAI-compatible provider.
#[derive(Clone, PartialEq, Eq)]
pub struct Provider {
    /// Unique name matching `[a-z0-9_-]+` (so it can never contain `/`).
    pub name: String,
    /// Where requests are sent.
    pub base_url: BaseUrl,
    /// Name of the environment variable holding the provider key, if any.
    pub api_key_env: Option<String>,
    /// Whether to ask the provider for usage in streams (`stream_options.include_usage`).
    pub stream_usage: bool,
    /// Extra static request headers; names lowercased, validated as HTTP.
    pub headers: Vec<(String, String)>,
    /// Models offered, at least one, names unique within the provider.
    pub models: Vec<Model>,
}

// Manual Debug: header values are operator-supplied and might hold a token
// despite the advice to use `api_key_env`, so only their names are printed.
impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("stream_usage", &self.stream_usage)
            .field("headers", &header_names)
            .field("models", &self.models)
            .finish()
    }
}

/// A validated `http`/`https` base URL without userinfo, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BaseUrl {
    /// `true` for `https`.
    pub tls: bool,
    /// Lowercased host name or IP literal; IPv6 literals are stored WITHOUT
    /// brackets (`::1`) so they can be used directly for SNI/resolution.
    pub host: String,
    /// Explicit port or the scheme default (80/443).
    pub port: u16,
    /// Path prefix without trailing slash: `""` or e.g. `"/v1"`.
    pub path_prefix: String,
}

impl BaseUrl {
    /// Parses and validates a base URL; the error is a human-readable reason.
    pub fn parse(text: &str) -> Result<BaseUrl, String> {
        values::parse_base_url(text)
    }

    /// The value for the `Host` header: `host`, or `host:port` when the port is
    /// not the scheme default. IPv6 literals are bracketed.
    pub fn authority(&self) -> String {
        if self.port == self.default_port() {
            self.bracketed_host()
        } else {
            format!("{}:{}", self.bracketed_host(), self.port)
        }
    }

    /// Always `host:port` (IPv6 bracketed), the form socket-address APIs take.
    pub fn host_and_port(&self) -> String {
        format!("{}:{}", self.bracketed_host(), self.port)
    }

    fn default_port(&self) -> u16 {
        if self.tls {
            443
        } else {
            80
        }
    }

    fn bracketed_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for BaseUrl {
    /// The canonical URL, e.g. `https://api.openai.com/v1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path_prefix)
    }
}

/// One model offered by a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// The name clients send (may contain `/`, e.g. `meta-llama/Llama-3-8B`).
    pub name: String,
    /// The name sent upstream when the provider calls it differently.
    pub upstream_name: Option<String>,
    /// Tokenizer used to estimate counts when the provider reports no usage.
    pub tokenizer: Tokenizer,
    /// `input_price_per_mtok`, default 0.
    pub input_price: Price,
    /// `output_price_per_mtok`, default 0.
    pub output_price: Price,
    /// `cached_input_price_per_mtok`, if the provider bills cached input differently.
    pub cached_input_price: Option<Price>,
}

impl Model {
    /// The model name to send upstream.
    pub fn upstream_model(&self) -> &str {
        self.upstream_name.as_deref().unwrap_or(&self.name)
    }
}

/// Exact price: integer micro-USD per million tokens (so 0.15 $/Mtok = 150_000).
///
/// Parsed from the YAML number's decimal text, never through f64 arithmetic;
/// more than 6 decimal places or a negative value is an error. Because one
/// micro-USD per million tokens is one pico-USD per token, the cost of `n`
/// tokens in pico-USD is exactly `n * micros_per_mtok`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price {
    /// Micro-USD per million tokens.
    pub micros_per_mtok: u64,
}

impl Price {
    /// Exact cost of `tokens` tokens in pico-USD (u128 so it cannot overflow).
    pub fn cost_pico_usd(self, tokens: u64) -> u128 {
        u128::from(tokens) * u128::from(self.micros_per_mtok)
    }
}

impl fmt::Display for Price {
    /// USD per million tokens as an exact decimal, e.g. `0.15`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&values::format_micros(self.micros_per_mtok))
    }
}

/// An exact USD amount in micro-USD (6 decimal places), e.g. spend limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsdAmount {
    /// Micro-USD.
    pub micros: u64,
}

impl std::str::FromStr for UsdAmount {
    type Err = String;

    /// A non-negative decimal of USD (`2.5`, `0.000150`), exact to the micro-USD.
    fn from_str(text: &str) -> Result<UsdAmount, String> {
        values::parse_micros(text).map(|micros| UsdAmount { micros })
    }
}

impl fmt::Display for UsdAmount {
    /// USD as an exact decimal, e.g. `2.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&values::format_micros(self.micros))
    }
}

/// A named bundle of limits. Every limit is optional (absent = unlimited) and,
/// when present, positive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tier {
    /// The tier's key under `tiers`.
    pub name: String,
    /// `requests_per_second`.
    pub requests_per_second: Option<u32>,
    /// `requests_per_minute`.
    pub requests_per_minute: Option<u32>,
    /// `requests_per_hour`.
    pub requests_per_hour: Option<u32>,
    /// `requests_per_day`.
    pub requests_per_day: Option<u32>,
    /// `tokens_per_minute`.
    pub tokens_per_minute: Option<u64>,
    /// `tokens_per_day`.
    pub tokens_per_day: Option<u64>,
    /// `max_concurrent` in-flight requests per key.
    pub max_concurrent: Option<u32>,
    /// `default_max_tokens` applied when the request sets none.
    pub default_max_tokens: Option<u32>,
    /// `spend_usd_per_day`.
    pub spend_usd_per_day: Option<UsdAmount>,
    /// `spend_usd_per_month`.
    pub spend_usd_per_month: Option<UsdAmount>,
    /// `enforce_mid_stream` (default false): end a stream, with an in-band error
    /// event, before its completion passes a token or spend limit instead of
    /// letting it finish over the limit. Tier-only: keys have no override for it.
    pub enforce_mid_stream: bool,
}

/// Upstream timeouts (`upstream.*_timeout_ms`), all non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// TCP/TLS connect timeout (default 3 s).
    pub connect: Duration,
    /// Time to the first response byte (default 120 s; models can think long).
    pub first_byte: Duration,
    /// Maximum silence between body chunks (default 60 s).
    pub idle: Duration,
}

/// Pingora server settings (`server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// Worker threads, 1..=256 (default 2).
    pub threads: usize,
    /// Seconds to keep accepting after a shutdown signal (default 10).
    pub grace_period_seconds: u64,
    /// Seconds to let in-flight requests finish (default 5).
    pub graceful_shutdown_timeout_seconds: u64,
    /// Idle upstream connections kept for reuse (default 256).
    pub upstream_keepalive_pool_size: usize,
}

/// Usage-recording queue settings (`usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    /// Bounded queue capacity (default 65536).
    pub queue_capacity: usize,
    /// Records per write batch (default 512), at most `queue_capacity`.
    pub batch_size: usize,
    /// Flush at least this often (default 200 ms).
    pub flush_interval: Duration,
    /// Where rows the store cannot take wait on disk (`spool_dir`); `None` means the
    /// default, see [`Config::spool_dir`].
    pub spool_dir: Option<PathBuf>,
    /// The spool's bound in bytes (default 1 GiB); past it rows are dropped and counted.
    pub spool_max_bytes: u64,
    /// The spool is `fsync`ed at most this often (default 200 ms, 0 = every batch).
    pub spool_fsync_interval: Duration,
    /// The writer threads' nice value, 0..=19 (default 10; Linux only): the
    /// proxy threads preempt the writer's bursts instead of queueing behind them.
    pub writer_nice: u8,
}

/// API key cache settings (`keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySettings {
    /// How often the key cache is refreshed from storage, 10..=1000 ms (so a
    /// revocation applies within a second).
    pub refresh_interval: Duration,
    /// How long an unknown key is remembered as unknown, 0..=60000 ms.
    pub negative_cache: Duration,
    /// How often uses noted in memory are written to `last_used_at`, 10 ms..=1 h
    /// (default 30 s): one store call per interval, never one per request.
    pub last_used_flush_interval: Duration,
}

/// Cluster-wide limits in Redis (`redis`), shared by every gateway node.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL (may contain a password; Debug redacts it).
    pub url: String,
    /// The longest a request waits for Redis, 1..=5000 ms (default 20 ms).
    pub timeout: Duration,
    /// What the limiter does while Redis cannot answer (default `local_share`).
    pub on_failure: OnFailure,
    /// How many gateway nodes share the limits, at least 1 (default 1); `local_share`
    /// gives each node `ceil(limit / nodes)`.
    pub nodes: u32,
    /// Lifetime of a `max_concurrent` slot's lease unless its node renews it
    /// (`lease_ttl_ms`, default [`DEFAULT_LEASE_TTL_MS`], 300..=3,600,000 ms): a node
    /// that dies frees its slots within this time.
    pub lease_ttl: Duration,
}

/// Default `redis.lease_ttl_ms`.
pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;

/// The completion reserved for a request that names no `max_tokens` /
/// `max_completion_tokens`, when its tier has a token or spend limit but no
/// `default_max_tokens` of its own.
pub const DEFAULT_MAX_TOKENS: u32 = 4_096;

// Manual Debug because the URL may carry a password and Config gets logged.
impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &values::redact_url_password(&self.url))
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("nodes", &self.nodes)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// The limiter's behaviour while Redis is unavailable (`redis.on_failure`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Each node enforces `ceil(limit / nodes)` (at least 1) with its local estimator.
    #[default]
    LocalShare,
    /// Admit every request (fail open).
    Allow,
    /// Refuse every limited request with 503 (fail closed).
    Deny,
}

impl OnFailure {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::LocalShare => "local_share",
            OnFailure::Allow => "allow",
            OnFailure::Deny => "deny",
        }
    }
}

/// Every problem found in a configuration, in document order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// One configuration problem and the path of the offending key
/// (e.g. `providers[1].models[0].name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path; empty for file-level errors (I/O, YAML syntax).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `path: message`, or just `message` when the path is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Capabilities a benchmark may switch off one at a time to measure their cost
/// (`bench_ablate: [auth, limits, usage, counting, metrics]`). Never for production:
/// `serve` logs a warning for each one that is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ablations {
    /// No key check: every request runs as one synthetic key of the first tier.
    pub auth: bool,
    /// No limit check.
    pub limits: bool,
    /// No usage row.
    pub usage: bool,
    /// No response accounting (no SSE parsing, no JSON buffering, no counting).
    pub counting: bool,
    /// No metric updates on the request path.
    pub metrics: bool,
}

impl Ablations {
    /// The names of the capabilities that are off.
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("auth", self.auth),
            ("limits", self.limits),
            ("usage", self.usage),
            ("counting", self.counting),
            ("metrics", self.metrics),
        ]
        .into_iter()
        .filter_map(|(n, off)| off.then_some(n))
        .collect()
    }
}

impl Config {
    /// Limits the config contract accepts but this build does not enforce yet, one
    /// error per use with its path. `serve` and `check-config` refuse a config that
    /// has any: an operator must never believe a budget is enforced when it is not.
    /// Every limit is enforced now (`enforce_mid_stream` included), so this is
    /// empty; it stays the one place a future limit lands before it is enforced.
    pub fn unenforced_limits(&self) -> Vec<ConfigError> {
        Vec::new()
    }

    /// Parses and validates a YAML document, reporting every error found.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
        parse::parse_config(text)
    }

    /// Reads `path` and parses it; file-level errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("{shown}: cannot read config file: {e}"),
            }])
        })?;
        Config::from_yaml_str(&text).map_err(|ConfigErrors(errors)| {
            // Syntax errors carry no key path, so give them the file name instead.
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| {
                        if e.path.is_empty() {
                            ConfigError {
                                path: String::new(),
                                message: format!("{shown}: {}", e.message),
                            }
                        } else {
                            e
                        }
                    })
                    .collect(),
            )
        })
    }

    /// Resolves a requested model name to `(provider index, model index)`.
    ///
    /// `"provider/model"` selects explicitly: the string is split at the FIRST
    /// `/` and only treated as explicit when the prefix is a provider name.
    /// Otherwise (or when that provider lacks the model) the whole string is a
    /// model name, since model names may contain `/` themselves
    /// (`meta-llama/Llama-3-8B`), and the first provider in config order
    /// offering it wins.
    pub fn resolve_model(&self, requested: &str) -> Option<(usize, usize)> {
        if let Some((prefix, rest)) = requested.split_once('/') {
            if let Some(&p) = self.index.providers.get(prefix) {
                if let Some(&m) = self.index.models.get(p).and_then(|ms| ms.get(rest)) {
                    return Some((p, m));
                }
            }
        }
        self.index.bare.get(requested).copied()
    }

    /// The usage spool directory: `usage.spool_dir` if set, else `<db file>.spool`
    /// beside the SQLite file (named after the file, so gateways with different
    /// databases in one directory never contend for one spool), else `data/spool`
    /// (PostgreSQL, or an in-memory SQLite).
    pub fn spool_dir(&self) -> PathBuf {
        if let Some(d) = &self.usage.spool_dir {
            return d.clone();
        }
        match &self.storage {
            Storage::Sqlite { path } if path.as_os_str() != ":memory:" => {
                let mut dir = path.as_os_str().to_owned();
                dir.push(".spool");
                PathBuf::from(dir)
            }
            _ => PathBuf::from("data/spool"),
        }
    }

    /// The tier called `name`, if configured.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.get(name)
    }

    /// The provider called `name`, if configured.
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        let &i = self.index.providers.get(name)?;
        self.providers.get(i)
    }
}

impl ModelIndex {
    fn build(providers: &[Provider]) -> ModelIndex {
        let mut index = ModelIndex::default();
        for (p, provider) in providers.iter().enumerate() {
            index.providers.insert(provider.name.clone(), p);
            let mut models = HashMap::with_capacity(provider.models.len());
            for (m, model) in provider.models.iter().enumerate() {
                models.insert(model.name.clone(), m);
                // First provider in config order wins a bare name.
                index.bare.entry(model.name.clone()).or_insert((p, m));
            }
            index.models.push(models);
        }
        index
    }
}
