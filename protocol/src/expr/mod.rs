//! The expression language of snapshot conditions, watch expressions, log template
//! placeholders and metric values: field paths, literals, comparison, boolean logic,
//! arithmetic, `in`, and a closed set of string helpers. Nothing in it can call into,
//! write to, or loop over the host program: an expression can only ask its [`Scope`]
//! for values by name, and its cost is bounded by a [`Budget`] of steps.
//!
//! The broker parses every expression of an action when it is placed (with
//! [`parse_condition`], [`parse_watch`], [`parse_numeric`], [`Template::parse`], or
//! all at once with [`ActionExprs::compile`]) and refuses bad ones with a
//! [`ParseError`] that points at the position and says what was expected. The agent
//! compiles the same sources once per action and evaluates the result at every hit;
//! run-time failures are [`EvalError`]s, reported once per action.
//!
//! The grammar, the typing and null rules, span resolution and examples are in
//! `docs/expressions.md`.
//!
//! ```
//! use periscope_protocol::expr::{Budget, SimpleScope, Template, parse_condition};
//!
//! let cond = parse_condition(r#"status == "failed" && amount > 1000"#)?;
//! let scope = SimpleScope::new().with_field("status", "failed").with_field("amount", 1500_i64);
//! assert!(cond.eval_condition(&scope, &mut Budget::default())?);
//! assert_eq!(cond.roots().fields, ["amount", "status"]);
//!
//! let line = Template::parse("paid {amount}")?.render(&scope, &mut Budget::default(), |_index, _expr, _value| {
//!     // the agent redacts `_value` here
//! })?;
//! assert_eq!(line.text, "paid 1500");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layout
//!
//! - `lexer`: source to tokens with byte spans.
//! - `parser`: tokens to the tree, with nesting bounds and static type checks.
//! - `ast`: the compiled tree.
//! - `eval`: evaluation without allocation on the common path.
//! - [`scope`]: the [`Scope`] trait, [`SimpleScope`], [`Budget`].
//! - [`template`]: log templates.
//! - [`error`]: [`ParseError`], [`EvalError`].
//! - `action`: compiling all the expressions of an [`ActionSpec`](crate::ActionSpec).

mod action;
mod ast;
pub mod error;
mod eval;
mod lexer;
mod parser;
pub mod scope;
pub mod template;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

pub use action::{ActionExprs, ExprFieldError};
pub use error::{EvalError, ParseError};
pub use parser::MAX_NESTING;
pub use scope::{Budget, Scope, SimpleScope};
pub use template::{PlaceholderError, Rendered, Template};

use ast::{Base, Func, Kind, Node, SegKind, Ty};
use eval::{Cx, Val};

use crate::value::Value;

/// A compiled expression: parsed and checked once, evaluated at every hit.
///
/// Cheap to clone (the tree is shared) and safe to share between threads.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<Inner>,
}

struct Inner {
    source: Box<str>,
    root: Node,
    ty: Ty,
    roots: Roots,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expr").field(&self.inner.source).finish()
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.source)
    }
}

/// What an expression reads, so the agent captures only those values before
/// evaluating it.
///
/// A path like `user.id` lists both `user` and `user.id` (the dotted name is tried
/// when there is no field `user`); a span path `span.a.b` lists `a` as a possible span
/// name and `a`, `a.b` and `b` as possible span fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Roots {
    /// Event fields (locals) the expression may read, sorted.
    pub fields: Vec<String>,
    /// Span names a `span.` path may address, sorted.
    pub span_names: Vec<String>,
    /// Span fields a `span.` path may read, sorted.
    pub span_fields: Vec<String>,
}

impl Roots {
    /// Whether any span is consulted, i.e. whether the agent must look at the span
    /// stack at all.
    pub fn uses_spans(&self) -> bool {
        !self.span_fields.is_empty()
    }

