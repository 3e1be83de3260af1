//! The store conformance suite: the same test bodies run against SQLite and
//! PostgreSQL, so both backends keep one meaning for every [`Store`] call.
//!
//! Each body takes an `Arc<dyn Store>` that is migrated and empty. PostgreSQL tests
//! use the shared server at `AI4FREE_TEST_PG_URL` (default
//! `postgres://root@127.0.0.1:5432/test`), each in its own fresh schema that is
//! dropped afterwards, so they run in parallel and leave nothing behind. An
//! unreachable server fails the tests: nothing is skipped silently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{
    day_of_ms, open, AuditEntry, AuditQuery, GroupBy, KeyFilter, KeyPatch, KeyStatusFilter,
    ReportRow, RollupQuery, RollupRow, Store, StoreError, UsageQuery,
};
use crate::config::{Storage, UsdAmount};
use crate::keys::{KeyLimits, KeyRecord};
use crate::usage::{TokenSource, UsageRecord};

// === test databases ===

/// The shared PostgreSQL server tests run against.
pub(super) fn test_pg_url() -> String {
    std::env::var("AI4FREE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// A freshly created schema on the shared server, dropped when this value is (also
/// when the test panics). Connect with [`TestSchema::url`] to work inside it.
pub(super) struct TestSchema {
    base: String,
    name: String,
}

impl TestSchema {
    /// The schema's name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) async fn create() -> TestSchema {
        let base = test_pg_url();
        let name = format!("t_{:016x}", getrandom::u64().expect("random schema name"));
        let client = admin_client(&base).await;
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create test schema");
        TestSchema { base, name }
    }

    /// The base URL with `search_path` set to this schema for every connection.
    pub(super) fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.base, self.name)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let base = self.base.clone();
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        // Drop runs inside the test's runtime, which cannot block on a future: use a
        // private one on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = admin_client(&base).await;
                client.batch_execute(&sql).await.expect("drop test schema");
            });
        })
        .join();
    }
}

/// A plain connection outside any store (schema set-up and inspection).
pub(super) async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be reachable for the store tests: {e}"));
    tokio::spawn(conn);
    client
}

async fn sqlite_store() -> Arc<dyn Store> {
    open(&Storage::Sqlite {
        path: Path::new(":memory:").to_path_buf(),
    })
    .await
    .unwrap()
}

async fn postgres_store(schema: &TestSchema) -> Arc<dyn Store> {
    open(&Storage::Postgres { url: schema.url() })
        .await
        .unwrap()
}

/// Instantiates every body for both backends: `store::conformance::{sqlite,postgres}::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::sqlite_store().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let schema = super::TestSchema::create().await;
                    super::$name(super::postgres_store(&schema).await).await;
                }
            )*
        }
    };
}

conformance!(
    migrate_is_idempotent_and_concurrent,
    keys_round_trip,
    duplicate_key_id_conflicts,
    revoke_is_idempotent,
    change_feed_orders_by_rev,
    change_feed_never_skips_under_concurrent_writes,
    usage_batches_never_duplicate,
    usage_query_filters,
    usage_report_sums_exactly,
    optional_fields_and_odd_text_round_trip,
    update_key_patches_and_feeds_the_change,
    rotate_key_keeps_the_old_hash_with_its_grace,
    touch_keys_never_moves_backwards_nor_bumps_rev,
    find_keys_filters,
    find_keys_pages_never_skip_or_repeat,
    find_keys_name_prefix_is_literal,
    audit_round_trip_and_paging,
    rollup_equals_a_direct_aggregation,
);

// === builders ===

pub(super) fn key(id: &str, created_at_ms: i64) -> KeyRecord {
    let mut secret_hash = [0u8; 32];
    for (i, b) in id
        .bytes()
        .chain(std::iter::repeat(0x5a))
        .take(32)
        .enumerate()
    {
        secret_hash[i] = b ^ (i as u8);
    }
    KeyRecord::new(id.to_owned(), "free".to_owned(), secret_hash, created_at_ms)
}

pub(super) fn usage(request_id: &str, key_id: &str, started_at_ms: i64) -> UsageRecord {
    UsageRecord {
        request_id: request_id.into(),
        key_id: key_id.into(),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        endpoint: "/v1/chat/completions".into(),
        prompt_tokens: 12,
        cached_prompt_tokens: 2,
        completion_tokens: 30,
        cost_pusd: 1_234_567,
        input_price_micros: 150_000,
        output_price_micros: 600_000,
        status: 200,
        stream: true,
        token_source: TokenSource::Provider,
        started_at_ms,
        latency_ms: 87,
        ttfb_ms: Some(21),
        error: None,
    }
}

/// `record` as the store returns it: the same, with the store's `rev`.
fn with_rev(record: &KeyRecord, rev: i64) -> KeyRecord {
    KeyRecord {
        rev,
        ..record.clone()
    }
}

fn all() -> UsageQuery {
    UsageQuery::default()
}

// === bodies ===

async fn migrate_is_idempotent_and_concurrent(store: Arc<dyn Store>) {
    store.insert_key(&key("k1", 1)).await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.migrate().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Re-running migrations kept the data and the rev counter.
    let k1 = store.get_key("k1").await.unwrap().unwrap();
    assert_eq!(store.max_key_rev().await.unwrap(), k1.rev);
    store.insert_key(&key("k2", 2)).await.unwrap();
    let k2 = store.get_key("k2").await.unwrap().unwrap();
    assert!(k2.rev > k1.rev, "{} > {}", k2.rev, k1.rev);
}

