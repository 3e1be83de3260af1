//! The in-memory key cache that `request_filter` validates against.
//!
//! A cache hit costs a hash-map read under an uncontended read lock plus one SHA-256
//! of the 22-byte secret; no store call. A miss (first use of a key on this node)
//! reads the store once; ids the store does not know are remembered for
//! `negative_cache` so a flood of well-formed but unknown keys cannot hammer it.
//!
//! Changes (new keys, revocations, expiry edits) reach the cache through the
//! store's `rev` change feed, polled every `refresh_interval` (≤ 1 s by config) by
//! [`KeyRefresher`]. Expiry needs no change at all: it is checked against the clock
//! on every request. As a backstop against a change the feed could miss (a row
//! edited by hand without bumping `rev`, a key deleted outright), the refresher also
//! reloads the whole table every [`FULL_RELOAD`].
//!
//! `last_used_at` is kept lazily: a successful authentication notes the time in
//! the cached entry (one relaxed atomic read, and a write at most once a second per
//! key; no lock, no allocation), and [`UseFlusher`] writes every key that moved with
//! one [`Store::touch_keys`] call per `keys.last_used_flush_interval`, and once more
//! when the server stops. Replacing an entry (change feed, full reload) carries its
//! noted use over, so a key edited between flushes does not lose its last use.
//!
//! When the store fails, cached keys keep working untouched. A key the cache does
//! not know is refused with `Unavailable` (503, fail closed: it may be a key created
//! on another node a moment ago, so it is not "unknown"), and for [`FAIL_FAST`]
//! after a failed lookup further misses are refused without asking the store again,
//! so a burst of unknown keys during an outage cannot pile up on a dead database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{hash_secret, parse, FormatError, KeyRecord, KeyStatus};
use crate::store::{Store, StoreError};
use crate::usage::SharedStr;

/// Why a presented key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key")]
    Missing,
    #[error("malformed API key: {0}")]
    Malformed(FormatError),
    #[error("unknown API key")]
    Unknown,
    #[error("revoked API key")]
    Revoked,
    #[error("expired API key")]
    Expired,
    #[error("key store unavailable")]
    Unavailable,
}

/// A cached key.
#[derive(Debug)]
pub struct KeyEntry {
    /// The key as stored.
    pub record: KeyRecord,
    /// `record.id`, shared by the usage rows of the key's requests.
    pub id: SharedStr,
    /// Last use noted on this node, Unix ms (the stored value until one happens).
    used_ms: AtomicI64,
    /// The newest use known to be in the store.
    flushed_ms: AtomicI64,
}

/// Uses closer together than this are noted once: `last_used_at` is coarse by
/// design, and skipping the write keeps a hot key's cache line shared.
pub const USE_RESOLUTION_MS: i64 = 1_000;

// === impl KeyEntry ===

impl KeyEntry {
    /// An entry for `record`, with its stored `last_used_at` as the baseline.
    pub fn new(record: KeyRecord) -> KeyEntry {
        let stored = record.last_used_at_ms.unwrap_or(i64::MIN);
        KeyEntry {
            id: SharedStr::from(record.id.as_str()),
            record,
            used_ms: AtomicI64::new(stored),
            flushed_ms: AtomicI64::new(stored),
        }
    }

