//! The PostgreSQL store: tokio-postgres behind a deadpool pool, for several gateway
//! nodes sharing one database.
//!
//! Same tables, columns and semantics as [`super::sqlite`]. What differs, and why:
//!
//! - **Key `rev`s come from a one-row counter**, bumped in the key write's own
//!   transaction, never from a sequence. A sequence value is handed out before
//!   commit, so a writer holding rev 5 could commit after rev 6 is visible and a
//!   poller already at 6 would never see 5. The counter's row lock makes key writes
//!   commit in rev order, so `keys_changed_since` cannot skip a change. The same
//!   statement queues `pg_notify('ai4free_keys', '<schema>:<rev>')`, delivered on
//!   commit only. Channels are per database, not per schema, so the payload names
//!   the schema: deployments (or tests) sharing a database never see each other's.
//! - **Every call has one deadline** ([`PgOptions::query_timeout`]) covering pool
//!   checkout and every statement, so a down or blackholed server never hangs a
//!   caller. A connection whose call timed out is discarded, not returned to the
//!   pool (its state is unknown); closed connections are dropped at checkout, so the
//!   pool heals by itself when the server comes back.
//! - **A usage batch is one statement** (`INSERT … SELECT … FROM UNNEST(arrays) ON
//!   CONFLICT DO NOTHING`): atomic, one round trip whatever its size, and a replayed
//!   batch cannot duplicate rows.
//! - **Migrations run under `pg_advisory_xact_lock`** inside their transaction, so
//!   nodes starting together apply each migration exactly once.
//!
//! Connections are plain TCP (`NoTls`): `sslmode=require` fails to connect; use a
//! private network or a local TLS-terminating proxy. The URL's password is never put
//! in an error (tokio-postgres errors name options, never their values).

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Transaction,
};
use tokio::time::{timeout_at, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::sql::{self, hash32, json_text, to_i64, Dialect, SqlArg, KEY_COLS, USAGE_COLS};
use super::{
    AuditEntry, AuditPage, AuditQuery, KeyFilter, KeyPage, KeyPatch, ReportRow, RollupQuery,
    RollupRow, Store, StoreError, UsageQuery,
};
use crate::keys::KeyRecord;
use crate::usage::{TokenSource, UsageRecord};

/// The UTC day (`YYYY-MM-DD`) of `started_at_ms`, as [`super::day_of_ms`] computes
/// it (floor division, clamped to years 1..=9999). A macro so migrations can embed it.
macro_rules! day_sql {
    () => {
        "to_char(DATE '1970-01-01' + LEAST(GREATEST(floor(started_at_ms::numeric / 86400000), \
         -719162), 2932896)::int, 'YYYY-MM-DD')"
    };
}

/// The rollup totals of a set of usage rows, grouped per cell (the select list of
/// the rollup's writes).
macro_rules! daily_select {
    () => {
        concat!(
            day_sql!(),
            ", key_id, model, count(*), count(*) FILTER (WHERE status BETWEEN 200 AND 299), \
             sum(prompt_tokens), sum(completion_tokens), sum(cost_pusd)"
        )
    };
}

/// Schema migrations, applied in order; `ai4free_schema_migrations` records each
/// applied version (1-based index into this list).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    owner         TEXT,
    project       TEXT,
    tier          TEXT NOT NULL,
    models        JSONB NOT NULL DEFAULT '[]',
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT,
    secret_hash   BYTEA NOT NULL,
    rev           BIGINT NOT NULL
);
CREATE INDEX api_keys_rev ON api_keys(rev);
CREATE TABLE ai4free_key_rev (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    rev      BIGINT NOT NULL
);
INSERT INTO ai4free_key_rev (only_row, rev) VALUES (TRUE, 0);
CREATE TABLE usage (
    request_id           TEXT PRIMARY KEY,
    key_id               TEXT NOT NULL,
    model                TEXT NOT NULL,
    provider             TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    prompt_tokens        BIGINT NOT NULL,
    cached_prompt_tokens BIGINT NOT NULL,
    completion_tokens    BIGINT NOT NULL,
    cost_pusd            BIGINT NOT NULL,
    input_price_micros   BIGINT NOT NULL,
    output_price_micros  BIGINT NOT NULL,
    status               INTEGER NOT NULL,
    stream               BOOLEAN NOT NULL,
    token_source         TEXT NOT NULL,
    started_at_ms        BIGINT NOT NULL,
    latency_ms           BIGINT NOT NULL,
    ttfb_ms              BIGINT,
    error                TEXT
);
CREATE INDEX usage_started ON usage(started_at_ms);
CREATE INDEX usage_key_started ON usage(key_id, started_at_ms);
"#,
    // 2: the key lifecycle (metadata, limit overrides, last use, rotation).
    r#"
ALTER TABLE api_keys ADD COLUMN metadata JSONB NOT NULL DEFAULT '{}';
ALTER TABLE api_keys ADD COLUMN limits JSONB NOT NULL DEFAULT '{}';
ALTER TABLE api_keys ADD COLUMN last_used_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN previous_secret_hash BYTEA;
ALTER TABLE api_keys ADD COLUMN previous_valid_until_ms BIGINT;
CREATE INDEX api_keys_owner ON api_keys(owner, id COLLATE "C");
CREATE INDEX api_keys_project ON api_keys(project, id COLLATE "C");
CREATE INDEX api_keys_id_c ON api_keys(id COLLATE "C");
"#,
    // 3: the audit log of admin actions. `detail` is JSON (not JSONB): kept
    // verbatim, and a `\u0000` in it cannot make an action's record fail.
    r#"
CREATE TABLE audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    detail JSON NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log(at_ms, id);
"#,
    // 4: the daily usage rollup (NUMERIC sums: exact at any size), filled from the
    // usage rows written before it existed.
    concat!(
        r#"
CREATE TABLE usage_daily (
    day               TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    ok_requests       BIGINT NOT NULL,
    prompt_tokens     NUMERIC NOT NULL,
    completion_tokens NUMERIC NOT NULL,
    cost_pusd         NUMERIC NOT NULL,
    PRIMARY KEY (day, key_id, model)
);
CREATE INDEX usage_daily_key ON usage_daily(key_id, day);
INSERT INTO usage_daily (day, key_id, model, requests, ok_requests, prompt_tokens,
    completion_tokens, cost_pusd)
SELECT "#,
        daily_select!(),
        " FROM usage GROUP BY 1, 2, 3;\n"
    ),
];

/// Key of the transaction-scoped advisory lock migrations run under ("ai4free\0").
const MIGRATION_LOCK: i64 = 0x6169_3466_7265_6500;

