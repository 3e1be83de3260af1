//! The embedded default store: SQLite through rusqlite, in WAL mode.
//!
//! SQLite calls block, so each runs on tokio's blocking pool behind one mutex-guarded
//! connection. WAL mode plus a busy timeout lets the CLI change keys while a server
//! runs on the same file; the server sees the change through the `rev` change feed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::sql::{self, hash32, json_text, to_i64, Dialect, SqlArg, KEY_COLS, USAGE_COLS};
use super::{
    day_number, day_of_ms, day_text, AuditEntry, AuditPage, AuditQuery, KeyFilter, KeyPage,
    KeyPatch, ReportRow, RollupQuery, RollupRow, Store, StoreError, UsageQuery,
};
use crate::keys::KeyRecord;
use crate::usage::{TokenSource, UsageRecord};

/// One schema step: plain SQL, or Rust for what SQLite's SQL cannot do exactly.
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>),
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: a released step never changes.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        r#"
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    owner         TEXT,
    project       TEXT,
    tier          TEXT NOT NULL,
    models        TEXT NOT NULL DEFAULT '[]',
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER,
    secret_hash   BLOB NOT NULL,
    rev           INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_rev ON api_keys(rev);
CREATE TABLE IF NOT EXISTS usage (
    request_id           TEXT PRIMARY KEY,
    key_id               TEXT NOT NULL,
    model                TEXT NOT NULL,
    provider             TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    prompt_tokens        INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens    INTEGER NOT NULL,
    cost_pusd            INTEGER NOT NULL,
    input_price_micros   INTEGER NOT NULL,
    output_price_micros  INTEGER NOT NULL,
    status               INTEGER NOT NULL,
    stream               INTEGER NOT NULL,
    token_source         TEXT NOT NULL,
    started_at_ms        INTEGER NOT NULL,
    latency_ms           INTEGER NOT NULL,
    ttfb_ms              INTEGER,
    error                TEXT
);
CREATE INDEX IF NOT EXISTS usage_started ON usage(started_at_ms);
CREATE INDEX IF NOT EXISTS usage_key_started ON usage(key_id, started_at_ms);
"#,
    ),
    // 2: the key lifecycle (metadata, limit overrides, last use, rotation).
    Migration::Sql(
        r#"
ALTER TABLE api_keys ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
ALTER TABLE api_keys ADD COLUMN last_used_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN previous_secret_hash BLOB;
ALTER TABLE api_keys ADD COLUMN previous_valid_until_ms INTEGER;
CREATE INDEX api_keys_owner ON api_keys(owner, id);
CREATE INDEX api_keys_project ON api_keys(project, id);
"#,
    ),
    // 3: the audit log of admin actions.
    Migration::Sql(
        r#"
CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log(at_ms, id);
"#,
    ),
    // 4: the daily usage rollup. Sums are kept exact in Rust (see `add_daily`):
    // tokens saturate at i64::MAX, costs are i128 decimal text.
    Migration::Sql(
        r#"
CREATE TABLE usage_daily (
    day               TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    ok_requests       INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_pusd         TEXT NOT NULL,
    PRIMARY KEY (day, key_id, model)
);
CREATE INDEX usage_daily_key ON usage_daily(key_id, day);
"#,
    ),
    // 5: fill the rollup from the usage rows written before it existed.
    Migration::Code(backfill_usage_daily),
    // 6: usage rows clustered by (started_at_ms, request_id), the order every
    // query reads them in. A row used to cost four B-tree inserts (the rowid
    // table, the request_id key, and both indexes); it now costs two. The pair
    // still rejects a replayed row: a request id is unique and the writer
    // replays a row exactly as first sent, start time included.
    Migration::Sql(
        r#"
CREATE TABLE usage_by_start (
    started_at_ms        INTEGER NOT NULL,
    request_id           TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    model                TEXT NOT NULL,
    provider             TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    prompt_tokens        INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens    INTEGER NOT NULL,
    cost_pusd            INTEGER NOT NULL,
    input_price_micros   INTEGER NOT NULL,
    output_price_micros  INTEGER NOT NULL,
    status               INTEGER NOT NULL,
    stream               INTEGER NOT NULL,
    token_source         TEXT NOT NULL,
    latency_ms           INTEGER NOT NULL,
    ttfb_ms              INTEGER,
    error                TEXT,
    PRIMARY KEY (started_at_ms, request_id)
) WITHOUT ROWID;
INSERT INTO usage_by_start (request_id, key_id, model, provider, endpoint, prompt_tokens,
    cached_prompt_tokens, completion_tokens, cost_pusd, input_price_micros,
    output_price_micros, status, stream, token_source, started_at_ms, latency_ms, ttfb_ms, error)
SELECT request_id, key_id, model, provider, endpoint, prompt_tokens,
    cached_prompt_tokens, completion_tokens, cost_pusd, input_price_micros,
    output_price_micros, status, stream, token_source, started_at_ms, latency_ms, ttfb_ms, error
FROM usage;
DROP TABLE usage;
ALTER TABLE usage_by_start RENAME TO usage;
CREATE INDEX usage_key_started ON usage(key_id, started_at_ms);
"#,
    ),
];

