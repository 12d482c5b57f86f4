//! The captured-value model.
//!
//! A [`Value`] is what an agent saw in a running program, in a shape every language
//! agent can produce: scalars, strings, lists, maps, and objects with a type name. It is
//! deliberately lossy in a *visible* way: whatever a [`CaptureLimits`] cut is replaced
//! by an explicit marker (a [`Cut`], an `omitted` count, a string's `original_len`) so
//! that a reader, human or model, never mistakes a truncated value for the whole.
//!
//! # Wire shape
//!
//! Every value is a JSON object tagged by `type`:
//!
//! ```json
//! {"type":"object","type_name":"Order","fields":{
//!    "id":{"type":"int","value":42},
//!    "note":{"type":"string","value":"abc","original_len":900},
//!    "items":{"type":"list","items":[],"omitted":130},
//!    "customer":{"type":"cut","reason":"depth","type_name":"Customer"}}}
//! ```
//!
//! Unknown `type`s from newer agents decode as a [`Cut`] with reason
//! [`CutReason::Unsupported`] rather than failing the whole hit.

use std::fmt;
use std::io;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::CaptureLimits;

/// A value captured from a running program; see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Absence of a value (`None`, `null`, `nil`).
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer, used where the source was unsigned and may exceed `i64`.
    UInt(u64),
    /// A floating point number; non-finite values travel as strings on the wire.
    Float(f64),
    /// A string, possibly shortened.
    Str(Text),
    /// An ordered collection (list, array, set, tuple without names).
    List(List),
    /// A collection of key/value pairs (hash maps, dictionaries).
    Map(Map),
    /// A record with a type name and named fields (structs, class instances, enum variants).
    Object(Object),
    /// Something that was not captured, and why.
    Cut(Cut),
}

/// A string with the length it had before truncation, when it was truncated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Text {
    /// The kept prefix.
    pub value: String,
    /// Length in characters before truncation; `None` when nothing was cut.
    pub original_len: Option<u64>,
}

/// An ordered collection and how many items were left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct List {
    /// The language's name for the collection, when known (`Vec`, `HashSet`, `tuple`).
    pub type_name: Option<String>,
    /// The kept items, in order.
    pub items: Vec<Value>,
    /// Items left out after the kept ones.
    pub omitted: u64,
}

/// Key/value pairs and how many were left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Map {
    /// The language's name for the map, when known (`HashMap`, `dict`).
    pub type_name: Option<String>,
    /// The kept entries, in the order the program produced them.
    pub entries: Vec<(Value, Value)>,
    /// Entries left out after the kept ones.
    pub omitted: u64,
}

/// A named record: struct, class instance, enum variant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object {
    /// The type (or variant) name as the program spells it.
    pub type_name: String,
    /// The kept fields, in declaration order. Tuple fields are named `0`, `1`, ...
    pub fields: Vec<Field>,
    /// Fields left out after the kept ones.
    pub omitted: u64,
}

/// A named value: an object field, an event field, a span field, a watch result.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The field or variable name; redaction rules match on it.
    pub name: String,
    /// What it held.
    pub value: Value,
}

impl Field {
    /// A field from a name and a value.
    pub fn new(name: impl Into<String>, value: Value) -> Self {
        Field { name: name.into(), value }
    }
}

/// A marker standing where a value was not captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// Why the value is not here.
    pub reason: CutReason,
    /// The type of what was cut, when known, so a reader knows what to ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_name: Option<String>,
    /// Items, fields or bytes the cut value held, when known (see `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Why a value was replaced by a [`Cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CutReason {
    /// Nested deeper than `max_depth`; `size` is the number of children it had.
    Depth,
    /// Did not fit in the hit's byte budget; `size` is its encoded size in bytes.
    Size,
    /// The agent could not represent it, or it arrived in a shape this side does not know.
    #[serde(other)]
    Unsupported,
}

impl fmt::Display for CutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CutReason::Depth => "depth",
            CutReason::Size => "size",
            CutReason::Unsupported => "unsupported",
        })
    }
}

