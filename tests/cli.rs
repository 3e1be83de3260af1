//! The `ai4free` binary as a user runs it: check-config, keys, usage, and serve
//! with a real SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ai4free::mock::{self, MockConfig};
use common::gateway::{free_port, rt, wait_for_port};
use common::http;
use serde_json::{json, Value};

fn ai4free(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ai4free"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(dir: &Path, base_url: &str, port: u16, mport: u16) -> std::path::PathBuf {
    let path = dir.join("ai4free.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
listen: "127.0.0.1:{port}"
metrics_listen: "127.0.0.1:{mport}"
storage: "sqlite://{db}"
server: {{ threads: 1, grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 2 }}
usage: {{ flush_interval_ms: 50 }}
providers:
  - name: mock
    base_url: "{base_url}"
    models:
      - name: gpt-4o-mini
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
tiers:
  free: {{ requests_per_minute: 10 }}
"#,
            db = dir.join("data/ai4free.db").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn shipped_configs_pass_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["conf/ai4free.yaml", "conf/providers.example.yaml"] {
        let o = ai4free(&["check-config"], &root.join(f));
        assert!(o.status.success(), "{f}: {}", stderr(&o));
        assert!(stdout(&o).contains(": ok"));
    }
}

#[test]
fn check_config_and_serve_report_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
listen: "not an address"
max_body_bytes: 10
providers:
  - name: ok
    base_url: "http://127.0.0.1:1/v1"
    models: [{ name: a }]
  - name: "Bad Name"
    base_url: "ftp://x"
    models:
      - name: ""
        input_price_per_mtok: -1
        modles: 1
tiers:
  free: { requests_per_minute: 10, tokens_per_minute: 5 }
"#,
    )
    .unwrap();
    for cmd in ["check-config", "serve"] {
        let o = ai4free(&[cmd], &bad);
        assert!(!o.status.success());
        let err = stderr(&o);
        for path in [
            "listen:",
            "max_body_bytes:",
            "providers[1].name:",
            "providers[1].base_url:",
            "providers[1].models[0].name:",
            "providers[1].models[0].input_price_per_mtok:",
            "providers[1].models[0].modles: unknown key",
        ] {
            assert!(err.contains(path), "{cmd}: missing {path} in:\n{err}");
        }
    }
    // A valid config that uses a limit this version does not enforce is refused too.
    let unenforced = dir.path().join("unenforced.yaml");
    std::fs::write(
        &unenforced,
        "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models: [{ name: m }]\ntiers:\n  t: { requests_per_minute: 1, spend_usd_per_day: 5, enforce_mid_stream: true }\n",
    )
    .unwrap();
    let o = ai4free(&["check-config"], &unenforced);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tiers.t.enforce_mid_stream: not enforced"));
    // Token, spend and concurrency limits are enforced, so accepted.
    let enforced = dir.path().join("enforced.yaml");
    std::fs::write(
        &enforced,
        "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models: [{ name: m }]\ntiers:\n  t: { requests_per_minute: 1, tokens_per_day: 10, spend_usd_per_day: 5, spend_usd_per_month: 50, max_concurrent: 2, default_max_tokens: 64 }\n",
    )
    .unwrap();
    let o = ai4free(&["check-config"], &enforced);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn keys_lifecycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "http://127.0.0.1:1/v1",
        free_port(),
        free_port(),
    );
    let o = ai4free(
        &[
            "keys",
            "create",
            "--tier",
            "free",
            "--name",
            "ci",
            "--owner",
            "alice",
            "--expires-in",
            "30d",
            "--models",
            "gpt-4o-mini",
            "--json",
        ],
        &cfg,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let created: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(ai4free::keys::parse(&key).is_ok());
    assert_eq!(created["owner"], "alice");
    assert_eq!(created["status"], "active");
    let o = ai4free(&["keys", "create", "--tier", "nope"], &cfg);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown tier"));
    let o = ai4free(
        &["keys", "create", "--tier", "free", "--expires-in", "soon"],
        &cfg,
    );
    assert!(!o.status.success());

    let o = ai4free(&["keys", "list", "--json"], &cfg);
    let listed: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0].get("key").is_none());
    assert!(!stdout(&o).contains(&key[17..]), "secret printed by list");
    let table = stdout(&ai4free(&["keys", "list"], &cfg));
    assert!(table.starts_with("ID"));
    assert!(table.contains(&id) && table.contains("active"));

    assert!(ai4free(&["keys", "revoke", &id], &cfg).status.success());
    assert!(stdout(&ai4free(&["keys", "list"], &cfg)).contains("revoked"));
    assert!(!ai4free(&["keys", "revoke", "nosuchid"], &cfg)
        .status
        .success());
    // The database holds no secret.
    let db = std::fs::read(dir.path().join("data/ai4free.db")).unwrap();
    assert!(!db.windows(22).any(|w| w == &key.as_bytes()[17..39]));
}

#[test]
fn serve_proxies_then_flushes_usage_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mock =
        mock::start_in_thread("127.0.0.1:0".parse().unwrap(), MockConfig::default()).unwrap();
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(dir.path(), &format!("http://{}/v1", mock.addr), port, mport);
    let created: Value = serde_json::from_str(
        stdout(&ai4free(
            &["keys", "create", "--tier", "free", "--json"],
            &cfg,
        ))
        .trim(),
    )
    .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();

    let mut child = Command::new(env!("CARGO_BIN_EXE_ai4free"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    let n = 7;
    rt().block_on(async {
        for i in 0..n {
            let body = json!({"model": "gpt-4o-mini", "stream": i % 2 == 0, "messages": [{"role": "user", "content": "hi"}]});
            let r = http::post_json(addr, "/v1/chat/completions", Some(&key), &body, &[]).await.unwrap();
            assert_eq!(r.status, 200);
        }
    });
    // SIGTERM: graceful shutdown, then the usage queue is flushed before exit.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "serve did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    let o = ai4free(&["usage", "export", "--json"], &cfg);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), n);
    for r in &rows {
        for field in [
            "request_id",
            "key_id",
            "model",
            "provider",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "status",
            "stream",
            "token_source",
            "started_at",
            "latency_ms",
        ] {
            assert!(r.get(field).is_some(), "missing {field} in {r}");
        }
        assert_eq!(r["key_id"], created["id"]);
        assert_eq!(r["token_source"], "provider");
        assert!(chrono::DateTime::parse_from_rfc3339(r["started_at"].as_str().unwrap()).is_ok());
    }
    let o = ai4free(
        &["usage", "export", "--since", "2999-01-01T00:00:00Z"],
        &cfg,
    );
    assert_eq!(stdout(&o).lines().count(), 0);
    assert!(!ai4free(&["usage", "export", "--since", "yesterday"], &cfg)
        .status
        .success());
    let report = stdout(&ai4free(&["usage", "report"], &cfg));
    let line = report.lines().find(|l| l.contains("gpt-4o-mini")).unwrap();
    assert!(
        line.split_whitespace().nth(2) == Some(&n.to_string()),
        "{report}"
    );
    let total = report.lines().find(|l| l.starts_with("TOTAL")).unwrap();
    assert!(total.contains(&n.to_string()));
}
