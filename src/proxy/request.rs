//! Pure request handling: which API a path is, what a body asks for, and the body
//! the provider should receive.
//!
//! Nothing here touches a `Session`; the proxy phases call these with bytes.

use std::borrow::Cow;

use bytes::Bytes;
use once_cell::sync::Lazy;
use serde::Deserialize;
use serde_json::Value;

use crate::admin::report::{ReportParams, Scope};
use crate::error::ProxyError;
use crate::json_scan::{once, Cursor};
use crate::usage::SharedStr;

/// The OpenAI APIs the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    /// The client-facing path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// [`Endpoint::path`] as a shared string, for usage rows (allocated once).
    pub fn shared_path(self) -> SharedStr {
        static PATHS: Lazy<[SharedStr; 3]> = Lazy::new(|| {
            [
                Endpoint::ChatCompletions,
                Endpoint::Completions,
                Endpoint::Embeddings,
            ]
            .map(|e| SharedStr::from(e.path()))
        });
        let [chat, completions, embeddings] = &*PATHS;
        match self {
            Endpoint::ChatCompletions => chat.clone(),
            Endpoint::Completions => completions.clone(),
            Endpoint::Embeddings => embeddings.clone(),
        }
    }

    /// The path below the provider's base URL.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
}

/// What a request line asks of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`
    Health,
    /// `GET /v1/models`
    Models,
    /// `GET /v1/usage`: the calling key's own usage report.
    Usage,
    /// A proxied API call.
    Proxy(Endpoint),
}

/// Routes a method and path (query string ignored; a trailing slash tolerated).
pub fn route(method: &str, path: &str) -> Result<Route, ProxyError> {
    let path = path.split('?').next().unwrap_or(path);
    let path = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let (want_get, route) = match path {
        "/healthz" => (true, Route::Health),
        "/v1/models" => (true, Route::Models),
        "/v1/usage" => (true, Route::Usage),
        "/v1/chat/completions" => (false, Route::Proxy(Endpoint::ChatCompletions)),
        "/v1/completions" => (false, Route::Proxy(Endpoint::Completions)),
        "/v1/embeddings" => (false, Route::Proxy(Endpoint::Embeddings)),
        _ => return Err(ProxyError::NotFound),
    };
    let ok = if want_get {
        method == "GET" || method == "HEAD"
    } else {
        method == "POST"
    };
    if ok {
        Ok(route)
    } else {
        Err(ProxyError::MethodNotAllowed)
    }
}

/// The report `GET /v1/usage?…` asks for, always scoped to the calling key: the
/// parser refuses `key_id`, `owner` and `project` rather than ignoring them.
pub fn usage_params(query: Option<&str>, key_id: &str) -> Result<ReportParams, ProxyError> {
    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes()).collect();
    ReportParams::parse(
        pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
        Scope::Key(key_id),
    )
    .map_err(ProxyError::InvalidParam)
}

/// The fields of a request body the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The `model` as sent.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// Whether the body carries a `stream_options` object at all.
    pub has_stream_options: bool,
    /// `stream_options.include_usage` as sent by the client.
    pub include_usage: bool,
    /// `max_tokens`, when a non-negative integer.
    pub max_tokens: Option<u64>,
    /// `max_completion_tokens`, when a non-negative integer.
    pub max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    // Not validated here: a bad value is the provider's 400 to give; the
    // reservation then falls back to the tier's default.
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
}

#[derive(Deserialize)]
struct ModelAny {
    model: Option<Value>,
}

/// Reads the fields the gateway needs; `model` may stand anywhere in the object.
pub fn parse_head(body: &[u8]) -> Result<RequestHead, ProxyError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ProxyError::EmptyBody);
    }
    match head_direct(body) {
        Some(head) => Ok(head),
        None => parse_head_serde(body),
    }
}