/// Usage totals of one (day, key, model) cell.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Daily {
    requests: i64,
    ok_requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_pusd: i128,
}

type DailyCells = BTreeMap<(String, String, String), Daily>;

impl Daily {
    fn add(&mut self, o: &Daily) {
        self.requests = self.requests.saturating_add(o.requests);
        self.ok_requests = self.ok_requests.saturating_add(o.ok_requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cost_pusd = self.cost_pusd.saturating_add(o.cost_pusd);
    }

    fn of_request(status: i64, prompt: i64, completion: i64, cost: i64) -> Daily {
        Daily {
            requests: 1,
            ok_requests: i64::from((200..300).contains(&status)),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_pusd: i128::from(cost),
        }
    }
}

/// Adds `cells` to `usage_daily` inside the caller's transaction. Read-modify-write
/// is safe: every SQLite writer holds the database's write lock.
fn add_daily(tx: &Connection, cells: &DailyCells) -> Result<(), StoreError> {
    let mut read = tx
        .prepare_cached(
            "SELECT requests, ok_requests, prompt_tokens, completion_tokens, cost_pusd \
             FROM usage_daily WHERE day = ?1 AND key_id = ?2 AND model = ?3",
        )
        .map_err(db_err)?;
    let mut write = tx
        .prepare_cached(
            "INSERT OR REPLACE INTO usage_daily (day, key_id, model, requests, ok_requests, \
             prompt_tokens, completion_tokens, cost_pusd) VALUES (?,?,?,?,?,?,?,?)",
        )
        .map_err(db_err)?;
    for ((day, key_id, model), delta) in cells {
        let old = read
            .query_row(params![day, key_id, model], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()
            .map_err(db_err)?;
        let mut total = match old {
            Some((requests, ok_requests, prompt_tokens, completion_tokens, cost)) => Daily {
                requests,
                ok_requests,
                prompt_tokens,
                completion_tokens,
                cost_pusd: cost
                    .parse()
                    .map_err(|_| StoreError::Database(format!("usage_daily: bad cost {cost:?}")))?,
            },
            None => Daily::default(),
        };
        total.add(delta);
        write
            .execute(params![
                day,
                key_id,
                model,
                total.requests,
                total.ok_requests,
                total.prompt_tokens,
                total.completion_tokens,
                total.cost_pusd.to_string(),
            ])
            .map_err(db_err)?;
    }
    Ok(())
}

fn backfill_usage_daily(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let mut cells = DailyCells::new();
    {
        let mut st = tx
            .prepare(
                "SELECT key_id, model, status, prompt_tokens, completion_tokens, cost_pusd, \
                 started_at_ms FROM usage",
            )
            .map_err(db_err)?;
        let mut rows = st.query([]).map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            let cell = (
                day_of_ms(r.get(6).map_err(db_err)?),
                r.get(0).map_err(db_err)?,
                r.get(1).map_err(db_err)?,
            );
            let d = Daily::of_request(
                r.get(2).map_err(db_err)?,
                r.get(3).map_err(db_err)?,
                r.get(4).map_err(db_err)?,
                r.get(5).map_err(db_err)?,
            );
            cells.entry(cell).or_default().add(&d);
        }
    }
    add_daily(tx, &cells)
}

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Whether usage batches yield between statements ([`step_aside`]); set
    /// by the usage writer through [`Store::set_yield_between_statements`].
    yielding: AtomicBool,
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

impl SqliteStore {
    /// Opens (creating parent directories) the database at `path`; `:memory:` is in-memory.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = if path.as_os_str() == ":memory:" {
            Connection::open_in_memory().map_err(db_err)?
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Database(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            Connection::open(path).map_err(db_err)?
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        // WAL lets readers (the CLI, reports) run while the server writes.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        // Room for every statement the store caches (six usage INSERT sizes
        // among them) with headroom: an evicted 32-row INSERT costs a re-parse.
        conn.set_prepared_statement_cache_capacity(32);
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            yielding: AtomicBool::new(true),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies the migrations up to `target` (all of them from [`Store::migrate`];
    /// fewer in tests of the upgrade path).
    async fn migrate_to(&self, target: usize) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let done: i64 = tx
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(db_err)?;
            for (i, m) in MIGRATIONS
                .iter()
                .enumerate()
                .take(target)
                .skip(done.max(0) as usize)
            {
                match m {
                    Migration::Sql(sql) => tx.execute_batch(sql).map_err(db_err)?,
                    Migration::Code(f) => f(&tx)?,
                }
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let models: String = r.get(5)?;
    let metadata: String = r.get(11)?;
    let limits: String = r.get(12)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        owner: r.get(2)?,
        project: r.get(3)?,
        tier: r.get(4)?,
        models: serde_json::from_str(&models).unwrap_or_default(),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        limits: serde_json::from_str(&limits).unwrap_or_default(),
        created_at_ms: r.get(6)?,
        expires_at_ms: r.get(7)?,
        revoked_at_ms: r.get(8)?,
        last_used_at_ms: r.get(13)?,
        secret_hash: hash32(&r.get::<_, Vec<u8>>(9)?).unwrap_or_default(),
        previous_secret_hash: r.get::<_, Option<Vec<u8>>>(14)?.and_then(|h| hash32(&h)),
        previous_valid_until_ms: r.get(15)?,
        rev: r.get(10)?,
    })
}

fn usage_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRecord> {
    let source: String = r.get(13)?;
    Ok(UsageRecord {
        request_id: r.get::<_, String>(0)?.into(),
        key_id: r.get::<_, String>(1)?.into(),
        model: r.get::<_, String>(2)?.into(),
        provider: r.get::<_, String>(3)?.into(),
        endpoint: r.get::<_, String>(4)?.into(),
        prompt_tokens: r.get::<_, i64>(5)?.max(0) as u64,
        cached_prompt_tokens: r.get::<_, i64>(6)?.max(0) as u64,
        completion_tokens: r.get::<_, i64>(7)?.max(0) as u64,
        cost_pusd: r.get(8)?,
        input_price_micros: r.get(9)?,
        output_price_micros: r.get(10)?,
        status: r.get::<_, i64>(11)?.clamp(0, 999) as u16,
        stream: r.get::<_, i64>(12)? != 0,
        token_source: TokenSource::parse(&source).unwrap_or(TokenSource::None),
        started_at_ms: r.get(14)?,
        latency_ms: r.get::<_, i64>(15)?.max(0) as u64,
        ttfb_ms: r.get::<_, Option<i64>>(16)?.map(|v| v.max(0) as u64),
        error: r.get(17)?,
    })
}

fn sql_values(args: Vec<SqlArg>) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    args.into_iter()
        .map(|a| match a {
            SqlArg::Text(s) => Value::Text(s),
            SqlArg::Int(i) => Value::Integer(i),
        })
        .collect()
}

/// The `rev` a key write takes: one above every stored key's. Writers hold SQLite's
/// write lock (immediate transactions), so revs commit in order.
const NEXT_REV: &str = "(SELECT COALESCE(MAX(rev),0)+1 FROM api_keys)";

fn select_key(c: &Connection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    c.prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?"))
        .map_err(db_err)?
        .query_row([id], key_from_row)
        .optional()
        .map_err(db_err)
}

/// Rows per `touch_keys` statement (two parameters each, far below SQLite's limit).
const TOUCH_CHUNK: usize = 400;

/// Rows per multi-row INSERT, largest first. A statement per row spent about a
/// third of the row's cost on per-statement work (bind, step, halt, reset), so a
/// batch goes in 32 rows at a time and its remainder in at most five more
/// statements (its binary digits), not one per row; 32 rows of 18 parameters
/// stay far below SQLite's 32,766-parameter limit.
const INSERT_SIZES: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// `INSERT OR IGNORE` of `n` usage rows in one statement.
fn insert_usage_sql(n: usize) -> String {
    let one = format!("({})", vec!["?"; USAGE_PARAMS].join(","));
    format!(
        "INSERT OR IGNORE INTO usage ({USAGE_COLS}) VALUES {}",
        vec![one; n].join(",")
    )
}

/// Parameters per usage row: the columns of `USAGE_COLS`, bound by [`bind_usage`].
const USAGE_PARAMS: usize = 18;

static INSERT_SQL: Lazy<[String; 6]> = Lazy::new(|| INSERT_SIZES.map(insert_usage_sql));

/// The one-row INSERT: the last of [`INSERT_SQL`].
fn insert_one_sql() -> &'static str {
    const { assert!(INSERT_SIZES[INSERT_SIZES.len() - 1] == 1) };
    &INSERT_SQL[INSERT_SIZES.len() - 1]
}

