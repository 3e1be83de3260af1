//! Validating what an operator asks to create or change, before any store call.
//!
//! The admin API's JSON bodies and the CLI's flags (which the CLI turns into the
//! same JSON) both come through [`parse_new_key`] and [`parse_patch`], so a key
//! can only be made or changed into something the gateway can serve: a tier and
//! models the config knows, an expiry in the future, limits that are positive.
//! Every error names the field.

use serde_json::{Map, Value};

use super::FieldError;
use crate::config::{Config, UsdAmount};
use crate::keys::{KeyLimits, Metadata};
use crate::store::KeyPatch;

/// Longest `name`, `owner` or `project` accepted, in characters.
pub const MAX_LABEL_CHARS: usize = 256;
/// Largest `metadata` object accepted, as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The fields of a key to create (the id and secret are made by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    /// Label.
    pub name: Option<String>,
    /// The user it belongs to.
    pub owner: Option<String>,
    /// The project it belongs to.
    pub project: Option<String>,
    /// A configured tier.
    pub tier: String,
    /// Configured models (empty = all the tier allows).
    pub models: Vec<String>,
    /// Free-form object.
    pub metadata: Metadata,
    /// Overrides of the tier's limits.
    pub limits: KeyLimits,
    /// Expiry, Unix ms, in the future.
    pub expires_at_ms: Option<i64>,
}

const NEW_FIELDS: &[&str] = &[
    "name",
    "owner",
    "project",
    "tier",
    "models",
    "metadata",
    "limits",
    "expires_at",
    "expires_in",
];
const PATCH_FIELDS: &[&str] = &[
    "name",
    "tier",
    "models",
    "metadata",
    "limits",
    "expires_at",
    "expires_in",
];

/// Parses `POST /admin/keys`'s body. `tier` is required; `expires_at` (RFC 3339)
/// and `expires_in` (`30d`, `12h`) are alternatives.
pub fn parse_new_key(body: &Value, config: &Config, now_ms: i64) -> Result<NewKey, FieldError> {
    let o = object(body, NEW_FIELDS)?;
    let tier = match o.get("tier") {
        None | Some(Value::Null) => return Err(FieldError::new("tier", "is required")),
        Some(v) => tier_name(v, config)?,
    };
    Ok(NewKey {
        name: opt_label(o, "name")?,
        owner: opt_label(o, "owner")?,
        project: opt_label(o, "project")?,
        tier,
        models: match o.get("models") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => models(v, config)?,
        },
        metadata: match o.get("metadata") {
            None | Some(Value::Null) => Metadata::new(),
            Some(v) => metadata(v)?,
        },
        limits: match o.get("limits") {
            None | Some(Value::Null) => KeyLimits::default(),
            Some(v) => limits(v)?,
        },
        expires_at_ms: expiry(o, now_ms)?.flatten(),
    })
}

/// Parses `PATCH /admin/keys/{id}`'s body: absent fields stay as they are;
/// `null` clears `name` and `expires_at` (never expires), and resets `models`,
/// `metadata` and `limits` to empty. `owner` and `project` are fixed at creation:
/// usage reports group by them, and moving a key would rewrite history.
pub fn parse_patch(body: &Value, config: &Config, now_ms: i64) -> Result<KeyPatch, FieldError> {
    let o = object(body, PATCH_FIELDS)?;
    let mut p = KeyPatch::default();
    if let Some(v) = o.get("name") {
        p.name = Some(match v {
            Value::Null => None,
            _ => Some(label("name", v)?),
        });
    }
    if let Some(v) = o.get("tier") {
        p.tier = Some(tier_name(v, config)?);
    }
    if let Some(v) = o.get("models") {
        p.models = Some(match v {
            Value::Null => Vec::new(),
            _ => models(v, config)?,
        });
    }
    if let Some(v) = o.get("metadata") {
        p.metadata = Some(match v {
            Value::Null => Metadata::new(),
            _ => metadata(v)?,
        });
    }
    if let Some(v) = o.get("limits") {
        p.limits = Some(match v {
            Value::Null => KeyLimits::default(),
            _ => limits(v)?,
        });
    }
    p.expires_at_ms = expiry(o, now_ms)?;
    if p == KeyPatch::default() {
        return Err(FieldError::new(
            "body",
            format!(
                "names no field to change (one of {})",
                PATCH_FIELDS.join(", ")
            ),
        ));
    }
    Ok(p)
}

