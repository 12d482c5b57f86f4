//! Turning `Debug` text back into structure.
//!
//! `tracing` hands a layer the values recorded with `?value` (and `%value`) only as
//! `fmt::Debug` text. Kept as one string, a captured `Order` would be a single opaque
//! blob: the depth limit could not apply, a list of a thousand items would cost as much
//! as the string limit allows and then stop mid-item, and redaction could not see that
//! `card_number: "4111…"` is a field named `card_number`. This module parses the shapes
//! `#[derive(Debug)]` and the standard library print, compact (`{:?}`) or pretty
//! (`{:#?}`), back into a [`Value`], so that depth, item and field limits apply to the
//! real structure.
//!
//! Limits are applied *while* parsing, not afterwards: a container below `max_depth` is
//! skipped as balanced text and replaced by a [`CutReason::Depth`] marker, items beyond
//! `max_items` and fields beyond `max_fields` are skipped and counted, and strings keep
//! at most `max_string_len` characters while their full length is counted. A gigantic
//! Debug string therefore costs memory bounded by the limits and one linear pass (plus
//! at most one re-scan per nesting level when a sub-value turns out to be malformed).
//! The result obeys the limits exactly as [`truncate`](periscope_protocol::value::truncate)
//! defines them, so truncating it again changes nothing.
//!
//! Parsing never fails. Text that is not one of the recognized shapes becomes a string:
//! a whole input that does not parse becomes a [`Value::Str`] of the raw text, and a
//! sub-value that does not parse (a `Duration` printed as `1.5s`, an address printed as
//! `127.0.0.1`, a UUID, a hand-written `Debug` impl) becomes a string of its own raw
//! text while its siblings keep their structure.
//!
//! # Shapes
//!
//! | text | value |
//! |---|---|
//! | `Name { a: 1, b: "x" }`, `Name { a: 1, .. }` | object `Name` with fields `a`, `b` |
//! | `Point(1, 2)`, `Some(5)` | object with fields `0`, `1` |
//! | `None`, `Empty`, `Foo::Bar`, `ada` | string (a bare name may be a unit variant or `%display` text) |
//! | `[1, 2]`, `Array [1]` | list (the second named `Array`) |
//! | `(1, "a")`, `()` | list with type name `tuple` |
//! | `{"k": 1}`, `Name {"k": 1}` | map |
//! | `{1, 2}` | list with type name `set` |
//! | `"a\n\u{1f600}"`, `'c'`, `b"GET\x00"` | string, escapes decoded |
//! | `-12`, `18446744073709551615`, `0x1f` | int, uint beyond `i64`, string beyond `u64` |
//! | `1.5`, `1e-7`, `NaN`, `inf`, `-inf` | float |
//! | `true`, `false` | bool |
//! | anything else | string of the raw text |

use periscope_protocol::CaptureLimits;
use periscope_protocol::value::{
    Cut, CutReason, Field, List, Map, Object, Text, TruncationSummary, Value, truncate_chars,
};

/// Nesting the parser descends into whatever `max_depth` says: containers deeper than
/// this are always depth cuts. It bounds the parser's recursion (and so its stack use)
/// for callers that pass limits above [`CaptureLimits::HARD_MAX`].
pub const MAX_NESTING: u32 = 64;

/// Parses `{:?}`/`{:#?}` output into a [`Value`], applying `limits` while parsing.
///
/// Never fails: what is not recognized becomes a string of the raw text (see the
/// [module docs](self)). The result is already truncated, so a gigantic input costs
/// memory bounded by `limits`, not by its length.
pub fn parse_debug(text: &str, limits: &CaptureLimits) -> Value {
    let mut summary = TruncationSummary::default();
    parse_debug_with_summary(text, limits, &mut summary)
}

