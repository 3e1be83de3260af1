//! An in-process gateway for integration tests: real Pingora server, real SQLite
//! file, real mock provider, all on free loopback ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai4free::config::Config;
use ai4free::keys::{self, KeyRecord};
use ai4free::mock::{self, MockConfig, MockHandle};
use ai4free::server::{self, App, ChannelShutdown};
use ai4free::store::{sqlite::SqliteStore, Store, UsageQuery};
use ai4free::usage::writer::WriterStats;
use ai4free::usage::UsageRecord;
use pingora::server::ShutdownSignal;

/// The provider key tests expect to reach the mock.
pub const PROVIDER_KEY: &str = "sk-provider-test-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn wait_for_port(addr: SocketAddr) {
    let t = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{addr} never accepted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tokens for the admin listener of a test gateway.
#[derive(Clone)]
pub struct AdminOptions {
    pub token: String,
    pub readonly_token: Option<String>,
}

pub struct Options {
    pub mock: MockConfig,
    /// Start the admin listener on a free port with these tokens (else it is "off").
    pub admin: Option<AdminOptions>,
    /// Extra YAML appended to the generated config (top-level keys).
    pub extra_yaml: String,
    /// Extra tiers, one `name: { ... }` per line, next to `free` and `pro`.
    pub extra_tiers: Vec<String>,
    /// `stream_usage` of the provider.
    pub stream_usage: bool,
    /// Replace the provider base URL (e.g. an unreachable one).
    pub base_url: Option<String>,
    pub max_body_bytes: usize,
    pub first_byte_timeout_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mock: MockConfig::default(),
            admin: None,
            extra_yaml: String::new(),
            extra_tiers: Vec::new(),
            stream_usage: true,
            base_url: None,
            max_body_bytes: 8 * 1024 * 1024,
            first_byte_timeout_ms: 10_000,
        }
    }
}

pub struct TestGateway {
    pub addr: SocketAddr,
    /// The admin listener, when `Options::admin` asked for one.
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub mock: MockHandle,
    pub db: PathBuf,
    pub config: Arc<Config>,
    store: Arc<dyn Store>,
    shutdown: Option<tokio::sync::oneshot::Sender<ShutdownSignal>>,
    thread: Option<std::thread::JoinHandle<WriterStats>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn start() -> TestGateway {
        TestGateway::with(Options::default())
    }