/// Parses the grace period of `POST /admin/keys/{id}/rotate`: an optional body
/// `{"grace_seconds": N}` (0 to 30 days; default 0, the old secret stops at once).
pub fn parse_grace_seconds(body: &Value) -> Result<u64, FieldError> {
    const MAX: u64 = 30 * 86_400;
    if body.is_null() {
        return Ok(0);
    }
    let o = object(body, &["grace_seconds"])?;
    match o.get("grace_seconds") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX => Ok(n),
            _ => Err(FieldError::new(
                "grace_seconds",
                format!("must be a whole number of seconds from 0 to {MAX} (30 days)"),
            )),
        },
    }
}

/// Names of the fields a patch changes, for the audit log (never their values):
/// the admin API and the CLI record the same details.
pub fn patched_fields(p: &KeyPatch) -> Vec<&'static str> {
    [
        ("name", p.name.is_some()),
        ("tier", p.tier.is_some()),
        ("expires_at", p.expires_at_ms.is_some()),
        ("models", p.models.is_some()),
        ("metadata", p.metadata.is_some()),
        ("limits", p.limits.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect()
}

fn object<'a>(body: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, FieldError> {
    let o = body
        .as_object()
        .ok_or_else(|| FieldError::new("body", "must be a JSON object"))?;
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(FieldError::new(
            k.as_str(),
            format!("unknown field (expected one of {})", allowed.join(", ")),
        ));
    }
    Ok(o)
}

fn label(field: &str, v: &Value) -> Result<String, FieldError> {
    let s = v
        .as_str()
        .ok_or_else(|| FieldError::new(field, "must be a string"))?
        .trim();
    if s.is_empty() {
        return Err(FieldError::new(
            field,
            "must not be empty (use null to leave it unset)",
        ));
    }
    if s.chars().count() > MAX_LABEL_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_LABEL_CHARS} characters"),
        ));
    }
    // Labels end up in tables, CSV and log lines; control characters would forge rows.
    if s.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(s.to_owned())
}

fn opt_label(o: &Map<String, Value>, field: &str) -> Result<Option<String>, FieldError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => label(field, v).map(Some),
    }
}

fn tier_name(v: &Value, config: &Config) -> Result<String, FieldError> {
    let t = v
        .as_str()
        .ok_or_else(|| FieldError::new("tier", "must be a string"))?;
    if config.tier(t).is_none() {
        let mut known: Vec<&str> = config.tiers.keys().map(String::as_str).collect();
        known.sort_unstable();
        return Err(FieldError::new(
            "tier",
            format!("unknown tier {t:?} (configured: {})", known.join(", ")),
        ));
    }
    Ok(t.to_owned())
}