/// The head of a well-formed body in the common shape, read without serde
/// (see [`crate::json_scan`]): `None` wherever serde might answer otherwise,
/// including every error, which serde then words. serde's visitors cost ~1.9k
/// instructions on the benchmark's 180-byte body, more than the reading.
fn head_direct(body: &[u8]) -> Option<RequestHead> {
    let mut c = Cursor::new(body);
    c.ws();
    let mut head = RequestHead {
        model: String::new(),
        stream: false,
        has_stream_options: false,
        include_usage: false,
        max_tokens: None,
        max_completion_tokens: None,
    };
    let mut model = None;
    // Which known fields came (see `once`): model, stream, stream_options,
    // max_tokens, max_completion_tokens.
    let mut seen = [false; 5];
    c.members(|c, key| {
        match key {
            b"model" => {
                once(&mut seen[0])?;
                model = Some(c.plain_str()?);
            }
            b"stream" => {
                once(&mut seen[1])?;
                head.stream = boolean_or_null(c)?;
            }
            b"stream_options" => {
                once(&mut seen[2])?;
                if !c.literal(b"null") {
                    head.has_stream_options = true;
                    let mut include = false;
                    c.members(|c, key| {
                        if key == b"include_usage" {
                            once(&mut include)?;
                            head.include_usage = boolean_or_null(c)?;
                        } else {
                            // serde parses these into a `Value` (checking what it
                            // would ignore elsewhere): only literals are read here.
                            boolean_or_null(c)?;
                        }
                        Some(())
                    })?;
                }
            }
            b"max_tokens" => {
                once(&mut seen[3])?;
                head.max_tokens = u64_of(c)?;
            }
            b"max_completion_tokens" => {
                once(&mut seen[4])?;
                head.max_completion_tokens = u64_of(c)?;
            }
            _ => c.skip_value(1)?,
        }
        Some(())
    })?;
    if !c.at_end() {
        return None;
    }
    // A missing or empty model is an error serde's path words.
    head.model = model.filter(|m| !m.is_empty())?.to_owned();
    Some(head)
}

/// `true`, `false` or `null` (false).
fn boolean_or_null(c: &mut Cursor<'_>) -> Option<bool> {
    if c.literal(b"true") {
        Some(true)
    } else {
        (c.literal(b"false") || c.literal(b"null")).then_some(false)
    }
}

/// `max_tokens` as `Value::as_u64` reads it, for `null` and plain non-negative
/// integers; other values (which serde parses into a `Value`, refusing some) are
/// left to serde.
fn u64_of(c: &mut Cursor<'_>) -> Option<Option<u64>> {
    if c.literal(b"null") {
        return Some(None);
    }
    c.number()?.map(Some)
}

/// The serde path: every body, and the wording of every error.
fn parse_head_serde(body: &[u8]) -> Result<RequestHead, ProxyError> {
    let head: Head<'_> = match serde_json::from_slice(body) {
        Ok(h) => h,
        Err(e) => return Err(classify_json_error(body, e)),
    };
    let model = match head.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        Some(_) => return Err(ProxyError::InvalidField("model", "must not be empty")),
        None => return Err(ProxyError::MissingModel),
    };
    let stream = match head.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(ProxyError::InvalidField("stream", "must be a boolean")),
    };
    let (has_stream_options, include_usage) = match head.stream_options {
        None | Some(Value::Null) => (false, false),
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => (true, false),
            Some(Value::Bool(b)) => (true, *b),
            Some(_) => {
                return Err(ProxyError::InvalidField(
                    "stream_options.include_usage",
                    "must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ProxyError::InvalidField(
                "stream_options",
                "must be an object",
            ))
        }
    };
    Ok(RequestHead {
        model,
        stream,
        has_stream_options,
        include_usage,
        max_tokens: head.max_tokens.as_ref().and_then(Value::as_u64),
        max_completion_tokens: head.max_completion_tokens.as_ref().and_then(Value::as_u64),
    })
}

fn classify_json_error(body: &[u8], e: serde_json::Error) -> ProxyError {
    if e.is_data() {
        // Valid JSON, wrong shape: say which.
        if let Ok(m) = serde_json::from_slice::<ModelAny>(body) {
            if m.model
                .as_ref()
                .is_some_and(|v| !v.is_string() && !v.is_null())
            {
                return ProxyError::InvalidField("model", "must be a string");
            }
        }
        return ProxyError::InvalidJson("the body must be a JSON object".into());
    }
    ProxyError::InvalidJson(e.to_string())
}

