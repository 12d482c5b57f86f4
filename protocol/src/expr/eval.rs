//! Evaluates a compiled tree against a [`Scope`], within a [`Budget`].
//!
//! Values flow through evaluation as [`Val`]: scalars by value, strings and captured
//! containers borrowed from the scope or from the tree, so a condition like
//! `status == "failed" && amount > 1000` runs without allocating. Only results that
//! are new (`lower(s)` with capitals in it, `a + b` on strings, a list literal with
//! computed items) own their data.
//!
//! Rules, spelled out in `docs/expressions.md`: missing fields, out-of-range indexes and
//! `null` in the middle of a path give `null`; a value cut by capture limits gives
//! [`EvalError::Truncated`] whenever the answer depends on what was cut; ordering
//! comparisons involving `null` are false; arithmetic with `null` is `null`; `null` is
//! false where true or false is needed.
//!
//! A string that is a whole redaction marker (`[REDACTED:PASSWORD]`) is a *redacted
//! value*: it can be shown (a watch, a template placeholder) and compared with `null`,
//! and any other use fails with [`EvalError::Redacted`], so no operator, function or
//! path can learn anything about what redaction hid.

use std::borrow::Cow;
use std::cmp::Ordering;

use super::ast::{ArithOp, Base, CmpOp, Func, Kind, NameRun, Node, Path, SegKind};
use super::error::{EvalError, quote};
use super::scope::{Budget, Scope};
use crate::value::{Cut, CutReason, List, Map, Object, Text, Value, is_redaction_marker};

/// Deepest nesting of values compared structurally (`==` on lists, maps, objects).
const MAX_COMPARE_DEPTH: u32 = 32;

