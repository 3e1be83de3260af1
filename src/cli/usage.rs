//! `ai4free usage report|export`.
//!
//! `report` asks the daily rollup through the same parser and renderers as
//! `GET /admin/usage` (`admin::report`), so its JSON and CSV are the API's;
//! `export` prints the per-request rows.

use std::io::Write;

use clap::{Args, Subcommand};

use super::table::{cell, print_table};
use super::{flag_error, load_config, open_store, store_error, ConfigArg};
use crate::admin::report::{
    csv_cell, group_column, report_csv, report_json, ReportParams, Scope, Totals,
};
use crate::store::UsageQuery;
use crate::usage::{format_usd, UsageRecord};

#[derive(Subcommand, Debug)]
pub(super) enum UsageCmd {
    /// Totals from the daily rollup, grouped by day, model, key, owner or project.
    Report(ReportArgs),
    /// Every proxied request as JSON Lines (or CSV).
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub(super) struct ReportArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    /// day, model, key, owner or project.
    #[arg(long, default_value = "day")]
    group_by: String,
    /// Only this key.
    #[arg(long)]
    key_id: Option<String>,
    /// Only keys of this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only keys of this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// First day included: a date (2026-11-01) or an RFC 3339 time (its UTC day).
    #[arg(long)]
    since: Option<String>,
    /// Last day included, like --since.
    #[arg(long)]
    until: Option<String>,
    /// Print the API's JSON report.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV (a header line, no totals line).
    #[arg(long)]
    csv: bool,
}

#[derive(Args, Debug)]
pub(super) struct ExportArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    /// Only requests started at or after this time (RFC 3339, or a date: its start).
    #[arg(long)]
    since: Option<String>,
    /// Only requests started before this time (RFC 3339, or a date: the day included).
    #[arg(long)]
    until: Option<String>,
    /// Only this key's requests.
    #[arg(long)]
    key_id: Option<String>,
    /// JSON Lines (the default; accepted for symmetry).
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV with a header line instead of JSON Lines.
    #[arg(long)]
    csv: bool,
}

pub(super) async fn run(cmd: UsageCmd) -> Result<(), String> {
    match cmd {
        UsageCmd::Report(a) => report(a).await,
        UsageCmd::Export(a) => export(a).await,
    }
}

async fn report(a: ReportArgs) -> Result<(), String> {
    let config = load_config(&a.cfg.config)?;
    let mut pairs: Vec<(&str, &str)> = vec![("group_by", a.group_by.as_str())];
    for (name, v) in [
        ("key_id", &a.key_id),
        ("owner", &a.owner),
        ("project", &a.project),
        ("model", &a.model),
        ("since", &a.since),
        ("until", &a.until),
    ] {
        if let Some(v) = v {
            pairs.push((name, v.as_str()));
        }
    }
    let params = ReportParams::parse(pairs, Scope::Admin).map_err(flag_error)?;
    let store = open_store(&config).await?;
    let rows = store
        .usage_rollup(&params.query)
        .await
        .map_err(store_error)?;
    if a.json {
        println!("{}", report_json(&rows, &params));
    } else if a.csv {
        print!("{}", report_csv(&rows, &params));
    } else {
        let column = group_column(params.query.group_by).to_uppercase();
        let mut table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                totals_row(
                    cell(r.group.as_deref()),
                    &Totals::of(std::slice::from_ref(r)),
                )
            })
            .collect();
        table.push(totals_row("TOTAL".into(), &Totals::of(&rows)));
        print_table(
            &[
                &column,
                "REQUESTS",
                "OK",
                "FAILED",
                "PROMPT_TOKENS",
                "COMPLETION_TOKENS",
                "TOTAL_TOKENS",
                "COST_USD",
            ],
            &table,
        );
    }
    Ok(())
}

fn totals_row(label: String, t: &Totals) -> Vec<String> {
    vec![
        label,
        t.requests.to_string(),
        t.ok_requests.to_string(),
        t.failed_requests.to_string(),
        t.prompt_tokens.to_string(),
        t.completion_tokens.to_string(),
        t.prompt_tokens
            .saturating_add(t.completion_tokens)
            .to_string(),
        format_usd(t.cost_pusd),
    ]
}

/// Columns of `usage export --csv`, the JSON Lines fields in the same order.
const EXPORT_COLUMNS: &[&str] = &[
    "request_id",
    "key_id",
    "model",
    "provider",
    "endpoint",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cost_usd_exact",
    "input_price_per_mtok",
    "output_price_per_mtok",
    "status",
    "stream",
    "token_source",
    "started_at",
    "latency_ms",
    "ttfb_ms",
    "error",
];

async fn export(a: ExportArgs) -> Result<(), String> {
    let config = load_config(&a.cfg.config)?;
    let q = UsageQuery {
        since_ms: a
            .since
            .as_deref()
            .map(|s| instant("--since", s, false))
            .transpose()?,
        until_ms: a
            .until
            .as_deref()
            .map(|s| instant("--until", s, true))
            .transpose()?,
        key_id: a.key_id,
    };
    let store = open_store(&config).await?;
    let rows = store.query_usage(&q).await.map_err(store_error)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let write = |out: &mut dyn Write, text: &str| {
        out.write_all(text.as_bytes())
            .map_err(|e| format!("cannot write: {e}"))
    };
    if a.csv {
        write(&mut out, &format!("{}\n", EXPORT_COLUMNS.join(",")))?;
        for r in &rows {
            write(&mut out, &export_csv_line(r))?;
        }
    } else {
        for r in &rows {
            write(&mut out, &format!("{}\n", r.to_json()))?;
        }
    }
    out.flush().map_err(|e| format!("cannot write: {e}"))
}

fn export_csv_line(r: &UsageRecord) -> String {
    let v = r.to_json();
    let mut line = String::with_capacity(256);
    for (i, c) in EXPORT_COLUMNS.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match &v[*c] {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => csv_cell(&mut line, s),
            other => line.push_str(&other.to_string()),
        }
    }
    line.push('\n');
    line
}

/// `--since`/`--until` of `export`: an RFC 3339 time, or a date standing for its
/// first instant (`--since`) or the instant after it (`--until`, so the day is
/// included).
fn instant(flag: &str, value: &str, end_of_day: bool) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.timestamp_millis());
    }
    let day = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").map_err(|_| {
        format!("{flag}: {value:?} is neither a date like 2026-11-28 nor an RFC 3339 time")
    })?;
    let day = if end_of_day {
        day.succ_opt().unwrap_or(day)
    } else {
        day
    };
    Ok(day
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or_default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn export_bounds_take_dates_or_times() {
        assert_eq!(
            instant("--since", "2026-11-28", false).unwrap(),
            1_795_824_000_000
        );
        assert_eq!(
            instant("--until", "2026-11-28", true).unwrap(),
            1_795_824_000_000 + 86_400_000
        );
        assert_eq!(
            instant("--until", "2026-11-28T01:00:00+01:00", true).unwrap(),
            1_795_824_000_000
        );
        assert!(instant("--since", "yesterday", false)
            .unwrap_err()
            .starts_with("--since"));
    }
}
