//! API keys: the wire format, generation, hashing and the record the stores keep.
//!
//! A key looks like `a4f_<id>_<secret><check>`:
//!
//! - `a4f_` is a fixed prefix so secret scanners (and humans) recognise our keys;
//! - `<id>` is 12 base62 characters (~71 bits), the key's public, permanent id;
//! - `<secret>` is 22 base62 characters (~131 bits of randomness), never stored;
//! - `<check>` is 6 base62 characters of a CRC-32 over everything before it, so a
//!   mistyped or random string is rejected without touching the cache or the store.
//!
//! Only `SHA-256("ai4free.v1:" || id || ":" || secret)` is stored. Secrets carry
//! 131 bits of entropy, so a fast hash is enough: there is nothing to brute-force.
//! This module is pure: no IO, no clock except where a timestamp is passed in.

pub mod cache;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::UsdAmount;

/// The fixed prefix of every key this gateway issues.
pub const KEY_PREFIX: &str = "a4f_";
/// Length of the public id in characters.
pub const ID_LEN: usize = 12;
/// Length of the secret part in characters.
pub const SECRET_LEN: usize = 22;
/// Length of the checksum in characters.
pub const CHECK_LEN: usize = 6;
/// Total length of a key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECK_LEN;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented string is not a well-formed key. Checked without any IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the key does not start with the a4f_ prefix")]
    Prefix,
    #[error("the key has the wrong length")]
    Length,
    #[error("the key contains characters outside [0-9A-Za-z_]")]
    Charset,
    #[error("the key's checksum does not match (mistyped or truncated key)")]
    Checksum,
}

/// A syntactically valid key, borrowed from the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The public id.
    pub id: &'a str,
    /// The secret part (never logged).
    pub secret: &'a str,
}

/// A freshly generated key: the full secret string (shown once) and its public id.
pub struct NewKey {
    /// The public id.
    pub id: String,
    /// The full key string to hand to the user, exactly once.
    pub key: String,
    /// What the store keeps instead of the secret.
    pub secret_hash: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret must never reach a log line through a derived Debug.
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Parses and checksums a presented key. Constant work for any input length.
pub fn parse(presented: &str) -> Result<ParsedKey<'_>, FormatError> {
    let bytes = presented.as_bytes();
    if !presented.starts_with(KEY_PREFIX) {
        return Err(FormatError::Prefix);
    }
    if bytes.len() != KEY_LEN {
        return Err(FormatError::Length);
    }
    let id_start = KEY_PREFIX.len();
    let sep = id_start + ID_LEN;
    if bytes[sep] != b'_' {
        return Err(FormatError::Charset);
    }
    let body = &bytes[id_start..];
    if !body
        .iter()
        .enumerate()
        .all(|(i, b)| i == ID_LEN || b.is_ascii_alphanumeric())
    {
        return Err(FormatError::Charset);
    }
    let check_start = KEY_LEN - CHECK_LEN;
    let expected = checksum(&presented[..check_start]);
    if expected[..] != bytes[check_start..] {
        return Err(FormatError::Checksum);
    }
    Ok(ParsedKey {
        id: &presented[id_start..sep],
        secret: &presented[sep + 1..check_start],
    })
}

/// Generates a new key from the operating system's CSPRNG.
pub fn generate() -> Result<NewKey, getrandom::Error> {
    generate_for(&random_base62(ID_LEN)?)
}

/// A new secret for the existing key `id`: what a rotation hands out, so the
/// public id (and the usage attributed to it) survives.
pub fn generate_for(id: &str) -> Result<NewKey, getrandom::Error> {
    let id = id.to_owned();
    let secret = random_base62(SECRET_LEN)?;
    let head = format!("{KEY_PREFIX}{id}_{secret}");
    let key = with_checksum(&head);
    let secret_hash = hash_secret(&id, &secret);
    Ok(NewKey {
        id,
        key,
        secret_hash,
    })
}

