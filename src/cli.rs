//! The `ai4free` command line: serve, check-config, keys and usage.
//!
//! Key and usage commands work straight on the configured store, so no running
//! server is needed; a running server picks key changes up within a second.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::keys::{self, KeyRecord};
use crate::store::{self, Store, UsageQuery};
use crate::usage::{self, format_usd, rfc3339_ms};

/// ai4free: an OpenAI-compatible LLM API gateway.
#[derive(Parser, Debug)]
#[command(name = "ai4free", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Path to the YAML config.
    #[arg(
        long,
        short = 'c',
        env = "AI4FREE_CONFIG",
        default_value = "conf/ai4free.yaml"
    )]
    config: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Validate a config and print every problem with its path.
    CheckConfig(ConfigArg),
    /// Create or upgrade the database schema (serve does this too).
    Migrate(ConfigArg),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Read recorded usage.
    Usage {
        #[command(subcommand)]
        cmd: UsageCmd,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Create a key and print it (the only time the secret is shown).
    Create {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Tier name (a key of `tiers:` in the config).
        #[arg(long)]
        tier: String,
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
        /// The user the key belongs to.
        #[arg(long)]
        owner: Option<String>,
        /// The project the key belongs to.
        #[arg(long)]
        project: Option<String>,
        /// Lifetime, e.g. 30d, 12h, 90m.
        #[arg(long)]
        expires_in: Option<String>,
        /// Comma-separated allowed models (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Print JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; every node refuses it within a second.
    Revoke {
        #[command(flatten)]
        cfg: ConfigArg,
        /// The key's public id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum UsageCmd {
    /// Print one JSON object per proxied request (JSON Lines).
    Export {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Only requests started at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// JSON Lines output (the default; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// Totals per key and model.
    Report {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Only requests started at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn load_config(path: &std::path::Path) -> Result<Config, String> {
    let cfg = Config::load(path).map_err(|e| format!("invalid config {}:\n{e}", path.display()))?;
    let unenforced = cfg.unenforced_limits();
    if !unenforced.is_empty() {
        return Err(format!(
            "invalid config {}:\n{}",
            path.display(),
            crate::config::ConfigErrors(unenforced)
        ));
    }
    Ok(cfg)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, String> {
    store::open(&cfg.storage).await.map_err(|e| e.to_string())
}

fn parse_since(since: Option<&str>) -> Result<Option<i64>, String> {
    since
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| {
                    format!("--since: expected an RFC 3339 time like 2026-01-31T00:00:00Z: {e}")
                })
        })
        .transpose()
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::CheckConfig(c) => {
            let cfg = load_config(&c.config)?;
            println!(
                "{}: ok ({} providers, {} models, {} tiers)",
                c.config.display(),
                cfg.providers.len(),
                cfg.providers.iter().map(|p| p.models.len()).sum::<usize>(),
                cfg.tiers.len()
            );
            Ok(())
        }
        Command::Serve(c) => {
            let cfg = load_config(&c.config)?;
            let app = runtime()?
                .block_on(crate::server::App::init(cfg))
                .map_err(|e| e.to_string())?;
            crate::server::serve(app, None).map_err(|e| e.to_string())?;
            Ok(())
        }
        Command::Migrate(c) => {
            let cfg = load_config(&c.config)?;
            runtime()?.block_on(open_store(&cfg))?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Keys { cmd } => runtime()?.block_on(keys_cmd(cmd)),
        Command::Usage { cmd } => runtime()?.block_on(usage_cmd(cmd)),
    }
}

async fn keys_cmd(cmd: KeysCmd) -> Result<(), String> {
    match cmd {
        KeysCmd::Create {
            cfg,
            tier,
            name,
            owner,
            project,
            expires_in,
            models,
            json,
        } => {
            let config = load_config(&cfg.config)?;
            if config.tier(&tier).is_none() {
                let known: Vec<&str> = config.tiers.keys().map(String::as_str).collect();
                return Err(format!(
                    "--tier: unknown tier {tier:?} (configured: {})",
                    known.join(", ")
                ));
            }
            let models: Vec<String> = models
                .into_iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            for m in &models {
                if config.resolve_model(m).is_none() {
                    return Err(format!("--models: {m:?} is not a configured model"));
                }
            }
            let now = usage::now_ms();
            let expires_at_ms = match expires_in {
                Some(s) => {
                    let d = humantime::parse_duration(&s)
                        .map_err(|e| format!("--expires-in {s:?}: {e} (try 30d, 12h or 90m)"))?;
                    Some(now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
                }
                None => None,
            };
            let new = keys::generate().map_err(|e| format!("no randomness available: {e}"))?;
            let rec = KeyRecord {
                name,
                owner,
                project,
                models,
                expires_at_ms,
                ..KeyRecord::new(new.id.clone(), tier, new.secret_hash, now)
            };
            let store = open_store(&config).await?;
            store.insert_key(&rec).await.map_err(|e| e.to_string())?;
            if json {
                let mut v = key_json(&rec, now);
                v["key"] = serde_json::Value::String(new.key.clone());
                println!("{v}");
            } else {
                println!("{}", new.key);
                eprintln!(
                    "created key {} (tier {}); the key above is shown only once",
                    rec.id, rec.tier
                );
            }
            Ok(())
        }
        KeysCmd::List { cfg, json } => {
            let config = load_config(&cfg.config)?;
            let store = open_store(&config).await?;
            let list = store.list_keys().await.map_err(|e| e.to_string())?;
            let now = usage::now_ms();
            if json {
                for k in &list {
                    println!("{}", key_json(k, now));
                }
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.name.clone().unwrap_or_default(),
                            k.owner.clone().unwrap_or_default(),
                            k.project.clone().unwrap_or_default(),
                            k.tier.clone(),
                            k.status(now).as_str().to_owned(),
                            k.expires_at_ms.map(rfc3339_ms).unwrap_or_default(),
                            if k.models.is_empty() {
                                "*".into()
                            } else {
                                k.models.join(",")
                            },
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID", "NAME", "OWNER", "PROJECT", "TIER", "STATUS", "EXPIRES", "MODELS",
                    ],
                    &rows,
                );
            }
            Ok(())
        }
        KeysCmd::Revoke { cfg, id } => {
            let config = load_config(&cfg.config)?;
            let store = open_store(&config).await?;
            if store
                .revoke_key(&id, usage::now_ms())
                .await
                .map_err(|e| e.to_string())?
            {
                println!("revoked {id}");
                Ok(())
            } else {
                Err(format!("no key with id {id:?}"))
            }
        }
    }
}

fn key_json(k: &KeyRecord, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "name": k.name,
        "owner": k.owner,
        "project": k.project,
        "tier": k.tier,
        "models": k.models,
        "status": k.status(now).as_str(),
        "created_at": rfc3339_ms(k.created_at_ms),
        "expires_at": k.expires_at_ms.map(rfc3339_ms),
        "revoked_at": k.revoked_at_ms.map(rfc3339_ms),
    })
}

