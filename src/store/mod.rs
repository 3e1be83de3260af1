//! Persistence of keys and usage behind one trait.
//!
//! [`Store`] is the seam between the gateway and its database. The embedded SQLite
//! implementation ([`sqlite::SqliteStore`]) is the default for one node;
//! [`postgres::PostgresStore`] serves several nodes sharing one database. Both keep
//! the same tables and pass the same conformance suite (`conformance.rs`). Store
//! calls are never made per request for a cached key: the proxy talks to
//! [`crate::keys::cache::KeyCache`] and to the usage queue.

pub mod postgres;
mod sql;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::Storage;
use crate::keys::{KeyLimits, KeyRecord, KeyStatus, Metadata};
use crate::usage::UsageRecord;

/// Errors of the storage layer. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("the storage backend {0} is not available in this build yet")]
    Unsupported(&'static str),
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("storage task failed: {0}")]
    Task(String),
    /// An argument the store cannot use (e.g. a cursor it did not issue).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// A partial update of a key: `None` leaves a field as it is. Fields that can be
/// cleared are `Option<Option<_>>` (`Some(None)` clears).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPatch {
    /// New label, or `Some(None)` to remove it.
    pub name: Option<Option<String>>,
    /// New tier name.
    pub tier: Option<String>,
    /// New expiry (Unix ms), or `Some(None)` for "never expires".
    pub expires_at_ms: Option<Option<i64>>,
    /// New allowed-model list (empty = every model the tier allows).
    pub models: Option<Vec<String>>,
    /// Replaces the whole metadata object.
    pub metadata: Option<Metadata>,
    /// Replaces every limit override at once.
    pub limits: Option<KeyLimits>,
}

/// Which keys' lifecycle state to list; the same rule as [`KeyRecord::status`].
pub type KeyStatusFilter = KeyStatus;

/// Criteria of [`Store::find_keys`]; every `Some` must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Exact owner.
    pub owner: Option<String>,
    /// Exact project.
    pub project: Option<String>,
    /// Exact tier name.
    pub tier: Option<String>,
    /// Lifecycle state at `now_ms`.
    pub status: Option<KeyStatusFilter>,
    /// Name starts with this literal text (`%` and `_` are not wildcards; case
    /// matters). Keys without a name never match.
    pub name_prefix: Option<String>,
    /// The instant `status` is evaluated at (Unix ms).
    pub now_ms: i64,
}

/// One page of [`Store::find_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys in byte order of their id.
    pub keys: Vec<KeyRecord>,
    /// Pass back to get the next page; None when this page is the last.
    pub next_cursor: Option<String>,
}

impl KeyPage {
    /// The page of a query that fetched up to `limit + 1` keys: the extra one only
    /// says that another page follows.
    pub fn from_overfetch(mut keys: Vec<KeyRecord>, limit: usize) -> KeyPage {
        let next_cursor = if keys.len() > limit {
            keys.truncate(limit);
            keys.last().map(|k| encode_key_cursor(&k.id))
        } else {
            None
        };
        KeyPage { keys, next_cursor }
    }
}

/// One recorded admin action. Never holds a secret: callers pass ids, field
/// names and non-secret values only (the store cannot tell, so it is the caller's
/// contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by the store (ignored by [`Store::insert_audit`]).
    pub id: i64,
    /// When the action happened, Unix ms.
    pub at_ms: i64,
    /// Who acted (e.g. `admin`, `admin:readonly`, `cli`).
    pub actor: String,
    /// What was done (e.g. `key.create`, `key.rotate`).
    pub action: String,
    /// What it was done to (e.g. a key id).
    pub target: Option<String>,
    /// Free-form JSON details.
    pub detail: serde_json::Value,
}

/// Filters of [`Store::list_audit`]; every `Some` must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only entries at or after this instant (Unix ms).
    pub since_ms: Option<i64>,
    /// Only entries before this instant (Unix ms).
    pub until_ms: Option<i64>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact action.
    pub action: Option<String>,
    /// Exact target.
    pub target: Option<String>,
}

