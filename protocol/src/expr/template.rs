//! Dynamic log templates: text with `{expression}` placeholders, `{{` and `}}` for
//! literal braces.
//!
//! Each placeholder is a full expression, parsed when the template is, so a bad one is
//! refused at placement with its position in the template. Rendering evaluates each
//! placeholder to a [`Value`] and hands it to the caller's hook *before* it becomes
//! text: that is where the agent redacts it, exactly as it redacts snapshot values.
//! A placeholder that fails renders inline as `{source: error}` and is reported in
//! [`Rendered::errors`], so one bad value costs one placeholder, not the line; only
//! running out of budget abandons the line.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use super::error::{EvalError, ParseError};
use super::parser::too_long;
use super::scope::{Budget, Scope};
use super::{Expr, Roots};
use crate::limits::action_bounds::MAX_EXPRESSION_LEN;
use crate::value::{Value, truncate_chars};

/// A parsed log template; cheap to clone and shareable between threads.
#[derive(Clone)]
pub struct Template {
    inner: Arc<Inner>,
}

struct Inner {
    source: Box<str>,
    parts: Vec<Part>,
    placeholders: Vec<Expr>,
    roots: Roots,
}

enum Part {
    Text(String),
    Placeholder(usize),
}

/// A rendered line and what went wrong in it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Rendered {
    /// The line, at most [`Template::MAX_LINE_BYTES`] bytes.
    pub text: String,
    /// Placeholders that failed (rendered inline as `{source: error}`), in order.
    pub errors: Vec<PlaceholderError>,
    /// Whether the line was cut at [`Template::MAX_LINE_BYTES`] (it then ends with `…`).
    pub truncated: bool,
}

/// One placeholder's evaluation failure.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PlaceholderError {
    /// Index into [`Template::placeholders`].
    pub index: usize,
    /// Why it failed.
    pub error: EvalError,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Template").field(&self.inner.source).finish()
    }
}

impl Template {
    /// Longest rendered line, in bytes; longer lines are cut and end with `…`. Keeps
    /// one line well inside the per-agent log byte budget.
    pub const MAX_LINE_BYTES: usize = 4 * 1024;
    /// Longest rendering of one placeholder value, in bytes.
    pub const MAX_VALUE_BYTES: usize = 512;
    /// Items, entries or fields shown when a placeholder's value is a container.
    pub const MAX_ITEMS_SHOWN: usize = 10;