/// A value during evaluation.
#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Text and, when it was shortened by capture limits, its original length in chars.
    Str(Cow<'a, str>, Option<u64>),
    /// A redaction marker standing for a value redaction hid (the marker's text).
    Redacted(&'a str),
    /// A captured list, map or object.
    Ref(&'a Value),
    /// A capture-limit marker, and its nesting level when reached through a path.
    Cut(&'a Cut, Option<u32>),
    /// A value built during evaluation (a list literal with computed items).
    Owned(Box<Value>),
}

impl<'a> Val<'a> {
    #[inline]
    fn of(v: &'a Value, depth: Option<u32>) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Int(i) => Val::Int(*i),
            Value::UInt(u) => Val::UInt(*u),
            Value::Float(f) => Val::Float(*f),
            Value::Str(t) if is_redaction_marker(&t.value) => Val::Redacted(&t.value),
            Value::Str(t) => Val::Str(Cow::Borrowed(&t.value), t.original_len),
            Value::Cut(c) => Val::Cut(c, depth),
            Value::List(_) | Value::Map(_) | Value::Object(_) => Val::Ref(v),
        }
    }

    #[inline]
    fn view(&self) -> View<'_> {
        match self {
            Val::Null => View::Null,
            Val::Bool(b) => View::Bool(*b),
            Val::Int(i) => View::Num(Num::I(i128::from(*i))),
            Val::UInt(u) => View::Num(Num::I(i128::from(*u))),
            Val::Float(f) => View::Num(Num::F(*f)),
            Val::Str(s, t) => View::Str(s, *t),
            Val::Redacted(m) => View::Redacted(m),
            Val::Ref(v) => View::of(v),
            Val::Cut(c, _) => View::Cut(c),
            Val::Owned(v) => View::of(v),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        self.view().kind()
    }

    pub(crate) fn into_value(self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(b),
            Val::Int(i) => Value::Int(i),
            Val::UInt(u) => Value::UInt(u),
            Val::Float(f) => Value::Float(f),
            Val::Str(s, original_len) => Value::Str(Text { value: s.into_owned(), original_len }),
            Val::Redacted(m) => Value::str(m),
            Val::Ref(v) => v.clone(),
            Val::Cut(c, _) => Value::Cut(c.clone()),
            Val::Owned(v) => *v,
        }
    }

    /// The same value, no longer borrowing from a temporary.
    fn into_static(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Int(i) => Val::Int(i),
            Val::UInt(u) => Val::UInt(u),
            Val::Float(f) => Val::Float(f),
            Val::Str(s, t) => Val::Str(Cow::Owned(s.into_owned()), t),
            other => Val::Owned(Box::new(other.into_value())),
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::UInt(u) => Some(*u as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// A number, wide enough to hold every `i64` and `u64` exactly.
#[derive(Debug, Clone, Copy)]
enum Num {
    I(i128),
    F(f64),
}

impl Num {
    fn f64(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }
}

/// A borrowed look at a value, the one shape all operators work on.
#[derive(Debug, Clone, Copy)]
enum View<'v> {
    Null,
    Bool(bool),
    Num(Num),
    Str(&'v str, Option<u64>),
    List(&'v List),
    Map(&'v Map),
    Object(&'v Object),
    Cut(&'v Cut),
    /// A redaction marker (its text).
    Redacted(&'v str),
}

impl<'v> View<'v> {
    fn of(v: &'v Value) -> View<'v> {
        match v {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Int(i) => View::Num(Num::I(i128::from(*i))),
            Value::UInt(u) => View::Num(Num::I(i128::from(*u))),
            Value::Float(f) => View::Num(Num::F(*f)),
            Value::Str(t) if is_redaction_marker(&t.value) => View::Redacted(&t.value),
            Value::Str(t) => View::Str(&t.value, t.original_len),
            Value::List(l) => View::List(l),
            Value::Map(m) => View::Map(m),
            Value::Object(o) => View::Object(o),
            Value::Cut(c) => View::Cut(c),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            View::Null => "null",
            View::Bool(_) => "bool",
            View::Num(Num::I(_)) => "int",
            View::Num(Num::F(_)) => "float",
            View::Str(..) => "string",
            View::List(_) => "list",
            View::Map(_) => "map",
            View::Object(_) => "object",
            View::Cut(_) => "truncated value",
            View::Redacted(_) => "redacted value",
        }
    }
}

/// What evaluation reads: the scope and the expression's source (to quote in errors).
pub(crate) struct Cx<'a, S: ?Sized> {
    pub scope: &'a S,
    pub src: &'a str,
}

impl<S: ?Sized> Cx<'_, S> {
    #[cold]
    fn snippet(&self, n: &Node) -> String {
        quote(self.src.get(n.start as usize..n.end as usize).unwrap_or(""))
    }

    #[cold]
    fn snippet_to(&self, n: &Node, end: u32) -> String {
        quote(self.src.get(n.start as usize..end as usize).unwrap_or(""))
    }

    #[cold]
    fn mismatch(&self, op: &'static str, a: View<'_>, b: View<'_>, n: &Node) -> EvalError {
        EvalError::TypeMismatch { op, left: a.kind(), right: b.kind(), expr: self.snippet(n) }
    }

    #[cold]
    fn bad_operand(&self, op: &'static str, v: View<'_>, n: &Node) -> EvalError {
        EvalError::BadOperand { op, operand: v.kind(), expr: self.snippet(n) }
    }

    #[cold]
    fn bad_argument(&self, func: Func, expected: &'static str, v: View<'_>, n: &Node) -> EvalError {
        EvalError::BadArgument { function: func.name(), expected, found: v.kind(), expr: self.snippet(n) }
    }

    /// The error for a cut value met as an operand of `what`.
    #[cold]
    fn cut_operand(&self, val: &Val<'_>, operand: &Node, what: &str) -> EvalError {
        let (cut, depth) = match val {
            Val::Cut(c, d) => (Some(*c), *d),
            Val::Owned(v) => match &**v {
                Value::Cut(c) => (Some(c), None),
                _ => (None, None),
            },
            _ => (None, None),
        };
        EvalError::Truncated {
            path: self.snippet(operand),
            depth,
            detail: format!("{}, so {what} cannot use it", cut.map_or_else(|| "was cut".to_owned(), describe_cut)),
        }
    }

    /// The error for a redacted value (`marker`) used by `n` in any way but showing it or
    /// comparing it with null.
    #[cold]
    fn redacted(&self, n: &Node, marker: &str) -> EvalError {
        EvalError::Redacted { expr: self.snippet(n), marker: truncate_marker(marker) }
    }

    /// The error for an answer that depends on a part of a value capture limits removed.
    #[cold]
    fn unknown(&self, n: &Node, detail: &str) -> EvalError {
        EvalError::Truncated { path: self.snippet(n), depth: None, detail: detail.to_owned() }
    }
}

/// A marker's text for an error message (markers are short; this only bounds it).
fn truncate_marker(marker: &str) -> String {
    crate::value::truncate_chars(marker, 64).to_owned()
}

fn describe_cut(c: &Cut) -> String {
    let what = c.type_name.as_deref().map_or_else(|| "the value".to_owned(), |t| format!("a {t}"));
    match (c.reason, c.size) {
        (CutReason::Depth, Some(n)) => {
            format!("is {what} with {n} children that capture limits left out (depth limit)")
        }
        (CutReason::Depth, None) => format!("is {what} that capture limits left out (depth limit)"),
        (CutReason::Size, Some(n)) => {
            format!("is {what} of {n} bytes dropped to keep the hit under its size limit")
        }
        (CutReason::Size, None) => format!("is {what} dropped to keep the hit under its size limit"),
        _ => format!("is {what} that the agent could not capture"),
    }
}

/// Evaluates `n`.
pub(crate) fn eval<'a, S: Scope + ?Sized>(n: &'a Node, cx: &Cx<'a, S>, b: &mut Budget) -> Result<Val<'a>, EvalError> {
    b.charge(1)?;
    match &n.kind {
        Kind::Lit(v) => Ok(Val::of(v, None)),
        Kind::Path(p) => eval_path(p, n, cx, b),
        Kind::And(_) | Kind::Or(_) | Kind::Not(_) | Kind::Cmp(..) | Kind::In { .. } => logic(n, cx, b).map(Val::Bool),
        Kind::Neg(x) => {
            let v = eval(x, cx, b)?;
            match v.view() {
                View::Num(Num::I(i)) => {
                    from_i128(-i).ok_or_else(|| EvalError::Overflow { op: "-", expr: cx.snippet(n) })
                }
                View::Num(Num::F(f)) => Ok(Val::Float(-f)),
                View::Null => Ok(Val::Null),
                View::Cut(_) => Err(cx.cut_operand(&v, x, "\"-\"")),
                View::Redacted(m) => Err(cx.redacted(n, m)),
                other => Err(cx.bad_operand("-", other, n)),
            }
        }
        Kind::Arith(op, l, r) => {
            let a = eval(l, cx, b)?;
            let c = eval(r, cx, b)?;
            arith(*op, a, c, n, l, r, cx, b)
        }
        Kind::Call(func, args) => call(*func, args, n, cx, b),
        Kind::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(eval(item, cx, b)?.into_value());
            }
            Ok(Val::Owned(Box::new(Value::List(List { type_name: None, items: out, omitted: 0 }))))
        }
    }
}

/// Evaluates `n` where true or false is wanted (a condition, an operand of `&&`, `||`,
/// `!`): boolean nodes answer with a plain `bool`, which keeps the hot path of
/// conditions free of value construction; anything else comes back as its value for
/// the caller to judge.
pub(crate) fn test<'a, S: Scope + ?Sized>(
    n: &'a Node,
    cx: &Cx<'a, S>,
    b: &mut Budget,
) -> Result<Result<bool, Val<'a>>, EvalError> {
    match &n.kind {
        Kind::And(_) | Kind::Or(_) | Kind::Not(_) | Kind::Cmp(..) | Kind::In { .. } => {
            b.charge(1)?;
            logic(n, cx, b).map(Ok)
        }
        _ => eval(n, cx, b).map(|v| match v {
            Val::Bool(t) => Ok(t),
            other => Err(other),
        }),
    }
}

/// The nodes whose result is always a boolean. The caller has charged for `n`.
fn logic<'a, S: Scope + ?Sized>(n: &'a Node, cx: &Cx<'a, S>, b: &mut Budget) -> Result<bool, EvalError> {
    match &n.kind {
        Kind::And(items) => {
            for item in items {
                if !truthy(test(item, cx, b)?, item, "&&", cx)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Kind::Or(items) => {
            for item in items {
                if truthy(test(item, cx, b)?, item, "||", cx)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Kind::Not(x) => match test(x, cx, b)? {
            Ok(t) => Ok(!t),
            Err(v) => match v.view() {
                View::Null => Ok(true),
                View::Cut(_) => Err(cx.cut_operand(&v, x, "\"!\"")),
                View::Redacted(m) => Err(cx.redacted(n, m)),
                other => Err(cx.bad_operand("!", other, n)),
            },
        },
        Kind::Cmp(op, l, r) => {
            // The most common condition shape, `field OP literal`, reads the field in
            // place; the cost charged is the same as through the general path.
            if let (Kind::Path(p), Kind::Lit(lit)) = (&l.kind, &r.kind)
                && let Some(name) = p.single_field()
            {
                b.charge(3)?;
                let a = cx.scope.field(name).map_or(Val::Null, |v| Val::of(v, Some(1)));
                return compare(*op, &a, &Val::of(lit, None), n, l, r, cx, b);
            }
            let a = operand(l, cx, b)?;
            let c = operand(r, cx, b)?;
            compare(*op, &a, &c, n, l, r, cx, b)
        }
        Kind::In { negated, needle, hay } => {
            let x = operand(needle, cx, b)?;
            let h = operand(hay, cx, b)?;
            membership(&x, &h, n, needle, hay, "in", cx, b).map(|found| found != *negated)
        }
        // Not reached: only boolean kinds are sent here.
        _ => truthy(test(n, cx, b)?, n, "&&", cx),
    }
}

/// An operand of a comparison: literals, the usual right-hand side, are read in place
/// rather than through a call to [`eval`].
#[inline]
fn operand<'a, S: Scope + ?Sized>(n: &'a Node, cx: &Cx<'a, S>, b: &mut Budget) -> Result<Val<'a>, EvalError> {
    if let Kind::Lit(v) = &n.kind {
        b.charge(1)?;
        return Ok(Val::of(v, None));
    }
    eval(n, cx, b)
}

/// True or false for `&&`, `||`: `null` counts as false, anything else but a bool is
/// an error.
fn truthy<S: ?Sized>(t: Result<bool, Val<'_>>, n: &Node, op: &'static str, cx: &Cx<'_, S>) -> Result<bool, EvalError> {
    let v = match t {
        Ok(t) => return Ok(t),
        Err(v) => v,
    };
    match v.view() {
        View::Bool(t) => Ok(t),
        View::Null => Ok(false),
        View::Cut(_) => Err(cx.cut_operand(&v, n, &format!("\"{op}\""))),
        View::Redacted(m) => Err(cx.redacted(n, m)),
        other => Err(EvalError::BadOperand { op, operand: other.kind(), expr: cx.snippet(n) }),
    }
}

fn from_i128(i: i128) -> Option<Val<'static>> {
    if let Ok(v) = i64::try_from(i) { Some(Val::Int(v)) } else { u64::try_from(i).ok().map(Val::UInt) }
}

// ---------------------------------------------------------------------------------
// Paths

/// A key a path segment asks a value for.
#[derive(Debug, Clone, Copy)]
enum Key<'k> {
    Name(&'k str),
    Index(i64),
    UIndex(u64),
}

enum Stepped<'v> {
    Found(&'v Value),
    Missing,
    /// The container kept `kept` of `total` children and the one asked for may be
    /// among those left out.
    Omitted {
        kept: u64,
        total: u64,
        what: &'static str,
    },
}

fn step<'v>(cur: &'v Value, key: Key<'_>, b: &mut Budget) -> Result<Stepped<'v>, EvalError> {
    Ok(match (cur, key) {
        (Value::Object(o), Key::Name(name)) => {
            let found = o.fields.iter().position(|f| f.name == name);
            b.charge_scan(found.unwrap_or(o.fields.len()))?;
            match found.and_then(|i| o.fields.get(i)) {
                Some(f) => Stepped::Found(&f.value),
                None => omitted_or_missing(o.fields.len(), o.omitted, "fields"),
            }
        }
        (Value::Object(o), Key::Index(i)) => {
            b.charge_scan(o.fields.len())?;
            match o.fields.iter().find(|f| f.name.parse::<i64>() == Ok(i)) {
                Some(f) => Stepped::Found(&f.value),
                None => omitted_or_missing(o.fields.len(), o.omitted, "fields"),
            }
        }
        (Value::Map(m), key) => {
            let found = m.entries.iter().position(|(k, _)| key_matches(k, key));
            b.charge_scan(found.unwrap_or(m.entries.len()))?;
            match found.and_then(|i| m.entries.get(i)) {
                Some((_, v)) => Stepped::Found(v),
                None => omitted_or_missing(m.entries.len(), m.omitted, "entries"),
            }
        }
        (Value::List(l), key) => {
            let kept = l.items.len() as u64;
            let total = kept.saturating_add(l.omitted);
            let index = match key {
                Key::Index(i) if i >= 0 => Some(i as u64),
                Key::Index(i) => total.checked_sub(i.unsigned_abs()),
                Key::UIndex(u) => Some(u),
                Key::Name(name) => name.parse::<u64>().ok(),
            };
            match index {
                Some(i) if i < kept => {
                    usize::try_from(i).ok().and_then(|i| l.items.get(i)).map_or(Stepped::Missing, Stepped::Found)
                }
                Some(i) if i < total => Stepped::Omitted { kept, total, what: "items" },
                _ => Stepped::Missing,
            }
        }
        _ => Stepped::Missing,
    })
}

fn omitted_or_missing(kept: usize, omitted: u64, what: &'static str) -> Stepped<'static> {
    if omitted > 0 {
        let kept = kept as u64;
        Stepped::Omitted { kept, total: kept.saturating_add(omitted), what }
    } else {
        Stepped::Missing
    }
}

fn key_matches(k: &Value, key: Key<'_>) -> bool {
    match (k, key) {
        (Value::Str(t), Key::Name(name)) => t.value == name,
        (Value::Int(a), Key::Index(i)) => *a == i,
        (Value::UInt(a), Key::Index(i)) => i64::try_from(*a) == Ok(i),
        (Value::Int(a), Key::UIndex(u)) => u64::try_from(*a) == Ok(u),
        (Value::UInt(a), Key::UIndex(u)) => *a == u,
        _ => false,
    }
}

/// Looks up the first name of a run, retrying with the following names joined by dots
/// (longest first) when the scope has no field by the single name.
fn resolve_run<'a>(
    run: &'a NameRun,
    from: usize,
    lookup: impl Fn(&str) -> Option<&'a Value>,
    b: &mut Budget,
) -> Result<Option<(&'a Value, usize)>, EvalError> {
    b.charge(1)?;
    if let Some(v) = lookup(run.name(from)) {
        return Ok(Some((v, from + 1)));
    }
    for to in (from + 1..run.len()).rev() {
        b.charge(1)?;
        if let Some(v) = lookup(run.dotted(from, to)) {
            return Ok(Some((v, to + 1)));
        }
    }
    Ok(None)
}

fn eval_path<'a, S: Scope + ?Sized>(
    p: &'a Path,
    n: &'a Node,
    cx: &Cx<'a, S>,
    b: &mut Budget,
) -> Result<Val<'a>, EvalError> {
    let scope = cx.scope;
    let found = match &p.base {
        Base::Field => resolve_run(&p.run, 0, |name| scope.field(name), b)?,
        Base::Span => {
            let first = p.run.name(0);
            let named = p.run.len() >= 2 && {
                b.charge(1)?;
                scope.has_span(first)
            };
            if named {
                resolve_run(&p.run, 1, |f| scope.span_field(Some(first), f), b)?
            } else {
                resolve_run(&p.run, 0, |f| scope.span_field(None, f), b)?
            }
        }
        Base::Expr(base) => {
            return match eval(base, cx, b)? {
                Val::Ref(v) => walk(v, p, 0, 1, base.end, n, cx, b),
                Val::Owned(v) => walk(&v, p, 0, 1, base.end, n, cx, b).map(Val::into_static),
                Val::Redacted(m) if !p.tail.is_empty() => Err(cx.redacted(n, m)),
                Val::Cut(c, depth) if !p.tail.is_empty() => Err(EvalError::Truncated {
                    path: cx.snippet(base),
                    depth,
                    detail: format!("{}, so the path cannot look inside it", describe_cut(c)),
                }),
                // Fields of a scalar do not exist: null, like any missing field.
                _ if !p.tail.is_empty() => Ok(Val::Null),
                other => Ok(other),
            };
        }
    };
    match found {
        Some((v, next)) => {
            let end = p.run.src_end(next.saturating_sub(1));
            walk(v, p, next, 1, end, n, cx, b)
        }
        None => Ok(Val::Null),
    }
}

/// Walks from `v` (at nesting level `depth`, reached at source offset `end`) through
/// the run names from `next` on and then the tail segments.
#[allow(clippy::too_many_arguments)]
fn walk<'v, 'a: 'v, S: Scope + ?Sized>(
    v: &'v Value,
    p: &'a Path,
    next: usize,
    mut depth: u32,
    mut end: u32,
    n: &'a Node,
    cx: &Cx<'a, S>,
    b: &mut Budget,
) -> Result<Val<'v>, EvalError> {
    let mut cur = v;
    for i in next..p.run.len() {
        match advance(cur, Key::Name(p.run.name(i)), depth, end, p.run.src_end(i), n, cx, b)? {
            Some(found) => cur = found,
            None => return Ok(Val::Null),
        }
        depth += 1;
        end = p.run.src_end(i);
    }
    for seg in &p.tail {
        let index;
        let key = match &seg.kind {
            SegKind::Name(name) => Key::Name(name),
            SegKind::Index(i) => Key::Index(*i),
            SegKind::Dyn(node) => {
                index = eval(node, cx, b)?;
                match &index {
                    Val::Int(i) => Key::Index(*i),
                    Val::UInt(u) => Key::UIndex(*u),
                    Val::Str(s, None) => Key::Name(s),
                    Val::Null => return Ok(Val::Null),
                    Val::Redacted(m) => return Err(cx.redacted(node, m)),
                    Val::Str(_, Some(_)) => return Err(cx.cut_operand(&index, node, "an index")),
                    other => return Err(cx.bad_operand("[]", other.view(), node)),
                }
            }
        };
        match advance(cur, key, depth, end, seg.src_end, n, cx, b)? {
            Some(found) => cur = found,
            None => return Ok(Val::Null),
        }
        depth += 1;
        end = seg.src_end;
    }
    Ok(Val::of(cur, Some(depth)))
}

/// One path step from `cur` (reached at source offset `end`): `None` means the path
/// reads as null.
#[allow(clippy::too_many_arguments)]
fn advance<'v, S: ?Sized>(
    cur: &'v Value,
    key: Key<'_>,
    depth: u32,
    end: u32,
    seg_end: u32,
    n: &Node,
    cx: &Cx<'_, S>,
    b: &mut Budget,
) -> Result<Option<&'v Value>, EvalError> {
    b.charge(1)?;
    match cur {
        Value::Null => return Ok(None),
        // Looking inside a redacted value (a field of a redacted object, a character of
        // a redacted string) would tell something about it.
        Value::Str(t) if is_redaction_marker(&t.value) => {
            return Err(EvalError::Redacted { expr: cx.snippet_to(n, seg_end), marker: truncate_marker(&t.value) });
        }
        Value::Cut(c) => {
            return Err(EvalError::Truncated {
                path: cx.snippet_to(n, end),
                depth: Some(depth),
                detail: format!("{}, so the path cannot look inside it", describe_cut(c)),
            });
        }
        _ => {}
    }
    match step(cur, key, b)? {
        Stepped::Found(v) => Ok(Some(v)),
        Stepped::Missing => Ok(None),
        Stepped::Omitted { kept, total, what } => Err(EvalError::Truncated {
            path: cx.snippet_to(n, seg_end),
            depth: Some(depth),
            detail: format!(
                "is not among the {kept} of {total} {what} that capture limits kept, so its value is unknown"
            ),
        }),
    }
}

