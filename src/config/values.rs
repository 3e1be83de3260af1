//! Pure parsers for scalar config values (exact decimals, URLs, storage URLs,
//! names, headers). Each returns a human-readable reason on failure; the
//! reader attaches the key path.

use std::net::Ipv6Addr;
use std::path::PathBuf;

use super::{BaseUrl, Storage};

/// Decimal places kept by exact money values (micro-USD).
const SCALE: u32 = 6;

/// Parses a non-negative decimal (`0.15`, `2`, `1.5e-3`, `+3`) into millionths
/// using only integer arithmetic on its digits.
pub(super) fn parse_micros(text: &str) -> Result<u64, String> {
    const NOT_A_NUMBER: &str = "expected a decimal number (e.g. 0.15)";
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int_part.len() + frac_part.len() == 0 || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(NOT_A_NUMBER.to_owned());
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || digits.len() > 4 || !all_digits(digits) {
                return Err(NOT_A_NUMBER.to_owned());
            }
            e.parse().map_err(|_| NOT_A_NUMBER.to_owned())?
        }
    };
    // value = digits × 10^(exponent − frac_len); millionths = digits × 10^shift.
    let digits: String = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        // Zero, including `-0` and `0e99`.
        return Ok(0);
    }
    if negative {
        return Err("must not be negative".to_owned());
    }
    let frac_len = i64::try_from(frac_part.len()).map_err(|_| NOT_A_NUMBER.to_owned())?;
    let shift = exponent - frac_len + i64::from(SCALE);
    let kept = if shift >= 0 {
        digits
    } else {
        let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
        let (kept, dropped) = digits.split_at(digits.len().saturating_sub(drop));
        if dropped.bytes().any(|b| b != b'0') {
            return Err(format!("at most {SCALE} decimal places are supported"));
        }
        kept
    };
    let too_large = || "value is too large".to_owned();
    let mut value: u64 = 0;
    for b in kept.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    if shift > 0 {
        let pow = u32::try_from(shift).map_err(|_| too_large())?;
        let factor = 10u64.checked_pow(pow).ok_or_else(too_large)?;
        value = value.checked_mul(factor).ok_or_else(too_large)?;
    }
    Ok(value)
}

/// Formats millionths as the shortest exact decimal (`150000` → `0.15`).
pub(super) fn format_micros(micros: u64) -> String {
    let unit = 10u64.pow(SCALE);
    let (whole, frac) = (micros / unit, micros % unit);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Validates an `http`/`https` base URL (see [`BaseUrl`]).
pub(super) fn parse_base_url(text: &str) -> Result<BaseUrl, String> {
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!(
            "expected an http:// or https:// URL such as https://api.openai.com/v1, got {text:?}"
        ));
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => return Err(format!("scheme must be http or https, got {scheme:?}")),
    };
    if rest.contains('?') {
        return Err("must not contain a query string".to_owned());
    }
    if rest.contains('#') {
        return Err("must not contain a fragment".to_owned());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        // Credentials belong in api_key_env, not in a URL that gets logged.
        return Err("must not contain userinfo (user:password@); use api_key_env".to_owned());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((literal, after)) = bracketed.split_once(']') else {
            return Err("unterminated IPv6 literal (missing ']')".to_owned());
        };
        if literal.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address {literal:?}"));
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(format!("unexpected {after:?} after IPv6 literal")),
            },
        };
        (literal.to_ascii_lowercase(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("host must not be empty".to_owned());
        }
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid {
            return Err(format!(
                "invalid host {host:?} (IPv6 literals must be in brackets)"
            ));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => match p.parse::<u16>() {
            // u16::from_str also takes "+80"; a URL port is digits only.
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("invalid port {p:?}")),
        },
    };
    Ok(BaseUrl {
        tls,
        host,
        port,
        path_prefix: path.trim_end_matches('/').to_owned(),
    })
}

/// Parses the `storage` URL.
pub(super) fn parse_storage(text: &str) -> Result<Storage, String> {
    if text == "sqlite::memory:" {
        return Ok(Storage::Sqlite {
            path: PathBuf::from(":memory:"),
        });
    }
    if let Some(path) = text.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err("sqlite:// needs a file path, e.g. sqlite://data/ai4free.db".to_owned());
        }
        return Ok(Storage::Sqlite {
            path: PathBuf::from(path),
        });
    }
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = text.strip_prefix(scheme) {
            if rest.is_empty() {
                return Err(format!("{scheme} needs a host, e.g. {scheme}user@host/db"));
            }
            return Ok(Storage::Postgres {
                url: text.to_owned(),
            });
        }
    }
    let shown = redact_url_password(text);
    Err(format!(
        "expected sqlite://<path>, sqlite::memory:, postgres://... or postgresql://..., got {shown:?}"
    ))
}

/// Validates a `redis://` or `rediss://` URL; the URL is handed to the Redis client
/// verbatim. Errors never repeat the password.
pub(super) fn check_redis_url(text: &str) -> Result<(), String> {
    let shown = redact_url_password(text);
    let Some(rest) = ["redis://", "rediss://"]
        .iter()
        .find_map(|scheme| text.strip_prefix(scheme))
    else {
        return Err(format!(
            "expected a redis:// or rediss:// URL such as redis://127.0.0.1:6379, got {shown:?}"
        ));
    };
    if text
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(h, _)| h),
        None => host_port.split_once(':').map_or(host_port, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(format!(
            "needs a host, e.g. redis://127.0.0.1:6379, got {shown:?}"
        ));
    }
    Ok(())
}

/// Replaces the password in `scheme://user:password@host...` with `***`.
pub(super) fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// Provider and tier names: `[a-z0-9_-]+`, safe in paths, metrics labels and
/// the `provider/model` syntax (they can never contain `/`).
pub(super) fn check_simple_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "must match [a-z0-9_-]+ (lowercase letters, digits, '_' and '-'), got {name:?}"
        ))
    }
}

/// Model names are what clients send: non-empty, no whitespace or control
/// characters (they may contain `/`).
pub(super) fn check_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must not contain whitespace or control characters, got {name:?}"
        ));
    }
    Ok(())
}

/// Environment variable names: `[A-Za-z_][A-Za-z0-9_]*`.
pub(super) fn check_env_var_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(format!(
            "expected an environment variable name like OPENAI_API_KEY, got {name:?}"
        ))
    }
}

/// Headers the gateway itself manages; configuring them would break framing,
/// routing or authentication.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Validates an extra header name (RFC 9110 token) and returns it lowercased.
pub(super) fn check_header_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("header name must not be empty".to_owned());
    }
    let token = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("invalid HTTP header name {name:?}"));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "authorization" {
        // Keeps secrets out of the config file (and out of Debug output).
        return Err(
            "set the provider key with api_key_env, not a static authorization header".to_owned(),
        );
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!("header {lower:?} is managed by the gateway"));
    }
    Ok(lower)
}

/// Validates a header value: visible ASCII, spaces and tabs, no surrounding
/// whitespace (which HTTP would strip anyway).
pub(super) fn check_header_value(value: &str) -> Result<(), String> {
    let valid = value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
    if !valid {
        return Err(
            "invalid HTTP header value (only visible ASCII, spaces and tabs are allowed)"
                .to_owned(),
        );
    }
    if value.trim() != value {
        return Err("header value must not start or end with whitespace".to_owned());
    }
    Ok(())
}