async fn keys_round_trip(store: Arc<dyn Store>) {
    assert_eq!(store.get_key("missing").await.unwrap(), None);
    assert!(store.list_keys().await.unwrap().is_empty());

    let full = KeyRecord {
        name: Some("Zoë's \"prod\" key 🚀".to_owned()),
        owner: Some("alice@example.com".to_owned()),
        project: Some("proj/α".to_owned()),
        tier: "pro".to_owned(),
        models: vec![
            "gpt-4o".to_owned(),
            "openai/gpt-4o-mini".to_owned(),
            "模型".to_owned(),
        ],
        metadata: serde_json::json!({
            "team": "Zoë's",
            "n": 12,
            "nested": {"list": [1, "two", null, true], "big": u64::MAX},
        })
        .as_object()
        .unwrap()
        .clone(),
        limits: KeyLimits {
            requests_per_second: Some(3),
            tokens_per_day: Some(u64::MAX),
            default_max_tokens: Some(512),
            spend_usd_per_day: Some(UsdAmount { micros: 1 }),
            spend_usd_per_month: Some(UsdAmount { micros: u64::MAX }),
            ..KeyLimits::default()
        },
        expires_at_ms: Some(1_900_000_000_000),
        revoked_at_ms: Some(1_800_000_000_000),
        last_used_at_ms: Some(1_750_000_000_000),
        previous_secret_hash: Some([7; 32]),
        previous_valid_until_ms: Some(1_760_000_000_000),
        ..key("a4f_full", 1_700_000_000_000)
    };
    let bare = key("a4f_bare", 1_600_000_000_000);
    // Same creation time as `full`: list order falls back to the id, bytewise.
    let twin = key("a4f_FULL", 1_700_000_000_000);
    for k in [&full, &bare, &twin] {
        store.insert_key(k).await.unwrap();
    }

    let got_full = store.get_key("a4f_full").await.unwrap().unwrap();
    let got_bare = store.get_key("a4f_bare").await.unwrap().unwrap();
    let got_twin = store.get_key("a4f_FULL").await.unwrap().unwrap();
    assert_eq!(got_full, with_rev(&full, got_full.rev));
    assert_eq!(got_bare, with_rev(&bare, got_bare.rev));
    assert_eq!(got_full.secret_hash, full.secret_hash);
    // Revs are assigned by the store, increasing in write order.
    assert!(0 < got_full.rev && got_full.rev < got_bare.rev && got_bare.rev < got_twin.rev);

    let listed = store.list_keys().await.unwrap();
    assert_eq!(listed, vec![got_bare, got_twin, got_full]);
}

async fn duplicate_key_id_conflicts(store: Arc<dyn Store>) {
    store.insert_key(&key("dup", 1)).await.unwrap();
    let before = store.max_key_rev().await.unwrap();
    let again = KeyRecord {
        tier: "pro".to_owned(),
        ..key("dup", 2)
    };
    match store.insert_key(&again).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("dup"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let kept = store.get_key("dup").await.unwrap().unwrap();
    assert_eq!(kept.tier, "free");
    assert_eq!(kept.created_at_ms, 1);
    // A refused insert is not a change: the feed does not move.
    assert_eq!(store.max_key_rev().await.unwrap(), before);
    assert!(store.keys_changed_since(before).await.unwrap().is_empty());
}

async fn revoke_is_idempotent(store: Arc<dyn Store>) {
    store.insert_key(&key("k", 1)).await.unwrap();
    let rev0 = store.max_key_rev().await.unwrap();
    assert!(!store.revoke_key("nope", 5).await.unwrap());
    assert_eq!(store.max_key_rev().await.unwrap(), rev0);

    assert!(store.revoke_key("k", 1_000).await.unwrap());
    let first = store.get_key("k").await.unwrap().unwrap();
    assert_eq!(first.revoked_at_ms, Some(1_000));
    assert!(first.rev > rev0);

    // The first revocation time stands; the write is still a change on the feed.
    assert!(store.revoke_key("k", 2_000).await.unwrap());
    let second = store.get_key("k").await.unwrap().unwrap();
    assert_eq!(second.revoked_at_ms, Some(1_000));
    assert!(second.rev > first.rev);
    assert_eq!(
        store.keys_changed_since(first.rev).await.unwrap(),
        vec![second]
    );
}

async fn change_feed_orders_by_rev(store: Arc<dyn Store>) {
    assert_eq!(store.max_key_rev().await.unwrap(), 0);
    assert!(store.keys_changed_since(0).await.unwrap().is_empty());
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        store.insert_key(&key(id, i as i64)).await.unwrap();
    }
    assert!(store.revoke_key("a", 10).await.unwrap());

    let feed = store.keys_changed_since(0).await.unwrap();
    let ids: Vec<&str> = feed.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["b", "c", "a"]);
    assert!(feed.windows(2).all(|w| w[0].rev < w[1].rev));
    let a = &feed[2];
    assert_eq!(a.revoked_at_ms, Some(10));
    assert_eq!(store.max_key_rev().await.unwrap(), a.rev);

    let since_c = store.keys_changed_since(feed[1].rev).await.unwrap();
    assert_eq!(since_c, vec![a.clone()]);
    assert!(store.keys_changed_since(a.rev).await.unwrap().is_empty());
}