// ---------------------------------------------------------------------------------
// Comparisons

/// The answer to "are these equal?".
enum Eq3<'v> {
    Yes,
    No,
    /// The types cannot be compared.
    Mismatch,
    /// The answer depends on a part that capture limits removed.
    Unknown,
    TooDeep,
    /// One side is or holds a redacted value (this marker): no answer may be given.
    Redacted(&'v str),
}

impl Eq3<'_> {
    fn from_bool(b: bool) -> Self {
        if b { Eq3::Yes } else { Eq3::No }
    }
}

fn num_cmp(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::I(x), Num::I(y)) => Some(x.cmp(&y)),
        (Num::F(x), Num::F(y)) => x.partial_cmp(&y),
        (Num::I(x), Num::F(y)) => int_float_cmp(x, y),
        (Num::F(x), Num::I(y)) => int_float_cmp(y, x).map(Ordering::reverse),
    }
}

/// Compares an integer (within the `i64`/`u64` ranges) with a float exactly.
fn int_float_cmp(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    if f >= 18_446_744_073_709_551_616.0 {
        return Some(Ordering::Less);
    }
    if f < -9_223_372_036_854_775_808.0 {
        return Some(Ordering::Greater);
    }
    let whole = f.trunc();
    match i.cmp(&(whole as i128)) {
        Ordering::Equal => 0.0_f64.partial_cmp(&(f - whole)),
        other => Some(other),
    }
}

