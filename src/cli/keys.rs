//! `ai4free keys create|list|show|update|revoke|rotate`.
//!
//! Flags become the admin API's JSON and go through `admin::edit`, so a key the
//! CLI makes or changes is exactly one the API would accept. A secret is printed
//! once, by the command that made it (create, rotate), and never stored.

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::table::{cell, print_table};
use super::{flag_error, load_config, open_store, store_error, ConfigArg, ACTOR};
use crate::admin::edit::parse_grace_seconds;
use crate::admin::ops::{KeyOps, OpError};
use crate::admin::view::{key_json, limits_json};
use crate::config::Config;
use crate::keys::{KeyRecord, KeyStatus};
use crate::store::{KeyFilter, Store, StoreError};
use crate::usage::{now_ms, rfc3339_ms};

#[derive(Subcommand, Debug)]
pub(super) enum KeysCmd {
    /// Create a key and print it (the only time the secret is shown).
    Create(CreateArgs),
    /// List keys (never their secrets), filtered and a page at a time.
    List(ListArgs),
    /// Show one key.
    Show {
        #[command(flatten)]
        cfg: ConfigArg,
        /// The key's public id.
        id: String,
        /// Print the key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a key's name, tier, models, metadata, limits or expiry.
    Update(UpdateArgs),
    /// Revoke a key; every node refuses it within a second.
    Revoke {
        #[command(flatten)]
        cfg: ConfigArg,
        /// The key's public id.
        id: String,
        /// Print the revoked key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a key a new secret (same id) and print it once.
    Rotate {
        #[command(flatten)]
        cfg: ConfigArg,
        /// The key's public id.
        id: String,
        /// How long the old secret keeps working, e.g. 1h (default: it stops now).
        #[arg(long)]
        grace: Option<String>,
        /// Print the key, with its new secret, as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub(super) struct CreateArgs {
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
    /// Comma-separated allowed models (default: all the tier allows).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// A JSON object kept with the key.
    #[arg(long)]
    metadata: Option<String>,
    /// Override one of the tier's limits, e.g. requests_per_minute=60 or
    /// spend_usd_per_month=2.5 (repeatable).
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// Lifetime, e.g. 30d, 12h, 90m.
    #[arg(long, conflicts_with = "expires_at")]
    expires_in: Option<String>,
    /// Expiry as an RFC 3339 time.
    #[arg(long)]
    expires_at: Option<String>,
    /// Print a JSON object (with the secret as `key`) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(super) struct ListArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    /// Only keys of this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only keys of this project.
    #[arg(long)]
    project: Option<String>,
    /// Only keys of this tier.
    #[arg(long)]
    tier: Option<String>,
    /// Only keys in this state: active, revoked or expired.
    #[arg(long)]
    status: Option<String>,
    /// Only keys whose name starts with this text.
    #[arg(long)]
    name_prefix: Option<String>,
    /// Keys per page.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// Continue after this cursor (printed on stderr by the previous page).
    #[arg(long, conflicts_with = "all")]
    cursor: Option<String>,
    /// Walk every page.
    #[arg(long)]
    all: bool,
    /// Print JSON Lines, one key per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(super) struct UpdateArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    /// The key's public id.
    id: String,
    /// New label.
    #[arg(long, conflicts_with = "clear_name")]
    name: Option<String>,
    /// Remove the label.
    #[arg(long)]
    clear_name: bool,
    /// New tier.
    #[arg(long)]
    tier: Option<String>,
    /// Comma-separated allowed models (replaces the list).
    #[arg(long, value_delimiter = ',', conflicts_with = "all_models")]
    models: Vec<String>,
    /// Allow every model the tier allows.
    #[arg(long)]
    all_models: bool,
    /// A JSON object replacing the key's metadata.
    #[arg(long)]
    metadata: Option<String>,
    /// Set one limit override, keeping the others (repeatable).
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// Remove every limit override first (the tier decides again).
    #[arg(long)]
    clear_limits: bool,
    /// New lifetime from now, e.g. 30d.
    #[arg(long, conflicts_with_all = ["expires_at", "no_expiry"])]
    expires_in: Option<String>,
    /// New expiry as an RFC 3339 time.
    #[arg(long, conflicts_with = "no_expiry")]
    expires_at: Option<String>,
    /// Never expire.
    #[arg(long)]
    no_expiry: bool,
    /// Print the updated key as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(cmd: KeysCmd) -> Result<(), String> {
    match cmd {
        KeysCmd::Create(a) => create(a).await,
        KeysCmd::List(a) => list(a).await,
        KeysCmd::Show { cfg, id, json } => {
            let store = open_store(&load_config(&cfg.config)?).await?;
            let k = get(store.as_ref(), &id).await?;
            print_key(&k, json, None);
            Ok(())
        }
        KeysCmd::Update(a) => update(a).await,
        KeysCmd::Revoke { cfg, id, json } => {
            let config = load_config(&cfg.config)?;
            let store = open_store(&config).await?;
            let k = ops(store.as_ref(), &config)
                .revoke(&id, now_ms())
                .await
                .map_err(|e| op_error(e, &id))?;
            if json {
                print_key(&k, true, None);
            } else {
                println!("revoked {id}");
            }
            Ok(())
        }
        KeysCmd::Rotate {
            cfg,
            id,
            grace,
            json,
        } => rotate(cfg, id, grace, json).await,
    }
}

async fn create(a: CreateArgs) -> Result<(), String> {
    let config = load_config(&a.cfg.config)?;
    let mut body = Map::new();
    body.insert("tier".into(), a.tier.into());
    for (field, v) in [("name", a.name), ("owner", a.owner), ("project", a.project)] {
        if let Some(v) = v {
            body.insert(field.into(), v.into());
        }
    }
    if !a.models.is_empty() {
        body.insert("models".into(), models(a.models).into());
    }
    if let Some(m) = a.metadata {
        body.insert("metadata".into(), metadata(&m)?);
    }
    if !a.limits.is_empty() {
        body.insert("limits".into(), limits(Map::new(), &a.limits)?.into());
    }
    if let Some(e) = a.expires_in {
        body.insert("expires_in".into(), e.into());
    }
    if let Some(e) = a.expires_at {
        body.insert("expires_at".into(), e.into());
    }
    let store = open_store(&config).await?;
    let issued = ops(store.as_ref(), &config)
        .create(&Value::Object(body), now_ms())
        .await
        .map_err(|e| op_error(e, ""))?;
    let rec = &issued.record;
    if a.json {
        print_key(rec, true, Some(&issued.key));
    } else {
        println!("{}", issued.key);
        eprintln!(
            "created key {} (tier {}); the key above is shown only once",
            rec.id, rec.tier
        );
    }
    Ok(())
}

async fn list(a: ListArgs) -> Result<(), String> {
    let config = load_config(&a.cfg.config)?;
    let now = now_ms();
    let status = a
        .status
        .as_deref()
        .map(|s| {
            KeyStatus::parse(s)
                .ok_or_else(|| format!("--status: {s:?} is not one of active, revoked, expired"))
        })
        .transpose()?;
    let filter = KeyFilter {
        owner: a.owner,
        project: a.project,
        tier: a.tier,
        status,
        name_prefix: a.name_prefix,
        now_ms: now,
    };
    let store = open_store(&config).await?;
    let mut cursor = a.cursor;
    let mut rows: Vec<Vec<String>> = Vec::new();
    loop {
        let page = store
            .find_keys(&filter, usize::from(a.limit), cursor.as_deref())
            .await
            .map_err(store_error)?;
        for k in &page.keys {
            if a.json {
                println!("{}", key_json(k, now));
            } else {
                rows.push(list_row(k, now));
            }
        }
        cursor = page.next_cursor;
        if !a.all || cursor.is_none() {
            break;
        }
    }
    if !a.json {
        print_table(
            &[
                "ID",
                "NAME",
                "OWNER",
                "PROJECT",
                "TIER",
                "STATUS",
                "EXPIRES",
                "LAST_USED",
                "MODELS",
            ],
            &rows,
        );
    }
    if let Some(c) = cursor {
        eprintln!("next cursor: {c} (more keys: pass --cursor {c}, or --all)");
    }
    Ok(())
}

fn list_row(k: &KeyRecord, now: i64) -> Vec<String> {
    vec![
        k.id.clone(),
        cell(k.name.as_deref()),
        cell(k.owner.as_deref()),
        cell(k.project.as_deref()),
        k.tier.clone(),
        k.status(now).as_str().to_owned(),
        cell(k.expires_at_ms.map(rfc3339_ms).as_deref()),
        cell(k.last_used_at_ms.map(rfc3339_ms).as_deref()),
        if k.models.is_empty() {
            "*".into()
        } else {
            k.models.join(",")
        },
    ]
}

async fn update(a: UpdateArgs) -> Result<(), String> {
    let config = load_config(&a.cfg.config)?;
    let mut body = Map::new();
    if let Some(n) = a.name {
        body.insert("name".into(), n.into());
    } else if a.clear_name {
        body.insert("name".into(), Value::Null);
    }
    if let Some(t) = a.tier {
        body.insert("tier".into(), t.into());
    }
    if a.all_models {
        body.insert("models".into(), Value::Null);
    } else if !a.models.is_empty() {
        body.insert("models".into(), models(a.models).into());
    }
    if let Some(m) = a.metadata {
        body.insert("metadata".into(), metadata(&m)?);
    }
    if let Some(e) = a.expires_in {
        body.insert("expires_in".into(), e.into());
    } else if let Some(e) = a.expires_at {
        body.insert("expires_at".into(), e.into());
    } else if a.no_expiry {
        body.insert("expires_at".into(), Value::Null);
    }
    if body.is_empty() && a.limits.is_empty() && !a.clear_limits {
        return Err(
            "nothing to change: give --name, --clear-name, --tier, --models, \
                    --all-models, --metadata, --limit, --clear-limits, --expires-in, \
                    --expires-at or --no-expiry"
                .into(),
        );
    }
    let store = open_store(&config).await?;
    if !a.limits.is_empty() || a.clear_limits {
        // The API replaces every override at once; a --limit flag changes one, so
        // start from the key's current overrides (unless told to clear them).
        let base = if a.clear_limits {
            Map::new()
        } else {
            match limits_json(&get(store.as_ref(), &a.id).await?.limits) {
                Value::Object(o) => o,
                _ => Map::new(),
            }
        };
        body.insert("limits".into(), limits(base, &a.limits)?.into());
    }
    let k = ops(store.as_ref(), &config)
        .update(&a.id, &Value::Object(body), now_ms())
        .await
        .map_err(|e| op_error(e, &a.id))?;
    print_key(&k, a.json, None);
    Ok(())
}

async fn rotate(
    cfg: ConfigArg,
    id: String,
    grace: Option<String>,
    json: bool,
) -> Result<(), String> {
    let config = load_config(&cfg.config)?;
    let store = open_store(&config).await?;
    let seconds = match grace.as_deref() {
        None => 0,
        Some(g) => {
            let d = humantime::parse_duration(g)
                .map_err(|e| format!("--grace {g:?}: {e} (try 1h, 30m or 0s)"))?;
            let asked = json!({ "grace_seconds": d.as_secs() });
            parse_grace_seconds(&asked).map_err(flag_error)?
        }
    };
    let issued = ops(store.as_ref(), &config)
        .rotate(&id, seconds, now_ms())
        .await
        .map_err(|e| op_error(e, &id))?;
    if json {
        print_key(&issued.record, true, Some(&issued.key));
    } else {
        println!("{}", issued.key);
        match issued.record.previous_valid_until_ms {
            Some(t) => eprintln!(
                "rotated key {id}; the old secret works until {}; the key above is shown only once",
                rfc3339_ms(t)
            ),
            None => eprintln!(
                "rotated key {id}; the old secret stopped working; the key above is shown only once"
            ),
        }
    }
    Ok(())
}

async fn get(store: &dyn Store, id: &str) -> Result<KeyRecord, String> {
    store
        .get_key(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| no_such_key(id))
}

fn no_such_key(id: &str) -> String {
    format!("no key with id {id:?}")
}

fn ops<'a>(store: &'a dyn Store, config: &'a Config) -> KeyOps<'a> {
    KeyOps {
        store,
        config,
        actor: ACTOR,
    }
}

fn op_error(e: OpError, id: &str) -> String {
    match e {
        OpError::Field(f) => flag_error(f),
        OpError::UnknownKey => no_such_key(id),
        OpError::NoRandomness(e) => format!("no randomness available: {e}"),
        OpError::Store(StoreError::Conflict(_)) => {
            format!("key {id} is revoked; a revoked key cannot be rotated")
        }
        OpError::Store(e) => store_error(e),
    }
}

fn models(list: Vec<String>) -> Vec<Value> {
    list.into_iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .map(Value::String)
        .collect()
}

fn metadata(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("--metadata: not valid JSON ({e})"))
}

/// Adds `name=value` flags to `base`. Whole numbers go as JSON numbers, anything
/// else as text, which `parse_*` reads as USD for spend limits and refuses (naming
/// the limit) for the others.
fn limits(mut base: Map<String, Value>, flags: &[String]) -> Result<Map<String, Value>, String> {
    for f in flags {
        let (name, value) = f
            .split_once('=')
            .map(|(n, v)| (n.trim(), v.trim()))
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| {
                format!("--limit {f:?}: expected NAME=VALUE, e.g. requests_per_minute=60")
            })?;
        let v = match value.parse::<u64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(value.to_owned()),
        };
        base.insert(name.to_owned(), v);
    }
    Ok(base)
}

