//! Builds and runs the Pingora server from a validated [`Config`].
//!
//! [`App::init`] does the IO that must succeed before listening (open and migrate
//! the store, load keys, resolve providers, load the tokenizers the config will
//! count with); [`serve`] wires the
//! proxy, the metrics endpoint, the admin API and the background services into one Pingora
//! `Server`, runs it until a shutdown signal, and then flushes usage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::config::Config;
use crate::keys::cache::{KeyCache, KeyRefresher, UseFlusher};
use crate::limits::{self, Limiter};
use crate::proxy::{Gateway, Upstream};
use crate::store::{self, Store, StoreError};
use crate::usage::writer::WriterStats;
use crate::usage::UsageWriter;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Upstream(String),
    #[error("tokenizer {0} could not be loaded")]
    Tokenizer(&'static str),
    #[error("cannot start the usage writer: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start the usage writer: {0}")]
    Spool(#[from] crate::usage::spool::SpoolError),
    #[error("rate limiter: {0}")]
    Limiter(#[from] limits::redis::StartError),
    #[error("admin API: {0}")]
    Admin(#[from] crate::admin::api::TokenError),
}

/// Everything initialised before the server listens.
pub struct App {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Key cache (primed).
    pub keys: Arc<KeyCache>,
    /// Providers, resolved.
    pub upstreams: Arc<Vec<Upstream>>,
    /// Request limiter (connected to Redis in the background when configured).
    pub limiter: Arc<Limiter>,
}

impl App {
    /// Opens the store, primes the key cache, resolves providers and loads tokenizers.
    pub async fn init(config: Config) -> Result<App, StartError> {
        let store = store::open(&config.storage).await?;
        App::with_store(config, store).await
    }

    /// Like [`App::init`] with an already-open store.
    pub async fn with_store(config: Config, store: Arc<dyn Store>) -> Result<App, StartError> {
        let keys = Arc::new(KeyCache::new(store.clone(), config.keys.negative_cache));
        let n = keys.prime().await?;
        log::info!("loaded {n} keys");
        let mut ups = Vec::with_capacity(config.providers.len());
        for p in &config.providers {
            ups.push(Upstream::from_config(p).map_err(StartError::Upstream)?);
        }
        let upstreams = Arc::new(ups);
        resolve_all(&config, &upstreams).await;
        if counts_at_admission_or_stream(&config) {
            for p in &config.providers {
                for m in &p.models {
                    let t = m.tokenizer;
                    t.warm_up();
                    if !t.is_available() {
                        return Err(StartError::Tokenizer(t.name()));
                    }
                }
            }
        } else {
            log::info!(
                "no tier limits tokens or spend and every provider reports stream usage: \
                 tokenizers are loaded on first use"
            );
        }
        // Redis being down does not stop start-up: the limiter starts degraded.
        let limiter = Limiter::from_config(&config)?;
        Ok(App {
            config: Arc::new(config),
            store,
            keys,
            upstreams,
            limiter,
        })
    }
}

/// Whether this config counts tokens in the normal course: a tier limits tokens
/// or spend (every prompt is counted at admission), or a provider streams
/// without a usage report (every streamed completion is counted). Then the
/// tokenizers are loaded before listening, so no request waits for them: the
/// BPE tables are read in place from the binary, but each pre-tokenizer's
/// regex is compiled. Otherwise counting is the rare fallback (a key override
/// that limits tokens, an answer without `usage`, a stream the client left)
/// and a tokenizer is loaded the first time one needs it, once per process:
/// a gateway in front of providers that report usage never touches its
/// tables' pages.
pub fn counts_at_admission_or_stream(config: &Config) -> bool {
    let keyless = crate::keys::KeyLimits::default();
    config
        .tiers
        .values()
        .any(|t| limits::Policy::effective(Some(t), &keyless).needs_body())
        || config.providers.iter().any(|p| !p.stream_usage)
}

async fn resolve_all(config: &Config, upstreams: &[Upstream]) {
    for (p, up) in config.providers.iter().zip(upstreams) {
        if p.base_url
            .host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            continue;
        }
        let target = format!("{}:{}", p.base_url.host, p.base_url.port);
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(target)).await {
            Ok(Ok(addrs)) => {
                let v: Vec<SocketAddr> = addrs.collect();
                if !v.is_empty() {
                    up.addrs.store(Arc::new(v));
                }
            }
            Ok(Err(e)) => log::warn!(
                "provider {}: cannot resolve {}: {e}",
                p.name,
                p.base_url.host
            ),
            Err(_) => log::warn!(
                "provider {}: resolving {} timed out",
                p.name,
                p.base_url.host
            ),
        }
    }
}

/// Re-resolves provider host names off the request path.
struct DnsRefresher {
    config: Arc<Config>,
    upstreams: Arc<Vec<Upstream>>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => resolve_all(&self.config, &self.upstreams).await,
            }
        }
    }
}