/// Binds `r` as the row starting at parameter `at` (1-based).
fn bind_usage(
    st: &mut rusqlite::Statement<'_>,
    at: usize,
    r: &UsageRecord,
) -> rusqlite::Result<()> {
    st.raw_bind_parameter(at, r.request_id.as_str())?;
    st.raw_bind_parameter(at + 1, r.key_id.as_str())?;
    st.raw_bind_parameter(at + 2, r.model.as_str())?;
    st.raw_bind_parameter(at + 3, r.provider.as_str())?;
    st.raw_bind_parameter(at + 4, r.endpoint.as_str())?;
    st.raw_bind_parameter(at + 5, to_i64(r.prompt_tokens))?;
    st.raw_bind_parameter(at + 6, to_i64(r.cached_prompt_tokens))?;
    st.raw_bind_parameter(at + 7, to_i64(r.completion_tokens))?;
    st.raw_bind_parameter(at + 8, r.cost_pusd)?;
    st.raw_bind_parameter(at + 9, r.input_price_micros)?;
    st.raw_bind_parameter(at + 10, r.output_price_micros)?;
    st.raw_bind_parameter(at + 11, i64::from(r.status))?;
    st.raw_bind_parameter(at + 12, i64::from(r.stream))?;
    st.raw_bind_parameter(at + 13, r.token_source.as_str())?;
    st.raw_bind_parameter(at + 14, r.started_at_ms)?;
    st.raw_bind_parameter(at + 15, to_i64(r.latency_ms))?;
    st.raw_bind_parameter(at + 16, r.ttfb_ms.map(to_i64))?;
    st.raw_bind_parameter(at + 17, &r.error)
}