/// Migrations may rewrite tables, so they get more time than an ordinary call.
const MIGRATE_BUDGET: Duration = Duration::from_secs(30);

/// Pool and timeout settings of a [`PostgresStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// Most connections held open at once (default 16).
    pub pool_size: usize,
    /// Bound on opening one connection (TCP + startup + auth), default 2 s.
    pub connect_timeout: Duration,
    /// Bound on one store call, pool checkout included, default 2 s.
    pub query_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            query_timeout: Duration::from_secs(2),
        }
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    pool: Pool,
    opts: PgOptions,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's Debug would print the connection config; keep it out of logs.
        f.debug_struct("PostgresStore")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

// === impl PostgresStore ===

impl PostgresStore {
    /// Builds the pool for `url` and opens one connection, so a wrong URL or a down
    /// server fails at start-up rather than on the first request. Does not migrate.
    pub async fn connect(url: &str, opts: PgOptions) -> Result<PostgresStore, StoreError> {
        let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
            // Parse errors quote parts of the URL (an unknown option's name); make sure
            // a mistyped URL cannot echo its password.
            let text = describe(&e);
            let text = match url_password(url) {
                Some(p) if !p.is_empty() => text.replace(p, "***"),
                _ => text,
            };
            StoreError::Database(format!("invalid postgres URL: {text}"))
        })?;
        cfg.connect_timeout(opts.connect_timeout);
        if cfg.get_application_name().is_none() {
            cfg.application_name("ai4free");
        }
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                // A liveness query per checkout would cost a round trip per call;
                // closed connections are caught by `is_closed`, hung ones by the
                // per-call deadline (and then discarded).
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.query_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .recycle_timeout(Some(opts.connect_timeout))
            .build()
            .map_err(|e| StoreError::Database(format!("cannot build the postgres pool: {e}")))?;
        let store = PostgresStore { pool, opts };
        let deadline = store.deadline();
        drop(store.checkout("connect", deadline).await?);
        Ok(store)
    }

    /// The options the store was built with.
    pub fn options(&self) -> &PgOptions {
        &self.opts
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.opts.query_timeout
    }

    async fn checkout(&self, op: &'static str, deadline: Instant) -> Result<Object, StoreError> {
        match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(PoolError::Timeout(_))) | Err(_) => Err(timed_out(op)),
            Ok(Err(PoolError::Backend(e))) => Err(pg(op)(e)),
            Ok(Err(e)) => Err(StoreError::Database(format!("postgres {op}: {e}"))),
        }
    }
}

/// The outcome of one call's statements, run to the deadline. On timeout the
/// connection is detached from the pool and closed: it may still be waiting on a
/// lock or a dead peer, and must not serve the next caller.
fn settle<T>(
    op: &'static str,
    client: Object,
    work: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
) -> Result<T, StoreError> {
    match work {
        Ok(result) => result,
        Err(_) => {
            drop(Object::take(client));
            Err(timed_out(op))
        }
    }
}

fn timed_out(op: &'static str) -> StoreError {
    StoreError::Database(format!("postgres {op} timed out"))
}

/// Maps a tokio-postgres error for `op`. Its text names options and SQL states, never
/// the connection's password.
fn pg(op: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError + Copy {
    move |e| StoreError::Database(format!("postgres {op}: {}", describe(&e)))
}

/// The raw password of `scheme://user:password@host…`, if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(userinfo.split_once(':')?.1)
}

/// The error and its causes on one line: tokio-postgres keeps the server's message
/// (and the OS error of a failed connect) in `source()`, not in `Display`.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text.replace('\n', " ")
}

/// Runs one store call: checkout and statements share the deadline.
macro_rules! call {
    ($self:ident, $op:literal, $deadline:expr, |$client:ident| $work:expr) => {{
        let deadline = $deadline;
        #[allow(unused_mut)]
        let mut $client = $self.checkout($op, deadline).await?;
        let work = timeout_at(deadline, $work).await;
        settle($op, $client, work)
    }};
}

/// The select list for [`key_from_row`]; JSON columns travel as text.
const KEY_SELECT: &str = "id, name, owner, project, tier, models::text, created_at_ms, expires_at_ms, revoked_at_ms, secret_hash, rev, metadata::text, limits::text, last_used_at_ms, previous_secret_hash, previous_valid_until_ms";

fn key_from_row(r: &Row) -> Result<KeyRecord, tokio_postgres::Error> {
    let models: String = r.try_get(5)?;
    let metadata: String = r.try_get(11)?;
    let limits: String = r.try_get(12)?;
    Ok(KeyRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        owner: r.try_get(2)?,
        project: r.try_get(3)?,
        tier: r.try_get(4)?,
        models: serde_json::from_str(&models).unwrap_or_default(),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        limits: serde_json::from_str(&limits).unwrap_or_default(),
        created_at_ms: r.try_get(6)?,
        expires_at_ms: r.try_get(7)?,
        revoked_at_ms: r.try_get(8)?,
        last_used_at_ms: r.try_get(13)?,
        secret_hash: hash32(&r.try_get::<_, Vec<u8>>(9)?).unwrap_or_default(),
        previous_secret_hash: r
            .try_get::<_, Option<Vec<u8>>>(14)?
            .and_then(|h| hash32(&h)),
        previous_valid_until_ms: r.try_get(15)?,
        rev: r.try_get(10)?,
    })
}

fn keys_from_rows(rows: &[Row], op: &'static str) -> Result<Vec<KeyRecord>, StoreError> {
    rows.iter()
        .map(key_from_row)
        .collect::<Result<_, _>>()
        .map_err(pg(op))
}

fn usage_from_row(r: &Row) -> Result<UsageRecord, tokio_postgres::Error> {
    let source: String = r.try_get(13)?;
    Ok(UsageRecord {
        request_id: r.try_get::<_, &str>(0)?.into(),
        key_id: r.try_get::<_, &str>(1)?.into(),
        model: r.try_get::<_, &str>(2)?.into(),
        provider: r.try_get::<_, &str>(3)?.into(),
        endpoint: r.try_get::<_, &str>(4)?.into(),
        prompt_tokens: r.try_get::<_, i64>(5)?.max(0) as u64,
        cached_prompt_tokens: r.try_get::<_, i64>(6)?.max(0) as u64,
        completion_tokens: r.try_get::<_, i64>(7)?.max(0) as u64,
        cost_pusd: r.try_get(8)?,
        input_price_micros: r.try_get(9)?,
        output_price_micros: r.try_get(10)?,
        status: r.try_get::<_, i32>(11)?.clamp(0, 999) as u16,
        stream: r.try_get(12)?,
        token_source: TokenSource::parse(&source).unwrap_or(TokenSource::None),
        started_at_ms: r.try_get(14)?,
        latency_ms: r.try_get::<_, i64>(15)?.max(0) as u64,
        ttfb_ms: r.try_get::<_, Option<i64>>(16)?.map(|v| v.max(0) as u64),
        error: r.try_get(17)?,
    })
}

