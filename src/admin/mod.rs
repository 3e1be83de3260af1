//! The key lifecycle and usage reports as operators and key holders see them.
//!
//! Pure cores shared by every front end (the admin API, the self-service
//! endpoints on the proxy port and the CLI): how a key is shown ([`view`]), how
//! an edit is validated ([`edit`]) and how a usage report is asked for and
//! rendered ([`report`]). The front ends do the IO and call these, so the three
//! can never disagree on a field name or a filter. [`api`] is the admin
//! listener itself.

pub mod api;
pub mod edit;
pub mod ops;
pub mod report;
pub mod view;

/// A request parameter that cannot be used, named by its field so the caller can
/// answer 400 (or a CLI error) that says exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The parameter or JSON field, as the client spelled it.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}