    /// Notes a use at `now_ms`. On the request path: no lock, no allocation, and
    /// a write only when the noted time moves by [`USE_RESOLUTION_MS`] or more.
    pub fn note_use(&self, now_ms: i64) {
        let seen = self.used_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(seen) >= USE_RESOLUTION_MS {
            self.used_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// The last use noted here and not yet in the store.
    pub fn pending_use(&self) -> Option<i64> {
        let used = self.used_ms.load(Ordering::Relaxed);
        (used > self.flushed_ms.load(Ordering::Relaxed)).then_some(used)
    }

    /// Records that uses up to `at_ms` are in the store.
    pub fn mark_flushed(&self, at_ms: i64) {
        self.flushed_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    /// The entry replacing this one for a newer `record`, keeping what this node
    /// noted and flushed (a stored value newer than both wins).
    fn succeeded_by(&self, record: KeyRecord) -> KeyEntry {
        let next = KeyEntry::new(record);
        next.used_ms
            .fetch_max(self.used_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        next.flushed_ms
            .fetch_max(self.flushed_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        next
    }
}

/// Validates presented keys against cached records.
pub struct KeyCache {
    store: Arc<dyn Store>,
    entries: RwLock<HashMap<String, Arc<KeyEntry>>>,
    negative: Mutex<HashMap<String, Instant>>,
    last_rev: AtomicI64,
    negative_ttl: Duration,
    /// When a store lookup last failed (None = the store answers).
    store_failed_at: Mutex<Option<Instant>>,
    /// Serialises `prime` and `refresh`: the admin API refreshes after each change
    /// while the refresher polls, and an older read must never land last.
    syncing: tokio::sync::Mutex<()>,
}

const NEGATIVE_CAP: usize = 100_000;
/// How often the whole key table is reloaded, whatever the change feed says.
pub const FULL_RELOAD: Duration = Duration::from_secs(60);
/// After a failed store lookup, misses are refused at once for this long.
pub const FAIL_FAST: Duration = Duration::from_secs(1);

impl KeyCache {
    /// A cache in front of `store`. Call [`KeyCache::prime`] before serving.
    pub fn new(store: Arc<dyn Store>, negative_ttl: Duration) -> KeyCache {
        KeyCache {
            store,
            entries: RwLock::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
            last_rev: AtomicI64::new(0),
            negative_ttl,
            store_failed_at: Mutex::new(None),
            syncing: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads every key so the first requests need no store read, and sets the
    /// change-feed cursor.
    ///
    /// Also the periodic full reload: the map is replaced, so keys deleted from the
    /// store disappear too.
    pub async fn prime(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.syncing.lock().await;
        // Read the cursor before the table so a change racing the load is applied
        // again by the next feed poll rather than skipped.
        let rev = self.store.max_key_rev().await?;
        let keys = self.store.list_keys().await?;
        let n = keys.len();
        {
            let mut map = self.entries.write();
            let next: HashMap<String, Arc<KeyEntry>> = keys
                .into_iter()
                .map(|k| {
                    let entry = match map.get(&k.id) {
                        Some(old) => old.succeeded_by(k),
                        None => KeyEntry::new(k),
                    };
                    (entry.record.id.clone(), Arc::new(entry))
                })
                .collect();
            *map = next;
        }
        self.last_rev.fetch_max(rev, Ordering::AcqRel);
        *self.store_failed_at.lock() = None;
        Ok(n)
    }

    /// Applies every change since the last call; returns how many keys changed.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.syncing.lock().await;
        let since = self.last_rev.load(Ordering::Acquire);
        let changed = self.store.keys_changed_since(since).await?;
        *self.store_failed_at.lock() = None;
        if changed.is_empty() {
            return Ok(0);
        }
        let n = changed.len();
        let mut max = since;
        {
            let mut map = self.entries.write();
            let mut neg = self.negative.lock();
            for k in changed {
                max = max.max(k.rev);
                neg.remove(&k.id);
                let entry = match map.get(&k.id) {
                    Some(old) => old.succeeded_by(k),
                    None => KeyEntry::new(k),
                };
                map.insert(entry.record.id.clone(), Arc::new(entry));
            }
        }
        self.last_rev.fetch_max(max, Ordering::AcqRel);
        Ok(n)
    }

    /// Validates the `Authorization` header value (with or without `Bearer `).
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<Arc<KeyEntry>, AuthError> {
        let presented = bearer_token(authorization).ok_or(AuthError::Missing)?;
        let parsed = parse(presented).map_err(AuthError::Malformed)?;
        let entry = match self.cached(parsed.id) {
            Some(e) => e,
            None => self.load(parsed.id).await?,
        };
        let rec = &entry.record;
        // The secret a rotation replaced still opens the key until its grace ends.
        if !rec.secret_matches(&hash_secret(parsed.id, parsed.secret), now_ms) {
            return Err(AuthError::Unknown);
        }
        match rec.status(now_ms) {
            KeyStatus::Active => {
                entry.note_use(now_ms);
                Ok(entry)
            }
            KeyStatus::Revoked => Err(AuthError::Revoked),
            KeyStatus::Expired => Err(AuthError::Expired),
        }
    }

    fn cached(&self, id: &str) -> Option<Arc<KeyEntry>> {
        self.entries.read().get(id).cloned()
    }

    async fn load(&self, id: &str) -> Result<Arc<KeyEntry>, AuthError> {
        if let Some(at) = self.negative.lock().get(id) {
            if at.elapsed() < self.negative_ttl {
                return Err(AuthError::Unknown);
            }
        }
        if let Some(at) = *self.store_failed_at.lock() {
            if at.elapsed() < FAIL_FAST {
                return Err(AuthError::Unavailable);
            }
        }
        match self.store.get_key(id).await {
            Ok(Some(rec)) => {
                let entry = Arc::new(KeyEntry::new(rec));
                self.entries.write().insert(id.to_owned(), entry.clone());
                Ok(entry)
            }
            Ok(None) => {
                let mut neg = self.negative.lock();
                if neg.len() >= NEGATIVE_CAP {
                    let ttl = self.negative_ttl;
                    neg.retain(|_, at| at.elapsed() < ttl);
                    if neg.len() >= NEGATIVE_CAP {
                        neg.clear();
                    }
                }
                neg.insert(id.to_owned(), Instant::now());
                Err(AuthError::Unknown)
            }
            Err(e) => {
                let mut failed = self.store_failed_at.lock();
                if failed.is_none() {
                    log::warn!("key lookup failed, refusing uncached keys with 503: {e}");
                }
                *failed = Some(Instant::now());
                Err(AuthError::Unavailable)
            }
        }
    }

    /// Writes every use noted since the last flush with one [`Store::touch_keys`]
    /// call; returns how many keys it touched. On failure the uses stay pending
    /// for the next call.
    pub async fn flush_uses(&self) -> Result<usize, StoreError> {
        let pending: Vec<(Arc<KeyEntry>, i64)> = self
            .entries
            .read()
            .values()
            .filter_map(|e| e.pending_use().map(|at| (e.clone(), at)))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let uses: Vec<(String, i64)> = pending
            .iter()
            .map(|(e, at)| (e.record.id.clone(), *at))
            .collect();
        self.store.touch_keys(&uses).await?;
        for (e, at) in &pending {
            // An entry replaced meanwhile copied the old flush mark and writes the
            // same instant once more next time: harmless, `touch_keys` only raises.
            e.mark_flushed(*at);
        }
        Ok(pending.len())
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    /// Whether no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Extracts the token from `Bearer <token>` (scheme case-insensitive) or a bare token.
pub fn bearer_token(header: Option<&[u8]>) -> Option<&str> {
    let v = std::str::from_utf8(header?).ok()?.trim();
    if v.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = match v.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return None,
        None => v,
    };
    (!token.is_empty()).then_some(token)
}

/// Background service that applies the store's change feed to the cache.
pub struct KeyRefresher {
    cache: Arc<KeyCache>,
    interval: Duration,
}

impl KeyRefresher {
    /// Polls `cache`'s store every `interval`.
    pub fn new(cache: Arc<KeyCache>, interval: Duration) -> KeyRefresher {
        KeyRefresher { cache, interval }
    }
}

#[async_trait]
impl BackgroundService for KeyRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outage = OutageLog::default();
        let mut last_full = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let result = if last_full.elapsed() >= FULL_RELOAD {
                last_full = Instant::now();
                self.cache.prime().await
            } else {
                self.cache.refresh().await
            };
            outage.record(
                result,
                "key change feed failing, serving cached keys",
                "key change feed recovered",
            );
        }
    }
}

/// One log line per outage of a background task: the first failure at warn, the
/// recovery at info, and nothing for the attempts in between (a dead store must
/// not flood the log at the task's tick rate).
#[derive(Default)]
struct OutageLog {
    failing: bool,
}

impl OutageLog {
    fn record<T, E: std::fmt::Display>(
        &mut self,
        result: Result<T, E>,
        failing: &str,
        recovered: &str,
    ) {
        match result {
            Ok(_) if self.failing => {
                self.failing = false;
                log::info!("{recovered}");
            }
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!("{failing}: {e}");
            }
            _ => {}
        }
    }
}

/// Background service that writes noted key uses to `last_used_at` every
/// `interval`, and once more when the server begins to stop.
pub struct UseFlusher {
    cache: Arc<KeyCache>,
    interval: Duration,
}

impl UseFlusher {
    /// Flushes `cache`'s noted uses every `interval`.
    pub fn new(cache: Arc<KeyCache>, interval: Duration) -> UseFlusher {
        UseFlusher { cache, interval }
    }
}

#[async_trait]
impl BackgroundService for UseFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut outage = OutageLog::default();
        loop {
            let stopping = tokio::select! {
                _ = shutdown.changed() => true,
                _ = tick.tick() => false,
            };
            outage.record(
                self.cache.flush_uses().await,
                "cannot write last_used_at, will retry",
                "last_used_at flushes recovered",
            );
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(Some(b"Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some(b"bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(Some(b"abc")), Some("abc"));
        assert_eq!(bearer_token(Some(b"Basic abc")), None);
        assert_eq!(bearer_token(Some(b"Bearer ")), None);
        assert_eq!(bearer_token(Some(b"\xff\xfe")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn uses_are_noted_at_most_once_a_second_and_survive_replacement() {
        let rec = |last: Option<i64>| KeyRecord {
            last_used_at_ms: last,
            ..KeyRecord::new("k".into(), "free".into(), [0; 32], 0)
        };
        let e = KeyEntry::new(rec(None));
        assert_eq!(e.pending_use(), None);
        e.note_use(10_000);
        assert_eq!(e.pending_use(), Some(10_000));
        e.note_use(10_999);
        assert_eq!(e.pending_use(), Some(10_000), "within the resolution");
        e.note_use(11_000);
        assert_eq!(e.pending_use(), Some(11_000));
        e.note_use(5_000);
        assert_eq!(e.pending_use(), Some(11_000), "never moves back");
        e.mark_flushed(11_000);
        assert_eq!(e.pending_use(), None);
        e.note_use(12_500);
        // A change-feed update replaces the entry: the unflushed use moves with it.
        let next = e.succeeded_by(rec(Some(3_000)));
        assert_eq!(next.pending_use(), Some(12_500));
        next.mark_flushed(12_500);
        // A newer stored value (another node's flush) is not written back.
        let newer = next.succeeded_by(rec(Some(50_000)));
        assert_eq!(newer.pending_use(), None);
        newer.note_use(50_500);
        assert_eq!(newer.pending_use(), None);
        newer.note_use(51_000);
        assert_eq!(newer.pending_use(), Some(51_000));
    }

    #[tokio::test]
    async fn flush_writes_noted_uses_once() {
        use crate::store::sqlite::SqliteStore;

        let store = Arc::new(SqliteStore::open(std::path::Path::new(":memory:")).unwrap());
        store.migrate().await.unwrap();
        let used = super::super::generate().unwrap();
        let idle = super::super::generate().unwrap();
        let revoked = super::super::generate().unwrap();
        for k in [&used, &idle, &revoked] {
            let mut rec = KeyRecord::new(k.id.clone(), "free".into(), k.secret_hash, 0);
            if k.id == revoked.id {
                rec.revoked_at_ms = Some(1);
            }
            store.insert_key(&rec).await.unwrap();
        }
        let cache = KeyCache::new(store.clone(), Duration::from_secs(60));
        cache.prime().await.unwrap();
        let auth = |key: &str, now: i64| {
            let header = format!("Bearer {key}");
            let cache = &cache;
            async move {
                cache
                    .authenticate(Some(header.as_bytes()), now)
                    .await
                    .is_ok()
            }
        };
        assert!(auth(&used.key, 1_000_000).await);
        assert!(auth(&used.key, 1_000_400).await);
        assert!(!auth(&revoked.key, 1_000_000).await);
        assert_eq!(cache.flush_uses().await.unwrap(), 1);
        let last = |id: String| {
            let store = store.clone();
            async move { store.get_key(&id).await.unwrap().unwrap().last_used_at_ms }
        };
        assert_eq!(last(used.id.clone()).await, Some(1_000_000));
        assert_eq!(last(idle.id.clone()).await, None);
        assert_eq!(
            last(revoked.id.clone()).await,
            None,
            "a refused key is not used"
        );
        assert_eq!(
            cache.flush_uses().await.unwrap(),
            0,
            "nothing new, no write"
        );
        // A full reload in between keeps the noted use.
        assert!(auth(&used.key, 1_005_000).await);
        cache.prime().await.unwrap();
        assert_eq!(cache.flush_uses().await.unwrap(), 1);
        assert_eq!(last(used.id.clone()).await, Some(1_005_000));
    }

    /// A key record whose current secret is `new` and whose replaced secret is `old`.
    fn rotated(
        new: &super::super::NewKey,
        old: &super::super::NewKey,
        grace: Option<i64>,
    ) -> KeyRecord {
        KeyRecord {
            previous_secret_hash: Some(old.secret_hash),
            previous_valid_until_ms: grace,
            ..KeyRecord::new(new.id.clone(), "free".into(), new.secret_hash, 0)
        }
    }

    #[tokio::test]
    async fn rotation_grace_decides_whether_the_old_secret_opens_the_key() {
        use crate::store::sqlite::SqliteStore;

        let old = super::super::generate().unwrap();
        // The new secret keeps the key's id: rotation never changes it.
        let secret = super::super::random_base62(super::super::SECRET_LEN).unwrap();
        let head = format!("{}{}_{secret}", super::super::KEY_PREFIX, old.id);
        let new = super::super::NewKey {
            id: old.id.clone(),
            key: super::super::with_checksum(&head),
            secret_hash: hash_secret(&old.id, &secret),
        };
        let store = SqliteStore::open(std::path::Path::new(":memory:")).unwrap();
        store.migrate().await.unwrap();
        store
            .insert_key(&rotated(&new, &old, Some(10_000)))
            .await
            .unwrap();
        let cache = KeyCache::new(Arc::new(store), Duration::from_secs(60));
        cache.prime().await.unwrap();

        let auth = |key: &str, now: i64| {
            let header = format!("Bearer {key}");
            let cache = &cache;
            async move {
                cache
                    .authenticate(Some(header.as_bytes()), now)
                    .await
                    .map(|e| e.record.id.clone())
            }
        };
        assert_eq!(auth(&new.key, 0).await, Ok(old.id.clone()));
        assert_eq!(auth(&new.key, 20_000).await, Ok(old.id.clone()));
        assert_eq!(auth(&old.key, 9_999).await, Ok(old.id.clone()));
        assert_eq!(auth(&old.key, 10_000).await, Err(AuthError::Unknown));
        assert_eq!(auth(&old.key, 50_000).await, Err(AuthError::Unknown));
    }
}
