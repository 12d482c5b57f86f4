//! What an expression can read: the [`Scope`] a caller hands to evaluation, and the
//! step [`Budget`] that bounds what evaluation may cost.
//!
//! The agent implements [`Scope`] over the values it captured at a hit (lazily, so a
//! condition that reads one field costs one field), the broker and tests use
//! [`SimpleScope`], and a stored [`Hit`] is a scope too. Nothing in a scope can be
//! called, written or iterated by an expression: it can only ask for values by name,
//! which is what makes evaluation free of side effects on the host.

use crate::hit::Hit;
use crate::value::{Field, Value};

use super::error::EvalError;

/// The values an expression may read at one hit.
///
/// Every method returns a borrow, so an implementation over already-captured fields
/// answers without allocating. Spans are searched innermost first.
pub trait Scope {
    /// An event field or local variable by name (`order`, `user.id` when the program
    /// recorded the dotted name as one field).
    fn field(&self, name: &str) -> Option<&Value>;

    /// A field of the innermost active span named `span`, or, when `span` is `None`,
    /// of the innermost active span that has a field called `field`.
    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&Value>;

    /// Whether an active span has this name; decides whether `span.a.b` means field
    /// `b` of span `a` or field `a` (then `.b` inside it) of any span.
    fn has_span(&self, name: &str) -> bool;
}

impl<T: Scope + ?Sized> Scope for &T {
    fn field(&self, name: &str) -> Option<&Value> {
        (**self).field(name)
    }
    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&Value> {
        (**self).span_field(span, field)
    }
    fn has_span(&self, name: &str) -> bool {
        (**self).has_span(name)
    }
}

fn find<'a>(fields: &'a [Field], name: &str) -> Option<&'a Value> {
    fields.iter().find(|f| f.name == name).map(|f| &f.value)
}

/// A scope made of owned fields and spans, for the broker (validating against sample
/// values), tests and benches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimpleScope {
    /// Event fields and locals.
    pub fields: Vec<Field>,
    /// Active spans as (name, fields), innermost first.
    pub spans: Vec<(String, Vec<Field>)>,
}

impl SimpleScope {
    /// An empty scope: every path reads as `null`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event field.
    pub fn with_field(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.push(Field::new(name, value.into()));
        self
    }

    /// Adds a span *outside* the ones already added (spans are kept innermost first).
    pub fn with_span(mut self, name: impl Into<String>, fields: Vec<Field>) -> Self {
        self.spans.push((name.into(), fields));
        self
    }
}

impl Scope for SimpleScope {
    fn field(&self, name: &str) -> Option<&Value> {
        find(&self.fields, name)
    }

    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&Value> {
        match span {
            Some(s) => self.spans.iter().find(|(n, _)| n == s).and_then(|(_, f)| find(f, field)),
            None => self.spans.iter().find_map(|(_, f)| find(f, field)),
        }
    }

    fn has_span(&self, name: &str) -> bool {
        self.spans.iter().any(|(n, _)| n == name)
    }
}

/// A stored hit is a scope over its fields and span frames, so the broker can evaluate
/// an expression against what an agent sent.
impl Scope for Hit {
    fn field(&self, name: &str) -> Option<&Value> {
        find(&self.fields, name)
    }

    fn span_field(&self, span: Option<&str>, field: &str) -> Option<&Value> {
        match span {
            Some(s) => self.spans.iter().find(|f| f.name == s).and_then(|f| find(&f.fields, field)),
            None => self.spans.iter().find_map(|f| find(&f.fields, field)),
        }
    }

    fn has_span(&self, name: &str) -> bool {
        self.spans.iter().any(|f| f.name == name)
    }
}

/// The most an evaluation may cost, in steps, and what it has cost so far.
///
/// A step is roughly one tree node visited, one path segment walked, one scope lookup,
/// 16 fields or items scanned, or 32 bytes of text scanned by a string helper or a
/// comparison. Exceeding the limit stops evaluation with
/// [`EvalError::BudgetExceeded`]. One budget may be shared by everything evaluated at a
/// hit (condition, watches, template), so the agent can bound a hit's total cost and
/// charge [`Budget::used`] to its CPU quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    /// Enough for any sensible condition (a typical one costs under 20 steps) while
    /// keeping a hostile one to tens of microseconds.
    pub const DEFAULT_STEPS: u64 = 10_000;

    /// A budget of `limit` steps.
    pub fn new(limit: u64) -> Self {
        Budget { limit, used: 0 }
    }

    /// Steps spent so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Steps left before evaluation is stopped.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// The limit this budget was created with.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Starts counting again from zero, for reuse at the next hit.
    pub fn reset(&mut self) {
        self.used = 0;
    }

    #[inline]
    pub(crate) fn charge(&mut self, steps: u64) -> Result<(), EvalError> {
        self.used = self.used.saturating_add(steps);
        if self.used > self.limit { Err(EvalError::BudgetExceeded { limit: self.limit }) } else { Ok(()) }
    }

    /// Charges for scanning `bytes` bytes of text.
    #[inline]
    pub(crate) fn charge_text(&mut self, bytes: usize) -> Result<(), EvalError> {
        self.charge((bytes / 32) as u64)
    }

    /// Charges for scanning `n` fields, entries or items.
    #[inline]
    pub(crate) fn charge_scan(&mut self, n: usize) -> Result<(), EvalError> {
        self.charge((n / 16) as u64)
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(Self::DEFAULT_STEPS)
    }
}
