//! Admin tokens: read once from the environment at start-up, kept only as
//! SHA-256 digests, and compared in constant time.
//!
//! Hashing both sides first makes the comparison independent of the presented
//! token's length, and a digest in memory is useless to anyone reading a core dump.

use sha2::{Digest, Sha256};

use crate::config::AdminSettings;
use crate::keys::hashes_equal;

/// Shortest token accepted, in bytes: anything shorter is guessable.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Who a request authenticated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The admin token: every call.
    Full,
    /// The read-only token: GET calls only.
    ReadOnly,
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is neither.
    Invalid,
}

/// The digests of the configured tokens.
#[derive(Clone)]
pub struct AdminTokens {
    full: [u8; 32],
    readonly: Option<[u8; 32]>,
}

// Digests only, but a Debug print has no reason to show even those.
impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTokens")
            .field("readonly", &self.readonly.is_some())
            .finish_non_exhaustive()
    }
}

/// A token variable whose value cannot be used. Names the variable, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the admin token in ${0} is shorter than {MIN_TOKEN_BYTES} bytes; use a long random value (e.g. openssl rand -hex 32)")]
    TooShort(String),
    #[error(
        "${0} holds the same token as ${1}; the read-only token must differ from the admin token"
    )]
    Same(String, String),
}

impl AdminTokens {
    /// Reads the tokens through `get` (the process environment in production).
    /// `Ok(None)`: the admin token variable is unset or empty, so the admin API
    /// stays off. An empty read-only variable means no read-only token.
    pub fn from_env(
        settings: &AdminSettings,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<AdminTokens>, TokenError> {
        let read = |name: &str| -> Result<Option<[u8; 32]>, TokenError> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) if v.len() < MIN_TOKEN_BYTES => Err(TokenError::TooShort(name.to_owned())),
                Some(v) => Ok(Some(digest(v.as_bytes()))),
            }
        };
        let Some(full) = read(&settings.token_env)? else {
            return Ok(None);
        };
        let readonly = read(&settings.readonly_token_env)?;
        if readonly.is_some_and(|r| hashes_equal(&r, &full)) {
            return Err(TokenError::Same(
                settings.readonly_token_env.clone(),
                settings.token_env.clone(),
            ));
        }
        Ok(Some(AdminTokens { full, readonly }))
    }

    /// Who the `Authorization` header value authenticates as. Only the `Bearer`
    /// scheme is accepted. Both digests are always compared.
    pub fn check(&self, authorization: Option<&[u8]>) -> Access {
        let Some(token) = authorization.and_then(bearer) else {
            return Access::Missing;
        };
        let presented = digest(token);
        let full = hashes_equal(&presented, &self.full);
        let readonly = self
            .readonly
            .as_ref()
            .is_some_and(|r| hashes_equal(&presented, r));
        if full {
            Access::Full
        } else if readonly {
            Access::ReadOnly
        } else {
            Access::Invalid
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ai4free.admin.v1:");
    h.update(token);
    h.finalize().into()
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    let v = value.trim_ascii();
    if v.len() <= SCHEME.len() || !v[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = v[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FULL: &str = "full-token-0123456789";
    const RO: &str = "readonly-token-0123456789";

    fn settings() -> AdminSettings {
        AdminSettings {
            listen: None,
            token_env: "T_FULL".into(),
            readonly_token_env: "T_RO".into(),
        }
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn unset_or_empty_admin_token_means_off() {
        assert!(AdminTokens::from_env(&settings(), env(&[]))
            .unwrap()
            .is_none());
        assert!(
            AdminTokens::from_env(&settings(), env(&[("T_FULL", ""), ("T_RO", RO)]))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn short_or_shared_tokens_are_errors_naming_the_variable_only() {
        let e = AdminTokens::from_env(&settings(), env(&[("T_FULL", "short-secret")])).unwrap_err();
        assert_eq!(e, TokenError::TooShort("T_FULL".into()));
        let text = e.to_string();
        assert!(
            text.contains("$T_FULL") && !text.contains("short-secret"),
            "{text}"
        );
        let e = AdminTokens::from_env(&settings(), env(&[("T_FULL", FULL), ("T_RO", "tiny")]))
            .unwrap_err();
        assert_eq!(e, TokenError::TooShort("T_RO".into()));
        let e = AdminTokens::from_env(&settings(), env(&[("T_FULL", FULL), ("T_RO", FULL)]))
            .unwrap_err();
        assert!(matches!(e, TokenError::Same(..)));
        assert!(!e.to_string().contains(FULL));
    }

    #[test]
    fn check_tells_full_readonly_missing_and_invalid_apart() {
        let t = AdminTokens::from_env(&settings(), env(&[("T_FULL", FULL), ("T_RO", RO)]))
            .unwrap()
            .unwrap();
        let h = |s: String| t.check(Some(s.as_bytes()));
        assert_eq!(h(format!("Bearer {FULL}")), Access::Full);
        assert_eq!(h(format!("bearer  {FULL} ")), Access::Full);
        assert_eq!(h(format!("Bearer {RO}")), Access::ReadOnly);
        assert_eq!(h(format!("Bearer {FULL}x")), Access::Invalid);
        assert_eq!(
            h("Bearer a4f_abcdefghijkl_0123456789012345678901abcdef".into()),
            Access::Invalid
        );
        assert_eq!(h(FULL.to_owned()), Access::Missing);
        assert_eq!(h(format!("Basic {FULL}")), Access::Missing);
        assert_eq!(h("Bearer ".into()), Access::Missing);
        assert_eq!(t.check(None), Access::Missing);
        assert!(!format!("{t:?}").contains(&format!("{:?}", t.full)));
    }

    #[test]
    fn without_a_readonly_token_nothing_is_readonly() {
        let t = AdminTokens::from_env(&settings(), env(&[("T_FULL", FULL)]))
            .unwrap()
            .unwrap();
        assert_eq!(
            t.check(Some(format!("Bearer {RO}").as_bytes())),
            Access::Invalid
        );
    }
}