/// Follows the feed like a node's key cache while several tasks insert and revoke at
/// once. The map built only from the feed must end equal to the store: a change
/// committed below the cursor after the poller moved past it would be lost.
async fn change_feed_never_skips_under_concurrent_writes(store: Arc<dyn Store>) {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 12;
    for i in 0..WRITERS * PER_WRITER {
        store
            .insert_key(&key(&format!("old{i:03}"), i as i64))
            .await
            .unwrap();
    }
    let mut cache: BTreeMap<String, KeyRecord> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.id.clone(), k))
        .collect();
    let start = store.max_key_rev().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut cursor = start;
            let mut seen = Vec::new();
            loop {
                // Read the flag first: the poll after it sees every finished write.
                let last = stop.load(Ordering::Acquire);
                let batch = store.keys_changed_since(cursor).await.unwrap();
                for k in batch {
                    assert!(k.rev > cursor, "rev {} not above cursor {cursor}", k.rev);
                    cursor = k.rev;
                    seen.push(k);
                }
                if last {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for j in 0..PER_WRITER {
                    let i = j * WRITERS + w;
                    assert!(store
                        .revoke_key(&format!("old{i:03}"), 100 + i as i64)
                        .await
                        .unwrap());
                    store
                        .insert_key(&key(&format!("new{w}-{j:02}"), 1_000 + i as i64))
                        .await
                        .unwrap();
                    // Every old key is revoked twice: by its writer and by the next one.
                    let other = ((j + 1) % PER_WRITER) * WRITERS + (w + 1) % WRITERS;
                    assert!(store
                        .revoke_key(&format!("old{other:03}"), 9_999)
                        .await
                        .unwrap());
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Release);
    let seen = poller.await.unwrap();

    // A key written twice between two polls shows once, with its latest state; an
    // insert or last revocation skipped by the feed would leave the cache stale.
    assert!(seen.len() <= 3 * WRITERS * PER_WRITER);
    for k in seen {
        cache.insert(k.id.clone(), k);
    }
    let truth: BTreeMap<String, KeyRecord> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.id.clone(), k))
        .collect();
    assert_eq!(cache.len(), 2 * WRITERS * PER_WRITER);
    assert_eq!(cache, truth);
    assert!(truth
        .values()
        .filter(|k| k.id.starts_with("old"))
        .all(|k| k.revoked_at_ms.is_some()));
}

async fn usage_batches_never_duplicate(store: Arc<dyn Store>) {
    store.insert_usage(Arc::from(&[][..])).await.unwrap();
    let first: Vec<UsageRecord> = (0..50)
        .map(|i| usage(&format!("req-{i:03}"), "k1", 1_000 + i))
        .collect();
    store.insert_usage(Arc::from(&first[..])).await.unwrap();
    // The writer replays a batch whose commit it could not confirm.
    store.insert_usage(Arc::from(&first[..])).await.unwrap();

    // Overlaps the first batch; the stored rows must stay the first versions.
    let second: Vec<UsageRecord> = (25..75)
        .map(|i| UsageRecord {
            completion_tokens: 999,
            ..usage(&format!("req-{i:03}"), "k1", 1_000 + i)
        })
        .collect();
    store.insert_usage(Arc::from(&second[..])).await.unwrap();
    // The same request id twice inside one batch.
    let twice = [usage("req-x", "k2", 5), usage("req-x", "k2", 5)];
    store.insert_usage(Arc::from(&twice[..])).await.unwrap();

    let rows = store.query_usage(&all()).await.unwrap();
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(rows.len(), 76);
    assert_eq!(ids.len(), rows.len(), "no request id twice");
    let mut expected: Vec<UsageRecord> = first;
    expected.extend(second.into_iter().skip(25));
    expected.push(twice[0].clone());
    expected
        .sort_by(|a, b| (a.started_at_ms, &a.request_id).cmp(&(b.started_at_ms, &b.request_id)));
    assert_eq!(rows, expected);
}

fn filter(rows: &[UsageRecord], q: &UsageQuery) -> Vec<UsageRecord> {
    let mut out: Vec<UsageRecord> = rows
        .iter()
        .filter(|r| q.since_ms.is_none_or(|s| r.started_at_ms >= s))
        .filter(|r| q.until_ms.is_none_or(|u| r.started_at_ms < u))
        .filter(|r| q.key_id.as_ref().is_none_or(|k| &r.key_id == k))
        .cloned()
        .collect();
    // Bytewise id order, as both stores promise.
    out.sort_by(|a, b| {
        (a.started_at_ms, a.request_id.as_bytes()).cmp(&(b.started_at_ms, b.request_id.as_bytes()))
    });
    out
}

async fn usage_query_filters(store: Arc<dyn Store>) {
    let mut rows = Vec::new();
    for i in 0..30i64 {
        let key = if i % 3 == 0 { "k2" } else { "k1" };
        // Pairs share a start time; ids differ in case, so order must be bytewise.
        let id = if i % 2 == 0 {
            format!("r-{i:02}")
        } else {
            format!("R-{i:02}")
        };
        rows.push(usage(&id, key, 1_000 + (i / 2) * 10));
    }
    store.insert_usage(Arc::from(&rows[..17])).await.unwrap();
    store.insert_usage(Arc::from(&rows[17..])).await.unwrap();

    let queries = [
        all(),
        UsageQuery {
            since_ms: Some(1_050),
            ..all()
        },
        UsageQuery {
            until_ms: Some(1_050),
            ..all()
        },
        UsageQuery {
            since_ms: Some(1_020),
            until_ms: Some(1_100),
            ..all()
        },
        UsageQuery {
            key_id: Some("k2".into()),
            ..all()
        },
        UsageQuery {
            key_id: Some("k1".into()),
            since_ms: Some(1_030),
            until_ms: Some(1_120),
        },
        UsageQuery {
            key_id: Some("nobody".into()),
            ..all()
        },
        UsageQuery {
            since_ms: Some(1_100),
            until_ms: Some(1_100),
            ..all()
        },
    ];
    for q in &queries {
        let got = store.query_usage(q).await.unwrap();
        assert_eq!(got, filter(&rows, q), "query {q:?}");
    }
    assert_eq!(store.query_usage(&all()).await.unwrap().len(), 30);
}