/// Generates only a fresh public id (used where an id is needed without a key).
pub fn random_base62(len: usize) -> Result<String, getrandom::Error> {
    // Rejection sampling keeps the distribution uniform over the 62 symbols.
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        for b in buf {
            if out.len() == len {
                break;
            }
            if b < 248 {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// The stored form of a secret.
pub fn hash_secret(id: &str, secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ai4free.v1:");
    h.update(id.as_bytes());
    h.update(b":");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The checksum's base62 digits (on the stack: every request checks one).
fn checksum(head: &str) -> [u8; CHECK_LEN] {
    let mut n = crc32fast::hash(head.as_bytes()) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    // 62^6 > 2^32, so the CRC always fits and the encoding is fixed-width.
    out
}

/// `head` with its checksum appended: a whole key.
fn with_checksum(head: &str) -> String {
    let mut key = String::with_capacity(head.len() + CHECK_LEN);
    key.push_str(head);
    key.extend(checksum(head).iter().map(|&b| char::from(b)));
    key
}

/// Free-form key metadata: a JSON object, `{}` by default.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Per-key overrides of the tier's limits (`config::Tier`). `None` means "the tier
/// decides"; a value replaces the tier's for this key only. Stored as a JSON object
/// whose absent fields are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyLimits {
    /// Overrides `requests_per_second`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Overrides `requests_per_minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Overrides `requests_per_hour`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u32>,
    /// Overrides `requests_per_day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u32>,
    /// Overrides `tokens_per_minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Overrides `tokens_per_day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Overrides `max_concurrent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Overrides `default_max_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u32>,
    /// Overrides `spend_usd_per_day` (stored as micro-USD).
    #[serde(with = "usd_micros", skip_serializing_if = "Option::is_none")]
    pub spend_usd_per_day: Option<UsdAmount>,
    /// Overrides `spend_usd_per_month` (stored as micro-USD).
    #[serde(with = "usd_micros", skip_serializing_if = "Option::is_none")]
    pub spend_usd_per_month: Option<UsdAmount>,
}

/// `Option<UsdAmount>` as an integer count of micro-USD, exact (never a float).
mod usd_micros {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::UsdAmount;

    pub fn serialize<S: Serializer>(v: &Option<UsdAmount>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.serialize_u64(a.micros),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UsdAmount>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(|micros| UsdAmount { micros }))
    }
}

impl KeyLimits {
    /// Whether no limit is overridden.
    pub fn is_empty(&self) -> bool {
        *self == KeyLimits::default()
    }
}

/// A key as the stores keep it. `secret_hash` (and `previous_secret_hash` during a
/// rotation's grace period) is the only trace of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public, permanent id (survives rotation).
    pub id: String,
    /// Human-friendly label.
    pub name: Option<String>,
    /// The user the key belongs to.
    pub owner: Option<String>,
    /// The project the key belongs to.
    pub project: Option<String>,
    /// Tier name (a key of `tiers:` in the config).
    pub tier: String,
    /// Allowed models; empty means every configured model.
    pub models: Vec<String>,
    /// Free-form JSON object attached by the operator.
    pub metadata: Metadata,
    /// Per-key overrides of the tier's limits.
    pub limits: KeyLimits,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Expiry time, Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    /// Revocation time, Unix milliseconds.
    pub revoked_at_ms: Option<i64>,
    /// Last time the key was used, Unix ms; updated lazily in batches, so it may lag.
    pub last_used_at_ms: Option<i64>,
    /// SHA-256 of the secret (see [`hash_secret`]).
    pub secret_hash: [u8; 32],
    /// The hash the last rotation replaced; accepted while `now <
    /// previous_valid_until_ms` (see [`KeyRecord::secret_matches`]).
    pub previous_secret_hash: Option<[u8; 32]>,
    /// End of the previous secret's grace period, Unix ms (None = no grace).
    pub previous_valid_until_ms: Option<i64>,
    /// Monotonic change counter assigned by the store; lets nodes poll for changes.
    pub rev: i64,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No hashes: a Debug print must not help anyone match a leaked secret.
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("project", &self.project)
            .field("tier", &self.tier)
            .field("models", &self.models)
            .field("metadata", &self.metadata)
            .field("limits", &self.limits)
            .field("created_at_ms", &self.created_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .field("last_used_at_ms", &self.last_used_at_ms)
            .field("previous_valid_until_ms", &self.previous_valid_until_ms)
            .field("rev", &self.rev)
            .finish_non_exhaustive()
    }
}

/// The lifecycle state of a key at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    /// Parses the lower-case name (`active`, `revoked`, `expired`).
    pub fn parse(s: &str) -> Option<KeyStatus> {
        match s {
            "active" => Some(KeyStatus::Active),
            "revoked" => Some(KeyStatus::Revoked),
            "expired" => Some(KeyStatus::Expired),
            _ => None,
        }
    }

    /// Lower-case name used in the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

impl KeyRecord {
    /// A new, unrevoked key with no name, owner, project, model list, metadata or
    /// limit overrides; set those with struct update syntax.
    pub fn new(id: String, tier: String, secret_hash: [u8; 32], created_at_ms: i64) -> KeyRecord {
        KeyRecord {
            id,
            name: None,
            owner: None,
            project: None,
            tier,
            models: Vec::new(),
            metadata: Metadata::new(),
            limits: KeyLimits::default(),
            created_at_ms,
            expires_at_ms: None,
            revoked_at_ms: None,
            last_used_at_ms: None,
            secret_hash,
            previous_secret_hash: None,
            previous_valid_until_ms: None,
            rev: 0,
        }
    }

    /// Whether `presented` (the hash of a presented secret) opens this key at `now_ms`:
    /// the current secret always, the one a rotation replaced only while `now_ms <
    /// previous_valid_until_ms`. Both comparisons always run, in constant time, so
    /// timing shows neither which hash matched nor whether a grace period is open.
    pub fn secret_matches(&self, presented: &[u8; 32], now_ms: i64) -> bool {
        let current = hashes_equal(presented, &self.secret_hash);
        let previous = self
            .previous_secret_hash
            .as_ref()
            .map(|h| hashes_equal(presented, h))
            .unwrap_or(false);
        let in_grace = self.previous_valid_until_ms.is_some_and(|t| now_ms < t);
        current | (previous & in_grace)
    }

    /// The key's state at `now_ms`. Revocation wins over expiry.
    pub fn status(&self, now_ms: i64) -> KeyStatus {
        if self.revoked_at_ms.is_some_and(|t| t <= now_ms) {
            KeyStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|t| t <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// Whether this key may call `model` (the name as the client sent it, or the
    /// `provider/model` form).
    pub fn allows_model(&self, requested: &str, canonical: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == requested || m == canonical)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash() {
        let k = generate().unwrap();
        assert_eq!(k.key.len(), KEY_LEN);
        assert!(k.key.starts_with("a4f_"));
        let p = parse(&k.key).unwrap();
        assert_eq!(p.id, k.id);
        assert!(hashes_equal(&hash_secret(p.id, p.secret), &k.secret_hash));
        assert!(!format!("{k:?}").contains(&k.key[17..]));
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let k = generate().unwrap();
        let bytes = k.key.as_bytes();
        for i in KEY_PREFIX.len()..bytes.len() {
            if bytes[i] == b'_' {
                continue;
            }
            let mut m = bytes.to_vec();
            m[i] = if m[i] == b'a' { b'b' } else { b'a' };
            let s = String::from_utf8(m).unwrap();
            assert!(parse(&s).is_err(), "typo at {i} accepted");
        }
    }

    #[test]
    fn malformed_inputs() {
        assert_eq!(parse(""), Err(FormatError::Prefix));
        assert_eq!(parse("sk-proj-abc"), Err(FormatError::Prefix));
        assert_eq!(parse("a4f_short"), Err(FormatError::Length));
        let k = generate().unwrap();
        let mut s = k.key.clone();
        s.replace_range(20..21, "é");
        assert!(parse(&s).is_err());
        let long = format!("{}x", k.key);
        assert_eq!(parse(&long), Err(FormatError::Length));
    }

    #[test]
    fn ids_are_uniform_base62() {
        let s = random_base62(10_000).unwrap();
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
        // every symbol shows up in 10k draws (probability of a miss is ~1e-68)
        for c in ALPHABET.iter() {
            assert!(s.as_bytes().contains(c));
        }
    }

    #[test]
    fn status_and_models() {
        let mut r = KeyRecord {
            expires_at_ms: Some(100),
            rev: 1,
            ..KeyRecord::new("x".into(), "free".into(), [0; 32], 0)
        };
        assert_eq!(r.status(99), KeyStatus::Active);
        assert_eq!(r.status(100), KeyStatus::Expired);
        r.revoked_at_ms = Some(50);
        assert_eq!(r.status(60), KeyStatus::Revoked);
        assert!(r.allows_model("a", "p/a"));
        r.models = vec!["p/a".into()];
        assert!(r.allows_model("a", "p/a"));
        assert!(!r.allows_model("b", "p/b"));
    }

    #[test]
    fn previous_secret_opens_the_key_only_within_its_grace() {
        let old = hash_secret("id", "old-secret");
        let new = hash_secret("id", "new-secret");
        let other = hash_secret("id", "someone-else");
        let mut r = KeyRecord {
            previous_secret_hash: Some(old),
            previous_valid_until_ms: Some(1_000),
            ..KeyRecord::new("id".into(), "free".into(), new, 0)
        };
        assert!(r.secret_matches(&new, 0));
        assert!(r.secret_matches(&new, i64::MAX));
        assert!(r.secret_matches(&old, 999));
        assert!(!r.secret_matches(&old, 1_000), "grace ends at its instant");
        assert!(!r.secret_matches(&old, 5_000));
        assert!(!r.secret_matches(&other, 0));
        // A rotation without grace keeps the hash but never accepts it.
        r.previous_valid_until_ms = None;
        assert!(!r.secret_matches(&old, 0));
        assert!(!r.secret_matches(&old, i64::MIN));
        r.previous_secret_hash = None;
        r.previous_valid_until_ms = Some(i64::MAX);
        assert!(!r.secret_matches(&old, 0));
        assert!(r.secret_matches(&new, 0));
    }

    #[test]
    fn debug_shows_no_hash() {
        let r = KeyRecord {
            previous_secret_hash: Some([0xcd; 32]),
            ..KeyRecord::new("id".into(), "free".into(), [0xab; 32], 0)
        };
        let text = format!("{r:?}");
        assert!(!text.contains("secret_hash"), "{text}");
        assert!(!text.contains("171") && !text.contains("205"), "{text}");
    }

    #[test]
    fn limits_serialize_sparse_and_exact() {
        assert_eq!(serde_json::to_string(&KeyLimits::default()).unwrap(), "{}");
        assert!(KeyLimits::default().is_empty());
        let l = KeyLimits {
            requests_per_minute: Some(60),
            tokens_per_day: Some(u64::MAX),
            spend_usd_per_month: Some(UsdAmount { micros: 12_345_678 }),
            ..KeyLimits::default()
        };
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(
            text,
            r#"{"requests_per_minute":60,"tokens_per_day":18446744073709551615,"spend_usd_per_month":12345678}"#
        );
        assert_eq!(serde_json::from_str::<KeyLimits>(&text).unwrap(), l);
        assert!(serde_json::from_str::<KeyLimits>(r#"{"rpm":1}"#).is_err());
        assert!(serde_json::from_str::<KeyLimits>(r#"{"spend_usd_per_day":-1}"#).is_err());
    }

    #[test]
    fn status_names_round_trip() {
        for s in [KeyStatus::Active, KeyStatus::Revoked, KeyStatus::Expired] {
            assert_eq!(KeyStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyStatus::parse("Active"), None);
    }
}
