//! Unit tests for configuration parsing, validation and model resolution.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const QUICK_START: &str = include_str!("../../conf/ai4free.yaml");
const EXAMPLE: &str = include_str!("../../conf/providers.example.yaml");

const MINIMAL: &str = "
providers:
  - name: p
    base_url: http://127.0.0.1:9090/v1
    models:
      - name: m
tiers:
  free: {}
";

fn parse(text: &str) -> Config {
    match Config::from_yaml_str(text) {
        Ok(c) => c,
        Err(e) => panic!("config should parse, got:\n{e}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match Config::from_yaml_str(text) {
        Ok(_) => panic!("config should be rejected"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// Parses MINIMAL with `extra` appended at the top level.
fn with_top(extra: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml_str(&format!("{MINIMAL}{extra}"))
}

fn price_of(value: &str) -> Result<u64, Vec<String>> {
    let text = format!(
        "providers:\n  - name: p\n    base_url: http://h\n    models:\n      - name: m\n        input_price_per_mtok: {value}\ntiers: {{free: {{}}}}\n"
    );
    Config::from_yaml_str(&text)
        .map(|c| c.providers[0].models[0].input_price.micros_per_mtok)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

#[test]
fn quick_start_config_parses() {
    let c = parse(QUICK_START);
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9091".parse().unwrap()));
    assert_eq!(
        c.storage,
        Storage::Sqlite {
            path: PathBuf::from("data/ai4free.db")
        }
    );
    assert_eq!(c.providers.len(), 1);
    let mock = &c.providers[0];
    assert_eq!(mock.name, "mock");
    assert_eq!(mock.base_url.to_string(), "http://127.0.0.1:9090/v1");
    assert_eq!(mock.base_url.authority(), "127.0.0.1:9090");
    assert_eq!(mock.api_key_env.as_deref(), Some("MOCK_API_KEY"));
    assert!(mock.stream_usage);
    let names: Vec<&str> = mock.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["gpt-4o-mini", "gpt-3.5-turbo"]);
    assert_eq!(mock.models[0].tokenizer, Tokenizer::O200kBase);
    assert_eq!(mock.models[0].input_price.micros_per_mtok, 150_000);
    assert_eq!(mock.models[0].output_price.micros_per_mtok, 600_000);
    assert_eq!(mock.models[1].tokenizer, Tokenizer::Cl100kBase);
    assert_eq!(mock.models[1].input_price.micros_per_mtok, 500_000);
    assert_eq!(mock.models[1].output_price.micros_per_mtok, 1_500_000);
    assert_eq!(c.tier("free").unwrap().requests_per_minute, Some(10));
    assert_eq!(c.tier("pro").unwrap().requests_per_minute, Some(600));
    assert_eq!(c.tier("pro").unwrap().name, "pro");
    assert!(c.tier("enterprise").is_none());
    assert_eq!(c.resolve_model("gpt-4o-mini"), Some((0, 0)));
    assert_eq!(c.resolve_model("mock/gpt-3.5-turbo"), Some((0, 1)));
}

#[test]
fn quick_start_spells_out_every_default() {
    // The quick start documents the defaults, so it must equal a minimal config's.
    let q = parse(QUICK_START);
    let d = parse(MINIMAL);
    assert_eq!(q.listen, d.listen);
    assert_eq!(q.metrics_listen, d.metrics_listen);
    assert_eq!(q.admin, d.admin);
    assert_eq!(q.storage, d.storage);
    assert_eq!(q.max_body_bytes, d.max_body_bytes);
    assert_eq!(q.upstream, d.upstream);
    assert_eq!(q.server, d.server);
    assert_eq!(q.usage, d.usage);
    assert_eq!(q.keys, d.keys);
}

#[test]
fn example_config_parses() {
    let c = parse(EXAMPLE);
    let names: Vec<&str> = c.providers.iter().map(|p| p.name.as_str()).collect();
    for expected in [
        "openai",
        "groq",
        "openrouter",
        "gemini",
        "mistral",
        "cerebras",
        "github",
        "together",
        "deepseek",
    ] {
        assert!(names.contains(&expected), "missing provider {expected}");
    }
    for p in &c.providers {
        assert!(p.api_key_env.is_some(), "{} has no api_key_env", p.name);
        assert!(p.base_url.tls, "{} is not https", p.name);
    }
    let groq = c.provider("groq").unwrap();
    assert_eq!(groq.base_url.host, "api.groq.com");
    assert_eq!(groq.base_url.port, 443);
    assert_eq!(groq.base_url.path_prefix, "/openai/v1");
    let (p, m) = c
        .resolve_model("meta-llama/llama-3.3-70b-instruct:free")
        .unwrap();
    assert_eq!(c.providers[p].name, "openrouter");
    assert_eq!(c.providers[p].models[m].input_price, Price::default());
    let (p, m) = c.resolve_model("github-gpt-4o-mini").unwrap();
    assert_eq!(
        c.providers[p].models[m].upstream_model(),
        "openai/gpt-4o-mini"
    );
    let openrouter = c.provider("openrouter").unwrap();
    assert_eq!(
        openrouter.headers,
        vec![
            (
                "http-referer".to_owned(),
                "https://github.com/ai4free/ai4free".to_owned()
            ),
            ("x-title".to_owned(), "ai4free".to_owned()),
        ]
    );
    assert_eq!(c.tier("pro").unwrap().requests_per_minute, Some(600));
    // What ships must also pass check-config, which refuses unenforced limits.
    assert!(c.unenforced_limits().is_empty());
}

#[test]
fn every_limit_is_enforced() {
    // Every counted limit, concurrency, the default reservation and
    // enforce_mid_stream are enforced, locally and in Redis.
    let c = Config::from_yaml_str(
        "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models:\n      - name: m\ntiers:\n  pro: {requests_per_second: 1, requests_per_minute: 2, requests_per_hour: 3, requests_per_day: 4, tokens_per_minute: 5, tokens_per_day: 6, spend_usd_per_day: 1.5, spend_usd_per_month: 20, max_concurrent: 3, default_max_tokens: 100, enforce_mid_stream: true}\n",
    )
    .unwrap();
    assert!(c.tier("pro").unwrap().enforce_mid_stream);
    assert!(c.unenforced_limits().is_empty());
}

#[test]
fn defaults_apply_when_keys_are_absent() {
    let c = parse(MINIMAL);
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9091".parse().unwrap()));
    assert_eq!(
        c.storage,
        Storage::Sqlite {
            path: PathBuf::from("data/ai4free.db")
        }
    );
    assert_eq!(c.max_body_bytes, 8_388_608);
    assert_eq!(
        c.upstream,
        UpstreamTimeouts {
            connect: Duration::from_millis(3_000),
            first_byte: Duration::from_millis(120_000),
            idle: Duration::from_millis(60_000),
        }
    );
    assert_eq!(
        c.server,
        ServerSettings {
            threads: 2,
            grace_period_seconds: 10,
            graceful_shutdown_timeout_seconds: 5,
            upstream_keepalive_pool_size: 256,
        }
    );
    assert_eq!(
        c.usage,
        UsageSettings {
            queue_capacity: 65_536,
            batch_size: 512,
            flush_interval: Duration::from_millis(200),
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            spool_fsync_interval: Duration::from_millis(200),
            writer_nice: 10,
        }
    );
    assert_eq!(
        c.keys,
        KeySettings {
            refresh_interval: Duration::from_millis(250),
            negative_cache: Duration::from_millis(1_000),
            last_used_flush_interval: Duration::from_secs(30),
        }
    );
    let p = &c.providers[0];
    assert_eq!(p.api_key_env, None);
    assert!(p.stream_usage);
    assert!(p.headers.is_empty());
    let m = &p.models[0];
    assert_eq!(m.upstream_name, None);
    assert_eq!(m.upstream_model(), "m");
    assert_eq!(m.tokenizer, Tokenizer::O200kBase);
    assert_eq!(m.input_price, Price::default());
    assert_eq!(m.output_price, Price::default());
    assert_eq!(m.cached_input_price, None);
    assert_eq!(
        c.tier("free").unwrap(),
        &Tier {
            name: "free".to_owned(),
            ..Tier::default()
        }
    );
}

#[test]
fn empty_sections_and_nulls_mean_defaults() {
    let c = with_top("upstream:\nserver: {}\nusage: null\nkeys:\nmetrics_listen: null\n").unwrap();
    assert_eq!(c.upstream.connect, Duration::from_millis(3_000));
    assert_eq!(c.server.threads, 2);
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9091".parse().unwrap()));
}

#[test]
fn metrics_can_be_turned_off() {
    let c = with_top("metrics_listen: \"off\"\n").unwrap();
    assert_eq!(c.metrics_listen, None);
    let c = with_top("metrics_listen: off\n").unwrap();
    assert_eq!(c.metrics_listen, None);
    let c = with_top("metrics_listen: \"[::1]:9100\"\n").unwrap();
    assert_eq!(c.metrics_listen, Some("[::1]:9100".parse().unwrap()));
}

#[test]
fn admin_listener_defaults_turns_off_and_names_its_variables() {
    let c = parse(MINIMAL);
    assert_eq!(c.admin.listen, Some("127.0.0.1:8081".parse().unwrap()));
    assert_eq!(c.admin.token_env, "AI4FREE_ADMIN_TOKEN");
    assert_eq!(c.admin.readonly_token_env, "AI4FREE_ADMIN_READONLY_TOKEN");
    let c = with_top("admin_listen: \"off\"\n").unwrap();
    assert_eq!(c.admin.listen, None);
    let c = with_top(
        "admin_listen: \"0.0.0.0:9000\"\nadmin_token_env: OPS_TOKEN\nadmin_readonly_token_env: RO_TOKEN\n",
    )
    .unwrap();
    assert_eq!(c.admin.listen, Some("0.0.0.0:9000".parse().unwrap()));
    assert_eq!(c.admin.token_env, "OPS_TOKEN");
    assert_eq!(c.admin.readonly_token_env, "RO_TOKEN");
}

#[test]
fn admin_settings_errors_name_their_path() {
    let e = errors(&format!(
        "{MINIMAL}admin_listen: \"localhost\"\nadmin_token_env: \"1BAD\"\nadmin_readonly_token_env: \"a b\"\n"
    ));
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].starts_with("admin_listen: expected an IP:port address"),
        "{e:?}"
    );
    assert!(e[0].ends_with("or \"off\", got \"localhost\""), "{e:?}");
    assert!(
        e[1].starts_with("admin_token_env: expected an environment variable name"),
        "{e:?}"
    );
    assert!(
        e[2].starts_with("admin_readonly_token_env: expected an environment variable name"),
        "{e:?}"
    );
    let e = errors(&format!(
        "{MINIMAL}admin_token_env: SAME\nadmin_readonly_token_env: SAME\n"
    ));
    assert_eq!(
        e,
        ["admin_readonly_token_env: must name a different variable than admin_token_env"]
    );
}

#[test]
fn storage_urls() {
    let storage = |s: &str| with_top(&format!("storage: \"{s}\"\n")).map(|c| c.storage);
    assert_eq!(
        storage("sqlite:///var/lib/ai4free.db").unwrap(),
        Storage::Sqlite {
            path: PathBuf::from("/var/lib/ai4free.db")
        }
    );
    assert_eq!(
        storage("sqlite::memory:").unwrap(),
        Storage::Sqlite {
            path: PathBuf::from(":memory:")
        }
    );
    assert_eq!(
        storage("postgresql://u:secret@db/ai4free").unwrap(),
        Storage::Postgres {
            url: "postgresql://u:secret@db/ai4free".to_owned()
        }
    );
    assert!(matches!(
        storage("postgres://db/x").unwrap(),
        Storage::Postgres { .. }
    ));
    for bad in ["mysql://db/x", "sqlite://", "data/ai4free.db"] {
        let e = storage(bad).unwrap_err();
        assert_eq!(e.0.len(), 1, "{bad}");
        assert_eq!(e.0[0].path, "storage");
    }
}

#[test]
fn debug_output_redacts_secrets() {
    let c = with_top("storage: \"postgres://u:hunter2@db/x\"\n").unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("postgres://u:***@db/x"), "{debug}");

    let c = parse(
        "providers:\n  - name: p\n    base_url: http://h\n    headers: {x-token: s3cr3t}\n    models: [{name: m}]\ntiers: {free: {}}\n",
    );
    let debug = format!("{:?}", c.providers[0]);
    assert!(!debug.contains("s3cr3t"), "{debug}");
    assert!(debug.contains("x-token"), "{debug}");
}

#[test]
fn reports_every_error_with_its_path() {
    let text = r#"
listen: "localhost"
max_body_bytes: 10
storage: "mysql://x"
bogus: 1
providers:
  - name: good
    base_url: https://api.example.com/v1
    models:
      - name: a
  - name: Bad/Name
    base_url: ftp://example.com
    api_key_env: "1NOPE"
    stream_usage: "yes"
    modles: []
    models:
      - name: ""
        input_pirce_per_mtok: 0.1
        tokenizer: p50k_base
      - name: dup
      - name: dup
        output_price_per_mtok: -1
  - name: good
    base_url: http://h
    models: []
tiers:
  pro:
    requests_per_minute: "abc"
    tokens_per_day: 0
    burst: 5
upstream:
  connect_timeout_ms: 0
server:
  threads: 300
usage:
  queue_capacity: 0
keys:
  refresh_interval_ms: 5000
"#;
    let got = errors(text);
    // Unknown keys of a map are reported first, then its fields in schema order.
    let expected = [
        "bogus: unknown key (expected one of: listen, metrics_listen, storage, max_body_bytes, providers, tiers, upstream, server, usage, keys, bench_ablate, redis, admin_listen, admin_token_env, admin_readonly_token_env)",
        "listen: expected an IP:port address like \"127.0.0.1:8080\" or \"[::1]:8080\", got \"localhost\"",
        "storage: expected sqlite://<path>, sqlite::memory:, postgres://... or postgresql://..., got \"mysql://x\"",
        "max_body_bytes: must be between 1024 and 1073741824, got 10",
        "providers[1].modles: unknown key (expected one of: name, base_url, api_key_env, stream_usage, headers, models)",
        "providers[1].name: must match [a-z0-9_-]+ (lowercase letters, digits, '_' and '-'), got \"Bad/Name\"",
        "providers[1].base_url: scheme must be http or https, got \"ftp\"",
        "providers[1].api_key_env: expected an environment variable name like OPENAI_API_KEY, got \"1NOPE\"",
        "providers[1].stream_usage: expected true or false, got \"yes\"",
        "providers[1].models[0].input_pirce_per_mtok: unknown key (expected one of: name, upstream_name, tokenizer, input_price_per_mtok, output_price_per_mtok, cached_input_price_per_mtok)",
        "providers[1].models[0].name: must not be empty",
        "providers[1].models[0].tokenizer: expected one of: o200k_base, cl100k_base, got \"p50k_base\"",
        "providers[1].models[2].output_price_per_mtok: must not be negative, got -1",
        "providers[1].models[2].name: duplicate model name \"dup\" in this provider",
        "providers[2].models: at least one model is required",
        "providers[2].name: duplicate provider name \"good\"",
        "tiers.pro.burst: unknown key (expected one of: requests_per_second, requests_per_minute, requests_per_hour, requests_per_day, tokens_per_minute, tokens_per_day, max_concurrent, default_max_tokens, spend_usd_per_day, spend_usd_per_month, enforce_mid_stream)",
        "tiers.pro.requests_per_minute: expected a positive integer, got \"abc\"",
        "tiers.pro.tokens_per_day: expected a positive integer, got 0",
        "upstream.connect_timeout_ms: expected a positive integer, got 0",
        "server.threads: must be at most 256, got 300",
        "usage.queue_capacity: expected a positive integer, got 0",
        "keys.refresh_interval_ms: must be between 10 and 1000, got 5000",
    ];
    assert_eq!(got, expected, "\nactual:\n{}", got.join("\n"));
}

#[test]
fn duplicate_model_names_within_a_provider_are_errors() {
    let got = errors(
        "providers:\n  - name: p\n    base_url: http://h\n    models: [{name: m}, {name: m}]\n  - name: q\n    base_url: http://h\n    models: [{name: m}]\ntiers: {free: {}}\n",
    );
    assert_eq!(
        got,
        ["providers[0].models[1].name: duplicate model name \"m\" in this provider"]
    );
}

#[test]
fn missing_required_sections() {
    let got = errors("listen: \"127.0.0.1:1\"\n");
    assert_eq!(
        got,
        [
            "providers: required key is missing (configure at least one provider)",
            "tiers: required key is missing (configure at least one tier)",
        ]
    );
    let got = errors("");
    assert_eq!(got.len(), 2);
    let got = errors("providers: []\ntiers: {}\n");
    assert_eq!(
        got,
        [
            "providers: at least one provider is required",
            "tiers: at least one tier is required",
        ]
    );
    let got = errors("- a\n- b\n");
    assert_eq!(got, ["expected a map at the top level, got a list"]);
    let got = errors("providers:\n  - name: p\n    models: [{name: m}]\ntiers: {free: {}}\n");
    assert_eq!(got, ["providers[0].base_url: required key is missing"]);
}

#[test]
fn cross_field_bounds() {
    let e = with_top("usage: {queue_capacity: 10, batch_size: 20}\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "usage.batch_size: must not exceed usage.queue_capacity (10), got 20"
    );
    let e = with_top("keys: {refresh_interval_ms: 1001}\nserver: {threads: 0}\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "server.threads: expected a positive integer, got 0\nkeys.refresh_interval_ms: must be between 10 and 1000, got 1001"
    );
    assert!(with_top("keys: {refresh_interval_ms: 1000}\n").is_ok());
    let e = with_top("keys: {last_used_flush_interval_ms: 0}\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "keys.last_used_flush_interval_ms: must be between 10 and 3600000, got 0"
    );
    let c = with_top("keys: {last_used_flush_interval_ms: 50}\n").unwrap();
    assert_eq!(c.keys.last_used_flush_interval, Duration::from_millis(50));
    assert!(with_top("max_body_bytes: 1024\n").is_ok());
    assert!(with_top("max_body_bytes: 1023\n").is_err());
    assert!(with_top("max_body_bytes: 2.5\n").is_err());
}

#[test]
fn prices_are_exact() {
    assert_eq!(price_of("0.15"), Ok(150_000));
    assert_eq!(price_of("0.3"), Ok(300_000));
    assert_eq!(price_of("0.30000000"), Ok(300_000));
    assert_eq!(price_of("2.5"), Ok(2_500_000));
    assert_eq!(price_of("3"), Ok(3_000_000));
    assert_eq!(price_of("0"), Ok(0));
    assert_eq!(price_of("0.000001"), Ok(1));
    assert_eq!(price_of("1.5e-3"), Ok(1_500));
    assert_eq!(price_of("1e2"), Ok(100_000_000));
    assert_eq!(price_of("\"0.15\""), Ok(150_000));
    assert_eq!(price_of("123456789.123456"), Ok(123_456_789_123_456));
    let p = "providers[0].models[0].input_price_per_mtok";
    assert_eq!(
        price_of("1e-7"),
        Err(vec![format!(
            "{p}: at most 6 decimal places are supported, got 1e-7"
        )])
    );
    assert_eq!(
        price_of("0.0000001"),
        Err(vec![format!(
            "{p}: at most 6 decimal places are supported, got 1e-7"
        )])
    );
    assert_eq!(
        price_of("0.1234567"),
        Err(vec![format!(
            "{p}: at most 6 decimal places are supported, got 0.1234567"
        )])
    );
    assert_eq!(
        price_of("-0.5"),
        Err(vec![format!("{p}: must not be negative, got -0.5")])
    );
    assert_eq!(
        price_of("abc"),
        Err(vec![format!(
            "{p}: expected a decimal number (e.g. 0.15), got \"abc\""
        )])
    );
    assert!(price_of(".inf").is_err());
    assert!(price_of("99999999999999999999").is_err());
}

#[test]
fn price_arithmetic_and_display() {
    let price = Price {
        micros_per_mtok: 150_000,
    };
    // 1M tokens at 0.15 $/Mtok = 0.15 USD = 150_000_000_000 pico-USD.
    assert_eq!(price.cost_pico_usd(1_000_000), 150_000_000_000);
    assert_eq!(price.to_string(), "0.15");
    assert_eq!(
        Price {
            micros_per_mtok: 2_000_000
        }
        .to_string(),
        "2"
    );
    assert_eq!(UsdAmount { micros: 1 }.to_string(), "0.000001");
}

#[test]
fn tiers_accept_all_limits() {
    let c = with_top(
        "  pro:
    requests_per_second: 1
    requests_per_minute: 2
    requests_per_hour: 3
    requests_per_day: 4
    tokens_per_minute: 5
    tokens_per_day: 6
    max_concurrent: 7
    default_max_tokens: 8
    spend_usd_per_day: 0.5
    spend_usd_per_month: 12
    enforce_mid_stream: true
",
    );
    // MINIMAL ends inside `tiers:`, so the indented block adds a tier.
    let c = c.unwrap();
    let pro = c.tier("pro").unwrap();
    assert_eq!(
        pro,
        &Tier {
            name: "pro".to_owned(),
            requests_per_second: Some(1),
            requests_per_minute: Some(2),
            requests_per_hour: Some(3),
            requests_per_day: Some(4),
            tokens_per_minute: Some(5),
            tokens_per_day: Some(6),
            max_concurrent: Some(7),
            default_max_tokens: Some(8),
            spend_usd_per_day: Some(UsdAmount { micros: 500_000 }),
            spend_usd_per_month: Some(UsdAmount { micros: 12_000_000 }),
            enforce_mid_stream: true,
        }
    );
    let e =
        with_top("  x:\n    spend_usd_per_day: 0\n    requests_per_day: 5000000000\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "tiers.x.requests_per_day: must be at most 4294967295, got 5000000000\ntiers.x.spend_usd_per_day: must be positive (omit the key for no limit)"
    );
    let e = with_top("  Pro: {}\n").unwrap_err();
    assert_eq!(e.0[0].path, "tiers.Pro");
}

#[test]
fn tiers_can_share_settings_with_merge_keys() {
    let c = parse(
        "providers: [{name: p, base_url: \"http://h\", models: [{name: m}]}]
tiers:
  free: &base
    requests_per_minute: 10
    max_concurrent: 2
  plus:
    <<: *base
    requests_per_minute: 60
",
    );
    let plus = c.tier("plus").unwrap();
    assert_eq!(plus.requests_per_minute, Some(60));
    assert_eq!(plus.max_concurrent, Some(2));
}

fn resolver() -> Config {
    parse(
        "providers:
  - name: alpha
    base_url: http://a
    models:
      - name: shared
      - name: meta-llama/Llama-3-8B
  - name: beta
    base_url: http://b
    models:
      - name: shared
      - name: only-beta
      - name: alpha/not-a-provider-prefix
  - name: meta-llama
    base_url: http://m
    models:
      - name: Llama-3-8B
tiers: {free: {}}
",
    )
}

#[test]
fn resolve_model_bare_names_pick_first_provider() {
    let c = resolver();
    assert_eq!(c.resolve_model("shared"), Some((0, 0)));
    assert_eq!(c.resolve_model("only-beta"), Some((1, 1)));
    assert_eq!(c.resolve_model("missing"), None);
    assert_eq!(c.resolve_model(""), None);
}

#[test]
fn resolve_model_explicit_provider() {
    let c = resolver();
    assert_eq!(c.resolve_model("beta/shared"), Some((1, 0)));
    assert_eq!(c.resolve_model("alpha/shared"), Some((0, 0)));
    // Provider prefix wins when it names a provider offering the rest.
    assert_eq!(c.resolve_model("meta-llama/Llama-3-8B"), Some((2, 0)));
    assert_eq!(c.resolve_model("alpha/meta-llama/Llama-3-8B"), Some((0, 1)));
    assert_eq!(c.resolve_model("beta/only-beta"), Some((1, 1)));
    assert_eq!(c.resolve_model("alpha/only-beta"), None);
    assert_eq!(c.resolve_model("gamma/shared"), None);
}

#[test]
fn resolve_model_names_containing_slashes() {
    let c = parse(
        "providers:
  - name: together
    base_url: https://api.together.xyz/v1
    models:
      - name: meta-llama/Llama-3-8B
      - name: a/b/c
tiers: {free: {}}
",
    );
    // "meta-llama" is not a provider, so the whole string is the model name.
    assert_eq!(c.resolve_model("meta-llama/Llama-3-8B"), Some((0, 0)));
    assert_eq!(
        c.resolve_model("together/meta-llama/Llama-3-8B"),
        Some((0, 0))
    );
    assert_eq!(c.resolve_model("a/b/c"), Some((0, 1)));
    assert_eq!(c.resolve_model("together/a/b/c"), Some((0, 1)));
    assert_eq!(c.resolve_model("together/Llama-3-8B"), None);
    // A provider prefix whose provider lacks the model falls back to the full name.
    let c = resolver();
    assert_eq!(c.resolve_model("alpha/not-a-provider-prefix"), Some((1, 2)));
}

#[test]
fn yaml_syntax_error_has_line_info() {
    let text = "providers:\n  - name: p\n    base_url: [unclosed\ntiers: {}\n";
    let e = Config::from_yaml_str(text).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].path, "");
    let msg = e.to_string();
    assert!(msg.starts_with("invalid YAML: "), "{msg}");
    assert!(msg.contains("line "), "{msg}");

    let text = "tiers:\n  free: {}\n   bad indent: 1\n";
    let msg = Config::from_yaml_str(text).unwrap_err().to_string();
    assert!(msg.contains("line 3"), "{msg}");
}

