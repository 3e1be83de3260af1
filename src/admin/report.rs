//! Usage reports: the query a client asks with, and the JSON and CSV it gets.
//!
//! `GET /admin/usage`, the key holder's `GET /v1/usage` and `ai4free usage report`
//! all go through [`ReportParams::parse`] and the renderers here, over rows of the
//! daily rollup ([`crate::store::Store::usage_rollup`]). The rollup's grain is one
//! UTC day, so `since` and `until` select whole days: a date (`2026-11-28`) or an
//! RFC 3339 time, which stands for its UTC day. Both ends are inclusive.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::FieldError;
use crate::store::{day_of_ms, GroupBy, RollupQuery, RollupRow};
use crate::usage::{format_usd, usd_json};

/// Who is asking, which decides the filters they may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// An operator: every filter.
    Admin,
    /// A key holder: only this key's rows; the key, owner and project filters
    /// are refused rather than ignored, so a client never believes it saw
    /// another key's numbers.
    Key(&'a str),
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `{"object": "usage_report", ...}`.
    #[default]
    Json,
    /// RFC 4180 CSV with a header line.
    Csv,
}

/// A parsed report request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportParams {
    /// What to ask the store.
    pub query: RollupQuery,
    /// How to render the answer.
    pub format: Format,
}

impl ReportParams {
    /// Parses query-string pairs (`key_id`, `owner`, `project`, `model`, `since`,
    /// `until`, `group_by`, `format`). Unknown and repeated parameters are errors
    /// naming the parameter: a typo must not silently widen a report.
    pub fn parse<'p, I>(pairs: I, scope: Scope<'_>) -> Result<ReportParams, FieldError>
    where
        I: IntoIterator<Item = (&'p str, &'p str)>,
    {
        let mut q = RollupQuery::default();
        let mut format = None;
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name) {
                return Err(FieldError::new(name, "given more than once"));
            }
            seen.push(name);
            let text = || -> Result<String, FieldError> {
                if value.is_empty() {
                    Err(FieldError::new(name, "must not be empty"))
                } else {
                    Ok(value.to_owned())
                }
            };
            match name {
                "key_id" | "owner" | "project" if scope != Scope::Admin => {
                    return Err(FieldError::new(
                        name,
                        "not available here: this report only covers the key that asks",
                    ))
                }
                "key_id" => q.key_id = Some(text()?),
                "owner" => q.owner = Some(text()?),
                "project" => q.project = Some(text()?),
                "model" => q.model = Some(text()?),
                "since" => q.since_day = Some(parse_day(name, value)?),
                "until" => q.until_day = Some(parse_day(name, value)?),
                "group_by" => {
                    q.group_by = GroupBy::parse(value).ok_or_else(|| {
                        FieldError::new(
                            name,
                            format!("{value:?} is not one of day, model, key, owner, project"),
                        )
                    })?;
                    if scope != Scope::Admin
                        && matches!(q.group_by, GroupBy::Key | GroupBy::Owner | GroupBy::Project)
                    {
                        return Err(FieldError::new(
                            name,
                            "only day or model here: this report only covers the key that asks",
                        ));
                    }
                }
                "format" => {
                    format = Some(match value {
                        "json" => Format::Json,
                        "csv" => Format::Csv,
                        _ => {
                            return Err(FieldError::new(
                                name,
                                format!("{value:?} is not one of json, csv"),
                            ))
                        }
                    })
                }
                _ => return Err(FieldError::new(name, "unknown parameter")),
            }
        }
        if let (Some(a), Some(b)) = (&q.since_day, &q.until_day) {
            if a > b {
                return Err(FieldError::new(
                    "until",
                    format!("{b} is before since ({a})"),
                ));
            }
        }
        if let Scope::Key(id) = scope {
            q.key_id = Some(id.to_owned());
        }
        Ok(ReportParams {
            query: q,
            format: format.unwrap_or_default(),
        })
    }
}

/// `YYYY-MM-DD`, or an RFC 3339 time standing for its UTC day.
pub fn parse_day(field: &str, value: &str) -> Result<String, FieldError> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        // Re-format: the store compares days as text, which needs four-digit years.
        return Ok(d.format("%Y-%m-%d").to_string());
    }
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| day_of_ms(t.timestamp_millis()))
        .map_err(|_| {
            FieldError::new(
                field,
                format!("{value:?} is neither a date like 2026-11-28 nor an RFC 3339 time"),
            )
        })
}