/// Writes the key uses noted during the grace period: Pingora's runtimes, and the
/// flusher with them, are gone once `run` returns.
fn flush_uses_at_exit(keys: &KeyCache) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return log::warn!("last_used_at not written at exit: {e}"),
    };
    // The timer must be made inside the runtime, hence the async block.
    match rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), keys.flush_uses()).await })
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::warn!("last_used_at not written at exit: {e}"),
        Err(_) => log::warn!("last_used_at not written at exit: the store did not answer in 5 s"),
    }
}

/// A shutdown trigger for embedding the server (tests, benchmarks).
pub struct ChannelShutdown(
    tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<ShutdownSignal>>>,
);

impl ChannelShutdown {
    /// The watcher Pingora waits on, and the sender that fires it.
    pub fn new() -> (
        ChannelShutdown,
        tokio::sync::oneshot::Sender<ShutdownSignal>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (ChannelShutdown(tokio::sync::Mutex::new(Some(rx))), tx)
    }
}

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().await.take();
        match rx {
            Some(rx) => rx.await.unwrap_or(ShutdownSignal::FastShutdown),
            None => std::future::pending().await,
        }
    }
}

/// Pingora's server settings derived from ours.
pub fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.server.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool_size,
        // One retry covers a stale pooled connection; more only delays a 502.
        max_retries: 2,
        ..ServerConf::default()
    }
}

/// Runs the gateway until `shutdown` fires (or, with `None`, until SIGTERM/SIGINT/SIGQUIT),
/// then flushes queued usage and returns what the writer did.
pub fn serve(
    app: App,
    shutdown: Option<Box<dyn ShutdownSignalWatch>>,
) -> Result<WriterStats, StartError> {
    let config = app.config.clone();
    // Token problems stop start-up before anything is spawned.
    let admin = crate::admin::api::service(&config, app.store.clone(), app.keys.clone())?;
    let (sink, writer) = UsageWriter::spawn(app.store.clone(), &config.usage, &config.spool_dir())?;
    crate::metrics::init();
    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));
    server.bootstrap();

    let gateway = Gateway::new(
        config.clone(),
        app.keys.clone(),
        sink,
        app.upstreams.clone(),
        app.limiter.clone(),
        app.store.clone(),
    );
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway,
        "ai4free proxy",
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);

    if let Some(addr) = config.metrics_listen {
        let mut prom = pingora_prometheus::prometheus_http_service();
        prom.add_tcp(&addr.to_string());
        server.add_service(prom);
    }
    if let Some(admin) = admin {
        server.add_service(admin);
    }
    server.add_service(background_service(
        "key refresher",
        KeyRefresher::new(app.keys.clone(), config.keys.refresh_interval),
    ));
    server.add_service(background_service(
        "last-used flusher",
        UseFlusher::new(app.keys.clone(), config.keys.last_used_flush_interval),
    ));
    server.add_service(background_service(
        "dns refresher",
        DnsRefresher {
            config: config.clone(),
            upstreams: app.upstreams.clone(),
        },
    ));
    log::info!("ai4free listening on {}", config.listen);
    let args = match shutdown {
        Some(s) => RunArgs { shutdown_signal: s },
        None => RunArgs::default(),
    };
    server.run(args);
    flush_uses_at_exit(&app.keys);
    let stats = writer.shutdown();
    log::info!(
        "usage writer stopped: {} rows written, {} replayed from the spool, {} lost, {} bytes left spooled",
        stats.written,
        stats.replayed,
        stats.dropped,
        stats.spool_bytes_left
    );
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn config(stream_usage: bool, tier: &str) -> Config {
        Config::from_yaml_str(&format!(
            "providers:
  - name: p
    base_url: http://127.0.0.1:9090/v1
    stream_usage: {stream_usage}
    models:
      - name: m
tiers:
  free: {{ requests_per_minute: 10 }}
  other: {tier}
"
        ))
        .unwrap()
    }

    #[test]
    fn token_tables_are_built_at_start_only_when_the_config_counts() {
        // Requests-only limits and providers that report stream usage: no
        // request counts in the normal course.
        assert!(!counts_at_admission_or_stream(&config(true, "{}")));
        assert!(!counts_at_admission_or_stream(&config(
            true,
            "{ max_concurrent: 4 }"
        )));
        // Any tier that limits tokens or spend counts every prompt.
        assert!(counts_at_admission_or_stream(&config(
            true,
            "{ tokens_per_minute: 1000 }"
        )));
        assert!(counts_at_admission_or_stream(&config(
            true,
            "{ tokens_per_day: 1000 }"
        )));
        assert!(counts_at_admission_or_stream(&config(
            true,
            "{ spend_usd_per_day: 5 }"
        )));
        assert!(counts_at_admission_or_stream(&config(
            true,
            "{ spend_usd_per_month: 5 }"
        )));
        // A provider that streams without usage has every stream counted.
        assert!(counts_at_admission_or_stream(&config(false, "{}")));
    }
}
