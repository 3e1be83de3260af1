//! The JSON shape of a key record, the one the admin API, the self-service
//! endpoints and `ai4free keys … --json` all print.
//!
//! Field names are the contract (`id`, `name`, `owner`, `project`, `tier`,
//! `models`, `metadata`, `limits`, `created_at`, `expires_at`, `revoked_at`,
//! `last_used_at`), timestamps RFC 3339 in UTC. No hash or secret is ever part of
//! it: the secret is added by the caller, once, on create and rotate.

use serde_json::{json, Value};

use crate::keys::{KeyLimits, KeyRecord};
use crate::usage::{rfc3339_ms, usd_json};

/// `k` as the API shows it at `now_ms` (which decides `status`).
pub fn key_json(k: &KeyRecord, now_ms: i64) -> Value {
    let limits = limits_json(&k.limits);
    json!({
        "object": "key",
        "id": k.id,
        "name": k.name,
        "owner": k.owner,
        "project": k.project,
        "tier": k.tier,
        "models": k.models,
        "metadata": k.metadata,
        "limits": limits,
        "status": k.status(now_ms).as_str(),
        "created_at": rfc3339_ms(k.created_at_ms),
        "expires_at": k.expires_at_ms.map(rfc3339_ms),
        "revoked_at": k.revoked_at_ms.map(rfc3339_ms),
        "last_used_at": k.last_used_at_ms.map(rfc3339_ms),
        // Only while a rotated-out secret still works: when it stops.
        "previous_secret_valid_until": k
            .previous_valid_until_ms
            .filter(|&t| t > now_ms)
            .map(rfc3339_ms),
    })
}

/// `limits` as the API takes it back: only overridden limits, spend limits as
/// USD (the store keeps micro-USD integers).
pub fn limits_json(l: &KeyLimits) -> Value {
    let mut o = serde_json::Map::new();
    let mut put = |name: &str, v: Option<u64>| {
        if let Some(v) = v {
            o.insert(name.to_owned(), v.into());
        }
    };
    put("requests_per_second", l.requests_per_second.map(u64::from));
    put("requests_per_minute", l.requests_per_minute.map(u64::from));
    put("requests_per_hour", l.requests_per_hour.map(u64::from));
    put("requests_per_day", l.requests_per_day.map(u64::from));
    put("tokens_per_minute", l.tokens_per_minute);
    put("tokens_per_day", l.tokens_per_day);
    put("max_concurrent", l.max_concurrent.map(u64::from));
    put("default_max_tokens", l.default_max_tokens.map(u64::from));
    for (name, v) in [
        ("spend_usd_per_day", l.spend_usd_per_day),
        ("spend_usd_per_month", l.spend_usd_per_month),
    ] {
        if let Some(a) = v {
            // micro-USD → pico-USD for the exact-decimal JSON number.
            o.insert(name.to_owned(), usd_json(i128::from(a.micros) * 1_000_000));
        }
    }
    Value::Object(o)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::UsdAmount;

    #[test]
    fn shows_every_field_and_no_hash() {
        let mut meta = serde_json::Map::new();
        meta.insert("team".into(), json!("search"));
        let k = KeyRecord {
            name: Some("ci".into()),
            owner: Some("alice".into()),
            project: Some("p1".into()),
            models: vec!["gpt-4o-mini".into()],
            metadata: meta,
            limits: KeyLimits {
                requests_per_minute: Some(5),
                spend_usd_per_month: Some(UsdAmount { micros: 2_500_000 }),
                ..KeyLimits::default()
            },
            expires_at_ms: Some(2_000),
            last_used_at_ms: Some(1_500),
            previous_secret_hash: Some([7; 32]),
            previous_valid_until_ms: Some(1_800),
            ..KeyRecord::new("k_1".into(), "free".into(), [9; 32], 1_000)
        };
        let v = key_json(&k, 1_600);
        assert_eq!(v["id"], "k_1");
        assert_eq!(v["status"], "active");
        assert_eq!(v["created_at"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["expires_at"], "1970-01-01T00:00:02.000Z");
        assert_eq!(v["last_used_at"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["revoked_at"], Value::Null);
        assert_eq!(v["metadata"]["team"], "search");
        assert_eq!(
            v["limits"],
            json!({"requests_per_minute": 5, "spend_usd_per_month": 2.5})
        );
        assert_eq!(v["previous_secret_valid_until"], "1970-01-01T00:00:01.800Z");
        let text = v.to_string();
        assert!(!text.contains("hash"), "{text}");
        // After the grace period the field goes away; after expiry, the status says so.
        let later = key_json(&k, 2_000);
        assert_eq!(later["previous_secret_valid_until"], Value::Null);
        assert_eq!(later["status"], "expired");
    }
}