/// Sums of a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests in total.
    pub requests: u64,
    /// Requests answered 2xx.
    pub ok_requests: u64,
    /// The rest.
    pub failed_requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost, pico-USD.
    pub cost_pusd: i128,
}

impl Totals {
    /// Sums `rows`, saturating rather than wrapping.
    pub fn of(rows: &[RollupRow]) -> Totals {
        rows.iter().fold(Totals::default(), |t, r| Totals {
            requests: t.requests.saturating_add(r.requests),
            ok_requests: t.ok_requests.saturating_add(r.ok_requests),
            failed_requests: t.failed_requests.saturating_add(r.failed),
            prompt_tokens: t.prompt_tokens.saturating_add(r.prompt_tokens),
            completion_tokens: t.completion_tokens.saturating_add(r.completion_tokens),
            cost_pusd: t.cost_pusd.saturating_add(r.cost_pusd),
        })
    }

    fn of_row(r: &RollupRow) -> Totals {
        Totals::of(std::slice::from_ref(r))
    }

    fn fill(&self, o: &mut Map<String, Value>) {
        o.insert("requests".into(), self.requests.into());
        o.insert("ok_requests".into(), self.ok_requests.into());
        o.insert("failed_requests".into(), self.failed_requests.into());
        o.insert("prompt_tokens".into(), self.prompt_tokens.into());
        o.insert("completion_tokens".into(), self.completion_tokens.into());
        o.insert(
            "total_tokens".into(),
            self.prompt_tokens
                .saturating_add(self.completion_tokens)
                .into(),
        );
        // A JSON number for tools, and the exact decimal for anyone who sums.
        o.insert("cost_usd".into(), usd_json(self.cost_pusd));
        o.insert("cost_usd_exact".into(), format_usd(self.cost_pusd).into());
    }
}

/// The JSON report: one object per group, named by the grouping (`"day"`,
/// `"model"`, `"key_id"`, `"owner"` or `"project"`), plus the totals.
pub fn report_json(rows: &[RollupRow], params: &ReportParams) -> Value {
    let column = group_column(params.query.group_by);
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o = Map::new();
            o.insert(
                column.into(),
                r.group.clone().map_or(Value::Null, Value::String),
            );
            Totals::of_row(r).fill(&mut o);
            Value::Object(o)
        })
        .collect();
    let mut total = Map::new();
    Totals::of(rows).fill(&mut total);
    let q = &params.query;
    json!({
        "object": "usage_report",
        "group_by": q.group_by.as_str(),
        "filters": {
            "key_id": q.key_id,
            "owner": q.owner,
            "project": q.project,
            "model": q.model,
            "since": q.since_day,
            "until": q.until_day,
        },
        "data": data,
        "total": total,
    })
}

/// The CSV report: a header line, one line per group, no totals line (a
/// spreadsheet sums by itself, and a totals line would be summed twice).
pub fn report_csv(rows: &[RollupRow], params: &ReportParams) -> String {
    let column = group_column(params.query.group_by);
    let mut out = String::with_capacity(64 * (rows.len() + 1));
    let _ = writeln!(
        out,
        "{column},requests,ok_requests,failed_requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
    );
    for r in rows {
        csv_cell(&mut out, r.group.as_deref().unwrap_or(""));
        let t = Totals::of_row(r);
        let _ = writeln!(
            out,
            ",{},{},{},{},{},{},{}",
            t.requests,
            t.ok_requests,
            t.failed_requests,
            t.prompt_tokens,
            t.completion_tokens,
            t.prompt_tokens.saturating_add(t.completion_tokens),
            format_usd(t.cost_pusd)
        );
    }
    out
}

/// The name of the grouping column in JSON and CSV.
pub fn group_column(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Day => "day",
        GroupBy::Model => "model",
        GroupBy::Key => "key_id",
        GroupBy::Owner => "owner",
        GroupBy::Project => "project",
    }
}

