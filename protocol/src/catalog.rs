//! The inspectable locations an agent knows of.
//!
//! An agent publishes a location the first time its code runs (for `tracing`, when a
//! callsite registers), so a catalog grows as the service warms up. Updates are
//! incremental: an entry is identified by `(file, line, kind, name)` and a later copy
//! replaces an earlier one (hit counts move on).

use serde::{Deserialize, Serialize};

/// One inspectable location.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Source file as compiled into the program.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// Span or event (for other languages: function entry or line).
    pub kind: LocationKind,
    /// Callsite name: the span's name, or the event's generated name.
    pub name: String,
    /// Module path, logger name or target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Level the callsite was written with (`info`, `debug`, ...), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Names of the values available there, which conditions and watches can use.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Times the location fired while the agent observed it (while any action was
    /// live on it); zero does not mean it never ran.
    #[serde(default)]
    pub hits: u64,
}

impl CatalogEntry {
    /// The identity used to merge incremental updates.
    pub fn key(&self) -> (&str, u32, LocationKind, &str) {
        (&self.file, self.line, self.kind, &self.name)
    }
}

/// What sort of callsite a location is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationKind {
    /// A span: fires when it is entered; has a duration.
    Span,
    /// An event (a log statement): fires once.
    Event,
}