#[test]
fn duplicate_yaml_keys_are_rejected() {
    let msg = Config::from_yaml_str(&format!(
        "{MINIMAL}listen: \"127.0.0.1:1\"\nlisten: \"127.0.0.1:2\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(msg.contains("duplicate"), "{msg}");
}

#[test]
fn load_names_the_file() {
    let missing = Path::new("/nonexistent/ai4free-test.yaml");
    let e = Config::load(missing).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(
        e.0[0]
            .message
            .starts_with("/nonexistent/ai4free-test.yaml: "),
        "{e}"
    );

    let dir = std::env::temp_dir().join(format!("ai4free-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "providers: [\n").unwrap();
    let e = Config::load(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: invalid YAML", bad.display())),
        "{e}"
    );
    let good = dir.join("good.yaml");
    std::fs::write(&good, QUICK_START).unwrap();
    assert!(Config::load(&good).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn base_urls() {
    let u = BaseUrl::parse("https://api.openai.com/v1/").unwrap();
    assert_eq!(
        u,
        BaseUrl {
            tls: true,
            host: "api.openai.com".to_owned(),
            port: 443,
            path_prefix: "/v1".to_owned()
        }
    );
    assert_eq!(u.to_string(), "https://api.openai.com/v1");
    assert_eq!(u.authority(), "api.openai.com");
    assert_eq!(u.host_and_port(), "api.openai.com:443");

    let u = BaseUrl::parse("HTTP://Example.COM:8080").unwrap();
    assert_eq!((u.tls, u.port, u.path_prefix.as_str()), (false, 8080, ""));
    assert_eq!(u.to_string(), "http://example.com:8080");
    assert_eq!(u.authority(), "example.com:8080");

    let u = BaseUrl::parse("http://example.com:80/").unwrap();
    assert_eq!(u.to_string(), "http://example.com");

    let u = BaseUrl::parse("http://[::1]:9090/v1").unwrap();
    assert_eq!(u.host, "::1");
    assert_eq!(u.authority(), "[::1]:9090");
    assert_eq!(u.to_string(), "http://[::1]:9090/v1");
    let u = BaseUrl::parse("https://[2001:db8::1]/").unwrap();
    assert_eq!(u.authority(), "[2001:db8::1]");
    assert_eq!(u.host_and_port(), "[2001:db8::1]:443");

    for bad in [
        "",
        "api.openai.com/v1",
        "ftp://h",
        "https://user:pw@h/v1",
        "https://h/v1?x=1",
        "https://h/v1#frag",
        "https://::1/v1",
        "https://[::1/v1",
        "https://[zz::1]/v1",
        "https:///v1",
        "https://h:0",
        "https://h:+80",
        "https://h:99999",
        "https://h /v1",
    ] {
        assert!(BaseUrl::parse(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn headers_are_validated() {
    let got = errors(
        "providers:
  - name: p
    base_url: http://h
    headers:
      X-Version: 2
      Authorization: Bearer x
      host: h
      \"bad name\": v
      x-ok: \"line\\nbreak\"
      x-version: 3
    models: [{name: m}]
tiers: {free: {}}
",
    );
    assert_eq!(
        got,
        [
            "providers[0].headers.Authorization: set the provider key with api_key_env, not a static authorization header",
            "providers[0].headers.host: header \"host\" is managed by the gateway",
            "providers[0].headers[\"bad name\"]: invalid HTTP header name \"bad name\"",
            "providers[0].headers.x-ok: invalid HTTP header value (only visible ASCII, spaces and tabs are allowed)",
            "providers[0].headers.x-version: duplicate header \"x-version\" (names are case-insensitive)",
        ]
    );
    let c = parse(
        "providers: [{name: p, base_url: \"http://h\", headers: {X-Version: 2}, models: [{name: m}]}]\ntiers: {free: {}}\n",
    );
    assert_eq!(
        c.providers[0].headers,
        [("x-version".to_owned(), "2".to_owned())]
    );
}

#[test]
fn errors_display_one_per_line() {
    let e = ConfigErrors(vec![
        ConfigError {
            path: String::new(),
            message: "file.yaml: broken".to_owned(),
        },
        ConfigError {
            path: "a.b".to_owned(),
            message: "bad".to_owned(),
        },
    ]);
    assert_eq!(e.to_string(), "file.yaml: broken\na.b: bad");
}

#[test]
fn bench_ablations_parse_and_reject_unknown_names() {
    let base = "providers:\n  - name: p\n    base_url: http://127.0.0.1:1/v1\n    models: [{ name: m }]\ntiers:\n  t: { requests_per_minute: 1 }\n";
    let c = Config::from_yaml_str(&format!("{base}bench_ablate: [auth, counting]\n")).unwrap();
    assert!(c.ablate.auth && c.ablate.counting && !c.ablate.usage);
    assert_eq!(c.ablate.names(), vec!["auth", "counting"]);
    assert_eq!(
        Config::from_yaml_str(base).unwrap().ablate,
        Ablations::default()
    );
    let e = Config::from_yaml_str(&format!("{base}bench_ablate: [auth, cache]\n")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("bench_ablate[1]: unknown capability \"cache\""),
        "{e}"
    );
}

#[test]
fn redis_section_is_optional_and_has_defaults() {
    assert_eq!(parse(MINIMAL).redis, None);
    assert_eq!(with_top("redis: null\n").unwrap().redis, None);
    let c = with_top("redis: { url: \"redis://127.0.0.1:6379\" }\n").unwrap();
    assert_eq!(
        c.redis,
        Some(RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            timeout: Duration::from_millis(20),
            on_failure: OnFailure::LocalShare,
            nodes: 1,
            lease_ttl: Duration::from_secs(30),
        })
    );
    let c = with_top(
        "redis: { url: \"rediss://:pw@cache.internal:6380/2\", timeout_ms: 5000, on_failure: deny, nodes: 3, lease_ttl_ms: 900 }\n",
    )
    .unwrap();
    let r = c.redis.unwrap();
    assert_eq!(r.url, "rediss://:pw@cache.internal:6380/2");
    assert_eq!(r.timeout, Duration::from_secs(5));
    assert_eq!(r.on_failure, OnFailure::Deny);
    assert_eq!(r.lease_ttl, Duration::from_millis(900));
    assert_eq!(r.nodes, 3);
    for (text, mode) in [
        ("allow", OnFailure::Allow),
        ("local_share", OnFailure::LocalShare),
    ] {
        let c = with_top(&format!(
            "redis: {{ url: \"redis://h\", on_failure: {text} }}\n"
        ))
        .unwrap();
        assert_eq!(c.redis.unwrap().on_failure, mode);
        assert_eq!(mode.as_str(), text);
    }
}

#[test]
fn redis_errors_name_their_path_and_hide_the_password() {
    let got = errors(&format!(
        "{MINIMAL}redis: {{ url: \"mysql://u:hunter2@h\", timeout_ms: 0, on_failure: sometimes, nodes: 0, pool: 4 }}\n"
    ));
    assert_eq!(
        got,
        [
            "redis.pool: unknown key (expected one of: url, timeout_ms, on_failure, nodes, lease_ttl_ms)",
            "redis.url: expected a redis:// or rediss:// URL such as redis://127.0.0.1:6379, got \"mysql://u:***@h\"",
            "redis.timeout_ms: expected a positive integer, got 0",
            "redis.on_failure: expected one of: local_share, allow, deny, got \"sometimes\"",
            "redis.nodes: expected a positive integer, got 0",
        ]
    );
    let got = errors(&format!("{MINIMAL}redis: {{ timeout_ms: 5001 }}\n"));
    assert_eq!(
        got,
        [
            "redis.url: required key is missing",
            "redis.timeout_ms: must be at most 5000, got 5001",
        ]
    );
    for bad in ["redis://", "redis://:secret@", "redis://h st", "redis"] {
        let got = errors(&format!("{MINIMAL}redis: {{ url: \"{bad}\" }}\n"));
        assert_eq!(got.len(), 1, "{bad}: {got:?}");
        assert!(got[0].starts_with("redis.url: "), "{got:?}");
        assert!(!got[0].contains("secret"), "{got:?}");
    }
    let got = errors(&format!("{MINIMAL}redis: 5\n"));
    assert_eq!(got, ["redis: expected a map, got 5"]);
}

#[test]
fn redis_debug_output_redacts_the_password() {
    let c = with_top("redis: { url: \"redis://user:hunter2@h:6379/0\" }\n").unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("redis://user:***@h:6379/0"), "{debug}");
}

#[test]
fn spool_dir_defaults_follow_the_storage() {
    let dir = |extra: &str| with_top(extra).unwrap().spool_dir();
    assert_eq!(
        dir("storage: \"sqlite://data/a.db\"\n"),
        PathBuf::from("data/a.db.spool")
    );
    // Two databases in one directory get two spools.
    assert_ne!(
        dir("storage: \"sqlite:///srv/x/one.db\"\n"),
        dir("storage: \"sqlite:///srv/x/two.db\"\n")
    );
    assert_eq!(
        dir("storage: \"sqlite::memory:\"\n"),
        PathBuf::from("data/spool")
    );
    assert_eq!(
        dir("storage: \"postgres://u@h/db\"\n"),
        PathBuf::from("data/spool")
    );
    assert_eq!(
        dir("usage: { spool_dir: /var/spool/a4f }\n"),
        PathBuf::from("/var/spool/a4f")
    );
}