fn char_len(s: &str, original: Option<u64>) -> u64 {
    original.unwrap_or_else(|| s.chars().count() as u64)
}

fn str_eq(x: &str, tx: Option<u64>, y: &str, ty: Option<u64>, b: &mut Budget) -> Result<Eq3<'static>, EvalError> {
    b.charge_text(x.len().min(y.len()))?;
    if tx.is_none() && ty.is_none() {
        return Ok(Eq3::from_bool(x == y));
    }
    b.charge_text(x.len().max(y.len()))?;
    if char_len(x, tx) != char_len(y, ty) {
        return Ok(Eq3::No);
    }
    let common = x.len().min(y.len());
    if x.as_bytes().get(..common) != y.as_bytes().get(..common) {
        return Ok(Eq3::No);
    }
    Ok(Eq3::Unknown)
}

/// Orders two strings when the kept parts of shortened ones decide it.
fn str_cmp(x: &str, tx: Option<u64>, y: &str, ty: Option<u64>, b: &mut Budget) -> Result<Option<Ordering>, EvalError> {
    b.charge_text(x.len().min(y.len()))?;
    if tx.is_none() && ty.is_none() {
        return Ok(Some(x.cmp(y)));
    }
    let common = x.len().min(y.len());
    let (xa, ya) = (x.as_bytes(), y.as_bytes());
    match xa.get(..common).cmp(&ya.get(..common)) {
        Ordering::Equal => {}
        decided => return Ok(Some(decided)),
    }
    // One kept part is a prefix of the other: only a complete shorter side decides.
    Ok(match x.len().cmp(&y.len()) {
        Ordering::Less if tx.is_none() => Some(Ordering::Less),
        Ordering::Greater if ty.is_none() => Some(Ordering::Greater),
        Ordering::Equal if tx.is_none() => Some(Ordering::Less),
        Ordering::Equal if ty.is_none() => Some(Ordering::Greater),
        _ => None,
    })
}