/// Totals computed in Rust from the rows (the model the stores must agree with).
fn report(rows: &[UsageRecord], q: &UsageQuery) -> Vec<ReportRow> {
    let mut groups: BTreeMap<(String, String), ReportRow> = BTreeMap::new();
    for r in filter(rows, q) {
        let g = groups
            .entry((r.key_id.to_string(), r.model.to_string()))
            .or_insert_with(|| ReportRow {
                key_id: r.key_id.to_string(),
                model: r.model.to_string(),
                requests: 0,
                ok_requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_pusd: 0,
            });
        g.requests += 1;
        g.ok_requests += u64::from((200..300).contains(&r.status));
        g.prompt_tokens += r.prompt_tokens;
        g.completion_tokens += r.completion_tokens;
        g.cost_pusd += i128::from(r.cost_pusd);
    }
    groups.into_values().collect()
}

async fn usage_report_sums_exactly(store: Arc<dyn Store>) {
    let mut rows = Vec::new();
    let statuses = [200u16, 201, 299, 300, 429, 500, 0, 204];
    for i in 0..40i64 {
        let mut r = usage(
            &format!("req-{i:02}"),
            ["k1", "k2"][(i % 2) as usize],
            1_000 + i,
        );
        r.model = ["gpt-4o", "llama-3", "Gpt-4o"][(i % 3) as usize].into();
        r.status = statuses[(i % 8) as usize];
        r.prompt_tokens = 1_000 + i as u64 * 7;
        r.completion_tokens = 10 * i as u64;
        r.cost_pusd = 1_000_003 * i + 999_999;
        rows.push(r);
    }
    // Costs whose sum passes i64::MAX: it must come back exact, not wrapped or rounded.
    for (i, cost) in [i64::MAX - 7, i64::MAX / 3 + 11, i64::MAX - 1_000_001]
        .iter()
        .enumerate()
    {
        let mut r = usage(&format!("big-{i}"), "k-big", 2_000 + i as i64);
        r.cost_pusd = *cost;
        rows.push(r);
    }
    store.insert_usage(Arc::from(&rows[..])).await.unwrap();

    let queries = [
        all(),
        UsageQuery {
            key_id: Some("k1".into()),
            ..all()
        },
        UsageQuery {
            since_ms: Some(1_010),
            until_ms: Some(1_030),
            ..all()
        },
        UsageQuery {
            key_id: Some("none".into()),
            ..all()
        },
    ];
    for q in &queries {
        assert_eq!(
            store.usage_report(q).await.unwrap(),
            report(&rows, q),
            "query {q:?}"
        );
    }
    let big = store
        .usage_report(&UsageQuery {
            key_id: Some("k-big".into()),
            ..all()
        })
        .await
        .unwrap();
    let expected: i128 =
        i128::from(i64::MAX - 7) + i128::from(i64::MAX / 3 + 11) + i128::from(i64::MAX - 1_000_001);
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].cost_pusd, expected);
    assert!(big[0].cost_pusd > i128::from(i64::MAX));
}

async fn optional_fields_and_odd_text_round_trip(store: Arc<dyn Store>) {
    let odd =
        "it's \"quoted\" \\ back\\slash; DROP TABLE usage; -- 日本語 🚀 \u{202e}rtl\u{202c} \t\n'";
    let mut rows = Vec::new();
    let sources = [
        TokenSource::Provider,
        TokenSource::Counted,
        TokenSource::Partial,
        TokenSource::None,
    ];
    for (i, source) in sources.into_iter().enumerate() {
        let mut r = usage(&format!("opt-{i}"), odd, 10 + i as i64);
        r.token_source = source;
        r.stream = i % 2 == 0;
        r.status = [0, 599, 200, 404][i];
        r.ttfb_ms = (i % 2 == 1).then_some(i as u64 * 1_000);
        r.error = (i != 0).then(|| format!("{odd} #{i}"));
        r.model = "".into();
        r.provider = "prov'ider".into();
        r.prompt_tokens = i64::MAX as u64;
        r.cached_prompt_tokens = 0;
        r.cost_pusd = -5;
        r.latency_ms = 0;
        rows.push(r);
    }
    store.insert_usage(Arc::from(&rows[..])).await.unwrap();
    assert_eq!(store.query_usage(&all()).await.unwrap(), rows);
    let by_key = UsageQuery {
        key_id: Some(odd.to_owned()),
        ..all()
    };
    assert_eq!(store.query_usage(&by_key).await.unwrap(), rows);

    let k = KeyRecord {
        name: Some(odd.to_owned()),
        owner: Some(String::new()),
        models: vec![odd.to_owned(), String::new()],
        ..key("odd", 3)
    };
    store.insert_key(&k).await.unwrap();
    let got = store.get_key("odd").await.unwrap().unwrap();
    assert_eq!(got, with_rev(&k, got.rev));
}

