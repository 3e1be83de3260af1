//! One handler per admin operation: read the request, run the operation
//! ([`crate::admin::ops`] for key changes, the store for reads), render with the
//! views.

use serde_json::{json, Value};

use super::{query, AdminApi, AdminError, Reply};
use crate::admin::edit::parse_grace_seconds;
use crate::admin::ops::{Issued, KeyOps, OpError};
use crate::admin::report::{report_csv, report_json, Format, ReportParams, Scope};
use crate::admin::view::key_json;
use crate::store::StoreError;
use crate::usage::now_ms;

/// The actor recorded for calls made with the admin token.
pub const ACTOR: &str = "admin";

fn store_err(e: StoreError) -> AdminError {
    AdminError::from_store(e, "body")
}

/// The body as JSON; an empty body is JSON `null` (the handlers say what they need).
fn json_body(body: &[u8]) -> Result<Value, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| AdminError::InvalidJson(e.to_string()))
}

impl From<OpError> for AdminError {
    fn from(e: OpError) -> AdminError {
        match e {
            OpError::Field(f) => AdminError::Field(f),
            OpError::UnknownKey => AdminError::UnknownKey,
            OpError::NoRandomness(e) => {
                log::error!("admin API: no randomness for a new secret: {e}");
                AdminError::Internal
            }
            OpError::Store(e) => store_err(e),
        }
    }
}

impl AdminApi {
    fn ops(&self) -> KeyOps<'_> {
        KeyOps {
            store: self.store.as_ref(),
            config: &self.config,
            actor: ACTOR,
        }
    }

    /// Applies the change to this node's key cache now (other nodes follow the
    /// change feed within `keys.refresh_interval_ms`).
    async fn keys_changed(&self) {
        if let Err(e) = self.keys.refresh().await {
            log::warn!("admin API: key cache refresh failed (the refresher will retry): {e}");
        }
    }

    /// The reply of create and rotate: the key, with its secret, this once.
    fn issued(status: u16, issued: Issued, now: i64) -> Reply {
        let mut v = key_json(&issued.record, now);
        v["key"] = Value::String(issued.key);
        Reply::json(status, &v)
    }

    pub(super) async fn create_key(&self, body: &[u8]) -> Result<Reply, AdminError> {
        let now = now_ms();
        let issued = self.ops().create(&json_body(body)?, now).await?;
        self.keys_changed().await;
        let location = format!("/admin/keys/{}", issued.record.id);
        Ok(Self::issued(201, issued, now).with_header("location", location))
    }

    pub(super) async fn list_keys(&self, q: &str) -> Result<Reply, AdminError> {
        let now = now_ms();
        let (filter, page) = query::key_list(&query::pairs(q), now).map_err(AdminError::Field)?;
        let found = self
            .store
            .find_keys(&filter, page.limit, page.cursor.as_deref())
            .await
            .map_err(|e| AdminError::from_store(e, "cursor"))?;
        let data: Vec<Value> = found.keys.iter().map(|k| key_json(k, now)).collect();
        Ok(Reply::json(
            200,
            &json!({"object": "list", "data": data, "next_cursor": found.next_cursor}),
        ))
    }

    pub(super) async fn get_key(&self, id: &str) -> Result<Reply, AdminError> {
        let k = self
            .store
            .get_key(id)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::UnknownKey)?;
        Ok(Reply::json(200, &key_json(&k, now_ms())))
    }

    pub(super) async fn update_key(&self, id: &str, body: &[u8]) -> Result<Reply, AdminError> {
        let now = now_ms();
        let k = self.ops().update(id, &json_body(body)?, now).await?;
        self.keys_changed().await;
        Ok(Reply::json(200, &key_json(&k, now)))
    }

    pub(super) async fn revoke_key(&self, id: &str) -> Result<Reply, AdminError> {
        let now = now_ms();
        let k = self.ops().revoke(id, now).await?;
        self.keys_changed().await;
        Ok(Reply::json(200, &key_json(&k, now)))
    }

    pub(super) async fn rotate_key(&self, id: &str, body: &[u8]) -> Result<Reply, AdminError> {
        let grace = parse_grace_seconds(&json_body(body)?).map_err(AdminError::Field)?;
        let now = now_ms();
        let issued = self.ops().rotate(id, grace, now).await?;
        self.keys_changed().await;
        Ok(Self::issued(200, issued, now))
    }

    pub(super) async fn list_audit(&self, q: &str) -> Result<Reply, AdminError> {
        let (aq, page) = query::audit_list(&query::pairs(q)).map_err(AdminError::Field)?;
        let found = self
            .store
            .list_audit(&aq, page.limit, page.cursor.as_deref())
            .await
            .map_err(|e| AdminError::from_store(e, "cursor"))?;
        let data: Vec<Value> = found.entries.iter().map(query::audit_json).collect();
        Ok(Reply::json(
            200,
            &json!({"object": "list", "data": data, "next_cursor": found.next_cursor}),
        ))
    }

    pub(super) async fn usage(&self, q: &str) -> Result<Reply, AdminError> {
        let pairs = query::pairs(q);
        let params = ReportParams::parse(
            pairs.iter().map(|(n, v)| (n.as_ref(), v.as_ref())),
            Scope::Admin,
        )
        .map_err(AdminError::Field)?;
        let rows = self
            .store
            .usage_rollup(&params.query)
            .await
            .map_err(|e| AdminError::from_store(e, "query"))?;
        Ok(match params.format {
            Format::Json => Reply::json(200, &report_json(&rows, &params)),
            Format::Csv => {
                let name = format!(
                    "attachment; filename=\"ai4free-usage-by-{}.csv\"",
                    params.query.group_by.as_str()
                );
                Reply {
                    status: 200,
                    content_type: "text/csv; charset=utf-8",
                    body: report_csv(&rows, &params).into_bytes(),
                    headers: vec![("content-disposition", name)],
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::admin::edit::patched_fields;
    use crate::store::KeyPatch;

    #[test]
    fn empty_bodies_are_null_and_bad_json_names_the_body() {
        assert_eq!(json_body(b"").unwrap(), Value::Null);
        assert_eq!(json_body(b" \n").unwrap(), Value::Null);
        assert_eq!(json_body(b"{\"a\":1}").unwrap()["a"], 1);
        let e = json_body(b"{nope").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.param(), Some("body"));
        // The patch audit names fields, never their values.
        let p = KeyPatch {
            tier: Some("pro".into()),
            metadata: Some(Default::default()),
            ..KeyPatch::default()
        };
        assert_eq!(patched_fields(&p), ["tier", "metadata"]);
    }
}