fn equal<'v>(a: View<'v>, c: View<'v>, b: &mut Budget, depth: u32) -> Result<Eq3<'v>, EvalError> {
    b.charge(1)?;
    if depth > MAX_COMPARE_DEPTH {
        return Ok(Eq3::TooDeep);
    }
    Ok(match (a, c) {
        (View::Null, View::Null) => Eq3::Yes,
        (View::Null, _) | (_, View::Null) => Eq3::No,
        (View::Redacted(m), _) | (_, View::Redacted(m)) => Eq3::Redacted(m),
        (View::Cut(_), _) | (_, View::Cut(_)) => Eq3::Unknown,
        (View::Bool(x), View::Bool(y)) => Eq3::from_bool(x == y),
        (View::Num(x), View::Num(y)) => Eq3::from_bool(num_cmp(x, y) == Some(Ordering::Equal)),
        (View::Str(x, tx), View::Str(y, ty)) => str_eq(x, tx, y, ty, b)?,
        (View::List(x), View::List(y)) => {
            let pairs = x.items.iter().zip(&y.items).map(|(p, q)| (View::of(p), View::of(q)));
            all_equal(
                pairs,
                (x.items.len() as u64).saturating_add(x.omitted),
                (y.items.len() as u64).saturating_add(y.omitted),
                x.omitted.saturating_add(y.omitted),
                b,
                depth,
            )?
        }
        (View::Map(x), View::Map(y)) => {
            let total = |m: &Map| (m.entries.len() as u64).saturating_add(m.omitted);
            if total(x) != total(y) {
                return Ok(Eq3::No);
            }
            // Same keys in the same order (the usual case, and the only sound one for
            // maps with duplicate keys): compare entry by entry.
            let mut same_order = x.entries.len() == y.entries.len();
            let mut keys_unknown = false;
            for ((k, _), (k2, _)) in x.entries.iter().zip(&y.entries) {
                match equal(View::of(k), View::of(k2), b, depth + 1)? {
                    Eq3::Yes => {}
                    Eq3::Unknown => keys_unknown = true,
                    stop @ (Eq3::TooDeep | Eq3::Redacted(_)) => return Ok(stop),
                    Eq3::No | Eq3::Mismatch => {
                        same_order = false;
                        break;
                    }
                }
            }
            if same_order {
                let pairs = x.entries.iter().zip(&y.entries).map(|((_, v), (_, v2))| (View::of(v), View::of(v2)));
                return Ok(match all_equal(pairs, 0, 0, x.omitted.saturating_add(y.omitted), b, depth)? {
                    Eq3::Yes if keys_unknown => Eq3::Unknown,
                    other => other,
                });
            }
            let mut unknown = x.omitted.saturating_add(y.omitted) > 0;
            for (k, v) in &x.entries {
                let mut matched = None;
                let mut maybe = false;
                for (k2, v2) in &y.entries {
                    match equal(View::of(k), View::of(k2), b, depth + 1)? {
                        Eq3::Yes => {
                            matched = Some(v2);
                            break;
                        }
                        Eq3::Unknown => maybe = true,
                        stop @ (Eq3::TooDeep | Eq3::Redacted(_)) => return Ok(stop),
                        Eq3::No | Eq3::Mismatch => {}
                    }
                }
                match matched {
                    Some(v2) => match equal(View::of(v), View::of(v2), b, depth + 1)? {
                        Eq3::Yes => {}
                        Eq3::Unknown => unknown = true,
                        stop @ (Eq3::TooDeep | Eq3::Redacted(_)) => return Ok(stop),
                        Eq3::No | Eq3::Mismatch => return Ok(Eq3::No),
                    },
                    None if maybe || y.omitted > 0 => unknown = true,
                    None => return Ok(Eq3::No),
                }
            }
            if unknown { Eq3::Unknown } else { Eq3::Yes }
        }
        (View::Object(x), View::Object(y)) => {
            // Fields come in declaration order, so two objects of one type are compared
            // field by field.
            if x.type_name != y.type_name || x.fields.len() != y.fields.len() || x.omitted != y.omitted {
                return Ok(Eq3::No);
            }
            if x.fields.iter().zip(&y.fields).any(|(f, g)| f.name != g.name) {
                return Ok(Eq3::No);
            }
            let pairs = x.fields.iter().zip(&y.fields).map(|(f, g)| (View::of(&f.value), View::of(&g.value)));
            all_equal(pairs, 0, 0, x.omitted.saturating_add(y.omitted), b, depth)?
        }
        _ => Eq3::Mismatch,
    })
}