impl Value {
    /// A string value with nothing cut.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(Text { value: s.into(), original_len: None })
    }

    /// The short name of this value's kind, as used on the wire (`int`, `object`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::UInt(_) => "uint",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Map(_) => "map",
            Value::Object(_) => "object",
            Value::Cut(_) => "cut",
        }
    }

    /// Whether this value has children, i.e. whether depth limits apply to it.
    pub fn is_container(&self) -> bool {
        match self {
            Value::List(l) => !l.items.is_empty(),
            Value::Map(m) => !m.entries.is_empty(),
            Value::Object(o) => !o.fields.is_empty(),
            _ => false,
        }
    }

    /// The type name to show on a marker that replaces this value.
    pub fn type_name(&self) -> Option<&str> {
        match self {
            Value::List(l) => l.type_name.as_deref(),
            Value::Map(m) => m.type_name.as_deref(),
            Value::Object(o) => Some(&o.type_name),
            Value::Cut(c) => c.type_name.as_deref(),
            _ => None,
        }
    }

    /// Number of direct children (items, entries, fields), including omitted ones.
    pub fn child_count(&self) -> u64 {
        match self {
            Value::List(l) => l.items.len() as u64 + l.omitted,
            Value::Map(m) => m.entries.len() as u64 + m.omitted,
            Value::Object(o) => o.fields.len() as u64 + o.omitted,
            _ => 0,
        }
    }

    /// The field named `name` when this is an object.
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Object(o) => o.fields.iter().find(|f| f.name == name).map(|f| &f.value),
            _ => None,
        }
    }

    /// Size in bytes of this value's JSON encoding, computed without allocating it.
    pub fn encoded_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        // Serializing into a counter cannot fail: our Serialize impl has no error paths
        // and the writer never errors.
        let _ = serde_json::to_writer(&mut counter, self);
        counter.0
    }
}

struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts of what truncation removed, so a hit can say it is incomplete without a
/// reader having to walk the whole tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TruncationSummary {
    /// Containers replaced by a depth marker.
    pub depth_cuts: u64,
    /// Collection items and object fields left out.
    pub items_omitted: u64,
    /// Strings shortened.
    pub strings_shortened: u64,
    /// Values replaced by a size marker to keep the hit under its byte budget.
    pub size_cuts: u64,
}

impl TruncationSummary {
    /// Whether anything at all was cut.
    pub fn is_empty(&self) -> bool {
        *self == TruncationSummary::default()
    }

    /// Adds another summary's counts into this one.
    pub fn absorb(&mut self, other: TruncationSummary) {
        self.depth_cuts += other.depth_cuts;
        self.items_omitted += other.items_omitted;
        self.strings_shortened += other.strings_shortened;
        self.size_cuts += other.size_cuts;
    }
}

/// Applies depth, breadth and string limits to a captured variable, in place.
///
/// The variable itself is level 1. A container at level `max_depth` keeps its leaf
/// children (scalars and strings) but its container children become
/// [`CutReason::Depth`] markers naming their type and size. Idempotent: truncating an
/// already truncated value changes nothing, which is what lets the broker re-apply the
/// limits to every hit without distorting honest agents' output.
pub fn truncate(value: &mut Value, limits: &CaptureLimits, summary: &mut TruncationSummary) {
    truncate_at(value, 1, limits, summary);
}

