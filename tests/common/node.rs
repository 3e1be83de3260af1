//! Gateway nodes as separate processes of the real `ai4free` binary, for tests of
//! several nodes sharing one database and one Redis (each process has its own
//! caches, limiter and metrics, as in production).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::gateway::{free_port, wait_for_port, PROVIDER_KEY};

pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub config_path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

/// The config every node of a test cluster shares, minus its own ports and spool.
/// `extra` is appended verbatim (top-level keys such as `redis:`).
pub fn cluster_yaml(storage: &str, mock_base: &str, tiers: &str, extra: &str) -> String {
    format!(
        r#"
storage: "{storage}"
upstream: {{ connect_timeout_ms: 1000, first_byte_timeout_ms: 10000, idle_timeout_ms: 5000 }}
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 3 }}
keys: {{ refresh_interval_ms: 250, negative_cache_ms: 200 }}
providers:
  - name: mock
    base_url: "{mock_base}"
    api_key_env: AI4FREE_TEST_PROVIDER_KEY
    models:
      - name: gpt-4o-mini
        tokenizer: o200k_base
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
tiers:
{tiers}
{extra}
"#
    )
}

impl Node {
    /// Starts a node with `shared` config plus its own listen/metrics ports and
    /// spool directory under `dir`, and waits until both ports accept.
    pub fn spawn(name: &str, dir: &Path, shared: &str) -> Node {
        let port = free_port();
        let mport = free_port();
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir).unwrap();
        let config_path = node_dir.join("ai4free.yaml");
        let yaml = format!(
            "listen: \"127.0.0.1:{port}\"\nmetrics_listen: \"127.0.0.1:{mport}\"\nusage: {{ flush_interval_ms: 50, batch_size: 200, spool_dir: \"{spool}\", spool_fsync_interval_ms: 50 }}\n{shared}",
            spool = node_dir.join("spool").display(),
        );
        std::fs::write(&config_path, yaml).unwrap();
        let mut node = Node {
            name: name.to_string(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics_addr: format!("127.0.0.1:{mport}").parse().unwrap(),
            config_path,
            child: None,
            log: node_dir.join("node.log"),
        };
        node.start();
        node
    }

    /// (Re)starts the process with the same config.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ai4free"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("AI4FREE_TEST_PROVIDER_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok()
            {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited at start ({status}):\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{} never listened:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        wait_for_port(self.metrics_addr);
    }

    /// SIGTERM and wait: the node drains and flushes usage before exiting.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let t = Instant::now();
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!(
                        "{} did not stop on SIGTERM:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: the node dies with no chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's `/metrics` text.
    pub fn metrics(&self) -> String {
        let resp = super::gateway::rt()
            .block_on(super::http::get(self.metrics_addr, "/metrics", None))
            .unwrap();
        resp.text()
    }

    /// The value of an unlabelled metric (or the sum over its label sets).
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }

    /// Runs the CLI against this node's config (same store), e.g. `keys revoke ID`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_ai4free"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sums every sample of `name` (any labels) in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