/// One page of [`Store::list_audit`], newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// Entries by `at_ms` descending, then `id` descending.
    pub entries: Vec<AuditEntry>,
    /// Pass back to get the next (older) page; None when this page is the last.
    pub next_cursor: Option<String>,
}

impl AuditPage {
    /// The page of a query that fetched up to `limit + 1` entries (see
    /// [`KeyPage::from_overfetch`]).
    pub fn from_overfetch(mut entries: Vec<AuditEntry>, limit: usize) -> AuditPage {
        let next_cursor = if entries.len() > limit {
            entries.truncate(limit);
            entries
                .last()
                .map(|e| sql::encode_audit_cursor(e.at_ms, e.id))
        } else {
            None
        };
        AuditPage {
            entries,
            next_cursor,
        }
    }
}

/// What a usage rollup report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    /// UTC day, `YYYY-MM-DD`.
    #[default]
    Day,
    /// Model name as recorded.
    Model,
    /// Key id.
    Key,
    /// The key's current owner (None for keys without one, or unknown keys).
    Owner,
    /// The key's current project.
    Project,
}

impl GroupBy {
    /// Parses the API name (`day`, `model`, `key`, `owner`, `project`).
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "day" => GroupBy::Day,
            "model" => GroupBy::Model,
            "key" => GroupBy::Key,
            "owner" => GroupBy::Owner,
            "project" => GroupBy::Project,
            _ => return None,
        })
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Model => "model",
            GroupBy::Key => "key",
            GroupBy::Owner => "owner",
            GroupBy::Project => "project",
        }
    }
}

/// A usage report over the daily rollup; every `Some` filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupQuery {
    /// Exact key id.
    pub key_id: Option<String>,
    /// The key's current owner.
    pub owner: Option<String>,
    /// The key's current project.
    pub project: Option<String>,
    /// Exact model.
    pub model: Option<String>,
    /// First day included, `YYYY-MM-DD` (UTC; see [`day_of_ms`]).
    pub since_day: Option<String>,
    /// Last day included, `YYYY-MM-DD`.
    pub until_day: Option<String>,
    /// The grouping.
    pub group_by: GroupBy,
}

/// One group of a rollup report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    /// The group's value (day, model, key id, owner or project); None for keys
    /// without an owner/project.
    pub group: Option<String>,
    /// Requests in total.
    pub requests: u64,
    /// Requests answered with a 2xx status.
    pub ok_requests: u64,
    /// `requests - ok_requests`.
    pub failed: u64,
    /// Sum of prompt tokens (saturates at `u64::MAX`).
    pub prompt_tokens: u64,
    /// Sum of completion tokens (saturates at `u64::MAX`).
    pub completion_tokens: u64,
    /// Sum of costs in pico-USD, exact.
    pub cost_pusd: i128,
}

/// A filter for usage queries.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Only rows started at or after this instant (Unix ms).
    pub since_ms: Option<i64>,
    /// Only rows started before this instant (Unix ms).
    pub until_ms: Option<i64>,
    /// Only this key's rows.
    pub key_id: Option<String>,
}

/// One line of a usage report (totals per key and model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// Key id.
    pub key_id: String,
    /// Model name.
    pub model: String,
    /// Requests in total.
    pub requests: u64,
    /// Requests answered with a 2xx status.
    pub ok_requests: u64,
    /// Sum of prompt tokens.
    pub prompt_tokens: u64,
    /// Sum of completion tokens.
    pub completion_tokens: u64,
    /// Sum of costs in pico-USD.
    pub cost_pusd: i128,
}