    /// Whether the expression reads nothing from the scope (it is constant).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.span_fields.is_empty()
    }

    /// Whether the event field `name` may be read.
    pub fn reads_field(&self, name: &str) -> bool {
        self.fields.binary_search_by(|f| f.as_str().cmp(name)).is_ok()
    }

    /// Adds everything `other` reads.
    pub fn merge(&mut self, other: &Roots) {
        let join = |a: &mut Vec<String>, b: &[String]| {
            let set: BTreeSet<String> = a.drain(..).chain(b.iter().cloned()).collect();
            *a = set.into_iter().collect();
        };
        join(&mut self.fields, &other.fields);
        join(&mut self.span_names, &other.span_names);
        join(&mut self.span_fields, &other.span_fields);
    }

    fn of(node: &Node) -> Roots {
        let mut sets = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
        collect_roots(node, &mut sets);
        let [fields, span_names, span_fields] = sets.map(|s| s.into_iter().collect());
        Roots { fields, span_names, span_fields }
    }
}

fn collect_roots(n: &Node, out: &mut [BTreeSet<String>; 3]) {
    let [fields, span_names, span_fields] = out;
    match &n.kind {
        Kind::Lit(_) => {}
        Kind::Path(p) => {
            let run = &p.run;
            let names_from = |from: usize, set: &mut BTreeSet<String>| {
                if from < run.len() {
                    set.insert(run.name(from).to_owned());
                    for to in from + 1..run.len() {
                        set.insert(run.dotted(from, to).to_owned());
                    }
                }
            };
            match &p.base {
                Base::Field => names_from(0, fields),
                Base::Span => {
                    names_from(0, span_fields);
                    if run.len() >= 2 {
                        span_names.insert(run.name(0).to_owned());
                        names_from(1, span_fields);
                    }
                }
                Base::Expr(e) => collect_roots(e, out),
            }
            for seg in &p.tail {
                if let SegKind::Dyn(index) = &seg.kind {
                    collect_roots(index, out);
                }
            }
        }
        Kind::Not(x) | Kind::Neg(x) => collect_roots(x, out),
        Kind::List(items) | Kind::And(items) | Kind::Or(items) | Kind::Call(_, items) => {
            for item in items {
                collect_roots(item, out);
            }
        }
        Kind::Cmp(_, a, b) | Kind::Arith(_, a, b) => {
            collect_roots(a, out);
            collect_roots(b, out);
        }
        Kind::In { needle, hay, .. } => {
            collect_roots(needle, out);
            collect_roots(hay, out);
        }
    }
}

impl Expr {
    /// Parses any expression (what a watch accepts). Prefer the purpose-specific
    /// [`parse_condition`] and [`parse_numeric`], which also refuse expressions that
    /// can never give a boolean or a number.
    pub fn parse(src: &str) -> Result<Expr, ParseError> {
        let (root, ty) = parser::parse(src)?;
        let roots = Roots::of(&root);
        Ok(Expr { inner: Arc::new(Inner { source: src.into(), root, ty, roots }) })
    }

    /// The source as placed.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// What the expression reads.
    pub fn roots(&self) -> &Roots {
        &self.inner.roots
    }

    /// The name that redaction's key-name rules should judge this expression's value
    /// by: the last name of a path (`email` for `user.email`, also through `lower(...)`),
    /// `None` for anything computed.
    pub fn field_name(&self) -> Option<&str> {
        let mut n = &self.inner.root;
        loop {
            match &n.kind {
                Kind::Call(Func::Lower, args) => n = args.first()?,
                Kind::Path(p) => {
                    return match p.tail.last() {
                        Some(seg) => match &seg.kind {
                            SegKind::Name(name) => Some(name),
                            _ => None,
                        },
                        None => p.run.len().checked_sub(1).map(|i| p.run.name(i)),
                    };
                }
                _ => return None,
            }
        }
    }

