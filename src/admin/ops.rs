//! The key lifecycle operations, run the same way by every front end: validate
//! with [`super::edit`], write to the store, record the audit entry.
//!
//! The admin API and the CLI differ only in how they read their input (JSON
//! bodies, flags turned into the same JSON) and how they show the result; what a
//! create, update, revoke or rotate does, and what it audits, lives here once.

use serde_json::{json, Value};

use super::edit::{parse_new_key, parse_patch, patched_fields};
use super::FieldError;
use crate::config::Config;
use crate::keys::{self, KeyRecord};
use crate::store::{AuditEntry, Store, StoreError};
use crate::usage::rfc3339_ms;

/// Why an operation did not happen.
#[derive(Debug)]
pub enum OpError {
    /// The input names something unusable.
    Field(FieldError),
    /// No key has this id.
    UnknownKey,
    /// The system has no randomness for a secret.
    NoRandomness(String),
    /// The store refused or failed (`Conflict`: rotating a revoked key).
    Store(StoreError),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        OpError::Store(e)
    }
}

/// A key with the secret made for it, to be shown once and then forgotten.
pub struct Issued {
    /// The key as stored.
    pub record: KeyRecord,
    /// The full key string (`a4f-…`), never stored or logged.
    pub key: String,
}

// No Debug derive: `key` is a secret.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// The operations, as one actor (`admin`, `cli`) on one store.
pub struct KeyOps<'a> {
    /// Where keys and the audit log live.
    pub store: &'a dyn Store,
    /// What tiers and models exist.
    pub config: &'a Config,
    /// Who the audit log says acted.
    pub actor: &'static str,
}

impl KeyOps<'_> {
    /// Creates a key from a `POST /admin/keys` body.
    pub async fn create(&self, body: &Value, now_ms: i64) -> Result<Issued, OpError> {
        let new = parse_new_key(body, self.config, now_ms).map_err(OpError::Field)?;
        let k = keys::generate().map_err(|e| OpError::NoRandomness(e.to_string()))?;
        let record = KeyRecord {
            name: new.name,
            owner: new.owner,
            project: new.project,
            models: new.models,
            metadata: new.metadata,
            limits: new.limits,
            expires_at_ms: new.expires_at_ms,
            ..KeyRecord::new(k.id.clone(), new.tier, k.secret_hash, now_ms)
        };
        self.store.insert_key(&record).await?;
        self.audit(
            "key.create",
            &record.id,
            json!({
                "tier": record.tier,
                "owner": record.owner,
                "project": record.project,
                "expires_at": record.expires_at_ms.map(rfc3339_ms),
            }),
        )
        .await;
        Ok(Issued { record, key: k.key })
    }

    /// Applies a `PATCH /admin/keys/{id}` body.
    pub async fn update(&self, id: &str, body: &Value, now_ms: i64) -> Result<KeyRecord, OpError> {
        let patch = parse_patch(body, self.config, now_ms).map_err(OpError::Field)?;
        let k = self
            .store
            .update_key(id, &patch)
            .await?
            .ok_or(OpError::UnknownKey)?;
        // Field names and the two values that matter for access; never metadata values.
        let mut detail = json!({ "fields": patched_fields(&patch) });
        if let Some(t) = &patch.tier {
            detail["tier"] = Value::String(t.clone());
        }
        if let Some(e) = patch.expires_at_ms {
            detail["expires_at"] = e.map(rfc3339_ms).into();
        }
        self.audit("key.update", id, detail).await;
        Ok(k)
    }

    /// Revokes a key (again revoking a revoked key keeps its first time).
    pub async fn revoke(&self, id: &str, now_ms: i64) -> Result<KeyRecord, OpError> {
        if !self.store.revoke_key(id, now_ms).await? {
            return Err(OpError::UnknownKey);
        }
        let k = self.store.get_key(id).await?.ok_or(OpError::UnknownKey)?;
        self.audit(
            "key.revoke",
            id,
            json!({ "revoked_at": k.revoked_at_ms.map(rfc3339_ms) }),
        )
        .await;
        Ok(k)
    }

    /// Gives a key a new secret; the old one keeps working for `grace_seconds`
    /// (validated by [`super::edit::parse_grace_seconds`]).
    pub async fn rotate(
        &self,
        id: &str,
        grace_seconds: u64,
        now_ms: i64,
    ) -> Result<Issued, OpError> {
        let fresh = keys::generate_for(id).map_err(|e| OpError::NoRandomness(e.to_string()))?;
        let grace_ms = i64::try_from(grace_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let until = (grace_seconds > 0).then(|| now_ms.saturating_add(grace_ms));
        let record = self
            .store
            .rotate_key(id, &fresh.secret_hash, until)
            .await?
            .ok_or(OpError::UnknownKey)?;
        self.audit("key.rotate", id, json!({ "grace_seconds": grace_seconds }))
            .await;
        Ok(Issued {
            record,
            key: fresh.key,
        })
    }

    /// Records a change. A failure is logged, not returned: the change is made,
    /// and a create or rotate must still hand out the secret it made, once.
    async fn audit(&self, action: &'static str, target: &str, detail: Value) {
        let entry = AuditEntry {
            id: 0,
            at_ms: crate::usage::now_ms(),
            actor: self.actor.to_owned(),
            action: action.to_owned(),
            target: Some(target.to_owned()),
            detail,
        };
        if let Err(e) = self.store.insert_audit(&entry).await {
            log::error!(
                "{}: {action} on key {target} done but not audited: {e}",
                self.actor
            );
        }
    }
}