/// Inserts `rows` whose `request_id` is new and returns what they add to the
/// rollup, or `None` when some row was already stored (a replayed batch): the
/// caller then rolls back and uses [`insert_usage_rows`], which tells rows apart.
/// Fresh rows, the common case, go in as few statements as [`INSERT_SIZES`] allows.
fn insert_usage_chunked(
    tx: &Connection,
    rows: &[UsageRecord],
    yielding: bool,
) -> Result<Option<DailyCells>, StoreError> {
    let mut cells = Rollup::default();
    let mut rest = rows;
    for (&size, sql) in INSERT_SIZES.iter().zip(INSERT_SQL.iter()) {
        if rest.len() < size {
            continue;
        }
        // One statement for all chunks of a size: `prepare_cached` hashes the
        // SQL (1.2 KB for 32 rows) to find it, and handing it back clears
        // every parameter.
        let mut st = tx.prepare_cached(sql).map_err(db_err)?;
        while let Some((chunk, tail)) = rest.split_at_checked(size) {
            for (i, r) in chunk.iter().enumerate() {
                bind_usage(&mut st, 1 + i * USAGE_PARAMS, r).map_err(db_err)?;
            }
            if st.raw_execute().map_err(db_err)? != size {
                return Ok(None);
            }
            chunk.iter().for_each(|r| cells.add(r));
            rest = tail;
            step_aside(yielding);
        }
    }
    Ok(Some(cells.finish()))
}

/// Inserts the rows whose `request_id` is new, one statement each; returns what
/// they add to the rollup. Only rows actually inserted count, so a replayed batch
/// adds nothing.
fn insert_usage_rows(
    tx: &Connection,
    rows: &[UsageRecord],
    yielding: bool,
) -> Result<DailyCells, StoreError> {
    let mut cells = Rollup::default();
    let mut st = tx.prepare_cached(insert_one_sql()).map_err(db_err)?;
    for (i, r) in rows.iter().enumerate() {
        bind_usage(&mut st, 1, r).map_err(db_err)?;
        if st.raw_execute().map_err(db_err)? == 1 {
            cells.add(r);
        }
        if (i + 1) % INSERT_SIZES[0] == 0 {
            step_aside(yielding);
        }
    }
    Ok(cells.finish())
}