fn all_equal<'p>(
    pairs: impl Iterator<Item = (View<'p>, View<'p>)>,
    len_a: u64,
    len_b: u64,
    omitted: u64,
    b: &mut Budget,
    depth: u32,
) -> Result<Eq3<'p>, EvalError> {
    if len_a != len_b {
        return Ok(Eq3::No);
    }
    let mut unknown = omitted > 0;
    for (p, q) in pairs {
        match equal(p, q, b, depth + 1)? {
            Eq3::Yes => {}
            Eq3::Unknown => unknown = true,
            stop @ (Eq3::TooDeep | Eq3::Redacted(_)) => return Ok(stop),
            // Items of different types make the lists different; only the top-level
            // comparison insists on comparable types.
            Eq3::No | Eq3::Mismatch => return Ok(Eq3::No),
        }
    }
    Ok(if unknown { Eq3::Unknown } else { Eq3::Yes })
}

#[allow(clippy::too_many_arguments)]
fn compare<S: ?Sized>(
    op: CmpOp,
    a: &Val<'_>,
    c: &Val<'_>,
    n: &Node,
    l: &Node,
    r: &Node,
    cx: &Cx<'_, S>,
    b: &mut Budget,
) -> Result<bool, EvalError> {
    let (va, vc) = (a.view(), c.view());
    let what = || format!("\"{}\"", op.symbol());
    match (va, vc) {
        // A cut value is something, so it is not null; anything else about it is unknown.
        (View::Cut(_) | View::Redacted(_), View::Null) | (View::Null, View::Cut(_) | View::Redacted(_))
            if matches!(op, CmpOp::Eq | CmpOp::Ne) =>
        {
            return Ok(op == CmpOp::Ne);
        }
        (View::Redacted(m), _) | (_, View::Redacted(m)) => return Err(cx.redacted(n, m)),
        (View::Cut(_), _) => return Err(cx.cut_operand(a, l, &what())),
        (_, View::Cut(_)) => return Err(cx.cut_operand(c, r, &what())),
        _ => {}
    }
    match op {
        CmpOp::Eq | CmpOp::Ne => match equal(va, vc, b, 0)? {
            Eq3::Yes => Ok(op == CmpOp::Eq),
            Eq3::No => Ok(op == CmpOp::Ne),
            Eq3::Mismatch => Err(cx.mismatch(op.symbol(), va, vc, n)),
            Eq3::Unknown => Err(cx.unknown(
                n,
                &format!("compares values that capture limits shortened, so {} cannot be decided", what()),
            )),
            Eq3::TooDeep => Err(EvalError::TooDeep { expr: cx.snippet(n) }),
            Eq3::Redacted(m) => Err(cx.redacted(n, m)),
        },
        _ => {
            let ordering = match (va, vc) {
                // Ordering against null is false: a missing value is neither bigger nor smaller.
                (View::Null, _) | (_, View::Null) => return Ok(false),
                (View::Num(x), View::Num(y)) => num_cmp(x, y),
                (View::Str(x, tx), View::Str(y, ty)) => match str_cmp(x, tx, y, ty, b)? {
                    Some(o) => Some(o),
                    None => {
                        return Err(cx.unknown(
                            n,
                            &format!("compares strings that capture limits shortened, so {} cannot be decided", what()),
                        ));
                    }
                },
                _ => return Err(cx.mismatch(op.symbol(), va, vc, n)),
            };
            // NaN is unordered: every ordering comparison with it is false.
            Ok(ordering.is_some_and(|o| match op {
                CmpOp::Lt => o == Ordering::Less,
                CmpOp::Le => o != Ordering::Greater,
                CmpOp::Gt => o == Ordering::Greater,
                CmpOp::Ge => o != Ordering::Less,
                CmpOp::Eq | CmpOp::Ne => false,
            }))
        }
    }
}