    /// Parses a template; errors carry their position in the whole template.
    ///
    /// ```
    /// use periscope_protocol::expr::Template;
    /// let t = Template::parse("user {user.id} paid {amount} for {order.id}").unwrap();
    /// assert_eq!(t.placeholders().len(), 3);
    /// let err = Template::parse("paid {amount >} {{ok}}").unwrap_err();
    /// assert_eq!(err.to_string(), "at column 15: expected an operand after \">\", found end of input");
    /// ```
    pub fn parse(src: &str) -> Result<Template, ParseError> {
        if src.len() > MAX_EXPRESSION_LEN {
            return Err(too_long(src));
        }
        let bytes = src.as_bytes();
        let at = |i: usize| bytes.get(i).copied();
        let mut parts = Vec::new();
        let mut placeholders = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while let Some(c) = at(i) {
            match c {
                b'{' if at(i + 1) == Some(b'{') => {
                    text.push('{');
                    i += 2;
                }
                b'{' => {
                    let close = placeholder_end(src, i)?;
                    let inner = src.get(i + 1..close).unwrap_or("");
                    let lead = inner.len() - inner.trim_start().len();
                    let expr_src = inner.trim();
                    if expr_src.is_empty() {
                        return Err(ParseError::expected(src, i + 1 + lead, "an expression inside \"{}\"", "\"}\""));
                    }
                    let expr = Expr::parse(expr_src).map_err(|e| e.relocate(src, i + 1 + lead))?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Placeholder(placeholders.len()));
                    placeholders.push(expr);
                    i = close + 1;
                }
                b'}' if at(i + 1) == Some(b'}') => {
                    text.push('}');
                    i += 2;
                }
                b'}' => {
                    return Err(ParseError::with_message(
                        src,
                        i,
                        "\"}}\" for a literal brace",
                        "a lone \"}\"",
                        "unmatched \"}\"; write \"}}\" for a literal brace",
                    ));
                }
                _ => {
                    let rest = src.get(i..).unwrap_or("");
                    let run = rest.find(['{', '}']).unwrap_or(rest.len());
                    text.push_str(rest.get(..run).unwrap_or(""));
                    i += run.max(1);
                }
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        let mut roots = Roots::default();
        for p in &placeholders {
            roots.merge(p.roots());
        }
        Ok(Template { inner: Arc::new(Inner { source: src.into(), parts, placeholders, roots }) })
    }

    /// The template as placed.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The placeholder expressions, in order of appearance; the index passed to the
    /// rendering hook indexes this.
    pub fn placeholders(&self) -> &[Expr] {
        &self.inner.placeholders
    }

    /// Every field and span field any placeholder may read.
    pub fn roots(&self) -> &Roots {
        &self.inner.roots
    }

    /// Renders one line.
    ///
    /// Each placeholder's value goes through `hook(index, expr, &mut value)` before it
    /// is turned into text; the agent redacts there (using
    /// [`Expr::field_name`] for key-name rules). Scalars render plainly (`42`, `3.5`,
    /// `abc`), containers compactly (`Order{id: 1, items: [..3 items]}`). A placeholder
    /// that fails renders as `{source: error}` and is listed in [`Rendered::errors`].
    /// Only [`EvalError::BudgetExceeded`] abandons the whole line.
    pub fn render<S: Scope + ?Sized>(
        &self,
        scope: &S,
        budget: &mut Budget,
        mut hook: impl FnMut(usize, &Expr, &mut Value),
    ) -> Result<Rendered, EvalError> {
        let mut text = String::new();
        let mut line = Bounded::over(&mut text, Self::MAX_LINE_BYTES);
        let mut errors = Vec::new();
        let mut piece = String::new();
        for part in &self.inner.parts {
            match part {
                Part::Text(t) => line.push(t),
                Part::Placeholder(index) => {
                    let Some(expr) = self.inner.placeholders.get(*index) else { continue };
                    piece.clear();
                    let mut w = Bounded::over(&mut piece, Self::MAX_VALUE_BYTES);
                    match expr.eval(scope, budget) {
                        Ok(mut value) => {
                            hook(*index, expr, &mut value);
                            write_value(&mut w, &value, false);
                        }
                        Err(e @ EvalError::BudgetExceeded { .. }) => return Err(e),
                        Err(error) => {
                            let _ = write!(w, "{{{}: {error}}}", expr.source());
                            errors.push(PlaceholderError { index: *index, error });
                        }
                    }
                    budget.charge_text(piece.len())?;
                    line.push(&piece);
                }
            }
            if line.cut {
                break;
            }
        }
        let truncated = line.cut;
        Ok(Rendered { text, errors, truncated })
    }
}

/// Finds the `}` closing the placeholder opened at `open`, skipping string literals.
fn placeholder_end(src: &str, open: usize) -> Result<usize, ParseError> {
    let bytes = src.as_bytes();
    let mut quote: Option<u8> = None;
    let mut j = open + 1;
    while let Some(&c) = bytes.get(j) {
        match quote {
            Some(_) if c == b'\\' => j += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if c == b'}' => return Ok(j),
            None if c == b'{' => {
                return Err(ParseError::with_message(
                    src,
                    j,
                    "\"}\" to close the placeholder",
                    "\"{\"",
                    "placeholders cannot contain \"{\"; close the previous placeholder with \"}\" first",
                ));
            }
            None => {}
        }
        j += 1;
    }
    Err(ParseError::with_message(
        src,
        open,
        "\"}\" to close the placeholder",
        "end of input",
        "unclosed placeholder: expected \"}\" to close the \"{\" here (write \"{{\" for a literal brace)",
    ))
}

/// A string writer that stops at a byte limit, on a character boundary, and marks the
/// cut with `…`, so rendering a huge value costs no more than its shown part.
struct Bounded<'o> {
    out: &'o mut String,
    left: usize,
    cut: bool,
}

impl<'o> Bounded<'o> {
    fn over(out: &'o mut String, limit: usize) -> Bounded<'o> {
        Bounded { out, left: limit, cut: false }
    }

    fn push(&mut self, s: &str) {
        if self.cut {
            return;
        }
        if s.len() <= self.left {
            self.left -= s.len();
            self.out.push_str(s);
            return;
        }
        let mut end = self.left;
        while end > 0 && !s.is_char_boundary(end) {
            end -= 1;
        }
        self.out.push_str(s.get(..end).unwrap_or(""));
        self.out.push('…');
        self.left = 0;
        self.cut = true;
    }
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s);
        Ok(())
    }
}

/// Longest string shown inside a container, in characters.
const NESTED_STRING_CHARS: usize = 64;

fn write_float(w: &mut Bounded<'_>, f: f64) {
    let a = f.abs();
    if f.is_finite() && a != 0.0 && !(1e-5..1e16).contains(&a) {
        let _ = write!(w, "{f:e}");
    } else {
        let _ = write!(w, "{f}");
    }
}