fn truncate_at(value: &mut Value, level: u32, limits: &CaptureLimits, summary: &mut TruncationSummary) {
    match value {
        Value::Str(text) => shorten_text(text, limits.max_string_len as usize, summary),
        Value::List(list) => {
            let keep = limits.max_items as usize;
            if list.items.len() > keep {
                let extra = list.items.len() - keep;
                list.items.truncate(keep);
                list.omitted += extra as u64;
                summary.items_omitted += extra as u64;
            }
            for item in &mut list.items {
                truncate_child(item, level, limits, summary);
            }
        }
        Value::Map(map) => {
            let keep = limits.max_items as usize;
            if map.entries.len() > keep {
                let extra = map.entries.len() - keep;
                map.entries.truncate(keep);
                map.omitted += extra as u64;
                summary.items_omitted += extra as u64;
            }
            for (k, v) in &mut map.entries {
                truncate_child(k, level, limits, summary);
                truncate_child(v, level, limits, summary);
            }
        }
        Value::Object(object) => {
            let keep = limits.max_fields as usize;
            if object.fields.len() > keep {
                let extra = object.fields.len() - keep;
                object.fields.truncate(keep);
                object.omitted += extra as u64;
                summary.items_omitted += extra as u64;
            }
            for field in &mut object.fields {
                shorten_name(&mut field.name, limits.max_string_len as usize);
                truncate_child(&mut field.value, level, limits, summary);
            }
        }
        Value::Cut(cut) => {
            if let Some(name) = &mut cut.type_name {
                shorten_name(name, limits.max_string_len as usize);
            }
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::UInt(_) | Value::Float(_) => {}
    }
    if let Value::Object(object) = value {
        shorten_name(&mut object.type_name, limits.max_string_len as usize);
    }
}

fn truncate_child(child: &mut Value, parent_level: u32, limits: &CaptureLimits, summary: &mut TruncationSummary) {
    if child.is_container() && parent_level >= limits.max_depth {
        let cut = Cut {
            reason: CutReason::Depth,
            type_name: child.type_name().map(|t| truncate_chars(t, limits.max_string_len as usize).to_owned()),
            size: Some(child.child_count()),
        };
        *child = Value::Cut(cut);
        summary.depth_cuts += 1;
    } else {
        truncate_at(child, parent_level + 1, limits, summary);
    }
}

/// Keeps at most `max` characters of a string, recording the original length.
pub fn shorten_text(text: &mut Text, max: usize, summary: &mut TruncationSummary) {
    // Fast path: byte length bounds char count from above.
    if text.value.len() <= max {
        return;
    }
    let cut_at = match text.value.char_indices().nth(max) {
        Some((idx, _)) => idx,
        None => return,
    };
    let original = text.value.chars().count() as u64;
    text.value.truncate(cut_at);
    text.original_len = Some(text.original_len.map_or(original, |o| o.max(original)));
    summary.strings_shortened += 1;
}

fn shorten_name(name: &mut String, max: usize) {
    let keep = truncate_chars(name, max).len();
    name.truncate(keep);
}

/// How every redaction marker starts: a value that a redaction rule hid reads
/// `[REDACTED:KIND]` (`[REDACTED:PASSWORD]`, `[REDACTED:EMAIL]`), on the wire and to
/// expressions alike.
pub const REDACTION_MARKER_PREFIX: &str = "[REDACTED:";

/// Longest kind a redaction marker carries.
pub const MAX_REDACTION_KIND_LEN: usize = 48;

/// Whether a whole string is one redaction marker (`[REDACTED:` + 1 to 48 ASCII letters,
/// digits or `_` + `]`). Expressions treat such a string as a redacted value: they may
/// show it or compare it with `null`, nothing else (see `docs/expressions.md`).
#[inline]
pub fn is_redaction_marker(s: &str) -> bool {
    // The first byte rules out almost every string at once.
    s.as_bytes().first() == Some(&b'[')
        && s.len() <= REDACTION_MARKER_PREFIX.len() + MAX_REDACTION_KIND_LEN + 1
        && s.strip_prefix(REDACTION_MARKER_PREFIX)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|kind| !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// The longest prefix of `s` with at most `max` characters.
pub fn truncate_chars(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    match s.char_indices().nth(max) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

/// Clips `s` to `max` characters and replaces control characters (newlines included)
/// with U+FFFD, for text a peer sends that is shown back on one line (a file name in a
/// list, a thread name). Returns whether it changed anything; allocates only then.
pub fn clip_printable(s: &mut String, max: usize) -> bool {
    let keep = truncate_chars(s, max).len();
    let clipped = keep < s.len();
    s.truncate(keep);
    // Control characters are U+0000..=U+001F and U+007F..=U+009F: single bytes below
    // 0x20 or 0x7F, or 0xC2 followed by 0x80..=0x9F. A byte scan rules almost every
    // string out; only a suspect one is decoded.
    let suspect = s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2);
    if suspect && s.chars().any(char::is_control) {
        *s = s.chars().map(|c| if c.is_control() { char::REPLACEMENT_CHARACTER } else { c }).collect();
        return true;
    }
    clipped
}

/// Keeps values, in order, while they fit in `budget` bytes of JSON; a value that does
/// not fit is entered and its children kept while they fit, and whatever still does not
/// fit is replaced by a [`CutReason::Size`] marker carrying its encoded size.
///
/// Returns the bytes used. Used on the values of one hit together, so that the first
/// captured variables survive whole and later ones are cut, rather than all of them
/// being cut a little.
pub fn fit_to_budget<'a>(
    values: impl IntoIterator<Item = &'a mut Value>,
    budget: usize,
    summary: &mut TruncationSummary,
) -> usize {
    let values: Vec<&'a mut Value> = values.into_iter().collect();
    let count = values.len();
    let mut used = 0usize;
    for (i, value) in values.into_iter().enumerate() {
        // Leave room for a marker for every value still to come.
        let reserve = (count - i - 1) * CUT_MARKER_BYTES;
        used += fit_one(value, budget.saturating_sub(used + reserve), summary);
    }
    used
}

/// Bytes a size marker takes on the wire, with a little slack for its numbers.
const CUT_MARKER_BYTES: usize = 64;

fn size_cut(value: &mut Value, len: usize, budget: usize, summary: &mut TruncationSummary) -> usize {
    if matches!(value, Value::Cut(_)) {
        // Already a marker: re-cutting would only lose what it says.
        return len;
    }
    let mut cut =
        Cut { reason: CutReason::Size, type_name: value.type_name().map(str::to_owned), size: Some(len as u64) };
    *value = Value::Cut(cut.clone());
    let mut used = value.encoded_len();
    if used > budget && cut.type_name.is_some() {
        cut.type_name = None;
        *value = Value::Cut(cut);
        used = value.encoded_len();
    }
    summary.size_cuts += 1;
    used
}

/// Encoded size of a container without its children, plus room for an omitted count.
fn shell_len(value: &mut Value) -> usize {
    let len = match value {
        Value::List(l) => {
            let items = std::mem::take(&mut l.items);
            let len = value.encoded_len();
            if let Value::List(l) = value {
                l.items = items;
            }
            len
        }
        Value::Map(m) => {
            let entries = std::mem::take(&mut m.entries);
            let len = value.encoded_len();
            if let Value::Map(m) = value {
                m.entries = entries;
            }
            len
        }
        Value::Object(o) => {
            let fields = std::mem::take(&mut o.fields);
            let len = value.encoded_len();
            if let Value::Object(o) = value {
                o.fields = fields;
            }
            len
        }
        other => other.encoded_len(),
    };
    len + r#","omitted":18446744073709551615"#.len()
}

fn json_str_len(s: &str) -> usize {
    let mut counter = ByteCounter(0);
    let _ = serde_json::to_writer(&mut counter, s);
    counter.0
}

fn fit_one(value: &mut Value, budget: usize, summary: &mut TruncationSummary) -> usize {
    let len = value.encoded_len();
    if len <= budget {
        return len;
    }
    if !value.is_container() {
        return size_cut(value, len, budget, summary);
    }
    let shell = shell_len(value);
    if budget < shell + CUT_MARKER_BYTES {
        return size_cut(value, len, budget, summary);
    }
    // Enter the container: keep children in order while they fit, then drop the rest
    // into the container's `omitted` count.
    let mut used = shell;
    let mut dropped = 0u64;
    match value {
        Value::List(list) => {
            let mut kept = 0;
            for item in &mut list.items {
                let remaining = budget.saturating_sub(used + 1);
                if remaining < CUT_MARKER_BYTES {
                    break;
                }
                used += fit_one(item, remaining, summary) + 1;
                kept += 1;
            }
            dropped = (list.items.len() - kept) as u64;
            list.items.truncate(kept);
            list.omitted += dropped;
        }
        Value::Map(map) => {
            const ENTRY_FRAME: usize = r#"{"key":,"value":},"#.len();
            let mut kept = 0;
            for (k, v) in &mut map.entries {
                let remaining = budget.saturating_sub(used + ENTRY_FRAME);
                if remaining < 2 * CUT_MARKER_BYTES {
                    break;
                }
                let key_len = fit_one(k, remaining - CUT_MARKER_BYTES, summary);
                used += ENTRY_FRAME + key_len;
                used += fit_one(v, budget.saturating_sub(used), summary);
                kept += 1;
            }
            dropped = (map.entries.len() - kept) as u64;
            map.entries.truncate(kept);
            map.omitted += dropped;
        }
        Value::Object(object) => {
            let mut kept = 0;
            for field in &mut object.fields {
                let frame = json_str_len(&field.name) + 2;
                let remaining = budget.saturating_sub(used + frame);
                if remaining < CUT_MARKER_BYTES {
                    break;
                }
                used += frame + fit_one(&mut field.value, remaining, summary);
                kept += 1;
            }
            dropped = (object.fields.len() - kept) as u64;
            object.fields.truncate(kept);
            object.omitted += dropped;
        }
        _ => {}
    }
    if dropped > 0 {
        summary.size_cuts += 1;
        summary.items_omitted += dropped;
    }
    used
}

// ---------------------------------------------------------------------------------
// Serialization
// ---------------------------------------------------------------------------------

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.kind())?;
        match self {
            Value::Null => {}
            Value::Bool(b) => map.serialize_entry("value", b)?,
            Value::Int(i) => map.serialize_entry("value", i)?,
            Value::UInt(u) => map.serialize_entry("value", u)?,
            Value::Float(f) => {
                if f.is_finite() {
                    map.serialize_entry("value", f)?
                } else if f.is_nan() {
                    map.serialize_entry("value", "NaN")?
                } else if *f > 0.0 {
                    map.serialize_entry("value", "inf")?
                } else {
                    map.serialize_entry("value", "-inf")?
                }
            }
            Value::Str(t) => {
                map.serialize_entry("value", &t.value)?;
                if let Some(n) = t.original_len {
                    map.serialize_entry("original_len", &n)?;
                }
            }
            Value::List(l) => {
                if let Some(t) = &l.type_name {
                    map.serialize_entry("type_name", t)?;
                }
                map.serialize_entry("items", &l.items)?;
                if l.omitted > 0 {
                    map.serialize_entry("omitted", &l.omitted)?;
                }
            }
            Value::Map(m) => {
                if let Some(t) = &m.type_name {
                    map.serialize_entry("type_name", t)?;
                }
                map.serialize_entry("entries", &EntriesSer(&m.entries))?;
                if m.omitted > 0 {
                    map.serialize_entry("omitted", &m.omitted)?;
                }
            }
            Value::Object(o) => {
                map.serialize_entry("type_name", &o.type_name)?;
                map.serialize_entry("fields", &FieldsSer(&o.fields))?;
                if o.omitted > 0 {
                    map.serialize_entry("omitted", &o.omitted)?;
                }
            }
            Value::Cut(c) => {
                map.serialize_entry("reason", &c.reason)?;
                if let Some(t) = &c.type_name {
                    map.serialize_entry("type_name", t)?;
                }
                if let Some(s) = c.size {
                    map.serialize_entry("size", &s)?;
                }
            }
        }
        map.end()
    }
}

