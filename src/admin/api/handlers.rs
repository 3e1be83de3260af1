//! One handler per admin operation: parse with the pure cores, call the store,
//! audit what changed, render with the views.

use serde_json::{json, Value};

use super::{query, AdminApi, AdminError, Reply};
use crate::admin::edit::{parse_grace_seconds, parse_new_key, parse_patch, patched_fields};
use crate::admin::report::{report_csv, report_json, Format, ReportParams, Scope};
use crate::admin::view::key_json;
use crate::keys::{self, KeyRecord};
use crate::store::{AuditEntry, StoreError};
use crate::usage::{now_ms, rfc3339_ms};

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

impl AdminApi {
    /// Records a mutation. A failure is logged, not returned: the change is made,
    /// and a create or rotate must still hand out the secret it made, once.
    async fn audit(&self, action: &'static str, target: &str, detail: Value) {
        let entry = AuditEntry {
            id: 0,
            at_ms: now_ms(),
            actor: ACTOR.to_owned(),
            action: action.to_owned(),
            target: Some(target.to_owned()),
            detail,
        };
        if let Err(e) = self.store.insert_audit(&entry).await {
            log::error!("admin API: {action} on key {target} done but not audited: {e}");
        }
    }

    /// Applies the change to this node's key cache now (other nodes follow the
    /// change feed within `keys.refresh_interval_ms`).
    async fn keys_changed(&self) {
        if let Err(e) = self.keys.refresh().await {
            log::warn!("admin API: key cache refresh failed (the refresher will retry): {e}");
        }
    }

    pub(super) async fn create_key(&self, body: &[u8]) -> Result<Reply, AdminError> {
        let now = now_ms();
        let new = parse_new_key(&json_body(body)?, &self.config, now).map_err(AdminError::Field)?;
        let k = keys::generate().map_err(|e| {
            log::error!("admin API: no randomness for a new key: {e}");
            AdminError::Internal
        })?;
        let rec = KeyRecord {
            name: new.name,
            owner: new.owner,
            project: new.project,
            models: new.models,
            metadata: new.metadata,
            limits: new.limits,
            expires_at_ms: new.expires_at_ms,
            ..KeyRecord::new(k.id.clone(), new.tier, k.secret_hash, now)
        };
        self.store.insert_key(&rec).await.map_err(store_err)?;
        self.audit(
            "key.create",
            &rec.id,
            json!({
                "tier": rec.tier,
                "owner": rec.owner,
                "project": rec.project,
                "expires_at": rec.expires_at_ms.map(rfc3339_ms),
            }),
        )
        .await;
        self.keys_changed().await;
        let mut v = key_json(&rec, now);
        v["key"] = Value::String(k.key);
        Ok(Reply::json(201, &v).with_header("location", format!("/admin/keys/{}", rec.id)))
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
        let patch = parse_patch(&json_body(body)?, &self.config, now).map_err(AdminError::Field)?;
        let k = self
            .store
            .update_key(id, &patch)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::UnknownKey)?;
        let mut detail = json!({ "fields": patched_fields(&patch) });
        if let Some(t) = &patch.tier {
            detail["tier"] = Value::String(t.clone());
        }
        if let Some(e) = patch.expires_at_ms {
            detail["expires_at"] = e.map(rfc3339_ms).into();
        }
        self.audit("key.update", id, detail).await;
        self.keys_changed().await;
        Ok(Reply::json(200, &key_json(&k, now)))
    }

    pub(super) async fn revoke_key(&self, id: &str) -> Result<Reply, AdminError> {
        let now = now_ms();
        if !self.store.revoke_key(id, now).await.map_err(store_err)? {
            return Err(AdminError::UnknownKey);
        }
        let k = self
            .store
            .get_key(id)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::UnknownKey)?;
        self.audit(
            "key.revoke",
            id,
            json!({ "revoked_at": k.revoked_at_ms.map(rfc3339_ms) }),
        )
        .await;
        self.keys_changed().await;
        Ok(Reply::json(200, &key_json(&k, now)))
    }

    pub(super) async fn rotate_key(&self, id: &str, body: &[u8]) -> Result<Reply, AdminError> {
        let grace = parse_grace_seconds(&json_body(body)?).map_err(AdminError::Field)?;
        let now = now_ms();
        let fresh = keys::generate_for(id).map_err(|e| {
            log::error!("admin API: no randomness for a new secret: {e}");
            AdminError::Internal
        })?;
        let grace_ms = i64::try_from(grace.saturating_mul(1000)).unwrap_or(i64::MAX);
        let until = (grace > 0).then(|| now.saturating_add(grace_ms));
        let k = self
            .store
            .rotate_key(id, &fresh.secret_hash, until)
            .await
            .map_err(store_err)?
            .ok_or(AdminError::UnknownKey)?;
        self.audit("key.rotate", id, json!({ "grace_seconds": grace }))
            .await;
        self.keys_changed().await;
        let mut v = key_json(&k, now);
        v["key"] = Value::String(fresh.key);
        Ok(Reply::json(200, &v))
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