/// Like [`parse_debug`], and adds to `summary` what the limits removed, so that a hit
/// can report it without walking the value again.
pub fn parse_debug_with_summary(text: &str, limits: &CaptureLimits, summary: &mut TruncationSummary) -> Value {
    let mut parser = Parser::new(text, limits);
    parser.skip_ws();
    let parsed = parser.value(1);
    parser.skip_ws();
    match parsed {
        Some(value) if parser.pos >= parser.bytes.len() => {
            summary.absorb(parser.summary);
            value
        }
        _ => {
            let mut raw = Parser::new(text, limits);
            let value = Value::Str(raw.short_text(text));
            summary.absorb(raw.summary);
            value
        }
    }
}

/// How a container opened, which decides what it becomes and what a depth cut names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opener<'a> {
    /// `[`: a list.
    Bracket,
    /// `(`: a tuple.
    Paren,
    /// `{`: a map or a set.
    Brace,
    /// `Name {`: a struct, or a map or set printed with a name.
    NamedBrace(&'a str),
    /// `Name(`: a tuple struct or variant.
    NamedParen(&'a str),
    /// `Name [`: a list printed with a name (`serde_json::Value::Array`).
    NamedBracket(&'a str),
}

/// Where an element's text ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// At `,` or a closing bracket.
    Item,
    /// Also at a lone `:`, for map keys.
    Key,
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    max_depth: u32,
    max_items: usize,
    max_fields: usize,
    max_string_len: usize,
    summary: TruncationSummary,
    // Children of the containers being parsed, as stacks: each container pushes its
    // children above its parent's and drains them into one exactly sized `Vec` when it
    // closes, so a container costs one allocation however many children it has.
    values: Vec<Value>,
    fields: Vec<Field>,
    entries: Vec<(Value, Value)>,
}

const TUPLE: &str = "tuple";
const SET: &str = "set";

fn is_closer(b: u8) -> bool {
    matches!(b, b']' | b')' | b'}')
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

/// Whether a path looks like a type name: its last segment (before any generics)
/// starts with an uppercase letter. Only such a name may open a named list
/// (`Array [1]`); a lowercase word before `[` is text.
fn names_a_type(path: &str) -> bool {
    let base = path.split('<').next().unwrap_or(path);
    let last = base.rsplit("::").next().unwrap_or(base);
    last.chars().next().is_some_and(char::is_uppercase)
}

fn to_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl<'a> Parser<'a> {
    fn new(src: &'a str, limits: &CaptureLimits) -> Self {
        Parser {
            src,
            bytes: src.as_bytes(),
            pos: 0,
            max_depth: limits.max_depth.min(MAX_NESTING),
            max_items: to_usize(limits.max_items),
            max_fields: to_usize(limits.max_fields),
            max_string_len: to_usize(limits.max_string_len),
            summary: TruncationSummary::default(),
            values: Vec::new(),
            fields: Vec::new(),
            entries: Vec::new(),
        }
    }

    // -- small helpers -------------------------------------------------------------

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn byte_at(&self, i: usize) -> Option<u8> {
        self.bytes.get(i).copied()
    }

    /// The text between two byte offsets; empty when they do not fall on characters,
    /// which the callers never ask for (every offset they pass sits next to ASCII).
    fn text(&self, from: usize, to: usize) -> &'a str {
        self.src.get(from..to).unwrap_or("")
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_ws) {
            self.pos += 1;
        }
    }

    /// A lone `:` at `i` (not half of a `::` path separator).
    fn lone_colon_at(&self, i: usize) -> bool {
        self.byte_at(i) == Some(b':')
            && self.byte_at(i + 1) != Some(b':')
            && (i == 0 || self.byte_at(i - 1) != Some(b':'))
    }

    /// Whether the parser stands (after whitespace) where an element may end.
    fn at_element_end(&mut self, stop: Stop) -> bool {
        self.skip_ws();
        match self.peek() {
            Some(b',') => true,
            Some(b) if is_closer(b) => true,
            Some(b':') => stop == Stop::Key && self.lone_colon_at(self.pos),
            _ => false,
        }
    }

    /// After an element inside a container: consumes a `,`, accepts a closer (left for
    /// the loop to consume), fails at the end of input or anything else.
    fn after_element(&mut self) -> Option<()> {
        self.skip_ws();
        match self.peek()? {
            b',' => {
                self.pos += 1;
                Some(())
            }
            b if is_closer(b) => Some(()),
            _ => None,
        }
    }

    /// A `..` element (non-exhaustive Debug output), which stands for nothing.
    fn at_dots(&self) -> bool {
        if self.byte_at(self.pos) != Some(b'.') || self.byte_at(self.pos + 1) != Some(b'.') {
            return false;
        }
        let mut i = self.pos + 2;
        while self.byte_at(i).is_some_and(is_ws) {
            i += 1;
        }
        self.byte_at(i).is_some_and(|b| b == b',' || is_closer(b))
    }

    fn must_cut(&self, level: u32) -> bool {
        level > 1 && level > self.max_depth
    }

    /// A string value kept to `max_string_len` characters, its full length recorded.
    fn short_text(&mut self, s: &str) -> Text {
        let kept = truncate_chars(s, self.max_string_len);
        if kept.len() == s.len() {
            return Text { value: s.to_owned(), original_len: None };
        }
        self.summary.strings_shortened += 1;
        Text { value: kept.to_owned(), original_len: Some(s.chars().count() as u64) }
    }

    /// The name of the positional field at `index` (`0`, `1`, ...).
    fn position_name(&self, index: usize) -> String {
        const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
        match SMALL.get(index) {
            Some(name) => self.name(name),
            None => self.name(&index.to_string()),
        }
    }

    /// A name (type, field) kept to `max_string_len` characters, as truncation does.
    fn name(&self, s: &str) -> String {
        truncate_chars(s, self.max_string_len).to_owned()
    }

    // -- scanning without building ------------------------------------------------

    /// Byte offset just past the string literal opening at `i`, or the end of input.
    fn string_end(&self, i: usize) -> usize {
        let mut j = i + 1;
        while let Some(b) = self.byte_at(j) {
            match b {
                b'"' => return j + 1,
                b'\\' => j += 2,
                _ => j += 1,
            }
        }
        self.bytes.len()
    }

    /// Advances from an element's start to its end: a `,` or an unmatched closer (or a
    /// lone `:` for keys) outside any brackets, strings and chars, or the end of input.
    /// Returns whether a lone `:` was seen outside brackets (a map entry).
    fn scan_element(&mut self, stop: Stop) -> bool {
        let mut depth = 0u64;
        let mut colon = false;
        while let Some(b) = self.peek() {
            match b {
                b'"' => self.pos = self.string_end(self.pos),
                b'\'' => match self.char_literal(self.pos) {
                    Some((_, len)) => self.pos += len,
                    None => self.pos += 1,
                },
                b'[' | b'(' | b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b']' | b')' | b'}' => {
                    if depth == 0 {
                        return colon;
                    }
                    depth -= 1;
                    self.pos += 1;
                }
                b',' if depth == 0 => return colon,
                b':' if depth == 0 => {
                    if self.byte_at(self.pos + 1) == Some(b':') {
                        self.pos += 2;
                    } else {
                        if stop == Stop::Key {
                            return colon;
                        }
                        colon = true;
                        self.pos += 1;
                    }
                }
                _ => self.pos += 1,
            }
        }
        colon
    }

    /// Skips a whole container from its opener, counting its direct children (`..`
    /// does not count). Returns the count and whether the first child was a `k: v`
    /// entry; `None` when the input ends first.
    fn skip_container(&mut self) -> Option<(u64, bool)> {
        self.pos += 1;
        let mut count = 0u64;
        let mut first_is_entry = None;
        loop {
            self.skip_ws();
            match self.peek()? {
                b if is_closer(b) => {
                    self.pos += 1;
                    return Some((count, first_is_entry.unwrap_or(false)));
                }
                _ => {
                    let start = self.pos;
                    let colon = self.scan_element(Stop::Item);
                    if self.text(start, self.pos).trim_end() != ".." {
                        count += 1;
                        first_is_entry.get_or_insert(colon);
                    }
                    self.after_element()?;
                }
            }
        }
    }

    // -- parsing ------------------------------------------------------------------

    /// One value at `level` (the top is 1). `None` when the text here is not a value
    /// of a recognized shape; the parser's position is then meaningless.
    fn value(&mut self, level: u32) -> Option<Value> {
        match self.peek()? {
            b'"' => self.string_literal().map(Value::Str),
            // A byte string (`bytes::Bytes`, `b"GET"`): same escapes.
            b'b' if self.byte_at(self.pos + 1) == Some(b'"') => {
                self.pos += 1;
                self.string_literal().map(Value::Str)
            }
            b'\'' => {
                let (c, len) = self.char_literal(self.pos)?;
                self.pos += len;
                Some(Value::str(c))
            }
            b'[' => self.container(level, Opener::Bracket),
            b'(' => self.container(level, Opener::Paren),
            b'{' => self.container(level, Opener::Brace),
            b'-' | b'0'..=b'9' => self.number(),
            _ => self.named(level),
        }
    }

    /// An element of a container: a value that ends where the element ends, or else
    /// the element's raw text as a string.
    fn element(&mut self, level: u32, stop: Stop) -> Value {
        let start = self.pos;
        let saved = self.summary;
        let stacks = (self.values.len(), self.fields.len(), self.entries.len());
        if let Some(value) = self.value(level)
            && self.at_element_end(stop)
        {
            return value;
        }
        // Containers that failed inside this element left their children behind.
        self.values.truncate(stacks.0);
        self.fields.truncate(stacks.1);
        self.entries.truncate(stacks.2);
        self.summary = saved;
        self.pos = start;
        self.scan_element(stop);
        let raw = self.text(start, self.pos).trim_end();
        Value::Str(self.short_text(raw))
    }

    /// A container from its opener (the parser stands on the `[`, `(` or `{`).
    fn container(&mut self, level: u32, opener: Opener<'a>) -> Option<Value> {
        if self.must_cut(level) {
            let (count, first_is_entry) = self.skip_container()?;
            if count == 0 {
                return Some(self.empty(opener));
            }
            let type_name = match opener {
                Opener::Bracket => None,
                Opener::Paren => Some(self.name(TUPLE)),
                Opener::Brace if first_is_entry => None,
                Opener::Brace => Some(self.name(SET)),
                Opener::NamedBrace(name) | Opener::NamedParen(name) | Opener::NamedBracket(name) => {
                    Some(self.name(name))
                }
            };
            self.summary.depth_cuts += 1;
            return Some(Value::Cut(Cut { reason: CutReason::Depth, type_name, size: Some(count) }));
        }
        self.pos += 1;
        match opener {
            Opener::Bracket => {
                let (items, omitted) = self.sequence(level)?;
                Some(Value::List(List { type_name: None, items, omitted }))
            }
            Opener::Paren => {
                let (items, omitted) = self.sequence(level)?;
                Some(Value::List(List { type_name: Some(TUPLE.to_owned()), items, omitted }))
            }
            Opener::Brace => self.braces(level, None),
            Opener::NamedBrace(name) => {
                if self.struct_ahead() {
                    let (fields, omitted) = self.struct_fields(level)?;
                    Some(Value::Object(Object { type_name: self.name(name), fields, omitted }))
                } else {
                    self.braces(level, Some(name))
                }
            }
            Opener::NamedParen(name) => {
                let (fields, omitted) = self.tuple_fields(level)?;
                Some(Value::Object(Object { type_name: self.name(name), fields, omitted }))
            }
            Opener::NamedBracket(name) => {
                let (items, omitted) = self.sequence(level)?;
                Some(Value::List(List { type_name: Some(self.name(name)), items, omitted }))
            }
        }
    }

    /// What a container with no children is, when it is not parsed (depth cut).
    fn empty(&self, opener: Opener<'a>) -> Value {
        match opener {
            Opener::Bracket => Value::List(List::default()),
            Opener::Paren => Value::List(List { type_name: Some(TUPLE.to_owned()), ..List::default() }),
            Opener::Brace => Value::Map(Map::default()),
            Opener::NamedBrace(name) | Opener::NamedParen(name) => {
                Value::Object(Object { type_name: self.name(name), ..Object::default() })
            }
            Opener::NamedBracket(name) => Value::List(List { type_name: Some(self.name(name)), ..List::default() }),
        }
    }

    /// Items of a list or tuple, after the opener, through the closer.
    fn sequence(&mut self, level: u32) -> Option<(Vec<Value>, u64)> {
        let base = self.values.len();
        let mut omitted = 0u64;
        loop {
            self.skip_ws();
            if is_closer(self.peek()?) {
                self.pos += 1;
                return Some((self.values.drain(base..).collect(), omitted));
            }
            if self.at_dots() {
                self.pos += 2;
            } else if self.values.len() - base >= self.max_items {
                self.scan_element(Stop::Item);
                omitted += 1;
                self.summary.items_omitted += 1;
            } else {
                let item = self.element(level + 1, Stop::Item);
                self.values.push(item);
            }
            self.after_element()?;
        }
    }

    /// Fields `0`, `1`, ... of a tuple struct or variant, after the `(`.
    fn tuple_fields(&mut self, level: u32) -> Option<(Vec<Field>, u64)> {
        let base = self.fields.len();
        let mut omitted = 0u64;
        loop {
            self.skip_ws();
            if is_closer(self.peek()?) {
                self.pos += 1;
                return Some((self.fields.drain(base..).collect(), omitted));
            }
            if self.at_dots() {
                self.pos += 2;
            } else if self.fields.len() - base >= self.max_fields {
                self.scan_element(Stop::Item);
                omitted += 1;
                self.summary.items_omitted += 1;
            } else {
                let name = self.position_name(self.fields.len() - base);
                let value = self.element(level + 1, Stop::Item);
                self.fields.push(Field { name, value });
            }
            self.after_element()?;
        }
    }

    /// Whether the braces just opened hold `field: value` pairs (or nothing, or `..`)
    /// rather than map entries or set items.
    fn struct_ahead(&self) -> bool {
        let mut i = self.pos;
        while self.byte_at(i).is_some_and(is_ws) {
            i += 1;
        }
        match self.byte_at(i) {
            Some(b'}') => return true,
            Some(b'.') if self.byte_at(i + 1) == Some(b'.') => return true,
            _ => {}
        }
        let end = self.field_name_end(i);
        if end == i {
            return false;
        }
        let mut j = end;
        while self.byte_at(j).is_some_and(is_ws) {
            j += 1;
        }
        self.lone_colon_at(j)
    }

    /// Named fields, after the `{`.
    fn struct_fields(&mut self, level: u32) -> Option<(Vec<Field>, u64)> {
        let base = self.fields.len();
        let mut omitted = 0u64;
        loop {
            self.skip_ws();
            if is_closer(self.peek()?) {
                self.pos += 1;
                return Some((self.fields.drain(base..).collect(), omitted));
            }
            if self.at_dots() {
                self.pos += 2;
            } else if self.fields.len() - base >= self.max_fields {
                self.scan_element(Stop::Item);
                omitted += 1;
                self.summary.items_omitted += 1;
            } else {
                let start = self.pos;
                let end = self.field_name_end(start);
                let mut colon = end;
                while self.byte_at(colon).is_some_and(is_ws) {
                    colon += 1;
                }
                let name = if end > start && self.lone_colon_at(colon) {
                    self.pos = colon + 1;
                    self.skip_ws();
                    let raw = self.text(start, end);
                    self.name(raw.strip_prefix("r#").unwrap_or(raw))
                } else {
                    // Not `name: value`: keep the element as a value under its position.
                    self.position_name(self.fields.len() - base)
                };
                let value = self.element(level + 1, Stop::Item);
                self.fields.push(Field { name, value });
            }
            self.after_element()?;
        }
    }

    /// A map or a set, after the `{`; which one is decided by the first element.
    fn braces(&mut self, level: u32, name: Option<&'a str>) -> Option<Value> {
        let (entries_base, items_base) = (self.entries.len(), self.values.len());
        let mut is_map: Option<bool> = None;
        let mut omitted = 0u64;
        loop {
            self.skip_ws();
            if is_closer(self.peek()?) {
                self.pos += 1;
                break;
            }
            if self.at_dots() {
                self.pos += 2;
            } else if (self.entries.len() - entries_base) + (self.values.len() - items_base) >= self.max_items {
                let colon = self.scan_element(Stop::Item);
                is_map.get_or_insert(colon);
                omitted += 1;
                self.summary.items_omitted += 1;
            } else {
                let (start, saved) = (self.pos, self.summary);
                let key = self.element(level + 1, Stop::Key);
                let has_value = self.lone_colon_at(self.pos);
                match (*is_map.get_or_insert(has_value), has_value) {
                    (true, true) => {
                        self.pos += 1;
                        self.skip_ws();
                        let value = self.element(level + 1, Stop::Item);
                        self.entries.push((key, value));
                    }
                    // A map element without `: value`: keep what there is.
                    (true, false) => self.entries.push((key, Value::Null)),
                    (false, false) => self.values.push(key),
                    // A set element that looks like an entry: keep its raw text.
                    (false, true) => {
                        self.summary = saved;
                        self.pos = start;
                        self.scan_element(Stop::Item);
                        let raw = self.text(start, self.pos).trim_end();
                        let item = Value::Str(self.short_text(raw));
                        self.values.push(item);
                    }
                }
            }
            self.after_element()?;
        }
        let named = name.map(|n| self.name(n));
        let items: Vec<Value> = self.values.drain(items_base..).collect();
        let entries: Vec<(Value, Value)> = self.entries.drain(entries_base..).collect();
        Some(match is_map {
            Some(false) => Value::List(List { type_name: named.or_else(|| Some(SET.to_owned())), items, omitted }),
            _ => Value::Map(Map { type_name: named, entries, omitted }),
        })
    }

    /// A `"..."` literal with Debug escapes, kept to `max_string_len` characters.
    fn string_literal(&mut self) -> Option<Text> {
        let max = self.max_string_len;
        let mut out = String::new();
        let mut kept = 0usize;
        let mut total = 0u64;
        let mut i = self.pos + 1;
        loop {
            let rest = self.bytes.get(i..)?;
            let run = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
            let chunk = self.text(i, i + run);
            let n = if chunk.is_ascii() { chunk.len() } else { chunk.chars().count() };
            total += n as u64;
            if kept < max {
                let room = max - kept;
                if n <= room {
                    out.push_str(chunk);
                    kept += n;
                } else {
                    out.push_str(truncate_chars(chunk, room));
                    kept = max;
                }
            }
            i += run;
            if self.byte_at(i) == Some(b'"') {
                self.pos = i + 1;
                break;
            }
            let (c, len) = self.escape(i)?;
            total += 1;
            if kept < max {
                out.push(c);
                kept += 1;
            }
            i += len;
        }
        let original_len = if total > max as u64 {
            self.summary.strings_shortened += 1;
            Some(total)
        } else {
            None
        };
        Some(Text { value: out, original_len })
    }

    /// The escape sequence at `i` (on a backslash) and its length in bytes. An escape
    /// Debug never prints stands for a literal backslash; `None` at the end of input.
    fn escape(&self, i: usize) -> Option<(char, usize)> {
        let next = self.byte_at(i + 1)?;
        let simple = match next {
            b'n' => Some('\n'),
            b't' => Some('\t'),
            b'r' => Some('\r'),
            b'0' => Some('\0'),
            b'\\' => Some('\\'),
            b'"' => Some('"'),
            b'\'' => Some('\''),
            _ => None,
        };
        if let Some(c) = simple {
            return Some((c, 2));
        }
        let hex = |from: usize, to: usize| u32::from_str_radix(self.text(from, to), 16).ok();
        match next {
            b'u' if self.byte_at(i + 2) == Some(b'{') => {
                let digits = (i + 3..i + 10).take_while(|&j| self.byte_at(j).is_some_and(|b| b.is_ascii_hexdigit()));
                let end = digits.last().map_or(i + 3, |j| j + 1);
                if end > i + 3
                    && self.byte_at(end) == Some(b'}')
                    && let Some(c) = hex(i + 3, end).and_then(char::from_u32)
                {
                    return Some((c, end + 1 - i));
                }
            }
            b'x' if self.byte_at(i + 2).is_some_and(|b| b.is_ascii_hexdigit())
                && self.byte_at(i + 3).is_some_and(|b| b.is_ascii_hexdigit()) =>
            {
                if let Some(c) = hex(i + 2, i + 4).and_then(char::from_u32) {
                    return Some((c, 4));
                }
            }
            _ => {}
        }
        Some(('\\', 1))
    }

    /// A `'c'` literal at `i`: the char and the literal's length in bytes.
    fn char_literal(&self, i: usize) -> Option<(char, usize)> {
        let (c, len) = match self.byte_at(i + 1)? {
            b'\\' => {
                let (c, len) = self.escape(i + 1)?;
                // A lone backslash is no escape inside a char literal.
                if len == 1 { return None } else { (c, len) }
            }
            b'\'' => return None,
            _ => {
                let c = self.src.get(i + 1..)?.chars().next()?;
                (c, c.len_utf8())
            }
        };
        (self.byte_at(i + 1 + len) == Some(b'\'')).then_some((c, len + 2))
    }

    /// An integer or float, including `-inf` and `0x` hex.
    fn number(&mut self) -> Option<Value> {
        let start = self.pos;
        let mut i = start;
        if self.byte_at(i) == Some(b'-') {
            i += 1;
            if self.text(i, i + 3) == "inf" && self.ident_end(i) == i + 3 {
                self.pos = i + 3;
                return Some(Value::Float(f64::NEG_INFINITY));
            }
        }
        let digits = |mut j: usize| {
            while self.byte_at(j).is_some_and(|b| b.is_ascii_digit()) {
                j += 1;
            }
            j
        };
        if i == start && self.byte_at(i) == Some(b'0') && self.byte_at(i + 1) == Some(b'x') {
            let mut j = i + 2;
            while self.byte_at(j).is_some_and(|b| b.is_ascii_hexdigit()) {
                j += 1;
            }
            if j > i + 2 {
                self.pos = j;
                let hex = self.text(i + 2, j);
                return Some(match u64::from_str_radix(hex, 16) {
                    Ok(n) => i64::try_from(n).map_or(Value::UInt(n), Value::Int),
                    Err(_) => Value::Str(self.short_text(self.text(start, j))),
                });
            }
        }
        let int_end = digits(i);
        if int_end == i {
            return None;
        }
        let mut end = int_end;
        let mut is_float = false;
        if self.byte_at(end) == Some(b'.') && self.byte_at(end + 1).is_some_and(|b| b.is_ascii_digit()) {
            end = digits(end + 1);
            is_float = true;
        }
        if matches!(self.byte_at(end), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.byte_at(end + 1), Some(b'-' | b'+')));
            let exp_end = digits(end + 1 + sign);
            if exp_end > end + 1 + sign {
                end = exp_end;
                is_float = true;
            }
        }
        self.pos = end;
        let literal = self.text(start, end);
        if is_float {
            return literal.parse::<f64>().ok().map(Value::Float);
        }
        Some(if let Ok(n) = literal.parse::<i64>() {
            Value::Int(n)
        } else if let Ok(n) = literal.parse::<u64>() {
            Value::UInt(n)
        } else {
            Value::Str(self.short_text(literal))
        })
    }

    /// A path-named value: a struct, tuple struct or variant with fields, one of the
    /// words `true`, `false`, `NaN`, `inf`, or else a bare name (a unit struct or
    /// variant, or `%display` text), which is a string.
    fn named(&mut self, level: u32) -> Option<Value> {
        let start = self.pos;
        let end = self.path_end(start);
        if end == start {
            return None;
        }
        let name = self.text(start, end);
        self.pos = end;
        // Derive prints `Name(..)` with no space but `Name { .. }` with one; text such
        // as `failed (code 5)` is Display output, not a tuple struct.
        if self.peek() == Some(b'(') {
            return self.container(level, Opener::NamedParen(name));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'{') => return self.container(level, Opener::NamedBrace(name)),
            Some(b'[') if names_a_type(name) => return self.container(level, Opener::NamedBracket(name)),
            _ => self.pos = end,
        }
        Some(match name {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "NaN" => Value::Float(f64::NAN),
            "inf" => Value::Float(f64::INFINITY),
            // A bare name, whether a unit variant (`Paid`, `None`) or a `%display` value
            // (which arrives through Debug too, indistinguishably), is kept as text:
            // conditions then compare it with a string (`status == "Paid"`).
            _ => Value::Str(self.short_text(name)),
        })
    }

    /// End of an identifier starting at `i` (`i` itself when there is none).
    fn ident_end(&self, i: usize) -> usize {
        // Nearly every identifier is ASCII: check bytes, and decode only when a
        // non-ASCII byte shows up.
        let mut j = i;
        while let Some(b) = self.byte_at(j) {
            let ok = if j == i { b.is_ascii_alphabetic() || b == b'_' } else { b.is_ascii_alphanumeric() || b == b'_' };
            if ok {
                j += 1;
            } else if b.is_ascii() {
                return j;
            } else {
                return self.unicode_ident_end(i);
            }
        }
        j
    }

    /// [`Parser::ident_end`] for identifiers with non-ASCII letters.
    fn unicode_ident_end(&self, i: usize) -> usize {
        let Some(rest) = self.src.get(i..) else { return i };
        let mut end = i;
        for (k, c) in rest.char_indices() {
            let ok = if k == 0 { c.is_alphabetic() || c == '_' } else { c.is_alphanumeric() || c == '_' };
            if !ok {
                break;
            }
            end = i + k + c.len_utf8();
        }
        end
    }

    /// End of a field name (an identifier, maybe raw: `r#type`).
    fn field_name_end(&self, i: usize) -> usize {
        if self.text(i, i + 2) == "r#" {
            let end = self.ident_end(i + 2);
            if end > i + 2 {
                return end;
            }
        }
        self.ident_end(i)
    }

    /// End of a type path: `Name`, `a::b::Name`, with generics `Name<T, U>`.
    fn path_end(&self, i: usize) -> usize {
        let mut end = self.ident_end(i);
        if end == i {
            return i;
        }
        while self.text(end, end + 2) == "::" {
            let next = self.ident_end(end + 2);
            if next == end + 2 {
                break;
            }
            end = next;
        }
        if self.byte_at(end) == Some(b'<') {
            let mut depth = 0u32;
            let mut j = end;
            // Generic arguments are short; give up on anything that is not.
            while j < end + 256 {
                match self.byte_at(j) {
                    Some(b'<') => depth += 1,
                    Some(b'>') => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    Some(b'"' | b'\'' | b'{' | b'}' | b'\n') | None => break,
                    Some(_) => {}
                }
                j += 1;
            }
        }
        end
    }
}

#[cfg(test)]
mod tests;