fn models(v: &Value, config: &Config) -> Result<Vec<String>, FieldError> {
    let list = v
        .as_array()
        .ok_or_else(|| FieldError::new("models", "must be an array of model names"))?;
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = format!("models[{i}]");
        let name = m
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FieldError::new(field.as_str(), "must be a model name"))?;
        if config.resolve_model(name).is_none() {
            return Err(FieldError::new(
                field,
                format!("{name:?} is not a configured model"),
            ));
        }
        if !out.iter().any(|o| o == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

fn metadata(v: &Value) -> Result<Metadata, FieldError> {
    let o = v
        .as_object()
        .ok_or_else(|| FieldError::new("metadata", "must be a JSON object"))?;
    if v.to_string().len() > MAX_METADATA_BYTES {
        return Err(FieldError::new(
            "metadata",
            format!("must be at most {MAX_METADATA_BYTES} bytes as JSON"),
        ));
    }
    Ok(o.clone())
}

/// `limits` as the API takes it: the tier's limit names, positive whole numbers,
/// spend limits as USD decimals (`2.5` or `"2.5"`), `null` for "the tier decides".
fn limits(v: &Value) -> Result<KeyLimits, FieldError> {
    let o = v
        .as_object()
        .ok_or_else(|| FieldError::new("limits", "must be a JSON object"))?;
    let mut l = KeyLimits::default();
    for (name, value) in o {
        let field = format!("limits.{name}");
        if value.is_null() {
            continue;
        }
        let whole = |max: u64| -> Result<u64, FieldError> {
            match value.as_u64() {
                Some(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(FieldError::new(
                    field.as_str(),
                    format!("must be a whole number from 1 to {max} (null: the tier decides)"),
                )),
            }
        };
        let u32_max = u64::from(u32::MAX);
        let small = |max| whole(max).map(|n| Some(u32::try_from(n).unwrap_or(u32::MAX)));
        match name.as_str() {
            "requests_per_second" => l.requests_per_second = small(u32_max)?,
            "requests_per_minute" => l.requests_per_minute = small(u32_max)?,
            "requests_per_hour" => l.requests_per_hour = small(u32_max)?,
            "requests_per_day" => l.requests_per_day = small(u32_max)?,
            "max_concurrent" => l.max_concurrent = small(u32_max)?,
            "default_max_tokens" => l.default_max_tokens = small(u32_max)?,
            "tokens_per_minute" => l.tokens_per_minute = Some(whole(u64::MAX)?),
            "tokens_per_day" => l.tokens_per_day = Some(whole(u64::MAX)?),
            "spend_usd_per_day" => l.spend_usd_per_day = Some(usd(&field, value)?),
            "spend_usd_per_month" => l.spend_usd_per_month = Some(usd(&field, value)?),
            _ => {
                return Err(FieldError::new(
                    field,
                    "unknown limit (expected a tier limit such as requests_per_minute, \
                     tokens_per_day or spend_usd_per_month)",
                ))
            }
        }
    }
    Ok(l)
}

fn usd(field: &str, v: &Value) -> Result<UsdAmount, FieldError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    match text.parse::<UsdAmount>() {
        Ok(a) if a.micros > 0 => Ok(a),
        Ok(_) => Err(FieldError::new(
            field,
            "must be positive (null: the tier decides)",
        )),
        Err(e) => Err(FieldError::new(field, format!("{e}, in USD"))),
    }
}

/// `Some(None)` for an explicit `"expires_at": null`, `Some(Some(ms))` for a time,
/// `None` when neither field is given.
fn expiry(o: &Map<String, Value>, now_ms: i64) -> Result<Option<Option<i64>>, FieldError> {
    let at = o.get("expires_at");
    let within = o.get("expires_in");
    let ms = match (at, within) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                "expires_in",
                "give either expires_at or expires_in, not both",
            ))
        }
        (None, None) => return Ok(None),
        (Some(Value::Null), None) | (None, Some(Value::Null)) => return Ok(Some(None)),
        (Some(v), None) => {
            let s = v
                .as_str()
                .ok_or_else(|| FieldError::new("expires_at", "must be an RFC 3339 time"))?;
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    FieldError::new(
                        "expires_at",
                        format!("{s:?} is not an RFC 3339 time like 2027-01-31T00:00:00Z"),
                    )
                })?
                .timestamp_millis()
        }
        (None, Some(v)) => {
            let s = v.as_str().ok_or_else(|| {
                FieldError::new("expires_in", "must be a duration like \"30d\" or \"12h\"")
            })?;
            let d = humantime::parse_duration(s).map_err(|e| {
                FieldError::new("expires_in", format!("{s:?}: {e} (try 30d, 12h or 90m)"))
            })?;
            now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }
    };
    if ms <= now_ms {
        let field = if at.is_some() {
            "expires_at"
        } else {
            "expires_in"
        };
        return Err(FieldError::new(field, "must be in the future"));
    }
    Ok(Some(Some(ms)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000;

    fn config() -> Config {
        Config::from_yaml_str(
            r#"
providers:
  - name: openai
    base_url: http://127.0.0.1:9/v1
    models:
      - name: gpt-4o-mini
tiers:
  free: { requests_per_minute: 10 }
  pro: { requests_per_minute: 100 }
"#,
        )
        .unwrap()
    }

    #[test]
    fn new_key_with_every_field() {
        let k = parse_new_key(
            &json!({
                "name": " ci ", "owner": "alice", "project": "search", "tier": "pro",
                "models": ["gpt-4o-mini", "openai/gpt-4o-mini", "gpt-4o-mini"],
                "metadata": {"team": 7},
                "limits": {"requests_per_minute": 5, "spend_usd_per_month": "2.5",
                           "spend_usd_per_day": 0.1, "tokens_per_day": null},
                "expires_in": "30d"
            }),
            &config(),
            NOW,
        )
        .unwrap();
        assert_eq!(k.name.as_deref(), Some("ci"));
        assert_eq!(k.models, ["gpt-4o-mini", "openai/gpt-4o-mini"]);
        assert_eq!(k.limits.requests_per_minute, Some(5));
        assert_eq!(
            k.limits.spend_usd_per_month,
            Some(UsdAmount { micros: 2_500_000 })
        );
        assert_eq!(
            k.limits.spend_usd_per_day,
            Some(UsdAmount { micros: 100_000 })
        );
        assert_eq!(k.limits.tokens_per_day, None);
        assert_eq!(k.expires_at_ms, Some(NOW + 30 * 86_400_000));
        assert_eq!(k.metadata["team"], 7);
    }

    #[test]
    fn errors_name_the_field() {
        let cfg = config();
        let cases = [
            (json!({}), "tier"),
            (json!({"tier": "gold"}), "tier"),
            (json!({"tier": 3}), "tier"),
            (json!([1]), "body"),
            (json!({"tier": "free", "colour": "red"}), "colour"),
            (json!({"tier": "free", "name": ""}), "name"),
            (json!({"tier": "free", "owner": "a\nb"}), "owner"),
            (json!({"tier": "free", "owner": "x".repeat(257)}), "owner"),
            (json!({"tier": "free", "models": "gpt"}), "models"),
            (
                json!({"tier": "free", "models": ["gpt-4o-mini", "nope"]}),
                "models[1]",
            ),
            (json!({"tier": "free", "metadata": [1]}), "metadata"),
            (
                json!({"tier": "free", "metadata": {"x": "y".repeat(20_000)}}),
                "metadata",
            ),
            (
                json!({"tier": "free", "limits": {"requests_per_minute": 0}}),
                "limits.requests_per_minute",
            ),
            (
                json!({"tier": "free", "limits": {"requests_per_minute": 1.5}}),
                "limits.requests_per_minute",
            ),
            (
                json!({"tier": "free", "limits": {"max_concurrent": 5_000_000_000u64}}),
                "limits.max_concurrent",
            ),
            (
                json!({"tier": "free", "limits": {"spend_usd_per_day": "-1"}}),
                "limits.spend_usd_per_day",
            ),
            (
                json!({"tier": "free", "limits": {"spend_usd_per_day": 0}}),
                "limits.spend_usd_per_day",
            ),
            (json!({"tier": "free", "limits": {"rpm": 1}}), "limits.rpm"),
            (
                json!({"tier": "free", "expires_at": "2020-01-01T00:00:00Z"}),
                "expires_at",
            ),
            (
                json!({"tier": "free", "expires_at": "tomorrow"}),
                "expires_at",
            ),
            (json!({"tier": "free", "expires_in": "soon"}), "expires_in"),
            (
                json!({"tier": "free", "expires_in": "1d", "expires_at": null}),
                "expires_in",
            ),
        ];
        for (body, field) in cases {
            let e = parse_new_key(&body, &cfg, NOW).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }

    #[test]
    fn patch_sets_clears_and_refuses() {
        let cfg = config();
        let p = parse_patch(
            &json!({"name": null, "tier": "pro", "expires_at": null, "models": null,
                    "limits": {"tokens_per_minute": 1000}}),
            &cfg,
            NOW,
        )
        .unwrap();
        assert_eq!(p.name, Some(None));
        assert_eq!(p.tier.as_deref(), Some("pro"));
        assert_eq!(p.expires_at_ms, Some(None));
        assert_eq!(p.models, Some(vec![]));
        assert_eq!(p.limits.unwrap().tokens_per_minute, Some(1000));
        assert_eq!(p.metadata, None);
        for (body, field) in [
            (json!({}), "body"),
            (json!({"owner": "bob"}), "owner"),
            (json!({"tier": "gold"}), "tier"),
        ] {
            assert_eq!(parse_patch(&body, &cfg, NOW).unwrap_err().field, field);
        }
    }

    #[test]
    fn limits_round_trip_through_the_view() {
        let body = json!({"tier": "free", "limits": {
            "requests_per_second": 1, "requests_per_minute": 2, "requests_per_hour": 3,
            "requests_per_day": 4, "tokens_per_minute": 5, "tokens_per_day": 6,
            "max_concurrent": 7, "default_max_tokens": 8,
            "spend_usd_per_day": 0.000001, "spend_usd_per_month": "12345.678901"}});
        let k = parse_new_key(&body, &config(), NOW).unwrap();
        let shown = super::super::view::limits_json(&k.limits);
        assert_eq!(shown["spend_usd_per_month"], 12345.678901);
        let again =
            parse_new_key(&json!({"tier": "free", "limits": shown}), &config(), NOW).unwrap();
        assert_eq!(again.limits, k.limits);
    }

    #[test]
    fn grace_seconds() {
        assert_eq!(parse_grace_seconds(&Value::Null), Ok(0));
        assert_eq!(parse_grace_seconds(&json!({})), Ok(0));
        assert_eq!(parse_grace_seconds(&json!({"grace_seconds": 60})), Ok(60));
        for bad in [
            json!({"grace_seconds": -1}),
            json!({"grace_seconds": "1m"}),
            json!({"grace_seconds": 2_592_001}),
            json!({"grace": 1}),
        ] {
            assert!(parse_grace_seconds(&bad).is_err(), "{bad}");
        }
    }
}
