//! The admin API's routes: one table ([`ROUTES`]) that the router, the 405
//! `Allow` header and the OpenAPI test all read, so none of them can drift.

/// What a request asks the admin API to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `POST /admin/keys`.
    CreateKey,
    /// `GET /admin/keys`.
    ListKeys,
    /// `GET /admin/keys/{id}`.
    GetKey,
    /// `PATCH /admin/keys/{id}`.
    UpdateKey,
    /// `POST /admin/keys/{id}/revoke`.
    RevokeKey,
    /// `POST /admin/keys/{id}/rotate`.
    RotateKey,
    /// `GET /admin/audit`.
    ListAudit,
    /// `GET /admin/usage`.
    Usage,
    /// `GET /admin/openapi.json`.
    OpenApi,
}

impl Op {
    /// Whether the call changes state: refused to the read-only token, audited.
    pub fn mutates(self) -> bool {
        matches!(
            self,
            Op::CreateKey | Op::UpdateKey | Op::RevokeKey | Op::RotateKey
        )
    }
}

/// One method and path template; `{id}` matches one non-empty path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Upper-case HTTP method.
    pub method: &'static str,
    /// Path template as the OpenAPI document spells it.
    pub path: &'static str,
    /// The operation.
    pub op: Op,
}

/// Every route the admin listener serves.
pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/admin/keys",
        op: Op::CreateKey,
    },
    Route {
        method: "GET",
        path: "/admin/keys",
        op: Op::ListKeys,
    },
    Route {
        method: "GET",
        path: "/admin/keys/{id}",
        op: Op::GetKey,
    },
    Route {
        method: "PATCH",
        path: "/admin/keys/{id}",
        op: Op::UpdateKey,
    },
    Route {
        method: "POST",
        path: "/admin/keys/{id}/revoke",
        op: Op::RevokeKey,
    },
    Route {
        method: "POST",
        path: "/admin/keys/{id}/rotate",
        op: Op::RotateKey,
    },
    Route {
        method: "GET",
        path: "/admin/audit",
        op: Op::ListAudit,
    },
    Route {
        method: "GET",
        path: "/admin/usage",
        op: Op::Usage,
    },
    Route {
        method: "GET",
        path: "/admin/openapi.json",
        op: Op::OpenApi,
    },
];

/// Why a request matched no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No template matches the path.
    NotFound,
    /// The path exists; these methods (comma-separated, for `Allow`) do.
    MethodNotAllowed(String),
}

/// The route for `method` and `path` (no query string), with the `{id}` segment
/// if the template has one.
pub fn route<'p>(method: &str, path: &'p str) -> Result<(Op, Option<&'p str>), NoRoute> {
    let mut allow: Vec<&'static str> = Vec::new();
    for r in ROUTES {
        let Some(id) = matches(r.path, path) else {
            continue;
        };
        if r.method == method {
            return Ok((r.op, id));
        }
        if !allow.contains(&r.method) {
            allow.push(r.method);
        }
    }
    if allow.is_empty() {
        Err(NoRoute::NotFound)
    } else {
        Err(NoRoute::MethodNotAllowed(allow.join(", ")))
    }
}

/// `Some(id segment or None)` when `path` fits `template`.
fn matches<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut id = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(seg)) if !seg.is_empty() => id = Some(seg),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_reachable_and_ids_are_extracted() {
        for r in ROUTES {
            let path = r.path.replace("{id}", "k_123");
            let (op, id) = route(r.method, &path).unwrap();
            assert_eq!(op, r.op, "{} {}", r.method, r.path);
            assert_eq!(id.is_some(), r.path.contains("{id}"));
            if let Some(id) = id {
                assert_eq!(id, "k_123");
            }
        }
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        for p in [
            "/",
            "/admin",
            "/admin/",
            "/admin/keys/",
            "/admin/keys//revoke",
            "/admin/keys/a/b",
            "/admin/keys/a/revoke/x",
            "/v1/chat/completions",
            "/admin/keysx",
        ] {
            assert_eq!(route("GET", p), Err(NoRoute::NotFound), "{p}");
        }
        assert_eq!(
            route("DELETE", "/admin/keys"),
            Err(NoRoute::MethodNotAllowed("POST, GET".into()))
        );
        assert_eq!(
            route("DELETE", "/admin/keys/abc"),
            Err(NoRoute::MethodNotAllowed("GET, PATCH".into()))
        );
        assert_eq!(
            route("GET", "/admin/keys/abc/rotate"),
            Err(NoRoute::MethodNotAllowed("POST".into()))
        );
        assert_eq!(
            route("POST", "/admin/usage"),
            Err(NoRoute::MethodNotAllowed("GET".into()))
        );
    }

    #[test]
    fn only_writes_mutate() {
        for r in ROUTES {
            assert_eq!(r.op.mutates(), r.method != "GET", "{} {}", r.method, r.path);
        }
    }
}
