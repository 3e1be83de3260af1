//! SQL text shared by both stores: column lists, `WHERE` clauses for usage queries,
//! key search, audit paging and rollup reports, built once for either placeholder
//! dialect, and the small value conversions both drivers need.
//!
//! Pure (no IO): the stores bind [`SqlArg`]s to their own driver types. Every value
//! travels as a parameter, never inside the SQL text.

use super::{
    decode_key_cursor, like_escape, AuditQuery, GroupBy, KeyFilter, KeyStatusFilter, RollupQuery,
    StoreError, UsageQuery,
};

/// The columns of `api_keys`, in the order both stores' row readers index them.
pub(crate) const KEY_COLS: &str = "id, name, owner, project, tier, models, created_at_ms, expires_at_ms, revoked_at_ms, secret_hash, rev, metadata, limits, last_used_at_ms, previous_secret_hash, previous_valid_until_ms";

/// The columns of `usage`, in the order both stores' row readers index them.
pub(crate) const USAGE_COLS: &str = "request_id, key_id, model, provider, endpoint, prompt_tokens, cached_prompt_tokens, completion_tokens, cost_pusd, input_price_micros, output_price_micros, status, stream, token_source, started_at_ms, latency_ms, ttfb_ms, error";

/// A stored hash as the fixed-size array (None if the column is malformed).
pub(crate) fn hash32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

/// JSON text of a value that always serializes (maps, plain structs).
pub(crate) fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

/// Counters are `u64` in Rust and `BIGINT` in both databases; saturate, never wrap.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The rollup column a report groups by (`d` = usage_daily, `k` = api_keys).
pub(crate) fn group_column(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Day => "d.day",
        GroupBy::Model => "d.model",
        GroupBy::Key => "d.key_id",
        GroupBy::Owner => "k.owner",
        GroupBy::Project => "k.project",
    }
}

/// A bound parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SqlArg {
    Text(String),
    Int(i64),
}

/// Which store the SQL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `?N` placeholders; `LIKE` folds ASCII case, so prefixes compare with `substr`.
    Sqlite,
    /// `$N` placeholders; text compares under `COLLATE "C"` (byte order, like SQLite).
    Postgres,
}

/// A conjunction of clauses and the parameters they number.
#[derive(Debug)]
pub(crate) struct Where {
    dialect: Dialect,
    clauses: Vec<String>,
    /// The parameters, in placeholder order.
    pub(crate) args: Vec<SqlArg>,
}

impl Where {
    pub(crate) fn new(dialect: Dialect) -> Where {
        Where {
            dialect,
            clauses: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds a parameter and returns its placeholder.
    pub(crate) fn arg(&mut self, a: SqlArg) -> String {
        self.args.push(a);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.args.len()),
            Dialect::Postgres => format!("${}", self.args.len()),
        }
    }

    fn text(&mut self, s: &str) -> String {
        self.arg(SqlArg::Text(s.to_owned()))
    }

    fn push(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    /// `col` under byte-order collation (needed for `<`/`>`/`ORDER BY` on text).
    pub(crate) fn bytewise(&self, col: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => col.to_owned(),
            Dialect::Postgres => format!("{col} COLLATE \"C\""),
        }
    }

