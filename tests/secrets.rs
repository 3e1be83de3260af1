//! No secret leaks, whatever fails.
//!
//! Runs the real binary (`serve` and the CLI) with `RUST_LOG=trace`, a provider
//! key in its environment and several key secrets in play (one rotated with a
//! grace period, so two secrets open it), drives every failure the gateway and the
//! CLI can produce, and then searches everything an operator or a client can see
//! for every secret: each log line (stdout and stderr of every process), the
//! `/metrics` text, every response (headers and body), every column of every
//! table of the SQLite database, the database files themselves and the spool.
//!
//! To cover another secret, push it onto the list in [`Secrets`]; every place
//! above is searched for it, in each of its spellings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ai4free::keys;
use ai4free::mock::{self, MockConfig};
use common::gateway::{free_port, rt, wait_for_port};
use common::http::{self, RawResponse};
use serde_json::{json, Value};

/// Everything that must never be shown, with a label for the failure message.
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn push(&mut self, label: impl Into<String>, value: impl Into<String>) {
        self.0.push((label.into(), value.into()));
    }

    /// Adds a gateway key: the whole key, its secret part, and the hex (either
    /// case) of the SHA-256 the store keeps, which would let anyone holding a
    /// leaked table test guesses offline.
    fn push_key(&mut self, label: &str, key: &str) {
        let parsed = keys::parse(key).unwrap();
        let hash = keys::hash_secret(parsed.id, parsed.secret);
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        self.push(format!("{label} (key)"), key);
        self.push(format!("{label} (secret part)"), parsed.secret);
        self.push(format!("{label} (hash hex)"), hex.clone());
        self.push(format!("{label} (hash HEX)"), hex.to_uppercase());
    }

    /// Panics naming every secret found in `text`, and where.
    fn assert_absent(&self, place: &str, text: &[u8]) {
        for (label, value) in &self.0 {
            if let Some(at) = find(text, value.as_bytes()) {
                // The whole line, so a log line shows its level and target.
                let floor = at.saturating_sub(2_000);
                let from = text[floor..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(floor, |i| floor + i + 1);
                let to = (at + value.len() + 120).min(text.len());
                panic!(
                    "{label} found in {place}:\n…{}…",
                    String::from_utf8_lossy(&text[from..to])
                );
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the test saw, by place.
#[derive(Default)]
struct Seen(Vec<(String, Vec<u8>)>);

impl Seen {
    fn add(&mut self, place: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.0.push((place.into(), bytes.into()));
    }

    fn response(&mut self, what: &str, r: &RawResponse) {
        let mut all = format!("HTTP {}\n", r.status).into_bytes();
        for (name, value) in &r.headers {
            all.extend_from_slice(name.as_bytes());
            all.extend_from_slice(b": ");
            all.extend_from_slice(value);
            all.push(b'\n');
        }
        all.extend_from_slice(&r.body);
        self.add(format!("the response to {what}"), all);
    }
}

struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
    provider_key: String,
    admin_token: String,
}

impl Env {
    fn db(&self) -> PathBuf {
        self.dir.path().join("ai4free.db")
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ai4free"));
        c.env("RUST_LOG", "trace")
            .env("AI4FREE_CONFIG", &self.config)
            .env("AI4FREE_TEST_PROVIDER_KEY", &self.provider_key)
            // `admin_token_env` defaults to this variable.
            .env("AI4FREE_ADMIN_TOKEN", &self.admin_token);
        c
    }

    /// Runs the CLI. Its stderr is always searched; its stdout too unless
    /// `shows_secret` (create and rotate print the new key there, once, by design).
    fn cli(&self, seen: &mut Seen, args: &[&str], shows_secret: bool) -> Output {
        let o = self.command().args(args).output().unwrap();
        seen.add(
            format!("stderr of `ai4free {}`", args.join(" ")),
            o.stderr.clone(),
        );
        if !shows_secret {
            seen.add(
                format!("stdout of `ai4free {}`", args.join(" ")),
                o.stdout.clone(),
            );
        }
        o
    }

    fn serve(&self, log: &Path) -> Child {
        let file = std::fs::File::create(log).unwrap();
        self.command()
            .arg("serve")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap()
    }
}

fn created(o: &Output) -> (String, String) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// A well-formed key (valid checksum) for `id` whose secret is not the key's.
fn wrong_secret_for(id: &str) -> String {
    keys::generate_for(id).unwrap().key
}

fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    // A response cut by the provider may end the connection early: status 0.
    rt().block_on(http::send(
        addr,
        &http::request(method, path, headers, body),
    ))
    .unwrap_or_else(|e| RawResponse {
        status: 0,
        headers: Vec::new(),
        body: e.to_string().into_bytes(),
    })
}

/// What a request is, its method, path, `Authorization`, extra headers, body,
/// and the status it must get.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    u16,
);

fn chat_body(model: &str, stream: bool) -> Vec<u8> {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
        .to_string()
        .into_bytes()
}

#[test]
fn no_secret_in_logs_metrics_responses_or_storage() {
    let mock =
        mock::start_in_thread("127.0.0.1:0".parse().unwrap(), MockConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, mport, aport) = (free_port(), free_port(), free_port());
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{aport}").parse().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("ai4free.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
listen: "127.0.0.1:{port}"
metrics_listen: "127.0.0.1:{mport}"
admin_listen: "127.0.0.1:{aport}"
storage: "sqlite://{db}"
max_body_bytes: 4096
upstream: {{ connect_timeout_ms: 500, first_byte_timeout_ms: 3000, idle_timeout_ms: 3000 }}
server: {{ threads: 2, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 2 }}
usage: {{ flush_interval_ms: 50, spool_dir: "{spool}" }}
keys: {{ refresh_interval_ms: 100, negative_cache_ms: 100, last_used_flush_interval_ms: 50 }}
providers:
  - name: mock
    base_url: "http://{mock}/v1"
    api_key_env: AI4FREE_TEST_PROVIDER_KEY
    models:
      - name: gpt-4o-mini
        input_price_per_mtok: 0.15
        output_price_per_mtok: 0.60
  - name: down
    base_url: "http://127.0.0.1:1/v1"
    api_key_env: AI4FREE_TEST_PROVIDER_KEY
    models:
      - name: down-model
tiers:
  free: {{ requests_per_minute: 2 }}
  pro: {{ requests_per_minute: 100000 }}
"#,
            db = dir.path().join("ai4free.db").display(),
            spool = dir.path().join("spool").display(),
            mock = mock.addr,
        ),
    )
    .unwrap();
    let env = Env {
        config,
        provider_key: format!("sk-provider-{}", keys::random_base62(32).unwrap()),
        admin_token: format!("admin-{}", keys::random_base62(32).unwrap()),
        dir,
    };
    let mut secrets = Secrets(Vec::new());
    secrets.push("the provider key", env.provider_key.clone());
    secrets.push("the admin token", env.admin_token.clone());
    let mut seen = Seen::default();

    // Keys in every state, made and changed by the CLI.
    let (_, ok_key) = created(&env.cli(
        &mut seen,
        &[
            "keys", "create", "--tier", "pro", "--owner", "alice", "--json",
        ],
        true,
    ));
    let (_, limited) = created(&env.cli(
        &mut seen,
        &["keys", "create", "--tier", "free", "--json"],
        true,
    ));
    let (revoked_id, revoked) = created(&env.cli(
        &mut seen,
        &["keys", "create", "--tier", "pro", "--json"],
        true,
    ));
    let expiring = env.cli(
        &mut seen,
        &[
            "keys",
            "create",
            "--tier",
            "pro",
            "--expires-in",
            "1s",
            "--json",
        ],
        true,
    );
    let expires_at = Instant::now() + Duration::from_secs(1);
    let (_, expired) = created(&expiring);
    let (graced_id, graced_old) = created(&env.cli(
        &mut seen,
        &["keys", "create", "--tier", "pro", "--json"],
        true,
    ));
    let (cut_id, cut_old) = created(&env.cli(
        &mut seen,
        &["keys", "create", "--tier", "pro", "--json"],
        true,
    ));
    let (_, graced_new) = created(&env.cli(
        &mut seen,
        &["keys", "rotate", &graced_id, "--grace", "1h", "--json"],
        true,
    ));
    let (_, cut_new) = created(&env.cli(&mut seen, &["keys", "rotate", &cut_id, "--json"], true));
    assert!(env
        .cli(&mut seen, &["keys", "revoke", &revoked_id], false)
        .status
        .success());
    for (label, key) in [
        ("a working key", &ok_key),
        ("a rate-limited key", &limited),
        ("a revoked key", &revoked),
        ("an expired key", &expired),
        ("a rotated key's old secret (in grace)", &graced_old),
        ("a rotated key's new secret", &graced_new),
        ("a rotated key's old secret (no grace)", &cut_old),
        ("a rotated key's new secret (no grace)", &cut_new),
    ] {
        secrets.push_key(label, key);
    }

    // CLI failures.
    for args in [
        &["keys", "create", "--tier", "gold"][..],
        &["keys", "create", "--tier", "pro", "--limit", "rpm=1"],
        &["keys", "create", "--tier", "pro", "--metadata", "{oops"],
        &["keys", "update", &graced_id, "--tier", "gold"],
        &["keys", "update", &graced_id],
        &["keys", "rotate", &graced_id, "--grace", "99d"],
        &["keys", "rotate", &revoked_id],
        &["keys", "show", "no-such-id"],
        &["keys", "list", "--cursor", "bogus"],
        &["usage", "report", "--group-by", "week"],
        &["usage", "export", "--since", "yesterday"],
    ] {
        let o = env.cli(&mut seen, args, false);
        assert!(!o.status.success(), "{args:?} succeeded");
    }
    for args in [
        &["keys", "list", "--json"][..],
        &["keys", "list"],
        &["keys", "show", &graced_id, "--json"],
        &["keys", "show", &graced_id],
    ] {
        assert!(env.cli(&mut seen, args, false).status.success(), "{args:?}");
    }

    let log = env.dir.path().join("serve.log");
    let mut gateway = env.serve(&log);
    wait_for_port(addr);
    wait_for_port(format!("127.0.0.1:{mport}").parse().unwrap());
    wait_for_port(admin_addr);
    while Instant::now() < expires_at + Duration::from_millis(100) {
        std::thread::sleep(Duration::from_millis(50));
    }

    let bearer = |k: &str| format!("Bearer {k}");
    let json_ct = ("Content-Type", "application/json");
    let mut call = |what: &str,
                    method: &str,
                    path: &str,
                    auth: Option<&str>,
                    extra: &[(&str, &str)],
                    body: &[u8]| {
        let mut headers: Vec<(&str, &str)> = vec![json_ct];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        headers.extend_from_slice(extra);
        let r = send(addr, method, path, &headers, body);
        seen.response(what, &r);
        r.status
    };
    let chat = chat_body("gpt-4o-mini", false);
    let stream = chat_body("gpt-4o-mini", true);
    let ok_auth = bearer(&ok_key);
    let wrong = bearer(&wrong_secret_for(keys::parse(&ok_key).unwrap().id));
    let mut bad_checksum = ok_key.clone();
    bad_checksum.pop();
    bad_checksum.push(if ok_key.ends_with('A') { 'B' } else { 'A' });
    let bad_checksum = bearer(&bad_checksum);
    let truncated = bearer(&ok_key[..ok_key.len() - 3]);
    let lowercase_scheme = format!("bearer {}x", ok_key);
    let basic = format!("Basic {ok_key}");
    let revoked_auth = bearer(&revoked);
    let expired_auth = bearer(&expired);
    let graced_old_auth = bearer(&graced_old);
    let graced_new_auth = bearer(&graced_new);
    let cut_old_auth = bearer(&cut_old);
    let graced_path = format!("/admin/keys/{graced_id}");

    let cases: Vec<Case<'_>> = vec![
        (
            "a working chat",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            chat.clone(),
            200,
        ),
        (
            "a working stream",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            stream.clone(),
            200,
        ),
        (
            "the models list",
            "GET",
            "/v1/models",
            Some(&ok_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "the key's usage",
            "GET",
            "/v1/usage?group_by=model",
            Some(&ok_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "the key's usage as CSV",
            "GET",
            "/v1/usage?format=csv",
            Some(&ok_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "another key's usage",
            "GET",
            "/v1/usage?key_id=x",
            Some(&ok_auth),
            vec![],
            vec![],
            400,
        ),
        (
            "no key",
            "POST",
            "/v1/chat/completions",
            None,
            vec![],
            chat.clone(),
            401,
        ),
        (
            "a wrong secret",
            "POST",
            "/v1/chat/completions",
            Some(&wrong),
            vec![],
            chat.clone(),
            401,
        ),
        (
            "a bad checksum",
            "POST",
            "/v1/chat/completions",
            Some(&bad_checksum),
            vec![],
            chat.clone(),
            401,
        ),
        (
            "a truncated key",
            "GET",
            "/v1/models",
            Some(&truncated),
            vec![],
            vec![],
            401,
        ),
        (
            "a key with a trailing character",
            "GET",
            "/v1/usage",
            Some(&lowercase_scheme),
            vec![],
            vec![],
            401,
        ),
        (
            "a Basic scheme",
            "POST",
            "/v1/chat/completions",
            Some(&basic),
            vec![],
            chat.clone(),
            401,
        ),
        (
            "a bare Bearer",
            "GET",
            "/v1/models",
            Some("Bearer"),
            vec![],
            vec![],
            401,
        ),
        (
            "a revoked key",
            "POST",
            "/v1/chat/completions",
            Some(&revoked_auth),
            vec![],
            chat.clone(),
            401,
        ),
        (
            "an expired key",
            "GET",
            "/v1/usage",
            Some(&expired_auth),
            vec![],
            vec![],
            401,
        ),
        (
            "an old secret in grace",
            "POST",
            "/v1/chat/completions",
            Some(&graced_old_auth),
            vec![],
            chat.clone(),
            200,
        ),
        (
            "a new secret",
            "POST",
            "/v1/chat/completions",
            Some(&graced_new_auth),
            vec![],
            stream.clone(),
            200,
        ),
        (
            "an old secret without grace",
            "POST",
            "/v1/chat/completions",
            Some(&cut_old_auth),
            vec![],
            chat.clone(),
            401,
        ),
        (
            "a provider 401",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![("x-mock-status", "401")],
            chat.clone(),
            401,
        ),
        (
            "a provider 500",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![("x-mock-status", "500")],
            stream.clone(),
            500,
        ),
        (
            "a provider that is down",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            chat_body("down-model", false),
            502,
        ),
        (
            "a reset mid-stream",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![("x-mock-reset-after", "2")],
            stream.clone(),
            200,
        ),
        (
            "a reset mid-body",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![("x-mock-reset-after", "1")],
            chat.clone(),
            502,
        ),
        (
            "bad JSON",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            b"{\"model\": \"gpt-4o-mini\", oops".to_vec(),
            400,
        ),
        (
            "an oversized body",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            vec![b'x'; 10_000],
            413,
        ),
        (
            "an unknown model",
            "POST",
            "/v1/chat/completions",
            Some(&ok_auth),
            vec![],
            chat_body("nope", false),
            404,
        ),
        (
            "an unknown path",
            "GET",
            "/v1/secrets",
            Some(&ok_auth),
            vec![],
            vec![],
            404,
        ),
        (
            "a wrong method",
            "DELETE",
            "/v1/models",
            Some(&ok_auth),
            vec![],
            vec![],
            405,
        ),
    ];
    for (what, method, path, auth, extra, body, expected) in &cases {
        let status = call(what, method, path, *auth, extra, body);
        // A reset may surface as the status line already sent or as a 502.
        if !what.starts_with("a reset") {
            assert_eq!(status, *expected, "{what}");
        }
    }
    let limited_auth = bearer(&limited);
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            call(
                "a rate-limited key",
                "POST",
                "/v1/chat/completions",
                Some(&limited_auth),
                &[],
                &chat,
            )
        })
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");

    // The admin API: wrong, missing and data-plane tokens, bad input, and reads
    // with the right token (never a create or rotate: those answer with a secret).
    let admin_auth = bearer(&env.admin_token);
    let wrong_admin = bearer(&format!("{}x", env.admin_token));
    let admin_cases: Vec<Case<'_>> = vec![
        (
            "admin: keys",
            "GET",
            "/admin/keys",
            Some(&admin_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "admin: one key",
            "GET",
            &graced_path,
            Some(&admin_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "admin: audit",
            "GET",
            "/admin/audit",
            Some(&admin_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "admin: usage",
            "GET",
            "/admin/usage?group_by=key&format=csv",
            Some(&admin_auth),
            vec![],
            vec![],
            200,
        ),
        (
            "admin: a bad filter",
            "GET",
            "/admin/keys?status=gone",
            Some(&admin_auth),
            vec![],
            vec![],
            400,
        ),
        (
            "admin: a bad patch",
            "PATCH",
            &graced_path,
            Some(&admin_auth),
            vec![],
            b"{\"tier\": 7}".to_vec(),
            400,
        ),
        (
            "admin: bad JSON",
            "POST",
            "/admin/keys",
            Some(&admin_auth),
            vec![],
            b"{oops".to_vec(),
            400,
        ),
        (
            "admin: an unknown key",
            "GET",
            "/admin/keys/nosuchkey",
            Some(&admin_auth),
            vec![],
            vec![],
            404,
        ),
        (
            "admin: no token",
            "GET",
            "/admin/keys",
            None,
            vec![],
            vec![],
            401,
        ),
        (
            "admin: a wrong token",
            "GET",
            "/admin/keys",
            Some(&wrong_admin),
            vec![],
            vec![],
            401,
        ),
        (
            "admin: a data-plane key",
            "GET",
            "/admin/keys",
            Some(&ok_auth),
            vec![],
            vec![],
            401,
        ),
    ];
    let mut admin_responses: Vec<(String, RawResponse)> = Vec::new();
    for (what, method, path, auth, extra, body, expected) in &admin_cases {
        let mut headers: Vec<(&str, &str)> = vec![json_ct];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        headers.extend_from_slice(extra);
        let r = send(admin_addr, method, path, &headers, body);
        assert_eq!(r.status, *expected, "{what}: {}", r.text());
        admin_responses.push((what.to_string(), r));
    }
    assert_eq!(
        call(
            "admin paths on the proxy port",
            "GET",
            "/admin/keys",
            Some(&admin_auth),
            &[],
            &[]
        ),
        404
    );

    for (what, r) in &admin_responses {
        seen.response(what, r);
    }
    let metrics = rt()
        .block_on(http::get(
            format!("127.0.0.1:{mport}").parse().unwrap(),
            "/metrics",
            None,
        ))
        .unwrap();
    assert_eq!(metrics.status, 200);
    seen.add("/metrics", metrics.body.clone());

    // Let the usage rows and last_used_at land, then stop with SIGTERM.
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    while gateway.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = gateway.kill();
            panic!("serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log_text = std::fs::read(&log).unwrap();
    // The search must have something to search: trace logging did run, and the
    // requests above are in the database.
    assert!(
        log_text.len() > 10_000 && find(&log_text, b"TRACE").is_some(),
        "expected a trace log, got {} bytes",
        log_text.len()
    );
    seen.add("the gateway's log (stdout and stderr)", log_text);
    for args in [
        &["usage", "export"][..],
        &["usage", "export", "--csv"],
        &["usage", "report", "--group-by", "key", "--json"],
    ] {
        assert!(env.cli(&mut seen, args, false).status.success(), "{args:?}");
    }

    // Every column of every table, as text (blobs as lossy UTF-8: the hash
    // columns hold raw bytes, which are expected; a hex or text copy is not).
    let db = rusqlite::Connection::open(env.db()).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.iter().any(|t| t == "api_keys") && tables.iter().any(|t| t == "usage"));
    let mut rows_seen = 0;
    for table in &tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            rows_seen += 1;
            for (i, column) in names.iter().enumerate() {
                use rusqlite::types::ValueRef;
                let cell: Vec<u8> = match row.get_ref(i).unwrap() {
                    ValueRef::Null => Vec::new(),
                    ValueRef::Integer(n) => n.to_string().into_bytes(),
                    ValueRef::Real(f) => f.to_string().into_bytes(),
                    ValueRef::Text(t) | ValueRef::Blob(t) => t.to_vec(),
                };
                secrets.assert_absent(&format!("column {table}.{column}"), &cell);
            }
        }
    }
    assert!(rows_seen > 30, "only {rows_seen} rows stored");
    drop(db);
    // The files themselves (free pages and the WAL included) and the spool.
    let mut files = vec![env.db()];
    for suffix in ["-wal", "-journal"] {
        let mut p = env.db().into_os_string();
        p.push(suffix);
        files.push(PathBuf::from(p));
    }
    if let Ok(entries) = std::fs::read_dir(env.spool()) {
        files.extend(entries.map(|e| e.unwrap().path()));
    }
    for f in files.iter().filter(|f| f.is_file()) {
        secrets.assert_absent(&f.display().to_string(), &std::fs::read(f).unwrap());
    }
    // Everything logged, printed or answered.
    assert!(seen.0.len() > 50);
    for (place, bytes) in &seen.0 {
        secrets.assert_absent(place, bytes);
    }
    // The provider key was live: the mock received it (and the client's key never).
    let expected = format!("Bearer {}", env.provider_key);
    let reqs = mock.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        let auth = r.header("authorization").unwrap_or_default();
        assert_eq!(auth, expected.as_bytes(), "{} {}", r.method, r.path);
    }
}
