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
keys: {{ last_used_flush_interval_ms: 3600000 }}
providers:
  - name: mock
    base_url: "{base_url}"
    models:
      - name: gpt-4o-mini
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
tiers:
  free: {{ requests_per_minute: 10 }}
  pro: {{ requests_per_minute: 1000 }}
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
    // Token, spend and concurrency limits and enforce_mid_stream are enforced, so accepted.
    let enforced = dir.path().join("enforced.yaml");
    std::fs::write(
        &enforced,
        "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models: [{ name: m }]\ntiers:\n  t: { requests_per_minute: 1, tokens_per_day: 10, spend_usd_per_day: 5, spend_usd_per_month: 50, max_concurrent: 2, default_max_tokens: 64, enforce_mid_stream: true }\n",
    )
    .unwrap();
    let o = ai4free(&["check-config"], &enforced);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(o));
    stdout(o)
}

/// Runs a command that must fail and returns its error line, which must name `flag`.
fn fails_naming(args: &[&str], cfg: &Path, flag: &str) -> String {
    let o = ai4free(args, cfg);
    assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("error: {flag}")),
        "{args:?}: expected an error naming {flag}, got: {err}"
    );
    err
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audit_entries(db: &Path) -> Vec<ai4free::store::AuditEntry> {
    use ai4free::store::{sqlite::SqliteStore, AuditQuery, Store};
    let store = SqliteStore::open(db).unwrap();
    rt().block_on(store.list_audit(&AuditQuery::default(), 1000, None))
        .unwrap()
        .entries
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
    let created: Value = serde_json::from_str(
        ok(&ai4free(
            &[
                "keys",
                "create",
                "--tier",
                "free",
                "--name",
                "ci",
                "--owner",
                "alice",
                "--project",
                "search",
                "--expires-in",
                "30d",
                "--models",
                "gpt-4o-mini",
                "--metadata",
                r#"{"team": "infra"}"#,
                "--limit",
                "requests_per_minute=5",
                "--limit",
                "spend_usd_per_month=2.5",
                "--json",
            ],
            &cfg,
        ))
        .trim(),
    )
    .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(ai4free::keys::parse(&key).unwrap().id, id);
    assert_eq!(created["object"], "key");
    assert_eq!(created["name"], "ci");
    assert_eq!(created["owner"], "alice");
    assert_eq!(created["project"], "search");
    assert_eq!(created["models"], json!(["gpt-4o-mini"]));
    assert_eq!(created["metadata"], json!({"team": "infra"}));
    assert_eq!(
        created["limits"],
        json!({"requests_per_minute": 5, "spend_usd_per_month": 2.5})
    );
    assert_eq!(created["status"], "active");
    assert_eq!(created["last_used_at"], Value::Null);
    let expires = chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    let in_30d = ai4free::usage::now_ms() + 30 * 86_400_000;
    assert!((in_30d - 60_000..=in_30d).contains(&expires), "{expires}");

    // Without --json: the key alone on stdout, the note on stderr.
    let o = ai4free(
        &[
            "keys",
            "create",
            "--tier",
            "pro",
            "--owner",
            "bob",
            "--name",
            "batch-1",
            "--expires-at",
            "2999-01-01T00:00:00Z",
        ],
        &cfg,
    );
    let plain = ok(&o);
    let bob_key = plain.trim().to_owned();
    let bob = ai4free::keys::parse(&bob_key).unwrap().id.to_owned();
    assert!(stderr(&o).contains("shown only once"));

    // Every validation error names the flag to fix.
    let create = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["keys".to_owned(), "create".to_owned()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (extra, flag) in [
        (&["--tier", "nope"][..], "--tier:"),
        (&["--tier", "free", "--expires-in", "soon"], "--expires-in"),
        (
            &["--tier", "free", "--expires-at", "2020-01-01T00:00:00Z"],
            "--expires-at:",
        ),
        (
            &["--tier", "free", "--models", "gpt-4o-mini,nope"],
            "--models:",
        ),
        (&["--tier", "free", "--limit", "rpm=5"], "--limit rpm:"),
        (
            &["--tier", "free", "--limit", "requests_per_minute=0"],
            "--limit requests_per_minute:",
        ),
        (
            &["--tier", "free", "--limit", "requests_per_minute"],
            "--limit",
        ),
        (&["--tier", "free", "--metadata", "[1]"], "--metadata:"),
        (&["--tier", "free", "--metadata", "{nope"], "--metadata:"),
        (&["--tier", "free", "--name", ""], "--name:"),
    ] {
        let args = create(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_naming(&args, &cfg, flag);
    }

    // list: JSON Lines and a table, never a secret.
    let listed = json_lines(&ok(&ai4free(&["keys", "list", "--json"], &cfg)));
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|k| k.get("key").is_none()));
    let table = ok(&ai4free(&["keys", "list"], &cfg));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("LAST_USED"));
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.contains("alice") && row.contains("active") && row.contains("gpt-4o-mini"));
    for out in [&table, &stdout(&ai4free(&["keys", "list", "--json"], &cfg))] {
        assert!(!out.contains(&key[17..39]) && !out.contains(&bob_key[17..39]));
    }
    let ids = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["keys", "list", "--json"];
        a.extend_from_slice(args);
        json_lines(&ok(&ai4free(&a, &cfg)))
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&["--owner", "alice"]), [id.as_str()]);
    assert_eq!(ids(&["--project", "search"]), [id.as_str()]);
    assert_eq!(ids(&["--tier", "pro"]), [bob.as_str()]);
    assert_eq!(ids(&["--name-prefix", "batch"]), [bob.as_str()]);
    assert_eq!(ids(&["--status", "active"]).len(), 2);
    assert!(ids(&["--status", "revoked"]).is_empty());
    fails_naming(&["keys", "list", "--status", "gone"], &cfg, "--status:");

    // show
    let shown: Value =
        serde_json::from_str(ok(&ai4free(&["keys", "show", &id, "--json"], &cfg)).trim()).unwrap();
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("key");
    assert_eq!(shown, expected);
    let text = ok(&ai4free(&["keys", "show", &id], &cfg));
    assert!(text.contains("owner:") && text.contains("alice"), "{text}");
    assert!(!ai4free(&["keys", "show", "nosuchid"], &cfg)
        .status
        .success());

    // update: one limit changes, the others stay; then clear, widen, never expire.
    let updated: Value = serde_json::from_str(
        ok(&ai4free(
            &[
                "keys",
                "update",
                &id,
                "--name",
                "ci-2",
                "--tier",
                "pro",
                "--limit",
                "tokens_per_day=1000",
                "--json",
            ],
            &cfg,
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(updated["name"], "ci-2");
    assert_eq!(updated["tier"], "pro");
    assert_eq!(
        updated["limits"],
        json!({"requests_per_minute": 5, "spend_usd_per_month": 2.5, "tokens_per_day": 1000})
    );
    let updated: Value = serde_json::from_str(
        ok(&ai4free(
            &[
                "keys",
                "update",
                &id,
                "--clear-limits",
                "--all-models",
                "--no-expiry",
                "--clear-name",
                "--metadata",
                "{}",
                "--json",
            ],
            &cfg,
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(updated["limits"], json!({}));
    assert_eq!(updated["models"], json!([]));
    assert_eq!(updated["expires_at"], Value::Null);
    assert_eq!(updated["name"], Value::Null);
    assert_eq!(updated["metadata"], json!({}));
    assert_eq!(updated["owner"], "alice", "owner is fixed at creation");
    fails_naming(&["keys", "update", &id], &cfg, "nothing to change");
    fails_naming(&["keys", "update", &id, "--tier", "gold"], &cfg, "--tier:");
    fails_naming(
        &["keys", "update", &id, "--limit", "tokens_per_day=-1"],
        &cfg,
        "--limit tokens_per_day:",
    );
    fails_naming(
        &["keys", "update", &id, "--expires-in", "0s"],
        &cfg,
        "--expires-in",
    );
    assert!(
        !ai4free(&["keys", "update", "nosuchid", "--name", "x"], &cfg)
            .status
            .success()
    );

    // rotate: same id, new secret printed once; the grace shows in the view.
    let rotated: Value = serde_json::from_str(
        ok(&ai4free(
            &["keys", "rotate", &id, "--grace", "1h", "--json"],
            &cfg,
        ))
        .trim(),
    )
    .unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(ai4free::keys::parse(&new_key).unwrap().id, id);
    assert_ne!(new_key, key);
    assert!(rotated["previous_secret_valid_until"].is_string());
    let o = ai4free(&["keys", "rotate", &bob], &cfg);
    let bob_new = ok(&o).trim().to_owned();
    assert_eq!(ai4free::keys::parse(&bob_new).unwrap().id, bob);
    assert!(stderr(&o).contains("old secret stopped working"));
    let bob_view: Value =
        serde_json::from_str(ok(&ai4free(&["keys", "show", &bob, "--json"], &cfg)).trim()).unwrap();
    assert_eq!(bob_view["previous_secret_valid_until"], Value::Null);
    fails_naming(&["keys", "rotate", &id, "--grace", "31d"], &cfg, "--grace:");
    fails_naming(&["keys", "rotate", &id, "--grace", "soon"], &cfg, "--grace");
    assert!(!ai4free(&["keys", "rotate", "nosuchid"], &cfg)
        .status
        .success());

    // revoke
    let revoked: Value =
        serde_json::from_str(ok(&ai4free(&["keys", "revoke", &id, "--json"], &cfg)).trim())
            .unwrap();
    assert_eq!(revoked["status"], "revoked");
    assert!(stdout(&ai4free(&["keys", "list"], &cfg)).contains("revoked"));
    assert_eq!(ids(&["--status", "revoked"]), [id.as_str()]);
    assert!(!ai4free(&["keys", "revoke", "nosuchid"], &cfg)
        .status
        .success());
    let err = stderr(&ai4free(&["keys", "rotate", &id], &cfg));
    assert!(err.contains("revoked"), "{err}");

    // Every change is audited as the CLI, and no secret is in the audit log.
    let db = dir.path().join("data/ai4free.db");
    let audit = audit_entries(&db);
    let mut actions: Vec<(String, String)> = audit
        .iter()
        .map(|e| (e.action.clone(), e.target.clone().unwrap_or_default()))
        .collect();
    actions.reverse();
    assert_eq!(
        actions,
        [
            ("key.create".into(), id.clone()),
            ("key.create".into(), bob.clone()),
            ("key.update".into(), id.clone()),
            ("key.update".into(), id.clone()),
            ("key.rotate".into(), id.clone()),
            ("key.rotate".into(), bob.clone()),
            ("key.revoke".into(), id.clone()),
        ]
    );
    assert!(audit.iter().all(|e| e.actor == "cli"));
    assert_eq!(
        audit[1].detail["grace_seconds"], 0,
        "newest first: bob, then id"
    );
    assert_eq!(audit[2].detail["grace_seconds"], 3600);
    let details =
        serde_json::to_string(&audit.iter().map(|e| &e.detail).collect::<Vec<_>>()).unwrap();
    for secret in [&key, &bob_key, &new_key, &bob_new] {
        assert!(!details.contains(&secret[17..39]), "secret in audit");
    }

    // Paging: five more keys, two per page, every key exactly once.
    for i in 0..5 {
        ok(&ai4free(
            &[
                "keys",
                "create",
                "--tier",
                "free",
                "--owner",
                &format!("page{i}"),
            ],
            &cfg,
        ));
    }
    let all = ids(&["--all", "--limit", "2"]);
    assert_eq!(all.len(), 7);
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, all, "pages out of order or repeated");
    let mut walked: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["keys", "list", "--json", "--limit", "2"];
        if let Some(c) = &cursor {
            args.extend_from_slice(&["--cursor", c]);
        }
        let o = ai4free(&args, &cfg);
        let page = json_lines(&ok(&o));
        assert!(page.len() <= 2);
        walked.extend(page.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        pages += 1;
        cursor = stderr(&o)
            .lines()
            .find_map(|l| l.strip_prefix("next cursor: "))
            .map(|rest| rest.split_whitespace().next().unwrap().to_owned());
        if cursor.is_none() {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(walked, all);
    assert_eq!(pages, 4);
    fails_naming(
        &["keys", "list", "--cursor", "not-a-cursor"],
        &cfg,
        "--cursor:",
    );

    // The database holds no secret.
    let bytes = std::fs::read(&db).unwrap();
    for secret in [&key, &bob_key, &new_key, &bob_new] {
        assert!(!bytes.windows(22).any(|w| w == &secret.as_bytes()[17..39]));
    }
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
            &[
                "keys",
                "create",
                "--tier",
                "free",
                "--owner",
                "carol",
                "--project",
                "p1",
                "--json",
            ],
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
    let id = created["id"].as_str().unwrap().to_owned();
    // last_used_at: the config flushes hourly, so only the flush at exit wrote it.
    let shown: Value =
        serde_json::from_str(ok(&ai4free(&["keys", "show", &id, "--json"], &cfg)).trim()).unwrap();
    let last = chrono::DateTime::parse_from_rfc3339(shown["last_used_at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert!(last <= ai4free::usage::now_ms() && last > ai4free::usage::now_ms() - 120_000);
    assert!(ok(&ai4free(&["keys", "list"], &cfg))
        .contains(&shown["last_used_at"].as_str().unwrap()[..10]));

    // export: filters and CSV.
    let export = |args: &[&str]| -> String {
        let mut a = vec!["usage", "export"];
        a.extend_from_slice(args);
        ok(&ai4free(&a, &cfg))
    };
    assert_eq!(
        export(&["--since", "2999-01-01T00:00:00Z"]).lines().count(),
        0
    );
    assert_eq!(export(&["--until", "2000-01-01"]).lines().count(), 0);
    assert_eq!(export(&["--key-id", &id]).lines().count(), n);
    assert_eq!(export(&["--key-id", "someone-else"]).lines().count(), 0);
    let today = &rows[0]["started_at"].as_str().unwrap()[..10];
    assert_eq!(
        export(&["--since", today, "--until", today])
            .lines()
            .count(),
        n
    );
    let csv = export(&["--csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), n + 1);
    assert!(lines[0].starts_with("request_id,key_id,model,provider,endpoint,prompt_tokens"));
    assert!(lines[1..]
        .iter()
        .all(|l| l.split(',').nth(1) == Some(id.as_str())));
    fails_naming(
        &["usage", "export", "--since", "yesterday"],
        &cfg,
        "--since:",
    );

    // report: the table (with TOTAL), each grouping as JSON, CSV, filters, errors.
    let report = ok(&ai4free(&["usage", "report", "--group-by", "model"], &cfg));
    assert!(report.starts_with("MODEL"), "{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("gpt-4o-mini"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(1),
        Some(n.to_string().as_str()),
        "{report}"
    );
    let total = report.lines().find(|l| l.starts_with("TOTAL")).unwrap();
    assert_eq!(
        total.split_whitespace().nth(1),
        Some(n.to_string().as_str())
    );
    for (group_by, column, value) in [
        ("day", "day", today),
        ("model", "model", "gpt-4o-mini"),
        ("key", "key_id", id.as_str()),
        ("owner", "owner", "carol"),
        ("project", "project", "p1"),
    ] {
        let v: Value = serde_json::from_str(
            ok(&ai4free(
                &["usage", "report", "--group-by", group_by, "--json"],
                &cfg,
            ))
            .trim(),
        )
        .unwrap();
        assert_eq!(v["group_by"], group_by);
        assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["data"][0][column], value, "{v}");
        assert_eq!(v["data"][0]["requests"], n, "{v}");
        assert_eq!(v["total"]["ok_requests"], n);
    }
    let csv = ok(&ai4free(
        &["usage", "report", "--group-by", "owner", "--csv"],
        &cfg,
    ));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("owner,requests,"));
    assert!(lines[1].starts_with(&format!("carol,{n},{n},0,")));
    let filtered = |args: &[&str]| -> u64 {
        let mut a = vec!["usage", "report", "--json"];
        a.extend_from_slice(args);
        let v: Value = serde_json::from_str(ok(&ai4free(&a, &cfg)).trim()).unwrap();
        v["total"]["requests"].as_u64().unwrap()
    };
    assert_eq!(filtered(&["--key-id", &id]), n as u64);
    assert_eq!(filtered(&["--key-id", "someone-else"]), 0);
    assert_eq!(filtered(&["--owner", "carol", "--project", "p1"]), n as u64);
    assert_eq!(filtered(&["--owner", "dave"]), 0);
    assert_eq!(
        filtered(&["--model", "gpt-4o-mini", "--since", today]),
        n as u64
    );
    assert_eq!(filtered(&["--since", "2999-01-01"]), 0);
    assert_eq!(filtered(&["--until", "2000-01-01T00:00:00Z"]), 0);
    fails_naming(
        &["usage", "report", "--group-by", "week"],
        &cfg,
        "--group-by:",
    );
    fails_naming(
        &["usage", "report", "--since", "yesterday"],
        &cfg,
        "--since:",
    );
    fails_naming(
        &[
            "usage",
            "report",
            "--since",
            "2026-02-01",
            "--until",
            "2026-01-01",
        ],
        &cfg,
        "--until:",
    );
    let o = ai4free(&["usage", "report", "--json", "--csv"], &cfg);
    assert!(!o.status.success(), "--json and --csv together");
}