/// `needle in hay` (also `contains(hay, needle)`).
#[allow(clippy::too_many_arguments)]
fn membership<S: ?Sized>(
    needle: &Val<'_>,
    hay: &Val<'_>,
    n: &Node,
    needle_node: &Node,
    hay_node: &Node,
    op: &'static str,
    cx: &Cx<'_, S>,
    b: &mut Budget,
) -> Result<bool, EvalError> {
    let (vn, vh) = (needle.view(), hay.view());
    let what = || format!("\"{op}\"");
    if let (View::Redacted(m), _) | (_, View::Redacted(m)) = (vn, vh) {
        return Err(cx.redacted(n, m));
    }
    if let View::Cut(_) = vh {
        return Err(cx.cut_operand(hay, hay_node, &what()));
    }
    if let (View::Cut(_), View::List(_) | View::Map(_) | View::Object(_) | View::Str(..)) = (vn, vh) {
        return Err(cx.cut_operand(needle, needle_node, &what()));
    }
    let omitted_detail = || format!("has items that capture limits left out, so {} cannot be decided", what());
    match vh {
        View::Null => Ok(false),
        View::Str(h, th) => match vn {
            View::Null => Ok(false),
            View::Str(x, tx) => {
                b.charge_text(h.len())?;
                if h.contains(x) {
                    if tx.is_some() {
                        return Err(cx.unknown(
                            needle_node,
                            &format!("was shortened by capture limits, so {} cannot be decided", what()),
                        ));
                    }
                    Ok(true)
                } else if th.is_some() {
                    Err(cx.unknown(
                        hay_node,
                        &format!("was shortened by capture limits, so {} cannot be decided", what()),
                    ))
                } else {
                    Ok(false)
                }
            }
            other => Err(cx.mismatch(op, other, vh, n)),
        },
        View::List(l) => {
            let mut unknown = l.omitted > 0;
            b.charge_scan(l.items.len())?;
            for item in &l.items {
                match equal(vn, View::of(item), b, 1)? {
                    Eq3::Yes => return Ok(true),
                    Eq3::Unknown => unknown = true,
                    Eq3::TooDeep => return Err(EvalError::TooDeep { expr: cx.snippet(n) }),
                    Eq3::Redacted(m) => return Err(cx.redacted(n, m)),
                    // Items of another type are simply not the one looked for.
                    Eq3::No | Eq3::Mismatch => {}
                }
            }
            if unknown { Err(cx.unknown(hay_node, &omitted_detail())) } else { Ok(false) }
        }
        View::Map(m) => {
            let mut unknown = m.omitted > 0;
            b.charge_scan(m.entries.len())?;
            for (k, _) in &m.entries {
                match equal(vn, View::of(k), b, 1)? {
                    Eq3::Yes => return Ok(true),
                    Eq3::Unknown => unknown = true,
                    Eq3::TooDeep => return Err(EvalError::TooDeep { expr: cx.snippet(n) }),
                    Eq3::Redacted(m) => return Err(cx.redacted(n, m)),
                    Eq3::No | Eq3::Mismatch => {}
                }
            }
            if unknown { Err(cx.unknown(hay_node, &omitted_detail())) } else { Ok(false) }
        }
        View::Object(o) => match vn {
            View::Str(name, None) => {
                b.charge_scan(o.fields.len())?;
                if o.fields.iter().any(|f| f.name == name) {
                    Ok(true)
                } else if o.omitted > 0 {
                    Err(cx.unknown(hay_node, &omitted_detail()))
                } else {
                    Ok(false)
                }
            }
            View::Str(_, Some(_)) => Err(cx.cut_operand(needle, needle_node, &what())),
            View::Null => Ok(false),
            other => Err(cx.mismatch(op, other, vh, n)),
        },
        View::Bool(_) | View::Num(_) | View::Cut(_) | View::Redacted(_) => Err(cx.mismatch(op, vn, vh, n)),
    }
}

// ---------------------------------------------------------------------------------
// Arithmetic and helpers