async fn update_key_patches_and_feeds_the_change(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .update_key("nope", &KeyPatch::default())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.max_key_rev().await.unwrap(),
        0,
        "unknown id is no change"
    );
    let k = KeyRecord {
        name: Some("old".into()),
        owner: Some("alice".into()),
        expires_at_ms: Some(5_000),
        models: vec!["m1".into()],
        ..key("k", 1)
    };
    store.insert_key(&k).await.unwrap();
    let before = store.get_key("k").await.unwrap().unwrap();

    let metadata = serde_json::json!({"team": "α", "n": [1, 2]})
        .as_object()
        .unwrap()
        .clone();
    let limits = KeyLimits {
        requests_per_minute: Some(7),
        spend_usd_per_day: Some(UsdAmount { micros: 3 }),
        ..KeyLimits::default()
    };
    let patch = KeyPatch {
        name: Some(Some("new".into())),
        tier: Some("pro".into()),
        expires_at_ms: Some(None),
        models: Some(vec![]),
        metadata: Some(metadata.clone()),
        limits: Some(limits.clone()),
    };
    let got = store.update_key("k", &patch).await.unwrap().unwrap();
    assert!(got.rev > before.rev);
    let expected = KeyRecord {
        name: Some("new".into()),
        tier: "pro".into(),
        expires_at_ms: None,
        models: vec![],
        metadata,
        limits,
        rev: got.rev,
        ..before.clone()
    };
    assert_eq!(got, expected);
    assert_eq!(store.get_key("k").await.unwrap().unwrap(), expected);
    assert_eq!(
        store.keys_changed_since(before.rev).await.unwrap(),
        vec![expected.clone()]
    );

    // Untouched fields stay; clearing the name and setting an expiry.
    let second = store
        .update_key(
            "k",
            &KeyPatch {
                name: Some(None),
                expires_at_ms: Some(Some(9_000)),
                ..KeyPatch::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(second.rev > got.rev);
    assert_eq!(
        second,
        KeyRecord {
            name: None,
            expires_at_ms: Some(9_000),
            rev: second.rev,
            ..expected
        }
    );
    assert_eq!(second.owner.as_deref(), Some("alice"));
    assert_eq!(store.max_key_rev().await.unwrap(), second.rev);
}

async fn rotate_key_keeps_the_old_hash_with_its_grace(store: Arc<dyn Store>) {
    assert_eq!(
        store.rotate_key("nope", &[1; 32], None).await.unwrap(),
        None
    );
    let k = key("k", 1);
    store.insert_key(&k).await.unwrap();
    let before = store.get_key("k").await.unwrap().unwrap();

    let first = store
        .rotate_key("k", &[1; 32], Some(10_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.secret_hash, [1; 32]);
    assert_eq!(first.previous_secret_hash, Some(k.secret_hash));
    assert_eq!(first.previous_valid_until_ms, Some(10_000));
    assert!(first.rev > before.rev);
    assert_eq!(first.id, "k");
    assert_eq!(
        store.keys_changed_since(before.rev).await.unwrap(),
        vec![first.clone()]
    );
    assert!(first.secret_matches(&k.secret_hash, 9_999));
    assert!(!first.secret_matches(&k.secret_hash, 10_000));

    // A second rotation without grace: the first secret is gone, the second is
    // kept but refused at once.
    let second = store
        .rotate_key("k", &[2; 32], None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.secret_hash, [2; 32]);
    assert_eq!(second.previous_secret_hash, Some([1; 32]));
    assert_eq!(second.previous_valid_until_ms, None);
    assert!(!second.secret_matches(&[1; 32], 0));
    assert!(!second.secret_matches(&k.secret_hash, 0));
    assert_eq!(store.get_key("k").await.unwrap().unwrap(), second);

    assert!(store.revoke_key("k", 50).await.unwrap());
    let revoked = store.get_key("k").await.unwrap().unwrap();
    match store.rotate_key("k", &[3; 32], Some(99_999)).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("revoked"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.get_key("k").await.unwrap().unwrap(), revoked);
    assert_eq!(store.max_key_rev().await.unwrap(), revoked.rev);
}

async fn touch_keys_never_moves_backwards_nor_bumps_rev(store: Arc<dyn Store>) {
    store.touch_keys(&[]).await.unwrap();
    for id in ["a", "b", "c"] {
        store.insert_key(&key(id, 1)).await.unwrap();
    }
    let rev = store.max_key_rev().await.unwrap();
    let used = |id: &str, at: i64| (id.to_owned(), at);
    store
        .touch_keys(&[
            used("a", 100),
            used("b", 50),
            used("a", 70),
            used("ghost", 1),
        ])
        .await
        .unwrap();
    store
        .touch_keys(&[used("a", 90), used("b", 60), used("b", 40)])
        .await
        .unwrap();
    let last = |k: Option<KeyRecord>| k.unwrap().last_used_at_ms;
    assert_eq!(last(store.get_key("a").await.unwrap()), Some(100));
    assert_eq!(last(store.get_key("b").await.unwrap()), Some(60));
    assert_eq!(last(store.get_key("c").await.unwrap()), None);
    assert_eq!(store.get_key("ghost").await.unwrap(), None);
    assert_eq!(store.max_key_rev().await.unwrap(), rev);
    assert!(store.keys_changed_since(rev).await.unwrap().is_empty());

    // A batch larger than one statement's chunk in either store.
    let many: Vec<(String, i64)> = (0..1_000).map(|i| used("c", i)).collect();
    store.touch_keys(&many).await.unwrap();
    assert_eq!(last(store.get_key("c").await.unwrap()), Some(999));
}

fn ids(keys: &[KeyRecord]) -> Vec<&str> {
    keys.iter().map(|k| k.id.as_str()).collect()
}

async fn find_keys_filters(store: Arc<dyn Store>) {
    let now = 10_000;
    let records = [
        KeyRecord {
            owner: Some("alice".into()),
            project: Some("p1".into()),
            ..key("k1", 1)
        },
        KeyRecord {
            owner: Some("alice".into()),
            project: Some("p2".into()),
            tier: "pro".into(),
            revoked_at_ms: Some(now - 1),
            ..key("k2", 2)
        },
        KeyRecord {
            owner: Some("bob".into()),
            project: Some("p1".into()),
            expires_at_ms: Some(now),
            ..key("k3", 3)
        },
        // Revoked and expired: revocation wins, as in KeyRecord::status.
        KeyRecord {
            owner: Some("bob".into()),
            expires_at_ms: Some(now - 5),
            revoked_at_ms: Some(now - 1),
            ..key("k4", 4)
        },
        // Revocation and expiry in the future: still active now.
        KeyRecord {
            owner: Some("Alice".into()),
            expires_at_ms: Some(now + 1),
            revoked_at_ms: Some(now + 1),
            tier: "pro".into(),
            ..key("k5", 5)
        },
    ];
    for r in &records {
        store.insert_key(r).await.unwrap();
    }
    let base = KeyFilter {
        now_ms: now,
        ..KeyFilter::default()
    };
    let cases: Vec<(KeyFilter, Vec<&str>)> = vec![
        (base.clone(), vec!["k1", "k2", "k3", "k4", "k5"]),
        (
            KeyFilter {
                owner: Some("alice".into()),
                ..base.clone()
            },
            vec!["k1", "k2"],
        ),
        (
            KeyFilter {
                project: Some("p1".into()),
                ..base.clone()
            },
            vec!["k1", "k3"],
        ),
        (
            KeyFilter {
                tier: Some("pro".into()),
                ..base.clone()
            },
            vec!["k2", "k5"],
        ),
        (
            KeyFilter {
                status: Some(KeyStatusFilter::Active),
                ..base.clone()
            },
            vec!["k1", "k5"],
        ),
        (
            KeyFilter {
                status: Some(KeyStatusFilter::Revoked),
                ..base.clone()
            },
            vec!["k2", "k4"],
        ),
        (
            KeyFilter {
                status: Some(KeyStatusFilter::Expired),
                ..base.clone()
            },
            vec!["k3"],
        ),
        (
            KeyFilter {
                owner: Some("bob".into()),
                status: Some(KeyStatusFilter::Expired),
                ..base.clone()
            },
            vec!["k3"],
        ),
        (
            KeyFilter {
                owner: Some("carol".into()),
                ..base.clone()
            },
            vec![],
        ),
    ];
    for (f, expected) in cases {
        let page = store.find_keys(&f, 100, None).await.unwrap();
        assert_eq!(ids(&page.keys), expected, "{f:?}");
        assert_eq!(page.next_cursor, None);
        // The rule is KeyRecord::status, evaluated at now.
        if let Some(s) = f.status {
            assert!(page.keys.iter().all(|k| k.status(now) == s));
        }
    }
    let k1 = store.get_key("k1").await.unwrap().unwrap();
    let page = store.find_keys(&base, 1, None).await.unwrap();
    assert_eq!(page.keys, vec![k1]);
    match store.find_keys(&base, 10, Some("not-a-cursor")).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("expected an invalid cursor error, got {other:?}"),
    }
}

async fn find_keys_pages_never_skip_or_repeat(store: Arc<dyn Store>) {
    // Ids differing in case: byte order puts every upper-case id first.
    let mut all: Vec<String> = (0..25)
        .map(|i| {
            if i % 2 == 0 {
                format!("key-{i:02}")
            } else {
                format!("KEY-{i:02}")
            }
        })
        .collect();
    for (i, id) in all.iter().enumerate() {
        store.insert_key(&key(id, 100 - i as i64)).await.unwrap();
    }
    all.sort();
    let f = KeyFilter::default();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.find_keys(&f, 10, cursor.as_deref()).await.unwrap();
        pages += 1;
        assert!(page.keys.len() <= 10);
        seen.extend(page.keys.iter().map(|k| k.id.clone()));
        if pages == 1 {
            // A key inserted behind the cursor mid-listing is not shown twice or
            // shift the pages; one ahead of it shows up once.
            store.insert_key(&key("AAA-behind", 0)).await.unwrap();
            store.insert_key(&key("zzz-ahead", 0)).await.unwrap();
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut expected = all.clone();
    expected.push("zzz-ahead".into());
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    // An exact multiple of the page size ends without an empty page.
    let page = store
        .find_keys(&KeyFilter::default(), 27, None)
        .await
        .unwrap();
    assert_eq!(page.keys.len(), 27);
    assert_eq!(page.next_cursor, None);
}

async fn find_keys_name_prefix_is_literal(store: Arc<dyn Store>) {
    let names = [
        ("n1", Some("50%_off")),
        ("n2", Some("50%_offer")),
        ("n3", Some("50x_off")),
        ("n4", Some("50%aoff")),
        ("n5", Some("50%_OFF")),
        ("n6", Some("a\\b")),
        ("n7", Some("ab")),
        ("n8", None),
        ("n9", Some("Zoë's key")),
    ];
    for (id, name) in names {
        let k = KeyRecord {
            name: name.map(str::to_owned),
            ..key(id, 1)
        };
        store.insert_key(&k).await.unwrap();
    }
    let find = |prefix: &str| {
        let store = store.clone();
        let f = KeyFilter {
            name_prefix: Some(prefix.to_owned()),
            ..KeyFilter::default()
        };
        async move {
            let page = store.find_keys(&f, 100, None).await.unwrap();
            page.keys.into_iter().map(|k| k.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(find("50%_off").await, ["n1", "n2"]);
    assert_eq!(find("50%").await, ["n1", "n2", "n4", "n5"]);
    assert_eq!(find("50%_").await, ["n1", "n2", "n5"]);
    assert_eq!(find("a\\").await, ["n6"]);
    assert_eq!(find("Zoë").await, ["n9"]);
    assert_eq!(find("zoë").await, Vec::<String>::new());
    assert_eq!(find("").await.len(), 8, "every named key");
}

async fn audit_round_trip_and_paging(store: Arc<dyn Store>) {
    let empty = store
        .list_audit(&AuditQuery::default(), 10, None)
        .await
        .unwrap();
    assert!(empty.entries.is_empty() && empty.next_cursor.is_none());
    let mut written = Vec::new();
    for i in 0..23i64 {
        let e = AuditEntry {
            id: 0,
            // Pairs share an instant: order falls back to the id.
            at_ms: 1_000 + i / 2,
            actor: if i % 3 == 0 { "cli" } else { "admin" }.to_owned(),
            action: ["key.create", "key.rotate"][(i % 2) as usize].to_owned(),
            target: (i != 5).then(|| format!("key-{}", i % 4)),
            detail: serde_json::json!({"i": i, "note": "it's \"odd\" \u{0} 🚀", "fields": ["tier"]}),
        };
        let id = store.insert_audit(&e).await.unwrap();
        written.push(AuditEntry { id, ..e });
    }
    assert!(written.windows(2).all(|w| w[0].id < w[1].id));
    let newest_first: Vec<AuditEntry> = written.iter().rev().cloned().collect();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list_audit(&AuditQuery::default(), 10, cursor.as_deref())
            .await
            .unwrap();
        seen.extend(page.entries);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    let q = AuditQuery {
        since_ms: Some(1_002),
        until_ms: Some(1_010),
        actor: Some("admin".into()),
        action: Some("key.rotate".into()),
        target: None,
    };
    let expected: Vec<AuditEntry> = newest_first
        .iter()
        .filter(|e| e.at_ms >= 1_002 && e.at_ms < 1_010)
        .filter(|e| e.actor == "admin" && e.action == "key.rotate")
        .cloned()
        .collect();
    assert!(expected.len() >= 3);
    let page1 = store.list_audit(&q, 2, None).await.unwrap();
    let page2 = store
        .list_audit(&q, 100, page1.next_cursor.as_deref())
        .await
        .unwrap();
    let mut got = page1.entries;
    got.extend(page2.entries);
    assert_eq!(got, expected);
    assert_eq!(page2.next_cursor, None);
    let by_target = store
        .list_audit(
            &AuditQuery {
                target: Some("key-1".into()),
                ..AuditQuery::default()
            },
            100,
            None,
        )
        .await
        .unwrap();
    assert!(!by_target.entries.is_empty());
    assert!(by_target
        .entries
        .iter()
        .all(|e| e.target.as_deref() == Some("key-1")));
    assert!(matches!(
        store
            .list_audit(&AuditQuery::default(), 5, Some("k00"))
            .await,
        Err(StoreError::Invalid(_))
    ));
}

const DAY_MS: i64 = 86_400_000;

/// Rollup totals computed in Rust from usage rows and key owners/projects.
pub(super) fn rollup_model(
    rows: &[UsageRecord],
    keys: &[KeyRecord],
    q: &RollupQuery,
) -> Vec<RollupRow> {
    let key = |id: &str| keys.iter().find(|k| k.id == id);
    let mut groups: BTreeMap<Option<String>, RollupRow> = BTreeMap::new();
    for r in rows {
        let day = day_of_ms(r.started_at_ms);
        let k = key(&r.key_id);
        let owner = k.and_then(|k| k.owner.clone());
        let project = k.and_then(|k| k.project.clone());
        let keep = q.key_id.as_ref().is_none_or(|v| *v == r.key_id)
            && q.model.as_ref().is_none_or(|v| *v == r.model)
            && q.owner.as_ref().is_none_or(|v| Some(v) == owner.as_ref())
            && q.project
                .as_ref()
                .is_none_or(|v| Some(v) == project.as_ref())
            && q.since_day.as_ref().is_none_or(|v| day >= *v)
            && q.until_day.as_ref().is_none_or(|v| day <= *v);
        if !keep {
            continue;
        }
        let g = match q.group_by {
            GroupBy::Day => Some(day),
            GroupBy::Model => Some(r.model.to_string()),
            GroupBy::Key => Some(r.key_id.to_string()),
            GroupBy::Owner => owner,
            GroupBy::Project => project,
        };
        let row = groups.entry(g.clone()).or_insert(RollupRow {
            group: g,
            requests: 0,
            ok_requests: 0,
            failed: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_pusd: 0,
        });
        let ok = (200..300).contains(&r.status);
        row.requests += 1;
        row.ok_requests += u64::from(ok);
        row.failed += u64::from(!ok);
        row.prompt_tokens += r.prompt_tokens;
        row.completion_tokens += r.completion_tokens;
        row.cost_pusd += i128::from(r.cost_pusd);
    }
    groups.into_values().collect()
}

/// Keys and a usage history over several days, models and statuses, including
/// costs whose sum passes i64::MAX and a key the store does not know.
pub(super) fn rollup_fixture() -> (Vec<KeyRecord>, Vec<UsageRecord>) {
    let keys = vec![
        KeyRecord {
            owner: Some("alice".into()),
            project: Some("p1".into()),
            ..key("ka", 1)
        },
        KeyRecord {
            owner: Some("alice".into()),
            project: Some("p2".into()),
            ..key("kb", 1)
        },
        KeyRecord {
            owner: Some("Bob".into()),
            ..key("KC", 1)
        },
    ];
    let statuses = [200u16, 500, 204, 429, 0, 299, 300];
    let mut rows = Vec::new();
    for i in 0..120i64 {
        let mut r = usage(
            &format!("roll-{i:03}"),
            ["ka", "kb", "KC", "ghost"][(i % 4) as usize],
            // Spread over five days, both sides of midnight, before the epoch too.
            (i % 5 - 1) * DAY_MS + (i * 7_919_000) % DAY_MS,
        );
        r.model = ["gpt-4o", "Gpt-4o", "llama"][(i % 3) as usize].into();
        r.status = statuses[(i % 7) as usize];
        r.prompt_tokens = 100 + i as u64;
        r.completion_tokens = 3 * i as u64;
        r.cost_pusd = 1_000_003 * i - 7;
        rows.push(r);
    }
    for (i, cost) in [i64::MAX - 7, i64::MAX / 3, i64::MAX]
        .into_iter()
        .enumerate()
    {
        let mut r = usage(&format!("big-{i}"), "ka", 2 * DAY_MS + i as i64);
        r.cost_pusd = cost;
        rows.push(r);
    }
    (keys, rows)
}

pub(super) fn rollup_queries() -> Vec<RollupQuery> {
    let mut qs = Vec::new();
    for g in [
        GroupBy::Day,
        GroupBy::Model,
        GroupBy::Key,
        GroupBy::Owner,
        GroupBy::Project,
    ] {
        qs.push(RollupQuery {
            group_by: g,
            ..RollupQuery::default()
        });
        qs.push(RollupQuery {
            group_by: g,
            owner: Some("alice".into()),
            since_day: Some(day_of_ms(0)),
            until_day: Some(day_of_ms(2 * DAY_MS)),
            ..RollupQuery::default()
        });
    }
    qs.push(RollupQuery {
        group_by: GroupBy::Day,
        key_id: Some("kb".into()),
        model: Some("llama".into()),
        ..RollupQuery::default()
    });
    qs.push(RollupQuery {
        group_by: GroupBy::Model,
        project: Some("p1".into()),
        ..RollupQuery::default()
    });
    qs.push(RollupQuery {
        group_by: GroupBy::Key,
        key_id: Some("nobody".into()),
        ..RollupQuery::default()
    });
    qs
}

async fn rollup_equals_a_direct_aggregation(store: Arc<dyn Store>) {
    let (keys, rows) = rollup_fixture();
    for k in &keys {
        store.insert_key(k).await.unwrap();
    }
    store.insert_usage(Arc::from(&rows[..70])).await.unwrap();
    // Replays and duplicates: the overlap and the in-batch twin must not count twice.
    store.insert_usage(Arc::from(&rows[..70])).await.unwrap();
    // A batch whose only stored row comes last, after more fresh rows than one
    // multi-row statement holds: the fresh rows count once, the stored one not again.
    let mut late_replay = rows[70..110].to_vec();
    late_replay.push(rows[5].clone());
    store
        .insert_usage(Arc::from(&late_replay[..]))
        .await
        .unwrap();
    store.insert_usage(Arc::from(&rows[50..])).await.unwrap();
    let twin = [rows[3].clone(), rows[3].clone()];
    store.insert_usage(Arc::new(twin)).await.unwrap();
    for q in rollup_queries() {
        assert_eq!(
            store.usage_rollup(&q).await.unwrap(),
            rollup_model(&rows, &keys, &q),
            "{q:?}"
        );
    }
    let by_day = store
        .usage_rollup(&RollupQuery {
            group_by: GroupBy::Day,
            key_id: Some("ka".into()),
            since_day: Some(day_of_ms(2 * DAY_MS)),
            until_day: Some(day_of_ms(2 * DAY_MS)),
            ..RollupQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(by_day.len(), 1);
    assert!(by_day[0].cost_pusd > 2 * i128::from(i64::MAX));
    // Groups order None first, then bytewise (upper case first).
    let owners = store
        .usage_rollup(&RollupQuery {
            group_by: GroupBy::Owner,
            ..RollupQuery::default()
        })
        .await
        .unwrap();
    let groups: Vec<Option<&str>> = owners.iter().map(|r| r.group.as_deref()).collect();
    assert_eq!(groups, [None, Some("Bob"), Some("alice")]);
}
