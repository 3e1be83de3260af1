//! The `ai4free` command line: serve, check-config, migrate, keys and usage.
//!
//! Key and usage commands work straight on the configured store, so no running
//! server is needed; a running server picks key changes up within a second. They
//! validate through the same cores as the admin API (`admin::edit`,
//! `admin::report`) by turning their flags into the API's JSON, print keys with
//! the API's view (`admin::view::key_json`) under `--json`, and audit every change
//! as actor `cli`. An error names the flag to fix ([`flag_error`]).
#![allow(clippy::print_stdout)]

mod keys;
mod table;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::admin::FieldError;
use crate::config::Config;
use crate::store::{self, Store, StoreError};

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
        cmd: keys::KeysCmd,
    },
    /// Read recorded usage.
    Usage {
        #[command(subcommand)]
        cmd: usage::UsageCmd,
    },
}

/// Who the audit log says made a change through the CLI.
const ACTOR: &str = "cli";

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
    store::open(&cfg.storage).await.map_err(store_error)
}

fn store_error(e: StoreError) -> String {
    match e {
        StoreError::Invalid(m) => format!("--cursor: {m}"),
        e => e.to_string(),
    }
}

/// The flag a field of the API's JSON (or a report parameter) came from.
fn flag_of(field: &str) -> String {
    if let Some(limit) = field.strip_prefix("limits.") {
        return format!("--limit {limit}");
    }
    let flag = match field.split('[').next().unwrap_or(field) {
        "limits" => "--limit",
        "expires_at" => "--expires-at",
        "expires_in" => "--expires-in",
        "grace_seconds" => "--grace",
        "key_id" => "--key-id",
        "group_by" => "--group-by",
        "name_prefix" => "--name-prefix",
        "format" => "--json/--csv",
        "body" => "arguments",
        other => return format!("--{}", other.replace('_', "-")),
    };
    flag.to_owned()
}

/// A validation error as the CLI prints it: the flag, then what is wrong.
fn flag_error(e: FieldError) -> String {
    format!("{}: {}", flag_of(&e.field), e.message)
}

/// Log targets (exact) whose trace records carry secrets, dropped whatever
/// `RUST_LOG` asks. Pingora traces the client's request header with its key
/// (`pingora_proxy`), the admin request header with the admin token (`http_app`,
/// which serves the admin API) and the raw upstream request with the provider's
/// key (the v1 client); `tests/secrets.rs` found all three. Debug records stay:
/// the parsed upstream header they print has the provider key marked sensitive,
/// and the client's key already removed.
const SECRET_TRACES: &[&str] = &[
    "pingora_proxy",
    "pingora_core::apps::http_app",
    "pingora_core::protocols::http::v1::client",
];

/// The configured logger minus [`SECRET_TRACES`] at trace level.
struct Redacting(env_logger::Logger);

impl Redacting {
    fn allows(metadata: &log::Metadata<'_>) -> bool {
        metadata.level() < log::Level::Trace || !SECRET_TRACES.contains(&metadata.target())
    }
}

impl log::Log for Redacting {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        Redacting::allows(metadata) && self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if Redacting::allows(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
            .build();
    log::set_max_level(logger.filter());
    // Only fails if a logger is already set, which nothing before this does.
    let _ = log::set_boxed_logger(Box::new(Redacting(logger)));
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
        Command::Keys { cmd } => runtime()?.block_on(keys::run(cmd)),
        Command::Usage { cmd } => runtime()?.block_on(usage::run(cmd)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fields_map_to_their_flags() {
        for (field, flag) in [
            ("tier", "--tier"),
            ("name", "--name"),
            ("models[2]", "--models"),
            ("metadata", "--metadata"),
            ("limits", "--limit"),
            ("limits.requests_per_minute", "--limit requests_per_minute"),
            ("expires_at", "--expires-at"),
            ("expires_in", "--expires-in"),
            ("grace_seconds", "--grace"),
            ("key_id", "--key-id"),
            ("group_by", "--group-by"),
            ("since", "--since"),
            ("format", "--json/--csv"),
        ] {
            assert_eq!(flag_of(field), flag, "{field}");
        }
        assert_eq!(
            flag_error(FieldError::new("limits.rpm", "unknown limit")),
            "--limit rpm: unknown limit"
        );
    }

    #[test]
    fn secret_bearing_traces_are_dropped() {
        let meta = |target, level| log::Metadata::builder().target(target).level(level).build();
        assert!(!Redacting::allows(&meta(
            "pingora_core::protocols::http::v1::client",
            log::Level::Trace
        )));
        assert!(Redacting::allows(&meta(
            "pingora_core::protocols::http::v1::client",
            log::Level::Debug
        )));
        assert!(Redacting::allows(&meta(
            "ai4free::proxy",
            log::Level::Trace
        )));
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
