//! The validating reader: walks a `serde_yaml_ng::Value` tree, records every
//! problem with the path of the offending key, and keeps going.
//!
//! Readers return `Option`s (or the default) on error; the caller only builds a
//! `Config` when no error was recorded, so the placeholder values never escape.

use serde_yaml_ng::Value;

use super::{values, ConfigError};

/// Collects errors while the tree is walked.
#[derive(Debug, Default)]
pub(super) struct Reader {
    pub(super) errors: Vec<ConfigError>,
}

/// A mapping whose keys have been checked against the allowed set.
pub(super) struct Fields<'v> {
    path: String,
    entries: Vec<(&'v str, &'v Value)>,
}

impl<'v> Fields<'v> {
    /// The value of `key`; `None` when absent or `null`, which both mean "use the default".
    pub(super) fn get(&self, key: &str) -> Option<&'v Value> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }

    /// The path of `key` inside this mapping.
    pub(super) fn path(&self, key: &str) -> String {
        child(&self.path, key)
    }
}

/// `parent.key`, quoting keys that would make the path ambiguous.
pub(super) fn child(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

/// `parent[i]`.
pub(super) fn item(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// A short description of a value for "expected X, got Y" messages.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            // Keep messages one line and short even for pasted blobs.
            const MAX: usize = 60;
            if s.chars().count() > MAX {
                let cut: String = s.chars().take(MAX).collect();
                format!("{cut:?}...")
            } else {
                format!("{s:?}")
            }
        }
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a map".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

impl Reader {
    /// Records an error at `path`.
    pub(super) fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Records a missing required key.
    pub(super) fn missing(&mut self, path: &str) {
        self.error(path, "required key is missing");
    }

    /// Opens a mapping, reporting non-string keys and keys outside `allowed`.
    /// `null` is read as an empty mapping (an empty `key:` section).
    pub(super) fn fields<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
        allowed: &[&str],
    ) -> Option<Fields<'v>> {
        let entries = self.entries(path, value)?;
        for (key, _) in &entries {
            if !allowed.contains(key) {
                self.error(
                    &child(path, key),
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                );
            }
        }
        Some(Fields {
            path: path.to_owned(),
            entries,
        })
    }

    /// The string-keyed entries of a mapping with free-form keys, in document order.
    pub(super) fn entries<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
    ) -> Option<Vec<(&'v str, &'v Value)>> {
        let mapping = match value {
            Value::Mapping(m) => m,
            Value::Null => return Some(Vec::new()),
            other => {
                self.error(path, format!("expected a map, got {}", describe(other)));
                return None;
            }
        };
        let mut entries = Vec::with_capacity(mapping.len());
        for (k, v) in mapping {
            match k {
                Value::String(k) => entries.push((k.as_str(), v)),
                other => self.error(
                    path,
                    format!("keys must be strings, got key {}", describe(other)),
                ),
            }
        }
        Some(entries)
    }

    /// A list; `null` reads as empty.
    pub(super) fn list<'v>(&mut self, path: &str, value: &'v Value) -> Option<&'v [Value]> {
        match value {
            Value::Sequence(s) => Some(s),
            Value::Null => Some(&[]),
            other => {
                self.error(path, format!("expected a list, got {}", describe(other)));
                None
            }
        }
    }

    /// A string.
    pub(super) fn string(&mut self, path: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(path, format!("expected a string, got {}", describe(other)));
                None
            }
        }
    }

    /// A required string field.
    pub(super) fn req_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        match f.get(key) {
            Some(v) => self.string(&f.path(key), v),
            None => {
                self.missing(&f.path(key));
                None
            }
        }
    }

    /// An optional string field.
    pub(super) fn opt_string(&mut self, f: &Fields<'_>, key: &str) -> Option<String> {
        let v = f.get(key)?;
        self.string(&f.path(key), v)
    }

    /// A boolean field with a default.
    pub(super) fn bool_or(&mut self, f: &Fields<'_>, key: &str, default: bool) -> bool {
        match f.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.error(
                    &f.path(key),
                    format!("expected true or false, got {}", describe(other)),
                );
                default
            }
        }
    }

    /// An unsigned integer in `min..=max`.
    pub(super) fn uint(&mut self, path: &str, value: &Value, min: u64, max: u64) -> Option<u64> {
        let expected = if min >= 1 {
            "a positive integer"
        } else {
            "a non-negative integer"
        };
        let n = match value {
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        let Some(n) = n else {
            self.error(
                path,
                format!("expected {expected}, got {}", describe(value)),
            );
            return None;
        };
        if n < min || n > max {
            let bounded = min > 1 && max < u64::from(u32::MAX);
            let message = if bounded {
                format!("must be between {min} and {max}, got {n}")
            } else if n < min && min == 1 {
                format!("expected {expected}, got {n}")
            } else if n < min {
                format!("must be at least {min}, got {n}")
            } else {
                format!("must be at most {max}, got {n}")
            };
            self.error(path, message);
            return None;
        }
        Some(n)
    }

    /// An optional integer field in `min..=max`.
    pub(super) fn opt_uint(
        &mut self,
        f: &Fields<'_>,
        key: &str,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        let v = f.get(key)?;
        self.uint(&f.path(key), v, min, max)
    }

    /// An integer field in `min..=max` with a default.
    pub(super) fn uint_or(
        &mut self,
        f: &Fields<'_>,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        match f.get(key) {
            None => default,
            Some(v) => self.uint(&f.path(key), v, min, max).unwrap_or(default),
        }
    }

    /// A non-negative exact decimal with at most 6 places, in millionths.
    /// Numbers and strings are both accepted (a string is exact by construction).
    pub(super) fn micros(&mut self, path: &str, value: &Value) -> Option<u64> {
        let text = match value {
            // serde_yaml_ng keeps floats as f64, but its Display is the shortest
            // round-trip form, which gives back the literal's decimal digits for
            // any literal of up to 15 significant digits; the digits are then
            // scaled as text, never with float arithmetic.
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => {
                self.error(
                    path,
                    format!(
                        "expected a decimal number (e.g. 0.15), got {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        match values::parse_micros(&text) {
            Ok(m) => Some(m),
            Err(reason) => {
                self.error(path, format!("{reason}, got {}", describe(value)));
                None
            }
        }
    }

    /// An optional decimal field, in millionths.
    pub(super) fn opt_micros(&mut self, f: &Fields<'_>, key: &str) -> Option<u64> {
        let v = f.get(key)?;
        self.micros(&f.path(key), v)
    }
}
