//! Redaction of PII and secrets (engine lands with its own issue).