/// Offers the core to any thread waiting for it, between two statements of a
/// usage batch, when `yielding`. The writer's threads are niced, but nice sets
/// a share, not a wake-up latency: Linux's EEVDF scheduler lets a task it has
/// just picked run out its slice (0.75 ms × (1 + log2 CPUs)) before a waking
/// thread of higher priority gets the core, and a tick's rows are milliseconds
/// of inserts. Traced under load (BENCHMARKS.md, "2026-12-07 21:30"), those
/// slices were the largest cause of the proxy threads' waits over 0.2 ms after
/// the proxy threads themselves. A yield costs one system call per 32 rows
/// (~80 us of inserts) and returns at once when nothing else is runnable; the
/// writer turns it off while its queue backs up (`usage::writer::keeping_up`
/// says why).
fn step_aside(yielding: bool) {
    if yielding {
        std::thread::yield_now();
    }
}

/// Sums rows into rollup cells. A batch is mostly one (day, key, model) run after
/// another, so consecutive rows of a cell are summed in place and the cell's
/// key is built (three strings) once per run instead of once per row.
#[derive(Default)]
struct Rollup<'a> {
    cells: DailyCells,
    run: Option<(i64, &'a str, &'a str, Daily)>,
}

impl<'a> Rollup<'a> {
    fn add(&mut self, r: &'a UsageRecord) {
        let d = Daily::of_request(
            i64::from(r.status),
            to_i64(r.prompt_tokens),
            to_i64(r.completion_tokens),
            r.cost_pusd,
        );
        let day = day_number(r.started_at_ms);
        match &mut self.run {
            Some((rd, rk, rm, sum)) if *rd == day && *rk == &*r.key_id && *rm == &*r.model => {
                sum.add(&d)
            }
            run => {
                if let Some(done) = run.replace((day, &r.key_id, &r.model, d)) {
                    Self::close(&mut self.cells, done);
                }
            }
        }
    }

    fn close(cells: &mut DailyCells, (day, key_id, model, sum): (i64, &str, &str, Daily)) {
        cells
            .entry((day_text(day), key_id.to_owned(), model.to_owned()))
            .or_default()
            .add(&sum);
    }