/// Appends one CSV cell: quoted when it holds a separator, quote or line break
/// (RFC 4180), and prefixed with `'` when a spreadsheet would run it as a formula.
pub fn csv_cell(out: &mut String, cell: &str) {
    let formula = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = formula || cell.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if formula {
        out.push('\'');
    }
    for c in cell.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(q: &[(&str, &str)], scope: Scope<'_>) -> Result<ReportParams, FieldError> {
        ReportParams::parse(q.iter().copied(), scope)
    }

    fn row(group: Option<&str>, requests: u64, ok: u64, cost: i128) -> RollupRow {
        RollupRow {
            group: group.map(str::to_owned),
            requests,
            ok_requests: ok,
            failed: requests - ok,
            prompt_tokens: 10 * requests,
            completion_tokens: 5 * requests,
            cost_pusd: cost,
        }
    }

    #[test]
    fn parses_every_filter() {
        let p = parse(
            &[
                ("key_id", "k1"),
                ("owner", "alice"),
                ("project", "p"),
                ("model", "gpt-4o"),
                ("since", "2026-11-01"),
                ("until", "2026-11-28T23:00:00+02:00"),
                ("group_by", "owner"),
                ("format", "csv"),
            ],
            Scope::Admin,
        )
        .unwrap();
        assert_eq!(p.format, Format::Csv);
        assert_eq!(p.query.group_by, GroupBy::Owner);
        assert_eq!(p.query.key_id.as_deref(), Some("k1"));
        assert_eq!(p.query.since_day.as_deref(), Some("2026-11-01"));
        // 23:00 at +02:00 is 21:00 UTC the same day.
        assert_eq!(p.query.until_day.as_deref(), Some("2026-11-28"));
        let d = parse(&[], Scope::Admin).unwrap();
        assert_eq!((d.query.group_by, d.format), (GroupBy::Day, Format::Json));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("group_by", "week")], "group_by"),
            (&[("format", "xml")], "format"),
            (&[("since", "yesterday")], "since"),
            (&[("until", "2026-13-01")], "until"),
            (&[("groupby", "day")], "groupby"),
            (&[("model", "")], "model"),
            (&[("model", "a"), ("model", "b")], "model"),
            (&[("since", "2026-11-02"), ("until", "2026-11-01")], "until"),
        ];
        for (q, field) in cases {
            let e = parse(q, Scope::Admin).unwrap_err();
            assert_eq!(e.field, *field, "{q:?}: {e}");
        }
    }

    #[test]
    fn a_key_sees_only_itself() {
        let p = parse(&[("group_by", "model")], Scope::Key("k_me")).unwrap();
        assert_eq!(p.query.key_id.as_deref(), Some("k_me"));
        for q in [
            ("key_id", "k_other"),
            ("owner", "alice"),
            ("project", "p"),
            ("group_by", "key"),
            ("group_by", "owner"),
            ("group_by", "project"),
        ] {
            let e = parse(&[q], Scope::Key("k_me")).unwrap_err();
            assert_eq!(e.field, q.0);
        }
    }

    #[test]
    fn json_names_the_group_and_sums_exactly() {
        let p = parse(&[("group_by", "key")], Scope::Admin).unwrap();
        // 0.1 + 0.2 USD: exact in pico-USD, where floats would print 0.30000000000000004.
        let rows = [
            row(Some("k1"), 3, 2, 100_000_000_000),
            row(None, 1, 1, 200_000_000_000),
        ];
        let v = report_json(&rows, &p);
        assert_eq!(v["group_by"], "key");
        assert_eq!(v["data"][0]["key_id"], "k1");
        assert_eq!(v["data"][0]["failed_requests"], 1);
        assert_eq!(v["data"][0]["total_tokens"], 45);
        assert_eq!(v["data"][1]["key_id"], Value::Null);
        assert_eq!(v["total"]["requests"], 4);
        assert_eq!(v["total"]["cost_usd_exact"], "0.3");
        assert_eq!(v["total"]["cost_usd"], 0.3);
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let p = parse(&[("group_by", "owner"), ("format", "csv")], Scope::Admin).unwrap();
        let rows = [
            row(Some("a,b \"q\""), 1, 1, 1),
            row(Some("=HYPERLINK(\"x\")"), 2, 0, 0),
            row(None, 1, 1, 0),
        ];
        let csv = report_csv(&rows, &p);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "owner,requests,ok_requests,failed_requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
        );
        assert_eq!(lines[1], "\"a,b \"\"q\"\"\",1,1,0,10,5,15,0.000000000001");
        assert_eq!(lines[2], "\"'=HYPERLINK(\"\"x\"\")\",2,0,2,20,10,30,0");
        assert_eq!(lines[3], ",1,1,0,10,5,15,0");
        assert_eq!(lines.len(), 4);
    }
}