    pub fn with(opts: Options) -> TestGateway {
        // Set once per process; every test gateway uses the same variable.
        std::env::set_var("AI4FREE_TEST_PROVIDER_KEY", PROVIDER_KEY);
        let mock =
            mock::start_in_thread("127.0.0.1:0".parse().unwrap(), opts.mock.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ai4free.db");
        let port = free_port();
        let mport = free_port();
        let admin_port = opts.admin.as_ref().map(|_| free_port());
        let admin_yaml = match (&opts.admin, admin_port) {
            (Some(a), Some(aport)) => {
                // A variable name of its own per gateway: tests in one process run in
                // parallel, and none may read another's token.
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let full = format!("AI4FREE_TEST_ADMIN_TOKEN_{n}");
                let ro = format!("AI4FREE_TEST_ADMIN_RO_TOKEN_{n}");
                std::env::set_var(&full, &a.token);
                if let Some(t) = &a.readonly_token {
                    std::env::set_var(&ro, t);
                }
                format!(
                    "admin_listen: \"127.0.0.1:{aport}\"\nadmin_token_env: {full}\nadmin_readonly_token_env: {ro}\n"
                )
            }
            _ => "admin_listen: \"off\"\n".to_owned(),
        };
        let base = opts
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/v1", mock.addr));
        let yaml = format!(
            r#"
listen: "127.0.0.1:{port}"
{admin_yaml}metrics_listen: "127.0.0.1:{mport}"
storage: "sqlite://{db}"
max_body_bytes: {max}
upstream: {{ connect_timeout_ms: 1000, first_byte_timeout_ms: {fbt}, idle_timeout_ms: 5000 }}
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
usage: {{ queue_capacity: 10000, batch_size: 100, flush_interval_ms: 50 }}
keys: {{ refresh_interval_ms: 100, negative_cache_ms: 200, last_used_flush_interval_ms: 100 }}
providers:
  - name: mock
    base_url: "{base}"
    api_key_env: AI4FREE_TEST_PROVIDER_KEY
    stream_usage: {su}
    models:
      - name: gpt-4o-mini
        tokenizer: o200k_base
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
      - name: gpt-3.5-turbo
        tokenizer: cl100k_base
        input_price_per_mtok: 0.5
        output_price_per_mtok: 1.5
      - name: renamed
        upstream_name: real-upstream-name
  - name: other
    base_url: "{base}"
    api_key_env: AI4FREE_TEST_PROVIDER_KEY
    models:
      - name: gpt-4o-mini
        input_price_per_mtok: 1
        output_price_per_mtok: 2
tiers:
  free: {{ requests_per_minute: 5 }}
  pro: {{ requests_per_minute: 100000 }}
{tiers}{extra}
"#,
            db = db.display(),
            max = opts.max_body_bytes,
            fbt = opts.first_byte_timeout_ms,
            su = opts.stream_usage,
            extra = opts.extra_yaml,
            tiers = opts
                .extra_tiers
                .iter()
                .map(|t| format!("  {t}\n"))
                .collect::<String>(),
        );
        let config = Config::from_yaml_str(&yaml).unwrap_or_else(|e| panic!("test config: {e}"));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
        let app = rt().block_on(async {
            store.migrate().await.unwrap();
            App::with_store(config.clone(), store.clone())
                .await
                .unwrap()
        });
        let (watch, tx) = ChannelShutdown::new();
        let thread = std::thread::spawn(move || server::serve(app, Some(Box::new(watch))).unwrap());
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
        wait_for_port(addr);
        wait_for_port(metrics_addr);
        let admin_addr: Option<SocketAddr> =
            admin_port.map(|p| format!("127.0.0.1:{p}").parse().unwrap());
        if let Some(a) = admin_addr {
            wait_for_port(a);
        }
        TestGateway {
            addr,
            admin_addr,
            metrics_addr,
            mock,
            db,
            config: Arc::new(config),
            store,
            shutdown: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Creates a key directly in the store (as the CLI does) and returns (id, secret key).
    pub fn create_key(
        &self,
        tier: &str,
        models: &[&str],
        expires_at_ms: Option<i64>,
    ) -> (String, String) {
        let k = keys::generate().unwrap();
        let rec = KeyRecord {
            name: Some("test".into()),
            owner: Some("tester".into()),
            models: models.iter().map(|s| s.to_string()).collect(),
            expires_at_ms,
            ..KeyRecord::new(
                k.id.clone(),
                tier.into(),
                k.secret_hash,
                ai4free::usage::now_ms(),
            )
        };
        rt().block_on(self.store.insert_key(&rec)).unwrap();
        (k.id, k.key)
    }

    /// A non-streaming chat completion for `model` with `key`, blocking.
    pub fn chat(&self, key: &str, model: &str) -> crate::common::http::RawResponse {
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
        rt().block_on(crate::common::http::post_json(
            self.addr,
            "/v1/chat/completions",
            Some(key),
            &body,
            &[],
        ))
        .unwrap()
    }

    pub fn revoke(&self, id: &str) {
        assert!(rt()
            .block_on(self.store.revoke_key(id, ai4free::usage::now_ms()))
            .unwrap());
    }

    /// Usage rows written so far (the writer flushes every 50 ms).
    pub fn usage_rows(&self) -> Vec<UsageRecord> {
        rt().block_on(self.store.query_usage(&UsageQuery::default()))
            .unwrap()
    }

    /// Waits until at least `n` rows are stored, then returns them all.
    pub fn wait_rows(&self, n: usize) -> Vec<UsageRecord> {
        let t = Instant::now();
        loop {
            let rows = self.usage_rows();
            if rows.len() >= n || t.elapsed() > Duration::from_secs(10) {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Graceful stop; returns what the usage writer did.
    pub fn stop(mut self) -> WriterStats {
        self.stop_inner().unwrap()
    }

    fn stop_inner(&mut self) -> Option<WriterStats> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(ShutdownSignal::GracefulTerminate);
        }
        self.thread.take().map(|t| t.join().unwrap())
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
