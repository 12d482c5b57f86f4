//! The inspectable locations an agent knows of.
//!
//! An agent publishes a location the first time its code runs (for `tracing`, when a
//! callsite registers), so a catalog grows as the service warms up. Updates are
//! incremental: an entry is identified by `(file, line, kind, name)` and a later copy
//! replaces an earlier one (hit counts move on).
//!
//! Languages where every executable line is a location (Python) publish a [`FileLines`]
//! per source file instead: the file's executable lines as compact ranges, its
//! functions (locations of kind span: entering them, timing them) and the hash of its
//! content, so that one module costs one entry rather than one per line.

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
    /// Most line ranges one file entry may list (a 20,000-line module has a few
    /// thousand).
    pub const MAX_LINE_RANGES: usize = 20_000;
    /// Most functions one file entry may list.
    pub const MAX_FUNCTIONS: usize = 5_000;
    /// Longest content hash, in characters (`sha256:` and 64 hex digits fit).
    pub const MAX_HASH_LEN: usize = 80;
    /// What a line range costs in memory.
    pub const RANGE_BYTES: usize = 8;
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
    /// Content hash of the file (`sha256:<hex>`), when the agent could read its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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
    fn a_line_set_is_written_as_ranges_and_read_back() {
        let set = LineSet::from_lines([9, 3, 4, 5, 12, 6, 7, 13, 4]);
        assert_eq!(set.to_string(), "3-7,9,12-13");
        assert_eq!(set.len(), 8);
        assert!(set.contains(5) && set.contains(9) && !set.contains(8) && !set.contains(14));
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, "\"3-7,9,12-13\"");
        assert_eq!(serde_json::from_str::<LineSet>(&json).unwrap(), set);
        assert_eq!(set.nearest(8, 3), vec![7, 9, 6]);
        assert_eq!(set.nearest(100, 2), vec![13, 12]);
        assert_eq!(set.nearest(1, 2), vec![3, 4]);
        assert!(LineSet::default().nearest(3, 2).is_empty());
    }

    #[test]
    fn a_bad_line_set_is_refused_with_what_is_wrong() {
        let err = serde_json::from_str::<LineSet>("\"3-1\"").unwrap_err().to_string();
        assert!(err.contains("`3-1` is not a line or a range"), "{err}");
        let err = serde_json::from_str::<LineSet>("\"5,3\"").unwrap_err().to_string();
        assert!(err.contains("ascending"), "{err}");
        assert!(serde_json::from_str::<LineSet>("\"0\"").is_err());
        assert!(serde_json::from_str::<LineSet>("\"x\"").is_err());
        assert_eq!(serde_json::from_str::<LineSet>("\"\"").unwrap(), LineSet::default());
    }

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
            hash: None,
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

/// A set of line numbers, kept as sorted, disjoint, non-adjacent ranges and written on
/// the wire as compact text: `"3-7,9,12-40"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LineSet {
    ranges: Vec<(u32, u32)>,
}

impl LineSet {
    /// The set of `lines` (any order, duplicates allowed; line 0 is not a line).
    pub fn from_lines(lines: impl IntoIterator<Item = u32>) -> LineSet {
        let mut lines: Vec<u32> = lines.into_iter().filter(|l| *l > 0).collect();
        lines.sort_unstable();
        lines.dedup();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for line in lines {
            match ranges.last_mut() {
                Some((_, end)) if end.checked_add(1) == Some(line) => *end = line,
                _ => ranges.push((line, line)),
            }
        }
        LineSet { ranges }
    }

    /// Whether `line` is in the set.
    pub fn contains(&self, line: u32) -> bool {
        let i = self.ranges.partition_point(|(_, end)| *end < line);
        self.ranges.get(i).is_some_and(|(start, _)| *start <= line)
    }

    /// How many lines the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| u64::from(b - a) + 1).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, first to last, both ends included.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// Up to `n` lines of the set nearest to `line` (nearest first, the earlier line
    /// first on a tie), without walking the set line by line.
    pub fn nearest(&self, line: u32, n: usize) -> Vec<u32> {
        let i = self.ranges.partition_point(|(_, end)| *end < line);
        let mut below = self.ranges[..i].iter().rev().flat_map(|(a, b)| (*a..=*b).rev());
        let mut above = self.ranges[i..].iter().flat_map(|(a, b)| *a..=*b);
        let (mut lo, mut hi) = (below.next(), above.next());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match (lo, hi) {
                (Some(l), Some(h)) if line.abs_diff(l) <= h.abs_diff(line) => {
                    out.push(l);
                    lo = below.next();
                }
                (_, Some(h)) => {
                    out.push(h);
                    hi = above.next();
                }
                (Some(l), None) => {
                    out.push(l);
                    lo = below.next();
                }
                (None, None) => break,
            }
        }
        out
    }

    /// Keeps the first `max` ranges; returns whether any were dropped.
    fn cap(&mut self, max: usize) -> bool {
        let cut = self.ranges.len() > max;
        self.ranges.truncate(max);
        cut
    }
}