struct EntriesSer<'a>(&'a [(Value, Value)]);

impl Serialize for EntriesSer<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        #[derive(Serialize)]
        struct Entry<'a> {
            key: &'a Value,
            value: &'a Value,
        }
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for (key, value) in self.0 {
            seq.serialize_element(&Entry { key, value })?;
        }
        seq.end()
    }
}

/// Serializes named values as one JSON object, keeping their order.
pub(crate) struct FieldsSer<'a>(pub(crate) &'a [Field]);

impl Serialize for FieldsSer<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for f in self.0 {
            map.serialize_entry(&f.name, &f.value)?;
        }
        map.end()
    }
}

/// Deserializes a JSON object of named values into an ordered list, keeping duplicates.
pub(crate) struct FieldsDe(pub(crate) Vec<Field>);

impl<'de> Deserialize<'de> for FieldsDe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldsDe;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping field names to captured values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<FieldsDe, A::Error> {
                let mut fields = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some((name, value)) = access.next_entry::<String, Value>()? {
                    fields.push(Field { name, value });
                }
                Ok(FieldsDe(fields))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// Serde adapter for `Vec<Field>` fields of other wire types (`#[serde(with = ...)]`).
pub mod fields_as_object {
    use super::*;

    /// Writes the fields as one JSON object in order.
    pub fn serialize<S: Serializer>(fields: &[Field], s: S) -> Result<S::Ok, S::Error> {
        FieldsSer(fields).serialize(s)
    }