/// `INSERT … SELECT FROM UNNEST`: one array parameter per column, one statement per
/// batch. Casts fix every parameter's type, so the statement prepares once.
macro_rules! insert_usage_rows {
    () => {
        "INSERT INTO usage (request_id, key_id, model, provider, endpoint, \
     prompt_tokens, cached_prompt_tokens, completion_tokens, cost_pusd, input_price_micros, \
     output_price_micros, status, stream, token_source, started_at_ms, latency_ms, ttfb_ms, error) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int4[], \
     $13::bool[], $14::text[], $15::int8[], $16::int8[], $17::int8[], $18::text[]) \
     ON CONFLICT (request_id) DO NOTHING"
    };
}

/// The batch insert plus its rollup, one statement: only the rows the insert
/// returns (new request ids) are added to `usage_daily`, so a replayed batch adds
/// nothing. Cells are upserted in key order, so concurrent batches from several
/// nodes lock them in the same order and cannot deadlock on each other.
const INSERT_USAGE: &str = concat!(
    "WITH ins AS (",
    insert_usage_rows!(),
    " RETURNING key_id, model, status, prompt_tokens, completion_tokens, cost_pusd, started_at_ms) \
     INSERT INTO usage_daily (day, key_id, model, requests, ok_requests, prompt_tokens, \
     completion_tokens, cost_pusd) SELECT ",
    daily_select!(),
    " FROM ins GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
     ON CONFLICT (day, key_id, model) DO UPDATE SET \
     requests = usage_daily.requests + EXCLUDED.requests, \
     ok_requests = usage_daily.ok_requests + EXCLUDED.ok_requests, \
     prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens, \
     completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens, \
     cost_pusd = usage_daily.cost_pusd + EXCLUDED.cost_pusd"
);

/// A usage batch as one array per column (the parameters of [`INSERT_USAGE`]).
#[derive(Debug, Default, PartialEq)]
struct UsageColumns<'a> {
    request_id: Vec<Cow<'a, str>>,
    key_id: Vec<Cow<'a, str>>,
    model: Vec<Cow<'a, str>>,
    provider: Vec<Cow<'a, str>>,
    endpoint: Vec<Cow<'a, str>>,
    prompt_tokens: Vec<i64>,
    cached_prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost_pusd: Vec<i64>,
    input_price_micros: Vec<i64>,
    output_price_micros: Vec<i64>,
    status: Vec<i32>,
    stream: Vec<bool>,
    token_source: Vec<&'static str>,
    started_at_ms: Vec<i64>,
    latency_ms: Vec<i64>,
    ttfb_ms: Vec<Option<i64>>,
    error: Vec<Option<Cow<'a, str>>>,
}

