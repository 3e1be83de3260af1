//! Query strings of the admin API's GET routes, parsed into store queries.
//!
//! Unknown or repeated parameters are errors naming the parameter, as in
//! [`crate::admin::report`]: a typo must never silently widen a listing.

use std::borrow::Cow;

use serde_json::{json, Value};

use crate::admin::FieldError;
use crate::keys::KeyStatus;
use crate::store::{AuditEntry, AuditQuery, KeyFilter};
use crate::usage::rfc3339_ms;

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 1000;

/// Decoded `name=value` pairs of a query string (`+` is a space, `%XX` a byte).
pub fn pairs(query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(query.as_bytes()).collect()
}

/// A page request: at most `limit` items after `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// 1..=[`MAX_LIMIT`].
    pub limit: usize,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
}

/// `GET /admin/keys`: `owner`, `project`, `tier`, `status`, `name` (prefix),
/// `limit`, `cursor`.
pub fn key_list(
    pairs: &[(Cow<'_, str>, Cow<'_, str>)],
    now_ms: i64,
) -> Result<(KeyFilter, Page), FieldError> {
    let mut f = KeyFilter {
        now_ms,
        ..KeyFilter::default()
    };
    let mut page = Page {
        limit: DEFAULT_LIMIT,
        cursor: None,
    };
    each(pairs, |name, value| {
        match name {
            "owner" => f.owner = Some(text(name, value)?),
            "project" => f.project = Some(text(name, value)?),
            "tier" => f.tier = Some(text(name, value)?),
            "name" => f.name_prefix = Some(text(name, value)?),
            "status" => {
                f.status = Some(KeyStatus::parse(value).ok_or_else(|| {
                    FieldError::new(
                        name,
                        format!("{value:?} is not one of active, revoked, expired"),
                    )
                })?)
            }
            _ => return page_param(&mut page, name, value),
        }
        Ok(())
    })?;
    Ok((f, page))
}

/// `GET /admin/audit`: `since` (inclusive), `until` (exclusive), `actor`,
/// `action`, `target`, `limit`, `cursor`.
pub fn audit_list(
    pairs: &[(Cow<'_, str>, Cow<'_, str>)],
) -> Result<(AuditQuery, Page), FieldError> {
    let mut q = AuditQuery::default();
    let mut page = Page {
        limit: DEFAULT_LIMIT,
        cursor: None,
    };
    each(pairs, |name, value| {
        match name {
            "since" => q.since_ms = Some(instant(name, value)?),
            "until" => q.until_ms = Some(instant(name, value)?),
            "actor" => q.actor = Some(text(name, value)?),
            "action" => q.action = Some(text(name, value)?),
            "target" => q.target = Some(text(name, value)?),
            _ => return page_param(&mut page, name, value),
        }
        Ok(())
    })?;
    if let (Some(a), Some(b)) = (q.since_ms, q.until_ms) {
        if b < a {
            return Err(FieldError::new("until", "is before since"));
        }
    }
    Ok((q, page))
}

/// One audit entry as the API shows it.
pub fn audit_json(e: &AuditEntry) -> Value {
    json!({
        "object": "audit_entry",
        "id": e.id,
        "at": rfc3339_ms(e.at_ms),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "detail": e.detail,
    })
}

fn each<'q>(
    pairs: &'q [(Cow<'q, str>, Cow<'q, str>)],
    mut f: impl FnMut(&'q str, &'q str) -> Result<(), FieldError>,
) -> Result<(), FieldError> {
    let mut seen: Vec<&str> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        if seen.contains(&name.as_ref()) {
            return Err(FieldError::new(name.as_ref(), "given more than once"));
        }
        seen.push(name);
        f(name, value)?;
    }
    Ok(())
}

fn page_param(page: &mut Page, name: &str, value: &str) -> Result<(), FieldError> {
    match name {
        "limit" => {
            page.limit = value
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    FieldError::new(
                        name,
                        format!("must be a whole number from 1 to {MAX_LIMIT}"),
                    )
                })?
        }
        "cursor" => page.cursor = Some(text(name, value)?),
        _ => return Err(FieldError::new(name, "unknown parameter")),
    }
    Ok(())
}

fn text(name: &str, value: &str) -> Result<String, FieldError> {
    if value.is_empty() {
        Err(FieldError::new(name, "must not be empty"))
    } else {
        Ok(value.to_owned())
    }
}

/// An RFC 3339 time, or a date standing for its midnight UTC.
fn instant(name: &str, value: &str) -> Result<i64, FieldError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.timestamp_millis());
    }
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| {
            FieldError::new(
                name,
                format!("{value:?} is neither an RFC 3339 time nor a date like 2026-11-28"),
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys(q: &str) -> Result<(KeyFilter, Page), FieldError> {
        key_list(&pairs(q), 7)
    }

    fn audit(q: &str) -> Result<(AuditQuery, Page), FieldError> {
        audit_list(&pairs(q))
    }

    #[test]
    fn key_filters_decode_and_default() {
        let (f, p) = keys("").unwrap();
        assert_eq!(
            f,
            KeyFilter {
                now_ms: 7,
                ..KeyFilter::default()
            }
        );
        assert_eq!(
            p,
            Page {
                limit: 100,
                cursor: None
            }
        );
        let (f, p) = keys(
            "owner=al%20ice&project=p+1&tier=pro&status=revoked&name=ci%26cd&limit=1000&cursor=k61",
        )
        .unwrap();
        assert_eq!(f.owner.as_deref(), Some("al ice"));
        assert_eq!(f.project.as_deref(), Some("p 1"));
        assert_eq!(f.tier.as_deref(), Some("pro"));
        assert_eq!(f.status, Some(KeyStatus::Revoked));
        assert_eq!(f.name_prefix.as_deref(), Some("ci&cd"));
        assert_eq!(
            p,
            Page {
                limit: 1000,
                cursor: Some("k61".into())
            }
        );
    }

    #[test]
    fn key_list_errors_name_the_parameter() {
        for (q, field) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("status=gone", "status"),
            ("owner=", "owner"),
            ("owner=a&owner=b", "owner"),
            ("colour=red", "colour"),
            ("cursor=", "cursor"),
        ] {
            assert_eq!(keys(q).unwrap_err().field, field, "{q}");
        }
    }

    #[test]
    fn audit_filters_take_times_and_dates() {
        let (q, p) = audit(
            "since=2026-01-02&until=2026-01-02T00:00:01Z&actor=admin&action=key.create&target=k1&limit=5",
        )
        .unwrap();
        assert_eq!(q.since_ms, Some(1_767_312_000_000));
        assert_eq!(q.until_ms, Some(1_767_312_001_000));
        assert_eq!(q.actor.as_deref(), Some("admin"));
        assert_eq!(q.action.as_deref(), Some("key.create"));
        assert_eq!(q.target.as_deref(), Some("k1"));
        assert_eq!(p.limit, 5);
        for (q, field) in [
            ("since=yesterday", "since"),
            ("since=2026-01-03&until=2026-01-02", "until"),
            ("owner=x", "owner"),
            ("limit=-1", "limit"),
        ] {
            assert_eq!(audit(q).unwrap_err().field, field, "{q}");
        }
    }

    #[test]
    fn audit_entries_render_with_rfc3339_times() {
        let e = AuditEntry {
            id: 3,
            at_ms: 1_000,
            actor: "admin".into(),
            action: "key.revoke".into(),
            target: Some("k1".into()),
            detail: json!({}),
        };
        let v = audit_json(&e);
        assert_eq!(v["at"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["action"], "key.revoke");
        assert_eq!(v["target"], "k1");
    }
}