    fn finish(mut self) -> DailyCells {
        if let Some(done) = self.run.take() {
            Self::close(&mut self.cells, done);
        }
        self.cells
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_to(MIGRATIONS.len()).await
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let k = key.clone();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let models = serde_json::to_string(&k.models).unwrap_or_else(|_| "[]".into());
            let metadata = json_text(&k.metadata);
            let limits = json_text(&k.limits);
            let n = tx
                .execute(
                    &format!("INSERT OR IGNORE INTO api_keys ({KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,{NEXT_REV},?,?,?,?,?)"),
                    params![k.id, k.name, k.owner, k.project, k.tier, models, k.created_at_ms, k.expires_at_ms, k.revoked_at_ms, k.secret_hash.to_vec(),
                        metadata, limits, k.last_used_at_ms, k.previous_secret_hash.map(|h| h.to_vec()), k.previous_valid_until_ms],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("key id {} already exists", k.id)));
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| select_key(c, &id)).await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLS} FROM api_keys ORDER BY created_at_ms, id"
                ))
                .map_err(db_err)?;
            let rows = st.query_map([], key_from_row).map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let n = tx
                .execute(
                    "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?1), rev = (SELECT COALESCE(MAX(rev),0)+1 FROM api_keys) WHERE id = ?2",
                    params![at_ms, id],
                )
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn keys_changed_since(&self, rev: i64) -> Result<Vec<KeyRecord>, StoreError> {
        self.with(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLS} FROM api_keys WHERE rev > ? ORDER BY rev"
                ))
                .map_err(db_err)?;
            let rows = st.query_map([rev], key_from_row).map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn max_key_rev(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(rev),0) FROM api_keys", [], |r| {
                r.get(0)
            })
            .map_err(db_err)
        })
        .await
    }

    fn set_yield_between_statements(&self, on: bool) {
        self.yielding.store(on, Ordering::Relaxed);
    }

    async fn insert_usage(&self, rows: Arc<[UsageRecord]>) -> Result<(), StoreError> {
        let yielding = self.yielding.load(Ordering::Relaxed);
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let (tx, cells) = match insert_usage_chunked(&tx, &rows, yielding)? {
                Some(cells) => (tx, cells),
                None => {
                    tx.rollback().map_err(db_err)?;
                    let tx = c
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .map_err(db_err)?;
                    let cells = insert_usage_rows(&tx, &rows, yielding)?;
                    (tx, cells)
                }
            };
            add_daily(&tx, &cells)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError> {
        let filter = sql::usage_filter(Dialect::Sqlite, q);
        let (w, args) = (filter.sql(), sql_values(filter.args));
        self.with(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {USAGE_COLS} FROM usage{w} ORDER BY started_at_ms, request_id"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), usage_from_row)
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn usage_report(&self, q: &UsageQuery) -> Result<Vec<ReportRow>, StoreError> {
        let filter = sql::usage_filter(Dialect::Sqlite, q);
        let (w, args) = (filter.sql(), sql_values(filter.args));
        self.with(move |c| {
            // Costs are summed as text-free integers per group in Rust (i128) so that a
            // large history cannot overflow SQLite's 64-bit SUM.
            let mut st = c
                .prepare(&format!(
                    "SELECT key_id, model, COUNT(*), SUM(CASE WHEN status BETWEEN 200 AND 299 THEN 1 ELSE 0 END), \
                     SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_pusd / 1000000), SUM(cost_pusd % 1000000) \
                     FROM usage{w} GROUP BY key_id, model ORDER BY key_id, model"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), |r| {
                    let hi: i64 = r.get(6)?;
                    let lo: i64 = r.get(7)?;
                    Ok(ReportRow {
                        key_id: r.get(0)?,
                        model: r.get(1)?,
                        requests: r.get::<_, i64>(2)?.max(0) as u64,
                        ok_requests: r.get::<_, i64>(3)?.max(0) as u64,
                        prompt_tokens: r.get::<_, i64>(4)?.max(0) as u64,
                        completion_tokens: r.get::<_, i64>(5)?.max(0) as u64,
                        cost_pusd: (hi as i128) * 1_000_000 + lo as i128,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn update_key(
        &self,
        id: &str,
        patch: &KeyPatch,
    ) -> Result<Option<KeyRecord>, StoreError> {
        use rusqlite::types::Value;
        let id = id.to_owned();
        let mut sets: Vec<String> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        let mut set = |col: &str, v: Value| {
            args.push(v);
            sets.push(format!("{col} = ?{}", args.len()));
        };
        let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Text);
        if let Some(name) = &patch.name {
            set("name", text(name));
        }
        if let Some(tier) = &patch.tier {
            set("tier", Value::Text(tier.clone()));
        }
        if let Some(exp) = patch.expires_at_ms {
            set("expires_at_ms", exp.map_or(Value::Null, Value::Integer));
        }
        if let Some(models) = &patch.models {
            set("models", Value::Text(json_text(models)));
        }
        if let Some(metadata) = &patch.metadata {
            set("metadata", Value::Text(json_text(metadata)));
        }
        if let Some(limits) = &patch.limits {
            set("limits", Value::Text(json_text(limits)));
        }
        sets.push(format!("rev = {NEXT_REV}"));
        args.push(Value::Text(id.clone()));
        let sql = format!(
            "UPDATE api_keys SET {} WHERE id = ?{}",
            sets.join(", "),
            args.len()
        );
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let n = tx
                .execute(&sql, rusqlite::params_from_iter(args))
                .map_err(db_err)?;
            if n == 0 {
                return Ok(None);
            }
            let rec = select_key(&tx, &id)?;
            tx.commit().map_err(db_err)?;
            Ok(rec)
        })
        .await
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &[u8; 32],
        grace_until_ms: Option<i64>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        let new_hash = new_hash.to_vec();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let revoked: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at_ms FROM api_keys WHERE id = ?",
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            match revoked {
                None => return Ok(None),
                Some(Some(_)) => {
                    return Err(StoreError::Conflict(format!(
                        "key {id} is revoked and cannot be rotated"
                    )))
                }
                Some(None) => {}
            }
            tx.execute(
                &format!(
                    "UPDATE api_keys SET previous_secret_hash = secret_hash, \
                     previous_valid_until_ms = ?1, secret_hash = ?2, rev = {NEXT_REV} WHERE id = ?3"
                ),
                params![grace_until_ms, new_hash, id],
            )
            .map_err(db_err)?;
            let rec = select_key(&tx, &id)?;
            tx.commit().map_err(db_err)?;
            Ok(rec)
        })
        .await
    }

    async fn touch_keys(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        // One value per id (the latest): UPDATE … FROM picks an arbitrary row when
        // several match.
        let mut latest: std::collections::BTreeMap<String, i64> = Default::default();
        for (id, at) in uses {
            let e = latest.entry(id.clone()).or_insert(*at);
            *e = (*e).max(*at);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let latest: Vec<(String, i64)> = latest.into_iter().collect();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            for chunk in latest.chunks(TOUCH_CHUNK) {
                let values = vec!["(?,?)"; chunk.len()].join(",");
                let sql = format!(
                    "UPDATE api_keys SET last_used_at_ms = v.column2 FROM (VALUES {values}) AS v \
                     WHERE api_keys.id = v.column1 \
                     AND (api_keys.last_used_at_ms IS NULL OR api_keys.last_used_at_ms < v.column2)"
                );
                let args = chunk.iter().flat_map(|(id, at)| {
                    [
                        rusqlite::types::Value::Text(id.clone()),
                        rusqlite::types::Value::Integer(*at),
                    ]
                });
                tx.execute(&sql, rusqlite::params_from_iter(args))
                    .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn find_keys(
        &self,
        filter: &KeyFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<KeyPage, StoreError> {
        let w = sql::key_filter(Dialect::Sqlite, filter, cursor)?;
        let limit = limit.max(1);
        // One row past the page tells whether another page exists.
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys{} ORDER BY id LIMIT {}",
            w.sql(),
            limit.saturating_add(1)
        );
        let args = sql_values(w.args);
        let keys = self
            .with(move |c| {
                let mut st = c.prepare(&sql).map_err(db_err)?;
                let rows = st
                    .query_map(rusqlite::params_from_iter(args), key_from_row)
                    .map_err(db_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
            })
            .await?;
        Ok(KeyPage::from_overfetch(keys, limit))
    }

    async fn insert_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        let e = entry.clone();
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO audit_log (at_ms, actor, action, target, detail) VALUES (?,?,?,?,?)",
            )
            .map_err(db_err)?
            .execute(params![
                e.at_ms,
                e.actor,
                e.action,
                e.target,
                json_text(&e.detail)
            ])
            .map_err(db_err)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn list_audit(
        &self,
        q: &AuditQuery,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let w = sql::audit_filter(Dialect::Sqlite, q, cursor)?;
        let limit = limit.max(1);
        let sql = format!(
            "SELECT id, at_ms, actor, action, target, detail FROM audit_log{} \
             ORDER BY at_ms DESC, id DESC LIMIT {}",
            w.sql(),
            limit.saturating_add(1)
        );
        let args = sql_values(w.args);
        let entries = self
            .with(move |c| {
                let mut st = c.prepare(&sql).map_err(db_err)?;
                let rows = st
                    .query_map(rusqlite::params_from_iter(args), |r| {
                        let detail: String = r.get(5)?;
                        Ok(AuditEntry {
                            id: r.get(0)?,
                            at_ms: r.get(1)?,
                            actor: r.get(2)?,
                            action: r.get(3)?,
                            target: r.get(4)?,
                            detail: serde_json::from_str(&detail)
                                .unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .map_err(db_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
            })
            .await?;
        Ok(AuditPage::from_overfetch(entries, limit))
    }

    async fn usage_rollup(&self, q: &RollupQuery) -> Result<Vec<RollupRow>, StoreError> {
        let w = sql::rollup_filter(Dialect::Sqlite, q);
        let group = sql::group_column(q.group_by);
        // SQLite's SUM cannot exceed i64 (it errors), so cells are summed here, in
        // i128 and saturating u64: still O(days x keys x models) rollup rows.
        let sql = format!(
            "SELECT {group}, d.requests, d.ok_requests, d.prompt_tokens, d.completion_tokens, \
             d.cost_pusd FROM usage_daily d LEFT JOIN api_keys k ON k.id = d.key_id{}",
            w.sql()
        );
        let args = sql_values(w.args);
        self.with(move |c| {
            let mut groups: BTreeMap<Option<String>, RollupRow> = BTreeMap::new();
            let mut st = c.prepare(&sql).map_err(db_err)?;
            let mut rows = st.query(rusqlite::params_from_iter(args)).map_err(db_err)?;
            while let Some(r) = rows.next().map_err(db_err)? {
                let g: Option<String> = r.get(0).map_err(db_err)?;
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                let cost: String = r.get(5).map_err(db_err)?;
                let cost: i128 = cost
                    .parse()
                    .map_err(|_| StoreError::Database(format!("usage_daily: bad cost {cost:?}")))?;
                let row = groups.entry(g.clone()).or_insert_with(|| RollupRow {
                    group: g,
                    requests: 0,
                    ok_requests: 0,
                    failed: 0,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    cost_pusd: 0,
                });
                row.requests = row.requests.saturating_add(n(1).map_err(db_err)?);
                row.ok_requests = row.ok_requests.saturating_add(n(2).map_err(db_err)?);
                row.prompt_tokens = row.prompt_tokens.saturating_add(n(3).map_err(db_err)?);
                row.completion_tokens = row.completion_tokens.saturating_add(n(4).map_err(db_err)?);
                row.cost_pusd = row.cost_pusd.saturating_add(cost);
            }
            Ok(groups
                .into_values()
                .map(|mut r| {
                    r.failed = r.requests.saturating_sub(r.ok_requests);
                    r
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_row_binds_one_parameter_per_column() {
        assert_eq!(USAGE_COLS.split(',').count(), USAGE_PARAMS);
        for (size, sql) in INSERT_SIZES.iter().zip(INSERT_SQL.iter()) {
            assert_eq!(sql.matches('?').count(), USAGE_PARAMS * size);
        }
    }
    use crate::store::conformance::{rollup_fixture, rollup_model, rollup_queries};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn usage_rows_move_to_the_start_ordered_table_intact() {
        let store = SqliteStore::open(Path::new(":memory:")).unwrap();
        // Schema 5: the rowid table with its request_id key and two indexes.
        store.migrate_to(5).await.unwrap();
        let (keys, rows) = rollup_fixture();
        for k in &keys {
            store.insert_key(k).await.unwrap();
        }
        store.insert_usage(Arc::from(&rows[..])).await.unwrap();
        let before = store.query_usage(&UsageQuery::default()).await.unwrap();
        assert_eq!(before.len(), rows.len());

        store.migrate().await.unwrap();
        assert_eq!(
            store.query_usage(&UsageQuery::default()).await.unwrap(),
            before
        );
        let (ddl, indexes) = store
            .with(|c| {
                let ddl: String = c
                    .query_row(
                        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'usage'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                let mut st = c
                    .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'usage' ORDER BY name")
                    .map_err(db_err)?;
                let names = st
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok((ddl, names))
            })
            .await
            .unwrap();
        assert!(ddl.ends_with("WITHOUT ROWID"), "{ddl}");
        // The primary key is the table itself: one secondary index is left.
        assert_eq!(indexes, ["usage_key_started"]);
        // A replay after the move adds nothing, to the rows or to the rollup.
        store.insert_usage(Arc::from(&rows[..])).await.unwrap();
        assert_eq!(
            store.query_usage(&UsageQuery::default()).await.unwrap(),
            before
        );
        let q = RollupQuery::default();
        assert_eq!(
            store.usage_rollup(&q).await.unwrap(),
            rollup_model(&rows, &keys, &q)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_backfills_the_rollup_from_older_usage_rows() {
        let store = SqliteStore::open(Path::new(":memory:")).unwrap();
        // The schema as the build before the rollup left it, with its usage rows.
        store.migrate_to(3).await.unwrap();
        let (keys, rows) = rollup_fixture();
        for k in &keys {
            store.insert_key(k).await.unwrap();
        }
        let old = rows.clone();
        store
            .with(move |c| {
                let tx = c.transaction().map_err(db_err)?;
                insert_usage_rows(&tx, &old, false)?;
                tx.commit().map_err(db_err)
            })
            .await
            .unwrap();
        assert!(store.usage_rollup(&RollupQuery::default()).await.is_err());

        store.migrate().await.unwrap();
        for q in rollup_queries() {
            assert_eq!(
                store.usage_rollup(&q).await.unwrap(),
                rollup_model(&rows, &keys, &q),
                "{q:?}"
            );
        }
        // A replay of the old rows after the upgrade adds nothing.
        store.insert_usage(Arc::from(&rows[..])).await.unwrap();
        let q = RollupQuery::default();
        assert_eq!(
            store.usage_rollup(&q).await.unwrap(),
            rollup_model(&rows, &keys, &q)
        );
    }
}