impl std::fmt::Display for LineSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b { write!(f, "{a}")? } else { write!(f, "{a}-{b}")? }
        }
        Ok(())
    }
}

impl std::str::FromStr for LineSet {
    type Err = String;

    /// Parses `"3-7,9"`; ranges must be ascending and disjoint, as [`LineSet`] writes them.
    fn from_str(text: &str) -> Result<LineSet, String> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let bad = || format!("`{}` is not a line or a range of lines", crate::value::truncate_chars(part, 40));
            let number = |t: &str| t.trim().parse::<u32>().map_err(|_| bad());
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let l = number(part)?;
                    (l, l)
                }
            };
            if a == 0 || b < a {
                return Err(bad());
            }
            if ranges.last().is_some_and(|(_, end)| *end >= a) {
                return Err(format!("line ranges must be ascending and disjoint (at `{}`)", part.trim()));
            }
            if ranges.len() >= catalog_bounds::MAX_LINE_RANGES {
                return Err(format!("more than {} line ranges", catalog_bounds::MAX_LINE_RANGES));
            }
            ranges.push((a, b));
        }
        Ok(LineSet { ranges })
    }
}

impl Serialize for LineSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LineSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LineSet, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One function (or method) of a source file: entering it is a location of kind span,
/// which a duration metric times whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FunctionLine {
    /// Qualified name (`Shop.checkout`, `handler.<locals>.inner`).
    pub name: String,
    /// The line of its definition (its `def`).
    pub line: u32,
    /// Its last line, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_line: Option<u32>,
}

/// The inspectable lines of one source file, for languages where every executable line
/// is a location.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileLines {
    /// Source file as the program loaded it.
    pub file: String,
    /// Module name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Hash of the file's content as loaded (`sha256:<hex>`), so a client can tell
    /// whether its copy of the source is the one running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The lines that hold code (a placement elsewhere answers with the nearest of them).
    pub lines: LineSet,
    /// Functions defined in the file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<FunctionLine>,
}

impl FileLines {
    /// Cuts every string and list to [`catalog_bounds`] and makes each string printable;
    /// returns whether anything changed (an honest agent's entries never do).
    pub fn sanitize(&mut self) -> bool {
        use catalog_bounds::*;
        let mut changed = clip_printable(&mut self.file, MAX_FILE_LEN);
        if let Some(m) = &mut self.module {
            changed |= clip_printable(m, MAX_NAME_LEN);
        }
        if let Some(h) = &mut self.hash {
            changed |= clip_printable(h, MAX_HASH_LEN);
        }
        changed |= self.lines.cap(MAX_LINE_RANGES);
        if self.functions.len() > MAX_FUNCTIONS {
            self.functions.truncate(MAX_FUNCTIONS);
            changed = true;
        }
        for f in &mut self.functions {
            changed |= clip_printable(&mut f.name, MAX_NAME_LEN);
        }
        changed
    }

    /// The memory the entry holds: what a catalog's byte bound is charged.
    pub fn footprint(&self) -> usize {
        use catalog_bounds::*;
        let string = |s: &str| s.len() + STRING_OVERHEAD;
        ENTRY_OVERHEAD
            + string(&self.file)
            + self.module.as_deref().map_or(0, string)
            + self.hash.as_deref().map_or(0, string)
            + self.lines.ranges().len() * RANGE_BYTES
            + self.functions.iter().map(|f| string(&f.name) + 8).sum::<usize>()
    }

    /// The function defined at `line`, when one is.
    pub fn function_at(&self, line: u32) -> Option<&FunctionLine> {
        self.functions.iter().find(|f| f.line == line)
    }

    /// The innermost function whose lines hold `line` (`None` at module level).
    pub fn function_around(&self, line: u32) -> Option<&FunctionLine> {
        self.functions
            .iter()
            .filter(|f| f.line <= line && f.end_line.is_none_or(|end| line <= end))
            .max_by_key(|f| f.line)
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
