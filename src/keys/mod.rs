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

use sha2::{Digest, Sha256};

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
    if expected.as_bytes() != &bytes[check_start..] {
        return Err(FormatError::Checksum);
    }
    Ok(ParsedKey {
        id: &presented[id_start..sep],
        secret: &presented[sep + 1..check_start],
    })
}

/// Generates a new key from the operating system's CSPRNG.
pub fn generate() -> Result<NewKey, getrandom::Error> {
    let id = random_base62(ID_LEN)?;
    let secret = random_base62(SECRET_LEN)?;
    let head = format!("{KEY_PREFIX}{id}_{secret}");
    let key = format!("{head}{}", checksum(&head));
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

fn checksum(head: &str) -> String {
    let mut n = crc32fast::hash(head.as_bytes()) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    // 62^6 > 2^32, so the CRC always fits and the encoding is fixed-width.
    out.iter().map(|&b| b as char).collect()
}

/// A key as the stores keep it. `secret_hash` is the only trace of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public, permanent id.
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
    /// Creation time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Expiry time, Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    /// Revocation time, Unix milliseconds.
    pub revoked_at_ms: Option<i64>,
    /// SHA-256 of the secret (see [`hash_secret`]).
    pub secret_hash: [u8; 32],
    /// Monotonic change counter assigned by the store; lets nodes poll for changes.
    pub rev: i64,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("project", &self.project)
            .field("tier", &self.tier)
            .field("models", &self.models)
            .field("created_at_ms", &self.created_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
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
            id: "x".into(),
            name: None,
            owner: None,
            project: None,
            tier: "free".into(),
            models: vec![],
            created_at_ms: 0,
            expires_at_ms: Some(100),
            revoked_at_ms: None,
            secret_hash: [0; 32],
            rev: 1,
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
}
