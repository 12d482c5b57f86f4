//! The inspectable locations an agent knows of.
//!
//! An agent publishes a location the first time its code runs (for `tracing`, when a
//! callsite registers), so a catalog grows as the service warms up. Updates are
//! incremental: an entry is identified by `(file, line, kind, name)` and a later copy
//! replaces an earlier one (hit counts move on).

use serde::{Deserialize, Serialize};

use crate::value::clip_printable;

/// What one catalog entry may hold; an agent's entry is cut to these on receipt (and an
/// honest agent's always fits). Every string is also made printable.
pub mod catalog_bounds {
    /// Longest source file path, in characters.
    pub const MAX_FILE_LEN: usize = 1_024;
    /// Longest callsite name or module path, in characters.
    pub const MAX_NAME_LEN: usize = 255;
    /// Longest level name, in characters.
    pub const MAX_LEVEL_LEN: usize = 16;
    /// Most field names per location (a `tracing` callsite has at most 32).
    pub const MAX_FIELDS: usize = 64;
    /// Longest field name, in characters.
    pub const MAX_FIELD_NAME_LEN: usize = 128;
    /// What a string costs beyond its bytes (its header and the allocator's rounding),
    /// when a catalog's memory is counted.
    pub const STRING_OVERHEAD: usize = 32;
    /// What an entry costs beyond its strings.
    pub const ENTRY_OVERHEAD: usize = 96;
}

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

    /// Cuts every string and list to [`catalog_bounds`] and makes each string printable;
    /// returns whether anything changed (an honest agent's entries never do).
    pub fn sanitize(&mut self) -> bool {
        use catalog_bounds::*;
        let mut changed = clip_printable(&mut self.file, MAX_FILE_LEN);
        changed |= clip_printable(&mut self.name, MAX_NAME_LEN);
        if let Some(m) = &mut self.module {
            changed |= clip_printable(m, MAX_NAME_LEN);
        }
        if let Some(l) = &mut self.level {
            changed |= clip_printable(l, MAX_LEVEL_LEN);
        }
        if self.fields.len() > MAX_FIELDS {
            self.fields.truncate(MAX_FIELDS);
            changed = true;
        }
        for f in &mut self.fields {
            changed |= clip_printable(f, MAX_FIELD_NAME_LEN);
        }
        changed
    }

    /// The memory the entry holds, counting each string's overhead: what a catalog's
    /// byte bound is charged.
    pub fn footprint(&self) -> usize {
        use catalog_bounds::*;
        let string = |s: &str| s.len() + STRING_OVERHEAD;
        ENTRY_OVERHEAD
            + string(&self.file)
            + string(&self.name)
            + self.module.as_deref().map_or(0, string)
            + self.level.as_deref().map_or(0, string)
            + self.fields.iter().map(|f| string(f)).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_cut_to_its_bounds_and_made_printable() {
        let mut e = CatalogEntry {
            file: format!("src/a.rs\n{}", "x".repeat(5_000)),
            line: 3,
            kind: LocationKind::Event,
            name: "ok".into(),
            module: Some("m\u{1b}[31m".into()),
            level: Some("info".into()),
            fields: (0..1_000).map(|i| format!("f{i}")).collect(),
            hits: 0,
        };
        let before = e.footprint();
        assert!(e.sanitize());
        assert_eq!(e.file.chars().count(), catalog_bounds::MAX_FILE_LEN);
        assert!(!e.file.contains('\n') && !e.module.as_deref().unwrap().contains('\u{1b}'));
        assert_eq!(e.fields.len(), catalog_bounds::MAX_FIELDS);
        assert!(e.footprint() < before);
        assert!(!e.sanitize(), "sanitizing twice changes nothing");
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