/// The storage interface shared by every backend.
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates or upgrades the schema. Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Inserts a new key (its `rev` is assigned by the store).
    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Fetches one key by public id.
    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key, oldest first.
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Marks a key revoked at `at_ms`; false when the id is unknown.
    async fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError>;
    /// Keys whose `rev` is greater than `rev`, in `rev` order (change feed for caches).
    async fn keys_changed_since(&self, rev: i64) -> Result<Vec<KeyRecord>, StoreError>;
    /// The highest `rev` currently stored (0 when empty).
    async fn max_key_rev(&self) -> Result<i64, StoreError>;
    /// Writes a batch of usage rows atomically; rows whose `request_id` exists are skipped.
    /// (SQLite keys a row by `(started_at_ms, request_id)`: a request id is unique and
    /// a replayed row carries its first start time, so the two agree.)
    /// The rows are shared, not borrowed: a store whose driver needs them for
    /// `'static` (SQLite's blocking pool) takes them without copying each row's
    /// strings, which cost ~0.6k instructions a row.
    async fn insert_usage(&self, rows: Arc<[UsageRecord]>) -> Result<(), StoreError>;
    /// Whether [`Store::insert_usage`] should offer the core to other threads
    /// between its statements, for a store whose inserts run on this process's
    /// cores (SQLite). The usage writer turns it off while its queue backs up,
    /// so that yielding never costs it the share it needs to keep up. Stores
    /// whose inserts run in another process ignore it.
    fn set_yield_between_statements(&self, _on: bool) {}
    /// Usage rows matching `q`, oldest first.
    async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError>;
    /// Totals per key and model matching `q`.
    async fn usage_report(&self, q: &UsageQuery) -> Result<Vec<ReportRow>, StoreError>;
    /// Applies `patch` to key `id` and returns the new record (None when unknown).
    /// Every successful call is a change on the feed (bumps `rev`).
    async fn update_key(&self, id: &str, patch: &KeyPatch)
        -> Result<Option<KeyRecord>, StoreError>;
    /// Gives key `id` the secret hash `new_hash`. The current hash becomes the
    /// previous one, accepted while `now < grace_until_ms` (None: refused at once;
    /// a second rotation ends the first one's grace). Bumps `rev`. A revoked key
    /// cannot be rotated ([`StoreError::Conflict`]); None when the id is unknown.
    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &[u8; 32],
        grace_until_ms: Option<i64>,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Raises `last_used_at_ms` of each key to the given instant (never lowers it;
    /// unknown ids are ignored). Not a change on the feed: caches do not need it.
    async fn touch_keys(&self, uses: &[(String, i64)]) -> Result<(), StoreError>;
    /// Keys matching `filter` in byte order of id, at most `limit` (≥ 1) per page,
    /// starting after `cursor` (a [`KeyPage::next_cursor`]). Pages never skip or
    /// repeat a key, whatever is inserted between calls.
    async fn find_keys(
        &self,
        filter: &KeyFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<KeyPage, StoreError>;
    /// Records an admin action; returns the id the store assigned. The caller must
    /// not put a secret in any field (see [`AuditEntry`]).
    async fn insert_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError>;
    /// Entries matching `q`, newest first (`at_ms`, then `id`, descending), at most
    /// `limit` (≥ 1) per page, starting after `cursor` (an [`AuditPage::next_cursor`]).
    async fn list_audit(
        &self,
        q: &AuditQuery,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<AuditPage, StoreError>;
    /// Usage totals from the daily rollup (never the usage table), one row per
    /// group, ordered by group (None first, then bytewise). `insert_usage`
    /// maintains the rollup in its own transaction, counting only rows it inserted.
    async fn usage_rollup(&self, q: &RollupQuery) -> Result<Vec<RollupRow>, StoreError>;
}

/// The id a key cursor resumes after. Cursors are opaque to callers: `k` + hex of
/// the id's bytes, so any id (spaces, `&`, non-ASCII) survives a URL.
pub fn encode_key_cursor(last_id: &str) -> String {
    let mut out = String::with_capacity(1 + 2 * last_id.len());
    out.push('k');
    for b in last_id.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Inverse of [`encode_key_cursor`]; [`StoreError::Invalid`] for anything else.
pub fn decode_key_cursor(cursor: &str) -> Result<String, StoreError> {
    let bad = || StoreError::Invalid("malformed cursor".into());
    let hex = cursor.strip_prefix('k').ok_or_else(bad)?;
    String::from_utf8(decode_hex(hex).ok_or_else(bad)?).map_err(|_| bad())
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// Escapes `\`, `%` and `_` so `text` matches literally in `LIKE … ESCAPE '\'`.
pub fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Days from 1970-01-01 that [`day_of_ms`] clamps to: 0001-01-01 ..= 9999-12-31,
/// so every day is exactly `YYYY-MM-DD` and sorts as text.
pub const DAY_RANGE: std::ops::RangeInclusive<i64> = -719_162..=2_932_896;

/// The UTC calendar day of a Unix-ms instant as `YYYY-MM-DD`; instants outside
/// years 1..=9999 are clamped to the first or last day.
pub fn day_of_ms(ms: i64) -> String {
    day_text(day_number(ms))
}

/// The day [`day_of_ms`] names, as days from 1970-01-01 (clamped to [`DAY_RANGE`]):
/// cheap to compare where many instants fall on few days.
pub fn day_number(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
        .clamp(*DAY_RANGE.start(), *DAY_RANGE.end())
}

/// `YYYY-MM-DD` of a day in [`DAY_RANGE`], counted from 1970-01-01.
pub fn day_text(days: i64) -> String {
    // Howard Hinnant's civil_from_days: exact for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Opens (and migrates) the store the config names.
pub async fn open(storage: &Storage) -> Result<Arc<dyn Store>, StoreError> {
    match storage {
        Storage::Sqlite { path } => {
            let store = sqlite::SqliteStore::open(path)?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
        Storage::Postgres { url } => {
            let store =
                postgres::PostgresStore::connect(url, postgres::PgOptions::default()).await?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn key_cursors_round_trip_any_id() {
        for id in ["", "a", "a4f_ABCdef012345", "sp ace&x=1", "日本", "\u{0}"] {
            let c = encode_key_cursor(id);
            assert!(c.bytes().all(|b| b.is_ascii_alphanumeric()), "{c}");
            assert_eq!(decode_key_cursor(&c).unwrap(), id);
        }
        for bad in ["", "x00", "k0", "kzz", "k\u{e9}0", "kff"] {
            assert!(
                matches!(decode_key_cursor(bad), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn like_escape_makes_wildcards_literal() {
        assert_eq!(like_escape("plain"), "plain");
        assert_eq!(like_escape("50%_off\\x"), "50\\%\\_off\\\\x");
        assert_eq!(like_escape(""), "");
    }

    #[test]
    fn days_match_chrono_and_clamp() {
        use chrono::DateTime;
        for ms in [
            0,
            -1,
            86_399_999,
            86_400_000,
            -86_400_000,
            -86_400_001,
            951_782_400_000, // 2000-02-29
            1_700_000_000_000,
            4_102_444_800_000,   // 2100-01-01 (not a leap year before)
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            -62_135_596_800_000, // 0001-01-01
        ] {
            let expected = DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%d")
                .to_string();
            assert_eq!(day_of_ms(ms), expected, "{ms}");
        }
        assert_eq!(day_of_ms(i64::MAX), "9999-12-31");
        assert_eq!(day_of_ms(253_402_300_800_000), "9999-12-31");
        assert_eq!(day_of_ms(i64::MIN), "0001-01-01");
        assert_eq!(day_of_ms(-62_135_596_800_001), "0001-01-01");
    }

    #[test]
    fn group_by_names_round_trip() {
        for g in [
            GroupBy::Day,
            GroupBy::Model,
            GroupBy::Key,
            GroupBy::Owner,
            GroupBy::Project,
        ] {
            assert_eq!(GroupBy::parse(g.as_str()), Some(g));
        }
        assert_eq!(GroupBy::parse("user"), None);
    }
}
