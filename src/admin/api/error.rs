//! The admin API's error vocabulary and its one mapping to HTTP: status, OpenAI
//! error JSON (`{"error": {"message", "type", "param", "code"}}`) and extra headers.
//!
//! Messages never contain a token, a key secret or a store error's text (that is
//! logged instead, and store messages carry no secrets either).

use serde_json::json;

use crate::admin::FieldError;
use crate::store::StoreError;

/// Everything the admin API can refuse a request for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// 401: no `Authorization: Bearer` header.
    MissingToken,
    /// 401: a token that is neither admin token (a data-plane key included).
    InvalidToken,
    /// 403: the read-only token on a mutating call.
    ReadOnly,
    /// 400: a parameter or body field that cannot be used.
    Field(FieldError),
    /// 400: the body is not JSON.
    InvalidJson(String),
    /// 404: no key has this id.
    UnknownKey,
    /// 404: no route has this path.
    NotFound,
    /// 405: the path exists, not with this method; the `Allow` value.
    MethodNotAllowed(String),
    /// 413: the body is over the limit (bytes).
    PayloadTooLarge(usize),
    /// 409: the store refused a state change (e.g. rotating a revoked key).
    Conflict,
    /// 503: the store cannot answer.
    StoreUnavailable,
    /// 500: a bug or an exhausted system resource; generic on purpose.
    Internal,
}

impl AdminError {
    /// Maps a store failure; `Invalid` (a cursor the store did not issue) becomes
    /// a 400 naming `invalid_field`.
    pub fn from_store(e: StoreError, invalid_field: &str) -> AdminError {
        match e {
            StoreError::Invalid(m) => AdminError::Field(FieldError::new(invalid_field, m)),
            StoreError::NotFound => AdminError::UnknownKey,
            StoreError::Conflict(_) => AdminError::Conflict,
            StoreError::Database(_) | StoreError::Task(_) | StoreError::Unsupported(_) => {
                log::warn!("admin API: store unavailable: {e}");
                AdminError::StoreUnavailable
            }
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::MissingToken | AdminError::InvalidToken => 401,
            AdminError::ReadOnly => 403,
            AdminError::Field(_) | AdminError::InvalidJson(_) => 400,
            AdminError::UnknownKey | AdminError::NotFound => 404,
            AdminError::MethodNotAllowed(_) => 405,
            AdminError::PayloadTooLarge(_) => 413,
            AdminError::Conflict => 409,
            AdminError::StoreUnavailable => 503,
            AdminError::Internal => 500,
        }
    }

    /// `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::MissingToken => "missing_admin_token",
            AdminError::InvalidToken => "invalid_admin_token",
            AdminError::ReadOnly => "read_only_token",
            AdminError::Field(_) => "invalid_parameter",
            AdminError::InvalidJson(_) => "invalid_json",
            AdminError::UnknownKey => "key_not_found",
            AdminError::NotFound => "not_found",
            AdminError::MethodNotAllowed(_) => "method_not_allowed",
            AdminError::PayloadTooLarge(_) => "request_too_large",
            AdminError::Conflict => "conflict",
            AdminError::StoreUnavailable => "store_unavailable",
            AdminError::Internal => "internal_error",
        }
    }

    /// `error.type`, as OpenAI spells them.
    pub fn error_type(&self) -> &'static str {
        match self {
            AdminError::MissingToken | AdminError::InvalidToken => "authentication_error",
            AdminError::ReadOnly => "permission_error",
            AdminError::StoreUnavailable | AdminError::Internal => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// `error.param`: the field a 400 is about.
    pub fn param(&self) -> Option<&str> {
        match self {
            AdminError::Field(f) => Some(&f.field),
            AdminError::InvalidJson(_) => Some("body"),
            _ => None,
        }
    }

    /// `error.message`.
    pub fn message(&self) -> String {
        match self {
            AdminError::MissingToken => {
                "Missing admin token: send it as `Authorization: Bearer <token>`.".into()
            }
            AdminError::InvalidToken => "Invalid admin token.".into(),
            AdminError::ReadOnly => {
                "The read-only admin token cannot change anything; use the admin token.".into()
            }
            AdminError::Field(f) => format!("Invalid value for '{}': {}.", f.field, f.message),
            AdminError::InvalidJson(e) => format!("The body is not valid JSON: {e}."),
            AdminError::UnknownKey => "No key has this id.".into(),
            AdminError::NotFound => {
                "Unknown admin URL; GET /admin/openapi.json lists every route.".into()
            }
            AdminError::MethodNotAllowed(allow) => {
                format!("Method not allowed for this URL (allowed: {allow}).")
            }
            AdminError::PayloadTooLarge(max) => {
                format!("Request body too large: the limit is {max} bytes.")
            }
            AdminError::Conflict => "The key is revoked and cannot be changed this way.".into(),
            AdminError::StoreUnavailable => "The store is unavailable; please retry.".into(),
            AdminError::Internal => "The gateway had an internal error.".into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    /// Headers the status calls for.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            AdminError::MissingToken | AdminError::InvalidToken => {
                vec![("www-authenticate", "Bearer".into())]
            }
            AdminError::MethodNotAllowed(allow) => vec![("allow", allow.clone())],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn field_errors_name_the_param() {
        let e = AdminError::Field(FieldError::new("limit", "must be from 1 to 1000"));
        let b = e.body();
        assert_eq!(e.status(), 400);
        assert_eq!(b["error"]["param"], "limit");
        assert_eq!(b["error"]["code"], "invalid_parameter");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must be from 1 to 1000"));
    }

    #[test]
    fn store_errors_map_without_leaking_their_text() {
        let e =
            AdminError::from_store(StoreError::Database("disk I/O at /secret/path".into()), "x");
        assert_eq!(e.status(), 503);
        assert!(!e.body().to_string().contains("/secret/path"));
        let e = AdminError::from_store(StoreError::Invalid("malformed cursor".into()), "cursor");
        assert_eq!(e.status(), 400);
        assert_eq!(e.param(), Some("cursor"));
        assert_eq!(
            AdminError::from_store(StoreError::Conflict("revoked".into()), "x").status(),
            409
        );
        assert_eq!(
            AdminError::from_store(StoreError::NotFound, "x").status(),
            404
        );
    }

    #[test]
    fn auth_and_method_errors_carry_their_headers() {
        assert_eq!(
            AdminError::InvalidToken.headers(),
            [("www-authenticate", "Bearer".to_owned())]
        );
        let e = AdminError::MethodNotAllowed("GET, PATCH".into());
        assert_eq!(e.status(), 405);
        assert_eq!(e.headers(), [("allow", "GET, PATCH".to_owned())]);
        assert_eq!(AdminError::ReadOnly.status(), 403);
        assert_eq!(AdminError::PayloadTooLarge(1).status(), 413);
    }
}