#[allow(clippy::too_many_arguments)]
fn arith<'a, S: ?Sized>(
    op: ArithOp,
    a: Val<'a>,
    c: Val<'a>,
    n: &Node,
    l: &Node,
    r: &Node,
    cx: &Cx<'_, S>,
    b: &mut Budget,
) -> Result<Val<'a>, EvalError> {
    let sym = op.symbol();
    let what = || format!("\"{sym}\"");
    let (va, vc) = (a.view(), c.view());
    let (x, y) = match (va, vc) {
        (View::Redacted(m), _) | (_, View::Redacted(m)) => return Err(cx.redacted(n, m)),
        (View::Cut(_), _) => return Err(cx.cut_operand(&a, l, &what())),
        (_, View::Cut(_)) => return Err(cx.cut_operand(&c, r, &what())),
        (View::Null, _) | (_, View::Null) => return Ok(Val::Null),
        (View::Num(x), View::Num(y)) => (x, y),
        (View::Str(x, tx), View::Str(y, ty)) if op == ArithOp::Add => {
            b.charge_text(x.len() + y.len())?;
            let original = match (tx, ty) {
                (None, None) => None,
                _ => Some(char_len(x, tx).saturating_add(char_len(y, ty))),
            };
            let mut s = String::with_capacity(x.len() + y.len());
            s.push_str(x);
            s.push_str(y);
            return Ok(Val::Str(Cow::Owned(s), original));
        }
        _ => return Err(cx.mismatch(sym, va, vc, n)),
    };
    let div_zero = || EvalError::DivisionByZero { expr: cx.snippet(n) };
    match (op, x, y) {
        // `/` is true division: 7 / 2 is 3.5.
        (ArithOp::Div, x, y) => {
            let d = y.f64();
            if d == 0.0 { Err(div_zero()) } else { Ok(Val::Float(x.f64() / d)) }
        }
        (_, Num::I(x), Num::I(y)) => {
            let result = match op {
                ArithOp::Add => x.checked_add(y),
                ArithOp::Sub => x.checked_sub(y),
                ArithOp::Mul => x.checked_mul(y),
                ArithOp::Rem if y == 0 => return Err(div_zero()),
                ArithOp::Rem => x.checked_rem(y),
                ArithOp::Div => None,
            };
            result.and_then(from_i128).ok_or_else(|| EvalError::Overflow { op: sym, expr: cx.snippet(n) })
        }
        (_, x, y) => {
            let (x, y) = (x.f64(), y.f64());
            Ok(Val::Float(match op {
                ArithOp::Add => x + y,
                ArithOp::Sub => x - y,
                ArithOp::Mul => x * y,
                ArithOp::Rem if y == 0.0 => return Err(div_zero()),
                ArithOp::Rem => x % y,
                ArithOp::Div => x / y,
            }))
        }
    }
}

fn call<'a, S: Scope + ?Sized>(
    func: Func,
    args: &'a [Node],
    n: &'a Node,
    cx: &Cx<'a, S>,
    b: &mut Budget,
) -> Result<Val<'a>, EvalError> {
    let (Some(first), second) = (args.first(), args.get(1)) else {
        return Ok(Val::Null);
    };
    let v = eval(first, cx, b)?;
    match func {
        Func::Contains => {
            let Some(second) = second else { return Ok(Val::Null) };
            let needle = eval(second, cx, b)?;
            if matches!(v.view(), View::Bool(_) | View::Num(_)) {
                return Err(cx.bad_argument(func, "a string, list, map or object to search", v.view(), n));
            }
            membership(&needle, &v, n, second, first, "contains", cx, b).map(Val::Bool)
        }
        Func::StartsWith | Func::EndsWith => {
            let Some(second) = second else { return Ok(Val::Null) };
            let p = eval(second, cx, b)?;
            let (s, ts, pat, tp) = match (v.view(), p.view()) {
                (View::Redacted(m), _) | (_, View::Redacted(m)) => return Err(cx.redacted(n, m)),
                (View::Cut(_), _) => return Err(cx.cut_operand(&v, first, &format!("\"{}\"", func.name()))),
                (_, View::Cut(_)) => return Err(cx.cut_operand(&p, second, &format!("\"{}\"", func.name()))),
                (View::Null, _) | (_, View::Null) => return Ok(Val::Bool(false)),
                (View::Str(s, ts), View::Str(pat, tp)) => (s, ts, pat, tp),
                (View::Str(..), other) | (other, _) => return Err(cx.bad_argument(func, "two strings", other, n)),
            };
            b.charge_text(pat.len())?;
            let shortened = || {
                cx.unknown(
                    n,
                    &format!("reads a string that capture limits shortened, so \"{}\" cannot be decided", func.name()),
                )
            };
            if func == Func::StartsWith {
                if s.starts_with(pat) {
                    if tp.is_some() { Err(shortened()) } else { Ok(Val::Bool(true)) }
                } else if ts.is_some() && pat.starts_with(s) {
                    Err(shortened())
                } else {
                    Ok(Val::Bool(false))
                }
            } else if ts.is_some() || tp.is_some() {
                Err(shortened())
            } else {
                Ok(Val::Bool(s.ends_with(pat)))
            }
        }
        Func::Len => match v.view() {
            View::Str(s, t) => {
                b.charge_text(s.len())?;
                Ok(count(char_len(s, t)))
            }
            View::List(l) => Ok(count((l.items.len() as u64).saturating_add(l.omitted))),
            View::Map(m) => Ok(count((m.entries.len() as u64).saturating_add(m.omitted))),
            View::Object(o) => Ok(count((o.fields.len() as u64).saturating_add(o.omitted))),
            View::Null => Ok(Val::Null),
            View::Redacted(m) => Err(cx.redacted(n, m)),
            // A depth cut records how many children the value had.
            View::Cut(Cut { reason: CutReason::Depth, size: Some(n), .. }) => Ok(count(*n)),
            View::Cut(_) => Err(cx.cut_operand(&v, first, "\"len\"")),
            other => Err(cx.bad_argument(func, "a string, list, map or object", other, n)),
        },
        Func::Lower => match v {
            Val::Str(s, t) => {
                b.charge_text(s.len())?;
                if s.chars().any(char::is_uppercase) {
                    Ok(Val::Str(Cow::Owned(s.to_lowercase()), t))
                } else {
                    Ok(Val::Str(s, t))
                }
            }
            Val::Null => Ok(Val::Null),
            Val::Redacted(m) => Err(cx.redacted(n, m)),
            Val::Cut(..) => Err(cx.cut_operand(&v, first, "\"lower\"")),
            other => Err(cx.bad_argument(func, "a string", other.view(), n)),
        },
    }
}

fn count(n: u64) -> Val<'static> {
    i64::try_from(n).map_or(Val::UInt(n), Val::Int)
}