    fn eval_val<'a, S: Scope + ?Sized>(&'a self, scope: &'a S, budget: &mut Budget) -> Result<Val<'a>, EvalError> {
        let cx = Cx { scope, src: &self.inner.source };
        eval::eval(&self.inner.root, &cx, budget)
    }

    /// Evaluates to an owned value, for watches and template placeholders. A missing
    /// path gives [`Value::Null`]; a path ending on a cut value gives that
    /// [`Value::Cut`].
    pub fn eval<S: Scope + ?Sized>(&self, scope: &S, budget: &mut Budget) -> Result<Value, EvalError> {
        self.eval_val(scope, budget).map(Val::into_value)
    }

    /// Evaluates as a condition: `null` (a missing value) counts as false; anything
    /// else but a boolean is [`EvalError::NotBoolean`]. Does not allocate unless it
    /// fails or the expression builds new strings.
    pub fn eval_condition<S: Scope + ?Sized>(&self, scope: &S, budget: &mut Budget) -> Result<bool, EvalError> {
        let cx = Cx { scope, src: &self.inner.source };
        match eval::test(&self.inner.root, &cx, budget)? {
            Ok(b) => Ok(b),
            Err(Val::Null) => Ok(false),
            Err(Val::Redacted(marker)) => Err(redacted_result(&self.inner.source, marker)),
            Err(other) => Err(EvalError::NotBoolean { found: other.kind() }),
        }
    }

    /// Evaluates as a metric value: integers and floats as `f64`, `null` as `None` (no
    /// sample); anything else is [`EvalError::NotNumber`].
    pub fn eval_number<S: Scope + ?Sized>(&self, scope: &S, budget: &mut Budget) -> Result<Option<f64>, EvalError> {
        let v = self.eval_val(scope, budget)?;
        match v {
            Val::Null => Ok(None),
            Val::Redacted(marker) => Err(redacted_result(&self.inner.source, marker)),
            ref num => num.as_f64().map(Some).ok_or(EvalError::NotNumber { found: v.kind() }),
        }
    }
}

/// A condition or metric value that is itself a redacted value: using it as true/false
/// or as a number would read it.
#[cold]
fn redacted_result(source: &str, marker: &str) -> EvalError {
    EvalError::Redacted { expr: error::quote(source), marker: crate::value::truncate_chars(marker, 64).to_owned() }
}

fn purpose_error(src: &str, wanted: &str, ty: Ty) -> ParseError {
    ParseError::with_message(
        src,
        0,
        wanted.to_owned(),
        format!("an expression giving a {}", ty.name()),
        format!("this expression gives a {}, but {wanted} is needed", ty.name()),
    )
}

/// Parses a snapshot condition, refusing expressions that can never be true or false
/// (`amount + 1`, `"yes"`).
pub fn parse_condition(src: &str) -> Result<Expr, ParseError> {
    let e = Expr::parse(src)?;
    match e.inner.ty {
        Ty::Bool | Ty::Null | Ty::Any => Ok(e),
        ty => Err(purpose_error(src, "a condition (true or false)", ty)),
    }
}

/// Parses a watch expression; any expression is a valid watch.
pub fn parse_watch(src: &str) -> Result<Expr, ParseError> {
    Expr::parse(src)
}

/// Parses a metric value expression, refusing expressions that can never be a number
/// (`name == "x"`, `lower(s)`).
pub fn parse_numeric(src: &str) -> Result<Expr, ParseError> {
    let e = Expr::parse(src)?;
    match e.inner.ty {
        Ty::Num | Ty::Null | Ty::Any => Ok(e),
        ty => Err(purpose_error(src, "a number", ty)),
    }
}

/// Parses a dynamic log template (same as [`Template::parse`]).
pub fn parse_template(src: &str) -> Result<Template, ParseError> {
    Template::parse(src)
}

/// Renders a value the way a template placeholder would, within `max_bytes`: for an
/// agent's own log output of watch values and the like.
pub fn display_value(v: &Value, max_bytes: usize) -> String {
    template::display_value(v, max_bytes)
}
