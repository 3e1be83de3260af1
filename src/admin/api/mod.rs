//! The admin API: key lifecycle, audit log and usage reports for operators, on
//! its own listener (`admin_listen`), never on the proxy port.
//!
//! [`AdminApi`] is a Pingora `ServeHttp` app. The shell ([`ServeHttp::response`])
//! only moves bytes: it authenticates and routes on the request head
//! ([`AdminApi::admit`]), reads a bounded body only for an admitted call, and
//! hands both to [`AdminApi::call`], whose handlers ([`handlers`]) are thin IO
//! over the pure cores in [`crate::admin`] (`edit`, `view`, `report`) and
//! [`query`]. Every mutating call is audited; reads are not.

mod auth;
mod error;
mod handlers;
pub mod query;
pub mod routes;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{header, HeaderValue, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::v1::common::is_expect_continue_req;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

pub use auth::{Access, AdminTokens, TokenError, MIN_TOKEN_BYTES};
pub use error::AdminError;
pub use routes::{NoRoute, Op, Route, ROUTES};

use crate::config::Config;
use crate::keys::cache::KeyCache;
use crate::store::Store;

/// Largest request body accepted (a key's metadata is capped at 16 KiB, so this
/// is generous and still bounds what an admitted caller can make us buffer).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The OpenAPI 3.1 document served at `/admin/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// The admin API's state: what it reads and changes.
pub struct AdminApi {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    keys: Arc<KeyCache>,
    tokens: AdminTokens,
}

/// A response before it becomes an `http::Response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// Further headers (`Allow`, `Location`, `Content-Disposition`, ...).
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).unwrap_or_default(),
            headers: Vec::new(),
        }
    }

    /// The error's status, JSON body and headers.
    pub fn error(e: &AdminError) -> Reply {
        Reply {
            headers: e.headers(),
            ..Reply::json(e.status(), &e.body())
        }
    }

    fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    fn into_response(self) -> Response<Vec<u8>> {
        let mut r = Response::new(self.body);
        *r.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        // Bodies can carry a key's secret (create, rotate): never cache them.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let len = r.body().len();
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(name, v);
            }
        }
        r
    }
}

impl AdminApi {
    /// An API over `store` with `tokens`; `keys` is this node's key cache, told
    /// about every change at once so the proxy here applies it without waiting
    /// for the change feed.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        keys: Arc<KeyCache>,
        tokens: AdminTokens,
    ) -> AdminApi {
        AdminApi {
            config,
            store,
            keys,
            tokens,
        }
    }

    /// Authenticates and routes a request from its head alone, so no body is
    /// read for a caller that may not make the call.
    pub fn admit<'p>(
        &self,
        method: &str,
        path: &'p str,
        authorization: Option<&[u8]>,
    ) -> Result<(Op, Option<&'p str>), AdminError> {
        let access = self.tokens.check(authorization);
        match access {
            Access::Missing => return Err(AdminError::MissingToken),
            Access::Invalid => return Err(AdminError::InvalidToken),
            Access::Full | Access::ReadOnly => {}
        }
        let (op, id) = routes::route(method, path).map_err(|e| match e {
            NoRoute::NotFound => AdminError::NotFound,
            NoRoute::MethodNotAllowed(allow) => AdminError::MethodNotAllowed(allow),
        })?;
        if op.mutates() && access != Access::Full {
            return Err(AdminError::ReadOnly);
        }
        Ok((op, id))
    }

    /// Runs an admitted call.
    pub async fn call(
        &self,
        op: Op,
        id: Option<&str>,
        query: &str,
        body: &[u8],
    ) -> Result<Reply, AdminError> {
        let id = || id.ok_or(AdminError::Internal);
        match op {
            Op::CreateKey => self.create_key(body).await,
            Op::ListKeys => self.list_keys(query).await,
            Op::GetKey => self.get_key(id()?).await,
            Op::UpdateKey => self.update_key(id()?, body).await,
            Op::RevokeKey => self.revoke_key(id()?).await,
            Op::RotateKey => self.rotate_key(id()?, body).await,
            Op::ListAudit => self.list_audit(query).await,
            Op::Usage => self.usage(query).await,
            Op::OpenApi => Ok(Reply {
                status: 200,
                content_type: "application/json",
                body: OPENAPI_JSON.as_bytes().to_vec(),
                headers: Vec::new(),
            }),
        }
    }
}