/// Renders a value for a log line: plain scalars at the top, one level of children for
/// containers, nested containers summarized by their size.
fn write_value(w: &mut Bounded<'_>, v: &Value, nested: bool) {
    if w.cut {
        return;
    }
    let more = |w: &mut Bounded<'_>, shown: usize, total: u64| {
        let rest = total.saturating_sub(shown as u64);
        if rest > 0 {
            let _ = write!(w, "{}..{rest} more", if shown > 0 { ", " } else { "" });
        }
    };
    match v {
        Value::Null => w.push("null"),
        Value::Bool(b) => w.push(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(w, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(w, "{u}");
        }
        Value::Float(f) => write_float(w, *f),
        Value::Str(t) => {
            if nested {
                let short = truncate_chars(&t.value, NESTED_STRING_CHARS);
                let _ = write!(w, "{short:?}");
                if short.len() < t.value.len() || t.original_len.is_some() {
                    w.push("…");
                }
            } else {
                w.push(&t.value);
                if t.original_len.is_some() {
                    w.push("…");
                }
            }
        }
        Value::List(l) => {
            let total = (l.items.len() as u64).saturating_add(l.omitted);
            if nested {
                let _ = if total == 0 { write!(w, "[]") } else { write!(w, "[..{total} items]") };
                return;
            }
            w.push("[");
            for (i, item) in l.items.iter().take(Template::MAX_ITEMS_SHOWN).enumerate() {
                if i > 0 {
                    w.push(", ");
                }
                write_value(w, item, true);
            }
            more(w, l.items.len().min(Template::MAX_ITEMS_SHOWN), total);
            w.push("]");
        }
        Value::Map(m) => {
            let total = (m.entries.len() as u64).saturating_add(m.omitted);
            if nested {
                let _ = if total == 0 { write!(w, "{{}}") } else { write!(w, "{{..{total} entries}}") };
                return;
            }
            w.push("{");
            for (i, (k, v)) in m.entries.iter().take(Template::MAX_ITEMS_SHOWN).enumerate() {
                if i > 0 {
                    w.push(", ");
                }
                write_value(w, k, true);
                w.push(": ");
                write_value(w, v, true);
            }
            more(w, m.entries.len().min(Template::MAX_ITEMS_SHOWN), total);
            w.push("}");
        }
        Value::Object(o) => {
            let total = (o.fields.len() as u64).saturating_add(o.omitted);
            w.push(truncate_chars(&o.type_name, NESTED_STRING_CHARS));
            if nested {
                let _ = if total == 0 { write!(w, "{{}}") } else { write!(w, "{{..{total} fields}}") };
                return;
            }
            w.push("{");
            for (i, f) in o.fields.iter().take(Template::MAX_ITEMS_SHOWN).enumerate() {
                if i > 0 {
                    w.push(", ");
                }
                w.push(truncate_chars(&f.name, NESTED_STRING_CHARS));
                w.push(": ");
                write_value(w, &f.value, true);
            }
            more(w, o.fields.len().min(Template::MAX_ITEMS_SHOWN), total);
            w.push("}");
        }
        Value::Cut(c) => {
            w.push("<truncated");
            if let Some(t) = &c.type_name {
                w.push(" ");
                w.push(truncate_chars(t, NESTED_STRING_CHARS));
            }
            w.push(">");
        }
    }
}

/// Renders `v` the way a template placeholder would, bounded to `max_bytes`.
pub(crate) fn display_value(v: &Value, max_bytes: usize) -> String {
    let mut out = String::new();
    write_value(&mut Bounded::over(&mut out, max_bytes), v, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{Field, List, Object};

    #[test]
    fn containers_render_one_level_deep_and_summarize_below() {
        let order = Value::Object(Object {
            type_name: "Order".into(),
            fields: vec![
                Field::new("id", Value::Int(1)),
                Field::new(
                    "items",
                    Value::List(List { type_name: None, items: vec![Value::Int(1), Value::Int(2)], omitted: 1 }),
                ),
                Field::new("note", Value::str("hi \"there\"")),
            ],
            omitted: 2,
        });
        assert_eq!(
            display_value(&order, 512),
            "Order{id: 1, items: [..3 items], note: \"hi \\\"there\\\"\", ..2 more}"
        );
        let list = Value::List(List { type_name: None, items: (0..12).map(Value::Int).collect(), omitted: 0 });
        assert_eq!(display_value(&list, 512), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ..2 more]");
    }

    #[test]
    fn floats_render_plainly_and_huge_ones_in_exponent_form() {
        assert_eq!(display_value(&Value::Float(3.5), 64), "3.5");
        assert_eq!(display_value(&Value::Float(1e300), 64), "1e300");
        assert_eq!(display_value(&Value::Float(f64::NAN), 64), "NaN");
    }

    #[test]
    fn a_long_value_is_cut_on_a_character_boundary() {
        let s = display_value(&Value::str("é".repeat(100)), 11);
        assert_eq!(s, format!("{}…", "é".repeat(5)));
    }
}