/// The body to send upstream: the model renamed to the provider's name and/or
/// `stream_options.include_usage` forced on. Returns the input unchanged (no copy)
/// when neither applies.
pub fn upstream_body(
    body: &Bytes,
    head: &RequestHead,
    upstream_model: Option<&str>,
    force_include_usage: bool,
) -> Result<Bytes, ProxyError> {
    let rename = upstream_model.is_some_and(|m| m != head.model);
    let inject = force_include_usage && !head.include_usage;
    if !rename && !inject {
        return Ok(body.clone());
    }
    if !rename && !head.has_stream_options {
        // Splicing a member after the opening brace keeps the client's bytes and key
        // order and costs one copy, not a parse and re-serialisation of a large body.
        let start = body
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .ok_or(ProxyError::EmptyBody)?;
        if body.get(start) == Some(&b'{') {
            const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
            let mut out = Vec::with_capacity(body.len() + MEMBER.len());
            out.extend_from_slice(&body[..=start]);
            out.extend_from_slice(MEMBER);
            out.extend_from_slice(&body[start + 1..]);
            return Ok(Bytes::from(out));
        }
    }
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::InvalidJson(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ProxyError::InvalidJson("the body must be a JSON object".into()))?;
    if let Some(m) = upstream_model.filter(|_| rename) {
        obj.insert("model".into(), Value::String(m.to_owned()));
    }
    if inject {
        let so = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !so.is_object() {
            *so = Value::Object(Default::default());
        }
        if let Some(o) = so.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| ProxyError::Internal)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn usage_params_are_decoded_and_scoped_to_the_key() {
        use crate::admin::report::Format;
        use crate::store::GroupBy;
        let p = usage_params(
            Some(
                "group_by=model&model=gpt%2D4o&since=2026-11-01T00%3A00%3A00%2B02%3A00&format=csv",
            ),
            "k_me",
        )
        .unwrap();
        assert_eq!(p.query.key_id.as_deref(), Some("k_me"));
        assert_eq!(p.query.group_by, GroupBy::Model);
        assert_eq!(p.query.model.as_deref(), Some("gpt-4o"));
        // 00:00 at +02:00 is the previous UTC day.
        assert_eq!(p.query.since_day.as_deref(), Some("2026-10-31"));
        assert_eq!(p.format, Format::Csv);
        let d = usage_params(None, "k_me").unwrap();
        assert_eq!(d.query.key_id.as_deref(), Some("k_me"));
        for (q, param) in [
            ("key_id=k_other", "key_id"),
            ("owner=alice", "owner"),
            ("project=p", "project"),
            ("group_by=key", "group_by"),
            ("since=someday", "since"),
            ("colour=red", "colour"),
        ] {
            let e = usage_params(Some(q), "k_me").unwrap_err();
            assert_eq!(e.param(), Some(param), "{q}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz"), Ok(Route::Health));
        assert_eq!(route("GET", "/v1/models?x=1"), Ok(Route::Models));
        assert_eq!(route("GET", "/v1/usage?format=csv"), Ok(Route::Usage));
        assert_eq!(
            route("POST", "/v1/usage"),
            Err(ProxyError::MethodNotAllowed)
        );
        assert_eq!(
            route("POST", "/v1/chat/completions/"),
            Ok(Route::Proxy(Endpoint::ChatCompletions))
        );
        assert_eq!(
            route("GET", "/v1/chat/completions"),
            Err(ProxyError::MethodNotAllowed)
        );
        assert_eq!(route("POST", "/admin"), Err(ProxyError::NotFound));
        assert_eq!(route("POST", "/"), Err(ProxyError::NotFound));
    }

    #[test]
    fn common_heads_are_read_without_serde() {
        for body in [
            &br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16,"stream":false}"#[..],
            r#" {"model": "gpt-4o", "messages": [{"role": "user", "content": "line\none \"quoted\" caf\u00e9 ü"}], "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.2, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]}"#.as_bytes(),
            br#"{"model":"text-embedding-3-small","input":["a","b"],"encoding_format":"float","max_completion_tokens":null}"#,
        ] {
            let direct = head_direct(body);
            assert!(direct.is_some(), "undecided: {}", String::from_utf8_lossy(body));
            assert_eq!(direct.map(Ok), Some(parse_head_serde(body)));
        }
        // Left to serde: escapes in the model, floats and other shapes where
        // serde parses a `Value`, duplicates, errors.
        for body in [
            &br#"{"model":"m\u00e9"}"#[..],
            br#"{"model":"a","max_tokens":1.5}"#,
            br#"{"model":"a","max_tokens":-1}"#,
            br#"{"model":"a","max_tokens":"16"}"#,
            br#"{"model":"a","stream_options":{"x":1e400}}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"a","stream":true,"stream":null}"#,
            br#"{"model":"a","stream_options":null,"stream_options":{}}"#,
            br#"{"model":"a","stream_options":{"include_usage":true,"include_usage":false}}"#,
            br#"{"model":"a","max_tokens":1,"max_tokens":2}"#,
            br#"{"model":"a","max_completion_tokens":1,"max_completion_tokens":null}"#,
            br#"{"model":"a","stream":"yes"}"#,
            br#"{"model":""}"#,
            br#"{"messages":[]}"#,
            br#"["model"]"#,
            br#"{"model":"a"} {}"#,
        ] {
            assert_eq!(head_direct(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    /// A request body's member values, in the shapes clients send and some they should not.
    fn member_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            proptest::num::u64::ANY.prop_map(|n| n.to_string()),
            Just("18446744073709551616".to_owned()),
            Just("-7".to_owned()),
            Just("0.5".to_owned()),
            Just("1e400".to_owned()),
            Just("-0".to_owned()),
            Just("01".to_owned()),
            "[a-zé\\\\\"n/u0-9 ]{0,8}".prop_map(|t| format!("\"{t}\"")),
            "[a-zé\\\\\"\n\u{1}/ ]{0,8}"
                .prop_map(|t| serde_json::to_string(&t).unwrap_or_default()),
            "[a-zé\\\\\"\n\u{1}/ ]{0,8}"
                .prop_map(|t| serde_json::to_string(&t).unwrap_or_default()),
            Just("\"gpt-4o-mini\"".to_owned()),
            Just("\"\"".to_owned()),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(
                    (
                        prop::sample::select(vec!["include_usage", "role", "content", "x"]),
                        inner
                    ),
                    0..3,
                )
                .prop_map(|m| {
                    let m: Vec<String> =
                        m.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", m.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20000))]

        /// Wherever the direct reader decides, serde's path gives the same head;
        /// damage anywhere never makes it decide otherwise.
        #[test]
        fn the_direct_head_agrees_with_serde(
            model in proptest::prop_oneof![
                4 => proptest::strategy::Just(Some("\"gpt-4o-mini\"".to_owned())),
                1 => proptest::option::of(member_value()),
            ],
            members in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "model", "stream", "stream", "stream_options", "stream_options", "max_tokens",
                        "max_completion_tokens", "messages", "messages", "x", "mod\\u0065l", "é",
                    ]),
                    member_value(),
                    proptest::sample::select(vec!["", " ", "\n\t"]),
                ),
                0..6,
            ),
            end in proptest::sample::select(vec!["", "", " \n", "x", ","]),
            damage in proptest::option::weighted(0.25, (0usize..400, 0u8..=255)),
        ) {
            let mut m: Vec<String> = members
                .into_iter()
                .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                .collect();
            if let Some(v) = model {
                let at = v.len() % (m.len() + 1);
                m.insert(at, format!("\"model\":{v}"));
            }
            let mut body = format!("{{{}}}{end}", m.join(",")).into_bytes();
            if let Some((i, b)) = damage {
                let i = i % body.len();
                if b % 4 == 0 { body.truncate(i) } else { body[i] = b }
            }
            if let Some(direct) = head_direct(&body) {
                proptest::prop_assert_eq!(Ok(direct), parse_head_serde(&body), "{}", String::from_utf8_lossy(&body));
            }
        }
    }

    #[test]
    fn heads() {
        let h = parse_head(
            br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"gpt-4o-mini"}"#,
        )
        .unwrap();
        assert_eq!(h.model, "gpt-4o-mini");
        assert!(h.stream);
        assert!(!h.include_usage);
        let h =
            parse_head(br#"{"model":"m\u00e9","stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(h.model, "mé");
        assert!(h.include_usage && h.has_stream_options);
        assert_eq!(parse_head(b""), Err(ProxyError::EmptyBody));
        assert_eq!(parse_head(b"  \n"), Err(ProxyError::EmptyBody));
        assert!(matches!(parse_head(b"{"), Err(ProxyError::InvalidJson(_))));
        assert!(matches!(
            parse_head(b"[1,2]"),
            Err(ProxyError::InvalidJson(_))
        ));
        assert!(matches!(
            parse_head(b"\xff\xfe"),
            Err(ProxyError::InvalidJson(_))
        ));
        assert_eq!(parse_head(b"{}"), Err(ProxyError::MissingModel));
        assert_eq!(
            parse_head(br#"{"model":5}"#),
            Err(ProxyError::InvalidField("model", "must be a string"))
        );
        assert_eq!(
            parse_head(br#"{"model":"a","stream":"yes"}"#),
            Err(ProxyError::InvalidField("stream", "must be a boolean"))
        );
        assert_eq!(
            parse_head(br#"{"model":""}"#),
            Err(ProxyError::InvalidField("model", "must not be empty"))
        );
    }

    #[test]
    fn bodies() {
        let raw = Bytes::from_static(br#"  {"model":"a","stream":true}"#);
        let h = parse_head(&raw).unwrap();
        let same = upstream_body(&raw, &h, None, false).unwrap();
        assert_eq!(same, raw);
        let spliced = upstream_body(&raw, &h, None, true).unwrap();
        let v: Value = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "a");
        let renamed = upstream_body(&raw, &h, Some("b"), true).unwrap();
        let v: Value = serde_json::from_slice(&renamed).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["stream_options"]["include_usage"], true);
        let raw = Bytes::from_static(
            br#"{"model":"a","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let h = parse_head(&raw).unwrap();
        let v: Value =
            serde_json::from_slice(&upstream_body(&raw, &h, None, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
