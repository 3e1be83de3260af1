//! ai4free: an OpenAI-compatible LLM API gateway built on Cloudflare's Pingora.
//!
//! The crate is a library first so that the binary, the integration tests and the
//! benchmarks all drive the same code. Module map (see ARCHITECTURE.md):
//!
//! - [`admin`]: key and usage-report views shared by the admin API, self-service and CLI.
//! - [`config`]: YAML → validated, typed [`config::Config`], every error with its path.
//! - [`keys`]: API key format, hashing and the in-memory validation cache.
//! - [`limits`]: tier limits and the local (pingora-limits) limiter.
//! - [`tokens`]: SSE parsing, usage extraction and token counting (pure, no IO).
//! - `json_scan`: the direct reader for the few JSON fields the request path reads
//!   (serde decides everything else).
//! - [`usage`]: usage records and the bounded, batching writer.
//! - [`store`]: persistence behind one trait (embedded SQLite, or PostgreSQL for several nodes).
//! - [`metrics`]: every Prometheus metric the gateway exports.
//! - [`proxy`]: the Pingora `ProxyHttp` glue that ties the above together.
//! - [`mock`]: an OpenAI-compatible mock provider for tests, benchmarks and the quick start.

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub(crate) mod json_scan;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod server;
pub mod store;
pub mod tokens;
pub mod usage;