    /// Reads a JSON object of named values in order.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Field>, D::Error> {
        FieldsDe::deserialize(d).map(|f| f.0)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FloatRepr {
    Num(f64),
    Text(String),
}

#[derive(Deserialize)]
struct EntryDe {
    key: Value,
    value: Value,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireValue {
    Null,
    Bool {
        value: bool,
    },
    Int {
        value: i64,
    },
    Uint {
        value: u64,
    },
    Float {
        value: FloatRepr,
    },
    String {
        value: String,
        #[serde(default)]
        original_len: Option<u64>,
    },
    List {
        #[serde(default)]
        type_name: Option<String>,
        items: Vec<Value>,
        #[serde(default)]
        omitted: u64,
    },
    Map {
        #[serde(default)]
        type_name: Option<String>,
        entries: Vec<EntryDe>,
        #[serde(default)]
        omitted: u64,
    },
    Object {
        type_name: String,
        fields: FieldsDe,
        #[serde(default)]
        omitted: u64,
    },
    Cut {
        reason: CutReason,
        #[serde(default)]
        type_name: Option<String>,
        #[serde(default)]
        size: Option<u64>,
    },
    #[serde(other)]
    Unknown,
}

impl WireValue {
    fn into_value<E: de::Error>(self) -> Result<Value, E> {
        Ok(match self {
            WireValue::Null => Value::Null,
            WireValue::Bool { value } => Value::Bool(value),
            WireValue::Int { value } => Value::Int(value),
            WireValue::Uint { value } => Value::UInt(value),
            WireValue::Float { value } => Value::Float(match value {
                FloatRepr::Num(n) => n,
                FloatRepr::Text(t) => float_word(&t)?,
            }),
            WireValue::String { value, original_len } => Value::Str(Text { value, original_len }),
            WireValue::List { type_name, items, omitted } => Value::List(List { type_name, items, omitted }),
            WireValue::Map { type_name, entries, omitted } => {
                Value::Map(Map { type_name, entries: entries.into_iter().map(|e| (e.key, e.value)).collect(), omitted })
            }
            WireValue::Object { type_name, fields, omitted } => {
                Value::Object(Object { type_name, fields: fields.0, omitted })
            }
            WireValue::Cut { reason, type_name, size } => Value::Cut(Cut { reason, type_name, size }),
            WireValue::Unknown => Value::Cut(Cut { reason: CutReason::Unsupported, type_name: None, size: None }),
        })
    }
}

fn float_word<E: de::Error>(t: &str) -> Result<f64, E> {
    match t {
        "NaN" | "nan" => Ok(f64::NAN),
        "inf" | "+inf" | "Infinity" => Ok(f64::INFINITY),
        "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
        other => {
            Err(E::custom(format!("float value `{}` is neither a number nor NaN/inf/-inf", truncate_chars(other, 40))))
        }
    }
}

/// The members a value object can have; matched without allocating.
enum Key {
    Type,
    Value,
    OriginalLen,
    Items,
    Entries,
    Fields,
    Omitted,
    TypeName,
    Reason,
    Size,
    Other(String),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "type" => Key::Type,
                    "value" => Key::Value,
                    "original_len" => Key::OriginalLen,
                    "items" => Key::Items,
                    "entries" => Key::Entries,
                    "fields" => Key::Fields,
                    "omitted" => Key::Omitted,
                    "type_name" => Key::TypeName,
                    "reason" => Key::Reason,
                    "size" => Key::Size,
                    other => Key::Other(truncate_chars(other, 64).to_owned()),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// The `type` tag of a value object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Int,
    Uint,
    Float,
    String,
    List,
    Map,
    Object,
    Cut,
    Unknown,
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value kind")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                Ok(match v {
                    "null" => Kind::Null,
                    "bool" => Kind::Bool,
                    "int" => Kind::Int,
                    "uint" => Kind::Uint,
                    "float" => Kind::Float,
                    "string" => Kind::String,
                    "list" => Kind::List,
                    "map" => Kind::Map,
                    "object" => Kind::Object,
                    "cut" => Kind::Cut,
                    // Newer agents' kinds decode as an "unsupported" marker.
                    _ => Kind::Unknown,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A float given as a number or as one of the words for non-finite values.
struct FloatDe(f64);

impl<'de> Deserialize<'de> for FloatDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FloatDe;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, or NaN/inf/-inf")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FloatDe, E> {
                Ok(FloatDe(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FloatDe, E> {
                Ok(FloatDe(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FloatDe, E> {
                Ok(FloatDe(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FloatDe, E> {
                float_word(v).map(FloatDe)
            }
        }
        d.deserialize_any(V)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a captured value: an object with a `type` member")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let first = map.next_key::<Key>()?;
        match first {
            Some(Key::Type) => typed(map.next_value::<Kind>()?, map),
            None => Err(de::Error::missing_field("type")),
            // Not written by Periscope (which puts `type` first): buffer, then decode.
            Some(other) => {
                let mut buffered = serde_json::Map::new();
                buffered.insert(key_name(&other), map.next_value::<serde_json::Value>()?);
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    buffered.insert(k, v);
                }
                WireValue::deserialize(serde_json::Value::Object(buffered)).map_err(de::Error::custom)?.into_value()
            }
        }
    }
}

fn key_name(k: &Key) -> String {
    match k {
        Key::Type => "type",
        Key::Value => "value",
        Key::OriginalLen => "original_len",
        Key::Items => "items",
        Key::Entries => "entries",
        Key::Fields => "fields",
        Key::Omitted => "omitted",
        Key::TypeName => "type_name",
        Key::Reason => "reason",
        Key::Size => "size",
        Key::Other(s) => s,
    }
    .to_owned()
}

/// Decodes the members after `type`, straight into the value: no buffering.
fn typed<'de, A: MapAccess<'de>>(kind: Kind, mut map: A) -> Result<Value, A::Error> {
    let mut value: Option<Value> = None;
    let mut original_len = None;
    let mut items = None;
    let mut entries: Option<Vec<EntryDe>> = None;
    let mut fields: Option<FieldsDe> = None;
    let mut omitted = 0u64;
    let mut type_name: Option<String> = None;
    let mut reason = None;
    let mut size = None;
    while let Some(key) = map.next_key::<Key>()? {
        match key {
            Key::Value => {
                value = Some(match kind {
                    Kind::Bool => Value::Bool(map.next_value()?),
                    Kind::Int => Value::Int(map.next_value()?),
                    Kind::Uint => Value::UInt(map.next_value()?),
                    Kind::Float => Value::Float(map.next_value::<FloatDe>()?.0),
                    Kind::String => Value::str(map.next_value::<String>()?),
                    _ => {
                        map.next_value::<de::IgnoredAny>()?;
                        continue;
                    }
                })
            }
            Key::OriginalLen => original_len = map.next_value::<Option<u64>>()?,
            Key::Items => items = Some(map.next_value::<Vec<Value>>()?),
            Key::Entries => entries = Some(map.next_value()?),
            Key::Fields => fields = Some(map.next_value()?),
            Key::Omitted => omitted = map.next_value()?,
            Key::TypeName => type_name = map.next_value()?,
            Key::Reason => reason = Some(map.next_value::<CutReason>()?),
            Key::Size => size = map.next_value()?,
            Key::Type => return Err(de::Error::duplicate_field("type")),
            Key::Other(_) => {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
    }
    let need = |v: Option<Value>| v.ok_or_else(|| de::Error::missing_field("value"));
    Ok(match kind {
        Kind::Null => Value::Null,
        Kind::Bool | Kind::Int | Kind::Uint | Kind::Float => need(value)?,
        Kind::String => match need(value)? {
            Value::Str(mut t) => {
                t.original_len = original_len;
                Value::Str(t)
            }
            other => other,
        },
        Kind::List => {
            Value::List(List { type_name, items: items.ok_or_else(|| de::Error::missing_field("items"))?, omitted })
        }
        Kind::Map => Value::Map(Map {
            type_name,
            entries: entries
                .ok_or_else(|| de::Error::missing_field("entries"))?
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
            omitted,
        }),
        Kind::Object => Value::Object(Object {
            type_name: type_name.ok_or_else(|| de::Error::missing_field("type_name"))?,
            fields: fields.ok_or_else(|| de::Error::missing_field("fields"))?.0,
            omitted,
        }),
        Kind::Cut => {
            Value::Cut(Cut { reason: reason.ok_or_else(|| de::Error::missing_field("reason"))?, type_name, size })
        }
        Kind::Unknown => Value::Cut(Cut { reason: CutReason::Unsupported, type_name: None, size: None }),
    })
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ValueVisitor)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<u64> for Value {
    fn from(u: u64) -> Self {
        match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(u),
        }
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::str(s)
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_is_clipped_by_characters_and_loses_its_control_characters() {
        let mut s = "a\u{7}b\u{85}c\u{a9}é\nd".to_owned();
        assert!(clip_printable(&mut s, 100));
        assert_eq!(s, "a\u{fffd}b\u{fffd}c\u{a9}é\u{fffd}d");
        let mut plain = "© café".to_owned();
        assert!(!clip_printable(&mut plain, 100), "no control character, nothing to do");
        let mut long = "é".repeat(10);
        assert!(clip_printable(&mut long, 3));
        assert_eq!(long, "ééé");
    }

    fn obj(name: &str, fields: Vec<(&str, Value)>) -> Value {
        Value::Object(Object {
            type_name: name.into(),
            fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
            omitted: 0,
        })
    }

    fn nested(levels: usize) -> Value {
        let mut v = obj("Leaf", vec![("x", Value::Int(1))]);
        for i in 0..levels {
            v = obj(&format!("L{i}"), vec![("inner", v), ("n", Value::Int(i as i64))]);
        }
        v
    }

    #[test]
    fn every_kind_round_trips_through_json() {
        let v = Value::List(List {
            type_name: Some("Vec".into()),
            items: vec![
                Value::Null,
                Value::Bool(true),
                Value::Int(-3),
                Value::UInt(u64::MAX),
                Value::Float(1.5),
                Value::Str(Text { value: "ab".into(), original_len: Some(10) }),
                Value::Map(Map { type_name: None, entries: vec![(Value::str("k"), Value::Int(1))], omitted: 2 }),
                obj("Order", vec![("id", Value::Int(7)), ("id", Value::Int(8))]),
                Value::Cut(Cut { reason: CutReason::Depth, type_name: Some("X".into()), size: Some(3) }),
            ],
            omitted: 4,
        });
        let json = serde_json::to_string(&v).unwrap();
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn non_finite_floats_travel_as_strings() {
        let json = serde_json::to_string(&Value::Float(f64::NEG_INFINITY)).unwrap();
        assert_eq!(json, r#"{"type":"float","value":"-inf"}"#);
        let back: Value = serde_json::from_str(r#"{"type":"float","value":"NaN"}"#).unwrap();
        assert!(matches!(back, Value::Float(f) if f.is_nan()));
        assert!(serde_json::from_str::<Value>(r#"{"type":"float","value":"lots"}"#).is_err());
    }

    #[test]
    fn unknown_kinds_and_fields_from_newer_agents_are_tolerated() {
        let v: Value = serde_json::from_str(r#"{"type":"bigint","digits":"123"}"#).unwrap();
        assert!(matches!(v, Value::Cut(Cut { reason: CutReason::Unsupported, .. })));
        let v: Value = serde_json::from_str(r#"{"type":"int","value":3,"unit":"ms"}"#).unwrap();
        assert_eq!(v, Value::Int(3));
        let v: Value = serde_json::from_str(r#"{"type":"cut","reason":"gremlins"}"#).unwrap();
        assert!(matches!(v, Value::Cut(Cut { reason: CutReason::Unsupported, .. })));
    }

    #[test]
    fn members_in_any_order_decode_the_same() {
        let v: Value = serde_json::from_str(r#"{"value":"abc","original_len":9,"type":"string"}"#).unwrap();
        assert_eq!(v, Value::Str(Text { value: "abc".into(), original_len: Some(9) }));
        let v: Value =
            serde_json::from_str(r#"{"fields":{"a":{"type":"int","value":1}},"type_name":"T","type":"object"}"#)
                .unwrap();
        assert_eq!(v.field("a"), Some(&Value::Int(1)));
        assert!(serde_json::from_str::<Value>(r#"{"type":"int"}"#).unwrap_err().to_string().contains("value"));
        assert!(serde_json::from_str::<Value>(r#"{"value":1}"#).is_err());
        assert!(serde_json::from_str::<Value>(r#"{"type":"int","type":"int","value":1}"#).is_err());
    }

    #[test]
    fn depth_three_keeps_three_levels_and_marks_the_fourth() {
        let mut v = nested(5);
        let mut summary = TruncationSummary::default();
        truncate(&mut v, &CaptureLimits::default(), &mut summary);
        // level 1: L4, level 2: L3, level 3: L2 (kept, leaf children kept), L1 cut.
        let l3 = v.field("inner").unwrap();
        let l2 = l3.field("inner").unwrap();
        assert_eq!(l2.type_name(), Some("L2"));
        assert_eq!(l2.field("n"), Some(&Value::Int(2)));
        match l2.field("inner").unwrap() {
            Value::Cut(c) => {
                assert_eq!(c.reason, CutReason::Depth);
                assert_eq!(c.type_name.as_deref(), Some("L1"));
                assert_eq!(c.size, Some(2));
            }
            other => panic!("expected a depth cut, got {other:?}"),
        }
        assert_eq!(summary.depth_cuts, 1);
    }

    #[test]
    fn truncation_is_idempotent() {
        let mut v = Value::List(List {
            type_name: None,
            items: (0..250).map(|i| Value::str("é".repeat(300 + i))).collect(),
            omitted: 0,
        });
        let limits = CaptureLimits::default();
        let mut first = TruncationSummary::default();
        truncate(&mut v, &limits, &mut first);
        let once = v.clone();
        let mut second = TruncationSummary::default();
        truncate(&mut v, &limits, &mut second);
        assert_eq!(v, once);
        assert!(second.is_empty());
        assert_eq!(first.items_omitted, 150);
        assert_eq!(first.strings_shortened, 100);
        match &v {
            Value::List(l) => {
                assert_eq!(l.omitted, 150);
                match &l.items[0] {
                    Value::Str(t) => {
                        assert_eq!(t.value.chars().count(), 255);
                        assert_eq!(t.original_len, Some(300));
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn objects_keep_twenty_fields_and_count_the_rest() {
        let mut v = obj(
            "Wide",
            (0..30).map(|i| (Box::leak(format!("f{i}").into_boxed_str()) as &str, Value::Int(i))).collect(),
        );
        let mut s = TruncationSummary::default();
        truncate(&mut v, &CaptureLimits::default(), &mut s);
        match v {
            Value::Object(o) => {
                assert_eq!(o.fields.len(), 20);
                assert_eq!(o.omitted, 10);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn budget_keeps_early_values_whole_and_cuts_later_ones_by_size() {
        let big = || {
            Value::List(List {
                type_name: None,
                items: (0..100).map(|_| Value::str("x".repeat(200))).collect(),
                omitted: 0,
            })
        };
        let mut values = [Value::Int(1), big(), big()];
        let one_big = big().encoded_len();
        let mut s = TruncationSummary::default();
        let used = fit_to_budget(values.iter_mut(), one_big + 100, &mut s);
        assert!(used <= one_big + 100, "used {used}");
        assert_eq!(values[0], Value::Int(1));
        assert_eq!(values[1], big());
        assert!(matches!(values[2], Value::Cut(Cut { reason: CutReason::Size, .. })));
        assert!(s.size_cuts >= 1);
    }

    #[test]
    fn budget_enters_containers_and_keeps_what_fits() {
        let mut v = Value::List(List {
            type_name: None,
            items: (0..100).map(|_| Value::str("y".repeat(100))).collect(),
            omitted: 0,
        });
        let mut s = TruncationSummary::default();
        let used = fit_to_budget([&mut v], 2_000, &mut s);
        assert!(used <= 2_000);
        assert!(v.encoded_len() <= 2_000, "{}", v.encoded_len());
        match &v {
            Value::List(l) => {
                assert!(matches!(l.items[0], Value::Str(_)));
                assert!(l.omitted > 50, "{}", l.omitted);
                assert_eq!(l.items.len() as u64 + l.omitted, 100);
            }
            other => panic!("{other:?}"),
        }
    }
}