    /// ` WHERE a AND b…`, or nothing.
    pub(crate) fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

/// The `WHERE` of a usage query over `usage`.
pub(crate) fn usage_filter(dialect: Dialect, q: &UsageQuery) -> Where {
    let mut w = Where::new(dialect);
    if let Some(s) = q.since_ms {
        let p = w.arg(SqlArg::Int(s));
        w.push(format!("started_at_ms >= {p}"));
    }
    if let Some(u) = q.until_ms {
        let p = w.arg(SqlArg::Int(u));
        w.push(format!("started_at_ms < {p}"));
    }
    if let Some(k) = &q.key_id {
        let p = w.text(k);
        w.push(format!("key_id = {p}"));
    }
    w
}

/// The `WHERE` of a key search over `api_keys`, resuming after `cursor`.
pub(crate) fn key_filter(
    dialect: Dialect,
    f: &KeyFilter,
    cursor: Option<&str>,
) -> Result<Where, StoreError> {
    let mut w = Where::new(dialect);
    if let Some(c) = cursor {
        let after = decode_key_cursor(c)?;
        let p = w.text(&after);
        w.push(format!("{} > {p}", w.bytewise("id")));
    }
    for (col, v) in [
        ("owner", &f.owner),
        ("project", &f.project),
        ("tier", &f.tier),
    ] {
        if let Some(v) = v {
            let p = w.text(v);
            w.push(format!("{col} = {p}"));
        }
    }
    if let Some(status) = f.status {
        let now = w.arg(SqlArg::Int(f.now_ms));
        let live = format!("(revoked_at_ms IS NULL OR revoked_at_ms > {now})");
        w.push(match status {
            KeyStatusFilter::Revoked => {
                format!("(revoked_at_ms IS NOT NULL AND revoked_at_ms <= {now})")
            }
            KeyStatusFilter::Expired => {
                format!("({live} AND expires_at_ms IS NOT NULL AND expires_at_ms <= {now})")
            }
            KeyStatusFilter::Active => {
                format!("({live} AND (expires_at_ms IS NULL OR expires_at_ms > {now}))")
            }
        });
    }
    if let Some(prefix) = &f.name_prefix {
        match dialect {
            Dialect::Sqlite => {
                let p = w.text(prefix);
                w.push(format!("substr(name, 1, length({p})) = {p}"));
            }
            Dialect::Postgres => {
                let p = w.text(&format!("{}%", like_escape(prefix)));
                w.push(format!("name LIKE {p} ESCAPE '\\'"));
            }
        }
    }
    Ok(w)
}

/// The cursor of an audit page ending at entry (`at_ms`, `id`).
pub(crate) fn encode_audit_cursor(at_ms: i64, id: i64) -> String {
    format!("a{at_ms}_{id}")
}

fn decode_audit_cursor(c: &str) -> Result<(i64, i64), StoreError> {
    let bad = || StoreError::Invalid("malformed cursor".into());
    let (at, id) = c
        .strip_prefix('a')
        .ok_or_else(bad)?
        .split_once('_')
        .ok_or_else(bad)?;
    Ok((
        at.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    ))
}

/// The `WHERE` of an audit listing (newest first), resuming after `cursor`.
pub(crate) fn audit_filter(
    dialect: Dialect,
    q: &AuditQuery,
    cursor: Option<&str>,
) -> Result<Where, StoreError> {
    let mut w = Where::new(dialect);
    if let Some(c) = cursor {
        let (at, id) = decode_audit_cursor(c)?;
        let at = w.arg(SqlArg::Int(at));
        let id = w.arg(SqlArg::Int(id));
        w.push(format!("(at_ms < {at} OR (at_ms = {at} AND id < {id}))"));
    }
    if let Some(s) = q.since_ms {
        let p = w.arg(SqlArg::Int(s));
        w.push(format!("at_ms >= {p}"));
    }
    if let Some(u) = q.until_ms {
        let p = w.arg(SqlArg::Int(u));
        w.push(format!("at_ms < {p}"));
    }
    for (col, v) in [
        ("actor", &q.actor),
        ("action", &q.action),
        ("target", &q.target),
    ] {
        if let Some(v) = v {
            let p = w.text(v);
            w.push(format!("{col} = {p}"));
        }
    }
    Ok(w)
}

/// The `WHERE` of a rollup report over `usage_daily d LEFT JOIN api_keys k`.
pub(crate) fn rollup_filter(dialect: Dialect, q: &RollupQuery) -> Where {
    let mut w = Where::new(dialect);
    for (col, v) in [
        ("d.key_id", &q.key_id),
        ("k.owner", &q.owner),
        ("k.project", &q.project),
        ("d.model", &q.model),
    ] {
        if let Some(v) = v {
            let p = w.text(v);
            w.push(format!("{col} = {p}"));
        }
    }
    if let Some(s) = &q.since_day {
        let p = w.text(s);
        w.push(format!("{} >= {p}", w.bytewise("d.day")));
    }
    if let Some(u) = &q.until_day {
        let p = w.text(u);
        w.push(format!("{} <= {p}", w.bytewise("d.day")));
    }
    w
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::encode_key_cursor;

    #[test]
    fn usage_filter_numbers_parameters_in_order() {
        let q = UsageQuery {
            since_ms: Some(1),
            until_ms: None,
            key_id: Some("k".into()),
        };
        let w = usage_filter(Dialect::Postgres, &q);
        assert_eq!(w.sql(), " WHERE started_at_ms >= $1 AND key_id = $2");
        assert_eq!(w.args.len(), 2);
        let w = usage_filter(Dialect::Postgres, &UsageQuery::default());
        assert_eq!((w.sql().as_str(), w.args.len()), ("", 0));
        let full = UsageQuery {
            since_ms: Some(1),
            until_ms: Some(2),
            key_id: Some("k".into()),
        };
        assert_eq!(
            usage_filter(Dialect::Postgres, &full).sql(),
            " WHERE started_at_ms >= $1 AND started_at_ms < $2 AND key_id = $3"
        );
    }

    #[test]
    fn key_filter_numbers_and_binds_in_order() {
        let f = KeyFilter {
            owner: Some("o".into()),
            tier: Some("t".into()),
            status: Some(KeyStatusFilter::Active),
            name_prefix: Some("a_%".into()),
            now_ms: 42,
            ..KeyFilter::default()
        };
        let c = encode_key_cursor("k9");
        let w = key_filter(Dialect::Postgres, &f, Some(&c)).unwrap();
        assert_eq!(
            w.sql(),
            " WHERE id COLLATE \"C\" > $1 AND owner = $2 AND tier = $3 AND \
             ((revoked_at_ms IS NULL OR revoked_at_ms > $4) AND (expires_at_ms IS NULL OR expires_at_ms > $4)) \
             AND name LIKE $5 ESCAPE '\\'"
        );
        assert_eq!(
            w.args,
            [
                SqlArg::Text("k9".into()),
                SqlArg::Text("o".into()),
                SqlArg::Text("t".into()),
                SqlArg::Int(42),
                SqlArg::Text("a\\_\\%%".into()),
            ]
        );
        let w = key_filter(Dialect::Sqlite, &f, None).unwrap();
        assert!(w.sql().starts_with(" WHERE owner = ?1 AND tier = ?2 AND "));
        assert!(w.sql().ends_with("substr(name, 1, length(?4)) = ?4"));
        assert_eq!(w.args[3], SqlArg::Text("a_%".into()));
        assert_eq!(
            key_filter(Dialect::Sqlite, &KeyFilter::default(), None)
                .unwrap()
                .sql(),
            ""
        );
        assert!(key_filter(Dialect::Sqlite, &f, Some("zz")).is_err());
    }

    #[test]
    fn audit_cursor_round_trips_and_rejects_garbage() {
        for (at, id) in [(0, 0), (-5, 7), (i64::MAX, i64::MIN)] {
            assert_eq!(
                decode_audit_cursor(&encode_audit_cursor(at, id)).unwrap(),
                (at, id)
            );
        }
        for bad in ["", "a", "a1", "a1_", "b1_2", "a1_2_3", "ax_1"] {
            assert!(decode_audit_cursor(bad).is_err(), "{bad}");
        }
        let w = audit_filter(
            Dialect::Sqlite,
            &AuditQuery {
                actor: Some("x".into()),
                ..AuditQuery::default()
            },
            Some(&encode_audit_cursor(9, 3)),
        )
        .unwrap();
        assert_eq!(
            w.sql(),
            " WHERE (at_ms < ?1 OR (at_ms = ?1 AND id < ?2)) AND actor = ?3"
        );
    }

    #[test]
    fn rollup_filter_compares_days_bytewise() {
        let q = RollupQuery {
            model: Some("m".into()),
            since_day: Some("2024-01-01".into()),
            until_day: Some("2024-01-31".into()),
            ..RollupQuery::default()
        };
        assert_eq!(
            rollup_filter(Dialect::Postgres, &q).sql(),
            " WHERE d.model = $1 AND d.day COLLATE \"C\" >= $2 AND d.day COLLATE \"C\" <= $3"
        );
    }
}
