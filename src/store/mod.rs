//! Persistence of keys and usage behind one trait.
//!
//! [`Store`] is the seam between the gateway and its database. The embedded SQLite
//! implementation ([`sqlite::SqliteStore`]) is the default for one node;
//! [`postgres::PostgresStore`] serves several nodes sharing one database. Both keep
//! the same tables and pass the same conformance suite (`conformance.rs`). Store
//! calls are never made per request for a cached key: the proxy talks to
//! [`crate::keys::cache::KeyCache`] and to the usage queue.

pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::Storage;
use crate::keys::KeyRecord;
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
    async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError>;
    /// Usage rows matching `q`, oldest first.
    async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError>;
    /// Totals per key and model matching `q`.
    async fn usage_report(&self, q: &UsageQuery) -> Result<Vec<ReportRow>, StoreError>;
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