impl<'a> UsageColumns<'a> {
    fn new(rows: &'a [UsageRecord]) -> UsageColumns<'a> {
        let n = rows.len();
        let mut c = UsageColumns {
            request_id: Vec::with_capacity(n),
            key_id: Vec::with_capacity(n),
            model: Vec::with_capacity(n),
            provider: Vec::with_capacity(n),
            endpoint: Vec::with_capacity(n),
            prompt_tokens: Vec::with_capacity(n),
            cached_prompt_tokens: Vec::with_capacity(n),
            completion_tokens: Vec::with_capacity(n),
            cost_pusd: Vec::with_capacity(n),
            input_price_micros: Vec::with_capacity(n),
            output_price_micros: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            stream: Vec::with_capacity(n),
            token_source: Vec::with_capacity(n),
            started_at_ms: Vec::with_capacity(n),
            latency_ms: Vec::with_capacity(n),
            ttfb_ms: Vec::with_capacity(n),
            error: Vec::with_capacity(n),
        };
        for r in rows {
            c.request_id.push(pg_text(&r.request_id));
            c.key_id.push(pg_text(&r.key_id));
            c.model.push(pg_text(&r.model));
            c.provider.push(pg_text(&r.provider));
            c.endpoint.push(pg_text(&r.endpoint));
            c.prompt_tokens.push(to_i64(r.prompt_tokens));
            c.cached_prompt_tokens.push(to_i64(r.cached_prompt_tokens));
            c.completion_tokens.push(to_i64(r.completion_tokens));
            c.cost_pusd.push(r.cost_pusd);
            c.input_price_micros.push(r.input_price_micros);
            c.output_price_micros.push(r.output_price_micros);
            c.status.push(i32::from(r.status));
            c.stream.push(r.stream);
            c.token_source.push(r.token_source.as_str());
            c.started_at_ms.push(r.started_at_ms);
            c.latency_ms.push(to_i64(r.latency_ms));
            c.ttfb_ms.push(r.ttfb_ms.map(to_i64));
            c.error.push(r.error.as_deref().map(pg_text));
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 18] {
        [
            &self.request_id,
            &self.key_id,
            &self.model,
            &self.provider,
            &self.endpoint,
            &self.prompt_tokens,
            &self.cached_prompt_tokens,
            &self.completion_tokens,
            &self.cost_pusd,
            &self.input_price_micros,
            &self.output_price_micros,
            &self.status,
            &self.stream,
            &self.token_source,
            &self.started_at_ms,
            &self.latency_ms,
            &self.ttfb_ms,
            &self.error,
        ]
    }
}

/// PostgreSQL text cannot hold NUL. A usage batch that fails is retried whole by the
/// writer, so one odd byte must not block every later row: it becomes U+FFFD.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Parses a `NUMERIC` sum sent as text (exact, never through a float).
fn parse_sum(text: &str) -> Result<i128, StoreError> {
    text.parse::<i128>()
        .map_err(|_| StoreError::Database(format!("postgres usage_report: bad sum {text:?}")))
}

fn sum_u64(text: &str) -> Result<u64, StoreError> {
    Ok(u64::try_from(parse_sum(text)?.max(0)).unwrap_or(u64::MAX))
}

/// Bumps the key change counter inside `tx` and queues the change notification.
/// The row lock taken here is what orders key writes: it is held until commit.
async fn next_rev(tx: &Transaction<'_>, op: &'static str) -> Result<i64, StoreError> {
    let st = tx
        .prepare_cached(
            "UPDATE ai4free_key_rev SET rev = rev + 1 \
             RETURNING rev, pg_notify('ai4free_keys', current_schema() || ':' || rev)",
        )
        .await
        .map_err(pg(op))?;
    let row = tx.query_one(&st, &[]).await.map_err(pg(op))?;
    row.try_get(0).map_err(pg(op))
}

async fn migrate_tx(client: &mut Object, target: usize) -> Result<(), StoreError> {
    let err = pg("migrate");
    let tx = client.transaction().await.map_err(err)?;
    // Serializes nodes migrating at once; released by commit or rollback.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ai4free_schema_migrations (\
             version    INTEGER PRIMARY KEY, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(err)?;
    let done: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM ai4free_schema_migrations",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(err)?;
    let done = usize::try_from(done).unwrap_or(0);
    if done > MIGRATIONS.len() {
        log::warn!(
            "postgres schema is at version {done}, newer than this build knows ({})",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(done) {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "INSERT INTO ai4free_schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(err)?;
    }
    tx.commit().await.map_err(err)
}

async fn insert_key_tx(client: &mut Object, k: &KeyRecord) -> Result<(), StoreError> {
    let err = pg("insert_key");
    let models = serde_json::to_string(&k.models).unwrap_or_else(|_| "[]".into());
    let tx = client.transaction().await.map_err(err)?;
    let rev = next_rev(&tx, "insert_key").await?;
    let st = tx
        .prepare_cached(&format!(
            "INSERT INTO api_keys ({KEY_COLS}) \
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, \
             $12::text::jsonb, $13::text::jsonb, $14, $15, $16) \
             ON CONFLICT (id) DO NOTHING"
        ))
        .await
        .map_err(err)?;
    let hash: &[u8] = &k.secret_hash;
    let previous: Option<&[u8]> = k.previous_secret_hash.as_ref().map(|h| &h[..]);
    let metadata = json_text(&k.metadata);
    let limits = json_text(&k.limits);
    let n = tx
        .execute(
            &st,
            &[
                &k.id,
                &k.name,
                &k.owner,
                &k.project,
                &k.tier,
                &models,
                &k.created_at_ms,
                &k.expires_at_ms,
                &k.revoked_at_ms,
                &hash,
                &rev,
                &metadata,
                &limits,
                &k.last_used_at_ms,
                &previous,
                &k.previous_valid_until_ms,
            ],
        )
        .await
        .map_err(err)?;
    if n == 0 {
        // Rolling back returns the rev and drops the queued notification.
        tx.rollback().await.map_err(err)?;
        return Err(StoreError::Conflict(format!(
            "key id {} already exists",
            k.id
        )));
    }
    tx.commit().await.map_err(err)
}

async fn revoke_key_tx(client: &mut Object, id: &str, at_ms: i64) -> Result<bool, StoreError> {
    let err = pg("revoke_key");
    let tx = client.transaction().await.map_err(err)?;
    let rev = next_rev(&tx, "revoke_key").await?;
    let st = tx
        .prepare_cached(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $1), rev = $2 \
             WHERE id = $3",
        )
        .await
        .map_err(err)?;
    let n = tx.execute(&st, &[&at_ms, &rev, &id]).await.map_err(err)?;
    if n == 0 {
        tx.rollback().await.map_err(err)?;
        return Ok(false);
    }
    tx.commit().await.map_err(err)?;
    Ok(true)
}

/// Binds the shared query builder's parameters.
fn pg_args(args: &[SqlArg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            SqlArg::Text(s) => s as &(dyn ToSql + Sync),
            SqlArg::Int(i) => i as &(dyn ToSql + Sync),
        })
        .collect()
}

async fn update_key_tx(
    client: &mut Object,
    id: &str,
    patch: &KeyPatch,
) -> Result<Option<KeyRecord>, StoreError> {
    let err = pg("update_key");
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut sets: Vec<String> = Vec::new();
    let mut set = |col: &str, cast: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sets.push(format!("{col} = ${}{cast}", args.len()));
    };
    if let Some(name) = &patch.name {
        set(
            "name",
            "",
            Box::new(name.as_deref().map(|n| pg_text(n).into_owned())),
        );
    }
    if let Some(tier) = &patch.tier {
        set("tier", "", Box::new(pg_text(tier).into_owned()));
    }
    if let Some(exp) = patch.expires_at_ms {
        set("expires_at_ms", "", Box::new(exp));
    }
    if let Some(models) = &patch.models {
        set("models", "::text::jsonb", Box::new(json_text(models)));
    }
    if let Some(metadata) = &patch.metadata {
        set("metadata", "::text::jsonb", Box::new(json_text(metadata)));
    }
    if let Some(limits) = &patch.limits {
        set("limits", "::text::jsonb", Box::new(json_text(limits)));
    }
    let tx = client.transaction().await.map_err(err)?;
    let rev = next_rev(&tx, "update_key").await?;
    args.push(Box::new(rev));
    sets.push(format!("rev = ${}", args.len()));
    args.push(Box::new(id.to_owned()));
    let sql = format!(
        "UPDATE api_keys SET {} WHERE id = ${} RETURNING {KEY_SELECT}",
        sets.join(", "),
        args.len()
    );
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = tx.query(&sql, &params).await.map_err(err)?;
    let Some(row) = rows.first() else {
        // Rolling back returns the rev: an unknown id is no change.
        tx.rollback().await.map_err(err)?;
        return Ok(None);
    };
    let rec = key_from_row(row).map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(Some(rec))
}

async fn rotate_key_tx(
    client: &mut Object,
    id: &str,
    new_hash: &[u8; 32],
    grace_until_ms: Option<i64>,
) -> Result<Option<KeyRecord>, StoreError> {
    let err = pg("rotate_key");
    let tx = client.transaction().await.map_err(err)?;
    // The counter first, then the row: the order every key write takes locks in.
    let rev = next_rev(&tx, "rotate_key").await?;
    let found = tx
        .query(
            "SELECT revoked_at_ms FROM api_keys WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(err)?;
    let revoked: Option<i64> = match found.first() {
        None => {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        }
        Some(r) => r.try_get(0).map_err(err)?,
    };
    if revoked.is_some() {
        tx.rollback().await.map_err(err)?;
        return Err(StoreError::Conflict(format!(
            "key {id} is revoked and cannot be rotated"
        )));
    }
    let hash: &[u8] = new_hash;
    let row = tx
        .query_one(
            &format!(
                "UPDATE api_keys SET previous_secret_hash = secret_hash, \
                 previous_valid_until_ms = $1, secret_hash = $2, rev = $3 WHERE id = $4 \
                 RETURNING {KEY_SELECT}"
            ),
            &[&grace_until_ms, &hash, &rev, &id],
        )
        .await
        .map_err(err)?;
    let rec = key_from_row(&row).map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(Some(rec))
}

/// Raises `last_used_at_ms` for a batch in one statement; ids are unique and sorted,
/// so concurrent batches lock rows in the same order.
const TOUCH_KEYS: &str = "UPDATE api_keys k SET last_used_at_ms = v.at \
     FROM UNNEST($1::text[], $2::int8[]) AS v(id, at) \
     WHERE k.id = v.id AND (k.last_used_at_ms IS NULL OR k.last_used_at_ms < v.at)";

async fn query_rows(
    client: &Object,
    op: &'static str,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let st = client.prepare_cached(sql).await.map_err(pg(op))?;
    client.query(&st, args).await.map_err(pg(op))
}

async fn insert_usage_batch(client: &Object, rows: &[UsageRecord]) -> Result<(), StoreError> {
    let err = pg("insert_usage");
    let columns = UsageColumns::new(rows);
    let st = client.prepare_cached(INSERT_USAGE).await.map_err(err)?;
    client.execute(&st, &columns.params()).await.map_err(err)?;
    Ok(())
}

fn report_from_row(r: &Row) -> Result<ReportRow, StoreError> {
    let err = pg("usage_report");
    let text = |i: usize| r.try_get::<_, String>(i).map_err(err);
    Ok(ReportRow {
        key_id: r.try_get(0).map_err(err)?,
        model: r.try_get(1).map_err(err)?,
        requests: r.try_get::<_, i64>(2).map_err(err)?.max(0) as u64,
        ok_requests: r.try_get::<_, i64>(3).map_err(err)?.max(0) as u64,
        prompt_tokens: sum_u64(&text(4)?)?,
        completion_tokens: sum_u64(&text(5)?)?,
        cost_pusd: parse_sum(&text(6)?)?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.opts.query_timeout.max(MIGRATE_BUDGET);
        call!(self, "migrate", deadline, |c| migrate_tx(
            &mut c,
            MIGRATIONS.len()
        ))
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        call!(self, "insert_key", self.deadline(), |c| insert_key_tx(
            &mut c, key
        ))
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_SELECT} FROM api_keys WHERE id = $1");
        let rows = call!(self, "get_key", self.deadline(), |c| query_rows(
            &c,
            "get_key",
            &sql,
            &[&id]
        ))?;
        Ok(keys_from_rows(&rows, "get_key")?.into_iter().next())
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let sql =
            format!("SELECT {KEY_SELECT} FROM api_keys ORDER BY created_at_ms, id COLLATE \"C\"");
        let rows = call!(self, "list_keys", self.deadline(), |c| query_rows(
            &c,
            "list_keys",
            &sql,
            &[]
        ))?;
        keys_from_rows(&rows, "list_keys")
    }

    async fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        call!(self, "revoke_key", self.deadline(), |c| revoke_key_tx(
            &mut c, id, at_ms
        ))
    }

    async fn keys_changed_since(&self, rev: i64) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_SELECT} FROM api_keys WHERE rev > $1 ORDER BY rev");
        let rows = call!(self, "keys_changed_since", self.deadline(), |c| {
            query_rows(&c, "keys_changed_since", &sql, &[&rev])
        })?;
        keys_from_rows(&rows, "keys_changed_since")
    }

    async fn max_key_rev(&self) -> Result<i64, StoreError> {
        let rows = call!(self, "max_key_rev", self.deadline(), |c| query_rows(
            &c,
            "max_key_rev",
            "SELECT COALESCE(MAX(rev), 0)::int8 FROM api_keys",
            &[]
        ))?;
        match rows.first() {
            Some(r) => r.try_get(0).map_err(pg("max_key_rev")),
            None => Ok(0),
        }
    }

    async fn insert_usage(&self, rows: Arc<[UsageRecord]>) -> Result<(), StoreError> {
        let rows = &*rows;
        if rows.is_empty() {
            return Ok(());
        }
        call!(self, "insert_usage", self.deadline(), |c| {
            insert_usage_batch(&c, rows)
        })
    }

    async fn query_usage(&self, q: &UsageQuery) -> Result<Vec<UsageRecord>, StoreError> {
        let w = sql::usage_filter(Dialect::Postgres, q);
        let args = pg_args(&w.args);
        let sql = format!(
            "SELECT {USAGE_COLS} FROM usage{} ORDER BY started_at_ms, request_id COLLATE \"C\"",
            w.sql()
        );
        let rows = call!(self, "query_usage", self.deadline(), |c| query_rows(
            &c,
            "query_usage",
            &sql,
            &args
        ))?;
        rows.iter()
            .map(usage_from_row)
            .collect::<Result<_, _>>()
            .map_err(pg("query_usage"))
    }

    async fn usage_report(&self, q: &UsageQuery) -> Result<Vec<ReportRow>, StoreError> {
        let w = sql::usage_filter(Dialect::Postgres, q);
        let args = pg_args(&w.args);
        // Sums of BIGINT are NUMERIC: exact at any size; sent as text, parsed to i128.
        let sql = format!(
            "SELECT key_id, model, COUNT(*), \
             COUNT(*) FILTER (WHERE status BETWEEN 200 AND 299), \
             SUM(prompt_tokens)::text, SUM(completion_tokens)::text, SUM(cost_pusd)::text \
             FROM usage{} GROUP BY key_id, model \
             ORDER BY key_id COLLATE \"C\", model COLLATE \"C\"",
            w.sql()
        );
        let rows = call!(self, "usage_report", self.deadline(), |c| query_rows(
            &c,
            "usage_report",
            &sql,
            &args
        ))?;
        rows.iter().map(report_from_row).collect()
    }

    async fn update_key(
        &self,
        id: &str,
        patch: &KeyPatch,
    ) -> Result<Option<KeyRecord>, StoreError> {
        call!(self, "update_key", self.deadline(), |c| update_key_tx(
            &mut c, id, patch
        ))
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &[u8; 32],
        grace_until_ms: Option<i64>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        call!(self, "rotate_key", self.deadline(), |c| rotate_key_tx(
            &mut c,
            id,
            new_hash,
            grace_until_ms
        ))
    }

    async fn touch_keys(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        let mut latest: std::collections::BTreeMap<&str, i64> = Default::default();
        for (id, at) in uses {
            let e = latest.entry(id.as_str()).or_insert(*at);
            *e = (*e).max(*at);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let ids: Vec<Cow<'_, str>> = latest.keys().map(|id| pg_text(id)).collect();
        let ats: Vec<i64> = latest.values().copied().collect();
        call!(self, "touch_keys", self.deadline(), |c| async {
            let st = c
                .prepare_cached(TOUCH_KEYS)
                .await
                .map_err(pg("touch_keys"))?;
            c.execute(&st, &[&ids, &ats])
                .await
                .map_err(pg("touch_keys"))?;
            Ok(())
        })
    }

    async fn find_keys(
        &self,
        filter: &KeyFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<KeyPage, StoreError> {
        let w = sql::key_filter(Dialect::Postgres, filter, cursor)?;
        let limit = limit.max(1);
        // One row past the page tells whether another page exists.
        let sql = format!(
            "SELECT {KEY_SELECT} FROM api_keys{} ORDER BY id COLLATE \"C\" LIMIT {}",
            w.sql(),
            limit.saturating_add(1)
        );
        let args = pg_args(&w.args);
        let rows = call!(self, "find_keys", self.deadline(), |c| query_rows(
            &c,
            "find_keys",
            &sql,
            &args
        ))?;
        let keys = keys_from_rows(&rows, "find_keys")?;
        Ok(KeyPage::from_overfetch(keys, limit))
    }

    async fn insert_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        let actor = pg_text(&entry.actor);
        let action = pg_text(&entry.action);
        let target = entry.target.as_deref().map(pg_text);
        let detail = json_text(&entry.detail);
        let rows = call!(self, "insert_audit", self.deadline(), |c| query_rows(
            &c,
            "insert_audit",
            "INSERT INTO audit_log (at_ms, actor, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5::text::json) RETURNING id",
            &[&entry.at_ms, &actor, &action, &target, &detail]
        ))?;
        match rows.first() {
            Some(r) => r.try_get(0).map_err(pg("insert_audit")),
            None => Err(StoreError::Database(
                "postgres insert_audit: no id returned".into(),
            )),
        }
    }

    async fn list_audit(
        &self,
        q: &AuditQuery,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<AuditPage, StoreError> {
        let w = sql::audit_filter(Dialect::Postgres, q, cursor)?;
        let limit = limit.max(1);
        let sql = format!(
            "SELECT id, at_ms, actor, action, target, detail::text FROM audit_log{} \
             ORDER BY at_ms DESC, id DESC LIMIT {}",
            w.sql(),
            limit.saturating_add(1)
        );
        let args = pg_args(&w.args);
        let rows = call!(self, "list_audit", self.deadline(), |c| query_rows(
            &c,
            "list_audit",
            &sql,
            &args
        ))?;
        let err = pg("list_audit");
        let entries = rows
            .iter()
            .map(|r| {
                let detail: String = r.try_get(5)?;
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    action: r.try_get(3)?,
                    target: r.try_get(4)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(err)?;
        Ok(AuditPage::from_overfetch(entries, limit))
    }

    async fn usage_rollup(&self, q: &RollupQuery) -> Result<Vec<RollupRow>, StoreError> {
        let w = sql::rollup_filter(Dialect::Postgres, q);
        let group = sql::group_column(q.group_by);
        // NUMERIC sums, sent as text and parsed exactly.
        let sql = format!(
            "SELECT {group}, SUM(d.requests)::text, SUM(d.ok_requests)::text, \
             SUM(d.prompt_tokens)::text, SUM(d.completion_tokens)::text, SUM(d.cost_pusd)::text \
             FROM usage_daily d LEFT JOIN api_keys k ON k.id = d.key_id{} \
             GROUP BY {group} ORDER BY {group} COLLATE \"C\" NULLS FIRST",
            w.sql()
        );
        let args = pg_args(&w.args);
        let rows = call!(self, "usage_rollup", self.deadline(), |c| query_rows(
            &c,
            "usage_rollup",
            &sql,
            &args
        ))?;
        let err = pg("usage_rollup");
        rows.iter()
            .map(|r| {
                let text = |i: usize| r.try_get::<_, String>(i).map_err(err);
                let requests = sum_u64(&text(1)?)?;
                let ok_requests = sum_u64(&text(2)?)?;
                Ok(RollupRow {
                    group: r.try_get(0).map_err(err)?,
                    requests,
                    ok_requests,
                    failed: requests.saturating_sub(ok_requests),
                    prompt_tokens: sum_u64(&text(3)?)?,
                    completion_tokens: sum_u64(&text(4)?)?,
                    cost_pusd: parse_sum(&text(5)?)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
impl PostgresStore {
    /// Applies the first `target` migrations only: a database as an older build
    /// left it (tests of the upgrade path).
    async fn migrate_to(&self, target: usize) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.opts.query_timeout.max(MIGRATE_BUDGET);
        call!(self, "migrate", deadline, |c| migrate_tx(&mut c, target))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;
    use crate::store::conformance::{
        admin_client, key, rollup_fixture, rollup_model, rollup_queries, usage, TestSchema,
    };
    use crate::store::day_of_ms;

    /// Where initdb and pg_ctl live (`AI4FREE_TEST_PG_BIN` overrides).
    fn pg_bin() -> PathBuf {
        std::env::var_os("AI4FREE_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
    }

    /// The server refuses to run as root: as root, run it as the `postgres` user.
    fn running_as_root() -> bool {
        let out = Command::new("id").arg("-u").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    }

    /// A private PostgreSQL server in a temp dir, for tests that stop and start it.
    /// Stopped on drop.
    struct PrivatePg {
        dir: tempfile::TempDir,
        port: u16,
        as_root: bool,
    }

    impl PrivatePg {
        fn start() -> PrivatePg {
            let dir = tempfile::tempdir().unwrap();
            let as_root = running_as_root();
            if as_root {
                run(Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path()));
            }
            let pg = PrivatePg {
                port: closed_port(),
                dir,
                as_root,
            };
            run(pg
                .tool("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .args(["-E", "UTF8", "--locale=C", "-D"])
                .arg(pg.data()));
            pg.resume();
            pg
        }

        fn url(&self) -> String {
            format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
        }

        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }

        fn tool(&self, name: &str) -> Command {
            let path = pg_bin().join(name);
            if self.as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            } else {
                Command::new(path)
            }
        }

        fn pg_ctl(&self, action: &str) -> Command {
            let mut c = self.tool("pg_ctl");
            c.arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "30", action]);
            c
        }

        /// Starts (or restarts after [`PrivatePg::kill`]) on the same port and data.
        fn resume(&self) {
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            );
            run(self
                .pg_ctl("start")
                .arg("-o")
                .arg(options)
                .arg("-l")
                .arg(self.dir.path().join("log")));
        }

        /// Stops the server the hard way: every backend dies at once, like a crash.
        fn kill(&self) {
            run(self.pg_ctl("stop").args(["-m", "immediate"]));
        }
    }

    impl Drop for PrivatePg {
        fn drop(&mut self) {
            let _ = self
                .pg_ctl("stop")
                .args(["-m", "immediate"])
                .stderr(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .status();
        }
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn quick() -> PgOptions {
        PgOptions {
            pool_size: 4,
            connect_timeout: Duration::from_millis(500),
            query_timeout: Duration::from_millis(800),
        }
    }

    async fn migrated(url: &str, opts: PgOptions) -> PostgresStore {
        let store = PostgresStore::connect(url, opts).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    fn database_error(r: Result<impl std::fmt::Debug, StoreError>) -> String {
        match r {
            Err(StoreError::Database(msg)) => msg,
            other => panic!("expected a database error, got {other:?}"),
        }
    }

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A TCP peer that accepts connections and never answers: a blackholed server.
    async fn silent_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    #[test]
    fn url_password_finds_only_the_userinfo_password() {
        assert_eq!(
            url_password("postgres://u:p%40ss@h:5432/db?x=1"),
            Some("p%40ss")
        );
        assert_eq!(url_password("postgres://u@h/db?password=x"), None);
        assert_eq!(url_password("postgres://h/db?a=b:c@d"), None);
        assert_eq!(url_password("host=h password=x"), None);
    }

    #[test]
    fn sums_parse_exactly_beyond_i64() {
        let big = "27670116110564327424";
        assert_eq!(parse_sum(big).unwrap(), 27_670_116_110_564_327_424_i128);
        assert_eq!(parse_sum("-5").unwrap(), -5);
        assert!(parse_sum("1.5").is_err());
        assert_eq!(sum_u64(big).unwrap(), u64::MAX);
        assert_eq!(sum_u64("-3").unwrap(), 0);
    }

    #[test]
    fn nul_becomes_replacement_character_only_when_present() {
        assert!(matches!(pg_text("plain"), Cow::Borrowed("plain")));
        assert_eq!(pg_text("a\0b"), "a\u{FFFD}b");
        let rows = [UsageRecord {
            error: Some("x\0".into()),
            ..usage("r\0", "k", 1)
        }];
        let cols = UsageColumns::new(&rows);
        assert_eq!(cols.request_id, ["r\u{FFFD}"]);
        assert_eq!(cols.error, [Some(Cow::Borrowed("x\u{FFFD}"))]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_migrating_a_fresh_database_apply_each_migration_once() {
        let schema = TestSchema::create().await;
        let url = schema.url();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(Arc::new(
                PostgresStore::connect(&url, quick()).await.unwrap(),
            ));
        }
        let tasks: Vec<_> = nodes
            .iter()
            .map(|n| {
                let n = n.clone();
                tokio::spawn(async move { n.migrate().await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let admin = admin_client(&url).await;
        let versions: Vec<i32> = admin
            .query(
                "SELECT version FROM ai4free_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let expected: Vec<i32> = (1..=MIGRATIONS.len() as i32).collect();
        assert_eq!(versions, expected);
        let counters: i64 = admin
            .query_one("SELECT count(*) FROM ai4free_key_rev", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(counters, 1);
        // Every node works on the shared schema.
        for (i, n) in nodes.iter().enumerate() {
            n.insert_key(&key(&format!("k{i}"), 1)).await.unwrap();
        }
        assert_eq!(nodes[0].list_keys().await.unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_writes_notify_their_rev_on_commit_only() {
        let schema = TestSchema::create().await;
        let store = migrated(&schema.url(), quick()).await;
        let (listener, mut conn) = tokio_postgres::connect(&schema.url(), NoTls).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                }
            }
        });
        listener.batch_execute("LISTEN ai4free_keys").await.unwrap();

        store.insert_key(&key("a", 1)).await.unwrap();
        assert!(store.insert_key(&key("a", 2)).await.is_err());
        assert!(!store.revoke_key("missing", 3).await.unwrap());
        assert!(store.revoke_key("a", 4).await.unwrap());
        let rev = store.max_key_rev().await.unwrap();

        let prefix = format!("{}:", schema.name());
        let mut mine = async || loop {
            let (channel, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("notification within 5 s")
                .unwrap();
            // Tests in other schemas of the same database notify on the same channel.
            if let Some(rev) = payload.strip_prefix(&prefix) {
                return (channel, rev.to_owned());
            }
        };
        let mut got = vec![mine().await, mine().await];
        // Only the two committed writes notified; the refused ones rolled theirs back,
        // so the next notification is the next write's.
        store.insert_key(&key("b", 5)).await.unwrap();
        got.push(mine().await);
        let channel = "ai4free_keys".to_owned();
        assert_eq!(
            got,
            [
                (channel.clone(), (rev - 1).to_string()),
                (channel.clone(), rev.to_string()),
                (channel, (rev + 1).to_string()),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_stuck_on_a_lock_times_out_and_leaves_no_trace() {
        let schema = TestSchema::create().await;
        let opts = quick();
        let store = migrated(&schema.url(), opts.clone()).await;
        store.insert_key(&key("before", 1)).await.unwrap();
        let rev = store.max_key_rev().await.unwrap();

        // Another session holds the key counter's row lock.
        let mut admin = admin_client(&schema.url()).await;
        let holder = admin.transaction().await.unwrap();
        holder
            .execute("SELECT rev FROM ai4free_key_rev FOR UPDATE", &[])
            .await
            .unwrap();

        let started = std::time::Instant::now();
        let msg = database_error(store.insert_key(&key("stuck", 2)).await);
        let took = started.elapsed();
        assert!(msg.contains("timed out"), "{msg}");
        assert!(took >= opts.query_timeout, "{took:?}");
        assert!(
            took < opts.query_timeout + Duration::from_secs(1),
            "{took:?}"
        );
        holder.rollback().await.unwrap();

        // The abandoned transaction never committed, and the pool serves new calls.
        assert_eq!(store.get_key("stuck").await.unwrap(), None);
        assert_eq!(store.max_key_rev().await.unwrap(), rev);
        store.insert_key(&key("after", 3)).await.unwrap();
        assert!(store.get_key("after").await.unwrap().unwrap().rev > rev);
    }

    /// `serve` opens the store on a short-lived start-up runtime. The connections made
    /// there die with it; later calls from other runtimes must not wait on them.
    #[test]
    fn a_store_outlives_the_runtime_that_opened_it() {
        let startup = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (schema, store) = startup.block_on(async {
            let schema = TestSchema::create().await;
            let store = migrated(&schema.url(), quick()).await;
            store.insert_key(&key("k", 1)).await.unwrap();
            (schema, store)
        });
        drop(startup);
        let serving = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        serving.block_on(async {
            let started = std::time::Instant::now();
            assert_eq!(store.get_key("k").await.unwrap().unwrap().id, "k");
            assert!(
                started.elapsed() < quick().query_timeout,
                "{:?}",
                started.elapsed()
            );
            store.insert_key(&key("k2", 2)).await.unwrap();
        });
        drop(store);
        drop(schema);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blackholed_server_fails_within_the_deadline() {
        let addr = silent_server().await;
        let opts = quick();
        let started = std::time::Instant::now();
        let url = format!("postgres://root:Hush-4242-pw@{addr}/test");
        let msg = database_error(PostgresStore::connect(&url, opts.clone()).await);
        assert!(msg.contains("timed out"), "{msg}");
        assert!(started.elapsed() < opts.query_timeout + Duration::from_secs(1));
        assert!(!msg.contains("Hush-4242-pw"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_never_show_the_password() {
        const SECRET: &str = "Sup3r-S3cret-pw";
        let refused = format!("postgres://root:{SECRET}@127.0.0.1:{}/test", closed_port());
        let bad_option =
            format!("postgres://root:{SECRET}@127.0.0.1:5432/test?connect_timeout=soon");
        let unknown_option = format!("postgres://root:{SECRET}@127.0.0.1:5432/test?{SECRET}=1");
        let bad_port = format!("postgres://root:{SECRET}@127.0.0.1:port{SECRET}/test");
        for url in [refused, bad_option, unknown_option, bad_port] {
            let msg = database_error(PostgresStore::connect(&url, quick()).await);
            assert!(!msg.contains(SECRET), "{msg}");
        }
        // Errors from a live connection (trust auth ignores the password): no tables yet.
        let schema = TestSchema::create().await;
        let with_password = schema
            .url()
            .replacen("://root@", &format!("://root:{SECRET}@"), 1);
        assert_ne!(with_password, schema.url());
        let store = PostgresStore::connect(&with_password, quick())
            .await
            .unwrap();
        let msg = database_error(store.get_key("k").await);
        assert!(msg.contains("api_keys"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
        assert!(!format!("{store:?}").contains(SECRET));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nul_bytes_do_not_poison_a_usage_batch() {
        let schema = TestSchema::create().await;
        let store = migrated(&schema.url(), quick()).await;
        let rows = [
            usage("ok", "k", 1),
            UsageRecord {
                error: Some("bad\0byte".into()),
                model: "m\0".into(),
                ..usage("nul", "k", 2)
            },
        ];
        store.insert_usage(Arc::from(&rows[..])).await.unwrap();
        let got = store.query_usage(&UsageQuery::default()).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].error.as_deref(), Some("bad\u{FFFD}byte"));
        assert_eq!(got[1].model, "m\u{FFFD}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_recovers_by_itself_when_the_server_comes_back() {
        let pg = Arc::new(tokio::task::spawn_blocking(PrivatePg::start).await.unwrap());
        let opts = quick();
        let store = Arc::new(migrated(&pg.url(), opts.clone()).await);
        store.insert_key(&key("k1", 1)).await.unwrap();
        store
            .insert_usage(vec![usage("r1", "k1", 1)].into())
            .await
            .unwrap();
        // Warm every pooled connection, so the outage leaves dead ones behind.
        for rev in max_rev_from_many_tasks(&store, opts.pool_size).await {
            assert!(rev.unwrap() > 0);
        }

        let p = pg.clone();
        tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
        for _ in 0..3 {
            let started = std::time::Instant::now();
            database_error(store.get_key("k1").await);
            database_error(
                store
                    .insert_usage(vec![usage("r-down", "k1", 2)].into())
                    .await,
            );
            database_error(store.max_key_rev().await);
            let took = started.elapsed();
            assert!(
                took < opts.query_timeout + Duration::from_secs(1),
                "{took:?}"
            );
        }

        let p = pg.clone();
        tokio::task::spawn_blocking(move || p.resume())
            .await
            .unwrap();
        let back = std::time::Instant::now();
        let k1 = loop {
            match store.get_key("k1").await {
                Ok(found) => break found.unwrap(),
                Err(_) if back.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("store did not recover within 10 s: {e}"),
            }
        };
        assert_eq!(k1.id, "k1");
        // Every pooled connection works again, not just one.
        for rev in max_rev_from_many_tasks(&store, 2 * opts.pool_size).await {
            assert_eq!(rev.unwrap(), k1.rev);
        }
        store
            .insert_usage(vec![usage("r2", "k1", 3)].into())
            .await
            .unwrap();
        let ids: Vec<String> = store
            .query_usage(&UsageQuery::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id.into())
            .collect();
        assert_eq!(ids, ["r1", "r2"]);
    }

    async fn max_rev_from_many_tasks(
        store: &Arc<PostgresStore>,
        tasks: usize,
    ) -> Vec<Result<i64, StoreError>> {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move { s.max_key_rev().await })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_backfills_the_rollup_from_older_usage_rows() {
        let schema = TestSchema::create().await;
        let store = PostgresStore::connect(&schema.url(), quick())
            .await
            .unwrap();
        // The schema as the build before the rollup left it, with its usage rows.
        store.migrate_to(3).await.unwrap();
        let (keys, rows) = rollup_fixture();
        for k in &keys {
            store.insert_key(k).await.unwrap();
        }
        let admin = admin_client(&schema.url()).await;
        let cols = UsageColumns::new(&rows);
        admin
            .execute(insert_usage_rows!(), &cols.params())
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
        store.insert_usage(Arc::from(&rows[..])).await.unwrap();
        let q = RollupQuery::default();
        assert_eq!(
            store.usage_rollup(&q).await.unwrap(),
            rollup_model(&rows, &keys, &q)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sql_day_matches_day_of_ms() {
        let schema = TestSchema::create().await;
        let admin = admin_client(&schema.url()).await;
        for ms in [
            0,
            -1,
            86_399_999,
            -86_400_000,
            -86_400_001,
            951_782_400_000,
            1_700_000_000_000,
            253_402_300_799_999,
            253_402_300_800_000,
            -62_135_596_800_000,
            -62_135_596_800_001,
            i64::MAX,
            i64::MIN,
        ] {
            let sql = format!(
                "SELECT {} FROM (SELECT $1::int8 AS started_at_ms) t",
                day_sql!()
            );
            let day: String = admin.query_one(&sql, &[&ms]).await.unwrap().get(0);
            assert_eq!(day, day_of_ms(ms), "{ms}");
        }
    }
}