/// Prints a key: the API's JSON (plus the secret when one was just made), or a
/// `field: value` listing.
fn print_key(k: &KeyRecord, json: bool, secret: Option<&str>) {
    let mut v = key_json(k, now_ms());
    if json {
        if let Some(s) = secret {
            v["key"] = Value::String(s.to_owned());
        }
        println!("{v}");
        return;
    }
    if let Some(s) = secret {
        println!("{s}");
    }
    for field in [
        "id",
        "name",
        "owner",
        "project",
        "tier",
        "status",
        "models",
        "metadata",
        "limits",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "previous_secret_valid_until",
    ] {
        let text = match &v[field] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            Value::Array(a) if a.is_empty() => "* (all the tier allows)".to_owned(),
            Value::Array(a) => a
                .iter()
                .map(|m| m.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        println!("{:<28} {text}", format!("{field}:"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limit_flags_become_the_apis_json() {
        let l = limits(
            Map::new(),
            &[
                "requests_per_minute=60".into(),
                "spend_usd_per_month = 2.5".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            Value::Object(l),
            json!({"requests_per_minute": 60, "spend_usd_per_month": "2.5"})
        );
        let mut base = Map::new();
        base.insert("tokens_per_day".into(), 5.into());
        base.insert("requests_per_minute".into(), 1.into());
        let merged = limits(base, &["requests_per_minute=2".into()]).unwrap();
        assert_eq!(
            Value::Object(merged),
            json!({"tokens_per_day": 5, "requests_per_minute": 2})
        );
        for bad in ["requests_per_minute", "=5", ""] {
            let e = limits(Map::new(), &[bad.into()]).unwrap_err();
            assert!(e.starts_with("--limit"), "{e}");
        }
    }

    #[test]
    fn metadata_must_be_json() {
        assert_eq!(metadata(r#"{"a":1}"#).unwrap(), json!({"a": 1}));
        assert!(metadata("{a:1}").unwrap_err().starts_with("--metadata"));
    }
}