/// The admin listener, or `None` when `admin_listen` is `"off"` or the admin
/// token variable is unset or empty (then one warning says what to set).
pub fn service(
    config: &Arc<Config>,
    store: Arc<dyn Store>,
    keys: Arc<KeyCache>,
) -> Result<Option<Service<AdminApi>>, TokenError> {
    let Some(addr) = config.admin.listen else {
        return Ok(None);
    };
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let Some(tokens) = AdminTokens::from_env(&config.admin, env)? else {
        log::warn!(
            "admin API not started: set {} to a random token of at least {MIN_TOKEN_BYTES} bytes to serve it on {addr}",
            config.admin.token_env
        );
        return Ok(None);
    };
    let api = AdminApi::new(config.clone(), store, keys, tokens);
    let mut s = Service::new("ai4free admin".to_owned(), api);
    s.add_tcp(&addr.to_string());
    // Operator traffic is light; one thread keeps it off the proxy's cores.
    s.threads = Some(1);
    log::info!("admin API listening on {addr}");
    Ok(Some(s))
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Pingora's HTTP app turns keep-alive on for every request before it
        // calls this, so an HTTP/1.0 client, which did not ask to keep the
        // connection, would read to a close that comes only at the idle timeout.
        if asks_to_close(session.req_header()) {
            session.set_keepalive(None);
        }
        let head = session.req_header();
        let method = head.method.as_str().to_owned();
        let path = head.uri.path().to_owned();
        let query = head.uri.query().unwrap_or("").to_owned();
        let authorization = session
            .get_header(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        let (op, id) = match self.admit(&method, &path, authorization.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                // The body stays unread: close rather than drain it for a refused caller.
                session.set_keepalive(None);
                return Reply::error(&e).into_response();
            }
        };
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(e) => {
                session.set_keepalive(None);
                return Reply::error(&e).into_response();
            }
        };
        match self.call(op, id, &query, &body).await {
            Ok(r) => r.into_response(),
            Err(e) => Reply::error(&e).into_response(),
        }
    }
}

/// Whether the client wants the connection closed after this exchange: it says
/// `close`, or it speaks HTTP/1.0 and does not say `keep-alive` (RFC 9112 §9.3).
fn asks_to_close(head: &pingora::http::RequestHeader) -> bool {
    let mut keep_alive = false;
    for token in head
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
    {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            return true;
        }
        keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    head.version == http::Version::HTTP_10 && !keep_alive
}

/// The whole body, at most [`MAX_BODY_BYTES`]; a declared length over it is
/// refused before reading a byte.
async fn read_body(session: &mut ServerSession) -> Result<BytesMut, AdminError> {
    let declared = session
        .get_header(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(AdminError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    // Pingora leaves `Expect: 100-continue` to the application: without the
    // go-ahead such a client (curl, for large bodies) waits out its own timeout.
    let unreadable = || {
        AdminError::Field(crate::admin::FieldError::new(
            "body",
            "could not be read to its end",
        ))
    };
    if is_expect_continue_req(session.req_header())
        && session.write_continue_response().await.is_err()
    {
        return Err(unreadable());
    }
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(AdminError::PayloadTooLarge(MAX_BODY_BYTES));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => return Err(unreadable()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::asks_to_close;
    use http::Version;
    use pingora::http::RequestHeader;

    fn head(version: Version, connection: &[&str]) -> RequestHeader {
        let mut h = RequestHeader::build("GET", b"/admin/keys", None).unwrap();
        h.set_version(version);
        for c in connection {
            h.append_header("Connection", *c).unwrap();
        }
        h
    }

    #[test]
    fn http_1_0_closes_unless_it_asks_to_keep_alive() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        for (version, connection, close) in [
            (HTTP_10, &[][..], true),
            (HTTP_10, &["keep-alive"][..], false),
            (HTTP_10, &["Keep-Alive"][..], false),
            (HTTP_10, &["te, keep-alive"][..], false),
            (HTTP_10, &["keep-alive", "close"][..], true),
            (HTTP_11, &[][..], false),
            (HTTP_11, &["keep-alive"][..], false),
            (HTTP_11, &["close"][..], true),
            (HTTP_11, &["TE,  Close "][..], true),
            (HTTP_11, &["closed"][..], false),
        ] {
            assert_eq!(
                asks_to_close(&head(version, connection)),
                close,
                "{version:?} {connection:?}"
            );
        }
    }
}