async fn usage_cmd(cmd: UsageCmd) -> Result<(), String> {
    match cmd {
        UsageCmd::Export {
            cfg,
            since,
            json: _,
        } => {
            let config = load_config(&cfg.config)?;
            let store = open_store(&config).await?;
            let q = UsageQuery {
                since_ms: parse_since(since.as_deref())?,
                ..Default::default()
            };
            let rows = store.query_usage(&q).await.map_err(|e| e.to_string())?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for r in &rows {
                use std::io::Write;
                writeln!(out, "{}", r.to_json()).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        UsageCmd::Report { cfg, since, json } => {
            let config = load_config(&cfg.config)?;
            let store = open_store(&config).await?;
            let q = UsageQuery {
                since_ms: parse_since(since.as_deref())?,
                ..Default::default()
            };
            let rows = store.usage_report(&q).await.map_err(|e| e.to_string())?;
            let cost = |c: i128| format_usd(i64::try_from(c).unwrap_or(i64::MAX));
            if json {
                for r in &rows {
                    println!(
                        "{}",
                        serde_json::json!({
                            "key_id": r.key_id, "model": r.model, "requests": r.requests,
                            "ok_requests": r.ok_requests, "failed_requests": r.requests - r.ok_requests,
                            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                            "cost_usd": cost(r.cost_pusd),
                        })
                    );
                }
            } else {
                let mut table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.key_id.clone(),
                            if r.model.is_empty() {
                                "-".into()
                            } else {
                                r.model.clone()
                            },
                            r.requests.to_string(),
                            (r.requests - r.ok_requests).to_string(),
                            r.prompt_tokens.to_string(),
                            r.completion_tokens.to_string(),
                            cost(r.cost_pusd),
                        ]
                    })
                    .collect();
                let total = rows.iter().fold((0u64, 0u64, 0u64, 0u64, 0i128), |a, r| {
                    (
                        a.0 + r.requests,
                        a.1 + r.requests - r.ok_requests,
                        a.2 + r.prompt_tokens,
                        a.3 + r.completion_tokens,
                        a.4 + r.cost_pusd,
                    )
                });
                table.push(vec![
                    "TOTAL".into(),
                    String::new(),
                    total.0.to_string(),
                    total.1.to_string(),
                    total.2.to_string(),
                    total.3.to_string(),
                    cost(total.4),
                ]);
                print_table(
                    &[
                        "KEY",
                        "MODEL",
                        "REQUESTS",
                        "FAILED",
                        "PROMPT_TOKENS",
                        "COMPLETION_TOKENS",
                        "COST_USD",
                    ],
                    &table,
                );
            }
            Ok(())
        }
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}
